"""Threads sharing one image or one as_file() object: reads racing seeks and close().

A file object shared by threads may return the bytes of any position some thread gave it, but
never a count outside [0, len(buffer)] (RawIOBase.read() would read past its buffer). Closing an
image while reads are in flight may make them raise ValueError (or a QcowError), never return
another file's bytes: the descriptors close when the last read leaves.
"""
from __future__ import annotations

import collections
import os
import random
import threading
import time
from pathlib import Path

import pytest

import qcowfast
from qcowfast import reader
from qcowfast.image import open_source
from common import qemu_img, qemu_io, reference_raw

K = 1024
M = 1024 * K
BLOCK = 4 * K


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """plain: 0xaa at [0, 1M), 0xcc at [63M, +4k) of 64M (the red-team's image); numbered and
    numbered-zlib: 4 MiB whose every 4 KiB block holds its index (8 bytes, repeated); chain:
    0xaa at [0, 1M) in the base, 4 KiB at 64k in the top; data: 0xaa at [0, 1M) in an
    external data file."""
    root = tmp_path_factory.mktemp("threads")
    out = {"plain": root / "plain.qcow2"}
    qemu_img("create", "-q", "-f", "qcow2", out["plain"], "64M")
    qemu_io(out["plain"], "write -P 0xaa 0 1M", "write -P 0xcc 63M 4k")
    raw = root / "numbered.raw"
    raw.write_bytes(b"".join(i.to_bytes(8, "little") * (BLOCK // 8) for i in range(4 * M // BLOCK)))
    out["numbered"] = root / "numbered.qcow2"
    qemu_img("convert", "-q", "-O", "qcow2", raw, out["numbered"])
    out["numbered-zlib"] = root / "numbered-zlib.qcow2"
    qemu_img("convert", "-q", "-c", "-O", "qcow2", raw, out["numbered-zlib"])
    qemu_img("create", "-q", "-f", "qcow2", root / "base.qcow2", "4M")
    qemu_io(root / "base.qcow2", "write -P 0xaa 0 1M")
    out["chain"] = root / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", out["chain"],
             cwd=root)
    qemu_io(out["chain"], "write -P 0xaa 64k 4k")
    out["data"] = root / "data.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "4M",
             cwd=root)
    qemu_io("data.qcow2", "write -P 0xaa 0 1M", cwd=root)
    out["raw"] = root / "aa.raw"
    out["raw"].write_bytes(b"\xaa" * M)
    out["x55"] = root / "x55.bin"
    out["x55"].write_bytes(b"\x55" * (8 * M))
    return out


def _run_threads(*targets, timeout: float = 60) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads hung"


def test_shared_file_seek_race(images):
    """The red-team reproducer: one thread seeks to 0 while another seeks near the end and
    reads 4 KiB; each read returns 4 KiB of one of the two positions (it crashed: a count
    recomputed from the moved position)."""
    with qcowfast.open(images["plain"]) as img:
        f = img.as_file()
        at_end = 63 * M - BLOCK
        allowed = {img.read(0, BLOCK), img.read(at_end, BLOCK)}
        stop = False
        bad = []

        def seeker():
            while not stop:
                f.seek(0)

        def main():
            nonlocal stop
            try:
                for _ in range(5000):
                    f.seek(at_end)
                    d = f.read(BLOCK)
                    if d not in allowed:
                        bad.append((len(d), d[:4]))
                        return
            finally:
                stop = True

        _run_threads(seeker, main)
    assert not bad, f"reads of the wrong length or bytes: {bad}"


@pytest.mark.parametrize("name", ["numbered", "numbered-zlib"])
def test_shared_file_sequential_and_random(images, name, monkeypatch):
    """Threads reading one file object sequentially (through small read-ahead windows) and at
    random aligned positions: every chunk is the image's bytes at some position."""
    monkeypatch.setattr(reader, "READAHEAD", 64 * K)
    want = reference_raw(images[name])
    bad = []
    with qcowfast.open(images[name]) as img:
        f = img.as_file()

        def check(d: bytes) -> None:
            p = int.from_bytes(d[:8], "little") * BLOCK if d else 0
            if len(d) > BLOCK or d != want[p:p + len(d)]:
                bad.append((len(d), p))

        def sequential():
            for _ in range(3000):
                check(f.read(BLOCK))
                if f.tell() >= len(want):
                    f.seek(0)

        def random_reads(seed: int):
            rng = random.Random(seed)
            buf = bytearray(BLOCK)
            for _ in range(1500):
                f.seek(rng.randrange(0, len(want), BLOCK))
                n = f.readinto(buf)
                if not 0 <= n <= BLOCK:
                    bad.append(("count", n))
                check(bytes(buf[:n]))

        _run_threads(sequential, sequential, lambda: random_reads(1), lambda: random_reads(2))
        f.close()
    assert not bad, f"{name}: wrong chunks (length, position): {bad[:5]} ({len(bad)})"


def test_close_waits_for_a_read_in_flight(images, monkeypatch):
    """close() while a read is blocked in pread: the descriptor stays open (no later open()
    can take its number) and new reads fail; the read in flight then finishes with the right
    bytes and the descriptor closes."""
    img = qcowfast.open(images["plain"])
    fd = img.data_fd
    entered, release = threading.Event(), threading.Event()
    real_pread = os.pread

    def blocking_pread(f, n, offset):
        if f == fd and threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(30)
        return real_pread(f, n, offset)

    monkeypatch.setattr(os, "pread", blocking_pread)
    got = []
    t = threading.Thread(target=lambda: got.append(img.read(0, M)))    # the general path
    t.start()
    try:
        assert entered.wait(30)
        img.close()
        os.fstat(fd)                                     # still open: the read holds it
        for call in (lambda: img.read(0, BLOCK), lambda: img.read(0, M), img.map,
                     lambda: img.readinto(0, bytearray(BLOCK))):
            with pytest.raises(ValueError, match="closed image"):
                call()
    finally:
        release.set()
        t.join(30)
    assert got == [b"\xaa" * M]
    with pytest.raises(OSError):
        os.fstat(fd)                                     # closed by the read leaving
    assert img._fd == img.data_fd == -1


def _open_kind(images, kind):
    if kind == "raw":
        return open_source(images["raw"], "raw")
    if kind == "shared-backing":
        base = qcowfast.open(images["chain"].parent / "base.qcow2")
        return qcowfast.open(images["chain"], backing=base), base
    return qcowfast.open(images[kind])


@pytest.mark.parametrize("size", [BLOCK, M], ids=["4k", "1M"])
@pytest.mark.parametrize("kind", ["plain", "chain", "data", "raw", "shared-backing"])
def test_close_during_reads_never_returns_other_bytes(images, kind, size):
    """The red-team reproducer, bounded: close an image while a thread reads its first MiB
    (all 0xaa), then open a file of 0x55 a few times (taking freed descriptor numbers). The
    reads give 0xaa or raise ValueError / a QcowError; never other bytes, never EBADF. With
    a shared backing image (backing=), it is the backing image that is closed."""
    res = collections.Counter()
    for it in range(30):
        opened = _open_kind(images, kind)
        img, closing = opened if isinstance(opened, tuple) else (opened, opened)

        def worker():
            try:
                for _ in range(300 if size == M else 3000):
                    d = img.read(0, size)
                    if d != b"\xaa" * size:
                        res[f"wrong bytes {d[:1]!r}"] += 1
                        return
            except (ValueError, qcowfast.QcowError) as exc:
                res["ok" if "closed image" in str(exc) or
                    isinstance(exc, qcowfast.QcowError) else repr(exc)] += 1
            except Exception as exc:
                res[repr(exc)] += 1

        t = threading.Thread(target=worker)
        t.start()
        time.sleep(0.001 * (it % 7))
        closing.close()
        fds = [os.open(images["x55"], os.O_RDONLY) for _ in range(4)]
        t.join(60)
        for fd in fds:
            os.close(fd)
        img.close()
    assert set(res) <= {"ok"}, dict(res)


def test_closing_the_file_object_while_threads_read(images, monkeypatch):
    """ImageFile.close() while other threads read it sequentially: they finish or get
    ValueError; no window is left behind."""
    monkeypatch.setattr(reader, "READAHEAD", 64 * K)
    want = reference_raw(images["numbered"])
    errors = []
    with qcowfast.open(images["numbered"]) as img:
        f = img.as_file()

        def sequential():
            try:
                while d := f.read(BLOCK):
                    p = int.from_bytes(d[:8], "little") * BLOCK
                    assert d == want[p:p + len(d)]
            except ValueError:
                pass
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sequential) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        f.close()
        for t in threads:
            t.join(30)
        assert f._windows == [] and f.closed
        with pytest.raises(ValueError):
            f.read(1)
    assert not errors, errors


def test_closing_one_of_two_images_sharing_a_backing_layer(images):
    """Two images given one opened backing image: closing one closes its descriptors (and
    releases its locks) at once, while threads keep reading the other; the shared layer
    stays open for its owner, and the other image reads on."""
    chain = images["chain"]
    base = qcowfast.open(chain.parent / "base.qcow2")
    one = qcowfast.open(chain, backing=base)
    two = qcowfast.open(chain, backing=base)
    want = one.read(0, 4 << 20)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                if two.read(0, 4 << 20) != want:
                    errors.append("wrong bytes")
            except Exception as exc:             # noqa: BLE001 - collected, asserted below
                errors.append(repr(exc))
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)
        fd = one._fd
        one.close()
        with pytest.raises(OSError):
            os.fstat(fd)                         # closed now, with the other image busy
        time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert two.read(0, 4 << 20) == want
    two.close()
    with qcowfast.open(chain.parent / "base.qcow2") as again:
        assert base.read(0, 1 << 20) == again.read(0, 1 << 20)     # still open, still right
    base.close()


def test_a_file_closed_on_a_prefetch_thread_does_not_wait_for_its_fills(images):
    """The garbage collector may finalize (close) a file nobody closed on a prefetch thread,
    even while that thread completes the file's own fill: close() there must not wait for
    fills (it waited for itself forever: a hang seen once at the interpreter's exit). Closed
    elsewhere, it still waits."""
    from concurrent.futures import Future
    img = qcowfast.open(images["plain"])
    try:
        f = img.as_file()
        f.read(BLOCK)
        f.read(BLOCK)                                   # sequential: read through windows
        stuck = Future()                                # a fill that never finishes
        f._windows[-1].settle()
        f._windows[-1].pending = stuck
        closer = threading.Thread(target=f.close, name="qcowfast-prefetch_9", daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive() and f.closed
        assert stuck.cancelled()
        g = img.as_file()
        g.read(BLOCK)
        g.read(BLOCK)
        pending = Future()
        g._windows[-1].settle()
        g._windows[-1].pending = pending
        waiter = threading.Thread(target=g.close, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not g.closed       # waits for the fill elsewhere
        pending.set_result(0)
        waiter.join(30)
        assert not waiter.is_alive() and g.closed
    finally:
        img.close()


def test_a_file_nobody_closed_is_finalized_without_waiting_for_its_fills(images):
    """The garbage collector may finalize a file nobody closed on any thread, among them a
    read-pool thread that the file's own fill is waiting for (found by a red-team helper: a
    hang, and the collector stuck for good, so memory grew without bound). A finalizer lets
    fills go; close() called on a thread of the program still waits."""
    import gc
    from concurrent.futures import Future
    img = qcowfast.open(images["plain"])
    try:
        f = img.as_file()
        f.read(BLOCK)
        f.read(BLOCK)
        stuck = Future()                                # a fill that never finishes
        f._windows[-1].settle()
        f._windows[-1].pending = stuck
        f.cycle = f                                     # garbage only the collector frees
        del f
        collector = threading.Thread(target=gc.collect, daemon=True)
        collector.start()
        collector.join(30)
        assert not collector.is_alive()
        assert stuck.cancelled()
    finally:
        img.close()


def _python(code: str, *args, timeout: float = 120):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _compressed(tmp_path) -> Path:
    """A 64 MiB image of compressed clusters (48 MiB of 0x5a): windows take a while to fill."""
    src = tmp_path / "compressed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "plain.qcow2", "64M")
    qemu_io(tmp_path / "plain.qcow2", "write -P 0x5a 0 48M")
    qemu_img("convert", "-c", "-O", "qcow2", tmp_path / "plain.qcow2", src)
    return src


def test_unclosed_files_collected_while_their_fills_run(tmp_path):
    """Files in reference cycles, left unclosed while the next window fills in the background:
    whichever thread the collector runs on, the program goes on (it hung every time)."""
    src = _compressed(tmp_path)
    code = """if True:
        import gc, sys, time, qcowfast
        img = qcowfast.open(sys.argv[1])
        gc.set_threshold(1, 1, 1)               # (collections come sooner)
        class Holder: pass
        for i in range(100):
            f = img.as_file()
            f.seek((i * 3 << 20) % (40 << 20))
            f.read(1 << 20); f.read(1 << 20)    # the next window fills in the background
            h = Holder(); h.f = f; h.h = h
            del f, h
            time.sleep(0.02)
        print("end")
    """
    proc = _python(code, src)
    assert (proc.returncode, proc.stdout) == (0, "end\n"), proc.stderr


def test_files_in_a_forked_child(tmp_path):
    """A child forked while a window fills in the parent reads on and exits: the fill's thread
    is not the child's (it waited for it forever, at its next read or at its exit). The bytes
    it reads are the image's."""
    code = """if True:
        import os, sys, qcowfast
        img = qcowfast.open(sys.argv[1])
        want = img.read(0, 8 << 20)
        assert want == b"\x5a" * (8 << 20)
        for trial in range(6):
            f = img.as_file()
            f.read(1 << 20); f.read(1 << 20)    # the next window fills in the background
            pid = os.fork()
            if pid == 0:
                if trial % 2:
                    os._exit(0 if f.read(4 << 20) == want[2 << 20:6 << 20] else 3)
                sys.exit(0)                     # finalizers, then exit
            _, status = os.waitpid(pid, 0)
            assert status == 0, (trial, status)
            f.close()
        print("end")
    """
    proc = _python(code, _compressed(tmp_path), timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "end\n"), proc.stderr
