"""Many small holes over a backing file (issue 10 item 4): resolved in batches, same bytes.

The top image has 512-byte clusters, every other one allocated, over a backing file, so each
L2 slice holds thousands of holes that read through to the backing layer. ``qemu-img convert
-B`` builds it (clusters equal to the backing file's are left unallocated); ``qemu-img convert
-O raw`` and ``qemu-img map`` are the oracles.
"""
from __future__ import annotations

import random

import pytest

import qcowfast
from qcowfast import ExtentKind
from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw

K, M = 1024, 1024 * 1024


def _alternating(tmp_path, size, base_opts, top_cluster=512, period=2):
    """A qcow2 base (options base_opts) and a top whose clusters alternate: 1 of `period`
    allocated (rewritten), the others unallocated over the base."""
    rng = random.Random(size ^ period)
    base_data = bytearray(rng.randbytes(size))
    base_data[size // 3:size // 3 + 64 * K] = bytes(64 * K)          # zeros in the base too
    (tmp_path / "base.raw").write_bytes(base_data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *base_opts, tmp_path / "base.raw",
             tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={top_cluster}", "-b", "base.qcow2",
             "-F", "qcow2", "top.qcow2", str(size), cwd=tmp_path)
    top_data = bytearray(base_data)
    commands = []
    for off in range(0, size, top_cluster * period):
        pattern = (off // top_cluster) % 251 + 1
        commands.append(f"write -P {pattern} {off} {top_cluster}")
        top_data[off:off + top_cluster] = bytes([pattern]) * top_cluster
    qemu_io(tmp_path / "top.qcow2", *commands)
    return tmp_path / "top.qcow2", bytes(top_data)


@pytest.mark.parametrize("base_opts", [(), ("-c", "-o", "cluster_size=4096")],
                         ids=["base-c64k", "base-c4k-zlib"])
def test_alternating_holes_convert(tmp_path, base_opts):
    top, _ = _alternating(tmp_path, 512 * K, base_opts)
    entries = qemu_map(top)
    # The image really is a comb of holes over the backing file.
    assert sum(1 for e in entries if e["depth"] == 1) >= 200
    want = reference_raw(top)
    out = tmp_path / "out.raw"
    qcowfast.convert(str(top), str(out), threads=2)
    assert_same_bytes(out.read_bytes(), want, "convert")
    with qcowfast.open(str(top)) as img:
        assert_same_bytes(img.read(0, img.virtual_size), want, "read")


def test_alternating_holes_extents_match_qemu_map(tmp_path):
    top, _ = _alternating(tmp_path, 384 * K, (), period=3)
    entries = qemu_map(top)
    with qcowfast.open(str(top)) as img:
        extents = list(img.extents())
    # Same coverage and depth per byte as qemu-img map (data/zero agreement per range).
    def per_depth(items):
        out = []
        for start, length, depth, data in items:
            if out and out[-1][2] == depth and out[-1][3] == data and \
                    out[-1][0] + out[-1][1] == start:
                out[-1][1] += length
            else:
                out.append([start, length, depth, data])
        return out
    ours = per_depth([(e.guest_offset, e.length, e.depth,
                       e.kind in (ExtentKind.DATA, ExtentKind.COMPRESSED)) for e in extents])
    theirs = per_depth([(e["start"], e["length"], e["depth"], e["data"]) for e in entries])
    assert ours == theirs


def test_holes_past_a_short_backing_file(tmp_path):
    # The base is shorter than the top: holes past its end read as zeros.
    top, _ = _alternating(tmp_path, 256 * K, ())
    qemu_img("resize", "-f", "qcow2", top, str(M))
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    want = reference_raw(top)
    out = tmp_path / "out.raw"
    qcowfast.convert(str(top), str(out))
    assert_same_bytes(out.read_bytes(), want, "convert")
