# cython: language_level=3
"""qemu-img map's JSON lines, merged and formatted in C from the runs' arrays.

A map of a fragmented image has millions of entries; building each line in Python cost 0.9 us
of the 1 us an entry took. One call here merges a chunk of runs the way qemu-img merges block
status answers (qemu-img.c entry_mergeable(): same depth and flags, host offsets both absent or
contiguous) and formats the entries it closes.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef enum:
    # Kinds of _classify.pxi (constants.ExtentKind)
    K_UNALLOCATED = 0
    K_ZERO = 1
    K_DATA = 2
    K_COMPRESSED = 3
    ROW_MAX = 200           # the longest line: five 20-digit numbers and the words around them

# MapState slots: the entry still open (LENGTH 0: none), and how many lines were written.
cdef enum:
    S_START = 0
    S_LENGTH = 1
    S_DEPTH = 2
    S_FLAGS = 3             # present 4, zero 2, data 1
    S_OFFSET = 4            # -1: none
    S_LINES = 5
    STATE_SLOTS = 6


cdef inline char *put(char *p, const char *s, Py_ssize_t n) noexcept nogil:
    memcpy(p, s, n)
    return p + n


cdef inline char *put_int(char *p, int64_t v) noexcept nogil:
    cdef char tmp[24]
    cdef int i = 0
    cdef unsigned long long u
    if v < 0:
        p[0] = b'-'
        p += 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        tmp[i] = <char>(48 + u % 10)
        i += 1
        u //= 10
        if u == 0:
            break
    while i:
        i -= 1
        p[0] = tmp[i]
        p += 1
    return p


cdef inline char *put_bool(char *p, int64_t b) noexcept nogil:
    if b:
        return put(p, b"true", 4)
    return put(p, b"false", 5)


cdef char *put_row(char *p, int64_t *st) noexcept nogil:
    """The open entry as one JSON object, after the ",\n" separating it from the one before."""
    if st[S_LINES]:
        p = put(p, b",\n", 2)
    st[S_LINES] += 1
    p = put(p, b'{ "start": ', 11)
    p = put_int(p, st[S_START])
    p = put(p, b', "length": ', 12)
    p = put_int(p, st[S_LENGTH])
    p = put(p, b', "depth": ', 11)
    p = put_int(p, st[S_DEPTH])
    p = put(p, b', "present": ', 13)
    p = put_bool(p, st[S_FLAGS] & 4)
    p = put(p, b', "zero": ', 10)
    p = put_bool(p, st[S_FLAGS] & 2)
    p = put(p, b', "data": ', 10)
    p = put_bool(p, st[S_FLAGS] & 1)
    if st[S_OFFSET] >= 0:
        p = put(p, b', "offset": ', 12)
        p = put_int(p, st[S_OFFSET])
    return put(p, b"}", 1)


def new_state():
    """A state for json_lines: no entry open, no line written."""
    return bytearray(8 * STATE_SLOTS)


def json_lines(const int64_t[::1] guest, const int64_t[::1] length, const uint8_t[::1] kind,
               const int64_t[::1] host, const int64_t[::1] depth, state):
    """Merge the runs into the entry open in `state` and the ones after it, and return the
    entries this closes as JSON lines (each after ",\\n" but the first of all), as bytes."""
    cdef int64_t[::1] st = memoryview(state).cast("q")
    cdef Py_ssize_t n = guest.shape[0], i
    cdef int64_t flags, off
    cdef uint8_t k
    cdef char *buf
    cdef char *p
    if st.shape[0] != STATE_SLOTS:
        raise ValueError("bad map state")
    if length.shape[0] != n or kind.shape[0] != n or host.shape[0] != n or depth.shape[0] != n:
        raise ValueError("run arrays differ in length")
    buf = <char *>malloc((n + 1) * ROW_MAX)
    if buf == NULL:
        raise MemoryError()
    p = buf
    with nogil:
        for i in range(n):
            k = kind[i]
            flags = ((k != K_UNALLOCATED) * 4 + (k == K_ZERO or k == K_UNALLOCATED) * 2
                     + (k == K_DATA or k == K_COMPRESSED))
            off = host[i] if host[i] >= 0 and k != K_COMPRESSED else -1
            if st[S_LENGTH]:
                if st[S_DEPTH] == depth[i] and st[S_FLAGS] == flags \
                        and (st[S_OFFSET] < 0) == (off < 0) \
                        and (off < 0 or st[S_OFFSET] + st[S_LENGTH] == off):
                    st[S_LENGTH] += length[i]
                    continue
                p = put_row(p, &st[0])
            st[S_START] = guest[i]
            st[S_LENGTH] = length[i]
            st[S_DEPTH] = depth[i]
            st[S_FLAGS] = flags
            st[S_OFFSET] = off
    try:
        return PyBytes_FromStringAndSize(buf, p - buf)
    finally:
        free(buf)


def json_last(state):
    """The line of the entry still open in `state` (b"" when none), closing it."""
    cdef int64_t[::1] st = memoryview(state).cast("q")
    cdef char buf[ROW_MAX]
    cdef char *p = buf
    if st.shape[0] != STATE_SLOTS:
        raise ValueError("bad map state")
    if st[S_LENGTH]:
        p = put_row(p, &st[0])
        st[S_LENGTH] = 0
    return PyBytes_FromStringAndSize(buf, p - buf)
