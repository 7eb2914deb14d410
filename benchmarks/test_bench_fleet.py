"""A batch of a dozen small images (16-64 MiB: plain, zlib, zstd, 512-byte clusters), five ways.

(a) a shell loop of ``qemu-img convert``; (b) a loop of ``qcowfast convert`` processes;
(c) ``qcowfast.convert_many`` in this process; (d) ``qcowfast.dask.convert_many`` on a
2-worker ``distributed.LocalCluster`` (timed after the cluster has started); (e) a plain
in-process loop calling ``qcowfast.convert`` one job after another. Outputs go to tmpfs
(/dev/shm) when it has room, so the benchmark measures the converters, not ext4's write-back.
Every approach's outputs are checked against qemu-img's SHA-256 after its last round.

`test_fleet_paired` runs (c), (e) and (d) in turn within each round, so that the ratios between
them are paired: this machine's speed drifts by tens of percent between one test and the next.
No Dask cluster is running while (c) or (e) is timed: an idle one takes about a tenth of a core.
Each round also measures two limits for the batch, timed per batch (the time over the copies):
the ceiling, as many copies of the batch as cores converted at once in this process, one thread
each (every core busy from the first job to the last, with nothing to schedule), and the process
ceiling, the same copies each in a child process of its own: the machine's limit (threads of one
process share its address space and GIL; processes do not).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import corpus as corpus_mod

MiB = 1024 * 1024
SIZES_MIB = (16, 24, 32, 48, 64, 16, 24, 32, 48, 64, 16, 32)
VARIANTS = {  # name: qemu-img convert options
    "plain": ["-o", "cluster_size=65536"],
    "zlib": ["-c", "-o", "cluster_size=65536"],
    "zstd": ["-c", "-o", "cluster_size=65536,compression_type=zstd"],
    "c512": ["-o", "cluster_size=512"],
}
CORES = len(os.sched_getaffinity(0))
APPROACHES = ("qemu-img-loop", "qcowfast-process-loop", "convert_many", "dask", "python-loop")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="session")
def fleet_images(pytestconfig) -> list[tuple[Path, str]]:
    """The dozen images and the SHA-256 of qemu-img's raw output of each, cached on disk."""
    root = Path(pytestconfig.getoption("--bench-dir") or corpus_mod.default_root())
    directory = root / "fleet-v1"
    done = directory / "digests.txt"
    if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        lines = []
        names = list(VARIANTS)
        for i, size in enumerate(SIZES_MIB):
            raw = directory / f"src{i}.raw"
            corpus_mod.write_raw(raw, size * MiB)
            variant = names[i % len(names)]
            img = directory / f"img{i:02d}-{variant}.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                            *VARIANTS[variant], str(raw), str(img)], check=True)
            ref = directory / "ref.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(ref)], check=True)
            lines.append(f"{img.name} {_sha256(ref)}")
            ref.unlink()
            raw.unlink()
        done.write_text("\n".join(lines) + "\n")
    out = []
    for line in done.read_text().split("\n"):
        if line:
            name, digest = line.split()
            out.append((directory / name, digest))
    return out


@pytest.fixture(scope="session")
def fleet_out() -> Path:
    shm = Path("/dev/shm")
    need = (2 + CORES) * sum(SIZES_MIB) * MiB      # (+ the ceiling's copies: test_fleet_paired)
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > need else Path("/tmp")
    out = base / f"qcowfast-fleet-{os.getpid()}"
    out.mkdir(exist_ok=True)
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _start_cluster():
    import distributed
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    return cluster, distributed.Client(cluster)


@pytest.fixture
def dask_client():
    """A 2-worker LocalCluster for one test only: an idle cluster's event loops take about a
    tenth of a core, which must not slow the approaches timed after it."""
    cluster, client = _start_cluster()
    yield client
    client.close()
    cluster.close()


def _jobs(images, out: Path) -> list[tuple[str, str]]:
    return [(str(src), str(out / (src.stem + ".raw"))) for src, _ in images]


def _clear(out: Path) -> None:
    for p in out.iterdir():
        p.unlink()


def _in_process(approach: str, jobs, client=None):
    """A call running (c), (d) or (e) over `jobs` and checking that every job converted."""
    import qcowfast
    from qcowfast import dask as qdask
    convert_all = {"convert_many": lambda: qcowfast.convert_many(jobs),
                   "dask": lambda: qdask.convert_many(jobs, client),
                   "python-loop": lambda: [qcowfast.convert(s, d) for s, d in jobs]}[approach]

    def run():
        results = convert_all()
        assert all(isinstance(r, qcowfast.ConvertResult) for r in results), (approach, results)
    return run


def _check_outputs(images, jobs, label: str) -> None:
    for (_, digest), (_, dst) in zip(images, jobs):
        assert _sha256(Path(dst)) == digest, f"{label}: {dst} differs from qemu-img's output"


@pytest.mark.parametrize("approach", APPROACHES)
def test_fleet(benchmark, request, fleet_images, fleet_out, bench_rounds, approach):
    jobs = _jobs(fleet_images, fleet_out)
    env = dict(os.environ)
    if approach == "qemu-img-loop":
        script = "\n".join(f"qemu-img convert -O raw '{s}' '{d}' || exit 1" for s, d in jobs)
        run = lambda: subprocess.run(["sh", "-c", script], check=True)  # noqa: E731
    elif approach == "qcowfast-process-loop":
        script = "\n".join(f"'{sys.executable}' -m qcowfast convert -q '{s}' '{d}' || exit 1"
                           for s, d in jobs)
        run = lambda: subprocess.run(["sh", "-c", script], check=True, env=env)  # noqa: E731
    else:
        client = request.getfixturevalue("dask_client") if approach == "dask" else None
        run = _in_process(approach, jobs, client)

    rounds, warmup = bench_rounds
    benchmark.group = "fleet: 12 images, 432 MiB virtual"
    benchmark.extra_info.update(approach=approach, images=len(jobs),
                                virtual_bytes=sum(SIZES_MIB) * MiB, output_dir=str(fleet_out))
    benchmark.pedantic(run, setup=lambda: _clear(fleet_out), rounds=rounds,
                       warmup_rounds=warmup)
    _check_outputs(fleet_images, jobs, approach)


PAIRED = ("convert_many", "python-loop", "dask", "ceiling", "process-ceiling")

#: One copy of the batch in a child process of its own (the process ceiling): it converts its
#: first job once (imports, kernels, buffers), says so, waits for the word, converts the batch
#: with one thread and says when it is done.
_CEILING_CHILD = """
import json, sys
from pathlib import Path
import qcowfast
jobs = json.loads(sys.argv[1])
qcowfast.convert(jobs[0][0], jobs[0][1], threads=1)
Path(jobs[0][1]).unlink()
print("ready", flush=True)
sys.stdin.readline()
for src, dst in jobs:
    qcowfast.convert(src, dst, threads=1)
print("done", flush=True)
"""


def _side_by_side(jobs, copies: list[Path]):
    """The ceiling's run: each of `copies` (one per core) gets its own thread, which converts
    the whole batch into it with one conversion thread (threads=1). Copy k starts k/len(copies)
    of the way through the batch: in the same order, the copies would read each source at the
    same moment and share its cache lines, which (c)'s jobs side by side do not (2-3% faster)."""
    import qcowfast
    step = len(jobs) // len(copies)

    def one_copy(k: int, failed: list):
        try:
            for src, dst in jobs[k * step:] + jobs[:k * step]:
                qcowfast.convert(src, str(copies[k] / Path(dst).name), threads=1)
        except BaseException as exc:        # (re-raised in the timing thread)
            failed.append(exc)

    def run():
        failed: list = []
        threads = [threading.Thread(target=one_copy, args=(k, failed))
                   for k in range(len(copies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]
    return run


def _side_by_side_processes(jobs, copies: list[Path]) -> float:
    """The process ceiling's run: each of `copies` converted by a warmed child process of its
    own, staggered as in _side_by_side, all told to start at once; the seconds from that word
    to the last child's end. Processes share no address space: no mmap lock, no TLB
    shootdowns between them, no GIL (threads of one process pay for all three)."""
    import json
    step = len(jobs) // len(copies)
    children = []
    try:
        for k, out in enumerate(copies):
            mine = [(src, str(out / Path(dst).name))
                    for src, dst in jobs[k * step:] + jobs[:k * step]]
            children.append(subprocess.Popen(
                [sys.executable, "-c", _CEILING_CHILD, json.dumps(mine)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for child in children:
            assert child.stdout.readline() == "ready\n", "a ceiling child failed to start"
        start = time.perf_counter()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout.readline() == "done\n", "a ceiling child failed"
        elapsed = time.perf_counter() - start
        for child in children:
            assert child.wait(60) == 0
        return elapsed
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_fleet_paired(benchmark, fleet_images, fleet_out, bench_rounds):
    """(c), (e) and (d) in turn, round after round: paired ratios on a drifting machine.

    Each round times (c) and (e) with no cluster running, then starts a 2-worker LocalCluster,
    warms its workers with one untimed batch (imports, kernels, buffers), times (d) and closes
    the cluster. The ceiling (module docstring) is timed after (e), on as many copies of the
    batch as there are cores. The timed unit is the whole round; each approach's times are in
    extra_info.
    """
    jobs = _jobs(fleet_images, fleet_out)
    times: dict[str, list[float]] = {name: [] for name in PAIRED}
    copies = [fleet_out.with_name(f"{fleet_out.name}-copy{k}") for k in range(CORES)]
    for out in copies:
        out.mkdir(exist_ok=True)

    def timed(name, client=None):
        run = _in_process(name, jobs, client)
        _clear(fleet_out)
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)

    def ceiling():
        for out in copies:
            _clear(out)
        run = _side_by_side(jobs, copies)
        start = time.perf_counter()
        run()
        times["ceiling"].append((time.perf_counter() - start) / len(copies))
        for out in copies:
            _clear(out)
        times["process-ceiling"].append(_side_by_side_processes(jobs, copies) / len(copies))

    def one_round():
        timed("convert_many")
        timed("python-loop")
        ceiling()
        cluster, client = _start_cluster()
        try:
            _clear(fleet_out)
            _in_process("dask", jobs, client)()          # warm the fresh workers, untimed
            timed("dask", client)
        finally:
            client.close()
            cluster.close()

    rounds, _ = bench_rounds
    benchmark.group = "fleet: 12 images, paired rounds"
    try:
        benchmark.pedantic(one_round, rounds=2 * rounds, warmup_rounds=1)
        for out in copies:
            _check_outputs(fleet_images, [(s, str(out / Path(d).name)) for s, d in jobs],
                           "the ceiling's copies")
    finally:
        for out in copies:
            shutil.rmtree(out, ignore_errors=True)
    for name in PAIRED:
        del times[name][0]                       # the warm-up round
    medians = {name: statistics.median(ts) for name, ts in times.items()}

    def paired(top: str, bottom: str) -> float:
        return statistics.median(t / b for t, b in zip(times[top], times[bottom]))
    benchmark.extra_info.update(
        kind="fleet-paired", rounds=len(times["dask"]), medians=medians, cores=CORES,
        dask_over_convert_many=paired("dask", "convert_many"),
        python_loop_over_convert_many=paired("python-loop", "convert_many"),
        # (c)'s time over the ceiling's (1.0: at the machine's limit), and the most (e)/(c)
        # could be on this machine: (e) over the ceiling.
        convert_many_over_ceiling=paired("convert_many", "ceiling"),
        python_loop_over_ceiling=paired("python-loop", "ceiling"),
        convert_many_over_process_ceiling=paired("convert_many", "process-ceiling"),
        python_loop_over_process_ceiling=paired("python-loop", "process-ceiling"))
    _check_outputs(fleet_images, jobs, "paired rounds")


SCALE_JOBS = 500
SCALE_NEIGHBOURS = 5000


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory) -> Path:
    """A 1 MiB QCOW2 image holding 64 KiB of data: the conversion itself costs next to nothing,
    so what a batch of them measures is the cost per job."""
    path = tmp_path_factory.mktemp("fleet-scale") / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return path


@pytest.mark.parametrize("approach", ("qemu-img-loop", "convert_many"))
def test_fleet_scale(benchmark, tiny_image, fleet_out, bench_rounds, approach):
    """500 jobs of one tiny image into a directory that already holds 5,000 other files (an
    output directory of a running pipeline): the cost per job, which must not grow with the
    batch or the directory (a batch once listed its directory twice per job)."""
    import qcowfast
    out = fleet_out / "scale"
    out.mkdir(exist_ok=True)
    for i in range(SCALE_NEIGHBOURS):
        (out / f"earlier-{i:05d}.raw").touch()
    jobs = [(str(tiny_image), str(out / f"job-{i:04d}.raw")) for i in range(SCALE_JOBS)]

    def clear():
        for _, dst in jobs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)

    if approach == "qemu-img-loop":
        script = "\n".join(f"qemu-img convert -O raw '{s}' '{d}' || exit 1" for s, d in jobs)
        run = lambda: subprocess.run(["sh", "-c", script], check=True)  # noqa: E731
    else:
        def run():
            results = qcowfast.convert_many(jobs)
            assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results

    rounds, warmup = bench_rounds
    benchmark.group = f"fleet scale: {SCALE_JOBS} tiny images"
    benchmark.extra_info.update(kind="fleet-scale", approach=approach, images=SCALE_JOBS,
                                neighbours=SCALE_NEIGHBOURS)
    benchmark.pedantic(run, setup=clear, rounds=rounds, warmup_rounds=warmup)
    expected = _sha256(Path(jobs[0][1]))
    ref = out / "reference.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tiny_image), str(ref)], check=True)
    assert _sha256(ref) == expected
    assert all(_sha256(Path(d)) == expected for _, d in jobs), approach
    shutil.rmtree(out)
