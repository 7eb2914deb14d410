"""`convert -O host_device` and devices shorter than the image, against qemu-img 7.2.

qemu-img reads -o against host_device's creation options, refuses -B/-F/-c for it, then
"creates" the device (bdrv_co_create_opts_simple(): the preallocation mode, then the device
opened as it is) and refuses to grow it (file-posix raw_co_truncate(): "Cannot grow device
files"; with -n: "output file is smaller than input file"). qcowfast checked the device
before the -o values and wrote into character devices and short block devices regardless.
Each command line runs through both tools from the same directory; status and lines compared.
"""
from __future__ import annotations

import subprocess

import pytest

from common import cli_in_process as cli, qemu_img

M = 1024 * 1024


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """img.qcow2 (1 MiB, written), short.img (512 KiB) and long.img (2 MiB) behind loop
    devices; their names in DEVICES."""
    d = tmp_path_factory.mktemp("hdev")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 1M", str(d / "img.qcow2")], check=True,
                   capture_output=True)
    devices = {}
    for name, size in (("SHORT", M // 2), ("LONG", 2 * M)):
        backing = d / f"{name.lower()}.img"
        backing.write_bytes(b"\xff" * size)
        proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot create a loop device: {proc.stderr.strip()}")
        devices[name] = proc.stdout.strip()
    yield d, devices
    for dev in devices.values():
        subprocess.run(["losetup", "-d", dev], check=False)


def _same_as_qemu_img(capsys, monkeypatch, workdir, argv):
    """Run `argv` (device names replaced) with qemu-img and qcowfast; compare; return
    qemu-img's status."""
    d, devices = workdir
    argv = [devices.get(a, a) for a in argv]
    want = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, cwd=d)
    monkeypatch.chdir(d)
    got = cli(capsys, *argv)
    (d / "missing.img").unlink(missing_ok=True)         # (what a conversion wrote)
    assert got == (want.returncode, want.stdout,
                   want.stderr.replace("qemu-img:", "qcowfast:")), argv
    return want.returncode


OPTIONS = [
    ["-o", "bogus=1"], ["-o", "preallocation=off,bogus=1"], ["-o", "size=bogus"],
    ["-o", "backing_file=x"], ["-o", "cluster_size=4k"], ["-o", "preallocation=full"],
    ["-o", "preallocation=metadata"], ["-o", "preallocation=bogus"], ["-c"],
    ["-c", "-o", "preallocation=full"], ["-B", "x"], ["-F", "raw"], ["-B", "x", "-F", "raw"],
]


@pytest.mark.parametrize("target", ["missing.img", "/dev/null", "SHORT", "LONG"])
@pytest.mark.parametrize("options", OPTIONS, ids=" ".join)
def test_refusals_in_qemu_img_order(capsys, monkeypatch, workdir, options, target):
    """-o keys and values, then -B/-F, then -c, then preallocation, then the device."""
    assert _same_as_qemu_img(capsys, monkeypatch, workdir,
                             ["convert", "-O", "host_device", *options, "img.qcow2",
                              target]) == 1


@pytest.mark.parametrize("target", ["/dev/null", "/dev/zero", "SHORT"])
@pytest.mark.parametrize("in_place", [[], ["-n"]], ids=["created", "-n"])
def test_a_device_shorter_than_the_image(capsys, monkeypatch, workdir, in_place, target):
    """Refused as qemu-img refuses it, before a byte is written (a character device's length
    is what lseek(SEEK_END) says: 0)."""
    d, devices = workdir
    before = open(devices["SHORT"], "rb").read()
    assert _same_as_qemu_img(capsys, monkeypatch, workdir,
                             ["convert", *in_place, "-O", "host_device", "img.qcow2",
                              target]) == 1
    assert open(devices["SHORT"], "rb").read() == before


@pytest.mark.parametrize("in_place", [[], ["-n"]], ids=["created", "-n"])
def test_raw_into_a_short_block_device(capsys, monkeypatch, workdir, in_place):
    """-O raw into a block device: qemu-img's lines too (created: "Cannot grow device
    files", where qcowfast gave its own)."""
    assert _same_as_qemu_img(capsys, monkeypatch, workdir,
                             ["convert", *in_place, "-O", "raw", "img.qcow2", "SHORT"]) == 1


@pytest.mark.parametrize("in_place", [[], ["-n"]], ids=["created", "-n"])
def test_a_device_long_enough_is_written(capsys, monkeypatch, workdir, in_place):
    """The success path is unchanged: the image's bytes, the device's tail kept."""
    d, devices = workdir
    assert _same_as_qemu_img(capsys, monkeypatch, workdir,
                             ["convert", "-q", *in_place, "-O", "host_device", "img.qcow2",
                              "LONG"]) == 0
    data = open(devices["LONG"], "rb").read()
    assert data == b"\x07" * M + b"\xff" * M


@pytest.mark.parametrize("target", ["/dev/null", "SHORT", "LONG"])
@pytest.mark.parametrize("prealloc", ["falloc", "full", "metadata", "bogus"])
def test_raw_into_a_device_is_created_by_host_device(capsys, monkeypatch, workdir, prealloc,
                                                     target):
    """A device's name probes as host_device, whose creation refuses any preallocation
    (qcowfast refused it in its own words)."""
    assert _same_as_qemu_img(capsys, monkeypatch, workdir,
                             ["convert", "-O", "raw", "-o", f"preallocation={prealloc}",
                              "img.qcow2", target]) == 1


@pytest.mark.parametrize("target", ["/dev/null", "SHORT", "missing.img"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2", "host_device"])
@pytest.mark.parametrize("option", ["nocow=on", "extent_size_hint=1M", "nocow=bogus"])
def test_file_options_of_a_device(capsys, monkeypatch, workdir, option, fmt, target):
    """-o is read against the options of the protocol the name probes as: a device's
    (host_device) has no nocow or extent_size_hint (qcowfast took file-posix's for it)."""
    status = _same_as_qemu_img(capsys, monkeypatch, workdir,
                               ["convert", "-q", "-O", fmt, "-o", option, "img.qcow2",
                                target])
    # (a file takes them: the conversion succeeds, as qemu-img's does)
    assert status == 1 or (target == "missing.img" and fmt != "host_device"
                           and option != "nocow=bogus")
