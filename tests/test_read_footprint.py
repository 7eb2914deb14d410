"""What opening an image reads, and what it leaves in the page cache.

The header is read in one page when the header area ends within it, else as the first cluster:
`read_header` must answer exactly as `parse_header` over the whole first cluster (QEMU's rules),
whatever the extension chain and backing name look like. Reads at open stay on the metadata
qemu-img reads, so that ext4's SEEK_DATA/SEEK_HOLE answers over unwritten extents, which the
block status of metadata-preallocated images and raw files reads, stay what qemu-img sees (a
cached page over an unwritten extent is data to ext4).
"""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowfast.errors import QcowError
from qcowfast.header import parse_header, read_header, require_refcount_table
from common import qemu_img, qemu_io, run_cli

K = 1024
EXT = struct.Struct(">II")
# Extension types QEMU knows (backing format, feature table, bitmaps, data file), one it does
# not, and the end marker.
EXT_TYPES = st.sampled_from([0xE2792ACA, 0x6803F857, 0x23852875, 0x44415441, 0x12345678, 0])


def _outcome(fn):
    try:
        return ("ok", fn())
    except QcowError as exc:
        return (type(exc).__name__, str(exc))


@st.composite
def first_clusters(draw):
    """The first bytes of a v2 or v3 image: header fields near QEMU's, an extension chain whose
    lengths and end may run anywhere around the first page, a backing name anywhere."""
    cluster_bits = draw(st.integers(9, 16))
    cluster = 1 << cluster_bits
    version = draw(st.sampled_from([2, 3]))
    header_length = 72 if version == 2 else draw(st.sampled_from([104, 112, 113, 4096, 4104]))
    body = bytearray(cluster)
    chain_at = header_length
    for _ in range(draw(st.integers(0, 6))):
        length = draw(st.one_of(st.integers(0, 64), st.integers(3000, 5000),
                                st.sampled_from([48 * 3, 16, 24, 0xFFFFFFFF])))
        ext_type = draw(EXT_TYPES)
        if chain_at + 8 <= cluster:
            EXT.pack_into(body, chain_at, ext_type, length)
            payload = draw(st.binary(min_size=0, max_size=min(length, 48)))
            body[chain_at + 8:chain_at + 8 + len(payload)] = payload[:max(0, cluster - chain_at - 8)]
        chain_at += 8 + ((length + 7) & ~7)
    backing_offset, backing_size = draw(st.sampled_from([(0, 0), (512, 9), (4090, 9),
                                                         (5000, 7), (chain_at, 4)]))
    if backing_offset and backing_offset + backing_size <= cluster:
        body[backing_offset:backing_offset + backing_size] = b"base.img\0"[:backing_size]
    l1_offset, reftable_offset = 3 * cluster, cluster
    size = min(1 << 20, cluster * (cluster // 8))         # one L1 entry covers it
    struct.pack_into(">4sIQIIQIIQQIIQ", body, 0, b"QFI\xfb", version, backing_offset,
                     backing_size, cluster_bits, size, 0, 1, l1_offset, reftable_offset, 1,
                     0, 0)
    if version == 3:
        struct.pack_into(">QQQII", body, 72, 0, 0, 0, 4, header_length)
    file_size = draw(st.sampled_from([4 * cluster, cluster, 3000, 4096, 5000]))
    return bytes(body), max(file_size, 4 * cluster if draw(st.booleans()) else file_size)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(first_clusters())
def test_small_read_answers_as_the_whole_cluster(tmp_path_factory, case):
    body, file_size = case
    path = tmp_path_factory.mktemp("hdr") / "img"
    path.write_bytes(body[:file_size].ljust(file_size, b"\0"))
    span = min(len(body), file_size)
    whole = path.read_bytes()[:span]

    def reference():
        header = parse_header(whole, file_size)
        require_refcount_table(header)
        return header

    fd = os.open(path, os.O_RDONLY)
    try:
        assert _outcome(lambda: read_header(fd, file_size)) == _outcome(reference)
    finally:
        os.close(fd)


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _header_case(tmp_path):
    """A small file with 128 KiB clusters: the whole first cluster covers a partly written one."""
    base, img = tmp_path / "b.qcow2", tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 1 0 1M")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=128k", base, img)
    qemu_io(img, "write -P 9 3858944 512")
    return img


def _snapshot_case(tmp_path):
    """16 KiB clusters, a snapshot table, then clusters written in part right after it."""
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", img, "1M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 9 256k 512", "write -P 7 512k 512")
    return img


@pytest.mark.parametrize("build", [_header_case, _snapshot_case], ids=["header", "snapshots"])
def test_open_leaves_unwritten_extents_uncached(tmp_path, build):
    """A cluster QEMU allocated with 4 KiB written and the rest fallocated (an ext4 unwritten
    extent) maps as qemu-img maps it after qcowfast has opened the image: zero where the file
    has a hole. Reading the whole first cluster, or 64 KiB windows of the snapshot table, made
    the kernel cache those pages (qemu-img reads the header and the entries alone)."""
    img = build(tmp_path)
    _evict(img)
    want = qemu_img("map", "--output=json", img).stdout
    assert '"zero": true, "data": true' in want        # the unwritten extent, seen as a hole
    _evict(img)
    got = run_cli("map", "--output=json", str(img))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(want)
    _evict(img)
    assert qemu_img("map", "--output=json", img).stdout == want   # qcowfast changed nothing


def test_raw_probe_leaves_the_last_page_uncached(tmp_path):
    """The probe reads a raw file's last 512 bytes (a fixed VHD's footer) and drops that page
    again: a preallocated raw image's last 4 KiB stay a hole, as qemu-img, which does not read
    there, reports it."""
    raw = tmp_path / "x.raw"
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=falloc", raw, "1M")
    _evict(raw)
    want = qemu_img("map", "--output=json", raw).stdout
    assert json.loads(want)[-1]["data"] is False                # the unwritten tail, a hole
    _evict(raw)
    got = run_cli("map", "--output=json", str(raw))            # probed: the tail is read
    assert got.returncode == 0, got.stderr
    last = json.loads(got.stdout)[-1]
    # (How much of the start is data depends on read-ahead behind both tools' first read.)
    assert last["data"] is False and last["zero"] is True
    assert last["start"] + last["length"] == 1 << 20
