"""An opened QCOW2 image: L1 table, L2 slice cache, compressed-cluster cache, backing chain.

Everything above the kernels speaks in runs of guest bytes (the extent seam, see README):
`Image._runs(start, end)` yields `Runs` chunks of numpy arrays resolved through the whole backing
chain; `extents()`, `read()`, `map()` and convert are consumers of that one stream.
"""
from __future__ import annotations

import os
import stat as _stat
import threading
import warnings as _warnings
from array import array
from collections import OrderedDict, namedtuple
from collections.abc import Iterator
from functools import cached_property, wraps
from operator import index as _index

from . import _plain, buffers
from ._lazy import LazyModule
from .arguments import boolean, integer
from .constants import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_CHAIN_DEPTH, QCOW_MAGIC, QCOW_OFLAG_COPIED,
    RAW_FORMATS,
    CompressionType, ExtentKind,
)
from .errors import (
    BackingChainError, CorruptImage, DecompressionError, FormatError, ImageLocked,
    ImageOpenError, QcowError, TruncatedImage, UnsupportedFeature, in_chain,
)
from .header import Header, read_header, warn_stale_bitmaps
from .locks import check_not_locked, hold_read_locks
from .paths import OpenedFile, directories, open_file, resolve_reference
from .probe import detect_format, driver_refusal

TYPE_CHECKING = False
if TYPE_CHECKING:                           # (typing costs start-up; type checkers only)
    from typing import Self

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024      # L2 slice cache budget per image (QEMU's maximum)
COMPRESSED_CACHE_CLUSTERS = 16              # recently inflated clusters kept for small reads
L2_SLICE_BYTES = 64 * 1024                  # L2 tables are read and cached in slices of this size
SMALL_READ = 4 * 1024 * 1024                # reads up to this size take the lean path
MAX_READ = 1 << 30                          # read() returns bytes up to this size at once


def _lru_get(cache: OrderedDict, key):
    """cache[key] marked as most recently used, or None. Takes no lock: get() and
    move_to_end() are each atomic on an OrderedDict, and an eviction racing between them only
    makes move_to_end() miss the key."""
    value = cache.get(key)
    if value is not None:
        try:
            cache.move_to_end(key)
        except KeyError:
            pass
    return value


class _Reads(list):
    """One entry per read in flight on a group of layers (an image and the backing chain it
    opened; see _LinkedReads for a shared `backing=`), and `closing`: the layers closed
    meanwhile, whose descriptors close when the last read leaves (see _Layer.close)."""
    __slots__ = ("closing",)

    def __init__(self):
        super().__init__()
        self.closing = []


class _LinkedReads(_Reads):
    """The group of an image given a shared layer as `backing=`: each of its reads is also a
    read of the backing's group (whose descriptors it may use), while the image's own closed
    layers wait only for its own reads (not for every image sharing that backing)."""
    __slots__ = ("parent",)

    def __init__(self, parent: _Reads):
        super().__init__()
        self.parent = parent

    def append(self, item) -> None:
        self.parent.append(item)
        super().append(item)

    def pop(self, *args):
        item = super().pop(*args)
        parent = self.parent
        parent.pop()
        if parent.closing and not parent:
            _release(parent)
        return item


_CLOSE_LOCK = threading.Lock()


def _release(reads: _Reads) -> None:
    """Close the descriptors of the closed layers of `reads`' group, unless a read is in
    flight (the last one out calls this again)."""
    with _CLOSE_LOCK:
        # Each layer of `closing` was marked closed before it was added (under this lock),
        # so a read registered after this check sees it closed and never uses its descriptors.
        closing = reads.closing
        if reads or not closing:
            return
        reads.closing = []
    for layer in closing:
        layer._close_fds()


def _closed_error() -> ValueError:
    return ValueError("I/O operation on a closed image")


def _reading(method):
    """`method` run as a read in flight (see _Layer.close): ValueError on a closed image."""
    @wraps(method)
    def guarded(self, *args, **kwargs):
        self._enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._leave()
    return guarded


_END = object()


def writable_view(buffer) -> memoryview:
    """`buffer` as a flat writable memoryview of bytes; TypeError, before anything is read, for
    what no read may fill (io.FileIO's rule: read-only or not C-contiguous)."""
    try:
        view = memoryview(buffer)
    except TypeError:
        view = None
    if view is None or view.readonly or not view.c_contiguous:
        what = ("read-only " if view is not None and view.readonly else
                "non-contiguous " if view is not None else "")
        raise TypeError("readinto() argument must be a writable, C-contiguous bytes-like "
                        f"object, not {what}{type(buffer).__name__}")
    return view.cast("B")


def _check_read_size(n: int) -> None:
    """Refuse, before allocating, a read() larger than MAX_READ (readinto takes any buffer)."""
    if n > MAX_READ:
        raise ValueError(f"read() of {n} bytes is over the {MAX_READ}-byte limit; use "
                         "readinto() with your own buffer, or as_file() in pieces")
_ZERO_BYTES = memoryview(bytes(256 * 1024))
_HOLE_BATCH = 16 * 1024 * 1024              # guest window whose holes share one backing walk
_BATCH_ENTRIES = 8192                       # L2 entries of small tables classified in one call
# numpy, the kernels built on it and the inflate kernel load on first use (see _lazy):
# opening an image and converting a plain one (convert's _plain path) never need them.
np = LazyModule("numpy", __name__, "np")
_tables = LazyModule("qcowfast._tables", __name__, "_tables")
_inflate = LazyModule("qcowfast._inflate", __name__, "_inflate")
_EXTENDED_L2 = _plain.FLAGS["extended_l2"]
_DATA_FILE = _plain.FLAGS["data_file"]
_ZERO_OFFSET = array("q", [0])      # one stream, read into the start of its buffer (never written)
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = (int(k) for k in ExtentKind)


# collections.namedtuple rather than typing.NamedTuple: importing typing costs every command 5 ms.
Extent = namedtuple("Extent", "guest_offset length kind host_offset depth")
Extent.__doc__ = "A run of guest bytes served the same way; see ExtentKind."

Runs = namedtuple("Runs", "guest length kind host csize depth")
Runs.__doc__ = """A chunk of runs as parallel numpy arrays (int64, kind uint8), sorted by guest offset.

host is -1 where no host cluster is kept; csize is the compressed stream length of
COMPRESSED runs; depth says which layer of the chain serves each run.
"""


def _single_run(start: int, end: int, kind: int, depth: int) -> Runs:
    one = lambda v: np.array([v], np.int64)  # noqa: E731
    return Runs(one(start), one(end - start), np.array([kind], np.uint8), one(-1), one(0),
                one(depth))


def _open_checked(source, what: str, force_share: bool, owner: str | None = None,
                  keep_dir: bool = False) -> OpenedFile:
    """`source` (a path, or an OpenedFile from paths.resolve_reference) opened, lock-checked.

    On exit the caller owns the returned OpenedFile; QEMU's write lock was tested on it unless
    `force_share` (qemu-img -U). `what`/`owner`/`keep_dir` as in paths.open_file.
    """
    opened = source if isinstance(source, OpenedFile) else open_file(
        source, what, owner=owner, keep_dir=keep_dir)
    if not force_share:
        try:
            check_not_locked(opened.fd, opened.path)
            hold_read_locks(opened.fd, opened.path)
        except BaseException:
            opened.close()
            raise
    return opened


def current_size(fd: int) -> int:
    """The size of `fd` now: a regular file's, or a block device's (whose st_size is 0)."""
    st = os.fstat(fd)
    if _stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)     # (readers here use pread: no offset matters)
    return st.st_size


def file_size_now(fd: int, file_size: int) -> str:
    """The size of file `fd` for a message: also what it was when opened, if it changed."""
    try:
        now = current_size(fd)
    except OSError:
        now = file_size
    return (f"{file_size} bytes" if now == file_size else
            f"{now} bytes now, {file_size} when opened: cut while being read")


def _pread_exact(fd: int, buf, offset: int, what: str, file_size: int) -> None:
    """Fill memoryview `buf` from `fd` at `offset`; a short read is a TruncatedImage."""
    want = len(buf)
    got = 0
    while got < want:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise TruncatedImage(f"{what}: {want} bytes at {offset:#x} run past the end of the "
                                 f"file ({file_size_now(fd, file_size)})")
        got += n


class _Layer:
    """What every layer of a chain offers the chain: reads of its own runs and host bytes,
    and the life cycle of its descriptors."""
    filename: str
    virtual_size: int
    depth: int
    backing: "_Layer | None"
    _reads: _Reads
    _closed = False

    def close(self) -> None:
        """Close the layer. Its descriptors close once no read of its group is in flight: a
        read running meanwhile finishes or raises ValueError, and never reads a descriptor
        number that a later open() reuses."""
        with _CLOSE_LOCK:
            if self._closed:
                return
            self._closed = True
            self._reads.closing.append(self)
        _release(self._reads)

    def _close_fds(self) -> None:
        raise NotImplementedError

    def __del__(self):
        # As io.FileIO: an image dropped while open closes (releasing its descriptors and
        # QEMU's locks) and says so as a ResourceWarning (shown with -X dev or -W default).
        if self._closed or getattr(self, "_reads", None) is None:
            return
        try:
            _warnings.warn(f"unclosed image {getattr(self, 'filename', '?')!r}",
                           ResourceWarning, stacklevel=2, source=self)
            self.close()
        except Exception:                       # noqa: BLE001 - interpreter shutting down
            pass

    def __reduce_ex__(self, protocol):
        # Its descriptors mean nothing in another process, and a copy sharing them would
        # read another file once either closed (FileIO refuses as well).
        raise TypeError(f"cannot pickle or copy an open {type(self).__name__}; open the "
                        "image again by name")

    def as_file(self):
        """A read-only, seekable `io.RawIOBase` over the guest contents."""
        from .reader import ImageFile
        self._check_open()
        return ImageFile(self)

    def _enter(self) -> None:
        """Register a read in flight (undo with _leave); ValueError if the chain is closed."""
        self._reads.append(None)
        if self._closed or self.backing is not None and self._chain_closed():
            self._leave()
            raise _closed_error()

    def _leave(self) -> None:
        reads = self._reads
        reads.pop()
        if reads.closing and not reads:
            _release(reads)

    def _chain_closed(self) -> bool:
        return any(layer._closed for layer in self.chain)

    def _check_open(self) -> None:
        if self._closed or self.backing is not None and self._chain_closed():
            raise _closed_error()

    def _each_step(self, it: Iterator) -> Iterator:
        """Iterate `it`, each step a read in flight (no descriptor is held between steps)."""
        while True:
            self._enter()
            try:
                item = next(it, _END)
            finally:
                self._leave()
            if item is _END:
                return
            yield item

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _span(self, start: int, length: int | None) -> tuple[int, int]:
        start = _index(start)
        if length is not None:
            length = _index(length)
        if start < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be non-negative")
        end = self.virtual_size if length is None else min(start + length, self.virtual_size)
        return min(start, self.virtual_size), end

    def _own_runs(self, start: int, end: int) -> Iterator[Runs]:
        raise NotImplementedError

    def _runs(self, start: int, end: int) -> Iterator[Runs]:
        """Runs of [start, end) resolved through the backing chain (end <= virtual_size)."""
        backing = self.backing
        for chunk in self._own_runs(start, end):
            if backing is None or not (chunk.kind == _UNALLOCATED).any():
                yield chunk
                continue
            yield from self._through_backing(chunk, backing)

    def _through_backing(self, chunk: Runs, backing: "_Layer") -> Iterator[Runs]:
        holes = np.flatnonzero(chunk.kind == _UNALLOCATED)
        g0 = chunk.guest[holes]
        long_ = chunk.length[holes] >= _HOLE_BATCH
        # Holes starting in one window of _HOLE_BATCH bytes are resolved together with one walk
        # of the backing layer (cost follows runs, not holes); long holes go alone.
        window = g0 // _HOLE_BATCH
        cuts = np.flatnonzero((window[1:] != window[:-1]) | long_[1:] | long_[:-1]) + 1
        pos = 0
        for a, b in zip([0] + cuts.tolist(), cuts.tolist() + [len(holes)]):
            first, last = int(holes[a]), int(holes[b - 1])
            if first > pos:
                yield Runs(*(x[pos:first] for x in chunk))
            if a + 1 == b:
                yield from self._one_hole(chunk, first, backing)
            else:
                yield self._holes_batch(Runs(*(x[first:last + 1] for x in chunk)), backing)
            pos = last + 1
        if pos < len(chunk.guest):
            yield Runs(*(x[pos:] for x in chunk))

    def _one_hole(self, chunk: Runs, h: int, backing: "_Layer") -> Iterator[Runs]:
        g0 = int(chunk.guest[h])
        g1 = g0 + int(chunk.length[h])
        mid = min(g1, backing.virtual_size)
        if g0 < mid:
            yield from self._from_backing(backing, g0, mid)
        if max(g0, mid) < g1:
            # Past the end of a shorter backing file: zeros, unallocated at this layer
            # (QEMU bdrv_co_block_status() reports them as zero at the upper layer).
            tail = _single_run(max(g0, mid), g1, _UNALLOCATED, self.depth)
            if chunk.host[h] >= 0:
                tail.host[0] = chunk.host[h] + (max(g0, mid) - g0)
            yield tail

    def _from_backing(self, backing: "_Layer", start: int, end: int) -> Iterator[Runs]:
        """`backing`'s runs of [start, end), their depths counted from this layer: a layer
        given as `backing=` was opened on its own (depth 0) and may be shared by other chains."""
        shift = self.depth + 1 - backing.depth
        runs = backing._runs(start, end)
        if not shift:                   # a backing this image opened: no extra layer per chunk
            return runs
        return (chunk._replace(depth=chunk.depth + shift) for chunk in runs)

    def _holes_batch(self, sub: Runs, backing: "_Layer") -> Runs:
        """Resolve every UNALLOCATED run of `sub` through `backing` with one backing walk."""
        is_hole = sub.kind == _UNALLOCATED
        hs = sub.guest[is_hole]
        he = hs + sub.length[is_hole]
        hhost = sub.host[is_hole]
        bvs = backing.virtual_size
        parts = [Runs(*(x[~is_hole] for x in sub))]
        hc = np.minimum(he, bvs)
        inside = hs < hc
        if inside.any():
            lo, hi = int(hs[inside][0]), int(hc[inside][-1])
            try:
                got = list(self._from_backing(backing, lo, hi))
            except QcowError:
                # The walk met a bad entry, perhaps where this layer covers the backing one
                # (never read, as in QEMU and the plain path): walk the holes one by one, and
                # an error inside a hole stands.
                return self._holes_one_by_one(sub, backing)
            b = Runs(*(np.concatenate(col) for col in zip(*got))) if len(got) > 1 else got[0]
            b_end = b.guest + b.length
            # Cut at every hole and backing-run boundary; keep the pieces inside a hole.
            points = np.unique(np.concatenate((hs[inside], hc[inside], b.guest, b_end)))
            p0, p1 = points[:-1], points[1:]
            j = np.searchsorted(hs, p0, "right") - 1
            keep = (j >= 0) & (p0 < hc[np.maximum(j, 0)])
            p0, p1 = p0[keep], p1[keep]
            r = np.searchsorted(b.guest, p0, "right") - 1
            host = b.host[r]
            shift = (host >= 0) & (b.kind[r] != _COMPRESSED)
            parts.append(Runs(p0, p1 - p0, b.kind[r], np.where(shift, host + (p0 - b.guest[r]),
                                                               host), b.csize[r], b.depth[r]))
        past = np.maximum(hs, bvs) < he
        if past.any():
            # Past the end of a shorter backing file, as in _one_hole.
            ts = np.maximum(hs[past], bvs)
            th = np.where(hhost[past] >= 0, hhost[past] + (ts - hs[past]), -1)
            parts.append(Runs(ts, he[past] - ts, np.full(len(ts), _UNALLOCATED, np.uint8), th,
                              np.zeros(len(ts), np.int64),
                              np.full(len(ts), self.depth, np.int64)))
        cat = Runs(*(np.concatenate(col) for col in zip(*parts)))
        order = np.argsort(cat.guest, kind="stable")
        return Runs(*(x[order] for x in cat))

    def _holes_one_by_one(self, sub: Runs, backing: "_Layer") -> Runs:
        """_holes_batch's result with one backing walk per UNALLOCATED run of `sub`."""
        parts = []
        for i in range(len(sub.guest)):
            if sub.kind[i] == _UNALLOCATED:
                parts += self._one_hole(sub, i, backing)
            else:
                parts.append(Runs(*(x[i:i + 1] for x in sub)))
        return Runs(*(np.concatenate(col) for col in zip(*parts)))

    def _small_hole(self, a: int, b: int, out: list) -> None:
        """Resolve this layer's unallocated [a, b) through the backing chain (lean path)."""
        backing = self.backing
        mid = a if backing is None else min(b, backing.virtual_size)
        if a < mid:
            backing._small_runs(a, mid, out)
        if mid < b:
            out.append((max(a, mid), b, _UNALLOCATED, -1, 0, self))

    def layer(self, depth: int) -> "_Layer":
        """The layer of this chain at `depth` (an Extent's or Runs' depth)."""
        return self.chain[depth - self.depth]

    def by_depth(self) -> list:
        """(depth, layer) for every layer of the chain, top first: the depths Extents and
        Runs name (a shared `backing=` layer's own `depth` attribute may differ)."""
        return list(enumerate(self.chain, self.depth))


class RawImage(_Layer):
    """A raw file or block device: every byte is data at the same offset.

    Used as a backing layer, and as a top-level source (`open_source`, `open(format="raw")`)
    with the reading API of `Image`: read/readinto/extents/map/as_file, a context manager.
    """
    format = "raw"
    snapshot = None

    def __init__(self, path, depth: int = 0, *, force_share: bool = False):
        self.depth = depth
        self.backing = None
        self._fd = -1
        self._reads = _Reads()
        opened = _open_checked(path, "image" if depth == 0 else "raw backing file", force_share)
        self.filename = opened.path
        self.ident = opened.ident
        self._fd = opened.detach()
        self.file_size = self.data_size = opened.size
        # QEMU sizes raw images in whole 512-byte sectors; the partial tail reads as zeros.
        self.virtual_size = -(-self.data_size // 512) * 512
        self.data_fd = self._fd

    def _own_runs(self, start: int, end: int) -> Iterator[Runs]:
        for a, b, kind in ((start, min(end, self.data_size), _DATA),
                           (max(start, self.data_size), end, _ZERO)):
            if a < b:
                r = _single_run(a, b, kind, self.depth)
                r.host[0] = a
                yield r

    def _small_runs(self, start: int, end: int, out: list) -> None:
        mid = min(end, self.data_size)
        if start < mid:
            out.append((start, mid, _DATA, start, 0, self))
        if max(start, mid) < end:
            out.append((max(start, mid), end, _ZERO, -1, 0, self))

    def _close_fds(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = self.data_fd = -1

    def __repr__(self) -> str:
        return f"<qcowfast.RawImage {self.filename!r} size={self.virtual_size}>"

    @property
    def chain(self) -> list:
        return [self]

    def extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """DATA over the file's bytes, then ZERO over the partial last sector's padding."""
        self._check_open()
        start, end = self._span(start, length)
        return (_extent(int(chunk.guest[0]), int(chunk.length[0]), int(chunk.kind[0]),
                        int(chunk.host[0]), self.depth)
                for chunk in self._each_step(self._own_runs(start, end)))

    @_reading
    def read(self, offset: int, size: int) -> bytes:
        """Return up to `size` bytes from `offset` (fewer at the end of the image)."""
        offset, size = _index(offset), _index(size)
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be non-negative")
        n = max(0, min(size, self.virtual_size - offset))
        _check_read_size(n)
        buf = bytearray(n)
        self._readinto(offset, memoryview(buf))
        return bytes(buf)

    @_reading
    def readinto(self, offset: int, buffer) -> int:
        """Fill `buffer` from `offset`; return the count (short at the end of the image)."""
        return self._readinto(offset, writable_view(buffer))

    def _readinto(self, offset: int, view: memoryview) -> int:
        start, end = self._span(offset, len(view))
        mid = max(start, min(end, self.data_size))
        if start < mid:
            _pread_exact(self._fd, view[:mid - start], start, f"{self.filename}: raw data",
                         self.data_size)
        view[mid - start:end - start] = bytes(end - mid)
        return end - start

    @_reading
    def map(self) -> list[dict]:
        """The allocation map, as `qemu-img map --output=json` prints it for a raw file."""
        from .mapping import map_entries
        return map_entries(self)


def check_qcow2_backing(opened: OpenedFile, owner: str) -> None:
    """Refuse a backing file that is opened as qcow2 (its format named in `owner`'s header) but
    is not one, naming both files (read_header would name the backing file alone)."""
    if os.pread(opened.fd, 4, 0) != QCOW_MAGIC:
        exc = FormatError(f"backing file {opened.path} of {owner} is not a QCOW2 image, though "
                          f"{owner} names its format qcow2")
        exc.qemu_chain = "Image is not in qcow2 format"     # qcow2_open()'s words
        in_chain(exc, owner, backing=True)
        raise exc


def unsupported_backing_format(fmt: str, owner: str, fd: int | None = None) -> QcowError:
    """The refusal of backing format `fmt` (named in `owner`'s header), which qcowfast does
    not read; where QEMU fails too (probe.driver_refusal: a name it lacks, with `fd` None;
    else the file on `fd` lacking the format's magic), its line is the error's."""
    exc = UnsupportedFeature(f"backing file format {fmt!r} of {owner} is not supported "
                             "(qcowfast reads qcow2 and raw backing files)")
    refused = driver_refusal(fmt, fd)
    if refused is not None:
        exc.qemu_chain, exc.qemu_hint = refused
        in_chain(exc, owner, backing=True)
    return exc


class Image(_Layer):
    """An opened QCOW2 image (read-only), with its backing chain. Use `qcowfast.open`.

    Thread-safe: several threads may call `read`/`readinto`/`extents` at once.
    """

    def __init__(self, path, *, backing=None, backing_dirs=(), data_file=None, snapshot=None,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_depth: int = MAX_CHAIN_DEPTH,
                 force_share: bool = False, _depth: int = 0, _seen: tuple = (),
                 _top: str | None = None):
        self.filename = os.fspath(path)
        self.depth = _depth
        self._top = self.filename if _top is None else _top    # the image the caller opened
        self.backing = None
        self._owns_backing = False
        self.force_share = force_share
        self._data_fd = -1
        self._fd = -1
        self._reads = _Reads()
        self._scratch_taken: list = []      # pooled buffers behind _scratch (_release_scratch)
        opened = None
        try:
            # `path` may be an OpenedFile from paths.resolve_reference: that checked
            # descriptor is the one read (never the name opened again). Its dir_fd, the
            # directory as the image was reached, is where the names it holds resolve.
            opened = _open_checked(path, "image" if _depth == 0 else "backing file", force_share,
                                   keep_dir=True)
            self.ident = opened.ident
            self.file_size = opened.size
            self._fd = opened.detach()
            self._open(opened, backing, directories(backing_dirs), data_file,
                       snapshot, cache_size, max_depth, _seen)
        except BaseException:
            self.close()
            raise
        finally:
            if opened is not None:
                opened.close_dir()          # (the caller may close it again: a no-op)

    # -- opening -------------------------------------------------------------------------------
    def _open(self, self_file, backing, backing_dirs, data_file, snapshot, cache_size, max_depth,
              seen):
        # `self_file`: this image's OpenedFile (paths.resolve_reference resolves names from it).
        # self.file_size: st_size, or the device size of a block device (paths.open_file).
        self.header: Header = read_header(self._fd, self.file_size, name=self.filename,
                                          data_file_name=data_file is None)
        h = self.header
        warn_stale_bitmaps(h, self.filename)
        self.virtual_size = h.size - h.size % 512   # QEMU counts whole sectors (qcow2_do_open)
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.compression_type = CompressionType(h.compression_type)
        self._flags = ((_plain.FLAGS["v3"] if h.version >= 3 else 0)
                       | (_plain.FLAGS["extended_l2"] if h.extended_l2 else 0)
                       | (_plain.FLAGS["data_file"] if h.has_data_file else 0))
        self._l2_per_l1 = h.l2_entries * h.cluster_size            # guest bytes per L1 entry
        self._slice_entries = max(1, min(h.l2_entries, L2_SLICE_BYTES // h.l2_entry_size))
        self._slice_bytes = self._slice_entries * h.l2_entry_size
        self._l2_entries = h.l2_entries
        self._lock = threading.Lock()
        self._l2_cache: OrderedDict = OrderedDict()
        self._l2_cache_bytes = 0
        cache_size = integer(cache_size, "cache_size", 0, what="a number of bytes")
        max_depth = integer(max_depth, "max_depth", 0, what="a non-negative integer")
        self._cache_size = max(cache_size, 2 * self._slice_entries * h.l2_entry_size)
        self._zcache: OrderedDict = OrderedDict()
        self._local = threading.local()

        from .snapshots import check_at_open
        check_at_open(self)          # what QEMU's qcow2_do_open() validates beyond the header
        l1_offset, what = h.l1_table_offset, "L1 table"
        l1_used = -(-self.virtual_size // self._l2_per_l1) if self.virtual_size else 0
        l1_read = l1_used
        self.snapshot = None
        if snapshot is not None:
            from .snapshots import check_l1, find_snapshot
            self.snapshot = snap = find_snapshot(self, snapshot)
            check_l1(self, snap)
            # qcow2_snapshot_load_tmp(): the guest keeps the current size; past the snapshot's
            # L1 table the clusters are unallocated (zero-padded L1 below).
            l1_offset, what = snap.l1_table_offset, f"L1 table of snapshot {snap.id!r}"
            l1_read = min(l1_used, snap.l1_size)
        # The L1 table's big-endian bytes (zero-padded past a snapshot's table) and its L2
        # table offsets, without numpy (_l1_be and _l2_offsets are numpy views made on demand).
        self._l1_raw = self._read_table(l1_offset, l1_read, what) + bytes(8 * (l1_used - l1_read))
        self._l2_off = array("q", bytes(8 * l1_used))
        # A bad entry is marked -1 - index (l1_scan) and raises where a read reaches it
        # (_l1_error): QEMU opens such an image and fails only the queries that reach it.
        self._bad_l1 = _plain.l1_scan(self._l1_raw, h.cluster_bits, self.file_size,
                                      self._l2_off)         # the first bad entry, or -1
        used = list(filter(None, self._l2_off))
        if len(set(used)) != len(used):
            # QEMU never shares an L2 table within one L1 table; a crafted repeat would make
            # work grow with the declared size instead of the file.
            seen_at: dict = {}
            dup = min(v for i, v in enumerate(used) if seen_at.setdefault(v, i) != i)
            where = [i for i, v in enumerate(self._l2_off) if v == dup][:2]
            raise CorruptImage(f"{self.filename}: L1 entries {where[0]} and {where[1]} both "
                               f"point to the L2 table at {dup:#x}")

        self._open_data_file(self_file, data_file, backing_dirs)
        self._open_backing(self_file, backing, backing_dirs, cache_size, max_depth, seen)

    def _read_table(self, offset: int, entries: int, what: str) -> bytes:
        raw = bytearray(entries * 8)
        if entries:
            _pread_exact(self._fd, memoryview(raw), offset, f"{self.filename}: {what}",
                         self.file_size)
        return bytes(raw)

    def _l1_error(self, index: int, guest: int | None = None) -> CorruptImage:
        """The error of bad L1 entry `index`, met by a read from guest offset `guest` (by
        default the first byte the entry maps): map stops where that read starts."""
        entry = int.from_bytes(self._l1_raw[8 * index:8 * index + 8], "big")
        l2 = entry & L1E_OFFSET_MASK
        table = "L1" if self.snapshot is None else f"L1 table of snapshot {self.snapshot.id!r},"
        where = f"{self.filename}: {table} entry {index} ({entry:#018x})"
        if entry & ~(L1E_OFFSET_MASK | QCOW_OFLAG_COPIED):
            exc = CorruptImage(f"{where}: reserved bits are set")
        elif l2 % self.cluster_size:
            exc = CorruptImage(f"{where}: L2 table offset {l2:#x} is not aligned to the "
                               f"cluster size")
        else:
            exc = TruncatedImage(f"{where}: L2 table at {l2:#x} lies past the end of the file "
                                 f"({self.file_size} bytes)")
        exc.guest_offset = index * self._l2_per_l1 if guest is None else guest
        exc._bad_layer = (self, 0)                      # for _failing_query()
        return exc

    @cached_property
    def _l1_be(self) -> np.ndarray:
        return np.frombuffer(self._l1_raw, ">u8")

    @cached_property
    def _l2_offsets(self) -> np.ndarray:
        return np.frombuffer(self._l2_off, np.int64)

    def _open_data_file(self, self_file, data_file, allowed):
        h = self.header
        if not h.has_data_file:
            if data_file is not None:
                raise FormatError(f"{self.filename} has no external data file but data_file= was given")
            self.data_fd, self.data_size = self._fd, self.file_size
            return
        # The name `map` shows: the one stored in the header, as qemu-img shows it, or the
        # one given.
        self.data_file_label = h.data_file if data_file is None else (
            os.fsdecode(os.fspath(data_file))
            if isinstance(data_file, (str, bytes, os.PathLike)) else None)
        if data_file is None:               # (named: read_header refuses an image naming none)
            try:
                data_file = resolve_reference(self_file, h.data_file, "external data file", allowed)
            except QcowError as exc:
                in_chain(exc, self.filename, backing=False)
                raise
        try:
            opened = _open_checked(data_file, "external data file", self.force_share,
                                   owner=self.filename)
        except QcowError as exc:
            in_chain(exc, self.filename, backing=False)
            raise
        self.data_file = opened.path
        self._data_fd = self.data_fd = opened.detach()
        opened.close_dir()
        self.data_size = opened.size

    def _open_backing(self, self_file, backing, allowed, cache_size, max_depth, seen):
        h = self.header
        seen = seen + (self.ident,)
        if backing is False or (backing is None and not h.backing_file):
            return
        if isinstance(backing, _Layer):
            backing._check_open()
            if self.depth + len(backing.chain) > max_depth:
                raise BackingChainError(f"backing chain of {self._top} is deeper than "
                                        f"{max_depth} (with the chain of the backing= image)")
            self.backing = backing              # shared: the caller closes it
            self._reads = _LinkedReads(backing._reads)  # its descriptors open while we read
            return
        if self.depth + 1 > max_depth:
            raise BackingChainError(f"backing chain of {self._top} is deeper than {max_depth} "
                                    f"(the backing file of {self.filename} would be layer "
                                    f"{self.depth + 1})")
        if backing is None and h.backing_format is not None and \
                driver_refusal(h.backing_format) is not None:
            # QEMU finds the driver before it opens the file (bdrv_fill_options()).
            raise unsupported_backing_format(h.backing_format, self.filename)
        # The descriptor opened (and checked) here is the one the backing layer reads.
        try:
            if backing is None:
                opened = resolve_reference(self_file, h.backing_file, "backing file", allowed)
            else:
                opened = open_file(backing, "backing file", owner=self.filename)
        except QcowError as exc:
            in_chain(exc, self.filename, backing=True)
            raise
        finally:
            self_file.close_dir()           # names resolved: one directory held at a time
        try:
            if opened.ident in seen:
                raise BackingChainError(f"backing chain loops: {self.filename} -> {opened.path}")
            fmt = h.backing_format if backing is None else None
            if fmt is None:
                fmt = detect_format(opened.fd, opened.path)
            if fmt in RAW_FORMATS:
                try:
                    self.backing = RawImage(opened, self.depth + 1,
                                            force_share=self.force_share)
                except ImageLocked as exc:
                    # QEMU takes a raw backing file's locks once the chain is open.
                    in_chain(exc, self.filename, backing=False)
                    raise
            elif fmt == "qcow2":
                check_qcow2_backing(opened, self.filename)
                try:
                    self.backing = Image(opened, backing_dirs=allowed, cache_size=cache_size,
                                         max_depth=max_depth, force_share=self.force_share,
                                         _depth=self.depth + 1, _seen=seen, _top=self._top)
                except QcowError as exc:
                    if exc.qemu_chain is not None:      # a file below the backing file
                        in_chain(exc, self.filename, backing=True)
                    raise
            else:
                raise unsupported_backing_format(fmt, self.filename, opened.fd)
            self._owns_backing = True
            self._reads = self.backing._reads
        finally:
            opened.close()                  # a no-op once a layer took the descriptor

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close this image and the backing chain it opened (see _Layer.close)."""
        if self._owns_backing:
            self.backing.close()
        super().close()

    def _close_fds(self) -> None:
        for attr in ("_data_fd", "_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        # The descriptor numbers may soon belong to other files: nothing may read them.
        self.data_fd = -1
        self._scratch_taken = []            # (no longer pooled: a read may still hold one)

    def __repr__(self) -> str:
        return (f"<qcowfast.Image {self.filename!r} v{self.header.version} "
                f"size={self.virtual_size} cluster={self.cluster_size}"
                f"{' backing=' + repr(self.backing.filename) if self.backing else ''}>")

    @property
    @_reading
    def snapshots(self) -> list:
        """The internal snapshots (`qcowfast.snapshots.Snapshot`), in table order."""
        from .snapshots import read_snapshots
        return read_snapshots(self)

    @property
    def chain(self) -> list:
        """The layers of the backing chain, top first."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.backing
        return out

    # -- tables --------------------------------------------------------------------------------
    def _l2_slice(self, l2_offset: int, slice_index: int) -> np.ndarray:
        """One slice of an L2 table as a big-endian `>u8` array (cached)."""
        return self._l2_slice_pair(l2_offset, slice_index)[0]

    def _l2_slice_pair(self, l2_offset: int, slice_index: int) -> tuple:
        """(big-endian array, native uint64 view of it) for one L2 slice, from the cache."""
        key = (l2_offset, slice_index)
        pair = _lru_get(self._l2_cache, key)
        if pair is not None:
            return pair
        if l2_offset < 0:
            raise self._l1_error(-1 - l2_offset)        # a bad L1 entry (never cached)
        nbytes = self._slice_bytes
        raw = bytearray(nbytes)
        _pread_exact(self._fd, memoryview(raw), l2_offset + slice_index * nbytes,
                     f"{self.filename}: L2 table at {l2_offset:#x}", self.file_size)
        tbl = np.frombuffer(raw, ">u8")
        pair = (tbl, tbl.view(np.uint64))
        with self._lock:
            if key not in self._l2_cache:
                self._l2_cache[key] = pair
                self._l2_cache_bytes += nbytes
                while self._l2_cache_bytes > self._cache_size:
                    _, old = self._l2_cache.popitem(last=False)
                    self._l2_cache_bytes -= old[0].nbytes
        return pair

    def _l2_error(self, err, l2_offset: int, s_index: int, table_start: int) -> QcowError:
        index = s_index * self._slice_entries + err.index
        guest = table_start + index * self.cluster_size
        cls = TruncatedImage if err.past_eof else CorruptImage
        exc = cls(f"{self.filename}: L2 entry {index} of the table at {l2_offset:#x} "
                  f"(guest offset {guest:#x}): {err.rule}")
        exc.guest_offset = guest
        exc._bad_layer = (self, err.bad_bitmap)        # for _failing_query()
        return exc

    def _check_data_file_hosts(self, guest, kind, host) -> None:
        """Raise where a run of classified L2 entries maps guest bytes of an external data file
        to other host bytes (QEMU qcow2_get_host_offset(): "External data file host cluster
        offset ... does not match guest cluster offset", EIO for any query of that cluster)."""
        bad = np.flatnonzero((host >= 0) & (host != guest) & (kind != _COMPRESSED))
        if len(bad):
            raise self._data_file_host_error(int(guest[bad[0]]), int(host[bad[0]]))

    def _data_file_host_error(self, guest: int, host: int) -> CorruptImage:
        """The error of the L2 entry mapping guest byte `guest` to data file byte `host`."""
        at = guest - guest % self.cluster_size
        l1_index, index = divmod(at, self._l2_per_l1)
        l2_offset = int(self._l2_offsets[l1_index])
        exc = CorruptImage(f"{self.filename}: L2 entry {index // self.cluster_size} of the table "
                           f"at {l2_offset:#x} (guest offset {at:#x}): host offset "
                           f"{host - (guest - at):#x} in the external data file is not the "
                           f"guest offset")
        exc.guest_offset = at
        exc._bad_layer = (self, 0)                      # for _failing_query()
        return exc

    # -- QEMU's block status queries, for where a map fails ------------------------------------
    def _entry_at(self, cluster: int) -> tuple[int, int] | None:
        """(L2 entry, subcluster bitmap or 0) of `cluster`; None when its L2 table is absent."""
        per = self._l2_entries
        l2 = int(self._l2_offsets[cluster // per])
        if not l2:
            return None
        s_index, k = divmod(cluster % per, self._slice_entries)
        tbl = self._l2_slice(l2, s_index)
        if self._flags & _EXTENDED_L2:
            return int(tbl[2 * k]), int(tbl[2 * k + 1])
        return int(tbl[k]), 0

    def _qemu_type(self, entry: int, bitmap: int, sc: int) -> str:
        """QEMU qcow2_get_subcluster_type() of subcluster `sc` of a valid entry: (C)ompressed,
        (N)ormal, zero (ZA) or unallocated (UA) in an allocated cluster, zero (ZP) or
        unallocated (UP) in an unallocated one."""
        if entry >> 62 & 1:
            return "C"
        allocated = entry & L2E_OFFSET_MASK
        if self._flags & _EXTENDED_L2:
            zero, data = bitmap >> (32 + sc) & 1, bitmap >> sc & 1
        else:
            zero, data = entry & 1, 1
        if allocated:
            return "ZA" if zero else "N" if data else "UA"
        return "ZP" if zero else "UP"

    def _scan_start(self, pos: int, lo: int) -> tuple[int, str]:
        """(where, type): the earliest offset >= lo from which one of QEMU's block status
        queries of this layer alone spans to guest byte `pos`, and the type there.

        qcow2-cluster.c qcow2_get_host_offset() and count_contiguous_subclusters(): a query
        stays in one L2 table, takes compressed clusters one at a time, follows one subcluster
        type to the end of each cluster, and allocated clusters only while their host offsets
        are contiguous."""
        cs = self.cluster_size
        if pos >= self.virtual_size:
            return max(lo, self.virtual_size), "EOF"
        per_cluster = 32 if self._flags & _EXTENDED_L2 else 1
        sub = cs // per_cluster
        c = pos // cs
        first = c - c % self._l2_entries
        got = self._entry_at(c)
        if got is None:
            return max(lo, first * cs), "UP"
        entry, bitmap = got
        j = pos % cs // sub
        kind = self._qemu_type(entry, bitmap, j)
        if kind == "C":
            return max(lo, c * cs), kind
        while True:
            while j and self._qemu_type(entry, bitmap, j - 1) == kind:
                j -= 1
            if j or c == first or c * cs <= lo:
                return max(lo, c * cs + j * sub), kind
            prev, prev_bitmap = self._entry_at(c - 1)
            if self._qemu_type(prev, prev_bitmap, per_cluster - 1) != kind or \
                    kind in ("N", "ZA", "UA") and \
                    (prev & L2E_OFFSET_MASK) + cs != entry & L2E_OFFSET_MASK:
                return max(lo, c * cs), kind
            c, entry, bitmap, j = c - 1, prev, prev_bitmap, per_cluster - 1

    def _failing_query(self, exc: CorruptImage, start: int) -> int:
        """Where the block status query that meets `exc`'s bad L2 entry starts in qemu-img map
        of this chain from `start`: the map prints the entries finished before that point.

        At the entry itself, except for an invalid subcluster bitmap: count_contiguous_
        subclusters() reads each next cluster's type before comparing it, so the first query
        of the bad entry's layer that runs through the cluster before it fails. Such a query
        starts where that layer's run before the entry starts, or later where a layer above
        (unallocated there) starts the run it has across the entry: a backing layer's query
        ends where the query above it ends."""
        at = exc.guest_offset
        bad, bitmap = exc._bad_layer
        if not bitmap or at <= start:
            return at
        stop = start
        layers = self.chain
        i = next(k for k, layer in enumerate(layers) if layer is bad)
        for layer in layers[:i]:
            stop = max(stop, layer._scan_start(at, stop)[0])
        where, kind = bad._scan_start(at - 1, stop)
        return at if kind == "C" else min(where, at)

    def _own_runs(self, start: int, end: int) -> Iterator[Runs]:
        """Runs of this layer alone over [start, end), UNALLOCATED where it has no cluster."""
        if start >= end:
            return
        per_l1 = self._l2_per_l1
        cs = self.cluster_size
        i0, i1 = start // per_l1, (end - 1) // per_l1
        offsets = self._l2_offsets
        present = np.flatnonzero(offsets[i0:i1 + 1]) + i0
        bad = None
        if 0 <= self._bad_l1 <= i1:
            marked = present[offsets[present] < 0]
            if len(marked):                     # stop at the first bad entry of the range
                bad = int(marked[0])
                present = present[present < bad]
        pos = start
        for group in self._l1_groups(present):
            l1_index = group[0]
            table_start = l1_index * per_l1
            if table_start > pos:
                yield _single_run(pos, table_start, _UNALLOCATED, self.depth)
                pos = table_start
            if len(group) > 1:
                group_end = min((group[-1] + 1) * per_l1, end)
                yield self._tables_runs(group, pos, group_end)
                pos = group_end
                continue
            table_end = min(table_start + per_l1, end)
            l2_offset = int(offsets[l1_index])
            first = (pos - table_start) // cs
            last = (table_end - 1 - table_start) // cs
            while first <= last:
                s_index = first // self._slice_entries
                s_first = first - s_index * self._slice_entries
                count = min(last + 1 - first, self._slice_entries - s_first)
                tbl = self._l2_slice(l2_offset, s_index)
                guest_base = table_start + first * cs
                try:
                    arrays = _tables.classify_l2(tbl, s_first, count, self.cluster_bits,
                                                 self._flags, guest_base, self.data_size)
                except _tables.L2EntryError as err:
                    raise self._l2_error(err, l2_offset, s_index, table_start) from None
                if self._flags & _DATA_FILE:
                    self._check_data_file_hosts(arrays[0], arrays[2], arrays[3])
                yield self._clip(arrays, pos, table_end)
                first += count
                pos = min(table_start + first * cs, table_end)
            pos = table_end
        if bad is not None:
            if bad * per_l1 > pos:
                yield _single_run(pos, bad * per_l1, _UNALLOCATED, self.depth)
            raise self._l1_error(bad, max(pos, bad * per_l1))
        if pos < end:
            yield _single_run(pos, end, _UNALLOCATED, self.depth)

    def _l1_groups(self, present: np.ndarray) -> Iterator[list]:
        """Split present L1 indexes into groups classified together: runs of consecutive
        indexes of small L2 tables (tiny clusters: one call per table would cost more in
        Python than the classification), single indexes otherwise."""
        per_batch = _BATCH_ENTRIES // self._l2_entries
        if per_batch < 2 or len(present) < 2:
            for i in present.tolist():
                yield [i]
            return
        cuts = np.flatnonzero(np.diff(present) != 1) + 1
        for run in np.split(present, cuts):
            run = run.tolist()
            for a in range(0, len(run), per_batch):
                yield run[a:a + per_batch]

    def _tables_runs(self, group: list, start: int, end: int) -> Runs:
        """Runs of [start, end) over the consecutive L1 indexes `group`, whose L2 tables (one
        slice each) are classified as one table: their guest ranges are contiguous."""
        cs = self.cluster_size
        entries = self._slice_entries          # one slice is the whole table here
        offsets = [int(self._l2_offsets[i]) for i in group]
        # The native views hold the raw big-endian bytes (concatenating `>u8` arrays would
        # convert them to native byte order).
        tbl = np.concatenate([self._l2_slice_pair(o, 0)[1] for o in offsets])
        table_start = group[0] * self._l2_per_l1
        first = (start - table_start) // cs
        last = (end - 1 - table_start) // cs
        try:
            arrays = _tables.classify_l2(tbl, first, last + 1 - first, self.cluster_bits,
                                         self._flags, table_start + first * cs, self.data_size)
        except _tables.L2EntryError as err:
            t = err.index // entries
            err.index -= t * entries
            raise self._l2_error(err, offsets[t], 0, (group[0] + t) * self._l2_per_l1) from None
        if self._flags & _DATA_FILE:
            self._check_data_file_hosts(arrays[0], arrays[2], arrays[3])
        return self._clip(arrays, start, end)

    def _small_runs(self, start: int, end: int, out: list) -> None:
        """Append (a, b, kind, host, csize, layer) runs of [start, end), resolved through the
        chain, to `out`: the lean path of small reads (Python tuples, no arrays built).

        host is the host offset of byte a for DATA, the stream offset for COMPRESSED (whose
        cluster starts at a rounded down to the layer's cluster size).
        """
        per_l1 = self._l2_per_l1
        bits = self.cluster_bits
        slice_entries = self._slice_entries
        small = _tables.SMALL_ENTRIES
        max_count = small // 32 if self._flags & _EXTENDED_L2 else small
        pos = start
        while pos < end:
            l1_index = pos // per_l1
            table_start = l1_index * per_l1
            stop = end if end < table_start + per_l1 else table_start + per_l1
            l2_offset = self._l2_offsets.item(l1_index)
            if not l2_offset:
                self._small_hole(pos, stop, out)
                pos = stop
                continue
            if l2_offset < 0:
                raise self._l1_error(l1_index, pos)
            first = (pos - table_start) >> bits
            s_index = first // slice_entries
            s_first = first - s_index * slice_entries
            count = min(((stop - 1 - table_start) >> bits) + 1 - first,
                        slice_entries - s_first, max_count)
            stop = min(stop, table_start + ((first + count) << bits))
            tbl = self._l2_slice_pair(l2_offset, s_index)[1]
            try:
                runs = _tables.classify_small(tbl, s_first, count, bits, self._flags,
                                              table_start + (first << bits), self.data_size)
            except _tables.L2EntryError as err:
                raise self._l2_error(err, l2_offset, s_index, table_start) from None
            if self._flags & _DATA_FILE:
                for g, n, k, h, c in runs:
                    if h >= 0 and h != g and k != _COMPRESSED:
                        raise self._data_file_host_error(g, h)
            for g, n, k, h, c in runs:
                a = g if g > pos else pos
                b = g + n if g + n < stop else stop
                if a >= b:
                    continue        # a subcluster run before `pos` in its cluster
                if k == _DATA:
                    out.append((a, b, k, h + (a - g), 0, self))
                elif k == _UNALLOCATED:
                    self._small_hole(a, b, out)
                else:
                    out.append((a, b, k, h, c, self))
            pos = stop

    def _clip(self, arrays, start: int, end: int) -> Runs:
        guest, length, kind, host, csize = arrays
        keep = (guest + length > start) & (guest < end)
        if not keep.all():
            guest, length, kind, host, csize = (a[keep] for a in (guest, length, kind, host, csize))
        if len(guest):
            head = start - int(guest[0])
            if head > 0:
                guest[0] += head
                length[0] -= head
                if host[0] >= 0 and kind[0] != _COMPRESSED:
                    host[0] += head
            tail = int(guest[-1] + length[-1]) - end
            if tail > 0:
                length[-1] -= tail
        return Runs(guest, length, kind, host, csize, np.full(len(guest), self.depth, np.int64))

    # -- public queries ------------------------------------------------------------------------
    def extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Yield coalesced `Extent`s covering [start, start+length) across the backing chain."""
        self._check_open()
        start, end = self._span(start, length)
        return self._extents(start, end)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        pending = None
        try:
            for chunk in self._each_step(self._runs(start, end)):
                for g, n, k, h, d in zip(chunk.guest.tolist(), chunk.length.tolist(),
                                         chunk.kind.tolist(), chunk.host.tolist(),
                                         chunk.depth.tolist()):
                    if pending is not None:
                        pg, pn, pk, ph, pd = pending
                        if (pk == k and pd == d and k != _COMPRESSED and pg + pn == g
                                and ((ph < 0 and h < 0) or (ph >= 0 and h == ph + pn))):
                            pending = (pg, pn + n, pk, ph, pd)
                            continue
                        self._check_open()      # closed between two steps of the iteration
                        yield _extent(*pending)
                    pending = (g, n, k, h, d)
        except QcowError:
            # What was resolved before the bad entry still holds (a caller may need no more:
            # compare stops at the first difference, as qemu-img's queries do).
            if pending is not None:
                yield _extent(*pending)
            raise
        if pending is not None:
            yield _extent(*pending)

    @_reading
    def map(self) -> list[dict]:
        """The image's allocation map, as `qemu-img map --output=json` prints it (a list).

        Its length grows with the number of extents; `iter_map` yields the same entries one
        at a time in bounded memory.
        """
        from .mapping import map_entries
        return map_entries(self)

    def iter_map(self) -> Iterator[dict]:
        """Yield the entries of `map` one at a time (qemu-img's coalescing), in bounded memory."""
        from .mapping import iter_entries
        self._check_open()
        return self._each_step(iter_entries(self))

    # -- reading -------------------------------------------------------------------------------
    # Three paths, by size: up to one cluster, _tables.SmallReader in C; up to SMALL_READ,
    # _small_runs tuples; beyond, _runs chunks. The last two fill through _fill_small.
    _small = None           # this layer's _tables.SmallReader, made by _small_reader()

    def read(self, offset: int, size: int) -> bytes:
        """Return up to `size` guest bytes from `offset` (fewer at the end of the image)."""
        offset, size = _index(offset), _index(size)
        reads = self._reads             # _enter and _leave, inlined: the hot path
        reads.append(None)
        try:
            if self._closed or self.backing is not None and self._chain_closed():
                raise _closed_error()
            data = (self._small or _small_reader(self)).read(offset, size)
            return self._read(offset, size) if data is None else data
        finally:
            reads.pop()
            if reads.closing and not reads:
                _release(reads)

    def _read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be non-negative")
        n = max(0, min(size, self.virtual_size - offset))
        _check_read_size(n)
        if n <= SMALL_READ:
            runs = []
            self._small_runs(offset, offset + n, runs)
            if len(runs) == 1 and runs[0][2] == _DATA:
                # One run of plain data: a single pread, no intermediate buffer.
                layer, host = runs[0][5], runs[0][3]
                data = os.pread(layer.data_fd, n, host)
                if len(data) == n:
                    return data
            buf = bytearray(n)
            self._fill_small(offset, memoryview(buf), runs)
            return bytes(buf)
        buf = bytearray(n)
        self._readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer) -> int:
        """Fill `buffer` with guest bytes from `offset`; return the count (short at the end)."""
        offset = _index(offset)
        if offset < 0:
            raise ValueError("offset must be non-negative")
        view = writable_view(buffer)
        reads = self._reads             # as in read()
        reads.append(None)
        try:
            if self._closed or self.backing is not None and self._chain_closed():
                raise _closed_error()
            n = (self._small or _small_reader(self)).readinto(offset, view)
            return self._readinto(offset, view) if n < 0 else n
        finally:
            reads.pop()
            if reads.closing and not reads:
                _release(reads)

    def _readinto(self, offset: int, view: memoryview) -> int:
        start, end = self._span(offset, len(view))
        if end - start <= SMALL_READ:
            runs = []
            self._small_runs(start, end, runs)
            self._fill_small(start, view, runs)
            return end - start
        layers = self.chain                     # layers[d - self.depth] has depth d
        for chunk in self._runs(start, end):
            self._fill_small(start, view, [
                (g, g + n, k, h, c, layers[d - self.depth]) for g, n, k, h, c, d in zip(
                    chunk.guest.tolist(), chunk.length.tolist(), chunk.kind.tolist(),
                    chunk.host.tolist(), chunk.csize.tolist(), chunk.depth.tolist())])
        return end - start

    def _fill_small(self, start: int, view, runs: list) -> None:
        """Fill view (guest bytes from `start`) from (a, b, kind, host, csize, layer) runs, as
        `_small_runs` makes them."""
        whole = None
        for a, b, k, h, c, layer in runs:
            dst = view[a - start:b - start]
            if k == _DATA:
                got = os.preadv(layer.data_fd, [dst], h)
                if got < b - a:
                    _pread_exact(layer.data_fd, dst[got:], h + got, f"{layer.filename}: data "
                                 f"cluster for guest offset {a:#x}", layer.data_size)
            elif k == _COMPRESSED:
                g = a - (a & (layer.cluster_size - 1))
                if a == g and b - a == layer.cluster_size:
                    # A whole cluster: inflated with the others straight into the buffer.
                    if whole is None:
                        whole = {}
                    whole.setdefault(layer, []).append((h, c, a))
                    continue
                dst[:] = memoryview(layer._inflated(h, c, g))[a - g:b - g]
            else:
                for z in range(0, b - a, len(_ZERO_BYTES)):
                    n = min(b - a - z, len(_ZERO_BYTES))
                    dst[z:z + n] = _ZERO_BYTES[:n]
        if whole:
            for layer, items in whole.items():
                h, c, a = (np.array(x, np.int64) for x in zip(*items))
                _inflate_whole(layer, h, c, a, view, start)

    # -- compressed clusters -------------------------------------------------------------------
    def decompressor(self):
        """This thread's Decompressor for the image's compression type and cluster size."""
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = _inflate.Decompressor(int(self.compression_type), self.cluster_size)
            self._local.dec = dec
        return dec

    @_reading
    def read_compressed(self, coffsets: np.ndarray, csizes: np.ndarray, gap: int | None = None):
        """Read the compressed streams [coffsets[i], +csizes[i]) with few large reads.

        Returns (buffer, in_off, in_len): stream i is buffer[in_off[i]:+in_len[i]]; the buffer is
        this thread's scratch space, valid until its next call. Lengths are
        clipped at the end of the file, where the sector-rounded size may overhang (QEMU reads
        zeros there); a stream starting past the end is a TruncatedImage.
        """
        if len(coffsets) == 1:
            return self._read_one_stream(int(coffsets[0]), int(csizes[0]))
        # Merging across gaps of at most one cluster keeps a read within 3 bytes per cluster
        # byte even when crafted descriptors are spread out (csize <= 2 clusters).
        gap = min(65536, self.cluster_size) if gap is None else gap
        limit = self.data_size
        if len(coffsets) and int(coffsets.max()) >= limit:
            raise self._stream_past_eof(int(coffsets.max()))
        ends = np.minimum(coffsets + csizes, limit)
        order = np.argsort(coffsets, kind="stable")
        s, e = coffsets[order], ends[order]
        # New group where the next stream starts more than `gap` bytes after the furthest end.
        reach = np.maximum.accumulate(e)
        breaks = np.flatnonzero(s[1:] > reach[:-1] + gap) + 1
        g_start = np.concatenate(([0], breaks))
        g_end = np.concatenate((breaks, [len(s)]))
        spans = [(int(s[a]), int(reach[b - 1])) for a, b in zip(g_start.tolist(), g_end.tolist())]
        total = sum(b - a for a, b in spans)
        view = self._scratch(total)
        in_off_sorted = np.empty(len(s), np.int64)
        pos = 0
        for (a, b), ga, gb in zip(spans, g_start.tolist(), g_end.tolist()):
            _pread_exact(self.data_fd, view[pos:pos + b - a], a,
                         f"{self.filename}: compressed clusters", limit)
            in_off_sorted[ga:gb] = s[ga:gb] - a + pos
            pos += b - a
        in_off = np.empty(len(s), np.int64)
        in_off[order] = in_off_sorted
        return view, in_off, ends - coffsets

    def _release_scratch(self) -> None:
        """Give this image's scratch buffers back to the pool (buffers.py), for the next
        conversion. Only when no thread reads this image or its chain any more."""
        for layer in self.chain:
            taken = getattr(layer, "_scratch_taken", None)
            if taken:
                layer._scratch_taken = []
                layer._local = threading.local()
                for buf in taken:
                    buffers.give(buf)

    def _scratch(self, n: int) -> memoryview:
        """This thread's scratch space for compressed streams, at least n bytes (reused: fresh
        pages per unit cost page faults and zeroing)."""
        buf = getattr(self._local, "cbuf", None)
        if buf is None or len(buf) < n:
            # Powers of two: the next image's conversion finds the same sizes in the pool.
            buf = self._local.cbuf = buffers.take(max(1 << 20, 1 << (n - 1).bit_length()))
            self._scratch_taken.append(buf)
        return memoryview(buf)[:n]

    def _stream_past_eof(self, coffset: int) -> TruncatedImage:
        return TruncatedImage(f"{self.filename}: compressed cluster at {coffset:#x} starts past "
                              f"the end of the file ({self.data_size} bytes)")

    def _read_one_stream(self, coffset: int, csize: int):
        """read_compressed for one stream (small reads): one pread, no array arithmetic."""
        if coffset >= self.data_size:
            raise self._stream_past_eof(coffset)
        n = min(coffset + csize, self.data_size) - coffset
        view = self._scratch(n)
        _pread_exact(self.data_fd, view, coffset, f"{self.filename}: compressed clusters",
                     self.data_size)
        return view, _ZERO_OFFSET, np.array([n], np.int64)

    @_reading
    def inflate_into(self, coffsets, csizes, guests, out, out_off) -> None:
        """Inflate compressed clusters into `out` at `out_off`; raise DecompressionError."""
        src, in_off, in_len = self.read_compressed(coffsets, csizes)
        self._inflate_read(src, in_off, in_len, out, out_off, coffsets, csizes, guests)

    def _inflate_read(self, src, in_off, in_len, out, out_off, coffsets, csizes, guests):
        """Inflate streams read by read_compressed (descriptors coffsets[i], csizes[i] of guest
        clusters guests[i]: arrays or sequences) into `out`; raise the error of a bad one."""
        dec = self.decompressor()
        bad = dec.inflate_batch(src, in_off, in_len, out, out_off)
        if bad >= 0:
            raise self._bad_stream(dec, int(coffsets[bad]), int(csizes[bad]), int(in_len[bad]),
                                   int(guests[bad]))

    def _bad_stream(self, dec, coffset: int, csize: int, read: int, guest: int) -> QcowError:
        """The error for a stream `dec` could not inflate (`read` of its `csize` bytes were
        there to read)."""
        # A stream that ran out of input where the end of the file clipped it was cut short.
        if dec.input_exhausted and read < csize:
            return TruncatedImage(f"{self.filename}: compressed cluster at host offset "
                                  f"{coffset:#x} is cut short by the end of the file")
        return DecompressionError(
            f"{self.filename}: compressed cluster at host offset {coffset:#x} "
            f"(guest offset {guest & ~(self.cluster_size - 1):#x}) does not "
            f"{self.compression_type.name.lower()}-decompress to exactly one cluster")

    def _inflated(self, coffset: int, csize: int, guest: int) -> memoryview:
        """The inflated cluster (read-only) of one compressed descriptor, through the cache of
        recently inflated clusters."""
        # Keyed by the whole descriptor: two L2 entries may share a host offset with different
        # lengths. Each layer of a chain has its own cache, so the layer is part of the key.
        key = (coffset, csize)
        data = _lru_get(self._zcache, key)
        if data is not None:
            return data
        out = np.empty(self.cluster_size, np.uint8)      # filled whole, or an error
        if coffset >= self.data_size:
            raise self._stream_past_eof(coffset)
        n = min(coffset + csize, self.data_size) - coffset
        dec = self.decompressor()
        rc = dec.inflate_one(self.data_fd, coffset, n, out)     # one C call: pread, inflate
        if rc == -2:
            raise TruncatedImage(f"{self.filename}: compressed clusters: {n} bytes at "
                                 f"{coffset:#x} run past the end of the file "
                                 f"({file_size_now(self.data_fd, self.data_size)})")
        if rc:
            raise self._bad_stream(dec, coffset, csize, n, guest)
        data = memoryview(out).toreadonly()
        with self._lock:
            cache = self._zcache
            cache[key] = data
            while len(cache) > COMPRESSED_CACHE_CLUSTERS:
                cache.popitem(last=False)
        return data


def _small_reader(layer: _Layer) -> _tables.SmallReader:
    """The SmallReader of `layer` (and of its backing layers), made on first use."""
    reader = layer.__dict__.get("_small")
    if reader is None:
        backing = None if layer.backing is None else _small_reader(layer.backing)
        if isinstance(layer, Image):
            reader = _tables.SmallReader(
                layer, backing, layer.data_fd, layer.virtual_size, layer.data_size,
                layer._l2_offsets, layer._l2_cache, layer.cluster_bits, layer._flags,
                layer._l2_per_l1, layer._slice_entries)
        else:
            reader = _tables.SmallReader(layer, None, layer.data_fd, layer.virtual_size,
                                         layer.data_size)
        layer._small = reader
    return reader


def _inflate_whole(layer: "Image", h, c, a, view, start: int) -> None:
    """Inflate the whole compressed clusters (descriptors h, c; guest offsets a: arrays) of
    `layer` into `view`, which holds guest bytes from `start`; many of them on all cores, in
    batches of at most _INFLATE_BATCH bytes (each thread reads a batch's streams at once)."""
    cores = _cores()
    per = max(1, _INFLATE_BATCH // layer.cluster_size)
    if cores > 1:
        # Several parts per core: threads that get a core late still share the work.
        per = min(per, max(_SPLIT_CLUSTERS, len(h) // (4 * cores)))
    count = -(-len(h) // per)
    parts = iter(np.array_split(np.arange(len(h)), count))
    lock = threading.Lock()
    failed = False

    def work() -> None:
        nonlocal failed
        while not failed:
            with lock:
                p = next(parts, None)
            if p is None:
                return
            try:
                layer.inflate_into(h[p], c[p], a[p], view, a[p] - start)
            except BaseException:
                failed = True
                raise

    helpers = [_read_pool().submit(work) for _ in range(min(cores, count) - 1)]
    try:
        work()
    finally:
        # Helpers still queued (the pool busy elsewhere) would find no part left.
        errors = [None if f.cancel() else f.exception() for f in helpers]
    for err in errors:
        if err is not None:
            raise err


_SPLIT_CLUSTERS = 4                       # fewest clusters worth handing to another thread
_INFLATE_BATCH = 8 * 1024 * 1024          # most inflated bytes per inflate_into call
_POOLS: dict = {}                         # name -> (pid, ThreadPoolExecutor)
_POOLS_LOCK = threading.Lock()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_pool(name: str, workers: int):
    """This process's thread pool `name` (created on first use, and again in a forked child,
    which inherits the pool but not its threads)."""
    with _POOLS_LOCK:
        entry = _POOLS.get(name)
        if entry is None or entry[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor
            entry = _POOLS[name] = (os.getpid(), ThreadPoolExecutor(
                workers, thread_name_prefix=f"qcowfast-{name}"))
        return entry[1]


def _read_pool():
    """Helper threads that inflate parts of large reads."""
    return process_pool("read", max(1, _cores() - 1))


def _extent(g, n, k, h, d) -> Extent:
    return Extent(g, n, ExtentKind(k), h if h >= 0 else None, d)


def open(path, *, backing=None, backing_dirs=(), data_file=None, snapshot=None,
         cache_size: int = DEFAULT_CACHE_SIZE, max_depth: int = MAX_CHAIN_DEPTH,
         force_share: bool = False, format: str | None = None) -> Image:
    """Open a QCOW2 image (or, with format="raw", a raw image) read-only.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        The image file.
    backing : None, False, path or Image
        None follows the backing file named in the image (under the path policy); False ignores
        it (unallocated clusters read as zeros); a path or opened image replaces it.
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing and external data files named in images.
    data_file : path, optional
        The external data file, instead of the name stored in the image.
    snapshot : str, optional
        Read this internal snapshot (by id or name) instead of the active state.
    cache_size : int
        L2 slice cache budget in bytes, per image of the chain.
    max_depth : int
        Longest backing chain accepted.
    force_share : bool
        Read even when a running QEMU holds the image (or a file of its chain) open for
        writing (qemu-img -U); by default that is an ImageLocked error.
    format : None, "qcow2" or "raw"
        None opens a QCOW2 image and refuses by name the formats qemu-img recognises (VMDK,
        VHD, ...); a file with no known magic is a FormatError. "raw" returns a `RawImage`.

    Raises
    ------
    QcowError
        (or a subclass) for anything wrong with the image; ImageNotFound (also a
        FileNotFoundError) when a file is missing.
    """
    return _open_top(path, format, False, dict(
        backing=backing, backing_dirs=backing_dirs, data_file=data_file, snapshot=snapshot,
        cache_size=cache_size, max_depth=max_depth, force_share=force_share))


def open_source(path, fmt: str | None = None, **open_kwargs) -> "Image | RawImage":
    """Open a source image the way qemu-img does for convert, compare and info.

    `fmt` None probes the file (`probe.detect_format`): a QCOW2 image opens as `Image`,
    foreign formats are refused by name (UnsupportedFeature), anything else is raw and opens
    as a top-level `RawImage`. "qcow2" and "raw" force the format. `open_kwargs` are those of
    `open` (force_share applies to raw files too; the other options need a QCOW2 image).
    """
    return _open_top(path, fmt, True, open_kwargs)


_PATH_TYPES = (str, bytes, os.PathLike)


def _check_open_options(fmt, kw: dict) -> None:
    """Refuse, naming the option and before any file is opened, values of the wrong kind
    (they used to fail deep inside, or be taken for a name: snapshot=True looked up 'True')."""
    backing = kw.get("backing")
    if not (backing is None or backing is False or isinstance(backing, (_Layer, *_PATH_TYPES))):
        raise TypeError(f"backing must be None, False, a path or an open image, not {backing!r}")
    data_file = kw.get("data_file")
    if data_file is not None and not isinstance(data_file, _PATH_TYPES):
        raise TypeError(f"data_file must be None or a path, not {data_file!r}")
    snapshot = kw.get("snapshot")
    if (isinstance(snapshot, bool)
            or not isinstance(snapshot, (type(None), str, bytes, int, dict))):
        raise TypeError(f"snapshot must be None or a snapshot's id or name (str), not "
                        f"{snapshot!r}")
    if "force_share" in kw:
        kw["force_share"] = boolean(kw["force_share"], "force_share")
    if fmt is not None and not isinstance(fmt, str):
        raise ValueError(f"format must be None, 'qcow2' or 'raw', not {fmt!r}")


def _open_top(path, fmt, raw_if_unknown: bool, kw: dict):
    _check_open_options(fmt, kw)
    if fmt not in (None, "qcow2", "raw"):
        raise UnsupportedFeature(f"{os.fspath(path)}: format {fmt!r} (qcowfast reads qcow2 and "
                                 "raw)")
    opened = open_file(path, "image", keep_dir=True)
    try:
        if fmt is None:
            fmt = detect_format(opened.fd, opened.path)
            if fmt == "raw" and not raw_if_unknown:
                fmt = "qcow2"                  # open(): not a QCOW2 image is a FormatError
        if fmt == "qcow2":
            return Image(opened, **kw)
        for key in ("backing", "data_file", "snapshot"):
            if kw.get(key) not in (None, False):
                raise UnsupportedFeature(f"{opened.path} is a raw image: {key}= needs a QCOW2 "
                                         "image")
        return RawImage(opened, 0, force_share=kw.get("force_share", False))
    finally:
        opened.close()                          # a no-op once the image took the descriptor


__all__ = ["Image", "RawImage", "Extent", "Runs", "open", "open_source", "QcowError"]
