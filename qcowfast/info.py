"""What `qemu-img info` says about an image, read from the image file alone.

`info()` returns the dictionary `qemu-img info --output=json` prints (QEMU 7.2 block/qapi.c
bdrv_query_image_info() and block/qcow2.c qcow2_get_specific_info()). It reads only the header
cluster, the snapshot table and the bitmap directory: backing and external data files are named,
never opened, because an untrusted image may name any host file. With `backing_chain=True` the
chain is followed under the same path policy as `qcowfast.open` (qcowfast/paths.py).
"""
from __future__ import annotations

import json
import math
import os
import stat
import time

from .bitmaps import read_bitmap_directory
from .constants import (
    MAX_CHAIN_DEPTH, QCOW_MAGIC, Compatible, CompressionType,
)
from .errors import BackingChainError, CorruptImage, FormatError, UnsupportedFeature
from .header import Header, read_header
from .paths import has_protocol, resolve_reference
from .refcounts import pread_padded
from .snapshots import _ENTRY, MAX_EXTRA_DATA, MAX_SNAPSHOTS_SIZE, Snapshot

SECTOR = 512
_READ_WINDOW = 64 * 1024


def read_snapshot_table(fd: int, header: Header) -> tuple[list[Snapshot], int]:
    """Walk the snapshot table as QEMU's qcow2_do_read_snapshots() does.

    Unlike `qcowfast.snapshots.read_snapshots`, which validates each snapshot's L1 table before
    it is read from, this only parses the entries: `qemu-img info` lists snapshots whose L1
    table is broken, and `qemu-img check` counts such tables as corruptions, not as failures.
    Bytes past the end of the file read as zeros (as in QEMU).

    Returns (snapshots, table size in bytes). Raises CorruptImage for the table-level rules
    QEMU enforces (extra data over 1 KiB, a table over 64 MiB).
    """
    start, count = header.snapshots_offset, header.nb_snapshots
    window_base, window = start, b""

    def get(offset: int, n: int) -> bytes:
        nonlocal window_base, window
        if not (window_base <= offset and offset + n <= window_base + len(window)):
            window_base, window = offset, pread_padded(fd, max(n, _READ_WINDOW), offset)
        lo = offset - window_base
        return window[lo:lo + n]

    out = []
    pos = start
    for i in range(count):
        pos = (pos + 7) & ~7
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock_nsec, vm_state32,
         extra_len) = _ENTRY.unpack(get(pos, _ENTRY.size))
        if extra_len > MAX_EXTRA_DATA:
            raise CorruptImage(f"snapshot table entry {i}: {extra_len} bytes of extra data "
                               f"exceed QEMU's limit of {MAX_EXTRA_DATA}")
        end = pos + _ENTRY.size + extra_len + id_len + name_len
        body = get(pos + _ENTRY.size, end - pos - _ENTRY.size)
        extra = body[:extra_len]
        # A C string: QEMU prints ids and names up to their first NUL byte.
        ident = body[extra_len:extra_len + id_len].split(b"\0", 1)[0]
        name = body[extra_len + id_len:].split(b"\0", 1)[0]
        vm_state = int.from_bytes(extra[0:8], "big") if extra_len >= 8 else vm_state32
        disk_size = (int.from_bytes(extra[8:16], "big") if extra_len >= 16
                     else header.size // SECTOR * SECTOR)
        icount = int.from_bytes(extra[16:24], "big", signed=True) if extra_len >= 24 else -1
        out.append(Snapshot(ident.decode("utf-8", "replace"), name.decode("utf-8", "replace"),
                            l1_offset, l1_size, vm_state, disk_size, date_sec, date_nsec,
                            vm_clock_nsec, icount, extra_len))
        pos = end
        if pos - start > MAX_SNAPSHOTS_SIZE:
            raise CorruptImage(f"snapshot table is larger than QEMU's limit of "
                               f"{MAX_SNAPSHOTS_SIZE} bytes")
    return out, pos - start


def full_backing_filename(image_name: str, backing: str) -> str:
    """The backing file path qemu-img reports: `backing` joined to `image_name`'s directory.

    QEMU bdrv_get_full_backing_filename(): absolute names and protocol names stay as they
    are; a relative name replaces the last component of the image's name as given.
    """
    if os.path.isabs(backing) or has_protocol(backing):
        return backing
    return image_name[:image_name.rfind("/") + 1] + backing


def _snapshot_json(s: Snapshot) -> dict:
    out = {}
    if s.icount != -1:
        out["icount"] = s.icount
    out.update({"vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000, "name": s.name,
                "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000, "id": s.id,
                "vm-state-size": s.vm_state_size})
    return out


def _qcow2_info(fd: int, name: str, st: os.stat_result) -> dict:
    # Like qemu-img, describe images whose tables run past the end of the file (truncated
    # copies): info reads none of those tables.
    h = read_header(fd, st.st_size, tables_in_file=False)
    snapshots = read_snapshot_table(fd, h)[0] if h.nb_snapshots else []
    out: dict = {}
    if h.backing_file and h.backing_format:
        out["backing-filename-format"] = h.backing_format
    if snapshots:
        out["snapshots"] = [_snapshot_json(s) for s in snapshots]
    out.update({"virtual-size": h.size // SECTOR * SECTOR, "filename": name,
                "cluster-size": h.cluster_size, "format": "qcow2",
                "actual-size": st.st_blocks * 512})
    specific: dict = {"compat": "0.10" if h.version == 2 else "1.1",
                      "compression-type": CompressionType(h.compression_type).name.lower()}
    if h.version >= 3:
        specific["lazy-refcounts"] = bool(h.compatible_features & Compatible.LAZY_REFCOUNTS)
        bitmaps = read_bitmap_directory(fd, h, st.st_size)
        if bitmaps:
            specific["bitmaps"] = [{"flags": b.flag_names(), "name": b.name,
                                    "granularity": b.granularity} for b in bitmaps]
    specific["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        if h.data_file:
            specific["data-file"] = h.data_file
        if h.has_data_file:
            specific["data-file-raw"] = h.data_file_raw
        specific["corrupt"] = h.corrupt
        specific["extended-l2"] = h.extended_l2
    out["format-specific"] = {"type": "qcow2", "data": specific}
    if h.backing_file:
        out["full-backing-filename"] = full_backing_filename(name, h.backing_file)
        out["backing-filename"] = h.backing_file
    out["dirty-flag"] = h.dirty
    return out


def _layer_info(path: str, fmt: str | None) -> tuple[dict, tuple[int, int]]:
    """Info of one file (qcow2 or raw, probed when `fmt` is None) and its (st_dev, st_ino)."""
    # O_NONBLOCK: opening a FIFO must not hang; anything but a regular file is refused below.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path} is not a regular file")
        if fmt is None:
            fmt = "qcow2" if os.pread(fd, 4, 0) == QCOW_MAGIC else "raw"
        if fmt == "qcow2":
            out = _qcow2_info(fd, path, st)
        elif fmt == "raw":
            out = {"virtual-size": -(-st.st_size // SECTOR) * SECTOR, "filename": path,
                   "format": "raw", "actual-size": st.st_blocks * 512, "dirty-flag": False}
        else:
            raise UnsupportedFeature(f"{path}: format {fmt!r} (qcowfast reads qcow2 and raw)")
        return out, (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def info(path, *, backing_chain: bool = False, backing_dirs=(), fmt: str | None = None,
         max_depth: int = MAX_CHAIN_DEPTH):
    """Describe an image as `qemu-img info --output=json` does.

    Parameters
    ----------
    path : str or os.PathLike
        The image; reported under this name (`filename`), as qemu-img does.
    backing_chain : bool
        Describe the whole backing chain: return a list, top image first. Backing files are
        followed only under the path policy of `qcowfast.open` (see `backing_dirs`).
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing files named in images.
    fmt : "qcow2", "raw" or None
        Format of `path`; None probes it (QCOW2 magic, else raw), as qemu-img does.
    max_depth : int
        Longest backing chain followed.

    Returns
    -------
    dict, or list of dict with `backing_chain`
        The keys and values of `qemu-img info --output=json`.

    Raises
    ------
    QcowError
        The image (or, with `backing_chain`, a file of its chain) cannot be described; OSError
        when a file cannot be opened at all.
    """
    name = os.fspath(path)
    top, ident = _layer_info(name, fmt)
    if not backing_chain:
        return top
    chain, seen = [top], {ident}
    allowed = tuple(os.fspath(d) for d in backing_dirs)
    current = top
    while "backing-filename" in current:
        if len(chain) > max_depth:
            raise BackingChainError(f"backing chain of {name} is deeper than {max_depth}")
        next_path = resolve_reference(current["filename"], current["backing-filename"],
                                      "backing file", allowed)
        try:
            current, ident = _layer_info(next_path, current.get("backing-filename-format"))
        except FileNotFoundError:
            raise BackingChainError(f"backing file {next_path} of {current['filename']} does "
                                    "not exist") from None
        if ident in seen:
            raise BackingChainError(f"backing file {next_path} creates an infinite loop")
        seen.add(ident)
        chain.append(current)
    return chain


# -- rendering ---------------------------------------------------------------------------------
def format_json(result) -> str:
    """Render `info()`'s result as qemu-img does (indented JSON, one trailing newline)."""
    return json.dumps(result, indent=4) + "\n"


def size_to_str(value: int) -> str:
    """A size the way qemu-img prints one: three significant digits and a binary unit."""
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    unit = min(int((exponent - 1) / 10), 6)          # C division: truncates toward zero
    return f"{value / (1 << (unit * 10)):0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[unit]}B"


def _clock(nsec: int) -> str:
    secs = nsec // 1_000_000_000
    return (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{nsec // 1_000_000 % 1000:03d}")


def _dump_value(lines: list, value, indent: int) -> None:
    pad = " " * indent
    items = value.items() if isinstance(value, dict) else (
        (f"[{i}]", v) for i, v in enumerate(value))
    for key, item in items:
        label = key.replace("-", " ")
        if isinstance(item, (dict, list)):
            lines.append(f"{pad}{label}:")
            _dump_value(lines, item, indent + 4)
        else:
            text = str(item).lower() if isinstance(item, bool) else str(item)
            lines.append(f"{pad}{label}: {text}")


def _human_one(d: dict) -> list[str]:
    lines = [f"image: {d['filename']}", f"file format: {d['format']}",
             f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)",
             f"disk size: {size_to_str(d['actual-size'])}"]
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in d:
        text = f"backing file: {d['backing-filename']}"
        if d["full-backing-filename"] != d["backing-filename"]:
            text += f" (actual path: {d['full-backing-filename']})"
        lines.append(text)
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}"
                     f"{'ICOUNT':>11}")
        for s in d["snapshots"]:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            clock = _clock(s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"])
            icount = str(s["icount"]) if "icount" in s else ""
            lines.append(f"{s['id']:<9} {s['name']:<16} {size_to_str(s['vm-state-size']):>8}"
                         f"{date:>20}{clock:>13}{icount:>11}")
    if "format-specific" in d:
        lines.append("Format specific information:")
        _dump_value(lines, d["format-specific"]["data"], 4)
    return lines


def format_human(result) -> str:
    """Render `info()`'s result as the human summary of `qemu-img info`."""
    layers = result if isinstance(result, list) else [result]
    return "\n".join("\n".join(_human_one(d)) + "\n" for d in layers)


__all__ = ["info", "format_json", "format_human", "read_snapshot_table",
           "full_backing_filename", "size_to_str"]
