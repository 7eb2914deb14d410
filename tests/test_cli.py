"""The ``qcowfast`` command line, run as a real subprocess (``python -m qcowfast``).

Oracles: ``qemu-img convert -O raw`` for the bytes, ``qemu-img map`` (text, both formats) for
``qcowfast map``, and the image file itself (L1/L2 entries read with ``struct`` from the header
fields) for ``map --lookup``. Errors must be one ``qcowfast: ...`` line on stderr with exit code 1,
never a traceback; usage errors print the subcommand's usage and exit 1, as qemu-img's do.
Where qemu-img has the same option, the same command line goes through both tools and the exit
status class and output bytes are compared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

import qcowfast
from qcowfast import ExtentKind
from common import (assert_same_bytes, cli_in_process as cli, progress_values, qemu_img,
                    qemu_io, qemu_map, reference_raw, run_cli)

K = 1024
M = 1024 * 1024


def run(*args, cwd=None, stderr=subprocess.PIPE, timeout=120) -> subprocess.CompletedProcess:
    """Run ``python -m qcowfast ARGS`` and return the completed process (stdout as bytes)."""
    argv = [a if isinstance(a, str) else os.fspath(a) if isinstance(a, os.PathLike) else str(a)
            for a in args]
    return subprocess.run([sys.executable, "-m", "qcowfast", *argv],
                          stdout=subprocess.PIPE, stderr=stderr, cwd=cwd, timeout=timeout,
                          check=False)


def err_text(proc) -> str:
    return proc.stderr.decode(errors="replace")


def assert_one_line_error(proc, *, contains: str | None = None, code: int = 1) -> str:
    """The process failed with *code* and printed exactly one ``qcowfast: `` line on stderr."""
    __tracebackhide__ = True
    err = err_text(proc)
    assert proc.returncode == code, f"exit {proc.returncode}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfast: "), err
    if contains is not None:
        assert contains in lines[0], err
    assert proc.stdout == b""
    return lines[0]


def assert_usage_error(proc, option: str, command: str | None = None) -> None:
    """qemu-img's convention: a usage error exits 1; argparse's usage of the (sub)command."""
    __tracebackhide__ = True
    err = err_text(proc)
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr: {err}"
    assert "Traceback" not in err, err
    assert err.startswith(f"usage: qcowfast {command or ''}"), err
    assert option in err.splitlines()[-1], err


def assert_one_line(status: int, out: str, err: str, contains: str, code: int = 1) -> str:
    __tracebackhide__ = True
    assert status == code, (status, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfast: ") and contains in lines[0], err
    assert out == ""
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".qcowfast-tmp"))


# ---------------------------------------------------------------------------------------------
# convert: success paths


def test_convert_success_summary(images, tmp_path):
    image = images.get("c64k-v3-zeroes")
    dst = tmp_path / "out.raw"
    proc = run("convert", "--summary", image.path, dst)
    err = err_text(proc)
    assert proc.returncode == 0, err
    assert proc.stdout == b""
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "qcowfast convert")
    lines = err.splitlines()
    assert len(lines) == 1, err
    summary = lines[0]
    assert summary.startswith("qcowfast: ") and str(dst) in summary and str(image.path) in summary
    assert "virtual" in summary and "written" in summary
    assert "%" not in err and "\r" not in err          # -p not given: no progress bar
    assert leftovers(tmp_path) == []


def test_convert_quiet(images, tmp_path):
    image = images.get("c4k-v3")
    proc = run("convert", "-q", image.path, tmp_path / "out.raw")
    assert proc.returncode == 0, err_text(proc)
    assert proc.stderr == b"" and proc.stdout == b""
    assert (tmp_path / "out.raw").read_bytes() == reference_raw(image.path)


def test_convert_all_options(images, tmp_path):
    image = images.get("c64k-chain2-zlib-base")
    dst = tmp_path / "out.raw"
    proc = run("convert", "-O", "raw", "--threads", "3", "-t", "writeback", "-S", "64k",
               "--fsync", "--overwrite", "--summary",
               "--max-stream-size", "1G", "--allow-backing-dir", tmp_path, image.path, dst)
    assert proc.returncode == 0, err_text(proc)
    assert "3 threads" in err_text(proc)
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "all options")


def test_progress_like_qemu_img(images, tmp_path):
    """-p prints qemu-img's report on stdout, pipe or not: '    (P/100%)\r' from 0 to 100 in
    steps over 1 point, then a newline; standard error stays empty, as qemu-img's."""
    image = images.get("c2m-chain3-mixed-clusters")
    proc = run("convert", "-p", image.path, tmp_path / "out.raw")
    err = err_text(proc)
    assert proc.returncode == 0, err
    values = progress_values(proc.stdout)
    assert all(b - a > 1.0 for a, b in zip(values[:-1], values[1:]) if b < 100), values
    assert (tmp_path / "out.raw").read_bytes() == reference_raw(image.path)
    ref = subprocess.run(["qemu-img", "convert", "-p", "-O", "raw", image.path,
                          tmp_path / "ref.raw"], capture_output=True, check=True)
    assert proc.stderr == ref.stderr == b""
    progress_values(ref.stdout)                           # the same shape from qemu-img
    # --force-progress (old scripts) is -p; -q silences both, as qemu-img -q -p.
    proc = run("convert", "--force-progress", image.path, tmp_path / "out.raw")
    assert proc.returncode == 0, err_text(proc)
    progress_values(proc.stdout)
    proc = run("convert", "-q", "--force-progress", image.path, tmp_path / "out.raw")
    assert proc.returncode == 0 and proc.stderr == b"" and proc.stdout == b""


def test_no_progress_without_p(images, tmp_path):
    image = images.get("c2m-chain3-mixed-clusters")
    proc = run("convert", image.path, tmp_path / "out.raw")
    err = err_text(proc)
    assert proc.returncode == 0, err
    assert proc.stdout == b"" == proc.stderr, err


def test_progress_on_sigusr1(tmp_path):
    """Without -p, SIGUSR1 prints the progress on stderr (as qemu-img) instead of ending the
    process: sent while the conversion waits on a full pipe."""
    src = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io(src, "write -P 0x5a 0 8M")
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert", "-q", src, "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(4096)        # running: its handlers are in place by now
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        rest = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first + rest == b"\x5a" * (8 * M)
    assert re.fullmatch(rb"    \(\d+\.\d\d/100%\)\n", err), err


def test_stream_to_pipe_with_progress(images):
    """With DST -, stdout carries the image: the progress report goes to stderr."""
    image = images.get("c64k-v3-zstd")
    proc = run("convert", "-p", "--threads", "2", image.path, "-")
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(proc.stdout, reference_raw(image.path), "convert -p IMG -")
    progress_values(proc.stderr)                    # (the report, and nothing else)


@pytest.mark.parametrize("size, granularity", [("0", 0), ("4k", 4096), ("64k", 65536),
                                               ("1.5k", 1536), ("4096", 4096), ("1M", M)])
def test_sparse_size_option(images, tmp_path, size, granularity):
    image = images.get("c512-v3-sparse")
    want = reference_raw(image.path)
    dst = tmp_path / "out.raw"
    proc = run("convert", "-S", size, image.path, dst)
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(dst.read_bytes(), want, f"-S {size}")
    st = dst.stat()
    bs = st.st_blksize
    allocated = st.st_blocks * 512
    if granularity == 0:
        assert allocated >= -(-len(want) // bs) * bs
        return
    # No more allocated than the file system blocks touched by the aligned blocks of SIZE
    # bytes that hold a non-zero byte (plus an extent-tree block): -S reached the conversion.
    # The coarser SIZE, the more zeros around the data get written.
    touched = set()
    for i in range(0, len(want), granularity):
        if want[i:i + granularity].strip(b"\0"):
            touched.update(range(i // bs, (min(i + granularity, len(want)) - 1) // bs + 1))
    assert allocated <= (len(touched) + 1) * bs, (allocated, len(touched) * bs)
    if granularity <= 65536:
        assert allocated < len(want) // 2


@pytest.mark.parametrize("option, bad", [     # (-S: qemu-img's lines, test_convert_option_words)
    ("--max-stream-size", "4kk"), ("--max-stream-size", "k"), ("--lookup", "0x1g0"),
    ("--lookup", "0x1.5k"),
])
def test_bad_size_strings_are_usage_errors(images, tmp_path, option, bad):
    image = images.get("c4k-v3")
    if option == "--lookup":
        proc = run("map", option, bad, image.path)
    else:
        proc = run("convert", option, bad, image.path, tmp_path / "out.raw")
    warning = f"qcowfast: warning: Using a multiplier suffix on hex numbers is deprecated: {bad}\n"
    if bad.startswith("0x") and bad[3:4].isalpha():     # QEMU warns, then refuses the rest
        assert err_text(proc).startswith(warning), err_text(proc)
        proc.stderr = proc.stderr[len(warning):]
    assert_usage_error(proc, option, "map" if option == "--lookup" else "convert")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option, text, value", [
    ("-S", "1.0001k", 1024), ("-S", " +4k", 4096), ("-S", "0x200", 512),
    ("--start-offset", "1.5k", 1536), ("--max-length", "0x10k", 16384),
])
def test_sizes_read_as_qemu_strtosz_reads_them(images, tmp_path, option, text, value):
    """Sizes on the command line are QEMU's qemu_strtosz(): a fraction rounded to the nearest
    byte ("1.0001k" is 1024), leading blanks and "+", a suffix on hex with QEMU's warning."""
    image = images.get("c4k-v3")
    if option == "-S":
        out = tmp_path / "out.raw"
        proc = run("convert", option, text, image.path, out)
        assert proc.returncode == 0, err_text(proc)
        ref = subprocess.run(["qemu-img", "convert", "-O", "raw", option, text, image.path,
                              tmp_path / "ref.raw"], capture_output=True)
        assert ref.returncode == 0 and out.read_bytes() == (tmp_path / "ref.raw").read_bytes()
        return
    proc = run("map", "--output=json", option, text, image.path)
    ref = subprocess.run(["qemu-img", "map", "--output=json", option, text, image.path],
                         capture_output=True)
    want = subprocess.run(["qemu-img", "map", "--output=json", option, str(value), image.path],
                          capture_output=True)
    assert proc.returncode == 0 == ref.returncode, err_text(proc)
    assert proc.stdout == ref.stdout == want.stdout
    assert err_text(proc) == ref.stderr.decode().replace("qemu-img:", "qcowfast:")


@pytest.mark.parametrize("args", [("-S", "1000"), ("-S", "100"), ("--threads", "-1"),
                                  ("--threads", "x"), ("-t", "4")],
                         ids=["S1000", "S100", "threads-1", "threadsx", "t4"])
def test_invalid_option_values_fail_cleanly(images, tmp_path, args):
    """Values the parser accepts but convert() refuses: an error message, never a traceback."""
    image = images.get("c4k-v3")
    proc = run("convert", *args, image.path, tmp_path / "out.raw")
    err = err_text(proc)
    assert proc.returncode in (1, 2), err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(("qcowfast: ", "qcowfast convert: ")), err
    assert os.listdir(tmp_path) == []


def test_stream_to_pipe(images):
    image = images.get("c64k-extl2")
    proc = run("convert", image.path, "-")
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(proc.stdout, reference_raw(image.path), "convert IMG - (stdout)")
    assert proc.stderr == b""


def test_max_stream_size(images):
    image = images.get("c64k-v3")
    assert_one_line_error(run("convert", "--max-stream-size", "1k", image.path, "-"),
                          contains="--max-stream-size")
    proc = run("convert", "--max-stream-size", "0", image.path, "-")      # 0: no limit
    assert proc.returncode == 0, err_text(proc)
    assert proc.stdout == reference_raw(image.path)


# ---------------------------------------------------------------------------------------------
# convert: failures


def test_missing_source(tmp_path):
    missing = tmp_path / "missing.qcow2"
    line = assert_one_line_error(run("convert", missing, tmp_path / "out.raw"))
    assert str(missing) in line
    assert os.listdir(tmp_path) == []


def test_raw_source_converts_like_qemu_img(tmp_path):
    """A file without the QCOW2 magic is probed as raw, as qemu-img probes it."""
    for name, data in (("plain.raw", b"just some bytes\n" * 1000), ("empty", b"")):
        src = tmp_path / name
        src.write_bytes(data)
        proc = run("convert", "-q", src, tmp_path / "out.raw")
        assert proc.returncode == 0, err_text(proc)
        qemu_img("convert", "-O", "raw", src, tmp_path / "want.raw")
        assert_same_bytes((tmp_path / "out.raw").read_bytes(),
                          (tmp_path / "want.raw").read_bytes(), f"raw source {name}")


def test_directory_as_source(tmp_path):
    assert_one_line_error(run("convert", tmp_path, tmp_path / "out.raw"))
    assert os.listdir(tmp_path) == []


def test_unsupported_output_format(images, tmp_path):
    image = images.get("c4k-v3")
    assert_one_line_error(run("convert", "-O", "vmdk", image.path, tmp_path / "out.vmdk"),
                          contains="-O vmdk")
    assert_one_line_error(run("convert", "-f", "vmdk", image.path, tmp_path / "out.raw"),
                          contains="-f vmdk")
    assert os.listdir(tmp_path) == []


def test_existing_dst(images, tmp_path):
    """qemu-img replaces an existing file; so does qcowfast unless --no-clobber."""
    image = images.get("c64k-v3")
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"keep me")
    line = assert_one_line_error(run("convert", "--no-clobber", image.path, dst))
    assert str(dst) in line
    assert dst.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["out.raw"]
    for options in ((), ("--overwrite",)):
        dst.write_bytes(b"replace me")
        proc = run("convert", *options, image.path, dst)
        assert proc.returncode == 0, err_text(proc)
        assert_same_bytes(dst.read_bytes(), reference_raw(image.path), f"{options}")
    assert_usage_error(run("convert", "--overwrite", "--no-clobber", image.path, dst),
                       "--no-clobber", "convert")


def test_dst_is_source_or_backing(images, tmp_path):
    image = images.copy("c4k-chain3-short-base", tmp_path)
    before = {layer.path: zlib.crc32(layer.path.read_bytes()) for layer in image.chain}
    for layer in image.chain:
        assert_one_line_error(run("convert", "--overwrite", image.path, layer.path))
    after = {layer.path: zlib.crc32(layer.path.read_bytes()) for layer in image.chain}
    assert after == before
    assert leftovers(tmp_path) == []


def test_corrupt_image_fails_cleanly(images, tmp_path):
    image = images.copy("c64k-v3-zlib", tmp_path / "src")
    with qcowfast.open(str(image.path)) as img:
        ext = next(e for e in img.extents(image.virtual_size // 2)
                   if e.kind == ExtentKind.COMPRESSED)
    with open(image.path, "r+b") as f:
        f.seek(ext.host_offset)
        f.write(b"\xff" * 8)                       # deflate block type 11: invalid
    dst = tmp_path / "out.raw"
    line = assert_one_line_error(run("convert", image.path, dst))
    assert "compressed cluster" in line
    assert not dst.exists() and leftovers(tmp_path) == []
    # Streamed: some bytes may be out already, but the failure is still one clean line.
    proc = run("convert", image.path, "-")
    err = err_text(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("qcowfast: ") and "compressed cluster" in err
    assert len(proc.stdout) < image.virtual_size


def test_backing_dir_policy(tmp_path):
    """A backing file outside the image's directory is followed only with --allow-backing-dir."""
    base_dir, top_dir = tmp_path / "bases", tmp_path / "tops"
    base_dir.mkdir()
    top_dir.mkdir()
    base = base_dir / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, M)
    qemu_io(base, "write -P 0x6b 0 64k")
    top = top_dir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, M)
    qemu_io(top, "write -P 0x6c 512k 4k")
    dst = tmp_path / "out.raw"
    assert_one_line_error(run("convert", top, dst), contains="--allow-backing-dir")
    assert_one_line_error(run("map", top), contains="--allow-backing-dir")
    assert not dst.exists()
    proc = run("convert", "--allow-backing-dir", base_dir, top, dst)
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(dst.read_bytes(), reference_raw(top), "--allow-backing-dir")
    proc = run("map", "--output=json", "--allow-backing-dir", base_dir, top)
    assert proc.returncode == 0, err_text(proc)
    assert proc.stdout == qemu_img("map", "--output=json", top).stdout.encode()


# ---------------------------------------------------------------------------------------------
# map

MAP_JSON_IDS = ["c512-v2", "c512-v3-zlib", "c4k-v2-zlib", "c64k-v3-zstd", "c2m-v3-zlib",
                "c64k-v3-zeroes", "c64k-v2-zeroes", "c512-v3-sparse", "c64k-v3-empty",
                "c64k-v3-prealloc", "c64k-extl2-zlib-backing", "c4k-chain3-short-base",
                "c2m-chain3-mixed-clusters", "c64k-raw-backing", "c4k-raw-backing-odd"]
MAP_HUMAN_IDS = ["c512-v2", "c4k-v3-zeroes", "c64k-v2-zeroes", "c512-v3-sparse", "c64k-v3-empty",
                 "c64k-v3-snapshot", "c64k-v3-prealloc", "c4k-chain3-short-base",
                 "c64k-v2-chain2-long-base", "c64k-raw-backing", "c4k-raw-backing-odd"]


@pytest.mark.images(ids=MAP_JSON_IDS)
def test_map_json_text_matches_qemu_img(image):
    proc = run("map", "--output=json", image.path)
    assert proc.returncode == 0, err_text(proc)
    want = qemu_img("map", "--output=json", image.path).stdout
    assert proc.stdout.decode() == want


@pytest.mark.images(ids=MAP_HUMAN_IDS)
def test_map_human_text_matches_qemu_img(image):
    # Once with a path relative to the working directory, once absolute: the File column
    # repeats the name as QEMU builds it.
    proc = run("map", image.path.name, cwd=image.path.parent)
    assert proc.returncode == 0, err_text(proc)
    want = qemu_img("map", image.path.name, cwd=image.path.parent).stdout
    assert proc.stdout.decode() == want
    proc = run("map", "--output", "human", image.path)
    assert proc.returncode == 0, err_text(proc)
    assert proc.stdout.decode() == qemu_img("map", image.path).stdout


def test_map_human_refuses_compressed(images):
    image = images.get("c64k-v3-zlib")
    proc = run("map", image.path)
    err = err_text(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("qcowfast: ") and "compressed" in err


def test_map_bad_output_format(images):
    proc = run("map", "--output", "yaml", images.get("c4k-v3").path)
    assert (proc.returncode, err_text(proc)) == (
        1, "qcowfast: --output must be used with human or json as argument.\n")


def _header(path: Path) -> tuple[int, int, bool]:
    """(cluster_bits, l1_table_offset, extended_l2) straight from the header bytes."""
    with open(path, "rb") as f:
        head = f.read(104)
    assert head[:4] == b"QFI\xfb"
    version, = struct.unpack_from(">I", head, 4)
    cluster_bits, = struct.unpack_from(">I", head, 20)
    l1_offset, = struct.unpack_from(">Q", head, 40)
    extl2 = version >= 3 and bool(struct.unpack_from(">Q", head, 72)[0] & (1 << 4))
    return cluster_bits, l1_offset, extl2


def _entries(path: Path, offset: int) -> tuple[int, int, int | None, int | None]:
    """(l1_index, l1_entry, l2_index, l2_entry) for guest *offset*, read from the file."""
    cluster_bits, l1_offset, extl2 = _header(path)
    entry_size = 16 if extl2 else 8
    l2_entries = (1 << cluster_bits) // entry_size
    l1_index = offset // (l2_entries << cluster_bits)
    l2_index = (offset >> cluster_bits) % l2_entries
    with open(path, "rb") as f:
        f.seek(l1_offset + 8 * l1_index)
        l1_entry, = struct.unpack(">Q", f.read(8))
        l2_offset = l1_entry & 0x00FF_FFFF_FFFF_FE00
        if not l2_offset:
            return l1_index, l1_entry, None, None
        f.seek(l2_offset + entry_size * l2_index)
        l2_entry, = struct.unpack(">Q", f.read(8))
    return l1_index, l1_entry, l2_index, l2_entry


_L1_LINE = re.compile(r"depth (\d+): .*L1\[(\d+)\] = (0x[0-9a-f]+)")
_L2_LINE = re.compile(r"L2\[(\d+)\] = (0x[0-9a-f]+)")
_HOST = re.compile(r"host offset (0x[0-9a-f]+)")


@pytest.mark.parametrize("image_id, offset", [
    ("c64k-v3", 3 * M + 1000),
    ("c512-v2", 700 * K + 3),
    ("c4k-chain3-short-base", 100_000),         # top unallocated there, served by mid
    ("c4k-chain3-short-base", 50_000),          # served by the top
    ("c64k-extl2", 64 * K + 100),
])
def test_map_lookup_prints_table_entries(images, image_id, offset):
    image = images.get(image_id)
    proc = run("map", "--lookup", offset, image.path)
    out = proc.stdout.decode()
    assert proc.returncode == 0, err_text(proc)
    l1_lines = [(int(d), int(i), int(e, 16)) for d, i, e in _L1_LINE.findall(out)]
    l2_lines = [(int(i), int(e, 16)) for i, e in _L2_LINE.findall(out)]
    assert l1_lines, out
    for depth, l1_index, l1_entry in l1_lines:
        want = _entries(image.chain[depth].path, offset)
        assert (l1_index, l1_entry) == want[:2], (depth, out)
        if want[2] is not None:
            assert (want[2], want[3]) in l2_lines, (depth, want, out)
    # The serving layer's host offset is the one qemu-img map reports.
    entry = next(e for e in qemu_map(image.path) if e["start"] <= offset < e["start"] + e["length"])
    assert entry["data"] and "offset" in entry, entry
    host = int(_HOST.findall(out)[-1], 16)
    assert host == entry["offset"] + offset - entry["start"], out
    assert f"served by depth {entry['depth']}" in out


def test_map_lookup_size_suffix(images):
    image = images.get("c64k-v3")
    a = run("map", "--lookup", "1M", image.path)
    b = run("map", "--lookup", str(M), image.path)
    c = run("map", "--lookup", "0x100000", image.path)
    assert a.returncode == 0 and a.stdout == b.stdout == c.stdout and a.stdout


# ---------------------------------------------------------------------------------------------
# help and version


@pytest.mark.parametrize("command, options", [
    ("convert", ["-f", "-O", "-c", "-o", "-n", "--target-is-zero", "-U", "-t", "-T", "-m",
                 "--threads", "-W", "-S", "-l", "-p", "-q", "--no-clobber",
                 "--overwrite", "--fsync", "--max-stream-size", "--allow-backing-dir", "SRC",
                 "DST"]),
    ("map", ["--output", "--lookup", "--allow-backing-dir", "IMG"]),
])
def test_subcommand_help(command, options):
    proc = run(command, "--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert out.startswith(f"usage: qcowfast {command}")
    for opt in options:
        assert opt in out, f"{command} --help does not mention {opt}"


def test_top_level_help_and_usage():
    proc = run("--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert "convert" in out and "map" in out and "--version" in out
    proc = run()                                        # qemu-img's two lines
    assert proc.returncode == 1 and err_text(proc) == (
        "qcowfast: Not enough arguments\nTry 'qcowfast --help' for more information\n")
    proc = run("frobnicate")
    assert proc.returncode == 1 and "Traceback" not in err_text(proc)


def test_version():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"qcowfast {qcowfast.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", qcowfast.__version__)


def test_version_under_the_name_qemu_img(tmp_path, small_qcow2):
    """Run through a symlink named qemu-img, --version (and -V) starts as qemu-img's, with the
    version qcowfast follows: cinder matches r"qemu-img version ([0-9.]*)" at the start and
    takes a qemu-img it cannot date for none. The commands answer as under their own name."""
    link = tmp_path / "qemu-img"
    link.symlink_to(Path(sys.executable).with_name("qcowfast"))
    version = re.compile(r"qemu-img version ([0-9.]*)")
    for flag in ("--version", "-V"):
        got = subprocess.run([link, flag], capture_output=True, text=True, check=True).stdout
        want = subprocess.run(["qemu-img", flag], capture_output=True, text=True,
                              check=True).stdout
        ours, theirs = version.match(got), version.match(want)
        assert ours and theirs, got
        assert ours.group(1).split(".")[:2] == theirs.group(1).split(".")[:2], (got, want)
        assert f"(qcowfast {qcowfast.__version__})" in got.splitlines()[0]
    got = subprocess.run([link, "info", "--output=json", small_qcow2], capture_output=True,
                         check=True)
    want = subprocess.run(["qemu-img", "info", "--output=json", small_qcow2],
                          capture_output=True, check=True)
    assert (got.stdout, got.stderr) == (want.stdout, want.stderr)
    assert run("--version").stdout.decode() == f"qcowfast {qcowfast.__version__}\n"


def test_console_script_entry_point():
    """The installed ``qcowfast`` script (beside this interpreter: the venv's bin/, which
    need not be on PATH) is the same program."""
    exe = Path(sys.executable).with_name("qcowfast")
    assert exe.exists(), f"the qcowfast console script is not installed beside {sys.executable}"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == f"qcowfast {qcowfast.__version__}\n"


# ---------------------------------------------------------------------------------------------
# qemu-img's convert grammar: the same command line through both tools


@pytest.fixture(scope="module")
def small_qcow2(tmp_path_factory):
    """1 MiB qcow2 with data, a zero run and holes; written by qemu-io."""
    path = tmp_path_factory.mktemp("grammar") / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, M)
    qemu_io(path, "write -P 0x5a 0 64k", "write -z 128k 64k", "write -P 0x33 700k 12k")
    qemu_img("snapshot", "-c", "snap1", path)
    qemu_io(path, "write -P 0x77 0 4k")
    return path


PARITY = [
    # accepted by both (several options per line: each command line costs two processes)
    ["-f", "qcow2", "-O", "raw", "-m", "16", "-W", "-U", "-T", "none", "-q"],
    ["-t", "unsafe", "-T", "writethrough", "-p", "-S", "64k"],
    ["-t", "writethrough", "-S", "0x1000"], ["-t", "none", "-S", "1.5k"],
    ["-t", "directsync", "-m", "1", "-S", "0"], ["-t", "writeback", "-S", "16M"],
    ["-l", "snapshot.name=snap1"], ["-l", "snapshot.id=1"], ["-l", "snap1"],
    ["-f", "raw", "-O", "qcow2"], ["--object", "secret,id=s0,data=x", "-T", "none"],
    ["-O", "qcow2", "-o", "compat=1.1,lazy_refcounts=off,refcount_bits=16,preallocation=off",
     "-o", "extended_l2=off,cluster_size=64k"], ["-O", "raw", "-o", "preallocation=off"],
    # a key given twice: the last value counts (the first alone would be refused)
    ["-O", "qcow2", "-o", "lazy_refcounts=on,lazy_refcounts=off", "-o", "compat=0.10",
     "-o", "compat=1.1", "-o", "cluster_size=4k,cluster_size=8k"],
    # qemu_strtosz's grammar (leading blanks and '+', '1.k'); keys qcowfast writes as asked
    ["-O", "qcow2", "-o", "cluster_size=+4096,size=16M,nocow=off,data_file_raw=off"],
    ["-O", "qcow2", "-o", "cluster_size= 1.k"], ["-O", "raw", "-o", "nocow=off,size=1M"],
    ["-S", "+4k"],
    # nocow (chattr +C on btrfs; ignored elsewhere by both); QEMU's short-form booleans:
    # "key" is key=on, "nokey" key=off
    ["-O", "qcow2", "-o", "nocow=on"], ["-O", "raw", "-o", "nocow=on,nocow=off"],
    ["-O", "qcow2", "-o", "nolazy_refcounts,nonocow,noextended_l2"], ["-O", "raw", "-o", "nonocow"],
    ["-O", "qcow2", "-o", "encryption=off"], ["-O", "qcow2", "-o", "noencryption"],
    # refused by both ("nocow" alone is "cow=off", an unknown key)
    ["-O", "raw", "-o", "nocow"], ["-O", "qcow2", "-o", "encryption=bogus"],
    ["-O", "qcow2", "-o", "encryption=no"], ["-O", "qcow2", "-o", "encryption=off,encryption=n"],
    ["-O", "qcow2", "-o", "size"], ["-O", "qcow2", "-o", "nocow=maybe"],
    ["-l", "snapshot.name=nosuch"], ["-S", "17M"], ["-S", "1000"], ["-S", "4b"], ["-S", "1.5"],
    ["-m", "0"], ["-m", "17"], ["-t", "bogus"], ["-T", "bogus"], ["-o", "foo=bar"], ["-c"],
    ["-o", "compression_type=zstd"], ["--target-is-zero"], ["-f", "vmdk"],
    ["-O", "qcow2", "-o", "compat=1.1,bogus=1"], ["-n", "-O", "qcow2", "-o", "compat=1.1"],
    ["-O", "qcow2", "-o", "refcount_bits=17"],
    # refcount_bits is a number to QEMU (strtoull, base 0): hex, octal, '+', leading blanks
    ["-O", "qcow2", "-o", "refcount_bits=0x10,refcount_bits=020"],
    ["-O", "qcow2", "-o", "refcount_bits=+16", "-o", "refcount_bits= 16"],
    ["-O", "qcow2", "-o", "refcount_bits=00016"], ["-O", "qcow2", "-o", "refcount_bits=16 "],
    ["-O", "qcow2", "-o", "refcount_bits=16k"], ["-O", "qcow2", "-o", "refcount_bits=-16"],
    ["-O", "qcow2", "-o", "refcount_bits="], ["-O", "qcow2", "-o", "refcount_bits=x,refcount_bits=16"],
    # option lists qemu-img cannot join (is_valid_option_list): empty, a leading comma, an
    # odd number of trailing commas; an even number escapes a comma into the value
    ["-O", "qcow2", "-o", ""], ["-O", "qcow2", "-o", ","], ["-O", "raw", "-o", ""],
    ["-O", "qcow2", "-o", "cluster_size=4k,"], ["-O", "qcow2", "-o", ",cluster_size=4k"],
    ["-O", "qcow2", "-o", "cluster_size=4k,,"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "lazy_refcounts=off,,,"],
    # every value is checked, even one a later value replaces; no key, no trailing blank
    ["-O", "qcow2", "-o", "lazy_refcounts=bogus,lazy_refcounts=off"],
    ["-O", "qcow2", "-o", "cluster_size=bogus", "-o", "cluster_size=4096"],
    ["-O", "qcow2", "-o", "=4096"], ["-O", "qcow2", "-o", "cluster_size=4096 "],
    ["-O", "qcow2", "-o", "size=bogus"], ["-S", "4k "],
]


@pytest.mark.parametrize("options", PARITY, ids=[" ".join(o) for o in PARITY])
def test_convert_grammar_matches_qemu_img(small_qcow2, tmp_path, capsys, options):
    """Same options, same source: qemu-img and qcowfast agree on success (then on the bytes
    written) or on failure (exit 1, one line or a usage message, no output left behind)."""
    want_dir, got_dir = tmp_path / "qemu", tmp_path / "qcowfast"
    want_dir.mkdir()
    got_dir.mkdir()
    want = subprocess.run(["qemu-img", "convert", *options, small_qcow2, want_dir / "out"],
                          capture_output=True, check=False)
    status, _, err = cli(capsys, "convert", *options, small_qcow2, got_dir / "out")
    assert (status == 0) == (want.returncode == 0), (status, err, want)
    if want.returncode:
        assert status == 1, err
        assert os.listdir(got_dir) == []
        assert err.startswith(("qcowfast: ", "usage: qcowfast convert")), err
        return
    out = got_dir / "out"
    if "qcow2" in options:
        compare = subprocess.run(["qemu-img", "compare", want_dir / "out", out],
                                 capture_output=True, text=True, check=False)
        assert compare.returncode == 0, compare.stdout + compare.stderr
    else:
        assert_same_bytes(out.read_bytes(), (want_dir / "out").read_bytes(), " ".join(options))
    if "-S" in options and options[options.index("-S") + 1] == "0":
        assert out.stat().st_blocks * 512 >= out.stat().st_size         # fully allocated


def test_convert_options_after_operands(small_qcow2, tmp_path):
    """GNU getopt (qemu-img) takes options after the file names too."""
    dst = tmp_path / "out.raw"
    proc = run("convert", small_qcow2, "-O", "raw", dst, "-S", "0", "-q")
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(dst.read_bytes(), reference_raw(small_qcow2), "options after operands")
    assert dst.stat().st_blocks * 512 >= M


@pytest.mark.parametrize("options, named", [
    # (-B without -F, -F with raw output: qemu-img refuses them itself, in its words)
    (["-B", "base.qcow2", "-F", "qcow2", "-O", "qcow2"], "-B"),
    (["--image-opts"], "--image-opts"),
    (["-n", "--target-image-opts"], "--target-image-opts"),
    (["-r", "1M"], "-r"), (["-C"], "-C"), (["--salvage"], "--salvage"),
    (["-o", "preallocation=full", "-O", "qcow2"], "preallocation"),
    (["-o", "compat=0.10", "-O", "qcow2"], "compat"),
    (["-o", "lazy_refcounts=on", "-O", "qcow2"], "lazy_refcounts"),
    (["-o", "lazy_refcounts", "-O", "qcow2"], "lazy_refcounts=on"),     # the short form
    (["-o", "extended_l2=on", "-O", "qcow2"], "extended_l2"),
    (["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "-O", "qcow2"], "backing_file"),
    (["-o", "data_file=d.raw", "-O", "qcow2"], "data_file"),
    # (encryption qemu-img would write: its key's secret defined)
    (["--object", "secret,id=s0,data=x", "-o", "encrypt.format=luks,encrypt.key-secret=s0",
      "-O", "qcow2"], "encrypt."),
    (["--object", "secret,id=s0,data=x", "-o", "encryption=on,encrypt.key-secret=s0",
      "-O", "qcow2"], "encrypt"),
])
def test_convert_refuses_by_name(small_qcow2, tmp_path, capsys, options, named):
    line = assert_one_line(*cli(capsys, "convert", *options, small_qcow2, tmp_path / "out"),
                           contains=named)
    assert line.startswith("qcowfast: convert: "), line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("options", [
    ["-o", "cluster_size=3k", "-O", "qcow2"], ["-o", "cluster_size=4M", "-O", "qcow2"],
    ["-o", "compression_type=lzma", "-O", "qcow2"], ["-o", "cluster_size=64k", "-O", "raw"],
    ["-n", "-o", "cluster_size=64k", "-O", "qcow2"],
    # encryption qemu-img cannot set up either: no key, no such secret, no format
    ["-o", "encrypt.format=luks", "-O", "qcow2"], ["-o", "encryption=on", "-O", "qcow2"],
    ["-o", "encrypt.format=aes,encrypt.key-secret=s0", "-O", "qcow2"],
    ["-o", "encrypt.key-secret=s0", "-O", "qcow2"], ["-o", "encrypt.format=x", "-O", "qcow2"],
    ["--object", "secret,id=s1,data=x", "-o", "encrypt.format=luks,encrypt.key-secret=s0",
     "-O", "qcow2"],
])
def test_convert_option_values_fail_as_qemu_img(small_qcow2, tmp_path, capsys, options):
    """Values qemu-img refuses too: its line, word for word (tests/test_cli_wording.py has
    more)."""
    assert_fails_as_qemu_img(capsys, ["convert", *options, small_qcow2, tmp_path / "out"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["-O", "qcow2", "-o", "help"], ["-o", "?"],
                                  ["-O", "qcow2", "-o", "help", "SRC", "DST"]])
def test_convert_options_help(small_qcow2, tmp_path, argv):
    """`-o help` lists the options (with or without file names) and exits 0, as qemu-img."""
    argv = [small_qcow2 if a == "SRC" else tmp_path / "out" if a == "DST" else a for a in argv]
    proc = run("convert", *argv)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and out.startswith("Supported "), err_text(proc)
    assert "preallocation=off" in out
    assert ("cluster_size=" in out) == ("qcow2" in argv)
    assert os.listdir(tmp_path) == []
    qemu = subprocess.run(["qemu-img", "convert", *map(str, argv)], capture_output=True)
    assert qemu.returncode == 0
    assert out.split("\n")[0] == qemu.stdout.decode().split("\n")[0]    # "Supported F options:"


@pytest.mark.parametrize("argv", [["-O"], ["-o"], ["SRC", "DST", "-O"], ["-pO"], ["-c", "-o"]])
def test_convert_option_without_its_value(small_qcow2, tmp_path, argv):
    """-O or -o without a value is a usage error (exit 1, as qemu-img's "missing argument for
    option"), not the -o help scanner's own argparse failure (exit 2)."""
    argv = [small_qcow2 if a == "SRC" else tmp_path / "out" if a == "DST" else a for a in argv]
    proc = run("convert", *argv)
    qemu = subprocess.run(["qemu-img", "convert", *map(str, argv)], capture_output=True)
    assert (proc.returncode, qemu.returncode) == (1, 1), err_text(proc)
    assert err_text(proc) == qemu.stderr.decode().replace("qemu-img", "qcowfast")
    assert "missing argument for option" in err_text(proc)
    assert os.listdir(tmp_path) == []


def test_convert_without_file_names_is_a_usage_error(small_qcow2):
    for argv in ([], [small_qcow2], ["-o", "cluster_size=4k", small_qcow2]):
        proc = run("convert", *argv)
        qemu = subprocess.run(["qemu-img", "convert", *argv], capture_output=True)
        assert (proc.returncode, err_text(proc)) == (
            1, qemu.stderr.decode().replace("qemu-img", "qcowfast"))


def test_convert_refuses_by_name_in_a_process(small_qcow2, tmp_path):
    assert_one_line_error(run("convert", "--image-opts", small_qcow2, tmp_path / "out.raw"),
                          contains="--image-opts")
    assert_one_line_error(run("convert", small_qcow2, small_qcow2, tmp_path / "out.raw"),
                          contains="multiple source images")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode, flushes", [
    # bdrv_close() flushes the output except under cache=unsafe (BDRV_O_NO_FLUSH), which is
    # qemu-img convert's default: strace shows one fsync for each explicit mode but unsafe.
    (None, False), ("unsafe", False), ("writeback", True), ("none", True), ("off", True),
    ("writethrough", True), ("directsync", True)])
def test_t_flushes_as_qemu_img_closes_the_file(small_qcow2, tmp_path, capsys, monkeypatch,
                                               mode, flushes):
    """An explicit -t writeback or -t none (nova, cinder, vdsm, CDI pass them) did not flush
    the output: qcowfast returned before the data was durable, where qemu-img flushes."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["convert", "-O", "raw", small_qcow2, tmp_path / "out.raw"]
    status, _, err = cli(capsys, *argv[:1], *(["-t", mode] if mode else []), *argv[1:])
    assert status == 0, err
    assert bool(calls) == flushes, calls
    assert_same_bytes((tmp_path / "out.raw").read_bytes(), reference_raw(small_qcow2), mode)


def test_t_is_the_cache_mode(small_qcow2, tmp_path, capsys):
    """-t means cache mode as in qemu-img (threads are -m or --threads)."""
    status, _, err = cli(capsys, "convert", "-t", "4", small_qcow2, tmp_path / "out.raw")
    assert (status, err) == (1, "qcowfast: Invalid cache option: 4\n")
    status, _, err = cli(capsys, "convert", "--summary", "-m", "3", small_qcow2,
                         tmp_path / "out.raw")
    assert status == 0 and "3 threads" in err, err
    status, _, err = cli(capsys, "convert", "--summary", "-m", "3", "--threads", "2",
                         small_qcow2, tmp_path / "out.raw")
    assert status == 0 and "2 threads" in err, err


def _filled(path: Path, size: int, byte: int) -> None:
    path.write_bytes(bytes([byte]) * size)


@pytest.mark.parametrize("options", [["-n"], ["-n", "--target-is-zero"], ["-n", "-S", "0"]])
def test_n_writes_into_existing_target_like_qemu_img(small_qcow2, tmp_path, options):
    """-n writes in place: zeros of the source overwrite the old contents, except with
    --target-is-zero, which trusts the target to read as zeros (qemu-img leaves it alone)."""
    want, got = tmp_path / "want.raw", tmp_path / "got.raw"
    _filled(want, M, 0xEE)
    _filled(got, M, 0xEE)
    ino = got.stat().st_ino
    qemu_img("convert", *options, "-O", "raw", small_qcow2, want)
    proc = run("convert", *options, "-O", "raw", small_qcow2, got)
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(got.read_bytes(), want.read_bytes(), " ".join(options))
    assert got.stat().st_ino == ino                                      # in place
    assert leftovers(tmp_path) == []


def test_n_needs_an_existing_target(small_qcow2, tmp_path):
    want = subprocess.run(["qemu-img", "convert", "-n", "-O", "raw", small_qcow2,
                           tmp_path / "missing.raw"], capture_output=True, check=False)
    assert want.returncode == 1
    line = assert_one_line_error(run("convert", "-n", small_qcow2, tmp_path / "missing.raw"))
    assert line == want.stderr.decode().strip().replace("qemu-img: ", "qcowfast: ", 1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("options, compression, cluster", [
    (["-O", "qcow2"], None, 65536),
    (["-O", "qcow2", "-c"], "zlib", 65536),
    (["-O", "qcow2", "-c", "-o", "compression_type=zstd"], "zstd", 65536),
    (["-O", "qcow2", "-o", "cluster_size=4k,compression_type=zlib", "-c"], "zlib", 4096),
    (["-O", "qcow2", "-o", "cluster_size=4k", "-o", "compression_type=zstd", "-c"], "zstd", 4096),
])
def test_qcow2_output_options(small_qcow2, tmp_path, options, compression, cluster):
    """-O qcow2 / -c / -o reach the writer: qemu-img reads the result as the same guest data
    with the cluster size and compression type asked for, and finds it clean."""
    dst = tmp_path / "out.qcow2"
    proc = run("convert", *options, small_qcow2, dst)
    assert proc.returncode == 0, err_text(proc)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", small_qcow2, dst)
    check = json.loads(qemu_img("check", "--output=json", dst).stdout)
    info = json.loads(qemu_img("info", "--output=json", dst).stdout)
    assert info["cluster-size"] == cluster
    assert info["format-specific"]["data"].get("compression-type", "zlib") == (compression or
                                                                               "zlib")
    assert bool(check.get("compressed-clusters")) == (compression is not None), check


# ---------------------------------------------------------------------------------------------
# images in use (-U), check -f, usage errors of every subcommand


@pytest.fixture
def held_open(tmp_path):
    """A copy of a small image held open for writing by a qemu-io process (QEMU's locks)."""
    path = tmp_path / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, M)
    qemu_io(path, "write -P 0x42 0 64k")
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Until qemu-io holds the lock. Ask with F_OFD_GETLK, which takes no lock: a polling
        # `qemu-img info` would hold a shared lock for a moment and make qemu-io's open fail.
        from qcowfast.locks import write_locked
        deadline = time.monotonic() + 120
        fd = os.open(path, os.O_RDONLY)
        try:
            while not write_locked(fd):
                assert proc.poll() is None, f"qemu-io ended early: {proc.stdout.read()!r}"
                assert time.monotonic() < deadline, "qemu-io never locked the image"
                time.sleep(0.05)
        finally:
            os.close(fd)
        while not subprocess.run(["qemu-img", "info", path], capture_output=True).returncode:
            assert proc.poll() is None, f"qemu-io ended early: {proc.stdout.read()!r}"
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.05)
        yield path
    finally:
        if proc.poll() is None:
            proc.communicate(b"quit\n", timeout=30)


@pytest.mark.parametrize("command", [["info"], ["compare", "COPY"], ["convert", "OUT"]])
def test_force_share(held_open, tmp_path, command):
    """Without -U qcowfast refuses an image QEMU holds for writing with qemu-img's two lines
    and exit status; with -U both read it."""
    copy = tmp_path / "copy.raw"
    qemu_img("convert", "-U", "-O", "raw", held_open, copy)
    name, *rest = command
    extra = [copy if a == "COPY" else tmp_path / "out.raw" if a == "OUT" else a for a in rest]
    want = subprocess.run(["qemu-img", name, held_open, *extra], capture_output=True)
    got = run(name, held_open, *extra)
    assert want.returncode != 0 and got.returncode == want.returncode, (got, want)
    assert err_text(got) == want.stderr.decode().replace("qemu-img: ", "qcowfast: ", 1)
    assert f"Is another process using the image [{held_open}]?" in err_text(got)
    got = run(name, "-U", held_open, *extra)
    want = subprocess.run(["qemu-img", name, "-U", held_open, *extra], capture_output=True)
    assert got.returncode == want.returncode == 0, err_text(got)
    if name == "convert":
        assert (tmp_path / "out.raw").read_bytes() == copy.read_bytes()


@pytest.mark.parametrize("options", [["-f", "qcow2"], ["-f", "raw"], [], ["-U"]])
@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_check_format_option_like_qemu_img(small_qcow2, tmp_path, capsys, options, kind):
    if kind == "raw":
        path = tmp_path / "plain.raw"
        path.write_bytes(b"\x01" * 65536)
    else:
        path = small_qcow2
    want = subprocess.run(["qemu-img", "check", *options, path], capture_output=True)
    status, _, err = cli(capsys, "check", *options, path)
    assert status == want.returncode, (err, want.stderr)


@pytest.mark.parametrize("argv", [
    ["convert", "only-one"], ["convert", "--bogus", "a", "b"], ["info"], ["info", "a", "b"],
    ["map"], ["check", "--output=yaml", "x"], ["compare", "a"],
])
def test_usage_errors_exit_1_like_qemu_img(argv, capsys):
    want = subprocess.run(["qemu-img", *argv], capture_output=True)
    assert want.returncode == 1, want
    status, out, err = cli(capsys, *argv)
    assert status == 1, err
    assert err == want.stderr.decode().replace("qemu-img", "qcowfast")
    assert out == ""


# ---------------------------------------------------------------------------------------------
# terminals and pipes


def test_summary_only_for_a_terminal(images, tmp_path):
    """convert ends with its summary line on a terminal; on a pipe or a file it says nothing on
    success, as qemu-img (tools such as glance's image conversion fail on any standard-error
    text); --summary prints it anyway, and -q wins over both."""
    image = images.get("c64k-v3-zstd")
    ref = subprocess.run(["qemu-img", "convert", "-O", "raw", image.path, tmp_path / "ref.raw"],
                         capture_output=True, check=True)
    proc = run("convert", image.path, tmp_path / "a.raw")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, ref.stdout, ref.stderr) == \
        (0, b"", b"")
    proc, seen = _run_on_pty(["convert", image.path, tmp_path / "b.raw"], columns=80,
                             stream="stderr")
    assert proc.returncode == 0 and re.fullmatch(
        rb"qcowfast: converted \S+ -> \S+: 4\.00 MiB virtual, .+ written, .+ left sparse, "
        rb".+ threads\)\r?\n", seen), seen
    proc = run("convert", "--summary", image.path, tmp_path / "c.raw")
    assert proc.returncode == 0 and proc.stderr.startswith(b"qcowfast: converted ") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr
    proc, seen = _run_on_pty(["convert", "-q", "--summary", image.path, tmp_path / "d.raw"],
                             columns=80, stream="stderr")
    assert proc.returncode == 0 and seen == b""
    for name in "abcd":
        assert (tmp_path / f"{name}.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes()


def _run_on_pty(argv, *, columns: int, stream: str):
    """Run `python -m qcowfast ARGV` with `stream` (stdout or stderr) on a pseudo-terminal of
    `columns` columns; returns (process, bytes the terminal received)."""
    import fcntl
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    received = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        kw = {stream: slave}
        other = "stderr" if stream == "stdout" else "stdout"
        kw[other] = subprocess.PIPE
        proc = subprocess.run([sys.executable, "-m", "qcowfast", *map(str, argv)], timeout=120,
                              check=False, **kw)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return proc, bytes(received)


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_progress_fits_the_terminal(images, tmp_path, columns):
    """convert-many's bar (qcowfast's own command: convert -p prints qemu-img's report)."""
    image = images.get("c2m-chain3-mixed-clusters")
    proc, text = _run_on_pty(["convert-many", "-p", "-q", "--target-dir", tmp_path,
                              image.path], columns=columns, stream="stderr")
    assert proc.returncode == 0, text
    drawn = text.decode().replace("\r\n", "\n").split("\n")[0].split("\r")
    frames = [f for f in drawn if f]
    assert frames and "100.0%" in frames[-1], text
    assert all(len(f) < columns for f in frames), [len(f) for f in frames]
    assert text.count(b"\n") == 1                  # redrawn in place, one line feed at the end


def test_refuses_binary_to_a_terminal(images, tmp_path):
    image = images.get("c4k-v3")
    proc, text = _run_on_pty(["convert", image.path, "-"], columns=80, stream="stdout")
    assert text == b""
    proc.stdout = b""                               # stdout was the terminal: nothing arrived
    assert_one_line_error(proc, contains="terminal")


@pytest.mark.parametrize("argv", [["convert", "IMG", "-"], ["map", "--output=json", "IMG"]])
def test_closed_pipe_ends_quietly(tmp_path, argv):
    """`qcowfast ... | head -c 100`: no traceback, no "Exception ignored"; map exits 0 as
    qemu-img (which ignores SIGPIPE and the failed writes) exits for `qemu-img map | head -c
    1`. An image streamed by convert was not delivered whole: one line, exit 1."""
    raw = tmp_path / "striped.raw"                 # 4 KiB of data every 8 KiB: 2048 extents
    with open(raw, "wb") as f:
        for i in range(2048):
            f.seek(i * 8192)
            f.write(bytes([i % 255 + 1]) * 4096)
    image = tmp_path / "striped.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4k", raw, image)
    argv = [image if a == "IMG" else a for a in argv]
    if argv[0] == "map":
        shell = f"qemu-img map --output=json {image} | head -c 1 >/dev/null; " \
                "echo ${PIPESTATUS[0]}"
        status = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
        assert status.stdout.strip() == "0", status
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert len(head) == 100
    if argv[0] == "convert":
        assert proc.wait(timeout=120) == 1, err
        assert err.startswith("qcowfast: -: the reader closed it after ") and \
            err.endswith(" bytes were written into it; the image was not delivered whole\n") and \
            len(err.splitlines()) == 1, err
        return
    assert proc.wait(timeout=120) == 0, err
    assert err == "", err


def test_fifo_reader_leaving_early_fails_the_conversion(tmp_path, images):
    """A named pipe whose reader leaves part-way: convert fails (one line, exit 1), as the
    image did not arrive whole; a reader taking it all gets qemu-img's bytes and status 0."""
    image = images.get("c64k-v3")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for limit in (100, None):
        got = []

        def read_it():
            with open(fifo, "rb") as f:
                got.append(f.read(limit) if limit else f.read())
        t = threading.Thread(target=read_it)
        t.start()
        proc = subprocess.run([sys.executable, "-m", "qcowfast", "convert", "-q", image.path,
                               fifo], capture_output=True, text=True, timeout=120)
        t.join(60)
        if limit:
            assert proc.returncode == 1 and "not delivered whole" in proc.stderr, proc
            assert len(proc.stderr.splitlines()) == 1
        else:
            assert (proc.returncode, proc.stderr) == (0, ""), proc
            assert got[0] == reference_raw(image.path)


# ---------------------------------------------------------------------------------------------
# error messages name what the user named


def test_errors_name_the_destination_never_the_temporary_file(images, tmp_path):
    import resource
    image = images.get("c64k-v3")
    dst = tmp_path / "out.raw"

    def small_files():                           # writes past 64 KiB fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "qcowfast", "convert", "-S", "0", image.path,
                           dst], capture_output=True, preexec_fn=small_files, check=False)
    line = assert_one_line_error(proc)
    assert str(dst) in line and ".qcowfast-tmp" not in line, line
    assert os.listdir(tmp_path) == []
    missing_dir = tmp_path / "no" / "such" / "out.raw"
    line = assert_one_line_error(run("convert", image.path, missing_dir))
    assert str(missing_dir) in line and ".qcowfast-tmp" not in line, line


# ---------------------------------------------------------------------------------------------
# the Python API's surface


def test_compare_result_truth(small_qcow2, tmp_path):
    other = tmp_path / "other.raw"
    qemu_img("convert", "-O", "raw", small_qcow2, other)
    same = qcowfast.compare(small_qcow2, other)
    assert same.identical and bool(same)
    with open(other, "r+b") as f:
        f.seek(700 * K)
        f.write(b"x")
    differ = qcowfast.compare(small_qcow2, other)
    assert not differ.identical and not bool(differ)
    assert subprocess.run(["qemu-img", "compare", small_qcow2, other],
                          capture_output=True).returncode == 1


def test_public_names():
    import qcowfast.errors
    import qcowfast.info
    assert callable(qcowfast.info) and qcowfast.info.__module__ == "qcowfast.info"
    assert issubclass(qcowfast.NotChecked, qcowfast.QcowError)
    errors = {n for n, v in vars(qcowfast.errors).items()
              if isinstance(v, type) and issubclass(v, qcowfast.QcowError)}
    assert errors <= set(qcowfast.__all__), errors - set(qcowfast.__all__)
    assert set(qcowfast.__all__) <= set(dir(qcowfast))
    for name in qcowfast.__all__:
        # serve comes from the NBD server's module, written in parallel with this one.
        if name != "serve" or importlib.util.find_spec("qcowfast.serve"):
            assert getattr(qcowfast, name) is not None, name
    with pytest.raises(AttributeError):
        qcowfast.no_such_name


@pytest.mark.parametrize("code", [
    "import qcowfast",
    "import sys; sys.argv = ['qcowfast', '--version']; from qcowfast.cli import main; main()",
    "import qcowfast, qcowfast.errors; qcowfast.QcowError",
])
def test_light_imports(code):
    """`import qcowfast` and `qcowfast --version` load neither numpy nor the kernels."""
    probe = (f"{code}\nimport sys\nheavy = sorted(m for m in sys.modules if m == 'numpy' or "
             "m.startswith('qcowfast._'))\nprint(heavy, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr


def test_command_exit_skips_teardown_only_when_nothing_is_left():
    """run() (the installed command and `python -m qcowfast`) passes main()'s status on and,
    with no other thread alive, exits without the interpreter's tear-down (atexit handlers do
    not run); a thread still running takes the ordinary exit, which waits for it."""
    base = ("import atexit, sys, threading, time\nimport qcowfast.cli as c\n"
            "atexit.register(print, 'teardown', flush=True)\n"
            "print('partial line', end='')\n")
    quick = subprocess.run([sys.executable, "-c", base + "c.main = lambda: 3\nc.run()"],
                           capture_output=True, text=True)
    assert quick.returncode == 3, quick.stderr
    assert quick.stdout == "partial line", quick.stdout     # flushed; no tear-down ran
    waits = subprocess.run([sys.executable, "-c", base + (
        "def late():\n    time.sleep(0.2)\n    print(' late', end='', flush=True)\n"
        "c.main = lambda: (threading.Thread(target=late).start(), 0)[1]\nc.run()")],
        capture_output=True, text=True)
    assert waits.returncode == 0, waits.stderr
    assert waits.stdout == "partial line lateteardown\n", waits.stdout


def test_compression_level_trades_size_for_speed(tmp_path):
    """--compression-level reaches the writer: another level writes other streams that
    qemu-img reads as the same guest data, the default is level 6; without -c it is refused."""
    import random
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(5000)]
    raw = tmp_path / "text.raw"
    raw.write_bytes(b" ".join(rng.choices(words, k=1_200_000))[:8 << 20])
    outs = {}
    for level in (None, 2, 6):
        out = tmp_path / f"l{level}.qcow2"
        extra = [] if level is None else ["--compression-level", str(level)]
        r = run_cli("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", *extra, raw, out)
        assert r.returncode == 0, r.stderr
        qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, out)
        outs[level] = out.read_bytes()
    assert outs[None] == outs[6] != outs[2]
    r = run_cli("convert", "-q", "-f", "raw", "-O", "qcow2", "--compression-level", "2", raw,
                tmp_path / "x.qcow2")
    assert r.returncode == 1 and "--compression-level needs -c" in r.stderr


# ---------------------------------------------------------------------------------------------
# progress reports and signals never change the outcome (found by red-teaming)


def _shell(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def differing(tmp_path_factory):
    """(image, its raw bytes as a file, a raw file differing in one byte, a corrupt copy)."""
    d = tmp_path_factory.mktemp("outcome")
    img = d / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x3c 0 8M", "write -P 0x4d 32M 1M")
    same = d / "same.raw"
    qemu_img("convert", "-O", "raw", img, same)
    diff = d / "diff.raw"
    data = bytearray(same.read_bytes())
    data[60_000_000] ^= 1
    diff.write_bytes(bytes(data))
    bad = d / "bad.qcow2"
    bad.write_bytes(img.read_bytes())
    with qcowfast.open(bad) as image:
        l2 = int(image._l2_offsets[0])
    with open(bad, "r+b") as f:                     # an unaligned data cluster: corruption
        f.seek(l2)
        entry, = struct.unpack(">Q", f.read(8))
        f.seek(l2)
        f.write(struct.pack(">Q", entry | 0x200))
    return img, same, diff, bad


def test_unwritable_progress_or_verdict_keeps_the_status(differing, tmp_path):
    """A progress report or verdict nobody reads (a closed pipe, a full disk) is dropped, as
    qemu-img drops it: the job still completes and the status is still the verdict."""
    img, same, diff, bad = differing
    py = f"'{sys.executable}' -m qcowfast"
    out = tmp_path / "o.raw"
    for script, status in [
            (f"{py} convert -q -p {img} {out} >/dev/full", 0),
            (f"{py} convert -q -p {img} {out} | (sleep 0.2; head -c1 >/dev/null)", 0),
            (f"{py} compare -p {img} {same} >/dev/full", 0),
            (f"{py} compare -p {img} {diff} | (sleep 0.2; head -c1 >/dev/null)", 1),
            (f"{py} compare {img} {diff} | true", 1),
            (f"{py} check {bad} 2>&1 | true", 2)]:
        out.unlink(missing_ok=True)
        proc = _shell(script + "; echo ${PIPESTATUS[0]} >&2")
        assert proc.stderr.split()[-1] == str(status).encode(), (script, proc.stderr)
        if "convert" in script:
            assert out.read_bytes() == same.read_bytes()
    qemu = _shell(f"qemu-img compare {img} {diff} | true; echo ${{PIPESTATUS[0]}} >&2")
    assert qemu.stderr.split()[-1] == b"1"


def test_quiet_wins_over_progress_and_open_errors_print_only_the_newline(differing, tmp_path):
    img, same, _, _ = differing
    for tool in (["qemu-img"], [sys.executable, "-m", "qcowfast"]):
        for argv in (["convert", "-q", "-p", img, tmp_path / "q.raw"],
                     ["compare", "-p", "-q", img, same]):
            proc = subprocess.run([*tool, *map(str, argv)], capture_output=True, timeout=120)
            assert proc.returncode == 0 and proc.stdout == b"", (tool, argv, proc.stdout)
        proc = subprocess.run([*tool, "compare", "-p", str(img), str(tmp_path / "missing")],
                              capture_output=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == b"\n", (tool, proc.stdout)


def _wait_for_handler(proc, signum) -> None:
    """Wait until `proc` catches `signum` (/proc/PID/status SigCgt), or has ended: before
    that, the signal's default action (ending the process) is no bug of the command."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                caught = int(next(ln for ln in f if ln.startswith("SigCgt:")).split()[1], 16)
        except (OSError, StopIteration):
            return
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("argv", [["convert", "IMG", "OUT"], ["compare", "IMG", "IMG"],
                                  ["check", "IMG"], ["map", "IMG"], ["info", "IMG"]])
def test_sigusr1_never_ends_a_command(differing, tmp_path, argv):
    """SIGUSR1, sent every half millisecond for the whole run: qemu-img reports progress or
    ignores it, and never ends on it; neither does qcowfast (it used to, once a job was done,
    in map and info at any time, and when the report could not be written)."""
    img = differing[0]
    argv = [str(img) if a == "IMG" else str(tmp_path / "o.raw") if a == "OUT" else a
            for a in argv]
    want = subprocess.run([sys.executable, "-m", "qcowfast", *argv], capture_output=True,
                          timeout=120)
    for _ in range(3):
        err = open(tmp_path / "err", "wb")           # a file: a pipe nobody reads would fill
        proc = subprocess.Popen([sys.executable, "-m", "qcowfast", *argv],
                                stdout=subprocess.PIPE, stderr=err)
        reader = threading.Thread(target=lambda: setattr(proc, "out", proc.stdout.read()))
        reader.start()
        _wait_for_handler(proc, signal.SIGUSR1)      # past the interpreter's start-up
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                break
            time.sleep(0.0005)
        assert proc.wait(60) == want.returncode == 0
        reader.join(60)
        err.close()
        if argv[0] != "convert":
            assert proc.out == want.stdout
        assert all(line.startswith(b"    (")
                   for line in (tmp_path / "err").read_bytes().splitlines())


def test_closed_standard_streams(differing, tmp_path):
    """`>&-` and `2>&-`: no traceback, no status line mixed into an image on stdout, and no
    image streamed to a closed stdout."""
    img, same, _, _ = differing
    py = f"'{sys.executable}' -m qcowfast"
    proc = _shell(f"{py} convert {img} {tmp_path / 'a.raw'} >&-; echo $? >&2")
    assert proc.stderr.split()[-1] == b"0" and b"Traceback" not in proc.stderr
    assert (tmp_path / "a.raw").read_bytes() == same.read_bytes()
    proc = _shell(f"{py} convert {img} - 2>&- > {tmp_path / 's.raw'}; echo $? >&2")
    assert proc.stderr.split()[-1] == b"0"
    assert (tmp_path / "s.raw").read_bytes() == same.read_bytes()
    proc = _shell(f"{py} compare {img} {same} >&-; echo $? >&2")
    assert proc.stderr.split()[-1] == b"0"
    proc = _shell(f"{py} convert {img} - >&-; echo $? >&2")
    assert proc.stderr.split()[-1] == b"1" and b"standard output is closed" in proc.stderr


def test_compare_bad_cache_mode_and_case_of_fixed_options(differing, tmp_path):
    img, same, _, _ = differing
    for tool in (["qemu-img"], [sys.executable, "-m", "qcowfast"]):
        proc = subprocess.run([*tool, "compare", "-T", "bogus", str(img), str(same)],
                              capture_output=True, timeout=120)
        assert proc.returncode == 2, tool
        proc = subprocess.run([*tool, "convert", "-O", "qcow2", "-o", "extended_l2=OFF",
                               str(img), str(tmp_path / "x.qcow2")], capture_output=True,
                              timeout=120)
        assert proc.returncode == 1, tool


@pytest.mark.parametrize("argv", [["info", "MISSING"], ["map", "MISSING"],
                                  ["convert", "MISSING", "OUT"], ["compare", "MISSING", "MISSING"],
                                  ["check", "MISSING"]])
def test_missing_image_line_starts_as_qemu_imgs(tmp_path, argv):
    """Scripts look for qemu-img's "Could not open 'NAME': "; the exit status is qemu-img's."""
    missing = "nonexistent.qcow2"
    argv = [missing if a == "MISSING" else "out.raw" if a == "OUT" else a for a in argv]
    want = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, cwd=tmp_path)
    got = run(*argv, cwd=tmp_path)
    assert got.returncode == want.returncode, (got.stderr, want.stderr)
    assert want.stderr.startswith(f"qemu-img: Could not open '{missing}': "), want.stderr
    assert err_text(got).startswith(f"qcowfast: Could not open '{missing}': "), got.stderr
    assert len(err_text(got).splitlines()) == 1 and not os.listdir(tmp_path)


GETOPT = [
    # -X=VALUE keeps its "=" (an unknown format or a bad number, as in qemu-img)
    ["convert", "-O=raw", "IMG", "OUT"], ["convert", "-f=raw", "IMG", "OUT"],
    ["convert", "-S=4k", "IMG", "OUT"], ["convert", "-m=2", "IMG", "OUT"],
    ["compare", "-f=raw", "IMG", "IMG"], ["compare", "-F=qcow2", "IMG", "IMG"],
    ["check", "-f=qcow2", "IMG"], ["map", "-f=raw", "IMG"], ["map", "-s=1M", "IMG"],
    ["info", "-f=qcow2", "IMG"],
    # qemu-img's long options by unique prefix; ambiguous or qcowfast-only prefixes refused
    ["convert", "--force", "-O", "raw", "IMG", "OUT"], ["check", "--force", "IMG"],
    ["compare", "--fo", "IMG", "IMG"], ["convert", "--o", "secret,id=s0,data=x", "IMG", "OUT"],
    ["convert", "-n", "--target-i", "-O", "raw", "IMG", "EXISTING"],
    ["info", "--out=json", "--backing-ch", "IMG"], ["map", "--out", "json", "--st", "64k", "IMG"],
    ["convert", "--ov", "IMG", "OUT"], ["compare", "--st", "IMG", "IMG"],
    # combined flags, attached values, values starting with "-", options before the command
    ["convert", "-pqOraw", "-m2", "IMG", "OUT"], ["convert", "-co", "help", "-O", "qcow2"],
    ["convert", "-l", "-snap", "IMG", "OUT"], ["-V"], ["--vers"], ["-T", "foo", "info", "IMG"],
    ["--", "info", "IMG"], ["convert", "-m", "0x2", "IMG", "OUT"], ["convert", "-m", "1_6", "IMG", "OUT"],
    # an unknown character in a group of flags refuses the group (it is no '--' or operand)
    ["info", "-U1", "IMG"], ["info", "-U-", "IMG"], ["check", "-q-", "IMG"],
    ["--", "--version"], ["--version=1"], ["info", "--format=qcow2", "IMG"],
    ["map", "--form", "raw", "IMG"],
]


@pytest.mark.parametrize("spelling", [["-r", "leaks"], ["-rall"], ["--repair=leaks"],
                                      ["--rep", "all"]])
def test_check_repair_refused_by_name_in_every_spelling(small_qcow2, spelling):
    """qcowfast never writes images: check's repair option is refused by name however it is
    spelled (--repair and its prefixes were an unknown option)."""
    proc = run("check", *spelling, small_qcow2)
    assert proc.returncode == 1 and "does not repair images" in err_text(proc), err_text(proc)


@pytest.mark.parametrize("argv", GETOPT, ids=[" ".join(a) for a in GETOPT])
def test_command_line_read_as_getopt_reads_it(small_qcow2, tmp_path, argv):
    """Scripts written for qemu-img's getopt_long: qcowfast takes and refuses the same
    spellings (exit status), and a refused command line writes nothing."""
    existing = tmp_path / "existing.raw"
    existing.write_bytes(b"\x77" * M)
    names = {"IMG": str(small_qcow2), "EXISTING": str(existing)}
    want = subprocess.run(["qemu-img", *[names.get(a, tmp_path / "q.out" if a == "OUT" else a)
                                        for a in argv]], capture_output=True, text=True)
    got = run(*[names.get(a, tmp_path / "o.out" if a == "OUT" else a) for a in argv])
    assert got.returncode == want.returncode, (err_text(got), want.stderr)
    if got.returncode:
        assert not (tmp_path / "o.out").exists()
    assert existing.read_bytes() == b"\x77" * M or "--target-i" not in argv


@pytest.mark.parametrize("argv, status", [(["info", "IMG"], 1), (["map", "IMG"], 1),
                                          (["check", "IMG"], 1), (["compare", "IMG", "IMG"], 2)])
def test_image_opts_refused_by_name(small_qcow2, argv, status):
    """--image-opts (option strings for file names) is refused by name, never taken for an
    unknown option; compare says 2 ("could not compare"), never 1 ("the images differ")."""
    argv = [str(small_qcow2) if a == "IMG" else a for a in argv]
    proc = run(argv[0], "--image-opts", *argv[1:])
    assert proc.returncode == status
    assert err_text(proc) == "qcowfast: --image-opts: not supported by qcowfast (option " \
                             "strings instead of file names)\n"


# ---------------------------------------------------------------------------------------------
# qemu-img's own usage and option-value errors, line for line


def assert_fails_as_qemu_img(capsys, argv) -> None:
    """The same command line through qemu-img and qcowfast: the same exit status, standard
    output and standard error (qemu-img's name replaced by qcowfast's)."""
    __tracebackhide__ = True
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
    want = subprocess.run(["qemu-img", *argv], capture_output=True)
    status, out, err = cli(capsys, *argv)
    assert want.returncode != 0
    assert (status, out.encode(), err) == (
        want.returncode, want.stdout, want.stderr.decode().replace("qemu-img", "qcowfast"))


@pytest.mark.parametrize("option", ["-s", "--start-offset", "-l", "--max-length"])
@pytest.mark.parametrize("value", ["-1", "abc", "", "1.5", "0.5", "1e3", "1kB", "0b1", "5 ",
                                   "18446744073709551616", "9223372036854775808", "8E"])
def test_map_bad_offsets_fail_as_qemu_img(small_qcow2, capsys, option, value):
    assert_fails_as_qemu_img(capsys, ["map", option, value, small_qcow2])


@pytest.mark.parametrize("argv", [
    # -s is read as the options come: before the image is counted, after an earlier bad option
    ["map", "-s", "abc"], ["map", "-x", "-s", "abc", "IMG"], ["map", "-s", "abc", "-x", "IMG"],
    ["map", "--output=xml", "-s", "abc", "IMG"],
])
def test_map_offset_errors_come_in_qemu_img_order(small_qcow2, capsys, argv):
    assert_fails_as_qemu_img(capsys, [small_qcow2 if a == "IMG" else a for a in argv])


@pytest.mark.parametrize("command", ["info", "map", "check", "measure", "compare"])
@pytest.mark.parametrize("value", ["JSON", "xml", ""])
def test_bad_output_value_fails_as_qemu_img(small_qcow2, capsys, command, value):
    assert_fails_as_qemu_img(capsys, [command, f"--output={value}", small_qcow2])


@pytest.mark.parametrize("argv", [
    # info, map and check read --output after counting the images, and the last one counts
    ["info", "--output=xml"], ["map", "--output=xml", "nope.qcow2"],
    ["check", "--output=xml", "-U", "nope.qcow2"], ["measure", "--output=xml"],
    ["check", "--output", "yaml", "x"],
])
def test_bad_output_value_comes_in_qemu_img_order(small_qcow2, capsys, argv):
    assert_fails_as_qemu_img(capsys, [small_qcow2 if a == "IMG" else a for a in argv])


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_last_output_value_counts_as_in_qemu_img(small_qcow2, capsys, command):
    want = subprocess.run(["qemu-img", command, "--output=xml", "--output=json", small_qcow2],
                          capture_output=True)
    status, out, err = cli(capsys, command, "--output=xml", "--output=json", small_qcow2)
    assert (status, out.encode(), err) == (want.returncode, want.stdout, "")


@pytest.mark.parametrize("argv", [
    ["info"], ["info", "IMG", "IMG"], ["map"], ["map", "IMG", "IMG"], ["check"],
    ["check", "IMG", "IMG"], ["compare", "IMG"], ["compare", "IMG", "IMG", "c"],
    ["compare", "-f", "raw", "IMG"], ["snapshot", "-l"], ["snapshot"],
    ["snapshot", "-l", "IMG", "extra"],
    ["info", "-t", "none", "IMG"], ["info", "--salvage", "IMG"], ["info", "-Ux", "IMG"],
    ["info", "-xU", "IMG"], ["info", "--f", "IMG"], ["info", "--fo=1", "IMG"],
    ["info", "--force-share=1", "IMG"], ["info", "IMG", "-f"], ["info", "IMG", "--format"],
    ["info", "-1", "IMG"], ["map", "-Us"], ["compare", "-x", "a", "b"], ["check", "-r"],
    ["snapshot", "-x", "IMG"], ["convert", "-x", "a", "b"], ["convert", "--bogus", "a", "b"],
    ["check", "IMG", "--output"], ["map", "--bogus"],
])
def test_usage_errors_print_qemu_img_lines(small_qcow2, capsys, argv):
    assert_fails_as_qemu_img(capsys, [small_qcow2 if a == "IMG" else a for a in argv])
