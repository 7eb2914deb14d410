"""`qcowfast serve`: export an image read-only over NBD (qemu-nbd -r's options where they apply).

Cheap imports only at module level: the server is imported when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys


class _Shared(argparse.Action):
    """qemu-nbd -e: any integer qemu_strtoi() reads (0x.., 010 octal), 0 for no limit; any
    other value fails as it comes, in qemu-nbd's words."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .cli_getopt import c_integer
        value = c_integer(values)
        if value is None or not 0 <= value <= 2 ** 31 - 1:     # an int, for qemu_strtoi
            _fail(f"Invalid shared device number '{values}'")
        setattr(namespace, self.dest, value)


class _Ignored(argparse.Action):
    """A qemu-nbd option with no effect on a read-only export served from the page cache."""

    def __call__(self, parser, namespace, values, option_string=None):
        pass


class _Refused(argparse.Action):
    """A qemu-nbd option that needs a feature qcowfast serve lacks: refused by name."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.refused = [*getattr(namespace, "refused", []), option_string]


def _fail(message: str):
    """Print a qemu-nbd error message under the program's name (cli.program_name()) and exit
    1, as qemu-nbd does (its options are checked in the order they come, the first error ends
    the command)."""
    from .cli import program_name
    print(f"{program_name()}: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


class _GetoptMessage(argparse.Action):
    """Under the name qemu-nbd, getopt_long's refusal of an option (cli_getopt.getopt_argv
    hands over glibc's words, which glibc prints after argv[0]), then qemu-nbd.c's `case '?'`
    error_report(); status 1."""

    def __call__(self, parser, namespace, values, option_string=None):
        argv0 = _argv0()
        print(f"{argv0}: {values}\nqemu-nbd: Try `{argv0} --help' for more information.",
              file=sys.stderr, flush=True)
        sys.exit(1)


def operands_refused() -> None:
    """Under the name qemu-nbd: qemu-nbd.c main()'s check, once the options are read, that one
    image follows them (its error_report(), then error_printf()'s pointer to the help)."""
    argv0 = _argv0()
    print(f"qemu-nbd: Invalid number of arguments\nTry `{argv0} --help' for more information.",
          file=sys.stderr, flush=True)
    sys.exit(1)


def _argv0() -> str:
    return sys.argv[0] if sys.argv else "qemu-nbd"


_CACHE_MODES = {"none": True, "off": True, "directsync": True, "writeback": False,
                "unsafe": False, "writethrough": False}     # mode -> O_DIRECT (BDRV_O_NOCACHE)
_AIO_MODES = {"threads": False, "native": True, "io_uring": False}       # -> native AIO
_DISCARD_MODES = {"off": False, "ignore": False, "on": True, "unmap": True}   # -> BDRV_O_UNMAP
_DETECT_ZEROES = ("off", "on", "unmap")
# Options given at most once: (qemu-nbd's messages for a repeat and a bad mode, the modes,
# and the namespace attribute a mode sets).
_ONCE = {"cache": ("-n and --cache can only be specified once", "Invalid cache mode `{}'",
                   _CACHE_MODES, "direct_io"),
         "aio": ("--aio can only be specified once", "Invalid aio mode '{}'", _AIO_MODES,
                 "native_aio"),
         "discard": ("--discard can only be specified once", "Invalid discard mode `{}'",
                     _DISCARD_MODES, "unmap")}


class _CacheOption(argparse.Action):
    """qemu-nbd's --cache, -n, --aio, --discard and --detect-zeroes: without effect on a
    read-only export served through the page cache, but their values are checked as qemu-nbd
    checks them, with its messages (qemu-nbd.c; bdrv_parse_cache_mode, bdrv_parse_aio,
    bdrv_parse_discard_flags are exact, case-sensitive matches)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.cache_seen = getattr(namespace, "cache_seen", set())
        key, mode = ("cache", "none") if self.dest == "nocache" else (self.dest, values)
        if key in _ONCE:
            repeated, bad, modes, attribute = _ONCE[key]
            if key in seen:
                _fail(repeated)
            seen.add(key)
            if mode not in modes:
                _fail(bad.format(mode))
            setattr(namespace, attribute, modes[mode])
        else:                                           # --detect-zeroes (may repeat)
            if values not in _DETECT_ZEROES:
                _fail(f"Failed to parse detect_zeroes mode: invalid parameter value: {values}")
            if values == "unmap" and not getattr(namespace, "unmap", False):
                _fail("setting detect-zeroes to unmap is not allowed without setting discard "
                      "operation to unmap")


class _LongString(argparse.Action):
    """-x and -D: refused over 4096 bytes (NBD's longest string), as qemu-nbd refuses them."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(os.fsencode(values)) > 4096:
            what = "export name" if self.dest == "export_name" else "export description"
            _fail(f"{what} '{values}' too long")
        setattr(namespace, self.dest, values)


class _LoadSnapshot(argparse.Action):
    """-l: qemu-nbd.c parses a `snapshot.*` value while reading its options, as qemu-img
    convert -l does (cli._SnapshotParam: the same parser, warnings and errors), but quotes it
    `so' in its last line; any other value names a snapshot by id or name. Values collect in
    a list: the last `snapshot.*` one counts, else the last (sn_opts wins over sn_id_or_name)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.startswith("snapshot."):
            values = _snapshot_param(values, namespace)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


def _snapshot_param(text: str, namespace) -> str:
    import contextlib
    import io

    from .cli import _SnapshotParam
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _SnapshotParam.parsed(text, namespace)
    finally:                                  # (its warnings too, when it parses)
        sys.stderr.write(err.getvalue().replace(f"param '{text}'\n", f"param `{text}'\n"))
        sys.stderr.flush()


class _ObjectOption(argparse.Action):
    """--object: checked as qemu-nbd checks it while reading its options (its line, status 1),
    then ignored; a request for help is answered as qcowfast's qemu-img commands answer it."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            asked = _nbd_object(values, namespace.__dict__.setdefault("_objects", {}))
        except ValueError as exc:
            _fail(str(exc))
        if asked:
            print("qcowfast creates no QEMU objects: --object is accepted and ignored")
            parser.exit(0)


# qemu-nbd's EventLoopBase properties (event-loop-base.c), then IOThread's own (iothread.c).
_LOOP_PARAMS = ("aio-max-batch", "thread-pool-min", "thread-pool-max")
_IOTHREAD_PARAMS = _LOOP_PARAMS + ("poll-max-ns", "poll-grow", "poll-shrink")
_INT_MAX = 2 ** 31 - 1


def _nbd_object(text: str, created: dict) -> bool:
    """qemu-nbd's user_creatable_process_cmdline(): qemu-img's (cli_getopt.qemu_object), but
    qemu-nbd also links iothread objects, and runs no main loop yet while it reads its options,
    so a main-loop object fails (main_loop_update_params(): "qemu aio context not ready").
    Returns whether `text` asks for help; raises ValueError with qemu-nbd's line."""
    from .cli_getopt import keyval, qemu_object
    args, asked = keyval(text, "qom-type")
    kind = args.get("qom-type")
    if asked or kind not in ("iothread", "main-loop"):
        return qemu_object(text, created)
    params = [name for name in _LOOP_PARAMS if name in args]
    if kind == "main-loop":
        # Each property set updates the loop, as does completing it: both fail, after the
        # visitor's checks (and with no property given, after the duplicate id check).
        qemu_object(text, {} if params else created)
        _loop_values(args, _qdict_order(params)[:1])
        raise ValueError("qemu aio context not ready")
    _iothread(args, created)
    return False


def _iothread(args: dict, created: dict) -> None:
    """An IOThread's checks, in QEMU 7.2's order: the QAPI visitor (members, id), its
    properties (event_loop_base_set_param(), iothread_set_poll_param()), the id, then
    iothread_complete()'s thread pool (aio_context_set_thread_pool_params())."""
    from .cli_getopt import _IDENTIFIER, _member, _typed
    args.pop("qom-type")
    ident = _member(args, "id")
    values = {name: _typed(args, name, "int") for name in _IOTHREAD_PARAMS if name in args}
    for name in args:
        raise ValueError(f"Parameter '{name}' is unexpected")
    if not _IDENTIFIER.fullmatch(ident):
        raise ValueError("Parameter 'id' expects an identifier\nIdentifiers consist of "
                         "letters, digits, '-', '.', '_', starting with a letter.")
    numbers = _loop_values(values, list(values))
    if ident in created:
        raise ValueError(f"attempt to add duplicate property '{ident}' to object (type "
                         "'container')")
    low, high = numbers.get("thread-pool-min", 0), numbers.get("thread-pool-max", 64)
    if low > high or not high or high > _INT_MAX:
        raise ValueError("bad thread-pool-min/thread-pool-max values")
    created[ident] = ("iothread", None)


def _loop_values(args: dict, names: list) -> dict:
    """The integer values of the properties `names` of `args`, set in QEMU's order; a negative
    one is refused."""
    from .cli_getopt import c_integer
    numbers = {name: c_integer(args[name]) for name in _qdict_order(names)}
    for name, value in numbers.items():
        if value < 0:
            raise ValueError(f"{name} value must be in range [0, {2 ** 63 - 1}]")
    return numbers


def _qdict_order(names: list) -> list:
    """`names`, inserted in this order into a QDict, in the order QEMU walks it (qobject/
    qdict.c: 512 buckets by tdb_hash(), each a list with the latest insertion first), which is
    the order object_set_properties_from_qdict() sets an object's properties in."""
    def bucket(name: str) -> int:
        value = 0x238F13AF * len(name)
        for i, c in enumerate(name.encode()):
            value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512
    return sorted(names, key=lambda n: (bucket(n), -names.index(n)))


# qemu-nbd options accepted and ignored: (option strings, nargs).
_IGNORED = ((("-T", "--trace"), 1), (("-s", "--snapshot"), 0))
# qemu-nbd options accepted and checked, without effect: (option strings, nargs, dest).
_CHECKED = ((("-n", "--nocache"), 0, "nocache"), (("--cache",), None, "cache"),
            (("--aio",), None, "aio"), (("--discard",), None, "discard"),
            (("--detect-zeroes",), None, "detect_zeroes"))
# qemu-nbd options refused by name: (option strings, nargs, what is missing).
_REFUSED = ((("--image-opts",), 0, "option strings instead of file names"),
            (("-o", "--offset"), 1, "export offsets"),
            (("-c", "--connect"), 1, "kernel NBD devices (use nbd-client with the URI)"),
            (("-d", "--disconnect"), 0, "kernel NBD devices"),
            (("-L", "--list"), 0, "the client side"),
            (("--tls-creds",), 1, "TLS"), (("--tls-authz",), 1, "TLS"),
            (("--tls-hostname",), 1, "TLS"), (("--selinux-label",), 1, "SELinux labels"))


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r} (seconds)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid time {text!r} (seconds, 0 for no limit)")
    return value or None


def _resolved_port(bind: str, port: str) -> int:
    """The TCP port `port` names (a number or a service such as "nbd"), resolved with `bind`
    as qemu-nbd's inet_listen_saddr() does (getaddrinfo, AI_PASSIVE); a name it cannot resolve
    ends the command with qemu-nbd's line, before the image is opened, as there."""
    import socket
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        _fail(f"address resolution failed for {bind}:{port}: {exc.strerror}")
    return infos[0][4][1]


class _Version(argparse.Action):
    """-V / --version: print cli.version_text() as it is (argparse's own action rewraps it)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 **kwargs):
        super().__init__(option_strings, dest=dest, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .cli import version_text
        print(version_text(), flush=True)
        parser.exit()


def add_parser(sub) -> None:
    from .cli import program_name
    from .cli_getopt import GLIBC_MESSAGE
    nbd = program_name() == "qemu-nbd"
    p = sub.add_parser(
        "serve", prog="qemu-nbd" if nbd else None,
        help="export an image read-only over NBD, like qemu-nbd -r",
        description="Serve the guest contents of an image (QCOW2 with its backing chain, or raw) "
                    "as a read-only NBD export that qemu-img, QEMU, nbdcopy, nbdinfo, nbdfuse and "
                    "the kernel's nbd-client can read. Listens on a Unix socket (a new one in a "
                    "temporary directory unless --socket is given), or on TCP when --port or "
                    "--bind is given (127.0.0.1:10809 by default: never beyond loopback unless "
                    "--bind names another address). The URI to connect to is printed on stderr. "
                    "Without --persistent the server exits when its last client disconnects, as "
                    "qemu-nbd does.")
    p.add_argument("image", metavar="IMG", help="image to export")
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    p.add_argument("-b", "--bind", metavar="ADDR", help="listen on TCP at ADDR "
                   "(default 127.0.0.1 when --port is given)")
    p.add_argument("-p", "--port", metavar="N",
                   help="listen on TCP port N, a number or a service name (default 10809 when "
                        "--bind is given; 0 picks one)")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", action=_LongString,
                   help="export name (default: the empty default export)")
    p.add_argument("-D", "--description", default="", metavar="TEXT", action=_LongString,
                   help="export description clients may ask for (default: none)")
    p.add_argument("-l", "--load-snapshot", dest="snapshot", default=[], metavar="SNAPSHOT",
                   action=_LoadSnapshot,
                   help="serve internal snapshot SNAPSHOT instead of the current state: "
                        "snapshot.id=ID, snapshot.name=NAME (both may be given) or ID_OR_NAME, "
                        "as qemu-nbd -l")
    p.add_argument("-f", "--format", metavar="FMT", default=None,
                   help="image format: qcow2 or raw (default: probe)")
    p.add_argument("--allow-backing-dir", metavar="DIR", action="append", default=[],
                   help="also follow backing and external data files named inside the image "
                        "when they lie in DIR")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="also offer the qemu:allocation-depth metadata context (the depth in "
                        "the backing chain of the layer allocating each range)")
    p.add_argument("-B", "--bitmap", dest="bitmaps", metavar="NAME", action="append",
                   default=[], help="also offer qemu:dirty-bitmap:NAME for this persistent "
                                    "bitmap of the image or its backing chain (repeatable)")
    p.add_argument("-e", "--shared", action=_Shared, default=8, metavar="N",
                   help="serve up to N connections at once (default 8; 0 for no limit; "
                        "multi-conn is advertised unless N is 1)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if a running QEMU holds it open for writing")
    p.add_argument("-r", "--read-only", action="store_true",
                   help="accepted for qemu-nbd compatibility: the export is always read-only")
    p.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="drop clients that have not finished the handshake after SECONDS "
                        "(default 10; 0 for no limit)")
    p.add_argument("--idle-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="drop clients idle for SECONDS between requests (default: no limit)")
    p.add_argument("-V", "--version", action=_Version, nargs=0,
                   help="print the version and exit (as qemu-nbd -V)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log connections and protocol errors on stderr")
    p.add_argument("--fork", action="store_true",
                   help="run in the background once the server listens (the command then "
                        "exits 0; an error before that is printed and exits 1)")
    p.add_argument("--pid-file", metavar="PATH",
                   help="write the server's process id to PATH once it listens (removed when "
                        "it stops)")
    p.add_argument("--object", metavar="OBJECTDEF", action=_ObjectOption, help=argparse.SUPPRESS)
    for options, nargs in _IGNORED:
        p.add_argument(*options, action=_Ignored, nargs=nargs, help=argparse.SUPPRESS)
    for options, nargs, dest in _CHECKED:
        p.add_argument(*options, action=_CacheOption, nargs=nargs, dest=dest,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for options, nargs, _ in _REFUSED:
        p.add_argument(*options, action=_Refused, nargs=nargs, help=argparse.SUPPRESS)
    if nbd:                                     # (qemu-nbd's getopt errors: its own words)
        p.add_argument(GLIBC_MESSAGE, action=_GetoptMessage, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve, refused=[])


def cmd_serve(args) -> int:
    import logging
    import signal
    import threading

    from .cli import program_name
    from .errors import QcowError
    from .serve import DEFAULT_PORT, ExportRefused, NBDServer
    from .snapshots import choose_snapshot_option

    for option in args.refused:
        what = next(w for o, _, w in _REFUSED if option in o)
        print(f"{program_name()}: serve {option}: not supported ({what})", file=sys.stderr)
        return 1
    port, bind = args.port, args.bind
    if args.socket is not None:
        port = bind = None                        # qemu-nbd: -k wins over -b/-p
    elif port is None and (bind is not None or program_name() == "qemu-nbd"):
        port = str(DEFAULT_PORT)                  # (qemu-nbd's default: TCP, port 10809)
    if port is not None:
        bind = bind or "127.0.0.1"
        port = _resolved_port(bind, port)
    args.snapshot = choose_snapshot_option(args.snapshot)
    refused = _open_refusal(args)
    if refused is not None:
        print(f"{program_name()}: {refused}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{program_name()}: %(message)s", stream=sys.stderr)
    _lean_threads()
    ready_w = _fork() if args.fork else -1
    server = NBDServer(args.image, socket=args.socket, bind=bind or "127.0.0.1",
                       port=port, export_name=args.export_name, description=args.description,
                       snapshot=args.snapshot, backing_dirs=args.allow_backing_dir,
                       shared=args.shared, persistent=args.persistent,
                       force_share=args.force_share, format=args.format,
                       # (qemu-nbd lists its -B bitmaps last first)
                       allocation_depth=args.allocation_depth, bitmaps=args.bitmaps[::-1],
                       handshake_timeout=args.handshake_timeout,
                       idle_timeout=args.idle_timeout)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    # SIGHUP too: qemu-nbd ends cleanly (status 0) on each of them.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    pid_written = False
    try:
        try:
            server.start()
        except ExportRefused as exc:             # a bitmap to export (nbd_export_create())
            print(f"{program_name()}: {exc.qemu_nbd}", file=sys.stderr)
            return 1
        except QcowError as exc:                 # opening the image (or its snapshot)
            print(f"{program_name()}: {_open_failure(exc, args)}", file=sys.stderr)
            return 1
        except OSError as exc:
            if exc.filename is not None:
                raise                             # names its file: printed by cli.main
            # Listening failed: the message names the socket path or address:port.
            print(f"{program_name()}: serve: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if args.pid_file is not None:             # (an empty name fails, as in qemu-nbd)
            try:
                pid_path = _write_pid_file(args.pid_file)
            except OSError as exc:
                print(f"{program_name()}: Could not create '{args.pid_file}': "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return 1
            pid_written = True
        if program_name() != "qemu-nbd":         # (qemu-nbd prints nothing, -v or not)
            print(f"{program_name()}: serving {args.image} on {server.uri}", file=sys.stderr,
                  flush=True)
        if ready_w >= 0:
            # qemu-nbd's daemon moves to / so that it keeps no directory busy, once everything
            # named relative to the starting directory is open (the image and its backing and
            # data files, the socket; the socket and pid file are removed by absolute names).
            os.chdir("/")
            _detach(ready_w)
        while not stop.is_set() and not server.wait(0.2):
            pass
    finally:
        server.stop()
        if pid_written:
            _remove_pid_file(pid_path)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _blk_new_open(image: str, words: str) -> str:
    """qemu-nbd's line for an image it cannot open: its error after "Failed to blk_new_open
    'IMG': ", where qemu-img's says "Could not open 'IMG': "."""
    prefix = f"Could not open '{image}': "
    return f"Failed to blk_new_open '{image}': " + (
        words[len(prefix):] if words.startswith(prefix) else words)


def _open_refusal(args) -> str | None:
    """qemu-nbd's line for what its blk_new_open() refuses before qcowfast opens the image,
    in its order: an -f QEMU lacks, the file's own open, --aio=native without a direct cache,
    an -f qcowfast does not read (in qcowfast's words); else None."""
    from .cli import SOURCE_FORMATS, format_refusal
    from .probe import QEMU_DRIVERS
    image, fmt = args.image, args.format
    if fmt is not None and fmt not in QEMU_DRIVERS:
        return _blk_new_open(image, f"Unknown driver '{fmt}'")
    if getattr(args, "native_aio", False) and not getattr(args, "direct_io", False):
        try:
            os.close(os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            return f"Failed to blk_new_open '{image}': Could not open '{image}': {exc.strerror}"
        # file-posix refuses the pair once the file is open.
        return _blk_new_open(image, "aio=native was specified, but it requires "
                             "cache.direct=on, which was not specified.")
    if fmt is not None and fmt not in SOURCE_FORMATS:
        return _blk_new_open(image, format_refusal(image, fmt))
    return None


def _open_failure(exc, args) -> str:
    """qemu-nbd's line for `exc`, raised opening the image: its snapshot cannot be loaded
    ("Failed to load snapshot: ..."), else blk_new_open() failed with qemu-img's words."""
    from .cli import RAW_SNAPSHOT, SNAPSHOT_NOT_FOUND, error_text, opened_as_raw
    from .errors import SnapshotNotFound, UnsupportedFeature
    if isinstance(exc, SnapshotNotFound):
        return SNAPSHOT_NOT_FOUND
    words = error_text(exc, [(args.image, args.format)])
    if args.snapshot is None:
        return _blk_new_open(args.image, words)
    kw = dict(backing_dirs=args.allow_backing_dir, force_share=args.force_share)
    if isinstance(exc, UnsupportedFeature) and opened_as_raw(args.image, args.format, **kw):
        return RAW_SNAPSHOT
    # qemu-nbd loads the snapshot once the image is open (qcow2_snapshot_load_tmp(): its L1
    # table's checks, in `qemu_snapshot`); qcowfast's own refusals there (a table past the
    # end of the file) are put the same way.
    snapshot_words = getattr(exc, "qemu_snapshot", None)
    if snapshot_words is None and _opens(args.image, args.format, **kw):
        prefix = f"Could not open '{args.image}': "
        snapshot_words = words[len(prefix):] if words.startswith(prefix) else words
    if snapshot_words is not None:
        return f"Failed to load snapshot: {snapshot_words}"
    return _blk_new_open(args.image, words)


def _opens(image: str, fmt: str | None, **kw) -> bool:
    """Whether `image` opens without a snapshot. `kw`: open_source()'s."""
    from .errors import QcowError
    from .image import open_source
    try:
        open_source(image, fmt, **kw).close()
    except (QcowError, OSError):
        return False
    return True


THREAD_STACK = 1 << 20          # bytes: the stack of QEMU's coroutines, ample for a serve thread
M_ARENA_MAX = -8                # mallopt() parameter (glibc's malloc.h)


def _lean_threads() -> None:
    """Less address space per thread in the serve process, which runs a few threads per client
    (a memory limit, `ulimit -v`, counts address space, used or not): 1 MiB stacks instead of
    the stack limit's 8 MiB, and at most one glibc malloc arena per core instead of eight, each
    reserving 64 MiB. The process is the command's own, so this changes nobody else's."""
    import threading
    threading.stack_size(THREAD_STACK)
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, max(2, len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):   # not glibc: its defaults stay
        pass


def _fork() -> int:
    """qemu-nbd --fork: the parent waits until the child listens, then exits 0 (or with the
    child's status if it failed first). Returns, in the child, the pipe end to signal on."""
    import os
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        ready = os.read(read_end, 1)
        os.close(read_end)
        if ready:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_end)
    os.setsid()
    return write_end


def _detach(ready_w: int) -> None:
    """In the forked server, once it listens: tell the parent, leave the terminal's streams."""
    import os
    os.write(ready_w, b"1")
    os.close(ready_w)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _write_pid_file(path: str) -> str:
    """Write the process id to `path`; return its absolute name (to remove it by)."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    return os.path.abspath(path)


def _remove_pid_file(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return                            # someone else's by now
        os.unlink(path)
    except OSError:
        pass
