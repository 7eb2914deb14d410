"""The leanest read paths: reads of at most one cluster served in C, and as_file's windows
filled in the background.

Reads of up to one cluster of the top image (``_tables.SmallReader``) must give qemu-img's bytes
on every catalogue image without the general path, and fail on every damaged image exactly as
the general path does (the corruption matrix of ``test_corrupt``). The read-ahead of
``as_file()`` must raise a background error on the read that needs that data and never before,
survive seeks, wait for a fill in flight when closed, and keep at most two windows.
"""
from __future__ import annotations

import os
import random
import threading
import time
import zlib

import pytest

import qcowfast
from qcowfast import reader
from qcowfast.image import Image, open_source
from common import assert_same_bytes, read_one_way, reference_raw
from test_corrupt import CASES, IDS, damaged, pristine, raises_exactly  # noqa: F401 (fixture)
from test_fastpaths import _edges

K = 1024


def _no_general_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a read of at most one cluster took the general path")
    for name in ("_small_runs", "_runs", "_fill_small"):
        monkeypatch.setattr(Image, name, refuse)


def test_one_cluster_reads_in_c(image, monkeypatch):
    """Reads of up to one top cluster, anywhere (edges of clusters, subclusters, L2 slices,
    layers), through read, readinto and as_file: qemu-img's bytes, and no general path."""
    want = reference_raw(image.path)
    rng = random.Random(zlib.crc32(f"reads-fast/{image.id}".encode()))
    with qcowfast.open(str(image.path)) as img:
        cs, vs = img.cluster_size, img.virtual_size
        edges = _edges(img)
        _no_general_path(monkeypatch)
        f = img.as_file()
        buf = bytearray(cs)
        for i in range(300):
            size = min(cs, rng.choice((1, 512, 4096, rng.randint(1, cs), cs)))
            offset = max(0, min(vs - size, rng.choice(edges) + rng.randint(-600, 600)))
            expect = want[offset:offset + size]
            got = read_one_way(i % 3, img, f, buf, offset, size)
            assert_same_bytes(got, expect, f"read({offset:#x}, {size})", base=offset)


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base"))
def test_odd_arguments_keep_their_meaning(image):
    want = reference_raw(image.path)
    with qcowfast.open(str(image.path)) as img:
        vs = img.virtual_size
        assert img.read(2**64, 10) == b"" and img.readinto(2**70, bytearray(8)) == 0
        assert img.read(vs - 3, 4096) == want[-3:]
        assert img.read(5, 0) == b"" and img.readinto(5, bytearray()) == 0
        with pytest.raises(ValueError):
            img.read(-1, 4096)
        with pytest.raises(ValueError):
            img.read(0, -4096)
        with pytest.raises(TypeError):
            img.readinto(0, b"read-only")


@pytest.mark.parametrize("how", ["read", "readinto", "as_file"])
@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_small_reads_refuse_damage(pristine, tmp_path, c, how):
    """4 KiB reads of every cluster of a damaged image fail with the exception (class and
    message) the corruption matrix expects of reading the whole image."""
    src = damaged(pristine, c, tmp_path)

    def consume():
        with qcowfast.open(src) as img:
            f = img.as_file()
            for offset in range(0, img.virtual_size, img.cluster_size):
                if how == "read":
                    img.read(offset, 4 * K)
                elif how == "readinto":
                    img.readinto(offset, bytearray(4 * K))
                else:
                    f.seek(offset)
                    f.read(4 * K)
            img.map()                 # damage only the map sees (as in test_corrupt)
            img.read(0, img.virtual_size)

    raises_exactly(c, consume)


def test_closed_image_refuses_reads(pristine):
    img = qcowfast.open(pristine["chain"])
    f = img.as_file()
    assert f.read(4 * K) == b"\x5a" * (4 * K)
    img.close()
    for call in (lambda: img.read(0, 4 * K), lambda: img.read(0, 1 << 20),
                 lambda: img.readinto(64 * K, bytearray(100)), lambda: f.read(4 * K),
                 lambda: f.readinto(bytearray(1 << 20))):
        with pytest.raises(ValueError, match="closed image"):
            call()


def test_closed_raw_image_refuses_reads(tmp_path):
    """A closed RawImage must not pread its old descriptor number (another file's by then)."""
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x77" * (64 * K))
    img = open_source(str(path), "raw")
    assert img.read(0, 4) == b"\x77" * 4
    img.close()
    other = os.open(path, os.O_RDONLY)          # likely reuses the closed descriptor number
    try:
        for call in (lambda: img.read(0, 4 * K), lambda: img.readinto(0, bytearray(100)),
                     lambda: img.as_file().read(4 * K)):
            with pytest.raises(ValueError, match="closed image"):
                call()
    finally:
        os.close(other)


# ---------------------------------------------------------------------------------------------
# as_file: windows filled in the background


class _Failing:
    """Wraps Image.readinto: fails reads starting in [lo, hi) while armed; counts calls and
    can hold them until released."""

    def __init__(self, img, lo: int, hi: int):
        self.readinto, self.lo, self.hi = img.readinto, lo, hi
        self.armed = True
        self.release = threading.Event()
        self.release.set()
        self.active = self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, offset, buffer):
        with self.lock:
            self.active += 1
            self.calls += 1
        try:
            self.release.wait(30)
            if self.armed and self.lo <= offset < self.hi:
                raise qcowfast.TruncatedImage(f"injected failure at {offset:#x}")
            return self.readinto(offset, buffer)
        finally:
            with self.lock:
                self.active -= 1


WINDOW = 64 * K


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(reader, "READAHEAD", WINDOW)


def test_prefetch_error_raised_on_the_read_that_needs_it(pristine, small_windows):
    path = pristine["v3"]
    want = reference_raw(path)
    with qcowfast.open(path) as img:
        bad = _Failing(img, 3 * WINDOW, 4 * WINDOW)
        img.readinto = bad
        f = img.as_file()
        got = f.read(4 * K)
        while f.tell() < 3 * WINDOW:          # the window at 3 * WINDOW fails in the background
            got += f.read(min(8 * K, 3 * WINDOW - f.tell()))
        assert_same_bytes(got, want[:3 * WINDOW], "reads before the failing window")
        with pytest.raises(qcowfast.TruncatedImage, match="injected failure"):
            f.read(8 * K)
        assert f.tell() == 3 * WINDOW
        with pytest.raises(qcowfast.TruncatedImage, match="injected failure"):
            f.read(8 * K)                     # still failing: raised again, never stale
        bad.armed = False
        assert_same_bytes(f.read(8 * K), want[3 * WINDOW:3 * WINDOW + 8 * K], "after recovery")


def test_prefetch_error_dropped_after_a_seek(pristine, small_windows):
    path = pristine["v3"]
    want = reference_raw(path)
    with qcowfast.open(path) as img:
        img.readinto = _Failing(img, WINDOW, 2 * WINDOW)
        f = img.as_file()
        f.read(4 * K)
        f.read(4 * K)                         # window [4K, 4K + WINDOW) and a failing prefetch
        f.seek(5 * WINDOW)
        got = f.read(4 * K) + f.read(40 * K) + f.read(40 * K)
        assert_same_bytes(got, want[5 * WINDOW:5 * WINDOW + 84 * K], "after seeking away")
        f.seek(100)
        assert f.read(2 * K) == want[100:100 + 2 * K]
        f.close()


def test_close_waits_for_the_fill_in_flight(pristine, small_windows):
    with qcowfast.open(pristine["v3"]) as img:
        slow = _Failing(img, 0, 0)
        img.readinto = slow
        f = img.as_file()
        f.read(4 * K)
        f.read(4 * K)                         # a window, and the next one being filled
        while slow.calls < 3 or slow.active:  # that fill done
            time.sleep(0.01)
        slow.release.clear()
        f.read(WINDOW)                        # past the window: a new fill, held
        threading.Timer(0.2, slow.release.set).start()
        f.close()
        assert slow.active == 0, "a background fill outlived close()"
        assert f._windows == []
        with pytest.raises(ValueError):
            f.read(1)


@pytest.mark.images(ids=("c64k-v3-zlib", "c64k-chain2-zlib-base", "c512-v3-zlib"))
def test_sequential_reads_keep_two_windows(image, small_windows):
    """Sequential reads of every size through the windows, with seeks back and forth: the
    right bytes, and never more than two windows."""
    want = reference_raw(image.path)
    rng = random.Random(3)
    with qcowfast.open(image.path) as img:
        f = img.as_file()
        pos = 0
        while pos < len(want):
            if rng.random() < 0.05:
                pos = rng.randrange(len(want))
                f.seek(pos)
            n = rng.choice((1, 4 * K, 60 * K, WINDOW - 1, WINDOW + 1, 3 * WINDOW))
            got = f.read(n)
            assert_same_bytes(got, want[pos:pos + n], f"read at {pos:#x}", base=pos)
            assert len(f._windows) <= 2
            pos += len(got)
            if not got:
                break
        f.close()


def test_sequential_reads_before_a_bad_entry_read_as_in_qemu(tmp_path):
    """A read-ahead window that fails somewhere past the bytes asked for (here at a bad L1
    entry) no longer fails the read: the bytes before the entry read as qemu-io reads them, and
    the read that reaches it fails (found by a red-team helper)."""
    import struct
    from common import qemu_img, qemu_io
    G = 1 << 30
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4G")
    qemu_io(img, f"write -P 0x5a {2 * G - 64 * K} 64k", f"write -P 0x11 {2 * G} 64k")
    with open(img, "r+b") as f:                 # L1 entry 4 (from 2 GiB): unaligned
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1 + 8 * 4)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1 + 8 * 4)
        f.write(struct.pack(">Q", entry | 0x200))
    start = 2 * G - 4 * 1024 * K
    with qcowfast.open(img) as image, image.as_file() as f:
        f.seek(start)
        got = b"".join(f.read(4 * K) for _ in range(1024))          # up to the entry
        assert got == bytes(4 * 1024 * K - 64 * K) + b"\x5a" * (64 * K)
        assert f.tell() == 2 * G
        with pytest.raises(qcowfast.CorruptImage, match="L1 entry 4"):
            f.read(4 * K)
    qemu_io(img, f"read -P 0x5a {2 * G - 4 * K} 4k")           # (raises if it fails)
    import subprocess
    bad = subprocess.run(["qemu-io", "-r", "-c", f"read {2 * G} 4k", img], capture_output=True,
                         text=True)
    assert "read failed" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
