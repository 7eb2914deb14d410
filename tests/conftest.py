"""Session fixtures: the QEMU tool check and the catalogue of test images.

Every image the tests read is built once per session by QEMU's own tools (``qemu-img create``,
``qemu-img convert [-c]``, ``qemu-io -c "write ..."``) from seeded, deterministic content, so
the oracles in ``tests/common.py`` (``qemu-img convert -O raw``, ``qemu-img map``, ``qemu-img
info``) judge qcowfast against bytes and tables that qcowfast had no part in making.

The catalogue
-------------
``CATALOGUE`` maps a readable image id to a :class:`Recipe`. Ids read as
``c<cluster>-<features>``, e.g. ``c64k-v3-zlib``, ``c512-v2``, ``c4k-chain3-short-base``; the id's
first word is the cluster size of the top image. Each recipe carries feature ``tags`` (checked
against ``qemu-img info`` / ``map`` when built, so they cannot drift from the truth):

=================  ================================================================
tag                meaning
=================  ================================================================
``c512`` ...       cluster size of the top image (``c512``, ``c4k``, ``c16k``, ``c32k``,
                   ``c64k``, ``c2m``)
``v2`` / ``v3``    compat=0.10 / compat=1.1 of the top image
``compressed``     some layer holds compressed clusters (``zlib`` / ``zstd``: their type)
``extl2``          some layer uses extended L2 entries (subclusters)
``zero``           some layer holds zero clusters/subclusters (``write -z``, discard)
``zero-alloc``     some zero cluster keeps its host allocation (map shows an offset)
``discard``        built with ``qemu-io discard``
``backing``        has a backing chain (``chain3``: three layers)
``raw-backing``    a layer of the chain is a raw file (``-F raw``)
``short-base``     a backing layer is shorter than the image above it
``long-base``      a backing layer is longer than the image above it
``odd-size``       virtual size is not a multiple of the cluster size
``snapshot``       has internal snapshots
``prealloc``       ``qemu-img map`` reports some data as zero too: QEMU took the image for
                   metadata-preallocated and looked into the file's holes
=================  ================================================================

Using it from a test file
-------------------------
``image``
    Function fixture, parametrized over every id (the test id is the image id). It returns a
    :class:`BuiltImage`: ``.path`` (top file), ``.virtual_size``, ``.cluster_size``, ``.chain``
    (one :class:`Layer` per depth, top first) and ``.tags``::

        def test_something(image):
            with qcowfast.open(image.path) as img: ...

``@pytest.mark.images(*tags, exclude=(), ids=None)``
    Restricts ``image`` to the ids having all *tags*, none of *exclude*, and (if given) only
    *ids*. An empty selection is an error, never a silent skip::

        @pytest.mark.images("compressed", exclude=("backing",))
        def test_only_compressed(image): ...

``images``
    Session fixture, the :class:`ImageFactory`. ``images.get("c64k-v3-zlib")`` builds (once)
    and returns one image; ``images.ids("v2")`` lists ids by tag; ``images.copy(id, dest_dir)``
    copies a whole chain (relative backing names intact) for tests that mutate files, such as
    corruption tests.

``IMAGE_IDS`` is the list of all ids, in catalogue order.

Images are built lazily, each in its own directory ``<session tmp>/images/<id>/``. Backing
files are named with plain relative names and live in that same directory, which is the only
kind of backing reference qcowfast follows.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pytest

from common import missing_qemu_tools, qemu_img, qemu_io, qemu_map

K = 1024
M = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Built images


@dataclass(frozen=True)
class Layer:
    """One file of a built chain, as ``qemu-img info --backing-chain`` describes it."""

    path: Path
    fmt: str                   # "qcow2" or "raw"
    virtual_size: int          # as qemu-img reports it (raw files are rounded up to 512)
    cluster_size: int | None   # None for raw files
    compat: str | None         # "0.10" or "1.1"; None for raw files
    compression: str | None    # "zlib" or "zstd" (v2 images: "zlib"); None for raw files
    extl2: bool                # extended L2 entries (subclusters)
    backing_name: str | None   # the backing file name stored in the header, or None


@dataclass(frozen=True)
class BuiltImage:
    """An image of the catalogue, built on disk."""

    id: str
    tags: frozenset[str]
    description: str
    chain: tuple[Layer, ...]   # chain[d] is the layer at depth d; chain[0] is the image itself

    @property
    def path(self) -> Path:
        return self.chain[0].path

    @property
    def virtual_size(self) -> int:
        return self.chain[0].virtual_size

    @property
    def cluster_size(self) -> int:
        return self.chain[0].cluster_size

    def copy_to(self, dest_dir: Path) -> BuiltImage:
        """Copy every file of the chain into *dest_dir* and return the copy's description.

        The copies are dense (file holes are filled), which can change what ``qemu-img map``
        reports for ``prealloc`` images; the guest bytes are the same.
        """
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        layers = []
        for layer in self.chain:
            target = dest_dir / layer.path.name
            shutil.copyfile(layer.path, target)
            layers.append(replace(layer, path=target))
        return replace(self, chain=tuple(layers))


# --------------------------------------------------------------------------------------------
# Content and the workbench the recipes use

_WORDS = (b"qcow2 cluster sector backing l1 l2 refcount header snapshot the of and to in a "
          b"is data zero compressed guest host offset table entry image disk file block "
          b"QEMU_IMG 0x5a 42 1024 \n \n\t").split(b" ")


def mixed_content(rng: random.Random, size: int, cluster_size: int) -> bytes:
    """Return *size* bytes of runs of zeros, text, random bytes, repeated patterns and fills.

    Run lengths range from a few bytes to several clusters and ignore alignment, so runs
    straddle sector and cluster boundaries, and long zero runs leave whole clusters empty.
    """
    out = bytearray()
    while len(out) < size:
        kind = rng.choice(("zeros", "zeros", "text", "text", "random", "pattern", "fill"))
        if kind == "zeros" or rng.random() < 0.3:
            n = rng.randint(cluster_size, 3 * cluster_size) + rng.choice((0, rng.randint(1, 4095)))
        else:
            n = rng.choice((rng.randint(1, 600), rng.randint(1, cluster_size),
                            rng.randint(cluster_size // 2, 2 * cluster_size)))
        n = min(n, max(1, size // 3))
        if kind == "zeros":
            chunk = bytes(n)
        elif kind == "text":
            chunk = b" ".join(rng.choices(_WORDS, k=n // 4 + 1))[:n]
        elif kind == "random":
            chunk = rng.randbytes(n)
        elif kind == "pattern":
            pat = rng.randbytes(rng.randint(2, 24))
            chunk = (pat * (n // len(pat) + 1))[:n]
        else:
            chunk = bytes([rng.randrange(1, 256)]) * n
        out += chunk
    return bytes(out[:size])


def text_content(rng: random.Random, size: int) -> bytes:
    """Return *size* bytes of compressible text, for writes that must compress."""
    return b" ".join(rng.choices(_WORDS, k=size // 4 + 1))[:size]


class Workbench:
    """Helpers a recipe uses to build files in its own directory, with its own seeded RNG.

    Every command runs with the image directory as working directory, so backing files are
    recorded under their plain relative names.
    """

    def __init__(self, directory: Path, seed: int):
        self.dir = directory
        self.rng = random.Random(seed)

    def raw(self, name: str, data: bytes) -> str:
        """Write *data* to the raw file *name* (densely: no holes) and return *name*."""
        (self.dir / name).write_bytes(data)
        return name

    def mixed(self, size: int, cluster_size: int) -> bytes:
        return mixed_content(self.rng, size, cluster_size)

    def pattern(self, name: str, size: int, *, text: bool = False) -> str:
        """Write a pattern file for ``qemu-io write -s NAME`` (repeated to fill each write)."""
        data = text_content(self.rng, size) if text else mixed_content(self.rng, size, 4 * K)
        return self.raw(name, data)

    @staticmethod
    def _opts(cluster: int, compat: str, compression: str | None, extl2: bool) -> str:
        opts = [f"cluster_size={cluster}", f"compat={compat}"]
        if compression:
            opts.append(f"compression_type={compression}")
        if extl2:
            opts.append("extended_l2=on")
        return ",".join(opts)

    def create(self, name: str, size: int, *, cluster: int = 64 * K, compat: str = "1.1",
               compression: str | None = None, extl2: bool = False,
               backing: str | None = None, backing_fmt: str = "qcow2",
               preallocation: str | None = None) -> str:
        opts = self._opts(cluster, compat, compression, extl2)
        if preallocation:
            opts += f",preallocation={preallocation}"
        args = ["create", "-q", "-f", "qcow2", "-o", opts]
        if backing is not None:
            args += ["-b", backing, "-F", backing_fmt]
        qemu_img(*args, name, size, cwd=self.dir)
        return name

    def convert(self, src: str, name: str, *, cluster: int = 64 * K, compat: str = "1.1",
                compress: bool = False, compression: str | None = None,
                extl2: bool = False) -> str:
        """``qemu-img convert [-c] -f raw -O qcow2`` *src* to *name*; zero runs stay unallocated."""
        args = ["convert", "-f", "raw", "-O", "qcow2",
                "-o", self._opts(cluster, compat, compression, extl2)]
        if compress:
            args.append("-c")
        qemu_img(*args, src, name, cwd=self.dir)
        return name

    def rebase_unsafe(self, name: str, backing: str, backing_fmt: str = "qcow2") -> None:
        """Attach *backing* to *name* without copying data (``qemu-img rebase -u``)."""
        qemu_img("rebase", "-u", "-b", backing, "-F", backing_fmt, name, cwd=self.dir)

    def io(self, name: str, *commands: str) -> None:
        qemu_io(name, *commands, cwd=self.dir)

    def snapshot(self, name: str, tag: str) -> None:
        qemu_img("snapshot", "-c", tag, name, cwd=self.dir)


# --------------------------------------------------------------------------------------------
# Recipes. Each takes a Workbench, builds its files, and returns the top image's file name.


@dataclass(frozen=True)
class Recipe:
    id: str
    tags: frozenset[str]
    description: str
    build: Callable[[Workbench], str] = field(repr=False)


CATALOGUE: dict[str, Recipe] = {}


def _register(image_id: str, tags: str, description: str, build: Callable[[Workbench], str]):
    if image_id in CATALOGUE:
        raise ValueError(f"duplicate image id {image_id!r}")
    CATALOGUE[image_id] = Recipe(image_id, frozenset(tags.split()), description, build)


def recipe(image_id: str, tags: str, description: str):
    """Register the decorated builder under *image_id*."""
    def decorate(fn: Callable[[Workbench], str]) -> Callable[[Workbench], str]:
        _register(image_id, tags, description, fn)
        return fn
    return decorate


def _cluster_tag(cluster: int) -> str:
    if cluster >= M:
        return f"c{cluster // M}m"
    return f"c{cluster // K}k" if cluster >= K else f"c{cluster}"


# Single images converted from mixed raw content: every cluster size, v2/v3, plain/compressed.
def _converted(w: Workbench, *, size: int, cluster: int, compat: str,
               compression: str | None) -> str:
    src = w.raw("source.raw", w.mixed(size, cluster))
    return w.convert(src, "image.qcow2", cluster=cluster, compat=compat,
                     compress=compression is not None, compression=compression)


for _cluster, _compat, _compression, _size in (
    (512, "0.10", None, 1 * M + 1536),
    (512, "1.1", "zlib", 1 * M + 256 * K + 1536),
    (4 * K, "1.1", None, 4 * M + 2560),
    (4 * K, "0.10", "zlib", 4 * M + 4608),
    (64 * K, "1.1", None, 5 * M + 12288),
    (64 * K, "1.1", "zlib", 5 * M + 12800),
    (64 * K, "1.1", "zstd", 4 * M + 512),
    (64 * K, "0.10", None, 3 * M + 1024),
    (64 * K, "0.10", "zlib", 3 * M + 3584),
    (2 * M, "1.1", None, 7 * M + 1536),
    (2 * M, "1.1", "zlib", 6 * M + 4096),
):
    _ver = "v2" if _compat == "0.10" else "v3"
    _ctag = _cluster_tag(_cluster)
    _id = f"{_ctag}-{_ver}" + (f"-{_compression}" if _compression else "")
    _tags = f"{_ctag} {_ver}" + (f" compressed {_compression}" if _compression else "")
    if _size % _cluster:
        _tags += " odd-size"
    _register(_id, _tags,
              f"{_size} bytes of mixed content converted with qemu-img convert"
              f"{' -c (' + _compression + ')' if _compression else ''}, compat={_compat}",
              partial(_converted, size=_size, cluster=_cluster, compat=_compat,
                      compression=_compression))


# Zero clusters, zero-alloc, unmap and discard, written with qemu-io.
def _zeroes(w: Workbench, *, cluster: int, compat: str, size: int) -> str:
    c = cluster
    name = w.create("image.qcow2", size, cluster=c, compat=compat)
    pat = w.pattern("pattern.bin", 3 * c + 777)
    end = size
    w.io(name,
         f"write -s {pat} 0 {min(3 * M, size - 8 * c)}",
         f"write -z {2 * c} {3 * c}",                 # zero-alloc (v3) / discard (v2)
         f"write -z -u {8 * c} {2 * c}",              # unmapped zero clusters
         f"write -z {11 * c + 1000} {c + 3000}",      # unaligned: partly falls back to data
         f"discard {14 * c} {3 * c}",                 # v3: zero clusters; v2: unallocated
         f"discard {18 * c + 100} {c // 2}",          # less than a cluster: ignored
         f"write -P 0x5a {15 * c + 512} {c // 4}",    # data inside a discarded range
         f"write -z {end - 6 * c} {2 * c}",           # zeroes over unallocated clusters
         f"write -s {pat} {2 * M - 3 * c - 300} {6 * c}",  # across the 2 MiB L2 edge of c4k
         f"write -z -u {2 * M - c} {2 * c}",
         f"write -s {pat} {end - c - 700} {c + 700}",       # up to the last byte
         f"write -z {end - 300} 300")
    return name


for _cluster, _compat, _size in ((64 * K, "1.1", 4 * M + 4608), (4 * K, "1.1", 3 * M + 512),
                                 (64 * K, "0.10", 4 * M + 4608)):
    _ver = "v2" if _compat == "0.10" else "v3"
    _ctag = _cluster_tag(_cluster)
    _register(f"{_ctag}-{_ver}-zeroes",
              f"{_ctag} {_ver} discard odd-size" + (" zero zero-alloc" if _ver == "v3" else ""),
              "data overwritten by write -z (with and without -u), discard, unaligned zero "
              "writes and writes into discarded ranges"
              + (" (v2: zero writes become discards or zero-filled data)" if _ver == "v2" else ""),
              partial(_zeroes, cluster=_cluster, compat=_compat, size=_size))


@recipe("c512-v3-sparse", "c512 v3 zero discard",
        "8 MiB, 512 B clusters (an L2 table covers 32 KiB): scattered writes, zeroes, discards")
def _sparse(w: Workbench) -> str:
    name = w.create("image.qcow2", 8 * M, cluster=512)
    pat = w.pattern("pattern.bin", 9000)
    cmds = []
    for _ in range(24):
        cmds.append(f"write -s {pat} {w.rng.randrange(8 * M - 40000)} {w.rng.randint(1, 40000)}")
    for _ in range(5):
        cmds.append(f"write -z {w.rng.randrange(8 * M - 20000)} {w.rng.randint(1, 20000)}")
    for _ in range(3):
        cmds.append(f"discard {w.rng.randrange(8 * M - 20000)} {w.rng.randint(1, 20000)}")
    cmds.append(f"write -P 0xee {8 * M - 1000} 1000")
    w.io(name, *cmds)
    return name


@recipe("c64k-v3-empty", "c64k v3 odd-size", "1 MiB + 512 B, nothing written")
def _empty(w: Workbench) -> str:
    return w.create("image.qcow2", M + 512)


@recipe("c64k-v3-tiny", "c64k v3 odd-size", "512-byte virtual disk with 200 bytes written")
def _tiny(w: Workbench) -> str:
    name = w.create("image.qcow2", 512)
    w.io(name, "write -P 0x33 100 200")
    return name


@recipe("c64k-v3-snapshot", "c64k v3 snapshot zero zero-alloc discard odd-size",
        "internal snapshots taken between writes: the active L1 shares and COWs clusters")
def _snapshot(w: Workbench) -> str:
    name = w.create("image.qcow2", 2 * M + 512)
    pat = w.pattern("pattern.bin", 70000)
    # Write whole clusters first, so later partial writes copy whole clusters and the file
    # has no holes (holes can make QEMU guess "metadata preallocation": see c64k-v3-prealloc).
    w.io(name, f"write -s {pat} 0 {2 * M}")
    w.snapshot(name, "s1")
    w.io(name, f"write -P 0x21 {64 * K + 5} {100 * K}", f"write -z {512 * K} {128 * K}",
         f"discard {768 * K} {64 * K}")
    w.snapshot(name, "s2")
    w.io(name, f"write -s {pat} {3 * M // 2} {300 * K}", f"write -z -u 0 {64 * K}")
    return name


@recipe("c64k-v3-prealloc", "c64k v3 prealloc zero zero-alloc odd-size",
        "preallocation=metadata: every cluster allocated but never written. QEMU detects this "
        "(qcow2_detect_metadata_preallocation) and map reports the file's holes as zero data")
def _prealloc(w: Workbench) -> str:
    name = w.create("image.qcow2", 2 * M + 512, preallocation="metadata")
    w.io(name, f"write -P 0x11 {100 * K} {10 * K}", f"write -z {M} {64 * K}",
         f"write -P 0x12 {2 * M - 100} 612")
    return name


@recipe("c64k-extl2", "c64k v3 extl2 compressed zlib zero zero-alloc discard odd-size",
        "extended L2 (2 KiB subclusters): partial subcluster writes, zeroed subclusters, "
        "compressed clusters, unmapped and discarded clusters")
def _extl2(w: Workbench) -> str:
    c = 64 * K
    size = 3 * M + 512
    name = w.create("image.qcow2", size, extl2=True)
    pat = w.pattern("pattern.bin", 5000)
    txt = w.pattern("text.bin", 7000, text=True)
    w.io(name,
         f"write -s {pat} 1000 3000",                   # subclusters 0-1 of cluster 0
         f"write -s {pat} {c} {c}",
         f"write -z {c + 4096} 4096",                   # zero subclusters, allocation kept
         f"write -s {pat} {2 * c} {c}",
         f"write -z -u {2 * c} {c}",                    # whole cluster unmapped
         f"write -c -s {txt} {3 * c} {2 * c}",          # compressed clusters
         f"write -s {pat} {5 * c} {c}",
         f"discard {5 * c} {c}",
         f"write -z {6 * c + 2048} 2048",               # zero subcluster, no allocation
         f"write -s {pat} {7 * c + 30000} 100000",
         f"write -s {pat} {12 * c + 2048} {6 * 2048}",  # subcluster aligned
         f"write -z {12 * c + 4096} 2048",
         f"write -s {pat} {size - 5000} 5000")
    return name


@recipe("c32k-extl2-zstd", "c32k v3 extl2 compressed zstd odd-size",
        "mixed content converted with qemu-img convert -c, zstd, extended L2")
def _extl2_zstd(w: Workbench) -> str:
    src = w.raw("source.raw", w.mixed(3 * M + 1024, 32 * K))
    return w.convert(src, "image.qcow2", cluster=32 * K, compress=True, compression="zstd",
                     extl2=True)


@recipe("c64k-extl2-zlib-backing",
        "c64k v3 extl2 compressed zlib zero discard backing short-base odd-size",
        "extended L2 over a compressed base: unallocated subclusters of allocated clusters "
        "read through to the backing file; zeroed subclusters hide it")
def _extl2_backing(w: Workbench) -> str:
    c = 64 * K
    base = w.convert(w.raw("base.raw", w.mixed(3 * M, c)), "base.qcow2", compress=True)
    top = w.create("top.qcow2", 4 * M + 512, extl2=True, backing=base)
    pat = w.pattern("pattern.bin", 3000)
    cmds = []
    for k in range(0, 40, 3):       # sprinkle subcluster writes over the base's clusters
        cmds.append(f"write -s {pat} {k * c + w.rng.randrange(c - 5000)} {w.rng.randint(1, 5000)}")
    cmds += [f"write -z {c + 8192} 8192",
             f"write -z -u {4 * c} {c}",
             f"discard {5 * c} {c}",
             f"write -z {7 * c + 2048 * 5} {2048 * 3}",
             f"write -s {pat} {2 * M + 500} 70000",
             f"write -s {pat} {3 * M - 1000} 20000",   # across the end of the base
             f"write -P 0x99 {4 * M} 512"]
    w.io(top, *cmds)
    return top


@recipe("c4k-chain3-short-base",
        "c4k v3 backing chain3 short-base zero discard odd-size",
        "base 3 MiB (converted) <- mid 5 MiB <- top 6 MiB + 12800 B, all 4 KiB clusters: "
        "writes at each layer, zero writes and discards in mid and top hiding backing data, "
        "partial-cluster writes copying up from the backing, writes across the base's end")
def _chain3(w: Workbench) -> str:
    c = 4 * K
    base = w.convert(w.raw("base.raw", w.mixed(3 * M, 16 * K)), "base.qcow2", cluster=c)
    mid = w.create("mid.qcow2", 5 * M, cluster=c, backing=base)
    pat = w.pattern("pattern.bin", 12345)
    w.io(mid,
         f"write -s {pat} 100000 300001",
         f"write -z {M} {64 * K}",
         f"discard {1200 * K} {40 * K}",
         f"write -z -u {1400 * K} {12 * K}",
         f"write -s {pat} {5 * M // 2} {M}",
         f"write -P 0x77 {4 * M + 123} 4567")
    size = 6 * M + 12800
    top = w.create("top.qcow2", size, cluster=c, backing=mid)
    w.io(top,
         f"write -s {pat} 50000 10000",
         f"write -z {200 * K} {64 * K}",
         f"write -z -u {2 * M - 8 * K} {16 * K}",
         f"discard {2600 * K} {100 * K}",
         f"write -s {pat} {3 * M - 2000} 4000",
         f"write -z {3 * M + 64 * K + 100} 5000",
         f"write -s {pat} {5 * M + 7} {size - 5 * M - 7 - 3000}")
    return top


@recipe("c2m-chain3-mixed-clusters",
        "c2m v3 backing chain3 short-base compressed zlib zero odd-size",
        "base c512 v2 2 MiB <- mid c64k v3 zlib 4 MiB (convert -c, then rebase -u) <- "
        "top c2m 5 MiB + 512: a small write copies a whole 2 MiB cluster up from the chain, "
        "the middle cluster reads through to mid and base")
def _chain3_mixed(w: Workbench) -> str:
    base = w.create("base.qcow2", 2 * M, cluster=512, compat="0.10")
    pat = w.pattern("pattern.bin", 4321)
    w.io(base, *(f"write -s {pat} {w.rng.randrange(2 * M - 50000)} {w.rng.randint(1, 50000)}"
                 for _ in range(12)))
    mid = w.convert(w.raw("mid.raw", w.mixed(4 * M, 64 * K)), "mid.qcow2", compress=True)
    w.rebase_unsafe(mid, base)
    top = w.create("top.qcow2", 5 * M + 512, cluster=2 * M, backing=mid)
    w.io(top,
         f"write -s {pat} {M} 4096",                    # copies up all of 0..2 MiB
         f"write -z -u {M + 8192} 8192",
         f"write -z {4 * M} {M + 512}")                 # 2..4 MiB stays in mid and base
    return top


@recipe("c64k-chain2-zlib-base", "c64k v3 backing compressed zlib zero discard short-base odd-size",
        "compressed base 3 MiB <- top 4 MiB + 1 KiB: partial writes over compressed clusters, "
        "zero writes and discards hiding them")
def _chain2_zlib(w: Workbench) -> str:
    c = 64 * K
    base = w.convert(w.raw("base.raw", w.mixed(3 * M, c)), "base.qcow2", compress=True)
    top = w.create("top.qcow2", 4 * M + 1024, backing=base)
    pat = w.pattern("pattern.bin", 999)
    w.io(top,
         f"write -s {pat} {c + 100} 200",
         f"write -s {pat} {5 * c - 10} {c + 20}",
         f"write -z -u {8 * c} {2 * c}",
         f"write -z {11 * c} {c}",
         f"discard {13 * c} {2 * c}",
         f"write -s {pat} {3 * M - 777} 5000")
    return top


@recipe("c64k-v2-chain2-long-base", "c64k v2 backing long-base discard odd-size",
        "v2 base 3 MiB <- v2 top 2 MiB + 512: discards in a v2 top unallocate and reveal the "
        "base; zero writes with a backing file fall back to writing zero data")
def _v2_chain(w: Workbench) -> str:
    c = 64 * K
    base = w.create("base.qcow2", 3 * M, compat="0.10")
    pat = w.pattern("pattern.bin", 8000)
    w.io(base, f"write -s {pat} 0 {3 * M}")
    top = w.create("top.qcow2", 2 * M + 512, compat="0.10", backing=base)
    w.io(top,
         f"write -P 0x3c {c} {4 * c}",
         f"discard {2 * c} {2 * c}",
         f"write -z {8 * c} {c}",
         f"write -z -u {10 * c} {c}",
         f"write -P 0xc3 {2 * M - 1000} 1512")
    return top


@recipe("c64k-raw-backing", "c64k v3 backing raw-backing short-base zero discard odd-size",
        "raw base 2 MiB (dense) <- qcow2 top 3 MiB + 512 (-F raw)")
def _raw_backing(w: Workbench) -> str:
    base = w.raw("base.raw", w.mixed(2 * M, 64 * K))
    top = w.create("top.qcow2", 3 * M + 512, backing=base, backing_fmt="raw")
    pat = w.pattern("pattern.bin", 3333)
    w.io(top,
         f"write -s {pat} 100000 50000",
         f"write -z {512 * K} {128 * K}",
         f"discard {M} {64 * K}",
         f"write -P 0x42 {2 * M - 1000} 5000")
    return top


@recipe("c4k-raw-backing-odd", "c4k v3 backing raw-backing short-base zero",
        "raw base of 1 MiB + 777 B (not a multiple of 512) <- qcow2 top 2 MiB: the base's "
        "last sector is partial")
def _raw_backing_odd(w: Workbench) -> str:
    base = w.raw("base.raw", w.mixed(M + 777, 4 * K))
    top = w.create("top.qcow2", 2 * M, cluster=4 * K, backing=base, backing_fmt="raw")
    w.io(top,
         "write -P 0x10 4096 8192",
         f"write -z {64 * K} {8 * K}",
         f"write -P 0x20 {M - 5000} 1000",
         f"write -P 0x30 {M + 5 * K} 100")   # the cluster holding the base's end stays unallocated
    return top


IMAGE_IDS: list[str] = list(CATALOGUE)


def select_ids(*tags: str, exclude: Iterable[str] = (), ids: Iterable[str] | None = None
               ) -> list[str]:
    """Return the catalogue ids having every tag in *tags* and none in *exclude*.

    *ids*, if given, restricts the result to those ids (unknown ids are an error).
    """
    unknown = set(tags) | set(exclude)
    known_tags = set().union(*(r.tags for r in CATALOGUE.values()))
    if unknown - known_tags:
        raise ValueError(f"unknown image tags {sorted(unknown - known_tags)}")
    pool = IMAGE_IDS
    if ids is not None:
        ids = list(ids)
        missing = [i for i in ids if i not in CATALOGUE]
        if missing:
            raise ValueError(f"unknown image ids {missing}")
        pool = [i for i in IMAGE_IDS if i in ids]
    want, avoid = set(tags), set(exclude)
    return [i for i in pool if want <= CATALOGUE[i].tags and not avoid & CATALOGUE[i].tags]


# --------------------------------------------------------------------------------------------
# The factory


class ImageFactory:
    """Builds catalogue images on demand, once each, under *root*."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._built: dict[str, BuiltImage] = {}
        self._failed: dict[str, str] = {}

    def ids(self, *tags: str, exclude: Iterable[str] = ()) -> list[str]:
        """Ids having every tag in *tags* and none in *exclude* (see :func:`select_ids`)."""
        return select_ids(*tags, exclude=exclude)

    def get(self, image_id: str) -> BuiltImage:
        """Return the built image *image_id*, building it on first use."""
        built = self._built.get(image_id)
        if built is not None:
            return built
        if image_id in self._failed:
            raise RuntimeError(f"building image {image_id!r} failed earlier in this session:\n"
                               f"{self._failed[image_id]}")
        try:
            rec = CATALOGUE[image_id]
        except KeyError:
            raise KeyError(f"no image {image_id!r} in the catalogue") from None
        try:
            directory = self.root / image_id
            directory.mkdir(parents=True)
            top = rec.build(Workbench(directory, seed=zlib.crc32(image_id.encode())))
            chain, infos = _probe_chain(directory / top)
            _check_tags(image_id, rec.tags, chain, infos)
        except Exception as exc:
            self._failed[image_id] = f"{type(exc).__name__}: {exc}"
            raise
        built = self._built[image_id] = BuiltImage(rec.id, rec.tags, rec.description, chain)
        return built

    def copy(self, image_id: str, dest_dir: Path) -> BuiltImage:
        """Copy the chain of *image_id* into *dest_dir* (for tests that modify files)."""
        return self.get(image_id).copy_to(dest_dir)


def _probe_chain(top: Path) -> tuple[tuple[Layer, ...], list[dict]]:
    """Describe the chain of *top* from ``qemu-img info --backing-chain``; also return that info."""
    infos = json.loads(qemu_img("info", "--backing-chain", "--output=json", top).stdout)
    layers = []
    for info in infos:
        path = top.parent / Path(info["filename"]).name
        assert path.exists() and Path(info["filename"]).parent in (Path("."), top.parent), \
            f"{top}: chain member {info['filename']!r} is outside the image directory"
        backing = info.get("backing-filename")
        assert backing is None or "/" not in backing, \
            f"{path}: backing name {backing!r} is not a plain relative name"
        qcow2 = info["format"] == "qcow2"
        specific = info["format-specific"]["data"] if qcow2 else {}
        layers.append(Layer(
            path=path, fmt=info["format"], virtual_size=info["virtual-size"],
            cluster_size=info["cluster-size"] if qcow2 else None,
            compat=specific.get("compat"),
            compression=specific.get("compression-type", "zlib") if qcow2 else None,
            extl2=specific.get("extended-l2", False),
            backing_name=backing))
    return tuple(layers), infos


def _check_tags(image_id: str, tags: frozenset[str], chain: tuple[Layer, ...],
                infos: list[dict]) -> None:
    """Fail if a recipe's tags contradict what qemu-img reports about the image it built.

    Map-based tags (compressed, zero, zero-alloc) describe what ``qemu-img map`` shows of
    the whole chain, i.e. clusters visible from the top.
    """
    top = chain[0]
    specific = [i["format-specific"]["data"] for i in infos if i["format"] == "qcow2"]
    # Only qcow2 layers: QEMU reports a raw file's holes and partial last sector as zero.
    entries = [e for e in qemu_map(top.path) if chain[e["depth"]].fmt == "qcow2"]
    # Compressed clusters are the only present data QEMU reports no host offset for.
    compressed = any(e["present"] and e["data"] and "offset" not in e for e in entries)
    facts = {
        "v2": top.compat == "0.10",
        "v3": top.compat == "1.1",
        "backing": len(chain) > 1,
        "chain3": len(chain) == 3,
        "raw-backing": any(layer.fmt == "raw" for layer in chain),
        "extl2": any(s.get("extended-l2", False) for s in specific),
        "zlib": compressed and any(s.get("compression-type", "zlib") == "zlib" for s in specific),
        "zstd": compressed and any(s.get("compression-type") == "zstd" for s in specific),
        "snapshot": bool(infos[0].get("snapshots")),
        "odd-size": top.virtual_size % top.cluster_size != 0,
        "short-base": any(b.virtual_size < a.virtual_size for a, b in zip(chain, chain[1:])),
        "long-base": any(b.virtual_size > a.virtual_size for a, b in zip(chain, chain[1:])),
        "compressed": compressed,
        "zero": any(e["present"] and e["zero"] for e in entries),
        "zero-alloc": any(e["present"] and e["zero"] and not e["data"] and "offset" in e
                          for e in entries),
        # Data that QEMU also calls zero: it looked into the file's holes, which it does for
        # images it takes for metadata-preallocated (or for raw backing files).
        "prealloc": any(e["present"] and e["zero"] and e["data"] for e in entries),
    }
    wrong = {t: fact for t, fact in facts.items() if fact != (t in tags)}
    cluster_tags = {t for t in tags if re.fullmatch(r"c\d+[km]?", t)}
    if cluster_tags != {_cluster_tag(top.cluster_size)}:
        wrong["cluster"] = _cluster_tag(top.cluster_size)
    assert not wrong, f"{image_id}: recipe tags contradict qemu-img; the facts are {wrong}"


# --------------------------------------------------------------------------------------------
# Fixtures and hooks


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "images(*tags, exclude=(), ids=None): restrict the `image` fixture to catalogue ids "
        "having all tags, none of exclude, and (if given) in ids")


def pytest_report_header(config):
    missing = missing_qemu_tools()
    if missing:
        return f"qemu tools MISSING: {', '.join(missing)}"
    return qemu_img("--version").stdout.splitlines()[0]


def pytest_generate_tests(metafunc):
    if "image" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("images")
    ids = select_ids(*marker.args, **marker.kwargs) if marker else IMAGE_IDS
    if not ids:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: @pytest.mark.images selects no image")
    metafunc.parametrize("image", ids, ids=ids, indirect=True)


@pytest.fixture(scope="session", autouse=True)
def qemu_tools():
    """Fail the whole session (never skip) when qemu-img or qemu-io is missing."""
    missing = missing_qemu_tools()
    if missing:
        pytest.exit(f"required QEMU tools not found on PATH: {', '.join(missing)} "
                    "(install the Debian package qemu-utils)", returncode=3)


@pytest.fixture(scope="session")
def images(tmp_path_factory, qemu_tools) -> ImageFactory:
    """The session's :class:`ImageFactory`."""
    return ImageFactory(tmp_path_factory.mktemp("images"))


@pytest.fixture
def image(request, images) -> BuiltImage:
    """One catalogue image; parametrized over the catalogue by ``pytest_generate_tests``."""
    return images.get(request.param)
