"""Conversion: plan units of guest space from the extent stream, fill them on all cores (pread /
batch inflate with the GIL released), write only what is not zero. Raw output is executed here
(`_execute_file` for new files, `_execute_ordered` for in-place and O_DIRECT targets, and
`_convert_stream` for streams); QCOW2 output is handed to `writer.write_qcow2`. Where the bytes go
and how they are published (temporary file, rename, block devices, no-clobber) is `output.py`.

Memory bound: each of `threads` workers holds one unit buffer (UNIT_SIZE) and the compressed
input of one unit (less than a unit for real images, at most 3 units if crafted); ordered
outputs (streams, in place, O_DIRECT) hold threads + 1 unit buffers. With the default 8 MiB unit
that is about threads x 16 MiB + 8 MiB, plus the L2 caches (at most 32 MiB per chain layer) and
the interpreter (~40 MiB): under 256 MiB for 4 threads.
"""
from __future__ import annotations

import errno
import functools
import mmap
import os
import threading
import time
from collections import deque

try:                                        # queue's own import costs a start-up 1 ms (heapq)
    from _queue import SimpleQueue
except ImportError:                         # pragma: no cover - other Pythons
    from queue import SimpleQueue

from . import _plain
from ._record import record
from .arguments import boolean, callback, integer
from .buffers import Borrowed
from ._lazy import LazyModule
from .constants import MAX_SPARSE_SIZE, ExtentKind
from .lending import LENDER, Threads
from .errors import AllocationFailed, CorruptImage, OutputError, QcowError, TruncatedImage
from .image import Image, _pread_exact, current_size, file_size_now, open_source
from .output import (WRITE_ERRNOS, FileOutput, aligned_empty, check_stream, open_stream,
                     stream_target)

# numpy and the table kernels load on first use: the _plain path never needs them.
np = LazyModule("numpy", __name__, "np")
_tables = LazyModule("qcowfast._tables", __name__, "_tables")
_fill = LazyModule("qcowfast._fill", __name__, "_fill")

UNIT_SIZE = 8 * 1024 * 1024
MAX_THREADS = 64                    # worker threads of one conversion, at most (each holds a
                                    # unit buffer)
_DIRECT_MIN = 256 * 1024                    # DATA runs this long are written from a mapping
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# copy_file_range() refuses: across file systems, on file systems without it, in old kernels.
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}
DEFAULT_MAX_STREAM_SIZE = 1 << 40           # streams longer than 1 TiB must be asked for
_DATA, _COMPRESSED = int(ExtentKind.DATA), int(ExtentKind.COMPRESSED)
_ZEROS = bytes(1 << 20)
_GAP_SLICE = 1 << 30                        # in-place holes are zeroed (and reported) per GiB


@record
class ConvertResult:
    """What a conversion did: sizes in bytes, wall time in seconds."""
    virtual_size: int
    bytes_written: int
    bytes_sparse: int
    seconds: float
    threads: int


def _plan(image: Image, unit: int):
    """Yield (unit_index, runs) for every unit holding DATA or COMPRESSED runs, in order.

    runs = (start, end, kind, host, csize, depth) int64 arrays; DATA runs are cut at unit
    boundaries (compressed clusters never cross one: units are whole clusters).
    """
    from .mapping import metadata_preallocated
    current, parts = -1, []
    claims = _Claims(image)
    holes_read_zero = {depth: layer.data_fd for depth, layer in image.by_depth()
                       if isinstance(layer, Image) and metadata_preallocated(layer)}
    for chunk in image._runs(0, image.virtual_size):
        sel = (chunk.kind == _DATA) | (chunk.kind == _COMPRESSED)
        if not sel.any():
            continue
        g, n, k, h, c, d = chunk if sel.all() else (a[sel] for a in chunk)
        claims.add(g, n, k, h, d)
        if holes_read_zero:
            g, n, k, h, c, d = _without_host_holes((g, n, k, h, c, d), holes_read_zero)
            if not len(g):
                continue
        u = int(g[0]) // unit
        if u == int(g[-1] + n[-1] - 1) // unit:
            # The whole chunk lies in one unit (the usual case): no cutting.
            if u != current:
                if parts:
                    yield current, _concat(parts)
                current, parts = u, []
            parts.append((g, g + n, k.astype(np.int64), h, c, d))
            continue
        u0 = g // unit
        u1 = (g + n - 1) // unit
        cnt = u1 - u0 + 1
        idx = np.repeat(np.arange(len(g)), cnt)
        j = np.arange(len(idx)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        ustart = (u0[idx] + j) * unit
        s = np.maximum(g[idx], ustart)
        e = np.minimum(g[idx] + n[idx], ustart + unit)
        host = np.where(h[idx] >= 0, h[idx] + (s - g[idx]), h[idx])
        runs = (s, e, k[idx].astype(np.int64), host, c[idx], d[idx])
        ui = s // unit
        cuts = np.flatnonzero(np.diff(ui)) + 1
        for a, b in zip(np.concatenate(([0], cuts)).tolist(),
                        np.concatenate((cuts, [len(ui)])).tolist()):
            u = int(ui[a])
            if u != current:
                if parts:
                    yield current, _concat(parts)
                current, parts = u, []
            parts.append(tuple(x[a:b] for x in runs))
    if parts:
        yield current, _concat(parts)


def _without_host_holes(runs, fds: dict):
    """`runs` without the host file's holes in the DATA runs of metadata-preallocated layers
    (`fds`: depth -> data file): QEMU reads them as zeros (qcow2_detect_metadata_preallocation,
    then block status with BDRV_BLOCK_RECURSE), and reading them costs as much as data."""
    from .mapping import _raw_pieces
    g, n, k, h, c, d = runs
    sel = (k == _DATA) & np.isin(d, list(fds))
    if not sel.any():
        return runs
    sizes = {depth: current_size(fd) for depth, fd in fds.items()}
    rows = []
    for i, (gi, ni, ki, hi, ci, di) in enumerate(zip(*(a.tolist() for a in runs))):
        if not sel[i] or hi + ni > sizes[di]:
            # (A file cut below its data since it was opened: reading reports that.)
            rows.append((gi, ni, ki, hi, ci, di))
            continue
        for s, m, is_data in _raw_pieces(fds[di], hi, ni):
            if is_data:
                rows.append((gi + s - hi, m, ki, s, ci, di))
    if not rows:
        return tuple(a[:0] for a in runs)
    return tuple(np.array(col, dtype=a.dtype) for col, a in zip(zip(*rows), runs))


class _Claims:
    """Refuse a host cluster that two guest clusters of one L1 view share (issue 10 item 11).

    QEMU never writes one data cluster, or one compressed stream, twice into the L1/L2 tables
    of one view (qemu-img check counts such a cluster with a wrong refcount or a COPIED flag
    it cannot have); a crafted image that does would declare far more guest data than its file
    holds. Per qcow2 layer, the host byte ranges of DATA runs and the start bytes of compressed
    streams are kept as sorted arrays, merged like the levels of an LSM tree, so memory follows
    the runs that exist (16 bytes per run of contiguous data, 8 per compressed cluster) and
    the cost is O(n log n) over the whole plan.
    """

    def __init__(self, image):
        self.image = image
        self.layers = {}
        for depth, node in image.by_depth():
            if hasattr(node, "_l2_offsets"):
                self.layers[depth] = node
        self.levels = {}                 # (depth, kind) -> list of (starts, ends) arrays
        self.pending = {}                # (depth, kind) -> (batches above all levels, high mark)
        self.last = {}                   # depth -> (coffset, cluster start) of the last stream

    def add(self, g, n, k, h, d) -> None:
        d0 = int(d[0])
        one = bool((d == d0).all())
        for depth in [d0] if one else np.unique(d).tolist():
            layer = self.layers.get(depth)
            if layer is None:
                continue
            sel = True if one else d == depth
            data = sel & (k == _DATA)
            if data.any():
                self._push(depth, _DATA, h[data], h[data] + n[data])
            comp = np.flatnonzero(sel & (k == _COMPRESSED))
            if len(comp):
                # A compressed cluster seen through several holes of upper layers arrives in
                # pieces: count each cluster once.
                co = h[comp]
                cstart = g[comp] - g[comp] % layer.cluster_size
                prev = self.last.get(depth, (-1, -1))
                first = np.ones(len(comp), bool)
                first[0] = (int(co[0]), int(cstart[0])) != prev
                first[1:] = (co[1:] != co[:-1]) | (cstart[1:] != cstart[:-1])
                self.last[depth] = (int(co[-1]), int(cstart[-1]))
                if first.any():
                    self._push(depth, _COMPRESSED, co[first], co[first] + 1)

    def _push(self, depth, kind, starts, ends) -> None:
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        bad = np.flatnonzero(s[1:] < e[:-1])
        if len(bad):
            self._refuse(depth, kind, int(s[bad[0] + 1]))
        key = (depth, kind)
        levels = self.levels.setdefault(key, [])
        pending, high = self.pending.get(key, ([], -1))
        if s[0] >= high:
            # Above every byte claimed so far (images written in guest order): nothing to
            # check; keep the batch aside, already sorted after the others.
            pending.append((s, e))
            self.pending[key] = (pending, max(high, int(e.max())))
            return
        if pending:
            self._merge_in(levels, (np.concatenate([x[0] for x in pending]),
                                    np.concatenate([x[1] for x in pending])))
            pending = []
        for ls, le in levels:
            # A new range overlaps an old one when an old range covers its start, or an old
            # range starts inside it.
            i = np.searchsorted(ls, s, "right")
            covers = (i > 0) & (le[np.maximum(i - 1, 0)] > s)
            inside = (i < len(ls)) & (ls[np.minimum(i, len(ls) - 1)] < e)
            hit = np.flatnonzero(covers | inside)
            if len(hit):
                j = hit[0]
                self._refuse(depth, kind, int(s[j]) if covers[j] else int(ls[i[j]]))
        self._merge_in(levels, (s, e))
        self.pending[key] = (pending, max(high, int(e.max())))

    @staticmethod
    def _merge_in(levels, run) -> None:
        s, e = run
        while levels and len(levels[-1][0]) <= len(s):
            ls, le = levels.pop()
            cat = np.concatenate((ls, s))
            order = np.argsort(cat, kind="stable")
            s, e = cat[order], np.concatenate((le, e))[order]
        levels.append((s, e))

    def _refuse(self, depth, kind, host: int):
        """Raise CorruptImage naming two guest offsets that use host byte `host`."""
        layer = self.layers[depth]
        guests = []
        for chunk in layer._own_runs(0, layer.virtual_size):
            if kind == _DATA:
                hit = (chunk.kind == _DATA) & (chunk.host <= host) & (host < chunk.host
                                                                          + chunk.length)
                at = chunk.guest[hit] + (host - chunk.host[hit])
            else:
                hit = (chunk.kind == _COMPRESSED) & (chunk.host == host)
                at = chunk.guest[hit]
            guests += at.tolist()
            if len(guests) >= 2:
                break
        what = "data cluster" if kind == _DATA else "compressed cluster stream"
        cs = layer.cluster_size
        where = " and ".join(f"{g - g % cs if kind != _DATA else g:#x}" for g in guests[:2])
        raise CorruptImage(f"{layer.filename}: guest offsets {where} share the {what} at host "
                           f"offset {host - host % cs if kind == _DATA else host:#x} (QEMU "
                           "never shares a cluster within one L1 table)")


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(col) for col in zip(*parts))


def _write_all(fd: int, view, offset: int | None) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset) if offset is not None else os.write(fd, view)
        view = view[n:]
        if offset is not None:
            offset += n


class _Filler:
    """Fills unit buffers with guest bytes; one instance shared by the worker threads."""

    def __init__(self, image: Image, unit: int):
        self.image = image
        self.unit = unit
        self.vsize = image.virtual_size
        self.local = threading.local()
        self.borrowed = Borrowed(unit)
        layers = dict(image.by_depth())
        self.layers = [layers.get(d) for d in range(max(layers) + 1)]
        self.fds = np.array([getattr(x, "data_fd", -1) for x in self.layers], np.int64)
        self.sizes = np.array([getattr(x, "data_size", 0) for x in self.layers], np.int64)

    def buffer(self) -> np.ndarray:
        """This thread's unit buffer (contents undefined); close() returns them all."""
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = np.frombuffer(self.borrowed.get(), np.uint8)
        return buf

    def close(self) -> None:
        """Give the buffers back (the conversion is over: no worker uses them)."""
        self.local = threading.local()
        self.borrowed.give_all()

    def fill(self, ui: int, runs, buf: np.ndarray, *, copy_fd: int = -1, copy_lock=None,
             zero_gaps: bool = True) -> int:
        """Fill buf[:ulen] with unit `ui`; DATA runs go by copy_file_range to copy_fd if given.

        Returns the unit's length. With zero_gaps=False the ranges between runs are left as
        they are (the caller zeroes what it uses).
        """
        s, e, k, host, csize, depth = runs
        base = ui * self.unit
        ulen = min(self.unit, self.vsize - base)
        # Compressed clusters inflate whole, so a deeper layer's cluster may cover ranges that
        # upper layers serve: inflate deepest first, then zero the gaps and read data over them.
        comp = np.flatnonzero(k == _COMPRESSED)
        if len(comp):
            for d in sorted(np.unique(depth[comp]).tolist(), reverse=True):
                sel = comp[depth[comp] == d]
                layer = self.layers[d]
                cs = layer.cluster_size
                starts = s[sel] - (s[sel] % cs)
                layer.inflate_into(host[sel], csize[sel], starts, buf, starts - base)
        if zero_gaps:
            # Unallocated and zero ranges read as zeros.
            _fill.zero_ranges(buf, np.concatenate(([0], e - base)),
                              np.concatenate((s - base, [ulen])))
        data = np.flatnonzero(k == _DATA)
        if copy_fd >= 0:
            for i in data.tolist():
                layer = self.layers[int(depth[i])]
                a, b, h = int(s[i]), int(e[i]), int(host[i])
                with copy_lock:
                    # The run's own part of buf is the scratch space if the kernel cannot copy.
                    _copy_range(layer.data_fd, copy_fd, h, a, b - a, layer,
                                buf[a - base:b - base])
            return ulen
        if len(data):
            self._pread_runs(s[data], e[data], host[data], depth[data], buf, base)
        return ulen

    def _pread_runs(self, s, e, host, depth, buf, base) -> None:
        bad, err = _fill.pread_runs(self.fds[depth], host, s - base, e - s, buf)
        if bad >= 0:
            layer = self.layers[int(depth[bad])]
            where = f"{layer.filename}: data for guest offset {int(s[bad]):#x}"
            if err:
                raise OSError(err, f"{where}: {os.strerror(err)}")
            raise TruncatedImage(f"{where}: {int(e[bad] - s[bad])} bytes at "
                                 f"{int(host[bad]):#x} run past the end of the file "
                                 f"({file_size_now(layer.data_fd, layer.data_size)})")

    def fill_sparse(self, ui: int, runs, buf: np.ndarray, block: int):
        """Fill unit `ui` for sparse output: return (ulen, writes, maps).

        writes are (memoryview, guest offset) pairs holding every block of `block` bytes
        (aligned to absolute offsets) that is not all zeros, and nothing else. The block-aligned
        middle of a long DATA run is not copied into `buf`: it is scanned and written straight
        from a read-only mapping of the page cache, which saves one copy of the data; `maps`
        must be closed (after releasing the views) once the writes are done.
        """
        s, e, k, host, csize, depth = runs
        base = ui * self.unit
        ulen = min(self.unit, self.vsize - base)
        end = base + ulen
        da = -(-s // block) * block
        db = np.where(e == self.vsize, e, e - e % block)
        direct = np.flatnonzero((k == _DATA) & (db - da >= _DIRECT_MIN)
                                & (host + (e - s) <= self.sizes[depth]))
        if len(direct):
            # Buffered pieces: every other run, and the unaligned head and tail of direct runs.
            keep = np.ones(len(s), bool)
            keep[direct] = False
            ds, de = da[direct], db[direct]
            head = direct[s[direct] < ds]
            tail = direct[de < e[direct]]
            hs = s[head]
            ts = db[tail]
            parts = (
                (s[keep], e[keep], host[keep], keep),
                (hs, da[head], host[head], head),
                (ts, e[tail], host[tail] + (ts - s[tail]), tail),
            )
            bs = np.concatenate([p[0] for p in parts])
            be = np.concatenate([p[1] for p in parts])
            bh = np.concatenate([p[2] for p in parts])
            idx = np.concatenate((np.flatnonzero(keep), head, tail))
            order = np.argsort(bs, kind="stable")
            bs, be, bh, idx = bs[order], be[order], bh[order], idx[order]
            buffered = (bs, be, k[idx], bh, csize[idx], depth[idx])
        else:
            buffered = runs
        writes, maps = [], []
        bs, be = buffered[0], buffered[1]
        if len(bs):
            self.fill(ui, buffered, buf, zero_gaps=False)
            # Scan only the blocks the buffered runs touch; zero their parts no run covers.
            lo = np.maximum(bs - bs % block, base)
            hi = np.minimum(-(-be // block) * block, end)
            prev_e = np.concatenate(([base], be[:-1]))
            next_s = np.concatenate((bs[1:], [end]))
            _fill.zero_ranges(buf, np.concatenate((np.maximum(lo, prev_e), be)) - base,
                              np.concatenate((bs, np.minimum(hi, next_s))) - base)
            reach = np.maximum.accumulate(hi)
            brk = np.flatnonzero(lo[1:] > reach[:-1]) + 1
            seg_lo = lo[np.concatenate(([0], brk))] - base
            seg_hi = reach[np.concatenate((brk - 1, [len(hi) - 1]))] - base
            view = memoryview(buf)
            for a, b in zip(seg_lo.tolist(), seg_hi.tolist()):
                starts, ends = _tables.nonzero_runs(buf[a:b], block, base + a)
                writes += [(view[a + x:a + y], base + a + x)
                           for x, y in zip(starts.tolist(), ends.tolist())]
        for i in direct.tolist():
            a, b = int(da[i]), int(db[i])
            m, mv = map_data(self.layers[int(depth[i])], int(host[i]) + (a - int(s[i])), b - a, a)
            maps.append(m)
            starts, ends = _tables.nonzero_runs(mv, block, a)
            writes += [(mv[x:y], a + x) for x, y in zip(starts.tolist(), ends.tolist())]
        return ulen, writes, maps


def map_data(layer, host: int, length: int, guest: int):
    """(mmap, read-only memoryview) of `length` data bytes of `layer` at host offset `host`
    (guest offset `guest`, for messages). Close the mmap after releasing the view."""
    # A mapping read past the end of the file would raise SIGBUS: check the file as it is now
    # (a read of a shrunken file would come up short the same way).
    if host + length > current_size(layer.data_fd):
        raise TruncatedImage(f"{layer.filename}: data for guest offset {guest:#x} lies past "
                             "the end of the file (it shrank during the conversion)")
    page = host - host % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(layer.data_fd, host + length - page, mmap.MAP_SHARED | _MAP_POPULATE,
                  mmap.PROT_READ, offset=page)
    return m, memoryview(m)[host - page:]


def _copy_range(src_fd, dst_fd, src_off, dst_off, count, layer, buf=None):
    """Copy count bytes in the kernel (copy_file_range); across file systems, or where the
    kernel cannot, through `buf` with pread/pwrite."""
    while count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE or buf is None:
                raise
            view = memoryview(buf)
            while count:
                step = min(count, len(view))
                _pread_exact(src_fd, view[:step], src_off, f"{layer.filename}: data at "
                             f"{src_off:#x}", layer.data_size)
                _write_all(dst_fd, view[:step], dst_off)
                src_off, dst_off, count = src_off + step, dst_off + step, count - step
            return
        if n <= 0:
            raise TruncatedImage(f"{layer.filename}: data at {src_off:#x} runs past the end of "
                                 f"the file ({file_size_now(src_fd, layer.data_size)})")
        src_off += n
        dst_off += n
        count -= n


def _memory_as_allocation_failed(func):
    """Running out of memory (MemoryError, or ENOMEM from the system) ends `func` in
    AllocationFailed, a QcowError naming the source (its output removed as for any error)."""
    @functools.wraps(func)
    def wrapper(src, dst, /, **kwargs):
        try:
            return func(src, dst, **kwargs)
        except AllocationFailed:
            raise
        except (MemoryError, OSError) as exc:
            if isinstance(exc, OSError) and (exc.errno != errno.ENOMEM or
                                             isinstance(exc, QcowError)):
                raise
            name = os.fsdecode(src) if isinstance(src, (str, bytes, os.PathLike)) else "image"
            raise AllocationFailed(f"{name}: not enough memory to convert it") from exc
    return wrapper


@_memory_as_allocation_failed
def convert(src, dst, /, *, format: str = "raw", src_format: str | None = None,
            compression: str | None = None, level: int | None = None,
            cluster_size: int = 65536, threads: int | None = None, sparse_size: int = 4096,
            progress=None, overwrite: bool = False, fsync: bool = False,
            backing_dirs=(), data_file=None, snapshot=None,
            max_stream_size: int | None = DEFAULT_MAX_STREAM_SIZE,
            max_output_size: int | None = None, unit_size: int = UNIT_SIZE,
            target_is_zero: bool = False, existing: bool = False, force_share: bool = False,
            direct: bool = False, compression_type: str | None = None,
            nocow: bool = False, preallocation: str = "off") -> ConvertResult:
    """Convert image `src` (QCOW2 with its backing chain, or raw) to a raw or QCOW2 image.

    Parameters
    ----------
    src : path
        The source image.
    dst : path, "-" or binary file object
        A regular file (new, or replaced when `overwrite`; through a symlink, its target) is
        written to a temporary file beside it, renamed over it only on success, keeping the
        replaced file's mode, owner and extended attributes. A block device (with `overwrite`
        or `existing`) or any target with `existing` is written in place. "-" (stdout), a FIFO,
        a character device or a writable file object receives a raw stream.
    format : {"raw", "qcow2"}
        Output format (qcow2 cannot be streamed).
    src_format : {None, "qcow2", "raw"}
        Source format; None probes it (foreign formats are refused by name).
    compression : {None, "zlib", "zstd"}
        Compress QCOW2 output clusters (qcow2 only).
    compression_type : {None, "zlib", "zstd"}
        The compression type a QCOW2 output's header records (default: `compression`, else
        zlib): qemu-img's -o compression_type, which applies without -c too.
    level : int, optional
        Compression level (default: the library's, as QEMU).
    cluster_size : int
        QCOW2 output cluster size, a power of two from 512 to 2 MiB.
    threads : int, optional
        Worker threads (default: all cores; at most 64, which `ConvertResult.threads` reports).
    sparse_size : int
        Zero runs of this many bytes (aligned; a multiple of 512 up to 16 MiB) are left as
        holes; 0 writes a fully allocated file (qemu-img -S). QCOW2 output stores the clusters
        qemu-img would allocate.
    progress : callable(done_bytes, total_bytes), optional
        Called from the calling thread: (0, total) once the source is open, then as guest
        space is finished (never going back, never twice with the same value).
    overwrite : bool
        Replace an existing regular file, or write onto a block device (never the source or a
        file of its chain).
    fsync : bool
        Flush the output to stable storage before publishing it.
    backing_dirs, data_file, snapshot, force_share
        As for `qcowfast.open` (force_share: qemu-img -U, read an image QEMU has open).
    max_stream_size : int or None
        Refuse to stream an image whose virtual size exceeds this (None: no limit).
    max_output_size : int or None
        Stop (OutputError, nothing published) once a file output occupies more than this many
        bytes; checked per conversion unit.
    unit_size : int
        Guest bytes per unit of work handed to a thread (rounded down to whole clusters of
        every layer); a tuning knob, the default suits every image measured.
    target_is_zero : bool
        The in-place target already reads as zeros: its holes are not zeroed (qemu-img
        --target-is-zero).
    existing : bool
        Write into the existing target in place, which must hold the whole image (qemu-img -n).
    direct : bool
        O_DIRECT output (qemu-img -t none); OutputError where the filesystem does not support it.
    nocow : bool
        Give a new output file the no-copy-on-write attribute (qemu-img -o nocow=on, for
        images on btrfs); ignored where the file system lacks it, as qemu-img ignores it.
    preallocation : {"off", "falloc", "full"}
        Raw output to a new file only (qemu-img -o preallocation): "falloc" allocates the
        whole file (fallocate) before the data is written, "full" writes every byte, zeros
        included (as sparse_size=0).

    Returns
    -------
    ConvertResult

    Raises
    ------
    OutputError
        For anything about the destination (named as given, never the temporary file).
    ValueError
        For invalid option values or combinations.
    QcowError
        For anything about the source.
    """
    t0 = time.perf_counter()
    level, threads, cluster_size, sparse_size, max_output_size, max_stream_size, unit_size = \
        _check_options(format, src_format, compression, level, cluster_size, sparse_size,
                       max_output_size, threads, compression_type, max_stream_size, unit_size)
    overwrite, fsync, target_is_zero, existing, force_share, direct, nocow = (
        boolean(value, name) for value, name in (
            (overwrite, "overwrite"), (fsync, "fsync"), (target_is_zero, "target_is_zero"),
            (existing, "existing"), (force_share, "force_share"), (direct, "direct"),
            (nocow, "nocow")))
    if preallocation not in ("off", "falloc", "full"):
        raise ValueError(f"preallocation must be 'off', 'falloc' or 'full', not "
                         f"{preallocation!r}")
    if preallocation != "off" and (format != "raw" or existing):
        raise ValueError("preallocation needs raw output to a new file (format='raw', not "
                         "existing=True)")
    if preallocation == "full":
        sparse_size = 0                     # (every byte written, as qemu-img's zeros first)
    if target_is_zero and not existing:
        raise ValueError("target_is_zero needs existing=True (qemu-img: --target-is-zero "
                         "requires -n)")
    progress = callback(progress, "progress")
    if isinstance(dst, (str, bytes, os.PathLike)) and stream_target(dst) is None:
        name = os.fsdecode(os.fspath(dst))
        if not name or name.endswith("/"):
            raise OutputError(f"{name!r} names no file" if not name else
                              f"{name} names a directory, not a file")
    threads = min(threads or len(os.sched_getaffinity(0)), MAX_THREADS)
    usage = LENDER.get() or Threads(threads)
    with _Lent(usage), open_source(src, src_format, backing_dirs=backing_dirs,
                                   data_file=data_file, snapshot=snapshot,
                                   force_share=force_share) as image, _ScratchReturned(image):
        # Units are whole clusters of every layer (cluster sizes are powers of two), so no
        # compressed cluster crosses a unit.
        largest = max(getattr(layer, "cluster_size", 512) for layer in image.chain)
        unit = max(unit_size - unit_size % largest, largest)
        vsize = image.virtual_size
        if progress is not None:
            progress = _Advancing(progress, vsize)
        stream = stream_target(dst)
        if stream is not None:
            name = _stream_name(dst, stream)
            if preallocation != "off":
                raise OutputError(f"cannot preallocate {name} (a stream); write the image "
                                  "to a file")
            if format != "raw":
                raise OutputError(f"cannot stream {format} output to {name}; "
                                  "write it to a file")
            if max_stream_size is not None and vsize > max_stream_size:
                raise OutputError(f"refusing to stream {vsize} bytes (virtual size "
                                  f"of {getattr(image, 'filename', src)}) over the limit of "
                                  f"{max_stream_size}; raise max_stream_size (None: no limit; "
                                  "on the command line --max-stream-size, 0: no limit) to allow "
                                  "it")
            if isinstance(stream, str):
                with open_stream(stream, name) as out:
                    if progress:
                        progress.start()
                    written = _convert_stream(image, out, name, unit, threads, progress)
            else:
                if progress:
                    progress.start()
                written = _convert_stream(image, stream, name, unit, threads, progress)
        else:
            if format == "raw" and not (sparse_size and not existing and not direct):
                _load_kernels()             # (the QCOW2 writer loads them when it needs them)
            with FileOutput(dst, image, overwrite=overwrite, existing=existing,
                            direct=direct, nocow=nocow, format=format) as out:
                if progress:
                    progress.start()
                try:
                    if preallocation != "off" and out.in_place:
                        raise OutputError(f"cannot preallocate {out.name}: it is written "
                                          "in place (a device)")
                    written = _convert_path(image, out, format, unit, threads, sparse_size,
                                            progress, compression=compression, level=level,
                                            allocate=preallocation != "off",
                                            cluster_size=cluster_size,
                                            max_output_size=max_output_size,
                                            target_is_zero=target_is_zero,
                                            compression_type=compression_type)
                    out.commit(fsync, drop_cache=direct and format != "raw")
                except BaseException as exc:
                    if (isinstance(exc, OSError) and not isinstance(exc, QcowError)
                            and exc.errno in WRITE_ERRNOS):
                        raise out.error(exc) from None
                    if out.in_place and not isinstance(exc, OutputError):
                        exc.add_note(f"{out.name} was written in place and is incomplete")
                    raise
    written = int(written)
    return ConvertResult(vsize, written, max(vsize - written, 0), time.perf_counter() - t0,
                         usage.used(threads))


class _Lent:
    """`usage` is the LENDER of the conversion inside the with block."""

    def __init__(self, usage: Threads):
        self.usage = usage

    def __enter__(self):
        self.token = LENDER.set(self.usage)

    def __exit__(self, *exc) -> None:
        LENDER.reset(self.token)


class _Advancing:
    """The caller's progress callback as convert promises it: (0, total) first, then only
    values that advance (units finish out of order; several paths report the end)."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.last = progress, total, 0

    def start(self) -> None:
        """Report (0, total): the output is open, the work begins."""
        self.progress(0, self.total)

    def __call__(self, done: int, total: int) -> None:
        if done > self.last:
            self.last = done
            self.progress(done, total)


class _ScratchReturned:
    """Gives the image's scratch buffers back to the pool (buffers.py) when the conversion is
    over: its threads are done by then, nothing reads them any more."""

    def __init__(self, image):
        self.image = image

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        release = getattr(self.image, "_release_scratch", None)
        if release is not None:
            release()


def _stream_name(dst, stream) -> str:
    if isinstance(stream, str):
        return stream
    if isinstance(dst, str):
        return dst
    name = getattr(dst, "name", None)
    return name if isinstance(name, str) else "the output stream"


# Compression levels the libraries accept: zlib 1..9, zstd ZSTD_minCLevel()..ZSTD_maxCLevel().
_LEVELS = {"zlib": (1, 9), "zstd": (-(1 << 17), 22)}


def _check_options(format, src_format, compression, level, cluster_size, sparse_size,
                   max_output_size, threads=None, compression_type=None,
                   max_stream_size=None, unit_size=UNIT_SIZE) -> tuple:
    """Refuse invalid options (ValueError); return the integer ones as ints: level, threads,
    cluster_size, sparse_size, max_output_size, max_stream_size, unit_size."""
    if format not in ("raw", "qcow2"):
        raise ValueError(f"format must be 'raw' or 'qcow2', not {format!r}")
    if src_format not in (None, "raw", "qcow2"):
        raise ValueError(f"src_format must be None, 'raw' or 'qcow2', not {src_format!r}")
    if compression not in (None, "zlib", "zstd"):
        raise ValueError(f"compression must be None, 'zlib' or 'zstd', not {compression!r}")
    if compression is not None and format != "qcow2":
        raise ValueError("compression needs format='qcow2' (raw output is never compressed)")
    if compression_type not in (None, "zlib", "zstd"):
        raise ValueError(f"compression_type must be None, 'zlib' or 'zstd', not "
                         f"{compression_type!r}")
    if compression_type is not None and format != "qcow2":
        raise ValueError("compression_type needs format='qcow2'")
    if compression and compression_type and compression != compression_type:
        raise ValueError(f"compression {compression!r} and compression_type "
                         f"{compression_type!r} differ")
    if level is not None and compression is None:
        raise ValueError("level needs compression")
    if level is not None:
        low, high = _LEVELS[compression]
        level = integer(level, f"{compression} level", low, high,
                         what=f"an integer from {low} to {high}")
    threads = integer(threads, "threads", 1, none=True, what="an integer of at least 1")
    cluster_size = integer(cluster_size, "cluster_size", 512, 2 << 20,
                            what="a power of two from 512 to 2 MiB")
    if cluster_size & (cluster_size - 1):
        raise ValueError(f"cluster_size must be a power of two from 512 to 2 MiB, "
                         f"not {cluster_size!r}")
    sparse_size = integer(sparse_size, "sparse_size", 0, MAX_SPARSE_SIZE,
                           what="a multiple of 512 from 0 to 16 MiB (qemu-img -S)")
    if sparse_size % 512:
        raise ValueError(f"sparse_size must be a multiple of 512 from 0 to 16 MiB (qemu-img "
                         f"-S), not {sparse_size!r}")
    max_output_size = integer(max_output_size, "max_output_size", 0, none=True,
                               what="a non-negative number of bytes")
    max_stream_size = integer(max_stream_size, "max_stream_size", 0, none=True,
                               what="a non-negative number of bytes")
    unit_size = integer(unit_size, "unit_size", 1, what="a positive number of bytes")
    return level, threads, cluster_size, sparse_size, max_output_size, max_stream_size, \
        unit_size


def _capped(progress, out, cap):
    """Wrap `progress` to stop the conversion once the output occupies more than `cap` bytes."""
    if cap is None:
        return progress
    base = out.allocated()

    def check(done, total):
        if out.allocated() - base > cap:
            raise OutputError(f"{out.name}: output exceeds max_output_size ({cap} bytes); "
                              f"stopped, nothing was written to {out.name}")
        if progress:
            progress(done, total)
    return check


def _convert_path(image, out, fmt, unit, threads, sparse_size, progress, *, compression, level,
                  cluster_size, max_output_size, target_is_zero, compression_type=None,
                  allocate=False) -> int:
    """Fill FileOutput `out`; return the bytes written. `allocate`: a raw file's blocks are
    all allocated before the data is written (qemu-img -o preallocation=falloc)."""
    vsize = image.virtual_size
    if fmt == "qcow2":
        if out.in_place:
            raise OutputError(f"cannot write qcow2 output in place onto {out.name} (a block "
                              "device, or -n / existing=True); write it to a file")
        from .writer import write_qcow2
        if out.direct:
            # The writer's buffers are not aligned: write through the page cache, then flush
            # and drop the written pages at commit (see the direct parameter).
            out.set_direct(False)
        size = write_qcow2(image, out.fd, compression=compression, level=level,
                           cluster_size=cluster_size, threads=threads,
                           progress=_capped(progress, out, max_output_size),
                           sparse_size=sparse_size, compression_type=compression_type,
                           name=out.name)
        if max_output_size is not None and size > max_output_size:
            raise OutputError(f"{out.name}: output of {size} bytes exceeds max_output_size "
                              f"({max_output_size} bytes); nothing was written to {out.name}")
        return size
    if max_output_size is not None and (allocate or not sparse_size) and \
            vsize > max_output_size:
        how = "preallocation" if allocate else "sparse_size=0"
        raise OutputError(f"{out.name}: a fully allocated output ({how}) of {vsize} "
                          f"bytes exceeds max_output_size ({max_output_size} bytes)")
    out.prepare(vsize, allocate=allocate or not sparse_size)
    if sparse_size and out.in_place and not (out.block or out.direct) and \
            not block_rule_exact(sparse_size):
        # -n into a file: which blocks stay allocated follows qemu-img's requests (sparse.py)
        _load_kernels()
        from .sparse import write_raw_in_place
        return write_raw_in_place(image, out, sparse_size, not target_is_zero, progress,
                                  max_output_size)
    if sparse_size and not (out.in_place or out.direct) and not block_rule_exact(sparse_size):
        _load_kernels()
        from .sparse import write_raw
        return write_raw(image, out.fd, sparse_size, _capped(progress, out, max_output_size))
    if sparse_size and not (out.in_place or out.direct):
        chain = _plain_chain(image, unit, sparse_size)
        if chain is None:
            _load_kernels()
        else:
            try:
                return _execute_plain(image, chain, out, unit, threads, sparse_size,
                                      _capped(progress, out, max_output_size))
            except _HandOver:
                pass
            # A unit the plain path does not serve: start again on the general path (which
            # raises what is wrong, if anything) from an empty output.
            _load_kernels()
            os.ftruncate(out.fd, 0)
            out.prepare(vsize, allocate=False)
    else:
        _load_kernels()
    if out.in_place or out.direct:
        return _execute_ordered(image, out, unit, threads, sparse_size, progress,
                                zero_holes=out.in_place and not target_is_zero,
                                max_output_size=max_output_size)
    return _execute_file(image, out.fd, unit, threads, sparse_size,
                         _capped(progress, out, max_output_size))


def block_rule_exact(sparse_size: int) -> bool:
    """Whether raw output's rule (write every -S block, aligned to absolute offsets, that is
    not all zeros) allocates the same 4 KiB file system blocks as qemu-img's requests
    (sparse.py): for a power of two up to 4 KiB, a block never spans two file system blocks."""
    return 0 < sparse_size <= 4096 and not sparse_size & (sparse_size - 1)


def _load_kernels() -> None:
    """Import numpy and the table kernels now, in the calling (main) thread, before the output
    exists: a signal arriving during a lazy import later would break the import itself
    instead of unwinding the conversion."""
    np.int64, _tables.FLAGS                     # noqa: B018 (the look-ups import them)


def _plain_chain(image, unit: int, block: int):
    """A _plain.Chain over `image`'s layers when its data can be copied without numpy (see
    Chain.check: no rule broken, no shared cluster, the codecs load), else None. The check
    reads the L2 tables once, before any data."""
    if unit % block:
        return None
    from .mapping import metadata_preallocated
    specs = []
    for layer in image.chain:
        if isinstance(layer, Image):
            specs.append((layer._fd, layer.data_fd, False, layer.cluster_bits, layer._flags,
                          layer.virtual_size, layer.data_size, layer._l2_per_l1,
                          layer._l2_off, metadata_preallocated(layer),
                          int(layer.compression_type)))
        else:                                           # RawImage
            specs.append((layer.data_fd, layer.data_fd, True, 9, 0, layer.virtual_size,
                          layer.data_size, 0, None, False, -1))
    chain = _plain.Chain(specs)
    return chain if chain.check() else None


class _HandOver(Exception):
    """A unit the plain path does not serve: the general path must do the conversion."""


def _execute_plain(image, chain, out, unit, threads, block, progress) -> int:
    """Fill the sized sparse output file `out` from an uncompressed chain with _plain's C
    kernels (no numpy): units holding data filled on `threads` workers, their non-zero blocks
    written by one writer at a time. Return the bytes written; raise _HandOver when a unit
    needs the general path (nothing is published; the caller starts again)."""
    vsize = image.virtual_size
    bufs = Borrowed(unit)
    total = [0]

    def work(ui, _runs) -> None:
        start = ui * unit
        n = chain.copy(start, min(unit, vsize - start), bufs.get(), block, out.fd)
        if n == _plain.FALLBACK:
            raise _HandOver
        return n

    def done(ui, n) -> None:
        total[0] += n
        if progress:
            progress(min((ui + 1) * unit, vsize), vsize)

    try:
        _run_units(image, unit, threads, work, done, plan=_plain_plan(chain, vsize, unit))
    finally:
        bufs.give_all()
    if progress:
        progress(vsize, vsize)
    return total[0]


def _plain_plan(chain, vsize: int, unit: int):
    """Yield (unit_index, None) for every unit of `chain` holding data (_run_units' plan);
    raise _HandOver where the chain needs the general path."""
    pos = 0
    while pos < vsize:
        first = chain.next_data(pos, vsize)
        if first == _plain.FALLBACK:
            raise _HandOver
        if first >= vsize:
            return
        yield first // unit, None
        pos = (first // unit + 1) * unit


def _execute_ordered(image, out, unit, threads, sparse_size, progress, *, zero_holes,
                     max_output_size) -> int:
    """Fill units on the workers and write them from the calling thread in guest order, from
    page-aligned buffers (O_DIRECT), zeroing the holes when `zero_holes` (in-place targets).

    Return the bytes of data written.
    """
    total = [0]
    cuts = None
    if zero_holes and sparse_size and not out.block:
        # qemu-img punches each of its write-zeroes requests on its own, and a file system
        # block only partly inside one is zeroed, not freed: holes are cut where its
        # requests start (sparse.requests), so the same blocks stay allocated.
        from .sparse import RequestStarts
        cuts = RequestStarts(image)

    def zero(start, end):
        if not zero_holes:
            return
        if cuts is not None:
            for cut in cuts.within(start, end):
                out.zero_range(start, cut, keep_allocated=False)
                start = cut
        out.zero_range(start, end, keep_allocated=not sparse_size)

    def write_unit(ui, buf, ulen):
        base = ui * unit
        view = memoryview(buf)
        if sparse_size:
            starts, ends = _tables.nonzero_runs(buf[:ulen], sparse_size, base)
        else:
            starts, ends = [0], [ulen]
        pos = 0
        for a, b in zip(list(starts), list(ends)):
            zero(base + pos, base + a)
            out.pwrite(view[a:b], base + a)
            total[0] += b - a
            pos = b
        zero(base + pos, base + ulen)
        if max_output_size is not None and total[0] > max_output_size:
            raise OutputError(f"{out.name}: output exceeds max_output_size ({max_output_size} "
                              "bytes); stopped" + (f", {out.name} is incomplete"
                                                   if out.in_place else ""))

    def gap(start, end):
        # Whole units of holes: zero them in slices so progress keeps moving on big targets.
        while start < end:
            stop = min(end, start + _GAP_SLICE)
            zero(start, stop)
            start = stop
            if progress and start < end:
                progress(start, image.virtual_size)

    _run_ordered(image, unit, threads, progress, write_unit, gap, aligned=True)
    return total[0]


def _run_ordered(image, unit, threads, progress, on_unit, on_gap, *, aligned=False) -> None:
    """Fill planned units on `threads` workers; from the calling thread, in guest order, call
    on_gap(start, end) for each range no unit covers (it reads as zeros) and
    on_unit(ui, buf, ulen) for each unit. At most threads + 1 unit buffers exist."""
    vsize = image.virtual_size
    filler = _Filler(image, unit)
    spare: deque = deque()          # buffers of units done; no more exist than units in flight
    pos = [0]

    def work(ui, runs):
        try:
            buf = spare.pop()
        except IndexError:
            buf = aligned_empty(unit) if aligned else np.empty(unit, np.uint8)
        return buf, filler.fill(ui, runs, buf)

    def done(ui, result):
        buf, ulen = result
        if pos[0] < ui * unit:
            on_gap(pos[0], ui * unit)
        on_unit(ui, buf, ulen)
        spare.append(buf)
        pos[0] = ui * unit + ulen
        if progress:
            progress(pos[0], vsize)

    _run_units(image, unit, threads, work, done, lambda t: t + 1)
    if pos[0] < vsize:
        on_gap(pos[0], vsize)
    if progress:
        progress(vsize, vsize)


def _run_units(image, unit, threads, work, done, inflight_for=None, *, plan=None,
               cap=MAX_THREADS):
    """Run work(ui, runs) on a pool over the planned units (`plan`, default _plan's); call
    done(ui, result) in order. At most inflight_for(threads) units are in flight (default
    twice the threads). The LENDER may raise the threads as the units run, up to `cap`; a
    thread the system refuses leaves the pool on those it has. One thread is the calling
    thread: each unit handed to a pool thread and back costs two wake-ups across cores, and
    jobs of a batch ran 7-10% slower side by side than alone (a pool starts if the LENDER
    lends more)."""
    inflight_for = inflight_for or (lambda t: 2 * t)
    max_inflight = inflight_for(threads)
    lender = LENDER.get()
    units = iter(_plan(image, unit) if plan is None else plan)
    if threads == 1:
        for ui, runs in units:
            done(ui, work(ui, runs))
            if lender is not None and lender.threads() > 1:
                break
        else:
            return
    with _Pool(threads) as pool:
        inflight = deque()
        try:
            for ui, runs in units:
                if lender is not None and not pool.full:
                    more = min(lender.threads(), cap)
                    if more > pool.max:
                        pool.max, max_inflight = more, inflight_for(more)
                inflight.append((ui, pool.submit(work, ui, runs)))
                if lender is not None:
                    if pool.full:
                        max_inflight, lender.refused = inflight_for(pool.max), True
                    lender.peak = max(lender.peak, pool.created)
                while len(inflight) >= max_inflight:
                    u, task = inflight.popleft()
                    done(u, task.result())
            while inflight:
                u, task = inflight.popleft()
                done(u, task.result())
        except BaseException:
            for _, task in inflight:
                task.cancelled = True
            raise


class _Task:
    __slots__ = ("fn", "args", "finished", "value", "error", "cancelled")

    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        self.finished = threading.Event()
        self.value = self.error = None
        self.cancelled = False

    def result(self):
        """The call's return value (waiting for it), or raise what it raised."""
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Pool:
    """Up to `threads` worker threads running submitted calls in order; leaving the `with`
    block waits for the calls running (concurrent.futures would do, but its import, through
    logging, costs every process 7 ms)."""

    def __init__(self, threads: int):
        self.max = threads
        self.full = False                   # the system refused a thread: no more are tried
        self.queue = SimpleQueue()
        self.created = 0
        self.running = 0
        self.idle = threading.Condition()

    def submit(self, fn, *args) -> _Task:
        task = _Task(fn, args)
        self.queue.put(task)
        if self.created < self.max:
            # Counted before start(): a signal interrupting start() must not leave a thread
            # that __exit__ sends no stop to.
            self.created += 1
            try:
                threading.Thread(target=self._worker, name=f"qcowfast_{self.created}",
                                 daemon=True).start()
            except RuntimeError:            # "can't start new thread" (a memory limit)
                self.created -= 1
                if not self.created:
                    raise
                self.max, self.full = self.created, True    # the running ones take the task
        return task

    def _worker(self) -> None:
        with self.idle:
            self.running += 1
        try:
            while (task := self.queue.get()) is not None:
                try:
                    if not task.cancelled:
                        task.value = task.fn(*task.args)
                except BaseException as exc:      # noqa: BLE001 - handed to result()
                    task.error = exc
                finally:
                    task.args = None
                    task.finished.set()
        finally:
            with self.idle:
                self.running -= 1
                self.idle.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        # Every task still queued is finished or cancelled by now: a thread starting late
        # only meets those and its stop.
        for _ in range(self.created):
            self.queue.put(None)
        with self.idle:
            self.idle.wait_for(lambda: self.running == 0)


def _every_unit(source, unit: int, plan):
    """`plan` (or _plan's, when None) with the units holding no data too (as empty runs)."""
    nunits = -(-source.virtual_size // unit)
    if plan is None:
        empty = tuple(np.zeros(0, np.int64) for _ in range(6))
        plan = _plan(source, unit)
    else:
        empty = None
    nxt = 0
    for ui, runs in plan:
        for u in range(nxt, ui):
            yield u, empty
        yield ui, runs
        nxt = ui + 1
    for u in range(nxt, nunits):
        yield u, empty


def _execute_file(image, fd, unit, threads, sparse_size, progress) -> int:
    """Fill the sized output file `fd` with the image's guest bytes, unit by unit on `threads`
    workers; return the bytes written (holes of `sparse_size` left alone; with sparse_size 0
    every byte is written, zeros too, as qemu-img -S 0 writes them: space only preallocated
    would read as holes to SEEK_DATA)."""
    vsize = image.virtual_size
    filler = _Filler(image, unit)
    total = [0]
    write_lock = threading.Lock()

    def work(ui, runs):
        buf = filler.buffer()
        base = ui * unit
        maps = ()
        if sparse_size:
            ulen, writes, maps = filler.fill_sparse(ui, runs, buf, sparse_size)
        else:
            # DATA runs go by copy_file_range; everything else (inflated clusters, zeros) from
            # buf: the ranges between DATA runs.
            data = runs[2] == _DATA
            ulen = filler.fill(ui, runs, buf, copy_fd=fd, copy_lock=write_lock)
            view = memoryview(buf)
            starts = np.concatenate(([base], runs[1][data]))
            ends = np.concatenate((runs[0][data], [base + ulen]))
            writes = [(view[a - base:b - base], a)
                      for a, b in zip(starts.tolist(), ends.tolist()) if a < b]
        try:
            n = 0
            # One writer at a time: concurrent pwrite()s to one file contend on its inode lock
            # in the kernel and burn CPU spinning; the other workers keep inflating meanwhile.
            with write_lock:
                for view, offset in writes:
                    _write_all(fd, view, offset)
                    n += len(view)
                total[0] += n
        finally:
            for view, _ in writes:
                view.release()
            for m in maps:
                m.close()
        return ulen

    def done(ui, ulen):
        if progress:
            progress(ui * unit + ulen, vsize)

    try:
        _run_units(image, unit, threads, work, done,
                   plan=None if sparse_size else _every_unit(image, unit, None))
    finally:
        filler.close()
    if progress:
        progress(vsize, vsize)
    return total[0] if sparse_size else vsize


def _convert_stream(image, out, name, unit, threads, progress) -> int:
    check_stream(out, image, name)
    vsize = image.virtual_size
    delivered = [0]
    closed = False

    def write(data):
        view = memoryview(data)
        while len(view):
            n = out.write(view)
            if n is None:
                raise OutputError(f"{name}: output stream would block")
            view = view[n:]
            delivered[0] += n

    def zeros(start, end):
        while start < end:
            n = min(len(_ZEROS), end - start)
            write(_ZEROS[:n])
            start += n
            if progress and start < end:
                progress(start, vsize)

    try:
        _run_ordered(image, unit, threads, progress,
                     lambda ui, buf, ulen: write(buf[:ulen]), zeros)
        if hasattr(out, "flush"):
            out.flush()
    except OSError as exc:
        if isinstance(exc, QcowError) or exc.errno not in WRITE_ERRNOS | {errno.EPIPE}:
            raise
        if exc.errno != errno.EPIPE:
            raise OutputError(f"cannot write {name}: {exc.strerror}") from None
        closed = True
    if closed:
        # (Raised outside the handler: the EPIPE must not be its context, which the command
        # line would take for a text reader gone away, `| head`, and end with status 0.)
        raise OutputError(f"{name}: the reader closed it after {delivered[0]} of {vsize} "
                          "bytes were written into it; the image was not delivered whole")
    return vsize
