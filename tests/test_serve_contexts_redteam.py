"""Red team of `qcowfast serve -A` / `-B NAME` (qemu:allocation-depth, qemu:dirty-bitmap:NAME):
hostile option negotiation compared with `qemu-nbd -r` serving the same image, and the memory a
hostile bitmap may cost one request.

Servers are processes on Unix sockets in tmp_path (`-t`, stopped by the `pair` fixture of
test_serve_contexts); raw exchanges go through test_nbd_protocol's Client (socket timeouts).
"""
from __future__ import annotations

import struct
import tracemalloc

import pytest

import qcowfast
from common import qemu_img, qemu_io
from qcowfast import nbd
from qcowfast.serve import _exported_bitmaps
from test_nbd_protocol import Client, info_data, meta_data
from test_serve_contexts import _directory, _exchange, _patch, bitmap, pair  # noqa: F401

BITMAP = b"qemu:dirty-bitmap:"


def test_set_naming_more_bitmaps_than_the_query_cap_as_qemu_nbd(tmp_path, pair):
    """36 exported bitmaps, SET by their names (37 queries): qemu-nbd selects them all; the
    32-query cap refused the option (ERR_TOO_BIG), so no client could select them."""
    path = tmp_path / "many.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    names = [f"m{i:02d}" for i in range(36)]
    for name in names:
        bitmap(path, "--add", name)
    qemu_io(path, "write 1M 64k", "write 5M 4k")
    options = [w for name in names for w in ("-B", name)]
    queries = [[b"base:allocation", *(BITMAP + n.encode() for n in names)]]
    with pair(path, *options) as (ref, got):
        want = _exchange(ref.sock, queries)
        assert _exchange(got.sock, queries) == want
    assert len(want[1][1]) == 1 + 36 + 1                  # every context, then the ACK


@pytest.fixture
def bitmapped_small(tmp_path):
    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    bitmap(path, "--add", "b0")
    qemu_io(path, "write 1M 64k")
    return path


def _replies(sock, steps) -> list:
    """The reply types of each (option, data) step on one connection, then (GO) the context
    names of the chunks of a block status reply (the contexts of the last SET)."""
    c = Client(str(sock)).greet()
    try:
        out = []
        for opt, data in steps:
            replies = c.option(opt, data)
            out.append([t for t, _ in replies])
            if opt == nbd.NBD_OPT_SET_META_CONTEXT:
                names = {struct.unpack_from(">I", p)[0]: p[4:] for t, p in replies
                         if t == nbd.NBD_REP_META_CONTEXT}
        assert c.option(nbd.NBD_OPT_GO, info_data(b""))[-1][0] == nbd.NBD_REP_ACK
        c.request(nbd.NBD_CMD_BLOCK_STATUS, 7, 0, 1 << 20)
        while True:
            cflags, rtype, _, payload = c.chunk()
            out.append(names[struct.unpack_from(">I", payload)[0]])
            if cflags & nbd.NBD_REPLY_FLAG_DONE:
                return out
    finally:
        c.close()


def test_meta_context_refusals_in_qemu_nbd_order(bitmapped_small, pair):
    """An unknown export is ERR_UNKNOWN however malformed its queries (qemu-nbd looks the
    export up first; it was ERR_INVALID), a query count the data cannot hold is ERR_INVALID
    (it was ERR_TOO_BIG); a second SET replaces the first."""
    unknown = struct.pack(">I", 4) + b"nope" + struct.pack(">I", 3) + b"\0\0\0\1x"
    lying = struct.pack(">I", 0) + struct.pack(">I", 1_000_000)
    L, S = nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT
    steps = [(L, unknown), (L, lying), (nbd.NBD_OPT_STRUCTURED_REPLY, b""), (S, unknown),
             (S, lying), (L, meta_data(b"", [b"base:allocation"] * 3)[:-2]),
             (S, meta_data(b"", [BITMAP + b"b0"])), (S, meta_data(b"", [b"base:allocation"]))]
    with pair(bitmapped_small, "-A", "-B", "b0") as (ref, got):
        want = _replies(ref.sock, steps)
        assert _replies(got.sock, steps) == want
    assert want[0] == [nbd.NBD_REP_ERR_UNKNOWN] and want[1] == [nbd.NBD_REP_ERR_INVALID]
    assert want[-1] == b"base:allocation" and len(want) == len(steps) + 1


def test_alternating_bitmap_in_2m_clusters_stays_small(tmp_path):
    """Bits alternating every 512-byte granule in 2 MiB bitmap clusters (16 Mi granules
    each): a REQ_ONE request looks at 64 KiB of bitmap, not a whole cluster's 16 Mi granules
    (about 80 MiB of arrays), and a full request stays under the extent cap's cost."""
    cs = 2 << 20
    path = tmp_path / "alt2m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "16G")
    bitmap(path, "--add", "-g", "512", "h")
    qemu_io(path, "write 0 4k")
    _, [bm] = _directory(path)
    with open(path, "rb") as f:
        f.seek(bm.table_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
    _patch(path, entry, b"\x55" * cs)
    with qcowfast.open(path) as image:
        [exported] = _exported_bitmaps(image, ["h"])
        peaks = []
        for cap in (1, 131072):
            tracemalloc.start()
            try:
                extents = exported.extents(0, (1 << 32) - 512, cap)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert len(extents) == cap
            assert extents[:4] == [(512, 1), (512, 0), (512, 1), (512, 0)][:cap]
    assert peaks[0] < 16 << 20 and peaks[1] < 48 << 20, peaks
