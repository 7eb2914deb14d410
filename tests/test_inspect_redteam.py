"""Red-team leftovers of ``compare``, ``map`` and ``measure`` against qemu-img 7.2.

Oracle: the same command line run by ``qemu-img`` in the test, stdout and exit code byte for
byte.
"""

from __future__ import annotations

import subprocess

import pytest

from common import qemu_img, qemu_io, run_cli as cli

M = 1024 * 1024


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Images whose block status runs are cut where their merged extents are not: an overlay
    with 4 KiB clusters (an L2 table maps 2 MiB) over a backing file with data across 2 MiB,
    and an 8 MiB image with 4 KiB clusters whose data crosses the tables at 2, 4 and 6 MiB."""
    d = tmp_path_factory.mktemp("steps")
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "4M")
    qemu_io(d / "base.qcow2", "write -P 1 1M 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2",
             "-F", "qcow2", d / "top.qcow2", "4M")
    qemu_img("convert", "-O", "raw", d / "top.qcow2", d / "top.raw")
    with open(d / "top8.raw", "wb") as f:
        f.write((d / "top.raw").read_bytes())
        f.truncate(8 * M)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", d / "top8.raw",
             d / "top8.qcow2")
    return d


@pytest.mark.parametrize("args", [
    ["top.qcow2", "top.raw"], ["top.raw", "top.qcow2"], ["top.raw", "top8.qcow2"],
    ["top8.qcow2", "top.qcow2"], ["-s", "top.qcow2", "top.raw"]])
def test_compare_progress_steps_at_block_status_runs(steps, args):
    """compare -p reports after each chunk of img_compare's loop: the shorter of the two
    block status answers (a qcow2 answer never crosses the end of an L2 table), in the
    common part and in the longer image's tail; merged extents skipped qemu-img's steps."""
    want = subprocess.run(["qemu-img", "compare", "-p", *args], capture_output=True,
                          cwd=steps)
    got = cli("compare", "-p", *args, cwd=steps, text=False)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (got, want)


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory):
    """Sizes whose steps' shares do not add up to exact percentages: 1000 bytes of zeros
    against the same with a 200-byte zero tail (65.10 + 1.5625 + 11.46 is 78.12501 as C
    floats), and chains of 4 KiB clusters over odd-sized backing files, whose float sums stop
    short of 100 or round the other way."""
    d = tmp_path_factory.mktemp("odd")
    (d / "z1000.raw").write_bytes(bytes(1000))
    (d / "z1200.raw").write_bytes(bytes(1200))
    for i, size in enumerate((3149824, 5 * M + 4096 * 7, 9 * M - 512)):
        qemu_img("create", "-q", "-f", "raw", d / f"b{i}.raw", str(size - 4096 * (i + 1)))
        qemu_io(d / f"b{i}.raw", f"write -P 3 {4096 * (i + 3)} 300k", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", f"b{i}.raw",
                 "-F", "raw", d / f"o{i}.qcow2", str(size))
        qemu_io(d / f"o{i}.qcow2", f"write -P 4 {M + 4096 * i} 64k", f"write -P 5 {2 * M} 4k")
    return d


@pytest.mark.parametrize("args", [
    ["z1000.raw", "z1200.raw"], ["o0.qcow2", "o0.qcow2"], ["o1.qcow2", "o1.qcow2"],
    ["o2.qcow2", "o2.qcow2"], ["o0.qcow2", "b0.raw"], ["o2.qcow2", "o1.qcow2"]])
def test_compare_progress_adds_up_as_c_floats(odd_sizes, args):
    """qemu-img adds each step's share to a C float (util/qemu-progress.c): the same
    percentages, byte for byte, also where the float sum differs from the exact share."""
    want = subprocess.run(["qemu-img", "compare", "-p", *args], capture_output=True,
                          cwd=odd_sizes)
    got = cli("compare", "-p", *args, cwd=odd_sizes, text=False)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (got, want)
