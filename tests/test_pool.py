"""convert's worker pool (_Pool): results in order, errors handed over, and leaving the block
waits for running calls and never hangs, even when a signal interrupts a thread's start."""
from __future__ import annotations

import sys
import threading
import time

import pytest

import qcowfast.convert  # noqa: F401  (the module, not the function of that name)
from common import CONVERSION_PATHS

convert_module = sys.modules["qcowfast.convert"]
_Pool = convert_module._Pool


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qcowfast_")]


def test_results_and_errors_come_back_per_task():
    with _Pool(2) as pool:
        tasks = [pool.submit(lambda i: i * i, i) for i in range(20)]
        bad = pool.submit(lambda: 1 // 0)
        assert [t.result() for t in tasks] == [i * i for i in range(20)]
        with pytest.raises(ZeroDivisionError):
            bad.result()
    assert pool.running == 0 and pool.created == 2


def test_leaving_waits_for_running_calls_and_skips_cancelled_ones():
    ran, started = [], threading.Event()

    def slow(i):
        started.set()
        time.sleep(0.2)
        ran.append(i)

    with pytest.raises(KeyError):
        with _Pool(1) as pool:
            first = pool.submit(slow, 0)
            later = [pool.submit(ran.append, i) for i in (1, 2)]
            started.wait(5)
            for task in later:
                task.cancelled = True
            raise KeyError("the caller fails while a call runs")
    assert ran == [0] and first.finished.is_set()
    assert all(t.finished.is_set() for t in later)


def test_signal_during_thread_start_does_not_hang(monkeypatch):
    """KeyboardInterrupt raised from Thread.start() after the thread really started (a signal
    landing while start() waits for it): the block still stops every thread it created."""
    real_start = threading.Thread.start
    starts = []

    def interrupted_start(self):
        real_start(self)
        if self.name.startswith("qcowfast_"):
            starts.append(self)
            if len(starts) == 2:            # the second thread runs, but is not "started"
                raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    outcome = []

    def run():
        try:
            with _Pool(2) as pool:
                pool.submit(time.sleep, 0.05)
                pool.submit(time.sleep, 0.05)
        except KeyboardInterrupt:
            outcome.append("interrupted")

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "leaving the pool hung"
    assert outcome == ["interrupted"]
    deadline = time.monotonic() + 5
    while _pool_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pool_threads()


@pytest.fixture(scope="module")
def multi_unit_images(tmp_path_factory):
    """A plain and a zlib-compressed image of 6 MiB with data in each 64 KiB unit of its
    first MiB and in each of the QCOW2 writer's 2 MiB units."""
    from common import qemu_img, qemu_io
    d = tmp_path_factory.mktemp("units")
    plain = d / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", plain, "6M")
    qemu_io(plain, *(f"write -P {i + 1} {i * 65536 + 512} 4096" for i in range(16)),
            "write -P 99 2M 4096", "write -P 98 5M 4096")
    packed = d / "zlib.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, packed)
    return {"plain": plain, "zlib": packed}


@pytest.mark.parametrize("source, options", CONVERSION_PATHS)
def test_one_thread_conversion_runs_in_the_calling_thread(multi_unit_images, tmp_path,
                                                          source, options):
    """threads=1 fills every unit in the calling thread: no pool thread to hand each unit to
    and back (two wake-ups a unit, across cores: jobs side by side in convert_many ran 7-10%
    slower than alone). threads=2 still starts its pool. The output is the same."""
    from common import qemu_img, reference_raw
    import qcowfast
    src = multi_unit_images[source]
    want = reference_raw(src)
    out = tmp_path / "out.img"
    for threads in (2, 1):
        if options.get("existing"):
            out.write_bytes(b"\xa5" * len(want))
        seen: list = []

        def progress(done, total):
            seen.append((threading.get_ident(), [t.name for t in _pool_threads()]))
        result = qcowfast.convert(src, out, threads=threads, unit_size=65536, overwrite=True,
                                  progress=progress, **options)
        assert result.threads == threads
        if options.get("format") == "qcow2":
            qemu_img("check", out)
            assert reference_raw(out) == want
        else:
            assert out.read_bytes() == want
        assert len(seen) > 2 and {ident for ident, _ in seen} == {threading.get_ident()}
        pools = {name for _, names in seen for name in names}
        assert pools if threads == 2 else not pools, (threads, pools)
