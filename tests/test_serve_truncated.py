"""`qcowfast serve` of an image whose file is cut short, against `qemu-nbd -r`.

The file is cut before it is served or while it is served, so that data clusters lie partly
or wholly past its end. qemu-nbd reads the missing bytes as zeros and reports them ZERO (a
hole of the file: SEEK_DATA fails there). qcowfast refuses to read them (README, Differences):
each read that needs them gets EIO alone, and the connection and the server go on. Its block
status agrees with its reads: the missing bytes are data (a client must read them, and the
read fails), never ZERO, which would let `qemu-img convert` or `nbdcopy` write zeros for them
without asking. A data cluster wholly past the end of a file already short when it was opened
is a bad L2 entry, as everywhere (test_serve_bad_l1): a block status query meeting it fails.

Both servers run as processes with the same options (-r -t -f FMT -A -k SOCKET), each on its
own copy of the image, on Unix sockets in tmp_path; every command has a timeout and every
server is stopped by its test.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from common import qemu_img, qemu_io, qemu_map
from qcowfast import nbd
from test_nbd_protocol import Client
from test_serve import _terminate

K, M = 1 << 10, 1 << 20
SIZE = 4 * M
TIMEOUT = 60
EIO_LINE = "read failed: Input/output error"


def _run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)


# -- images --------------------------------------------------------------------------------

def _qcow2(d: Path, prealloc: bool) -> Path:
    """64 KiB clusters: 0x11 over [0, 256K), 0x22 over [1M, 1M + 256K), 0x33 over
    [3M, 3M + 128K), written in that order (the last data clusters of a dense file); with
    `prealloc`, every cluster allocated beforehand (preallocation=metadata)."""
    p = d / ("prealloc.qcow2" if prealloc else "dense.qcow2")
    options = ("-o", "preallocation=metadata") if prealloc else ()
    qemu_img("create", "-q", "-f", "qcow2", *options, p, SIZE)
    qemu_io(p, "write -P 0x11 0 256k", "write -P 0x22 1M 256k", "write -P 0x33 3M 128k")
    return p


def _raw(d: Path) -> Path:
    p = d / "disk.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", _qcow2(d, False), p)
    return p


def _copy(src: Path, dst: Path) -> None:
    """Copy keeping the holes qemu-img left (QEMU's metadata preallocation detection
    counts the blocks the file allocates)."""
    subprocess.run(["cp", "--sparse=auto", str(src), str(dst)], check=True, timeout=TIMEOUT)


def _truncate(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(at)


def _host_of(path: Path, guest: int) -> int:
    (ext,) = [e for e in qemu_map(path) if e["start"] <= guest < e["start"] + e["length"]]
    return ext["offset"] + guest - ext["start"]


def _cut_at(path: Path, fmt: str, cut: str) -> int:
    """Where to cut the file: "partial" leaves the first 16 KiB of its last cluster,
    "whole" the first 16 KiB of the data at 3M (the cluster after it wholly past the end;
    in a raw file, the rest of the file)."""
    size = path.stat().st_size
    if cut == "partial":
        assert fmt == "qcow2" and size % (64 * K) == 0
        return size - 48 * K
    return _host_of(path, 3 * M) + 16 * K


def _past_end(path: Path, fmt: str, at: int) -> list[tuple[int, int]]:
    """The guest ranges whose bytes lie past `at` in the file (of the image before the cut)."""
    if fmt == "raw":
        return [(at, SIZE)]
    out = []
    for e in qemu_map(path):
        if e.get("offset") is not None and e["data"] and e["offset"] + e["length"] > at:
            out.append((e["start"] + max(0, at - e["offset"]), e["start"] + e["length"]))
    assert out
    return out


# -- servers -------------------------------------------------------------------------------

@contextmanager
def _server(which: str, path: Path, sock: Path, fmt: str):
    """qemu-nbd or qcowfast serve with the same options; yields the process (its stderr goes
    to SOCK.log)."""
    command = (["qemu-nbd"] if which == "qemu-nbd"
               else [sys.executable, "-m", "qcowfast", "serve"])
    log = sock.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen([*command, "-r", "-t", "-f", fmt, "-A", "-k", str(sock),
                                 str(path)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, f"{which} ended: {log.read_text()}"
            assert time.monotonic() < deadline, f"{which} did not start"
            time.sleep(0.02)
        yield proc
    finally:
        _terminate(proc)


def _alive(proc: subprocess.Popen, sock: Path) -> None:
    """The server still runs, answers a new client, and logged no crash."""
    __tracebackhide__ = True
    assert proc.poll() is None
    got = _run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
    assert (got.returncode, got.stdout.strip()) == (0, str(SIZE)), got.stderr
    assert "Traceback" not in sock.with_suffix(".log").read_text()


# -- what the clients print ----------------------------------------------------------------

def _reads(past: list) -> list[str]:
    """qemu-io read commands, on one connection: intact data before and after reads of
    missing bytes (which qemu-nbd reads as zeros), one of them straddling the cut."""
    a, b = past[0]
    n = min(b - a, 64 * K)
    return ["read -q -P 0x11 0 256k", f"read -q -P 0 {a} {n}", f"read -q {a - 512} 1024",
            "read -q -P 0x22 1M 256k", f"read -q -P 0 {b - n} {n}", "read -q -P 0x11 0 256k"]


def _clients(sock: Path, reads: list, out: Path) -> dict:
    uri = f"nbd+unix:///?socket={sock}"
    io = [a for r in reads for a in ("-c", r)]
    got = {"map": _run("nbdinfo", "--map", uri),
           "depth": _run("nbdinfo", "--map=qemu:allocation-depth", uri),
           "qemu-img map": _run("qemu-img", "map", "--output=json", "-f", "raw", uri),
           "reads": _run("qemu-io", "-r", "-f", "raw", *io, uri),
           "convert": _run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)}
    return {k: (p.returncode, p.stdout, p.stderr.replace(str(sock), "SOCK"))
            for k, p in got.items()}


def _nbdinfo_segments(text: str) -> list:
    out = []
    for line in text.splitlines():
        offset, length, kind, what = line.split(None, 3)
        out.append((int(offset), int(length), (int(kind), what)))
    return out


def _json_segments(text: str) -> list:
    return [(e["start"], e["length"], (e["depth"], e["present"], e["zero"], e["data"],
                                       e.get("offset") == e["start"]))
            for e in json.loads(text)]


def _merged(segments) -> list:
    out: list = []
    for start, length, value in segments:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((start, length, value))
    return out


def _with_data(segments: list, ranges: list, data) -> list:
    """`segments` (start, length, value) with their parts inside `ranges` set to `data`."""
    cuts = sorted({p for r in ranges for p in r})
    out = []
    for start, length, value in segments:
        pos, end = start, start + length
        for p in [c for c in cuts if start < c < end] + [end]:
            inside = any(a <= pos < b for a, b in ranges)
            out.append((pos, p - pos, data if inside else value))
            pos = p
    return _merged(out)


def _agrees_with_reads(sock: Path) -> list:
    """Every base:allocation extent of the export read on one connection: an extent flagged
    ZERO reads as zeros, one whose read fails is data (flags 0). Returns the extents."""
    __tracebackhide__ = True
    c = Client(str(sock), timeout=TIMEOUT).greet()
    try:
        c.go()
        c.request(nbd.NBD_CMD_BLOCK_STATUS, 3, 0, SIZE)
        flags, rtype, handle, payload = c.chunk()
        assert (rtype, handle) == (nbd.NBD_REPLY_TYPE_BLOCK_STATUS, 3)
        assert flags & nbd.NBD_REPLY_FLAG_DONE
        vals = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
        extents = list(zip(vals[::2], vals[1::2]))
        pos, failed = 0, 0
        for length, kind in extents:
            error, data = c.read(pos, length)
            if error:
                assert (error, kind) == (nbd.NBD_EIO, 0), (pos, length, kind)
                failed += 1
            elif kind & nbd.NBD_STATE_ZERO:
                assert data.count(0) == length, (pos, length, kind)
            pos += length
        assert pos == SIZE and failed
        assert c.read(0, 64 * K) == (0, b"\x11" * 64 * K)     # the connection serves on
    finally:
        c.close()
    return extents


# -- the cases -----------------------------------------------------------------------------

CASES = {
    # (image, cut, when): the cut is made before the servers start, or once they serve.
    "dense-partial-before": ("dense", "partial", "before"),
    "prealloc-partial-before": ("prealloc", "partial", "before"),
    "dense-partial-while": ("dense", "partial", "while"),
    "dense-whole-while": ("dense", "whole", "while"),
    "prealloc-whole-while": ("prealloc", "whole", "while"),
    "raw-while": ("raw", "whole", "while"),
}


def _image(d: Path, kind: str) -> tuple[Path, str]:
    if kind == "raw":
        return _raw(d), "raw"
    return _qcow2(d, kind == "prealloc"), "qcow2"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cut_short_as_qemu_nbd_but_reads_refused(tmp_path, case):
    """Maps as qemu-nbd's, but with the missing bytes data (qemu-nbd: zero, or a hole of a raw
    file); allocation depth as qemu-nbd's. Reads of missing bytes fail alone (qemu-nbd: zeros),
    so qemu-img convert over NBD fails (qemu-nbd's copy has zeros there); the server lives."""
    kind, cut, when = CASES[case]
    original, fmt = _image(tmp_path, kind)
    at = _cut_at(original, fmt, cut)
    past = _past_end(original, fmt, at)
    got = {}
    for which in ("qemu-nbd", "qcowfast"):
        path = tmp_path / f"{which}.{fmt}"
        _copy(original, path)
        if when == "before":
            _truncate(path, at)
        sock = tmp_path / f"{which}.sock"
        with _server(which, path, sock, fmt) as proc:
            if when == "while":
                _truncate(path, at)
            got[which] = _clients(sock, _reads(past), tmp_path / f"{which}.out")
            if which == "qcowfast":
                extents = _agrees_with_reads(sock)
                _alive(proc, sock)
    want, ours = got["qemu-nbd"], got["qcowfast"]
    assert all(want[k][0] == 0 for k in want), want
    # base:allocation, and qemu-img map over NBD: qemu-nbd's, the missing bytes data.
    assert ours["map"][0] == 0, ours["map"]
    assert _nbdinfo_segments(ours["map"][1]) == _with_data(
        _nbdinfo_segments(want["map"][1]), past, (0, "data"))
    assert ours["qemu-img map"][0] == 0, ours["qemu-img map"]
    assert _json_segments(ours["qemu-img map"][1]) == _with_data(
        _json_segments(want["qemu-img map"][1]), past, (0, True, False, True, True))
    assert sum(n for n, _ in extents) == SIZE
    # qemu:allocation-depth: the same.
    assert ours["depth"] == want["depth"]
    # Reads: the three that need missing bytes fail, the others (after them too) read.
    assert want["reads"][1:] == ("", ""), want["reads"]
    assert ours["reads"] == (1, f"{EIO_LINE}\n" * 3, ""), ours["reads"]
    # qemu-img convert over NBD: qemu-nbd's copy has zeros; ours fails.
    copy = (tmp_path / "qemu-nbd.out").read_bytes()
    assert all(copy[a:b].count(0) == b - a for a, b in past)
    assert ours["convert"][0] == 1
    assert ours["convert"][2].startswith("qemu-img: error while reading at byte ")
    assert ours["convert"][2].rstrip().endswith(": Input/output error"), ours["convert"]


@pytest.mark.parametrize("kind", ["dense", "prealloc"])
def test_cluster_wholly_past_the_end_when_opened(tmp_path, kind):
    """A file already cut short when served, a data cluster of it wholly past the end: a bad
    L2 entry, as qemu-img map and convert refuse it. Block status of a range that reaches it
    fails (EIO), a REQ_ONE request before it is answered, reads of it fail and reads beside it
    are served, on the same connection; qemu-img map over NBD prints qemu-nbd's entries up to
    it, then fails; qemu-nbd maps it and reads zeros."""
    original = _qcow2(tmp_path, kind == "prealloc")
    at = _cut_at(original, "qcow2", "whole")
    past = _past_end(original, "qcow2", at)
    got = {}
    for which in ("qemu-nbd", "qcowfast"):
        path = tmp_path / f"{which}.qcow2"
        _copy(original, path)
        _truncate(path, at)
        sock = tmp_path / f"{which}.sock"
        with _server(which, path, sock, "qcow2") as proc:
            got[which] = _clients(sock, _reads(past), tmp_path / f"{which}.out")
            if which == "qcowfast":
                _wire_around_bad_cluster(sock, past)
                _alive(proc, sock)
    want, ours = got["qemu-nbd"], got["qcowfast"]
    assert all(want[k][0] == 0 for k in want), want
    for what in ("map", "depth"):
        assert ours[what][0] == 1, ours[what]
        assert ours[what][2].endswith("block-status: command failed: Input/output error\n")
    code, out, err = ours["qemu-img map"]
    assert (code, err) == (1, "qemu-img: Could not read file metadata: Input/output error\n")
    lines = out.splitlines()
    assert len(lines) >= 3 and lines == want["qemu-img map"][1].splitlines()[:len(lines)]
    assert ours["reads"] == (1, f"{EIO_LINE}\n" * 3, ""), ours["reads"]
    assert ours["convert"][0] == 1 and "Input/output error" in ours["convert"][2]


def _wire_around_bad_cluster(sock: Path, past: list) -> None:
    __tracebackhide__ = True
    c = Client(str(sock), timeout=TIMEOUT).greet()
    try:
        c.go()
        for offset, length, flags, ok in ((0, SIZE, 0, False),
                                          (0, SIZE, nbd.NBD_CMD_FLAG_REQ_ONE, True),
                                          (past[0][0], SIZE - past[0][0], 0, False)):
            c.request(nbd.NBD_CMD_BLOCK_STATUS, 5, offset, length, flags)
            cflags, rtype, handle, payload = c.chunk()
            assert handle == 5 and cflags & nbd.NBD_REPLY_FLAG_DONE
            if ok:
                assert rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS
                assert struct.unpack_from(">II", payload, 4) == (256 * K, 0)
            else:
                assert rtype == nbd.NBD_REPLY_TYPE_ERROR
                assert struct.unpack_from(">I", payload)[0] == nbd.NBD_EIO
        assert c.read(past[-1][0], 4 * K)[0] == nbd.NBD_EIO
        assert c.read(M, 4 * K) == (0, b"\x22" * 4 * K)
    finally:
        c.close()


def test_l2_table_cut_while_served(tmp_path):
    """The file cut into its L2 table while served: every request that needs the table fails
    alone (EIO), the server lives. qemu-nbd reads zeros (from the missing table, or from the
    missing clusters of the table it had cached) and maps them as zeros."""
    original = _qcow2(tmp_path, False)
    with open(original, "rb") as f:
        header = f.read(48)
        f.seek(struct.unpack_from(">Q", header, 40)[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
    assert 0 < l2 < _host_of(original, 0)
    got = {}
    for which in ("qemu-nbd", "qcowfast"):
        path = tmp_path / f"{which}.qcow2"
        _copy(original, path)
        sock = tmp_path / f"{which}.sock"
        with _server(which, path, sock, "qcow2") as proc:
            _truncate(path, l2 + 4 * K)
            got[which] = _clients(sock, ["read -q -P 0 0 64k", "read -q -P 0 3M 4k"],
                                  tmp_path / f"{which}.out")
            if which == "qcowfast":
                _alive(proc, sock)
    want, ours = got["qemu-nbd"], got["qcowfast"]
    # (Whether qemu-nbd had the table cached by then or reads it as zeros, it reads zeros.)
    assert want["map"][0] == 0 and want["reads"] == (0, "", ""), want
    for what in ("map", "depth"):
        assert ours[what][0] == 1, ours[what]
        assert ours[what][2].endswith("block-status: command failed: Input/output error\n")
    assert ours["reads"] == (1, f"{EIO_LINE}\n" * 2, ""), ours["reads"]
    assert ours["convert"][0] == 1 and "Input/output error" in ours["convert"][2]
