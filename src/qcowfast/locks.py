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


BLK_PERM_RESIZE_BIT = 3
# What qemu-img convert's output conflicts with, in the order QEMU tests it, with its words.
# In place (-n), it only writes: another process must not refuse to share writing. Creating
# the file, it also resizes, and qcowfast replaces the file (a rename): it must not be in use
# for writing or resizing either (qemu-img tolerates a raw writer that shares writing, and
# writes into the file beside it; qcowfast's new file would take none of that writer's data).
_IN_PLACE = ((RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE_BIT, '"write" lock'),)
_REPLACE = ((RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE_BIT, '"write" lock'),
            (RAW_LOCK_SHARED_BASE + BLK_PERM_RESIZE_BIT, '"resize" lock'),
            (RAW_LOCK_PERM_BASE + BLK_PERM_WRITE_BIT, 'shared "write" lock'),
            (RAW_LOCK_PERM_BASE + BLK_PERM_RESIZE_BIT, 'shared "resize" lock'))


def check_destination(fd: int, name: str, in_place: bool) -> None:
    """Raise OutputError when another process (a running QEMU?) uses `fd`'s file in a way
    that forbids writing it in place (`in_place`) or replacing it: QEMU's lock bytes, tested
    as qemu-img convert tests its output ('Failed to get "write" lock'). Writing an image a
    QEMU uses would tear what it reads; replacing it would lose its writes."""
    for byte, lock in _IN_PLACE if in_place else _REPLACE:
        if _held(fd, byte):
            exc = OutputError(f"{name}: failed to get {lock}: another process (a running "
                              "QEMU?) is using the image; it was not written")
            # qemu-img's words (raw_check_lock_bytes()): its open of the target fails in
            # place; creating it, the create step does (output.FileOutput adds the format).
            exc.qemu_lock = f"Failed to get {lock}"
            exc.qemu_hint = f"Is another process using the image [{name}]?"
            if in_place:
                exc.qemu_chain, exc.qemu_top = exc.qemu_lock, name
            raise exc


def hold_destination(fd: int, name: str, in_place: bool) -> None:
    """Take a QEMU writer's locks on `fd` (kept until the file description is closed), so
    that no QEMU starts using the file while it is written in place or until it is replaced,
    then check_destination(): taken first, as QEMU's raw_handle_perm_lock() does, so that of
    two starting at once one sees the other. `fd` must be open for reading."""
    _take(fd, [RAW_LOCK_PERM_BASE + BLK_PERM_WRITE_BIT] if in_place else
          [byte for byte, _ in _REPLACE])
    check_destination(fd, name, in_place)


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
        raise _locked(name, "another process (a running QEMU?) has the image open for writing "
                            "and a copy could be torn")


def hold_read_locks(fd: int, name: str) -> None:
    """Take QEMU's shared locks of a reader that does not share writing on `fd` (held until
    the file description is closed). Raises ImageLocked when a writer holds the file (its lock
    byte conflicts); does nothing where the file system offers no OFD locks."""
    if not _take(fd, (RAW_LOCK_PERM_BASE + BLK_PERM_CONSISTENT_READ_BIT,
                      RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE_BIT)):
        raise _locked(name, "another process holds the image for writing")


def _locked(name: str, why: str) -> ImageLocked:
    """ImageLocked for `name`, with the lines qemu-img prints (raw_check_lock_bytes())."""
    exc = ImageLocked(f'{name}: failed to get shared "write" lock: {why}; pass -U '
                      "(force_share=True) to read it anyway")
    exc.qemu_chain, exc.qemu_top = 'Failed to get shared "write" lock', name
    exc.qemu_hint = f"Is another process using the image [{name}]?"
    return exc
