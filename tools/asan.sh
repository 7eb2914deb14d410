#!/usr/bin/env bash
# Build the Cython kernels with AddressSanitizer in a temporary copy of the repository (the
# normal in-place build is left alone) and run the hostile-input tests against that build:
# the corruption matrix, the mutation test, the kernel tests (inflate, tables, fill, the
# deflate writer), and a replay of the fuzz seeds (plus fuzz/corpus when it exists) through
# fuzz/fuzz_open.py.
#
#   tools/asan.sh                 # everything above
#   tools/asan.sh -k deflate      # extra arguments go to pytest
#
# Needs gcc with libasan, qemu-img/qemu-io, and the test dependencies; not atheris.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qcowfast-asan.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

libasan="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "$libasan" ]]; then
    echo "asan.sh: gcc has no libasan.so (install libasan / gcc)" >&2
    exit 2
fi

# The sources only: no compiled modules, generated C or caches from the normal build.
pkg="$work/src/qcowfast"
mkdir -p "$pkg"
cp "$repo"/setup.py "$repo"/pyproject.toml "$work"/
cp "$repo"/src/qcowfast/*.py "$repo"/src/qcowfast/*.pyx "$pkg/"
cp "$repo"/src/qcowfast/py.typed "$pkg/" 2>/dev/null || true
for ext in pxd pxi pyi h; do
    compgen -G "$repo/src/qcowfast/*.$ext" >/dev/null && cp "$repo"/src/qcowfast/*."$ext" "$pkg/"
done
cp -r "$repo/tests" "$work/tests"
cp -r "$repo/fuzz" "$work/fuzz"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$work/fuzz/corpus"

echo "asan.sh: building the kernels with -fsanitize=address in $work"
(
    cd "$work"
    CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" \
    LDFLAGS="-fsanitize=address" \
        "$python" setup.py -q build_ext --inplace --build-temp "$work/build" >/dev/null
)
for so in "$pkg"/_*.so; do
    if ! readelf -d "$so" | grep -q 'libasan'; then
        echo "asan.sh: $so is not linked against libasan" >&2
        exit 1
    fi
done

# The QEMU and libnbd tools the tests run (to build images, as NBD servers and clients) must
# not inherit the ASan runtime: QEMU's coroutines hang under it. Shims first on PATH drop
# LD_PRELOAD before running them.
mkdir -p "$work/bin"
for tool in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy; do
    real="$(command -v "$tool")" || { echo "asan.sh: $tool not found" >&2; exit 2; }
    printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$@"\n' "$real" > "$work/bin/$tool"
    chmod +x "$work/bin/$tool"
done
export PATH="$work/bin:$PATH"
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export PYTHONPATH="$work/src"
export PYTHONDONTWRITEBYTECODE=1
cd "$work"

# The tests must import the sanitized copy, not the editable install.
"$python" - "$work" <<'PY'
import sys, qcowfast, qcowfast._tables, qcowfast._inflate, qcowfast._deflate, qcowfast._fill, qcowfast._plain
for mod in (qcowfast, qcowfast._tables, qcowfast._inflate, qcowfast._deflate, qcowfast._fill,
            qcowfast._plain):
    assert mod.__file__.startswith(sys.argv[1]), f"imported {mod.__file__}, not the ASan build"
PY

# An AddressSanitizer report aborts the process (abort_on_error): pytest or the replay then dies
# with SIGABRT and the report on stderr. Ordinary test failures are reported, not fatal here.
status=0
echo "asan.sh: running the corruption matrix, the mutation test, the kernel tests and the C read path"
"$python" -m pytest tests/test_corrupt.py tests/test_mutation.py tests/test_inflate.py \
    tests/test_tables.py tests/test_fastpaths.py tests/test_amplification.py tests/test_write.py \
    tests/test_reads_fast.py tests/test_small_tables.py tests/test_plain.py tests/test_sigbus.py \
    tests/test_bad_l1.py -q -p no:cacheprovider "$@" || status=$?

echo "asan.sh: replaying the fuzz seeds"
"$python" fuzz/make_corpus.py "$work/seeds"
corpora=("$work/seeds")
[[ -d "$repo/fuzz/corpus" ]] && corpora+=("$repo/fuzz/corpus")
"$python" fuzz/fuzz_open.py --replay "${corpora[@]}" || status=$?

if (( status == 134 )); then
    echo "asan.sh: AddressSanitizer reported an error (see above); $((SECONDS - start)) s" >&2
elif (( status )); then
    echo "asan.sh: failures (exit $status), no AddressSanitizer report; $((SECONDS - start)) s" >&2
else
    echo "asan.sh: passed, no AddressSanitizer report; $((SECONDS - start)) s"
fi
exit "$status"
