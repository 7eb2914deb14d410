"""What `qemu-img measure` says a new image would take: the file size a conversion to qcow2 or
raw needs ("required"), the size of a fully allocated one, and the space of the source's
persistent bitmaps.

The arithmetic is QEMU 7.2's: block/qcow2.c qcow2_measure(), qcow2_calc_prealloc_size() and
qcow2_refcount_metadata_size(), block/qcow2-bitmap.c qcow2_get_persistent_dirty_bitmap_size(),
block/raw-format.c raw_measure(). The source's allocation is read from the map (mapping.py),
never from its data: a cluster counts when any byte of it is data that does not read as zero
through the whole backing chain, as bdrv_block_status_above() reports it.
"""
from __future__ import annotations

import errno
import os

from ._record import record
from .arguments import boolean, integer
from .constants import MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS

DEFAULT_CLUSTER_SIZE = 65536                # QEMU's DEFAULT_CLUSTER_SIZE
EXTL2_SUBCLUSTERS = 32                      # QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
SECTOR = 512
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")     # QAPI PreallocMode
COMPAT_LEVELS = {"0.10": 2, "1.1": 3}
# QEMU refuses to open a file longer than this (block.c bdrv_refresh_total_sectors(): EFBIG).
BDRV_MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)
_UINT64 = (1 << 64) - 1


@record
class Measurement:
    """Sizes in bytes, as `qemu-img measure` reports them.

    `bitmaps` is None where qemu-img prints no bitmaps size: without a source, for raw output,
    for compat=0.10 output, and for sources other than qcow2 v3 images.
    """
    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict:
        """The object `qemu-img measure --output=json` prints (its key order; QAPI's int64,
        so a size past 2**63 - 1 wraps negative as in QEMU)."""
        out = {} if self.bitmaps is None else {"bitmaps": _int64(self.bitmaps)}
        out["required"] = _int64(self.required)
        out["fully-allocated"] = _int64(self.fully_allocated)
        return out

    def format_human(self) -> str:
        """The lines of `qemu-img measure` (printf's PRIu64 of QEMU's int64 fields)."""
        text = (f"required size: {self.required & _UINT64}\n"
                f"fully allocated size: {self.fully_allocated & _UINT64}\n")
        if self.bitmaps is not None:
            text += f"bitmaps size: {self.bitmaps & _UINT64}\n"
        return text


def _int64(value: int) -> int:
    value &= _UINT64
    return value - (1 << 64) if value >> 63 else value


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, d: int) -> int:
    return _div_round_up(n, d) * d


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table needed to count `clusters` clusters and themselves
    (qcow2_refcount_metadata_size() without its generous increase: a fixed point)."""
    blocks_per_table_cluster = cluster_size // 8
    refcounts_per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool = False) -> int:
    """Bytes of a fully allocated qcow2 image of `total_size` virtual bytes: header, L2 and L1
    tables, refcount structures and data (qcow2_calc_prealloc_size())."""
    l2e_size = 16 if extended_l2 else 8
    aligned = _round_up(total_size, cluster_size)
    meta = cluster_size                                     # the header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def data_size(image, cluster_size: int) -> int:
    """Bytes of the clusters (of `cluster_size`) holding data of `image` (an opened Image or
    RawImage): qcow2_measure()'s block status loop, on the map's entries.

    An entry that is data and not zero counts its clusters whole; zero, unallocated and
    past-the-backing ranges count nothing. Entries arrive in guest order, so a cluster shared
    by two entries is counted once.

    The map's data entries are the chain's DATA and COMPRESSED runs, less the holes of the
    host file inside the DATA runs of raw and metadata-preallocated layers (mapping._entries);
    the runs are counted with numpy, a chunk at a time (a loop over a million map entries
    took seconds).
    """
    import numpy as np

    from .constants import ExtentKind
    from .image import RawImage
    from .mapping import _raw_pieces, metadata_preallocated
    split = {depth: layer for depth, layer in image.by_depth()
             if isinstance(layer, RawImage) or metadata_preallocated(layer)}
    total = counted_to = 0
    for chunk in image._each_step(image._runs(0, image.virtual_size)):
        data = (chunk.kind == ExtentKind.DATA) | (chunk.kind == ExtentKind.COMPRESSED)
        start, length = chunk.guest[data], chunk.length[data]
        if split and len(start):
            start, length = _without_file_holes(
                start, length, chunk.kind[data], chunk.host[data], chunk.depth[data], split,
                _raw_pieces)
        if not len(start):
            continue
        first = start // cluster_size * cluster_size
        end = -(-(start + length) // cluster_size) * cluster_size
        # Runs arrive in guest order and do not overlap, so `end` never decreases: each run
        # counts its clusters from where the runs before it stopped counting.
        before = np.concatenate(([counted_to], end[:-1]))
        total += int(np.maximum(end - np.maximum(first, before), 0).sum())
        counted_to = int(end[-1])
    return total


def _without_file_holes(start, length, kind, host, depth, split: dict, pieces):
    """(start, length) arrays of data runs, each DATA run of a layer in `split` (depth: layer)
    cut to the parts its host file holds data for (SEEK_DATA), as map reports them."""
    import numpy as np

    from .constants import ExtentKind
    cut = np.isin(depth, list(split)) & (kind == ExtentKind.DATA)
    if not cut.any():
        return start, length
    out_s, out_l = [], []
    for i in range(len(start)):
        if not cut[i]:
            out_s.append(int(start[i]))
            out_l.append(int(length[i]))
            continue
        layer = split[int(depth[i])]
        delta = int(start[i]) - int(host[i])          # guest offset - host offset
        for a, n, is_data in pieces(layer.data_fd, int(host[i]), int(length[i])):
            if is_data:
                out_s.append(a + delta)
                out_l.append(n)
    return np.array(out_s, np.int64), np.array(out_l, np.int64)


def bitmaps_size(image, cluster_size: int) -> int:
    """Bytes the persistent bitmaps of qcow2 `image` would take in a new image of
    `cluster_size` clusters (qcow2_get_persistent_dirty_bitmap_size()): each bitmap's data and
    table, whole clusters, as if fully allocated, and the directory.

    The bitmaps are those QEMU loads at open: none when the extension is stale (its autoclear
    bit clear); of bitmaps sharing a name, the first (qcow2_load_dirty_bitmaps() skips a later
    one marked in use). Each covers the image's virtual size.
    """
    from .bitmaps import read_bitmap_directory
    h = image.header
    if h.bitmaps is None:
        return 0
    size, directory, seen = 0, 0, set()
    for bm in read_bitmap_directory(image._fd, h, image.file_size):
        if bm.name in seen:
            continue
        seen.add(bm.name)
        # get_bitmap_bytes_needed(): one bit per granule, rounded up to whole bytes.
        nbytes = _div_round_up(_div_round_up(image.virtual_size, bm.granularity), 8)
        clusters = _div_round_up(nbytes, cluster_size)
        size += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        # calc_dir_entry_size(): the 24-byte entry and the name, 8-byte aligned.
        directory += _round_up(24 + len(bm.name.encode("utf-8", "surrogateescape")), 8)
    return size + _round_up(directory, cluster_size)


def check_qcow2_options(size: int = 0, *, cluster_size: int | None = None,
                        refcount_bits: int | None = None, extended_l2: bool | None = None,
                        compat: str | None = None, preallocation: str | None = None) -> tuple:
    """Check qcow2 creation options as qcow2_measure() does, in its order, for an image of
    `size` virtual bytes (the size asked for: the check never sees a source's size).

    Returns (cluster_size, refcount_order, extended_l2, version, preallocation), defaults
    filled in. Raises ValueError worded as QEMU words it.
    """
    extended_l2 = bool(extended_l2)
    cs = DEFAULT_CLUSTER_SIZE if cluster_size is None else cluster_size
    # validate_cluster_size(): ctz32() of the size must give it back.
    if not (1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS and cs & (cs - 1) == 0):
        raise ValueError(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} "
                         f"and {1 << (MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cs < SECTOR * EXTL2_SUBCLUSTERS:
        raise ValueError(f"Extended L2 entries are only supported with cluster sizes of at "
                         f"least {SECTOR * EXTL2_SUBCLUSTERS} bytes")
    compat = "1.1" if compat is None else compat
    if compat not in COMPAT_LEVELS:
        raise ValueError(f"Invalid compatibility level: '{compat}'")
    version = COMPAT_LEVELS[compat]
    bits = 16 if refcount_bits is None else refcount_bits
    if not 0 < bits <= 64 or bits & (bits - 1):
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise ValueError("Different refcount widths than 16 bits require compatibility level "
                         "1.1 or above (use compat=1.1 or greater)")
    preallocation = "off" if preallocation is None else preallocation
    if preallocation not in PREALLOCATION_MODES:
        raise ValueError(f"invalid parameter value: {preallocation}")
    # The L1 table must stay within QEMU's QCOW_MAX_L1_SIZE (ROUND_UP() of a uint64: a size
    # within a cluster of 2**64 wraps to 0).
    aligned = _round_up(size, cs) & _UINT64
    l2_tables = _div_round_up(aligned // cs, cs // (16 if extended_l2 else 8))
    if l2_tables * 8 > MAX_L1_BYTES:
        raise ValueError("The image size is too large (try using a larger cluster size)")
    return cs, bits.bit_length() - 1, extended_l2, version, preallocation


def _measure_qcow2(image, size: int, options: dict, backing_file) -> Measurement:
    from .image import Image
    cs, refcount_order, extended_l2, version, prealloc = check_qcow2_options(size, **options)
    virtual_size = _round_up(size, cs)
    required = 0
    if image is not None:
        virtual_size = _round_up(image.virtual_size, cs)
        # With a backing file for the new image, QEMU cannot tell what it would share with
        # the source: every cluster counts.
        required = virtual_size if backing_file is not None else data_size(image, cs)
    if prealloc in ("full", "falloc"):
        required = virtual_size
    fully = prealloc_size(virtual_size, cs, refcount_order, extended_l2)
    # bdrv_supports_persistent_dirty_bitmap(): qcow2 v3 sources only (not raw, not v2).
    bitmaps = None
    if version >= 3 and isinstance(image, Image) and image.header.version >= 3:
        bitmaps = bitmaps_size(image, cs)
    # The metadata of the fully allocated image stays counted: an overestimate, as in QEMU.
    return Measurement(fully - virtual_size + required, fully, bitmaps)


def measure(src=None, /, *, size: int | None = None, format: str = "raw",
            src_format: str | None = None, snapshot=None, cluster_size: int | None = None,
            refcount_bits: int | None = None, extended_l2: bool | None = None,
            compat: str | None = None, preallocation: str | None = None,
            backing_file: str | None = None, backing_dirs=(),
            force_share: bool = False) -> Measurement:
    """Measure the size a new image would take, as `qemu-img measure` does.

    Parameters
    ----------
    src : path, Image or RawImage, optional
        The image whose contents the new image would hold (qcow2 with its backing chain, or
        raw); an opened image is used as it is (and left open). Either `src` or `size`.
    size : int, optional
        The virtual size of a new, empty image (``--size``).
    format : {"raw", "qcow2"}
        Format of the new image (``-O``; qemu-img's default is raw).
    src_format : {None, "qcow2", "raw"}
        Format of `src` given as a path; None probes it.
    snapshot : str, optional
        Measure this internal snapshot of `src` (``-l``: id, name, ``snapshot.id=``,
        ``snapshot.name=``).
    cluster_size, refcount_bits, extended_l2, compat, preallocation, backing_file
        qemu-img's ``-o`` options of a qcow2 image (None: QEMU's default). `compat` is "1.1"
        or "0.10"; `preallocation` "off", "metadata", "falloc" or "full" (full and falloc
        count every cluster as required); with a `backing_file` (never opened) every cluster
        of `src` counts, as QEMU cannot know what the backing file would share.
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing files named in `src` (see `qcowfast.open`).
    force_share : bool
        Read `src` even when a running QEMU holds it open for writing (``-U``).

    Returns
    -------
    Measurement
        `required`, `fully_allocated` and (qcow2 output from a qcow2 v3 source) `bitmaps`.

    Raises
    ------
    ValueError
        An option QEMU refuses (worded as QEMU words it), both or neither of `src` and `size`.
    QcowError
        The source cannot be opened or read (OSError when a file cannot be opened at all).
    """
    if (src is None) == (size is None):
        raise ValueError("give either a source image or size=, not both" if src is not None
                         else "give a source image or size=")
    if format not in ("raw", "qcow2"):
        raise ValueError(f"format {format!r}: qcowfast measures qcow2 and raw images")
    size = integer(size, "size", 0, (1 << 63) - 1, none=True, what="a size in bytes")
    cluster_size = integer(cluster_size, "cluster_size", none=True)
    refcount_bits = integer(refcount_bits, "refcount_bits", none=True)
    if extended_l2 is not None:
        extended_l2 = boolean(extended_l2, "extended_l2")
    if backing_file is not None and not isinstance(backing_file, (str, bytes, os.PathLike)):
        raise TypeError(f"backing_file must be None or a path, not {backing_file!r}")
    qcow2_options = dict(cluster_size=cluster_size, refcount_bits=refcount_bits,
                         extended_l2=extended_l2, compat=compat, preallocation=preallocation)
    if format == "raw":
        given = [k for k, v in qcow2_options.items() if v is not None and k != "preallocation"]
        if backing_file is not None:
            given.append("backing_file")
        if given:
            raise ValueError(f"Invalid parameter '{given[0]}' for format raw")
    if src is None:
        if format == "raw":
            return Measurement(_round_up(size, SECTOR), _round_up(size, SECTOR))
        return _measure_qcow2(None, size, qcow2_options, backing_file)
    from .image import Image, RawImage, open_source
    opened = isinstance(src, (Image, RawImage))
    if opened and (src_format is not None or snapshot is not None):
        raise ValueError("src_format= and snapshot= apply to a source given by its path")
    image = src if opened else open_source(os.fspath(src), src_format, snapshot=snapshot,
                                           backing_dirs=backing_dirs, force_share=force_share)
    try:
        if isinstance(image, RawImage) and image.virtual_size > BDRV_MAX_LENGTH:
            from .errors import ImageOpenError
            raise ImageOpenError(f"File too large (QEMU opens no image longer than "
                                 f"{BDRV_MAX_LENGTH} bytes)", errno.EFBIG,
                                 os.strerror(errno.EFBIG), image.filename)
        if format == "raw":
            # raw_measure(): the source's length; unallocated sectors count in a raw file.
            return Measurement(image.virtual_size, image.virtual_size)
        return _measure_qcow2(image, 0, qcow2_options, backing_file)
    finally:
        if not opened:
            image.close()


__all__ = ["Measurement", "measure", "check_qcow2_options", "prealloc_size",
           "refcount_metadata_size", "data_size", "bitmaps_size"]
