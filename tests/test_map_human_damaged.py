"""The human ``map`` of a damaged image holding compressed clusters, against ``qemu-img map``.

qemu-img.c img_map() prints a human row once the next block status query succeeds, and fails
at the first finished range with data but no host offset (a compressed cluster): "File contains
external, encrypted or compressed clusters.". A bad L2 entry further on is never reached. Oracle:
``qemu-img map`` on the same file, its stdout, stderr and exit code.
"""
from __future__ import annotations

import subprocess

import pytest

from common import QEMU_IMG, patch_l2_entry, qemu_img, qemu_io, run_cli

M = 1 << 20


def _image(d, *writes):
    """64 KiB clusters: data at 0, a compressed cluster at 1M, then `writes`."""
    p = d / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io(p, "write -P 1 0 64k", "write -c -P 2 1M 64k", *writes)
    return p


def _reserved_bit(d):
    """The red-team reproducer: data at 2M, and at 4M an entry with a reserved bit (0x100)."""
    p = _image(d, "write -P 3 2M 64k", "write -P 4 4M 64k")
    patch_l2_entry(p, 4 * M, lambda e: e | 0x100)
    return p, []


def _unaligned(d):
    """At 4M a host offset 512 bytes into its cluster: QEMU fails there (EIO) when it gets
    there, qcowfast as it reads the L2 table ahead."""
    p = _image(d, "write -P 3 2M 64k", "write -P 4 4M 64k")
    patch_l2_entry(p, 4 * M, lambda e: e + 512)
    return p, []


def _ranged(d):
    """From --start-offset 64k: no row before the compressed cluster."""
    p, _ = _reserved_bit(d)
    return p, ["--start-offset", "64k"]


def _backing(d):
    """The compressed cluster and the bad entry lie in the backing file, under an overlay."""
    base, _ = _unaligned(d)
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 5 512k 64k", "write -P 6 3M 64k")
    return top, []


COMPRESSED_FIRST = {"reserved-bit": _reserved_bit, "unaligned": _unaligned,
                    "ranged": _ranged, "backing": _backing}


def _both(path, args):
    want = subprocess.run([QEMU_IMG, "map", *args, path.name], capture_output=True,
                          text=True, check=False, cwd=path.parent)
    ours = run_cli("map", *args, path.name, cwd=path.parent)
    return want, ours


@pytest.mark.parametrize("case", sorted(COMPRESSED_FIRST))
def test_compressed_cluster_fails_the_map_before_a_later_bad_entry(tmp_path, case):
    """qemu-img prints the rows before the compressed cluster and fails there; qcowfast, which
    meets the bad entry first (it reads L2 tables ahead), prints and fails the same."""
    path, args = COMPRESSED_FIRST[case](tmp_path)
    want, ours = _both(path, args)
    assert want.returncode == 1
    assert want.stderr == "qemu-img: File contains external, encrypted or compressed " \
                          "clusters.\n"
    assert want.stdout.startswith("Offset          Length")
    assert (ours.returncode, ours.stdout, ours.stderr) == \
        (want.returncode, want.stdout, want.stderr.replace("qemu-img: ", "qcowfast: "))


def test_bad_entry_right_after_a_compressed_cluster_fails_first(tmp_path):
    """The query after the compressed cluster fails: qemu-img never finishes that range, so it
    prints only the rows before it and reports the bad entry, not the compressed cluster."""
    p = _image(tmp_path, "write -P 3 1088k 64k", "write -P 4 2M 64k")
    patch_l2_entry(p, 1088 * 1024, lambda e: e + 512)
    want, ours = _both(p, [])
    assert want.returncode == 1 and "Could not read file metadata" in want.stderr
    assert (ours.returncode, ours.stdout) == (1, want.stdout)
    assert want.stdout.count("\n") == 2                 # the header and the row at 0
    assert len(ours.stderr.splitlines()) == 1 and ours.stderr.startswith("qcowfast: ")
    assert "compressed" not in ours.stderr
