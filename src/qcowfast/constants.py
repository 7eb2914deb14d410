"""QCOW2 format constants (docs/interop/qcow2.txt) and the extent vocabulary."""
from enum import IntEnum, IntFlag

QCOW_MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024          # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024     # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536                    # QEMU's QCOW_MAX_SNAPSHOTS
MAX_BACKING_NAME = 1023
BACKING_FORMAT_SIZE = 16                 # QEMU's BlockDriverState.backing_format[16]
# Backing formats read as raw bytes: QEMU's raw format driver and its `file` protocol driver
# (qemu-img create -F file names the latter).
RAW_FORMATS = ("raw", "file")
MAX_CHAIN_DEPTH = 64
MAX_SPARSE_SIZE = 16 << 20               # qemu-img convert -S: MAX_BUF_SECTORS (32768) sectors

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
SUBCLUSTERS_PER_CLUSTER = 32
COMPRESSED_SECTOR_SIZE = 512


class Incompatible(IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class Compatible(IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class Autoclear(IntFlag):
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


#: Incompatible bits this build reads.
IMPLEMENTED_INCOMPATIBLE = (Incompatible.DIRTY | Incompatible.CORRUPT | Incompatible.DATA_FILE
                            | Incompatible.COMPRESSION_TYPE | Incompatible.EXTENDED_L2)

INCOMPATIBLE_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                      3: "compression type", 4: "extended L2 entries"}


class CompressionType(IntEnum):
    ZLIB = 0
    ZSTD = 1


class CryptMethod(IntEnum):
    NONE = 0
    AES = 1
    LUKS = 2


class ExtensionType(IntEnum):
    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    CRYPTO = 0x0537BE77
    DATA_FILE = 0x44415441


class ExtentKind(IntEnum):
    """What serves a run of guest bytes.

    UNALLOCATED: no layer of the chain allocates it; reads as zeros (host_offset set when the
        top layer keeps a host cluster for it: QEMU's unallocated-alloc subclusters).
    ZERO: reads as zeros by a zero flag (host_offset set when the cluster keeps an allocation).
    DATA: plain bytes at host_offset of the layer's data file.
    COMPRESSED: one compressed cluster whose stream starts at host_offset.
    """
    UNALLOCATED = 0
    ZERO = 1
    DATA = 2
    COMPRESSED = 3
