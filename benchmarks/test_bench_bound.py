"""The machine's own limit per image, beside the conversions (issue 15, "Efficiency").

For each image the bound is what no converter on this machine can beat, measured on the same
files in the same run:

- ``startup_s``: bare interpreter start-up, ``python3 -c pass`` (a Python tool pays it);
- ``copy_s``: the page-cache copy of the image's data: every byte of the image file read with
  ``pread`` and as many bytes as the converted output holds written to a fresh file in the
  output directory (tmpfs when it has room), 8 MiB per call, on all cores;
- ``inflate_s``: inflating every compressed cluster of the image on all cores with the library
  qcowfast uses (libdeflate for zlib, zstd), from memory into a reused buffer.

``bound_s = startup_s + copy_s + inflate_s``; ``report.py`` shows qcowfast's time as a
fraction of it (bound / qcowfast: 100 % is the machine's limit).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import corpus as corpus_mod
from test_bench_convert import REPO, VARIANTS, _source

CHUNK = 8 << 20
THREADS = len(os.sched_getaffinity(0))


@pytest.fixture(scope="session")
def startup_s() -> float:
    """Median wall time of ``python3 -c pass`` (same interpreter and environment)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _compressed_batches(path):
    """Per layer: (compression type, cluster size, streams buffer, offsets, lengths)."""
    import qcowfast
    from qcowfast import ExtentKind
    out = []
    with qcowfast.open(str(path)) as img:
        seen = {}
        for chunk in img._runs(0, img.virtual_size):
            sel = chunk.kind == int(ExtentKind.COMPRESSED)
            for d, h, c in zip(chunk.depth[sel].tolist(), chunk.host[sel].tolist(),
                               chunk.csize[sel].tolist()):
                seen.setdefault(d, {})[h] = c
        for d, streams in seen.items():
            layer = img.layer(d)
            co = np.array(sorted(streams), np.int64)
            cs = np.array([streams[h] for h in co.tolist()], np.int64)
            buf, in_off, in_len = layer.read_compressed(co, cs)
            out.append((int(layer.compression_type), layer.cluster_size, bytes(buf),
                        np.ascontiguousarray(in_off), np.ascontiguousarray(in_len)))
    return out


def _on_all_cores(work) -> float:
    errors = []

    def run(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _copy(src, dst, written: int) -> float:
    size = os.stat(src).st_size
    nchunks = -(-max(size, written) // CHUNK)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def work(i):
            buf = memoryview(bytearray(CHUNK))
            for j in range(i, nchunks, THREADS):
                off = j * CHUNK
                if off < size:
                    os.preadv(fi, [buf], off)
                if off < written:
                    os.pwrite(fo, buf[:min(CHUNK, written - off)], off)
        return _on_all_cores(work)
    finally:
        os.close(fi)
        os.close(fo)
        os.unlink(dst)


def _inflate(batches) -> float:
    from qcowfast._inflate import Decompressor

    def work(i):
        for ctype, cs, buf, in_off, in_len in batches:
            dec = Decompressor(ctype, cs)
            per = max(1, CHUNK // cs)
            out = np.empty(per * cs, np.uint8)
            out_off = np.arange(per, dtype=np.int64) * cs
            mine = np.arange(i * per, len(in_off), THREADS * per)
            for a in mine.tolist():
                b = min(a + per, len(in_off))
                bad = dec.inflate_batch(buf, in_off[a:b], in_len[a:b], out, out_off[:b - a])
                if bad >= 0:
                    raise RuntimeError(f"cluster {a + bad} did not inflate")
    if not batches:
        return 0.0
    return _on_all_cores(work)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bound(benchmark, bench_corpus, bench_tmpfs, bench_rounds, startup_s, variant):
    src, _reference, virtual = _source(bench_corpus, variant)
    import qcowfast
    scratch = bench_tmpfs / f"{variant}.bound-size.raw"
    # The output's size on disk (test_bench_convert checks qcowfast's output is qemu-img's).
    qcowfast.convert(str(src), str(scratch), overwrite=True)
    written = scratch.stat().st_blocks * 512
    scratch.unlink()
    batches = _compressed_batches(src)
    parts: list[tuple[float, float]] = []
    rounds, warmup = bench_rounds
    benchmark.group = variant
    benchmark.pedantic(lambda: parts.append((_copy(src, bench_tmpfs / f"{variant}.bound.raw",
                                                   written), _inflate(batches))),
                       rounds=rounds, warmup_rounds=warmup)
    timed = parts[-rounds:]
    copy_s = statistics.median(p[0] for p in timed)
    inflate_s = statistics.median(p[1] for p in timed)
    benchmark.extra_info.update(
        variant=variant, tool="bound", virtual_bytes=virtual, image_bytes=src.stat().st_size,
        output_fs=corpus_mod.output_fs(bench_tmpfs), written_bytes=written,
        compressed_clusters=sum(len(b[3]) for b in batches), threads=THREADS,
        startup_s=round(startup_s, 4), copy_s=round(copy_s, 4), inflate_s=round(inflate_s, 4),
        bound_s=round(startup_s + copy_s + inflate_s, 4))
