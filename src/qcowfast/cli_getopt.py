"""A command line read as GNU getopt_long reads it (qemu-img's and qemu-nbd's parser), rewritten
into the spelling argparse reads the same way.

Where the two differ, scripts written for qemu-img would be misread:
- a short option's value is the rest of its word, `=` included (`-f=raw` names format
  "=raw", an error, where argparse drops the `=`), or else the next word, even one starting
  with `-` (`-l -snap`);
- a long option may be abbreviated to a unique prefix of *qemu-img's* long options for that
  subcommand (`--force` is --force-share), never of qcowfast's own extras, and an ambiguous
  prefix is an error;
- flags combine (`-pq`), and `--` ends the options.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import stat
import sys

# qemu-img 7.2's long options per subcommand, and qemu-nbd's (for abbreviations).
QEMU_LONG = {
    "convert": ("help", "object", "image-opts", "force-share", "target-image-opts", "salvage",
                "target-is-zero", "bitmaps", "skip-broken-bitmaps"),
    "info": ("help", "object", "image-opts", "force-share", "format", "output",
             "backing-chain"),
    "map": ("help", "object", "image-opts", "force-share", "format", "output", "start-offset",
            "max-length"),
    "check": ("help", "object", "image-opts", "force-share", "format", "output", "repair"),
    "compare": ("help", "object", "image-opts", "force-share"),
    "measure": ("help", "image-opts", "object", "output", "size", "force-share"),
    "snapshot": ("help", "object", "image-opts", "force-share"),
    # (in qemu-nbd.c's order: glibc lists an ambiguous abbreviation's options in it)
    "serve": ("help", "version", "bind", "port", "socket", "offset", "read-only",
              "allocation-depth", "bitmap", "connect", "disconnect", "list", "snapshot",
              "load-snapshot", "nocache", "cache", "aio", "discard", "detect-zeroes", "shared",
              "format", "persistent", "verbose", "object", "export-name", "description",
              "tls-creds", "tls-hostname", "tls-authz", "image-opts", "trace", "fork",
              "pid-file", "selinux-label"),
}
# qemu-img's options before the subcommand: -h/--help, -V/--version, -T/--trace ARG.
_GLOBAL_LONG = ("help", "version", "trace")

_FLAG, _VALUE, _OPTIONAL = 0, 1, 2

# Hidden options through which getopt_argv hands argparse getopt_long's two errors, in their
# place on the command line (a bad value before them is reported first, as in qemu-img): the
# word qemu-img names, as in its "unrecognized option 'WORD'" and "missing argument for option
# 'WORD'". Only parsers that define them get them (qemu-img's subcommands).
UNRECOGNIZED = "--qemu-img-unrecognized-option"
MISSING = "--qemu-img-missing-argument"
# The same for a subcommand whose optstring lacks the leading ':' (qemu-img measure): getopt
# prints its own message (glibc's words, for every error) and qemu-img then prints its help.
GLIBC_MESSAGE = "--qemu-img-getopt-message"
# The subcommands that read their options so.
PRINTS_ERRORS = ("measure",)
_HIDDEN = (UNRECOGNIZED, MISSING, GLIBC_MESSAGE)


class GetoptError(Exception):
    """A command line qemu-img's main() refuses before the subcommand: its error_exit() line."""


def _kinds(parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """({short char: kind}, {long name: kind}) of the parser's options."""
    shorts, longs = {}, {}
    for action in parser._actions:
        if any(opt in _HIDDEN for opt in action.option_strings):
            continue
        kind = _FLAG if action.nargs == 0 else _OPTIONAL if action.nargs == "?" else _VALUE
        for opt in action.option_strings:
            if opt.startswith("--"):
                longs[opt[2:]] = kind
            elif len(opt) == 2:
                shorts[opt[1]] = kind
    return shorts, longs


def _long(name: str, ours: dict, qemu: tuple) -> tuple[str | None, list[str]]:
    """(the long option `name` stands for: itself, or the one of qemu's options it uniquely
    abbreviates, else None; qemu's options it abbreviates, in qemu's order)."""
    if name in ours:
        return name, [name]
    # (an empty name, "--=x", abbreviates every one: glibc calls it ambiguous)
    matches = [full for full in qemu if full.startswith(name)]
    return (matches[0] if len(matches) == 1 and matches[0] in ours else None), matches


def getopt_argv(argv: list[str], parser: argparse.ArgumentParser, qemu_long=(),
                command: str = "") -> list[str]:
    """`argv` (the words after the subcommand `command`) as getopt_long reads it, spelled for
    `parser`."""
    shorts, longs = _kinds(parser)
    glibc = GLIBC_MESSAGE in parser._option_string_actions
    errors = glibc or UNRECOGNIZED in parser._option_string_actions
    out: list[str] = []
    operands: list[str] = []
    i = 0

    def failed(option: str, word: str, message: str) -> bool:
        """Hand over getopt's error: the word qemu-img names, or glibc's `message`."""
        if glibc:
            out.append(f"{GLIBC_MESSAGE}={message}")
        elif errors:
            out.append(f"{option}={word}")
        return errors

    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            # GNU getopt's permutation: every file name after the options, in order (those
            # before "--" too: argparse could take one of them for an optional operand left
            # empty, and the rest after "--" for unknown options)
            return out + ["--", *operands, *argv[i:]]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            full, matches = _long(name, longs, qemu_long)
            if full is None:
                message = (f"option '{word}' is ambiguous; possibilities: "
                           + " ".join(f"'--{m}'" for m in matches) if len(matches) > 1
                           else f"unrecognized option '{word}'")
                if not failed(UNRECOGNIZED, word, message):
                    out.append(word)
                continue
            if eq and longs[full] == _FLAG and failed(
                    UNRECOGNIZED, word, f"option '--{full}' doesn't allow an argument"):
                continue
            if longs[full] == _VALUE and not eq:
                if i == len(argv):
                    if not failed(MISSING, word, f"option '--{full}' requires an argument"):
                        out.append(word)
                    continue
                eq, value = "=", argv[i]
                i += 1
            out.append(f"--{full}{eq}{value}")
            continue
        if word.startswith("-") and len(word) > 1:
            mark = len(out)
            for j in range(1, len(word)):
                char = word[j]
                kind = shorts.get(char)
                if kind is None:
                    # getopt names argv[optind - 1]: this word once its last letter is read,
                    # else the word before it (the subcommand for the first).
                    last = j + 1 == len(word)
                    if failed(UNRECOGNIZED, word if last else argv[i - 2] if i > 1 else command,
                              f"invalid option -- '{char}'"):
                        break
                    # Not an option: the word goes to argparse as written, to be refused as a
                    # whole (split, "-U-" would end the options and "-U1" be an operand).
                    del out[mark:]
                    out.append(word)
                    break
                if kind == _FLAG:
                    out.append("-" + char)
                    continue
                # "-X=VALUE": argparse splits at the first "=", so VALUE arrives whole.
                if j + 1 < len(word):
                    out.append(f"-{char}={word[j + 1:]}")
                elif kind == _VALUE and i < len(argv):
                    out.append(f"-{char}={argv[i]}")
                    i += 1
                elif kind == _VALUE and failed(MISSING, word,
                                               f"option requires an argument -- '{char}'"):
                    pass
                else:                           # no value: argparse says what is missing
                    out.append(f"-{char}")
                break
            continue
        operands.append(word)
    return out + operands


_C_INTEGER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def c_integer(text: str) -> int | None:
    """`text` as C's strtol(text, &end, 0) reads a whole word (qemu_strtoi/qemu_strtol):
    leading blanks and a sign, 0x hex, 0 octal, nothing after; None otherwise."""
    m = _C_INTEGER.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    base = 16 if digits[:2].lower() == "0x" else 8 if len(digits) > 1 and digits[0] == "0" \
        else 10
    value = int(digits[2:] if base == 16 else digits, base)
    return -value if sign == "-" else value


def global_options(argv: list[str]) -> tuple[list[str], str | None]:
    """Read qemu-img's options before the subcommand as its main() does (getopt "+:hVT:", long
    --help, --version, --trace): return the subcommand and its words ([] when options are all
    there is, which qemu-img ends with status 0) and what was asked for first: "help" (-h or a
    prefix of --help), "version" (-V or a prefix of --version) or None. Raises GetoptError
    with qemu-img's line for an option it refuses."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        word = argv[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, _ = word[2:].partition("=")
            full = [n for n in _GLOBAL_LONG if n.startswith(name)]
            if len(full) != 1 or eq and full[0] != "trace":
                raise GetoptError(f"unrecognized option '{word}'")
            if full[0] in ("help", "version"):
                return argv[i:], full[0]
            if not eq:
                if i == len(argv):
                    raise GetoptError(f"missing argument for option '{word}'")
                i += 1
            continue
        for j, char in enumerate(word[1:], 2):
            if char in "hV":
                return argv[i:], "help" if char == "h" else "version"
            if char == "T":
                if j == len(word):              # the value is the next word
                    if i == len(argv):
                        raise GetoptError(f"missing argument for option '{word}'")
                    i += 1
                break
            # getopt names argv[optind - 1]: this word once its last letter is read, else the
            # word before it (the program's name for the first).
            named = word if j == len(word) else argv[i - 2] if i > 1 else _argv0()
            raise GetoptError(f"unrecognized option '{named}'")
    return argv[i:], None


def _argv0() -> str:
    """The program's argv[0] as getopt names it: as run, under the name qemu-img (a path where
    one was typed, as qemu-img's own); else "qcowfast"."""
    from .cli import program_name
    return sys.argv[0] if program_name() == "qemu-img" and sys.argv else "qcowfast"


_C_SPACE = " \t\n\v\f\r"
_MULTIPLIERS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_FRACTION = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")
_UINT64_MAX = (1 << 64) - 1


def strtosz(text: str) -> int:
    """`text` as QEMU 7.2's qemu_strtosz() reads a size (util/cutils.c do_strtosz()).

    A decimal integer, optionally with a fraction (which then needs a suffix: "1.5k", rounded
    to the nearest byte), or 0x hex; an optional b/k/M/G/T/P/E suffix (powers of 1024, any
    case); leading blanks and "+" allowed, nothing after. A suffix on hex is accepted with
    QEMU's deprecation warning. Raises ValueError, or OverflowError past 2**64 - 1.
    """
    stripped = text.lstrip(_C_SPACE)
    m = re.match(r"[+-]?([0-9]+)", stripped)
    if m is None or "-" in m.group(0):
        raise ValueError(text)
    rest = stripped[m.end():]
    val, valf, hexa = int(m.group(1)), 0, False
    if val == 0 and rest[:1] in ("x", "X"):
        h = re.match(r"[+]?0[xX]([0-9a-fA-F]+)", stripped)
        if h is None:                           # "0x" alone: strtoull stops at the x
            raise ValueError(text)
        val, rest, hexa = int(h.group(1), 16), stripped[h.end():], True
        if rest[:1] == ".":
            raise ValueError(text)
    elif rest[:1] == ".":
        f = _FRACTION.match(rest)
        if f is None:
            rest = rest[1:]                     # "1.k": no digits, the point is skipped
        elif f.group(2):
            raise ValueError(text)              # no exponents
        else:
            # A 64-bit fixed-point fraction (C's cast: a double of 2**64 or more gives 0).
            fixed = int(float("0." + f.group(1)) * 2.0 ** 64)
            valf = fixed if fixed <= _UINT64_MAX else 0
            rest = rest[f.end():]
    if val > _UINT64_MAX:
        raise OverflowError(text)
    shift = _MULTIPLIERS.get(rest[:1].lower()) if rest else None
    if shift is not None:
        if hexa:
            from .cli import program_name
            print(f"{program_name()}: warning: Using a multiplier suffix on hex numbers is "
                  f"deprecated: {text}", file=sys.stderr)
        rest = rest[1:]
    else:
        shift = 0
    if rest:
        raise ValueError(text)
    if shift == 0:
        if valf:
            raise ValueError(text)              # a fraction needs a scale
        return val
    # 64.64 fixed point times the multiplier, rounded half up.
    scaled = valf << shift
    value = (val << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    if value > _UINT64_MAX:
        raise OverflowError(text)
    return value



# -- --object: QEMU's keyval parser and user_creatable_process_cmdline()'s checks ---------------

_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")   # parse_qapi_name()
_DIGITS = re.compile(r"[0-9]+")
_KEY_MAX = 128                                  # keyval_parse_one(): key_in_cur[128]


def keyval(text: str, implied: str | None = None) -> tuple[dict, bool]:
    """`text` as QEMU 7.2's keyval_parse() reads it (util/keyval.c): (a dict of str values,
    dotted keys nested, all-index dicts made lists; whether `help` or `?` was among the
    items). A first item without '=' is the value of the `implied` key. Raises ValueError
    with QEMU's line."""
    root: dict = {}
    asked = False
    pos = 0
    while pos < len(text):
        end = pos + len(re.match(r"[^=,]*", text[pos:]).group())
        item = text[pos:end]
        if item and text[end:end + 1] != "=" and (item in ("help", "?") or implied):
            if item in ("help", "?"):
                asked = True
            else:                               # the implied key's value, up to a comma
                _put(root, implied, item, implied)
            pos, implied = end + (text[end:end + 1] == ","), None
            continue
        implied = None
        cur, s, name = root, pos, ""
        while True:
            # a QAPI name, or (after the first) a list index
            m = (_DIGITS if s > pos and text[s:s + 1].isascii() and text[s:s + 1].isdigit()
                 else _QAPI_NAME).match(text, s, end)
            n = m.end() - s if m else 0
            if not n or (s + n < end and text[s + n] != "."):
                raise ValueError(f"Invalid parameter '{text[pos:end]}'")
            if n >= _KEY_MAX:
                part = " fragment" if s > pos or s + n != end else ""
                raise ValueError(f"Parameter{part} '{text[s:s + n]}' is too long")
            if s > pos:
                cur = _put(cur, name, None, text[pos:s - 1])
            name, s = text[s:s + n], s + n
            if text[s:s + 1] != ".":
                break
            s += 1
        if text[s:s + 1] != "=":
            raise ValueError(f"Expected '=' after parameter '{text[pos:s]}'")
        value, s = [], s + 1
        while s < len(text):                    # ',,' is a comma
            if text[s] == ",":
                s += 1
                if text[s:s + 1] != ",":
                    break
            value.append(text[s])
            s += 1
        _put(cur, name, "".join(value), text[pos:end])
        pos = s
    return _listify(root, ""), asked


def _put(cur: dict, name: str, value: str | None, key: str):
    """keyval_parse_put(): a value (a later one replaces it), or with None the dict below."""
    old = cur.get(name)
    if old is not None and isinstance(old, dict) != (value is None):
        raise ValueError(f"Parameters '{key}.*' used inconsistently")
    if old is not None and value is None:
        return old
    cur[name] = {} if value is None else value
    return cur[name]


def _listify(cur: dict, prefix: str):
    """keyval_listify(): a dict whose keys are all list indexes becomes a list."""
    for key, value in cur.items():
        if isinstance(value, dict):
            cur[key] = _listify(value, f"{prefix}{key}.")
    numbered = [key for key in cur if key[:1].isdigit()]
    if not numbered:
        return cur
    if len(numbered) != len(cur):
        raise ValueError(f"Parameters '{prefix}*' used inconsistently")
    indexes = {min(int(key), 2**31 - 1): cur[key] for key in numbered}
    for i in range(min(len(cur) + 1, max(indexes) + 1)):
        if i not in indexes:
            raise ValueError(f"Parameter '{prefix}{i}' missing")
    return [indexes[i] for i in range(len(indexes))]


# QEMU 7.2's ObjectType enum (qapi/qom.json, as Debian builds it). qemu-img has the types of
# _MEMBERS: their QAPI members, in the order the visitor reads them (name, kind, required;
# kinds: str, bool, int, int32, object, array, or "a|b" an enum). It refuses the others once
# they are visited ("invalid object type"): of those, only the members their QAPI types
# require are known here, in order.
_TLS = (("verify-peer", "bool", False), ("dir", "str", False),
        ("endpoint", "client|server", False), ("priority", "str", False))
_SECRET_COMMON = (("loaded", "bool", False), ("format", "raw|base64", False),
                  ("keyid", "str", False), ("iv", "str", False))
_THROTTLE = tuple((f"x-{what}{part}", "int", False)
                  for what in ("iops-total", "iops-read", "iops-write", "bps-total", "bps-read",
                               "bps-write") for part in ("", "-max", "-max-length"))
_MEMBERS = {
    "authz-list": (("policy", "deny|allow", False), ("rules", "array", False)),
    "authz-simple": (("identity", "str", True),),
    "main-loop": (("aio-max-batch", "int", False), ("thread-pool-min", "int", False),
                  ("thread-pool-max", "int", False)),
    "pr-manager-helper": (("path", "str", True),),
    "secret": _SECRET_COMMON + (("data", "str", False), ("file", "str", False)),
    "secret_keyring": _SECRET_COMMON + (("serial", "int32", True),),
    "thread-context": (("cpu-affinity", "array", False), ("node-affinity", "array", False)),
    "throttle-group": (("limits", "object", False), *_THROTTLE, ("x-iops-size", "int", False)),
    "tls-cipher-suites": _TLS,
    "tls-creds-anon": _TLS + (("loaded", "bool", False),),
    "tls-creds-psk": _TLS + (("loaded", "bool", False), ("username", "str", False)),
    "tls-creds-x509": _TLS + (("loaded", "bool", False), ("sanity-check", "bool", False),
                              ("passwordid", "str", False)),
}
_REQUIRED = {
    "authz-listfile": ("filename",), "authz-pam": ("service",), "can-bus": (),
    "can-host-socketcan": ("if", "canbus"),
    "colo-compare": ("primary_in", "secondary_in", "outdev", "iothread"),
    "cryptodev-backend": (), "cryptodev-backend-builtin": (), "cryptodev-backend-lkcf": (),
    "cryptodev-vhost-user": ("chardev",), "dbus-vmstate": ("addr",),
    "filter-buffer": ("netdev", "interval"), "filter-dump": ("netdev", "file"),
    "filter-mirror": ("netdev", "outdev"), "filter-redirector": ("netdev",),
    "filter-replay": ("netdev",), "filter-rewriter": ("netdev",), "input-barrier": ("name",),
    "input-linux": ("evdev",), "iothread": (), "memory-backend-epc": ("size",),
    "memory-backend-file": ("size", "mem-path"), "memory-backend-memfd": ("size",),
    "memory-backend-ram": ("size",), "pef-guest": (), "qtest": ("chardev",),
    "rng-builtin": (), "rng-egd": ("chardev",), "rng-random": (), "s390-pv-guest": (),
    "sev-guest": ("reduced-phys-bits",), "x-remote-object": ("fd", "devid"),
    "x-vfio-user-server": ("socket",),
}
# What completing an object of these types refuses when a property is missing.
_COMPLETE = {"tls-cipher-suites": ("priority", "'priority' property is not set"),
             "tls-creds-psk": ("dir", "Missing 'dir' property value"),
             "tls-creds-x509": ("dir", "Missing 'dir' property value")}
_QAPI_BOOLS = ("on", "yes", "true", "y", "off", "no", "false", "n")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")     # id_wellformed()
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def qemu_object(text: str, created: dict) -> bool:
    """Check --object `text` as qemu-img reads it (user_creatable_process_cmdline(): QEMU's
    keyval parser, the QAPI visitor of ObjectOptions, then the object's creation), given the
    objects `created` by the --object options before it ({id: (type, secret length)}), to
    which it is added. Returns whether it asks for help; raises ValueError with QEMU's line
    (and hint). Beyond the syntax, the type, the id and the members' names and kinds, a
    secret's data is checked up to its decryption; other properties' values are not."""
    args, asked = keyval(text, "qom-type")
    if asked:
        return True
    kind = _member(args, "qom-type")
    if kind not in _MEMBERS and kind not in _REQUIRED:
        raise ValueError(f"Parameter 'qom-type' does not accept value '{kind}'")
    ident = _member(args, "id")
    members = {}
    for name, what, required in _MEMBERS.get(kind, ()):
        if name in args or required:
            members[name] = _typed(args, name, what)
    for name in _REQUIRED.get(kind, ()):
        if name not in args:
            raise ValueError(f"Parameter '{name}' is missing")
    for name in args if kind in _MEMBERS else ():   # (QEMU names one of them, in hash order)
        raise ValueError(f"Parameter '{name}' is unexpected")
    if not _IDENTIFIER.fullmatch(ident):
        raise ValueError("Parameter 'id' expects an identifier\nIdentifiers consist of "
                         "letters, digits, '-', '.', '_', starting with a letter.")
    if kind not in _MEMBERS:
        raise ValueError(f"invalid object type: {kind}")
    if "loaded" in members:
        raise ValueError(f"Property '{kind}.loaded' is not writable")
    if ident in created:
        raise ValueError(f"attempt to add duplicate property '{ident}' to object (type "
                         "'container')")
    length = _secret_length(ident, members, created) if kind == "secret" else None
    if kind in _COMPLETE and _COMPLETE[kind][0] not in members:
        raise ValueError(_COMPLETE[kind][1])
    if kind == "main-loop" and any(k == kind for k, _ in created.values()):
        raise ValueError("only one main-loop instance allowed")
    created[ident] = (kind, length)
    return False


def _member(args: dict, name: str) -> str:
    """The visitor's string member `name` of `args` (taken out of it)."""
    if name not in args:
        raise ValueError(f"Parameter '{name}' is missing")
    value = args.pop(name)
    if not isinstance(value, str):
        raise ValueError(f"Parameters '{name}.*' are unexpected")
    return value


def _typed(args: dict, name: str, what: str):
    """Member `name` of `args` (taken out) as the visitor reads a `what` (see _MEMBERS)."""
    if what in ("object", "array"):
        value = args.pop(name, None)
        if not isinstance(value, dict if what == "object" else list):
            raise ValueError(f"Invalid parameter type for '{name}', expected: {what}")
        return value
    value = _member(args, name)
    if what == "bool" and value not in _QAPI_BOOLS:
        raise ValueError(f"Parameter '{name}' expects 'on' or 'off'")
    if "|" in what and value not in what.split("|"):
        raise ValueError(f"Parameter '{name}' does not accept value '{value}'")
    number = c_integer(value) if what in ("int", "int32") else 0
    if number is None or not -2**63 <= number < 2**63:
        raise ValueError(f"Parameter '{name}' expects integer")
    if what == "int32" and not -2**31 <= number < 2**31:
        raise ValueError(f"Parameter '{name}' expects int32_t")
    return value


def _secret_length(ident: str, members: dict, created: dict) -> int | None:
    """qcrypto_secret_common_complete(): load a secret's data, decode or decrypt it; its
    length (None where it would take decrypting)."""
    data, name = members.get("data"), members.get("file")
    if data is not None and name is not None:
        raise ValueError("'file' and 'data' are mutually exclusive")
    if data is None and name is None:
        raise ValueError("Either 'file' or 'data' must be provided")
    raw = data.encode(errors="surrogateescape") if data is not None else _secret_file(name)
    base64 = members.get("format") == "base64"
    keyid = members.get("keyid")
    if keyid is None:
        return _base64_length(raw) if base64 else len(raw)
    # qcrypto_secret_decrypt(): an AES-256-CBC key, a 16-byte IV, whole blocks
    if keyid == ident:
        raise ValueError(f"Secret with id '{keyid}' has no data")
    if keyid not in created:
        raise ValueError(f"No secret with id '{keyid}'")
    kind, key_length = created[keyid]
    if kind not in ("secret", "secret_keyring"):
        raise ValueError(f"Object with id '{keyid}' is not a secret")
    if key_length is None:
        return None
    if key_length != 32:
        raise ValueError("Key should be 32 bytes in length")
    if members.get("iv") is None:
        raise ValueError("IV is required to decrypt secret")
    iv = _base64_length(members["iv"].encode(errors="surrogateescape"))
    if iv != 16:
        raise ValueError(f"IV should be 16 bytes in length not {iv}")
    length = _base64_length(raw) if base64 else len(raw)
    if length % 16:
        raise ValueError(f"Length {length} must be a multiple of block size 16")
    return None


def _base64_length(raw: bytes) -> int:
    """The length of qbase64_decode(raw) (GLib's decoder: whole groups of four, less their
    padding), or its refusal."""
    if b"\0" in raw:
        raise ValueError("Base64 data contains embedded NUL characters")
    if not all(c in _BASE64 or c == 0x0A for c in raw):
        raise ValueError("Base64 data contains invalid characters")
    chars = [c for c in raw if c in _BASE64]
    groups = chars[:len(chars) - len(chars) % 4]
    return sum(3 - (g[2] == 0x3D) - (g[3] == 0x3D)
               for g in (groups[i:i + 4] for i in range(0, len(groups), 4)))


def _secret_file(name: str) -> bytes:
    """The contents of a secret's file, or GLib's g_file_get_contents() refusal. A FIFO or a
    device is not read (QEMU would wait on it, or read it forever): it counts as empty."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"Unable to read {name}: Failed to open file \u201c{name}\u201d: "
                         f"{exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"Unable to read {name}: Error reading file \u201c{name}\u201d: "
                             f"{os.strerror(errno.EISDIR)}")
        chunks = []
        while stat.S_ISREG(mode) and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


__all__ = ["GLIBC_MESSAGE", "GetoptError", "MISSING", "PRINTS_ERRORS", "QEMU_LONG",
           "UNRECOGNIZED", "c_integer", "getopt_argv", "global_options", "keyval", "qemu_object",
           "strtosz"]
