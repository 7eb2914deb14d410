"""Raw output with `-o preallocation=falloc|full` (CDI asks for it): the same bytes, allocation
and map as qemu-img's, from the API, the command line and convert-many; refused where no new
file is written."""
from __future__ import annotations

import io
import json
import os

import pytest

import qcowfast
from common import qemu_img, qemu_io, run_cli

M = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("prealloc")
    path = d / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "6M")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 2M 4k", "write -z 3M 1M")
    zstd = d / "zstd.qcow2"
    raw = d / "mixed.raw"
    raw.write_bytes(b"\x33" * 65536 + bytes(M) + b"\x44" * 512 + bytes(M))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw,
             zstd)
    return path, zstd


def _state(path) -> tuple:
    """What a tool relies on: bytes, size, allocated blocks and qemu-img's map (taken before
    anything reads the file: a read puts pages of unwritten extents in the page cache, which
    SEEK_DATA then reports as data)."""
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "raw", path).stdout)
    st = os.stat(path)
    return mapped, st.st_size, st.st_blocks, path.read_bytes()


@pytest.mark.parametrize("mode", ["falloc", "full"])
@pytest.mark.parametrize("which", [0, 1])
def test_as_qemu_img(source, tmp_path, mode, which):
    src = source[which]
    qemu_img("convert", "-O", "raw", "-o", f"preallocation={mode}", src, tmp_path / "ref.raw")
    want = _state(tmp_path / "ref.raw")
    qcowfast.convert(src, tmp_path / "api.raw", preallocation=mode)
    assert _state(tmp_path / "api.raw") == want
    proc = run_cli("convert", "-O", "raw", src, tmp_path / "cli.raw", "-o",
                   f"preallocation={mode}")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    assert _state(tmp_path / "cli.raw") == want
    [result] = qcowfast.convert_many([{"src": str(src), "dst": str(tmp_path / "many.raw"),
                                       "preallocation": mode}])
    assert isinstance(result, qcowfast.ConvertResult), result
    assert _state(tmp_path / "many.raw") == want
    # the allocation is what qemu-img's is: all of it, not only the data
    assert want[2] * 512 >= want[1]


def test_refused_where_no_new_file_is_written(source, tmp_path):
    src = source[0]
    with pytest.raises(ValueError, match="preallocation must be"):
        qcowfast.convert(src, tmp_path / "a.raw", preallocation="metadata")
    with pytest.raises(ValueError, match="raw output to a new file"):
        qcowfast.convert(src, tmp_path / "a.qcow2", format="qcow2", preallocation="falloc")
    (tmp_path / "target.raw").write_bytes(bytes(6 * M))
    with pytest.raises(ValueError, match="raw output to a new file"):
        qcowfast.convert(src, tmp_path / "target.raw", existing=True, preallocation="full")
    with pytest.raises(qcowfast.OutputError, match="a stream"):
        qcowfast.convert(src, io.BytesIO(), preallocation="falloc")
    # a fully allocated output over max_output_size is refused before anything is written
    with pytest.raises(qcowfast.OutputError, match=r"\(preallocation\) .* exceeds"):
        qcowfast.convert(src, tmp_path / "b.raw", preallocation="falloc",
                         max_output_size=M)
    assert sorted(os.listdir(tmp_path)) == ["target.raw"]
    assert (tmp_path / "target.raw").read_bytes() == bytes(6 * M)
