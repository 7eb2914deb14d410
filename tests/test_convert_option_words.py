"""Option values qemu-img refuses, word for word against qemu-img 7.2; convert's -o
extent_size_hint; the writer's refusals of images over QEMU's table limits.

Every command line runs through qemu-img and qcowfast (in this process, from the same working
directory) and the exit status, standard output and standard error are compared (qemu-img's
name replaced by qcowfast's). qemu-img checks an option's value where its getopt loop reads it
(-m, -S, -r, -o's list, -l), so the first bad option on the command line is the one named;
-T before it opens the source, -t once it has created the output.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import qcowfast

from common import cli_in_process as cli, qemu_img

K, M, G = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """IMG (qcow2 with snapshot 'snap1', id 1), RAW, DIR; OUT is the output name."""
    d = tmp_path_factory.mktemp("words")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    qemu_img("snapshot", "-c", "snap1", d / "img.qcow2")
    (d / "a.raw").write_bytes(b"\x5a" * (64 * K) + bytes(960 * K))
    (d / "dir").mkdir()
    return d


NAMES = {"IMG": "img.qcow2", "RAW": "a.raw", "OUT": "o.out", "MISSING": "missing.img",
         "DIR": "dir"}


def _both(capsys, monkeypatch, workdir, argv):
    """(qemu-img's (status, stdout, stderr), qcowfast's) for `argv` run in `workdir`;
    qcowfast leaves nothing behind (qemu-img may leave the output it created)."""
    argv = [NAMES.get(a, a) for a in argv]
    before = sorted(os.listdir(workdir))
    want = subprocess.run(["qemu-img", *argv], capture_output=True, cwd=workdir)
    for name in set(os.listdir(workdir)) - set(before):
        os.unlink(workdir / name)
    monkeypatch.chdir(workdir)
    got = cli(capsys, *argv)
    assert sorted(os.listdir(workdir)) == before
    # (bytes decoded as they are: a progress report's carriage returns stay)
    return (want.returncode, want.stdout.decode(),
            want.stderr.decode().replace("qemu-img", "qcowfast")), got


def assert_as_qemu_img(capsys, monkeypatch, workdir, argv) -> None:
    __tracebackhide__ = True
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[0] != 0, want
    assert got == want


# -- convert: values read by the getopt loop, in command line order -------------------------

GETOPT = [
    ["-m", "0"], ["-m", "17"], ["-m", "x"], ["-m", "2 "], ["-m", ""], ["-m", "-1"],
    ["-m", "99999999999999999999"],
    ["-S", "100"], ["-S", "x"], ["-S", "-1"], ["-S", "32M"], ["-S", "8E"], ["-S", "0x"],
    ["-S", "99999999999999999999"], ["-S", "4q"], ["-S", "1.3k"], ["-S", ""], ["-S", "4k "],
    ["-r", "x"], ["-r", "-1"], ["-r", "8E"],
    ["-m", "0", "-S", "x"], ["-S", "x", "-m", "0"], ["-m", "0", "--bogus"],
    ["-m", "0", "-o", ",x"], ["-o", ",x", "-m", "0"], ["-r", "x", "-m", "0"],
    ["-o", ",x"], ["-o", ""], ["-o", "cluster_size=4k,"], ["-n", "-o", ",x"],
    ["-o", ",x", "-o", "help", "-O", "qcow2"], ["-m", "0", "-t", "bogus", "-T", "bogus"],
]


@pytest.mark.parametrize("options", GETOPT, ids=" ".join)
def test_values_refused_as_they_are_read(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "RAW", "OUT"])


@pytest.mark.parametrize("argv", [["convert", "-m", "0"], ["convert", "-m", "0", "RAW"],
                                  ["convert", "-S", "x", "-O", "qcow2"]], ids=" ".join)
def test_values_refused_before_the_file_names_are_counted(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


# -- convert: -T before the source, -t once the output is created ---------------------------

CACHE = [
    ["-T", "bogus", "RAW", "OUT"], ["-T", "", "RAW", "OUT"], ["-T", "bogus", "MISSING", "OUT"],
    ["-T", "bogus", "-f", "bogus", "RAW", "OUT"], ["-T", "bogus", "RAW", "RAW", "OUT"],
    ["-T", "bogus", "RAW"], ["-T", "bogus", "-n", "-o", "cluster_size=4k", "RAW", "OUT"],
    ["-T", "bogus", "--target-is-zero", "RAW", "OUT"], ["-T", "bogus", "-B", "x", "RAW", "OUT"],
    ["-t", "bogus", "RAW", "OUT"], ["-t", "4", "RAW", "OUT"], ["-t", "None", "RAW", "OUT"],
    ["-t", "bogus", "-T", "bogus", "RAW", "OUT"], ["-t", "bogus", "MISSING", "OUT"],
    ["-t", "bogus", "-O", "bogus", "RAW", "OUT"],
    ["-t", "bogus", "-O", "qcow2", "-o", "cluster_size=3", "RAW", "OUT"],
    ["-t", "bogus", "-c", "-O", "raw", "RAW", "OUT"], ["-t", "bogus", "-n", "RAW", "MISSING"],
    ["-t", "bogus", "-l", "snap", "RAW", "OUT"],
    ["-t", "bogus", "-O", "qcow2", "IMG", "OUT"],
]


@pytest.mark.parametrize("options", CACHE, ids=" ".join)
def test_cache_modes_checked_where_qemu_img_checks_them(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options])


@pytest.mark.parametrize("argv", [
    ["-t", "bogus", "RAW"], ["-O", "bogus", "RAW"], ["-O", "qcow2", "-o", "cluster_size=3", "RAW"],
    ["-c", "-O", "raw", "RAW"], ["-f", "bogus", "RAW"], ["MISSING"], ["-l", "snap", "RAW"],
    ["-q", "-t", "bogus", "RAW"], ["-T", "bogus", "RAW"], ["-m", "0", "RAW"], ["-C", "-c", "RAW"],
], ids=" ".join)
def test_progress_report_ends_as_qemu_imgs(capsys, monkeypatch, workdir, argv):
    """With -p qemu-img reports 0 % once -T is checked, before it opens the source: a refusal
    from there on ends the report (0 %, a newline) on standard output; one before, nothing."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", "-p", *argv, "OUT"])


# -- convert -l: snapshot.* values parsed as QEMU's option parser parses them ---------------

SNAPSHOTS = [
    ["-l", "snapshot.bogus=1"], ["-l", "snapshot.id=1,snapshot.bogus=1"], ["-l", "snapshot."],
    ["-l", "snapshot.nofoo"], ["-l", "snapshot.id=1,=x"], ["-l", "snapshot.id=1,id=1x"],
    ["-l", "snapshot.id=1,id=a,,b"], ["-l", "snapshot.id=1,id=1b,id=a"],
    ["-l", "snapshot.id=1,id=b", "-l", "snapshot.id=1,id=b"],
    ["-l", "snapshot.id=1,id=b", "-l", "snapshot.bogus,id=b"],
    ["-l", "snapshot.id=1,help"], ["-l", "snapshot.id=1,?"], ["-l", "snapshot.bogus,help"],
    ["-l", "snapshot.id=1,nohelp"], ["-l", "snapshot.name=snap1", "-l", "snapshot.bogus=1"],
    ["-l", "snapshot.bogus=1", "-l", "snapshot.name=snap1"], ["-l", "snapshot.bogus=1", "-m", "0"],
]


@pytest.mark.parametrize("options", SNAPSHOTS, ids=" ".join)
def test_snapshot_options_fail_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "IMG", "OUT"])


@pytest.mark.parametrize("options, selects", [
    (["-l", "snapshot.id=1,nosnapshot.name"], "snapshot.id=1,snapshot.name=off"),
    (["-l", "snapshot.id=1,snapshot.name"], "snapshot.id=1,snapshot.name=on"),
    (["-l", "snapshot.id"], "snapshot.id=on"),
    (["-l", "snapshot.id=1,,,"], "snapshot.id=1,,"),
    (["-l", "snapshot.name=,snapshot.id=", "-l", "snapshot.id=9,snapshot.id=99"],
     "snapshot.id=99"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_snapshot_options_select_as_qemu_img(capsys, monkeypatch, workdir, options, selects):
    """Values QEMU's option parser takes (short-form booleans with its warning, escaped
    commas, the last value of a key) select the snapshot qemu-img looks for: no such snapshot
    here, for both, in qemu-img's words; the selection is the one `selects` spells out."""
    from qcowfast import snapshots
    chosen = []
    choose = snapshots.choose_snapshot_option
    monkeypatch.setattr(snapshots, "choose_snapshot_option",
                        lambda values: chosen.append(choose(values)) or chosen[-1])
    want, got = _both(capsys, monkeypatch, workdir, ["convert", *options, "IMG", "OUT"])
    assert want[0] == got[0] == 1
    assert want[2].endswith("qcowfast: Failed to load snapshot: Can't find snapshot\n"), want
    assert got == want
    warnings = want[2].splitlines(keepends=True)[:-1]
    with_parsed = cli(capsys, "convert", "-l", selects, "img.qcow2", "o.out")
    assert with_parsed == (1, "", got[2][len("".join(warnings)):])
    assert len(chosen) == 2 and chosen[0] == chosen[1] is not None, chosen


@pytest.mark.parametrize("options", [
    ["-l", "snapshot.id=1,id=x"], ["-l", "snapshot.id=1,noid"], ["-l", "snapshot.id=1,"],
    ["-l", "snapshot.name=snap1,snapshot.id=1"], ["-l", "snapshot.id=99,snapshot.id=1"],
    ["-l", "snapshot.id=99", "-l", "snapshot.id=1"], ["-l", "snapshot.id=1,snapshot.name=snap1"],
    ["-m", "0x10"], ["-m", "010"], ["-m", "+5"], ["-m", " 2"], ["-S", "0x200"],
], ids=" ".join)
def test_values_qemu_img_accepts(capsys, monkeypatch, workdir, options):
    """Accepted by both, with the same warnings and the same bytes written."""
    argv = ["convert", "-q", *options, "-O", "raw", "img.qcow2"]
    want = subprocess.run(["qemu-img", *argv, "q.raw"], capture_output=True, text=True,
                          cwd=workdir)
    monkeypatch.chdir(workdir)
    got = cli(capsys, *argv, "o.raw")
    try:
        assert want.returncode == 0, want.stderr
        assert got == (0, "", want.stderr.replace("qemu-img", "qcowfast"))
        assert (workdir / "o.raw").read_bytes() == (workdir / "q.raw").read_bytes()
    finally:
        for name in ("o.raw", "q.raw"):
            if os.path.exists(workdir / name):
                os.unlink(workdir / name)


# -- convert: options that do not go together, -c with raw ----------------------------------

@pytest.mark.parametrize("options", [
    ["-c", "-C"], ["-S", "4k", "-C"], ["-S", "0", "-C"], ["-C", "--salvage"],
    ["--target-image-opts"], ["--skip-broken-bitmaps"], ["--skip-broken-bitmaps", "-C", "-c"],
    ["-C", "-c", "-n", "-o", "x=1"], ["-B", "x", "-n", "-o", "cluster_size=4k"],
    ["--salvage", "--target-is-zero"], ["-c", "-O", "raw"], ["-c", "-O", "raw", "-o", "bogus=1"],
], ids=" ".join)
def test_options_that_do_not_go_together(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "RAW", "OUT"])


# -- check: -r as it is read, -T, then what opening the image refuses -----------------------

CHECK = [
    ["-r", "bogus", "IMG"], ["-r", "bogus", "MISSING"], ["-r", "bogus"],
    ["--output", "bogus", "-r", "bogus", "IMG"], ["-r", "bogus", "--output", "bogus", "IMG"],
    ["-r", "bogus", "--bogus", "IMG"], ["-r", "bogus", "-T", "bogus", "IMG"],
    ["-f", "bogus", "-r", "bogus", "IMG"],
    ["-T", "bogus", "IMG"], ["-T", "", "IMG"], ["-T", "bogus", "MISSING"],
    ["-T", "bogus", "--output", "bogus", "IMG"], ["-T", "bogus", "-r", "leaks", "IMG"],
    ["-T", "bogus", "-f", "bogus", "IMG"], ["-T", "bogus", "-f", "raw", "IMG"],
    ["-U", "-r", "leaks", "IMG"], ["-U", "-r", "all", "MISSING"], ["-U", "-r", "leaks", "RAW"],
    ["-U", "-r", "leaks", "-f", "raw", "RAW"], ["-U", "-r", "leaks", "-f", "qcow2", "DIR"],
    ["-U", "-r", "leaks", "-f", "vmdk", "MISSING"], ["-U", "-r", "leaks", "-f", "bogus", "IMG"],
    ["-U", "-r", "leaks", "-T", "bogus", "IMG"],
    ["-r", "leaks", "DIR"], ["-r", "leaks", "-f", "qcow2", "DIR"],
    ["-r", "leaks", "-f", "raw", "DIR"], ["-r", "leaks", "-f", "vmdk", "DIR"],
    ["-f", "qcow2", "DIR"], ["-f", "raw", "DIR"], ["DIR"], ["-f", "qcow2", "MISSING"],
    ["-f", "raw", "MISSING"], ["-r", "leaks", "-f", "raw", "MISSING"],
    ["-f", "qcow2", "-r", "leaks", "RAW"], ["-r", "leaks", "RAW"],
    ["-r", "all", "-f", "raw", "RAW"],
]


@pytest.mark.parametrize("options", CHECK, ids=" ".join)
def test_check_fails_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["check", *options])


@pytest.mark.parametrize("options", [["-T", "bogus"], ["-T", ""], ["-p", "-T", "bogus"],
                                     ["-q", "-T", "none", "-T", "bogus"], ["-p", "-f", "bogus"],
                                     ["-p", "-F", "bogus"], ["-p", "-q", "-T", "bogus"]],
                         ids=" ".join)
@pytest.mark.parametrize("images", [["IMG", "IMG"], ["MISSING", "IMG"]], ids=" ".join)
def test_compare_cache_mode_fails_as_qemu_img(capsys, monkeypatch, workdir, options, images):
    """Status 2 (the images could not be compared), qemu-img's line; with -p the progress
    report it had started ends (a newline)."""
    want, got = _both(capsys, monkeypatch, workdir, ["compare", *options, *images])
    assert want[0] == 2 and got == want


# -- convert -o extent_size_hint: a file-system hint, accepted up to QEMU's limit -----------

@pytest.mark.parametrize("options", [
    ["-O", "qcow2", "-o", "extent_size_hint=4G"], ["-O", "raw", "-o", "extent_size_hint=4G"],
    ["-O", "qcow2", "-o", "extent_size_hint=4294967296"],
    ["-O", "qcow2", "-o", "compat=bad,extent_size_hint=4G"],
    ["-O", "qcow2", "-o", "extent_size_hint=4G,cluster_size=3"],
    ["-O", "raw", "-o", "preallocation=bad,extent_size_hint=4G"],
    ["-O", "raw", "-o", "preallocation=metadata,extent_size_hint=4G"],
    ["-O", "qcow2", "-o", "extent_size_hint=x"], ["-O", "qcow2", "-o", "extent_size_hint=-1"],
    ["-n", "-o", "extent_size_hint=1M"],
    ["-c", "-O", "qcow2", "-o", "extent_size_hint=4G,preallocation=full"],
], ids=" ".join)
def test_extent_size_hint_refused_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options, "RAW", "OUT"])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("hint", ["0", "1M", "4k", "3", "4294967295"])
def test_extent_size_hint_accepted_and_changes_no_byte(capsys, monkeypatch, workdir, fmt, hint):
    """qemu-img takes any hint up to 2^32 - 1 (file-posix sets it with FS_IOC_FSSETXATTR,
    which ext4 ignores); qcowfast accepts it and writes the bytes it writes without it."""
    monkeypatch.chdir(workdir)
    try:
        assert cli(capsys, "convert", "-q", "-O", fmt, "a.raw", "plain.out") == \
            (0, "", "")
        assert cli(capsys, "convert", "-q", "-O", fmt, "-o", f"extent_size_hint={hint}",
                   "a.raw", "hint.out") == (0, "", "")
        assert (workdir / "hint.out").read_bytes() == (workdir / "plain.out").read_bytes()
        qemu = subprocess.run(["qemu-img", "convert", "-O", fmt, "-o", f"extent_size_hint={hint}",
                               "a.raw", "q.out"], capture_output=True, text=True, cwd=workdir)
        assert (qemu.returncode, qemu.stderr) == (0, "")
        compare = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, "q.out",
                                  "hint.out"], capture_output=True, text=True, cwd=workdir)
        assert compare.returncode == 0, compare.stdout + compare.stderr
    finally:
        for name in ("plain.out", "hint.out", "q.out"):
            if os.path.exists(workdir / name):
                os.unlink(workdir / name)


# -- the writer: QEMU's L1 and refcount table limits ----------------------------------------

@pytest.mark.parametrize("size", [128 * G + 512, 2 << 40])
def test_l1_table_over_qemus_limit_fails_as_qemu_img(capsys, monkeypatch, tmp_path, size):
    """At cluster size 512 an L1 table of 32 MiB maps 128 GiB: one sector more and qemu-img's
    create step refuses the image (qcow2_grow_l1_table: EFBIG), naming the output."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(size)
    argv = ["convert", "-O", "qcow2", "-o", "cluster_size=512", "big.raw", "out.qcow2"]
    want = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    got = cli(capsys, *argv)
    assert want.returncode == 1 and want.stderr.startswith("qemu-img: out.qcow2: "), want
    assert got == (1, "", want.stderr.replace("qemu-img", "qcowfast"))
    assert os.listdir(tmp_path) == ["big.raw"]


def test_l1_table_at_qemus_limit_is_written(capsys, monkeypatch, tmp_path):
    """128 GiB at cluster size 512: the largest L1 table QEMU takes."""
    with open(tmp_path / "big.raw", "wb") as f:
        f.truncate(128 * G)
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "convert", "-q", "-O", "qcow2", "-o", "cluster_size=512", "big.raw",
               "out.qcow2")[0] == 0
    info = qemu_img("info", "--output=json", tmp_path / "out.qcow2").stdout
    assert '"virtual-size": 137438953472' in info


def test_l1_refusal_names_the_destination_from_the_api(tmp_path):
    """write_qcow2's OutputError names the destination it is given."""
    from qcowfast import OutputError, open as qopen
    from qcowfast.writer import write_qcow2
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(2 << 40)
    fd = os.open(tmp_path / "out.qcow2", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with qopen(big, format="raw") as image, pytest.raises(OutputError) as info:
            write_qcow2(image, fd, cluster_size=512, name="dest.qcow2")
    finally:
        os.close(fd)
    assert str(info.value) == ("dest.qcow2: error while converting qcow2: Could not resize "
                               "image: Failed to grow the L1 table: File too large")
    with pytest.raises(OutputError) as info:
        qcowfast.convert(big, tmp_path / "api.qcow2", format="qcow2", src_format="raw",
                         cluster_size=512)
    assert str(info.value) == (f"{tmp_path / 'api.qcow2'}: error while converting qcow2: Could "
                               "not resize image: Failed to grow the L1 table: File too large")
    assert sorted(os.listdir(tmp_path)) == ["big.raw", "out.qcow2"]


REFTABLE = 512          # a refcount table of one 512-byte cluster: 64 blocks of 256 clusters


@pytest.fixture
def small_reftable(monkeypatch):
    """QEMU's refcount table limit (8 MiB) shrunk to one cluster of 512 bytes: at cluster size
    512 the image's clusters may then cover 64 * 256 * 512 bytes = 8 MiB (instead of
    128 GiB)."""
    from qcowfast import writer
    monkeypatch.setattr(writer, "QCOW_MAX_REFTABLE_SIZE", REFTABLE)
    return 64 * 256 * 512


def test_refcount_table_over_the_limit_stops_early(capsys, monkeypatch, tmp_path,
                                                   small_reftable):
    """A conversion certain to outgrow the refcount table stops once the clusters written make
    it certain (not after writing everything), names the destination and leaves nothing."""
    src = tmp_path / "data.raw"
    src.write_bytes(bytes(range(1, 256)) * (64 * M // 255))      # 64 MiB, no zero cluster
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "convert", "-p", "-O", "qcow2", "-o", "cluster_size=512",
                           "data.raw", "out.qcow2")
    assert (status, err) == (1, "qcowfast: out.qcow2: the image needs a refcount table over "
                                "QEMU's limit of 512 bytes (its clusters reach past 8388608 "
                                "bytes at cluster size 512); use a larger cluster size\n")
    assert os.listdir(tmp_path) == ["data.raw"]
    # The progress report (-p) stopped soon after 8 of the 64 MiB.
    last = float(out.rstrip("\n").rpartition("(")[2].partition("/")[0])
    assert last < 25.0, out


def test_refcount_table_just_under_the_limit_is_written(capsys, monkeypatch, tmp_path,
                                                        small_reftable):
    """7 MiB of data and its tables fit in 8 MiB: written, and clean for qemu-img check."""
    src = tmp_path / "data.raw"
    src.write_bytes(bytes(range(1, 256)) * (7 * M // 255))
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "convert", "-q", "-O", "qcow2", "-o", "cluster_size=512", "data.raw",
               "out.qcow2") == (0, "", "")
    qemu_img("check", tmp_path / "out.qcow2")
    assert qemu_img("compare", "-f", "raw", src, tmp_path / "out.qcow2").returncode == 0
    assert os.path.getsize(tmp_path / "out.qcow2") < small_reftable
