"""QEMU modifying qcowfast's QCOW2 outputs: each write path (qemu-io writes, discard, snapshots,
resize, amend, bitmaps, rebase, commit, convert) runs on qcowfast's output and on qemu-img's
output of the same source with the same options; both must then check clean, alike, and hold
the same guest bytes. Faults in the writer's metadata (refcount table room, table placement,
header fields, compressed descriptors) only show under such writes.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from common import QEMU_IMG, assert_same_bytes, qemu_img, qemu_io, reference_raw, run_cli

K, M = 1024, 1024 * 1024

# name: (qemu-img convert flags, -o options)
OPTIONS = {
    "default": ([], ""),
    "zlib": (["-c"], ""),
    "zstd": (["-c"], "compression_type=zstd"),
    "c512": ([], "cluster_size=512"),
    "c4k-zlib": (["-c"], "cluster_size=4096"),
    "c2M": ([], "cluster_size=2M"),
    "c2M-zstd": (["-c"], "compression_type=zstd,cluster_size=2M"),
}

# Write paths: lists of steps; "IMG" is the image, "OV" an overlay created on it.
SCENARIOS = {
    "writes": [("io", "write -P 0x5a 3000k 100k", "write -P 0x5b 0 200k",
                "write -P 0x5c 1000 3000", "write -P 0x5d 70000 5",
                "write -c -P 0x5e 1M 64k")],
    "zero-discard": [("io", "write -z 100k 1M", "write -z -u 1200k 300k", "discard 2M 512k")],
    "snapshots": [("img", "snapshot", "-c", "s1", "IMG"), ("io", "write -P 0x66 0 1M"),
                  ("img", "snapshot", "-c", "s2", "IMG"), ("img", "snapshot", "-a", "s1", "IMG"),
                  ("io", "write -P 0x67 512k 64k"), ("img", "snapshot", "-d", "s2", "IMG")],
    "resize": [("img", "resize", "IMG", "+20M"), ("io", "write -P 0x44 20M 1M"),
               ("img", "resize", "--shrink", "IMG", "1M")],
    "amend": [("img", "amend", "-o", "compat=0.10", "IMG"), ("io", "write -P 0x45 0 64k"),
              ("img", "amend", "-o", "compat=1.1,lazy_refcounts=on", "IMG"),
              ("io", "write -P 0x46 2M 100k")],
    # (not with 2 MiB clusters: qemu-img amend then takes minutes on its own images too)
    "refcount-bits": [("img", "amend", "-o", "refcount_bits=64", "IMG"),
                      ("io", "write -P 0x47 1M 100k"),
                      ("img", "amend", "-o", "refcount_bits=16", "IMG"),
                      ("io", "write -P 0x48 2M 100k")],
    "bitmap": [("img", "bitmap", "--add", "IMG", "b0"), ("io", "write -P 0x13 0 64k")],
    "commit": [("overlay",), ("io_ov", "write -P 0x31 64k 1M"), ("img", "commit", "OV")],
    "rebase": [("overlay",), ("io_ov", "write -P 0x31 64k 1M"),
               ("img", "rebase", "-F", "qcow2", "-b", "", "OV")],
}


def _mixed(path: Path, size: int) -> Path:
    """Raw data, text and zero runs at 32 KiB granularity; `size` need not be cluster-aligned."""
    rng = random.Random(size)
    data = bytearray(size)
    for at in range(0, size, 32 * K):
        kind, n = rng.randrange(3), min(32 * K, size - at)
        if kind == 0:
            data[at:at + n] = rng.randbytes(n)
        elif kind == 1:
            data[at:at + n // 2] = (b"qcowfast " * (n // 9 + 1))[:n // 2]
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (path, format): raw with mixed data, an all-zero raw, a qcow2 chain whose top
    holds data, zeros and discards, and a compressed qcow2."""
    d = tmp_path_factory.mktemp("sources")
    raw = _mixed(d / "mixed.raw", 3 * M + 7 * 512)
    (d / "zero.raw").write_bytes(bytes(M))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, d / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x11 100k 300k", "write -z 1M 64k", "discard 2M 64k")
    qemu_img("convert", "-f", "raw", "-c", "-O", "qcow2", raw, d / "comp.qcow2")
    return {"raw": (raw, "raw"), "zero": (d / "zero.raw", "raw"),
            "chain": (d / "top.qcow2", "qcow2"), "comp": (d / "comp.qcow2", "qcow2")}


def _pair(sources, tmp_path, source, option):
    """(qcowfast's output, qemu-img's output) of `source` with `option`, in their own dirs."""
    path, fmt = sources[source]
    flags, opts = OPTIONS[option]
    argv = ["convert", "-f", fmt, "-O", "qcow2", *flags, *(["-o", opts] if opts else []), path]
    out = []
    for tool in ("qf", "qemu"):
        (tmp_path / tool).mkdir()
        dst = tmp_path / tool / "img.qcow2"
        if tool == "qf":
            proc = run_cli(*argv, dst)
            assert proc.returncode == 0, proc.stderr
        else:
            qemu_img(*argv, dst)
        out.append(dst)
    return out


def _run(img: Path, steps) -> list:
    """Run the steps on `img`; return each step's exit status and error text."""
    ov = img.with_name("ov.qcow2")
    seen = []
    for step in steps:
        kind, *args = step
        if kind == "overlay":
            argv = [QEMU_IMG, "create", "-f", "qcow2", "-F", "qcow2", "-b", img.name, ov]
        elif kind in ("io", "io_ov"):
            target = img if kind == "io" else ov
            argv = ["qemu-io", "-f", "qcow2", *[x for c in args for x in ("-c", c)], target]
        else:
            argv = [QEMU_IMG, *[img if a == "IMG" else ov if a == "OV" else a for a in args]]
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              check=False, timeout=60)
        text = proc.stderr + "".join(line for line in proc.stdout.splitlines(True)
                                     if "ops/sec" not in line and "wrote" not in line
                                     and "discard" not in line)
        seen.append((step, proc.returncode, text.replace(str(img.parent), "DIR")))
    return seen


def _check(img: Path) -> tuple[int, dict]:
    """qemu-img check's status and JSON, without the fields that depend on the layout."""
    proc = subprocess.run([QEMU_IMG, "check", "--output=json", str(img)], capture_output=True,
                          text=True, check=False, timeout=60)
    report = json.loads(proc.stdout)
    for key in ("filename", "image-end-offset", "fragmented-clusters"):
        report.pop(key, None)
    return proc.returncode, report


def _assert_alike(ours: Path, theirs: Path) -> None:
    status, report = _check(ours)
    assert (status, report) == _check(theirs)
    assert status == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert_same_bytes(reference_raw(ours), reference_raw(theirs), f"guest bytes of {ours}")


@pytest.mark.parametrize("source,option,scenario", [
    *[("raw", o, s) for o in ("default", "zlib", "zstd", "c512", "c2M")
      for s in ("writes", "zero-discard", "snapshots", "resize", "amend")],
    *[("raw", o, "refcount-bits") for o in ("default", "zlib", "c512", "c4k-zlib")],
    *[("raw", "c2M-zstd", s) for s in ("writes", "snapshots")],
    *[(src, o, s) for src in ("chain", "comp") for o in ("zlib", "c512")
      for s in ("writes", "resize")],
    *[("zero", o, "writes") for o in ("default", "zstd", "c512")],
    *[("raw", o, s) for o in ("default", "zlib") for s in ("bitmap", "commit", "rebase")],
])
def test_qemu_modifies_output(sources, tmp_path, source, option, scenario):
    """The same write path on qcowfast's and qemu-img's output: same messages, check clean and
    alike, same guest bytes (the overlay's too)."""
    ours, theirs = _pair(sources, tmp_path, source, option)
    steps = SCENARIOS[scenario]
    assert _run(ours, steps) == _run(theirs, steps)
    _assert_alike(ours, theirs)
    if (ours.parent / "ov.qcow2").exists():
        _assert_alike(ours.parent / "ov.qcow2", theirs.parent / "ov.qcow2")


@pytest.mark.parametrize("option", ["default", "zlib"])
def test_rebase_overlay_onto_output(sources, tmp_path, option):
    """An overlay of another base, rebased (safe mode) onto qcowfast's output."""
    outs = _pair(sources, tmp_path, "raw", option)
    for img in outs:
        shutil.copy(sources["chain"][0].with_name("base.qcow2"), img.with_name("old.qcow2"))
        ov = img.with_name("ov.qcow2")
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "old.qcow2", ov)
        qemu_io(ov, "write -P 0x21 64k 64k", "write -z 1M 64k")
        qemu_img("rebase", "-F", "qcow2", "-b", img.name, ov)
        qemu_io(ov, "read -P 0x21 64k 64k")
    _assert_alike(*[img.with_name("ov.qcow2") for img in outs])
    _assert_alike(*outs)


@pytest.mark.parametrize("option", ["zlib", "zstd"])
def test_convert_modified_output(sources, tmp_path, option):
    """qemu-img convert reads a modified output as it reads its own."""
    outs = _pair(sources, tmp_path, "comp", option)
    for img in outs:
        qemu_io(img, "write -P 0x71 100k 10k", "discard 1M 64k")
        qemu_img("convert", "-O", "qcow2", "-c", img, img.with_name("again.qcow2"))
    _assert_alike(*[img.with_name("again.qcow2") for img in outs])


def _refcount_table_clusters(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">I", f.read(60)[56:60])[0]


@pytest.mark.parametrize("flags", [[], ["-c"]])
def test_refcount_table_grows(tmp_path, flags):
    """512-byte clusters: one refcount table cluster covers 8 MiB of host file; QEMU's writes
    past it need new refcount blocks and a larger table, on qcowfast's output as on its own."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(7).randbytes(6 * M) + bytes(M))
    outs = []
    for tool in ("qf", "qemu"):
        dst = tmp_path / f"{tool}.qcow2"
        argv = ["convert", "-f", "raw", "-O", "qcow2", *flags, "-o", "cluster_size=512", src,
                dst]
        if tool == "qf":
            assert run_cli(*argv).returncode == 0
        else:
            qemu_img(*argv)
        assert _refcount_table_clusters(dst) == 1
        qemu_img("resize", dst, "+8M")
        qemu_io(dst, "write -P 0x35 7M 6M", "write -P 0x36 100 5000")
        assert _refcount_table_clusters(dst) == 2
        qemu_io(dst, "read -P 0x35 7M 6M", "read -P 0x36 100 5000")
        outs.append(dst)
    _assert_alike(*outs)
