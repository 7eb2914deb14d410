"""Recognise an image's format by its magic, as qemu-img's probe does (block.c find_image_format()).

qcowfast reads qcow2 and raw. Every other format qemu-img probes is recognised and refused by
name, so a VMDK or VHDX file is never read as raw bytes (a wrong size and wrong contents).
Each test below follows the matching QEMU 7.2 `*_probe()` function on the first 2048 bytes
(BLOCK_PROBE_BUF_SIZE, zero padded when the file is shorter); two look at the file's last
512 bytes, which QEMU does not probe (see `detect_format`).
"""
from __future__ import annotations

import os
import struct

from .errors import UnsupportedFeature

PROBE_SIZE = 2048
# QEMU 7.2's block drivers (Debian's `qemu-img --help`, "Supported formats"): a format outside
# them is unknown to qemu-img ("Unknown driver", "Unknown file format").
QEMU_DRIVERS = frozenset(
    "blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg "
    "file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio "
    "null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat".split())
_CLOOP_V2 = (b"#!/bin/sh\n#V2.0 Format\n"
             b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def _vmdk_descriptor(buf: bytes) -> bool:
    """vmdk_probe() on a text descriptor: comment and blank lines, then `version=1|2|3`."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(buf.startswith(b"version=%d%s" % (v, eol), p)
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


def _probe_head(buf: bytes) -> str | None:
    """The foreign format whose magic opens `buf` (2048 bytes), or "qcow2"/None."""
    magic, version = struct.unpack_from(">4sI", buf)
    if magic == b"QFI\xfb":
        if version >= 2:                       # qcow2_probe(); version 4+ fails at open
            return "qcow2"
        if version == 1:
            return "QCOW (version 1)"           # qcow_probe()
    if magic in (b"KDMV", b"COWD") or _vmdk_descriptor(buf):
        return "VMDK"
    if buf.startswith(b"conectix"):
        return "VHD (vpc)"
    if buf.startswith(b"vhdxfile"):
        return "VHDX"
    if struct.unpack_from("<I", buf, 64)[0] == 0xBEDA107F:     # vdi_probe(): VDI_SIGNATURE
        return "VDI"
    if buf.startswith(b"QED\0"):
        return "QED"
    if buf.startswith(b"LUKS\xba\xbe") and struct.unpack_from(">H", buf, 6)[0] == 1:
        return "LUKS"                          # qcrypto_block_luks_has_format(): LUKS1 only
    if (buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
            and struct.unpack_from("<I", buf, 16)[0] == 2):
        return "Parallels"
    # bochs_probe(): NUL-terminated magic, type and subtype strings, version 1 or 2.
    if (buf[:32].split(b"\0")[0] == b"Bochs Virtual HD Image"
            and buf[32:48].split(b"\0")[0] == b"Redolog"
            and buf[48:64].split(b"\0")[0] in (b"Undoable", b"Volatile", b"Growing")
            and struct.unpack_from("<I", buf, 64)[0] in (0x00010000, 0x00020000)):
        return "Bochs"
    if buf.startswith(_CLOOP_V2):
        return "cloop"
    return None


def detect_format(fd: int, name: str = "image") -> str:
    """Return "qcow2" or "raw" for the file open on `fd`; refuse every other format by name.

    Parameters
    ----------
    fd : int
        A descriptor open for reading (regular file or block device); it is only pread.
    name : str
        The path the user gave, used in the message.

    Raises
    ------
    UnsupportedFeature
        "NAME is a VMDK image; qcowfast reads qcow2 and raw" for VMDK (binary and text
        descriptor), VHD, VHDX, VDI, QED, QCOW version 1, LUKS, Parallels, DMG, Bochs and
        cloop. Beyond qemu-img's probe, a VHD footer ("conectix") in the last 512 bytes (a fixed
        VHD) and a DMG "koly" trailer are recognised too: qemu-img would read the first as raw
        with the footer as guest data. Passing format "raw" skips this probe.
    """
    buf = os.pread(fd, PROBE_SIZE, 0).ljust(PROBE_SIZE, b"\0")
    found = _probe_head(buf)
    if found == "qcow2":
        return found
    if found is None:
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = os.pread(fd, 512, size - 512) if size >= 512 else b""
        if tail:
            # Leave that page uncached, as qemu-img (which does not read there) leaves it: a
            # cached page over an unwritten extent is data to ext4's SEEK_DATA, and block
            # status would report the last 4 KiB of a preallocated raw image as data.
            try:
                page = os.sysconf("SC_PAGE_SIZE")     # (the kernel drops whole pages only)
                os.posix_fadvise(fd, (size - 512) // page * page, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        if tail.startswith(b"conectix"):
            found = "VHD (vpc)"
        elif tail.startswith(b"koly") or os.fspath(name).endswith(".dmg"):
            found = "DMG"                      # dmg_probe() goes by the ".dmg" suffix alone
    if found is None:
        return "raw"
    raise UnsupportedFeature(f"{os.fspath(name)} is a {found} image; qcowfast reads qcow2 and raw")


def driver_refusal(fmt: str, fd: int | None = None) -> tuple[str, str | None] | None:
    """QEMU 7.2's words (and the hint line it adds, or None) when it opens the file on `fd`
    with block driver `fmt`, a format qcowfast does not read, and fails; None where QEMU
    would open it, or where its words are not modelled (qcowfast's refusal stands).

    A name QEMU lacks fails before any file is opened (bdrv_fill_options()), so `fd` None
    asks about the name alone. Else the drivers that read a header refuse a file lacking
    their magic (qcow_open(), bdrv_qed_do_open(), parallels_open(), bochs_open(),
    vpc_open(), vmdk_open()).
    """
    if fmt not in QEMU_DRIVERS:
        return f"Unknown driver '{fmt}'", None
    if fd is None:
        return None
    size = -(-os.lseek(fd, 0, os.SEEK_END) // 512) * 512    # (bdrv_getlength(): sectors)
    buf = os.pread(fd, PROBE_SIZE, 0).ljust(PROBE_SIZE, b"\0")
    found = _probe_head(buf)
    if fmt == "qcow":
        return _qcow_refusal(buf)
    if fmt in _NOT_IN_FORMAT:
        name, words = _NOT_IN_FORMAT[fmt]
        # (bochs_open() takes the "Growing" subtype alone, of the three its probe takes)
        opens = found == name and (fmt != "bochs" or buf[48:64].split(b"\0")[0] == b"Growing")
        return None if opens else (words, None)
    if fmt == "vpc" and not buf.startswith(b"conectix"):
        if size < 512:
            return "File too small for a VHD header", None
        if not os.pread(fd, 8, size - 512).startswith(b"conectix"):
            return "invalid VPC image", None
    if fmt == "vmdk":
        return _vmdk_refusal(fd, size, buf)
    return None


# A driver whose open fails on a file its probe rejects, with these words (the probe's name).
_NOT_IN_FORMAT = {"qed": ("QED", "Image not in QED format"),
                  "parallels": ("Parallels", "Image not in Parallels format"),
                  "bochs": ("Bochs", "Image not in Bochs format")}


def _qcow_refusal(buf: bytes) -> tuple[str, str | None] | None:
    """qcow_open()'s header checks (block/qcow.c), in its order."""
    magic, version, size = struct.unpack_from(">4sI16xQ", buf)
    cluster_bits, l2_bits = buf[32], buf[33]
    if magic != b"QFI\xfb":
        return "Image not in qcow format", None
    if version != 1:
        hint = "Try the 'qcow2' driver instead." if version in (2, 3) else None
        return f"qcow (v1) does not support qcow version {version}", hint
    why = ("Image size is too small (must be at least 2 bytes)" if size <= 1 else
           "Cluster size must be between 512 and 64k" if not 9 <= cluster_bits <= 16 else
           "L2 table size must be between 512 and 64k" if not 6 <= l2_bits <= 13 else None)
    return None if why is None else (why, None)


def _vmdk_refusal(fd: int, size: int, buf: bytes) -> tuple[str, str | None] | None:
    """vmdk_read_desc() and vmdk_open_desc_file(): a file that is no sparse extent is a text
    descriptor (its first MiB - 1, up to a NUL byte), which must set createType."""
    if size < 4:
        return "File is too small, not a valid image", None
    if buf[:4] in (b"KDMV", b"COWD"):
        return None
    desc = os.pread(fd, min(size, (1 << 20) - 1), 0).split(b"\0", 1)[0]
    return None if b"createType" in desc else ("invalid VMDK image descriptor", None)


__all__ = ["detect_format", "driver_refusal", "PROBE_SIZE"]
