#!/usr/bin/env python3
"""Coverage-guided fuzzing of qcowfast over hostile image files (atheris / libFuzzer).

Each input is written to a file in a private temporary directory and run through
`harness.exercise`: open, map, read, snapshots, info, check, and convert (to memory, and to a
sparse file when small enough). A QcowError is the expected answer to a bad image; any other
exception is a crash, and so is running past -timeout seconds or -rss_limit_mb of memory (work
and memory must follow the file, not the declared sizes).

    pip install atheris
    python fuzz/make_corpus.py fuzz/corpus               # seeds from qemu-img (not committed)
    python fuzz/fuzz_open.py -max_total_time=60 -timeout=10 -rss_limit_mb=1024 fuzz/corpus

libFuzzer adds the inputs that reach new code to the first corpus directory (fuzz/corpus is
git-ignored; shrink it with `-merge=1 NEW_DIR fuzz/corpus`). Crashers are written as
crash-<sha1> in the working directory (-artifact_prefix=DIR/ to move them); replay one with
`python fuzz/fuzz_open.py crash-...`, or files and directories without atheris with
`python fuzz/fuzz_open.py --replay PATH...` (every input, then a count of crashes). Each crasher
becomes a regression case in tests/test_corrupt.py. Only Python code is instrumented for coverage: the Cython kernels run, and
tools/asan.sh checks their memory accesses, but libFuzzer does not see their branches.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__" and sys.argv[1:2] == ["--replay"]:
    from harness import exercise     # no atheris needed (tools/asan.sh replays this way)
else:
    import atheris
    from atheris.import_hook import HookManager

    # Branch coverage only: atheris's comparison tracing (instrument_imports' trace_dataflow)
    # leaks the result of every instrumented comparison between numpy arrays (a whole boolean
    # array each time), which grows the fuzzer by ~100 KiB per input until -rss_limit_mb trips.
    with HookManager({"qcowfast", "harness"}, set(), enable_loader_override=True,
                     trace_dataflow=False):
        import qcowfast  # noqa: F401  (instrumented before harness imports it)
        from harness import exercise

# libFuzzer leaves by exit() without running atexit handlers: each input's file is removed as
# soon as it is done, so at most an empty directory stays behind.
_DIR = tempfile.mkdtemp(prefix="qcowfast-fuzz-")
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_IMAGE = os.path.join(_DIR, "img.qcow2")


def TestOneInput(data: bytes) -> None:
    with open(_IMAGE, "wb") as f:
        f.write(data)
    try:
        exercise(_IMAGE)
    finally:
        os.unlink(_IMAGE)


def replay(paths: list[str]) -> tuple[int, int]:
    """Run every file of `paths` (files or directories) through exercise().

    Returns (inputs, crashes); each crash is reported on stderr with its traceback.
    """
    import traceback
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, n) for n in os.listdir(p))
        else:
            files.append(p)
    crashes = 0
    for name in files:
        with open(name, "rb") as f:
            data = f.read()
        try:
            TestOneInput(data)
        except Exception:
            crashes += 1
            print(f"crash on {name}:", file=sys.stderr)
            traceback.print_exc()
    return len(files), crashes


def main() -> None:
    if sys.argv[1:2] == ["--replay"]:
        inputs, crashes = replay(sys.argv[2:])
        print(f"replayed {inputs} inputs: {crashes} crashes")
        sys.exit(1 if crashes else 0)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
