"""Internal snapshots: the snapshot table and the lookup of one snapshot by id or name.

Layout: QEMU docs/interop/qcow2.txt "Snapshots"; reading and lookup follow QEMU
block/qcow2-snapshot.c (qcow2_do_read_snapshots(), find_snapshot_by_id_and_name(),
qcow2_snapshot_load_tmp()) and the table checks of qcow2_validate_table(). Every length and
offset is checked against QEMU's limits and the file size before it is used.

Reading a snapshot follows qcow2_snapshot_load_tmp(): the guest keeps the image's current
virtual size and only the L1 table is switched, so past the end of the snapshot's L1 table
(which may be shorter than the header's) clusters are unallocated and the backing file shows
through. The snapshot's own disk size stays metadata (`Snapshot.disk_size`).
"""
from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from ._record import record
from .constants import MAX_L1_BYTES, MAX_SNAPSHOTS
from .errors import CorruptImage, FormatError, SnapshotNotFound, TruncatedImage
from .preads import pread_padded

# QCowSnapshotHeader: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size (40 bytes, each entry 8-byte aligned).
_ENTRY = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024       # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
MAX_EXTRA_DATA = 1024                       # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
# QEMU's BDRV_MAX_LENGTH (QEMU_ALIGN_DOWN(INT64_MAX, 1 GiB)): bdrv_check_request() fails a
# read ending past it with EIO, even a read of 0 bytes starting past it.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
_READ_AHEAD = 64 * 1024
SECTOR = 512


@record
class Snapshot:
    """One entry of the snapshot table (sizes in bytes).

    `vm_state_size` is the 64-bit size from the extra data when present, else the 32-bit field;
    `disk_size` is the snapshot's virtual disk size (the image's current size when the entry has
    no extra data for it), metadata only: a snapshot is read at the image's current size, as
    qemu-img reads it; `icount` is -1 when not recorded. `id` and `name` are decoded as UTF-8
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


class _Window:
    """Serves byte ranges of the table from a forward read-ahead window.

    `fill(offset, n, want, what)` reads at least `n` and at most `want` bytes at `offset` (it
    applies the caller's policy for bytes past the end of the file); `what` names the entry in
    its errors. The window never reaches past the cluster holding the last byte asked for:
    the table's clusters are its own, the next ones may be data, and caching those pages (by
    reading them, or by the kernel's read-ahead behind the read) turns ext4's SEEK_HOLE
    answers over unwritten extents into data (QEMU reads only the entries).
    """

    def __init__(self, fill, start: int, cluster_size: int):
        self.fill = fill
        self.base = start
        self.cluster_size = cluster_size
        self.buf = b""

    def get(self, offset: int, n: int, what: str) -> bytes:
        if not (self.base <= offset and offset + n <= self.base + len(self.buf)):
            cluster_end = -(-(offset + n) // self.cluster_size) * self.cluster_size
            want = max(n, min(_READ_AHEAD, cluster_end - offset))
            self.base, self.buf = offset, self.fill(offset, n, want, what)
        lo = offset - self.base
        return self.buf[lo:lo + n]


def _strict_fill(fd: int, file_size: int):
    """A `_Window` fill that refuses bytes past the end of the file (TruncatedImage)."""
    def fill(offset: int, n: int, want: int, what: str) -> bytes:
        if offset + n > file_size:
            raise TruncatedImage(f"{what}: {n} bytes at {offset:#x} run past the end of the file "
                                 f"({file_size} bytes)")
        buf = os.pread(fd, min(want, file_size - offset), offset)
        if len(buf) < n:
            raise TruncatedImage(f"{what}: short read of {n} bytes at {offset:#x}")
        return buf
    return fill


def _padded_fill(fd: int):
    """A `_Window` fill that reads bytes past the end of the file as zeros, as QEMU does."""
    return lambda offset, n, want, what: pread_padded(fd, want, offset)


def _label(index: int) -> str:
    return f"snapshot table entry {index}"


def _c_string(raw: bytes) -> str:
    """An id or name as QEMU prints it: up to its first NUL byte (undecodable bytes kept as
    surrogate escapes: printed as they are, JSON as QEMU writes them, see info.qemu_json)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@record
class _Policy:
    """What a walk of the table raises and how it decodes, per caller."""
    error: type[Exception]      # raised when an entry breaks one of QEMU's limits
    at: Callable[[int], str]    # names entry i in the table-size message
    text: Callable[[bytes], str]    # decodes an id or a name
    qemu: bool                  # QEMU's reads: its words on the errors, its EIO past
                                # BDRV_MAX_LENGTH (else the file's end bounds every read)


# read_snapshots(): the snapshots an opened image serves.
_STRICT = _Policy(FormatError, _label, lambda raw: raw.decode("utf-8", "surrogateescape"),
                  False)
# read_snapshot_table(): what QEMU checks and prints when it opens an image.
_AT_OPEN = _Policy(CorruptImage, lambda i: f"entry {i}", _c_string, True)


def _qemu_words(exc: Exception, words: str, hint: str | None, code: int) -> Exception:
    """`exc` with what qcow2_do_read_snapshots() says instead: its error (`qemu_chain`: at
    open, "Could not open 'X': WORDS"), the hint it appends and its errno (`qemu_errno`:
    qemu-img check's "Check failed: STRERROR")."""
    exc.qemu_chain, exc.qemu_hint, exc.qemu_errno = words, hint, code
    return exc


def _read_failed(i: int, end: int) -> Exception:
    """qcow2_do_read_snapshots(): a read of entry `i` ending at `end` fails (EIO)."""
    return _qemu_words(CorruptImage(f"{_label(i)}: ends at {end:#x}, past the largest offset "
                                    f"QEMU reads ({BDRV_MAX_LENGTH:#x})"),
                       "Failed to read snapshot table: Input/output error", None, errno.EIO)


def _walk(get, start: int, count: int, disk_size: int, policy: _Policy,
          repair: list | None = None) -> tuple[list[Snapshot], int]:
    """Parse `count` entries from `start` (qcow2_do_read_snapshots()).

    `get(offset, n, what)` returns the `n` bytes at `offset`; `disk_size` stands for entries
    whose extra data records none. Returns (snapshots, table size in bytes). `repair` (check
    -r all: QEMU's `repair`): a list that gets QEMU's "Discarding ..." lines where it drops
    extra data over its limit or the entries past 64 MiB instead of failing; reads still fail.
    """
    out = []
    pos = start
    for i in range(count):
        pos = (pos + 7) & ~7
        if policy.qemu and pos + _ENTRY.size > BDRV_MAX_LENGTH:
            raise _read_failed(i, pos + _ENTRY.size)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock_nsec, vm_state32,
         extra_len) = _ENTRY.unpack(get(pos, _ENTRY.size, _label(i)))
        kept = extra_len
        if extra_len > MAX_EXTRA_DATA and repair is not None:
            repair.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                          f"({extra_len} > {MAX_EXTRA_DATA})")
            kept = MAX_EXTRA_DATA
        elif extra_len > MAX_EXTRA_DATA:
            raise _qemu_words(
                policy.error(f"{_label(i)}: extra_data_size {extra_len} exceeds QEMU's limit "
                             f"of {MAX_EXTRA_DATA} bytes"),
                f"Too much extra metadata in snapshot table entry {i}",
                "You can force-remove this extra metadata with qemu-img check -r all",
                errno.EFBIG)
        end = pos + _ENTRY.size + extra_len + id_len + name_len
        # (The reads of extra data, id and name follow on: the last ends at `end`.)
        if policy.qemu and end > BDRV_MAX_LENGTH:
            raise _read_failed(i, end)
        if end - start > MAX_SNAPSHOTS_SIZE and repair is not None:
            repair.append(f"Discarding {count - i} overhanging snapshots (snapshot table is "
                          "too big)")
            break
        if end - start > MAX_SNAPSHOTS_SIZE:
            raise _qemu_words(
                policy.error(f"snapshot table is larger than QEMU's limit of "
                             f"{MAX_SNAPSHOTS_SIZE} bytes (at {policy.at(i)})"),
                "Snapshot table is too big",
                f"You can force-remove all {count - i} overhanging snapshots with qemu-img "
                "check -r all", errno.EFBIG)
        # (The extra data QEMU drops is skipped, not read.)
        extra = get(pos + _ENTRY.size, kept, _label(i))
        body = extra + get(pos + _ENTRY.size + extra_len, id_len + name_len, _label(i))
        extra_len = kept
        # Extra data (qcow2.txt): 64-bit VM state size, disk size, icount; unknown fields ignored.
        vm_state = int.from_bytes(extra[0:8], "big") if extra_len >= 8 else vm_state32
        disk = int.from_bytes(extra[8:16], "big") if extra_len >= 16 else disk_size
        icount = int.from_bytes(extra[16:24], "big", signed=True) if extra_len >= 24 else -1
        out.append(Snapshot(policy.text(body[extra_len:extra_len + id_len]),
                            policy.text(body[extra_len + id_len:]), l1_offset, l1_size,
                            vm_state, disk, date_sec, date_nsec, vm_clock_nsec, icount,
                            extra_len))
        pos = end
    return out, pos - start


def read_snapshots(image) -> list[Snapshot]:
    """Read and validate the snapshot table of an opened image.

    Parameters
    ----------
    image : Image
        An image whose `header`, `_fd` and `file_size` are set.

    Returns
    -------
    list of Snapshot
        In table order (an empty list when the image has none).

    Raises
    ------
    FormatError
        A length or offset breaks a QEMU limit (extra data over 1 KiB, table over 64 MiB).
    TruncatedImage
        The table runs past the end of the file.
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
    get = _Window(_strict_fill(image._fd, image.file_size), start, h.cluster_size).get
    return _walk(get, start, count, h.size, _STRICT)[0]


def _c_text(text: str) -> str:
    return text.split("\0", 1)[0]


def _l1_einval(image, snap: Snapshot) -> bool:
    """True when QEMU's qcow2_snapshot_load_tmp() fails this snapshot with EINVAL (its L1 table
    offset is not cluster aligned, or the table would end past 2^63); a table too large is
    EFBIG, which QEMU does not retry."""
    entries = snap.l1_size
    if entries * 8 > MAX_L1_BYTES:
        return False
    return bool(snap.l1_table_offset % image.header.cluster_size
                or snap.l1_table_offset + entries * 8 >= 1 << 63)


def _load_failed(exc: Exception, words: str) -> Exception:
    """`exc` with QEMU's words for it in `qemu_snapshot`: qemu-img convert/measure -l and
    qemu-nbd -l print "Failed to load snapshot: WORDS" (error_reportf_err())."""
    exc.qemu_snapshot = words
    return exc


def check_l1(image, snap: Snapshot) -> None:
    """Check the L1 table of the snapshot about to be read (QEMU qcow2_snapshot_load_tmp()).

    QEMU's qcow2_validate_table() rules (at most 32 MiB, cluster aligned, ending before 2^63)
    and its read (EIO past BDRV_MAX_LENGTH), plus the file bounds qcowfast keeps for every
    table. A table shorter than the disk needs is legal (iotest 029): the clusters it does not
    cover read as unallocated. Each error's `qemu_snapshot` holds QEMU's words, where QEMU
    fails too.
    """
    h = image.header
    label = f"snapshot (id {snap.id!r}, name {snap.name!r})"
    offset, entries = snap.l1_table_offset, snap.l1_size
    if entries * 8 > MAX_L1_BYTES:
        raise _load_failed(FormatError(f"{label}: L1 table too large ({entries} entries, "
                                       f"limit {MAX_L1_BYTES // 8})"),
                           "Snapshot L1 table too large")
    if offset % h.cluster_size:
        raise _load_failed(FormatError(f"{label}: L1 table offset {offset:#x} is not aligned "
                                       f"to the cluster size {h.cluster_size}"),
                           "Snapshot L1 table offset invalid")
    if _l1_einval(image, snap):
        raise _load_failed(FormatError(f"{label}: L1 table at {offset:#x} ({entries * 8} "
                                       "bytes) would end past 2^63"),
                           "Snapshot L1 table offset invalid")
    if offset + entries * 8 > BDRV_MAX_LENGTH:     # (a read of 0 bytes fails there too)
        raise _load_failed(TruncatedImage(f"{label}: L1 table at {offset:#x} ({entries * 8} "
                                          "bytes) lies past the largest offset QEMU reads "
                                          f"({BDRV_MAX_LENGTH:#x})"),
                           "Failed to read l1 table for snapshot")
    if entries and offset + entries * 8 > image.file_size:
        raise TruncatedImage(f"{label}: L1 table at {offset:#x} ({entries * 8} bytes) runs past "
                             f"the end of the file ({image.file_size} bytes)")


def parse_snapshot_option(text) -> dict:
    """Parse a snapshot selector the way `qemu-img convert -l` does.

    ``snapshot.name=NAME`` and ``snapshot.id=ID`` (QEMU option syntax: comma-separated, ``,,``
    for a literal comma; both may be given) select by name and/or id. Any other text selects
    by id, else by name (bdrv_snapshot_load_tmp_by_id_or_name()).

    Returns
    -------
    dict
        ``{"id": ..., "name": ...}`` with the keys given, or ``{"id_or_name": text}``.

    Raises
    ------
    ValueError
        An unknown ``snapshot.`` option, or one without a value.
    """
    text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    if not text.startswith("snapshot."):
        return {"id_or_name": text}
    out: dict = {}
    for item in _split_opts(text):
        if not item:
            continue                        # "snapshot.id=1," (QEMU skips empty items)
        key, sep, value = item.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise ValueError(f"invalid snapshot option {item!r} (expected snapshot.id=ID or "
                             "snapshot.name=NAME)")
        # A key alone is QEMU's (deprecated) short-form boolean: "on".
        out[key[len("snapshot."):]] = value if sep else "on"
    return out


def choose_snapshot_option(texts: list[str]) -> str | None:
    """The one of several `qemu-img convert -l` options that counts: the last
    ``snapshot.*`` one if any, else the last (img_convert keeps the two kinds apart and
    prefers the first)."""
    options = [t for t in texts if t.startswith("snapshot.")] or texts
    return options[-1] if options else None


def _split_opts(text: str) -> list[str]:
    """Split QEMU option text at single commas; ',,' stands for a comma."""
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items


def find_snapshot(image, key) -> Snapshot:
    """Return the snapshot `key` selects, as qemu-img does.

    `key` is a dict from `parse_snapshot_option`, or text in any of its spellings: a plain id or
    name looks up the id first, then the name; with both ``snapshot.id`` and ``snapshot.name``
    one snapshot must have both (find_snapshot_by_id_and_name()).

    Raises
    ------
    SnapshotNotFound
        No snapshot matches; the message lists the snapshots the image has.
    FormatError, TruncatedImage
        The snapshot table is invalid (see `read_snapshots`).
    ValueError
        `key` is malformed option text.
    """
    select = key if isinstance(key, dict) else parse_snapshot_option(key)
    snaps = read_snapshots(image)
    if "id_or_name" in select:
        wanted = select["id_or_name"]
        tries = [{"id": wanted}, {"name": wanted}]
        shown = f"id or name {wanted!r}"
    else:
        tries = [select]
        shown = " and ".join(f"{k} {v!r}" for k, v in select.items())
    for number, want in enumerate(tries):
        for snap in snaps:
            # strcmp(): an id or name ends at its first NUL byte, as in QEMU's lookup.
            if all(_c_text(getattr(snap, k)) == _c_text(v) for k, v in want.items()):
                if number == 0 and len(tries) > 1 and _l1_einval(image, snap):
                    break       # bdrv_snapshot_load_tmp_by_id_or_name(): -EINVAL, by name
                return snap
    listing = ", ".join(f"id {s.id!r} name {s.name!r}" for s in snaps) or "none"
    raise SnapshotNotFound(f"{image.filename}: no snapshot with {shown} "
                           f"(snapshots: {listing})")


def read_snapshot_table(fd: int, header, repair: list | None = None
                        ) -> tuple[list[Snapshot], int]:
    """Walk the snapshot table as QEMU's qcow2_do_read_snapshots() does when it opens an image.

    Only the table-level rules QEMU enforces at open are checked (extra data over 1 KiB, a table
    over 64 MiB); bytes past the end of the file read as zeros and each snapshot's L1 table is
    left alone, so this refuses exactly the images QEMU refuses to open. Ids and names end at
    their first NUL byte (C strings, as QEMU prints them).

    Returns (snapshots, table size in bytes). Raises CorruptImage. `repair`: see _walk().
    """
    start = header.snapshots_offset
    get = _Window(_padded_fill(fd), start, header.cluster_size).get
    return _walk(get, start, header.nb_snapshots, header.size // SECTOR * SECTOR, _AT_OPEN,
                 repair)


def check_at_open(image) -> None:
    """Refuse what QEMU's qcow2_do_open() refuses beyond the header, for an opened `image`.

    The snapshot table (qcow2_read_snapshots()) and the persistent bitmaps
    (qcow2_load_dirty_bitmaps()) are read and checked like QEMU does when it opens an image.
    """
    h = image.header
    if h.nb_snapshots:
        read_snapshot_table(image._fd, h)
    if h.bitmaps is not None:
        from .bitmaps import check_bitmaps_at_open
        check_bitmaps_at_open(image._fd, h, image.file_size)


__all__ = ["Snapshot", "SnapshotNotFound", "read_snapshots", "read_snapshot_table",
           "find_snapshot", "parse_snapshot_option", "choose_snapshot_option", "check_l1",
           "check_at_open"]
