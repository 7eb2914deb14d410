"""Which table entries serve one guest offset (`qcowfast map --lookup`)."""
from __future__ import annotations

from .image import Image, RawImage


def describe(image, offset: int) -> str:
    """A few lines naming the L1/L2 entries, cluster type and host offset for guest `offset`."""
    if not 0 <= offset < image.virtual_size:
        return f"offset {offset:#x} is outside the image (virtual size {image.virtual_size:#x})\n"
    lines = []
    ext = next(image.extents(offset, 1))
    layer = image.layer(ext.depth)
    for depth, node in image.by_depth():
        if isinstance(node, RawImage):
            lines.append(f"depth {depth}: {node.filename} (raw): offset {offset:#x} is data "
                         f"at host offset {offset:#x}" if offset < node.virtual_size else
                         f"depth {depth}: {node.filename} (raw): past its end")
            break
        lines.extend(_entry_lines(node, depth, offset))
        if node is layer:
            break
    host = "none" if ext.host_offset is None else f"{ext.host_offset + offset - ext.guest_offset:#x}"
    if ext.kind.name == "COMPRESSED":
        host = f"compressed stream at {ext.host_offset:#x}"
    lines.append(f"served by depth {ext.depth} ({layer.filename}): {ext.kind.name.lower()}, "
                 f"host offset {host}")
    return "\n".join(lines) + "\n"


def _entry_lines(node: Image, depth: int, offset: int):
    h = node.header
    if offset >= node.virtual_size:
        return [f"depth {depth}: {node.filename}: past its virtual size"]
    l1_index = offset // node._l2_per_l1
    l2_offset = int(node._l2_offsets[l1_index])
    l1_entry = int(node._l1_be[l1_index])
    out = [f"depth {depth}: {node.filename}: L1[{l1_index}] = {l1_entry:#018x}"]
    if not l2_offset:
        out.append("  no L2 table: unallocated")
        return out
    l2_index = (offset % node._l2_per_l1) // node.cluster_size
    s_index, s_pos = divmod(l2_index, node._slice_entries)
    tbl = node._l2_slice(l2_offset, s_index)
    width = 2 if h.extended_l2 else 1
    entry = int(tbl[s_pos * width])
    text = f"  L2 table at {l2_offset:#x}, L2[{l2_index}] = {entry:#018x}"
    if width == 2:
        text += f", subcluster bitmap {int(tbl[s_pos * 2 + 1]):#018x}"
    out.append(text)
    return out
