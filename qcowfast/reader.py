"""A file-like view of an image's guest contents (io.RawIOBase, read-only, seekable)."""
from __future__ import annotations

import io


READAHEAD = 8 * 1024 * 1024     # sequential reads are served from windows of this size


class ImageFile(io.RawIOBase):
    """Read-only, seekable file object over `image`; closing it does not close the image.

    Sequential reads smaller than READAHEAD are served from one READAHEAD-byte window filled
    by a single large read (so compressed clusters inflate in big batches on all cores);
    random reads go straight to the image.
    """

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._pos = 0
        self._last_end = -1            # where the previous read ended: sequential detection
        self._window = None            # bytearray of the read-ahead window, made on first use
        self._win_start = 0
        self._win_len = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._image.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        pos, end = self._pos, self._pos + len(view)
        sequential = pos == self._last_end
        while pos < end:
            off = pos - self._win_start
            if 0 <= off < self._win_len:
                n = min(end - pos, self._win_len - off)
                view[pos - self._pos:pos - self._pos + n] = \
                    memoryview(self._window)[off:off + n]
            elif sequential and end - pos < READAHEAD:
                if self._window is None:
                    self._window = bytearray(READAHEAD)
                self._win_start = pos
                self._win_len = self._image.readinto(pos, self._window)
                if not self._win_len:
                    break                      # end of the image
                continue
            else:
                n = self._image.readinto(pos, view[pos - self._pos:])
            if not n:
                break
            pos += n
        n = pos - self._pos
        self._pos = self._last_end = pos
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        data = self._image.read(self._pos, max(0, self._image.virtual_size - self._pos))
        self._pos += len(data)
        return data

    @property
    def name(self) -> str:
        return self._image.filename
