"""The sdist round trip: build the sdist, install it into a fresh virtual environment with real
build isolation (the kernels are compiled from the shipped .pyx sources), and convert the
bundled sample with that environment's `qcowfast`; qemu-img is the oracle for the bytes.

pip reads its packages from a wheelhouse kept in the user's cache directory
(``~/.cache/qcowfast-tests/wheelhouse-*``). The first run fills it with ``pip download`` (from
the configured indexes); later runs install with ``--no-index`` from it, so the test does not
depend on the network once the wheelhouse exists.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from common import assert_same_bytes, reference_raw

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "sample.qcow2"


def _requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted({*meta["build-system"]["requires"], *meta["project"]["dependencies"]})


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    reqs = _requirements()
    key = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    house = cache / "qcowfast-tests" / f"wheelhouse-{key}"
    if not (house / "complete").exists():
        house.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                               "--only-binary", ":all:", "-d", house, *reqs],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"cannot fill the wheelhouse {house}:\n{proc.stderr}"
        (house / "complete").write_text("\n".join(reqs) + "\n")
    return house


def _run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=600, **kw)
    assert proc.returncode == 0, f"{argv}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_sdist_installs_and_converts(tmp_path, wheelhouse):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, REPO],
         cwd=tmp_path)
    sdist, = dist.glob("qcowfast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    kernels = {f"src/qcowfast/{p.name}" for p in (REPO / "src" / "qcowfast").glob("*.pyx")}
    needed = {"LICENSE", "README.md", "setup.py", "pyproject.toml", "tests/common.py",
              "tests/conftest.py", "samples/sample.qcow2", "src/qcowfast/py.typed", *kernels}
    assert needed <= names, needed - names
    assert not [n for n in names if n.endswith((".c", ".so"))], names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", sdist], env=env, cwd=tmp_path)

    files = _run([venv / "bin" / "python", "-c",
                  "import importlib.metadata as m; print('\\n'.join(str(f) for f in "
                  "m.files('qcowfast')))"], env=env, cwd=tmp_path).stdout.split()
    shipped = {f for f in files if f.startswith("qcowfast/")}
    assert not [f for f in shipped if f.endswith((".c", ".pyx"))], shipped
    for pyx in kernels:
        stem = Path(pyx).stem
        assert [f for f in shipped if Path(f).name.startswith(stem + ".") and
                f.endswith(".so")], (stem, shipped)
        assert f"qcowfast/{stem}.pyi" in shipped, (stem, shipped)      # typed (py.typed)
    assert "LICENSE" in " ".join(files)

    out = tmp_path / "sample.raw"
    version = _run([venv / "bin" / "qcowfast", "--version"], env=env, cwd=tmp_path)
    assert version.stdout.startswith("qcowfast ")
    _run([venv / "bin" / "qcowfast", "convert", "-q", SAMPLE, out], env=env, cwd=tmp_path)
    assert_same_bytes(out.read_bytes(), reference_raw(SAMPLE), "sample via the sdist install")


def test_every_public_name_is_typed():
    """`qcowfast.X` is imported lazily (PEP 562), which type checkers see as Any: every public
    name is also imported under TYPE_CHECKING, from the module that defines it."""
    import ast
    import qcowfast
    tree = ast.parse((REPO / "src" / "qcowfast" / "__init__.py").read_text())
    typed = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                typed.update((alias.name, imp.module) for alias in imp.names)
    assert typed == qcowfast._LAZY
    assert set(qcowfast.__all__) == set(qcowfast._LAZY)
    for name in qcowfast.__all__:
        assert getattr(qcowfast, name) is not None


def test_interpreter_start_loads_no_import_finder():
    """The package sits in src/ so that an editable install (the README's) is a plain path in a
    .pth file: a package beside setup.py makes setuptools install an import finder, which every
    start of the interpreter imports (pathlib, importlib.util and more: 11 ms of each command)."""
    code = "import sys; print(sorted(m for m in sys.modules if 'editable' in m or m == 'pathlib'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO / "samples")
    assert proc.stdout.strip() == "[]", proc.stdout
    assert (REPO / "src" / "qcowfast" / "__init__.py").is_file()
    assert not (REPO / "qcowfast").exists()
