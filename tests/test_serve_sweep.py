"""`qcowfast serve` beside `qemu-nbd -r` on the same image, read by the same real clients.

Regressions found by a differential sweep of both servers (nbdinfo, nbdcopy, qemu-img map,
info and compare over their URIs, raw-socket requests at the export's edges). Each test runs
both servers on Unix sockets in tmp_path and compares what the clients see; every process
has a timeout and is stopped at the end of the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager

import pytest

from qcowfast.serve import NBDServer

TIMEOUT = 30


def run(*argv) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]} {proc.stderr.strip()}"
    return proc


def uri(sock) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextmanager
def qemu_nbd(path, sock, *options):
    """qemu-nbd -r -t serving `path` on the Unix socket `sock` until the block ends."""
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", *options, "-k", str(sock), str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def qcowfast_serve(path, sock, fmt):
    server = NBDServer(path, socket=sock, persistent=True, format=fmt).start()
    try:
        yield sock
    finally:
        server.stop()


def _seen(sock) -> dict:
    """What nbdinfo and qemu-img (over NBD) see of the export on `sock`."""
    (export,) = json.loads(run("nbdinfo", "--json", uri(sock)).stdout)["exports"]
    return {"sizes": {k: export[k] for k in ("export-size", "block_size_minimum",
                                             "block_size_preferred", "block_size_maximum")},
            "map": json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                                  uri(sock)).stdout),
            "info": run("nbdinfo", "--map", uri(sock)).stdout}


def _raw_file(path, size: int, data: list) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, n in data:
            f.seek(offset)
            f.write(b"\xa5" * n)


@pytest.mark.parametrize("size, data", [(1000, [(0, 1000)]),
                                        (2 * 1024 * 1024 + 1000,
                                         [(4096, 5000), (2 * 1024 * 1024 + 500, 500)])],
                         ids=["1000 bytes", "2M+1000 with holes"])
def test_raw_block_sizes_and_map_as_qemu_nbd(tmp_path, size, data):
    """A raw file whose size is no multiple of 512: qemu-nbd's minimum block size is 512
    when the format was probed (raw-format.c raw_refresh_limits(): a probed image is
    read-modify-written below a sector), 1 with -f raw; qemu-img's NBD client rounds its
    block status to it, so `qemu-img map` over the two servers differed at the tail."""
    image = tmp_path / "disk.img"
    _raw_file(image, size, data)
    for fmt in (None, "raw"):
        options = () if fmt is None else ("-f", fmt)
        with qemu_nbd(image, tmp_path / f"q-{fmt}.sock", *options) as sock:
            want = _seen(sock)
        with qcowfast_serve(image, tmp_path / f"f-{fmt}.sock", fmt) as sock:
            got = _seen(sock)
        assert got == want, f"format {fmt}"
