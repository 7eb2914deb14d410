"""The `qcowfast` command's entry point.

Until the command line installs its own handlers, Ctrl-C ends the process by SIGINT, quietly,
as it ends qemu-img: Python's default handler would print a traceback from whichever module
was being imported (the first tens of milliseconds). Nothing exists to clean up before then.
Only `_signal` (built in) is imported first: `signal` itself imports `enum`, itself slow.
"""
import _signal

if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)   # an inherited SIG_IGN stays (nohup)

from .cli import run  # noqa: E402  (after the handler, on purpose)

__all__ = ["run"]
