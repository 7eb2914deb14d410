"""QCOW2 header and header-extension parsing, with every check done before a table is read.

Layout and rules: QEMU docs/interop/qcow2.txt ("Header", "Header extensions"); the checks follow
QEMU's qcow2_do_open() and add file-size bounds QEMU leaves to later reads.
"""
from __future__ import annotations

import os
import struct

from ._record import field, record
from .constants import (
    BACKING_FORMAT_SIZE, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS, MIN_CLUSTER_BITS, QCOW_MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH, Autoclear,
    CompressionType, CryptMethod, ExtensionType, IMPLEMENTED_INCOMPATIBLE, INCOMPATIBLE_NAMES, Incompatible,
)
from .errors import EncryptedImage, FormatError, QcowError, TruncatedImage, UnsupportedFeature

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024


@record
class Extension:
    """One header extension as found in the file: its type, where its data starts, its length."""
    type: int
    offset: int
    length: int


@record
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@record
class Header:
    """Every field of a QCOW2 header plus what its extensions say (frozen; sizes in bytes)."""
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = CompressionType.ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict = field(default_factory=dict, repr=False)
    bitmaps: BitmapsExtension | None = None
    crypto_header: tuple[int, int] | None = None
    extensions: tuple[Extension, ...] = field(default=(), repr=False)
    stale_bitmaps: bool = False     # a bitmaps extension ignored: its autoclear bit is clear

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & _INCOMPATIBLE_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """L2 entries per L2 table (one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & _INCOMPATIBLE_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & _AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & _INCOMPATIBLE_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & _INCOMPATIBLE_CORRUPT)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


# Feature tests use plain ints: `int & IntFlag` runs the enum's Python code (tens of
# calls per opened image).
_INCOMPATIBLE_EXTENDED_L2 = int(Incompatible.EXTENDED_L2)
_INCOMPATIBLE_DATA_FILE = int(Incompatible.DATA_FILE)
_INCOMPATIBLE_DIRTY = int(Incompatible.DIRTY)
_INCOMPATIBLE_CORRUPT = int(Incompatible.CORRUPT)
_INCOMPATIBLE_COMPRESSION_TYPE = int(Incompatible.COMPRESSION_TYPE)
_AUTOCLEAR_DATA_FILE_RAW = int(Autoclear.DATA_FILE_RAW)


def _check_table(name: str, offset: int, nbytes: int, cluster_size: int, file_size: int) -> None:
    if offset % cluster_size:
        raise FormatError(f"{name} offset {offset:#x} is not aligned to the cluster size {cluster_size}")
    if nbytes and offset + nbytes > file_size:
        raise TruncatedImage(f"{name} at {offset:#x} ({nbytes} bytes) runs past the end of the file "
                             f"({file_size} bytes)")


def feature_name(header_names: dict, kind: int, bit: int) -> str:
    """Name of feature bit `bit` of `kind` (0 incompatible, 1 compatible, 2 autoclear)."""
    name = header_names.get((kind, bit))
    if name:
        return name
    if kind == 0 and bit in INCOMPATIBLE_NAMES:
        return INCOMPATIBLE_NAMES[bit]
    return f"unknown {('incompatible', 'compatible', 'autoclear')[kind]} feature bit {bit}"


def parse_header(data: bytes, file_size: int, *, allow_encrypted: bool = False) -> Header:
    """Parse and validate a header from the first cluster (or less, at end of file) of an image.

    `data` must hold the first min(file_size, 2 MiB) bytes; all offsets are checked against
    `file_size`. Raises FormatError, TruncatedImage, UnsupportedFeature or EncryptedImage
    (unless `allow_encrypted`, for describing an image without reading its data).
    """
    if len(data) < V2_HEADER_LENGTH:
        if data[:4] == QCOW_MAGIC or len(data) < 4:
            raise TruncatedImage(f"file is {len(data)} bytes, shorter than a QCOW2 header (72 bytes)")
        raise FormatError("not a QCOW2 image (bad magic)")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
     l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
     snapshots_offset) = _V2.unpack_from(data)
    if magic != QCOW_MAGIC:
        raise FormatError("not a QCOW2 image (bad magic)")
    if version not in (2, 3):
        raise UnsupportedFeature(f"QCOW2 version {version} (only versions 2 and 3 exist)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"cluster_bits {cluster_bits} out of range "
                          f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    fields = dict(version=version, backing_file_offset=backing_file_offset,
                  backing_file_size=backing_file_size, cluster_bits=cluster_bits, size=size,
                  crypt_method=crypt_method, l1_size=l1_size, l1_table_offset=l1_table_offset,
                  refcount_table_offset=refcount_table_offset,
                  refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
                  snapshots_offset=snapshots_offset)
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise TruncatedImage(f"file is {len(data)} bytes, shorter than a version 3 header")
        incompatible, compatible, autoclear, refcount_order, header_length = \
            _V3.unpack_from(data, V2_HEADER_LENGTH)
        # qcow2.txt asks for a multiple of 8; QEMU checks only the minimum (and then reads the
        # extensions from wherever header_length points, as _parse_extensions does).
        if header_length < V3_HEADER_LENGTH:
            raise FormatError(f"header_length {header_length} is below 104 (qcow2 header too "
                              "short)")
        if header_length > cluster_size:
            raise FormatError(f"header_length {header_length} exceeds the cluster size {cluster_size}")
        if header_length > len(data):
            raise TruncatedImage(f"header_length {header_length} runs past the end of the file")
        if refcount_order > 6:
            raise FormatError(f"refcount_order {refcount_order} out of range 0..6")
        compression_type = data[104] if header_length > 104 else CompressionType.ZLIB
        fields.update(incompatible_features=incompatible, compatible_features=compatible,
                      autoclear_features=autoclear, refcount_order=refcount_order,
                      header_length=header_length, compression_type=compression_type)
    else:
        header_length = V2_HEADER_LENGTH
        incompatible = 0

    # Extensions run up to the backing file name, or to the end of the first cluster.
    area_end = min(backing_file_offset if backing_file_offset else cluster_size, cluster_size)
    ext_fields = _parse_extensions(data, header_length, area_end)
    names = ext_fields.get("feature_names", {})

    unknown = incompatible & ~int(IMPLEMENTED_INCOMPATIBLE)
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        raise UnsupportedFeature("unsupported incompatible feature: "
                                 + ", ".join(feature_name(names, 0, b) for b in bits))
    if crypt_method not in (CryptMethod.NONE, CryptMethod.AES, CryptMethod.LUKS):
        raise EncryptedImage(f"image is encrypted (unknown method {crypt_method} in "
                             "crypt_method); qcowfast does not decrypt images")
    if crypt_method and not allow_encrypted:
        method = {CryptMethod.AES: "legacy AES", CryptMethod.LUKS: "LUKS"}[crypt_method]
        raise EncryptedImage(f"image is encrypted ({method}); qcowfast does not decrypt images")
    _check_compression(fields.get("compression_type", 0), incompatible)
    if incompatible & _INCOMPATIBLE_EXTENDED_L2 and cluster_bits < 14:
        raise FormatError(f"extended L2 entries need clusters of at least 16 KiB (cluster_bits "
                          f"{cluster_bits})")

    # Backing file name: must fit in the first cluster (QEMU: "Backing file name too long").
    if backing_file_offset:
        if (backing_file_size > MAX_BACKING_NAME
                or backing_file_offset + backing_file_size > cluster_size):
            raise FormatError(f"backing file name ({backing_file_size} bytes at "
                              f"{backing_file_offset:#x}) too long or outside the first cluster")
        end = backing_file_offset + backing_file_size
        if end > len(data):
            raise TruncatedImage("backing file name runs past the end of the file")
        # A C string to QEMU (qcow2_do_open() pstrcpy()s it): the name ends at a NUL byte.
        fields["backing_file"] = _decode_name(data[backing_file_offset:end].split(b"\0", 1)[0],
                                              "backing file name")

    if size >= 1 << 63:
        raise FormatError(f"virtual size {size} too large")
    l2_entries = cluster_size // (16 if incompatible & _INCOMPATIBLE_EXTENDED_L2 else 8)
    needed_l1 = -(-size // (cluster_size * l2_entries))
    if l1_size * 8 > MAX_L1_BYTES:
        raise FormatError(f"L1 table too large ({l1_size} entries, limit {MAX_L1_BYTES // 8})")
    if l1_size < needed_l1:
        raise FormatError(f"L1 table too small: {l1_size} entries for a virtual size of {size} "
                          f"bytes needs {needed_l1}")
    _check_table("L1 table", l1_table_offset, l1_size * 8, cluster_size, file_size)
    if refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise FormatError(f"refcount table too large ({refcount_table_clusters} clusters)")
    _check_table("refcount table", refcount_table_offset, refcount_table_clusters * cluster_size,
                 cluster_size, file_size)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise FormatError(f"too many snapshots ({nb_snapshots}, limit {MAX_SNAPSHOTS})")
    # QEMU validates the snapshot table's offset even when there are no snapshots.
    if snapshots_offset % cluster_size or snapshots_offset + 40 * nb_snapshots >= 1 << 63:
        raise FormatError(f"snapshots_offset {snapshots_offset:#x} is invalid (not aligned to the "
                          f"cluster size {cluster_size})")
    if nb_snapshots:
        _check_table("snapshot table", snapshots_offset, 40 * nb_snapshots, cluster_size, file_size)

    if incompatible & _INCOMPATIBLE_DATA_FILE:
        pass  # the name is optional: the caller may pass the data file explicitly
    elif ext_fields.get("data_file") is not None:
        raise FormatError("external data file name present without the data file feature bit")
    elif fields.get("autoclear_features", 0) & Autoclear.DATA_FILE_RAW:
        raise FormatError("data-file-raw set without an external data file")
    if ext_fields.get("bitmaps") is not None and not (
            fields.get("autoclear_features", 0) & Autoclear.BITMAPS):
        ext_fields["bitmaps"] = None  # stale extension: QEMU ignores it without the autoclear bit
        fields["stale_bitmaps"] = True
    if ext_fields.get("crypto_header") is not None and crypt_method != CryptMethod.LUKS:
        # QEMU qcow2_read_extensions(): only LUKS has a full disk encryption header.
        raise FormatError("full disk encryption header extension in an image that is not "
                          "LUKS-encrypted")
    return Header(**fields, **ext_fields)


def read_header(fd: int, file_size: int, *, tables_in_file: bool = True,
                name: str | None = None, allow_encrypted: bool = False) -> Header:
    """Parse the header of the QCOW2 image open on `fd` (reads at most its first cluster).

    With `tables_in_file=False` the L1, refcount and snapshot tables may extend past the end of
    the file (QEMU opens such images and reads zeros there; `check` reports them), and a
    missing refcount table is accepted as `qemu-img check` accepts it (QEMU's BDRV_O_CHECK);
    call `require_refcount_table` to refuse it as every other qemu-img command does.
    Errors name the image as `name` when given (`x.img: not a QCOW2 image (bad magic)`).
    """
    try:
        # The header area is read in one page, as QEMU reads it in small pieces, unless it runs
        # further: a whole-cluster read at offset 0 has the kernel read ahead over the file,
        # and cached pages over unwritten extents turn ext4's SEEK_HOLE answers (block status
        # of metadata-preallocated images) into data, for this open and for qemu-img after it.
        first = os.pread(fd, HEADER_PAGE, 0)
        if len(first) >= 24 and first[:4] == QCOW_MAGIC:
            cluster_bits = int.from_bytes(first[20:24], "big")
            span = min(1 << min(max(cluster_bits, 9), MAX_CLUSTER_BITS), file_size)
            if len(first) < span and _header_end(first, span) > len(first):
                first = os.pread(fd, span, 0)
        header = parse_header(first, file_size if tables_in_file else 1 << 63,
                              allow_encrypted=allow_encrypted)
        if tables_in_file:
            require_refcount_table(header)
        return header
    except QcowError as exc:
        if name is None:
            raise
        raise type(exc)(f"{name}: {exc}") from None


def warn_stale_bitmaps(header: Header, name: str) -> None:
    """Warn (StaleBitmapsWarning) as qemu-img does on opening an image whose bitmaps extension
    lost its autoclear bit (qcow2_read_extensions(); qcowfast reads such images all the same)."""
    if header.stale_bitmaps:
        import warnings
        from .errors import StaleBitmapsWarning
        warnings.warn(f"{name}: a program lacking bitmap support modified this file, so all "
                      "bitmaps are now considered inconsistent; some clusters may be leaked "
                      "('qemu-img check -r' frees them)", StaleBitmapsWarning, stacklevel=2)


def _header_end(head: bytes, span: int) -> int:
    """Where the bytes parse_header reads end, judged from the file's first bytes `head`;
    `span` (the whole first cluster) when `head` does not show it: the extension chain leaves
    `head` before its end marker, or the backing file name lies beyond it."""
    if len(head) < V3_HEADER_LENGTH:
        return span
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    start = int.from_bytes(head[100:104], "big") if version >= 3 else V2_HEADER_LENGTH
    area_end = min(backing_offset or span, span)
    offset = start
    while offset < area_end:                    # the walk of _parse_extensions
        if offset + _EXT.size > len(head):
            return span
        ext_type, length = _EXT.unpack_from(head, offset)
        offset += _EXT.size
        if ext_type == ExtensionType.END:
            break
        offset += (length + 7) & ~7
    end = max(offset, start, backing_offset + backing_size if backing_offset else 0)
    return end if end <= len(head) else span


HEADER_PAGE = 4096


def require_refcount_table(header: Header) -> None:
    """Refuse an image without a refcount table, as QEMU's qcow2_do_open() does at open."""
    if header.refcount_table_clusters == 0:
        raise FormatError("refcount_table_clusters is 0: the image does not contain a reference "
                          "count table")


def _check_compression(compression_type: int, incompatible: int) -> None:
    # QEMU validate_compression_type(): the incompatible bit is set iff the type is not zlib.
    if compression_type not in (CompressionType.ZLIB, CompressionType.ZSTD):
        raise UnsupportedFeature(f"unknown compression type {compression_type}")
    has_bit = bool(incompatible & _INCOMPATIBLE_COMPRESSION_TYPE)
    if has_bit != (compression_type != CompressionType.ZLIB):
        raise FormatError("compression type feature bit must be set exactly when the compression "
                          f"type is not zlib (type {compression_type})")


def _decode_name(raw: bytes, what: str) -> str:
    """A file name stored in the header: bytes that are not UTF-8 are kept as surrogate escapes
    (os functions encode them back; qemu-img takes any bytes)."""
    return raw.decode("utf-8", "surrogateescape")


def _parse_extensions(data: bytes, start: int, area_end: int) -> dict:
    """Walk the header extensions in [start, area_end) (QEMU qcow2_read_extensions).

    `data` may stop before `area_end` when the file does: an extension cut by the end of the file
    is a TruncatedImage, one longer than the header area a FormatError.
    """
    out: dict = {}
    found = []
    offset = start
    end = min(area_end, len(data))
    while offset < area_end:
        # QEMU checks both the 8-byte extension header and its data against the end of the
        # area before it looks at the type ("Header extension too large"), so even an end
        # marker must fit.
        if offset + _EXT.size > area_end:
            raise FormatError(f"header extension at {offset:#x}: its 8-byte header runs past the "
                              f"end of the header area at {area_end:#x} (header extension too "
                              "large)")
        if offset >= len(data):
            break  # past the end of the file QEMU reads zeros: the end marker
        if offset + _EXT.size > len(data):
            raise TruncatedImage(f"header extension at {offset:#x} runs past the end of the file "
                                 f"({len(data)} bytes)")
        ext_type, length = _EXT.unpack_from(data, offset)
        offset += _EXT.size
        if length > area_end - offset:
            raise FormatError(f"header extension {ext_type:#010x} at {offset - _EXT.size:#x}: "
                              f"length {length} runs past the end of the header area "
                              f"({area_end - offset} bytes left; header extension too large)")
        if ext_type == ExtensionType.END:
            break
        if length > end - offset:
            raise TruncatedImage(f"header extension {ext_type:#010x} at {offset - _EXT.size:#x}: "
                                 f"{length} bytes run past the end of the file ({len(data)} bytes)")
        # An extension may appear twice (qcow2.txt says it SHOULD NOT): QEMU reads each in
        # turn, and the later one's values replace the earlier one's.
        payload = data[offset:offset + length]
        found.append(Extension(ext_type, offset, length))
        # Both are C strings to QEMU (a NUL ends them); an empty format means "probe".
        if ext_type == ExtensionType.BACKING_FORMAT:
            if length >= BACKING_FORMAT_SIZE:       # qcow2_read_extensions(): char[16]
                raise FormatError(f"ext_backing_format: len={length} too large "
                                  f"(>={BACKING_FORMAT_SIZE})")
            out["backing_format"] = _decode_name(payload.split(b"\0", 1)[0],
                                                 "backing format") or None
        elif ext_type == ExtensionType.DATA_FILE:
            out["data_file"] = _decode_name(payload.split(b"\0", 1)[0], "external data file name")
        elif ext_type == ExtensionType.FEATURE_TABLE:
            names = {}
            for i in range(length // 48):
                kind, bit = payload[i * 48], payload[i * 48 + 1]
                name = payload[i * 48 + 2:i * 48 + 48].split(b"\0", 1)[0]
                names[(kind, bit)] = name.decode("utf-8", "replace")
            out["feature_names"] = names
        elif ext_type == ExtensionType.BITMAPS:
            if length != _BITMAPS_EXT.size:
                raise FormatError(f"bitmaps extension length {length}, expected {_BITMAPS_EXT.size}")
            nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(payload)
            if reserved:
                raise FormatError("bitmaps extension reserved field is not zero")
            if nb > MAX_BITMAPS or dir_size > MAX_BITMAP_DIRECTORY_BYTES:
                raise FormatError(f"bitmaps extension: {nb} bitmaps / directory of {dir_size} bytes "
                                  "exceed QEMU's limits")
            out["bitmaps"] = BitmapsExtension(nb, dir_size, dir_offset)
        elif ext_type == ExtensionType.CRYPTO:
            if length != _CRYPTO_EXT.size:
                raise FormatError(f"encryption header extension length {length}, expected 16")
            out["crypto_header"] = _CRYPTO_EXT.unpack(payload)
        offset += (length + 7) & ~7
    out["extensions"] = tuple(found)
    return out
