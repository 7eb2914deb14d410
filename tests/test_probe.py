"""Format probing: qcow2 and raw are read, every other format qemu-img recognises is refused by
name (never read as raw), FIFOs and sockets are refused without hanging, block devices are
legitimate sources.

Oracles: `qemu-img info --output=json` names the format it probes (or, for the magic-only DMG
file, fails naming dmg); qemu-img writes the foreign images (`convert -O vmdk/vpc/vhdx/vdi/qed`,
`create -f qcow/parallels/luks`); Bochs and cloop headers are crafted to the layouts QEMU's
block/bochs.c and block/cloop.c open.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import qcowfast
from qcowfast import FormatError, UnsupportedFeature
from qcowfast.image import RawImage, open_source
from qcowfast.probe import detect_format

from common import (assert_same_bytes, qemu_img, qemu_img_pbkdf, qemu_info, qemu_io, reference_raw,
                    run_cli)
from test_corrupt import EXT_BACKING_FORMAT, Qcow

M = 1 << 20
LABELS = {"vmdk": "VMDK", "vpc": "VHD (vpc)", "vhdx": "VHDX", "vdi": "VDI", "qed": "QED",
          "qcow": "QCOW (version 1)", "luks": "LUKS", "parallels": "Parallels", "bochs": "Bochs",
          "cloop": "cloop", "dmg": "DMG"}
CLOOP_V2 = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def _bochs(path: Path) -> None:
    """A growing Bochs redolog (block/bochs.c struct bochs_header, version 2)."""
    buf = bytearray(64 * 1024)
    buf[0:22], buf[32:39], buf[48:55] = b"Bochs Virtual HD Image", b"Redolog", b"Growing"
    struct.pack_into("<II", buf, 64, 0x00020000, 512)        # version, header size
    struct.pack_into("<IIIIQ", buf, 72, 1, 512, 4096, 0, 4096)   # catalog, bitmap, extent, -, disk
    struct.pack_into("<I", buf, 512, 0xFFFFFFFF)            # catalog entry: not allocated
    path.write_bytes(buf)


def _cloop(path: Path) -> None:
    """A cloop V2.0 image of one zlib block (block/cloop.c: block size, count, offsets)."""
    comp = zlib.compress(bytes(512))
    head = CLOOP_V2.ljust(128, b"\0") + struct.pack(">II", 512, 1)
    path.write_bytes(head + struct.pack(">QQ", 152, 152 + len(comp)) + comp)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """{id: path} of one image of each foreign format, plus base.raw they were made from."""
    d = tmp_path_factory.mktemp("foreign")
    base = d / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    qemu_io(base, "write -P 0x5a 0 256k", "write -P 0x17 512k 64k", fmt="raw")
    out = {"base": base}
    for fmt, opts, name in [("vmdk", None, "d.vmdk"),
                            ("vmdk", "subformat=monolithicFlat", "flat.vmdk"),
                            ("vpc", None, "d.vhd"), ("vhdx", None, "d.vhdx"),
                            ("vdi", None, "d.vdi"), ("qed", None, "d.qed")]:
        qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", opts] if opts else []), base,
                 d / name)
        out[name] = d / name
    qemu_img("create", "-q", "-f", "qcow", d / "v1.qcow", "1M")
    qemu_img("create", "-q", "-f", "parallels", d / "d.hds", "1M")
    qemu_img_pbkdf("create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw", "-o",
                   "key-secret=s0,iter-time=10", d / "d.luks", "1M")
    _bochs(d / "d.bochs")
    _cloop(d / "d.cloop")
    out.update({n: d / n for n in ("v1.qcow", "d.hds", "d.luks", "d.bochs", "d.cloop")})
    return out


FOREIGN = ["d.vmdk", "flat.vmdk", "d.vhd", "d.vhdx", "d.vdi", "d.qed", "v1.qcow", "d.hds",
           "d.luks", "d.bochs", "d.cloop"]


def _fd_probe(path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return detect_format(fd, str(path))
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", FOREIGN)
def test_foreign_format_refused_by_name(foreign, name):
    path = foreign[name]
    fmt = qemu_info(path)["format"]                       # the oracle: what qemu-img probes
    assert fmt in LABELS and fmt not in ("raw", "qcow2")
    want = f"{path} is a {LABELS[fmt]} image; qcowfast reads qcow2 and raw"
    with pytest.raises(UnsupportedFeature) as exc:
        _fd_probe(path)
    assert str(exc.value) == want
    for call in (lambda: qcowfast.info(path), lambda: qcowfast.open(path),
                 lambda: open_source(path),
                 lambda: qcowfast.compare(path, foreign["base"]),
                 lambda: qcowfast.compare(foreign["base"], path)):
        with pytest.raises(UnsupportedFeature, match="is a " + LABELS[fmt].replace("(", r"\(")
                           .replace(")", r"\)") + " image"):
            call()


def test_foreign_vmdk_compare_cli_matches_qemu_refusal_of_raw_reading(foreign, tmp_path):
    """qemu-img says d.vmdk and base.raw are identical; qcowfast refuses rather than mismatch."""
    proc = subprocess.run(["qemu-img", "compare", foreign["d.vmdk"], foreign["base"]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = f"{foreign['d.vmdk']} is a VMDK image; qcowfast reads qcow2 and raw"
    proc = run_cli("compare", foreign["d.vmdk"], foreign["base"])
    assert proc.returncode == 2 and want in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("info", foreign["d.vmdk"])
    assert proc.returncode == 1 and proc.stderr.strip().endswith(want), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not proc.stdout
    proc = run_cli("convert", "-q", foreign["d.vmdk"], tmp_path / "o.raw")
    assert proc.returncode == 1 and "is a VMDK image" in proc.stderr
    assert not (tmp_path / "o.raw").exists()


def test_backing_file_in_foreign_format_refused(foreign, tmp_path):
    """A backing file without a format extension is probed: a VMDK is refused by name."""
    os.symlink(foreign["d.vmdk"], tmp_path / "base.vmdk")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.vmdk", "-F", "vmdk", top, "1M")
    q = Qcow(top)
    off, _ = q.extension(EXT_BACKING_FORMAT)
    q.put(off, struct.pack(">I", 0x0B0B0B0B))     # unknown extension: the format is probed
    assert "backing-filename-format" not in qemu_info(top)
    with pytest.raises(UnsupportedFeature, match="is a VMDK image"):
        qcowfast.open(top, backing_dirs=[foreign["d.vmdk"].parent])


@pytest.mark.parametrize("name", ["d.vmdk", "flat.vmdk", "d.vdi"])
def test_format_raw_forces_raw(foreign, name):
    path = foreign[name]
    want = json.loads(qemu_img("info", "-f", "raw", "--output=json", path).stdout)
    got = qcowfast.info(path, fmt="raw")
    assert (got["format"], got["virtual-size"]) == ("raw", want["virtual-size"])
    data = path.read_bytes()
    with qcowfast.open(path, format="raw") as img:
        assert isinstance(img, RawImage) and img.virtual_size == want["virtual-size"]
        assert_same_bytes(img.read(0, img.virtual_size), reference_raw_of(path, "raw"), name)
        assert img.read(0, len(data)) == data[:img.virtual_size]
    assert qcowfast.compare(path, path, fmt_a="raw", fmt_b="raw").identical


def reference_raw_of(path: Path, fmt: str) -> bytes:
    out = path.parent / (path.name + ".ref")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def test_dmg_recognised(tmp_path):
    """qemu-img probes DMG by the ".dmg" suffix and needs a "koly" trailer at the end."""
    named = tmp_path / "d.dmg"
    named.write_bytes(bytes(M))
    proc = subprocess.run(["qemu-img", "info", named], capture_output=True, text=True)
    assert proc.returncode == 1 and "dmg" in proc.stderr.lower(), proc.stderr
    with pytest.raises(UnsupportedFeature, match=f"^{named} is a DMG image"):
        qcowfast.info(named)
    trailer = tmp_path / "udif.img"
    trailer.write_bytes(bytes(M - 512) + b"koly" + bytes(508))
    with pytest.raises(UnsupportedFeature, match="is a DMG image"):
        qcowfast.open(trailer)
    with qcowfast.open(trailer, format="raw") as img:
        assert img.read(M - 512, 4) == b"koly"


def test_fixed_vhd_refused_where_qemu_reads_raw(foreign, tmp_path):
    """Deliberate difference: a fixed VHD has its footer only in the last 512 bytes, which
    qemu-img does not probe (it reads the file as raw, footer included); qcowfast refuses."""
    fixed = tmp_path / "fixed.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", foreign["base"], fixed)
    assert qemu_info(fixed)["format"] == "raw"
    with pytest.raises(UnsupportedFeature, match=r"is a VHD \(vpc\) image"):
        qcowfast.info(fixed)
    assert qcowfast.info(fixed, fmt="raw")["virtual-size"] == fixed.stat().st_size


@pytest.mark.parametrize("version,want", [(2, "qcow2"), (3, "qcow2"), (0, "raw")])
def test_qcow2_magic_and_version(tmp_path, version, want):
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=" + ("0.10" if version == 2 else "1.1"),
             img, "1M")
    if version == 0:
        with open(img, "r+b") as f:
            f.seek(4)
            f.write(struct.pack(">I", 0))
    assert qemu_info(img)["format"] == want
    assert _fd_probe(img) == want
    assert qcowfast.info(img)["format"] == want
    if want == "raw":
        with pytest.raises((FormatError, UnsupportedFeature)):
            qcowfast.open(img)                 # open() reads QCOW2 unless format="raw"
        assert isinstance(open_source(img), RawImage)


def test_unknown_content_is_raw(tmp_path):
    path = tmp_path / "blob.img"
    with open(path, "wb") as f:                        # data, a hole, a partial last sector
        f.write(os.urandom(70000))
        f.seek(M)
        f.write(os.urandom(100))
    want = qemu_info(path)
    assert want["format"] == "raw"
    with open_source(path) as src:
        assert isinstance(src, RawImage) and src.virtual_size == want["virtual-size"]
        assert_same_bytes(src.read(0, src.virtual_size), reference_raw(path), "raw source")
        exts = list(src.extents())
        assert sum(e.length for e in exts) == src.virtual_size
        qmap = json.loads(qemu_img("map", "-f", "raw", "--output=json", path).stdout)
        assert src.map() == qmap
        f = src.as_file()
        f.seek(M - 2)
        assert f.read(8) == path.read_bytes()[M - 2:M + 6]
    got = qcowfast.info(path)
    assert (got["format"], got["virtual-size"]) == ("raw", want["virtual-size"])


# --------------------------------------------------------------------------------------------
# FIFOs, sockets, block devices


def _no_hang(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_fifo_backing_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", top, "1M")
    out = _no_hang("import qcowfast\ntry:\n"
                   f"    qcowfast.open({str(top)!r}, backing={str(tmp_path / 'fifo')!r})\n"
                   "except qcowfast.QcowError as e:\n    print('refused:', e)\n")
    assert "refused:" in out and "FIFO" in out


@pytest.mark.parametrize("command", [["compare", "{img}", "{fifo}"], ["compare", "{fifo}", "{img}"],
                                     ["info", "{fifo}"], ["convert", "{fifo}", "{out}"],
                                     ["map", "{fifo}"]])
def test_fifo_source_cli_does_not_hang(tmp_path, command):
    os.mkfifo(tmp_path / "fifo")
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    names = {"img": img, "fifo": tmp_path / "fifo", "out": tmp_path / "o.raw"}
    proc = run_cli(*(a.format(**names) for a in command), timeout=60)
    assert proc.returncode in (1, 2) and "FIFO" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_socket_refused(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        for call in (lambda: qcowfast.open(path), lambda: qcowfast.info(path),
                     lambda: open_source(path, "raw")):
            with pytest.raises(FormatError, match="socket"):
                call()


def test_missing_files_are_qcow_errors_and_file_not_found(tmp_path):
    missing = tmp_path / "nope.qcow2"
    for call in (lambda: qcowfast.open(missing), lambda: qcowfast.info(missing),
                 lambda: open_source(missing), lambda: qcowfast.compare(missing, missing)):
        with pytest.raises(qcowfast.QcowError) as exc:
            call()
        assert isinstance(exc.value, FileNotFoundError) and str(missing) in str(exc.value)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M")
    with pytest.raises(qcowfast.BackingChainError) as exc:
        qcowfast.open(top)
    assert isinstance(exc.value, FileNotFoundError) and "gone.qcow2" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="other.qcow2"):
        qcowfast.open(top, backing=tmp_path / "other.qcow2")


@pytest.fixture
def loop_device(tmp_path):
    """Attach a file to a read-only loop device; yields (attach, list of devices)."""
    devices = []

    def attach(path: Path) -> str:
        proc = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], capture_output=True,
                              text=True)
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.skip(f"test_block_device_sources: losetup cannot attach a loop device here "
                        f"({proc.stderr.strip()})")
        devices.append(proc.stdout.strip())
        return devices[-1]

    yield attach
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_sources(tmp_path, loop_device):
    """qcow2 and raw images on block devices (an LV in oVirt/OpenStack) are read, sized by the
    device; the oracle is qemu-img reading the same device."""
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "2M")
    qemu_io(img, "write -P 0x3c 0 64k", "write -c -P 0x44 1M 64k")
    os.truncate(img, 4 * M)                      # a whole number of device sectors
    dev = loop_device(img)
    with qcowfast.open(dev) as image:
        assert_same_bytes(image.read(0, image.virtual_size), reference_raw(dev), "qcow2 on " + dev)
        assert image.file_size == 4 * M
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(M) + bytes(M))
    rdev = loop_device(raw)
    want = qemu_info(rdev)
    assert (want["format"], want["virtual-size"]) == ("raw", 2 * M)
    got = qcowfast.info(rdev)
    assert (got["format"], got["virtual-size"]) == ("raw", 2 * M)
    with open_source(rdev) as src:
        assert isinstance(src, RawImage) and src.virtual_size == 2 * M
        assert src.read(0, 2 * M) == raw.read_bytes()
    assert qcowfast.compare(rdev, raw).identical
    assert qcowfast.compare(dev, img).identical
    # A block device named *inside* an image stays refused (only regular files are followed).
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", rdev, "-F", "raw", top, "2M")
    with pytest.raises(qcowfast.UnsafePathError, match="not a regular file"):
        qcowfast.open(top, backing_dirs=["/dev"])
