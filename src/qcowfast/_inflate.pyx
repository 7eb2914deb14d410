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

include "_inflate_codecs.pxi"

from .errors import AllocationFailed


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
