"""Memory bounds of ``map`` and ``check`` on images built to make them grow.

Each command runs in a subprocess under an address-space limit (``RLIMIT_AS``) far below what
holding the whole answer in memory would take; it must succeed and print what qemu-img prints,
byte for byte. Python with numpy needs ~170 MiB of address space here (``OPENBLAS_NUM_THREADS=1``
keeps OpenBLAS from reserving a stack per core), so the limits leave ~80 MiB of headroom:
a list of the 393216 map entries below and their JSON text need more than 300 MiB.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import struct
import subprocess
import sys

import pytest

from common import QEMU_IMG, qemu_img, qemu_io

MiB = 1 << 20
LIMIT = 250 * MiB


def _limited(*args, cwd=None, limit=LIMIT) -> subprocess.CompletedProcess:
    """``python -m qcowfast ARGS`` with RLIMIT_AS = `limit` (bytes output, no raise)."""
    def pre():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "qcowfast", *map(str, args)], cwd=cwd,
                          capture_output=True, preexec_fn=pre, env=env, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def _qemu(*args) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, check=False)


def _alternating_subclusters(path, tables: int) -> int:
    """An extended-L2 image whose subclusters alternate zero / unallocated over `tables` L2
    tables (131072 map entries each). qemu-io writes the pattern of the first cluster of each
    table; the table's other 4095 entries are copies of that 16-byte entry (no data, no
    refcount change: the image stays clean). Returns the number of map entries."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,extended_l2=on", path,
             tables * 256 * MiB)
    qemu_io(path, *(f"write -z {t * 256 * MiB + s * 2048} 2k"
                    for t in range(tables) for s in range(0, 32, 2)))
    with open(path, "r+b") as f:
        h = f.read(112)
        l1_size, l1_offset = struct.unpack_from(">IQ", h, 36)
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for entry in l1[:tables]:
            l2 = entry & 0x00FF_FFFF_FFFF_FE00
            f.seek(l2)
            first = f.read(16)
            assert first[8:] == struct.pack(">Q", 0x5555_5555_0000_0000)
            f.seek(l2)
            f.write(first * 4096)
    return tables * 4096 * 32


@pytest.fixture(scope="module")
def alternating(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "alt.qcow2"
    n = _alternating_subclusters(path, 3)
    assert _qemu("check", path).returncode == 0
    return path, n


def test_map_json_memory_is_flat(alternating):
    path, n = alternating
    want = _qemu("map", "--output=json", path)
    assert want.returncode == 0 and want.stdout.count(b"\n") == n
    ours = _limited("map", "--output=json", path)
    assert ours.returncode == 0, ours.stderr.decode()[-2000:]
    assert ours.stdout == want.stdout


def test_map_human_memory_is_flat(alternating):
    path, _ = alternating
    want = _qemu("map", path)
    ours = _limited("map", path)
    assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout) == (0, want.stdout)
    assert ours.stderr == b""


def test_check_memory_follows_metadata_not_file_size(tmp_path):
    """A 64 GiB sparse file with 512-byte clusters: 2**27 clusters, 2048 of them in use.
    Counting every cluster of the file would take 640 MiB; the check must fit in 250 MiB."""
    img = tmp_path / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, 64 * MiB)
    qemu_io(img, "write -P 1 0 1M", "write -P 2 8M 512k")
    os.truncate(img, 64 << 30)
    for args in (("--output=json",), ()):
        want = subprocess.run([QEMU_IMG, "check", *args, img.name], capture_output=True,
                              cwd=tmp_path, check=False)
        ours = _limited("check", *args, img.name, cwd=tmp_path)
        assert "Traceback" not in ours.stderr.decode()
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout)
        if args:
            report = json.loads(want.stdout)
            assert report["allocated-clusters"] == 3072 and want.returncode == 0


def test_check_memory_of_a_preallocated_terabyte(tmp_path):
    """A metadata-preallocated 1 TiB image (libvirt's default layout): 2**24 data clusters, all
    referenced. The computed refcounts take 3 bytes per cluster of the file (48 MiB); the
    check fits in 250 MiB of address space with numpy loaded (170 MiB measured). (Sorted
    arrays of the referenced clusters, 9 bytes each, needed over 420 MiB; inserting into them
    by copies, over 500 MiB; merging them all at once, over 1 GiB.)"""
    img = tmp_path / "prealloc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, 1 << 40)
    want = subprocess.run([QEMU_IMG, "check", "--output=json", img.name], capture_output=True,
                          cwd=tmp_path, check=False)
    assert json.loads(want.stdout)["allocated-clusters"] == 1 << 24
    ours = _limited("check", "--output=json", img.name, cwd=tmp_path)
    assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout), ours.stderr[-300:]


def test_check_allocation_failure_is_a_qcow_error(tmp_path, monkeypatch):
    """Whatever allocation fails inside the check, the caller sees a QcowError."""
    import importlib

    import qcowfast
    check_module = importlib.import_module("qcowfast.check")   # qcowfast.check: the function
    img = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, MiB)
    qemu_io(img, "write -P 1 0 64k")
    assert qcowfast.check(img).exit_code == 0

    def fail(self, *args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(check_module._Computed, "add", fail)
    monkeypatch.setattr(check_module._DenseComputed, "add", fail)
    with pytest.raises(qcowfast.QcowError, match="not enough memory"):
        qcowfast.check(img)


@pytest.mark.parametrize("failure", [MemoryError(), OSError(errno.ENOMEM, "no memory")],
                         ids=["MemoryError", "ENOMEM"])
def test_convert_out_of_memory_is_allocation_failed(tmp_path, monkeypatch, capsys, failure):
    """Memory running out inside a conversion (numpy's MemoryError, or ENOMEM from mmap or a
    read) reaches the caller as AllocationFailed naming the source, the job's result in a
    batch, and one line from the command; nothing is left behind."""
    import importlib

    import qcowfast
    from qcowfast.cli import main
    convert_module = importlib.import_module("qcowfast.convert")
    img = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, MiB)
    qemu_io(img, "write -P 1 0 64k")
    out = tmp_path / "out"
    out.mkdir()

    def fail(*args, **kwargs):
        raise failure
    monkeypatch.setattr(convert_module, "_convert_path", fail)
    with pytest.raises(qcowfast.AllocationFailed, match=f"{img}: not enough memory"):
        qcowfast.convert(img, out / "a.raw")
    result, = qcowfast.convert_many([(img, out / "b.raw")])
    assert isinstance(result, qcowfast.AllocationFailed), result
    capsys.readouterr()
    assert main(["convert", "-q", str(img), str(out / "c.raw")]) == 1
    err = capsys.readouterr().err
    assert err == f"qcowfast: {img}: not enough memory to convert it\n", err
    assert os.listdir(out) == []
    # An OSError that is not ENOMEM stays what it is.
    monkeypatch.setattr(convert_module, "_convert_path",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as caught:
        qcowfast.convert(img, out / "d.raw")
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, qcowfast.QcowError)
