"""Whole-process conversion benchmarks: qcowfast against qemu-img, per corpus image.

Each benchmark times one child process converting one image to raw, process launch included
(the same cost for every tool). The destination is removed before each round, outside the
timing. The last output is checked against the SHA-256 of ``qemu-img convert -O raw`` of the
same image, recorded when the corpus was built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import corpus as corpus_mod

REPO = Path(__file__).resolve().parent.parent


def _qcowfast(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "qcowfast", "convert", str(src), str(dst), "--overwrite"]


def _qemu_img(src: Path, dst: Path) -> list[str]:
    return ["qemu-img", "convert", "-O", "raw", str(src), str(dst)]


def _qemu_img_m2w(src: Path, dst: Path) -> list[str]:
    return ["qemu-img", "convert", "-m", "2", "-W", "-O", "raw", str(src), str(dst)]


TOOLS = {"qcowfast": _qcowfast, "qemu-img": _qemu_img, "qemu-img-m2W": _qemu_img_m2w}
#: Every corpus image, and a 4 GiB uncompressed one (start-up weighs less there).
VARIANTS = (*corpus_mod.BENCH_VARIANTS, *corpus_mod.EXTRA_VARIANTS, corpus_mod.BIG_NAME)


#: GNU time reports the child's own peak RSS. ``os.wait4`` alone cannot: Linux carries the
#: high-water RSS of the forking process (this pytest) over ``exec`` into the child's ru_maxrss.
GNU_TIME = "/usr/bin/time"


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """Resource use of one finished child, and what the rest of the machine did meanwhile."""

    maxrss_kib: int
    cpu_s: float
    wall_s: float
    other_cpu_s: float  # CPU time burnt by processes other than the child: noise


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s() -> float:
    """Return the machine's busy CPU seconds since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def wait_quiet(limit_s: float, *, busy_cores: float = 0.2, sample_s: float = 0.5) -> float:
    """Wait up to ``limit_s`` until the CPUs are idle for ``sample_s``; return the last load."""
    deadline = time.monotonic() + limit_s
    while True:
        busy0 = _busy_cpu_s()
        time.sleep(sample_s)
        load = (_busy_cpu_s() - busy0) / sample_s
        if load < busy_cores or time.monotonic() >= deadline:
            return load


def run_child(argv: list[str], stderr, rss_file: Path) -> ChildRun:
    """Run ``argv`` to completion under GNU time; return its resource use.

    Raise if it fails.
    """
    if not os.access(GNU_TIME, os.X_OK):
        raise RuntimeError(f"{GNU_TIME} (GNU time, Debian package 'time') is required")
    stderr.seek(0)
    stderr.truncate()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    busy0, t0 = _busy_cpu_s(), time.perf_counter()
    proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, cwd=REPO, env=env)
    # wait4 rather than proc.wait(): its rusage covers this child and its reaped children.
    _, status, usage = os.wait4(proc.pid, 0)
    wall, busy = time.perf_counter() - t0, _busy_cpu_s() - busy0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        stderr.seek(0)
        message = stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {message}")
    maxrss = int(rss_file.read_text().split()[-1])
    cpu = usage.ru_utime + usage.ru_stime
    return ChildRun(maxrss, cpu, wall, max(0.0, busy - cpu))


def _explain_mismatch(bench_corpus, variant: str, dst: Path, scratch: Path) -> str:
    """Return where ``dst`` first differs from qemu-img's output for ``variant``."""
    src = bench_corpus.path(variant)
    if bench_corpus.reference_digest(variant) == bench_corpus.reference_digest(
            corpus_mod.RAW_NAME):
        ref, ref_name = bench_corpus.path(corpus_mod.RAW_NAME), "the raw source"
        offset = corpus_mod.first_difference(dst, ref)
    else:
        ref, ref_name = scratch, "qemu-img's output"
        subprocess.run(_qemu_img(src, ref), check=True)
        try:
            offset = corpus_mod.first_difference(dst, ref)
        finally:
            ref.unlink(missing_ok=True)
    return (f"output of {src.name} differs from {ref_name} first at byte offset {offset} "
            f"(output size {dst.stat().st_size}); kept as {dst}")


def _source(bench_corpus, variant: str) -> tuple[Path, str, int]:
    """(image path, reference SHA-256, virtual size) of a corpus variant or the 4 GiB image."""
    log = lambda line: print(line, file=sys.__stderr__, flush=True)  # noqa: E731
    if variant == corpus_mod.BIG_NAME:
        path, digest = corpus_mod.ensure_big(bench_corpus, log=log)
        return path, digest, corpus_mod.BIG_SIZE
    if variant in corpus_mod.EXTRA_VARIANTS:
        path, digest = corpus_mod.ensure_extra(bench_corpus, variant, log=log)
        return path, digest, bench_corpus.size
    return bench_corpus.path(variant), bench_corpus.reference_digest(variant), bench_corpus.size


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_convert(benchmark, bench_corpus, bench_tmpfs, bench_rounds, bench_wait_quiet,
                 variant, tool):
    src, reference, virtual = _source(bench_corpus, variant)
    if variant == corpus_mod.BIG_NAME and tool == "qemu-img":
        pytest.skip("the 4 GiB image compares with qemu-img -m 2 -W only")
    bench_out = bench_tmpfs
    dst = bench_out / f"{variant}.{tool}.raw"
    argv = TOOLS[tool](src, dst)
    rounds, warmup = bench_rounds
    runs: list[ChildRun] = []

    def setup():
        dst.unlink(missing_ok=True)
        os.sync()  # no write-back of earlier output during the timed round
        if bench_wait_quiet:
            wait_quiet(bench_wait_quiet)

    benchmark.group = variant
    with tempfile.TemporaryFile() as stderr:
        rss_file = bench_out / f"{variant}.{tool}.rss"
        benchmark.pedantic(lambda: runs.append(run_child(argv, stderr, rss_file)),
                           setup=setup, rounds=rounds, warmup_rounds=warmup)

    timed = runs[-rounds:]  # not the warm-up rounds
    info = benchmark.extra_info
    info.update(variant=variant, tool=tool, command=" ".join(argv), virtual_bytes=virtual,
                image_bytes=src.stat().st_size, output_fs=corpus_mod.output_fs(bench_out),
                peak_rss_mib=round(max(r.maxrss_kib for r in timed) / 1024, 1),
                cpu_s_median=round(statistics.median(r.cpu_s for r in timed), 3),
                other_load_cores=round(statistics.median(r.other_cpu_s / r.wall_s
                                                         for r in timed), 2))
    if benchmark.stats:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info.update(median_s=median, throughput_mib_s=round(virtual / median / 2**20, 1))

    info["output_allocated_bytes"] = dst.stat().st_blocks * 512
    digest = corpus_mod.file_digest(dst)
    info["digest_ok"] = ok = digest == reference
    if not ok:
        kept_dir = bench_corpus.directory.parent / "mismatch"
        kept_dir.mkdir(exist_ok=True)
        kept = kept_dir / dst.name
        os.replace(dst, kept)
        if variant not in corpus_mod.VARIANTS:
            pytest.fail(f"output of {src.name} differs from qemu-img's; kept as {kept}")
        pytest.fail(_explain_mismatch(bench_corpus, variant, kept, bench_out / "reference.raw"))
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
