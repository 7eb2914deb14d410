"""Micro-benchmarks of the Cython kernels; extra_info["bytes"] gives throughput."""
import random
import zlib

import numpy as np
import pytest

from qcowfast import _tables
from qcowfast._inflate import COMPRESSION_TYPES, Decompressor

V3 = _tables.FLAGS["v3"]


def _l2_table(n: int, cluster_bits: int = 16) -> np.ndarray:
    rng = random.Random(1)
    cs = 1 << cluster_bits
    x = 62 - (cluster_bits - 8)
    entries = []
    host = 1 << 20
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            entries.append((1 << 62) | (rng.randrange(1 << (cluster_bits - 8)) << x) | host)
            host += rng.randrange(512, cs)
        elif r < 0.8:
            entries.append((1 << 63) | (host - host % cs + cs))
            host += 2 * cs
        else:
            entries.append(0)
    return np.array(entries, ">u8")


def test_classify_l2_8192_entries(benchmark):
    tbl = _l2_table(8192)
    benchmark.extra_info["bytes"] = tbl.nbytes
    out = benchmark(_tables.classify_l2, tbl, 0, 8192, 16, V3, 0, 1 << 50)
    assert int(out[1].sum()) == 8192 << 16


def _python_route(src, in_off, in_len, out, out_off):
    """The alternative route: one zlib-ng Python call per cluster (what threads would run)."""
    from zlib_ng import zlib_ng
    view = memoryview(src)
    dst = memoryview(out)
    for a, n, o in zip(in_off.tolist(), in_len.tolist(), out_off.tolist()):
        d = zlib_ng.decompressobj(-12)
        dst[o:o + 65536] = d.decompress(view[a:a + n], 65536)
    return -1


@pytest.mark.parametrize("route", ["kernel-batch", "python-per-cluster"])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_inflate_batch_256_clusters_64k(benchmark, kind, route):
    rng = random.Random(2)
    cs = 65536
    if kind == "text":
        datas = [(b"log line %d: cluster refcount ok\n" % i) * 2000 for i in range(256)]
    else:
        datas = [bytes(rng.randrange(40) for _ in range(4096)) * 16 for _ in range(256)]
    datas = [d[:cs].ljust(cs, b"\0") for d in datas]
    src = bytearray()
    in_off, in_len = [], []
    for d in datas:
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        s = c.compress(d) + c.flush()
        in_off.append(len(src))
        in_len.append(len(s))
        src += s
    out = np.empty(256 * cs, np.uint8)
    dec = Decompressor(COMPRESSION_TYPES["zlib"], cs)
    args = (bytes(src), np.array(in_off, np.int64), np.array(in_len, np.int64), out,
            np.arange(256, dtype=np.int64) * cs)
    benchmark.extra_info["bytes"] = out.nbytes
    benchmark.group = f"inflate-{kind}"
    fn = dec.inflate_batch if route == "kernel-batch" else _python_route
    assert benchmark(fn, *args) == -1
    assert out.tobytes() == b"".join(datas)


def test_nonzero_runs_16m(benchmark):
    buf = np.zeros(16 << 20, np.uint8)
    buf[::1 << 20] = 1
    benchmark.extra_info["bytes"] = buf.nbytes
    starts, ends = benchmark(_tables.nonzero_runs, buf, 4096)
    assert len(starts) == 16
