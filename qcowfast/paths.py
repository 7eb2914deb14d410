"""Which files named inside an image may be opened: the backing and external data file policy.

A name stored in an image is untrusted. It is followed only when it is a plain relative path that
resolves (symlinks included) inside the image's own directory, or inside a directory the caller
allowed explicitly. Absolute names, `..` escapes and QEMU protocol or `json:` prefixes are refused
with an error naming the option that would allow them.
"""
from __future__ import annotations

import os
import re

from .errors import UnsafePathError

_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-_]*:")


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def resolve_reference(image_path: str, name: str, what: str, allowed_dirs=()) -> str:
    """Return the real path of file `name` referenced by image `image_path`, or raise.

    `what` is "backing file" or "external data file" (used in messages); `allowed_dirs` are
    extra directories the caller trusts (open(backing_dirs=...), --allow-backing-dir).
    """
    hint = ("pass backing_dirs=[DIR] (command line: --allow-backing-dir DIR) or name the file "
            "explicitly" + (" with backing=PATH" if what == "backing file" else " with data_file=PATH"))
    if not name:
        raise UnsafePathError(f"{what} name in {image_path} is empty")
    if "\0" in name:
        raise UnsafePathError(f"{what} name {name!r} in {image_path} contains a NUL byte")
    if _PROTOCOL.match(name):
        raise UnsafePathError(f"{what} {name!r} named in {image_path} uses a protocol or json: "
                              f"prefix, which qcowfast never follows; {hint}")
    base = os.path.dirname(os.path.realpath(image_path))
    target = os.path.realpath(os.path.join(base, name))
    trusted = [os.path.realpath(d) for d in allowed_dirs]
    if not os.path.isabs(name) and _inside(target, base):
        return target
    if any(_inside(target, d) for d in trusted):
        return target
    reason = "is an absolute path" if os.path.isabs(name) else "resolves outside the image's directory"
    raise UnsafePathError(f"{what} {name!r} named in {image_path} {reason} ({target}); "
                          f"qcowfast does not follow it by default; {hint}")
