"""Run under the name qemu-img or qemu-nbd (a symlink to the `qcowfast` console script), the
error and warning lines start as that tool's do ("qemu-img: ...", "qemu-nbd: ..."), so that
logs and scripts matching "qemu-img: Could not open" find them; under the name qcowfast they
still start "qcowfast: ".

Each case runs the same failing command line through the real tool and through the symlink, in
a fresh copy of the same files, and compares the exit status and the standard error, where only
argv[0] as run (which getopt names) necessarily differs. The same command line under the name
qcowfast gives qemu's lines with qcowfast's name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import qemu_img, qemu_io
from test_locks import Holder

TIMEOUT = 60
CONSOLE_SCRIPT = Path(sys.executable).with_name("qcowfast")


@pytest.fixture(scope="module")
def links(tmp_path_factory) -> dict:
    """{tool: the symlink named after it}, both to the venv's `qcowfast` console script."""
    assert CONSOLE_SCRIPT.exists(), f"no qcowfast console script beside {sys.executable}"
    d = tmp_path_factory.mktemp("names")
    for tool in ("qemu-img", "qemu-nbd"):
        (d / tool).symlink_to(CONSOLE_SCRIPT)
    return {tool: d / tool for tool in ("qemu-img", "qemu-nbd")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the command lines name: a good qcow2, a raw file, an image whose L1 table
    offset is not cluster-aligned."""
    d = tmp_path_factory.mktemp("files")
    qemu_img("create", "-q", "-f", "qcow2", d / "ok.qcow2", "1M")
    qemu_io(d / "ok.qcow2", "write -P 0x5a 0 64k")
    (d / "notq.raw").write_bytes(b"hello" * 1000)
    data = bytearray((d / "ok.qcow2").read_bytes())
    data[40:48] = (0x30001).to_bytes(8, "big")          # l1_table_offset
    (d / "corrupt.qcow2").write_bytes(bytes(data))
    return d


def _run(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)


def _in_copy(files: Path, tmp: Path, argv) -> subprocess.CompletedProcess:
    """`argv` run in a fresh copy of `files` (what a failed run leaves cannot change the
    next)."""
    cwd = tmp / f"run{len(list(tmp.iterdir()))}"
    shutil.copytree(files, cwd)
    return _run(argv, cwd)


# The qcowfast command as the qemu-nbd cases run it: `python -m qcowfast` (argv[0] its
# __main__.py); the others run the console script.
PYTHON_M = (sys.executable, "-m", "qcowfast")


def _three(tool: str, args, links, files, tmp):
    """(the real tool's run, the symlink's with its argv[0] spelled as the real tool's, the
    qcowfast command's)."""
    real = shutil.which(tool)
    want = _in_copy(files, tmp, [real, *args])
    got = _in_copy(files, tmp, [links[tool], *args])
    got.stderr = got.stderr.replace(str(links[tool]), real)
    qcowfast = [*PYTHON_M, "serve"] if tool == "qemu-nbd" else [CONSOLE_SCRIPT]
    return want, got, _in_copy(files, tmp, [*qcowfast, *args])


# Command lines qemu-img refuses, whose lines qcowfast already had word for word (but for its
# name): now the whole standard error must be qemu-img's.
QEMU_IMG_SAME = {
    "missing file": ["info", "missing.qcow2"],
    "not qcow2 with -f qcow2": ["info", "-f", "qcow2", "notq.raw"],
    "convert source not qcow2": ["convert", "-f", "qcow2", "-O", "qcow2", "notq.raw", "o.qcow2"],
    "bad -O format": ["convert", "-O", "vmdkx", "ok.qcow2", "out.img"],
    "bad -o key": ["convert", "-o", "bogus=1", "-O", "qcow2", "ok.qcow2", "o.qcow2"],
    "unknown option": ["info", "--bogus", "ok.qcow2"],
    "unknown global option (getopt names argv[0])": ["-xy", "info"],
    "unknown command": ["bogus"],
    "no command": [],
    "check of a corrupt image": ["check", "corrupt.qcow2"],
    "check of a raw image (status 63)": ["check", "-f", "raw", "notq.raw"],
    "compare with a missing file (status 2)": ["compare", "ok.qcow2", "missing.qcow2"],
    "convert into a missing directory": ["convert", "-O", "raw", "ok.qcow2", "nodir/o.raw"],
    "snapshot -l of a missing file": ["snapshot", "-l", "missing.qcow2"],
    "measure of a missing file": ["measure", "-O", "qcow2", "missing.qcow2"],
    "bad --output": ["map", "--output=xml", "ok.qcow2"],
    "bad size": ["map", "-s", "abc", "ok.qcow2"],
    "deprecated short-form boolean": ["convert", "-l", "snapshot.id=1,foo", "ok.qcow2",
                                      "o.raw"],
    "warning: hex with a suffix (status 0)": ["measure", "--size", "0x1k", "-O", "raw"],
    "trace events file (location prefix)": ["-T", "events=/nonexistent", "info", "ok.qcow2"],
}


@pytest.mark.parametrize("case", list(QEMU_IMG_SAME))
def test_qemu_img_lines(case, links, files, tmp_path):
    want, got, ours = _three("qemu-img", QEMU_IMG_SAME[case], links, files, tmp_path)
    assert want.stderr.startswith("qemu-img:"), want
    assert (got.returncode, got.stderr) == (want.returncode, want.stderr)
    if not want.returncode:                     # (a warning: the same output as well)
        assert got.stdout == want.stdout
    qcowfast = want.stderr.replace(shutil.which("qemu-img"), "qemu-img").replace(
        "qemu-img", "qcowfast")
    assert (ours.returncode, ours.stderr) == (want.returncode, qcowfast)


# Lines qcowfast words its own way (a feature it lacks): only the name before them follows.
QEMU_IMG_OWN = {
    "check -r (qcowfast does not repair)": ["check", "-r", "all", "ok.qcow2"],
    "a driver qcowfast lacks": ["info", "-f", "vmdk", "ok.qcow2"],
}


@pytest.mark.parametrize("case", list(QEMU_IMG_OWN))
def test_qemu_img_prefix_on_qcowfast_words(case, links, files, tmp_path):
    _, got, ours = _three("qemu-img", QEMU_IMG_OWN[case], links, files, tmp_path)
    assert got.returncode == ours.returncode == 1
    assert got.stderr.startswith("qemu-img: ") and "qcowfast" in got.stderr, got
    assert ours.stderr == "qcowfast: " + got.stderr[len("qemu-img: "):]


def test_qemu_img_locked_images(links, tmp_path):
    """An image a running QEMU writes, as a source and as convert's destination (created or
    written in place): qemu-img's two lines word for word."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "held.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "src.qcow2", "64K")
    writers = [Holder(tmp_path / "held.qcow2", "qcow2")]
    try:
        want = _run(["qemu-img", "info", "held.qcow2"], tmp_path)
        got = _run([links["qemu-img"], "info", "held.qcow2"], tmp_path)
        assert 'Failed to get shared "write" lock' in want.stderr, want
        assert (got.returncode, got.stderr) == (want.returncode, want.stderr)
        # (One held file per run: qemu-img deletes a qcow2 target it failed to create.)
        # (A raw writer shares writing: qemu-img -n writes beside it; a qcow2 one does not.)
        for n, (args, fmt) in enumerate(((["-O", "qcow2"], "raw"),
                                         (["-n", "-O", "raw"], "qcow2"))):
            runs = {}
            for who, tool in (("qemu", "qemu-img"), ("ours", links["qemu-img"])):
                cwd = tmp_path / f"{who}{n}"
                cwd.mkdir()
                qemu_img("create", "-q", "-f", fmt, cwd / "busy.raw", "1M")
                writers.append(Holder(cwd / "busy.raw", fmt))
                runs[who] = _run([tool, "convert", *args, "../src.qcow2", "busy.raw"], cwd)
            want, got = runs["qemu"], runs["ours"]
            assert "Is another process using the image [busy.raw]?" in want.stderr, want
            assert (got.returncode, got.stderr) == (want.returncode, want.stderr), args
    finally:
        for writer in writers:
            writer.close()


# qemu-nbd command lines that fail before serving: (argv, whether qemu-nbd's lines are all its
# own error_report()s, which `qcowfast serve` gives under its own name).
QEMU_NBD = {
    "missing file": (["missing.qcow2"], True),
    "not qcow2 with -f qcow2": (["-f", "qcow2", "notq.raw"], True),
    "bad --cache": (["--cache=bogus", "ok.qcow2"], True),
    "bad -e": (["-e", "x", "ok.qcow2"], True),
    "deprecated short-form boolean": (["-l", "snapshot.id=1,foo", "ok.qcow2"], True),
    "unknown long option": (["--bogus", "ok.qcow2"], False),
    "unknown short option": (["-z", "ok.qcow2"], False),
    "ambiguous option": (["--fo", "ok.qcow2"], False),
    "missing argument": (["ok.qcow2", "-k"], False),
    "missing long argument": (["ok.qcow2", "--socket"], False),
    "no image": ([], False),
    "two images": (["ok.qcow2", "ok.qcow2"], False),
    # (-p is a service for getaddrinfo; its failure comes before the image is opened)
    "unknown service": (["-b", "127.0.0.1", "-p", "abc", "ok.qcow2"], True),
    "negative port": (["-b", "127.0.0.1", "-p", "-1", "ok.qcow2"], True),
    "hex port": (["-b", "127.0.0.1", "--port=0x10", "missing.qcow2"], True),
    "unresolvable address": (["-b", "::zz", "ok.qcow2"], True),
}


@pytest.mark.parametrize("case", list(QEMU_NBD))
def test_qemu_nbd_lines(case, links, files, tmp_path):
    args, own = QEMU_NBD[case]
    want, got, ours = _three("qemu-nbd", args, links, files, tmp_path)
    assert want.returncode == 1 and "qemu-nbd: " in want.stderr, want
    assert (got.returncode, got.stderr) == (want.returncode, want.stderr)
    assert ours.returncode == 1
    if own:
        assert ours.stderr == want.stderr.replace("qemu-nbd: ", "qcowfast: ")
    else:                                       # (argparse's usage, as before)
        assert "qcowfast serve: error: " in ours.stderr and "qemu-nbd" not in ours.stderr


def test_qemu_nbd_prefix_on_qcowfast_words(links, files, tmp_path):
    """An option qcowfast serve refuses by name (a kernel NBD device): its words, after the
    name it runs under."""
    _, got, ours = _three("qemu-nbd", ["-c", "/dev/nbd0", "ok.qcow2"], links, files, tmp_path)
    assert got.returncode == ours.returncode == 1
    assert got.stderr.startswith("qemu-nbd: serve -c: not supported"), got
    assert ours.stderr == "qcowfast: " + got.stderr[len("qemu-nbd: "):]


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_qemu_nbd_serves_without_a_word(links, files, tmp_path, verbose):
    """Serving, qemu-nbd prints nothing, with -v or without; under its name neither does
    qcowfast serve (it printed "qemu-nbd: serving ... on ..."). Under its own name it still
    says where it serves. Each server ends when its one client (nbdinfo) has gone (no -t)."""
    runs = {"qemu-nbd": ["qemu-nbd"], "link": [links["qemu-nbd"]],
            "qcowfast": [CONSOLE_SCRIPT, "serve"]}
    for label, tool in runs.items():
        sock = tmp_path / f"{label}.sock"
        proc = subprocess.Popen([str(a) for a in (*tool, *verbose, "-r", "-k", sock,
                                                  files / "ok.qcow2")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            for _ in range(300):
                if sock.exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            size = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                                  capture_output=True, text=True, timeout=TIMEOUT)
            assert size.stdout == "1048576\n", (label, size)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, (label, err)
        if label == "qcowfast":
            assert err.startswith("qcowfast: serving "), err
        else:
            assert (out, err) == ("", ""), (label, out, err)
