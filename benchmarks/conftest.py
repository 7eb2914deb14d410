"""Fixtures for the conversion benchmarks: the cached corpus, an output directory, round counts.

Run from the repository root::

    python -m pytest benchmarks -q --benchmark-only --benchmark-json=out.json
    QCOWFAST_BENCH_SIZE=64M python -m pytest benchmarks -q --benchmark-only
    python benchmarks/report.py out.json

``pytest tests/`` never collects this directory (``testpaths = ["tests"]``).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("qcowfast benchmarks")
    group.addoption("--bench-size", default=None,
                    help=f"corpus virtual size, e.g. 64M or 1G (default ${corpus_mod.ENV_SIZE} "
                         f"or {corpus_mod.DEFAULT_SIZE})")
    group.addoption("--bench-dir", default=None,
                    help=f"corpus cache root (default ${corpus_mod.ENV_ROOT} or "
                         f"{corpus_mod.DEFAULT_ROOT})")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 5 up to 256 MiB, else 3)")
    group.addoption("--bench-warmup", type=int, default=1,
                    help="untimed rounds before the timed ones (default 1)")
    group.addoption("--bench-wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each round, wait up to SECONDS for other processes to leave "
                         "the CPUs idle (default 0: do not wait)")


def _log(line: str) -> None:
    # Corpus building takes minutes at 1 GiB: show progress past pytest's capture.
    print(line, file=sys.__stderr__, flush=True)


@pytest.fixture(scope="session", autouse=True)
def bench_bytecode() -> None:
    """Compile qcowfast's modules to bytecode first, as installing a wheel does.

    An editable install run under PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
    module from source in every timed child process.
    """
    import compileall
    compileall.compile_dir(str(HERE.parent / "src" / "qcowfast"), quiet=1)


@pytest.fixture(scope="session")
def bench_corpus(pytestconfig) -> corpus_mod.Corpus:
    """The corpus of images, built on first use and cached across runs."""
    size = pytestconfig.getoption("--bench-size")
    root = pytestconfig.getoption("--bench-dir")
    return corpus_mod.ensure_corpus(size, root, log=_log)


@pytest.fixture(scope="session")
def bench_out(bench_corpus) -> Path:
    """A scratch directory for converted files, next to the corpus (same file system)."""
    out = bench_corpus.directory.parent / f"out-{os.getpid()}"
    out.mkdir(exist_ok=True)
    yield out
    shutil.rmtree(out, ignore_errors=True)


#: Room a tmpfs output directory must have (the largest output, with some headroom).
TMPFS_MIN_FREE = 6 * corpus_mod.GiB


@pytest.fixture(scope="session")
def bench_tmpfs(bench_out) -> Path:
    """A scratch directory on tmpfs (/dev/shm) when it has room, else ``bench_out``.

    Outputs written to tmpfs measure the converters, not the disk's write-back; the
    directory's file system is recorded by the benchmarks that use it (``output_fs``).
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > TMPFS_MIN_FREE:
        out = shm / f"qcowfast-bench-{os.getpid()}"
        out.mkdir(exist_ok=True)
        yield out
        shutil.rmtree(out, ignore_errors=True)
    else:
        yield bench_out


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_corpus) -> tuple[int, int]:
    """``(rounds, warmup_rounds)`` for ``benchmark.pedantic``."""
    rounds = pytestconfig.getoption("--bench-rounds")
    if rounds is None:
        rounds = 5 if bench_corpus.size <= 256 * corpus_mod.MiB else 3
    return rounds, pytestconfig.getoption("--bench-warmup")


@pytest.fixture(scope="session")
def bench_wait_quiet(pytestconfig) -> float:
    """Longest wait for a quiet machine before each round, in seconds (0: no wait)."""
    return pytestconfig.getoption("--bench-wait-quiet")
