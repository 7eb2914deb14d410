"""Every QCOW2 feature QEMU writes is read byte-exact; what cannot be read is refused by name.

Each image here is made by ``qemu-img`` / ``qemu-io`` in a module-scoped directory, from seeded
content. The oracles are QEMU's: ``qemu-img convert -O raw`` for bytes and ``qemu-img map
--output=json`` for extents, run in the image's directory (``qemu_raw``, ``qemu_map_here``: QEMU
7.2 resolves relative data file names against its working directory). Invalid images are copies of QEMU-made ones with a
few bytes patched at offsets this file computes itself, from the spec (docs/interop/qcow2.txt),
not from qcowfast.

Sections: zstd and zlib compression over cluster sizes; extended L2 entries (all six subcluster
types over a backing file, and the invalid bitmaps); external data files; version 2 images,
refcount widths, cluster sizes, header lengths and virtual sizes; encryption; feature bits.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest

import qcowfast
from qcowfast import ExtentKind
from common import (QEMU_IMG, QemuToolError, assert_same_bytes, qemu_img, qemu_img_pbkdf, qemu_io,
                    run_cli)

K = 1024
M = 1024 * 1024
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62

_WORDS = b"qcow2 cluster sector guest host table entry refcount snapshot zero data the of a".split()


def content(seed: int, size: int) -> bytes:
    """Deterministic mix of zero runs, text, random bytes and fills (unaligned run lengths)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(5)
        n = rng.choice((rng.randint(1, 700), rng.randint(1, 40000), rng.randint(1, 150000)))
        if kind == 0:
            out += bytes(n)
        elif kind in (1, 2):
            out += b" ".join(rng.choices(_WORDS, k=n // 4 + 1))[:n]
        elif kind == 3:
            out += rng.randbytes(n)
        else:
            out += bytes([rng.randrange(1, 256)]) * n
    return bytes(out[:size])


def text(seed: int, size: int) -> bytes:
    """Compressible text without zero runs (so every cluster of a convert -c is compressed)."""
    rng = random.Random(seed)
    block = b" ".join(rng.choices(_WORDS, k=20000))
    out = bytearray()
    while len(out) < size:
        start = rng.randrange(len(block) // 2)
        out += block[start:start + rng.randint(1000, len(block) // 2)] + b"\n"
    return bytes(out[:size])


_RAW_CACHE: dict = {}


def qemu_raw(path) -> bytes:
    """``qemu-img convert -O raw`` of `path`, run in the image's directory.

    QEMU 7.2 resolves a relative external data file name against its working directory (not
    the image's), so every oracle here runs beside the image; cached per path, mtime and size.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _RAW_CACHE:
        out = path.parent / (path.name + ".qemu.raw")
        qemu_img("convert", "-O", "raw", path.name, out.name, cwd=path.parent)
        _RAW_CACHE[key] = out.read_bytes()
        out.unlink()
    return _RAW_CACHE[key]


def qemu_map_here(path) -> list[dict]:
    """``qemu-img map --output=json`` of `path`, run in the image's directory."""
    path = Path(path).resolve()
    return json.loads(qemu_img("map", "--output=json", path.name, cwd=path.parent).stdout)


def qemu_info_here(path) -> dict:
    """``qemu-img info --output=json`` of `path`, run in the image's directory."""
    path = Path(path).resolve()
    return json.loads(qemu_img("info", "--output=json", path.name, cwd=path.parent).stdout)


def check_image(path, **open_kw) -> bytes:
    """Assert qcowfast's bytes and map of `path` equal QEMU's; return the bytes."""
    want = qemu_raw(path)
    with qcowfast.open(path, **open_kw) as img:
        assert img.virtual_size == len(want)
        got = img.read(0, img.virtual_size)
        got_map = img.map()
    assert_same_bytes(got, want, f"{Path(path).name}")
    want_map = qemu_map_here(path)
    assert got_map == want_map, _map_diff(got_map, want_map)
    return got


def check_convert(path, out_dir: Path, **kw) -> None:
    out = out_dir / (Path(path).stem + ".converted.raw")
    if out.exists():
        out.unlink()
    qcowfast.convert(path, out, **kw)
    assert_same_bytes(out.read_bytes(), qemu_raw(path), f"convert {Path(path).name}")


def _map_diff(got, want) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"map entry {i} differs:\n  got  {a}\n  want {b}"
    return f"map lengths differ: got {len(got)} entries, want {len(want)}"


def compressed_extents(path) -> int:
    """Number of compressed extents QEMU reports (present data without a host offset)."""
    return sum(1 for e in qemu_map_here(path) if e["present"] and e["data"] and "offset" not in e)


# --------------------------------------------------------------------------------------------
# Raw header and table access (from the spec; independent of qcowfast)


def header_fields(path) -> dict:
    with open(path, "rb") as f:
        d = f.read(112)
    (magic, version, _bfo, _bfs, cluster_bits, size, crypt, l1_size, l1_offset, _rto, _rtc,
     nb_snap, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", d)
    out = dict(version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt,
               l1_size=l1_size, l1_table_offset=l1_offset, nb_snapshots=nb_snap,
               snapshots_offset=snap_off, incompatible=0, header_length=72)
    if version >= 3:
        out["incompatible"], _c, _a, _ro, out["header_length"] = struct.unpack_from(">QQQII", d, 72)
    return out


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def l2_entry_offset(path, guest: int) -> int:
    """File offset of the L2 entry serving guest offset `guest` (its L2 table must exist)."""
    h = header_fields(path)
    cs = 1 << h["cluster_bits"]
    width = 16 if h["incompatible"] & 16 else 8
    per_l2 = cs // width
    l1_index, l2_index = divmod(guest // cs, per_l2)
    l1e = struct.unpack(">Q", read_at(path, h["l1_table_offset"] + 8 * l1_index, 8))[0]
    l2 = l1e & L2E_OFFSET_MASK
    assert l2, f"no L2 table for guest offset {guest:#x}"
    return l2 + width * l2_index


def l2_entry(path, guest: int) -> tuple[int, int]:
    """(entry, bitmap) for guest offset `guest`; bitmap is 0 without extended L2."""
    h = header_fields(path)
    off = l2_entry_offset(path, guest)
    if h["incompatible"] & 16:
        return struct.unpack(">QQ", read_at(path, off, 16))
    return struct.unpack(">Q", read_at(path, off, 8))[0], 0


def copy_of(path, dest: Path) -> Path:
    """Copy the image (and files beside it, for backing and data files) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(path).parent.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    return dest / Path(path).name


def assert_refused(path, exc_type, *words, out_dir: Path | None = None, **open_kw):
    """Opening and reading all of `path` raises `exc_type` naming `words`; convert too, leaving
    no output file."""
    with pytest.raises(exc_type) as info:
        with qcowfast.open(path, **open_kw) as img:
            img.read(0, img.virtual_size)
    for w in words:
        assert w.lower() in str(info.value).lower(), (w, str(info.value))
    if out_dir is not None:
        out = out_dir / "refused.raw"
        before = set(out_dir.iterdir())
        with pytest.raises(exc_type):
            qcowfast.convert(path, out, **open_kw)
        assert not out.exists()
        assert set(out_dir.iterdir()) == before, "convert left files behind"
    return info.value


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats")


def _mkdir(workdir: Path, name: str) -> Path:
    d = workdir / name
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------------
# Compression types and cluster sizes


# (cluster size, compression type, extended L2): both types at both ends of the cluster range.
COMPRESSED_CASES = ([(cs, ct, False) for cs in (512, 4 * K, 64 * K, 2 * M) for ct in ("zlib", "zstd")]
                    + [(16 * K, "zstd", True), (16 * K, "zlib", True), (2 * M, "zstd", True)])


def _cid(case) -> str:
    cs, ct, extl2 = case
    return f"c{cs // K}k-{ct}" + ("-extl2" if extl2 else "") if cs >= K else f"c{cs}-{ct}"


@pytest.fixture(scope="module", params=COMPRESSED_CASES, ids=_cid)
def compressed_image(request, workdir) -> Path:
    cs, ct, extl2 = request.param
    d = _mkdir(workdir, "compressed-" + _cid(request.param))
    size = max(2 * M, 4 * cs) + 3 * 512
    (d / "src.raw").write_bytes(content(cs + len(ct), size))
    opts = f"cluster_size={cs},compression_type={ct}" + (",extended_l2=on" if extl2 else "")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", "image.qcow2",
             cwd=d)
    # Partial overwrites of compressed clusters: QEMU decompresses and rewrites them.
    qemu_io(d / "image.qcow2", f"write -P 0x5c {cs + 100} {cs // 3}", f"write -z {2 * cs} {cs}",
            f"write -z -u {3 * cs} {cs}", f"write -c -P 0x31 {3 * cs} {cs}")
    return d / "image.qcow2"


def test_compressed_clusters_match_qemu(compressed_image, workdir):
    cs = 1 << header_fields(compressed_image)["cluster_bits"]
    info = qemu_info_here(compressed_image)["format-specific"]["data"]
    assert compressed_extents(compressed_image) > 0
    with qcowfast.open(compressed_image) as img:
        assert img.cluster_size == cs
        assert int(img.header.compression_type) == {"zlib": 0, "zstd": 1}[
            info["compression-type"]]
        assert img.header.extended_l2 == info["extended-l2"]
        assert any(e.kind == ExtentKind.COMPRESSED for e in img.extents())
    check_image(compressed_image)
    check_convert(compressed_image, compressed_image.parent)


@pytest.fixture(scope="module", params=["zlib", "zstd"])
def compressed_base_chain(request, workdir) -> Path:
    """A zlib/zstd compressed base under an extended-L2 top with subcluster writes: parts of
    the base's compressed clusters show through next to the top's subclusters."""
    compression = request.param
    d = _mkdir(workdir, f"zbase-{compression}")
    (d / "base.raw").write_bytes(text(7, 2 * M))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size=32k,compression_type={compression}", "base.raw", "base.qcow2", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
             f"cluster_size=32k,extended_l2=on,compression_type={compression}", "top.qcow2",
             2 * M + 512, cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x41 1024 1024", "write -z 40k 2k",
            f"write -c -P 0x42 {64 * K} {32 * K}", f"write -P 0x43 {M - 100} 5000", cwd=d)
    assert compressed_extents(d / "top.qcow2") > 0
    return d / "top.qcow2"


def test_compressed_base_under_extl2_top(compressed_base_chain):
    check_image(compressed_base_chain)


@pytest.mark.parametrize("target", ["sparse-file", "dense-file", "stream"])
def test_compressed_base_under_extl2_top_convert(compressed_base_chain, target):
    """A base's compressed cluster inflates whole; the top's subclusters must still win."""
    want = qemu_raw(compressed_base_chain)
    if target == "stream":
        out = io.BytesIO()
        qcowfast.convert(compressed_base_chain, out)
        assert_same_bytes(out.getvalue(), want, "convert to a stream")
    else:
        dst = compressed_base_chain.parent / f"{target}.raw"
        qcowfast.convert(compressed_base_chain, dst, overwrite=True,
                         sparse_size=4096 if target == "sparse-file" else 0)
        assert_same_bytes(dst.read_bytes(), want, f"convert to a {target}")


# --------------------------------------------------------------------------------------------
# Extended L2 entries: the six subcluster types over a backing file


SUBCLUSTER_TYPES = {"unallocated-plain", "unallocated-alloc", "zero-plain", "zero-alloc", "normal",
                    "compressed"}


def subcluster_types(entry: int, bitmap: int) -> list[str]:
    """The 32 subcluster types of one extended L2 entry (qcow2.txt "Extended L2 Entries")."""
    if entry & OFLAG_COMPRESSED:
        return ["compressed"] * 32
    allocated = bool(entry & L2E_OFFSET_MASK)
    out = []
    for i in range(32):
        alloc, zero = bitmap >> i & 1, bitmap >> (32 + i) & 1
        if zero:
            out.append("zero-alloc" if allocated else "zero-plain")
        elif alloc:
            out.append("normal")
        else:
            out.append("unallocated-alloc" if allocated else "unallocated-plain")
    return out


def extl2_commands(cs: int) -> list[str]:
    """qemu-io commands at subcluster granularity; cluster k of the top is used as noted."""
    sc = cs // 32
    return [
        # 0: normal + unallocated-alloc (read from the base) + zero-alloc subclusters
        f"write -P 0x22 {sc} {sc}",
        f"write -z {3 * sc} {2 * sc}",
        f"write -z -u {6 * sc} {sc}",                 # cannot unmap part of a cluster: zero-alloc
        f"write -P 0x23 {10 * sc + 100} {3 * sc}",    # unaligned: copies the base's subclusters
        # 1: zero-plain subclusters in an otherwise unallocated cluster
        f"write -z {cs + 4 * sc} {sc}",
        f"write -z {cs + 20 * sc} {3 * sc}",
        # 2: the whole cluster zero-plain
        f"write -z -u {2 * cs} {cs}",
        # 3: written, then discarded (the base must stay hidden)
        f"write -P 0x44 {3 * cs} {cs}",
        f"discard {3 * cs} {cs}",
        # 4: a compressed cluster
        f"write -c -P 0x55 {4 * cs} {cs}",
        # 5: compressed, then partly overwritten (decompressed into a normal cluster)
        f"write -c -P 0x56 {5 * cs} {cs}",
        f"write -P 0x57 {5 * cs + 3 * sc} {sc}",
        # 6: untouched: unallocated-plain, reads the base (which ends inside it)
        # 7 and 8 (the partial last cluster): across their edge, and near the end
        f"write -P 0x12 {8 * cs - sc // 2} {sc}",
        f"write -P 0x77 {8 * cs + sc + 7} {2 * sc}",
        f"write -z {8 * cs + 5 * sc} {sc}",
    ]


@pytest.fixture(scope="module", params=[16 * K, 64 * K, 2 * M], ids=lambda c: f"c{c // K}k")
def extl2_chain(request, workdir) -> Path:
    cs = request.param
    sc = cs // 32
    d = _mkdir(workdir, f"extl2-c{cs // K}k")
    base_size = 6 * cs + 3 * sc                       # shorter than the top
    (d / "base.raw").write_bytes(content(cs, base_size))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", "base.raw",
             "base.qcow2", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
             f"cluster_size={cs},extended_l2=on", "top.qcow2", 8 * cs + 16 * sc, cwd=d)
    qemu_io(d / "top.qcow2", *extl2_commands(cs), cwd=d)
    return d / "top.qcow2"


def test_extl2_fixture_has_all_six_subcluster_types(extl2_chain):
    cs = 1 << header_fields(extl2_chain)["cluster_bits"]
    found = set()
    for k in range(9):
        found.update(subcluster_types(*l2_entry(extl2_chain, k * cs)))
    assert found == SUBCLUSTER_TYPES


def test_extl2_chain_matches_qemu(extl2_chain):
    check_image(extl2_chain)
    check_convert(extl2_chain, extl2_chain.parent)


def test_extl2_random_reads(extl2_chain):
    want = qemu_raw(extl2_chain)
    rng = random.Random(len(want))
    cs = 1 << header_fields(extl2_chain)["cluster_bits"]
    sc = cs // 32
    with qcowfast.open(extl2_chain) as img:
        for _ in range(200):
            off = rng.randrange(0, len(want), sc) + rng.choice((0, 0, -1, 1, rng.randrange(sc)))
            off = max(0, off)
            n = rng.choice((1, sc, rng.randrange(1, 3 * sc)))
            assert_same_bytes(img.read(off, n), want[off:off + n], "read", off)


def test_extl2_unallocated_subclusters_without_backing(extl2_chain, workdir):
    """Unallocated subclusters read as zeros once the backing file is gone (or ignored)."""
    d = _mkdir(workdir, f"nobacking-{extl2_chain.parent.name}")
    shutil.copyfile(extl2_chain, d / "top.qcow2")
    qemu_img("rebase", "-u", "-b", "", d / "top.qcow2")
    want = check_image(d / "top.qcow2")
    with qcowfast.open(extl2_chain, backing=False) as img:
        assert_same_bytes(img.read(0, img.virtual_size), want, "backing=False")


@pytest.fixture(scope="module")
def extl2_to_patch(workdir) -> Path:
    """A standalone extended-L2 image (64 KiB clusters) to patch."""
    d = _mkdir(workdir, "extl2-patch-src")
    (d / "base.raw").write_bytes(content(99, 9 * 64 * K))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
             "extended_l2=on", "top.qcow2", 9 * 64 * K, cwd=d)
    qemu_io(d / "top.qcow2", *extl2_commands(64 * K), cwd=d)
    return d / "top.qcow2"


def _bad_both(entry, bitmap):
    assert entry & L2E_OFFSET_MASK and not entry & OFLAG_COMPRESSED
    i = next(i for i in range(32) if bitmap >> i & 1)
    return entry, bitmap | 1 << (32 + i)          # subcluster i allocated and zero


def _bad_alloc_in_unallocated(entry, bitmap):
    assert not entry & L2E_OFFSET_MASK
    return entry, bitmap | 1 << 7


EXTL2_CORRUPTIONS = {
    # name: (cluster index in extl2_commands, mutator, words expected in the message)
    "allocated-and-zero": (0, _bad_both, ("subcluster",)),
    "alloc-bits-in-unallocated-cluster": (1, _bad_alloc_in_unallocated, ("subcluster",)),
    "alloc-bits-in-zero-plain-cluster": (2, _bad_alloc_in_unallocated, ("subcluster",)),
}
# A compressed cluster's bitmap and bit 0 of an extended entry are read as QEMU reads them
# (ignored): tests/test_parity.py, iotest 271.


@pytest.mark.parametrize("case", EXTL2_CORRUPTIONS)
def test_extl2_invalid_bitmaps_are_refused(case, extl2_to_patch, workdir):
    cluster, mutate, words = EXTL2_CORRUPTIONS[case]
    d = workdir / f"extl2-bad-{case}"
    top = copy_of(extl2_to_patch, d)
    guest = cluster * 64 * K
    entry, bitmap = mutate(*l2_entry(top, guest))
    patch(top, l2_entry_offset(top, guest), struct.pack(">QQ", entry, bitmap))
    err = assert_refused(top, qcowfast.CorruptImage, *words, out_dir=d)
    assert f"{guest:#x}" in str(err)
    # Other clusters stay readable.
    with qcowfast.open(top) as img:
        other = 6 * 64 * K
        assert img.read(other, 4096) == qemu_raw(extl2_to_patch)[other:other + 4096]


# --------------------------------------------------------------------------------------------
# External data files


@pytest.fixture(scope="module", params=["raw", "noraw", "extl2-backing"])
def data_file_image(request, workdir) -> Path:
    """An image with an external data file: data_file_raw on or off, or extended L2 entries
    (32 KiB clusters) over a backing file (QEMU refuses data_file_raw with a backing file)."""
    raw = request.param == "raw"
    d = _mkdir(workdir, f"datafile-{request.param}")
    opts = f"data_file=data.img,data_file_raw={'on' if raw else 'off'}"
    args = []
    if request.param == "extl2-backing":
        (d / "base.raw").write_bytes(content(11, 3 * M))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2", cwd=d)
        opts += ",extended_l2=on,cluster_size=32k"
        args = ["-b", "base.qcow2", "-F", "qcow2"]
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *args, "image.qcow2", 3 * M + 1536, cwd=d)
    (d / "pattern.bin").write_bytes(content(5, 300 * K))
    qemu_io(d / "image.qcow2",
            "write -P 0x61 0 1000",                        # host offset 0 (COPIED marks it)
            f"write -s pattern.bin {100 * K + 3} {250 * K}",
            f"write -z {128 * K} {64 * K}",
            f"discard {M} {128 * K}",
            f"write -P 0x62 {M + 70 * K} 4096",
            f"write -z -u {2 * M} {64 * K}",
            f"write -P 0x63 {3 * M} 1536", cwd=d)
    return d / "image.qcow2"


def test_data_file_matches_qemu(data_file_image):
    with qcowfast.open(data_file_image) as img:
        assert img.header.has_data_file
        assert img.header.data_file == "data.img"
        raw = img.header.data_file_raw
    assert raw == qemu_info_here(data_file_image)["format-specific"]["data"]["data-file-raw"]
    got = check_image(data_file_image)
    check_convert(data_file_image, data_file_image.parent)
    # QEMU always places a cluster at its guest offset in the data file.
    for e in qemu_map_here(data_file_image):
        if "offset" in e and e["depth"] == 0:
            assert e["offset"] == e["start"]
    if raw:
        # data_file_raw: the data file is itself the raw guest image.
        data = (data_file_image.parent / "data.img").read_bytes()
        assert_same_bytes(data[:len(got)].ljust(len(got), b"\0"), got, "data file")


def test_data_file_host_offset_zero_is_allocated(data_file_image):
    entry, _ = l2_entry(data_file_image, 0)
    assert entry & L2E_OFFSET_MASK == 0 and entry & OFLAG_COPIED
    with qcowfast.open(data_file_image) as img:
        first = next(img.extents(0, 1))
        assert first.kind == ExtentKind.DATA and first.host_offset == 0
        assert img.read(0, 1000) == b"\x61" * 1000


@pytest.mark.parametrize("extl2", [False, True], ids=["standard", "extl2"])
def test_data_file_zero_cluster_at_host_offset_zero(workdir, extl2):
    """A zeroed cluster at guest (= host) offset 0 of a data file keeps COPIED with offset 0.

    With standard entries QEMU tests the zero flag first: ZERO_PLAIN, no host offset in the
    map. With extended L2 the cluster stays allocated at 0 (zero subclusters are ZERO_ALLOC).
    """
    d = _mkdir(workdir, f"datafile-zero-at-0-{extl2}")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=data.img" + (",extended_l2=on" if extl2 else ""), "image.qcow2", M, cwd=d)
    qemu_io(d / "image.qcow2", f"write -P 0x1 0 {128 * K}", f"write -z 0 {64 * K}",
            f"write -z {64 * K} {4 * K}", cwd=d)
    entry, bitmap = l2_entry(d / "image.qcow2", 0)
    assert entry & OFLAG_COPIED and not entry & L2E_OFFSET_MASK
    assert (bitmap >> 32 == 0xFFFFFFFF) if extl2 else (entry & 1)
    check_image(d / "image.qcow2")


def test_data_file_compressed_cluster_is_refused(data_file_image, workdir):
    d = workdir / f"datafile-compressed-{data_file_image.parent.name}"
    top = copy_of(data_file_image, d)
    guest = M + 64 * K
    entry, _ = l2_entry(top, guest)
    assert entry & L2E_OFFSET_MASK
    # A compressed descriptor pointing at the cluster (one sector long), bitmap cleared.
    descriptor = struct.pack(">Q", OFLAG_COMPRESSED | (entry & L2E_OFFSET_MASK))
    if header_fields(top)["incompatible"] & 16:
        descriptor += bytes(8)
    patch(top, l2_entry_offset(top, guest), descriptor)
    assert_refused(top, qcowfast.CorruptImage, "compressed", "external data file", out_dir=d)


def test_data_file_explicit_path(data_file_image, workdir):
    d = workdir / f"datafile-moved-{data_file_image.parent.name}"
    top = copy_of(data_file_image, d)
    other = _mkdir(workdir, f"datafile-elsewhere-{data_file_image.parent.name}")
    os.rename(d / "data.img", other / "moved.img")
    with pytest.raises(qcowfast.BackingChainError):
        qcowfast.open(top)
    want = qemu_raw(data_file_image)
    with qcowfast.open(top, data_file=other / "moved.img") as img:
        assert_same_bytes(img.read(0, img.virtual_size), want, "explicit data_file")
    out = d / "explicit.raw"
    qcowfast.convert(top, out, data_file=str(other / "moved.img"))
    assert_same_bytes(out.read_bytes(), want, "convert with data_file")


@pytest.fixture(scope="module")
def absolute_data_file(workdir) -> Path:
    """An image naming its data file by an absolute path in another directory."""
    d = _mkdir(workdir, "datafile-absolute")
    elsewhere = _mkdir(workdir, "datafile-absolute-target")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={elsewhere / 'abs.img'}",
             "image.qcow2", M, cwd=d)
    qemu_io(d / "image.qcow2", f"write -P 0x71 {64 * K} {100 * K}", cwd=d)
    return d / "image.qcow2"


def test_data_file_path_policy(absolute_data_file):
    target = absolute_data_file.parent.parent / "datafile-absolute-target"
    with pytest.raises(qcowfast.UnsafePathError, match="absolute"):
        qcowfast.open(absolute_data_file)
    want = qemu_raw(absolute_data_file)
    for kw in (dict(data_file=target / "abs.img"), dict(backing_dirs=[target])):
        with qcowfast.open(absolute_data_file, **kw) as img:
            assert_same_bytes(img.read(0, img.virtual_size), want, f"open {kw}")


def test_data_file_escaping_name_is_refused(workdir):
    d = _mkdir(workdir, "datafile-escape")
    _mkdir(workdir, "datafile-escape-target")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=../datafile-escape-target/x.img",
             "image.qcow2", M, cwd=d)
    with pytest.raises(qcowfast.UnsafePathError, match="outside"):
        qcowfast.open(d / "image.qcow2")
    with qcowfast.open(d / "image.qcow2", data_file=workdir / "datafile-escape-target/x.img") as img:
        assert img.read(0, 4096) == bytes(4096)


def test_data_file_feature_without_name_needs_explicit_path(data_file_image, workdir):
    d = workdir / f"datafile-noname-{data_file_image.parent.name}"
    top = copy_of(data_file_image, d)
    # Rename the data file name extension to an unknown type: QEMU and qcowfast skip those.
    ext = _find_extension(top, 0x44415441)
    patch(top, ext, struct.pack(">I", 0x7E57E57E))
    with pytest.raises(qcowfast.FormatError, match="data_file"):
        qcowfast.open(top)
    with qcowfast.open(top, data_file=d / "data.img") as img:
        assert_same_bytes(img.read(0, img.virtual_size), qemu_raw(data_file_image),
                          "data file without a name")


def test_data_file_argument_without_the_feature(workdir, v2_image):
    with pytest.raises(qcowfast.FormatError, match="no external data file"):
        qcowfast.open(v2_image, data_file=v2_image)


def _find_extension(path, ext_type: int) -> int:
    """File offset of the header extension of type `ext_type`."""
    h = header_fields(path)
    off = h["header_length"]
    data = read_at(path, 0, 1 << h["cluster_bits"])
    while True:
        t, n = struct.unpack_from(">II", data, off)
        if t == ext_type:
            return off
        assert t != 0, f"no extension {ext_type:#x}"
        off += 8 + (n + 7 & ~7)


# --------------------------------------------------------------------------------------------
# Version 2 images


@pytest.fixture(scope="module")
def v2_image(workdir) -> Path:
    d = _mkdir(workdir, "v2")
    (d / "src.raw").write_bytes(content(2, 2 * M + 512))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4k",
             "src.raw", "image.qcow2", cwd=d)
    qemu_io(d / "image.qcow2", "write -z 8k 16k", "discard 64k 64k", "write -P 0x2f 70k 1k",
            cwd=d)
    return d / "image.qcow2"


def test_v2_image_matches_qemu(v2_image):
    with qcowfast.open(v2_image) as img:
        assert img.header.version == 2 and img.header.header_length == 72
    check_image(v2_image)


def test_v2_compressed_chain_matches_qemu(workdir):
    d = _mkdir(workdir, "v2-chain")
    (d / "base.raw").write_bytes(text(3, 2 * M))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", "base.raw",
             "base.qcow2", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "-b",
             "base.qcow2", "-F", "qcow2", "top.qcow2", 3 * M, cwd=d)
    qemu_io(d / "top.qcow2", "write -P 0x1 1000 3000", "discard 64k 4k", "write -z 128k 8k",
            cwd=d)
    check_image(d / "top.qcow2")


def test_v2_zero_flag_is_refused(v2_image, workdir):
    d = workdir / "v2-zero-flag"
    top = copy_of(v2_image, d)
    guest = 68 * K                                # written by the fixture: allocated
    entry, _ = l2_entry(top, guest)
    assert entry & L2E_OFFSET_MASK
    patch(top, l2_entry_offset(top, guest), struct.pack(">Q", entry | 1))
    with pytest.raises(QemuToolError):           # QEMU refuses it too
        qemu_img("convert", "-O", "raw", top, d / "qemu.raw")
    err = assert_refused(top, qcowfast.CorruptImage, "zero", "version 2", out_dir=d)
    assert f"{guest:#x}" in str(err)


# --------------------------------------------------------------------------------------------
# Refcount widths, cluster sizes, header lengths, virtual sizes


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(refcount_bits, workdir):
    d = _mkdir(workdir, f"refcount-{refcount_bits}")
    (d / "src.raw").write_bytes(content(refcount_bits, M + 512))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o",
             f"refcount_bits={refcount_bits},cluster_size=4k", "src.raw", "image.qcow2", cwd=d)
    qemu_io(d / "image.qcow2", "write -P 0x3 5000 9000", "write -z 64k 8k", cwd=d)
    assert qemu_info_here(d / "image.qcow2")["format-specific"]["data"]["refcount-bits"] == refcount_bits
    with qcowfast.open(d / "image.qcow2") as img:
        assert img.header.refcount_bits == refcount_bits
    check_image(d / "image.qcow2")


CLUSTER_SIZES = [1 << b for b in range(9, 22)]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda c: f"c{c}")
def test_cluster_sizes(cs, compress, workdir):
    d = _mkdir(workdir, f"cluster-{cs}-{compress}")
    size = max(2 * M, 5 * cs) + 3 * 512          # not a multiple of any cluster size > 512
    data = text(cs, size) if compress else content(cs, size)
    (d / "src.raw").write_bytes(data)
    args = ["convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}"]
    qemu_img(*args, *(["-c"] if compress else []), "src.raw", "image.qcow2", cwd=d)
    qemu_io(d / "image.qcow2", f"write -P 0x9 {cs // 2 + 7} {cs + 1000}",
            f"write -z {2 * cs} {cs}", f"discard {3 * cs} {cs}",
            f"write -P 0xa {size - 700} 700", cwd=d)
    if compress:
        assert compressed_extents(d / "image.qcow2") > 0
    with qcowfast.open(d / "image.qcow2") as img:
        assert img.cluster_size == cs
        assert img.virtual_size == size
    check_image(d / "image.qcow2")


def _shift_extensions(src: Path, dst: Path, header_length: int) -> None:
    """Copy a v3 image, moving its header extensions so the header is `header_length` bytes."""
    data = bytearray(src.read_bytes())
    old = struct.unpack_from(">I", data, 100)[0]
    end = old
    while True:
        t, n = struct.unpack_from(">II", data, end)
        end += 8 + (n + 7 & ~7)
        if t == 0:
            break
    exts = bytes(data[old:end])
    keep = bytes(data[104:min(old, header_length)])   # compression type byte and padding
    data[104:end] = bytes(end - 104)
    data[104:104 + len(keep)] = keep
    data[header_length:header_length + len(exts)] = exts
    struct.pack_into(">I", data, 100, header_length)
    dst.write_bytes(data)


@pytest.mark.parametrize("header_length", [104, 105, 112, 116, 120, 256])
def test_header_lengths(header_length, workdir):
    d = _mkdir(workdir, f"header-length-{header_length}")
    (d / "src.raw").write_bytes(content(header_length, M + 512))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "src.raw", "qemu.qcow2", cwd=d)
    assert header_fields(d / "qemu.qcow2")["header_length"] == 112    # what QEMU 7.2 writes
    _shift_extensions(d / "qemu.qcow2", d / "image.qcow2", header_length)
    assert header_fields(d / "image.qcow2")["header_length"] == header_length
    with qcowfast.open(d / "image.qcow2") as img:
        assert img.header.header_length == header_length
        assert img.header.feature_names.get((0, 4)) == "extended L2 entries"
    check_image(d / "image.qcow2")


@pytest.mark.parametrize("size", [512, 64 * K + 512, 3 * M - 1536, 5 * M + 3584])
def test_virtual_sizes_not_cluster_multiples(size, workdir):
    d = _mkdir(workdir, f"vsize-{size}")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "image.qcow2", size, cwd=d)
    qemu_io(d / "image.qcow2", f"write -P 0xe {max(0, size - 5000)} {min(size, 5000)}",
            f"write -P 0xf 0 {min(size, 1000)}", cwd=d)
    check_image(d / "image.qcow2")


def test_virtual_size_rounded_down_to_sectors_like_qemu(workdir):
    d = _mkdir(workdir, "vsize-unaligned")
    qemu_img("create", "-q", "-f", "qcow2", "image.qcow2", M, cwd=d)
    qemu_io(d / "image.qcow2", f"write -P 0xd {M - 4096} 4096", cwd=d)
    patch(d / "image.qcow2", 24, struct.pack(">Q", M - 100))
    assert qemu_info_here(d / "image.qcow2")["virtual-size"] == M - 512
    check_image(d / "image.qcow2")


# --------------------------------------------------------------------------------------------
# Dirty and corrupt bits, unknown compatible and autoclear bits: all readable


def test_dirty_lazy_refcounts_image(workdir):
    d = _mkdir(workdir, "dirty")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "image.qcow2", M, cwd=d)
    with pytest.raises(QemuToolError):          # "abort" kills qemu-io: the dirty bit stays set
        qemu_io(d / "image.qcow2", "write -P 0x5 1000 100000", "abort", cwd=d)
    assert header_fields(d / "image.qcow2")["incompatible"] & 1
    with qcowfast.open(d / "image.qcow2") as img:
        assert img.header.dirty
    check_image(d / "image.qcow2")


@pytest.mark.parametrize("field,bit", [(72, 1), (80, 40), (88, 63)],
                         ids=["corrupt-bit", "unknown-compatible", "unknown-autoclear"])
def test_harmless_feature_bits(field, bit, workdir):
    d = _mkdir(workdir, f"bits-{field}-{bit}")
    qemu_img("create", "-q", "-f", "qcow2", "image.qcow2", M, cwd=d)
    qemu_io(d / "image.qcow2", "write -P 0x6 3000 70000", cwd=d)
    value = struct.unpack(">Q", read_at(d / "image.qcow2", field, 8))[0]
    patch(d / "image.qcow2", field, struct.pack(">Q", value | 1 << bit))
    check_image(d / "image.qcow2")


def _rewrite_extensions(path, extensions) -> None:
    """Replace the header extensions of `path` by `extensions` [(type, payload)...] (each padded
    to 8 bytes, then the end marker), in the room before the backing file name."""
    head = bytearray(read_at(path, 0, 4096))
    start = struct.unpack_from(">I", head, 100)[0]
    area = b"".join(struct.pack(">II", t, len(p)) + p + bytes(-len(p) % 8)
                    for t, p in extensions) + bytes(8)
    limit = struct.unpack_from(">Q", head, 8)[0] or 4096
    assert start + len(area) <= limit
    patch(path, start, area)


@pytest.mark.parametrize("case", ["backing-format", "feature-table", "data-file"])
def test_header_extension_given_twice(case, workdir):
    """qcow2.txt: an extension SHOULD NOT appear twice; QEMU opens such an image all the same,
    the later one's values replacing the earlier one's: so does qcowfast (it refused them)."""
    d = _mkdir(workdir, f"twice-{case}")
    img = d / "image.qcow2"
    names = struct.pack(">BB46s", 0, 0, b"dirty bit") + struct.pack(">BB46s", 0, 1, b"corrupt")
    if case == "backing-format":
        (d / "base.raw").write_bytes(content(31, 256 * K))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img.name, M,
                 cwd=d)
        twice = [(0xE2792ACA, b"qcow2"), (0xE2792ACA, b"raw")]
    elif case == "feature-table":
        qemu_img("create", "-q", "-f", "qcow2", img.name, M, cwd=d)
        twice = [(0x6803F857, names[:48]), (0x6803F857, names)]
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=other.raw", img.name, M, cwd=d)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "x.qcow2", M, cwd=d)
        twice = [(0x44415441, b"other.raw"), (0x44415441, b"data.raw")]
    qemu_io(img, "write -P 0x3c 64k 100k", cwd=d)
    _rewrite_extensions(img, twice)
    got = check_image(img)
    if case == "data-file":
        assert got[64 * K:164 * K] == bytes(100 * K)        # data.raw's, not other.raw's
    ours = run_cli("info", "--output=json", img.name, cwd=d)
    want = qemu_img("info", "--output=json", img.name, cwd=d)
    assert ours.returncode == 0 and json.loads(ours.stdout) == json.loads(want.stdout), ours.stderr


STALE_BITMAPS = "a program lacking bitmap support modified this file"


@pytest.mark.parametrize("autoclear", [False, True], ids=["autoclear-clear", "autoclear-set"])
def test_bitmaps_extension_without_its_autoclear_bit(autoclear, workdir):
    """A bitmaps extension whose autoclear bit a bitmap-unaware program cleared: QEMU ignores
    the bitmaps and warns at every open (qcow2_read_extensions()); qcowfast reads the image
    as QEMU does and warns too, once per command: in qemu-img's words on the command line,
    naming the file from Python. With the bit kept (the bitmap intact), neither tool warns."""
    d = _mkdir(workdir, f"stale-bitmaps-{autoclear}")
    img = d / "image.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img.name, 4 * M, cwd=d)
    qemu_io(img, "write -P 0x7 64k 200k", cwd=d)
    qemu_img("bitmap", "--add", img.name, "bm0", cwd=d)
    if not autoclear:
        value = struct.unpack(">Q", read_at(img, 88, 8))[0]
        assert value & 1                        # qemu-img set it (bit 0: bitmaps extension)
        patch(img, 88, struct.pack(">Q", value & ~1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_image(img)
        qcowfast.info(img)
        with qcowfast.open(img) as opened:
            assert opened.header.stale_bitmaps == (not autoclear)
            assert (opened.header.bitmaps is None) == (not autoclear)
    stale = [w for w in seen if issubclass(w.category, qcowfast.StaleBitmapsWarning)]
    assert bool(stale) == (not autoclear), [str(w.message) for w in seen]
    assert all(str(w.message).startswith(f"{img}: {STALE_BITMAPS}") for w in stale)
    out = d / "out.raw"
    for args in (["info", "--output=json", img.name], ["check", img.name],
                 ["map", "--output=json", img.name], ["convert", "-O", "raw", img.name, out.name]):
        want = subprocess.run([QEMU_IMG, *args], cwd=d, capture_output=True, text=True)
        out.unlink(missing_ok=True)
        got = run_cli(*args, cwd=d)
        assert (STALE_BITMAPS in want.stderr) == (not autoclear), want.stderr
        lines = [ln for ln in got.stderr.splitlines() if "warning" in ln]
        expected = [f"qcowfast: warning: {STALE_BITMAPS}, so all bitmaps are now considered "
                    "inconsistent"] if not autoclear else []
        assert lines == expected, (args, got.stderr)
        assert got.returncode == want.returncode, (args, got.stderr, want.stderr)
        if args[0] != "convert":                # (whose summary line qemu-img lacks)
            assert got.stdout == want.stdout, args
            assert got.stderr == want.stderr.replace("qemu-img: ", "qcowfast: "), args


# --------------------------------------------------------------------------------------------
# Refused: encryption and unknown incompatible features


def _plain(workdir, name) -> Path:
    d = _mkdir(workdir, name)
    qemu_img("create", "-q", "-f", "qcow2", "image.qcow2", M, cwd=d)
    qemu_io(d / "image.qcow2", "write -P 0x8 0 64k", cwd=d)
    return d / "image.qcow2"


def _create_encrypted(d: Path, opts: str) -> Path:
    args = ["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o",
            f"{opts},encrypt.key-secret=sec0", "image.qcow2", M]
    if "luks" not in opts:
        qemu_img(*args, cwd=d)
        return d / "image.qcow2"
    args[7] += ",encrypt.iter-time=10"
    qemu_img_pbkdf(*args, cwd=d)
    return d / "image.qcow2"


def test_luks_is_refused(workdir):
    d = _mkdir(workdir, "luks")
    img = _create_encrypted(d, "encrypt.format=luks")
    assert header_fields(img)["crypt_method"] == 2
    assert_refused(img, qcowfast.EncryptedImage, "LUKS", out_dir=d)


def test_legacy_aes_is_refused(workdir):
    d = _mkdir(workdir, "aes")
    img = _create_encrypted(d, "encryption=on")
    assert header_fields(img)["crypt_method"] == 1
    assert_refused(img, qcowfast.EncryptedImage, "AES", out_dir=d)


def test_unknown_crypt_method_is_refused(workdir):
    img = _plain(workdir, "crypt-3")
    patch(img, 32, struct.pack(">I", 3))
    err = assert_refused(img, qcowfast.EncryptedImage, "method 3", out_dir=img.parent)
    assert isinstance(err, qcowfast.UnsupportedFeature)


def test_unknown_incompatible_bit_named_by_the_feature_table(workdir):
    img = _plain(workdir, "incompat-named")
    # Re-purpose the feature table's "lazy refcounts" entry (type 1, bit 0) as incompatible bit 9.
    table = _find_extension(img, 0x6803F857) + 8
    data = read_at(img, table, 384)
    i = next(i for i in range(8) if data[48 * i:48 * i + 2] == b"\x01\x00")
    patch(img, table + 48 * i, b"\x00\x09" + b"frobnicated clusters".ljust(46, b"\0"))
    incompat = header_fields(img)["incompatible"]
    patch(img, 72, struct.pack(">Q", incompat | 1 << 9))
    with pytest.raises(QemuToolError, match="frobnicated clusters"):   # QEMU names it so too
        qemu_img("info", img)
    assert_refused(img, qcowfast.UnsupportedFeature, "frobnicated clusters", out_dir=img.parent)


def test_unknown_incompatible_bit_without_a_name(workdir):
    img = _plain(workdir, "incompat-unnamed")
    patch(img, 72, struct.pack(">Q", 1 << 30 | 1 << 61))
    err = assert_refused(img, qcowfast.UnsupportedFeature, "bit 30", "bit 61", out_dir=img.parent)
    assert not isinstance(err, qcowfast.EncryptedImage)
