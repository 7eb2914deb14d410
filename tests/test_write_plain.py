"""The QCOW2 writer's numpy-free path (raw files and qcow2 chains read by _plain, tables built
with `array`) against its general path: the same bytes for every source, the layout
independent of which empty units are skipped, hand-over when the source changes, no numpy."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qcowfast
from qcowfast import _plain, image as image_mod, writer
from qcowfast.errors import QcowError

from common import (assert_same_bytes, l2_entry, numpy_imported_after, qemu_img, qemu_io,
                    reference_raw)

K, M = 1024, 1024 * 1024


def _write(src, dst, monkeypatch=None, *, general=False, fmt=None, **kw) -> bytes:
    """write_qcow2 `src` into `dst` (on the general path when asked); return the bytes."""
    with (monkeypatch.context() if monkeypatch else _nothing()) as m:
        if general:
            m.setattr(writer, "_plain_chain", lambda *a: None)
        fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with image_mod.open_source(str(src), fmt) as source:
                writer.write_qcow2(source, fd, threads=kw.pop("threads", 2), **kw)
        finally:
            os.close(fd)
    return dst.read_bytes()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.fixture
def plain_spy(monkeypatch):
    """Counts units read by the plain path: mapped from the page cache, or read into a buffer."""
    seen = {"mapped": 0, "read": 0, "handed_over": 0}
    real_map, real_write = writer._map_piece, writer._write

    def map_piece(*args):
        found = real_map(*args)
        seen["mapped"] += found is not None
        return found

    def write(source, fd, chain, *args):
        if chain is not None:
            chain = _Counting(chain, seen)
        try:
            return real_write(source, fd, chain, *args)
        except writer._HandOver:
            seen["handed_over"] += 1
            raise
    monkeypatch.setattr(writer, "_map_piece", map_piece)
    monkeypatch.setattr(writer, "_write", write)
    return seen


class _Counting:
    """A _plain.Chain whose read() counts (and fails at guest offset `fail_at`, if set)."""

    def __init__(self, chain, seen, fail_at=None):
        self.chain, self.seen, self.fail_at = chain, seen, fail_at

    def read(self, start, n, buf):
        self.seen["read"] += 1
        if start == self.fail_at:
            return _plain.FALLBACK
        return self.chain.read(start, n, buf)

    def __getattr__(self, name):
        return getattr(self.chain, name)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_every_image_matches_the_general_path(image, tmp_path, monkeypatch, plain_spy,
                                                     compression):
    fast = _write(image.path, tmp_path / "fast.qcow2", compression=compression)
    assert plain_spy["mapped"] + plain_spy["read"] > 0 or not any(reference_raw(image.path))
    assert plain_spy["handed_over"] == 0
    slow = _write(image.path, tmp_path / "slow.qcow2", monkeypatch, general=True,
                  compression=compression)
    assert_same_bytes(fast, slow, image.id)
    qemu_img("compare", image.path, tmp_path / "fast.qcow2")


@pytest.mark.parametrize("cluster_size", [512, 64 * K, 2 * M])
def test_raw_sources_match_the_general_path(tmp_path, monkeypatch, plain_spy, cluster_size):
    """Odd sizes (a last unit shorter than a cluster is read, not mapped), zeros and data."""
    rng = __import__("random").Random(cluster_size)
    data = bytearray(9 * M + 777)
    for _ in range(40):
        at = rng.randrange(len(data))
        data[at:at + rng.randrange(1, 300 * K)] = rng.randbytes(8) * (300 * K // 8)
    data = bytes(data[:9 * M + 777])
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    fast = _write(src, tmp_path / "fast.qcow2", fmt="raw", cluster_size=cluster_size)
    assert plain_spy["mapped"] == 2 and plain_spy["read"] == 1     # 4 + 4 MiB mapped
    slow = _write(src, tmp_path / "slow.qcow2", monkeypatch, general=True, fmt="raw",
                  cluster_size=cluster_size)
    assert_same_bytes(fast, slow, f"raw source, cluster size {cluster_size}")
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "fast.qcow2")


def test_layout_does_not_depend_on_skipped_units(tmp_path, monkeypatch):
    """An L2 table whose last units hold no data is written before the next table's data,
    as it is when every unit is visited: a plan that skips empty units changes nothing."""
    img = tmp_path / "sparse.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(1200 * M))
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 600M 1M", "write -P 0x33 1100M 64k")
    skipping = _write(img, tmp_path / "skip.qcow2")
    unit = writer.WRITE_UNIT

    def every_unit(chain, vsize, unit_):
        assert unit_ == unit
        return ((ui, None) for ui in range(-(-vsize // unit)))
    monkeypatch.setattr(writer, "_plain_plan", every_unit)
    visiting = _write(img, tmp_path / "all.qcow2")
    assert_same_bytes(skipping, visiting, "skipping empty units")
    qemu_img("compare", img, tmp_path / "skip.qcow2")


@pytest.mark.parametrize("fail_at", [0, 4 * M])
def test_hand_over_mid_run_restarts_cleanly(tmp_path, monkeypatch, fail_at):
    """A unit the plain path cannot read after others were written: the file is emptied and
    the general path writes it all, with the same bytes as it would from the start."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(12 * M))
    qemu_io(img, "write -P 0x11 0 2M", "write -P 0x22 5M 64k", "write -P 0x33 9M 1M")
    want = _write(img, tmp_path / "want.qcow2", monkeypatch, general=True, compression="zlib")
    seen = {"read": 0}
    real = writer._plain_chain
    monkeypatch.setattr(writer, "_map_piece", lambda *a: None)
    monkeypatch.setattr(writer, "_plain_chain",
                        lambda *a: _Counting(real(*a), seen, fail_at=fail_at))
    got = _write(img, tmp_path / "got.qcow2", compression="zlib")
    assert seen["read"] >= 1 + fail_at // (4 * M)
    assert_same_bytes(got, want, "handed over")


def test_source_shrinking_is_an_error_not_a_crash(tmp_path):
    """A raw source cut short after it was opened: never mapped past its end (SIGBUS), the
    short read hands over, and the general path reports the truncation; nothing is left."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x5a" * (12 * M))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_open = image_mod.open_source

    def open_then_cut(*args, **kwargs):
        source = real_open(*args, **kwargs)
        os.truncate(src, 5 * M + 100)
        return source
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys.modules["qcowfast.convert"], "open_source", open_then_cut)
        with pytest.raises(QcowError, match="past the end of the file"):
            qcowfast.convert(src, out_dir / "o.qcow2", format="qcow2", src_format="raw")
    assert list(out_dir.iterdir()) == []


def test_plain_sources_never_import_numpy(images, tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\1" * M + bytes(M) + b"\2" * 3000)
    plain = images.get("c4k-chain3-short-base").path
    zlib = images.get("c64k-v3-zlib").path
    zstd = images.get("c32k-extl2-zstd").path
    code = "import qcowfast; qcowfast.convert({!r}, {!r}, format='qcow2', compression={!r})"
    for src, comp in ((raw, None), (raw, "zlib"), (plain, None), (plain, "zstd"), (zlib, None),
                      (zstd, "zstd")):
        out = tmp_path / f"{src.parent.name}-{src.stem}-{comp}.qcow2"
        assert not numpy_imported_after(code.format(str(src), str(out), comp)), (src, comp)
        qemu_img("compare", src, out)
    # The check can fail: two clusters naming one stream send the source to the general path,
    # which uses numpy (and refuses it).
    dup = tmp_path / "dup.qcow2"
    qemu_img("create", "-f", "qcow2", dup, str(M))
    qemu_io(dup, "write -c -P 0x11 0 64k")
    entry = l2_entry(dup, 0)[1]
    with open(dup, "r+b") as f:
        f.seek(l2_entry(dup, 3)[0])
        f.write(entry.to_bytes(8, "big"))
    refused = (f"import qcowfast\ntry:\n    {code.format(str(dup), str(tmp_path / 'd.qcow2'), None)}"
               "\nexcept qcowfast.CorruptImage:\n    pass")
    assert numpy_imported_after(refused.replace("import qcowfast; ", ""))
    cli = subprocess.run([sys.executable, "-X", "importtime", "-m", "qcowfast", "convert", "-f",
                          "raw", "-O", "qcow2", str(raw), str(tmp_path / "cli.qcow2")],
                         capture_output=True, text=True, check=True)
    assert " numpy" not in cli.stderr
    assert (tmp_path / "cli.qcow2").read_bytes() == \
        (tmp_path / f"{tmp_path.name}-a-None.qcow2").read_bytes()
