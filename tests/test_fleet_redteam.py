"""Red team of the batch path: `qcowfast convert-many`, `convert_many`, `qcowfast.dask`.

A job's failure on the command line is the line `qcowfast convert SRC DST` prints for the same
pair (itself qemu-img's: both are run here); job files keep every byte of a name; the report
is refused before any job runs or written safely; skip_existing resumes what a batch refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes, cli_in_process, qemu_img, qemu_io, reference_raw, \
    run_cli
from qcowfast.fleet import Skipped, convert_many

CORRUPT = b"QFI\xfb\0\0\0\3" + b"\0" * 4088        # QCOW2 v3, cluster_bits 0


def _good(path: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 0x5a 0 64k")
    return path


def _qemu_line(*args) -> str:
    """qemu-img convert's error line, without its "qemu-img: " prefix (it must fail)."""
    import subprocess
    proc = subprocess.run(["qemu-img", "convert", *map(str, args)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("qemu-img: "), proc.stderr
    return proc.stderr[len("qemu-img: "):].rstrip("\n")


def _convert_line(capsys, *args) -> str:
    """`qcowfast convert ARGS`'s error line, without its "qcowfast: " prefix (it must fail)."""
    status, _, err = cli_in_process(capsys, "convert", *args)
    assert status == 1 and err.startswith("qcowfast: "), (status, err)
    return err[len("qcowfast: "):].rstrip("\n")


def _batch_errors(tmp_path: Path, *argv) -> tuple[list, str]:
    """Run `qcowfast convert-many ARGV --report`; (each job's report entry, stderr)."""
    report = tmp_path / "report.json"
    r = run_cli("convert-many", *argv, "--report", report, cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(report.read_text())["jobs"], r.stderr


def test_destination_naming_no_file_is_worded_as_convert(tmp_path, capsys, monkeypatch):
    """A destination '' or ending in '/' with a missing, corrupt or directory source: convert
    (and qemu-img) report the source's failure (the source is opened first), the batch
    reported the destination's, in words convert does not use even for a good source. With
    -n too; and jobs of such names are no conflict with each other (nothing is written)."""
    monkeypatch.chdir(tmp_path)
    _good(tmp_path / "good.qcow2")
    (tmp_path / "corrupt.qcow2").write_bytes(CORRUPT)
    (tmp_path / "adir").mkdir()
    jobs, want = [], []
    for src in ("missing.qcow2", "corrupt.qcow2", "adir", "good.qcow2"):
        for dst in ("", "nodir/", "adir/"):
            for existing in (False, True):
                n = ["-n"] if existing else []
                line = _convert_line(capsys, *n, "-O", "raw", src, dst)
                assert line == _qemu_line(*n, "-O", "raw", src, dst), (src, dst, existing)
                jobs.append({"src": src, "dst": dst, **({"existing": True} if existing else {})})
                want.append(line)
    job_file = tmp_path / "jobs"
    # The same pairs as 'SRC DST' lines, where they can be written so ('' cannot).
    plain = [(j["src"], j["dst"]) for j, w in zip(jobs, want) if j["dst"] and "existing" not in j]
    job_file.write_text("".join(json.dumps(j) + "\n" for j in jobs) +
                        "".join(f"{s} {d}\n" for s, d in plain))
    want += [w for j, w in zip(jobs, want) if j["dst"] and "existing" not in j]
    entries, _ = _batch_errors(tmp_path, "--jobs", job_file)
    assert [e["error"] for e in entries] == want
    assert sorted(os.listdir(tmp_path)) == ["adir", "corrupt.qcow2", "good.qcow2", "jobs",
                                            "report.json"]
    assert os.listdir(tmp_path / "adir") == []


def test_destination_naming_no_file_writes_nothing_to_collide_with(tmp_path):
    """'a.raw/' writes nothing (convert refuses the name before it opens anything): a job
    writing a.raw is no second writer of it (it was refused as one), and two jobs to '' both
    get what convert raises (the second got a conflict instead)."""
    good = _good(tmp_path / "good.qcow2")
    out = tmp_path / "a.raw"
    results = convert_many([(good, f"{out}/"), (good, out), (good, ""), (good, "")])
    with pytest.raises(qcowfast.OutputError) as no_file:
        qcowfast.convert(good, "")
    assert isinstance(results[0], qcowfast.OutputError), results
    assert isinstance(results[1], qcowfast.ConvertResult), results
    assert [type(r) for r in results[2:]] == [qcowfast.OutputError] * 2, results
    assert {str(r) for r in results[2:]} == {str(no_file.value)}
    assert_same_bytes(out.read_bytes(), reference_raw(good), "a.raw")


def test_target_dir_names_a_directory_source_by_its_name(tmp_path, capsys, monkeypatch):
    """--target-dir with sources 'one/' and 'two/' (directories): each job fails with what
    convert says of its source. Both were given the output 'DIR/.raw', and the second was
    refused as a second writer of it instead."""
    monkeypatch.chdir(tmp_path)
    for name in ("one", "two", "out"):
        (tmp_path / name).mkdir()
    entries, _ = _batch_errors(tmp_path, "--target-dir", "out", "one/", "two/")
    assert [e["dst"] for e in entries] == ["out/one.raw", "out/two.raw"]
    assert [e["error"] for e in entries] == [
        _convert_line(capsys, "-O", "raw", src, f"out/{src[:-1]}.raw") for src in ("one/", "two/")]


def test_failures_are_worded_as_convert_words_them(tmp_path, capsys, monkeypatch):
    """Failures `qcowfast convert` rewords from convert()'s exception: a snapshot asked of a
    raw source, a -n target shorter than the image, a character device that cannot hold it,
    -f naming a format qcowfast does not read; the batch gave convert()'s own words."""
    monkeypatch.chdir(tmp_path)
    good = _good(tmp_path / "good.qcow2")
    (tmp_path / "short.raw").write_bytes(b"x" * 4096)
    cases = [({"src_format": "raw", "snapshot": "s1"}, "d1.raw", ["-f", "raw", "-l", "s1"]),
             ({"existing": True}, "short.raw", ["-n"]),
             ({}, "/dev/full", []),
             ({"src_format": "vmdk"}, "d2.raw", ["-f", "vmdk"]),
             ({"src_format": "nosuch"}, "d3.raw", ["-f", "nosuch"])]
    jobs = tmp_path / "jobs"
    jobs.write_text("".join(json.dumps({"src": "good.qcow2", "dst": dst, **options}) + "\n"
                            for options, dst, _ in cases))
    entries, _ = _batch_errors(tmp_path, "--jobs", jobs)
    for (options, dst, argv), entry in zip(cases, entries):
        line = _convert_line(capsys, *argv, "-O", "raw", "good.qcow2", dst)
        if argv[:2] != ["-f", "vmdk"]:          # (qcowfast's own words for a format it lacks)
            assert line == _qemu_line(*argv, "-O", "raw", "good.qcow2", dst), argv
        assert entry["error"] == line, (options, entry)
    assert (tmp_path / "short.raw").read_bytes() == b"x" * 4096
    assert not any((tmp_path / f"d{i}.raw").exists() for i in (1, 2, 3))
    assert good.exists()


def test_job_file_names_keep_white_space_that_is_not_ascii(tmp_path):
    """'SRC DST' lines are split on ASCII white space only: a name ending in a no-break space
    or holding an ideographic space is that file (the no-break space was dropped, writing
    another file). CRLF endings, blank lines and comment lines are still read."""
    good = _good(tmp_path / "good\u3000disk.qcow2")
    jobs = tmp_path / "jobs"
    jobs.write_bytes(f"# batch\r\n\r\n \t\r\n{good.name} out\u00a0\r\n"
                     f"{good.name}\tother.raw\u3000\r\n".encode())
    r = run_cli("convert-many", "-q", "--jobs", jobs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != jobs.name) == sorted(
        [good.name, "out\u00a0", "other.raw\u3000"])
    assert_same_bytes((tmp_path / "out\u00a0").read_bytes(), reference_raw(good), "out")


def test_report_naming_no_file_is_refused_before_any_job(tmp_path):
    """--report '' wrote no report and exited 0; --report 'new/' was refused only once every
    job had run. Both are refused first, in one line, and no job runs."""
    good = _good(tmp_path / "good.qcow2")
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{good} {tmp_path}/o.raw\n")
    for report, words in (("", "--report '': names no file"),
                          ("new/", "--report new/: names a directory, not a file")):
        r = run_cli("convert-many", "--jobs", jobs, "--report", report, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr == f"qcowfast convert-many: {words}\n", r.stderr
        assert not (tmp_path / "o.raw").exists()
    # (a job whose destination names no file writes nothing: no collision with the report)
    jobs.write_text(f"{good} {tmp_path}/o.raw/\n{good} {tmp_path}/ok.raw\n")
    r = run_cli("convert-many", "-q", "--jobs", jobs, "--report", tmp_path / "o.raw")
    assert r.returncode == 1 and json.loads((tmp_path / "o.raw").read_text())["failed"] == 1


def test_report_is_never_written_through_a_planted_file(tmp_path, capsys):
    """The report's temporary file had a name known in advance (the pid), opened following
    symlinks: a symlink planted there had its target overwritten."""
    good = _good(tmp_path / "good.qcow2")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    report = tmp_path / "r.json"
    (tmp_path / f".r.json.{os.getpid()}.report-tmp").symlink_to(victim)
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{good} {tmp_path}/o.raw\n")
    status, _, err = cli_in_process(capsys, "convert-many", "-q", "--jobs", jobs,
                                    "--report", report)
    assert status == 0, err
    assert victim.read_bytes() == b"precious"
    assert json.loads(report.read_text())["succeeded"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".report-tmp")
                and not p.is_symlink()]


def test_skip_existing_runs_a_job_reading_a_finished_output(tmp_path):
    """A job reading another job's destination is refused ("convert it in a later batch");
    the later batch, resumed with skip_existing, refused it again, although the job writing
    that destination is now skipped. A second writer of a skipped destination is still
    refused."""
    good = _good(tmp_path / "good.qcow2")
    mid, last = tmp_path / "mid.qcow2", tmp_path / "last.raw"
    jobs = [{"src": good, "dst": mid, "format": "qcow2"}, (mid, last)]
    first = convert_many(jobs, skip_existing=True)
    assert isinstance(first[0], qcowfast.ConvertResult)
    assert isinstance(first[1], ValueError) and "later batch" in str(first[1])
    again = convert_many(jobs + [(good, mid)], skip_existing=True)
    assert again[0] == Skipped(str(mid), "destination exists")
    assert isinstance(again[1], qcowfast.ConvertResult), again
    assert isinstance(again[2], ValueError) and "destination of job 0" in str(again[2])
    assert_same_bytes(last.read_bytes(), reference_raw(good), "last.raw")


def test_dask_skip_existing_and_its_value_checked(tmp_path):
    """The same on Dask; and skip_existing="no" was taken as True (its jobs skipped)."""
    distributed = pytest.importorskip("distributed")
    from qcowfast import dask as qdask
    good = _good(tmp_path / "good.qcow2")
    mid, last = tmp_path / "mid.raw", tmp_path / "last.raw"
    mid.write_bytes(reference_raw(good))          # a finished earlier run
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                       dashboard_address=None)      # (in-process transport)
    try:
        with distributed.Client(cluster) as client:
            with pytest.raises(ValueError, match="skip_existing must be True or False"):
                qdask.convert_many([(good, mid)], client, skip_existing="no")
            results = qdask.convert_many([(good, mid), {"src": mid, "dst": last,
                                                        "src_format": "raw"}],
                                         client, skip_existing=True)
    finally:
        cluster.close()
    assert results[0] == Skipped(str(mid), "destination exists")
    assert isinstance(results[1], qcowfast.ConvertResult), results
    assert last.read_bytes() == mid.read_bytes()


def test_skip_existing_never_skips_standard_output(tmp_path):
    """A job streaming to standard output was skipped under skip_existing when a file named
    "-" lay in the working directory, or (named /dev/stdout) when standard output was
    redirected to a file: nothing was streamed, and the batch succeeded."""
    import subprocess
    import sys
    good = _good(tmp_path / "good.qcow2")
    (tmp_path / "-").write_bytes(b"a file named -")
    for dst in ("-", "/dev/stdout"):
        code = ("import sys, qcowfast\n"
                f"r = qcowfast.convert_many([({str(good)!r}, {dst!r})], skip_existing=True, "
                "overwrite=True)\n"
                "print(type(r[0]).__name__, file=sys.stderr)\n")
        out = tmp_path / "stream.raw"
        with open(out, "wb") as f:
            proc = subprocess.run([sys.executable, "-c", code], stdout=f, cwd=tmp_path,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        assert proc.stderr == "ConvertResult\n", (dst, proc.stderr)
        assert_same_bytes(out.read_bytes(), reference_raw(good), dst)
    assert (tmp_path / "-").read_bytes() == b"a file named -"


def test_a_name_stderr_cannot_write_still_gets_its_line(tmp_path):
    """A job file's name with a lone surrogate (JSON "\\ud800", no byte of a file name): its
    FAILED line could not be written to stderr, and was lost without a word. It is shown
    escaped, and the job fails alone (also where the name ends in '/')."""
    good = _good(tmp_path / "good.qcow2")
    names = ["\ud800", "\ud800/"]
    results = convert_many([(good, n) for n in names] + [(good, tmp_path / "ok.raw")])
    assert [type(r) for r in results] == [UnicodeEncodeError] * 2 + [qcowfast.ConvertResult]
    jobs = tmp_path / "jobs"
    jobs.write_text("".join(json.dumps({"src": str(good), "dst": n}) + "\n" for n in names))
    r = run_cli("convert-many", "--jobs", jobs)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("FAILED")]
    assert [line.split(" -> ", 1)[1].split(":", 1)[0] for line in failed] == \
        [repr(n) for n in names], r.stderr


def test_no_clobber_and_overwrite_are_refused_together_as_convert_refuses_them(tmp_path):
    """`convert --no-clobber --overwrite` is a usage error; convert-many took both (no-clobber
    won) and ran the batch: a new destination was written, an existing one failed with
    "pass overwrite=True (--overwrite)", which was given."""
    good = _good(tmp_path / "good.qcow2")
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{good} {tmp_path}/o.raw\n")
    one = run_cli("convert", "--no-clobber", "--overwrite", good, tmp_path / "o.raw")
    many = run_cli("convert-many", "--jobs", jobs, "--no-clobber", "--overwrite")
    assert many.returncode == one.returncode != 0
    assert many.stderr.splitlines()[-1] == one.stderr.splitlines()[-1].replace(
        "qcowfast convert:", "qcowfast convert-many:"), many.stderr
    assert not (tmp_path / "o.raw").exists()


def test_signal_leaves_no_earlier_runs_report(tmp_path):
    """SIGTERM ends the batch without a report; the report an earlier run left at that path
    stayed, describing outputs this run had changed already (it looked like this run's)."""
    import signal
    import subprocess
    import sys
    import time
    good = _good(tmp_path / "good.qcow2")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                 # no reader: that job waits for one
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"jobs": [], "succeeded": 2, "failed": 0}))
    jobs = tmp_path / "jobs"
    jobs.write_text(f"{good} {fifo}\n{good} {tmp_path}/o.raw\n")
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert-many", "-q",
                             "--workers", "2", "--jobs", jobs, "--report", report],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "o.raw").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err
    assert not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith("-tmp")]
