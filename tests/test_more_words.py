"""qemu-img's and qemu-nbd's words where qcowfast used to print its own, against the real tools.

1. An output convert cannot create (a missing directory, a file as a directory, a name too long,
   a directory, a symlink loop or into nowhere, a socket, no permission, a read-only file
   system): "DST: error while converting FMT: Could not create 'DST': REASON", and with -n
   "Could not open 'DST': Could not open 'DST': REASON"; the same words in convert-many's job
   lines and in the Python API's OutputError; the create error before -t and before the -o
   values qemu-img checks once the file exists.
2. measure: -l snapshot.* parsed as qemu-img parses it; an -O that QEMU knows but does not
   measure ("Block driver 'vmdk' does not support size measurement"), cannot create, or (luks)
   measures only with a key secret.
3. serve: an image qemu-nbd cannot open, "Failed to blk_new_open 'IMG': ...", and a snapshot it
   cannot load.
4. A bitmaps extension without its autoclear bit: qemu-img's two-line warning, whose last line
   ends without a newline, printed where QEMU's extension walk prints it (also before a refusal).

Each case runs the same command line through the QEMU tool and qcowfast and compares the exit
status and standard error (the tool's name replaced by qcowfast's).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import qcowfast
from common import QEMU_IMG, cli_in_process, qemu_img, run_cli

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
TIMEOUT = 60


def _qemu(argv: list[str], tool: str = QEMU_IMG, user: list[str] = (), cwd=None
          ) -> tuple[int, str, str]:
    proc = subprocess.run([*user, tool, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr.replace(f"{tool}: ", "qcowfast: ")


def _ours(argv: list[str], user: list[str] = (), cwd=None) -> tuple[int, str, str]:
    proc = subprocess.run([*user, sys.executable, "-m", "qcowfast", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


# --------------------------------------------------------------------------------------------
# 1. Outputs that cannot be created

@pytest.fixture(scope="module")
def outs():
    """A directory user nobody may enter but not write to, holding the source, what the
    destinations below name, and a read-only tmpfs (`rofs`) with one file."""
    d = Path(tempfile.mkdtemp(prefix="qcowfast-words-", dir="/tmp"))
    rofs = d / "rofs"
    rofs.mkdir()
    mounted = False
    try:
        os.chmod(d, 0o755)
        qemu_img("create", "-q", "-f", "qcow2", d / "src.qcow2", "1M")
        os.chmod(d / "src.qcow2", 0o644)
        (d / "afile").write_bytes(b"")
        (d / "adir").mkdir()
        (d / "loop1").symlink_to("loop2")
        (d / "loop2").symlink_to("loop1")
        (d / "dangle").symlink_to("nowhere/x")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(d / "sock"))
        sock.close()
        (d / "rodir").mkdir(mode=0o555)
        os.chmod(d / "rodir", 0o555)
        (d / "private").mkdir(mode=0o700)
        (d / "ro.img").write_bytes(bytes(1 << 20))          # root's, 0644
        os.chmod(d / "ro.img", 0o644)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", rofs], check=True)
        mounted = True
        (rofs / "old.img").write_bytes(bytes(2 << 20))
        subprocess.run(["mount", "-o", "remount,ro", rofs], check=True)
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", rofs], check=True)
        if (d / "rodir").exists():
            os.chmod(d / "rodir", 0o755)
        shutil.rmtree(d)


LONG = "x" * 256
# Destinations qemu-img cannot create, as root: {case: path under the fixture's directory}.
AS_ROOT = {"missing-directory": "nodir/out.img", "file-as-directory": "afile/out.img",
           "name-too-long": LONG, "missing-directory-long-name": f"nodir/{LONG}",
           "directory": "adir", "symlink-loop": "loop1", "symlink-into-nowhere": "dangle",
           "socket": "sock", "read-only-file-system": "rofs/new.img",
           "read-only-file-system-old-file": "rofs/old.img"}
# ...and as nobody (root may write anywhere).
AS_USER = {"directory-not-writable": "rodir/new.img", "file-not-writable": "ro.img",
           "directory-not-searchable": "private/x.img"}
# -n opens the target: these fail that open.
EXISTING = {"file-as-directory": "afile/out.img", "name-too-long": LONG, "directory": "adir",
            "symlink-loop": "loop1", "symlink-into-nowhere": "dangle", "socket": "sock",
            "read-only-file-system": "rofs/old.img"}
EXISTING_AS_USER = {"file-not-writable": "ro.img"}


def _cases(table: dict, user: bool) -> list:
    return [pytest.param(path, user, fmt, id=f"{case}-{fmt}")
            for case, path in table.items() for fmt in ("raw", "qcow2")]


_FILE_OUTPUT = """
import sys, types
from qcowfast.errors import OutputError
from qcowfast.output import FileOutput
dst, fmt, existing = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
try:
    with FileOutput(dst, types.SimpleNamespace(chain=()), overwrite=True, existing=existing,
                    format=fmt):
        print("opened")
except OutputError as exc:
    print(f"Could not open '{exc.qemu_top}': {exc.qemu_chain}" if existing else
          f"{dst}: {exc.unnamed}", "|", exc)
"""


def _file_output_words(dst: str, fmt: str, existing: bool, user: bool) -> tuple[str, str]:
    """(qemu-img's line as FileOutput words it, str() of the OutputError), in a process of
    the user's."""
    proc = subprocess.run([*(AS_NOBODY if user else ()), sys.executable, "-c", _FILE_OUTPUT,
                           dst, fmt, "1" if existing else "0"],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    line, _, text = proc.stdout.rstrip("\n").partition(" | ")
    return line, text


@pytest.mark.parametrize("path, user, fmt", _cases(AS_ROOT, False) + _cases(AS_USER, True))
def test_output_that_cannot_be_created_is_refused_in_qemu_img_words(outs, path, user, fmt):
    """The destination's own refusal (FileOutput) is qemu-img's line; the OutputError keeps
    naming the destination first."""
    dst = str(outs / path)
    src = str(outs / "src.qcow2")
    status, _, err = _qemu(["convert", "-O", fmt, src, dst], user=AS_NOBODY if user else ())
    assert status == 1 and err.startswith(f"qcowfast: {dst}: error while converting {fmt}: "
                                          f"Could not create '{dst}': "), err
    line, text = _file_output_words(dst, fmt, False, user)
    assert f"qcowfast: {line}\n" == err
    assert text == line


@pytest.mark.parametrize("path, user, fmt", _cases(EXISTING, False)
                         + _cases(EXISTING_AS_USER, True))
def test_target_that_cannot_be_opened_with_n_fails_as_qemu_img(outs, path, user, fmt):
    dst = str(outs / path)
    argv = ["convert", "-n", "-O", fmt, str(outs / "src.qcow2"), dst]
    want = _qemu(argv, user=AS_NOBODY if user else ())
    assert want[0] == 1 and want[2].startswith(f"qcowfast: Could not open '{dst}': "
                                               f"Could not open '{dst}': "), want
    assert _ours(argv, user=AS_NOBODY if user else ()) == want
    assert _file_output_words(dst, fmt, True, user)[0] == want[2][len("qcowfast: "):-1]


@pytest.mark.parametrize("path, user, fmt", _cases(AS_ROOT, False) + _cases(AS_USER, True))
def test_convert_that_cannot_create_its_output_fails_as_qemu_img(outs, path, user, fmt):
    dst = str(outs / path)
    argv = ["convert", "-q", "-O", fmt, str(outs / "src.qcow2"), dst]
    want = _qemu(argv, user=AS_NOBODY if user else ())
    assert want[0] == 1
    assert _ours(argv, user=AS_NOBODY if user else ()) == want


def test_a_file_only_the_directory_keeps_from_replacing_is_still_refused(outs):
    """qemu-img rewrites a writable file in a directory its user cannot write; qcowfast, which
    writes a new file and renames it over the old one, refuses (a documented difference) in
    its own words, naming the directory."""
    mine = outs / "rodir" / "mine.img"
    os.chmod(outs / "rodir", 0o755)
    try:
        mine.write_bytes(bytes(1 << 20))
        os.chown(mine, NOBODY, NOBODY)
    finally:
        os.chmod(outs / "rodir", 0o555)
    argv = ["convert", "-q", "-O", "raw", str(outs / "src.qcow2"), str(mine)]
    assert _qemu(argv, user=AS_NOBODY) == (0, "", "")
    status, _, err = _ours(argv, user=AS_NOBODY)
    assert (status, err) == (1, f"qcowfast: cannot create a temporary file beside {mine} in "
                                f"{outs / 'rodir'}: Permission denied\n")


def test_the_python_api_names_the_destination(outs):
    dst = outs / "nodir" / "out.img"
    with pytest.raises(qcowfast.OutputError) as info:
        qcowfast.convert(str(outs / "src.qcow2"), str(dst))
    assert str(info.value).startswith(f"{dst}: ")
    assert str(info.value).endswith(f"Could not create '{dst}': No such file or directory")


def test_the_python_api_says_qemu_img_words(outs):
    dst = str(outs / "nodir" / "out.img")
    want = _qemu(["convert", "-O", "qcow2", str(outs / "src.qcow2"), dst])
    with pytest.raises(qcowfast.OutputError) as info:
        qcowfast.convert(str(outs / "src.qcow2"), dst, format="qcow2")
    assert f"qcowfast: {info.value}\n" == want[2]


def test_convert_many_job_lines_carry_qemu_img_words(outs, tmp_path):
    src = str(outs / "src.qcow2")
    dsts = [str(outs / p) for p in ("nodir/out.img", "afile/out.img", "adir", "dangle")]
    jobs = tmp_path / "jobs"
    jobs.write_text("".join(f"{src} {dst}\n" for dst in dsts))
    got = run_cli("convert-many", "--jobs", jobs)
    assert got.returncode == 1
    lines = sorted(line for line in got.stderr.splitlines() if line.startswith("FAILED"))
    want = sorted(f"FAILED  {src} -> {dst}: "
                  + _qemu(["convert", "-O", "raw", src, dst])[2][len("qcowfast: "):-1]
                  for dst in dsts)
    assert lines == want


# Where qemu-img refuses once the output file is created (-t; qcow2's -o values, raw's
# preallocation=metadata; what qcowfast refuses of its own) it says first that it cannot
# create it. Its refusals before that point stay first.
ORDER = [["-t", "bogus"],
         ["-t", "bogus", "-O", "qcow2"],
         ["-O", "qcow2", "-o", "cluster_size=3"],
         ["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"],
         ["-O", "qcow2", "-o", "data_file=x"],
         ["-O", "qcow2", "-o", "preallocation=full"],
         ["-O", "raw", "-o", "preallocation=metadata"],
         ["-O", "raw", "-o", "preallocation=bad"], ["-O", "qcow2", "-o", "bogus=1"],
         ["-O", "qcow2", "-o", "extent_size_hint=99999999999"], ["-c", "-O", "raw"],
         ["-T", "bogus"]]


@pytest.mark.parametrize("options", ORDER, ids=" ".join)
def test_create_error_comes_where_qemu_img_creates_the_file(capsys, outs, options):
    argv = ["convert", *options, str(outs / "src.qcow2"), str(outs / "nodir" / "x")]
    want = _qemu(argv)
    assert want[0] == 1
    assert cli_in_process(capsys, *argv) == want


# --------------------------------------------------------------------------------------------
# 2. measure

MEASURE = [
    ["-l", "snapshot.bogus=1", "IMG"], ["-l", "snapshot.id=1,bogus=2", "IMG"],
    ["-l", "snapshot.help", "IMG"], ["-l", "snapshot.id=1,help", "IMG"],
    ["-l", "snapshot.id=x,id=1!", "IMG"], ["-l", "snapshot.bogus=1", "--size", "1G"],
    ["-l", "snapshot.bogus=1"], ["-l", "snapshot.bogus=1", "-O", "bogus", "IMG"],
    ["--size", "abc", "-l", "snapshot.bogus=1"],
    ["-O", "vmdk", "--size", "1G"], ["-O", "vmdk", "IMG"], ["-O", "vpc", "--size", "1G"],
    ["-O", "qcow", "--size", "1G"], ["-O", "vdi", "IMG"], ["-O", "vhdx", "--size", "1G"],
    ["-O", "qed", "--size", "1G"], ["-O", "parallels", "--size", "1G"],
    ["-O", "file", "IMG"], ["-O", "host_device", "--size", "1G"], ["-O", "nbd", "--size", "1G"],
    ["-O", "ssh", "--size", "1G"], ["-O", "null-co", "--size", "1G"],
    ["-O", "blkdebug", "IMG"], ["-O", "vvfat", "--size", "1G"], ["-O", "bogus", "--size", "1G"],
    ["-O", "vmdk", "-o", "bogus=1", "--size", "1G"],
    ["-O", "vmdk", "-o", "subformat=x,compat6", "--size", "1G"],
    ["-O", "vmdk", "-o", "size=x", "IMG"], ["-O", "vmdk", "-o", "nocow=x", "--size", "1G"],
    ["-O", "qcow", "-o", "encrypt.format=aes", "--size", "1G"],
    ["-O", "qcow", "-o", "encrypt.cipher-alg=aes", "--size", "1G"],
    ["-O", "gluster", "-o", "debug=x", "--size", "1G"],
    ["-O", "vmdk", "-f", "raw", "-l", "snap", "IMG"], ["-O", "vmdk", "MISSING"],
    ["-O", "luks", "--size", "1G"], ["-O", "luks", "IMG"],
    ["-O", "luks", "-o", "key-secret=s0", "--size", "1G"],
    ["-O", "luks", "-o", "cipher-alg=des-rfb", "--size", "1G"],
    ["-O", "luks", "-o", "cipher-alg=twofish-192,cipher-mode=xts", "--size", "1G"],
    ["-O", "luks", "-o", "hash-alg=x,ivgen-hash-alg=y", "--size", "1G"],
    ["-O", "luks", "-o", "ivgen-alg=bogus,cipher-mode=bogus", "--size", "1G"],
    ["-O", "luks", "-o", "iter-time=9223372036854775808", "--size", "1G"],
    ["-O", "luks", "-o", "iter-time=-1,cipher-alg=bogus", "--size", "1G"],
    ["-O", "luks", "-o", "iter-time=5k", "--size", "1G"],
    ["-O", "luks", "-o", "size=2G,preallocation=bogus", "--size", "1G"],
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("measure")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    return {"IMG": str(d / "img.qcow2"), "MISSING": str(d / "missing.qcow2")}


@pytest.mark.parametrize("argv", MEASURE, ids=" ".join)
def test_measure_fails_as_qemu_img(capsys, measured, argv):
    argv = ["measure", *(measured.get(a, a) for a in argv)]
    want = _qemu(argv)
    assert want[0] == 1, want
    assert cli_in_process(capsys, *argv) == want


def test_luks_with_a_key_secret_is_refused_by_name(capsys, measured):
    """With its secret defined, qemu-img measures a LUKS image; qcowfast does not."""
    argv = ["measure", "--object", "secret,id=s0,data=x", "-O", "luks", "-o", "key-secret=s0",
            "--size", "1G"]
    assert cli_in_process(capsys, *argv) == (
        1, "", "qcowfast: -O luks: qcowfast measures qcow2 and raw images\n")


# --------------------------------------------------------------------------------------------
# 3. serve

def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """Images qemu-nbd cannot open, and one it can (img.qcow2)."""
    d = tmp_path_factory.mktemp("serve")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    shutil.copyfile(d / "img.qcow2", d / "bad.qcow2")
    _patch(d / "bad.qcow2", 96, ">I", 7)                        # refcount_order 7
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2",
             d / "top.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "bad.qcow2", "-F", "qcow2",
             d / "top-bad.qcow2", "1M")
    (d / "plain").write_bytes(b"")
    (d / "adir").mkdir()
    (d / "loop1").symlink_to("loop2")
    (d / "loop2").symlink_to("loop1")
    return d


def _serve_both(d: Path, args: list[str]) -> tuple[tuple, tuple]:
    """(qemu-nbd's (status, stderr), qcowfast serve's) for an image that cannot be served:
    each listens on its own socket under `d`, and must end by itself (status 1)."""
    outcomes = []
    for tool, sock in (("qemu-nbd", d / "q.sock"), ("qcowfast", d / "f.sock")):
        argv = ["-r", "-k", str(sock), *args]
        if tool == "qemu-nbd":
            status, _, err = _qemu(argv, tool="qemu-nbd", cwd=d)
            if sock.exists():
                sock.unlink()                   # (qemu-nbd listens before it opens the image)
        else:
            status, _, err = _ours(["serve", *argv], cwd=d)
            assert not sock.exists()
        outcomes.append((status, err))
    return outcomes[0], outcomes[1]


SERVE = [["missing.qcow2"], ["adir"], ["loop1"], ["plain/x"], ["bad.qcow2"], ["top.qcow2"],
         ["top-bad.qcow2"], ["-f", "bogus", "img.qcow2"], ["-f", "vmdk", "missing.qcow2"],
         ["-f", "file", "adir"], ["-f", "qcow2", "plain"], ["-f", "raw", "missing.qcow2"],
         ["-l", "snap", "img.qcow2"], ["-l", "snapshot.id=1", "img.qcow2"],
         ["-f", "raw", "-l", "snap", "img.qcow2"], ["-l", "snapshot.id=1", "missing.qcow2"],
         ["--aio=native", "missing.qcow2"], ["--aio=native", "adir"],
         ["--aio=native", "bad.qcow2"], ["--aio=native", "-f", "bogus", "img.qcow2"],
         ["--aio=native", "-f", "vmdk", "img.qcow2"],
         ["--aio=native", "-f", "raw", "-l", "snap", "img.qcow2"]]


@pytest.mark.parametrize("args", SERVE, ids=" ".join)
def test_serve_fails_to_open_as_qemu_nbd(served, args):
    want, got = _serve_both(served, args)
    assert want[0] == 1 and re.match("qcowfast: Failed to (blk_new_open|load snapshot)",
                                     want[1]), want
    assert got == want


@pytest.mark.parametrize("fmt", ["vmdk", "qcow", "nbd"])
def test_serve_format_qemu_has_but_qcowfast_lacks(served, fmt):
    """qemu-nbd's driver says what it finds wrong with the file; qcowfast names the option
    after qemu-nbd's "Failed to blk_new_open 'IMG': "."""
    want, got = _serve_both(served, ["-f", fmt, "img.qcow2"])
    prefix = "qcowfast: Failed to blk_new_open 'img.qcow2': "
    assert want[0] == got[0] == 1 and want[1].startswith(prefix)
    assert got[1] == f"{prefix}-f {fmt}: qcowfast reads qcow2 and raw images\n"


# --------------------------------------------------------------------------------------------
# 4. Stale bitmaps

BITMAPS_EXT, CRYPTO_EXT = 0x23852875, 0x0537BE77


def _end_marker(data: bytes, start: int) -> int:
    while True:
        ext_type, length = struct.unpack_from(">II", data, start)
        if ext_type == 0:
            return start
        start += 8 + (length + 7) // 8 * 8


@pytest.fixture(scope="module")
def stale(tmp_path_factory) -> dict:
    """Images whose bitmaps extension lost its autoclear bit, alone and with a header fault
    QEMU meets after its walk of the extensions (it has warned then) or before it."""
    d = tmp_path_factory.mktemp("stale")
    qemu_img("create", "-q", "-f", "qcow2", d / "good.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", d / "bitmap.qcow2", "1M")
    qemu_img("bitmap", "--add", d / "bitmap.qcow2", "b0")
    base = bytearray((d / "bitmap.qcow2").read_bytes())
    struct.pack_into(">Q", base, 88, 0)                          # autoclear: none
    feature_table = struct.unpack_from(">I", base, 100)[0]       # the first extension
    crypto = struct.pack(">II", CRYPTO_EXT, 16) + struct.pack(">QQ", 0x10000, 4096)
    cases = {"stale": [], "unknown-feature": [(72, ">Q", 1 << 5)],
             "unknown-feature-and-refcount-order": [(72, ">Q", 1 << 5), (96, ">I", 7)],
             "data-file-raw": [(88, ">Q", 2)], "refcount-order": [(96, ">I", 7)],
             "image-too-big": [(24, ">Q", 1 << 62)],
             "broken-extension-first": [(feature_table + 4, ">I", 0xFFFF)],
             "unknown-feature-broken-extension-first": [(72, ">Q", 1 << 5),
                                                        (feature_table + 4, ">I", 0xFFFF)]}
    out = {"good": str(d / "good.qcow2")}
    for name, fields in cases.items():
        data = bytearray(base)
        for offset, fmt, value in fields:
            struct.pack_into(fmt, data, offset, value)
        (d / f"{name}.qcow2").write_bytes(data)
        out[name] = str(d / f"{name}.qcow2")
    data = bytearray(base)                                       # a CRYPTO extension after it
    end = _end_marker(data, feature_table)
    data[end:end + len(crypto) + 8] = crypto + bytes(8)
    (d / "broken-extension-after.qcow2").write_bytes(data)
    out["broken-extension-after"] = str(d / "broken-extension-after.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "1M")
    data = bytearray((d / "v2.qcow2").read_bytes())              # (extensions start at 72)
    data[72:72 + 40] = struct.pack(">II", BITMAPS_EXT, 24) + struct.pack(
        ">IIQQ", 1, 0, 1024, 0x30000) + bytes(8)
    (d / "v2.qcow2").write_bytes(data)
    out["v2"] = str(d / "v2.qcow2")
    return out


STALE = ["stale", "unknown-feature", "unknown-feature-and-refcount-order", "data-file-raw",
         "refcount-order", "image-too-big", "broken-extension-first",
         "unknown-feature-broken-extension-first", "broken-extension-after", "v2"]
WARNING = re.compile(r"qemu-img: warning: (.*?fix\.)", re.S)


def _opened(api: str, image: str) -> None:
    if api == "open":
        qcowfast.open(image).close()
    else:
        getattr(qcowfast, api)(image)


@pytest.mark.parametrize("api, command", [("info", "info"), ("check", "check"),
                                          ("open", "map")])
@pytest.mark.parametrize("case", STALE)
def test_stale_bitmaps_warning_is_qemus_and_where_qemu_warns(stale, case, api, command):
    """The warning carries qemu-img's text (`qemu_text`) and comes where QEMU's walk of the
    extensions warns: also before the refusal of a header fault it meets after the walk, never
    before one it meets first. Its message names the image where it is known."""
    image = stale[case]
    want = subprocess.run([QEMU_IMG, command, image], capture_output=True, text=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            _opened(api, image)
            failed = False
        except qcowfast.QcowError:
            failed = True
    assert failed == ("Could not open" in want.stderr), want.stderr
    stale_seen = [w.message for w in seen
                  if issubclass(w.category, qcowfast.StaleBitmapsWarning)]
    assert [w.qemu_text for w in stale_seen] == WARNING.findall(want.stderr)
    for message in stale_seen:
        assert str(message).endswith("some clusters may be leaked ('qemu-img check -r' frees "
                                     "them)")
        if api != "check":
            assert str(message).startswith(f"{image}: ")


@pytest.mark.parametrize("command", ["info", "check", "map", "measure", "convert", "compare"])
@pytest.mark.parametrize("case", STALE)
def test_stale_bitmaps_warn_as_qemu_img(capsys, stale, tmp_path, case, command):
    """(compare opens the good image first; an image compared with itself warns twice in
    qemu-img, once per open.)"""
    image = stale[case]
    argv = {"convert": ["convert", "-q", "-O", "raw", image, str(tmp_path / "out.raw")],
            "compare": ["compare", stale["good"], image]}.get(command, [command, image])
    want = _qemu(argv)
    (tmp_path / "out.raw").unlink(missing_ok=True)
    assert cli_in_process(capsys, *argv) == want


@pytest.mark.parametrize("case", STALE)
def test_batch_planning_adds_no_stale_bitmaps_warning(stale, case, tmp_path):
    """convert_many reads each job's header to plan the batch (its chain, its cost): that look
    is no open of the image and warns of nothing; the job itself warns as convert does."""
    from qcowfast.fleet import convert_many

    def stale_warnings(run) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run()
        return sum(issubclass(w.category, qcowfast.StaleBitmapsWarning) for w in seen)

    def single():
        with contextlib.suppress(qcowfast.QcowError):
            qcowfast.convert(stale[case], tmp_path / "one.raw")
    alone = stale_warnings(single)
    assert stale_warnings(lambda: convert_many([(stale[case], tmp_path / "batch.raw")])) == alone
