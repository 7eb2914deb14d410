"""Metadata reads as QEMU's block layer serves them (no numpy: `info` and `open` start fast)."""
from __future__ import annotations

import os

from .errors import CorruptImage

MAX_OFFSET = (1 << 63) - 1


def pread_padded(fd: int, length: int, offset: int) -> bytes:
    """Read `length` bytes at `offset`; what lies past the end of the file reads as zeros.

    This is how QEMU's block layer serves reads of metadata past the end of an image file
    (bdrv_aligned_preadv() zero-fills them), so a checker that mirrors `qemu-img check` must
    read the same way instead of failing. Offsets past 2**63 cannot be read (CorruptImage), as
    QEMU refuses such requests.
    """
    if offset < 0 or offset + length > MAX_OFFSET:
        raise CorruptImage(f"read of {length} bytes at {offset:#x} is beyond any possible file "
                           "offset")
    out = bytearray(length)
    view = memoryview(out)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return bytes(out)
