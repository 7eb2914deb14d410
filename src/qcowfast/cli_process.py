"""The command's process: its signals (SIGINT, SIGTERM, SIGHUP end it as they end qemu-img,
once convert has cleaned up) and its standard streams (closed ones replaced, a reader that went
away, warnings in qemu-img's words)."""
from __future__ import annotations

import errno
import os
import signal
import sys


def _write_quietly(stream, text: str) -> bool:
    """Write to a stream that may be gone (closed pipe, full disk): a status line must never
    change a command's outcome. Returns whether the text was written."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        return False
    return True


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) arrived: unwinds like Ctrl-C, so that convert's cleanup
    removes its temporary output; then the process ends by that signal, as qemu-img would."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _on_signal(signum, frame):
    for name in _SIGNALS:                       # a second signal must not cut the cleanup short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Interrupted(signum)


class _WarningsOnStderr:
    """Within it, qcowfast's warnings print as qemu-img's do: "NAME: warning: ..." on
    stderr, each once per command, or with `every_open` once per image opened (compare: qemu-img
    warns at each open, twice for `compare IMG IMG`); other warnings print as Python prints
    them."""

    def __init__(self, every_open: bool = False):
        self.every_open = every_open

    def __enter__(self):
        import warnings
        from .cli import program_name
        from .errors import StaleBitmapsWarning
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        shown = warnings.showwarning
        # (either resets the once-registries)
        warnings.simplefilter("always" if self.every_open else "default", StaleBitmapsWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, StaleBitmapsWarning):
                # qemu-img's words, whose last line ends without a newline (error_printf()):
                # what follows on stderr continues it.
                _write_quietly(sys.stderr, f"{program_name()}: warning: "
                               + getattr(message, "qemu_text", f"{message}\n"))
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        self._saved.__exit__(*exc)
        return False


def _install_signal_handlers() -> dict:
    """Route SIGINT/SIGTERM/SIGHUP to Interrupted, SIGUSR1 to the progress report (for the
    rest of the run); returns the handlers replaced."""
    from .cli_progress import _on_usr1
    try:
        signal.signal(signal.SIGUSR1, _on_usr1)
    except (ValueError, AttributeError):        # not the main thread, or no SIGUSR1
        pass
    old = {}
    for name in _SIGNALS:
        num = getattr(signal, name, None)
        if num is None or signal.getsignal(num) == signal.SIG_IGN:   # e.g. nohup, `cmd &`
            continue
        try:
            old[num] = signal.signal(num, _on_signal)
        except ValueError:                      # not the main thread: leave signals alone
            break
    return old


def _die_by(signum: int) -> int:
    """End the process by `signum` (status 128 + signum in a shell), as if killed by it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum                         # only reached if the signal did not end us


_CLOSED_STREAMS: set = set()                  # "stdout"/"stderr" closed when we started


def _replace_closed_streams() -> None:
    """A standard stream closed by the caller (`>&-`, `2>&-`) becomes /dev/null: a status
    line must not land in the other stream (print(file=None) writes to stdout), and nothing
    may fail on it. An image is never streamed to a closed stdout (convert_arguments)."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            _CLOSED_STREAMS.add(name)
            setattr(sys, name, open(os.devnull, "w"))


def _broken_pipe(exc: BaseException | None) -> bool:
    """True when `exc` (or what it wraps) is EPIPE: the reader of our output went away."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a closed or replaced one)."""
    try:
        return stream.isatty()
    except (ValueError, OSError, AttributeError):
        return False


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so Python's final flush cannot complain (the
    recipe of the `signal` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
