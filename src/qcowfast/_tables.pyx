# cython: language_level=3
"""Table kernels: classify L2 entries, mask offsets, decode compressed descriptors, coalesce runs.

Compiled because an image has one L2 entry per guest cluster (16 Mi entries for 1 TiB at 64 KiB):
these loops run in C over zero-copy uint64 views of big-endian tables, with the GIL released.
The facade (image.py) checks shapes and sizes once; the loops report the first bad entry by index.
SmallReader serves reads of at most one cluster (lookup, checks and pread) in one call, because
Python's per-call cost would be most of a 4 KiB read.
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItemWithError
from cpython.ref cimport PyObject
from cpython.weakref cimport PyWeakref_GetObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset
from posix.unistd cimport pread

import weakref

import numpy as np

cnp.import_array()

include "_classify.pxi"


def classify_l2(l2_be, Py_ssize_t first, Py_ssize_t count, int cluster_bits, int flags,
                int64_t guest_base, int64_t host_limit):
    """Classify `count` L2 entries from index `first` of a big-endian table into coalesced runs.

    Returns (guest, length, kind, host, csize) int64/uint8 arrays; host is -1 where no host cluster
    is kept; csize is the compressed stream length for COMPRESSED runs. Raises CorruptImage naming
    the first bad entry.
    """
    cdef const uint64_t[::1] tbl = _u64_view(l2_be)
    cdef int64_t width = 2 if flags & FLAG_EXTENDED_L2 else 1
    if not 9 <= cluster_bits <= 21:
        raise ValueError("cluster_bits out of range")
    if first < 0 or count < 0 or (first + count) * width > tbl.shape[0]:
        raise ValueError("entry range outside the table")
    cdef int64_t cap = count * (32 if width == 2 else 1)
    o_guest = np.empty(cap, np.int64)
    o_len = np.empty(cap, np.int64)
    o_kind = np.empty(cap, np.uint8)
    o_host = np.empty(cap, np.int64)
    o_csize = np.empty(cap, np.int64)
    cdef int64_t[::1] g = o_guest, ln = o_len, h = o_host, cs = o_csize
    cdef uint8_t[::1] k = o_kind
    cdef int64_t bad_index = -1, n
    cdef int bad_code = E_OK
    with nogil:
        n = classify_loop(&tbl[0], first, count, cluster_bits, flags, guest_base, host_limit,
                          &g[0], &ln[0], &k[0], &h[0], &cs[0], &bad_index, &bad_code)
    if n < 0:
        raise L2EntryError(bad_index, bad_code)
    return o_guest[:n], o_len[:n], o_kind[:n], o_host[:n], o_csize[:n]


class L2EntryError(Exception):
    """Internal: carries the failing L2 index and rule; image.py turns it into CorruptImage."""

    def __init__(self, index, code):
        super().__init__(index, code)
        self.index = index
        self.code = code
        self.rule = _MESSAGES[code]
        self.past_eof = code == E_PAST_EOF
        self.bad_bitmap = code == E_SUBCLUSTER


cdef const uint64_t[::1] _u64_view(arr):
    """Zero-copy uint64 view of a big-endian `>u8` (or native uint64 holding raw bytes) array."""
    if not isinstance(arr, np.ndarray) or arr.dtype.itemsize != 8 or arr.dtype.kind != "u":
        raise TypeError("expected a uint64 numpy array")
    if not arr.flags.c_contiguous:
        raise ValueError("table must be C-contiguous")
    return arr.view(np.uint64)


def nonzero_runs(buf, Py_ssize_t granularity, int64_t origin=0):
    """Return (starts, ends) int64 arrays of the runs of `buf` not made of all-zero blocks.

    Blocks are `granularity` bytes aligned to absolute offsets, `buf[0]` lying at absolute offset
    `origin` (the first and last blocks may be shorter); adjacent non-zero blocks are merged.
    """
    cdef const uint8_t[::1] b = memoryview(buf).cast("B")
    cdef Py_ssize_t size = b.shape[0]
    if granularity <= 0 or origin < 0:
        raise ValueError("granularity must be positive and origin non-negative")
    cdef Py_ssize_t nblocks = (size + granularity - 1) // granularity + 1
    starts = np.empty(nblocks // 2 + 1, np.int64)
    ends = np.empty(nblocks // 2 + 1, np.int64)
    cdef int64_t[::1] s = starts, e = ends
    cdef Py_ssize_t n = 0, pos = 0, end
    cdef int in_run = 0, nz
    if size == 0:
        return starts[:0], ends[:0]
    with nogil:
        end = granularity - <Py_ssize_t>(origin % granularity)
        while pos < size:
            if end > size:
                end = size
            nz = _block_nonzero(&b[0], pos, end)
            if nz and not in_run:
                s[n] = pos
                in_run = 1
            elif not nz and in_run:
                e[n] = pos
                n += 1
                in_run = 0
            pos = end
            end = pos + granularity
        if in_run:
            e[n] = size
            n += 1
    return starts[:n], ends[:n]


def sector_mask(buf):
    """uint8 array with one item per 512-byte sector of `buf`: 1 where it holds a non-zero byte
    (a partial last sector counts as a sector)."""
    cdef const uint8_t[::1] b = memoryview(buf).cast("B")
    cdef Py_ssize_t size = b.shape[0], n = (size + 511) // 512, i
    out = np.empty(n, np.uint8)
    cdef uint8_t[::1] m = out
    if n:
        with nogil:
            for i in range(n):
                m[i] = _block_nonzero(&b[0], i * 512, min(size, (i + 1) * 512)) != 0
    return out


cdef Py_ssize_t _same_run(const uint8_t *m, Py_ssize_t pos, Py_ssize_t n, int64_t sector,
                          Py_ssize_t align, bint *data) noexcept nogil:
    # qemu-img.c is_allocated_sectors(): the run of sectors from m[pos] (n left) in the same
    # state, its end aligned: a data run grows to the next `align` boundary, a zero run
    # followed by data shrinks to the previous one (or turns into data when that leaves
    # nothing).
    cdef bint zero = m[pos] == 0
    cdef Py_ssize_t i = 1, tail
    while i < n and (m[pos + i] == 0) == zero:
        i += 1
    if i < n:
        tail = (sector + i) & (align - 1)
        if tail:
            if zero and i <= tail:
                zero = False
            if not zero:
                i = min(i + align - tail, n)
            else:
                i -= tail
    data[0] = not zero
    return i


def sparse_writes(mask, int64_t sector0, Py_ssize_t min_sectors, Py_ssize_t align):
    """Sector runs qemu-img convert writes of one data chunk (QEMU 7.2 qemu-img.c
    convert_co_write with is_allocated_sectors_min): `mask` is the chunk's sector_mask, its
    first sector guest sector `sector0`; `min_sectors` is -S in sectors (> 0), `align` the
    write alignment in sectors (a power of two). Returns (starts, ends) int64 arrays of sector
    indexes into `mask`: data, with zero runs shorter than `min_sectors` between data; a zero
    run that starts the chunk or reaches its end is never written."""
    cdef const uint8_t[::1] m = mask
    cdef Py_ssize_t n = m.shape[0]
    if min_sectors < 1 or align < 1 or align & (align - 1) or sector0 < 0:
        raise ValueError("min_sectors must be positive, align a power of two")
    starts = np.empty(n // 2 + 1, np.int64)
    ends = np.empty(n // 2 + 1, np.int64)
    cdef int64_t[::1] s = starts, e = ends
    cdef Py_ssize_t pos = 0, k = 0, used, checked, step, rest, low
    cdef bint data
    if n == 0:
        return starts[:0], ends[:0]
    with nogil:
        while pos < n:
            rest = n - pos
            low = min(min_sectors, rest)
            step = _same_run(&m[0], pos, rest, sector0 + pos, align, &data)
            if data:
                used = checked = step
                while checked < rest:
                    step = _same_run(&m[0], pos + checked, rest - checked,
                                     sector0 + pos + checked, align, &data)
                    checked += step
                    if data:
                        used = checked
                    elif step >= low:
                        break
                if k and e[k - 1] == pos:
                    e[k - 1] = pos + used
                else:
                    s[k] = pos
                    e[k] = pos + used
                    k += 1
                step = used
            pos += step
    return starts[:k], ends[:k]



# -- small lookups: image.py's lean path for small reads ------------------------------------------
# One shared set of output buffers, used with the GIL held; `_small_busy` hands a second caller
# (a thread switch while the result list is built, e.g. in a finalizer) fresh arrays instead.
cdef enum:
    SMALL_RUNS = 1024
SMALL_ENTRIES = SMALL_RUNS          # standard entries per call (extended: SMALL_RUNS // 32)
_small = [np.empty(SMALL_RUNS, np.int64) for _ in range(4)] + [np.empty(SMALL_RUNS, np.uint8)]
cdef int64_t[::1] _s_guest = _small[0], _s_len = _small[1], _s_host = _small[2]
cdef int64_t[::1] _s_csize = _small[3]
cdef uint8_t[::1] _s_kind = _small[4]
cdef bint _small_busy = False


def classify_small(l2_u64, Py_ssize_t first, Py_ssize_t count, int cluster_bits, int flags,
                   int64_t guest_base, int64_t host_limit):
    """classify_l2 for a few entries of a native-order uint64 view of a big-endian table.

    Returns a list of (guest, length, kind, host, csize) tuples; at most SMALL_ENTRIES standard
    or SMALL_ENTRIES // 32 extended entries per call. Raises L2EntryError like classify_l2.
    """
    global _small_busy
    cdef const uint64_t[::1] tbl = l2_u64
    cdef int64_t width = 2 if flags & FLAG_EXTENDED_L2 else 1
    cdef int64_t bad_index = -1, n, i
    cdef int bad_code = E_OK
    cdef int64_t[::1] g, ln, h, cs
    cdef uint8_t[::1] k
    if not 9 <= cluster_bits <= 21:
        raise ValueError("cluster_bits out of range")
    if first < 0 or count < 0 or (first + count) * width > tbl.shape[0]:
        raise ValueError("entry range outside the table")
    if count * (32 if width == 2 else 1) > SMALL_RUNS:
        raise ValueError("too many entries for classify_small")
    shared = not _small_busy
    if shared:
        _small_busy = True
        g, ln, k, h, cs = _s_guest, _s_len, _s_kind, _s_host, _s_csize
    else:
        g, ln, h, cs = (np.empty(SMALL_RUNS, np.int64) for _ in range(4))
        k = np.empty(SMALL_RUNS, np.uint8)
    try:
        n = classify_loop(&tbl[0], first, count, cluster_bits, flags, guest_base, host_limit,
                          &g[0], &ln[0], &k[0], &h[0], &cs[0], &bad_index, &bad_code)
        if n < 0:
            raise L2EntryError(bad_index, bad_code)
        return [(g[i], ln[i], k[i], h[i], cs[i]) for i in range(n)]
    finally:
        if shared:
            _small_busy = False


# -- small reads in C: image.py's leanest path, for reads of at most one cluster -----------------
# Output of classify_loop for one entry (at most 32 subcluster runs), read right after the call
# with no Python code in between, so no other caller can interleave.
_one = [np.empty(32, np.int64) for _ in range(4)] + [np.empty(32, np.uint8)]
cdef int64_t[::1] _o_guest = _one[0], _o_len = _one[1], _o_host = _one[2], _o_csize = _one[3]
cdef uint8_t[::1] _o_kind = _one[4]


cdef class SmallReader:
    """Reads of at most one cluster, in C: per piece of the range, one L2 lookup per layer (the
    rules of classify_l2) and one pread, a zero fill or a slice of an inflated cluster.

    One per layer of a chain. read() and readinto() return None and -1 where the general path
    must serve the range: longer than a cluster of the top layer, an L2 entry breaks a rule
    (the general path raises the error), or a read comes up short.
    """
    cdef object layer_ref        # weak reference to the Image or RawImage (which holds this
                                 # reader): its _fd, _l2_slice_pair and _inflated
    cdef object l2_cache         # the Image's L2 slice cache (see Image._l2_slice_pair)
    cdef SmallReader backing
    cdef const int64_t[::1] l2_offsets
    cdef int fd, cluster_bits, flags
    cdef int64_t virtual_size, data_size, per_l1, slice_entries, max_read
    cdef bint raw

    def __init__(self, layer, SmallReader backing, int fd, int64_t virtual_size,
                 int64_t data_size, l2_offsets=None, l2_cache=None, int cluster_bits=9,
                 int flags=0, int64_t per_l1=0, int64_t slice_entries=0):
        self.layer_ref = weakref.ref(layer)
        self.backing = backing
        self.fd = fd
        self.virtual_size = virtual_size
        self.data_size = data_size
        self.raw = l2_offsets is None
        self.max_read = 1LL << cluster_bits
        if not self.raw:
            if not 9 <= cluster_bits <= 21 or per_l1 <= 0 or slice_entries <= 0:
                raise ValueError("bad table geometry")
            self.l2_offsets = l2_offsets
            self.l2_cache = l2_cache
            self.cluster_bits = cluster_bits
            self.flags = flags
            self.per_l1 = per_l1
            self.slice_entries = slice_entries

    cdef object _layer(self):
        cdef PyObject *layer = PyWeakref_GetObject(self.layer_ref)
        if layer == <PyObject *>None:
            raise ValueError("I/O operation on a closed image")
        return <object>layer

    cdef int _check_open(self) except -1:
        if self._layer()._fd < 0:
            raise ValueError("I/O operation on a closed image")
        return 0

    cdef object _l2_slice(self, int64_t l2_offset, int64_t s_index):
        """Image._l2_slice_pair(...)[1], looked up in C when the slice is cached."""
        key = (l2_offset, s_index)
        cdef PyObject *pair = PyDict_GetItemWithError(self.l2_cache, key)
        if pair == NULL:
            return self._layer()._l2_slice_pair(l2_offset, s_index)[1]
        tbl = (<tuple>pair)[1]
        try:
            self.l2_cache.move_to_end(key)
        except KeyError:
            pass                        # evicted meanwhile by another thread
        return tbl

    cdef SmallReader _find(self, int64_t offset, int64_t *n, int *kind, int64_t *host,
                           int64_t *csize):
        """The layer serving the first bytes of [offset, offset + *n) and how (kind, host,
        csize); *n is cut to the bytes served that way. None: a bad L2 entry."""
        cdef SmallReader node = self
        cdef cnp.ndarray tbl
        cdef int64_t cs, l2_offset, l1_index, index, s_index, bad_index = -1, runs, r
        cdef int bad_code = E_OK
        while True:
            if node is not self:
                node._check_open()      # a backing layer its owner closed
            if node.raw:
                kind[0] = K_ZERO
                if offset < node.data_size:
                    kind[0] = K_DATA
                    host[0] = offset
                    n[0] = min(n[0], node.data_size - offset)
                return node
            cs = 1LL << node.cluster_bits
            n[0] = min(n[0], cs - (offset & (cs - 1)))
            l1_index = offset // node.per_l1
            if l1_index >= node.l2_offsets.shape[0]:
                return None
            l2_offset = node.l2_offsets[l1_index]
            kind[0] = K_UNALLOCATED
            if l2_offset:
                index = (offset - l1_index * node.per_l1) >> node.cluster_bits
                s_index = index // node.slice_entries
                tbl = node._l2_slice(l2_offset, s_index)
                index -= s_index * node.slice_entries
                if (cnp.PyArray_ITEMSIZE(tbl) != 8 or not cnp.PyArray_IS_C_CONTIGUOUS(tbl) or
                        (index + 1) * (2 if node.flags & FLAG_EXTENDED_L2 else 1)
                        > cnp.PyArray_DIM(tbl, 0)):
                    return None
                runs = classify_loop(<const uint64_t *>cnp.PyArray_DATA(tbl), index, 1,
                                     node.cluster_bits, node.flags, offset & ~(cs - 1),
                                     node.data_size, &_o_guest[0], &_o_len[0], &_o_kind[0],
                                     &_o_host[0], &_o_csize[0], &bad_index, &bad_code)
                if runs < 0:
                    return None         # a bad entry: the general path raises its error
                r = 0
                while r < runs and _o_guest[r] + _o_len[r] <= offset:
                    r += 1
                if r == runs:
                    return None
                n[0] = min(n[0], _o_guest[r] + _o_len[r] - offset)
                kind[0] = _o_kind[r]
                if kind[0] == K_DATA:
                    host[0] = _o_host[r] + (offset - _o_guest[r])
                elif kind[0] == K_COMPRESSED:
                    host[0] = _o_host[r]
                    csize[0] = _o_csize[r]
                if kind[0] != K_UNALLOCATED:
                    return node
            # Unallocated here: the backing layer's bytes; zeros without one or past its end.
            if node.backing is None or offset >= node.backing.virtual_size:
                kind[0] = K_ZERO
                return node
            n[0] = min(n[0], node.backing.virtual_size - offset)
            node = node.backing

    cdef bint _fill(self, char *dst, int64_t offset, int64_t n, int kind, int64_t host,
                    int64_t csize) except -1:
        """Fill dst with the n bytes _find described; False if a read came up short."""
        cdef int64_t got = 0, r, cs, within
        cdef const uint8_t[::1] cluster
        if kind == K_DATA:
            with nogil:
                while got < n:
                    r = pread(self.fd, dst + got, <size_t>(n - got), host + got)
                    if r < 0 and errno == EINTR:
                        continue
                    if r <= 0:
                        break
                    got += r
            return got == n
        if kind == K_COMPRESSED:
            cs = 1LL << self.cluster_bits
            within = offset & (cs - 1)
            cluster = self._layer()._inflated(host, csize, offset - within)
            if cluster.shape[0] < within + n:
                return False
            memcpy(dst, &cluster[within], <size_t>n)
            return True
        memset(dst, 0, <size_t>n)
        return True

    cdef bint _read(self, char *dst, int64_t offset, int64_t n) except -1:
        """Fill dst with guest bytes [offset, offset + n), piece by piece; False: not served."""
        cdef int64_t pos = 0, m, host = -1, csize = 0
        cdef int kind = K_UNALLOCATED
        cdef SmallReader node
        while pos < n:
            m = n - pos
            node = self._find(offset + pos, &m, &kind, &host, &csize)
            if node is None or not node._fill(dst + pos, offset + pos, m, kind, host, csize):
                return False
            pos += m
        return True

    def read(self, offset, size):
        """bytes of [offset, offset+size) (fewer at the end of the image), or None: the general
        path serves this read."""
        cdef int64_t o, n
        self._check_open()
        try:
            o = offset
            n = size
        except (OverflowError, TypeError):
            return None
        if o < 0 or n < 0 or n > self.max_read:
            return None
        n = max(0, min(n, self.virtual_size - o))       # short at the end of the image
        out = PyBytes_FromStringAndSize(NULL, n)
        return out if self._read(PyBytes_AS_STRING(out), o, n) else None

    def readinto(self, offset, buffer):
        """Fill `buffer` (writable bytes) from `offset`; return the count (short at the end of
        the image), or -1: the general path serves it."""
        cdef int64_t o, n
        cdef uint8_t[::1] d = buffer
        self._check_open()
        try:
            o = offset
        except (OverflowError, TypeError):
            return -1
        n = d.shape[0]
        if o < 0 or n > self.max_read:
            return -1
        n = max(0, min(n, self.virtual_size - o))       # short at the end of the image
        return n if n == 0 or self._read(<char *>&d[0], o, n) else -1


ctypedef fused count_t:
    uint16_t
    uint32_t
    uint64_t


def merge_insert(int32_t[::1] cl, count_t[::1] ct, uint8_t[::1] ow, Py_ssize_t n,
                 const int64_t[::1] at, const int32_t[::1] new_cl, const count_t[::1] new_ct,
                 const uint8_t[::1] new_ow):
    """Insert k new entries into the first n entries of three parallel arrays that have room
    for n + k, new entry j before old entry at[j] (at non-decreasing, as np.insert takes it),
    moving the old entries from the back in place: no temporary copies (check's _Computed)."""
    cdef Py_ssize_t k = at.shape[0], i = n, w, j, m
    cdef int64_t a
    if new_cl.shape[0] != k or new_ct.shape[0] != k or new_ow.shape[0] != k:
        raise ValueError("new entries differ in length")
    if n < 0 or n + k > cl.shape[0] or n + k > ct.shape[0] or n + k > ow.shape[0]:
        raise ValueError("no room for the new entries")
    for j in range(k):
        if at[j] < 0 or at[j] > n or (j and at[j] < at[j - 1]):
            raise ValueError("insertion points out of range or order")
    w = n + k
    with nogil:
        for j in range(k - 1, -1, -1):
            a = at[j]
            m = i - a
            if m > 0:
                memmove(&cl[w - m], &cl[a], m * sizeof(int32_t))
                memmove(&ct[w - m], &ct[a], m * sizeof(count_t))
                memmove(&ow[w - m], &ow[a], m)
                w -= m
                i = a
            w -= 1
            cl[w] = new_cl[j]
            ct[w] = new_ct[j]
            ow[w] = new_ow[j]


def dense_add(count_t[::1] ct, uint8_t[::1] ow, const int64_t[::1] clusters,
              const int64_t[:] weights, int owner, int64_t[::1] clashes):
    """Count references into per-cluster arrays, in order (check's _DenseComputed): cluster
    clusters[i] gains weights[i]; the first owner of a cluster stays, and a later reference by
    another owner is a clash, whose (cluster, first owner) pairs fill `clashes` (flat, pairs)
    while there is room. Returns (clashes in all, the count of the first cluster whose count
    would pass the type's maximum or -1: the counts before that reference are in)."""
    cdef Py_ssize_t n = clusters.shape[0], i, room = clashes.shape[0] // 2, found = 0
    cdef Py_ssize_t size = ct.shape[0], stop = -1
    cdef int64_t c, w
    cdef count_t top = <count_t>-1
    if weights.shape[0] != n:
        raise ValueError("clusters and weights differ in length")
    if ow.shape[0] != size:
        raise ValueError("counts and owners differ in length")
    if owner <= 0 or owner > 255:
        raise ValueError("owner out of range")
    for i in range(n):
        if clusters[i] < 0 or clusters[i] >= size or weights[i] < 0:
            raise ValueError(f"reference {i} out of range (cluster {clusters[i]}, weight "
                             f"{weights[i]}, {size} clusters)")
    with nogil:
        for i in range(n):
            c = clusters[i]
            w = weights[i]
            if <uint64_t>w > <uint64_t>(top - ct[c]):
                stop = i
                break
            ct[c] += <count_t>w
            if ow[c] == 0:
                ow[c] = <uint8_t>owner
            elif ow[c] != owner:
                if found < room:
                    clashes[2 * found] = c
                    clashes[2 * found + 1] = ow[c]
                found += 1
    return found, stop

