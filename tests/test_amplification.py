"""Shared host clusters within one L1 view (issue 10 item 11): refused as CorruptImage.

QEMU never points two L2 entries of one L1 table at one data cluster, or at one compressed
stream; a crafted image that does declares far more guest data than its file holds. The images
are made by qemu-img/qemu-io and then have one L2 entry copied over another; ``qemu-img check``
is the oracle that they are corrupt (exit code 2), and that legitimate sharing (snapshots,
packed compressed streams) is not.
"""
from __future__ import annotations

import os
import random
import struct
import subprocess

import pytest

import qcowfast
from qcowfast.errors import CorruptImage
from common import QEMU_IMG, assert_same_bytes, qemu_img, qemu_io, reference_raw

K, M = 1024, 1024 * 1024


def _l2_table(path) -> int:
    with open(path, "rb") as f:
        header = f.read(48)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        return struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00


def _copy_entries(path, src_index, dst_indices) -> None:
    l2 = _l2_table(path)
    with open(path, "r+b") as f:
        f.seek(l2 + 8 * src_index)
        entry = f.read(8)
        for i in dst_indices:
            f.seek(l2 + 8 * i)
            f.write(entry)


def _qemu_check_code(path) -> int:
    return subprocess.run([QEMU_IMG, "check", "-q", str(path)], capture_output=True).returncode


# Every conversion path: the plain and general raw paths, qemu-img's requests (-S 1536 raw,
# -S 64k with 512-byte qcow2 clusters), -S 0, qcow2 output.
PATHS = [dict(), dict(sparse_size=1536), dict(sparse_size=0),
         dict(format="qcow2"), dict(format="qcow2", cluster_size=512, sparse_size=64 * K),
         dict(format="qcow2", sparse_size=0, compression="zlib")]


@pytest.mark.parametrize("kw", PATHS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_shared_data_cluster_refused(tmp_path, kw):
    img = tmp_path / "dup.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(M))
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 128k 64k")
    _copy_entries(img, 0, [5])
    assert _qemu_check_code(img) == 2
    with pytest.raises(CorruptImage, match=r"0x0 and 0x50000.*data cluster"):
        qcowfast.convert(str(img), str(tmp_path / "out.img"), **kw)
    assert sorted(os.listdir(tmp_path)) == ["dup.qcow2"]


def test_amplified_table_refused_early(tmp_path):
    # One written cluster, then a whole L2 table (512 MiB of guest space) pointing at it.
    img = tmp_path / "amp.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(1024 * M))
    qemu_io(img, "write -P 0x33 0 64k")
    _copy_entries(img, 0, range(1, 8192))
    assert img.stat().st_size < M
    assert _qemu_check_code(img) == 2
    with pytest.raises(CorruptImage, match="share the data cluster"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"))


def test_identical_compressed_descriptors_refused(tmp_path):
    raw = tmp_path / "src.raw"
    # Half-random clusters: each compressed stream fills host clusters of its own.
    rng = random.Random(5)
    raw.write_bytes(b"".join(rng.randbytes(40 * K) + bytes(24 * K) for _ in range(4)))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", raw, img)
    _copy_entries(img, 0, [3])
    assert _qemu_check_code(img) == 2
    with pytest.raises(CorruptImage, match=r"0x0 and 0x30000.*compressed"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"))


def test_packed_compressed_streams_and_snapshots_convert(tmp_path):
    # Small compressed streams share host clusters (byte-granular packing), and a snapshot
    # shares every cluster with the active L1 table: both legitimate.
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"".join(bytes([i % 7]) * (4 * K) for i in range(64)))
    img = tmp_path / "packed.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=4096", raw, img)
    qemu_img("snapshot", "-c", "snap", img)
    qemu_io(img, "write -P 0x44 8k 4k")
    assert _qemu_check_code(img) == 0
    out = tmp_path / "out.raw"
    qcowfast.convert(str(img), str(out))
    assert_same_bytes(out.read_bytes(), reference_raw(img), "convert")
    qcowfast.convert(str(img), str(out), snapshot="snap", overwrite=True)
    assert out.read_bytes() == raw.read_bytes()
