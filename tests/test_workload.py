"""The cost a batch orders its jobs by (workload.size_and_cost): what converting an image
takes, from its header and a sample of its L2 entries, never from its virtual size alone."""
from __future__ import annotations

import os
import random
import struct

import pytest

from common import qemu_img, qemu_io
from qcowfast.workload import size_and_cost

MiB = 1024 * 1024


def _half_random(path, size: int):
    """A raw file whose 4 KiB blocks are half random, half zeros: it compresses about 2:1."""
    rnd = random.Random(7)
    with open(path, "wb") as f:
        for _ in range(size // 4096):
            f.write(rnd.randbytes(2048) + bytes(2048))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return _half_random(tmp_path_factory.mktemp("workload") / "data.raw", 8 * MiB)


def _qcow2(raw, path, *options):
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, raw, path)
    return path


def test_compressed_clusters_cost_more_than_plain_ones(raw, tmp_path):
    plain = size_and_cost(_qcow2(raw, tmp_path / "p.qcow2"), None)
    zlib = size_and_cost(_qcow2(raw, tmp_path / "z.qcow2", "-c"), None)
    zstd = size_and_cost(_qcow2(raw, tmp_path / "s.qcow2", "-c", "-o",
                                "compression_type=zstd"), None)
    assert plain[0] == zlib[0] == zstd[0] == 8 * MiB
    # The same 8 MiB of data: plain costs its size; the compressed files are about half as
    # large, but inflating costs more than copying.
    assert 8 * MiB <= plain[1] < 9 * MiB, plain
    assert zlib[1] > 3 * plain[1] and zstd[1] > 2 * plain[1], (plain, zlib, zstd)
    assert os.path.getsize(tmp_path / "z.qcow2") < 0.6 * os.path.getsize(tmp_path / "p.qcow2")


def test_small_clusters_cost_more_per_byte(raw, tmp_path):
    c64k = size_and_cost(_qcow2(raw, tmp_path / "a.qcow2"), None)[1]
    c512 = size_and_cost(_qcow2(raw, tmp_path / "b.qcow2", "-o", "cluster_size=512"), None)[1]
    assert c512 > 1.2 * c64k, (c512, c64k)


def test_sparse_image_costs_its_data_not_its_virtual_size(tmp_path):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, "1T")
    qemu_io(big, "write -P 0x11 0 1M")
    full = tmp_path / "full.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", full, "64M")
    qemu_io(full, "write -P 0x22 0 64M")
    big_size, big_cost = size_and_cost(big, None)
    full_size, full_cost = size_and_cost(full, None)
    assert (big_size, full_size) == (1 << 40, 64 * MiB)
    assert big_cost < 3 * MiB and 64 * MiB <= full_cost < 70 * MiB, (big_cost, full_cost)


def test_highly_compressible_image_is_bounded_by_its_guest_space(tmp_path):
    """Clusters that compress to almost nothing: the file is mostly metadata, which must not
    be counted as thousands of compressed clusters."""
    src = tmp_path / "ones.raw"
    src.write_bytes(b"\x01" * (2 * MiB))
    img = _qcow2(src, tmp_path / "ones.qcow2", "-c")
    size, cost = size_and_cost(img, None)
    assert size == 2 * MiB and 0 < cost <= 2 * MiB * 4, cost


def test_other_files_of_the_chain_add_their_data(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "32M")
    qemu_io(base, "write -P 0x33 0 16M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    alone = size_and_cost(top, None)[1]
    chained = size_and_cost(top, None, [str(base)])[1]
    assert chained - alone >= 16 * MiB, (alone, chained)
    ext = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/ext.data", ext, "8M")
    qemu_io(ext, "write -P 0x44 0 4M")
    assert size_and_cost(ext, None) == (8 * MiB, 0.0)      # its data lives elsewhere
    assert size_and_cost(ext, None, [str(tmp_path / "ext.data")])[1] >= 4 * MiB


def test_raw_source_costs_its_allocated_bytes(tmp_path):
    src = tmp_path / "s.raw"
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        f.write(b"x" * MiB)
    size, cost = size_and_cost(src, "raw")
    assert size == 256 * MiB and MiB <= cost <= 2 * MiB, cost


def test_unreadable_sources(tmp_path):
    assert size_and_cost(tmp_path / "missing.qcow2", None) == (-1, 0.0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert size_and_cost(fifo, None) == (-1, 0.0)          # (never opened: it would block)


def test_unreadable_l2_sample_falls_back_to_the_file_size(tmp_path):
    """An L1 entry naming an L2 table past the end of the file (met by the conversion, which
    will say why): the estimate takes the file as plain data and raises nothing."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x55 0 4M")
    with open(img, "r+b") as f:
        f.seek(40)
        l1_offset, = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    size, cost = size_and_cost(img, None)
    assert size == 16 * MiB and 4 * MiB <= cost <= os.path.getsize(img), cost
