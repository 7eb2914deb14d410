"""`qcowfast serve -A` (qemu:allocation-depth) and `-B NAME` (qemu:dirty-bitmap:NAME) against
`qemu-nbd -r -A` / `-B NAME` serving the same images.

Both servers run as processes on Unix sockets in tmp_path (`-t`, stopped by the fixture); the
oracles are libnbd's `nbdinfo --map=CONTEXT` and `--list --json`, `qemu-img map` over NBD with
`x-dirty-bitmap`, and raw option/BLOCK_STATUS exchanges. Maps are compared by meaning (the
value of every byte) and then line for line.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from common import patch_l2_entry, qemu_img, qemu_io
from qcowfast import nbd
from qcowfast.bitmaps import read_bitmap_directory
from qcowfast.header import read_header
from test_nbd_protocol import Client, info_data, meta_data

TIMEOUT = 20
DEPTH = "qemu:allocation-depth"


def run(*argv, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]} {proc.stderr.strip()}"
    return proc


class Server:
    """A server process listening on a Unix socket; stop() always ends it."""

    def __init__(self, argv, sock: Path):
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[0]} did not start: {self.err}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self.proc.stderr.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.err = self.proc.stderr.read().decode(errors="replace")
        self.proc.stderr.close()


def qemu_nbd_argv(path, sock, options, fmt):
    return ["qemu-nbd", "-r", "-t", "-f", fmt, *options, "-k", sock, path]


def qcowfast_argv(path, sock, options, fmt):
    return [sys.executable, "-m", "qcowfast", "serve", "-t", "-f", fmt, *options, "-k", sock,
            path]


@pytest.fixture
def pair(tmp_path):
    """pair(path, *options, fmt=) -> (qemu-nbd, qcowfast serve) serving `path` with `options`."""
    started = []

    @contextmanager
    def start(path, *options, fmt="qcow2"):
        n = len(started)
        ref = Server(qemu_nbd_argv(path, tmp_path / f"q{n}.sock", options, fmt),
                     tmp_path / f"q{n}.sock")
        started.append(ref)
        got = Server(qcowfast_argv(path, tmp_path / f"c{n}.sock", options, fmt),
                     tmp_path / f"c{n}.sock")
        started.append(got)
        try:
            yield ref, got
        finally:
            ref.stop()
            got.stop()

    yield start
    for server in started:
        server.stop()


def nbd_map(uri: str, context: str) -> str:
    return run("nbdinfo", f"--map={context}", uri).stdout


def per_byte(text: str) -> list[tuple[int, int, int]]:
    """The (start, end, value) runs of an `nbdinfo --map` output, equal values merged (the
    meaning of the map, whatever its extents)."""
    out: list[list[int]] = []
    for line in text.splitlines():
        start, length, value = (int(w) for w in line.split()[:3])
        if out and out[-1][2] == value and out[-1][1] == start:
            out[-1][1] += length
        else:
            assert not out or out[-1][1] == start, text
            out.append([start, start + length, value])
    return [tuple(r) for r in out]


def same_map(ref: Server, got: Server, context: str) -> str:
    want = nbd_map(ref.uri, context)
    have = nbd_map(got.uri, context)
    assert per_byte(have) == per_byte(want), (context, have, want)
    assert have == want, context
    return want


def contexts(uri: str) -> list[str]:
    [export] = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)["exports"]
    return export["contexts"]


def qemu_img_map(server: Server, context: str) -> list:
    opts = (f"driver=nbd,server.type=unix,server.path={server.sock},"
            f"x-dirty-bitmap={context}")
    return json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)


# -- images ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Chains of 1-3 layers: raw and qcow2 backing files, shorter backing files, zero writes,
    discards, extended L2 subclusters, compressed clusters, a data file, preallocation."""
    d = tmp_path_factory.mktemp("chains")
    out = {}

    def img(name, *create):
        path = d / name
        qemu_img("create", "-q", *create[:-1], path, create[-1])
        return path

    base = img("base.raw", "-f", "raw", "4M")
    qemu_io(base, "write -P 1 0 1M", "write -P 1 2M 4k", fmt="raw")
    mid = img("mid.qcow2", "-f", "qcow2", "-b", base, "-F", "raw", "6M")
    qemu_io(mid, "write -P 2 512k 1M", "write -z 3M 64k", "write -P 2 4M 64k")
    top = img("top.qcow2", "-f", "qcow2", "-b", mid, "-F", "qcow2", "8M")
    qemu_io(top, "write -P 3 1M 64k", "discard 2M 64k", "write -z 7M 4k", "write -P 3 5M 1k")
    out["raw-qcow2-qcow2"] = top
    out["raw-qcow2"] = mid

    opts = "extended_l2=on,cluster_size=64k"
    xbase = img("xbase.qcow2", "-f", "qcow2", "-o", opts, "2M")
    qemu_io(xbase, "write -P 4 4k 4k", "write -z 8k 4k", "write -P 4 192k 64k",
            "write -c -P 5 512k 64k", "write -P 4 1M 512k")
    xtop = img("xtop.qcow2", "-f", "qcow2", "-o", opts, "-b", xbase, "-F", "qcow2", "3M")
    qemu_io(xtop, "write -P 6 12k 4k", "write -z 64k 8k", "discard 200k 8k",
            "write -z 1100k 2k", "write -P 6 2M 4k")
    out["extl2-chain"] = xtop

    plain = img("plain.qcow2", "-f", "qcow2", "2M")
    qemu_io(plain, "write -P 7 0 1M", "write -P 0 1M 64k")
    comp = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, comp)
    ctop = img("ctop.qcow2", "-f", "qcow2", "-b", comp, "-F", "qcow2", "2M")
    qemu_io(ctop, "write -P 8 128k 64k", "write -z 512k 64k")
    out["compressed-backing"] = ctop

    datafile = img("dfile.qcow2", "-f", "qcow2", "-o", f"data_file={d / 'dfile.data'}", "2M")
    qemu_io(datafile, "write -P 9 64k 128k", "write -z 1M 64k")
    out["data-file"] = datafile

    out["prealloc"] = img("prealloc.qcow2", "-f", "qcow2", "-o", "preallocation=metadata",
                          "1M")

    ebase = img("ebase.qcow2", "-f", "qcow2", "1M")
    etop = img("etop.qcow2", "-f", "qcow2", "-b", ebase, "-F", "qcow2", "4M")
    out["empty-over-short"] = etop
    out["empty"] = img("empty.qcow2", "-f", "qcow2", "64G")
    return out


RAW_FORMAT = {"raw-qcow2-qcow2": "qcow2"}


@pytest.mark.parametrize("name", ["raw-qcow2-qcow2", "raw-qcow2", "extl2-chain",
                                  "compressed-backing", "data-file", "prealloc",
                                  "empty-over-short", "empty"])
def test_allocation_depth_as_qemu_nbd(chains, pair, name):
    with pair(chains[name], "-A") as (ref, got):
        assert contexts(got.uri) == contexts(ref.uri) == ["base:allocation", DEPTH]
        lines = same_map(ref, got, DEPTH)
        same_map(ref, got, "base:allocation")
        assert qemu_img_map(got, DEPTH) == qemu_img_map(ref, DEPTH)
    if name == "raw-qcow2-qcow2":              # every depth shows: 0 is absent here
        assert {v for _, _, v in per_byte(lines)} == {1, 2, 3}
    if name == "empty-over-short":              # unallocated, then past the short backing
        assert {v for _, _, v in per_byte(lines)} == {0, 2}


def test_allocation_depth_of_a_raw_image(tmp_path, pair):
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "3M")
    qemu_io(raw, "write -P 1 1M 64k", fmt="raw")
    with pair(raw, "-A", fmt="raw") as (ref, got):
        assert contexts(got.uri) == contexts(ref.uri)
        same_map(ref, got, DEPTH)


# -- dirty bitmaps -----------------------------------------------------------------------------

def bitmap(path, *args):
    qemu_img("bitmap", *args[:-1], path, args[-1])


@pytest.fixture(scope="module")
def bitmapped(tmp_path_factory):
    """An 8 MiB image with bitmaps of several granularities, enabled and disabled, empty,
    cleared and merged ones, dirtied by qemu-io writes (which mark the enabled ones); and a
    top image over it with a bitmap of its own (b0, shadowing the backing file's)."""
    d = tmp_path_factory.mktemp("bitmaps")
    path = d / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    bitmap(path, "--add", "b0")
    bitmap(path, "--add", "-g", "128k", "b1")
    bitmap(path, "--add", "-g", "512", "fine")
    bitmap(path, "--add", "b2")
    bitmap(path, "--add", "cleared")
    qemu_io(path, "write 100k 30k", "write 5M 1k")
    bitmap(path, "--disable", "b2")
    qemu_io(path, "write 7340000 1000", "write 3000 600")
    bitmap(path, "--clear", "cleared")
    bitmap(path, "--add", "--disable", "empty")
    bitmap(path, "--add", "--disable", "merged")
    bitmap(path, "--merge", "b2", "merged")
    bitmap(path, "--merge", "fine", "merged")
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", path, "-F", "qcow2", top, "8M")
    bitmap(top, "--add", "-g", "256k", "b0")
    qemu_io(top, "write 6M 4k")
    return path, top


NAMES = ["b0", "b1", "fine", "b2", "cleared", "empty", "merged"]


@pytest.mark.parametrize("name", NAMES)
def test_dirty_bitmap_as_qemu_nbd(bitmapped, pair, name):
    context = f"qemu:dirty-bitmap:{name}"
    with pair(bitmapped[0], "-B", name) as (ref, got):
        assert contexts(got.uri) == contexts(ref.uri) == ["base:allocation", context]
        lines = same_map(ref, got, context)
        assert qemu_img_map(got, context) == qemu_img_map(ref, context)
    dirty = {v for _, _, v in per_byte(lines)}
    assert dirty == ({0} if name in ("cleared", "empty") else {0, 1})


def test_several_bitmaps_and_depth_in_qemu_nbd_order(bitmapped, pair):
    """-B repeated: qemu-nbd lists the bitmaps last option first, after allocation depth; a
    bitmap of the backing file is found, the top's own shadows one of the same name."""
    top = bitmapped[1]
    with pair(top, "-B", "fine", "-A", "-B", "b0", "-B", "b1", "-B", "b1") as (ref, got):
        assert contexts(got.uri) == contexts(ref.uri)
        for name in ("b0", "b1", "fine"):
            same_map(ref, got, f"qemu:dirty-bitmap:{name}")
        same_map(ref, got, DEPTH)


def _exchange(uri_sock: Path, queries_list) -> list:
    """Each query list sent as LIST, then as SET, then block status of the last SET (whole
    image, and REQ_ONE at 5 MiB) with context ids replaced by names."""
    c = Client(str(uri_sock)).greet()
    try:
        out = []
        for queries in queries_list:
            replies = c.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", queries))
            out.append(("list", [(t, p[:4], p[4:]) for t, p in replies]))
        assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
        for queries in queries_list:
            replies = c.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"", queries))
            out.append(("set", [(t, p[4:]) for t, p in replies]))
        names = {struct.unpack_from(">I", p)[0]: p[4:] for t, p in replies
                 if t == nbd.NBD_REP_META_CONTEXT}
        assert len(names) == len(replies) - 1
        assert c.option(nbd.NBD_OPT_GO, info_data(b""))[-1][0] == nbd.NBD_REP_ACK
        for handle, (offset, length, flags) in enumerate([(0, 8 << 20, 0),
                                                          (5 << 20, 3 << 20, 1 << 3)]):
            c.request(nbd.NBD_CMD_BLOCK_STATUS, handle, offset, length, flags)
            while True:
                cflags, rtype, got, payload = c.chunk()
                assert got == handle and rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS
                (cid,) = struct.unpack_from(">I", payload)
                out.append((cflags, names[cid], payload[4:]))
                if cflags & nbd.NBD_REPLY_FLAG_DONE:
                    break
        return out
    finally:
        c.close()


def test_context_queries_and_block_status_as_qemu_nbd(bitmapped, pair):
    """LIST and SET queries match as nbd/server.c matches them ("qemu:" and
    "qemu:dirty-bitmap:" select all in LIST only, unknown names nothing); a block status
    request answers one chunk per context, in qemu-nbd's order."""
    queries = [[], [b"qemu:"], [b"qemu:dirty-bitmap:"], [b"base:"], [DEPTH.encode()],
               [b"qemu:dirty-bitmap:b1"], [b"qemu:dirty-bitmap:nope", b"qemu:x"],
               [b"qemu:allocation-depth:", b"qemu:dirty-bitmap:b1:"],
               [b"qemu:dirty-bitmap:b1", b"qemu:allocation-depth", b"base:allocation",
                b"qemu:dirty-bitmap:b0"]]
    with pair(bitmapped[0], "-A", "-B", "b0", "-B", "b1") as (ref, got):
        want = _exchange(ref.sock, queries)
        assert _exchange(got.sock, queries) == want
    assert len([w for w in want if w[0] not in ("list", "set")]) == 2 * 4   # (4 contexts)


# -- hostile bitmaps and refusals ---------------------------------------------------------------

def _directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header = read_header(fd, size)
        return header, read_bitmap_directory(fd, header, size)
    finally:
        os.close(fd)


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _entry_offset(path, name: str) -> int:
    """The file offset of bitmap `name`'s directory entry."""
    header, bitmaps = _directory(path)
    pos = header.bitmaps.directory_offset
    for bm in bitmaps:
        if bm.name == name:
            return pos
        pos += (24 + len(bm.name.encode()) + 7) & ~7
    raise KeyError(name)


@pytest.fixture
def hostile(tmp_path):
    """hostile(how) -> a copy of an image with bitmap "h" (64 KiB granules, dirty at 1 MiB),
    broken as `how` says."""
    def make(how):
        path = tmp_path / f"{how}.qcow2"
        size = "64G" if how == "huge" else "8M"
        qemu_img("create", "-q", "-f", "qcow2", path, size)  # (path, then size)
        bitmap(path, "--add", *(["-g", "512"] if how == "huge" else []), "h")
        more = {"huge": ["write 40G 4k"], "granularity-31-dirty": ["write 0 512"]}
        qemu_io(path, "write 1M 4k", *more.get(how, []))
        _, [bm] = _directory(path)
        entry = _entry_offset(path, "h")
        far = (os.path.getsize(path) + (1 << 30)) // 65536 * 65536
        if how == "all-ones":
            _patch(path, bm.table_offset, struct.pack(">Q", 1))
        elif how == "data-past-eof":
            _patch(path, bm.table_offset, struct.pack(">Q", far))
        elif how == "table-past-eof":
            _patch(path, entry, struct.pack(">Q", far))
        elif how == "in-use":
            _patch(path, entry + 12, struct.pack(">I", bm.flags | 1))
        elif how == "bad-entry":
            _patch(path, bm.table_offset, struct.pack(">Q", (1 << 60) | 0x10000))
        elif how.startswith("granularity-31"):
            _patch(path, entry + 17, bytes([31]))
        elif how == "table-too-long":
            _patch(path, entry + 8, struct.pack(">I", 2))
        elif how == "table-empty":
            _patch(path, entry + 8, struct.pack(">I", 0))
        return path
    return make


HOSTILE = {"all-ones": {1}, "data-past-eof": {0}, "table-past-eof": {0},
           "granularity-31": {0}, "granularity-31-dirty": {1}, "huge": {0, 1}}


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_bitmap_served_as_qemu_nbd(hostile, pair, how):
    """A table entry with the all-ones flag, data or a table past the end of the file (zeros),
    2 GiB granules (bits past the image's one granule ignored), 2**27 granules of 512 bytes."""
    with pair(hostile(how), "-B", "h") as (ref, got):
        lines = same_map(ref, got, "qemu:dirty-bitmap:h")
    assert {v for _, _, v in per_byte(lines)} == HOSTILE[how]


def _refusal(argv) -> tuple[int, str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode, proc.stderr.replace("qemu-nbd:", "qcowfast:")


@pytest.mark.parametrize("case", ["missing", "in-use", "bad-entry", "table-too-long",
                                  "table-empty", "bad-entry-in-backing", "raw"])
def test_bitmap_refusals_as_qemu_nbd(hostile, tmp_path, case):
    fmt = "qcow2"
    if case == "missing":
        path, name = hostile("all-ones"), "nope"
    elif case == "bad-entry-in-backing":
        path, name = tmp_path / "top.qcow2", "h"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", hostile("bad-entry"), "-F",
                 "qcow2", path, "8M")
    elif case == "raw":
        path, name, fmt = tmp_path / "r.raw", "h", "raw"
        path.write_bytes(bytes(65536))
    else:
        path, name = hostile(case), "h"
    want = _refusal(qemu_nbd_argv(path, tmp_path / "q.sock", ["-B", name], fmt))
    assert want[0] == 1, want
    sock = tmp_path / "c.sock"
    assert _refusal(qcowfast_argv(path, sock, ["-B", name], fmt)) == want
    assert not sock.exists()


def _depth_status(sock: Path, requests) -> list:
    """The error (0 or an NBD error) and extents of each (offset, length, flags) block status
    request over qemu:allocation-depth alone."""
    c = Client(str(sock)).greet()
    try:
        assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
        replies = c.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"", [DEPTH.encode()]))
        assert [t for t, _ in replies] == [nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]
        assert c.option(nbd.NBD_OPT_GO, info_data(b""))[-1][0] == nbd.NBD_REP_ACK
        out = []
        for handle, (offset, length, flags) in enumerate(requests):
            c.request(nbd.NBD_CMD_BLOCK_STATUS, handle, offset, length, flags)
            cflags, rtype, got, payload = c.chunk()
            assert got == handle and cflags & nbd.NBD_REPLY_FLAG_DONE
            if rtype == nbd.NBD_REPLY_TYPE_ERROR:
                out.append(struct.unpack_from(">I", payload)[0])
            else:
                assert rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS
                out.append((0, payload[4:]))
        return out
    finally:
        c.close()


def test_allocation_depth_over_a_bad_entry_as_qemu_nbd(tmp_path, pair):
    """A data cluster of the top with an unaligned offset: the queries that meet it fail the
    request (EIO), those that end before it (REQ_ONE, a range before it) are answered."""
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write 0 256k")
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M")
    qemu_io(top, "write 64k 64k", "write 512k 64k")
    patch_l2_entry(top, 512 * 1024, lambda old: old + 512)
    requests = [(0, 1 << 20, 0), (0, 1 << 20, 1 << 3), (0, 256 * 1024, 0),
                (512 * 1024, 4096, 0), (600 * 1024, 64 * 1024, 0)]
    with pair(top, "-A") as (ref, got):
        want = _depth_status(ref.sock, requests)
        assert _depth_status(got.sock, requests) == want
    assert want[0] == nbd.NBD_EIO and want[1][0] == 0


def test_alternating_bitmap_extents_stay_bounded(tmp_path):
    """A bitmap whose bits alternate (every other 512-byte granule dirty) over a request of
    512 MiB: the extents stop at the cap without building every run first (they were all
    built, about 100 MB of Python objects, then cut)."""
    import tracemalloc
    import qcowfast
    from qcowfast.serve import _exported_bitmaps
    path = tmp_path / "alternating.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1G")
    bitmap(path, "--add", "-g", "512", "h")
    qemu_io(path, "write 0 4k", "write 256M 4k")         # a data cluster for two table entries
    _, [bm] = _directory(path)
    with open(path, "rb") as f:
        f.seek(bm.table_offset)
        entries = struct.unpack(">2Q", f.read(16))
    for entry in entries:
        _patch(path, entry, b"\x55" * 65536)
    with qcowfast.open(path) as image:
        [exported] = _exported_bitmaps(image, ["h"])
        tracemalloc.start()
        try:
            extents = exported.extents(0, 512 << 20, 131072)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(extents) == 131072
    assert extents[:4] == [(512, 1), (512, 0), (512, 1), (512, 0)]
    assert peak < 48 << 20, peak
