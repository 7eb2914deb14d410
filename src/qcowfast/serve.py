"""`qcowfast serve`: a read-only NBD export of an image, and its Python API.

The protocol lives in `qcowfast.nbd`; this module opens the image (same path policy as
everywhere: `qcowfast.open` with `backing_dirs`, `snapshot`), adapts it to the protocol's
`Export` shape and runs the listener: a Unix socket by default, loopback TCP when a port is
given, any other address only when asked explicitly.

Like `qemu-nbd -r -e SHARED`: at most `shared` connections at once (the others wait in the listen
backlog), multi-conn advertised, and without `persistent` the server ends when its last client
that reached the transmission phase has left. The connections share the cores (`nbd.CoreShare`):
each one with requests in flight may have about cores / such connections workers filling reads.

Memory per connection is bounded by `Limits`: read bytes in flight (64 MiB), requests in flight,
and per worker thread a read buffer of at most 4 MiB plus the image's inflate scratch, which
`ImageExport` keeps small by filling reads in 4 MiB windows.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import socket as _socket
import stat
import tempfile
import threading
import time
import urllib.parse
from dataclasses import replace

import numpy as np

from . import nbd
from .blockstatus import BDRV_BLOCK_ZERO, status_runs
from .constants import ExtentKind
from .errors import CorruptImage, QcowError
from .image import RawImage, _cores, _pread_exact
from .mapping import _raw_pieces, metadata_preallocated
from .paths import directories

log = logging.getLogger("qcowfast.serve")
DEFAULT_PORT = 10809
FILL_WINDOW = 4 * 1024 * 1024          # guest bytes filled per step of a read (aligned)
SEND_BUFFER = 4 * 1024 * 1024          # SO_SNDBUF asked for each connection
# Clients beyond `shared` wait in the listen backlog until a connection ends; it must hold a
# burst of them (a Unix socket refuses a connect beyond it at once: "backlog overflowed").
# The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = _socket.SOMAXCONN
_UNALLOCATED, _DATA, _COMPRESSED = (int(ExtentKind.UNALLOCATED), int(ExtentKind.DATA),
                                    int(ExtentKind.COMPRESSED))
_HOLE_ZERO = nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO


class ImageExport:
    """An opened image as an NBD export: reads and base:allocation from its extent stream.

    `read_plan` (what the server uses) leaves DATA runs in their files for the server to
    sendfile, inflates compressed clusters a batch at a time with the GIL released
    (`inflate_into`) and marks zero and unallocated runs as zeros. `read_into` fills a buffer:
    DATA runs are `pread`, compressed clusters inflated, zero runs cleared.
    """

    def __init__(self, image, name: str = "", description: str = "", multi_conn: bool = True,
                 probed: bool = False, allocation_depth: bool = False, bitmaps=()):
        self.image = image
        self.name = name
        self.description = description
        self.multi_conn = multi_conn
        self.size = image.virtual_size
        # qemu-nbd's minimum block size is the export's request alignment: 512 for an image
        # probed as raw (raw-format.c raw_refresh_limits(): "any probed image is restricted
        # to read-modify-write on sub-sector operations"), else 1.
        self.minimum_block_size = 512 if probed and isinstance(image, RawImage) else 1
        cluster = getattr(image, "cluster_size", 4096)
        self.preferred_block_size = min(max(512, cluster), 2 * 1024 * 1024)
        # Each layer's data file and its size, by depth in the chain (for read_plan).
        layers = image.by_depth()
        self._fds = np.full(len(layers), -1, np.int64)
        self._sizes = np.zeros(len(layers), np.int64)
        for depth, node in layers:
            self._fds[depth] = node.data_fd
            self._sizes[depth] = node.data_size
        # Layers whose data runs split at their files' holes, with the flags of a hole: raw
        # files (HOLE|ZERO), and qcow2 layers QEMU takes for metadata-preallocated
        # (qcow2_detect_metadata_preallocation; ZERO, the clusters being allocated).
        self._raw_depths: dict[int, int] = {}
        for depth, node in layers:
            if isinstance(node, RawImage):
                self._raw_depths[depth] = _HOLE_ZERO
            elif metadata_preallocated(node):
                self._raw_depths[depth] = nbd.NBD_STATE_ZERO
        # qemu:allocation-depth of an UNALLOCATED run by its depth: past the end of a shorter
        # backing file (the layer has one), allocated in that backing file; else nowhere.
        top = layers[0][0]
        self._past_short = np.array([d - top + 2 if node.backing is not None else 0
                                     for d, node in layers], np.int64)
        self._top = top
        self.meta_contexts: list = []
        if allocation_depth:
            self.meta_contexts.append((nbd.QEMU_ALLOCATION_DEPTH, self.allocation_depth))
        for bitmap in bitmaps:
            self.meta_contexts.append((nbd.QEMU_DIRTY_BITMAP + bitmap.name.encode(
                "utf-8", "surrogateescape"), bitmap.extents))

    def read_plan(self, offset: int, out) -> list:
        """Where the guest bytes at `offset` (len(out) of them) come from, for the NBD server:
        ascending (start, end, fd, file_offset) runs; DATA runs stay in their file (fd >= 0,
        sent with sendfile), compressed clusters are inflated into `out` (fd -1), zero and
        unallocated runs are zeros (fd -2). A DATA run past the end of its file is read with
        pread, which raises TruncatedImage (an EIO reply) as read_into does."""
        arr = np.frombuffer(out, np.uint8)
        plan: list = []
        pos, end = offset, offset + len(arr)
        while pos < end:
            # One window when the read fits in one (a batch of a sequential copy, whatever its
            # alignment), else aligned windows as in read_into.
            stop = end if len(arr) <= FILL_WINDOW else min(
                end, (pos // FILL_WINDOW + 1) * FILL_WINDOW)
            self._plan_window(pos, arr[pos - offset:stop - offset], plan)
            pos = stop
        return plan

    def _plan_window(self, start: int, out: np.ndarray, plan: list) -> None:
        image = self.image
        comp = []
        for chunk in image._runs(start, start + len(out)):
            g, n, k, host, depth = chunk.guest, chunk.length, chunk.kind, chunk.host, chunk.depth
            if not len(g):
                continue
            data, compressed = k == _DATA, k == _COMPRESSED
            code = np.where(compressed, -1, -2)
            if data.any():
                code[data] = self._fds[depth[data]]
                short = data & (host + n > self._sizes[depth])
                for i in np.flatnonzero(short).tolist():
                    layer = image.layer(int(depth[i]))
                    a = int(g[i]) - start
                    _pread_exact(layer.data_fd, memoryview(out[a:a + int(n[i])]), int(host[i]),
                                 f"{layer.filename}: data for guest offset {int(g[i]):#x}",
                                 layer.data_size)
                    code[i] = -1
            if compressed.any():
                comp.append(tuple(a[compressed] for a in (g, n, host, chunk.csize, depth)))
            # One plan run per stretch of the same source (file ranges contiguous on disk).
            cut = np.empty(len(g), bool)
            cut[0] = True
            cut[1:] = (code[1:] != code[:-1]) | (
                (code[1:] >= 0) & (host[1:] != host[:-1] + n[:-1]))
            idx = np.flatnonzero(cut)
            ends = np.append(g[idx[1:]], g[-1] + n[-1])
            plan.extend(zip(g[idx].tolist(), ends.tolist(), code[idx].tolist(),
                            host[idx].tolist()))
        if comp:
            cols = [np.concatenate(c) for c in zip(*comp)] if len(comp) > 1 else comp[0]
            self._inflate(start, out, *cols)

    def read_into(self, offset: int, out) -> None:
        """Fill `out` (a writable buffer) with the guest bytes at `offset`."""
        arr = np.frombuffer(out, np.uint8)
        pos, end = offset, offset + len(arr)
        while pos < end:
            # Windows end on FILL_WINDOW boundaries (a multiple of every cluster size), so a
            # compressed cluster is only ever split at the request's own edges.
            stop = min(end, (pos // FILL_WINDOW + 1) * FILL_WINDOW)
            self._fill(pos, arr[pos - offset:stop - offset])
            pos = stop

    def _fill(self, start: int, out: np.ndarray) -> None:
        image = self.image
        end = start + len(out)
        view = memoryview(out)
        comp = []
        for chunk in image._runs(start, end):
            g, n, k = chunk.guest, chunk.length, chunk.kind
            data, compressed = k == _DATA, k == _COMPRESSED
            zero = ~(data | compressed)
            for a, b in zip((g[zero] - start).tolist(), (g[zero] + n[zero] - start).tolist()):
                out[a:b] = 0
            for gg, nn, hh, dd in zip(g[data].tolist(), n[data].tolist(),
                                      chunk.host[data].tolist(), chunk.depth[data].tolist()):
                layer = image.layer(dd)
                _pread_exact(layer.data_fd, view[gg - start:gg - start + nn], hh,
                             f"{layer.filename}: data for guest offset {gg:#x}",
                             layer.data_size)
            if compressed.any():
                comp.append(tuple(a[compressed] for a in (g, n, chunk.host, chunk.csize,
                                                          chunk.depth)))
        if comp:
            cols = [np.concatenate(c) for c in zip(*comp)] if len(comp) > 1 else comp[0]
            self._inflate(start, out, *cols)

    def _inflate(self, start, out, g, n, host, csize, depth) -> None:
        for d in np.unique(depth).tolist():
            sel = depth == d
            gs, ns, hs, cz = g[sel], n[sel], host[sel], csize[sel]
            layer = self.image.layer(d)
            cs = layer.cluster_size
            within = gs % cs
            whole = (within == 0) & (ns == cs)
            if whole.any():
                layer.inflate_into(hs[whole], cz[whole], gs[whole], out, gs[whole] - start)
            part = np.flatnonzero(~whole)
            if not len(part):
                continue
            # Clusters cut by the request's edges (or by a layer above, with subclusters):
            # inflate each cluster once into scratch, copy the pieces asked for.
            uniq, first, inverse = np.unique(hs[part], return_index=True, return_inverse=True)
            scratch = np.empty(len(uniq) * cs, np.uint8)
            layer.inflate_into(uniq, cz[part][first], gs[part][first] - within[part][first],
                               scratch, np.arange(len(uniq), dtype=np.int64) * cs)
            for gg, nn, w, j in zip(gs[part].tolist(), ns[part].tolist(),
                                    within[part].tolist(), inverse.tolist()):
                src = j * cs + w
                out[gg - start:gg - start + nn] = scratch[src:src + nn]

    def allocation(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """base:allocation extents of [offset, offset + length): data and compressed clusters
        are allocated (flags 0), everything else reads as zeros and is a hole (HOLE|ZERO), as
        qemu-nbd reports a qcow2 chain; so are the holes of a raw file (or raw backing file).

        As nbd/server.c blockstatus_to_extents() builds its reply: QEMU's block status runs
        of the whole request, merged while their flags agree, until `max_extents` extents are
        full and the run after them has been asked for. A bad table entry met by any of those
        queries fails the whole request (raised), however much was resolved before it.
        """
        end = min(offset + length, self.size)
        if self._unallocated(offset, end):
            return [(end - offset, _HOLE_ZERO)]     # (one extent, as qemu-nbd's answer)
        return self._before_failure(self._extents, offset, end, max_extents)

    def _before_failure(self, build, offset: int, end: int, max_extents: int) -> list:
        """build(offset, end, max_extents)'s extents; where a query meets a bad table entry,
        those before it if they already fill the reply (qemu-nbd answers then), else the
        CorruptImage. Runs of one L2 slice are resolved together: the ones before the query
        that fails are redone."""
        try:
            return build(offset, end, max_extents)[0]
        except CorruptImage as exc:
            stop = self._failing_query(exc, offset)
            if stop is None:
                raise
            out, full = build(offset, stop, max_extents)
            if full:
                return out
            raise

    def allocation_depth(self, offset: int, length: int, max_extents: int
                         ) -> list[tuple[int, int]]:
        """qemu:allocation-depth extents of [offset, offset + length): the depth in the chain
        of the layer allocating each run (1 the top; data, compressed and zero clusters are
        allocated, and so is a shorter backing file past its end), 0 where none does.

        nbd/server.c blockalloc_to_extents(): bdrv_is_allocated_above() runs merged while
        their depth agrees, until `max_extents` extents are full and the run after them has
        been asked for; a bad table entry one of those queries meets fails the request."""
        end = min(offset + length, self.size)
        if (all(layer.virtual_size >= end for layer in self.image.chain)
                and self._unallocated(offset, end)):
            return [(end - offset, 0)]
        return self._before_failure(self._depth_extents, offset, end, max_extents)

    def _depth_extents(self, start: int, end: int, max_extents: int) -> tuple[list, bool]:
        """(extents, full) of allocation depths, as _extents gives base:allocation's."""
        out: list[tuple[int, int]] = []
        cur_start, cur = start, -1
        for chunk in self.image._runs(start, end):
            unalloc = chunk.kind == _UNALLOCATED
            rel = chunk.depth - self._top
            depth = np.where(unalloc, self._past_short[rel], rel + 1)
            prev = np.concatenate(([cur], depth[:-1]))
            for i in np.flatnonzero(depth != prev).tolist():
                s = int(chunk.guest[i])
                if cur >= 0 and s > cur_start:
                    out.append((s - cur_start, cur))
                    if len(out) >= max_extents:
                        return out, True
                cur_start, cur = s, int(depth[i])
        if end > cur_start:
            out.append((end - cur_start, cur))
        return out, False

    def read_failure(self, offset: int, length: int, exc: Exception) -> tuple | None:
        """(runs, query): the (start, end, hole) runs qemu-nbd's structured read of
        [offset, offset + length) sends as chunks before it fails with `exc`, and whether
        a block status query fails (at a bad table entry), else the read of the next run (a
        compressed stream that does not inflate, say); None for memory running out, or when
        every run reads. nbd/server.c nbd_co_send_sparse_read() sends a chunk per block
        status run (a hole where it reads as zeros), each data run once it has read it."""
        end = offset + length
        stop = self._failing_query(exc, offset)
        if stop is not None:
            return [(s.start, s.end, bool(s.flags & BDRV_BLOCK_ZERO)) for s in
                    status_runs(self.image, offset, min(stop, end), {})], True
        if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
            return None
        runs: list = []
        scratch = None
        for s in status_runs(self.image, offset, end, {}):
            hole = bool(s.flags & BDRV_BLOCK_ZERO)
            if not hole:
                scratch = scratch if scratch is not None else bytearray(min(FILL_WINDOW,
                                                                            length))
                if not self._reads(s.start, s.end, scratch):
                    return runs, False
            runs.append((s.start, s.end, hole))
        return None

    def _reads(self, start: int, end: int, scratch: bytearray) -> bool:
        """Whether the guest bytes of [start, end) read (a window of `scratch` at a time)."""
        view = memoryview(scratch)
        try:
            for pos in range(start, end, len(view)):
                self.read_into(pos, view[:min(len(view), end - pos)])
        except Exception:                   # (the error is the one the read met)
            return False
        return True

    def _failing_query(self, exc: CorruptImage, start: int) -> int | None:
        """Where QEMU's block status query that meets `exc` starts, in a walk from `start`
        (None when `exc` is no bad table entry)."""
        if getattr(exc, "guest_offset", None) is None or not hasattr(exc, "_bad_layer"):
            return None
        return max(start, self.image._failing_query(exc, start))

    def _extents(self, start: int, end: int, max_extents: int) -> tuple[list, bool]:
        """(extents, full): the merged extents of [start, end); full when `max_extents` of
        them ended before `end` (the run after them, with other flags, ends the walk)."""
        out: list[tuple[int, int]] = []
        cur_start, cur_flag = start, -1
        for chunk in self.image._runs(start, end):
            k = chunk.kind
            flags = np.where((k == _DATA) | (k == _COMPRESSED), 0, _HOLE_ZERO)
            starts = chunk.guest
            if self._raw_depths:
                starts, flags = self._raw_holes(chunk, flags)
            prev = np.concatenate(([cur_flag], flags[:-1]))
            for i in np.flatnonzero(flags != prev).tolist():
                s = int(starts[i])
                if cur_flag >= 0 and s > cur_start:
                    out.append((s - cur_start, cur_flag))
                    if len(out) >= max_extents:
                        return out, True
                cur_start, cur_flag = s, int(flags[i])
        if end > cur_start:
            out.append((end - cur_start, cur_flag))
        return out, False

    def cache(self, offset: int, length: int) -> None:
        """Raise where qemu-nbd's NBD_CMD_CACHE of [offset, offset + length) fails.

        block/io.c bdrv_co_do_copy_on_readv() with BDRV_REQ_PREFETCH: over the request
        rounded out to (sub)clusters, what the top layer allocates is skipped, the rest is
        read through the chain; a bad entry of the top layer, or a read that fails, fails it.
        (qemu-nbd -r then writes what it read into the top layer, which fails with EPERM where
        that needs a new cluster or table; nothing is written here.)
        """
        image = self.image
        if isinstance(image, RawImage):
            return                          # (allocated all through: nothing is read)
        sub = image.cluster_size >> (5 if image.header.extended_l2 else 0)
        start = offset // sub * sub
        end = min(-(-(offset + length) // sub) * sub, self.size)
        buf = None
        for chunk in image._own_runs(start, end):
            holes = chunk.kind == _UNALLOCATED
            for g, n in zip(chunk.guest[holes].tolist(), chunk.length[holes].tolist()):
                if buf is None:
                    buf = memoryview(bytearray(min(end - start, FILL_WINDOW)))
                for a in range(g, g + n, len(buf)):
                    self.read_into(a, buf[:min(len(buf), g + n - a)])

    def _unallocated(self, start: int, end: int) -> bool:
        """True when no layer of the chain has an L2 table (or raw bytes) in [start, end):
        it all reads as zeros, told from the L1 tables alone (a huge empty image is mapped
        in thousands of requests; classifying each one's runs cost 50 us per GiB)."""
        for layer in self.image.chain:
            stop = min(end, layer.virtual_size)
            if stop <= start:
                continue                # past a shorter backing file: zeros
            if isinstance(layer, RawImage) or layer.header.has_data_file:
                return False
            per = layer._l2_per_l1
            if layer._l2_offsets[start // per:-(-stop // per)].any():
                return False
        return True

    def _raw_holes(self, chunk, flags):
        """(starts, flags) with the data runs of raw and metadata-preallocated layers split
        at their files' holes (SEEK_DATA/SEEK_HOLE), which qemu-nbd reports as HOLE|ZERO
        (file-posix block status); in a preallocated layer's data clusters, as ZERO only
        (qcow2 answers DATA, the file's hole adds ZERO: BDRV_BLOCK_RECURSE). Bytes past the
        file's current end (cut before or while served) are data: qemu-nbd reports them as a
        hole (SEEK_DATA fails with ENXIO) and reads zeros, but here their read fails, and a
        ZERO flag would let a client copy zeros without reading them."""
        raw = np.isin(chunk.depth, list(self._raw_depths)) & (chunk.kind == _DATA)
        if not raw.any():
            return chunk.guest, flags
        starts: list[int] = []
        out: list[int] = []
        sizes: dict[int, int] = {}          # fd -> its file's size now (one fstat per call)
        for i, (g, n, h, d, f) in enumerate(zip(chunk.guest.tolist(), chunk.length.tolist(),
                                                chunk.host.tolist(), chunk.depth.tolist(),
                                                flags.tolist())):
            if not raw[i]:
                starts.append(g)
                out.append(f)
                continue
            fd = self.image.layer(d).data_fd
            if fd not in sizes:
                sizes[fd] = os.fstat(fd).st_size
            hole = self._raw_depths[d]
            for s, length, is_data in _raw_pieces(fd, h, n):
                cut = min(max(s, sizes[fd]), s + length)
                if cut > s:
                    starts.append(g + s - h)
                    out.append(0 if is_data else hole)
                if cut < s + length:                # past the end of the file: data
                    starts.append(g + cut - h)
                    out.append(0)
        return np.array(starts, np.int64), np.array(out, np.int64)


class ExportRefused(QcowError, ValueError):
    """The export cannot be made as asked (a bitmap to export that is missing or unusable);
    `qemu_nbd` holds qemu-nbd's words."""

    def __init__(self, message: str, qemu_nbd: str):
        super().__init__(message)
        self.qemu_nbd = qemu_nbd


def _exported_bitmaps(image, names) -> list:
    """The ExportedBitmap of each name, as nbd/server.c nbd_export_create() finds them (down
    the chain) and checks them (bdrv_dirty_bitmap_check(): a bitmap in use when the image was
    opened is loaded as inconsistent). Opening the image has checked the bitmaps of every
    qcow2 layer as QEMU does (qcow2_load_dirty_bitmaps(): snapshots.check_at_open)."""
    from .bitmaps import ExportedBitmap, find_bitmap
    layers = [layer for layer in image.chain if not isinstance(layer, RawImage)]
    out = []
    for name in names:
        found = find_bitmap(layers, name)
        if found is None:
            raise ExportRefused(f"no bitmap named {name!r} in the image or its backing chain",
                                f"Bitmap '{name}' is not found")
        layer, bm = found
        if bm.in_use:
            raise ExportRefused(f"bitmap {name!r} is in use (inconsistent)",
                                f"Bitmap '{name}' is inconsistent and cannot be used")
        size = layer.header.size // 512 * 512
        out.append(ExportedBitmap(layer._fd, bm, layer.cluster_size, size))
    return out


def _open_image(path, fmt, backing_dirs, snapshot, force_share):
    from .image import open_source
    return open_source(path, fmt, backing_dirs=directories(backing_dirs), snapshot=snapshot,
                       force_share=force_share)


class NBDServer:
    """A read-only NBD server for one image; runs in background threads.

    Parameters
    ----------
    path : str or os.PathLike
        The image (opened with `qcowfast.open` and its path policy).
    socket : path, optional
        Listen on this Unix socket. Default, when neither `socket` nor `port` is given: a Unix
        socket in a new private temporary directory (see `address`).
    bind : str
        The TCP address to listen on when `port` is given: loopback unless another address
        is asked for explicitly.
    port : int, optional
        Listen on TCP at `bind`:`port` (qemu-nbd's port is 10809; 0 picks a free port).
    export_name : str
        The export's name ("" is the default export clients get without naming one).
    description : str
        The export's description (qemu-nbd -D), sent to clients that ask; none by default.
    snapshot : str, optional
        Serve this internal snapshot (id or name) instead of the current state.
    backing_dirs : iterable of paths
        Directories trusted to hold backing and data files, as for `qcowfast.open`.
    shared : int
        Connections served at once (qemu-nbd -e; 0: no limit); further clients wait in the
        backlog. Multi-conn is advertised unless it is 1.
    persistent : bool
        Keep serving after the last client leaves (qemu-nbd -t). Without it, the server
        ends when its last client that reached the transmission phase disconnects.
    force_share : bool
        Open the image even when a running QEMU holds its write lock (qemu-img -U).
    format : None, "qcow2" or "raw"
        None probes like qemu-img (QCOW2, foreign formats refused by name, else raw).
    allocation_depth : bool
        Also offer the qemu:allocation-depth metadata context (qemu-nbd -A).
    bitmaps : sequence of str
        Also offer qemu:dirty-bitmap:NAME for each of these persistent bitmaps of the image
        (or of its backing chain), in this order (qemu-nbd -B, whose contexts come in the
        reverse order of its options). A missing or inconsistent one fails `start()`
        (ExportRefused).
    limits : qcowfast.nbd.Limits, optional
        Per-connection bounds; `handshake_timeout`, `idle_timeout`, `max_request` and
        `workers` override single fields.

    Use as a context manager, or `start()` ... `stop()`; `wait()` blocks until a
    non-persistent server's last client has left.
    """

    def __init__(self, path, *, socket=None, bind: str = "127.0.0.1", port=None,
                 export_name: str = "", description: str = "",
                 snapshot=None, backing_dirs=(), shared: int = 8, persistent: bool = False,
                 force_share: bool = False, format: str | None = None,
                 allocation_depth: bool = False, bitmaps=(),
                 limits: nbd.Limits | None = None,
                 handshake_timeout: float | None = None, idle_timeout: float | None = None,
                 max_request: int | None = None, workers: int | None = None):
        if socket is not None and port is not None:
            raise ValueError("give either a Unix socket or a TCP port, not both")
        from .arguments import boolean, integer
        shared = integer(shared, "shared", 0, what="0 (no limit) or more")
        port = integer(port, "port", 0, 65535, none=True, what="a TCP port (0 to 65535)")
        persistent = boolean(persistent, "persistent")
        force_share = boolean(force_share, "force_share")
        allocation_depth = boolean(allocation_depth, "allocation_depth")
        if not isinstance(export_name, str):
            raise TypeError(f"export_name must be a str, not {type(export_name).__name__}")
        if not isinstance(bind, str):
            raise TypeError(f"bind must be a str, not {type(bind).__name__}")
        if len(export_name.encode()) > nbd.NBD_MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")
        # Workers per connection: enough to keep every core inflating with the GIL released.
        lim = limits or nbd.Limits(workers=max(4, min(8, (os.cpu_count() or 1) + 2)))
        overrides = {k: v for k, v in (("handshake_timeout", handshake_timeout),
                                       ("idle_timeout", idle_timeout),
                                       ("max_request", max_request), ("workers", workers))
                     if v is not None}
        if "max_request" in overrides and not 512 <= overrides["max_request"] <= 1 << 30:
            raise ValueError("max_request must be between 512 bytes and 1 GiB")
        self.limits = replace(lim, **overrides)
        self.path = os.fspath(path)
        self.export_name = export_name
        self.snapshot = snapshot
        self.backing_dirs = directories(backing_dirs)
        self.shared = int(shared)           # 0: no limit, as qemu-nbd -e 0
        self.description = description
        self.persistent = persistent
        self.force_share = force_share
        self.format = format
        self.allocation_depth = bool(allocation_depth)
        self.bitmaps = [bitmaps] if isinstance(bitmaps, str) else list(bitmaps)
        self._socket_path = None if socket is None else os.fspath(socket)
        self._tcp = port is not None
        self._bind = bind
        self._port = None if port is None else int(port)
        self._tmpdir = None
        self._image = None
        self._listener = None
        self._wake_r = self._wake_w = -1
        self._accept_thread = None
        self._lock = threading.Condition()
        self._conns: dict = {}            # Connection -> thread
        self._share = nbd.CoreShare(_cores())
        self._done = threading.Event()
        self._started = False
        self._stopped = False
        self.address = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> "NBDServer":
        """Open the image, listen, and start accepting clients; return self.

        Raises QcowError if the image cannot be opened, OSError (its message naming the
        socket path or address:port) if the address cannot be listened on."""
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        try:
            self._image = _open_image(self.path, self.format, self.backing_dirs,
                                      self.snapshot, self.force_share)
            self.export = ImageExport(self._image, self.export_name, self.description,
                                      multi_conn=self.shared != 1, probed=self.format is None,
                                      allocation_depth=self.allocation_depth,
                                      bitmaps=_exported_bitmaps(self._image, self.bitmaps))
            self._listener = self._listen()
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self.stop()
            raise
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name="nbd-accept")
        self._accept_thread.start()
        return self

    def _listen(self) -> _socket.socket:
        if self._tcp:
            family = _socket.AF_INET6 if ":" in self._bind else _socket.AF_INET
            host = f"[{self._bind}]" if family == _socket.AF_INET6 else self._bind
            where = f"{host}:{self._port}"
            sock = _socket.socket(family, _socket.SOCK_STREAM)
            try:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                sock.bind((self._bind, self._port))
                sock.listen(LISTEN_BACKLOG)
            except OSError as exc:
                sock.close()
                raise _listen_error(exc, where) from exc
            except BaseException:
                sock.close()
                raise
            host, port = sock.getsockname()[:2]
            self.address = (host, port)
            return sock
        if self._socket_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="qcowfast-nbd-")
            self._socket_path = os.path.join(self._tmpdir, "nbd.sock")
        else:
            _clear_stale_socket(self._socket_path)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(self._socket_path)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise _listen_error(exc, self._socket_path) from exc
        except BaseException:
            sock.close()
            raise
        self._owns_socket_file = os.stat(self._socket_path)
        # Removed by this name when the server stops, wherever the process has moved since
        # (qcowfast serve --fork moves to /, as qemu-nbd's daemon does).
        self._socket_abspath = os.path.abspath(self._socket_path)
        self.address = self._socket_path
        return sock

    @property
    def uri(self) -> str:
        """The NBD URI of the export (nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME)."""
        name = urllib.parse.quote(self.export_name, safe="")
        if isinstance(self.address, tuple):
            host, port = self.address
            host = f"[{host}]" if ":" in host else host
            return f"nbd://{host}:{port}/{name}"
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(self.address, safe='/')}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the server is done (stopped, or its last client left); True if done."""
        return self._done.wait(timeout)

    def serve_forever(self) -> None:
        """Start if needed, serve until done (see `persistent`), then stop."""
        if not self._started:
            self.start()
        try:
            while not self._done.wait(0.5):
                pass
        finally:
            self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every connection (replies in flight are sent), close the image
        and remove the Unix socket. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._done.set()
            self._lock.notify_all()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        accept = self._accept_thread
        if accept is not None and accept is not threading.current_thread():
            accept.join(timeout)
        with self._lock:
            conns = [(c, t) for c, t in self._conns.items()
                     if t is not threading.current_thread() and t.ident is not None]
        for conn, _ in conns:
            conn.shutdown()                   # replies in flight are still sent
        deadline = time.monotonic() + timeout
        for conn, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                conn.abort()                  # a client that does not take its replies
                thread.join(2.0)
        lingering = any(thread.is_alive() for _, thread in conns)
        if self._listener is not None:
            self._listener.close()
            self._remove_socket_file()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._image is not None and not lingering:
            # Never close descriptors a lingering worker may still pread (a reused number
            # would read another file); such daemon threads end with the process.
            self._image.close()
            self._image = None

    def _remove_socket_file(self) -> None:
        path = getattr(self, "_socket_abspath", None)
        owned = getattr(self, "_owns_socket_file", None)
        if path is None or owned is None:
            return
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (owned.st_dev, owned.st_ino):
                os.unlink(path)
        except OSError:
            pass
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "NBDServer":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- connections -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        lsock = self._listener
        lsock.setblocking(False)
        while True:
            with self._lock:
                while not self._stopped and self.shared and len(self._conns) >= self.shared:
                    self._lock.wait()
                if self._stopped:
                    return
            poller = select.poll()
            poller.register(lsock, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._done.wait(0.1)        # out of resources: back off, keep serving
                    continue
                raise
            try:
                # Room for a whole batch of replies (4 MiB): a worker goes on to fill the next
                # batch while the client takes this one.
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            if sock.family != _socket.AF_UNIX:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            conn = nbd.Connection(sock, self.export, self.limits, share=self._share)
            thread = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                                      name=f"nbd-{conn.peer}")
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                self._conns[conn] = thread      # before start: the thread removes it
            try:
                thread.start()
            except RuntimeError as exc:         # no memory or threads left: as EMFILE
                log.warning("%s: cannot start a connection thread: %s", conn.peer, exc)
                with self._lock:
                    self._conns.pop(conn, None)
                sock.close()
                self._done.wait(0.1)

    def _serve_connection(self, conn: nbd.Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                # qemu-nbd (nbd_client_closed): without --persistent, the last client that
                # negotiated ends the server; failed handshakes do not.
                if conn.negotiated and not self._conns and not self.persistent:
                    self._done.set()
                    self._stopped_accepting()
                self._lock.notify_all()

    def _stopped_accepting(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass


def _listen_error(exc: OSError, where: str) -> OSError:
    """`exc` (from bind or listen) as an OSError of the same errno naming the address."""
    reason = exc.strerror or str(exc)
    if exc.errno is None or isinstance(exc, _socket.gaierror):
        # Raised without an errno ("AF_UNIX path too long") or with a resolver's code.
        return OSError(f"cannot listen on {where}: {reason}")
    return OSError(exc.errno, f"cannot listen on {where}: {reason}")   # FileNotFoundError...


def _clear_stale_socket(path: str) -> None:
    """Remove a Unix socket nobody listens on; refuse any other existing file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket (remove it, or choose "
                              "another socket path)", path)
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, "another server listens on this socket", path)


def serve(path, *, socket=None, bind: str = "127.0.0.1", port=None, export_name: str = "",
          description: str = "",
          snapshot=None, backing_dirs=(), shared: int = 8, persistent: bool = False,
          force_share: bool = False, format: str | None = None,
          allocation_depth: bool = False, bitmaps=(),
          handshake_timeout: float | None = None, idle_timeout: float | None = None,
          ready=None) -> None:
    """Serve an image read-only over NBD until the last client leaves (or forever).

    Blocks. Parameters are those of `NBDServer`; `ready(server)` is called once the server
    listens (e.g. to print `server.uri`). Without a socket or port it listens on a Unix socket
    in a new temporary directory. Raises QcowError if the image cannot be opened,
    OSError if the address cannot be bound.
    """
    server = NBDServer(path, socket=socket, bind=bind, port=port, export_name=export_name,
                       description=description, snapshot=snapshot, backing_dirs=backing_dirs, shared=shared,
                       persistent=persistent, force_share=force_share, format=format,
                       allocation_depth=allocation_depth, bitmaps=bitmaps,
                       handshake_timeout=handshake_timeout, idle_timeout=idle_timeout)
    server.start()
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        server.stop()


__all__ = ["NBDServer", "ImageExport", "ExportRefused", "serve", "DEFAULT_PORT"]
