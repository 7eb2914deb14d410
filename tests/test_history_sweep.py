"""Images with a history (guest writes, zero writes, discards, compressed writes, snapshots)
written by qemu-io and qemu-img, read by qcowfast's command line and by qemu-img 7.2.

Oracle: qemu-img run in the test on the same file (its "qemu-img:" prefix read as
"qcowfast:"). Also ``check -r`` where qemu-img's check fails before it writes anything: a
snapshot table or a snapshot L1 table it cannot read (EIO past BDRV_MAX_LENGTH), where
qcowfast prints qemu-img's lines and exit code instead of refusing to repair.
"""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from common import QEMU_IMG, qemu_img, qemu_io, run_cli

K = 1024
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)      # QEMU: reads ending past it fail (EIO)
REFUSAL = ("qcowfast: check -r all: qcowfast does not repair images (it never writes to "
           "them); repair with qemu-img check -r\n")


def _qemu(*args, cwd) -> tuple[int, str, str]:
    """qemu-img ARGS: (exit code, stdout, stderr with its prefix as qcowfast's)."""
    proc = subprocess.run([QEMU_IMG, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr.replace("qemu-img: ", "qcowfast: ")


def _put(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _get(path, offset: int, fmt: str):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


@pytest.fixture(scope="module")
def with_snapshots(tmp_path_factory):
    """4 MiB, 64 KiB clusters: writes, a snapshot, more writes and zero writes, a second
    snapshot, a discard."""
    d = tmp_path_factory.mktemp("history")
    img = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 200k", "write -z 256k 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 64k 4k", "discard 128k 64k")
    qemu_img("snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 3 1M 70000")
    return img


def _both(img, repair: str, mutate) -> tuple[tuple, tuple]:
    """`check -r REPAIR` by qemu-img and by qcowfast, each on its own copy of `img` broken by
    `mutate(path)`: ((exit code, stdout, stderr, file unchanged), ...)."""
    results = []
    for tool in ("qemu", "qcowfast"):
        copy = img.parent / f"{tool}-{repair}.qcow2"
        shutil.copyfile(img, copy)
        mutate(copy)
        before = copy.read_bytes()
        if tool == "qemu":
            code, out, err = _qemu("check", "-r", repair, copy.name, cwd=copy.parent)
        else:
            proc = run_cli("check", "-r", repair, copy.name, cwd=copy.parent)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        results.append((code, out, err, copy.read_bytes() == before))
    return results[0], results[1]


def _snapshots_at(offset: int, count: int | None = None):
    def mutate(path):
        _put(path, 64, ">Q", offset)
        if count is not None:
            _put(path, 60, ">I", count)
    return mutate


@pytest.mark.parametrize("mutate", [
    _snapshots_at(BDRV_MAX_LENGTH),                     # the first entry's read fails
    _snapshots_at(0x7FFFFFFFFFFF0000),                  # past BDRV_MAX_LENGTH, below 2^63
    # zeros past the end of the file, until entry 1638 ends past BDRV_MAX_LENGTH
    _snapshots_at(BDRV_MAX_LENGTH - 64 * K, 2000),
], ids=["at-bdrv-max-length", "below-2-63", "entries-run-past"])
def test_check_repair_all_fails_where_the_snapshot_table_read_fails(with_snapshots, mutate):
    """qcow2_check_read_snapshot_table() reads the table even for -r all (in repair mode):
    a read that fails (EIO) fails the check before anything is written, in the lines of the
    check without -r."""
    want, got = _both(with_snapshots, "all", mutate)
    assert want[0] == 1 and want[3], want
    assert "Input/output error" in want[2]
    assert got == want


def _unreadable_second_l1(path):
    table = _get(path, 64, ">Q")[0]
    id_len, name_len, _, _, _, _, extra = _get(path, table + 12, ">HHIIQII")
    second = (table + 40 + extra + id_len + name_len + 7) & ~7
    _put(path, second, ">Q", BDRV_MAX_LENGTH)


def _prealloc_unaligned(path):
    """The active L2 table's entry 40 (unallocated in the history) made a preallocated zero
    cluster at an unaligned offset: check_refcounts_l2() rewrites it under -r all."""
    l1 = _get(path, 40, ">Q")[0]
    l2 = _get(path, l1, ">Q")[0] & 0x00FFFFFFFFFFFE00
    assert _get(path, l2 + 40 * 8, ">Q")[0] == 0
    _put(path, l2 + 40 * 8, ">Q", 0x50200 | 1)


def _without_owner(err: str) -> str:
    """qcowfast's past-the-end line names the table (README Differences); qemu-img's not."""
    return err.replace(" (an L1 table)", "")


@pytest.mark.parametrize("repair", ["all", "leaks"])
def test_check_repair_fails_where_a_snapshot_l1_table_read_fails(with_snapshots, repair):
    """check_refcounts_l1() cannot read a snapshot's L1 table past BDRV_MAX_LENGTH: the walk
    (calculate_refcounts()) fails before qcow2_check_refcounts() repairs anything; where
    `-r all` would already have rewritten an L2 entry during the walk, qcowfast refuses."""
    want, got = _both(with_snapshots, repair, _unreadable_second_l1)
    assert want[0] == 1 and want[3] and want[2].endswith(
        "ERROR: I/O error in check_refcounts_l1\nqcowfast: Check failed: Input/output error\n")
    assert got[:2] + got[3:] == want[:2] + want[3:]
    assert _without_owner(got[2]) == want[2]

    def both(path):
        _unreadable_second_l1(path)
        _prealloc_unaligned(path)
    want, got = _both(with_snapshots, repair, both)
    assert want[0] == got[0] == 1 and got[3]
    if repair == "all":
        assert not want[3] and want[2].startswith("Repairing offset=50200")
        assert (got[1], got[2]) == ("", REFUSAL)
    else:
        assert want[3] and want[2].startswith("ERROR offset=50200")
        assert got[1] == want[1] and got[2].endswith(want[2].split("\n", 1)[1].replace(
            "size 0x8\n", "size 0x8 (an L1 table)\n"))


def _check_both(img, *args) -> None:
    """`check ARGS IMG` prints what qemu-img's prints, with its exit code."""
    __tracebackhide__ = True
    want = _qemu("check", *args, img.name, cwd=img.parent)
    proc = run_cli("check", *args, img.name, cwd=img.parent)
    assert (proc.returncode, proc.stdout, proc.stderr) == want


def test_check_names_every_l1_entry_with_a_wrong_copied_flag(tmp_path):
    """A guest history on 512-byte clusters with 2-bit refcounts (lazy refcounts), then a
    snapshot that fails half-way (a refcount would overflow: EINVAL) and more writes:
    qemu-img check finds seven active L1 entries whose COPIED flag disagrees with their L2
    table's refcount and names each (check_oflag_copied()); qcowfast named the first three."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "cluster_size=512,refcount_bits=2,lazy_refcounts=on", img, 1049088)
    qemu_io(img, "write -z -u 752007 79322", "write -c -P 87 238592 1536",
            "write -c -P 137 473088 1536", "write -P 229 73216 16655", "write -z 134144 3072",
            "write -P 228 24064 77457", "write -z 824912 3072", "discard 54784 152805",
            "write -P 19 287232 4096")
    assert _qemu("snapshot", "-c", "s0", img.name, cwd=tmp_path)[0] == 1
    qemu_io(img, "write -P 101 449328 2048")
    err = _qemu("check", img.name, cwd=tmp_path)[2]
    assert err.count("ERROR OFLAG_COPIED L2 cluster") > 3
    _check_both(img)
    _check_both(img, "--output=json")


@pytest.mark.parametrize("repair", ["all", "leaks"])
def test_check_repair_fails_where_qemu_cannot_count_a_snapshot_l1_table(with_snapshots,
                                                                          repair):
    """A snapshot L1 table of 1 MiB entries at 2^63 - 1 MiB: qcow2_inc_refcounts_imrt() cannot
    size its array for it (ENOMEM) and the check fails before repairing anything."""
    def mutate(path):
        table = _get(path, 64, ">Q")[0]
        _put(path, table, ">QI", 0x7FFFFFFFFFF00000, 0x100000)
    want, got = _both(with_snapshots, repair, mutate)
    assert want == (1, "", "qcowfast: Check failed: Cannot allocate memory\n", True)
    assert got == want
