"""``qcowfast snapshot`` against ``qemu-img snapshot`` (QEMU 7.2).

Oracle: ``qemu-img snapshot -l`` on the same file: the same table byte for byte (names of
every length, multibyte names padded by bytes, the catalogue's snapshot image), nothing for
an image without snapshots or a raw file, and the same exit status for command lines qemu-img
refuses. The actions that write (-a, -c, -d) are refused by name and leave the image as it was.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from common import cli_in_process as cli, qemu_img, qemu_io, run_cli

M = 1024 * 1024


def qemu_snapshot(*args, cwd=None) -> tuple[int, str]:
    """(exit status, stdout) of ``qemu-img snapshot ARGS``."""
    proc = subprocess.run(["qemu-img", "snapshot", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, check=False)
    return proc.returncode, proc.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("snapshot-cli")
    snaps = d / "snaps.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", snaps, 2 * M)
    # printf pads the id to 9 and the name to 16 bytes: shorter, exactly as long, longer, and
    # multibyte names (padded by bytes, not characters).
    for i, name in enumerate(("a", "sixteen-chars-xx", "a-name-longer-than-sixteen-bytes",
                              "überprüfung", "日本語のスナップ")):
        qemu_io(snaps, f"write -P {i + 1} {i * 64 * 1024} 64k")
        qemu_img("snapshot", "-c", name, snaps)
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, M)
    raw = d / "plain.raw"
    raw.write_bytes(bytes(M))
    # A snapshot in an overlay whose backing file then goes missing: qemu-img snapshot opens
    # the whole chain, so listing fails.
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, M)
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, cwd=d)
    qemu_img("snapshot", "-c", "t1", top)
    orphan = d / "orphan.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "-u", orphan,
             M, cwd=d)
    return {"snaps": snaps, "plain": plain, "raw": raw, "top": top, "orphan": orphan,
            "missing": d / "missing.qcow2", "dir": d}


@pytest.mark.images(ids=["c64k-v3-snapshot"])
def test_catalogue_snapshots_list_like_qemu(image, capsys):
    status, out = qemu_snapshot("-l", image.path)
    assert status == 0 and out.startswith("Snapshot list:\n")
    assert cli(capsys, "snapshot", "-l", image.path) == (0, out, "")


@pytest.mark.parametrize("args", [
    ["-l", "{snaps}"],
    ["-l", "-q", "{snaps}"],                    # -q changes nothing
    ["-lU", "{snaps}"],
    ["--force", "-l", "{snaps}"],               # getopt: a prefix of --force-share
    ["{snaps}", "-l"],
    ["-l", "--", "{snaps}"],
    ["-l", "--object", "secret,id=s0,data=x", "{snaps}"],
    ["-l", "{top}"],
    ["-l", "{plain}"],                          # no snapshots: nothing, status 0
    ["-l", "{raw}"],
    ["{snaps}"],                                # no action: nothing
])
def test_lists_what_qemu_lists(made, capsys, args):
    args = [a.format(**made) for a in args]
    status, out = qemu_snapshot(*args)
    assert status == 0
    assert cli(capsys, "snapshot", *args) == (0, out, "")


@pytest.mark.parametrize("args", [
    ["-l"],                                     # no file name
    ["-l", "-l", "{snaps}"],
    ["-c", "new", "-l", "{snaps}"],
    ["-U", "{snaps}"],                          # qemu-img opens for writing without an action
    ["-l", "{missing}"],
    ["-l", "{dir}"],
    ["-l", "{orphan}"],
])
def test_fails_as_qemu_fails(made, capsys, args):
    args = [a.format(**made) for a in args]
    assert qemu_snapshot(*args) == (1, "")
    status, out, err = cli(capsys, "snapshot", *args)
    assert (status, out) == (1, ""), err
    want = subprocess.run(["qemu-img", "snapshot", *args], capture_output=True, text=True)
    if "Try 'qemu-img --help'" in want.stderr:   # a usage error: qemu-img's lines
        assert err == want.stderr.replace("qemu-img", "qcowfast")
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcowfast: "), err


@pytest.mark.parametrize("args", [["-d"], ["-l", "{snaps}", "extra"], ["-x", "{snaps}"]])
def test_usage_errors_exit_1(made, capsys, args):
    args = [a.format(**made) for a in args]
    assert qemu_snapshot(*args) == (1, "")
    status, out, err = cli(capsys, "snapshot", *args)
    want = subprocess.run(["qemu-img", "snapshot", *args], capture_output=True, text=True)
    assert (status, out, err) == (1, "", want.stderr.replace("qemu-img", "qcowfast"))


@pytest.mark.parametrize("action, what", [("-a", "applies"), ("-c", "creates"),
                                          ("-d", "deletes")])
def test_writing_actions_are_refused_by_name(made, capsys, action, what):
    before = digest(made["snaps"])
    status, out, err = cli(capsys, "snapshot", action, "a", made["snaps"])
    assert (status, out) == (1, "")
    assert err == (f"qcowfast: snapshot {action}: not supported by qcowfast (it {what} a "
                   "snapshot, which writes to the image; qcowfast never writes images)\n")
    assert digest(made["snaps"]) == before


def test_format_option(made, capsys):
    """-f (not in qemu-img 7.2's snapshot): qcow2 lists, raw lists nothing, others refused."""
    out = qemu_snapshot("-l", made["snaps"])[1]
    assert cli(capsys, "snapshot", "-l", "-f", "qcow2", made["snaps"]) == (0, out, "")
    assert cli(capsys, "snapshot", "-l", "-f", "raw", made["snaps"]) == (0, "", "")
    status, out, err = cli(capsys, "snapshot", "-l", "-f", "vmdk", made["snaps"])
    assert (status, out) == (1, "") and err.startswith("qcowfast: -f vmdk")


def test_info_prints_the_same_table(made, capsys):
    """info's human output holds the very table snapshot -l prints (one piece of code)."""
    table = qemu_snapshot("-l", made["snaps"])[1]
    status, out, _ = cli(capsys, "info", made["snaps"])
    assert status == 0 and table in out
    assert qemu_img("info", made["snaps"]).stdout == out


def test_real_process(made):
    proc = run_cli("snapshot", "-l", made["snaps"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, qemu_snapshot("-l",
                                                                            made["snaps"])[1], "")
