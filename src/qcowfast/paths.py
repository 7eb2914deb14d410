"""Opening files safely: the images the user names, and the files an image names.

A name stored in an image (backing file, external data file) is untrusted. It is followed,
whether absolute or relative, only when the file it reaches (symlinks included) lies inside the
image's own directory or inside a directory the caller allowed (backing_dirs=,
--allow-backing-dir). Protocol and `json:` prefixes and anything but a regular file are refused.
Anything else is an UnsafePathError naming the file and the option that would allow it.

The rule is checked on what was opened, not on a name looked up before opening: the file is
opened first (O_NONBLOCK, so a FIFO cannot block), then the descriptor's real path
(/proc/self/fd/N) and its fstat identity are checked, and that same descriptor is the one read.
A symlink swapped between the check and the read cannot redirect the read.

A relative name is looked up the way QEMU does (block.c bdrv_get_full_backing_filename(): the
name joined to the directory of the image's path as it was opened, symlinks in that path not
resolved), so a chain opened through a symlink finds the same files qemu-img finds. Relative
external data file names resolve the same way (qemu-img 7.2 uses the working directory).
"""
from __future__ import annotations

import errno
import os
import stat

from .errors import FormatError, ImageNotFound, ImageOpenError, MissingBackingFile, UnsafePathError

_OPEN_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class OpenedFile:
    """A file opened read-only by qcowfast: its descriptor, the name it was opened by, its size.

    `path` is the name used in messages (as the user or the image spelled it); `size` is st_size
    for a regular file and the device size (lseek SEEK_END) for a block device. Ownership of
    `fd` passes to whoever calls `detach()`; otherwise `close()` (or the context manager) closes it.
    """

    __slots__ = ("path", "fd", "st", "size")

    def __init__(self, path: str, fd: int, st: os.stat_result):
        self.path, self.fd, self.st = path, fd, st
        self.size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size

    @property
    def ident(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the opened file."""
        return self.st.st_dev, self.st.st_ino

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def detach(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.detach())

    def __enter__(self) -> "OpenedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_file(path, what: str = "image", *, owner: str | None = None,
              block_devices: bool = True) -> OpenedFile:
    """Open a file the caller named (an image, or an explicit backing=/data_file=) read-only.

    `what` and `owner` (the image naming the file, if any) word the messages, which name
    `path` as given. On exit the file is a regular file, or a block device when
    `block_devices`; FIFOs, sockets, directories and character devices are refused before any
    read (FormatError), and a FIFO never blocks the open (O_NONBLOCK). A missing file raises
    ImageNotFound (MissingBackingFile when `owner` is given: a file of a chain), any other
    failure to open ImageOpenError; both are also OSErrors with the original errno.
    """
    path = os.fsdecode(os.fspath(path))        # bytes names too (undecodable bytes escaped)
    name = f"{what} {path}" + (f" of {owner}" if owner else "")
    try:
        # stat first: a character device or socket is refused without being opened at all.
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or (block_devices and stat.S_ISBLK(mode))):
            raise FormatError(f"{name} is {_kind(mode)}, not a regular file"
                              + (" or block device" if block_devices else ""))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        cls = (MissingBackingFile if owner else ImageNotFound) if missing else ImageOpenError
        raise cls(f"{name} cannot be opened: {exc.strerror}", exc.errno, exc.strerror,
                  path) from None
    st = os.fstat(fd)
    mode = st.st_mode
    if not (stat.S_ISREG(mode) or (block_devices and stat.S_ISBLK(mode))):
        os.close(fd)                            # swapped since the stat
        raise FormatError(f"{name} is {_kind(mode)}, not a regular file")
    return OpenedFile(path, fd, st)


def has_protocol(name: str) -> bool:
    """True when QEMU would take `name` for a protocol (`json:`, `file:`, `nbd:`...).

    QEMU path_has_protocol(): a colon before the first slash.
    """
    head = name.split("/", 1)[0]
    return ":" in head


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _real_path(opened: OpenedFile) -> str | None:
    """Where the open file really is now, or None when it is no longer reachable there.

    The descriptor's /proc link names the file that was opened; the path found must still
    lead to that same file (fstat identity), which defeats renames and symlink swaps.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{opened.fd}")
    except OSError:
        real = ""
    if not real.startswith("/"):
        real = os.path.realpath(opened.path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real if (st.st_dev, st.st_ino) == opened.ident else None


def full_backing_filename(image_name: str, backing: str) -> str:
    """The backing file path qemu-img reports: `backing` joined to `image_name`'s directory.

    QEMU bdrv_get_full_backing_filename(): absolute names and protocol names stay as they
    are; a relative name replaces the last component of the image's name as given (".//top"
    keeps ".//").
    """
    if os.path.isabs(backing) or has_protocol(backing):
        return backing
    return image_name[:image_name.rfind("/") + 1] + backing


def directories(dirs) -> tuple[str, ...]:
    """`backing_dirs` as a tuple of str: an iterable of paths, or one path (str, bytes or
    os.PathLike: one directory, never the characters of its name)."""
    if isinstance(dirs, (str, bytes, os.PathLike)):
        dirs = (dirs,)
    try:
        return tuple(os.fsdecode(os.fspath(d)) for d in dirs)
    except TypeError:
        raise TypeError(f"backing_dirs must be a path or an iterable of paths, not "
                        f"{dirs!r}") from None


def resolve_reference(image_path, name: str, what: str, allowed_dirs=()) -> OpenedFile:
    """Open file `name` referenced by image `image_path` under the path policy, or raise.

    `what` is "backing file" or "external data file" (used in messages); `allowed_dirs` are
    extra directories the caller trusts (open(backing_dirs=...), --allow-backing-dir).

    On exit the returned OpenedFile holds a descriptor on a regular file that, when it was
    checked after opening, lay (all symlinks resolved) inside the real directory of
    `image_path` or inside the real path of one of `allowed_dirs`. Its `path` is `name` joined
    to the directory of `image_path`, as QEMU names it. The caller must read through that
    descriptor and close it.

    Raises UnsafePathError naming the file and the option that would allow it (also for a
    missing name that would lie outside); MissingBackingFile when the file does not exist;
    ImageOpenError when it exists but cannot be opened.
    """
    image_path = os.fsdecode(os.fspath(image_path))
    explicit = "backing=PATH" if what == "backing file" else "data_file=PATH"
    hint = (f"pass backing_dirs=[DIR] (command line: --allow-backing-dir DIR) or name the file "
            f"explicitly with {explicit}")
    # No --allow-backing-dir admits these: the Python API's explicit argument does, and on the
    # command line, rewriting the name the image holds (qemu-img rebase -u / amend).
    rename = ("qemu-img rebase -u -b FILE -F FORMAT IMAGE" if what == "backing file"
              else "qemu-img amend -o data_file=FILE IMAGE")
    never = (f"name the file explicitly with {explicit} (Python API), or store a plain file "
             f"name in the image ({rename})")
    if not name:
        raise UnsafePathError(f"{what} name in {image_path} is empty")
    if "\0" in name:
        raise UnsafePathError(f"{what} name {name!r} in {image_path} contains a NUL byte")
    if has_protocol(name):
        raise UnsafePathError(f"{what} {name!r} named in {image_path} uses a protocol or json: "
                              f"prefix, which qcowfast never follows; {never}")
    image_dir = os.path.dirname(image_path)
    path = full_backing_filename(image_path, name)
    trusted = [os.path.realpath(image_dir or os.curdir)]
    trusted += [os.path.realpath(d) for d in directories(allowed_dirs)]

    def check_inside(real: str) -> None:
        if not any(_inside(real, d) for d in trusted):
            reason = ("is outside the image's directory" if os.path.isabs(name)
                      else "resolves outside the image's directory")
            raise UnsafePathError(f"{what} {name!r} named in {image_path} {reason} "
                                  f"{trusted[0]} (it is {real}); qcowfast does not follow it "
                                  f"by default; {hint}")

    try:
        opened = open_file(path, what, owner=image_path, block_devices=False)
    except FormatError as exc:
        # (exc: "backing file NAME of IMAGE is a directory, not a regular file")
        raise UnsafePathError(f"{exc}; qcowfast follows only regular files named in an "
                              f"image") from None
    except MissingBackingFile:
        try:
            real = os.path.realpath(path)
        except OSError:                        # the name changed under realpath (a race)
            raise UnsafePathError(f"{what} {name!r} named in {image_path} changed while it "
                                  "was being opened; refused") from None
        check_inside(real)                     # a name leading outside is refused as such
        raise
    try:
        real = _real_path(opened)
        if real is None:
            raise UnsafePathError(f"{what} {name!r} named in {image_path} changed while it was "
                                  f"being opened; refused")
        check_inside(real)
    except BaseException:
        opened.close()
        raise
    return opened


__all__ = ["OpenedFile", "directories", "full_backing_filename", "open_file",
           "resolve_reference", "has_protocol"]
