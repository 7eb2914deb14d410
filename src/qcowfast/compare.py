"""Compare the guest contents of two images, as `qemu-img compare` does.

Both images are walked as extents first: a range both sides know to read as zeros (zero or
unallocated clusters, holes of raw files) is skipped without a read; a range one side knows to
be zero only needs the other side read and tested for zeros; only ranges with data on both
sides are read and compared byte for byte. Semantics follow QEMU 7.2 qemu-img.c img_compare():
differences are reported at the start of the first differing 512-byte sector, and when the
images differ in size the larger one's extra tail must read as zeros (unless strict).

Strict mode (-s) also compares QEMU's block status word at every step of img_compare's loop,
so it walks each image in the runs bdrv_block_status_above() would return (see blockstatus.py),
including the BDRV_BLOCK_EOF flag of a run that reaches the end of the image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from . import _plain
from .blockstatus import (BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_EOF,
                          BDRV_BLOCK_ZERO, Status as _Status, status_runs as _status_runs)
from .constants import ExtentKind
from .errors import CompareError, QcowError, TruncatedImage
from .image import Image, RawImage, open_source
from .mapping import _raw_pieces, metadata_preallocated
from .paths import directories

SECTOR = 512
IO_BUF_SIZE = 2 * 1024 * 1024    # qemu-img.c: bytes img_compare reads per side and step
INT_MAX = 2 ** 31 - 1            # qcow2_co_block_status(): bytes = MIN(INT_MAX, count)


class _Piece(NamedTuple):
    """A run of guest bytes of one image: zero when metadata says it reads as zeros."""
    start: int
    end: int
    zero: bool


class _RawSource:
    """A raw image file; its size rounded up to whole sectors, as QEMU sees it."""
    max_pnum = None                 # file-posix answers runs of any length

    def __init__(self, raw: RawImage):
        self.name, self.raw, self.fd = raw.filename, raw, raw.data_fd
        self.file_size, self.size = raw.data_size, raw.virtual_size

    def pieces(self, start: int, end: int) -> Iterator[_Piece]:
        stop = min(end, self.file_size)
        if start < stop:
            for s, n, is_data in _raw_pieces(self.fd, start, stop - start):
                yield _Piece(s, s + n, not is_data)
        if max(start, stop) < end:                 # the partial last sector reads as zeros
            yield _Piece(max(start, stop), end, True)

    def status_runs(self, end: int) -> Iterator[_Status]:
        return _status_runs(self.raw, 0, end, {})

    def host_range(self, offset: int, n: int) -> tuple[int, int] | None:
        """(fd, file offset) holding guest bytes [offset, offset + n), or None."""
        return (self.fd, offset) if offset + n <= self.file_size else None

    def readinto(self, offset: int, buf) -> None:
        _pread_zero_filled(self.fd, memoryview(buf), offset)

    def close(self) -> None:
        self.raw.close()


class _QcowSource:
    """A QCOW2 image with its backing chain."""
    max_pnum = INT_MAX

    def __init__(self, image: Image):
        self.name = image.filename
        self.image = image
        self.size = self.image.virtual_size // SECTOR * SECTOR   # QEMU: whole sectors
        self._prealloc: dict = {}           # depth -> mapping.metadata_preallocated(layer)

    def pieces(self, start: int, end: int) -> Iterator[_Piece]:
        return _until_faults(self.image, self._pieces, start, end,
                             lambda a, b: _Piece(a, b, False))

    def _pieces(self, start: int, end: int) -> Iterator[_Piece]:
        image = self.image
        prealloc = self._prealloc
        for e in image.extents(start, end - start):
            g0, g1 = e.guest_offset, e.guest_offset + e.length
            layer = image.layer(e.depth)
            if e.kind == ExtentKind.DATA and isinstance(layer, RawImage):
                for s, n, is_data in _raw_pieces(layer.data_fd, g0, e.length):
                    yield _Piece(s, s + n, not is_data)
                continue
            if e.kind == ExtentKind.DATA:
                if e.depth not in prealloc:
                    prealloc[e.depth] = metadata_preallocated(layer)
                if prealloc[e.depth]:
                    # As QEMU reads them (block status with BDRV_BLOCK_RECURSE): the host
                    # file's holes in a metadata-preallocated layer's data clusters are zeros.
                    delta = e.host_offset - g0
                    for s, n, is_data in _raw_pieces(layer.data_fd, e.host_offset, e.length):
                        yield _Piece(s - delta, s - delta + n, not is_data)
                    continue
            yield _Piece(g0, g1, e.kind not in (ExtentKind.DATA, ExtentKind.COMPRESSED))

    def status_runs(self, end: int) -> Iterator[_Status]:
        prealloc: dict = {}
        return _until_faults(
            self.image, lambda a, b: _status_runs(self.image, a, b, prealloc), 0, end,
            lambda a, b: _Status(a, b, BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, -1))

    def host_range(self, offset: int, n: int) -> tuple[int, int] | None:
        """(fd, file offset) holding guest bytes [offset, offset + n) as they are, when one
        data run of one layer (not compressed) holds them all; else None."""
        got = None
        try:
            for e in self.image.extents(offset, n):
                if got is not None or e.kind != ExtentKind.DATA or e.guest_offset > offset or \
                        e.guest_offset + e.length < offset + n:
                    return None
                got = (self.image.layer(e.depth).data_fd,
                       e.host_offset + offset - e.guest_offset)
        except QcowError:
            return None                 # (a compressed cluster's fault: the read meets it)
        return got

    def readinto(self, offset: int, buf) -> None:
        try:
            self.image.readinto(offset, buf)
        except TruncatedImage:
            self._read_short_clusters(offset, memoryview(buf))

    def _read_short_clusters(self, offset: int, view) -> None:
        """readinto() where a data cluster starts before the end of its file and runs past
        it: QEMU reads the missing part as zeros (file-posix fills a short read with zeros),
        so img_compare compares it (README "Differences": refused by convert and reads only).
        Other faults raise as in Image.readinto()."""
        for e in self.image.extents(offset, len(view)):
            a = e.guest_offset - offset
            layer = self.image.layer(e.depth)
            if e.kind == ExtentKind.DATA and isinstance(layer, Image):
                _pread_zero_filled(layer.data_fd, view[a:a + e.length], e.host_offset)
            else:
                self.image.readinto(e.guest_offset, view[a:a + e.length])

    def close(self) -> None:
        self.image.close()


def _pread_zero_filled(fd: int, view, offset: int) -> None:
    """Fill `view` from `fd` at `offset`, with zeros past the end of the file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            view[got:] = bytes(len(view) - got)
            break
        got += n


def _read_fault(exc: QcowError):
    """(guest offset, cluster size) of the compressed cluster whose L2 entry `exc` refuses
    where QEMU's block status passes it, else None. qcow2_get_host_offset() takes a compressed
    descriptor as it is (COPIED flag set, stream past the end of the file): only the read of
    that cluster fails (img_compare: "Error while reading offset", exit 4, not 3). An image
    with an external data file fails the query itself."""
    got = _bad_l2_entry(exc)
    if got is None or got[0].header.has_data_file:
        return None
    layer, cluster = got
    entry = layer._entry_at(cluster)
    return (exc.guest_offset, layer.cluster_size) if entry[0] >> 62 & 1 else None


def _bad_l2_entry(exc: QcowError):
    """(layer, cluster index) of the L2 entry `exc` refuses, else None (an L1 entry's
    error, or no entry named)."""
    layer = getattr(exc, "_bad_layer", (None,))[0]
    at = getattr(exc, "guest_offset", None)
    if not isinstance(layer, Image) or at is None or at % layer.cluster_size:
        return None
    cluster = at // layer.cluster_size
    if int(layer._l2_offsets[cluster // layer._l2_entries]) <= 0:
        return None
    return layer, cluster


_L2E_RESERVED = 0x3F000000000001FE         # bits 1-8 and 56-61 (qcow2.txt)


def _query_start(image: Image, exc: QcowError, done: int) -> int:
    """Where QEMU's block status query that reaches `exc`'s bad entry starts (from `done`):
    `Image._failing_query`; but an entry QEMU reads as it is (reserved bits set, a data
    cluster past the end of the file: README "Differences") in the top layer may continue
    the run before it (count_contiguous_subclusters()): qcowfast cannot answer that run, so
    fails where it starts."""
    stop = max(done, image._failing_query(exc, done))
    got = _bad_l2_entry(exc)
    if got is None or got[0] is not image or stop != exc.guest_offset:
        return stop
    if isinstance(exc, TruncatedImage) or image._entry_at(got[1])[0] & _L2E_RESERVED:
        stop = max(done, image._scan_start(stop, done)[0])
    return stop


def _until_faults(image: Image, walk, start: int, end: int, bad_run) -> Iterator:
    """The runs walk(a, b) yields over [start, end) (each with an `end`), as far as QEMU's
    block status queries get before a bad L2 entry stops them.

    A bad entry stops the walk where the query that meets it starts
    (`Image._failing_query`, as for map): the runs before it are yielded, so that what
    differs there is found first (the kernel refuses a whole slice of entries), then the
    error is raised. A compressed cluster that QEMU's block status passes but whose read
    fails (`_read_fault`) is one run of its own instead, bad_run(a, b): data, so that the
    comparison reads it and fails there (exit 4), and the walk goes on after it."""
    done = start
    while done < end:
        try:
            for run in walk(done, end):
                yield run
                done = run.end
            return
        except QcowError as exc:
            at = getattr(exc, "guest_offset", None)
            if at is None or at < done or not hasattr(exc, "_bad_layer"):
                raise
            fault = _read_fault(exc)
            stop = at if fault else _query_start(image, exc, done)
            if done < stop:                 # (the runs the error cut short before it)
                for run in walk(done, stop):
                    yield run
            if fault is None:
                raise
            done = min(at + fault[1], end)
            yield bad_run(at, done)


def _has_hole(fd: int, offset: int, n: int) -> bool:
    """Whether [offset, offset + n) of file `fd` holds a hole (or cannot be told). Such a
    range is read, not mapped: a read fault on a tmpfs hole allocates a page, so a read-only
    compare would grow the files it compares."""
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + n
    except OSError:
        return True


def _open_source(path: str, fmt: str | None, backing_dirs, force_share: bool = False):
    # Probed as qemu-img probes (foreign formats refused by name); FIFOs and sockets refused.
    src = open_source(path, fmt, backing_dirs=backing_dirs, force_share=force_share)
    return _RawSource(src) if isinstance(src, RawImage) else _QcowSource(src)


@dataclass
class CompareResult:
    """What `compare` found. `offset` is the first differing offset (sector aligned), if any."""
    identical: bool
    offset: int | None = None
    size_mismatch: bool = False
    #: The lines qemu-img compare prints on stdout.
    messages: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img compare's exit code: 0 identical, 1 different."""
        return 0 if self.identical else 1

    def __bool__(self) -> bool:
        """True only when the images are identical."""
        return self.identical


FALLBACK = object()                 # Comparer.in_place(): compare copies instead


def _nonzero_at(buf, n: int) -> int | None:
    arr = np.frombuffer(buf, np.uint8, n)
    if not arr.any():
        return None
    return int(np.argmax(arr != 0))


def _diff_at(a, b, n: int) -> int | None:
    if (a if n == len(a) else a[:n]) == (b if n == len(b) else b[:n]):
        return None
    x, y = np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)
    return int(np.argmax(x != y))


def _answer_end(run: _Status, pos: int, max_pnum: int | None) -> int:
    """End of the range a block status query at `pos` inside `run` answers."""
    return run.end if max_pnum is None else min(run.end, pos + max_pnum)


# qemu-img compare's exit codes for an image that opened but could not be read.
STATUS_FAILED, READ_FAILED = 3, 4


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and not isinstance(exc, QcowError) \
        and exc.strerror else str(exc)


def _allocation(src, runs: Iterator) -> Iterator:
    """`runs` (src's pieces or status runs); a failure is qemu-img's "Sector allocation test
    failed" (exit 3)."""
    try:
        yield from runs
    except (QcowError, OSError) as exc:
        raise CompareError(f"Sector allocation test failed for {src.name}: {_why(exc)}",
                           STATUS_FAILED) from exc


class _Comparer:
    def __init__(self, a, b, progress):
        self.a, self.b = a, b
        self.progress = progress
        self.total = max(a.size, b.size)
        self.buf_a = bytearray(IO_BUF_SIZE)
        self.buf_b = bytearray(IO_BUF_SIZE)

    def report(self, pos: int) -> None:
        # Two empty images: img_compare's loops never run, so only its first report (0%) is
        # printed (a total of 0 would report 100%).
        if self.progress is not None:
            self.progress(*((pos, self.total) if self.total else (0, 1)))

    @staticmethod
    def read(src, pos: int, view) -> None:
        """src.readinto(); a failure is qemu-img's "Error while reading offset" (exit 4)."""
        try:
            src.readinto(pos, view)
        except (QcowError, OSError) as exc:
            raise CompareError(f"Error while reading offset {pos} of {src.name}: {_why(exc)}",
                               READ_FAILED) from exc

    def common(self, end: int):
        """Compare [0, end); return (kind, offset) of the first difference or None.

        With a progress report, walks img_compare's chunks (block status runs, see
        `stepped`) so that the report steps where qemu-img's does; else the merged extents,
        which find the same first difference with fewer steps."""
        if self.progress is not None:
            return self.stepped(end, strict=False)
        ia, ib = _allocation(self.a, self.a.pieces(0, end)), _allocation(self.b,
                                                                          self.b.pieces(0, end))
        pa, pb = next(ia, None), next(ib, None)
        pos = 0
        while pos < end:
            stop = min(pa.end, pb.end)
            if not (pa.zero and pb.zero):
                found = self.content(pos, stop, pa.zero, pb.zero)
                if found is not None:
                    return "content", found
            pos = stop
            self.report(pos)
            if pa.end == stop:
                pa = next(ia, None)
            if pb.end == stop:
                pb = next(ib, None)
        return None

    def stepped(self, end: int, strict: bool = True):
        """Compare [0, end) as img_compare's loop does, step by step (strict: of two images
        of size `end`, block status words compared too).

        Returns ("status" or "content", offset) of the first difference, or None.

        Each step queries both images at `pos`: the status word is the run's flags, plus
        BDRV_BLOCK_EOF when the answered range reaches the image's end (block/io.c
        bdrv_co_common_block_status_above()); a qcow2 answer is at most INT_MAX bytes long.
        The step advances by the shorter answer, IO_BUF_SIZE at most when data is read.
        """
        if end == 0:
            return None
        ia = _allocation(self.a, self.a.status_runs(end))
        ib = _allocation(self.b, self.b.status_runs(end))
        ra, rb = next(ia), next(ib)
        pos = 0
        while pos < end:
            while ra.end <= pos:
                ra = next(ia)
            while rb.end <= pos:
                rb = next(ib)
            stop_a = _answer_end(ra, pos, self.a.max_pnum)
            stop_b = _answer_end(rb, pos, self.b.max_pnum)
            flags_a = ra.flags | (BDRV_BLOCK_EOF if stop_a in (end, ra.eof_at) else 0)
            flags_b = rb.flags | (BDRV_BLOCK_EOF if stop_b in (end, rb.eof_at) else 0)
            if strict and flags_a != flags_b:
                return "status", pos
            stop = min(stop_a, stop_b)
            # Zero on both sides: skipped. Else read (an unallocated range always reads as
            # ZERO): qemu-img reads both sides when both are allocated, else the allocated
            # one; the first non-zero sector of one side that reads as zeros is where
            # compare_buffers() would find the first difference.
            zero_a, zero_b = flags_a & BDRV_BLOCK_ZERO, flags_b & BDRV_BLOCK_ZERO
            if not (zero_a and zero_b):
                stop = min(stop, pos + IO_BUF_SIZE)
                found = self.content(pos, stop, bool(zero_a), bool(zero_b))
                if found is not None:
                    return "content", found
            pos = stop
            self.report(pos)
        return None

    def in_place(self, pos: int, n: int):
        """The first differing offset in [pos, pos + n) from pos (None: none), compared in
        the page cache when each side's bytes lie as they are in one range of one file;
        FALLBACK when they do not (compressed, split, past a file's end) or a file shrank."""
        ra, rb = self.a.host_range(pos, n), self.b.host_range(pos, n)
        if ra is None or rb is None or _has_hole(*ra, n) or _has_hole(*rb, n):
            return FALLBACK
        at = _plain.first_difference(*ra, *rb, n)
        return FALLBACK if at == _plain.FALLBACK else None if at == n else at

    def content(self, start: int, end: int, zero_a: bool, zero_b: bool) -> int | None:
        """First differing offset in [start, end) where at least one side may hold data.
        Steps of IO_BUF_SIZE, each reported as done, as img_compare's loop reports them."""
        for pos in range(start, end, IO_BUF_SIZE):
            n = min(IO_BUF_SIZE, end - pos)
            if zero_a or zero_b:
                src, buf = (self.b, self.buf_b) if zero_a else (self.a, self.buf_a)
                self.read(src, pos, memoryview(buf)[:n])
                at = _nonzero_at(buf, n)
            else:
                at = self.in_place(pos, n)
                if at is FALLBACK:
                    self.read(self.a, pos, memoryview(self.buf_a)[:n])
                    self.read(self.b, pos, memoryview(self.buf_b)[:n])
                    at = _diff_at(self.buf_a, self.buf_b, n)
            if at is not None:
                # QEMU reports the start of the first differing sector of its read, and its
                # reads start where block status runs start (sector aligned, or the end of a
                # raw file whose size is not).
                return pos + at // SECTOR * SECTOR
            self.report(pos + n)
        return None

    def tail(self, src, start: int, end: int) -> int | None:
        """First offset in [start, end) of `src` that does not read as zeros."""
        if self.progress is not None:
            return self.stepped_tail(src, start, end)
        for p in _allocation(src, src.pieces(start, end)):
            if not p.zero:
                found = self.content(p.start, p.end, True, False) if src is self.b else \
                    self.content(p.start, p.end, False, True)
                if found is not None:
                    return found
            self.report(p.end)
        return None

    def stepped_tail(self, src, start: int, end: int) -> int | None:
        """tail() in img_compare's chunks: block status runs of `src` from `start`, data
        (allocated, not zero) read IO_BUF_SIZE at a time, each chunk reported."""
        runs = _allocation(src, src.status_runs(end))
        run = next(runs)
        pos = start
        while pos < end:
            while run.end <= pos:
                run = next(runs)
            stop = _answer_end(run, pos, src.max_pnum)
            if run.flags & BDRV_BLOCK_ALLOCATED and not run.flags & BDRV_BLOCK_ZERO:
                stop = min(stop, pos + IO_BUF_SIZE)
                found = self.content(pos, stop, src is self.b, src is self.a)
                if found is not None:
                    return found
            pos = stop
            self.report(pos)
        return None


def compare(a, b, *, fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False,
            progress=None, backing_dirs=(), force_share: bool = False,
            on_message=None) -> CompareResult:
    """Compare the guest contents of images `a` and `b` like `qemu-img compare`.

    Parameters
    ----------
    a, b : str or os.PathLike
        The images: qcow2 (read through their backing chains) or raw.
    fmt_a, fmt_b : "qcow2", "raw" or None
        Formats (qemu-img's -f and -F); None probes the QCOW2 magic.
    strict : bool
        Also fail on a size difference and on a difference of block status (qemu-img -s: the
        word bdrv_block_status_above() returns at each step of its loop, EOF flag included).
    progress : callable(done, total), optional
        Called with guest bytes compared so far.
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing files (see `qcowfast.open`).
    force_share : bool
        Read images a running QEMU holds open for writing (qemu-img -U).
    on_message : callable(str), optional
        Called with each of the result's messages as soon as it is known, between progress
        calls, in the order qemu-img prints them.

    Returns
    -------
    CompareResult
        `identical`, the first differing `offset` (the start of its 512-byte sector), and the
        messages qemu-img prints.

    Raises
    ------
    CompareError
        An image opened but could not be read; its `exit_code` is qemu-img's (3: what is
        allocated could not be found; 4: data could not be read).
    QcowError, OSError
        An image cannot be opened (qemu-img exits with 2).
    """
    from .arguments import boolean, callback, format_name
    strict, force_share = boolean(strict, "strict"), boolean(force_share, "force_share")
    progress, on_message = callback(progress, "progress"), callback(on_message, "on_message")
    fmt_a, fmt_b = format_name(fmt_a, "fmt_a"), format_name(fmt_b, "fmt_b")
    a, b = os.fsdecode(os.fspath(a)), os.fsdecode(os.fspath(b))
    dirs = directories(backing_dirs)
    src_a = _open_source(a, fmt_a, dirs, force_share)
    try:
        src_b = _open_source(b, fmt_b, dirs, force_share)
    except BaseException:
        src_a.close()
        raise
    try:
        return _compare(src_a, src_b, strict, progress, on_message)
    finally:
        src_a.close()
        src_b.close()


def holds_guest_bytes(image, path: str, fmt: str) -> bool:
    """Whether the image file at `path` (format `fmt`, "raw" or "qcow2") has the virtual size
    and the guest bytes of the open `image`: how a finished conversion's output is recognised
    (qcowfast.dask, after a worker was lost). False too when `path` cannot be opened or read."""
    try:
        other = _open_source(path, fmt, ())
    except (QcowError, OSError):
        return False
    try:
        size = other.file_size if isinstance(other, _RawSource) else other.image.virtual_size
        if size != image.virtual_size:
            return False
        mine = _RawSource(image) if isinstance(image, RawImage) else _QcowSource(image)
        return _compare(mine, other, False, None, None).identical
    except (QcowError, OSError):
        return False
    finally:
        other.close()


def _compare(a, b, strict: bool, progress, on_message) -> CompareResult:
    messages: list[str] = []

    def say(text: str) -> None:
        messages.append(text)
        if on_message is not None:
            on_message(text)

    cmp = _Comparer(a, b, progress)
    cmp.report(0)                               # (qemu-img reports 0% once both are open)
    if strict and a.size != b.size:
        say("Strict mode: Image size mismatch!")
        return CompareResult(False, None, True, messages)
    common = min(a.size, b.size)
    found = cmp.stepped(common) if strict else cmp.common(common)
    if found is not None:
        kind, offset = found
        say(f"Strict mode: Offset {offset} block status mismatch!" if kind == "status"
            else f"Content mismatch at offset {offset}!")
        return CompareResult(False, offset, a.size != b.size, messages)
    if a.size != b.size:
        say("Warning: Image size mismatch!")
        bigger = a if a.size > b.size else b
        offset = cmp.tail(bigger, common, bigger.size)
        if offset is not None:
            say(f"Content mismatch at offset {offset}!")
            return CompareResult(False, offset, True, messages)
    cmp.report(cmp.total)
    say("Images are identical.")
    return CompareResult(True, None, a.size != b.size, messages)


__all__ = ["compare", "CompareResult"]
