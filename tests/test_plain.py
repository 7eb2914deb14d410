"""convert's numpy-free path (_plain.pyx: data and compressed clusters) against the general path
and qemu-img: the same bytes, the same holes, the same errors; and no numpy in the process."""
from __future__ import annotations

import os
import subprocess
import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfast
from qcowfast import _plain
import qcowfast.convert  # noqa: E402  (the module, not the function of that name)
convert_module = sys.modules["qcowfast.convert"]
from common import (assert_same_bytes, compressed_stream, data_extents, l2_entry,
                    numpy_imported_after, qemu_img, qemu_io, reference_raw)

K, M = 1024, 1024 * 1024


def _in_host_order(path) -> bool:
    """qemu-img map's view: each layer's data extents lie in increasing host order."""
    from common import qemu_map
    high: dict = {}
    for e in sorted(qemu_map(path), key=lambda e: e["start"]):
        if e.get("data") and not e.get("zero") and "offset" in e:
            key = (e["depth"], e.get("filename"))
            if e["offset"] < high.get(key, 0):
                return False
            high[key] = e["offset"] + e["length"]
    return True


@pytest.fixture
def plain_spy(monkeypatch):
    """Records what each conversion's plain path returned (None: it handed over)."""
    calls = []
    real = convert_module._execute_plain

    def spy(*args, **kwargs):
        try:
            result = real(*args, **kwargs)
        except convert_module._HandOver:
            calls.append(None)
            raise
        calls.append(result)
        return result
    monkeypatch.setattr(convert_module, "_execute_plain", spy)
    return calls


def _general(monkeypatch):
    monkeypatch.setattr(convert_module, "_plain_chain", lambda *a: None)


@pytest.mark.parametrize("sparse_size", [4096, 1024])
def test_every_image_matches_the_general_path(image, tmp_path, monkeypatch, plain_spy,
                                              sparse_size):
    fast, slow = tmp_path / "fast.raw", tmp_path / "slow.raw"
    got = qcowfast.convert(str(image.path), str(fast), sparse_size=sparse_size, threads=2,
                           unit_size=M)
    assert plain_spy and plain_spy[-1] is not None, "an image qemu wrote takes the plain path"
    with monkeypatch.context() as m:
        _general(m)
        want = qcowfast.convert(str(image.path), str(slow), sparse_size=sparse_size,
                                threads=2, unit_size=M)
    assert_same_bytes(fast.read_bytes(), slow.read_bytes(), image.id)
    assert fast.read_bytes() == reference_raw(image.path)
    assert got.bytes_written == want.bytes_written
    assert data_extents(fast) == data_extents(slow)


@pytest.mark.parametrize("threads", [1, 3])
def test_data_and_compressed_clusters_take_the_plain_path(tmp_path, plain_spy, threads):
    img = tmp_path / "mixed.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(40 * M))
    qemu_io(img, "write -P 0x11 0 3M", "write -c -P 0x22 30M 64k", "write -P 0x33 36M 1M")
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), threads=threads, unit_size=M)
    assert plain_spy == [result.bytes_written]
    assert_same_bytes(out.read_bytes(), reference_raw(img), "mixed")
    assert result.bytes_written == 3 * M + 64 * K + M


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_out_of_host_order_takes_the_plain_path(tmp_path, plain_spy, ctype):
    """Compressed clusters written back to front, between data clusters: the check lists the
    pieces, finds no stream read by two clusters, and the plain path inflates them."""
    img = tmp_path / "rev.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compression_type={ctype}", img, str(8 * M))
    qemu_io(img, "write -c -P 0x11 4M 128k", "write -P 0x22 2M 64k", "write -c -P 0x33 1M 64k",
            "write -c -P 0x44 7M 64k")
    later, earlier = (compressed_stream(l2_entry(img, i)[1], 16)[0] for i in (16, 64))
    assert later > earlier          # guest 1M's stream lies after guest 4M's
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), unit_size=M, threads=2)
    assert plain_spy == [result.bytes_written] and result.bytes_written == 5 * 64 * K
    assert_same_bytes(out.read_bytes(), reference_raw(img), "reversed")


@pytest.mark.parametrize("copy", [(0, 5), (2, 0)])
def test_shared_compressed_stream_is_left_to_the_general_path(tmp_path, plain_spy, copy):
    """Two guest clusters naming one compressed stream, the copy after the original in guest
    order or before it: the plain path declines and the general path raises its error."""
    img = tmp_path / "dup.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(M))
    qemu_io(img, "write -c -P 0x11 0 64k", "write -c -P 0x22 128k 64k")
    _, entry, _ = l2_entry(img, copy[0])
    at, _, _ = l2_entry(img, copy[1])
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(entry.to_bytes(8, "big"))
    assert _plain_chain_of(img) is None
    with pytest.raises(qcowfast.CorruptImage, match="share the compressed cluster stream"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"))
    assert plain_spy == []
    assert sorted(os.listdir(tmp_path)) == ["dup.qcow2"]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_bad_stream_hands_over_to_the_general_error(tmp_path, plain_spy, ctype):
    """A stream that does not inflate, after data already copied: the plain path hands over,
    the general path raises DecompressionError, and no output is left."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compression_type={ctype}", img, str(4 * M))
    qemu_io(img, "write -P 0x11 0 1M", "write -c -P 0x22 3M 64k")
    coffset, _ = compressed_stream(l2_entry(img, 48)[1], 16)
    with open(img, "r+b") as f:
        f.seek(coffset)
        f.write(b"\xff" * 16)
    with pytest.raises(qcowfast.DecompressionError, match="does not"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"), unit_size=M, threads=2)
    assert plain_spy == [None]
    assert sorted(os.listdir(tmp_path)) == ["img.qcow2"]


def test_last_stream_overhanging_the_file_end(tmp_path, plain_spy):
    """QEMU writes a compressed cluster's bytes, not its last sector's padding: the last
    stream's rounded length runs past the end of the file, which reads as zeros (the plain path
    serves it). Cut inside the stream, the general path's TruncatedImage, and no output."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(4 * M))
    qemu_io(img, "write -P 0x11 0 64k", "write -c -s /etc/services 3M 64k")
    coffset, csize = compressed_stream(l2_entry(img, 48)[1], 16)
    size = img.stat().st_size
    assert coffset < size < coffset + csize
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out))
    assert plain_spy == [result.bytes_written]
    assert out.read_bytes() == reference_raw(img)
    out.unlink()
    os.truncate(img, coffset + 100)
    with pytest.raises(qcowfast.TruncatedImage, match="cut short by the end of the file"):
        qcowfast.convert(str(img), str(out))
    assert plain_spy[-1] is None
    assert sorted(os.listdir(tmp_path)) == ["img.qcow2"]


def test_data_out_of_host_order_takes_the_plain_path(tmp_path, plain_spy):
    """Clusters written back to front lie in decreasing host order: the check lists the data
    pieces and finds no two sharing host bytes, so the plain path converts it."""
    img = tmp_path / "rev.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(8 * M))
    qemu_io(img, "write -P 0x11 4M 1M", "write -P 0x22 1M 1M", "write -P 0x33 7M 4k")
    assert not _in_host_order(img)
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), unit_size=M)
    assert plain_spy == [result.bytes_written] and result.bytes_written == 2 * M + 4 * K
    assert_same_bytes(out.read_bytes(), reference_raw(img), "reversed")


def test_shared_cluster_is_left_to_the_general_path(tmp_path, plain_spy):
    """Two guest clusters reading one host cluster (out of host order, so found by the
    overlap check): the plain path declines and the general path raises its error."""
    img = tmp_path / "dup.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(M))
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 128k 64k")
    with qcowfast.open(str(img)) as im:
        l2 = int(im._l2_off[0])
    with open(img, "r+b") as f:
        f.seek(l2)
        entry = f.read(8)
        f.seek(l2 + 8 * 5)
        f.write(entry)
    assert _plain_chain_of(img) is None
    with pytest.raises(qcowfast.CorruptImage, match="share the data cluster"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"))
    assert plain_spy == []
    assert sorted(os.listdir(tmp_path)) == ["dup.qcow2"]


def _plain_chain_of(path):
    with qcowfast.open(str(path)) as im:
        return convert_module._plain_chain(im, M, 4096)


def test_bad_entry_later_raises_the_general_error(tmp_path, plain_spy):
    """An L2 entry past the end of the file, after good data: the general path's error, and
    no output left behind."""
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(16 * M))
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 12M 64k")
    with qcowfast.open(str(img)) as im:
        l2 = int(im._l2_off[0])
    entry_at = l2 + (12 * M // (64 * K)) * 8
    with open(img, "r+b") as f:
        f.seek(entry_at)
        f.write((0x8000000000000000 | (1 << 40)).to_bytes(8, "big"))
    out = tmp_path / "out.raw"
    with pytest.raises(qcowfast.QcowError, match="past the end of the file"):
        qcowfast.convert(str(img), str(out), unit_size=M, threads=2)
    assert plain_spy == []
    assert sorted(os.listdir(tmp_path)) == ["bad.qcow2"]


class _FailingChain:
    """A Chain whose copy hands over at one unit (as a read that comes up short would)."""

    def __init__(self, chain, fail_at):
        self.chain, self.fail_at = chain, fail_at

    def next_data(self, pos, end):
        return self.chain.next_data(pos, end)

    def copy(self, start, n, buf, block, fd):
        if start == self.fail_at:
            return _plain.FALLBACK
        return self.chain.copy(start, n, buf, block, fd)


@pytest.mark.parametrize("fail_at", [0, 5 * M])
def test_hand_over_mid_run_restarts_cleanly(tmp_path, monkeypatch, plain_spy, fail_at):
    """A unit the plain path cannot serve after others were written: the output is emptied
    and the general path writes it all; the bytes and holes are qemu-img's."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(12 * M))
    qemu_io(img, "write -P 0x11 0 2M", "write -P 0x22 5M 64k", "write -P 0x33 9M 1M")
    real = convert_module._plain_chain
    monkeypatch.setattr(convert_module, "_plain_chain",
                        lambda *a: _FailingChain(real(*a), fail_at))
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), unit_size=M, threads=2)
    assert plain_spy == [None]
    assert_same_bytes(out.read_bytes(), reference_raw(img), "handed over")
    assert result.bytes_written == 2 * M + 64 * K + M
    assert sum(b - a for a, b in data_extents(out)) == 2 * M + 64 * K + M


@pytest.mark.parametrize("tags", [("backing",), ("compressed", "zstd"), ("compressed", "zlib")])
def test_plain_conversion_never_imports_numpy(images, tmp_path, tags):
    plain = images.get(images.ids(*tags)[0]).path
    code = "import qcowfast; qcowfast.convert({!r}, {!r}{})"
    assert not numpy_imported_after(code.format(str(plain), str(tmp_path / "a.raw"), ""))
    # The check can fail: a -S rule that is not exact needs the general path, with numpy.
    assert numpy_imported_after(code.format(str(plain), str(tmp_path / "b.raw"),
                                            ", sparse_size=65536"))
    cli = subprocess.run([sys.executable, "-X", "importtime", "-m", "qcowfast", "convert",
                          "-O", "raw", str(plain), str(tmp_path / "c.raw")],
                         capture_output=True, text=True, check=True)
    assert " numpy" not in cli.stderr
    assert (tmp_path / "c.raw").read_bytes() == reference_raw(plain)


def test_kernel_checks_its_arguments(tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\1" * 8192)
    fd = os.open(raw, os.O_RDONLY)
    out = os.open(tmp_path / "o.raw", os.O_RDWR | os.O_CREAT)
    try:
        chain = _plain.Chain([(fd, fd, True, 9, 0, 8192, 8192, 0, None, False, -1)])
        buf = bytearray(4096)
        with pytest.raises(ValueError):
            chain.copy(0, 8192, buf, 4096, out)            # longer than the buffer
        with pytest.raises(ValueError):
            chain.copy(0, 4096, buf, 0, out)               # no block size
        with pytest.raises(ValueError):
            chain.copy(-4096, 4096, buf, 4096, out)        # before the start
        assert chain.copy(4096, 4096, buf, 4096, out) == 4096
        assert os.pread(out, 8192, 0) == bytes(4096) + b"\1" * 4096
        with pytest.raises(OSError):
            chain.copy(0, 4096, buf, 4096, fd)             # not open for writing
        assert chain.next_data(0, 8192) == 0
        with pytest.raises(ValueError):
            _plain.Chain([(fd, fd, False, 30, 0, 8192, 8192, 1, array("q"), False, -1)])
        with pytest.raises(ValueError):
            _plain.l1_scan(bytes(16), 16, 1 << 20, array("q", [0]))   # output too short
    finally:
        os.close(fd)
        os.close(out)


def _raw_backed(tmp_path, size):
    """A qcow2 overlay with nothing of its own over a raw file of `size` bytes, and its
    _plain.Chain (the caller closes the image)."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (size // 256))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    im = qcowfast.open(str(top))
    layers = im.chain
    specs = [(layers[0]._fd, layers[0].data_fd, False, layers[0].cluster_bits,
              layers[0]._flags, layers[0].virtual_size, layers[0].data_size,
              layers[0]._l2_per_l1, layers[0]._l2_off, False, -1),
             (layers[1].data_fd, layers[1].data_fd, True, 9, 0, layers[1].virtual_size,
              layers[1].data_size, 0, None, False, -1)]
    return base, im, _plain.Chain(specs)


@pytest.mark.parametrize("size", [4 * M, 192 * K])
def test_file_shrinking_hands_over(tmp_path, size):
    """A raw backing file that shrinks below what its size said: a long piece is not mapped
    (touching it would raise SIGBUS), a short one's read comes up short; either way copy
    hands over and writes nothing."""
    base, im, chain = _raw_backed(tmp_path, size)
    with im:
        out = os.open(tmp_path / "o.raw", os.O_RDWR | os.O_CREAT)
        try:
            assert chain.copy(0, size, bytearray(size), 4096, out) == size
            assert os.pread(out, size, 0) == base.read_bytes()
            os.ftruncate(out, 0)
            os.truncate(base, 64 * K)
            assert chain.copy(0, size, bytearray(size), 4096, out) == _plain.FALLBACK
            assert os.fstat(out).st_size == 0
        finally:
            os.close(out)


def test_mapped_and_buffered_pieces_keep_theirdata_extents(tmp_path):
    """Zero blocks inside a long (mapped) piece, at its unaligned ends and in the short pieces
    around it are left out, and nothing else: the written extents are the non-zero blocks."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, str(4 * M))
    qemu_io(img, "write -P 0x11 6k 1M", "write -z 100k 8k", "write -P 0x22 2M 8k",
            "write -P 0x33 2100k 3k")
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), unit_size=4 * M, threads=1)
    data = reference_raw(img)
    assert out.read_bytes() == data
    blocks = [i for i in range(0, len(data), 4096) if any(data[i:i + 4096])]
    assert result.bytes_written == 4096 * len(blocks)
    written = [(a // 4096, b // 4096) for a, b in data_extents(out)]
    assert sorted(sum((list(range(a, b)) for a, b in written), [])) == [i // 4096 for i in blocks]


@pytest.mark.parametrize("order", range(7))
def test_count_refcounts_matches_the_decoder(order):
    """metadata_preallocated's numpy-free count of used clusters in a refcount block, against
    refcounts.py's decoder, for every entry width and cut."""
    import numpy as np

    from qcowfast.refcounts import decode_refcount_block
    rng = np.random.default_rng(order)
    block = rng.integers(0, 256, 4096, dtype=np.uint8)
    block[rng.random(4096) < 0.6] = 0
    block[rng.random(4096) < 0.2] = 1 << int(rng.integers(0, 8))
    raw = block.tobytes()
    values = decode_refcount_block(raw, order)
    for limit in (0, 1, 7, len(values) // 3, len(values) - 1, len(values), len(values) + 5):
        want = int(np.count_nonzero(values[:max(limit, 0)]))
        assert _plain.count_refcounts(raw, order, limit) == want, limit
    with pytest.raises(ValueError):
        _plain.count_refcounts(raw, 7, 1)


def _hidden_bad_entry_chain(tmp_path, bad: str, cover: str):
    """A compressed base whose L2 entry for guest 128k is made bad, under an overlay that
    writes `cover` (offset and length) there."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(4 * M))
    qemu_io(base, "write -c -P 0x11 0 64k", "write -c -P 0x22 128k 64k",
            "write -c -P 0x33 256k 64k")
    at, entry, bits = l2_entry(base, 2)
    if bad == "copied":
        entry |= 1 << 63                                # compressed with COPIED: refused
    elif bad == "past-eof":
        entry = (1 << 62) | (base.stat().st_size + (1 << 20))
    else:                                               # a data entry with reserved bits
        entry = (base.stat().st_size // (64 * K) * 64 * K) | 0x200 | (1 << 63)
    with open(base, "r+b") as f:
        f.seek(at)
        f.write(entry.to_bytes(8, "big"))
    # 4 KiB clusters: a write over part of the base's cluster copies nothing of it up.
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F",
             "qcow2", top, str(4 * M))
    qemu_io(top, f"write -P 0x44 {cover}")
    return top


@pytest.mark.parametrize("bad", ["copied", "past-eof", "reserved"])
def test_bad_backing_entry_the_overlay_covers_is_never_read(tmp_path, monkeypatch, plain_spy,
                                                            bad):
    """A bad L2 entry of a backing layer that the overlay covers whole is never read, on
    both paths, as in qemu-img (the general path's walk between two holes met it and raised;
    found by a red-team helper). Covered in part, both paths refuse it alike."""
    top = _hidden_bad_entry_chain(tmp_path, bad, "128k 64k")
    fast, slow = tmp_path / "fast.raw", tmp_path / "slow.raw"
    qcowfast.convert(str(top), str(fast))
    assert plain_spy and plain_spy[-1] is not None
    with monkeypatch.context() as m:
        _general(m)
        qcowfast.convert(str(top), str(slow))
    assert fast.read_bytes() == slow.read_bytes() == reference_raw(top)
    for name in ("top.qcow2", "base.qcow2"):
        (tmp_path / name).unlink()
    top = _hidden_bad_entry_chain(tmp_path, bad, "128k 4k")
    errors = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                _general(m)
            with pytest.raises(qcowfast.QcowError) as exc:
                qcowfast.convert(str(top), str(tmp_path / "out.raw"))
        errors.append((type(exc.value), str(exc.value)))
    assert errors[0] == errors[1]
    assert not (tmp_path / "out.raw").exists()


def test_shared_host_hole_of_a_preallocated_image_is_shared(tmp_path, plain_spy):
    """Two L2 entries of a metadata-preallocated image naming one host cluster that is a hole
    of the file: the plain path's check claims the whole cluster (not only its data), so both
    paths refuse the shared cluster alike (found by a red-team helper)."""
    img = tmp_path / "pre.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", img, str(16 * M))
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    at = l2_entry(img, 9)[0]
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(l2_entry(img, 7)[1].to_bytes(8, "big"))
    assert _plain_chain_of(img) is None
    with pytest.raises(qcowfast.CorruptImage, match="0x70000 and 0x90000 share the data cluster"):
        qcowfast.convert(str(img), str(tmp_path / "out.raw"))
    assert plain_spy == []
    assert sorted(os.listdir(tmp_path)) == ["pre.qcow2"]


def _io_counts() -> tuple[int, int]:
    """(bytes read, write calls) of this process so far, as the kernel counts them."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["syscw"])


def test_small_cluster_runs_are_written_from_the_page_cache(tmp_path, plain_spy):
    """An image of 512-byte clusters holds its data in 32 KiB runs between L2 tables: the runs
    of a unit share one mapping of the file, so the data is never read into a buffer (only
    the tables are), and the runs go out in gathered writes, not one call each."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(4 * M))
    img = tmp_path / "img.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, img)
    qcowfast.convert(str(img), str(tmp_path / "warm.raw"), threads=1, unit_size=4 * M)
    out = tmp_path / "out.raw"
    read0, writes0 = _io_counts()
    result = qcowfast.convert(str(img), str(out), threads=1, unit_size=4 * M)
    read1, writes1 = _io_counts()
    assert plain_spy[-1] is not None
    assert out.read_bytes() == raw.read_bytes()
    assert result.bytes_written == 4 * M
    assert read1 - read0 < 512 * K, "the 4 MiB of data was read, not mapped"
    assert writes1 - writes0 <= 8, "128 runs of 32 KiB were written one call each"


def test_shrunken_data_file_of_small_runs_hands_over(tmp_path):
    """Runs sharing one mapping are mapped only while their file still holds them: an external
    data file cut short hands the unit over, with nothing written."""
    img, data = tmp_path / "img.qcow2", tmp_path / "img.data"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size=512,data_file={data.name}", img,
             str(2 * M), cwd=tmp_path)
    qemu_io(img, "write -P 0x5a 0 2M", cwd=tmp_path)
    with qcowfast.open(str(img)) as im:
        chain = convert_module._plain_chain(im, 2 * M, 4096)
        assert chain is not None
        out = os.open(tmp_path / "o.raw", os.O_RDWR | os.O_CREAT)
        try:
            assert chain.copy(0, 2 * M, bytearray(2 * M), 4096, out) == 2 * M
            assert os.pread(out, 2 * M, 0) == b"\x5a" * (2 * M)
            os.ftruncate(out, 0)
            os.truncate(data, M + 300 * K)
            assert chain.copy(0, 2 * M, bytearray(2 * M), 4096, out) == _plain.FALLBACK
            assert os.fstat(out).st_size == 0
        finally:
            os.close(out)


# (offset in 16 KiB steps, KiB, kind): short writes, and long ones that cross the 512 KiB
# chunks a mapped run is scanned and written in.
_WRITES = st.lists(st.tuples(st.integers(0, 255), st.integers(1, 96) | st.integers(500, 1600),
                             st.sampled_from(["data", "data", "zero", "zero-data",
                                              "compressed"])),
                   min_size=1, max_size=12)


def _nonzero_bytes(data: bytes, block: int) -> int:
    return sum(len(data[i:i + block]) for i in range(0, len(data), block)
               if any(data[i:i + block]))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster_kib=st.sampled_from([0.5, 1, 4, 64]), writes=_WRITES,
       sparse_size=st.sampled_from([512, 1024, 4096]), big_block=st.sampled_from([8192, 65536]),
       unit_size=st.sampled_from([256 * K, M, 4 * M]), backing=st.booleans())
def test_any_layout_copies_its_nonzero_blocks_only(tmp_path, plain_spy, cluster_kib, writes,
                                                   sparse_size, big_block, unit_size, backing):
    """Whatever the layout (runs in or out of host order, short and long, zero blocks inside
    them, zero and compressed clusters between them, a raw backing file under unallocated
    clusters): the output is
    qemu-img's, and exactly its non-zero blocks are written (by convert, and by the kernel's
    copy with blocks larger than a cluster)."""
    cs = int(cluster_kib * K)
    size = 4 * M
    for p in tmp_path.iterdir():
        p.unlink()
    img = tmp_path / "img.qcow2"
    base_args = []
    if backing:
        base = tmp_path / "base.raw"
        base.write_bytes((bytes(4096) + bytes(range(1, 256)) * 17)[:8192] * (size // 8192))
        base_args = ["-b", "base.raw", "-F", "raw"]
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", *base_args, img, str(size))
    cmds, touched = [], set()
    for i, (at, kib, kind) in enumerate(writes):
        off, length = at * 16 * K, min(kib * K, size - at * 16 * K)
        if kind == "compressed":
            # Compressed writes go to whole clusters nothing was written to yet.
            off, length = off - off % cs, max(cs, length - length % cs)
            length = min(length, size - off)
            clusters = set(range(off // cs, (off + length) // cs))
            if clusters & touched:
                continue
            cmds.append(f"write -c -P {i + 1} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        elif kind == "zero-data":
            cmds.append(f"write -P 0 {off} {length}")      # zero blocks inside data runs
        else:
            cmds.append(f"write -P {i + 1} {off} {length}")
        touched |= set(range(off // cs, -(-(off + length) // cs)))
    if cmds:
        qemu_io(img, *cmds)
    out = tmp_path / "out.raw"
    result = qcowfast.convert(str(img), str(out), threads=2, unit_size=unit_size,
                              sparse_size=sparse_size)
    assert plain_spy[-1] is not None
    want = reference_raw(img)
    assert out.read_bytes() == want
    assert result.bytes_written == _nonzero_bytes(want, sparse_size)
    with qcowfast.open(str(img)) as im:
        chain = convert_module._plain_chain(im, unit_size, big_block)
        fd = os.open(tmp_path / "big.raw", os.O_RDWR | os.O_CREAT)
        try:
            written = sum(chain.copy(start, unit_size, bytearray(unit_size), big_block, fd)
                          for start in range(0, size, unit_size))
            os.ftruncate(fd, size)
            assert os.pread(fd, size, 0) == want
        finally:
            os.close(fd)
    assert written == _nonzero_bytes(want, big_block)
