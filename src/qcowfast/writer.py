"""Write a QCOW2 v3 image from any source: zero detection, batch compression on all cores, one
writer allocating host space in guest order.

Layout (the same bytes for any thread count): the header cluster, then the clusters in guest
order as QEMU allocates them: plain clusters appended at the end of the file, compressed streams
packed at byte granularity into the open cluster (qcow2_alloc_bytes: a stream that does not fit
runs over into the next cluster only when that one directly follows). Each L2 table is appended
once its guest range is done (at the latest before the data of a later table's range), each
refcount block once its host range is, then the L1 table, the last refcount blocks and the
refcount table. Memory is bounded: at most MAX_INFLIGHT batches of two WRITE_UNIT buffers, one
L2 table, a refcount window of about one block, the L1 and refcount tables (at most 32 MiB and
8 MiB: QEMU's limits).

Uncompressed chains and raw files are read by _plain's C kernels and the tables are built with
`array`, so such a source never imports numpy (0.1 s of a process's start-up).
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import sys
import threading
from array import array
from collections import deque

from . import _deflate, buffers
from .convert import (_every_unit, _Filler, _HandOver, _load_kernels, _plain_chain,
                      _plain_plan, _run_units, _write_all, np)
from .errors import OutputError
from .image import current_size

COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}
DEFAULT_LEVELS = {"zlib": 6, "zstd": 3}     # Z_DEFAULT_COMPRESSION, ZSTD_CLEVEL_DEFAULT
QCOW_OFLAG_COPIED = 1 << 63
QCOW_MAX_L1_SIZE = 0x2000000                # bytes (block/qcow2.h)
QCOW_MAX_REFTABLE_SIZE = 0x800000           # bytes (block/qcow2.h)
REFCOUNT_ORDER = 4                          # 16-bit refcounts, as qemu-img creates
WRITE_UNIT = 4 * 1024 * 1024                # guest bytes per batch; fixed: the layout depends
                                            # on it, and must not depend on the thread count
MAX_INFLIGHT = 16                           # batches in flight: 2 buffers each, <= 128 MiB
HEADER_LENGTH = 112
# Feature name table as QEMU 7.2 writes it (qcow2_update_header): (type, bit, name).
FEATURE_NAMES = ((0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
                 (0, 3, b"compression type"), (0, 4, b"extended L2 entries"),
                 (1, 0, b"lazy refcounts"), (2, 0, b"bitmaps"), (2, 1, b"raw external data"))
INCOMPAT_COMPRESSION = 1 << 3
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# qemu-img's words when an L1 table would outgrow QCOW_MAX_L1_SIZE: qcow2_co_create() resizes
# the new image to the virtual size, and qcow2_grow_l1_table() refuses with EFBIG.
L1_TOO_LARGE = ("error while converting qcow2: Could not resize image: Failed to grow the L1 "
                "table: File too large")


def _refused(name, text: str) -> OutputError:
    """The OutputError for an output that cannot be written: `text`, after the destination's
    `name` when known; `text` alone is kept as `unnamed` for a caller that knows it."""
    exc = OutputError(f"{name}: {text}" if name else text)
    exc.unnamed = text
    return exc


def _resolve_level(compression, level):
    if compression is None:
        if level is not None:
            raise ValueError("a compression level needs a compression type")
        return -1, 0
    if compression not in COMPRESSION_TYPES:
        raise ValueError(f"unknown compression type {compression!r} (zlib or zstd)")
    if level is None:
        level = DEFAULT_LEVELS[compression]
    if compression == "zlib":
        if not 1 <= level <= 9:
            raise ValueError("zlib level must be 1..9")
        # zlib-ng widens the window to 8 KiB at level 1; QEMU needs 4 KiB: level 2 instead.
        level = max(level, 2)
    return COMPRESSION_TYPES[compression], int(level)


def _header(vsize, cluster_bits, ctype, l1_size, l1_offset, rt_offset, rt_clusters) -> bytes:
    ctype = max(ctype, 0)                   # uncompressed images say zlib, as qemu-img's do
    incompat = INCOMPAT_COMPRESSION if ctype else 0
    hdr = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, cluster_bits, vsize, 0,
                      l1_size, l1_offset, rt_offset, rt_clusters, 0, 0, incompat, 0, 0,
                      REFCOUNT_ORDER, HEADER_LENGTH)
    hdr += bytes([ctype]) + bytes(HEADER_LENGTH - len(hdr) - 1)
    if cluster_bits > 12:
        # qemu-img 7.2 writes the feature-name table only with clusters over 4 KiB.
        table = b"".join(struct.pack(">BB46s", t, b, name) for t, b, name in FEATURE_NAMES)
        hdr += struct.pack(">II", 0x6803F857, len(table)) + table
    return hdr + bytes(8)                   # end of header extensions


def _zeros(typecode: str, n: int) -> array:
    return array(typecode, bytes(n * array(typecode).itemsize))


def _big_endian(values: array) -> array:
    """`values` with its items in big-endian byte order (in place)."""
    if sys.byteorder == "little":
        values.byteswap()
    return values


class _Layout:
    """The single writer: appends clusters, L2 tables and refcount blocks at the file's end."""

    def __init__(self, fd, cluster_size, vsize, name=None):
        self.fd = fd
        self.name = name                    # the destination, for errors
        self.cs = cluster_size
        self.bits = cluster_size.bit_length() - 1
        self.l2_entries = cluster_size // 8
        self.l1_size = -(-vsize // (self.l2_entries * cluster_size))
        if self.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise _refused(name, L1_TOO_LARGE)
        self.l1_clusters = -(-self.l1_size * 8 // cluster_size)
        self.l1 = _zeros("Q", self.l1_size)
        self.cur_t = -1
        self.cur = _zeros("Q", self.l2_entries)
        self.block = cluster_size * 8 >> REFCOUNT_ORDER     # host clusters per refcount block
        self.rc = _zeros("H", self.block)
        self.rc_base = 0                    # host cluster index of rc[0]
        self.reftable = array("Q")          # host offsets of the refcount blocks written
        self.rc[0] = 1                      # the header cluster
        # [end of file, open cluster of compressed streams (-1: none), bytes in it, carry dirty]
        self.state = array("q", [cluster_size, -1, 0, 0])
        self.carry = bytearray(cluster_size)    # the open cluster, once written

    @property
    def pos(self) -> int:
        return self.state[0]

    def need(self, clusters_end):
        """Make the refcount window reach host cluster `clusters_end` (exclusive)."""
        want = clusters_end - self.rc_base
        if want > len(self.rc):
            self.rc.frombytes(bytes(2 * max(want - len(self.rc), self.block)))

    def append_clusters(self, data) -> int:
        """Write whole clusters at the next cluster boundary, refcount 1 each; return offset."""
        cs = self.cs
        off = self.pos
        view = memoryview(data).cast("B")
        n = len(view) // cs
        self.need(off // cs + n)
        rc = self.rc
        for k in range(off // cs - self.rc_base, off // cs - self.rc_base + n):
            rc[k] += 1
        _write_all(self.fd, view, off)
        self.state[0] = off + len(view)
        return off

    def append_batch(self, src, offsets, out, sizes, staging, entries, runs):
        """Allocate and write one batch of clusters (see _deflate.pack); runs is a flat int64
        array with room for three items per cluster."""
        cs, n = self.cs, len(sizes)
        start, carried = self.pos, self.state[1]
        self.need(start // cs + n + 1)
        rows = memoryview(runs).cast("B").cast("q", (len(runs) // 3, 3))
        end, nruns = _deflate.pack(src, offsets, out, offsets, sizes, self.bits, self.state,
                                   staging, self.carry, self.rc, self.rc_base, entries, rows)
        if self.state[3]:
            _write_all(self.fd, memoryview(self.carry), carried * cs)
            self.state[3] = 0
        # Stored clusters go from the source buffer, the rest from staging: one pwritev.
        pieces, at = [], start
        st, sv = memoryview(staging), memoryview(src)
        for k in range(0, 3 * nruns, 3):
            host, off, length = runs[k:k + 3]
            if host > at:
                pieces.append(st[at - start:host - start])
            pieces.append(sv[off:off + length])
            at = host + length
        if end > at:
            pieces.append(st[at - start:end - start])
        _writev_all(self.fd, pieces, start)
        opened = self.state[1] * cs
        if opened >= start:
            self.carry[:] = staging[opened - start:opened - start + cs]

    def reach(self, g0):
        """Write the open L2 table now if guest cluster g0 lies past its range: the layout
        must not depend on whether the units between held data."""
        if self.cur_t >= 0 and g0 // self.l2_entries != self.cur_t:
            done = []
            self._close_table(done)
            self._write_tables(done)

    def add_entries(self, g0, entries):
        """Place L2 entries (an array("Q")) for guest clusters g0.. and write the L2 tables
        completed."""
        e, i, n = self.l2_entries, 0, len(entries)
        done = []
        while i < n:
            t, off = divmod(g0 + i, e)
            take = min(n - i, e - off)
            if t != self.cur_t:
                self._close_table(done)
                self.cur_t = t
            self.cur[off:off + take] = entries[i:i + take]
            i += take
            if off + take == e:
                self._close_table(done)
        self._write_tables(done)

    def _close_table(self, done):
        if self.cur_t >= 0 and self.cur.count(0) != len(self.cur):
            done.append((self.cur_t, self.cur))
            self.cur = _zeros("Q", self.l2_entries)
        elif self.cur_t >= 0:
            self.cur[:] = _zeros("Q", self.l2_entries)
        self.cur_t = -1

    def _write_tables(self, done):
        if not done:
            return
        tables = array("Q")
        for _, tbl in done:
            tables.extend(tbl)
        off = self.append_clusters(_big_endian(tables))
        for k, (t, _) in enumerate(done):
            self.l1[t] = (off + k * self.cs) | QCOW_OFLAG_COPIED
        self.flush_blocks()

    def refcount_room(self):
        """Refuse the output (OutputError) once its refcount table is certain to outgrow QEMU's
        limit: its clusters so far, the L1 table still to come and at least one refcount
        table cluster lie past what the largest table's refcount blocks can cover."""
        covered = QCOW_MAX_REFTABLE_SIZE // 8 * self.block     # host clusters, at most
        if -(-self.pos // self.cs) + self.l1_clusters + 1 > covered:
            raise _refused(self.name, self._reftable_text(covered))

    def _reftable_text(self, covered):
        return (f"the image needs a refcount table over QEMU's limit of "
                f"{QCOW_MAX_REFTABLE_SIZE} bytes (its clusters reach past {covered * self.cs} "
                f"bytes at cluster size {self.cs}); use a larger cluster size")

    def flush_blocks(self):
        """Write every refcount block whose host range lies wholly before the end of the file
        (after refcount_room())."""
        self.refcount_room()
        while self.rc_base + self.block <= self.pos // self.cs:
            if self.rc_base <= self.state[1] < self.rc_base + self.block:
                self.state[1] = -1          # close the open cluster: its refcount is final
            blk = _big_endian(self.rc[:self.block])
            self.need(self.rc_base + self.block + 1)
            del self.rc[:self.block]
            self.rc_base += self.block
            # Its own cluster lies past the range it covers, in the window's new first block.
            self.reftable.append(self.append_clusters(blk))

    def finish(self, vsize, ctype) -> int:
        """Write the last L2 table, L1, the last refcount blocks, the refcount table, the header."""
        done = []
        self._close_table(done)
        self._write_tables(done)
        cs = self.cs
        l1_offset = 0
        if self.l1_size:
            l1 = array("Q", self.l1)
            l1.frombytes(bytes(-(-self.l1_size * 8 // cs) * cs - self.l1_size * 8))
            l1_offset = self.append_clusters(_big_endian(l1))
            self.l1_clusters = 0                # (now counted in the file's end)
        self.flush_blocks()
        # The last refcount blocks and the refcount table must cover themselves
        # (qcow2-refcount.c, qcow2_refcount_area): iterate to the fixed point.
        end = self.pos // cs
        blocks = rt_clusters = 0
        while True:
            total = -(-(end + blocks + rt_clusters) // self.block)
            nb, nt = total - len(self.reftable), -(-total * 8 // cs)
            if (nb, nt) == (blocks, rt_clusters):
                break
            blocks, rt_clusters = nb, nt
        if rt_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
            raise _refused(self.name, self._reftable_text(QCOW_MAX_REFTABLE_SIZE // 8 *
                                                          self.block))
        self.need(end + blocks + rt_clusters)
        for k in range(end - self.rc_base, end + blocks + rt_clusters - self.rc_base):
            self.rc[k] += 1
        area = self.rc[:blocks * self.block]
        area.frombytes(bytes(2 * (blocks * self.block - len(area))))
        self.reftable.extend((end + k) * cs for k in range(blocks))
        reftable = array("Q", self.reftable)
        reftable.frombytes(bytes(rt_clusters * cs - 8 * len(reftable)))
        rt_offset = (end + blocks) * cs
        _write_all(self.fd, memoryview(_big_endian(area)).cast("B"), end * cs)
        _write_all(self.fd, memoryview(_big_endian(reftable)).cast("B"), rt_offset)
        self.state[0] = rt_offset + rt_clusters * cs
        hdr = _header(vsize, self.bits, ctype, self.l1_size, l1_offset, rt_offset, rt_clusters)
        _write_all(self.fd, hdr, 0)
        return self.pos


def _map_piece(chain, start: int, length: int):
    """(read-only view, mmap) of guest bytes [start, start + length) when they are one run of
    data in one file that holds them all, else None: clusters are then scanned and written
    straight from the page cache, without a copy into a buffer first."""
    found = chain.one_piece(start, length)
    if found is None:
        return None
    fd, host = found
    page = host - host % mmap.ALLOCATIONGRANULARITY
    # A file shorter than the range would raise SIGBUS when touched past its end.
    if current_size(fd) < host + length:
        return None
    try:
        mapping = mmap.mmap(fd, host + length - page, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                            prot=mmap.PROT_READ, offset=page)
    except (OSError, ValueError):
        return None
    return memoryview(mapping)[host - page:], mapping


def _unmap(retired: deque) -> None:
    """Unmap the (view, mmap) pairs in `retired` (any thread may)."""
    while True:
        try:
            view, mapping = retired.pop()
        except IndexError:
            return
        view.release()
        mapping.close()


def _writev_all(fd, pieces, offset):
    """pwritev the buffers in order from `offset`, in groups the kernel accepts."""
    for k in range(0, len(pieces), 512):
        group = pieces[k:k + 512]
        done = os.pwritev(fd, group, offset)
        want = sum(map(len, group))
        if done < want:                     # short write: finish piece by piece
            pos = offset
            for piece in group:
                if pos + len(piece) > offset + done:
                    skip = max(0, offset + done - pos)
                    _write_all(fd, piece[skip:], pos + skip)
                pos += len(piece)
        offset += want


def write_qcow2(source, fd, *, compression=None, level=None, cluster_size=65536, threads=None,
                progress=None, sparse_size=4096, compression_type=None, name=None) -> int:
    """Write `source` as a QCOW2 v3 image into the empty regular file `fd`.

    Parameters
    ----------
    source : Image or top-level raw image
        What to write (has virtual_size, _runs, layer()).
    fd : int
        An open, empty, writable regular file.
    compression : None, "zlib" or "zstd"
        Store every cluster that shrinks compressed, as QEMU does; None writes a plain sparse
        image.
    level : int, optional
        zlib 1..9 (default 6; 1 is written as 2: zlib-ng's level 1 uses an 8 KiB window, QEMU
        needs 4 KiB) or a zstd level (default 3).
    cluster_size : int
        Power of two from 512 to 2 MiB.
    threads : int, optional
        Compression threads (default: all cores). The output is the same for any count.
    progress : callable(done_bytes, total_bytes), optional
        Called from the calling thread as guest space is finished.
    sparse_size : int
        qemu-img's -S: all-zero clusters are not stored, except that 0 stores every cluster
        and, in plain images with clusters smaller than sparse_size, zero clusters are stored
        where qemu-img would write them (zero runs shorter than sparse_size between data).
    compression_type : None, "zlib" or "zstd"
        The compression type the header records (default: `compression`, else zlib), as
        qemu-img's -o compression_type without -c.
    name : str, optional
        The destination as the caller named it, for the OutputError of an image QEMU's limits
        refuse: an L1 table over 32 MiB (at the start, in qemu-img's words) or a refcount
        table over 8 MiB (as soon as the clusters written make it certain).

    Returns
    -------
    int
        Size of the written file.
    """
    if not 512 <= cluster_size <= 1 << 21 or cluster_size & (cluster_size - 1):
        raise ValueError("cluster_size must be a power of two from 512 to 2 MiB")
    ctype, level = _resolve_level(compression, level)
    header_type = compression_type or compression or "zlib"
    if header_type not in COMPRESSION_TYPES:
        raise ValueError(f"unknown compression type {header_type!r} (zlib or zstd)")
    if compression is not None and header_type != compression:
        raise ValueError(f"compression {compression!r} and compression_type {header_type!r} "
                         "differ")
    if sparse_size < 0 or sparse_size % 512:
        raise ValueError("sparse_size must be a non-negative multiple of 512")
    threads = threads or len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError("threads must be at least 1")
    _deflate.Compressor(ctype, cluster_size, level)  # fail early on a missing library or level
    zeros = _ZeroRule(sparse_size, ctype, cluster_size)
    chain = _plain_chain(source, WRITE_UNIT, 512)
    if chain is not None:
        try:
            return _write(source, fd, chain, ctype, level, cluster_size, threads, progress,
                          zeros, COMPRESSION_TYPES[header_type], name)
        except _HandOver:
            # A unit the plain path does not serve (the source changed under it): start again
            # on the general path, which raises what is wrong, if anything.
            os.ftruncate(fd, 0)
    return _write(source, fd, None, ctype, level, cluster_size, threads, progress, zeros,
                  COMPRESSION_TYPES[header_type], name)


class _ZeroRule:
    """Which all-zero clusters are stored, as qemu-img convert -S decides (see sparse.py)."""

    def __init__(self, sparse_size: int, ctype: int, cluster_size: int):
        self.keep_all = sparse_size == 0            # -S 0: every cluster (compressed too)
        self.sparse_size = sparse_size
        # Compressed output is written cluster by cluster, so qemu-img skips exactly the zero
        # clusters; so it does in plain output when a cluster holds at least -S bytes.
        self.plan_needed = ctype < 0 and 0 < sparse_size and cluster_size < sparse_size

    def plan(self, source, cluster_size: int, unit: int):
        if not self.plan_needed:
            return None
        from .sparse import SparsePlan
        return SparsePlan(source, self.sparse_size, cluster_size, unit)


def _write(source, fd, chain, ctype, level, cs, threads, progress, zeros, header_type,
           name) -> int:
    """write_qcow2 reading through _plain `chain`, or through the general filler when None."""
    vsize = -(-source.virtual_size // 512) * 512     # qcow2_co_create_opts() rounds up
    layout = _Layout(fd, cs, vsize, name)
    unit = WRITE_UNIT                       # a multiple of every cluster size (<= 2 MiB)
    ncl = unit // cs
    offsets = memoryview(array("q", range(0, unit, cs)))
    local = threading.local()
    spare: deque = deque()             # buffers of finished batches (thread-safe)
    retired: deque = deque()           # mappings written out: the workers unmap them (munmap
                                       # costs the writer's thread 40 ms per GiB)
    staging = buffers.take(unit + cs)
    taken = [staging]                       # given back at the end (buffers.py)
    entries = _zeros("Q", ncl)
    stored_runs = _zeros("q", 3 * ncl)
    if chain is None:
        _load_kernels()
        filler = _Filler(source, unit)

        def fill(ui, runs, buf):
            return filler.fill(ui, runs, np.frombuffer(buf, np.uint8)), buf, None
        plan = None
    else:
        def fill(ui, runs, buf):
            start = ui * unit
            ulen = min(unit, source.virtual_size - start)
            mapped = _map_piece(chain, start, ulen) if ulen % cs == 0 else None
            if mapped is not None:
                return (ulen, *mapped)
            if chain.read(start, ulen, buf) < 0:
                raise _HandOver
            return ulen, buf, None
        plan = _plain_plan(chain, source.virtual_size, unit)

    def work(ui, runs):
        _unmap(retired)
        comp = getattr(local, "comp", None)
        if comp is None:
            comp = local.comp = _deflate.Compressor(ctype, cs, level)
        try:
            bufs = spare.pop()
        except IndexError:
            bufs = (buffers.take(unit), buffers.take(unit if ctype >= 0 else cs),
                    _zeros("q", ncl))
            taken.extend(bufs[:2])
        buf, out, sizes = bufs
        ulen, src, mapping = fill(ui, runs, buf)
        n = -(-ulen // cs)
        if n * cs > ulen:
            src[ulen:n * cs] = bytes(n * cs - ulen)   # QEMU zero-pads the last cluster too
        try:
            comp.compress_batch(src, offsets[:n], out, offsets[:n], memoryview(sizes)[:n],
                                zeros.keep_all)
        except _deflate.SourceVanished:
            local.comp = None                   # (cut short: unusable)
            raise _HandOver from None
        mask = None if sparse_plan is None else _tables.sector_mask(memoryview(src)[:ulen])
        return bufs, n, ulen, src, mapping, mask

    def done(ui, result):
        if sparse_plan is None:
            append(ui, result)
            return
        # Which zero clusters qemu-img writes can depend on the next unit's first sectors:
        # each unit is appended once the next one is known.
        sparse_plan.add(ui, result[-1])
        if pending:
            append(*pending.pop())
        pending.append((ui, result))

    def append(ui, result):
        bufs, n, ulen, src, mapping, _ = result
        _, out, sizes = bufs
        if sparse_plan is not None:
            for j in np.flatnonzero(sparse_plan.forced(ui)[:n]).tolist():
                if sizes[j] == _deflate.ZERO_CLUSTER:
                    sizes[j] = _deflate.STORED
        g0 = ui * unit // cs
        layout.reach(g0)
        try:
            layout.append_batch(src, offsets[:n], out, memoryview(sizes)[:n], staging,
                                memoryview(entries)[:n], stored_runs)
        except OSError as exc:
            if mapping is not None and exc.errno == errno.EFAULT:
                raise _HandOver from None       # the mapped file shrank under the write
            raise
        if mapping is not None:
            retired.append((src, mapping))
        spare.append(bufs)
        layout.flush_blocks()
        layout.add_entries(g0, entries[:n])
        if progress:
            progress(ui * unit + ulen, source.virtual_size)

    sparse_plan = zeros.plan(source, cs, unit)
    if sparse_plan is not None:
        from . import _tables
    pending: list = []
    # Never more workers than batches in flight (each holds a Compressor and two buffers).
    try:
        if zeros.keep_all:
            plan = _every_unit(source, unit, plan)
        _run_units(source, unit, min(threads, MAX_INFLIGHT), work, done,
                   lambda t: min(2 * t + 2, MAX_INFLIGHT), plan=plan, cap=MAX_INFLIGHT)
        if pending:
            sparse_plan.finish()
            append(*pending.pop())
    finally:
        _unmap(retired)
        for buf in taken:
            buffers.give(buf)
    size = layout.finish(vsize, header_type)
    os.ftruncate(fd, size)
    if progress:
        progress(source.virtual_size, source.virtual_size)
    return size
