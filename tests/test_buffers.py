"""Unit buffers reused across conversions (qcowfast.buffers): stale contents never reach an
output, the pool is bounded, and a process whose malloc returns big blocks to the kernel at once
(Dask workers: MALLOC_TRIM_THRESHOLD_) stops paying page faults for them on every image."""
from __future__ import annotations

import os
import subprocess
import sys

import qcowfast
from qcowfast import buffers

from common import qemu_img, reference_raw

M = 1024 * 1024


def test_pool_reuses_and_is_bounded(monkeypatch):
    monkeypatch.setattr(buffers, "_free", {})
    monkeypatch.setattr(buffers, "_kept", 0)
    monkeypatch.setattr(buffers, "KEEP_BYTES", 3 * M)
    a = buffers.take(M)
    buffers.give(a)
    assert buffers.take(M) is a                 # the same buffer comes back
    many = [buffers.take(M) for _ in range(5)]
    for buf in many:
        buf[:4] = b"used"
        buffers.give(buf)
    assert buffers._kept == 3 * M               # three kept, two dropped
    assert sum(len(v) for v in buffers._free.values()) == 3
    assert len(buffers.take(2 * M)) == 2 * M    # another size: a new buffer


IMAGES = ("c64k-v3", "c64k-v3-zlib", "c64k-v3-zstd", "c4k-chain3-short-base",
          "c512-v3-zlib", "c64k-extl2-zlib-backing")


def test_stale_contents_never_reach_an_output(images, tmp_path, monkeypatch):
    """Every buffer handed out is full of junk, as a reused one may be: outputs (raw and qcow2,
    plain and compressed, every path) hold exactly the source's bytes, and are the same file
    whatever the junk (no stale byte lands even where the guest cannot see it)."""
    real = buffers.take
    junk = [b"\xa5"]

    def dirty(size):
        buf = real(size)
        buf[:] = junk[0] * size
        return buf
    monkeypatch.setattr(buffers, "take", dirty)
    odd = tmp_path / "odd.raw"                  # a last cluster the writer pads with zeros
    odd.write_bytes(os.urandom(3 * M + 777))
    sources = [(images.get(i).path, None) for i in IMAGES] + [(odd, "raw")]
    for k, (src, fmt) in enumerate(sources):
        want = reference_raw(src) if fmt is None else odd.read_bytes()
        outputs = {}
        for junk[0] in (b"\xa5", b"\x5a"):
            raw = tmp_path / f"{k}.raw"
            dense = tmp_path / f"{k}-dense.raw"
            qcowfast.convert(src, raw, src_format=fmt, threads=2, unit_size=M, overwrite=True)
            qcowfast.convert(src, dense, src_format=fmt, threads=2, unit_size=M, sparse_size=0,
                             overwrite=True)
            assert raw.read_bytes()[:len(want)] == want, src
            assert dense.read_bytes()[:len(want)] == want, src
            for compression in (None, "zlib"):
                out = tmp_path / f"{k}-{compression}.qcow2"
                qcowfast.convert(src, out, format="qcow2", src_format=fmt, overwrite=True,
                                 compression=compression, threads=2)
                if fmt is None:
                    qemu_img("compare", src, out)
                else:
                    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
                outputs.setdefault(compression, set()).add(out.read_bytes())
            if fmt is None:
                with qcowfast.open(src) as img:
                    assert img.read(0, img.virtual_size) == want, src
        assert all(len(v) == 1 for v in outputs.values()), f"{src}: output depends on junk"


_FAULTS = """
import os, resource, sys
import qcowfast
src, out = sys.argv[1], sys.argv[2]
faults = []
for fmt in ["raw"] * 4 + ["qcow2"] * 4:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    qcowfast.convert(src, out, format=fmt, threads=2, overwrite=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    os.unlink(out)
# Per format: the first conversion's faults, and the fewest of the three repeats'.
print(faults[0], min(faults[1:4]), faults[4], min(faults[5:8]))
"""


def test_buffers_are_not_faulted_in_again_for_each_image(tmp_path):
    """With MALLOC_TRIM_THRESHOLD_ set as Dask sets it, every fresh 8 MiB buffer costs 2048
    page faults; from the second conversion on, the pool's buffers cost none. (QCOW2 output
    here is uncompressed: a compressor's own state, megabytes in zlib-ng and zstd, is still
    allocated per conversion.)"""
    raw = tmp_path / "src.raw"
    line = b"node07 kernel: eth0: link up, 1000 Mbps, full duplex, %08d\n"
    raw.write_bytes(b"".join(line % i for i in range(24 * M // 60))[:24 * M])
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, src)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, "-c", _FAULTS, str(src), str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, check=True)
    first_raw, raw_again, first_qcow2, qcow2_again = map(int, run.stdout.split())
    assert first_raw > 2048 and first_qcow2 > 2048     # the buffers were faulted in once...
    # ...and not again. A repeat may take one more buffer than the runs before it did (how
    # many threads get a unit depends on timing), but with at most one buffer per thread, one
    # of three repeats takes none.
    assert raw_again < first_raw / 3, run.stdout
    assert qcow2_again < first_qcow2 / 3, run.stdout
