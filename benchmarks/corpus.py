"""Build the benchmark corpus: one deterministic raw disk and its qcow2 variants.

The raw disk mixes the kinds of content a real disk holds, in runs of varied byte lengths that
straddle cluster boundaries:

- ``zero``: runs of zeros; runs of 64 KiB or more are left as holes in the raw file;
- ``text``: log lines built from a Zipf-distributed vocabulary;
- ``records``: fixed-size binary records (counters, timestamps, enums, names, some noise);
- ``skewed``: bytes with a skewed value distribution, like machine code;
- ``repeat``: a small block tiled over the run with a few percent of bytes replaced by noise;
- ``random``: incompressible bytes.

``qemu-img`` then turns it into the qcow2 variants listed in ``VARIANTS``. Everything is built
once into ``$QCOWFAST_BENCH_DIR/v<CORPUS_VERSION>-<size>`` (default root ``/tmp/qcowfast-bench``)
and reused while ``manifest.json`` is there; the manifest also holds, for every variant, the
SHA-256 of ``qemu-img convert -O raw`` of it (the reference the benchmarks check against).

Run as a script::

    python benchmarks/corpus.py --size 1G               # build or reuse the cached corpus
    python benchmarks/corpus.py --size 64M --out DIR    # build into DIR
    python benchmarks/corpus.py --size 1G --raw-only --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: Bump whenever the generator or the variant recipes change: the cache directory is keyed on it.
CORPUS_VERSION = 1
SEED = 0x51C0F457
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

DEFAULT_SIZE = "1G"
DEFAULT_ROOT = "/tmp/qcowfast-bench"
ENV_SIZE = "QCOWFAST_BENCH_SIZE"
ENV_ROOT = "QCOWFAST_BENCH_DIR"

RAW_NAME = "raw-src"
#: Zero runs at least this long are left as holes in the raw file; shorter ones are written.
HOLE_MIN = 64 * KiB
#: Share of the virtual size taken by each kind of content.
BYTE_SHARE = {"zero": 0.25, "text": 0.25, "records": 0.15, "skewed": 0.10,
              "repeat": 0.10, "random": 0.15}
KINDS = tuple(BYTE_SHARE)
#: The overlay rewrites about this share of the clusters of its backing image.
OVERLAY_SHARE = 0.10


@dataclasses.dataclass(frozen=True)
class Variant:
    """One image of the corpus and the ``qemu-img convert`` options that make it from raw."""

    name: str
    convert_opts: tuple[str, ...] = ()
    cluster_size: int = 64 * KiB
    compression_type: str = "zlib"
    compat: str = "1.1"
    extended_l2: bool = False
    backing: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.raw" if self.name == RAW_NAME else f"{self.name}.qcow2"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(RAW_NAME),
    Variant("u64k"),
    Variant("zlib64k", ("-c",)),
    Variant("zlib4k", ("-c", "-o", "cluster_size=4096"), cluster_size=4 * KiB),
    Variant("zlib2m", ("-c", "-o", "cluster_size=2M"), cluster_size=2 * MiB),
    Variant("zstd64k", ("-c", "-o", "compression_type=zstd"), compression_type="zstd"),
    Variant("extl2-zlib64k", ("-c", "-o", "extended_l2=on"), extended_l2=True),
    Variant("v2-zlib64k", ("-c", "-o", "compat=0.10"), compat="0.10"),
    # Built by ``_build_overlay``: a qcow2 over u64k, backing named relatively.
    Variant("overlay", backing="u64k"),
)}
#: The qcow2 images the benchmarks convert.
BENCH_VARIANTS = tuple(name for name in VARIANTS if name != RAW_NAME)


class CorpusError(RuntimeError):
    """The corpus could not be built, or a built image failed validation."""


# --------------------------------------------------------------------------- sizes and paths

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Return the byte count of ``"64M"``, ``"1G"``, ``"1GiB"`` or a plain integer."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"cannot parse size {text!r} (use e.g. 64M, 1G)")
        size = int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))
    if size < 4 * MiB or size % MiB:
        raise ValueError(f"corpus size must be a multiple of 1 MiB and >= 4 MiB, got {size}")
    return size


def format_size(size: int) -> str:
    """Return the shortest exact ``<n><unit>`` label for ``size``, e.g. ``1G`` or ``96M``."""
    for unit, factor in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def default_size() -> int:
    return parse_size(os.environ.get(ENV_SIZE, DEFAULT_SIZE))


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT, DEFAULT_ROOT))


def corpus_dir(size: int, root: Path | None = None) -> Path:
    """Return the cache directory for a corpus of ``size`` bytes: ``<root>/v<version>-<size>``."""
    return (root or default_root()) / f"v{CORPUS_VERSION}-{format_size(size)}"


# --------------------------------------------------------------------------- digests

def file_digest(path: str | os.PathLike, chunk: int = 8 * MiB) -> str:
    """Return the SHA-256 of a file's bytes, holes read as zeros."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def first_difference(a: str | os.PathLike, b: str | os.PathLike,
                     chunk: int = 8 * MiB) -> int | None:
    """Return the first byte offset where two files differ (a size difference counts), or None."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                n = min(len(ca), len(cb))
                diff = np.flatnonzero(np.frombuffer(ca[:n], np.uint8)
                                      != np.frombuffer(cb[:n], np.uint8))
                return offset + (int(diff[0]) if diff.size else n)
            if not ca:
                return None
            offset += len(ca)


# --------------------------------------------------------------------------- content pools

def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64([SEED, *key]))


def _text_pool(nbytes: int) -> np.ndarray:
    """Return ``nbytes`` of syslog-like lines drawn from a Zipf-distributed vocabulary."""
    rng = _rng(1)
    syllables = ("ka", "lo", "ri", "ten", "mor", "sa", "vi", "dex", "pra", "ul", "on", "che",
                 "ba", "nu", "ster", "qua", "fi", "gel", "im", "zo", "ran", "te", "wi", "cor",
                 "ex", "pol", "de", "ma", "sync", "io", "net", "buf", "ack", "map", "re", "in")
    words = sorted({"".join(rng.choice(syllables, rng.integers(1, 4)))
                    for _ in range(5000)})
    words = np.array(words, dtype=object)[rng.permutation(len(words))]
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    zipf /= zipf.sum()
    hosts = [f"node{n:02d}" for n in range(24)]
    services = ("kernel", "systemd", "sshd", "cron", "nginx", "postgres", "dockerd", "kubelet",
                "chronyd", "auditd", "rsyslogd", "containerd", "NetworkManager", "smartd")
    levels = ("INFO", "INFO", "INFO", "INFO", "DEBUG", "DEBUG", "NOTICE", "WARN", "ERROR")
    keys = ("id", "pid", "uid", "len", "offset", "status", "duration_ms", "retries", "bytes",
            "conn", "seq", "latency_us", "queue", "slot")

    lines: list[str] = []
    total = 0
    t = 1_700_000_000_000  # ms since the epoch
    while total < nbytes:
        n = 4096
        dt = rng.geometric(0.02, n)
        nwords = rng.integers(3, 16, n)
        word_ids = rng.choice(len(words), int(nwords.sum()), p=zipf)
        host, svc, lvl = (rng.integers(0, len(x), n) for x in (hosts, services, levels))
        pid = rng.integers(1, 65536, n)
        nkv = rng.integers(0, 4, n)
        kv_key = rng.integers(0, len(keys), int(nkv.sum()))
        kv_val = rng.geometric(0.0005, int(nkv.sum()))
        kv_hex = rng.random(int(nkv.sum())) < 0.2
        w = k = 0
        for i in range(n):
            t += int(dt[i])
            s, ms = divmod(t, 1000)
            tm = time.gmtime(s)
            msg = " ".join(words[word_ids[w:w + nwords[i]]])
            w += nwords[i]
            kv = " ".join(f"{keys[kv_key[j]]}={kv_val[j]:#x}" if kv_hex[j]
                          else f"{keys[kv_key[j]]}={kv_val[j]}" for j in range(k, k + nkv[i]))
            k += nkv[i]
            line = (f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T{tm.tm_hour:02d}:"
                    f"{tm.tm_min:02d}:{tm.tm_sec:02d}.{ms:03d}Z {hosts[host[i]]} "
                    f"{services[svc[i]]}[{pid[i]}]: {levels[lvl[i]]} {msg}"
                    f"{' ' if kv else ''}{kv}\n")
            lines.append(line)
            total += len(line)
    return np.frombuffer("".join(lines).encode("ascii"), np.uint8)[:nbytes].copy()


_RECORD = np.dtype([("id", "<u8"), ("time", "<u4"), ("kind", "<u2"), ("flags", "<u2"),
                    ("value", "<f4"), ("count", "<u4"), ("name", "S16"), ("check", "<u4"),
                    ("pad", "V20")])
assert _RECORD.itemsize == 64


def _records_pool(nbytes: int) -> np.ndarray:
    """Return ``nbytes`` of 64-byte records: a database page or a binary log."""
    rng = _rng(2)
    n = -(-nbytes // _RECORD.itemsize)
    rec = np.zeros(n, _RECORD)
    rec["id"] = np.arange(n, dtype=np.uint64) + 10_000_000
    rec["time"] = 1_700_000_000 + np.cumsum(rng.geometric(0.3, n), dtype=np.uint64)
    rec["kind"] = np.minimum(rng.geometric(0.35, n), 12)
    rec["flags"] = rng.integers(0, 4, n) << 4
    rec["value"] = np.round(rng.normal(100.0, 15.0, n), 2)
    rec["count"] = rng.poisson(3, n)
    names = np.array([f"sensor-{i:03d}".encode() for i in range(40)], dtype="S16")
    rec["name"] = names[rng.zipf(1.6, n) % len(names)]
    rec["check"] = rng.integers(0, 1 << 32, n, dtype=np.uint32)
    return rec.view(np.uint8)[:nbytes].copy()


def _skewed_pool(nbytes: int) -> np.ndarray:
    """Return ``nbytes`` of bytes whose values follow a skewed law, like machine code."""
    rng = _rng(3)
    p = 1.0 / np.arange(1, 257) ** 1.15
    values = np.concatenate([[0x00, 0xFF, 0x48, 0x89, 0x8B], rng.permutation(
        np.setdiff1d(np.arange(256), [0x00, 0xFF, 0x48, 0x89, 0x8B]))]).astype(np.uint8)
    # A 64 Ki-entry lookup table turns uniform 16-bit draws into the skewed law quickly.
    bounds = np.cumsum(p) / p.sum() * 65536
    lut = values[np.minimum(np.searchsorted(bounds, np.arange(65536) + 0.5), 255)]
    return lut[rng.integers(0, 65536, nbytes, dtype=np.uint16)]


# --------------------------------------------------------------------------- layout and content

def _length_range(kind: str, size: int) -> tuple[int, int]:
    if kind == "zero":
        return 64, min(max(size // 32, 256 * KiB), 64 * MiB)
    return 128, min(max(size // 128, 64 * KiB), 8 * MiB)


def plan_segments(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(kinds, lengths)``: the run layout, covering exactly ``size`` bytes.

    Run lengths are log-uniform at byte granularity, so runs rarely line up with clusters.
    """
    rng = _rng(0)
    ranges = np.array([_length_range(k, size) for k in KINDS], dtype=np.float64)
    lo, hi = ranges[:, 0], ranges[:, 1]
    mean_len = (hi - lo) / np.log(hi / lo)  # mean of a log-uniform law
    p = np.array([BYTE_SHARE[k] for k in KINDS]) / mean_len
    p /= p.sum()
    kinds_out, lens_out, total = [], [], 0
    while total < size:
        n = int(size / float(p @ mean_len) * 1.2) + 64
        kinds = rng.choice(len(KINDS), n, p=p)
        lens = np.exp(rng.uniform(np.log(lo[kinds]), np.log(hi[kinds]))).astype(np.int64)
        kinds_out.append(kinds)
        lens_out.append(lens)
        total += int(lens.sum())
    kinds = np.concatenate(kinds_out)
    lens = np.concatenate(lens_out)
    ends = np.cumsum(lens)
    last = int(np.searchsorted(ends, size))
    kinds, lens = kinds[:last + 1], lens[:last + 1].copy()
    lens[-1] -= int(ends[last]) - size
    return kinds, lens


class _Generator:
    """Fill runs of each kind; a run's bytes depend only on the seed and its index."""

    def __init__(self, size: int):
        pool = min(max(size // 32, 4 * MiB), 32 * MiB)
        pool = max(pool, 2 * _length_range("text", size)[1])
        self.pools = {"text": _text_pool(pool), "records": _records_pool(pool),
                      "skewed": _skewed_pool(pool)}

    def run(self, kind: str, index: int, n: int) -> np.ndarray | None:
        """Return the ``n`` bytes of run ``index``; None for zeros."""
        if kind == "zero":
            return None
        rng = _rng(100, index)
        if kind == "random":
            return rng.integers(0, 256, n, dtype=np.uint8)
        if kind == "repeat":
            src = self.pools["records" if index % 2 else "skewed"]
            block = int(rng.choice([512, 1024, 1536, 4096, 8192]))
            start = int(rng.integers(0, src.size - block))
            out = np.resize(src[start:start + block], n)
            noise = rng.integers(0, n, int(n * rng.uniform(0.005, 0.03)))
            out[noise] = rng.integers(0, 256, noise.size, dtype=np.uint8)
            return out
        src = self.pools[kind]
        start = int(rng.integers(0, src.size - n + 1))
        return src[start:start + n]


def write_raw(path: str | os.PathLike, size: int, *, log=None) -> dict:
    """Write the raw corpus disk to ``path``; return per-kind byte counts."""
    t0 = time.perf_counter()
    kinds, lens = plan_segments(size)
    gen = _Generator(size)
    if log:
        log(f"  {len(lens)} runs; pools ready in {time.perf_counter() - t0:.1f} s")
    counts = dict.fromkeys(KINDS, 0)
    buf = np.zeros(32 * MiB, np.uint8)
    fill = 0          # bytes staged in buf
    buf_off = 0       # file offset of buf[0]
    offset = 0        # file offset of the next run
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def flush():
            view = memoryview(buf)[:fill]
            while view:
                done = os.pwrite(fd, view, buf_off + (fill - len(view)))
                view = view[done:]

        for index, (k, n) in enumerate(zip(kinds.tolist(), lens.tolist())):
            kind = KINDS[k]
            counts[kind] += n
            if kind == "zero" and n >= HOLE_MIN:
                flush()
                offset += n
                buf_off, fill = offset, 0
                continue
            data = gen.run(kind, index, n)
            pos = 0
            while pos < n:
                take = min(n - pos, buf.size - fill)
                if data is None:
                    buf[fill:fill + take] = 0
                else:
                    buf[fill:fill + take] = data[pos:pos + take]
                fill += take
                pos += take
                if fill == buf.size:
                    flush()
                    buf_off, fill = buf_off + buf.size, 0
            offset += n
        flush()
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    if log:
        log(f"  raw written in {time.perf_counter() - t0:.1f} s")
    return counts


# --------------------------------------------------------------------------- qemu-img variants

def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise CorpusError(f"{argv[0]} is required to build the benchmark corpus") from exc
    if proc.returncode:
        raise CorpusError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def qemu_img_version() -> str:
    out = _run(["qemu-img", "--version"])
    return out.splitlines()[0].split()[2]


def overlay_commands(size: int, cluster: int = 64 * KiB) -> list[str]:
    """Return ``qemu-io`` commands that rewrite about ``OVERLAY_SHARE`` of the clusters.

    Most writes cover whole clusters; some start or end inside a cluster (so the overlay holds
    clusters merged from old and new bytes); one in ten writes zeros (zero clusters over data).
    """
    rng = _rng(4)
    nclusters = size // cluster
    target = max(1, int(nclusters * OVERLAY_SHARE))
    cmds, covered = [], 0
    while covered < target:
        run = int(rng.integers(1, 9))
        start = int(rng.integers(0, nclusters - run + 1)) * cluster
        length = run * cluster
        shape = rng.random()
        if shape >= 0.7:
            head = int(rng.integers(0, cluster // 512)) * 512
            tail = int(rng.integers(0, cluster // 512)) * 512
            start, length = start + head, max(512, length - head - tail)
        if rng.random() < 0.1:
            cmds.append(f"write -z {start} {length}")
        else:
            cmds.append(f"write -P {int(rng.integers(1, 256)):#04x} {start} {length}")
        covered += run
    return cmds


def _build_overlay(directory: Path, variant: Variant, size: int) -> None:
    backing = VARIANTS[variant.backing].filename
    tmp = f"{variant.filename}.tmp"
    # Run in the directory and name the backing file relatively: the image records it that way.
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", tmp],
         cwd=directory)
    argv = ["qemu-io", "-f", "qcow2", tmp]
    for cmd in overlay_commands(size):
        argv += ["-c", cmd]
    _run(argv, cwd=directory)
    os.replace(directory / tmp, directory / variant.filename)


def _validate(directory: Path, variant: Variant, size: int) -> dict:
    path = directory / variant.filename
    _run(["qemu-img", "check", "-q", str(path)])
    info = json.loads(_run(["qemu-img", "info", "--output=json", str(path)]))
    data = info["format-specific"]["data"]
    got = {"virtual-size": info["virtual-size"], "cluster-size": info["cluster-size"],
           "compat": data["compat"], "compression-type": data.get("compression-type", "zlib"),
           "extended-l2": data.get("extended-l2", False),
           "backing-filename": info.get("backing-filename")}
    want = {"virtual-size": size, "cluster-size": variant.cluster_size, "compat": variant.compat,
            "compression-type": variant.compression_type, "extended-l2": variant.extended_l2,
            "backing-filename": VARIANTS[variant.backing].filename if variant.backing else None}
    if got != want:
        raise CorpusError(f"{path}: qemu-img info gives {got}, expected {want}")
    return info


def reference_digest(path: Path, scratch: Path) -> str:
    """Return the SHA-256 of ``qemu-img convert -O raw`` of ``path``."""
    try:
        _run(["qemu-img", "convert", "-O", "raw", str(path), str(scratch)])
        return file_digest(scratch)
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


def build(directory: str | os.PathLike, size: int, *, raw_only: bool = False,
          log=print) -> dict:
    """Build the corpus into ``directory`` (replacing what is there); return its manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    log(f"building {format_size(size)} corpus v{CORPUS_VERSION} in {directory}")
    raw = directory / VARIANTS[RAW_NAME].filename
    tmp = raw.with_name(raw.name + ".tmp")
    counts = write_raw(tmp, size, log=log)
    os.replace(tmp, raw)
    manifest = {"corpus_version": CORPUS_VERSION, "seed": SEED, "size": size,
                "kinds": counts, "variants": {}}
    if raw_only:
        return manifest
    manifest["qemu_img_version"] = qemu_img_version()
    for variant in VARIANTS.values():
        if variant.name == RAW_NAME:
            continue
        t = time.perf_counter()
        if variant.backing:
            _build_overlay(directory, variant, size)
        else:
            tmp = directory / f"{variant.filename}.tmp"
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *variant.convert_opts,
                  str(raw), str(tmp)])
            os.replace(tmp, directory / variant.filename)
        _validate(directory, variant, size)
        log(f"  {variant.name:14} built in {time.perf_counter() - t:5.1f} s")
    raw_digest = file_digest(raw)
    for variant in VARIANTS.values():
        path = directory / variant.filename
        st = path.stat()
        if variant.name == RAW_NAME:
            digest = raw_digest
        else:
            digest = reference_digest(path, directory / "reference.tmp.raw")
            if not variant.backing and digest != raw_digest:
                raise CorpusError(f"qemu-img convert of {path} does not give back {raw}")
        manifest["variants"][variant.name] = {
            "file": variant.filename, "file_bytes": st.st_size,
            "allocated_bytes": st.st_blocks * 512, "reference_sha256": digest}
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / "manifest.json")
    log(f"corpus built in {manifest['build_seconds']} s")
    return manifest


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A built corpus: its directory and manifest."""

    directory: Path
    manifest: dict

    @property
    def size(self) -> int:
        return self.manifest["size"]

    def path(self, variant: str) -> Path:
        return self.directory / self.manifest["variants"][variant]["file"]

    def reference_digest(self, variant: str) -> str:
        return self.manifest["variants"][variant]["reference_sha256"]

    def file_bytes(self, variant: str) -> int:
        return self.manifest["variants"][variant]["file_bytes"]


def _load(directory: Path, size: int) -> Corpus | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if (manifest.get("corpus_version") != CORPUS_VERSION or manifest.get("size") != size
            or set(manifest.get("variants", ())) != set(VARIANTS)):
        return None
    for entry in manifest["variants"].values():
        try:
            if (directory / entry["file"]).stat().st_size != entry["file_bytes"]:
                return None
        except FileNotFoundError:
            return None
    return Corpus(directory, manifest)


def ensure_corpus(size: int | str | None = None, root: str | os.PathLike | None = None,
                  *, log=print) -> Corpus:
    """Return the cached corpus of ``size`` under ``root``, building it first if needed."""
    size = default_size() if size is None else parse_size(size)
    directory = corpus_dir(size, Path(root) if root else None)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        corpus = _load(directory, size)
        if corpus is None:
            if directory.exists():
                shutil.rmtree(directory)
            build(directory, size, log=log)
            corpus = _load(directory, size)
            if corpus is None:
                raise CorpusError(f"{directory}: manifest missing or stale right after build")
    return corpus


BIG_NAME = "u4g"
BIG_SIZE = 4 * GiB
#: Uncompressed images built on first use beside the cached corpus (no corpus rebuild).
EXTRA_VARIANTS = {
    "v2-u64k": ("-o", "compat=0.10"),
    "extl2-u128k": ("-o", "extended_l2=on,cluster_size=128k"),
}


def ensure_extra(corpus: Corpus, name: str, *, log=print) -> tuple[Path, str]:
    """Return (path, reference SHA-256) of an EXTRA_VARIANTS image, building it once.

    They are ``qemu-img convert`` of the raw disk, so the reference is the raw disk's digest.
    """
    path = corpus.directory / f"{name}.qcow2"
    digest = corpus.reference_digest(RAW_NAME)
    with open(corpus.directory.parent / f".{corpus.directory.name}-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            t0 = time.perf_counter()
            tmp = corpus.directory / f"{name}.qcow2.tmp"
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *EXTRA_VARIANTS[name],
                  str(corpus.path(RAW_NAME)), str(tmp)])
            _run(["qemu-img", "check", "-q", str(tmp)])
            os.replace(tmp, path)
            log(f"  {name} built in {time.perf_counter() - t0:.1f} s")
    return path, digest


def ensure_big(corpus: Corpus, *, log=print) -> tuple[Path, str]:
    """Return (path, reference SHA-256) of a 4 GiB uncompressed qcow2 built from the corpus.

    The first half of the raw disk is placed at each GiB of a sparse 4 GiB file (2 GiB of data,
    2 GiB of holes), copied in the kernel, then converted by qemu-img; built once and cached
    beside the corpus (``u4g.json`` holds its digest).
    """
    path = corpus.directory / f"{BIG_NAME}.qcow2"
    meta = corpus.directory / f"{BIG_NAME}.json"
    with open(corpus.directory.parent / f".{corpus.directory.name}-{BIG_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            info = json.loads(meta.read_text())
            if path.stat().st_size == info["file_bytes"]:
                return path, info["reference_sha256"]
        except (FileNotFoundError, ValueError, KeyError):
            pass
        t0 = time.perf_counter()
        raw = corpus.directory / f"{BIG_NAME}.raw.tmp"
        src = corpus.path(RAW_NAME)
        half = min(corpus.size // 2, GiB)
        with open(src, "rb") as fi, open(raw, "wb") as fo:
            fo.truncate(BIG_SIZE)
            for base in range(0, BIG_SIZE, GiB):
                done = 0
                while done < half:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), half - done, done,
                                           base + done)
                    if n <= 0:
                        raise CorpusError(f"copying {src} into {raw} stopped at {done}")
                    done += n
        tmp = corpus.directory / f"{BIG_NAME}.qcow2.tmp"
        try:
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
            digest = file_digest(raw)
        finally:
            raw.unlink(missing_ok=True)
        os.replace(tmp, path)
        meta.write_text(json.dumps({"file_bytes": path.stat().st_size, "virtual_size": BIG_SIZE,
                                    "reference_sha256": digest}) + "\n")
        log(f"  {BIG_NAME} built in {time.perf_counter() - t0:.1f} s")
        return path, digest


def output_fs(path: Path) -> str:
    """Return "tmpfs" or the file system type holding ``path`` (from /proc/mounts)."""
    best, fstype = "", "?"
    target = str(Path(path).resolve())
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount, kind = fields[1], fields[2]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype


def describe(corpus: Corpus) -> str:
    """Return a small table of the variants: file size and share of the raw allocated bytes."""
    raw_alloc = corpus.manifest["variants"][RAW_NAME]["allocated_bytes"]
    rows = [f"corpus {corpus.directory} (virtual {format_size(corpus.size)}, "
            f"raw allocated {raw_alloc / MiB:.1f} MiB)",
            f"{'variant':14} {'file MiB':>9} {'alloc MiB':>9} {'% raw alloc':>11}"]
    for name, entry in corpus.manifest["variants"].items():
        rows.append(f"{name:14} {entry['file_bytes'] / MiB:9.1f} "
                    f"{entry['allocated_bytes'] / MiB:9.1f} "
                    f"{100 * entry['allocated_bytes'] / raw_alloc:10.1f}%")
    kinds = corpus.manifest["kinds"]
    rows.append("content: " + ", ".join(f"{k} {100 * v / corpus.size:.0f}%"
                                        for k, v in kinds.items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=os.environ.get(ENV_SIZE, DEFAULT_SIZE),
                        help=f"virtual size, e.g. 64M or 1G (default ${ENV_SIZE} or "
                             f"{DEFAULT_SIZE})")
    parser.add_argument("--out", type=Path,
                        help="build into this directory (default: the cache, "
                             f"${ENV_ROOT}/v{CORPUS_VERSION}-<size>, reused when complete)")
    parser.add_argument("--raw-only", action="store_true", help="only write the raw disk")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.out is None:
        if args.raw_only:
            parser.error("--raw-only needs --out")
        corpus = ensure_corpus(size)
    else:
        manifest = build(args.out, size, raw_only=args.raw_only)
        if args.raw_only:
            return 0
        corpus = Corpus(args.out, manifest)
    print(describe(corpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
