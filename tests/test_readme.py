"""README.md's examples, run as the README writes them.

The Python blocks are read from README.md when the tests run and executed in a directory
holding the files they name, images qemu-img builds; what they state (a value, a file, its
format) is checked against qemu-img. The ``sh`` blocks run through the installed ``qcowfast``,
every option of the command-line synopses must be accepted by its command, and the messages
the prose quotes must be what qcowfast (and, where the README says so, qemu-img) prints.

Only what a test environment cannot hold is substituted, each by name: the socket path
``/run/disk.sock``, the TCP port, the Dask scheduler's address.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qcowfast
from common import (assert_same_bytes, cli_in_process, data_extents, progress_values, qemu_img,
                    qemu_info, qemu_io, qemu_map, reference_raw)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
QCOWFAST = Path(sys.executable).with_name("qcowfast")     # the installed command
TIMEOUT = 60
M = 1 << 20

# -- reading the README ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int             # README line of the block's first code line


def fenced_blocks() -> list[Block]:
    return [Block(m["lang"], m["code"], TEXT.count("\n", 0, m.start("code")) + 1)
            for m in re.finditer(r"^```(?P<lang>\w*)\n(?P<code>.*?)^```", TEXT, re.M | re.S)]


def block(lang: str, marker: str) -> Block:
    """The one ```lang block containing `marker`."""
    found = [b for b in fenced_blocks() if b.lang == lang and marker in b.code]
    assert len(found) == 1, f"README.md: {len(found)} ```{lang} blocks contain {marker!r}"
    return found[0]


def prose(pattern: str) -> str:
    """Group 1 of `pattern` in the README with its line breaks made spaces (one match)."""
    found = re.findall(pattern, " ".join(TEXT.split()))
    assert len(found) == 1, f"README.md: {len(found)} matches of {pattern!r}"
    return found[0]


def substituted(code: str, subs: dict[str, str]) -> str:
    """`code` with each text the test environment cannot hold (a socket path, an address)
    replaced; each must be there."""
    for old, new in subs.items():
        assert old in code, f"README example no longer holds {old!r}"
        code = code.replace(old, new)
    return code


def literal_calls(code: str, name: str) -> list[tuple[list, dict]]:
    """(args, kwargs) of every call of `name` (e.g. "qcowfast.convert") whose arguments are
    literals."""
    calls = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
            with contextlib.suppress(ValueError):
                calls.append(([ast.literal_eval(a) for a in node.args],
                              {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
    return calls


class _Record(ast.NodeTransformer):
    """Hands the value of every expression statement to `_readme_value(source, value)`."""

    def __init__(self, code: str):
        self.code = code

    def visit_Expr(self, node: ast.Expr) -> ast.Expr:
        if isinstance(node.value, ast.Constant):          # `...`
            return node
        call = ast.Call(ast.Name("_readme_value", ast.Load()),
                        [ast.Constant(ast.get_source_segment(self.code, node.value)), node.value],
                        [])
        return ast.copy_location(ast.Expr(call), node)


def run_python(b: Block, code: str, namespace: dict) -> dict:
    """Execute `code` (block `b`, maybe substituted) in `namespace`, tracebacks naming README
    lines; return {expression statement's source: its last value}."""
    values: dict = {}
    tree = _Record(code).visit(ast.parse(code))
    ast.increment_lineno(ast.fix_missing_locations(tree), b.line - 1)
    namespace["_readme_value"] = values.__setitem__
    exec(compile(tree, str(README), "exec"), namespace)
    return values


def value(values: dict, prefix: str):
    """The recorded value of the one expression statement starting with `prefix`."""
    keys = [k for k in values if k.startswith(prefix)]
    assert len(keys) == 1, f"expected one statement starting {prefix!r}; recorded: {list(values)}"
    return values[keys[0]]


@contextlib.contextmanager
def captured_stdout():
    """sys.stdout as text over a byte buffer (what `convert(..., "-")` writes into): yields
    the buffer, holding print()'s text and the image's bytes in the order written."""
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, write_through=True)
    try:
        with contextlib.redirect_stdout(text):
            yield raw
    finally:
        text.detach()


# -- the images the examples name -----------------------------------------------------------


def build_images(d: Path) -> None:
    """Build, with qemu-img and qemu-io, the files the examples read: base.qcow2 <-
    disk.qcow2 (data in both layers, a zero cluster, an unallocated tail, snapshot s1),
    a.qcow2 (zlib-compressed), b.qcow2 and copy.qcow2 (disk.qcow2's twin)."""
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qemu_io(d / "base.qcow2", "write -P 0x11 0 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2",
             "4M", cwd=d)
    qemu_io(d / "disk.qcow2", "write -P 0x22 1M 64k")
    qemu_img("snapshot", "-c", "s1", "disk.qcow2", cwd=d)
    qemu_io(d / "disk.qcow2", "write -P 0x33 1536k 64k", "write -z 512k 64k")
    qemu_img("convert", "-c", "-O", "qcow2", "disk.qcow2", "a.qcow2", cwd=d)
    qemu_img("convert", "-O", "qcow2", "base.qcow2", "b.qcow2", cwd=d)
    shutil.copyfile(d / "disk.qcow2", d / "copy.qcow2")


@pytest.fixture(scope="module")
def example_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme-images")
    build_images(d)
    return d


@pytest.fixture
def workdir(example_images, tmp_path, monkeypatch) -> Path:
    """tmp_path, holding copies of the example images, as the working directory."""
    for f in example_images.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def unix_uri(sock, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merged_map(entries) -> list[tuple[int, int, bool, int]]:
    """(start, end, data, depth) runs of map entries or extents, adjacent equal runs merged."""
    runs: list = []
    for start, length, data, depth in entries:
        if runs and runs[-1][1] == start and runs[-1][2:] == (data, depth):
            runs[-1] = (runs[-1][0], start + length, data, depth)
        else:
            runs.append((start, start + length, data, depth))
    return runs


EXTENT_LINE = re.compile(r"Extent\(guest_offset=(\d+), length=(\d+), "
                         r"kind=<ExtentKind\.(\w+): \d>, host_offset=(\d+|None), depth=(\d+)\)")

# -- the Python API block -------------------------------------------------------------------

API = "qcowfast.open("
SERVE_SOCKET = "/run/disk.sock"          # the README's socket path; a tmp_path one here
@contextlib.contextmanager
def copied_over_nbd(sock: Path, out: Path):
    """While the block runs, a thread waits for a server on `sock` and copies its export to
    `out` with nbdcopy; the non-persistent server then ends, so a blocking `serve()` returns.
    Yields the list nbdcopy's CompletedProcess goes to. A serve() that does not return gets a
    SIGINT, and the test fails."""
    done, copies, main = threading.Event(), [], threading.get_ident()

    def client():
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            if done.wait(0.01) or time.monotonic() > deadline:
                break
        else:
            copies.append(run("nbdcopy", unix_uri(sock), out))
        if not done.wait(TIMEOUT):
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        yield copies
    except KeyboardInterrupt:
        pytest.fail("qcowfast.serve() did not return after its last client left")
    finally:
        done.set()
        thread.join()


def run_api_block(d: Path) -> None:
    b = block("python", API)
    sock = d / "disk.sock"
    code = substituted(b.code, {SERVE_SOCKET: str(sock)})
    ns: dict = {"__name__": "readme"}
    with copied_over_nbd(sock, d / "served.raw") as copies, captured_stdout() as stdout:
        values = run_python(b, code, ns)

    ref = reference_raw("disk.qcow2")
    info = qemu_info("disk.qcow2")
    # `with qcowfast.open(...)`: sizes, the header record, read, extents, as_file, map
    virtual_size, cluster_size, header = value(values, "img.virtual_size")
    assert (virtual_size, cluster_size) == (info["virtual-size"], info["cluster-size"])
    assert dataclasses.is_dataclass(header)
    assert dataclasses.asdict(header)["size"] == virtual_size
    assert header.backing_file == info["backing-filename"]
    assert dataclasses.replace(header) == header
    with pytest.raises(dataclasses.FrozenInstanceError, match="frozen"):
        header.size = 0
    assert type(ns["data"]) is bytes and ns["data"] == ref[M:M + 4096]
    out = stdout.getvalue()
    text = out[:len(out) - len(ref)].decode()
    lines = text.splitlines()
    assert [EXTENT_LINE.fullmatch(line) is not None for line in lines] == [True] * len(lines), text
    extents = [EXTENT_LINE.fullmatch(line).groups() for line in lines]
    assert "ZERO" in {e[2] for e in extents} and "UNALLOCATED" in {e[2] for e in extents}
    assert merged_map((int(s), int(n), kind in ("DATA", "COMPRESSED"), int(depth))
                      for s, n, kind, _, depth in extents) == \
        merged_map((e["start"], e["length"], e["data"], e["depth"]) for e in qemu_map("disk.qcow2"))
    assert isinstance(ns["f"], io.RawIOBase)
    assert value(values, "img.map()") == qemu_map("disk.qcow2")

    # convert to raw: same bytes as qemu-img, the unallocated tail a hole
    result = ns["result"]
    fields = prose(r"# ConvertResult\(([\w, ]+)\)").split(", ")
    assert [f.name for f in dataclasses.fields(result)] == fields
    assert result.virtual_size == virtual_size
    assert_same_bytes(Path("disk.raw").read_bytes(), ref, "disk.raw")
    assert all(end <= 2 * M for _, end in data_extents("disk.raw")), data_extents("disk.raw")
    # convert to qcow2 with zstd, as qemu-img reads it
    [(src, dst), _] = [c for c in literal_calls(code, "qcowfast.convert")
                       if c[1].get("format") == "qcow2"][0]
    dst_info = qemu_info(dst)
    assert (dst_info["format"], dst_info["format-specific"]["data"]["compression-type"]) == \
        ("qcow2", "zstd")
    assert run("qemu-img", "compare", src, dst).returncode == 0
    assert run("qemu-img", "check", dst).returncode == 0
    # convert to "-": the image's bytes follow the printed extents on standard output
    assert isinstance(value(values, 'qcowfast.convert("disk.qcow2", "-")'),
                      qcowfast.ConvertResult)
    assert_same_bytes(out[len(out) - len(ref):], ref, 'convert("disk.qcow2", "-")')

    # info, check and compare: qemu-img's JSON, exit codes and report
    assert value(values, "qcowfast.info(") == info
    checked = value(values, "qcowfast.check(")
    qemu_check = run("qemu-img", "check", "--output=json", "disk.qcow2")
    assert checked.to_json() == json.loads(qemu_check.stdout)
    assert checked.exit_code == qemu_check.returncode == 0
    assert checked.format_human() == run("qemu-img", "check", "disk.qcow2").stdout
    [(pair, _)] = literal_calls(code, "qcowfast.compare")
    assert value(values, "bool(qcowfast.compare(") is \
        (run("qemu-img", "compare", *pair).returncode == 0)

    # serve: blocked until nbdcopy, its only client, left
    assert value(values, "qcowfast.serve(") is None
    assert [c.returncode for c in copies] == [0], copies
    assert_same_bytes(Path("served.raw").read_bytes(), ref, "nbdcopy of qcowfast.serve()")
    assert not sock.exists()

    # convert_many: one ConvertResult per job, each output qemu-img's bytes
    [([jobs], _)] = literal_calls(code, "qcowfast.convert_many")
    results = value(values, "qcowfast.convert_many(")
    assert [type(r) for r in results] == [qcowfast.ConvertResult] * len(jobs), results
    for src, dst in jobs:
        assert_same_bytes(Path(dst).read_bytes(), reference_raw(src), dst)


def test_python_api_block(workdir):
    run_api_block(workdir)


def test_open_and_convert_signatures_are_the_functions():
    """The parameters, kinds and defaults the README gives `qcowfast.open` and `convert`."""
    units = {"MiB": 1 << 20, "TiB": 1 << 40}
    P = inspect.Parameter
    for name in ("open", "convert"):
        words = prose(rf"`qcowfast\.{name}\(([^`]*)\)`:").split(", ")
        real = inspect.signature(getattr(qcowfast, name)).parameters
        star, slash = words.index("*"), words.index("/") if "/" in words else -1
        for i, word in enumerate(words):
            if word in ("/", "*"):
                continue
            param, _, default = word.partition("=")
            assert param in real, f"qcowfast.{name} has no parameter {param!r}"
            kind = (P.KEYWORD_ONLY if i > star else P.POSITIONAL_ONLY if i < slash else
                    P.POSITIONAL_OR_KEYWORD)
            assert real[param].kind == kind, (name, param, real[param].kind)
            if default:
                number, _, unit = default.partition(" ")
                want = int(number) * units[unit] if unit else ast.literal_eval(default)
                assert real[param].default == want, (name, param, real[param].default)


def test_extent_kinds_and_errors_are_the_tables():
    kinds = re.findall(r"^\| `(\w+)` \|", TEXT.split("`ExtentKind` has four values:")[1]
                       .split("\n\n")[1], re.M)
    assert kinds == [k.name for k in qcowfast.ExtentKind]
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| (.*) \|$",
                      TEXT.split("Errors all derive from `qcowfast.QcowError`:")[1]
                      .split("\n\n")[1], re.M)
    assert len(rows) >= 13
    for names, meaning in rows:
        for name in re.findall(r"`(\w+)`", names):
            exc = getattr(qcowfast, name)
            assert issubclass(exc, qcowfast.QcowError), name
            for also in re.findall(r"also an? `(\w+)`", meaning):
                assert issubclass(exc, getattr(builtins, also)), (name, also)
    assert issubclass(qcowfast.ImageOpenError, OSError)


def test_measure_returns_a_measurement_as_qemu_img_measures(workdir):
    """`qcowfast.measure(src or size=..., format="qcow2", cluster_size=...)`, both forms."""
    assert prose(r"`(qcowfast\.measure\([^`]*\))` returns a `Measurement`") == \
        'qcowfast.measure(src or size=..., format="qcow2", cluster_size=...)'
    for args, kwargs, argv in ((["disk.qcow2"], {}, ["disk.qcow2"]),
                               ([], {"size": 3 * M}, ["--size", str(3 * M)])):
        got = qcowfast.measure(*args, **kwargs, format="qcow2", cluster_size=4096)
        assert isinstance(got, qcowfast.Measurement)
        want = run("qemu-img", "measure", "--output=json", "-O", "qcow2", "-o",
                   "cluster_size=4096", *argv)
        assert got.to_json() == json.loads(want.stdout), want.stderr


# -- the other Python blocks ----------------------------------------------------------------

# Names the later Python blocks use without defining them: `qcowfast` (the first block imports
# it) and, in the Dask block, `jobs` (a job list as "Many images" describes it; absolute paths,
# which every worker process sees).
def job_list(d: Path) -> list[tuple[str, str]]:
    return [(str(d / "a.qcow2"), str(d / "a.raw")), (str(d / "b.qcow2"), str(d / "b.raw"))]


def test_convert_many_block(workdir):
    b = block("python", "qcowfast.convert_many(\n")
    ns = {"__name__": "readme", "qcowfast": qcowfast}
    run_python(b, b.code, ns)
    [([jobs], options)] = literal_calls(b.code, "qcowfast.convert_many")
    assert options["on_error"] == "continue"
    results = ns["results"]
    assert [type(r) for r in results] == [qcowfast.ConvertResult] * len(jobs), results
    for job in jobs:
        job = job if isinstance(job, dict) else dict(zip(("src", "dst"), job))
        if job.get("format", "raw") == "raw":
            assert_same_bytes(Path(job["dst"]).read_bytes(), reference_raw(job["src"]),
                              job["dst"])
            continue
        out = qemu_info(job["dst"])
        assert out["format"] == job["format"]
        assert out["format-specific"]["data"]["compression-type"] == job["compression"]
        assert run("qemu-img", "compare", job["src"], job["dst"]).returncode == 0
        assert run("qemu-img", "check", job["dst"]).returncode == 0


DASK_SCHEDULER = "tcp://scheduler:8786"    # the README's address; a LocalCluster's here
SHARED = "/shared/"                         # the README's shared directory; the test's here


def test_dask_block(workdir):
    import distributed                  # extra `dask` (and `test`): missing fails, never skips
    b = block("python", "qcowfast.dask.convert_many(")
    with distributed.LocalCluster(n_workers=2, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        code = substituted(b.code, {DASK_SCHEDULER: cluster.scheduler_address,
                                    SHARED: f"{workdir}/"})
        ns = {"__name__": "readme"}
        try:
            run_python(b, code, ns)
        finally:
            with contextlib.suppress(ValueError):
                distributed.default_client().close()
    results = ns["results"]
    assert [type(r) for r in results] == [qcowfast.ConvertResult] * len(ns["jobs"]), results
    for src, dst in ns["jobs"]:
        assert_same_bytes(Path(dst).read_bytes(), reference_raw(src), dst)


def test_nbdserver_example(workdir):
    """It serves from background threads until the `with` block ends."""
    code = block("python", "NBDServer(").code
    sizes = []

    def print_and_read(uri):
        """The block's print(s.uri), also reading the export while the block runs."""
        print(uri)
        sizes.append(run("nbdinfo", "--size", uri))

    ns = {"__name__": "readme", "path": "disk.qcow2", "print": print_and_read}
    exec(compile(code, "README.md", "exec"), ns)
    [read] = sizes
    assert read.returncode == 0 and int(read.stdout) == 4 * M, read.stderr
    assert ns["s"].uri.startswith("nbd+unix:///?socket=")
    assert not Path(ns["s"].uri.split("socket=")[1]).exists()        # stopped with the block


# -- command lines --------------------------------------------------------------------------


def command(words: list[str]) -> list[str]:
    """A README command line's words, `qcowfast` being the installed command."""
    assert QCOWFAST.exists(), f"{QCOWFAST} is not installed (pip install -e .)"
    return [str(QCOWFAST), *words[1:]] if words[0] in ("qcowfast", ".venv/bin/qcowfast") \
        else words


def test_setup_command_converts_the_bundled_sample(tmp_path):
    """`.venv/bin/qcowfast convert -p samples/sample.qcow2 sample.raw`: the sample is 8 MiB,
    zlib-compressed; -p prints qemu-img's progress report on standard output."""
    b = block("sh", "samples/sample.qcow2")
    [line] = [part.strip() for part in b.code.split("&&") if "qcowfast convert" in part]
    (tmp_path / "samples").mkdir()
    shutil.copyfile(ROOT / "samples" / "sample.qcow2", tmp_path / "samples" / "sample.qcow2")
    sample = tmp_path / "samples" / "sample.qcow2"
    size, compression = prose(r"the bundled sample image \((\d+) MiB, (\w+)-compressed\)")
    info = qemu_info(sample)
    assert info["virtual-size"] == int(size) * M
    assert info["format-specific"]["data"]["compression-type"] == compression
    assert any(e["data"] and "offset" not in e for e in qemu_map(sample))   # compressed
    proc = subprocess.run(command(shlex.split(line)), cwd=tmp_path, capture_output=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    progress_values(proc.stdout)
    assert_same_bytes((tmp_path / "sample.raw").read_bytes(), reference_raw(sample), "sample.raw")


def test_writing_qcow2_commands(workdir):
    qemu_img("convert", "-O", "raw", "disk.qcow2", "disk.raw")
    b = block("sh", "qcowfast convert -O qcow2 -c")
    lines = b.code.splitlines()
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line, comments=True)
        opts = dict(kv.split("=") for kv in words[words.index("-o") + 1].split(",")) \
            if "-o" in words else {}
        compression = opts.get("compression_type", line.partition("#")[2].strip())
        cluster = {"64k": 65536, None: 65536}[opts.get("cluster_size")]
        assert run(*command(words)).returncode == 0
        info = qemu_info("disk.qcow2")
        assert info["format"] == "qcow2"
        assert (info["cluster-size"], info["format-specific"]["data"]["compression-type"]) == \
            (cluster, compression), words
        assert any(e["data"] and "offset" not in e for e in qemu_map("disk.qcow2"))  # -c
        assert run("qemu-img", "check", "disk.qcow2").returncode == 0
        assert run("qemu-img", "compare", "disk.raw", "disk.qcow2").returncode == 0


class Server:
    """A `qcowfast serve` process; its stderr goes to a file (a --fork daemon keeps it)."""

    def __init__(self, argv, d: Path):
        self.err = d / f"serve-{time.monotonic_ns()}.err"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def uri(self) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r" on (nbd\S+)\n", self.err.read_text())
            if found:
                return found[1]
            if self.proc.poll() not in (None, 0):
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"qcowfast serve did not start: {self.err.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def servers():
    started = []

    def start(argv, d):
        started.append(Server(argv, d))
        return started[-1]

    yield start
    for server in started:
        server.stop()


SERVE_LINES = [shlex.split(line, comments=True)
               for line in block("sh", "qcowfast serve disk.qcow2").code.splitlines()]


@pytest.mark.parametrize("words", [w for w in SERVE_LINES if w[:2] == ["qcowfast", "serve"]],
                         ids=" ".join)
def test_serving_commands(words, workdir, servers):
    port = free_port()
    subs = {SERVE_SOCKET: str(workdir / "disk.sock"), "10809": str(port)}
    argv = command([subs.get(w, w) for w in words])
    server = servers(argv, workdir)
    uri = server.uri()
    name = argv[argv.index("-x") + 1] if "-x" in argv else ""
    if "-k" in argv:
        assert uri == unix_uri(workdir / "disk.sock")
    elif "-p" in argv:
        assert uri == f"nbd://127.0.0.1:{port}/{name}"
    else:                   # "Unix socket in a new private directory"
        sock = Path(uri.split("socket=")[1])
        assert uri == unix_uri(sock, name) and sock.parent != workdir
        assert sock.parent.stat().st_mode & 0o777 == 0o700
    # The block's nbdcopy line reads the -k line's socket; other lines get the same copy.
    copies = [[w.replace(SERVE_SOCKET, subs[SERVE_SOCKET]) for w in c] for c in SERVE_LINES
              if c[0] == "nbdcopy" and any(SERVE_SOCKET in w for w in c)]
    assert len(copies) == 1
    copy = copies[0] if "-k" in argv else ["nbdcopy", uri, "disk.raw"]
    assert run(*copy).returncode == 0, copy
    if "-l" in argv:
        qemu_img("convert", "-O", "raw", "-l", argv[argv.index("-l") + 1], "disk.qcow2",
                 "want.raw")
        want = Path("want.raw").read_bytes()
    else:
        want = reference_raw("disk.qcow2")
    assert_same_bytes(Path(copy[-1]).read_bytes(), want, " ".join(words))
    if "-t" in argv:                        # keep serving
        assert run("nbdinfo", "--size", uri).returncode == 0
        server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    assert not (workdir / "disk.sock").exists()


# -- the synopses: every option is accepted by its command -------------------------------


# An option of a synopsis, with its separator and value word if it has one: `-f FMT`,
# `--output=human|json`, `-c` (a value never starts with "-" or "[").
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?:([ =])([^\s\[\]|-][^\s\[\]]*))?")


def synopses() -> dict[str, list[tuple[str, str, str]]]:
    """{command: [(option, separator, value or "")]} of every `qcowfast COMMAND` synopsis of the
    README's plain blocks, measure's inline one, and `--allow-backing-dir DIR` for each."""
    text = "\n".join(b.code for b in fenced_blocks() if b.lang == "" and
                     b.code.startswith("qcowfast "))
    found: dict = {}
    for entry in re.split(r"\n(?=qcowfast )", text.strip()):
        _, name, rest = entry.split(None, 2)
        found[name] = found.get(name, []) + OPTION.findall(rest)
    found["measure"] = OPTION.findall(prose(r"\*\*`measure`\*\* \(`([^`]*)`\)"))
    assert "Every command takes `--allow-backing-dir DIR`." in TEXT
    return {name: list(dict.fromkeys(opts + [("--allow-backing-dir", " ", "DIR")]))
            for name, opts in found.items()}


# A concrete value for each placeholder (by option where one placeholder means several things).
VALUES = {"FMT": "qcow2", "N": "2", "SIZE": "64k", "CACHE": "writeback", "SNAPSHOT": "s1",
          "OFFSET": "65536", "LENGTH": "1048576", "NAME": "disk0", "TEXT": "a disk",
          "ADDR": "127.0.0.1", "DIR": ".", "PORT": "{port}", "OPTS": "compression_type=zstd",
          "OPTIONS": "cluster_size=64k", "S": "5"}
OPTION_VALUES = {"--target-dir": "out", "--jobs": "jobs.txt", "--report": "report.json",
                 "-k": "disk.sock", "--pid-file": "server.pid", "-B": "b0"}
# Options that take others with them (qemu-img's rules: -c and -o need -O qcow2, ...).
NEEDS = {("convert", "-c"): ["-O", "qcow2"], ("convert", "-o"): ["-O", "qcow2"],
         ("convert", "--compression-level"): ["-O", "qcow2", "-c"],
         ("convert", "--target-is-zero"): ["-n"],
         ("convert-many", "-c"): ["-O", "qcow2"], ("convert-many", "-o"): ["-O", "qcow2"],
         ("measure", "-o"): ["-O", "qcow2"],
         ("serve", "-b"): ["-p", "{port}"], ("serve", "--fork"): ["--pid-file", "server.pid"],
         **{("snapshot", o): ["-l"] for o in ("-f", "-q", "-U", "--allow-backing-dir")}}
# Exit statuses other than 0, as qemu-img exits for the same command line.
STATUS = {("check", "-f", "raw"): 63}


def expanded(value: str) -> list[str]:
    """`raw|qcow2` -> raw, qcow2; placeholders filled in."""
    alt = re.search(r"\w+(?:\|\w+)+", value)
    if alt:
        return [v for choice in alt[0].split("|")
                for v in expanded(value[:alt.start()] + choice + value[alt.end():])]
    return [re.sub(r"\b[A-Z]+\b", lambda m: VALUES[m[0]], value)]


def synopsis_cases() -> list:
    cases = []
    for name, options in synopses().items():
        for option, sep, val in options:
            values = [OPTION_VALUES[option]] if option in OPTION_VALUES and val else \
                expanded(val) if val else [""]
            for v in values:
                words = [option + sep + v] if sep == "=" else [option, v] if v else [option]
                cases.append(pytest.param(name, words, id=f"{name} {' '.join(words)}"))
    return cases


def test_synopses_name_every_command():
    assert sorted(synopses()) == ["check", "compare", "convert", "convert-many", "info", "map",
                                  "measure", "serve", "snapshot"]


def cli_argv(name: str, words: list[str], d: Path) -> list[str]:
    """The command line trying `words`: the options they need, then the files."""
    option = words[0].split("=")[0]
    argv = [name, *words, *NEEDS.get((name, option), [])]
    if name == "convert":
        argv += ["disk.qcow2", "out.img"]
        if "-n" in argv:
            qemu_img("create", "-q", "-f", "raw", "out.img", "4M", cwd=d)
    elif name == "compare":
        argv += ["disk.qcow2", "copy.qcow2"]
    elif name == "convert-many":
        (d / "out").mkdir()
        (d / "jobs.txt").write_text("disk.qcow2 out/disk.img\n")
        argv += [] if option == "--jobs" else ["disk.qcow2"] if option == "--target-dir" \
            else ["--target-dir", "out", "disk.qcow2"]
    elif name == "serve":
        argv += [] if option in ("-k", "-b", "-p") else ["-k", "disk.sock"]
        if option == "-B":                      # (an image with that bitmap)
            qemu_img("create", "-q", "-f", "qcow2", "bm.qcow2", "4M", cwd=d)
            qemu_img("bitmap", "--add", "bm.qcow2", "b0", cwd=d)
        argv += ["bm.qcow2" if option == "-B" else "disk.qcow2"]
    elif not (name == "measure" and option == "--size"):
        argv += ["disk.qcow2"]
    return argv


@pytest.mark.parametrize("name, words", synopsis_cases())
def test_synopsis_option_is_accepted(name, words, workdir, capsys, servers):
    port = str(free_port())
    argv = [w.replace("{port}", port) for w in cli_argv(name, words, workdir)]
    want = STATUS.get((name, *words), 0)
    if name != "serve":
        status, out, err = cli_in_process(capsys, *argv)
        assert "unrecognized" not in err and "usage:" not in err, err
        assert status == want, (argv, out, err)
        if want:
            assert run("qemu-img", *argv).returncode == want
        return
    server = servers(command(["qcowfast", *argv]), workdir)
    uri = server.uri()
    if "--pid-file" in argv and "--fork" not in argv:     # written before the URI line
        assert int((workdir / "server.pid").read_text()) == server.proc.pid
    assert run("nbdinfo", "--size", uri).returncode == 0
    if "--fork" in argv:                      # the command has ended; its daemon serves
        assert server.proc.wait(TIMEOUT) == 0
        pid_file = workdir / "server.pid"
        deadline = time.monotonic() + TIMEOUT
        while pid_file.exists() and time.monotonic() < deadline:   # leaves after the client
            time.sleep(0.02)
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            pytest.fail("the --fork daemon kept serving after its last client left")
        return
    if "-t" in argv:
        server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0, server.err.read_text()


# -- messages the prose quotes ---------------------------------------------------------------


def messages(argv, d: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(qcowfast, qemu-img) run with the same command line in `d`."""
    return run(*command(["qcowfast", *argv]), cwd=d), run("qemu-img", *argv, cwd=d)


def test_usage_errors_print_qemu_img_lines(workdir):
    """`unrecognized option '-t'`, `Expecting one image file name`, then `Try 'qcowfast
    --help' for more information`."""
    quoted = prose(r"\(`(unrecognized option '-t')`, `(Expecting one image file name)`, then "
                   r"`(Try 'qcowfast --help' for more information)`;")
    for argv, first in ((["info", "-t", "disk.qcow2"], quoted[0]), (["info"], quoted[1])):
        ours, qemu = messages(argv, workdir)
        assert ours.stderr == f"qcowfast: {first}\n{quoted[2]}\n", ours.stderr
        assert qemu.stderr == ours.stderr.replace("qcowfast", "qemu-img")
        assert ours.returncode == qemu.returncode == 1


def test_a_missing_backing_file_is_named_as_qemu_img_names_it(tmp_path):
    quoted = prose(r"the image you named first \(`(Could not open 'top\.qcow2': [^`]*)`\)")
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             "1M", cwd=tmp_path)
    (tmp_path / "base.qcow2").unlink()
    ours, qemu = messages(["convert", "top.qcow2", "out.raw"], tmp_path)
    assert (ours.returncode, ours.stderr) == (1, f"qcowfast: {quoted}\n")
    assert (qemu.returncode, qemu.stderr) == (1, f"qemu-img: {quoted}\n")


def test_foreign_formats_are_refused_by_name(tmp_path):
    quoted = prose(r"\(`(d\.vmdk is a VMDK image; qcowfast reads qcow2 and raw)`\)")
    qemu_img("create", "-q", "-f", "vmdk", "d.vmdk", "1M", cwd=tmp_path)
    ours = run(*command(["qcowfast", "info", "d.vmdk"]), cwd=tmp_path)
    assert (ours.returncode, ours.stderr) == (1, f"qcowfast: {quoted}\n")


def test_option_grammar_examples(workdir):
    """`-f=raw` names format `=raw`, `-l -snap` takes `-snap`, `-pq` combines, `--force` is
    `--force-share`: as qemu-img reads them."""
    grammar = prose(r"\*\*Option grammar\*\*: (.*?) qcowfast's own long options")
    for example in ("`-f=raw` names format `=raw`", "(`-l -snap`)", "(`-pq`)",
                    "(`--force` is `--force-share`)"):
        assert example in grammar
    ours, qemu = messages(["info", "-f=raw", "disk.qcow2"], workdir)
    assert ours.returncode == qemu.returncode == 1
    assert "'=raw'" in ours.stderr and "'=raw'" in qemu.stderr
    ours, qemu = messages(["convert", "-l", "-snap", "disk.qcow2", "o.raw"], workdir)
    assert ours.returncode == qemu.returncode == 1
    assert ours.stderr == qemu.stderr.replace("qemu-img", "qcowfast"), (ours.stderr, qemu.stderr)
    ours, qemu = messages(["convert", "-pq", "disk.qcow2", "o.raw"], workdir)
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, "", "")
    assert (qemu.returncode, qemu.stdout, qemu.stderr) == (0, "", "")
    ours, qemu = messages(["info", "--force", "--output=json", "disk.qcow2"], workdir)
    assert ours.returncode == qemu.returncode == 0
    assert json.loads(ours.stdout) == json.loads(qemu.stdout)
