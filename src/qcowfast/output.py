"""Conversion destinations: where the bytes go and how they are published.

A path destination is one of
- a new or existing regular file (through a symlink: the link's target): written to a temporary
  file beside it (``.NAME.XXXX.qcowfast-tmp``) that is renamed over it only when complete; a
  replaced file keeps its mode, owner and extended attributes (hard links to the old file keep
  the old contents, as with any rename);
- a block device, or any existing target with ``existing=True`` (qemu-img -n): written in place,
  never renamed over or truncated, after checking that it holds the whole image.
FIFOs, character devices, "-" and file objects are streams (see `stream_target`).

`FileOutput` is a context manager: leaving it without `commit` (any exception, including
KeyboardInterrupt) closes and removes the temporary file in ``finally``.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterable

from .errors import OutputError, QcowError, UnsafePathError
from .locks import hold_destination

TMP_SUFFIX = ".qcowfast-tmp"
LOCKED_AT_BIRTH = "l"       # starts the random part of a temporary name that was locked before
                            # it had a name ("l" is no hex digit)
TEMP_RANDOM_BYTES = 6       # the random part: this many bytes in lowercase hex
_HEX = frozenset("0123456789abcdef")
# Errors that can only come from the output side; others are left to the reader's handling.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_BLKZEROOUT = 0x127F                   # _IO(0x12, 127): zero a byte range of a block device
_ZERO_CHUNK = 1 << 20
FRESH_SECONDS = 2.0                     # a temporary file named before it was locked is left
                                        # alone this long (see sweep_stale_temps)
# linux/fs.h: FS_IOC_GETFLAGS/SETFLAGS (_IOR/_IOW('f', 1/2, long)) and the btrfs NOCOW flag
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_NOCOW_FL = 0x80086601, 0x40086602, 0x00800000
_libc = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    import ctypes                       # only here: importing it costs every process 2 ms
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mkstemp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """(fd, path) of a new file, mode 0600, created exclusively in `directory` (as
    tempfile.mkstemp, whose import costs a process 4 ms)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(TEMP_RANDOM_BYTES).hex()}{suffix}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)


def _locked_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """(fd, path) of a new file in `directory`, mode 0600, holding an exclusive flock.

    Where the file system has O_TMPFILE, the file is locked before it gets its name (linked in
    from /proc/self/fd), so a sweeper that can lock a temporary file knows it is an orphan;
    those names start their random part with LOCKED_AT_BIRTH. Elsewhere (NFS, FUSE) the file
    is created, then locked: the sweeper leaves such files alone while they are young.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        fd = -1
    if fd >= 0:
        dir_fd = -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            for _ in range(100):
                name = f"{prefix}{LOCKED_AT_BIRTH}{os.urandom(TEMP_RANDOM_BYTES).hex()}{suffix}"
                try:
                    # linkat(AT_SYMLINK_FOLLOW): os.link only uses linkat when given a dir_fd.
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd)
                    return fd, os.path.join(directory, name)
                except FileExistsError:
                    continue
        except OSError:
            pass                            # no /proc, or links refused: the plain way
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        os.close(fd)
    fd, path = _mkstemp(directory, prefix, suffix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def set_nocow(fd: int) -> bool:
    """Set the no-copy-on-write attribute (chattr +C) on the empty file `fd`, as qemu-img's
    nocow=on does (file-posix raw_co_create): an optimisation whose failure is ignored, on file
    systems without the attribute (ext4, tmpfs, XFS). Returns whether it was set."""
    flags = bytearray(4)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags, sys.byteorder) | _FS_NOCOW_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, value.to_bytes(4, sys.byteorder))
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
    except OSError:
        return False
    return bool(int.from_bytes(flags, sys.byteorder) & _FS_NOCOW_FL)


def sweep_stale_temps(dst: str) -> list[str]:
    """Remove temporary outputs a killed run left beside `dst`; return the removed paths.

    A conversion holds an exclusive flock on its temporary file while it writes, so a file that
    can be locked is no one's: it was left by a process that died.
    """
    return sweep_stale_temps_of([dst])


def sweep_stale_temps_of(dsts: Iterable[str], listings: dict | None = None) -> list[str]:
    """`sweep_stale_temps` for many destinations, listing each directory once (a batch of N
    outputs in one directory would otherwise list it N times).

    `listings` ({directory: temp_names(directory)}) keeps the listings for later calls (a Dask
    worker's tasks of one batch): a temporary file created after a directory was listed is
    then not seen, which is right for the batch's own live ones."""
    owners: dict[str, set[str]] = {}    # directory: prefixes of the temporary names it may hold
    for dst in dsts:
        if not dst or dst.endswith(os.sep) or "\0" in dst:
            continue                    # names no file (the job fails): nothing of it to sweep
        for name in {os.path.abspath(dst), os.path.realpath(dst)}:   # a symlink's target's too
            owners.setdefault(os.path.dirname(name), set()).add(
                temp_prefix(os.path.basename(name)))
    candidates = {}
    for directory, prefixes in owners.items():
        names = listings.get(directory) if listings is not None else None
        if names is None:
            names = temp_names(directory)
            if listings is not None:
                listings[directory] = names
        for prefix in prefixes:
            for entry, born_locked in names.get(prefix, ()):
                candidates[os.path.join(directory, entry)] = born_locked
    removed = []
    for path, born_locked in sorted(candidates.items()):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue                # (a FIFO or device by that name: not ours)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A file that got its name already locked (_locked_temp: O_TMPFILE, flock, link) is
            # no one's as soon as it can be locked. Others were named first and locked after:
            # leave those younger than that gap.
            if born_locked or time.time() - os.fstat(fd).st_mtime >= FRESH_SECONDS:
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass                      # held by a live conversion, or already gone
        finally:
            os.close(fd)
    return removed


NAME_MAX = 255                  # bytes in a file name (Linux file systems)


def temp_prefix(basename: str) -> str:
    """The start of the temporary names of an output named `basename`: ".NAME.", or for a
    name too long to leave room for the rest of a temporary name within NAME_MAX bytes, as
    much of its start as fits, "~" and a digest of the whole name."""
    prefix = f".{basename}."
    room = NAME_MAX - len(LOCKED_AT_BIRTH) - 2 * TEMP_RANDOM_BYTES - len(TMP_SUFFIX)
    if len(os.fsencode(prefix)) <= room:
        return prefix
    import hashlib
    digest = hashlib.sha256(os.fsencode(basename)).hexdigest()[:16]
    head = os.fsencode(basename)[:room - len(digest) - 3]
    while head and head[-1] & 0xC0 == 0x80:        # not in the middle of a UTF-8 character
        head = head[:-1]
    if head and head[-1] >= 0xC0:
        head = head[:-1]
    return f".{os.fsdecode(head)}~{digest}."


def temp_names(directory: str) -> dict[str, list[tuple[str, bool]]]:
    """The temporary-file names in `directory`, by owner prefix (".NAME."): [(entry,
    locked_at_birth)]. Only names _locked_temp gives count: ".NAME." + a random part
    (TEMP_RANDOM_BYTES in hex, after LOCKED_AT_BIRTH for files locked before they had a name) +
    TMP_SUFFIX; anything else beside a destination is someone's file. {} when it cannot be
    listed."""
    by_owner: dict[str, list[tuple[str, bool]]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return by_owner
    for entry in names:
        if not entry.endswith(TMP_SUFFIX):
            continue
        cut = entry.rfind(".", 0, len(entry) - len(TMP_SUFFIX)) + 1     # the owner's prefix ends
        if not cut:
            continue
        rand = entry[cut:len(entry) - len(TMP_SUFFIX)]
        born_locked = rand.startswith(LOCKED_AT_BIRTH)
        digits = rand[len(LOCKED_AT_BIRTH):] if born_locked else rand
        if len(digits) == 2 * TEMP_RANDOM_BYTES and _HEX.issuperset(digits):
            by_owner.setdefault(entry[:cut], []).append((entry, born_locked))
    return by_owner


class temps_swept:
    """Within it, this thread's FileOutput for `dst` does not sweep again: the caller has just
    swept (a batch sweeps all its destinations at once). Through a symlink, FileOutput writes
    beside the link's target, and sweeps there again (no realpath here: it costs an lstat per
    path component)."""

    def __init__(self, dst: str):
        self.names = {os.path.abspath(dst)}

    def __enter__(self) -> None:
        self.outer = getattr(_swept, "names", frozenset())
        _swept.names = self.names

    def __exit__(self, *exc) -> None:
        _swept.names = self.outer


_swept = threading.local()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for a moment
    under every other thread's file creation)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)                  # kernels before 4.7: the old way
    os.umask(mask)
    return mask


def aligned_empty(size: int, align: int = 4096):
    """An uninitialised uint8 buffer whose address is a multiple of `align` (for O_DIRECT)."""
    import numpy as np
    raw = np.empty(size + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + size]


def _identities(st: os.stat_result) -> set:
    ids = {(st.st_dev, st.st_ino)}
    if stat.S_ISBLK(st.st_mode):
        ids.add(("blk", st.st_rdev))       # the same device under another node
    return ids


def chain_ids(image) -> set:
    """Identities of every file the image and its chain read."""
    ids = set()
    for layer in image.chain:
        for fd in {getattr(layer, "data_fd", -1), getattr(layer, "_fd", -1)}:
            if fd >= 0:
                ids |= _identities(os.fstat(fd))
    return ids


def _sysfs(dev: int) -> str | None:
    path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _device_holds_chain(st: os.stat_result, image) -> bool:
    """True when block device `st` holds a file of the chain: the same disk, a partition of it
    or the disk of a partition (also the device of a chain file's filesystem), or a loop
    device backed by a chain file."""
    mine = _sysfs(st.st_rdev)
    if mine is None:
        return False
    ids = chain_ids(image)
    try:
        with open(os.path.join(mine, "loop", "backing_file")) as f:
            if _identities(os.stat(f.read().rstrip("\n"))) & ids:
                return True
    except OSError:
        pass
    for layer in image.chain:
        for fd in {getattr(layer, "data_fd", -1), getattr(layer, "_fd", -1)}:
            if fd < 0:
                continue
            cst = os.fstat(fd)
            for dev in {cst.st_dev} | ({cst.st_rdev} if stat.S_ISBLK(cst.st_mode) else set()):
                other = _sysfs(dev)
                if other is not None and (other == mine or other.startswith(mine + "/")
                                          or mine.startswith(other + "/")):
                    return True
    return False


def check_not_source(st: os.stat_result, image, name: str) -> None:
    """OutputError when `st` is a file of the image's chain, or a device holding one."""
    if _identities(st) & chain_ids(image) or (
            stat.S_ISBLK(st.st_mode) and _device_holds_chain(st, image)):
        raise OutputError(f"{name} is the source image or a file of its backing chain, or "
                          "holds one; refusing to write over it")


def refuse_nul(name: str) -> None:
    """UnsafePathError when the destination `name` holds a NUL byte (os would raise a bare
    "embedded null byte" ValueError); the name is shown escaped, as for every path argument."""
    if "\0" in name:
        raise UnsafePathError(f"destination path {name!r} contains a NUL byte, which no file "
                              "name can hold")


def stream_target(dst):
    """A file object (or a FIFO / character device path) to stream into, or None when dst is a
    path to write as a file or block device. UnsafePathError for a name with a NUL byte."""
    if isinstance(dst, str) and dst == "-":
        return sys.stdout.buffer
    if hasattr(dst, "write"):
        return dst
    if isinstance(dst, (str, bytes, os.PathLike)):
        refuse_nul(os.fsdecode(os.fspath(dst)))
    try:
        st = os.stat(dst)
    except OSError:
        return None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return os.fspath(dst)
    return None


def open_stream(path: str, name: str):
    """Open the FIFO or character device `path` for writing (an unbuffered binary file).

    Opening a FIFO waits for its reader. Within a batch (lending.INTERRUPTED set) the wait is
    made of short naps between non-blocking opens (ENXIO: no reader yet), so that an
    interrupted batch stops waiting; elsewhere it is one blocking open, which signals
    interrupt."""
    from .lending import INTERRUPTED
    interrupted = INTERRUPTED.get()
    try:
        if interrupted is None:
            return open(path, "wb", buffering=0)
        nap = 0.002
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                # ENXIO is also a device without its hardware: wait only for a FIFO's reader.
                if exc.errno != errno.ENXIO or not stat.S_ISFIFO(os.stat(path).st_mode):
                    raise
                interrupted()
                time.sleep(nap)
                nap = min(2 * nap, 0.1)
                continue
            os.set_blocking(fd, True)
            return open(fd, "wb", buffering=0)
    except OSError as exc:
        raise OutputError(f"cannot open {name}: {exc.strerror}") from None


def check_stream(out, image, name: str) -> None:
    """Refuse a stream that is a terminal or a file of the source chain (`convert src - 1<>src`),
    a text stream, or one not open for writing."""
    if isinstance(out, io.TextIOBase):
        raise OutputError(f"{name} is a text stream; image data needs a binary one (open it "
                          "with 'wb')")
    writable = getattr(out, "writable", None)
    try:
        refused = writable is not None and not writable()
    except ValueError:                          # closed
        refused = True
    if refused:
        raise OutputError(f"{name} is not open for writing")
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return                       # BytesIO and friends: no file behind them
    if os.isatty(fd):
        raise OutputError(f"{name} is a terminal; refusing to write binary image data to it")
    check_not_source(os.fstat(fd), image, name)


def free_bytes(directory: str) -> int | None:
    """Bytes we may still allocate on the filesystem holding `directory` (root may use the
    blocks reserved for it)."""
    try:
        sv = os.statvfs(directory)
    except OSError:
        return None
    return (sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize


def open_errno(name: str, create: bool = True) -> int | None:
    """The errno with which qemu-img's open of output `name` fails, as far as looking tells
    without opening anything; None where it would succeed. file-posix opens it O_RDWR,
    following symlinks, with O_CREAT where it creates the file (raw_co_create(); not with -n:
    `create` False). An empty name is ENOENT, as open("") fails (raw_co_create() on
    qemu-img convert SRC ''). UnsafePathError for a name with a NUL byte."""
    refuse_nul(name)
    if not name:
        return errno.ENOENT
    if create and name.endswith("/") and name.strip("/"):
        parent = os.path.dirname(name.rstrip("/")) or "."
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                return errno.ENOTDIR        # (the path's walk fails before the last name)
        except OSError as exc:
            return exc.errno
        return errno.EISDIR               # (O_CREAT with a trailing slash: even for a file)
    try:
        st = os.stat(name)
    except OSError as exc:
        if not create or exc.errno != errno.ENOENT:
            return exc.errno
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return errno.EISDIR
        if stat.S_ISSOCK(st.st_mode):
            return errno.ENXIO
        return _write_errno(name, os.W_OK)
    # A new file (or a dangling symlink's target): made in the directory it is reached through.
    target = os.path.realpath(name) if os.path.islink(name) else name
    directory = os.path.dirname(target) or "."
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            return errno.ENOTDIR
    except OSError as exc:
        return exc.errno
    return _write_errno(directory, os.W_OK | os.X_OK)


def create_refusal(name: str) -> str | None:
    """qemu-img's words when it cannot create output `name` ("Could not create 'NAME':
    REASON", after "NAME: error while converting FMT: "), else None."""
    err = open_errno(name)
    return None if err is None else f"Could not create '{name}': {os.strerror(err)}"


def _write_errno(path: str, mode: int) -> int | None:
    if os.access(path, mode, effective_ids=os.access in os.supports_effective_ids):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        pass
    return errno.EACCES


class FileOutput:
    """A path destination being written (see the module docstring for the rules).

    Parameters
    ----------
    dst : path
        The destination as the caller named it (used in every message).
    image
        The opened source: its chain is never written over.
    overwrite : bool
        Replace an existing regular file; needed (or `existing`) to write over a block device.
    existing : bool
        Write into the existing target in place (qemu-img -n).
    direct : bool
        Open the output with O_DIRECT (OutputError where the filesystem refuses it).
    nocow : bool
        Give a new file the no-copy-on-write attribute where the file system has it (btrfs).
    format : str, optional
        The image format written, named in qemu-img's words for an output that cannot be
        created ("DST: error while converting FMT: Could not create 'DST': REASON").

    Attributes
    ----------
    fd : int
        The descriptor to fill.
    in_place : bool
        The target itself is written (block device or `existing`); it is never truncated.
    block : bool
        The target is a block device.
    """

    def __init__(self, dst, image, *, overwrite: bool = False, existing: bool = False,
                 direct: bool = False, nocow: bool = False, format: str | None = None):
        self.name = os.fspath(dst)
        if isinstance(self.name, bytes):
            self.name = os.fsdecode(self.name)
        refuse_nul(self.name)
        self.overwrite = overwrite
        self.direct = direct
        self.nocow = nocow
        self.format = format
        self.fd = -1
        self.tmp = None
        self.old = None                     # stat of a regular file being replaced
        self._guard = -1                    # that file, locked as QEMU's writers lock it
        self.block = False
        self.in_place = False
        self.path = self.name               # what is renamed over / opened
        self._check(image, existing)

    # -- deciding what the destination is ---------------------------------------------------

    def _check(self, image, existing: bool) -> None:
        name = self.name
        try:
            lst = os.lstat(name)
        except FileNotFoundError:
            lst = None
        except OSError as exc:
            raise self._refused(existing, exc.errno) from None  # qemu-img's open meets it too
        if lst is None:
            if existing:
                exc = OutputError(f"{name} does not exist; existing=True (-n) writes into an "
                                  "existing target")
                # qemu-img -n opens the target as an image: its bdrv_open() line.
                exc.qemu_chain = f"Could not open '{name}': No such file or directory"
                exc.qemu_top = name
                raise exc
            self._refuse_if(open_errno(name), existing)
            return
        try:
            st = os.stat(name)
        except FileNotFoundError:
            self._refuse_if(errno.ENOENT if existing else open_errno(name), existing)
            raise OutputError(f"{name} is a dangling symlink (to {os.readlink(name)}); "
                              "not writing through it") from None
        except OSError as exc:
            raise self._refused(existing, exc.errno) from None
        if stat.S_ISDIR(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            raise self._refused(existing, errno.EISDIR if stat.S_ISDIR(st.st_mode)
                                else errno.ENXIO)
        check_not_source(st, image, name)
        if stat.S_ISBLK(st.st_mode):
            if not (self.overwrite or existing):
                raise OutputError(f"{name} is a block device; pass overwrite=True (--overwrite) "
                                  "or existing=True (-n) to write the image onto it")
            self.block = self.in_place = True
            return
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{name} is neither a regular file nor a block device")
        if existing:
            self._refuse_if(open_errno(name, create=False), existing)
            self.in_place = True
            return
        if not self.overwrite:
            raise OutputError(f"{name} exists; pass overwrite=True (--overwrite) to replace it")
        if stat.S_ISLNK(lst.st_mode):
            self.path = os.path.realpath(name)      # written through: the link stays
        self._refuse_if(open_errno(self.path), existing)
        if os.geteuid() != 0 and st.st_uid != os.geteuid():
            raise OutputError(f"{name} belongs to uid {st.st_uid}: replacing it would change "
                              "its owner; write it in place with existing=True (-n)")
        self._guard_old(st)
        self.old = st

    def _refuse_if(self, err: int | None, existing: bool) -> None:
        if err is not None:
            raise self._refused(existing, err)

    def _refused(self, existing: bool, err: int) -> OutputError:
        """The OutputError for a destination qemu-img cannot open either (errno `err`), in its
        words: with -n (`existing`) its bdrv_open() line ("Could not open 'DST': Could not
        open 'DST': REASON", in qemu_chain), else its create error (in `unnamed`, for a
        caller to put after "DST: ")."""
        name, why = self.name, os.strerror(err)
        if existing:
            exc = OutputError(f"cannot open {name}: {why}")
            exc.qemu_chain, exc.qemu_top = f"Could not open '{name}': {why}", name
            return exc
        words = f"Could not create '{name}': {why}"
        if self.format is not None:
            words = f"error while converting {self.format}: {words}"
        exc = OutputError(f"{name}: {words}")
        exc.unnamed = words
        return exc

    def _guard_old(self, st) -> None:
        """Lock the file about to be replaced as a QEMU writer would, until it is replaced (or
        the conversion ends): a QEMU using it is refused now (it would go on writing into a
        file no longer there), and one starting meanwhile cannot open it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return                          # (unreadable: QEMU could not use it either)
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
                raise OutputError(f"{self.name} changed while it was being checked; not "
                                  "replaced")
            hold_destination(fd, self.name, in_place=False)
        except BaseException as exc:
            os.close(fd)
            lock = getattr(exc, "qemu_lock", None)
            if lock is not None and self.format is not None:
                exc.unnamed = f"error while converting {self.format}: {lock}"
            raise
        self._guard = fd

    def _release_guard(self) -> None:
        if self._guard >= 0:
            os.close(self._guard)
            self._guard = -1

    # -- opening ------------------------------------------------------------------------------

    def __enter__(self) -> "FileOutput":
        try:
            if self.in_place:
                self._open_in_place()
            else:
                self._open_temp()
            if self.direct:
                self.set_direct(True)
        except BaseException:
            self._cleanup()
            raise
        return self

    def _open_temp(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.abspath(self.path) not in getattr(_swept, "names", ()):
            sweep_stale_temps(self.path)    # what a killed conversion to it left behind
        # The flock is held until the file is published or removed: a temporary file nobody
        # holds was left by a killed run (fleet.sweep_stale_temps removes those).
        try:
            self.fd, self.tmp = _locked_temp(directory, temp_prefix(os.path.basename(self.path)),
                                             TMP_SUFFIX)
        except OSError as exc:
            if self.old is None:            # a new file: qemu-img could not create it either
                raise self._refused(False, exc.errno) from None
            raise OutputError(f"cannot create a temporary file beside {self.name} in "
                              f"{directory}: {exc.strerror}") from None
        if self.nocow:
            set_nocow(self.fd)              # before any data: btrfs applies it to empty files

    def _open_in_place(self) -> None:
        # Read access too, as qemu-img opens its target: QEMU's locks are shared (read) locks.
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.block:
            flags |= os.O_EXCL            # refused while mounted or held by another exclusive user
        try:
            self.fd = os.open(self.name, flags)
        except OSError as exc:
            why = ("it is in use (mounted, or held by another program)"
                   if exc.errno == errno.EBUSY else exc.strerror)
            raise OutputError(f"cannot open {self.name} for writing: {why}") from None
        hold_destination(self.fd, self.name, in_place=True)

    def set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise OutputError(f"{self.name}: the filesystem does not support O_DIRECT "
                                  "(direct=True, -t none)") from None
            raise

    # -- sizing -------------------------------------------------------------------------------

    def target_size(self) -> int:
        """Size of an in-place target (bytes of the device or file)."""
        if self.block:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def prepare(self, vsize: int, allocate: bool) -> None:
        """Make the output ready for `vsize` bytes of raw image.

        A temporary file is sized (and its blocks allocated when `allocate`, after checking
        the free space); an in-place target must already hold `vsize` bytes (qemu-img -n:
        "output file is smaller than input file"); a larger one keeps its tail.
        """
        if self.in_place:
            size = self.target_size()
            if size < vsize:
                raise OutputError(f"{self.name} ({size} bytes) is smaller than the image "
                                  f"({vsize} bytes); nothing was written")
            return
        if allocate and vsize:
            self.check_space(vsize)
        try:
            os.ftruncate(self.fd, vsize)
            if allocate and vsize:
                os.posix_fallocate(self.fd, 0, vsize)
        except OSError as exc:
            raise OutputError(f"cannot size {self.name} to {vsize} bytes: "
                              f"{exc.strerror}") from None

    def check_space(self, needed: int) -> None:
        """OutputError when the filesystem certainly cannot take `needed` more bytes."""
        directory = os.path.dirname(os.path.abspath(self.path))
        free = free_bytes(directory)
        if free is not None and needed > free:
            raise OutputError(f"{self.name} needs {needed} bytes but the filesystem of "
                              f"{directory} has {free} bytes free; nothing was written")

    def allocated(self) -> int:
        """Bytes of storage the output file occupies now (0 for a block device)."""
        if self.block:
            return 0
        return os.fstat(self.fd).st_blocks * 512

    # -- writing --------------------------------------------------------------------------------

    def pwrite(self, view, offset: int) -> None:
        """Write all of `view` at `offset`; with O_DIRECT, a piece the device cannot take
        directly (unaligned) is written through the page cache."""
        while len(view):
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self.set_direct(False)
                try:
                    n = os.pwrite(self.fd, view, offset)
                finally:
                    self.set_direct(True)
            view = view[n:]
            offset += n

    def zero_range(self, start: int, end: int, keep_allocated: bool) -> None:
        """Make [start, end) of an in-place target read as zeros.

        Files: FALLOC_FL_PUNCH_HOLE, as qemu-img's write-zeroes does, or written zeros when
        `keep_allocated` (qemu-img -S 0 writes them: a zeroed range only preallocated reads
        as a hole to SEEK_DATA); block devices: BLKZEROOUT; else written zeros.
        """
        if end <= start:
            return
        try:
            if self.block:
                if start % 512 == 0 and end % 512 == 0:
                    fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("=QQ", start, end - start))
                    return
            elif not keep_allocated:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start,
                           end - start)
                return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise
        buf = aligned_empty(min(_ZERO_CHUNK, end - start))
        buf[:] = 0
        zeros = memoryview(buf)
        while start < end:
            n = min(len(zeros), end - start)
            self.pwrite(zeros[:n], start)
            start += n

    def error(self, exc: OSError) -> OutputError:
        """The OutputError for an OSError met while writing, naming the destination."""
        what = (f"{self.name} was written in place and is incomplete" if self.in_place
                else f"nothing was written to {self.name}")
        return OutputError(f"cannot write {self.name}: {exc.strerror} ({what})")

    # -- finishing ------------------------------------------------------------------------------

    def commit(self, fsync: bool = False, *, drop_cache: bool = False) -> None:
        """Flush (fsync when asked), give a new file its metadata and publish it."""
        if fsync or drop_cache:
            os.fsync(self.fd)
        if drop_cache:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if self.in_place:
            os.close(self.fd)
            self.fd = -1
            return
        self._copy_metadata()
        # The flock must outlive the publication (a sweep takes a lockable temporary file for
        # a dead run's), while close() must come first (it reports NFS's deferred write
        # errors): a duplicate descriptor keeps the lock over the rename.
        lock_fd = os.dup(self.fd)
        try:
            os.close(self.fd)
            self.fd = -1
            self._publish()
            self.tmp = None
        finally:
            os.close(lock_fd)

    def _copy_metadata(self) -> None:
        old = self.old
        if old is None:
            # A new file gets QEMU's mode (file-posix creates images 0644) under the umask.
            os.fchmod(self.fd, 0o644 & ~_umask())
            return
        try:
            new = os.fstat(self.fd)
            if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
                os.fchown(self.fd, old.st_uid, old.st_gid)
            os.fchmod(self.fd, stat.S_IMODE(old.st_mode))   # after chown, which clears set-id bits
        except OSError as exc:
            raise OutputError(f"cannot keep the owner and mode of {self.name}: "
                              f"{exc.strerror}; not replaced") from None
        try:
            names = os.listxattr(self.path)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise OutputError(f"cannot read the extended attributes of {self.name}: "
                              f"{exc.strerror}; not replaced") from None
        for attr in names:
            try:
                os.setxattr(self.fd, attr, os.getxattr(self.path, attr))
            except OSError as exc:
                # security.* (SELinux labels, capabilities) may be refused to us: the new file
                # then has the labels its directory gives it.
                if attr.startswith("security.") and exc.errno in (
                        errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    continue
                raise OutputError(f"cannot keep extended attribute {attr} of {self.name}: "
                                  f"{exc.strerror}; not replaced") from None

    def _publish(self) -> None:
        tmp, dst = self.tmp, self.path
        try:
            if self.overwrite:
                os.replace(tmp, dst)
                return
            try:
                os.link(tmp, dst)             # fails if dst appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputError(f"{self.name} appeared during the conversion; "
                                  "not replaced") from None
            except OSError:
                if os.path.lexists(dst):
                    raise OutputError(f"{self.name} appeared during the conversion; "
                                      "not replaced") from None
                os.rename(tmp, dst)
                return
            try:
                os.unlink(tmp)
            except OSError:
                # Published already: the temporary name is a second link to the complete
                # output. Tried once more; else a later sweep removes it (lockable once
                # this conversion has ended).
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        except OSError as exc:
            if isinstance(exc, QcowError):
                raise
            raise OutputError(f"cannot publish {self.name}: {exc.strerror}") from None

    def _cleanup(self) -> None:
        self._release_guard()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None

    def __exit__(self, *exc) -> None:
        self._cleanup()
