# cython: language_level=3
"""Batch compression and packing of QCOW2 clusters with the GIL released.

Compiled because writing a compressed image means compressing millions of clusters: one call
compresses a whole batch in a C loop with one reused stream, so several threads compress on all
cores at once, and one call packs a batch of streams at byte granularity into the output.
zlib-ng and zstd are reached through symbols exported by the zlib-ng and backports.zstd extension
modules (their wheels ship no headers), resolved once with dlsym().
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

cdef extern from "_compress.h" nogil:
    ctypedef struct qfc_zng_stream:
        const uint8_t *next_in
        unsigned int avail_in
        uint8_t *next_out
        unsigned int avail_out
    ctypedef int (*qfc_zng_deflateInit2_fn)(qfc_zng_stream *strm, int level, int method,
                                            int window_bits, int mem_level, int strategy)
    ctypedef int (*qfc_zng_deflate_fn)(qfc_zng_stream *strm, int flush)
    ctypedef int (*qfc_zng_deflateReset_fn)(qfc_zng_stream *strm)
    ctypedef int (*qfc_zng_deflateEnd_fn)(qfc_zng_stream *strm)
    ctypedef struct qfc_zstd_in:
        const void *src
        size_t size
        size_t pos
    ctypedef struct qfc_zstd_out:
        void *dst
        size_t size
        size_t pos
    ctypedef void *(*qfc_zstd_createCCtx_fn)()
    ctypedef size_t (*qfc_zstd_freeCCtx_fn)(void *cctx)
    ctypedef size_t (*qfc_zstd_CCtx_reset_fn)(void *cctx, int directive)
    ctypedef size_t (*qfc_zstd_CCtx_setParameter_fn)(void *cctx, int param, int value)
    ctypedef size_t (*qfc_zstd_compressStream2_fn)(void *cctx, qfc_zstd_out *out,
                                                   qfc_zstd_in *inp, int end_op)
    ctypedef unsigned (*qfc_zstd_isError_fn)(size_t code)
    ctypedef size_t (*qfc_zstd_compress2_fn)(void *cctx, void *dst, size_t dst_capacity,
                                             const void *src, size_t src_size)
    ctypedef unsigned (*qfc_zstd_getErrorCode_fn)(size_t code)
    int QFC_ZSTD_ERROR_DST_SIZE_TOO_SMALL
    int QFC_Z_OK, QFC_Z_STREAM_END, QFC_Z_FINISH, QFC_Z_DEFLATED, QFC_Z_DEFAULT_STRATEGY
    int QFC_ZSTD_RESET_SESSION_ONLY, QFC_ZSTD_C_COMPRESSION_LEVEL, QFC_ZSTD_E_END

import importlib

from .errors import CodecUnavailable, QcowError

cdef enum:
    NONE = -1
    ZLIB = 0
    ZSTD = 1
    C_ZERO = 0
    C_STORED = -1
    C_FAILED = -2
    C_REFCOUNT_MAX = 0xFFFF

#: out_len values of compress_batch besides a stream length.
ZERO_CLUSTER = C_ZERO
STORED = C_STORED
REFCOUNT_MAX = C_REFCOUNT_MAX

cdef uint64_t QCOW_OFLAG_COPIED = 1ULL << 63
cdef uint64_t QCOW_OFLAG_COMPRESSED = 1ULL << 62

cdef qfc_zng_deflateInit2_fn zng_deflateInit2 = NULL
cdef qfc_zng_deflate_fn zng_deflate = NULL
cdef qfc_zng_deflateReset_fn zng_deflateReset = NULL
cdef qfc_zng_deflateEnd_fn zng_deflateEnd = NULL
cdef qfc_zstd_createCCtx_fn zstd_createCCtx = NULL
cdef qfc_zstd_freeCCtx_fn zstd_freeCCtx = NULL
cdef qfc_zstd_CCtx_reset_fn zstd_CCtx_reset = NULL
cdef qfc_zstd_CCtx_setParameter_fn zstd_CCtx_setParameter = NULL
cdef qfc_zstd_compressStream2_fn zstd_compressStream2 = NULL
cdef qfc_zstd_isError_fn zstd_isError = NULL
cdef qfc_zstd_compress2_fn zstd_compress2 = NULL
cdef qfc_zstd_getErrorCode_fn zstd_getErrorCode = NULL


class CompressionError(QcowError):
    """The compression library failed on a cluster."""


class SourceVanished(Exception):
    """compress_batch's input was a file mapping whose file shrank under it (SIGBUS caught):
    the batch is void and the Compressor unusable."""


include "_sigbus.pxi"


include "_dl.pxi"


cdef int _load_zlib() except -1:
    global zng_deflateInit2, zng_deflate, zng_deflateReset, zng_deflateEnd
    if zng_deflate != NULL:
        return 0
    cdef void *h = _open_module(("zlib_ng.zlib_ng",), "zlib-ng")
    zng_deflateInit2 = <qfc_zng_deflateInit2_fn>_sym(h, b"zng_deflateInit2", "zlib-ng")
    zng_deflateReset = <qfc_zng_deflateReset_fn>_sym(h, b"zng_deflateReset", "zlib-ng")
    zng_deflateEnd = <qfc_zng_deflateEnd_fn>_sym(h, b"zng_deflateEnd", "zlib-ng")
    zng_deflate = <qfc_zng_deflate_fn>_sym(h, b"zng_deflate", "zlib-ng")
    return 0


cdef int _load_zstd() except -1:
    global zstd_createCCtx, zstd_freeCCtx, zstd_CCtx_reset, zstd_CCtx_setParameter
    global zstd_compressStream2, zstd_isError, zstd_compress2, zstd_getErrorCode
    if zstd_compressStream2 != NULL:
        return 0
    cdef void *h = _open_module(("backports.zstd._zstd", "_zstd"), "zstd")
    zstd_createCCtx = <qfc_zstd_createCCtx_fn>_sym(h, b"ZSTD_createCCtx", "zstd")
    zstd_freeCCtx = <qfc_zstd_freeCCtx_fn>_sym(h, b"ZSTD_freeCCtx", "zstd")
    zstd_CCtx_reset = <qfc_zstd_CCtx_reset_fn>_sym(h, b"ZSTD_CCtx_reset", "zstd")
    zstd_CCtx_setParameter = <qfc_zstd_CCtx_setParameter_fn>_sym(h, b"ZSTD_CCtx_setParameter",
                                                                 "zstd")
    zstd_compressStream2 = <qfc_zstd_compressStream2_fn>_sym(h, b"ZSTD_compressStream2", "zstd")
    zstd_isError = <qfc_zstd_isError_fn>_sym(h, b"ZSTD_isError", "zstd")
    zstd_compress2 = <qfc_zstd_compress2_fn>_sym(h, b"ZSTD_compress2", "zstd")
    zstd_getErrorCode = <qfc_zstd_getErrorCode_fn>_sym(h, b"ZSTD_getErrorCode", "zstd")
    return 0


cdef inline bint _is_zero(const uint8_t *p, int64_t n) noexcept nogil:
    # All zero iff the first 16 bytes are zero and every byte equals the one 16 bytes later.
    cdef int64_t i
    for i in range(16):
        if p[i]:
            return False
    return memcmp(p, p + 16, <size_t>(n - 16)) == 0


cdef int64_t _zlib_one(qfc_zng_stream *strm, const uint8_t *src, uint8_t *dst,
                       int64_t cs) noexcept nogil:
    # QEMU qcow2_zlib_compress(): raw deflate of one cluster into at most cs - 1 bytes; a stream
    # that does not end within them is not stored compressed (qcow2_co_pwritev_compressed_task).
    cdef int ret
    if zng_deflateReset(strm) != QFC_Z_OK:
        return C_FAILED
    strm.next_in = src
    strm.avail_in = <unsigned int>cs
    strm.next_out = dst
    strm.avail_out = <unsigned int>(cs - 1)
    ret = zng_deflate(strm, QFC_Z_FINISH)
    if ret == QFC_Z_STREAM_END:
        return cs - 1 - strm.avail_out
    return C_STORED if ret >= 0 or ret == -5 else C_FAILED      # -5: Z_BUF_ERROR, output full


cdef int64_t _zstd_one(void *cctx, const uint8_t *src, uint8_t *dst, int64_t cs) noexcept nogil:
    # QEMU qcow2_zstd_compress(): one frame of the whole cluster (ZSTD_compressStream2 with
    # ZSTD_e_end in one call, which ZSTD_compress2 is, without the internal buffer copies) into
    # cs - 1 bytes; if it does not fit, the cluster does not shrink.
    cdef size_t ret = zstd_compress2(cctx, dst, <size_t>(cs - 1), src, <size_t>cs)
    if zstd_isError(ret):
        if zstd_getErrorCode(ret) == QFC_ZSTD_ERROR_DST_SIZE_TOO_SMALL:
            return C_STORED
        return C_FAILED
    return <int64_t>ret


cdef struct Batch:
    # compress_batch's loop, run under the SIGBUS guard (_sigbus.h)
    const uint8_t *src
    uint8_t *dst
    const int64_t *in_off
    const int64_t *out_off
    int64_t *out_len
    Py_ssize_t n, j
    int64_t cs, r
    int kind
    bint keep_zero
    qfc_zng_stream *zstrm
    void *cctx


cdef int _batch_loop(void *arg) noexcept nogil:
    cdef Batch *b = <Batch *>arg
    cdef int64_t r
    while b.j < b.n:
        if not b.keep_zero and _is_zero(b.src + b.in_off[b.j], b.cs):
            r = C_ZERO
        elif b.kind == ZLIB:
            r = _zlib_one(b.zstrm, b.src + b.in_off[b.j], b.dst + b.out_off[b.j], b.cs)
        elif b.kind == ZSTD:
            r = _zstd_one(b.cctx, b.src + b.in_off[b.j], b.dst + b.out_off[b.j], b.cs)
        else:
            r = C_STORED
        b.r = r
        if r < C_STORED:
            break
        b.out_len[b.j] = r
        b.j += 1
    return 0


cdef class Compressor:
    """A reusable encoder for one compression type, level and cluster size; one thread at a time.

    compression_type -1 only detects zero clusters (an uncompressed image).
    """
    cdef qfc_zng_stream zstrm
    cdef void *cctx
    cdef readonly int compression_type
    cdef readonly int level
    cdef readonly int64_t cluster_size
    cdef bint ready, busy, broken

    def __cinit__(self, int compression_type, int64_t cluster_size, int level):
        memset(&self.zstrm, 0, sizeof(self.zstrm))
        self.cctx = NULL
        self.ready = False
        self.busy = False
        self.broken = False
        if not 512 <= cluster_size <= (1 << 21) or cluster_size & (cluster_size - 1):
            raise ValueError("cluster size must be a power of two from 512 to 2 MiB")
        self.compression_type = compression_type
        self.cluster_size = cluster_size
        self.level = level
        if compression_type == ZLIB:
            # zlib-ng silently widens the window to 8 KiB at level 1 (deflate_quick): QEMU
            # streams must use a 4 KiB window, so the facade never asks for level 1.
            if not 2 <= level <= 9:
                raise ValueError("zlib level must be 2..9")
            _load_zlib()
            if zng_deflateInit2(&self.zstrm, level, QFC_Z_DEFLATED, -12, 9,
                                QFC_Z_DEFAULT_STRATEGY) != QFC_Z_OK:
                raise MemoryError("zlib-ng deflateInit2 failed")
            self.ready = True
        elif compression_type == ZSTD:
            _load_zstd()
            self.cctx = zstd_createCCtx()
            if self.cctx == NULL:
                raise MemoryError("ZSTD_createCCtx failed")
            if zstd_isError(zstd_CCtx_setParameter(self.cctx, QFC_ZSTD_C_COMPRESSION_LEVEL,
                                                   level)):
                raise ValueError(f"zstd rejects compression level {level}")
        elif compression_type != NONE:
            raise ValueError(f"unknown compression type {compression_type}")

    def __dealloc__(self):
        if self.ready:
            zng_deflateEnd(&self.zstrm)
        if self.cctx != NULL:
            zstd_freeCCtx(self.cctx)

    def compress_batch(self, src, const int64_t[::1] in_off, dst, const int64_t[::1] out_off,
                       int64_t[::1] out_len, bint keep_zero=False):
        """Compress cluster j from src[in_off[j]:+cluster_size] into dst[out_off[j]:].

        Sets out_len[j] to ZERO_CLUSTER (all zero: nothing to store; never with keep_zero),
        STORED (does not shrink below cluster_size bytes: store it plain) or the stream length
        (< cluster_size).
        Raises CompressionError if the library fails.
        """
        cdef const uint8_t[::1] s = memoryview(src).cast("B")
        cdef uint8_t[::1] d = memoryview(dst).cast("B")
        cdef Py_ssize_t n = in_off.shape[0], j
        cdef int64_t cs = self.cluster_size, slen = s.shape[0], dlen = d.shape[0], r = 0
        cdef int kind = self.compression_type
        if out_off.shape[0] != n or out_len.shape[0] != n:
            raise ValueError("batch arrays differ in length")
        if n == 0:
            return
        for j in range(n):
            if in_off[j] < 0 or in_off[j] > slen - cs:
                raise ValueError(f"batch entry {j} lies outside the input")
            if kind != NONE and (out_off[j] < 0 or out_off[j] > dlen - (cs - 1)):
                raise ValueError(f"batch entry {j} lies outside the output")
        if self.busy:
            raise RuntimeError("Compressor used by two threads at once")
        if self.broken:
            raise RuntimeError("Compressor cut short by a vanished source; make a new one")
        cdef Batch b
        cdef int faulted = 0
        b.src = &s[0]
        b.dst = &d[0] if kind != NONE else NULL
        b.in_off = &in_off[0]
        b.out_off = &out_off[0]
        b.out_len = &out_len[0]
        b.n, b.j, b.cs, b.r, b.kind = n, 0, cs, 0, kind
        b.keep_zero = keep_zero
        b.zstrm = &self.zstrm
        b.cctx = self.cctx
        self.busy = True
        try:
            with nogil:
                qf_bus_call(_batch_loop, &b, &s[0], <size_t>slen, &faulted)
        finally:
            self.busy = False
        if faulted:
            # The library's state may be mid-stream: this Compressor is done.
            self.broken = True
            raise SourceVanished(f"the input mapping lost its pages at cluster {b.j} of a "
                                 "batch (the file shrank)")
        j, r = b.j, b.r
        if r < C_STORED:
            raise CompressionError(f"{'zlib' if kind == ZLIB else 'zstd'} failed to compress "
                                   f"cluster {j} of a batch")


cdef inline void _place(const uint8_t *data, int64_t pos, int64_t length, uint8_t *st,
                        int64_t start, uint8_t *carry, int64_t carry_off) noexcept nogil:
    # Copy `length` bytes for host offset `pos`: below `start` into the carried open cluster
    # (it begins at host offset carry_off), from `start` on into the staging buffer.
    cdef int64_t low = 0
    if pos < start:
        low = min(length, start - pos)
        memcpy(carry + (pos - carry_off), data, <size_t>low)
    if low < length:
        memcpy(st + (pos + low - start), data + low, <size_t>(length - low))


def pack(src, const int64_t[::1] in_off, comp, const int64_t[::1] out_off,
         const int64_t[::1] out_len, int cluster_bits, int64_t[::1] state, staging, carry,
         uint16_t[::1] refcounts, int64_t rc_base, uint64_t[::1] entries,
         int64_t[:, ::1] runs):
    """Allocate host space for a batch of clusters the way QEMU does; fill the buffers to write.

    state = [end, open_cluster, open_fill, carry_dirty], updated: `end` is the cluster-aligned
    end of the file, where new clusters are appended (staging[k] is the byte at end + k);
    `open_cluster` (-1: none) is the host cluster compressed streams are packed into at byte
    granularity (QEMU qcow2_alloc_bytes), `open_fill` the bytes it holds. If the open cluster
    lies before `end` on entry, `carry` holds its bytes and carry_dirty is set when it changed.

    Cluster j is skipped when out_len[j] is ZERO_CLUSTER, given a new cluster when STORED (its
    bytes are src[in_off[j]:+cluster_size], not copied: runs[k] = (host offset, src offset,
    length) lists the stored runs, the rest of [old end, new end) is in staging), else its
    stream comp[out_off[j]:+out_len[j]] is packed. entries[j] receives its L2 entry (host
    order); refcounts[c - rc_base] counts the streams and clusters touching host cluster c.
    Returns (new end, number of runs).
    """
    cdef const uint8_t[::1] s = memoryview(src).cast("B")
    cdef const uint8_t[::1] c = memoryview(comp).cast("B")
    cdef uint8_t[::1] st = memoryview(staging).cast("B")
    cdef uint8_t[::1] cb = memoryview(carry).cast("B")
    cdef Py_ssize_t n = in_off.shape[0], j
    cdef int64_t cs = 1LL << cluster_bits, length, first, last, pos, nb
    cdef int64_t end, start, ocl, ofill, carry_off, dirty = 0, nruns = 0
    cdef int64_t stlen = st.shape[0], nrc = refcounts.shape[0], slen = s.shape[0]
    cdef int64_t clen = c.shape[0]
    # Compressed Clusters Descriptor (docs/interop/qcow2.txt): x = 62 - (cluster_bits - 8) bits
    # of host offset, then the number of additional 512-byte sectors.
    cdef int csize_shift = 62 - (cluster_bits - 8)
    if out_off.shape[0] != n or out_len.shape[0] != n or entries.shape[0] != n:
        raise ValueError("batch arrays differ in length")
    if runs.shape[0] < n or runs.shape[1] != 3:
        raise ValueError("runs must have room for one row per cluster")
    if state.shape[0] != 4 or cb.shape[0] != cs or not 9 <= cluster_bits <= 21:
        raise ValueError("bad state, carry buffer or cluster size")
    end, ocl, ofill = state[0], state[1], state[2]
    start = end
    carry_off = ocl * cs
    if (end < 0 or end % cs or rc_base < 0 or end < rc_base * cs or ocl >= end // cs
            or (ocl >= 0 and (ocl < rc_base or not 0 <= ofill <= cs))):
        raise ValueError("bad allocation state")
    for j in range(n):
        length = out_len[j]
        if length == C_STORED:
            if in_off[j] < 0 or in_off[j] > slen - cs:
                raise ValueError(f"batch entry {j} lies outside the input")
        elif length != C_ZERO:
            if length < 0 or length >= cs or out_off[j] < 0 or out_off[j] > clen - length:
                raise ValueError(f"batch entry {j} lies outside the compressed buffer")
    # Every cluster takes at most one new host cluster.
    if stlen < cs * (n + 1) or end // cs + n + 1 - rc_base > nrc:
        raise ValueError("staging or refcount buffer too small for the batch")
    with nogil:
        for j in range(n):
            length = out_len[j]
            if length == C_ZERO:
                entries[j] = 0
                continue
            if length == C_STORED:
                if (nruns and runs[nruns - 1, 0] + runs[nruns - 1, 2] == end
                        and runs[nruns - 1, 1] + runs[nruns - 1, 2] == in_off[j]):
                    runs[nruns - 1, 2] += cs
                else:
                    runs[nruns, 0] = end
                    runs[nruns, 1] = in_off[j]
                    runs[nruns, 2] = cs
                    nruns += 1
                refcounts[end // cs - rc_base] += 1
                entries[j] = <uint64_t>end | QCOW_OFLAG_COPIED
                end += cs
                continue
            # qcow2_alloc_bytes(): the stream goes on in the open cluster if it fits there, or
            # runs over into a new cluster if that one directly follows; else it starts a new
            # cluster. A cluster at the maximum refcount takes no more streams.
            if (ocl >= 0 and ofill < cs and refcounts[ocl - rc_base] < C_REFCOUNT_MAX
                    and (ofill + length <= cs or ocl + 1 == end // cs)):
                pos = ocl * cs + ofill
            else:
                ocl = end // cs
                pos = end
            if pos + length > end:
                memset(&st[0] + (end - start), 0, <size_t>cs)
                end += cs
            _place(&c[0] + out_off[j], pos, length, &st[0], start, &cb[0], carry_off)
            if pos < start:
                dirty = 1
            first = pos // cs
            last = (pos + length - 1) // cs
            refcounts[first - rc_base] += 1
            if last != first:
                refcounts[last - rc_base] += 1
            ocl = last
            ofill = pos + length - last * cs
            nb = (pos + length - 1) // 512 - pos // 512
            entries[j] = QCOW_OFLAG_COMPRESSED | (<uint64_t>nb << csize_shift) | <uint64_t>pos
    state[0], state[1], state[2] = end, ocl, ofill
    state[3] = state[3] | dirty
    return end, nruns
