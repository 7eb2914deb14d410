"""The writer on sources with a qemu-io history (writes, zero writes, discards, compressed
writes at sector granularity), compared with qemu-img convert run on the same source: here
`convert -n -O raw` into an existing file, whose blocks must end up allocated where
qemu-img's are (its write-zeroes requests punch holes one request at a time)."""
from __future__ import annotations

import json
import random

import pytest

from common import qemu_img, qemu_io, run_cli

K, M = 1024, 1024 * 1024


def _history_image(path, cluster_size: int, size: int, seed: int) -> None:
    """A qcow2 image with a history whose extents start and end off 4 KiB boundaries."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    rng = random.Random(seed)
    # (a compressed write needs a cluster never written)
    cmds = [f"write -q -c -P 7 {size // 2 // cluster_size * cluster_size} {cluster_size}"]
    for _ in range(40):
        off = rng.randrange(size // 512) * 512
        n = min(rng.choice([1, 3, 7, 9, 24, 100, 1000]) * 512, size - off)
        op = rng.choice(["write -q -P %d" % rng.randint(1, 255), "write -q -z",
                         "write -q -z -u", "discard -q"])
        cmds.append(f"{op} {off} {n}")
    qemu_io(path, *cmds)


def _map(path) -> list:
    """qemu-img map of a raw file: its data and hole extents."""
    return [(e["start"], e["length"], e["data"]) for e in
            json.loads(qemu_img("map", "-f", "raw", "--output=json", path).stdout)]


def _existing(path, size: int, zero: bool, seed: int) -> None:
    with open(path, "wb") as f:
        if zero:
            f.truncate(size)
        else:
            f.write(random.Random(seed).randbytes(size))


@pytest.mark.parametrize("options", [[], ["-S", "512"], ["-S", "3k"], ["-S", "64k"],
                                     ["--target-is-zero", "-S", "3k"],
                                     ["--target-is-zero", "-S", "64k"]], ids=" ".join)
@pytest.mark.parametrize("cluster_size", [512, 2 * K])
def test_in_place_raw_allocates_what_qemu_img_allocates(tmp_path, options, cluster_size):
    src = tmp_path / "img.qcow2"
    size = 3 * M + 512
    _history_image(src, cluster_size, size, seed=cluster_size)
    zero = "--target-is-zero" in options
    want, got = tmp_path / "want.raw", tmp_path / "got.raw"
    for path in (want, got):
        _existing(path, size + 64 * K, zero, seed=5)   # longer: the tail is kept
    qemu_img("convert", "-n", "-O", "raw", *options, src, want)
    proc = run_cli("convert", "-q", "-n", "-O", "raw", *options, src, got)
    assert proc.returncode == 0, proc.stderr
    assert got.read_bytes() == want.read_bytes()
    assert _map(got) == _map(want)


def test_request_starts_are_read_as_they_are_asked_for(tmp_path, monkeypatch):
    """The holes' cuts come from qemu-img's requests read in guest order as the writer needs
    them, never all at once: a fragmented image has a request per extent (millions for a
    large one), which an array of every start held in memory for the whole conversion."""
    import qcowfast
    from qcowfast import sparse
    path = tmp_path / "striped.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, 8 * M)
    qemu_io(path, *(f"write -q -P 1 {off} 4k" for off in range(0, 8 * M, 8 * K)))
    pulled = []
    requests = sparse.requests

    def counted(image):
        for item in requests(image):
            pulled.append(item)
            yield item
    monkeypatch.setattr(sparse, "requests", counted)
    with qcowfast.open(path) as image:
        starts = sparse.RequestStarts(image)
        assert starts.within(0, 64 * K) == list(range(4 * K, 64 * K, 4 * K))
        assert len(pulled) <= 17                    # 16 requests, and one to see the 17th
        assert starts.within(64 * K, 72 * K) == [68 * K]
        assert len(pulled) <= 19
        assert len(list(requests(image))) == 1024 * 2    # (a data and a zero request each)
