"""``qcowfast info`` against ``qemu-img info``, through a real subprocess (``python -m qcowfast``).

Oracle: ``qemu-img info --output=json`` (and its human text) on the same file under the same
name. Images come from the session catalogue (conftest.py) or are made here with qemu-img /
qemu-io; the few patched ones are changed at offsets this file computes from the spec
(docs/interop/qcow2.txt), never from qcowfast. Also checked: info never opens a backing or
external data file (a FIFO in their place would hang it), --backing-chain follows the chain only
under the path policy, and every snapshot info lists converts (-l) byte-exact with qemu-img.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes, qemu_img, qemu_io, run_cli as cli
from conftest import IMAGE_IDS

K = 1024
M = 1024 * 1024
INCOMPAT_DIRTY, INCOMPAT_CORRUPT = 1, 2


def ours_json(*args, cwd=None):
    proc = cli("info", "--output=json", *args, cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def qemu_json(*args, cwd=None):
    return json.loads(qemu_img("info", "--output=json", *args, cwd=cwd).stdout)


def assert_same_info(*args, cwd=None):
    """qcowfast info and qemu-img info give the same JSON for ARGS."""
    __tracebackhide__ = True
    want = qemu_json(*args, cwd=cwd)
    got = ours_json(*args, cwd=cwd)
    assert got == want
    return got


def header_field(path, fmt: str, offset: int):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def set_incompatible_bits(path, bits: int) -> None:
    value = header_field(path, ">Q", 72) | bits
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", value))


# --------------------------------------------------------------------------------------------
# The catalogue


def _collected_ids(request, *test_names: str) -> list[str]:
    """The catalogue ids the session will run `test_names` with (so -k selections stay cheap)."""
    ids = {item.callspec.params["image"] for item in request.session.items
           if getattr(item, "originalname", None) in test_names and hasattr(item, "callspec")}
    return [i for i in IMAGE_IDS if i in ids]


@pytest.fixture(scope="module")
def sweep(request, images) -> dict:
    """For each catalogue image the sweep tests will see: (qcowfast, qemu-img) info JSON,
    with --backing-chain and, for chains, without; the subprocesses run a few at a time."""
    ids = _collected_ids(request, "test_info_json_matches_qemu_for_every_chain",
                         "test_info_json_matches_qemu_for_top_image")
    built = {i: images.get(i) for i in ids}

    def job(key):
        image_id, chain = key
        args = ("--backing-chain",) if chain else ()
        path = built[image_id].path
        return ours_json(*args, path), qemu_json(*args, path)

    keys = [(i, True) for i in ids] + [(i, False) for i in ids if len(built[i].chain) > 1]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(keys, pool.map(job, keys)))


def test_info_json_matches_qemu_for_every_chain(image, sweep):
    """Every catalogue image, with its whole backing chain (qcow2 and raw layers)."""
    got, want = sweep[image.id, True]
    assert got == want
    assert len(got) == len(image.chain)
    assert [d["format"] for d in got] == [layer.fmt for layer in image.chain]


@pytest.mark.images("backing")
def test_info_json_matches_qemu_for_top_image(image, sweep):
    got, want = sweep[image.id, False]
    assert got == want
    assert got["backing-filename"] == image.chain[0].backing_name
    assert got["full-backing-filename"] == str(image.path.parent / image.chain[0].backing_name)


@pytest.mark.images(ids=["c4k-chain3-short-base"])
def test_relative_names_as_given(image):
    """filename and full-backing-filename keep the path as given (relative, ./ prefixed)."""
    got = assert_same_info("--backing-chain", "./" + image.path.name, cwd=image.path.parent)
    assert got[0]["filename"] == "./top.qcow2" and got[1]["filename"] == "./mid.qcow2"
    got = assert_same_info(image.path.name, cwd=image.path.parent)
    assert got["full-backing-filename"] == "mid.qcow2"


@pytest.mark.images(ids=["c64k-v3-snapshot", "c4k-chain3-short-base", "c64k-v2"])
def test_human_output_matches_qemu(image):
    want = qemu_img("info", "--backing-chain", image.path).stdout
    proc = cli("info", "--backing-chain", image.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want


@pytest.mark.images(ids=["c64k-v3-snapshot"])
def test_python_api(image):
    got = qcowfast.info(image.path)
    assert got == qemu_json(image.path)
    assert [s["name"] for s in got["snapshots"]] == ["s1", "s2"]
    chain = qcowfast.info(image.path, backing_chain=True)
    assert chain == [got]


# --------------------------------------------------------------------------------------------
# Images made here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("info")


def test_bitmaps_listed_like_qemu(workdir):
    d = workdir / "bitmaps"
    d.mkdir()
    img = d / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, 3 * M + 512)
    qemu_io(img, "write -P 0x11 0 1M")
    qemu_img("bitmap", "--add", img, "auto-one")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", img, "disabled")
    qemu_img("bitmap", "--add", "-g", "512", img, "fine.grained name")
    got = assert_same_info(img)
    bitmaps = got["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["granularity"], b["flags"]) for b in bitmaps] == [
        ("auto-one", 65536, ["auto"]), ("disabled", M, []), ("fine.grained name", 512, ["auto"])]
    # An IN_USE bitmap (flags field of the first directory entry, qcow2.txt "Bitmap directory").
    assert "in-use" not in json.dumps(got)
    dir_offset = _bitmap_directory_offset(img)
    flags = header_field(img, ">I", dir_offset + 12)
    with open(img, "r+b") as f:
        f.seek(dir_offset + 12)
        f.write(struct.pack(">I", flags | 1))
    got = assert_same_info(img)
    assert got["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    assert cli("info", img).stdout == qemu_img("info", img).stdout


def _bitmap_directory_offset(path) -> int:
    """Walk the header extensions (qcow2.txt "Header extensions") to the bitmaps extension."""
    data = Path(path).read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]          # header_length
    while True:
        ext_type, length = struct.unpack_from(">II", data, pos)
        assert ext_type != 0, "no bitmaps extension"
        if ext_type == 0x23852875:
            return struct.unpack_from(">Q", data, pos + 8 + 16)[0]
        pos += 8 + (length + 7) // 8 * 8


def test_feature_fields(workdir):
    """Data file (raw), extended L2, zstd, lazy refcounts, refcount width, dirty and corrupt."""
    d = workdir / "features"
    d.mkdir()
    opts = ("data_file=data.raw,data_file_raw=on,extended_l2=on,compression_type=zstd,"
            "lazy_refcounts=on,refcount_bits=4")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", 2 * M, cwd=d)
    qemu_io("img.qcow2", "write -P 0x22 0 100k", cwd=d)
    # QEMU 7.2 opens the data file relative to its working directory: run both beside it.
    got = assert_same_info("img.qcow2", cwd=d)
    data = got["format-specific"]["data"]
    assert (data["data-file"], data["data-file-raw"], data["extended-l2"], data["refcount-bits"],
            data["compression-type"], data["lazy-refcounts"]) == ("data.raw", True, True, 4,
                                                                   "zstd", True)
    set_incompatible_bits(d / "img.qcow2", INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    got = assert_same_info("img.qcow2", cwd=d)
    assert got["dirty-flag"] is True and got["format-specific"]["data"]["corrupt"] is True
    human = cli("info", "img.qcow2", cwd=d).stdout
    assert human == qemu_img("info", "img.qcow2", cwd=d).stdout
    assert "cleanly shut down: no" in human
    # info never opens the data file: with it gone, the answer is unchanged.
    (d / "data.raw").unlink()
    assert ours_json("img.qcow2", cwd=d) == got


def test_raw_and_v2(workdir):
    d = workdir / "raw"
    d.mkdir()
    raw = d / "odd.raw"
    raw.write_bytes(os.urandom(1000))                     # not a multiple of 512
    assert assert_same_info(raw)["virtual-size"] == 1024
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", d / "v2.qcow2",
             M)
    got = assert_same_info(d / "v2.qcow2")
    assert got["format-specific"]["data"] == {"compat": "0.10", "compression-type": "zlib",
                                              "refcount-bits": 16}


def _rewrite_snapshots_without_extra_data(path) -> None:
    """Rewrite the snapshot table (qcow2.txt "Snapshot table") with no extra data in entry 0,
    as QEMU before 1.1 wrote it: the 32-bit VM state size alone, no disk size, no icount."""
    nb, offset = header_field(path, ">I", 60), header_field(path, ">Q", 64)
    data = bytearray(Path(path).read_bytes())
    pos, entries = offset, []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        head = bytearray(data[pos:pos + 40])
        id_len, name_len = struct.unpack_from(">HH", head, 12)
        extra_len = struct.unpack_from(">I", head, 36)[0]
        body = bytes(data[pos + 40 + extra_len:pos + 40 + extra_len + id_len + name_len])
        entries.append((head, bytes(data[pos + 40:pos + 40 + extra_len]), body))
        pos += 40 + extra_len + id_len + name_len
    table = bytearray()
    for i, (head, extra, body) in enumerate(entries):
        table += bytes(-len(table) % 8)
        if i == 0:
            struct.pack_into(">I", head, 32, 12345)           # 32-bit vm_state_size
            struct.pack_into(">I", head, 36, 0)               # extra_data_size
            extra = b""
        table += head + extra + body
    data[offset:offset + len(table)] = table
    Path(path).write_bytes(bytes(data))


def test_snapshot_entry_without_extra_data(images, workdir):
    copy = images.copy("c64k-v3-snapshot", workdir / "oldsnap")
    _rewrite_snapshots_without_extra_data(copy.path)
    got = assert_same_info(copy.path)
    first, second = got["snapshots"]
    assert "icount" not in first and first["vm-state-size"] == 12345
    assert "icount" in second
    assert cli("info", copy.path).stdout == qemu_img("info", copy.path).stdout


def test_truncated_image_described_like_qemu(images, workdir):
    """Tables past the end of the file (a copy cut after its first cluster) are not read by
    info; qemu-img describes such a file too, reading zeros for the snapshot table."""
    copy = images.copy("c64k-v3-snapshot", workdir / "truncated")
    os.truncate(copy.path, 64 * K)
    got = assert_same_info(copy.path)
    assert len(got["snapshots"]) == 2


@pytest.mark.images(ids=["c64k-v3-snapshot"])
def test_every_listed_snapshot_converts_like_qemu(image, tmp_path):
    """convert -l ID and -l NAME for each snapshot info lists, against qemu-img convert -l."""
    for snap in qcowfast.info(image.path)["snapshots"]:
        want = tmp_path / f"qemu-{snap['id']}.raw"
        qemu_img("convert", "-l", f"snapshot.id={snap['id']}", "-O", "raw", image.path, want)
        for key in (snap["id"], snap["name"]):
            got = tmp_path / f"ours-{key}.raw"
            proc = cli("convert", "-q", "--snapshot", key, image.path, got)
            assert proc.returncode == 0, proc.stderr
            assert_same_bytes(got.read_bytes(), want.read_bytes(), f"snapshot {key!r}")
    proc = cli("convert", "-q", "-l", "no-such-snapshot", image.path, tmp_path / "x.raw")
    qemu = subprocess.run(["qemu-img", "convert", "-q", "-l", "no-such-snapshot", image.path,
                           tmp_path / "q.raw"], capture_output=True, text=True)
    assert proc.returncode == qemu.returncode == 1
    assert proc.stderr == qemu.stderr.replace("qemu-img", "qcowfast"), proc.stderr
    assert not (tmp_path / "x.raw").exists()
    with pytest.raises(qcowfast.SnapshotNotFound, match="no-such-snapshot"):
        qcowfast.convert(image.path, tmp_path / "x.raw", snapshot="no-such-snapshot")


# --------------------------------------------------------------------------------------------
# Safety: only the image itself is read


def test_never_opens_backing_file(workdir):
    """A FIFO named as backing file would block any open(): info must not touch it."""
    d = workdir / "fifo"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", M)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2",
             M)
    want = qemu_json(d / "top.qcow2")
    (d / "base.qcow2").unlink()
    os.mkfifo(d / "base.qcow2")
    assert ours_json(d / "top.qcow2") == want
    # Following the chain refuses the FIFO instead of hanging on it.
    proc = cli("info", "--backing-chain", d / "top.qcow2", timeout=20)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("qcowfast: ")


def test_backing_chain_follows_the_path_policy(workdir):
    d = workdir / "policy"
    (d / "elsewhere").mkdir(parents=True)
    (d / "img").mkdir()
    base = d / "elsewhere" / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, M)
    top = d / "img" / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", top, 2 * M)
    # Without --backing-chain the absolute name is only reported.
    assert assert_same_info(top)["backing-filename"] == str(base)
    proc = cli("info", "--backing-chain", top)
    assert proc.returncode == 1 and "--allow-backing-dir" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    want = qemu_json("--backing-chain", top)
    assert ours_json("--backing-chain", "--allow-backing-dir", d / "elsewhere", top) == want


def test_bad_input(workdir):
    proc = cli("info", workdir / "missing.qcow2")
    assert proc.returncode == 1 and proc.stderr.startswith("qcowfast: ")
    junk = workdir / "junk.bin"
    junk.write_bytes(b"not an image" * 100)
    proc = cli("info", "-f", "qcow2", junk)
    assert proc.returncode == 1 and "Image is not in qcow2 format" in proc.stderr, proc.stderr
    assert assert_same_info(junk)["format"] == "raw"          # probed, as qemu-img does
    trunc = workdir / "trunc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", trunc, M)
    trunc.write_bytes(trunc.read_bytes()[:50])
    proc = cli("info", trunc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    help_text = cli("info", "--help").stdout
    for option in ("--output", "--backing-chain", "--allow-backing-dir", "-f"):
        assert option in help_text


def test_json_escapes_and_empty_lists_printed_as_qemu_prints_them(workdir):
    # QEMU writes \u escapes in upper case and an empty list over two lines; the human
    # snapshot table pads names by bytes (printf %-16s).
    path = workdir / "names.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_img("bitmap", "--add", "--disable", path, "off")
    for name in ("snap ü", "t\x1fq\"\\u00ab", "emoji \U0001F600"):
        qemu_img("snapshot", "-c", name, path)
    for args in (["--output=json"], ["--output=json", "--backing-chain"], []):
        want = qemu_img("info", *args, path).stdout
        got = cli("info", *args, path)
        assert got.returncode == 0, got.stderr
        assert got.stdout == want, args


def test_names_that_are_not_utf8_printed_as_qemu_prints_them(workdir):
    # Names are bytes: qemu-img prints them as they are, and in JSON writes one U+FFFD per
    # bad sequence (an overlong \xc0\xaf is one), surrogate or noncharacter. A backing file
    # whose name is not UTF-8 is described, mapped and converted.
    d = workdir / "bytes"
    d.mkdir()
    path = d / "u.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    for name in (b"ov\xc0\xaf", b"b\xff", b"x\xef\xbf\xbe\xed\xa0\x80y"):
        qemu_img("snapshot", "-c", os.fsdecode(name), path)
    qemu_img("bitmap", "--add", path, os.fsdecode(b"bm\xfe"))
    base = d / os.fsdecode(b"b\xff.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 3 0 64k")
    top = d / os.fsdecode(b"t\xfe.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    for image, args in ((path, []), (path, ["--output=json"]), (top, []),
                        (top, ["--output=json", "--backing-chain"])):
        want = subprocess.run(["qemu-img", "info", *args, image.name], cwd=d,
                              capture_output=True, check=True).stdout
        got = subprocess.run([sys.executable, "-m", "qcowfast", "info", *args, image.name],
                             cwd=d, capture_output=True)
        assert got.returncode == 0, got.stderr
        assert got.stdout == want, args
    want_map = subprocess.run(["qemu-img", "map", top.name], cwd=d, capture_output=True,
                              check=True).stdout
    got_map = subprocess.run([sys.executable, "-m", "qcowfast", "map", top.name], cwd=d,
                             capture_output=True)
    assert got_map.stdout == want_map
    qcowfast.convert(top, d / "out.raw")
    assert (d / "out.raw").read_bytes() == b"\x03" * 65536 + bytes(M - 65536)


def _bitmap_entries(path, count: int) -> list[int]:
    """File offsets of the first `count` bitmap directory entries (qcow2.txt "Bitmap
    directory": 24 fixed bytes, extra data, the name, padded to 8)."""
    data = Path(path).read_bytes()
    pos = _bitmap_directory_offset(path)
    out = []
    for _ in range(count):
        out.append(pos)
        name_size, extra_size = struct.unpack_from(">HI", data, pos + 18)
        pos += (24 + extra_size + name_size + 7) // 8 * 8
    return out


@pytest.mark.parametrize("case", ["duplicate-name", "nul-in-name", "table-too-long",
                                  "table-too-long-in-use"])
def test_bitmap_directory_oddities_like_qemu(workdir, case):
    """What qemu-img refuses at open (two bitmaps of one name; a table longer than the bitmap
    needs, unless the bitmap is in use) and how it shows a name with a NUL byte."""
    d = workdir / f"bm-{case}"
    d.mkdir()
    img = d / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, 16 * M)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", img, "b1")
    second = _bitmap_entries(img, 2)[1]
    with open(img, "r+b") as f:
        if case == "duplicate-name":
            f.seek(second + 24)
            f.write(b"b0")
        elif case == "nul-in-name":
            f.seek(second + 24 + 1)
            f.write(b"\0")
        else:
            f.seek(second + 8)
            f.write(struct.pack(">I", 2))                 # table size: 2 clusters, not 1
            if case.endswith("in-use"):
                f.seek(second + 12)
                f.write(struct.pack(">I", 1 | 2))         # in use, auto
    theirs = subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True)
    ours = cli("info", "--output=json", img)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    if theirs.returncode == 0:
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    else:
        assert len(ours.stderr.splitlines()) == 1 and "Traceback" not in ours.stderr
    map_status = subprocess.run(["qemu-img", "map", img], capture_output=True).returncode
    assert cli("map", img).returncode == map_status


def _broken_chains(d: Path) -> list[str]:
    """Images whose chain cannot be opened: a missing base two layers down, a missing data
    file of the image, of its backing file."""
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2",
             cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2",
             cwd=d)
    (d / "base.qcow2").unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "df.qcow2", "1M", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "df.qcow2", "-F", "qcow2", "over-df.qcow2",
             cwd=d)
    (d / "df.raw").unlink()
    return ["top.qcow2", "df.qcow2", "over-df.qcow2"]


@pytest.mark.parametrize("command", [["map", "{image}"], ["check", "{image}"],
                                     ["measure", "-O", "qcow2", "{image}"],
                                     ["compare", "{image}", "{image}"],
                                     ["convert", "-O", "raw", "{image}", "{out}"],
                                     ["info", "--backing-chain", "{image}"]])
def test_unopenable_chain_worded_as_qemu(tmp_path, command):
    """qemu-img's line for a file of the chain that cannot be opened: the image first, then
    "Could not open backing file: " per layer, then the file (bdrv_open_backing_file())."""
    for image in _broken_chains(tmp_path):
        args = [a.format(image=image, out=tmp_path / "out.raw") for a in command]
        want = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                              cwd=tmp_path)
        ours = cli(*args, cwd=tmp_path)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout), image
        if command[0] == "info" and "df" in image:
            assert want.returncode == 0         # (info does not open data files)
            continue
        assert want.returncode in (1, 2)
        assert ours.stderr.splitlines() == [
            want.stderr.splitlines()[0].replace("qemu-img: ", "qcowfast: ", 1)], image
