"""Opening files safely: the images the user names, and the files an image names.

A name stored in an image (backing file, external data file) is untrusted. It is followed,
whether absolute or relative, only when the file it reaches (symlinks included) lies inside the
image's own directory or inside a directory the caller allowed (backing_dirs=,
--allow-backing-dir). Protocol and `json:` prefixes and anything but a regular file are refused.
Anything else is an UnsafePathError naming the file and the option that would allow it (the
real path it reaches, however long). The allowed directories are resolved once per open
(directories()), so a relative one means the same directory for every layer of a chain.

The rule is checked on what was opened, never on a path looked up again. An image is opened
relative to a descriptor on its directory (open_file(keep_dir=True)), and the names it holds are
looked up from that descriptor: the directory as the image was reached, even if a symlink in
its path is repointed later. The directory that holds the file found (after its own symlinks)
is walked up through ".." to a trusted directory, compared by identity (st_dev, st_ino), and
the file is opened from it with O_NOFOLLOW (O_NONBLOCK, so a FIFO cannot block): the checked
descriptor is the one read. A symlink swapped meanwhile makes the open fail, never redirects it.

A relative name means what it means to QEMU (block.c bdrv_get_full_backing_filename(): the
name joined to the directory of the image's path as it was opened, symlinks in that path not
resolved), so a chain opened through a symlink finds the same files qemu-img finds, and
messages name files as qemu-img does. Relative external data file names resolve the same way
(qemu-img 7.2 uses the working directory).
"""
from __future__ import annotations

import errno
import os
import stat

from .errors import (
    FormatError, ImageNotFound, ImageOpenError, MissingBackingFile, QcowError, UnsafePathError,
)

_OPEN_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))
# A directory held only to look names up from (O_PATH: no permission to read it is needed).
_DIR_FLAGS = (getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY
              | getattr(os, "O_CLOEXEC", 0))
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK) | getattr(os, "O_CLOEXEC", 0)
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)    # (os.scandir)
_MAX_LINKS = 40                         # symlinks followed for one name (Linux MAXSYMLINKS)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class OpenedFile:
    """A file opened read-only by qcowfast: its descriptor, the name it was opened by, its size.

    `path` is the name used in messages (as the user or the image spelled it); `size` is st_size
    for a regular file and the device size (lseek SEEK_END) for a block device. `dir_fd`, when
    not -1, is an O_PATH descriptor on the directory the file was reached from (the names the
    file holds resolve from it: resolve_reference); `trust`, when not None, the (st_dev,
    st_ino) of the directory those names must lie in instead of dir_fd's (a file reached
    through a symlink outside the trusted directories). Ownership of `fd` passes to whoever calls
    `detach()`; `close()` (or the context manager) closes what is still held, `close_dir()`
    the directory alone.
    """

    __slots__ = ("path", "fd", "st", "size", "dir_fd", "trust")

    def __init__(self, path: str, fd: int, st: os.stat_result, dir_fd: int = -1,
                 trust: tuple[int, int] | None = None):
        self.path, self.fd, self.st, self.dir_fd = path, fd, st, dir_fd
        self.trust = trust
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

    def close_dir(self) -> None:
        if self.dir_fd >= 0:
            fd, self.dir_fd = self.dir_fd, -1
            os.close(fd)

    def close(self) -> None:
        self.close_dir()
        if self.fd >= 0:
            os.close(self.detach())

    def __enter__(self) -> "OpenedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _as_qemu_says(exc: QcowError, mode: int, path: str) -> QcowError:
    """`exc`, refusing file `path` of type `mode`, given qemu-img's words for that file where
    qemu-img refuses it too (file-posix.c raw_open_common(); the command line shows them, and
    the layers above prefix theirs: errors.in_chain): a directory, or a socket, whose open(2)
    fails with ENXIO. A character or block device qemu-img reads (its host_device driver), and
    on a FIFO its open(2) waits for a writer: those keep qcowfast's words alone."""
    if stat.S_ISDIR(mode):
        exc.qemu_chain = f"'file' driver requires '{path}' to be a regular file"
    elif stat.S_ISSOCK(mode):
        exc.qemu_chain = f"Could not open '{path}': {os.strerror(errno.ENXIO)}"
    else:
        return exc
    exc.qemu_top = path
    return exc


def _split(path: str) -> tuple[str, str]:
    """(directory, last component) of `path` as a lookup walks it: "a/b" -> ("a", "b"),
    "b" -> (".", "b"), "/b" -> ("/", "b"), "a/" -> ("a", ".")."""
    head, sep, tail = path.rpartition("/")
    return head or sep or ".", tail or "."


def _close(*fds: int) -> None:
    for fd in dict.fromkeys(fds):
        if fd >= 0:
            os.close(fd)


def open_file(path, what: str = "image", *, owner: str | None = None,
              block_devices: bool = True, keep_dir: bool = False) -> OpenedFile:
    """Open a file the caller named (an image, or an explicit backing=/data_file=) read-only.

    `what` and `owner` (the image naming the file, if any) word the messages, which name
    `path` as given. The file is opened from a descriptor on its directory; with `keep_dir`
    the returned OpenedFile keeps that descriptor (`dir_fd`: the directory as the file was
    reached, through a symlinked file: the link's), for resolve_reference. On exit the file is
    a regular file, or a block device when `block_devices`; FIFOs, sockets, directories and
    character devices are refused without being opened (FormatError): the file is found as an
    O_PATH descriptor, checked, and reopened through that descriptor. A missing file (or an
    empty name, errno ENOENT as os.open gives) raises ImageNotFound (MissingBackingFile when
    `owner` is given: a file of a chain), any other failure to open ImageOpenError; both are
    also OSErrors with the original errno. A name with a NUL byte is an UnsafePathError, as
    one stored in an image is. Where qemu-img refuses the file too, the error carries its
    words (`qemu_chain`, `qemu_top`).
    """
    path = os.fsdecode(os.fspath(path))        # bytes names too (undecodable bytes escaped)
    of = f" of {owner}" if owner else ""
    if "\0" in path:                            # (os would raise a bare ValueError)
        raise UnsafePathError(f"{what} path {path!r}{of} contains a NUL byte, which no file "
                              "name can hold")
    if not path:                                # (the lookup below would find ".")
        missing = (MissingBackingFile if owner else ImageNotFound)(
            f"{what} path{of} is empty: no file has an empty name", errno.ENOENT,
            os.strerror(errno.ENOENT), path)
        missing.qemu_chain = "The 'file' block driver requires a file name"    # (qemu-img's)
        missing.qemu_top = path
        raise missing
    name = f"{what} {path}{of}"
    head, tail = _split(path)
    dir_fd = fd = -1
    try:
        dir_fd = os.open(head, _DIR_FLAGS)
        # An O_PATH descriptor first (opening one runs no device's open), its type checked,
        # then the file reopened through it: a character device or socket is refused without
        # being opened at all, even when a symlink to one is swapped in meanwhile.
        held = os.open(tail, _PATH_FLAGS, dir_fd=dir_fd)
        try:
            mode = os.fstat(held).st_mode
            if not (stat.S_ISREG(mode) or (block_devices and stat.S_ISBLK(mode))):
                raise _as_qemu_says(FormatError(
                    f"{name} is {_kind(mode)}, not a regular file"
                    + (" or block device" if block_devices else "")), mode, path)
            try:
                fd = os.open(f"/proc/self/fd/{held}", _OPEN_FLAGS)
            except FileNotFoundError:           # (no /proc: the name again, checked below)
                fd = os.open(tail, _OPEN_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(held)
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (block_devices and stat.S_ISBLK(st.st_mode))):
            raise FormatError(f"{name} is {_kind(st.st_mode)}, not a regular file")  # swapped
        opened = OpenedFile(path, fd, st, dir_fd if keep_dir else -1)
    except OSError as exc:
        _close(fd, dir_fd)
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        cls = (MissingBackingFile if owner else ImageNotFound) if missing else ImageOpenError
        raise cls(f"{name} cannot be opened: {exc.strerror}", exc.errno, exc.strerror,
                  path) from None
    except BaseException:
        _close(fd, dir_fd)
        raise
    if not keep_dir:
        os.close(dir_fd)
    return opened


#: The protocol prefixes qemu-img 7.2 (Debian's qemu-utils) knows; for any other, opening a
#: backing file fails with "Unknown protocol 'NAME'".
QEMU_PROTOCOLS = frozenset((
    "file", "host_device", "host_cdrom", "nbd", "nbd+unix", "nbd+tcp", "http", "https", "ftp",
    "ftps", "ssh", "iscsi", "iser", "rbd", "gluster", "gluster+tcp", "gluster+unix",
    "gluster+rdma", "nfs", "null-co", "null-aio", "blkdebug", "blkverify", "json", "fat"))


def has_protocol(name: str) -> bool:
    """True when QEMU would take `name` for a protocol (`json:`, `file:`, `nbd:`...).

    QEMU path_has_protocol(): a colon before the first slash.
    """
    head = name.split("/", 1)[0]
    return ":" in head


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _fd_path(fd: int) -> str | None:
    """The path the kernel gives open descriptor `fd` (/proc/self/fd), or None (a path of
    PATH_MAX bytes or more has none there: ENAMETOOLONG)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return real if real.startswith("/") else None


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _name_in(up: int, st: os.stat_result) -> str:
    """The name directory `st` has in its parent, open (readable) as `up`; FileNotFoundError
    when it has none there now. Found by (st_dev, st_ino): the listing's d_ino, checked by a
    stat; a mount point's d_ino is not its root's, so there every entry is stat'ed."""
    crossing = os.fstat(up).st_dev != st.st_dev
    with os.scandir(up) as entries:
        for entry in entries:
            if crossing or entry.inode() == st.st_ino:
                try:
                    if _ident(os.stat(entry.name, dir_fd=up, follow_symlinks=False)) == \
                            _ident(st):
                        return entry.name
                except OSError:
                    continue
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


def _real_path(dir_fd: int, last: str = "") -> tuple[str, bool]:
    """(path, whole): the real path of directory `dir_fd` (with `last` joined to it).

    The kernel names a descriptor (_fd_path) only while its path is shorter than PATH_MAX;
    past that, the names are found walking up through "..", each in its parent's listing
    (_name_in), to a directory the kernel names. When a directory on the way cannot be
    listed (or was removed), `whole` is False and `path` holds the names found below it
    (relative, possibly empty).
    """
    names = [last] if last else []
    fd = os.dup(dir_fd)
    try:
        while (top := _fd_path(fd)) is None:
            st = os.fstat(fd)
            try:
                up = os.open("..", _LIST_FLAGS, dir_fd=fd)
            except OSError:
                return "/".join(reversed(names)), False
            os.close(fd)
            fd = up
            if _ident(os.fstat(fd)) == _ident(st):
                top = "/"                       # the root (no /proc): its ".." is itself
                break
            try:
                names.append(_name_in(fd, st))
            except OSError:
                return "/".join(reversed(names)), False
        return os.path.join(top, *reversed(names)), True
    finally:
        os.close(fd)


def _shown(dir_fd: int, last: str = "") -> str:
    """_real_path() for a message: a path cut short says so."""
    path, whole = _real_path(dir_fd, last)
    return path if whole else (f".../{path} (the start of a path longer than PATH_MAX; a "
                               "directory above it cannot be listed)")


def _below(dir_fd: int, trusted: set) -> bool:
    """True when directory `dir_fd` is one of the directories `trusted` ((st_dev, st_ino)
    pairs) or lies below one: walked up through "..", so no path is looked up again and a
    path of any length works. A walk that cannot go on (a directory removed meanwhile, or
    one not searchable) is not inside."""
    fd = os.dup(dir_fd)
    try:
        ident = _ident(os.fstat(fd))
        while ident not in trusted:
            try:
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            except OSError:                     # (unsearchable, or removed): not shown inside
                return False
            os.close(fd)
            fd = up
            ident, below = _ident(os.fstat(fd)), ident
            if ident == below:                  # the root: its ".." is itself
                return False
        return True
    finally:
        os.close(fd)


def _lookup(base: int, name: str) -> tuple[int, int, str]:
    """Find `name` as the kernel would from directory `base`, following the symlinks of its
    last component one at a time (an absolute name ignores `base`).

    Returns (reached, holder, last): O_PATH descriptors on the directory `name` was reached
    in and on the directory holding what it names after its symlinks (the same descriptor
    when it is no symlink), and that file's name in `holder`. The caller closes both.
    Raises OSError (ENOENT, ENOTDIR: missing; ELOOP: too many links).
    """
    # The kernel allows MAXSYMLINKS links per lookup, wherever they are: a name it refuses
    # with ELOOP is refused here too (the steps below each count afresh).
    os.stat(name, dir_fd=base)
    head, last = _split(name)
    reached = holder = os.open(head, _DIR_FLAGS, dir_fd=base)
    try:
        for _ in range(_MAX_LINKS + 1):
            try:
                target = os.readlink(last, dir_fd=holder)
            except OSError as exc:
                if exc.errno != errno.EINVAL:   # EINVAL: not a symlink
                    raise
                return reached, holder, last
            head, last = _split(target)
            up = os.open(head, _DIR_FLAGS, dir_fd=holder)
            if holder != reached:
                os.close(holder)
            holder = up
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
    except BaseException:
        _close(holder, reached)
        raise


def full_backing_filename(image_name: str, backing: str, protocols: bool = True) -> str:
    """The backing file path qemu-img reports: `backing` joined to `image_name`'s directory.

    QEMU bdrv_get_full_backing_filename(): absolute names and protocol names stay as they
    are; a relative name replaces the last component of the image's name as given (".//top"
    keeps ".//"). Without `protocols` (a data file's name) a protocol name is relative too.
    """
    if os.path.isabs(backing) or (protocols and has_protocol(backing)):
        return backing
    return image_name[:image_name.rfind("/") + 1] + backing


class AllowedDir(str):
    """A directory of `backing_dirs` (its name, as given), resolved once by directories():
    `ident` is its (st_dev, st_ino) (None when it cannot be opened: it holds nothing) and
    `real` its real path, so a relative name keeps its meaning for every layer of a chain
    even if the working directory changes. Pickled or copied, it is its name again (an
    identity means nothing in another process)."""

    __slots__ = ("ident", "real")

    def __reduce__(self):
        return str, (str(self),)


def _allowed(name: str) -> AllowedDir:
    out = AllowedDir(name)
    try:
        fd = os.open(name, _DIR_FLAGS)
    except OSError:                             # (a missing directory holds nothing)
        fd = -1
    try:
        out.ident = _ident(os.fstat(fd)) if fd >= 0 else None
        real, whole = _real_path(fd) if fd >= 0 else ("", False)
        if not whole:                           # (only to word missing names)
            try:
                real = os.path.realpath(name)
            except OSError:                     # a link removed under realpath (a race)
                real = os.path.abspath(name)
        out.real = real
    finally:
        _close(fd)
    return out


def directories(dirs) -> tuple[AllowedDir, ...]:
    """`backing_dirs` as a tuple of AllowedDir (str), each resolved now unless it already
    was: an iterable of paths, or one path (str, bytes or os.PathLike: one directory, never
    the characters of its name). An empty name is a ValueError: it would trust the working
    directory (an unset shell variable in `--allow-backing-dir "$DIR"`); one with a NUL
    byte, an UnsafePathError."""
    if isinstance(dirs, (str, bytes, os.PathLike)):
        dirs = (dirs,)
    try:
        names = tuple(d if isinstance(d, AllowedDir) else os.fsdecode(os.fspath(d))
                      for d in dirs)
    except TypeError:
        raise TypeError(f"backing_dirs must be a path or an iterable of paths, not "
                        f"{dirs!r}") from None
    if "" in names:
        raise ValueError("--allow-backing-dir (backing_dirs=) was given an empty directory "
                         "name; qcowfast refuses it rather than trust the working directory "
                         "(name that one as '.')")
    for name in names:
        if "\0" in name:
            raise UnsafePathError(f"--allow-backing-dir (backing_dirs=) was given a directory "
                                  f"name with a NUL byte ({name!r}), which no file name can "
                                  "hold")
    return tuple(d if isinstance(d, AllowedDir) else _allowed(d) for d in names)


def resolve_reference(image, name: str, what: str, allowed_dirs=()) -> OpenedFile:
    """Open file `name` referenced by `image` under the path policy, or raise.

    `image` is the OpenedFile of the image holding the name, opened with a `dir_fd`
    (open_file(keep_dir=True), or an earlier resolve_reference): names resolve from the
    directory as the image was reached. A path (or an OpenedFile without `dir_fd`) has its
    directory opened now: a symlink in that path repointed since the image was opened would
    move the names. `what` is "backing file" or "external data file" (used in messages);
    `allowed_dirs` are extra directories the caller trusts (open(backing_dirs=...),
    --allow-backing-dir), best as directories() returned them at the start of the open: then
    every layer of a chain trusts the same directories, whatever the working directory is.

    On exit the returned OpenedFile holds a descriptor on a regular file that lies (all
    symlinks followed) inside the image's directory or inside one of `allowed_dirs`, and a
    `dir_fd` on the directory `name` was reached in (through a symlink: the link's). Its
    `path` is `name` joined to the directory of the image's path, as QEMU names it. The
    caller must read through that descriptor and close both.

    Raises UnsafePathError naming the file and the option that would allow it (also for a
    missing name that would lie outside); MissingBackingFile when the file does not exist;
    ImageOpenError when it exists but cannot be opened.
    """
    image_path = os.fsdecode(os.fspath(image))
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
    # A backing file name is parsed for a protocol; a data file name never is: QEMU opens
    # "file:d.raw" as a file of that name (relative names: see README, data-file names).
    backing = what == "backing file"
    if backing and has_protocol(name):
        exc = UnsafePathError(f"{what} {name!r} named in {image_path} uses a protocol or json: "
                              f"prefix, which qcowfast never follows; {never}")
        protocol = name.split(":", 1)[0][:127]      # (bdrv_find_protocol()'s char[128])
        if protocol not in QEMU_PROTOCOLS:
            exc.qemu_chain = f"Unknown protocol '{protocol}'"
        raise exc
    allowed = directories(allowed_dirs)
    path = full_backing_filename(image_path, name, protocols=backing)
    label = f"{what} {path} of {image_path}"

    def failed(exc: OSError) -> QcowError:
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        return (MissingBackingFile if missing else ImageOpenError)(
            f"{label} cannot be opened: {exc.strerror}", exc.errno, exc.strerror, path)

    def changed() -> UnsafePathError:
        return UnsafePathError(f"{what} {name!r} named in {image_path} changed while it was "
                               "being opened; refused")

    base = getattr(image, "dir_fd", -1)
    own = base < 0
    reached = holder = fd = -1
    try:
        if own:
            try:
                base = os.open(_split(image_path)[0], _DIR_FLAGS)
            except OSError as exc:
                raise failed(exc) from None
        # The allowed directories as directories() resolved them (once, for the whole chain).
        trusted = {getattr(image, "trust", None) or _ident(os.fstat(base))}
        trusted.update(d.ident for d in allowed if d.ident is not None)

        def outside(real: str) -> UnsafePathError:
            reason = ("is outside the image's directory" if os.path.isabs(name)
                      else "resolves outside the image's directory")
            return UnsafePathError(f"{what} {name!r} named in {image_path} {reason} "
                                   f"{_shown(base)} (it is {real}); qcowfast does not follow "
                                   f"it by default; {hint}")

        try:
            reached, holder, last = _lookup(base, name)
            st = os.stat(last, dir_fd=holder, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                # Missing: where the name would lead decides between "outside" and "missing".
                image_real, whole = _real_path(base)
                try:
                    if not whole:               # (a directory above cannot be listed)
                        image_real = os.path.realpath(_split(image_path)[0])
                    real = os.path.realpath(os.path.join(image_real, name))
                except OSError:                 # a link removed under realpath (a race)
                    raise changed() from None
                if not any(_inside(real, d) for d in (image_real, *(d.real for d in allowed))):
                    raise outside(real) from None
            raise failed(exc) from None
        if stat.S_ISLNK(st.st_mode):
            raise changed()                     # a symlink appeared since _lookup
        if not stat.S_ISREG(st.st_mode):        # (never opened: a FIFO would block)
            raise _as_qemu_says(UnsafePathError(
                f"{label} is {_kind(st.st_mode)}, not a regular file; qcowfast follows only "
                "regular files named in an image"), st.st_mode, path)
        try:
            fd = os.open(last, _OPEN_FLAGS | os.O_NOFOLLOW, dir_fd=holder)
            st = os.fstat(fd)
            inside = _below(holder, trusted)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                raise changed() from None       # swapped or removed since the stat
            raise failed(exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise changed()
        if not inside:
            raise outside(_fd_path(fd) or _shown(holder, last))
        # Its names resolve from `reached` (QEMU's meaning); they are checked against it only
        # when it is trusted itself. Reached through a symlink from elsewhere (a link in /tmp
        # to a file in the trusted directory), they are checked against the directory that
        # really holds the file: trusting the link's directory would open it all.
        trust = None if _below(reached, trusted) else _ident(os.fstat(holder))
        opened = OpenedFile(path, fd, st, reached, trust)
    except BaseException:
        _close(fd, reached, holder if holder != reached else -1, base if own else -1)
        raise
    _close(holder if holder != reached else -1, base if own else -1)
    return opened


__all__ = ["OpenedFile", "directories", "full_backing_filename", "open_file",
           "resolve_reference", "has_protocol"]
