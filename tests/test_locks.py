"""Images in use: QEMU's OFD locks are honoured as qemu-img honours them (issue 11).

A `qemu-io` process holding an image open for writing stands for a running VM. The oracle is
qemu-img itself: it refuses the image without -U ("Failed to get shared "write" lock") and
reads it with -U. qcowfast must refuse the same files (top image, backing file, data file, raw
source) with ImageLocked naming -U / force_share=True, and read them with force_share=True.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import qcowfast
from qcowfast.errors import ImageLocked
from qcowfast.image import open_source
from qcowfast.locks import write_locked

from common import assert_same_bytes, qemu_img, qemu_io, run_cli


def _locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return write_locked(fd)
    finally:
        os.close(fd)


class Holder:
    """`qemu-io [-r] -f FMT PATH` reading commands from a pipe kept open: the image stays open."""

    def __init__(self, path: Path, fmt: str = "qcow2", read_only: bool = False,
                 watch: Path | None = None):
        args = ["qemu-io", *(["-r"] if read_only else []), "-f", fmt, str(path)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # qemu-io has opened the image once it answers a command.
        self.proc.stdin.write(b"help\n")
        self.proc.stdin.flush()
        watch = watch or path
        deadline = time.monotonic() + 20
        while not read_only and not _locked(watch):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.02)
        if read_only:
            time.sleep(0.3)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=20)
        self.proc.stderr.close()


@pytest.fixture
def hold():
    holders = []

    def start(*args, **kw) -> Holder:
        holders.append(Holder(*args, **kw))
        return holders[-1]

    yield start
    for h in holders:
        h.close()


def qemu_refuses(path: Path, fmt: str = "qcow2", cwd=None) -> None:
    """The oracle: qemu-img convert refuses without -U (naming the write lock), reads with -U."""
    out = Path(cwd or path.parent) / "oracle.raw"
    proc = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out],
                          capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 1 and 'Failed to get shared "write" lock' in proc.stderr, proc
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, out, cwd=cwd)
    out.unlink()


def _raw_u(path: Path, tmp: Path, fmt: str = "qcow2") -> bytes:
    out = tmp / "ref-u.raw"
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


def _assert_locked_error(exc, name: Path):
    msg = str(exc)
    assert str(name) in msg and "-U" in msg and "force_share=True" in msg, msg


@pytest.fixture
def chain(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x5a 0 256k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    qemu_io(top, "write -P 0x22 64k 4k")
    return top, base


def test_top_image_held_for_writing(chain, hold, tmp_path):
    top, _ = chain
    hold(top)
    qemu_refuses(top)
    proc = subprocess.run(["qemu-img", "info", top], capture_output=True, text=True)
    assert proc.returncode == 1 and 'Failed to get shared "write" lock' in proc.stderr
    for call in (lambda: qcowfast.open(top), lambda: open_source(top),
                 lambda: qcowfast.info(top), lambda: qcowfast.compare(top, top),
                 lambda: qcowfast.convert(top, tmp_path / "o.raw")):
        with pytest.raises(ImageLocked) as exc:
            call()
        _assert_locked_error(exc.value, top)
    assert not (tmp_path / "o.raw").exists()
    with qcowfast.open(top, force_share=True) as img:
        assert_same_bytes(img.read(0, img.virtual_size), _raw_u(top, tmp_path), "-U read")
    assert qcowfast.info(top, force_share=True)["format"] == "qcow2"
    assert qcowfast.compare(top, top, force_share=True).identical
    _assert_cli_as_qemu(top, tmp_path)
    assert run_cli("info", "-U", top).returncode == 0
    # check too: a script gating on `qemu-img check` must not pass an image in use.
    with pytest.raises(ImageLocked) as exc:
        qcowfast.check(top)
    _assert_locked_error(exc.value, top)
    assert qcowfast.check(top, force_share=True).exit_code == 0
    for argv in ([], ["-q"], ["--output=json"]):
        ours = run_cli("check", *argv, top)
        theirs = subprocess.run(["qemu-img", "check", *argv, top], capture_output=True,
                                text=True)
        assert ours.returncode == 1 == theirs.returncode and ours.stdout == "", ours
        assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qcowfast: ", 1)
    assert run_cli("check", "-U", top).returncode == 0


def _assert_cli_as_qemu(image, tmp_path) -> None:
    """Every reading command refuses `image` as qemu-img does: its exit status and two lines
    ("Could not open 'IMAGE': ...Failed to get shared "write" lock", "Is another process
    using the image [FILE]?")."""
    for args in (["info"], ["map"], ["check"], ["measure", "-O", "qcow2"], ["snapshot", "-l"],
                 ["compare", image], ["convert", "-O", "raw"]):
        tail = [tmp_path / "cli-out.raw"] if args[0] == "convert" else []
        want = subprocess.run(["qemu-img", *map(str, args), str(image), *map(str, tail)],
                              capture_output=True, text=True)
        ours = run_cli(*args, image, *tail)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout), args
        if want.returncode:                 # (info reads no backing file)
            assert 'Failed to get shared "write" lock' in want.stderr
            assert ours.stderr == want.stderr.replace("qemu-img: ", "qcowfast: ", 1), args
    assert not (tmp_path / "cli-out.raw").exists()


def test_backing_file_held_for_writing(chain, hold, tmp_path):
    """A writer on a backing file (e.g. a commit job) makes qemu-img refuse the overlay too."""
    top, base = chain
    hold(base)
    qemu_refuses(top)
    _assert_cli_as_qemu(top, tmp_path)
    with pytest.raises(ImageLocked) as exc:
        qcowfast.open(top)
    _assert_locked_error(exc.value, base)
    with pytest.raises(ImageLocked):
        qcowfast.info(top, backing_chain=True)
    with qcowfast.open(top, force_share=True) as img:          # propagates down the chain
        assert_same_bytes(img.read(0, img.virtual_size), _raw_u(top, tmp_path), "-U chain")


def test_data_file_held_for_writing(tmp_path, hold):
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", img, "1M", cwd=tmp_path)
    qemu_io("img.qcow2", "write -P 0x3c 0 128k", cwd=tmp_path)
    hold(tmp_path / "data.raw", fmt="raw")
    qemu_refuses(Path("img.qcow2"), cwd=tmp_path)
    with pytest.raises(ImageLocked) as exc:
        qcowfast.open(img)
    assert "data.raw" in str(exc.value)
    with qcowfast.open(img, force_share=True) as image:
        assert image.read(0, 4) == b"\x3c" * 4


def test_raw_source_held_for_writing(tmp_path, hold):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(64 * 1024))
    hold(raw, fmt="raw")
    qemu_refuses(raw, fmt="raw")
    with pytest.raises(ImageLocked):
        open_source(raw)
    with pytest.raises(ImageLocked):
        qcowfast.open(raw, format="raw")
    # qemu-img info reads no data of a raw file and does not test its lock; neither does info.
    qemu_img("info", "-f", "raw", raw)
    assert qcowfast.info(raw)["format"] == "raw"
    with open_source(raw, force_share=True) as src:
        assert src.read(0, 64 * 1024) == raw.read_bytes()


def test_read_only_holder_does_not_block(chain, hold):
    """qemu-io -r (a VM with a read-only disk) shares writing: both tools read."""
    top, _ = chain
    hold(top, read_only=True)
    qemu_img("info", top)
    with qcowfast.open(top) as img:
        assert img.read(64 * 1024, 4) == b"\x22" * 4


# ---------------------------------------------------------------------------------------------
# Destinations in use: qemu-img convert takes its output's "write" lock


class NbdHolder:
    """`qemu-nbd [-r] -f FMT -k SOCKET PATH`: a server holding the image open."""

    def __init__(self, path: Path, fmt: str, read_only: bool):
        self.sock = path.with_name(path.name + ".sock")
        self.proc = subprocess.Popen(["qemu-nbd", *(["-r"] if read_only else []), "-f", fmt,
                                      "-k", str(self.sock), str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.proc.stderr.close()


HOLDERS = {"qemu-io qcow2": ("qemu-io", "qcow2", False),
           "qemu-io -r qcow2": ("qemu-io", "qcow2", True),
           "qemu-io raw": ("qemu-io", "raw", False), "qemu-io -r raw": ("qemu-io", "raw", True),
           "qemu-nbd raw": ("qemu-nbd", "raw", False),
           "qemu-nbd -r raw": ("qemu-nbd", "raw", True)}


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_destination_in_use(tmp_path, hold, holder):
    """Replacing (or writing in place) a file another process holds fails where qemu-img
    convert fails, with its words ('Failed to get "write" lock', '"resize" lock'), and what
    was there is left untouched. One difference, on purpose: a raw writer that shares writing
    (qemu-io -f raw) lets qemu-img write into the file beside it, but a replaced file would
    take none of that writer's data, so qcowfast refuses to replace it."""
    tool, fmt, read_only = HOLDERS[holder]
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "64K")
    qemu_io(src, "write -P 0x5a 0 4k")
    holders = []
    for args in (["-O", "qcow2"], ["-O", "raw"], ["-n", "-O", "raw"]):
        # One held file per tool: qemu-img removes a qcow2 target it failed to create.
        held = {}
        for who in ("qemu-img", "qcowfast"):
            held[who] = tmp_path / f"busy-{who}-{'-'.join(args)}"
            qemu_img("create", "-q", "-f", fmt, held[who], "1M")
            holders.append(hold(held[who], fmt, read_only=read_only) if tool == "qemu-io"
                           else NbdHolder(held[who], fmt, read_only))
        want = subprocess.run(["qemu-img", "convert", *args, src, held["qemu-img"]],
                              capture_output=True, text=True)
        busy = held["qcowfast"]
        before = busy.read_bytes()
        try:
            qcowfast.convert(src, busy, format=args[-1], existing="-n" in args,
                             overwrite=True)
            got = 0
        except qcowfast.OutputError as exc:
            got = 1
            lock = re.search(r'failed to get ((shared )?"(write|resize)" lock)', str(exc))
            assert lock, exc
            assert busy.read_bytes() == before, args
        on_purpose = holder == "qemu-io raw" and args == ["-O", "raw"]
        if on_purpose:
            assert (got, want.returncode) == (1, 0) and lock.group(1) == 'shared "write" lock'
        else:
            assert got == want.returncode, (args, want.stderr)
            if got:
                assert f"Failed to get {lock.group(1)}" in want.stderr, (str(exc), want.stderr)
    for h in holders:
        if isinstance(h, NbdHolder):
            h.close()


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_destination_in_use_lines(tmp_path, hold, holder):
    """On the command line, a destination refused for a lock gets qemu-img's two lines and
    exit code: "DST: error while converting FMT: Failed to get ... lock" when creating it,
    "Could not open 'DST': Failed to get ... lock" in place (-n, where qemu-img opens the target
    before it compares sizes), then "Is another process using the image [DST]?". The one
    refusal on purpose (test_destination_in_use) gets the same lines as qemu-img's qcow2 output."""
    tool, fmt, read_only = HOLDERS[holder]
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "2M")
    qemu_io(src, "write -P 0x5a 0 4k")
    holders = []
    for args in (["-O", "qcow2"], ["-O", "raw"], ["-n", "-O", "raw"]):
        lines = {}
        for who in ("qemu-img", "qcowfast"):
            busy = tmp_path / who / f"busy{'-'.join(args)}"     # (the same name in both)
            busy.parent.mkdir(exist_ok=True)
            qemu_img("create", "-q", "-f", fmt, busy, "1M")     # (smaller than the source)
            holders.append(hold(busy, fmt, read_only=read_only) if tool == "qemu-io"
                           else NbdHolder(busy, fmt, read_only))
            run = (subprocess.run(["qemu-img", "convert", *args, src, busy.name],
                                  capture_output=True, text=True, cwd=busy.parent)
                   if who == "qemu-img" else run_cli("convert", *args, src, busy.name,
                                                     cwd=busy.parent))
            lines[who] = (run.returncode, run.stderr.replace("qemu-img: ", "qcowfast: "))
        if holder == "qemu-io raw" and args == ["-O", "raw"]:      # (refused on purpose)
            assert lines["qemu-img"] == (0, ""), lines
            assert lines["qcowfast"] == (1, f"qcowfast: {busy.name}: error while converting "
                                            'raw: Failed to get shared "write" lock\nIs '
                                            f"another process using the image [{busy.name}]?"
                                            "\n"), lines
        else:
            assert lines["qcowfast"] == lines["qemu-img"], (args, lines)
    for h in holders:
        if isinstance(h, NbdHolder):
            h.close()


def test_in_place_output_holds_the_write_lock(tmp_path):
    """While qcowfast writes a target in place, a QEMU that does not share writing (a qcow2
    reader without -U) cannot open it, as while qemu-img writes it; afterwards it can."""
    from qcowfast.output import FileOutput
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "64K")
    dst = tmp_path / "dst.qcow2"                 # still a qcow2 image until data is written
    qemu_img("create", "-q", "-f", "qcow2", dst, "1M")
    with qcowfast.open(src) as image, FileOutput(dst, image, existing=True) as out:
        proc = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", dst],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and 'Failed to get shared "write" lock' in proc.stderr
        out.commit()
    qemu_io(dst, "read 0 512")                           # released


def test_file_being_replaced_is_held_until_replaced(tmp_path):
    """From the check to the rename, the file being replaced carries a QEMU writer's locks: a
    QEMU starting on it meanwhile is refused (it would write into a file about to vanish);
    once replaced, the new file is free."""
    from qcowfast.output import FileOutput
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "64K")
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(64 * 1024))
    with qcowfast.open(src) as image, FileOutput(dst, image, overwrite=True) as out:
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", dst],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and 'Failed to get "write" lock' in proc.stderr, proc
        proc = subprocess.run(["qemu-nbd", "-r", "-f", "raw", "-k", tmp_path / "s", dst],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and 'Failed to get shared "resize" lock' in proc.stderr
        out.prepare(image.virtual_size, False)
        out.commit()
    qemu_io(dst, "write -P 0xab 0 4k", fmt="raw")
    assert dst.read_bytes()[:4096] == b"\xab" * 4096
