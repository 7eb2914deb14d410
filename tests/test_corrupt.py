"""The corruption matrix: hostile or damaged images fail with one specific QcowError.

Each case copies a small image that qemu-img built at test time, damages it with a mutator and
expects one exception class (exactly, not a subclass or parent) whose message names the field or
offset at fault; a conversion that fails leaves no output file and no temporary file behind.
The mutators locate what they damage with the small layout reader below, transcribed from
docs/interop/qcow2.txt independently of qcowfast's own parser.

Also here: the command line turns these errors into one line and exit code 1, and the fuzzer's
crashers stay fixed (regression cases at the end).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

try:
    from compression import zstd            # Python 3.14+
except ImportError:
    from backports import zstd

import qcowfast
from qcowfast import (
    BackingChainError, CorruptImage, DecompressionError, EncryptedImage, FormatError,
    MissingBackingFile,
    TruncatedImage, UnsafePathError, UnsupportedFeature,
)

from common import QEMU_IMG, assert_same_bytes, qemu_img, qemu_io, reference_raw, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
from harness import exercise  # noqa: E402  (fuzz/harness.py: what a user does with an image)

K = 1024
M = 1024 * K
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

# Header fields (qcow2.txt "Header"): byte offset and struct format.
FIELDS = {
    "magic": (0, ">4s"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
EXT_FEATURE_TABLE = 0x6803F857
EXT_BACKING_FORMAT = 0xE2792ACA


# --------------------------------------------------------------------------------------------
# A test-side view of an image file: header fields, extensions, L1 and L2 entries.


class Qcow:
    """Read and patch one qcow2 file in place (no caching: every call reads the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # raw bytes
    def data(self) -> bytes:
        return self.path.read_bytes()

    def size(self) -> int:
        return self.path.stat().st_size

    def put(self, offset: int, raw: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(raw)

    def get(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def truncate(self, size: int) -> None:
        os.truncate(self.path, size)

    # header
    def __getitem__(self, name: str) -> int:
        off, fmt = FIELDS[name]
        return struct.unpack(fmt, self.get(off, struct.calcsize(fmt)))[0]

    def __setitem__(self, name: str, value) -> None:
        off, fmt = FIELDS[name]
        self.put(off, struct.pack(fmt, value))

    @property
    def cluster_size(self) -> int:
        return 1 << self["cluster_bits"]

    def extensions(self) -> list[tuple[int, int, int]]:
        """(type, offset of its 8-byte header, length) of each header extension."""
        data = self.get(0, self.cluster_size)
        off = self["header_length"] if self["version"] >= 3 else 72
        out = []
        while off + 8 <= len(data):
            ext_type, length = struct.unpack_from(">II", data, off)
            if ext_type == 0:
                break
            out.append((ext_type, off, length))
            off += 8 + (length + 7) // 8 * 8
        return out

    def extension(self, ext_type: int) -> tuple[int, int]:
        """(offset of the 8-byte header, length) of extension `ext_type`."""
        for t, off, length in self.extensions():
            if t == ext_type:
                return off, length
        raise AssertionError(f"{self.path}: no extension {ext_type:#x}")

    def set_backing_name(self, name: str | bytes) -> None:
        """Store `name` as the backing file name (where qemu put the current one)."""
        raw = name.encode() if isinstance(name, str) else name
        off = self["backing_file_offset"]
        assert off, "image has no backing file name to replace"
        self.put(off, raw)
        self["backing_file_size"] = len(raw)

    # tables
    @property
    def entry_width(self) -> int:
        return 16 if self["incompatible_features"] & 16 else 8

    def l1_pos(self, index: int) -> int:
        return self["l1_table_offset"] + 8 * index

    def l1(self, index: int) -> int:
        return struct.unpack(">Q", self.get(self.l1_pos(index), 8))[0]

    def set_l1(self, index: int, value: int) -> None:
        self.put(self.l1_pos(index), struct.pack(">Q", value))

    def l2_pos(self, guest: int) -> int:
        """File offset of the L2 entry serving guest offset `guest` (its L2 table must exist)."""
        cs = self.cluster_size
        per_l2 = cs // self.entry_width
        l2 = self.l1(guest // (cs * per_l2)) & OFFSET_MASK
        assert l2, f"no L2 table for guest offset {guest:#x}"
        return l2 + (guest // cs % per_l2) * self.entry_width

    def l2(self, guest: int) -> int:
        return struct.unpack(">Q", self.get(self.l2_pos(guest), 8))[0]

    def set_l2(self, guest: int, value: int) -> None:
        self.put(self.l2_pos(guest), struct.pack(">Q", value))

    def put_stream(self, guest: int, stream: bytes) -> None:
        """Replace the compressed stream of the compressed cluster at `guest` by `stream`."""
        offset, _ = self.compressed(guest)
        bits = self["cluster_bits"]
        shift = 62 - (bits - 8)
        sectors = -(-((offset & 511) + len(stream)) // 512)
        self.put(offset, stream)
        self.set_l2(guest, COMPRESSED | (sectors - 1) << shift | offset)

    def compressed(self, guest: int) -> tuple[int, int]:
        """(host offset, stored length) of the compressed cluster at `guest`."""
        entry = self.l2(guest)
        assert entry & COMPRESSED, f"guest {guest:#x} is not compressed ({entry:#x})"
        bits = self["cluster_bits"]
        shift = 62 - (bits - 8)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (bits - 8)) - 1)) + 1
        return offset, sectors * 512 - (offset & 511)


# --------------------------------------------------------------------------------------------
# The pristine images, built once per module by qemu-img / qemu-io.
#
# v3:    c64k, 1 MiB: data @0 (host 0x50000), zlib-compressed @64k, zero @128k, data @192k
#        (host 0x70000, the last cluster of the file)
# zstd:  c64k, 1 MiB, compression_type=zstd: data @0, zero @128k (unallocated), compressed @64k
#        written last (host 0x60000)
# v2:    c64k compat=0.10: data @0, compressed @64k, data @192k
# extl2: c64k extended_l2=on: 4 KiB of data @0 (two subclusters), a full cluster @64k
# chain: base.qcow2 (data @0..128k) <- top.qcow2 (4 KiB @64k), plain relative names
# snap:  c64k, 128 KiB written, internal snapshot "s1", then 4 KiB rewritten @64k
# data:  c64k with the external data file image.data (named relatively): 128 KiB written @0


def _build(root: Path) -> dict[str, Path]:
    out = {}

    def make(name, opts, *cmds, file="image.qcow2", size="1M"):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, file, size, cwd=d)
        if cmds:
            qemu_io(file, *cmds, cwd=d)
        return d / file

    out["v3"] = make("v3", "cluster_size=64k", "write -P 0x5a 0 64k", "write -c -P 0x11 64k 64k",
                     "write -z 128k 64k", "write -P 0x22 192k 64k")
    out["zstd"] = make("zstd", "compression_type=zstd", "write -P 0x5a 0 64k",
                       "write -z 128k 64k", "write -c -P 0x11 64k 64k")
    out["v2"] = make("v2", "compat=0.10", "write -P 0x5a 0 64k", "write -c -P 0x11 64k 64k",
                     "write -P 0x22 192k 64k")
    out["extl2"] = make("extl2", "extended_l2=on", "write -P 0x5a 0 4k", "write -P 0x22 64k 64k")
    make("chain", "cluster_size=64k", "write -P 0x5a 0 128k", file="base.qcow2")
    d = root / "chain"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M",
             cwd=d)
    qemu_io("top.qcow2", "write -P 0x22 64k 4k", cwd=d)
    out["chain"] = d / "top.qcow2"
    out["snap"] = make("snap", "cluster_size=64k", "write -P 0x5a 0 128k")
    qemu_img("snapshot", "-c", "s1", "image.qcow2", cwd=out["snap"].parent)
    qemu_io(out["snap"], "write -P 0x66 64k 4k")
    out["data"] = make("data", "cluster_size=64k,data_file=image.data", "write -P 0x5a 0 128k")
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """name -> path of the top image of each pristine image (never modified: copy first)."""
    return _build(tmp_path_factory.mktemp("pristine"))


def test_pristine_layout(pristine):
    """The offsets the cases' messages name are where qemu-img put things (else fix the cases)."""
    q = Qcow(pristine["v3"])
    assert (q["l1_table_offset"], q.l1(0) & OFFSET_MASK) == (0x30000, 0x40000)
    assert q.l2(0) & OFFSET_MASK == 0x50000 and q.l2(192 * K) & OFFSET_MASK == 0x70000
    assert q.compressed(64 * K)[0] == 0x60000 and q.l2(128 * K) == 1
    assert q.size() == 0x80000 and q.extension(EXT_FEATURE_TABLE)[0] == 0x70
    assert Qcow(pristine["zstd"]).compressed(64 * K)[0] == 0x60000
    assert Qcow(pristine["zstd"]).size() < 0x70000
    for name, img in pristine.items():
        with qcowfast.open(img) as opened:
            assert_same_bytes(opened.read(0, opened.virtual_size), qemu_raw(img), name)


def qemu_raw(path) -> bytes:
    """``qemu-img convert -O raw`` of `path` as given (symlinks in it unresolved), run in the
    image's directory: QEMU 7.2 opens a relative external data file name from its working
    directory, qcowfast from the image's directory."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="qcowfast-ref-") as tmp:
        out = Path(tmp) / "ref.raw"
        qemu_img("convert", "-O", "raw", os.path.abspath(path), out, cwd=path.parent)
        return out.read_bytes()


def copy_image(pristine: dict[str, Path], name: str, dest: Path) -> Path:
    """Copy the directory of pristine image `name` into `dest`; return the copied top image."""
    src = pristine[name]
    shutil.copytree(src.parent, dest, dirs_exist_ok=True)
    return dest / src.name


# --------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    id: str
    image: str
    mutate: Callable[[Qcow], None]
    exc: type
    match: str


CASES: list[Case] = []


def case(id, image, exc, match):
    def register(fn):
        CASES.append(Case(id, image, fn, exc, match))
        return fn
    return register


def _set(**fields):
    def mutate(q: Qcow):
        for name, value in fields.items():
            q[name] = value(q) if callable(value) else value
    return mutate


def _simple(id, image, exc, match, **fields):
    CASES.append(Case(id, image, _set(**fields), exc, match))


# Header: truncation, magic, version, cluster size, header and extension lengths.
CASES += [
    Case("empty-file", "v3", lambda q: q.truncate(0), TruncatedImage, r"file is 0 bytes"),
    Case("header-truncated-at-50", "v3", lambda q: q.truncate(50), TruncatedImage,
         r"file is 50 bytes, shorter than a QCOW2 header"),
    Case("v3-header-truncated-at-90", "v3", lambda q: q.truncate(90), TruncatedImage,
         r"file is 90 bytes, shorter than a version 3 header"),
    Case("extension-truncated", "v3", lambda q: q.truncate(200), TruncatedImage,
         r"header extension 0x6803f857 at 0x70: 384 bytes run past the end of the file"),
]
_simple("bad-magic", "v3", FormatError, r"bad magic", magic=b"QFI\xfa")
_simple("version-1", "v3", UnsupportedFeature, r"version 1", version=1)
_simple("version-4", "v3", UnsupportedFeature, r"version 4", version=4)
_simple("cluster-bits-8", "v3", FormatError, r"cluster_bits 8 out of range", cluster_bits=8)
_simple("cluster-bits-22", "v3", FormatError, r"cluster_bits 22 out of range", cluster_bits=22)
_simple("cluster-bits-huge", "v3", FormatError, r"cluster_bits 4294967295 out of range",
        cluster_bits=0xFFFFFFFF)
_simple("header-length-huge", "v3", FormatError, r"header_length 4294967288 exceeds",
        header_length=0xFFFFFFF8)
_simple("header-length-short", "v3", FormatError, r"header_length 96 ", header_length=96)
# Not a multiple of 8 (as qcow2.txt asks): QEMU reads the extensions from there all the same,
# and at 113 they are garbage (test_formats.test_header_lengths reads 105 and 116).
_simple("header-length-unaligned", "v3", FormatError, r"header extension 0x03f85700 at 0x71",
        header_length=113)


@case("extension-length-huge", "v3", FormatError,
      r"header extension 0x6803f857 at 0x70: length 4294967295 runs past the end of the header")
def _(q):
    off, _ = q.extension(EXT_FEATURE_TABLE)
    q.put(off + 4, struct.pack(">I", 0xFFFFFFFF))


@case("extension-length-past-cluster", "v3", FormatError,
      r"header extension 0x6803f857 at 0x70: length 65417 runs past the end of the header")
def _(q):
    off, _ = q.extension(EXT_FEATURE_TABLE)
    q.put(off + 4, struct.pack(">I", q.cluster_size - off - 8 + 1))


# Tables named by the header: sizes bounded by QEMU's limits and by the file.
_simple("l1-size-huge", "v3", FormatError, r"L1 table too large \(4294967295 entries",
        l1_size=0xFFFFFFFF)
_simple("l1-size-max-past-eof", "v3", TruncatedImage,
        r"L1 table at 0x30000 \(33554432 bytes\) runs past the end of the file",
        l1_size=32 * M // 8)
_simple("l1-size-zero", "v3", FormatError,
        r"L1 table is too small \(0 entries for a virtual size of 1048576 bytes", l1_size=0)
_simple("l1-offset-past-eof", "v3", TruncatedImage, r"L1 table at 0x80000 .* past the end",
        l1_table_offset=lambda q: q.size())
_simple("l1-offset-unaligned", "v3", FormatError, r"L1 table offset 0x30200 is not aligned",
        l1_table_offset=0x30200)
_simple("l1-offset-huge", "v3", TruncatedImage, r"L1 table at 0xffffffffffff0000",
        l1_table_offset=0xFFFFFFFFFFFF0000)
_simple("refcount-table-huge", "v3", FormatError,
        r"Reference count table too large \(4294967295 clusters",
        refcount_table_clusters=0xFFFFFFFF)
_simple("refcount-table-past-eof", "v3", TruncatedImage, r"refcount table at 0x80000",
        refcount_table_offset=lambda q: q.size())
_simple("refcount-table-unaligned", "v3", FormatError, r"refcount table offset 0x10008",
        refcount_table_offset=0x10008)
@case("refcount-table-truncated", "v3", TruncatedImage,
      r"refcount table at 0x80000 \(65536 bytes\) runs past the end of the file \(524296")
def _(q):
    # Move the refcount table to the end of the file (everything else stays inside), then cut it.
    end = q.size()
    q.put(end, q.get(q["refcount_table_offset"], q.cluster_size))
    q["refcount_table_offset"] = end
    q.truncate(end + 8)


_simple("snapshot-count-huge", "v3", FormatError,
        r"Snapshot table too large \(4294967295 snapshots",
        nb_snapshots=0xFFFFFFFF)
_simple("snapshot-table-past-eof", "v3", TruncatedImage, r"snapshot table at 0x80000",
        nb_snapshots=100, snapshots_offset=lambda q: q.size())
_simple("virtual-size-2^63", "v3", FormatError,
        r"Image is too big \(a virtual size of 9223372036854775808 ",
        size=1 << 63)
_simple("refcount-order-7", "v3", FormatError, r"refcount_order 7", refcount_order=7)

# Features, encryption, compression type.
_simple("incompatible-bit-5", "v3", UnsupportedFeature, r"incompatible feature bit 5",
        incompatible_features=1 << 5)
_simple("incompatible-bit-63", "v3", UnsupportedFeature, r"incompatible feature bit 63",
        incompatible_features=1 << 63)
_simple("encrypted-aes", "v3", EncryptedImage, r"encrypted \(legacy AES\)", crypt_method=1)
_simple("encrypted-luks", "v3", EncryptedImage, r"Missing CRYPTO header for crypt method 2 ",
        crypt_method=2)
_simple("encrypted-unknown", "v3", EncryptedImage, r"Unsupported encryption method 9",
        crypt_method=9)
_simple("compression-type-unknown", "v3", UnsupportedFeature,
        r"qcow2: unknown compression type: 2",
        incompatible_features=1 << 3, compression_type=2)
_simple("compression-bit-without-type", "v3", FormatError,
        r"qcow2: Compression type incompatible feature bit must not be set$",
        incompatible_features=1 << 3)
_simple("compression-type-without-bit", "zstd", FormatError,
        r"qcow2: Compression type incompatible feature bit must be set$",
        incompatible_features=0)
_simple("extl2-with-8k-clusters", "extl2", FormatError,
        r"Unsupported subcluster size: 256 \(extended L2",
        cluster_bits=13)
_simple("data-file-raw-without-data-file", "v3", FormatError, r"data-file-raw",
        autoclear_features=2)
_simple("backing-name-too-long", "chain", FormatError,
        r"Backing file name too long \(2000 bytes",
        backing_file_size=2000)
_simple("backing-name-outside-cluster", "chain", FormatError,
        r"Backing file name too long \(16 bytes at 0xfff8\)", backing_file_offset=0xFFF8,
        backing_file_size=16)


# L1 table and entries.
@case("l1-truncated", "v3", TruncatedImage, r"L1 table at 0x30000 \(8 bytes\) runs past the end")
def _(q):
    q.truncate(q["l1_table_offset"] + 4)


@case("l1-entry-past-eof", "v3", TruncatedImage, r"L1 entry 0 .*past the end of the file")
def _(q):
    q.set_l1(0, COPIED | (q.size() + 0x10000))


@case("l1-entry-unaligned", "v3", CorruptImage, r"L1 entry 0 .*not aligned")
def _(q):
    q.set_l1(0, q.l1(0) + 0x200)


@case("l1-entry-reserved-bit-56", "v3", CorruptImage, r"L1 entry 0 .*reserved bits")
def _(q):
    q.set_l1(0, q.l1(0) | 1 << 56)


@case("l1-entry-reserved-bit-0", "v3", CorruptImage, r"L1 entry 0 .*reserved bits")
def _(q):
    q.set_l1(0, q.l1(0) | 1)


# L2 tables and entries.
@case("l2-truncated", "v3", TruncatedImage, r"L1 entry 0 .*past the end of the file")
def _(q):
    q.truncate((q.l1(0) & OFFSET_MASK) + 100)


@case("l2-entry-past-eof", "v3", TruncatedImage,
      r"L2 entry 0 of the table at 0x40000 \(guest offset 0x0\): host offset lies past the end")
def _(q):
    q.set_l2(0, COPIED | (q.size() + 0x10000))


@case("l2-entry-unaligned", "v3", CorruptImage,
      r"L2 entry 3 of the table at 0x40000 \(guest offset 0x30000\): host cluster offset is not "
      r"aligned")
def _(q):
    q.set_l2(192 * K, q.l2(192 * K) + 0x200)


@case("l2-entry-reserved-bit-1", "v3", CorruptImage, r"L2 entry 0 .*reserved bits are set")
def _(q):
    q.set_l2(0, q.l2(0) | 2)


@case("l2-entry-reserved-bit-57", "v3", CorruptImage, r"L2 entry 0 .*reserved bits are set")
def _(q):
    q.set_l2(0, q.l2(0) | 1 << 57)


@case("compressed-with-copied", "v3", CorruptImage, r"L2 entry 1 .*COPIED")
def _(q):
    q.set_l2(64 * K, q.l2(64 * K) | COPIED)


@case("v2-zero-flag", "v2", CorruptImage, r"L2 entry 0 .*zero cluster flag in a version 2 image")
def _(q):
    q.set_l2(0, q.l2(0) | 1)


@case("extl2-allocated-and-zero", "extl2", CorruptImage, r"L2 entry 0 .*subcluster bitmap")
def _(q):
    pos = q.l2_pos(0)
    bitmap = struct.unpack(">Q", q.get(pos + 8, 8))[0]
    q.put(pos + 8, struct.pack(">Q", bitmap | (bitmap & 0xFFFFFFFF) << 32))


# Compressed clusters.
@case("compressed-past-eof", "v3", TruncatedImage, r"L2 entry 1 .*past the end of the file")
def _(q):
    q.set_l2(64 * K, COMPRESSED | (q.size() + 0x1000))


@case("compressed-points-at-header", "v3", DecompressionError,
      r"compressed cluster at host offset 0x0 \(guest offset 0x10000\) does not "
      r"zlib-decompress")
def _(q):
    q.set_l2(64 * K, COMPRESSED)


@case("deflate-corrupt", "v3", DecompressionError,
      r"compressed cluster at host offset 0x60000 \(guest offset 0x10000\) does not "
      r"zlib-decompress")
def _(q):
    off, n = q.compressed(64 * K)
    q.put(off, b"\xff" * n)


@case("zstd-corrupt", "zstd", DecompressionError,
      r"compressed cluster at host offset 0x60000 \(guest offset 0x10000\) does not "
      r"zstd-decompress")
def _(q):
    off, n = q.compressed(64 * K)
    q.put(off, b"\x00\x11\x22\x33")           # the frame magic


@case("deflate-short-output", "v3", DecompressionError,
      r"compressed cluster at host offset 0x60000 \(guest offset 0x10000\) does not "
      r"zlib-decompress to exactly one cluster")
def _(q):
    q.put_stream(64 * K, deflate(b"\x11" * 1000))


@case("zstd-short-output", "zstd", DecompressionError,
      r"compressed cluster at host offset 0x60000 \(guest offset 0x10000\) does not "
      r"zstd-decompress to exactly one cluster")
def _(q):
    q.put_stream(64 * K, zstd.compress(b"\x11" * 1000))


@case("zstd-overlong-stream", "zstd", DecompressionError,
      r"compressed cluster at host offset 0x60000 \(guest offset 0x10000\) does not "
      r"zstd-decompress to exactly one cluster")
def _(q):
    # QEMU qcow2_zstd_decompress(): a frame left unfinished when the cluster is full is an error.
    q.put_stream(64 * K, zstd.compress(b"\xab" * (64 * K) + b"\xcd" * (64 * K)))


@case("zstd-truncated-stream", "zstd", TruncatedImage, r"compressed cluster at host offset 0x60000")
def _(q):
    off, n = q.compressed(64 * K)
    q.truncate(off + 4)


# Data clusters.
@case("data-truncated", "v3", TruncatedImage, r"data .*guest offset 0x30000")
def _(q):
    q.truncate((q.l2(192 * K) & OFFSET_MASK) + 100)


@case("data-truncated-at-cluster", "v3", TruncatedImage, r"L2 entry 3 .*past the end")
def _(q):
    q.truncate(q.l2(192 * K) & OFFSET_MASK)


# Backing chains.
@case("backing-loop-self", "chain", BackingChainError, r"backing chain loops: .*top\.qcow2")
def _(q):
    q.set_backing_name("top.qcow2")


@case("backing-loop-self-raw", "chain", BackingChainError, r"backing chain loops: .*top\.qcow2")
def _(q):
    # qemu-img reads top.qcow2's own bytes as its raw backing file here (README: Differences).
    qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "raw", q.path.name, cwd=q.path.parent)


@case("backing-loop-two", "chain", BackingChainError, r"backing chain loops: .*base\.qcow2")
def _(q):
    qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2", cwd=q.path.parent)


@case("backing-absolute", "chain", UnsafePathError,
      r"backing file '/.*elsewhere/base\.qcow2' .*outside the image's directory.*"
      r"--allow-backing-dir")
def _(q):
    # An absolute name is followed only where it lands inside the image's directory.
    outside = q.path.parent.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    shutil.copyfile(q.path.parent / "base.qcow2", outside / "base.qcow2")
    q.set_backing_name(str(outside / "base.qcow2"))


@case("backing-dotdot", "chain", UnsafePathError,
      r"backing file '\.\./chain/base\.qcow2' .* resolves outside the image's directory")
def _(q):
    q.set_backing_name("../chain/base.qcow2")


@case("backing-json", "chain", UnsafePathError, r"backing file 'json:\{.*json: prefix")
def _(q):
    q.set_backing_name('json:{"file.filename":"base.qcow2"}')


@case("backing-missing", "chain", MissingBackingFile, r"backing file .*nothere\.qcow2 .*cannot")
def _(q):
    q.set_backing_name("nothere.qcow2")


@case("backing-format-unknown", "chain", UnsupportedFeature, r"backing file format 'vmdk'")
def _(q):
    off, length = q.extension(EXT_BACKING_FORMAT)
    q.put(off + 8, b"vmdk".ljust(length, b"\0"))


def deflate(data: bytes) -> bytes:
    """Raw deflate with QEMU's parameters (window bits -12)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "duplicate case ids"
BY_ID = {c.id: c for c in CASES}


def damaged(pristine, c: Case, tmp_path: Path) -> Path:
    path = copy_image(pristine, c.image, tmp_path / "img")
    c.mutate(Qcow(path))
    return path


def raises_exactly(c: Case, fn):
    """Run fn(); it must raise exactly c.exc with a message matching c.match."""
    __tracebackhide__ = True
    with pytest.raises(qcowfast.QcowError, match=c.match) as info:
        fn()
    assert type(info.value) is c.exc, \
        f"expected {c.exc.__name__}, got {type(info.value).__name__}: {info.value}"
    return info.value


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".qcowfast-tmp"))


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_convert_refuses(pristine, tmp_path, c):
    src = damaged(pristine, c, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "disk.raw"
    # src_format: a damaged header must not send the probe to raw (qemu-img -f qcow2).
    raises_exactly(c, lambda: qcowfast.convert(src, dst, threads=2, src_format="qcow2"))
    assert not dst.exists(), "a failed conversion left its output"
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_open_map_read_refuses(pristine, tmp_path, c):
    """Opening, mapping and reading every byte fails the same way (reads past EOF: no zeros)."""
    src = damaged(pristine, c, tmp_path)

    def consume():
        with qcowfast.open(src) as img:
            img.map()
            img.read(0, img.virtual_size)

    raises_exactly(c, consume)


def test_failed_convert_keeps_existing_dst(pristine, tmp_path):
    """A conversion failing midway (after writing earlier units) leaves an existing dst as it was."""
    c = BY_ID["data-truncated"]
    src = damaged(pristine, c, tmp_path)
    dst = tmp_path / "img" / "disk.raw"
    dst.write_bytes(b"precious" * 1000)
    before = dst.stat()
    with pytest.raises(TruncatedImage):
        qcowfast.convert(src, dst, overwrite=True, unit_size=64 * K, threads=1)
    assert dst.read_bytes() == b"precious" * 1000
    assert dst.stat().st_mtime_ns == before.st_mtime_ns
    assert leftovers(dst.parent) == []


def test_stream_failing_midway_raises(pristine, tmp_path):
    """Streaming a damaged image raises the same error after writing the units before it."""
    c = BY_ID["data-truncated"]
    src = damaged(pristine, c, tmp_path)
    out = io.BytesIO()
    raises_exactly(c, lambda: qcowfast.convert(src, out, unit_size=64 * K, threads=1))


def test_overlong_deflate_stream_capped_at_one_cluster(pristine, tmp_path):
    """A deflate stream inflating to two clusters yields the first one only, as QEMU reads it
    (qcow2_zlib_decompress() stops when the cluster is full; zstd refuses such a stream, see
    the zstd-overlong-stream case)."""
    path = copy_image(pristine, "v3", tmp_path / "img")
    Qcow(path).put_stream(64 * K, deflate(b"\xab" * (64 * K) + b"\xcd" * (64 * K)))
    with qcowfast.open(path) as img:
        got = img.read(0, img.virtual_size)
    assert got[64 * K:128 * K] == b"\xab" * (64 * K)
    assert got[128 * K:132 * K] == bytes(4 * K)
    assert_same_bytes(got, reference_raw(path), "overlong deflate stream")
    out = tmp_path / "out.raw"
    qcowfast.convert(path, out)
    assert_same_bytes(out.read_bytes(), reference_raw(path), "convert")


# --------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit code 1, never a traceback.

CLI_CASES = ["header-truncated-at-50", "cluster-bits-huge", "extension-length-huge",
             "l1-size-huge", "l1-entry-past-eof", "l2-entry-reserved-bit-1", "v2-zero-flag",
             "deflate-corrupt", "zstd-corrupt", "data-truncated", "backing-loop-self",
             "backing-absolute", "incompatible-bit-63", "encrypted-luks"]
MAP_FAILS = {"header-truncated-at-50", "cluster-bits-huge", "extension-length-huge",
             "l1-size-huge", "l1-entry-past-eof", "l2-entry-reserved-bit-1", "v2-zero-flag",
             "backing-loop-self", "backing-absolute", "incompatible-bit-63", "encrypted-luks"}


# Where the command line says what qemu-img says (qcow2_do_open()'s header checks).
CLI_MATCH = {"header-truncated-at-50": r": Could not open '.*': qcow2 header too short$",
             "cluster-bits-huge": r": Could not open '.*': Unsupported cluster size: "
                                  r"2\^4294967295$",
             "extension-length-huge": r": Could not open '.*': Header extension too large$",
             "l1-size-huge": r": Could not open '.*': Active L1 table too large$",
             "incompatible-bit-63": r": Could not open '.*': Unsupported qcow2 feature\(s\): "
                                    r"Unknown incompatible feature: 8000000000000000$",
             "encrypted-luks": r": Could not open '.*': Missing CRYPTO header for crypt "
                               r"method 2$"}


def assert_one_line_error(proc, c: Case):
    __tracebackhide__ = True
    assert proc.returncode == 1, f"exit {proc.returncode}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfast: "), proc.stderr
    match = CLI_MATCH.get(c.id, c.match)
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"


@pytest.mark.parametrize("cid", CLI_CASES)
def test_cli_convert_one_line(pristine, tmp_path, cid):
    c = BY_ID[cid]
    src = damaged(pristine, c, tmp_path)
    dst = tmp_path / "disk.raw"
    proc = run_cli("convert", "-q", src, dst)
    assert_one_line_error(proc, c)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cid", sorted(MAP_FAILS))
def test_cli_map_one_line(pristine, tmp_path, cid):
    """One error line; on standard output what qemu-img prints before it fails too (nothing
    when the image cannot be opened; "[" or the header and the entries before a bad L2
    entry). Where qemu-img reads on (a Difference), what qcowfast printed begins its map."""
    c = BY_ID[cid]
    src = damaged(pristine, c, tmp_path)
    for output in ("json", "human"):
        proc = run_cli("map", "--output", output, src)
        assert_one_line_error(proc, c)
        if cid not in MAP_FAILS_PART_WAY:
            assert proc.stdout == ""
            continue
        want = subprocess.run([QEMU_IMG, "map", "--output", output, str(src)],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("[" if output == "json" else "Offset")
        if MAP_FAILS_PART_WAY[cid]:
            assert (want.returncode, proc.stdout) == (1, want.stdout)
        else:       # qemu-img reads on (its human map may stop for other reasons)
            assert want.stdout.startswith(proc.stdout)
            if output == "json":
                assert want.returncode == 0 and len(want.stdout) > len(proc.stdout)


# Maps failing at an L1 or L2 entry, after printing the start of the map: True where qemu-img
# fails at the same entry, False where it reads on (reserved bits, an L2 table past the end of
# the file: Differences in the README).
MAP_FAILS_PART_WAY = {"v2-zero-flag": True, "l2-entry-reserved-bit-1": False,
                      "l1-entry-past-eof": False}


def test_cli_stream_refused_one_line(pristine, tmp_path):
    """Streaming over --max-stream-size is refused with one line, before writing anything."""
    proc = subprocess.run([sys.executable, "-m", "qcowfast", "convert", "--max-stream-size", "64k",
                           str(pristine["v3"]), "-"], capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert len(err.splitlines()) == 1 and "max-stream-size" in err, err


# --------------------------------------------------------------------------------------------
# Fuzzer findings (fuzz/fuzz_open.py), replayed through the fuzzer's own harness: only
# QcowError may come out.


def test_fuzz_missing_data_file(tmp_path):
    """Found at once from the data-file seed: the data file named inside the image is absent
    (FileNotFoundError escaped from open)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,data_file=img.data",
             "img.qcow2", "16k", cwd=tmp_path)
    qemu_io("img.qcow2", "write -P 0x13 0 1k", cwd=tmp_path)
    (tmp_path / "img.data").unlink()
    exercise(tmp_path / "img.qcow2")
