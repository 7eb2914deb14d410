"""Safe by default: which files an image may make qcowfast open, read-only opening, bounded work.

* Backing and external data files named inside an image are followed, whether the name is
  absolute or relative, only when the file reached (symlinks included) lies inside the image's
  own directory or a directory the caller allowed; anything else is an UnsafePathError naming
  the file and the option that allows it (backing_dirs=, backing= / data_file=,
  --allow-backing-dir). Allowed names resolve as QEMU resolves them, so the bytes always match
  ``qemu-img convert``.
* The backing format comes from the backing-format extension, else from the content.
* Nothing is ever written to a source image, even a dirty one.
* Work and memory follow the allocated metadata, not the declared virtual size; chains are
  bounded in depth and loops are refused.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qcowfast
from qcowfast import BackingChainError, CorruptImage, OutputError, UnsafePathError

from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw
from test_corrupt import EXT_BACKING_FORMAT, OFFSET_MASK, Qcow, qemu_raw, run_cli

K = 1024
M = 1024 * K


def read_all(path, **kw) -> bytes:
    with qcowfast.open(path, **kw) as img:
        return img.read(0, img.virtual_size)


def make_base(path: Path, fmt: str = "qcow2", fill: int = 0x5A) -> Path:
    """A 1 MiB image whose first 256 KiB hold `fill` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", fmt, path, "1M")
    qemu_io(path, f"write -P {fill:#x} 0 256k", fmt=fmt)
    return path


def make_top(path: Path, backing_name: str, fmt: str = "qcow2") -> Path:
    """A 1 MiB qcow2 image with 4 KiB of its own at 64 KiB and `backing_name` stored verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 0x22 64k 4k")
    qemu_img("rebase", "-u", "-b", backing_name, "-F", fmt, path.name, cwd=path.parent)
    return path


def assert_matches_qemu(path, **kw):
    __tracebackhide__ = True
    assert_same_bytes(read_all(path, **kw), qemu_raw(path), f"qcowfast.open({path})")


def assert_refused(path, name: str, option_hint: str = "backing=PATH", **kw):
    """open() raises UnsafePathError naming the file, the image and the options allowing it."""
    __tracebackhide__ = True
    with pytest.raises(UnsafePathError) as info:
        qcowfast.open(path, **kw)
    msg = str(info.value)
    assert repr(name) in msg and str(path) in msg, msg
    for hint in ("backing_dirs=[DIR]", "--allow-backing-dir DIR", option_hint):
        assert hint in msg, f"{hint!r} missing from: {msg}"
    return msg


# --------------------------------------------------------------------------------------------
# Names that are followed by default


@pytest.mark.parametrize("name", ["base.qcow2", "./base.qcow2", "sub/base.qcow2",
                                  "sub/../base.qcow2", "sub//base.qcow2"])
def test_relative_name_inside_directory_followed(tmp_path, name):
    make_base(tmp_path / "base.qcow2")
    (tmp_path / "sub").mkdir()
    shutil.copyfile(tmp_path / "base.qcow2", tmp_path / "sub" / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", name)
    assert_matches_qemu(top)


def test_symlink_inside_directory_followed(tmp_path):
    make_base(tmp_path / "real" / "base.qcow2")
    os.symlink("real/base.qcow2", tmp_path / "link.qcow2")
    top = make_top(tmp_path / "top.qcow2", "link.qcow2")
    assert_matches_qemu(top)


def test_colon_after_a_slash_is_a_file_name(tmp_path):
    """QEMU takes a colon before the first slash for a protocol, not one after it."""
    qemu_img("create", "-q", "-f", "raw", "./a:b.raw", "1M", cwd=tmp_path)
    qemu_io("./a:b.raw", "write -P 0x11 0 1M", fmt="raw", cwd=tmp_path)
    top = make_top(tmp_path / "top.qcow2", "./a:b.raw", fmt="raw")
    assert_matches_qemu(top)


def test_image_opened_through_symlink_resolves_like_qemu(tmp_path):
    """A relative name is looked up beside the path the image was opened by (QEMU's rule)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_base(b / "base.qcow2", fill=0x11)
    make_top(b / "top.qcow2", "base.qcow2")
    make_base(a / "base.qcow2", fill=0x77)
    os.symlink("../b/top.qcow2", a / "link.qcow2")
    got = read_all(a / "link.qcow2")
    assert got[:4] == b"\x77" * 4                      # a/base.qcow2, as qemu-img reads it
    assert_same_bytes(got, qemu_raw(a / "link.qcow2"), "through the symlink")


def test_image_opened_by_relative_path(tmp_path, monkeypatch):
    make_base(tmp_path / "d" / "base.qcow2")
    make_top(tmp_path / "d" / "top.qcow2", "base.qcow2")
    monkeypatch.chdir(tmp_path)
    assert read_all("d/top.qcow2") == reference_raw(tmp_path / "d" / "top.qcow2")


# --------------------------------------------------------------------------------------------
# Names refused by default, and the options that allow them


def test_dotdot_escape_refused_and_allowed(tmp_path):
    make_base(tmp_path / "outside" / "base.qcow2")
    top = make_top(tmp_path / "img" / "top.qcow2", "../outside/base.qcow2")
    msg = assert_refused(top, "../outside/base.qcow2")
    assert "outside the image's directory" in msg
    assert_matches_qemu(top, backing_dirs=[tmp_path / "outside"])
    assert_matches_qemu(top, backing_dirs=[str(tmp_path)])
    assert_matches_qemu(top, backing=tmp_path / "outside" / "base.qcow2")
    # An allowed directory elsewhere does not help.
    (tmp_path / "other").mkdir()
    assert_refused(top, "../outside/base.qcow2", backing_dirs=[tmp_path / "other"])



@pytest.mark.parametrize("single", ["/nonexistent", b"/nonexistent", Path("/nonexistent")],
                         ids=["str", "bytes", "Path"])
def test_backing_dirs_given_as_one_path(tmp_path, single):
    """backing_dirs given as one path is that one directory: never its characters (a str is
    iterable, and "/" would have trusted the whole file system), in every entry point."""
    make_base(tmp_path / "outside" / "base.qcow2")
    top = make_top(tmp_path / "img" / "top.qcow2", "../outside/base.qcow2")
    assert_refused(top, "../outside/base.qcow2", backing_dirs=single)
    for call in (lambda: qcowfast.info(top, backing_chain=True, backing_dirs=single),
                 lambda: qcowfast.check(top, backing_dirs=single),
                 lambda: qcowfast.convert(top, tmp_path / "o.raw", backing_dirs=single)):
        with pytest.raises(UnsafePathError):
            call()
    allowed = tmp_path / "outside"
    assert_matches_qemu(top, backing_dirs=os.fsencode(allowed) if isinstance(single, bytes)
                        else type(single)(allowed))
    with pytest.raises(TypeError, match="backing_dirs must be a path or an iterable"):
        qcowfast.open(top, backing_dirs=5)


def test_bytes_paths(tmp_path):
    """A bytes path opens an image and its backing chain as the str path does; names in
    results are str."""
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    path = os.fsencode(top)
    assert_same_bytes(read_all(path), qemu_raw(top), "a bytes path")
    got = qcowfast.info(path, backing_chain=True)
    assert json.dumps(got) and got == qcowfast.info(top, backing_chain=True)
    assert qcowfast.check(path).exit_code == 0
    with qcowfast.open(path) as img:
        assert img.filename == str(top) and isinstance(img.backing.filename, str)


def test_absolute_name_inside_directory_followed(tmp_path):
    """The rule is where the file is, not how it is spelled (`qemu-img create -b /abs/...`)."""
    base = make_base(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 64k 4k")
    assert qcowfast.info(top)["backing-filename"] == str(base)
    assert_matches_qemu(top)


def test_absolute_name_through_symlinked_directory_followed(tmp_path):
    """An absolute name spelled through a symlink to the image's own directory is inside it."""
    make_base(tmp_path / "real" / "base.qcow2")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    top = make_top(tmp_path / "real" / "top.qcow2", str(tmp_path / "alias" / "base.qcow2"))
    assert_matches_qemu(top)
    # Opened through the symlinked directory too.
    assert_matches_qemu(tmp_path / "alias" / "top.qcow2")


def test_absolute_name_outside_refused_and_allowed(tmp_path):
    base = make_base(tmp_path / "outside" / "base.qcow2")
    top = make_top(tmp_path / "img" / "top.qcow2", str(base))
    msg = assert_refused(top, str(base))
    assert "outside the image's directory" in msg
    assert_matches_qemu(top, backing_dirs=[tmp_path / "outside"])
    assert_matches_qemu(top, backing=base)
    proc = run_cli("convert", "-q", top, tmp_path / "o.raw")
    assert proc.returncode == 1 and "--allow-backing-dir" in proc.stderr
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("name", [
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}',
    "file:base.qcow2", "nbd://127.0.0.1:10809/x", "http://example.invalid/base.qcow2",
    "0:base.qcow2", "base.qcow2:", "host:/base.qcow2",
])
def test_protocol_names_never_followed(tmp_path, name):
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", name)
    for dirs in ((), [tmp_path], ["/"]):
        with pytest.raises(UnsafePathError, match="protocol or json: prefix") as info:
            qcowfast.open(top, backing_dirs=dirs)
        # The message points at what helps (backing=PATH), not at directories, which don't.
        assert "backing=PATH" in str(info.value) and "--allow-backing-dir" not in \
            str(info.value), info.value
    # On the command line, the remedy is storing a plain name: the message says how, unless
    # qemu-img cannot open the image either (a protocol it does not know): then its words.
    proc = run_cli("map", top)
    qemu = subprocess.run(["qemu-img", "map", top], capture_output=True, text=True)
    assert proc.returncode == qemu.returncode == 1, (proc.stderr, qemu.stderr)
    if "Unknown protocol" in qemu.stderr:
        assert proc.stderr.replace("qcowfast:", "qemu-img:", 1) == qemu.stderr
    else:
        assert "qemu-img rebase -u -b FILE -F FORMAT IMAGE" in proc.stderr, proc.stderr
    # Naming the file explicitly works; the oracle is the same image with a plain name.
    plain = tmp_path / "plain.qcow2"
    shutil.copyfile(top, plain)
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", plain)
    assert_same_bytes(read_all(top, backing=tmp_path / "base.qcow2"), qemu_raw(plain),
                      "explicit backing=")


def test_symlink_escape_refused(tmp_path):
    make_base(tmp_path / "outside" / "base.qcow2")
    img = tmp_path / "img"
    img.mkdir()
    os.symlink("../outside/base.qcow2", img / "link.qcow2")
    os.symlink(tmp_path / "outside", img / "sub")
    for name in ("link.qcow2", "sub/base.qcow2"):
        top = make_top(img / "top.qcow2", name)
        msg = assert_refused(top, name)
        assert str(tmp_path / "outside" / "base.qcow2") in msg      # the real target is named
        assert_matches_qemu(top, backing_dirs=[tmp_path / "outside"])


def test_symlinked_allowed_dir(tmp_path):
    """backing_dirs are compared by real path: a symlink to the directory allows it too."""
    make_base(tmp_path / "outside" / "base.qcow2")
    os.symlink(tmp_path / "outside", tmp_path / "alias")
    top = make_top(tmp_path / "img" / "top.qcow2", "../outside/base.qcow2")
    assert_matches_qemu(top, backing_dirs=[tmp_path / "alias"])


def test_non_regular_files_refused(tmp_path):
    """A directory or FIFO named as a backing file is refused at once (a FIFO would block)."""
    os.mkfifo(tmp_path / "fifo.qcow2")
    (tmp_path / "dir.qcow2").mkdir()
    for name in ("fifo.qcow2", "dir.qcow2", "."):
        top = make_top(tmp_path / "top.qcow2", name)
        code = f"import qcowfast\ntry:\n    qcowfast.open({str(top)!r})\n" \
               "except qcowfast.UnsafePathError as e:\n    print('refused:', e)\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "refused:" in proc.stdout, proc.stdout + proc.stderr
        kind = "a FIFO" if name.startswith("fifo") else "a directory"
        assert f"{name} of {top} is {kind}, not a regular file" in proc.stdout, proc.stdout
        # No option admits such a file: the message must not send the user looking for one.
        assert "allow" not in proc.stdout, proc.stdout


def test_backing_format_errors_name_both_files(tmp_path):
    """The header names a backing format the file does not have, or one qcowfast does not
    read: opening refuses naming the image and its backing file, and every command refuses
    with one line where qemu-img fails to open the image too (exit 1): for a backing file
    that is not qcow2, qemu-img's very line, also one layer further down."""
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
    as_qcow2 = tmp_path / "as-qcow2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "qcow2", as_qcow2, "1M")
    as_vmdk = tmp_path / "as-vmdk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "vmdk", as_vmdk, "1M")
    wants = {as_qcow2: f"backing file {tmp_path / 'base.raw'} of {as_qcow2} is not a QCOW2 "
                       f"image, though {as_qcow2} names its format qcow2",
             as_vmdk: f"backing file format 'vmdk' of {as_vmdk} is not supported"}
    for top, want in wants.items():
        with pytest.raises(qcowfast.QcowError) as caught:
            qcowfast.open(top)
        assert want in str(caught.value)
    above = tmp_path / "above.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", as_qcow2.name, "-F", "qcow2", above,
             "1M")
    for top in (as_qcow2, above, as_vmdk):
        for command in (["map"], ["check"], ["convert", "-O", "raw", top, tmp_path / "o.raw"],
                        ["compare", top, tmp_path / "base.raw"]):
            args = command if command[0] in ("convert", "compare") else [*command, top]
            qemu = subprocess.run(["qemu-img", *map(str, args)], capture_output=True,
                                  text=True)
            assert "Could not open backing file" in qemu.stderr, qemu.stderr
            proc = run_cli(*args)
            assert proc.returncode == qemu.returncode, (args, proc.stderr, qemu.stderr)
            assert proc.stderr.count("\n") == 1, proc.stderr
            # (vmdk, a format qcowfast does not read: qemu-img's line where it fails too,
            # "Could not open backing file: File is too small, not a valid image")
            assert proc.stderr.replace("qcowfast:", "qemu-img:", 1) == qemu.stderr, args
        assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("stored, followed", [
    (b"base.qcow2\0../../etc/passwd", "base.qcow2"), (b"\0base.qcow2", None)],
    ids=["name-then-nul", "nul-first"])
def test_name_ends_at_a_nul_byte(tmp_path, stored, followed):
    """QEMU reads the stored name as a C string (qcow2_do_open() pstrcpy()s it): it ends at
    the first NUL byte, and an empty name means no backing file. The path policy applies to
    the name QEMU follows."""
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    Qcow(top).set_backing_name(stored)
    with qcowfast.open(top) as img:
        assert (img.backing and os.path.basename(img.backing.filename)) == (followed or None)
    assert_matches_qemu(top)
    want = json.loads(qemu_img("info", "--output=json", "--backing-chain", top).stdout)
    assert qcowfast.info(top, backing_chain=True) == want


def test_empty_name_means_no_backing(tmp_path):
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    Qcow(top).set_backing_name(b"")
    with qcowfast.open(top) as img:
        assert img.backing is None
    assert_matches_qemu(top)


def test_cli_allow_backing_dir(tmp_path):
    make_base(tmp_path / "outside" / "base.qcow2")
    top = make_top(tmp_path / "img" / "top.qcow2", "../outside/base.qcow2")
    dst = tmp_path / "out.raw"
    proc = run_cli("convert", "-q", top, dst)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "--allow-backing-dir" in proc.stderr
    assert not dst.exists()
    proc = run_cli("convert", "-q", "--allow-backing-dir", tmp_path / "outside", top, dst)
    assert proc.returncode == 0, proc.stderr
    assert_same_bytes(dst.read_bytes(), reference_raw(top), "CLI convert")
    proc = run_cli("map", "--output", "json", top)
    assert proc.returncode == 1 and "--allow-backing-dir" in proc.stderr
    proc = run_cli("map", "--output", "json", "--allow-backing-dir", tmp_path / "outside", top)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == qemu_map(top)


# --------------------------------------------------------------------------------------------
# External data files: the same policy


def make_data_file_image(directory: Path, data_name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_name}", "img.qcow2", "1M",
             cwd=directory)
    qemu_io("img.qcow2", "write -P 0x3c 0 128k", cwd=directory)
    return directory / "img.qcow2"


def test_data_file_relative_followed(tmp_path):
    img = make_data_file_image(tmp_path, "data.raw")
    assert_matches_qemu(img)


def test_data_file_absolute_inside_followed(tmp_path):
    img = make_data_file_image(tmp_path, str(tmp_path / "data.raw"))
    assert_matches_qemu(img)


def test_data_file_absolute_refused_and_allowed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    img = make_data_file_image(tmp_path / "img", str(tmp_path / "elsewhere" / "data.raw"))
    assert_refused(img, str(tmp_path / "elsewhere" / "data.raw"), option_hint="data_file=PATH")
    assert_matches_qemu(img, backing_dirs=[tmp_path / "elsewhere"])
    assert_matches_qemu(img, data_file=tmp_path / "elsewhere" / "data.raw")


def test_data_file_escape_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    img = make_data_file_image(tmp_path / "img", "../elsewhere/data.raw")
    assert_refused(img, "../elsewhere/data.raw", option_hint="data_file=PATH")
    assert_matches_qemu(img, backing_dirs=[tmp_path / "elsewhere"])


def test_missing_data_file_is_a_qcow_error(tmp_path):
    """A data file named safely but missing is reported as a QcowError, not an OSError."""
    img = make_data_file_image(tmp_path, "data.raw")
    (tmp_path / "data.raw").unlink()
    with pytest.raises(qcowfast.QcowError, match="data.raw"):
        qcowfast.open(img)


# --------------------------------------------------------------------------------------------
# The backing format


def test_raw_backing_is_never_probed(tmp_path):
    """A raw backing file holding a qcow2 image is read as raw when the extension says raw."""
    inner = make_base(tmp_path / "inner.qcow2")
    shutil.copyfile(inner, tmp_path / "base.raw")
    os.truncate(tmp_path / "base.raw", M)
    top = make_top(tmp_path / "top.qcow2", "base.raw", fmt="raw")
    got = read_all(top)
    assert got[:4] == b"QFI\xfb"                  # the qcow2 header, read as raw data
    assert_same_bytes(got, reference_raw(top), "raw backing holding a qcow2 image")


def test_backing_format_probed_without_extension(tmp_path):
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    q = Qcow(top)
    off, _ = q.extension(EXT_BACKING_FORMAT)
    q.put(off, struct.pack(">I", 0x0B0B0B0B))     # an unknown extension, ignored by readers
    with qcowfast.open(top) as img:
        assert isinstance(img.backing, qcowfast.Image)
    assert_matches_qemu(top)


def _set_backing_format(path: Path, payload: bytes) -> None:
    """Store `payload` verbatim as the backing-format extension's data (any length); the
    backing name moves to 4 KiB to make room."""
    q = Qcow(path)
    name = q.get(q["backing_file_offset"], q["backing_file_size"])
    q.put(4096, name)
    q["backing_file_offset"] = 4096
    off, length = q.extension(EXT_BACKING_FORMAT)
    after = off + 8 + (length + 7) // 8 * 8
    end = max(o + 8 + (n + 7) // 8 * 8 for _, o, n in q.extensions()) + 8   # with END
    rest = q.get(after, end - after)
    new = struct.pack(">II", EXT_BACKING_FORMAT, len(payload)) + payload
    new += bytes(-len(new) % 8) + rest
    assert off + len(new) <= q["backing_file_offset"], "no room before the backing name"
    q.put(off, new)


@pytest.mark.parametrize("payload, layer", [
    (b"", "qcow2"), (b"\0\0\0", "qcow2"), (b"qcow2\0x", "qcow2"), (b"file", "raw")],
    ids=["empty", "nuls", "nul-inside", "file-protocol"])
def test_backing_format_as_qemu_reads_it(tmp_path, payload, layer):
    """The backing format is a C string: empty (or NULs) means probe, a NUL ends it. `file`
    (qemu-img create -F file) is QEMU's protocol driver: the file's bytes, as raw."""
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    _set_backing_format(top, payload)
    with qcowfast.open(top) as img:
        assert isinstance(img.backing, qcowfast.Image if layer == "qcow2" else
                          qcowfast.image.RawImage)
    assert_matches_qemu(top)
    want = json.loads(qemu_img("info", "--output=json", "--backing-chain", top).stdout)
    assert qcowfast.info(top, backing_chain=True) == want
    assert qcowfast.check(top).exit_code == 0


def test_backing_format_of_16_bytes_refused(tmp_path):
    """QEMU keeps the format in char[16] and refuses an extension of 16 bytes or more."""
    make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    _set_backing_format(top, b"qcow2".ljust(16, b"\0"))
    want = subprocess.run(["qemu-img", "info", top], capture_output=True, text=True)
    assert want.returncode == 1 and "len=16 too large (>=16)" in want.stderr
    for call in (qcowfast.open, qcowfast.info):
        with pytest.raises(qcowfast.FormatError, match=r"len=16 too large \(>=16\)"):
            call(top)


# --------------------------------------------------------------------------------------------
# Read-only, even when dirty


def _open_fds_for(paths) -> dict[str, int]:
    """{path: access mode} of this process's descriptors open on `paths`."""
    want = {os.path.realpath(p) for p in paths}
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in want:
            flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            out[target] = flags & os.O_ACCMODE
    return out


@pytest.mark.parametrize("bits", ["dirty", "corrupt", "dirty+lazy-refcounts"])
def test_source_never_written(tmp_path, bits):
    base = make_base(tmp_path / "base.qcow2")
    top = make_top(tmp_path / "top.qcow2", "base.qcow2")
    qemu_io(top, "write -c -P 0x33 128k 64k", "write -z 256k 64k")
    q = Qcow(top)
    q["incompatible_features"] = 1 if bits.startswith("dirty") else 2
    if "lazy" in bits:
        q["compatible_features"] = 1
    files = [top, base]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    with qcowfast.open(top) as img:
        modes = _open_fds_for(files)
        assert modes and set(modes.values()) == {os.O_RDONLY}, modes
        img.map()
        img.read(0, img.virtual_size)
    qcowfast.convert(top, tmp_path / "out.raw")
    qcowfast.convert(top, io.BytesIO())
    qcowfast.info(top, backing_chain=True)
    qcowfast.check(top)
    assert run_cli("map", "--output", "json", top).returncode == 0
    for p in files:
        assert (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_size) == before[p], p


# --------------------------------------------------------------------------------------------
# Chains: depth limit and loops


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory) -> list[Path]:
    """66 qcow2 files, chain[i] backed by chain[i + 1]: 65 backing links from chain[0]."""
    d = tmp_path_factory.mktemp("deep")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "l65.qcow2", "64k", cwd=d)
    qemu_io(d / "l65.qcow2", "write -P 0x65 0 4k")
    for i in range(64, -1, -1):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-u",
                 "-b", f"l{i + 1:02d}.qcow2", "-F", "qcow2", f"l{i:02d}.qcow2", "64k", cwd=d)
    qemu_io(d / "l00.qcow2", "write -P 0x01 4k 4k")
    return [d / f"l{i:02d}.qcow2" for i in range(66)]


def test_chain_deeper_than_default_refused(deep_chain):
    # The message names the image that was opened, not the layer where the limit was reached.
    with pytest.raises(BackingChainError, match=r"chain of \S*l00\.qcow2 is deeper than 64 "
                                                r"\(the backing file of \S*l64\.qcow2 would "
                                                r"be layer 65\)"):
        qcowfast.open(deep_chain[0])
    data = read_all(deep_chain[1])            # 64 backing links: the limit itself is fine
    assert data[:4] == b"\x65" * 4
    data = read_all(deep_chain[0], max_depth=65)
    assert data[:4] == b"\x65" * 4 and data[4096:4100] == b"\x01" * 4


def test_chain_depth_option(deep_chain, tmp_path):
    with pytest.raises(BackingChainError, match="deeper than 2"):
        qcowfast.open(deep_chain[62], max_depth=2)
    read_all(deep_chain[63], max_depth=2)
    proc = run_cli("convert", "-q", deep_chain[0], tmp_path / "o.raw")
    assert proc.returncode == 1 and "l00.qcow2 is deeper than 64" in proc.stderr
    for command in (["map"], ["check"], ["compare", deep_chain[1]]):
        proc = run_cli(*command[:1], deep_chain[0], *command[1:])
        assert proc.returncode == (2 if command[0] == "compare" else 1), proc.stderr
        assert "chain of " + str(deep_chain[0]) + " is deeper than 64" in proc.stderr, command


@pytest.mark.parametrize("how", ["self", "two", "three", "hardlink", "symlink"])
def test_backing_loops_refused(tmp_path, how):
    d = tmp_path
    for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", name, "1M", cwd=d)

    def link(src, dst):
        qemu_img("rebase", "-u", "-b", dst, "-F", "qcow2", src, cwd=d)

    if how == "self":
        link("a.qcow2", "a.qcow2")
    elif how == "two":
        link("a.qcow2", "b.qcow2"), link("b.qcow2", "a.qcow2")
    elif how == "three":
        link("a.qcow2", "b.qcow2"), link("b.qcow2", "c.qcow2"), link("c.qcow2", "b.qcow2")
    elif how == "hardlink":
        os.link(d / "a.qcow2", d / "alias.qcow2")
        link("a.qcow2", "alias.qcow2")
    else:
        os.symlink("a.qcow2", d / "alias.qcow2")
        link("a.qcow2", "alias.qcow2")
    with pytest.raises(BackingChainError, match="loops"):
        qcowfast.open(d / "a.qcow2")


# --------------------------------------------------------------------------------------------
# Bounded resources: a 1 EiB image with one allocated cluster

EIB = 1 << 60
# What `qemu-img map --output=json` prints for the image (it takes minutes to say so).
EXABYTE_MAP = [
    {"start": 0, "length": 1 << 40, "depth": 0, "present": False, "zero": True, "data": False},
    {"start": 1 << 40, "length": 2 * M, "depth": 0, "present": True, "zero": False, "data": True,
     "offset": 24 * M},
    {"start": (1 << 40) + 2 * M, "length": EIB - (1 << 40) - 2 * M, "depth": 0, "present": False,
     "zero": True, "data": False},
]


@pytest.fixture(scope="module")
def exabyte(tmp_path_factory) -> Path:
    """1 EiB virtual, 2 MiB clusters (its L1 table is 16 MiB), one cluster written at 1 TiB."""
    d = tmp_path_factory.mktemp("exabyte")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "big.qcow2", EIB, cwd=d)
    qemu_io(d / "big.qcow2", "write -P 0x5a 1T 64k")
    return d / "big.qcow2"


def _sparse_capable_dir(fallback: Path) -> Path:
    """A directory whose file system holds a 1 EiB sparse file (tmpfs does; ext4 stops at 16 TiB)."""
    for cand in (Path("/dev/shm"), fallback):
        try:
            probe = cand / f".qcowfast-probe-{os.getpid()}"
            with open(probe, "wb") as f:
                f.truncate(EIB)
            probe.unlink()
            return cand
        except OSError:
            continue
    pytest.fail("no file system here holds a 1 EiB sparse file")


_EXABYTE_CHILD = textwrap.dedent("""
    import io, json, os, resource, sys, time
    import qcowfast
    src, dst = sys.argv[1], sys.argv[2]

    def hwm_kib():
        # VmHWM: this process's own peak; ru_maxrss also carries the parent's peak over exec.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    t0 = time.perf_counter()
    with qcowfast.open(src) as img:
        entries = img.map()
        data = img.read((1 << 40) - 4, 8)
    result = qcowfast.convert(src, dst)
    refused = None
    try:
        qcowfast.convert(src, io.BytesIO())
    except qcowfast.OutputError as exc:
        refused = str(exc)
    st = os.stat(dst)
    print(json.dumps(dict(
        seconds=time.perf_counter() - t0, maxrss_kib=hwm_kib(),
        entries=entries, data=data.hex(), written=result.bytes_written, size=st.st_size,
        blocks=st.st_blocks, refused=refused)))
    os.unlink(dst)
""")


def test_exabyte_image_bounded(exabyte, tmp_path):
    out_dir = _sparse_capable_dir(tmp_path)
    dst = out_dir / f"qcowfast-exabyte-{os.getpid()}.raw"
    try:
        proc = subprocess.run([sys.executable, "-c", _EXABYTE_CHILD, str(exabyte), str(dst)],
                              capture_output=True, text=True, timeout=120)
    finally:
        if dst.exists():
            dst.unlink()
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["entries"] == EXABYTE_MAP
    assert r["data"] == "00000000" + "5a5a5a5a"
    assert r["size"] == EIB and r["written"] == 64 * K
    assert r["blocks"] * 512 <= 4 * M, "the output is not sparse"
    assert r["refused"] and "max_stream_size" in r["refused"]
    assert r["seconds"] < 10, f"took {r['seconds']:.1f} s"
    assert r["maxrss_kib"] < 200 * 1024, f"peak RSS {r['maxrss_kib'] // 1024} MiB"


def test_stream_limit(pristine_small):
    with pytest.raises(OutputError, match="max_stream_size"):
        qcowfast.convert(pristine_small, io.BytesIO(), max_stream_size=M - 1)
    out = io.BytesIO()
    qcowfast.convert(pristine_small, out, max_stream_size=M)
    assert out.getvalue() == reference_raw(pristine_small)
    out = io.BytesIO()
    qcowfast.convert(pristine_small, out, max_stream_size=None)
    assert len(out.getvalue()) == M


@pytest.fixture(scope="module")
def pristine_small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    return make_base(d / "small.qcow2")


def test_l2_table_referenced_twice_refused(exabyte, tmp_path):
    """Every L1 entry pointing at one L2 table would make 16 MiB of metadata stand for 2^39
    entries of work: an L1 table may reference each L2 table once."""
    img = tmp_path / "dup.qcow2"
    shutil.copyfile(exabyte, img)
    q = Qcow(img)
    entry = q.l1((1 << 40) // (2 * M * (2 * M // 8)))
    assert entry & OFFSET_MASK
    for i in range(4):
        q.set_l1(i, entry)
    with pytest.raises(CorruptImage, match=hex(entry & OFFSET_MASK)):
        with qcowfast.open(img) as im:
            im.map()
