"""`qcowfast.dask` around a batch: what convert_many's watch asks the scheduler each second,
and the sweep of killed runs' temporary files once submit_many's futures are done.

One cluster for the module (loopback, in-process workers, one thread each): "a" and "b"
declare a resource each, "plain" none. The watch tests retire "a" and "b": they come last.
Every wait is bounded.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes

import distributed
from qcowfast import dask as qdask
from qcowfast import fleet
from qcowfast.output import TMP_SUFFIX, _locked_temp, _mkstemp, temp_prefix
from test_dask_redteam import _restore_run_job, _temps, _until

MIB = 1024 * 1024
BATCH_SECONDS = 60
WATCHER = "qcowfast-dask-workers"       # convert_many's watch thread


@pytest.fixture(scope="module")
def cluster():
    from distributed import Scheduler, SpecCluster, Worker
    loopback = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    workers = {name: {"cls": Worker, "options": {"nthreads": 1, "resources": held,
                                                 "memory_limit": 0, **loopback}}
               for name, held in (("a", {"disk-a": 1}), ("b", {"disk-b": 1}), ("plain", {}))}
    spec = SpecCluster(scheduler={"cls": Scheduler, "options": loopback}, workers=workers)
    c = distributed.Client(spec)
    try:
        c.wait_for_workers(3, timeout=30)
        yield spec, c
    finally:
        c.close()
        spec.close()


@pytest.fixture
def client(cluster):
    c = cluster[1]
    yield c
    c.run(_restore_run_job)


def _raw(path: Path, size: int, fill: int) -> Path:
    with open(path, "wb") as f:
        f.write(bytes([fill]) * size)
    return path


def _gated_run_job(gates: dict) -> bool:
    """Install, in a worker, a run_job whose conversion of a source named in `gates`
    ({basename: (started, release, cancellable)}) stops after its first unit, creating
    `started`, until `release` exists (30 s at most); `cancellable`: meanwhile it notices its
    task's cancellation (it stops and removes its temporary file)."""
    original = fleet.__dict__.setdefault("_unpatched_run_job", fleet.run_job)

    def run_job(job, progress=None, **kw):
        gate = gates.get(os.path.basename(job.src))
        if gate is None:
            return original(job, progress=progress, **kw)
        started, release, cancellable = gate

        def paused(done, total):
            if progress is not None:
                progress(done, total)
            if done and not os.path.exists(release):
                open(started, "a").close()
                deadline = time.monotonic() + 30
                while not os.path.exists(release) and time.monotonic() < deadline:
                    if cancellable and progress is not None:
                        progress(done, total)
                    time.sleep(0.02)
        return original(job, progress=paused, **kw)
    fleet.run_job = run_job
    return True


def _orphan(directory: Path, dst_name: str, born_locked: bool = True) -> Path:
    """A temporary file beside `dst_name` as a killed conversion leaves it (named as
    output._locked_temp names it, locked by nobody); an unlocked-at-birth one is an hour old."""
    if born_locked:
        fd, path = _locked_temp(str(directory), temp_prefix(dst_name), TMP_SUFFIX)
    else:
        fd, path = _mkstemp(str(directory), temp_prefix(dst_name), TMP_SUFFIX)
        old = time.time() - 3600
        os.utime(path, (old, old))
    os.close(fd)
    return Path(path)


# -- submit_many: the sweep once the batch's futures are done --------------------------------

def test_submit_many_sweeps_killed_runs_temps_once_its_futures_are_done(client, tmp_path):
    """submit_many never swept: a temporary file that a worker lost mid-conversion left, after
    the directory had been listed for the batch (the attempt that ran the job again never saw
    it), stayed beside the output forever. It is now removed once the last future of the
    batch has ended, and a temporary file a running conversion holds (here another batch's,
    converting to the same destination) is left to it."""
    out = tmp_path / "out"
    out.mkdir()
    src = _raw(tmp_path / "src.raw", 16 * MIB, 0x11)
    slow = _raw(tmp_path / "slow-src.raw", 16 * MIB, 0x22)
    other = _raw(tmp_path / "other-src.raw", 16 * MIB, 0x33)
    marks = {name: (str(tmp_path / f"{name}.started"), str(tmp_path / f"{name}.release"))
             for name in ("slow", "other")}
    client.run(_gated_run_job, {slow.name: (*marks["slow"], True),
                                other.name: (*marks["other"], True)})
    held = None
    try:
        batch = qdask.submit_many([{"src": src, "dst": out / "fast.raw", "src_format": "raw"},
                                   {"src": slow, "dst": out / "slow.raw",
                                    "src_format": "raw"}], client)
        assert _until(lambda: os.path.exists(marks["slow"][0]) and batch[0].done())
        # Another conversion to fast.raw, running while the batch ends.
        running = qdask.submit_many([{"src": other, "dst": out / "fast.raw",
                                      "src_format": "raw"}], client, overwrite=True)
        assert _until(lambda: os.path.exists(marks["other"][0]))
        live = set(_temps(out))
        assert len(live) == 2, live                 # slow.raw's and the other fast.raw's
        stale = [_orphan(out, "fast.raw"), _orphan(out, "slow.raw", born_locked=False)]
        fd, held = _locked_temp(str(out), temp_prefix("fast.raw"), TMP_SUFFIX)   # (a live one)
        time.sleep(1.0)
        assert all(p.exists() for p in stale), "swept while the batch's slow.raw converted"
        Path(marks["slow"][1]).touch()
        results = client.gather(batch)
        assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
        assert _until(lambda: not any(p.exists() for p in stale), 10), \
            f"the stale temporary files stayed after the batch: {_temps(out)}"
        assert set(_temps(out)) == live - {n for n in live if n.startswith(".slow.raw.")} | \
            {os.path.basename(held)}, "a running conversion's temporary file was removed"
        Path(marks["other"][1]).touch()
        [result] = client.gather(running)
        assert isinstance(result, qcowfast.ConvertResult), result
        assert_same_bytes((out / "fast.raw").read_bytes(), other.read_bytes(), "fast.raw")
        assert_same_bytes((out / "slow.raw").read_bytes(), slow.read_bytes(), "slow.raw")
        assert _until(lambda: _temps(out) == [os.path.basename(held)], 10), _temps(out)
    finally:
        for _, release in marks.values():
            Path(release).touch()
        if held is not None:
            os.close(fd)


def test_released_futures_get_the_sweep_and_their_conversion_is_left_its_temp(client,
                                                                              tmp_path):
    """Futures dropped by the caller: the sweep runs once they are released (the batch has
    ended for the client) without keeping the tasks wanted, and leaves the temporary file of
    the released conversion still running on its worker; that conversion stops at its next
    unit and removes it."""
    out = tmp_path / "out"
    out.mkdir()
    src = _raw(tmp_path / "r-src.raw", 16 * MIB, 0x44)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    client.run(_gated_run_job, {src.name: (started, release, False)})
    try:
        futures = qdask.submit_many([{"src": src, "dst": out / "r.raw", "src_format": "raw"}],
                                    client)
        assert _until(lambda: os.path.exists(started))
        [live] = _temps(out)
        stale = _orphan(out, "r.raw")
        del futures
        gc.collect()
        assert _until(lambda: not stale.exists(), 10), "no sweep once the futures were released"
        assert _temps(out) == [live], "the released conversion's temporary file was removed"
        Path(release).touch()
        assert _until(lambda: _temps(out) == [], 10), "the released conversion ran on"
        time.sleep(0.5)
        assert not (out / "r.raw").exists()
    finally:
        Path(release).touch()


# -- convert_many's watch for able workers (these retire "a" and "b": last in the module) ----

def _recorded(client, monkeypatch, refuse_run: bool) -> list:
    """What the watch thread asks the scheduler, as ("info", workers detailed) and ("run",
    value) entries; `refuse_run`: run_on_scheduler fails as where the scheduler refuses it."""
    calls: list = []
    info, run = client.scheduler_info, client.run_on_scheduler

    def scheduler_info(*args, **kwargs):
        answer = info(*args, **kwargs)
        if threading.current_thread().name == WATCHER:
            calls.append(("info", len(answer.get("workers") or {})))
        return answer

    def run_on_scheduler(*args, **kwargs):
        if threading.current_thread().name != WATCHER:
            return run(*args, **kwargs)
        if refuse_run:
            calls.append(("run", None))
            raise ValueError("run_function refused")
        value = run(*args, **kwargs)
        calls.append(("run", value))
        return value
    monkeypatch.setattr(client, "scheduler_info", scheduler_info)
    monkeypatch.setattr(client, "run_on_scheduler", run_on_scheduler)
    return calls


@pytest.mark.parametrize("worker, refuse_run", [("a", False), ("b", True)])
def test_the_watch_does_not_fetch_every_workers_details_each_second(
        cluster, client, tmp_path, monkeypatch, worker, refuse_run):
    """With resources=, the watch fetched every worker's details from the scheduler once a
    WATCH_SECONDS (megabytes a second on a cluster of a thousand workers). It now asks for
    the totals alone and counts the able workers again only when those change, on the
    scheduler (an integer comes back) or, where the scheduler refuses, from the details; and
    once the only worker declaring the resource retires, the batch still ends."""
    monkeypatch.setattr(qdask, "NO_WORKER_SECONDS", 1.0)
    monkeypatch.setattr(qdask, "WATCH_SECONDS", 0.1)
    resource = f"disk-{worker}"
    out = tmp_path / "out"
    out.mkdir()
    src = _raw(tmp_path / "src.raw", 16 * MIB, 0x55)
    jobs = [{"src": src, "dst": out / f"{k}.raw", "src_format": "raw"} for k in range(3)]
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    client.run(_gated_run_job, {src.name: (started, release, True)})
    address = next(a for a, w in client.scheduler_info()["workers"].items()
                   if resource in w["resources"])
    calls = _recorded(client, monkeypatch, refuse_run)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("results", qdask.convert_many(
        jobs, client, resources={resource: 1})), daemon=True)
    try:
        t.start()
        assert _until(lambda: os.path.exists(started))
        time.sleep(1.0)
        before = list(calls)
        ticks = [n for kind, n in before if kind == "info"]
        assert len(ticks) >= 5, before
        if refuse_run:
            assert len([n for n in ticks if n]) == 1, before    # (the first count alone)
            assert [c for c in before if c[0] == "run"] == [("run", None)], before
        else:
            assert set(ticks) == {0}, f"worker details fetched by the watch: {before}"
            assert [c for c in before if c[0] == "run"] == [("run", 1)], before
        client.retire_workers([address], close_workers=True)
        t.join(BATCH_SECONDS)
        assert not t.is_alive(), "the batch did not end"
    finally:
        Path(release).touch()
        t.join(BATCH_SECONDS)
    results = box["results"]
    assert any(isinstance(r, CancelledError) and "no worker able to run it" in str(r)
               for r in results), results
    for job, r in zip(jobs, results):
        if not isinstance(r, CancelledError):
            assert isinstance(r, qcowfast.ConvertResult), results
            assert_same_bytes(job["dst"].read_bytes(), src.read_bytes(), str(job["dst"]))
    ticks = [n for kind, n in calls if kind == "info"]
    detailed = [n for n in ticks if n]
    assert len(detailed) <= (3 if refuse_run else 0), calls    # (on changes alone)
    if not refuse_run:
        runs = [v for kind, v in calls if kind == "run"]
        assert runs[0] == 1 and runs[-1] == 0 and len(runs) <= 3, calls
    # (the retired worker's conversion, in this process, notices its cancellation once let go)
    assert _until(lambda: _temps(out) == [], 10), _temps(out)
