"""Command-line and batch (convert-many) leftovers of a red team, against qemu-img 7.2.

Each command line runs through qemu-img and qcowfast (in this process, from the same working
directory); the exit status and the lines are compared (qemu-img's name replaced by
qcowfast's). The subjects: a snapshot that does not exist (convert -l), the -T/--trace
options before the subcommand, an empty output name (and -O host_device's refusals), a NUL
byte in a path (no oracle: argv cannot hold one; the rule is one line naming the argument),
and convert-many's jobs, whose results and lines agree with convert's for the same pair
(character devices, directories, FIFOs, sockets, NUL bytes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket

import pytest

import qcowfast
from common import (assert_as_qemu_img as common_assert, both_tools,
                    cli_in_process as cli, qemu_img)
from qcowfast.errors import UnsafePathError

NAMES = {"IMG": "img.qcow2", "SNAP": "snap.qcow2", "FILE": "file.raw", "DIR": "dir",
         "MISSING": "missing.img", "EVENTS": "events.txt", "SOCK": "sock"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """img.qcow2; snap.qcow2 with snapshots s1 and s2; file.raw; dir/; a socket; no
    missing.img."""
    d = tmp_path_factory.mktemp("leftovers2")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", d / "snap.qcow2", "1M")
    for name in ("s1", "s2"):
        qemu_img("snapshot", "-c", name, d / "snap.qcow2")
    (d / "file.raw").write_bytes(bytes(4096))
    (d / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))              # (a socket file; nothing listens)
    yield d
    sock.close()


def _both(capsys, monkeypatch, workdir, argv):
    return both_tools(capsys, monkeypatch, workdir, argv, NAMES)


def assert_as_qemu_img(capsys, monkeypatch, workdir, argv, status=None) -> None:
    """The same status, stdout and stderr as qemu-img (NAMES replaced); its status `status`,
    or not 0."""
    __tracebackhide__ = True
    common_assert(capsys, monkeypatch, workdir, argv, status, NAMES)


# -- 1: a snapshot that does not exist ------------------------------------------------------

@pytest.mark.parametrize("options", [
    ["-l", "nosuch"], ["-l", "snapshot.name=nosuch"], ["-l", "snapshot.id=9"],
    ["-l", "snapshot.id=1,snapshot.name=s2"], ["-O", "qcow2", "-l", "nosuch"],
    ["-p", "-l", "nosuch"], ["-l", "-snap"], ["-n", "-l", "nosuch"],
], ids=" ".join)
def test_missing_snapshot_in_qemu_img_words(capsys, monkeypatch, workdir, options):
    """qemu-img's one line ("Failed to load snapshot: Can't find snapshot"), not the API's
    message listing the snapshots."""
    target = "FILE" if "-n" in options else "MISSING"
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "SNAP", target])


def test_missing_snapshot_api_lists_the_snapshots(workdir, capsys, monkeypatch):
    """The API keeps its message; a batch's line is qemu-img's, as convert's."""
    with pytest.raises(qcowfast.SnapshotNotFound) as info:
        qcowfast.convert(workdir / "snap.qcow2", workdir / "x.raw", snapshot="nosuch")
    assert "'nosuch'" in str(info.value) and "'s1'" in str(info.value)
    want = _both(capsys, monkeypatch, workdir, ["convert", "-l", "nosuch", "SNAP", "x.raw"])[0]
    jobs = workdir / "jobs.json"
    jobs.write_text(json.dumps({"src": "snap.qcow2", "dst": "x.raw", "snapshot": "nosuch"})
                    + "\n")
    try:
        status, _, err = cli(capsys, "convert-many", "--jobs", jobs)
    finally:
        jobs.unlink()
    assert status == 1 and err.splitlines()[0] == \
        f"FAILED  snap.qcow2 -> x.raw: {want[2][len('qcowfast: '):-1]}"
    assert not (workdir / "x.raw").exists()


# -- 2: -T / --trace before the subcommand ---------------------------------------------------

TRACES = ["x,y=z", "id=1x", "x,help", "x,?,y=z", "x,y=z,help", "=x", "events=",
          "events=MISSING", "events=DIR", "file=", "file=DIR", "file=missing/x",
          "enable=x*,file=missing/y,file=", "x*,file", "help,y=z", ""]


def _trace_argv(value: str) -> str:
    return re.sub(r"(?<==)[A-Z]+", lambda m: NAMES.get(m.group(0), m.group(0)), value)


@pytest.mark.parametrize("option", ["-T", "--trace", "--tr"])
def test_trace_options_as_qemu_img(capsys, monkeypatch, workdir, option):
    """Values qemu-img refuses (its option parser, an events file it cannot read, a log file
    it cannot open), warnings and help: the same lines and status. Values naming no QEMU
    trace event exactly (qemu-img warns: qcowfast has no events) are not among them."""
    for value in TRACES:
        want, got = _both(capsys, monkeypatch, workdir,
                          [option, _trace_argv(value), "info", "IMG"])
        assert "does not exist" not in want[2]
        assert got == want, value


def test_trace_help_ends_the_command(capsys, monkeypatch, workdir):
    """help lists QEMU's trace events and ends with status 0 before the command runs:
    qcowfast has none to list (README: Differences). Lines of an events file lose their
    last character only (fgets()'s newline), so some of these are no help."""
    for argv, lines in [
            (["-T", "help", "info", "IMG"], None), (["--trace", "enable=help", "info", "IMG"],
                                                    None),
            (["-T", "?"], None), (["-T", "help", "-V"], None),
            (["-T", "events=EVENTS", "info", "IMG"], "# comment\nfoo*\nhelp\n"),
            (["-T", "events=EVENTS,file=missing/z", "info", "IMG"], "help\n"),
            (["-T", "events=EVENTS", "info", "IMG"], "x*\nhelp*"),
            (["-T", "events=EVENTS", "info", "IMG"], "  help*\n"),
            (["-T", "events=EVENTS", "info", "IMG"], "#help\n"),
            (["-T", "events=EVENTS", "info", "IMG"], "help*\r\n"),
            (["-T", "events=EVENTS", "info", "IMG"], "x*\n?\n")]:
        if lines is not None:
            (workdir / "events.txt").write_text(lines)
        try:
            want, got = _both(capsys, monkeypatch, workdir, [_trace_argv(a) for a in argv])
        finally:
            if lines is not None:
                (workdir / "events.txt").unlink()
        if "image:" in want[1]:                 # (no help: the command ran)
            assert got == want, (argv, lines)
            continue
        assert want[0] == 0 and "dma_blk_io" in want[1], (argv, lines, want)
        assert got == (0, "", want[2]), (argv, lines)


def test_trace_before_the_command_is_looked_up(capsys, monkeypatch, workdir):
    for argv in (["-T", "x,y=z", "nosuchcmd"], ["-T", "file=missing/z", "nosuchcmd"],
                 ["-T", "file=missing/z"], ["-V", "-T", "x,y=z"]):
        want, got = _both(capsys, monkeypatch, workdir, argv)
        if argv[0] == "-V":                         # (the version line is qcowfast's)
            assert want[0] == got[0] == 0 and want[2] == got[2] == ""
        else:
            assert got == want, argv


# -- 3: an empty output name, -O host_device ------------------------------------------------

@pytest.mark.parametrize("options", [
    ["IMG", ""], ["-O", "qcow2", "IMG", ""], ["-O", "qcow2", "-o", "cluster_size=3", "IMG", ""],
    ["-t", "bogus", "IMG", ""], ["-O", "raw", "-o", "preallocation=metadata", "IMG", ""],
    ["-p", "-O", "qcow2", "IMG", ""], ["MISSING", ""], ["-l", "nosuch", "SNAP", ""],
    ["-O", "host_device", "IMG", ""], ["-n", "-O", "host_device", "IMG", ""],
], ids=lambda v: " ".join(a or "''" for a in v))
def test_empty_output_name_as_qemu_img(capsys, monkeypatch, workdir, options):
    options = [NAMES[a[:-1]] + "/" if a.endswith("/") else a for a in options]
    if "-p" in options:                 # (stdout and stderr apart: the report, then the line)
        want, got = _both(capsys, monkeypatch, workdir, ["convert", *options])
        assert got == want
        return
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options])


def test_host_device_refusals_as_qemu_img(capsys, monkeypatch, workdir):
    """hdev_open()'s words: the file opened read-write first, then its type checked."""
    for target in ("MISSING", "FILE", "DIR", "DIR/", "FILE/", "SOCK"):
        for in_place in ([], ["-n"]):
            name = NAMES[target[:-1]] + "/" if target.endswith("/") else target
            assert_as_qemu_img(capsys, monkeypatch, workdir,
                               ["convert", *in_place, "-O", "host_device", "IMG", name])


@pytest.mark.parametrize("target", ["file.raw/x/", "file.raw/x", "file.raw/", "missing/x/",
                                    "dir/x/"])
@pytest.mark.parametrize("options", [[], ["-n"], ["-O", "qcow2"]], ids=" ".join)
def test_output_names_under_a_file_as_qemu_img(capsys, monkeypatch, workdir, options, target):
    """A name whose walk meets a file before its last name is ENOTDIR, trailing slash or not
    (qcowfast said EISDIR for 'file.raw/x/': O_CREAT with a trailing slash)."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "IMG", target])


def test_open_errno_of_an_empty_name(workdir, monkeypatch):
    """raw_co_create()'s open("") fails with ENOENT, created or not."""
    from qcowfast.output import create_refusal, open_errno
    monkeypatch.chdir(workdir)
    assert open_errno("") == open_errno("", create=False) == errno.ENOENT
    assert create_refusal("") == "Could not create '': No such file or directory"


# -- 4: a NUL byte in a path on the command line --------------------------------------------

IMAGE_NUL = "image path 'a\\x00b' contains a NUL byte, which no file name can hold"
DST_NUL = "destination path 'o\\x00.raw' contains a NUL byte, which no file name can hold"


@pytest.mark.parametrize("argv, status, line", [
    (["check", "a\0b"], 1, IMAGE_NUL), (["check", "-f", "qcow2", "a\0b"], 1, IMAGE_NUL),
    (["check", "--output=json", "a\0b"], 1, IMAGE_NUL),
    (["check", "-r", "leaks", "a\0b"], 1, IMAGE_NUL), (["check", "-T", "none", "a\0b"], 1,
                                                        IMAGE_NUL),
    (["check", "-f", "vmdk", "a\0b"], 1, IMAGE_NUL), (["map", "-f", "vmdk", "a\0b"], 1,
                                                      IMAGE_NUL),
    (["compare", "-f", "vmdk", "a\0b", "IMG"], 2, IMAGE_NUL),
    (["convert", "IMG", "o\0.raw"], 1, DST_NUL), (["convert", "-n", "IMG", "o\0.raw"], 1,
                                                  DST_NUL),
    (["convert", "-O", "qcow2", "IMG", "o\0.raw"], 1, DST_NUL),
    (["convert", "-O", "host_device", "IMG", "o\0.raw"], 1, DST_NUL),
    # the source is opened first, as qemu-img opens it
    (["convert", "a\0b", "o\0.raw"], 1, IMAGE_NUL),
    (["convert", "MISSING", "o\0.raw"], 1, "Could not open 'missing.img': Could not open "
                                           "'missing.img': No such file or directory"),
    (["convert", "-l", "nosuch", "SNAP", "o\0.raw"], 1,
     "Failed to load snapshot: Can't find snapshot"),
], ids=lambda v: " ".join(v).replace("\0", "NUL") if isinstance(v, list) else "")
def test_nul_byte_on_the_command_line(capsys, monkeypatch, workdir, argv, status, line):
    """One line naming the argument (as tests/test_path_edges.py has it for info and
    convert's source), never os's bare "embedded null byte"."""
    monkeypatch.chdir(workdir)
    before = set(workdir.iterdir())
    assert cli(capsys, *[NAMES.get(a, a) for a in argv]) == (status, "", f"qcowfast: {line}\n")
    assert set(workdir.iterdir()) == before


def test_nul_byte_destination_in_the_api(workdir):
    with pytest.raises(UnsafePathError) as info:
        qcowfast.convert(workdir / "img.qcow2", "o\0.raw")
    assert str(info.value) == DST_NUL
    with pytest.raises(UnsafePathError):
        qcowfast.convert(workdir / "img.qcow2", os.fsencode(workdir / "o\0.raw"), format="qcow2")


# -- 5, 6: convert-many agrees with convert ------------------------------------------------

def _outcome(call):
    try:
        call()
    except Exception as exc:                    # noqa: BLE001 - compared
        return type(exc), str(exc)
    return "ok"


def _many(jobs) -> list:
    """convert_many's results as _outcome gives them."""
    return ["ok" if not isinstance(r, Exception) else (type(r), str(r))
            for r in qcowfast.convert_many(jobs)]


def test_convert_many_nul_byte_jobs(workdir, capsys, monkeypatch):
    """A job's NUL byte is that job's UnsafePathError, as convert raises it; the other jobs
    run, and the command line's batch (with --report, which looks at every job's files)
    runs too."""
    monkeypatch.chdir(workdir)
    pairs = [("img.qcow2", "one.raw"), ("a\0b", "two.raw"), ("img.qcow2", "o\0.raw"),
             ("a\0b", "o\0.raw"), ("img.qcow2", "three.raw")]
    try:
        results = _many(pairs)
        for (src, dst), got in zip(pairs, results):
            if "\0" in src + dst:
                want = _outcome(lambda: qcowfast.convert(src, dst))
                assert got == want and got[0] is UnsafePathError, (src, dst, got)
            else:
                assert got == "ok"
        for name in ("one.raw", "three.raw"):
            os.unlink(name)
        jobs = workdir / "jobs.json"
        jobs.write_text("".join(json.dumps({"src": s, "dst": d}) + "\n" for s, d in pairs))
        status, _, err = cli(capsys, "convert-many", "--jobs", jobs, "--report", "rep.json")
        report = json.loads((workdir / "rep.json").read_text())
    finally:
        for name in ("one.raw", "three.raw", "jobs.json", "rep.json"):
            if os.path.exists(name):
                os.unlink(name)
    assert status == 1 and "\0" not in err and "embedded null byte" not in err
    assert [j["status"] for j in report["jobs"]] == ["ok", "failed", "failed", "failed", "ok"]
    lines = [f"FAILED  'a\\x00b' -> 'o\\x00.raw': {DST_NUL}",
             f"FAILED  'a\\x00b' -> two.raw: {IMAGE_NUL}",
             f"FAILED  img.qcow2 -> 'o\\x00.raw': {DST_NUL}"]
    assert sorted(line for line in err.splitlines() if line.startswith("FAILED")) == lines
    assert [j.get("error") for j in report["jobs"]][1:4] == [IMAGE_NUL, DST_NUL, DST_NUL]


SOURCES = ["/dev/null", "/dev/zero", "DIR", "FIFO", "SOCK", "IMG"]
TARGETS = ["/dev/null", "/dev/zero", "/dev/full", "DIR", "SOCK", "OUT"]


@pytest.fixture
def kinds(workdir, monkeypatch):
    """workdir with a FIFO, as the working directory."""
    monkeypatch.chdir(workdir)
    os.mkfifo(workdir / "fifo")
    yield workdir
    os.unlink(workdir / "fifo")


def _name(word: str) -> str:
    return {"FIFO": "fifo", "OUT": "out.raw"}.get(word, NAMES.get(word, word))


def test_convert_many_agrees_with_convert_on_file_kinds(kinds, capsys, tmp_path):
    """For each pair (character devices, a directory, a FIFO, a socket, as source or
    destination; a job writing over its own source among them), convert_many's result is
    what convert raises, and convert-many's line says what `qcowfast convert` says."""
    jobs = tmp_path / "jobs"
    for src in map(_name, SOURCES):
        for dst in map(_name, TARGETS):
            if src == "img.qcow2" and dst == "out.raw":
                continue
            want = _outcome(lambda: qcowfast.convert(src, dst))
            assert _many([(src, dst)]) == [want], (src, dst)
            status, _, line = cli(capsys, "convert", "-q", src, dst)
            jobs.write_text(f"{src} {dst}\n")
            status_many, _, err = cli(capsys, "convert-many", "--jobs", jobs)
            first = err.splitlines()[0]
            if status == 0:
                assert status_many == 0 and first.startswith(f"ok      {src} -> {dst}: "), err
            else:
                assert (status_many, first) == (
                    1, f"FAILED  {src} -> {dst}: {line[len('qcowfast: '):-1]}"), (src, dst)
    assert not os.path.exists("out.raw")


def test_convert_many_own_source_regular_file(kinds, capsys, tmp_path):
    """A job writing over its own source is refused in convert's words, before it runs."""
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1M")
    want = _outcome(lambda: qcowfast.convert(src, src, format="qcow2"))
    assert want[0] is qcowfast.OutputError
    assert _many([(src, src)]) == [want]
    assert _many([{"src": str(src), "dst": str(src), "format": "qcow2"}]) == [want]
