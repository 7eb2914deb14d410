"""The ``qcowfast`` command line, run as a real subprocess (``python -m qcowfast``).

Oracles: ``qemu-img convert -O raw`` for the bytes, ``qemu-img map`` (text, both formats) for
``qcowfast map``, and the image file itself (L1/L2 entries read with ``struct`` from the header
fields) for ``map --lookup``. Errors must be one ``qcowfast: ...`` line on stderr with exit code 1
(2 for usage errors), never a traceback.
"""

from __future__ import annotations

import os
import pty
import re
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

import qcowfast
from qcowfast import ExtentKind
from common import assert_same_bytes, qemu_img, qemu_io, qemu_map, reference_raw

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


def assert_usage_error(proc, option: str) -> None:
    __tracebackhide__ = True
    err = err_text(proc)
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err}"
    assert "Traceback" not in err, err
    assert err.startswith("usage: "), err
    assert option in err.splitlines()[-1], err


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".qcowfast-tmp"))


# ---------------------------------------------------------------------------------------------
# convert: success paths


def test_convert_success_summary(images, tmp_path):
    image = images.get("c64k-v3-zeroes")
    dst = tmp_path / "out.raw"
    proc = run("convert", image.path, dst)
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
    proc = run("convert", "-O", "raw", "-t", "3", "-S", "64k", "--fsync", "--overwrite",
               "--max-stream-size", "1G", "--allow-backing-dir", tmp_path, image.path, dst)
    assert proc.returncode == 0, err_text(proc)
    assert "3 threads" in err_text(proc)
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "all options")


def test_progress_forced(images, tmp_path):
    image = images.get("c2m-chain3-mixed-clusters")
    proc = run("convert", "-p", "--force-progress", image.path, tmp_path / "out.raw")
    err = err_text(proc)
    assert proc.returncode == 0, err
    assert "%" in err and "100.0%" in err, err
    assert "\r" in err                                  # a bar redrawn in place
    assert err.splitlines()[-1].startswith("qcowfast: converted"), err   # summary after the bar
    assert (tmp_path / "out.raw").read_bytes() == reference_raw(image.path)


def test_progress_needs_a_terminal(images, tmp_path):
    image = images.get("c2m-chain3-mixed-clusters")
    proc = run("convert", "-p", image.path, tmp_path / "out.raw")
    err = err_text(proc)
    assert proc.returncode == 0, err
    assert "%" not in err and "\r" not in err, err     # stderr is a pipe, not a tty
    assert len(err.splitlines()) == 1


def test_progress_on_a_terminal(images, tmp_path):
    image = images.get("c2m-chain3-mixed-clusters")
    master, slave = pty.openpty()
    received = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:                              # EIO once the child closed the pty
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = run("convert", "-p", image.path, tmp_path / "out.raw", stderr=slave)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    text = received.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "100.0%" in text, text


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


@pytest.mark.parametrize("option, bad", [
    ("-S", "abc"), ("-S", "4q"), ("-S", "-1"), ("-S", "1.3k"), ("-S", ""),
    ("--max-stream-size", "4kk"), ("--max-stream-size", "k"), ("--lookup", "0x10"),
])
def test_bad_size_strings_are_usage_errors(images, tmp_path, option, bad):
    image = images.get("c4k-v3")
    if option == "--lookup":
        proc = run("map", option, bad, image.path)
    else:
        proc = run("convert", option, bad, image.path, tmp_path / "out.raw")
    assert_usage_error(proc, option)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [("-S", "1000"), ("-S", "100"), ("-t", "-1"), ("-t", "x")],
                         ids=["S1000", "S100", "t-1", "tx"])
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
    lines = err_text(proc).splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfast: converted"), lines


def test_stream_to_pipe_with_progress(images):
    image = images.get("c64k-v3-zstd")
    proc = run("convert", "-p", "--force-progress", "-t", "2", image.path, "-")
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(proc.stdout, reference_raw(image.path), "convert -p IMG -")
    assert "100.0%" in err_text(proc)


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


def test_not_a_qcow2_image(tmp_path):
    src = tmp_path / "plain.raw"
    src.write_bytes(b"just some bytes\n" * 1000)
    assert_one_line_error(run("convert", src, tmp_path / "out.raw"),
                          contains="qcowfast: not a QCOW2 image")
    assert os.listdir(tmp_path) == ["plain.raw"]
    assert_one_line_error(run("map", src), contains="qcowfast: not a QCOW2 image")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert_one_line_error(run("convert", empty, tmp_path / "out.raw"))


def test_directory_as_source(tmp_path):
    assert_one_line_error(run("convert", tmp_path, tmp_path / "out.raw"))
    assert os.listdir(tmp_path) == []


def test_unsupported_output_format(images, tmp_path):
    image = images.get("c4k-v3")
    assert_one_line_error(run("convert", "-O", "qcow2", image.path, tmp_path / "out.qcow2"),
                          contains="qcow2")
    assert os.listdir(tmp_path) == []


def test_existing_dst(images, tmp_path):
    image = images.get("c64k-v3")
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"keep me")
    assert_one_line_error(run("convert", image.path, dst), contains="--overwrite")
    assert dst.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["out.raw"]
    proc = run("convert", "--overwrite", image.path, dst)
    assert proc.returncode == 0, err_text(proc)
    assert_same_bytes(dst.read_bytes(), reference_raw(image.path), "--overwrite")


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
    assert_usage_error(proc, "--output")


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
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout


# ---------------------------------------------------------------------------------------------
# help and version


@pytest.mark.parametrize("command, options", [
    ("convert", ["-O", "-p", "--force-progress", "-t", "-S", "--overwrite", "--fsync",
                 "--max-stream-size", "-q", "--allow-backing-dir", "SRC", "DST"]),
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
    proc = run()
    assert proc.returncode == 2 and err_text(proc).startswith("usage: ")
    proc = run("frobnicate")
    assert proc.returncode == 2 and "Traceback" not in err_text(proc)


def test_version():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"qcowfast {qcowfast.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", qcowfast.__version__)


def test_console_script_entry_point():
    """The installed ``qcowfast`` script is the same program."""
    import shutil
    exe = shutil.which("qcowfast")
    assert exe, "the qcowfast console script is not on PATH"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == f"qcowfast {qcowfast.__version__}\n"
