"""QCOW2 -> raw conversion: plan units of guest space from the extent stream, fill them on all
cores (pread / batch inflate with the GIL released), write only what is not zero, publish
atomically.

Memory bound: each of `threads` workers holds one unit buffer (UNIT_SIZE) and the compressed
input of one unit (less than a unit for real images, at most 3 units if crafted); a stream holds threads + 1 unit buffers. With the
default 8 MiB unit that is about threads x 16 MiB + 8 MiB, plus the L2 caches (at most 32 MiB
per chain layer) and the interpreter (~40 MiB): under 256 MiB for 4 threads.
"""
from __future__ import annotations

import os
import queue
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import _tables
from .constants import ExtentKind
from .errors import OutputError, TruncatedImage
from .image import Image, _pread_exact, open as open_image

UNIT_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_STREAM_SIZE = 1 << 40           # streams longer than 1 TiB must be asked for
_DATA, _COMPRESSED = int(ExtentKind.DATA), int(ExtentKind.COMPRESSED)
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True)
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
    current, parts = -1, []
    for chunk in image._runs(0, image.virtual_size):
        sel = (chunk.kind == _DATA) | (chunk.kind == _COMPRESSED)
        if not sel.any():
            continue
        g, n, k, h, c, d = (a[sel] for a in chunk)
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

    def buffer(self) -> np.ndarray:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = np.empty(self.unit, np.uint8)
        return buf

    def fill(self, ui: int, runs, buf: np.ndarray, *, copy_fd: int = -1, copy_lock=None) -> int:
        """Fill buf[:ulen] with unit `ui`; DATA runs go by copy_file_range to copy_fd if given.

        Returns the unit's length.
        """
        s, e, k, host, csize, depth = runs
        base = ui * self.unit
        ulen = min(self.unit, self.vsize - base)
        view = memoryview(buf)
        # Compressed clusters inflate whole, so a deeper layer's cluster may cover ranges that
        # upper layers serve: inflate deepest first, then zero the gaps and read data over them.
        comp = np.flatnonzero(k == _COMPRESSED)
        if len(comp):
            for d in sorted(np.unique(depth[comp]).tolist(), reverse=True):
                sel = comp[depth[comp] == d]
                layer = self.image.layer(d)
                cs = layer.cluster_size
                starts = s[sel] - (s[sel] % cs)
                layer.inflate_into(host[sel], csize[sel], starts, buf, starts - base)
        # Zero the gaps between runs (unallocated and zero ranges read as zeros).
        gap_start = np.concatenate(([0], e - base))
        gap_end = np.concatenate((s - base, [ulen]))
        real = np.flatnonzero(gap_end > gap_start)
        for a, b in zip(gap_start[real].tolist(), gap_end[real].tolist()):
            buf[a:b] = 0
        for i in np.flatnonzero(k == _DATA).tolist():
            layer = self.image.layer(int(depth[i]))
            a, b, h = int(s[i]), int(e[i]), int(host[i])
            if copy_fd >= 0:
                with copy_lock:
                    _copy_range(layer.data_fd, copy_fd, h, a, b - a, layer)
                continue
            _pread_exact(layer.data_fd, view[a - base:b - base], h,
                         f"{layer.filename}: data for guest offset {a:#x}", layer.data_size)
        return ulen


def _copy_range(src_fd, dst_fd, src_off, dst_off, count, layer):
    while count:
        n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
        if n <= 0:
            raise TruncatedImage(f"{layer.filename}: data at {src_off:#x} runs past the end of "
                                 "the file")
        src_off += n
        dst_off += n
        count -= n


def _chain_ids(image: Image) -> set:
    ids = set()
    for layer in image.chain:
        for fd in {layer.data_fd, getattr(layer, "_fd", -1)}:
            if fd >= 0:
                st = os.fstat(fd)
                ids.add((st.st_dev, st.st_ino))
    return ids


def convert(src, dst, /, *, threads: int | None = None, sparse_size: int = 4096,
            progress=None, overwrite: bool = False, fsync: bool = False,
            backing_dirs=(), data_file=None, snapshot=None, max_stream_size: int | None = DEFAULT_MAX_STREAM_SIZE,
            unit_size: int = UNIT_SIZE) -> ConvertResult:
    """Convert QCOW2 image `src` (with its backing chain) to a raw image.

    Parameters
    ----------
    src : path
        The QCOW2 image.
    dst : path, "-" or binary file object
        A path is written atomically: a temporary file beside it is renamed over it only on
        success. "-" (stdout) or a writable file object receives a stream, holes written as zeros.
    threads : int, optional
        Worker threads (default: all cores).
    sparse_size : int
        Zero runs of this many bytes (aligned) are left as holes; 0 writes a fully allocated file.
    progress : callable(done_bytes, total_bytes), optional
        Called from the calling thread as guest space is finished.
    overwrite : bool
        Replace an existing `dst` (never the source or a file of its chain).
    fsync : bool
        Flush the output to stable storage before publishing it.
    backing_dirs, data_file, snapshot
        As for `qcowfast.open`.
    max_stream_size : int or None
        Refuse to stream an image whose virtual size exceeds this (None: no limit).

    Returns
    -------
    ConvertResult
    """
    t0 = time.perf_counter()
    if sparse_size < 0 or sparse_size % 512:
        raise ValueError("sparse_size must be a non-negative multiple of 512")
    threads = threads or len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError("threads must be at least 1")
    with open_image(src, backing_dirs=backing_dirs, data_file=data_file,
                    snapshot=snapshot) as image:
        # Units are whole clusters of every layer (cluster sizes are powers of two), so no
        # compressed cluster crosses a unit.
        largest = max(getattr(layer, "cluster_size", 512) for layer in image.chain)
        unit = max(unit_size - unit_size % largest, largest)
        stream = _stream_target(dst)
        if stream is not None:
            if max_stream_size is not None and image.virtual_size > max_stream_size:
                raise OutputError(f"refusing to stream {image.virtual_size} bytes (virtual size "
                                  f"of {image.filename}) over the limit of {max_stream_size}; "
                                  "raise max_stream_size (--max-stream-size) to allow it")
            if isinstance(stream, str):
                with open(stream, "wb", buffering=0) as out:
                    written = _convert_stream(image, out, unit, threads, progress)
            else:
                written = _convert_stream(image, stream, unit, threads, progress)
        else:
            written = _convert_file(image, os.fspath(dst), unit, threads, sparse_size, progress,
                                    overwrite, fsync)
        vsize = image.virtual_size
    return ConvertResult(vsize, written, vsize - written, time.perf_counter() - t0, threads)


def _stream_target(dst):
    """A file object to stream into, or None when dst is a path to write atomically."""
    if dst == "-":
        return sys.stdout.buffer
    if hasattr(dst, "write"):
        return dst
    try:
        st = os.stat(dst)
    except FileNotFoundError:
        return None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return os.fspath(dst)         # a pipe or device path: stream into it
    return None


def _run_units(image, unit, threads, work, done, max_inflight=None):
    """Run work(ui, runs) on a pool over the planned units; call done(ui, result) in order."""
    max_inflight = max_inflight or 2 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="qcowfast") as pool:
        inflight = deque()
        try:
            for ui, runs in _plan(image, unit):
                inflight.append((ui, pool.submit(work, ui, runs)))
                while len(inflight) >= max_inflight:
                    u, fut = inflight.popleft()
                    done(u, fut.result())
            while inflight:
                u, fut = inflight.popleft()
                done(u, fut.result())
        except BaseException:
            for _, fut in inflight:
                fut.cancel()
            raise


def _convert_file(image, dst, unit, threads, sparse_size, progress, overwrite, fsync) -> int:
    if os.path.isdir(dst):
        raise OutputError(f"{dst} is a directory")
    if os.path.lexists(dst):
        if not overwrite:
            raise OutputError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        st = os.stat(dst)
        if (st.st_dev, st.st_ino) in _chain_ids(image):
            raise OutputError(f"{dst} is the source image or a file of its backing chain")
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".qcowfast-tmp",
                               dir=directory)
    published = False
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        vsize = image.virtual_size
        try:
            os.ftruncate(fd, vsize)
            if not sparse_size and vsize:
                os.posix_fallocate(fd, 0, vsize)
        except OSError as exc:
            raise OutputError(f"cannot size {dst} to {vsize} bytes: {exc.strerror}") from None
        filler = _Filler(image, unit)
        total = [0]
        write_lock = threading.Lock()

        def work(ui, runs):
            buf = filler.buffer()
            if sparse_size:
                ulen = filler.fill(ui, runs, buf)
                starts, ends = _tables.nonzero_runs(buf[:ulen], sparse_size, ui * unit)
            else:
                comp = runs[2] == _COMPRESSED
                ulen = filler.fill(ui, runs, buf, copy_fd=fd, copy_lock=write_lock)
                base = ui * unit
                starts, ends = runs[0][comp] - base, runs[1][comp] - base
            view = memoryview(buf)
            base = ui * unit
            n = 0
            # One writer at a time: concurrent pwrite()s to one file contend on its inode lock
            # in the kernel and burn CPU spinning; the other workers keep inflating meanwhile.
            with write_lock:
                for a, b in zip(starts.tolist(), ends.tolist()):
                    _write_all(fd, view[a:b], base + a)
                    n += b - a
                total[0] += n
            return ulen

        def done(ui, ulen):
            if progress:
                progress(ui * unit + ulen, vsize)

        _run_units(image, unit, threads, work, done)
        if progress:
            progress(vsize, vsize)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        _publish(tmp, dst, overwrite)
        published = True
        return total[0] if sparse_size else vsize
    finally:
        if fd >= 0:
            os.close(fd)
        if not published:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)             # fails if dst appeared meanwhile: never clobber
    except FileExistsError:
        raise OutputError(f"{dst} appeared during the conversion; not replaced") from None
    except OSError:
        if os.path.lexists(dst):
            raise OutputError(f"{dst} appeared during the conversion; not replaced") from None
        os.rename(tmp, dst)
        return
    os.unlink(tmp)


def _convert_stream(image, out, unit, threads, progress) -> int:
    vsize = image.virtual_size
    filler = _Filler(image, unit)
    state = {"pos": 0}

    def write(data):
        view = memoryview(data)
        while len(view):
            n = out.write(view)
            if n is None:
                raise OutputError("output stream would block")
            view = view[n:]

    def zeros_until(target):
        while state["pos"] < target:
            n = min(len(_ZEROS), target - state["pos"])
            write(_ZEROS[:n])
            state["pos"] += n
            if progress:
                progress(state["pos"], vsize)

    # At most `inflight` units are planned and not yet written, each holding one pooled buffer.
    inflight = threads + 1
    pool: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(inflight):
        pool.put(None)

    def work(ui, runs):
        buf = pool.get()
        if buf is None:
            buf = np.empty(unit, np.uint8)
        ulen = filler.fill(ui, runs, buf)
        return buf, ulen

    def done(ui, result):
        buf, ulen = result
        zeros_until(ui * unit)
        write(buf[:ulen])
        pool.put(buf)
        state["pos"] += ulen
        if progress:
            progress(state["pos"], vsize)

    _run_units(image, unit, threads, work, done, inflight)
    zeros_until(vsize)
    if hasattr(out, "flush"):
        out.flush()
    return vsize
