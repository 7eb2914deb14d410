"""Writing QCOW2 images (qcowfast.writer): every output is judged by qemu-img (check, compare,
info), by qcowfast's reader, and every zlib stream by zlib itself inflating with a 4 KiB window.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from backports.zstd import ZstdDecompressor

import qcowfast
from qcowfast import _deflate, image as image_mod, writer
from qcowfast.errors import OutputError, QcowError

from common import QEMU_IMG, assert_same_bytes, qemu_img, qemu_info, reference_raw, run_cli

K, M = 1024, 1024 * 1024


# --------------------------------------------------------------------------- helpers

def _mixed(seed: int, size: int) -> bytes:
    """Runs of zeros, text, random bytes, a repeated block and fills, at byte granularity."""
    rng = random.Random(seed)
    out = bytearray()
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(300)]
    while len(out) < size:
        n = int(rng.lognormvariate(10, 1.5)) + 1
        kind = rng.randrange(5)
        if kind == 0:
            out += bytes(n)
        elif kind == 1:
            out += b" ".join(rng.choice(words) for _ in range(n // 5 + 1))[:n]
        elif kind == 2:
            out += rng.randbytes(n)
        elif kind == 3:
            block = rng.randbytes(rng.randint(16, 3000))
            out += (block * (n // len(block) + 1))[:n]
        else:
            out += bytes([rng.randrange(1, 256)]) * n
    return bytes(out[:size])


def _raw(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def write(src, dst: Path, *, fmt=None, **kw) -> int:
    """Open `src` and write it with write_qcow2 into `dst`; remove `dst` on failure."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with image_mod.open_source(src, fmt) as source:
            return writer.write_qcow2(source, fd, threads=kw.pop("threads", 2), **kw)
    except BaseException:
        os.unlink(dst)
        raise
    finally:
        os.close(fd)


def compressed_streams(path: Path):
    """Yield (guest offset, bytes of the sectors the descriptor names) for every compressed
    cluster, reading the tables as docs/interop/qcow2.txt describes them."""
    data = path.read_bytes()
    cbits, = struct.unpack_from(">I", data, 20)
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    cs = 1 << cbits
    shift = 62 - (cbits - 8)
    for i, l1e in enumerate(np.frombuffer(data, ">u8", l1_size, l1_off).tolist()):
        l2_off = l1e & 0x00FFFFFFFFFFFE00
        if not l2_off:
            continue
        for j, e in enumerate(np.frombuffer(data, ">u8", cs // 8, l2_off).tolist()):
            if e >> 62 & 1:
                off = e & ((1 << shift) - 1)
                sectors = (e >> shift & ((1 << (cbits - 8)) - 1)) + 1
                yield (i * (cs // 8) + j) * cs, data[off & ~511:(off & ~511) + sectors * 512][
                    off & 511:]


def inflate_4k_steps(stream: bytes, cluster_size: int) -> bytes:
    """Inflate with a 4 KiB window, at most 4 KiB of output per call: a stream that refers
    further back than 4 KiB fails ("invalid distance too far back")."""
    d = zlib.decompressobj(-12)
    out, rest = [], stream
    while sum(map(len, out)) < cluster_size:
        chunk = d.decompress(rest, 4096)
        assert len(chunk) <= 4096
        if not chunk:
            break
        out.append(chunk)
        rest = d.unconsumed_tail
    assert d.eof, "the stream does not end within the sectors its descriptor names"
    return b"".join(out)


def verify(out: Path, src: Path, want: bytes, *, cluster_size: int, compression,
           src_fmt: str = "qcow2") -> dict:
    """The oracles every output must satisfy; returns qemu-img check's JSON."""
    check = subprocess.run([QEMU_IMG, "check", "--output=json", str(out)], capture_output=True,
                           text=True)
    report = json.loads(check.stdout)
    assert check.returncode == 0, report
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    qemu_img("compare", "-f", src_fmt, "-F", "qcow2", src, out)
    info = qemu_info(out)
    assert info["format"] == "qcow2" and info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["compression-type"] == (compression or "zlib")
    with qcowfast.open(out) as img:
        assert img.virtual_size == info["virtual-size"]
        assert_same_bytes(img.read(0, img.virtual_size), want + bytes(img.virtual_size - len(want)),
                          f"qcowfast reading {out.name}")
    streams = 0
    for guest, stream in compressed_streams(out):
        streams += 1
        expect = (want + bytes(cluster_size))[guest:guest + cluster_size]
        if compression == "zlib":
            assert_same_bytes(inflate_4k_steps(stream, cluster_size), expect,
                              f"zlib stream of guest cluster {guest:#x}")
        else:                               # one zstd frame within the sectors named
            d = ZstdDecompressor()
            assert_same_bytes(d.decompress(stream), expect, f"zstd frame of {guest:#x}")
            assert d.eof
    if compression is None:
        assert streams == 0
    return report


# --------------------------------------------------------------------------- raw sources

RAW_CASES = [
    ("mixed", 3 * M + 1536), ("zeros", 2 * M), ("random", 1 * M + 4096),
    ("text", 2 * M + 512), ("odd", 1 * M + 777),
]


def _content(kind: str, size: int) -> bytes:
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return random.Random(7).randbytes(size)
    if kind == "text":
        line = b"Dec  2 10:00:00 node07 kernel: eth0: link up, 1000 Mbps, full duplex %d\n"
        return b"".join(line % i for i in range(size // 60 + 1))[:size]
    return _mixed(11, size)


@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [512, 4 * K, 64 * K, 2 * M])
def test_raw_matrix(tmp_path, compression, cluster_size):
    for kind, size in RAW_CASES:
        if kind in ("zeros", "random", "odd") and cluster_size not in (512, 64 * K):
            continue
        data = _content(kind, size)
        src = _raw(tmp_path, f"{kind}.raw", data)
        out = tmp_path / f"{kind}.qcow2"
        n = write(src, out, compression=compression, cluster_size=cluster_size)
        assert n == out.stat().st_size and n % cluster_size == 0
        verify(out, src, data, cluster_size=cluster_size, compression=compression,
               src_fmt="raw")
        if kind == "zeros":                 # zero clusters are never stored
            assert n <= 5 * cluster_size


# --------------------------------------------------------------------------- qcow2 sources

CATALOGUE_CASES = [
    ("c64k-v3-zlib", "zlib", 64 * K), ("c512-v3-zlib", "zstd", 4 * K),
    ("c2m-chain3-mixed-clusters", "zlib", 512), ("c64k-extl2-zlib-backing", "zstd", 64 * K),
    ("c4k-chain3-short-base", None, 2 * M), ("c32k-extl2-zstd", "zlib", 2 * M),
    ("c64k-v3-zeroes", "zlib", 4 * K), ("c64k-v3-tiny", "zstd", 512),
    ("c64k-v3-empty", "zlib", 64 * K), ("c4k-raw-backing-odd", None, 512),
    ("c64k-v3-snapshot", "zstd", 64 * K), ("c2m-v3-zlib", "zstd", 2 * M),
]


@pytest.mark.parametrize("image_id,compression,cluster_size", CATALOGUE_CASES,
                         ids=[f"{i}-{c}-{s}" for i, c, s in CATALOGUE_CASES])
def test_catalogue(images, tmp_path, image_id, compression, cluster_size):
    img = images.get(image_id)
    out = tmp_path / "out.qcow2"
    write(img.path, out, compression=compression, cluster_size=cluster_size)
    verify(out, img.path, reference_raw(img.path), cluster_size=cluster_size,
           compression=compression)


# --------------------------------------------------------------------------- layout rules

@pytest.mark.parametrize("compression,cluster_size", [("zlib", 64 * K), ("zstd", 512),
                                                      (None, 4 * K)])
def test_same_bytes_for_any_thread_count(tmp_path, compression, cluster_size):
    data = _mixed(3, 10 * M + 2048)         # several 4 MiB batches, many refcount blocks at 512
    src = _raw(tmp_path, "src.raw", data)
    digests = set()
    for threads in (1, 2, 5):
        out = tmp_path / f"t{threads}.qcow2"
        write(src, out, compression=compression, cluster_size=cluster_size, threads=threads)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    verify(out, src, data, cluster_size=cluster_size, compression=compression, src_fmt="raw")


def test_zlib_window_is_4k_at_every_level(tmp_path):
    # Random blocks repeated 3000 and 4200 bytes apart: the second kind only matches with a
    # window over 4 KiB (zlib-ng widens level 1's window in some versions).
    rng = random.Random(5)
    data = b"".join((rng.randbytes(n) * 40)[:256 * K] for n in (3000, 4200))
    wide = zlib.compressobj(6, zlib.DEFLATED, -13)
    with pytest.raises(zlib.error, match="too far back"):          # the oracle has teeth
        inflate_4k_steps(wide.compress(data[256 * K:320 * K]) + wide.flush(), 64 * K)
    src = _raw(tmp_path, "rep.raw", data)
    for level in (1, 2, 6, 9):
        out = tmp_path / f"l{level}.qcow2"
        write(src, out, compression="zlib", level=level, cluster_size=64 * K)
        verify(out, src, data, cluster_size=64 * K, compression="zlib", src_fmt="raw")
        assert len(list(compressed_streams(out))) >= 4


def test_stored_only_when_smaller(tmp_path):
    # Random clusters do not shrink: stored plain, as qcow2_co_pwritev_compressed_task does.
    data = random.Random(9).randbytes(256 * K) + b"a" * (256 * K)
    src = _raw(tmp_path, "r.raw", data)
    out = tmp_path / "r.qcow2"
    write(src, out, compression="zlib", cluster_size=64 * K)
    assert [g for g, _ in compressed_streams(out)] == [256 * K + i * 64 * K for i in range(4)]
    verify(out, src, data, cluster_size=64 * K, compression="zlib", src_fmt="raw")


def _disk_like(seed: int, size: int) -> bytes:
    """Content like the benchmark corpus: text, binary records, skewed bytes, random bytes,
    zeros and blocks repeated with a few percent of noise."""
    rng = np.random.default_rng(seed)
    text = _content("text", 1 * M)
    parts, total = [], 0
    while total < size:
        n = int(rng.integers(512, 256 * K))
        kind = int(rng.integers(6))
        if kind == 0:
            a = int(rng.integers(0, len(text) - n)) if n < len(text) else 0
            part = text[a:a + n]
        elif kind == 1:
            rec = np.zeros((n // 64 + 1, 64), np.uint8)
            rec[:, :8] = np.arange(len(rec), dtype=np.uint64).view(np.uint8).reshape(-1, 8)
            rec[:, 8:12] = rng.integers(0, 4, (len(rec), 4))
            rec[:, 12:40] = np.frombuffer(b"user_000042_record_name_here", np.uint8)
            part = rec.tobytes()[:n]
        elif kind == 2:
            part = np.minimum(rng.geometric(0.05, n), 255).astype(np.uint8).tobytes()
        elif kind == 3:
            part = rng.bytes(n)
        elif kind == 4:
            part = bytes(n)
        else:
            blk = np.frombuffer(rng.bytes(int(rng.integers(64, 1024))), np.uint8)
            arr = np.resize(blk, n)
            noise = rng.random(n) < 0.03
            arr[noise] = rng.integers(0, 256, int(noise.sum()))
            part = arr.tobytes()
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def test_size_close_to_qemu_img(tmp_path):
    # At the default level on disk-like content; level 7 also on content full of tiled random
    # blocks, where zlib-ng's levels 2..6 (deflate_medium) lose to zlib's level 6.
    cases = [("disk", _disk_like(21, 24 * M), "zlib", None), ("disk", None, "zstd", None),
             ("tiled", _mixed(21, 12 * M), "zlib", 7)]
    data = None
    for name, content, compression, level in cases:
        data = content if content is not None else data
        src = _raw(tmp_path, f"{name}.raw", data)
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        write(src, ours, compression=compression, level=level)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                 f"compression_type={compression}", src, theirs)
        ratio = ours.stat().st_size / theirs.stat().st_size
        assert ratio <= 1.03, (name, compression, level, ratio)
        ours.unlink()
        theirs.unlink()


@pytest.mark.parametrize("cluster_size", [512, 4096, 8192, 65536])
def test_header_like_qemu_img_create(tmp_path, cluster_size):
    """Header fields and extensions as `qemu-img create` writes them (offsets aside): qemu-img
    7.2 leaves the feature-name table out with clusters of 4 KiB or less."""
    for compression in (None, "zstd"):
        src = _raw(tmp_path, "one.raw", b"x" * 4096)
        out, ref = tmp_path / "o.qcow2", tmp_path / "r.qcow2"
        write(src, out, compression=compression, cluster_size=cluster_size)
        qemu_img("create", "-f", "qcow2", "-o", f"compression_type={compression or 'zlib'},"
                 f"cluster_size={cluster_size}", ref, 4096)
        a, b = out.read_bytes()[:512], ref.read_bytes()[:512]
        for lo, hi in ((0, 20 + 4), (24, 36), (56, 64), (64, 100 + 4), (104, 512)):
            assert a[lo:hi] == b[lo:hi], (lo, hi)
        out.unlink()
        ref.unlink()


def test_refcount_max_starts_a_new_cluster():
    # qcow2_alloc_bytes(): a host cluster at the maximum refcount takes no more streams.
    cs = 512
    comp = np.frombuffer(b"\x01" * 100, np.uint8)
    zero = np.zeros(1, np.int64)
    rc = np.zeros(16, np.uint16)
    entries = np.zeros(1, np.uint64)
    staging = np.zeros(4 * cs, np.uint8)
    carry = np.zeros(cs, np.uint8)
    for at_max, where in ((False, 2 * cs + 10), (True, 3 * cs)):
        rc[2] = _deflate.REFCOUNT_MAX if at_max else 5
        state = np.array([3 * cs, 2, 10, 0], np.int64)   # cluster 2 open, 10 bytes used
        _deflate.pack(comp, zero, comp, zero, np.array([100], np.int64), 9, state, staging,
                      carry, rc, 0, entries, np.zeros((1, 3), np.int64))
        assert int(entries[0]) == (1 << 62) | where     # 100 bytes in one sector
        assert state[3] == (not at_max)                 # the open cluster changed


# --------------------------------------------------------------------------- limits, errors

def test_memory_bounded_and_l1_limit(tmp_path):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, "1T")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 1M", "-c",
                    "write -q -P 0x33 900G 3M", str(big)], check=True, capture_output=True)
    script = (
        "import os, resource, sys\n"
        "from qcowfast import image, writer\n"
        "fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "with image.open_source(sys.argv[1], 'qcow2') as s:\n"
        "    writer.write_qcow2(s, fd, compression='zstd', threads=4)\n"
        # VmHWM: this process's own peak RSS; ru_maxrss also carries pytest's peak over exec.
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")
    out = tmp_path / "out.qcow2"
    proc = subprocess.run([sys.executable, "-c", script, str(big), str(out)],
                          capture_output=True, text=True, check=True)
    assert int(proc.stdout) < 256 * 1024, f"peak RSS {proc.stdout.strip()} KiB"
    check = json.loads(subprocess.run([QEMU_IMG, "check", "--output=json", str(out)],
                                      capture_output=True, text=True).stdout)
    assert check["check-errors"] == 0 and check.get("leaks", 0) == 0
    qemu_img("compare", big, out)
    # 1 TiB of 512-byte clusters needs an L1 table over QEMU's limit: qemu-img refuses too.
    refused = subprocess.run([QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=512",
                              tmp_path / "no.qcow2", "1T"], capture_output=True)
    assert refused.returncode != 0
    with pytest.raises(OutputError, match="L1 table"):
        write(big, tmp_path / "small.qcow2", cluster_size=512)
    assert not (tmp_path / "small.qcow2").exists()


def test_bad_arguments(tmp_path):
    src = _raw(tmp_path, "a.raw", b"a" * 4096)
    for kw in ({"cluster_size": 1024 * 3}, {"cluster_size": 4 * M}, {"compression": "lzo"},
               {"compression": "zlib", "level": 10}, {"level": 3}):
        with pytest.raises(ValueError):
            write(src, tmp_path / "x.qcow2", **kw)



def test_integer_options_take_any_integer_and_refuse_the_rest(tmp_path):
    """Integer options accept numpy integers (anything with __index__) and refuse bool,
    float, str and out-of-range values with a ValueError naming the option, before any
    output exists; so do convert_many's workers/threads and open()'s cache_size."""
    import numpy as np
    src = _raw(tmp_path, "a.raw", b"a" * 4096 + bytes(4096))
    out = tmp_path / "x.qcow2"
    res = qcowfast.convert(src, out, format="qcow2", compression="zlib", level=np.int64(6),
                           threads=np.int32(2), cluster_size=np.uint32(4096),
                           sparse_size=np.int64(4096), max_output_size=np.int64(1 << 20))
    assert res.threads == 2 and qcowfast.info(out)["cluster-size"] == 4096
    for name, value in (("threads", 0), ("threads", "2"), ("threads", True), ("level", 2.0),
                        ("cluster_size", "4096"), ("sparse_size", -512),
                        ("max_output_size", "10"), ("max_stream_size", -1),
                        ("unit_size", 0)):
        kw = {"compression": "zlib"} if name == "level" else {}
        with pytest.raises(ValueError, match=name):
            qcowfast.convert(src, tmp_path / "y.qcow2", format="qcow2", **{name: value}, **kw)
    for kw in ({"workers": "2"}, {"workers": 0}, {"threads": 1.5}):
        with pytest.raises(ValueError, match=rf"^{next(iter(kw))} must be None or an integer "
                                             "of at least 1, not "):
            qcowfast.convert_many([(src, tmp_path / "z.raw")], **kw)
    for value in ("x", -1, 1.5):
        with pytest.raises(ValueError, match="cache_size"):
            qcowfast.open(out, cache_size=value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.raw", "x.qcow2"]


def test_destination_refused_before_any_work(tmp_path):
    """An empty name, a name ending in '/', target_is_zero without existing, and streams
    that cannot take image data are refused up front (OutputError / ValueError)."""
    import io
    src = _raw(tmp_path, "a.raw", b"a" * 4096)
    for dst, what in (("", "names no file"), (str(tmp_path / "d") + "/", "names a directory")):
        with pytest.raises(qcowfast.OutputError, match=what):
            qcowfast.convert(src, dst)
    with pytest.raises(ValueError, match="target_is_zero needs existing"):
        qcowfast.convert(src, tmp_path / "t.raw", target_is_zero=True)
    with open(tmp_path / "text.out", "w") as text:
        with pytest.raises(qcowfast.OutputError, match="text stream"):
            qcowfast.convert(src, text)
    (tmp_path / "ro.out").write_bytes(b"")
    with open(tmp_path / "ro.out", "rb") as ro:
        with pytest.raises(qcowfast.OutputError, match="not open for writing"):
            qcowfast.convert(src, ro)
    assert (tmp_path / "ro.out").read_bytes() == b"" and not (tmp_path / "t.raw").exists()
    buf = io.BytesIO()
    qcowfast.convert(src, buf)
    assert buf.getvalue() == b"a" * 4096

def _corrupt_copy(images, tmp_path, how):
    img = images.copy("c64k-v3-zlib", tmp_path / "src")
    data = bytearray(img.path.read_bytes())
    l1_off, = struct.unpack_from(">Q", data, 40)
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    if how == "l2-past-eof":
        struct.pack_into(">Q", data, l1_off, (len(data) + (1 << 30)) | (1 << 63))
    else:                                   # garbage in every compressed stream
        for j in range(8192):
            e, = struct.unpack_from(">Q", data, l2_off + 8 * j)
            if e >> 62 & 1:
                off = e & ((1 << 54) - 1)
                data[off:off + 16] = b"\xff" * 16
    img.path.write_bytes(bytes(data))
    return img.path


@pytest.mark.parametrize("how", ["l2-past-eof", "bad-streams"])
def test_hostile_source_leaves_nothing(images, tmp_path, how):
    src = _corrupt_copy(images, tmp_path, how)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QcowError):
        write(src, out_dir / "w.qcow2", compression="zlib")
    with pytest.raises(QcowError):
        qcowfast.convert(src, out_dir / "c.qcow2", format="qcow2", compression="zstd")
    assert list(out_dir.iterdir()) == []
    proc = run_cli("convert", "-O", "qcow2", "-c", src, out_dir / "cli.qcow2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- end to end

def test_convert_api_and_cli(images, tmp_path):
    data = _mixed(5, 3 * M + 512)
    src = _raw(tmp_path, "s.raw", data)
    out = tmp_path / "api.qcow2"
    res = qcowfast.convert(src, out, format="qcow2", compression="zstd", cluster_size=4 * K,
                           threads=3)
    assert res.virtual_size == len(data)
    verify(out, src, data, cluster_size=4 * K, compression="zstd", src_fmt="raw")
    cli = tmp_path / "cli.qcow2"
    proc = run_cli("convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                   "compression_type=zstd,cluster_size=4096", src, cli)
    assert proc.returncode == 0, proc.stderr
    assert cli.read_bytes() == out.read_bytes()     # same bytes whatever the thread count
    img = images.get("c64k-chain2-zlib-base")
    cli2 = tmp_path / "chain.qcow2"
    proc = run_cli("convert", "-O", "qcow2", "-c", img.path, cli2)
    assert proc.returncode == 0, proc.stderr
    verify(cli2, img.path, reference_raw(img.path), cluster_size=64 * K, compression="zlib")
    vmdk = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", vmdk, "1M")
    proc = run_cli("convert", "-O", "qcow2", vmdk, tmp_path / "v.qcow2")
    assert proc.returncode != 0 and "VMDK" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "v.qcow2").exists()
