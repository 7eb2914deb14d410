"""QEMU's block status over an image and its chain (block/io.c bdrv_block_status_above()),
as qemu-img sees it: the runs its loops step through. compare -s compares their flags; the
-S emulation (sparse.py) cuts its requests at their ends.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

from .constants import ExtentKind
from .image import Image, RawImage
from .mapping import _raw_pieces, metadata_preallocated

# QEMU include/block/block-common.h: block status flags.
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20

_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = (int(k) for k in ExtentKind)


class Status(NamedTuple):
    """One run of bdrv_block_status_above() over an image: [start, end) answers `flags`.

    Runs are QEMU's: a query at any offset inside the run returns the run's end as its
    `pnum` (before the INT_MAX cap of qcow2). `eof_at` is `end` when the layer that answered
    sets BDRV_BLOCK_EOF on reaching its own, shorter length (an unallocated bottom layer), else
    -1; reaching the image's own length is checked by the caller.
    """
    start: int
    end: int
    flags: int
    eof_at: int


def qcow2_runs(layer: Image, start: int, end: int) -> Iterator[tuple]:
    """Yield (start, end, kind, host) runs of qcow2 `layer` alone over [start, end), cut as
    qcow2_get_host_offset() cuts them: never across the end of an L2 table, one compressed
    cluster at a time, same subcluster type only, and allocated clusters (normal, zero-alloc,
    unallocated-alloc) only while host-contiguous (count_contiguous_subclusters()).
    """
    per_table = layer._l2_per_l1          # guest bytes one L2 table maps
    cs = layer.cluster_size
    pend = None
    for chunk in layer._own_runs(start, end):
        for g, n, k, h in zip(chunk.guest.tolist(), chunk.length.tolist(), chunk.kind.tolist(),
                              chunk.host.tolist()):
            e = g + n
            while g < e:
                table = g // per_table
                stop = min(e, (table + 1) * per_table)
                if k == _COMPRESSED:
                    stop = min(stop, (g // cs + 1) * cs)
                if (pend is not None and pend[1] == g and pend[2] == k and k != _COMPRESSED
                        and pend[0] // per_table == table and (pend[3] < 0) == (h < 0)
                        and (h < 0 or pend[3] + (g - pend[0]) == h)):
                    pend[1] = stop
                else:
                    if pend is not None:
                        yield tuple(pend)
                    pend = [g, stop, k, h]
                if h >= 0 and k != _COMPRESSED:
                    h += stop - g
                g = stop
    if pend is not None:
        yield tuple(pend)


def layer_flags(kind: int, host: int) -> int:
    """qcow2_co_block_status(): the flags of one subcluster type (no encryption)."""
    if kind == _DATA:
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID
    if kind == _COMPRESSED:
        return BDRV_BLOCK_DATA
    flags = BDRV_BLOCK_OFFSET_VALID if host >= 0 else 0       # zero-alloc, unallocated-alloc
    return flags | BDRV_BLOCK_ZERO if kind == _ZERO else flags


def status_runs(layer, start: int, end: int, prealloc: dict) -> Iterator[Status]:
    """Yield the runs of bdrv_block_status_above() over [start, end) of `layer` and its chain.

    block/io.c bdrv_co_common_block_status_above(): the top layer answers where it allocates
    (data or zero); elsewhere the backing layer is asked for the same range, and past the end
    of a shorter backing layer the range reads as ZERO | ALLOCATED. A layer without backing
    answers its unallocated ranges as ZERO (not allocated), keeping its own EOF flag.
    A raw layer answers file-posix's SEEK_DATA/SEEK_HOLE runs, the hole after the last data
    running to the end (partial last sector included). `prealloc` caches, per layer, QEMU's
    detection of metadata preallocation, under which data clusters also report the holes of
    the host file as zero.
    """
    if isinstance(layer, RawImage):
        for s, n, is_data in _raw_pieces(layer.data_fd, start, end - start):
            flags = BDRV_BLOCK_DATA if is_data else BDRV_BLOCK_ZERO
            yield Status(s, s + n, flags | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED, -1)
        return
    backing = layer.backing
    for a, b, kind, host in qcow2_runs(layer, start, end):
        flags = layer_flags(kind, host)
        if flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
            flags |= BDRV_BLOCK_ALLOCATED
            if kind == _DATA:
                if id(layer) not in prealloc:
                    prealloc[id(layer)] = metadata_preallocated(layer)
                if prealloc[id(layer)]:
                    # bdrv_co_block_status() asks the data file (BDRV_BLOCK_RECURSE), then
                    # drops the RECURSE flag from its answer (as the qemu-img 7.2 in use does).
                    delta = host - a
                    for s, n, is_data in _raw_pieces(layer.data_fd, host, b - a):
                        yield Status(s - delta, s - delta + n,
                                      flags if is_data else flags | BDRV_BLOCK_ZERO, -1)
                    continue
            yield Status(a, b, flags, -1)
        elif backing is None:
            yield Status(a, b, flags | BDRV_BLOCK_ZERO, b if b == layer.virtual_size else -1)
        else:
            mid = min(b, backing.virtual_size)
            if a < mid:
                yield from status_runs(backing, a, mid, prealloc)
            if max(a, mid) < b:
                yield Status(max(a, mid), b, BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, -1)
