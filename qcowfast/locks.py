"""QEMU's image locks: refuse to read an image a running QEMU holds open for writing.

QEMU (block/file-posix.c, raw_apply_lock_bytes()) takes OFD byte-range locks on every image
file it opens: one byte at RAW_LOCK_PERM_BASE (100) + i for each permission bit i it holds,
and one at RAW_LOCK_SHARED_BASE (200) + i for each bit it does not share with others.
qemu-img without -U opens read-only without sharing BLK_PERM_WRITE, so raw_check_lock_bytes()
refuses the file when another open file description holds byte 100 + 1 (BLK_PERM_WRITE is bit 1):
"Failed to get shared 'write' lock". qcowfast makes the same test, and while it reads a file
it holds the locks such a reader holds (`hold_read_locks`): byte 100 (CONSISTENT_READ, bit 0)
and byte 200 + 1 (WRITE not shared), so that a QEMU starting meanwhile cannot open the file
for writing ("Failed to get 'write' lock") and tear what is being read.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import ImageLocked, OutputError

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)      # Linux
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)      # Linux
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
BLK_PERM_CONSISTENT_READ_BIT = 0
BLK_PERM_WRITE_BIT = 1
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = -(-_FLOCK.size // 8) * 8               # with the C struct's tail padding


_NO_OFD_LOCKS = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF)


def _held(fd: int, byte: int) -> bool:
    """True when another open file description holds a lock on `byte` of `fd`'s file (False
    where the file system offers no OFD locks: QEMU's locking=auto then skips locking)."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0).ljust(_FLOCK_SIZE, b"\0")
    try:
        answer = fcntl.fcntl(fd, F_OFD_GETLK, query)
    except OSError as exc:
        if exc.errno in _NO_OFD_LOCKS:
            return False
        raise
    return _FLOCK.unpack(answer[:_FLOCK.size])[0] != fcntl.F_UNLCK


def write_locked(fd: int) -> bool:
    """True when another open file description holds QEMU's WRITE permission lock on `fd`."""
    return _held(fd, RAW_LOCK_PERM_BASE + BLK_PERM_WRITE_BIT)


_WRITE_PERM = RAW_LOCK_PERM_BASE + BLK_PERM_WRITE_BIT            # "I write"
_WRITE_UNSHARED = RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE_BIT      # "nobody else may write"


def check_writable(fd: int, name: str, shares_writing: bool = False) -> None:
    """Raise OutputError where qemu-img convert, writing `fd`'s file, fails with 'Failed to
    get "write" lock': another process refuses to share writing (byte 201: any QEMU reader
    without -U, most writers) or, unless the output `shares_writing` (qemu-img's raw output
    does, its qcow2 output does not), another process writes it (byte 101). Replacing or
    overwriting an image a running QEMU uses would lose its writes or tear what it reads."""
    if _held(fd, _WRITE_UNSHARED):
        lock = '"write" lock'                   # (qemu-img's words for each conflict)
    elif not shares_writing and _held(fd, _WRITE_PERM):
        lock = 'shared "write" lock'
    else:
        return
    raise OutputError(f"{name}: failed to get {lock}: another process (a running QEMU?) is "
                      "using the image; it was not written")


def hold_write_locks(fd: int, name: str, shares_writing: bool = False) -> None:
    """Take the locks of a QEMU writer on `fd` (held until the file description is closed),
    so that no QEMU opens the file in a conflicting way while it is written in place, then
    check_writable(): taken first, as QEMU's raw_handle_perm_lock() does, so that of two
    starting at once one sees the other."""
    _take(fd, (_WRITE_PERM,) if shares_writing else (_WRITE_PERM, _WRITE_UNSHARED))
    check_writable(fd, name, shares_writing)    # (a conflict when taking shows up here too)


def _take(fd: int, byte_list) -> bool:
    """Take shared locks on `byte_list` of `fd` as QEMU does; False when another open file
    description holds one of them exclusively (True where there are no OFD locks)."""
    for byte in byte_list:
        request = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0).ljust(_FLOCK_SIZE, b"\0")
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno in _NO_OFD_LOCKS:
                return True
            raise
    return True


def check_not_locked(fd: int, name: str) -> None:
    """Raise ImageLocked (naming `name` and -U / force_share=True) when `fd` is write-locked."""
    if write_locked(fd):
        raise ImageLocked(f'{name}: failed to get shared "write" lock: another process (a '
                          f"running QEMU?) has the image open for writing and a copy could be "
                          f"torn; pass -U (force_share=True) to read it anyway")


def hold_read_locks(fd: int, name: str) -> None:
    """Take QEMU's shared locks of a reader that does not share writing on `fd` (held until
    the file description is closed). Raises ImageLocked when a writer holds the file (its lock
    byte conflicts); does nothing where the file system offers no OFD locks."""
    if not _take(fd, (RAW_LOCK_PERM_BASE + BLK_PERM_CONSISTENT_READ_BIT,
                      RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE_BIT)):
        raise ImageLocked(f'{name}: failed to get shared "write" lock: another process holds '
                          "the image for writing; pass -U (force_share=True) to read it anyway")
