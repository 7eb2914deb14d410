"""Random damage to small qemu-img images: every outcome is a success or a QcowError.

Hypothesis draws byte flips, header field overwrites, L1/L2 entry overwrites with boundary
values, and truncations, over the pristine images of test_corrupt; each damaged image goes through
fuzz/harness.py's exercise(): open, map, read, snapshots, info, check, convert to memory and to a
file. Any other exception (or a conversion that fails and leaves files behind) is a bug. Derandomized, bounded examples, so the suite stays fast
and repeatable; the open-ended search is fuzz/fuzz_open.py.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_corrupt import FIELDS, OFFSET_MASK, Qcow, _build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
from harness import exercise  # noqa: E402  (fuzz/harness.py: what a user does with an image)

K = 1024
M = 1024 * K
IMAGES = ("v3", "zstd", "v2", "extl2", "chain", "snap", "data")


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """name -> (path, bytes, positions of interest: header fields, L1 and L2 entries)."""
    paths = _build(tmp_path_factory.mktemp("mutation"))
    out = {}
    for name, path in paths.items():
        q = Qcow(path)
        tables = []
        l1 = q["l1_table_offset"]
        for i in range(q["l1_size"]):
            tables.append(l1 + 8 * i)
            l2 = q.l1(i) & OFFSET_MASK
            if l2:
                n = q.cluster_size // 8
                entries = struct.unpack(f">{n}Q", q.get(l2, q.cluster_size))
                tables += [l2 + 8 * j for j, e in enumerate(entries) if e or j < 8]
        out[name] = (path, path.read_bytes(), tables)
    return out


BOUNDARY = st.sampled_from([0, 1, 0x1FF, 0x200, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                            1 << 32, 1 << 40, 1 << 56, 1 << 62, (1 << 63) - 1, 1 << 63,
                            (1 << 64) - 1])

_flip_any = st.tuples(st.just("flip"), st.integers(0, 0x80000), st.integers(1, 255))
_flip_header = st.tuples(st.just("flip"), st.integers(0, 1023), st.integers(1, 255))
_flip_entry = st.tuples(st.just("flip-entry"), st.integers(0, 1 << 16),
                        st.integers(0, 63).map(lambda bit: 1 << bit))
_field = st.tuples(st.just("field"), st.sampled_from(sorted(FIELDS)),
                   st.one_of(BOUNDARY, st.integers(0, (1 << 64) - 1), st.integers(0, 0x100000)))
_entry = st.tuples(st.just("entry"), st.integers(0, 1 << 16),
                   st.one_of(BOUNDARY, st.integers(0, (1 << 64) - 1),
                             st.integers(0, 0x100).map(lambda k: (1 << 63) | k * 0x10000),
                             st.integers(0, 1 << 20).map(lambda k: (1 << 62) | k * 0x200)))
_truncate = st.tuples(st.just("truncate"), st.integers(0, 0x80000), st.just(0))
# Weighted towards metadata: most random flips elsewhere only change guest data.
mutation = st.one_of(_flip_header, _flip_entry, _flip_entry, _entry, _entry, _field, _field,
                     _flip_any, _truncate)


def apply(data: bytearray, tables: list[int], m) -> bytearray:
    kind, a, b = m
    if kind == "flip":
        if a < len(data):
            data[a] ^= b
    elif kind == "field":
        off, fmt = FIELDS[a]
        size = struct.calcsize(fmt)
        raw = (b % (1 << (8 * size))).to_bytes(size, "big")
        data[off:off + size] = raw
    elif kind == "flip-entry":
        pos = tables[a % len(tables)]
        data[pos:pos + 8] = (int.from_bytes(data[pos:pos + 8], "big") ^ b).to_bytes(8, "big")
    elif kind == "entry":
        pos = tables[a % len(tables)]
        data[pos:pos + 8] = b.to_bytes(8, "big")
    else:
        del data[a:]
    return data


@settings(max_examples=1500, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(IMAGES), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_random_damage(originals, tmp_path_factory, name, mutations):
    path, pristine, tables = originals[name]
    data = bytearray(pristine)
    for m in mutations:
        data = apply(data, tables, m)
    work = tmp_path_factory.mktemp("case")
    for other in path.parent.iterdir():          # the rest of the chain, untouched
        if other != path:
            os.link(other, work / other.name)
    target = work / path.name
    target.write_bytes(data)
    exercise(target)
