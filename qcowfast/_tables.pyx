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
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset
from posix.unistd cimport pread

import weakref

import numpy as np

cnp.import_array()

cdef extern from "_codecs.h" nogil:
    uint64_t qf_be64(uint64_t x)

# Kinds written by classify_l2 (same numbers as constants.ExtentKind).
cdef enum:
    K_UNALLOCATED = 0
    K_ZERO = 1
    K_DATA = 2
    K_COMPRESSED = 3

# Error codes: what rule an entry broke.
cdef enum:
    E_OK = 0
    E_UNALIGNED = 1
    E_RESERVED = 2
    E_V2_ZERO = 3
    E_SUBCLUSTER = 4
    E_COMPRESSED_BITMAP = 5
    E_COMPRESSED_DATA_FILE = 6
    E_PAST_EOF = 7
    E_COMPRESSED_COPIED = 8

cdef uint64_t L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t QCOW_OFLAG_COPIED = 1ULL << 63
cdef uint64_t QCOW_OFLAG_COMPRESSED = 1ULL << 62
# Bits 1-8 and 56-61 of an L2 entry are reserved. With extended L2 bit 0 is reserved too, but
# QEMU's read path ignores it (qcow2_get_cluster_type() skips the zero flag when the image has
# subclusters), and so does qcowfast (iotest 271).
cdef uint64_t L2E_RESERVED = 0x3F000000000001FEULL
cdef uint64_t L1E_RESERVED = 0x7F000000000001FFULL

cdef enum:
    FLAG_V3 = 1
    FLAG_EXTENDED_L2 = 2
    FLAG_DATA_FILE = 4

FLAGS = {"v3": FLAG_V3, "extended_l2": FLAG_EXTENDED_L2, "data_file": FLAG_DATA_FILE}

_MESSAGES = {
    E_UNALIGNED: "host cluster offset is not aligned to the cluster size",
    E_RESERVED: "reserved bits are set",
    E_V2_ZERO: "zero cluster flag in a version 2 image",
    E_SUBCLUSTER: "invalid subcluster bitmap (a subcluster both allocated and zero, or allocated "
                  "in an unallocated cluster)",
    E_COMPRESSED_BITMAP: "compressed cluster with a non-zero subcluster bitmap",
    E_COMPRESSED_DATA_FILE: "compressed cluster in an image with an external data file",
    E_PAST_EOF: "host offset lies past the end of the file",
    E_COMPRESSED_COPIED: "compressed cluster with the COPIED flag",
}


cdef inline int64_t emit(int64_t n, uint8_t kind, int64_t guest, int64_t length, int64_t host,
                         int64_t csize, int64_t[::1] o_guest, int64_t[::1] o_len,
                         uint8_t[::1] o_kind, int64_t[::1] o_host, int64_t[::1] o_csize) noexcept nogil:
    """Append a run, merging it into the previous one when kind and host contiguity allow."""
    cdef int64_t p = n - 1
    if (n > 0 and kind != K_COMPRESSED and o_kind[p] == kind
            and o_guest[p] + o_len[p] == guest
            and ((host < 0 and o_host[p] < 0)
                 or (host >= 0 and o_host[p] >= 0 and o_host[p] + o_len[p] == host))):
        o_len[p] += length
        return n
    o_guest[n] = guest
    o_len[n] = length
    o_kind[n] = kind
    o_host[n] = host
    o_csize[n] = csize
    return n + 1


cdef int64_t classify_loop(const uint64_t *l2_be, int64_t first, int64_t count,
                           int cluster_bits, int flags, int64_t guest_base, int64_t host_limit,
                           int64_t[::1] o_guest, int64_t[::1] o_len, uint8_t[::1] o_kind,
                           int64_t[::1] o_host, int64_t[::1] o_csize,
                           int64_t *bad_index, int *bad_code) noexcept nogil:
    cdef int extended = (flags & FLAG_EXTENDED_L2) != 0
    cdef int v3 = (flags & FLAG_V3) != 0
    cdef int data_file = (flags & FLAG_DATA_FILE) != 0
    cdef int64_t cluster_size = 1LL << cluster_bits
    cdef int64_t sc_size = cluster_size >> 5
    # Compressed descriptor (qcow2.txt "Compressed Clusters Descriptor"): with x = 62 -
    # (cluster_bits - 8), bits 0..x-1 hold the host byte offset and bits x..61 the number of
    # additional 512-byte sectors; the stream ends at the end of the last sector.
    cdef int csize_shift = 62 - (cluster_bits - 8)
    cdef uint64_t csize_mask = (1ULL << (cluster_bits - 8)) - 1
    cdef uint64_t coffset_mask = (1ULL << csize_shift) - 1
    cdef uint64_t reserved = L2E_RESERVED
    cdef int64_t i, n = 0, guest, host, coffset, csize
    cdef uint64_t entry, bitmap, offset
    cdef int sc, run_start, kind, prev_kind
    for i in range(first, first + count):
        guest = guest_base + (i - first) * cluster_size
        if extended:
            entry = qf_be64(l2_be[2 * i])
            bitmap = qf_be64(l2_be[2 * i + 1])
        else:
            entry = qf_be64(l2_be[i])
            bitmap = 0
        if entry & QCOW_OFLAG_COMPRESSED:
            if entry & QCOW_OFLAG_COPIED:
                bad_index[0] = i; bad_code[0] = E_COMPRESSED_COPIED; return -1
            if data_file:
                bad_index[0] = i; bad_code[0] = E_COMPRESSED_DATA_FILE; return -1
            # A compressed cluster's subcluster bitmap is ignored on read
            # (qcow2_get_subcluster_type() returns COMPRESSED first); `check` reports it.
            coffset = <int64_t>(entry & coffset_mask)
            csize = <int64_t>(((entry >> csize_shift) & csize_mask) + 1) * 512 - (coffset & 511)
            if coffset >= host_limit:
                bad_index[0] = i; bad_code[0] = E_PAST_EOF; return -1
            n = emit(n, K_COMPRESSED, guest, cluster_size, coffset, csize,
                     o_guest, o_len, o_kind, o_host, o_csize)
            continue
        if entry & reserved:
            bad_index[0] = i; bad_code[0] = E_RESERVED; return -1
        offset = entry & L2E_OFFSET_MASK
        if offset & <uint64_t>(cluster_size - 1):
            bad_index[0] = i; bad_code[0] = E_UNALIGNED; return -1
        host = <int64_t>offset
        # Offset 0 means unallocated, except in an external data file where COPIED marks
        # host offset 0 (QEMU qcow2_get_cluster_type()). That function tests a standard
        # entry's zero flag first: with offset 0 it is ZERO_PLAIN (no host offset) even then.
        if offset == 0 and (not (data_file and entry & QCOW_OFLAG_COPIED)
                            or (not extended and entry & 1)):
            host = -1
        if not extended:
            if entry & 1:
                if not v3:
                    bad_index[0] = i; bad_code[0] = E_V2_ZERO; return -1
                kind = K_ZERO
            elif host < 0:
                kind = K_UNALLOCATED
            else:
                kind = K_DATA
            if kind == K_DATA and host >= host_limit:
                bad_index[0] = i; bad_code[0] = E_PAST_EOF; return -1
            n = emit(n, kind, guest, cluster_size, host, 0,
                     o_guest, o_len, o_kind, o_host, o_csize)
            continue
        # Extended L2 (qcow2.txt "Extended L2 Entries", QEMU qcow2_get_subcluster_type()):
        # bitmap bits 0-31 say "allocated", bits 32-63 say "reads as zeros".
        if host >= 0:
            if (bitmap >> 32) & bitmap:
                bad_index[0] = i; bad_code[0] = E_SUBCLUSTER; return -1
            if host >= host_limit and (bitmap & 0xFFFFFFFFULL):
                bad_index[0] = i; bad_code[0] = E_PAST_EOF; return -1
        elif bitmap & 0xFFFFFFFFULL:
            bad_index[0] = i; bad_code[0] = E_SUBCLUSTER; return -1
        run_start = 0
        prev_kind = -1
        for sc in range(33):
            if sc < 32:
                if (bitmap >> (32 + sc)) & 1:
                    kind = K_ZERO
                elif (bitmap >> sc) & 1:
                    kind = K_DATA
                else:
                    kind = K_UNALLOCATED
            else:
                kind = -2
            if sc > 0 and kind != prev_kind:
                n = emit(n, <uint8_t>prev_kind, guest + run_start * sc_size,
                         (sc - run_start) * sc_size,
                         host + run_start * sc_size if host >= 0 else -1, 0,
                         o_guest, o_len, o_kind, o_host, o_csize)
                run_start = sc
            prev_kind = kind
    return n


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
                          g, ln, k, h, cs, &bad_index, &bad_code)
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


cdef const uint64_t[::1] _u64_view(arr):
    """Zero-copy uint64 view of a big-endian `>u8` (or native uint64 holding raw bytes) array."""
    if not isinstance(arr, np.ndarray) or arr.dtype.itemsize != 8 or arr.dtype.kind != "u":
        raise TypeError("expected a uint64 numpy array")
    if not arr.flags.c_contiguous:
        raise ValueError("table must be C-contiguous")
    return arr.view(np.uint64)


def l1_check(l1_be, int cluster_bits, int64_t host_limit):
    """Return the index of the first bad L1 entry (reserved bits, unaligned, past EOF), or -1."""
    cdef const uint64_t[::1] tbl = _u64_view(l1_be)
    cdef int64_t i, cluster_size = 1LL << cluster_bits
    cdef uint64_t e, off
    cdef int64_t bad = -1
    with nogil:
        for i in range(tbl.shape[0]):
            e = qf_be64(tbl[i])
            off = e & L2E_OFFSET_MASK
            if (e & L1E_RESERVED) or (off & <uint64_t>(cluster_size - 1)) \
                    or (off and <int64_t>off + cluster_size > host_limit):
                bad = i
                break
    return bad


def l1_offsets(l1_be):
    """L2 table offsets (masked) of an L1 table as a native int64 array (0 = unallocated)."""
    cdef const uint64_t[::1] tbl = _u64_view(l1_be)
    out = np.empty(tbl.shape[0], np.int64)
    cdef int64_t[::1] o = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(tbl.shape[0]):
            o[i] = <int64_t>(qf_be64(tbl[i]) & L2E_OFFSET_MASK)
    return out


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


cdef inline int _block_nonzero(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t j = pos
    cdef uint64_t acc = 0
    cdef const uint64_t *w
    while j < end and (<size_t>(p + j) & 7):
        if p[j]:
            return 1
        j += 1
    w = <const uint64_t *>(p + j)
    while j + 64 <= end:
        acc = w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]
        if acc:
            return 1
        w += 8
        j += 64
    while j < end:
        if p[j]:
            return 1
        j += 1
    return 0


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
                          g, ln, k, h, cs, &bad_index, &bad_code)
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
                                     node.data_size, _o_guest, _o_len, _o_kind, _o_host,
                                     _o_csize, &bad_index, &bad_code)
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
