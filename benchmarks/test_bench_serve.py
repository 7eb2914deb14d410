"""NBD serving: `nbdcopy` from `qcowfast serve` against `nbdcopy` from `qemu-nbd -r -e 8 -t`.

One server per benchmark, started outside the timing (persistent, on a Unix socket), then each
round times one whole `nbdcopy` of the export to /dev/shm (tmpfs, so the disk is not measured;
the scratch directory next to the corpus when /dev/shm is missing). nbdcopy picks its own
connection count from the multi-conn flag both servers advertise (one per core, at most 4), so
both tools serve the same number of connections. The server's CPU seconds over the timed rounds
are recorded too (`server_cpu_s_median`): on a shared machine they are steadier than wall time.
The last output is checked against the SHA-256 of `qemu-img convert -O raw` of the image.
With `--bench-wait-quiet SECONDS`, each round first waits (up to SECONDS) for idle CPUs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import corpus as corpus_mod
from test_bench_convert import wait_quiet

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("u64k", "zlib64k", "zstd64k", "zlib4k", "zlib2m", "extl2-zlib64k", "overlay")
TOOLS = ("qcowfast", "qemu-nbd")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _server_argv(tool: str, image: Path, sock: Path) -> list[str]:
    if tool == "qcowfast":
        return [sys.executable, "-m", "qcowfast", "serve", "--persistent", "--shared", "8",
                "--socket", str(sock), str(image)]
    return ["qemu-nbd", "-r", "-e", "8", "-t", "-f", "qcow2", "-k", str(sock), str(image)]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@contextlib.contextmanager
def _server(tool: str, image: Path, sock: Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(_server_argv(tool, image, sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tool} did not start serving {image}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def shm_out(bench_out):
    """An output directory on tmpfs when there is room for two images, else bench_out."""
    base = Path("/dev/shm")
    if base.is_dir() and shutil.disk_usage(base).free > 3 * 2**30:
        out = Path(tempfile.mkdtemp(prefix="qcowfast-serve-bench-", dir=base))
        yield out
        shutil.rmtree(out, ignore_errors=True)
    else:
        yield bench_out


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nbdcopy(benchmark, bench_corpus, shm_out, bench_rounds, bench_wait_quiet, variant,
                 tool):
    if shutil.which("nbdcopy") is None or shutil.which("qemu-nbd") is None:
        pytest.fail("nbdcopy (libnbd-bin) and qemu-nbd (qemu-utils) are required")
    image = bench_corpus.path(variant)
    dst = shm_out / f"{variant}.{tool}.raw"
    sock = shm_out / f"{variant}.{tool}.sock"
    rounds, warmup = bench_rounds
    cpu: list[float] = []
    with _server(tool, image, sock) as proc:
        argv = ["nbdcopy", f"nbd+unix:///?socket={sock}", str(dst)]

        def setup():
            dst.unlink(missing_ok=True)
            if bench_wait_quiet:
                wait_quiet(bench_wait_quiet)

        def copy():
            before = _cpu_s(proc.pid)
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
            cpu.append(_cpu_s(proc.pid) - before)

        benchmark.group = f"serve {variant}"
        benchmark.pedantic(copy, setup=setup, rounds=rounds, warmup_rounds=warmup)
    timed = cpu[-rounds:]
    info = benchmark.extra_info
    info.update(variant=variant, tool=tool, command=" ".join(argv),
                virtual_bytes=bench_corpus.size,
                server_cpu_s_median=round(statistics.median(timed), 3))
    if benchmark.stats:
        info["median_s"] = benchmark.stats.stats.median
    ok = corpus_mod.file_digest(dst) == bench_corpus.reference_digest(variant)
    info["digest_ok"] = ok
    dst.unlink(missing_ok=True)
    assert ok, f"nbdcopy from {tool} serving {variant}: output differs from qemu-img's"
