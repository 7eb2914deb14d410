"""`qcowfast measure`: qemu-img measure's command line over `qcowfast.measure`.

The checks run in qemu-img.c img_measure()'s order, so a command line with several faults
fails on the one qemu-img names: option lists and --size as they are read, then the operands,
the source (and its snapshot), -O, the -o values (QEMU's option parser: util/qemu-option.c),
and last what qcow2_measure() checks. Every failure is one line and exit status 1.
Cheap imports only at module level: the measuring is imported when the command runs.
"""
from __future__ import annotations

import sys

from .cli_getopt import strtosz

SOURCE_FORMATS = ("qcow2", "raw")
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1

# The -o keys qemu-img measure accepts per output format (the format's create options and
# file-posix's) with QemuOpts' type of each: the value is checked even where measuring
# ignores it. encrypt.* keys are refused by name (QEMU sizes a LUKS header from them).
_QCOW2_KEYS = {"size": "size", "compat": "string", "backing_file": "string",
               "backing_fmt": "string", "data_file": "string", "data_file_raw": "bool",
               "encryption": "bool", "cluster_size": "size", "preallocation": "string",
               "lazy_refcounts": "bool", "refcount_bits": "number",
               "compression_type": "string", "extended_l2": "bool", "nocow": "bool",
               "extent_size_hint": "size"}
_RAW_KEYS = {"size": "size", "nocow": "bool", "preallocation": "string",
             "extent_size_hint": "size"}
# The other formats QEMU 7.2 creates (`qemu-img create -f FMT -o help`) and so reads -o for,
# though none but luks measures: their keys besides size, KEY:TYPE where not a string.
_OTHER_KEYS = {
    "file": "", "host_device": "preallocation", "host_cdrom": "preallocation",
    "iscsi": "preallocation", "iser": "preallocation", "nbd": "preallocation",
    "nvme": "preallocation", "nfs": "", "ssh": "",
    "gluster": "debug:number logfile preallocation",
    "luks": "cipher-alg cipher-mode hash-alg iter-time:number ivgen-alg ivgen-hash-alg "
            "key-secret",
    "parallels": "cluster_size:size",
    "qcow": "backing_file backing_fmt encrypt.format encrypt.key-secret encryption:bool",
    "qed": "backing_file backing_fmt cluster_size:size table_size:size",
    "rbd": "cluster_size:size encrypt.cipher-alg encrypt.format encrypt.key-secret "
           "password-secret",
    "vdi": "static:bool",
    "vhdx": "block_size:size block_state_zero:bool log_size:size subformat",
    "vmdk": "adapter_type backing_file backing_fmt compat6:bool hwversion subformat "
            "toolsversion zeroed_grain:bool",
    "vpc": "force_size:bool subformat",
}
# block_crypto_measure(): the enums QCryptoBlockCreateOptionsLUKS visits, in its order.
_HASHES = "md5 sha1 sha224 sha256 sha384 sha512 ripemd160".split()
_LUKS_ENUMS = (("cipher-alg", "aes-128 aes-192 aes-256 des 3des cast5-128 serpent-128 "
                "serpent-192 serpent-256 twofish-128 twofish-192 twofish-256".split()),
               ("cipher-mode", "ecb cbc xts ctr".split()),
               ("ivgen-alg", "plain plain64 essiv".split()),
               ("ivgen-hash-alg", _HASHES), ("hash-alg", _HASHES))
_BOOLEANS = {"on": True, "yes": True, "true": True, "y": True,
             "off": False, "no": False, "false": False, "n": False}
_SIZE_HINT = ("a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means "
              "kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")


class _Failed(Exception):
    """qemu-img's error_report()s, one argument each ("NAME: " before each, cli.program_name());
    exit 1."""


def add_parser(sub) -> None:
    from .cli import (_SnapshotParam, _add_force_share_option, _add_open_options,
                      _add_output_option)
    p = sub.add_parser(
        "measure", help="how large a new qcow2 or raw image would be, like qemu-img measure",
        description="Print the file size a conversion to a new image needs (required size), "
                    "the size of the fully allocated image and, for qcow2 output from a qcow2 "
                    "v3 source, the space its persistent bitmaps would take, as `qemu-img "
                    "measure` prints them. The source's allocation is read from its tables "
                    "(with its backing chain), never from its data; without a source, --size "
                    "gives the virtual size of an empty image.")
    p.add_argument("filename", metavar="FILENAME", nargs="?", default=None,
                   help="the source image (qcow2 or raw)")
    _add_output_option(p, "measure", at_once=True)
    p.add_argument("--size", metavar="N", default=None, type=_at_once(_size_operand),
                   help="the virtual size of a new, empty image instead of a source (k, M, G, "
                        "T, P, E suffixes)")
    p.add_argument("-f", dest="format", metavar="FMT", default=None,
                   help="format of FILENAME: qcow2 or raw (default: probe)")
    p.add_argument("-O", dest="output_format", metavar="FMT", default="raw",
                   help="format of the new image: raw (default) or qcow2")
    p.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                   type=_at_once(_option_list),
                   help="creation options key=val[,key=val...] as qemu-img takes them: for "
                        "qcow2 cluster_size, refcount_bits, extended_l2, compat, "
                        "preallocation, backing_file (and the keys measuring ignores, such as "
                        "lazy_refcounts); for raw preallocation, nocow")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", action=_SnapshotParam, default=[],
                   help="measure an internal snapshot of FILENAME: snapshot.id=ID, "
                        "snapshot.name=NAME or ID_OR_NAME")
    _add_force_share_option(p)
    _add_open_options(p)
    p.set_defaults(func=cmd_measure, extra=[])


def _at_once(check):
    """An argparse type for a value qemu-img checks as its getopt loop reads it: a _Failed
    ends the command there, before any later option is read."""
    def read(text: str):
        try:
            return check(text)
        except _Failed as exc:
            from .cli import usage_exit
            usage_exit(*exc.args, hint=False)
    return read


def _option_list(text: str) -> str:
    from .cli import _valid_option_list
    if not _valid_option_list(text):
        raise _Failed(f"Invalid option list: {text}")
    return text


def cmd_measure(args) -> int:
    try:
        result = _measure(args)
    except _Failed as exc:
        from .cli import program_name
        for line in exc.args:
            print(f"{program_name()}: {line}", file=sys.stderr)
        return 1
    if args.output == "json":
        from .info import qemu_json
        sys.stdout.write(qemu_json(result.to_json()) + "\n")
    else:
        sys.stdout.write(result.format_human())
    return 0


def _measure(args):
    # (option lists and --size were checked as they were read, in img_measure()'s getopt loop)
    size = args.size
    if args.extra:
        raise _Failed("At most one filename argument is allowed.")
    if args.filename is None and (args.format is not None or args.snapshot or args.image_opts):
        raise _Failed("--image-opts, -f, and -l require a filename argument.")
    if args.filename is not None and size is not None:
        raise _Failed("--size N cannot be used together with a filename.")
    if args.filename is None and size is None:
        raise _Failed("Either --size N or one filename must be specified.")
    from .cli import image_opts_refusal
    refused = image_opts_refusal(args, args.format) if args.filename is not None else None
    if refused:
        raise _Failed(refused)
    if args.format is not None and args.format not in SOURCE_FORMATS:
        from .cli import format_refusal
        raise _Failed(format_refusal(args.filename, args.format))

    from .measure import check_qcow2_options, measure
    source = None
    if args.filename is not None:
        from .cli import RAW_SNAPSHOT, SNAPSHOT_NOT_FOUND, opened_as_raw
        from .errors import QcowError, SnapshotNotFound, UnsupportedFeature
        from .image import open_source
        from .snapshots import choose_snapshot_option
        snapshot = choose_snapshot_option(args.snapshot)
        kw = dict(backing_dirs=args.allow_backing_dir, force_share=args.force_share)
        try:
            source = open_source(args.filename, args.format, snapshot=snapshot, **kw)
        except SnapshotNotFound:
            raise _Failed(SNAPSHOT_NOT_FOUND) from None
        except QcowError as exc:
            if getattr(exc, "qemu_snapshot", None):     # (a bad snapshot L1 table)
                raise _Failed(f"Failed to load snapshot: {exc.qemu_snapshot}") from None
            if isinstance(exc, UnsupportedFeature) and snapshot is not None and \
                    opened_as_raw(args.filename, args.format, **kw):
                raise _Failed(RAW_SNAPSHOT) from None
            raise
    try:
        fmt = args.output_format
        _output_format_refusal(fmt, args.options, args.object)
        opts = _options(args.options, fmt)
        kw = {k: opts[k] for k in ("cluster_size", "refcount_bits", "extended_l2", "compat",
                                   "preallocation", "backing_file") if k in opts}
        if fmt == "raw":
            kw = {}                             # (raw_measure() reads none of them)
        elif source is not None and "size" in opts:
            # qcow2_measure() checks the L1 table of -o size even when a source gives the
            # size measured.
            check_qcow2_options(opts["size"], **{k: v for k, v in kw.items()
                                                 if k != "backing_file"})
        # A ValueError (an option value QEMU refuses) is one line and exit 1 (cli.main).
        if source is None:
            return measure(size=size, format=fmt, **kw)
        return measure(source, format=fmt, **kw)
    finally:
        if source is not None:
            source.close()


def _output_format_refusal(fmt: str, texts: list[str], objects: list[str]) -> None:
    """img_measure() and bdrv_measure() on an -O other than qcow2 and raw: the driver, its
    creation options (the -o values checked against them), then its verdict: only luks
    measures, and qcowfast does not (it is refused by name where QEMU would measure it)."""
    if fmt in ("qcow2", "raw"):
        return
    from .probe import QEMU_DRIVERS
    if fmt not in QEMU_DRIVERS:
        raise _Failed(f"Unknown file format '{fmt}'")
    if fmt not in _OTHER_KEYS:
        raise _Failed(f"Format driver '{fmt}' does not support image creation")
    items = _items(texts, fmt)
    if fmt == "luks":
        _luks_refusal({key: text for key, (text, _) in items.items()}, objects)
    raise _Failed(f"Block driver '{fmt}' does not support size measurement")


def _luks_refusal(values: dict, objects: list[str]) -> None:
    """What block_crypto_measure() says first (the enums, iter-time as an int64, then
    qcrypto_block_luks_create()'s key secret), else qcowfast's refusal of LUKS."""
    from .cli_getopt import c_integer
    for key, allowed in _LUKS_ENUMS:
        if key in values and values[key] not in allowed:
            raise _Failed(f"Parameter '{key}' does not accept value '{values[key]}'")
    if "iter-time" in values:
        number = c_integer(values["iter-time"])
        if number is None or not -_INT64_MAX - 1 <= number <= _INT64_MAX:
            raise _Failed("Parameter 'iter-time' expects integer")
    secret = values.get("key-secret")
    if secret is None:
        raise _Failed("Parameter 'key-secret' is required for cipher")
    if not any(f"id={secret}" in obj.split(",") for obj in objects):
        raise _Failed(f"No secret with id '{secret}'")
    raise _Failed("-O luks: qcowfast measures qcow2 and raw images")


def _size_operand(text: str) -> int:
    """--size N: qemu-img's cvtnum("image size", N), from 0 to INT64_MAX."""
    try:
        value = strtosz(text)
    except OverflowError:
        value = None
    except ValueError:
        raise _Failed("Invalid image size specified. You may use k, M, G, T, P or E suffixes "
                      "for", "kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                      "exabytes.") from None
    if value is None or value > _INT64_MAX:
        raise _Failed(f"Invalid image size specified. Must be between 0 and {_INT64_MAX}.")
    return value


def _split_options(text: str):
    """Yield (key, value) of a -o list as QEMU's opts_do_parse() reads it: ",," is a comma
    in a value; a key alone is key=on, "noKEY" KEY=off."""
    pos, n = 0, len(text)
    while pos < n:
        stop = pos
        while stop < n and text[stop] not in "=,":
            stop += 1
        key = text[pos:stop]
        if stop < n and text[stop] == "=":
            chars, pos = [], stop + 1
            while pos < n:
                if text[pos] == ",":
                    if text[pos + 1:pos + 2] != ",":
                        break
                    pos += 1
                chars.append(text[pos])
                pos += 1
            value = "".join(chars)
        else:
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
            pos = stop
        pos += 1                                # the separating comma
        yield key, value


def create_options(texts: list[str], fmt: str, device: bool = False) -> dict:
    """The -o lists joined, as QEMU's qemu_opts_do_parse() reads them against the creation
    options of `fmt` (raw or qcow2) and of the protocol: file, or host_device for a `device`
    name: {key: (text, typed value)}, a later key winning, every value checked (encrypt.*
    keys of qcow2 kept as text). Raises ValueError with QEMU's line for the first key or
    value it refuses."""
    from .cli_getopt import c_integer
    keys = _keys(fmt, device)
    out: dict = {}
    for key, text in _split_options(",".join(texts)):
        kind = "string" if key.startswith("encrypt.") and fmt == "qcow2" else keys.get(key)
        value = text
        if kind is None:
            raise ValueError(f"Invalid parameter '{key}'")
        if kind == "bool":
            if text not in _BOOLEANS:
                raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
            value = _BOOLEANS[text]
        elif kind == "size":
            try:
                value = strtosz(text)
            except OverflowError:
                raise ValueError(f"Value '{text}' is out of range for parameter '{key}'") \
                    from None
            except ValueError:
                raise ValueError(f"Parameter '{key}' expects {_SIZE_HINT}") from None
        elif kind == "number":
            number = c_integer(text)
            if number is None:
                raise ValueError(f"Parameter '{key}' expects a number")
            if not -_UINT64_MAX <= number <= _UINT64_MAX:
                raise ValueError(f"Value '{text}' is too large for parameter '{key}'")
            value = number & _UINT64_MAX        # strtoull: "-1" wraps
        out.pop(key, None)
        out[key] = (text, value)
    return out


def _keys(fmt: str, device: bool = False) -> dict:
    """The -o keys of output format `fmt` with their QemuOpts types: its creation options,
    then its protocol's (img_measure() and img_convert() append them): file-posix's, or for
    a `device` host_device's, which has no nocow or extent_size_hint."""
    if fmt == "qcow2":
        return {key: kind for key, kind in _QCOW2_KEYS.items()
                if not (device and key in _FILE_ONLY_KEYS)}
    own = {"size": "size"}
    for item in _OTHER_KEYS.get(fmt, "").split():
        key, _, kind = item.partition(":")
        own[key] = kind or "string"
    protocol = {key: kind for key, kind in _RAW_KEYS.items()
                if not (device and key in _FILE_ONLY_KEYS)}
    return {**protocol, **own}


_FILE_ONLY_KEYS = ("nocow", "extent_size_hint")      # (file-posix's, not host_device's)


def _items(texts: list[str], fmt: str) -> dict:
    """create_options(), its refusal in img_measure()'s two lines."""
    try:
        return create_options(texts, fmt)
    except ValueError as exc:
        raise _Failed(str(exc), f"Invalid options for file format '{fmt}'") from None


def _options(texts: list[str], fmt: str) -> dict:
    """The -o lists joined (a later key wins, every value checked), typed."""
    items = _items(texts, fmt)
    for key in items:
        if key.startswith("encrypt."):
            raise _Failed(f"-o {key}: not supported by qcowfast (measuring encrypted images)")
    return {key: value for key, (_, value) in items.items()}
