"""`qcowfast convert`: qemu-img convert's command line mapped to convert(): its options, its
refusals in img_convert()'s order and words, -o's output options and what creating the output
refuses."""
from __future__ import annotations

import argparse
import os
import re
import stat
import sys

from .cli import (RAW_SNAPSHOT, SOURCE_FORMATS, _NOT_FILES, CliError, QemuLine,
                  _SnapshotParam, _add_open_options, _add_progress_options,
                  _add_source_cache_option, _valid_option_list, cache_refusal, cvtnum,
                  format_refusal, opened_as_raw, parse_size, program_name, usage_exit)
from .cli_process import _CLOSED_STREAMS, _is_terminal, _quiet_stdout
from .cli_progress import _progress, human_size
from .errors import QcowError
from .probe import QEMU_DRIVERS


MAX_COROUTINES = 16                          # qemu-img convert -m: 1 .. MAX_COROUTINES
OUTPUT_FORMATS = ("raw", "qcow2")


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


def _option_list(text: str) -> str:
    """convert -o as img_convert()'s accumulate_options() reads it: a list that cannot be
    joined to the others is refused there."""
    if not _valid_option_list(text):
        usage_exit(f"Invalid option list: {text}", hint=False)
    return text


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


def add_parser(sub) -> None:
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
