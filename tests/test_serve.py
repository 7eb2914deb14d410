"""`qcowfast serve` read by real NBD clients: qemu-img, qemu-io, nbdcopy and nbdinfo (libnbd).

Bytes are judged against `qemu-img convert -O raw` of the image, allocation against
`nbdinfo --map` of `qemu-nbd -r` serving the same image. Servers run in a thread (the Python
API) or as `python -m qcowfast serve` subprocesses; every one is stopped by a finalizer, every
wait has a timeout, and only Unix sockets in tmp_path or 127.0.0.1 are used.
"""
from __future__ import annotations

import json
import re
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qcowfast
from common import assert_same_bytes, qemu_img, qemu_info, qemu_io, reference_raw
from qcowfast.serve import NBDServer

TIMEOUT = 60


def run(*argv, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]} {proc.stderr.strip()}"
    return proc


def unix_uri(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.fixture
def served(tmp_path):
    """served(path, **kw) -> a started in-thread NBDServer on a Unix socket in tmp_path."""
    servers = []

    def start(path, **kw):
        kw.setdefault("socket", tmp_path / f"s{len(servers)}.sock")
        kw.setdefault("persistent", True)
        server = NBDServer(path, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def _terminate(proc: subprocess.Popen) -> None:
    """End a server process (SIGTERM, then SIGKILL after 10 s) and close its stderr pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


def _listening(uri: str) -> bool:
    """Whether a socket listens at `uri` (nbd+unix:///...?socket=PATH or nbd://127.0.0.1:PORT/),
    from /proc/net: connecting to find out would be a client, and a server without -t ends
    when its last client leaves."""
    if "socket=" in uri:
        path = uri.split("socket=", 1)[1]
        with open("/proc/net/unix") as f:        # Flags 00010000: __SO_ACCEPTCON (listening)
            return any(line.split()[-1] == path and line.split()[3] == "00010000"
                       for line in f.readlines()[1:] if len(line.split()) == 8)
    port = int(uri.rsplit(":", 1)[1].strip("/"))
    with open("/proc/net/tcp") as f:             # st 0A: LISTEN
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:])


class CliServer:
    """`python -m qcowfast serve ...` as a subprocess; the URI is read from its stderr, or,
    for a server that prints nothing (run as qemu-nbd), given as `uri` and waited for."""

    def __init__(self, *args, command=(sys.executable, "-m", "qcowfast", "serve"), uri=None):
        self.proc = subprocess.Popen([*map(str, command), *map(str, args)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.uri = self._wait_ready() if uri is None else self._wait_listening(uri)

    def _wait_listening(self, uri: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            if _listening(uri):
                return uri
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{uri}: no server listening")

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
                if " on nbd" in line:
                    return line.rsplit(" on ", 1)[1].strip()
                if not line:
                    break
        self.stop()
        raise AssertionError(f"qcowfast serve did not start: {line}")

    def wait(self, timeout=20) -> int:
        return self.proc.wait(timeout)

    def stop(self):
        _terminate(self.proc)


@pytest.fixture
def cli_server():
    started = []

    def start(*args):
        server = CliServer(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class QemuNbd:
    """qemu-nbd -r -t serving an image on a Unix socket: the reference server."""

    def __init__(self, path, sock: Path, *options: str, fmt: str = "qcow2"):
        self.sock = sock
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", fmt, *options, "-k",
                                      str(sock), str(path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-nbd did not start")
            time.sleep(0.02)

    def stop(self):
        _terminate(self.proc)


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map` as (offset, length, type) with adjacent equal types merged."""
    out: list[list[int]] = []
    for line in run("nbdinfo", "--map", uri).stdout.splitlines():
        offset, length, kind = (int(w) for w in line.split()[:3])
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += length
        else:
            out.append([offset, length, kind])
    return [tuple(e) for e in out]


# -- bytes ----------------------------------------------------------------------------------

BYTE_IMAGES = ("c64k-v3-zlib", "c4k-v2-zlib", "c64k-v3-zstd", "c64k-extl2", "c32k-extl2-zstd",
               "c64k-extl2-zlib-backing", "c4k-chain3-short-base", "c2m-chain3-mixed-clusters",
               "c64k-raw-backing", "c64k-v3-snapshot", "c64k-v3-tiny")


@pytest.mark.images(ids=BYTE_IMAGES)
def test_qemu_img_and_nbdcopy_read_identical_bytes(image, served, tmp_path):
    want = reference_raw(image.path)
    server = served(image.path)
    out = tmp_path / "qemu-img.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert_same_bytes(out.read_bytes(), want, f"qemu-img convert from NBD, {image.id}")
    out = tmp_path / "nbdcopy.raw"
    run("nbdcopy", server.uri, out)
    assert_same_bytes(out.read_bytes(), want, f"nbdcopy from NBD, {image.id}")


def test_snapshot_export_matches_qemu_img(images, served, tmp_path):
    image = images.get("c64k-v3-snapshot")
    for name in ("s1", "s2"):
        ref = tmp_path / f"{name}.raw"
        qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", image.path, ref)
        server = served(image.path, snapshot=name)
        out = tmp_path / f"{name}.nbd.raw"
        run("nbdcopy", server.uri, out)
        assert_same_bytes(out.read_bytes(), ref.read_bytes(), f"snapshot {name} over NBD")


@pytest.fixture(scope="module")
def pattern_image(tmp_path_factory):
    """A compressed 4 MiB image with known fills, made by qemu-io and qemu-img convert -c."""
    d = tmp_path_factory.mktemp("pattern")
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "4M")
    qemu_io(plain, "write -P 0x5a 0 1M", "write -P 0x11 1M 512k", "write -P 0x77 3M 64k")
    out = d / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, out)
    return out


def test_qemu_io_reads_patterns(pattern_image, served):
    server = served(pattern_image)
    proc = run("qemu-io", "-r", "-f", "raw",
               "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x11 1M 512k",
               "-c", "read -P 0 1536k 1536k", "-c", "read -P 0x77 3M 64k",
               "-c", "read -P 0x5a 1000 3000", "-c", "read -P 0x77 3150000 10000",
               "-c", "read -P 0 4128768 65536", server.uri)
    out = proc.stdout + proc.stderr
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert out.count("read ") == 7, out


def test_nbdinfo_json_describes_a_read_only_export(images, served, tmp_path):
    """Read-only, multi-conn, and the features qemu-nbd -r -e 0 advertises: FLUSH, FUA and
    CACHE too (they have no effect on a read-only export; they were not advertised)."""
    image = images.get("c64k-v3-zlib")
    server = served(image.path, export_name="disk0")
    info = json.loads(run("nbdinfo", "--json", unix_uri(server.address, "disk0")).stdout)
    (export,) = info["exports"]
    assert info["structured"] is True
    assert export["export-name"] == "disk0"
    assert export["export-size"] == qemu_info(image.path)["virtual-size"]
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True
    assert export["can_df"] is True
    for feature in ("can_trim", "can_zero", "can_fast_zero"):
        assert export[feature] is False, feature
    reference = QemuNbd(image.path, tmp_path / "qemu-nbd.sock", "-e", "0")
    try:
        (ref,) = json.loads(run("nbdinfo", "--json", unix_uri(reference.sock)).stdout)["exports"]
    finally:
        reference.stop()
    features = sorted(k for k in ref if k.startswith(("can_", "is_")))
    assert len(features) >= 10
    assert {k: export[k] for k in features} == {k: ref[k] for k in features}
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == image.cluster_size
    assert export["block_size_maximum"] == 32 * 1024 * 1024


def test_unknown_export_name_is_refused(images, served):
    server = served(images.get("c64k-v3").path, export_name="disk0")
    listed = run("nbdinfo", "--list", "--json", server.uri).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["disk0"]
    proc = subprocess.run(["nbdinfo", "--size", unix_uri(server.address, "other")],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "other" in proc.stderr


# -- allocation -----------------------------------------------------------------------------

MAP_IMAGES = ("c64k-v3-zeroes", "c4k-v3-zeroes", "c64k-v2-zeroes", "c512-v3-sparse",
              "c64k-extl2", "c64k-chain2-zlib-base", "c4k-chain3-short-base",
              "c64k-v2-chain2-long-base", "c64k-raw-backing", "c64k-v3-empty", "c2m-v3-zlib")


@pytest.mark.images(ids=MAP_IMAGES)
def test_nbdinfo_map_matches_qemu_nbd(image, served, tmp_path):
    reference = QemuNbd(image.path, tmp_path / "qemu-nbd.sock")
    try:
        want = nbd_map(unix_uri(reference.sock))
    finally:
        reference.stop()
    server = served(image.path)
    assert nbd_map(server.uri) == want


def test_huge_sparse_chains_map_as_qemu_nbd_maps_them(served, tmp_path):
    """Ranges no layer has an L2 table for are answered from the L1 tables, a whole request
    in one extent as qemu-nbd answers (nbdinfo maps 64 TiB in 4 GiB requests); ranges that
    reach a table, a raw backing file or a shorter backing file are answered as before."""
    from qcowfast.serve import ImageExport
    T, G = 1 << 40, 1 << 30
    empty = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", empty, 64 * T)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 8 * T)
    qemu_io(base, f"write -P 1 {G} 64k", f"write -P 2 {8 * T - 64 * 1024} 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, 16 * T)
    qemu_io(top, f"write -P 3 {12 * T} 64k", f"write -z {2 * G} 64k")
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * G)
        f.seek(G + 4096)
        f.write(b"x" * 4096)
    over_raw = tmp_path / "over-raw.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", over_raw, 4 * T)
    for path in (empty, top, over_raw):
        reference = QemuNbd(path, tmp_path / "qemu-nbd.sock")
        try:
            want = nbd_map(unix_uri(reference.sock))
        finally:
            reference.stop()
        server = served(path)
        assert nbd_map(server.uri) == want, path.name
    with qcowfast.open(empty) as img:
        assert ImageExport(img).allocation(5 * T, 4 * G, 100) == [(4 * G, 3)]
    with qcowfast.open(top) as img:
        export = ImageExport(img)
        assert export.allocation(13 * T, 4 * G, 100) == [(4 * G, 3)]
        assert export.allocation(12 * T, 4 * G, 100) == [(64 * 1024, 0), (4 * G - 64 * 1024, 3)]


def test_preallocated_layers_map_as_qemu_nbd_maps_them(served, tmp_path):
    """Data clusters of a metadata-preallocated layer over holes of its file are ZERO (not
    HOLE: they are allocated), as qemu-nbd reports them, so nbdcopy does not read them."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", base, "256M")
    qemu_io(base, "write -P 1 8M 1M", "write -P 2 100M 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "256M")
    qemu_io(top, "write -P 3 9M 64k", "write -z 120M 1M")
    for path in (base, top):
        reference = QemuNbd(path, tmp_path / "qemu-nbd.sock")
        try:
            want = nbd_map(unix_uri(reference.sock))
        finally:
            reference.stop()
        assert sum(e[1] for e in want if e[2] == 2) > 200 << 20, want
        server = served(path)
        assert nbd_map(server.uri) == want, path.name


def test_block_status_holes_read_as_zeros(images, served, tmp_path):
    # Independent of qemu-nbd: every range reported hole,zero must read as zeros.
    image = images.get("c64k-v3-zeroes")
    want = reference_raw(image.path)
    server = served(image.path)
    extents = nbd_map(server.uri)
    assert sum(e[1] for e in extents) == len(want)
    assert {e[2] for e in extents} == {0, 3}
    for offset, length, kind in extents:
        if kind == 3:
            assert want[offset:offset + length].count(0) == length


# -- the command line -----------------------------------------------------------------------

def test_cli_serves_until_the_last_client_leaves(images, cli_server, tmp_path):
    image = images.get("c64k-chain2-zlib-base")
    sock = tmp_path / "nbd.sock"
    server = cli_server(image.path, "--socket", sock)
    assert server.uri == unix_uri(sock)
    out = tmp_path / "out.raw"
    run("nbdcopy", "--connections=4", server.uri, out)
    assert_same_bytes(out.read_bytes(), reference_raw(image.path), "nbdcopy from the CLI")
    assert server.wait() == 0            # not persistent: exits after the last client
    assert not sock.exists()


def test_cli_sigterm_removes_the_socket(images, cli_server, tmp_path):
    image = images.get("c64k-v3-snapshot")
    sock = tmp_path / "nbd.sock"
    server = cli_server(image.path, "-k", sock, "--persistent", "-l", "snapshot.name=s1")
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", image.path, ref)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert_same_bytes(out.read_bytes(), ref.read_bytes(), "snapshot s1 from the CLI")
    run("nbdinfo", "--size", server.uri)          # persistent: still serving
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not sock.exists()


def test_cli_tcp_listens_on_loopback(images, cli_server, tmp_path):
    image = images.get("c64k-v3-zstd")
    server = cli_server(image.path, "--port", "0", "-x", "d")
    assert server.uri.startswith("nbd://127.0.0.1:") and server.uri.endswith("/d")
    size = int(run("nbdinfo", "--size", server.uri).stdout)
    assert size == qemu_info(image.path)["virtual-size"]
    assert server.wait() == 0


def test_cli_reports_an_unopenable_image_in_one_line(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(504))     # v3, cluster_bits 0
    proc = subprocess.run([sys.executable, "-m", "qcowfast", "serve", str(bad), "-k",
                           str(tmp_path / "s.sock")], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("qcowfast: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "s.sock").exists()


def test_cli_socket_wins_over_bind_and_port(images, cli_server, tmp_path):
    """qemu-nbd -k with -b/-p serves on the socket and ignores the TCP address."""
    image = images.get("c64k-v3")
    sock = tmp_path / "s"
    server = cli_server(image.path, "-k", sock, "-b", "127.0.0.1", "-p", "0")
    assert server.uri == unix_uri(sock)
    assert int(run("nbdinfo", "--size", server.uri).stdout) == qemu_info(image.path)[
        "virtual-size"]


def _serve_fails(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "qcowfast", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.rstrip("\n")


def test_cli_names_the_address_it_cannot_listen_on(images, tmp_path):
    image = images.get("c64k-v3").path
    sock = tmp_path / "missing" / "x.sock"
    assert _serve_fails(image, "-k", sock) == (
        f"qcowfast: serve: cannot listen on {sock}: No such file or directory")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _serve_fails(image, "-p", port) == (
            f"qcowfast: serve: cannot listen on 127.0.0.1:{port}: Address already in use")
    # TEST-NET-1 (RFC 5737) is no local address: bind fails, nothing is sent anywhere.
    assert _serve_fails(image, "-b", "192.0.2.1", "-p", 0) == (
        "qcowfast: serve: cannot listen on 192.0.2.1:0: Cannot assign requested address")


# -- the Python API -------------------------------------------------------------------------

def test_api_default_socket_and_non_persistent_exit(images):
    image = images.get("c64k-v3-zlib")
    with NBDServer(image.path) as server:
        assert server.uri.startswith("nbd+unix:///?socket=")
        sock = Path(server.address)
        assert sock.exists() and oct(sock.parent.stat().st_mode & 0o777) == "0o700"
        # A client that never negotiates does not end the server; one that does, does.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            assert s.recv(8) == b"NBDMAGIC"
        assert not server.wait(0.3)
        run("nbdinfo", "--size", server.uri)
        assert server.wait(10)
    assert not sock.exists() and not sock.parent.exists()


def test_qcowfast_serve_blocks_until_done(images, tmp_path):
    image = images.get("c4k-v3")
    sock = tmp_path / "s.sock"
    seen, clients = [], []

    def client(server):
        seen.append(server.uri)
        clients.append(subprocess.Popen(["nbdinfo", "--size", server.uri],
                                        stdout=subprocess.DEVNULL))

    t = threading.Thread(target=qcowfast.serve, args=(image.path,),
                         kwargs={"socket": sock, "ready": client}, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert seen == [unix_uri(sock)]
    assert clients[0].wait(10) == 0
    assert not sock.exists()


def test_shared_caps_connections(images, served):
    server = served(images.get("c64k-v3").path, shared=1)
    first = socket.socket(socket.AF_UNIX)
    second = socket.socket(socket.AF_UNIX)
    try:
        first.settimeout(5)
        first.connect(server.address)
        assert first.recv(8) == b"NBDMAGIC"
        second.settimeout(0.5)
        second.connect(server.address)            # waits in the backlog
        with pytest.raises(socket.timeout):
            second.recv(8)
        first.close()
        second.settimeout(5)
        assert second.recv(8) == b"NBDMAGIC"
    finally:
        first.close()
        second.close()


def test_path_policy_applies(images, served, tmp_path):
    base = images.get("c64k-v3-zlib").path
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    elsewhere = tmp_path / "not-a-dir-of-base"
    elsewhere.mkdir()
    with pytest.raises(qcowfast.QcowError):
        served(top, socket=tmp_path / "refused.sock")
    assert not (tmp_path / "refused.sock").exists()
    server = served(top, backing_dirs=[base.parent])
    out = tmp_path / "out.raw"
    run("nbdcopy", server.uri, out)
    assert_same_bytes(out.read_bytes(), reference_raw(base), "backing file over NBD")


def test_existing_file_at_socket_path_is_not_replaced(images, tmp_path):
    path = tmp_path / "precious"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        NBDServer(images.get("c64k-v3").path, socket=path).start()
    assert path.read_bytes() == b"keep"
    assert os.path.exists(path)


def test_api_errors_name_the_socket_and_the_argument(images, tmp_path):
    image = images.get("c64k-v3").path
    sock = tmp_path / "missing" / "x.sock"
    with pytest.raises(FileNotFoundError, match=re.escape(f"cannot listen on {sock}: ")):
        NBDServer(image, socket=sock).start()
    with pytest.raises(TypeError, match="export_name must be a str"):
        NBDServer(image, export_name=5)


# -- qemu-nbd's command line (found by red-teaming against qemu-nbd 7.2) ----------------------

@pytest.fixture(scope="module")
def snap_names(tmp_path_factory) -> Path:
    """Snapshot id 1 named "2", id 2 named "x": selectors that mean different snapshots."""
    d = tmp_path_factory.mktemp("nbd-snapshots")
    img = d / "sn.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    for pattern, name in ((0xa1, "2"), (0xa2, "x")):
        qemu_io(img, f"write -P {pattern} 0 64k")
        qemu_img("snapshot", "-c", name, img)
    qemu_io(img, "write -P 0xa3 0 64k")
    return img


@pytest.mark.parametrize("selector", ["snapshot.name=2", "snapshot.id=2", "2", "x",
                                      "snapshot.id=1,snapshot.name=2", "snapshot.id=x"])
def test_cli_load_snapshot_selects_as_qemu_nbd(snap_names, tmp_path, selector):
    """-l takes qemu-img's snapshot syntax (it used to drop the snapshot.* prefix and look the
    rest up as an id or a name: snapshot.name=2 served snapshot id 2)."""
    outs = []
    for tool in ("qemu-nbd", "qcowfast"):
        sock = tmp_path / f"{tool}.sock"
        if tool == "qemu-nbd":
            argv = ["qemu-nbd", "-r", "-t", "-k", sock, "-l", selector, snap_names]
        else:
            argv = [sys.executable, "-m", "qcowfast", "serve", "-t", "-k", sock, "-l",
                    selector, snap_names]
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is not None:
                outs.append(("failed", proc.returncode))
                continue
            out = tmp_path / f"{tool}.raw"
            copy = subprocess.run(["nbdcopy", unix_uri(sock), str(out)], capture_output=True,
                                  timeout=60)
            if copy.returncode:
                # qemu-nbd listens before it loads the snapshot, and leaves its socket behind
                # when that fails: a refused connection then means the server has ended.
                try:
                    outs.append(("failed", proc.wait(timeout=20)))
                except subprocess.TimeoutExpired:
                    raise AssertionError((tool, copy.stderr)) from None
                continue
            outs.append(("served", out.read_bytes()))
        finally:
            _terminate(proc)
    assert outs[0] == outs[1], (selector, [o[0] for o in outs])


def test_cli_one_connection_advertises_no_multi_conn(images, cli_server, tmp_path):
    """-e 1: no multi-conn (nbdcopy would open a second connection and wait for ever);
    -e 0 is no limit, as in qemu-nbd."""
    image = images.get("c64k-v3-zlib")
    want = reference_raw(image.path)
    server = cli_server(image.path, "-e", "1", "-k", tmp_path / "one.sock")
    info = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert info["can_multi_conn"] is False
    server = cli_server(image.path, "-e", "1", "-k", tmp_path / "one-copy.sock")
    run("nbdcopy", server.uri, tmp_path / "one.raw")
    assert_same_bytes((tmp_path / "one.raw").read_bytes(), want, "nbdcopy, -e 1")
    server = cli_server(image.path, "-t", "-e", "0", "-k", tmp_path / "any.sock")
    holders = [subprocess.Popen(["qemu-io", "-r", "-f", "raw", server.uri], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in range(10)]
    try:
        for h in holders:                 # ten clients connected at once, all served
            h.stdin.write("read 0 512\n")
            h.stdin.flush()
            assert "read 512/512" in h.stdout.readline()
    finally:
        for h in holders:
            h.stdin.close()
            h.wait(TIMEOUT)
            h.stdout.close()


def test_cli_fork_pid_file_description_and_ignored_options(images, tmp_path):
    """--fork returns once the server listens; --pid-file names it and goes with it; -D is the
    description; options without meaning for a read-only export are accepted; SIGHUP ends
    the server cleanly (status 0), as qemu-nbd."""
    image = images.get("c64k-v3")
    sock, pid_file = tmp_path / "f.sock", tmp_path / "pid"
    run(sys.executable, "-m", "qcowfast", "serve", "-r", "-t", "--fork", "--pid-file",
        pid_file, "-k", sock, "-D", "my disk", "-e", "0x2", "--cache=none", "--aio=threads",
        "--detect-zeroes=on", "--discard=unmap", "-s", "--object", "secret,id=a,data=b",
        image.path)
    pid = int(pid_file.read_text())
    try:
        info = json.loads(run("nbdinfo", "--json", unix_uri(sock)).stdout)["exports"][0]
        assert info["description"] == "my disk" and info["can_multi_conn"] is True
    finally:
        os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while (pid_file.exists() or sock.exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_file.exists() and not sock.exists()
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "serve", "-t", "-k",
                             tmp_path / "h.sock", image.path], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "h.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("option", [["--image-opts"], ["-o", "512"],
                                    ["-c", "/dev/nbd0"], ["--tls-creds", "tls0"]])
def test_cli_refuses_what_it_lacks_by_name(images, tmp_path, option):
    message = _serve_fails(*option, "-k", tmp_path / "s", images.get("c64k-v3").path)
    assert option[0] in message and "not supported" in message


@pytest.mark.parametrize("option", [["-A"], ["--allocation-depth"], ["-B", "b0"],
                                    ["--bitmap=b0"]])
def test_cli_allocation_depth_and_bitmap_options_as_qemu_nbd(images, tmp_path, option):
    """-A and -B (once refused by name) do what qemu-nbd's do: -A offers one more context;
    -B of a bitmap the image lacks fails with qemu-nbd's line (tests/test_serve_contexts.py
    compares the contexts' contents)."""
    image = images.get("c64k-v3").path
    if option[0].startswith(("-A", "--alloc")):
        ref = QemuNbd(image, tmp_path / "q.sock", *option)
        try:
            want = run("nbdinfo", "--list", "--json", unix_uri(tmp_path / "q.sock")).stdout
        finally:
            ref.stop()
        server = CliServer(*option, "-k", tmp_path / "c.sock", image)
        try:
            got = run("nbdinfo", "--list", "--json", server.uri).stdout
        finally:
            server.stop()
        contexts = json.loads(want)["exports"][0]["contexts"]
        assert json.loads(got)["exports"][0]["contexts"] == contexts
        assert "qemu:allocation-depth" in contexts
        return
    ref = subprocess.run(["qemu-nbd", "-r", "-f", "qcow2", *option, "-k", tmp_path / "q.sock",
                          image], capture_output=True, text=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert ref.returncode == 1
    message = _serve_fails(*option, "-k", tmp_path / "s", image)
    assert message == ref.stderr.rstrip("\n").replace("qemu-nbd:", "qcowfast:")


def test_image_is_locked_while_served(images, served, tmp_path):
    """As qemu-nbd: while the image is served, a QEMU cannot open it (or its backing file)
    for writing and change what clients read; readers still can."""
    image = images.get("c4k-chain3-short-base")
    top = tmp_path / "chain"
    top.mkdir()
    for f in Path(image.path).parent.iterdir():
        if f.suffix == ".qcow2":
            (top / f.name).write_bytes(f.read_bytes())
    path = top / Path(image.path).name
    server = served(path)
    for target in [path, *[p for p in top.iterdir() if p != path]]:
        proc = subprocess.run(["qemu-io", "-c", "write -P 0x77 0 4k", target],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode != 0 and '"write" lock' in proc.stderr, (target, proc)
    run("qemu-io", "-r", "-c", "read 0 4k", path)
    server.stop()
    run("qemu-io", "-c", "write -P 0x77 0 4k", path)


@pytest.mark.parametrize("case", ["raw", "raw-backing"])
def test_raw_holes_are_holes_as_in_qemu_nbd(tmp_path, served, case):
    raw = tmp_path / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(10 * 1024 * 1024)
        f.seek(5 * 1024 * 1024)
        f.write(b"hello")
    path, fmt = raw, "raw"
    if case == "raw-backing":
        path, fmt = tmp_path / "over.qcow2", "qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", path, cwd=tmp_path)
        qemu_io(path, "write -P 1 1M 64k")
    reference = QemuNbd(path, tmp_path / "qemu-nbd.sock", fmt=fmt)
    try:
        want = nbd_map(unix_uri(reference.sock))
    finally:
        reference.stop()
    assert nbd_map(served(path).uri) == want
    assert {kind for _, _, kind in want} == {0, 3}


# -- qemu-nbd's command line, compared -------------------------------------------------------

def _qemu_nbd_fails(*args) -> str:
    """qemu-nbd -r ARGS, expected to fail at once: its one line of stderr, "qemu-nbd: " made
    "qcowfast: " (qcowfast serve prints the same messages under its own name)."""
    proc = subprocess.run(["qemu-nbd", "-r", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("qemu-nbd: "), proc.stderr
    return "qcowfast: " + proc.stderr.rstrip("\n")[len("qemu-nbd: "):]


@pytest.mark.parametrize("shared", ["1", "8"])
def test_cli_bursts_of_clients_wait_in_the_backlog(images, cli_server, tmp_path, shared):
    """60 clients connecting at once are all served, -e connections at a time: the others wait
    in the listen backlog (a Unix socket refuses a connect beyond it at once), as with
    qemu-nbd."""
    image = images.get("c64k-v3")
    size = qemu_info(image.path)["virtual-size"]
    server = cli_server(image.path, "-t", "-e", shared, "-k", tmp_path / "burst.sock")
    clients = [subprocess.Popen(["nbdinfo", "--size", server.uri], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(60)]
    results = []
    try:
        for c in clients:
            out, err = c.communicate(timeout=TIMEOUT)
            results.append((c.returncode, out.strip(), err.strip()))
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.communicate()
    failed = [r for r in results if r[:2] != (0, str(size))]
    assert not failed, (len(failed), failed[:3])


def test_cli_refuses_a_description_or_name_over_4096_bytes_as_qemu_nbd(images, cli_server,
                                                                      tmp_path):
    image = images.get("c64k-v3").path
    long_desc = "é" * 2049                          # 4098 bytes: cut at 4096, it split a char
    for option, value in (("-D", long_desc), ("-D", "d" * 4097), ("-x", "n" * 4097)):
        want = _qemu_nbd_fails(option, value, "-k", tmp_path / "q.sock", image)
        assert _serve_fails(option, value, "-k", tmp_path / "f.sock", image) == want
        assert not (tmp_path / "f.sock").exists()
    desc = "é" * 2048                               # 4096 bytes: sent whole
    server = cli_server(image, "-D", desc, "-k", tmp_path / "d.sock")
    info = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert info["description"] == desc


_BAD_CACHE_OPTIONS = [["--cache=bogus"], ["--cache", "NONE"], ["--cache="], ["--aio=bogus"],
                      ["--aio=Native"], ["--aio="], ["--discard=bogus"], ["--discard=ON"],
                      ["--detect-zeroes=bogus"], ["--detect-zeroes="], ["--aio=native"],
                      ["--aio=native", "--cache=writeback"], ["--detect-zeroes=unmap"],
                      ["--detect-zeroes=unmap", "--discard=unmap"],
                      ["--cache=none", "-n"],
                      ["-n", "-n"], ["--aio=threads", "--aio=threads"],
                      ["--discard=on", "--discard=off"], ["--cache=bogus", "--aio=bogus"]]


@pytest.mark.parametrize("options", _BAD_CACHE_OPTIONS, ids=" ".join)
def test_cli_checks_cache_options_as_qemu_nbd(images, tmp_path, options):
    """--cache, -n, --aio, --discard and --detect-zeroes have no effect on the export, but
    their values are checked as qemu-nbd checks them: the same message, status 1."""
    image = images.get("c64k-v3").path
    want = _qemu_nbd_fails(*options, "-k", tmp_path / "q.sock", image)
    assert _serve_fails(*options, "-k", tmp_path / "f.sock", image) == want
    assert not (tmp_path / "f.sock").exists()


@pytest.mark.parametrize("options", [["--cache=none", "--aio=native"], ["--cache=off", "--aio=native"],
                                     ["--aio=native", "--cache=directsync"], ["-n", "--aio=native"],
                                     ["--discard=unmap", "--detect-zeroes=unmap"],
                                     ["--discard=on", "--detect-zeroes=unmap"],
                                     ["--aio=io_uring", "--cache=unsafe", "--discard=ignore"],
                                     ["--detect-zeroes=on", "--detect-zeroes=off"]],
                         ids=" ".join)
def test_cli_accepts_the_cache_options_qemu_nbd_accepts(images, cli_server, tmp_path, options):
    server = cli_server(images.get("c64k-v3").path, *options, "-k", tmp_path / "ok.sock")
    run("nbdinfo", "--size", server.uri)
    assert server.wait() == 0


def test_cli_empty_pid_file_fails_as_in_qemu_nbd(images, tmp_path):
    image = images.get("c64k-v3").path
    for fork in ([], ["--fork"]):
        want = _qemu_nbd_fails(*fork, "--pid-file=", "-k", tmp_path / "q.sock", image)
        assert want == "qcowfast: Could not create '': No such file or directory"
        sock = tmp_path / "f.sock"
        assert _serve_fails(*fork, "--pid-file=", "-k", sock, image) == want
        assert not sock.exists()
    want = _qemu_nbd_fails("--pid-file", tmp_path / "no" / "pid", "-k", tmp_path / "q.sock",
                           image)
    assert _serve_fails("--pid-file", tmp_path / "no" / "pid", "-k", tmp_path / "f.sock",
                        image) == want


def test_cli_fork_leaves_the_working_directory_with_relative_paths(images, tmp_path):
    """--fork: the daemon moves to / (as qemu-nbd's), keeping no directory busy, once the
    image, its backing file, the socket and the pid file, all named relative to the starting
    directory, are resolved: it serves, and removes the socket and pid file when it stops."""
    base = images.get("c64k-v3-zlib").path
    work = tmp_path / "work"
    work.mkdir()
    (work / "base.qcow2").write_bytes(Path(base).read_bytes())
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             cwd=work)
    qemu_io(work / "top.qcow2", "write -P 0x6b 64k 64k")
    want = reference_raw(work / "top.qcow2")
    proc = subprocess.run([sys.executable, "-m", "qcowfast", "serve", "-t", "--fork",
                           "--pid-file", "pid", "-k", "s.sock", "top.qcow2"], cwd=work,
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    pid = int((work / "pid").read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        out = tmp_path / "out.raw"
        for _ in range(2):                            # connections after the move serve too
            run("nbdcopy", unix_uri(work / "s.sock"), out)
            assert_same_bytes(out.read_bytes(), want, "served after --fork")
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while ((work / "pid").exists() or (work / "s.sock").exists()) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (work / "pid").exists() and not (work / "s.sock").exists()


def test_cli_serves_eight_clients_at_once_under_a_memory_limit(pattern_image, tmp_path):
    """Eight clients connected at once are all served with the address space limited to 1 GB
    (`ulimit -v`). Each connection runs a few threads: with 8 MiB stacks and glibc's default of
    up to eight 64 MiB malloc arenas per core, three of the eight were dropped; serve now takes
    1 MiB stacks and an arena per core. (qemu-nbd 7.2 under the same limit served 3 of 8
    `qemu-img convert` clients and aborted: "failed to allocate memory for stack".)"""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1_000_000 * 1024, 1_000_000 * 1024))

    sock = tmp_path / "limited.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "serve", "-t", "-e", "16",
                             "-k", str(sock), str(pattern_image)], preexec_fn=limit,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
        # Each client reads, holds its connection while the others connect, and reads again.
        reads = ["read -P 0x5a 0 1M", "read -P 0x11 1M 512k", "read -P 0x77 3M 64k"]
        argv = ["qemu-io", "-r", "-f", "raw", *(x for r in reads for x in ("-c", r)),
                "-c", "sleep 1500", *(x for r in reads for x in ("-c", r)), unix_uri(sock)]
        clients = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for _ in range(8)]
        outputs = [c.communicate(timeout=TIMEOUT)[0] for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.communicate()
        _terminate(proc)
    for out in outputs:
        assert out.count("read ") == 6 and "fail" not in out.lower(), out


def test_run_under_the_name_qemu_nbd(tmp_path):
    """A symlink named qemu-nbd runs `serve` with qemu-nbd's command line, and its --version
    starts as qemu-nbd's with the version qcowfast follows (ovirt-imageio decides from it
    which options qemu-nbd takes)."""
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_io(image, "write -P 0x6d 64k 192k", "write -z 1M 64k")
    link = tmp_path / "qemu-nbd"
    link.symlink_to(Path(sys.executable).with_name("qcowfast"))
    version = re.compile(r"qemu-nbd (\d+)\.(\d+)\.(\d+)")
    for flag in ("--version", "-V"):
        got = run(link, flag).stdout
        want = run("qemu-nbd", flag).stdout
        ours, theirs = version.match(got), version.match(want)
        assert ours and theirs, got
        assert ours.groups()[:2] == theirs.groups()[:2], (got, want)
        assert f"(qcowfast {qcowfast.__version__})" in got.splitlines()[0]
    sock = tmp_path / "s.sock"
    server = CliServer("--read-only", "--persistent", "--shared=4", "-k", sock, "-f", "qcow2",
                       "-x", "exp", image, command=(link,), uri=unix_uri(sock, "exp"))
    try:
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", unix_uri(sock, "exp"), out)
        assert_same_bytes(out.read_bytes(), reference_raw(image), "qemu-nbd drop-in")
    finally:
        server.stop()
    # Without -k, -p or -b, qemu-nbd listens on TCP port 10809 (here on loopback only), and
    # -p takes a service name as its getaddrinfo() does.
    for args in ([], ["-p", "nbd"]):
        server = CliServer("-r", "-f", "qcow2", *args, image, command=(link,),
                           uri="nbd://127.0.0.1:10809/")
        try:
            out.unlink()
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd://127.0.0.1:10809", out)
            assert_same_bytes(out.read_bytes(), reference_raw(image), f"qemu-nbd {args}")
        finally:
            server.stop()
