"""Differential damage sweep: where qemu-img 7.2 reads a damaged image, qcowfast agrees with it.

test_mutation only asks that random damage ends in success or a QcowError. Here each damaged
copy of test_corrupt's small images (and `wide`, whose L1 table has several entries) goes
through `convert -O raw`, `map --output=json`, `info --output=json` and `check` of both tools
(qemu-img run in the test, qcowfast's command line run in this process), on `SWEPT` (every
other damage, and each kind and image at least once: the whole list, run by hand on
2026-12-05, found nothing more, and would add half a minute to the suite); a deterministic
subset (`EXTRA_DAMAGES`: every eighth damage, and each kind and image at least once) also
through the `EXTRA` commands: `compare` with its pristine original (plain, and `-s -p`) and
with itself (`-p`), `measure --output=json -O qcow2` and `-O raw`, `snapshot -l` and
`info --backing-chain --output=json`. The outcomes are classified per command:

* both succeed: the same raw bytes, the same JSON, the same standard output (compare: the same
  verdict, 0 or 1, with the same lines, progress included);
* only qcowfast refuses: the refusal must be one README's "Differences from qemu-img" names
  (`documented_refusal`: a read past the end of the file, reserved bits, a host cluster two
  guest clusters share (convert only), two L1 entries naming one L2 table, ...);
* only qemu-img refuses: a surprise (qcowfast reads what QEMU would not), a failure;
* both fail: fine, with the same exit status (compare: 2, 3 or 4). One exception: compare of
  an image whose L2 table runs past the end of the file, which qcowfast refuses while finding
  what is allocated (3), where qemu-img fails a read later (4).

`check` exits with qemu-img's status in every case. The damage list is fixed (a seeded choice
from boundary values per kind: header fields, L1/L2 entries, compressed descriptors, shared
clusters and L2 tables, refcount and snapshot tables, truncations), so a failure is reproduced
by its test id.

Left out: a backing file naming the image itself with its qcow2 format (qemu-img recurses;
test_corrupt has loops).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from qcowfast import (BackingChainError, CompareError, CorruptImage, TruncatedImage,
                      UnsafePathError)

from common import qemu_img, qemu_io
from test_corrupt import COMPRESSED, COPIED, FIELDS, OFFSET_MASK, Qcow, _build

K = 1024
M = 1024 * K
CONVERT_LIMIT = 64 * M          # larger virtual sizes (a damaged size field) are not converted
COMMANDS = ("convert", "map", "info")

# --------------------------------------------------------------------------------------------
# The damage list: (image, id, mutate(Qcow)). Layout of the pristine images: test_corrupt.


@dataclass(frozen=True)
class Damage:
    image: str
    id: str
    mutate: Callable[[Qcow], None]


def _field(name, value):
    def mutate(q: Qcow):
        off, fmt = FIELDS[name]
        size = struct.calcsize(fmt)
        v = value(q) if callable(value) else value
        q.put(off, (v % (1 << (8 * size))).to_bytes(size, "big") if isinstance(v, int) else v)
    return mutate


def _put64(where, value):
    """Overwrite the 8 bytes at where(q) with value(q, old)."""
    def mutate(q: Qcow):
        pos = where(q)
        old = struct.unpack(">Q", q.get(pos, 8))[0]
        q.put(pos, struct.pack(">Q", value(q, old) % (1 << 64)))
    return mutate


def _l1(q: Qcow) -> int:
    return q.l1_pos(0)


def _l2(guest):
    return lambda q: q.l2_pos(guest)


def _bitmap(guest):
    return lambda q: q.l2_pos(guest) + 8


def _reftable(q: Qcow) -> int:
    return q["refcount_table_offset"]


def _refblock_entry(cluster):
    """The 16-bit refcount of host cluster `cluster` (refcount block of reftable entry 0)."""
    def mutate_to(value):
        def mutate(q: Qcow):
            block = struct.unpack(">Q", q.get(_reftable(q), 8))[0] & OFFSET_MASK
            q.put(block + 2 * cluster, struct.pack(">H", value))
        return mutate
    return mutate_to


def _truncate(at):
    return lambda q: q.truncate(at(q) if callable(at) else at)


def _cut_last_cluster(q: Qcow) -> None:
    q.truncate(q.size() - q.cluster_size)


BOUNDARY = [0, 1, 0x1FF, 0x200, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40,
            1 << 56, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
# Values where fields are read: real versions, cluster sizes, offsets of each metadata cluster.
FIELD_VALUES = {
    "version": [2, 3], "cluster_bits": [9, 12, 15, 17, 21],
    "size": [0, 512, 64 * K, 64 * K + 1, 512 * K, 2 * M, 1 << 30, 1 << 62],
    "l1_size": [0, 2, 3, 128, 8192], "l1_table_offset": [0, 0x10000, 0x20000, 0x40000, 0x50000],
    "refcount_table_offset": [0, 0x20000, 0x30000, 0x40000],
    "refcount_table_clusters": [0, 2, 3],
    "nb_snapshots": [1, 2, 3], "snapshots_offset": [0x10000, 0x30000, 0x40000, 0x80200],
    "incompatible_features": [1, 2, 4, 8, 16, 1 << 20], "compatible_features": [1, 2, 1 << 40],
    "autoclear_features": [1, 2, 3, 1 << 40], "refcount_order": [0, 3, 5, 6],
    "header_length": [104, 112, 0x70 + 8], "compression_type": [0, 1, 2],
    "crypt_method": [0], "backing_file_offset": [0, 0x70, 0x200], "backing_file_size": [0, 4],
}


def _header_damages(rng: random.Random) -> list[Damage]:
    out = []
    for image in IMAGES:
        choices = [(name, v) for name in FIELDS if name != "magic"
                   for v in FIELD_VALUES.get(name, []) + BOUNDARY]
        for name, v in rng.sample(choices, 14):
            out.append(Damage(image, f"field-{name}={v:#x}", _field(name, v)))
    return out


# Entry values, as functions of (q, old entry).
L1_VALUES = {
    "zero": lambda q, e: 0,
    "no-copied": lambda q, e: e & ~COPIED,
    "reserved-bit0": lambda q, e: e | 1,
    "reserved-bit56": lambda q, e: e | 1 << 56,
    "compressed-flag": lambda q, e: e | COMPRESSED,
    "unaligned": lambda q, e: e + 0x200,
    "past-eof": lambda q, e: COPIED | q.size() // q.cluster_size * q.cluster_size + q.cluster_size,
    "at-last-cluster": lambda q, e: COPIED | (q.size() - 1) // q.cluster_size * q.cluster_size,
    "at-header": lambda q, e: COPIED | 0,
    "at-reftable": lambda q, e: COPIED | q["refcount_table_offset"],
    "at-l1": lambda q, e: COPIED | q["l1_table_offset"],
    "at-refblock": lambda q, e: COPIED | 0x20000,
    "huge": lambda q, e: COPIED | 0x00FFFFFFFFFF0000,
}
L2_VALUES = {
    "zero": lambda q, e: 0,
    "zero-flag": lambda q, e: e | 1,
    "zero-flag-only": lambda q, e: 1,
    "zero-flag-copied": lambda q, e: COPIED | 1,
    "no-copied": lambda q, e: e & ~COPIED,
    "copied": lambda q, e: e | COPIED,
    "reserved-bit1": lambda q, e: e | 2,
    "reserved-bit9": lambda q, e: e | 1 << 9,
    "reserved-bit56": lambda q, e: e | 1 << 56,
    "reserved-bit61": lambda q, e: e | 1 << 61,
    "compressed-flag": lambda q, e: e | COMPRESSED,
    "unaligned": lambda q, e: (e & ~0x1FF) + 0x200 if e & OFFSET_MASK else COPIED | 0x50200,
    "past-eof": lambda q, e: COPIED | -(-q.size() // q.cluster_size) * q.cluster_size,
    "far-past-eof": lambda q, e: COPIED | 1 << 40,
    "at-header": lambda q, e: COPIED | 0,
    "at-reftable": lambda q, e: COPIED | q["refcount_table_offset"],
    "at-refblock": lambda q, e: COPIED | 0x20000,
    "at-l1": lambda q, e: COPIED | q["l1_table_offset"],
    "at-l2": lambda q, e: COPIED | q.l1(0) & OFFSET_MASK,
    "all-ones": lambda q, e: (1 << 64) - 1,
    "offset-only-copied": lambda q, e: COPIED,
}


def _compressed(q: Qcow, guest, tweak) -> int:
    """A compressed descriptor for `guest` with its (offset, extra sectors) changed by tweak."""
    e = q.l2(guest)
    bits = q["cluster_bits"]
    shift = 62 - (bits - 8)
    offset, sectors = e & ((1 << shift) - 1), (e >> shift) & ((1 << (bits - 8)) - 1)
    offset, sectors = tweak(q, offset, sectors)
    return COMPRESSED | (sectors % (1 << (bits - 8))) << shift | offset % (1 << shift)


DESCRIPTOR_TWEAKS = {
    "sectors+1": lambda q, o, s: (o, s + 1),
    "sectors-1": lambda q, o, s: (o, s - 1),
    "sectors-0": lambda q, o, s: (o, 0),
    "sectors-max": lambda q, o, s: (o, -1),
    "offset+1": lambda q, o, s: (o + 1, s),
    "offset-1": lambda q, o, s: (o - 1, s),
    "offset+512": lambda q, o, s: (o + 512, s),
    "offset-at-eof": lambda q, o, s: (q.size(), s),
    "offset-near-eof": lambda q, o, s: (q.size() - 100, s),
    "offset-past-eof": lambda q, o, s: (q.size() + 0x10000, s),
    "offset-at-data": lambda q, o, s: (0x50000, s),
    "offset-at-header": lambda q, o, s: (0, s),
}


def _flip_stream(where):
    def mutate(q: Qcow):
        offset, length = q.compressed(64 * K)
        pos = offset + where(min(length, q.size() - offset))
        q.put(pos, bytes([q.get(pos, 1)[0] ^ 0x55]))
    return mutate


def _entry_damages() -> list[Damage]:
    out = []
    for image in IMAGES:
        for name, value in L1_VALUES.items():
            out.append(Damage(image, f"l1-{name}", _put64(_l1, value)))
        l2_guests = {"extl2": (0, 64 * K, 256 * K), "chain": (0, 64 * K, 256 * K),
                     "snap": (64 * K, 256 * K), "data": (0, 256 * K),
                     "zstd": (0, 128 * K)}.get(image, (0, 128 * K, 192 * K, 256 * K))
        for guest in l2_guests:
            for name, value in L2_VALUES.items():
                out.append(Damage(image, f"l2@{guest // K}k-{name}", _put64(_l2(guest), value)))
    for image in ("v3", "v2", "zstd"):
        for name, tweak in DESCRIPTOR_TWEAKS.items():
            out.append(Damage(image, f"compressed-{name}", _put64(
                _l2(64 * K), lambda q, e, t=tweak: _compressed(q, 64 * K, t))))
        for name, value in (("copied", lambda q, e: e | COPIED), ("zero-flag", lambda q, e: e | 1),
                            ("reserved-bit61", lambda q, e: e | 1 << 61)):
            out.append(Damage(image, f"compressed-{name}", _put64(_l2(64 * K), value)))
        out.append(Damage(image, "compressed-stream-first-byte", _flip_stream(lambda n: 0)))
        out.append(Damage(image, "compressed-stream-middle", _flip_stream(lambda n: n // 3)))
        out.append(Damage(image, "compressed-stream-last-byte", _flip_stream(lambda n: n - 1)))
    bitmaps = {
        "zero-bits-on-allocated": lambda q, e: e | 0xFFFFFFFF << 32,
        "alloc-all": lambda q, e: 0xFFFFFFFF,
        "none": lambda q, e: 0,
        "zero-all": lambda q, e: 0xFFFFFFFF << 32,
        "alloc-and-zero": lambda q, e: 1 | 1 << 32,
        "last-alloc": lambda q, e: 1 << 31,
    }
    for guest in (0, 64 * K, 256 * K):
        for name, value in bitmaps.items():
            out.append(Damage("extl2", f"bitmap@{guest // K}k-{name}",
                              _put64(_bitmap(guest), value)))
    return out


def _refcount_damages() -> list[Damage]:
    out = []
    reftable = {
        "zero": lambda q, e: 0, "unaligned": lambda q, e: e + 0x200,
        "reserved-bit0": lambda q, e: e | 1, "past-eof": lambda q, e: q.size() + 0x10000,
        "huge": lambda q, e: 1 << 55, "at-l1": lambda q, e: q["l1_table_offset"],
        "at-itself": lambda q, e: q["refcount_table_offset"],
    }
    for image in ("v3", "snap", "data"):
        for name, value in reftable.items():
            out.append(Damage(image, f"reftable-{name}", _put64(_reftable, value)))
        for cluster, what in ((0, "header"), (3, "l1"), (5, "data")):
            for v in (0, 2, 0xFFFF):
                out.append(Damage(image, f"refcount-{what}={v}", _refblock_entry(cluster)(v)))
    return out


# Snapshot table entry 0 of the snap image (qcow2.txt "Snapshot table"): field offsets.
SNAP_FIELDS = {"l1_table_offset": (0, ">Q"), "l1_size": (8, ">I"), "id_str_size": (12, ">H"),
               "name_size": (14, ">H"), "date_sec": (16, ">I"), "vm_state_size": (32, ">I"),
               "extra_data_size": (36, ">I"), "vm_state_size_large": (40, ">Q"),
               "disk_size": (48, ">Q")}
SNAP_VALUES = {
    "l1_table_offset": [0, 0x200, 0x10000, 0x30000, 0x90000, 1 << 40],
    "l1_size": [0, 2, 17, 0x2000000, 0xFFFFFFFF], "id_str_size": [0, 2, 64, 0xFFFF],
    "name_size": [0, 3, 0xFFFF], "date_sec": [0xFFFFFFFF], "vm_state_size": [512],
    "extra_data_size": [0, 8, 15, 17, 1024, 0xFFFFFFFF],
    "vm_state_size_large": [1 << 20, 1 << 63], "disk_size": [0, 512 * K, 2 * M, 1 << 63],
}


def _snap_field(name, value):
    def mutate(q: Qcow):
        rel, fmt = SNAP_FIELDS[name]
        size = struct.calcsize(fmt)
        q.put(q["snapshots_offset"] + rel, (value % (1 << (8 * size))).to_bytes(size, "big"))
    return mutate


def _snap_l1(value):
    def mutate(q: Qcow):
        l1 = struct.unpack(">Q", q.get(q["snapshots_offset"], 8))[0]
        old = struct.unpack(">Q", q.get(l1, 8))[0]
        q.put(l1, struct.pack(">Q", value(q, old) % (1 << 64)))
    return mutate


def _snapshot_damages() -> list[Damage]:
    out = [Damage("snap", f"snapshot-{name}={v:#x}", _snap_field(name, v))
           for name, values in SNAP_VALUES.items() for v in values]
    for name in ("zero", "reserved-bit0", "unaligned", "past-eof", "at-header"):
        out.append(Damage("snap", f"snapshot-l1-{name}", _snap_l1(L1_VALUES[name])))
    return out


TRUNCATIONS = {
    "0": 0, "72": 72, "100": 100, "104": 104, "200": 200, "64k": 64 * K, "reftable+8": 0x10008,
    "refblock+8": 0x20008, "l1+4": 0x30004, "l2+8": 0x40008, "l2+64k-8": 0x50000 - 8,
    "data+1": 0x50001, "data+32k": 0x58000, "last-1": lambda q: q.size() - 1,
    "last-512": lambda q: q.size() - 512, "last-cluster": lambda q: q.size() - q.cluster_size,
    "last-cluster+4k": lambda q: q.size() - q.cluster_size + 4096,
    "grow": lambda q: q.size() + 0x12345,
}


def _truncation_damages() -> list[Damage]:
    return [Damage(image, f"truncate-{name}", _truncate(at))
            for image in IMAGES for name, at in TRUNCATIONS.items()]


def _set_backing(name: bytes):
    def mutate(q: Qcow):
        q.set_backing_name(name)
    return mutate


def _ext_payload(ext_type, payload: bytes):
    def mutate(q: Qcow):
        off, length = q.extension(ext_type)
        q.put(off + 8, payload.ljust(length, b"\0")[:length])
    return mutate


def _chain_damages() -> list[Damage]:
    out = [Damage("chain", f"backing-name-{n.decode()}", _set_backing(n))
           for n in (b"base.qcow", b"./base.qcow2", b"base.qcow2\0")]
    out += [Damage("chain", f"backing-format-{n.decode()}", _ext_payload(0xE2792ACA, n))
            for n in (b"raw", b"qcow", b"qcow2\0x", b"QCOW2")]
    out += [Damage("data", f"data-file-name-{n.decode()}", _ext_payload(0x44415441, n))
            for n in (b"image.dat", b"image.qcow2", b"")]
    # A cluster of the external data file elsewhere than at its guest offset (QEMU: EIO).
    moved = {"moved": lambda q, e: COPIED | 0x50000, "moved-zero": lambda q, e: COPIED | 0x50001,
             "swapped": lambda q, e: COPIED | 0x10000, "at-zero": lambda q, e: COPIED}
    for name, value in moved.items():
        for guest in (0, 64 * K, 256 * K):
            out.append(Damage("data", f"data-l2@{guest // K}k-{name}",
                              _put64(_l2(guest), value)))
    # The base's own entries under the overlay's cluster at 64k (written whole) and elsewhere.
    for name in ("reserved-bit1", "past-eof", "unaligned", "compressed-flag", "zero-flag"):
        for guest in (0, 64 * K):
            out.append(Damage("chain-base", f"base-l2@{guest // K}k-{name}",
                              _put64(_l2(guest), L2_VALUES[name])))
    out.append(Damage("chain-base", "base-truncate-last-cluster", _cut_last_cluster))
    return out


def _copy64(src, dst):
    """Store the 8 bytes at src(q) at dst(q) too."""
    def mutate(q: Qcow):
        q.put(dst(q), q.get(src(q), 8))
    return mutate


def _share_damages() -> list[Damage]:
    """One host cluster or one L2 table named twice in one L1 view (README: refused by
    convert; two L1 entries naming one L2 table: refused at open)."""
    out = []
    data = {"v3": (0, 192 * K), "v2": (0, 192 * K), "extl2": (0, 64 * K), "snap": (0, 64 * K),
            "wide": (0, 4 * M + 4 * K)}
    for image, (src, dst) in data.items():
        out.append(Damage(image, f"l2@{dst // K}k-shares-data-of-{src // K}k",
                          _copy64(_l2(src), _l2(dst))))
    out.append(Damage("v3", "l2@128k-shares-data-of-0k", _copy64(_l2(0), _l2(128 * K))))
    out.append(Damage("snap", "l2@0k-shares-data-of-64k", _copy64(_l2(64 * K), _l2(0))))
    streams = {"v3": 64 * K, "v2": 64 * K, "zstd": 64 * K, "wide": 2 * M}
    for image, src in streams.items():
        out.append(Damage(image, "compressed-stream-shared-by-0k",
                          _copy64(_l2(src), _l2(0))))
    out.append(Damage("v3", "compressed-stream-shared-by-192k",
                      _copy64(_l2(64 * K), _l2(192 * K))))
    for src, dst in ((0, 1), (2, 3), (1, 2)):
        out.append(Damage("wide", f"l1-{dst}-shares-l2-of-{src}",
                          _copy64(lambda q, i=src: q.l1_pos(i), lambda q, i=dst: q.l1_pos(i))))
    out.append(Damage("wide", "l1-2-shares-l2-of-0-no-copied", _put64(
        lambda q: q.l1_pos(2), lambda q, e: q.l1(0) & ~COPIED)))
    return out


IMAGES = ("v3", "zstd", "v2", "extl2", "chain", "snap", "data")


def _all_damages() -> list[Damage]:
    rng = random.Random(23)
    out = (_header_damages(rng) + _entry_damages() + _refcount_damages() + _snapshot_damages()
           + _truncation_damages() + _chain_damages() + _share_damages())
    return out


def kind(d: Damage) -> str:
    """What a damage does, whatever the image, guest offset and value: `l2-zero`,
    `field-size`, `truncate-l1+4`, ..."""
    return re.sub(r"@\d+k", "", d.id).split("=")[0]


def _extra_subset(damages: list[Damage], every: int = 8) -> set[Damage]:
    """Every `every`-th damage, and the first of each kind and of each image not yet among
    them: the damages the EXTRA commands run on (the whole list would take about 90 s)."""
    chosen = set(damages[::every])
    kinds = {kind(d) for d in chosen}
    images = {d.image for d in chosen}
    for d in damages:
        if kind(d) not in kinds or d.image not in images:
            chosen.add(d)
            kinds.add(kind(d))
            images.add(d.image)
    return chosen


DAMAGES = _all_damages()
EXTRA_DAMAGES = _extra_subset(DAMAGES)
SWEPT = [d for d in DAMAGES if d in _extra_subset(DAMAGES, every=2) | EXTRA_DAMAGES]
IDS = [f"{d.image}:{d.id}" for d in DAMAGES]
assert len(set(IDS)) == len(IDS), [i for i in IDS if IDS.count(i) > 1]

# --------------------------------------------------------------------------------------------
# Running both tools.


@dataclass
class Outcome:
    status: int
    out: bytes | str
    err: str
    exc: BaseException | None = None


def run_qemu(argv: list[str], cwd: Path) -> Outcome:
    p = subprocess.run(["qemu-img", *argv], cwd=cwd, capture_output=True, timeout=60)
    return Outcome(p.returncode, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"))


def run_qcowfast(argv: list[str], cwd: Path) -> Outcome:
    """qcowfast's command line in this process; `exc` is the exception its error line names."""
    from qcowfast import cli
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    caught: list[BaseException] = []
    error_text, check_failed = cli.error_text, cli._check_failed

    def spy_text(exc, images=()):
        caught.append(exc)
        return error_text(exc, images)

    def spy_check(exc, args):
        caught.append(exc)
        return check_failed(exc, args)

    old = os.getcwd()
    cli.error_text, cli._check_failed = spy_text, spy_check
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
    finally:
        os.chdir(old)
        cli.error_text, cli._check_failed = error_text, check_failed
    out.flush()
    err.flush()
    return Outcome(status, out.buffer.getvalue().decode(errors="replace"),
                   err.buffer.getvalue().decode(errors="replace"), caught[0] if caught else None)


def virtual_size(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(32)
    return struct.unpack_from(">Q", head, 24)[0] if len(head) >= 32 else 0


def outcomes(path: Path, command: str, runner) -> Outcome:
    """One command of one tool on `path` (convert: `out` is the raw bytes written)."""
    cwd = path.parent
    if command == "convert":
        dst = cwd.parent / f"out-{runner.__name__}.raw"
        o = runner(["convert", "-O", "raw", str(path), str(dst)], cwd)
        if o.status == 0:
            o.out = dst.read_bytes()
        if dst.exists():
            dst.unlink()
        return o
    if command == "check":
        return runner(["check", "--output=json", str(path)], cwd)
    return runner([command, "--output=json", str(path)], cwd)


# The commands run beside the four above (on EXTRA_DAMAGES): argv after the damaged image's
# name is put in place of IMG, ORIG is the pristine image it was copied from.
EXTRA = {
    "compare-original": ["compare", "IMG", "ORIG"],
    "compare-itself": ["compare", "-p", "IMG", "IMG"],           # (-p: img_compare's steps)
    "compare-strict": ["compare", "-s", "-p", "IMG", "ORIG"],
    "measure-qcow2": ["measure", "--output=json", "-O", "qcow2", "IMG"],
    "measure-raw": ["measure", "--output=json", "-O", "raw", "IMG"],
    "snapshot": ["snapshot", "-l", "IMG"],
    "info-chain": ["info", "--backing-chain", "--output=json", "IMG"],
}
JSON_COMMANDS = ("map", "info", "measure-qcow2", "measure-raw", "info-chain")


def extra_outcome(path: Path, original: Path, command: str, runner) -> Outcome:
    names = {"IMG": str(path), "ORIG": str(original)}
    return runner([names.get(a, a) for a in EXTRA[command]], path.parent)


# --------------------------------------------------------------------------------------------
# The README's refusals (Differences from qemu-img).


def documented_refusal(command: str, exc: BaseException | None) -> str | None:
    """The README rule under which qcowfast refuses what qemu-img reads, or None."""
    if isinstance(exc, CompareError) and exc.__cause__ is not None:
        exc = exc.__cause__                 # (compare's exit 3 or 4, for the error it met)
    text = str(exc)
    if isinstance(exc, TruncatedImage) and "past the end of" in text:
        # map treats a data cluster starting before the end as qemu-img does.
        if (command == "map" or command.startswith("compare")) and \
                "runs past the end of the file" in text and "data at" in text:
            return None
        if command.startswith("compare") and "data cluster for guest offset" in text:
            return None                 # (its missing part reads as zeros, as in qemu-img)
        return "reads past the end of the file are refused"
    if type(exc) is CorruptImage and ("reserved bits are set" in text
                                      or "compressed cluster with the COPIED flag" in text):
        return "reserved bits / compressed COPIED"
    if type(exc) is CorruptImage and command == "convert" and any(
            f" share the {what} at host offset " in text
            for what in ("data cluster", "compressed cluster stream")):
        return "a host cluster that two guest clusters share"
    if type(exc) is CorruptImage and " both point to the L2 table at " in text:
        return "two L1 entries naming the same L2 table"
    if isinstance(exc, UnsafePathError):
        return "files named inside an image"
    if isinstance(exc, BackingChainError) and "loops" in text:
        return "backing file is the image itself"
    return None


def _succeeded(command: str, o: Outcome) -> bool:
    """compare's verdicts 0 (identical) and 1 (different) are successes; 2-4 are failures."""
    return o.status in ((0, 1) if command.startswith("compare") else (0,))


def classify(command: str, want: Outcome, got: Outcome) -> str | None:
    """None when the tools agree as the README allows, else what is wrong."""
    if _succeeded(command, want) and _succeeded(command, got):
        if command == "convert":
            if want.out != got.out:
                return f"convert: different bytes ({len(want.out)} vs {len(got.out)})"
            return None
        same = json.loads(want.out) == json.loads(got.out) if command in JSON_COMMANDS else \
            want.out == got.out
        if not same or want.status != got.status:
            return (f"{command}: output differs\n  qemu-img ({want.status}): {want.out}\n"
                    f"  qcowfast ({got.status}): {got.out}")
        return None
    if _succeeded(command, want):
        if documented_refusal(command, got.exc):
            return None
        return (f"{command}: qcowfast refuses ({type(got.exc).__name__}: {got.exc}; "
                f"{got.err.strip()}), qemu-img reads it")
    if _succeeded(command, got):
        return f"{command}: qemu-img refuses ({want.err.strip()}), qcowfast reads it"
    if want.status != got.status and not _refused_first(command, want, got):
        return f"{command}: both fail, status {want.status} vs {got.status}"
    return None


def _refused_first(command: str, want: Outcome, got: Outcome) -> bool:
    """compare: qcowfast refused an L2 table that runs past the end of the file (README), so
    its allocation pass failed (exit 3) where qemu-img's, which reads the table's part
    before the end, passed and a read failed later (exit 4)."""
    cause = getattr(got.exc, "__cause__", None)
    return command.startswith("compare") and (want.status, got.status) == (4, 3) and \
        isinstance(cause, TruncatedImage) and "L2 table at" in str(cause) and \
        documented_refusal(command, got.exc) is not None


def classify_check(want: Outcome, got: Outcome) -> str | None:
    if want.status == got.status:
        return None
    return (f"check: status {want.status} vs {got.status}\n  qemu-img: {want.err.strip()} "
            f"{want.out.strip()}\n  qcowfast: {got.err.strip()} {got.out.strip()}")


# --------------------------------------------------------------------------------------------
# The sweep.


def _build_wide(root: Path) -> Path:
    """wide: c4k, 8 MiB, so four L1 entries (2 MiB each): data @0 (8 KiB), compressed @2M,
    data @4M+4k; L1 entry 3 is unallocated."""
    d = root / "wide"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "image.qcow2", "8M", cwd=d)
    qemu_io("image.qcow2", "write -P 0x5a 0 8k", "write -c -P 0x11 2M 4k",
            "write -P 0x22 4100k 4k", cwd=d)
    return d / "image.qcow2"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    paths = _build(root)
    paths["chain-base"] = paths["chain"]
    paths["wide"] = _build_wide(root)
    return paths


def damaged(pristine, d: Damage, tmp: Path) -> Path:
    """A copy of `d.image`'s directory in `tmp`, damaged; returns the top image's path."""
    src = pristine[d.image]
    work = tmp / "img"
    shutil.copytree(src.parent, work)
    d.mutate(Qcow(work / ("base.qcow2" if d.image == "chain-base" else src.name)))
    return work / src.name


def disagreements(path: Path) -> list[str]:
    problems = []
    big = virtual_size(path) > CONVERT_LIMIT
    for command in COMMANDS + ("check",):
        if command == "convert" and big:
            continue
        want = outcomes(path, command, run_qemu)
        got = outcomes(path, command, run_qcowfast)
        problem = classify_check(want, got) if command == "check" else \
            classify(command, want, got)
        if problem:
            problems.append(problem)
    return problems


def extra_disagreements(path: Path, original: Path) -> list[str]:
    problems = []
    for command in EXTRA:
        want = extra_outcome(path, original, command, run_qemu)
        got = extra_outcome(path, original, command, run_qcowfast)
        problem = classify(command, want, got)
        if problem:
            problems.append(problem)
    return problems


@pytest.mark.parametrize("d", SWEPT, ids=[f"{d.image}:{d.id}" for d in SWEPT])
def test_damage_parity(pristine, tmp_path, d):
    path = damaged(pristine, d, tmp_path)
    problems = disagreements(path)
    if d in EXTRA_DAMAGES:
        problems += extra_disagreements(path, pristine[d.image])
    assert not problems, "\n".join(problems)
