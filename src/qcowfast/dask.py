"""Conversions as Dask tasks on a `distributed` cluster (extra: ``pip install qcowfast[dask]``).

Dask stays at the edge: jobs go in as tasks, results come back; the conversion itself is the
ordinary `qcowfast.convert` running in a worker process. Sources and destinations are paths on
storage that every worker sees (a shared filesystem).

Image errors come back as values in the job's slot (a `QcowError` is a property of the image,
and Dask's ``retries=`` would retry every raised exception); only transient I/O errors
(`qcowfast.fleet.TRANSIENT_ERRNOS`: EIO, ESTALE, ETIMEDOUT, ...) are raised so that Dask retries
them.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from functools import partial

try:
    import distributed  # noqa: F401 - imported here only to name the missing extra
except ImportError as exc:
    raise ImportError("qcowfast.dask needs Dask's `distributed` package: "
                      "pip install 'qcowfast[dask]'", name=exc.name) from exc

from . import fleet
from .errors import OutputError
from .output import sweep_stale_temps_of

KEY_PREFIX = "qcowfast-convert"


def _task(job: fleet.Job, threads, skip_existing: bool, overwrite: bool, host_slots=None,
          batch: str | None = None, fresh: bool = False, seen: tuple = ()):
    """Run in a worker: the job's result or its non-transient exception, as a value.

    `fresh`: no file was at the job's destination when the batch was submitted. When a
    worker is lost, Dask runs again the tasks it was running and those whose results it held
    (a result lives on its worker until gathered): an attempt that finds the output an
    earlier one published checks it (_published_by_lost_attempt) instead of failing on it
    ("exists") or converting the image again. `seen`: the job's files and output directory
    that existed on the client (named in a failure when this worker lacks them)."""
    try:
        return _attempt(job, threads, skip_existing, overwrite, host_slots, batch, fresh, seen)
    except BaseException as exc:      # noqa: BLE001 - SystemExit, KeyboardInterrupt, ...
        if isinstance(exc, Exception):
            raise                     # (transient: Dask retries it)
        # Raised out of a task, these end the worker process (distributed's fail_hard): Dask
        # would run the job on the next worker, ending it too, and each worker lost takes
        # the results it held and the tasks it was given (KilledWorker for other jobs).
        return RuntimeError(f"the conversion raised {_described(exc)}")


def _message(exc: BaseException) -> str:
    """str(exc), or "" when its __str__ raises."""
    try:
        return str(exc)
    except Exception:                 # noqa: BLE001 - a __str__ that raises
        return ""


def _described(exc: BaseException) -> str:
    """`exc`'s class and message, even when its __str__ raises."""
    text = _message(exc)
    return f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__


def _attempt(job: fleet.Job, threads, skip_existing: bool, overwrite: bool, host_slots,
             batch: str | None, fresh: bool, seen: tuple):
    """_task's work (BaseExceptions aside)."""
    if threads is None:
        threads = _threads_for_this_worker(host_slots or {})
    interrupted = _cancellation_check()
    try:
        if interrupted is not None:
            interrupted()
        # Temporary files of killed runs beside the destination: a directory is listed once per
        # batch in each worker process, not once per task (N tasks into one directory of a
        # shared filesystem would list it N times).
        sweep_stale_temps_of([job.dst], _listings_of(batch))
        if fresh:
            kept = _published_by_lost_attempt(job)
            if kept is not None:
                return kept
        return fleet.run_job(job, threads=threads, skip_existing=skip_existing,
                             overwrite=overwrite, swept=True, interrupted=interrupted,
                             progress=interrupted and (lambda done, total: interrupted()))
    except Exception as exc:          # noqa: BLE001 - sorted below, nothing is swallowed
        if fleet.is_transient(exc):
            raise                     # Dask retries it
        if fresh and isinstance(exc, OutputError):
            # Another attempt of this job published the output while this one converted
            # (its worker, taken for lost, ran on): this one could not publish its own.
            kept = _published_by_lost_attempt(job)
            if kept is not None:
                return kept
        _name_unseen(exc, seen)
        return _portable(exc)


LOST_ATTEMPT = ("appeared while the batch ran (an attempt of this job whose worker was lost "
                "published it) and holds the source's guest bytes")


def _published_by_lost_attempt(job: fleet.Job) -> fleet.Skipped | None:
    """Skipped when the job's destination, absent when the batch was submitted, is now a
    file holding the source's size and guest bytes (read and compared in full); else None:
    the conversion then runs and says what is wrong (a file someone else put there exists)."""
    from .compare import holds_guest_bytes
    fmt = job.options.get("format", "raw")
    if job.options.get("existing") or fmt not in ("raw", "qcow2") or not fleet.finished(job):
        return None
    try:
        with fleet.open_job_source(job) as image:
            same = holds_guest_bytes(image, job.dst, fmt)
    except Exception:                 # noqa: BLE001 - the conversion reports it
        return None
    return fleet.Skipped(job.dst, LOST_ATTEMPT) if same else None


def _seen_here(job: fleet.Job, read, dirs: dict) -> tuple:
    """The files of the job's chain (`read`: fleet.chains) that exist here, on the client,
    and its output's directory if it exists here (`dirs`: a cache, by directory)."""
    names = [name for _, name, keys in read if len(keys) > 1] if isinstance(read, list) \
        else []
    if job.dst != "-":
        parent = os.path.dirname(job.dst)
        if parent not in dirs:
            dirs[parent] = os.path.isdir(parent)
        if dirs[parent]:
            names.append(parent)
    return tuple(names)


def _name_unseen(exc: Exception, seen: tuple) -> None:
    """Append to the message of a job's failure the first of `seen` (files the client saw
    as the batch was submitted) that this worker lacks: paths on the client's disk alone
    fail here as "No such file or directory", which names neither the worker nor the cause."""
    try:
        missing = next((n for n in seen if not os.path.lexists(n)), None)
    except (OSError, ValueError):
        return
    if missing is None:
        return
    from distributed import get_worker
    try:
        where = f"Dask worker {get_worker().address}"
    except (ValueError, AttributeError):
        where = "the Dask worker"
    text = (f" ({missing} existed on the client when the batch was submitted, not on {where}: "
            "sources and destinations must be paths every worker sees, on a shared "
            "filesystem)")
    try:
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (exc.args[0] + text,)
        else:
            exc.add_note(text.strip(" ()"))
    except Exception:                 # noqa: BLE001 - the job's error as it is
        pass


def _from_here(name, cwd: str | None):
    """A path of a job resolved against `cwd`, the client's working directory (a worker
    resolves a relative name against its own, which need not be the client's); names that
    are absolute, empty or not paths at all are left as they are (the job says what is wrong
    with them)."""
    if cwd is None or not isinstance(name, (str, bytes, os.PathLike)):
        return name
    try:
        text = os.fsdecode(os.fspath(name))
    except (TypeError, ValueError):
        return name
    if not text or "\0" in text or os.path.isabs(text):
        return name
    return os.path.join(cwd, text)


def _absolute(job: fleet.Job, cwd: str | None) -> fleet.Job:
    """`job` with its source, destination ("-" aside), backing_dirs and data_file resolved
    against the client's working directory `cwd`."""
    options = dict(job.options)
    if "data_file" in options:
        options["data_file"] = _from_here(options["data_file"], cwd)
    dirs = options.get("backing_dirs")
    if isinstance(dirs, (str, bytes, os.PathLike)):
        options["backing_dirs"] = _from_here(dirs, cwd)
    elif isinstance(dirs, (list, tuple)):
        options["backing_dirs"] = type(dirs)(_from_here(d, cwd) for d in dirs)
    return fleet.Job(_from_here(job.src, cwd),
                     job.dst if job.dst == "-" else _from_here(job.dst, cwd), options)


def _cancellation_check():
    """In a worker's task: a check raising fleet.Cancelled once the task is cancelled (its
    futures cancelled or released: Dask cannot stop a running task, so the conversion stops
    at its next unit and removes its temporary file, as convert_many's jobs do on Ctrl-C).
    None outside a worker."""
    from distributed import get_worker
    try:
        worker = get_worker()
        key = worker.get_current_task()
    except (ValueError, AttributeError):
        return None

    def check() -> None:
        ts = worker.state.tasks.get(key)
        if ts is None or ts.state in ("cancelled", "released", "forgotten"):
            raise fleet.Cancelled("the task was cancelled")
    return check


def _portable(exc: Exception) -> Exception:
    """`exc`, or when it would not survive the trip to the client (an exception class whose
    __init__ takes other arguments than it stores, one holding a lock), an exception of the
    nearest base class that does, with the same errno and message: the job's error, not a
    serialisation error in its slot (and not one failing the batch's single gather)."""
    from pickle import loads
    from cloudpickle import dumps     # (as distributed pickles what plain pickle cannot)
    try:
        loads(dumps(exc))
        return exc
    except Exception:                 # noqa: BLE001 - any failure to round-trip
        pass
    message = _message(exc)
    for cls in type(exc).__mro__:
        text = message if cls is type(exc) else f"{type(exc).__qualname__}: {message}"
        try:
            if issubclass(cls, OSError) and exc.errno is not None:
                why = exc.strerror if cls is type(exc) else f"{type(exc).__qualname__}: " \
                    f"{exc.strerror}"
                stand_in = cls(exc.errno, why, *([] if exc.filename is None else [exc.filename]))
            else:
                stand_in = cls(text)
            loads(dumps(stand_in))
            return stand_in
        except Exception:             # noqa: BLE001 - try the next base class
            continue
    return Exception(f"{type(exc).__qualname__}: {message}")


def _listings_of(batch: str | None) -> dict | None:
    """This worker process's directory listings for `batch` (see sweep_stale_temps_of); the
    last KEEP_BATCHES batches are kept."""
    if batch is None:
        return None
    with _listings_lock:
        listings = _batch_listings.get(batch)
        if listings is None:
            while len(_batch_listings) >= KEEP_BATCHES:
                del _batch_listings[next(iter(_batch_listings))]
            listings = _batch_listings[batch] = {}
        return listings


KEEP_BATCHES = 8
_batch_listings: dict[str, dict] = {}
_listings_lock = threading.Lock()


def _refused(exc: ValueError) -> ValueError:
    """The task of a job that must not run (fleet.conflicts): its reason, as its result."""
    return exc


def _skipped(dst: str) -> fleet.Skipped:
    """The task of a job skip_existing skips, decided once as the batch starts (as
    convert_many decides it: other jobs of the batch may read that output)."""
    return fleet.Skipped(dst, "destination exists")


def _threads_for_this_worker(host_slots: dict) -> int:
    """Cores per task slot on this host: conversions on one host share its cores, whichever
    worker process runs them (`host_slots`: task slots of all workers, by host)."""
    from distributed import get_worker
    from distributed.comm import get_address_host
    cores = len(os.sched_getaffinity(0))
    try:
        worker = get_worker()
        slots = host_slots.get(get_address_host(worker.address), worker.state.nthreads)
    except (ValueError, AttributeError):
        slots = 1
    return max(1, cores // max(1, slots))


def _host_slots(workers: dict) -> dict:
    """Task slots of the cluster's workers (`scheduler_info()["workers"]`), summed by host."""
    slots: dict = {}
    for addr, info in workers.items():
        host = info.get("host") or addr
        slots[host] = slots.get(host, 0) + int(info.get("nthreads", 1))
    return slots


def _fits(info: dict, resources: dict) -> bool:
    """Whether a worker (its scheduler_info() entry) declares all of `resources`."""
    held = info.get("resources") or {}
    return all(held.get(name, 0) >= amount for name, amount in resources.items())


def _check_resources(workers: dict, resources: dict) -> None:
    """Fail fast when no worker declares `resources`, all of them on one worker: such tasks
    would wait forever."""
    if any(_fits(w, resources) for w in workers.values()):
        return
    for name, amount in resources.items():
        best = max((w.get("resources", {}).get(name, 0) for w in workers.values()), default=0)
        if best < amount:
            raise ValueError(f"no worker of the cluster declares resource {name!r} >= {amount} "
                             f"(declared: {best}); start workers with --resources "
                             f"\"{name}={amount}\" or call without resources=")
    raise ValueError(f"no worker of the cluster declares all of {resources} (each is declared "
                     "by some worker, none has them all); a task needs them on one worker")


def _workers_of(client) -> tuple[int, dict | None]:
    """The cluster's number of workers and their details by address (`scheduler_info()`),
    None for the details of an asynchronous client's: it cannot ask the scheduler from
    inside its event loop, and its cached scheduler_info() holds the totals alone."""
    info = _scheduler_info(client)
    workers = info.get("workers") or {}
    count = int(info.get("n_workers", len(workers)))
    if getattr(client, "asynchronous", False) and count and not workers:
        return count, None
    return count, workers


def _check_workers(count: int) -> None:
    """Fail fast on a cluster without workers: its tasks would wait forever (an adaptive
    cluster scales from its minimum: give it at least one)."""
    if not count:
        raise ValueError("the Dask cluster has no workers: tasks would wait forever; start "
                         "workers (or cluster.adapt(minimum=1)) before submitting")


def submit_many(jobs, client=None, *, threads=None, skip_existing: bool = False,
                overwrite: bool = False, resources: dict | None = None, retries: int = 2):
    """Submit one task per job; return the list of `distributed.Future`s, in job order.

    Each future's result is what `qcowfast.convert_many` gives for that job. Task keys start
    with ``qcowfast-convert`` so the dashboard groups them. Relative paths (source,
    destination, backing_dirs, data_file) are resolved here, against the caller's working
    directory, not a worker's.

    Once every future of the batch has ended (finished, erred, cancelled or released, the
    client closing included), the temporary files that killed runs left beside its
    destinations are removed, as `convert_many` does at its end: a worker lost mid-conversion
    leaves its temporary file, which the attempt that ran the job again need not have seen.
    That sweep runs in a thread of this process (destinations it does not see are swept by
    the next conversion to them); it removes only files no live conversion holds.
    """
    futures, jobs, _ = _submit(jobs, client, threads=threads, skip_existing=skip_existing,
                               overwrite=overwrite, resources=resources, retries=retries)
    if futures:
        _sweep_when_done(futures, jobs)
    return futures


def _sweep_when_done(futures, jobs) -> None:
    """Sweep the jobs' destinations (sweep_stale_temps_of) once all `futures` have ended,
    waiting on the client's event loop for their shared states, not the futures themselves:
    holding those would keep the tasks wanted after the caller dropped them."""
    dsts = [job.dst for job in jobs if job.dst != "-"]
    states = [getattr(f, "_state", None) for f in futures]
    if dsts and all(s is not None and hasattr(s, "wait") for s in states):
        futures[0].client.loop.add_callback(_sweep_after, states, dsts)


async def _sweep_after(states: list, dsts: list) -> None:
    """On the client's event loop: wait until every one of `states` has ended at once (a
    finished task whose result a lost worker held runs again: "lost", then pending), then
    sweep in a thread. A task cancelled or released may still be converting on its worker
    until its next unit: the sweep leaves its temporary file, which it holds locked (see
    output._locked_temp), and it removes that file itself."""
    while True:
        state = next((s for s in states if not s.done()), None)
        if state is None:
            break
        await state.wait()
    try:
        threading.Thread(target=_sweep, args=(dsts,), name="qcowfast-dask-sweep",
                         daemon=True).start()
    except RuntimeError:              # (the interpreter is exiting)
        pass


def _sweep(dsts: list) -> None:
    """sweep_stale_temps_of(dsts), in a thread of its own: nobody is there to be told of an
    error (what it cannot remove stays for the next conversion to that destination)."""
    try:
        sweep_stale_temps_of(dsts)
    except Exception:                 # noqa: BLE001 - see above
        pass


def _submit(jobs, client, *, threads, skip_existing, overwrite, resources, retries):
    """submit_many's work: (futures in job order, the jobs as submitted, for each job whether
    its task checks for an output published by a lost attempt: see _task's `fresh`)."""
    from distributed import get_client
    from .arguments import boolean, integer
    try:
        cwd = os.getcwd()
    except OSError:                   # (a removed working directory: names stay as given)
        cwd = None
    jobs = [_absolute(fleet.as_job(j), cwd) for j in jobs]
    fleet.check_options(jobs)
    threads = integer(threads, "threads", 1, none=True, what="an integer of at least 1")
    # (The scheduler asserts on a retries it cannot compare, and takes -1 or True silently.)
    retries = integer(retries, "retries", 0, none=True, what="an integer of at least 0")
    skip_existing = boolean(skip_existing, "skip_existing")     # ("no" is no True)
    overwrite = boolean(overwrite, "overwrite")
    read = fleet.chains(jobs)
    skipped = fleet.to_skip(jobs, skip_existing)    # (decided once: the conflicts depend on it)
    refused = fleet.conflicts(jobs, read, skipped)
    for i, job in enumerate(jobs):
        if job.dst == "-" and i not in refused:
            # (convert streams "-" to standard output: here a worker's, not the caller's)
            refused[i] = ValueError("-: standard output would be the Dask worker's, not "
                                    "yours; give a path every worker sees")
    client = client or get_client()
    if not jobs:
        return [], jobs, []
    count, workers = _workers_of(client)
    _check_workers(count)
    if resources and workers is not None:
        _check_resources(workers, resources)
    # (unknown slots: each worker divides its host's cores by its own)
    host_slots = _host_slots(workers or {}) if threads is None else None
    batch = uuid.uuid4().hex[:8]
    # The costliest jobs first, as convert_many orders them: a big job started last would
    # leave the other workers idle at the end. Client.map gives its tasks the order of its input as
    # their priority and sends them in one graph (submitted one by one, the first would start
    # before the scheduler knew the larger ones existed). Each call is bound in a partial,
    # which Dask does not traverse (it would rebuild the Job dataclass in a task of its own).
    dirs: dict = {}
    fresh = [i not in refused and i not in skipped and not fleet.finished(job)
             for i, job in enumerate(jobs)]
    calls = [partial(_refused, refused[i]) if i in refused else
             partial(_skipped, job.dst) if i in skipped else
             partial(_task, job, threads, skip_existing, overwrite, host_slots, batch,
                     fresh[i], _seen_here(job, read[i], dirs))
             for i, job in enumerate(jobs)]
    order = fleet.costliest_first([(-1, 0.0) if i in refused or i in skipped else
                                   fleet.size_and_cost(job, r)
                                   for i, (job, r) in enumerate(zip(jobs, read))])
    futures = client.map(_call, [calls[i] for i in order],
                         key=[f"{KEY_PREFIX}-{batch}-{i}" for i in order], pure=False,
                         resources=resources, retries=retries)
    in_job_order: list = [None] * len(jobs)
    for i, future in zip(order, futures):
        in_job_order[i] = future
    return in_job_order, jobs, fresh


def _call(call):
    """The task: run the job's bound call."""
    return call()


def convert_many(jobs, client=None, *, threads=None, skip_existing: bool = False,
                 overwrite: bool = False, resources: dict | None = None,
                 retries: int = 2) -> list:
    """Convert jobs on a Dask cluster; one result per job, in job order.

    Parameters
    ----------
    jobs : iterable
        As for `qcowfast.convert_many` (conflicting jobs get a ValueError result there too);
        paths must be visible to every worker.
    client : distributed.Client, optional
        The cluster to use (default: the current client, `distributed.get_client()`).
    threads : int, optional
        Threads per conversion (default: the worker host's cores divided by the task slots of
        all the workers on that host, so one conversion per slot keeps its cores busy without
        oversubscribing them).
    resources : dict, optional
        Worker resources each task needs, e.g. ``{"disk": 1}``; checked against the scheduler
        first (ValueError when no worker declares them).
    retries : int
        Retries of transient I/O errors only (image errors are returned, never retried); an
        integer of at least 0, or None (0).

    Raises ValueError at once on a cluster without workers, or whose workers lack
    `resources` (all of them on one worker). An exception while the batch runs
    (KeyboardInterrupt) cancels its tasks; running conversions stop at their next unit and
    remove their temporary files before it propagates (fleet.CANCEL_WAIT_SECONDS at most), as
    cancelling submit_many's futures makes them do.

    Returns
    -------
    list
        For each job: a `ConvertResult`, a `fleet.Skipped`, or the exception it ended with
        (including a transient error that outlived its retries, `distributed.KilledWorker`
        for a job whose workers all died running it, a CancelledError for a task cancelled
        elsewhere, and a RuntimeError naming a SystemExit or KeyboardInterrupt the conversion
        raised). A job whose worker was lost after it published its output is a Skipped whose
        reason is LOST_ATTEMPT (Dask ran it again, and that attempt found the output holding
        the source's guest bytes). Once the cluster has had no worker able to run the tasks
        (none, or none declaring `resources`) for NO_WORKER_SECONDS, the jobs not done get a
        CancelledError saying so instead of waiting forever.
    """
    from distributed import get_client
    client = client or get_client()
    futures, jobs, fresh = _submit(jobs, client, threads=threads, skip_existing=skip_existing,
                                   overwrite=overwrite, resources=resources, retries=retries)
    if not futures:
        return []
    stop, abandoned = threading.Event(), set()
    watch = threading.Thread(target=_watch_workers,
                             args=(client, futures, resources, stop, abandoned),
                             name="qcowfast-dask-workers", daemon=True)
    watch.start()
    try:
        results = _collect(client, futures)
    except BaseException:
        # Ctrl-C (or any exception) while the batch runs: as convert_many, start no task any
        # more and let the running conversions stop at their next unit, removing their
        # temporary files, before passing it on (bounded: fleet.CANCEL_WAIT_SECONDS).
        _stop(client, futures)
        raise
    finally:
        stop.set()
        watch.join(WATCH_SECONDS)
    if abandoned:
        results = [_abandoned(job, new, r) if f.key in abandoned else r
                   for job, new, f, r in zip(jobs, fresh, futures, results)]
    # A worker lost during a conversion leaves its temporary file behind, and the attempt
    # that ran the job again may have used a listing of the directory made before that file
    # existed (each worker lists a directory once per batch): every task has ended, so a
    # temporary file that can be locked now is such a leftover.
    sweep_stale_temps_of(job.dst for job in jobs if job.dst != "-")
    return results


def _collect(client, futures) -> list:
    """Every task's result (or the exception it ended with), in order, gathered as the tasks
    end: a result lives on its worker until gathered, and a worker lost with results in it
    makes Dask run those tasks again (each then reads its output in full to check it). What
    has finished is gathered every GATHER_SECONDS, in one request per worker, and its future
    released, so that a worker lost later costs those jobs nothing. A cancelled task (by
    _watch_workers, another client, a restart) is its job's result; the batch goes on."""
    from concurrent.futures import CancelledError
    from distributed import wait
    results: list = [None] * len(futures)
    pending = dict(enumerate(futures))
    while pending:
        try:
            wait(list(pending.values()), timeout=GATHER_SECONDS)
        except (TimeoutError, CancelledError):
            pass                      # (what has ended is read below)
        ended = {i: f for i, f in pending.items() if f.done()}
        # Statuses are read once: a lost worker can send a finished task back to pending
        # meanwhile (the gather then waits for it to finish again).
        finished = [i for i, f in ended.items() if f.status == "finished"]
        try:
            values = client.gather([ended[i] for i in finished]) if finished else []
        except Exception:             # noqa: BLE001 - such a task is read on its own below
            finished, values = [], []
        for i, value in zip(finished, values):
            results[i] = value
        gathered = set(finished)
        for i, f in ended.items():
            if i not in gathered:
                results[i] = _outcome(f)
            del pending[i]
            f.release()
    return results


GATHER_SECONDS = 0.5


NO_WORKER_SECONDS = 120.0       # (a nanny restarts a lost worker in seconds)
WATCH_SECONDS = 1.0


RECOUNT_SECONDS = 30.0          # resources set on a running worker are seen within this


class _AbleWorkers:
    """Counts the workers able to run the batch's tasks (those declaring all of `resources`)
    each WATCH_SECONDS without fetching every worker's details each time (megabytes a second
    from the scheduler of a thousand workers): each call asks for the scheduler's totals
    alone, and the able workers are counted again only when those changed (a worker came or
    went) or RECOUNT_SECONDS passed (resources set on a running worker)."""

    def __init__(self, client, resources: dict | None):
        self.client, self.resources = client, resources
        self.totals, self.when, self.able = None, 0.0, 0
        self.on_scheduler = True        # until the scheduler refuses to run _able_there

    def __call__(self) -> int:
        info = _scheduler_info(self.client, 0)
        workers = info.get("workers") or {}
        count = int(info.get("n_workers", len(workers)))
        if not self.resources or not count:
            return count
        if len(workers) == count:       # (distributed before n_workers=: all details came)
            return sum(_fits(w, self.resources) for w in workers.values())
        totals = (count, info.get("total_threads"), info.get("total_memory"))
        now = time.monotonic()
        if totals != self.totals or now - self.when >= RECOUNT_SECONDS:
            self.able = self._count()
            self.totals, self.when = totals, now
        return self.able

    def _count(self) -> int:
        """The able workers, counted on the scheduler (a number comes back) or, where it does
        not run the client's functions, from every worker's details."""
        if self.on_scheduler:
            try:
                return int(self.client.run_on_scheduler(_able_there, self.resources))
            except OSError:
                raise                   # (the scheduler unreachable: the tick is skipped)
            except Exception:           # noqa: BLE001 - refused, or it cannot unpickle it
                self.on_scheduler = False
        workers = _scheduler_info(self.client).get("workers") or {}
        return sum(_fits(w, self.resources) for w in workers.values())


def _able_on_scheduler():
    """_AbleWorkers' count as it runs on the scheduler (client.run_on_scheduler). Made in a
    function so that cloudpickle sends its code, not its name: the scheduler's environment
    need not have qcowfast."""
    def qcowfast_able_workers(resources: dict, dask_scheduler=None) -> int:
        return sum(all((ws.resources or {}).get(name, 0) >= amount
                       for name, amount in resources.items())
                   for ws in dask_scheduler.workers.values())
    return qcowfast_able_workers


_able_there = _able_on_scheduler()


def _scheduler_info(client, n_workers: int = -1) -> dict:
    """client.scheduler_info() with the details of `n_workers` workers (-1: all of them):
    some distributed releases give those of only the first five by default, which would hide
    the workers that declare a batch's resources on a larger cluster."""
    try:
        return client.scheduler_info(n_workers=n_workers)
    except TypeError:                 # (distributed before n_workers=: all of them)
        return client.scheduler_info()


def _watch_workers(client, futures, resources, stop: threading.Event, abandoned: set) -> None:
    """In a thread while convert_many waits: once the cluster has had no worker able to run
    the tasks for NO_WORKER_SECONDS (lost or retired, none started, or none left declaring
    `resources`), cancel the tasks not done, whose keys go in `abandoned`: they would wait
    forever."""
    able, since = _AbleWorkers(client, resources), None
    while not stop.wait(WATCH_SECONDS):
        try:
            count = able()
        except Exception:             # noqa: BLE001 - the scheduler unreachable: the
            continue                  # client's own timeouts apply
        now = time.monotonic()
        if count:
            since = None
        elif since is None:
            since = now
        elif now - since >= NO_WORKER_SECONDS and not stop.is_set():
            left = [f for f in futures if not f.done()]
            abandoned.update(f.key for f in left)
            try:
                client.cancel(left)
            except Exception:         # noqa: BLE001 - the client is closing
                pass
            return


def _abandoned(job: fleet.Job, fresh: bool, result):
    """The result of a job whose task _watch_workers cancelled (`fresh`: its destination was
    absent at submission): Skipped(LOST_ATTEMPT) when a lost worker had published the output
    (checked here, on the client), else a CancelledError saying why it did not run."""
    from concurrent.futures import CancelledError
    if not isinstance(result, CancelledError):
        return result                 # (it ended before its task was cancelled)
    kept = _published_by_lost_attempt(job) if fresh else None
    return kept or CancelledError(f"not run: the Dask cluster had no worker able to run it "
                                  f"for {NO_WORKER_SECONDS:g} s (its workers were lost or "
                                  "retired); run the job again on a cluster with workers")


def _stop(client, futures) -> None:
    """Cancel the batch's tasks and wait, a bounded time, for those running on workers to end
    (a cancelled task runs on until its conversion notices: _cancellation_check)."""
    keys = {f.key for f in futures}
    try:
        client.cancel(futures)
        client.run(_ended, keys, fleet.CANCEL_WAIT_SECONDS)
    except Exception:                 # noqa: BLE001 - unwinding already; a lost worker's
        pass                          # conversions ended with it


async def _ended(keys, timeout: float, dask_worker=None) -> bool:
    """In a worker (client.run): wait until none of `keys` runs here; False on timeout."""
    import asyncio
    import time
    deadline = time.monotonic() + timeout
    while any(dask_worker.state.tasks.get(k) is not None and
              dask_worker.state.tasks[k].state in ("executing", "long-running", "cancelled")
              for k in keys):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _outcome(future):
    """The task's result, or the exception it ended with (a transient error past its retries,
    a cancellation)."""
    try:
        return future.result()
    except Exception as exc:          # noqa: BLE001 - returned in the job's slot
        return exc


__all__ = ["convert_many", "submit_many"]
