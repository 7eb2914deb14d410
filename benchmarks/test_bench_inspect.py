"""Whole-process inspection commands beside qemu-img's: info, map, check, measure, compare.

Each benchmark times one child process (launch included, the same cost for both tools) running
one command on one image, output to a pipe that is read whole. Images: the corpus's u64k and
zlib64k (1 GiB; compare reads every byte of the image and of the raw file it was made
from) and "striped", 256 MiB of 512-byte
clusters with data in every other one (a million map entries: what costs per entry). After
the timed rounds the two tools' standard output and exit status are compared: the benchmark
fails when they differ (check's and compare's texts name the file the same way).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import corpus as corpus_mod

COMMANDS = {                                    # name: arguments after the tool's name
    "info": ["info", "--output=json"],
    "map": ["map", "--output=json"],
    "check": ["check", "--output=json"],
    "measure": ["measure", "-O", "qcow2", "--output=json"],
    "compare": ["compare"],                     # against the raw source it was made from
}
IMAGES = ("u64k", "zlib64k", "striped")
NOT_MEASURED = {("striped", "compare")}         # (reading 256 MiB as a million tiny runs)
TOOLS = {"qemu-img": ["qemu-img"], "qcowfast": [sys.executable, "-m", "qcowfast"]}


@pytest.fixture(scope="session")
def striped(pytestconfig) -> Path:
    """256 MiB, 512-byte clusters, data in every other one; built once and cached."""
    root = Path(pytestconfig.getoption("--bench-dir") or corpus_mod.default_root())
    path = root / "inspect-v1" / "striped.qcow2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.with_suffix(".raw")
        with open(raw, "wb") as f:
            f.write((b"\x07" * 512 + bytes(512)) * (256 * 1024))
        tmp = path.with_suffix(".tmp")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "512",
                        "-o", "cluster_size=512", str(raw), str(tmp)], check=True)
        raw.unlink()
        tmp.rename(path)
    return path


def _argv(tool: str, command: str, image: Path, raw: Path) -> list[str]:
    args = [*TOOLS[tool], *COMMANDS[command], str(image)]
    return args + [str(raw)] if command == "compare" else args


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("image, command", [(i, c) for i in IMAGES for c in COMMANDS
                                            if (i, c) not in NOT_MEASURED])
def test_inspect(benchmark, request, bench_corpus, bench_rounds, image, command, tool):
    path = request.getfixturevalue("striped") if image == "striped" else \
        bench_corpus.path(image)
    raw = bench_corpus.path("raw-src")
    argv = _argv(tool, command, path, raw)
    done: list[subprocess.CompletedProcess] = []

    def run():
        done.append(subprocess.run(argv, capture_output=True, check=False))

    rounds, warmup = bench_rounds
    benchmark.group = f"inspect: {image} {command}"
    benchmark.extra_info.update(image=image, command=command, tool=tool,
                                argv=" ".join(argv[len(TOOLS[tool]):]))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    ours = done[-1]
    assert ours.returncode == 0, ours.stderr.decode()[-2000:]
    if tool == "qcowfast":
        want = subprocess.run(_argv("qemu-img", command, path, raw), capture_output=True,
                              check=False)
        assert (ours.returncode, ours.stdout) == (want.returncode, want.stdout)
