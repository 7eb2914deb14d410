"""QCOW2 header and header-extension parsing, with every check done before a table is read.

Layout and rules: QEMU docs/interop/qcow2.txt ("Header", "Header extensions"); the checks are
QEMU 7.2's qcow2_do_open() and qcow2_read_extensions(), in their order and words, plus the
file-size bounds QEMU leaves to later reads (it reads zeros past the end of the file).
"""
from __future__ import annotations

import os
import struct
import warnings

from ._record import field, record
from .constants import (
    BACKING_FORMAT_SIZE, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS, MIN_CLUSTER_BITS, QCOW_MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH, Autoclear,
    CompressionType, CryptMethod, ExtensionType, IMPLEMENTED_INCOMPATIBLE, Incompatible,
)
from .errors import (
    EncryptedImage, FormatError, QcowError, StaleBitmapsWarning, TruncatedImage, UnsupportedFeature,
)

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS       # QCOW2_MAX_BITMAP_DIRECTORY_SIZE


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


# QEMU's bounds (block/qcow2.c, include/block/block_int-common.h).
_INT_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_BDRV_MAX_LENGTH = _INT64_MAX - (1 << 30) + 1    # QEMU_ALIGN_DOWN(INT64_MAX, 1 GiB)
_SNAPSHOT_ENTRY = 40                             # sizeof(QCowSnapshotHeader)
_QEMU_HEADER = 112                               # sizeof(QCowHeader): what QEMU reads first


def _refusal(cls: type, words: str, detail: str | None = None) -> QcowError:
    """A `cls` saying QEMU's `words` (then qcowfast's `detail`), with the words alone in
    `qemu_chain`: qemu-img prints "Could not open 'X': WORDS"."""
    exc = cls(f"{words} ({detail})" if detail else words)
    exc.qemu_chain = words
    return exc


def parse_header(data: bytes, file_size: int, *, allow_encrypted: bool = False,
                 refcount_table: bool = False, name: str | None = None,
                 warn: bool = True, data_file_name: bool = False) -> Header:
    """Parse and validate a header from the first cluster (or less, at end of file) of an image.

    `data` must hold the first min(file_size, 2 MiB) bytes; all offsets are checked against
    `file_size`. The checks are QEMU's qcow2_do_open() ones, in its order: of two faults, the
    one QEMU meets first is reported, in QEMU's words (each error's `qemu_chain` holds them).
    Then qcowfast refuses what QEMU would read as zeros past the end of the file
    (TruncatedImage); a file cut inside its header is a TruncatedImage, whatever QEMU says of
    the zeros it reads there (its words are the error's `qemu_chain`).

    `allow_encrypted` opens as qemu-img info does (BDRV_O_NO_IO): encrypted images and the
    data-file-raw flag are described, not refused. `refcount_table` refuses an image without a
    refcount table, as every qemu-img command but check does (BDRV_O_CHECK). `data_file_name`
    refuses, where QEMU opens the external data file, an image that needs one and names none
    (the caller gives none: data_file=).
    Raises FormatError, TruncatedImage, UnsupportedFeature or EncryptedImage; before it, the
    StaleBitmapsWarning (naming the image as `name`) where QEMU's extension walk printed it
    before the fault (see warn_stale_bitmaps), unless not `warn` (a look at the header that is
    no open of the image: a batch planning its jobs).
    """
    short: list[QcowError] = []         # the header itself cut by the end of the file
    cut: list[QcowError] = []           # then the other reads past it (the header area first)
    warned: list[int] = []              # QEMU warned of stale bitmaps before its verdict
    try:
        try:
            fields = _qcow2_do_open(data, file_size, short, cut, warned, allow_encrypted,
                                    refcount_table, data_file_name)
        except QcowError as exc:
            if short:
                short[0].qemu_chain = exc.qemu_chain
                raise short[0] from None
            raise
        for exc in short + cut:
            exc.qemu_chain = str(exc)
            raise exc
    except QcowError:
        if warned and warn:             # (on success the caller warns: warn_stale_bitmaps)
            warnings.warn(stale_bitmaps_warning(warned[0], name), stacklevel=3)
        raise
    return Header(**fields)


def _qcow2_do_open(data: bytes, file_size: int, short: list, cut: list, warned: list,
                   allow_encrypted: bool, refcount_table: bool, data_file_name: bool) -> dict:
    """The fields of the header in `data`, checked in qcow2_do_open()'s order on what QEMU
    reads (zeros past the end of the file); raises QEMU's refusals. What lies past the end of
    the file is noted in `short` (the header) and `cut` (the rest) instead; the version, in
    `warned`, once QEMU's walk of the extensions has warned of stale bitmaps."""
    if len(data) < V2_HEADER_LENGTH and (len(data) < 4 or data[:4] == QCOW_MAGIC):
        short.append(TruncatedImage(f"file is {len(data)} bytes, shorter than a QCOW2 header "
                                  "(72 bytes)"))
    head = data if len(data) >= _QEMU_HEADER else data.ljust(_QEMU_HEADER, b"\0")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
     l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
     snapshots_offset) = _V2.unpack_from(head)
    if magic != QCOW_MAGIC:
        raise _not_qcow2()
    if version not in (2, 3):
        raise _refusal(UnsupportedFeature, f"Unsupported qcow2 version {version}",
                       "only versions 2 and 3 exist")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _refusal(FormatError, f"Unsupported cluster size: 2^{cluster_bits}",
                       f"cluster_bits {cluster_bits} out of range "
                       f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    fields = dict(version=version, backing_file_offset=backing_file_offset,
                  backing_file_size=backing_file_size, cluster_bits=cluster_bits, size=size,
                  crypt_method=crypt_method, l1_size=l1_size, l1_table_offset=l1_table_offset,
                  refcount_table_offset=refcount_table_offset,
                  refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
                  snapshots_offset=snapshots_offset)
    incompatible = autoclear = 0
    header_length, refcount_order = V2_HEADER_LENGTH, 4
    if version == 3:
        if len(data) < V3_HEADER_LENGTH and not short:
            short.append(TruncatedImage(f"file is {len(data)} bytes, shorter than a version 3 "
                                      "header"))
        incompatible, compatible, autoclear, refcount_order, header_length = \
            _V3.unpack_from(head, V2_HEADER_LENGTH)
        # qcow2.txt asks for a multiple of 8; QEMU checks only the minimum (and then reads the
        # extensions from wherever header_length points).
        if header_length < V3_HEADER_LENGTH:
            raise _refusal(FormatError, "qcow2 header too short",
                           f"header_length {header_length} is below 104")
        fields.update(incompatible_features=incompatible, compatible_features=compatible,
                      autoclear_features=autoclear, refcount_order=refcount_order,
                      header_length=header_length)
    if header_length > cluster_size:
        raise _refusal(FormatError, "qcow2 header exceeds cluster size",
                       f"header_length {header_length} exceeds the cluster size {cluster_size}")
    if header_length > len(data) and not short:
        short.append(TruncatedImage(f"header_length {header_length} runs past the end of the "
                                  "file"))
    if backing_file_offset > cluster_size:
        raise _refusal(FormatError, "Invalid backing file offset",
                       f"{backing_file_offset:#x} lies past the first cluster")
    # A compression type byte only in headers longer than 104 bytes (else zlib).
    compression_type = head[104] if header_length > 104 else CompressionType.ZLIB
    fields["compression_type"] = compression_type
    _check_compression(compression_type, incompatible)

    # Extensions run up to the backing file name, or to the end of the first cluster. QEMU
    # reads them twice: for the names of unknown features, then (below) to use them.
    area_end = backing_file_offset if backing_file_offset else cluster_size
    ext_fields, ext_error, feature_table = _parse_extensions(
        data, header_length, area_end, cluster_size, crypt_method, autoclear, allow_encrypted,
        cut)
    if backing_file_offset and backing_file_offset + backing_file_size > len(data):
        cut.append(TruncatedImage("backing file name runs past the end of the file"))

    unknown = incompatible & ~int(IMPLEMENTED_INCOMPATIBLE)
    if unknown:
        if ext_fields.get("stale_bitmaps"):
            warned.append(version)      # (QEMU walks them once more for the feature names)
        bits = [b for b in range(64) if unknown >> b & 1]
        raise _refusal(UnsupportedFeature, _unsupported_features(feature_table, unknown),
                       "incompatible feature " + ", ".join(f"bit {b}" for b in bits))
    if incompatible & _INCOMPATIBLE_EXTENDED_L2 and cluster_bits < 14:
        raise _refusal(FormatError, f"Unsupported subcluster size: {cluster_size // 32}",
                       "extended L2 entries need clusters of at least 16 KiB")
    if refcount_order > 6:
        raise _refusal(FormatError, "Reference count entry width too large; may not exceed "
                       "64 bits", f"refcount_order {refcount_order}")
    if refcount_table and refcount_table_clusters == 0:
        raise _no_refcount_table()
    _validate_table("Reference count table", "refcount table", refcount_table_offset,
                    refcount_table_clusters, cluster_size, MAX_REFTABLE_BYTES, "clusters",
                    cluster_size)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise _refusal(FormatError, "Snapshot table too large",
                       f"{nb_snapshots} snapshots, limit {MAX_SNAPSHOTS}")
    # (QEMU validates the snapshot table's offset even when there are no snapshots.)
    if snapshots_offset % cluster_size:
        raise _refusal(FormatError, "Snapshot table offset invalid",
                       f"snapshots_offset {snapshots_offset:#x} is not aligned to the cluster "
                       f"size {cluster_size}")
    if snapshots_offset + _SNAPSHOT_ENTRY * nb_snapshots > _INT64_MAX:
        raise _refusal(FormatError, "Snapshot table offset invalid",
                       f"the snapshot table at {snapshots_offset:#x} would end past 2^63")
    _validate_table("Active L1 table", "L1 table", l1_table_offset, l1_size, 8, MAX_L1_BYTES,
                    "entries", cluster_size)
    # size_to_l1(): QEMU's uint64 sum wraps, so a size just below 2^64 needs no L1 entry.
    shift = cluster_bits + cluster_bits - (4 if incompatible & _INCOMPATIBLE_EXTENDED_L2 else 3)
    l1_needed = ((size + (1 << shift) - 1) & ((1 << 64) - 1)) >> shift
    if l1_needed > _INT_MAX:
        raise _refusal(FormatError, "Image is too big",
                       f"a virtual size of {size} bytes needs {l1_needed} L1 entries")
    if l1_size < l1_needed:
        raise _refusal(FormatError, "L1 table is too small",
                       f"{l1_size} entries for a virtual size of {size} bytes, which needs "
                       f"{l1_needed}")
    _check_in_file("L1 table", l1_table_offset, l1_size * 8, file_size, cut)
    if crypt_method not in (CryptMethod.NONE, CryptMethod.AES, CryptMethod.LUKS):
        # (qcow2_do_open() prints the uint32 field with %d)
        signed = crypt_method - (1 << 32) if crypt_method >> 31 else crypt_method
        raise _refusal(EncryptedImage, f"Unsupported encryption method {signed}",
                       "qcowfast does not decrypt images")
    _check_in_file("refcount table", refcount_table_offset,
                   refcount_table_clusters * cluster_size, file_size, cut)
    if nb_snapshots:
        _check_in_file("snapshot table", snapshots_offset, _SNAPSHOT_ENTRY * nb_snapshots,
                       file_size, cut)
    # qcow2_read_extensions() proper: it warns of stale bitmaps where it meets them.
    if ext_fields.get("stale_bitmaps") and not warned:
        warned.append(version)
    if ext_error is not None:
        raise ext_error

    if not allow_encrypted:
        # (qemu-img info opens neither the data file nor the encryption: BDRV_O_NO_IO.)
        if incompatible & _INCOMPATIBLE_DATA_FILE:
            if data_file_name and not ext_fields.get("data_file"):
                raise _no_data_file(ext_fields.get("data_file"))
        elif autoclear & _AUTOCLEAR_DATA_FILE_RAW:
            raise _refusal(FormatError, "data-file-raw requires a data file",
                           "the data-file-raw autoclear bit is set without the external data "
                           "file feature bit")
        if crypt_method == CryptMethod.AES:
            raise _refusal(EncryptedImage, "image is encrypted (legacy AES); qcowfast does not "
                           "decrypt images")
        if crypt_method == CryptMethod.LUKS:        # (with the extension: refused there)
            raise _refusal(EncryptedImage, "Missing CRYPTO header for crypt method 2",
                           "a LUKS-encrypted image without its full disk encryption header "
                           "extension")
    if backing_file_offset:
        if backing_file_size > min(MAX_BACKING_NAME, cluster_size - backing_file_offset):
            raise _refusal(FormatError, "Backing file name too long",
                           f"{backing_file_size} bytes at {backing_file_offset:#x}")
        # A C string to QEMU (qcow2_do_open() pstrcpy()s it): the name ends at a NUL byte.
        raw = data[backing_file_offset:backing_file_offset + backing_file_size]
        fields["backing_file"] = _decode_name(raw.split(b"\0", 1)[0], "backing file name")
    # bdrv_open_driver() -> bdrv_refresh_total_sectors(), once the image is open.
    if size // 512 * 512 > _BDRV_MAX_LENGTH:
        raise _refusal(FormatError, "Could not refresh total sector count: File too large",
                       f"a virtual size of {size} bytes")
    if ext_fields.pop("stale_bitmaps", False):
        fields["stale_bitmaps"] = True      # QEMU ignores a bitmaps extension without its bit
    fields.update(ext_fields)
    return fields


def _not_qcow2() -> QcowError:
    exc = FormatError("not a QCOW2 image (bad magic)")
    exc.qemu_chain = "Image is not in qcow2 format"
    return exc


def _no_data_file(name: str | None) -> QcowError:
    """The image needs an external data file and names none (`name` None) or an empty one:
    qcow2_do_open() refuses the first, bdrv_open_child() the file "" (QEMU's words in
    `qemu_chain`)."""
    exc = FormatError("needs an external data file but names "
                      f"{'none' if name is None else 'an empty one'}; pass data_file=PATH")
    exc.qemu_chain = ("'data-file' is required for this image" if name is None
                      else "The 'file' block driver requires a file name")
    return exc


def _no_refcount_table() -> QcowError:
    return _refusal(FormatError, "Image does not contain a reference count table",
                    "refcount_table_clusters is 0")


def _validate_table(name: str, what: str, offset: int, entries: int, entry_size: int,
                    max_bytes: int, unit: str, cluster_size: int) -> None:
    """QEMU's qcow2_validate_table(): at most `max_bytes`, cluster aligned, ending below 2^63.
    An end past that is a TruncatedImage (no file is that long), in QEMU's words."""
    if entries > max_bytes // entry_size:
        raise _refusal(FormatError, f"{name} too large",
                       f"{entries} {unit}, limit {max_bytes // entry_size}")
    if offset % cluster_size:
        raise _refusal(FormatError, f"{name} offset invalid",
                       f"{what} offset {offset:#x} is not aligned to the cluster size "
                       f"{cluster_size}")
    if offset + entries * entry_size > _INT64_MAX:
        raise _refusal(TruncatedImage, f"{name} offset invalid",
                       f"{what} at {offset:#x} would end past 2^63")


def _check_in_file(name: str, offset: int, nbytes: int, file_size: int, cut: list) -> None:
    if nbytes and offset + nbytes > file_size:
        cut.append(TruncatedImage(f"{name} at {offset:#x} ({nbytes} bytes) runs past the end "
                                  f"of the file ({file_size} bytes)"))


def _unsupported_features(table: bytes, mask: int) -> str:
    """report_unsupported_feature(): the names the feature table gives the bits of `mask`, in
    table order (each bit once; the table ends at an empty name), then the bits left in hex."""
    names = []
    for i in range(0, len(table) - 47, 48):
        kind, bit, name = table[i], table[i + 1], table[i + 2:i + 48].split(b"\0", 1)[0]
        if not name:
            break
        bit &= 63                       # (C's 1ULL << bit on x86: the count taken mod 64)
        if kind == 0 and mask >> bit & 1:
            names.append(name.decode("utf-8", "surrogateescape"))
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def read_header(fd: int, file_size: int, *, tables_in_file: bool = True,
                name: str | None = None, allow_encrypted: bool = False,
                refcount_table: bool | None = None, warn: bool = True,
                data_file_name: bool = False) -> Header:
    """Parse the header of the QCOW2 image open on `fd` (reads at most its first cluster).

    With `tables_in_file=False` the L1, refcount and snapshot tables may extend past the end of
    the file (QEMU opens such images and reads zeros there; `check` reports them), and a
    missing refcount table is accepted as `qemu-img check` accepts it (QEMU's BDRV_O_CHECK),
    unless `refcount_table` (default: `tables_in_file`) asks to refuse it in QEMU's order.
    Errors name the image as `name` when given (`x.img: not a QCOW2 image (bad magic)`); their
    `qemu_chain` and `qemu_top` hold qemu-img's line ("Could not open 'TOP': CHAIN"). `warn`
    and `data_file_name`: as in parse_header.
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
        return parse_header(first, file_size if tables_in_file else 1 << 63,
                            allow_encrypted=allow_encrypted,
                            refcount_table=tables_in_file if refcount_table is None
                            else refcount_table, name=name, warn=warn,
                            data_file_name=data_file_name)
    except QcowError as exc:
        if name is None:
            raise
        named = type(exc)(f"{name}: {exc}")
        named.qemu_chain, named.qemu_top = exc.qemu_chain, name
        raise named from None


# qcow2_read_extensions()'s warn_report() (v2 images get their own words) and error_printf():
# its last line ends without a newline.
_STALE_WORDS = {3: "a program lacking bitmap support modified this file, so all bitmaps are "
                   "now considered inconsistent",
                2: "This qcow2 v2 image contains bitmaps, but they may have been modified by a "
                   "program without persistent bitmap support; so now they must all be "
                   "considered inconsistent"}
_LEAKED = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."


def stale_bitmaps_warning(version: int, name: str | None) -> StaleBitmapsWarning:
    """The StaleBitmapsWarning of an image (`version` 2 or 3) named `name` (None: unknown):
    its message names the file; `qemu_text` holds what qemu-img prints after "warning: "."""
    words = _STALE_WORDS[3 if version >= 3 else 2]
    warning = StaleBitmapsWarning((f"{name}: " if name else "") + f"{words}; some clusters "
                                  "may be leaked ('qemu-img check -r' frees them)")
    warning.qemu_text = f"{words}\n{_LEAKED}"
    return warning


def warn_stale_bitmaps(header: Header, name: str) -> None:
    """Warn (StaleBitmapsWarning) as qemu-img does on opening an image whose bitmaps extension
    lost its autoclear bit (qcow2_read_extensions(); qcowfast reads such images all the same).
    Where the header is refused after that walk, read_header has warned already."""
    if header.stale_bitmaps:
        warnings.warn(stale_bitmaps_warning(header.version, name), stacklevel=2)


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
        raise _no_refcount_table()


def _check_compression(compression_type: int, incompatible: int) -> None:
    # QEMU validate_compression_type(): the incompatible bit is set iff the type is not zlib.
    if compression_type not in (CompressionType.ZLIB, CompressionType.ZSTD):
        raise _refusal(UnsupportedFeature, f"qcow2: unknown compression type: {compression_type}")
    has_bit = bool(incompatible & _INCOMPATIBLE_COMPRESSION_TYPE)
    if has_bit != (compression_type != CompressionType.ZLIB):
        raise _refusal(FormatError, "qcow2: Compression type incompatible feature bit must "
                       + ("not be set" if has_bit else "be set"))


def _decode_name(raw: bytes, what: str) -> str:
    """A file name stored in the header: bytes that are not UTF-8 are kept as surrogate escapes
    (os functions encode them back; qemu-img takes any bytes)."""
    return raw.decode("utf-8", "surrogateescape")


def _parse_extensions(data: bytes, start: int, area_end: int, cluster_size: int,
                      crypt_method: int, autoclear: int, allow_encrypted: bool,
                      cut: list) -> tuple[dict, QcowError | None, bytes]:
    """Walk the header extensions in [start, area_end) as QEMU's qcow2_read_extensions().

    Returns what they say, the error the walk stopped at (None: none; qcow2_do_open() meets it
    late), and the last feature table read before it (what QEMU names unknown features from).
    Past the end of `data` (of the file) QEMU reads zeros: so does the walk, noting in `cut`
    an extension the end of the file cuts.
    """
    out: dict = {}
    found = []
    table = b""
    error = None
    offset = start
    while offset < area_end:
        # The 8-byte header, then the data, must fit in the area, whatever the type.
        if offset + _EXT.size > area_end:
            error = _refusal(FormatError, "Header extension too large",
                             f"header extension at {offset:#x}: its 8-byte header runs past "
                             f"the end of the header area at {area_end:#x}")
            break
        if offset >= len(data):
            break                           # zeros: the end marker
        if offset + _EXT.size > len(data):
            cut.append(TruncatedImage(f"header extension at {offset:#x} runs past the end of "
                                      f"the file ({len(data)} bytes)"))
        ext_type, length = _EXT.unpack(data[offset:offset + _EXT.size].ljust(_EXT.size, b"\0"))
        offset += _EXT.size
        if length > area_end - offset:
            error = _refusal(FormatError, "Header extension too large",
                             f"header extension {ext_type:#010x} at {offset - _EXT.size:#x}: "
                             f"length {length} runs past the end of the header area, "
                             f"{area_end - offset} bytes left")
            break
        if ext_type == ExtensionType.END:
            break
        payload = data[offset:offset + length]
        if len(payload) < length:
            cut.append(TruncatedImage(f"header extension {ext_type:#010x} at "
                                      f"{offset - _EXT.size:#x}: {length} bytes run past the end "
                                      f"of the file ({len(data)} bytes)"))
            payload = payload.ljust(length, b"\0")
        # An extension may appear twice (qcow2.txt says it SHOULD NOT): QEMU reads each in
        # turn, and the later one's values replace the earlier one's.
        found.append(Extension(ext_type, offset, length))
        error = _read_extension(out, ext_type, payload, cluster_size, crypt_method, autoclear,
                                allow_encrypted)
        if error is not None:
            break
        if ext_type == ExtensionType.FEATURE_TABLE:
            table = payload + bytes(96)     # QEMU's copy ends with two zeroed entries
        offset += (length + 7) & ~7
    out["extensions"] = tuple(found)
    return out, error, table


def _read_extension(out: dict, ext_type: int, payload: bytes, cluster_size: int,
                    crypt_method: int, autoclear: int, allow_encrypted: bool) -> QcowError | None:
    """Read one extension into `out`; the error QEMU stops at, if any."""
    length = len(payload)
    # Names are C strings to QEMU (a NUL ends them); an empty backing format means "probe".
    if ext_type == ExtensionType.BACKING_FORMAT:
        if length >= BACKING_FORMAT_SIZE:           # BlockDriverState.backing_format[16]
            return _refusal(FormatError, f"ERROR: ext_backing_format: len={length} too large "
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
        return _read_bitmaps_extension(out, payload, cluster_size, autoclear)
    elif ext_type == ExtensionType.CRYPTO:
        if crypt_method != CryptMethod.LUKS:
            return _refusal(FormatError, "CRYPTO header extension only expected with LUKS "
                            "encryption method")
        if length != _CRYPTO_EXT.size:
            return _refusal(FormatError, f"CRYPTO header extension size {length}, but "
                            f"expected size {_CRYPTO_EXT.size}")
        offset, size = _CRYPTO_EXT.unpack(payload)
        if offset % cluster_size:
            return _refusal(FormatError, f"Encryption header offset '{offset}' is not a "
                            f"multiple of cluster size '{cluster_size}'")
        if not allow_encrypted:                     # (where QEMU asks for the key)
            return _refusal(EncryptedImage, "image is encrypted (LUKS); qcowfast does not "
                            "decrypt images")
        out["crypto_header"] = (offset, size)
    return None


def _read_bitmaps_extension(out: dict, payload: bytes, cluster_size: int,
                            autoclear: int) -> QcowError | None:
    if len(payload) != _BITMAPS_EXT.size:
        return _refusal(FormatError, "bitmaps_ext: Invalid extension length",
                        f"{len(payload)} bytes, expected {_BITMAPS_EXT.size}")
    if not autoclear & Autoclear.BITMAPS:
        out["stale_bitmaps"] = True         # QEMU ignores it (warn_stale_bitmaps)
        return None
    nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(payload)
    if reserved:
        return _refusal(FormatError, "bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        return _refusal(FormatError, f"bitmaps_ext: Image has {nb} bitmaps, exceeding the "
                        f"QEMU supported maximum of {MAX_BITMAPS}")
    if nb == 0:
        return _refusal(FormatError, "found bitmaps extension with zero bitmaps")
    if dir_offset % cluster_size:
        return _refusal(FormatError, "bitmaps_ext: invalid bitmap directory offset",
                        f"{dir_offset:#x} is not aligned to the cluster size {cluster_size}")
    if dir_size > MAX_BITMAP_DIRECTORY_BYTES:
        return _refusal(FormatError, f"bitmaps_ext: bitmap directory size ({dir_size}) "
                        f"exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_BYTES})")
    out["bitmaps"] = BitmapsExtension(nb, dir_size, dir_offset)
    return None
