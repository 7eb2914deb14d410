"""`qcowfast snapshot -l`: qemu-img snapshot's listing of internal snapshots, with its command
line (qemu-img.c img_snapshot(), dump_snapshots()).

The image is opened as qemu-img opens it, backing chain included, and the table printed is the
one `qcowfast info` prints. The actions that write (-a apply, -c create, -d delete) are refused
by name: qcowfast never writes to an image.
Cheap imports only at module level.
"""
from __future__ import annotations

import argparse
import sys

# The actions qemu-img snapshot takes, one per command line: option -> what it does.
ACTIONS = {"-l": "lists", "-a": "applies", "-c": "creates", "-d": "deletes"}


class _Action(argparse.Action):
    """Records the action; a second one is refused there and then, as img_snapshot()'s getopt
    loop refuses it (before any later option is read)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if namespace.actions:
            from .cli import usage_exit
            usage_exit("Cannot mix '-l', '-a', '-c', '-d'")
        namespace.actions = [(option_string, values)]


def add_parser(sub) -> None:
    from .cli import _add_open_options
    p = sub.add_parser(
        "snapshot", help="list the internal snapshots of an image, like qemu-img snapshot -l",
        description="List the internal snapshots of a QCOW2 image (-l) in qemu-img's table: "
                    "ID, tag, VM state size, date, VM clock and instruction count. The image "
                    "is opened as qemu-img opens it, with its backing chain; a raw image, or "
                    "a qcow2 image without snapshots, lists nothing. Applying (-a), creating "
                    "(-c) and deleting (-d) snapshots write to the image: qcowfast refuses "
                    "them.")
    p.add_argument("image", metavar="FILENAME", nargs="?", default=None)
    p.add_argument("-l", dest="actions", nargs=0, action=_Action, default=[],
                   help="list the snapshots")
    for option in ("-a", "-c", "-d"):
        p.add_argument(option, dest="actions", metavar="SNAPSHOT", action=_Action,
                       help=argparse.SUPPRESS)     # refused by name: they write
    p.add_argument("-f", dest="format", metavar="FMT", default=None,
                   help="format of FILENAME: qcow2 or raw (default: probe; qemu-img 7.2 has "
                        "no -f here)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="accepted (the listing prints all the same, as in qemu-img)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read the image even when a running QEMU holds it open for writing")
    _add_open_options(p)
    p.set_defaults(func=cmd_snapshot, extra=[])


def cmd_snapshot(args) -> int:
    from .cli import (RAW_PROBE_WARNING, _file_refusal, image_opts_refusal, usage_exit)
    if args.image is None or args.extra:
        usage_exit("Expecting one image file name")
    action = args.actions[0][0] if args.actions else None
    refused = image_opts_refusal(args, args.format)
    if refused is None and args.format is not None and args.format not in ("qcow2", "raw"):
        refused = f"-f {args.format}: qcowfast reads qcow2 and raw images"
    if refused is None and action != "-l":
        # img_snapshot() opens the image read-write unless it lists (no action too).
        refused = ("Could not open '{}': force-share=on can only be used with read-only "
                   "images".format(args.image) if args.force_share else
                   _file_refusal(args.image, writable=True))
    if refused is not None:
        return _fail(refused)
    from .image import Image, open_source
    with open_source(args.image, args.format, backing_dirs=args.allow_backing_dir,
                     force_share=args.force_share) as image:
        raw = not isinstance(image, Image)
        if action != "-l" and raw and args.format is None:
            sys.stderr.write(RAW_PROBE_WARNING.format(args.image))  # (QEMU's raw_open())
        if action in ("-a", "-c", "-d"):
            return _fail(f"snapshot {action}: not supported by qcowfast (it {ACTIONS[action]} "
                         "a snapshot, which writes to the image; qcowfast never writes images)")
        # qcow2_snapshot_list(): none from a raw image or one with an external data file.
        if action is None or raw or image.header.has_data_file:
            return 0
        from .info import read_snapshot_table, snapshot_json, snapshot_table
        snapshots = read_snapshot_table(image._fd, image.header)[0]
    if snapshots:
        sys.stdout.write("\n".join(snapshot_table([snapshot_json(s) for s in snapshots]))
                         + "\n")
    return 0


def _fail(message: str) -> int:
    from .cli import program_name
    print(f"{program_name()}: {message}", file=sys.stderr)
    return 1
