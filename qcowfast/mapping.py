"""The allocation map in `qemu-img map` form, rendered from the extent stream.

Field meanings follow qemu-img.c get_block_status()/entry_mergeable() (QEMU 7.2, the version the
tests compare with): `depth` is the layer that answered, `present` whether any layer allocates
the range, `offset` the host offset when QEMU reports one (not for compressed clusters).
"""
from __future__ import annotations

import os

from .constants import ExtentKind
from .errors import QcowError


def _raw_pieces(fd: int, start: int, length: int):
    """Split [start, start+length) of a raw file into (start, length, is_data) by SEEK_DATA/HOLE."""
    end = start + length
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            data = end                       # ENXIO: only a hole up to the end of the file
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, False
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole - pos, True
        pos = hole


def metadata_preallocated(layer) -> bool:
    """QEMU qcow2_detect_metadata_preallocation(): more clusters have a refcount than the file
    really allocates (st_blocks), by over a ninth. QEMU then reports holes of the host file
    inside data clusters as zero."""
    import numpy as np

    from .refcounts import StoredRefcounts
    st = os.fstat(layer._fd)
    cs = layer.cluster_size
    real_clusters = st.st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-st.st_size // cs)
    refs = StoredRefcounts(layer._fd, layer.header)
    per_block = 1 << refs.block_bits
    count = 0
    for t in range(-(-end_cluster // per_block)):
        if not refs.block_offset(t):
            continue
        blk = refs.block(t)
        if blk is None:
            return False                  # QEMU: the refcount read fails, no detection
        count += int(np.count_nonzero(blk[:min(per_block, end_cluster - t * per_block)]))
        if count > threshold:
            return True
    return False


def _entries(image):
    from .image import RawImage
    prealloc = {}
    for e in image.extents():
        kind = e.kind
        layer = image.layer(e.depth)
        if kind == ExtentKind.DATA and isinstance(layer, RawImage):
            for start, length, is_data in _raw_pieces(layer.data_fd, e.guest_offset, e.length):
                yield dict(start=start, length=length, depth=e.depth, present=True,
                           zero=not is_data, data=is_data, offset=start)
            continue
        if kind == ExtentKind.DATA:
            if e.depth not in prealloc:
                prealloc[e.depth] = metadata_preallocated(layer)
            if prealloc[e.depth]:
                delta = e.host_offset - e.guest_offset
                for start, length, is_data in _raw_pieces(layer.data_fd, e.host_offset, e.length):
                    yield dict(start=start - delta, length=length, depth=e.depth, present=True,
                               zero=not is_data, data=True, offset=start)
                continue
        entry = dict(start=e.guest_offset, length=e.length, depth=e.depth,
                     present=kind != ExtentKind.UNALLOCATED,
                     zero=kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED),
                     data=kind in (ExtentKind.DATA, ExtentKind.COMPRESSED))
        if e.host_offset is not None and kind != ExtentKind.COMPRESSED:
            entry["offset"] = e.host_offset
        yield entry


def _mergeable(a: dict, b: dict) -> bool:
    if any(a[k] != b[k] for k in ("depth", "present", "zero", "data")):
        return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def map_entries(image) -> list[dict]:
    """Return the list `qemu-img map --output=json` prints for `image`."""
    out: list[dict] = []
    for entry in _entries(image):
        if out and _mergeable(out[-1], entry):
            out[-1]["length"] += entry["length"]
        else:
            out.append(entry)
    return out


def format_json(entries: list[dict]) -> str:
    """Render entries exactly as qemu-img map --output=json does."""
    def one(e):
        s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
             f'"present": {str(e["present"]).lower()}, "zero": {str(e["zero"]).lower()}, '
             f'"data": {str(e["data"]).lower()}')
        if "offset" in e:
            s += f', "offset": {e["offset"]}'
        return s + "}"
    return "[" + ",\n".join(one(e) for e in entries) + "]\n"


def format_human(image, entries: list[dict]) -> str:
    """Render the human map of qemu-img: data ranges with their host offset and file."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if not e["data"] or e["zero"]:
            continue
        if "offset" not in e:
            raise QcowError("File contains external, encrypted or compressed clusters.")
        layer = image.layer(e["depth"])
        fname = getattr(layer, "data_file", layer.filename)
        lines.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}{fname}")
    return "\n".join(lines) + "\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"   # C's %#x prints 0 without a prefix
