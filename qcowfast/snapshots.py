"""Internal snapshots: the snapshot table and the lookup of one snapshot by id or name.

Layout: QEMU docs/interop/qcow2.txt "Snapshots"; reading and lookup follow QEMU
block/qcow2-snapshot.c (qcow2_do_read_snapshots(), find_snapshot_by_id_or_name()) and the table
checks of qcow2_validate_table(). Every length and offset is checked against QEMU's limits and
the file size before it is used.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .constants import MAX_L1_BYTES, MAX_SNAPSHOTS
from .errors import FormatError, SnapshotNotFound, TruncatedImage

# QCowSnapshotHeader: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size (40 bytes, each entry 8-byte aligned).
_ENTRY = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024       # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
MAX_EXTRA_DATA = 1024                       # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
_READ_AHEAD = 64 * 1024


@dataclass(frozen=True)
class Snapshot:
    """One entry of the snapshot table (sizes in bytes).

    `vm_state_size` is the 64-bit size from the extra data when present, else the 32-bit field;
    `disk_size` is the snapshot's virtual disk size (the image's current size when the entry has
    no extra data for it); `icount` is -1 when not recorded. `id` and `name` are decoded as UTF-8
    with undecodable bytes kept as surrogate escapes.
    """
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int
    extra_data_size: int


class _TableReader:
    """Reads a byte range of the file through a forward read-ahead window."""

    def __init__(self, fd: int, start: int, file_size: int):
        self.fd = fd
        self.file_size = file_size
        self.base = start
        self.buf = b""

    def get(self, offset: int, n: int, what: str) -> bytes:
        if offset + n > self.file_size:
            raise TruncatedImage(f"{what}: {n} bytes at {offset:#x} run past the end of the file "
                                 f"({self.file_size} bytes)")
        if not (self.base <= offset and offset + n <= self.base + len(self.buf)):
            want = min(max(n, _READ_AHEAD), self.file_size - offset)
            self.base, self.buf = offset, os.pread(self.fd, want, offset)
            if len(self.buf) < n:
                raise TruncatedImage(f"{what}: short read of {n} bytes at {offset:#x}")
        lo = offset - self.base
        return self.buf[lo:lo + n]


def _label(index: int, ident: str | None = None, name: str | None = None) -> str:
    text = f"snapshot table entry {index}"
    if ident is not None:
        text += f" (id {ident!r}, name {name!r})"
    return text


def read_snapshots(image) -> list[Snapshot]:
    """Read and validate the snapshot table of an opened image.

    Parameters
    ----------
    image : Image
        An image whose `header`, `_fd`, `file_size` and `_l2_per_l1` are set.

    Returns
    -------
    list of Snapshot
        In table order (an empty list when the image has none).

    Raises
    ------
    FormatError
        A length or offset breaks a QEMU limit (extra data over 1 KiB, table over 64 MiB, L1 table
        over 32 MiB, unaligned, or too small for the snapshot's disk size).
    TruncatedImage
        The table or a snapshot's L1 table runs past the end of the file.
    """
    h = image.header
    count, start = h.nb_snapshots, h.snapshots_offset
    if not count:
        return []
    if count > MAX_SNAPSHOTS:
        raise FormatError(f"too many snapshots ({count}, limit {MAX_SNAPSHOTS})")
    if start % h.cluster_size:
        raise FormatError(f"snapshot table offset {start:#x} is not aligned to the cluster size "
                          f"{h.cluster_size}")
    file_size = image.file_size
    reader = _TableReader(image._fd, start, file_size)
    out = []
    pos = start
    for i in range(count):
        pos = (pos + 7) & ~7
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock_nsec, vm_state32,
         extra_len) = _ENTRY.unpack(reader.get(pos, _ENTRY.size, _label(i)))
        if extra_len > MAX_EXTRA_DATA:
            raise FormatError(f"{_label(i)}: extra_data_size {extra_len} exceeds QEMU's limit of "
                              f"{MAX_EXTRA_DATA} bytes")
        end = pos + _ENTRY.size + extra_len + id_len + name_len
        if end - start > MAX_SNAPSHOTS_SIZE:
            raise FormatError(f"snapshot table is larger than QEMU's limit of {MAX_SNAPSHOTS_SIZE} "
                              f"bytes (at {_label(i)})")
        body = reader.get(pos + _ENTRY.size, end - pos - _ENTRY.size, _label(i))
        extra = body[:extra_len]
        ident = body[extra_len:extra_len + id_len].decode("utf-8", "surrogateescape")
        name = body[extra_len + id_len:].decode("utf-8", "surrogateescape")
        label = _label(i, ident, name)
        # Extra data (qcow2.txt): 64-bit VM state size, disk size, icount; unknown fields ignored.
        vm_state = int.from_bytes(extra[0:8], "big") if extra_len >= 8 else vm_state32
        disk_size = int.from_bytes(extra[8:16], "big") if extra_len >= 16 else h.size
        icount = int.from_bytes(extra[16:24], "big", signed=True) if extra_len >= 24 else -1
        _check_l1(image, label, l1_offset, l1_size, disk_size)
        out.append(Snapshot(ident, name, l1_offset, l1_size, vm_state, disk_size, date_sec,
                            date_nsec, vm_clock_nsec, icount, extra_len))
        pos = end
    return out


def _check_l1(image, label: str, offset: int, entries: int, disk_size: int) -> None:
    """Check a snapshot's L1 table like QEMU's qcow2_validate_table(), plus the file bounds."""
    h = image.header
    if disk_size >= 1 << 63:
        raise FormatError(f"{label}: disk size {disk_size} too large")
    if entries * 8 > MAX_L1_BYTES:
        raise FormatError(f"{label}: L1 table too large ({entries} entries, limit "
                          f"{MAX_L1_BYTES // 8})")
    if offset % h.cluster_size:
        raise FormatError(f"{label}: L1 table offset {offset:#x} is not aligned to the cluster "
                          f"size {h.cluster_size}")
    if entries and offset + entries * 8 > image.file_size:
        raise TruncatedImage(f"{label}: L1 table at {offset:#x} ({entries * 8} bytes) runs past "
                             f"the end of the file ({image.file_size} bytes)")
    needed = -(-disk_size // image._l2_per_l1)
    if entries < needed:
        raise FormatError(f"{label}: L1 table too small: {entries} entries for a disk size of "
                          f"{disk_size} bytes needs {needed}")


def find_snapshot(image, key) -> Snapshot:
    """Return the snapshot whose id is `key`, else the first whose name is `key` (like QEMU).

    Raises
    ------
    SnapshotNotFound
        No snapshot matches; the message lists the snapshots the image has.
    FormatError, TruncatedImage
        The snapshot table is invalid (see `read_snapshots`).
    """
    key = os.fsdecode(key) if isinstance(key, bytes) else str(key)
    snaps = read_snapshots(image)
    for attr in ("id", "name"):
        for snap in snaps:
            if getattr(snap, attr) == key:
                return snap
    listing = ", ".join(f"id {s.id!r} name {s.name!r}" for s in snaps) or "none"
    raise SnapshotNotFound(f"{image.filename}: no snapshot with id or name {key!r} "
                           f"(snapshots: {listing})")


__all__ = ["Snapshot", "SnapshotNotFound", "read_snapshots", "find_snapshot"]
