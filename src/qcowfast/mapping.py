"""The allocation map in `qemu-img map` form, rendered from the extent stream.

Field meanings follow qemu-img.c get_block_status()/entry_mergeable() (QEMU 7.2, the version the
tests compare with): `depth` is the layer that answered, `present` whether any layer allocates
the range, `offset` the host offset when QEMU reports one (not for compressed clusters).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from io import TextIOBase

from .constants import REFT_OFFSET_MASK, ExtentKind
from .errors import CorruptImage, QcowError
from .preads import pread_padded

_BATCH = 4096           # entries formatted per write to the output stream


def _raw_pieces(fd: int, start: int, length: int):
    """Split [start, start+length) of a raw file into (start, length, is_data) by SEEK_DATA/HOLE."""
    end = start + length
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:     # no SEEK_DATA (a block device): all data
                yield pos, end - pos, True
                return
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
    """QEMU qcow2_detect_metadata_preallocation(): at least max(a ninth more, two more)
    clusters have a refcount than the file really allocates (st_blocks). QEMU then reports
    holes of the host file inside data clusters as zero."""
    st = os.fstat(layer._fd)
    cs = layer.cluster_size
    real_clusters = st.st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-st.st_size // cs)
    if end_cluster < threshold:
        return False            # fewer clusters below the end than the count must reach
    from ._plain import count_refcounts
    h = layer.header
    per_block = 1 << (h.cluster_bits + 3 - h.refcount_order)
    entries = min(-(-end_cluster // per_block), h.refcount_table_clusters * cs // 8)
    table = pread_padded(layer._fd, 8 * entries, h.refcount_table_offset)
    count = 0
    for t in range(entries):
        offset = int.from_bytes(table[8 * t:8 * t + 8], "big") & REFT_OFFSET_MASK
        if not offset:
            continue
        if offset & (cs - 1):
            return False                  # QEMU: the refcount read fails, no detection
        try:
            block = pread_padded(layer._fd, cs, offset)
        except CorruptImage:
            return False
        count += count_refcounts(block, h.refcount_order, min(per_block,
                                                              end_cluster - t * per_block))
        if count >= threshold:
            return True
    return False


def _entries(image, start: int = 0, length: int | None = None):
    from .image import RawImage
    prealloc = {}
    for e in image.extents(start, length):
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
    # qemu-img.c entry_mergeable(): same flags, and host offsets (when known) contiguous.
    if any(a[k] != b[k] for k in ("depth", "present", "zero", "data")):
        return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def _merged(entries: Iterable[dict]) -> Iterator[dict]:
    """Merge consecutive mergeable entries (qemu-img.c img_map())."""
    pending = None
    for entry in entries:
        if pending is not None and _mergeable(pending, entry):
            pending["length"] += entry["length"]
            continue
        if pending is not None:
            yield pending
        pending = entry
    if pending is not None:
        yield pending


def iter_entries(image) -> Iterator[dict]:
    """Yield the entries `qemu-img map --output=json` prints for `image`, one at a time.

    Memory stays bounded by one L2 slice of the extent stream, whatever the number of entries.
    """
    pending = None
    for pending in _merged(_entries(image)):
        yield pending
    if pending is None:
        # qemu-img.c img_map(): an empty image still prints its initial, empty entry.
        yield dict(start=0, length=0, depth=0, present=False, zero=False, data=False)


def clip_entries(entries: Iterable[dict], start: int, end: int) -> Iterator[dict]:
    """The part of map `entries` in [start, end), as qemu-img map --start-offset and
    --max-length print it (an empty range prints one empty entry at `start`)."""
    found = False
    for e in entries:
        a, b = max(e["start"], start), min(e["start"] + e["length"], end)
        if a >= b:
            if e["start"] >= end:
                break
            continue
        found = True
        clipped = dict(e, start=a, length=b - a)
        if "offset" in e:
            clipped["offset"] = e["offset"] + (a - e["start"])
        yield clipped
    if not found:
        yield dict(start=start, length=0, depth=0, present=False, zero=False, data=False)


def map_entries(image) -> list[dict]:
    """Return the list `qemu-img map --output=json` prints for `image`."""
    return list(iter_entries(image))


def _json_line(e: dict) -> str:
    s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
         f'"present": {"true" if e["present"] else "false"}, '
         f'"zero": {"true" if e["zero"] else "false"}, "data": {"true" if e["data"] else "false"}')
    if "offset" in e:
        s += f', "offset": {e["offset"]}'
    return s + "}"


def _batched(lines: Iterable[str], stream: TextIOBase, sep: str, prefix: str = "") -> None:
    """Write `prefix`, then `lines` joined by `sep`, _BATCH lines per write call.

    The prefix goes out with the first batch, so an image that fails early prints nothing.
    """
    batch: list = []
    first = True
    for line in lines:
        batch.append(line)
        if len(batch) == _BATCH:
            stream.write((prefix if first else sep) + sep.join(batch))
            first, batch = False, []
    if batch or first:
        stream.write((prefix if first else sep) + sep.join(batch))


def _range_entries(image, start: int, length: int | None) -> Iterator[dict]:
    if not start and length is None:
        return iter_entries(image)
    end = image.virtual_size if length is None else min(start + length, image.virtual_size)
    # Only [start, end) is walked, as qemu-img queries only there: a bad entry outside it
    # is never met.
    return clip_entries(_merged(_entries(image, start, max(0, end - start))), start, end)


class _Counted:
    """A text stream that counts the characters written through it."""

    def __init__(self, stream: TextIOBase):
        self.stream = stream
        self.written = 0

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.written += len(text)


def _finish_before(exc: QcowError, image, out: _Counted, start: int, head: str, rows) -> None:
    """After `exc` stopped a map part-way, write what qemu-img prints before the same error:
    `head`, then `rows(entries)` of the entries finished before the bad L2 entry (the one
    still growing there is never printed: img_map() prints an entry once the next one
    differs). What `out` already holds is the start of that text; nothing is added for other
    errors."""
    at = getattr(exc, "guest_offset", None)
    if at is None or at < start:
        return
    try:
        stop = image._failing_query(exc, start)
        done = list(_merged(_entries(image, start, stop - start)))[:-1]
    except (QcowError, OSError):
        return
    text = head + rows(done)
    out.write(text[out.written:])


def write_json(image, stream: TextIOBase, start: int = 0, length: int | None = None) -> None:
    """Write `qemu-img map --output=json` for `image` to the text `stream`, entry by entry
    (of guest bytes [start, start + length) only, as --start-offset and --max-length).

    A bad L2 entry part-way stops the map as it stops qemu-img's: the entries before it are
    written (the JSON is left open), then the CorruptImage is raised."""
    end = image.virtual_size if length is None else min(start + length, image.virtual_size)
    out = _Counted(stream)
    try:
        if start < end and _runs_map(image):
            _write_json_of_runs(image, out, start, end)
        else:
            _batched(map(_json_line, _range_entries(image, start, length)), out, ",\n",
                     prefix="[")
    except CorruptImage as exc:
        _finish_before(exc, image, out, start, "[",
                       lambda done: "".join(_json_line(e) + ",\n" for e in done))
        raise
    stream.write("]\n")


def _runs_map(image) -> bool:
    """True when every entry of `image`'s map is a run of its extent stream (or several
    merged): no raw layer and no metadata-preallocated one, whose runs split at file holes."""
    from .image import Image
    return all(isinstance(layer, Image) for layer in image.chain) and \
        not any(metadata_preallocated(layer) for layer in image.chain)


_RUNS_PER_CALL = 16384      # runs merged and formatted per kernel call (3 MiB of text at most)


def _write_json_of_runs(image, stream: TextIOBase, start: int, end: int) -> None:
    """write_json's "[" and entries of [start, end) (start < end), merged and formatted by the
    _mapjson kernel from the runs' arrays: a tenth of the time of a dict and a line per entry
    in Python. The "[" goes out with the first entry, so an image that fails first prints
    nothing."""
    import numpy as np

    from . import _mapjson
    state = _mapjson.new_state()
    prefix = "["
    for chunk in image._each_step(image._runs(start, end)):
        depth = np.ascontiguousarray(chunk.depth, np.int64)
        for a in range(0, len(chunk.guest), _RUNS_PER_CALL):
            b = a + _RUNS_PER_CALL
            text = _mapjson.json_lines(chunk.guest[a:b], chunk.length[a:b], chunk.kind[a:b],
                                       chunk.host[a:b], depth[a:b], state)
            if text:
                stream.write(prefix + text.decode("ascii"))
                prefix = ""
    stream.write(prefix + _mapjson.json_last(state).decode("ascii"))


def write_human(image, stream: TextIOBase, start: int = 0, length: int | None = None) -> None:
    """Write qemu-img's human map (data ranges, host offset, file) to the text `stream`
    (of guest bytes [start, start + length) only, as --start-offset and --max-length).

    As qemu-img.c dump_map_entry() does, rows are written as they come; a data range without
    a host offset (a compressed cluster) stops the map after the rows before it, as does a
    bad L2 entry (CorruptImage) met before that range is finished.

    Raises
    ------
    QcowError
        The image has compressed clusters (qemu-img: "File contains external, encrypted or
        compressed clusters.").
    """
    failed = []

    def row(e: dict) -> str:
        if not (e["data"] and not e["zero"] and "offset" in e):
            return ""
        layer = image.layer(e["depth"])
        fname = (getattr(layer, "data_file_label", None)
                     or getattr(layer, "data_file", layer.filename))
        return f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}{fname}\n"

    def rows(entries):
        for e in entries:
            if e["data"] and "offset" not in e:
                failed.append(e)
                return
            yield row(e)

    head = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
    out = _Counted(stream)
    try:
        _batched(rows(_range_entries(image, start, length)), out, "", prefix=head)
    except CorruptImage as exc:
        # Entries are read ahead of the rows: a compressed range finished before the bad
        # entry fails the map first, as it does qemu-img's.
        _finish_before(exc, image, out, start, head, lambda done: "".join(rows(done)))
        if not failed:
            raise
    if failed:
        stream.flush()
        raise QcowError("File contains external, encrypted or compressed clusters.")


def format_json(entries: Iterable[dict]) -> str:
    """Render entries exactly as qemu-img map --output=json does (see write_json to stream)."""
    return "[" + ",\n".join(map(_json_line, entries)) + "]\n"


def format_human(image, entries: Iterable[dict]) -> str:
    """Render the human map of qemu-img for a list of entries (see write_human to stream)."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and "offset" not in e:
            raise QcowError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            layer = image.layer(e["depth"])
            fname = (getattr(layer, "data_file_label", None)
                     or getattr(layer, "data_file", layer.filename))
            lines.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}"
                         f"{_hex(e['offset']):<16}{fname}")
    return "\n".join(lines) + "\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"   # C's %#x prints 0 without a prefix
