"""qemu-img's -T/--trace options before the subcommand (QEMU's trace_opt_parse(),
trace_init_events(), trace_init_file()), read and refused as qemu-img reads them; qcowfast
writes no trace (README: Differences)."""
from __future__ import annotations

import errno
import os
import re
import sys

from .cli import _IDENTIFIER, _opts_chosen, _qemu_opts, program_name, usage_exit
from .errors import QcowError


def _trace_values(head: list[str]) -> list[str]:
    """The -T/--trace values among qemu-img's options before the subcommand (`head`, as
    cli_getopt.global_options read and accepted them), in order."""
    values, i = [], 0
    while i < len(head):
        word = head[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name and "trace".startswith(name):
                if not eq:
                    value, i = head[i], i + 1
                values.append(value)
            continue
        if word[1:2] == "T":                # (-h and -V end the options: not in `head`)
            if len(word) > 2:
                values.append(word[2:])
            else:
                values.append(head[i])
                i += 1
    return values


_TRACE_KEYS = ("enable", "events", "file")


def _trace_option(text: str) -> dict:
    """One -T/--trace value as QEMU's trace_opt_parse() reads it (qemu_opts_parse_noisily()
    on qemu_trace_opts, "enable" implied for a first item without '='): {key: last value}.
    Refusals end the command as qemu-img does (its line, status 1)."""
    items, rest = [], text
    head = re.match(r"[^=,]*", text).group(0)
    if text and text[len(head):len(head) + 1] != "=":
        value = re.match(r"(?:[^,]|,,)*", text).group(0)
        items.append(("enable", value.replace(",,", ","), None))
        rest = text[len(value) + 1:]
    items += _qemu_opts(rest)
    ident = next((value for name, value, _ in items if name == "id"), None)
    if ident is not None and not _IDENTIFIER.fullmatch(ident):
        print(f"{program_name()}: Parameter 'id' expects an identifier\nIdentifiers consist of "
              "letters, digits, '-', '.', '_', starting with a letter.", file=sys.stderr)
        raise SystemExit(1)
    def helped() -> "typing.NoReturn":         # noqa: F821 - its list of keys, status 1
        sys.stdout.write("trace options:\n" + "".join(f"  {key}=<str>\n"
                                                      for key in _TRACE_KEYS))
        raise SystemExit(1)

    return _opts_chosen(items, _TRACE_KEYS, helped,
                        lambda name: usage_exit(f"Invalid parameter '{name}'", hint=False))


def _trace_events(pattern: str) -> None:
    """trace_enable_events(): "help" lists QEMU's trace events and ends the command (status
    0). qcowfast has no trace events: the list is empty, and other patterns enable nothing."""
    if pattern in ("help", "?"):
        raise SystemExit(0)


def _trace_events_file(name: str) -> None:
    """trace_init_events(): each line of the events file is a pattern (trace_enable_events);
    a file that cannot be opened ends the command with QEMU's line (its location prefix:
    "NAME:FILE: REASON", status 1)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or "Invalid argument"
        print(f"{program_name()}:{name}: {why}", file=sys.stderr)
        raise SystemExit(1)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:                             # (a directory: fopen() works, reads fail)
        pass
    finally:
        os.close(fd)
    # fgets() lines: one of a single character is skipped, the others lose their last one
    # (the newline, or the last character of an unterminated last line); no other trimming.
    for line in re.findall(rb"[^\n]*\n|[^\n]+\Z", b"".join(chunks)):
        if len(line) > 1 and not line.startswith(b"#"):
            _trace_events(line[:-1].decode("utf-8", "surrogateescape"))


def _trace(head: list[str], command: bool) -> None:
    """qemu-img's -T/--trace options, in order (trace_opt_parse()), then, when a command
    follows, its trace file (trace_init_file(): "Error opening logfile FILE: REASON", status
    1). qcowfast writes no trace (README: Differences)."""
    log = None
    for value in _trace_values(head):
        chosen = _trace_option(value)
        if "enable" in chosen:
            _trace_events(chosen["enable"])
        if "events" in chosen:
            _trace_events_file(chosen["events"])
        log = chosen.get("file")                # (each -T sets it, or clears it)
    if command and log is not None:
        from .output import open_errno
        try:
            err = open_errno(log)
        except QcowError:                       # (a NUL byte)
            err = errno.EINVAL
        if err is not None:
            usage_exit(f"Error opening logfile {log}: {os.strerror(err)}", hint=False)
