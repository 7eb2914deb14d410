"""Stored reference counts: the refcount table and its refcount blocks, read-only.

Layout: QEMU docs/interop/qcow2.txt "Host cluster management" and "Refcount blocks". A refcount
block is one cluster of `refcount_bits`-wide entries (refcount_order 0..6: 1 to 64 bits). Entries
of 8 bits and more are big-endian integers; narrower entries are packed into bytes starting at
the least significant bit (entry i of a 1-bit block is bit i % 8 of byte i // 8), as QEMU's
get_refcount_ro0..ro2() read them.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .constants import REFT_OFFSET_MASK
from .errors import CorruptImage
from .header import Header
from .preads import MAX_OFFSET, pread_padded  # noqa: F401 - re-exported for check

_BLOCK_CACHE = 64          # decoded refcount blocks kept for random look-ups


def decode_refcount_block(block, refcount_order: int) -> np.ndarray:
    """Decode one refcount block (bytes of one cluster) into a native uint64 array."""
    raw = np.frombuffer(block, np.uint8)
    bits = 1 << refcount_order
    if bits < 8:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        mask = np.uint8((1 << bits) - 1)
        return ((raw[:, None] >> shifts) & mask).reshape(-1).astype(np.uint64)
    dtype = {8: np.uint8, 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
    return np.frombuffer(block, dtype).astype(np.uint64)


class StoredRefcounts:
    """The refcounts an image stores, looked up the way QEMU's qcow2_get_refcount() does.

    A cluster whose refcount table index lies past the table, or whose table entry is zero, has
    refcount 0. A refcount block whose offset is not cluster aligned cannot be read: look-ups
    of its clusters fail (`lookup` reports them in its `ok` mask). Blocks past the end of the
    file read as zeros.
    """

    def __init__(self, fd: int, header: Header):
        self.fd = fd
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.refcount_order = header.refcount_order
        #: log2 of the number of entries in one refcount block
        self.block_bits = header.cluster_bits + 3 - header.refcount_order
        self.refcount_max = (1 << header.refcount_bits) - 1
        nbytes = header.refcount_table_clusters * header.cluster_size
        raw = pread_padded(fd, nbytes, header.refcount_table_offset)
        #: the raw refcount table entries (native uint64)
        self.table = np.frombuffer(raw, ">u8").astype(np.uint64)
        self._cache: OrderedDict = OrderedDict()

    def block_offset(self, index: int) -> int:
        """Masked offset of refcount block `index` (0: none)."""
        if index >= len(self.table):
            return 0
        return int(self.table[index]) & REFT_OFFSET_MASK

    def block(self, index: int) -> np.ndarray | None:
        """Decoded refcount block `index`; None when it cannot be read (unaligned offset, or
        an offset past 2**63).

        An absent block (index past the table, or a zero entry) decodes as all zeros.
        """
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        offset = self.block_offset(index)
        if offset & (self.cluster_size - 1):
            return None
        if offset == 0:
            values = np.zeros(1 << self.block_bits, np.uint64)
        else:
            try:
                raw = pread_padded(self.fd, self.cluster_size, offset)
            except CorruptImage:
                return None
            values = decode_refcount_block(raw, self.refcount_order)
        self._cache[index] = values
        while len(self._cache) > _BLOCK_CACHE:
            self._cache.popitem(last=False)
        return values

    def lookup(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (refcounts uint64, ok bool) for an array of host cluster indices."""
        clusters = np.asarray(clusters, np.int64)
        values = np.zeros(len(clusters), np.uint64)
        ok = np.ones(len(clusters), bool)
        if not len(clusters):
            return values, ok
        tindex = clusters >> self.block_bits
        inner = clusters & ((1 << self.block_bits) - 1)
        lo, hi = int(tindex.min()), int(tindex.max())
        blocks = [lo] if lo == hi else np.unique(tindex).tolist()
        for t in blocks:
            sel = tindex == t
            if t >= len(self.table) or not self.block_offset(t):
                continue
            blk = self.block(t)
            if blk is None:
                ok[sel] = False
            else:
                values[sel] = blk[inner[sel]]
        return values, ok
