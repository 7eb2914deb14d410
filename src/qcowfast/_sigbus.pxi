# Reading file mappings whose file may shrink (_sigbus.h): included by the modules that read
# mappings; each installs its SIGBUS handler once, at import.
cdef extern from "_sigbus.h" nogil:
    ctypedef int (*qf_guarded_fn)(void *arg) noexcept nogil
    int qf_bus_install() noexcept
    int qf_bus_call(qf_guarded_fn fn, void *arg, const void *lo, size_t length,
                    int *faulted) noexcept

if qf_bus_install() != 0:
    raise OSError("cannot install the SIGBUS handler")
