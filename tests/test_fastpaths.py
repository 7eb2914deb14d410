"""The fast paths: lean small reads, and conversion straight from mapped page cache.

Small reads (up to image.SMALL_READ) resolve their clusters with tuples instead of arrays;
long data runs of a conversion are scanned and written from a mapping of the source. Both
must give exactly the bytes of ``qemu-img convert -O raw``, wherever a request starts and ends:
inside clusters, on cluster, L2-slice, L2-table and backing-file edges.
"""
from __future__ import annotations

import os
import random
import threading
import zlib

import pytest

import qcowfast
from qcowfast import image as image_module
from common import (assert_same_bytes, data_blocks, qemu_img, qemu_io, read_one_way,
                    reference_raw)

K, M = 1024, 1024 * 1024


def _edges(img) -> list[int]:
    """Guest offsets where the lean path changes L2 slice, L2 table, layer or cluster."""
    vs = img.virtual_size
    points = {0, vs}
    for layer in img.chain:
        points.add(min(layer.virtual_size, vs))
        cs = getattr(layer, "cluster_size", None)
        if cs is None:
            continue
        entry = 16 if layer.header.extended_l2 else 8
        slice_span = cs * max(1, min(cs // entry, image_module.L2_SLICE_BYTES // entry))
        for step in (slice_span, cs * (cs // entry)):
            points.update(range(0, vs, step))
        points.update(range(0, min(vs, 8 * cs), cs))
        points.update(range(cs * (vs // cs - 4), vs, cs))
    return sorted(p for p in points if 0 <= p <= vs)


def test_small_reads_match_qemu(image):
    want = reference_raw(image.path)
    rng = random.Random(zlib.crc32(f"fastpaths/{image.id}".encode()))
    with qcowfast.open(str(image.path)) as img:
        edges = _edges(img)
        f = img.as_file()
        buf = bytearray(256 * K)
        for i in range(150):
            if i % 3:
                offset = max(0, rng.choice(edges) + rng.randint(-3000, 3000))
            else:
                offset = rng.randrange(img.virtual_size + 1)
            size = rng.choice((1, 511, 4096, rng.randint(1, 70 * K), rng.randint(1, 256 * K)))
            expect = want[offset:offset + size]
            got = read_one_way(i % 3, img, f, buf, offset, size)
            assert_same_bytes(got, expect, f"read({offset:#x}, {size})", base=offset)


@pytest.mark.images(ids=["c64k-v3", "c64k-chain2-zlib-base", "c64k-extl2-zlib-backing"])
def test_repeated_small_reads_stay_right(image):
    # The same clusters again and again (cached L2 slices and inflated clusters), from two
    # threads at once.
    want = reference_raw(image.path)
    errors = []
    with qcowfast.open(str(image.path), cache_size=1) as img:
        def reader(seed):
            rng = random.Random(seed)
            for _ in range(300):
                offset = rng.randrange(0, min(img.virtual_size, 1 * M))
                if img.read(offset, 4096) != want[offset:offset + 4096]:
                    errors.append(offset)
        threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory):
    """Long data runs with unaligned edges (2 KiB subclusters) over a compressed base."""
    d = tmp_path_factory.mktemp("long-runs")
    rng = random.Random(7)
    base_raw = d / "base.raw"
    base_raw.write_bytes(rng.randbytes(3 * M) + bytes(2 * M) + rng.randbytes(3 * M))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", base_raw, d / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
             "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", str(9 * M + 4096), cwd=d)
    qemu_io(d / "top.qcow2",
            f"write -P 0x5a {2 * K} {M + 6 * K}",           # starts and ends mid-cluster
            f"write -P 0x00 {3 * M - 2 * K} {300 * K}",       # long run of written zeros
            f"write -P 0x17 {4 * M + 4 * K} {2 * M + 62 * K}",
            f"write -z {5 * M} {128 * K}",
            f"write -P 0x42 {9 * M - 10 * K} {14 * K}")       # up to the (odd) end
    return d / "top.qcow2"


@pytest.mark.parametrize("sparse_size", [512, 4096, 64 * K, M])
@pytest.mark.parametrize("unit_size", [M, 8 * M])
def test_convert_long_runs(long_runs, tmp_path, sparse_size, unit_size):
    want = reference_raw(long_runs)
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(long_runs), str(out), sparse_size=sparse_size,
                              unit_size=unit_size, threads=2)
    got = out.read_bytes()
    assert_same_bytes(got, want, f"convert -S {sparse_size}")
    if sparse_size > 4096:
        # qemu-img's requests decide (sparse.py): the same file blocks as qemu-img's output.
        ref = tmp_path / "qemu.raw"
        qemu_img("convert", "-O", "raw", "-S", sparse_size, long_runs, ref)
        assert data_blocks(out) == data_blocks(ref)
        return
    # Exactly the blocks holding a non-zero byte were written.
    blocks = sum(1 for a in range(0, len(want), sparse_size)
                 if want[a:a + sparse_size].strip(b"\0"))
    last = len(want) % sparse_size
    expect = blocks * sparse_size - (sparse_size - last
                                     if last and want[-last:].strip(b"\0") else 0)
    assert result.bytes_written == expect
    assert os.stat(out).st_blocks * 512 <= -(-expect // 4096) * 4096 + 64 * K
