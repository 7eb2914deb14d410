"""The path race (issue 10): a symlink swapped between the policy check and the read.

Whoever can write to an image's directory can flip a symlink named by the image between a
file inside the directory and one outside. A thread flips it continuously while the test opens
and reads in a loop: every open either reads the inside file or fails with a QcowError; the
outside file is never read. The outside files hold a distinct fill byte (and, for `info`, a
distinct virtual size), written by qemu-io, so a single leaked read is seen.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import qcowfast

from common import qemu_img, qemu_io

M = 1 << 20
INSIDE, OUTSIDE = 0x11, 0x99
DURATION = 1.5            # seconds of opening per test
MAX_OPENS = 3000


def _image(path: Path, fmt: str, fill: int, size: str = "1M") -> Path:
    qemu_img("create", "-q", "-f", fmt, path, size)
    qemu_io(path, f"write -P {fill:#x} 0 64k", fmt=fmt)
    return path


class Flipper(threading.Thread):
    """Points `link` alternately at `a` and `b`: atomically (rename) or with a gap (unlink)."""

    def __init__(self, link: Path, a: str, b: str, atomic: bool):
        super().__init__(daemon=True)
        self.link, self.targets, self.atomic = link, (a, b), atomic
        self.stop = threading.Event()
        self.flips = 0

    def run(self):
        tmp = self.link.with_name(self.link.name + ".new")
        while not self.stop.is_set():
            target = self.targets[self.flips % 2]
            if self.atomic:
                os.symlink(target, tmp)
                os.replace(tmp, self.link)
            else:
                try:
                    os.unlink(self.link)
                except FileNotFoundError:
                    pass
                os.symlink(target, self.link)
            self.flips += 1


def _race(link: Path, inside: str, outside: str, attempt, atomic: bool = True) -> dict:
    """Run `attempt()` in a loop while the link flips; return counts by outcome."""
    counts = {"inside": 0, "refused": 0}
    flipper = Flipper(link, inside, outside, atomic)
    flipper.start()
    try:
        deadline = time.monotonic() + DURATION
        n = 0
        while time.monotonic() < deadline and n < MAX_OPENS:
            n += 1
            try:
                outcome = attempt()
            except qcowfast.QcowError as exc:
                counts["refused"] += 1
                counts.setdefault("first_refusal", str(exc))
                continue
            counts[outcome] = counts.get(outcome, 0) + 1
    finally:
        flipper.stop.set()
        flipper.join()
    assert flipper.flips > 10, "the flipper thread did not run"
    return counts


@pytest.fixture
def layout(tmp_path):
    """img/ holding top images and inside files; out/ holding the outside files."""
    img, out = tmp_path / "img", tmp_path / "out"
    img.mkdir(), out.mkdir()
    return img, out


def _fill_seen(data: bytes) -> str:
    return {INSIDE: "inside", OUTSIDE: "OUTSIDE"}.get(data[0], f"other {data[0]:#x}")


@pytest.mark.parametrize("fmt,atomic", [("qcow2", True), ("raw", True), ("qcow2", False)])
def test_backing_symlink_swap_never_reads_outside(layout, fmt, atomic):
    img, out = layout
    _image(img / "inside.img", fmt, INSIDE)
    _image(out / "outside.img", fmt, OUTSIDE)
    os.symlink("inside.img", img / "link.img")
    top = img / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "link.img", "-F", fmt, top, "1M")

    def attempt():
        with qcowfast.open(top) as image:
            return _fill_seen(image.read(0, 4))

    counts = _race(img / "link.img", "inside.img", "../out/outside.img", attempt, atomic)
    print(counts)
    assert set(counts) <= {"inside", "refused", "first_refusal"}, counts
    assert counts["inside"] > 0, counts


def test_data_file_symlink_swap_never_reads_outside(layout):
    img, out = layout
    (img / "inside.raw").write_bytes(bytes([INSIDE]) * (64 * 1024) + bytes(M - 64 * 1024))
    (out / "outside.raw").write_bytes(bytes([OUTSIDE]) * M)
    os.symlink("inside.raw", img / "data.raw")
    top = img / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", top,
             "1M", cwd=img)
    qemu_io("top.qcow2", f"write -P {INSIDE:#x} 0 64k", cwd=img)

    def attempt():
        with qcowfast.open(top) as image:
            return _fill_seen(image.read(0, 4))

    counts = _race(img / "data.raw", "inside.raw", "../out/outside.raw", attempt)
    print(counts)
    assert set(counts) <= {"inside", "refused", "first_refusal"}, counts
    assert counts["inside"] > 0, counts


def test_info_chain_symlink_swap_never_describes_outside(layout):
    img, out = layout
    _image(img / "inside.qcow2", "qcow2", INSIDE, "1M")
    _image(out / "outside.qcow2", "qcow2", OUTSIDE, "3M")
    os.symlink("inside.qcow2", img / "link.qcow2")
    top = img / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "link.qcow2", "-F", "qcow2", top, "1M")

    def attempt():
        chain = qcowfast.info(top, backing_chain=True)
        return {M: "inside", 3 * M: "OUTSIDE"}[chain[1]["virtual-size"]]

    counts = _race(img / "link.qcow2", "inside.qcow2", "../out/outside.qcow2", attempt)
    print(counts)
    assert set(counts) <= {"inside", "refused", "first_refusal"}, counts
    assert counts["inside"] > 0, counts


def test_allowed_symlink_flip_inside_keeps_working(layout):
    """Flipping between two inside files never refuses: symlinks inside stay legal."""
    img, _ = layout
    _image(img / "a.qcow2", "qcow2", INSIDE)
    _image(img / "b.qcow2", "qcow2", INSIDE)
    os.symlink("a.qcow2", img / "link.qcow2")
    top = img / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "link.qcow2", "-F", "qcow2", top, "1M")

    def attempt():
        with qcowfast.open(top) as image:
            return _fill_seen(image.read(0, 4))

    counts = _race(img / "link.qcow2", "a.qcow2", "b.qcow2", attempt)
    assert counts == {"inside": counts["inside"], "refused": 0}, counts
