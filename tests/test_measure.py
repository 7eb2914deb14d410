"""``qcowfast measure`` against ``qemu-img measure`` (QEMU 7.2).

Oracle: ``qemu-img measure --output=json`` (and its human text) on the same file with the same
options. The Python API is compared over every catalogue image with a set of qcow2 options,
over cluster sizes 512..2M x refcount widths 1..64 without a source, and over sources made
here (bitmaps, in-use and duplicate bitmaps, a stale bitmaps extension, sparse and odd-sized
raw files, virtual sizes of terabytes to petabytes, snapshots, preallocated images, external
data files). The command line is compared byte for byte (stdout and exit status), and each of
its failures is one ``qcowfast:`` line.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pytest

import qcowfast
from qcowfast.measure import Measurement, measure
from common import cli_in_process as cli, qemu_img, qemu_io, run_cli

K = 1024
M = 1024 * K
T = 1024 * 1024 * M


def qemu_measure(*args, cwd=None) -> tuple[int, str]:
    """(exit status, stdout) of ``qemu-img measure ARGS``."""
    proc = subprocess.run(["qemu-img", "measure", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, check=False)
    return proc.returncode, proc.stdout


def want_json(*args) -> dict:
    status, out = qemu_measure("--output=json", *args)
    assert status == 0, args
    return json.loads(out)


def option_args(fmt: str, kw: dict) -> list[str]:
    """-O and -o for measure() keywords."""
    items = [f"{k}={('on' if v else 'off') if isinstance(v, bool) else v}"
             for k, v in kw.items()]
    return ["-O", fmt, *(["-o", ",".join(items)] if items else [])]


def assert_same(src, fmt: str = "qcow2", **kw) -> dict:
    """measure(src) gives the JSON qemu-img measure prints for the same options."""
    __tracebackhide__ = True
    want = want_json(*option_args(fmt, kw), src)
    got = measure(src, format=fmt, **kw).to_json()
    assert got == want, (src, fmt, kw)
    return got


# --------------------------------------------------------------------------------------------
# Every catalogue image (chains, compressed, zero and zero-alloc clusters, extended L2,
# snapshots, metadata preallocation, raw backing files) with a spread of qcow2 options.

OPTION_SETS = [
    ("raw", {}),
    ("qcow2", {}),
    ("qcow2", {"cluster_size": 512, "refcount_bits": 1}),
    ("qcow2", {"cluster_size": 2 * M, "refcount_bits": 64, "extended_l2": True}),
    ("qcow2", {"cluster_size": 16 * K, "extended_l2": True, "refcount_bits": 2}),
    ("qcow2", {"compat": "0.10", "cluster_size": 4 * K}),
    ("qcow2", {"preallocation": "full", "cluster_size": 32 * K}),
    ("qcow2", {"backing_file": "elsewhere.qcow2", "refcount_bits": 8}),
]


def test_catalogue_image_matches_qemu(image):
    for fmt, kw in OPTION_SETS:
        assert_same(image.path, fmt, **kw)


def test_data_size_from_runs_equals_the_entry_loop(image):
    """data_size counts the chain's runs with numpy (cut at the host file's holes for raw and
    metadata-preallocated layers): the same clusters as a loop over the map's entries."""
    from qcowfast.image import open_source
    from qcowfast.mapping import iter_entries
    from qcowfast.measure import data_size
    with open_source(str(image.path)) as img:
        entries = [e for e in iter_entries(img) if e["data"] and not e["zero"]]
        for bits in (9, 12, 16, 21):
            cs = 1 << bits
            clusters = set()
            for e in entries:
                clusters.update(range(e["start"] // cs, -(-(e["start"] + e["length"]) // cs)))
            assert data_size(img, cs) == len(clusters) * cs, bits


def test_many_entries_measure_as_qemu(tmp_path):
    """Thousands of entries, every other 512-byte cluster holding data (the runs path)."""
    raw = tmp_path / "striped.raw"
    raw.write_bytes((b"\7" * 512 + bytes(512)) * 16384)
    src = tmp_path / "striped.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-S", "512", "-o", "cluster_size=512",
             raw, src)
    for fmt, kw in (("qcow2", {}), ("raw", {}), ("qcow2", {"cluster_size": 2 * M}),
                    ("qcow2", {"cluster_size": 1024})):
        assert_same(src, fmt, **kw)


# --------------------------------------------------------------------------------------------
# Without a source: the arithmetic of qcow2_calc_prealloc_size() and the L1 limit.

@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_size_matrix_matches_qemu(cluster_bits):
    cs = 1 << cluster_bits
    l1_limit = (32 * M // 8) * (cs // 8) * cs          # largest size the L1 table can map
    for i, bits in enumerate((1, 2, 4, 8, 16, 32, 64)):
        extl2 = cs >= 16 * K and i % 2 == 1
        limit = l1_limit // 2 if extl2 else l1_limit
        for size in (0, 1000 + i, (5 + i) * M + 512 * i, min(3 * T, limit // 3) + cs - 1, limit):
            kw = {"cluster_size": cs, "refcount_bits": bits, "extended_l2": extl2}
            want = want_json(*option_args("qcow2", kw), "--size", size)
            assert measure(size=size, format="qcow2", **kw).to_json() == want, (size, kw)
        kw = {"cluster_size": cs, "extended_l2": extl2}
        status, _ = qemu_measure(*option_args("qcow2", kw), "--size", limit + 1)
        assert status == 1
        with pytest.raises(ValueError, match="image size is too large"):
            measure(size=limit + 1, format="qcow2", **kw)


def test_raw_output_without_source_rounds_to_sectors():
    for size in (0, 1, 511, 512, 1000, 7 * T + 3):
        assert measure(size=size).to_json() == want_json("--size", size)


# --------------------------------------------------------------------------------------------
# Sources made here

BITMAPS = (("b1", 512), ("a-much-longer-bitmap-name-for-the-directory", 65536), ("b3", 2 * M))


def _bitmap_entries(path: Path) -> list[int]:
    """File offsets of the bitmap directory entries (qcow2.txt "Bitmaps extension", "Bitmap
    directory": the extension after the v3 header, 24-byte entries, 8-byte aligned)."""
    data = path.read_bytes()[:64 * K]
    pos = struct.unpack_from(">I", data, 100)[0]           # header_length
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        assert magic, "no bitmaps extension"
        if magic == 0x23852875:
            _, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            break
        pos += 8 + (length + 7 & ~7)
    with open(path, "rb") as f:
        f.seek(offset)
        directory = f.read(size)
    entries, at = [], 0
    while at < size:
        name_size, extra = struct.unpack_from(">HI", directory, at + 18)
        entries.append(offset + at)
        at += 24 + extra + name_size + 7 & ~7
    return entries


def _set_in_use(path: Path, entry: int, rename: bytes = b"") -> None:
    """Set the in-use flag of the bitmap directory entry at `entry` (optionally renaming it in
    place)."""
    with open(path, "r+b") as f:
        f.seek(entry + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(entry + 12)
        f.write(struct.pack(">I", flags | 1))
        if rename:
            f.seek(entry + 24)
            f.write(rename)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("measure")
    out = {}

    def create(name, size, *opts):
        path = d / name
        qemu_img("create", "-q", "-f", "qcow2", *opts, path, size)
        out[name.split(".")[0]] = path
        return path

    bm = create("bitmaps.qcow2", 10 * M)
    qemu_io(bm, "write -P 0x11 0 100k", "write -P 0x22 5M 1k")
    for name, granularity in BITMAPS:
        qemu_img("bitmap", "--add", "-g", granularity, bm, name)
    # Copies keep the bitmaps' sparse clusters sparse (QEMU's allocation guess looks at them).
    for name in ("inuse", "duplicate", "stale"):
        out[name] = d / f"{name}.qcow2"
        subprocess.run(["cp", "--sparse=always", bm, out[name]], check=True)
    first, second, third = _bitmap_entries(out["inuse"])
    _set_in_use(out["inuse"], second)
    # An in-use bitmap named as an earlier one is skipped by QEMU (qcow2_load_dirty_bitmaps).
    _set_in_use(out["duplicate"], third, rename=b"b1")
    with open(out["stale"], "r+b") as f:                 # autoclear bit 0: bitmaps
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))

    raw = out["raw"] = d / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * M + 777)
        for at in (0, 100000, 2 * M - 10, 3 * M + 700):
            f.seek(at)
            f.write(b"\x5a" * 50)
    big = out["bigraw"] = d / "big.raw"
    with open(big, "wb") as f:
        f.truncate(15 * T)                              # ext4's files end at 16 TiB
        f.seek(10 * T + 12345)
        f.write(b"x")
    # (qemu-img's block status loop takes seconds past these sizes)
    huge = create("huge64k.qcow2", 16 * T)
    qemu_io(huge, "write -P 1 10T 1M", "write -P 2 16383G 64k")
    huge2m = create("huge2m.qcow2", 256 * T, "-o", "cluster_size=2M")
    qemu_io(huge2m, "write -P 3 200T 4k")
    for mode in ("metadata", "falloc", "full"):
        p = create(f"prealloc-{mode}.qcow2", 5 * M, "-o", f"preallocation={mode}")
        qemu_io(p, "write -P 4 1M 100k")
    ext = create("datafile.qcow2", 4 * M, "-o", f"data_file={d / 'data.raw'}")
    qemu_io(ext, "write -P 5 0 100k")
    v2 = create("v2.qcow2", 10 * M, "-o", "compat=0.10")
    qemu_io(v2, "write -P 6 1M 3M")
    return out


MADE_OPTIONS = [("qcow2", {}), ("raw", {}), ("qcow2", {"cluster_size": 512}),
                ("qcow2", {"cluster_size": 2 * M, "refcount_bits": 64}),
                ("qcow2", {"compat": "0.10"})]


@pytest.mark.parametrize("name", ["bitmaps", "inuse", "duplicate", "stale", "raw", "bigraw",
                                  "huge64k", "huge2m", "prealloc-metadata", "prealloc-falloc",
                                  "prealloc-full", "datafile", "v2"])
def test_made_source_matches_qemu(made, name):
    for fmt, kw in MADE_OPTIONS:
        with pytest.warns(qcowfast.StaleBitmapsWarning) if name == "stale" else nullcontext():
            got = assert_same(made[name], fmt, **kw)
        assert ("bitmaps" in got) == (fmt == "qcow2" and kw.get("compat") != "0.10"
                                      and name not in ("raw", "bigraw", "v2"))


def test_bitmaps_size_is_qemus_sum(made):
    """bitmaps size: each bitmap's data and table in whole clusters, plus the directory (the
    sum iotest 190 computes); an in-use duplicate name is not counted, a stale extension
    counts nothing."""
    def up(n, d):
        return -(-n // d)

    cs = 64 * K
    expected = 0
    for name, granularity in BITMAPS:
        clusters = up(up(up(10 * M, granularity), 8), cs)
        expected += clusters * cs + up(clusters * 8, cs) * cs
    expected += cs                                          # the directory's one cluster
    assert measure(made["bitmaps"], format="qcow2").bitmaps == expected
    assert measure(made["inuse"], format="qcow2").bitmaps == expected
    assert measure(made["duplicate"], format="qcow2").bitmaps == expected - 2 * cs
    with pytest.warns(qcowfast.StaleBitmapsWarning):
        assert measure(made["stale"], format="qcow2").bitmaps == 0


@pytest.mark.images(ids=["c64k-v3-snapshot"])
def test_snapshots_measure_like_qemu(image):
    for key in ("s1", "1", "s2", "snapshot.name=s2", "snapshot.id=1,snapshot.name=s1"):
        for kw in ({}, {"cluster_size": 4 * K}):
            want = want_json(*option_args("qcow2", kw), "-l", key, image.path)
            assert measure(image.path, format="qcow2", snapshot=key, **kw).to_json() == want
    assert measure(image.path, format="qcow2", snapshot="s1").required != \
        measure(image.path, format="qcow2").required


def test_raw_longer_than_qemu_opens_is_refused(tmp_path):
    """qemu-img opens no file longer than 2**63 - 2**30 (EFBIG): neither does measure. Needs a
    file system with 8 EiB files (tmpfs: /dev/shm)."""
    limit = ((1 << 63) - 1) & ~((1 << 30) - 1)
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        os.truncate(f.name, limit)
        for kw in ({"cluster_size": 512, "refcount_bits": 64}, {"cluster_size": 2 * M}):
            # The sizes pass 2**63: JSON shows QEMU's int64 wrapped negative, human its PRIu64.
            got = assert_same(f.name, "qcow2", **kw)
            assert got["fully-allocated"] < 0
        os.truncate(f.name, limit + 512)
        assert qemu_measure(f.name)[0] == 1
        with pytest.raises(qcowfast.ImageOpenError, match="File too large"):
            measure(f.name)


# --------------------------------------------------------------------------------------------
# The Python API

def test_api_takes_an_opened_image_and_leaves_it_open(made):
    with qcowfast.open(made["bitmaps"]) as img:
        first = measure(img, format="qcow2", cluster_size=4096)
        assert measure(img, format="qcow2", cluster_size=4096) == first
        assert img.read(0, 1) == b"\x11"
    assert first == Measurement(**{k.replace("-", "_"): v for k, v in
                                   want_json("-O", "qcow2", "-o", "cluster_size=4096",
                                             made["bitmaps"]).items()})


@pytest.mark.parametrize("call, match", [
    (lambda p: measure(p, size=1), "not both"),
    (lambda p: measure(), "source image or size"),
    (lambda p: measure(size=1, format="vmdk"), "qcow2 and raw"),
    (lambda p: measure(p, cluster_size=4096), "Invalid parameter 'cluster_size'"),
    (lambda p: measure(size=1, format="qcow2", cluster_size=3000), "power of two"),
    (lambda p: measure(size=1, format="qcow2", compat="v3"), "compatibility level"),
    (lambda p: measure(size=1, format="qcow2", refcount_bits=128), "Refcount width"),
    (lambda p: measure(size=1, format="qcow2", compat="0.10", refcount_bits=8), "1.1 or above"),
    (lambda p: measure(size=1, format="qcow2", preallocation="sparse"), "parameter value"),
    (lambda p: measure(size=1, format="qcow2", extended_l2=True, cluster_size=8192),
     "at least 16384"),
])
def test_api_refuses_what_qemu_refuses(made, call, match):
    with pytest.raises(ValueError, match=match):
        call(made["raw"])


def test_public_name():
    assert qcowfast.measure is measure
    assert "measure" in qcowfast.__all__


# --------------------------------------------------------------------------------------------
# The command line, byte for byte

COMMAND_LINES = [
    ["--size", "1G"],
    ["-O", "qcow2", "--size", "1G"],
    ["--output=json", "-O", "qcow2", "--size", "1000"],
    ["--out", "json", "-Oqcow2", "--size=0x10000"],           # getopt: prefix, glued value
    ["-O", "qcow2", "--size", "1.5k"],
    ["--output=json", "--size", "9223372036854775807"],      # 2**63 after rounding: wraps
    ["-O", "qcow2", "-o", "cluster_size=64k,cluster_size=4k", "{bitmaps}"],   # last wins
    ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "refcount_bits=0x10", "{bitmaps}"],
    ["-O", "qcow2", "-o", "lazy_refcounts,nodata_file_raw,compression_type=zstd",
     "-o", "nocow=on,extent_size_hint=1M,backing_fmt=qcow2,data_file=x", "{bitmaps}"],
    ["{bitmaps}", "-O", "qcow2", "--output", "json"],         # options after the file
    ["-O", "qcow2", "-o", "preallocation=metadata", "-U", "{bitmaps}"],
    ["-O", "qcow2", "-o", "backing_file=x.qcow2", "{raw}"],
    ["-O", "raw", "-o", "preallocation=anything,nocow=on,size=5G", "{raw}"],
    ["-O", "qcow2", "-f", "raw", "{bitmaps}"],
    ["--output=json", "-O", "qcow2", "-l", "s2", "{snapshot}"],
    ["-O", "qcow2", "-l", "snapshot.id=1", "{snapshot}"],
    ["-O", "qcow2", "--object", "secret,id=sec0,data=x", "{v2}"],
]

FAILURES = [
    [],                                                     # neither --size nor a file
    ["--size", "1G", "{raw}"],                              # both
    ["-f", "raw", "--size", "1G"],
    ["-l", "s1", "--size", "1G"],
    ["{missing}"],
    ["{dir}"],
    ["-O", "vmdk", "--size", "1G"],
    ["-O", "nonsense", "{raw}"],
    ["-f", "vmdk", "{raw}"],
    ["-f", "qcow2", "{raw}"],
    ["--size", "1x"], ["--size", "-1"], ["--size", "8E"], ["--size", "1.5"],
    ["-O", "qcow2", "-o", "help", "--size", "1G"],
    ["-O", "qcow2", "-o", "foo=1", "{raw}"],
    ["-O", "qcow2", "-o", "nocow", "{raw}"],                # "cow=off": no such key
    ["-O", "raw", "-o", "cluster_size=4k", "{raw}"],
    ["-O", "qcow2", "-o", "lazy_refcounts=maybe", "{raw}"],
    ["-O", "qcow2", "-o", "cluster_size=4k,,", "{raw}"],
    ["-O", "qcow2", "-o", ",cluster_size=4k", "{raw}"],
    ["-O", "qcow2", "-o", "refcount_bits=16x", "{raw}"],
    ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=v3", "{raw}"],
    ["-O", "qcow2", "-o", "refcount_bits=-1", "{raw}"],
    ["-O", "qcow2", "-o", "refcount_bits=8,compat=0.10", "{raw}"],
    ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
    ["-O", "qcow2", "-o", "size=1P,cluster_size=512", "{raw}"],    # -o size, even with a file
    ["-O", "qcow2", "-l", "nope", "{snapshot}"],
    ["-O", "qcow2", "-l", "s1", "{raw}"],
]


# Failures qcowfast words its own way (a format it lacks, a file it cannot open): one line.
WORDED_OTHERWISE = [["{missing}"], ["{dir}"], ["-O", "vmdk", "--size", "1G"],
                    ["-O", "nonsense", "{raw}"], ["-f", "vmdk", "{raw}"],
                    ["-f", "qcow2", "{raw}"], ["-O", "qcow2", "-l", "s1", "{raw}"]]


def _fill_all(lines, made, snapshot: Path) -> list[list[str]]:
    return [_fill(args, made, snapshot) for args in lines]


def _fill(args, made, snapshot: Path) -> list[str]:
    names = {"bitmaps": made["bitmaps"], "raw": made["raw"], "v2": made["v2"],
             "snapshot": snapshot, "missing": made["raw"].parent / "missing.qcow2",
             "dir": made["raw"].parent}
    return [a.format(**names) for a in args]


@pytest.fixture(scope="module")
def snapshot_image(tmp_path_factory, made) -> Path:
    path = tmp_path_factory.mktemp("measure-snap") / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 4 * M)
    qemu_io(path, "write -P 7 0 1M")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 8 2M 1M")
    qemu_img("snapshot", "-c", "s2", path)
    qemu_io(path, "write -z 0 1M")
    return path


@pytest.mark.parametrize("args", COMMAND_LINES, ids=" ".join)
def test_command_line_prints_what_qemu_prints(made, snapshot_image, capsys, args):
    args = _fill(args, made, snapshot_image)
    status, out = qemu_measure(*args)
    assert status == 0, args
    assert cli(capsys, "measure", *args)[:2] == (0, out)


@pytest.mark.parametrize("args", FAILURES, ids=" ".join)
def test_command_line_fails_as_qemu_fails(made, snapshot_image, capsys, args):
    args = _fill(args, made, snapshot_image)
    assert qemu_measure(*args) == (1, "")
    status, out, err = cli(capsys, "measure", *args)
    assert (status, out) == (1, ""), err
    want = subprocess.run(["qemu-img", "measure", *map(str, args)], capture_output=True,
                          text=True).stderr.replace("qemu-img: ", "qcowfast: ")
    # (qemu-img's lines for the rest, each error_report() prefixed, hints unprefixed)
    if args not in _fill_all(WORDED_OTHERWISE, made, snapshot_image):
        assert err == want
    else:                                       # refused by name: one line
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcowfast: "), err


def test_encryption_options_are_refused_by_name(made, capsys):
    status, out, err = cli(capsys, "measure", "-O", "qcow2", "-o", "encrypt.format=luks",
                           made["raw"])
    assert (status, out) == (1, "") and err.startswith("qcowfast: -o encrypt.format: not "
                                                       "supported")


def test_hex_size_with_suffix_warns_as_qemu(capsys):
    proc = subprocess.run(["qemu-img", "measure", "--size", "0x10k"], capture_output=True,
                          text=True)
    status, out, err = cli(capsys, "measure", "--size", "0x10k")
    assert (status, out) == (0, proc.stdout)
    assert "deprecated: 0x10k" in proc.stderr and "deprecated: 0x10k" in err


def test_real_process(made):
    """The installed command, human and JSON, as a whole process."""
    for extra in ([], ["--output=json"]):
        args = [*extra, "-O", "qcow2", "-o", "cluster_size=512", made["bitmaps"]]
        proc = run_cli("measure", *args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, qemu_measure(*args)[1], "")
    proc = run_cli("measure")
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.startswith("qcowfast: ")
