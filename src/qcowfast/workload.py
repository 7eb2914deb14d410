"""How much work converting an image is, estimated before it runs.

A batch starts its costliest jobs first (convert_many, qcowfast.dask), so that no large job is
left running alone at the end. The virtual size says little about that cost: a 40 GiB cloud
image may hold 1 GiB of data, and a compressed cluster costs several times a plain one. The
estimate reads the source's header and a sample of its L2 entries (the first SAMPLE_ENTRIES of
the first table the L1 table names): the share of allocated clusters that are compressed and
their compressed size. The file's size then says how many clusters there are.

Costs are in bytes of plain data copied; the rates were measured converting to raw on tmpfs
(libdeflate and zstd on one core, against copying plain clusters of the same data).
"""
from __future__ import annotations

import os
import stat
import sys
from array import array

from .constants import (CompressionType, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                        QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO)
from .errors import QcowError

SAMPLE_ENTRIES = 512
#: What one byte of guest data costs when its cluster is compressed, by compression type.
INFLATE_COST = {CompressionType.ZLIB: 3.7, CompressionType.ZSTD: 2.4}
CLUSTER_COST = 200                  # per allocated cluster (table walk, run bookkeeping)


def size_and_cost(src: str, src_format: str | None, others=()) -> tuple[int, float]:
    """(virtual size as convert sees it, estimated cost) of converting `src`; (-1, 0.0) when
    it cannot be opened or read (the job will fail).

    `others`: the other files the conversion reads (backing files, a data file), each costed
    at its allocated size as plain data; they are only stat()ed, never opened."""
    from .header import read_header
    from .paths import open_file
    try:
        opened = open_file(src, "image")        # stat first: FIFOs and devices stay closed
    except (OSError, QcowError, ValueError):
        return -1, 0.0
    extra = sum(_allocated(name) for name in others)
    with opened:
        try:
            if src_format != "raw":
                header = read_header(opened.fd, opened.size, warn=False)
                size = header.size - header.size % 512      # as Image.virtual_size
                if header.data_file or header.crypt_method:
                    return size, float(extra)
                return size, _qcow2_cost(opened.fd, opened.size, header) + extra
        except QcowError:
            pass
        except OSError:
            return -1, 0.0
        return -(-opened.size // 512) * 512, float(_allocated(src) + extra)


def _allocated(name: str) -> int:
    """Bytes a regular file holds data in (a sparse file's holes cost nothing); 0 otherwise."""
    try:
        st = os.stat(name)
    except (OSError, ValueError):
        return 0
    if not stat.S_ISREG(st.st_mode):
        return 0
    return min(st.st_size, st.st_blocks * 512)


def _qcow2_cost(fd: int, file_size: int, header) -> float:
    cs = header.cluster_size
    plain, compressed, compressed_bytes = _sample(fd, file_size, header)
    if plain + compressed == 0:                 # nothing sampled: take the file as plain data
        plain = 1
    # Each allocated cluster takes cs bytes of the file when plain, its stream's when not;
    # the rest is metadata (the header, L1 and refcount tables, a refcount block, an L2 table
    # at least). No image holds more clusters than its guest space.
    per_cluster = (plain * cs + compressed_bytes) / (plain + compressed)
    metadata = cs * (3 + header.refcount_table_clusters) + -(-header.l1_size * 8 // cs) * cs
    clusters = min(max(0, file_size - metadata) / per_cluster, -(-header.size // cs))
    rate = INFLATE_COST.get(header.compression_type, INFLATE_COST[CompressionType.ZLIB])
    per_byte = (plain + compressed * rate) / (plain + compressed)
    return clusters * (cs * per_byte + CLUSTER_COST)


def _sample(fd: int, file_size: int, header) -> tuple[int, int, int]:
    """(plain, compressed, compressed bytes) among the sampled L2 entries; zeros when the
    tables cannot be read (the conversion will say why)."""
    none = (0, 0, 0)
    l1_offset = header.l1_table_offset
    l1_bytes = min(header.l1_size, SAMPLE_ENTRIES) * 8
    if not l1_bytes or l1_offset + l1_bytes > file_size:
        return none
    l1 = _entries(os.pread(fd, l1_bytes, l1_offset))
    table = next((e & L1E_OFFSET_MASK for e in l1 if e & L1E_OFFSET_MASK), 0)
    width = 16 if header.extended_l2 else 8
    count = min(SAMPLE_ENTRIES, header.cluster_size // width)
    if not table or table + count * width > file_size:
        return none
    entries = _entries(os.pread(fd, count * width, table))[::width // 8]
    # Compressed descriptor (qcow2.txt, "Compressed Clusters Descriptor"): x = 62 -
    # (cluster_bits - 8) offset bits, then the number of 512-byte sectors beyond the first.
    x = 62 - (header.cluster_bits - 8)
    plain = compressed = compressed_bytes = 0
    for e in entries:
        if e & QCOW_OFLAG_COMPRESSED:
            compressed += 1
            sectors = ((e & ((1 << 62) - 1)) >> x) + 1
            compressed_bytes += sectors * 512 - (e & 511)
        elif e & L2E_OFFSET_MASK and not (e & QCOW_OFLAG_ZERO and header.version >= 3):
            plain += 1
    return plain, compressed, compressed_bytes


def _entries(data: bytes) -> array:
    """Big-endian uint64 table entries."""
    a = array("Q", data[:len(data) - len(data) % 8])
    if a.itemsize != 8:                         # pragma: no cover - no such platform here
        raise RuntimeError("array('Q') is not 64-bit")
    if sys.byteorder == "little":
        a.byteswap()
    return a
