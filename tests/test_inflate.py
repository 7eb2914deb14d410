"""The batch inflater against the stdlib and QEMU's rule for compressed clusters."""
import random
import threading
import zlib

import numpy as np
import pytest
from backports import zstd

from qcowfast._inflate import COMPRESSION_TYPES, Decompressor

ZLIB, ZSTD = COMPRESSION_TYPES["zlib"], COMPRESSION_TYPES["zstd"]


def deflate_raw(data: bytes, wbits: int = -12) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def cluster_data(rng: random.Random, size: int) -> bytes:
    kind = rng.choice(("text", "random", "zeros", "pattern"))
    if kind == "text":
        return (b"the quick brown qcow2 cluster " * (size // 30 + 1))[:size]
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    return bytes(rng.randrange(4) for _ in range(64)) * (size // 64)


def batch(streams, cluster_size, pad=0):
    src = bytearray()
    in_off, in_len = [], []
    for s in streams:
        in_off.append(len(src))
        src += s + b"\xee" * pad                 # trailing bytes up to the sector end
        in_len.append(len(s) + pad)
    out = np.zeros(len(streams) * cluster_size, np.uint8)
    out_off = np.arange(len(streams), dtype=np.int64) * cluster_size
    return bytes(src), np.array(in_off, np.int64), np.array(in_len, np.int64), out, out_off


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 1 << 21])
@pytest.mark.parametrize("ctype", [ZLIB, ZSTD], ids=["zlib", "zstd"])
def test_batch_matches_reference(cluster_size, ctype):
    rng = random.Random(cluster_size + ctype)
    n = 6 if cluster_size == 1 << 21 else 40
    datas = [cluster_data(rng, cluster_size) for _ in range(n)]
    comp = [deflate_raw(d) if ctype == ZLIB else zstd.compress(d) for d in datas]
    src, in_off, in_len, out, out_off = batch(comp, cluster_size, pad=rng.randrange(0, 511))
    assert Decompressor(ctype, cluster_size).inflate_batch(src, in_off, in_len, out,
                                                           out_off) == -1
    assert out.tobytes() == b"".join(datas)


def test_zlib_follows_qemu_rule_for_odd_streams():
    cs = 4096
    dec = Decompressor(ZLIB, cs)
    rng = random.Random(7)
    two = rng.randbytes(cs) + rng.randbytes(cs)
    cases = {
        # More than one cluster of output: QEMU keeps the first cluster (Z_BUF_ERROR, full).
        "longer": (deflate_raw(two), two[:cs], True),
        # The stream ends before the cluster is full: error.
        "short": (deflate_raw(two[:cs - 1]), None, False),
        # The input stops before the stream ends and the cluster is not full: error.
        "truncated": (deflate_raw(two[:cs])[:-200], None, False),
        "garbage": (bytes(rng.randrange(256) for _ in range(600)), None, False),
    }
    for name, (stream, want, ok) in cases.items():
        src, in_off, in_len, out, out_off = batch([stream], cs)
        got = dec.inflate_batch(src, in_off, in_len, out, out_off)
        assert (got == -1) == ok, name
        if ok:
            assert out.tobytes() == want, name


def test_first_failing_index_is_reported():
    cs = 4096
    good = deflate_raw(b"a" * cs)
    src, in_off, in_len, out, out_off = batch([good, good, b"\xff" * 100, good], cs)
    assert Decompressor(ZLIB, cs).inflate_batch(src, in_off, in_len, out, out_off) == 2


def test_zstd_multiple_frames_fill_one_cluster_and_unfinished_frame_fails():
    cs = 65536
    data = random.Random(3).randbytes(cs)
    frames = zstd.compress(data[:20000]) + zstd.compress(data[20000:])
    src, in_off, in_len, out, out_off = batch([frames], cs, pad=100)
    assert Decompressor(ZSTD, cs).inflate_batch(src, in_off, in_len, out, out_off) == -1
    assert out.tobytes() == data
    # A frame longer than the cluster: the cluster fills but the frame is not finished.
    longer = zstd.compress(data + data[:5000])
    src, in_off, in_len, out, out_off = batch([longer], cs)
    assert Decompressor(ZSTD, cs).inflate_batch(src, in_off, in_len, out, out_off) == 0


def test_bounds_checked_at_the_boundary():
    dec = Decompressor(ZLIB, 4096)
    src, in_off, in_len, out, out_off = batch([deflate_raw(b"x" * 4096)], 4096)
    with pytest.raises(ValueError):
        dec.inflate_batch(src, in_off, in_len + 1000, out, out_off)
    with pytest.raises(ValueError):
        dec.inflate_batch(src, in_off, in_len, out, out_off + 1)
    with pytest.raises(ValueError):
        dec.inflate_batch(src, in_off, in_len[:0], out, out_off)
    with pytest.raises(ValueError):
        Decompressor(ZLIB, 256)


def test_threads_inflate_concurrently_with_their_own_decompressors():
    cs = 65536
    rng = random.Random(11)
    datas = [cluster_data(rng, cs) for _ in range(64)]
    src, in_off, in_len, _, out_off = batch([deflate_raw(d) for d in datas], cs)
    want = b"".join(datas)
    results = []

    def work():
        out = np.zeros(len(datas) * cs, np.uint8)
        rc = Decompressor(ZLIB, cs).inflate_batch(src, in_off, in_len, out, out_off)
        results.append(rc == -1 and out.tobytes() == want)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def _unknown_size_frame(data: bytes, window_log: int) -> bytes:
    """A zstd frame declaring a 2**window_log window (no content size, so the header keeps it)."""
    c = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: window_log,
                                     zstd.CompressionParameter.content_size_flag: 0})
    frame = c.compress(data) + c.flush()
    # Frame header (RFC 8878 3.1.1.1): no single-segment flag, so a window descriptor follows;
    # its exponent says 2**(10 + exponent) bytes.
    assert not frame[4] & 0x20 and 10 + (frame[5] >> 3) == window_log
    return frame


_LIMITED_CHILD = r"""
import resource, sys
import numpy as np
from qcowfast._inflate import Decompressor
frame = open(sys.argv[1], "rb").read()
dec = Decompressor(1, 65536)
out = bytearray(65536)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = vm + 48 * 1024 * 1024        # far less than the 128 MiB window the frame declares
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rc = dec.inflate_batch(frame, np.array([0]), np.array([len(frame)]), out, np.array([0]))
sys.stdout.buffer.write(bytes(out) if rc == -1 else b"failed %d" % rc)
"""


def test_zstd_window_needs_no_window_buffer(tmp_path):
    """A frame declaring zstd's default maximum window (2**27, what QEMU decodes) inflates with
    far less address space than that window: the cluster is decoded straight into its output."""
    import subprocess
    import sys
    data = b"".join(b"window %06d " % i for i in range(6000))[:65536]
    (tmp_path / "frame.zst").write_bytes(_unknown_size_frame(data, 27))
    proc = subprocess.run([sys.executable, "-c", _LIMITED_CHILD, str(tmp_path / "frame.zst")],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == data


def test_zstd_window_over_qemu_limit_is_refused():
    """2**28 is over zstd's default window limit, which QEMU keeps: refused, as qemu-img does."""
    data = bytes(range(256)) * 256
    frame = _unknown_size_frame(data, 28)
    unlimited = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: 31})
    assert unlimited.decompress(frame) == data   # valid for a decoder without the limit
    dec = Decompressor(COMPRESSION_TYPES["zstd"], 65536)
    out = bytearray(65536)
    assert dec.inflate_batch(frame, np.array([0]), np.array([len(frame)]), out,
                             np.array([0])) == 0
    assert not dec.input_exhausted


@pytest.mark.parametrize("ctype", [ZLIB, ZSTD])
def test_inflate_one_reads_and_inflates_in_one_call(tmp_path, ctype):
    """The small-read path: pread of one stream, then inflate, as inflate_batch would; a file
    ending first, a stream cut short and a failing read each have their own answer."""
    import os
    cs = 65536
    data = cluster_data(random.Random(ctype), cs)
    stream = deflate_raw(data) if ctype == ZLIB else zstd.compress(data)
    path = tmp_path / "f"
    path.write_bytes(b"\xee" * 1000 + stream + bytes(300))      # sector padding after it
    fd = os.open(path, os.O_RDONLY)
    try:
        dec = Decompressor(ctype, cs)
        out = np.empty(cs, np.uint8)
        assert dec.inflate_one(fd, 1000, len(stream) + 300, out) == 0
        assert out.tobytes() == data
        assert dec.inflate_one(fd, 1000, len(stream) // 2, out) == -1     # cut short
        assert dec.input_exhausted
        assert dec.inflate_one(fd, 1000, len(stream) + 400, out) == -2    # past the file's end
        assert dec.inflate_one(fd, 1000, len(stream), out) == 0           # and usable again
        assert out.tobytes() == data
        with pytest.raises(ValueError):
            dec.inflate_one(fd, 1000, 0, out)
        with pytest.raises(ValueError):
            dec.inflate_one(fd, 1000, len(stream), np.empty(cs - 1, np.uint8))
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        dec.inflate_one(fd, 1000, len(stream), out)                        # closed descriptor
