"""The Python API as a demanding user meets it: `as_file()` against Python's own file objects
over ``qemu-img convert -O raw``'s output of the same image, and the argument checks of
`qcowfast.open` (and what shares them: convert, compare, measure, serve).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfast
from common import qemu_img, qemu_io
from qcowfast.serve import NBDServer

MIB = 1 << 20


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """A compressed base of text lines under a top with data, zero and discarded clusters and
    an internal snapshot, plus qemu-img's raw output of the top and of its snapshot."""
    d = tmp_path_factory.mktemp("api")
    rng = random.Random(88)
    text = b"".join(bytes(rng.choice(b"ab \n") for _ in range(rng.randrange(400)))
                    for _ in range(3000))[:MIB]
    (d / "text.raw").write_bytes(text.ljust(MIB, b"z"))
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
             d / "text.raw", d / "base.qcow2")
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1536K",
             cwd=d)
    qemu_io(top, "write -P 0x0a 64k 64k", "write -z 256k 128k", "discard 512k 64k",
            "write -P 0x5a 1100k 20k")
    qemu_img("snapshot", "-c", "s1", top)
    qemu_io(top, "write -P 0x33 0 8k", "write -z 600k 64k")
    qemu_img("convert", "-O", "raw", top, d / "top.raw")
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", top, d / "snap.raw")
    return {"dir": d, "top": top, "raw": {None: d / "top.raw", "s1": d / "snap.raw"}}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------
# The file object against io.FileIO over qemu-img's raw output

_SIZES = (0, 1, 7, 4095, 4096, 65537, 300_000)
_BUFFERS = {
    "bytearray": bytearray,
    "memoryview": lambda n: memoryview(bytearray(n + 8))[4:4 + n],
    "numpy": lambda n: np.zeros(n, np.uint8),
    "numpy-u32": lambda n: np.zeros(-(-n // 4), np.uint32),
    "non-contiguous": lambda n: memoryview(bytearray(2 * n))[::2],
    "bytes": bytes,
    "read-only view": lambda n: memoryview(bytes(n)),
    "read-only numpy": lambda n: np.frombuffer(bytes(n), np.uint8),
}

_OPS = st.one_of(
    st.tuples(st.just("seek"), st.one_of(st.integers(-2 * MIB, 3 * MIB),
                                         st.sampled_from((1 << 63, 1 << 64))),
              st.sampled_from((0, 1, 2))),
    st.tuples(st.just("read"), st.sampled_from((None, -1, *_SIZES))),
    st.tuples(st.just("readinto"), st.sampled_from(sorted(_BUFFERS)), st.sampled_from(_SIZES)),
    st.tuples(st.just("readline"), st.sampled_from((None, -1, 0, 1, 100, 70_000))),
    st.tuples(st.just("readlines"), st.sampled_from((1, 100, 5000))),
    st.tuples(st.just("next")),
    st.tuples(st.just("tell")),
)


def _apply(f, op):
    name, *args = op
    if name == "seek":
        return f.seek(*args)
    if name == "readinto":
        buf = _BUFFERS[args[0]](args[1])
        return f.readinto(buf), bytes(memoryview(buf).tobytes())
    if name == "readlines":
        return f.readlines(*args)
    if name == "next":
        return next(f, "end")
    return getattr(f, name)(*args)


def _outcome(f, op):
    """What `op` gave and the position after it; an exception by kind: TypeError, or refused
    (ValueError/OSError/OverflowError: FileIO says OSError for a negative seek and
    OverflowError past off_t, as io.BytesIO and io.BufferedReader say ValueError)."""
    try:
        result = _apply(f, op)
    except TypeError:
        return "TypeError", f.tell()
    except (ValueError, OSError, OverflowError):
        return "refused", f.tell()
    return result, f.tell()


@settings(max_examples=80, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(snapshot=st.sampled_from((None, "s1")), ops=st.lists(_OPS, max_size=25))
def test_as_file_matches_a_python_file_of_the_raw_bytes(chain, snapshot, ops):
    """Random seek/read/readinto/readline/readlines/next/tell sequences give io.FileIO's bytes,
    positions and kinds of error over `qemu-img convert -O raw`'s output (top and snapshot):
    a buffer no read can fill (read-only, non-contiguous) is a TypeError even when empty or
    at the end, and a position past the largest off_t is refused."""
    with qcowfast.open(chain["top"], snapshot=snapshot) as img, \
            img.as_file() as f, open(chain["raw"][snapshot], "rb", buffering=0) as want:
        for i, op in enumerate(ops):
            assert _outcome(f, op) == _outcome(want, op), (i, op)


def test_readinto_refuses_unfillable_buffers_before_reading(chain):
    """Read-only and non-contiguous buffers are refused up front with one wording, as FileIO
    refuses them: the window path used to return 0 for an empty read-only buffer and fill its
    window before failing on a full one; Image/RawImage.readinto named a memoryview cast."""
    raw = chain["raw"][None]
    with qcowfast.open(chain["top"]) as img, img.as_file() as f, open(raw, "rb") as want:
        f.read(10)
        want.read(10)
        for buf in (b"", bytes(10), memoryview(bytearray(20))[::2],
                    np.zeros((3, 3), np.uint8, order="F")):
            with pytest.raises(TypeError):
                want.readinto(buf)
            with pytest.raises(TypeError, match="writable, C-contiguous"):
                f.readinto(buf)
            assert f.tell() == want.tell() == 10
        assert f.read(100) == want.read(100)
        with qcowfast.image.open_source(raw, "raw") as plain:
            for reader in (img, plain):
                for buf in (bytes(4), np.zeros(8, np.uint8)[::2]):
                    with pytest.raises(TypeError, match="writable, C-contiguous"):
                        reader.readinto(0, buf)


def test_seek_past_the_largest_offset_is_refused(chain):
    """io.BufferedReader (what open(raw, "rb") gives) refuses a position past off_t with a
    ValueError; the reader used to take it, and a BufferedReader wrapped around it then
    failed on its own tell()."""
    with qcowfast.open(chain["top"]) as img, img.as_file() as f, \
            open(chain["raw"][None], "rb") as want:
        for pos, whence in ((1 << 63, 0), (1 << 70, 0), ((1 << 63) - 1, 1)):
            f.seek(5)
            want.seek(5)
            with pytest.raises((ValueError, OSError)):     # OSError: lseek()'s EINVAL
                want.seek(pos, whence)
            with pytest.raises(ValueError, match="largest file offset"):
                f.seek(pos, whence)
            assert f.tell() == want.tell() == 5
        assert io.BufferedReader(f).read(64) == want.read(64)


def test_closed_file_refuses_truncate_and_fileno_as_closed(chain):
    """On a closed file, truncate() and fileno() say it is closed (ValueError), as io.FileIO
    does, rather than that they are unsupported."""
    with qcowfast.open(chain["top"]) as img:
        f = img.as_file()
        f.close()
        want = open(chain["raw"][None], "rb")
        want.close()
        for name in ("truncate", "fileno"):
            with pytest.raises(ValueError, match="closed"):
                getattr(want, name)()
            with pytest.raises(ValueError, match="closed"):
                getattr(f, name)()


def test_as_file_cannot_be_copied_or_pickled(chain):
    """A copy shared the original's read-ahead windows, their lock and the fills in flight
    (io.FileIO cannot be copied either)."""
    with qcowfast.open(chain["top"]) as img, img.as_file() as f:
        f.read(10)
        for call in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot pickle or copy"):
                call(f)


# ---------------------------------------------------------------------------------------------
# Arguments of open() and what shares its checks


@pytest.mark.parametrize("option, value", [
    ("backing", True), ("backing", 5), ("backing", []),
    ("data_file", 5), ("data_file", False),
    ("snapshot", True), ("snapshot", 1.5), ("snapshot", ["s1"]),
    ("force_share", "yes"), ("force_share", None), ("force_share", 1),
    ("format", 5), ("format", b"qcow2"),
])
def test_open_names_an_option_of_the_wrong_kind(chain, option, value):
    """A value of the wrong kind is a TypeError/ValueError naming the option, raised before any
    file is opened: it used to fail inside os.fspath ('expected str, bytes or os.PathLike'),
    be looked up as a snapshot named 'True', or be taken as true (force_share='yes')."""
    before = _fds()
    with pytest.raises((TypeError, ValueError), match=rf"^{option} must be"):
        qcowfast.open(chain["top"], **{option: value})
    assert _fds() == before
    if option in ("snapshot", "force_share"):          # through open_source as well
        with pytest.raises((TypeError, ValueError), match=rf"^{option} must be"):
            qcowfast.measure(chain["top"], **{option: value})


def test_numpy_bools_are_yes_no_values(chain, tmp_path):
    """numpy's bool scalars are accepted where True/False are (numpy 2 renamed the type
    numpy.bool_ to numpy.bool, which the check no longer recognised)."""
    out = tmp_path / "out.raw"
    out.write_bytes(b"old")
    qcowfast.convert(chain["top"], out, overwrite=np.True_, fsync=np.bool_(False))
    assert out.read_bytes() == chain["raw"][None].read_bytes()
    with qcowfast.open(chain["top"], force_share=np.False_) as img:
        assert img.read(0, 4096) == out.read_bytes()[:4096]


@pytest.mark.parametrize("call, option", [
    (lambda p, t: qcowfast.info(p, force_share="yes"), "force_share"),
    (lambda p, t: qcowfast.info(p, backing_chain="no"), "backing_chain"),
    (lambda p, t: qcowfast.info(p, max_depth=-1), "max_depth"),
    (lambda p, t: qcowfast.info(p, max_depth=True), "max_depth"),
    (lambda p, t: qcowfast.info(p, fmt=5), "fmt"),
    (lambda p, t: qcowfast.check(p, force_share=1), "force_share"),
    (lambda p, t: qcowfast.check(p, probe="no"), "probe"),
    (lambda p, t: qcowfast.check(p, progress=5), "progress"),
    (lambda p, t: qcowfast.compare(p, p, strict="yes"), "strict"),
    (lambda p, t: qcowfast.compare(p, p, progress=5), "progress"),
    (lambda p, t: qcowfast.compare(p, p, fmt_b=5), "fmt_b"),
    (lambda p, t: qcowfast.measure(p, format="qcow2", backing_file=5), "backing_file"),
    (lambda p, t: qcowfast.convert(p, t / "out.raw", progress=5), "progress"),
    (lambda p, t: qcowfast.convert_many([(p, t / "out.raw")], progress=5), "progress"),
    (lambda p, t: qcowfast.convert_many([(p, t / "out.raw")], on_result=5), "on_result"),
    (lambda p, t: NBDServer(p, socket=t / "s", shared=True), "shared"),
    (lambda p, t: NBDServer(p, socket=t / "s", persistent="x"), "persistent"),
    (lambda p, t: qcowfast.serve(p, port="x"), "port"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_public_functions_name_an_option_of_the_wrong_kind(chain, tmp_path, call, option):
    """Options of the wrong kind are refused up front, naming the option: they were taken as
    yes/no by truth (force_share='yes', strict='yes', persistent='x'), read as a format named
    '5', or failed once the work had started ("'int' object is not callable"), leaving
    nothing behind either way."""
    with pytest.raises((TypeError, ValueError), match=rf"^{option} must be"):
        call(chain["top"], tmp_path)
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / "s").exists()
