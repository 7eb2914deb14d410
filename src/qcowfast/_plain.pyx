# cython: language_level=3
"""Chains read without numpy: the raw and QCOW2 writers' path for the images QEMU writes.

Importing numpy costs a process 0.05-0.2 s, more than converting a small image takes; this
module does not use it. It checks L1 tables at open, and reads units of guest space through the
whole chain with one pread per data run (copy writes runs close together in their file from
one mapping of it instead) and one per group of nearby compressed streams, inflated by the same code as the batch kernel (_inflate_codecs.pxi),
classifying L2 entries with the same code as the table kernels (_classify.pxi). Anything it
does not serve -- an entry breaking a rule, a stream that does not inflate, a short read --
makes read() and copy() return FALLBACK: convert then redoes the job on its general path, which
raises the usual error.
"""
from cpython.pythread cimport (WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.errno cimport EFAULT, EINTR, EIO, ENXIO, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_FIXED, MAP_NORESERVE, MAP_POPULATE,
                         MAP_PRIVATE, MAP_SHARED, PROT_NONE, PROT_READ, mmap, munmap)
from posix.stat cimport S_ISBLK, fstat, struct_stat
from posix.uio cimport iovec, pwritev
from posix.unistd cimport SEEK_END, _SC_PAGESIZE, lseek, pread, sysconf

cdef extern from "<unistd.h>" nogil:
    enum: SEEK_DATA
    enum: SEEK_HOLE

include "_classify.pxi"

include "_sigbus.pxi"

include "_inflate_codecs.pxi"

FALLBACK = -1

cdef enum:
    TABLE_CHUNK = 4096      # L2 entries classified per call
    DIRECT_MIN = 262144     # data this long is written from a mapping of its file, not read
    GROUP_GAP = 65536       # data pieces this close in one file share a mapping (a group) ...
    GROUP_SPAN = 33554432   # ... spanning at most this much of the file, at most 4x their bytes
    WRITE_IOVS = 256        # spans gathered into one pwritev
    SCAN_CHUNK = 524288     # mapped data scanned, then written, this much at a time

cdef enum:
    R_OK = 0
    R_FALLBACK = 1
    R_NOMEM = 2
    R_ORDER = 3             # check(): data out of host order (needs the overlap check)

cdef enum:
    CHECK_PIECES = 1048576  # pieces the overlap check holds at most (28 MiB)


def l1_scan(const uint8_t[::1] l1_be, int cluster_bits, int64_t host_limit,
            int64_t[::1] offsets):
    """Mask the L1 table `l1_be` (big-endian bytes) into `offsets`: 0 for no L2 table, -1 - i
    for a bad entry i (reserved bits, unaligned, past `host_limit`), which no reader may follow;
    return the index of the first bad entry, or -1."""
    cdef int64_t n = l1_be.shape[0] // 8, i, cluster_size = 1LL << cluster_bits
    cdef uint64_t e, off
    if offsets.shape[0] < n or not 9 <= cluster_bits <= 21:
        raise ValueError("bad L1 geometry")
    cdef const uint64_t *tbl = <const uint64_t *>&l1_be[0] if n else NULL
    cdef int64_t bad = -1
    with nogil:
        for i in range(n):
            e = qf_be64(tbl[i])
            off = e & L2E_OFFSET_MASK
            if (e & L1E_RESERVED) or (off & <uint64_t>(cluster_size - 1)) \
                    or (off and <int64_t>off + cluster_size > host_limit):
                if bad < 0:
                    bad = i
                offsets[i] = -1 - i
            else:
                offsets[i] = <int64_t>off
    return bad


def count_refcounts(const uint8_t[::1] block, int refcount_order, int64_t limit):
    """The number of non-zero entries among the first `limit` of refcount block `block`
    (entries of 2**refcount_order bits; narrower than a byte they are packed from the least
    significant bit, wider ones are big-endian: qcow2.txt "Refcount blocks")."""
    cdef int bits, k
    cdef int64_t i, j, count = 0
    cdef const uint8_t *b
    if not 0 <= refcount_order <= 6:
        raise ValueError("bad refcount order")
    bits = 1 << refcount_order
    limit = min(limit, block.shape[0] * 8 // bits)
    if limit <= 0:
        return 0
    b = &block[0]
    with nogil:
        if bits < 8:
            for i in range(limit):
                if (b[(i * bits) >> 3] >> ((i * bits) & 7)) & ((1 << bits) - 1):
                    count += 1
        else:
            k = bits >> 3
            for i in range(limit):
                for j in range(k):
                    if b[i * k + j]:
                        count += 1
                        break
    return count


cdef struct Layer:
    int table_fd            # where the L2 tables are
    int data_fd             # where the data clusters are (an external data file, or table_fd)
    int raw                 # a raw layer: data_fd's bytes up to data_size, zeros past them
    int holes_read_zero     # metadata-preallocated qcow2: data clusters' host holes are zeros
    int cluster_bits
    int flags               # _classify.pxi FLAG_*
    int ctype               # compression type (ZLIB, ZSTD), or -1: compressed clusters fall back
    int64_t vsize
    int64_t data_size       # classify's past-EOF rule; a raw layer's data end
    int64_t per_l1          # guest bytes per L1 entry
    int64_t n_l1
    const int64_t *l2_offsets


cdef struct Piece:
    # Guest bytes [guest, guest + length) read from file fd: at host (data), or inflated from
    # the stream of clen bytes at host (compressed) whose cluster starts at guest offset cstart.
    int64_t guest, length, host
    int64_t clen            # 0: data
    int64_t cstart
    int fd, depth


cdef struct Pieces:
    # The pieces of a guest range, in guest order
    Piece *v
    int64_t n, cap
    int first_only          # stop at the first piece (next_data)
    int64_t *high           # check(): per layer, the end of the last data range seen and the
    int64_t *chigh          # last compressed stream and its cluster (no pieces are stored)
    int64_t *ccl
    int ctypes              # check(): bit (1 << type) for each compression type met
    int claims              # check(): a data cluster claims all its host bytes, holes too
    int64_t limit           # when > 0, more pieces than this give R_FALLBACK


cdef int push_piece(Pieces *p, int64_t guest, int64_t length, int fd, int64_t host,
                    int64_t clen, int64_t cstart, int depth) noexcept nogil:
    cdef Piece *grown
    cdef int64_t cap
    if p.limit and p.n >= p.limit:
        return R_FALLBACK
    if p.n == p.cap:
        cap = p.cap * 2 if p.cap else 64
        grown = <Piece *>realloc(p.v, cap * sizeof(Piece))
        if grown == NULL:
            return R_NOMEM
        p.v = grown
        p.cap = cap
    p.v[p.n].guest = guest
    p.v[p.n].length = length
    p.v[p.n].host = host
    p.v[p.n].clen = clen
    p.v[p.n].cstart = cstart
    p.v[p.n].fd = fd
    p.v[p.n].depth = depth
    p.n += 1
    return R_OK


cdef int add_piece(Pieces *p, int64_t guest, int64_t length, int fd, int64_t host,
                   int depth) noexcept nogil:
    """Append a data piece, merged into the last one when it continues it in guest and host."""
    cdef Piece *last
    if p.high != NULL:
        if host < p.high[depth]:
            return R_ORDER
        p.high[depth] = host + length
        return R_OK
    if p.n:
        last = &p.v[p.n - 1]
        if last.clen == 0 and last.fd == fd and last.guest + last.length == guest \
                and last.host + last.length == host:
            last.length += length
            return R_OK
    return push_piece(p, guest, length, fd, host, 0, 0, depth)


cdef int add_compressed(Pieces *p, int64_t guest, int64_t length, int fd, int64_t coffset,
                        int64_t clen, int64_t cstart, int depth) noexcept nogil:
    """Append guest bytes [guest, guest + length) of the compressed cluster at cstart."""
    if p.high != NULL:
        # One cluster seen through holes of upper layers arrives in consecutive pieces.
        if coffset == p.chigh[depth] and cstart == p.ccl[depth]:
            return R_OK
        if coffset <= p.chigh[depth]:
            return R_ORDER
        p.chigh[depth] = coffset
        p.ccl[depth] = cstart
        return R_OK
    return push_piece(p, guest, length, fd, coffset, clen, cstart, depth)


cdef void free_pieces(Pieces *p) noexcept nogil:
    free(p.v)
    p.v = NULL
    p.n = p.cap = 0


cdef struct HostRange:
    int64_t fd
    int64_t kind            # 0: data bytes [start, end); 1: a compressed stream at start
    int64_t start
    int64_t end
    int64_t cluster         # kind 1: the guest offset of its cluster


cdef int by_host(const void *x, const void *y) noexcept nogil:
    cdef const HostRange *a = <const HostRange *>x
    cdef const HostRange *b = <const HostRange *>y
    if a.fd != b.fd:
        return -1 if a.fd < b.fd else 1
    if a.kind != b.kind:
        return -1 if a.kind < b.kind else 1
    if a.start != b.start:
        return -1 if a.start < b.start else 1
    return 0


cdef int overlapping(Pieces *p) noexcept nogil:
    """1 when two pieces read the same data bytes of one file, or two clusters the same
    compressed stream (the general path's rules; memory running out counts too), else 0."""
    cdef int64_t i
    cdef int found = 0
    if p.n < 2:
        return 0
    cdef HostRange *r = <HostRange *>malloc(p.n * sizeof(HostRange))
    if r == NULL:
        return 1
    for i in range(p.n):
        r[i].fd = p.v[i].fd
        r[i].kind = 1 if p.v[i].clen else 0
        r[i].start = p.v[i].host
        r[i].end = p.v[i].host + (1 if p.v[i].clen else p.v[i].length)
        r[i].cluster = p.v[i].cstart
    qsort(r, p.n, sizeof(HostRange), by_host)
    for i in range(1, p.n):
        if r[i].fd == r[i - 1].fd and r[i].kind == r[i - 1].kind \
                and r[i].start < r[i - 1].end \
                and not (r[i].kind == 1 and r[i].cluster == r[i - 1].cluster):
            found = 1
            break
    free(r)
    return found


cdef int read_full(int fd, char *dst, int64_t n, int64_t offset) noexcept nogil:
    """R_OK when all n bytes were read, else R_FALLBACK (short read or error)."""
    cdef int64_t got = 0, r
    while got < n:
        r = pread(fd, dst + got, <size_t>(n - got), offset + got)
        if r < 0 and errno == EINTR:
            continue
        if r <= 0:
            return R_FALLBACK
        got += r
    return R_OK


cdef enum:
    STREAM_GROUP = 1048576  # compressed streams close together are read in one pread of this
    STREAM_MAP_MIN = 131072 # a group this long is mapped, not read (copy only)
    STREAM_GAP = 65536      # much, skipping at most this much between two


cdef struct Inflater:
    # One call's decoders (made on first use) and scratch space; one thread.
    qf_zng_stream *zstrm
    void *ld
    void *dctx
    uint8_t *stream         # streams read from [gstart, gend) of file gfd
    int64_t stream_cap, gstart, gend
    int gfd
    int may_map             # groups of STREAM_MAP_MIN bytes are mapped (copy), not read
    void *map               # the mapping holding [gstart, gend), or NULL: stream holds it
    size_t map_size
    const uint8_t *mapped   # [gstart, gend) in the mapping
    uint8_t *cluster        # the inflated cluster of stream (lfd, lhost), for partial pieces
    int64_t cluster_cap, lhost
    int lfd


cdef void inflater_free(Inflater *c) noexcept nogil:
    if c.zstrm != NULL:
        zng_inflateEnd(c.zstrm)
        free(c.zstrm)
    if c.ld != NULL:
        ld_free(c.ld)
    if c.dctx != NULL:
        zstd_freeDCtx(c.dctx)
    free(c.stream)
    free(c.cluster)
    if c.map != NULL:
        munmap(c.map, c.map_size)
    memset(c, 0, sizeof(Inflater))


cdef int inflate_to(Inflater *c, int ctype, const uint8_t *src, int64_t n, uint8_t *dst,
                    int64_t cs) noexcept nogil:
    """Inflate one stream into dst[:cs] by QEMU's rules (_inflate_codecs.pxi): R_OK, R_NOMEM,
    or R_FALLBACK (an invalid or short stream, a codec not loaded: the general path says
    which)."""
    cdef int rc
    if ctype == ZLIB:
        if ld_decompress_ex == NULL or zng_inflate == NULL:
            return R_FALLBACK
        if c.ld == NULL:
            c.ld = ld_alloc()
            if c.ld == NULL:
                return R_NOMEM
        if c.zstrm == NULL:
            c.zstrm = <qf_zng_stream *>malloc(sizeof(qf_zng_stream))
            if c.zstrm == NULL:
                return R_NOMEM
            memset(c.zstrm, 0, sizeof(qf_zng_stream))
            if zng_inflateInit2(c.zstrm, -12) != QF_Z_OK:
                free(c.zstrm)
                c.zstrm = NULL
                return R_NOMEM
        rc = _zlib_one(c.zstrm, c.ld, src, n, dst, cs)
    elif ctype == ZSTD:
        if zstd_decompressStream == NULL:
            return R_FALLBACK
        if c.dctx == NULL:
            c.dctx = zstd_createDCtx()
            if c.dctx == NULL:
                return R_NOMEM
            if zstd_isError(zstd_DCtx_setParameter(c.dctx, QF_ZSTD_D_STABLE_OUT_BUFFER, 1)):
                return R_FALLBACK
        rc = _zstd_one(c.dctx, src, n, dst, cs)
    else:
        return R_FALLBACK
    if rc == ALLOCATION_FAILED:
        return R_NOMEM
    return R_OK if rc == 0 else R_FALLBACK


cdef int stream_of(Inflater *c, Piece *v, int64_t i, int64_t n,
                   const uint8_t **src) noexcept nogil:
    """Point src at compressed piece v[i]'s stream: in the bytes read last, or read now with
    the streams of the compressed pieces after it that lie close behind it in its file."""
    cdef Piece *a = &v[i]
    cdef int64_t j, reach = a.host + a.clen, need, cap
    cdef void *grown
    if a.fd == c.gfd and c.gstart <= a.host and a.host + a.clen <= c.gend:
        src[0] = (c.mapped if c.map != NULL else c.stream) + (a.host - c.gstart)
        return R_OK
    cap = max(<int64_t>STREAM_GROUP, a.clen)
    j = i + 1
    while j < n:
        if v[j].clen:
            if v[j].fd != a.fd or v[j].host < a.host or v[j].host > reach + STREAM_GAP:
                break
            need = max(reach, v[j].host + v[j].clen) - a.host
            if need > cap:
                break
            reach = a.host + need
        j += 1
    c.gfd = -1
    if c.map != NULL:
        munmap(c.map, c.map_size)
        c.map = NULL
    if c.may_map and reach - a.host >= STREAM_MAP_MIN and \
            map_range(a.fd, a.host, reach - a.host, &c.map, &c.map_size, &c.mapped) == R_OK:
        c.gfd, c.gstart, c.gend = a.fd, a.host, reach
        src[0] = c.mapped
        return R_OK
    if reach - a.host > c.stream_cap:
        grown = realloc(c.stream, <size_t>(reach - a.host))
        if grown == NULL:
            return R_NOMEM
        c.stream = <uint8_t *>grown
        c.stream_cap = reach - a.host
    if read_full(a.fd, <char *>c.stream, reach - a.host, a.host) != R_OK:
        return R_FALLBACK
    c.gfd, c.gstart, c.gend = a.fd, a.host, reach
    src[0] = c.stream
    return R_OK


cdef struct Inflation:
    # inflate_to's arguments and result, for the SIGBUS guard (_sigbus.h)
    Inflater *c
    int ctype
    const uint8_t *src
    int64_t n, cs
    uint8_t *dst
    int rc


cdef int _inflate_cb(void *arg) noexcept nogil:
    cdef Inflation *a = <Inflation *>arg
    a.rc = inflate_to(a.c, a.ctype, a.src, a.n, a.dst, a.cs)
    return 0


cdef int inflate_from(Inflater *c, int ctype, const uint8_t *src, int64_t n, uint8_t *dst,
                      int64_t cs) noexcept nogil:
    """inflate_to() from the stream stream_of() pointed at: when that is a file mapping, with
    a SIGBUS guard (R_FALLBACK when the file shrank under it; the decoder cut short is only
    freed after that)."""
    cdef Inflation a
    cdef int faulted = 0
    if c.map == NULL:
        return inflate_to(c, ctype, src, n, dst, cs)
    a.c, a.ctype, a.src, a.n, a.dst, a.cs, a.rc = c, ctype, src, n, dst, cs, R_OK
    qf_bus_call(_inflate_cb, &a, c.map, c.map_size, &faulted)
    return R_FALLBACK if faulted else a.rc


cdef int inflate_piece(Inflater *c, Layer *layers, Piece *v, int64_t i, int64_t n,
                       char *dst) noexcept nogil:
    """Fill dst[:v[i].length] with compressed piece v[i]'s guest bytes."""
    cdef Piece *a = &v[i]
    cdef Layer *L = &layers[a.depth]
    cdef int64_t cs = 1LL << L.cluster_bits
    cdef const uint8_t *src
    cdef void *grown
    cdef int rc
    if a.length == cs:
        rc = stream_of(c, v, i, n, &src)
        if rc == R_OK:
            rc = inflate_from(c, L.ctype, src, a.clen, <uint8_t *>dst, cs)
        return rc
    # Part of a cluster (seen through an upper layer's holes, or cut by the virtual size):
    # inflate it whole into scratch, once for its consecutive pieces.
    if not (c.lfd == a.fd and c.lhost == a.host and c.cluster != NULL):
        if cs > c.cluster_cap:
            grown = realloc(c.cluster, <size_t>cs)
            if grown == NULL:
                return R_NOMEM
            c.cluster = <uint8_t *>grown
            c.cluster_cap = cs
        c.lfd = -1
        rc = stream_of(c, v, i, n, &src)
        if rc == R_OK:
            rc = inflate_from(c, L.ctype, src, a.clen, c.cluster, cs)
        if rc != R_OK:
            return rc
        c.lfd, c.lhost = a.fd, a.host
    memcpy(dst, c.cluster + (a.guest - a.cstart), <size_t>a.length)
    return R_OK


cdef int resolve(Layer *layers, int nl, int d, int64_t start, int64_t n,
                 Pieces *out) noexcept nogil:
    """Append the DATA pieces of guest range [start, start + n) of layer d (through its
    backing layers) to `out`; everything else reads as zeros."""
    cdef Layer *L = &layers[d]
    cdef int64_t pos = start, end = start + n, cend, l1, m
    cdef int rc
    if L.raw:
        m = min(n, L.data_size - start)
        if m > 0:
            return raw_data(L, d, start, m, out)
        return R_OK
    while pos < end:
        if out.first_only and out.n:
            return R_OK
        l1 = pos // L.per_l1
        if l1 >= L.n_l1:
            return R_FALLBACK
        # At most TABLE_CHUNK entries at a time bounds the scratch memory.
        cend = min(end, (l1 + 1) * L.per_l1, pos + ((<int64_t>TABLE_CHUNK) << L.cluster_bits))
        if L.l2_offsets[l1] < 0:
            return R_FALLBACK           # a bad L1 entry (l1_scan): the general path raises
        if L.l2_offsets[l1] == 0:
            rc = from_backing(layers, nl, d, pos, cend - pos, out)
        else:
            rc = resolve_table(layers, nl, d, l1, pos, cend - pos, out)
        if rc != R_OK:
            return rc
        pos = cend
    return R_OK


cdef int64_t size_now(int fd) noexcept nogil:
    """The size of `fd` now (a block device's st_size is 0), or -1."""
    cdef struct_stat st
    if fstat(fd, &st) != 0:
        return -1
    if S_ISBLK(st.st_mode):
        return lseek(fd, 0, SEEK_END)       # (pread users only: the offset does not matter)
    return st.st_size


cdef int raw_data(Layer *L, int d, int64_t start, int64_t n, Pieces *out) noexcept nogil:
    """The data pieces of raw layer L in [start, start + n): what SEEK_DATA/SEEK_HOLE report
    as data (holes read as zeros, as file-posix's block status says: they are never read,
    nor mapped, which on tmpfs would allocate them); all of it where the file system
    cannot tell."""
    return file_data(L, d, start, start, n, out)


cdef int file_data(Layer *L, int d, int64_t guest, int64_t host, int64_t n,
                   Pieces *out) noexcept nogil:
    """Guest range [guest, guest + n), stored at [host, host + n) of L's data file: pieces
    for what SEEK_DATA/SEEK_HOLE report as data there, nothing for the holes (they read as
    zeros). pread/pwrite users only: lseek moves the descriptor's shared offset."""
    cdef int64_t pos = host, end = host + n, data, hole, delta = guest - host
    cdef int rc
    while pos < end:
        if out.first_only and out.n:
            return R_OK
        data = lseek(L.data_fd, pos, SEEK_DATA)
        if data < 0:
            if errno == ENXIO:
                # Only a hole from pos to the end of the file, unless the file was cut below
                # the size it had when opened: the general path reports that.
                if size_now(L.data_fd) < end:
                    return R_FALLBACK
                return R_OK
            data, hole = pos, end               # no hole reporting: data everywhere
        elif data >= end:
            return R_OK
        else:
            hole = lseek(L.data_fd, data, SEEK_HOLE)
            if hole < 0 or hole > end:
                hole = end
        rc = add_piece(out, data + delta, hole - data, L.data_fd, data, d)
        if rc != R_OK:
            return rc
        pos = hole
    return R_OK


cdef int from_backing(Layer *layers, int nl, int d, int64_t pos, int64_t n,
                      Pieces *out) noexcept nogil:
    """Unallocated in layer d: the backing layer's bytes below its size, zeros past it."""
    cdef int64_t m
    if d + 1 >= nl:
        return R_OK
    m = min(n, layers[d + 1].vsize - pos)
    if m > 0:
        return resolve(layers, nl, d + 1, pos, m, out)
    return R_OK


cdef int resolve_table(Layer *layers, int nl, int d, int64_t l1, int64_t pos, int64_t n,
                       Pieces *out) noexcept nogil:
    """resolve() within the range of one allocated L2 table of layer d."""
    cdef Layer *L = &layers[d]
    cdef int64_t cs = 1LL << L.cluster_bits
    cdef int64_t width = 2 if L.flags & FLAG_EXTENDED_L2 else 1
    cdef int64_t base = l1 * L.per_l1
    cdef int64_t first = (pos - base) >> L.cluster_bits
    cdef int64_t count = ((pos + n - 1 - base) >> L.cluster_bits) - first + 1
    cdef int64_t cap = count * (32 if width == 2 else 1)
    cdef int64_t runs, r, a, b, g, bad_index = -1
    cdef int bad_code = E_OK, rc = R_OK, kind
    cdef uint64_t *tbl = <uint64_t *>malloc(count * 8 * width)
    cdef int64_t *o = <int64_t *>malloc(cap * 4 * 8)
    cdef uint8_t *k = <uint8_t *>malloc(cap)
    if tbl == NULL or o == NULL or k == NULL:
        rc = R_NOMEM
    elif read_full(L.table_fd, <char *>tbl, count * 8 * width,
                   L.l2_offsets[l1] + first * 8 * width) != R_OK:
        rc = R_FALLBACK
    else:
        runs = classify_loop(tbl, 0, count, L.cluster_bits, L.flags, base + first * cs,
                             L.data_size, o, o + cap, k, o + 2 * cap, o + 3 * cap,
                             &bad_index, &bad_code)
        if runs < 0:
            rc = R_FALLBACK
        r = 0
        while rc == R_OK and r < runs and not (out.first_only and out.n):
            g = o[r]
            a = max(g, pos)
            b = min(g + o[cap + r], pos + n)
            kind = k[r]
            if a < b and L.flags & FLAG_DATA_FILE and kind != K_COMPRESSED and \
                    o[2 * cap + r] >= 0 and o[2 * cap + r] != g:
                # An external data file's clusters lie at their guest offsets (QEMU
                # qcow2_get_host_offset(): "External data file host cluster offset ... does not
                # match guest cluster offset"): the general path raises that.
                rc = R_FALLBACK
            elif a < b:
                if kind == K_DATA and L.holes_read_zero and not out.claims:
                    # QEMU (qcow2_detect_metadata_preallocation, then block status with
                    # BDRV_BLOCK_RECURSE) reads the host file's holes in such clusters as zeros.
                    # (The check claims the whole range: a shared hole is shared, as the
                    # general path's claims say.)
                    rc = file_data(L, d, a, o[2 * cap + r] + (a - g), b - a, out)
                elif kind == K_DATA:
                    rc = add_piece(out, a, b - a, L.data_fd, o[2 * cap + r] + (a - g), d)
                elif kind == K_UNALLOCATED:
                    rc = from_backing(layers, nl, d, a, b - a, out)
                elif kind == K_COMPRESSED:
                    if L.ctype < 0:
                        rc = R_FALLBACK
                    else:
                        # The sector-rounded length may overhang the end of the file, where
                        # QEMU reads zeros: read what is there (as the general path does).
                        out.ctypes |= 1 << L.ctype
                        rc = add_compressed(out, a, b - a, L.data_fd, o[2 * cap + r],
                                            min(o[3 * cap + r], L.data_size - o[2 * cap + r]),
                                            g, d)
            r += 1
    free(tbl)
    free(o)
    free(k)
    return rc


cdef class Chain:
    """The layers of a chain, top first, for check(), next_data(), read() and copy().

    layers: sequence of (table_fd, data_fd, raw, cluster_bits, flags, virtual_size, data_size,
    guest_bytes_per_l1_entry, l2_offsets int64 buffer (as l1_scan fills it) or None,
    holes_read_zero, compression_type or -1); the caller keeps the files open.
    """
    cdef Layer *layers
    cdef int nl
    cdef list keep
    cdef readonly int compression_types   # check(): bit (1 << type) for each type read
    cdef PyThread_type_lock wlock   # one writer at a time (copy)

    def __cinit__(self, layers):
        cdef const int64_t[::1] offs
        cdef Layer *L
        cdef Py_ssize_t i
        self.keep = []
        self.wlock = PyThread_allocate_lock()
        if self.wlock == NULL:
            raise MemoryError()
        self.nl = len(layers)
        if not 1 <= self.nl <= 4096:
            raise ValueError("bad chain length")
        self.layers = <Layer *>malloc(self.nl * sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError()
        memset(self.layers, 0, self.nl * sizeof(Layer))
        for i, spec in enumerate(layers):
            (table_fd, data_fd, raw, bits, flags, vsize, data_size, per_l1, l2, zero_holes,
             ctype) = spec
            L = &self.layers[i]
            L.table_fd, L.data_fd, L.raw = table_fd, data_fd, bool(raw)
            L.ctype = ctype if ctype in (ZLIB, ZSTD) else -1
            L.holes_read_zero = bool(zero_holes)
            L.vsize, L.data_size = vsize, data_size
            if vsize < 0 or data_size < 0:
                raise ValueError("bad layer size")
            if not raw:
                if not 9 <= bits <= 21 or per_l1 <= 0:
                    raise ValueError("bad table geometry")
                offs = l2
                self.keep.append(offs)
                L.cluster_bits, L.flags, L.per_l1 = bits, flags, per_l1
                L.n_l1 = offs.shape[0]
                L.l2_offsets = &offs[0] if L.n_l1 else NULL

    def __dealloc__(self):
        free(self.layers)
        if self.wlock != NULL:
            PyThread_free_lock(self.wlock)

    def check(self):
        """True when the plain path can copy the whole image: every cluster the guest reads is
        unallocated, zero, data or compressed by the rules, no two guest ranges read the same
        data bytes or compressed stream of one file (the general path refuses such shared
        clusters with its message), and the codecs of the compressed clusters load."""
        cdef Pieces p
        cdef int rc
        cdef int64_t i
        memset(&p, 0, sizeof(Pieces))
        p.claims = 1
        p.high = <int64_t *>malloc(self.nl * sizeof(int64_t) * 3)
        if p.high == NULL:
            raise MemoryError()
        p.chigh = p.high + self.nl
        p.ccl = p.high + 2 * self.nl
        for i in range(self.nl):
            p.high[i] = 0
            p.chigh[i] = p.ccl[i] = -1
        with nogil:
            # Data and streams in increasing host order along the guest (images QEMU writes
            # in order) cannot overlap; otherwise list the pieces and look for overlaps.
            rc = resolve(self.layers, self.nl, 0, 0, self.layers[0].vsize, &p)
            free(p.high)
            p.high = p.chigh = p.ccl = NULL
            if rc == R_ORDER:
                p.limit = CHECK_PIECES
                rc = resolve(self.layers, self.nl, 0, 0, self.layers[0].vsize, &p)
                if rc == R_OK and overlapping(&p):
                    rc = R_FALLBACK
            free_pieces(&p)
        if rc == R_NOMEM:
            raise MemoryError()
        self.compression_types = p.ctypes
        if rc != R_OK:
            return False
        try:
            for t in (ZLIB, ZSTD):
                if p.ctypes & (1 << t):
                    check_codec(t)
        except CodecUnavailable:
            return False        # the general path says so, where it needs the codec
        return True

    def one_piece(self, int64_t start, int64_t n):
        """(fd, host offset) when guest bytes [start, start + n) are one run of data in one
        file, else None (holes, several runs, or FALLBACK)."""
        cdef Pieces p
        cdef int rc
        cdef object found = None
        if n <= 0 or start < 0:
            raise ValueError("bad range")
        memset(&p, 0, sizeof(Pieces))
        p.limit = 2
        with nogil:
            rc = resolve(self.layers, self.nl, 0, start, n, &p)
        if rc == R_OK and p.n == 1 and p.v[0].clen == 0 and p.v[0].guest == start \
                and p.v[0].length == n:
            found = (p.v[0].fd, p.v[0].host)
        free_pieces(&p)
        if rc == R_NOMEM:
            raise MemoryError()
        return found

    def next_data(self, int64_t pos, int64_t end):
        """The guest offset of the first data byte in [pos, end), end when there is none, or
        FALLBACK."""
        cdef Pieces p
        cdef int rc = R_OK
        cdef int64_t step, top = self.layers[0].per_l1 if not self.layers[0].raw else end - pos
        memset(&p, 0, sizeof(Pieces))
        p.first_only = 1
        with nogil:
            while pos < end:
                step = min(end - pos, max(top, 1))
                rc = resolve(self.layers, self.nl, 0, pos, step, &p)
                if rc != R_OK or p.n:
                    break
                pos += step
            if rc == R_OK and p.n:
                pos = p.v[0].guest
            free_pieces(&p)
        if rc == R_NOMEM:
            raise MemoryError()
        return FALLBACK if rc != R_OK else min(pos, end)

    def read(self, int64_t start, int64_t n, uint8_t[::1] buf):
        """Fill buf[:n] with guest bytes [start, start + n), zeros where no layer has data;
        return n, or FALLBACK (buf's contents undefined)."""
        cdef Pieces p
        cdef Inflater c
        cdef int rc = R_OK
        cdef int64_t i, g, prev = 0
        cdef char *dst
        if n < 0 or n > buf.shape[0] or start < 0:
            raise ValueError("bad read range")
        if n == 0:
            return 0
        dst = <char *>&buf[0]
        memset(&p, 0, sizeof(Pieces))
        memset(&c, 0, sizeof(Inflater))
        with nogil:
            rc = resolve(self.layers, self.nl, 0, start, n, &p)
            i = 0
            while rc == R_OK and i < p.n:
                g = p.v[i].guest - start
                if g > prev:
                    memset(dst + prev, 0, g - prev)
                if p.v[i].clen:
                    rc = inflate_piece(&c, self.layers, p.v, i, p.n, dst + g)
                else:
                    rc = read_full(p.v[i].fd, dst + g, p.v[i].length, p.v[i].host)
                prev = g + p.v[i].length
                i += 1
            if rc == R_OK and prev < n:
                memset(dst + prev, 0, n - prev)
            free_pieces(&p)
            inflater_free(&c)
        if rc == R_NOMEM:
            raise MemoryError()
        return FALLBACK if rc != R_OK else n

    def copy(self, int64_t start, int64_t n, uint8_t[::1] buf, int64_t block, int out_fd):
        """Write guest bytes [start, start + n) to `out_fd` at the same offsets, leaving out the
        blocks of `block` bytes (aligned to guest offsets; the last may be short) that are all
        zeros; return the bytes written, or FALLBACK (part of the range may have been written:
        the caller starts again on an empty output). Data pieces long enough, or close enough
        together in their file, are scanned and written straight from read-only mappings of the
        page cache; buf (n bytes) holds the rest. Writes from concurrent calls take turns.
        Raises OSError."""
        cdef Pieces p
        cdef Spans o
        cdef int rc = R_OK, err = 0
        cdef int64_t total = 0
        if n < 0 or n > buf.shape[0] or block <= 0 or start < 0:
            raise ValueError("bad copy range")
        if n == 0:
            return 0
        memset(&p, 0, sizeof(Pieces))
        memset(&o, 0, sizeof(Spans))
        with nogil:
            rc = resolve(self.layers, self.nl, 0, start, n, &p)
            if rc == R_OK and p.n:
                rc = copy_pieces(self.layers, &p, start, n, <char *>&buf[0], block, &o,
                                 self.wlock, out_fd, &total, &err)
            free_pieces(&p)
            free(o.s)
        if rc == R_NOMEM:
            raise MemoryError()
        if err:
            import os
            raise OSError(err, os.strerror(err))
        return FALLBACK if rc != R_OK else total


cdef struct Span:
    const uint8_t *data
    int64_t length
    int64_t offset


cdef struct Spans:
    Span *s
    int64_t n, cap


cdef int add_span(Spans *o, const uint8_t *data, int64_t length, int64_t offset) noexcept nogil:
    cdef Span *grown
    cdef Span *last
    cdef int64_t cap
    if o.n:
        last = &o.s[o.n - 1]
        if last.data + last.length == data and last.offset + last.length == offset:
            last.length += length
            return R_OK
    if o.n == o.cap:
        cap = o.cap * 2 if o.cap else 64
        grown = <Span *>realloc(o.s, cap * sizeof(Span))
        if grown == NULL:
            return R_NOMEM
        o.s = grown
        o.cap = cap
    o.s[o.n].data = data
    o.s[o.n].length = length
    o.s[o.n].offset = offset
    o.n += 1
    return R_OK


cdef int scan_spans(Spans *o, const uint8_t *data, int64_t length, int64_t origin,
                    int64_t block) noexcept nogil:
    """Append the runs of data[:length] (data[0] is guest offset `origin`) made of blocks that
    are not all zeros; blocks are aligned to guest offsets."""
    cdef int64_t pos = 0, end, run = -1
    cdef int rc
    while pos < length:
        end = min(pos + block - (origin + pos) % block, length)
        if _block_nonzero(data, pos, end):
            if run < 0:
                run = pos
        elif run >= 0:
            rc = add_span(o, data + run, pos - run, origin + run)
            if rc != R_OK:
                return rc
            run = -1
        pos = end
    if run >= 0:
        return add_span(o, data + run, length - run, origin + run)
    return R_OK


cdef struct Scan:
    # scan_spans' arguments and result, for the SIGBUS guard (_sigbus.h)
    Spans *o
    const uint8_t *data
    int64_t length, origin, block
    int rc


cdef int _scan_cb(void *arg) noexcept nogil:
    cdef Scan *a = <Scan *>arg
    a.rc = scan_spans(a.o, a.data, a.length, a.origin, a.block)
    return 0


cdef int scan_mapped(Spans *o, const uint8_t *data, int64_t length, int64_t origin,
                     int64_t block) noexcept nogil:
    """scan_spans over a file mapping: R_FALLBACK when its file shrank under it (SIGBUS). A
    fault can only come from reading a block, between add_span calls: `o` stays whole."""
    cdef Scan a
    cdef int faulted = 0
    a.o, a.data, a.length, a.origin, a.block, a.rc = o, data, length, origin, block, R_OK
    qf_bus_call(_scan_cb, &a, data, <size_t>length, &faulted)
    return R_FALLBACK if faulted else a.rc


def nonzero_spans(const uint8_t[::1] data, int64_t origin, int64_t block):
    """[(offset, length), ...]: the runs of `data` (data[0] at guest offset `origin`) made of
    `block`-byte blocks, aligned to guest offsets, that are not all zeros; FALLBACK when `data`
    is a file mapping whose file shrank under it."""
    cdef Spans o
    cdef int rc = R_OK
    cdef int64_t i
    if block <= 0 or origin < 0:
        raise ValueError("bad block size or origin")
    memset(&o, 0, sizeof(Spans))
    if data.shape[0]:
        with nogil:
            rc = scan_mapped(&o, &data[0], data.shape[0], origin, block)
    try:
        if rc == R_NOMEM:
            raise MemoryError()
        if rc != R_OK:
            return FALLBACK
        return [(o.s[i].offset, o.s[i].length) for i in range(o.n)]
    finally:
        free(o.s)


cdef struct Cmp:
    # _cmp_cb's arguments and result (the first differing byte, or n)
    const uint8_t *a
    const uint8_t *b
    int64_t n, at


cdef int _cmp_cb(void *arg) noexcept nogil:
    cdef Cmp *c = <Cmp *>arg
    cdef int64_t pos = 0, step
    while pos < c.n:
        step = min(<int64_t>65536, c.n - pos)
        if memcmp(c.a + pos, c.b + pos, <size_t>step) != 0:
            while c.a[pos] == c.b[pos]:
                pos += 1
            c.at = pos
            return 0
        pos += step
    c.at = c.n
    return 0


def first_difference(int fd_a, int64_t off_a, int fd_b, int64_t off_b, int64_t n):
    """The offset in [0, n) of the first byte where [off_a, off_a + n) of file `fd_a` and
    [off_b, off_b + n) of `fd_b` differ, n when they are equal; compared in place in the page
    cache, through read-only mappings of both (no copy). FALLBACK when a range lies past the
    end of its file, cannot be mapped, or its file shrank under the comparison (SIGBUS)."""
    cdef int64_t page = sysconf(_SC_PAGESIZE)
    cdef int64_t pa = off_a - off_a % page, pb = off_b - off_b % page
    cdef size_t la, lb
    cdef char *region
    cdef Cmp c
    cdef int faulted = 0, ok = 0
    if n <= 0 or off_a < 0 or off_b < 0:
        raise ValueError("bad range")
    la = <size_t>((off_a + n - pa + page - 1) // page * page)
    lb = <size_t>((off_b + n - pb + page - 1) // page * page)
    with nogil:
        if off_a + n <= size_now(fd_a) and off_b + n <= size_now(fd_b):
            # One reserved range holds both mappings: one SIGBUS guard covers them.
            region = <char *>mmap(NULL, la + lb, PROT_NONE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if <void *>region != MAP_FAILED:
                if mmap(region, la, PROT_READ, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd_a,
                        pa) != MAP_FAILED and \
                        mmap(region + la, lb, PROT_READ, MAP_SHARED | MAP_FIXED | MAP_POPULATE,
                             fd_b, pb) != MAP_FAILED:
                    c.a = <const uint8_t *>region + (off_a - pa)
                    c.b = <const uint8_t *>region + la + (off_b - pb)
                    c.n = n
                    c.at = n
                    qf_bus_call(_cmp_cb, &c, region, la + lb, &faulted)
                    ok = not faulted
                munmap(region, la + lb)
    return c.at if ok else FALLBACK


cdef int map_range(int fd, int64_t host, int64_t length, void **addr, size_t *size,
                   const uint8_t **data) noexcept nogil:
    """Map `length` bytes of `fd` at `host` read-only; R_FALLBACK when they lie past the end of
    the file as it is now (touching them would raise SIGBUS) or mmap fails."""
    cdef int64_t page = host - host % sysconf(_SC_PAGESIZE)
    if host + length > size_now(fd):
        return R_FALLBACK
    addr[0] = mmap(NULL, <size_t>(host + length - page), PROT_READ, MAP_SHARED | MAP_POPULATE,
                   fd, page)
    if addr[0] == MAP_FAILED:
        addr[0] = NULL
        return R_FALLBACK
    size[0] = <size_t>(host + length - page)
    data[0] = <const uint8_t *>addr[0] + (host - page)
    return R_OK


cdef int64_t mark_groups(Pieces *p, int64_t start, int64_t n, int64_t block, int64_t *mid,
                        int64_t *group) noexcept nogil:
    """Per data piece i, its block-aligned middle [mid[2i], mid[2i+1]) (guest bytes from
    `start`), and in group[i] the first piece of the group whose middles one mapping serves
    (-1: the piece is read into the buffer). Consecutive middles in one file, in increasing
    host order with gaps of at most GROUP_GAP, form a group; a group is mapped when its
    middles hold DIRECT_MIN bytes and a quarter of its span. Pieces of 512-byte-cluster images
    (32 KiB runs between L2 tables) are written from the page cache this way, not read."""
    cdef int64_t i, j, g, e, a, b, first = -1, lo = 0, hi = 0, used = 0, groups = 0
    for i in range(p.n + 1):
        a = b = 0
        if i < p.n:
            group[i] = -1
            g = p.v[i].guest - start
            e = g + p.v[i].length
            a = g + (block - (start + g) % block) % block
            b = e if e == n else e - (start + e) % block
            mid[2 * i] = a
            mid[2 * i + 1] = b
            if p.v[i].clen or b <= a:
                continue            # the piece goes through the buffer whole
            a = p.v[i].host + (a - g)   # its middle, in its file
            b = p.v[i].host + (b - g)
            if first >= 0 and p.v[i].fd == p.v[first].fd and hi <= a <= hi + GROUP_GAP \
                    and b - lo <= GROUP_SPAN:
                group[i] = first
                used += b - a
                hi = b
                continue
        if first >= 0 and used >= DIRECT_MIN and 4 * used >= hi - lo:
            groups += 1
        elif first >= 0:
            for j in range(first, i):
                group[j] = -1
        if i < p.n:
            first, lo, hi, used = i, a, b, b - a
            group[i] = i
    return groups


cdef int write_spans(int out_fd, Spans *o, int64_t *total, int *err) noexcept nogil:
    """pwritev the spans, those continuing each other in the output in one call; R_FALLBACK
    when a mapped file shrank under a write (EFAULT), else R_OK (err set on a write error)."""
    cdef iovec iov[WRITE_IOVS]
    cdef int64_t i = 0, j, off, r
    cdef int cnt, k
    while i < o.n:
        off = o.s[i].offset
        cnt = 0
        j = i
        while j < o.n and cnt < WRITE_IOVS and \
                (cnt == 0 or o.s[j].offset == o.s[j - 1].offset + o.s[j - 1].length):
            iov[cnt].iov_base = <void *>o.s[j].data
            iov[cnt].iov_len = <size_t>o.s[j].length
            cnt += 1
            j += 1
        k = 0
        while k < cnt:
            r = pwritev(out_fd, &iov[k], cnt - k, off)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EFAULT:
                    return R_FALLBACK   # a mapped file shrank under us: hand over
                err[0] = errno
                return R_OK
            if r == 0:
                err[0] = EIO            # no progress
                return R_OK
            total[0] += r
            off += r
            while r > 0:
                if <size_t>r >= iov[k].iov_len:
                    r -= iov[k].iov_len
                    k += 1
                else:
                    iov[k].iov_base = <char *>iov[k].iov_base + r
                    iov[k].iov_len -= r
                    r = 0
        i = j
    return R_OK


cdef int flush_spans(Spans *o, int64_t least, PyThread_type_lock wlock, int out_fd,
                     int64_t *total, int *err) noexcept nogil:
    """Write the spans found so far and forget them, when they hold `least` bytes."""
    cdef int64_t i, held = 0
    cdef int rc
    for i in range(o.n):
        held += o.s[i].length
    if held < least or not o.n:
        return R_OK
    PyThread_acquire_lock(wlock, WAIT_LOCK)
    rc = write_spans(out_fd, o, total, err)
    PyThread_release_lock(wlock)
    o.n = 0
    return rc


cdef int copy_pieces(Layer *layers, Pieces *p, int64_t start, int64_t n, char *dst,
                     int64_t block, Spans *o, PyThread_type_lock wlock, int out_fd,
                     int64_t *total, int *err) noexcept nogil:
    """Copy's work once the pieces of [start, start + n) are known (p.n > 0)."""
    cdef int64_t i, g, e, a, b, lo, hi, prev, seg, upto, k, ngroups, step
    cdef const uint8_t *src
    cdef int rc = R_OK
    cdef Inflater c
    cdef int64_t *mid = <int64_t *>malloc(p.n * 16)
    cdef int64_t *group = <int64_t *>malloc(p.n * 8)
    cdef const uint8_t **at = <const uint8_t **>malloc(p.n * sizeof(void *))
    cdef void **maps = NULL
    cdef size_t *sizes = NULL
    cdef int64_t nmaps = 0
    if mid == NULL or group == NULL or at == NULL:
        free(mid); free(group); free(at)
        return R_NOMEM
    ngroups = mark_groups(p, start, n, block, mid, group)
    maps = <void **>malloc((ngroups + 1) * sizeof(void *))
    sizes = <size_t *>malloc((ngroups + 1) * sizeof(size_t))
    if maps == NULL or sizes == NULL:
        free(mid); free(group); free(at); free(maps); free(sizes)
        return R_NOMEM
    memset(&c, 0, sizeof(Inflater))
    c.may_map = 1
    # One mapping per group, from its first middle to its last: at[i] is piece i's middle.
    i = 0
    while i < p.n:
        if group[i] != i:
            i += 1
            continue
        k = i + 1
        hi = i
        while k < p.n and group[k] == i or k < p.n and group[k] < 0:
            if group[k] == i:
                hi = k
            k += 1
        g = p.v[i].host + mid[2 * i] - (p.v[i].guest - start)
        e = p.v[hi].host + mid[2 * hi + 1] - (p.v[hi].guest - start)
        rc = map_range(p.v[i].fd, g, e - g, &maps[nmaps], &sizes[nmaps], &src)
        if rc != R_OK:
            break
        nmaps += 1
        for k in range(i, hi + 1):
            if group[k] == i:
                at[k] = src + (p.v[k].host + mid[2 * k] - (p.v[k].guest - start) - g)
        i = hi + 1
    # The buffer holds the blocks the pieces touch, less the mapped middles: the parts of
    # those blocks no piece covers are zeroed; blocks no piece touches are neither zeroed nor
    # scanned (they are holes of the output).
    prev = 0
    for i in range(p.n):
        if rc != R_OK:
            break                           # a mapping failed
        g = p.v[i].guest - start
        e = g + p.v[i].length
        lo = max(g - (start + g) % block, 0)
        if i and lo < prev:
            lo = prev                       # the previous piece's last block
        else:
            hi = min(prev + (block - (start + prev) % block) % block, n) if i else prev
            memset(dst + prev, 0, hi - prev)
        memset(dst + lo, 0, g - lo)
        a = b = e
        if group[i] >= 0:
            a = mid[2 * i]
            b = mid[2 * i + 1]
        if p.v[i].clen:
            rc = inflate_piece(&c, layers, p.v, i, p.n, dst + g)
            if rc != R_OK:
                break
        elif read_full(p.v[i].fd, dst + g, a - g, p.v[i].host) != R_OK \
                or read_full(p.v[i].fd, dst + b, e - b, p.v[i].host + b - g) != R_OK:
            rc = R_FALLBACK
            break
        prev = e
    if rc == R_OK:
        hi = min(prev + (block - (start + prev) % block) % block, n)
        memset(dst + prev, 0, hi - prev)
        # [seg, upto): buffered blocks not scanned yet. Mapped middles are scanned a chunk at
        # a time, and what is found written out once it adds up to a chunk, so that the write
        # copies from the cache the scan filled.
        seg = upto = max(p.v[0].guest - start - p.v[0].guest % block, 0)
        step = max(SCAN_CHUNK - SCAN_CHUNK % block, block)
        for i in range(p.n):
            g = p.v[i].guest - start
            e = g + p.v[i].length
            lo = max(g - (start + g) % block, 0)
            if lo > upto:
                rc = scan_spans(o, <const uint8_t *>dst + seg, upto - seg, start + seg, block)
                seg = lo
            if rc == R_OK and group[i] >= 0:
                a = mid[2 * i]
                b = mid[2 * i + 1]
                rc = scan_spans(o, <const uint8_t *>dst + seg, a - seg, start + seg, block)
                while rc == R_OK and a < b and not err[0]:
                    k = min(b, a + step)
                    rc = scan_mapped(o, at[i] + (a - mid[2 * i]), k - a, start + a, block)
                    if rc == R_OK:
                        rc = flush_spans(o, SCAN_CHUNK, wlock, out_fd, total, err)
                    a = k
                seg = b
            if rc != R_OK or err[0]:
                break
            upto = min(e + (block - (start + e) % block) % block, n)
        if rc == R_OK and not err[0]:
            rc = scan_spans(o, <const uint8_t *>dst + seg, upto - seg, start + seg, block)
    if rc == R_OK and not err[0]:
        rc = flush_spans(o, 1, wlock, out_fd, total, err)
    for i in range(nmaps):
        munmap(maps[i], sizes[i])
    free(mid); free(group); free(at); free(maps); free(sizes)
    inflater_free(&c)
    return rc
