"""Outputs allocate what qemu-img convert allocates, for every -S: QCOW2 clusters (the default
with clusters smaller than 4 KiB, -S 0 plain and compressed, larger -S values) and raw file
blocks (-S values that are not powers of two up to 4 KiB), over raw sources with holes and
qcow2 chains (compressed, zero, unallocated, extended L2, preallocated metadata, raw and qcow2
backing files). Also -o compression_type without -c."""
from __future__ import annotations

import ctypes
import os
import random

import pytest

import qcowfast

from common import data_blocks, qemu_img, qemu_info, qemu_io, qemu_map, run_cli

K, M = 1024, 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_PUNCH_HOLE_KEEP_SIZE = 3


def _allocated(path, cluster_size: int) -> set:
    """Guest clusters `qemu-img map` reports as data (compressed or not)."""
    found = set()
    for e in qemu_map(path):
        if e["data"]:
            found.update(range(e["start"] // cluster_size,
                               -(-(e["start"] + e["length"]) // cluster_size)))
    return found


def _random_raw(rng: random.Random, path, size: int) -> None:
    """Runs of random data and zeros at sector granularity, then a few punched holes."""
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = rng.choice([1, 2, 3, 7, 8, 9, 16, 40, 128, 300, 2000, 5000]) * 512
        if rng.random() < 0.45:
            buf[pos:pos + n] = rng.randbytes(len(buf[pos:pos + n]))
        pos += n
    path.write_bytes(buf)
    if rng.random() < 0.5:
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(5):
                off = rng.randrange(size) // 4096 * 4096
                length = rng.choice([4096, 64 * K, M])
                _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE_KEEP_SIZE, ctypes.c_long(off),
                                ctypes.c_long(length))
        finally:
            os.close(fd)


def _random_qcow2(rng: random.Random, path, size: int) -> None:
    cs = rng.choice([512, 4 * K, 64 * K])
    opts = f"cluster_size={cs}"
    if cs == 64 * K and rng.random() < 0.3:
        opts += ",extended_l2=on"
    backing = []
    pick = rng.random()
    if pick < 0.15:
        opts += ",preallocation=metadata"
    elif pick < 0.4:
        if rng.random() < 0.5:
            base = path.with_suffix(".base.raw")
            _random_raw(rng, base, rng.choice([size, size // 2 // 512 * 512]))
            backing = ["-b", base, "-F", "raw"]
        else:
            base = path.with_suffix(".base.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={rng.choice([512, 64 * K])}",
                     base, rng.choice([size, size // 2 // 512 * 512]))
            qemu_io(base, f"write -P 7 0 {size // 4 // 512 * 512}",
                    f"write -P 9 {size // 8 // 512 * 512} 299520")
            backing = ["-b", base, "-F", "qcow2"]
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *backing, path, size)
    commands = []
    for _ in range(rng.randint(1, 12)):
        off = rng.randrange(size) // 512 * 512
        length = min(rng.choice([512, 1536, 4 * K, 64 * K, 299520]), size - off)
        verb = rng.random()
        commands.append(f"write -P {rng.randrange(256)} {off} {length}" if verb < 0.6 else
                        f"write -z {off} {length}" if verb < 0.8 else f"discard {off} {length}")
    qemu_io(path, *commands)
    if rng.random() < 0.3:
        packed = path.with_suffix(".c.qcow2")
        qemu_img("convert", "-c", "-O", "qcow2", path, packed)
        os.replace(packed, path)


CASES = [(seed, kind) for seed in range(12) for kind in ("raw", "qcow2")]


@pytest.mark.parametrize("seed,kind", CASES)
def test_clusters_allocated_as_qemu_img_allocates(tmp_path, seed, kind):
    rng = random.Random(1000 * seed + (kind == "qcow2"))
    size = rng.choice([M, 3 * M, 5 * M]) + rng.choice([0, 512, 4096])
    src = tmp_path / f"src.{kind}"
    (_random_raw if kind == "raw" else _random_qcow2)(rng, src, size)
    cs = rng.choice([512, 1 * K, 2 * K, 4 * K, 64 * K])
    sparse = rng.choice([0, 512, 1536, 4 * K, 8 * K, 64 * K, 128 * K, M])
    compress = ["-c"] if rng.random() < 0.2 else []
    args = ["-f", kind, "-O", "qcow2", *compress, "-o", f"cluster_size={cs}", "-S", sparse, src]
    qemu_img("convert", *args, tmp_path / "qemu.qcow2")
    proc = run_cli("convert", "-q", *args, tmp_path / "ours.qcow2")
    assert proc.returncode == 0, proc.stderr
    what = f"{kind} source, cluster_size={cs}, -S {sparse} {' '.join(compress)}"
    want = _allocated(tmp_path / "qemu.qcow2", cs)
    got = _allocated(tmp_path / "ours.qcow2", cs)
    assert got == want, (f"{what}: clusters only qemu-img stores {sorted(want - got)[:8]}, "
                         f"only qcowfast stores {sorted(got - want)[:8]}")
    qemu_img("check", tmp_path / "ours.qcow2")
    qemu_img("compare", "-f", kind, "-F", "qcow2", src, tmp_path / "ours.qcow2")


@pytest.mark.parametrize("seed,kind", [(s, k) for s in range(6) for k in ("raw", "qcow2")])
def test_raw_output_blocks_allocated_as_qemu_img_allocates(tmp_path, seed, kind):
    rng = random.Random(5000 + 2 * seed + (kind == "qcow2"))
    size = rng.choice([M, 3 * M]) + rng.choice([0, 512, 4096])
    src = tmp_path / f"src.{kind}"
    (_random_raw if kind == "raw" else _random_qcow2)(rng, src, size)
    sparse = rng.choice([1536, 2560, 3072, 8 * K, 64 * K, 128 * K, M])
    args = ["-f", kind, "-O", "raw", "-S", sparse, src]
    qemu_img("convert", *args, tmp_path / "qemu.raw")
    proc = run_cli("convert", "-q", *args, tmp_path / "ours.raw")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "qemu.raw").read_bytes()
    want, got = data_blocks(tmp_path / "qemu.raw"), data_blocks(tmp_path / "ours.raw")
    assert got == want, (f"{kind} source, -S {sparse}: blocks only qemu-img allocates "
                         f"{sorted(want - got)[:8]}, only qcowfast {sorted(got - want)[:8]}")


def _mixed_raw(path) -> None:
    """4 MiB + 1 sector: data, short and long zero runs, a hole, data across the unit edge."""
    rng = random.Random(7)
    buf = bytearray(4 * M + 512)
    for off, n in ((0, 3 * 512), (2 * K, 512), (9 * K, 4 * K), (M, 64 * K),
                   (4 * M - 3 * K, 3 * K + 512)):
        buf[off:off + n] = rng.randbytes(n)
    path.write_bytes(buf)


@pytest.mark.parametrize("cs", [512, 2 * K, 64 * K])
@pytest.mark.parametrize("compress", [False, True])
def test_sparse_size_zero_allocates_every_cluster(tmp_path, cs, compress):
    src = tmp_path / "src.raw"
    _mixed_raw(src)
    comp = ["-c"] if compress else []
    dst = tmp_path / "out.qcow2"
    proc = run_cli("convert", "-q", "-f", "raw", "-O", "qcow2", *comp, "-o",
                   f"cluster_size={cs}", "-S", "0", src, dst)
    assert proc.returncode == 0, proc.stderr
    vsize = os.path.getsize(src)
    assert _allocated(dst, cs) == set(range(-(-vsize // cs)))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *comp, "-o", f"cluster_size={cs}",
             "-S", "0", src, tmp_path / "qemu.qcow2")
    assert _allocated(tmp_path / "qemu.qcow2", cs) == _allocated(dst, cs)
    qemu_img("check", dst)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst)


def test_default_sparse_size_with_small_clusters_keeps_short_zero_runs(tmp_path):
    # 512-byte clusters under the default -S 4k (writes aligned to 4 KiB): data in sectors
    # 0-2, 4 and 18-25. Sectors 0-7 and 16-31 are written (zeros up to the 4 KiB boundaries
    # included); the zero run 8-15 and the one from 32 on are not.
    src = tmp_path / "src.raw"
    _mixed_raw(src)
    dst = tmp_path / "out.qcow2"
    qcowfast.convert(src, dst, format="qcow2", src_format="raw", cluster_size=512)
    got = _allocated(dst, 512)
    assert {c for c in got if c < 2048} == set(range(8)) | set(range(16, 32))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src,
             tmp_path / "qemu.qcow2")
    assert got == _allocated(tmp_path / "qemu.qcow2", 512)


@pytest.mark.parametrize("threads", [1, 3])
def test_output_bytes_do_not_depend_on_threads_with_a_sparse_plan(tmp_path, threads):
    src = tmp_path / "src.raw"
    _mixed_raw(src)
    outs = []
    for t in (threads, 2):
        dst = tmp_path / f"out{t}.qcow2"
        qcowfast.convert(src, dst, format="qcow2", src_format="raw", cluster_size=1024,
                         sparse_size=64 * K, threads=t, overwrite=True)
        outs.append(dst.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("compress", [False, True])
def test_compression_type_without_c_is_recorded_in_the_header(tmp_path, compress):
    src = tmp_path / "src.raw"
    _mixed_raw(src)
    comp = ["-c"] if compress else []
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    proc = run_cli("convert", "-q", "-f", "raw", "-O", "qcow2", *comp, "-o",
                   "compression_type=zstd", src, ours)
    assert proc.returncode == 0, proc.stderr
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *comp, "-o", "compression_type=zstd", src,
             ref)
    assert qemu_info(ours)["format-specific"]["data"]["compression-type"] == "zstd"
    compressed = [e for e in qemu_map(ours) if e["data"] and "offset" not in e]
    assert bool(compressed) == compress      # -o compression_type alone compresses nothing
    assert _allocated(ours, 64 * K) == _allocated(ref, 64 * K)
    qemu_img("check", ours)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, ours)


def test_convert_many_compression_type_without_c_does_not_compress(tmp_path):
    src = tmp_path / "src.raw"
    _mixed_raw(src)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("convert-many", "-O", "qcow2", "-o", "compression_type=zstd",
                   "--target-dir", out, src)
    assert proc.returncode == 0, proc.stderr
    (dst,) = out.iterdir()
    assert qemu_info(dst)["format-specific"]["data"]["compression-type"] == "zstd"
    assert all("offset" in e for e in qemu_map(dst) if e["data"])


@pytest.mark.parametrize("kw,message", [
    (dict(compression="zlib", compression_type="zstd"), "differ"),
    (dict(compression_type="lz4"), "compression_type"),
    (dict(format="raw", compression_type="zstd"), "needs format='qcow2'"),
    (dict(compression="zlib", level=5.5), "level"),
    (dict(compression="zlib", level=True), "level"),
    (dict(compression="zstd", level=23), "level"),
    (dict(compression="zstd", level=2 ** 40), "level"),
    (dict(threads=0), "threads"),
    (dict(threads=1.5), "threads"),
    (dict(sparse_size=4096.0), "sparse_size"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, kw, message):
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * 4096)
    dst = tmp_path / "out.img"
    kw.setdefault("format", "qcow2")
    with pytest.raises(ValueError, match=message):
        qcowfast.convert(src, dst, **kw)
    assert not dst.exists() and os.listdir(tmp_path) == ["src.raw"]


@pytest.mark.parametrize("how", ["new", "existing", "direct"])
def test_raw_sparse_size_zero_writes_every_byte(tmp_path, how):
    # qemu-img -S 0 writes the zeros: preallocated but unwritten space would read as holes to
    # SEEK_DATA (cp --sparse, backups, qemu-img map) on ext4.
    src = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "4M")
    qemu_io(src, "write -P 1 0 64k", "write -c -P 2 1M 64k")
    dst = tmp_path / "out.raw"
    extra = {"new": [], "existing": ["-n"], "direct": ["-t", "none"]}[how]
    if how == "existing":
        dst.write_bytes(b"")
        os.truncate(dst, 4 * M)
    proc = run_cli("convert", "-q", "-O", "raw", "-S", "0", *extra, src, dst)
    if how == "direct" and proc.returncode and "O_DIRECT" in proc.stderr:
        pytest.skip("this file system refuses O_DIRECT")      # tmpfs; CI's /tmp is ext4
    assert proc.returncode == 0, proc.stderr
    fd = os.open(dst, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * M
    finally:
        os.close(fd)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", src, dst)


def _sparse_raw(path, size: int, pieces) -> None:
    """A raw file of `size` bytes that holds only `pieces` [(offset, bytes)]: holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("argv", [["-O", "qcow2"], ["-O", "qcow2", "-c"],
                                  ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
                                  ["-O", "raw"]], ids=" ".join)
def test_holes_of_a_raw_source_on_tmpfs_stay_holes(tmp_path, argv):
    """The holes of a raw source are found with SEEK_DATA and never read or mapped, as
    qemu-img's block status skips them: on tmpfs, mapping a hole allocates it, and converting
    a sparse image there used to fill the file system (and RAM) with the source's holes."""
    import shutil
    import tempfile
    shm = tempfile.mkdtemp(dir="/dev/shm", prefix="qcowfast-test-")
    try:
        src = os.path.join(shm, "sparse.raw")
        _sparse_raw(src, 256 * M, [(5 * M + 123, b"a" * 5000), (100 * M, os.urandom(2 * M)),
                                   (256 * M - 512, b"end")])
        blocks = os.stat(src).st_blocks
        out = tmp_path / "out"
        proc = run_cli("convert", "-q", "-f", "raw", *argv, src, out)
        assert proc.returncode == 0, proc.stderr
        assert os.stat(src).st_blocks == blocks, "the source's holes were allocated"
        qemu_img("compare", "-f", "raw", "-F", argv[1], src, out)
    finally:
        shutil.rmtree(shm)


def test_huge_sparse_raw_sources_convert_by_their_data(tmp_path):
    """A 4 TiB raw file holding a few bytes, alone and as the backing file of an overlay:
    conversions visit its data, not its 4 TiB (they read every unit, for minutes; the
    timeout only guards against that), and agree with qemu-img."""
    src = tmp_path / "huge.raw"
    _sparse_raw(src, 4 << 40, [(3 << 40, b"x" * 4096), ((4 << 40) - 1, b"!")])
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "huge.raw", "-F", "raw", top)
    qemu_io(top, "write -P 0x3c 1M 64k")
    for source, fmt, argv in ((src, "raw", ["-O", "qcow2"]), (src, "raw", ["-O", "raw"]),
                              (top, "qcow2", ["-O", "raw"]), (src, "raw", ["-c", "-O", "qcow2"])):
        out = tmp_path / "out"
        proc = run_cli("convert", "-q", "-f", fmt, *argv, source, out, timeout=300)
        assert proc.returncode == 0, proc.stderr
        qemu_img("compare", "-f", fmt, "-F", argv[-1], source, out)
        os.unlink(out)


def test_sparse_plan_walks_the_source_once(tmp_path, monkeypatch):
    """The -S plan asks the source's block status run after run, at increasing offsets: the
    layer's tables are classified once in all, not from each run to the end of the range
    (that made a fragmented source quadratic: 2^17 alternating 512-byte clusters took 139 s,
    qemu-img 7 s)."""
    from qcowfast.image import Image
    raw = tmp_path / "alt.raw"
    clusters = 1 << 12
    with open(raw, "wb") as f:
        for i in range(clusters):
            f.seek(2 * i * 512)
            f.write(b"\x5a" * 512)
        f.truncate(2 * clusters * 512)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-S", "512", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512",
             raw, src)
    classified = []
    own_runs = Image._own_runs

    def counting(self, start, end):
        classified.append(end - start)
        return own_runs(self, start, end)
    monkeypatch.setattr(Image, "_own_runs", counting)
    ours = tmp_path / "ours.qcow2"
    qcowfast.convert(src, ours, format="qcow2", cluster_size=512)
    size = 2 * clusters * 512
    # Once for the plan (the units may read the tables once more).
    assert sum(classified) <= 2 * size, (sum(classified) / size, len(classified))
    monkeypatch.undo()
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=512", src, tmp_path / "qemu.qcow2")
    assert _allocated(ours, 512) == _allocated(tmp_path / "qemu.qcow2", 512)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, ours)
