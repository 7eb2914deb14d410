"""The NBD server against a raw-socket client: every reply checked against NBD's doc/proto.md.

Real clients see NBD_FLAG_READ_ONLY and never send writes, so this client sends what they do
not: writes (with payloads under and over the request cap), trims, write-zeroes, unknown
commands and options, bad magic, reads past the end, oversized reads, option floods, stalled
messages and garbage, and checks each reply and that the connection still serves (or is closed
where the spec says). A hypothesis test fuzzes the handshake and request parser. Expected bytes
come from `qemu-img convert -O raw` of an image qemu-io wrote.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw
from qcowfast import nbd
from qcowfast.serve import NBDServer

SIZE = 2 * 1024 * 1024
CLUSTER = 65536
MAX_REQUEST = 1024 * 1024
LIMITS = nbd.Limits(max_request=MAX_REQUEST, max_options=16, handshake_timeout=1.0,
                    io_timeout=0.5, max_in_flight=8, workers=2)

REP_MAGIC = 0x0003E889045565A9


@pytest.fixture(scope="module")
def proto_image(tmp_path_factory):
    """2 MiB compressed image: data, a hole, data again (qemu-io + qemu-img convert -c)."""
    d = tmp_path_factory.mktemp("proto")
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, SIZE)
    qemu_io(plain, "write -P 0x5a 0 512k", "write -P 0x33 1536k 512k")
    out = d / "image.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, out)
    return out


@pytest.fixture(scope="module")
def want(proto_image):
    return reference_raw(proto_image)


class Errors(logging.Handler):
    """Collects ERROR records of the server and exceptions escaping its threads."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


@pytest.fixture(scope="module")
def server(proto_image, tmp_path_factory):
    errors = Errors()
    logger = logging.getLogger("qcowfast.serve")
    logger.addHandler(errors)
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.seen.append(repr(args.exc_value))
    srv = NBDServer(proto_image, socket=tmp_path_factory.mktemp("sock") / "nbd.sock",
                    persistent=True, limits=LIMITS)
    srv.start()
    srv.errors = errors.seen
    try:
        yield srv
    finally:
        srv.stop()
        threading.excepthook = old_hook
        logger.removeHandler(errors)
    assert srv.errors == []


@pytest.fixture(autouse=True)
def no_server_errors(request):
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        assert srv.errors == [], srv.errors


class Client:
    """A minimal NBD client over a raw socket; every read has a timeout."""

    def __init__(self, address, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(address)

    def close(self):
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed(self, timeout=3.0) -> bool:
        """True when the server closes the connection (any pending bytes are discarded)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    # handshake
    def greet(self, client_flags=nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert flags == nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES
        self.sock.sendall(struct.pack(">I", client_flags))
        return self

    def send_option(self, opt: int, data: bytes = b"", magic=nbd.IHAVEOPT):
        self.sock.sendall(struct.pack(">QII", magic, opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REP_MAGIC
        return opt, rtype, self.recv(length)

    def option(self, opt: int, data: bytes = b"") -> list:
        """Send an option; return its replies up to the final ACK or error."""
        self.send_option(opt, data)
        replies = []
        while True:
            got_opt, rtype, payload = self.option_reply()
            assert got_opt == opt
            replies.append((rtype, payload))
            if rtype == nbd.NBD_REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, structured=True, meta=True, name=b""):
        if structured:
            assert self.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
        if meta:
            replies = self.option(nbd.NBD_OPT_SET_META_CONTEXT,
                                  meta_data(name, [b"base:allocation"]))
            assert [t for t, _ in replies] == [nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]
            self.context_id = struct.unpack_from(">I", replies[0][1])[0]
        replies = self.option(nbd.NBD_OPT_GO, info_data(name, [nbd.NBD_INFO_BLOCK_SIZE]))
        assert replies[-1][0] == nbd.NBD_REP_ACK, replies
        self.structured = structured
        return replies

    # transmission
    def request(self, cmd, handle=1, offset=0, length=0, flags=0, payload=b""):
        self.sock.sendall(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, cmd, handle,
                                      offset, length) + payload)

    def simple_reply(self, length=0):
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC
        return error, handle, (self.recv(length) if error == 0 and length else b"")

    def chunk(self):
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC
        return flags, rtype, handle, self.recv(length)

    def read(self, offset, length, handle=7, flags=0):
        """Issue a read; return (error, data)."""
        self.request(nbd.NBD_CMD_READ, handle, offset, length, flags)
        if not self.structured:
            error, got, data = self.simple_reply(length)
            assert got == handle
            return error, data
        data, error = bytearray(length), 0
        while True:
            cflags, rtype, got, payload = self.chunk()
            assert got == handle
            if rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                data[off - offset:off - offset + len(payload) - 8] = payload[8:]
            elif rtype == nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                data[off - offset:off - offset + n] = bytes(n)
            elif rtype == nbd.NBD_REPLY_TYPE_ERROR:
                error, msglen = struct.unpack_from(">IH", payload)
                assert len(payload) == 6 + msglen and msglen > 0
            else:
                assert rtype == nbd.NBD_REPLY_TYPE_NONE
            if cflags & nbd.NBD_REPLY_FLAG_DONE:
                return error, bytes(data)

    def pipelined_reads(self, reads: dict) -> dict:
        """Send the reads {handle: (offset, length)} at once; return {handle: (error, data)}
        from their single-chunk replies, in whatever order they come."""
        self.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0,
                                               nbd.NBD_CMD_READ, h, off, n)
                                   for h, (off, n) in reads.items()))
        got = {}
        for _ in range(len(reads)):
            if self.structured:
                flags, rtype, handle, payload = self.chunk()
                assert flags & nbd.NBD_REPLY_FLAG_DONE
                if rtype == nbd.NBD_REPLY_TYPE_ERROR:
                    got[handle] = (struct.unpack_from(">I", payload)[0], b"")
                    continue
                assert rtype == (nbd.NBD_REPLY_TYPE_OFFSET_DATA if reads[handle][1] else
                                 nbd.NBD_REPLY_TYPE_NONE), rtype
                got[handle] = (0, payload[8:])
            else:
                error, handle, _ = self.simple_reply()
                got[handle] = (error, b"" if error else self.recv(reads[handle][1]))
        assert sorted(got) == sorted(reads)
        return got

    def error_of(self, handle, read=False):
        """The error of a reply without data (simple, or structured when negotiated; reads
        must be answered structured then)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == nbd.NBD_SIMPLE_REPLY_MAGIC:
            assert not (read and self.structured), "simple reply to a structured read"
            error, got = struct.unpack(">IQ", self.recv(12))
            assert got == handle
            return error
        assert self.structured and magic == nbd.NBD_STRUCTURED_REPLY_MAGIC
        flags, rtype, got, length = struct.unpack(">HHQI", self.recv(16))
        payload = self.recv(length)
        assert got == handle and flags & nbd.NBD_REPLY_FLAG_DONE
        if rtype == nbd.NBD_REPLY_TYPE_NONE:
            return 0
        assert rtype == nbd.NBD_REPLY_TYPE_ERROR
        error, msglen = struct.unpack_from(">IH", payload)
        assert len(payload) == 6 + msglen and msglen > 0
        return error


def info_data(name: bytes, requests=()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta_data(name: bytes, queries) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


@pytest.fixture
def client(server):
    clients = []

    def connect(greet=True):
        c = Client(server.address)
        clients.append(c)
        return c.greet() if greet else c

    yield connect
    for c in clients:
        c.close()


def healthy(server, want) -> None:
    """A fresh client negotiates and reads correct bytes: the server still serves."""
    c = Client(server.address).greet()
    try:
        c.go()
        error, data = c.read(CLUSTER - 100, 300)
        assert error == 0
        assert_same_bytes(data, want[CLUSTER - 100:CLUSTER + 200], "read after abuse")
    finally:
        c.close()


# -- handshake ------------------------------------------------------------------------------

def test_unknown_client_flags_close_the_connection(client):
    c = client(greet=False).greet(client_flags=1 << 5)
    assert c.closed()


def test_list_and_unknown_options(client):
    c = client()
    (server_rep, ack) = c.option(nbd.NBD_OPT_LIST)
    assert server_rep[0] == nbd.NBD_REP_SERVER and ack[0] == nbd.NBD_REP_ACK
    (namelen,) = struct.unpack_from(">I", server_rep[1])
    assert namelen == 0                      # the default export, ""
    assert c.option(nbd.NBD_OPT_LIST, b"x")[-1][0] == nbd.NBD_REP_ERR_INVALID
    for opt in (nbd.NBD_OPT_PEEK_EXPORT, nbd.NBD_OPT_STARTTLS, nbd.NBD_OPT_EXTENDED_HEADERS,
                99, 0xFFFFFFFF):
        ((rtype, message),) = c.option(opt, b"junk" * 3)
        assert rtype == nbd.NBD_REP_ERR_UNSUP and message
    # Still negotiating: the next option works.
    assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK


def test_info_reports_size_flags_and_block_sizes(client, want):
    c = client()
    replies = c.option(nbd.NBD_OPT_INFO, info_data(b"", [nbd.NBD_INFO_BLOCK_SIZE,
                                                           nbd.NBD_INFO_NAME, 1234]))
    assert replies[-1][0] == nbd.NBD_REP_ACK
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for t, p in replies[:-1]}
    assert all(t == nbd.NBD_REP_INFO for t, _ in replies[:-1])
    size, tflags = struct.unpack(">QH", infos[nbd.NBD_INFO_EXPORT])
    assert size == len(want)
    assert tflags & nbd.NBD_FLAG_HAS_FLAGS and tflags & nbd.NBD_FLAG_READ_ONLY
    assert tflags & nbd.NBD_FLAG_CAN_MULTI_CONN
    assert not tflags & (nbd.NBD_FLAG_SEND_TRIM | nbd.NBD_FLAG_SEND_WRITE_ZEROES
                         | nbd.NBD_FLAG_SEND_DF)          # DF only with structured replies
    assert struct.unpack(">III", infos[nbd.NBD_INFO_BLOCK_SIZE]) == (1, CLUSTER, MAX_REQUEST)
    assert infos[nbd.NBD_INFO_NAME] == b""
    # INFO leaves the client negotiating; malformed and unknown names are errors.
    assert c.option(nbd.NBD_OPT_INFO, info_data(b"nope"))[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
    assert c.option(nbd.NBD_OPT_GO, info_data(b"nope"))[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
    bad = struct.pack(">I", 100) + b"ab" + struct.pack(">H", 0)
    assert c.option(nbd.NBD_OPT_INFO, bad)[-1][0] == nbd.NBD_REP_ERR_INVALID
    assert c.option(nbd.NBD_OPT_INFO, info_data(b"", [3])[:-1])[-1][0] == \
        nbd.NBD_REP_ERR_INVALID
    assert c.option(nbd.NBD_OPT_INFO, b"\0\0")[-1][0] == nbd.NBD_REP_ERR_INVALID
    replies = c.go(structured=True, meta=False)
    tflags = struct.unpack(">QH", replies[0][1][2:])[1]
    assert tflags & nbd.NBD_FLAG_SEND_DF


def test_meta_contexts(client):
    c = client()
    query = meta_data(b"", [b"base:allocation"])
    # Before structured replies: proto.md lets a server refuse LIST (MAY), and asks it to
    # refuse SET (SHOULD); qemu-nbd answers LIST, and so does qcowfast (it refused both).
    replies = c.option(nbd.NBD_OPT_LIST_META_CONTEXT, query)
    assert replies == [(nbd.NBD_REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
                       (nbd.NBD_REP_ACK, b"")]
    assert c.option(nbd.NBD_OPT_SET_META_CONTEXT, query)[-1][0] == nbd.NBD_REP_ERR_INVALID
    assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
    # A second request is refused as qemu-nbd refuses it; structured replies stay on.
    assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ERR_INVALID
    for queries in ([], [b"base:"], [b"base:allocation", b"qemu:dirty-bitmap:x"]):
        replies = c.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", queries))
        assert [t for t, _ in replies] == [nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]
        assert replies[0][1][4:] == b"base:allocation"
    replies = c.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", [b"x-other:thing"]))
    assert [t for t, _ in replies] == [nbd.NBD_REP_ACK]
    replies = c.option(nbd.NBD_OPT_SET_META_CONTEXT,
                       meta_data(b"", [b"qemu:dirty-bitmap:x", b"base:allocation"]))
    assert [t for t, _ in replies] == [nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]
    assert replies[0][1][4:] == b"base:allocation"
    assert struct.unpack_from(">I", replies[0][1])[0] != 0
    assert c.option(nbd.NBD_OPT_SET_META_CONTEXT,
                    meta_data(b"", [b"nocolon"]))[-1][0] == nbd.NBD_REP_ERR_INVALID
    assert c.option(nbd.NBD_OPT_SET_META_CONTEXT,
                    meta_data(b"", [b"base:x"] * 40))[-1][0] == nbd.NBD_REP_ERR_TOO_BIG
    assert c.option(nbd.NBD_OPT_SET_META_CONTEXT,
                    meta_data(b"other", [b"base:allocation"]))[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
    truncated = meta_data(b"", [b"base:allocation"])[:-3]
    assert c.option(nbd.NBD_OPT_SET_META_CONTEXT, truncated)[-1][0] == nbd.NBD_REP_ERR_INVALID
    # The failed SETs cleared the selection: block status is refused after GO.
    c.option(nbd.NBD_OPT_GO, info_data(b""))
    c.structured = True
    c.request(nbd.NBD_CMD_BLOCK_STATUS, 5, 0, 4096)
    assert c.error_of(5) == nbd.NBD_EINVAL


def test_bad_option_magic_closes(client):
    c = client()
    c.send_option(nbd.NBD_OPT_LIST, magic=0x1122334455667788)
    assert c.closed()


def test_oversized_option_closes(client):
    c = client()
    c.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.NBD_OPT_GO, 1 << 30))
    assert c.closed()


def test_option_flood_is_capped(client, server, want):
    c = client()
    for _ in range(LIMITS.max_options + 10):
        try:
            c.send_option(77)
        except (BrokenPipeError, ConnectionResetError):
            break
    replies = 0
    try:
        while True:
            _, rtype, _ = c.option_reply()
            assert rtype == nbd.NBD_REP_ERR_UNSUP
            replies += 1
    except (EOFError, ConnectionResetError):
        pass
    assert replies == LIMITS.max_options
    healthy(server, want)


def test_abort_acks_then_closes(client):
    c = client()
    ((rtype, _),) = c.option(nbd.NBD_OPT_ABORT)
    assert rtype == nbd.NBD_REP_ACK
    assert c.closed()


def test_export_name_enters_transmission_with_simple_replies(client, want):
    c = client()
    c.send_option(nbd.NBD_OPT_EXPORT_NAME, b"")
    size, tflags = struct.unpack(">QH", c.recv(10))   # NO_ZEROES negotiated: no padding
    assert size == len(want) and tflags & nbd.NBD_FLAG_READ_ONLY
    c.structured = False
    error, data = c.read(100, 70000)
    assert error == 0
    assert_same_bytes(data, want[100:70100], "simple reply read")
    c.request(nbd.NBD_CMD_DISC)
    assert c.closed()


def test_export_name_padding_and_unknown_name(client, server):
    c = Client(server.address).greet(client_flags=nbd.NBD_FLAG_C_FIXED_NEWSTYLE)
    try:
        c.send_option(nbd.NBD_OPT_EXPORT_NAME, b"")
        assert c.recv(10 + 124)[10:] == bytes(124)       # no NO_ZEROES: 124 zero bytes
    finally:
        c.close()
    c = client()
    c.send_option(nbd.NBD_OPT_EXPORT_NAME, b"missing")
    assert c.closed()


def test_handshake_timeout(client, server, want):
    c = client(greet=False)
    assert c.recv(18)[:8] == b"NBDMAGIC"
    t0 = time.monotonic()
    assert c.closed(timeout=5)
    assert time.monotonic() - t0 < 4
    healthy(server, want)


# -- transmission ---------------------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_refused_and_invalid_requests_keep_the_connection(client, want, structured):
    c = client()
    c.go(structured=structured, meta=structured)
    checks = [
        # (command, flags, offset, length, payload, expected error)
        (nbd.NBD_CMD_WRITE, 0, 0, 4096, b"w" * 4096, nbd.NBD_EPERM),
        (nbd.NBD_CMD_WRITE, nbd.NBD_CMD_FLAG_FUA, 0, 0, b"", nbd.NBD_EPERM),
        (nbd.NBD_CMD_TRIM, 0, 0, 65536, b"", nbd.NBD_EPERM),
        (nbd.NBD_CMD_WRITE_ZEROES, 0, 0, 65536, b"", nbd.NBD_EPERM),
        (nbd.NBD_CMD_CACHE, 0, 0, 65536, b"", 0),                 # a hint: no effect
        (nbd.NBD_CMD_CACHE, nbd.NBD_CMD_FLAG_FUA, 0, 65536, b"", 0),
        (nbd.NBD_CMD_CACHE, nbd.NBD_CMD_FLAG_NO_HOLE, 0, 512, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_CACHE, 0, SIZE - 10, 11, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_CACHE, 0, 0, MAX_REQUEST + 1, b"", nbd.NBD_EINVAL),
        (42, 0, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_RESIZE, 0, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_FLUSH, 0, 0, 0, b"", 0),
        (nbd.NBD_CMD_FLUSH, nbd.NBD_CMD_FLAG_FUA, 0, 0, b"", 0),
        (nbd.NBD_CMD_FLUSH, nbd.NBD_CMD_FLAG_REQ_ONE, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_FLUSH, 1 << 15, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_READ, 0, SIZE - 10, 11, b"", nbd.NBD_EINVAL),         # past the end
        (nbd.NBD_CMD_READ, 0, SIZE + 4096, 1, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_READ, 0, (1 << 64) - 1, 2, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_READ, 0, 0, MAX_REQUEST + 1, b"", nbd.NBD_EINVAL),    # over the cap
        (nbd.NBD_CMD_READ, nbd.NBD_CMD_FLAG_NO_HOLE, 0, 512, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_READ, nbd.NBD_CMD_FLAG_FUA, SIZE, 1, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_BLOCK_STATUS, 0, SIZE, 1, b"", nbd.NBD_EINVAL),
        (nbd.NBD_CMD_BLOCK_STATUS, 0, 0, 0, b"", nbd.NBD_EINVAL),
    ]
    if not structured:
        checks.append((nbd.NBD_CMD_BLOCK_STATUS, 0, 0, 4096, b"", nbd.NBD_EINVAL))
        checks.append((nbd.NBD_CMD_READ, nbd.NBD_CMD_FLAG_DF, 0, 512, b"", nbd.NBD_EINVAL))
    for handle, (cmd, flags, offset, length, payload, error) in enumerate(checks, 100):
        c.request(cmd, handle, offset, length, flags, payload)
        assert c.error_of(handle, read=cmd == nbd.NBD_CMD_READ) == error, (cmd, offset, length)
        # The next request on the same connection still works.
        err, data = c.read(CLUSTER * 3 + 5, 1000, handle=handle + 1000)
        assert err == 0
        assert_same_bytes(data, want[CLUSTER * 3 + 5:CLUSTER * 3 + 1005], f"after {cmd}")
    c.request(nbd.NBD_CMD_DISC)
    assert c.closed()


class QemuNbd:
    """qemu-nbd -r -t serving an image on a Unix socket (the reference server); stop() ends it."""

    def __init__(self, path, sock, *options: str):
        self.sock = sock
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", *options, "-k",
                                      str(sock), str(path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-nbd did not start")
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def reference(proto_image, tmp_path_factory):
    """The address of qemu-nbd -r -e 0 serving the module's image (-e 0: CAN_MULTI_CONN, as
    qcowfast serve advertises it)."""
    ref = QemuNbd(proto_image, tmp_path_factory.mktemp("ref") / "qemu-nbd.sock", "-e", "0")
    try:
        yield str(ref.sock)
    finally:
        ref.stop()


# Zero-length requests whose answers qemu-nbd -r sets (command, offset, structured only).
_ZERO_LENGTH = [(nbd.NBD_CMD_READ, 0, False), (nbd.NBD_CMD_READ, CLUSTER + 5, False),
                (nbd.NBD_CMD_READ, SIZE, False), (nbd.NBD_CMD_READ, SIZE + 1, False),
                (nbd.NBD_CMD_FLUSH, 0, False), (nbd.NBD_CMD_CACHE, 0, False),
                (nbd.NBD_CMD_CACHE, SIZE, False), (nbd.NBD_CMD_BLOCK_STATUS, 0, True),
                (nbd.NBD_CMD_BLOCK_STATUS, SIZE, True)]


def _zero_length_errors(address, structured) -> list:
    c = Client(address).greet()
    try:
        c.go(structured=structured, meta=structured)
        errors = []
        for handle, (cmd, offset, needs_structured) in enumerate(_ZERO_LENGTH, 40):
            if needs_structured and not structured:
                continue
            c.request(cmd, handle, offset, 0)
            errors.append((cmd, offset, c.error_of(handle, read=cmd == nbd.NBD_CMD_READ)))
        return errors
    finally:
        c.close()


def _pipelined_reads(c, reads: dict, structured: bool, want: bytes, what: str) -> None:
    """Send READs {handle: (offset, length)} in one go and check every reply (any order):
    success, the guest bytes, and a bare reply (structured: NONE chunk) for length 0."""
    c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ,
                                        h, off, n) for h, (off, n) in reads.items()))
    for _ in range(len(reads)):
        if structured:
            flags, rtype, handle, payload = c.chunk()
            off, n = reads.pop(handle)
            assert flags & nbd.NBD_REPLY_FLAG_DONE
            if n == 0:
                assert (rtype, payload) == (nbd.NBD_REPLY_TYPE_NONE, b"")
                continue
            assert rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA
            assert struct.unpack_from(">Q", payload)[0] == off
            data = payload[8:]
        else:
            error, handle, _ = c.simple_reply()
            assert error == 0
            off, n = reads.pop(handle)
            data = c.recv(n)
        assert_same_bytes(data, want[off:off + n], what, off)
    assert not reads


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_zero_length_requests_answer_as_qemu_nbd(reference, server, want, structured):
    """Zero-length reads (alone, and pipelined between reads they continue, so one batch
    holds them) and caches get a bare success reply, block status EINVAL, as from qemu-nbd -r;
    write-type commands EPERM as at any length. The connection serves on."""
    expected = _zero_length_errors(reference, structured)
    assert _zero_length_errors(server.address, structured) == expected
    c = Client(server.address).greet()
    try:
        c.go(structured=structured, meta=structured)
        for cmd in (nbd.NBD_CMD_TRIM, nbd.NBD_CMD_WRITE_ZEROES):
            c.request(cmd, 60, 0, 0)
            assert c.error_of(60) == nbd.NBD_EPERM
        reads = {1: (0, 4096), 2: (4096, 0), 3: (4096, 4096), 4: (8192, 0), 5: (SIZE, 0),
                 6: (8192, 100)}
        _pipelined_reads(c, reads, structured, want, "read pipelined with empty reads")
        error, data = c.read(CLUSTER - 7, 77)
        assert error == 0 and data == want[CLUSTER - 7:CLUSTER + 70]
    finally:
        c.close()


# Every option code 0..12 and two unknown ones, each sent with no data, with junk, and with
# its own well-formed data where it takes some.
_OPTIONS = [*range(13), 99, 1 << 31]
_OPTION_DATA = {nbd.NBD_OPT_INFO: info_data(b"", [nbd.NBD_INFO_BLOCK_SIZE]),
                nbd.NBD_OPT_GO: info_data(b"", [nbd.NBD_INFO_BLOCK_SIZE]),
                nbd.NBD_OPT_LIST_META_CONTEXT: meta_data(b"", [b"base:allocation"]),
                nbd.NBD_OPT_SET_META_CONTEXT: meta_data(b"", [b"base:allocation"])}


def _option_reply(c, opt, data) -> tuple:
    """The replies to one option in a form two servers share: the INFO replies as sorted
    (information type[, transmission flags]) (their order is free), the others in order
    (META_CONTEXT as (type, name): SET's ids are the server's to choose), then "ended" or
    whether the connection still negotiates (NBD_OPT_LIST answered)."""
    c.send_option(opt, data)
    replies, infos = [], []
    while True:
        _, rtype, payload = c.option_reply()
        if rtype == nbd.NBD_REP_INFO:
            kind = struct.unpack_from(">H", payload)[0]
            infos.append((kind, struct.unpack_from(">H", payload, 10)[0])
                         if kind == nbd.NBD_INFO_EXPORT else (kind,))
            continue
        replies.append((rtype, payload[4:]) if rtype == nbd.NBD_REP_META_CONTEXT else rtype)
        if rtype == nbd.NBD_REP_ACK or rtype & (1 << 31):
            break
    if opt == nbd.NBD_OPT_ABORT or (opt == nbd.NBD_OPT_GO and rtype == nbd.NBD_REP_ACK):
        return sorted(infos), replies, "ended"
    alive = [t for t, _ in c.option(nbd.NBD_OPT_LIST)] == [nbd.NBD_REP_SERVER, nbd.NBD_REP_ACK]
    return sorted(infos), replies, alive


def _option_replies(address, structured: bool) -> dict:
    """{(option, data kind): _option_reply(...)} for every option of _OPTIONS, each on a fresh
    connection (structured replies negotiated first, or not)."""
    got = {}
    for opt in _OPTIONS:
        if opt == nbd.NBD_OPT_EXPORT_NAME:
            continue                              # no option reply: tested on its own
        kinds = {"none": b"", "junk": b"junk" * 3}
        if opt in _OPTION_DATA:
            kinds["own"] = _OPTION_DATA[opt]
        for kind, data in kinds.items():
            c = Client(address).greet()
            try:
                if structured:
                    assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
                got[opt, kind] = _option_reply(c, opt, data)
            finally:
                c.close()
    return got


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_option_replies_match_qemu_nbd(reference, server, structured):
    """Every option, with and without data, before and after structured replies, answered
    as qemu-nbd -r answers it: the same replies, transmission flags (qemu-nbd -r's FLUSH, FUA
    and CACHE) and connection state; LIST_META_CONTEXT is answered before structured replies.
    One deliberate difference: STARTTLS is ERR_UNSUP, as proto.md's NOTLS mode asks of a server
    that does not support the option at all (qemu-nbd, which has TLS, answers ERR_POLICY, or
    ERR_INVALID to one with data)."""
    expected = _option_replies(reference, structured)
    got = _option_replies(server.address, structured)
    for kind in ("none", "junk"):
        key = (nbd.NBD_OPT_STARTTLS, kind)
        assert expected.pop(key)[1] == [nbd.NBD_REP_ERR_POLICY if kind == "none"
                                        else nbd.NBD_REP_ERR_INVALID]
        assert got.pop(key) == ([], [nbd.NBD_REP_ERR_UNSUP], True)
    assert got == expected


# Command flags, alone: each defined one and two undefined ones.
_FLAGS = [0, nbd.NBD_CMD_FLAG_FUA, nbd.NBD_CMD_FLAG_NO_HOLE, nbd.NBD_CMD_FLAG_DF,
          nbd.NBD_CMD_FLAG_REQ_ONE, nbd.NBD_CMD_FLAG_FAST_ZERO, 1 << 5, 1 << 15]


def _command_errors(address, structured: bool) -> dict:
    """{(command, flags): error} for READ, FLUSH, CACHE, BLOCK_STATUS and an unknown command
    with each of _FLAGS, on one connection (structured with base:allocation, or simple)."""
    c = Client(address).greet()
    try:
        c.go(structured=structured, meta=structured)
        got = {}
        for cmd in (nbd.NBD_CMD_READ, nbd.NBD_CMD_FLUSH, nbd.NBD_CMD_CACHE,
                    nbd.NBD_CMD_BLOCK_STATUS, 42):
            length = 0 if cmd in (nbd.NBD_CMD_FLUSH, 42) else 4096
            for flags in _FLAGS:
                if cmd == nbd.NBD_CMD_READ:
                    got[cmd, flags] = c.read(CLUSTER, length, flags=flags)[0]
                elif cmd == nbd.NBD_CMD_BLOCK_STATUS and structured:
                    c.request(cmd, 9, CLUSTER, length, flags)
                    cflags, rtype, handle, payload = c.chunk()
                    assert handle == 9 and cflags & nbd.NBD_REPLY_FLAG_DONE
                    got[cmd, flags] = (struct.unpack_from(">I", payload)[0]
                                       if rtype == nbd.NBD_REPLY_TYPE_ERROR else rtype)
                else:
                    c.request(cmd, 9, CLUSTER, length, flags)
                    got[cmd, flags] = c.error_of(9)
        return got
    finally:
        c.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_command_flags_answer_as_qemu_nbd(reference, server, structured):
    """Each command flag on the commands a read-only export serves gets qemu-nbd -r's answer:
    FUA is accepted on every one (proto.md: a server advertising NBD_FLAG_SEND_FUA MUST accept
    it on all commands; it was EINVAL on READ and BLOCK_STATUS), flags that do not belong to
    FLUSH or CACHE are EINVAL (they were ignored), CACHE succeeds (it was EPERM)."""
    assert _command_errors(server.address, structured) == _command_errors(reference,
                                                                          structured)


def test_write_over_the_cap_is_refused_and_closes(client, server, want):
    c = client()
    c.go()
    c.request(nbd.NBD_CMD_WRITE, 9, 0, MAX_REQUEST + 1)     # payload never sent
    assert c.error_of(9) == nbd.NBD_EPERM
    assert c.closed()
    healthy(server, want)


def test_bad_request_magic_closes(client, server, want):
    c = client()
    c.go()
    c.sock.sendall(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512))
    assert c.closed()
    healthy(server, want)


def test_structured_reads_and_df(client, want):
    c = client()
    c.go()
    for offset, length in ((0, 4096), (CLUSTER - 1, 3), (500_000, 700_000), (SIZE - 1, 1),
                           (0, MAX_REQUEST)):
        for flags in (0, nbd.NBD_CMD_FLAG_DF):
            error, data = c.read(offset, length, flags=flags)
            assert error == 0
            assert_same_bytes(data, want[offset:offset + length], "structured read", offset)
    # DF: exactly one content chunk.
    c.request(nbd.NBD_CMD_READ, 3, 0, 8192, nbd.NBD_CMD_FLAG_DF)
    flags, rtype, handle, payload = c.chunk()
    assert (flags, rtype, handle, len(payload)) == (1, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 3, 8200)
    error, data = c.read(SIZE - 10, 20)
    assert error == nbd.NBD_EINVAL


def _block_status(c, offset, length, flags=0, handle=11):
    c.request(nbd.NBD_CMD_BLOCK_STATUS, handle, offset, length, flags)
    cflags, rtype, got, payload = c.chunk()
    assert got == handle and cflags & nbd.NBD_REPLY_FLAG_DONE
    assert rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS, payload
    assert (len(payload) - 4) % 8 == 0 and len(payload) > 4
    vals = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
    return struct.unpack_from(">I", payload)[0], list(zip(vals[::2], vals[1::2]))


def test_block_status_matches_the_bytes(client, want):
    c = client()
    c.go()
    context, extents = _block_status(c, 0, SIZE)
    assert context == c.context_id
    assert sum(n for n, _ in extents) == SIZE
    holes = [(pos, n) for pos, (n, f) in zip(_starts(extents), extents) if f]
    assert holes == [(512 * 1024, 1024 * 1024)]                     # qemu-io wrote around it
    assert all(f in (0, nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO) for _, f in extents)
    for pos, n in holes:
        assert want[pos:pos + n].count(0) == n
    # A query inside the hole, REQ_ONE, and one crossing into data.
    assert _block_status(c, 600_000, 10)[1] == [(10, 3)]
    _, ext = _block_status(c, 0, SIZE, nbd.NBD_CMD_FLAG_REQ_ONE)
    assert ext == [(512 * 1024, 0)]
    _, ext = _block_status(c, 100, 1000, nbd.NBD_CMD_FLAG_REQ_ONE)
    assert ext == [(1000, 0)]
    _, ext = _block_status(c, 1536 * 1024 - 10, 20)
    assert ext == [(10, 3), (10, 0)]
    c.request(nbd.NBD_CMD_BLOCK_STATUS, 12, 0, 4096, nbd.NBD_CMD_FLAG_DF)
    assert c.error_of(12) == nbd.NBD_EINVAL


def _starts(extents):
    pos = 0
    for n, _ in extents:
        yield pos
        pos += n


def test_pipelined_requests_all_answered(client, want):
    c = client()
    c.go()
    requests = {h: ((h * 37_001) % (SIZE - 70_000), 1 + (h * 7919) % 65536) for h in range(200)}
    c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ,
                                        h, off, n) for h, (off, n) in requests.items()))
    seen = set()
    while len(seen) < len(requests):
        flags, rtype, handle, payload = c.chunk()
        assert rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA and flags & nbd.NBD_REPLY_FLAG_DONE
        off, n = requests[handle]
        assert struct.unpack_from(">Q", payload)[0] == off and len(payload) == 8 + n
        assert payload[8:] == want[off:off + n]
        seen.add(handle)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_contiguous_pipelined_reads(client, want, structured):
    # Sequential reads queued together are filled in batches: each still gets its own reply.
    c = client()
    c.go(structured=structured, meta=False)
    requests, pos = {}, 1000
    for h in range(60):
        n = [1, 4096, 65536, 70_000, 0, 300_000][h % 6]
        if pos + n > SIZE:
            break
        requests[h] = (pos, n)
        pos += n
    c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ,
                                        h, off, n) for h, (off, n) in requests.items()))
    seen = set()
    while len(seen) < len(requests):
        if structured:
            flags, rtype, handle, payload = c.chunk()
            off, n = requests[handle]
            if n == 0:
                assert rtype == nbd.NBD_REPLY_TYPE_NONE and payload == b""
            else:
                assert rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA
                assert struct.unpack_from(">Q", payload)[0] == off
                assert_same_bytes(payload[8:], want[off:off + n], "batched read", off)
        else:
            error, handle, _ = c.simple_reply()
            off, n = requests[handle]
            assert error == 0
            assert_same_bytes(c.recv(n), want[off:off + n], "batched read", off)
        assert handle not in seen
        seen.add(handle)


def test_half_open_request_times_out(client, server, want):
    c = client()
    c.go()
    c.sock.sendall(struct.pack(">IHH", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ))
    healthy(server, want)                     # others are served meanwhile
    t0 = time.monotonic()
    assert c.closed(timeout=5)
    assert time.monotonic() - t0 < 4
    # A write whose payload stops half way ends the same way.
    c = client()
    c.go(structured=False, meta=False)
    c.request(nbd.NBD_CMD_WRITE, 1, 0, 8192, payload=b"x" * 100)
    assert c.closed(timeout=5)


def test_garbage_closes_and_server_survives(client, server, want):
    for blob in (b"\xff" * 64, b"IHAVEOPT" * 10, bytes(100)):
        c = client(greet=False)
        c.recv(18)
        c.sock.sendall(blob)
        assert c.closed()
    healthy(server, want)


def test_corrupt_cluster_is_an_eio_reply(proto_image, tmp_path, want):
    import shutil

    import qcowfast
    bad = tmp_path / "bad.qcow2"
    shutil.copyfile(proto_image, bad)
    with qcowfast.open(bad) as img:
        ext = next(e for e in img.extents() if e.kind == qcowfast.ExtentKind.COMPRESSED
                   and e.guest_offset >= CLUSTER)
    with open(bad, "r+b") as f:                   # garble the cluster's deflate stream
        f.seek(ext.host_offset)
        f.write(b"\xff" * 64)
    proc = subprocess.run(["qemu-img", "convert", "-O", "raw", str(bad), str(tmp_path / "o")],
                          capture_output=True, timeout=60)
    assert proc.returncode != 0                  # qemu-img agrees the cluster is broken
    srv = NBDServer(bad, socket=tmp_path / "s.sock", persistent=True, limits=LIMITS)
    with srv:
        for structured in (True, False):
            c = Client(srv.address).greet()
            c.go(structured=structured, meta=False)
            error, _ = c.read(ext.guest_offset, 4096)
            assert error == nbd.NBD_EIO
            error, data = c.read(0, 1000)            # the connection still serves
            assert error == 0 and data == want[:1000]
            c.close()


def test_stop_ends_a_client_that_takes_no_replies(proto_image, tmp_path):
    srv = NBDServer(proto_image, socket=tmp_path / "s.sock", persistent=True,
                    limits=nbd.Limits(max_request=MAX_REQUEST, io_timeout=60))
    srv.start()
    try:
        c = Client(srv.address).greet()
        c.go()
        c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0,
                                            nbd.NBD_CMD_READ, h, 0, MAX_REQUEST)
                                for h in range(40)))        # 40 MiB of replies, never read
        time.sleep(0.5)
    finally:
        t0 = time.monotonic()
        srv.stop(timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert srv._image is None                 # no worker left behind: the image was closed
    assert c.closed(timeout=10)
    c.close()


# -- fuzz -----------------------------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)


def _option_frame():
    known = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 2**31])
    data = st.one_of(
        st.binary(max_size=40),
        st.builds(info_data, st.sampled_from([b"", b"x"]),
                  st.lists(st.integers(0, 5), max_size=4)),
        st.builds(meta_data, st.sampled_from([b"", b"x"]),
                  st.lists(st.sampled_from([b"base:", b"base:allocation", b"q", b"x-a:b"]),
                           max_size=4)))
    return st.builds(lambda magic, opt, d, lie: struct.pack(
        ">QII", magic, opt, len(d) if not lie else lie) + d,
        st.sampled_from([nbd.IHAVEOPT, nbd.IHAVEOPT, nbd.IHAVEOPT, 0]),
        st.one_of(known, _u32), data, st.sampled_from([0, 0, 0, 1, 3, 100]))


def _request_frame():
    def build(cmd, flags, handle, offset, length, payload):
        body = struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length)
        return body + (payload[:length] if cmd == nbd.NBD_CMD_WRITE else b"")
    offsets = st.one_of(st.integers(0, SIZE + 10), st.sampled_from([SIZE, 2**63, 2**64 - 1]))
    lengths = st.one_of(st.integers(0, 70_000),
                        st.sampled_from([MAX_REQUEST, MAX_REQUEST + 1, 2**32 - 1]))
    return st.builds(build, st.integers(0, 12), st.sampled_from([0, 1, 2, 4, 8, 0xFFFF]),
                     st.integers(0, 2**64 - 1), offsets, lengths, st.binary(max_size=600))


_session = st.tuples(
    st.sampled_from([0, 1, 3, 2, 1 << 7]),                               # client flags
    st.lists(_option_frame(), max_size=5),
    st.sampled_from([b"", struct.pack(">QII", nbd.IHAVEOPT, nbd.NBD_OPT_GO, 8) + info_data(b""),
                     struct.pack(">QII", nbd.IHAVEOPT, nbd.NBD_OPT_EXPORT_NAME, 0)]),
    st.lists(st.one_of(_request_frame(), st.binary(min_size=1, max_size=40)), max_size=6),
)


@settings(max_examples=60, deadline=4000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(session=_session)
def test_fuzz_handshake_and_requests(server, want, session):
    flags, options, enter, requests = session
    c = Client(server.address, timeout=5)
    try:
        c.recv(18)
        blob = struct.pack(">I", flags) + b"".join(options) + enter + b"".join(requests)
        sender = threading.Thread(target=_send_quietly, args=(c.sock, blob), daemon=True)
        sender.start()
        sender.join(5)
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # The server answers what it can and closes once the client stops: never hangs.
        assert c.closed(timeout=5)
    finally:
        c.close()
    assert server.errors == []
    healthy(server, want)


def _send_quietly(sock, blob):
    try:
        sock.sendall(blob)
    except OSError:
        pass


# -- reads sent from the image file (sendfile), zeros and inflated clusters mixed ---------------

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """A plain image, an overlay on a shorter compressed backing file, and an overlay on a
    shorter raw file (its size not a multiple of 512): DATA runs, zero clusters, holes,
    compressed clusters and the zeros past a short backing file, all within 3 MiB."""
    import random
    d = tmp_path_factory.mktemp("chains")
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, 3 * MIB)
    qemu_io(plain, "write -P 0x11 0 100k", "write -P 0x22 300k 700k", "write -z 1088k 128k",
            "write -P 0x44 2000k 64k", "write -P 0x55 3008k 64k")
    src = d / "bsrc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 2 * MIB)
    qemu_io(src, "write -P 0x66 0 1M", "write -P 0x77 1536k 256k")
    base = d / "base.qcow2"
    qemu_img("convert", "-q", "-c", "-O", "qcow2", src, base)
    overlay = d / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay, 3 * MIB,
             cwd=d)
    qemu_io(overlay, "write -P 0x88 192k 64k", "write -P 0x99 1000k 100k",
            "write -P 0xaa 2500k 64k", "write -z 1600k 64k")
    raw = d / "base.raw"
    raw.write_bytes(random.Random(13).randbytes(1536 * 1024 + 300))
    rawov = d / "rawov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", rawov, 3 * MIB, cwd=d)
    qemu_io(rawov, "write -P 0xbb 64k 64k", "write -P 0xcc 1500k 100k")
    return {"plain": plain, "overlay": overlay, "raw-backed": rawov}


# Edges of the runs above (writes, clusters, the end of each backing file) and of the image.
_EDGES = sorted({k * 1024 for k in (0, 64, 100, 128, 192, 256, 300, 1000, 1024, 1088, 1100,
                                    1216, 1500, 1536, 1600, 1664, 1792, 2000, 2048, 2064,
                                    2500, 2564, 3008, 3072)} | {1536 * 1024 + 300})


def _crossing_reads():
    reads = [(0, MAX_REQUEST), (3 * MIB - MAX_REQUEST, MAX_REQUEST)]
    for e in _EDGES:
        for before, after in ((1, 1), (1000, 3000), (70_000, 70_001), (300_000, 200_000)):
            a, b = max(0, e - before), min(3 * MIB, e + after)
            if a < b:
                reads.append((a, b - a))
    return reads


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("kind", ["plain", "overlay", "raw-backed"])
def test_file_backed_reads_match_qemu_img(chains, tmp_path, kind, structured):
    path = chains[kind]
    want = reference_raw(path)
    assert len(want) == 3 * MIB
    # Reads crossing every edge, pipelined, then a sequential copy in odd-sized requests
    # (queued together, so they are filled in batches that end mid-run).
    reads = _crossing_reads()
    pos, n = 0, 0
    while pos < len(want):
        size = min(len(want) - pos, (200_003, 65536, 1, 262_144, 4095)[n % 5])
        reads.append((pos, size))
        pos, n = pos + size, n + 1
    srv = NBDServer(path, socket=tmp_path / "s.sock", persistent=True, limits=LIMITS)
    with srv:
        c = Client(srv.address).greet()
        c.go(structured=structured, meta=False)
        for first in range(0, len(reads), 40):
            part = dict(enumerate(reads[first:first + 40], first))
            _pipelined_reads(c, part, structured, want, f"{kind} read")
        c.close()


@pytest.mark.parametrize("kind", ["plain", "overlay", "raw-backed"])
def test_read_plan_sends_data_from_the_image_files(chains, kind):
    """The plan covers the read in order; its file ranges hold the guest bytes (checked with
    pread against qemu-img), its zero runs are zeros, and data is sent from the files."""
    import numpy as np

    import qcowfast
    from qcowfast.serve import ImageExport
    want = reference_raw(chains[kind])
    with qcowfast.open(chains[kind]) as img:
        export = ImageExport(img)
        files = 0
        for offset, length in [(0, 3 * MIB), (1000, 2 * MIB + 5), (1536 * 1024 + 1, 600_000)]:
            out = np.full(length, 0xEE, np.uint8)
            plan = export.read_plan(offset, memoryview(out))
            assert plan[0][0] == offset and plan[-1][1] == offset + length
            for (a, b, fd, host), nxt in zip(plan, plan[1:] + [None]):
                assert a < b and (nxt is None or nxt[0] == b)
                if fd >= 0:
                    files += 1
                    got = os.pread(fd, b - a, host)
                elif fd == -1:
                    got = out[a - offset:b - offset].tobytes()
                else:
                    assert fd == -2
                    got = bytes(b - a)
                assert_same_bytes(got, want[a:b], f"{kind} plan run", a)
    assert files > 0


def test_data_past_the_end_of_the_file(chains, tmp_path):
    """A data cluster the file does not hold, whether the file was already short at open or
    was cut while served: an EIO reply, and the connection serves on. qemu-img reads such a
    cluster as zeros; the server never sends those zeros as data."""
    import shutil
    reference = reference_raw(chains["plain"])
    last = slice(3 * MIB - 65536, 3 * MIB)
    for when in ("before", "while"):
        path = tmp_path / f"cut-{when}.qcow2"
        shutil.copyfile(chains["plain"], path)
        cut = os.path.getsize(path) - 32 * 1024               # into the last data cluster
        if when == "before":
            os.truncate(path, cut)
            # The cluster lost its data: qemu-img reads the missing half as zeros.
            assert reference_raw(path)[last] != reference[last]
        srv = NBDServer(path, socket=tmp_path / f"{when}.sock", persistent=True,
                        limits=LIMITS)
        with srv:
            if when == "while":
                os.truncate(path, cut)
            for structured in (True, False):
                c = Client(srv.address).greet()
                c.go(structured=structured, meta=False)
                error, _ = c.read(last.start, 65536)
                assert error == nbd.NBD_EIO, (when, structured)
                error, data = c.read(300 * 1024, 700 * 1024)   # intact data still served
                assert error == 0
                assert_same_bytes(data, reference[300 * 1024:1000 * 1024], "after EIO", 300 * 1024)
                c.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_file_cut_while_served_fails_only_the_reads_it_cut(chains, tmp_path, structured):
    """Pipelined reads that continue each other (filled as one batch) across the point where
    the file was cut while served: those needing bytes past the new end get EIO, the others
    (before the cut, or zeros after it) their bytes, on the same connection."""
    import shutil
    want = reference_raw(chains["plain"])
    path = tmp_path / "cut.qcow2"
    shutil.copyfile(chains["plain"], path)
    (ext,) = [e for e in qemu_map(path) if e["start"] == 3008 * 1024 and e["data"]]
    assert ext["length"] == 64 * 1024
    with NBDServer(path, socket=tmp_path / "s.sock", persistent=True, limits=LIMITS) as srv:
        os.truncate(path, ext["offset"] + 16 * 1024)         # 16k of the 64k cluster stay
        c = Client(srv.address).greet()
        c.go(structured=structured, meta=False)
        g = 3008 * 1024
        reads = {1: (2000 * 1024 + 10, g - 2000 * 1024 - 10),   # data, zeros before it
                 2: (g, 16 * 1024),              # the part of the cluster the file still holds
                 3: (g + 16 * 1024, 1),          # the first byte it lost
                 4: (g + 16 * 1024 + 1, 1000),
                 5: (g + 17 * 1024, 0)}          # empty: needs no bytes
        got = {}
        for handle, (error, data) in c.pipelined_reads(reads).items():
            got[handle] = error
            if not error:
                off, n = reads[handle]
                assert_same_bytes(data, want[off:off + n], "read beside the cut", off)
        assert got == {1: 0, 2: 0, 3: nbd.NBD_EIO, 4: nbd.NBD_EIO, 5: 0}
        error, data = c.read(0, 100 * 1024)
        assert error == 0 and data == want[:100 * 1024]
        c.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_read_longer_than_a_batch_buffer(tmp_path, structured):
    """One read over the per-worker buffer (4 MiB): data, holes, a zero cluster and
    compressed clusters in one reply, as qemu-img reads them."""
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 12 * MIB)
    qemu_io(path, "write -P 0x31 0 3M", "write -P 0x32 5M 1M", "write -z 6M 64k",
            "write -c -P 0x33 7M 128k", "write -c -P 0x34 9M 64k", "write -P 0x35 11M 4k")
    want = reference_raw(path)
    length = 11 * MIB
    srv = NBDServer(path, socket=tmp_path / "s.sock", persistent=True)
    with srv:
        c = Client(srv.address).greet()
        c.go(structured=structured, meta=False)
        for offset in (100, MIB - 1):
            error, data = c.read(offset, length)
            assert error == 0
            assert_same_bytes(data, want[offset:offset + length], "long read", offset)
        c.close()


@pytest.mark.parametrize("kind", ["plain", "raw-backed"])
def test_file_backed_reads_over_tcp(chains, tmp_path, kind):
    """Over TCP too (headers corked with MSG_MORE ahead of sendfile), qemu-img and nbdcopy
    copy the export byte for byte."""
    want = reference_raw(chains[kind])
    with NBDServer(chains[kind], port=0, persistent=True) as srv:
        assert srv.uri.startswith("nbd://127.0.0.1:")
        out = tmp_path / "qemu.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri, out)
        assert_same_bytes(out.read_bytes(), want, f"qemu-img over TCP ({kind})")
        out = tmp_path / "nbdcopy.raw"
        subprocess.run(["nbdcopy", srv.uri, str(out)], check=True, timeout=60,
                       stdin=subprocess.DEVNULL)
        assert_same_bytes(out.read_bytes(), want, f"nbdcopy over TCP ({kind})")


def test_stop_ends_a_client_that_takes_no_sendfile_replies(chains, tmp_path):
    # As test_stop_ends_a_client_that_takes_no_replies, with replies sent from the file.
    srv = NBDServer(chains["plain"], socket=tmp_path / "s.sock", persistent=True,
                    limits=nbd.Limits(max_request=MAX_REQUEST, io_timeout=60))
    srv.start()
    try:
        c = Client(srv.address).greet()
        c.go()
        c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0,
                                            nbd.NBD_CMD_READ, h, 300 * 1024, 700 * 1024)
                                for h in range(60)))        # 41 MiB of replies, never read
        time.sleep(0.5)
    finally:
        t0 = time.monotonic()
        srv.stop(timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert srv._image is None                 # no worker left behind: the image was closed
    assert c.closed(timeout=10)
    c.close()


# -- how many of a connection's workers fill reads at once ---------------------------------------

class _CountingExport:
    """A 1 MiB all-data export (byte i is i % 251) whose reads wait for `gate`, take `pause`
    seconds and count how many run at once."""

    name, description, size, preferred_block_size = "", "", MIB, 4096

    def __init__(self, pause=0.0):
        self.gate = threading.Event()
        self.gate.set()
        self.pause = pause
        self.lock = threading.Lock()
        self.active = self.peak = 0

    def read_into(self, offset, out):
        import numpy as np
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            assert self.gate.wait(10)
            time.sleep(self.pause)
            np.frombuffer(out, np.uint8)[:] = np.arange(offset, offset + len(out)) % 251
        finally:
            with self.lock:
                self.active -= 1

    def allocation(self, offset, length, max_extents):
        return [(min(length, self.size - offset), 0)]


def _pattern(offset, length):
    return bytes((offset + i) % 251 for i in range(length))


@pytest.fixture
def pair_client():
    """connect(export, share): a Client negotiated with an nbd.Connection of 4 workers over a
    socket pair; the connection is ended when the test ends."""
    made = []

    def connect(export, share):
        a, b = socket.socketpair()
        conn = nbd.Connection(a, export, nbd.Limits(workers=4, io_timeout=10), share=share)
        thread = threading.Thread(target=conn.run, daemon=True)
        thread.start()
        c = Client.__new__(Client)
        c.sock = b
        b.settimeout(10)
        made.append((c, thread))
        c.greet().go()
        return c

    yield connect
    for c, thread in made:
        c.close()
        thread.join(10)
        assert not thread.is_alive()


def _reads(c, reads):
    """Pipeline `reads` ({handle: (offset, length)}); check every reply's bytes."""
    c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ,
                                        h, off, n) for h, (off, n) in reads.items()))
    reads = dict(reads)
    for _ in range(len(reads)):
        flags, rtype, handle, payload = c.chunk()
        off, n = reads.pop(handle)
        assert rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA and flags & nbd.NBD_REPLY_FLAG_DONE
        assert payload == struct.pack(">Q", off) + _pattern(off, n)


@pytest.mark.parametrize("cores", [1, 3])
def test_core_share_bounds_the_workers_filling_reads(pair_client, cores):
    export = _CountingExport(pause=0.05)
    c = pair_client(export, nbd.CoreShare(cores))
    _reads(c, {h: (h * 8192, 4096) for h in range(6)})     # apart: one batch each
    assert export.peak == 1 if cores == 1 else 2 <= export.peak <= 3


def _until(cond, what):
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_block_status_does_not_wait_for_busy_workers(pair_client):
    export = _CountingExport()
    c = pair_client(export, nbd.CoreShare(1))
    export.gate.clear()
    try:
        c.request(nbd.NBD_CMD_READ, 1, 0, 4096)
        _until(lambda: export.active == 1, "the first read starts")   # it holds the share
        c.request(nbd.NBD_CMD_READ, 2, 65536, 4096)      # waits for the share
        c.request(nbd.NBD_CMD_BLOCK_STATUS, 3, 0, MIB)
        flags, rtype, handle, payload = c.chunk()        # answered while both reads wait
        assert (handle, rtype) == (3, nbd.NBD_REPLY_TYPE_BLOCK_STATUS)
        assert payload == struct.pack(">III", c.context_id, MIB, 0)
        assert export.active == 1
    finally:
        export.gate.set()
    got = {}
    for _ in range(2):
        flags, rtype, handle, payload = c.chunk()
        got[handle] = payload
    assert got == {1: struct.pack(">Q", 0) + _pattern(0, 4096),
                   2: struct.pack(">Q", 65536) + _pattern(65536, 4096)}
    assert export.peak == 1


def test_core_share_divides_the_cores_among_busy_connections(pair_client):
    """Connections count in the share while they have requests in flight, no longer."""
    share = nbd.CoreShare(4)
    exports = [_CountingExport(), _CountingExport()]
    clients = [pair_client(e, share) for e in exports]
    assert share.workers() == 4                      # negotiated, nothing in flight
    for e in exports:
        e.gate.clear()
    try:
        clients[0].request(nbd.NBD_CMD_READ, 1, 0, 4096)
        _until(lambda: exports[0].active == 1, "the first read starts")
        assert share.workers() == 4                  # one busy connection gets every core
        clients[1].request(nbd.NBD_CMD_READ, 1, 4096, 4096)
        _until(lambda: share.workers() == 2, "two busy connections")
        exports[0].gate.set()
        assert clients[0].chunk()[2] == 1
        _until(lambda: share.workers() == 4, "the first connection is idle")
    finally:
        for e in exports:
            e.gate.set()
    assert clients[1].chunk()[2] == 1
    _until(lambda: share._active == 0, "both idle")
    _reads(clients[0], {h: (h * 70_000, 65536) for h in range(8)})   # and they still serve


# -- resources running out, and one bad cluster among good ones (red team of the server) ----


def _with_reserved_bit(src, dst, cluster: int) -> None:
    """Copy `src` to `dst` and set a reserved bit (bit 1) in the L2 entry of guest `cluster`
    (QCOW2 spec: bits 1-8 of a standard L2 entry are reserved; qcowfast refuses them)."""
    import shutil
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        header = f.read(48)
        l1_offset = struct.unpack_from(">Q", header, 40)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8 * cluster)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & 0x00FFFFFFFFFFFE00, "the cluster must hold data"
        f.seek(l2_offset + 8 * cluster)
        f.write(struct.pack(">Q", entry | 2))


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_bad_cluster_fails_only_its_own_pipelined_reads(tmp_path, structured):
    """64 pipelined 64 KiB reads (filled in batches) over an image whose cluster 49 has a
    reserved L2 bit: that read is EIO, the 63 others return their bytes (a batch failed all
    its 32 reads)."""
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", good, 4 * MIB)
    qemu_io(good, "write -P 0x6c 0 4M")
    want = reference_raw(good)
    bad = tmp_path / "bad.qcow2"
    _with_reserved_bit(good, bad, 49)
    with NBDServer(bad, socket=tmp_path / "s.sock", persistent=True, limits=LIMITS) as srv:
        c = Client(srv.address).greet()
        c.go(structured=structured, meta=False)
        replies = c.pipelined_reads({i: (i * CLUSTER, CLUSTER) for i in range(64)})
        errors = {h: error for h, (error, _) in replies.items() if error}
        for handle, (error, data) in replies.items():
            if not error:
                assert_same_bytes(data, want[handle * CLUSTER:(handle + 1) * CLUSTER],
                                  "pipelined read", handle * CLUSTER)
        assert errors == {49: nbd.NBD_EIO}
        c.close()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_no_memory_for_a_read_buffer_is_an_enomem_reply(tmp_path, monkeypatch, structured):
    """A read whose buffer cannot be mapped (mmap's ENOMEM, for reads over the 4 MiB batch
    buffer) gets NBD_ENOMEM; the connection and its other reads go on (it was dropped,
    failing every read in flight)."""
    import errno
    import mmap as real_mmap

    class NoMemory:
        @staticmethod
        def mmap(*args, **kw):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 8 * MIB)
    qemu_io(path, "write -P 0x41 0 3M", "write -c -P 0x42 5M 128k")
    want = reference_raw(path)
    limits = nbd.Limits(max_request=8 * MIB, workers=2)
    with NBDServer(path, socket=tmp_path / "s.sock", persistent=True, limits=limits) as srv:
        c = Client(srv.address).greet()
        c.go(structured=structured, meta=False)
        monkeypatch.setattr(nbd, "mmap", NoMemory)
        error, _ = c.read(0, 6 * MIB)
        assert error == nbd.NBD_ENOMEM
        error, data = c.read(MIB, MIB)              # fits the batch buffer: served
        assert error == 0 and data == want[MIB:2 * MIB]
        monkeypatch.setattr(nbd, "mmap", real_mmap)
        error, data = c.read(0, 6 * MIB)
        assert error == 0
        assert_same_bytes(data, want[:6 * MIB], "read after the memory came back")
        c.close()


def test_no_memory_while_filling_a_read_is_an_enomem_reply(proto_image, tmp_path, want,
                                                           monkeypatch):
    """Memory running out while a read is filled (inflating: MemoryError or ENOMEM) is
    NBD_ENOMEM, not EIO; the connection goes on."""
    from qcowfast.serve import ImageExport
    real = ImageExport.read_plan
    failures = [MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")]

    def read_plan(self, offset, out):
        if failures:
            raise failures.pop(0)
        return real(self, offset, out)

    monkeypatch.setattr(ImageExport, "read_plan", read_plan)
    with NBDServer(proto_image, socket=tmp_path / "s.sock", persistent=True,
                   limits=LIMITS) as srv:
        c = Client(srv.address).greet()
        c.go(meta=False)
        assert c.read(0, 4096)[0] == nbd.NBD_ENOMEM
        assert c.read(0, 4096)[0] == nbd.NBD_ENOMEM
        error, data = c.read(0, 4096)
        assert error == 0 and data == want[:4096]
        c.close()


@pytest.mark.parametrize("fail", ["all workers", "second worker", "connection thread"])
def test_threads_that_cannot_start(proto_image, tmp_path, want, monkeypatch, fail):
    """Threads refused by the system (RuntimeError from start(), as under a memory limit):
    no worker at all closes that connection at once (its client hung after NBD_OPT_GO); one
    worker serves; a connection thread that cannot start drops that client, and the server
    goes on accepting (its accept loop died) and stops cleanly, socket removed."""
    real_start = threading.Thread.start
    refused = []

    def start(thread):
        name = thread.name
        if ((fail == "all workers" and name.startswith("nbd-worker-"))
                or (fail == "second worker" and name.startswith("nbd-worker-")
                    and name.endswith("-1"))
                or (fail == "connection thread" and not refused
                    and name.startswith("nbd-") and not name.startswith("nbd-worker-")
                    and name != "nbd-accept")):
            refused.append(name)
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    sock_path = tmp_path / "s.sock"
    srv = NBDServer(proto_image, socket=sock_path, persistent=True, limits=LIMITS)
    srv.start()
    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        c = Client(srv.address)
        if fail == "connection thread":
            assert c.closed(timeout=5)
        else:
            c.greet().go(meta=False)
            if fail == "all workers":
                import contextlib
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    c.request(nbd.NBD_CMD_READ, handle=1, offset=0, length=4096)
                assert c.closed(timeout=5)
            else:
                error, data = c.read(0, SIZE // 2)
                assert error == 0 and data == want[:SIZE // 2]
        c.close()
        assert refused
        monkeypatch.setattr(threading.Thread, "start", real_start)
        c = Client(srv.address).greet()
        c.go(meta=False)
        error, data = c.read(0, 4096)
        assert error == 0 and data == want[:4096]
        c.close()
    finally:
        monkeypatch.setattr(threading.Thread, "start", real_start)
        srv.stop()
    assert not sock_path.exists()


# NUL bytes and over-long strings in names and metadata-context queries (proto.md: strings
# MUST NOT contain NUL and MUST be no longer than 4096 bytes).
_LONG = b"x:" + b"a" * 4998
_STRING_CASES = {
    "query NUL": (nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", [b"base:allocation\0"])),
    "query inner NUL": (nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"", [b"base:\0x"])),
    "second query NUL": (nbd.NBD_OPT_SET_META_CONTEXT,
                         meta_data(b"", [b"base:allocation", b"a:\0"])),
    "long query": (nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", [_LONG])),
    "long query set": (nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"", [_LONG])),
    "long query and base": (nbd.NBD_OPT_SET_META_CONTEXT,
                            meta_data(b"", [_LONG, b"base:allocation"])),
    "long NUL query": (nbd.NBD_OPT_LIST_META_CONTEXT,
                       meta_data(b"", [b"base:allocation" + bytes(5000)])),
    "long query no colon": (nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", [b"a" * 4097])),
    "query of 4096": (nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"", [b"x:" + b"a" * 4094])),
    "meta name NUL": (nbd.NBD_OPT_LIST_META_CONTEXT, meta_data(b"\0", [b"base:allocation"])),
    "set name NUL": (nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"a\0", [b"base:\0"])),
    "info name NUL": (nbd.NBD_OPT_INFO, info_data(b"\0", [nbd.NBD_INFO_BLOCK_SIZE])),
    "go name NUL": (nbd.NBD_OPT_GO, info_data(b"\0")),
}


def _string_replies(address) -> dict:
    got = {}
    for case, (opt, data) in _STRING_CASES.items():
        c = Client(address).greet()
        try:
            assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
            got[case] = _option_reply(c, opt, data)
        finally:
            c.close()
    return got


def test_nul_and_long_strings_answer_as_qemu_nbd(reference, server):
    """A name or query holding a NUL byte is ERR_INVALID; a query over 4096 bytes is skipped
    (selects nothing, the others still count), as qemu-nbd answers."""
    assert _string_replies(server.address) == _string_replies(reference)


def _nonfixed_session(address) -> dict:
    """{option: closed?} for a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE, one option
    each on a fresh connection; EXPORT_NAME: the export size it gets."""
    got = {}
    for opt in (nbd.NBD_OPT_ABORT, nbd.NBD_OPT_LIST, nbd.NBD_OPT_STARTTLS, nbd.NBD_OPT_INFO,
                nbd.NBD_OPT_GO, nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_OPT_LIST_META_CONTEXT,
                nbd.NBD_OPT_SET_META_CONTEXT, 99):
        c = Client(address).greet(client_flags=nbd.NBD_FLAG_C_NO_ZEROES)
        try:
            c.send_option(opt, _OPTION_DATA.get(opt, b""))
            got[opt] = c.closed()
        finally:
            c.close()
    c = Client(address).greet(client_flags=nbd.NBD_FLAG_C_NO_ZEROES)
    try:
        c.send_option(nbd.NBD_OPT_EXPORT_NAME)
        got[nbd.NBD_OPT_EXPORT_NAME] = struct.unpack(">QH", c.recv(10))[0]
    finally:
        c.close()
    return got


def test_nonfixed_newstyle_client_gets_only_export_name(reference, server):
    """proto.md: NBD_OPT_EXPORT_NAME "is the only valid option in nonfixed newstyle
    negotiation"; qemu-nbd drops a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE on any
    other option, without a reply."""
    got = _nonfixed_session(server.address)
    assert got == _nonfixed_session(reference)
    assert got.pop(nbd.NBD_OPT_EXPORT_NAME) == SIZE and all(got.values())


def test_abort_with_data_acks_then_closes(client):
    """proto.md: a server SHOULD ignore data sent with NBD_OPT_ABORT and MUST reply ACK.
    (qemu-nbd 7.2 sends its ACK without reading the data, so its close may reset the
    connection before the client reads the ACK.)"""
    c = client()
    ((rtype, _),) = c.option(nbd.NBD_OPT_ABORT, b"junk")
    assert rtype == nbd.NBD_REP_ACK
    assert c.closed()
