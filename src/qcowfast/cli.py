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
import sys

from . import __version__
from .errors import QcowError
from .probe import QEMU_DRIVERS

CACHE_MODES = ("none", "off", "writeback", "writethrough", "unsafe", "directsync")
SOURCE_FORMATS = ("qcow2", "raw")
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


def cache_refusal(text: str, what: str = "cache") -> str | None:
    """qemu-img's line for a -t ("cache") or -T ("source cache") mode QEMU's
    bdrv_parse_cache_mode() refuses, else None. qemu-img checks -T before it opens the
    sources, -t once the output is created."""
    return None if text in CACHE_MODES else f"Invalid {what} option: {text}"


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


def _valid_option_list(text: str) -> bool:
    """qemu-img's is_valid_option_list(): each -o can be joined to the others with ',': not
    empty, no leading ',', no odd number of trailing ',' (',,' is an escaped comma)."""
    return bool(text) and not text.startswith(",") and \
        (len(text) - len(text.rstrip(","))) % 2 == 0


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
    from .cli_process import _write_quietly
    from .cli_progress import _progress
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
    from .cli_process import _write_quietly
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
    from .cli_process import _write_quietly
    from .cli_progress import SummedProgress, _progress
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
_COMMANDS = {"convert": "cli_convert", "map": _add_map_parser, "info": _add_info_parser,
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
    from .cli_trace import _trace
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
    if argv[:1] == ["convert"]:
        from .cli_convert import _options_help
        if _options_help(parser, argv[1:]):
            return 0
    from .cli_process import (_WarningsOnStderr, _broken_pipe, _die_by,
                              _install_signal_handlers, _quiet_stdout, _replace_closed_streams)
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
