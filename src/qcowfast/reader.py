"""A file-like view of an image's guest contents (io.RawIOBase, read-only, seekable)."""
from __future__ import annotations

import io
import os
import threading
import weakref
from operator import index

import numpy as np

from .errors import QcowError
from .image import MAX_READ, writable_view

READAHEAD = 8 * 1024 * 1024     # sequential reads are served from windows of this size
LINE_CHUNK = 64 * 1024          # readline() reads this much at a time
_NOGIL_COPY = 64 * 1024         # copies from a window of this size and up release the GIL
MAX_POSITION = (1 << 63) - 1    # the largest off_t: io.FileIO and io.BufferedReader go no further


def _prefetch_pool():
    """Threads that fill read-ahead windows in the background. Not image._read_pool: a fill
    hands parts of its work to that pool."""
    from .image import process_pool
    return process_pool("prefetch", 4)


_POOL_THREADS = "qcowfast-"     # the names' prefix of qcowfast's threads (image.process_pool)


def _copy(dst: memoryview, src: bytearray, off: int) -> None:
    """dst[:] = src[off:off + len(dst)]; large copies release the GIL (numpy does), so that
    a background fill is not held up while the reader copies."""
    if len(dst) < _NOGIL_COPY:
        dst[:] = memoryview(src)[off:off + len(dst)]
    else:
        np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8, len(dst), off))


class _Window:
    """A buffer of READAHEAD bytes holding guest bytes [start, start + length), or being
    filled in the background (`pending`: the future of that fill)."""
    __slots__ = ("buf", "start", "length", "pending")

    def __init__(self):
        self.buf = bytearray(READAHEAD)
        self.start = self.length = 0
        self.pending = None

    def fill(self, image, start: int) -> None:
        """Fill the window from `start`, here; on an error it holds nothing."""
        self.start, self.length = start, 0
        self.length = image.readinto(start, self.buf)

    def fill_later(self, image, start: int) -> None:
        self.start, self.length = start, 0
        self.pending = _prefetch_pool().submit(image.readinto, start, self.buf)

    def settle(self, wait: bool = True) -> BaseException | None:
        """Wait for the background fill, if any; return its error (the window then holds
        nothing) instead of raising it. Without `wait`, let it go (cancelled if it has not
        started; a fill running on keeps its buffer alive and writes into it alone)."""
        pending, self.pending = self.pending, None
        if pending is not None and not wait:
            pending.cancel()
            return None
        if pending is not None:
            err = pending.exception()
            if err is None:
                self.length = pending.result()
            return err
        return None


class ImageFile(io.RawIOBase):
    """Read-only, seekable file object over `image`; closing it does not close the image.

    Sequential reads smaller than READAHEAD are served from two READAHEAD-byte windows: while
    the reader consumes one, the next one is filled in the background by a single large read
    (whose compressed clusters inflate in big batches on all cores). Random reads go straight
    to the image. At most two windows exist; closing the file waits for a fill in flight.

    Threads may share the file as they may share an io.FileIO: the position is theirs to
    coordinate, but each read returns the bytes at some position it held.
    """

    mode = "rb"

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._pos = 0
        self._last_end = -1            # where the previous read ended: sequential detection
        self._windows: list[_Window] = []      # made on the first sequential read
        self._lock = threading.Lock()           # held while the windows are used
        self._direct_until = 0          # reads before this offset skip windows (one failed)
        _OPEN_FILES.add(self)

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return False

    def write(self, b) -> int:
        self._checkClosed()
        raise io.UnsupportedOperation("write: the image file is read-only")

    def truncate(self, size=None) -> int:
        self._checkClosed()             # (io.IOBase's raises UnsupportedOperation even closed)
        raise io.UnsupportedOperation("truncate: the image file is read-only")

    def fileno(self) -> int:
        self._checkClosed()
        raise io.UnsupportedOperation("fileno: the image file has no descriptor of its own")

    def __reduce_ex__(self, protocol):
        # A copy would share the windows, their lock and the fills in flight of this one.
        raise TypeError("cannot pickle or copy an image file object; call as_file() again")

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes from the position (all that is left for None or a negative
        size); b"" at the end. The buffer is never larger than what is left to read."""
        size = -1 if size is None else index(size)
        if size < 0:
            return self.readall()
        self._check_open()
        buf = bytearray(min(size, max(0, self._image.virtual_size - self._pos)))
        n = self.readinto(buf) if buf else 0
        del buf[n:]
        return bytes(buf)

    def readline(self, size: int | None = -1) -> bytes:
        """Bytes up to and including the next b"\n" (at most `size`), read in pieces of
        LINE_CHUNK bytes rather than one byte at a time (io.RawIOBase's way)."""
        size = -1 if size is None else index(size)
        line = bytearray()
        while size < 0 or len(line) < size:
            chunk = self.read(LINE_CHUNK if size < 0 else min(LINE_CHUNK, size - len(line)))
            end = chunk.find(b"\n") + 1
            if end:
                line += chunk[:end]
                self._pos = self._last_end = self._pos - (len(chunk) - end)   # give back
                break
            line += chunk
            if not chunk:
                break
        return bytes(line)

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        offset, whence = index(offset), index(whence)
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._image.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos > MAX_POSITION:
            raise ValueError(f"seek position {pos} is past the largest file offset "
                             f"({MAX_POSITION})")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        self._check_open()
        view = writable_view(buffer)
        start = self._pos               # read once: another thread may seek meanwhile
        if self._windows or start == self._last_end:
            with self._lock:
                n = self._read_windows(start, view)
        else:
            n = self._image.readinto(start, view)
        self._pos = self._last_end = start + n
        return n

    def _read_windows(self, start: int, view: memoryview) -> int:
        """readinto from `start`, through the windows (under self._lock)."""
        self._checkClosed()                     # closed meanwhile: its windows are gone
        pos, end = start, start + len(view)
        sequential = start == self._last_end
        while pos < end:
            win = self._window_at(pos, sequential and end - pos < READAHEAD)
            if win is not None:
                off = pos - win.start
                n = min(end - pos, win.length - off)
                _copy(view[pos - start:pos - start + n], win.buf, off)
            else:
                n = self._image.readinto(pos, view[pos - start:])
            if not n:
                break
            pos += n
        return pos - start

    def _window_at(self, pos: int, fill: bool) -> _Window | None:
        """The window holding `pos` (waiting for its background fill), or with `fill` one
        filled from `pos` now; None: read straight from the image."""
        for win in self._windows:
            if win.pending is not None and win.start <= pos < win.start + len(win.buf):
                if win.settle() is not None:
                    return self._failed(win.start)
            if win.start <= pos < win.start + win.length:
                self._prefetch_after(win)
                return win
        if not fill or pos < self._direct_until:
            return None
        if not self._windows:
            self._windows = [_Window(), _Window()]
        # Refill the window whose data lies furthest behind (never one being filled).
        win = min(self._windows, key=lambda w: (w.pending is not None, w.start))
        win.settle()
        try:
            win.fill(self._image, pos)
        except (QcowError, OSError):
            return self._failed(pos)
        if not win.length:
            return None                         # the end of the image
        self._prefetch_after(win)
        return win

    def _failed(self, start: int) -> None:
        """A window from `start` failed to fill, somewhere in it: the bytes before a bad
        entry or a bad cluster still read as they do from the image, so reads there go
        straight to it (which raises for bytes that fail), as QEMU reads them."""
        self._direct_until = start + READAHEAD
        return None

    def _prefetch_after(self, win: _Window) -> None:
        """Fill the other window with what follows `win`, in the background."""
        nxt = win.start + win.length
        if len(self._windows) < 2 or nxt >= self._image.virtual_size:
            return
        other = self._windows[1] if self._windows[0] is win else self._windows[0]
        if other.start == nxt and (other.pending is not None or other.length):
            return
        other.settle()                          # a fill for data nobody reads now
        other.fill_later(self._image, nxt)

    def readall(self) -> bytes:
        self._check_open()
        pos = self._pos
        left = max(0, self._image.virtual_size - pos)
        if left > MAX_READ:
            raise ValueError(f"read() of all {left} bytes left is over the {MAX_READ}-byte "
                             "limit; read(n) in pieces or readinto() your own buffer")
        data = self._image.read(pos, left)
        self._pos = pos + len(data)
        return data

    def close(self) -> None:
        """Close the file (not the image), after any background fill has finished."""
        # On qcowfast's own threads it never waits: a fill may be waiting for that very thread.
        self._close(wait=not threading.current_thread().name.startswith(_POOL_THREADS))

    def __del__(self):
        # The garbage collector may finalize a file nobody closed on any thread, among them a
        # prefetch or read-pool thread that this file's own fill is waiting for: a finalizer
        # lets fills go (one running on keeps its buffer and writes into it alone).
        self._close(wait=False)

    def _close(self, wait: bool) -> None:
        with self._lock:
            for win in self._windows:
                win.settle(wait)
            self._windows = []
        super().close()

    def _forked(self) -> None:
        """In a forked child: the fills in flight belong to the parent's threads, which the
        child has not got (it would wait for them forever), and the lock may have been held by
        one of them. Start afresh."""
        self._lock = threading.Lock()
        self._windows = []

    def _check_open(self) -> None:
        self._checkClosed()
        if self._image._closed:
            raise ValueError("I/O operation on a closed image")

    @property
    def name(self) -> str:
        return self._image.filename


_OPEN_FILES: weakref.WeakSet = weakref.WeakSet()    # every ImageFile, for _after_fork


def _after_fork() -> None:
    for f in list(_OPEN_FILES):
        f._forked()


os.register_at_fork(after_in_child=_after_fork)
