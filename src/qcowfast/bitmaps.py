"""Persistent dirty bitmaps: the bitmap directory and bitmap tables, read-only.

Layout: QEMU docs/interop/qcow2.txt "Bitmaps extension", "Bitmap directory", "Bitmap table".
The rules a directory entry must follow are those of QEMU block/qcow2-bitmap.c
(bitmap_list_load(), check_dir_entry(), check_table_entry()), so an image QEMU refuses to list
bitmaps of is refused here with the same reason.
"""
from __future__ import annotations

import struct

from ._record import record
from .errors import CorruptImage, FormatError, TruncatedImage
from .header import MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAPS, Header
from .preads import pread_padded

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BT_DIRTY_TRACKING_BITMAP = 1
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
_SCAN_BYTES = 8 * 1024 * 1024
_WINDOW_BYTES = 64 * 1024              # bitmap bytes an export request looks at a time

_DIR_ENTRY = struct.Struct(">QIIBBHI")   # table offset, table size, flags, type, gran, name, extra


@record
class Bitmap:
    """One bitmap directory entry."""
    name: str
    table_offset: int
    table_size: int          # entries of the bitmap table
    flags: int
    type: int
    granularity_bits: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    def flag_names(self) -> list[str]:
        """The flags as `qemu-img info` names them ("in-use", "auto")."""
        names = []
        if self.in_use:
            names.append("in-use")
        if self.auto:
            names.append("auto")
        return names


def _entry_problem(e: tuple, header: Header) -> str | None:
    """Why a directory entry breaks QEMU's check_dir_entry() rules, or None."""
    table_offset, table_size, flags, btype, gran, name_size, _extra = e
    cs = header.cluster_size
    if table_size == 0:
        return "its bitmap table is empty"
    if table_offset == 0 or table_offset % cs:
        return f"its bitmap table offset {table_offset:#x} is zero or not cluster aligned"
    if table_size > BME_MAX_TABLE_SIZE:
        return f"its bitmap table has {table_size} entries (limit {BME_MAX_TABLE_SIZE})"
    if not BME_MIN_GRANULARITY_BITS <= gran <= BME_MAX_GRANULARITY_BITS:
        return f"granularity_bits {gran} is out of range 9..31"
    if flags & BME_RESERVED_FLAGS:
        return f"reserved flags are set ({flags:#x})"
    if name_size > BME_MAX_NAME_SIZE:
        return f"its name is {name_size} bytes long (limit {BME_MAX_NAME_SIZE})"
    if btype != BT_DIRTY_TRACKING_BITMAP:
        return f"its type is {btype}, not a dirty tracking bitmap"
    phys = table_size * cs
    if phys > BME_MAX_PHYS_SIZE:
        return f"its bitmap data would take {phys} bytes (limit {BME_MAX_PHYS_SIZE})"
    if not flags & BME_FLAG_IN_USE and table_size != table_clusters(header, gran):
        # load_bitmap_data(): the table must be exactly as long as the serialized bitmap
        # (one bit per granule, in 64-bit words) needs; QEMU fails the open with EINVAL.
        return (f"its bitmap table has {table_size} entries where the virtual size needs "
                f"{table_clusters(header, gran)}")
    return None


def table_clusters(header: Header, granularity_bits: int) -> int:
    """Clusters of a bitmap's serialized data (hbitmap_serialization_size())."""
    bits = -(-(header.size // 512 * 512) // (1 << granularity_bits))
    return -(-(-(-bits // 64) * 8) // header.cluster_size)


def read_bitmap_directory(fd: int, header: Header, file_size: int) -> list[Bitmap]:
    """Parse and validate the bitmap directory named by the header's bitmaps extension.

    Returns [] when the image has no (valid) bitmaps extension. Raises FormatError,
    TruncatedImage or CorruptImage when the directory breaks a rule.
    """
    ext = header.bitmaps
    if ext is None:
        return []
    if ext.nb_bitmaps == 0:
        raise FormatError("bitmaps extension announces zero bitmaps")
    if ext.nb_bitmaps > MAX_BITMAPS:
        raise FormatError(f"bitmaps extension announces {ext.nb_bitmaps} bitmaps "
                          f"(limit {MAX_BITMAPS})")
    if ext.directory_size == 0:
        raise FormatError("bitmap directory size is zero")
    if ext.directory_size > MAX_BITMAP_DIRECTORY_BYTES:
        raise FormatError(f"bitmap directory of {ext.directory_size} bytes is too big")
    if ext.directory_offset % header.cluster_size:
        raise FormatError(f"bitmap directory offset {ext.directory_offset:#x} is not cluster "
                          "aligned")
    if ext.directory_offset + ext.directory_size > file_size:
        raise TruncatedImage(f"bitmap directory at {ext.directory_offset:#x} "
                             f"({ext.directory_size} bytes) runs past the end of the file")
    data = pread_padded(fd, ext.directory_size, ext.directory_offset)
    out: list[Bitmap] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + _DIR_ENTRY.size > end:
            raise CorruptImage("broken bitmap directory: an entry runs past its end")
        if len(out) + 1 > ext.nb_bitmaps:
            raise CorruptImage(f"bitmap directory holds more bitmaps than the {ext.nb_bitmaps} "
                               "the header extension announces")
        e = _DIR_ENTRY.unpack_from(data, pos)
        name_size, extra_size = e[5], e[6]
        entry_size = (_DIR_ENTRY.size + extra_size + name_size + 7) & ~7
        if pos + entry_size > end:
            raise CorruptImage("broken bitmap directory: an entry runs past its end")
        if extra_size:
            raise CorruptImage("bitmap directory entry has extra data, which QEMU does not "
                               "support")
        name_start = pos + _DIR_ENTRY.size + extra_size
        # g_strndup(): the name ends at a NUL byte; other bytes kept, as QEMU prints them.
        raw_name = data[name_start:name_start + name_size].split(b"\0", 1)[0]
        name = raw_name.decode("utf-8", "surrogateescape")
        problem = _entry_problem(e, header)
        if problem:
            exc = CorruptImage(f"bitmap {name!r} is invalid: {problem}")
            # QEMU: bitmap_list_load() refuses what check_dir_entry() does; a table longer
            # than the bitmap needs fails later, in load_bitmap_data() (EINVAL).
            long_table = e[1] > table_clusters(header, e[4]) and problem.endswith(
                f"needs {table_clusters(header, e[4])}")
            exc.qemu_chain = (f"Could not read bitmap '{name}' from image: Invalid argument"
                              if long_table else
                              f"Bitmap '{name}' doesn't satisfy the constraints")
            raise exc
        out.append(Bitmap(name, e[0], e[1], e[2], e[3], e[4]))
        pos += entry_size
    if len(out) != ext.nb_bitmaps:
        raise CorruptImage(f"bitmap directory holds {len(out)} bitmaps, the header extension "
                           f"announces {ext.nb_bitmaps}")
    return out


# numpy is imported per function: opening an image reads the directory without it.
def read_bitmap_table(fd: int, bitmap: Bitmap) -> "np.ndarray":
    """The bitmap table of `bitmap` as native uint64 entries (past the end of file: zeros)."""
    import numpy as np
    raw = pread_padded(fd, bitmap.table_size * 8, bitmap.table_offset)
    return np.frombuffer(raw, ">u8").astype(np.uint64)


def bad_table_entries(table: "np.ndarray", cluster_size: int) -> "np.ndarray":
    """Mask of bitmap table entries breaking QEMU's check_table_entry() rules."""
    import numpy as np
    offset = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
    bad = (table & np.uint64(BME_TABLE_ENTRY_RESERVED_MASK)) != 0
    has = offset != 0
    bad |= has & ((table & np.uint64(BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
    bad |= has & ((offset & np.uint64(cluster_size - 1)) != 0)
    return bad


def check_bitmaps_at_open(fd: int, header: Header, file_size: int) -> None:
    """Refuse what QEMU refuses when it loads the bitmaps at open (qcow2_load_dirty_bitmaps()).

    The directory is validated (bitmap_list_load(), check_dir_entry()) and so is the table of
    every bitmap not marked in use (load_bitmap() -> bitmap_table_load(), check_table_entry());
    table bytes past the end of the file read as zeros, which are valid entries. Each byte of
    the file is read at most once, however many tables overlap.
    Raises FormatError, TruncatedImage or CorruptImage.
    """
    bitmaps = read_bitmap_directory(fd, header, file_size)
    seen = set()
    for bm in bitmaps:
        # Each bitmap becomes a BdrvDirtyBitmap of its name; a name already taken is an error,
        # except for a bitmap in use, which QEMU then skips (qcow2_load_dirty_bitmaps()).
        if bm.name in seen and not bm.in_use:
            raise CorruptImage(f"Bitmap already exists: {bm.name}")
        seen.add(bm.name)
    loaded = [bm for bm in bitmaps if not bm.in_use]
    spans = sorted((bm.table_offset, min(bm.table_offset + bm.table_size * 8, file_size))
                   for bm in loaded if bm.table_offset < file_size)
    if not spans:
        return
    import numpy as np                       # only images with bitmaps pay for numpy
    bad_at: list[np.ndarray] = []
    pos = 0
    for start, end in spans:
        start = max(start, pos)
        while start < end:                   # the union of the tables, in chunks of 8 MiB
            n = min(end - start, _SCAN_BYTES)
            raw = np.frombuffer(pread_padded(fd, n, start), ">u8").astype(np.uint64)
            bad_at.append(np.flatnonzero(bad_table_entries(raw, header.cluster_size)) * 8 + start)
            start += n
        pos = max(pos, end)
    bad = np.sort(np.concatenate(bad_at)) if bad_at else np.zeros(0, np.int64)
    if not len(bad):
        return
    for bm in loaded:
        lo, hi = np.searchsorted(bad, [bm.table_offset, bm.table_offset + bm.table_size * 8])
        if hi > lo:
            offset = int(bad[lo])
            entry = int.from_bytes(pread_padded(fd, 8, offset), "big")
            exc = CorruptImage(f"bitmap {bm.name!r}: bitmap table entry "
                               f"{(offset - bm.table_offset) // 8} ({entry:#018x}) is invalid "
                               "(reserved bits, an unaligned offset, or the all-ones flag with "
                               "an offset)")
            # (load_bitmap(): bitmap_table_load() fails with EINVAL)
            exc.qemu_chain = (f"Could not read bitmap_table table from image for bitmap "
                              f"'{bm.name}': Invalid argument")
            raise exc


class ExportedBitmap:
    """A persistent bitmap of a qcow2 layer as qemu-nbd -B exports it (qemu:dirty-bitmap:NAME):
    its bits read from the file a request's worth at a time, never the whole bitmap.

    QEMU loads the bitmap at open (qcow2-bitmap.c load_bitmap_data(): table entry 0 clean,
    the all-ones flag dirty, else one cluster of serialized bits, LSB first, read as zeros
    past the end of the file) and covers the layer's own length (`size`): bits past it are
    never dirty. check_bitmaps_at_open() must have passed on the layer's file.
    """

    def __init__(self, fd: int, bitmap: Bitmap, cluster_size: int, size: int):
        self.fd = fd
        self.bitmap = bitmap
        self.name = bitmap.name
        self.cluster_size = cluster_size
        self.size = size

    def _bits(self, first: int, stop: int) -> "np.ndarray":
        """The bits of granules [first, stop) (uint8 0/1), a bitmap data cluster at a time."""
        import numpy as np
        cs = self.cluster_size
        per_cluster = cs * 8                                      # granules per data cluster
        out = np.zeros(stop - first, np.uint8)
        k0, k1 = first // per_cluster, (stop - 1) // per_cluster
        count = min(k1, self.bitmap.table_size - 1) - k0 + 1
        if count <= 0:
            return out
        table = np.frombuffer(pread_padded(self.fd, count * 8, self.bitmap.table_offset
                                           + k0 * 8), ">u8").astype(np.uint64)
        if bad_table_entries(table, cs).any():
            raise CorruptImage(f"bitmap {self.name!r}: invalid bitmap table entry")
        for k, entry in enumerate(table.tolist(), k0):
            a, b = max(first, k * per_cluster), min(stop, (k + 1) * per_cluster)
            offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
            if not offset:
                if entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
                    out[a - first:b - first] = 1
                continue
            lo = (a - k * per_cluster) // 8                       # bytes of the cluster needed
            hi = -(-(b - k * per_cluster) // 8)
            raw = np.frombuffer(pread_padded(self.fd, hi - lo, offset + lo), np.uint8)
            bits = np.unpackbits(raw, bitorder="little")
            skip = a - (k * per_cluster + lo * 8)
            out[a - first:b - first] = bits[skip:skip + b - a]
        return out

    def extents(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """(length, NBD_STATE_DIRTY or 0) extents of [offset, offset + length), at most
        `max_extents`: nbd/server.c bitmap_to_extents(), byte-exact at the request's edges."""
        import numpy as np
        end = offset + length
        stop = min(end, self.size)                  # (bits past the layer's length are clean)
        gran = self.bitmap.granularity
        # At most 64 KiB of bitmap (2**19 granules, within one data cluster) at a time, until
        # the extents are enough: a hostile bitmap of alternating bits must not turn one
        # request into millions of runs, nor a 2 MiB cluster into arrays of 16 Mi granules.
        step = min(self.cluster_size, _WINDOW_BYTES) * 8 * gran
        cuts: list = []                             # byte offsets where the state changes
        found = 0
        first = state = 0
        chunk = offset
        while chunk < stop and found < max_extents:
            chunk_end = min(stop, (chunk // step + 1) * step)
            g0 = chunk // gran
            bits = self._bits(g0, (chunk_end - 1) // gran + 1)
            if chunk == offset:
                first = state = int(bits[0])
            pos = (np.flatnonzero(bits[1:] != bits[:-1]) + 1 + g0) * gran
            if bits[0] != state:                    # (a window starts on a granule)
                pos = np.concatenate(([chunk], pos))
            cuts.append(pos[:max_extents - found])
            found += len(cuts[-1])
            state = int(bits[-1])
            chunk = chunk_end
        if state and stop < end and found < max_extents:
            cuts.append(np.array([stop]))           # dirty up to the layer's end
        bounds = np.concatenate(([offset], *cuts, [end]))[:max_extents + 1]
        sizes = np.diff(bounds).tolist()
        flags = ((np.arange(len(sizes)) + first) & 1).tolist()
        return list(zip(sizes, flags))


def find_bitmap(layers, name: str):
    """(layer, Bitmap): the first bitmap named `name` in the first qcow2 layer of `layers`
    (top first) that has one, as nbd/server.c nbd_export_create() looks for a bitmap down
    the backing chain (bdrv_find_dirty_bitmap(): the first loaded of that name; a later one
    in use was skipped at open); None when none has it."""
    for layer in layers:
        header = getattr(layer, "header", None)
        if header is None or header.bitmaps is None:
            continue
        for bm in read_bitmap_directory(layer._fd, header, layer.file_size):
            if bm.name == name:
                return layer, bm
    return None
