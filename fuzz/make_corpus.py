#!/usr/bin/env python3
"""Write the seed corpus for fuzz_open.py: tiny qcow2 images built by qemu-img and qemu-io.

    python fuzz/make_corpus.py CORPUS_DIR

Seeds are generated, never committed. Each is a few KiB (512-byte clusters where the feature
allows it) so the fuzzer mutates metadata rather than guest data: v2 and v3 headers, zlib and
zstd compressed clusters, zero clusters, extended L2 entries, a backing file name and format,
an external data file name, the dirty bit, internal snapshots. Needs qemu-img and qemu-io.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> (create options, size, qemu-io commands, extra create arguments)
SEEDS = {
    "c512-v3": ("cluster_size=512", "64k",
                ["write -P 0x5a 0 1k", "write -z 2k 1k", "write -P 0x11 8k 512"], []),
    "c512-v2": ("cluster_size=512,compat=0.10", "64k",
                ["write -P 0x5a 0 1k", "write -P 0x11 40k 512"], []),
    "c512-zlib": ("cluster_size=512", "32k",
                  ["write -c -P 0x33 0 512", "write -c -P 0x44 1k 512", "write -P 1 4k 512"], []),
    "c512-zstd": ("cluster_size=512,compression_type=zstd", "32k",
                  ["write -c -P 0x33 0 512", "write -P 1 2k 512"], []),
    "c512-odd-size": ("cluster_size=512", "33000", ["write -P 0x77 32768 232"], []),
    "c1k-l2-edge": ("cluster_size=1k", "512k",
                    ["write -P 0x21 127k 2k", "write -z -u 300k 2k"], []),
    "c16k-extl2": ("cluster_size=16k,extended_l2=on", "64k",
                   ["write -P 0x5a 0 512", "write -z 1k 512", "write -c -P 0x66 16k 16k"], []),
    "c512-backing": ("cluster_size=512", "16k", ["write -P 0x12 1k 512"],
                     ["-u", "-b", "base.qcow2", "-F", "qcow2"]),
    "c512-raw-backing": ("cluster_size=512", "16k", ["write -P 0x12 1k 512"],
                         ["-u", "-b", "base.raw", "-F", "raw"]),
    "c512-data-file": ("cluster_size=512,data_file=img.data", "16k", ["write -P 0x13 0 1k"], []),
    "c512-empty": ("cluster_size=512", "1M", [], []),
}


def run(*argv, cwd):
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = []
    with tempfile.TemporaryDirectory(prefix="qcowfast-corpus-") as tmp:
        for name, (opts, size, cmds, extra) in SEEDS.items():
            work = Path(tmp, name)
            work.mkdir()
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, "img.qcow2", size,
                cwd=work)
            # The backing files exist only while qemu-io writes; the seed is the image alone.
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "base.qcow2",
                "16k", cwd=work)
            run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16k", cwd=work)
            if cmds:
                io_args = ["qemu-io", "-f", "qcow2"]
                for c in cmds:
                    io_args += ["-c", c]
                run(*io_args, "img.qcow2", cwd=work)
            dst = out / name
            shutil.copyfile(work / "img.qcow2", dst)
            made.append(dst)
        # A dirty image and one with an internal snapshot, from copies of the first seed.
        dirty = out / "c512-v3-dirty"
        data = bytearray((out / "c512-v3").read_bytes())
        data[79] |= 1                        # incompatible_features bit 0 (big-endian u64 at 72)
        dirty.write_bytes(data)
        made.append(dirty)
        snap = Path(tmp, "snap.qcow2")
        shutil.copyfile(out / "c512-v3", snap)
        run("qemu-img", "snapshot", "-c", "s1", str(snap), cwd=tmp)
        run("qemu-io", "-c", "write -P 0x99 0 512", str(snap), cwd=tmp)
        shutil.copyfile(snap, out / "c512-snapshot")
        made.append(out / "c512-snapshot")
    return made


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    made = build(Path(argv[0]))
    total = sum(p.stat().st_size for p in made)
    print(f"{len(made)} seeds, {total} bytes, in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
