"""Progress on the command line: qemu-img's "    (P/100%)" report (QemuProgress; compare's
C-float sums, SummedProgress), the SIGUSR1 request for one (_on_usr1 reads the job reporting,
_progress_now, which QemuProgress sets as a context manager), and convert-many's bar
(ProgressBar)."""
from __future__ import annotations

import os
import struct
import sys
import time

from .cli_process import _write_quietly


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"


def _columns(stream) -> int:
    """The terminal width of `stream` (80 when it has none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class ProgressBar:
    """A one-line progress bar on a stream, redrawn in place at most 10 times a second.

    The line never exceeds the terminal's width (read at every redraw, so a resized window is
    followed): the bar shrinks first, then the rate and the ETA are dropped.
    """

    def __init__(self, stream, label: str):
        self.stream = stream
        self.label = label
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_done = -1
        self.drawn = False

    def line(self, done: int, total: int, columns: int, now: float) -> str:
        """The bar's text for `columns` columns (at most columns - 1 characters)."""
        frac = min(done / total, 1.0) if total else 1.0
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        pct = f"{frac * 100:5.1f}%"
        tails = [f" {human_size(done)}/{human_size(total)} {human_size(rate)}/s ETA {eta:.0f}s",
                 f" {human_size(done)}/{human_size(total)}", ""]
        room = columns - 1
        for tail in tails:
            width = room - len(self.label) - len(pct) - len(tail) - 4
            if width >= 10:
                fill = int(frac * width)
                return f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {pct}{tail}"
        return f"{self.label} {pct}"[:room]

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == self.last_done or (done < total and now - self.last < 0.1):
            return
        self.last, self.last_done = now, done
        columns = _columns(self.stream)
        # \r back to column 0, the line padded to erase a longer previous one.
        self.stream.write("\r" + self.line(done, total, columns, now).ljust(columns - 1))
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class QemuProgress:
    """qemu-img's progress report (util/qemu-progress.c), as scripts parse it.

    With -p: "    (P/100%)\r" (P with two decimals) at 0, whenever P has grown by more than
    `min_skip` points since the last report, and at 100; a newline at the end. The first
    report comes with the first progress (compare's once the images are open: an image that
    cannot be opened leaves the newline alone; convert reports 0 before it opens its source,
    as qemu-img convert does). Without -p nothing, except that
    after SIGUSR1 the next report is "    (P/100%)\n" on stderr, as in qemu-img. Like qemu-img's
    printf, a report that cannot be written is dropped: it never changes the job's outcome.
    Use as a context manager around the job, passing the object as its progress callback.
    """

    def __init__(self, stream, enabled: bool, min_skip: float):
        import threading
        self.stream = stream if enabled else None
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last = -1.0                    # nothing reported yet
        self.usr1 = False                   # SIGUSR1 asked for a report
        self.lock = threading.Lock()

    def _write(self, text: str) -> None:
        if not _write_quietly(self.stream, text):
            self.stream = None              # a closed pipe, a full disk: no more reports

    def _report(self, current: float) -> None:
        self.current = current
        if self.usr1:
            # Asked for by SIGUSR1; printed here, by the job, as qemu-img prints it from its
            # next progress call: a signal handler that writes could block on a full pipe and
            # be re-entered by the next signal.
            self.usr1 = False
            _write_quietly(sys.stderr, f"    ({current:3.2f}/100%)\n")
        if self.stream is None:
            return
        if self.last < 0:
            self.last = 0.0
            self._write("    (0.00/100%)\r")
        if self.stream is not None and current > 0 and (self._beyond(current)
                                                        or current == 100.0 > self.last):
            self.last = current
            self._write(f"    ({current:3.2f}/100%)\r")

    def _beyond(self, current: float) -> bool:
        return current > self.last + self.min_skip

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            self._report(min(100.0, 100.0 * done / total) if total > 0 else 100.0)

    def on_usr1(self) -> None:
        """SIGUSR1: the progress on stderr at the next report (not with -p, where qemu-img
        blocks the signal)."""
        if not self.enabled:
            self.usr1 = True

    def __enter__(self) -> "QemuProgress":
        global _progress_now
        _progress_now = self
        return self

    def complete(self) -> None:
        """Report 100% (qemu-img convert's last report, whatever the last callback said)."""
        with self.lock:
            self._report(100.0)

    def __exit__(self, exc_type, exc, tb) -> None:
        global _progress_now
        _progress_now = None
        if self.stream is not None:
            with self.lock:
                self._write("\n")
            self.stream = None


_progress_now: QemuProgress | None = None     # the job SIGUSR1 reports on


def _f32(x: float) -> float:
    """`x` rounded to a C float."""
    return struct.unpack("f", struct.pack("f", x))[0]


class SummedProgress(QemuProgress):
    """compare's report: img_compare() adds each step's share to a C float
    (qemu_progress_print(((float) chunk / total_size) * 100, 100)), so its percentages are
    float sums: they may round the other way than the exact share does, and stop short of
    100 (no 100% report then). Steps are the callback's (done, total) calls."""

    def __init__(self, stream, enabled: bool, min_skip: float):
        super().__init__(stream, enabled, min_skip)
        self.done = 0

    def _beyond(self, current: float) -> bool:
        return current > _f32(self.last + self.min_skip)

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if total <= 0:
                return self._report(100.0)
            share = _f32(_f32(_f32(done - self.done) / _f32(total)) * 100)
            self.done = done
            self._report(min(100.0, _f32(self.current + _f32(_f32(share / 100) * 100))))


def _on_usr1(signum, frame) -> None:
    """SIGUSR1 for the whole run (qemu-img never ends on it): report the job's progress, if a
    job reports any."""
    progress = _progress_now
    if progress is not None:
        progress.on_usr1()


def _progress(args, stream, min_skip: float, kind=QemuProgress) -> QemuProgress:
    # -q wins over -p, as in qemu-img.
    enabled = (args.progress or args.force_progress) and not getattr(args, "quiet", False)
    return kind(stream, enabled, min_skip)
