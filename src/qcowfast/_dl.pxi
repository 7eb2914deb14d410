# Shared by the codec kernels (`include "_dl.pxi"`): resolve C functions of a codec library from
# the extension module of the Python package that ships it (the wheels ship no headers).

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    const char *dlerror()
    int RTLD_NOW
    int RTLD_LOCAL


cdef void *_open_module(modules, what) except NULL:
    """dlopen the first importable extension module of `modules`; CodecUnavailable if none."""
    cdef void *handle = NULL
    tried = []
    for name in modules:
        try:
            path = importlib.import_module(name).__file__
        except ImportError as exc:
            tried.append(f"{name}: {exc}")
            continue
        handle = dlopen(path.encode(), RTLD_NOW | RTLD_LOCAL)
        if handle != NULL:
            return handle
        tried.append(f"{name}: {dlerror().decode(errors='replace')}")
    raise CodecUnavailable(f"cannot load the {what} library ({'; '.join(tried)}); "
                           f"install the package that provides it")


cdef void *_sym(void *handle, const char *name, what) except NULL:
    """The address of C function `name`; CodecUnavailable if the library lacks it."""
    cdef void *fn = dlsym(handle, name)
    if fn == NULL:
        raise CodecUnavailable(f"the {what} library does not export {name.decode()}")
    return fn
