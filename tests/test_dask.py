"""Conversions on a real `distributed.LocalCluster` (2 worker processes, loopback only).

The cluster is started once for this file and torn down after it. Outputs must be
byte-identical to `qcowfast.convert` of the same job in this process (and so to qemu-img);
image errors come back as values in their slot, transient I/O errors are retried by Dask.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes, reference_raw

import distributed
from distributed.diagnostics.plugin import SchedulerPlugin
from qcowfast import dask as qdask
from qcowfast import fleet
from qcowfast.output import TMP_SUFFIX

IMAGES = ("c64k-v3-zlib", "c64k-v3-zstd", "c4k-chain3-short-base", "c512-v3-zlib")


@contextlib.contextmanager
def two_workers():
    """A Client of a new LocalCluster of 2 worker processes (one thread each, loopback, no
    dashboards), closed on leaving."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       worker_dashboard_address=None)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def client():
    with two_workers() as c:
        yield c


def test_outputs_match_local_convert_and_errors_are_values(client, images, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    jobs = [{"src": images.get(i).path, "dst": remote / f"{i}.raw"} for i in IMAGES]
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb\0\0\0\3" + b"\0" * 4088)   # QCOW2 v3, cluster_bits 0
    jobs.insert(1, {"src": corrupt, "dst": remote / "corrupt.raw"})
    jobs.append({"src": tmp_path / "missing.qcow2", "dst": remote / "missing.raw"})

    results = qdask.convert_many(jobs, client)

    assert len(results) == len(jobs)
    assert isinstance(results[1], qcowfast.QcowError)
    assert isinstance(results[-1], FileNotFoundError)
    for job, result in zip(jobs, results):
        if job["src"] in (corrupt, tmp_path / "missing.qcow2"):
            assert not Path(job["dst"]).exists()
            continue
        assert isinstance(result, qcowfast.ConvertResult), result
        mine = local / Path(job["dst"]).name
        qcowfast.convert(job["src"], mine)
        assert Path(job["dst"]).read_bytes() == mine.read_bytes()
        assert_same_bytes(mine.read_bytes(), reference_raw(job["src"]), str(job["src"]))
    assert not [p for p in remote.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_task_keys_are_named_for_the_dashboard(client, images, tmp_path):
    futures = qdask.submit_many([(images.get(IMAGES[0]).path, tmp_path / "a.raw")], client)
    assert futures[0].key.startswith(qdask.KEY_PREFIX)
    assert isinstance(futures[0].result(), qcowfast.ConvertResult)


def test_undeclared_resources_fail_fast(client, images, tmp_path):
    with pytest.raises(ValueError, match="gpu-disk"):
        qdask.convert_many([(images.get(IMAGES[0]).path, tmp_path / "a.raw")], client,
                           resources={"gpu-disk": 1})
    assert not (tmp_path / "a.raw").exists()


def _flaky_run_job(marker: str):
    """Install, in a worker, a run_job that fails with EIO once (per marker file), then works."""
    original = fleet.__dict__.setdefault("_unpatched_run_job", fleet.run_job)

    def flaky(job, **kw):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return original(job, **kw)
        os.close(fd)
        raise OSError(errno.EIO, "injected transient I/O error")

    fleet.run_job = flaky
    return True


def _restore_run_job():
    fleet.run_job = fleet.__dict__.pop("_unpatched_run_job", fleet.run_job)
    return True


def test_transient_errors_are_retried_image_errors_are_not(client, images, tmp_path):
    marker = str(tmp_path / "failed-once")
    client.run(_flaky_run_job, marker)
    try:
        src = images.get(IMAGES[0]).path
        results = qdask.convert_many([(src, tmp_path / "a.raw")], client, retries=1)
        assert os.path.exists(marker), "the injected failure did not happen"
        assert isinstance(results[0], qcowfast.ConvertResult), results[0]
        assert_same_bytes((tmp_path / "a.raw").read_bytes(), reference_raw(src), "retried job")
        os.unlink(marker)
        results = qdask.convert_many([(src, tmp_path / "b.raw")], client, retries=0)
        assert isinstance(results[0], OSError) and results[0].errno == errno.EIO
    finally:
        client.run(_restore_run_job)


def test_task_sorts_exceptions_by_kind(monkeypatch, tmp_path):
    def raiser(exc):
        def run_job(job, **kw):
            raise exc
        return run_job
    job = fleet.Job("a", "b")
    monkeypatch.setattr(fleet, "run_job", raiser(qcowfast.CorruptImage("bad L2")))
    assert isinstance(qdask._task(job, 1, False, False), qcowfast.CorruptImage)
    monkeypatch.setattr(fleet, "run_job", raiser(OSError(errno.ENOSPC, "full")))
    assert isinstance(qdask._task(job, 1, False, False), OSError)
    monkeypatch.setattr(fleet, "run_job", raiser(OSError(errno.ESTALE, "stale handle")))
    with pytest.raises(OSError):
        qdask._task(job, 1, False, False)


def test_default_threads_share_the_hosts_cores_among_all_its_workers(client, images, tmp_path):
    """Two worker processes of one slot each on this host: each conversion gets half the cores
    (a worker alone would count only its own slot and oversubscribe them)."""
    jobs = [(images.get(i).path, tmp_path / f"{i}.raw") for i in IMAGES]
    results = qdask.convert_many(jobs, client)
    cores = len(os.sched_getaffinity(0))
    assert {r.threads for r in results} == {max(1, cores // 2)}
    assert {r.threads for r in qdask.convert_many([(images.get(IMAGES[0]).path,
                                                    tmp_path / "t.raw")], client, threads=3)} \
        == {3}


class _GraphLog(SchedulerPlugin):
    """Records, in the scheduler, each graph that arrives: {key: priority} per update_graph."""
    name = "qcowfast-test-graph-log"

    def __init__(self):
        self.graphs = []

    def update_graph(self, scheduler, *, priority, **kwargs):
        self.graphs.append({str(k): p for k, p in priority.items()})


def _graphs_seen(dask_scheduler=None):
    return dask_scheduler.plugins[_GraphLog.name].graphs


def test_all_jobs_reach_the_scheduler_in_one_graph_largest_first(client, tmp_path):
    """Submitted one by one, the first jobs in the list would start before the scheduler knew
    the larger ones existed (task streams showed jobs 0 and 1 starting first). The largest
    jobs here come last in the list."""
    mib = 1024 * 1024
    jobs = []
    for i in range(6):
        src = tmp_path / f"src{i}.raw"
        with open(src, "wb") as f:
            f.truncate((i + 1) * mib)
            f.write(bytes([i + 1]) * 4096)
        jobs.append({"src": src, "dst": tmp_path / f"out{i}.raw", "src_format": "raw"})
    client.register_plugin(_GraphLog())
    try:
        results = qdask.convert_many(jobs, client)
        graphs = [g for g in client.run_on_scheduler(_graphs_seen)
                  if any(k.startswith(qdask.KEY_PREFIX) for k in g)]
    finally:
        client.unregister_scheduler_plugin(_GraphLog.name)
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    assert len(graphs) == 1, graphs
    by_priority = sorted(graphs[0], key=graphs[0].get)     # Dask runs the lowest tuple first
    assert [int(k.rsplit("-", 1)[1]) for k in by_priority] == [5, 4, 3, 2, 1, 0], graphs
    for job in jobs:
        assert Path(job["dst"]).read_bytes() == Path(job["src"]).read_bytes()


def test_costliest_job_has_the_first_priority(client, tmp_path):
    """The order is convert_many's: estimated cost (workload.py), not virtual size. A small
    image full of compressed data comes before a sparse image with a larger virtual size."""
    from common import qemu_img, qemu_io
    sparse, full, packed = (tmp_path / f"{n}.qcow2" for n in ("sparse", "full", "packed"))
    for path, size, data in ((sparse, "256M", "1M"), (full, "16M", "16M")):
        qemu_img("create", "-q", "-f", "qcow2", path, size)
        qemu_io(path, f"write -P 0x6b 0 {data}")
    qemu_img("convert", "-c", "-O", "qcow2", full, packed)
    client.register_plugin(_GraphLog())
    try:
        results = qdask.convert_many([(sparse, tmp_path / "s.raw"),
                                      (packed, tmp_path / "p.raw")], client)
        graphs = [g for g in client.run_on_scheduler(_graphs_seen)
                  if any(k.startswith(qdask.KEY_PREFIX) for k in g)]
    finally:
        client.unregister_scheduler_plugin(_GraphLog.name)
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    by_priority = sorted(graphs[0], key=graphs[0].get)
    assert [int(k.rsplit("-", 1)[1]) for k in by_priority] == [1, 0], graphs


def _count_listings(directory, dask_worker=None):
    """In a worker: count os.listdir calls on `directory` from now on."""
    real = getattr(os, "_qcowfast_test_listdir", os.listdir)
    os._qcowfast_test_listdir = real
    calls = dask_worker._qcowfast_test_listings = []

    def listdir(path="."):
        if os.path.realpath(path) == directory:
            calls.append(path)
        return real(path)
    os.listdir = listdir


def _listings_counted(dask_worker=None):
    """In a worker: stop counting; the number of listings seen."""
    os.listdir = os._qcowfast_test_listdir
    return len(dask_worker._qcowfast_test_listings)


def test_each_worker_lists_an_output_directory_once_per_batch(client, images, tmp_path):
    """Tasks of one batch into one directory: each worker process lists it once for the
    temporary files of killed runs (a listing per task was quadratic on big directories),
    and every task's stale temporary files still go, live ones stay."""
    src = images.get(IMAGES[0]).path
    out = tmp_path / "out"
    out.mkdir()
    jobs = [(src, out / f"{i}.raw") for i in range(16)]
    stale = [out / f".{i}.raw.l{i:012x}{TMP_SUFFIX}" for i in range(0, 16, 2)]
    for p in stale:
        p.write_bytes(b"left by a killed run")
    live = out / f".1.raw.l{99:012x}{TMP_SUFFIX}"
    live.write_bytes(b"")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)               # as a conversion elsewhere holds it
    client.run(_count_listings, os.path.realpath(out))
    try:
        results = qdask.convert_many(jobs, client)
    finally:
        counts = client.run(_listings_counted)
        os.close(fd)
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    assert all(n <= 1 for n in counts.values()), counts
    assert not [p.name for p in stale if p.exists()]
    assert live.exists()
    reference = reference_raw(src)
    for _, dst in jobs:
        assert_same_bytes(dst.read_bytes(), reference, str(dst))


def test_conflicting_jobs_are_refused_as_values(client, images, tmp_path):
    """The same rule as convert_many: a second writer of one output, and a job reading another
    job's output, get a ValueError in their slot; the others run."""
    a, b = images.get(IMAGES[0]).path, images.get(IMAGES[1]).path
    out = tmp_path / "out.raw"
    results = qdask.convert_many([(a, out), (b, out), (out, tmp_path / "next.raw"),
                                  (b, tmp_path / "b.raw")], client)
    assert isinstance(results[0], qcowfast.ConvertResult)
    assert isinstance(results[1], ValueError) and "destination of job 0" in str(results[1])
    assert isinstance(results[2], ValueError) and "destination of job 0" in str(results[2])
    assert isinstance(results[3], qcowfast.ConvertResult)
    assert_same_bytes(out.read_bytes(), reference_raw(a), "the first writer's output")
    assert not (tmp_path / "next.raw").exists()


def test_missing_extra_is_named():
    """Without `distributed`, importing qcowfast.dask names the extra to install."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['distributed'] = None\n"
            "try:\n    import qcowfast.dask\n"
            "except ImportError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "pip install 'qcowfast[dask]'" in proc.stdout, proc
