"""Command lines of a differential sweep against qemu-img 7.2 (random argv for convert, map,
info, check, compare, measure and snapshot: options in every spelling and order, good and bad
values, real and missing files), where qcowfast disagreed.

Each command line runs through qemu-img and qcowfast (in this process, from the same working
directory); the exit status and the lines are compared (qemu-img's name replaced by
qcowfast's). The subjects: --image-opts refused where qemu-img would read its first option
string (every earlier check first, --format's own line); snapshot's second action refused as
it is read; snapshot opening the image read-write unless it lists; convert counting its file
names after its checks of option pairs; file names after "--" that start with "-"; convert
--bitmaps where qemu-img refuses it; "--=x", which glibc calls ambiguous.
"""

from __future__ import annotations

import pytest

from common import assert_as_qemu_img as common_assert, both_tools, qemu_img, qemu_io

NAMES = {"IMG": "img.qcow2", "IMG2": "img2.qcow2", "V2": "v2.qcow2", "RAW": "raw.img",
         "DIR": "dir", "MISSING": "missing.img", "OUT": "out.img"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """img.qcow2 (data, snapshot s1), img2.qcow2, v2.qcow2 (compat=0.10), raw.img, dir/; no
    missing.img or out.img."""
    d = tmp_path_factory.mktemp("argv_sweep")
    for name, opts in (("img.qcow2", "compat=1.1"), ("img2.qcow2", "compat=1.1"),
                       ("v2.qcow2", "compat=0.10")):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, d / name, "1M")
        qemu_io(d / name, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "s1", d / "img.qcow2")
    (d / "raw.img").write_bytes(b"\x22" * 65536)
    (d / "dir").mkdir()
    return d


def _both(capsys, monkeypatch, workdir, argv):
    return both_tools(capsys, monkeypatch, workdir, argv, NAMES)


def assert_as_qemu_img(capsys, monkeypatch, workdir, argv, status=None) -> None:
    """The same status, stdout and stderr as qemu-img (NAMES replaced); its status `status`,
    or not 0."""
    __tracebackhide__ = True
    common_assert(capsys, monkeypatch, workdir, argv, status, NAMES)


# -- --image-opts: qemu-img's checks before it opens the image come first --------------------

@pytest.mark.parametrize("argv", [
    ["info", "--image-opts", "--bogus", "IMG"],
    ["info", "--image-opts", "--output=bogus", "IMG"],
    ["info", "--image-opts", "IMG", "IMG2"],
    ["map", "--image-opts", "-s", "bogus", "IMG"],
    ["map", "--image", "-l", "-1", "IMG"],
    ["check", "--image-opts", "-T", "bogus", "IMG"],
    ["check", "--image-opts", "-r", "bogus", "IMG"],
    ["check", "--image-opts", "-q"],
    ["compare", "--image-opts", "IMG"],
    ["compare", "--image-opts", "-T", "bogus", "IMG", "IMG2"],
    ["measure", "--image-opts", "--size", "1M"],
    ["measure", "--image-opts", "IMG", "--size", "1M"],
    ["snapshot", "--image-opts", "-l", "-a", "s1", "IMG"],
    ["snapshot", "--image-opts", "-l", "IMG", "IMG2"],
    ["snapshot", "--image-opts", "--object", "bogus", "IMG"],
])
def test_image_opts_after_command_line_checks(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("argv", [
    ["info", "--image-opts", "-f", "qcow2", "IMG"],
    ["map", "--image-opts", "--format=bogus", "IMG"],
    ["check", "--image-opts", "-f", "qcow2", "IMG"],
    ["compare", "--image-opts", "-f", "raw", "IMG", "IMG2"],
    ["measure", "--image-opts", "-f", "raw", "IMG"],
    ["convert", "--image-opts", "-f", "raw", "IMG", "OUT"],
])
def test_image_opts_with_format(capsys, monkeypatch, workdir, argv):
    """With a format, img_open() refuses --image-opts in its own words."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


# -- snapshot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["snapshot", "-l", "-a", "s1", "-e", "IMG"],
    ["snapshot", "-l", "-l", "--object=help", "IMG"],
    ["snapshot", "-c", "x", "-d", "y", "--object", "bogus", "IMG"],
    ["snapshot", "-as1", "-l", "--help=1", "IMG"],
    ["snapshot", "-a", "s1", "-l", "-c"],
])
def test_snapshot_second_action_refused_as_read(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("argv, status", [
    (["snapshot", "RAW"], 0),
    (["snapshot", "--", "RAW"], 0),
    (["snapshot", "DIR"], 1),
    (["snapshot", "-U", "-a", "s1", "MISSING"], 1),
    (["snapshot", "-c", "s2", "MISSING"], 1),
    (["snapshot", "-d", "s1", "DIR"], 1),
    (["snapshot", "-Uc", "s2", "IMG"], 1),
])
def test_snapshot_opens_read_write(capsys, monkeypatch, workdir, argv, status):
    """Without -l, img_snapshot() opens the image read-write: -U is refused, a directory
    fails to open, a probed raw image gets the raw driver's warning."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv, status)


# -- convert: file names counted after the checks of option pairs ----------------------------

@pytest.mark.parametrize("argv", [
    ["convert", "--target-image-opts", "IMG"],
    ["convert", "--target-is-zero", "IMG"],
    ["convert", "-C", "-c", "IMG"],
    ["convert", "-C", "-S", "0"],
    ["convert", "-n", "-o", "cluster_size=4k", "IMG"],
    ["convert", "--skip-broken-bitmaps", "IMG"],
])
def test_convert_file_names_counted_after_option_pairs(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("argv", [
    ["convert", "--", "-S", "4096b", "--target-image-opts", "OUT"],
    ["measure", "--", "IMG", "-x"],
])
def test_names_after_double_dash(capsys, monkeypatch, workdir, argv):
    """After "--" every word is a file name, one starting with "-" too."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("argv", [
    ["convert", "--bitmaps", "RAW", "OUT"],
    ["convert", "--bitmaps", "-f", "raw", "IMG", "OUT"],
    ["convert", "--bitmaps", "V2", "OUT"],
    ["convert", "--bit", "-t", "", "RAW", "OUT"],
    ["convert", "--bitmaps", "IMG", "IMG2", "OUT"],
    ["convert", "--bitmaps", "IMG", "OUT"],
    ["convert", "-C", "--bitmaps", "IMG", "OUT"],
    ["convert", "--bitmaps", "-n", "IMG", "RAW"],
])
def test_convert_bitmaps(capsys, monkeypatch, workdir, argv):
    """--bitmaps where img_convert() refuses it: several sources, a source that cannot store
    bitmaps (before -t is read), then a raw output (once it is open)."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


# -- "--=x": an empty long option name ---------------------------------------------------------

@pytest.mark.parametrize("argv", [["measure", "--=x", "IMG"], ["measure", "--=", "IMG"]])
def test_empty_long_name_ambiguous(capsys, monkeypatch, workdir, argv):
    """glibc's getopt calls an empty name ambiguous (it abbreviates every long option); measure
    lets getopt print that, then prints its help (whose text is qcowfast's) with status 0."""
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[0] == 0 and "ambiguous" in want[2]
    assert (got[0], got[2]) == (want[0], want[2])
