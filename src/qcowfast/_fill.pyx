# cython: language_level=3
"""Unit-filling kernels for conversion: read many data runs and zero many gaps per call.

Compiled because a fragmented image (512-byte clusters, alternating layers) puts thousands of
runs in one conversion unit: one C loop per unit, with the GIL released, replaces one Python
call per run.
"""
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memset
from libc.errno cimport errno, EINTR
from posix.unistd cimport pread


def pread_runs(const int64_t[::1] fds, const int64_t[::1] host, const int64_t[::1] dst_off,
               const int64_t[::1] length, buf):
    """Read run j from fds[j] at host[j] into buf[dst_off[j]:+length[j]], in order.

    Returns (-1, 0) when every run was read in full, else (j, errno) for the first run that
    came up short (errno 0: end of file).
    """
    cdef uint8_t[::1] d = memoryview(buf).cast("B")
    cdef Py_ssize_t n = fds.shape[0], j
    cdef int64_t size = d.shape[0], got, want, r
    cdef int err = 0
    if host.shape[0] != n or dst_off.shape[0] != n or length.shape[0] != n:
        raise ValueError("run arrays differ in length")
    for j in range(n):
        if dst_off[j] < 0 or length[j] < 0 or dst_off[j] > size - length[j] or host[j] < 0:
            raise ValueError(f"run {j} lies outside the buffer")
    j = 0
    with nogil:
        while j < n:
            got = 0
            want = length[j]
            while got < want:
                r = pread(<int>fds[j], &d[0] + dst_off[j] + got, <size_t>(want - got),
                          host[j] + got)
                if r < 0 and errno == EINTR:
                    continue
                if r <= 0:
                    err = errno if r < 0 else 0
                    break
                got += r
            if got < want:
                break
            j += 1
    if j < n:
        return j, err
    return -1, 0


def zero_ranges(buf, const int64_t[::1] starts, const int64_t[::1] ends):
    """Zero buf[starts[j]:ends[j]] for every j (empty ranges allowed)."""
    cdef uint8_t[::1] d = memoryview(buf).cast("B")
    cdef Py_ssize_t n = starts.shape[0], j
    cdef int64_t size = d.shape[0]
    if ends.shape[0] != n:
        raise ValueError("range arrays differ in length")
    for j in range(n):
        if starts[j] < 0 or ends[j] > size:
            raise ValueError(f"range {j} lies outside the buffer")
    with nogil:
        for j in range(n):
            if ends[j] > starts[j]:
                memset(&d[0] + starts[j], 0, <size_t>(ends[j] - starts[j]))
