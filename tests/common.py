"""Shared checkers for the qcowfast tests.

The oracles here are QEMU's own tools, never qcowfast:

* bytes:   ``qemu-img convert -O raw``  (:func:`reference_raw`)
* extents: ``qemu-img map --output=json``  (:func:`qemu_map`)
* headers: ``qemu-img info --output=json``  (:func:`qemu_info`)

Images are written with ``qemu-img`` and ``qemu-io`` (:func:`qemu_img`, :func:`qemu_io`).
Every helper raises :class:`QemuToolError` (carrying the tool's stderr) when the tool fails,
so a broken recipe or oracle fails the test loudly instead of comparing against garbage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"

__all__ = [
    "QEMU_IMG",
    "QEMU_IO",
    "QemuToolError",
    "assert_same_bytes",
    "first_difference",
    "missing_qemu_tools",
    "qemu_img",
    "qemu_info",
    "qemu_io",
    "qemu_map",
    "reference_raw",
]


class QemuToolError(AssertionError):
    """A qemu-img / qemu-io invocation failed; the message holds its command line and stderr."""


def missing_qemu_tools() -> list[str]:
    """Return the names of the QEMU tools the tests need that are not on ``PATH``."""
    return [tool for tool in (QEMU_IMG, QEMU_IO) if shutil.which(tool) is None]


def _run(argv: list[str], cwd: str | os.PathLike | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    # qemu-io reports failed commands on stdout/stderr but may still exit 0, so its
    # output is also scanned for the error lines it prints.
    failed = proc.returncode != 0
    if not failed and argv[0] == QEMU_IO:
        out = proc.stdout + proc.stderr
        failed = any(
            marker in out
            for marker in ("failed:", "Error", "error:", "Invalid", "not supported")
        )
    if failed:
        raise QemuToolError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}"
            + (f"\n  cwd: {cwd}" if cwd is not None else "")
            + f"\n  stdout: {proc.stdout.strip()}\n  stderr: {proc.stderr.strip()}"
        )
    return proc


def qemu_img(*args: str | os.PathLike | int, cwd: str | os.PathLike | None = None
             ) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS...`` and return the completed process.

    Raises
    ------
    QemuToolError
        If qemu-img exits non-zero; the message includes its stderr.
    """
    return _run([QEMU_IMG, *map(os.fspath, map(_as_arg, args))], cwd)


def qemu_io(path: str | os.PathLike, *commands: str, fmt: str = "qcow2",
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``qemu-io -f FMT -c CMD1 -c CMD2 ... PATH``, e.g. ``qemu_io(p, "write -P 0x5a 0 64k")``.

    Commands run in order within one qemu-io process. ``-q`` is added to write, discard
    and zero-write commands that lack it, to keep the output small.

    Raises
    ------
    QemuToolError
        If qemu-io exits non-zero or prints an error for any command.
    """
    argv = [QEMU_IO, "-f", fmt]
    for cmd in commands:
        verb, _, rest = cmd.strip().partition(" ")
        if verb in ("write", "discard", "read") and "-q" not in rest.split():
            cmd = f"{verb} -q {rest}"
        argv += ["-c", cmd]
    argv.append(os.fspath(path))
    return _run(argv, cwd)


def _as_arg(value: str | os.PathLike | int) -> str | os.PathLike:
    return str(value) if isinstance(value, int) else value


def qemu_info(path: str | os.PathLike) -> dict:
    """Return ``qemu-img info --output=json PATH`` parsed (``virtual-size``, ``cluster-size``)."""
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def qemu_map(path: str | os.PathLike) -> list[dict]:
    """Return ``qemu-img map --output=json PATH`` parsed: a list of extent dicts.

    Each dict has ``start``, ``length``, ``depth``, ``present``, ``zero``, ``data`` and,
    when QEMU knows the host location, ``offset``.
    """
    return json.loads(qemu_img("map", "--output=json", path).stdout)


_RAW_CACHE: dict[tuple[str, int, int], bytes] = {}


def reference_raw(path: str | os.PathLike) -> bytes:
    """Return the guest bytes of the image at *path*, as ``qemu-img convert -O raw`` writes them.

    Results are cached per (resolved path, mtime, size) of *path*: rewriting the image
    refreshes the entry, while rewriting only a backing file does not, so tests that mutate
    a backing file should work on a fresh copy of the chain.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    cached = _RAW_CACHE.get(key)
    if cached is None:
        with tempfile.TemporaryDirectory(prefix="qcowfast-ref-") as tmp:
            out = Path(tmp, "reference.raw")
            qemu_img("convert", "-O", "raw", p, out)
            cached = out.read_bytes()
        _RAW_CACHE[key] = cached
    return cached


def first_difference(got: bytes, want: bytes) -> int | None:
    """Return the first offset where *got* and *want* differ (a length mismatch counts), or None."""
    got, want = memoryview(got).cast("B"), memoryview(want).cast("B")
    n = min(len(got), len(want))
    if got[:n] != want[:n]:
        # Bisect on slice equality: slices compare in C, so this stays fast on megabytes.
        lo, hi = 0, n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[lo:mid] != want[lo:mid]:
                hi = mid
            else:
                lo = mid
        return lo
    return None if len(got) == len(want) else n


def assert_same_bytes(got: bytes, want: bytes, what: str, base: int = 0) -> None:
    """Assert ``got == want`` without letting pytest print megabyte-long diffs.

    On failure the message names *what* was compared, both lengths and the first differing
    offset (shifted by *base*, e.g. the guest offset the buffers start at), with a few bytes
    of context from each side.
    """
    __tracebackhide__ = True
    pos = first_difference(got, want)
    if pos is None:
        return
    lo = max(0, pos - 8)
    got_ctx = bytes(memoryview(got)[lo:pos + 24]).hex(" ")
    want_ctx = bytes(memoryview(want)[lo:pos + 24]).hex(" ")
    raise AssertionError(
        f"{what}: bytes differ at offset {base + pos:#x} ({base + pos}); "
        f"len(got)={len(got)} len(want)={len(want)}\n"
        f"  got  @{base + lo:#x}: {got_ctx}\n"
        f"  want @{base + lo:#x}: {want_ctx}"
    )


def run_cli(*args, cwd=None, timeout=120, text=True) -> subprocess.CompletedProcess:
    """Run ``python -m qcowfast ARGS`` (paths and ints become strings); text output (bytes with
    text=False: text mode turns the carriage returns of progress reports into newlines), no
    raise."""
    return subprocess.run([sys.executable, "-m", "qcowfast", *map(str, args)], cwd=cwd,
                          capture_output=True, text=text, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


QEMU_PROGRESS = re.compile(rb"(    \((\d+\.\d\d)/100%\)\r)+\n")


def cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """Run ``qcowfast ARGS`` in this process (cheap: for argument handling and output text);
    returns (exit status, stdout, stderr). `run_cli` runs the real process."""
    from qcowfast.cli import main
    try:
        status = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def progress_values(report: bytes, complete: bool = True) -> list[float]:
    """The percentages of a whole qemu-img progress report ('    (P/100%)\r'..., '\n'),
    asserting it is one, rising from 0 (to 100 when `complete`: qemu-img compare's float sums
    may stop short of it)."""
    assert QEMU_PROGRESS.fullmatch(report), report[:200]
    values = [float(v) for v in re.findall(rb"\((\d+\.\d\d)/100%\)", report)]
    assert values[0] == 0.0 and values == sorted(values), values
    assert values[-1] == 100.0 or not complete, values
    return values


def qemu_img_pbkdf(*args: str | os.PathLike | int, cwd: str | os.PathLike | None = None,
                   attempts: int = 12) -> subprocess.CompletedProcess:
    """``qemu_img(*args)`` for a command that writes a LUKS header, retried when QEMU's PBKDF2
    benchmark fails with "Unable to get accurate CPU usage" (it times rounds on the thread's
    CPU clock and gives up now and then on a busy machine, sometimes for seconds in a row:
    the retries back off, about 13 s in all)."""
    for attempt in range(attempts):
        try:
            return qemu_img(*args, cwd=cwd)
        except QemuToolError as exc:
            if "accurate CPU usage" not in str(exc) or attempt == attempts - 1:
                raise
        time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def read_one_way(how: int, img, f, buf: bytearray, offset: int, size: int) -> bytes:
    """Read `size` guest bytes at `offset` by Image.read (how 0), Image.readinto into `buf`
    (1) or the file object `f` of img.as_file() (2)."""
    if how == 0:
        return img.read(offset, size)
    if how == 1:
        n = img.readinto(offset, memoryview(buf)[:size])
        return bytes(buf[:n])
    f.seek(offset)
    return f.read(size)


def modules_imported_after(code: str, names) -> set:
    """Which of the module `names` a fresh interpreter running `code` ends with imported."""
    run = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          f"print('imported:', *(m for m in {list(names)!r} if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    last = run.stdout.splitlines()[-1].split()
    assert last[0] == "imported:", run.stdout
    return set(last[1:])


def numpy_imported_after(code: str) -> bool:
    """Whether a fresh interpreter running `code` ends with numpy imported."""
    return "numpy" in modules_imported_after(code, ["numpy"])


def data_extents(path: str | os.PathLike) -> list[tuple[int, int]]:
    """The (start, end) data extents of a file (SEEK_DATA / SEEK_HOLE)."""
    out, pos = [], 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def data_blocks(path: str | os.PathLike) -> set:
    """4 KiB blocks of the file holding data, without block 0: qemu-img allocates the first
    block of every raw file it creates (file-posix allocate_first_block)."""
    return {b for a, e in data_extents(path) for b in range(a // 4096, -(-e // 4096))} - {0}


def l2_entry(img, index: int) -> tuple[int, int, int]:
    """(file offset, value, cluster_bits) of L2 entry `index` of the first L2 table."""
    import qcowfast
    with qcowfast.open(str(img)) as im:
        at, bits = int(im._l2_off[0]) + 8 * index, im.cluster_bits
    with open(img, "rb") as f:
        f.seek(at)
        return at, int.from_bytes(f.read(8), "big"), bits


def compressed_stream(entry: int, bits: int) -> tuple[int, int]:
    """(host offset, sector-rounded length) of a compressed cluster descriptor (qcow2.txt
    "Compressed Clusters Descriptor")."""
    x = 62 - (bits - 8)
    coffset = entry & ((1 << x) - 1)
    return coffset, (((entry >> x) & ((1 << (bits - 8)) - 1)) + 1) * 512 - (coffset & 511)


def patch_l2_entry(path, guest: int, value_of) -> None:
    """Replace the (standard) L2 entry serving guest offset `guest` of the qcow2 image at `path`
    by value_of(old entry)."""
    with open(path, "r+b") as f:
        h = f.read(48)
        bits, = struct.unpack_from(">I", h, 20)
        l1_offset, = struct.unpack_from(">Q", h, 40)
        l1_index, l2_index = divmod(guest >> bits, 1 << (bits - 3))
        f.seek(l1_offset + 8 * l1_index)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2 + 8 * l2_index)
        old, = struct.unpack(">Q", f.read(8))
        f.seek(l2 + 8 * l2_index)
        f.write(struct.pack(">Q", value_of(old)))


def both_tools(capsys, monkeypatch, workdir, argv, names=None):
    """(qemu-img's (status, stdout, stderr), qcowfast's in this process) for `argv` (`names`
    replaced: placeholder -> file name) run in `workdir`; what either leaves behind is
    removed."""
    argv = [(names or {}).get(a, a) for a in argv]
    before = set(workdir.iterdir())
    want = subprocess.run(["qemu-img", *argv], capture_output=True, cwd=workdir)
    _remove_new(workdir, before)
    monkeypatch.chdir(workdir)
    got = cli_in_process(capsys, *argv)
    _remove_new(workdir, before)
    # (decoded as they are: a progress report's carriage returns stay)
    return (want.returncode, want.stdout.decode(),
            want.stderr.decode().replace("qemu-img", "qcowfast")), got


def _remove_new(workdir, before) -> None:
    for p in set(workdir.iterdir()) - before:
        p.unlink()


def assert_as_qemu_img(capsys, monkeypatch, workdir, argv, status=None, names=None) -> None:
    """The same status, stdout and stderr; qemu-img's status is `status`, or not 0."""
    __tracebackhide__ = True
    want, got = both_tools(capsys, monkeypatch, workdir, argv, names)
    assert want[0] == status if status is not None else want[0] != 0, want
    assert got == want


#: (source image kind, convert options) reaching each of convert's paths, for tests that run
#: a conversion down every one of them.
CONVERSION_PATHS = [
    ("plain", {}),                                          # the numpy-free path
    ("zlib", {}),                                           # the general path, sparse
    ("zlib", {"sparse_size": 0}),                           # every unit written
    ("zlib", {"existing": True}),                           # in place, in guest order
    ("plain", {"format": "qcow2", "compression": "zlib"}),  # the QCOW2 writer
]
