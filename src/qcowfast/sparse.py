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
from .errors import OutputError
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


class RequestStarts:
    """The guest offsets where qemu-img convert's requests over `image` start (requests()),
    asked for in guest order: `within(start, end)` gives those strictly inside (start, end),
    for ranges that never go back. Read as they are asked for (a fragmented image has one
    request per extent: never all of them held at once)."""

    def __init__(self, image):
        self._starts = (sector * SECTOR for sector, _, _ in requests(image))
        self._next = next(self._starts, None)

    def within(self, start: int, end: int) -> list[int]:
        out = []
        while self._next is not None and self._next < end:
            if self._next > start:
                out.append(self._next)
            self._next = next(self._starts, None)
        return out


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


def _raw_writes(image, sparse_size: int):
    """Yield qemu-img convert -O raw -S `sparse_size`'s writes over `image`, request by request
    (convert_co_write): ("data", offset, view) for the bytes it writes (the view is reused),
    ("zero", start, end) for each write-zeroes request (zero extents, and the zero runs
    is_allocated_sectors_min leaves in a data request, one request each) and ("done", end, 0)
    after each request."""
    from .convert import _plan
    for _ in _plan(image, 8 << 20):
        pass                    # refuses host clusters two guest clusters share, as every path
    low = sparse_size // SECTOR
    align = 1 << (low.bit_length() - 1)
    vsize = image.virtual_size
    view = memoryview(bytearray(BUF_SECTORS * SECTOR))
    for sector, n, data in requests(image):
        off = sector * SECTOR
        end = min(off + n * SECTOR, vsize)
        if data:
            chunk = view[:end - off]
            image.readinto(off, chunk)
            pos = off
            starts, ends = _tables.sparse_writes(_tables.sector_mask(chunk), sector, low, align)
            for a, b in zip(starts.tolist(), ends.tolist()):
                lo, hi = off + a * SECTOR, min(off + b * SECTOR, end)
                if pos < lo:
                    yield "zero", pos, lo
                yield "data", lo, chunk[lo - off:hi - off]
                pos = hi
            if pos < end:
                yield "zero", pos, end
        else:
            yield "zero", off, end
        yield "done", end, 0


def write_raw(image, fd: int, sparse_size: int, progress=None) -> int:
    """Write `image`'s guest bytes into the sized, empty file `fd` as qemu-img convert -O raw
    -S `sparse_size` writes them, request by request (one thread); return the bytes written.
    """
    from .convert import _write_all
    vsize = image.virtual_size
    written = 0
    for what, off, piece in _raw_writes(image, sparse_size):
        if what == "data":
            _write_all(fd, piece, off)
            written += len(piece)
        elif what == "done" and progress:
            progress(off, vsize)
    return written


def write_raw_in_place(image, out, sparse_size: int, zero_holes: bool, progress=None,
                       max_output_size=None) -> int:
    """qemu-img convert -n -O raw -S `sparse_size` into the existing regular file of
    FileOutput `out`: its requests replayed, each write-zeroes request a hole punched on its
    own when `zero_holes` (file-posix's handle_aiocb_write_zeroes_unmap: a file system block
    only partly inside one request is zeroed, not freed, so which blocks stay allocated
    depends on the request boundaries). Return the bytes of data written."""
    vsize = image.virtual_size
    written = 0
    for what, off, piece in _raw_writes(image, sparse_size):
        if what == "data":
            out.pwrite(piece, off)
            written += len(piece)
            if max_output_size is not None and written > max_output_size:
                raise OutputError(f"{out.name}: output exceeds max_output_size "
                                  f"({max_output_size} bytes); stopped, {out.name} is "
                                  "incomplete")
        elif what == "zero":
            if zero_holes:
                out.zero_range(off, piece, keep_allocated=False)
        elif progress:
            progress(off, vsize)
    return written
