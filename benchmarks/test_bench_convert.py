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
from pathlib import Path

import pytest

import corpus as corpus_mod

REPO = Path(__file__).resolve().parent.parent


def _qcowfast(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "qcowfast", "convert", str(src), str(dst), "--overwrite"]


def _qemu_img(src: Path, dst: Path) -> list[str]:
    return ["qemu-img", "convert", "-O", "raw", str(src), str(dst)]


def _qemu_img_m16w(src: Path, dst: Path) -> list[str]:
    return ["qemu-img", "convert", "-m", "16", "-W", "-O", "raw", str(src), str(dst)]


TOOLS = {"qcowfast": _qcowfast, "qemu-img": _qemu_img, "qemu-img-m16W": _qemu_img_m16w}


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """What ``os.wait4`` says about one finished child."""

    maxrss_kib: int
    cpu_s: float


def run_child(argv: list[str], stderr) -> ChildRun:
    """Run ``argv`` to completion; return its own rusage; raise if it fails."""
    stderr.seek(0)
    stderr.truncate()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, cwd=REPO, env=env)
    # wait4 rather than proc.wait(): it returns the rusage of this child alone.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        stderr.seek(0)
        message = stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {message}")
    return ChildRun(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


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


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("variant", corpus_mod.BENCH_VARIANTS)
def test_convert(benchmark, bench_corpus, bench_out, bench_rounds, variant, tool):
    src = bench_corpus.path(variant)
    dst = bench_out / f"{variant}.{tool}.raw"
    argv = TOOLS[tool](src, dst)
    rounds, warmup = bench_rounds
    runs: list[ChildRun] = []

    def setup():
        dst.unlink(missing_ok=True)
        os.sync()  # no write-back of earlier output during the timed round

    benchmark.group = variant
    with tempfile.TemporaryFile() as stderr:
        benchmark.pedantic(lambda: runs.append(run_child(argv, stderr)), setup=setup,
                           rounds=rounds, warmup_rounds=warmup)

    timed = runs[-rounds:] if len(runs) > rounds else runs
    virtual = bench_corpus.size
    info = benchmark.extra_info
    info.update(variant=variant, tool=tool, command=" ".join(argv), virtual_bytes=virtual,
                image_bytes=bench_corpus.file_bytes(variant),
                peak_rss_mib=round(max(r.maxrss_kib for r in timed) / 1024, 1),
                cpu_s_median=round(statistics.median(r.cpu_s for r in timed), 3))
    if benchmark.stats:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info.update(median_s=median, throughput_mib_s=round(virtual / median / 2**20, 1))

    digest = corpus_mod.file_digest(dst)
    info["digest_ok"] = ok = digest == bench_corpus.reference_digest(variant)
    if not ok:
        kept_dir = bench_corpus.directory.parent / "mismatch"
        kept_dir.mkdir(exist_ok=True)
        kept = kept_dir / dst.name
        os.replace(dst, kept)
        pytest.fail(_explain_mismatch(bench_corpus, variant, kept, bench_out / "reference.raw"))
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
