"""``check``'s COPIED flag checks against ``qemu-img check`` (QEMU 7.2 check_oflag_copied()).

After comparing refcounts, QEMU walks the active L1 table: for each entry, the L2 table's own
refcount (an L1 entry's COPIED flag must be set exactly when it is 1), then the table's data
entries. A table whose own refcount cannot be read is skipped whole, without a message.
Oracle: ``qemu-img check`` on the same file: its JSON, its human report, its exit code and the
order of its refcount and COPIED messages on stderr. Images come from qemu-img and qemu-io,
patched with struct (docs/interop/qcow2.txt).
"""
from __future__ import annotations

import json
import re
import struct
import subprocess

import pytest

from common import QEMU_IMG, qemu_img, qemu_io, run_cli

CS = 512                            # 512-byte clusters: an L2 table maps 32 KiB
COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


class _File:
    """The L1 table, L2 entries and refcounts (16 bits, block 0) of a 512-byte-cluster image."""

    def __init__(self, path):
        self.path = path
        self.b = bytearray(path.read_bytes())
        self.l1 = struct.unpack_from(">Q", self.b, 40)[0]
        self.reftable = struct.unpack_from(">Q", self.b, 48)[0]

    def u64(self, at: int) -> int:
        return struct.unpack_from(">Q", self.b, at)[0]

    def put(self, at: int, value: int) -> None:
        struct.pack_into(">Q", self.b, at, value)

    def l2(self, index: int) -> int:
        return self.u64(self.l1 + 8 * index) & OFFSET_MASK

    def set_refcount(self, cluster: int, value: int) -> None:
        struct.pack_into(">H", self.b, (self.u64(self.reftable) & OFFSET_MASK) + 2 * cluster,
                         value)

    def save(self) -> None:
        self.path.write_bytes(self.b)


def _written(d, size: str):
    p = d / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", p, "1M")
    qemu_io(p, f"write -P 0x5a 0 {size}")
    return _File(p)


def _both(path, *args):
    want = subprocess.run([QEMU_IMG, "check", *args, path.name], capture_output=True,
                          text=True, check=False, cwd=path.parent)
    ours = run_cli("check", *args, path.name, cwd=path.parent)
    assert "Traceback" not in ours.stderr, ours.stderr
    return want, ours


def _copied_and_refcount_lines(stderr: str) -> list:
    """The refcount comparison and COPIED lines, in order. QEMU prints a data cluster's line
    per entry (naming it) and an unreadable refcount's per cluster, qcowfast one per table or
    refcount block with a count: they become "data" and "unreadable" lines."""
    out = []
    for line in stderr.splitlines():
        times = re.search(r" \(x(\d+)\)$", line)
        times = int(times.group(1)) if times else 1
        if "OFLAG_COPIED data cluster" in line:
            out += ["data"] * times
        elif line.startswith("Can't get refcount for cluster"):
            out += ["unreadable"] * times
        elif "OFLAG_COPIED" in line or line.startswith(("Leaked cluster", "ERROR cluster")):
            out.append(line)
    return out


@pytest.mark.parametrize("l1_too", [False, True], ids=["data", "data-and-l1"])
def test_table_with_unreadable_refcount_is_skipped(tmp_path, l1_too):
    """L2 table 1 moved to cluster 256, whose refcount block's table entry has a reserved bit
    (QEMU: EIO). Both tables have a data entry without COPIED (refcount 1): only table 0's
    is reported; table 1 is skipped, its L1 entry's COPIED flag too. The failed look-up of
    cluster 256 is reported among the refcount comparison's lines, in cluster order."""
    f = _written(tmp_path, "64k")
    moved = 256 * CS
    f.b += bytes(moved + CS - len(f.b))
    f.b[moved:moved + CS] = f.b[f.l2(1):f.l2(1) + CS]
    entry = f.u64(f.l1 + 8)
    f.put(f.l1 + 8, (entry & ~OFFSET_MASK & ~(COPIED if l1_too else 0)) | moved)
    f.put(f.reftable + 8, COPIED | 0x20000)            # refcount block 1 unreadable
    for table in (f.l2(0), moved):
        f.put(table + 8, f.u64(table + 8) & ~COPIED)
    f.save()

    for args in ([], ["--output=json"]):
        want, ours = _both(f.path, *args)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout), ours.stderr
    report = json.loads(want.stdout)
    # (refcount block 1 outside the image, table 0's data entry; cluster 256 unreadable)
    assert (want.returncode, report["corruptions"], report["check-errors"]) == (1, 2, 1)
    lines = _copied_and_refcount_lines(want.stderr)
    assert lines[1:] == ["unreadable", "data"] and lines[0].startswith("Leaked cluster")
    assert _copied_and_refcount_lines(ours.stderr) == lines


def test_copied_messages_follow_the_refcounts_in_l1_order(tmp_path):
    """After the refcount comparison, per active L1 entry: the L1 entry's COPIED line, then
    its table's data lines. Tables 1 and 2 lose COPIED in L1; table 0 has a data entry
    without it; a data cluster of table 2 has refcount 2 (leaked once, COPIED wrong)."""
    f = _written(tmp_path, "96k")
    for index in (1, 2):
        f.put(f.l1 + 8 * index, f.u64(f.l1 + 8 * index) & ~COPIED)
    f.put(f.l2(0) + 8 * 3, f.u64(f.l2(0) + 8 * 3) & ~COPIED)
    f.set_refcount((f.u64(f.l2(2) + 8 * 5) & OFFSET_MASK) // CS, 2)
    f.save()

    for args in ([], ["--output=json"]):
        want, ours = _both(f.path, *args)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout), ours.stderr
    lines = _copied_and_refcount_lines(want.stderr)
    assert lines[0].startswith("Leaked cluster") and lines[1:] == [
        "data", lines[2], lines[3], "data"] and "l1_index=1 " in lines[2]
    assert _copied_and_refcount_lines(ours.stderr) == lines
