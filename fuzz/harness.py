"""What a user does with an untrusted image, as one function shared by the fuzzer and the tests.

`exercise(path)` opens the image and maps, reads and converts it, reads its snapshot table and
each snapshot, describes it (`info`) and checks it (`check`). A QcowError is the expected answer to
a bad image; anything else escapes and is a bug. Reads and streams are bounded so that a huge
declared size costs nothing unless qcowfast itself does too much work.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import qcowfast

READ_BUDGET = 4 * 1024 * 1024        # guest bytes read per image, at most
STREAM_LIMIT = 16 * 1024 * 1024      # max_stream_size of the in-memory conversion
FILE_CONVERT_LIMIT = 1 << 30         # virtual sizes up to this are converted to a file too
MAX_SNAPSHOTS_OPENED = 4


def _read_image(img) -> None:
    vsize = img.virtual_size
    entries = img.map()
    img.read(0, min(vsize, 65536))
    img.read(vsize // 2, 4096)          # reads within one cluster take the C path (SmallReader)
    budget = READ_BUDGET
    for e in entries:
        if e["data"] and budget > 0:
            n = min(e["length"], budget)
            if len(img.read(e["start"] + n - min(n, 512), min(n, 512))) != min(n, 512):
                raise AssertionError(f"short small read before {e['start'] + n:#x}")
            if len(img.read(e["start"], n)) != n:
                raise AssertionError(f"short read at {e['start']:#x}")
            budget -= n
    for _ in img.extents():
        pass


def _quietly(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except qcowfast.QcowError:
        return None


def exercise(path: str) -> None:
    """Everything above, on the image at `path`; only non-QcowError exceptions propagate."""
    path = os.fspath(path)
    _quietly(qcowfast.info, path)
    _quietly(qcowfast.info, path, backing_chain=True)
    _quietly(qcowfast.check, path)
    try:
        with qcowfast.open(path) as img:
            vsize = img.virtual_size
            _read_image(img)
            snaps = _quietly(lambda: img.snapshots) or []
    except qcowfast.QcowError:
        return
    for snap in snaps[:MAX_SNAPSHOTS_OPENED]:
        try:
            with qcowfast.open(path, snapshot=snap.id) as s:
                _read_image(s)
        except qcowfast.QcowError:
            pass
    out = io.BytesIO()
    try:
        qcowfast.convert(path, out, max_stream_size=STREAM_LIMIT, threads=1, unit_size=1 << 20)
        if len(out.getvalue()) != vsize:
            raise AssertionError("streamed output is not the virtual size")
    except qcowfast.QcowError:
        pass
    if vsize <= FILE_CONVERT_LIMIT:
        # Into a directory of its own, emptied afterwards: no state carries over to the next
        # input (an image could name a previous output as its backing file).
        out_dir = tempfile.mkdtemp(prefix="qcowfast-out-")
        try:
            dst = os.path.join(out_dir, "out.raw")
            try:
                qcowfast.convert(path, dst, threads=1, unit_size=1 << 20)
            except qcowfast.QcowError:
                if os.listdir(out_dir):
                    raise AssertionError(f"a failed conversion left {os.listdir(out_dir)}")
            else:
                if os.stat(dst).st_size != vsize:
                    raise AssertionError("converted file is not the virtual size")
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
