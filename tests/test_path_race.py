"""Names stored in an image resolve from the directory the image was reached in, even when a
symlink in the image's path is repointed after the image was opened.

`attacker/top.qcow2` names `passwd`; `x` is a symlink to `attacker`; `secret/` (which the image
may not reach) holds a `passwd` of its own. Each test opens `x/top.qcow2` with
`resolve_reference` wrapped so that `x` is repointed to `secret` right before the name is
resolved: the worst moment of the race the red team won by flipping `x` in a loop. The file
read must be the one qemu-img reads when nothing flips (or the same "missing" refusal), never
`secret`'s. Also here: empty `--allow-backing-dir` entries, a backing file whose real path is
longer than PATH_MAX, the descriptors a chain holds, and info's loop message.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import qcowfast
from qcowfast import MissingBackingFile

from common import assert_same_bytes, cli_in_process, qemu_img, qemu_io

# (qcowfast.info is the function: its module is reached by name)
image_module, info_module, paths_module = (
    importlib.import_module(f"qcowfast.{name}") for name in ("image", "info", "paths"))
K = 1024
MINE, SECRET, OWN = 0x11, 0x99, 0x22


def _raw(path: Path, fill: int, size: str = "64k") -> Path:
    qemu_img("create", "-q", "-f", "raw", path, size)
    qemu_io(path, f"write -P {fill:#x} 0 {size}", fmt="raw")
    return path


def _repoint(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _flip_before(monkeypatch, module, link: Path, target: str) -> list:
    """Wrap `module.resolve_reference` so that `link` points at `target` when it runs; returns
    the list of calls made (so a test can tell the wrapper ran)."""
    original, calls = module.resolve_reference, []

    def flipping(*args, **kw):
        _repoint(link, target)
        calls.append(args[1])
        return original(*args, **kw)
    monkeypatch.setattr(module, "resolve_reference", flipping)
    return calls


def _qemu_convert(src, out: Path, cwd=None) -> bytes:
    qemu_img("convert", "-O", "raw", src, out, cwd=cwd)
    return out.read_bytes()


@pytest.fixture
def dirs(tmp_path):
    """(tmp_path, attacker/, secret/, the symlink x -> attacker)."""
    attacker, secret = tmp_path / "attacker", tmp_path / "secret"
    attacker.mkdir(), secret.mkdir()
    _raw(secret / "passwd", SECRET)
    os.symlink("attacker", tmp_path / "x")
    return tmp_path, attacker, secret, tmp_path / "x"


def _top(path: Path, backing: str, fmt: str = "raw", write: bool = True) -> Path:
    """A 1 MiB qcow2 image naming `backing`, with 4 KiB of its own at 512 KiB (far from the
    backing's 64 KiB, which no copy-on-write copies into the image)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")
    if write:
        qemu_io(path, f"write -P {OWN:#x} 512k 4k")
    return path


def qemu_img_failure(*args, cwd) -> subprocess.CompletedProcess:
    """qemu-img ARGS, which must fail with exit code 1 and a message."""
    proc = subprocess.run(["qemu-img", *map(os.fspath, args)], cwd=cwd, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and proc.stderr, proc
    return proc


# --------------------------------------------------------------------------------------------
# Backing files, data files and info --backing-chain under a repointed directory symlink


def test_backing_resolves_in_directory_as_reached(dirs, monkeypatch, capsys):
    root, attacker, secret, x = dirs
    _raw(attacker / "passwd", MINE)
    _top(attacker / "top.qcow2", "passwd")
    want = _qemu_convert(x / "top.qcow2", root / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN and SECRET not in want
    calls = _flip_before(monkeypatch, image_module, x, "secret")
    with qcowfast.open(x / "top.qcow2") as img:
        got = img.read(0, img.virtual_size)
    assert calls == ["passwd"]
    assert_same_bytes(got, want, "open(x/top.qcow2), x repointed before the name resolved")
    # The command line too (x is repointed again as the name resolves).
    _repoint(x, "attacker")
    status, _, err = cli_in_process(capsys, "convert", "-q", "-O", "raw", x / "top.qcow2",
                                    root / "got.raw")
    assert (status, err) == (0, "")
    assert_same_bytes((root / "got.raw").read_bytes(), want, "convert, x repointed")


def test_missing_backing_stays_missing(dirs, monkeypatch, capsys):
    """attacker/passwd does not exist: the name is missing where the image was reached, as
    qemu-img finds it without the flip, though secret/passwd exists when it is resolved."""
    root, attacker, secret, x = dirs
    top = _top(attacker / "top.qcow2", "passwd", write=False)
    want = qemu_img_failure("convert", "-O", "raw", "x/top.qcow2", "out.raw", cwd=root)
    _flip_before(monkeypatch, image_module, x, "secret")
    with pytest.raises(MissingBackingFile):
        qcowfast.open(x / "top.qcow2")
    _repoint(x, "attacker")                 # (and again as the name resolves)
    monkeypatch.chdir(root)
    status, out, err = cli_in_process(capsys, "convert", "-q", "-O", "raw", "x/top.qcow2",
                                      "out.raw")
    assert (status, err) == (want.returncode, want.stderr.replace("qemu-img: ", "qcowfast: "))
    assert not (root / "out.raw").exists() and top.exists()


def test_data_file_resolves_in_directory_as_reached(dirs, monkeypatch):
    root, attacker, secret, x = dirs
    _raw(secret / "data.raw", SECRET)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on",
             "top.qcow2", "64k", cwd=attacker)
    qemu_io("top.qcow2", f"write -P {MINE:#x} 0 64k", cwd=attacker)
    # qemu-img 7.2 resolves a relative data file name from the working directory: run it
    # from the image's directory (qcowfast always resolves it from there).
    want = _qemu_convert("top.qcow2", root / "want.raw", cwd=x)
    assert want == bytes([MINE]) * 64 * K
    calls = _flip_before(monkeypatch, image_module, x, "secret")
    with qcowfast.open(x / "top.qcow2") as img:
        got = img.read(0, img.virtual_size)
    assert calls == ["data.raw"]
    assert_same_bytes(got, want, "data file of x/top.qcow2, x repointed")


def test_info_chain_resolves_in_directory_as_reached(dirs, monkeypatch, capsys):
    root, attacker, secret, x = dirs
    qemu_img("create", "-q", "-f", "qcow2", attacker / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", secret / "base.qcow2", "2M")
    _top(attacker / "top.qcow2", "base.qcow2", "qcow2")
    monkeypatch.chdir(root)
    want = qemu_img("info", "--backing-chain", "--output=json", "x/top.qcow2").stdout
    assert [layer["virtual-size"] for layer in json.loads(want)] == [1 << 20, 1 << 20]
    calls = _flip_before(monkeypatch, info_module, x, "secret")
    status, out, err = cli_in_process(capsys, "info", "--backing-chain", "--output=json",
                                      "x/top.qcow2")
    assert calls == ["base.qcow2"]
    assert (status, err) == (0, "")
    assert json.loads(out) == json.loads(want)


def test_check_chain_resolves_in_directory_as_reached(dirs, monkeypatch):
    root, attacker, secret, x = dirs
    qemu_img("create", "-q", "-f", "qcow2", secret / "base.qcow2", "1M")
    _top(attacker / "top.qcow2", "base.qcow2", "qcow2", write=False)  # (no base here)
    _flip_before(monkeypatch, paths_module, x, "secret")
    with pytest.raises(qcowfast.QcowError, match="base.qcow2"):
        qcowfast.check(x / "top.qcow2")


def test_allowed_directory_holds_its_subdirectories(tmp_path):
    """The directory holding the file is walked up to an allowed one: a file below it is
    inside, one beside it is not (symlinks to either count as the directory itself)."""
    shared, img = tmp_path / "shared", tmp_path / "img"
    (shared / "sub").mkdir(parents=True), (shared / "other").mkdir(), img.mkdir()
    os.symlink(shared, tmp_path / "alias")
    base = _raw(shared / "sub" / "base.raw", MINE)
    top = _top(img / "top.qcow2", "../shared/sub/base.raw")
    want = _qemu_convert(top, tmp_path / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN
    for allowed in ([], [shared / "other"], [tmp_path / "img"]):
        with pytest.raises(qcowfast.UnsafePathError) as refused:
            qcowfast.open(top, backing_dirs=allowed)
        assert f"(it is {base})" in str(refused.value), refused.value
    for allowed in ([shared], [tmp_path / "alias"], [shared / "sub"], [tmp_path]):
        with qcowfast.open(top, backing_dirs=allowed) as image:
            assert_same_bytes(image.read(0, image.virtual_size), want, f"allowed {allowed}")


# --------------------------------------------------------------------------------------------
# --allow-backing-dir ""


def test_empty_allowed_directory_refused(tmp_path, monkeypatch, capsys):
    """An empty name (an unset shell variable) would trust the working directory: from / that
    is every file. It is refused by name; the directory itself, named, works."""
    outside, img = tmp_path / "outside", tmp_path / "img"
    outside.mkdir(), img.mkdir()
    _raw(outside / "base.raw", MINE)
    top = _top(img / "top.qcow2", str(outside / "base.raw"))
    monkeypatch.chdir(outside)
    for call in (lambda: qcowfast.open(top, backing_dirs=""),
                 lambda: qcowfast.open(top, backing_dirs=[outside, ""]),
                 lambda: qcowfast.info(top, backing_chain=True, backing_dirs=[""]),
                 lambda: qcowfast.info(top, backing_dirs=[""])):
        with pytest.raises(ValueError, match=r"^--allow-backing-dir \(backing_dirs=\) was "
                                             "given an empty directory name"):
            call()
    for command in (["convert", "-q", "-O", "raw"], ["info"], ["map"], ["check"]):
        dst = [tmp_path / "out.raw"] if command[0] == "convert" else []
        status, out, err = cli_in_process(capsys, *command, "--allow-backing-dir", "", top,
                                          *dst)
        assert status == 1 and out == "", command
        assert err == ("qcowfast: --allow-backing-dir (backing_dirs=) was given an empty "
                       "directory name; qcowfast refuses it rather than trust the working "
                       "directory (name that one as '.')\n"), command
    assert not (tmp_path / "out.raw").exists()
    want = _qemu_convert(top, tmp_path / "want.raw")
    status, _, _ = cli_in_process(capsys, "convert", "-q", "-O", "raw", "--allow-backing-dir",
                                  ".", top, tmp_path / "out.raw")
    assert status == 0
    assert_same_bytes((tmp_path / "out.raw").read_bytes(), want, "--allow-backing-dir .")


# --------------------------------------------------------------------------------------------
# Long paths


def test_backing_file_with_real_path_past_path_max(tmp_path, monkeypatch, capsys):
    """/proc/self/fd names no path of PATH_MAX (4096) bytes or more: the check does not need
    one. From inside such a tree, short relative names work as in qemu-img."""
    monkeypatch.chdir(tmp_path)
    for _ in range(42):
        os.mkdir("p" * 99)
        os.chdir("p" * 99)
    assert len(os.getcwd()) >= 4096
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qemu_io("base.qcow2", f"write -P {MINE:#x} 0 64k")
    _top(Path("top.qcow2"), "base.qcow2", "qcow2")
    want = _qemu_convert("top.qcow2", tmp_path / "want.raw")
    assert want[0] == MINE and want[512 * K] == OWN
    with qcowfast.open("top.qcow2") as img:
        assert_same_bytes(img.read(0, img.virtual_size), want, "deep top.qcow2")
    want_map = qemu_img("map", "--output=json", "top.qcow2").stdout
    assert cli_in_process(capsys, "map", "--output=json", "top.qcow2") == (0, want_map, "")
    want_info = qemu_img("info", "--backing-chain", "--output=json", "top.qcow2").stdout
    status, out, err = cli_in_process(capsys, "info", "--backing-chain", "--output=json",
                                      "top.qcow2")
    assert (status, err) == (0, "") and json.loads(out) == json.loads(want_info)


# --------------------------------------------------------------------------------------------
# Descriptors


def _fds() -> set:
    """The open descriptors (not the one listing them, closed by then)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        out.add(int(name))
    return out


def test_chain_holds_no_directory_descriptors(tmp_path):
    """A layer keeps its directory only while it resolves the names it holds: an open chain
    holds one descriptor per file, and closing it leaves none."""
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "sub/base.qcow2", "1M", cwd=tmp_path)
    qemu_io("sub/base.qcow2", f"write -P {MINE:#x} 0 64k", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "sub/mid.qcow2", "1M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "-b", "sub/mid.qcow2",
             "-F", "qcow2", "top.qcow2", "1M", cwd=tmp_path)
    qemu_io("top.qcow2", f"write -P {OWN:#x} 512k 4k", cwd=tmp_path)
    want = _qemu_convert("top.qcow2", tmp_path / "want.raw", cwd=tmp_path)
    assert want[0] == MINE and want[512 * K] == OWN
    before = _fds()
    with qcowfast.open(tmp_path / "top.qcow2") as img:
        held = _fds() - before
        assert_same_bytes(img.read(0, img.virtual_size), want, "top.qcow2")
        targets = sorted(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) for fd in held)
    assert targets == ["base.qcow2", "data.raw", "mid.qcow2", "top.qcow2"]
    assert _fds() == before
    qcowfast.info(tmp_path / "top.qcow2", backing_chain=True)
    assert _fds() == before


# --------------------------------------------------------------------------------------------
# info --backing-chain on a loop


@pytest.mark.parametrize("output", ["human", "json"])
def test_info_chain_loop_message(tmp_path, monkeypatch, capsys, output):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "b.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2",
             "1M")
    qemu_img("rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", "b.qcow2")
    for top in ("a.qcow2", "c.qcow2"):
        args = ("info", "--backing-chain", f"--output={output}", top)
        want = qemu_img_failure(*args, cwd=tmp_path)
        assert want.stdout == ""
        assert cli_in_process(capsys, *args) == (
            1, "", want.stderr.replace("qemu-img: ", "qcowfast: ", 1)), top


def test_batch_conflict_walk_resolves_in_directory_as_reached(dirs, monkeypatch):
    """convert_many's walk over each job's chain (fleet.chain_files, which finds the files
    jobs must not write) reads the backing file the job itself will read, never the one a
    repointed symlink offers."""
    from qcowfast import fleet
    root, attacker, secret, x = dirs
    for where, below in ((attacker, "mine.raw"), (secret, "theirs.raw")):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", below, "-F", "raw",
                 where / "base.qcow2", "1M")
    _top(attacker / "top.qcow2", "base.qcow2", "qcow2", write=False)
    calls = _flip_before(monkeypatch, paths_module, x, "secret")
    names = [name for _, name in fleet.chain_files(fleet.as_job((x / "top.qcow2", "o.raw")))]
    assert calls == ["base.qcow2"]
    assert names == [str(x / "top.qcow2"), str(x / "base.qcow2"), str(x / "mine.raw")], names


def test_batch_refuses_an_empty_allowed_directory(tmp_path, capsys):
    """convert-many refuses `--allow-backing-dir ""` once, before any job (not once per job)."""
    src = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1M")
    status, out, err = cli_in_process(capsys, "convert-many", "--allow-backing-dir", "",
                                      "--target-dir", tmp_path, src)
    assert (status, out) == (1, "")
    assert err.startswith("qcowfast convert-many: --allow-backing-dir (backing_dirs=) was "
                          "given an empty directory name") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qcow2"]


def test_layer_reached_through_an_outside_symlink_does_not_trust_the_links_directory(
        tmp_path, capsys):
    """top (in att/) names /…/pub/lnk, a symlink in a directory anyone may write (/tmp) to
    att/l1.qcow2, which names victim/secret.raw. The name resolves from pub/, as in QEMU
    (qemu-img reads pub/victim/secret.raw); pub/ is trusted by nobody, so it is refused: names
    of a layer reached that way must lie in the directory that holds it (att/)."""
    pub, att = tmp_path / "pub", tmp_path / "att"
    (pub / "victim").mkdir(parents=True)
    att.mkdir()
    _raw(pub / "victim" / "secret.raw", SECRET)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "victim/secret.raw", "-F", "raw",
             att / "l1.qcow2", "1M")
    os.symlink(att / "l1.qcow2", pub / "lnk")
    _top(att / "top.qcow2", str(pub / "lnk"), "qcow2", write=False)
    assert _qemu_convert(att / "top.qcow2", tmp_path / "q.raw")[0] == SECRET  # qemu-img reads it
    with pytest.raises(qcowfast.UnsafePathError, match="victim/secret.raw"):
        qcowfast.open(att / "top.qcow2")
    status, _, err = cli_in_process(capsys, "convert", "-q", "-O", "raw", att / "top.qcow2",
                                    tmp_path / "o.raw")
    assert status == 1 and "victim/secret.raw" in err and not (tmp_path / "o.raw").exists()
    # The same layout with the link inside the trusted directory keeps working as qemu-img's.
    os.symlink("l1.qcow2", att / "inner")
    _raw(att / "victim.raw", MINE)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "victim.raw", "-F", "raw",
             att / "l1.qcow2", "1M")
    _top(att / "top2.qcow2", "inner", "qcow2", write=False)
    want = _qemu_convert(att / "top2.qcow2", tmp_path / "want.raw")
    with qcowfast.open(att / "top2.qcow2") as img:
        assert_same_bytes(img.read(0, img.virtual_size), want, "link inside the directory")


@pytest.mark.parametrize("dir_links, file_links", [(0, 40), (0, 41), (21, 19), (21, 20)])
def test_symlink_limit_as_the_kernels(tmp_path, capsys, dir_links, file_links):
    """A backing name through N symlinks in all (directory components and the last one) opens
    while N <= 40 and fails as qemu-img fails beyond (the kernel's MAXSYMLINKS per lookup)."""
    inner = tmp_path / "in"
    inner.mkdir()
    _raw(inner / "b.raw", MINE)
    previous = "b.raw"
    for i in range(file_links):
        os.symlink(previous, inner / f"x{i}")
        previous = f"x{i}"
    last = previous
    previous = "in"
    for i in range(dir_links):
        os.symlink(previous, tmp_path / f"dl{i}")
        previous = f"dl{i}"
    name = f"{previous}/{last}"
    top = _top(tmp_path / "top.qcow2", name, write=False)
    proc = subprocess.run(["qemu-img", "convert", "-O", "raw", top, tmp_path / "q.raw"],
                          capture_output=True, text=True)
    status, _, err = cli_in_process(capsys, "convert", "-q", "-O", "raw", top,
                                    tmp_path / "o.raw")
    assert (status, err) == (proc.returncode, proc.stderr.replace("qemu-img:", "qcowfast:"))
    assert (proc.returncode == 0) == (dir_links + file_links <= 40)
    if status == 0:
        assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_user_named_file_swapped_for_a_device_is_never_opened(tmp_path, monkeypatch):
    """A file the user names is checked before it is opened (a device's open may act: rewind
    a tape, arm a watchdog). A symlink to /dev/null swapped in right after the name was first
    looked up must not get /dev/null opened: the check and the open are of one file."""
    import stat as stat_module
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    real_open, real_stat = os.open, os.stat
    swapped, devices = [], []

    def swap_once(path):
        if os.fspath(path) in ("a.qcow2", str(img)) and not swapped:
            swapped.append(path)
            os.rename(img, tmp_path / "kept.qcow2")
            os.symlink("/dev/null", img)

    def looking_stat(path, *args, **kw):
        result = real_stat(path, *args, **kw)
        swap_once(path)
        return result

    def looking_open(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        if not flags & getattr(os, "O_PATH", 0) and stat_module.S_ISCHR(os.fstat(fd).st_mode):
            devices.append(path)
        swap_once(path)
        return fd
    monkeypatch.setattr(paths_module.os, "stat", looking_stat)
    monkeypatch.setattr(paths_module.os, "open", looking_open)
    try:
        opened = paths_module.open_file(img)
    except qcowfast.QcowError:
        opened = None
    finally:
        monkeypatch.undo()
    assert swapped and devices == []
    if opened is not None:                  # (what it holds is the file that was checked)
        with opened:
            assert os.pread(opened.fd, 4, 0) == b"QFI\xfb"
