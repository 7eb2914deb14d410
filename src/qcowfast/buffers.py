"""Unit buffers (megabytes each) reused by the conversions of one process.

A fresh buffer costs a page fault per 4 KiB on first touch, 2-4 ms per 8 MiB here. malloc
usually recycles big blocks, but not where it is told to hand them back to the kernel at once
(MALLOC_TRIM_THRESHOLD_, which Dask sets for its workers): there every conversion paid again.
Buffers given back are kept, at most KEEP_BYTES in all, as anonymous mappings advised
MADV_FREE, so the kernel may still take their pages under memory pressure (they read as zeros
then). Callers never assume a buffer's contents.
"""
from __future__ import annotations

import mmap
import threading

KEEP_BYTES = 64 << 20
_MADV_FREE = getattr(mmap, "MADV_FREE", None)
_lock = threading.Lock()
_free: dict[int, list[mmap.mmap]] = {}
_kept = 0


def take(size: int) -> mmap.mmap:
    """A writable buffer of `size` bytes (contents undefined); give() it back when done."""
    global _kept
    with _lock:
        pool = _free.get(size)
        if pool:
            _kept -= size
            return pool.pop()
    return mmap.mmap(-1, size)


def give(buf: mmap.mmap) -> None:
    """Return a buffer from take(): kept for the next conversion while there is room. No view
    of it may be in use."""
    global _kept
    size = len(buf)
    with _lock:
        if _kept + size > KEEP_BYTES:
            return
        _kept += size
        _free.setdefault(size, []).append(buf)
    if _MADV_FREE is not None:
        try:
            buf.madvise(_MADV_FREE)
        except OSError:                     # kernels before 4.5
            pass


class Borrowed:
    """Buffers taken for one conversion, per thread; give_all() returns them at its end."""

    def __init__(self, size: int):
        self.size = size
        self.local = threading.local()
        self.taken: list[mmap.mmap] = []

    def get(self) -> mmap.mmap:
        """This thread's buffer."""
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = take(self.size)
            self.taken.append(buf)          # (list.append is atomic)
        return buf

    def give_all(self) -> None:
        """Return every buffer taken (when no thread uses them any more)."""
        taken, self.taken = self.taken, []
        self.local = threading.local()
        for buf in taken:
            give(buf)
