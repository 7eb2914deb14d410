"""`qcowfast serve` against `qemu-nbd -r` 7.2: what -l says about snapshot selectors, and the
chunks of a read that meets a bad table entry.

-l: qemu-nbd parses a `snapshot.*` value with QEMU's option parser while it reads its options
(unknown keys, `id=`, `help`, short-form flags), before opening anything, and quotes it `so'
in its error; the last `snapshot.*` value counts, else the last one. Compared: exit status,
stdout and stderr ("qemu-nbd: " read as "qcowfast: "), and the bytes served.

Reads: a structured read without DF is qemu-nbd's sparse read (nbd/server.c
nbd_co_send_sparse_read()): one chunk per block status run (OFFSET_HOLE or OFFSET_DATA) until a
query meets the bad entry, then an error chunk ("unable to check for holes: ..."). With DF, or
with simple replies, the read fails whole. Compared: every chunk (flags, type, offset, length,
a digest of its data, error number and message) of the same requests to both servers, on
images built as in test_serve_bad_l1 (qcowfast's refusals judged against their unaligned twin).
Servers listen on Unix sockets in tmp_path and are stopped by each test.
"""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from common import qemu_img, qemu_io
from qcowfast import nbd
from test_bad_l1 import KINDS, broken
from test_nbd_protocol import Client
from test_serve import CliServer, QemuNbd, snap_names, unix_uri  # noqa: F401 (a fixture)
from test_serve_bad_l1 import (_l2_image, _layer_geometry, _set_l2, assert_same,
                              qcowfast_serve, qemu_nbd)

K, M, G = 1 << 10, 1 << 20, 1 << 30
DF = nbd.NBD_CMD_FLAG_DF
TIMEOUT = 30


# -- -l ----------------------------------------------------------------------------------------


def _fails(argv: list) -> tuple[int, str, str]:
    """(status, stdout, stderr) of a command expected to end by itself at once."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


_SELECTORS = [
    # Parse errors: QEMU's option parser, with its warnings, then qemu-nbd's line.
    ["snapshot.foo=1"], ["snapshot.id=1,foo=2"], ["snapshot.ID=1"], ["snapshot."],
    ["snapshot.=1"], ["snapshot.id=1,noodle"], ["snapshot.id=1,snapshot.name=2,foo=3"],
    ["snapshot.id=1,help"], ["snapshot.id=1,?"], ["snapshot.id=1,id=1"],
    ["snapshot.id=1,snapshot.x,id=1"], ["snapshot.id=1,id=a", "snapshot.id=2,id=a"],
    ["snapshot.name=x,id=9", "snapshot.id=1,id=9"],
    # Parsed, then no such snapshot: empty values, id and name of different snapshots, flags.
    ["snapshot.id="], ["snapshot.name="], ["snapshot.id=1,snapshot.name=x"], ["snapshot.id=9"],
    ["snapshot.name=nope"], ["nope"], [""], ["snapshot.id"], ["snapshot.id=2,nosnapshot.name"],
    ["snapshot.id=1,id=a", "snapshot.id=9,id=b"],
    # The last snapshot.* selector counts, whatever comes after it.
    ["snapshot.id=1", "snapshot.name=nope"], ["snapshot.name=nope", "x"], ["x", "snapshot.id=9"],
]


@pytest.mark.parametrize("selectors", _SELECTORS, ids=" -l ".join)
def test_load_snapshot_errors_as_qemu_nbd(snap_names, tmp_path, selectors):
    options = [a for s in selectors for a in ("-l", s)]
    want = _fails(["qemu-nbd", "-r", "-k", tmp_path / "q.sock", *options, snap_names])
    got = _fails([sys.executable, "-m", "qcowfast", "serve", "-k", tmp_path / "f.sock",
                  *options, snap_names])
    assert want[0] == 1 and want[2].startswith("qemu-nbd: "), want
    assert got == (want[0], want[1], want[2].replace("qemu-nbd: ", "qcowfast: ")), want
    assert not (tmp_path / "f.sock").exists()


@pytest.mark.parametrize("options", [["-e", "-1"], ["-e", "x"], ["-e", ""],
                                     ["-e", "2147483648"], ["--shared=1.5"],
                                     ["-e", "x", "--cache=bogus"], ["--cache=bogus", "-e", "x"]],
                         ids=" ".join)
def test_shared_count_errors_as_qemu_nbd(snap_names, tmp_path, options):
    """-e's value is checked as it comes, in qemu-nbd's words (it was argparse's usage)."""
    want = _fails(["qemu-nbd", "-r", "-k", tmp_path / "q.sock", *options, snap_names])
    got = _fails([sys.executable, "-m", "qcowfast", "serve", "-k", tmp_path / "f.sock",
                  *options, snap_names])
    assert want[0] == 1 and want[2].startswith("qemu-nbd: "), want
    assert got == (want[0], want[1], want[2].replace("qemu-nbd: ", "qcowfast: ")), want


@pytest.mark.parametrize("options", [["-l", "snapshot.foo=1", "--cache=bogus"],
                                     ["--cache=bogus", "-l", "snapshot.foo=1"],
                                     ["-l", "snapshot.id=1,id=x", "-l", "snapshot.bad=1"]],
                         ids=" ".join)
@pytest.mark.parametrize("name", ["sn.qcow2", "missing.qcow2"])
def test_load_snapshot_is_parsed_in_option_order(snap_names, tmp_path, options, name):
    """A bad -l value fails as qemu-nbd's getopt loop meets it: after the options before it,
    before those after it and before the image is opened."""
    path = snap_names.parent / name
    want = _fails(["qemu-nbd", "-r", "-k", tmp_path / "q.sock", *options, path])
    got = _fails([sys.executable, "-m", "qcowfast", "serve", "-k", tmp_path / "f.sock",
                  *options, path])
    assert want[0] == 1, want
    assert got == (want[0], want[1], want[2].replace("qemu-nbd: ", "qcowfast: "))


@pytest.mark.parametrize("selectors", [["snapshot.id=1,id=a"], ["snapshot.id=1", "x"],
                                       ["x", "snapshot.name=2"], ["snapshot.name=x", "1"],
                                       ["2", "x"], ["snapshot.id=2,snapshot.id=1,"]],
                         ids=" -l ".join)
def test_load_snapshot_serves_what_qemu_nbd_serves(snap_names, tmp_path, selectors):
    """Selectors qemu-nbd accepts (an `id=` it skips, several -l) serve the same snapshot."""
    options = [a for s in selectors for a in ("-l", s)]
    outs = []
    for tool in ("qemu-nbd", "qcowfast"):
        sock = tmp_path / f"{tool}.sock"
        server = (QemuNbd(snap_names, sock, *options) if tool == "qemu-nbd"
                  else CliServer("-t", "-k", sock, *options, snap_names))
        try:
            out = tmp_path / f"{tool}.raw"
            subprocess.run(["nbdcopy", unix_uri(sock), str(out)], check=True, timeout=TIMEOUT,
                           capture_output=True)
            outs.append(out.read_bytes())
        finally:
            server.stop()
    assert outs[0][:1] in (b"\xa1", b"\xa2") and outs[0] == outs[1]


# -- reads meeting a bad table entry -----------------------------------------------------------

def _chunks(c: Client, offset: int, length: int, flags) -> list:
    """What one read gets. A failed structured read: each chunk as (flags, type, offset -
    `offset`, length, sha256 of its data) or (flags, "ERROR", errno, message). A read that
    succeeds: ("bytes", sha256) of its bytes (qemu-nbd sends one chunk per block status run,
    qcowfast one chunk). A simple reply: ("simple", error, sha256) (flags None)."""
    c.request(nbd.NBD_CMD_READ, 17, offset, length, flags or 0)
    if flags is None:
        error, handle, data = c.simple_reply(length)
        assert handle == 17
        return [("simple", error, hashlib.sha256(data).hexdigest())]
    out, data = [], bytearray(length)
    while True:
        cflags, rtype, handle, payload = c.chunk()
        assert handle == 17
        if rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", payload)
            data[at - offset:at - offset + len(payload) - 8] = payload[8:]
            out.append((cflags, "DATA", at - offset, len(payload) - 8,
                        hashlib.sha256(payload[8:]).hexdigest()))
        elif rtype == nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
            at, n = struct.unpack(">QI", payload)
            out.append((cflags, "HOLE", at - offset, n))
        else:
            assert rtype == nbd.NBD_REPLY_TYPE_ERROR, rtype
            error, n = struct.unpack_from(">IH", payload)
            out.append((cflags, "ERROR", error, payload[6:6 + n].decode()))
        if cflags & nbd.NBD_REPLY_FLAG_DONE:
            if out[-1][1] == "ERROR":
                return out
            return [("bytes", hashlib.sha256(data).hexdigest())]


def _wire(sock: Path, reads: list) -> list:
    """The replies to `reads` (offset, length), each read structured, with DF, then simple."""
    out = []
    for structured in (True, False):
        c = Client(str(sock)).greet()
        c.sock.settimeout(60)
        try:
            c.go(structured=structured, meta=False)
            for off, n in reads:
                for flags in ((0, DF) if structured else (None,)):
                    out.append(((off, n, flags), _chunks(c, off, n, flags)))
            error, _ = c.read(0, 4 * K)             # the connection still serves
            out.append(("after", error))
        finally:
            c.close()
    return out


def _reads(bad: int, size: int) -> list:
    """Reads that end in the bad range or start in it, after data, holes, or nothing."""
    out = []
    for off, n in ((bad - M, M + 1), (bad - 256 * K, 512 * K), (bad - 4 * K, 8 * K),
                   (bad - 64 * K - 100, 64 * K + 200), (bad, 4 * K), (bad - 8 * M, 9 * M),
                   (bad - 31 * M, 32 * M)):
        if 0 <= off and off + n <= size:
            out.append((off, n))
    return out


def _compare(tmp_path: Path, oracle: Path, ours: dict, bad: int) -> list:
    """Serve `oracle` with qemu-nbd and each of `ours` (kind -> image) with qcowfast: the
    same replies to reads around guest offset `bad`; returns qemu-nbd's."""
    _, size = _layer_geometry(oracle)
    reads = _reads(bad, size)
    with qemu_nbd(oracle, tmp_path / "q.sock") as sock:
        want = _wire(sock, reads)
    for kind, image in ours.items():
        with qcowfast_serve(image, tmp_path / f"{kind}.sock") as sock:
            got = _wire(sock, reads)
        assert_same(got, want, kind)
    return want


def _sparse_failures(want: list) -> list:
    """The failed structured reads without DF of _wire's replies."""
    return [r for (_, _, flags), r in (w for w in want if w[0] != "after")
            if flags == 0 and r[-1][1] == "ERROR"]


L1_CHAINS = ("top", "under-hole", "under-data", "big-over-small", "extended", "small-tables",
             "middle", "raw-backing")


@pytest.mark.parametrize("chain", L1_CHAINS)
def test_reads_into_a_bad_l1_entry_chunk_as_qemu_nbd(tmp_path, chain):
    """Reads ending in (or starting in) a bad L1 range, after holes, data and backing files:
    qemu-nbd's chunks before the error chunk; DF and simple reads fail whole."""
    oracle, layer, index = broken(tmp_path / "qemu", chain, "unaligned")
    cluster, _ = _layer_geometry(layer)
    bad = index * cluster * (cluster // 8)
    ours = {kind: broken(tmp_path / kind, chain, kind)[0] for kind in KINDS}
    want = _compare(tmp_path, oracle, ours, bad)
    failed = _sparse_failures(want)
    assert failed and all(r[-1][:3] == (1, "ERROR", nbd.NBD_EIO) for r in failed), want
    assert any(len(r) > 1 for r in failed), failed             # chunks before the error


def _compressed(d: Path, kind: str) -> tuple[Path, int]:
    """A zero cluster, compressed clusters and a data cluster before the bad one at 4M."""
    d.mkdir()
    p = d / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io(p, "write -P 1 3M 64k", "write -z 3776k 64k", "write -c -P 2 3840k 64k",
            "write -c -P 3 3904k 64k", "write -P 4 3968k 64k", "write -P 5 4M 64k",
            "write -P 6 5M 64k")
    _set_l2(p, 4 * M, kind)
    return p, 4 * M


@pytest.mark.parametrize("case", ["top", "under-hole", "extended", "compressed"])
def test_reads_into_a_bad_l2_entry_chunk_as_qemu_nbd(tmp_path, case):
    """Holes, zero clusters, compressed clusters (one chunk each) and data before a bad L2
    entry; with an invalid subcluster bitmap the failing query starts before the entry."""
    build = _compressed if case == "compressed" else lambda d, k: _l2_image(d, case, k)
    oracle, at = build(tmp_path / "qemu", "unaligned")
    kinds = ("unaligned",) if case == "extended" else KINDS
    ours = {kind: build(tmp_path / kind, kind)[0] for kind in kinds}
    want = _compare(tmp_path, oracle, ours, at)
    failed = _sparse_failures(want)
    assert any(len(r) > 2 for r in failed), failed


def test_a_failing_read_among_pipelined_reads_chunks_as_qemu_nbd(tmp_path):
    """Contiguous pipelined reads are filled as one batch; the one reaching the bad entry is
    answered again alone, with qemu-nbd's chunks, the others with their bytes."""
    oracle, at = _compressed(tmp_path / "qemu", "unaligned")
    ours, _ = _compressed(tmp_path / "ours", "reserved")
    reads = {h: (at - 448 * K + h * 128 * K, 128 * K) for h in range(8)}

    def pipelined(sock) -> dict:
        c = Client(str(sock)).greet()
        c.sock.settimeout(60)
        try:
            c.go(meta=False)
            c.sock.sendall(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0,
                                                nbd.NBD_CMD_READ, h, off, n)
                                    for h, (off, n) in reads.items()))
            chunks: dict = {h: [] for h in reads}
            done = 0
            while done < len(reads):
                cflags, rtype, handle, payload = c.chunk()
                chunks[handle].append((cflags, rtype, payload))
                done += bool(cflags & nbd.NBD_REPLY_FLAG_DONE)
        finally:
            c.close()
        out = {}
        for h, got in chunks.items():
            data = bytearray(reads[h][1])
            for cflags, rtype, payload in got:
                if rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
                    pos = struct.unpack_from(">Q", payload)[0] - reads[h][0]
                    data[pos:pos + len(payload) - 8] = payload[8:]
                elif rtype == nbd.NBD_REPLY_TYPE_ERROR:
                    out[h] = [(f, t, p) for f, t, p in got]     # the whole failed reply
                    break
            else:
                out[h] = hashlib.sha256(data).hexdigest()       # bytes (chunks may differ)
        return out

    with qemu_nbd(oracle, tmp_path / "q.sock") as sock:
        want = pipelined(sock)
    with qcowfast_serve(ours, tmp_path / "o.sock") as sock:
        got = pipelined(sock)
    failed = [h for h, r in want.items() if isinstance(r, list)]
    assert failed == [3] and len(want[3]) == 2, want
    assert got == want
