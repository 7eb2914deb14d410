"""The qemu-img and qemu-nbd command lines that real programs run, run through qcowfast.

Each shape is the argv a tool builds, in its option order (options after file names included),
found in that tool's source; the comment beside it names the project and file. Each runs
through qemu-img (or qemu-nbd) and qcowfast on small images written by qemu-img/qemu-io (qcow2
v2 and v3, zlib and zstd compressed, extended L2, a backing chain, an internal snapshot,
bitmaps, leaked clusters), and what the tool relies on is compared: the exit status, standard
output (JSON parsed and compared whole), standard error, the output file's bytes and
allocation (`qemu-img map`), and for `-p` the progress records as vdsm, CDI and Proxmox parse
them.

One difference README.md's "Differences from qemu-img" keeps on purpose is allowed for here:
the steps of `convert -p` (the same record format, 0 first, 100 last). Standard error is
compared whole: off a terminal, convert prints no summary line (glance fails a conversion
that writes anything there). The command lines
qcowfast refuses by name (documented there too) get a test of their own: one line naming the
option, exit 1, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import both_tools, qemu_img, qemu_io, run_cli

from test_locks import _locked
from test_serve import _terminate as _stop

M = 1 << 20


@pytest.fixture(scope="module")
def tooldir(tmp_path_factory) -> Path:
    """The images the shapes name (see the module docstring), made by qemu-img and qemu-io."""
    d = tmp_path_factory.mktemp("real_command_lines")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "4M")
    qemu_io(d / "v2.qcow2", "write -P 0x11 0 192k", "write -P 0x22 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", d / "v3.qcow2", "4M")
    qemu_io(d / "v3.qcow2", "write -P 0x33 0 128k", "write -z 512k 128k", "write -P 0x44 2M 4k")
    (d / "src.raw").write_bytes(b"\x55" * 65536 + bytes(3 * 65536) + b"\x66" * 4096
                                + bytes(4 * M - 4 * 65536 - 4096))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", d / "src.raw", d / "zlib.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
             d / "src.raw", d / "zstd.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
             d / "ext.qcow2", "4M")
    qemu_io(d / "ext.qcow2", "write -P 0x77 0 4k", "write -P 0x78 64k 8k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x99 64k 64k")
    # an overlay naming its base by absolute path, as nova's and libvirt's overlays do
    qemu_img("create", "-q", "-f", "qcow2", "-b", d / "v3.qcow2", "-F", "qcow2", d / "abs.qcow2")
    qemu_io(d / "abs.qcow2", "write -P 0x01 0 4k")
    shutil.copy(d / "v3.qcow2", d / "snap.qcow2")
    qemu_img("snapshot", "-c", "s1", d / "snap.qcow2")
    qemu_io(d / "snap.qcow2", "write -P 0xaa 0 64k")
    shutil.copy(d / "v3.qcow2", d / "bm.qcow2")
    qemu_img("bitmap", "--add", d / "bm.qcow2", "b1")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", d / "bm.qcow2", "b2")
    shutil.copy(d / "v3.qcow2", d / "leak.qcow2")
    _leak_clusters(d / "leak.qcow2", 2)
    qemu_img("create", "-q", "-f", "raw", d / "target.raw", "4M")       # a sparse -n target
    (d / "zeros.raw").write_bytes(bytes(4 * M))                          # an allocated one
    return d


def _leak_clusters(path: Path, n: int) -> None:
    """Append `n` clusters to the file with refcount 1 and no reference: `qemu-img check`'s
    leaked clusters (exit 3)."""
    from test_check import Qcow2File
    q = Qcow2File(path)
    for cluster in q.append_clusters(n):
        q.set_refcount(cluster, 1)


# -- info, map, check, measure, compare, snapshot -l -----------------------------------------

READS = [
    # nova nova/virt/images.py qemu_img_info (privsep qemu.unprivileged_qemu_img_info):
    # options after the file name, -f last
    ["info", "top.qcow2", "--force-share", "--output=json", "-f", "qcow2"],
    ["info", "v2.qcow2", "--force-share", "--output=json"],
    ["info", "missing.qcow2", "--force-share", "--output=json"],     # (nova: DiskNotFound)
    ["info", "src.raw", "--force-share", "--output=json", "-f", "raw"],
    ["info", "abs.qcow2", "--force-share", "--output=json", "-f", "qcow2"],
    # cinder cinder/image/image_utils.py qemu_img_info (format inspector's format first)
    ["info", "-f", "qcow2", "--output=json", "--force-share", "ext.qcow2"],
    ["info", "-f", "qcow2", "--output=json", "--force-share", "src.raw"],
    # cinder (older) image_utils.qemu_img_info: human output parsed by oslo QemuImgInfo
    ["info", "snap.qcow2"],
    ["info", "top.qcow2"],
    # ironic-lib ironic_lib/qemu_img.py image_info; CDI pkg/image/qemu.go Info
    ["info", "zstd.qcow2", "--output=json"],
    ["info", "--output=json", "zlib.qcow2"],
    ["info", "--output=json", "src.raw"],
    # glance glance/async_/flows/plugins/image_conversion.py (stderr must stay empty)
    ["info", "-f", "qcow2", "--output=json", "v3.qcow2"],
    ["info", "-f", "qcow2", "--output=json", "src.raw"],
    # vdsm lib/vdsm/storage/qemuimg.py info (reads compat and bitmaps of format-specific)
    ["info", "--output", "json", "-f", "qcow2", "-U", "bm.qcow2"],
    ["info", "--output", "json", "-f", "qcow2", "-U", "v2.qcow2"],
    ["info", "--output", "json", "--backing-chain", "-U", "top.qcow2"],
    ["info", "--output", "json", "--backing-chain", "-U", "abs.qcow2"],
    # vdsm qemuimg.check: exit 3 with leaks, JSON (image-end-offset, leaks) still read
    ["check", "--output", "json", "-f", "qcow2", "leak.qcow2"],
    ["check", "--output", "json", "-f", "qcow2", "top.qcow2"],
    ["check", "--output", "json", "-f", "qcow2", "zlib.qcow2"],
    ["check", "--output", "json", "-f", "qcow2", "src.raw"],
    # vdsm qemuimg.map (run from the image's directory)
    ["map", "--output", "json", "top.qcow2"],
    ["map", "--output", "json", "ext.qcow2"],
    ["map", "--output", "json", "zstd.qcow2"],
    ["map", "--output", "json", "abs.qcow2"],
    # vdsm qemuimg.measure before its json: node form (-O, then -f)
    ["measure", "--output", "json", "-O", "qcow2", "-f", "qcow2", "top.qcow2"],
    ["measure", "--output", "json", "-O", "qcow2", "-f", "qcow2", "bm.qcow2"],
    ["measure", "--output", "json", "-O", "raw", "-f", "qcow2", "zlib.qcow2"],
    # vdsm qemuimg.compare: -p on stdout, exit 0 / 1 / 2
    ["compare", "-p", "-f", "qcow2", "-F", "qcow2", "-s", "v3.qcow2", "v3.qcow2"],
    ["compare", "-p", "-f", "qcow2", "-F", "qcow2", "-s", "v3.qcow2", "top.qcow2"],
    ["compare", "-p", "-f", "qcow2", "-F", "raw", "zlib.qcow2", "src.raw"],
    ["compare", "-p", "-f", "qcow2", "-F", "qcow2", "v3.qcow2", "missing.qcow2"],
    ["compare", "-p", "-f", "qcow2", "-F", "qcow2", "abs.qcow2", "v3.qcow2"],
    # ganeti/virtualbricks/scripts: `qemu-img snapshot -l FILE`, the table parsed by columns
    ["snapshot", "-l", "snap.qcow2"],
    ["snapshot", "-l", "v3.qcow2"],
]


def _is_json(argv: list[str]) -> bool:
    return "--output=json" in argv or "json" in argv


@pytest.mark.parametrize("argv", READS, ids=" ".join)
def test_read_shapes_as_qemu_img(capsys, monkeypatch, tooldir, argv):
    want, got = both_tools(capsys, monkeypatch, tooldir, argv)
    assert got == want
    if _is_json(argv) and want[1]:
        assert json.loads(got[1]) == json.loads(want[1])


class Holder:
    """`qemu-io -f qcow2 PATH` kept open on a pipe: a QEMU writing the image."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not _locked(path):
            assert self.proc.poll() is None and time.monotonic() < deadline, "no lock"
            time.sleep(0.02)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=20)


@pytest.mark.parametrize("argv", [
    # nova images.qemu_img_info and vdsm qemuimg.info on a running VM's disk
    ["info", "held.qcow2", "--force-share", "--output=json", "-f", "qcow2"],
    ["info", "--output", "json", "-f", "qcow2", "-U", "held.qcow2"],
    # CDI / ironic info and vdsm check, map, measure without -U: refused, in qemu-img's words
    ["info", "--output=json", "held.qcow2"],
    ["check", "--output", "json", "-f", "qcow2", "held.qcow2"],
    ["map", "--output", "json", "held.qcow2"],
    ["measure", "--output", "json", "-O", "qcow2", "-f", "qcow2", "held.qcow2"],
], ids=" ".join)
def test_shapes_on_an_image_in_use(capsys, monkeypatch, tooldir, argv):
    held = tooldir / "held.qcow2"
    shutil.copy(tooldir / "v3.qcow2", held)
    holder = Holder(held)
    try:
        want, got = both_tools(capsys, monkeypatch, tooldir, argv)
    finally:
        holder.close()
        held.unlink()
    assert got == want


# -- convert ------------------------------------------------------------------------------------

CONVERTS = [
    # nova nova/privsep/qemu.py unprivileged_convert_image: -t, -O, -f, [-c], SRC DST
    ["convert", "-t", "none", "-O", "raw", "-f", "qcow2", "v3.qcow2", "OUT.raw"],
    ["convert", "-t", "writeback", "-O", "raw", "-f", "qcow2", "top.qcow2", "OUT.raw"],
    ["convert", "-t", "none", "-O", "qcow2", "-f", "qcow2", "-c", "top.qcow2", "OUT.qcow2"],
    # cinder cinder/image/image_utils.py _get_qemu_convert_cmd: -O, -t, -S 0, -c, -f
    ["convert", "-O", "raw", "-t", "none", "-S", "0", "-f", "qcow2", "v2.qcow2", "OUT.raw"],
    ["convert", "-O", "qcow2", "-c", "-f", "raw", "src.raw", "OUT.qcow2"],
    ["convert", "-O", "raw", "zlib.qcow2", "OUT.raw"],                 # (older cinder)
    # ironic-lib ironic_lib/qemu_img.py convert_image (IPA: directsync, -S 0, -W), no -f
    ["convert", "-O", "raw", "-t", "directsync", "-S", "0", "-W", "zstd.qcow2", "OUT.raw"],
    ["convert", "-O", "raw", "-t", "directsync", "-S", "0", "-W", "src.raw", "OUT.raw"],
    # glance image_conversion.py: -f SRC_FMT -O TARGET_FMT (any stderr fails the import)
    ["convert", "-f", "qcow2", "-O", "raw", "ext.qcow2", "OUT.raw"],
    ["convert", "-f", "raw", "-O", "qcow2", "src.raw", "OUT.qcow2"],
    # CDI pkg/image/qemu.go convertToRaw / ConvertToRawStream: -t none|writeback -p -O raw
    ["convert", "-t", "none", "-p", "-O", "raw", "v3.qcow2", "OUT.raw"],
    ["convert", "-t", "writeback", "-p", "-O", "raw", "top.qcow2", "OUT.raw"],
    # ... with preallocation requested: -o after the file names (older CDI), or first
    ["convert", "-t", "none", "-p", "-O", "raw", "v3.qcow2", "OUT.raw", "-o",
     "preallocation=falloc"],
    ["convert", "-o", "preallocation=falloc", "-t", "writeback", "-p", "-O", "raw",
     "top.qcow2", "OUT.raw"],
    ["convert", "-o", "preallocation=full", "-O", "raw", "zstd.qcow2", "OUT.raw"],
    # vdsm qemuimg.convert(bitmaps=True) of an image without bitmaps: none to copy
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2", "-o",
     "compat=1.1", "--bitmaps", "v3.qcow2", "OUT.qcow2"],
    ["convert", "-f", "qcow2", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps",
     "zstd.qcow2", "OUT.qcow2"],
    # vdsm lib/vdsm/storage/qemuimg.py convert: -p -t none -T none -f -O [-o] [-n] [-c] [-W]
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", "top.qcow2",
     "OUT.raw"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "raw", "-O", "qcow2", "-o",
     "compat=1.1", "src.raw", "OUT.qcow2"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2", "-o",
     "compat=1.1", "-c", "ext.qcow2", "OUT.qcow2"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", "-n",
     "v3.qcow2", "target.raw"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", "-W",
     "zlib.qcow2", "OUT.raw"],
    # Proxmox qemu-server qemu_img_convert: -p -n [-l snapshot.name=] [-t none] [-T] -f -O
    ["convert", "-p", "-n", "-f", "qcow2", "-O", "raw", "top.qcow2", "target.raw"],
    ["convert", "-p", "-n", "-l", "snapshot.name=s1", "-f", "qcow2", "-O", "raw",
     "snap.qcow2", "zeros.raw"],
    ["convert", "-p", "-n", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw",
     "ext.qcow2", "zeros.raw"],
    # avocado-vt qemu_img convert --target-is-zero -n (the target keeps its allocation)
    ["convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", "raw", "top.qcow2",
     "zeros.raw"],
    # kiwi (options between the file names) and packer step_convert_disk (-O, -c, SRC DST)
    ["convert", "-f", "raw", "src.raw", "-O", "qcow2", "OUT.qcow2"],
    ["convert", "-O", "qcow2", "-c", "v3.qcow2", "OUT.qcow2"],
    # nova libvirt snapshot extraction (old -s, and -l)
    ["convert", "-f", "qcow2", "-O", "raw", "-s", "s1", "snap.qcow2", "OUT.raw"],
    ["convert", "-f", "qcow2", "-O", "raw", "-l", "s1", "snap.qcow2", "OUT.raw"],
    # failures the tools catch by exit status and stderr
    ["convert", "-O", "raw", "-f", "qcow2", "missing.qcow2", "OUT.raw"],
    ["convert", "-f", "qcow2", "-O", "raw", "src.raw", "OUT.raw"],
    ["convert", "-p", "-n", "-f", "qcow2", "-O", "raw", "top.qcow2", "missing.raw"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", "missing.qcow2",
     "OUT.raw"],
    ["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", "src.raw",
     "OUT.raw"],
]
_OUTPUTS = ("OUT.raw", "OUT.qcow2", "target.raw", "zeros.raw")
# the progress records the tools parse: vdsm ProgressCommand.REGEXPR (each \r-ended record,
# matched whole), CDI matcherString, Proxmox's parser
_VDSM = re.compile(rb"\s*\(([\d.]+)/100%\)\s*")
_CDI = re.compile(rb"\((\d?\d\.\d\d)/100%\)")
_PVE = re.compile(rb"\((\S+)/100%\)")


def _progress(stdout: bytes):
    """What the tools read from a -p report: the percentages (each record checked against
    vdsm's, CDI's and Proxmox's patterns), reduced to (first, last, rising)."""
    records = stdout.split(b"\r")
    assert records[-1] == b"\n", stdout[-40:]
    values = []
    for record in records[:-1]:
        vdsm = _VDSM.fullmatch(record)
        assert vdsm and _PVE.search(record).group(1) == vdsm.group(1), record
        value = float(vdsm.group(1))
        assert (_CDI.search(record) is not None) == (value < 100), record
        values.append(value)
    return values[0], values[-1], values == sorted(values)


def _outputs(d: Path) -> dict:
    """Each output file: guest bytes, allocation (qemu-img map) and format-specific info."""
    state = {}
    for name in _OUTPUTS:
        path = d / name
        if not path.exists():
            continue
        # The map first, before anything reads the file: ext4 reports an unwritten extent
        # (preallocation=falloc) as data once a read or its readahead has cached a page of it.
        # (-f raw: no probe reads it; every shape writes raw to *.raw, qcow2 to *.qcow2)
        mapped = None if name.endswith(".qcow2") else json.loads(
            qemu_img("map", "--output=json", "-f", "raw", path).stdout)
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        raw = d / "guest.bin"
        qemu_img("convert", "-O", "raw", path, raw)
        state[name] = {"format": info["format"], "virtual-size": info["virtual-size"],
                       "format-specific": info.get("format-specific"),
                       "guest": raw.read_bytes()}
        raw.unlink()
        if info["format"] == "raw":
            state[name]["map"] = mapped
            state[name]["file-size"] = path.stat().st_size
            state[name]["allocated"] = path.stat().st_blocks      # (preallocation, -S 0)
        else:
            state[name]["check"] = json.loads(qemu_img("check", "--output=json", path).stdout)
    return state


def _run_convert(tool: str, argv: list[str], tooldir: Path, work: Path):
    """(status, stdout, stderr, outputs) of `argv` run by `tool` in a fresh copy of tooldir."""
    d = work / tool
    shutil.copytree(tooldir, d)
    if tool == "qemu-img":
        proc = subprocess.run(["qemu-img", *argv], cwd=d, capture_output=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    else:
        proc = run_cli(*argv, cwd=d, text=False)
    err = proc.stderr
    out = _progress(proc.stdout) if b"/100%)" in proc.stdout else proc.stdout
    return proc.returncode, out, err.replace(b"qemu-img", b"qcowfast"), _outputs(d)


@pytest.mark.parametrize("argv", CONVERTS, ids=" ".join)
def test_convert_shapes_as_qemu_img(tooldir, tmp_path, argv):
    want = _run_convert("qemu-img", argv, tooldir, tmp_path)
    got = _run_convert("qcowfast", argv, tooldir, tmp_path)
    assert got[:3] == want[:3]
    assert got[3].keys() == want[3].keys()
    for name, state in want[3].items():
        ours = got[3][name]
        if state["format"] == "qcow2":          # (qcowfast lays clusters out its own way)
            for key in ("filename", "image-end-offset", "allocated-clusters",
                        "fragmented-clusters", "total-clusters"):
                state["check"].pop(key, None), ours["check"].pop(key, None)
        assert ours == state, name


@pytest.mark.parametrize("argv, option", [
    # vdsm qemuimg.convert to an old storage domain (compat 0.10), preallocated, --bitmaps
    (["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2", "-o",
      "compat=0.10", "v3.qcow2", "OUT.qcow2"], "-o compat=0.10"),
    (["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2", "-o",
      "compat=1.1,preallocation=metadata", "v3.qcow2", "OUT.qcow2"],
     "-o preallocation=metadata"),
    (["convert", "-p", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2", "-o",
      "compat=1.1", "--bitmaps", "bm.qcow2", "OUT.qcow2"], "--bitmaps"),
    # Proxmox qemu_img_convert with a bandwidth limit
    (["convert", "-p", "-n", "-T", "none", "-r", "102400K", "-f", "qcow2", "-O", "raw",
      "v3.qcow2", "target.raw"], "-r"),
    # bosh-linux-stemcell-builder / diskimage-builder: compressed v2 qcow2
    (["convert", "-c", "-O", "qcow2", "-o", "compat=0.10", "src.raw", "OUT.qcow2"],
     "-o compat=0.10"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_refusals_of_real_shapes(tooldir, tmp_path, argv, option):
    """qemu-img runs these; qcowfast refuses them by name (README "Differences"): one line
    naming the option, exit 1, the output not created and a -n target untouched."""
    want = _run_convert("qemu-img", argv, tooldir, tmp_path)
    assert want[0] == 0, want[2]
    d = tmp_path / "qcowfast"
    shutil.copytree(tooldir, d)
    proc = run_cli(*argv, cwd=d)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"qcowfast: convert: {option}") and \
        proc.stderr.count("\n") == 1, proc.stderr
    assert not (d / "OUT.raw").exists() and not (d / "OUT.qcow2").exists()
    assert (d / "target.raw").read_bytes() == (tooldir / "target.raw").read_bytes()


# -- under the tools' resource limits --------------------------------------------------------

def _limited(address_space: int, cpu: int | None = 30):
    """oslo.concurrency's prlimit wrapper (nova, cinder, glance; CDI's ExecWithLimits):
    RLIMIT_AS and RLIMIT_CPU set before exec."""
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if cpu is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    return apply


@pytest.mark.parametrize("argv, env, limit", [
    # nova QEMU_IMG_LIMITS (1 GiB, 30 s) with LC_ALL=C LANG=C; CDI qemuInfoLimits
    (["info", "top.qcow2", "--force-share", "--output=json", "-f", "qcow2"],
     {"LC_ALL": "C", "LANG": "C"}, 1 << 30),
    (["info", "--output=json", "zstd.qcow2"], {}, 1 << 30),
    # ironic-lib convert_image: 2 GiB address space, MALLOC_ARENA_MAX=3, standard locale
    (["convert", "-O", "raw", "-t", "directsync", "-S", "0", "-W", "top.qcow2", "OUT.raw"],
     {"MALLOC_ARENA_MAX": "3", "LC_ALL": "C"}, 2 << 30),
    (["convert", "-O", "raw", "-m", "16", "-W", "zlib.qcow2", "OUT.raw"],
     {"MALLOC_ARENA_MAX": "3"}, 1 << 30),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_shapes_under_prlimit(tooldir, tmp_path, argv, env, limit):
    results = []
    for tool in ([["qemu-img"], [sys.executable, "-m", "qcowfast"]]):
        d = tmp_path / tool[0].rsplit("/", 1)[-1]
        shutil.copytree(tooldir, d)
        proc = subprocess.run([*tool, *argv], cwd=d, capture_output=True, timeout=120,
                              env={**os.environ, **env}, preexec_fn=_limited(limit),
                              stdin=subprocess.DEVNULL)
        out = d / "OUT.raw"
        results.append((proc.returncode, proc.stdout,
                        out.read_bytes() if out.exists() else None))
        assert proc.returncode == 0, proc.stderr
    assert results[1] == results[0]


# -- qemu-nbd -r ---------------------------------------------------------------------------------

def _serving(argv: list[str], sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"{argv[0]} did not start")
        time.sleep(0.02)
    return proc


def _nbd_view(sock: Path, tmp: Path) -> tuple:
    """What a client reads: info (its socket name removed), map, allocation depth, bytes."""
    uri = f"nbd+unix:///?socket={sock}"
    info = json.loads(qemu_img("info", "--output=json", uri).stdout)
    info.pop("filename")
    depth = qemu_img("map", "--output=json", "--image-opts",
                     f"driver=nbd,server.type=unix,server.path={sock},"
                     "x-dirty-bitmap=qemu:allocation-depth").stdout
    raw = tmp / f"{sock.name}.raw"
    qemu_img("convert", "-O", "raw", uri, raw)
    return info, json.loads(qemu_img("map", "--output=json", uri).stdout), \
        json.loads(depth), raw.read_bytes()


@pytest.mark.parametrize("options", [
    # ovirt-imageio qemu_nbd.Server.start (a file name in place of its json: node)
    ["--export-name=", "--persistent", "--shared=8", "--read-only", "--cache=none",
     "--aio=native", "--discard=unmap", "--detect-zeroes=unmap", "--allocation-depth"],
    ["-r", "-t", "-f", "qcow2", "--allocation-depth", "-l", "s1"],
], ids=" ".join)
def test_serve_shapes_as_qemu_nbd(tooldir, tmp_path, options):
    image = "snap.qcow2" if "s1" in options else "top.qcow2"
    views = []
    for name, tool in (("q", ["qemu-nbd"]), ("f", [sys.executable, "-m", "qcowfast", "serve"])):
        sock = tmp_path / name
        proc = _serving([*tool, *options, f"--socket={sock}", str(tooldir / image)], sock)
        try:
            views.append(_nbd_view(sock, tmp_path))
        finally:
            _stop(proc)
    assert views[1] == views[0]
