/* The slice of the zlib-ng (native API), libdeflate and zstd ABIs that qcowfast calls.
 *
 * The PyPI packages zlib-ng, deflate and backports.zstd ship no C headers, but their extension modules
 * export these symbols; _inflate.pyx resolves them with dlsym() into the function pointers below.
 * Layouts follow zlib-ng's zlib-ng.h (zng_stream), libdeflate.h and zstd.h
 * (ZSTD_inBuffer/ZSTD_outBuffer), all stable ABIs.
 */
#ifndef QCOWFAST_CODECS_H
#define QCOWFAST_CODECS_H
#include <stddef.h>
#include <stdint.h>

typedef struct qf_zng_stream {
    const uint8_t *next_in;
    uint32_t avail_in;
    size_t total_in;
    uint8_t *next_out;
    uint32_t avail_out;
    size_t total_out;
    const char *msg;
    void *state;
    void *zalloc;
    void *zfree;
    void *opaque;
    int data_type;
    uint32_t adler;
    unsigned long reserved;
} qf_zng_stream;

#define QF_Z_FINISH 4
#define QF_Z_OK 0
#define QF_Z_STREAM_END 1
#define QF_Z_BUF_ERROR (-5)

typedef int32_t (*qf_zng_inflateInit2_fn)(qf_zng_stream *strm, int32_t window_bits);
typedef int32_t (*qf_zng_inflate_fn)(qf_zng_stream *strm, int32_t flush);
typedef int32_t (*qf_zng_inflateReset_fn)(qf_zng_stream *strm);
typedef int32_t (*qf_zng_inflateEnd_fn)(qf_zng_stream *strm);

/* libdeflate (from the `deflate` package): the fast path for whole zlib clusters. */
typedef void *(*qf_ld_alloc_fn)(void);
typedef void (*qf_ld_free_fn)(void *d);
typedef int (*qf_ld_decompress_ex_fn)(void *d, const void *in, size_t in_nbytes, void *out,
                                      size_t out_nbytes_avail, size_t *actual_in_nbytes_ret,
                                      size_t *actual_out_nbytes_ret);
#define QF_LIBDEFLATE_SUCCESS 0

typedef struct qf_zstd_in { const void *src; size_t size; size_t pos; } qf_zstd_in;
typedef struct qf_zstd_out { void *dst; size_t size; size_t pos; } qf_zstd_out;

typedef void *(*qf_zstd_createDCtx_fn)(void);
typedef size_t (*qf_zstd_freeDCtx_fn)(void *dctx);
typedef size_t (*qf_zstd_DCtx_reset_fn)(void *dctx, int directive);
typedef size_t (*qf_zstd_decompressStream_fn)(void *dctx, qf_zstd_out *out, qf_zstd_in *in);
typedef unsigned (*qf_zstd_isError_fn)(size_t code);
typedef size_t (*qf_zstd_DCtx_setParameter_fn)(void *dctx, int param, int value);
typedef int (*qf_zstd_getErrorCode_fn)(size_t code);
#define QF_ZSTD_RESET_SESSION_ONLY 1
/* zstd.h: ZSTD_d_stableOutBuffer is ZSTD_d_experimentalParam2 (stable since zstd 1.4.4): the
 * output buffer stays put between calls, so frames decode straight into it, with no window
 * buffer. zstd_errors.h: ZSTD_error_memory_allocation. */
#define QF_ZSTD_D_STABLE_OUT_BUFFER 1001
#define QF_ZSTD_ERROR_MEMORY_ALLOCATION 64

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
static inline uint64_t qf_be64(uint64_t x) { return x; }
#else
static inline uint64_t qf_be64(uint64_t x) { return __builtin_bswap64(x); }
#endif

#endif
