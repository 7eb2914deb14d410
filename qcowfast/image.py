"""An opened QCOW2 image: L1 table, L2 slice cache, compressed-cluster cache, backing chain.

Everything above the kernels speaks in runs of guest bytes (the extent seam, see README):
`Image._runs(start, end)` yields `Runs` chunks of numpy arrays resolved through the whole backing
chain; `extents()`, `read()`, `map()` and convert are consumers of that one stream.
"""
from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from . import _inflate, _tables
from .constants import (
    L1E_OFFSET_MASK, MAX_CHAIN_DEPTH, QCOW_MAGIC, QCOW_OFLAG_COPIED,
    CompressionType, ExtentKind,
)
from .errors import (
    BackingChainError, CorruptImage, DecompressionError, FormatError, QcowError, TruncatedImage,
    UnsupportedFeature,
)
from .header import Header, read_header
from .paths import resolve_reference

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024      # L2 slice cache budget per image (QEMU's maximum)
COMPRESSED_CACHE_CLUSTERS = 16              # recently inflated clusters kept for small reads
L2_SLICE_BYTES = 64 * 1024                  # L2 tables are read and cached in slices of this size
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = (int(k) for k in ExtentKind)


class Extent(NamedTuple):
    """A run of guest bytes served the same way; see ExtentKind."""
    guest_offset: int
    length: int
    kind: ExtentKind
    host_offset: int | None
    depth: int


class Runs(NamedTuple):
    """A chunk of runs as parallel numpy arrays (int64 unless noted), sorted by guest offset.

    host is -1 where no host cluster is kept; csize is the compressed stream length of
    COMPRESSED runs; depth says which layer of the chain serves each run.
    """
    guest: np.ndarray
    length: np.ndarray
    kind: np.ndarray     # uint8 ExtentKind
    host: np.ndarray
    csize: np.ndarray
    depth: np.ndarray


def _single_run(start: int, end: int, kind: int, depth: int) -> Runs:
    one = lambda v: np.array([v], np.int64)  # noqa: E731
    return Runs(one(start), one(end - start), np.array([kind], np.uint8), one(-1), one(0),
                one(depth))


def _open_ro(path: str, what: str) -> int:
    """Open a regular file read-only; never block on a FIFO or device; QcowError if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BackingChainError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{what} {path} is not a regular file")
    return fd


def _pread_exact(fd: int, buf, offset: int, what: str, file_size: int) -> None:
    """Fill memoryview `buf` from `fd` at `offset`; a short read is a TruncatedImage."""
    want = len(buf)
    got = 0
    while got < want:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise TruncatedImage(f"{what}: {want} bytes at {offset:#x} run past the end of the "
                                 f"file ({file_size} bytes)")
        got += n


class _Layer:
    """What every layer of a chain offers the chain: reads of its own runs and host bytes."""
    filename: str
    virtual_size: int
    depth: int
    backing: "_Layer | None"

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
        pos = 0
        for h in holes:
            if h > pos:
                yield Runs(*(a[pos:h] for a in chunk))
            g0 = int(chunk.guest[h])
            g1 = g0 + int(chunk.length[h])
            mid = min(g1, backing.virtual_size)
            if g0 < mid:
                yield from backing._runs(g0, mid)
            if max(g0, mid) < g1:
                # Past the end of a shorter backing file: zeros, unallocated at this layer
                # (QEMU bdrv_co_block_status() reports them as zero at the upper layer).
                tail = _single_run(max(g0, mid), g1, _UNALLOCATED, self.depth)
                if chunk.host[h] >= 0:
                    tail.host[0] = chunk.host[h] + (max(g0, mid) - g0)
                yield tail
            pos = h + 1
        if pos < len(chunk.guest):
            yield Runs(*(a[pos:] for a in chunk))

    def layer(self, depth: int) -> "_Layer":
        node = self
        while node.depth != depth:
            node = node.backing
        return node


class RawImage(_Layer):
    """A raw file used as a backing file: every byte is data at the same offset."""

    def __init__(self, path: str, depth: int):
        self.filename = path
        self.depth = depth
        self.backing = None
        self._fd = _open_ro(path, "raw backing file")
        self.data_size = os.fstat(self._fd).st_size
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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Image(_Layer):
    """An opened QCOW2 image (read-only), with its backing chain. Use `qcowfast.open`.

    Thread-safe: several threads may call `read`/`readinto`/`extents` at once.
    """

    def __init__(self, path, *, backing=None, backing_dirs=(), data_file=None, snapshot=None,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_depth: int = MAX_CHAIN_DEPTH,
                 _depth: int = 0, _seen: tuple = ()):
        self.filename = os.fspath(path)
        self.depth = _depth
        self.backing = None
        self._data_fd = -1
        self._fd = -1
        try:
            self._fd = os.open(self.filename,
                               os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            self._open(backing, tuple(os.fspath(d) for d in backing_dirs), data_file,
                       snapshot, cache_size, max_depth, _seen)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _open(self, backing, backing_dirs, data_file, snapshot, cache_size, max_depth, seen):
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{self.filename} is not a regular file")
        self.file_size = st.st_size
        self.header: Header = read_header(self._fd, self.file_size)
        h = self.header
        self.virtual_size = h.size - h.size % 512   # QEMU counts whole sectors (qcow2_do_open)
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.compression_type = CompressionType(h.compression_type)
        self._flags = ((_tables.FLAGS["v3"] if h.version >= 3 else 0)
                       | (_tables.FLAGS["extended_l2"] if h.extended_l2 else 0)
                       | (_tables.FLAGS["data_file"] if h.has_data_file else 0))
        self._l2_per_l1 = h.l2_entries * h.cluster_size            # guest bytes per L1 entry
        self._slice_entries = max(1, min(h.l2_entries, L2_SLICE_BYTES // h.l2_entry_size))
        self._lock = threading.Lock()
        self._l2_cache: OrderedDict = OrderedDict()
        self._l2_cache_bytes = 0
        self._cache_size = max(int(cache_size), 2 * self._slice_entries * h.l2_entry_size)
        self._zcache: OrderedDict = OrderedDict()
        self._local = threading.local()

        l1_offset, what = h.l1_table_offset, "L1 table"
        self.snapshot = None
        if snapshot is not None:
            from .snapshots import find_snapshot
            self.snapshot = snap = find_snapshot(self, snapshot)
            self.virtual_size = snap.disk_size
            l1_offset, what = snap.l1_table_offset, f"L1 table of snapshot {snap.id!r}"
        l1_used = -(-self.virtual_size // self._l2_per_l1) if self.virtual_size else 0
        self._l1_be = self._read_table(l1_offset, l1_used, what)
        bad = _tables.l1_check(self._l1_be, h.cluster_bits, self.file_size)
        if bad >= 0:
            entry = int(self._l1_be[bad])
            l2 = entry & L1E_OFFSET_MASK
            where = f"{self.filename}: L1 entry {bad} ({entry:#018x})"
            if entry & ~(L1E_OFFSET_MASK | QCOW_OFLAG_COPIED):
                raise CorruptImage(f"{where}: reserved bits are set")
            if l2 % self.cluster_size:
                raise CorruptImage(f"{where}: L2 table offset {l2:#x} is not aligned to the "
                                   f"cluster size")
            raise TruncatedImage(f"{where}: L2 table at {l2:#x} lies past the end of the file "
                                 f"({self.file_size} bytes)")
        self._l2_offsets = _tables.l1_offsets(self._l1_be)
        used = self._l2_offsets[self._l2_offsets != 0]
        if len(np.unique(used)) != len(used):
            # QEMU never shares an L2 table within one L1 table; a crafted repeat would make
            # work grow with the declared size instead of the file.
            values, first, counts = np.unique(self._l2_offsets, return_index=True,
                                              return_counts=True)
            dup = next(v for v, c in zip(values.tolist(), counts.tolist()) if v and c > 1)
            where = np.flatnonzero(self._l2_offsets == dup)[:2].tolist()
            raise CorruptImage(f"{self.filename}: L1 entries {where[0]} and {where[1]} both "
                               f"point to the L2 table at {dup:#x}")

        self._open_data_file(data_file, backing_dirs)
        self._open_backing(backing, backing_dirs, cache_size, max_depth, seen)

    def _read_table(self, offset: int, entries: int, what: str) -> np.ndarray:
        raw = bytearray(entries * 8)
        if entries:
            _pread_exact(self._fd, memoryview(raw), offset, f"{self.filename}: {what}",
                         self.file_size)
        return np.frombuffer(raw, ">u8")

    def _open_data_file(self, data_file, allowed):
        h = self.header
        if not h.has_data_file:
            if data_file is not None:
                raise FormatError(f"{self.filename} has no external data file but data_file= was given")
            self.data_fd, self.data_size = self._fd, self.file_size
            return
        if data_file is None:
            if not h.data_file:
                raise FormatError(f"{self.filename} needs an external data file but names none; "
                                  "pass data_file=PATH")
            data_file = resolve_reference(self.filename, h.data_file, "external data file", allowed)
        self.data_file = os.fspath(data_file)
        self._data_fd = _open_ro(self.data_file, f"external data file of {self.filename}:")
        self.data_fd = self._data_fd
        self.data_size = os.fstat(self._data_fd).st_size

    def _open_backing(self, backing, allowed, cache_size, max_depth, seen):
        h = self.header
        me = _file_id(self.filename)
        seen = seen + (me,)
        if backing is False or (backing is None and not h.backing_file):
            return
        if isinstance(backing, _Layer):
            self.backing = backing
            return
        if backing is None:
            path = resolve_reference(self.filename, h.backing_file, "backing file", allowed)
        else:
            path = os.fspath(backing)
        if self.depth + 1 > max_depth:
            raise BackingChainError(f"backing chain of {self.filename} is deeper than {max_depth}")
        try:
            ident = _file_id(path)
        except OSError as exc:
            raise BackingChainError(f"backing file {path} of {self.filename} cannot be opened: "
                                    f"{exc.strerror}") from None
        if ident in seen:
            raise BackingChainError(f"backing chain loops: {self.filename} -> {path}")
        fmt = h.backing_format if backing is None else None
        if fmt is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                fmt = "qcow2" if os.pread(fd, 4, 0) == QCOW_MAGIC else "raw"
            finally:
                os.close(fd)
        if fmt == "raw":
            self.backing = RawImage(path, self.depth + 1)
        elif fmt == "qcow2":
            self.backing = Image(path, backing_dirs=allowed, cache_size=cache_size,
                                 max_depth=max_depth, _depth=self.depth + 1, _seen=seen)
        else:
            raise UnsupportedFeature(f"backing file format {fmt!r} of {self.filename} (qcowfast "
                                     "reads qcow2 and raw backing files)")

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close this image and its backing chain."""
        if self.backing is not None and self.backing.depth > self.depth:
            self.backing.close()
        for attr in ("_data_fd", "_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<qcowfast.Image {self.filename!r} v{self.header.version} "
                f"size={self.virtual_size} cluster={self.cluster_size}"
                f"{' backing=' + repr(self.backing.filename) if self.backing else ''}>")

    @property
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
        key = (l2_offset, slice_index)
        with self._lock:
            tbl = self._l2_cache.get(key)
            if tbl is not None:
                self._l2_cache.move_to_end(key)
                return tbl
        nbytes = self._slice_entries * self.header.l2_entry_size
        raw = bytearray(nbytes)
        _pread_exact(self._fd, memoryview(raw), l2_offset + slice_index * nbytes,
                     f"{self.filename}: L2 table at {l2_offset:#x}", self.file_size)
        tbl = np.frombuffer(raw, ">u8")
        with self._lock:
            if key not in self._l2_cache:
                self._l2_cache[key] = tbl
                self._l2_cache_bytes += nbytes
                while self._l2_cache_bytes > self._cache_size:
                    _, old = self._l2_cache.popitem(last=False)
                    self._l2_cache_bytes -= old.nbytes
        return tbl

    def _own_runs(self, start: int, end: int) -> Iterator[Runs]:
        """Runs of this layer alone over [start, end), UNALLOCATED where it has no cluster."""
        if start >= end:
            return
        per_l1 = self._l2_per_l1
        cs = self.cluster_size
        i0, i1 = start // per_l1, (end - 1) // per_l1
        offsets = self._l2_offsets
        present = np.flatnonzero(offsets[i0:i1 + 1]) + i0
        pos = start
        for l1_index in present.tolist():
            table_start = l1_index * per_l1
            if table_start > pos:
                yield _single_run(pos, table_start, _UNALLOCATED, self.depth)
                pos = table_start
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
                    index = s_index * self._slice_entries + err.index
                    guest = table_start + index * cs
                    cls = TruncatedImage if err.past_eof else CorruptImage
                    raise cls(f"{self.filename}: L2 entry {index} of the table at {l2_offset:#x} "
                              f"(guest offset {guest:#x}): {err.rule}") from None
                yield self._clip(arrays, pos, table_end)
                first += count
                pos = min(table_start + first * cs, table_end)
            pos = table_end
        if pos < end:
            yield _single_run(pos, end, _UNALLOCATED, self.depth)

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
        start, end = self._span(start, length)
        pending = None
        for chunk in self._runs(start, end):
            for g, n, k, h, d in zip(chunk.guest.tolist(), chunk.length.tolist(),
                                     chunk.kind.tolist(), chunk.host.tolist(),
                                     chunk.depth.tolist()):
                if pending is not None:
                    pg, pn, pk, ph, pd = pending
                    if (pk == k and pd == d and k != _COMPRESSED and pg + pn == g
                            and ((ph < 0 and h < 0) or (ph >= 0 and h == ph + pn))):
                        pending = (pg, pn + n, pk, ph, pd)
                        continue
                    yield _extent(*pending)
                pending = (g, n, k, h, d)
        if pending is not None:
            yield _extent(*pending)

    def _span(self, start: int, length: int | None) -> tuple[int, int]:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be non-negative")
        end = self.virtual_size if length is None else min(start + length, self.virtual_size)
        return min(start, self.virtual_size), end

    def map(self) -> list[dict]:
        """The image's allocation map, as `qemu-img map --output=json` prints it."""
        from .mapping import map_entries
        return map_entries(self)

    # -- reading -------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """Return up to `size` guest bytes from `offset` (fewer at the end of the image)."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be non-negative")
        n = max(0, min(size, self.virtual_size - offset))
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buffer) -> int:
        """Fill `buffer` with guest bytes from `offset`; return the count (short at the end)."""
        if offset < 0:
            raise ValueError("offset must be non-negative")
        view = memoryview(buffer).cast("B")
        start, end = self._span(offset, len(view))
        for chunk in self._runs(start, end):
            for g, n, k, h, c, d in zip(chunk.guest.tolist(), chunk.length.tolist(),
                                        chunk.kind.tolist(), chunk.host.tolist(),
                                        chunk.csize.tolist(), chunk.depth.tolist()):
                dst = view[g - start:g - start + n]
                if k == _DATA:
                    layer = self.layer(d)
                    _pread_exact(layer.data_fd, dst, h, f"{layer.filename}: data cluster "
                                 f"for guest offset {g:#x}", layer.data_size)
                elif k == _COMPRESSED:
                    layer = self.layer(d)
                    cluster = layer._inflated(h, c, g)
                    within = g & (layer.cluster_size - 1)
                    dst[:] = cluster[within:within + n]
                else:
                    dst[:] = bytes(n)
        return end - start

    def as_file(self):
        """A read-only, seekable `io.RawIOBase` over the guest contents."""
        from .reader import ImageFile
        return ImageFile(self)

    # -- compressed clusters -------------------------------------------------------------------
    def decompressor(self):
        """This thread's Decompressor for the image's compression type and cluster size."""
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = _inflate.Decompressor(int(self.compression_type), self.cluster_size)
            self._local.dec = dec
        return dec

    def read_compressed(self, coffsets: np.ndarray, csizes: np.ndarray, gap: int | None = None):
        """Read the compressed streams [coffsets[i], +csizes[i]) with few large reads.

        Returns (buffer, in_off, in_len): stream i is buffer[in_off[i]:+in_len[i]]; the buffer is
        this thread's scratch space, valid until its next call. Lengths are
        clipped at the end of the file, where the sector-rounded size may overhang (QEMU reads
        zeros there); a stream starting past the end is a TruncatedImage.
        """
        # Merging across gaps of at most one cluster keeps a read within 3 bytes per cluster
        # byte even when crafted descriptors are spread out (csize <= 2 clusters).
        gap = min(65536, self.cluster_size) if gap is None else gap
        limit = self.data_size
        if len(coffsets) and int(coffsets.max()) >= limit:
            raise TruncatedImage(f"{self.filename}: compressed cluster at {int(coffsets.max()):#x} "
                                 f"starts past the end of the file ({limit} bytes)")
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
        # A per-thread scratch buffer, reused: fresh pages per unit cost page faults and zeroing.
        buf = getattr(self._local, "cbuf", None)
        if buf is None or len(buf) < total:
            buf = self._local.cbuf = np.empty(max(total, 1 << 20), np.uint8)
        view = memoryview(buf)[:total]
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

    def inflate_into(self, coffsets, csizes, guests, out, out_off) -> None:
        """Inflate compressed clusters into `out` at `out_off`; raise DecompressionError."""
        src, in_off, in_len = self.read_compressed(coffsets, csizes)
        dec = self.decompressor()
        bad = dec.inflate_batch(src, in_off, in_len, out, out_off)
        if bad >= 0:
            # A stream that ran out of input where the end of the file clipped it was cut short.
            if dec.input_exhausted and in_len[bad] < csizes[bad]:
                raise TruncatedImage(
                    f"{self.filename}: compressed cluster at host offset "
                    f"{int(coffsets[bad]):#x} is cut short by the end of the file")
            raise DecompressionError(
                f"{self.filename}: compressed cluster at host offset {int(coffsets[bad]):#x} "
                f"(guest offset {int(guests[bad]) & ~(self.cluster_size - 1):#x}) does not "
                f"{self.compression_type.name.lower()}-decompress to exactly one cluster")

    def _inflated(self, coffset: int, csize: int, guest: int) -> bytes:
        key = coffset
        with self._lock:
            data = self._zcache.get(key)
            if data is not None:
                self._zcache.move_to_end(key)
                return data
        out = bytearray(self.cluster_size)
        one = lambda v: np.array([v], np.int64)  # noqa: E731
        self.inflate_into(one(coffset), one(csize), one(guest), out, one(0))
        data = bytes(out)
        with self._lock:
            self._zcache[key] = data
            while len(self._zcache) > COMPRESSED_CACHE_CLUSTERS:
                self._zcache.popitem(last=False)
        return data


def _extent(g, n, k, h, d) -> Extent:
    return Extent(g, n, ExtentKind(k), h if h >= 0 else None, d)


def open(path, *, backing=None, backing_dirs=(), data_file=None, snapshot=None,
         cache_size: int = DEFAULT_CACHE_SIZE, max_depth: int = MAX_CHAIN_DEPTH) -> Image:
    """Open a QCOW2 image read-only.

    Parameters
    ----------
    path : str or os.PathLike
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

    Raises
    ------
    QcowError
        (or a subclass) for anything wrong with the image; OSError for files that cannot be
        opened at all.
    """
    return Image(path, backing=backing, backing_dirs=backing_dirs, data_file=data_file,
                 snapshot=snapshot, cache_size=cache_size, max_depth=max_depth)


__all__ = ["Image", "RawImage", "Extent", "Runs", "open", "QcowError"]
