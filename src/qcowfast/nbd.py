"""The NBD protocol, server side, for one read-only export (NBD doc/proto.md).

One `Connection` per client socket: the fixed newstyle handshake (option haggling), then the
transmission phase. Requests are parsed on the connection's thread, a buffered burst of
pipelined headers at a time; reads and block-status queries are queued for the connection's
worker threads and answered as they finish (NBD allows replies in any order: the client matches
them by handle). Queued reads that continue each other (a sequential copy) are taken by one
worker and filled in one pass, up to 4 MiB; their replies (one per request) go out in one
message, under one lock, so chunks of different replies never interleave. An export with
`read_plan` says which bytes lie in a file: those are sent with sendfile straight from the page
cache (no copy through Python), zeros from a shared zero buffer, the rest (inflated clusters)
from the worker's buffer.

How many of a connection's workers may fill reads at once is set by a `CoreShare` the server's
connections share: the cores divided among the connections that have requests in flight. Letting
every connection fill batches on every core instead costs CPU (threads evicting each other's
buffers and decompressor tables from the caches) and fills batches long before the client takes
them. Block-status queries (and caches) go to the front of the queue and never wait for the
share. While the queue holds a batch for every worker that may take one, the connection's
thread reads no more requests: those the client sends meanwhile are read a burst at a time.

Bounds (`Limits`): every length is checked before anything it announces is read; option data,
option count, request length, requests and bytes in flight, and the time a started message or a
reply may take are all capped. A write's payload is read and discarded (it is under the request
cap) or the connection is closed (it is over), so the stream never desyncs.

This module knows nothing of QCOW2: it serves any object with the `Export` shape.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("qcowfast.serve")

# -- constants (names and values of doc/proto.md) -------------------------------------------------
NBDMAGIC = 0x4E42444D41474943                 # "NBDMAGIC", INIT_PASSWD
IHAVEOPT = 0x49484156454F5054                 # "IHAVEOPT", also the option request magic
NBD_REP_MAGIC = 0x0003E889045565A9            # option reply magic
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# option replies
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _REP_ERR + 1
NBD_REP_ERR_POLICY = _REP_ERR + 2
NBD_REP_ERR_INVALID = _REP_ERR + 3
NBD_REP_ERR_PLATFORM = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG = _REP_ERR + 9

# NBD_OPT_INFO / NBD_OPT_GO information types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# commands and command flags
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# structured replies
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# error values
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# base:allocation
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
BASE_ALLOCATION = b"base:allocation"
BASE_ALLOCATION_ID = 1                      # our context id for base:allocation
# qemu: contexts (QEMU docs/interop/nbd.txt); an export's `meta_contexts` get ids from 2 on.
QEMU_NAMESPACE = b"qemu:"
QEMU_ALLOCATION_DEPTH = b"qemu:allocation-depth"
QEMU_DIRTY_BITMAP = b"qemu:dirty-bitmap:"
NBD_STATE_DIRTY = 1 << 0

NBD_MAX_STRING = 4096                       # proto.md: strings MUST be no longer than 4096 bytes
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024      # QEMU's NBD_MAX_BUFFER_SIZE, the usual request cap
NBD_MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8     # QEMU's: 1 MiB of extents per reply
READ_BATCH_BYTES = 4 * 1024 * 1024          # contiguous queued reads filled together, at most
READ_BATCH_COUNT = 32
RECV_BUFFER = 64 * 1024                     # read-ahead of small messages
_IOV_MAX = 512                              # buffers per sendmsg (Linux allows 1024)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_ZEROS = memoryview(bytes(1024 * 1024))    # zero runs of replies are sent from here

_OPTION_HEADER = struct.Struct(">QII")       # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")       # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")             # magic, flags, type, handle, length
_DATA_CHUNK = struct.Struct(">IHHQIQ")       # a chunk header, then the offset of its data
_HOLE = struct.Struct(">QI")                 # an OFFSET_HOLE chunk's offset and length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_OPTION_NAMES = {v: k for k, v in globals().items() if k.startswith("NBD_OPT_")}
# QEMU's names of the commands (nbd/common.c nbd_cmd_lookup()), in its messages.
_QEMU_COMMANDS = {NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_DISC: "disconnect",
                  NBD_CMD_FLUSH: "flush", NBD_CMD_TRIM: "trim", NBD_CMD_CACHE: "cache",
                  NBD_CMD_WRITE_ZEROES: "write zeroes", NBD_CMD_BLOCK_STATUS: "block status"}
_WRITES = (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM)
_READ_ONLY = "Export is read-only"


class Export(Protocol):
    """What a connection needs from the thing it exports (see qcowfast.serve.ImageExport)."""

    name: str                    # export name clients ask for ("" is the default export)
    description: str
    size: int                    # bytes
    preferred_block_size: int    # power of two >= 512 (NBD_INFO_BLOCK_SIZE)
    multi_conn: bool             # advertise NBD_FLAG_CAN_MULTI_CONN (False: one client at
                                 # a time, as qemu-nbd -e 1: a multi-conn client would wait)
    # Optional: minimum_block_size (NBD_INFO_BLOCK_SIZE), 1 without it.

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the bytes at [offset, offset + len(out)) (within size)."""

    # Optional, used instead of read_into when present:
    # def read_plan(self, offset: int, out: memoryview) -> list[tuple[int, int, int, int]]:
    #     """Say where the bytes of [offset, offset + len(out)) come from: ascending
    #     (start, end, fd, file_offset) runs covering it; fd >= 0: bytes of file fd from
    #     file_offset (sent with sendfile), fd == -1: bytes filled into `out` (at start -
    #     offset), fd == -2: zeros. The file ranges must lie within their files (checked
    #     again against the files' sizes before replying: a read needing bytes a file no
    #     longer holds gets EIO)."""

    def allocation(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """Return (length, NBD_STATE_* flags) extents covering [offset, offset + length) from
        `offset` on, at most `max_extents` of them (at least one). Raising fails the request
        (EIO; ENOMEM for MemoryError)."""

    # Optional: the chunks of a structured read (without DF) that failed, as qemu-nbd sends
    # them; without it such a read gets an error chunk alone:
    # def read_failure(self, offset: int, length: int, exc: Exception
    #                  ) -> tuple[list[tuple[int, int, bool]], bool] | None:
    #     """(runs, query): the (start, end, hole) runs qemu-nbd's sparse read of
    #     [offset, offset + length) sends as chunks before the step that fails with `exc`,
    #     in order (empty when that is the first), and whether that step is a block status
    #     query (else the read of the next run); None when the export cannot tell."""

    # Optional: the qemu: metadata contexts it offers besides base:allocation, in qemu-nbd's
    # order (qemu:allocation-depth, then each qemu:dirty-bitmap:NAME):
    # meta_contexts: list[tuple[bytes, Callable[[int, int, int], list[tuple[int, int]]]]]
    #     (context name, extents(offset, length, max_extents)) as `allocation` gives them.

    # Optional: NBD_CMD_CACHE, answered with success without it:
    # def cache(self, offset: int, length: int) -> None:
    #     """Raise where qemu-nbd's prefetch of [offset, offset + length) fails."""


@dataclass(frozen=True)
class Limits:
    """Per-connection bounds. Times are seconds; None means no limit."""

    max_request: int = NBD_MAX_BUFFER_SIZE    # longest read (and write payload) accepted
    max_options: int = 64                     # options per handshake
    max_option_length: int = 64 * 1024        # option data bytes
    max_queries: int = 32                     # meta-context queries per option
    max_extents: int = NBD_MAX_BLOCK_STATUS_EXTENTS   # descriptors per block-status reply
    max_in_flight: int = 64                   # requests queued or running per connection
    max_in_flight_bytes: int = 64 * 1024 * 1024   # read bytes queued or running
    workers: int = 4                          # worker threads per connection
    handshake_timeout: float | None = 10.0    # whole option haggling
    io_timeout: float | None = 30.0           # finish a started request, or send a reply
    idle_timeout: float | None = None         # between requests (kernel clients idle for hours)


class CoreShare:
    """The cores a server's connections share: each connection with requests in flight may
    have ceil(cores / such connections) workers filling reads at once (a connection alone gets
    every core)."""

    def __init__(self, cores: int):
        self.cores = max(1, cores)
        self._active = 0
        self._lock = threading.Lock()

    def workers(self) -> int:
        return -(-self.cores // max(1, self._active))

    def enter(self) -> None:
        """A connection now has requests in flight."""
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        """A connection has none left."""
        with self._lock:
            self._active -= 1


class Disconnect(Exception):
    """The connection must end (peer closed, timeout, protocol violation); message says why."""


class OptionError(Exception):
    """An option fails with error reply `reply` (an NBD_REP_ERR_*); the message goes with it."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply


_STOP = object()          # a command handler's "end the transmission phase"
_GO = object()            # an option handler's "enter the transmission phase"


class Connection:
    """One client: handshake, then requests until disconnect. Use `run()` on its own thread.

    `on_negotiated()` is called when the transmission phase starts. With a `share`, at most
    `share.workers()` of the `limits.workers` workers fill reads at once (read again before each
    batch: it changes as other connections start and stop sending requests).
    """

    def __init__(self, sock: socket.socket, export: Export, limits: Limits = Limits(),
                 on_negotiated=None, share: CoreShare | None = None):
        self.sock = sock
        self._fileno = sock.fileno()
        self.export = export
        self.limits = limits
        self.peer = _peer_name(sock)
        self.negotiated = False
        self.structured = False
        self.no_zeroes = False
        self.contexts: dict[int, bytes] = {}
        self._extra = list(getattr(export, "meta_contexts", ()))
        self._on_negotiated = on_negotiated
        self._name = export.name.encode()
        self._send_lock = threading.Lock()
        # One lock for the request queue and the in-flight counts: workers wait on `_work`
        # for requests, the reader waits on `_flow` for room in the in-flight bounds.
        self._qlock = threading.Lock()
        self._flow = threading.Condition(self._qlock)
        self._work = threading.Condition(self._qlock)
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._queue: deque = deque()              # admitted requests not yet taken by a worker
        self._idle = 0                            # workers waiting for a request
        self._busy = 0                            # workers serving a request
        self._queued = 0                          # bytes of the reads in the queue
        self._core_share = share
        self._share = share.workers if share is not None else (lambda: max(1, limits.workers))
        self._sharing = False                     # counted in the share (requests in flight)
        self._ending = False                      # no more requests: workers drain and end
        self._rbuf = bytearray()                  # bytes received ahead of the parser
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._local = threading.local()
        self._plan = getattr(export, "read_plan", None)
        sock.setblocking(False)
        self._rpoll = select.poll()
        self._rpoll.register(sock, select.POLLIN | select.POLLPRI)
        self._wpoll = select.poll()
        self._wpoll.register(sock, select.POLLOUT)
        self._options = {
            NBD_OPT_EXPORT_NAME: self._opt_export_name,
            NBD_OPT_ABORT: self._opt_abort,
            NBD_OPT_LIST: self._opt_list,
            NBD_OPT_STARTTLS: self._opt_starttls,
            NBD_OPT_INFO: self._opt_info_go,
            NBD_OPT_GO: self._opt_info_go,
            NBD_OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            NBD_OPT_LIST_META_CONTEXT: self._opt_meta_context,
            NBD_OPT_SET_META_CONTEXT: self._opt_meta_context,
        }
        # Valid requests of the commands served (writes never are: see _invalid).
        self._commands = {
            NBD_CMD_READ: self._cmd_read,
            NBD_CMD_FLUSH: self._cmd_flush,
            NBD_CMD_CACHE: self._cmd_cache,
            NBD_CMD_BLOCK_STATUS: self._cmd_block_status,
        }

    # -- life cycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve the client until it leaves or breaks the protocol; always close the socket."""
        try:
            if self._negotiate():
                self.negotiated = True
                if self._on_negotiated is not None:
                    self._on_negotiated()
                self._transmission()
        except Disconnect as exc:
            log.info("%s: %s", self.peer, exc)
        except OSError as exc:
            log.info("%s: connection error: %s", self.peer, exc)
        except Exception:                         # a bug: end this connection, keep serving
            log.exception("%s: connection failed", self.peer)
        finally:
            self._finish()

    def shutdown(self) -> None:
        """Ask the connection to end: no more requests are read; replies in flight are sent."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def abort(self) -> None:
        """End the connection now, replies in flight or not: wake the reader and workers."""
        self._closed = True
        with self._qlock:
            self._flow.notify_all()
            self._work.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish(self) -> None:
        # Requests already admitted are still answered (unless the connection was aborted).
        try:
            with self._qlock:
                self._ending = True
                self._work.notify_all()
            for worker in self._workers:          # (only workers that started are listed)
                worker.join()
            self._closed = True
            with self._qlock:
                self._count_in_share(False)       # requests left behind by an abort
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    # -- socket I/O ------------------------------------------------------------------------------
    # The socket is non-blocking and every wait is a poll() with its own deadline: the reader
    # and the workers sending replies share it, so per-socket timeouts would interfere.
    def _wait(self, poller, deadline: float | None, what: str) -> None:
        if deadline is None:
            timeout = None
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Disconnect(f"timed out {what}")
            timeout = int(left * 1000) + 1
        if not poller.poll(timeout):
            raise Disconnect(f"timed out {what}")

    def _recv_exact(self, n: int, deadline: float | None) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), deadline)
        return bytes(buf)

    def _recv_into(self, view: memoryview, deadline: float | None) -> None:
        # Small reads go through a buffer of at most RECV_BUFFER bytes, so a burst of pipelined
        # request headers costs one system call, not one each.
        got = min(len(view), len(self._rbuf))
        if got:
            view[:got] = self._rbuf[:got]
            del self._rbuf[:got]
        while got < len(view):
            direct = len(view) - got >= RECV_BUFFER
            try:
                if direct:
                    k = self.sock.recv_into(view[got:])
                else:
                    data = self.sock.recv(RECV_BUFFER)
                    k = min(len(data), len(view) - got)
                    view[got:got + k] = data[:k]
                    self._rbuf += data[k:]
            except (BlockingIOError, InterruptedError):
                self._wait(self._rpoll, deadline, "waiting for the client")
                continue
            if k == 0:
                raise Disconnect("client closed the connection" if got == 0 else
                                 "client closed the connection in the middle of a message")
            got += k

    def _discard(self, n: int, deadline: float | None) -> None:
        scratch = memoryview(bytearray(min(n, 256 * 1024)))
        while n:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k], deadline)
            n -= k

    def _send(self, *parts) -> None:
        """Send the parts as one message; a reply that cannot be sent ends the connection.

        The client must keep accepting bytes: io_timeout without progress ends the connection.
        """
        self._send_parts([memoryview(p).cast("B") for p in parts if len(p)])

    def _send_parts(self, parts: list) -> None:
        """Send `parts` in order as one message, under the send lock: byte buffers (memoryviews
        of unsigned bytes, non-empty) with sendmsg, `(fd, offset, count)` file ranges with
        sendfile (zero copy from the page cache). A file cut short after _do_reads checked its
        size ends the connection: its reply header is already on the wire."""
        timeout = self.limits.io_timeout
        sock = self.sock
        with self._send_lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            i, n = 0, len(parts)
            while i < n:
                if self._closed:
                    raise Disconnect("connection closed while replying")
                part = parts[i]
                if type(part) is tuple:
                    fd, offset, count = part
                    try:
                        sent = os.sendfile(self._fileno, fd, offset, count)
                    except (BlockingIOError, InterruptedError):
                        self._wait(self._wpoll, deadline, "sending a reply")
                        continue
                    if sent <= 0:
                        # The file was cut after _do_reads checked its size: the reply's
                        # header (simple: error 0; structured: a data chunk of this length)
                        # is on the wire, and NBD has no way to take it back or cut it short.
                        raise Disconnect("the image file ended while sending a reply")
                    parts[i] = (fd, offset + sent, count - sent) if sent < count else None
                    if sent == count:
                        i += 1
                else:
                    j = i + 1
                    while j < n and j - i < _IOV_MAX and type(parts[j]) is not tuple:
                        j += 1
                    try:
                        # MSG_MORE: a file range follows, let TCP fill its segments.
                        sent = sock.sendmsg(parts[i:j], (), _MSG_MORE if j < n else 0)
                    except (BlockingIOError, InterruptedError):
                        self._wait(self._wpoll, deadline, "sending a reply")
                        continue
                    while sent:
                        if sent >= len(parts[i]):
                            sent -= len(parts[i])
                            i += 1
                        else:
                            parts[i] = parts[i][sent:]
                            sent = 0
                if timeout is not None:
                    deadline = time.monotonic() + timeout

    # -- handshake -------------------------------------------------------------------------------
    def _negotiate(self) -> bool:
        """Fixed newstyle negotiation; True when the transmission phase starts."""
        lim = self.limits
        deadline = (None if lim.handshake_timeout is None
                    else time.monotonic() + lim.handshake_timeout)
        self._send(_U64.pack(NBDMAGIC), _U64.pack(IHAVEOPT),
                   _U16.pack(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (cflags,) = _U32.unpack(self._recv_exact(4, deadline))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        fixed = bool(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)
        for _ in range(lim.max_options):
            magic, opt, length = _OPTION_HEADER.unpack(self._recv_exact(16, deadline))
            if magic != IHAVEOPT:
                raise Disconnect(f"bad option magic {magic:#x}")
            if length > lim.max_option_length:
                raise Disconnect(f"option {opt} announces {length} bytes of data (limit "
                                 f"{lim.max_option_length})")
            data = self._recv_exact(length, deadline)
            if not fixed and opt != NBD_OPT_EXPORT_NAME:
                # proto.md: EXPORT_NAME "is the only valid option in nonfixed newstyle
                # negotiation"; such a client cannot take an error reply (qemu-nbd drops it).
                raise Disconnect(f"option {opt} from a client without fixed newstyle")
            handler = self._options.get(opt)
            try:
                if handler is None:
                    raise OptionError(NBD_REP_ERR_UNSUP, f"option {opt} is not supported")
                result = handler(opt, data)
            except OptionError as err:
                self._opt_reply(opt, err.reply, str(err).encode()[:NBD_MAX_STRING])
                continue
            if result is _GO:
                return True
            if result is _STOP:
                return False
        raise Disconnect(f"more than {lim.max_options} options")

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._send(_OPTION_REPLY.pack(NBD_REP_MAGIC, opt, rtype, len(data)), data)

    def transmission_flags(self) -> int:
        # qemu-nbd -r's flags. With nothing ever written, FLUSH, FUA and CACHE have no effect,
        # which proto.md allows: FUA may be honoured "even by ignoring the bit", CACHE may be
        # advertised "even if the command has no effect".
        flags = (NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
                 | NBD_FLAG_SEND_CACHE)
        if getattr(self.export, "multi_conn", True):
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= NBD_FLAG_SEND_DF
        return flags

    def _check_name(self, name: bytes) -> None:
        if b"\0" in name:
            # proto.md: strings MUST NOT contain NUL (qemu-nbd: ERR_INVALID, before the lookup).
            raise OptionError(NBD_REP_ERR_INVALID, "NUL byte in the export name")
        if name != self._name:
            raise OptionError(NBD_REP_ERR_UNKNOWN,
                              f"no export named {name[:256].decode(errors='replace')!r}")

    def _opt_export_name(self, opt: int, data: bytes):
        if data != self._name:
            # proto.md: NBD_OPT_EXPORT_NAME cannot fail with a reply; terminate the session.
            raise Disconnect("NBD_OPT_EXPORT_NAME for an unknown export")
        tail = b"" if self.no_zeroes else bytes(124)
        self._send(_U64.pack(self.export.size), _U16.pack(self.transmission_flags()), tail)
        return _GO

    def _opt_abort(self, opt: int, data: bytes):
        try:
            self._opt_reply(opt, NBD_REP_ACK)
        except (OSError, Disconnect):
            pass                       # the client may close without waiting for the ACK
        return _STOP

    def _opt_list(self, opt: int, data: bytes):
        if data:
            raise OptionError(NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        desc = self.export.description.encode()[:NBD_MAX_STRING]
        self._opt_reply(opt, NBD_REP_SERVER, _U32.pack(len(self._name)) + self._name + desc)
        self._opt_reply(opt, NBD_REP_ACK)

    def _opt_starttls(self, opt: int, data: bytes):
        # proto.md, NOTLS mode: ERR_POLICY from a server that does TLS but not now (qemu-nbd
        # without --tls-creds), ERR_UNSUP from one that "does not support the NBD_OPT_STARTTLS
        # option at all", as this one.
        raise OptionError(NBD_REP_ERR_UNSUP, "TLS is not supported by this server")

    def _opt_info_go(self, opt: int, data: bytes):
        # 32-bit name length, name, 16-bit count, count x 16-bit information requests
        if len(data) < 6:
            raise OptionError(NBD_REP_ERR_INVALID, "option data too short")
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 6 or namelen > NBD_MAX_STRING:
            raise OptionError(NBD_REP_ERR_INVALID, "bad export name length")
        name = data[4:4 + namelen]
        (count,) = _U16.unpack_from(data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * count:
            raise OptionError(NBD_REP_ERR_INVALID,
                              "option length does not match the information requests")
        requests = set(struct.unpack_from(f">{count}H", data, 6 + namelen))
        self._check_name(name)
        exp = self.export
        self._opt_reply(opt, NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, exp.size,
                                                       self.transmission_flags()))
        if NBD_INFO_NAME in requests:
            self._opt_reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + self._name)
        if NBD_INFO_DESCRIPTION in requests and exp.description:
            self._opt_reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION)
                            + exp.description.encode()[:NBD_MAX_STRING])
        # Minimum 1 (the default: clients that did not ask lose nothing by ignoring it) unless
        # the export asks for more, as qemu-nbd's request alignment for a probed raw image.
        self._opt_reply(opt, NBD_REP_INFO, struct.pack(
            ">HIII", NBD_INFO_BLOCK_SIZE, getattr(exp, "minimum_block_size", 1),
            exp.preferred_block_size, self.limits.max_request))
        self._opt_reply(opt, NBD_REP_ACK)
        return _GO if opt == NBD_OPT_GO else None

    def _opt_structured_reply(self, opt: int, data: bytes):
        if data:
            raise OptionError(NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.structured:
            # As qemu-nbd (nbd/server.c) does; libnbd reads it as "the server detected a
            # duplicate request", and structured replies stay on.
            raise OptionError(NBD_REP_ERR_INVALID, "structured replies already negotiated")
        self.structured = True
        self._opt_reply(opt, NBD_REP_ACK)

    def _opt_meta_context(self, opt: int, data: bytes):
        setting = opt == NBD_OPT_SET_META_CONTEXT
        if setting:
            self.contexts = {}          # replaced even when the option fails (proto.md)
            # proto.md: SET "MUST NOT" come before structured replies (the server SHOULD refuse
            # it); LIST "SHOULD NOT", and the server MAY refuse it: answered, as by qemu-nbd.
            if not self.structured:
                raise OptionError(NBD_REP_ERR_INVALID,
                                  "negotiate NBD_OPT_STRUCTURED_REPLY first")
        # As nbd/server.c nbd_negotiate_meta_queries(): the export is looked up before the
        # queries are read (an unknown one is ERR_UNKNOWN however malformed the rest is).
        name, pos = _meta_export_name(data)
        self._check_name(name)
        # The query cap never refuses a request naming each offered context (and the
        # namespaces) once, however many bitmaps the export offers.
        queries = _parse_meta_queries(data, pos, max(self.limits.max_queries,
                                                     len(self._extra) + 4))
        # A query over 4096 bytes (longer than proto.md lets a string be) selects nothing and
        # is not looked into, as qemu-nbd skips it; one holding a NUL is invalid (a string
        # MUST NOT contain NUL; qemu-nbd: ERR_INVALID).
        asked = bool(queries)                     # (none at all: LIST lists every context)
        queries = [q for q in queries if len(q) <= NBD_MAX_STRING]
        if any(b"\0" in q for q in queries):
            raise OptionError(NBD_REP_ERR_INVALID, "NUL byte in a metadata context query")
        if any(b":" not in q for q in queries):
            raise OptionError(NBD_REP_ERR_INVALID, "a metadata context query lacks its namespace")
        chosen = self._chosen_contexts(queries, not setting, asked)
        if setting:
            self.contexts = chosen
        for cid, cname in chosen.items():
            self._opt_reply(opt, NBD_REP_META_CONTEXT, _U32.pack(cid if setting else 0) + cname)
        self._opt_reply(opt, NBD_REP_ACK)

    def _chosen_contexts(self, queries: list[bytes], listing: bool, asked: bool
                         ) -> dict[int, bytes]:
        """{id: name} of the contexts `queries` select, in qemu-nbd's order (base:allocation,
        qemu:allocation-depth, the bitmaps), as nbd/server.c nbd_meta_base_query() and
        nbd_meta_qemu_query() match them: a full name selects its context (the first of
        that name: a bitmap may be exported twice); in LIST only, no query selects all,
        "base:" base:allocation, "qemu:" every qemu: context and "qemu:dirty-bitmap:" every
        bitmap. Unknown names select nothing."""
        extra = [name for name, _ in self._extra]
        first = {}                                # name -> index of its first context
        for i, name in enumerate(extra):
            first.setdefault(name, i)
        every = listing and not asked
        base = every or BASE_ALLOCATION in queries or (listing and b"base:" in queries)
        picked = {first[q] for q in queries if q in first}
        for i, name in enumerate(extra):
            bitmap = name.startswith(QEMU_DIRTY_BITMAP)
            if every or (listing and (QEMU_NAMESPACE in queries
                                      or (bitmap and QEMU_DIRTY_BITMAP in queries))):
                picked.add(i)
        chosen = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if base else {}
        chosen.update((2 + i, extra[i]) for i in sorted(picked))
        return chosen

    # -- transmission ----------------------------------------------------------------------------
    def _transmission(self) -> None:
        lim = self.limits
        for i in range(max(1, lim.workers)):
            worker = threading.Thread(target=self._worker, daemon=True,
                                      name=f"nbd-worker-{self.peer}-{i}")
            try:
                worker.start()
            except RuntimeError as exc:           # no memory or threads left for one more
                if not self._workers:
                    raise Disconnect(f"cannot start a worker thread: {exc}") from None
                log.warning("%s: serving with %d worker threads: %s", self.peer,
                            len(self._workers), exc)
                break
            self._workers.append(worker)
        rbuf = self._rbuf
        size = self.export.size
        read_flags = ~self._read_flags()
        cap = lim.max_request
        while not self._closed:
            if len(rbuf) < _REQUEST.size:
                # No whole request buffered: let the workers start on what is queued, then
                # wait. Idle between requests only the idle timeout applies; a started request
                # must be complete within io_timeout.
                self._kick()
                if not rbuf:
                    self._await_backlog()
                    idle = (None if lim.idle_timeout is None
                            else time.monotonic() + lim.idle_timeout)
                    self._wait(self._rpoll, idle, "waiting for a request (idle)")
                deadline = None if lim.io_timeout is None else time.monotonic() + lim.io_timeout
                header = self._recv_exact(_REQUEST.size, deadline)
                magic, flags, cmd, handle, offset, length = _REQUEST.unpack(header)
            else:
                magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(rbuf)
                del rbuf[:_REQUEST.size]
                deadline = None if lim.io_timeout is None else time.monotonic() + lim.io_timeout
            if magic != NBD_REQUEST_MAGIC:
                raise Disconnect(f"bad request magic {magic:#x}")
            if (cmd == NBD_CMD_READ and not flags & read_flags and length <= cap
                    and offset <= size and length <= size - offset):
                self._submit_read(handle, offset, length, flags)   # the common case
                continue
            self._kick()
            if cmd == NBD_CMD_DISC:
                return                            # (whatever else the request holds)
            self._request(cmd, flags, handle, offset, length, deadline)

    def _await_backlog(self) -> None:
        """Wait while the queue holds a whole batch for every worker that may take one (the
        workers have their next batch anyway): the requests the client sends meanwhile are then
        read a burst at a time, one wakeup per batch rather than one per request."""
        if self._queued < READ_BATCH_BYTES * self._share():
            return
        with self._qlock:
            while self._queued >= READ_BATCH_BYTES * self._share() and not self._closed:
                self._flow.wait()

    def _request(self, cmd, flags, handle, offset, length, deadline) -> None:
        """Check a request as nbd/server.c nbd_co_receive_request() does (a write's payload is
        read first), reply to an invalid one with qemu-nbd's words, else serve it."""
        bad = self._invalid(cmd, flags, offset, length)
        if cmd == NBD_CMD_WRITE:
            if length > self.limits.max_request:
                # The payload cannot be skipped within bounds: refuse, then end the connection.
                self._reply_error(handle, NBD_EPERM, bad)
                raise Disconnect(f"write payload of {length} bytes is over the request limit")
            self._discard(length, deadline)
        if bad is not None:
            # qemu-nbd -r answers writes EINVAL; proto.md asks EPERM of a read-only export.
            error = NBD_EPERM if cmd in _WRITES else NBD_EINVAL
            return self._reply_error(handle, error, bad)
        self._commands.get(cmd, self._cmd_unknown)(cmd, flags, handle, offset, length)

    def _invalid(self, cmd: int, flags: int, offset: int, length: int) -> str | None:
        """qemu-nbd's words for what nbd_co_receive_request() refuses in a request, checked in
        its order (a write-type command is always refused), else None."""
        cap = self.limits.max_request
        if cmd in (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE) and length > cap:
            return f"len ({length} ) is larger than max len ({cap})"
        if cmd in _WRITES:
            return _READ_ONLY
        size = self.export.size
        if offset > size or length > size - offset:
            return f"operation past EOF; From: {offset}, Len: {length}, Size: {size}"
        if flags & ~self._valid_flags(cmd):
            return (f"unsupported flags for command {_QEMU_COMMANDS.get(cmd, '<unknown>')} "
                    f"(got {flags:#x})")
        return None

    def _valid_flags(self, cmd: int) -> int:
        """The command flags a request of `cmd` may carry."""
        # proto.md: with NBD_FLAG_SEND_FUA advertised the server MUST accept FUA on every
        # command; nothing is written, so there is nothing to wait for.
        if cmd == NBD_CMD_READ:
            return self._read_flags()
        return NBD_CMD_FLAG_FUA | (NBD_CMD_FLAG_REQ_ONE if cmd == NBD_CMD_BLOCK_STATUS else 0)

    def _read_flags(self) -> int:
        """The command flags a read may carry."""
        return NBD_CMD_FLAG_FUA | (NBD_CMD_FLAG_DF if self.structured else 0)

    def _cmd_read(self, cmd, flags, handle, offset, length):
        self._submit_read(handle, offset, length, flags)

    def _cmd_block_status(self, cmd, flags, handle, offset, length):
        # (nbd/server.c nbd_handle_request())
        if not length:
            return self._reply_error(handle, NBD_EINVAL, "need non-zero length")
        if not self.contexts:
            return self._reply_error(handle, NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
        self._submit(0, self._do_block_status, handle, offset, length,
                     bool(flags & NBD_CMD_FLAG_REQ_ONE))

    def _cmd_flush(self, cmd, flags, handle, offset, length):
        # Nothing is ever written, so there is nothing to flush.
        self._send(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle))

    def _cmd_cache(self, cmd, flags, handle, offset, length):
        # Nothing is cached (proto.md allows a CACHE with no effect); but where qemu-nbd's
        # prefetch reads fail, so does the export's `cache`.
        if getattr(self.export, "cache", None) is None or not length:
            return self._send(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle))
        self._submit(0, self._do_cache, handle, offset, length)

    def _cmd_unknown(self, cmd, flags, handle, offset, length):
        self._reply_error(handle, NBD_EINVAL, f"invalid request type ({cmd}) received")

    # -- replies ---------------------------------------------------------------------------------
    def _reply_error(self, handle: int, error: int, message: str) -> None:
        if self.structured:
            self._send(self._error_chunk(handle, error, message))
        else:
            self._send(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle))

    @staticmethod
    def _error_chunk(handle: int, error: int, message: str) -> bytes:
        """The final NBD_REPLY_TYPE_ERROR chunk of a structured reply."""
        msg = message.encode()[:NBD_MAX_STRING]
        return (_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                            handle, 6 + len(msg)) + struct.pack(">IH", error, len(msg)) + msg)

    def _admit(self, nbytes: int) -> None:
        """Wait until one more request of `nbytes` fits in the in-flight bounds; count it.
        Called with `_qlock` held."""
        lim = self.limits
        while not self._closed and self._in_flight and (
                self._in_flight >= lim.max_in_flight
                or self._in_flight_bytes + nbytes > lim.max_in_flight_bytes):
            self._work.notify(self._idle)         # the queue must drain to make room
            self._flow.wait()
        if self._closed:
            raise Disconnect("connection closed")
        if not self._in_flight:
            self._count_in_share(True)
        self._in_flight += 1
        self._in_flight_bytes += nbytes

    def _kick(self) -> None:
        """Wake idle workers for the queued requests (one per request, at most, and no more
        than may work at once)."""
        if self._queue and self._idle:
            with self._qlock:
                n = min(self._idle, len(self._queue), self._share() - self._busy)
                if n > 0:
                    self._work.notify(n)

    def _submit(self, nbytes: int, fn, *args) -> None:
        """Queue fn(*args) (a quick query) for a worker, ahead of the queued reads, once the
        request fits in the in-flight bounds."""
        with self._qlock:
            self._admit(nbytes)
            self._queue.appendleft((None, fn, args, nbytes))
            self._work.notify()

    def _submit_read(self, handle: int, offset: int, length: int, flags: int) -> None:
        # Workers are woken by _kick once the reader has parsed what it has buffered, so a
        # burst of pipelined reads is handed over in contiguous batches. (A read is queued as
        # (handle, offset, length, command flags), a query as (None, fn, args, bytes).)
        with self._qlock:
            self._admit(length)
            self._queue.append((handle, offset, length, flags))
            self._queued += length

    def _worker(self) -> None:
        try:
            self._work_loop()
        finally:
            buf = getattr(self._local, "buf", None)
            if buf is not None:
                _give_buffer(buf)

    def _work_loop(self) -> None:
        """Take requests from the queue until the connection ends. Queued reads that continue
        each other (clients copy sequentially) are taken together: one fill for the batch,
        its replies sent together. Reads wait while as many workers as the share allows are
        busy (the worker that finishes takes the next batch: its buffer is still in cache)."""
        queue = self._queue
        while True:
            with self._qlock:
                while not self._may_take() and not self._ending and not self._closed:
                    self._idle += 1
                    self._work.wait()
                    self._idle -= 1
                if self._closed or not queue:
                    return
                self._busy += 1
                first = queue.popleft()
                if first[0] is None:
                    batch = None
                else:
                    batch = [first]
                    end = first[1] + first[2]
                    total = first[2]
                    while queue and len(batch) < READ_BATCH_COUNT:
                        nxt = queue[0]
                        if nxt[0] is None or nxt[1] != end or total + nxt[2] > READ_BATCH_BYTES:
                            break
                        batch.append(queue.popleft())
                        end += nxt[2]
                        total += nxt[2]
                if batch is not None:
                    self._queued -= total
                    self._flow.notify()            # the reader may read more requests
                if self._idle and self._may_take():
                    self._work.notify()            # more for another worker meanwhile
            if batch is None:
                _, fn, args, nbytes = first
                count = 1
                self._guarded(fn, *args)
            else:
                count, nbytes = len(batch), total
                self._guarded(self._do_reads, batch, total)
            with self._qlock:
                self._busy -= 1
                self._in_flight -= count
                self._in_flight_bytes -= nbytes
                if not self._in_flight:
                    self._count_in_share(False)
                self._flow.notify()

    def _count_in_share(self, active: bool) -> None:
        """Enter or leave the share of the cores (with `_qlock` held)."""
        if self._core_share is not None and active != self._sharing:
            self._sharing = active
            (self._core_share.enter if active else self._core_share.leave)()

    def _may_take(self) -> bool:
        """Whether a worker may take the head of the queue now (with `_qlock` held)."""
        queue = self._queue
        return bool(queue) and (queue[0][0] is None or self._busy < self._share())

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Disconnect as exc:
            log.info("%s: %s", self.peer, exc)
            self.abort()
        except OSError as exc:
            log.info("%s: reply failed: %s", self.peer, exc)
            self.abort()
        except Exception:                         # a bug: never leave the client waiting
            log.exception("%s: request failed", self.peer)
            self.abort()

    def _buffer(self, n: int) -> memoryview:
        # Worker threads keep one read buffer of READ_BATCH_BYTES (taken from the process's
        # spare buffers: fresh pages cost zeroing and faults); longer reads get a fresh
        # anonymous mapping, whose pages exist only where the fill writes (not for file data).
        if n > READ_BATCH_BYTES:
            return memoryview(mmap.mmap(-1, n))
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = _take_buffer()
        return memoryview(buf)[:n]

    def _do_reads(self, batch: list, total: int) -> None:
        first = batch[0][1]
        try:
            view = self._buffer(total)
        except (MemoryError, OSError) as exc:     # (mmap: OSError ENOMEM)
            log.warning("%s: no memory for a read of %d bytes at %d: %s", self.peer, total,
                        first, exc)
            for handle, offset, length, _ in batch:
                self._reply_error(handle, NBD_ENOMEM, f"read of {length} bytes at offset "
                                                      f"{offset}: out of memory")
            return
        try:
            plan = self._fill(first, view)
        except Exception as exc:
            if len(batch) > 1:
                # One bad cluster must not fail its neighbours: each read again on its own.
                del view
                for req in batch:
                    self._do_reads([req], req[2])
                return
            log.warning("%s: read of %d bytes at %d failed: %s", self.peer, total, first, exc)
            return self._read_failed(*batch[0], exc, view)
        missing = _missing_file_bytes(plan) if self._plan is not None else None
        if missing:
            # A file cut short since it was opened: the reads that need bytes it no longer
            # holds fail (EIO) before any header of theirs is sent; the others are served.
            keep = []
            for req in batch:
                handle, offset, length, _ = req
                hit = next((m for m in missing if m[0] < offset + length and offset < m[1]),
                           None)
                if hit is None:
                    keep.append(req)
                    continue
                log.warning("%s: read of %d bytes at %d failed: the image file ends at %d",
                            self.peer, length, offset, hit[3])
                self._reply_error(handle, NBD_EIO, f"read of {length} bytes at offset "
                                                   f"{offset} failed: the image file ends at "
                                                   f"{hit[3]}")
            batch = keep
            if not batch:
                return
        self._send_parts(self._read_replies(batch, first, plan, view))

    def _fill(self, first: int, view: memoryview) -> list:
        """Fill `view` with the guest bytes from `first` as the export places them; return
        the read plan (see Export.read_plan)."""
        if self._plan is None:
            self.export.read_into(first, view)
            return [(first, first + len(view), -1, 0)]
        return self._plan(first, view)

    def _read_failed(self, handle: int, offset: int, length: int, flags: int, exc: Exception,
                     view: memoryview) -> None:
        """Reply as qemu-nbd to a read that failed with `exc`.

        A structured read without DF is nbd/server.c nbd_co_send_sparse_read(): it walks block
        status from `offset`, one chunk per run (OFFSET_HOLE where it reads as zeros, else
        OFFSET_DATA), until a query fails (then an error chunk ends the reply) or the read of
        a data run fails (see below). The export's `read_failure` gives the runs before the
        step that fails with `exc` (their bytes are filled again into `view`, which holds the
        whole request). Other reads fail whole, as blk_pread() does, with an error alone
        (also when the runs cannot be sent).
        """
        code = _errno_of(exc)
        runs = None
        if self.structured and not flags & NBD_CMD_FLAG_DF:
            runs = self._runs_before(offset, length, exc, view)
        if runs is None:
            return self._reply_error(handle, code, "reading from file failed")
        runs, plan, query = runs
        parts: list = []
        k = 0
        for start, end, hole in runs:
            if hole:
                parts.append(memoryview(_CHUNK.pack(
                    NBD_STRUCTURED_REPLY_MAGIC, 0, NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12)
                    + _HOLE.pack(start, end - start)))
                continue
            parts.append(memoryview(_DATA_CHUNK.pack(
                NBD_STRUCTURED_REPLY_MAGIC, 0, NBD_REPLY_TYPE_OFFSET_DATA, handle,
                8 + end - start, start)))
            k = _add_bytes(parts, plan, k, start, end, view, offset)
        # A run that cannot be read ends qemu-nbd's reply with no error chunk: it drops the
        # connection (nbd_co_send_sparse_read() fails as if the send had failed). Here the
        # error chunk ends the reply and the connection serves on.
        message = (f"unable to check for holes: {os.strerror(code)}" if query
                   else "reading from file failed")
        parts.append(memoryview(self._error_chunk(handle, code, message)))
        self._send_parts(parts)

    def _runs_before(self, offset: int, length: int, exc: Exception, view: memoryview):
        """(runs, plan, query): the export's runs before the step that fails with `exc` (see
        Export.read_failure), the plan of their bytes (filled into `view`), and whether that
        step is a block status query; None when the export cannot tell, or their bytes
        cannot be read either."""
        failure = getattr(self.export, "read_failure", None)
        try:
            found = None if failure is None else failure(offset, length, exc)
            if found is None:
                return None
            runs, query = found
            if all(hole for _, _, hole in runs):
                return runs, [], query
            plan = self._fill(offset, view[:runs[-1][1] - offset])
        except Exception as again:
            log.warning("%s: read of %d bytes at %d: the runs before the failure: %s",
                        self.peer, length, offset, again)
            return None
        if self._plan is not None and _missing_file_bytes(plan):
            return None
        return runs, plan, query

    def _read_replies(self, batch: list, first: int, plan: list, view: memoryview) -> list:
        """The parts (see _send_parts) of the replies to the reads of `batch`: each one's header,
        then its bytes as `plan` places them: file ranges, zeros, or `view` (the filled buffer
        of guest bytes from `first`)."""
        structured = self.structured
        parts: list = []
        k = 0
        for handle, offset, length, _ in batch:
            if not structured:
                parts.append(memoryview(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)))
                if length == 0:
                    continue                      # the header alone (as qemu-nbd replies)
            elif length == 0:
                parts.append(memoryview(_CHUNK.pack(
                    NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
                    handle, 0)))
                continue
            else:
                parts.append(memoryview(_DATA_CHUNK.pack(
                    NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                    handle, 8 + length, offset)))
            k = _add_bytes(parts, plan, k, offset, offset + length, view, first)
        return parts

    def _do_cache(self, handle: int, offset: int, length: int) -> None:
        try:
            self.export.cache(offset, length)
        except Exception as exc:
            log.warning("%s: cache of %d bytes at %d failed: %s", self.peer, length, offset, exc)
            return self._reply_error(handle, _errno_of(exc), "caching data failed")
        self._send(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle))

    def _do_block_status(self, handle: int, offset: int, length: int, req_one: bool) -> None:
        """One BLOCK_STATUS chunk per selected context, in id order, the last one DONE (as
        nbd/server.c nbd_handle_request()). A context whose extents fail ends the reply with
        an error chunk after the chunks before it (qemu-nbd then goes on with the next
        contexts after its final chunk, which the protocol forbids)."""
        parts = []
        ids = sorted(self.contexts)
        for n, cid in enumerate(ids, 1):
            extents_of = (self.export.allocation if cid == BASE_ALLOCATION_ID
                          else self._extra[cid - 2][1])
            try:
                extents = extents_of(offset, length, 1 if req_one else self.limits.max_extents)
            except Exception as exc:
                # (qemu-nbd: the context's request fails, nothing of what was resolved is sent.)
                log.warning("%s: block status at %d failed: %s", self.peer, offset, exc)
                parts.append(self._error_chunk(handle, _errno_of(exc), "can't get block status"))
                break
            if req_one:
                extents = [(min(extents[0][0], length), extents[0][1])]
            flat = [v for ext in extents for v in ext]
            payload = _U32.pack(cid) + struct.pack(f">{len(flat)}I", *flat)
            parts.append(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC,
                                     NBD_REPLY_FLAG_DONE if n == len(ids) else 0,
                                     NBD_REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload)
        self._send(*parts)


def _add_bytes(parts: list, plan: list, k: int, pos: int, end: int, view: memoryview,
               first: int) -> int:
    """Append to `parts` the guest bytes [pos, end) as the read `plan` places them: file
    ranges, zeros, or `view` (the filled buffer of guest bytes from `first`). The plan is
    searched from its run k on; returns the index of the run holding `pos`."""
    while plan[k][1] <= pos:
        k += 1
    j = k
    while pos < end:
        a, b, fd, host = plan[j]
        stop = b if b < end else end
        if fd >= 0:
            parts.append((fd, host + (pos - a), stop - pos))
        elif fd == -1:
            parts.append(view[pos - first:stop - first])
        else:
            n = stop - pos
            while n > 0:
                parts.append(_ZEROS[:min(n, len(_ZEROS))])
                n -= len(_ZEROS)
        pos = stop
        j += 1
    return k


def _errno_of(exc: Exception) -> int:
    """The NBD error a failed request gets: ENOMEM when memory ran out, else EIO."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return NBD_ENOMEM
    return NBD_EIO


def _missing_file_bytes(plan: list) -> list[tuple[int, int, int, int]]:
    """The guest ranges of a read plan whose file bytes their file no longer holds (an image
    file cut short while served), checked against the files' sizes now: (start, end, fd,
    file size) runs, none when every file run lies within its file. One fstat per file."""
    ends: dict = {}                               # fd -> end of the furthest run
    for a, b, fd, host in plan:
        if fd >= 0 and host + (b - a) > ends.get(fd, -1):
            ends[fd] = host + (b - a)
    sizes = {fd: os.fstat(fd).st_size for fd in ends}
    if all(ends[fd] <= sizes[fd] for fd in ends):
        return []
    return [(a + max(0, sizes[fd] - host), b, fd, sizes[fd]) for a, b, fd, host in plan
            if fd >= 0 and host + (b - a) > sizes[fd]]


_SPARE_BUFFERS: list = []
_SPARE_LOCK = threading.Lock()
_SPARE_MAX = 16                     # read buffers kept for later connections, at most


def _take_buffer() -> bytearray:
    with _SPARE_LOCK:
        if _SPARE_BUFFERS:
            return _SPARE_BUFFERS.pop()
    return bytearray(READ_BATCH_BYTES)


def _give_buffer(buf: bytearray) -> None:
    with _SPARE_LOCK:
        if len(_SPARE_BUFFERS) < _SPARE_MAX:
            _SPARE_BUFFERS.append(buf)


def _meta_export_name(data: bytes) -> tuple[bytes, int]:
    """The export name of NBD_OPT_{LIST,SET}_META_CONTEXT data, and where its queries start."""
    if len(data) < 4:
        raise OptionError(NBD_REP_ERR_INVALID, "malformed metadata context request")
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > NBD_MAX_STRING or 4 + namelen > len(data):
        raise OptionError(NBD_REP_ERR_INVALID, "malformed metadata context request")
    return data[4:4 + namelen], 4 + namelen


def _parse_meta_queries(data: bytes, pos: int, max_queries: int) -> list[bytes]:
    """The queries of NBD_OPT_{LIST,SET}_META_CONTEXT data from `pos` (after the name)."""
    invalid = OptionError(NBD_REP_ERR_INVALID, "malformed metadata context request")
    if pos + 4 > len(data):
        raise invalid
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count * 4 > len(data) - pos:                # (more than the data can hold: malformed)
        raise invalid
    if count > max_queries:
        raise OptionError(NBD_REP_ERR_TOO_BIG, f"more than {max_queries} metadata context queries")
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise invalid
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + qlen > len(data):                 # (over 4096 bytes: skipped by the caller)
            raise invalid
        queries.append(data[pos:pos + qlen])
        pos += qlen
    if pos != len(data):
        raise invalid
    return queries


def _peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "client"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix client"
