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


__all__ = ["detect_format", "PROBE_SIZE"]
