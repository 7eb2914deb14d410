"""qemu-img convert's sparse detection (`-S`), as QEMU 7.2 applies it.

qemu-img decides what to write request by request (qemu-img.c): it walks the source's block
status (bdrv_block_status_above) and cuts data extents into requests of at most 2 MiB
(convert_iteration_sectors); in a data request, zero runs of at least -S bytes are skipped and
shorter ones between data are written, aligned to pow2floor(-S) (convert_co_write,
is_allocated_sectors_min); zero and unallocated extents are never written to a new image.
With clusters of at least -S bytes that is exactly "store the clusters that are not all
zeros", the writer's own rule; with smaller clusters the zero clusters qemu-img writes depend
on those request boundaries, so they are reproduced here from the source's block status
(blockstatus.py, shared with compare -s), with the source-alignment tail rule and the request
caps.
"""
from __future__ import annotations

from . import _tables
from .blockstatus import BDRV_BLOCK_ZERO, status_runs
from .convert import np
from .image import RawImage

SECTOR = 512
MAX_REQUEST = ((1 << 31) - 1) // SECTOR     # BDRV_REQUEST_MAX_SECTORS
BUF_SECTORS = (2 << 20) // SECTOR           # IO_BUF_SIZE: qcow2 targets never raise it


class BlockStatus:
    """bdrv_block_status_above(image, NULL, off, nbytes) as qemu-img convert reads it, for
    queries at offsets that never go back: (reads as zero, bytes) of the run from `off`.

    The runs come from one walk over the image (status_runs): a query inside a run answers
    that run's end, whatever offset it starts at. (A walk per query, classifying everything
    from `off` to get one run, made a fragmented image's plan quadratic.)"""

    def __init__(self, image):
        end = -(-image.virtual_size // SECTOR) * SECTOR
        self._runs = status_runs(image, 0, end, {})
        self._run = None

    def __call__(self, off: int, nbytes: int) -> tuple[bool, int]:
        run = self._run
        while run is None or run.end <= off:
            run = self._run = next(self._runs)
        return bool(run.flags & BDRV_BLOCK_ZERO), min(run.end, off + nbytes) - off


def requests(image):
    """Yield qemu-img convert's requests over `image`: (first sector, sectors, is data)."""
    total = -(-image.virtual_size // SECTOR)
    align = 1 if isinstance(image, RawImage) else image.cluster_size // SECTOR
    sector = next_status = 0
    data = False
    block_status = BlockStatus(image)
    while sector < total:
        n = min(total - sector, MAX_REQUEST)
        if next_status <= sector:
            zero, count = block_status(sector * SECTOR, n * SECTOR)
            count = -(-count // SECTOR)
            # Keep the next status query aligned to the source's clusters.
            tail = (sector + count) % align
            if count > tail:
                count -= tail
            data, next_status = not zero, sector + count
        n = min(n, next_status - sector)
        if data:
            n = min(n, BUF_SECTORS)
        yield sector, n, data
        sector += n


class SparsePlan:
    """The zero clusters qemu-img writes into a new plain QCOW2 image of `cluster_size` with
    `-S sparse_size` (0 < sparse_size, cluster_size < sparse_size), decided unit by unit in
    guest order: feed each unit's sector_mask with `add`; a unit's answer (`forced`) is final
    once the next unit was added, or `finish` was called."""

    def __init__(self, image, sparse_size: int, cluster_size: int, unit: int):
        self.min = sparse_size // SECTOR
        self.align = 1 << (self.min.bit_length() - 1)
        self.cs = cluster_size
        self.unit_sectors = unit // SECTOR
        self.total = -(-image.virtual_size // SECTOR)
        self.requests = requests(image)
        self.waiting = None                     # a data request not wholly added yet
        self.masks: dict = {}
        self.force: dict = {}

    def add(self, ui: int, mask) -> None:
        """Unit `ui`'s sector_mask (units come in order)."""
        self.masks[ui] = mask
        ncl = -(-len(mask) * SECTOR // self.cs)
        self.force[ui] = np.zeros(ncl, bool)
        self._advance(min((ui + 1) * self.unit_sectors, self.total))

    def finish(self) -> None:
        self._advance(self.total)

    def forced(self, ui: int):
        """Bool per cluster of unit `ui`: qemu-img writes it (zeros included)."""
        self.masks.pop(ui, None)
        return self.force.pop(ui)

    def _advance(self, end: int) -> None:
        while True:
            req = self.waiting or next(self.requests, None)
            if req is None:
                return
            sector, n, data = req
            if data and sector + n > end:
                self.waiting = req
                return
            self.waiting = None
            if data:
                self._apply(sector, n)

    def _apply(self, sector: int, n: int) -> None:
        us = self.unit_sectors
        parts = []
        for u in range(sector // us, (sector + n - 1) // us + 1):
            a = max(sector, u * us) - u * us
            b = min(sector + n, (u + 1) * us) - u * us
            # A unit the writer skipped held no data: it reads as zeros.
            mask = self.masks.get(u)
            parts.append(mask[a:b] if mask is not None else np.zeros(b - a, np.uint8))
        mask = parts[0] if len(parts) == 1 else np.concatenate(parts)
        starts, ends = _tables.sparse_writes(mask, sector, self.min, self.align)
        if not len(starts):
            return
        per_cluster = self.cs // SECTOR
        c0 = (starts + sector) // per_cluster
        c1 = -(-(ends + sector) // per_cluster)
        ucl = us // per_cluster
        for a, b in zip(c0.tolist(), c1.tolist()):
            while a < b:
                u = a // ucl
                stop = min(b, (u + 1) * ucl)
                if u in self.force:
                    self.force[u][a - u * ucl:stop - u * ucl] = True
                a = stop


def write_raw(image, fd: int, sparse_size: int, progress=None) -> int:
    """Write `image`'s guest bytes into the sized, empty file `fd` as qemu-img convert -O raw
    -S `sparse_size` writes them, request by request (one thread); return the bytes written.
    """
    from .convert import _plan, _write_all
    for _ in _plan(image, 8 << 20):
        pass                    # refuses host clusters two guest clusters share, as every path
    low = sparse_size // SECTOR
    align = 1 << (low.bit_length() - 1)
    vsize = image.virtual_size
    view = memoryview(bytearray(BUF_SECTORS * SECTOR))
    written = 0
    for sector, n, data in requests(image):
        off = sector * SECTOR
        if data:
            length = min(n * SECTOR, vsize - off)
            chunk = view[:length]
            image.readinto(off, chunk)
            starts, ends = _tables.sparse_writes(_tables.sector_mask(chunk), sector, low, align)
            for a, b in zip(starts.tolist(), ends.tolist()):
                lo, hi = a * SECTOR, min(b * SECTOR, length)
                _write_all(fd, chunk[lo:hi], off + lo)
                written += hi - lo
        if progress:
            progress(min(off + n * SECTOR, vsize), vsize)
    return written
