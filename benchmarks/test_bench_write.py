"""Whole-process raw -> qcow2 benchmarks: qcowfast's writer against qemu-img, compressed with
zlib and zstd and uncompressed.

The source is the corpus's raw disk; outputs go to /dev/shm (the disk under test is the CPU, not
the file system). Every output is checked with ``qemu-img compare`` against the source, and its
size divided by qemu-img's output size for the same compression is in ``extra_info``
(``size_ratio``). ``qcowfast-fast`` is a faster level (zlib 2, zstd 1) that trades size for
speed::

    python -m pytest benchmarks/test_bench_write.py -q --benchmark-only --bench-size 1G
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import corpus as corpus_mod
from test_bench_convert import run_child, wait_quiet

SHM = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
FAST_LEVEL = {"zlib": 2, "zstd": 1}
_API = ("import sys, qcowfast; qcowfast.convert(sys.argv[1], sys.argv[2], format='qcow2', "
        "src_format='raw', compression={c!r}, level={lvl!r}, overwrite=True)")


def _argv(tool: str, compression: str | None, src: Path, dst: Path) -> list[str]:
    comp = ["-c", "-o", f"compression_type={compression}"] if compression else []
    if tool == "qcowfast":
        return [sys.executable, "-m", "qcowfast", "convert", "-f", "raw", "-O", "qcow2", *comp,
                str(src), str(dst)]
    if tool == "qcowfast-fast":
        return [sys.executable, "-c", _API.format(c=compression, lvl=FAST_LEVEL[compression]),
                str(src), str(dst)]
    parallel = ["-m", "2", "-W"] if tool == "qemu-img-m2W" else []
    return ["qemu-img", "convert", *parallel, "-f", "raw", "-O", "qcow2", *comp, str(src),
            str(dst)]


CASES = [(c, t) for c in ("zlib", "zstd", None)
         for t in ("qcowfast", "qcowfast-fast", "qemu-img", "qemu-img-m2W")
         if not (c is None and t == "qcowfast-fast")]
_QEMU_SIZES: dict = {}


def _qemu_size(src: Path, compression: str | None) -> int:
    """Size of qemu-img convert's output for this compression (made once, untimed)."""
    if compression not in _QEMU_SIZES:
        ref = SHM / f"qcowfast-bench-ref-{os.getpid()}.qcow2"
        try:
            subprocess.run(_argv("qemu-img", compression, src, ref), check=True)
            _QEMU_SIZES[compression] = ref.stat().st_size
        finally:
            ref.unlink(missing_ok=True)
    return _QEMU_SIZES[compression]


@pytest.mark.parametrize("compression,tool", CASES,
                         ids=[f"{c or 'none'}-{t}" for c, t in CASES])
def test_write_qcow2(benchmark, bench_corpus, bench_rounds, bench_wait_quiet, compression,
                     tool):
    src = bench_corpus.path(corpus_mod.RAW_NAME)
    dst = SHM / f"qcowfast-bench-{os.getpid()}-{compression}-{tool}.qcow2"
    argv = _argv(tool, compression, src, dst)
    rounds, warmup = bench_rounds
    runs = []

    def setup():
        dst.unlink(missing_ok=True)
        if bench_wait_quiet:
            wait_quiet(bench_wait_quiet)

    benchmark.group = f"raw->qcow2 {compression or 'uncompressed'}"
    try:
        with tempfile.TemporaryFile() as stderr:
            rss = SHM / f"qcowfast-bench-{os.getpid()}.rss"
            benchmark.pedantic(lambda: runs.append(run_child(argv, stderr, rss)), setup=setup,
                               rounds=rounds, warmup_rounds=warmup)
            rss.unlink(missing_ok=True)
        timed = runs[-rounds:]
        size = dst.stat().st_size
        info = benchmark.extra_info
        info.update(variant=f"raw->qcow2-{compression or 'none'}", tool=tool,
                    command=" ".join(argv), virtual_bytes=bench_corpus.size, output_bytes=size,
                    size_ratio=round(size / _qemu_size(src, compression), 4),
                    peak_rss_mib=round(max(r.maxrss_kib for r in timed) / 1024, 1),
                    cpu_s_median=round(statistics.median(r.cpu_s for r in timed), 3),
                    other_load_cores=round(statistics.median(r.other_cpu_s / r.wall_s
                                                             for r in timed), 2))
        if benchmark.stats:
            info["median_s"] = benchmark.stats.stats.median
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                               str(dst)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()


PAIRED_TOOLS = ("qcowfast", "qemu-img", "qemu-img-m2W")


def test_write_paired(benchmark, bench_corpus, bench_rounds, bench_wait_quiet):
    """Uncompressed raw -> qcow2 by the three tools in turn, round after round: paired ratios.

    The tools are within a few percent of each other while this machine's speed drifts by more
    between one test and the next, so a ratio of medians taken minutes apart can land on either
    side of 1. Each round runs every tool once (the order rotates, so none is always first
    after the previous output was removed); the ratios are taken within each round.
    """
    src = bench_corpus.path(corpus_mod.RAW_NAME)
    dst = {t: SHM / f"qcowfast-bench-{os.getpid()}-paired-{t}.qcow2" for t in PAIRED_TOOLS}
    times: dict[str, list[float]] = {t: [] for t in PAIRED_TOOLS}
    rss = SHM / f"qcowfast-bench-{os.getpid()}.rss"
    turn = [0]

    def one_round(stderr):
        k = turn[0] % len(PAIRED_TOOLS)
        turn[0] += 1
        for tool in PAIRED_TOOLS[k:] + PAIRED_TOOLS[:k]:
            dst[tool].unlink(missing_ok=True)
            if bench_wait_quiet:
                wait_quiet(bench_wait_quiet)
            times[tool].append(run_child(_argv(tool, None, src, dst[tool]), stderr, rss).wall_s)

    rounds, _ = bench_rounds
    benchmark.group = "raw->qcow2 uncompressed, paired rounds"
    try:
        with tempfile.TemporaryFile() as stderr:
            benchmark.pedantic(one_round, args=(stderr,), rounds=2 * rounds, warmup_rounds=1)
        for tool in PAIRED_TOOLS:
            del times[tool][0]                   # the warm-up round
        per_round = {ref: [r / f for r, f in zip(times[ref], times["qcowfast"])]
                     for ref in ("qemu-img", "qemu-img-m2W")}
        benchmark.extra_info.update(
            kind="write-paired", rounds=len(times["qcowfast"]),
            medians={t: round(statistics.median(ts), 4) for t, ts in times.items()},
            qemu_img_over_qcowfast=round(statistics.median(per_round["qemu-img"]), 4),
            m2w_over_qcowfast=round(statistics.median(per_round["qemu-img-m2W"]), 4),
            rounds_qcowfast_ahead=sum(r > 1 for r in per_round["qemu-img"]))
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                               str(dst["qcowfast"])], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        rss.unlink(missing_ok=True)
        for path in dst.values():
            path.unlink(missing_ok=True)
