# L2 entry rules shared by the table kernels (_tables.pyx, with numpy) and the numpy-free copy
# of uncompressed chains (_plain.pyx): both `include` this file, so every path classifies an
# entry by the same code. Kinds, error codes, flags, masks; emit(), classify_loop() and
# _block_nonzero() are pure C over raw pointers (nogil).
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
                         int64_t csize, int64_t *o_guest, int64_t *o_len,
                         uint8_t *o_kind, int64_t *o_host, int64_t *o_csize) noexcept nogil:
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
                           int64_t *o_guest, int64_t *o_len, uint8_t *o_kind,
                           int64_t *o_host, int64_t *o_csize,
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

