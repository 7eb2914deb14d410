"""Signals during `qcowfast convert` leave no temporary file behind (issue 10, item 9).

A conversion is interrupted by SIGTERM, SIGHUP or SIGINT once its temporary output exists and
holds data. The process must then remove the temporary file and end by that signal, as qemu-img
(which has no handler) ends: killed by it, which a shell reports as status 128 + N. qemu-img
itself leaves its partial output behind; qcowfast publishes nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import qemu_img

M = 1 << 20


@pytest.fixture(scope="module")
def allocated_image(tmp_path_factory):
    """1 GiB qcow2 whose clusters are all allocated (preallocation=metadata): -S 0 writes
    every byte, so a conversion runs for seconds."""
    path = tmp_path_factory.mktemp("signals") / "allocated.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, 1024 * M)
    return path


def _tmp_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".qcowfast-tmp"))


def _wait_for_output(directory, proc, timeout=60.0) -> None:
    """Wait until the temporary output exists and has data written into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for name in _tmp_files(directory):
            try:
                if os.stat(os.path.join(directory, name)).st_blocks:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_removes_temporary_output(allocated_image, tmp_path, signum):
    dst = tmp_path / "out.raw"
    # The child gets the signal's default disposition, whatever this run inherited (under
    # nohup SIGHUP is ignored, and qcowfast leaves an inherited SIG_IGN alone: see below).
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert", "-q", "-S", "0",
                             allocated_image, dst], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        _wait_for_output(tmp_path, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signum, (proc.returncode, err)
    assert b"Traceback" not in err, err
    assert _tmp_files(tmp_path) == [] and not dst.exists(), os.listdir(tmp_path)


def test_signal_keeps_an_existing_destination(allocated_image, tmp_path):
    """The file being replaced survives an interrupted conversion untouched."""
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"old contents")
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert", "-q", "-S", "0",
                             allocated_image, dst], stderr=subprocess.PIPE)
    try:
        _wait_for_output(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err
    assert dst.read_bytes() == b"old contents"
    assert _tmp_files(tmp_path) == []


def test_qemu_img_is_killed_by_the_signal(allocated_image, tmp_path):
    """The reference behaviour: qemu-img installs no handler, so SIGTERM kills it (-15)."""
    dst = tmp_path / "out.raw"
    proc = subprocess.Popen(["qemu-img", "convert", "-S", "0", "-O", "raw", allocated_image,
                             dst])
    try:
        deadline = time.monotonic() + 60
        while not (dst.exists() and dst.stat().st_blocks) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_AT_START = ("import os, signal, time, {module}\n"
             "print({{signal.SIG_DFL: 'default', signal.SIG_IGN: 'ignored'}}"
             ".get(signal.getsignal(signal.SIGINT)), flush=True)\n"
             "os.kill(os.getpid(), signal.SIGINT)\n"
             "time.sleep(30)\n")


def test_ctrl_c_during_start_up_ends_quietly():
    """Ctrl-C before the command line has installed its handlers (while modules import) ends
    the process by SIGINT, as it ends qemu-img, with no traceback: the entry point restores
    the default action first thing."""
    proc = subprocess.run([sys.executable, "-c", _AT_START.format(module="qcowfast._entry")],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout == "default\n", proc
    assert proc.returncode == -signal.SIGINT and proc.stderr == "", proc


def test_ctrl_c_ignored_by_the_caller_stays_ignored():
    """An inherited SIG_IGN (nohup, a background job of a script) is left alone."""
    proc = subprocess.run([sys.executable, "-c", _AT_START.format(module="qcowfast._entry")
                           .replace("time.sleep(30)", "print('alive')")],
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and proc.stdout == "ignored\nalive\n", proc


_CTRL_C_WHILE_CLI_IMPORTS = """
import os, runpy, signal, sys
class CtrlC:
    def find_spec(self, name, path, target=None):
        if name == "qcowfast.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ["qcowfast", "--version"]
{run}
"""


@pytest.mark.parametrize("run", [
    "runpy.run_module('qcowfast', run_name='__main__', alter_sys=True)",
    f"runpy.run_path({str(Path(sys.executable).with_name('qcowfast'))!r}, run_name='__main__')",
], ids=["python -m qcowfast", "console script"])
def test_ctrl_c_while_the_command_line_imports(run):
    """Both ways of starting the command line (the installed script's target is what
    pyproject.toml names) take the quiet start: Ctrl-C while the command-line module is
    being imported ends the process by SIGINT without a traceback."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_CLI_IMPORTS.format(run=run)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT and proc.stderr == "", proc
