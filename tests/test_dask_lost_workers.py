"""`qcowfast.dask` when workers are not where the client is, or die at the wrong moment.

Real `distributed.LocalCluster`s (loopback, 2 worker processes each); a worker is killed from
inside (os._exit in a patched FileOutput method) and its nanny starts a new one, as on a
cluster of preemptible machines. Every wait is bounded.
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes

from qcowfast import dask as qdask
from test_dask import client, two_workers  # noqa: F401 (client: one 2-worker cluster per module)
from test_dask_redteam import _temps

MIB = 1024 * 1024
BATCH_SECONDS = 120


def _image(path: Path, size: int, seed: int, *extra: str) -> Path:
    """A qcow2 image with `size` bytes of data (every other 64 KiB run a pattern of `seed`)."""
    raw = path.with_suffix(".src")
    block = bytes((seed + i) % 251 for i in range(65536))
    with open(raw, "wb") as f:
        for i in range(size // 65536):
            f.write(block if i % 2 == 0 else bytes(65536))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", *extra, str(raw),
                    str(path)], check=True)
    raw.unlink()
    return path


def _reference(src: Path, tmp: Path, *extra: str) -> bytes:
    out = tmp / f"ref-{src.name}.raw"
    subprocess.run(["qemu-img", "convert", "-q", *extra, "-O", "raw", str(src), str(out)],
                   check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def _bounded(call):
    """call() in a thread, failing the test if it has not returned in BATCH_SECONDS."""
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:      # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BATCH_SECONDS)
    assert not t.is_alive(), f"the batch did not end within {BATCH_SECONDS} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- relative paths ------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_callers_directory(client, tmp_path, monkeypatch):
    """A relative source, destination, backing_dirs or data_file was resolved in each worker's
    working directory, not the caller's: on a cluster whose workers started elsewhere the jobs
    failed, or read a decoy of the same name there and wrote where the caller never looks."""
    here, there = tmp_path / "here", tmp_path / "there"
    for d in (here / "img", here / "bases", here / "out", here / "dd", there / "img"):
        d.mkdir(parents=True)
    _image(here / "a.qcow2", 2 * MIB, 1)
    _image(there / "a.qcow2", 2 * MIB, 99)                     # the decoy
    _image(here / "bases" / "base.qcow2", 2 * MIB, 7)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../bases/base.qcow2",
                    "-F", "qcow2", str(here / "img" / "over.qcow2")], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x33 64k 64k",
                    str(here / "img" / "over.qcow2")], check=True, stdout=subprocess.DEVNULL)
    # (qemu-img creates the data file named relative to its working directory)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=c.data",
                    "c.qcow2", "1M"], check=True, cwd=here)
    subprocess.run(["qemu-io", "-c", "write -P 0x44 0 128k", "c.qcow2"], check=True,
                   cwd=here, stdout=subprocess.DEVNULL)
    os.rename(here / "c.data", here / "dd" / "c.data")
    jobs = [("a.qcow2", "out/a.raw"),
            {"src": "img/over.qcow2", "dst": "out/over.raw", "backing_dirs": ["bases"]},
            {"src": "c.qcow2", "dst": "out/c.raw", "data_file": "dd/c.data"}]
    monkeypatch.chdir(here)
    before = client.run(os.getcwd)
    client.run(os.chdir, str(there))
    try:
        results = _bounded(lambda: qdask.convert_many(jobs, client))
    finally:
        for address, cwd in before.items():
            client.run(os.chdir, cwd, workers=[address])
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    assert sorted(p.name for p in (here / "out").iterdir()) == ["a.raw", "c.raw", "over.raw"]
    assert not list((there / "img").iterdir()) and sorted(
        p.name for p in there.iterdir()) == ["a.qcow2", "img"]
    for job in jobs:
        src, dst = (job["src"], job["dst"]) if isinstance(job, dict) else job
        options = {k: v for k, v in job.items() if k not in ("src", "dst")} \
            if isinstance(job, dict) else {}
        local = here / "out" / (Path(dst).name + ".local")
        qcowfast.convert(src, local, **options)
        assert_same_bytes((here / dst).read_bytes(), local.read_bytes(), dst)
    assert_same_bytes((here / "out" / "a.raw").read_bytes(),
                      _reference(here / "a.qcow2", tmp_path), "a.raw against qemu-img")


def test_a_relative_name_stays_refused_as_convert_refuses_it(client, tmp_path, monkeypatch):
    """Resolving names must not change what convert refuses: "" names no file and "dir/" a
    directory (made absolute, "dir/" would lose its slash and become a file)."""
    _image(tmp_path / "a.qcow2", 64 * 1024, 3)
    monkeypatch.chdir(tmp_path)
    results = _bounded(lambda: qdask.convert_many([("a.qcow2", ""), ("a.qcow2", "out/")],
                                                  client))
    assert isinstance(results[0], qcowfast.OutputError) and "names no file" in str(results[0])
    assert isinstance(results[1], qcowfast.OutputError) and \
        "names a directory" in str(results[1]), results
    assert not (tmp_path / "out").exists()


# -- workers lost ---------------------------------------------------------------------------

def _die_after(method: str, target: str, flag: str, seconds: float = 0.0) -> bool:
    """In a worker: FileOutput.<method> for the output named `target` ends this worker
    process `seconds` after it returns, the first time only (whoever creates `flag`)."""
    import time
    from qcowfast import output
    original = getattr(output.FileOutput, method)

    def wrapped(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        if os.path.basename(self.name) == target:
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return value
            time.sleep(seconds)
            os._exit(1)
        return value
    setattr(output.FileOutput, method, wrapped)
    return True


@pytest.fixture
def cluster_client():
    """A 2-worker cluster of its own: the tests below kill workers."""
    with two_workers() as c:
        yield c


def _converted(result) -> bool:
    """A job's result that says its output is complete. The results a dead worker held are
    lost with it, so Dask runs those finished tasks again: they find their outputs."""
    return isinstance(result, qcowfast.ConvertResult) or result == qcowfast.Skipped(
        getattr(result, "dst", None), qdask.LOST_ATTEMPT)


def _batch(tmp_path: Path, n: int = 3):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    images = [_image(src / f"i{k}.qcow2", 4 * MIB, k, "-c") for k in range(n)]
    return images, out, [(str(i), str(out / (i.stem + ".raw"))) for i in images]


def test_output_published_by_a_lost_worker_is_not_reported_as_a_failure(cluster_client,
                                                                       tmp_path):
    """A worker killed after publishing its output, before its result reached the scheduler:
    Dask ran the task again, which found the output and failed ("exists") although the job
    had converted the image completely."""
    images, out, jobs = _batch(tmp_path)
    flag = str(tmp_path / "died")
    cluster_client.run(_die_after, "commit", "i1.raw", flag)
    results = _bounded(lambda: qdask.convert_many(jobs, cluster_client))
    assert os.path.exists(flag), "no worker died: the test did not test anything"
    assert results[1] == qcowfast.Skipped(jobs[1][1], qdask.LOST_ATTEMPT), results
    assert all(_converted(results[k]) for k in (0, 2)), results
    for image, (_, dst) in zip(images, jobs):
        assert_same_bytes(Path(dst).read_bytes(), _reference(image, tmp_path), dst)
    assert _temps(out) == []


def test_results_gathered_before_a_worker_is_lost_are_kept(cluster_client, tmp_path):
    """Results stayed on their workers until the batch's single gather at its end: a worker
    lost late in a batch took every result it held, and Dask ran all those finished jobs
    again (each reading its output in full to find it complete: Skipped LOST_ATTEMPT).
    Finished tasks are now gathered as the batch runs."""
    images, out, jobs = _batch(tmp_path, 4)
    flag = str(tmp_path / "died")
    cluster_client.run(_die_after, "prepare", "i3.raw", flag, 2.0)   # (4 GATHER_SECONDS)
    results = _bounded(lambda: qdask.convert_many(jobs, cluster_client))
    assert os.path.exists(flag), "no worker died: the test did not test anything"
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    for image, (_, dst) in zip(images, jobs):
        assert_same_bytes(Path(dst).read_bytes(), _reference(image, tmp_path), dst)
    assert _temps(out) == []


def test_a_file_put_at_the_destination_is_still_refused(tmp_path):
    """Only an output holding the source's bytes is taken for a lost attempt's: a file that
    appeared at the destination with other contents (or another size) is refused as convert
    refuses it, and kept."""
    from qcowfast import fleet
    src = _image(tmp_path / "s.qcow2", MIB, 5, "-c")
    want = _reference(src, tmp_path)
    job = fleet.Job(str(src), str(tmp_path / "s.raw"))
    for other in (want[:-512] + bytes(512) if want[-512:] != bytes(512) else b"x" + want[1:],
                  want + bytes(512), want[:-512]):
        Path(job.dst).write_bytes(other)
        result = qdask._task(job, 1, False, False, fresh=True)
        assert isinstance(result, qcowfast.OutputError) and "exists" in str(result), result
        assert Path(job.dst).read_bytes() == other
    Path(job.dst).write_bytes(want)
    assert qdask._task(job, 1, False, False, fresh=True) == \
        qcowfast.Skipped(job.dst, qdask.LOST_ATTEMPT)
    # Present when the batch was submitted: refused as ever, same bytes or not.
    assert isinstance(qdask._task(job, 1, False, False, fresh=False), qcowfast.OutputError)
    # A qcow2 output is compared by its guest bytes.
    q = fleet.Job(str(src), str(tmp_path / "s.out.qcow2"), {"format": "qcow2",
                                                            "compression": "zstd"})
    qcowfast.convert(q.src, q.dst, format="qcow2")
    assert qdask._task(q, 1, False, False, fresh=True) == qcowfast.Skipped(q.dst,
                                                                          qdask.LOST_ATTEMPT)
    qcowfast.convert(_image(tmp_path / "t.qcow2", MIB, 6),
                     q.dst, format="qcow2", overwrite=True)
    assert isinstance(qdask._task(q, 1, False, False, fresh=True), qcowfast.OutputError)


def test_a_lost_workers_temporary_file_is_removed_by_the_end_of_the_batch(cluster_client,
                                                                        tmp_path):
    """A worker killed mid-conversion left its temporary file: the attempt that ran the job
    again on the other worker used that worker's listing of the directory, made before the
    file existed, so the batch ended with the dead worker's temporary file beside the
    output."""
    images, out, jobs = _batch(tmp_path)
    flag = str(tmp_path / "died")
    cluster_client.run(_die_after, "prepare", "i2.raw", flag)
    results = _bounded(lambda: qdask.convert_many(jobs, cluster_client))
    assert os.path.exists(flag), "no worker died: the test did not test anything"
    assert isinstance(results[2], qcowfast.ConvertResult), results     # (never published)
    assert all(_converted(r) for r in results), results
    for image, (_, dst) in zip(images, jobs):
        assert_same_bytes(Path(dst).read_bytes(), _reference(image, tmp_path), dst)
    assert _temps(out) == []
