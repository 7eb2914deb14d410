"""A source file shrinking while qcowfast reads it through a mapping (the writer's units, the raw
path's long data runs): the SIGBUS its pages raise is caught in the kernels (_sigbus.h) and the
conversion hands over to the general path, which reports the truncation. Every check runs in a
child process: a SIGBUS that escaped would end it, not pytest."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

M = 1024 * 1024

_SHRUNK = """
import mmap, os, sys
from array import array
from qcowfast import _deflate, _plain
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(b"\\x01" * (1 << 20))
fd = os.open(path, os.O_RDONLY)
view = memoryview(mmap.mmap(fd, 1 << 20, prot=mmap.PROT_READ))
os.truncate(path, 4096)                 # every page past the first now raises SIGBUS
"""


def _child(code: str, *args, faulthandler: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "faulthandler"] if faulthandler else []
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("faulthandler", [False, True])
def test_compress_batch_over_a_shrunken_mapping(tmp_path, faulthandler):
    """Every compressor: SourceVanished, and the Compressor refuses further use (its library
    state was cut short); the process lives on, with or without Python's faulthandler."""
    code = _SHRUNK + """
for ctype, level in ((-1, 0), (0, 6), (1, 3)):
    comp = _deflate.Compressor(ctype, 65536, level)
    offs = array("q", range(0, 1 << 20, 65536))
    sizes = array("q", bytes(8 * 16))
    try:
        comp.compress_batch(view, offs, bytearray(1 << 20), offs, sizes)
    except _deflate.SourceVanished:
        pass
    else:
        sys.exit(f"compressor {ctype}: no error")
    try:
        comp.compress_batch(bytes(1 << 20), offs, bytearray(1 << 20), offs, sizes)
    except RuntimeError:
        pass
    else:
        sys.exit(f"compressor {ctype}: used again")
print("survived")
"""
    run = _child(code, tmp_path / "f", faulthandler=faulthandler)
    assert run.returncode == 0 and run.stdout.strip() == "survived", run.stderr


def test_nonzero_spans_over_a_shrunken_mapping(tmp_path):
    code = _SHRUNK + """
assert _plain.nonzero_spans(view, 0, 4096) == _plain.FALLBACK
data = bytearray(64 * 1024)
data[5000:5001] = b"x"
data[40000:50000] = b"y" * 10000
assert _plain.nonzero_spans(data, 4096, 4096) == [(4096 + 4096, 4096), (4096 + 36864, 16384)]
print("survived")
"""
    run = _child(code, tmp_path / "f")
    assert run.returncode == 0 and run.stdout.strip() == "survived", run.stderr


def test_other_sigbus_still_ends_the_process(tmp_path):
    """Only faults inside a guarded range are caught: Python touching the shrunken mapping
    itself dies of SIGBUS as it always did."""
    run = _child(_SHRUNK + "bytes(view[8192:8200])\nprint('survived')\n", tmp_path / "f")
    # (Under AddressSanitizer, tools/asan.sh, ASan reports the fault and aborts.)
    assert run.returncode in (-signal.SIGBUS, -signal.SIGABRT), (run.returncode, run.stderr)
    assert "survived" not in run.stdout


_WRITER = """
import os, sys
import qcowfast
from qcowfast import writer, QcowError
src, out = sys.argv[1], sys.argv[2]
real = writer._map_piece
calls = []

def map_then_shrink(chain, start, length):
    mapped = real(chain, start, length)
    if mapped is not None and start == {at}:
        os.truncate(src, {keep})        # the file shrinks once the unit is mapped
    calls.append(mapped is not None)
    return mapped
writer._map_piece = map_then_shrink
try:
    qcowfast.convert(src, out, format="qcow2", src_format="raw", compression={comp!r})
except QcowError as exc:
    print("error:", exc)
print("mapped:", any(calls), "left:", os.path.exists(out))
"""


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("at", [0, 4 * M])
def test_writer_source_shrinking_under_its_mapping(tmp_path, compression, at):
    """The unit's scan meets the SIGBUS: the writer hands over, the general path reports the
    short source, and no output is left."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x5a" * (12 * M))
    code = _WRITER.format(at=at, keep=at + 4096, comp=compression)
    run = _child(code, src, tmp_path / "out.qcow2")
    assert run.returncode == 0, run.stderr
    assert "past the end of the file" in run.stdout, run.stdout
    # the file's size now, not only at open (which made the message contradict itself)
    assert f"{at + 4096} bytes now, {12 * M} when opened" in run.stdout, run.stdout
    assert "mapped: True left: False" in run.stdout, run.stdout


_STREAMS = """
import os, sys, threading
import qcowfast
from qcowfast import _plain
import qcowfast.convert
convert_module = sys.modules["qcowfast.convert"]
path, rounds = sys.argv[1], int(sys.argv[2])
whole = open(path, "rb").read()
with qcowfast.open(path) as im:
    size = im.virtual_size
    chain = convert_module._plain_chain(im, -(-size // 4096) * 4096, 4096)
    assert chain is not None
    out = os.open(sys.argv[3], os.O_RDWR | os.O_CREAT)
    buf = bytearray(size)
    want = chain.copy(0, size, buf, 4096, out)
    assert want > 0
    stop = threading.Event()

    def cut_and_restore():
        fd = os.open(path, os.O_WRONLY)
        while not stop.is_set():
            os.ftruncate(fd, 4096)      # the streams' pages vanish under their mappings
            os.pwrite(fd, whole, 0)
        os.close(fd)
    cutter = threading.Thread(target=cut_and_restore)
    cutter.start()
    results = set()
    try:
        for _ in range(rounds):
            results.add(chain.copy(0, size, buf, 4096, out))
    finally:
        stop.set()
        cutter.join()
    assert results <= {want, _plain.FALLBACK}, results
print("survived")
"""


def test_compressed_streams_vanishing_under_their_mapping(tmp_path):
    """copy maps groups of compressed streams and inflates them in place: a file cut while the
    decoders read it makes copy hand over (or, read back in time, give the right bytes); the
    SIGBUS never ends the process."""
    raw, img = tmp_path / "src.raw", tmp_path / "img.qcow2"
    raw.write_bytes(b"".join(b"%08d qcowfast streams\n" % i for i in range(8 * M // 24)))
    from common import qemu_img
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    run = _child(_STREAMS, img, 200, tmp_path / "out.raw")
    assert run.returncode == 0 and run.stdout.strip() == "survived", (run.returncode,
                                                                      run.stderr[-2000:])
