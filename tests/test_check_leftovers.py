"""``check`` on broken snapshot tables, ``check -r`` before repairs, and snapshot L1 words.

Oracle: qemu-img 7.2 on the same file. ``qemu-img check`` opens an image without looking at its
snapshot table pointer (qcow2_do_open() in check mode) and checks it first thing
(qcow2_check_read_snapshot_table()): a table it cannot read stops the check ("ERROR ...", then
"Check failed: STRERROR", exit 1, no report). qcowfast's `check` raises `CheckFailed` there,
qemu-img's lines in its attributes; `check_open` raises what ``check -r`` fails with before it
would repair. A snapshot whose L1 table QEMU refuses to load carries QEMU's words in
`qemu_snapshot` ("Failed to load snapshot: WORDS"). Images: qemu-img and qemu-io, then the
header and snapshot table patched with struct (docs/interop/qcow2.txt).
"""
from __future__ import annotations

import importlib
import os
import shutil
import struct
import subprocess

import pytest

import qcowfast
from qcowfast.cli import error_text

from common import QEMU_IMG, qemu_img, qemu_io, run_cli

K = 1024
ENTRY = struct.Struct(">QIHHIIQII")         # QCowSnapshotHeader
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)      # QEMU: reads ending past it fail (EIO)


def _check_module():
    return importlib.import_module("qcowfast.check")


def _qemu(*args, cwd) -> tuple[int, str, str]:
    """qemu-img ARGS: (exit code, stdout, stderr with its prefix as qcowfast's)."""
    proc = subprocess.run([QEMU_IMG, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr.replace("qemu-img: ", "qcowfast: ")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """4 MiB, 64 KiB clusters, two internal snapshots (s1, s2) with data between them."""
    d = tmp_path_factory.mktemp("leftovers")
    img = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 200k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 64k 4k")
    qemu_img("snapshot", "-c", "s2", img)
    return img


def _entries(path) -> list[int]:
    """Offsets of the snapshot table's entries."""
    data = path.read_bytes()
    nb, pos = struct.unpack_from(">IQ", data, 60)
    out = []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        out.append(pos)
        e = ENTRY.unpack_from(data, pos)
        pos += ENTRY.size + e[8] + e[2] + e[3]
    return out


def _put(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _broken(pristine, tmp_path, name, mutate):
    img = tmp_path / f"{name}.qcow2"
    shutil.copyfile(pristine, img)
    mutate(img, _entries(img))
    return img


def _snapshots_offset(p, e, value):
    _put(p, 64, ">Q", value)


def _second_l1(p, e, offset, size=None):
    _put(p, e[1], ">Q", offset)
    if size is not None:
        _put(p, e[1] + 8, ">I", size)


# What qcow2_check_read_snapshot_table() (or check_refcounts_l1()) stops the check on.
CHECK_FAILS = {
    "offset-unaligned": lambda p, e: _snapshots_offset(p, e, e[0] + 8),
    "offset-unaligned-no-snapshots": lambda p, e: (_put(p, 60, ">I", 0),
                                                   _snapshots_offset(p, e, e[0] + 8)),
    "too-many-snapshots": lambda p, e: _put(p, 60, ">I", 70000),
    "one-snapshot-too-many": lambda p, e: _put(p, 60, ">I", 65537),
    "too-many-and-unaligned": lambda p, e: (_put(p, 60, ">I", 70000),
                                            _snapshots_offset(p, e, e[0] + 8)),
    "extra-data-too-large": lambda p, e: _put(p, e[1] + 36, ">I", 1025),
    "extra-data-4-gib": lambda p, e: _put(p, e[1] + 36, ">I", 0xFFFFFFFF),
    "table-at-bdrv-max-length": lambda p, e: _snapshots_offset(p, e, BDRV_MAX_LENGTH),
    "table-below-2-63": lambda p, e: _snapshots_offset(p, e, 0x7FFFFFFFFFFF0000),
    "l1-past-2-63": lambda p, e: _second_l1(p, e, 0x7FFFFFFFFFF00000, 0x100000),
}


def _fails_as_qemu_img(command: str, img) -> None:
    """`command IMAGE` fails (exit 1) with qemu-img's stdout and stderr, run where it lies."""
    __tracebackhide__ = True
    want = _qemu(command, img.name, cwd=img.parent)
    assert want[0] == 1
    proc = run_cli(command, img.name, cwd=img.parent)
    assert (proc.returncode, proc.stdout, proc.stderr) == want


def _composed(exc) -> str:
    """qemu-img's stderr for a CheckFailed, from its attributes."""
    text = "".join(m + "\n" for m in exc.messages)
    if exc.qemu_error:
        text += f"qcowfast: {exc.qemu_error}\n"
    if exc.qemu_hint:
        text += exc.qemu_hint + "\n"
    return text + f"qcowfast: Check failed: {os.strerror(exc.qemu_errno)}\n"


@pytest.mark.parametrize("case", CHECK_FAILS)
def test_check_stops_where_qemu_img_check_stops(case, pristine, tmp_path):
    img = _broken(pristine, tmp_path, case, CHECK_FAILS[case])
    for output in ((), ("--output=json",)):
        code, out, err = _qemu("check", *output, img.name, cwd=tmp_path)
        assert (code, out) == (1, ""), err
        with pytest.raises(_check_module().CheckFailed) as failed:
            qcowfast.check(img)
        assert _composed(failed.value) == err
        proc = run_cli("check", *output, img.name, cwd=tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", err)


def test_unreadable_snapshot_l1_fails_the_check(pristine, tmp_path):
    """A snapshot L1 table ending past BDRV_MAX_LENGTH: check_refcounts_l1() cannot read it
    (EIO) after counting it as a range past the end of the file (named by its table in
    qcowfast's line, see README Differences)."""
    img = _broken(pristine, tmp_path, "l1-eio", lambda p, e: _second_l1(p, e, BDRV_MAX_LENGTH))
    code, out, err = _qemu("check", img.name, cwd=tmp_path)
    assert (code, out) == (1, "")
    with pytest.raises(_check_module().CheckFailed) as failed:
        qcowfast.check(img)
    got = _composed(failed.value).splitlines()
    want = err.splitlines()
    assert got[-2:] == want[-2:] == ["ERROR: I/O error in check_refcounts_l1",
                                     "qcowfast: Check failed: Input/output error"]
    assert len(got) == len(want) and got[0].startswith(want[0])
    proc = run_cli("check", img.name, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (1, "", got)


# Header faults after the snapshot pointer: qemu-img check's open reports them first.
OPEN_FAILS = {
    "unaligned-table-bad-l1": lambda p, e: (_snapshots_offset(p, e, e[0] + 8),
                                            _put(p, 40, ">Q", 0x30008)),
    "too-many-bad-l1": lambda p, e: (_put(p, 60, ">I", 70000), _put(p, 40, ">Q", 0x30008)),
}


@pytest.mark.parametrize("case", OPEN_FAILS)
def test_check_opens_without_the_snapshot_pointer(case, pristine, tmp_path):
    _fails_as_qemu_img("check", _broken(pristine, tmp_path, case, OPEN_FAILS[case]))


# calculate_refcounts()'s lines for a snapshot L1 table it skips (a corruption).
SKIPPED_L1 = {
    "l1-unaligned": lambda p, e: _second_l1(p, e, 0xD0008),
    "l1-too-large": lambda p, e: _put(p, e[1] + 8, ">I", 4 * K * K + 1),
}


@pytest.mark.parametrize("case", SKIPPED_L1)
def test_skipped_snapshot_l1_in_qemu_words(case, pristine, tmp_path):
    img = _broken(pristine, tmp_path, case, SKIPPED_L1[case])
    for output in ((), ("--output=json",)):
        want = _qemu("check", *output, img.name, cwd=tmp_path)
        assert want[0] == 2
        proc = run_cli("check", *output, img.name, cwd=tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == want


def _huge_table(p, e):
    """520 entries of 128 KiB ids and names past the end of the file: over 64 MiB."""
    with open(p, "r+b") as f:
        start = pos = -(-os.fstat(f.fileno()).st_size // (64 * K)) * 64 * K
        for _ in range(520):
            pos = (pos + 7) & ~7
            f.seek(pos)
            f.write(ENTRY.pack(0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0))
            pos += ENTRY.size + 2 * 0xFFFF
        f.truncate(pos)
    _put(p, 60, ">IQ", 520, start)


# qcow2_do_read_snapshots()'s refusals at open (info): its line and hint.
INFO_FAILS = {
    "extra-data-too-large": CHECK_FAILS["extra-data-too-large"],
    "table-at-bdrv-max-length": CHECK_FAILS["table-at-bdrv-max-length"],
    "table-below-2-63": CHECK_FAILS["table-below-2-63"],
    "table-over-64-mib": _huge_table,
}


@pytest.mark.parametrize("case", INFO_FAILS)
def test_snapshot_table_refused_at_open_in_qemu_words(case, pristine, tmp_path):
    img = _broken(pristine, tmp_path, case, INFO_FAILS[case])
    _fails_as_qemu_img("info", img)
    if case == "table-over-64-mib":
        with pytest.raises(_check_module().CheckFailed) as failed:
            qcowfast.check(img)
        assert _composed(failed.value) == _qemu("check", img.name, cwd=tmp_path)[2]


# qcow2_snapshot_load_tmp()'s refusals: "Failed to load snapshot: WORDS".
LOAD_FAILS = {
    "l1-unaligned": SKIPPED_L1["l1-unaligned"],
    "l1-too-large": SKIPPED_L1["l1-too-large"],
    "l1-past-2-63": CHECK_FAILS["l1-past-2-63"],
    "l1-at-bdrv-max-length": lambda p, e: _second_l1(p, e, BDRV_MAX_LENGTH),
    "empty-l1-past-bdrv-max-length": lambda p, e: _second_l1(p, e, BDRV_MAX_LENGTH + 64 * K, 0),
}


@pytest.mark.parametrize("case", LOAD_FAILS)
def test_snapshot_l1_refusal_carries_qemu_words(case, pristine, tmp_path):
    img = _broken(pristine, tmp_path, case, LOAD_FAILS[case])
    for args in (("convert", "-O", "raw", "-l", "s2", img.name, "out.raw"),
                 ("measure", "-l", "s2", img.name)):
        code, _, err = _qemu(*args, cwd=tmp_path)
        assert code == 1 and err.startswith("qcowfast: Failed to load snapshot: "), err
        words = err[len("qcowfast: Failed to load snapshot: "):].rstrip("\n")
        with pytest.raises(qcowfast.QcowError) as refused:
            qcowfast.open(img, snapshot="s2")
        assert getattr(refused.value, "qemu_snapshot", None) == words
        proc = run_cli(*args, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (code, err)
        if case == "l1-past-2-63":
            assert "2^63" in str(refused.value)     # (not "not aligned": it is aligned)


def test_check_repair_opens_the_chain_first(tmp_path, monkeypatch):
    """check -r with a missing backing file: qemu-img fails to open the chain before any
    repair is considered; check_open says so in its words."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "gone.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2", cwd=tmp_path)
    os.unlink(tmp_path / "gone.qcow2")
    monkeypatch.chdir(tmp_path)                 # (the names as given, relative)
    for mode in ("leaks", "all"):
        code, out, err = _qemu("check", "-r", mode, "top.qcow2", cwd=tmp_path)
        assert (code, out) == (1, "")
        with pytest.raises(qcowfast.QcowError) as failed:
            _check_module().check_open("top.qcow2", repair=mode)
        assert f"qcowfast: {error_text(failed.value, [('top.qcow2', None)])}\n" == err
        proc = run_cli("check", "-r", mode, "top.qcow2", cwd=tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (code, out, err)


# check -r MODE on a snapshot table QEMU does not repair in that mode: the check fails first.
REPAIR_FAILS = {
    ("too-many-snapshots", "leaks"): CHECK_FAILS["too-many-snapshots"],
    ("extra-data-too-large", "leaks"): CHECK_FAILS["extra-data-too-large"],
    ("offset-unaligned", "all"): CHECK_FAILS["offset-unaligned"],
    ("too-many-and-unaligned", "all"): CHECK_FAILS["too-many-and-unaligned"],
}


@pytest.mark.parametrize("case,mode", REPAIR_FAILS)
def test_check_repair_fails_before_repairing(case, mode, pristine, tmp_path):
    img = _broken(pristine, tmp_path, case, REPAIR_FAILS[case, mode])
    before = img.read_bytes()
    code, out, err = _qemu("check", "-r", mode, img.name, cwd=tmp_path)
    assert (code, out) == (1, "") and img.read_bytes() == before
    with pytest.raises(_check_module().CheckFailed) as failed:
        _check_module().check_open(img, repair=mode)
    assert _composed(failed.value) == err
    proc = run_cli("check", "-r", mode, img.name, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, out, err)


def test_check_repair_all_goes_on_where_qemu_repairs(pristine, tmp_path):
    """Snapshots past QEMU's limit and too much extra data are what -r all repairs: nothing
    stops it before (qcowfast then refuses to write, as README says)."""
    for case in ("too-many-snapshots", "extra-data-too-large"):
        img = _broken(pristine, tmp_path, case, CHECK_FAILS[case])
        _check_module().check_open(img, repair="all")
        work = tmp_path / f"{case}-work.qcow2"
        shutil.copyfile(img, work)
        _qemu("check", "-r", "all", work.name, cwd=tmp_path)
        assert work.read_bytes() != img.read_bytes()        # qemu-img went on to repair


def test_internal_errors_end_with_qemu_img_line(tmp_path):
    """A refcount block the check cannot read (an unaligned offset) counts check errors: the
    report, then img_check()'s "Check failed" (no reason), exit 1."""
    img = tmp_path / "rb.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    qemu_io(img, "write 0 64k")
    with open(img, "r+b") as f:
        table = struct.unpack(">Q", os.pread(f.fileno(), 8, 48))[0]
        entry = struct.unpack(">Q", os.pread(f.fileno(), 8, table))[0]
        os.pwrite(f.fileno(), struct.pack(">Q", entry + 1024), table)
    code, out, err = _qemu("check", img.name, cwd=tmp_path)
    proc = run_cli("check", img.name, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (code, out) == (1, out)
    assert err.endswith("\nqcowfast: Check failed\n"), err
    assert proc.stderr.splitlines()[-1] == "qcowfast: Check failed", proc.stderr
    assert qcowfast.check(img).check_errors > 0
