"""`qcowfast serve` against `qemu-nbd -r` 7.2: --object, invalid requests, a corrupt compressed
cluster, and -l of a snapshot whose L1 table is bad.

--object: qemu-nbd checks it as qemu-img does while it reads its options (its line, status 1),
but has iothread objects too, and a main-loop object fails there ("qemu aio context not
ready"). Compared: status, stdout and stderr ("qemu-nbd: " read as "qcowfast: ").

Requests: nbd/server.c nbd_co_receive_request() checks a request in its order (length over the
cap, a write to a read-only export, past the end, flags), then nbd_handle_request() (block
status of 0 bytes, without a context, an unknown command): every one an EINVAL reply with
qemu-nbd's words in the error chunk, the connection serving on. Compared: each reply (error
number, chunk flags and message) and whether the connection still serves; writes get EPERM
where qemu-nbd answers EINVAL (README: proto.md asks EPERM of a read-only export).

A corrupt compressed cluster: a structured read without DF gets a chunk for each block status
run before the cluster, as from qemu-nbd (nbd_co_send_sparse_read()); qemu-nbd then drops the
connection, qcowfast ends the reply with an EIO error chunk and serves on. With DF, or simple
replies, the read fails whole (EIO) in both.

Servers listen on Unix sockets in tmp_path and are stopped by each test.
"""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcowfast
from common import qemu_img, qemu_io
from qcowfast import nbd
from test_nbd_protocol import Client
from test_serve import CliServer, QemuNbd, unix_uri
from test_serve_bad_l1 import qcowfast_serve, qemu_nbd
from test_serve_words import _fails

K, M = 1 << 10, 1 << 20
CLUSTER = 64 * K
CAP = 32 * M                                 # the request cap of both servers
DF = nbd.NBD_CMD_FLAG_DF
TIMEOUT = 30


def _qcowfast(sock: Path, *options) -> list:
    return [sys.executable, "-m", "qcowfast", "serve", "-k", sock, *options]


def _same_failure(tmp_path: Path, options: list, image) -> tuple:
    """Run qemu-nbd -r and qcowfast serve with `options` on `image`; assert the same status,
    stdout and stderr (under each one's name); return qemu-nbd's."""
    want = _fails(["qemu-nbd", "-r", "-k", tmp_path / "q.sock", *options, image])
    got = _fails(_qcowfast(tmp_path / "f.sock", *options, image))
    assert got == (want[0], want[1], want[2].replace("qemu-nbd: ", "qcowfast: ")), want
    return want


# -- 1: --object -------------------------------------------------------------------------------

_OBJECTS = [
    ["foo,id=x"], ["secret,data=x"], ["secret,id=s0"], ["a=b=c"], ["secret,id=0x,data=x"],
    ["secret,id=s,data=x,foo=1"], ["memory-backend-ram,id=m,size=1M"], ["tls-creds-psk,id=t"],
    # qemu-nbd has iothread objects (qemu-img has not), and runs no main loop yet.
    ["iothread,id=i,foo=1"], ["iothread,i0"], ["iothread"], ["iothread,id=0"],
    ["iothread,id=i,poll-max-ns=x"], ["iothread,id=i,poll-max-ns=-1"],
    ["iothread,id=i,thread-pool-max=0"], ["iothread,id=i,thread-pool-min=5,thread-pool-max=4"],
    ["iothread,id=i,thread-pool-max=2147483648"], ["iothread,id=i,loaded=on"],
    ["iothread,id=i,aio-max-batch=-1,poll-shrink=-2"],
    ["iothread,id=i,poll-grow=-1,poll-shrink=-2"],
    ["secret,id=a,data=x", "iothread,id=a"], ["iothread,id=a", "iothread,id=a"],
    ["iothread,id=a", "secret,id=b,data=x,keyid=a"],
    ["main-loop,id=m"], ["main-loop"], ["main-loop,id=m,foo=1"], ["main-loop,id=m,aio-max-batch=1"],
    ["main-loop,id=m,aio-max-batch=-1"], ["main-loop,id=m,thread-pool-max=-1,aio-max-batch=1"],
    ["secret,id=a,data=x", "main-loop,id=a"],
    # Valid objects before one qemu-nbd refuses.
    ["secret,id=s0,data=x", "iothread,id=i0,poll-grow=0x10,thread-pool-max=4",
     "throttle-group,id=t", "authz-simple,id=z,identity=u", "main-loop,id=m"],
]


@pytest.mark.parametrize("objects", _OBJECTS, ids=" --object ".join)
def test_object_is_checked_as_qemu_nbd_checks_it(tmp_path, objects):
    options = [a for o in objects for a in ("--object", o)]
    want = _same_failure(tmp_path, options, tmp_path / "missing.qcow2")
    assert want[0] == 1 and "blk_new_open" not in want[2], want


@pytest.mark.parametrize("first, second", [(["--object", "main-loop,id=m"], ["--cache=x"]),
                                           (["--object", "foo"], ["-l", "snapshot.bad=1"])],
                         ids=lambda options: " ".join(options))
def test_object_is_checked_in_option_order(tmp_path, first, second):
    """A bad --object fails where qemu-nbd's getopt loop meets it: after the options before
    it, before those after it."""
    for options in (first + second, second + first):
        _same_failure(tmp_path, options, tmp_path / "missing.qcow2")


def test_objects_qemu_nbd_accepts_are_accepted(tmp_path):
    """Objects qemu-nbd creates (a secret, an iothread, ...) leave the command to open the
    image, as in qemu-nbd, and the image is served; one more, a main-loop, fails both."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 7 0 64k")
    objects = ["secret,id=s0,data=x", "iothread,id=i0,poll-max-ns=0,thread-pool-min=1",
               "throttle-group,id=t0", "authz-simple,id=z0,identity=u"]
    options = [a for o in objects for a in ("--object", o)]
    want = _same_failure(tmp_path, options, tmp_path / "missing.qcow2")
    assert "Failed to blk_new_open" in want[2], want
    _same_failure(tmp_path, [*options, "--object", "main-loop,id=m"], img)
    server = CliServer("-k", tmp_path / "ok.sock", *options, img)
    try:
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", unix_uri(tmp_path / "ok.sock"), str(out)], check=True,
                       timeout=TIMEOUT, capture_output=True)
        assert out.read_bytes()[:CLUSTER] == b"\x07" * CLUSTER
    finally:
        server.stop()


# -- 2: invalid requests -----------------------------------------------------------------------

SIZE = 1 * M
_REQUESTS = [   # (name, command, flags, offset, length)
    ("read past the end", nbd.NBD_CMD_READ, 0, SIZE - 10, 20),
    ("read from past the end", nbd.NBD_CMD_READ, 0, SIZE + 1, 0),
    ("read of 0 at the end", nbd.NBD_CMD_READ, 0, SIZE, 0),
    ("read over the cap", nbd.NBD_CMD_READ, 0, 0, CAP + 1),
    ("read over the cap past the end", nbd.NBD_CMD_READ, 0, SIZE, CAP + 1),
    ("read, unknown flag", nbd.NBD_CMD_READ, 1 << 5, 0, 512),
    ("read, REQ_ONE", nbd.NBD_CMD_READ, nbd.NBD_CMD_FLAG_REQ_ONE, 0, 512),
    ("read, unknown flag, past the end", nbd.NBD_CMD_READ, 1 << 5, SIZE, 512),
    ("read, DF", nbd.NBD_CMD_READ, DF, 0, 512),
    ("unknown command", 9, 0, 0, 512),
    ("unknown command past the end", 9, 0, SIZE, 512),
    ("unknown command, FUA", 9, nbd.NBD_CMD_FLAG_FUA, 0, 0),
    ("unknown command, unknown flags", 1000, 0xFF, 0, 0),
    ("resize", nbd.NBD_CMD_RESIZE, 0, 0, 0),
    ("trim", nbd.NBD_CMD_TRIM, 0, 0, 512),
    ("trim past the end", nbd.NBD_CMD_TRIM, 0, SIZE, 512),
    ("write zeroes, unknown flag, past the end", nbd.NBD_CMD_WRITE_ZEROES, 1 << 6, SIZE, 512),
    ("write", nbd.NBD_CMD_WRITE, 0, 0, 512),
    ("write past the end", nbd.NBD_CMD_WRITE, 0, SIZE, 512),
    ("write, unknown flag", nbd.NBD_CMD_WRITE, 1 << 7, 0, 512),
    ("flush, DF", nbd.NBD_CMD_FLUSH, DF, 0, 0),
    ("flush past the end", nbd.NBD_CMD_FLUSH, 0, SIZE, 512),
    ("flush with a range", nbd.NBD_CMD_FLUSH, 0, 0, 512),
    ("cache past the end", nbd.NBD_CMD_CACHE, 0, SIZE, 512),
    ("cache over the cap", nbd.NBD_CMD_CACHE, 0, 0, CAP + 1),
    ("cache, REQ_ONE", nbd.NBD_CMD_CACHE, nbd.NBD_CMD_FLAG_REQ_ONE, 0, 512),
    ("block status of 0", nbd.NBD_CMD_BLOCK_STATUS, 0, 0, 0),
    ("block status of 0 past the end", nbd.NBD_CMD_BLOCK_STATUS, 0, SIZE + 1, 0),
    ("block status past the end", nbd.NBD_CMD_BLOCK_STATUS, 0, SIZE - 1, 2),
    ("block status, DF", nbd.NBD_CMD_BLOCK_STATUS, DF, 0, 512),
    ("block status of 4 GiB", nbd.NBD_CMD_BLOCK_STATUS, 0, 0, (1 << 32) - 1),
    ("block status", nbd.NBD_CMD_BLOCK_STATUS, 0, 0, 512),
]
_WRITES = (nbd.NBD_CMD_WRITE, nbd.NBD_CMD_TRIM, nbd.NBD_CMD_WRITE_ZEROES)


def _reply(c: Client, length: int) -> tuple:
    """The reply to one request: ("simple", error) or each chunk's (flags, type, and for an
    error chunk its error and message)."""
    (magic,) = struct.unpack(">I", c.recv(4))
    if magic == nbd.NBD_SIMPLE_REPLY_MAGIC:
        error, _ = struct.unpack(">IQ", c.recv(12))
        if not error and length:
            c.recv(length)
        return ("simple", error)
    chunks = []
    while True:
        if chunks:
            c.recv(4)
        flags, rtype, _, n = struct.unpack(">HHQI", c.recv(16))
        payload = c.recv(n)
        if rtype == nbd.NBD_REPLY_TYPE_ERROR:
            error, size = struct.unpack_from(">IH", payload)
            chunks.append((flags, "error", error, payload[6:6 + size].decode()))
        else:
            chunks.append((flags, rtype))
        if flags & nbd.NBD_REPLY_FLAG_DONE:
            return tuple(chunks)


def _answers(sock: Path, structured: bool, meta: bool) -> list:
    """Each of _REQUESTS on a new connection: its reply, and whether a read then succeeds."""
    out = []
    for name, cmd, flags, offset, length in _REQUESTS:
        c = Client(str(sock)).greet()
        c.sock.settimeout(TIMEOUT)
        try:
            c.go(structured=structured, meta=meta)
            c.request(cmd, 5, offset, length, flags,
                      bytes(length) if cmd == nbd.NBD_CMD_WRITE else b"")
            reply = _reply(c, length if cmd == nbd.NBD_CMD_READ else 0)
            error, _ = c.read(0, 512)
            out.append((name, reply, error))
        finally:
            c.close()
    return out


def _as_qemu_nbd(answers: list) -> list:
    """qcowfast's answers with EPERM for writes read as qemu-nbd's EINVAL (README)."""
    out = []
    for (name, reply, after), (_, cmd, *_) in zip(answers, _REQUESTS):
        if cmd in _WRITES:
            reply = (tuple(r[:2] + (nbd.NBD_EINVAL if r[2] == nbd.NBD_EPERM else r[2],) + r[3:]
                           for r in reply) if reply[0] != "simple" else
                     ("simple", nbd.NBD_EINVAL if reply[1] == nbd.NBD_EPERM else reply[1]))
        out.append((name, reply, after))
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    img = tmp_path_factory.mktemp("leftover-requests") / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_io(img, "write -P 1 0 64k")
    return img


@pytest.mark.parametrize("structured, meta", [(True, True), (True, False), (False, False)],
                         ids=["structured+context", "structured", "simple"])
def test_invalid_requests_answer_as_qemu_nbd(plain, tmp_path, structured, meta):
    with qemu_nbd(plain, tmp_path / "q.sock") as sock:
        want = _answers(sock, structured, meta)
    with qcowfast_serve(plain, tmp_path / "f.sock") as sock:
        got = _answers(sock, structured, meta)
    writes = [r for (_, r, _), (_, cmd, *_) in zip(got, _REQUESTS) if cmd in _WRITES]
    assert all((r[1] if r[0] == "simple" else r[0][2]) == nbd.NBD_EPERM for r in writes), writes
    for g, w in zip(_as_qemu_nbd(got), want):
        assert g == w, f"qcowfast {g!r}\n  qemu-nbd {w!r}"


def test_a_write_over_the_cap_is_refused_and_closes_as_in_qemu_nbd(plain, tmp_path):
    """qemu-nbd's words, then the connection ends (the payload cannot be skipped)."""
    def answer(sock):
        c = Client(str(sock)).greet()
        c.sock.settimeout(TIMEOUT)
        try:
            c.go()
            c.request(nbd.NBD_CMD_WRITE, 5, 0, CAP + 1)
            flags, rtype, _, payload = c.chunk()
            error, n = struct.unpack_from(">IH", payload)
            return (flags, rtype, error, payload[6:6 + n].decode(), c.closed())
        finally:
            c.close()
    with qemu_nbd(plain, tmp_path / "q.sock") as sock:
        want = answer(sock)
    with qcowfast_serve(plain, tmp_path / "f.sock") as sock:
        got = answer(sock)
    assert want[2] == nbd.NBD_EINVAL and want[4]
    assert got == want[:2] + (nbd.NBD_EPERM,) + want[3:]


# -- 3: a corrupt compressed cluster -----------------------------------------------------------

def _corrupt_compressed(d: Path, compression: str) -> tuple[Path, int]:
    """A compressed image (qemu-img convert -c) of compressed, zero and incompressible clusters;
    the deflate (zstd) stream of the one at guest 4 clusters garbled. Returns (image, its
    guest offset)."""
    d.mkdir()
    src = d / "src.raw"
    rand = os.urandom(CLUSTER)
    clusters = [b"\x01" * CLUSTER, bytes(CLUSTER), rand, b"\x03" * 1000 + bytes(CLUSTER - 1000),
                bytes(range(256)) * (CLUSTER // 256), b"\x05" * CLUSTER, bytes(CLUSTER),
                b"\x07" * CLUSTER]
    src.write_bytes(b"".join(clusters))
    img = d / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={compression}", src, img)
    bad = 4 * CLUSTER
    with qcowfast.open(img) as image:
        ext = next(e for e in image.extents() if e.kind == qcowfast.ExtentKind.COMPRESSED
                   and e.guest_offset == bad)
    with open(img, "r+b") as f:
        f.seek(ext.host_offset + 2)
        f.write(b"\xff" * 64)
    proc = subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(d / "o.raw")],
                          capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc                 # qemu-img agrees the cluster is broken
    return img, bad


def _read_reply(c: Client, offset: int, length: int, flags) -> list:
    """Each chunk of one read as (flags, type, offset - `offset`, length, sha256 of its
    data), an error chunk as (flags, "ERROR", error, message), ("closed",) where the
    connection ended; ("simple", error) for a simple reply (flags None)."""
    c.request(nbd.NBD_CMD_READ, 17, offset, length, flags or 0)
    out: list = []
    try:
        if flags is None:
            error, _, _ = c.simple_reply(length)
            return [("simple", error)]
        while True:
            cflags, rtype, _, payload = c.chunk()
            if rtype == nbd.NBD_REPLY_TYPE_ERROR:
                error, n = struct.unpack_from(">IH", payload)
                out.append((cflags, "ERROR", error, payload[6:6 + n].decode()))
            elif rtype == nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload)
                out.append((cflags, "HOLE", at - offset, n))
            else:
                (at,) = struct.unpack_from(">Q", payload)
                out.append((cflags, rtype, at - offset, len(payload) - 8,
                            hashlib.sha256(payload[8:]).hexdigest()))
            if cflags & nbd.NBD_REPLY_FLAG_DONE:
                return out
    except (EOFError, ConnectionError):
        return [*out, ("closed",)]


def _reads(sock: Path, bad: int) -> list:
    """Reads that reach the bad cluster (from before it, inside it), each on a new connection:
    structured without and with DF, then simple; then whether a read still succeeds."""
    out = []
    for off, n in ((0, 8 * CLUSTER), (2 * CLUSTER + 5, 3 * CLUSTER), (bad + 100, 1000),
                   (CLUSTER, 3 * CLUSTER + 1)):
        for flags in (0, DF, None):
            c = Client(str(sock)).greet()
            c.sock.settimeout(TIMEOUT)
            try:
                c.go(structured=flags is not None, meta=False)
                reply = _read_reply(c, off, n, flags)
                try:
                    after = c.read(7 * CLUSTER, 4 * K)[0]
                except (EOFError, ConnectionError):
                    after = "closed"
                out.append(((off, n, flags), reply, after))
            finally:
                c.close()
    return out


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_a_corrupt_compressed_cluster_reads_as_from_qemu_nbd(tmp_path, compression):
    img, bad = _corrupt_compressed(tmp_path / "img", compression)
    with qemu_nbd(img, tmp_path / "q.sock") as sock:
        want = _reads(sock, bad)
    with qcowfast_serve(img, tmp_path / "f.sock") as sock:
        got = _reads(sock, bad)
    sparse = 0
    for g, w in zip(got, want):
        request, reply, after = w
        if request[2] == 0 and reply[-1] == ("closed",):
            # qemu-nbd drops the connection where qcowfast sends an error chunk (README).
            sparse += len(reply) > 1
            w = (request, [*reply[:-1], (1, "ERROR", nbd.NBD_EIO, "reading from file failed")],
                 0)
        else:
            assert reply[-1] in ((1, "ERROR", nbd.NBD_EIO, "reading from file failed"),
                                 ("simple", nbd.NBD_EIO)) and after == 0, w
        assert g == w, f"qcowfast {g!r}\n  qemu-nbd {w!r}"
    assert sparse >= 2, want                           # chunks before the failing cluster


# -- 4: -l with a bad snapshot L1 table --------------------------------------------------------

@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory) -> tuple[Path, bytes, int, int]:
    d = tmp_path_factory.mktemp("leftover-snapshot")
    img = d / "sn.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 0 64k")
    data = img.read_bytes()
    (table,) = struct.unpack_from(">Q", data, 64)
    l1_offset, _ = struct.unpack_from(">QI", data, table)
    return d, data, table, l1_offset


def _with_snapshot_l1(snapshotted, name: str, offset: int | None, entries: int) -> Path:
    d, data, table, l1_offset = snapshotted
    out = bytearray(data)
    struct.pack_into(">QI", out, table, l1_offset if offset is None else offset, entries)
    path = d / f"{name}.qcow2"
    path.write_bytes(out)
    return path


_BAD_L1 = {"misaligned": (lambda l1: l1 + 8, 1), "too large": (lambda l1: l1, 4 * M + 1),
           "offset near 2^63": (lambda l1: (1 << 63) - CLUSTER, 16 * K)}


@pytest.mark.parametrize("case", list(_BAD_L1))
def test_load_snapshot_with_a_bad_l1_table_fails_as_qemu_nbd(snapshotted, tmp_path, case):
    """qcow2_snapshot_load_tmp()'s words; an id-or-name whose id names the snapshot is tried
    as a name after EINVAL (a bad offset: no such snapshot), not after EFBIG."""
    offset, entries = _BAD_L1[case]
    path = _with_snapshot_l1(snapshotted, case.replace(" ", "-"), offset(snapshotted[3]),
                             entries)
    for selector in ("s1", "1", "snapshot.id=1", "snapshot.name=s1"):
        want = _same_failure(tmp_path, ["-f", "qcow2", "-l", selector], path)
        assert want[2].startswith("qemu-nbd: Failed to load snapshot: "), want


def test_load_snapshot_with_an_l1_table_past_the_end_fails_to_load(snapshotted, tmp_path):
    """qemu-nbd serves zeros for the table it reads past the end of the file; qcowfast refuses
    it (README, Differences), in the words of a snapshot that cannot be loaded."""
    path = _with_snapshot_l1(snapshotted, "past-the-end", 1 << 40, 1)
    status, out, err = _fails(_qcowfast(tmp_path / "f.sock", "-l", "s1", path))
    assert (status, out) == (1, "") and err.count("\n") == 1, err
    assert err.startswith("qcowfast: Failed to load snapshot: ") and "past the end" in err, err
    server = QemuNbd(path, tmp_path / "q.sock", "-l", "s1")      # (qemu-nbd serves it)
    server.stop()
