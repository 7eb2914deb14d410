"""The `qcowfast` command line: qemu-img-like subcommands over the qcowfast API.

Every QcowError becomes one line on stderr and exit code 1 (qemu-img's convention); a traceback
means a bug.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time

from . import __version__
from .errors import QcowError

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}


def parse_size(text: str) -> int:
    """Parse a qemu-img style size: bytes with an optional k/M/G/T/P/E suffix (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 4096, 4k, 1M)")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def sparse_size(text: str) -> int:
    """-S: a size that is a multiple of 512 bytes (0 for fully allocated output)."""
    value = parse_size(text)
    if value % 512:
        raise argparse.ArgumentTypeError(f"-S {text!r} must be a multiple of 512 bytes")
    return value


def thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r} (a positive integer)")
    return value


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"


class ProgressBar:
    """A one-line progress bar on a stream, redrawn at most 10 times a second."""

    def __init__(self, stream, label: str):
        self.stream = stream
        self.label = label
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_done = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == self.last_done or (done < total and now - self.last < 0.1):
            return
        self.last, self.last_done = now, done
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
                          f"{human_size(done)}/{human_size(total)} {human_size(rate)}/s "
                          f"ETA {eta:4.0f}s ")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _add_output_option(p: argparse.ArgumentParser, tool: str) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help=f"output format (default human); json prints what `qemu-img {tool} "
                        f"--output=json` prints")


def _add_open_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-backing-dir", metavar="DIR", action="append", default=[],
                   help="also follow backing and external data files named inside the image "
                        "when they lie in DIR (by default only files in the image's own "
                        "directory are followed)")


def cmd_convert(args) -> int:
    from .convert import convert
    if args.output_format != "raw":
        raise QcowError(f"output format {args.output_format!r} is not supported (only raw)")
    show = args.progress and (args.force_progress or sys.stderr.isatty())
    bar = ProgressBar(sys.stderr, "converting") if show else None
    dst = args.dst
    try:
        result = convert(args.src, dst, threads=args.threads, sparse_size=args.sparse_size,
                         progress=bar, overwrite=args.overwrite, fsync=args.fsync,
                         backing_dirs=args.allow_backing_dir, snapshot=args.snapshot,
                         max_stream_size=args.max_stream_size or None)
    finally:
        if bar is not None:
            bar.finish()
    if not args.quiet:
        rate = result.virtual_size / result.seconds if result.seconds > 0 else 0.0
        print(f"qcowfast: converted {args.src} -> {dst}: {human_size(result.virtual_size)} "
              f"virtual, {human_size(result.bytes_written)} written, "
              f"{human_size(result.bytes_sparse)} left sparse, {result.seconds:.2f} s "
              f"({human_size(rate)}/s, {result.threads} threads)", file=sys.stderr)
    return 0


def cmd_map(args) -> int:
    from .image import open as open_image
    from .mapping import format_human, format_json
    with open_image(args.image, backing_dirs=args.allow_backing_dir) as image:
        if args.lookup is not None:
            from .lookup import describe
            sys.stdout.write(describe(image, args.lookup))
            return 0
        entries = image.map()
        text = format_json(entries) if args.output == "json" else format_human(image, entries)
    sys.stdout.write(text)
    return 0


def _progress_bar(args, label: str):
    show = args.progress and (args.force_progress or sys.stderr.isatty())
    return ProgressBar(sys.stderr, label) if show else None


def _add_progress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--progress", action="store_true",
                   help="show a progress bar on stderr (when it is a terminal)")
    p.add_argument("--force-progress", action="store_true",
                   help="with -p, show progress even when stderr is not a terminal")


def cmd_info(args) -> int:
    from .info import format_human, format_json, info
    result = info(args.image, backing_chain=args.backing_chain,
                  backing_dirs=args.allow_backing_dir, fmt=args.format)
    sys.stdout.write(format_json(result) if args.output == "json" else format_human(result))
    return 0


def cmd_check(args) -> int:
    from .check import NotChecked, check
    bar = _progress_bar(args, "checking")
    try:
        result = check(args.image, progress=bar)
    except NotChecked as exc:
        print(f"qcowfast: {exc} (qemu-img: this image format does not support checks)",
              file=sys.stderr)
        return 63
    except QcowError as exc:
        print(f"qcowfast: check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.finish()
    for line in result.messages:
        print(line, file=sys.stderr)
    if not args.quiet:
        if args.output == "json":
            sys.stdout.write(json.dumps(result.to_json(), indent=4) + "\n")
        else:
            sys.stdout.write(result.format_human())
    if result.check_errors:
        print("qcowfast: check failed: internal errors occurred during the check",
              file=sys.stderr)
    return result.exit_code


def cmd_compare(args) -> int:
    from .compare import compare
    bar = _progress_bar(args, "comparing")
    try:
        result = compare(args.image1, args.image2, fmt_a=args.format_a, fmt_b=args.format_b,
                         strict=args.strict, progress=bar, backing_dirs=args.allow_backing_dir)
    except QcowError as exc:
        print(f"qcowfast: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"qcowfast: {name}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.finish()
    if not args.quiet:
        for line in result.messages:
            print(line)
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcowfast", description="Fast, safe reading and conversion of QCOW2 disk images.")
    parser.add_argument("--version", action="version", version=f"qcowfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="convert a QCOW2 image to raw",
                       description="Convert a QCOW2 image (with its backing chain) to a raw "
                                   "image, byte-identical to `qemu-img convert -O raw`. The "
                                   "output is written to a temporary file and renamed only on "
                                   "success.")
    p.add_argument("src", metavar="SRC", help="QCOW2 image to read")
    p.add_argument("dst", metavar="DST", help="raw output file, or - for standard output")
    p.add_argument("-O", dest="output_format", default="raw", metavar="FMT",
                   help="output format (only raw)")
    p.add_argument("-p", "--progress", action="store_true",
                   help="show a progress bar on stderr (when it is a terminal)")
    p.add_argument("--force-progress", action="store_true",
                   help="with -p, show progress even when stderr is not a terminal")
    p.add_argument("-t", "--threads", type=thread_count, default=None, metavar="N",
                   help="worker threads (default: all cores)")
    p.add_argument("-S", dest="sparse_size", type=sparse_size, default=4096, metavar="SIZE",
                   help="zero runs of SIZE bytes are left as holes (default 4k; 0 writes a fully "
                        "allocated file)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--fsync", action="store_true", help="flush DST to disk before publishing it")
    p.add_argument("--max-stream-size", type=parse_size, default=1 << 40, metavar="SIZE",
                   help="refuse to stream (DST = -) images larger than SIZE (default 1T; 0 = no "
                        "limit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    p.add_argument("-l", "--snapshot", metavar="NAME", default=None,
                   help="convert internal snapshot NAME (its id, or else its name) instead of "
                        "the current state")
    _add_open_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("map", help="print the allocation map like qemu-img map",
                       description="Print which guest ranges are data, zero or unallocated and "
                                   "where they live, as `qemu-img map` does.")
    p.add_argument("image", metavar="IMG")
    _add_output_option(p, "map")
    p.add_argument("--lookup", type=parse_size, metavar="OFFSET", default=None,
                   help="describe the L1/L2 entries, cluster type and host offset serving one "
                        "guest offset")
    _add_open_options(p)
    p.set_defaults(func=cmd_map)

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
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), default=None,
                   help="format of IMG (default: probe the QCOW2 magic, else raw)")
    _add_open_options(p)
    p.set_defaults(func=cmd_info)

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
    _add_progress_options(p)
    p.set_defaults(func=cmd_check)

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
    p.add_argument("-f", dest="format_a", choices=("qcow2", "raw"), default=None,
                   help="format of IMG1 (default: probe)")
    p.add_argument("-F", dest="format_b", choices=("qcow2", "raw"), default=None,
                   help="format of IMG2 (default: probe)")
    p.add_argument("-s", "--strict", action="store_true",
                   help="strict mode: images of different sizes differ, and so do ranges "
                        "allocated differently (zero, data, unallocated) even when their "
                        "contents are equal")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; use the exit "
                                                             "status")
    _add_progress_options(p)
    _add_open_options(p)
    p.set_defaults(func=cmd_compare)
    for name in _EXTRA_COMMANDS:
        importlib.import_module(f"qcowfast.{name}").add_parser(sub)
    return parser


# Modules that register their own subcommands: each defines add_parser(subparsers) and imports
# nothing heavy at module level (start-up time).
_EXTRA_COMMANDS: tuple[str, ...] = ()


# qemu-img check exits 2 and 3 for corruptions and leaks: its usage errors must not look so.
_USAGE_ERROR_STATUS = {"check": 1}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        if exc.code == 2 and words and words[0] in _USAGE_ERROR_STATUS:
            raise SystemExit(_USAGE_ERROR_STATUS[words[0]]) from None
        raise
    try:
        return args.func(args)
    except QcowError as exc:
        print(f"qcowfast: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"qcowfast: {name}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcowfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
