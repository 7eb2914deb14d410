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
import re
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
    "serve": ("help", "version", "verbose", "object", "image-opts", "tls-creds", "tls-authz",
              "tls-hostname", "trace", "fork", "pid-file", "read-only", "export-name",
              "description", "persistent", "shared", "port", "bind", "socket", "offset",
              "load-snapshot", "snapshot", "format", "cache", "aio", "discard", "detect-zeroes",
              "allocation-depth", "bitmap", "connect", "disconnect", "list", "nocache"),
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
    matches = [full for full in qemu if full.startswith(name)] if name else []
    return (matches[0] if len(matches) == 1 and matches[0] in ours else None), matches


def getopt_argv(argv: list[str], parser: argparse.ArgumentParser, qemu_long=(),
                command: str = "") -> list[str]:
    """`argv` (the words after the subcommand `command`) as getopt_long reads it, spelled for
    `parser`."""
    shorts, longs = _kinds(parser)
    glibc = GLIBC_MESSAGE in parser._option_string_actions
    errors = glibc or UNRECOGNIZED in parser._option_string_actions
    out: list[str] = []
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
            out += argv[i - 1:]
            break
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
        out.append(word)
    return out


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
            named = word if j == len(word) else argv[i - 2] if i > 1 else "qcowfast"
            raise GetoptError(f"unrecognized option '{named}'")
    return argv[i:], None


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
            print(f"qcowfast: warning: Using a multiplier suffix on hex numbers is deprecated: "
                  f"{text}", file=sys.stderr)
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


__all__ = ["GLIBC_MESSAGE", "GetoptError", "MISSING", "PRINTS_ERRORS", "QEMU_LONG",
           "UNRECOGNIZED", "c_integer", "getopt_argv", "global_options", "strtosz"]
