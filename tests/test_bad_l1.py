"""Images with a bad L1 entry: reserved bits set, an unaligned L2 table offset, or an L2 table
past the end of the file.

QEMU opens such an image and fails (EIO) only the queries that reach an unaligned entry; it
reads the other two kinds (as unallocated, or ignoring the bits), which qcowfast refuses (see
README, Differences). qcowfast opens them too and fails where a read reaches the entry: the
oracle for the unaligned kind is qemu-img on the same image, and for the other two kinds qemu-img
on a twin of the image whose entry is unaligned instead (the same bytes at the same names).
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

import qcowfast
from common import QEMU_IMG, QEMU_IO, assert_same_bytes, qemu_img, qemu_io, run_cli
from qcowfast.errors import CorruptImage, TruncatedImage

K, M, G = 1 << 10, 1 << 20, 1 << 30
COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


# -- damaging an L1 entry ----------------------------------------------------------------------

def _l1_at(path: Path, index: int) -> int:
    with open(path, "rb") as f:
        l1_offset, = struct.unpack_from(">Q", f.read(48), 40)
    return l1_offset + 8 * index


def set_l1(path: Path, index: int, kind: str) -> int:
    """Break L1 entry `index` of `path` the way `kind` says; return the new entry."""
    at = _l1_at(path, index)
    with open(path, "r+b") as f:
        f.seek(at)
        old, = struct.unpack(">Q", f.read(8))
        new = {"unaligned": COPIED | ((old & OFFSET_MASK) or 0x10000) + 0x200,
               "past-eof": COPIED | 0x7000_0000,     # (aligned to every cluster size)
               "reserved": old | 1 << 56}[kind]
        f.seek(at)
        f.write(struct.pack(">Q", new))
    return new


KINDS = ("unaligned", "past-eof", "reserved")
ERRORS = {"unaligned": (CorruptImage, r"L2 table offset 0x[0-9a-f]+ is not aligned to the "
                                      r"cluster size"),
          "past-eof": (TruncatedImage, r"L2 table at 0x70000000 lies past the end of the file"),
          "reserved": (CorruptImage, r"reserved bits are set")}


def message(name: str, index: int, kind: str) -> str:
    """The pattern of qcowfast's error for bad L1 entry `index` of file `name`."""
    return rf"{re.escape(name)}: L1 entry {index} \(0x[0-9a-f]{{16}}\): {ERRORS[kind][1]}"


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def one_line(proc, pattern: str) -> None:
    __tracebackhide__ = True
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfast: "), proc.stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


# -- chains (each returns its top file and the (file, L1 index) to break) -------------------

def _create(d: Path, name: str, size, *writes: str, opts: str = "", backing=None,
            fmt: str = "qcow2") -> Path:
    p = d / name
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", fmt]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, p, size, cwd=d)
    if writes:
        qemu_io(p, *writes)
    return p


def chain_top(d):
    """One image: data at 0, 2G and 3G; L1 entry 4 maps [2G, 2.5G)."""
    top = _create(d, "t.qcow2", "4G", "write -P 0x11 0 64k", "write -P 0x22 2G 64k",
                  "write -P 0x33 3G 64k")
    return top, (top, 4)


def chain_first(d):
    top, _ = chain_top(d)
    return top, (top, 0)


def chain_last(d):
    top, _ = chain_top(d)
    return top, (top, 6)


def chain_under_hole(d):
    """The base's bad range lies under an unallocated stretch of the overlay."""
    base = _create(d, "b.qcow2", "4G", "write -P 1 0 64k", "write -P 2 2049M 64k")
    top = _create(d, "t.qcow2", "4G", "write -P 3 1G 64k", backing="b.qcow2")
    return top, (base, 4)


def chain_under_data(d):
    """The overlay's data covers the start of the base's bad range: QEMU first asks the base
    at the end of that data (2G + 64k)."""
    base = _create(d, "b.qcow2", "4G", "write -P 1 2049M 64k", "write -P 2 3G 64k")
    top = _create(d, "t.qcow2", "4G", "write -P 3 2G 64k", "write -P 4 2176M 64k",
                  backing="b.qcow2")
    return top, (base, 4)


def chain_over_backing(d):
    base = _create(d, "b.qcow2", "4G", "write -P 1 1G 64k", "write -P 2 2G 64k",
                   "write -P 3 3G 64k")
    top = _create(d, "t.qcow2", "4G", "write -P 4 0 64k", "write -P 5 2112M 64k",
                  backing="b.qcow2")
    return top, (top, 4)


def chain_raw_backing(d):
    """A raw base: the map is built entry by entry (file holes split its runs)."""
    raw = d / "b.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * G)
        for at in (G, 2 * G + M):
            f.seek(at)
            f.write(b"\5" * 8192)
    top = _create(d, "t.qcow2", "4G", "write -P 4 0 64k", backing="b.raw", fmt="raw")
    return top, (top, 4)


def chain_big_over_small(d):
    """2 MiB clusters over 64 KiB ones: one of the overlay's unallocated runs spans the start
    of the base's bad range (QEMU's query of the base ends at its own table's end first)."""
    base = _create(d, "b.qcow2", "4G", "write -P 1 1G 64k", "write -P 2 2G 64k")
    top = _create(d, "t.qcow2", "4G", "write -P 3 1028M 64k", "write -P 4 2050M 64k",
                  opts="cluster_size=2M", backing="b.qcow2")
    return top, (base, 4)


def chain_extended(d):
    """Extended L2 overlay: subclusters of its cluster at 2G are its own, the rest the base's."""
    base = _create(d, "b.qcow2", "4G", "write -P 1 2049M 64k")
    top = _create(d, "t.qcow2", "4G", "write -P 3 2G 4k", opts="extended_l2=on",
                  backing="b.qcow2")
    return top, (base, 4)


def chain_small_tables(d):
    """1 KiB clusters: L1 entries map 128 KiB and their small tables are classified many at
    a time; the bad one sits inside a run of allocated tables. (With 512-byte clusters no L2
    table offset can be unaligned: the bits below 512 are reserved.)"""
    top = _create(d, "t.qcow2", "8M", "write -P 7 0 4M", "write -P 8 6M 8k",
                  opts="cluster_size=1k")
    return top, (top, 10)


def chain_middle(d):
    base = _create(d, "b.qcow2", "4G", "write -P 1 2G 64k", "write -P 2 3G 64k")
    mid = _create(d, "m.qcow2", "4G", "write -P 3 1G 64k", backing="b.qcow2")
    top = _create(d, "t.qcow2", "4G", "write -P 4 0 64k", backing="m.qcow2")
    return top, (mid, 4)


CHAINS = {"top": chain_top, "first": chain_first, "last": chain_last,
          "under-hole": chain_under_hole, "under-data": chain_under_data,
          "over-backing": chain_over_backing, "raw-backing": chain_raw_backing,
          "big-over-small": chain_big_over_small, "extended": chain_extended,
          "small-tables": chain_small_tables, "middle": chain_middle}


def broken(d: Path, chain: str, kind: str) -> tuple[Path, Path, int]:
    """Build `chain` in directory d and break its entry: (top file, broken file, index)."""
    d.mkdir()
    top, (layer, index) = CHAINS[chain](d)
    set_l1(layer, index, kind)
    return top, layer, index


# -- map -------------------------------------------------------------------------------------

RANGES = {"whole": [], "from-inside": ["-s", str(2 * G + 64 * K)], "from-after": ["-s", "3G"],
          "up-to-it": ["-l", "2G"], "into-it": ["-s", "1G", "-l", str(G + 1)]}


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_map_stops_where_qemu_img_stops(tmp_path, chain, kind, output):
    """The map of the entries before the bad L1 range is printed as qemu-img prints it, byte
    for byte, then one error line (exit 1); entries after it are never printed."""
    # qemu-img fails on an unaligned entry only: its twin is the oracle for the other kinds.
    ours, layer, index = broken(tmp_path / "ours", chain, kind)
    oracle, _, _ = broken(tmp_path / "qemu", chain, "unaligned")
    want = run(QEMU_IMG, "map", f"--output={output}", oracle.name, cwd=oracle.parent)
    got = run_cli("map", f"--output={output}", ours.name, cwd=ours.parent)
    assert want.returncode == 1 and "Could not read file metadata" in want.stderr, want.stderr
    assert (got.returncode, got.stdout) == (1, want.stdout), got.stderr
    one_line(got, message(layer.name, index, kind))


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("where", sorted(RANGES))
def test_map_ranges_query_only_their_range(tmp_path, where, output):
    """--start-offset and --max-length: only the range is queried, so a bad entry outside it
    is never met (qemu-img succeeds), and one inside fails from where the range starts."""
    ours, _, index = broken(tmp_path / "t", "top", "unaligned")
    args = RANGES[where]
    want = run(QEMU_IMG, "map", f"--output={output}", *args, ours.name, cwd=ours.parent)
    got = run_cli("map", f"--output={output}", *args, ours.name, cwd=ours.parent)
    assert want.returncode == (1 if where in ("whole", "from-inside", "into-it") else 0)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
    if want.returncode:
        one_line(got, message(ours.name, index, "unaligned"))


def test_map_api_raises_at_the_entry(tmp_path):
    """Image.map() raises the entry's error, naming where the map met it; the extents before
    it are qemu-img's."""
    top, _, _ = broken(tmp_path / "t", "top", "unaligned")
    want = json.loads(run(QEMU_IMG, "map", "--output=json", "-l", "2G", top).stdout)
    with qcowfast.open(top) as img:
        with pytest.raises(CorruptImage, match=message(str(top), 4, "unaligned")) as info:
            img.map()
        assert info.value.guest_offset == 2 * G
        got = [dict(start=e.guest_offset, length=e.length, data=e.kind.name == "DATA",
                    offset=e.host_offset) for e in img.extents(0, 2 * G)]
    assert got == [dict(start=e["start"], length=e["length"], data=e["data"],
                        offset=e.get("offset")) for e in want]


# -- reads -----------------------------------------------------------------------------------

def _read(img, how: str, offset: int, n: int) -> bytes:
    if how == "read":
        return img.read(offset, n)
    if how == "readinto":
        buf = bytearray(n)
        return bytes(buf[:img.readinto(offset, buf)])
    with img.as_file() as f:
        f.seek(offset)
        return f.read(n)


SIZES = {"cluster": 64 * K, "small": 2 * M, "large": 8 * M}     # the three read paths


def qemu_bytes(path: Path, offset: int, n: int) -> bytes:
    """Guest bytes [offset, offset + n) of qcow2 `path`, as qemu-img converts them (a raw
    window over the image: only that range is read)."""
    out = path.parent / "window.raw"
    qemu_img("convert", "--image-opts", f"driver=raw,offset={offset},size={n},"
             f"file.driver=qcow2,file.file.driver=file,file.file.filename={path}",
             "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("how", ["read", "readinto", "as_file"])
@pytest.mark.parametrize("kind", KINDS)
def test_reads_fail_only_where_they_reach_the_entry(tmp_path, kind, how, size):
    """Reads before and after the bad range return the image's bytes (qemu-io reads them
    too); a read reaching into it raises the entry's error (qemu-io: EIO, unaligned)."""
    top, _, index = broken(tmp_path / "t", "top", kind)
    n = SIZES[size]
    if kind == "unaligned":
        out = run(QEMU_IO, "-r", "-c", "read 2G 64k", top)
        assert "Input/output error" in out.stdout + out.stderr
    cls, _ = ERRORS[kind]
    with qcowfast.open(top) as img:
        for offset in (0, 3 * G, 2 * G - n):
            assert_same_bytes(_read(img, how, offset, n), qemu_bytes(top, offset, n), how,
                              offset)
        for offset in (2 * G, 2 * G + 5 * M, 2 * G - n // 2):
            with pytest.raises(cls, match=message(str(top), index, kind)):
                _read(img, how, offset, n)


@pytest.mark.parametrize("chain", ["under-hole", "under-data", "extended", "middle"])
def test_reads_through_a_broken_backing_file(tmp_path, chain):
    """A layer above serves what it holds in the bad range; its holes there fail."""
    top, layer, index = broken(tmp_path / "t", chain, "unaligned")
    with qcowfast.open(top) as img:
        own = {"under-hole": [], "under-data": [(2 * G, 64 * K), (2176 * M, 64 * K)],
               "extended": [], "middle": []}[chain]
        for a, n in own + [(0, 64 * K), (3 * G, 64 * K), (G, 128 * K)]:
            assert_same_bytes(img.read(a, n), qemu_bytes(top, a, n), chain, a)
        if chain == "extended":             # the overlay's own subclusters of the cluster
            assert img.read(2 * G, 4 * K) == b"\3" * (4 * K)
            assert "failed" not in run(QEMU_IO, "-r", "-c", "read -P 3 2G 4k", top).stdout
        for a in (2 * G + 64 * K, 2 * G + 256 * M):
            ref = run(QEMU_IO, "-r", "-c", f"read {a} 4k", top)
            assert "Input/output error" in ref.stdout + ref.stderr
            with pytest.raises(CorruptImage, match=message(layer.name, index, "unaligned")):
                img.read(a, 4 * K)


def test_open_keeps_refusing_shared_l2_tables(tmp_path):
    """Two L1 entries naming one L2 table are still refused at open (README, Amplification),
    also beside a bad entry."""
    top, _, _ = broken(tmp_path / "t", "top", "unaligned")
    with open(top, "r+b") as f:
        f.seek(_l1_at(top, 0))
        first = f.read(8)
        f.seek(_l1_at(top, 6))
        f.write(first)
    with pytest.raises(CorruptImage, match="L1 entries 0 and 6 both point to the L2 table"):
        qcowfast.open(top)


# -- convert, compare, measure, lookup, info -------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("kind", KINDS)
def test_convert_fails_with_the_entry_and_leaves_nothing(tmp_path, kind, fmt):
    top, _, index = broken(tmp_path / "t", "top", kind)
    out = tmp_path / f"out.{fmt}"
    if kind == "unaligned":
        want = run(QEMU_IMG, "convert", "-O", fmt, top, tmp_path / f"qemu.{fmt}")
        assert want.returncode == 1 and "Input/output error" in want.stderr
    got = run_cli("convert", "-O", fmt, top, out)
    assert got.returncode == 1 and got.stdout == ""
    one_line(got, message(str(top), index, kind))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "qcowfast-tmp" in p.name]
    with pytest.raises(ERRORS[kind][0], match=message(str(top), index, kind)):
        qcowfast.convert(top, tmp_path / "api.raw")
    with qcowfast.open(top) as img:                 # the plain path hands over at the entry
        from qcowfast.convert import _plain_chain
        assert _plain_chain(img, 8 * M, 4096) is None


def _covered(d: Path) -> Path:
    """A base whose L1 entry 1 ([128K, 256K) with 1 KiB clusters) is bad, under an overlay
    that holds all of that range: no read reaches the entry."""
    d.mkdir()
    base = _create(d, "b.qcow2", "1M", "write -P 1 0 384k", opts="cluster_size=1k")
    set_l1(base, 1, "unaligned")
    return _create(d, "t.qcow2", "1M", "write -P 2 128k 128k", "write -P 3 512k 4k",
                   opts="cluster_size=1k", backing="b.qcow2")


def test_an_entry_no_read_reaches_is_no_error(tmp_path):
    """qemu-img converts, maps, compares and checks the overlay (the base used to be refused
    at open): so does qcowfast, with the same results."""
    top = _covered(tmp_path / "t")
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", top, want)
    for plain in (True, False):
        out = tmp_path / f"out{plain}.raw"
        qcowfast.convert(top, out, **({} if plain else {"threads": 2, "unit_size": 64 * K}))
        assert_same_bytes(out.read_bytes(), want.read_bytes(), "convert")
    for output in ("json", "human"):
        ref = run(QEMU_IMG, "map", f"--output={output}", top.name, cwd=top.parent)
        got = run_cli("map", f"--output={output}", top.name, cwd=top.parent)
        assert (got.returncode, got.stdout, got.stderr) == (0, ref.stdout, "")
    got = run_cli("compare", top, want)
    assert (got.returncode, got.stdout) == (0, "Images are identical.\n")
    ref, got = run(QEMU_IMG, "check", top), run_cli("check", top)
    assert (got.returncode, got.stdout) == (ref.returncode, ref.stdout) == (0, ref.stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_compare_fails_as_qemu_img_at_the_entry(tmp_path, kind):
    """qemu-img compare: "Sector allocation test failed for NAME", exit 3 (not 2: the image
    opened), whichever side is broken; -s finds the first block status mismatch first."""
    good = tmp_path / "good.raw"
    ours, _, index = broken(tmp_path / "ours", "top", kind)
    oracle, _, _ = broken(tmp_path / "qemu", "top", "unaligned")
    (tmp_path / "good").mkdir()
    qemu_img("convert", "-O", "raw", chain_top(tmp_path / "good")[0], good)
    for args in ([ours.name, good], [good, ours.name], ["-s", ours.name, good]):
        want = run(QEMU_IMG, "compare", *args, cwd=oracle.parent)
        got = run_cli("compare", *args, cwd=ours.parent)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
        if want.returncode == 3:
            assert f"Sector allocation test failed for {ours.name}\n" in want.stderr
            one_line(got, rf"^qcowfast: Sector allocation test failed for {ours.name}: "
                          + message(ours.name, index, kind))
    assert want.returncode == 1 and "Strict mode" in want.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_measure_fails_for_qcow2_and_not_for_raw(tmp_path, kind):
    """-O qcow2 needs the allocation (qemu-img: "Unable to get block status", exit 1); -O raw
    only the size, which qemu-img prints."""
    top, _, index = broken(tmp_path / "t", "top", kind)
    got = run_cli("measure", "-O", "qcow2", top)
    assert got.returncode == 1 and got.stdout == ""
    one_line(got, message(str(top), index, kind))
    if kind == "unaligned":
        assert run(QEMU_IMG, "measure", "-O", "qcow2", top).returncode == 1
    want, got = run(QEMU_IMG, "measure", "-O", "raw", top), run_cli("measure", "-O", "raw", top)
    assert (got.returncode, got.stdout, got.stderr) == (0, want.stdout, "")


def test_lookup_info_and_snapshots(tmp_path):
    """--lookup in the bad range fails with the entry's error, elsewhere names the entries;
    info and snapshot -l (which read no L2 table) print what qemu-img prints."""
    top, _, index = broken(tmp_path / "t", "top", "unaligned")
    got = run_cli("map", "--lookup", str(2 * G + 4 * K), top)
    assert got.returncode == 1 and got.stdout == ""
    one_line(got, message(str(top), index, "unaligned"))
    got = run_cli("map", "--lookup", "3G", top)
    assert got.returncode == 0 and "L1[6] = 0x8" in got.stdout and "data" in got.stdout
    for args in (["info"], ["info", "--output=json"], ["snapshot", "-l"]):
        want, got = run(QEMU_IMG, *args, top.name, cwd=top.parent), \
            run_cli(*args, top.name, cwd=top.parent)
        assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, "")


# -- check -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_check_reports_the_entry_as_qemu_img(tmp_path, kind):
    """The report, JSON and exit code of qemu-img check; for an L2 table past the end of the
    file (the README's example), qemu-img's very lines on stderr, qcowfast naming the table."""
    top, _, _ = broken(tmp_path / "t", "top", kind)
    for args in ([], ["--output=json"]):
        want = run(QEMU_IMG, "check", *args, top.name, cwd=top.parent)
        got = run_cli("check", *args, top.name, cwd=top.parent)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
        assert got.returncode == 2
    if kind == "past-eof":
        assert got.stderr == want.stderr.replace(
            "offset 0x70000000 size 0x10000\n", "offset 0x70000000 size 0x10000 (an L2 table)\n")
        assert "ERROR OFLAG_COPIED L2 cluster: l1_index=4 l1_entry=8000000070000000 " \
               "refcount=0\n" in got.stderr


def test_check_opens_a_chain_with_a_broken_backing_file(tmp_path):
    """qemu-img check opens the backing chain (reading no L2 table of it) and checks the top."""
    d = tmp_path / "t"
    d.mkdir()
    top, (layer, index) = chain_under_hole(d)
    set_l1(layer, index, "unaligned")
    for args in ([], ["--output=json"]):
        want = run(QEMU_IMG, "check", *args, top.name, cwd=d)
        got = run_cli("check", *args, top.name, cwd=d)
        assert (got.returncode, got.stdout, got.stderr) == (0, want.stdout, want.stderr)


# -- NBD -------------------------------------------------------------------------------------

class _QemuNbd:
    def __init__(self, path: Path, sock: Path):
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", str(sock),
                                      str(path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "no qemu-nbd"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_nbd_block_status_and_reads_fail_at_the_entry(tmp_path):
    """Served over NBD, block status and reads reaching the entry fail with EIO, as from
    qemu-nbd; reads elsewhere return the same bytes."""
    from qcowfast.serve import NBDServer
    top, _, _ = broken(tmp_path / "t", "top", "unaligned")
    ours = NBDServer(top, socket=tmp_path / "o.sock", persistent=True).start()
    theirs = _QemuNbd(top, tmp_path / "q.sock")
    try:
        for sock in ("o.sock", "q.sock"):
            uri = f"nbd+unix:///?socket={tmp_path / sock}"
            got = run("nbdinfo", "--map", uri)
            assert got.returncode == 1 and "Input/output error" in got.stderr, (sock, got)
            got = run(QEMU_IO, "-r", "-f", "raw", "-c", "read -P 0x33 3G 64k",
                      "-c", "read -P 0x11 0 64k", uri)
            assert got.returncode == 0 and "failed" not in got.stdout + got.stderr, (sock, got)
            got = run(QEMU_IO, "-r", "-f", "raw", "-c", "read 2G 4k", uri)
            assert "read failed: Input/output error" in got.stdout + got.stderr, (sock, got)
    finally:
        ours.stop()
        theirs.stop()


@pytest.mark.parametrize("order", ["good-first", "bad-first"])
def test_compare_stops_at_a_difference_before_the_entry(tmp_path, order):
    """Images that differ before a bad L1 entry compare as qemu-img compares them: "Content
    mismatch" (exit 1), since its queries never reach the entry. The extent that led up to
    the entry was held back while it might still grow, and the entry's error came first
    (exit 3; found by a red-team helper)."""
    bad, good = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bad, "4G")
    qemu_io(bad, "write -P 2 2G 64k")
    qemu_img("create", "-q", "-f", "qcow2", good, "4G")
    qemu_io(good, "write -P 3 0 4k")
    with open(bad, "r+b") as f:                     # L1 entry 4 (from 2 GiB): unaligned
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1 + 32)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1 + 32)
        f.write(struct.pack(">Q", entry | 0x200))
    pair = [good, bad] if order == "good-first" else [bad, good]
    ours = run_cli("compare", *pair)
    want = subprocess.run([QEMU_IMG, "compare", *pair], capture_output=True, text=True)
    assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout) == \
        (1, "Content mismatch at offset 0!\n")


def test_a_bad_entry_of_a_snapshots_table_names_the_snapshot(tmp_path):
    """A bad entry in a snapshot's L1 table, met through -l, is named as that table's (the
    active table, which the error used to suggest, is fine)."""
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4G")
    qemu_io(img, "write -P 1 2G 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 2G 64k")
    with qcowfast.open(img) as image:
        l1 = image.snapshots[0].l1_table_offset
    with open(img, "r+b") as f:                     # the snapshot's entry 4: unaligned
        f.seek(l1 + 32)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1 + 32)
        f.write(struct.pack(">Q", entry | 0x200))
    proc = run_cli("convert", "-l", "s1", img, tmp_path / "s1.raw")
    assert proc.returncode == 1
    assert f"{img}: L1 table of snapshot '1', entry 4 (" in proc.stderr, proc.stderr
    assert not (tmp_path / "s1.raw").exists()
    proc = run_cli("convert", img, tmp_path / "now.raw")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "now.raw", "rb") as f:        # (4 GiB, sparse: read 4 bytes)
        assert os.pread(f.fileno(), 4, 2 << 30) == b"\2" * 4
