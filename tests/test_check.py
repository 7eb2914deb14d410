"""``qcowfast check`` against ``qemu-img check``, through a real subprocess.

Oracle: ``qemu-img check --output=json`` (its JSON, its exit code, its human summary) on the same
file. Clean images come from the session catalogue and from qemu-img here (every refcount width,
bitmaps with data, an external data file, a lazy-refcounts image left dirty by a killed qemu-io);
damaged ones are copies patched by ``Qcow2File`` below, a small transcription of
docs/interop/qcow2.txt written for these tests (never qcowfast's code): leaked clusters, wrong
refcounts of every width, an L2 entry pointing into the L1 table, unaligned and out-of-file
offsets, a compressed stream past the end of the file, broken refcount table entries, snapshot
table problems. A seeded mutation sweep compares many more damaged images with qemu-img.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qcowfast
from common import QEMU_IMG, progress_values, qemu_img, qemu_io, run_cli as cli
from conftest import IMAGE_IDS, mixed_content

K = 1024
M = 1024 * 1024
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED, COMPRESSED = 1 << 63, 1 << 62


def qemu_check(path, *args, cwd=None) -> subprocess.CompletedProcess:
    """``qemu-img check`` (which exits non-zero for damaged images, so no raising here)."""
    return subprocess.run([QEMU_IMG, "check", *map(str, args), str(path)], capture_output=True,
                          text=True, check=False, cwd=cwd)


def both_json(path):
    """((our exit code, our JSON or None), (qemu's exit code, its JSON or None)).

    Both run in the image's directory: QEMU 7.2 opens a relative external data file name
    against its working directory.
    """
    def parse(proc):
        return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)
    path = Path(path)
    ours = cli("check", "--output=json", path.name, cwd=path.parent)
    assert "Traceback" not in ours.stderr, ours.stderr
    return parse(ours), parse(qemu_check(path.name, "--output=json", cwd=path.parent))


# --------------------------------------------------------------------------------------------
# A transcription of the format, for making damaged images


class Qcow2File:
    """Header fields and table entries of an image file, read and patched with struct."""

    def __init__(self, path):
        self.path = Path(path)
        h = self.path.read_bytes()[:112]
        self.version = struct.unpack_from(">I", h, 4)[0]
        self.cluster_bits = struct.unpack_from(">I", h, 20)[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size, self.l1_offset = struct.unpack_from(">IQ", h, 36)
        self.reftable_offset, self.reftable_clusters = struct.unpack_from(">QI", h, 48)
        self.nb_snapshots, self.snapshots_offset = struct.unpack_from(">IQ", h, 60)
        self.incompatible = struct.unpack_from(">Q", h, 72)[0] if self.version == 3 else 0
        self.refcount_order = struct.unpack_from(">I", h, 96)[0] if self.version == 3 else 4
        self.l2_entry = 16 if self.incompatible & 16 else 8

    def u64(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return struct.unpack(">Q", f.read(8))[0]

    def put(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def put_u64(self, offset: int, value: int) -> None:
        self.put(offset, struct.pack(">Q", value))

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def l2_entries(self):
        """(file offset of the entry, entry) of every non-zero active L2 entry."""
        out = []
        for i in range(self.l1_size):
            l2 = self.u64(self.l1_offset + 8 * i) & OFFSET_MASK
            if not l2:
                continue
            with open(self.path, "rb") as f:
                f.seek(l2)
                table = f.read(self.cs)
            for j in range(0, self.cs, self.l2_entry):
                entry = struct.unpack_from(">Q", table, j)[0]
                if entry:
                    out.append((l2 + j, entry))
        return out

    def data_entries(self):
        return [(at, e) for at, e in self.l2_entries()
                if not e & COMPRESSED and e & OFFSET_MASK]

    # Refcount block entries: refcount_bits wide; below 8 bits, bit 0 is the least significant
    # bit of the byte (qcow2.txt "Refcount blocks"); 8 bits and more are big-endian integers.
    def _refcount_slot(self, cluster: int):
        bits = 1 << self.refcount_order
        per_block = self.cs * 8 // bits
        block = self.u64(self.reftable_offset + 8 * (cluster // per_block)) & ~0x1FF
        assert block, "cluster not covered by a refcount block"
        return block, cluster % per_block, bits

    def refcount(self, cluster: int) -> int:
        block, index, bits = self._refcount_slot(cluster)
        with open(self.path, "rb") as f:
            f.seek(block + index * bits // 8)
            raw = f.read(max(1, bits // 8))
        if bits < 8:
            return raw[0] >> (index * bits % 8) & ((1 << bits) - 1)
        return int.from_bytes(raw, "big")

    def set_refcount(self, cluster: int, value: int) -> None:
        block, index, bits = self._refcount_slot(cluster)
        at = block + index * bits // 8
        if bits < 8:
            with open(self.path, "rb") as f:
                f.seek(at)
                byte = f.read(1)[0]
            shift = index * bits % 8
            byte = byte & ~(((1 << bits) - 1) << shift) | (value << shift)
            self.put(at, bytes([byte]))
        else:
            self.put(at, value.to_bytes(bits // 8, "big"))

    def append_clusters(self, n: int) -> list[int]:
        """Grow the file by n clusters (after rounding it to whole clusters); their indices."""
        end = -(-self.size // self.cs) * self.cs
        os.truncate(self.path, end + n * self.cs)
        return [end // self.cs + k for k in range(n)]


# --------------------------------------------------------------------------------------------
# Clean images: the catalogue


def _collected_ids(request, name: str) -> list[str]:
    ids = {item.callspec.params["image"] for item in request.session.items
           if getattr(item, "originalname", None) == name and hasattr(item, "callspec")}
    return [i for i in IMAGE_IDS if i in ids]


@pytest.fixture(scope="module")
def catalogue_checks(request, images) -> dict:
    ids = _collected_ids(request, "test_catalogue_image_checks_like_qemu")
    paths = {i: images.get(i).path for i in ids}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(ids, pool.map(lambda i: both_json(paths[i]), ids)))


def test_catalogue_image_checks_like_qemu(image, catalogue_checks):
    ours, qemu = catalogue_checks[image.id]
    assert ours == qemu
    assert ours[0] == 0


# --------------------------------------------------------------------------------------------
# Images made and damaged here


def _content(seed: int, size: int, cluster: int) -> bytes:
    return mixed_content(random.Random(seed), size, cluster)


def _converted(d: Path, name: str, opts: str, *, compress=False, size=2 * M) -> Qcow2File:
    src = d / f"{name}.src"
    src.write_bytes(_content(len(name), size, 4 * K))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", opts, *(["-c"] if compress else []),
             src, d / name)
    return Qcow2File(d / name)


def case_leaked(d):
    q = _converted(d, "leak.qcow2", "cluster_size=65536")
    for c in q.append_clusters(3):
        q.set_refcount(c, 1)
    return q.path, 3, lambda r: r["leaks"] == 3 and "corruptions" not in r


def case_refcount_zero(d):
    q = _converted(d, "zero.qcow2", "cluster_size=4096")
    at, entry = q.data_entries()[5]
    q.set_refcount((entry & OFFSET_MASK) >> q.cluster_bits, 0)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_refcount_too_high(d):
    q = _converted(d, "high.qcow2", "cluster_size=4096")
    at, entry = q.data_entries()[3]
    q.set_refcount((entry & OFFSET_MASK) >> q.cluster_bits, 2)
    # a leak, and a COPIED flag that no longer matches the refcount
    return q.path, 2, lambda r: r["leaks"] == 1 and r["corruptions"] == 1


def case_l2_into_l1(d):
    q = _converted(d, "l2l1.qcow2", "cluster_size=65536")
    at, entry = q.data_entries()[2]
    q.put_u64(at, COPIED | q.l1_offset)
    return q.path, 2, lambda r: r["corruptions"] >= 1 and r["leaks"] == 1


def case_l2_unaligned(d):
    q = _converted(d, "unal.qcow2", "cluster_size=65536")
    at, entry = q.data_entries()[1]
    q.put_u64(at, entry + 512)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_l2_past_eof(d):
    q = _converted(d, "l2eof.qcow2", "cluster_size=4096")
    at, entry = q.data_entries()[0]
    q.put_u64(at, COPIED | (q.size + 100 * q.cs))
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_l1_past_eof(d):
    q = _converted(d, "l1eof.qcow2", "cluster_size=4096")
    q.put_u64(q.l1_offset, COPIED | (q.size + 7 * q.cs))
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_compressed_past_eof(d):
    q = _converted(d, "ceof.qcow2", "cluster_size=65536", compress=True)
    comp = [(at, e) for at, e in q.l2_entries() if e & COMPRESSED]
    at, entry = comp[len(comp) // 2]
    x = 62 - (q.cluster_bits - 8)            # descriptor: offset bits below x, sectors above
    sectors = entry & ~((1 << x) - 1)
    q.put_u64(at, sectors | (q.size + 3 * q.cs + 700))
    return q.path, 2, lambda r: r["corruptions"] >= 1 and r["compressed-clusters"] >= 1


def case_compressed_overhang(d):
    """A compressed stream may end less than a cluster past the end of the file: no error."""
    q = _converted(d, "chang.qcow2", "cluster_size=65536", compress=True)
    comp = [(at, e) for at, e in q.l2_entries() if e & COMPRESSED]
    at, entry = max(comp, key=lambda ae: ae[1] & ((1 << (62 - (q.cluster_bits - 8))) - 1))
    os.truncate(q.path, (entry & ((1 << (62 - (q.cluster_bits - 8))) - 1)) + 100)
    return q.path, None, lambda r: True


def case_reftable_reserved_bit(d):
    q = _converted(d, "rtres.qcow2", "cluster_size=4096")
    q.put_u64(q.reftable_offset, q.u64(q.reftable_offset) | 1)
    return q.path, 2, lambda r: r["corruptions"] == 1 and r["leaks"] == 1


def case_refblock_unaligned(d):
    q = _converted(d, "rbunal.qcow2", "cluster_size=4096")
    q.put_u64(q.reftable_offset, q.u64(q.reftable_offset) + 1024)
    return q.path, 1, lambda r: r["check-errors"] > 0


def case_refblock_outside(d):
    q = _converted(d, "rbout.qcow2", "cluster_size=4096")
    q.put_u64(q.reftable_offset + 8, q.size + 50 * q.cs)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_snapshot_shared_refcount(d):
    img = d / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, 2 * M)
    qemu_io(img, "write -P 0x41 0 1M")
    qemu_img("snapshot", "-c", "one", img)
    qemu_io(img, "write -P 0x42 0 64k")
    q = Qcow2File(img)
    at, entry = q.data_entries()[-1]                 # still shared with the snapshot
    cluster = (entry & OFFSET_MASK) >> q.cluster_bits
    assert q.refcount(cluster) == 2
    q.set_refcount(cluster, 1)
    return img, 2, lambda r: r["corruptions"] >= 1


def case_snapshot_incomplete(d):
    """A v3 snapshot entry without the 16 bytes of extra data every v3 entry must have."""
    img = d / "snapinc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, M)
    qemu_io(img, "write -P 0x41 0 64k")
    qemu_img("snapshot", "-c", "one", img)
    q = Qcow2File(img)
    entry = q.snapshots_offset
    with open(img, "rb") as f:
        f.seek(entry)
        head = bytearray(f.read(40))
        extra_len = struct.unpack_from(">I", head, 36)[0]
        ids = struct.unpack_from(">HH", head, 12)
        f.seek(entry + 40 + extra_len)
        names = f.read(sum(ids))
    struct.pack_into(">I", head, 36, 8)
    q.put(entry, bytes(head) + bytes(8) + names)
    return img, 2, lambda r: r["corruptions"] == 1


def case_bitmap_data_refcount(d):
    img = d / "bitmap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, 4 * M)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "-g", "4k", img, "b1")
    qemu_io(img, "write -P 1 0 1M", "write -P 2 3M 64k")
    q = Qcow2File(img)
    data = {(e & OFFSET_MASK) >> q.cluster_bits for _, e in q.data_entries()}
    meta = {0, q.l1_offset >> q.cluster_bits, q.reftable_offset >> q.cluster_bits}
    meta |= {(e & OFFSET_MASK) >> q.cluster_bits for e in
             (q.u64(q.l1_offset + 8 * i) for i in range(q.l1_size)) if e}
    meta |= {q.u64(q.reftable_offset) >> q.cluster_bits}
    used = [c for c in range(q.size // q.cs) if q.refcount(c) and c not in data | meta]
    assert len(used) >= 3                 # bitmap directory, tables and bitmap data
    q.set_refcount(used[-1], 0)
    return img, 2, lambda r: r["corruptions"] >= 1


def case_data_file(d):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "df.qcow2", 2 * M, cwd=d)
    qemu_io("df.qcow2", "write -P 7 0 300k", "write -P 8 1M 64k", cwd=d)
    return d / "df.qcow2", 0, lambda r: r["allocated-clusters"] == 6


def case_killed_lazy_refcounts(d):
    """qemu-io killed after writes to a lazy-refcounts image: dirty, refcounts never written."""
    img = d / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, 4 * M)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 2M 512k",
                    "-c", "sigraise 9", str(img)], capture_output=True, check=False)
    return img, 2, lambda r: r["corruptions"] >= 1


def case_truncated(d):
    q = _converted(d, "trunc.qcow2", "cluster_size=4096")
    os.truncate(q.path, q.size // 2 + 1000)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_metadata_prealloc_32g(d):
    """32 GiB with every L2 table and cluster allocated (a sparse file): one L2 table each
    for 256 L1 entries, 524288 allocated clusters."""
    img = d / "prealloc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, 32 * 1024 * M)
    return img, 0, lambda r: r["allocated-clusters"] == 524288


# Many snapshot L1 tables and bitmap tables, written with struct into the snapshot table and
# the bitmap directory (docs/interop/qcow2.txt "Snapshot table", "Bitmap directory").


def _append(q: Qcow2File, data: bytes) -> int:
    """Write `data` at the next cluster boundary past the end of the file; its offset."""
    at = -(-q.size // q.cs) * q.cs
    q.put(at, data)
    os.truncate(q.path, -(-(at + len(data)) // q.cs) * q.cs)
    return at


def _snapshot_table(q: Qcow2File, tables) -> None:
    """Replace the snapshot table by one entry per (l1_table_offset, l1_size) in `tables`."""
    out = b""
    for i, (offset, size) in enumerate(tables):
        sid, name = str(i + 1).encode(), f"s{i}".encode()
        e = struct.pack(">QIHHIIQII", offset, size, len(sid), len(name), 0, 0, 0, 0, 16)
        e += struct.pack(">QQ", 0, q.l1_size << (2 * q.cluster_bits - 3)) + sid + name
        out += e + bytes(-len(e) % 8)
    at = _append(q, out)
    q.put(60, struct.pack(">IQ", len(tables), at))


def case_snapshots_l1_past_eof(d):
    """60 snapshots whose 32 MiB L1 tables lie past the end of the file (reported, skipped)."""
    q = _converted(d, "snapeof.qcow2", "cluster_size=65536")
    far = (q.size // q.cs + 64) * q.cs
    _snapshot_table(q, [(far + i * 32 * M, 4 * M) for i in range(60)])
    return q.path, 2, lambda r: r["corruptions"] >= 60


def case_snapshots_share_l1(d):
    """40 snapshots naming the active L1 table, 20 another copy of it (counted 40 + 20 times)."""
    q = _converted(d, "snapshare.qcow2", "cluster_size=4096")
    with open(q.path, "rb") as f:
        f.seek(q.l1_offset)
        copy = _append(q, f.read(q.l1_size * 8))
    _snapshot_table(q, [(q.l1_offset, q.l1_size)] * 40 + [(copy, q.l1_size)] * 20)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def _bitmap_directory(q: Qcow2File, entries) -> None:
    """Replace the bitmap directory by (table_offset, table_size, flags) entries."""
    out = b""
    for i, (offset, size, flags) in enumerate(entries):
        name = f"b{i}".encode()
        e = struct.pack(">QIIBBHI", offset, size, flags, 1, 16, len(name), 0) + name
        out += e + bytes(-len(e) % 8)
    at = _append(q, out)
    with open(q.path, "rb") as f:
        head = f.read(q.cs)
    pos = struct.unpack_from(">I", head, 100)[0] if q.version == 3 else 72
    while True:
        magic, length = struct.unpack_from(">II", head, pos)
        assert magic, "no bitmaps extension"
        if magic == 0x23852875:
            q.put(pos + 8, struct.pack(">IIQQ", len(entries), 0, len(out), at))
            return
        pos += 8 + -(-length // 8) * 8


def _bitmap_image(d, name):
    img = d / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, 64 * M)
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write -P 2 1M 64k")
    return Qcow2File(img)


def case_bitmaps_past_eof(d):
    """300 in-use bitmaps whose 8 MiB tables lie past the end of the file."""
    q = _bitmap_image(d, "bmeof.qcow2")
    _bitmap_directory(q, [((1 << 30) + i * 8 * M, M, 1) for i in range(300)])
    return q.path, 2, lambda r: r["corruptions"] >= 300


def case_bitmaps_share_table(d):
    """200 in-use bitmaps sharing the table qemu wrote for b0 (counted 200 times)."""
    q = _bitmap_image(d, "bmshare.qcow2")
    with open(q.path, "rb") as f:
        data = f.read()
    pos = struct.unpack_from(">I", data, 100)[0]
    while struct.unpack_from(">I", data, pos)[0] != 0x23852875:     # the bitmaps extension
        pos += 8 + -(-struct.unpack_from(">I", data, pos + 4)[0] // 8) * 8
    directory = struct.unpack_from(">Q", data, pos + 24)[0]
    offset, size = struct.unpack_from(">QI", data, directory)
    assert offset and size
    _bitmap_directory(q, [(offset, size, 1)] * 200)
    return q.path, 2, lambda r: r["corruptions"] >= 1


def case_sparse_64g_file(d):
    """512-byte clusters and a 64 GiB sparse file: 2**27 clusters, a few thousand in use."""
    img = d / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, 64 * M)
    qemu_io(img, "write -P 1 0 1M")
    os.truncate(img, 64 * 1024 * M)
    return img, 0, lambda r: r["allocated-clusters"] == 2048


def case_l1_names_one_l2_131072_times(d):
    """Every one of 131,072 L1 entries names the same L2 table: its clusters are counted
    131,072 times, past what 16 bits hold (the per-cluster counts widen)."""
    img = d / "wide.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, 4 * 1024 * M)
    qemu_io(img, "write -P 3 0 1k")
    q = Qcow2File(img)
    assert q.l1_size == 131072
    q.put(q.l1_offset, struct.pack(">Q", q.u64(q.l1_offset)) * q.l1_size)
    return img, 2, lambda r: r["corruptions"] >= 131072


def _width_case(bits):
    def case(d):
        q = _converted(d, f"rc{bits}.qcow2", f"cluster_size=4096,refcount_bits={bits}",
                       size=M)
        assert q.refcount_order == bits.bit_length() - 1
        new = q.append_clusters(2)
        q.set_refcount(new[0], 1)                     # a leak
        at, entry = q.data_entries()[2]
        cluster = (entry & OFFSET_MASK) >> q.cluster_bits
        assert q.refcount(cluster) == 1
        q.set_refcount(cluster, 0)          # a corruption; COPIED no longer matches: another
        return q.path, 2, lambda r: r["leaks"] == 1 and r["corruptions"] == 2
    return case


CASES = {
    "leaked": case_leaked,
    "refcount-zero": case_refcount_zero,
    "refcount-too-high": case_refcount_too_high,
    "l2-into-l1": case_l2_into_l1,
    "l2-unaligned": case_l2_unaligned,
    "l2-past-eof": case_l2_past_eof,
    "l1-past-eof": case_l1_past_eof,
    "compressed-past-eof": case_compressed_past_eof,
    "compressed-overhang": case_compressed_overhang,
    "reftable-reserved-bit": case_reftable_reserved_bit,
    "refblock-unaligned": case_refblock_unaligned,
    "refblock-outside": case_refblock_outside,
    "snapshot-shared-refcount": case_snapshot_shared_refcount,
    "snapshot-incomplete": case_snapshot_incomplete,
    "bitmap-data-refcount": case_bitmap_data_refcount,
    "data-file": case_data_file,
    "killed-lazy-refcounts": case_killed_lazy_refcounts,
    "truncated": case_truncated,
    "prealloc-32g": case_metadata_prealloc_32g,
    "snapshots-l1-past-eof": case_snapshots_l1_past_eof,
    "snapshots-share-l1": case_snapshots_share_l1,
    "bitmaps-past-eof": case_bitmaps_past_eof,
    "bitmaps-share-table": case_bitmaps_share_table,
    "sparse-64g-file": case_sparse_64g_file,
    "l1-names-one-l2-131072-times": case_l1_names_one_l2_131072_times,
    **{f"refcount-bits-{b}": _width_case(b) for b in (1, 2, 4, 8, 16, 32, 64)},
}


@pytest.fixture(scope="module")
def damaged(request, tmp_path_factory) -> dict:
    """Build the cases the session will run, then check them all (a few at a time)."""
    names = {item.callspec.params["case"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_damaged_image_checks_like_qemu"}
    if any(getattr(item, "originalname", None) == "test_damaged_images_check_alike_with_"
           "either_store" for item in request.session.items):
        names = set(CASES)
    root = tmp_path_factory.mktemp("check")
    built = {}
    for name in CASES:
        if name in names:
            d = root / name
            d.mkdir()
            built[name] = CASES[name](d)

    def job(name):
        path, code, predicate = built[name]
        ours, qemu = both_json(path)
        return path, code, predicate, ours, qemu

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(built, pool.map(job, built)))


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_image_checks_like_qemu(case, damaged):
    path, code, predicate, ours, qemu = damaged[case]
    assert ours == qemu
    if code is not None:
        assert ours[0] == code
    assert predicate(ours[1])


@pytest.mark.parametrize("store", ["per-cluster", "referenced-only"])
def test_damaged_images_check_alike_with_either_store(store, damaged, monkeypatch):
    """Computed refcounts are kept per cluster of the file, or for a file too large for that
    only per referenced cluster: both stores give qemu-img's report for every damaged image."""
    check_module = importlib.import_module("qcowfast.check")   # qcowfast.check: the function
    if store == "referenced-only":
        monkeypatch.setattr(check_module, "DENSE_MAX_BYTES", 0)
    assert set(damaged) == set(CASES)
    kinds = set()
    real = check_module._computed_for
    monkeypatch.setattr(check_module, "_computed_for",
                        lambda n: kinds.add(type(r := real(n)).__name__) or r)
    for case, (path, code, predicate, ours, qemu) in damaged.items():
        monkeypatch.chdir(path.parent)                 # (qemu-img ran there, on the name)
        try:
            result = qcowfast.check(path.name)
        except qcowfast.QcowError:
            assert qemu[0] == 1 and qemu[1] is None, case
            continue
        assert (result.exit_code, result.to_json()) == qemu, case
    # (The 64 GiB sparse file of 512-byte clusters takes the referenced-only store anyway.)
    assert kinds == ({"_DenseComputed", "_Computed"} if store == "per-cluster" else {"_Computed"})


def test_human_report_and_messages(damaged):
    for case in ("leaked", "l2-into-l1", "compressed-past-eof", "refcount-bits-4"):
        path = damaged[case][0]
        ours, qemu = cli("check", path), qemu_check(path)
        assert ours.stdout == qemu.stdout
        assert ours.returncode == qemu.returncode
    # qemu-img's problem lines, and the overlap qcowfast names: the L1 table's cluster is
    # also used as a data cluster.
    ours = cli("check", damaged["l2-into-l1"][0])
    assert "metadata overlap" in ours.stderr and "an L1 table" in ours.stderr
    assert "ERROR cluster" in ours.stderr and "Leaked cluster" in ours.stderr
    result = qcowfast.check(damaged["l2-into-l1"][0])
    q = Qcow2File(damaged["l2-into-l1"][0])
    assert [(o.cluster, o.first, o.second) for o in result.overlaps] == [
        (q.l1_offset >> q.cluster_bits, "an L1 table", "a data cluster")]
    assert result.exit_code == 2
    ours = cli("check", damaged["compressed-past-eof"][0])
    assert "exceeding the end of the file" in ours.stderr


def test_cli_edges(damaged, tmp_path):
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(4096))
    proc = cli("check", raw)
    assert proc.returncode == 63 == qemu_check(raw).returncode
    proc = cli("check", tmp_path / "missing.qcow2")
    assert proc.returncode == 1 and proc.stderr.startswith("qcowfast: ")
    assert cli("check", "--no-such-option", raw).returncode == 1   # never 2 (= corruptions)
    proc = cli("check", "-q", damaged["leaked"][0])
    assert proc.returncode == 3 and proc.stdout == ""
    proc = cli("check", "-p", damaged["prealloc-32g"][0], text=False)
    assert proc.returncode == 0
    progress_values(proc.stderr)                 # on stderr: stdout is the report (or JSON)
    assert proc.stdout.decode() == cli("check", damaged["prealloc-32g"][0]).stdout
    proc = cli("check", "-T", "none", "--object", "secret,id=s0,data=x",
               damaged["leaked"][0])
    assert proc.returncode == 3 == qemu_check(damaged["leaked"][0]).returncode
    for repair in ("leaks", "all"):                 # qcowfast never writes: -r is refused
        proc = cli("check", "-r", repair, damaged["leaked"][0])
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert f"-r {repair}" in proc.stderr and "does not repair" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    header_only = tmp_path / "header.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", header_only, M)
    header_only.write_bytes(header_only.read_bytes()[:60])
    for fmt in ([], ["-f", "qcow2"]):            # a version 3 header cut short: qcow2, broken
        proc = cli("check", *fmt, header_only)
        assert proc.returncode == 1 == qemu_check(header_only, *fmt).returncode
        assert "Traceback" not in proc.stderr
    text = cli("check", "--help").stdout
    for option in ("--output", "-q", "-p", "exit", "63"):
        assert option in text


# --------------------------------------------------------------------------------------------
# Seeded mutations of metadata words, judged by qemu-img


def _mutate(q: Qcow2File, rng: random.Random) -> str:
    words = [q.l1_offset + 8 * i for i in range(q.l1_size)]
    words += [at for at, _ in q.l2_entries()]
    words += [q.reftable_offset + 8 * i for i in range(4)]
    refblock = q.u64(q.reftable_offset) & ~0x1FF
    words += [refblock + 8 * i for i in range(8)]
    at = rng.choice(words)
    old = q.u64(at)
    new = rng.choice([
        old ^ (1 << rng.randrange(64)), 0, old + rng.choice((512, q.cs, -q.cs)),
        (old & ~OFFSET_MASK) | (rng.randrange(q.size // q.cs + 4) * q.cs), old ^ COPIED,
        rng.getrandbits(64)]) % (1 << 64)
    q.put_u64(at, new)
    return f"{at:#x}: {old:#x} -> {new:#x}"


@pytest.mark.parametrize("store", ["per-cluster", "referenced-only"])
def test_seeded_mutations_match_qemu(store, tmp_path, monkeypatch):
    bases = [_converted(tmp_path, "m-c4k.qcow2", "cluster_size=4096"),
             _converted(tmp_path, "m-comp.qcow2", "cluster_size=65536", compress=True),
             _converted(tmp_path, "m-ext.qcow2", "cluster_size=65536,extended_l2=on")]
    snap = tmp_path / "m-snap.qcow2"
    shutil.copy(bases[0].path, snap)
    qemu_img("snapshot", "-c", "s", snap)
    qemu_io(snap, "write -P 9 0 200k")
    bases.append(Qcow2File(snap))
    if store == "referenced-only":
        monkeypatch.setattr(importlib.import_module("qcowfast.check"), "DENSE_MAX_BYTES", 0)
    rng = random.Random(4242)
    for n in range(40):
        base = bases[n % len(bases)]
        path = tmp_path / f"mut{n}.qcow2"
        shutil.copy(base.path, path)
        what = [_mutate(Qcow2File(path), rng) for _ in range(rng.choice((1, 1, 2)))]
        qemu = qemu_check(path, "--output=json")
        try:
            result = qcowfast.check(path)
        except qcowfast.QcowError as exc:       # qemu-img: could not check
            assert qemu.returncode == 1 and not qemu.stdout.strip(), (what, str(exc))
            continue
        assert result.exit_code == qemu.returncode, what
        assert result.to_json() == json.loads(qemu.stdout), what


# --------------------------------------------------------------------------------------------
# Chains that cannot be opened: qemu-img check opens the chain first and exits 1


def _ext_offset(path, magic: int) -> int:
    """File offset of the header extension `magic` (v3 header, after header_length)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    pos = struct.unpack_from(">I", head, 100)[0]
    while True:
        m, length = struct.unpack_from(">II", head, pos)
        assert m, f"no header extension {magic:#x}"
        if m == magic:
            return pos
        pos += 8 + -(-length // 8) * 8


def _chain_cases(d: Path) -> dict:
    def create(name, *args):
        qemu_img("create", "-q", "-f", "qcow2", *args, name, M, cwd=d)
        return d / name
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", M)
    cases = {"missing-backing": create("mb.qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2")}
    df = create("df.qcow2", "-o", "data_file=df.raw")
    (d / "df.raw").unlink()
    cases["missing-data-file"] = df
    loop = create("self.qcow2", "-u", "-b", "sel2.qcow2", "-F", "qcow2")
    q = Qcow2File(loop)
    name_at, name_len = struct.unpack(">QI", loop.read_bytes()[8:20])
    assert name_len == len("self.qcow2")
    q.put(name_at, b"self.qcow2")                  # the image is its own backing file
    cases["loop"] = loop
    fmt = create("fmt.qcow2", "-b", "base.qcow2", "-F", "qcow2")
    Qcow2File(fmt).put(_ext_offset(fmt, 0xE2792ACA) + 8, b"qcowx")     # backing format name
    cases["unknown-backing-format"] = fmt
    noname = create("noname.qcow2", "-o", "data_file=nn.raw")
    Qcow2File(noname).put(_ext_offset(noname, 0x44415441), bytes(4))   # drop the name ext.
    cases["data-file-unnamed"] = noname
    return cases


def _qemu_check_limited(path, *args, cwd=None):
    """qemu-img check under a 700 MiB address-space limit: on a backing loop QEMU 7.2 opens
    the same file again and again until memory runs out (then it exits 1)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (700 * M, 700 * M))
    return subprocess.run([QEMU_IMG, "check", *args, str(path)], capture_output=True,
                          text=True, check=False, cwd=cwd, preexec_fn=limit, timeout=60)


def test_chain_that_cannot_be_opened_exits_1(tmp_path):
    cases = _chain_cases(tmp_path)
    for (case, path), output in itertools.product(cases.items(),
                                                  [(), ("--output=json",), ("-q",)]):
        qemu = _qemu_check_limited(path.name, *output, cwd=tmp_path)
        ours = cli("check", *output, path.name, cwd=tmp_path)
        assert qemu.stdout == "", (case, qemu.stderr[-300:])
        if case == "loop" and qemu.returncode < 0:
            # Memory can also run out where QEMU aborts instead (starting a thread, or in
            # GLib's allocator): the loop still ends by exhausting memory.
            assert ("qemu_thread_create" in qemu.stderr
                    or "failed to allocate" in qemu.stderr), qemu.stderr[-300:]
        else:
            assert qemu.returncode == 1, (case, qemu.stderr[-300:])
        assert (ours.returncode, ours.stdout) == (1, ""), (case, ours.stderr)
        # One line, worded as qemu-img's: "Could not open 'IMG': <why>".
        lines = ours.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in ours.stderr, (case, ours.stderr)
        want = f"Could not open '{path.name}': "
        assert lines[0].startswith(f"qcowfast: {want}"), (case, lines[0])
        if qemu.returncode == 1:
            assert qemu.stderr.startswith(f"qemu-img: {want}"), (case, qemu.stderr[-300:])
        with pytest.raises(qcowfast.QcowError, match="Could not open"):
            qcowfast.check(path)



def test_open_errors_are_whole_oserrors(tmp_path):
    """ImageNotFound / ImageOpenError carry errno, strerror and filename like any OSError,
    also after pickling (results sent between processes, e.g. from Dask workers); str() is
    qcowfast's message."""
    import pickle
    missing = tmp_path / "nope.qcow2"
    loop = tmp_path / "loop.qcow2"
    os.symlink(loop.name, loop)
    for path, cls, code in ((missing, qcowfast.ImageNotFound, errno.ENOENT),
                            (loop, qcowfast.ImageOpenError, errno.ELOOP)):
        with pytest.raises(cls) as info:
            qcowfast.open(path)
        for exc in (info.value, pickle.loads(pickle.dumps(info.value))):
            assert type(exc) is cls
            assert (exc.errno, exc.strerror, exc.filename) == (code, os.strerror(code),
                                                               str(path)), exc
            assert str(exc) == f"image {path} cannot be opened: {os.strerror(code)}"


def test_image_that_cannot_be_opened(tmp_path):
    """The API raises what info and compare raise (ImageNotFound, ImageOpenError: QcowErrors
    and OSErrors); the command exits as qemu-img check does."""
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(qcowfast.ImageNotFound, match="Could not open") as info:
        qcowfast.check(missing)
    assert isinstance(info.value, FileNotFoundError) and info.value.errno == errno.ENOENT
    with pytest.raises(qcowfast.ImageNotFound):
        qcowfast.info(missing)
    loop = tmp_path / "loop.qcow2"
    os.symlink(loop.name, loop)                    # ELOOP: not missing, cannot be opened
    with pytest.raises(qcowfast.ImageOpenError) as info:
        qcowfast.check(loop)
    assert not isinstance(info.value, FileNotFoundError) and info.value.errno == errno.ELOOP
    for path in (missing, loop, tmp_path):
        ours, qemu = cli("check", path), qemu_check(path)
        assert ours.returncode == qemu.returncode == 1, (path, ours.stderr, qemu.stderr)
        assert ours.stderr.startswith(f"qcowfast: Could not open '{path}': ")
        assert len(ours.stderr.splitlines()) == 1 and ours.stdout == ""


# --------------------------------------------------------------------------------------------
# Found by red-teaming against qemu-img 7.2: probing, names, header length, bitmap names


def _both_check(path, *args, cwd=None):
    ours = cli("check", *args, path, cwd=cwd, text=False)
    theirs = subprocess.run([QEMU_IMG, "check", *args, path], cwd=cwd, capture_output=True)
    return ours, theirs


def test_magic_without_a_qcow2_header_is_probed_like_qemu(tmp_path):
    """The QCOW2 magic with version 0 or 1 (a 4-byte file reads as version 0: the probe pads
    with zeros): qemu-img probes raw or qcow (v1), which it cannot check (63); with -f qcow2
    both fail to open (1)."""
    (tmp_path / "v0.img").write_bytes(b"QFI\xfb" + bytes(200))
    (tmp_path / "short.img").write_bytes(b"QFI\xfb")
    qemu_img("create", "-q", "-f", "qcow", tmp_path / "v1.qcow", "16M")
    for name in ("v0.img", "short.img", "v1.qcow"):
        ours, theirs = _both_check(tmp_path / name)
        assert ours.returncode == theirs.returncode == 63, (name, ours.stderr)
        ours, theirs = _both_check(tmp_path / name, "-f", "qcow2")
        assert ours.returncode == theirs.returncode == 1, (name, ours.stderr)
        assert ours.stderr.startswith(b"qcowfast: Could not open '"), ours.stderr
    for missing in ("missing.qcow2", "."):
        ours, theirs = _both_check(tmp_path / missing, "-f", "qcow2")
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr.startswith(f"qcowfast: Could not open '{tmp_path / missing}'"
                                      .encode()), ours.stderr


def test_raw_format_opens_the_file_before_answering(tmp_path):
    """check -f raw: qemu-img opens the file first (missing file, directory: 1), then says raw
    has no check (63), before it looks at -r (it exited 63 for a missing file, 1 for -r)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(4096))
    for args, status in (([], 63), (["-r", "leaks"], 63), (["-r", "all"], 63)):
        for path, want in ((raw, status), (tmp_path / "missing.raw", 1), (tmp_path, 1)):
            ours, theirs = _both_check(path, "-f", "raw", *args)
            assert ours.returncode == theirs.returncode == want, (path, args, ours.stderr)
            assert len(ours.stderr.splitlines()) == 1
    # -r's value is checked first, whatever the image; a probed raw image is 63 with -r too
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", qcow2, "1M")
    for path, args, want in ((raw, ["-f", "raw", "-r", "bogus"], 1), (qcow2, ["-r", "bogus"], 1),
                             (raw, ["-r", "leaks"], 63), (raw, ["-r", "all"], 63)):
        ours, theirs = _both_check(path, *args)
        assert ours.returncode == theirs.returncode == want, (path, args, ours.stderr)


def test_json_escapes_names_like_qemu(tmp_path):
    """Upper-case \\u escapes, and U+FFFD for a byte that is not UTF-8."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "é.qcow2", "1M")
    shutil.copyfile(tmp_path / "é.qcow2", os.fsdecode(bytes(tmp_path) + b"/\xff.qcow2"))
    for name in ("é.qcow2", os.fsdecode(b"\xff.qcow2")):
        ours, theirs = _both_check(name, "--output=json", cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 0
        assert ours.stdout == theirs.stdout, (ours.stdout, theirs.stdout)


@pytest.mark.parametrize("length", [105, 106, 113])
def test_header_length_not_a_multiple_of_8(tmp_path, length):
    """qcow2.txt asks for a multiple of 8, QEMU does not check it: 105 and 106 check clean,
    113 puts the extension walk on garbage (both tools fail to open it)."""
    img = tmp_path / "hl.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    with open(img, "r+b") as f:
        f.seek(100)
        f.write(struct.pack(">I", length))
    ours, theirs = _both_check(img)
    assert ours.returncode == theirs.returncode, ours.stderr
    assert ours.returncode == (1 if length == 113 else 0)
    if ours.returncode == 0:
        assert ours.stdout == theirs.stdout


@pytest.mark.parametrize("in_use", [False, True])
def test_two_bitmaps_of_one_name(tmp_path, in_use):
    """qemu-img refuses to open an image with two bitmaps of one name, unless the second is in
    use (qcow2_load_dirty_bitmaps() then skips it)."""
    img = tmp_path / "bd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", img, "b1")
    qemu_img("bitmap", "--add", img, "b2")
    data = img.read_bytes()
    at = data.rfind(b"b2")
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(b"b1")
        if in_use:
            f.seek(at - 24 + 12)                 # the entry's flags: in use, auto
            f.write(struct.pack(">I", 3))
    ours, theirs = _both_check(img)
    assert ours.returncode == theirs.returncode == (0 if in_use else 1), ours.stderr
    if not in_use:
        assert b"Bitmap already exists: b1" in ours.stderr
        assert cli("info", img).returncode == 1 == subprocess.run(
            [QEMU_IMG, "info", img], capture_output=True).returncode


def test_a_file_grown_while_opening_is_checked_at_its_new_size(tmp_path, monkeypatch):
    """Under -U a writer may grow the image between the open and the check: the check uses
    the file's size as it starts, as qemu-img does (bdrv_getlength in
    qcow2_check_refcounts), not the size at open, which made new tables and data clusters
    "past the end of the file" (false corruptions, exit 2)."""
    import importlib
    check_module = importlib.import_module("qcowfast.check")
    img = tmp_path / "grow.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x11 0 64k")
    real_open_chain = check_module._open_chain

    def open_chain_then_grow(*args, **kw):
        out = real_open_chain(*args, **kw)
        qemu_io(img, "write -P 0x22 8M 1M")      # a new L2 table and 16 data clusters
        return out

    monkeypatch.setattr(check_module, "_open_chain", open_chain_then_grow)
    size_before = img.stat().st_size
    result = qcowfast.check(img, force_share=True)
    assert img.stat().st_size > size_before
    assert result.corruptions == 0 and result.leaks == 0, result.messages
    assert qemu_img("check", img).returncode == 0


# --------------------------------------------------------------------------------------------
# Tiny clusters: many small L2 tables, checked in batches (Check.l2_batch) unless a table has
# something to report or holds both kinds of references; then one by one, as before.


def _small_tables(d: Path) -> dict:
    out = {}
    for opts, compress in (("cluster_size=512", False), ("cluster_size=1024", True),
                           ("cluster_size=1024", False), ("cluster_size=512,refcount_bits=1", False)):
        q = _converted(d, f"t-{opts.replace(',', '-').replace('=', '')}-{compress:d}.qcow2",
                       opts, compress=compress, size=3 * M)
        out[q.path.name] = q.path
    packed = d / "t-packed.raw"                                 # every cluster compressed
    packed.write_bytes(b"".join(b"cluster %08d " % i * 60 for i in range(3 * 1024)))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=1024", packed,
             d / "t-packed.qcow2")
    out["t-packed.qcow2"] = d / "t-packed.qcow2"
    snap = d / "t-snap.qcow2"
    shutil.copy(out["t-cluster_size512-0.qcow2"], snap)
    qemu_img("snapshot", "-c", "s", snap)
    qemu_io(snap, "write -P 9 0 200k", "write -P 8 2M 100k")   # tables only a snapshot uses
    out[snap.name] = snap
    late = d / "t-late-damage.qcow2"                            # unaligned, in a late table
    shutil.copy(out["t-cluster_size1024-0.qcow2"], late)
    q = Qcow2File(late)
    at, entry = q.data_entries()[-40]
    q.put_u64(at, entry + 512)
    out[late.name] = late
    copied = d / "t-copied.qcow2"                               # COPIED wrong in a late table
    shutil.copy(out["t-cluster_size512-0.qcow2"], copied)
    q = Qcow2File(copied)
    at, entry = q.data_entries()[-300]
    q.put_u64(at, entry ^ COPIED)
    out[copied.name] = copied
    return out


@pytest.mark.parametrize("batch", [None, 512])
def test_small_tables_check_like_qemu_batched_or_not(tmp_path, monkeypatch, batch):
    """Every image against qemu-img, in batches (of the default size, or of 512 entries: many
    batches, some falling back), then one table at a time."""
    check_module = importlib.import_module("qcowfast.check")
    if batch is not None:
        monkeypatch.setattr(check_module, "L2_BATCH_ENTRIES", batch)
    for name, path in _small_tables(tmp_path).items():
        ours, qemu = both_json(path)
        assert ours == qemu, name
        human = cli("check", path.name, cwd=path.parent)
        want = qemu_check(path.name, cwd=path.parent)
        assert (human.returncode, human.stdout) == (want.returncode, want.stdout), name
        with monkeypatch.context() as m:
            m.setattr(check_module, "L2_BATCH_ENTRIES", 0)          # one table at a time
            m.chdir(path.parent)
            assert qcowfast.check(path.name).to_json() == qemu[1], name


def test_small_tables_mutations_match_qemu(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("qcowfast.check"), "L2_BATCH_ENTRIES", 512)
    base = _converted(tmp_path, "mb.qcow2", "cluster_size=512", size=1 * M)
    rng = random.Random(512)
    for n in range(24):
        path = tmp_path / f"mb{n}.qcow2"
        shutil.copy(base.path, path)
        what = [_mutate(Qcow2File(path), rng) for _ in range(rng.choice((1, 2)))]
        qemu = qemu_check(path, "--output=json")
        try:
            result = qcowfast.check(path)
        except qcowfast.QcowError as exc:
            assert qemu.returncode == 1 and not qemu.stdout.strip(), (what, str(exc))
            continue
        assert (result.exit_code, result.to_json()) == (qemu.returncode,
                                                        json.loads(qemu.stdout)), what


@pytest.mark.parametrize("kind", ["patched", "qcow"])
def test_version_1_header_fails_as_qemu_img(tmp_path, kind):
    """A qcow2 file whose version reads 1 is opened by qemu-img as QCOW version 1, whose header
    checks refuse it (exit 1); a real QCOW v1 image opens, and cannot be checked (63)."""
    path = tmp_path / "v1.img"
    qemu_img("create", "-q", "-f", "qcow2" if kind == "patched" else "qcow", path, "1M")
    if kind == "patched":
        with open(path, "r+b") as f:
            f.seek(4)
            f.write((1).to_bytes(4, "big"))
    want = qemu_check(path)
    got = cli("check", path)
    assert got.returncode == want.returncode == (1 if kind == "patched" else 63)
    if kind == "patched":
        assert got.stderr == want.stderr.replace("qemu-img", "qcowfast")
