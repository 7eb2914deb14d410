/* The slice of the zlib-ng (native API) and zstd compression ABIs that _deflate.pyx calls.
 *
 * The PyPI packages zlib-ng and backports.zstd ship no C headers, but their extension modules
 * export these symbols; _deflate.pyx resolves them with dlsym() into the function pointers
 * below. Layouts follow zlib-ng's zlib-ng.h (zng_stream) and zstd.h (ZSTD_inBuffer,
 * ZSTD_outBuffer, ZSTD_cParameter, ZSTD_EndDirective), all stable ABIs.
 */
#ifndef QCOWFAST_COMPRESS_H
#define QCOWFAST_COMPRESS_H
#include <stddef.h>
#include <stdint.h>
#include "_codecs.h"

/* One stream layout for both directions: zlib-ng's zng_stream, declared in _codecs.h. */
typedef qf_zng_stream qfc_zng_stream;

#define QFC_Z_OK 0
#define QFC_Z_STREAM_END 1
#define QFC_Z_FINISH 4
#define QFC_Z_DEFLATED 8
#define QFC_Z_DEFAULT_STRATEGY 0

typedef int32_t (*qfc_zng_deflateInit2_fn)(qfc_zng_stream *strm, int32_t level, int32_t method,
                                           int32_t window_bits, int32_t mem_level,
                                           int32_t strategy);
typedef int32_t (*qfc_zng_deflate_fn)(qfc_zng_stream *strm, int32_t flush);
typedef int32_t (*qfc_zng_deflateReset_fn)(qfc_zng_stream *strm);
typedef int32_t (*qfc_zng_deflateEnd_fn)(qfc_zng_stream *strm);

typedef struct qfc_zstd_in { const void *src; size_t size; size_t pos; } qfc_zstd_in;
typedef struct qfc_zstd_out { void *dst; size_t size; size_t pos; } qfc_zstd_out;

typedef void *(*qfc_zstd_createCCtx_fn)(void);
typedef size_t (*qfc_zstd_freeCCtx_fn)(void *cctx);
typedef size_t (*qfc_zstd_CCtx_reset_fn)(void *cctx, int directive);
typedef size_t (*qfc_zstd_CCtx_setParameter_fn)(void *cctx, int param, int value);
typedef size_t (*qfc_zstd_compressStream2_fn)(void *cctx, qfc_zstd_out *out, qfc_zstd_in *in,
                                              int end_op);
typedef unsigned (*qfc_zstd_isError_fn)(size_t code);
typedef size_t (*qfc_zstd_compress2_fn)(void *cctx, void *dst, size_t dst_capacity,
                                        const void *src, size_t src_size);
typedef unsigned (*qfc_zstd_getErrorCode_fn)(size_t code);
#define QFC_ZSTD_ERROR_DST_SIZE_TOO_SMALL 70     /* ZSTD_error_dstSize_tooSmall */
#define QFC_ZSTD_RESET_SESSION_ONLY 1
#define QFC_ZSTD_C_COMPRESSION_LEVEL 100
#define QFC_ZSTD_E_END 2

#endif
