"""`qcowfast convert-many`: a batch of conversions in one process, one line per job, a report."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import secrets
import sys
import threading
import time

EXTENSIONS = {"raw": ".raw", "qcow2": ".qcow2"}
# What separates SRC from DST on a job file's line: ASCII white space only. A name may hold
# other white space (a no-break space, U+3000): str.split() would cut it, or drop it silently
# where it ends the name, naming another file.
SEPARATORS = " \t\n\r\f\v"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-many", help="convert many images in one run",
        description="Convert a batch of images in one process, keeping every core busy across "
                    "image boundaries. Each job is an ordinary convert with an atomic output: a "
                    "failed job leaves nothing behind and never stops the others. Jobs come "
                    "from --jobs FILE (JSON lines {\"src\": ..., \"dst\": ..., options} or "
                    "'SRC DST' lines) or from --target-dir DIR SRC... Exit status: 0 when every "
                    "job succeeded (or was skipped), 1 otherwise.")
    p.add_argument("sources", metavar="SRC", nargs="*", help="images to convert (with "
                   "--target-dir)")
    p.add_argument("--jobs", metavar="FILE", help="job file: JSON lines or 'SRC DST' lines "
                   "(- for standard input)")
    p.add_argument("--target-dir", metavar="DIR", help="write each SRC to DIR/<name>.<format>")
    p.add_argument("-O", dest="output_format", choices=tuple(EXTENSIONS), default="raw",
                   help="output format (default raw)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress qcow2 output (zlib unless -o compression_type=zstd)")
    p.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                   help="output options as for convert -o: compression_type=zlib|zstd, "
                        "cluster_size=SIZE (qcow2), nocow=on|off")
    p.add_argument("-S", dest="sparse_size", metavar="SIZE", default=None,
                   help="zero runs of SIZE bytes are left as holes, as convert -S (default 4k)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="jobs converted side by side (default: one per core)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads per job (default: the cores divided among the jobs "
                        "running side by side)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip jobs whose destination exists (resume a killed batch)")
    clobber = p.add_mutually_exclusive_group()      # (as convert's)
    clobber.add_argument("--no-clobber", action="store_true",
                         help="fail jobs whose destination exists instead of replacing it")
    clobber.add_argument("--overwrite", action="store_true",
                         help="replace existing destinations (the default, as for convert)")
    p.add_argument("--stop-on-error", action="store_true",
                   help="start no new job after the first failure")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every job to FILE")
    p.add_argument("--allow-backing-dir", metavar="DIR", action="append", default=[],
                   help="also follow backing and data files named inside images when they lie "
                        "in DIR")
    p.add_argument("-p", "--progress", action="store_true",
                   help="show one progress bar for the batch on stderr (when it is a terminal)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-job lines")
    p.set_defaults(func=cmd_convert_many)


def read_jobs(args) -> list[dict]:
    """The batch as a list of job dicts, from --jobs or --target-dir; ValueError if malformed."""
    if (args.jobs is None) == (args.target_dir is None):
        raise ValueError("give either --jobs FILE or --target-dir DIR SRC...")
    if args.target_dir is not None:
        if not args.sources:
            raise ValueError("--target-dir needs at least one SRC")
        if not os.path.isdir(args.target_dir):
            raise ValueError(f"--target-dir {args.target_dir}: " + (
                "not a directory" if os.path.exists(args.target_dir) else
                "no such directory (create it first)"))
        # Two sources of one name: the later job is refused alone (convert_many's conflicts).
        ext = EXTENSIONS[args.output_format]
        return [{"src": src, "dst": os.path.join(args.target_dir, _stem(src) + ext)}
                for src in args.sources]
    if args.sources:
        raise ValueError("SRC arguments go with --target-dir, not with --jobs")
    # A BOM is skipped; names that are not UTF-8 keep their bytes (surrogate escapes).
    try:
        stream = (io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig",
                                   errors="surrogateescape")
                  if args.jobs == "-" else
                  open(args.jobs, encoding="utf-8-sig", errors="surrogateescape"))
    except OSError as exc:
        raise ValueError(f"cannot read the job file {args.jobs}: {exc.strerror}") from None
    jobs = []
    with stream:
        for number, line in enumerate(stream, 1):
            text = line.strip(SEPARATORS)
            if not text or text.startswith("#"):
                continue
            if text.startswith("{"):
                try:
                    job = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{args.jobs}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(job, dict) or "src" not in job or "dst" not in job:
                    raise ValueError(f"{args.jobs}:{number}: a job needs \"src\" and \"dst\"")
                if not (isinstance(job["src"], str) and isinstance(job["dst"], str)):
                    raise ValueError(f"{args.jobs}:{number}: \"src\" and \"dst\" must be "
                                     "strings")
            elif text.startswith("["):
                raise ValueError(f"{args.jobs}:{number}: a JSON array; the job file holds "
                                 "JSON lines, one {\"src\": ..., \"dst\": ...} object per "
                                 "line")
            else:
                words = re.split(f"[{SEPARATORS}]+", text)
                if len(words) != 2:
                    raise ValueError(f"{args.jobs}:{number}: expected 'SRC DST' (use JSON "
                                     "lines for names with spaces)")
                job = {"src": words[0], "dst": words[1]}
            jobs.append(job)
    return jobs


def _stem(src: str) -> str:
    """The name --target-dir gives SRC's output, before its extension: SRC's file name
    without its last extension ("dir/" names "dir", not "")."""
    return os.path.splitext(os.path.basename(src.rstrip("/")))[0]


def _shown(name: str) -> str:
    """A job's file name for a line of output: as given, escaped (repr) when it holds a NUL
    byte, which no file name can hold and no message shows raw, or a character no file name
    can hold either (a lone surrogate that is not an escaped byte): stderr could not write the
    line, and it was lost."""
    return repr(name) if "\0" in name or not _writable(name) else name


def _writable(text: str) -> bool:
    """Whether stderr (UTF-8, escaped bytes kept: cli) can write `text`."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_nul(args) -> None:
    """ValueError when --jobs, --target-dir or --report names a file with a NUL byte (os would
    say only "embedded null byte"; the name shown escaped)."""
    for option, name in (("--jobs", args.jobs), ("--target-dir", args.target_dir),
                         ("--report", args.report)):
        if name is not None and "\0" in name:
            raise ValueError(f"{option} was given a name with a NUL byte ({name!r}), which no "
                             "file name can hold")


def _common_options(args) -> dict:
    from .cli import CliError
    from .cli_convert import _output_options, sparse_size

    options = {}
    if args.output_format != "raw":
        options["format"] = args.output_format
    try:
        # convert's -o grammar; compression_type is recorded in the header, as qemu-img does
        options.update(_output_options(args.options, args.output_format, existing=False))
    except CliError as exc:
        raise ValueError(str(exc)) from None
    if args.compress:
        options["compression"] = options.get("compression_type", "zlib")
    if ("compression" in options or "compression_type" in options) and \
            args.output_format != "qcow2":
        raise ValueError("-c and compression_type need -O qcow2")
    if args.sparse_size is not None:
        try:
            options["sparse_size"] = sparse_size(args.sparse_size)      # convert's -S rules
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"-S {args.sparse_size}: {exc}") from None
    if args.allow_backing_dir:
        from .paths import directories
        options["backing_dirs"] = list(directories(args.allow_backing_dir))   # ("": refused)
    return options


def describe(result, job=None) -> tuple[str, dict]:
    """(status, report fields) for one job's result. A failure is worded as `qcowfast
    convert SRC DST` words it (cli.error_text: qemu-img's line where it has one), given the
    job (a fleet.Job) it ended."""
    from .fleet import Skipped
    if isinstance(result, Skipped):
        return "skipped", {"reason": result.reason}
    if isinstance(result, BaseException):
        result, text = _convert_words(result, job)
        # Notes say what a failure left behind (an in-place target written in part).
        text = "; ".join([text or type(result).__name__, *getattr(result, "__notes__", ())])
        return "failed", {"error": text, "error_type": type(result).__name__}
    return "ok", {"virtual_size": result.virtual_size, "bytes_written": result.bytes_written,
                  "seconds": round(result.seconds, 6)}


def _convert_words(exc: BaseException, job) -> tuple[BaseException, str]:
    """(the failure, its line) as `qcowfast convert` has them for the job:
    cli_convert.cmd_convert's readings of convert()'s exceptions, in its order."""
    from .cli import error_text
    images = [] if job is None else [(job.src, job.options.get("src_format"))]
    line = None if job is None else _convert_line(exc, job)
    if isinstance(line, BaseException):
        exc, line = line, None
    return exc, line or error_text(exc, images)


def _convert_line(exc: BaseException, job) -> str | BaseException | None:
    """The line `qcowfast convert` gives for the job's exception `exc` where it words it
    otherwise than cli.error_text (or the failure it reports instead), else None."""
    from .cli import SOURCE_FORMATS, format_refusal
    from .cli_convert import convert_failure_line
    from .errors import OutputError
    from .fleet import names_no_file, source_refusal
    opts, dst = job.options, job.dst
    fmt, src_format = opts.get("format", "raw"), opts.get("src_format")
    if isinstance(exc, ValueError) and isinstance(src_format, str) and \
            src_format not in SOURCE_FORMATS:
        return format_refusal(job.src, src_format)          # (-f, refused first)
    kw = {"format": fmt, "src_format": src_format, "snapshot": opts.get("snapshot"),
          "backing_dirs": opts.get("backing_dirs", ()),
          "force_share": opts.get("force_share", False), "existing": opts.get("existing")}
    try:
        if isinstance(exc, OutputError) and names_no_file(dst):
            # convert() refuses such a name before it opens anything; qemu-img opens the
            # source first (img_convert()), and refuses the name when it creates the output,
            # or opens it (-n): the source's failure, if any, is the one reported.
            return source_refusal(job) or _no_file_line(dst, fmt, opts.get("existing"))
        return convert_failure_line(exc, job.src, dst, kw, fmt)
    except Exception:               # noqa: BLE001 - (reopened only to word it: keep `exc`)
        return None


def _no_file_line(dst: str, fmt: str, existing) -> str:
    """qemu-img's line for an output name no file has ('' or ending in '/')."""
    from .output import create_refusal, open_errno
    if not existing:
        return f"{dst}: error while converting {fmt}: {create_refusal(dst)}"
    if not dst:                 # (-n: cli_convert._in_place_refusal; raw_open_common's words)
        return "Could not open '': The 'file' block driver requires a file name"
    why = os.strerror(open_errno(dst, create=False) or errno.EISDIR)
    return f"Could not open '{dst}': Could not open '{dst}': {why}"


def cmd_convert_many(args) -> int:
    from .cli import program_name
    from .cli_process import _write_quietly
    from .cli_progress import ProgressBar, human_size
    from .fleet import as_job, convert_many
    from .errors import QcowError
    try:
        _refuse_nul(args)
        jobs = read_jobs(args)
        common = _common_options(args)
    except (ValueError, OSError, QcowError) as exc:     # (UnsafePathError: --allow-backing-dir)
        print(f"{program_name()} convert-many: {exc}", file=sys.stderr)
        return 1
    jobs = [{**common, **job} for job in jobs]
    if args.report is not None:
        try:
            _check_report_path(args.report, jobs, args.jobs)
        except ValueError as exc:
            print(f"{program_name()} convert-many: {exc}", file=sys.stderr)
            return 1
    show = args.progress and sys.stderr.isatty()
    bar = ProgressBar(sys.stderr, "converting") if show else None
    lock = threading.Lock()

    def say(line: str) -> None:             # a closed stderr ends the lines, not the batch
        _write_quietly(sys.stderr, line + "\n")

    described: dict = {}                # (each failure worded once: it may open the source)
    # An earlier run's report stops describing the outputs once a job of this run has ended;
    # a run that then ends without its own (a signal) must not leave that one behind.
    stale = [args.report] if args.report is not None else []

    def on_result(i, job, result):
        with contextlib.suppress(IndexError, OSError):   # (the report is written later)
            os.unlink(stale.pop())
        status, fields = described[i] = describe(result, job)
        if args.quiet:
            return
        pair = f"{_shown(job.src)} -> {_shown(job.dst)}"
        if status == "ok":
            line = (f"ok      {pair}: {human_size(fields['virtual_size'])} in "
                    f"{fields['seconds']:.2f} s")
        elif status == "skipped":
            line = f"skipped {pair}: {fields['reason']}"
        else:
            error = fields["error"]
            line = f"FAILED  {pair}: " + (error if _writable(error) else
                                          error.encode("utf-8", "backslashreplace").decode())
        with lock:
            say(("\r\x1b[K" if bar is not None else "") + line)

    t0 = time.perf_counter()
    try:
        results = convert_many(jobs, workers=args.workers, threads=args.threads,
                               on_error="stop" if args.stop_on_error else "continue",
                               progress=bar, skip_existing=args.skip_existing,
                               overwrite=not args.no_clobber, on_result=on_result)
    except ValueError as exc:
        print(f"{program_name()} convert-many: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.finish()
    seconds = time.perf_counter() - t0
    entries = []
    for i, (job, result) in enumerate(zip(jobs, results)):
        status, fields = described.get(i) or describe(result, as_job(job))
        entries.append({"src": job["src"], "dst": job["dst"], "status": status, **fields})
    failed = sum(e["status"] == "failed" for e in entries)
    if args.report is not None:
        # ("succeeded" counts the skipped jobs too: their outputs are complete.)
        report = {"jobs": entries, "succeeded": len(entries) - failed, "failed": failed,
                  "skipped": sum(e["status"] == "skipped" for e in entries),
                  "seconds": round(seconds, 6)}
        try:
            _write_report(args.report, report)
        except OSError as exc:
            say(f"{program_name()} convert-many: cannot write report {args.report}: "
                f"{exc.strerror}")
            return 1
    if not args.quiet:
        say(f"{program_name()}: {len(entries) - failed} of {len(entries)} jobs succeeded in "
            f"{seconds:.2f} s")
    return 1 if failed else 0


def _check_report_path(path: str, jobs: list[dict], jobs_file: str | None) -> None:
    """Before any job runs: the report can be written where asked, and is neither a file a
    job reads or writes (its source, backing and data files, its destination; compared by
    identity too) nor the job file."""
    from .fleet import _file_keys, as_job, chain_files, names_no_file
    if not path or path.endswith("/"):      # (written after the batch: refused before it)
        raise ValueError(f"--report {path!r}: names no file" if not path else
                         f"--report {path}: names a directory, not a file")
    try:
        keys = set(_file_keys(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--report {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if jobs_file not in (None, "-") and keys & set(_file_keys(jobs_file)):
        raise ValueError(f"--report {path}: also the job file")
    for spec in jobs:
        try:
            job = as_job(spec)
            names = [*chain_files(job)] + ([] if names_no_file(job.dst) else
                                           [("the destination", job.dst)])
            for what, name in names:
                if keys & set(_file_keys(name)):
                    raise ValueError(f"--report {path}: also {what} ({name}) of job "
                                     f"{job.src} -> {job.dst}")
        except (OSError, UnicodeError):
            continue                        # (that job will fail by itself)
    if os.path.isdir(path):
        raise ValueError(f"--report {path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--report {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--report {path}: directory {directory} is not writable")


def _write_report(path: str, report: dict) -> None:
    """Write the JSON report whole or not at all (a temporary file renamed over `path`). The
    temporary file is a new one (O_EXCL, a random name): a file or symlink left at a name
    known in advance is never written through."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.report-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666)
    try:
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
