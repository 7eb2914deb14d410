# Shared by the modules that inflate compressed clusters (`include "_inflate_codecs.pxi"`:
# _inflate.pyx's Decompressor, _plain.pyx's numpy-free copy): the codec libraries' C functions,
# resolved once per module with dlsym(), and QEMU's rules for inflating one cluster. The
# including module cimports int64_t and uint8_t first.
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

from .errors import CodecUnavailable

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
