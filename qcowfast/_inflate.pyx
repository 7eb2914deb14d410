# cython: language_level=3
"""Batch inflation of compressed QCOW2 clusters with the GIL released.

Compiled because a converted image may hold millions of compressed clusters: one call inflates a
whole batch in a C loop with one reused stream, so several threads inflate on all cores at once.
The C libraries are reached through symbols exported by the deflate (libdeflate), zlib-ng and
backports.zstd extension modules (their wheels ship no headers), resolved once with dlsym().
libdeflate inflates whole clusters fastest; zlib-ng gives QEMU's exact rule for every other case.
"""
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset
from posix.unistd cimport pread

cdef extern from "_codecs.h" nogil:
    ctypedef struct qf_zng_stream:
        const uint8_t *next_in
        unsigned int avail_in
        uint8_t *next_out
        unsigned int avail_out
    ctypedef int (*qf_zng_inflateInit2_fn)(qf_zng_stream *strm, int window_bits)
    ctypedef int (*qf_zng_inflate_fn)(qf_zng_stream *strm, int flush)
    ctypedef int (*qf_zng_inflateReset_fn)(qf_zng_stream *strm)
    ctypedef int (*qf_zng_inflateEnd_fn)(qf_zng_stream *strm)
    ctypedef void *(*qf_ld_alloc_fn)()
    ctypedef void (*qf_ld_free_fn)(void *d)
    ctypedef int (*qf_ld_decompress_ex_fn)(void *d, const void *inp, size_t in_nbytes, void *out,
                                           size_t out_nbytes_avail, size_t *actual_in,
                                           size_t *actual_out)
    int QF_LIBDEFLATE_SUCCESS
    ctypedef struct qf_zstd_in:
        const void *src
        size_t size
        size_t pos
    ctypedef struct qf_zstd_out:
        void *dst
        size_t size
        size_t pos
    ctypedef void *(*qf_zstd_createDCtx_fn)()
    ctypedef size_t (*qf_zstd_freeDCtx_fn)(void *dctx)
    ctypedef size_t (*qf_zstd_DCtx_reset_fn)(void *dctx, int directive)
    ctypedef size_t (*qf_zstd_decompressStream_fn)(void *dctx, qf_zstd_out *out, qf_zstd_in *inp)
    ctypedef unsigned (*qf_zstd_isError_fn)(size_t code)
    ctypedef size_t (*qf_zstd_DCtx_setParameter_fn)(void *dctx, int param, int value)
    ctypedef int (*qf_zstd_getErrorCode_fn)(size_t code)
    int QF_Z_FINISH, QF_Z_OK, QF_Z_STREAM_END, QF_Z_BUF_ERROR, QF_ZSTD_RESET_SESSION_ONLY
    int QF_ZSTD_D_STABLE_OUT_BUFFER, QF_ZSTD_ERROR_MEMORY_ALLOCATION

import importlib

from .errors import AllocationFailed, CodecUnavailable

cdef enum:
    ZLIB = 0
    ZSTD = 1
    INPUT_EXHAUSTED = -2      # the stream wanted more input than it was given
    ALLOCATION_FAILED = -3    # the codec could not allocate memory

COMPRESSION_TYPES = {"zlib": ZLIB, "zstd": ZSTD}

cdef qf_zng_inflateInit2_fn zng_inflateInit2 = NULL
cdef qf_zng_inflate_fn zng_inflate = NULL
cdef qf_zng_inflateReset_fn zng_inflateReset = NULL
cdef qf_zng_inflateEnd_fn zng_inflateEnd = NULL
cdef qf_ld_alloc_fn ld_alloc = NULL
cdef qf_ld_free_fn ld_free = NULL
cdef qf_ld_decompress_ex_fn ld_decompress_ex = NULL
cdef qf_zstd_createDCtx_fn zstd_createDCtx = NULL
cdef qf_zstd_freeDCtx_fn zstd_freeDCtx = NULL
cdef qf_zstd_DCtx_reset_fn zstd_DCtx_reset = NULL
cdef qf_zstd_decompressStream_fn zstd_decompressStream = NULL
cdef qf_zstd_isError_fn zstd_isError = NULL
cdef qf_zstd_DCtx_setParameter_fn zstd_DCtx_setParameter = NULL
cdef qf_zstd_getErrorCode_fn zstd_getErrorCode = NULL


include "_dl.pxi"


cdef int _load_zlib() except -1:
    global zng_inflateInit2, zng_inflate, zng_inflateReset, zng_inflateEnd
    global ld_alloc, ld_free, ld_decompress_ex
    if zng_inflate != NULL:
        return 0
    cdef void *d = _open_module(("deflate._deflate",), "libdeflate")
    ld_alloc = <qf_ld_alloc_fn>_sym(d, b"libdeflate_alloc_decompressor", "libdeflate")
    ld_free = <qf_ld_free_fn>_sym(d, b"libdeflate_free_decompressor", "libdeflate")
    ld_decompress_ex = <qf_ld_decompress_ex_fn>_sym(d, b"libdeflate_deflate_decompress_ex",
                                                    "libdeflate")
    cdef void *h = _open_module(("zlib_ng.zlib_ng",), "zlib-ng")
    zng_inflateInit2 = <qf_zng_inflateInit2_fn>_sym(h, b"zng_inflateInit2", "zlib-ng")
    zng_inflateReset = <qf_zng_inflateReset_fn>_sym(h, b"zng_inflateReset", "zlib-ng")
    zng_inflateEnd = <qf_zng_inflateEnd_fn>_sym(h, b"zng_inflateEnd", "zlib-ng")
    zng_inflate = <qf_zng_inflate_fn>_sym(h, b"zng_inflate", "zlib-ng")
    return 0


cdef int _load_zstd() except -1:
    global zstd_createDCtx, zstd_freeDCtx, zstd_DCtx_reset, zstd_decompressStream, zstd_isError
    global zstd_DCtx_setParameter, zstd_getErrorCode
    if zstd_decompressStream != NULL:
        return 0
    cdef void *h = _open_module(("backports.zstd._zstd", "_zstd"), "zstd")
    zstd_createDCtx = <qf_zstd_createDCtx_fn>_sym(h, b"ZSTD_createDCtx", "zstd")
    zstd_freeDCtx = <qf_zstd_freeDCtx_fn>_sym(h, b"ZSTD_freeDCtx", "zstd")
    zstd_DCtx_reset = <qf_zstd_DCtx_reset_fn>_sym(h, b"ZSTD_DCtx_reset", "zstd")
    zstd_isError = <qf_zstd_isError_fn>_sym(h, b"ZSTD_isError", "zstd")
    zstd_DCtx_setParameter = <qf_zstd_DCtx_setParameter_fn>_sym(h, b"ZSTD_DCtx_setParameter",
                                                                "zstd")
    zstd_getErrorCode = <qf_zstd_getErrorCode_fn>_sym(h, b"ZSTD_getErrorCode", "zstd")
    zstd_decompressStream = <qf_zstd_decompressStream_fn>_sym(h, b"ZSTD_decompressStream", "zstd")
    return 0


def check_codec(int compression_type):
    """Load the library for `compression_type` now; raise CodecUnavailable if it cannot be."""
    if compression_type == ZLIB:
        _load_zlib()
    elif compression_type == ZSTD:
        _load_zstd()
    else:
        raise ValueError(f"unknown compression type {compression_type}")


cdef int _zlib_one(qf_zng_stream *strm, void *ld, const uint8_t *src, int64_t src_len,
                   uint8_t *dst, int64_t cluster_size) noexcept nogil:
    # QEMU qcow2_zlib_decompress(): raw deflate into exactly one cluster; success when the output
    # is full and the stream ended or ran out of input (Z_BUF_ERROR), because the stored length
    # is rounded up to 512-byte sectors. Output never exceeds one cluster.
    # Fast path: libdeflate, when the stream ends exactly at the end of the cluster (all QEMU
    # writes). Anything else goes through zlib-ng with QEMU's window (-12) and rule.
    cdef int ret
    cdef size_t used_in = 0, got_out = 0
    if ld_decompress_ex(ld, src, <size_t>src_len, dst, <size_t>cluster_size, &used_in,
                        &got_out) == QF_LIBDEFLATE_SUCCESS and got_out == <size_t>cluster_size:
        return 0
    if zng_inflateReset(strm) != QF_Z_OK:
        return -1
    strm.next_in = src
    strm.avail_in = <unsigned int>src_len
    strm.next_out = dst
    strm.avail_out = <unsigned int>cluster_size
    ret = zng_inflate(strm, QF_Z_FINISH)
    if (ret == QF_Z_STREAM_END or ret == QF_Z_BUF_ERROR) and strm.avail_out == 0:
        return 0
    if ret == QF_Z_BUF_ERROR and strm.avail_in == 0:
        return INPUT_EXHAUSTED
    return -1


cdef inline int _zstd_error(size_t ret) noexcept nogil:
    if zstd_getErrorCode(ret) == QF_ZSTD_ERROR_MEMORY_ALLOCATION:
        return ALLOCATION_FAILED
    return -1


cdef int _zstd_one(void *dctx, const uint8_t *src, int64_t src_len, uint8_t *dst,
                   int64_t cluster_size) noexcept nogil:
    # QEMU qcow2_zstd_decompress(): decode frames until the cluster is full; an input or output
    # that stops moving, or a frame left unfinished when the cluster is full, is an error.
    # The context decodes into `dst` directly (stable output buffer), so a frame's window
    # (up to zstd's default limit of 2^27, as in QEMU) costs no allocation.
    cdef qf_zstd_in inp
    cdef qf_zstd_out out
    cdef size_t ret = 0, last_in, last_out
    ret = zstd_DCtx_reset(dctx, QF_ZSTD_RESET_SESSION_ONLY)
    if zstd_isError(ret):
        return _zstd_error(ret)
    inp.src = src
    inp.size = <size_t>src_len
    inp.pos = 0
    out.dst = dst
    out.size = <size_t>cluster_size
    out.pos = 0
    while out.pos < out.size:
        last_in = inp.pos
        last_out = out.pos
        ret = zstd_decompressStream(dctx, &out, &inp)
        if zstd_isError(ret):
            return _zstd_error(ret)
        if last_in >= inp.pos and last_out >= out.pos:
            return INPUT_EXHAUSTED if inp.pos == inp.size else -1
    return 0 if ret == 0 else -1


cdef class Decompressor:
    """A reusable decoder for one compression type and cluster size; one thread at a time."""
    cdef qf_zng_stream zstrm
    cdef void *ld
    cdef void *dctx
    cdef readonly int compression_type
    cdef readonly int64_t cluster_size
    cdef readonly bint input_exhausted
    cdef bint ready, busy
    cdef uint8_t *scratch           # inflate_one's stream
    cdef int64_t scratch_cap

    def __cinit__(self, int compression_type, int64_t cluster_size):
        memset(&self.zstrm, 0, sizeof(self.zstrm))
        self.dctx = NULL
        self.ld = NULL
        self.ready = False
        self.busy = False
        self.scratch = NULL
        self.scratch_cap = 0
        if not 512 <= cluster_size <= (1 << 21):
            raise ValueError("cluster size out of range")
        self.compression_type = compression_type
        self.cluster_size = cluster_size
        check_codec(compression_type)
        if compression_type == ZLIB:
            self.ld = ld_alloc()
            if self.ld == NULL:
                raise AllocationFailed("allocation failed: libdeflate_alloc_decompressor")
            if zng_inflateInit2(&self.zstrm, -12) != QF_Z_OK:
                raise AllocationFailed("allocation failed: zlib-ng inflateInit2")
        else:
            self.dctx = zstd_createDCtx()
            if self.dctx == NULL:
                raise AllocationFailed("allocation failed: ZSTD_createDCtx")
            if zstd_isError(zstd_DCtx_setParameter(self.dctx, QF_ZSTD_D_STABLE_OUT_BUFFER, 1)):
                raise CodecUnavailable("the zstd library does not support a stable output "
                                       "buffer (zstd 1.4.4 or later is needed)")
        self.ready = True

    def __dealloc__(self):
        if self.ready and self.compression_type == ZLIB:
            zng_inflateEnd(&self.zstrm)
        if self.ld != NULL:
            ld_free(self.ld)
        if self.dctx != NULL:
            zstd_freeDCtx(self.dctx)
        free(self.scratch)

    def inflate_one(self, int fd, int64_t offset, int64_t length, dst):
        """Read one stream (`length` bytes at `offset` of file `fd`) and inflate it into
        dst[:cluster_size], in one call without the GIL: what a small read of a compressed
        cluster needs. Returns 0 when it inflated; -1 when the stream is invalid
        (`input_exhausted` tells whether it ran out of input); -2 when the file ended before
        `length` bytes. Raises OSError when the read fails, AllocationFailed without memory."""
        cdef uint8_t[::1] d = memoryview(dst).cast("B")
        cdef int64_t cs = self.cluster_size, got = 0, r
        cdef int rc = 0, err = 0, short = 0
        cdef void *grown
        if length <= 0 or length > 0x7FFFFFFF or offset < 0 or d.shape[0] < cs:
            raise ValueError("bad stream or output buffer")
        if self.busy:
            raise RuntimeError("Decompressor used by two threads at once")
        if length > self.scratch_cap:
            grown = realloc(self.scratch, <size_t>length)
            if grown == NULL:
                raise AllocationFailed(f"allocation failed: {length} bytes for a stream")
            self.scratch = <uint8_t *>grown
            self.scratch_cap = length
        self.busy = True
        self.input_exhausted = False
        try:
            with nogil:
                while got < length:
                    r = pread(fd, self.scratch + got, <size_t>(length - got), offset + got)
                    if r < 0:
                        if errno == EINTR:
                            continue
                        err = errno
                        break
                    if r == 0:
                        short = 1
                        break
                    got += r
                if err == 0 and not short:
                    if self.compression_type == ZLIB:
                        rc = _zlib_one(&self.zstrm, self.ld, self.scratch, length, &d[0], cs)
                    else:
                        rc = _zstd_one(self.dctx, self.scratch, length, &d[0], cs)
        finally:
            self.busy = False
        if err:
            import os
            raise OSError(err, os.strerror(err))
        if short:
            return -2
        self.input_exhausted = rc == INPUT_EXHAUSTED
        if rc == ALLOCATION_FAILED:
            raise AllocationFailed("allocation failed while decompressing a cluster (out of "
                                   "memory)")
        return -1 if rc else 0

    def inflate_batch(self, src, const int64_t[::1] in_off, const int64_t[::1] in_len,
                      dst, const int64_t[::1] out_off):
        """Inflate cluster j from src[in_off[j]:+in_len[j]] into dst[out_off[j]:+cluster_size].

        Returns -1 when every cluster inflated, else the index of the first that did not; then
        `input_exhausted` tells whether its stream ran out of input (rather than being invalid).
        Raises AllocationFailed when the codec runs out of memory.
        """
        cdef const uint8_t[::1] s = memoryview(src).cast("B")
        cdef uint8_t[::1] d = memoryview(dst).cast("B")
        cdef Py_ssize_t n = in_off.shape[0], j
        cdef int64_t cs = self.cluster_size, slen = s.shape[0], dlen = d.shape[0]
        cdef int rc = 0
        if in_len.shape[0] != n or out_off.shape[0] != n:
            raise ValueError("batch arrays differ in length")
        if n == 0:
            return -1
        for j in range(n):
            if (in_off[j] < 0 or in_len[j] <= 0 or in_len[j] > slen - in_off[j]
                    or in_len[j] > 0x7FFFFFFF or out_off[j] < 0 or out_off[j] > dlen - cs):
                raise ValueError(f"batch entry {j} lies outside its buffers")
        if self.busy:
            raise RuntimeError("Decompressor used by two threads at once")
        self.busy = True
        self.input_exhausted = False
        j = 0
        try:
            with nogil:
                if self.compression_type == ZLIB:
                    while j < n:
                        rc = _zlib_one(&self.zstrm, self.ld, &s[0] + in_off[j], in_len[j],
                                       &d[0] + out_off[j], cs)
                        if rc:
                            break
                        j += 1
                else:
                    while j < n:
                        rc = _zstd_one(self.dctx, &s[0] + in_off[j], in_len[j],
                                       &d[0] + out_off[j], cs)
                        if rc:
                            break
                        j += 1
        finally:
            self.busy = False
        self.input_exhausted = rc == INPUT_EXHAUSTED
        if rc == ALLOCATION_FAILED:
            raise AllocationFailed(f"allocation failed while decompressing cluster {j} of the "
                                   "batch (out of memory)")
        return j if rc else -1
