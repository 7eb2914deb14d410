"""Damaged images served over NBD: `qcowfast serve` against `qemu-nbd -r`.

The NBD counterpart of test_damage_parity: a fixed subset of its damages (`SERVED`: one of
each kind, on a seeded image, offset and value, and at least PER_FAMILY of each family on each
image), each damaged copy exported by both servers at once with the same options
(`-r -t -f qcow2 -A -k SOCKET`, started in the image's directory, where the names of the
chain's base and of the data file resolve for both; qcowfast needs no --allow-backing-dir
there) and asked the same questions:

* by real clients, on the whole export: `nbdinfo --map` (base:allocation),
  `nbdinfo --map=qemu:allocation-depth` and `qemu-img convert -f raw -O raw` (virtual sizes
  up to CONVERT_LIMIT): the same exit status and output;
* per request (`_probe`, a raw client): for each 64 KiB of the export, a BLOCK_STATUS of both
  contexts, one with REQ_ONE to the end of the probed bytes, and a READ; a request whose
  answers differ is asked again in 4 KiB pieces, each judged on its own, so that a failure is
  allowed only for the bytes the rule names.

Outcomes:

* qemu-nbd refuses to start: qcowfast must refuse too (with the same status);
* only qcowfast refuses: the refusal must be one README's "Differences from qemu-img" names
  (documented_refusal of qcowfast's own open), and its error line must name the rule
  (`START_WORDS`);
* both serve: the same answers, except README's per-request differences (`_status_problem`,
  `_allocation_problem`, `_read_problem`, each citing its sentence). Which requests may fail
  where qemu-nbd answers is decided by qcowfast's own map and read of the same range in this
  process (`Local`): only the rules README applies to requests (bytes past the end of a file,
  reserved bits and compressed COPIED entries) count, not convert's shared-cluster refusal.

Left out of the assertion: the words of a refusal both servers make (where they differ, they
are qcowfast's open errors, the same as its qemu-img command line's, which test_damage_parity
covers), and which request of a failing whole-export client fails first (qcowfast's block
status fails on an entry qemu-nbd only fails to read: the statuses are compared).
"""
from __future__ import annotations

import io
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qcowfast
from qcowfast import mapping, nbd
from test_damage_parity import CONVERT_LIMIT, DAMAGES, Damage, damaged, documented_refusal, \
    pristine  # noqa: F401 (pristine: the fixture)
from test_nbd_protocol import Client, info_data, meta_data
from test_serve import _terminate

TIMEOUT = 60
K, M = 1 << 10, 1 << 20

# --------------------------------------------------------------------------------------------
# The subset: a seeded choice per kind, and per image and family of damage.


KINDS = ("backing-name", "backing-format", "data-file-name", "data-l2", "base-l2",
         "base-truncate", "compressed-stream", "compressed", "snapshot-l1", "bitmap", "l1", "l2",
         "reftable", "truncate")


def kind(d: Damage) -> str:
    """The kind of damage: its id without the value (`field-size`, `l2`, `truncate`, ...)."""
    if "=" in d.id:
        return d.id.split("=")[0]
    return next((k for k in KINDS if d.id.startswith(k)), d.id.split("-")[0])


def _family(d: Damage) -> str:
    """Header fields, snapshot table fields and refcounts sample as one kind each."""
    k = kind(d)
    return k.split("-")[0] if "=" in d.id else k


PER_FAMILY = 1


def _served() -> list[Damage]:
    """One damage of each kind (on a seeded choice of image, offset and value), and at least
    PER_FAMILY of each family on each image, in DAMAGES' order. (All 941 damages, probed the
    same way by hand on 2026-12-05, gave no disagreement; this sample keeps the suite short.)"""
    rng = random.Random(2023)
    kinds: dict = defaultdict(list)
    families: dict = defaultdict(list)
    for d in DAMAGES:
        kinds[kind(d)].append(d)
        families[(d.image, _family(d))].append(d)
    chosen = {id(rng.choice(ds)) for _, ds in sorted(kinds.items())}
    for _, ds in sorted(families.items()):
        rest = [d for d in ds if id(d) not in chosen]
        more = max(0, PER_FAMILY - (len(ds) - len(rest)))
        chosen.update(id(d) for d in rng.sample(rest, min(len(rest), more)))
    return [d for d in DAMAGES if id(d) in chosen]


SERVED = _served()
IDS = [f"{d.image}:{d.id}" for d in SERVED]


def options(d: Damage) -> tuple[str, ...]:
    """A damaged snapshot table entry is served as the snapshot (`-l s1`), which reads it."""
    return ("-l", "s1") if d.id.startswith("snapshot") else ()

# --------------------------------------------------------------------------------------------
# Servers and clients.


@dataclass
class Result:
    status: int
    out: bytes | str
    err: str


@dataclass
class Side:
    """One server's answers: `started` False when it refused (`log` its standard error)."""
    which: str
    started: bool = False
    status: int | None = None
    log: str = ""
    size: int | None = None
    answers: dict = field(default_factory=dict)
    requests: dict = field(default_factory=dict)
    sock: Path | None = None


def _run(argv, cwd=None) -> Result:
    p = subprocess.run([str(a) for a in argv], capture_output=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL, cwd=cwd, check=False)
    return Result(p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


def _command(which: str) -> list[str]:
    return ["qemu-nbd"] if which == "qemu-nbd" else [sys.executable, "-m", "qcowfast", "serve"]


def _start(which: str, path: Path, sock: Path, options=()) -> tuple[subprocess.Popen, Path]:
    log = sock.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen([*_command(which), "-r", "-t", "-f", "qcow2", "-A", *options,
                                 "-k", str(sock), path.name], cwd=path.parent,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
    return proc, log


def _ready(proc: subprocess.Popen, sock: Path, uri: str) -> int | None:
    """The export's size once the server answers, None when it ended (refused)."""
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    # qemu-nbd listens before it opens the image: only an answer tells it serves.
    probe = _run(["nbdinfo", "--size", uri])
    if probe.status == 0:
        return int(probe.out)
    proc.wait(TIMEOUT)
    return None


def _queries(uri: str, size: int, work: Path) -> dict[str, Result]:
    out = {"map": _run(["nbdinfo", "--map", uri]),
           "depth": _run(["nbdinfo", "--map=qemu:allocation-depth", uri])}
    if size <= CONVERT_LIMIT:
        dst = work / "out.raw"
        r = _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, dst])
        if r.status == 0:
            r.out = dst.read_bytes()
        dst.unlink(missing_ok=True)
        out["convert"] = r
    return out


STEP = 64 * K                   # requests of the per-request probe: one cluster each
PROBED = 9 * M                  # ... over the first 9 MiB of the export (all of the images)
CONTEXTS = (b"base:allocation", b"qemu:allocation-depth")
DROPPED = "dropped"             # qemu-nbd drops the connection on a corrupt compressed stream


def _connect(sock: Path) -> tuple[Client, dict]:
    """A client in transmission phase with both contexts; returns it and {id: context}."""
    c = Client(str(sock), timeout=TIMEOUT)
    c.greet()
    assert c.option(nbd.NBD_OPT_STRUCTURED_REPLY)[-1][0] == nbd.NBD_REP_ACK
    replies = c.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data(b"", list(CONTEXTS)))
    ids = {struct.unpack_from(">I", p)[0]: p[4:].decode() for t, p in replies
           if t == nbd.NBD_REP_META_CONTEXT}
    assert sorted(ids.values()) == sorted(x.decode() for x in CONTEXTS), replies
    assert c.option(nbd.NBD_OPT_GO, info_data(b""))[-1][0] == nbd.NBD_REP_ACK
    c.structured = True
    return c, ids


def _chunks(c: Client, handle: int):
    """The chunks of the reply to `handle`, up to its DONE flag. Chunks of earlier handles are
    skipped: qemu-nbd 7.2 goes on sending a multi-context BLOCK_STATUS reply's chunks after
    its final error chunk (README, serve)."""
    while True:
        flags, rtype, got, payload = c.chunk()
        if got != handle:
            continue
        yield rtype, payload
        if flags & nbd.NBD_REPLY_FLAG_DONE:
            return


def _request(c: Client, ids: dict, what: str, offset: int, length: int, handle: int):
    """A BLOCK_STATUS's {context: [(length, flags), ...]} or a READ's bytes; else the error
    number."""
    cmd = nbd.NBD_CMD_READ if what == "read" else nbd.NBD_CMD_BLOCK_STATUS
    c.request(cmd, handle, offset, length, nbd.NBD_CMD_FLAG_REQ_ONE if what == "one" else 0)
    extents, data, error = {}, bytearray(length), 0
    for rtype, payload in _chunks(c, handle):
        if rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS:
            (cid,) = struct.unpack_from(">I", payload)
            vals = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
            extents[ids[cid]] = list(zip(vals[::2], vals[1::2]))
        elif rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", payload)
            data[at - offset:at - offset + len(payload) - 8] = payload[8:]
        elif rtype & (1 << 15):
            error = struct.unpack_from(">I", payload)[0]
    return error or (bytes(data) if what == "read" else extents)


REQUESTS = ("status", "one", "read")


def _length(what: str, offset: int, size: int) -> int:
    """STEP, except for "one": a BLOCK_STATUS with REQ_ONE to the end of the probed bytes,
    whose single extent qemu-nbd finds without looking further."""
    return min(size, PROBED) - offset if what == "one" else min(STEP, size - offset)


def _probe(sock: Path, size: int) -> dict:
    """{(what, offset): answer} for each of REQUESTS at each STEP of the export's first
    PROBED bytes, on one connection (a new one after qemu-nbd drops it)."""
    answers: dict = {}
    c, ids = _connect(sock)
    try:
        for offset in range(0, min(size, PROBED), STEP):
            for what in REQUESTS:
                length = _length(what, offset, size)
                try:
                    answers[what, offset] = _request(c, ids, what, offset, length,
                                                     len(answers) + 1)
                except (EOFError, ConnectionError):
                    answers[what, offset] = DROPPED
                    c.close()
                    c, ids = _connect(sock)
    finally:
        c.close()
    return answers


def _side(which: str, path: Path, sockdir: Path, stack: ExitStack, options=()) -> Side:
    """Start `which` on `path` and ask it the queries; it keeps serving until `stack` ends."""
    side = Side(which)
    work = sockdir / which
    work.mkdir()
    side.sock = work / "s.sock"
    uri = f"nbd+unix:///?socket={side.sock}"
    proc, log = _start(which, path, side.sock, options)

    def stop():
        _terminate(proc)
        side.status = proc.returncode
        side.log = log.read_text(errors="replace")
    stack.callback(stop)
    side.size = _ready(proc, side.sock, uri)
    side.started = side.size is not None
    if side.started:
        side.answers = _queries(uri, side.size, work)
        side.requests = _probe(side.sock, side.size)
        assert proc.poll() is None, f"{which} ended while serving"
    else:
        stop()
    return side


@contextmanager
def serving(path: Path, options=()):
    """(qemu-nbd, qcowfast) serving `path` at the same time, each asked the same queries
    (concurrently); both serve until the block ends, when their logs are read."""
    sockdir = Path(tempfile.mkdtemp(prefix="qf-ds-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, sockdir, ignore_errors=True)
        sides: dict = {}
        errors: list = []

        def run(which):
            try:
                sides[which] = _side(which, path, sockdir, stack, options)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        thread = threading.Thread(target=run, args=("qemu-nbd",))
        thread.start()
        run("qcowfast")
        thread.join(4 * TIMEOUT)
        if errors:
            raise errors[0]
        yield sides["qemu-nbd"], sides["qcowfast"]


def _ask(sock: Path, what: str, pieces) -> list:
    """The answers to `what` over each (offset, length) of `pieces`, on one new connection."""
    answers = []
    c, ids = _connect(sock)
    try:
        for offset, length in pieces:
            try:
                answers.append(_request(c, ids, what, offset, length, len(answers) + 1))
            except (EOFError, ConnectionError):
                answers.append(DROPPED)
                c.close()
                c, ids = _connect(sock)
    finally:
        c.close()
    return answers


# --------------------------------------------------------------------------------------------
# What README allows: qcowfast's own reading of the image is the oracle for which requests
# may fail where qemu-nbd answers.


class Local:
    """`path` opened by qcowfast in this process: whether its map or its read of a range is
    refused under a README rule (test_damage_parity.documented_refusal)."""

    def __init__(self, path: Path, options=()):
        self.path = path
        self.snapshot = options[1] if options[:1] == ("-l",) else None
        self._image = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._image is not None:
            self._image.close()

    def _refusal(self, command: str, attempt) -> str | None:
        try:
            if self._image is None:
                self._image = qcowfast.open(self.path, snapshot=self.snapshot)
            attempt(self._image)
        except qcowfast.QcowError as exc:
            rule = documented_refusal(command, exc)
            return rule if rule in REQUEST_RULES else None
        return None

    def map_refused(self, offset: int = 0, length: int | None = None) -> str | None:
        return self._refusal("map", lambda im: mapping.write_json(im, io.StringIO(), offset,
                                                                  length))

    def read_refused(self, offset: int = 0, length: int | None = None) -> str | None:
        def read(im):
            im.read(offset, im.virtual_size - offset if length is None else length)
        return self._refusal("convert", read)

    def past_end(self, offset: int, length: int) -> bool:
        """Whether reading [offset, offset + length) needs bytes past the end of a file."""
        return self.read_refused(offset, length) == PAST_END


PAST_END = documented_refusal("convert", qcowfast.TruncatedImage("x runs past the end of y"))
EIO = nbd.NBD_EIO


def _status_problem(local: Local, offset: int, length: int, want, got) -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        if want.get(DEPTH) != got.get(DEPTH):
            # README: "`qemu:allocation-depth` is qemu-nbd's".
            return "allocation depth differs"
        return _allocation_problem(local, offset, want[BASE], got[BASE])
    if isinstance(want, dict) and got == EIO and local.map_refused(offset, length):
        # README (serve): "a bad table entry any of its queries meets fails the whole request
        # with EIO", and (Differences) "A data cluster wholly past the end of a file already
        # short when served is a bad L2 entry: a block status request that reaches it fails
        # with EIO, as for other bad entries"; which entries are bad is what qcowfast's map
        # refuses (reserved bits, compressed COPIED, tables and clusters past the end).
        return None
    if isinstance(want, dict) or isinstance(got, dict):
        return "one server fails"
    return None if want == got else "different errors"


def _runs(extents) -> list[tuple[int, int, int]]:
    out, at = [], 0
    for n, flags in extents:
        out.append((at, at + n, flags))
        at += n
    return out


def _allocation_problem(local: Local, offset: int, want, got) -> str | None:
    """base:allocation extents: the same, except bytes past the end of a file, which qemu-nbd
    reports ZERO and qcowfast as data. README (Differences): "Block status reports those
    bytes as data (flags 0), not as qemu-nbd's ZERO (HOLE|ZERO in a raw file)"."""
    if want == got:
        return None
    if sum(n for n, _ in want) != sum(n for n, _ in got):
        return "extents of different lengths"
    bounds = sorted({b for s, e, _ in _runs(want) + _runs(got) for b in (s, e)})
    flags = lambda runs, at: next(f for s, e, f in runs if s <= at < e)  # noqa: E731
    for start, end in zip(bounds, bounds[1:]):
        w, g = flags(_runs(want), start), flags(_runs(got), start)
        if w == g:
            continue
        if not (w & nbd.NBD_STATE_ZERO and g == 0 and local.past_end(offset + start,
                                                                      end - start)):
            return f"extents differ at +{start:#x}"
    return None


def _read_problem(local: Local, offset: int, length: int, want, got) -> str | None:
    if isinstance(want, bytes) and isinstance(got, bytes):
        return None if want == got else "different bytes"
    if want == DROPPED:
        # README (Differences, serve): "A read that fails on a corrupt compressed stream gets
        # qemu-nbd's chunks for the runs before it, then an EIO error chunk, and the
        # connection goes on (qemu-nbd drops the connection there)".
        return None if got == EIO else "qemu-nbd dropped the connection, qcowfast answered"
    if isinstance(want, bytes) and got == EIO and local.read_refused(offset, length):
        # README (Differences): over NBD "a read that needs bytes past the end of an image
        # file ... gets EIO on its own"; (serve) "a read of bytes an image file no longer
        # holds ... gets EIO, as does a read of a cluster the image breaks a rule for".
        return None
    if isinstance(want, bytes) or isinstance(got, bytes):
        return "one server fails"
    return None if want == got else "different errors"


BASE, DEPTH = (c.decode() for c in CONTEXTS)

# The words of qcowfast's start-up refusal that name each README rule (documented_refusal's).
START_WORDS = {
    "reads past the end of the file are refused": r"runs? past the end of the file",
    "reserved bits / compressed COPIED": r"reserved bits are set|COPIED flag",
    "files named inside an image": r" named in ",
    "backing file is the image itself": r"backing chain loops",
    "two L1 entries naming the same L2 table": r" both point to the L2 table at ",
}
# The rules README applies to a request (a read, a block status query) rather than to the
# image as it is opened.
REQUEST_RULES = ("reads past the end of the file are refused", "reserved bits / compressed COPIED")


def _start_problem(local: Local, want: Side, got: Side) -> str | None:
    """Whether the servers' refusals to start agree as README allows."""
    if not want.started and not got.started:
        return None if want.status == got.status else \
            f"both refuse, status {want.status} vs {got.status}"
    if not want.started:
        return f"qemu-nbd refuses ({want.log.strip()}), qcowfast serves"
    if got.started:
        return None
    try:
        qcowfast.open(local.path, snapshot=local.snapshot).close()
        rule = None
    except qcowfast.QcowError as exc:
        rule = documented_refusal("info", exc)
    if rule in START_WORDS and re.search(START_WORDS[rule], got.log) and got.status == 1:
        return None
    return f"qcowfast refuses to serve ({got.status}: {got.log.strip()}), qemu-nbd serves"


def _query_problem(local: Local, query: str, want: Result, got: Result) -> str | None:
    """The clients' answers on the whole export: the same, or qcowfast's failure allowed for
    the per-request reasons above (a map fails on its first bad entry, a conversion on its
    first refused read; the request that fails may differ: compare statuses only)."""
    if (want.status, want.out) == (got.status, got.out):
        return None
    eio = got.status == 1 and "Input/output error" in got.err
    if want.status == 0 and eio:
        refused = local.read_refused() if query == "convert" else local.map_refused()
        if refused:
            return None
    if want.status and got.status:
        return None if want.status == got.status else "both fail, different statuses"
    return (f"{query}: qemu-nbd {want.status} {_first_line(want, got)!r}, "
            f"qcowfast {got.status} {_first_line(got, want)!r}")


def _first_line(a: Result, b: Result) -> str:
    """a's error, or its first output line that b lacks."""
    if a.status or isinstance(a.out, bytes):
        return a.err.strip() or f"{len(a.out)} bytes"
    other = b.out.splitlines() if isinstance(b.out, str) else []
    return next((line for line in a.out.splitlines() if line not in other), "")


PIECE = 4 * K                   # a request that differs is asked again in pieces this long


def _scope(what: str, length: int, want) -> int:
    """How much of a request qemu-nbd examined: with REQ_ONE, its one extent and the start
    of the run after it (nbd/server.c blockstatus_to_extents() asks for that run to know
    the extent ends); qcowfast may fail only for a bad entry in there."""
    if what != "one" or not isinstance(want, dict):
        return length
    return min(length, max(sum(n for n, _ in e) for e in want.values()) + 1)


def _request_problems(local: Local, want: Side, got: Side) -> list[str]:
    """Each probed request whose answers README does not allow; a request whose answers
    differ (allowed or not) is asked again in PIECEs, each of which must be allowed too (a
    read fails only where bytes past the end or a refused entry are needed)."""
    problems = []
    for (what, offset), answer in want.requests.items():
        length = _length(what, offset, want.size)
        pieces = [(offset, length)]
        answers = [(answer, got.requests[what, offset])]
        if answers[0][0] != answers[0][1]:
            pieces += [(o, min(PIECE, offset + length - o))
                       for o in range(offset, offset + length, PIECE)]
            answers += zip(_ask(want.sock, what, pieces[1:]), _ask(got.sock, what, pieces[1:]))
        check = _read_problem if what == "read" else _status_problem
        for (o, n), (w, g) in zip(pieces, answers):
            if p := check(local, o, _scope(what, n, w), w, g):
                problems.append(f"{what} at {o:#x}+{n:#x}: {p} (qemu-nbd: {_short(w)}; "
                                f"qcowfast: {_short(g)})")
    return problems


def disagreements(path: Path, options=()) -> list[str]:
    with serving(path, options) as (want, got), Local(path, options) as local:
        if not (want.started and got.started):
            problems = []
        elif want.size != got.size:
            problems = [f"sizes {want.size} and {got.size}"]
        else:
            problems = [p for q in want.answers
                        if (p := _query_problem(local, q, want.answers[q], got.answers[q]))]
            problems += _request_problems(local, want, got)
    problem = _start_problem(local, want, got)
    return [problem] if problem else problems


def _short(answer) -> str:
    return f"{len(answer)} bytes" if isinstance(answer, bytes) else repr(answer)[:200]


@pytest.mark.parametrize("d", SERVED, ids=IDS)
def test_damage_serve(pristine, tmp_path, d):
    path = damaged(pristine, d, tmp_path)
    problems = disagreements(path, options(d))
    more = [f"... and {len(problems) - 12} more"] if len(problems) > 12 else []
    assert not problems, "\n".join(problems[:12] + more)
