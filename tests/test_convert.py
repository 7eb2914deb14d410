"""Conversion to raw: bytes, sparseness, atomic publication, failure cleanup and memory.

The oracle for bytes is ``qemu-img convert -O raw`` (``reference_raw``), for sparseness the
allocation of ``qemu-img convert -O raw -S 4k``'s own output. Every catalogue image is converted
to a file (threads 1 and 4, ``sparse_size`` 4096, 65536 and 0), to file objects and to a real
pipe through ``python -m qcowfast convert IMG -``.

Images built here, next to the catalogue:

``zero-heavy-c64k`` / ``zero-heavy-c4k``
    data clusters full of zeros (``qemu-io write -P 0``, plain and compressed), single
    non-zero bytes in otherwise zero clusters, zero clusters.
``small-over-compressed``
    a c4k top over a c64k compressed base: 4 KiB data and zero clusters of the top inside
    compressed clusters of the base.
``multi-unit-zlib``
    48 MiB with compressed runs in three 16 MiB conversion units, so a failure in the middle
    unit happens after the first unit was written.
``big``
    2 GiB virtual, three layers: a 1 GiB ``preallocation=metadata`` base (1 GiB of allocated
    clusters that read as zeros, cheap to build) with 24 MiB of plain data, a zlib middle layer
    with 32 MiB of compressed data, a zstd top with 336 MiB of compressed clusters. About 1.4 GiB
    of allocated guest space, far more than the 256 MiB memory bound. Also the image the
    Ctrl-C test interrupts (it takes over a second with one thread, and builds in about two).
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import qcowfast
from qcowfast import ExtentKind
from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw

K = 1024
M = 1024 * 1024
TMP_SUFFIX = ".qcowfast-tmp"
MEMORY_BOUND = 256 * M


# ---------------------------------------------------------------------------------------------
# Helpers


def _cli(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "qcowfast", *map(os.fspath, args)]


def _leftovers(directory: Path) -> list[str]:
    """Temporary files of an unfinished conversion left in *directory*."""
    return sorted(n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _sparse_bounds(data: bytes, granularity: int) -> tuple[int, int]:
    """(non-zero bytes, bytes of the granularity-aligned blocks holding a non-zero byte).

    A sparse conversion must write every non-zero byte and has no reason to write an aligned
    block of zeros, so its bytes_written lies between the two.
    """
    arr = np.frombuffer(data, np.uint8)
    nonzero = int(np.count_nonzero(arr))
    padded = np.zeros(_round_up(len(arr), granularity), np.uint8)
    padded[:len(arr)] = arr
    blocks = np.flatnonzero(padded.reshape(-1, granularity).any(axis=1))
    covered = len(blocks) * granularity
    if len(blocks) and blocks[-1] == len(padded) // granularity - 1:
        covered -= len(padded) - len(arr)          # the last block is short
    return nonzero, covered


class _Progress:
    """A progress callback that records its calls, and checks each call's thread and args."""

    def __init__(self, on_call=None):
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()
        self.on_call = on_call

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        self.threads.add(threading.get_ident())
        if self.on_call is not None:
            self.on_call(done, total)

    def check(self, total: int) -> None:
        __tracebackhide__ = True
        assert self.calls, "progress was never called"
        assert {t for _, t in self.calls} == {total}, f"total changed: {set(self.calls)}"
        dones = [d for d, _ in self.calls]
        assert all(0 <= d <= total for d in dones), dones
        # (0, total) first, then only advances: never back, never the same value twice
        assert dones[0] == 0, dones
        assert all(a < b for a, b in zip(dones, dones[1:])), f"done did not advance: {dones}"
        assert self.calls[-1] == (total, total)
        assert self.threads == {threading.get_ident()}, "progress called from a worker thread"


def _check_result(result, virtual_size: int, threads: int) -> None:
    __tracebackhide__ = True
    assert isinstance(result, qcowfast.ConvertResult)
    assert result.virtual_size == virtual_size
    assert result.bytes_written + result.bytes_sparse == virtual_size
    assert 0 <= result.bytes_written <= virtual_size
    assert result.threads == threads
    assert 0 < result.seconds < 120


# ---------------------------------------------------------------------------------------------
# Every catalogue image, to a file


@pytest.mark.parametrize("sparse_size", [4096, 65536, 0], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("threads", [1, 4], ids=lambda t: f"t{t}")
def test_convert_file_matches_qemu_img(image, tmp_path, threads, sparse_size):
    want = reference_raw(image.path)
    dst = tmp_path / "out.raw"
    progress = _Progress()
    result = qcowfast.convert(str(image.path), str(dst), threads=threads,
                              sparse_size=sparse_size, progress=progress)
    got = dst.read_bytes()
    assert_same_bytes(got, want, f"{image.id} -> file (threads={threads}, -S {sparse_size})")
    _check_result(result, len(want), threads)
    progress.check(len(want))
    assert os.listdir(tmp_path) == ["out.raw"], "temporary files left beside the output"

    st = dst.stat()
    allocated = st.st_blocks * 512
    if sparse_size == 0:
        assert result.bytes_written == len(want) and result.bytes_sparse == 0
        assert allocated >= _round_up(len(want), st.st_blksize), \
            f"-S 0 output is not fully allocated: {allocated} of {len(want)} bytes"
    else:
        nonzero, covered = _sparse_bounds(want, sparse_size)
        assert nonzero <= result.bytes_written <= covered, (nonzero, result.bytes_written, covered)
        # Every written byte occupies an allocated block.
        assert result.bytes_written <= allocated + st.st_blksize


@pytest.fixture(scope="module")
def small_over_compressed(tmp_path_factory) -> Path:
    """c4k top over a c64k compressed base: compressed base clusters partly hidden by the top."""
    d = tmp_path_factory.mktemp("small-over-compressed")
    rng = np.random.default_rng(7)
    raw = np.repeat(rng.integers(1, 256, 2 * M // 64, dtype=np.uint8), 64)   # compressible
    (d / "base.raw").write_bytes(raw.tobytes())
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
             "base.raw", "base.qcow2", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2",
             "-F", "qcow2", "top.qcow2", 2 * M, cwd=d)
    qemu_io(d / "top.qcow2", f"write -P 0x5a {4 * K} {4 * K}",
            f"write -z {64 * K + 12 * K} {4 * K}", f"write -P 0xa5 {2 * M - 4 * K} {4 * K}",
            cwd=d)
    entries = qemu_map(d / "top.qcow2")
    assert any(e["depth"] == 1 and e["data"] and "offset" not in e for e in entries), entries
    return d / "top.qcow2"


@pytest.mark.parametrize("mode", ["S4096", "S0", "stream"])
def test_small_clusters_over_compressed_base(small_over_compressed, tmp_path, mode):
    """Upper-layer clusters inside a compressed backing cluster must survive its inflation."""
    want = reference_raw(small_over_compressed)
    if mode == "stream":
        out = io.BytesIO()
        qcowfast.convert(str(small_over_compressed), out)
        got = out.getvalue()
    else:
        dst = tmp_path / "out.raw"
        qcowfast.convert(str(small_over_compressed), str(dst), sparse_size=int(mode[1:]))
        got = dst.read_bytes()
    assert_same_bytes(got, want, f"c4k top over c64k compressed base ({mode})")


@pytest.fixture(scope="module")
def across_units(tmp_path_factory) -> Path:
    """40 MiB, c64k: compressed clusters around 16 MiB (the first conversion unit boundary)."""
    d = tmp_path_factory.mktemp("across-units")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "image.qcow2", 40 * M,
             cwd=d)
    qemu_io(d / "image.qcow2", f"write -c -P 0x41 {15 * M} {2 * M}",
            f"write -P 0x42 {31 * M} {2 * M}", f"write -c -P 0x43 {34 * M} {M}", cwd=d)
    return d / "image.qcow2"


@pytest.mark.parametrize("sparse_size", [512, 1536, 2560, 4096, 3 * 65536],
                         ids=lambda s: f"S{s}")
def test_sparse_sizes_not_dividing_clusters(across_units, tmp_path, sparse_size):
    """Any multiple of 512 is a valid sparse_size, also one that does not divide the cluster."""
    want = reference_raw(across_units)
    dst = tmp_path / "out.raw"
    result = qcowfast.convert(str(across_units), str(dst), sparse_size=sparse_size)
    assert_same_bytes(dst.read_bytes(), want, f"-S {sparse_size}")
    nonzero, covered = _sparse_bounds(want, sparse_size)
    assert nonzero <= result.bytes_written <= covered
    out = io.BytesIO()
    qcowfast.convert(str(across_units), out, sparse_size=sparse_size)
    assert_same_bytes(out.getvalue(), want, f"stream, sparse_size={sparse_size}")


def test_convert_pathlike_and_permissions(images, tmp_path):
    image = images.get("c4k-v3")
    mask = os.umask(0)
    os.umask(mask)
    dst = tmp_path / "out.raw"
    qcowfast.convert(image.path, dst)                  # os.PathLike for both
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "PathLike conversion")
    assert dst.stat().st_mode & 0o777 == 0o644 & ~mask         # QEMU's 0644, under the umask


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o077])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_new_output_mode_is_qemu_imgs(images, tmp_path, umask, fmt):
    """A new output gets the mode qemu-img gives it (0644 under the umask), never 0666."""
    image = images.get("c4k-v3")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for argv in ([sys.executable, "-m", "qcowfast", "convert", "-q", "-O", fmt, image.path,
                  ours], ["qemu-img", "convert", "-O", fmt, image.path, theirs]):
        subprocess.run(argv, check=True, preexec_fn=lambda: os.umask(umask))
    assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(theirs.stat().st_mode) \
        == 0o644 & ~umask


def test_convert_relative_dst_default_threads(images, tmp_path, monkeypatch):
    image = images.get("c512-v3-zlib")
    monkeypatch.chdir(tmp_path)
    result = qcowfast.convert(str(image.path), "out.raw")
    assert_same_bytes((tmp_path / "out.raw").read_bytes(), reference_raw(image.path),
                      "relative dst")
    assert result.threads == len(os.sched_getaffinity(0))
    assert os.listdir(tmp_path) == ["out.raw"]


def test_convert_snapshot(images, tmp_path):
    image = images.get("c64k-v3-snapshot")
    for snap in ("s1", "s2"):
        ref = tmp_path / f"{snap}.ref"
        qemu_img("convert", "-l", f"snapshot.name={snap}", "-O", "raw", image.path, ref)
        dst = tmp_path / f"{snap}.raw"
        result = qcowfast.convert(str(image.path), str(dst), snapshot=snap)
        assert_same_bytes(dst.read_bytes(), ref.read_bytes(), f"{image.id} snapshot {snap}")
        assert result.virtual_size == ref.stat().st_size


def test_convert_empty_image(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "empty.qcow2", "0")
    result = qcowfast.convert(str(tmp_path / "empty.qcow2"), str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == b""
    assert (result.virtual_size, result.bytes_written, result.bytes_sparse) == (0, 0, 0)
    buf = io.BytesIO()
    assert qcowfast.convert(str(tmp_path / "empty.qcow2"), buf).virtual_size == 0
    assert buf.getvalue() == b""


def test_fsync_output(images, tmp_path):
    image = images.get("c64k-chain2-zlib-base")
    dst = tmp_path / "out.raw"
    qcowfast.convert(str(image.path), str(dst), fsync=True, threads=2)
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "fsync=True")


# ---------------------------------------------------------------------------------------------
# Every catalogue image, streamed


@pytest.mark.parametrize("threads", [1, 4], ids=lambda t: f"t{t}")
def test_convert_to_bytesio(image, threads):
    want = reference_raw(image.path)
    out = io.BytesIO()
    out.write(b"HEAD")                         # a stream is written from its current position
    progress = _Progress()
    result = qcowfast.convert(str(image.path), out, threads=threads, progress=progress)
    assert not out.closed, "convert closed the caller's file object"
    assert out.getvalue()[:4] == b"HEAD"
    assert_same_bytes(out.getvalue()[4:], want, f"{image.id} -> BytesIO (threads={threads})")
    _check_result(result, len(want), threads)
    assert result.bytes_written == len(want)        # holes are streamed as zeros
    progress.check(len(want))


def test_convert_to_pipe(image):
    """``python -m qcowfast convert IMG -`` into a pipe read by this process."""
    want = reference_raw(image.path)
    proc = subprocess.run(_cli("convert", "--threads", "4", image.path, "-"), capture_output=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert_same_bytes(proc.stdout, want, f"{image.id} -> stdout pipe")
    assert b"Traceback" not in proc.stderr


class _ShortWriter(io.RawIOBase):
    """A raw stream that accepts at most `limit` bytes per write call (short writes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.calls += 1
        chunk = bytes(memoryview(b)[:self.limit])
        self.data += chunk
        return len(chunk)


def test_convert_to_short_writing_stream(images):
    image = images.get("c2m-chain3-mixed-clusters")
    want = reference_raw(image.path)
    out = _ShortWriter(100_003)
    qcowfast.convert(str(image.path), out, threads=4)
    assert_same_bytes(bytes(out.data), want, "stream with short writes")
    assert out.calls >= len(want) // out.limit


def test_convert_to_fifo_path(images, tmp_path):
    """A path naming a FIFO is streamed into, not replaced by a renamed temporary file."""
    image = images.get("c4k-chain3-short-base")
    want = reference_raw(image.path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = bytearray()

    def reader():
        with open(fifo, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        qcowfast.convert(str(image.path), str(fifo), threads=2)
    finally:
        t.join(timeout=60)
    assert_same_bytes(bytes(received), want, "FIFO path")
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


def test_max_stream_size(images):
    image = images.get("c64k-v3")
    size = image.virtual_size
    with pytest.raises(qcowfast.OutputError):
        qcowfast.convert(str(image.path), io.BytesIO(), max_stream_size=size - 1)
    for limit in (size, None):
        out = io.BytesIO()
        qcowfast.convert(str(image.path), out, max_stream_size=limit)
        assert out.getvalue() == reference_raw(image.path)


# ---------------------------------------------------------------------------------------------
# Sparseness against qemu-img


def _zero_heavy(directory: Path, cluster: int) -> Path:
    """An image whose allocated clusters are mostly zeros (see the module docstring)."""
    directory.mkdir()
    c = cluster
    name = "image.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={c}", name, 8 * M, cwd=directory)
    qemu_io(directory / name,
            f"write -P 0 0 {2 * M}",                      # data clusters full of zeros
            f"write -P 0x5a {2 * M} {4 * K}",
            f"write -P 0 {2 * M + 4 * K} {512 * K}",
            f"write -c -P 0 {3 * M} {M}",                 # compressed clusters of zeros
            f"write -P 0x11 {4 * M + 100} 1",             # single bytes in zero clusters
            f"write -P 0x12 {4 * M + 9 * c - 1} 2",
            f"write -z {5 * M} {M}",
            f"write -P 0 {6 * M} {M}",
            f"write -c -P 0x33 {7 * M} {2 * c}",
            f"write -P 0 {8 * M - 3 * c} {3 * c}",
            cwd=directory)
    path = directory / name
    # The recipe must really hold zero-filled data clusters, or the test proves nothing.
    data = sum(e["length"] for e in qemu_map(path) if e["data"] and "offset" in e)
    assert data >= 3 * M, qemu_map(path)
    return path


@pytest.fixture(scope="module")
def zero_heavy(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-heavy")
    return {f"zero-heavy-c{c // K}k": _zero_heavy(root / f"c{c // K}k", c) for c in (64 * K, 4 * K)}


def _assert_not_less_sparse(src: Path, tmp_path: Path, what: str) -> tuple[int, int]:
    theirs, ours = tmp_path / "qemu.raw", tmp_path / "ours.raw"
    qemu_img("convert", "-O", "raw", "-S", "4k", src, theirs)
    qcowfast.convert(str(src), str(ours), sparse_size=4096)
    assert_same_bytes(ours.read_bytes(), theirs.read_bytes(), what)
    a, b = ours.stat().st_blocks, theirs.stat().st_blocks
    assert a <= b, f"{what}: qcowfast output allocates {a * 512} bytes, qemu-img -S 4k {b * 512}"
    return a * 512, b * 512


def test_sparse_not_worse_than_qemu_img(image, tmp_path):
    _assert_not_less_sparse(image.path, tmp_path, image.id)


@pytest.mark.parametrize("which", ["zero-heavy-c64k", "zero-heavy-c4k"])
def test_zero_filled_clusters_stay_holes(zero_heavy, tmp_path, which):
    src = zero_heavy[which]
    ours, theirs = _assert_not_less_sparse(src, tmp_path, which)
    # qemu-img leaves the zero-filled data clusters as holes; only the few non-zero 4 KiB
    # blocks are allocated (one extent-tree block of slack).
    _, covered = _sparse_bounds(reference_raw(src), 4096)
    assert covered < 256 * K
    assert ours <= covered + 4096
    # Fully allocated on request.
    full = tmp_path / "full.raw"
    result = qcowfast.convert(str(src), str(full), sparse_size=0)
    assert full.stat().st_blocks * 512 >= 8 * M
    assert result.bytes_sparse == 0


# ---------------------------------------------------------------------------------------------
# Atomic publication


def test_dst_appears_only_when_complete(images, tmp_path):
    image = images.get("c64k-v3-zeroes")
    dst = tmp_path / "out.raw"
    seen = []

    def look(done, total):
        seen.append((dst.exists(), _leftovers(tmp_path)))

    qcowfast.convert(str(image.path), str(dst), progress=_Progress(look))
    assert seen
    for exists, temps in seen:
        assert not exists, "dst visible before the conversion finished"
        assert len(temps) == 1 and temps[0].startswith(".out.raw."), temps
    assert _leftovers(tmp_path) == []
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "published output")


def test_existing_dst_refused_without_overwrite(images, tmp_path):
    image = images.get("c64k-v3")
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"precious")
    with pytest.raises(qcowfast.OutputError):
        qcowfast.convert(str(image.path), str(dst))
    assert dst.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == []
    # A dangling symlink is something existing too.
    link = tmp_path / "link.raw"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(qcowfast.OutputError):
        qcowfast.convert(str(image.path), str(link))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()

    result = qcowfast.convert(str(image.path), str(dst), overwrite=True)
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "overwritten dst")
    assert result.virtual_size == image.virtual_size
    assert _leftovers(tmp_path) == []


def test_dst_directory_refused(images, tmp_path):
    image = images.get("c64k-v3")
    with pytest.raises(qcowfast.OutputError):
        qcowfast.convert(str(image.path), str(tmp_path), overwrite=True)
    assert os.listdir(tmp_path) == []


def _digests(paths):
    return {p: zlib.crc32(Path(p).read_bytes()) for p in paths}


@pytest.mark.parametrize("image_id", ["c64k-v3-zlib", "c4k-chain3-short-base",
                                      "c64k-raw-backing"])
def test_dst_in_source_chain_refused(images, tmp_path, image_id):
    image = images.copy(image_id, tmp_path / "chain")
    files = [layer.path for layer in image.chain]
    before = _digests(files)
    targets = list(files)
    # The same files under other names: a symlink and a hard link to each.
    for i, f in enumerate(files):
        (tmp_path / f"sym{i}").symlink_to(f)
        os.link(f, tmp_path / f"hard{i}")
        targets += [tmp_path / f"sym{i}", tmp_path / f"hard{i}"]
    for dst in targets:
        for overwrite in (False, True):
            with pytest.raises(qcowfast.OutputError):
                qcowfast.convert(str(image.path), str(dst), overwrite=overwrite)
    assert _digests(files) == before, "a file of the source chain was modified"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "chain") == []
    # The source still converts.
    out = io.BytesIO()
    qcowfast.convert(str(image.path), out)
    assert out.getvalue() == reference_raw(image.path)


def test_failed_conversion_leaves_nothing(images, tmp_path):
    """Interrupted in the middle (here by the progress callback): no dst, no temporary file."""
    image = images.get("c2m-chain3-mixed-clusters")

    def interrupt(done, total):
        raise KeyboardInterrupt

    dst = tmp_path / "out.raw"
    with pytest.raises(KeyboardInterrupt):
        qcowfast.convert(str(image.path), str(dst), progress=_Progress(interrupt))
    assert os.listdir(tmp_path) == []

    dst.write_bytes(b"old contents")
    with pytest.raises(KeyboardInterrupt):
        qcowfast.convert(str(image.path), str(dst), overwrite=True,
                         progress=_Progress(interrupt))
    assert dst.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["out.raw"]


# ---------------------------------------------------------------------------------------------
# A corrupt compressed cluster


@pytest.fixture(scope="module")
def multi_unit_zlib(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("multi-unit")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,compression_type=zlib",
             "image.qcow2", 48 * M, cwd=d)
    qemu_io(d / "image.qcow2",
            f"write -c -P 0x41 0 {4 * M}",
            f"write -P 0x44 {8 * M} {M}",
            f"write -c -P 0x42 {20 * M} {4 * M}",
            f"write -c -P 0x43 {40 * M} {4 * M}",
            f"write -P 0x45 {47 * M} {M}",
            cwd=d)
    return d / "image.qcow2"


def _corrupt_compressed_cluster(path: Path, near: int) -> int:
    """Overwrite the head of the compressed cluster nearest guest offset *near*.

    Returns the patched host offset. The first byte becomes 0xff: BFINAL=1, BTYPE=11, a
    reserved block type, so raw deflate fails at once (and a zstd frame loses its magic).
    """
    with qcowfast.open(str(path)) as img:
        comp = [(abs(e.guest_offset - near), e) for e in img.extents()
                if e.kind == ExtentKind.COMPRESSED]
        assert comp, f"{path} has no compressed cluster"
        ext = min(comp, key=lambda pair: pair[0])[1]
        layer = img.layer(ext.depth)
        fname, host, cs = layer.filename, ext.host_offset, layer.cluster_size
        ctype = layer.compression_type.name.lower()
    with open(fname, "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 8)
        f.seek(host)
        head = f.read(min(cs, 4096))
    if ctype == "zlib":
        with pytest.raises(zlib.error):
            zlib.decompressobj(-15).decompress(head)
    else:
        from backports import zstd
        with pytest.raises(zstd.ZstdError):
            zstd.decompress(head)
    return host


@pytest.mark.parametrize("threads", [1, 4], ids=lambda t: f"t{t}")
def test_corrupt_compressed_cluster(multi_unit_zlib, tmp_path, threads):
    src = tmp_path / "image.qcow2"
    src.write_bytes(multi_unit_zlib.read_bytes())
    _corrupt_compressed_cluster(src, 22 * M)
    out = tmp_path / "out"
    out.mkdir()

    dst = out / "new.raw"
    with pytest.raises(qcowfast.DecompressionError):
        qcowfast.convert(str(src), str(dst), threads=threads)
    assert os.listdir(out) == [], "a failed conversion left files behind"

    old = os.urandom(100_000)
    dst.write_bytes(old)
    with pytest.raises(qcowfast.DecompressionError):
        qcowfast.convert(str(src), str(dst), threads=threads, overwrite=True)
    assert dst.read_bytes() == old, "existing dst changed by a failed conversion"
    assert os.listdir(out) == ["new.raw"]

    with pytest.raises(qcowfast.DecompressionError):
        qcowfast.convert(str(src), io.BytesIO(), threads=threads)


@pytest.mark.parametrize("image_id", ["c64k-v3-zstd", "c2m-chain3-mixed-clusters"])
def test_corrupt_compressed_cluster_catalogue(images, tmp_path, image_id):
    """zstd, and a corrupt cluster in the middle layer of a chain."""
    image = images.copy(image_id, tmp_path / "chain")
    _corrupt_compressed_cluster(image.path, image.virtual_size // 2)
    dst = tmp_path / "out.raw"
    for sparse_size in (4096, 0):
        with pytest.raises(qcowfast.DecompressionError):
            qcowfast.convert(str(image.path), str(dst), sparse_size=sparse_size)
        assert not dst.exists()
        assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# A large image: memory bound and Ctrl-C

_BIG_REGIONS = [                       # (guest offset, length, fill byte) of non-zero data
    (100 * M, 16 * M, 0x11),           # base: plain
    (900 * M, 8 * M, 0x12),            # base: plain
    (300 * M, 32 * M, 0x21),           # mid: zlib
    (1420 * M, 16 * M, 0x31),          # top: zstd (after 320 MiB of compressed zeros)
]
_BIG_SIZE = 2048 * M


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("big")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,preallocation=metadata",
             "base.qcow2", 1024 * M, cwd=d)
    qemu_io(d / "base.qcow2", f"write -P 0x11 {100 * M} {16 * M}",
            f"write -P 0x12 {900 * M} {8 * M}", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,compression_type=zlib",
             "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", _BIG_SIZE, cwd=d)
    qemu_io(d / "mid.qcow2", f"write -c -P 0x21 {300 * M} {32 * M}", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,compression_type=zstd",
             "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", _BIG_SIZE, cwd=d)
    qemu_io(d / "top.qcow2", f"write -c -P 0 {1100 * M} {320 * M}",
            f"write -c -P 0x31 {1420 * M} {16 * M}", cwd=d)
    with qcowfast.open(str(d / "top.qcow2")) as img:
        planned = sum(e.length for e in img.extents()
                      if e.kind in (ExtentKind.DATA, ExtentKind.COMPRESSED))
    assert planned > 4 * MEMORY_BOUND, planned
    return d / "top.qcow2"


def _check_big_output(path: Path) -> None:
    """Compare a converted big image with _BIG_REGIONS, reading only its data extents."""
    __tracebackhide__ = True
    assert path.stat().st_size == _BIG_SIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = 0
        pos = 0
        while True:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                n = min(8 * M, end - pos)
                got = os.pread(fd, n, pos)
                want = bytearray(n)
                for start, length, fill in _BIG_REGIONS:
                    a, b = max(start, pos), min(start + length, pos + n)
                    if a < b:
                        want[a - pos:b - pos] = bytes([fill]) * (b - a)
                        seen += b - a
                assert_same_bytes(got, bytes(want), "big image output", base=pos)
                pos += n
        assert seen == sum(length for _, length, _ in _BIG_REGIONS), "data missing"
    finally:
        os.close(fd)


# The child reports VmHWM (the peak RSS of its own address space), not getrusage()'s ru_maxrss:
# Linux folds the RSS of the pre-exec image into ru_maxrss, which for a child spawned by this
# test process is the RSS of pytest itself (hundreds of MiB of cached reference images).
_RSS_CHILD = """
import sys, qcowfast
r = qcowfast.convert(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]))
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
sys.stderr.write(f"vmhwm_kib={hwm} written={r.bytes_written}\\n")
"""


@pytest.mark.parametrize("mode", ["file", "stream"])
def test_memory_bound(big_image, tmp_path, mode):
    """Peak RSS converting 2 GiB with 4 threads stays under 256 MiB (convert.py's own estimate
    is about threads x 40 MiB plus L2 caches), to a file and streamed into a pipe."""
    dst = tmp_path / "out.raw"
    argv = [sys.executable, "-c", _RSS_CHILD, str(big_image),
            str(dst) if mode == "file" else "-", "4"]
    if mode == "file":
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        err = proc.stderr
    else:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
            received = 0
            for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
                received += len(chunk)
            err = p.stderr.read().decode()
        proc = p
        assert received == _BIG_SIZE
    assert proc.returncode == 0, err
    rss = int(err.split("vmhwm_kib=")[1].split()[0]) * K
    print("RSSDEBUG", mode, rss // M)
    if mode == "file":
        _check_big_output(dst)
    assert rss < MEMORY_BOUND, f"{mode}: peak RSS {rss / M:.0f} MiB converting a 2 GiB image"


def test_ctrl_c_leaves_nothing(big_image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "big.raw"
    # The signal goes 50 ms after the temporary file appears; on a loaded machine the whole
    # conversion (about 0.3 s) can finish first: that attempt proves nothing and is repeated.
    for _attempt in range(5):
        proc = subprocess.Popen(_cli("convert", "--threads", "1", big_image, dst),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not _leftovers(out):
                assert proc.poll() is None, f"convert ended before it was interrupted: " \
                                            f"{proc.returncode} {proc.stderr.read()}"
                assert time.monotonic() < deadline, "no temporary file appeared"
                time.sleep(0.005)
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            break
        assert os.listdir(out) == ["big.raw"], err          # finished first: complete
        dst.unlink()
    # The CLI ends by the signal itself (as qemu-img does) or with 128 + SIGINT.
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), err
    assert "Traceback" not in err
    assert not err.strip() or err.strip().splitlines()[-1].startswith("qcowfast: "), err
    assert os.listdir(out) == [], "interrupted conversion left files behind"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_threads_are_capped_and_progress_advances(across_units, tmp_path, fmt):
    """threads=10**6 runs (and reports) at most 64 workers, each of which holds a unit buffer
    (it created one thread per unit in flight); progress starts at 0 and only advances on the
    raw, the QCOW2 and the stream paths."""
    want = reference_raw(across_units)
    progress = _Progress()
    out = tmp_path / f"out.{fmt}"
    before = threading.active_count()
    peak = [before]

    def count(done, total):
        peak[0] = max(peak[0], threading.active_count())

    progress.on_call = count
    result = qcowfast.convert(str(across_units), str(out), format=fmt, threads=10 ** 6,
                              unit_size=256 * 1024, progress=progress)
    assert result.threads == 64
    assert peak[0] - before <= 64, peak
    progress.check(len(want))
    if fmt == "raw":
        assert_same_bytes(out.read_bytes(), want, "threads=10**6")
        stream, progress = io.BytesIO(), _Progress()
        qcowfast.convert(str(across_units), stream, progress=progress)
        progress.check(len(want))
        assert_same_bytes(stream.getvalue(), want, "stream")
    else:
        qemu_img("compare", "-q", across_units, out)
