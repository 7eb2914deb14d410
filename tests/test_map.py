"""``map``: the streamed allocation map against ``qemu-img map`` (JSON and human text).

Oracle: ``qemu-img map`` run on the same file with the same spelling of its path: its stdout
byte for byte, its exit code, and (for the human map of compressed images) the rows it prints
before it gives up. ``--lookup`` is checked against L1/L2 entries read with ``struct``.
"""
from __future__ import annotations

import io
import json
import struct
import subprocess

import pytest

import qcowfast
from qcowfast.mapping import write_human, write_json
from common import QEMU_IMG, qemu_img, qemu_io, qemu_map, run_cli
from conftest import IMAGE_IDS


def qemu_map_proc(path, *args, cwd=None) -> subprocess.CompletedProcess:
    """``qemu-img map`` without raising (the human map of a compressed image exits 1)."""
    return subprocess.run([QEMU_IMG, "map", *args, str(path)], capture_output=True, text=True,
                          check=False, cwd=cwd)


@pytest.mark.images(ids=IMAGE_IDS)
def test_streamed_map_matches_qemu_img(image):
    path = str(image.path)
    want_json = qemu_map_proc(path, "--output=json")
    assert want_json.returncode == 0, want_json.stderr
    with qcowfast.open(path) as img:
        streamed = list(img.iter_map())
        assert streamed == img.map() == qemu_map(path)
        out = io.StringIO()
        write_json(img, out)
        assert out.getvalue() == want_json.stdout
        want = qemu_map_proc(path)
        out = io.StringIO()
        if want.returncode == 0:
            write_human(img, out)
        else:
            # qemu-img prints the rows before the first compressed extent, then fails.
            with pytest.raises(qcowfast.QcowError, match="compressed clusters"):
                write_human(img, out)
            assert want.returncode == 1 and "compressed clusters" in want.stderr
        assert out.getvalue() == want.stdout


def _compressed_after_data(d):
    """An overlay whose first cluster is plain data and whose backing file is compressed."""
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "4M")
    qemu_io(plain, "write -P 1 0 64k", "write -P 2 1M 64k")
    base = d / "base.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, base)
    qemu_io(base, "write -P 3 2M 64k")
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 4 0 4k", "write -P 5 3M 64k")
    return top


@pytest.mark.parametrize("output", [(), ("--output", "human")])
def test_human_map_prints_rows_then_fails_on_compressed(tmp_path, output):
    top = _compressed_after_data(tmp_path)
    want = qemu_map_proc(top.name, *output, cwd=tmp_path)
    ours = run_cli("map", *output, top.name, cwd=tmp_path)
    assert want.returncode == 1 and len(want.stdout.splitlines()) == 2   # header + one row
    assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout)
    assert "Traceback" not in ours.stderr
    assert ours.stderr.splitlines() == [
        want.stderr.strip().replace("qemu-img: ", "qcowfast: ", 1)]


def test_map_json_streams_whole_chain(tmp_path):
    top = _compressed_after_data(tmp_path)
    want = qemu_map_proc(top.name, "--output=json", cwd=tmp_path)
    ours = run_cli("map", "--output=json", top.name, cwd=tmp_path)
    assert want.returncode == 0
    assert (ours.returncode, ours.stdout) == (0, want.stdout)


def _l2_entry(path, offset: int) -> int:
    """The standard L2 entry serving guest `offset` (no extended L2), read with struct."""
    with open(path, "rb") as f:
        h = f.read(104)
        cluster_bits, = struct.unpack_from(">I", h, 20)
        l1_offset, = struct.unpack_from(">Q", h, 40)
        per_l2 = (1 << cluster_bits) // 8
        l1_index, l2_index = divmod(offset >> cluster_bits, per_l2)
        f.seek(l1_offset + 8 * l1_index)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2 + 8 * l2_index)
        return struct.unpack(">Q", f.read(8))[0]


@pytest.mark.parametrize("spelling, offset", [
    ("0x100000", 1 << 20), ("0X100000", 1 << 20), ("1M", 1 << 20), ("1048576", 1 << 20),
    ("1024k", 1 << 20), ("0x100400", 0x100400)])
def test_lookup_takes_hex_and_suffixed_sizes(tmp_path, spelling, offset):
    path = tmp_path / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M")
    qemu_io(path, "write -P 7 1M 8k")
    proc = run_cli("map", "--lookup", spelling, path)
    assert proc.returncode == 0, proc.stderr
    entry = _l2_entry(path, offset)
    assert f"= {entry:#018x}" in proc.stdout
    host = (entry & 0x00FF_FFFF_FFFF_FE00) + offset % 4096
    # qemu-img map names the same host offset for the range holding `offset`.
    row = next(e for e in qemu_map(path) if e["start"] <= offset < e["start"] + e["length"])
    assert host == row["offset"] + offset - row["start"]
    assert f"host offset {host:#x}" in proc.stdout


def test_lookup_of_an_image_read_as_raw_says_why(tmp_path):
    """--lookup describes QCOW2 tables: on a qcow2 read with -f raw it names -f raw (it said
    the file was no QCOW2 image), on a raw file that it is none; one line, exit 1."""
    path = tmp_path / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(4096))
    for argv, words in ((["-f", "raw", path], "-f raw"), ([raw], "not a QCOW2 image")):
        proc = run_cli("map", "--lookup", "0", *argv)
        assert proc.returncode == 1 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1


def test_empty_image_map(tmp_path):
    """A zero-sized image: qemu-img prints one empty entry (JSON) and only the header."""
    path = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, 0)
    for output in ("--output=json", "--output=human"):
        want = qemu_map_proc(path.name, output, cwd=tmp_path)
        ours = run_cli("map", output, path.name, cwd=tmp_path)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout) == (0, want.stdout)
    with qcowfast.open(path) as img:
        assert list(img.iter_map()) == img.map() == qemu_map(path)


def _ranged_image(tmp_path):
    path = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 1 0 70k", "write -c -P 3 1M 64k", "write -z 2M 64k",
            "write -P 5 3M 100k")
    raw = tmp_path / "m.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, raw)
    return path, raw


RANGES = [[], ["--start-offset=4096"], ["-s", "65536", "-l", "100000"],
          ["--start-offset=0x300000", "--max-length=8k"], ["--start-offset=8M"], ["-l", "0"],
          ["-s", "3200000"]]


@pytest.mark.parametrize("args", RANGES, ids=lambda a: " ".join(a) or "whole")
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_ranges_formats_and_force_share_as_qemu_img(tmp_path, args, output):
    # qemu-img's map options: --start-offset/-s, --max-length/-l, -f (raw files map too), -U.
    path, raw = _ranged_image(tmp_path)
    for image, fmt in ((path, "qcow2"), (raw, "raw")):
        for extra in ([], ["-f", fmt, "-U"]):
            cmd = [f"--output={output}", *extra, *args]
            want = qemu_map_proc(image.name, *cmd, cwd=tmp_path)
            got = run_cli("map", *cmd, image.name, cwd=tmp_path)
            assert (got.returncode, got.stdout) == (want.returncode, want.stdout), cmd


def test_map_dash_u_reads_a_locked_image(tmp_path):
    path, _ = _ranged_image(tmp_path)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 20000", str(path)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):                   # until qemu-io holds its lock
            if run_cli("map", path).returncode:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        refused = run_cli("map", path)
        want = qemu_map_proc(path)
        assert (refused.returncode, refused.stdout) == (want.returncode, want.stdout) == (1, "")
        assert refused.stderr == want.stderr.replace("qemu-img: ", "qcowfast: ", 1)
        shared = run_cli("map", "-U", "--output=json", path)
        assert shared.returncode == 0, shared.stderr
        assert shared.stdout == qemu_map_proc(path, "-U", "--output=json").stdout
    finally:
        holder.kill()
        holder.wait()


def test_metadata_preallocation_threshold_is_reached_when_equal(tmp_path):
    # qcow2_detect_metadata_preallocation() returns count >= threshold: on ext4 this image
    # has exactly as many clusters with a refcount as the threshold.
    path = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", path, "4M")
    qemu_io(path, "write -P 1 0 4k")
    with qcowfast.open(path) as img:
        assert img.map() == qemu_map(path)
    for output in ("json", "human"):
        got = run_cli("map", f"--output={output}", path)
        assert got.stdout == qemu_map_proc(path, f"--output={output}").stdout


def test_backing_names_keep_the_image_name_as_given(tmp_path):
    # QEMU joins a relative backing name to the image name as typed: ".//top" gives ".//base".
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")
    for name in (".//top.qcow2", "./top.qcow2", f"{tmp_path}//top.qcow2"):
        for cmd in (["map"], ["map", "--output=json"],
                    ["info", "--backing-chain", "--output=json"]):
            want = subprocess.run([QEMU_IMG, *cmd, name], cwd=tmp_path, capture_output=True,
                                  text=True, check=True).stdout
            got = run_cli(*cmd, name, cwd=tmp_path)
            assert (got.returncode, got.stdout) == (0, want), (cmd, name)


@pytest.mark.parametrize("args", [["-s", "8E"], ["-l", "9E"], ["--start-offset=9223372036854775808"]])
def test_map_offsets_past_int64_refused_as_qemu_img(tmp_path, args):
    path, _ = _ranged_image(tmp_path)
    want = qemu_map_proc(path, *args)
    got = run_cli("map", *args, path)
    assert got.returncode == want.returncode == 1
    assert got.stdout == want.stdout == ""
    assert got.stderr.replace("qcowfast", "qemu-img") == want.stderr


@pytest.mark.parametrize("seed", range(16))
def test_json_from_runs_equals_entry_by_entry(tmp_path, monkeypatch, seed):
    """write_json computes entries on the runs' arrays (_mapjson); the entry-by-entry path
    (iter_entries, clip_entries) is the reference, over random chains and random
    --start-offset/--max-length ranges (half the seeds with a few runs per kernel call, so
    entries stay open across calls), and qemu-img over the whole image."""
    import random

    from qcowfast import mapping
    if seed % 2:
        monkeypatch.setattr(mapping, "_RUNS_PER_CALL", 3)
    from test_write_sparse import _random_qcow2
    rng = random.Random(seed)
    src = tmp_path / "src.qcow2"
    size = rng.choice([1 << 20, 3 << 20, (5 << 20) + 4096])
    _random_qcow2(rng, src, size)
    with qcowfast.open(src) as img:
        ranges = [(0, None)] + [(rng.randrange(size), rng.choice([None, 1, 4096, 70000, size]))
                                for _ in range(6)]
        for start, length in ranges:
            got = io.StringIO()
            mapping.write_json(img, got, start, length)
            want = "[" + ",\n".join(map(mapping._json_line,
                                        mapping._range_entries(img, start, length))) + "]\n"
            assert got.getvalue() == want, (start, length)
    assert json.loads(run_cli("map", "--output=json", src).stdout) == qemu_map(src)


def test_json_from_runs_keeps_layers_apart(tmp_path):
    """Runs of different layers with the same flags and no offsets (zero clusters of a base
    beside zero clusters of its overlay) are separate entries, as in qemu-img."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -z 0 128k", "write -P 1 128k 64k", "write -z 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
    qemu_io(top, "write -z 64k 64k", "write -z 1088k 64k", "write -P 2 192k 64k")
    want = qemu_map(top)
    assert [e["depth"] for e in want[:3]] == [1, 0, 1], want
    assert json.loads(run_cli("map", "--output=json", top).stdout) == want


def test_json_kernel_formats_any_int64_and_checks_its_arguments():
    """_mapjson against Python's formatting of the same entries, at the extremes of int64,
    and its argument checks."""
    import numpy as np

    from qcowfast import _mapjson, mapping
    big = (1 << 63) - 1
    guest = np.array([0, 5, big - 10, 7], np.int64)
    length = np.array([5, 2, 10, 1], np.int64)
    kind = np.array([2, 2, 0, 3], np.uint8)
    host = np.array([1 << 56, (1 << 56) + 5, -1, 9], np.int64)
    depth = np.array([0, 0, 63, 1], np.int64)
    state = _mapjson.new_state()
    text = (_mapjson.json_lines(guest, length, kind, host, depth, state)
            + _mapjson.json_last(state)).decode()
    want = [dict(start=0, length=7, depth=0, present=True, zero=False, data=True,
                 offset=1 << 56),
            dict(start=big - 10, length=10, depth=63, present=False, zero=True, data=False),
            dict(start=7, length=1, depth=1, present=True, zero=False, data=True)]
    assert text == ",\n".join(map(mapping._json_line, want))
    assert json.loads("[" + text + "]") == want
    assert _mapjson.json_last(state) == b""
    with pytest.raises(ValueError):
        _mapjson.json_lines(guest, length[:2], kind, host, depth, state)
    with pytest.raises(ValueError):
        _mapjson.json_lines(guest, length, kind, host, depth, bytearray(8))


def _set_entry(path, guest: int, value_of) -> None:
    """Replace the L2 entry serving `guest` (standard or extended L2) by value_of(old)."""
    with open(path, "r+b") as f:
        h = f.read(104)
        cluster_bits, = struct.unpack_from(">I", h, 20)
        l1_offset, = struct.unpack_from(">Q", h, 40)
        incompatible, = struct.unpack_from(">Q", h, 72)
        size = 16 if incompatible & 16 else 8                 # extended L2 entries
        per_l2 = (1 << cluster_bits) // size
        l1_index, l2_index = divmod(guest >> cluster_bits, per_l2)
        f.seek(l1_offset + 8 * l1_index)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2 + size * l2_index)
        old = f.read(size)
        f.seek(l2 + size * l2_index)
        f.write(value_of(old))


def _unaligned(old: bytes) -> bytes:
    """A data entry whose host offset is 512 bytes past its cluster (QEMU: "Cluster
    allocation offset ... unaligned", EIO at that cluster)."""
    return struct.pack(">Q", struct.unpack_from(">Q", old)[0] + 512) + old[8:]


def _bad_subclusters(old: bytes) -> bytes:
    """An extended L2 entry whose bitmap marks subcluster 0 allocated and zero at once."""
    return old[:8] + struct.pack(">Q", struct.unpack_from(">Q", old, 8)[0] | 1 | 1 << 32)


def _broken_mid(d):
    p = d / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 1 0 64k", "write -z 512k 64k", "write -P 2 1M 64k",
            "write -P 3 3M 64k")
    _set_entry(p, 1 << 20, _unaligned)
    return p.name, []


def _broken_first(d):
    name, _ = _broken_mid(d)
    _set_entry(d / name, 0, _unaligned)
    return name, []


def _broken_in_backing(d):
    """The overlay covers the base's first cluster; the base's entry at 1M is bad."""
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 1 0 64k", "write -P 2 1M 64k", "write -P 3 3M 64k")
    _set_entry(base, 1 << 20, _unaligned)
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 4 0 64k", "write -P 5 2M 64k")
    return top.name, []


def _broken_over_raw(d):
    """A raw backing file: the map is built entry by entry in Python, not by the kernel."""
    base = d / "base.raw"
    base.write_bytes(b"\1" * 65536 + bytes((3 << 20) - 65536) + b"\2" * (1 << 20))
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, cwd=d)
    qemu_io(top, "write -P 4 512k 64k", "write -P 5 2M 64k", "write -P 6 2560k 64k")
    _set_entry(top, 2 << 20, _unaligned)
    return top.name, []


def _broken_extended(d):
    p = d / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "4M")
    qemu_io(p, "write -P 1 0 4k", "write -P 2 40k 8k", "write -P 3 1M 64k", "write -P 4 2M 4k")
    _set_entry(p, 2 << 20, _bad_subclusters)
    return p.name, []


def _extended(d, name, *writes, bad: int, backing=None):
    p = d / name
    opts = "extended_l2=on" + (f",backing_file={backing},backing_fmt=qcow2" if backing else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, "4M", cwd=d)
    qemu_io(p, *writes)
    if bad is not None:
        _set_entry(p, bad, _bad_subclusters)
    return p


def _broken_extended_cases():
    """Invalid bitmaps where QEMU's failing query starts before the entry, or at it."""
    k = 1024

    def after_partial(d):       # the cluster before is half data, half unallocated
        return _extended(d, "e.qcow2", "write -P 1 0 64k", f"write -P 2 {1024 * k} 40k",
                         bad=1088 * k).name, []

    def after_contiguous(d):    # a run of data clusters, contiguous on the host
        return _extended(d, "e.qcow2", "write -P 1 0 8k", f"write -P 2 {64 * k} 256k",
                         bad=320 * k).name, []

    def after_compressed(d):
        return _extended(d, "e.qcow2", "write -P 1 0 4k", f"write -c -P 2 {64 * k} 64k",
                         bad=128 * k).name, []

    def after_zero_run(d):      # zero subclusters to the cluster's end, then whole clusters
        return _extended(d, "e.qcow2", "write -P 1 0 4k", f"write -z {8 * k} {248 * k}",
                         bad=256 * k).name, []

    def in_backing(d):          # the overlay's data cuts the run the base's query spans
        _extended(d, "base.qcow2", "write -P 1 0 64k", f"write -P 2 {2048 * k} 64k",
                  bad=2048 * k)
        return _extended(d, "top.qcow2", "write -P 3 1M 4k", bad=None,
                         backing="base.qcow2").name, []

    def over_backing(d):        # the base's data cuts the top's unallocated run
        base = d / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "4M")
        qemu_io(base, "write -P 1 1536k 64k", "write -P 2 3M 64k")
        return _extended(d, "top.qcow2", "write -P 3 0 4k", f"write -P 4 {1024 * k} 64k",
                         bad=2048 * k, backing="base.qcow2").name, []

    def over_raw(d):            # a raw base: its data and holes cut the run
        raw = d / "base.raw"
        with open(raw, "wb") as f:
            f.truncate(4 << 20)
            f.seek(1600 * k)
            f.write(b"\5" * 8192)
        top = d / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.raw",
                 "-F", "raw", top, cwd=d)
        qemu_io(top, "write -P 3 0 4k")
        _set_entry(top, 2048 * k, _bad_subclusters)
        return top.name, []

    def ranged(d):
        name, _ = after_partial(d)
        return name, ["--start-offset", "1028k"]

    return {"ext-after-partial": after_partial, "ext-after-contiguous": after_contiguous,
            "ext-after-compressed": after_compressed, "ext-after-zeros": after_zero_run,
            "ext-in-backing": in_backing, "ext-over-backing": over_backing,
            "ext-over-raw": over_raw, "ext-ranged": ranged}


def _broken_after_many(d):
    """Thousands of entries before the bad one: some are written before the error is met."""
    raw = d / "striped.raw"
    block = b"\7" * 1024 + bytes(1024)
    raw.write_bytes(block * 8192)                               # 16 MiB, every other KiB
    p = d / "striped.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-S", "1k", "-o", "cluster_size=1024",
             raw, p)
    _set_entry(p, 15 << 20, _unaligned)
    return p.name, []


def _broken_in_range(d):
    name, _ = _broken_mid(d)
    return name, ["--start-offset", "32k", "--max-length", "2M"]


BROKEN = {"mid": _broken_mid, "first": _broken_first, "backing": _broken_in_backing,
          "raw-backing": _broken_over_raw, "extended-l2": _broken_extended,
          "after-many": _broken_after_many, "range": _broken_in_range,
          **_broken_extended_cases()}


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_map_stops_at_a_bad_entry_as_qemu_img(tmp_path, case, output):
    """A bad L2 entry part-way: qemu-img prints "[" (or the header) and every entry finished
    before it, then fails; so does qcowfast, byte for byte, with one error line."""
    name, args = BROKEN[case](tmp_path)
    want = qemu_map_proc(name, f"--output={output}", *args, cwd=tmp_path)
    ours = run_cli("map", f"--output={output}", *args, name, cwd=tmp_path)
    assert want.returncode == 1 and "Could not read file metadata" in want.stderr
    assert (ours.returncode, ours.stdout) == (1, want.stdout)
    assert len(ours.stderr.splitlines()) == 1 and ours.stderr.startswith("qcowfast: ")
    if case == "after-many":                  # (more than one batch of lines streamed)
        assert want.stdout.count("\n") > 4096


@pytest.mark.parametrize("form", ["plain", "dot", "absolute"])
def test_human_map_names_the_data_file_as_stored(tmp_path, form):
    """The File column of an external data file's rows is the name the header stores, as
    qemu-img prints it, however the image itself was named."""
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=base.data", img, "1M", cwd=tmp_path)
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 512k 64k", cwd=tmp_path)
    name = {"plain": "base.qcow2", "dot": "./base.qcow2", "absolute": str(img)}[form]
    want = subprocess.run([QEMU_IMG, "map", name], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout
    assert "base.data" in want
    got = run_cli("map", name, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want
