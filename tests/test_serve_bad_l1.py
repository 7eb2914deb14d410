"""`qcowfast serve` against `qemu-nbd -r` on images with a bad L1 or L2 entry.

qemu-nbd builds a block status reply as nbd/server.c blockstatus_to_extents() does: QEMU's
block status queries over the whole request, merged while their flags agree, until its 131072
extents are full (one with REQ_ONE) and the query after them is made. A query meeting a bad
entry fails the whole request (EIO), however much was resolved before it: `qemu-img map` over
NBD then prints one entry fewer than a server answering in pieces would let it print. Reads
fail where they reach the entry; NBD_CMD_CACHE where its copy-on-read reads do.

The oracle is qemu-nbd on the same image where QEMU fails too (an unaligned L2 table or cluster
offset, an invalid subcluster bitmap), and on a twin whose entry is unaligned where qcowfast
refuses what QEMU reads on (reserved bits, a table or cluster past the end of the file; see
README, Differences). Compared: the replies on the wire (extents, error numbers, bytes), and
what qemu-img map, nbdinfo --map and qemu-io print over NBD. Servers listen on Unix sockets in
tmp_path and are stopped by each test.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from common import QEMU_IMG, QEMU_IO, patch_l2_entry, qemu_img, qemu_io
from qcowfast import nbd
from qcowfast.serve import NBDServer
from test_bad_l1 import CHAINS, KINDS, broken, set_l1
from test_nbd_protocol import Client
from test_serve import QemuNbd

K, M, G = 1 << 10, 1 << 20, 1 << 30
MAX_LENGTH = (1 << 32) - 1                  # the longest NBD request
QEMU_IMG_LENGTH = (1 << 31) - 1             # what qemu-img's block status requests ask for
REQ_ONE = nbd.NBD_CMD_FLAG_REQ_ONE
DF = nbd.NBD_CMD_FLAG_DF
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def run(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@contextmanager
def qemu_nbd(path: Path, sock: Path):
    server = QemuNbd(path, sock)
    try:
        yield sock
    finally:
        server.stop()


@contextmanager
def qcowfast_serve(path: Path, sock: Path):
    server = NBDServer(path, socket=sock, persistent=True).start()
    try:
        yield sock
    finally:
        server.stop()


# -- what a client sees ----------------------------------------------------------------------

def _status(c: Client, offset: int, length: int, flags: int):
    """("extents", [(length, flags)...]) or ("error", errno) of one block status request."""
    c.request(nbd.NBD_CMD_BLOCK_STATUS, 21, offset, length, flags)
    cflags, rtype, handle, payload = c.chunk()
    assert handle == 21 and cflags & nbd.NBD_REPLY_FLAG_DONE
    if rtype == nbd.NBD_REPLY_TYPE_ERROR:
        return "error", struct.unpack_from(">I", payload)[0]
    assert rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS, rtype
    vals = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
    return "extents", list(zip(vals[::2], vals[1::2]))


def _read(c: Client, offset: int, length: int, flags: int):
    """("bytes", sha256) or ("error", errno) of one read."""
    error, data = c.read(offset, length, flags=flags)
    return ("error", error) if error else ("bytes", hashlib.sha256(data).hexdigest())


def wire(sock: Path, status=(), reads=(), cache=()) -> list:
    """The replies to block status requests (offset, length, flags), reads (offset, length,
    flags; structured, and simple when flags is None) and caches (offset, length), in order,
    each (request, reply)."""
    out = []
    c = Client(str(sock)).greet()
    c.sock.settimeout(60)
    try:
        c.go()
        out += [(("status", *r), _status(c, *r)) for r in status]
        out += [(("read", *r), _read(c, *r)) for r in reads if r[2] is not None]
        # Last: qemu-nbd -r's copy-on-read may change its view of the image (see CACHE).
        for off, n in cache:
            c.request(nbd.NBD_CMD_CACHE, 22, off, n)
            out.append((("cache", off, n), c.error_of(22)))
    finally:
        c.close()
    simple = [r for r in reads if r[2] is None]
    if simple:
        c = Client(str(sock)).greet()
        c.sock.settimeout(60)
        try:
            c.go(structured=False, meta=False)
            out += [(("simple read", off, n), _read(c, off, n, 0)) for off, n, _ in simple]
        finally:
            c.close()
    return out


def tools(sock: Path, maps=((),), io_reads=()) -> list:
    """What qemu-img map --output=json (with each of `maps`' extra arguments), nbdinfo --map
    and qemu-io reads print over NBD: (command, exit status, stdout, stderr)."""
    uri = f"nbd+unix:///?socket={sock}"
    runs = [(QEMU_IMG, "map", "-f", "raw", "--output=json", *args, uri) for args in maps]
    runs.append(("nbdinfo", "--map", uri))
    if io_reads:
        runs.append((QEMU_IO, "-r", "-f", "raw", *(a for off, n in io_reads
                                                   for a in ("-c", f"read -q {off} {n}")), uri))
    out = []
    for argv in runs:
        p = run(*argv)
        what = " ".join(map(str, argv[:-1]))
        out.append((what, p.returncode, p.stdout.replace(str(sock), "SOCK"),
                    p.stderr.replace(str(sock), "SOCK")))
    return out


def assert_same(got: list, want: list, what: str) -> None:
    __tracebackhide__ = True
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g == w, f"{what}: qcowfast {g!r}\n  qemu-nbd {w!r}"


def status_requests(bad: int, size: int) -> list:
    """Block status requests around guest offset `bad`, where queries start failing."""
    out = []
    for off in (0, bad - 64 * K, bad - 1, bad, bad + 64 * K, 3 * G):
        if not 0 <= off < size:
            continue
        lengths = {min(MAX_LENGTH, size - off), min(QEMU_IMG_LENGTH, size - off)}
        if off < bad:
            lengths |= {bad - off, bad - off + 1}
        for n in sorted(lengths):
            out += [(off, n, 0), (off, n, REQ_ONE)]
    return out


def read_requests(bad: int, size: int) -> list:
    """Reads around `bad`: structured, with DF, and simple (flags None)."""
    out = []
    for off, n in ((0, 64 * K), (bad - 64 * K, 64 * K), (bad - 4 * K, 8 * K),
                   (bad - M, M + 1), (bad, 4 * K), (bad + 64 * K, 4 * K), (3 * G, 64 * K)):
        if 0 <= off and off + n <= size:
            out += [(off, n, 0), (off, n, DF), (off, n, None)]
    return out


def _layer_geometry(path: Path) -> tuple[int, int]:
    """(cluster size, virtual size) of qcow2 `path`, from its header."""
    with open(path, "rb") as f:
        h = f.read(48)
    return 1 << struct.unpack_from(">I", h, 20)[0], struct.unpack_from(">Q", h, 24)[0]


# -- bad L1 entries ------------------------------------------------------------------------------

@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_bad_l1_entry_as_qemu_nbd(tmp_path, chain):
    """Block status, reads, qemu-img map, nbdinfo --map and qemu-io over NBD, for each kind of
    bad L1 entry in each chain of test_bad_l1: the same replies and output as qemu-nbd's."""
    oracle, layer, index = broken(tmp_path / "qemu", chain, "unaligned")
    cluster, _ = _layer_geometry(layer)
    _, size = _layer_geometry(oracle)
    bad = index * cluster * (cluster // 8)          # the guest range of the entry starts here
    plan = dict(status=status_requests(bad, size), reads=read_requests(bad, size))
    maps = ((), ("-s", str(bad - 64 * K)), ("-l", str(bad)))
    io_reads = [(off, n) for off, n, flags in plan["reads"] if flags is None]
    with qemu_nbd(oracle, tmp_path / "q.sock") as sock:
        want = wire(sock, **plan)
        want_tools = tools(sock, maps, io_reads)
    errors = [r for _, r in want if r[0] == "error"]
    assert errors and all(r == ("error", nbd.NBD_EIO) for r in errors), want
    assert any(r[0] == "extents" for _, r in want), want
    assert want_tools[0][1] == 1 and "Input/output error" in want_tools[0][3], want_tools
    for kind in KINDS:
        ours, _, _ = broken(tmp_path / kind, chain, kind)
        with qcowfast_serve(ours, tmp_path / f"{kind}.sock") as sock:
            got = wire(sock, **plan)
            got_tools = tools(sock, maps, io_reads)
        assert_same(got, want, f"{chain}, {kind}: wire")
        assert_same(got_tools, want_tools, f"{chain}, {kind}: tools")


def test_qemu_img_map_over_nbd_stops_as_over_qemu_nbd(tmp_path):
    """The red-team's reproducer: qemu-img map --output=json over NBD printed the entry at 0
    before failing (qcowfast answered in 1 GiB pieces: the request at 64 KiB, REQ_ONE and
    2 GiB long, got [64K, 1G) back where qemu-nbd fails it whole)."""
    top, _, _ = broken(tmp_path / "t", "top", "unaligned")
    with qemu_nbd(top, tmp_path / "q.sock") as sock:
        want = tools(sock)
        want_status = wire(sock, status=[(64 * K, QEMU_IMG_LENGTH, REQ_ONE)])
    with qcowfast_serve(top, tmp_path / "o.sock") as sock:
        got = tools(sock)
        got_status = wire(sock, status=[(64 * K, QEMU_IMG_LENGTH, REQ_ONE)])
    assert want[0][1:] == (1, "[", "qemu-img: Could not read file metadata: Input/output "
                                   "error\n")
    assert want_status[0][1] == ("error", nbd.NBD_EIO)
    assert_same(got_status, want_status, "block status")
    assert_same(got, want, "qemu-img map and nbdinfo --map")


# -- a reply full before the entry ---------------------------------------------------------------

def _alternating(d: Path, end: int, size: int) -> Path:
    """1 KiB clusters, data and unallocated in turn over [0, end) (a data cluster first),
    nothing after: 2 extents per 2 KiB, so 131072 of them end at 128 MiB."""
    d.mkdir()
    raw = d / "src.raw"
    block = (b"\x5a" * K + bytes(K)) * (M // (2 * K))
    with open(raw, "wb") as f:
        f.truncate(size)
        for _ in range(end // M):
            f.write(block)
    out = d / "a.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=1k", "-S", "1k",
             raw, out)
    raw.unlink()
    return out


@pytest.fixture(scope="module")
def alternating(tmp_path_factory) -> Path:
    return _alternating(tmp_path_factory.mktemp("alt") / "a", 130 * M, 136 * M)


FULL = {
    # The query after the 131072nd extent (at 128 MiB) meets the entry: EIO.
    "l1-at-the-limit": lambda p: set_l1(p, 1024, "unaligned"),
    # The extents are full at 128 MiB, before the entry (130 MiB): a reply.
    "l1-after-the-limit": lambda p: set_l1(p, 1040, "unaligned"),
    # A bad cluster 100 KiB after the limit, in the L2 table (classified with those before it)
    # that holds the limit: a reply, as qemu-nbd never asks past 128 MiB.
    "l2-after-the-limit": lambda p: patch_l2_entry(p, 128 * M + 100 * K, lambda e: e + 512),
    # The same cluster, asked for from 128 MiB - 2 KiB: reached, EIO.
    "l2-reached": lambda p: patch_l2_entry(p, 128 * M + 100 * K, lambda e: e + 512),
}


@pytest.mark.parametrize("case", sorted(FULL))
def test_full_reply_before_a_bad_entry(alternating, tmp_path, case):
    """qemu-nbd stops at 131072 extents (1 MiB of them) after asking for the run after them:
    whether a bad entry fails the request depends on where that is."""
    img = tmp_path / "a.qcow2"
    shutil.copyfile(alternating, img)
    FULL[case](img)
    start = 128 * M - 2 * K if case == "l2-reached" else 0
    plan = dict(status=[(start, 136 * M - start, 0), (start, 136 * M - start, REQ_ONE),
                        (start + K, 4 * M, 0)])
    try:
        with qemu_nbd(img, tmp_path / "q.sock") as sock:
            want = wire(sock, **plan)
        with qcowfast_serve(img, tmp_path / "o.sock") as sock:
            got = wire(sock, **plan)
    finally:
        img.unlink()
    first = want[0][1]
    if case in ("l1-at-the-limit", "l2-reached"):
        assert first == ("error", nbd.NBD_EIO), first
    else:
        assert first[0] == "extents" and len(first[1]) == 131072, first[0]
        assert sum(n for n, _ in first[1]) == 128 * M
    assert_same(got, want, case)


# -- bad L2 entries ------------------------------------------------------------------------------

def _plain_l2(d: Path) -> tuple[Path, int]:
    """64 KiB clusters: data over [4M - 256K, 4M + 128K) and at 6M; returns (image, the guest
    offset of the cluster to break: 4M)."""
    d.mkdir()
    p = d / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io(p, "write -P 1 3840k 384k", "write -P 2 6M 64k")
    return p, 4 * M


def _set_l2(path: Path, guest: int, kind: str) -> None:
    patch_l2_entry(path, guest, {"unaligned": lambda e: e + 512,
                            "reserved": lambda e: e | 0x100,          # (bit 8: reserved)
                            "past-eof": lambda e: e & ~L2E_OFFSET_MASK | 0x7000_0000}[kind])


def _under_hole(d: Path, kind: str) -> tuple[Path, int]:
    """The bad entry lies in a backing file, under an overlay unallocated there."""
    base, at = _plain_l2(d)
    _set_l2(base, at, kind)
    top = d / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 3 1M 64k", "write -P 4 3968k 64k")
    return top, at


def _extended(d: Path) -> tuple[Path, int]:
    """Extended L2 entries: data at 3M and over [4M - 128K, 4M), then at 4M an unallocated
    cluster whose bitmap marks a subcluster allocated (invalid). QEMU's query that fails is
    the one starting at 4M - 128K (count_contiguous_subclusters() reads the next cluster's
    type); a REQ_ONE request from 0 ends before it, at 3M."""
    d.mkdir()
    p = d / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "8M")
    qemu_io(p, "write -P 5 3M 64k", "write -P 1 3968k 128k", "write -P 2 6M 64k")
    with open(p, "r+b") as f:
        h = f.read(48)
        l1_offset, = struct.unpack_from(">Q", h, 40)
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & L2E_OFFSET_MASK
        f.seek(l2 + 16 * (4 * M // (64 * K)) + 8)
        f.write(struct.pack(">Q", 1 << 3))
    return p, 4 * M


L2_CASES = ("top", "under-hole", "extended")


def _l2_image(d: Path, case: str, kind: str) -> tuple[Path, int]:
    if case == "extended":
        return _extended(d)
    if case == "under-hole":
        return _under_hole(d, kind)
    p, at = _plain_l2(d)
    _set_l2(p, at, kind)
    return p, at


@pytest.mark.parametrize("case", L2_CASES)
def test_bad_l2_entry_as_qemu_nbd(tmp_path, case):
    """A bad L2 entry: an unaligned cluster offset (and qcowfast's refusals, reserved bits
    and a cluster past the end of the file, against it as their twin), or an invalid
    subcluster bitmap, whose failing query starts before it."""
    oracle, at = _l2_image(tmp_path / "qemu", case, "unaligned")
    _, size = _layer_geometry(oracle)
    status = status_requests(at, size) + [(at - 256 * K, n, flags) for n in
                                          (128 * K, 128 * K + 1, 256 * K + 1)
                                          for flags in (0, REQ_ONE)]
    plan = dict(status=status, reads=read_requests(at, size))
    io_reads = [(off, n) for off, n, flags in plan["reads"] if flags is None]
    maps = ((), ("-s", str(at - 64 * K)))
    with qemu_nbd(oracle, tmp_path / "q.sock") as sock:
        want = wire(sock, **plan)
        want_tools = tools(sock, maps, io_reads)
    assert ("error", nbd.NBD_EIO) in [r for _, r in want], want
    assert want_tools[0][1] == 1, want_tools
    for kind in (("unaligned",) if case == "extended" else ("unaligned", "reserved", "past-eof")):
        ours, _ = _l2_image(tmp_path / kind, case, kind)
        with qcowfast_serve(ours, tmp_path / f"{kind}.sock") as sock:
            got = wire(sock, **plan)
            got_tools = tools(sock, maps, io_reads)
        assert_same(got, want, f"{case}, {kind}: wire")
        assert_same(got_tools, want_tools, f"{case}, {kind}: tools")


# -- NBD_CMD_CACHE ---------------------------------------------------------------------------

def _cache_top(d: Path) -> Path:
    """Data over [2G - 128K, 2G) and at 3G; L1 entry 4 (from 2G) is broken by the test."""
    d.mkdir()
    p = d / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4G")
    qemu_io(p, "write -P 1 2097024k 128k", "write -P 2 3G 64k")
    return p


def _cache_backing(d: Path) -> Path:
    """The base's L1 entry 4 is broken; the overlay holds [2G - 64K, 2G + 64K)."""
    d.mkdir()
    base = d / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4G")
    qemu_io(base, "write -P 1 2G 64k", "write -P 2 2049M 64k")
    top = d / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 3 2097088k 128k")
    return top


CACHE = {
    # qemu-nbd: skipped (allocated in the top layer) -> 0; the query at 2G fails -> EIO.
    "top": (_cache_top, "t.qcow2",
            [(2 * G - 128 * K, 128 * K, 0), (2 * G - 64 * K, 128 * K, nbd.NBD_EIO),
             (2 * G, 4 * K, nbd.NBD_EIO), (2 * G + M + 5, 100, nbd.NBD_EIO),
             (3 * G, 64 * K, 0), (3 * G + 4 * K, 0, 0)]),
    # qemu-nbd: the overlay's clusters are skipped -> 0; its hole is read from the base -> EIO.
    "backing": (_cache_backing, "b.qcow2",
                [(2 * G - 64 * K, 128 * K, 0), (2 * G, 64 * K, 0),
                 (2 * G + 64 * K, 4 * K, nbd.NBD_EIO), (2 * G - 64 * K, 128 * K + 1, nbd.NBD_EIO),
                 (2049 * M, 64 * K, nbd.NBD_EIO)]),
}


@pytest.mark.parametrize("chain", sorted(CACHE))
def test_cache_fails_where_qemu_nbd_reads_the_entry(tmp_path, chain):
    """NBD_CMD_CACHE (block/io.c copy-on-read with BDRV_REQ_PREFETCH): what the top layer
    allocates is skipped, the rest is read through the chain and fails at a bad entry (EIO),
    as from qemu-nbd. (Where qemu-nbd -r would then write what it read into the top layer, it
    fails with EPERM: ranges here avoid that.)"""
    make, broken_name, cases = CACHE[chain]
    oracle = make(tmp_path / "qemu")
    set_l1(oracle.parent / broken_name, 4, "unaligned")
    requests = [(off, n) for off, n, _ in cases]
    with qemu_nbd(oracle, tmp_path / "q.sock") as sock:
        want = wire(sock, cache=requests)
    assert [r for _, r in want] == [e for _, _, e in cases], want
    for kind in KINDS:
        ours = make(tmp_path / kind)
        set_l1(ours.parent / broken_name, 4, kind)
        with qcowfast_serve(ours, tmp_path / f"{kind}.sock") as sock:
            got = wire(sock, cache=requests)
        assert_same(got, want, f"{chain}, {kind}: cache")


def test_a_bad_entry_leaves_the_connection_serving(tmp_path, caplog):
    """After failed block status, reads and caches, the same connection still answers (as
    qemu-nbd's does), and the server logs warnings only (an error is a bug it caught)."""
    caplog.set_level(logging.WARNING, "qcowfast.serve")
    top, _, _ = broken(tmp_path / "t", "top", "unaligned")
    with qcowfast_serve(top, tmp_path / "o.sock") as sock:
        c = Client(str(sock)).greet()
        try:
            c.go()
            for _ in range(3):
                assert _status(c, 0, MAX_LENGTH, 0) == ("error", nbd.NBD_EIO)
                assert _read(c, 2 * G, 4 * K, 0) == ("error", nbd.NBD_EIO)
                c.request(nbd.NBD_CMD_CACHE, 5, 2 * G, 4 * K)
                assert c.error_of(5) == nbd.NBD_EIO
                assert _status(c, 0, 2 * G, REQ_ONE) == ("extents", [(64 * K, 0)])
                error, data = c.read(0, 64 * K)
                assert (error, data) == (0, b"\x11" * (64 * K))
        finally:
            c.close()
    levels = [r.levelno for r in caplog.records if r.name == "qcowfast.serve"]
    assert levels and set(levels) == {logging.WARNING}, caplog.text
