"""Start-up time of whole processes: qcowfast's command line and import beside qemu-img's.

Each benchmark runs one command 20 times (median reported), after one untimed warm-up run.
The targets of issue 11 are ratios to `python -c "import numpy"` measured in the same run:
``qcowfast --version`` <= 0.5x, ``qcowfast info`` on a small image <= 0.8x, ``import qcowfast``
<= 0.8x. At the end of the module a table of medians and ratios (wall clock, and CPU time
user+sys, which is steadier on a busy machine) is printed; it is also in each benchmark's
``extra_info``. Run::

    python -m pytest benchmarks/test_bench_startup.py --benchmark-only -s
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROUNDS = 20
# The console script installed beside this interpreter (a venv's or pyenv's bin/), not a shim.
SCRIPT = Path(sys.executable).with_name("qcowfast")
TARGETS = {"qcowfast --version": 0.5, "qcowfast info": 0.8, "import qcowfast": 0.8}
_RESULTS: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """The environment of the timed processes: bytecode cached (in a private directory) as an
    installed package has it, even where PYTHONDONTWRITEBYTECODE is set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    qemu_img = shutil.which("qemu-img")
    assert qemu_img, "qemu-img is needed for the small image and the comparison"
    path = tmp_path_factory.mktemp("startup") / "small.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def _commands(image: Path) -> dict[str, list[str]]:
    qcowfast = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "qcowfast"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import numpy": [sys.executable, "-c", "import numpy"],
        "import qcowfast": [sys.executable, "-c", "import qcowfast"],
        "qcowfast --version": [*qcowfast, "--version"],
        "qcowfast info": [*qcowfast, "info", str(image)],
        "qemu-img --version": ["qemu-img", "--version"],
        "qemu-img info": ["qemu-img", "info", str(image)],
    }


def _run_once(argv: list[str], env: dict, cpu: list[float]) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


NAMES = list(_commands(Path("x")))


@pytest.mark.parametrize("name", NAMES)
def test_startup(benchmark, small_image, child_env, name):
    argv = _commands(small_image)[name]
    benchmark.group = "startup"
    cpu: list[float] = []
    wall: list[float] = []

    def once():
        t0 = time.perf_counter()
        _run_once(argv, child_env, cpu)
        wall.append(time.perf_counter() - t0)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    wall_median = statistics.median(wall[-ROUNDS:])
    cpu_median = statistics.median(cpu[-ROUNDS:])
    _RESULTS[name] = (wall_median, cpu_median)
    benchmark.extra_info.update(command=" ".join(argv), wall_median_s=wall_median,
                                cpu_median_s=cpu_median)
    base = _RESULTS.get("import numpy")
    if base:
        benchmark.extra_info.update(wall_ratio_to_numpy=wall_median / base[0],
                                    cpu_ratio_to_numpy=cpu_median / base[1])


@pytest.fixture(scope="module", autouse=True)
def startup_report():
    """After the module: print the medians and their ratios to `import numpy` (with -s)."""
    yield
    if "import numpy" not in _RESULTS:
        return
    base_wall, base_cpu = _RESULTS["import numpy"]
    lines = [f"{'command':22s} {'wall ms':>8s} {'ratio':>6s} {'cpu ms':>8s} {'ratio':>6s} target"]
    for name, (wall, cpu) in _RESULTS.items():
        target = TARGETS.get(name)
        lines.append(f"{name:22s} {wall * 1e3:8.1f} {wall / base_wall:6.2f} {cpu * 1e3:8.1f} "
                     f"{cpu / base_cpu:6.2f} {'<= %.1fx' % target if target else ''}")
    print("\n" + "\n".join(lines), file=sys.__stderr__)
