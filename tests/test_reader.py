"""Reading: guest bytes, extents and the allocation map of every catalogue image.

The oracles are QEMU's: ``qemu-img convert -O raw`` for bytes and ``qemu-img map --output=json``
for extents (see ``tests/common.py``). Each test runs on every image of the catalogue
(``tests/conftest.py``), whose ids name the test cases.
"""

from __future__ import annotations

import bisect
import io
import os
import random
import threading
import zlib

import pytest

import qcowfast
from qcowfast import ExtentKind
from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw

# Kinds whose bytes come from somewhere other than a zero rule.
_BYTES_KINDS = (ExtentKind.DATA, ExtentKind.COMPRESSED)


def _open(image):
    return qcowfast.open(str(image.path))


def _rng(image, salt: str) -> random.Random:
    return random.Random(zlib.crc32(f"{image.id}/{salt}".encode()))


def _interesting_offsets(image) -> list[int]:
    """Guest offsets where reads are likely to go wrong: cluster, L2-table and layer edges."""
    vs = image.virtual_size
    points = {0, vs}
    for layer in image.chain:
        points.add(min(layer.virtual_size, vs))
        cs = layer.cluster_size or 512
        points.update(range(cs, vs, max(cs, vs // 64 // cs * cs)))
        # One L2 table covers cs * (cs / entry size) bytes; entries are 8 or 16 bytes.
        for entry_size in (8, 16):
            points.update(range(0, vs, cs * (cs // entry_size)))
        if layer.extl2:
            # Subcluster edges (32 per cluster) in the first clusters and the last one.
            points.update(range(0, min(vs, 16 * cs), cs // 32))
            points.update(range(vs - vs % cs, vs, cs // 32))
    return sorted(points)


def _read_plan(image, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Return *count* (offset, size) pairs around interesting offsets, and a few anywhere."""
    vs = image.virtual_size
    cs = image.cluster_size
    points = _interesting_offsets(image)
    plan = [(0, 0), (vs, 0), (max(0, vs - 1), 1), (max(0, vs - 700), 5000)]
    while len(plan) < count:
        if rng.random() < 0.75:
            offset = max(0, rng.choice(points) + rng.randint(-700, 700))
        else:
            offset = rng.randrange(vs + 4096)
        size = rng.choice((0, 1, rng.randint(1, 1100), rng.randint(1, 3 * cs),
                           rng.randint(1, 3 * cs), rng.randint(1, 1 << 20)))
        plan.append((offset, size))
    return plan


# ---------------------------------------------------------------------------------------------
# Bytes


def test_read_whole_image(image):
    want = reference_raw(image.path)
    with _open(image) as img:
        assert img.virtual_size == image.virtual_size == len(want)
        assert img.cluster_size == image.cluster_size
        got = img.read(0, img.virtual_size)
    assert isinstance(got, bytes)
    assert_same_bytes(got, want, f"{image.id}: read(0, virtual_size)")


def test_as_file_reads_everything(image):
    want = reference_raw(image.path)
    with _open(image) as img:
        f = img.as_file()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable() and not f.writable()
        assert_same_bytes(f.read(), want, f"{image.id}: as_file().read()")
        assert f.tell() == len(want)
        assert f.read() == b""
        assert f.read(10) == b""

        # Through a BufferedReader with an odd chunk size, as a consumer like shutil would.
        f.seek(0)
        buffered = io.BufferedReader(f, buffer_size=7 * 1024 + 3)
        chunks = iter(lambda: buffered.read(50_000 + 17), b"")
        assert_same_bytes(b"".join(chunks), want, f"{image.id}: BufferedReader.read() loop")

        # seek/tell/readinto from the middle and from the end.
        mid = len(want) // 3 + 5
        assert f.seek(mid) == mid
        buf = bytearray(100_000)
        n = f.readinto(buf)
        assert n == len(want[mid:mid + len(buf)])
        assert_same_bytes(bytes(buf[:n]), want[mid:mid + n], f"{image.id}: readinto at {mid}")
        assert f.tell() == mid + n
        assert f.seek(-3, io.SEEK_END) == len(want) - 3
        assert f.read(10) == want[-3:]
        f.close()


def test_random_reads(image):
    want = reference_raw(image.path)
    rng = _rng(image, "random-reads")
    with _open(image) as img:
        for offset, size in _read_plan(image, rng, 150):
            got = img.read(offset, size)
            assert_same_bytes(got, want[offset:offset + size],
                              f"{image.id}: read({offset}, {size})", base=offset)


def test_random_readinto(image):
    want = reference_raw(image.path)
    rng = _rng(image, "random-readinto")
    with _open(image) as img:
        for offset, size in _read_plan(image, rng, 60):
            expect = want[offset:offset + size]
            # A memoryview slice of a larger buffer: bytes outside it must stay untouched.
            backing = bytearray(b"\xa5" * (size + 64))
            view = memoryview(backing)[32:32 + size]
            n = img.readinto(offset, view)
            assert n == len(expect), f"{image.id}: readinto({offset}, [{size}]) returned {n}"
            assert_same_bytes(bytes(view[:n]), expect, f"{image.id}: readinto({offset}, [{size}])",
                              base=offset)
            assert backing[:32] == b"\xa5" * 32 and backing[32 + size:] == b"\xa5" * 32


def test_reads_past_the_end(image):
    want = reference_raw(image.path)
    vs = image.virtual_size
    with _open(image) as img:
        assert img.read(vs - 10, 100) == want[-10:]
        assert img.read(vs, 1) == b""
        assert img.read(vs + 12345, 4096) == b""
        assert img.read(0, vs + (1 << 20)) == want
        assert img.read(0, 0) == b""
        buf = bytearray(b"\xee" * 64)
        assert img.readinto(vs - 5, buf) == 5
        assert bytes(buf[:5]) == want[-5:] and buf[5:] == b"\xee" * 59
        assert img.readinto(vs, buf) == 0
        assert img.readinto(vs + 1, bytearray(10)) == 0
        f = img.as_file()
        assert f.seek(vs + 100) == vs + 100
        assert f.read(10) == b""
        assert f.readinto(bytearray(10)) == 0


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base"))
def test_negative_offsets_are_refused(image):
    with _open(image) as img:
        with pytest.raises(ValueError):
            img.read(-1, 10)
        with pytest.raises(ValueError):
            img.readinto(-512, bytearray(10))


def test_concurrent_reads(image):
    """Threads sharing one Image (and its caches) all read the right bytes."""
    want = reference_raw(image.path)
    nthreads = 4
    plans = [_read_plan(image, _rng(image, f"thread-{t}"), 40) for t in range(nthreads)]
    barrier = threading.Barrier(nthreads)
    failures: list[str] = []

    def worker(img, plan):
        try:
            barrier.wait(timeout=30)
            for _ in range(2):
                for offset, size in plan:
                    if img.read(offset, size) != want[offset:offset + size]:
                        failures.append(f"read({offset}, {size})")
        except Exception as exc:  # reported below, in the main thread
            failures.append(f"{type(exc).__name__}: {exc}")

    with _open(image) as img:
        threads = [threading.Thread(target=worker, args=(img, plan)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), f"{image.id}: reader threads hung"
    assert not failures, f"{image.id}: wrong concurrent reads: {failures[:5]} ({len(failures)})"


# ---------------------------------------------------------------------------------------------
# Extents and the map


def _check_cover(extents, start: int, end: int, chain_len: int, what: str) -> None:
    pos = start
    for e in extents:
        assert isinstance(e, qcowfast.Extent), what
        assert e.guest_offset == pos, f"{what}: gap or overlap at {pos}: {e}"
        assert e.length > 0, f"{what}: empty extent {e}"
        assert isinstance(e.kind, ExtentKind), f"{what}: kind of {e} is not an ExtentKind"
        assert 0 <= e.depth < chain_len, f"{what}: depth out of the chain: {e}"
        if e.kind in _BYTES_KINDS:
            assert isinstance(e.host_offset, int) and e.host_offset >= 0, f"{what}: {e}"
        elif e.host_offset is not None:
            # Zero-alloc clusters and unallocated-alloc subclusters keep their host cluster.
            assert isinstance(e.host_offset, int) and e.host_offset >= 0, f"{what}: {e}"
        pos += e.length
    assert pos == end, f"{what}: extents end at {pos}, not at {end}"


def test_extents_cover_the_image(image):
    with _open(image) as img:
        extents = list(img.extents())
    _check_cover(extents, 0, image.virtual_size, len(image.chain), f"{image.id}: extents()")


def _pieces(a: list, b: list, start_a, len_a, start_b, len_b):
    """Sweep two sorted, contiguous interval lists together.

    Yields (start, end, x, y) for every maximal piece lying in one item x of *a* and one
    item y of *b*; the ``start_*``/``len_*`` callables read an item's interval.
    """
    i = j = 0
    while i < len(a) and j < len(b):
        x, y = a[i], b[j]
        x_end, y_end = start_a(x) + len_a(x), start_b(y) + len_b(y)
        yield max(start_a(x), start_b(y)), min(x_end, y_end), x, y
        end = min(x_end, y_end)
        i += x_end == end
        j += y_end == end


def _extent_pieces(a: list, b: list):
    return _pieces(a, b, lambda e: e.guest_offset, lambda e: e.length,
                   lambda e: e.guest_offset, lambda e: e.length)


def test_extents_of_a_window(image):
    """extents(start, length) covers exactly the window and agrees with the full extents."""
    vs = image.virtual_size
    rng = _rng(image, "windows")
    with _open(image) as img:
        full = list(img.extents())
        windows = [(0, vs), (0, None), (vs // 2, None), (vs, 0), (vs, None)]
        windows += [(o, s) for o, s in _read_plan(image, rng, 30) if o <= vs]
        for start, length in windows:
            end = vs if length is None else min(vs, start + length)
            what = f"{image.id}: extents({start}, {length})"
            part = list(img.extents(start, length))
            _check_cover(part, start, end, len(image.chain), what)
            first = bisect.bisect_right([f.guest_offset for f in full], start) - 1
            for lo, hi, e, f in _extent_pieces(part, full[max(first, 0):]):
                where = f"{what}: [{lo:#x}, {hi:#x}): {e} vs full {f}"
                assert (e.kind, e.depth) == (f.kind, f.depth), where
                if e.kind == ExtentKind.COMPRESSED:
                    assert e.host_offset == f.host_offset, where
                elif e.host_offset is not None or f.host_offset is not None:
                    assert None not in (e.host_offset, f.host_offset), where
                    assert e.host_offset - e.guest_offset == f.host_offset - f.guest_offset, where


def _map_kind(entry: dict) -> ExtentKind:
    if not entry["present"]:
        return ExtentKind.UNALLOCATED
    if entry["data"]:
        # QEMU gives every present data range a host offset except compressed clusters.
        return ExtentKind.DATA if "offset" in entry else ExtentKind.COMPRESSED
    return ExtentKind.ZERO


def test_extents_agree_with_qemu_map(image):
    """Sweep extents and map entries together and compare every overlapping piece.

    Map to kind: not present -> UNALLOCATED; data with an offset -> DATA; data without ->
    COMPRESSED; present, not data -> ZERO (with a host offset iff map prints one). A raw
    backing file's holes and its partial last sector, which QEMU calls zero, may be DATA.
    """
    entries = qemu_map(image.path)
    with _open(image) as img:
        extents = list(img.extents())
    assert sum(m["length"] for m in entries) == image.virtual_size
    _check_cover(extents, 0, image.virtual_size, len(image.chain), f"{image.id}: extents()")
    covered = 0
    for lo, hi, e, m in _pieces(extents, entries, lambda e: e.guest_offset, lambda e: e.length,
                                lambda m: m["start"], lambda m: m["length"]):
        what = f"{image.id}: [{lo:#x}, {hi:#x}): extent {e} vs map {m}"
        want_kind = _map_kind(m)
        raw_layer = m["present"] and image.chain[m["depth"]].fmt == "raw"
        if raw_layer and want_kind == ExtentKind.ZERO:
            assert e.kind in (ExtentKind.ZERO, ExtentKind.DATA), what
        else:
            assert e.kind == want_kind, what
        if want_kind != ExtentKind.UNALLOCATED:
            assert e.depth == m["depth"], what
        if e.kind == ExtentKind.DATA and "offset" in m:
            assert e.host_offset - e.guest_offset == m["offset"] - m["start"], what
        if e.kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED) and not raw_layer:
            # Zero clusters and unallocated subclusters keep a host offset exactly when QEMU
            # reports one (zero-alloc, unallocated-alloc).
            assert (e.host_offset is not None) == ("offset" in m), what
            if e.host_offset is not None:
                assert e.host_offset - e.guest_offset == m["offset"] - m["start"], what
        covered += hi - lo
    assert covered == image.virtual_size


def _inflate_cluster(data: bytes, compression: str, cluster_size: int) -> bytes:
    if compression == "zstd":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        return zstd.ZstdDecompressor().decompress(data, max_length=cluster_size)
    return zlib.decompressobj(-12).decompress(data, cluster_size)


def test_extents_describe_the_bytes(image):
    """Each extent's kind and host offset explain the reference bytes on their own.

    DATA: the layer file holds the bytes at host_offset; COMPRESSED: the stream at host_offset
    inflates (with zlib/zstd, not qcowfast) to a cluster holding them, and the extent stays
    within one cluster of its layer; ZERO and UNALLOCATED: the bytes are zeros.
    """
    want = reference_raw(image.path)
    files = {layer.path: layer.path.read_bytes() for layer in image.chain}
    with _open(image) as img:
        extents = list(img.extents())
    for e in extents:
        expect = want[e.guest_offset:e.guest_offset + e.length]
        layer = image.chain[e.depth]
        what = f"{image.id}: {e} in {layer.path.name}"
        if e.kind == ExtentKind.DATA:
            got = files[layer.path][e.host_offset:e.host_offset + e.length]
            if layer.fmt == "raw":
                got += bytes(e.length - len(got))  # QEMU pads a raw file's last sector with zeros
            assert_same_bytes(got, expect, what, base=e.guest_offset)
        elif e.kind == ExtentKind.COMPRESSED:
            cs = layer.cluster_size
            first = e.guest_offset // cs
            assert (e.guest_offset + e.length - 1) // cs == first, f"{what}: spans clusters"
            stream = files[layer.path][e.host_offset:e.host_offset + cs + 1024]
            cluster = _inflate_cluster(stream, layer.compression, cs)
            assert len(cluster) == cs, f"{what}: stream inflates to {len(cluster)} bytes"
            within = e.guest_offset - first * cs
            assert_same_bytes(cluster[within:within + e.length], expect, what,
                              base=e.guest_offset)
        else:
            assert expect == bytes(e.length), f"{what}: {e.kind.name} extent over non-zero bytes"


def test_map_matches_qemu_img(image):
    with _open(image) as img:
        got = img.map()
    want = qemu_map(image.path)
    if got != want:
        n = min(len(got), len(want))
        i = next((i for i in range(n) if got[i] != want[i]), n)
        pytest.fail(f"{image.id}: map() differs from qemu-img map at entry {i}: "
                    f"got {got[i] if i < len(got) else None}, "
                    f"qemu-img {want[i] if i < len(want) else None} "
                    f"({len(got)} vs {len(want)} entries)")


# ---------------------------------------------------------------------------------------------
# The backing chain


def test_backing_chain(image):
    with _open(image) as img:
        layer = img
        assert os.path.samefile(img.filename, image.path)
        for depth, built in enumerate(image.chain):
            what = f"{image.id}: layer {depth} ({built.path.name})"
            assert layer is not None, f"{what}: missing, the chain stops at depth {depth}"
            assert os.path.samefile(layer.filename, built.path), what
            if built.fmt == "qcow2":
                assert isinstance(layer, qcowfast.Image), what
                assert layer.virtual_size == built.virtual_size, what
                assert layer.cluster_size == built.cluster_size, what
                assert layer.header.version == (2 if built.compat == "0.10" else 3), what
                if built.backing_name is None:
                    assert not layer.header.backing_file, what
                else:
                    assert layer.header.backing_file == built.backing_name, what
            else:
                # qemu-img rounds a raw file's size up to 512; the file size is fine too.
                assert layer.virtual_size in (built.path.stat().st_size, built.virtual_size), what
            layer = layer.backing
        assert layer is None, f"{image.id}: chain longer than the {len(image.chain)} layers built"



@pytest.mark.images(ids=("c4k-chain3-short-base", "c64k-raw-backing"))
def test_backing_given_as_an_opened_image(image):
    """backing=<an opened Image> reads, maps and converts like the chain named in the file:
    the shared layer was opened on its own (its own depth 0), yet its runs are counted from
    the top (depth 1, 2, ...), and closing the top leaves it open for its owner."""
    fmt = image.chain[1].fmt
    with _open(image) as want, qcowfast.image.open_source(image.chain[1].path, fmt) as base:
        top = qcowfast.open(image.path, backing=base)
        assert [x.filename for x in top.chain] == [x.filename for x in want.chain]
        assert_same_bytes(top.read(0, top.virtual_size), reference_raw(image.path),
                          f"{image.id} through a shared backing image")
        assert top.as_file().read() == want.read(0, want.virtual_size)
        assert list(top.extents()) == list(want.extents())
        assert top.map() == want.map() == qemu_map(image.path)
        assert top.layer(1) is base and top.by_depth()[1] == (1, base)
        top.close()
        assert base.read(0, 512) == want.backing.read(0, 512)      # still open



def test_oversized_read_refused_before_allocating(tmp_path):
    """read() of more than MAX_READ bytes is a ValueError raised before any buffer exists
    (a 1 TiB read must not end in MemoryError); readinto() with the caller's buffer works."""
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1T")
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        f.truncate(2 << 30)
    for img in (qcowfast.open(path), qcowfast.image.open_source(raw, "raw")):
        with img:
            with pytest.raises(ValueError, match="readinto"):
                img.read(0, img.virtual_size)
            with pytest.raises(ValueError, match="readinto"):
                img.as_file().read()
            buf = bytearray(4096)
            assert img.readinto(img.virtual_size - 4096, buf) == 4096 and buf == bytes(4096)


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base", "c512-v3-zlib"))
def test_as_file_read_ahead_window(image, monkeypatch):
    """Sequential reads served from the read-ahead window, random reads, seeks back into and
    out of the window, and reads across its edges all return qemu-img's bytes."""
    from qcowfast import reader
    monkeypatch.setattr(reader, "READAHEAD", 192 * 1024 + 512)   # many windows, odd edges
    want = reference_raw(image.path)
    rng = random.Random(11)
    with qcowfast.open(image.path) as img:
        f = img.as_file()
        got = bytearray()
        while chunk := f.read(rng.choice((1, 511, 4096, 65536, 100_000))):
            got += chunk
        assert_same_bytes(bytes(got), want, "sequential as_file reads")
        for _ in range(300):
            pos = rng.randrange(len(want))
            f.seek(pos)
            for _ in range(rng.randint(1, 4)):        # a few sequential reads from there
                n = rng.choice((1, 777, 4096, 70_000, 300_000))
                at = f.tell()
                assert_same_bytes(f.read(n), want[at:at + n], f"read at {at:#x}", base=at)
        f.seek(len(want) - 10)
        assert f.read(100) == want[-10:] and f.read(100) == b""


# ---------------------------------------------------------------------------------------------
# Arguments and the closed state


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base"))
def test_offsets_must_be_integers(image):
    """Offsets, sizes and whence go through operator.index, as io.FileIO's do: a float is a
    TypeError (it was truncated, or seek(1.5) was kept and failed later); integer types work."""
    import numpy as np
    want = reference_raw(image.path)
    with _open(image) as img:
        f = img.as_file()
        for call in (lambda: img.read(0.5, 4), lambda: img.read(0, 4.0),
                     lambda: img.readinto(1.5, bytearray(4)), lambda: list(img.extents(0.5)),
                     lambda: list(img.extents(0, 4096.0)), lambda: f.seek(1.5),
                     lambda: f.seek(float("nan")), lambda: f.seek(float("inf")),
                     lambda: f.seek(0, 1.0), lambda: f.read(1.5)):
            with pytest.raises(TypeError):
                call()
        assert f.tell() == 0
        assert img.read(np.int64(3), np.uint16(5)) == want[3:8]
        assert f.seek(np.int64(7)) == 7 and f.read(3) == want[7:10]
        assert f.seek(True, io.SEEK_CUR) == 11
    raw = qcowfast.image.open_source(image.path, "raw")
    with raw:
        with pytest.raises(TypeError):
            raw.read(0.5, 4)
        with pytest.raises(TypeError):
            list(raw.extents(0, 1.5))


def _closed_calls(img) -> dict:
    calls = dict(read=lambda: img.read(0, 4096), read_large=lambda: img.read(0, 1 << 20),
                 readinto=lambda: img.readinto(0, bytearray(4096)), map=img.map,
                 extents=lambda: list(img.extents()), as_file=img.as_file,
                 enter=lambda: img.__enter__())
    if isinstance(img, qcowfast.Image):
        calls.update(iter_map=lambda: list(img.iter_map()), snapshots=lambda: img.snapshots)
    return calls


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base"))
def test_closed_image_refuses_everything(image):
    """After close(), every public method of Image and RawImage (including map, iter_map and
    extents, which read tables or were served from cached ones) raises the ValueError of a
    closed file; close() again is a no-op."""
    for img in (_open(image), qcowfast.image.open_source(image.path, "raw")):
        img.map()                               # tables cached, SmallReader made
        f = img.as_file()
        it = img.extents()
        next(it)
        img.close()
        img.close()
        for name, call in {**_closed_calls(img), "file": lambda: f.read(10),
                           "extents_started": lambda: next(it)}.items():
            with pytest.raises(ValueError, match="closed image"):
                call()
                pytest.fail(f"{type(img).__name__}.{name} on a closed image")


@pytest.mark.images(ids=("c4k-chain3-short-base",))
def test_closed_backing_layer_refuses_reads(image):
    """A read through the chain of an image whose backing layer was closed raises the
    ValueError of a closed image (it never preads a descriptor number reused since)."""
    with _open(image) as img:
        img.read(0, 4096)
        img.backing.close()
        others = [os.open(image.path, os.O_RDONLY) for _ in range(3)]
        try:
            for call in _closed_calls(img).values():
                with pytest.raises(ValueError, match="closed image"):
                    call()
        finally:
            for fd in others:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# io conventions and life cycle


@pytest.mark.images(ids=("c64k-v3-zlib", "c4k-chain3-short-base"))
def test_as_file_follows_io_conventions(image):
    """The file object behaves as io.FileIO does where a reader would notice: read(None) is
    read(-1), a read never allocates more than what is left, write is UnsupportedOperation
    (an OSError), and a closed file refuses readable()/seekable()/writable()."""
    want = reference_raw(image.path)
    with _open(image) as img:
        f = img.as_file()
        assert f.mode == "rb" and f.name == img.filename
        assert f.read(None) == want
        f.seek(len(want) - 10)
        assert f.read(1 << 45) == want[-10:]         # clipped: no 32 TiB buffer
        f.seek(1 << 50)
        assert f.read(1 << 45) == b"" and f.read() == b""
        for call in (lambda: f.write(b"x"), lambda: f.writelines([b"x"]),
                     lambda: f.truncate(0), f.fileno):
            with pytest.raises(io.UnsupportedOperation):
                call()
        f.close()
        for call in (f.readable, f.seekable, f.writable, f.read, f.tell, f.readline):
            with pytest.raises(ValueError, match="closed"):
                call()


def test_as_file_lines(tmp_path):
    """readline()/iteration/readlines() give io.BytesIO's lines (long lines, a last line
    with no newline, readline(size)); a read after readline() continues where the line
    ended."""
    import random
    rng = random.Random(7)
    lines = [b"x" * n + b"\n" for n in (0, 1, 70_000, 3)]
    lines += [bytes(rng.choice(b"ab \t") for _ in range(rng.randrange(200))) + b"\n"
              for _ in range(300)]
    data = b"".join(lines) + b"tail without newline"
    raw = tmp_path / "text.raw"
    raw.write_bytes(data + bytes(-len(data) % 512))  # the image reads whole sectors
    path = tmp_path / "text.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", raw, path)
    want = io.BytesIO(raw.read_bytes())
    with qcowfast.open(path) as img:
        f = img.as_file()
        assert list(f) == want.readlines()
        f.seek(0)
        want.seek(0)
        for size in (5, -1, 1, 100_000, None, 0, 2):
            assert f.readline(size) == want.readline(size), size
            assert f.tell() == want.tell()
        assert f.read(1000) == want.read(1000)
        f.seek(0)
        assert f.readlines() == raw.read_bytes().splitlines(keepends=True)


def test_readall_over_the_limit_says_how_to_read(tmp_path):
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "2G")
    with qcowfast.open(path) as img:
        f = img.as_file()
        with pytest.raises(ValueError, match=r"read\(n\) in pieces"):
            f.read()
        f.seek(-4096, io.SEEK_END)
        assert f.read() == bytes(4096)


def _fds_on(path) -> int:
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == real
        except OSError:
            pass
    return count


@pytest.mark.images(ids=("c4k-chain3-short-base",))
def test_unclosed_image_closes_when_dropped(image):
    """An image dropped without close() closes its whole chain (descriptors and QEMU's locks)
    with a ResourceWarning, as io.FileIO does."""
    import gc
    layers = [layer.path for layer in image.chain]
    before = [_fds_on(p) for p in layers]
    img = qcowfast.open(image.path)
    assert [_fds_on(p) for p in layers] != before
    with pytest.warns(ResourceWarning, match="unclosed image"):
        del img
        gc.collect()
    assert [_fds_on(p) for p in layers] == before


@pytest.mark.images(ids=("c64k-v3-zlib",))
def test_open_image_cannot_be_copied_or_pickled(image):
    """A copy would share descriptors that mean nothing elsewhere (and another file's once
    either copy closed)."""
    import copy
    import pickle
    with _open(image) as img:
        for call in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot pickle or copy"):
                call(img)
        with qcowfast.image.open_source(image.path, "raw") as raw:
            with pytest.raises(TypeError):
                copy.copy(raw)


def test_file_cut_while_open_says_so(tmp_path):
    """A file truncated after it was opened: the TruncatedImage gives both sizes, not the
    stale one alone (which contradicted the offsets it named)."""
    path = tmp_path / "cut.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 0x11 0 4M")
    with qcowfast.open(path) as img:
        size = path.stat().st_size
        os.truncate(path, 1 << 20)
        with pytest.raises(qcowfast.TruncatedImage,
                           match=rf"\(1048576 bytes now, {size} when opened: cut while being "
                                 r"read\)"):
            img.read(0, img.virtual_size)


@pytest.mark.images(ids=("c4k-chain3-short-base",))
def test_backing_image_counts_toward_max_depth(image):
    """A chain built with backing=<opened image> is bounded by max_depth like one named in
    files (a loop of 300 opens used to end in RecursionError on read); max_depth itself must
    be a non-negative integer."""
    layers = [qcowfast.open(image.chain[1].path)]       # mid, with base: a chain of 2
    try:
        with pytest.raises(qcowfast.BackingChainError, match="deeper than 1"):
            qcowfast.open(image.path, backing=layers[0], max_depth=1)
        with pytest.raises(qcowfast.BackingChainError, match="deeper than 1"):
            qcowfast.open(image.path, max_depth=1)          # the same chain, named in files
        with qcowfast.open(image.path, backing=layers[0], max_depth=2) as top:
            assert len(top.chain) == 3 and top.read(0, 4096) == reference_raw(image.path)[:4096]
        for bad in ("3", True, 3.5, -1):
            with pytest.raises(ValueError, match="max_depth"):
                qcowfast.open(image.path, max_depth=bad)
    finally:
        for layer in layers:
            layer.close()
