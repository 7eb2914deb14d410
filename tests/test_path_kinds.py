"""The kinds of file a name can reach, and names no file has, against qemu-img 7.2.

* A backing or external data file name that reaches a socket (or an image named on the
  command line that is one): qemu-img's file driver fails to open it (ENXIO), and every
  command says what qemu-img says, with its exit code. The Python API keeps its own class and
  words.
* One that reaches a FIFO (qemu-img waits in open(2) for a writer) or a character device
  (qemu-img reads /dev/null through its host_device driver): qcowfast still refuses it, in its
  own words, and never opens the FIFO.
* An empty image name is ImageNotFound (errno ENOENT, as os.open("") gives) in the API, and
  carries qemu-img's words for the command line.
* A NUL byte in a name never appears raw in a message (check(), convert-many).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

import qcowfast
from qcowfast import FormatError, ImageNotFound, MissingBackingFile, UnsafePathError
from qcowfast.paths import open_file

from common import cli_in_process, qemu_img

OWN_WORDS = "not a regular file; qcowfast follows only regular files named in an image"
# The commands that open the whole chain; "@" is the image, OTHER a plain image, OUT an output.
COMMANDS = [("info", "--backing-chain"), ("info", "--backing-chain", "--output=json"),
            ("convert", "-O", "raw", "@", "OUT"), ("convert", "-O", "qcow2", "@", "OUT"),
            ("map", "--output=json"), ("check",), ("compare", "@", "OTHER"),
            ("compare", "OTHER", "@"), ("measure", "-O", "qcow2")]


def _socket(path: Path) -> None:
    """A Unix socket file at `path`, no one listening (bound from its directory: a socket's
    name is short)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(here)


def _qemu(*args, cwd, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(os.fspath, args)], cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def _argv(command, image: str, other: str) -> list[str]:
    args = [{"@": image, "OUT": "out.img", "OTHER": other}.get(a, a) for a in command]
    return args if "@" in command else [*args, image]


@pytest.fixture
def kinds(tmp_path):
    """d/ holding a socket, a FIFO, a symlink to /dev/null and one to the socket; images naming
    each as their backing file (top-KIND.qcow2; two.qcow2 over top-sock.qcow2) and as their
    external data file (data-KIND.qcow2), and plain.qcow2."""
    d = tmp_path / "d"
    d.mkdir()
    _socket(d / "sock")
    os.mkfifo(d / "fifo")
    os.symlink("/dev/null", d / "null")
    os.symlink("sock", d / "lsock")
    for kind in ("sock", "lsock", "fifo", "null"):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", kind, "-F", "raw",
                 d / f"top-{kind}.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "top-sock.qcow2", "-F", "qcow2",
             d / "two.qcow2", "1M")
    for kind in ("sock", "fifo", "null"):
        data = f"data-{kind}.raw"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", f"data-{kind}.qcow2",
                 "1M", cwd=d)
        os.unlink(d / data)
        {"sock": _socket, "fifo": os.mkfifo,
         "null": lambda p: os.symlink("/dev/null", p)}[kind](d / data)
    qemu_img("create", "-q", "-f", "qcow2", d / "plain.qcow2", "1M")
    assert stat.S_ISSOCK(os.stat(d / "sock").st_mode)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Sockets: qemu-img's words


@pytest.mark.parametrize("name", ["top-sock", "top-lsock", "two", "data-sock", "sock"])
def test_socket_in_qemu_img_words(kinds, monkeypatch, capsys, name):
    """qemu-img's open(2) of the socket fails ("Could not open 'd/sock': No such device or
    address"), under each layer's "Could not open backing file: ": the same line and exit code
    from every command that opens the chain, for a name reaching the socket through a symlink
    too, one layer down, as an external data file (from d/: qemu-img 7.2 finds a relative
    data file name from the working directory), and for the socket named as the image."""
    data = name.startswith("data")
    where, prefix = (kinds / "d", "") if data else (kinds, "d/")
    monkeypatch.chdir(where)
    image = f"{prefix}{name}" + ("" if name == "sock" else ".qcow2")
    for command in COMMANDS:
        args = _argv(command, image, f"{prefix}plain.qcow2")
        want = _qemu(*args, cwd=where)
        if want.returncode == 0:                # (info of a data-file image opens no data)
            assert data and command[0] == "info", want
            assert cli_in_process(capsys, *args)[0] == 0
            continue
        assert "No such device or address" in want.stderr and want.stdout == "", want
        got = cli_in_process(capsys, *args)
        assert got == (want.returncode, "", want.stderr.replace("qemu-img: ", "qcowfast: ", 1)
                       ), (args, want.stderr, got)
        assert not (where / "out.img").exists()
    # The Python API keeps its own words and class.
    if name == "sock":
        with pytest.raises(FormatError) as refused:
            qcowfast.open(image)
        assert str(refused.value) == f"image {image} is a socket, not a regular file or " \
                                     "block device"
    else:
        with pytest.raises(UnsafePathError) as refused:
            qcowfast.open(image)
        assert str(refused.value).endswith(f" is a socket, {OWN_WORDS}"), str(refused.value)


# --------------------------------------------------------------------------------------------
# FIFOs and character devices: qcowfast's words (qemu-img waits, or reads on)


@pytest.fixture
def fifo_opens(monkeypatch):
    """The names of the FIFOs opened by os.open for anything but O_PATH (a look, not a read)."""
    real, seen = os.open, []

    def watching(path, flags, mode=0o777, *, dir_fd=None):
        fd = real(path, flags, mode, dir_fd=dir_fd)
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and not flags & getattr(os, "O_PATH", 0):
            seen.append(path)
        return fd
    monkeypatch.setattr(os, "open", watching)
    return seen


@pytest.mark.parametrize("name", ["top-fifo", "top-null", "data-fifo", "data-null"])
def test_fifo_and_character_device_keep_qcowfast_words(kinds, monkeypatch, capsys,
                                                        fifo_opens, name):
    """qemu-img waits for a writer on the FIFO (no line to match) and reads /dev/null as an
    empty device: qcowfast refuses both, in its own words (exit 1; compare 2), and opens the
    FIFO for no read."""
    monkeypatch.chdir(kinds / "d")
    image, data = f"{name}.qcow2", name.startswith("data")
    kind = name.split("-")[1]
    if kind == "fifo":
        with pytest.raises(subprocess.TimeoutExpired):
            _qemu("convert", "-O", "raw", image, "out.img", cwd=kinds / "d", timeout=3)
    else:
        assert _qemu("convert", "-O", "raw", image, "out.img", cwd=kinds / "d").returncode == 0
        os.unlink(kinds / "d" / "out.img")
    what = "external data file" if data else "backing file"
    target = f"data-{kind}.raw" if data else kind
    refusal = (f"{what} {target} of {image} is "
               f"{'a FIFO' if kind == 'fifo' else 'a character device'}, {OWN_WORDS}")
    for command in COMMANDS:
        args = _argv(command, image, "plain.qcow2")
        got = cli_in_process(capsys, *args)
        if data and command[0] == "info":       # (info opens no data file, as qemu-img's)
            assert got[0] == 0, (args, got)
            continue
        line = f"Could not open '{image}': {refusal}" if command[0] == "check" else refusal
        assert got == (2 if command[0] == "compare" else 1, "", f"qcowfast: {line}\n"), args
        assert not (kinds / "d" / "out.img").exists()
    assert fifo_opens == []


# --------------------------------------------------------------------------------------------
# An empty image name


def test_empty_image_name_in_the_api(kinds, monkeypatch):
    """Every entry point refuses "" as a missing image (ImageNotFound, ENOENT), saying the name
    is empty (it used to look up ".": "image  is a directory"); the error carries qemu-img's
    line for the command line."""
    d = kinds / "d"
    monkeypatch.chdir(d)
    plain = "plain.qcow2"
    empty = "image path is empty: no file has an empty name"
    cases = [(lambda: qcowfast.open(""), empty), (lambda: qcowfast.open(b""), empty),
             (lambda: open_file(""), empty), (lambda: qcowfast.info(""), empty),
             (lambda: qcowfast.info("", backing_chain=True), empty),
             (lambda: qcowfast.convert("", d / "o.raw"), empty),
             (lambda: qcowfast.compare("", plain), empty),
             (lambda: qcowfast.compare(plain, ""), empty),
             (lambda: qcowfast.measure("", format="qcow2"), empty),
             (lambda: qcowfast.check(""), f"Could not open '': {empty}")]
    want = _qemu("info", "", cwd=d)
    assert (want.returncode, want.stdout) == (1, ""), want
    for i, (call, message) in enumerate(cases):
        with pytest.raises(ImageNotFound) as refused:
            call()
        exc = refused.value
        assert (str(exc), exc.errno, exc.filename) == (message, errno.ENOENT, ""), i
        assert f"qemu-img: Could not open '{exc.qemu_top}': {exc.qemu_chain}\n" == \
            want.stderr, (i, want.stderr)
    assert not (d / "o.raw").exists()
    # An explicit backing file named "" is a missing file of the chain.
    with pytest.raises(MissingBackingFile) as refused:
        qcowfast.open(plain, backing="")
    assert str(refused.value) == f"backing file path of {plain} is empty: no file has an " \
                                 "empty name"


def test_empty_image_name_on_the_command_line(kinds, monkeypatch, capsys):
    """qemu-img: "Could not open '': The 'file' block driver requires a file name" (exit 1,
    compare 2), whichever operand is empty."""
    d = kinds / "d"
    monkeypatch.chdir(d)
    for command in [("info",), ("info", "--output=json"), *COMMANDS]:
        args = _argv(command, "", "plain.qcow2")
        want = _qemu(*args, cwd=d)
        assert "The 'file' block driver requires a file name" in want.stderr, (args, want)
        got = cli_in_process(capsys, *args)
        assert got == (want.returncode, "", want.stderr.replace("qemu-img: ", "qcowfast: ", 1)
                       ), (args, want.stderr, got)
    assert not (d / "out.img").exists()


# --------------------------------------------------------------------------------------------
# NUL bytes never shown raw


def test_check_shows_a_nul_byte_escaped(tmp_path):
    """check() refuses an image name with a NUL byte as every entry point does, with the name
    escaped; it used to prefix "Could not open 'NAME': " with the raw name."""
    bad = str(tmp_path / "a\0b")
    for name in (bad, os.fsencode(bad), Path(bad)):
        with pytest.raises(UnsafePathError) as refused:
            qcowfast.check(name)
        assert str(refused.value) == f"image path {bad!r} contains a NUL byte, which no file " \
                                     "name can hold"
        assert "\0" not in str(refused.value)


def test_convert_many_names_with_a_nul_byte(tmp_path, monkeypatch, capsys):
    """convert-many refuses a NUL byte in a file option under its own name (exit 1, nothing
    written; --allow-backing-dir's used to end as "qcowfast: ..."), and a job's line shows
    such a source escaped. (A real argv cannot hold a NUL byte; main() called from Python
    can.)"""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "raw", "base.raw", "64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "1M")
    out = tmp_path / "out"
    out.mkdir()
    for option, what in (("--allow-backing-dir", "--allow-backing-dir (backing_dirs=) was "
                          "given a directory name"), ("--target-dir", "--target-dir was given "
                                                      "a name"),
                         ("--jobs", "--jobs was given a name"),
                         ("--report", "--report was given a name")):
        args = ["convert-many", option, "a\0b"]
        if option != "--jobs":
            args += [] if option == "--target-dir" else ["--target-dir", out]
            args.append("top.qcow2")
        want = f"qcowfast convert-many: {what} with a NUL byte ('a\\x00b'), which no file " \
               "name can hold\n"
        assert cli_in_process(capsys, *args) == (1, "", want), option
    assert os.listdir(out) == []
    src, dst = "x\0y.qcow2", os.path.join(out, "x\0y.raw")
    status, _, err = cli_in_process(capsys, "convert-many", "--target-dir", out, src)
    assert status == 1 and "\0" not in err, err
    assert err.startswith(f"FAILED  {src!r} -> {dst!r}: "), err
    assert os.listdir(out) == []
    # Without the NUL byte, the same batch runs.
    status, _, err = cli_in_process(capsys, "convert-many", "-q", "--allow-backing-dir", ".",
                                    "--target-dir", out, "top.qcow2")
    assert (status, err) == (0, "") and os.listdir(out) == ["top.raw"]
