"""The last wording differences from qemu-img 7.2 on the command line, case by case.

Every command line runs through qemu-img and qcowfast (in this process, from the same working
directory); the exit status, standard output and standard error are compared (qemu-img's name
replaced by qcowfast's, except in its own advice "run 'qemu-img check -r'"). The subjects:
the stale-bitmaps warning of compare (one per image opened), -n targets named with a trailing
slash, --object values, -r 0, -B/-F, options checked before file names are counted (several
sources too), check -r of a broken header, and an empty command line.
"""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from common import cli_in_process as cli, qemu_img, qemu_io

K = 1 << 10

NAMES = {"IMG": "img.qcow2", "BASE": "base.qcow2", "STALE": "stale.qcow2",
         "STALE_TOP": "stale-top.qcow2", "FILE": "file.raw", "DIR": "dir.raw",
         "BIG": "big.raw", "OUT": "out.img", "MISSING": "missing.img", "NUL": "nul.txt",
         "KEY32": "k" * 32}
# Headers patched from a good image: (offset, value, size in bytes).
BROKEN = {"V0": (4, 0, 4), "V4": (4, 4, 4), "BITS8": (20, 8, 4), "BITS22": (20, 22, 4),
          "SHORT": (100, 80, 4), "LONG": (100, 70000, 4), "INCOMPAT": (72, 1 << 40, 8),
          "L1BIG": (36, 0x7FFFFFFF, 4), "RTOFF": (48, 0x123, 8), "CRYPT": (32, 5, 4)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The files NAMES and BROKEN name; OUT and MISSING do not exist."""
    d = tmp_path_factory.mktemp("leftover")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "raw", d / "big.raw", "4M")
    # stale bitmaps: a bitmap whose autoclear bit a program without bitmap support cleared
    qemu_img("create", "-q", "-f", "qcow2", d / "stale.qcow2", "4M")
    qemu_io(d / "stale.qcow2", "write -P 0x7 64k 200k")
    qemu_img("bitmap", "--add", d / "stale.qcow2", "bm0")
    with open(d / "stale.qcow2", "r+b") as f:
        f.seek(88)
        autoclear, = struct.unpack(">Q", f.read(8))
        assert autoclear & 1
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "stale.qcow2", "-F", "qcow2",
             "stale-top.qcow2", cwd=d)
    (d / "file.raw").write_bytes(bytes(64 * K))
    (d / "dir.raw").mkdir()
    (d / "nul.txt").write_bytes(b"ab\0cd")
    good = (d / "img.qcow2").read_bytes()
    for name, (offset, value, size) in BROKEN.items():
        data = bytearray(good)
        data[offset:offset + size] = value.to_bytes(size, "big")
        (d / f"{name.lower()}.qcow2").write_bytes(data)
    return d


def _names():
    return {**NAMES, **{name: f"{name.lower()}.qcow2" for name in BROKEN}}


def _argv(argv):
    names = _names()
    # a placeholder stands alone, or before a trailing slash ("FILE/")
    return [names[a[:-1]] + "/" if a.endswith("/") and a[:-1] in names else names.get(a, a)
            for a in argv]


def _both(capsys, monkeypatch, workdir, argv):
    """(qemu-img's (status, stdout, stderr), qcowfast's) for `argv` run in `workdir`;
    qcowfast leaves every file as it was (qemu-img may leave an output it created)."""
    argv = _argv(argv)
    before = {p: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    want = subprocess.run(["qemu-img", *argv], capture_output=True, cwd=workdir)
    for p in set(workdir.iterdir()) - set(before) - {workdir / "dir.raw"}:
        p.unlink()
    assert {p: p.read_bytes() for p in before} == before      # (broken headers: no repair)
    monkeypatch.chdir(workdir)
    got = cli(capsys, *argv)
    assert {p: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before
    # (decoded as they are: a progress report's carriage returns stay)
    return (want.returncode, want.stdout.decode(),
            re.sub(r"qemu-img(?! check -r)", "qcowfast", want.stderr.decode())), got


def assert_as_qemu_img(capsys, monkeypatch, workdir, argv, status=None) -> None:
    """The same status, stdout and stderr; qemu-img's status is `status`, or not 0."""
    __tracebackhide__ = True
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[0] == status if status is not None else want[0] != 0, want
    assert got == want


# -- 1: compare warns of stale bitmaps at each open, as qemu-img ----------------------------

@pytest.mark.parametrize("argv, warnings", [
    (["compare", "STALE", "STALE"], 2), (["compare", "-s", "STALE", "STALE"], 2),
    (["compare", "STALE_TOP", "STALE"], 2), (["compare", "STALE_TOP", "STALE_TOP"], 2),
    (["compare", "-p", "STALE", "STALE"], 2), (["compare", "STALE", "MISSING"], 1),
    (["compare", "MISSING", "STALE"], 0), (["compare", "-F", "bogus", "STALE", "STALE"], 1),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_compare_warns_of_stale_bitmaps_per_open(capsys, monkeypatch, workdir, argv, warnings):
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[2].count("a program lacking bitmap support") == warnings
    assert got == want


@pytest.mark.parametrize("argv, warnings", [
    (["info", "STALE"], 1), (["info", "STALE_TOP"], 0),
    (["info", "--backing-chain", "STALE_TOP"], 1), (["map", "STALE_TOP"], 1), (["check", "STALE"], 1), (["measure", "-O", "qcow2", "STALE"], 1),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_other_commands_warn_once_per_image(capsys, monkeypatch, workdir, argv, warnings):
    """(Each of these opens each image once, in qemu-img as in qcowfast.)"""
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[2].count("a program lacking bitmap support") == warnings
    assert got == want


# -- 2: -n targets, trailing slashes --------------------------------------------------------

TARGETS = [
    ["-n", "IMG", "FILE/"], ["-n", "IMG", "DIR/"], ["-n", "IMG", "OUT/"],
    ["-n", "-O", "qcow2", "IMG", "DIR/"], ["-n", "-O", "qcow2", "IMG", "OUT/"],
    ["-n", "--target-is-zero", "IMG", "FILE/"], ["-n", "-p", "IMG", "FILE/"],
    ["-n", "MISSING", "FILE/"], ["-n", "IMG", ""], ["-n", "-O", "qcow2", "IMG", ""],
    ["-n", "-c", "IMG", "DIR/"], ["-n", "-c", "IMG", "DIR"], ["-n", "-c", "IMG", "OUT"],
    ["-n", "-O", "qcow2", "-c", "IMG", "DIR/"], ["-n", "IMG", "/dev/null/"],
    ["-n", "-O", "host_device", "IMG", "OUT/"], ["-n", "-O", "bogus", "IMG", "OUT/"],
    ["-n", "-O", "bogus", "IMG", "FILE"], ["-n", "-O", "bogus", "-t", "bogus", "IMG", "FILE"],
    ["-n", "-O", "vmdk", "IMG", "OUT"], ["-n", "-O", "vmdk", "IMG", "DIR"],
    ["-n", "-t", "none", "IMG", "OUT/"], ["-n", "-l", "nosuch", "MISSING", "DIR/"],
    ["IMG", "OUT/"], ["IMG", "FILE/"], ["IMG", "DIR/"], ["-O", "qcow2", "IMG", "FILE/"],
    ["-n", "IMG", "DIR"],
]


@pytest.mark.parametrize("options", TARGETS, ids=" ".join)
def test_convert_target_refused_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options])


# -- 3: --object ----------------------------------------------------------------------------

OBJECTS = [
    "foo", "", "id=x", "bogus,id=x", "sec ret,id=s", "helpx", "secret", "secret,data=x",
    "secret,format=bad", "secret,", "secret,id=s0", "secret,id=0s,data=x", "secret,id=",
    "secret,id=s!,data=x", "secret,id=s0,data=x,bogus=1", "secret,id=s,bogus.x=1",
    "secret,id=s0,data=x,format=bogus", "secret,id=s,format=", "secret,id=0,format=bad,bogus=1",
    "secret,id=s,data=x,file=y", "secret,id=s,file=y,data=x", "secret,id=s0,file=/nonexist",
    "secret,id=s,file=", "secret,id=s,file=/", "secret,id=s,file=NUL,format=base64",
    "secret,id=s,data=x!,format=base64", "secret,id=s,data=e A==,format=base64",
    "secret,id=s,data=x,keyid=k", "secret,id=s,data=x,keyid=", "secret,id=s,data=x,keyid=s",
    "secret,id=s,data=x,loaded=on", "secret,id=s,data=x,loaded=x", "secret,id=s,loaded.x=1",
    "secret,,id=s", "secret,id", "secret,id=s,data", ",secret", "secret,,", "=secret",
    "secret,=x", "help,=x", "help,secret", "secret,help,data", "secret,helpx",
    "secret,qom-type=iothread,id=s", "secret,id.x=1,data=x", "secret,id=s,data.x=1",
    "secret,id=s,data.0=x", "qom-type.x=1,id=s", "secret,qom-type.x=1,id=s",
    "secret,a.b=1,a=2,id=s", "secret,id=s,data=x,a.0=x,a.b=y", "secret,id=s,data=x,a.1=x",
    "secret,id=s,data=x,a.b.1=x", "secret,id=s,data=x,a..b=1", "secret,id=s,data=x,a.=1",
    "secret,id=s,data=x,a.0x=1", "secret,id=s,da!ta=x", "secret,id=s,1=x",
    "secret,id=s,data=x," + "k" * 130 + "=1", "iothread,id=a", "iothread,id=0a",
    "can-bus,id=a", "memory-backend-ram,id=a", "memory-backend-file,id=a,size=1",
    "authz-listfile,id=a", "authz-listfile,id=a,filename=x", "authz-list-file,id=a",
    "main-loop", "main-loop,id=a,bogus=1", "main-loop,id=a,loaded=on",
    "main-loop,id=a,aio-max-batch=x", "throttle-group,id=a,bogus=1", "throttle-group,id=0a",
    "throttle-group,id=a,x-iops-total=x", "throttle-group,id=a,limits=1",
    "throttle-group,id=a,limits.0=1", "thread-context,id=a,cpu-affinity=1",
    "authz-list,id=a,policy=x", "authz-list,id=a,rules=x", "authz-list,id=a,loaded=on",
    "authz-simple,id=a", "authz-simple,id=a,identity.x=1", "pr-manager-helper,id=a",
    "secret_keyring,id=a", "secret_keyring,id=a,serial=x",
    "secret_keyring,id=a,serial=99999999999", "tls-creds-anon,id=a,verify-peer=x",
    "tls-creds-anon,id=a,endpoint=x", "tls-creds-anon,id=a,loaded=on",
    "tls-creds-anon,id=0a,loaded=on", "tls-creds-psk,id=a", "tls-creds-x509,id=a",
    "tls-creds-x509,id=a,loaded=on,sanity-check=x", "tls-creds-x509,id=a,sanity-check=x,loaded=x",
    "tls-cipher-suites,id=a", "tls-cipher-suites,id=a,loaded=on",
]
# Several --object options: ids and keys refer to the ones before.
SEVERAL = [
    ["secret,id=s,data=x", "secret,id=s,data=y"], ["secret,id=s,data=x", "secret,id=s"],
    ["secret,id=s,data=x", "iothread,id=s"], ["main-loop,id=a", "main-loop,id=b"],
    ["main-loop,id=a", "main-loop,id=a"], ["main-loop,id=k", "secret,id=t,data=y,keyid=k"],
    ["secret,id=k,data=x", "secret,id=t,data=y,keyid=k"],
    ["secret,id=k,data=KEY32", "secret,id=t,data=y,keyid=k"],
    ["secret,id=k,data=KEY32", "secret,id=t,data=y,keyid=k,iv=x"],
    ["secret,id=k,data=KEY32", "secret,id=t,data=y,keyid=k,iv=A A"],
    ["secret,id=k,data=KEY32", "secret,id=t,data=abc,keyid=k,iv=AAAAAAAAAAAAAAAAAAAAAA=="],
    ["secret,id=k,data=KEY32",
     "secret,id=t,data=y!,keyid=k,iv=AAAAAAAAAAAAAAAAAAAAAA==,format=base64"],
]
COMMANDS = [["info"], ["map"], ["check"], ["compare", "IMG"], ["measure", "-O", "qcow2"],
            ["snapshot", "-l"], ["convert", "-q"]]


def _object_argv(command, objects):
    argv = [*command]
    for text in objects:
        argv += ["--object", text.replace("KEY32", NAMES["KEY32"]).replace("NUL", "nul.txt")]
    return [*argv, "IMG", *(["OUT"] if command[0] == "convert" else [])]


@pytest.mark.parametrize("text", OBJECTS)
def test_object_refused_as_qemu_img(capsys, monkeypatch, workdir, text):
    assert_as_qemu_img(capsys, monkeypatch, workdir, _object_argv(["info"], [text]))


@pytest.mark.parametrize("objects", SEVERAL, ids=" ".join)
def test_objects_refer_to_those_before(capsys, monkeypatch, workdir, objects):
    assert_as_qemu_img(capsys, monkeypatch, workdir, _object_argv(["info"], objects))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("text", ["foo", "secret,id=s0", "secret,id=0s,data=x", "help,=x",
                                  "secret,id=s0,data=x,bogus=1", "iothread,id=a"])
def test_object_refused_by_every_command(capsys, monkeypatch, workdir, command, text):
    """(compare ends with status 2, the others with 1, as qemu-img.)"""
    assert_as_qemu_img(capsys, monkeypatch, workdir, _object_argv(command, [text]))


@pytest.mark.parametrize("argv", [
    ["info", "--object", "foo", "-f", "bogus", "IMG"], ["info", "-f", "bogus", "--object", "foo"],
    ["check", "-r", "bad", "--object", "foo", "IMG"], ["check", "--object", "foo", "-r", "bad"],
    ["map", "--object", "foo", "--output=bad", "IMG"], ["info", "--object", "foo", "--bogus"],
    ["info", "--bogus", "--object", "foo"], ["convert", "-S", "7", "--object", "foo"],
    ["convert", "--object", "foo", "-S", "7"], ["compare", "--object", "foo"],
    ["measure", "--object", "foo", "--size", "x"],
], ids=" ".join)
def test_object_checked_where_it_is_read(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("objects", [["secret,id=s0,data=x"], ["secret,id=s,file=NUL"],
                                     ["secret,id=s,data=eA==,format=base64,iv=x"],
                                     ["main-loop,id=a,aio-max-batch=0x10"],
                                     ["tls-creds-anon,id=a,endpoint=server"],
                                     ["secret,id=k,data=KEY32", "secret,id=t,data=y,keyid=k,"
                                      "iv=AAAAAAAAAAAAAAAAAAAAAA==,format=base64"]],
                         ids=" ".join)
def test_objects_qemu_img_accepts(capsys, monkeypatch, workdir, objects):
    want, got = _both(capsys, monkeypatch, workdir, _object_argv(["info"], objects))
    assert want[0] == 0 and want[2] == ""
    assert got == want


# -- 4: -r 0 is no limit --------------------------------------------------------------------

@pytest.mark.parametrize("options", [["-r", "0"], ["-r", "1k", "-r", "0"], ["-r", "0x0"]],
                         ids=" ".join)
def test_rate_limit_zero_converts(capsys, monkeypatch, workdir, options):
    argv = ["convert", "-q", *options, "-O", "raw", "STALE_TOP"]
    want = subprocess.run(["qemu-img", *_argv(argv), "q.raw"], capture_output=True,
                          cwd=workdir)
    monkeypatch.chdir(workdir)
    try:
        got = cli(capsys, *_argv(argv), "o.raw")
        assert (got[0], got[1]) == (want.returncode, want.stdout.decode()) == (0, "")
        assert got[2] == want.stderr.decode().replace("qemu-img: warning", "qcowfast: warning")
        assert (workdir / "o.raw").read_bytes() == (workdir / "q.raw").read_bytes()
    finally:
        for name in ("o.raw", "q.raw"):
            (workdir / name).unlink(missing_ok=True)


@pytest.mark.parametrize("options", [["-r", "0", "-O", "bogus", "IMG", "OUT"],
                                     ["-r", "1k", "MISSING", "OUT"],
                                     ["-r", "0", "-r", "x", "IMG", "OUT"]], ids=" ".join)
def test_rate_limit_refused_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options])


def test_a_rate_limit_is_refused_by_name_once_qemu_img_would_convert(capsys, monkeypatch,
                                                                     workdir):
    monkeypatch.chdir(workdir)
    assert cli(capsys, "convert", "-r", "0", "-r", "1k", "img.qcow2", "o.raw") == (
        1, "", "qcowfast: convert: -r: not supported by qcowfast (rate limits)\n")
    assert not (workdir / "o.raw").exists()


# -- 5: -B and -F ---------------------------------------------------------------------------

BACKING = [
    ["-O", "qcow2", "-B", "BASE", "IMG", "OUT"], ["-O", "qcow2", "-B", "MISSING", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "", "IMG", "OUT"], ["-O", "qcow2", "-F", "qcow2", "IMG", "OUT"],
    ["-B", "BASE", "IMG", "OUT"], ["-B", "BASE", "-F", "qcow2", "IMG", "OUT"],
    ["-F", "qcow2", "IMG", "OUT"], ["-c", "-B", "BASE", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-F", "bogus", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-F", "iser", "IMG", "OUT"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2", "IMG", "OUT"],
    ["-O", "qcow2", "-o", "backing_fmt=qcow2", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-o", "backing_file=x", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "MISSING", "OUT"], ["-O", "bogus", "-B", "BASE", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-o", "bogus=1", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-o", "cluster_size=3", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-o", "compat=bad", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-c", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-t", "bogus", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-C", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-r", "1", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "--salvage", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "--target-is-zero", "IMG", "OUT"],
    ["-O", "qcow2", "-F", "qcow2", "-o", "cluster_size=3", "IMG", "OUT"],
    ["-O", "qcow2", "-F", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "IMG", "OUT"],
    ["-O", "qcow2", "-F", "qcow2", "-o", "extended_l2=on,cluster_size=1k", "IMG", "OUT"],
    ["-O", "qcow2", "-F", "bogus", "-o", "compat=bad", "IMG", "OUT"],
    ["-O", "qcow2", "-F", "bogus", "-o", "preallocation=bad", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-F", "qcow2", "-o", "preallocation=metadata", "IMG", "OUT"],
    ["-O", "qcow2", "-B", "BASE", "-F", "qcow2", "IMG", "IMG", "OUT"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2", "IMG", "IMG", "OUT"],
    ["-n", "-B", "BASE", "IMG", "IMG", "BIG"], ["-n", "-B", "BASE", "IMG", "OUT"],
    ["-n", "-B", "BASE", "IMG", "IMG", "MISSING"], ["-n", "-B", "BASE", "-t", "bogus", "IMG",
                                                    "IMG", "BIG"],
    ["-n", "-F", "bogus", "IMG", "MISSING"],
]


@pytest.mark.parametrize("options", BACKING, ids=" ".join)
def test_backing_options_refused_as_qemu_img(capsys, monkeypatch, workdir, options):
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options])


@pytest.mark.parametrize("options", [["-n", "--target-is-zero", "-B", "BASE", "IMG", "BIG"],
                                     ["-n", "--target-is-zero", "-B", "BASE", "IMG", "IMG",
                                      "BIG"]], ids=" ".join)
def test_target_is_zero_with_a_backing_file_ends_with_status_0(capsys, monkeypatch, workdir,
                                                               options):
    """qemu-img leaves with the status of its last call that worked."""
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["convert", *options], status=0)


@pytest.mark.parametrize("options, named", [
    (["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"], "-B"),
    (["-n", "-B", "base.qcow2"], "-B"),
    (["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2"], "-o backing_file"),
    (["-O", "qcow2", "-B", "base.qcow2", "-o", "backing_fmt=qcow2"], "-o backing_fmt"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_backing_files_refused_by_name_where_qemu_img_writes_them(capsys, monkeypatch,
                                                                   workdir, options, named):
    existing = "-n" in options
    for name in ("q.out", "o.out") if existing else ():
        (workdir / name).write_bytes(b"\xff" * (1 << 20))
    try:
        want = subprocess.run(["qemu-img", "convert", "-q", *options, "img.qcow2", "q.out"],
                              capture_output=True, text=True, cwd=workdir)
        assert (want.returncode, want.stderr) == (0, "")
        monkeypatch.chdir(workdir)
        status, out, err = cli(capsys, "convert", "-q", *options, "img.qcow2", "o.out")
        assert (status, out) == (1, "")
        assert err.startswith(f"qcowfast: convert: {named}: not supported by qcowfast ("), err
        assert err.count("\n") == 1
        assert (workdir / "o.out").exists() == existing
        assert not existing or (workdir / "o.out").read_bytes() == b"\xff" * (1 << 20)
    finally:
        for name in ("q.out", "o.out"):
            (workdir / name).unlink(missing_ok=True)


def test_backing_format_is_ignored_with_n(capsys, monkeypatch, workdir):
    """As qemu-img, -n writes into the target as it is: -F has nothing to name."""
    monkeypatch.chdir(workdir)
    (workdir / "t.raw").write_bytes(b"\xff" * (1 << 20))
    (workdir / "q.raw").write_bytes(b"\xff" * (1 << 20))
    try:
        want = subprocess.run(["qemu-img", "convert", "-q", "-n", "-F", "bogus", "img.qcow2",
                               "q.raw"], capture_output=True, text=True, cwd=workdir)
        assert (want.returncode, want.stderr) == (0, "")
        assert cli(capsys, "convert", "-q", "-n", "-F", "bogus", "img.qcow2", "t.raw") == \
            (0, "", "")
        assert (workdir / "t.raw").read_bytes() == (workdir / "q.raw").read_bytes()
    finally:
        (workdir / "t.raw").unlink()
        (workdir / "q.raw").unlink()


# -- 6: options before file names; several sources ------------------------------------------

ORDER = [
    ["convert", "IMG", "MISSING", "OUT"], ["convert", "MISSING", "IMG", "OUT"],
    ["convert", "-O", "bogus", "IMG", "IMG", "OUT"], ["convert", "-t", "bogus", "IMG", "IMG",
                                                      "OUT"],
    ["convert", "-l", "nosuch", "IMG", "IMG", "OUT"],
    ["convert", "-l", "nosuch", "IMG", "MISSING", "OUT"],
    ["convert", "-o", "bogus=1", "IMG", "IMG", "IMG", "OUT"],
    ["convert", "-O", "qcow2", "-o", "cluster_size=3", "IMG", "IMG", "OUT"],
    ["convert", "-c", "IMG", "IMG", "OUT"], ["convert", "-n", "IMG", "IMG", "OUT"],
    ["convert", "-f", "bogus", "IMG", "MISSING", "OUT"], ["convert", "-B", "x", "IMG", "IMG",
                                                         "OUT"],
    ["convert", "-C", "IMG", "MISSING", "OUT"], ["convert", "--salvage", "MISSING", "OUT"],
    ["convert", "-C", "MISSING", "OUT"], ["convert", "-S", "7", "-o", "help"],
    ["convert", "--object", "foo", "-o", "help"], ["convert", "-o", "help", "--object", "foo"],
    ["convert", "-m", "0", "-O", "qcow2", "-o", "help"], ["convert", "-o", "help", "-x"],
    ["convert", "--target-is-zero", "-o", "help"], ["convert", "-C", "-c", "-o", "help"],
    ["convert", "-n", "-o", "help"], ["convert", "-o", "help", "-O", "bogus"],
    ["info", "--output=bad"], ["info", "--output=bad", "IMG", "IMG"], ["map", "-s", "x"],
    ["map", "IMG", "IMG", "-l", "x"], ["check", "-r", "bad"], ["check", "IMG", "IMG", "-r",
                                                              "bad"],
    ["compare", "-T", "bogus", "IMG"], ["measure", "--size", "x", "IMG", "IMG"],
]


@pytest.mark.parametrize("argv", ORDER, ids=" ".join)
def test_options_refused_before_file_names_are_counted(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


@pytest.mark.parametrize("argv", [["convert", "-l", "snapshot.id=1,noid", "-o", "help"],
                                  ["convert", "-O", "qcow2", "-o", "help"]], ids=" ".join)
def test_options_help_once_options_are_read(capsys, monkeypatch, workdir, argv):
    """qemu-img prints the options' help (and the warnings of the options before it)."""
    want, got = _both(capsys, monkeypatch, workdir, argv)
    assert want[0] == 0 and want[1].startswith("Supported") and got[1].startswith("Supported")
    assert (got[0], got[2]) == (want[0], want[2])


def test_several_sources_refused_by_name_once_qemu_img_would_convert(capsys, monkeypatch,
                                                                      workdir):
    want = subprocess.run(["qemu-img", "convert", "-q", "img.qcow2", "img.qcow2", "q.raw"],
                          capture_output=True, text=True, cwd=workdir)
    (workdir / "q.raw").unlink()
    assert (want.returncode, want.stderr) == (0, "")
    monkeypatch.chdir(workdir)
    assert cli(capsys, "convert", "-q", "img.qcow2", "img.qcow2", "o.raw") == (
        1, "", "qcowfast: convert: multiple source images are not supported (qemu-img would "
               "concatenate them); convert one image at a time\n")
    assert not (workdir / "o.raw").exists()


# -- 7: check -r of a broken header ---------------------------------------------------------

@pytest.mark.parametrize("repair", [["-r", "leaks"], ["-r", "all"], ["-f", "qcow2", "-r", "all"]],
                         ids=" ".join)
@pytest.mark.parametrize("header", sorted(BROKEN))
def test_check_repair_of_a_broken_header(capsys, monkeypatch, workdir, repair, header):
    if header == "V0" and "-f" not in repair:
        repair = ["-f", "qcow2", *repair]      # (probed, version 0 is raw: another story)
    assert_as_qemu_img(capsys, monkeypatch, workdir, ["check", *repair, header])


# -- 8: no command --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["convert"], ["convert", "IMG"], ["convert", "-p"]],
                         ids=lambda a: " ".join(a) or "nothing")
def test_missing_words_refused_as_qemu_img(capsys, monkeypatch, workdir, argv):
    assert_as_qemu_img(capsys, monkeypatch, workdir, argv)


def test_help_still_works(capsys):
    status, out, err = cli(capsys, "--help")
    assert (status, err) == (0, "") and out.startswith("usage: qcowfast")
    assert "convert" in out
