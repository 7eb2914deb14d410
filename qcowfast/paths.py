"""Which files named inside an image may be opened: the backing and external data file policy.

A name stored in an image is untrusted. It is followed only when it is a plain relative path that
resolves (symlinks included) inside the image's own directory, or inside a directory the caller
allowed explicitly. Absolute names, `..` escapes and QEMU protocol or `json:` prefixes are refused
with an error naming the option that would allow them.

A relative name is looked up the way QEMU does (block.c bdrv_get_full_backing_filename(): the
name joined to the directory of the image's path as it was opened, symlinks in that path not
resolved), so a chain opened through a symlink finds the same files qemu-img finds.
"""
from __future__ import annotations

import os
import stat

from .errors import UnsafePathError


def has_protocol(name: str) -> bool:
    """True when QEMU would take `name` for a protocol (`json:`, `file:`, `nbd:`...).

    QEMU path_has_protocol(): a colon before the first slash.
    """
    head = name.split("/", 1)[0]
    return ":" in head


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def resolve_reference(image_path: str, name: str, what: str, allowed_dirs=()) -> str:
    """Return the path to open for file `name` referenced by image `image_path`, or raise.

    `what` is "backing file" or "external data file" (used in messages); `allowed_dirs` are
    extra directories the caller trusts (open(backing_dirs=...), --allow-backing-dir).

    On exit the returned path is `name` joined to the directory of `image_path` (as QEMU names
    it); its real path (all symlinks resolved) lies inside the image's real directory or inside
    the real path of one of `allowed_dirs`, and it is not an existing non-regular file (a FIFO
    would block the open, a device or directory is never an image). A missing file is returned
    as is: the caller reports it.

    Raises UnsafePathError naming the file and the option that would allow it.
    """
    image_path = os.fspath(image_path)
    hint = ("pass backing_dirs=[DIR] (command line: --allow-backing-dir DIR) or name the file "
            "explicitly" + (" with backing=PATH" if what == "backing file" else " with data_file=PATH"))
    if not name:
        raise UnsafePathError(f"{what} name in {image_path} is empty")
    if "\0" in name:
        raise UnsafePathError(f"{what} name {name!r} in {image_path} contains a NUL byte")
    if has_protocol(name):
        raise UnsafePathError(f"{what} {name!r} named in {image_path} uses a protocol or json: "
                              f"prefix, which qcowfast never follows; {hint}")
    image_dir = os.path.dirname(image_path)
    path = os.path.join(image_dir, name)
    target = os.path.realpath(path)
    base = os.path.realpath(image_dir or os.curdir)
    trusted = [os.path.realpath(os.fspath(d)) for d in allowed_dirs]
    if os.path.isabs(name) or not _inside(target, base):
        if not any(_inside(target, d) for d in trusted):
            reason = ("is an absolute path" if os.path.isabs(name)
                      else "resolves outside the image's directory")
            raise UnsafePathError(f"{what} {name!r} named in {image_path} {reason} ({target}); "
                                  f"qcowfast does not follow it by default; {hint}")
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return path
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{what} {name!r} named in {image_path} is not a regular file "
                              f"({target}); qcowfast only follows regular files; {hint}")
    return path
