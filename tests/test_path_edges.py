"""Edge cases of the path policy (paths.py) left by the red team's sweep.

* A NUL byte in a path argument (the image, backing=, data_file=, backing_dirs= /
  --allow-backing-dir) is refused as an UnsafePathError naming the argument, never os's bare
  "embedded null byte" ValueError.
* A name refused as outside shows the real path it reaches, also past PATH_MAX (4096), where
  /proc/self/fd names no path; a path whose start cannot be read says it is cut.
* A backing or data file name that reaches a directory fails on the command line in
  qemu-img's words and with its exit code.
* A backing file name with a protocol prefix qemu-img does not know ("base:1.qcow2") fails on
  the command line in qemu-img's words ("Unknown protocol 'base'"); an external data file's
  name is never parsed for a protocol: QEMU opens "d:1.raw" as a file of that name, from the
  working directory, and so does qcowfast (under the path policy).
* Relative allowed directories are resolved once, when the open starts: a chdir() between two
  layers of a chain moves none of them.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

import qcowfast
from qcowfast import UnsafePathError

from common import assert_same_bytes, cli_in_process, qemu_img, qemu_io, run_cli

image_module, info_module, paths_module = (
    importlib.import_module(f"qcowfast.{name}") for name in ("image", "info", "paths"))
K = 1024
MINE, OWN, OTHER = 0x11, 0x22, 0x99
LONG = "p" * 99                         # one directory name of the deep trees


def _raw(path: Path, fill: int) -> Path:
    qemu_img("create", "-q", "-f", "raw", path, "64k")
    qemu_io(path, f"write -P {fill:#x} 0 64k", fmt="raw")
    return path


def _top(path: Path, backing: str, fmt: str = "raw", write: bool = True) -> Path:
    """A 1 MiB qcow2 image naming `backing` (unchecked), with 4 KiB of its own at 512 KiB
    when `write`."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")
    if write:
        qemu_io(path, f"write -P {OWN:#x} 512k 4k")
    return path


def _qemu(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(os.fspath, args)], cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def _qemu_raw(src: Path, out: Path) -> bytes:
    qemu_img("convert", "-O", "raw", src, out)
    return out.read_bytes()


def _read(path, **kw) -> bytes:
    with qcowfast.open(path, **kw) as img:
        return img.read(0, img.virtual_size)


# --------------------------------------------------------------------------------------------
# NUL bytes in path arguments


@pytest.fixture
def chain(tmp_path):
    """(top.qcow2 naming base.raw beside it, data.qcow2 with an external data file, out/)."""
    _raw(tmp_path / "base.raw", MINE)
    top = _top(tmp_path / "top.qcow2", "base.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "1M",
             cwd=tmp_path)
    (tmp_path / "out").mkdir()
    return top, tmp_path / "data.qcow2", tmp_path / "out"


def test_nul_byte_in_a_path_argument(chain, tmp_path):
    """Each path argument holding a NUL byte is an UnsafePathError naming that argument, in
    every entry point (os itself says only "embedded null byte", a bare ValueError)."""
    top, data, out = chain
    bad = str(tmp_path / "a\0b")
    image = f"image path {bad!r} contains a NUL byte, which no file name can hold"
    allow = (f"--allow-backing-dir (backing_dirs=) was given a directory name with a NUL "
             f"byte ({bad!r}), which no file name can hold")
    cases = [
        (lambda: qcowfast.open(bad), image),
        (lambda: qcowfast.open(os.fsencode(bad)), image),
        (lambda: qcowfast.info(bad), image),
        (lambda: qcowfast.convert(bad, out / "o.raw"), image),
        (lambda: qcowfast.compare(top, bad), image),
        (lambda: qcowfast.open(top, backing=bad),
         f"backing file path {bad!r} of {top} contains a NUL byte, which no file name can "
         "hold"),
        (lambda: qcowfast.open(data, data_file=bad),
         f"external data file path {bad!r} of {data} contains a NUL byte, which no file name "
         "can hold"),
        (lambda: qcowfast.open(top, backing_dirs=[tmp_path, bad]), allow),
        (lambda: qcowfast.open(top, backing_dirs=os.fsencode(bad)), allow),
        (lambda: qcowfast.info(top, backing_chain=True, backing_dirs=[bad]), allow),
        # (check words every failure to open as qemu-img check does)
        (lambda: qcowfast.check(top, backing_dirs=[bad]), f"Could not open '{top}': {allow}"),
        (lambda: qcowfast.compare(top, top, backing_dirs=[bad]), allow),
        (lambda: qcowfast.convert(top, out / "o.raw", backing_dirs=[bad]), allow),
    ]
    for i, (call, message) in enumerate(cases):
        with pytest.raises(UnsafePathError) as refused:
            call()
        assert str(refused.value) == message, (i, str(refused.value))
    assert os.listdir(out) == []
    # Without the NUL byte, the same calls read what qemu-img reads.
    want = _qemu_raw(top, tmp_path / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN
    assert_same_bytes(_read(top, backing_dirs=[tmp_path]), want, "backing_dirs=[tmp_path]")


def test_nul_byte_on_the_command_line(chain, tmp_path, monkeypatch, capsys):
    """The command line says the same in one line (exit 1, as qemu-img's open failures).
    (A real argv cannot hold a NUL byte; main() called from Python can.)"""
    top, _, out = chain
    monkeypatch.chdir(tmp_path)
    allow = ("qcowfast: --allow-backing-dir (backing_dirs=) was given a directory name with a "
             "NUL byte ('a\\x00b'), which no file name can hold\n")
    image = "qcowfast: image path 'a\\x00b' contains a NUL byte, which no file name can hold\n"
    for args, err in [
            (["info", "--allow-backing-dir", "a\0b", top], allow),
            (["map", "--allow-backing-dir", "a\0b", top], allow),
            (["convert", "-O", "raw", "--allow-backing-dir", "a\0b", top, out / "o.raw"], allow),
            (["info", "a\0b"], image),
            (["convert", "-O", "raw", "a\0b", out / "o.raw"], image)]:
        assert cli_in_process(capsys, *args) == (1, "", err), args
    assert os.listdir(out) == []
    want = _qemu_raw(top, tmp_path / "want.raw")
    status, _, err = cli_in_process(capsys, "convert", "-q", "-O", "raw", "--allow-backing-dir",
                                    ".", top, out / "o.raw")
    assert (status, err) == (0, "")
    assert_same_bytes((out / "o.raw").read_bytes(), want, "--allow-backing-dir .")


# --------------------------------------------------------------------------------------------
# Real paths longer than PATH_MAX


def _deep_tree(root: Path, levels: int) -> Path:
    """root/deep/LONG/.../LONG (`levels` of them), made through directory descriptors (no
    path of PATH_MAX bytes is ever looked up, no chdir); returns the deep path (longer than
    the kernel takes in one name)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("deep", *[LONG] * levels):
            os.mkdir(name, dir_fd=fd)
            down = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = down
    finally:
        os.close(fd)
    return root.joinpath("deep", *[LONG] * levels)


def _hops(link: Path, target: Path, below: Path) -> Path:
    """Symlinks from `link` to `target` (a directory below `below`), each target shorter
    than a symlink may be: `link` -> 30 levels down, there `more` -> the rest. Returns the
    short path (through the links) of `target`."""
    parts = target.relative_to(below).parts
    first, rest = parts[:30], parts[30:]
    os.symlink(os.path.relpath(below, link.parent) + "/" + "/".join(first), link)
    fd = os.open(link, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.symlink("/".join(rest), "more", dir_fd=fd)
    finally:
        os.close(fd)
    return link / "more"


def _write_raw(short: Path, fill: int) -> None:
    """A 64 KiB raw file at `short` (a path through symlinks: short enough to name)."""
    with open(short, "wb") as f:
        f.write(bytes([fill]) * 64 * K)


@pytest.fixture
def deep(tmp_path):
    """(img/, the deep directory (> PATH_MAX), img/hop/more: a short path to it)."""
    img = tmp_path / "img"
    img.mkdir()
    target = _deep_tree(tmp_path, 45)
    assert len(str(target)) > 4096
    return img, target, _hops(img / "hop", target, tmp_path / "deep")


def test_outside_message_shows_the_real_path_past_path_max(deep, tmp_path, capsys):
    """img/top.qcow2 names hop/more/base.raw, whose real path (through the links) is longer
    than PATH_MAX: the refusal shows that real path, not the name joined to img/."""
    img, target, short = deep
    _write_raw(short / "base.raw", MINE)
    top = _top(img / "top.qcow2", "hop/more/base.raw")
    real = f"{target}/base.raw"
    with pytest.raises(UnsafePathError) as refused:
        qcowfast.open(top)
    assert str(refused.value) == (
        f"backing file 'hop/more/base.raw' named in {top} resolves outside the image's "
        f"directory {img} (it is {real}); qcowfast does not follow it by default; pass "
        "backing_dirs=[DIR] (command line: --allow-backing-dir DIR) or name the file "
        "explicitly with backing=PATH")
    status, out, err = cli_in_process(capsys, "info", "--backing-chain", top)
    assert (status, out) == (1, "") and f"(it is {real});" in err, err[-300:]
    # Allowed (by its short name), it is the file qemu-img reads.
    want = _qemu_raw(top, tmp_path / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN
    assert_same_bytes(_read(top, backing_dirs=[short]), want, "allowed deep directory")


def test_outside_message_of_a_deep_image(deep, tmp_path):
    """An image whose own directory is past PATH_MAX (reached through the links) naming
    ../side/base.raw: the message names both real directories."""
    img, target, short = deep
    os.mkdir(short / ".." / "side")
    _write_raw(short / ".." / "side" / "base.raw", MINE)
    top = _top(short / "top.qcow2", "../side/base.raw")
    real = f"{target.parent}/side/base.raw"
    with pytest.raises(UnsafePathError) as refused:
        qcowfast.open(top)
    assert f"resolves outside the image's directory {target} (it is {real}); " in \
        str(refused.value), str(refused.value)[-600:]
    want = _qemu_raw(top, tmp_path / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN
    assert_same_bytes(_read(top, backing_dirs=[short / ".."]), want, "allowed parent")


def test_a_path_whose_start_cannot_be_read_says_it_is_cut(deep, monkeypatch):
    """Where a directory above cannot be listed (a PermissionError, simulated: tests run as
    root), the message shows the names found below it and says the path is cut."""
    img, target, short = deep
    _write_raw(short / "base.raw", MINE)
    top = _top(img / "top.qcow2", "hop/more/base.raw")
    original, calls = paths_module._name_in, []

    def listed_twice(up, st):
        calls.append(st)
        if len(calls) > 2:
            raise PermissionError(13, "Permission denied")
        return original(up, st)
    monkeypatch.setattr(paths_module, "_name_in", listed_twice)
    with pytest.raises(UnsafePathError) as refused:
        qcowfast.open(top)
    assert f"(it is .../{LONG}/{LONG}/base.raw (the start of a path longer than PATH_MAX; a " \
           "directory above it cannot be listed)); " in str(refused.value), str(refused.value)


# --------------------------------------------------------------------------------------------
# A backing or data file name that reaches a directory


COMMANDS = [("info", "--backing-chain"), ("info", "--backing-chain", "--output=json"),
            ("convert", "-O", "raw", "@", "OUT"), ("convert", "-O", "qcow2", "@", "OUT"),
            ("map", "--output=json"), ("check",), ("compare", "@", "other.qcow2"),
            ("measure", "-O", "qcow2")]


@pytest.fixture
def dir_images(tmp_path):
    """d/sub/ (a directory) and images naming it: as a backing file (qcow2, raw, through a
    symlink, "sub/", one layer down), and as an external data file."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    os.symlink("sub", d / "lnk")
    for name, backing, fmt in (("qcow2", "sub", "qcow2"), ("raw", "sub", "raw"),
                               ("lnk", "lnk", "raw"), ("slash", "sub/", "raw"),
                               ("two", "qcow2.qcow2", "qcow2")):
        _top(d / f"{name}.qcow2", backing, fmt, write=False)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "1M",
             cwd=d)
    os.unlink(d / "data.raw")
    os.mkdir(d / "data.raw")
    qemu_img("create", "-q", "-f", "qcow2", d / "other.qcow2", "1M")
    return tmp_path


@pytest.mark.parametrize("name", ["qcow2", "raw", "lnk", "slash", "two", "data"])
def test_name_reaching_a_directory_in_qemu_img_words(dir_images, monkeypatch, capsys, name):
    """qemu-img's file driver refuses the directory ("'file' driver requires 'd/sub' to be a
    regular file"), under each layer's "Could not open backing file: ": the same line and
    exit code from every command that opens the chain. Run from the parent of d/, so names
    carry a directory; the data file's from d/ (qemu-img 7.2 finds a relative data file name
    from the working directory)."""
    where, prefix = (dir_images / "d", "") if name == "data" else (dir_images, "d/")
    monkeypatch.chdir(where)
    image = f"{prefix}{name}.qcow2"
    for command in COMMANDS:
        args = [a.replace("@", image).replace("OUT", "out.img").replace(
            "other.qcow2", f"{prefix}other.qcow2") for a in command]
        if "@" not in command:
            args.append(image)
        want = _qemu(*args, cwd=where)
        if want.returncode == 0:                # (info of a data-file image opens no data)
            assert name == "data" and command[0] == "info", want
            continue
        assert "' driver requires '" in want.stderr and want.stdout == "", want
        got = cli_in_process(capsys, *args)
        assert got == (want.returncode, "", want.stderr.replace("qemu-img: ", "qcowfast: ", 1)
                       ), (args, want.stderr, got)
        assert not (where / "out.img").exists()
    # The Python API keeps its own words and class.
    with pytest.raises(UnsafePathError, match="is a directory, not a regular file"):
        qcowfast.open(image)


# --------------------------------------------------------------------------------------------
# Relative allowed directories and chdir() during an open


@pytest.fixture
def rel_chain(tmp_path):
    """img/top.qcow2 -> ../A/rel/mid.qcow2 -> ../rel2/base.raw (A/rel2), plus B/rel and
    B/rel2 (B/rel2/base.raw holds other bytes) and A/rel/evil.qcow2 naming
    ../../B/rel2/base.raw. From A, backing_dirs=["rel", "rel2"] allows the first chain; from
    B the same names mean B's directories."""
    for d in ("img", "A/rel", "A/rel2", "B/rel", "B/rel2"):
        (tmp_path / d).mkdir(parents=True)
    _raw(tmp_path / "A/rel2/base.raw", MINE)
    _raw(tmp_path / "B/rel2/base.raw", OTHER)
    _top(tmp_path / "A/rel/mid.qcow2", "../rel2/base.raw")
    _top(tmp_path / "A/rel/evil.qcow2", "../../B/rel2/base.raw")
    return tmp_path


def _chdir_before_layer(monkeypatch, module, layer: int, where: Path) -> list:
    """Wrap `module.resolve_reference` so that the working directory becomes `where` just
    before the name of chain layer `layer` (1: the top's backing file) resolves; returns the
    allowed directories each call was given, as (name, (st_dev, st_ino))."""
    original, seen = module.resolve_reference, []

    def moving(image, name, what, allowed=()):
        if len(seen) + 1 == layer:
            os.chdir(where)
        seen.append([(str(d), getattr(d, "ident", None)) for d in allowed])
        return original(image, name, what, allowed)
    monkeypatch.setattr(module, "resolve_reference", moving)
    return seen


def _open_or_info(api: str, path: Path, **kw):
    """open() and read the whole image, or info(backing_chain=True)."""
    if api == "open":
        return _read(path, **kw)
    return json.loads(json.dumps(qcowfast.info(path, backing_chain=True, **kw)))


@pytest.mark.parametrize("api", ["open", "info"])
@pytest.mark.parametrize("case", ["stays-allowed", "stays-refused"])
def test_relative_allowed_dirs_resolved_once(rel_chain, monkeypatch, api, case):
    """A chdir() to B between the two layers (as another thread might) neither drops A/rel2
    (top.qcow2 reads as qemu-img reads it, info is qemu-img's) nor lets B/rel2 in
    (evil.qcow2's base stays refused, in the words it gets without the chdir): each layer
    is given the directories resolved in A when the open started."""
    root = rel_chain
    allowed = ["rel", "rel2"]
    ident = {d: (os.stat(root / "A" / d).st_dev, os.stat(root / "A" / d).st_ino)
             for d in allowed}
    if case == "stays-allowed":
        top = _top(root / "img/top.qcow2", "../A/rel/mid.qcow2", "qcow2")
        want = (_qemu_raw(top, root / "want.raw") if api == "open" else json.loads(
            qemu_img("info", "--backing-chain", "--output=json", top).stdout))
    else:
        top = _top(root / "img/evil-top.qcow2", "../A/rel/evil.qcow2", "qcow2")
    monkeypatch.chdir(root / "A")
    try:
        if case == "stays-refused":
            with pytest.raises(UnsafePathError) as unmoved:
                _open_or_info(api, top, backing_dirs=allowed)
            assert f"(it is {root}/B/rel2/base.raw)" in str(unmoved.value)
        module = image_module if api == "open" else info_module
        seen = _chdir_before_layer(monkeypatch, module, 2, root / "B")
        if case == "stays-allowed":
            got = _open_or_info(api, top, backing_dirs=allowed)
            if api == "open":
                assert want[0] == MINE and want[512 * K] == OWN
                assert_same_bytes(got, want, "chdir between layers")
            else:
                assert got == want
        else:
            with pytest.raises(UnsafePathError) as moved:
                _open_or_info(api, top, backing_dirs=allowed)
            assert str(moved.value) == str(unmoved.value)
        assert os.getcwd() == str(root / "B")           # (the hook ran)
        assert seen == [[(d, ident[d]) for d in allowed]] * 2, seen
    finally:
        os.chdir(root)
    # Resolved names stay plain names for another process (an identity is this host's).
    sent = pickle.loads(pickle.dumps(paths_module.directories(["rel"])))
    assert sent == ("rel",) and type(sent[0]) is str


# --------------------------------------------------------------------------------------------
# Names with a colon before any slash


@pytest.mark.parametrize("command", ["map", "check", "convert", "compare", "info-chain"])
def test_unknown_protocol_of_a_backing_name_in_qemu_img_words(tmp_path, monkeypatch, capsys,
                                                               command):
    _raw(tmp_path / "base:1.qcow2", MINE)       # (a file of that name exists: never read)
    _top(tmp_path / "proto.qcow2", "base:1.qcow2", write=False)
    args = {"map": ["map", "proto.qcow2"], "check": ["check", "proto.qcow2"],
            "convert": ["convert", "-O", "raw", "proto.qcow2", "o.raw"],
            "compare": ["compare", "proto.qcow2", "base:1.qcow2"],
            "info-chain": ["info", "--backing-chain", "proto.qcow2"]}[command]
    qemu = _qemu(*args, cwd=tmp_path)
    assert "Unknown protocol 'base'" in qemu.stderr, qemu.stderr
    monkeypatch.chdir(tmp_path)
    status, out, err = cli_in_process(capsys, *args)
    assert (status, out, err.replace("qcowfast:", "qemu-img:", 1)) == \
        (qemu.returncode, qemu.stdout, qemu.stderr)
    assert not (tmp_path / "o.raw").exists()
    with pytest.raises(UnsafePathError, match="uses a protocol"):
        qcowfast.open(tmp_path / "proto.qcow2")


def test_known_protocol_of_a_backing_name_stays_refused(tmp_path, monkeypatch, capsys):
    """qemu-img would connect (nbd:) or open another file (file:): qcowfast refuses in its
    own words, saying how to store a plain name."""
    _raw(tmp_path / "base.raw", MINE)
    for name in ("nbd:localhost:1", "file:base.raw", "json:{}"):
        _top(tmp_path / "t.qcow2", name, write=False)
        monkeypatch.chdir(tmp_path)
        status, _, err = cli_in_process(capsys, "map", "t.qcow2")
        assert status == 1 and "never follows" in err and "qemu-img rebase -u" in err, err


@pytest.mark.parametrize("name", ["d:1.raw", "file:d.raw"])
def test_data_file_name_with_a_colon_is_a_file(tmp_path, name):
    """The image's data lies in a data file named `name` (qemu-img amend stores it): read from
    the image's directory it gives qemu-img's bytes. Like any relative data-file name it
    resolves from the image's directory (README: Differences), and a batch refuses to write
    over it."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=plain.raw", "img.qcow2", "1M",
             cwd=tmp_path)
    qemu_io("img.qcow2", f"write -P {OWN:#x} 64k 128k", cwd=tmp_path)
    qemu_img("amend", "-f", "qcow2", "-o", f"data_file={name}", "img.qcow2", cwd=tmp_path)
    os.rename(tmp_path / "plain.raw", tmp_path / name)
    want = _qemu("convert", "-O", "raw", "img.qcow2", "want.raw", cwd=tmp_path)
    assert want.returncode == 0, want.stderr
    expected = (tmp_path / "want.raw").read_bytes()
    assert expected[64 * K:192 * K] == bytes([OWN]) * 128 * K
    for cwd in (tmp_path, tmp_path / "want.raw.d"):
        cwd.mkdir(exist_ok=True)
        proc = run_cli("convert", "-O", "raw", tmp_path / "img.qcow2", "got.raw", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert (cwd / "got.raw").read_bytes() == expected
    assert _read(tmp_path / "img.qcow2") == expected
    results = qcowfast.convert_many([(tmp_path / "img.qcow2", tmp_path / name)])
    assert isinstance(results[0], qcowfast.OutputError), results
    assert "refusing to write over it" in str(results[0])
    assert _read(tmp_path / "img.qcow2") == expected
