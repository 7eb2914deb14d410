"""The command line's error lines, word for word against qemu-img 7.2.

Every case runs the same command line through qemu-img and qcowfast (in this process) and
compares the exit status and standard error (qemu-img's name replaced by qcowfast's); standard
output too, except where qemu-img prints its own help or QEMU's object types. Where qemu-img's
line names something of QEMU's own (a driver's verdict on a VMDK file), qcowfast keeps its words
after qemu-img's "Could not open 'NAME': ", and the status.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from common import cli_in_process as cli, qemu_img

K = 1024


def _patch(path, offset: int, value: int, size: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = value.to_bytes(size, "big")
    path.write_bytes(data)


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict:
    """The files the command lines name (a header patched per case), by placeholder."""
    d = tmp_path_factory.mktemp("wording")
    qemu_img("create", "-q", "-f", "qcow2", d / "img.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow", d / "v1.qcow", "1M")
    (d / "plain.raw").write_bytes(b"\0" * (1 << 20))
    (d / "small.raw").write_bytes(b"\x77" * (64 * K))
    (d / "dir").mkdir()
    good = (d / "img.qcow2").read_bytes()
    headers = {"v1patched": (4, 1, 4), "v0": (4, 0, 4), "v4": (4, 4, 4),
               "bits8": (20, 8, 4), "bits22": (20, 22, 4),
               "short_header": (100, 80, 4), "long_header": (100, 70000, 4)}
    for name, (offset, value, size) in headers.items():
        (d / f"{name}.qcow2").write_bytes(good)
        _patch(d / f"{name}.qcow2", offset, value, size)
    (d / "cut50.qcow2").write_bytes(good[:50])
    (d / "cut80.qcow2").write_bytes(good[:80])
    (d / "cut4.qcow2").write_bytes(good[:4])
    out = {n.stem.upper(): str(n) for n in d.iterdir()}
    out.update(MISSING=str(d / "missing.qcow2"), OUT=str(d / "out.img"), DIR=str(d / "dir"))
    return out


def _argv(names: dict, argv: list[str]) -> list[str]:
    return [names.get(a, a) for a in argv]


def _both(capsys, names, argv):
    """(qemu-img's (status, stdout, stderr), qcowfast's) for the same command line; qcowfast
    leaves no output file (qemu-img may leave an empty one) and neither changes the -n
    target."""
    argv = _argv(names, argv)
    small = open(names["SMALL"], "rb").read()
    want = subprocess.run(["qemu-img", *argv], capture_output=True, text=True)
    if os.path.exists(names["OUT"]):
        assert os.path.getsize(names["OUT"]) == 0
        os.unlink(names["OUT"])
    status, out, err = cli(capsys, *argv)
    assert not os.path.exists(names["OUT"])
    assert open(names["SMALL"], "rb").read() == small
    return (want.returncode, want.stdout, want.stderr.replace("qemu-img", "qcowfast")), \
        (status, out, err)


def assert_as_qemu_img(capsys, names, argv) -> None:
    __tracebackhide__ = True
    want, got = _both(capsys, names, argv)
    assert want[0] != 0, want
    assert got == want


# -- 1: measure lets getopt print its errors, then prints the help: status 0 ----------------

MEASURE_GETOPT = [
    ["measure", "-x"], ["measure", "--size"], ["measure", "-x", "IMG"], ["measure", "-f"],
    ["measure", "-Uf"], ["measure", "-xU"], ["measure", "--bogus=1"],
    ["measure", "--force-share=1"], ["measure", "--o=x"], ["measure", "--ou"],
    ["measure", "-x", "--size", "abc"],
]


@pytest.mark.parametrize("argv", MEASURE_GETOPT, ids=" ".join)
def test_measure_option_errors_are_getopts_then_the_help(capsys, names, argv):
    want, got = _both(capsys, names, argv)
    assert want[0] == 0 and want[2].startswith("measure: ")
    assert (got[0], got[2]) == (0, want[2])
    assert want[1].startswith("qemu-img version")          # qemu-img's whole help...
    assert got[1] == cli(capsys, "measure", "--help")[1]     # ...qcowfast's, of measure


@pytest.mark.parametrize("argv", [["measure", "-o", ",x", "-x"],
                                  ["measure", "--size", "abc", "-x"],
                                  ["measure", "--size", "8E", "--bogus"]], ids=" ".join)
def test_measure_values_are_checked_as_they_are_read(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


# -- 2: -f with a format qcowfast does not read --------------------------------------------

FORMATS = [
    ["info", "-f", "bogus", "IMG"], ["map", "-f", "bogus", "IMG"],
    ["check", "-f", "bogus", "IMG"], ["check", "-f", "bogus", "-r", "leaks", "IMG"],
    ["measure", "-f", "bogus", "IMG"], ["convert", "-f", "bogus", "IMG", "OUT"],
    ["convert", "-f", "bogus", "-O", "bogus2", "IMG", "OUT"],
    ["compare", "-f", "bogus", "IMG", "IMG"], ["compare", "-F", "bogus", "IMG", "MISSING"],
    ["compare", "-F", "bogus", "MISSING", "IMG"], ["compare", "-f", "qcow", "MISSING", "IMG"],
    ["info", "-f", "bogus", "MISSING"], ["info", "-f", "vmdk", "MISSING"],
    ["map", "-f", "vpc", "MISSING"], ["check", "-f", "vmdk", "MISSING"],
    ["measure", "-f", "qcow", "MISSING"], ["convert", "-f", "vdi", "MISSING", "OUT"],
    ["info", "-f", "vmdk", "DIR"], ["info", "-f", "qcow2", "-f", "bogus", "IMG"],
]


@pytest.mark.parametrize("argv", FORMATS, ids=" ".join)
def test_unknown_format_fails_as_qemu_img(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


@pytest.mark.parametrize("argv", [
    ["info", "-f", "vmdk", "IMG"], ["map", "-f", "vpc", "IMG"], ["check", "-f", "qcow", "IMG"],
    ["measure", "-f", "vdi", "IMG"], ["convert", "-f", "vmdk", "IMG", "OUT"],
    ["compare", "-F", "vmdk", "IMG", "IMG"],
], ids=" ".join)
def test_format_qemu_has_but_qcowfast_lacks(capsys, names, argv):
    """qemu-img's driver says what it finds wrong with the file; qcowfast names the option."""
    want, got = _both(capsys, names, argv)
    option = "-F" if "-F" in argv else "-f"
    fmt = argv[argv.index(option) + 1]
    prefix = f"qcowfast: Could not open '{names['IMG']}': "
    assert want[0] == got[0] != 0 and want[2].startswith(prefix)
    assert got[1:] == ("", f"{prefix}{option} {fmt}: qcowfast reads qcow2 and raw images\n")


# -- 3: QCOW version 1 ----------------------------------------------------------------------

V1 = [
    ["info", "V1PATCHED"], ["map", "V1PATCHED"], ["measure", "V1PATCHED"],
    ["convert", "V1PATCHED", "OUT"], ["compare", "IMG", "V1PATCHED"], ["check", "V1PATCHED"],
    ["info", "-f", "qcow2", "V1PATCHED"], ["info", "-f", "qcow2", "V1"],
    ["check", "-f", "qcow2", "V1"], ["check", "V1"], ["check", "PLAIN"], ["check", "V0"],
]


@pytest.mark.parametrize("argv", V1, ids=" ".join)
def test_qcow_version_1_fails_as_qemu_img(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


def test_real_qcow_version_1_is_refused_by_name(capsys, names):
    """qemu-img reads it (its qcow driver); qcowfast cannot, and says so."""
    want, got = _both(capsys, names, ["info", "V1"])
    assert want[0] == 0 and got == (1, "", f"qcowfast: {names['V1']} is a QCOW (version 1) "
                                           "image; qcowfast reads qcow2 and raw\n")


# -- 4: a snapshot of a raw image -----------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["measure", "-l", "snap", "PLAIN"], ["measure", "-O", "qcow2", "-l", "snapshot.id=1", "PLAIN"],
    ["measure", "-f", "raw", "-l", "snap", "IMG"], ["convert", "-l", "snap", "PLAIN", "OUT"],
    ["convert", "-f", "raw", "-l", "snapshot.name=s", "IMG", "OUT"],
    ["convert", "-l", "snap", "-O", "bogus", "PLAIN", "OUT"],
], ids=" ".join)
def test_snapshot_of_raw_image_fails_as_qemu_img(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


# -- 5: qemu-img's main(): options before the command, the command ------------------------

@pytest.mark.parametrize("argv", [
    ["bogus"], ["bogus", "IMG"], ["Info", "IMG"], ["-"], ["-x", "info", "IMG"], ["--bogus"],
    ["-T"], ["--trace"], ["--help=1"], ["--vers=1"], ["-Ux"], ["-Tevents=/dev/null", "-y"],
    ["--trace", "events=/dev/null", "-yV"], ["--object", "help", "info"],
    ["--", "--version"],
], ids=" ".join)
def test_command_line_before_the_command_fails_as_qemu_img(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


def test_options_alone_end_quietly(capsys, names):
    for argv in (["--"], ["-T", "events=/dev/null"], ["--tr=events=/dev/null"]):
        want, got = _both(capsys, names, argv)
        assert want == got == (0, "", ""), argv


# -- 6: malformed headers -------------------------------------------------------------------

HEADERS = ["CUT50", "CUT80", "V4", "BITS8", "BITS22", "SHORT_HEADER", "LONG_HEADER"]


@pytest.mark.parametrize("command", [["info"], ["map"], ["measure"], ["convert", "OUT"],
                                     ["compare", "IMG"]], ids=lambda c: c[0])
@pytest.mark.parametrize("header", HEADERS)
def test_malformed_header_fails_as_qemu_img(capsys, names, command, header):
    argv = [command[0], header, *command[1:]]
    if command[0] == "compare":
        argv = ["compare", "IMG", header]                   # (the second image fails)
    assert_as_qemu_img(capsys, names, argv)


@pytest.mark.parametrize("argv", [
    ["info", "-f", "qcow2", "PLAIN"], ["map", "-f", "qcow2", "PLAIN"],
    ["convert", "-f", "qcow2", "PLAIN", "OUT"], ["measure", "-f", "qcow2", "PLAIN"],
    ["compare", "-F", "qcow2", "IMG", "PLAIN"], ["info", "-f", "qcow2", "V0"],
    ["info", "-f", "qcow2", "CUT4"], ["info", "MISSING"], ["map", "MISSING"],
    ["convert", "MISSING", "OUT"], ["measure", "MISSING"], ["compare", "IMG", "MISSING"],
    ["info", "DIR"], ["convert", "DIR", "OUT"], ["compare", "DIR", "IMG"],
], ids=" ".join)
def test_image_that_cannot_be_opened_fails_as_qemu_img(capsys, names, argv):
    assert_as_qemu_img(capsys, names, argv)


# -- 7: convert's -o values and -n ----------------------------------------------------------

CONVERT = [
    ["-n", "IMG", "SMALL"], ["-n", "-O", "raw", "-U", "IMG", "SMALL"],
    ["-O", "qcow2", "-o", "cluster_size=3"], ["-O", "qcow2", "-o", "cluster_size=4M"],
    ["-O", "qcow2", "-o", "cluster_size=0"], ["-O", "qcow2", "-o", "cluster_size=abc"],
    ["-O", "qcow2", "-o", "cluster_size=99999999999999999999"],
    ["-O", "qcow2", "-o", "compression_type=lz4"], ["-O", "qcow2", "-o", "compression_type=ZLIB"],
    ["-O", "qcow2", "-o", "compat=0.9"], ["-O", "qcow2", "-o", "preallocation=bogus"],
    ["-O", "qcow2", "-o", "cluster_size=3,compression_type=lz4,compat=bad"],
    ["-O", "qcow2", "-o", "preallocation=bad,compression_type=lz4"],
    ["-O", "qcow2", "-o", "refcount_bits=3"], ["-O", "qcow2", "-o", "refcount_bits=-16"],
    ["-O", "qcow2", "-o", "cluster_size=1k,extended_l2=on"],
    ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on"],
    ["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"],
    ["-O", "qcow2", "-o", "compat=v2,refcount_bits=8"],
    ["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"],
    ["-O", "qcow2", "-o", "data_file_raw=on"], ["-O", "qcow2", "-c", "-o", "preallocation=bad"],
    ["-O", "qcow2", "-o", "bogus=1"], ["-O", "raw", "-o", "cluster_size=64k"],
    ["-o", "compat=bad", "-O", "raw"], ["-O", "raw", "-o", "size=x"],
    ["-O", "raw", "-o", "preallocation=bad"], ["-O", "raw", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "-o", "nocow=maybe"], ["-O", "qcow2", "-o", "refcount_bits=x"],
    ["-n", "-o", "cluster_size=64k", "IMG", "SMALL"], ["-n", "-o", "help", "IMG", "SMALL"],
    ["--target-is-zero", "-o", "bogus=1"], ["-O", "bogus"],
    ["-O", "qcow2", "-o", "cluster_size=3", "MISSING", "OUT"], ["-O", "bogus", "MISSING", "OUT"],
    ["-O", "bogus", "-o", "help"],
]


@pytest.mark.parametrize("options", CONVERT, ids=" ".join)
def test_convert_fails_as_qemu_img(capsys, names, options):
    operands = [] if "help" in options or "SMALL" in options or "OUT" in options else \
        ["IMG", "OUT"]
    assert_as_qemu_img(capsys, names, ["convert", *options, *operands])


# -- 8: help requests qemu-img answers with QEMU's own lists --------------------------------

@pytest.mark.parametrize("argv", [
    ["info", "--object", "help", "IMG"], ["convert", "--object", "help", "IMG", "OUT"],
    ["measure", "--object", "help"], ["compare", "--object", "secret,help", "IMG", "IMG"],
    ["map", "--object", "?", "IMG"], ["check", "--object", "help"],
], ids=" ".join)
def test_object_help_ends_the_command(capsys, names, argv):
    """qemu-img lists QEMU's object types (status 0, before anything else is looked at);
    qcowfast says it creates none."""
    want, got = _both(capsys, names, argv)
    assert want[0] == 0 and want[2] == "" and want[1].startswith(("List of", "secret "))
    assert got == (0, "qcowfast creates no QEMU objects: --object is accepted and ignored\n",
                   "")


@pytest.mark.parametrize("argv", [["convert", "-O", "vmdk", "-o", "help"],
                                  ["convert", "-O", "vmdk", "-o", "help", "IMG", "OUT"]],
                         ids=" ".join)
def test_options_help_of_a_format_qcowfast_does_not_write(capsys, names, argv):
    """qemu-img lists VMDK's creation options; qcowfast refuses the format by name."""
    want, got = _both(capsys, names, argv)
    assert want[0] == 0 and want[1].startswith(("Supported vmdk options:", "Supported options:"))
    assert got == (1, "", "qcowfast: convert: -O vmdk: qcowfast writes raw and qcow2 images\n")
