"""Many conversions in one process: `convert_many` keeps every core busy across image boundaries.

Jobs run side by side on a small pool of job slots; each job is an ordinary `convert` (its own
worker threads, its own atomic output), so one bad image ends in that job's result and never
stops, corrupts or hides the others. Results come back in job order, as values: a
`ConvertResult`, a `Skipped`, or the exception the job raised (as `concurrent.futures` does).
"""
from __future__ import annotations

import errno
import inspect
import os
import queue
import resource
import stat
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from .arguments import boolean, callback, integer
from .errors import QcowError
from .lending import INTERRUPTED, LENDER, Share
from .output import sweep_stale_temps, sweep_stale_temps_of, temps_swept

FDS_PER_JOB = 16                   # a chain's files, the output and slack
MAX_WORKERS = 64


@dataclass(frozen=True)
class Job:
    """One conversion: `convert(src, dst, **options)`."""
    src: str
    dst: str
    options: dict = field(default_factory=dict)


class Skipped(NamedTuple):
    """A job not run because its destination was already complete (skip_existing=True)."""
    dst: str
    reason: str


def as_job(spec) -> Job:
    """A Job from a Job, a (src, dst) pair or a dict {"src":, "dst":, **convert options}."""
    if isinstance(spec, Job):
        return spec
    if isinstance(spec, dict):
        options = dict(spec)
        try:
            src, dst = options.pop("src"), options.pop("dst")
        except KeyError as exc:
            raise ValueError(f"job {spec!r} has no {exc.args[0]!r}") from None
    else:
        try:
            src, dst = spec
        except (TypeError, ValueError):
            raise ValueError(f"job {spec!r} is neither a (src, dst) pair nor a dict") from None
        options = {}
    try:
        return Job(os.fsdecode(os.fspath(src)), os.fsdecode(os.fspath(dst)), options)
    except TypeError:
        raise ValueError(f"job {spec!r}: src and dst must be paths (str or os.PathLike)") \
            from None


def _file_keys(name: str) -> list:
    """How a path is known: its real path, and the (device, inode) of an existing file (a hard
    link has another name). No keys for a name with a NUL byte: no file has it, so it collides
    with nothing (its job's convert refuses it, naming the argument). Raises OSError for other
    names no file can have."""
    if "\0" in name:
        return []
    keys: list = [os.path.realpath(name)]
    try:
        # "-" is standard output (convert streams there), which /dev/stdout also names.
        st = os.fstat(1) if name == "-" else os.stat(name)
    except FileNotFoundError:
        return keys
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.EACCES, errno.ELOOP, errno.ENAMETOOLONG,
                             errno.EBADF):
            raise
        return keys
    keys.append((st.st_dev, st.st_ino))
    return keys


def chains(jobs: list[Job]) -> list:
    """For each job, the list of chain_files() it reads, or the error its names raise."""
    out: list = []
    for job in jobs:
        try:
            out.append([(what, name, _file_keys(name)) for what, name in chain_files(job)])
        except (OSError, ValueError, UnicodeError) as exc:
            out.append(exc)                     # a path no file can have: the job's error
    return out


def conflicts(jobs: list[Job], read: list | None = None,
              skipped: Iterable[int] = ()) -> dict[int, Exception]:
    """Jobs that must not run, by index: a destination an earlier job also writes (only one
    output could survive), or a source another job writes, or a file of its chain (what it
    reads would depend on the order the jobs happen to run in); a job whose paths no file
    can have gets that error; one whose destination names no file ('' or 'dir/') writes
    nothing and collides with no writer (convert refuses it). Paths are compared resolved
    and, for existing files, by identity (hard links). A job writing over a file of its own
    chain is refused alone, with what convert raises for it (own_chain_refusal): it writes
    nothing that other jobs could read. A name with a NUL byte collides with nothing: its
    job runs, and convert refuses it. `skipped`: jobs whose finished output is kept
    (to_skip): reading it is safe, writing it twice is still an error of the batch.
    `read`: chains(jobs), when the caller has it."""
    read = chains(jobs) if read is None else read
    skipped = set(skipped)
    writers: dict = {}
    refused: dict[int, Exception] = {}
    for i, job in enumerate(jobs):
        if names_no_file(job.dst):
            continue                    # convert refuses it before it opens anything
        try:
            keys = _file_keys(job.dst)
        except (OSError, ValueError, UnicodeError) as exc:
            refused[i] = exc
            continue
        if not isinstance(read[i], Exception) and any(
                k in keys for _, _, own in read[i] for k in own):
            refused[i] = own_chain_refusal(job)
            continue
        first = next((writers[k] for k in keys if k in writers), None)
        if first is not None:
            refused[i] = ValueError(f"{job.dst}: also the destination of job {first} "
                                    f"({jobs[first].src}); each output needs its own job")
            continue
        writers.update((k, i) for k in keys)
    for i, job in enumerate(jobs):
        if i in refused:
            continue
        if isinstance(read[i], Exception):
            refused[i] = read[i]
            continue
        for what, name, keys in read[i]:
            writer = next((writers[k] for k in keys if k in writers), None)
            if writer is not None and writer != i and writer not in skipped:
                refused[i] = ValueError(
                    f"{name}: {what} is the destination of job {writer} of this batch; "
                    "convert it in a later batch (the order jobs run in is not fixed)")
                break
    return refused


def to_skip(jobs: list[Job], skip_existing: bool) -> set[int]:
    """Jobs skip_existing skips, as the batch starts (finished)."""
    if not skip_existing:
        return set()
    return {i for i, job in enumerate(jobs) if finished(job)}


def finished(job: Job) -> bool:
    """Whether the job's output is a finished earlier run: a regular file at its destination
    (convert publishes only complete outputs, renamed on success). Not so for in-place jobs
    (existing=True: a killed one leaves a partial output), nor for standard output ("-", or
    a name of it such as /dev/stdout while it is redirected to a file): no earlier run
    wrote what a stream there would carry."""
    if job.options.get("existing") or job.dst == "-":
        return False
    try:
        st = os.stat(job.dst)
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        out = os.fstat(1)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != (out.st_dev, out.st_ino)


def names_no_file(name: str) -> bool:
    """Whether destination `name` is one no file can have ('' or ending in '/'; not a stream
    target): convert refuses it before it opens anything, so its job writes nothing (and
    collides with no job). A name with a NUL byte, or one that cannot be encoded, is not
    one: convert refuses that first."""
    from .output import stream_target
    if name and not name.endswith("/"):
        return False
    try:
        return "\0" not in name and stream_target(name) is None
    except ValueError:              # (a name that cannot be encoded: convert says so)
        return False


def open_job_source(job: Job):
    """The job's source, opened as its convert opens it."""
    from .image import open_source
    opts = job.options
    return open_source(job.src, opts.get("src_format"),
                       backing_dirs=opts.get("backing_dirs", ()), data_file=opts.get("data_file"),
                       snapshot=opts.get("snapshot"), force_share=opts.get("force_share", False))


def source_refusal(job: Job) -> Exception | None:
    """What opening the job's source raises (as its convert opens it), or None when it opens:
    qemu-img opens the source before it looks at the destination, so on the command line
    that failure is the one reported for a destination convert refuses by name alone."""
    try:
        open_job_source(job).close()
    except Exception as exc:        # noqa: BLE001 - the job's error, as convert raises it
        return exc
    return None


def own_chain_refusal(job: Job) -> Exception:
    """What `convert` raises for a job whose destination is a file of its own chain, found
    as convert finds it: the source that cannot be opened (a character device, a
    directory...) first, then the overlap, in convert's words (output.check_not_source).
    (A destination that names no file never gets here: names_no_file.)"""
    from .errors import OutputError
    from .output import check_not_source
    name = job.dst
    try:
        with open_job_source(job) as image:
            check_not_source(os.stat(name), image, name)
    except Exception as exc:        # noqa: BLE001 - the job's result, as convert raises it
        return exc
    return OutputError(f"{name} is the source image or a file of its backing chain; refusing "
                       "to write over it")


def chain_files(job: Job) -> Iterator[tuple[str, str]]:
    """("the source" / "a backing file of X" / "the data file of X", name) for the files the
    job's conversion reads, as their headers name them (QEMU's resolution of relative names).

    Names are compared, not opened, except the files the job would open itself anyway, under
    the same rules (paths.open_file and resolve_reference: regular files only, inside the
    image's directory or the job's backing_dirs); their headers alone are read. The walk stops
    where a file is missing or refused (the job will say why), or after MAX_CHAIN_DEPTH
    layers. The job's data_file= replaces the stored name."""
    from functools import partial
    from .constants import MAX_CHAIN_DEPTH
    from .header import read_header
    from .paths import directories, full_backing_filename, has_protocol, open_file, \
        resolve_reference
    yield "the source", job.src
    if job.options.get("src_format") not in (None, "qcow2"):
        return
    name, seen = job.src, set()
    # Each layer's directory, as it was reached, stays open (dir_fd) until the next layer's
    # name is resolved from it; a symlink in the path repointed meanwhile cannot move it.
    opener = partial(open_file, job.src, "image", keep_dir=True)
    held = None
    try:
        allowed = directories(job.options.get("backing_dirs", ()))   # (once, for every layer)
    except (OSError, QcowError, TypeError, ValueError):
        return                                  # (the job will say why)
    try:
        for depth in range(MAX_CHAIN_DEPTH + 1):
            try:
                opened = opener()
            except (OSError, QcowError, TypeError, ValueError):
                return                          # (the job will say why)
            finally:
                if held is not None:
                    held.close()
            held = opened
            try:
                if opened.ident in seen:
                    return
                seen.add(opened.ident)
                header = read_header(opened.fd, opened.size, tables_in_file=False, warn=False,
                                     allow_encrypted=True)
            except (OSError, QcowError, TypeError, ValueError):
                return
            finally:
                os.close(opened.detach())       # the file itself, before anything is yielded
            data_file = job.options.get("data_file") if depth == 0 else None
            if data_file is not None:
                if not isinstance(data_file, (str, bytes, os.PathLike)):
                    return
                yield f"the data file of {name}", os.fsdecode(os.fspath(data_file))
            elif header.data_file:
                yield f"the data file of {name}", full_backing_filename(
                    name, header.data_file, protocols=False)
            if not header.backing_file or has_protocol(header.backing_file) or \
                    header.backing_format not in (None, "qcow2"):
                if header.backing_file and not has_protocol(header.backing_file):
                    yield f"a backing file of {name}", full_backing_filename(
                        name, header.backing_file)
                return
            owner, name = name, full_backing_filename(name, header.backing_file)
            yield f"a backing file of {owner}", name
            opener = partial(resolve_reference, opened, header.backing_file, "backing file",
                             allowed)
    finally:
        if held is not None:
            held.close()


def check_options(jobs: list[Job], reserved: Iterable[str] = ("progress",)) -> None:
    """Raise ValueError for any job option `convert` does not take (a caller's bug: fail fast)."""
    from .convert import convert
    known = set(inspect.signature(convert).parameters) - {"src", "dst"} - set(reserved)
    for i, job in enumerate(jobs):
        unknown = sorted(set(job.options) - known)
        if unknown:
            raise ValueError(f"job {i} ({job.src}): unknown option(s) {', '.join(unknown)}; "
                             f"convert takes {', '.join(sorted(known))}")


def max_workers() -> int:
    """Job slots the file-descriptor limit allows (MAX_WORKERS at most)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_fds = max(1, (soft - 32) // FDS_PER_JOB) if soft != resource.RLIM_INFINITY else MAX_WORKERS
    return min(by_fds, MAX_WORKERS)


def default_workers(threads: int | None) -> int:
    """Job slots: one per core, within the file-descriptor limit."""
    return max(1, min(len(os.sched_getaffinity(0)), max_workers()))


class _Progress:
    """Folds per-job progress calls into one (done_bytes, total_bytes) stream for the batch:
    calls never overlap, and `done` never decreases."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int):
        self.callback = callback
        self.total = total
        self.done = {}
        self.finished = 0
        self.reported = 0
        self.lock = threading.Lock()

    def _report(self) -> None:
        """Call back with the batch's progress (under self.lock)."""
        now = min(max(self.reported, self.finished + sum(self.done.values())), self.total)
        self.reported = now
        self.callback(now, self.total)

    def for_job(self, index: int):
        if self.callback is None:
            return None

        def report(done: int, total: int) -> None:
            with self.lock:
                self.done[index] = done
                self._report()
        return report

    def job_ended(self, index: int, size: int) -> None:
        with self.lock:
            self.done.pop(index, None)
            self.finished += size
            if self.callback is not None:
                self._report()


def size_and_cost(job: Job, read=None) -> tuple[int, float]:
    """The job's virtual size as convert will see it, from its header alone, and the
    estimated cost of its conversion (workload.size_and_cost); (-1, 0.0) when the source cannot
    be opened or read (the job will fail: run it first). `read`: the job's entry of chains()."""
    from .workload import size_and_cost as estimate
    others = [name for what, name, _ in read[1:]] if isinstance(read, list) else ()
    return estimate(job.src, job.options.get("src_format"), others)


def costliest_first(estimates: list) -> list[int]:
    """Job indices in the order to start them: jobs that cannot be read first (they fail at
    once: on_error="stop" stops early), then the costliest (a big job started last would
    leave the other slots idle at the end), the larger image first among equal costs."""
    return sorted(range(len(estimates)), key=lambda i: (estimates[i][0] >= 0,
                                                         -estimates[i][1], -estimates[i][0]))


class _Cores:
    """A batch's cores, as conversions share them: each job runs on `base` threads while jobs
    wait to start; once none waits, the jobs still running divide the cores among them (the
    slots the last jobs leave idle would otherwise leave cores idle at the end of a batch, for
    as long as its largest image takes). A running job's threads only grow (lending.LENDER), so
    the running jobs never hold more threads than the cores, `base` each excepted."""

    def __init__(self, cores: int, base: int, pending: queue.SimpleQueue):
        self.cores, self.base, self.pending = cores, base, pending
        self.running = 0                # slots holding or taking a job
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.running += 1

    def leave(self) -> None:
        with self.lock:
            self.running -= 1

    def share(self) -> Share:
        return Share(self)


def run_job(job: Job, *, threads: int | None = None, skip_existing: bool = False,
            overwrite: bool = False, progress=None, swept: bool = False, share=None,
            interrupted=None):
    """Run one job; return its ConvertResult or Skipped, raise what convert raised.

    Temporary files a killed run left beside the destination are removed first, skipped or
    not (`swept`: the caller has just done that for the whole batch). `share`: the job's
    lending.Share of a batch's cores, which its threads may grow to (unless the job sets
    threads). `interrupted`: the batch's lending.INTERRUPTED check."""
    from .convert import convert
    if not swept:
        sweep_stale_temps(job.dst)
    if skip_existing and finished(job):
        return Skipped(job.dst, "destination exists")
    options = {"overwrite": overwrite, **job.options}
    lend = share is not None and options.get("threads") is None
    if options.get("threads") is None:
        options["threads"] = threads        # (a job's threads=None means the batch's)
    token = LENDER.set(share if lend else None)
    waits = INTERRUPTED.set(interrupted)
    try:
        with temps_swept(job.dst):              # (convert would sweep again)
            return convert(job.src, job.dst, progress=progress, **options)
    finally:
        INTERRUPTED.reset(waits)
        LENDER.reset(token)


def convert_many(jobs, *, workers: int | None = None, threads: int | None = None,
                 on_error: str = "continue", progress=None, skip_existing: bool = False,
                 overwrite: bool = False, on_result=None) -> list[Any]:
    """Convert many images in one process; one result per job, in job order.

    Parameters
    ----------
    jobs : iterable
        `(src, dst)` pairs, `Job`s, or dicts `{"src": ..., "dst": ..., **convert options}`
        (format, compression, snapshot, backing_dirs, sparse_size, ...).
    workers : int, optional
        Jobs converted side by side (default: one per core, capped by the file-descriptor
        limit). Each job holds one image chain open, so this also caps open images.
    threads : int, optional
        Worker threads per job (default: the cores divided among the jobs that run side by
        side, at least one: more threads than cores only add switching; once no job waits to
        start, the jobs still running share the cores the others leave idle).
    on_error : "continue" or "stop"
        "stop" starts no new job after the first failure; jobs not started get a
        `concurrent.futures.CancelledError` as their result.
        Jobs that would write the same destination (after the first), or read another job's
        destination (source, backing file or data file), are not run: their result is a
        ValueError saying why.
    progress : callable(done_bytes, total_bytes), optional
        One progress stream for the whole batch (guest bytes of all jobs).
    skip_existing : bool
        Skip jobs whose destination already exists (outputs are published only when complete,
        so a killed batch resumes where it stopped). Temporary files a killed run left beside a
        destination are removed either way.
    overwrite : bool
        Replace existing destinations (a job's own "overwrite" option wins).
    on_result : callable(index, job, result), optional
        Called as each job ends (from a worker thread), e.g. to print a summary line.

    An exception in the calling thread while the batch runs (KeyboardInterrupt, a signal
    handler's, or one raised by `on_result`) stops it: no job starts any more, running jobs
    stop at their next unit of work and remove their temporary outputs, and the exception
    propagates once they have (or after CANCEL_WAIT_SECONDS). One raised by `progress` while
    a job converts ends that job (its result); one raised by the report of a job's end stops
    the batch as `on_result`'s does.

    Returns
    -------
    list
        For each job: a `ConvertResult`, a `Skipped`, or the exception (`QcowError`,
        `OSError`, ...) it raised.

    Memory: at most `workers` conversions at once, each bounded as `convert` documents.
    """
    if on_error not in ("continue", "stop"):
        raise ValueError("on_error must be 'continue' or 'stop'")
    jobs = [as_job(j) for j in jobs]
    check_options(jobs)
    skip_existing = boolean(skip_existing, "skip_existing")
    progress, on_result = callback(progress, "progress"), callback(on_result, "on_result")
    read = chains(jobs)
    skipped = to_skip(jobs, skip_existing)      # (decided once: the conflicts depend on it)
    refused = conflicts(jobs, read, skipped)
    overwrite = boolean(overwrite, "overwrite")
    workers = integer(workers, "workers", 1, none=True, what="an integer of at least 1")
    threads = integer(threads, "threads", 1, none=True, what="an integer of at least 1")
    # Each slot holds a chain open: more than the descriptor limit allows would fail jobs.
    workers = min(workers, max_workers()) if workers else default_workers(threads)
    lend = threads is None
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // min(workers, max(1, len(jobs))))
    estimates = [size_and_cost(j, r) for j, r in zip(jobs, read)]
    sizes = [size for size, _ in estimates]     # -1: cannot be read (the job will fail)
    # One listing per output directory for the batch, not one per job (N jobs writing into one
    # directory would list it N times). Nothing of this batch exists yet to be mistaken.
    sweep_stale_temps_of(job.dst for i, job in enumerate(jobs) if i not in refused)
    batch = _Progress(progress, sum(max(0, s) for s in sizes))
    results: list[Any] = [None] * len(jobs)
    first_failure: list[str] = []           # the source of the job that stopped the batch
    cancel = threading.Event()              # the caller is unwinding: abort every job

    def interrupted() -> None:
        if cancel.is_set():
            raise Cancelled("the batch was interrupted")

    def job_progress(i: int):
        report = batch.for_job(i)

        def check_in(done: int, total: int) -> None:
            interrupted()
            if report is not None:
                report(done, total)
        return check_in

    def one(i: int):
        job = jobs[i]
        if cancel.is_set():
            result = CancelledError("not started: the batch was interrupted")
        elif first_failure:
            result = CancelledError(f"not started: another job failed ({first_failure[0]})")
        elif i in refused:
            result = refused[i]
        elif i in skipped:
            result = Skipped(job.dst, "destination exists")
        else:
            try:
                result = run_job(job, threads=threads, skip_existing=skip_existing,
                                 overwrite=overwrite, progress=job_progress(i), swept=True,
                                 share=cores.share() if lend else None,
                                 interrupted=interrupted)
            except Exception as exc:        # noqa: BLE001 - the job's result, as in futures
                result = exc
        if isinstance(result, Exception) and not isinstance(result, CancelledError) \
                and on_error == "stop" and not first_failure:
            first_failure.append(job.src)
        results[i] = result
        try:
            batch.job_ended(i, max(0, sizes[i]))
            if on_result is not None:
                on_result(i, job, result)
        except BaseException:
            cancel.set()                        # start nothing more (the caller unwinds)
            raise

    pending: queue.SimpleQueue = queue.SimpleQueue()
    for i in costliest_first(estimates):
        pending.put(i)
    cores = _Cores(len(os.sched_getaffinity(0)), threads, pending)
    # Each job holds its chain's files and its output open: jobs wait for descriptors, and a
    # job needing more than the limit leaves runs alone (a deep chain needs one per layer).
    fds = _Descriptors(descriptor_budget())
    ended: queue.SimpleQueue = queue.SimpleQueue()     # (index, what it raised or None)

    def slot() -> None:
        while not cancel.is_set():
            cores.enter()                   # (before the queue can look empty to the others)
            try:
                try:
                    i = pending.get_nowait()
                except queue.Empty:
                    return
                need = fds.take(_descriptors_for(read[i]), cancel)
                try:
                    one(i)
                except BaseException as exc:    # on_result's, or an interrupt of this thread
                    ended.put((i, exc))
                    return
                finally:
                    fds.give(need)
            finally:
                cores.leave()
            ended.put((i, None))

    slots: list[threading.Thread] = []
    try:
        # (Inside the try: jobs run as soon as their slot starts, so a signal arriving while
        # the others start must stop them.)
        _start_threads(min(workers, max(1, len(jobs))), slot, slots)
        if not slots:
            slot()              # no thread could start (a memory limit): the jobs run here
        for _ in jobs:
            # Wake at each job's end (the first exception, whichever job raised it) and a few
            # times a second: a signal the kernel gave a worker thread is handled only when
            # this thread runs Python again.
            _, raised = _next_ended(ended)
            if raised is not None:
                raise raised
    except BaseException:
        # Ctrl-C, a signal turned into an exception, or a raising callback: start nothing
        # more, make the running conversions stop at their next unit (each removes its
        # temporary output), and wait a bounded time for them before passing it on.
        cancel.set()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        for t in slots:
            t.join(max(0.0, deadline - time.monotonic()))
        raise
    for t in slots:
        t.join()
    return results


def _start_threads(n: int, target, started: list) -> None:
    """Start up to `n` threads running `target`, appended to `started`: as many as the system
    lets start (a memory limit refuses threads with RuntimeError), none if it refuses one."""
    for k in range(n):
        t = threading.Thread(target=target, name=f"qcowfast-job_{k}")
        try:
            t.start()
        except RuntimeError:                    # "can't start new thread"
            return
        started.append(t)


def descriptor_budget() -> int:
    """File descriptors the batch's jobs may hold at once (the soft limit less a reserve)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_WORKERS * FDS_PER_JOB if soft == resource.RLIM_INFINITY else max(1, soft - 32)


def _descriptors_for(read) -> int:
    """Descriptors a job holds: one per file of its chain, its output and some slack."""
    return (0 if isinstance(read, Exception) else len(read)) + 8


class _Descriptors:
    """A counted budget of file descriptors: take() waits until enough are free (a request
    larger than the whole budget takes it all, so that job runs alone)."""

    def __init__(self, total: int):
        self.total = self.free = total
        self.cond = threading.Condition()

    def take(self, n: int, cancel: threading.Event) -> int:
        n = min(n, self.total)
        with self.cond:
            while self.free < n and not cancel.is_set():
                self.cond.wait(SIGNAL_LATENCY)
            self.free -= n
        return n

    def give(self, n: int) -> None:
        with self.cond:
            self.free += n
            self.cond.notify_all()


def _next_ended(ended: queue.SimpleQueue):
    """The next item put in `ended`, waking every SIGNAL_LATENCY seconds meanwhile."""
    while True:
        try:
            return ended.get(timeout=SIGNAL_LATENCY)
        except queue.Empty:
            pass                        # (back in Python: pending signal handlers run here)


class Cancelled(QcowError):
    """A job stopped because the batch was interrupted (its output was removed)."""


CANCEL_WAIT_SECONDS = 10.0
SIGNAL_LATENCY = 0.2                # seconds the batch may take to notice a signal


def is_transient(exc: BaseException) -> bool:
    """An I/O error worth retrying (a flaky shared filesystem), not a property of the job:
    an OSError with a transient errno, opening errors (ImageOpenError) included."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT,
                              errno.ESTALE, errno.ECONNRESET, errno.EBUSY})
