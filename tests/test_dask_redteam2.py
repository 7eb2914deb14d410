"""`qcowfast.dask` attacked again: jobs that end their worker, clusters that lose their last
worker, tasks cancelled by someone else, files the workers do not see, attempts that race.

Real `distributed.LocalCluster`s (loopback, worker processes); workers are patched through
client.run with module-level functions. Every wait is bounded.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes, qemu_img, qemu_io, reference_raw

import distributed
from qcowfast import dask as qdask
from qcowfast import fleet
from qcowfast.output import TMP_SUFFIX
from test_dask import client  # noqa: F401 (a fixture: one 2-worker cluster per module)
from test_dask_redteam import _hold, _restore_run_job, _slow_run_job, _temps, _until

MIB = 1024 * 1024
BATCH_SECONDS = 60


def _image(path: Path, size: int, pattern: int) -> Path:
    """A qcow2 image (qemu-img create) with `pattern` written over its first half (qemu-io)."""
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_io(path, f"write -P {pattern} 0 {size // 2}")
    return path




def _in_thread(call) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:      # noqa: BLE001 - looked at by the test
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _ended(t: threading.Thread, box: dict, seconds: float = BATCH_SECONDS):
    t.join(seconds)
    assert not t.is_alive(), f"the batch did not end within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- a conversion raising SystemExit / KeyboardInterrupt ------------------------------------

def _exiting_run_job(by_src: dict) -> bool:
    """In a worker: run_job raises SystemExit / KeyboardInterrupt for the sources named."""
    original = fleet.__dict__.setdefault("_unpatched_run_job", fleet.run_job)

    def run_job(job, **kw):
        kind = by_src.get(os.path.basename(job.src))
        if kind == "exit":
            raise SystemExit(3)
        if kind == "interrupt":
            raise KeyboardInterrupt
        return original(job, **kw)
    fleet.run_job = run_job
    return True


def test_a_conversion_raising_systemexit_is_its_jobs_error(client, tmp_path):
    """A SystemExit or KeyboardInterrupt raised inside a task ended its worker process
    (distributed's fail_hard): Dask ran the job again on the next worker, and the jobs the
    dead worker held or ran were lost with it (KilledWorker for innocent jobs after four
    such deaths). It is now that job's error, and no worker dies."""
    names = {"exits.qcow2": "exit", "interrupts.qcow2": "interrupt"}
    srcs = [_image(tmp_path / n, MIB, 0x11 + k)
            for k, n in enumerate(("exits.qcow2", "ok.qcow2", "interrupts.qcow2", "ok2.qcow2"))]
    jobs = [(s, tmp_path / (s.stem + ".raw")) for s in srcs]
    before = set(client.scheduler_info()["workers"])
    client.run(_exiting_run_job, names)
    try:
        t, box = _in_thread(lambda: qdask.convert_many(jobs, client))
        results = _ended(t, box)
    finally:
        client.run(_restore_run_job)
    assert isinstance(results[0], RuntimeError) and "SystemExit: 3" in str(results[0]), results
    assert isinstance(results[2], RuntimeError) and "KeyboardInterrupt" in str(results[2])
    for k in (1, 3):
        assert isinstance(results[k], qcowfast.ConvertResult), results
        assert_same_bytes(Path(jobs[k][1]).read_bytes(), reference_raw(srcs[k]), str(srcs[k]))
    assert not Path(jobs[0][1]).exists() and not Path(jobs[2][1]).exists()
    assert set(client.scheduler_info()["workers"]) == before, "a worker died"
    assert _temps(tmp_path) == []


# -- the cluster loses its last worker -------------------------------------------------------

def _slow_jobs(tmp_path: Path, n: int) -> tuple[list, Path]:
    src = _image(tmp_path / "src.qcow2", 48 * MIB, 0x5a)
    out = tmp_path / "out"
    out.mkdir()
    return [(src, out / f"{i}.raw") for i in range(n)], out


def test_a_cluster_left_without_workers_ends_the_batch(tmp_path, monkeypatch):
    """The last worker retired mid-batch (cluster.scale(0), as a preemptible pool emptied):
    convert_many waited forever for workers. It now gives the jobs not done a CancelledError
    once the cluster has had no worker for NO_WORKER_SECONDS, keeps the others' results, and
    leaves no temporary file."""
    monkeypatch.setattr(qdask, "NO_WORKER_SECONDS", 1.0, raising=False)
    monkeypatch.setattr(qdask, "WATCH_SECONDS", 0.2, raising=False)
    jobs, out = _slow_jobs(tmp_path, 3)
    want = reference_raw(jobs[0][0])
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                       worker_dashboard_address=None)
    c = distributed.Client(cluster)
    try:
        marker = tmp_path / "started"
        c.run(_slow_run_job, str(marker), 0.3)
        t, box = _in_thread(lambda: qdask.convert_many(jobs, c))
        assert _until(marker.exists)
        cluster.scale(0)
        results = _ended(t, box, 30)
    finally:
        c.close()
        cluster.close()
    assert len(results) == 3
    left = [r for r in results if isinstance(r, CancelledError)]
    assert left and all("no worker able to run it" in str(r) for r in left), results
    for (_, dst), r in zip(jobs, results):
        if isinstance(r, CancelledError):
            assert not dst.exists() or dst.read_bytes() == want
            continue
        assert isinstance(r, qcowfast.ConvertResult) or \
            r == qcowfast.Skipped(str(dst), qdask.LOST_ATTEMPT), results
        assert_same_bytes(dst.read_bytes(), want, str(dst))
    assert _temps(out) == []


# -- a task cancelled by someone else --------------------------------------------------------

def test_a_task_cancelled_elsewhere_is_its_jobs_result(client, tmp_path):
    """One of the batch's tasks cancelled by another hand (a second client, the dashboard):
    distributed.wait raised FuturesCancelledError, so convert_many cancelled every other job
    of the batch and raised. That job's result is now the cancellation; the others convert."""
    jobs, out = _slow_jobs(tmp_path, 4)
    marker = tmp_path / "started"
    client.run(_slow_run_job, str(marker), 0.2)

    def cancel_last():
        assert _until(marker.exists)
        key = next(k for k in client.futures
                   if str(k).startswith(qdask.KEY_PREFIX) and str(k).endswith("-3"))
        other = distributed.Client(client.scheduler.address)
        try:
            other.cancel([distributed.Future(key, other)], force=True)
        finally:
            other.close()
    try:
        poke, poked = _in_thread(cancel_last)
        t, box = _in_thread(lambda: qdask.convert_many(jobs, client))
        results = _ended(t, box)
        _ended(poke, poked)
    finally:
        client.run(_restore_run_job)
    assert isinstance(results[3], CancelledError), results
    want = reference_raw(jobs[0][0])
    for (_, dst), r in zip(jobs[:3], results):
        assert isinstance(r, qcowfast.ConvertResult), results
        assert_same_bytes(dst.read_bytes(), want, str(dst))
    assert not jobs[3][1].exists()
    assert _temps(out) == []


# -- files the client sees and the worker does not -------------------------------------------

def test_a_file_only_the_client_sees_is_named_with_the_worker(client, tmp_path):
    """A source, or an output directory, on the client's disk only failed on the worker with
    "No such file or directory", naming neither the worker nor the cause. (Removed between
    submission and the tasks' start here, as a worker without the client's disk sees it.)"""
    src = _image(tmp_path / "a.qcow2", MIB, 0x21)
    gone, outdir = tmp_path / "client-only.qcow2", tmp_path / "client-only-dir"
    _image(gone, MIB, 0x22)
    outdir.mkdir()
    jobs = [(gone, tmp_path / "gone.raw"), (src, outdir / "a.raw"),
            (tmp_path / "nowhere.qcow2", tmp_path / "nowhere.raw")]
    release = str(tmp_path / "release")
    holds = [client.submit(_hold, str(tmp_path / f"started{i}"), release, pure=False)
             for i in range(2)]
    try:
        assert _until(lambda: all((tmp_path / f"started{i}").exists() for i in range(2)))
        futures = qdask.submit_many(jobs, client)
        gone.unlink()
        outdir.rmdir()
    finally:
        Path(release).touch()
        distributed.wait(holds, timeout=30)
    distributed.wait(futures, timeout=30)
    results = [f.result() for f in futures]
    assert isinstance(results[0], FileNotFoundError), results
    assert isinstance(results[1], qcowfast.OutputError), results
    for r, name in zip(results, (gone, outdir)):
        text = str(r)
        assert f"{name} existed on the client when the batch was submitted" in text, text
        assert "not on Dask worker tcp://127.0.0.1:" in text and "every worker sees" in text
    # A file that exists nowhere keeps convert's own message.
    assert isinstance(results[2], FileNotFoundError), results
    with pytest.raises(FileNotFoundError) as local:
        qcowfast.convert(jobs[2][0], jobs[2][1])
    assert str(results[2]) == str(local.value)


# -- two attempts of one job at once ---------------------------------------------------------

def test_an_output_published_by_a_concurrent_attempt_is_not_a_failure(tmp_path, monkeypatch):
    """A worker the scheduler took for lost may run on: its attempt and the one Dask started
    again convert at once, and the second to publish found the first's output and failed
    ("appeared during the conversion") although the job's output was complete. That output,
    holding the source's guest bytes, now makes the job Skipped(LOST_ATTEMPT); a file with
    other contents is still refused."""
    from qcowfast import output
    src = _image(tmp_path / "s.qcow2", 2 * MIB, 0x31)
    other = _image(tmp_path / "t.qcow2", 2 * MIB, 0x32)
    job = fleet.Job(str(src), str(tmp_path / "s.raw"))
    original = output.FileOutput.commit
    appearing = {"from": src}

    def commit(self, *args, **kwargs):
        # (the other attempt publishes first: qemu-img writes what it would)
        qemu_img("convert", "-O", "raw", appearing["from"], job.dst)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(output.FileOutput, "commit", commit)
    assert qdask._task(job, 1, False, False, fresh=True) == \
        qcowfast.Skipped(job.dst, qdask.LOST_ATTEMPT)
    assert_same_bytes(Path(job.dst).read_bytes(), reference_raw(src), job.dst)
    assert _temps(tmp_path) == []
    os.unlink(job.dst)
    appearing["from"] = other
    result = qdask._task(job, 1, False, False, fresh=True)
    assert isinstance(result, qcowfast.OutputError) and "appeared" in str(result), result
    assert_same_bytes(Path(job.dst).read_bytes(), reference_raw(other), job.dst)
    assert _temps(tmp_path) == []


def test_a_cluster_left_without_the_resources_ends_the_batch(tmp_path, monkeypatch):
    """resources={"disk": 1} and the one worker declaring it retired mid-batch: the tasks
    waited forever for it while the other worker idled (the check as the batch starts had
    passed). They now end as on a cluster without workers."""
    from distributed import Nanny, Scheduler, SpecCluster
    monkeypatch.setattr(qdask, "NO_WORKER_SECONDS", 1.0, raising=False)
    monkeypatch.setattr(qdask, "WATCH_SECONDS", 0.2, raising=False)
    jobs, out = _slow_jobs(tmp_path, 3)
    workers = {name: {"cls": Nanny, "options": {"nthreads": 1, "resources": held,
                                                "host": "127.0.0.1"}}
               for name, held in (("disk", {"disk": 1}), ("plain", {}))}
    cluster = SpecCluster(scheduler={"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}, workers=workers)
    c = distributed.Client(cluster)
    try:
        c.wait_for_workers(2, timeout=30)
        disk = next(a for a, w in c.scheduler_info()["workers"].items() if w["resources"])
        marker = tmp_path / "started"
        c.run(_slow_run_job, str(marker), 0.3)
        t, box = _in_thread(lambda: qdask.convert_many(jobs, c, resources={"disk": 1}))
        assert _until(marker.exists)
        c.retire_workers([disk], close_workers=True)
        results = _ended(t, box, 30)
        assert len(c.scheduler_info()["workers"]) == 1
    finally:
        c.close()
        cluster.close()
    left = [r for r in results if isinstance(r, CancelledError)]
    assert left and all("no worker able to run it" in str(r) for r in left), results
    want = reference_raw(jobs[0][0])
    for (_, dst), r in zip(jobs, results):
        if not isinstance(r, CancelledError):
            assert_same_bytes(dst.read_bytes(), want, str(dst))
        else:
            assert not dst.exists() or dst.read_bytes() == want
    assert _temps(out) == []


# -- an asynchronous client ------------------------------------------------------------------

def test_submit_many_takes_an_asynchronous_client(tmp_path):
    """An asynchronous client's scheduler_info() holds the totals alone (it cannot ask from
    inside its event loop): submit_many read its empty "workers" and refused the cluster as
    one without workers."""
    import asyncio
    src = _image(tmp_path / "a.qcow2", MIB, 0x41)

    async def main():
        async with distributed.LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", asynchronous=True) as cluster:
            async with distributed.Client(cluster, asynchronous=True) as c:
                futures = qdask.submit_many([(src, tmp_path / "a.raw")], c)
                return await asyncio.wait_for(c.gather(futures), BATCH_SECONDS)
    results = asyncio.run(main())
    assert isinstance(results[0], qcowfast.ConvertResult), results
    assert_same_bytes((tmp_path / "a.raw").read_bytes(), reference_raw(src), "a.raw")


def test_a_publication_reported_failed_after_the_link_is_not_a_failure(tmp_path, monkeypatch):
    """FileOutput._publish links the temporary file to the destination, then unlinks the
    temporary name: an I/O error there (a flaky NFS server) came back as "cannot publish"
    although the complete output was published, and `skip_existing` or a rerun then took
    it for a finished job anyway. The publication now stands (the unlink is tried again)."""
    src = _image(tmp_path / "s.qcow2", 2 * MIB, 0x51)
    job = fleet.Job(str(src), str(tmp_path / "s.raw"))
    real_unlink, failed = os.unlink, []

    def unlink(path, *args, **kwargs):
        if os.fsdecode(path).endswith(TMP_SUFFIX) and not failed:
            failed.append(path)
            raise OSError(5, "Input/output error")
        return real_unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", unlink)
    result = qdask._task(job, 1, False, False, fresh=True)
    monkeypatch.undo()
    assert failed, "the publication did not fail: the test tested nothing"
    assert isinstance(result, qcowfast.ConvertResult), result
    assert_same_bytes(Path(job.dst).read_bytes(), reference_raw(src), job.dst)
    assert _temps(tmp_path) == []


def test_resources_declared_beyond_the_first_five_workers(tmp_path, monkeypatch):
    """Some distributed releases list only five workers in scheduler_info() by default: the
    resources check (and the slots per host) missed the others, so a batch whose resources
    only a sixth worker declares was refused ("none declares them"), and the watch for able
    workers would have cancelled it."""
    from distributed import Scheduler, SpecCluster, Worker
    workers = {f"w{k}": {"cls": Worker, "options": {"nthreads": 1, "host": "127.0.0.1"}}
               for k in range(7)}
    cluster = SpecCluster(scheduler={"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}, workers=workers)
    c = distributed.Client(cluster)
    real = distributed.Client.scheduler_info

    def five_by_default(self, n_workers=5, **kwargs):
        return real(self, n_workers=n_workers, **kwargs)
    try:
        c.wait_for_workers(7, timeout=30)
        listed = set(real(c, n_workers=5)["workers"])
        address = next(a for a in real(c)["workers"] if a not in listed)
        worker = next(w for w in cluster.workers.values() if w.address == address)
        c.sync(worker.set_resources, disk=1)
        assert _until(lambda: real(c)["workers"][address].get("resources") == {"disk": 1})
        monkeypatch.setattr(distributed.Client, "scheduler_info", five_by_default)
        src = _image(tmp_path / "s.qcow2", 1 << 20, 0x3c)
        [result] = qdask.convert_many([(src, tmp_path / "s.raw")], c, resources={"disk": 1})
        assert isinstance(result, qcowfast.ConvertResult), result
        assert_same_bytes((tmp_path / "s.raw").read_bytes(), reference_raw(src), "s.raw")
    finally:
        monkeypatch.undo()
        c.close()
        cluster.close()
