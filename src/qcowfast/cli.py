"""The `qcowfast` command line: qemu-img's subcommands and option grammar over the qcowfast API.

Every QcowError becomes one line on stderr and exit code 1 (qemu-img's convention); usage errors
exit 1 too, as qemu-img's do. A traceback means a bug. Module-level imports stay cheap (no numpy):
`qcowfast --version` and `qcowfast info` must start fast; each command imports what it needs.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import stat
import struct
import sys
import time

from . import __version__
from .errors import QcowError

MAX_COROUTINES = 16                          # qemu-img convert -m: 1 .. MAX_COROUTINES
CACHE_MODES = ("none", "off", "writeback", "writethrough", "unsafe", "directsync")
OUTPUT_FORMATS = ("raw", "qcow2")
SOURCE_FORMATS = ("qcow2", "raw")
# QEMU 7.2's block drivers (Debian's `qemu-img --help`, "Supported formats"): a format outside
# them is unknown to qemu-img ("Unknown driver", "Unknown file format").
QEMU_DRIVERS = frozenset(
    "blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg "
    "file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio "
    "null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat".split())
# Those of them that do not open the image name as a file (URLs, device options).
_NOT_FILES = frozenset("blkverify ftp ftps gluster http https iscsi iser nbd nfs null-aio "
                       "null-co nvme rbd ssh vvfat".split())


def parse_size(text: str) -> int:
    """Parse a size as qemu-img does (QEMU's qemu_strtosz(), cli_getopt.strtosz): decimal, a
    fraction with a suffix, or 0x hex; an optional b/k/M/G/T/P/E suffix (powers of 1024), e.g.
    ``4096``, ``4k``, ``1.5M``, ``0x100000``."""
    from .cli_getopt import strtosz
    try:
        return strtosz(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (use e.g. 4096, 4k, 1M, 0x1000)") from None


def sparse_size(text: str) -> int:
    """-S: a multiple of 512 bytes up to 16 MiB (0: fully allocated output), as qemu-img wants."""
    from .constants import MAX_SPARSE_SIZE     # (here: --version and info start without it)
    try:
        value = parse_size(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E "
            "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value % 512 or value > MAX_SPARSE_SIZE:
        raise argparse.ArgumentTypeError(
            f"Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            f"up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection (fully allocates "
            f"output).")
    return value


def thread_count(text: str) -> int:
    """--threads: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r} (a positive integer)")
    return value


def coroutine_count(text: str) -> int:
    """convert -m: qemu-img's number of parallel requests (qemu_strtol, base 0: 1 to 16), else
    its line as the option is read; qcowfast uses that many threads."""
    from .cli_getopt import c_integer
    value = c_integer(text)
    if value is None or not 1 <= value <= MAX_COROUTINES:
        usage_exit(f"Invalid number of coroutines. Allowed number of coroutines is between 1 "
                   f"and {MAX_COROUTINES}", hint=False)
    return value


def sparse_option(text: str) -> int:
    """convert -S as img_convert() reads it: cvtnum(), then a multiple of 512 up to 16 MiB,
    else qemu-img's lines as the option is read."""
    from .constants import MAX_SPARSE_SIZE
    value = cvtnum("buffer size for sparse output", text)
    if value % 512 or value > MAX_SPARSE_SIZE:
        usage_exit(f"Invalid buffer size for sparse output specified. Valid sizes are multiples "
                   f"of 512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection "
                   f"(fully allocates output).", hint=False)
    return value


def cache_refusal(text: str, what: str = "cache") -> str | None:
    """qemu-img's line for a -t ("cache") or -T ("source cache") mode QEMU's
    bdrv_parse_cache_mode() refuses, else None. qemu-img checks -T before it opens the
    sources, -t once the output is created."""
    return None if text in CACHE_MODES else f"Invalid {what} option: {text}"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"


def _columns(stream) -> int:
    """The terminal width of `stream` (80 when it has none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class ProgressBar:
    """A one-line progress bar on a stream, redrawn in place at most 10 times a second.

    The line never exceeds the terminal's width (read at every redraw, so a resized window is
    followed): the bar shrinks first, then the rate and the ETA are dropped.
    """

    def __init__(self, stream, label: str):
        self.stream = stream
        self.label = label
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_done = -1
        self.drawn = False

    def line(self, done: int, total: int, columns: int, now: float) -> str:
        """The bar's text for `columns` columns (at most columns - 1 characters)."""
        frac = min(done / total, 1.0) if total else 1.0
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        pct = f"{frac * 100:5.1f}%"
        tails = [f" {human_size(done)}/{human_size(total)} {human_size(rate)}/s ETA {eta:.0f}s",
                 f" {human_size(done)}/{human_size(total)}", ""]
        room = columns - 1
        for tail in tails:
            width = room - len(self.label) - len(pct) - len(tail) - 4
            if width >= 10:
                fill = int(frac * width)
                return f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {pct}{tail}"
        return f"{self.label} {pct}"[:room]

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == self.last_done or (done < total and now - self.last < 0.1):
            return
        self.last, self.last_done = now, done
        columns = _columns(self.stream)
        # \r back to column 0, the line padded to erase a longer previous one.
        self.stream.write("\r" + self.line(done, total, columns, now).ljust(columns - 1))
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class QemuProgress:
    """qemu-img's progress report (util/qemu-progress.c), as scripts parse it.

    With -p: "    (P/100%)\r" (P with two decimals) at 0, whenever P has grown by more than
    `min_skip` points since the last report, and at 100; a newline at the end. The first
    report comes with the first progress (compare's once the images are open: an image that
    cannot be opened leaves the newline alone; convert reports 0 before it opens its source,
    as qemu-img convert does). Without -p nothing, except that
    after SIGUSR1 the next report is "    (P/100%)\n" on stderr, as in qemu-img. Like qemu-img's
    printf, a report that cannot be written is dropped: it never changes the job's outcome.
    Use as a context manager around the job, passing the object as its progress callback.
    """

    def __init__(self, stream, enabled: bool, min_skip: float):
        import threading
        self.stream = stream if enabled else None
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last = -1.0                    # nothing reported yet
        self.usr1 = False                   # SIGUSR1 asked for a report
        self.lock = threading.Lock()

    def _write(self, text: str) -> None:
        if not _write_quietly(self.stream, text):
            self.stream = None              # a closed pipe, a full disk: no more reports

    def _report(self, current: float) -> None:
        self.current = current
        if self.usr1:
            # Asked for by SIGUSR1; printed here, by the job, as qemu-img prints it from its
            # next progress call: a signal handler that writes could block on a full pipe and
            # be re-entered by the next signal.
            self.usr1 = False
            _write_quietly(sys.stderr, f"    ({current:3.2f}/100%)\n")
        if self.stream is None:
            return
        if self.last < 0:
            self.last = 0.0
            self._write("    (0.00/100%)\r")
        if self.stream is not None and current > 0 and (self._beyond(current)
                                                        or current == 100.0 > self.last):
            self.last = current
            self._write(f"    ({current:3.2f}/100%)\r")

    def _beyond(self, current: float) -> bool:
        return current > self.last + self.min_skip

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            self._report(min(100.0, 100.0 * done / total) if total > 0 else 100.0)

    def on_usr1(self) -> None:
        """SIGUSR1: the progress on stderr at the next report (not with -p, where qemu-img
        blocks the signal)."""
        if not self.enabled:
            self.usr1 = True

    def __enter__(self) -> "QemuProgress":
        global _progress_now
        _progress_now = self
        return self

    def complete(self) -> None:
        """Report 100% (qemu-img convert's last report, whatever the last callback said)."""
        with self.lock:
            self._report(100.0)

    def __exit__(self, exc_type, exc, tb) -> None:
        global _progress_now
        _progress_now = None
        if self.stream is not None:
            with self.lock:
                self._write("\n")
            self.stream = None


_progress_now: QemuProgress | None = None     # the job SIGUSR1 reports on


def _f32(x: float) -> float:
    """`x` rounded to a C float."""
    return struct.unpack("f", struct.pack("f", x))[0]


class SummedProgress(QemuProgress):
    """compare's report: img_compare() adds each step's share to a C float
    (qemu_progress_print(((float) chunk / total_size) * 100, 100)), so its percentages are
    float sums: they may round the other way than the exact share does, and stop short of
    100 (no 100% report then). Steps are the callback's (done, total) calls."""

    def __init__(self, stream, enabled: bool, min_skip: float):
        super().__init__(stream, enabled, min_skip)
        self.done = 0

    def _beyond(self, current: float) -> bool:
        return current > _f32(self.last + self.min_skip)

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if total <= 0:
                return self._report(100.0)
            share = _f32(_f32(_f32(done - self.done) / _f32(total)) * 100)
            self.done = done
            self._report(min(100.0, _f32(self.current + _f32(_f32(share / 100) * 100))))


def _on_usr1(signum, frame) -> None:
    """SIGUSR1 for the whole run (qemu-img never ends on it): report the job's progress, if a
    job reports any."""
    progress = _progress_now
    if progress is not None:
        progress.on_usr1()


def error_text(exc: BaseException, images=()) -> str:
    """The line for a failed command: a file that cannot be opened starts as qemu-img's does
    ("Could not open 'NAME': ..."), which scripts look for. `images`: the command's images as
    (path, format given or None), in the order qemu-img opens them (see _open_line). A
    snapshot not found is img_convert()'s line (the API's message lists the snapshots)."""
    from .errors import ImageOpenError, SnapshotNotFound
    if isinstance(exc, SnapshotNotFound):
        return SNAPSHOT_NOT_FOUND
    if getattr(exc, "qemu_snapshot", None):     # (a bad snapshot L1 table: check_l1)
        return f"Failed to load snapshot: {exc.qemu_snapshot}"
    text = str(exc)
    chain, top = getattr(exc, "qemu_chain", None), getattr(exc, "qemu_top", None)
    hint = getattr(exc, "qemu_hint", None)
    if chain and top is None and images and isinstance(exc, QcowError):
        top = os.fsdecode(images[0][0])     # a header read without the image's name (check)
    if chain and top is not None:
        text = f"Could not open '{top}': {chain}"
    elif isinstance(exc, ImageOpenError) and exc.filename and exc.strerror:
        # QEMU's file protocol names the file again ("Could not open 'X': Could not open 'X':
        # No such file or directory").
        text = f"Could not open '{exc.filename}': Could not open '{exc.filename}': " \
               f"{exc.strerror}"
    elif isinstance(exc, ImageOpenError) and exc.filename and not text.startswith("Could not"):
        text = f"Could not open '{exc.filename}': {text}"
    elif isinstance(exc, QcowError) and images:
        text = _open_line(exc, images) or text
    return text + (f"\n{hint}" if hint else "")


def _open_line(exc: QcowError, images) -> str | None:
    """qemu-img's line when `exc` is what opening one of `images` raised before its header
    was read (header faults carry their line: error_text), else None. To tell, each image is
    opened again the same way (only on this failure path) until one fails with the same
    message."""
    for path, fmt in images:
        try:
            line = _reopened(os.fsdecode(path), fmt, str(exc))
        except OSError:
            line = None
        if line is not None:
            return line
    return None


def _reopened(path: str, fmt: str | None, text: str) -> str | None:
    """qemu-img's line for image `path` (-f `fmt`) when opening it again fails with `text`:
    a directory, or a QCOW version 1 file qemu-img's qcow driver refuses."""
    from .errors import FormatError, UnsupportedFeature
    from .paths import open_file
    from .probe import detect_format
    try:
        opened = open_file(path, "image")
    except QcowError as exc:
        if str(exc) != text or not isinstance(exc, FormatError):
            return None
        if stat.S_ISDIR(os.stat(path).st_mode):    # (qemu-img blocks on a FIFO)
            return f"Could not open '{path}': 'file' driver requires '{path}' to be a " \
                   "regular file"
        return None
    with opened:
        if fmt is not None:
            return None
        try:
            detect_format(opened.fd, path)
        except UnsupportedFeature as exc:
            if str(exc) != text or os.pread(opened.fd, 8, 0) != b"QFI\xfb\0\0\0\1":
                return None
            # QEMU's qcow driver opens QCOW version 1 (which qcowfast does not read);
            # its header checks may refuse the file first.
            from .check import _qcow_v1_open
            try:
                _qcow_v1_open(opened.fd, path)
            except QcowError as refused:
                return str(refused)
        return None


def _write_quietly(stream, text: str) -> bool:
    """Write to a stream that may be gone (closed pipe, full disk): a status line must never
    change a command's outcome. Returns whether the text was written."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        return False
    return True


def usage_exit(*lines: str, hint: bool = True) -> "typing.NoReturn":  # noqa: F821
    """End as qemu-img ends on a command line it refuses: each line as one error_report()
    ("NAME: LINE", NAME from program_name()), then with `hint` error_exit()'s pointer to the
    help; status 1.
    (typing is not imported: every command's start-up would pay for it.)"""
    for line in lines:
        print(f"{program_name()}: {line}", file=sys.stderr)
    if hint:
        print(f"Try '{program_name()} --help' for more information", file=sys.stderr)
    raise SystemExit(1)


_INT64_MAX = (1 << 63) - 1
_SUFFIXES = ("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


def cvtnum(what: str, text: str) -> int:
    """qemu-img's cvtnum(): a size from 0 to INT64_MAX (qemu_strtosz), else its two lines (or
    one for a number out of range) and exit 1, as the option is read."""
    from .cli_getopt import strtosz
    try:
        value = strtosz(text)
    except ValueError:
        usage_exit(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for",
                   _SUFFIXES, hint=False)
    except OverflowError:
        value = _INT64_MAX + 1
    if value > _INT64_MAX:
        usage_exit(f"Invalid {what} specified. Must be between 0 and {_INT64_MAX}.",
                   hint=False)
    return value


OUTPUT_ERROR = "--output must be used with human or json as argument."


def _output_at_once(text: str) -> str:
    """--output as measure reads it: refused as the option is read."""
    if text not in ("human", "json"):
        usage_exit(OUTPUT_ERROR, hint=False)
    return text


def _add_output_option(p: argparse.ArgumentParser, tool: str, at_once: bool = False) -> None:
    """--output=human|json. qemu-img's info, map and check check the last one given once the
    images are counted (main()), measure each as it is read (`at_once`)."""
    p.add_argument("--output", type=_output_at_once if at_once else str, default="human",
                   metavar="human|json",
                   help=f"output format (default human); json prints what `qemu-img {tool} "
                        f"--output=json` prints")


def _add_force_share_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read the image even when a running QEMU holds it open for writing")


def _peek(path: str) -> tuple[int, bytes]:
    """(st_mode, first 8 bytes: none unless a regular file or block device) of `path`, opened
    without blocking; OSError when it cannot be opened or read, UnsafePathError (one line, as
    paths.open_file words it) for a name with a NUL byte, which os refuses with a bare
    ValueError."""
    if "\0" in path:
        from .errors import UnsafePathError
        raise UnsafePathError(f"image path {path!r} contains a NUL byte, which no file name "
                              "can hold")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        seekable = stat.S_ISREG(mode) or stat.S_ISBLK(mode)
        return mode, os.pread(fd, 8, 0) if seekable else b""
    finally:
        os.close(fd)


def format_refusal(path: str, fmt: str, option: str = "-f") -> str:
    """qemu-img's line for image `path` given with -f (`option`) `fmt`, a format qcowfast does
    not read: "Unknown driver" for a name QEMU lacks; else QEMU opens the file first (its
    failure is the line), then its driver would read the image: there qcowfast says what it
    reads instead."""
    if fmt not in QEMU_DRIVERS:
        return f"Could not open '{path}': Unknown driver '{fmt}'"
    if fmt not in _NOT_FILES:
        try:
            mode, _ = _peek(path)
        except OSError as exc:
            return f"Could not open '{path}': Could not open '{path}': {exc.strerror}"
        except QcowError as exc:                # (a NUL byte: _peek)
            return str(exc)
        if stat.S_ISDIR(mode):                  # (qemu-img blocks on a FIFO)
            return f"Could not open '{path}': 'file' driver requires '{path}' to be a " \
                   "regular file"
    return f"Could not open '{path}': {option} {fmt}: qcowfast reads qcow2 and raw images"


def repair_mode(text: str) -> str:
    """check -r, as img_check()'s getopt loop reads it: leaks or all, else its error_exit()."""
    if text not in ("leaks", "all"):
        usage_exit(f"Unknown option value for -r (expecting 'leaks' or 'all'): {text}")
    return text


# What QEMU's raw driver prints when it opens a probed raw image read-write (check -r).
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


def _file_refusal(path: str, writable: bool) -> str | None:
    """What QEMU's file driver says when it cannot open `path` (read-write when `writable`:
    check -r), else None."""
    if not path:
        return "Could not open '': The 'file' block driver requires a file name"
    try:
        mode, _ = _peek(path)
    except OSError as exc:
        return f"Could not open '{path}': Could not open '{path}': {exc.strerror}"
    except QcowError as exc:                    # (a NUL byte: _peek)
        return str(exc)
    why = None
    if writable and stat.S_ISDIR(mode):
        why = os.strerror(errno.EISDIR)         # (open(O_RDWR) fails before the type check)
    elif writable and not os.access(path, os.W_OK):
        why = os.strerror(errno.EACCES)
    elif stat.S_ISDIR(mode):                    # (qemu-img blocks on a FIFO)
        return f"Could not open '{path}': 'file' driver requires '{path}' to be a regular file"
    return None if why is None else f"Could not open '{path}': Could not open '{path}': {why}"


def _check_format(args) -> int:
    """check: qemu-img's refusals in img_check()'s order (a bad -r was refused as it was read,
    --output by main()): -T, then img_open()'s: the driver's name, -U with -r, the file
    (opened read-write with -r), the format; then the check itself (cmd_check)."""
    from .constants import QCOW_MAGIC
    image, fmt, repair = args.image, args.format, args.repair
    refused = cache_refusal(args.src_cache, "source cache") or image_opts_refusal(args, fmt)
    if refused is None and fmt is not None and fmt not in QEMU_DRIVERS:
        refused = f"Could not open '{image}': Unknown driver '{fmt}'"
    if refused is None and repair is not None and args.force_share:
        refused = f"Could not open '{image}': force-share=on can only be used with " \
                  "read-only images"
    if refused is None and fmt not in _NOT_FILES:
        refused = _file_refusal(image, writable=repair is not None)
    if refused is None and fmt not in (None, *SOURCE_FORMATS):
        refused = f"Could not open '{image}': -f {fmt}: qcowfast reads qcow2 and raw images"
    if refused is not None:
        print(f"{program_name()}: {refused}", file=sys.stderr)
        return 1
    if fmt == "raw":
        print(f"{program_name()}: This image format does not support checks", file=sys.stderr)
        return 63
    try:
        _, head = _peek(image)
    except OSError:
        head = b""
    # qemu-img's probes: qcow2 from version 2, qcow (which has no check either) version 1
    version = int.from_bytes(head[4:8].ljust(4, b"\0"), "big")
    magic = head[:4] == QCOW_MAGIC
    if fmt is None and repair is not None and not (magic and version):
        sys.stderr.write(RAW_PROBE_WARNING.format(image))
    if fmt == "qcow2" and not magic:
        print(f"{program_name()}: Could not open '{image}': Image is not in qcow2 format",
              file=sys.stderr)
        return 1
    if repair is not None and (fmt == "qcow2" or magic and version >= 2):
        # What qemu-img fails with before it repairs: the chain, then the snapshot table.
        from .check import check_open
        try:
            check_open(image, repair=repair, backing_dirs=args.allow_backing_dir,
                       force_share=args.force_share, probe=fmt is None)
        except QcowError as exc:
            return _check_failed(exc, args)
        print(f"{program_name()}: check -r {repair}: qcowfast does not repair images (it never "
              "writes to them); repair with qemu-img check -r", file=sys.stderr)
        return 1
    return cmd_check(args)


def _add_source_cache_option(p: argparse.ArgumentParser) -> None:
    """-T, checked by each command where qemu-img checks it (cache_refusal)."""
    p.add_argument("-T", dest="src_cache", default="writeback",
                   metavar="CACHE", help="source cache mode (accepted; qcowfast reads through "
                                         "the page cache)")


def _option_list(text: str) -> str:
    """convert -o as img_convert()'s accumulate_options() reads it: a list that cannot be
    joined to the others is refused there."""
    if not _valid_option_list(text):
        usage_exit(f"Invalid option list: {text}", hint=False)
    return text


IMAGE_OPTS_REFUSED = ("--image-opts: not supported by qcowfast (option strings instead of file "
                      "names)")


def image_opts_refusal(args, fmt: str | None = None) -> str | None:
    """--image-opts outside convert, where img_open() reads the first file name as an option
    string (every check of the command line before it has passed): with a format (`fmt`),
    qemu-img's own line; else refused by name. None without --image-opts."""
    if not getattr(args, "image_opts", False):
        return None
    return "--image-opts and --format are mutually exclusive" if fmt is not None \
        else IMAGE_OPTS_REFUSED


class _ObjectOption(argparse.Action):
    """--object: checked as qemu-img checks it while reading its options (cli_getopt.
    qemu_object: its line, status 1, compare's 2), then kept and ignored; a request for help
    is answered then with status 0, as qemu-img answers it (its list of object types is
    QEMU's, not qcowfast's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .cli_getopt import qemu_object
        try:
            asked = qemu_object(values, namespace.__dict__.setdefault("_objects", {}))
        except ValueError as exc:
            print(f"{program_name()}: {exc}", file=sys.stderr)
            parser.exit(2 if parser.prog.endswith(" compare") else 1)
        if asked:
            print("qcowfast creates no QEMU objects: --object is accepted and ignored")
            parser.exit(0)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


def _add_open_options(p: argparse.ArgumentParser) -> None:
    if "--image-opts" not in p._option_string_actions:
        p.add_argument("--image-opts", dest="image_opts", action="store_true",
                       help=argparse.SUPPRESS)     # refused where qemu-img opens the image
    p.add_argument("--object", metavar="OBJECTDEF", action=_ObjectOption, default=[],
                   help="a QEMU object definition (accepted and ignored: qcowfast reads no "
                        "encrypted images and uses no other QEMU objects)")
    p.add_argument("--allow-backing-dir", metavar="DIR", action="append", default=[],
                   help="also follow backing and external data files named inside the image "
                        "when they lie in DIR (by default only files in the image's own "
                        "directory are followed)")


class CliError(Exception):
    """A command line qcowfast cannot honour: one line on stderr, exit code 1."""


class QemuLine(CliError):
    """A command line refused with qemu-img's own line ("NAME: LINE", where other
    CliErrors name the subcommand) and its exit status (1 unless qemu-img's differs)."""

    def __init__(self, line: str, status: int = 1):
        super().__init__(line)
        self.status = status


class _Unsupported(argparse.Action):
    """An option of qemu-img convert that needs a feature qcowfast lacks: refused by name (its
    value first checked as qemu-img reads it: -r's rate, of which 0, no limit, is the last
    one's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "unsupported", [])
        if option_string == "-r":
            limited = cvtnum("rate limit", values[0]) > 0
            given = [option for option in given if option != "-r"] + ["-r"] * limited
        else:
            given = [*given, option_string]
        namespace.unsupported = given


_SNAPSHOT_KEYS = ("snapshot.id", "snapshot.name")
_SNAPSHOT_HELP = ("snapshot options:\n  snapshot.id=<str>      - snapshot id\n"
                  "  snapshot.name=<str>    - snapshot name\n")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def _qemu_opts(text: str):
    """QEMU's option text (util/qemu-option.c get_opt_name_value(), no implied first key) as
    (name, value, flag) items: "key=value" (',,' is a literal comma), or a flag "key" (on)
    or "nokey" (off), flag being the key as written."""
    p = 0
    while p < len(text):
        length = len(re.match(r"[^=,]*", text[p:]).group(0))
        if p + length < len(text) and text[p + length] == "=":
            name, p, value = text[p:p + length], p + length + 1, []
            while True:                         # get_opt_value(): ',,' is a comma
                comma = text.find(",", p)
                comma = len(text) if comma < 0 else comma
                value.append(text[p:comma])
                if text[comma + 1:comma + 2] != ",":
                    break
                value.append(",")
                p = comma + 2
            p, item = comma, (name, "".join(value), None)
        else:
            flag, p = text[p:p + length], p + length
            item = (flag[2:], "off", flag) if flag.startswith("no") else (flag, "on", flag)
        if text[p:p + 1] == ",":
            p += 1
        yield item


class _SnapshotParam(argparse.Action):
    """convert -l: a `snapshot.*` value is parsed as qemu-img parses it while reading its
    options (qemu_opts_parse_noisily() on internal_snapshot_opts), with its warnings and
    errors ("Failed in parsing snapshot param ...", exit 1), and kept as the snapshot.id /
    snapshot.name text qcowfast reads; any other value names a snapshot by id or name."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.startswith("snapshot."):
            values = self.parsed(values, namespace)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])

    @staticmethod
    def parsed(text: str, namespace) -> str:
        def fail(*lines: str) -> "typing.NoReturn":  # noqa: F821
            for line in lines:
                print(line, file=sys.stderr)
            print(f"{program_name()}: Failed in parsing snapshot param '{text}'", file=sys.stderr)
            raise SystemExit(1)

        ident = next((value for name, value, _ in _qemu_opts(text) if name == "id"), None)
        ids = namespace.__dict__.setdefault("_snapshot_ids", set())
        if ident is not None and not _IDENTIFIER.fullmatch(ident):
            fail(f"{program_name()}: Parameter 'id' expects an identifier",
                 "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        if ident is not None and ident in ids:
            fail(f"{program_name()}: Duplicate ID '{ident}' for snapshot")
        def helped() -> "typing.NoReturn":     # noqa: F821
            sys.stdout.write(_SNAPSHOT_HELP)
            fail()

        chosen = _opts_chosen(_qemu_opts(text), _SNAPSHOT_KEYS, helped,
                              lambda name: fail(f"{program_name()}: Invalid parameter '{name}'"))
        if ident is not None:
            ids.add(ident)
        return ",".join(f"{name}={value.replace(',', ',,')}" for name, value in chosen.items())


# qemu-img convert options that qcowfast refuses by name (each needs a feature it lacks).
_OPTION_STRINGS = ("--image-opts", "--target-image-opts")
_UNSUPPORTED = {"--image-opts": ("option strings instead of file names", 0),
                "--target-image-opts": ("option strings instead of file names", 0),
                "-r": ("rate limits", 1),
                "-C": ("copy offloading as a requirement", 0), "--salvage": ("salvaging", 0),
                "--bitmaps": ("copying bitmaps", 0), "--skip-broken-bitmaps": ("bitmaps", 0)}
_OUTPUT_OPTIONS = ("compression_type", "cluster_size")
# qemu-img -o keys qcowfast accepts only with the value it writes anyway: (values, what it is).
_FIXED_OPTIONS = {
    "qcow2": {"compat": (("1.1", "v3"), "QCOW2 version (qcowfast writes v3: compat=1.1)"),
              "lazy_refcounts": (("off", "no", "false", "n"), "lazy refcounts (off)"),
              "refcount_bits": (("16",), "refcount width in bits (16)"),
              "extended_l2": (("off", "no", "false", "n"), "extended L2 entries (off)"),
              "preallocation": (("off",), "preallocation mode (off)"),
              "data_file_raw": (("off", "no", "false", "n"), "raw external data file (off)"),
              "encryption": (("off",), "encryption (off)")},    # (QEMU: any other value
                                                                  # names encrypt.format)
}
# -o keys of the output file itself, for every output format: (values meaning on, help).
_FILE_OPTIONS = {"nocow": (("on", "yes", "true", "y"),
                           "on|off - no copy-on-write file attribute, for btrfs (default off)")}
_NUMBER_OPTIONS = ("refcount_bits",)
# qemu-img create keys qcowfast knows but does not write (refused by name, with what they do).
_UNSUPPORTED_OUTPUT_OPTIONS = {"backing_file": "output backing files (-B)",
                               "backing_fmt": "output backing files (-B, -F)",
                               "data_file": "external data files",
                               "encryption": "encryption", "encrypt": "encryption"}
# file-posix's extent size hint (FS_IOC_FSSETXATTR extsize: XFS uses it, ext4 ignores it): no
# effect on the bytes written, so accepted and ignored once QEMU's limit is checked (in the
# _*_create_refusal functions, where file-posix checks it).
_EXTENT_HINT = "extent_size_hint"
_EXTENT_HINT_MAX = 0xFFFFFFFF
_OPTION_HELP = {"cluster_size": "<size> - qcow2 cluster size, 512 to 2M (default 64k)",
                "compression_type": "<str> - compression with -c: zlib (default) or zstd"}


def _print_output_options(fmt: str, named: bool) -> None:
    """qemu-img's `-o help`: the options qcowfast takes for this output format (headed as
    qemu-img heads them: "Supported options:" once the output file is named, when qemu-img adds
    its protocol's options)."""
    lines = [f"  {key}={_OPTION_HELP[key]}" for key in _OUTPUT_OPTIONS if fmt == "qcow2"]
    lines += [f"  {key}={what}" for key, (_, what) in _FILE_OPTIONS.items()]
    lines.append(f"  {_EXTENT_HINT}=<size> - extent size hint of the file (accepted and "
                 "ignored)")
    lines += [f"  {key}={'|'.join(values)} - {what}"
              for key, (values, what) in _FIXED_OPTIONS.get(fmt, {}).items()]
    if fmt == "raw":
        lines.append("  preallocation=off|falloc|full - preallocation mode of the file: "
                     "falloc allocates its blocks, full writes every byte (default off)")
    try:
        print("Supported options:" if named else f"Supported {fmt} options:", *lines, sep="\n",
              flush=True)
    except BrokenPipeError:
        _quiet_stdout()                     # `| head`: end quietly, as qemu-img does


def _options_help(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """`qcowfast convert ... -o help ...` (`argv` as cli_getopt spells it for `parser`): print
    the options of -O's format and return True. As in qemu-img, once every option is read (a
    bad value, an unknown option or --object is refused first, in its place), then options
    that do not go together (-n refuses -o); the file names may be left out (and are not
    used); a format qemu-img does not know is refused (one qcowfast does not write, too)."""
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("-O", default="raw")
    p.add_argument("-o", action="append", default=[])
    try:
        known, rest = p.parse_known_args(argv)
    except argparse.ArgumentError:
        return False            # -O or -o lacks its value: the command's parser says so
    if not any(re.search(r"(^|(?<!,),)(help|\?)(,|$)", text) for text in known.o):
        return False
    # qemu-img's getopt loop, then its checks of option pairs (file names stand in for those
    # left out: the help does not count them)
    ends = [] if "--" in argv else ["--"]
    args, _ = parser.parse_known_args(["convert", *argv, *ends, "SRC", "DST"])
    refused = _pairing_refusal(args)
    if refused:
        usage_exit(refused, hint=False)
    fmt = "raw" if known.O == "host_device" else known.O
    if fmt not in QEMU_DRIVERS:
        usage_exit(f"Unknown file format '{fmt}'", hint=False)
    if fmt not in OUTPUT_FORMATS:
        print(f"{program_name()}: convert: -O {fmt}: qcowfast writes "
              f"{' and '.join(OUTPUT_FORMATS)} images", file=sys.stderr)
        raise SystemExit(1)
    _print_output_options(fmt, any(not a.startswith("-") for a in rest))
    return True


def _valid_option_list(text: str) -> bool:
    """qemu-img's is_valid_option_list(): each -o can be joined to the others with ',': not
    empty, no leading ',', no odd number of trailing ',' (',,' is an escaped comma)."""
    return bool(text) and not text.startswith(",") and \
        (len(text) - len(text.rstrip(","))) % 2 == 0


NO_EFFECT = "-o has no effect when skipping image creation"
_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}       # -o compat, as qcow2 translates it
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def _output_options(texts: list[str], fmt: str, existing: bool, dst: str | None = None,
                    compress: bool = False, backing: tuple = (None, None, 1),
                    objects=()) -> dict:
    """Parse qemu-img's -o key=val[,key=val...] (',,' is a literal comma) for output format
    `fmt` into {cluster_size, compression_type, nocow} as convert() takes them; of a key given
    more than once, the last value counts, as in QEMU's option parser.

    Refusals come in img_convert()'s order, in qemu-img's words where QEMU refuses too: -o
    with -n (`existing`), the option lists, each key and value (qemu_opts_do_parse), the
    backing file (`backing`: -B, -F and the number of sources; _backing_refusal), -c
    (`compress`) with the format, then what creating the image `dst` refuses ("DST: error
    while converting FMT: ...", given the --object definitions `objects` for an encryption
    key's secret). Keys QEMU takes but qcowfast cannot honour come last, in
    qcowfast's words. Without `dst` (no qemu-img command line: convert-many) each refusal is
    one line.
    """
    from .cli_measure import create_options
    if existing and texts:
        raise QemuLine(NO_EFFECT)
    for text in texts:
        if not _valid_option_list(text):
            raise CliError(f"Invalid option list: {text}")
    try:
        items = create_options(texts, fmt, device=bool(dst) and not existing and
                               probes_as_device(dst))
    except ValueError as exc:
        if dst is None:
            raise CliError(f"-o {','.join(texts)}: {str(exc).splitlines()[0]}") from None
        raise QemuLine(str(exc)) from None
    items.pop("size", None)                     # (qemu-img convert sets the source's size)
    hint = items.pop(_EXTENT_HINT, (None, 0))[1]
    fixed = _FIXED_OPTIONS.get(fmt, {})
    refused = None if existing or dst is None else _backing_refusal(items, fmt, *backing)
    if refused is not None:
        raise QemuLine(refused)
    if compress and fmt != "qcow2":
        if dst is not None:
            raise QemuLine("Compression not supported for this file format")
        raise CliError(f"-c: compression needs -O qcow2 (-O {fmt} cannot be compressed)")
    prealloc = items.get("preallocation", ("off",))[0]
    if compress and prealloc != "off":
        raise QemuLine("Compression and preallocation not supported at the same time")
    # -B and -F join -o's keys (add_old_style_options(): they win over backing_file=...)
    created = {**items, **{key: (value, value) for key, value in zip(
        ("backing_file", "backing_fmt"), backing[:2]) if value is not None}}
    target = None if existing else dst
    # A raw image's file is created by the protocol driver its name probes as: host_device
    # for a device (bdrv_find_protocol(), hdev_probe_device()), which creates nothing.
    why = _qcow2_create_refusal(created, hint, target, objects) if fmt == "qcow2" else \
        _host_device_create_refusal(created, target) \
        if fmt == "host_device" or (target and probes_as_device(target)) else \
        _raw_create_refusal(created, hint, target)
    if why is not None:
        raise QemuLine(f"{dst}: error while converting {fmt}: {why}" if dst is not None else why)
    for key in items:
        unsupported = _UNSUPPORTED_OUTPUT_OPTIONS.get(key.split(".", 1)[0])
        if unsupported and key not in fixed:
            raise CliError(f"-o {key}: not supported by qcowfast ({unsupported})")
    opts = {}
    for key, (text, value) in items.items():
        if key in _FILE_OPTIONS:
            opts[key] = value
        elif key in fixed:
            values, what = fixed[key]
            if key in _NUMBER_OPTIONS:          # QEMU_OPT_NUMBER: strtoull(value, 0)
                known = value == int(values[0])
            else:
                known = text in values          # case matters, as in QEMU's option parser
            if not known:
                raise CliError(f"-o {key}={text}: qcowfast writes only {key}={values[0]} "
                               f"({what})")
        else:
            opts[key] = value                   # cluster_size, compression_type
    return opts


CONCATENATED_BACKING = ("Having a backing file for the target makes no sense when concatenating "
                        "multiple input images")
# QEMU 7.2's BlockdevDriver enum as Debian builds it (backing-fmt's values).
_BLOCKDEV_DRIVERS = (QEMU_DRIVERS - {"iser"}) | {"blkreplay"}


def _backing_refusal(items: dict, fmt: str, backing_file: str | None, backing_fmt: str | None,
                     sources: int) -> str | None:
    """img_convert()'s line for the output's backing file once -o is read into `items`
    (add_old_style_options() for -B and -F, then the backing file from either), else None."""
    if fmt != "qcow2" and backing_file is not None:
        return f"Backing file not supported for file format '{fmt}'"
    if fmt != "qcow2" and backing_fmt is not None:
        return f"Backing file format not supported for file format '{fmt}'"
    named = backing_file is not None or "backing_file" in items
    if named and sources > 1:
        return CONCATENATED_BACKING
    if named and backing_fmt is None and "backing_fmt" not in items:
        return "Use of backing file requires explicit backing format"
    return None


def _qcow2_create_refusal(items: dict, hint: int = 0, dst: str | None = None,
                          objects=()) -> str | None:
    """What creating a qcow2 image `dst` with these -o values (and extent size `hint`) fails
    on, in QEMU's order and words (qcow2_co_create_opts(): the file first, then the members
    its visitor reads, then qcow2_co_create()'s checks, its encryption last, given the
    --object definitions `objects`); None when QEMU creates it."""
    from .output import create_refusal
    if hint > _EXTENT_HINT_MAX:
        return "Extent size hint is too large"
    created = None if dst is None else create_refusal(dst)
    if created is not None:
        return created

    def text(key):
        return items[key][0] if key in items else None

    def value(key, default):
        return items[key][1] if key in items else default

    # encryption=on means encrypt.format=qcow (as "aes" does); off means no encryption.
    encrypted = text("encryption") == "on" or any(k.startswith("encrypt.") for k in items)
    cipher = text("encrypt.format") or ("qcow" if text("encryption") == "on" else None)
    for key, name, allowed in (("compat", "version", _VERSIONS),
                               ("backing_fmt", "backing-fmt", _BLOCKDEV_DRIVERS),
                               ("encrypt.format", "format", ("qcow", "aes", "luks")),
                               ("preallocation", "preallocation", _PREALLOC_MODES),
                               ("compression_type", "compression-type", ("zlib", "zstd"))):
        if key in items and text(key) not in allowed:
            return f"Parameter '{name}' does not accept value '{text(key)}'"
        if key == "encrypt.format" and encrypted and cipher is None:
            return "Parameter 'encrypt.format' is missing"
    version = _VERSIONS.get(text("compat"), 3)
    cluster_size, extended_l2 = value("cluster_size", 65536), value("extended_l2", False)
    refcount_bits = value("refcount_bits", 16)
    v3 = "compatibility level 1.1 and above (use version=v3 or greater)"
    if extended_l2 and version < 3:
        return f"Extended L2 entries are only supported with {v3}"
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        return "Cluster size must be a power of two between 512 and 2048k"
    if extended_l2 and cluster_size < 16384:
        return "Extended L2 entries are only supported with cluster sizes of at least 16384 " \
               "bytes"
    if "backing_file" in items and text("preallocation") not in (None, "off") and not extended_l2:
        return "Backing file and preallocation can only be used at the same time if " \
               "extended_l2 is on"
    if "backing_fmt" in items and "backing_file" not in items:
        return "Backing format cannot be used without backing file"
    if value("lazy_refcounts", False) and version < 3:
        return f"Lazy refcounts only supported with {v3}"
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or not refcount_bits:
        return "Refcount width must be a power of two and may not exceed 64 bits"
    if refcount_bits != 16 and version < 3:
        return "Different refcount widths than 16 bits require compatibility level 1.1 or " \
               "above (use version=v3 or greater)"
    if value("data_file_raw", False):           # (data_file is refused before: none here)
        return "data-file-raw requires data-file"
    if text("compression_type") == "zstd" and version < 3:
        return f"Non-zlib compression type is only supported with {v3}"
    if encrypted:                               # (qcow2_set_up_encryption(), the crypto layer)
        return _secret_refusal(text("encrypt.key-secret"), objects)
    return None


def _secret_refusal(secret: str | None, objects) -> str | None:
    """The crypto layer's line for an encryption key `secret` (an --object id) that is not
    given, or names no secret among `objects`; None when it does."""
    from .cli_getopt import keyval
    if secret is None:
        return "Parameter 'encrypt.key-secret' is required for cipher"
    for text in objects:
        try:
            fields, _ = keyval(text, "qom-type")
        except ValueError:
            continue
        if fields.get("qom-type") == "secret" and fields.get("id") == secret:
            return None
    return f"No secret with id '{secret}'"


def _raw_create_refusal(items: dict, hint: int = 0, dst: str | None = None) -> str | None:
    """The same for raw (file-posix's raw_co_create_opts(), then raw_co_create())."""
    from .output import create_refusal
    prealloc = items.get("preallocation", ("off",))[0]
    if prealloc not in _PREALLOC_MODES:
        return f"invalid parameter value: {prealloc}"
    if hint > _EXTENT_HINT_MAX:
        return "Extent size hint is too large"
    created = None if dst is None else create_refusal(dst)
    if created is not None:
        return created
    if prealloc == "metadata":
        return "Unsupported preallocation mode: metadata"
    return None


def probes_as_device(name: str) -> bool:
    """Whether QEMU takes `name` for a host device (hdev_probe_device(): a character or block
    device)."""
    try:
        mode = os.stat(name).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _host_device_create_refusal(items: dict, dst: str | None = None) -> str | None:
    """The same for host_device, which creates nothing (bdrv_co_create_opts_simple(): the
    preallocation mode, then the device opened as it is; the extent size hint unread)."""
    prealloc = items.get("preallocation", ("off",))[0]
    if prealloc not in _PREALLOC_MODES:
        return f"invalid parameter value: {prealloc}"
    if prealloc != "off":
        return f"Unsupported preallocation mode '{prealloc}'"
    refused = None if dst is None else host_device_refusal(dst)
    if refused is not None:
        return "Protocol driver 'host_device' does not support image creation, and opening " \
               f"the image failed: {refused}"
    return None


# img_convert(): bdrv_snapshot_load_tmp_by_id_or_name()'s -ENOENT ("Can't find snapshot")
SNAPSHOT_NOT_FOUND = "Failed to load snapshot: Can't find snapshot"
RAW_SNAPSHOT = ("Failed to load snapshot: Block format 'raw' used by device '' does not "
                "support temporarily loading internal snapshots")


def opened_as_raw(path, fmt: str | None, **kw) -> bool:
    """Whether image `path` (-f `fmt`) opens as raw, as qemu-img opens it before it loads a
    snapshot (a raw image has none: RAW_SNAPSHOT). `kw`: open_source()'s."""
    from .image import RawImage, open_source
    with open_source(path, fmt, **kw) as image:
        return isinstance(image, RawImage)


def _source_opens(args) -> None:
    """Open convert's sources as qemu-img does before it reads -O and -o (every one in order,
    then the snapshot, of the first), and close them: a failure there is the one qemu-img
    reports."""
    from .errors import UnsupportedFeature
    from .image import open_source
    from .snapshots import choose_snapshot_option
    snapshot = choose_snapshot_option(args.snapshot)
    kw = dict(backing_dirs=args.allow_backing_dir, force_share=args.force_share)
    if args.extra:
        for path in (args.src, *args.extra):
            open_source(path, args.src_format, **kw).close()
        if snapshot is None:
            return
        if not any(value.startswith("snapshot.") for value in args.snapshot):
            raise QemuLine("No support for concatenating multiple snapshot")
    try:
        open_source(args.src, args.src_format, snapshot=snapshot, **kw).close()
    except UnsupportedFeature:
        if snapshot is not None and opened_as_raw(args.src, args.src_format, **kw):
            raise QemuLine(RAW_SNAPSHOT) from None
        raise


def convert_arguments(args) -> tuple[str, str, dict]:
    """Map a parsed `qcowfast convert` command line to convert()'s (src, dst, keywords).

    Raises CliError for command lines qcowfast refuses, in img_convert()'s order where
    qemu-img refuses them too (a bad -m, -S, -r, -o list or -l was refused as it was read):
    see _command_line_refusal, then _source_arguments.
    """
    _operands(args)
    _command_line_refusal(args)
    return _source_arguments(args)


def _command_line_refusal(args) -> None:
    """Raise what img_convert() refuses before it starts its progress report: options that
    do not go together (_pairing_refusal), then -T; then qcowfast's refusals by name of the
    options that change what the file names are (the others come once qemu-img's checks
    have passed: _late_refusal)."""
    refused = _pairing_refusal(args)
    if refused is None and args.dst is None:
        refused = "Must specify image file name"
    refused = refused or cache_refusal(args.src_cache, "source cache")
    if refused is None and "--image-opts" in getattr(args, "unsupported", []) and \
            args.src_format is not None:
        refused = "--image-opts and --format are mutually exclusive"     # (img_open())
    if refused:
        raise QemuLine(refused)
    for option in getattr(args, "unsupported", []):
        if option in _OPTION_STRINGS:
            raise CliError(f"{option}: not supported by qcowfast ({_UNSUPPORTED[option][0]})")


def _late_refusal(args) -> None:
    """qcowfast's refusals by name of what qemu-img would go on with once its own checks have
    passed: options it lacks, output backing files (-F is ignored with -n, as qemu-img
    ignores it), several sources. --bitmaps comes first: qemu-img refuses a raw output then
    (once the output is open)."""
    given = getattr(args, "unsupported", [])
    if "--bitmaps" in given and args.output_format == "raw":
        raise QemuLine("Format driver 'raw' does not support bitmaps")
    if "--bitmaps" in given and not getattr(args, "source_bitmaps", True):
        # A source without bitmaps: qemu-img copies none (convert_copy_bitmaps()), as here.
        given = [o for o in given if o not in ("--bitmaps", "--skip-broken-bitmaps")]
    for option in sorted(given, key=lambda option: option != "--bitmaps"):
        raise CliError(f"{option}: not supported by qcowfast ({_UNSUPPORTED[option][0]})")
    for option, value in (("-B", args.backing_file),
                          ("-F", None if args.existing else args.backing_format)):
        if value is not None:
            raise CliError(f"{option}: not supported by qcowfast (output backing files)")
    if args.extra:
        raise CliError("multiple source images are not supported (qemu-img would concatenate "
                       "them); convert one image at a time")


def _source_arguments(args) -> tuple[str, str, dict]:
    """The rest, in img_convert()'s order: the sources (-f; they are opened before -O and -o
    are looked at: on a refusal they are opened, and a failure there is the one reported;
    several sources are opened first, as qemu-img opens them, and refused once all its checks
    have passed), -O, -o, -t."""
    if args.src_format is not None and args.src_format not in SOURCE_FORMATS:
        raise QemuLine(format_refusal(args.src, args.src_format))
    if args.extra:
        _source_opens(args)
        return _convert_keywords(args)
    from .errors import UnsafePathError
    try:
        return _convert_keywords(args)
    except (CliError, UnsafePathError):         # (UnsafePathError: DST with a NUL byte)
        _source_opens(args)
        raise


def _pairing_refusal(args) -> str | None:
    """img_convert()'s line for options that do not go together, checked in its order once
    its options are read, else None."""
    given = getattr(args, "unsupported", [])
    copy_range = "-C" in given
    for refused, line in (
            ("--skip-broken-bitmaps" in given and "--bitmaps" not in given,
             "Use of --skip-broken-bitmaps requires --bitmaps"),
            (copy_range and args.compress, "Cannot enable copy offloading when -c is used"),
            (copy_range and args.sparse_size is not None,
             "Cannot enable copy offloading when -S is used"),
            (copy_range and "--salvage" in given, "Cannot use copy offloading in salvaging mode"),
            ("--target-image-opts" in given and not args.existing,
             "--target-image-opts requires use of -n flag"),
            (args.options and args.existing, NO_EFFECT),
            (args.target_is_zero and not args.existing,
             "--target-is-zero requires use of -n flag")):
        if refused:
            return line
    return None


def _in_place_refusal(args) -> QemuLine | None:
    """With -n, img_convert()'s refusal once the sources are open: of a backing file (-B;
    --target-is-zero with one ends it with status 0), then of -t, then of opening the target:
    the driver's name (-O), the file (opened read-write, never created)."""
    from .output import open_errno, stream_target
    dst, fmt = args.dst, args.output_format
    if args.backing_file is not None and args.target_is_zero:
        # qemu-img leaves with the status of its last call that worked
        return QemuLine("Cannot use --target-is-zero when the destination image has a "
                        "backing file", status=0)
    if args.backing_file is not None and args.extra:
        return QemuLine(CONCATENATED_BACKING)
    refused = cache_refusal(args.cache or "unsafe")
    if refused is None and fmt not in QEMU_DRIVERS:
        refused = f"Could not open '{dst}': Unknown driver '{fmt}'"
    if refused is None and fmt not in _NOT_FILES and stream_target(dst) is None:
        err = open_errno(dst, create=False) if dst else None
        driver = "host_device" if fmt == "host_device" else "file"
        refused = (f"Could not open '{dst}': The '{driver}' block driver requires a file name"
                   if not dst else None if err is None else
                   f"Could not open '{dst}': Could not open '{dst}': {os.strerror(err)}")
    return None if refused is None else QemuLine(refused)


def _convert_keywords(args) -> tuple[str, str, dict]:
    from .snapshots import choose_snapshot_option
    fmt = args.output_format
    refused = _in_place_refusal(args) if args.existing else None
    if refused is not None:
        raise refused
    backing = (args.backing_file, args.backing_format, 1 + len(args.extra))
    if fmt == "host_device":
        # QEMU's raw protocol driver for devices: the same bytes as raw, into an existing
        # device (qemu-img refuses anything else). -o is read against its creation options
        # and "creating" it opens the device (_host_device_create_refusal); its size is
        # checked once the source is open (cmd_convert).
        opts = _output_options(args.options, fmt, args.existing, args.dst, args.compress,
                               backing, args.object)
        refused = host_device_refusal(args.dst) if args.existing else None
        if refused is not None:
            raise QemuLine(f"Could not open '{args.dst}': {refused}")
        fmt = "raw"
    elif fmt not in QEMU_DRIVERS:
        raise QemuLine(f"Unknown file format '{fmt}'")
    elif fmt not in OUTPUT_FORMATS:
        raise CliError(f"-O {fmt}: qcowfast writes {' and '.join(OUTPUT_FORMATS)} images")
    else:
        opts = _output_options(args.options, fmt, args.existing, args.dst, args.compress,
                               backing, args.object)
    refused = _bitmaps_refusal(args)
    if refused:
        raise refused
    refused = cache_refusal(args.cache or "unsafe")    # (qemu-img: once the output exists)
    if refused:
        raise QemuLine(refused)
    _late_refusal(args)
    if args.compression_level is not None and not args.compress:
        raise CliError("--compression-level needs -c")
    if args.dst == "-" and "stdout" in _CLOSED_STREAMS:
        raise CliError("standard output is closed: nowhere to write the image")
    if args.dst == "-" and sys.stdout.isatty():
        raise CliError("refusing to write a binary image to a terminal; redirect standard "
                       "output or name an output file")
    kw = dict(format=fmt, src_format=args.src_format,
              compression=opts.get("compression_type", "zlib") if args.compress else None,
              compression_type=opts.get("compression_type"),
              level=args.compression_level,
              cluster_size=opts.get("cluster_size", 65536), nocow=opts.get("nocow", False),
              preallocation=opts.get("preallocation", "off"),
              threads=args.threads or args.coroutines,
              sparse_size=4096 if args.sparse_size is None else args.sparse_size,
              overwrite=not args.no_clobber, existing=args.existing,
              target_is_zero=args.target_is_zero, force_share=args.force_share,
              direct=args.cache in ("none", "off", "directsync"),
              # (bdrv_close() flushes, except under cache=unsafe, qemu-img convert's default)
              fsync=args.fsync or args.cache not in (None, "unsafe"),
              backing_dirs=args.allow_backing_dir,
              snapshot=choose_snapshot_option(args.snapshot),
              max_stream_size=args.max_stream_size or None)
    return args.src, args.dst, kw


def _bitmaps_refusal(args) -> QemuLine | None:
    """convert --bitmaps where img_convert() first reads it, before it creates the output (and
    checks -t): several sources, or a source that cannot store bitmaps (raw, qcow2 v2:
    convert_check_bitmaps()); else None (see _late_refusal)."""
    if "--bitmaps" not in getattr(args, "unsupported", []):
        return None
    if args.extra:
        return QemuLine("Copying bitmaps only possible with single source")
    from .image import Image, open_source
    try:
        with open_source(args.src, args.src_format, backing_dirs=args.allow_backing_dir,
                         force_share=args.force_share) as image:
            capable = isinstance(image, Image) and image.header.version >= 3
            args.source_bitmaps = capable and image.header.bitmaps is not None
    except QcowError:
        capable = True                      # (the source's own failure is reported first)
    return None if capable else QemuLine("Source lacks bitmap support")


def host_device_refusal(dst: str) -> str | None:
    """What QEMU's host_device driver says when it cannot open `dst` (hdev_open(): opened
    read-write, then its type checked), else None."""
    from .output import open_errno
    if not dst:
        return "The 'host_device' block driver requires a file name"
    err = open_errno(dst, create=False)
    if err is not None:
        return f"Could not open '{dst}': {os.strerror(err)}"
    st = os.stat(dst)
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return f"'host_device' driver requires '{dst}' to be either a character or block " \
               "device"
    return None


def _operands(args) -> None:
    """The file names in command-line order (argparse's SRC, DST, extra; an optional DST can
    be passed over while a later name goes to extra): the last is DST, as qemu-img reads them
    (None with fewer than two); SRC the first source, extra the others."""
    if not getattr(args, "operands_read", False):
        names = [name for name in (args.src, args.dst, *args.extra) if name is not None]
        *sources, args.dst = names if len(names) > 1 else [*names, None]
        args.src, args.extra = (sources or [None])[0], sources[1:]
    args.operands_read = True


def cmd_convert(args) -> int:
    _operands(args)
    _command_line_refusal(args)
    from .convert import convert
    from .errors import OutputError, UnsupportedFeature
    # qemu-img prints progress on stdout; here stdout may carry the image itself. It reports
    # 0 % before it opens the source: a refusal from there on ends the report too.
    with _progress(args, sys.stderr if args.dst == "-" else sys.stdout, 1.0) as progress:
        progress(0, 1)
        src, dst, kw = _source_arguments(args)
        try:
            if args.output_format == "host_device" and _target_too_small(src, dst, kw):
                # (char devices too: qemu-img's device is as long as lseek(SEEK_END) says)
                raise QemuLine(too_small_line(dst, args.output_format, args.existing))
            result = convert(src, dst, progress=progress, **kw)
        except (UnsupportedFeature, OutputError) as exc:
            line = convert_failure_line(exc, src, dst, kw, args.output_format)
            if line is not None:
                raise QemuLine(line) from None
            raise
        if result.virtual_size == 0 or progress.last < 100.0:
            progress.complete()
    # qemu-img says nothing on success, and tools take any standard-error text for a failure
    # (glance's image conversion raises on it): the summary is for a person at a terminal.
    if not args.quiet and (args.summary or _is_terminal(sys.stderr)):
        rate = result.virtual_size / result.seconds if result.seconds > 0 else 0.0
        print(f"{program_name()}: converted {src} -> {dst}: {human_size(result.virtual_size)} "
              f"virtual, {human_size(result.bytes_written)} written, "
              f"{human_size(result.bytes_sparse)} left sparse, {result.seconds:.2f} s "
              f"({human_size(rate)}/s, {result.threads} threads)", file=sys.stderr)
    return 0


def convert_failure_line(exc: Exception, src: str, dst: str, kw: dict,
                         output_format: str) -> str | None:
    """qemu-img's line for what convert(src, dst, **kw) raised (-O `output_format`) where it
    words that failure otherwise than error_text() does, else None: a snapshot of a raw
    source, a device shorter than the image, a refusal of the writer's (naming DST)."""
    from .errors import OutputError, UnsupportedFeature
    if isinstance(exc, UnsupportedFeature):
        if kw["snapshot"] is not None and opened_as_raw(
                src, kw["src_format"], backing_dirs=kw["backing_dirs"],
                force_share=kw["force_share"]):
            return RAW_SNAPSHOT
        return None
    if not isinstance(exc, OutputError):
        return None
    if getattr(exc, "qemu_lock", None) is None and kw["format"] == "raw" and \
            (kw["existing"] or probes_as_device(dst)) and _target_too_small(src, dst, kw):
        # (qemu-img opens its target, and fails on a lock, before it compares the sizes)
        return too_small_line(dst, output_format, kw["existing"])
    unnamed = getattr(exc, "unnamed", None)
    if unnamed is None:
        return None
    hint = getattr(exc, "qemu_hint", None)          # (a lock's second line)
    return f"{dst}: {unnamed}" + (f"\n{hint}" if hint else "")


def too_small_line(dst: str, output_format: str, existing: bool) -> str:
    """qemu-img's line for a device shorter than the image: img_convert()'s with -n, else
    the one of creating it (file-posix raw_co_truncate() refuses to grow a device)."""
    if existing:
        return "output file is smaller than input file"
    return f"{dst}: error while converting {output_format}: Cannot grow device files"


def _target_too_small(src: str, dst: str, kw: dict) -> bool:
    """Whether the writable in-place target `dst` holds fewer bytes than the image `src`
    (qemu-img -n's refusal), asked once convert() has refused the target."""
    from .image import open_source
    try:
        fd = os.open(dst, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if not os.access(dst, os.W_OK):
        return False
    with open_source(src, kw["src_format"], snapshot=kw["snapshot"],
                     backing_dirs=kw["backing_dirs"], force_share=kw["force_share"]) as image:
        return size < image.virtual_size


def cmd_map(args) -> int:
    from .image import Image, open_source
    from .mapping import write_human, write_json
    refused = image_opts_refusal(args, args.format)
    if refused:
        raise QemuLine(refused)
    if args.format not in (None, *SOURCE_FORMATS):
        raise QemuLine(format_refusal(args.image, args.format))
    with open_source(args.image, args.format, backing_dirs=args.allow_backing_dir,
                     force_share=args.force_share) as image:
        if args.lookup is not None:
            if not isinstance(image, Image):
                raise ValueError(f"--lookup: {args.image} is read as raw (" + (
                    "-f raw" if args.format == "raw" else "not a QCOW2 image") +
                    "); it describes QCOW2 tables")
            from .lookup import describe
            sys.stdout.write(describe(image, args.lookup))
            return 0
        # Streamed entry by entry: memory does not grow with the number of extents.
        (write_json if args.output == "json" else write_human)(
            image, sys.stdout, args.start_offset, args.max_length)
    return 0


def _progress(args, stream, min_skip: float, kind=QemuProgress) -> QemuProgress:
    # -q wins over -p, as in qemu-img.
    enabled = (args.progress or args.force_progress) and not getattr(args, "quiet", False)
    return kind(stream, enabled, min_skip)


def _add_progress_options(p: argparse.ArgumentParser, where: str = "standard output") -> None:
    p.add_argument("-p", "--progress", action="store_true",
                   help=f"report progress on {where} as qemu-img does: '    (P/100%%)' lines "
                        "ended by a carriage return (SIGUSR1 prints one on stderr at any time)")
    p.add_argument("--force-progress", action="store_true",
                   help=argparse.SUPPRESS)     # the same as -p (kept for old scripts)


def cmd_info(args) -> int:
    from .info import format_human, format_json, info
    refused = image_opts_refusal(args, args.format)
    if refused:
        raise QemuLine(refused)
    if args.format not in (None, *SOURCE_FORMATS):
        raise QemuLine(format_refusal(args.image, args.format))
    kw = {"force_share": True} if args.force_share else {}
    result = info(args.image, backing_chain=args.backing_chain,
                  backing_dirs=args.allow_backing_dir, fmt=args.format, **kw)
    sys.stdout.write(format_json(result) if args.output == "json" else format_human(result))
    return 0


def cmd_check(args) -> int:
    from .check import NotChecked, check
    # Progress on stderr: stdout carries the report (JSON with --output=json).
    try:
        with _progress(args, sys.stderr, 1.0) as progress:
            result = check(args.image, progress=progress,
                           backing_dirs=args.allow_backing_dir,
                           force_share=args.force_share, probe=args.format is None)
    except NotChecked:
        print(f"{program_name()}: This image format does not support checks", file=sys.stderr)
        return 63
    except QcowError as exc:
        return _check_failed(exc, args)
    # The exit status is the verdict: a reader that went away (`| head`, `| true`) must not
    # change it, as it does not change qemu-img's.
    for line in result.messages:
        _write_quietly(sys.stderr, line + "\n")
    if not args.quiet:
        if args.output == "json":
            from .info import qemu_json
            _write_quietly(sys.stdout, qemu_json(result.to_json()) + "\n")
        else:
            _write_quietly(sys.stdout, result.format_human())
    if result.check_errors:
        _write_quietly(sys.stderr, f"{program_name()}: Check failed\n")     # (img_check()'s words)
    return result.exit_code


def _check_failed(exc: QcowError, args) -> int:
    """check's lines when it cannot complete (status 1), as qemu-img's: "Could not open 'IMG':
    ..." when the image or its chain cannot be opened; where qemu-img's check stops (a
    CheckFailed), what it printed until then, its ERROR line and hint, and "Check failed:
    STRERROR"; else "check failed: ..." in qcowfast's words."""
    from .check import CheckFailed
    if isinstance(exc, CheckFailed):
        for line in exc.messages:
            _write_quietly(sys.stderr, line + "\n")
        if exc.qemu_error:
            _write_quietly(sys.stderr, f"{program_name()}: {exc.qemu_error}\n")
        if exc.qemu_hint:
            _write_quietly(sys.stderr, exc.qemu_hint + "\n")
        _write_quietly(sys.stderr,
                       f"{program_name()}: Check failed: {os.strerror(exc.qemu_errno)}\n")
        return 1
    text = str(exc)
    print(f"{program_name()}: {error_text(exc, _images(args))}" if text.startswith(
        "Could not open ") else f"{program_name()}: check failed: {text}", file=sys.stderr)
    return 1


def cmd_compare(args) -> int:
    from .compare import compare
    kw = {"force_share": True} if args.force_share else {}

    # qemu-img ends its progress report after the verdict line (a newline follows it).
    def say(line: str) -> None:                 # (the status is the verdict, as in check)
        if not args.quiet:
            _write_quietly(sys.stdout, line + "\n")

    # The report starts before -T is checked: with -p, a refusal ends it too (a newline).
    with _progress(args, sys.stdout, 2.0, SummedProgress) as progress:
        refused = _compare_refusal(args, kw)
        if refused:
            print(f"{program_name()}: {refused}", file=sys.stderr)
            return 2                            # (could not compare; 1 says they differ)
        try:
            result = compare(args.image1, args.image2, fmt_a=args.format_a,
                             fmt_b=args.format_b, strict=args.strict, progress=progress,
                             backing_dirs=args.allow_backing_dir, on_message=say, **kw)
        except QcowError as exc:
            print(f"{program_name()}: {error_text(exc, _images(args))}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)     # CompareError: 3 or 4, as qemu-img
        except OSError as exc:
            name = f"{exc.filename}: " if exc.filename else ""
            print(f"{program_name()}: {name}{exc.strerror or exc}", file=sys.stderr)
            return 2
    return result.exit_code


def _compare_refusal(args, kw: dict) -> str | None:
    """compare's line for -T, or for a format qcowfast does not read (IMG1 is opened first),
    else None."""
    refused = cache_refusal(args.src_cache, "source cache") or image_opts_refusal(
        args, args.format_a)
    if refused or args.format_a not in (None, *SOURCE_FORMATS):
        return refused or format_refusal(args.image1, args.format_a)
    if args.format_b not in (None, *SOURCE_FORMATS):
        from .image import open_source
        try:
            open_source(args.image1, args.format_a, backing_dirs=args.allow_backing_dir,
                        **kw).close()
        except QcowError as exc:
            return error_text(exc, _images(args))
        return format_refusal(args.image2, args.format_b, "-F")
    return None


# What qemu-img says when a subcommand gets too few or too many file names: (line, whether
# error_exit() adds its pointer to the help). Measure and snapshot count theirs in the command
# (after what qemu-img checks first), convert's several sources are refused by name.
_OPERANDS = {"info": ("Expecting one image file name", True),
             "map": ("Expecting one image file name", True),
             "check": ("Expecting one image file name", True),
             "snapshot": ("Expecting one image file name", True),
             "compare": ("Expecting two image file names", True),
             "convert": ("Must specify image file name", False)}
_LATE_OPERANDS = ("convert", "measure", "snapshot")


class _GlibcMessage(argparse.Action):
    """getopt's own message, for a subcommand that lets getopt print it (PRINTS_ERRORS): as
    glibc words it ("measure: invalid option -- 'x'"), then the help on standard output and
    status 0, as qemu-img's `case '?': help()`."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog.rpartition(' ')[2]}: {values}", file=sys.stderr)
        parser.print_help()
        parser.exit(0)


class _GetoptError(argparse.Action):
    """getopt_long's errors, handed over by cli_getopt.getopt_argv in their place on the command
    line: qemu-img's error_exit() line for the word it names."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .cli_getopt import UNRECOGNIZED
        usage_exit(f"unrecognized option '{values}'" if option_string == UNRECOGNIZED else
                   f"missing argument for option '{values}'")


def _add_getopt_errors(p: argparse.ArgumentParser, glibc: bool = False) -> None:
    """Give `p` (a qemu-img subcommand's parser) qemu-img's option errors (cli_getopt), or
    with `glibc` getopt's own."""
    from .cli_getopt import GLIBC_MESSAGE, MISSING, UNRECOGNIZED
    for option in (GLIBC_MESSAGE,) if glibc else (UNRECOGNIZED, MISSING):
        if option not in p._option_string_actions:
            p.add_argument(option, action=_GlibcMessage if glibc else _GetoptError,
                           help=argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """argparse with qemu-img's usage errors: a qemu-img subcommand's file names counted as
    qemu-img counts them (its line, exit 1); otherwise the usage of the (sub)command, exit 1."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)    # (subcommands' parsers too)
        kwargs.setdefault("allow_abbrev", False)    # prefixes: qemu-img's only (cli_getopt)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if self.prog == "qemu-nbd" and message.startswith(("the following arguments are required",
                                                           "unrecognized arguments")):
            from .cli_serve import operands_refused
            operands_refused()
        operands = _OPERANDS.get(self.prog.rpartition(" ")[2]) if " " in self.prog else None
        if operands and message.startswith(("the following arguments are required",
                                            "unrecognized arguments")):
            usage_exit(operands[0], hint=operands[1])
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an image to raw or qcow2 (qemu-img convert's options)",
        description="Convert a QCOW2 (or raw) image, with its backing chain, to raw (byte-"
                    "identical to `qemu-img convert -O raw`) or qcow2. Options follow qemu-img "
                    "convert; -t is the cache mode as in qemu-img (threads: --threads or -m). "
                    "A file output is written to a temporary file beside DST and renamed over "
                    "it only on success; an existing DST is replaced unless --no-clobber.")
    # (optional here: img_convert() counts its file names after its checks of option pairs)
    p.add_argument("src", metavar="SRC", nargs="?", default=None,
                   help="image to read (qcow2 or raw)")
    p.add_argument("dst", metavar="DST", nargs="?", default=None,
                   help="output file or block device, or - for standard output (qemu-img "
                        "takes - as a file name)")
    p.add_argument("-f", dest="src_format", default=None, metavar="FMT",
                   help="format of SRC: qcow2 or raw (default: probe)")
    p.add_argument("-O", dest="output_format", default="raw", metavar="FMT",
                   help="output format: raw (default) or qcow2")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the qcow2 output (zlib, or -o compression_type)")
    p.add_argument("--compression-level", type=int, default=None, metavar="N",
                   help="with -c: zlib level 2-9 (default 6; 1 is written as 2) or zstd level "
                        "(default 3); lower is faster and larger (a qcowfast option)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   type=_option_list,
                   help="qcow2 output options key=val[,key=val]: compression_type=zlib|zstd, "
                        "cluster_size=SIZE (512 to 2M, default 64k); help lists them, with "
                        "the qemu-img keys accepted at the value qcowfast writes (compat=1.1, "
                        "preallocation=off, ...)")
    p.add_argument("-n", dest="existing", action="store_true",
                   help="write into the existing DST in place (do not create it)")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: DST reads as zeros already, so zeros are not written")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read SRC even when a running QEMU holds it open for writing (the copy "
                        "may be torn)")
    p.add_argument("-t", dest="cache", default=None, metavar="CACHE",
                   help="output cache mode: none/off (O_DIRECT), directsync (O_DIRECT), "
                        "writethrough, writeback, unsafe; every mode but unsafe flushes DST "
                        "before publishing it, as qemu-img flushes as it closes the file "
                        "(default: unsafe, qemu-img convert's, which does not)")
    _add_source_cache_option(p)
    p.add_argument("-m", dest="coroutines", type=coroutine_count, default=None, metavar="N",
                   help="parallel requests as in qemu-img (1 to 16): N worker threads")
    p.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="worker threads (default: all cores; overrides -m)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes (accepted: qcowfast always may)")
    p.add_argument("-S", dest="sparse_size", type=sparse_option, default=None, metavar="SIZE",
                   help="zero runs of SIZE bytes are left as holes: a multiple of 512 up to 16M "
                        "(default 4k; 0 writes a fully allocated file)")
    p.add_argument("-l", "--snapshot", metavar="SNAPSHOT", action=_SnapshotParam, default=[],
                   help="convert an internal snapshot: snapshot.id=ID, snapshot.name=NAME, or "
                        "ID_OR_NAME (given more than once: the last snapshot.* one, else the "
                        "last, as qemu-img)")
    _add_progress_options(p, "standard output (standard error when DST is -)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress report and no summary line")
    p.add_argument("--summary", action="store_true",
                   help="end with a one-line summary on standard error even when it is not a "
                        "terminal (on a terminal it is printed unless -q)")
    clobber = p.add_mutually_exclusive_group()
    clobber.add_argument("--no-clobber", action="store_true",
                         help="refuse to replace an existing DST")
    clobber.add_argument("--overwrite", action="store_true",
                         help="replace an existing DST (the default; kept for old scripts)")
    p.add_argument("--fsync", action="store_true", help="flush DST to disk before publishing it")
    p.add_argument("--max-stream-size", type=parse_size, default=1 << 40, metavar="SIZE",
                   help="refuse to stream (DST = -) images larger than SIZE (default 1T; 0 = no "
                        "limit)")
    for option, (_, nargs) in _UNSUPPORTED.items():
        p.add_argument(option, action=_Unsupported, nargs=nargs, help=argparse.SUPPRESS)
    # refused by name where qemu-img takes them (their refusals by qemu-img come first)
    p.add_argument("-B", dest="backing_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("-F", dest="backing_format", default=None, help=argparse.SUPPRESS)
    _add_open_options(p)
    p.set_defaults(func=cmd_convert, extra=[])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; with `command`, only that subcommand's (start-up time: the
    other subcommands' arguments cost milliseconds to build and are never used)."""
    parser = _Parser(
        prog=program_name(), description="Fast, safe reading and conversion of QCOW2 disk images.")
    parser.add_argument("--version", action="version", version=f"qcowfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, adder in _COMMANDS.items():
        if command is None or name == command:
            if isinstance(adder, str):
                importlib.import_module(f"qcowfast.{adder}").add_parser(sub)
            else:
                adder(sub)
    parser.commands = sub.choices
    return parser


def _add_map_parser(sub) -> None:
    p = sub.add_parser("map", help="print the allocation map like qemu-img map",
                       description="Print which guest ranges are data, zero or unallocated and "
                                   "where they live, as `qemu-img map` does.")
    p.add_argument("image", metavar="IMG")
    _add_output_option(p, "map")
    p.add_argument("--lookup", type=parse_size, metavar="OFFSET", default=None,
                   help="describe the L1/L2 entries, cluster type and host offset serving one "
                        "guest offset")
    p.add_argument("-f", "--format", dest="format", default=None, metavar="FMT",
                   help="format of IMG: qcow2 or raw (default: probe like qemu-img)")
    p.add_argument("-s", "--start-offset", type=lambda text: cvtnum("start offset", text),
                   metavar="OFFSET", default=0, help="map from this guest offset")
    p.add_argument("-l", "--max-length", type=lambda text: cvtnum("max length", text),
                   metavar="LENGTH", default=None,
                   help="map at most this many bytes")
    _add_force_share_option(p)
    _add_open_options(p)
    p.set_defaults(func=cmd_map)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe an image like qemu-img info",
                       description="Describe an image as `qemu-img info` does: virtual and disk "
                                   "size, cluster size, backing file, snapshots, bitmaps and "
                                   "format specific fields. Only the image file itself is read: "
                                   "backing and external data files are named, never opened "
                                   "(unless --backing-chain asks to follow the chain).")
    p.add_argument("image", metavar="IMG")
    _add_output_option(p, "info")
    p.add_argument("--backing-chain", action="store_true",
                   help="also describe every backing file, following the chain under the same "
                        "path policy as convert (see --allow-backing-dir)")
    p.add_argument("-f", "--format", dest="format", default=None, metavar="FMT",
                   help="format of IMG: qcow2 or raw (default: probe the QCOW2 magic, else "
                        "raw)")
    _add_force_share_option(p)
    _add_open_options(p)
    p.set_defaults(func=cmd_info)


def _add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="check an image's metadata like qemu-img check",
                       description="Check a QCOW2 image's metadata read-only, as `qemu-img "
                                   "check` does without -r: every reference is counted and "
                                   "compared with the stored refcounts; leaks, corruptions, "
                                   "metadata overlaps and offsets outside the file are "
                                   "reported on stderr. Exit status: 0 no errors, 1 the check "
                                   "could not be completed, 2 corruptions, 3 only leaked "
                                   "clusters, 63 the file is not a QCOW2 image.")
    p.add_argument("image", metavar="IMG")
    _add_output_option(p, "check")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print no report (the exit status still tells the result)")
    p.add_argument("-f", "--format", dest="format", default=None, metavar="FMT",
                   help="format of IMG: qcow2 or raw (default: probe); raw images cannot be "
                        "checked")
    _add_force_share_option(p)
    _add_source_cache_option(p)
    # refused by name (qcowfast never writes images), its value first, as qemu-img reads it
    p.add_argument("-r", "--repair", dest="repair", metavar="leaks|all", default=None,
                   type=repair_mode, help=argparse.SUPPRESS)
    _add_progress_options(p, "standard error")
    _add_open_options(p)
    p.set_defaults(func=_check_format)


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare the contents of two images like qemu-img "
                                       "compare",
                       description="Compare the guest contents of two images (qcow2, with "
                                   "their backing chains, or raw). Ranges both images know to "
                                   "be zero are not read. When the sizes differ, the larger "
                                   "image's tail must read as zeros. Exit status: 0 identical, "
                                   "1 different (the first differing offset is printed), 2 an "
                                   "image could not be read.")
    p.add_argument("image1", metavar="IMG1")
    p.add_argument("image2", metavar="IMG2")
    p.add_argument("-f", dest="format_a", default=None, metavar="FMT",
                   help="format of IMG1: qcow2 or raw (default: probe)")
    p.add_argument("-F", dest="format_b", default=None, metavar="FMT",
                   help="format of IMG2: qcow2 or raw (default: probe)")
    p.add_argument("-s", "--strict", action="store_true",
                   help="strict mode: images of different sizes differ, and so do ranges "
                        "allocated differently (zero, data, unallocated) even when their "
                        "contents are equal")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; use the exit "
                                                             "status")
    _add_force_share_option(p)
    _add_source_cache_option(p)                 # checked in cmd_compare (exit 2)
    _add_progress_options(p)
    _add_open_options(p)
    p.set_defaults(func=cmd_compare)


# Subcommands in the order of `qcowfast --help`. A module name stands for a module defining
# add_parser(subparsers) that imports nothing heavy at module level (start-up time).
_COMMANDS = {"convert": _add_convert_parser, "map": _add_map_parser, "info": _add_info_parser,
             "check": _add_check_parser, "compare": _add_compare_parser,
             "measure": "cli_measure", "snapshot": "cli_snapshot",
             "convert-many": "cli_fleet", "serve": "cli_serve"}


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, with shutil.get_terminal_size()'s width found without importing
    shutil (and bz2 and lzma with it: 2 ms of every start)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """$COLUMNS, else standard output's terminal width, else 80 (shutil.get_terminal_size)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80




class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) arrived: unwinds like Ctrl-C, so that convert's cleanup
    removes its temporary output; then the process ends by that signal, as qemu-img would."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _on_signal(signum, frame):
    for name in _SIGNALS:                       # a second signal must not cut the cleanup short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Interrupted(signum)


class _WarningsOnStderr:
    """Within it, qcowfast's warnings print as qemu-img's do: "NAME: warning: ..." on
    stderr, each once per command, or with `every_open` once per image opened (compare: qemu-img
    warns at each open, twice for `compare IMG IMG`); other warnings print as Python prints
    them."""

    def __init__(self, every_open: bool = False):
        self.every_open = every_open

    def __enter__(self):
        import warnings
        from .errors import StaleBitmapsWarning
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        shown = warnings.showwarning
        # (either resets the once-registries)
        warnings.simplefilter("always" if self.every_open else "default", StaleBitmapsWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, StaleBitmapsWarning):
                # qemu-img's words, whose last line ends without a newline (error_printf()):
                # what follows on stderr continues it.
                _write_quietly(sys.stderr, f"{program_name()}: warning: "
                               + getattr(message, "qemu_text", f"{message}\n"))
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        self._saved.__exit__(*exc)
        return False


def _install_signal_handlers() -> dict:
    """Route SIGINT/SIGTERM/SIGHUP to Interrupted, SIGUSR1 to the progress report (for the
    rest of the run); returns the handlers replaced."""
    try:
        signal.signal(signal.SIGUSR1, _on_usr1)
    except (ValueError, AttributeError):        # not the main thread, or no SIGUSR1
        pass
    old = {}
    for name in _SIGNALS:
        num = getattr(signal, name, None)
        if num is None or signal.getsignal(num) == signal.SIG_IGN:   # e.g. nohup, `cmd &`
            continue
        try:
            old[num] = signal.signal(num, _on_signal)
        except ValueError:                      # not the main thread: leave signals alone
            break
    return old


def _die_by(signum: int) -> int:
    """End the process by `signum` (status 128 + signum in a shell), as if killed by it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum                         # only reached if the signal did not end us


_CLOSED_STREAMS: set = set()                  # "stdout"/"stderr" closed when we started


def _replace_closed_streams() -> None:
    """A standard stream closed by the caller (`>&-`, `2>&-`) becomes /dev/null: a status
    line must not land in the other stream (print(file=None) writes to stdout), and nothing
    may fail on it. An image is never streamed to a closed stdout (convert_arguments)."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            _CLOSED_STREAMS.add(name)
            setattr(sys, name, open(os.devnull, "w"))


def _broken_pipe(exc: BaseException | None) -> bool:
    """True when `exc` (or what it wraps) is EPIPE: the reader of our output went away."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a closed or replaced one)."""
    try:
        return stream.isatty()
    except (ValueError, OSError, AttributeError):
        return False


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so Python's final flush cannot complain (the
    recipe of the `signal` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _images(args) -> list[tuple[str, str | None]]:
    """The images a qemu-img command opens, in its order: (path, format given or None)."""
    if args.command == "compare":
        return [(args.image1, args.format_a), (args.image2, args.format_b)]
    if args.command == "convert":
        return [(path, args.src_format) for path in (args.src, *args.extra)]
    if args.command in ("info", "map", "check"):
        return [(args.image, args.format)]
    if args.command == "measure" and args.filename is not None:
        return [(args.filename, args.format)]
    return []


def run() -> None:
    """The `qcowfast` command: main(), then exit without the interpreter's tear-down.

    Once main() has returned with no other thread left, every output is already published or
    removed and every file closed; the tear-down (module and object finalisation) would only
    cost each command about 5 ms. Anything unusual takes the ordinary exit.
    """
    status = main()
    try:
        # The interpreter's tear-down puts SIGUSR1 back to its default (ending the process):
        # a report asked for now would turn a finished run into a killed one.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except (ValueError, AttributeError):
        pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:                            # noqa: BLE001 - reported by the ordinary exit
        sys.exit(status)
    threading = sys.modules.get("threading")
    if isinstance(status, int) and (threading is None or threading.active_count() == 1):
        os._exit(status)
    sys.exit(status)


def _trace_values(head: list[str]) -> list[str]:
    """The -T/--trace values among qemu-img's options before the subcommand (`head`, as
    cli_getopt.global_options read and accepted them), in order."""
    values, i = [], 0
    while i < len(head):
        word = head[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name and "trace".startswith(name):
                if not eq:
                    value, i = head[i], i + 1
                values.append(value)
            continue
        if word[1:2] == "T":                # (-h and -V end the options: not in `head`)
            if len(word) > 2:
                values.append(word[2:])
            else:
                values.append(head[i])
                i += 1
    return values


_TRACE_KEYS = ("enable", "events", "file")


def _trace_option(text: str) -> dict:
    """One -T/--trace value as QEMU's trace_opt_parse() reads it (qemu_opts_parse_noisily()
    on qemu_trace_opts, "enable" implied for a first item without '='): {key: last value}.
    Refusals end the command as qemu-img does (its line, status 1)."""
    items, rest = [], text
    head = re.match(r"[^=,]*", text).group(0)
    if text and text[len(head):len(head) + 1] != "=":
        value = re.match(r"(?:[^,]|,,)*", text).group(0)
        items.append(("enable", value.replace(",,", ","), None))
        rest = text[len(value) + 1:]
    items += _qemu_opts(rest)
    ident = next((value for name, value, _ in items if name == "id"), None)
    if ident is not None and not _IDENTIFIER.fullmatch(ident):
        print(f"{program_name()}: Parameter 'id' expects an identifier\nIdentifiers consist of "
              "letters, digits, '-', '.', '_', starting with a letter.", file=sys.stderr)
        raise SystemExit(1)
    def helped() -> "typing.NoReturn":         # noqa: F821 - its list of keys, status 1
        sys.stdout.write("trace options:\n" + "".join(f"  {key}=<str>\n"
                                                      for key in _TRACE_KEYS))
        raise SystemExit(1)

    return _opts_chosen(items, _TRACE_KEYS, helped,
                        lambda name: usage_exit(f"Invalid parameter '{name}'", hint=False))


def _opts_chosen(items, keys, helped, invalid) -> dict:
    """QemuOpts' reading of parsed (name, value, flag) `items` (see _qemu_opts): a "help"
    or "?" flag calls helped(); a short-form boolean gets QEMU's warning; "id" is skipped;
    a key not in `keys` calls invalid(name). Returns {key: its last value}."""
    chosen = {}
    for name, value, flag in items:
        if flag in ("help", "?"):
            helped()
        if flag is not None:
            print(f"{program_name()}: warning: short-form boolean option '{flag}' deprecated\n"
                  f"Please use {name}={value} instead", file=sys.stderr)
        if name == "id":
            continue
        if name not in keys:
            invalid(name)
        chosen[name] = value
    return chosen


def _trace_events(pattern: str) -> None:
    """trace_enable_events(): "help" lists QEMU's trace events and ends the command (status
    0). qcowfast has no trace events: the list is empty, and other patterns enable nothing."""
    if pattern in ("help", "?"):
        raise SystemExit(0)


def _trace_events_file(name: str) -> None:
    """trace_init_events(): each line of the events file is a pattern (trace_enable_events);
    a file that cannot be opened ends the command with QEMU's line (its location prefix:
    "NAME:FILE: REASON", status 1)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or "Invalid argument"
        print(f"{program_name()}:{name}: {why}", file=sys.stderr)
        raise SystemExit(1)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:                             # (a directory: fopen() works, reads fail)
        pass
    finally:
        os.close(fd)
    # fgets() lines: one of a single character is skipped, the others lose their last one
    # (the newline, or the last character of an unterminated last line); no other trimming.
    for line in re.findall(rb"[^\n]*\n|[^\n]+\Z", b"".join(chunks)):
        if len(line) > 1 and not line.startswith(b"#"):
            _trace_events(line[:-1].decode("utf-8", "surrogateescape"))


def _trace(head: list[str], command: bool) -> None:
    """qemu-img's -T/--trace options, in order (trace_opt_parse()), then, when a command
    follows, its trace file (trace_init_file(): "Error opening logfile FILE: REASON", status
    1). qcowfast writes no trace (README: Differences)."""
    log = None
    for value in _trace_values(head):
        chosen = _trace_option(value)
        if "enable" in chosen:
            _trace_events(chosen["enable"])
        if "events" in chosen:
            _trace_events_file(chosen["events"])
        log = chosen.get("file")                # (each -T sets it, or clears it)
    if command and log is not None:
        from .output import open_errno
        try:
            err = open_errno(log)
        except QcowError:                       # (a NUL byte)
            err = errno.EINVAL
        if err is not None:
            usage_exit(f"Error opening logfile {log}: {os.strerror(err)}", hint=False)


QEMU_IMG_VERSION = "7.2.0"          # the qemu-img whose command line qcowfast follows


def invoked_as() -> str:
    """The name this program was run under (a symlink named qemu-img or qemu-nbd makes it
    the drop-in of tools that run those)."""
    return os.path.basename(sys.argv[0] if sys.argv else "")


def program_name() -> str:
    """The name that starts each error and warning line ("NAME: ..."): qemu-img or qemu-nbd
    when run under that name (QEMU's error_report() prefixes the name error_init() took from
    argv[0]), else qcowfast. The one source of that prefix: logs grepped for "qemu-img:" find
    a drop-in's lines."""
    name = invoked_as()
    return name if name in ("qemu-img", "qemu-nbd") else "qcowfast"


def version_text() -> str:
    """`--version`'s text: "qcowfast X", or run under the name qemu-img or qemu-nbd, that
    tool's first line with qcowfast's version beside it (tools date what they run by it:
    cinder matches "qemu-img version N" at the start, ovirt-imageio reads qemu-nbd's)."""
    name = invoked_as()
    if name == "qemu-img":
        return (f"qemu-img version {QEMU_IMG_VERSION} (qcowfast {__version__})\n"
                f"qcowfast {__version__} answers qemu-img {QEMU_IMG_VERSION}'s convert, info, "
                "map, check, compare, measure and snapshot -l command lines")
    if name == "qemu-nbd":
        return (f"qemu-nbd {QEMU_IMG_VERSION} (qcowfast {__version__})\n"
                f"qcowfast {__version__} serves images read-only with qemu-nbd "
                f"{QEMU_IMG_VERSION}'s options (qcowfast serve)")
    return f"qcowfast {__version__}"


def main(argv=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    from .cli_getopt import (PRINTS_ERRORS, QEMU_LONG, GetoptError, getopt_argv,
                             global_options)
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    if invoked_as() == "qemu-nbd":
        argv = ["serve", *argv]                 # (qemu-nbd's command line is serve's)
    try:
        words, asked = global_options(argv)
    except GetoptError as exc:
        usage_exit(str(exc))
    _trace(argv[:len(argv) - len(words)], bool(words) and asked is None)
    if asked == "version":                      # scripts call this often: skip the parser
        print(version_text())
        return 0
    if asked == "help":
        argv = ["--help"]
    elif not words:
        if argv:
            return 0                            # options alone: qemu-img ends quietly
        usage_exit("Not enough arguments")
    elif words[0] not in _COMMANDS:
        usage_exit(f"Command not found: {words[0]}")
    else:
        argv = words
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    if argv and argv[0] in parser.commands:
        # Read as qemu-img's getopt_long reads it (see cli_getopt).
        if argv[0] in QEMU_LONG and argv[0] != "serve":     # qemu-img's own errors
            _add_getopt_errors(parser.commands[argv[0]], glibc=argv[0] in PRINTS_ERRORS)
        argv = [argv[0], *getopt_argv(argv[1:], parser.commands[argv[0]],
                                      QEMU_LONG.get(argv[0], ()), argv[0])]
    if argv[:1] == ["convert"] and _options_help(parser, argv[1:]):
        return 0
    _replace_closed_streams()
    args, extras = parser.parse_known_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Names stored in images need not be UTF-8: print their bytes as qemu-img does.
        if getattr(stream, "encoding", "").lower().replace("-", "") == "utf8":
            stream.reconfigure(errors="surrogateescape")
    if extras:
        sub = parser.commands[args.command]
        # (words after "--" are file names, whatever they start with)
        names = argv[argv.index("--") + 1:] if "--" in argv else []
        if args.command in _LATE_OPERANDS and all(not e.startswith("-") or e == "-" or
                                                  e in names for e in extras):
            args.extra = extras                 # counted (convert: refused) by the command
        else:
            sub.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command in ("info", "map", "check") and args.output not in ("human", "json"):
        usage_exit(OUTPUT_ERROR, hint=False)    # (the last --output, after the file names)
    # qcowfast never calls BLAS: spare numpy's OpenBLAS its idle spinning worker threads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    old_handlers = _install_signal_handlers()
    # compare opens each image once, as qemu-img does; other commands may open one twice.
    shown = _WarningsOnStderr(every_open=args.command == "compare")
    try:
        with shown:
            status = args.func(args)
        try:
            sys.stdout.flush()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _quiet_stdout()                     # the status stands (compare's verdict...)
        return status
    except KeyboardInterrupt as exc:
        return _die_by(getattr(exc, "signum", signal.SIGINT))
    except Exception as exc:
        if _broken_pipe(exc):
            # The reader closed the pipe (`| head`): end quietly with qemu-img's status 0.
            _quiet_stdout()
            return 0
        if isinstance(exc, (QcowError, CliError, ValueError)):
            prefix = f"{program_name()}: convert: " if isinstance(exc, CliError) and \
                not isinstance(exc, QemuLine) else f"{program_name()}: "
            print(f"{prefix}{error_text(exc, _images(args))}", file=sys.stderr)
            return exc.status if isinstance(exc, QemuLine) else 1
        if isinstance(exc, OSError):
            name = f"{exc.filename}: " if exc.filename else ""
            print(f"{program_name()}: {name}{exc.strerror or exc}", file=sys.stderr)
            return 1
        if isinstance(exc, MemoryError):
            print(f"{program_name()}: not enough memory", file=sys.stderr)
            return 1
        raise
    finally:
        for num, handler in old_handlers.items():
            signal.signal(num, handler)


if __name__ == "__main__":
    sys.exit(main())
