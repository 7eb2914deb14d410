"""Images whose L2 tables are small (512 B to 32 KiB clusters) have many consecutive L2 tables
classified in one call (image._tables_runs). The runs, the bytes and the error messages must be
the same as one table at a time: across group edges, L1 holes, partial first and last tables,
extended L2 and backing chains."""
from __future__ import annotations

import struct

import pytest

import qcowfast
from qcowfast import image as image_module
from qcowfast.errors import CorruptImage
from common import assert_same_bytes, qemu_img, qemu_io, reference_raw

K, M = 1024, 1024 * 1024
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _make(tmp_path, name, opts, size, writes, backing=None):
    path = tmp_path / name
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing.name, "-F", "qcow2"]
    qemu_img(*args, path.name, size, cwd=tmp_path)
    qemu_io(path, *writes, cwd=tmp_path)
    return path


def _per_batch(img) -> int:
    return image_module._BATCH_ENTRIES // img.header.l2_entries


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("small-tables")
    # 512 B clusters: an L2 table covers 32 KiB, a group 128 tables (4 MiB). Data over more than
    # two groups, an L1 hole (no tables) in the middle, and runs cut inside tables.
    c512 = _make(d, "c512.qcow2", "cluster_size=512", "12M",
                 ["write -P 0x11 0 5M", "write -z 1M 3k", "write -c -P 0x33 6M 64k",
                  "write -P 0x22 7M 4M", "write -P 0x44 11M 1000"])
    ext = _make(d, "ext16k.qcow2", "cluster_size=16k,extended_l2=on", "40M",
                ["write -P 0x55 0 17M", "write -P 0x66 3000 1k", "write -z 9M 6k",
                 "write -P 0x77 25M 9M"])
    base = _make(d, "base.qcow2", "cluster_size=4k", "12M", ["write -P 0x88 0 12M"])
    top = _make(d, "top.qcow2", "cluster_size=512", "12M",
                ["write -P 0x99 1M 2M", "write -P 0xaa 5M 512", "write -z 9M 1M"], backing=base)
    return {"c512": c512, "ext16k": ext, "top": top}


@pytest.mark.parametrize("name", ["c512", "ext16k", "top"])
def test_groups_read_like_qemu(images, name, tmp_path):
    path = images[name]
    want = reference_raw(path)
    with qcowfast.open(path) as img:
        assert _per_batch(img) >= 2                      # the grouped path is taken
        assert_same_bytes(img.read(0, img.virtual_size), want, name)
        # Runs of sub-ranges starting and ending inside tables and groups agree with the whole.
        whole = list(img.extents())
        span = img.header.l2_entries * img.cluster_size
        starts = (0, span // 2 + 512, 3 * M + 7 * 512, span * _per_batch(img) - 512,
                  img.virtual_size - span - 512)
        for start in [s for s in starts if 0 <= s < img.virtual_size]:
            for length in (span // 3, span * _per_batch(img) + 1536, img.virtual_size):
                part = list(img.extents(start, length))
                end = min(start + length, img.virtual_size)
                assert part[0].guest_offset == start
                assert part[-1].guest_offset + part[-1].length == end
                for e in part:
                    covering = [w for w in whole
                                if w.guest_offset <= e.guest_offset < w.guest_offset + w.length]
                    assert len(covering) == 1
                    w = covering[0]
                    assert (e.kind, e.depth) == (w.kind, w.depth)
                    if w.host_offset is not None and e.kind.name == "DATA":
                        assert e.host_offset == w.host_offset + (e.guest_offset - w.guest_offset)
    qcowfast.convert(path, tmp_path / "out.raw")
    assert_same_bytes((tmp_path / "out.raw").read_bytes(), want, name)


def test_group_error_names_the_right_table(images, tmp_path):
    """A bad entry deep in a group is reported with its own table, index and guest offset."""
    src = images["c512"]
    path = tmp_path / "bad.qcow2"
    path.write_bytes(src.read_bytes())
    cs, per_table = 512, 64
    guest = 130 * per_table * cs + 5 * cs            # table 130 (second group), entry 5
    with open(path, "r+b") as f:
        f.seek(20)
        cluster_bits = struct.unpack(">I", f.read(4))[0]
        assert 1 << cluster_bits == cs
        f.seek(40)
        l1_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset + 8 * 130)
        table = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
        f.seek(table + 8 * 5)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(table + 8 * 5)
        f.write(struct.pack(">Q", entry | 2))       # a reserved bit
    match = (rf"L2 entry 5 of the table at {table:#x} \(guest offset {guest:#x}\): "
             r"reserved bits are set")
    with qcowfast.open(path) as img:
        with pytest.raises(CorruptImage, match=match):
            list(img.extents())
        with pytest.raises(CorruptImage, match=match):
            img.read(guest - 3 * M, 4 * M)
    with pytest.raises(CorruptImage, match=match):
        qcowfast.convert(path, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()
