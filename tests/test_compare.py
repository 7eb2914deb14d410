"""``qcowfast compare`` against ``qemu-img compare``, through a real subprocess.

Oracle: ``qemu-img compare`` on the same pair: its exit code and the lines it prints
("Images are identical.", "Content mismatch at offset N!", the size warning, strict mode).
Pairs: every catalogue image against its ``qemu-img convert -O raw`` copy, copies with a byte
changed where this file chooses, qcow2 against qcow2 of other cluster sizes and compression,
images of different sizes. The fast path is checked by counting bytes read: ranges both images
know to be zero are never read.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import qcowfast
from common import QEMU_IMG, qemu_img, qemu_io, run_cli as cli
from conftest import IMAGE_IDS

K = 1024
M = 1024 * 1024
G = 1024 * M


def qemu_compare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, "compare", *map(str, args)], capture_output=True,
                          text=True, check=False)


def both(*args):
    """(exit code, stdout) of qcowfast compare and of qemu-img compare for the same ARGS."""
    ours = cli("compare", *args)
    assert "Traceback" not in ours.stderr, ours.stderr
    qemu = qemu_compare(*args)
    return (ours.returncode, ours.stdout), (qemu.returncode, qemu.stdout)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# --------------------------------------------------------------------------------------------
# The catalogue against qemu-img's raw conversions

#: Images also compared with a changed byte (one per feature family).
MISMATCH_IDS = ["c512-v3-zlib", "c64k-v3-zstd", "c64k-v3-zeroes", "c64k-extl2",
                "c64k-extl2-zlib-backing", "c4k-chain3-short-base", "c64k-raw-backing",
                "c64k-v3-snapshot"]


def _collected(request, name: str) -> list[str]:
    ids = {item.callspec.params["image"] for item in request.session.items
           if getattr(item, "originalname", None) == name and hasattr(item, "callspec")}
    return [i for i in IMAGE_IDS if i in ids]


@pytest.fixture(scope="module")
def catalogue_compares(request, images, tmp_path_factory) -> dict:
    ids = _collected(request, "test_catalogue_image_equals_its_raw_conversion")
    root = tmp_path_factory.mktemp("compare")
    jobs = []
    for image_id in ids:
        path = images.get(image_id).path
        raw = root / f"{image_id}.raw"
        qemu_img("convert", "-O", "raw", path, raw)
        jobs.append((image_id, "same", path, raw))
        if image_id in MISMATCH_IDS:
            changed = root / f"{image_id}.changed.raw"
            shutil.copy(raw, changed)
            rng = random.Random(image_id)
            offset = rng.randrange(raw.stat().st_size)
            flip_byte(changed, offset)
            jobs.append((image_id, offset, path, changed))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda job: both(job[2], job[3]), jobs)
        out: dict = {}
        for (image_id, variant, *_), result in zip(jobs, results):
            out.setdefault(image_id, {})[variant] = result
        return out


def test_catalogue_image_equals_its_raw_conversion(image, catalogue_compares):
    found = catalogue_compares[image.id]
    ours, qemu = found.pop("same")
    assert ours == qemu == (0, "Images are identical.\n")
    for offset, (ours, qemu) in found.items():
        assert ours == qemu
        assert ours == (1, f"Content mismatch at offset {offset // 512 * 512}!\n")


# --------------------------------------------------------------------------------------------
# Pairs made here


@pytest.fixture(scope="module")
def pair(images, tmp_path_factory):
    """A compressed c64k image and the same contents as c4k v2 and as raw."""
    d = tmp_path_factory.mktemp("pair")
    src = images.get("c64k-v3-zlib")
    raw = d / "content.raw"
    qemu_img("convert", "-O", "raw", src.path, raw)
    other = d / "c4k.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compat=0.10",
             raw, other)
    return src.path, other, raw, d


def test_qcow2_against_qcow2(pair):
    a, b, raw, d = pair
    ours, qemu = both(a, b)
    assert ours == qemu == (0, "Images are identical.\n")
    changed = d / "changed.qcow2"
    shutil.copy(b, changed)
    qemu_io(changed, "write -P 0x61 1234567 3")
    ours, qemu = both(a, changed)
    assert ours == qemu == (1, f"Content mismatch at offset {1234567 // 512 * 512}!\n")
    result = qcowfast.compare(changed, a)
    assert not result.identical and result.offset == 1234567 // 512 * 512


def test_sizes_differ(pair):
    a, _, raw, d = pair
    longer = d / "longer.raw"
    longer.write_bytes(raw.read_bytes() + bytes(70000))
    for args in ((a, longer), (longer, a)):
        ours, qemu = both(*args)
        assert ours == qemu == (0, "Warning: Image size mismatch!\nImages are identical.\n")
        ours, qemu = both("-s", *args)
        assert ours == qemu == (1, "Strict mode: Image size mismatch!\n")
    tail = raw.stat().st_size + 66000
    flip_byte(longer, tail)
    ours, qemu = both(a, longer)
    assert ours == qemu
    assert ours == (1, f"Warning: Image size mismatch!\nContent mismatch at offset "
                       f"{tail // 512 * 512}!\n")
    # A raw file whose size is not a multiple of 512 is read as whole sectors; qemu-img
    # reports a difference right at its end when the other image has data there.
    short = d / "short.raw"
    short.write_bytes(raw.read_bytes()[:-5000])
    ours, qemu = both(a, short)
    assert ours == qemu and ours[0] == 1


def test_strict_mode(pair, images):
    a, b, raw, d = pair
    copy = d / "copy.qcow2"
    shutil.copy(a, copy)
    ours, qemu = both("-s", a, copy)
    assert ours == qemu == (0, "Images are identical.\n")
    ours, qemu = both("-s", a, b)                  # compressed against plain clusters
    assert ours == qemu and ours[0] == 1 and "block status mismatch" in ours[1]


def test_forced_formats(pair):
    a, b, raw, d = pair
    ours, qemu = both("-f", "raw", "-F", "qcow2", a, a)
    assert ours == qemu and ours[0] == 1
    ours, qemu = both("-f", "qcow2", "-F", "raw", a, raw)
    assert ours == qemu == (0, "Images are identical.\n")


def test_errors_and_options(pair, tmp_path):
    a, b, raw, d = pair
    proc = cli("compare", a, tmp_path / "missing.raw")
    assert proc.returncode == 2 == qemu_compare(a, tmp_path / "missing.raw").returncode
    assert proc.stderr.startswith("qcowfast: ") and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.qcow2"
    shutil.copy(a, bad)
    with open(bad, "r+b") as f:                      # first L1 entry: reserved bits set
        f.seek(40)
        l1 = int.from_bytes(f.read(8), "big")
        f.seek(l1)
        f.write((0x7F << 56 | 0x10000).to_bytes(8, "big"))
    proc = cli("compare", bad, raw)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    proc = cli("compare", "-q", a, raw)
    assert proc.returncode == 0 and proc.stdout == ""
    proc = cli("compare", "-p", "--force-progress", a, raw)
    assert proc.returncode == 0 and "comparing [" in proc.stderr and "100.0%" in proc.stderr
    text = cli("compare", "--help").stdout
    for option in ("-f", "-F", "-s", "-p", "-q", "--allow-backing-dir"):
        assert option in text


def test_zero_ranges_are_not_read(tmp_path, monkeypatch):
    """1 TiB images with 192 KiB of data: only the data is read, and the answer is qemu's."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "1T")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", b, "1T")
    for img in (a, b):
        qemu_io(img, "write -P 0x11 5G 64k", "write -P 0x22 700G 128k", "write -z 900G 64M")
    from qcowfast.compare import _QcowSource
    read = []
    original = _QcowSource.readinto

    def counting(self, offset, buf):
        read.append(len(buf))
        return original(self, offset, buf)

    monkeypatch.setattr(_QcowSource, "readinto", counting)
    t0 = time.monotonic()
    result = qcowfast.compare(a, b)
    assert result.identical
    # Each side reads whole clusters it has data in: 192 KiB (a) and 2 x 2 MiB (b).
    assert sum(read) <= 2 * (192 * K + 4 * M)
    assert time.monotonic() - t0 < 10
    qemu_io(b, "write -P 0x23 700G 1")
    read.clear()
    result = qcowfast.compare(a, b)
    assert (result.identical, result.offset) == (False, 700 * G)
    ours, qemu = both(a, b)
    assert ours == qemu == (1, f"Content mismatch at offset {700 * G}!\n")
