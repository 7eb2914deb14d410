"""qemu-img's words for every QCOW2 header fault QEMU 7.2's qcow2_do_open() refuses.

Each case damages the header of an image qemu-img made, then runs the same command line through
qemu-img and qcowfast (in this process) for info, check, map, compare, convert and measure, and
compares the exit status and standard error (qemu-img's name replaced by qcowfast's), and the
empty standard output of a failure. Where a header has two faults, the one QEMU checks first is
the one reported. A fault in a backing file is reported through the image opened, as QEMU does
("Could not open 'TOP': Could not open backing file: ..."), and so is a backing format
qcowfast does not read where QEMU's driver refuses the file too; an image that needs an
external data file and names none, where QEMU opens the data file.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest

from common import QEMU_IMG, cli_in_process, qemu_img

FEATURE_TABLE, BACKING_FORMAT, BITMAPS, CRYPTO = 0x6803F857, 0xE2792ACA, 0x23852875, 0x0537BE77
DATA_FILE = 0x44415441
# Header fields (qcow2.txt "Header"): byte offset and struct format.
FIELDS = {
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
COMMANDS = ("info", "check", "map", "compare", "convert", "measure")


# --------------------------------------------------------------------------------------------
# Mutators: each changes the bytes of an image in place.

def header(**fields) -> Callable[[bytearray], None]:
    def mutate(data: bytearray) -> None:
        for name, value in fields.items():
            offset, fmt = FIELDS[name]
            struct.pack_into(fmt, data, offset, value)
    return mutate


def extension(data: bytes, ext_type: int) -> int:
    """Offset of the 8-byte header of extension `ext_type` (qcow2.txt "Header extensions")."""
    offset = struct.unpack_from(">I", data, 100)[0]
    while True:
        found, length = struct.unpack_from(">II", data, offset)
        if found == ext_type:
            return offset
        assert found, f"no extension {ext_type:#x}"
        offset += 8 + (length + 7) // 8 * 8


def ext_put(ext_type: int, at: int, fmt: str, *values) -> Callable[[bytearray], None]:
    """Pack `values` at byte `at` of extension `ext_type` (0: its type, 4: its length, 8: its
    data)."""
    def mutate(data: bytearray) -> None:
        struct.pack_into(fmt, data, extension(data, ext_type) + at, *values)
    return mutate


def add_extension(ext_type: int, payload: bytes) -> Callable[[bytearray], None]:
    """Append an extension where the end marker is (the marker after it)."""
    def mutate(data: bytearray) -> None:
        end = extension(data, 0)
        raw = struct.pack(">II", ext_type, len(payload)) + payload.ljust(-(-len(payload) // 8) * 8,
                                                                         b"\0")
        data[end:end + len(raw) + 8] = raw + bytes(8)
    return mutate


def features(*entries: tuple[int, int, bytes]) -> Callable[[bytearray], None]:
    """Rewrite the feature table's entries (type, bit, name), zeros after them."""
    def mutate(data: bytearray) -> None:
        at = extension(data, FEATURE_TABLE)
        length = struct.unpack_from(">I", data, at + 4)[0]
        table = b"".join(struct.pack(">BB46s", *e) for e in entries)
        data[at + 8:at + 8 + length] = table.ljust(length, b"\0")
    return mutate


def backing_format(name: bytes) -> Callable[[bytearray], None]:
    """Store `name` as the backing format, moving what follows that extension (the other
    extensions and the backing file name) to fit."""
    def mutate(data: bytearray) -> None:
        at = extension(data, BACKING_FORMAT)
        old_end = at + 8 + (struct.unpack_from(">I", data, at + 4)[0] + 7) // 8 * 8
        new = struct.pack(">II", BACKING_FORMAT, len(name)) + name.ljust(-(-len(name) // 8) * 8,
                                                                          b"\0")
        name_at, name_size = struct.unpack_from(">QI", data, 8)
        block = new + data[old_end:name_at + name_size]
        data[at:at + len(block)] = block
        struct.pack_into(">Q", data, 8, name_at + len(new) - (old_end - at))
    return mutate


def backing_name(name: bytes) -> Callable[[bytearray], None]:
    """Overwrite the backing file name (of the same length)."""
    def mutate(data: bytearray) -> None:
        at, size = struct.unpack_from(">QI", data, 8)
        assert len(name) == size
        data[at:at + size] = name
    return mutate


def cut(length: int) -> Callable[[bytearray], None]:
    def mutate(data: bytearray) -> None:
        del data[length:]
    return mutate


def both(*mutators) -> Callable[[bytearray], None]:
    def mutate(data: bytearray) -> None:
        for m in mutators:
            m(data)
    return mutate


# --------------------------------------------------------------------------------------------
# The cases, in qcow2_do_open()'s order.

@dataclass
class Case:
    """`base`: the image damaged (plain, zstd, chain: the top of a chain, bitmap, datafile) or
    `backing`: the chain, its backing file damaged. `skip`: commands left out, and why."""
    id: str
    base: str
    mutate: Callable
    skip: set = field(default_factory=set)


# qemu-img check opens without validating the snapshot table (BDRV_O_CHECK): it reports the
# table its own way, which qcowfast's check does not (yet) do.
NOT_CHECK = {"check"}
# qemu-img info reads zeros past the end of the file; qcowfast refuses (README, Differences).
CUT = {"info"}
CASES = [
    # The fixed header.
    Case("version-4", "plain", header(version=4)),
    Case("cluster-bits-8", "plain", header(cluster_bits=8)),
    Case("header-length-96", "plain", header(header_length=96)),
    Case("header-length-past-cluster", "plain", header(header_length=0x10008)),
    Case("backing-offset-past-cluster", "plain",
         header(backing_file_offset=0x10008, backing_file_size=4)),
    # validate_compression_type().
    Case("compression-type-2", "plain", header(incompatible_features=1 << 3, compression_type=2)),
    Case("compression-bit-with-zlib", "plain", header(incompatible_features=1 << 3)),
    Case("zstd-without-compression-bit", "zstd", header(incompatible_features=0)),
    # report_unsupported_feature(): names from the feature table, in its order, then the rest.
    Case("feature-bit-5", "plain", header(incompatible_features=1 << 5)),
    Case("feature-bit-63", "plain", header(incompatible_features=1 << 63)),
    Case("feature-named", "plain",
         both(header(incompatible_features=1 << 5), features((0, 5, b"five")))),
    Case("features-in-table-order", "plain",
         both(header(incompatible_features=1 << 5 | 1 << 6 | 1 << 9 | 1),
              features((0, 6, b"six"), (1, 9, b"compatible nine"), (0, 5, b"five")))),
    Case("feature-named-twice", "plain",
         both(header(incompatible_features=1 << 5), features((0, 5, b"first"), (0, 5, b"2nd")))),
    Case("feature-table-ends-at-empty-name", "plain",
         both(header(incompatible_features=1 << 5), features((0, 0, b""), (0, 5, b"five")))),
    Case("feature-name-46-bytes", "plain",
         both(header(incompatible_features=1 << 5), features((0, 5, b"N" * 46)))),
    Case("feature-bit-69-is-bit-5", "plain",
         both(header(incompatible_features=1 << 5), features((0, 69, b"sixty-nine")))),
    Case("feature-table-after-a-broken-extension", "chain",
         both(header(incompatible_features=1 << 5), features((0, 5, b"five")),
              ext_put(BACKING_FORMAT, 4, ">I", 16))),
    Case("features-before-a-broken-extension", "plain",
         both(header(incompatible_features=1 << 5), features((0, 5, b"five")),
              add_extension(BITMAPS, bytes(8)))),
    Case("subcluster-size", "plain", header(incompatible_features=1 << 4, cluster_bits=13)),
    Case("refcount-order-7", "plain", header(refcount_order=7)),
    # qcow2_validate_table() of the refcount table, the snapshot table and the L1 table.
    Case("no-refcount-table", "plain", header(refcount_table_clusters=0)),
    Case("refcount-table-too-large", "plain", header(refcount_table_clusters=129)),
    Case("refcount-table-unaligned", "plain", header(refcount_table_offset=0x10200)),
    Case("refcount-table-past-2^63", "plain", header(refcount_table_offset=0x7FFFFFFFFFFF0000)),
    Case("snapshot-table-too-large", "plain", header(nb_snapshots=65537), NOT_CHECK),
    Case("snapshot-table-unaligned", "plain", header(snapshots_offset=0x123), NOT_CHECK),
    Case("snapshot-table-past-2^63", "plain",
         header(nb_snapshots=2000, snapshots_offset=0x7FFFFFFFFFFF0000), NOT_CHECK),
    Case("l1-table-too-large", "plain", header(l1_size=(32 << 20) // 8 + 1)),
    Case("l1-table-unaligned", "plain", header(l1_table_offset=0x30200)),
    Case("l1-table-past-2^63", "plain", header(l1_table_offset=0xFFFFFFFFFFFF0000)),
    Case("image-too-big", "plain", header(size=1 << 62)),
    Case("image-too-big-2^63", "plain", header(size=1 << 63)),
    Case("l1-table-too-small", "plain", header(l1_size=0)),
    # size_to_l1() wraps: the open goes on, and bdrv_refresh_total_sectors() refuses the size.
    Case("size-just-below-2^64", "plain", header(size=(1 << 64) - 1)),
    Case("encryption-method-9", "plain", header(crypt_method=9)),
    Case("encryption-method-2^32-1", "plain", header(crypt_method=0xFFFFFFFF)),   # (%d: -1)
    # qcow2_read_extensions().
    Case("extension-too-long", "plain", ext_put(FEATURE_TABLE, 4, ">I", 0xFFFFFFFF)),
    Case("header-length-113", "plain", header(header_length=113)),
    Case("extension-header-past-area", "plain",
         header(backing_file_offset=116, backing_file_size=4)),
    Case("backing-format-16-bytes", "chain", ext_put(BACKING_FORMAT, 4, ">I", 16)),
    Case("crypto-header-without-luks", "plain",
         add_extension(CRYPTO, struct.pack(">QQ", 0x10000, 4096))),
    Case("crypto-header-size-8", "plain",
         both(header(crypt_method=2), add_extension(CRYPTO, struct.pack(">Q", 0x10000)))),
    Case("crypto-header-unaligned", "plain",
         both(header(crypt_method=2), add_extension(CRYPTO, struct.pack(">QQ", 0x100, 4096)))),
    Case("bitmaps-extension-32-bytes", "bitmap", ext_put(BITMAPS, 4, ">I", 32)),
    Case("bitmaps-reserved", "bitmap", ext_put(BITMAPS, 12, ">I", 1)),
    Case("bitmaps-zero", "bitmap", ext_put(BITMAPS, 8, ">I", 0)),
    Case("bitmaps-65536", "bitmap", ext_put(BITMAPS, 8, ">I", 65536)),
    Case("bitmap-directory-unaligned", "bitmap", ext_put(BITMAPS, 24, ">Q", 0x50001)),
    Case("bitmap-directory-too-big", "bitmap", ext_put(BITMAPS, 16, ">Q", 1024 * 65535 + 1)),
    # The data file (not opened by info), the encryption, the backing file name.
    Case("data-file-raw-alone", "plain", header(autoclear_features=2)),
    Case("data-file-name-without-its-bit", "datafile", header(incompatible_features=0)),
    # Where qcow2_do_open() opens the data file (info does not: BDRV_O_NO_IO).
    Case("data-file-bit-without-a-name", "plain", header(incompatible_features=1 << 2)),
    Case("data-file-name-empty", "datafile", ext_put(DATA_FILE, 8, ">8s", bytes(8))),
    Case("data-file-name-past-the-end-of-the-file", "datafile", cut(104), CUT),
    Case("data-file-bit-without-a-name-in-a-cut-header", "plain",
         both(header(incompatible_features=1 << 2, header_length=112), cut(104)), CUT),
    # (qemu-img 7.2's info crashes on this one.)
    Case("luks-without-crypto-header", "plain", header(crypt_method=2), {"info"}),
    Case("backing-name-too-long", "chain", header(backing_file_size=1024)),
    Case("backing-name-past-cluster", "chain",
         header(backing_file_offset=0xFFF8, backing_file_size=9)),
    # Two faults: the first in QEMU's order is reported.
    Case("cut-header-length-before-backing-offset", "plain",
         header(header_length=96, backing_file_offset=0x20000)),
    Case("backing-offset-before-compression", "plain",
         header(backing_file_offset=0x20000, compression_type=2)),
    Case("compression-before-features", "plain",
         header(incompatible_features=1 << 5, compression_type=2)),
    Case("features-before-refcount-order", "plain",
         header(incompatible_features=1 << 5, refcount_order=7)),
    Case("subcluster-size-before-refcount-order", "plain",
         header(incompatible_features=1 << 4, cluster_bits=13, refcount_order=7)),
    Case("refcount-order-before-no-refcount-table", "plain",
         header(refcount_table_clusters=0, refcount_order=7)),
    Case("refcount-table-before-snapshot-table", "plain",
         header(refcount_table_clusters=0xFFFFFFFF, nb_snapshots=0xFFFFFFFF)),
    Case("refcount-offset-before-snapshot-offset", "plain",
         header(refcount_table_offset=0x10008, snapshots_offset=0x123)),
    Case("snapshot-table-before-l1-table", "plain",
         header(l1_size=0xFFFFFFFF, nb_snapshots=0xFFFFFFFF), NOT_CHECK),
    Case("l1-table-before-size", "plain", header(size=1 << 63, l1_size=0xFFFFFFFF)),
    Case("l1-too-small-before-encryption-method", "plain", header(crypt_method=9, l1_size=0)),
    Case("refcount-order-before-l1-past-the-end", "plain",
         header(l1_table_offset=0x100000, refcount_order=7)),
    Case("encryption-method-before-extensions", "plain",
         both(header(crypt_method=9), ext_put(FEATURE_TABLE, 4, ">I", 0xFFFFFFFF))),
    Case("extensions-before-data-file-raw", "plain",
         both(header(autoclear_features=2), ext_put(FEATURE_TABLE, 4, ">I", 0xFFFFFFFF))),
    Case("data-file-raw-before-backing-name", "chain",
         header(autoclear_features=2, backing_file_size=1024)),
    Case("extensions-before-backing-name", "chain",
         both(header(backing_file_size=1024), ext_put(FEATURE_TABLE, 4, ">I", 0xFFFFFFFF))),
    Case("bitmaps-before-backing-name", "bitmap",
         both(header(backing_file_offset=600, backing_file_size=1024),
              ext_put(BITMAPS, 8, ">I", 0))),
    # The backing format: a driver QEMU lacks is refused before the file is opened; a driver
    # qcowfast does not read, where QEMU's refuses the file too (here a qcow2 image).
    Case("backing-format-unknown", "chain", backing_format(b"QCOW2")),
    Case("backing-format-unknown-of-a-missing-file", "chain",
         both(backing_format(b"no-such"), backing_name(b"nothere.qc"))),
    Case("backing-format-qcow", "chain", backing_format(b"qcow")),
    Case("backing-format-qed", "chain", backing_format(b"qed")),
    Case("backing-format-parallels", "chain", backing_format(b"parallels")),
    Case("backing-format-bochs", "chain", backing_format(b"bochs")),
    Case("backing-format-vpc", "chain", backing_format(b"vpc")),
    Case("backing-format-vmdk", "chain", backing_format(b"vmdk")),
    # A backing file's header.
    Case("backing-file-refcount-order", "backing", header(refcount_order=7)),
    Case("backing-file-extension", "backing", ext_put(FEATURE_TABLE, 4, ">I", 0xFFFFFFFF)),
    Case("backing-file-features", "backing", header(incompatible_features=1 << 40)),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """The directories of the images qemu-img made, by name: each holds image.qcow2 and the
    files it names."""
    d = tmp_path_factory.mktemp("bases")
    out = {}
    for name, options in (("plain", []), ("zstd", ["-o", "compression_type=zstd"]),
                          ("datafile", ["-o", "data_file=data.raw"])):
        (d / name).mkdir()
        qemu_img("create", "-q", "-f", "qcow2", *options, d / name / "image.qcow2", "1M",
                 cwd=d / name)
        out[name] = d / name
    (d / "bitmap").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "bitmap" / "image.qcow2", "1M")
    qemu_img("bitmap", "--add", d / "bitmap" / "image.qcow2", "b0")
    out["bitmap"] = d / "bitmap"
    (d / "chain").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "chain" / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             d / "chain" / "image.qcow2", cwd=d / "chain")
    out["chain"] = out["backing"] = d / "chain"
    return out


def damaged(bases: dict, c: Case, tmp_path) -> str:
    """A copy of the case's image directory with the damage done; the image to open."""
    work = tmp_path / "case"
    shutil.copytree(bases[c.base], work)
    target = work / ("base.qcow2" if c.base == "backing" else "image.qcow2")
    data = bytearray(target.read_bytes())
    c.mutate(data)
    target.write_bytes(data)
    return str(work / "image.qcow2")


def argv(command: str, image: str, good: str, out: str) -> list[str]:
    return {"info": ["info", image], "check": ["check", image], "map": ["map", image],
            "compare": ["compare", image, good],
            "convert": ["convert", "-q", "-O", "raw", image, out],
            "measure": ["measure", image]}[command]


def qemu_outcome(args: list[str], cwd) -> tuple[int, str, str]:
    proc = subprocess.run([QEMU_IMG, *args], capture_output=True, cwd=cwd, timeout=60)
    return (proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"),
            proc.stderr.decode("utf-8", "surrogateescape").replace("qemu-img", "qcowfast"))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_header_fault_as_qemu_img(capsys, bases, tmp_path, c):
    image = damaged(bases, c, tmp_path)
    good = str(bases["plain"] / "image.qcow2")
    out = str(tmp_path / "out.raw")
    cwd = os.path.dirname(image)
    for command in COMMANDS:
        if command in c.skip:
            continue
        args = argv(command, image, good, out)
        want = qemu_outcome(args, cwd)
        if os.path.exists(out):
            os.unlink(out)
        got = cli_in_process(capsys, *args)
        if os.path.exists(out):
            os.unlink(out)
        assert want[0] >= 0, f"qemu-img {command} crashed"
        assert (command, got[0], got[2]) == (command, want[0], want[2])
        if want[2].startswith("qcowfast: Could not open"):
            assert got[1] == want[1] == ""


def test_a_name_that_is_not_utf8_is_printed_as_its_bytes(bases, tmp_path):
    """report_unsupported_feature() prints the table's bytes ("%.46s"): so does qcowfast."""
    name = "fünf".encode() + b"\xff"
    c = Case("feature-name-not-utf8", "plain",
             both(header(incompatible_features=1 << 5), features((0, 5, name))))
    image = damaged(bases, c, tmp_path)
    want = subprocess.run([QEMU_IMG, "info", image], capture_output=True)
    got = subprocess.run([sys.executable, "-m", "qcowfast", "info", image],
                         capture_output=True)
    line = b"Could not open '%s': Unsupported qcow2 feature(s): f\xc3\xbcnf\xff\n" % \
        image.encode()
    assert want.stderr == b"qemu-img: " + line and want.returncode == 1
    assert (got.returncode, got.stderr) == (1, b"qcowfast: " + line)


def test_the_library_keeps_its_classes_and_adds_detail(bases, tmp_path):
    """The exception says QEMU's words and what qcowfast found; its class is the fault's."""
    import qcowfast
    cases = {
        "l1-table-past-2^63": (qcowfast.TruncatedImage, "Active L1 table offset invalid (L1 "
                               "table at 0xffffffffffff0000 would end past 2^63)"),
        "refcount-order-7": (qcowfast.FormatError, "Reference count entry width too large; "
                             "may not exceed 64 bits (refcount_order 7)"),
        "features-in-table-order": (qcowfast.UnsupportedFeature, "Unsupported qcow2 "
                                    "feature(s): six, five, Unknown incompatible feature: 200 "
                                    "(incompatible feature bit 5, bit 6, bit 9)"),
        "bitmap-directory-too-big": (qcowfast.FormatError, "bitmaps_ext: bitmap directory size "
                                     "(67107841) exceeds the maximum supported size "
                                     "(67107840)"),
        "encryption-method-9": (qcowfast.EncryptedImage, "Unsupported encryption method 9 "
                                "(qcowfast does not decrypt images)"),
    }
    by_id = {c.id: c for c in CASES}
    for cid, (cls, words) in cases.items():
        work = tmp_path / cid
        work.mkdir()
        image = damaged(bases, by_id[cid], work)
        with pytest.raises(qcowfast.QcowError) as info:
            qcowfast.open(image)
        assert type(info.value) is cls, (cid, info.value)
        assert str(info.value) == f"{image}: {words}"


BACKING_FORMATS = [c for c in CASES if c.id.startswith("backing-format-") and
                   c.id != "backing-format-16-bytes"]


@pytest.mark.parametrize("c", BACKING_FORMATS, ids=[c.id for c in BACKING_FORMATS])
def test_backing_format_through_info_backing_chain(capsys, bases, tmp_path, c):
    """img_info's loop opens each layer on its own, with the format its image names: a
    driver QEMU lacks or refuses is reported under the backing file's name."""
    image = damaged(bases, c, tmp_path)
    args = ["info", "--backing-chain", image]
    want = qemu_outcome(args, os.path.dirname(image))
    assert want[0] == 1 and want[1] == ""
    assert cli_in_process(capsys, *args) == want


def test_the_library_keeps_its_words_for_data_files_and_backing_formats(bases, tmp_path):
    """The command line says QEMU's words; the exception keeps qcowfast's, and its class."""
    import qcowfast
    by_id = {c.id: c for c in CASES}
    work = {}
    for cid in ("data-file-bit-without-a-name", "data-file-name-empty",
                "data-file-name-past-the-end-of-the-file", "backing-format-unknown",
                "backing-format-qcow"):
        (tmp_path / cid).mkdir()
        work[cid] = damaged(bases, by_id[cid], tmp_path / cid)
    cases = {
        "data-file-bit-without-a-name": (qcowfast.FormatError, "needs an external data file "
                                         "but names none; pass data_file=PATH"),
        "data-file-name-empty": (qcowfast.FormatError, "needs an external data file but names "
                                 "an empty one; pass data_file=PATH"),
        "data-file-name-past-the-end-of-the-file": (qcowfast.TruncatedImage, "header_length "
                                                    "112 runs past the end of the file"),
    }
    for cid, (cls, words) in cases.items():
        with pytest.raises(qcowfast.QcowError) as info:
            qcowfast.open(work[cid])
        assert (type(info.value), str(info.value)) == (cls, f"{work[cid]}: {words}")
    for cid, fmt in (("backing-format-unknown", "QCOW2"), ("backing-format-qcow", "qcow")):
        with pytest.raises(qcowfast.UnsupportedFeature) as info:
            qcowfast.open(work[cid])
        assert str(info.value) == f"backing file format {fmt!r} of {work[cid]} is not " \
            "supported (qcowfast reads qcow2 and raw backing files)"
    # The file given opens what names none (QEMU: -o data-file=...).
    raw = tmp_path / "given.raw"
    raw.write_bytes(b"\x5a" * (1 << 20))
    for cid in ("data-file-bit-without-a-name", "data-file-name-empty"):
        with qcowfast.open(work[cid], data_file=raw) as img:
            assert img.read(0, 512) == bytes(512)      # (no cluster allocated)
