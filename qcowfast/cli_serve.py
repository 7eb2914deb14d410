"""`qcowfast serve`: export an image read-only over NBD (qemu-nbd -r's options where they apply).

Cheap imports only at module level: the server is imported when the command runs.
"""
from __future__ import annotations

import argparse
import sys


def _snapshot_name(text: str) -> str:
    # qemu-nbd -l accepts snapshot.name=NAME, snapshot.id=ID or a bare id-or-name.
    for prefix in ("snapshot.name=", "snapshot.id="):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (a positive integer)")
    return value


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r} (seconds)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid time {text!r} (seconds, 0 for no limit)")
    return value or None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid TCP port {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="export an image read-only over NBD, like qemu-nbd -r",
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
    p.add_argument("-p", "--port", type=_port, metavar="N",
                   help="listen on TCP port N (default 10809 when --bind is given; 0 picks one)")
    p.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help="export name (default: the empty default export)")
    p.add_argument("-l", "--snapshot", type=_snapshot_name, default=None, metavar="SNAPSHOT",
                   help="serve internal snapshot SNAPSHOT (id or name; snapshot.name=NAME and "
                        "snapshot.id=ID are accepted) instead of the current state")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), default=None,
                   help="image format (default: probe)")
    p.add_argument("--allow-backing-dir", metavar="DIR", action="append", default=[],
                   help="also follow backing and external data files named inside the image "
                        "when they lie in DIR")
    p.add_argument("-e", "--shared", type=_positive, default=8, metavar="N",
                   help="serve up to N connections at once (default 8)")
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
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log connections and protocol errors on stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import logging
    import signal
    import threading

    from .serve import DEFAULT_PORT, NBDServer

    if args.socket is not None and (args.bind is not None or args.port is not None):
        print("qcowfast: --socket cannot be combined with --bind/--port", file=sys.stderr)
        return 1
    port = args.port
    if port is None and args.bind is not None:
        port = DEFAULT_PORT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="qcowfast: %(message)s", stream=sys.stderr)
    server = NBDServer(args.image, socket=args.socket, bind=args.bind or "127.0.0.1",
                       port=port, export_name=args.export_name, snapshot=args.snapshot,
                       backing_dirs=args.allow_backing_dir, shared=args.shared,
                       persistent=args.persistent, force_share=args.force_share,
                       format=args.format, handshake_timeout=args.handshake_timeout,
                       idle_timeout=args.idle_timeout)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except OSError as exc:
            if exc.filename is not None:
                raise                             # names its file: printed by cli.main
            # Listening failed: the message names the socket path or address:port.
            print(f"qcowfast: serve: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"qcowfast: serving {args.image} on {server.uri}", file=sys.stderr, flush=True)
        while not stop.is_set() and not server.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
