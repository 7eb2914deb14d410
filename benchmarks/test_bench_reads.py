"""Random small reads and sequential reads, in process: qcowfast beside dissect.hypervisor.

``test_random_reads``: 5000 random 4 KiB reads (seeded, the same offsets for both tools), warm
page cache, through ``Image.read`` and through dissect.hypervisor's ``QCow2`` stream (a pure-
Python reader, as filesystem readers such as dissect use). Targets (issue 15): uncompressed and
overlay >= 20x dissect, compressed >= 2x. The timed rounds only read, dropping each result as a
parser would (hashing 4 KiB costs about as much as a read; keeping 5000 results would add a page
fault per read); one untimed pass then hashes the same reads, checked against the raw source
(qemu-img's output of every non-overlay variant equals it) or, for the overlay, between tools.

``test_sequential_reads``: the whole image through ``as_file()`` in 1 MiB reads, beside an
in-process ``qcowfast.convert`` to tmpfs (target: reads at >= 80 % of convert's rate).
"""
from __future__ import annotations

import hashlib
import os
import random

import pytest

import corpus as corpus_mod

READ_VARIANTS = ("u64k", "overlay", "zlib64k", "zstd64k")
COUNT = 5000
SIZE = 4096


def _offsets(virtual: int) -> list[int]:
    rng = random.Random(0x5EED)
    return [rng.randrange(0, virtual - SIZE) for _ in range(COUNT)]


def _digest(pieces) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def _dissect_reader(bench_corpus, variant):
    try:
        from dissect.hypervisor.disk.qcow2 import QCow2
    except ImportError:
        pytest.fail("dissect.hypervisor is required: pip install -e '.[bench]'")
    files = [open(bench_corpus.path(variant), "rb")]
    backing = None
    if corpus_mod.VARIANTS[variant].backing:
        files.append(open(bench_corpus.path(corpus_mod.VARIANTS[variant].backing), "rb"))
        backing = files[-1]
    stream = QCow2(files[0], backing_file=backing).open()

    def read(offset):
        stream.seek(offset)
        return stream.read(SIZE)
    return read, files


@pytest.mark.parametrize("tool", ["qcowfast", "dissect"])
@pytest.mark.parametrize("variant", READ_VARIANTS)
def test_random_reads(benchmark, bench_corpus, bench_rounds, variant, tool):
    import qcowfast
    offsets = _offsets(bench_corpus.size)
    files = []
    if tool == "qcowfast":
        img = qcowfast.open(str(bench_corpus.path(variant)))
        read = lambda offset: img.read(offset, SIZE)  # noqa: E731
    else:
        img = None
        read, files = _dissect_reader(bench_corpus, variant)

    def run():
        for offset in offsets:
            read(offset)

    rounds, warmup = bench_rounds
    benchmark.group = f"reads {variant}"
    try:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
        digest = _digest(read(offset) for offset in offsets)      # untimed: the same reads
    finally:
        if img is not None:
            img.close()
        for f in files:
            f.close()
    if variant != "overlay":
        with open(bench_corpus.path(corpus_mod.RAW_NAME), "rb") as f:
            assert digest == _digest(os.pread(f.fileno(), SIZE, o) for o in offsets)
    test_random_reads.digests.setdefault(variant, set()).add(digest)
    assert len(test_random_reads.digests[variant]) == 1, "the tools read different bytes"
    info = benchmark.extra_info
    info.update(variant=variant, tool=tool, reads=COUNT, read_size=SIZE, kind="random-reads")
    if benchmark.stats:
        info["reads_per_s"] = round(COUNT / benchmark.stats.stats.median)


test_random_reads.digests = {}


@pytest.mark.parametrize("how", ["as_file", "convert"])
@pytest.mark.parametrize("variant", READ_VARIANTS)
def test_sequential_reads(benchmark, bench_corpus, bench_tmpfs, bench_rounds, variant, how):
    import qcowfast
    src = str(bench_corpus.path(variant))
    dst = bench_tmpfs / f"{variant}.seq.raw"
    digests = []

    def as_file(check: bool = False):
        # Timed rounds only read (hashing 1 GiB on one core would cost more than reading
        # it); one untimed pass afterwards hashes what the same loop reads.
        h = hashlib.sha256() if check else None
        with qcowfast.open(src) as img:
            f = img.as_file()
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                if h is not None:
                    h.update(view[:n])
        if h is not None:
            digests.append(h.hexdigest())

    def convert():
        qcowfast.convert(src, str(dst), overwrite=True)

    rounds, warmup = bench_rounds
    benchmark.group = f"sequential {variant}"
    benchmark.pedantic(as_file if how == "as_file" else convert, rounds=rounds,
                       warmup_rounds=warmup, setup=lambda: dst.unlink(missing_ok=True))
    if how == "as_file":
        as_file(check=True)
        assert digests[-1] == bench_corpus.reference_digest(variant)
    else:
        assert corpus_mod.file_digest(dst) == bench_corpus.reference_digest(variant)
        dst.unlink()
    info = benchmark.extra_info
    info.update(variant=variant, tool=how, kind="sequential-reads",
                read_size=1 << 20, bytes=bench_corpus.size)
    if benchmark.stats:
        info["mib_s"] = round(bench_corpus.size / benchmark.stats.stats.median / 2**20, 1)
