"""A file-like view of an image's guest contents (io.RawIOBase, read-only, seekable)."""
from __future__ import annotations

import io


class ImageFile(io.RawIOBase):
    """Read-only, seekable file object over `image`; closing it does not close the image."""

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._pos = 0

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
        n = self._image.readinto(self._pos, buffer)
        self._pos += n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        data = self._image.read(self._pos, max(0, self._image.virtual_size - self._pos))
        self._pos += len(data)
        return data

    @property
    def name(self) -> str:
        return self._image.filename
