"""Metadata-preallocated images (`qemu-img create -o preallocation=metadata`, libvirt's
default): their data clusters lie on holes of the host file, which QEMU reads as zeros
without reading them (qcow2_detect_metadata_preallocation(), then block status with
BDRV_BLOCK_RECURSE). convert and compare skip them too, on the plain and the general path:
the holes' pages never enter the page cache (reading them cost seconds per 10 GiB), and
the bytes and allocation agree with qemu-img."""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess

import pytest

import qcowfast
from common import qemu_img, qemu_io, qemu_map, run_cli
from test_read_footprint import _evict

K, M = 1024, 1024 * 1024
SIZE = 768 * M
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PROT_READ, MAP_SHARED = 1, 1


def _resident_pages(path, offset: int, length: int) -> int:
    """Pages of [offset, offset + length) of `path` in the page cache (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, offset)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            pages = -(-length // os.sysconf("SC_PAGE_SIZE"))
            vec = ctypes.create_string_buffer(pages)
            assert _libc.mincore(addr, length, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


READ_AHEAD_MARGIN = 32 * M     # the kernel reads ahead around data (8 MiB on virtio here)


def _hole_ranges(path) -> list[tuple[int, int]]:
    """Host ranges of the preallocated clusters qemu-img reports as zeros (file holes), less
    READ_AHEAD_MARGIN at each end: reading the data beside them may cache those."""
    ranges = [(e["offset"] + READ_AHEAD_MARGIN, e["length"] - 2 * READ_AHEAD_MARGIN)
              for e in qemu_map(path)
              if e.get("offset") is not None and e["zero"] and e["depth"] == 0]
    return [(off, n) for off, n in ranges if n > 0]


def _layout(path) -> list[dict]:
    """qemu-img map without host offsets: what is allocated, as data or zeros."""
    return [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(path)]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def chains(tmp_path):
    """A preallocated image alone (the plain path) and under a compressed overlay (the
    general path), with data in whole and partial clusters."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,preallocation=metadata",
             base, SIZE)
    qemu_io(base, f"write -P 0x11 {8 * M} {M}", f"write -P 0x12 {400 * M + 512} 4k",
            f"write -P 0x13 {SIZE - M} {M}")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, SIZE)
    qemu_io(top, f"write -c -P 0x21 {200 * M} 256k", f"write -c -P 0 {8 * M} 64k")
    with qcowfast.open(base) as img:
        assert img.chain[0].cluster_size == 65536
    holes = _hole_ranges(base)
    assert sum(n for _, n in holes) > SIZE // 2, holes
    return base, top, holes


def test_convert_skips_the_holes_of_preallocated_clusters(chains, tmp_path):
    base, top, holes = chains
    for src in (base, top):
        for fmt in ("raw", "qcow2"):
            ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"qemu.{fmt}"
            _evict(base)
            qcowfast.convert(src, ours, format=fmt)
            resident = sum(_resident_pages(base, off, n) for off, n in holes)
            assert resident == 0, (src.name, fmt, resident)
            qemu_img("convert", "-O", fmt, src, theirs)
            if fmt == "raw":
                assert _sha(ours) == _sha(theirs), src.name
                assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks, src.name
            else:
                qemu_img("compare", "-f", "qcow2", "-F", "qcow2", theirs, ours)
                assert _layout(ours) == _layout(theirs), src.name
            os.unlink(ours)
            os.unlink(theirs)


def test_compare_skips_the_holes_of_preallocated_clusters(chains, tmp_path):
    base, top, holes = chains
    plain = tmp_path / "plain.qcow2"
    qemu_img("convert", "-O", "qcow2", base, plain)
    _evict(base)
    proc = run_cli("compare", base, plain)
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stdout + proc.stderr
    assert sum(_resident_pages(base, off, n) for off, n in holes) == 0
    qemu_io(plain, f"write -P 0x77 {600 * M + 4096} 512")
    for a, b in ((base, plain), (plain, base), (top, plain)):
        ours = run_cli("compare", a, b)
        theirs = subprocess.run(["qemu-img", "compare", a, b], capture_output=True, text=True)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (a, b)
