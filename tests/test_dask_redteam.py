"""`qcowfast.dask` attacked on real `distributed` clusters (loopback only, every wait bounded).

One module-scoped LocalCluster (2 worker processes, one thread each) serves the tests that do
not need a cluster of their own; clusters made for one test are closed in a `finally`.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes

import distributed
from qcowfast import dask as qdask
from qcowfast import fleet
from qcowfast.output import TMP_SUFFIX
from test_dask import client  # noqa: F401 (a fixture: one 2-worker cluster per module)

MIB = 1024 * 1024


def _raw(path: Path, size: int, fill: bytes = b"\x5a") -> Path:
    with open(path, "wb") as f:
        f.write(fill * size)
    return path


def _temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(TMP_SUFFIX)]


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- exceptions the client cannot rebuild ---------------------------------------------------

class NeedsTwo(Exception):
    """Pickles as NeedsTwo(message) but needs two arguments: unpickling it fails."""

    def __init__(self, message, extra):
        super().__init__(message)
        self.extra = extra


class LockedOSError(OSError):
    """An OSError whose __init__ takes an extra argument."""

    def __init__(self, code, text, extra):
        super().__init__(code, text)
        self.extra = extra


def _raising_run_job(by_src: dict):
    """Install, in a worker, a run_job raising the exception named for the job's source."""
    original = fleet.__dict__.setdefault("_unpatched_run_job", fleet.run_job)
    made = {"needs-two": lambda: NeedsTwo("bad image header", 1),
            "holds-lock": lambda: ValueError("cannot go on", threading.Lock()),
            "oserror": lambda: LockedOSError(errno.ENOSPC, "disk full", 1)}

    def run_job(job, **kw):
        kind = by_src.get(os.path.basename(job.src))
        if kind is None:
            return original(job, **kw)
        raise made[kind]()
    fleet.run_job = run_job
    return True


def _restore_run_job():
    fleet.run_job = fleet.__dict__.pop("_unpatched_run_job", fleet.run_job)
    return True


def test_unpicklable_exceptions_come_back_as_the_jobs_error(client, tmp_path):
    """An exception the client cannot unpickle came back as a TypeError about __init__ (or
    "Could not serialize"), hiding the job's error and failing the batch's single gather."""
    names = {"a.raw": "needs-two", "b.raw": "holds-lock", "c.raw": "oserror"}
    jobs = [{"src": _raw(tmp_path / n, 4096), "dst": tmp_path / f"{n}.out", "src_format": "raw"}
            for n in (*names, "ok.raw")]
    client.run(_raising_run_job, names)
    try:
        results = qdask.convert_many(jobs, client)
    finally:
        client.run(_restore_run_job)
    assert type(results[0]) is Exception and "NeedsTwo: bad image header" in str(results[0])
    assert type(results[1]) is ValueError and "cannot go on" in str(results[1])
    assert isinstance(results[2], OSError) and results[2].errno == errno.ENOSPC
    assert "LockedOSError: disk full" in str(results[2])
    assert isinstance(results[3], qcowfast.ConvertResult), results[3]


def test_standard_output_is_refused_as_the_jobs_result(client, tmp_path):
    """A job writing "-" streamed the image into a worker's standard output (its log) and
    came back a success; it is refused in its slot, the other jobs run."""
    src = _raw(tmp_path / "a.raw", 4096)
    results = qdask.convert_many([{"src": src, "dst": "-", "src_format": "raw"},
                                  {"src": src, "dst": tmp_path / "a.out", "src_format": "raw"}],
                                 client)
    assert isinstance(results[0], ValueError) and "standard output" in str(results[0])
    assert isinstance(results[1], qcowfast.ConvertResult), results[1]
    assert (tmp_path / "a.out").read_bytes() == src.read_bytes()


# -- arguments and clusters that would make a batch wait forever ----------------------------

@pytest.mark.parametrize("retries", ["2", 1.5, -1, True])
def test_retries_must_be_a_count(client, tmp_path, retries):
    """The scheduler asserted on "2" and 1.5 (an AssertionError in each slot), and took -1 and
    True silently."""
    src = _raw(tmp_path / "a.raw", 4096)
    with pytest.raises(ValueError, match="retries"):
        qdask.submit_many([{"src": src, "dst": tmp_path / "out", "src_format": "raw"}], client,
                          retries=retries)
    assert not (tmp_path / "out").exists()


def test_cluster_without_workers_fails_fast(tmp_path):
    """Tasks on a cluster with no worker waited forever."""
    cluster = distributed.LocalCluster(n_workers=0, processes=False,
                                       dashboard_address="127.0.0.1:0")
    c = distributed.Client(cluster)
    futures = []
    try:
        with pytest.raises(ValueError, match="no workers"):
            futures = qdask.submit_many([(_raw(tmp_path / "a.raw", 4096), tmp_path / "o")], c)
    finally:
        c.cancel(futures)
        c.close()
        cluster.close()


def test_resources_declared_by_different_workers_fail_fast(tmp_path):
    """{"disk": 1, "gpu": 1} with "disk" on one worker and "gpu" on the other: each name was
    declared somewhere, so the check passed, and the task waited forever for one worker
    holding both."""
    from distributed import Scheduler, SpecCluster, Worker
    workers = {name: {"cls": Worker, "options": {"nthreads": 1, "resources": {name: 1},
                                                 "host": "127.0.0.1"}}
               for name in ("disk", "gpu")}
    cluster = SpecCluster(scheduler={"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}, workers=workers)
    c = distributed.Client(cluster)
    futures = []
    try:
        c.wait_for_workers(2, timeout=30)
        job = [(_raw(tmp_path / "a.raw", 4096), tmp_path / "o")]
        with pytest.raises(ValueError, match="none has them all"):
            futures = qdask.submit_many(job, c, resources={"disk": 1, "gpu": 1})
        assert isinstance(qdask.convert_many(job, c, resources={"disk": 1})[0],
                          qcowfast.ConvertResult)
    finally:
        c.cancel(futures)
        c.close()
        cluster.close()


# -- skip_existing as convert_many decides it ----------------------------------------------

def _hold(started: str, release: str) -> bool:
    """A task occupying its worker's thread until `release` exists (30 s at most)."""
    open(started, "a").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def test_skip_existing_is_decided_when_the_batch_starts(client, tmp_path):
    """convert_many skips a job whose output exists when the batch starts, and lets another
    job of the batch read that output. On Dask the task decided again when it ran: an output
    removed meanwhile was written again, while the other job read it."""
    def batch(directory: Path) -> list:
        directory.mkdir()
        src = _raw(directory / "src.raw", 4096, b"\x02")
        _raw(directory / "done.raw", 4096, b"\x01")
        return [{"src": src, "dst": directory / "done.raw", "src_format": "raw"},
                {"src": directory / "done.raw", "dst": directory / "next.raw",
                 "src_format": "raw"}]
    local = qcowfast.convert_many(batch(tmp_path / "local"), skip_existing=True)
    assert isinstance(local[0], fleet.Skipped), local
    jobs = batch(tmp_path / "dask")
    done = jobs[0]["dst"]
    release = str(tmp_path / "release")
    holds = [client.submit(_hold, str(tmp_path / f"started{i}"), release, pure=False)
             for i in range(2)]
    try:
        assert _until(lambda: all((tmp_path / f"started{i}").exists() for i in range(2)))
        futures = qdask.submit_many(jobs, client, skip_existing=True)
        done.unlink()                       # before any task of the batch can run
    finally:
        Path(release).touch()
        distributed.wait(holds, timeout=30)
    distributed.wait(futures, timeout=30)
    results = [f.result() for f in futures]
    assert isinstance(results[0], fleet.Skipped), results[0]
    assert not done.exists()
    assert isinstance(results[1], (OSError, qcowfast.QcowError)), results[1]


# -- cancellation: Ctrl-C while gathering, futures cancelled ---------------------------------

def _slow_run_job(marker: str, delay: float):
    """Install, in a worker, a run_job whose conversions pause `delay` s at each unit (after
    the caller's progress check); the first unit creates `marker`."""
    original = fleet.__dict__.setdefault("_unpatched_run_job", fleet.run_job)

    def run_job(job, progress=None, **kw):
        def slow(done, total):
            if progress is not None:
                progress(done, total)
            if done:
                open(marker, "a").close()
            time.sleep(delay)
        return original(job, progress=slow, **kw)
    fleet.run_job = run_job
    return True


def _slow_jobs(tmp_path: Path, n: int) -> list:
    src = _raw(tmp_path / "src.raw", 64 * MIB)
    out = tmp_path / "out"
    out.mkdir()
    return [{"src": src, "dst": out / f"{i}.raw", "src_format": "raw"} for i in range(n)]


def test_ctrl_c_while_gathering_stops_the_running_conversions(client, tmp_path):
    """Ctrl-C in convert_many left its tasks converting on the workers: the outputs were
    published after the caller had been interrupted (temporary files meanwhile). Now, as in
    qcowfast.convert_many, the running conversions stop and remove their temporary files
    before the KeyboardInterrupt reaches the caller."""
    marker = tmp_path / "started"
    jobs = _slow_jobs(tmp_path, 4)
    client.run(_slow_run_job, str(marker), 0.5)

    def press_ctrl_c():
        if _until(marker.exists, 20):
            os.kill(os.getpid(), signal.SIGINT)
    poke = threading.Thread(target=press_ctrl_c, daemon=True)
    try:
        poke.start()
        with pytest.raises(KeyboardInterrupt):
            qdask.convert_many(jobs, client)
        assert _temps(tmp_path / "out") == []
        time.sleep(1.0)                     # two more units of a conversion left running
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    finally:
        poke.join(30)
        client.run(_restore_run_job)


def test_cancelled_futures_stop_their_conversions(client, tmp_path):
    """submit_many's futures cancelled: the running conversion stops at its next unit and
    removes its temporary file (it ran on and published its output)."""
    marker = tmp_path / "started"
    jobs = _slow_jobs(tmp_path, 1)
    client.run(_slow_run_job, str(marker), 0.5)
    try:
        futures = qdask.submit_many(jobs, client)
        assert _until(marker.exists)
        client.cancel(futures)
        assert _until(lambda: _temps(tmp_path / "out") == [], 10)
        time.sleep(1.0)
        assert not Path(jobs[0]["dst"]).exists()
    finally:
        client.run(_restore_run_job)
    # The cluster is still usable, and the next batch converts the job.
    results = qdask.convert_many(jobs, client)
    assert isinstance(results[0], qcowfast.ConvertResult), results[0]
    assert_same_bytes(Path(jobs[0]["dst"]).read_bytes(), Path(jobs[0]["src"]).read_bytes(),
                      "converted after the cancelled batch")
