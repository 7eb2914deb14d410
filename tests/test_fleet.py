"""Batch conversion in one process: `convert_many` and `qcowfast convert-many`.

Every good job's output is compared with ``qemu-img convert -O raw`` of its source; bad jobs (a
corrupt image, a missing one, an unwritable destination) must come back as that job's exception,
in job order, with no output and no temporary file left behind, while the other jobs finish.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import qcowfast
from common import CONVERSION_PATHS, assert_same_bytes, qemu_img, qemu_io, reference_raw, run_cli
from qcowfast.fleet import Skipped, convert_many, sweep_stale_temps
from qcowfast.output import LOCKED_AT_BIRTH

GOOD = ("c64k-v3-zlib", "c4k-chain3-short-base", "c64k-v3-zstd", "c512-v3-zlib")
TMP_SUFFIX = ".qcowfast-tmp"


def _corrupt_copy(images, tmp_path: Path) -> Path:
    """A copy of a zlib image whose first compressed descriptor points past the end of file."""
    src = images.get("c64k-v3-zlib").path
    bad = tmp_path / "corrupt.qcow2"
    shutil.copyfile(src, bad)
    with qcowfast.open(bad) as img:
        ext = next(e for e in img.extents() if e.kind == qcowfast.ExtentKind.COMPRESSED)
        l1_index = ext.guest_offset // img._l2_per_l1
        l2_offset = int(img._l2_offsets[l1_index])
        l2_index = (ext.guest_offset % img._l2_per_l1) // img.cluster_size
    with open(bad, "r+b") as f:
        f.seek(l2_offset + 8 * l2_index)
        entry, = struct.unpack(">Q", f.read(8))
        f.seek(l2_offset + 8 * l2_index)
        # Keep the compressed flag and sector count, move the stream far past the end.
        f.write(struct.pack(">Q", (entry & ~((1 << 54) - 1)) | (1 << 50)))
    return bad


def _batch(images, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"x")
    jobs = [(images.get(GOOD[0]).path, out / "a.raw"),
            (_corrupt_copy(images, tmp_path), out / "corrupt.raw"),
            (tmp_path / "missing.qcow2", out / "missing.raw"),
            (images.get(GOOD[1]).path, blocker / "b.raw"),           # unwritable destination
            (images.get(GOOD[2]).path, out / "c.raw"),
            {"src": images.get(GOOD[3]).path, "dst": out / "d.raw", "sparse_size": 0}]
    return out, jobs


def _no_litter(*dirs: Path) -> None:
    for d in dirs:
        left = [p.name for p in d.iterdir() if p.name.endswith(TMP_SUFFIX)]
        assert not left, f"temporary files left in {d}: {left}"


def test_mixed_batch_results_in_job_order(images, tmp_path):
    out, jobs = _batch(images, tmp_path)
    progress = []
    results = convert_many(jobs, workers=2, threads=2,
                           progress=lambda done, total: progress.append((done, total)))
    assert len(results) == len(jobs)
    ok = {0: GOOD[0], 4: GOOD[2], 5: GOOD[3]}
    for i, image_id in ok.items():
        assert isinstance(results[i], qcowfast.ConvertResult), (i, results[i])
        dst = jobs[i]["dst"] if isinstance(jobs[i], dict) else jobs[i][1]
        assert_same_bytes(Path(dst).read_bytes(), reference_raw(images.get(image_id).path),
                          f"job {i} ({image_id})")
    assert isinstance(results[1], qcowfast.QcowError)
    assert isinstance(results[2], FileNotFoundError) and "missing.qcow2" in str(results[2])
    assert isinstance(results[3], (qcowfast.OutputError, OSError))
    assert not (out / "corrupt.raw").exists() and not (out / "missing.raw").exists()
    _no_litter(out, tmp_path)
    # One stream for the whole batch: never decreasing, ending at the sum of the good sizes.
    dones = [d for d, _ in progress]
    assert dones == sorted(dones)
    total = progress[-1][1]
    assert dones[-1] == total >= sum(results[i].virtual_size for i in ok)


def test_default_threads_divide_the_cores_among_the_jobs_side_by_side(images, tmp_path):
    cores = len(os.sched_getaffinity(0))
    jobs = [(images.get(GOOD[k]).path, tmp_path / f"{k}.raw") for k in range(3)]
    side_by_side = convert_many(jobs, workers=2)
    # The jobs that start while another waits get half the cores; once none waits, a job alone
    # may take the cores its idle neighbour leaves (test_last_job_takes_the_idle_cores).
    assert min(r.threads for r in side_by_side) == max(1, cores // 2)
    assert max(r.threads for r in side_by_side) <= cores
    alone = convert_many(jobs[:1], workers=2, overwrite=True)      # one job: every core
    assert alone[0].threads == cores
    assert {r.threads for r in convert_many(jobs, workers=2, threads=3, overwrite=True)} == {3}


def _big_image(tmp_path: Path, compress: bool) -> Path:
    """A 24 MiB image of compressible data (64 KiB clusters), zlib-compressed or not."""
    raw = tmp_path / "big-src.raw"
    with open(raw, "wb") as f:
        for k in range(24 * 16):
            f.write((b"cluster %06d " % k) * 4096 + bytes(65536 - 14 * 4096))
    img = tmp_path / ("big-zlib.qcow2" if compress else "big.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []), raw, img)
    raw.unlink()
    return img


@pytest.mark.parametrize("source, options", CONVERSION_PATHS)
def test_last_job_takes_the_idle_cores(tmp_path, source, options):
    """A batch's last job grows to the cores the other slots leave idle: a large image
    converted last no longer runs on its share of the cores alone (convert_many was slower
    than a loop of convert calls on such a batch). Outputs are unchanged."""
    cores = len(os.sched_getaffinity(0))
    src = _big_image(tmp_path, source == "zlib")
    want = reference_raw(src)

    def run(out: Path, **batch):
        if options.get("existing"):
            out.write_bytes(b"")
            os.truncate(out, len(want))
        # The missing image fails at once (unreadable jobs start first): the big one is then
        # alone for all but its first units (small units make many of them).
        return convert_many([(tmp_path / "missing.qcow2", tmp_path / "missing.raw"),
                             {"src": src, "dst": out, "unit_size": 65536, **options}],
                            workers=2, **batch)

    def check(out: Path):
        if options.get("format") == "qcow2":
            qemu_img("check", out)
            assert reference_raw(out) == want
        else:
            assert_same_bytes(out.read_bytes(), want, str(out))
        out.unlink()

    out = tmp_path / "out.img"
    failed, converted = run(out)
    assert isinstance(failed, OSError)
    assert converted.threads == cores
    check(out)
    # Threads the caller sets are kept, for the batch or for the job.
    _, converted = run(out, threads=1)
    assert converted.threads == 1
    check(out)
    options = {**options, "threads": 1}
    _, converted = run(out)
    assert converted.threads == 1
    check(out)


@pytest.mark.parametrize("options", [{}, {"existing": True},
                                     {"format": "qcow2", "compression": "zlib"}])
def test_a_thread_the_system_refuses_leaves_the_job_on_those_it_has(tmp_path, monkeypatch,
                                                                    options):
    """A job growing into idle cores whose next thread cannot start (a memory limit: "can't
    start new thread") goes on with the threads it has; it failed, and an in-place target was
    left half-written (found by a red-team helper). A single convert does the same."""
    src = _big_image(tmp_path, True)
    want = reference_raw(src)
    start = threading.Thread.start

    def refuse_second(thread):
        if thread.name == "qcowfast_2":                 # a conversion's second worker
            raise RuntimeError("can't start new thread")
        return start(thread)
    monkeypatch.setattr(threading.Thread, "start", refuse_second)
    out = tmp_path / "out.img"

    def check(result):
        assert not isinstance(result, BaseException), repr(result)
        assert result.threads == 1
        if options.get("format") == "qcow2":
            qemu_img("check", out)
            assert reference_raw(out) == want
        else:
            assert_same_bytes(out.read_bytes(), want, str(out))

    if options.get("existing"):
        out.write_bytes(b"\xa5" * len(want))
    _, result = convert_many([(tmp_path / "missing.qcow2", tmp_path / "m.raw"),
                              {"src": src, "dst": out, "unit_size": 65536, **options}],
                             workers=2)
    check(result)
    if options.get("existing"):
        out.write_bytes(b"\xa5" * len(want))
    check(qcowfast.convert(src, out, threads=2, unit_size=65536, overwrite=True, **options))


def test_standard_output_is_one_destination_by_either_name(images, tmp_path):
    """"-" and /dev/stdout both stream to standard output: the later job is refused as a
    second writer of one destination. Both ran, and the stream held the two images
    interleaved (found by a red-team helper)."""
    a, b = images.get(GOOD[0]).path, images.get(GOOD[2]).path
    code = ("import sys, qcowfast\n"
            f"r = qcowfast.convert_many([({str(a)!r}, '-'), ({str(b)!r}, '/dev/stdout')])\n"
            "print(type(r[0]).__name__, type(r[1]).__name__, r[1], file=sys.stderr)\n")
    out = tmp_path / "stream.raw"
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("ConvertResult ValueError "), proc.stderr
    assert "also the destination of job 0" in proc.stderr
    assert_same_bytes(out.read_bytes(), reference_raw(a), str(out))


def test_a_job_without_threads_takes_the_batchs(images, tmp_path):
    """A job whose threads option is None (JSON null in a jobs file) runs on the batch's
    threads; it took every core."""
    src = images.get(GOOD[0]).path
    result, = convert_many([{"src": src, "dst": tmp_path / "a.raw", "threads": None}],
                           threads=1)
    assert result.threads == 1


def test_stop_on_error_cancels_the_rest(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobs = [(tmp_path / "missing.qcow2", out / "x.raw")] + [
        (images.get(i).path, out / f"{i}.raw") for i in GOOD[:2]]
    results = convert_many(jobs, workers=1, on_error="stop")
    assert isinstance(results[0], FileNotFoundError)
    # One slot, largest first: the missing image (size 0) runs last, so the others finished;
    # with the missing image first in size order nothing after it may start.
    assert all(isinstance(r, (qcowfast.ConvertResult, CancelledError)) for r in results[1:])
    for (src, dst), r in zip(jobs[1:], results[1:]):
        assert Path(dst).exists() == isinstance(r, qcowfast.ConvertResult)


def test_on_error_stop_starts_nothing_after_a_failure(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bad = _corrupt_copy(images, tmp_path)      # the largest job: it runs first with one slot
    small = images.get("c64k-v3-tiny").path
    results = convert_many([(small, out / "s.raw"), (bad, out / "bad.raw")], workers=1,
                           on_error="stop")
    assert isinstance(results[1], qcowfast.QcowError)
    assert isinstance(results[0], CancelledError)
    assert not any(out.iterdir())


def test_skip_existing_resumes_and_sweeps_stale_temporaries(images, tmp_path):
    src = images.get(GOOD[0]).path
    done = tmp_path / "done.raw"
    done.write_bytes(b"finished earlier")
    todo = tmp_path / "todo.raw"
    stale = tmp_path / f".todo.raw.0123456789ab{TMP_SUFFIX}"
    stale.write_bytes(b"left by a killed run")
    live = tmp_path / f".done.raw.99887766aabb{TMP_SUFFIX}"
    live.write_bytes(b"a conversion still writing")
    old = os.stat(stale).st_mtime - 60         # killed a minute ago
    for p in (stale, live):
        os.utime(p, (old, old))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)            # held as a running conversion holds it
    try:
        results = convert_many([(src, done), (src, todo)], skip_existing=True)
        assert results[0] == Skipped(str(done), "destination exists")
        assert isinstance(results[1], qcowfast.ConvertResult)
        assert done.read_bytes() == b"finished earlier"
        assert_same_bytes(todo.read_bytes(), reference_raw(src), "resumed job")
        assert not stale.exists()
        assert live.exists()
    finally:
        os.close(fd)
    assert sweep_stale_temps(str(done)) == [str(live)]
    just_created = tmp_path / f".done.raw.000000000fff{TMP_SUFFIX}"   # created, not yet locked
    just_created.write_bytes(b"")
    assert sweep_stale_temps(str(done)) == [] and just_created.exists()


def _listings_of(directory: Path, monkeypatch) -> list:
    """Counts os.listdir calls on `directory` (one entry per call) from now on."""
    calls = []
    real = os.listdir

    def listdir(path="."):
        if os.path.realpath(path) == os.path.realpath(directory):
            calls.append(path)
        return real(path)
    monkeypatch.setattr(os, "listdir", listdir)
    return calls


def test_batch_lists_each_output_directory_once(images, tmp_path, monkeypatch):
    """N jobs into one directory used to list it twice per job (the sweep for temporaries of
    killed runs): quadratic in the batch. The batch sweeps all its destinations in one
    listing, and still removes every stale temporary file and no live one."""
    src = images.get("c64k-v3-tiny").path
    out = tmp_path / "out"
    out.mkdir()
    jobs = [(src, out / f"{i}.raw") for i in range(30)]
    old = time.time() - 60
    stale = []
    for i in range(0, 30, 3):
        p = out / f".{i}.raw.abcdef123{i:03d}{TMP_SUFFIX}"
        p.write_bytes(b"left by a killed run")
        os.utime(p, (old, old))
        stale.append(p)
    live = out / f".1.raw.{LOCKED_AT_BIRTH}0123456789ab{TMP_SUFFIX}"     # another process's, writing
    live.write_bytes(b"")
    other = out / f".x.raw.0123456789ab{TMP_SUFFIX}"                      # no job's destination
    other.write_bytes(b"")
    os.utime(other, (old, old))
    listings = _listings_of(out, monkeypatch)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        results = convert_many(jobs, workers=2)
    finally:
        os.close(fd)
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    assert len(listings) == 1, listings
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    reference = reference_raw(src)
    for _, dst in jobs:
        assert_same_bytes(dst.read_bytes(), reference, str(dst))


def test_run_job_lists_the_directory_once_and_convert_still_sweeps(images, tmp_path,
                                                                  monkeypatch):
    """A Dask task runs one job: one listing (convert used to list again). The skip applies
    to that job's conversion only: a later convert in the same thread sweeps as before."""
    from qcowfast.fleet import Job, run_job
    src = images.get("c64k-v3-tiny").path
    listings = _listings_of(tmp_path, monkeypatch)
    assert isinstance(run_job(Job(str(src), str(tmp_path / "a.raw"))), qcowfast.ConvertResult)
    assert len(listings) == 1, listings
    stale = tmp_path / f".b.raw.{LOCKED_AT_BIRTH}dead0000beef{TMP_SUFFIX}"
    stale.write_bytes(b"left by a killed run")
    qcowfast.convert(src, tmp_path / "b.raw")
    assert not stale.exists()
    assert len(listings) == 2, listings


def test_sweep_removes_only_names_qcowfast_gives(images, tmp_path, monkeypatch):
    """Beside a destination, only ".NAME." + 12 hex digits (after "l" when locked at birth) +
    ".qcowfast-tmp" in a regular file is a temporary output. Other files that look alike are
    someone's: a finished image a user named so, a FIFO. Destinations that name no file ("",
    "dir/") sweep nothing, in the directory the name would otherwise resolve to."""
    src = images.get("c64k-v3-tiny").path
    old = time.time() - 60
    keep, gone = [], []
    for name in ("a.latest", "a.raw", "a.raw.lz", "a.raw.ABCDEF012345", "a.raw.0123456789a",
                 "a.raw.0123456789abc", "a.raw.l0123456789a", "a.raw.g123456789ab",
                 "a.raw.l", "b.raw.0123456789ab"):
        keep.append(tmp_path / f".{name}{TMP_SUFFIX}")
    for name in ("a.raw.0123456789ab", f"a.raw.{LOCKED_AT_BIRTH}0123456789ab"):
        gone.append(tmp_path / f".{name}{TMP_SUFFIX}")
    for p in keep + gone:
        p.write_bytes(b"a user's file" if p in keep else b"left by a killed run")
        os.utime(p, (old, old))
    fifo = tmp_path / f".a.raw.{LOCKED_AT_BIRTH}aaaaaaaaaaaa{TMP_SUFFIX}"
    os.mkfifo(fifo)
    assert isinstance(convert_many([(src, tmp_path / "a.raw")])[0], qcowfast.ConvertResult)
    assert [p.name for p in keep if not p.exists()] == []
    assert [p.name for p in gone if p.exists()] == []
    assert fifo.exists()
    for p in gone:                                   # and a single convert the same way
        p.write_bytes(b"left by a killed run")
        os.utime(p, (old, old))
    qcowfast.convert(src, tmp_path / "a.raw", overwrite=True)
    assert [p.name for p in keep if not p.exists()] == []
    assert [p.name for p in gone if p.exists()] == []
    work = tmp_path / "w"
    (work / "sub").mkdir(parents=True)
    bystanders = [tmp_path / f".w.{LOCKED_AT_BIRTH}0123456789ab{TMP_SUFFIX}",
                  work / f".sub.{LOCKED_AT_BIRTH}0123456789ab{TMP_SUFFIX}"]
    for p in bystanders:
        p.write_bytes(b"")
    monkeypatch.chdir(work)
    results = convert_many([(src, ""), (src, "sub/")])
    assert all(isinstance(r, (ValueError, qcowfast.QcowError)) for r in results), results
    assert all(p.exists() for p in bystanders)


def test_signal_while_job_slots_start_stops_the_batch(images, tmp_path, monkeypatch):
    """Jobs start while the batch's other slots are still starting: a signal (or Ctrl-C)
    then stops the running jobs and removes their temporary files, as it does later in the
    batch (it used to escape before the batch's handler, leaving them running)."""
    import qcowfast.fleet as fleet_mod
    src = images.get(GOOD[0]).path
    out = tmp_path / "out"
    out.mkdir()
    started: list = []
    real = fleet_mod._start_threads

    def interrupted(n, target, slots):
        real(2, target, slots)
        started.extend(slots)
        raise KeyboardInterrupt         # as a signal handler raises it between two starts

    monkeypatch.setattr(fleet_mod, "_start_threads", interrupted)
    jobs = [(src, out / f"{i}.raw") for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        # The running jobs are held at their first progress report until the batch has seen
        # the interrupt: each one's next report must then stop it.
        convert_many(jobs, workers=4, progress=lambda done, total: time.sleep(1.0))
    assert len(started) == 2
    for t in started:
        t.join(30)
    assert not any(t.is_alive() for t in started)
    assert sorted(os.listdir(out)) == []          # no output published, no temporary file


def test_slots_the_system_refuses_to_start(images, tmp_path, monkeypatch):
    """A memory limit can refuse a job slot's thread ("can't start new thread"): the batch runs
    on the slots that started, or in the calling thread when none did; every job converts."""
    import qcowfast.fleet as fleet_mod
    src = images.get(GOOD[0]).path
    real_start = threading.Thread.start
    for allowed in (1, 0):
        out = tmp_path / f"out{allowed}"
        out.mkdir()
        count = [0]

        def start(self, count=count, allowed=allowed):
            if self.name.startswith("qcowfast-job_"):
                count[0] += 1
                if count[0] > allowed:
                    raise RuntimeError("can't start new thread")
            return real_start(self)

        monkeypatch.setattr(threading.Thread, "start", start)
        jobs = [(src, out / f"{i}.raw") for i in range(4)]
        results = convert_many(jobs, workers=4)
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
        assert count[0] == allowed + 1
        want = reference_raw(src)
        assert all((out / f"{i}.raw").read_bytes() == want for i in range(4))


def test_running_conversion_holds_its_temporary_file(images, tmp_path):
    """The sweep's premise: convert's temporary output is flocked while it is written."""
    src = images.get(GOOD[2]).path
    dst = tmp_path / "x.raw"
    seen = []

    def progress(done, total):
        if not seen:
            seen.extend(sweep_stale_temps(str(dst)))
            seen.append([p.name for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)])

    qcowfast.convert(src, dst, progress=progress)
    assert seen and seen[-1], "no temporary file seen during the conversion"
    assert len(seen) == 1, f"the sweep removed a live temporary file: {seen}"


def test_unknown_option_fails_fast(images, tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        convert_many([{"src": images.get(GOOD[0]).path, "dst": tmp_path / "x.raw",
                       "bogus": 1}])
    assert not any(tmp_path.iterdir())


def test_cli_jobs_file_report_and_exit_code(images, tmp_path):
    out, jobs = _batch(images, tmp_path)
    lines = []
    for job in jobs:
        if isinstance(job, dict):
            lines.append(json.dumps({k: str(v) if isinstance(v, Path) else v
                                     for k, v in job.items()}))
        else:
            lines.append(f"{job[0]} {job[1]}")
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text("# a batch\n" + "\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    r = run_cli("convert-many", "--jobs", jobs_file, "--report", report, "--workers", "2")
    assert r.returncode == 1, r.stderr
    data = json.loads(report.read_text())
    assert [j["status"] for j in data["jobs"]] == ["ok", "failed", "failed", "failed", "ok", "ok"]
    assert data["succeeded"] == 3 and data["failed"] == 3 and data["skipped"] == 0
    assert data["jobs"][2]["src"] == str(tmp_path / "missing.qcow2")
    for entry in data["jobs"]:
        status_word = {"ok": "ok", "failed": "FAILED"}[entry["status"]]
        assert any(line.startswith(status_word) and entry["src"] in line
                   for line in r.stderr.splitlines()), (entry, r.stderr)
    assert_same_bytes((out / "d.raw").read_bytes(), reference_raw(images.get(GOOD[3]).path),
                      "JSON-lines job")
    _no_litter(out, tmp_path)


def test_cli_target_dir_all_good_exits_zero(images, tmp_path):
    srcs = [images.get(i).path for i in GOOD[:2]]
    target = tmp_path / "t"
    target.mkdir()
    r = run_cli("convert-many", "-q", "--target-dir", target, *srcs)
    assert r.returncode == 0, r.stderr
    for src in srcs:
        dst = target / (Path(src).stem + ".raw")
        assert_same_bytes(dst.read_bytes(), reference_raw(src), str(dst))
    # Replaced by default like convert; --no-clobber fails every job and keeps the files.
    r = run_cli("convert-many", "--no-clobber", "--target-dir", target, *srcs)
    assert r.returncode == 1
    assert r.stderr.count("FAILED") == 2


def test_cli_target_dir_name_clash_refuses_only_the_later_job(images, tmp_path):
    """Two sources of one name would write one DST: the later job fails alone, as through
    --jobs (the whole batch used to be refused), and a second run skips the two done."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    a1, a2 = one / "a1.qcow2", one / "a2.qcow2"
    shutil.copy(images.get(GOOD[0]).path, a1)
    shutil.copy(images.get(GOOD[2]).path, a2)           # (GOOD[1] has a backing file)
    shutil.copy(images.get(GOOD[3]).path, two / "a1.qcow2")
    target = tmp_path / "t"
    target.mkdir()
    report = tmp_path / "report.json"
    r = run_cli("convert-many", "-q", "--report", report, "--target-dir", target, a1, a2,
                two / "a1.qcow2")
    assert r.returncode == 1, r.stderr
    data = json.loads(report.read_text())
    assert [j["status"] for j in data["jobs"]] == ["ok", "ok", "failed"]
    assert "also the destination of job 0" in data["jobs"][2]["error"]
    assert_same_bytes((target / "a1.raw").read_bytes(), reference_raw(a1), "first a1")
    assert_same_bytes((target / "a2.raw").read_bytes(), reference_raw(a2), "a2")
    r = run_cli("convert-many", "-q", "--skip-existing", "--report", report, "--target-dir",
                target, a1, a2)
    data = json.loads(report.read_text())
    assert r.returncode == 0 and (data["succeeded"], data["skipped"], data["failed"]) == (2, 2, 0)


def test_job_writing_over_its_own_source_fails_alone(images, tmp_path):
    """A job whose destination is its own source is refused by convert and writes nothing, so
    it does not stop the jobs reading that source (they were refused as readers of another
    job's destination)."""
    src = tmp_path / "a.qcow2"
    shutil.copy(images.get(GOOD[0]).path, src)
    link = tmp_path / "same.qcow2"
    os.link(src, link)
    before = src.read_bytes()
    results = convert_many([(src, src), (src, tmp_path / "a.raw"), (src, link),
                            (src, tmp_path / "b.raw")])
    assert isinstance(results[0], qcowfast.OutputError), results
    assert isinstance(results[2], qcowfast.OutputError), results
    assert [type(r) for r in results[1::2]] == [qcowfast.ConvertResult] * 2, results
    assert src.read_bytes() == before
    for name in ("a.raw", "b.raw"):
        assert_same_bytes((tmp_path / name).read_bytes(), reference_raw(src), name)


def test_deep_chains_wait_for_file_descriptors(tmp_path):
    """Each job holds its chain's files open: under a low descriptor limit, jobs of a 41-layer
    chain wait for descriptors instead of failing with EMFILE (a job was assumed to need 16)."""
    base = tmp_path / "l00.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x11 0 64k")
    for k in range(1, 41):
        layer = tmp_path / f"l{k:02d}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"l{k - 1:02d}.qcow2", "-F", "qcow2",
                 layer)
        if k % 10 == 0:
            qemu_io(layer, f"write -P {k} {k * 16}k 4k")
    top = tmp_path / "l40.qcow2"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"{top} {tmp_path / f'out{i}.raw'}\n" for i in range(6)))
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "from qcowfast.cli import main\n"
            f"sys.exit(main(['convert-many', '-q', '--workers', '6', '--jobs', {str(jobs)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = reference_raw(top)
    for i in range(6):
        assert_same_bytes((tmp_path / f"out{i}.raw").read_bytes(), want, f"out{i}")


def test_cli_report_keeps_names_that_are_not_utf8(images, tmp_path):
    """A name with a byte that is not UTF-8 is written in the report as Python decodes it (a
    lone surrogate escape, \\udcff for 0xff); fed back as a job file, it names the same file."""
    raw_name = os.fsdecode(b"disk-\xff")
    src = tmp_path / f"{raw_name}.qcow2"
    shutil.copyfile(images.get(GOOD[0]).path, src)
    target = tmp_path / "t"
    target.mkdir()
    report = tmp_path / "report.json"
    r = run_cli("convert-many", "-q", "--report", report, "--target-dir", target, src)
    assert r.returncode == 0, r.stderr
    assert os.listdir(os.fsencode(target)) == [b"disk-\xff.raw"]
    assert "\\udcff" in report.read_text(encoding="ascii")     # escaped: the file is ASCII
    job, = json.loads(report.read_text())["jobs"]
    assert (job["src"], job["dst"]) == (str(src), str(target / f"{raw_name}.raw"))
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps({"src": job["src"], "dst": job["dst"] + ".2"}) + "\n")
    r = run_cli("convert-many", "-q", "--jobs", again)
    assert r.returncode == 0, r.stderr
    assert_same_bytes((target / f"{raw_name}.raw.2").read_bytes(),
                      reference_raw(images.get(GOOD[0]).path), "the job read back")


def test_cli_usage_errors(tmp_path):
    r = run_cli("convert-many", "--target-dir", tmp_path)
    assert r.returncode == 1 and "at least one SRC" in r.stderr
    bad = tmp_path / "jobs"
    bad.write_text("only-one-word\n")
    r = run_cli("convert-many", "--jobs", bad)
    assert r.returncode == 1 and ":1:" in r.stderr
    # one line naming what to mend, before any job (they used to fail one by one, or show a
    # bare OS error, or ask for 'SRC DST')
    bad.write_text('[{"src": "a.qcow2", "dst": "b.raw"}]\n')
    for argv, words in ((["--jobs", bad], "JSON lines"),
                        (["--jobs", tmp_path / "nope"], "cannot read the job file"),
                        (["--target-dir", tmp_path / "nodir", bad], "no such directory"),
                        (["--target-dir", bad, bad], "not a directory")):
        r = run_cli("convert-many", *argv)
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr


def _image_with_data(path: Path, size_mib: int, data_mib: int) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, f"{size_mib}M")
    qemu_io(path, f"write -P 0x6b 0 {data_mib}M")
    return path


def test_conflicting_jobs_are_refused_and_the_rest_run(images, tmp_path):
    """Two jobs writing one output (only one could survive) and a job reading another job's
    output (what it reads would depend on the order): refused as values, the rest run."""
    a, b = images.get(GOOD[0]).path, images.get(GOOD[2]).path
    out = tmp_path / "out.raw"
    jobs = [(a, out), (b, tmp_path / "." / "out.raw"), (out, tmp_path / "final.raw"),
            (b, tmp_path / "b.raw")]
    results = convert_many(jobs, workers=2)
    assert isinstance(results[0], qcowfast.ConvertResult)
    assert isinstance(results[1], ValueError) and "also the destination of job 0" in \
        str(results[1])
    assert isinstance(results[2], ValueError) and "destination of job 0" in str(results[2])
    assert isinstance(results[3], qcowfast.ConvertResult)
    assert_same_bytes(out.read_bytes(), reference_raw(a), "the first writer's output")
    assert not (tmp_path / "final.raw").exists()



@pytest.mark.parametrize("workers", [1, 2])
def test_job_writing_a_file_of_another_jobs_chain_is_refused(tmp_path, workers):
    """A job whose source's backing file (at any depth, named relatively) or external data
    file is another job's destination is refused, whatever order the jobs would run in: it
    would read the old file or the new one depending on timing."""
    chain = tmp_path / "chain"
    chain.mkdir()
    _image_with_data(chain / "base.qcow2", 4, 1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             chain / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             chain / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", "ext.qcow2", "4M",
             cwd=chain)
    qemu_io("ext.qcow2", "write -P 0x3c 0 1M", cwd=chain)   # qemu-io: names from the cwd
    other = _image_with_data(tmp_path / "other.qcow2", 4, 2)
    out = tmp_path / "out"
    out.mkdir()
    jobs = [(chain / "top.qcow2", out / "top.raw"), (chain / "ext.qcow2", out / "ext.raw"),
            {"src": other, "dst": chain / "base.qcow2", "format": "qcow2"},
            {"src": other, "dst": chain / "ext.raw"}]
    results = convert_many(jobs, workers=workers, overwrite=True)
    assert isinstance(results[0], ValueError), results
    assert "a backing file of" in str(results[0]) and "destination of job 2" in str(results[0])
    assert isinstance(results[1], ValueError) and "the data file of" in str(results[1]) \
        and "destination of job 3" in str(results[1]), results
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results[2:]), results
    assert not (out / "top.raw").exists() and not (out / "ext.raw").exists()
    # The same batch on the command line: refused jobs fail the run.
    (chain / "base.qcow2").unlink()
    _image_with_data(chain / "base.qcow2", 4, 1)
    jobs_file = tmp_path / "jobs"
    jobs_file.write_text(f"{other} {chain / 'base.qcow2'}\n{chain / 'top.qcow2'} "
                         f"{out / 'top.raw'}\n")
    r = run_cli("convert-many", "--jobs", jobs_file, "--workers", str(workers))
    assert r.returncode == 1 and "a backing file of" in r.stderr, r.stderr
    assert not (out / "top.raw").exists()



@contextlib.contextmanager
def _fifo_writer(fifo: Path):
    """A thread blocked opening `fifo` for writing; yields the Event it sets once someone opens
    the FIFO for reading. On exit the test opens it itself, and checks the writer was really
    waiting (then released)."""
    import threading
    opened = threading.Event()

    def writer():
        fd = os.open(fifo, os.O_WRONLY)          # returns once someone opens it for reading
        opened.set()
        os.close(fd)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield opened
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        t.join(10)
        os.close(fd)
    assert opened.is_set()


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_conflict_check_opens_no_file_the_job_would_not(tmp_path, where):
    """The conflict walk over the jobs' chains follows the path policy the jobs follow: a
    backing file that is a FIFO (inside the image's directory) or lies outside it is never
    opened; a writer blocked opening the FIFO stays blocked."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    fifo = (img_dir if where == "inside" else tmp_path) / "fifo"
    os.mkfifo(fifo)
    top = img_dir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
             "fifo" if where == "inside" else str(fifo), "-F", "qcow2", top, "16M")
    with _fifo_writer(fifo) as opened:
        results = convert_many([(top, tmp_path / "o.raw")])
        assert isinstance(results[0], qcowfast.QcowError), results
        assert not opened.is_set()


def test_any_exception_is_the_jobs_result(images, tmp_path):
    """A wrong option type fails that job (as a value), never the batch; a job whose src or
    dst is no path is refused before anything runs."""
    good = images.get(GOOD[0]).path
    results = convert_many([{"src": good, "dst": tmp_path / "x.raw", "backing_dirs": 5},
                            {"src": good, "dst": tmp_path / "y.raw", "max_output_size": "1"},
                            (good, tmp_path / "z.raw")], on_error="continue")
    assert isinstance(results[0], TypeError), results          # backing_dirs: no path
    assert isinstance(results[1], ValueError) and "max_output_size" in str(results[1])
    assert isinstance(results[2], qcowfast.ConvertResult)
    assert not (tmp_path / "x.raw").exists() and not (tmp_path / "y.raw").exists()
    for spec in ({"src": 5, "dst": "x.raw"}, {"src": None, "dst": "x.raw"}, (good, {"a": 1})):
        with pytest.raises(ValueError, match="must be paths"):
            convert_many([spec])
    _no_litter(tmp_path)


def test_stop_names_the_job_that_failed(images, tmp_path):
    bad = _corrupt_copy(images, tmp_path)       # the largest: it runs first with one slot
    small = images.get("c64k-v3-tiny").path
    results = convert_many([(small, tmp_path / "s.raw"), (bad, tmp_path / "b.raw")],
                           workers=1, on_error="stop")
    assert isinstance(results[0], CancelledError) and str(bad) in str(results[0])


def test_killed_run_leaves_nothing_for_the_next(tmp_path):
    """A run SIGKILLed mid-conversion leaves a temporary file; the next run (at once, not 2 s
    later) removes it: the file was locked before it had a name, so lockable means orphan."""
    src = _image_with_data(tmp_path / "big.qcow2", 256, 256)
    dst = tmp_path / "out.raw"
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert", "-q", src, dst])
    try:
        deadline = time.monotonic() + 60
        while not (temps := [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]):
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary file"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if dst.exists():
        pytest.skip("the conversion finished before it was killed")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert temps[0].name.startswith(f".out.raw.{LOCKED_AT_BIRTH}")
    results = convert_many([(src, dst)], skip_existing=True)
    assert isinstance(results[0], qcowfast.ConvertResult)
    assert_same_bytes(dst.read_bytes(), b"\x6b" * (256 << 20), "after a killed run")
    _no_litter(tmp_path)


def test_skip_existing_never_skips_in_place_jobs(images, tmp_path):
    """An in-place output (existing=True) may be a killed run's partial one: it runs again."""
    src = images.get(GOOD[0]).path
    ref = reference_raw(src)
    dst = tmp_path / "inplace.raw"
    dst.write_bytes(b"\xee" * len(ref))                 # as a killed run left it
    result, = convert_many([{"src": src, "dst": dst, "existing": True}], skip_existing=True)
    assert isinstance(result, qcowfast.ConvertResult)
    assert_same_bytes(dst.read_bytes(), ref, "in-place job under skip_existing")


def test_raising_callback_stops_the_batch(tmp_path):
    """on_result raising in the middle: nothing starts any more, running jobs stop and remove
    their temporary files, and the exception reaches the caller."""
    src = _image_with_data(tmp_path / "img.qcow2", 64, 64)
    jobs = [(src, tmp_path / f"o{i}.raw") for i in range(40)]

    def on_result(i, job, result):
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        convert_many(jobs, workers=2, on_result=on_result)
    assert len(list(tmp_path.glob("o*.raw"))) < len(jobs)
    _no_litter(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_stops_the_batch(tmp_path, signum):
    """SIGTERM/SIGINT: no new job starts, the running ones remove their temporary files, and
    the process ends by the signal (it used to run every queued job first)."""
    src = _image_with_data(tmp_path / "img.qcow2", 64, 64)
    jobs = tmp_path / "jobs"
    jobs.write_text("".join(f"{src} {tmp_path}/o{i}.raw\n" for i in range(60)))
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert-many", "-q",
                             "--jobs", jobs, "--report", tmp_path / "report.json"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("o*.raw")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signum)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signum, err
    assert b"Traceback" not in err
    assert len(list(tmp_path.glob("o*.raw"))) < 60
    assert not (tmp_path / "report.json").exists()
    _no_litter(tmp_path)


def test_costliest_job_starts_first_not_the_largest(tmp_path):
    """Jobs start in order of their estimated cost (workload.py): a small image full of
    compressed data before a sparse image with a larger virtual size (ordered by virtual size,
    the big sparse one ran first and the costly one could be left running alone at the end)."""
    sparse = _image_with_data(tmp_path / "sparse.qcow2", 256, 1)
    full = _image_with_data(tmp_path / "full.qcow2", 16, 16)
    packed = tmp_path / "packed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", full, packed)
    ended = []
    results = convert_many([(sparse, tmp_path / "s.raw"), (packed, tmp_path / "p.raw")],
                           workers=1, on_result=lambda i, job, result: ended.append(i))
    assert all(isinstance(r, qcowfast.ConvertResult) for r in results), results
    assert ended == [1, 0]


def test_interrupt_stops_a_job_waiting_for_a_fifo_reader(tmp_path):
    """A job whose destination is a FIFO nobody reads waits for a reader; an interrupt of the
    batch ends that wait too, so no job thread outlives convert_many (it used to stay blocked
    in open() after the batch gave up waiting for it, for as long as no reader came)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = _image_with_data(tmp_path / "big.qcow2", 8, 1)     # the largest runs first
    small = _image_with_data(tmp_path / "small.qcow2", 1, 1)

    def on_result(index, job, result):
        if index == 1:
            time.sleep(0.5)                     # (job 0 is then waiting for its reader)
            raise KeyboardInterrupt

    before = set(threading.enumerate())         # (other tests' threads may still be ending)
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_many([(big, fifo), (small, tmp_path / "small.raw")], workers=2,
                         on_result=on_result)
        alive = [t.name for t in set(threading.enumerate()) - before]
        assert alive == []
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))   # (releases a blocked writer)
    _no_litter(tmp_path)


def test_fifo_destination_whose_reader_comes_late(images, tmp_path):
    """A batch job streams into a FIFO whose reader opens it only later: every byte arrives."""
    src = images.get(GOOD[0]).path
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def reader():
        time.sleep(0.3)
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 20):
                got.extend(chunk)
    t = threading.Thread(target=reader)
    t.start()
    try:
        results = convert_many([(src, fifo)])
    finally:
        t.join(60)
    assert isinstance(results[0], qcowfast.ConvertResult), results
    assert_same_bytes(bytes(got), reference_raw(src), "streamed into the FIFO")


def test_cli_report_checked_before_any_job(images, tmp_path):
    src = images.get(GOOD[0]).path
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{src} {tmp_path}/out.raw\n")
    for report, words in ((tmp_path / "out.raw", "also the destination"),
                          (src, "also the source"),
                          (tmp_path / "nodir" / "r.json", "does not exist"),
                          (tmp_path, "is a directory")):
        r = run_cli("convert-many", "--jobs", jobs, "--report", report)
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert not (tmp_path / "out.raw").exists()
    assert_same_bytes(Path(src).read_bytes(), Path(images.get(GOOD[0]).path).read_bytes(),
                      "source untouched")


def test_cli_report_may_not_be_a_file_of_a_jobs_chain(tmp_path):
    """The report is refused before any job runs where it names a backing file or the data
    file of a job's source, or a hard link to its source: writing it would change what the
    job reads."""
    _image_with_data(tmp_path / "base.qcow2", 4, 1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", "ext.qcow2", "4M",
             cwd=tmp_path)
    os.link(tmp_path / "top.qcow2", tmp_path / "link.qcow2")
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{tmp_path}/top.qcow2 {tmp_path}/top.raw\n"
                    f"{tmp_path}/ext.qcow2 {tmp_path}/ext.out\n")
    before = {name: (tmp_path / name).read_bytes() for name in ("base.qcow2", "ext.raw")}
    for report, words in (("base.qcow2", "a backing file of"), ("ext.raw", "the data file of"),
                          ("link.qcow2", "the source")):
        r = run_cli("convert-many", "--jobs", jobs, "--report", tmp_path / report)
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / "top.raw").exists() and not (tmp_path / "ext.out").exists()


def test_cli_closed_stderr_keeps_exit_code_and_report(images, tmp_path):
    """`convert-many ... 2>&1 | head -c 10`: the lines stop, the batch, its report and its exit
    status (1: a job failed) do not."""
    good = images.get(GOOD[0]).path
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{good} {tmp_path}/a.raw\n{tmp_path}/missing.qcow2 {tmp_path}/b.raw\n"
                    + "".join(f"{good} {tmp_path}/c{i}.raw\n" for i in range(30)))
    report = tmp_path / "report.json"
    shell = (f"'{sys.executable}' -m qcowfast convert-many --workers 1 --jobs '{jobs}' "
             f"--report '{report}' 2>&1 >/dev/null | head -c 10 >/dev/null; "
             "echo ${PIPESTATUS[0]}")
    status = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert status.stdout.strip() == "1", status
    data = json.loads(report.read_text())
    assert data["failed"] == 1 and data["succeeded"] == 31


def test_cli_jobs_file_details(images, tmp_path):
    """A UTF-8 BOM is skipped; a bad -S is one line, not a traceback; JSON src must be a
    string."""
    src = images.get(GOOD[0]).path
    jobs = tmp_path / "jobs"
    jobs.write_bytes(b"\xef\xbb\xbf" + f"{src} {tmp_path}/bom.raw\n".encode())
    r = run_cli("convert-many", "-q", "--jobs", jobs)
    assert r.returncode == 0, r.stderr
    assert_same_bytes((tmp_path / "bom.raw").read_bytes(), reference_raw(src), "BOM jobs file")
    for argv in (["-S", "abc"], ["-o", "cluster_size=abc", "-O", "qcow2"]):
        r = run_cli("convert-many", *argv, "--jobs", jobs)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "abc" in r.stderr
    jobs.write_text(json.dumps({"src": 5, "dst": "x.raw"}) + "\n")
    r = run_cli("convert-many", "--jobs", jobs)
    assert r.returncode == 1 and ":1:" in r.stderr and "Traceback" not in r.stderr


def test_sweep_never_takes_a_temporary_file_being_published(images, tmp_path):
    """A sweep running beside conversions to the same destination never removes a live
    temporary file, not even between the end of the writing and the rename (the lock used to
    be released first)."""
    src = images.get("c64k-v3-tiny").path
    dst = tmp_path / "out.raw"
    sweeper = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom qcowfast.fleet import sweep_stale_temps"
         "\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n"
         "    sweep_stale_temps(sys.argv[1])", str(dst)])
    failures = []
    try:
        for i in range(1500):
            try:
                qcowfast.convert(src, dst, threads=1, overwrite=True)
            except qcowfast.QcowError as exc:
                failures.append(str(exc))
            if sweeper.poll() is not None:
                break
    finally:
        sweeper.kill()
        sweeper.wait()
    assert not failures, failures[:3]
    assert dst.read_bytes() == reference_raw(src)


def test_cli_report_may_not_be_the_job_file(images, tmp_path):
    jobs = tmp_path / "jobs"
    text = f"{images.get(GOOD[0]).path} {tmp_path}/o.raw\n"
    jobs.write_text(text)
    r = run_cli("convert-many", "--jobs", jobs, "--report", jobs)
    assert r.returncode == 1 and "job file" in r.stderr
    assert jobs.read_text() == text and not (tmp_path / "o.raw").exists()


# ---------------------------------------------------------------------------------------------
# Jobs that are wrong in themselves, and callbacks that raise (red team of the batch path)


def test_yes_no_options_must_be_booleans(images, tmp_path):
    """A job's "overwrite": "false" or "existing": "no" is refused as that job's ValueError
    (Python's truth would replace or write in place); the existing files stay as they were."""
    good = images.get(GOOD[0]).path
    keep = tmp_path / "keep.raw"
    keep.write_bytes(b"k" * 4096)
    results = convert_many([{"src": good, "dst": keep, "overwrite": "false"},
                            {"src": good, "dst": keep.with_name("keep2.raw"), "existing": "no"},
                            (good, tmp_path / "ok.raw")], overwrite=False)
    for r, name in zip(results[:2], ("overwrite", "existing")):
        assert isinstance(r, ValueError) and f"{name} must be True or False" in str(r), r
    assert isinstance(results[2], qcowfast.ConvertResult)
    assert keep.read_bytes() == b"k" * 4096 and not keep.with_name("keep2.raw").exists()
    with pytest.raises(ValueError, match="skip_existing must be True or False"):
        convert_many([(good, tmp_path / "x.raw")], skip_existing="yes")


def test_a_job_with_impossible_paths_fails_alone(images, tmp_path):
    """A NUL byte, an unencodable name or a data_file that is no path fail that job (as its
    result), not the batch, in the API and on the command line (no traceback)."""
    good = images.get(GOOD[0]).path
    jobs = [(good, str(tmp_path / "a\0b.raw")), (good, str(tmp_path / "\ud800.raw")),
            {"src": good, "dst": tmp_path / "c.raw", "data_file": 5},
            (str(good) + "\0", tmp_path / "d.raw"), (good, tmp_path / "ok.raw")]
    results = convert_many(jobs)
    assert all(isinstance(r, Exception) for r in results[:4]), results
    assert isinstance(results[4], qcowfast.ConvertResult)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(json.dumps({"src": str(good), "dst": str(tmp_path / "e.raw"),
                                     "data_file": 5}) + "\n" +
                         json.dumps({"src": str(good), "dst": str(tmp_path / "f.raw")}) + "\n")
    r = run_cli("convert-many", "--jobs", jobs_file)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "f.raw").exists() and not (tmp_path / "e.raw").exists()


def test_raising_callback_starts_no_more_jobs(tmp_path):
    """on_result raising on the first job to end: no job starts after it, whichever job
    ends first (the batch used to wait for the futures in order before noticing)."""
    src = _image_with_data(tmp_path / "big.qcow2", 48, 48)
    small = [_image_with_data(tmp_path / f"s{i}.qcow2", 1, 1) for i in range(8)]

    def on_result(i, job, result):
        raise RuntimeError("stop")
    jobs = [(src, tmp_path / "big.raw")] + [(s, tmp_path / f"{s.stem}.raw") for s in small]
    with pytest.raises(RuntimeError, match="stop"):
        convert_many(jobs, workers=2, threads=1, on_result=on_result)
    outputs = [j[1] for j in jobs if Path(j[1]).exists()]
    assert len(outputs) <= 2, outputs              # the two slots' first jobs at most
    assert not list(tmp_path.glob("*" + TMP_SUFFIX)) and not list(tmp_path.glob(".*" +
                                                                                 TMP_SUFFIX))


def test_batch_progress_never_goes_back(tmp_path):
    """The batch's (done, total) stream only grows and ends at total, also for raw sources
    whose size is not whole sectors (converted as whole sectors)."""
    jobs = []
    for i in range(12):
        raw = tmp_path / f"r{i}.raw"
        raw.write_bytes(os.urandom(100_000 + 37 * i))
        jobs.append({"src": raw, "dst": tmp_path / f"o{i}.raw", "src_format": "raw"})
    seen = []
    convert_many(jobs, workers=4, progress=lambda d, t: seen.append((d, t)))
    assert seen and all(b[0] >= a[0] for a, b in zip(seen, seen[1:])), seen
    assert seen[-1][0] == seen[-1][1] == sum(-(-(100_000 + 37 * i) // 512) * 512
                                             for i in range(12))


def test_fifo_source_is_never_opened(tmp_path):
    """A FIFO as a job's source fails that job without opening it: a writer blocked on the
    FIFO stays blocked (it used to be released, then killed by SIGPIPE)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with _fifo_writer(fifo) as opened:
        results = convert_many([(fifo, tmp_path / "o.raw")])
        assert isinstance(results[0], qcowfast.QcowError) and not opened.is_set(), results


def test_hard_linked_destination_is_a_conflict(images, tmp_path):
    """A job writing (in place) a hard link of another job's source is refused up front,
    whatever the timing."""
    good = images.get(GOOD[0]).path
    c = tmp_path / "c.raw"
    qcowfast.convert(good, c)
    os.link(c, tmp_path / "h.raw")
    results = convert_many([{"src": good, "dst": tmp_path / "h.raw", "existing": True},
                            (c, tmp_path / "copy.raw")])
    assert isinstance(results[0], qcowfast.ConvertResult), results
    assert isinstance(results[1], ValueError) and "destination of job 0" in str(results[1])


def test_deep_chain_walk_leaks_no_descriptor(tmp_path):
    """The conflict walk stops at MAX_CHAIN_DEPTH layers and leaves no file open."""
    from qcowfast.constants import MAX_CHAIN_DEPTH
    from qcowfast.fleet import Job, chain_files
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "l0.qcow2", "1M")
    for i in range(1, MAX_CHAIN_DEPTH + 6):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"l{i - 1}.qcow2", "-F", "qcow2",
                 tmp_path / f"l{i}.qcow2", "1M")
    before = sorted(os.listdir("/proc/self/fd"))
    names = list(chain_files(Job(str(tmp_path / f"l{MAX_CHAIN_DEPTH + 5}.qcow2"),
                                 str(tmp_path / "o.raw"))))
    assert len(names) == MAX_CHAIN_DEPTH + 2
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_cli_output_options_follow_convert(images, tmp_path):
    """convert-many's -o and -S are convert's: repeated -o, QEMU's option-list rules, nocow,
    -S multiples of 512 up to 16M; a bad value fails before any job, in one line."""
    src = images.get(GOOD[0]).path
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("convert-many", "-q", "-O", "qcow2", "-o", "cluster_size=4k",
                "-o", "nocow=on,compression_type=zstd", "-c", "--target-dir", out, src)
    assert r.returncode == 0, r.stderr
    (dst,) = out.iterdir()
    info = json.loads(qemu_img("info", "--output=json", dst).stdout)
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    qemu_img("compare", "-q", src, dst)
    for argv in (["-o", "cluster_size=4k,", "-O", "qcow2"], ["-o", "nocow=maybe"],
                 ["-o", "cluster_size=4k"], ["-S", "100"], ["-S", "32M"]):
        r = run_cli("convert-many", *argv, "--target-dir", tmp_path / "none", src)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
