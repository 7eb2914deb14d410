"""Internal snapshots: the snapshot table, lookup by id or name, and reading a snapshot's state.

Snapshots are taken with ``qemu-img snapshot -c`` between ``qemu-io`` writes; the oracle for a
snapshot's bytes is ``qemu-img convert -l snapshot.id=ID|snapshot.name=NAME -O raw`` and for the
table ``qemu-img info --output=json``. Broken tables are copies with fields patched at offsets
computed here from docs/interop/qcow2.txt ("Snapshots"), not by qcowfast.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcowfast
from qcowfast.snapshots import Snapshot, SnapshotNotFound, find_snapshot, read_snapshots
from common import QemuToolError, assert_same_bytes, qemu_img, qemu_io, reference_raw

K = 1024
M = 1024 * 1024
ENTRY = struct.Struct(">QIHHIIQII")       # the fixed 40 bytes of a snapshot table entry


def pattern_file(path: Path, seed: int, size: int) -> str:
    rng = random.Random(seed)
    words = b"snapshot l1 table cluster guest data zero qcow2 ".split()
    chunks = [rng.randbytes(rng.randint(1, 5000)) if rng.random() < 0.4 else
              b" ".join(rng.choices(words, k=rng.randint(1, 900))) for _ in range(size // 1000)]
    path.write_bytes(b"".join(chunks)[:size].ljust(size, b"\x01"))
    return path.name


def snapshot_raw(path: Path, **select) -> bytes:
    """qemu-img convert -l snapshot.id=..,snapshot.name=.. of `path` (raw bytes)."""
    spec = ",".join(f"snapshot.{k}={v}" for k, v in select.items())
    out = path.parent / f"qemu-snapshot-{abs(hash(spec))}.raw"
    qemu_img("convert", "-l", spec, "-O", "raw", path.name, out.name, cwd=path.parent)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_snapshots(path: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "--output=json", path.name, cwd=path.parent).stdout)
    return info.get("snapshots", [])


def table_entries(path: Path) -> list[tuple[int, tuple]]:
    """(file offset, fixed fields) of each snapshot table entry, walked per qcow2.txt."""
    with open(path, "rb") as f:
        nb, offset = struct.unpack(">IQ", f.read(72)[60:72])
    return table_entries_from(path, offset, nb)


def copy_image(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        if f.is_file() and not f.name.endswith(".raw"):
            shutil.copyfile(f, dest / f.name)
    return dest / src.name


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_whole(path, **kw) -> bytes:
    with qcowfast.open(path, **kw) as img:
        return img.read(0, img.virtual_size)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("snapshots")


SIZE1 = 3 * M + 512            # before the resize; 4 KiB clusters: two L1 entries
SIZE2 = 5 * M + 1024           # after it: three L1 entries


@pytest.fixture(scope="module")
def snap_image(workdir) -> Path:
    """Snapshots between writes, a resize, a deleted snapshot and a name equal to another id.

    id 1 "first", id 2 "second", (id 3 "doomed", deleted), id 4 "1" (after the resize),
    id 5 "état final"; the active state differs from all of them.
    """
    d = workdir / "chain"
    d.mkdir()
    pat = pattern_file(d / "pattern.bin", 1, 200 * K)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "image.qcow2", SIZE1, cwd=d)
    io = lambda *c: qemu_io(d / "image.qcow2", *c, cwd=d)    # noqa: E731
    snap = lambda *a: qemu_img("snapshot", *a, "image.qcow2", cwd=d)   # noqa: E731
    io(f"write -s {pat} 0 {150 * K}", f"write -s {pat} {2 * M - 7000} {100 * K}",
       f"write -P 0x5e {SIZE1 - 3000} 3000")
    snap("-c", "first")
    io(f"write -P 0x21 {4 * K + 5} {10 * K}", f"write -z {64 * K} {32 * K}",
       f"discard {2 * M} {16 * K}", f"write -s {pat} {M} {200 * K}")
    snap("-c", "second")
    io(f"write -P 0x99 {500 * K} 4096")
    snap("-c", "doomed")
    qemu_img("resize", "image.qcow2", SIZE2, cwd=d)
    io(f"write -s {pat} {SIZE1 - 100} {100 * K}", f"write -z 0 {8 * K}")
    snap("-c", "1")
    io(f"write -P 0x33 {4 * M} {64 * K}", f"write -z -u {M} {64 * K}")
    snap("-c", "état final")
    snap("-d", "doomed")
    io(f"write -P 0x44 {100 * K} {8 * K}", f"discard {4 * M} {64 * K}")
    return d / "image.qcow2"


EXPECTED = [("1", "first", SIZE1), ("2", "second", SIZE1), ("4", "1", SIZE2),
            ("5", "état final", SIZE2)]


# --------------------------------------------------------------------------------------------
# The table


def test_read_snapshots_matches_qemu_info(snap_image):
    with qcowfast.open(snap_image) as img:
        snaps = read_snapshots(img)
    assert [(s.id, s.name, s.disk_size) for s in snaps] == EXPECTED
    info = qemu_snapshots(snap_image)
    assert len(info) == len(snaps)
    for s, q in zip(snaps, info):
        assert isinstance(s, Snapshot)
        assert (s.id, s.name) == (q["id"], q["name"])
        assert s.vm_state_size == q["vm-state-size"]
        assert (s.date_sec, s.date_nsec) == (q["date-sec"], q["date-nsec"])
        assert s.vm_clock_nsec == q["vm-clock-sec"] * 10**9 + q["vm-clock-nsec"]
        assert s.icount == q.get("icount", -1)
        assert s.extra_data_size >= 16
        assert s.l1_table_offset % 4096 == 0
        assert s.l1_size * 2 * M >= s.disk_size


def test_snapshot_is_frozen(snap_image):
    with qcowfast.open(snap_image) as img:
        snap = read_snapshots(img)[0]
    with pytest.raises(AttributeError):
        snap.name = "other"


def test_image_without_snapshots(workdir):
    d = workdir / "none"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "image.qcow2", M, cwd=d)
    with qcowfast.open(d / "image.qcow2") as img:
        assert read_snapshots(img) == []
        with pytest.raises(SnapshotNotFound, match="none"):
            find_snapshot(img, "1")
    with pytest.raises(qcowfast.QcowError):
        qcowfast.open(d / "image.qcow2", snapshot="x")


# --------------------------------------------------------------------------------------------
# Reading a snapshot


@pytest.mark.parametrize("key,select", [
    ("first", dict(name="first")), ("2", dict(id="2")), ("second", dict(name="second")),
    ("5", dict(id="5")), ("état final", dict(name="état final")),
    # "1" is the id of "first" and the name of id 4: ids win, as in QEMU.
    ("1", dict(id="1")), ("4", dict(id="4")),
])
def test_snapshot_bytes_match_qemu(snap_image, key, select):
    want = snapshot_raw(snap_image, **select)
    with qcowfast.open(snap_image, snapshot=key) as img:
        snap = img.snapshot
        got = img.read(0, img.virtual_size)
        extents = list(img.extents())
    # QEMU reads an older, smaller snapshot at the image's current size (qcow2_snapshot_load_tmp
    # switches only the L1 table); its own disk size stays metadata.
    assert len(want) == SIZE2 and len(got) == SIZE2
    assert snap.disk_size == dict((i, n) for i, _, n in EXPECTED)[snap.id]
    assert_same_bytes(got, want, f"snapshot {key!r}")
    assert sum(e.length for e in extents) == SIZE2


def test_snapshots_differ_from_each_other_and_the_active_state(snap_image):
    states = [read_whole(snap_image, snapshot=k)[:SIZE1] for k in ("first", "second", "4", "5")]
    states.append(read_whole(snap_image)[:SIZE1])
    assert len(set(states)) == len(states)
    assert_same_bytes(read_whole(snap_image), reference_raw(snap_image), "active state")


def test_id_is_looked_up_before_name(snap_image):
    with qcowfast.open(snap_image) as img:
        assert find_snapshot(img, "1").name == "first"
        assert find_snapshot(img, "4").name == "1"
        assert find_snapshot(img, "second").id == "2"
    # qemu-img convert -l KEY also tries the id first.
    qemu_img("convert", "-l", "1", "-O", "raw", snap_image.name, "by-key.raw",
             cwd=snap_image.parent)
    by_key = (snap_image.parent / "by-key.raw").read_bytes()
    os.unlink(snap_image.parent / "by-key.raw")
    assert by_key == read_whole(snap_image, snapshot="1")


def test_unknown_snapshot_lists_the_available_ones(snap_image, workdir):
    with pytest.raises(SnapshotNotFound) as info:
        qcowfast.open(snap_image, snapshot="doomed")
    assert isinstance(info.value, qcowfast.QcowError) and isinstance(info.value, LookupError)
    for word in ("doomed", "first", "second", "état final"):
        assert word in str(info.value)
    with pytest.raises(qcowfast.QcowError):
        qcowfast.open(snap_image, snapshot="3")        # the deleted snapshot's id
    out = workdir / "unknown.raw"
    with pytest.raises(qcowfast.QcowError):
        qcowfast.convert(snap_image, out, snapshot="nope")
    assert not out.exists()


@pytest.mark.parametrize("key", ["first", "4"])
def test_convert_snapshot_matches_qemu(snap_image, workdir, key):
    out = workdir / f"convert-{key}.raw"
    result = qcowfast.convert(snap_image, out, snapshot=key)
    got = out.read_bytes()
    with qcowfast.open(snap_image, snapshot=key) as img:
        select = dict(id=img.snapshot.id)
    want = snapshot_raw(snap_image, **select)
    assert result.virtual_size == len(got) == SIZE2
    assert_same_bytes(got, want, f"convert snapshot {key!r}")


@pytest.fixture(scope="module", params=["extl2-backing", "compressed-zstd", "v2"])
def feature_snap_image(request, workdir) -> Path:
    """Snapshots of images with other features: extended L2 over a backing file, zstd
    compressed clusters, a version 2 image."""
    d = workdir / request.param
    d.mkdir()
    pat = pattern_file(d / "pattern.bin", 7, 100 * K)
    io = lambda *c: qemu_io(d / "image.qcow2", *c, cwd=d)    # noqa: E731
    if request.param == "extl2-backing":
        (d / "base.raw").write_bytes(random.Random(3).randbytes(2 * M))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2", cwd=d)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "-b",
                 "base.qcow2", "-F", "qcow2", "image.qcow2", 2 * M + 512, cwd=d)
        io(f"write -s {pat} 1024 3000", "write -z 40k 2k", f"write -z -u {96 * K} {32 * K}")
    elif request.param == "compressed-zstd":
        pattern_file(d / "src.raw", 9, 2 * M)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 "compression_type=zstd,cluster_size=16k", "src.raw", "image.qcow2", cwd=d)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "image.qcow2", 2 * M, cwd=d)
        io(f"write -s {pat} 0 {M}")
    qemu_img("snapshot", "-c", "snap", "image.qcow2", cwd=d)
    io(f"write -P 0x66 {5 * K} {100 * K}", f"discard {M} {128 * K}", f"write -z {192 * K} 64k")
    return d / "image.qcow2"


def test_feature_snapshot_matches_qemu(feature_snap_image):
    want = snapshot_raw(feature_snap_image, name="snap")
    got = read_whole(feature_snap_image, snapshot="snap")
    assert_same_bytes(got, want, f"snapshot of {feature_snap_image.parent.name}")
    assert got != read_whole(feature_snap_image)
    assert_same_bytes(read_whole(feature_snap_image), reference_raw(feature_snap_image), "active")


# --------------------------------------------------------------------------------------------
# Tables QEMU can write but does not today, and broken tables


def _rewrite_table(path: Path, entries: list[tuple[tuple, bytes, bytes, bytes]]) -> None:
    """Write a new snapshot table (fixed fields, extra data, id, name) at a new cluster at the
    end of the file and point the header at it."""
    blob = bytearray()
    for fields, extra, ident, name in entries:
        blob += bytes(-len(blob) % 8)
        f = list(fields)
        f[2], f[3], f[8] = len(ident), len(name), len(extra)
        blob += ENTRY.pack(*f) + extra + ident + name
    cs = 1 << struct.unpack_from(">I", path.read_bytes(), 20)[0]
    size = path.stat().st_size
    offset = -(-size // cs) * cs
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(bytes(blob) + bytes(-len(blob) % cs))
    patch(path, 60, struct.pack(">IQ", len(entries), offset))


def _entries_of(path: Path):
    data = path.read_bytes()
    out = []
    for pos, fields in table_entries(path):
        extra_len, id_len, name_len = fields[8], fields[2], fields[3]
        body = data[pos + ENTRY.size:pos + ENTRY.size + extra_len + id_len + name_len]
        out.append((fields, body[:extra_len], body[extra_len:extra_len + id_len],
                    body[extra_len + id_len:]))
    return out


@pytest.mark.parametrize("extra", [b"", b"\0" * 8, bytes(24) + b"future!!" * 4],
                         ids=["no-extra-data", "vm-state-only", "unknown-extra-fields"])
def test_old_and_future_extra_data(snap_image, workdir, extra):
    """Without the disk size in the extra data the image's size applies; unknown extra fields
    are ignored. QEMU reads these tables the same way."""
    top = copy_image(snap_image, workdir / f"extra-{len(extra)}")
    entries = _entries_of(top)
    expected = EXPECTED
    if len(extra) < 16:
        # Without a disk size the current one applies, which the L1 tables of the snapshots
        # taken before the resize do not cover: keep those taken after it (QEMU versions that
        # wrote no disk size could not resize images with snapshots).
        entries, expected = entries[2:], EXPECTED[2:]
    keep = []
    for fields, old_extra, ident, name in entries:
        new_extra = extra
        if len(extra) > 16:
            new_extra = old_extra[:24].ljust(24, b"\0") + extra[24:]
        keep.append((fields, new_extra, ident, name))
    _rewrite_table(top, keep)
    with qcowfast.open(top) as img:
        snaps = read_snapshots(img)
    assert [(s.id, s.name, s.disk_size) for s in snaps] == expected
    for s in snaps:
        assert s.extra_data_size == len(keep[0][1])
        assert s.icount == (0 if len(extra) >= 24 else -1)
        assert s.vm_state_size == 0
    for ident, name, _ in expected:
        got = read_whole(top, snapshot=ident)
        want = snapshot_raw(top, id=ident)
        assert_same_bytes(got, want, f"snapshot {ident} with extra {len(extra)}")


def _field(index: int):
    """Patch fixed field `index` (ENTRY order) of snapshot table entry 1 ("second")."""
    def mutate(path: Path, value):
        pos, fields = table_entries(path)[1]
        f = list(fields)
        f[index] = value(f) if callable(value) else value
        patch(path, pos, ENTRY.pack(*f))
    return mutate


def _disk_size(value):
    def mutate(path: Path, _):
        pos, fields = table_entries(path)[1]
        assert fields[8] >= 16
        patch(path, pos + ENTRY.size + 8, struct.pack(">Q", value))
    return mutate


def _truncate_table(path: Path, _):
    """Move the table to the end of the file and cut the file inside its last entry."""
    _rewrite_table(path, _entries_of(path))
    nb, offset = struct.unpack_from(">IQ", path.read_bytes(), 60)
    last_pos, _ = table_entries_from(path, offset, nb)[-1]
    os.truncate(path, last_pos + ENTRY.size + 10)


def table_entries_from(path: Path, offset: int, nb: int):
    data = path.read_bytes()
    out, pos = [], offset
    for _ in range(nb):
        pos = (pos + 7) & ~7
        fields = ENTRY.unpack_from(data, pos)
        out.append((pos, fields))
        pos += ENTRY.size + fields[8] + fields[2] + fields[3]
    return out


def _huge_table(path: Path, _):
    """A sparse table of 520 entries with 64 KiB ids and names: more than 64 MiB in all."""
    _, first = table_entries(path)[2]        # an L1 table covering the current disk size
    cs = 4096
    offset = -(-path.stat().st_size // cs) * cs
    pos = offset
    with open(path, "r+b") as f:
        for i in range(520):
            pos = (pos + 7) & ~7
            f.seek(pos)
            f.write(ENTRY.pack(first[0], first[1], 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0))
            pos += ENTRY.size + 2 * 0xFFFF
        f.truncate(pos)
    patch(path, 60, struct.pack(">IQ", 520, offset))


# Rules QEMU applies when it opens any image (qcow2_read_snapshots()): the image is refused.
TABLE_CORRUPTIONS = {
    # name: (mutator, value, words in qemu-img's message, words in ours)
    "extra-data-too-large": (_field(8), 1025, "Too much extra metadata",
                             ("entry 1", "extra_data_size")),
    "table-over-64-mib": (_huge_table, None, "Snapshot table is too big", ("64", "larger")),
}


@pytest.mark.parametrize("case", TABLE_CORRUPTIONS)
def test_broken_snapshot_tables_are_refused_at_open(case, snap_image, workdir):
    mutate, value, qemu_words, words = TABLE_CORRUPTIONS[case]
    top = copy_image(snap_image, workdir / f"broken-{case}")
    mutate(top, value)
    with pytest.raises(QemuToolError) as qemu:
        qemu_img("info", top.name, cwd=top.parent)
    assert qemu_words in str(qemu.value)
    for kw in ({}, {"snapshot": "first"}):
        with pytest.raises(qcowfast.QcowError) as info:
            qcowfast.open(top, **kw)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
    out = workdir / f"broken-{case}.raw"
    with pytest.raises(qcowfast.QcowError):
        qcowfast.convert(top, out)
    assert not out.exists()


# Rules QEMU applies to the snapshot it reads (qcow2_snapshot_load_tmp()); the table past the end
# of the file is qcowfast's documented refusal (QEMU reads zeros there).
SNAPSHOT_CORRUPTIONS = {
    # name: (mutator, value, exception, words in the message, qemu-img refuses too)
    "l1-unaligned": (_field(0), lambda f: f[0] + 512, qcowfast.FormatError,
                     ("'second'", "aligned"), True),
    "l1-too-large": (_field(1), 4 * M + 1, qcowfast.FormatError, ("'second'", "too large"),
                     True),
    "l1-past-eof": (_field(0), 1 << 40, qcowfast.TruncatedImage, ("'second'", "past the end"),
                    False),
    "name-past-eof": (_truncate_table, None, qcowfast.TruncatedImage, ("entry 3", "past the end"),
                      False),
}


@pytest.mark.parametrize("case", SNAPSHOT_CORRUPTIONS)
def test_broken_snapshot_is_refused_when_read(case, snap_image, workdir):
    mutate, value, exc, words, qemu_refuses = SNAPSHOT_CORRUPTIONS[case]
    top = copy_image(snap_image, workdir / f"broken-{case}")
    active = reference_raw(snap_image)
    mutate(top, value)
    with qcowfast.open(top) as img:
        # The active state does not depend on the snapshot table.
        assert_same_bytes(img.read(0, img.virtual_size), active, "active state")
    with pytest.raises(exc) as info:
        qcowfast.open(top, snapshot="second")
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    if qemu_refuses:
        with pytest.raises(QemuToolError):
            snapshot_raw(top, name="second")
    out = workdir / f"broken-{case}.raw"
    with pytest.raises(exc):
        qcowfast.convert(top, out, snapshot="second")
    assert not out.exists()


# L1 tables shorter than the disk size (iotest 029) and disk sizes QEMU does not look at when it
# reads a snapshot: read as QEMU reads them.
@pytest.mark.parametrize("case,mutate,value", [
    ("l1-too-small", _field(1), 1), ("disk-size-beyond-l1", _disk_size(7 * M), None),
    ("disk-size-absurd", _disk_size(1 << 63), None)], ids=lambda v: v if isinstance(v, str) else "")
def test_snapshot_l1_shapes_qemu_reads(case, mutate, value, snap_image, workdir):
    top = copy_image(snap_image, workdir / f"odd-{case}")
    mutate(top, value)
    want = snapshot_raw(top, name="second")
    assert_same_bytes(read_whole(top, snapshot="second"), want, case)


# --------------------------------------------------------------------------------------------
# -l spellings and table oddities qemu-img reads (found by red-teaming against qemu-img 7.2)


def _convert_both(image: Path, *options: str) -> tuple[int, bytes | None, int, bytes | None]:
    """(qemu-img's status, its raw output, qcowfast's status, its raw output)."""
    outs = []
    for tool in (["qemu-img", "convert"], [sys.executable, "-m", "qcowfast", "convert", "-q"]):
        dst = image.parent / "spelling.raw"
        dst.unlink(missing_ok=True)
        proc = subprocess.run([*tool, *options, "-O", "raw", image.name, dst.name],
                              cwd=image.parent, capture_output=True)
        outs += [proc.returncode, dst.read_bytes() if proc.returncode == 0 else None]
        dst.unlink(missing_ok=True)
    return tuple(outs)


@pytest.mark.parametrize("options", [
    ["-l", "snapshot.id=1,"], ["-l", "snapshot.name=second,"],
    ["-l", "snapshot.id=1", "-l", "second"], ["-l", "second", "-l", "snapshot.id=1"],
    ["-l", "snapshot.id=1", "-l", "snapshot.id=2"], ["-l", "first", "-l", "second"],
    ["-l", "snapshot.id=2,snapshot.name"], ["-l", "snapshot.name"],
])
def test_snapshot_option_spellings_match_qemu(snap_image, options):
    """A trailing comma, several -l (the last snapshot.* one counts, else the last), and the
    short-form boolean (snapshot.name alone is "on")."""
    status_q, out_q, status_f, out_f = _convert_both(snap_image, *options)
    assert status_q == status_f, (status_q, status_f)
    assert out_q == out_f


def _nul_and_long_table(top: Path):
    entries = _entries_of(top)
    (f1, x1, _, _), (f2, x2, _, _), (f4, x4, _, _), (f5, x5, _, n5) = entries
    return [(f1, x1, b"7\0x", b"ab\0cd"),        # id "7", name "ab" as C strings
            (f2, x2, b"7", b"second"),
            (f4, x4, b"9" * 130, "é".encode() * 150),     # longer than id_str[128], name[256]
            (f5, struct.pack(">QQQ", 1 << 63, SIZE2, 0), b"\xc3\xa9", n5)]


def test_ids_and_names_are_c_strings_and_info_truncates_like_qemu(snap_image, workdir):
    """Lookup compares up to the first NUL (strcmp); info shows ids and names as QEMU's
    fixed-size buffers hold them, the VM state size as an int64 in JSON, and pads the ID
    column by bytes."""
    top = copy_image(snap_image, workdir / "c-strings")
    _rewrite_table(top, _nul_and_long_table(top))
    for options in (["-l", "7"], ["-l", "ab"], ["-l", "snapshot.name=ab"],
                    ["-l", "snapshot.id=7,snapshot.name=second"], ["-l", "9" * 130]):
        status_q, out_q, status_f, out_f = _convert_both(top, *options)
        assert status_q == status_f == 0 and out_q == out_f, options
    assert _convert_both(top, "-l", "7")[1] == snapshot_raw(snap_image, id="1")
    for output in ("json", "human"):
        ours = subprocess.run([sys.executable, "-m", "qcowfast", "info", f"--output={output}",
                               top.name], cwd=top.parent, capture_output=True)
        theirs = subprocess.run(["qemu-img", "info", f"--output={output}", top.name],
                                cwd=top.parent, capture_output=True)
        assert ours.returncode == theirs.returncode == 0
        assert ours.stdout == theirs.stdout, output


def test_unaligned_l1_of_the_id_falls_back_to_the_name(snap_image, workdir):
    """`-l 1` where snapshot id 1's L1 table is unaligned (EINVAL) and another snapshot is
    named "1": qemu-img retries by name (bdrv_snapshot_load_tmp_by_id_or_name)."""
    top = copy_image(snap_image, workdir / "fallback")
    entries = _entries_of(top)
    fields, extra, ident, _ = entries[0]
    entries[0] = ((fields[0] + 8, *fields[1:]), extra, ident, b"a")
    _rewrite_table(top, entries)
    status_q, out_q, status_f, out_f = _convert_both(top, "-l", "1")
    assert status_q == status_f == 0 and out_q == out_f
    assert out_f == snapshot_raw(snap_image, id="4")        # the snapshot named "1"
    assert _convert_both(top, "-l", "snapshot.id=1")[::2] == (1, 1)
