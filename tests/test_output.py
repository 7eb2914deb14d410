"""Destinations: replacing files (metadata, permissions, symlinks), writing in place (``existing``,
block devices), streams onto the source, full filesystems, the output cap, O_DIRECT and the
qcow2 dispatch.

Oracles: ``qemu-img convert -O raw`` for bytes (``reference_raw``), ``qemu-img convert -n`` (with
``--target-is-zero``) for what an in-place write leaves in an existing target, ``qemu-img -t none``
for which filesystems refuse O_DIRECT, ``qemu-img check``/``compare`` for qcow2 output, and the
file metadata the test itself set with ``os``.

Root-only set-ups (a loop device, a tiny tmpfs, ramfs, an unprivileged child process) are made
here and always torn down; only the loop-device test skips, by name, where ``losetup`` fails.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import qcowfast
from qcowfast import OutputError, convert
from common import assert_same_bytes, qemu_img, reference_raw, run_cli

K = 1024
M = 1024 * K
TMP_SUFFIX = ".qcowfast-tmp"
NOBODY = 65534
VSIZE = 4 * M


def _leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX))


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """4 MiB qcow2: data at 0 and 1 MiB (1.5 MiB of it), a zero-filled data cluster, a zero
    cluster, a compressed cluster; 1.7 MiB of non-zero guest data in all."""
    d = tmp_path_factory.mktemp("src")
    plain, path = d / "plain.qcow2", d / "src.qcow2"
    qemu_img("create", "-f", "qcow2", plain, str(VSIZE))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k",
                    "-c", "write -P 0x11 1M 1536k", "-c", "write -P 0 2752k 64k",
                    "-c", "write -z 3M 64k", "-c", "write -P 0x77 3584k 128k", plain],
                   check=True, capture_output=True)
    qemu_img("convert", "-c", "-O", "qcow2", plain, path)    # compress where it shrinks
    return path


@contextlib.contextmanager
def _mounted(mnt: Path, fstype: str, options: str | None = None):
    """Mount a fresh `fstype` on `mnt` (root only), unmount it afterwards."""
    mnt.mkdir()
    opts = ["-o", options] if options else []
    proc = subprocess.run(["mount", "-t", fstype, *opts, fstype, str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a {fstype} (run as root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _filled(path: Path, size: int, byte: int = 0xFF) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


# ---------------------------------------------------------------------------------------------
# Replacing a regular file


def test_replace_keeps_mode_owner_xattrs_hard_links_keep_old(src, tmp_path):
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"old contents")
    os.chown(dst, 1234, 5678)
    os.chmod(dst, 0o640)
    os.setxattr(dst, "user.origin", b"cinder")
    os.link(dst, tmp_path / "hard.raw")
    with pytest.raises(OutputError, match="out.raw exists"):
        convert(src, dst)
    convert(src, dst, overwrite=True)
    st = dst.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert os.getxattr(dst, "user.origin") == b"cinder"
    assert_same_bytes(dst.read_bytes(), reference_raw(src), "replaced file")
    assert (tmp_path / "hard.raw").read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []


def test_new_file_mode_follows_umask(src, tmp_path):
    old = os.umask(0o027)
    try:
        convert(src, tmp_path / "new.raw")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.raw").stat().st_mode) == 0o640


def _as_nobody(fn, groups=()) -> str:
    """Run fn() in a forked child with uid/gid nobody; return "ok" or "Type: message"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover (child)
        msg = "child failed"
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                fn()
                msg = "ok"
            except BaseException as exc:           # report everything to the parent
                msg = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_unprivileged_user_cannot_replace_what_it_could_not_write(src):
    if os.geteuid() != 0:
        pytest.fail("this test creates files for another user: run the suite as root")
    shared = Path(tempfile.mkdtemp(prefix="qcowfast-perm-", dir="/tmp"))
    try:
        os.chmod(shared, 0o777)
        source = shared / "src.qcow2"
        shutil.copyfile(src, source)
        os.chmod(source, 0o644)
        readonly = _filled(shared / "readonly.raw", 10)          # root's, 0644
        os.chmod(readonly, 0o644)
        group = _filled(shared / "group.raw", 10)                # writable by nobody's group
        os.chown(group, 0, NOBODY)
        os.chmod(group, 0o664)
        locked = shared / "locked"
        locked.mkdir(mode=0o755)

        msg = _as_nobody(lambda: convert(source, readonly, overwrite=True))
        assert msg.startswith("OutputError:") and "readonly.raw" in msg, msg
        assert "permission denied" in msg.lower(), msg
        msg = _as_nobody(lambda: convert(source, group, overwrite=True), groups=[NOBODY])
        assert msg.startswith("OutputError:") and "group.raw" in msg and "owner" in msg, msg
        msg = _as_nobody(lambda: convert(source, locked / "x.raw"))
        assert msg.startswith("OutputError:") and "x.raw" in msg, msg
        assert TMP_SUFFIX not in msg
        assert readonly.read_bytes() == group.read_bytes() == b"\xff" * 10
        # Control: where nobody may write, nobody converts, and owns the result.
        assert _as_nobody(lambda: convert(source, shared / "mine.raw")) == "ok"
        assert (shared / "mine.raw").stat().st_uid == NOBODY
        assert_same_bytes((shared / "mine.raw").read_bytes(), reference_raw(src), "as nobody")
        assert _leftovers(shared) == [] and os.listdir(locked) == []
    finally:
        shutil.rmtree(shared)


def test_symlink_destination_is_written_through(src, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    target = _filled(real / "disk.raw", 100)
    link = tmp_path / "link.raw"
    link.symlink_to(target)
    convert(src, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_same_bytes(target.read_bytes(), reference_raw(src), "symlink target")
    assert _leftovers(real) == [] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_problems_are_output_errors(src, tmp_path, overwrite):
    dangling = tmp_path / "dangling.raw"
    dangling.symlink_to(tmp_path / "nowhere.raw")
    cases = {dangling: "dangling.raw", tmp_path / "missing" / "x.raw": "x.raw",
             tmp_path: str(tmp_path)}
    for dst, name in cases.items():
        with pytest.raises(OutputError) as info:
            convert(src, dst, overwrite=overwrite)
        assert name in str(info.value) and TMP_SUFFIX not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["dangling.raw"]
    assert not (tmp_path / "nowhere.raw").exists()


# ---------------------------------------------------------------------------------------------
# Writing in place: existing=True (qemu-img -n)


def _qemu_img_n(src, target, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "convert", "-n", *extra, "-O", "raw", str(src),
                           str(target)], capture_output=True, text=True)


@pytest.mark.parametrize("fs", ["disk", "tmpfs"])      # tmpfs: no FALLOC_FL_ZERO_RANGE
@pytest.mark.parametrize("sparse_size", [4096, 0], ids=["S4k", "S0"])
@pytest.mark.parametrize("target_is_zero", [False, True], ids=["", "target-is-zero"])
def test_existing_target_matches_qemu_img_n(src, tmp_path, sparse_size, target_is_zero, fs):
    with contextlib.ExitStack() as stack:
        where = tmp_path if fs == "disk" else stack.enter_context(
            _mounted(tmp_path / "tmpfs", "tmpfs", "size=32m"))
        _existing_target_matches_qemu_img_n(src, where, sparse_size, target_is_zero)


def _existing_target_matches_qemu_img_n(src, tmp_path, sparse_size, target_is_zero):
    ours = _filled(tmp_path / "ours.raw", 6 * M)
    theirs = _filled(tmp_path / "theirs.raw", 6 * M)
    os.link(ours, tmp_path / "hard.raw")
    ino = ours.stat().st_ino
    extra = ["-S", str(sparse_size)] + (["--target-is-zero"] if target_is_zero else [])
    assert _qemu_img_n(src, theirs, *extra).returncode == 0
    result = convert(src, ours, existing=True, sparse_size=sparse_size,
                     target_is_zero=target_is_zero)
    assert result.virtual_size == VSIZE
    assert ours.stat().st_ino == ino, "an in-place write must not replace the file"
    assert_same_bytes(ours.read_bytes(), theirs.read_bytes(), "in place vs qemu-img -n")
    assert (tmp_path / "hard.raw").read_bytes() == ours.read_bytes()
    if not target_is_zero:
        assert_same_bytes(ours.read_bytes()[:VSIZE], reference_raw(src), "guest bytes")


def test_existing_target_too_small_or_missing(src, tmp_path):
    small = _filled(tmp_path / "small.raw", 2 * M)
    assert _qemu_img_n(src, small).returncode != 0             # qemu-img refuses it too
    with pytest.raises(OutputError, match="small.raw.*smaller"):
        convert(src, small, existing=True)
    assert small.read_bytes() == b"\xff" * (2 * M)
    with pytest.raises(OutputError, match="absent.raw does not exist"):
        convert(src, tmp_path / "absent.raw", existing=True)
    assert sorted(os.listdir(tmp_path)) == ["small.raw"]


def test_existing_target_in_source_chain_refused(src, tmp_path):
    copy = tmp_path / "src.qcow2"
    shutil.copyfile(src, copy)
    before = _digest(copy)
    for dst in (copy, tmp_path / "again.qcow2"):
        if dst != copy:
            os.link(copy, dst)
        with pytest.raises(OutputError, match="source image"):
            convert(copy, dst, existing=True)
    assert _digest(copy) == before


# ---------------------------------------------------------------------------------------------
# Block devices (loop devices)


@pytest.fixture
def loop_device(tmp_path):
    """make(size) -> a loop device over a file of `size` 0xff bytes; detached afterwards."""
    made = []

    def make(size: int) -> str:
        backing = _filled(tmp_path / f"loop{len(made)}.img", size)
        proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot create a loop device: {proc.stderr.strip()}")
        made.append(proc.stdout.strip())
        return made[-1]

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def _device_bytes(dev: str) -> bytes:
    with open(dev, "rb") as f:
        return f.read()


@pytest.mark.parametrize("argv", [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-c"]],
                         ids=" ".join)
def test_block_device_source(tmp_path, loop_device, argv):
    """A raw block device as the source (its st_size is 0: its size comes from the device):
    long data runs are mapped and written like a file's, the bytes are qemu-img's (-O raw
    failed: the mapping's size check read 0 and took the device for a file cut short)."""
    dev = loop_device(8 * M)
    with open(dev, "r+b") as f:
        f.write(os.urandom(3 * M))                     # data, then 0xff to the end
    out, ref = tmp_path / "out", tmp_path / "ref"
    qemu_img("convert", "-f", "raw", *argv, dev, ref)
    proc = subprocess.run([sys.executable, "-m", "qcowfast", "convert", "-q", "-f", "raw", *argv,
                           dev, out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if argv[1] == "raw":
        assert _digest(out) == _digest(ref)
    else:
        qemu_img("compare", "-q", "-f", "raw", dev, out)


def test_block_device_written_in_place(src, tmp_path, loop_device):
    dev = loop_device(VSIZE + M)
    ref = reference_raw(src)
    tail = b"\xff" * M
    with pytest.raises(OutputError, match="block device.*overwrite"):
        convert(src, dev)
    assert _device_bytes(dev) == b"\xff" * (VSIZE + M)

    result = convert(src, dev, overwrite=True)
    data = _device_bytes(dev)
    assert_same_bytes(data[:VSIZE], ref, "block device")
    assert data[VSIZE:] == tail, "bytes past the image were touched"
    assert stat.S_ISBLK(os.stat(dev).st_mode)
    assert result.virtual_size == VSIZE and result.bytes_written < VSIZE

    # existing=True + target_is_zero leaves holes alone, as qemu-img -n --target-is-zero.
    with open(dev, "r+b") as f:
        f.write(b"\xff" * (VSIZE + M))
    theirs = _filled(tmp_path / "theirs.raw", VSIZE + M)
    assert _qemu_img_n(src, theirs, "--target-is-zero").returncode == 0
    convert(src, dev, existing=True, target_is_zero=True)
    assert_same_bytes(_device_bytes(dev), theirs.read_bytes(), "target_is_zero on a device")

    # The CLI replaces by default, as qemu-img does: `qcowfast convert -O raw disk.qcow2 /dev/X`.
    with open(dev, "r+b") as f:
        f.write(b"\xff" * (VSIZE + M))
    proc = subprocess.run(_cli("convert", "-O", "raw", src, dev), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_bytes(_device_bytes(dev), ref + tail, "CLI onto a block device")
    proc = subprocess.run(_cli("convert", "--no-clobber", "-O", "raw", src, dev),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and dev in proc.stderr and "Traceback" not in proc.stderr

    # Through a symlink (as /dev/disk/by-id names are), fully allocated, O_DIRECT.
    link = tmp_path / "by-id"
    link.symlink_to(dev)
    convert(src, link, existing=True, sparse_size=0, direct=True)
    assert link.is_symlink()
    data = _device_bytes(dev)
    assert_same_bytes(data[:VSIZE], ref, "block device via symlink, direct")
    assert data[VSIZE:] == tail


def test_host_device_output_format(src, tmp_path, loop_device):
    """`-O host_device` (ironic/bifrost: `-t directsync -O host_device IMG /dev/sdX`) writes
    the raw bytes into the device, as qemu-img does; a file is refused, as qemu-img refuses."""
    ours, theirs = loop_device(VSIZE + M), loop_device(VSIZE + M)
    argv = ["-f", "qcow2", "-t", "directsync", "-O", "host_device", src]
    proc = subprocess.run(_cli("convert", *argv, ours), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["qemu-img", "convert", *map(str, argv), theirs], check=True)
    assert_same_bytes(_device_bytes(ours), _device_bytes(theirs), "-O host_device")
    assert_same_bytes(_device_bytes(ours)[:VSIZE], reference_raw(src), "-O host_device")
    for dst in (tmp_path / "file.raw", tmp_path / "missing.raw"):
        if dst.name == "file.raw":
            dst.write_bytes(b"\xff" * M)
        proc = subprocess.run(_cli("convert", "-O", "host_device", src, dst),
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "host_device" in proc.stderr and "Traceback" not in proc.stderr
        assert subprocess.run(["qemu-img", "convert", "-O", "host_device", src, dst],
                              capture_output=True).returncode == 1
    assert (tmp_path / "file.raw").read_bytes() == b"\xff" * M and not dst.exists()


def test_block_device_too_small_or_holding_the_source_refused(src, tmp_path, loop_device):
    small = loop_device(2 * M)
    with pytest.raises(OutputError, match="smaller"):
        convert(src, small, overwrite=True)
    assert _device_bytes(small) == b"\xff" * (2 * M)
    # A raw image on a device, converted onto the same device under another node name.
    disk = loop_device(VSIZE)
    before = _device_bytes(disk)
    alias = tmp_path / "alias"
    os.mknod(alias, 0o600 | stat.S_IFBLK, os.stat(disk).st_rdev)
    with pytest.raises(OutputError, match="source image"):
        convert(disk, alias, overwrite=True, src_format="raw")
    assert _device_bytes(disk) == before
    # A loop device backed by the source file itself.
    proc = subprocess.run(["losetup", "-f", "--show", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        before = _digest(src)
        with pytest.raises(OutputError, match="source image"):
            convert(src, proc.stdout.strip(), overwrite=True)
        assert _digest(src) == before
    finally:
        subprocess.run(["losetup", "-d", proc.stdout.strip()], check=True)


# ---------------------------------------------------------------------------------------------
# Streams


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "qcowfast", *map(str, args)]


def test_stream_onto_source_refused(images, tmp_path):
    image = images.copy("c4k-chain3-short-base", tmp_path / "chain")
    files = [layer.path for layer in image.chain]
    before = {f: _digest(f) for f in files}
    for f in files:
        # qcowfast convert src - 1<>f
        with open(f, "r+b") as out:
            proc = subprocess.run(_cli("convert", image.path, "-"), stdout=out,
                                  stderr=subprocess.PIPE, text=True)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "source image" in proc.stderr
        with open(f, "r+b") as out, pytest.raises(OutputError, match="source image"):
            convert(image.path, out)
    assert {f: _digest(f) for f in files} == before
    # Control: a stream into another file is fine.
    with open(tmp_path / "other.raw", "wb") as out:
        proc = subprocess.run(_cli("convert", image.path, "-"), stdout=out,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_bytes((tmp_path / "other.raw").read_bytes(), reference_raw(image.path), "stream")


def test_stream_to_terminal_refused(src):
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "wb") as tty, pytest.raises(OutputError, match="terminal"):
            convert(src, tty)
    finally:
        os.close(master)


# ---------------------------------------------------------------------------------------------
# Full filesystems and the output cap


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    with _mounted(tmp_path / "small", "tmpfs", "size=1m") as mnt:
        yield mnt


def test_enospc_is_an_output_error_and_leaves_nothing(src, small_fs):
    dst = small_fs / "out.raw"
    with pytest.raises(OutputError) as info:
        convert(src, dst)                       # 1.7 MiB of data onto 1 MiB
    msg = str(info.value)
    assert "out.raw" in msg and os.strerror(errno.ENOSPC) in msg and TMP_SUFFIX not in msg
    assert os.listdir(small_fs) == []
    # Fully allocated: refused before anything is written, from the free space.
    with pytest.raises(OutputError, match="out.raw needs 4194304 bytes"):
        convert(src, dst, sparse_size=0)
    assert os.listdir(small_fs) == []
    # A file being replaced stays as it was.
    dst.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="out.raw"):
        convert(src, dst, overwrite=True)
    assert os.listdir(small_fs) == ["out.raw"] and dst.read_bytes() == b"keep me"


def test_max_output_size(src, tmp_path):
    dst = tmp_path / "out.raw"
    with pytest.raises(OutputError, match="out.raw.*max_output_size"):
        convert(src, dst, max_output_size=256 * K, unit_size=256 * K)
    with pytest.raises(OutputError, match="max_output_size"):
        convert(src, dst, max_output_size=VSIZE - 1, sparse_size=0)
    with pytest.raises(OutputError, match="max_output_size"):
        convert(src, dst, max_output_size=64 * K, format="qcow2")
    assert os.listdir(tmp_path) == []
    result = convert(src, dst, max_output_size=VSIZE)
    assert_same_bytes(dst.read_bytes(), reference_raw(src), "under the cap")
    assert result.bytes_written <= VSIZE
    with pytest.raises(ValueError):
        convert(src, tmp_path / "x.raw", max_output_size=-1)


# ---------------------------------------------------------------------------------------------
# O_DIRECT


def test_direct_output(src, tmp_path):
    dst = tmp_path / "out.raw"
    convert(src, dst, direct=True)
    assert_same_bytes(dst.read_bytes(), reference_raw(src), "direct")
    assert dst.stat().st_blocks * 512 < VSIZE, "direct output lost its holes"
    # An odd-sized raw source: the last piece is not a whole sector.
    odd = tmp_path / "odd.img"
    odd.write_bytes(os.urandom(M + 100) + bytes(64 * K) + b"end")
    convert(odd, tmp_path / "odd.raw", direct=True, src_format="raw")
    assert_same_bytes((tmp_path / "odd.raw").read_bytes(), reference_raw(odd), "odd direct")


def test_direct_unaligned_pieces_fall_back_to_the_page_cache(src, tmp_path):
    from qcowfast.output import FileOutput
    data = os.urandom(10000)
    with qcowfast.open(src) as image, FileOutput(tmp_path / "x.raw", image, direct=True) as out:
        out.prepare(8192 + len(data), allocate=False)
        out.pwrite(memoryview(data)[1:], 8193)               # unaligned offset, length, address
        out.pwrite(memoryview(data)[:1], 8192)
        out.commit()
    assert (tmp_path / "x.raw").read_bytes() == bytes(8192) + data
    assert _leftovers(tmp_path) == []


def test_direct_refused_where_qemu_img_refuses_it(src, tmp_path):
    with _mounted(tmp_path / "ramfs", "ramfs") as mnt:
        qemu = subprocess.run(["qemu-img", "convert", "-t", "none", "-O", "raw", str(src),
                               str(mnt / "qemu.raw")], capture_output=True, text=True)
        assert qemu.returncode != 0 and "O_DIRECT" in qemu.stderr
        with pytest.raises(OutputError, match="ours.raw.*O_DIRECT"):
            convert(src, mnt / "ours.raw", direct=True)
        assert "ours.raw" not in os.listdir(mnt) and _leftovers(mnt) == []
        convert(src, mnt / "buffered.raw")                 # without direct it works


# ---------------------------------------------------------------------------------------------
# qcow2 output and option checks


def test_qcow2_dispatch(src, tmp_path):
    dst = tmp_path / "out.qcow2"
    dst.write_bytes(b"old")
    os.chmod(dst, 0o600)
    result = convert(src, dst, format="qcow2", compression="zlib", overwrite=True, direct=True)
    info = qemu_img("info", "--output=json", dst).stdout
    assert '"format": "qcow2"' in info
    qemu_img("check", dst)
    qemu_img("compare", "-q", src, dst)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert result.bytes_written == dst.stat().st_size
    assert _leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="cannot stream qcow2"):
        convert(src, "-", format="qcow2")
    with pytest.raises(OutputError, match="in place"):
        convert(src, dst, format="qcow2", existing=True)
    qemu_img("compare", "-q", src, dst)


@pytest.mark.parametrize("kwargs", [
    dict(format="vmdk"), dict(compression="zlib"), dict(format="qcow2", compression="lz4"),
    dict(format="qcow2", level=5), dict(format="qcow2", cluster_size=1000),
    dict(format="qcow2", cluster_size=256), dict(format="qcow2", cluster_size=4 * M),
    dict(src_format="vmdk"), dict(sparse_size=100), dict(sparse_size=32 * M),
    dict(format="qcow2", sparse_size=10 ** 30),         # (an OverflowError in the kernel)
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_invalid_options(src, tmp_path, kwargs):
    with pytest.raises(ValueError):
        convert(src, tmp_path / "x", **kwargs)
    assert os.listdir(tmp_path) == []



def _nocow_flag(path) -> bool:
    """Whether `path` has the no-copy-on-write attribute (FS_IOC_GETFLAGS & FS_NOCOW_FL)."""
    import fcntl
    flags = bytearray(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x80086601, flags)
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(int.from_bytes(flags, sys.byteorder) & 0x00800000)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_nocow_as_qemu_img_sets_it(src, tmp_path, fmt):
    """nocow=True is qemu-img's -o nocow=on: the new file gets the attribute where the file
    system has it (btrfs), and the conversion goes on without it elsewhere, as in qemu-img,
    whose output is the oracle for both the bytes and the attribute."""
    want, got = tmp_path / f"want.{fmt}", tmp_path / f"got.{fmt}"
    qemu_img("convert", "-O", fmt, "-o", "nocow=on", src, want)
    convert(src, got, format=fmt, nocow=True)
    assert _nocow_flag(got) == _nocow_flag(want)
    if fmt == "raw":
        assert _digest(got) == _digest(want)
    else:
        qemu_img("compare", "-q", want, got)
        qemu_img("check", got)
    with pytest.raises(ValueError, match="nocow"):
        convert(src, tmp_path / "x", nocow="on")
    assert _leftovers(tmp_path) == []


def test_a_killed_conversions_temporary_file_is_removed_by_the_next(src, tmp_path):
    """A conversion killed by a signal it cannot catch (SIGKILL; SIGQUIT and SIGUSR2 end the
    process as uncaught) leaves its hidden temporary file; the next conversion to the same
    destination removes it (a live one's, locked, stays)."""
    dst = tmp_path / "out.qcow2"
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        for i in range(64):
            f.write(os.urandom(1024) * 1024)       # 64 MiB that compress slowly
    proc = subprocess.Popen([sys.executable, "-m", "qcowfast", "convert", "-q", "-c", "-O",
                             "qcow2", "-m", "1", big, dst])
    try:
        deadline = time.monotonic() + 60
        while not _leftovers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _leftovers(tmp_path), "the conversion never created its temporary file"
    finally:
        proc.kill()
        proc.wait()
    left = _leftovers(tmp_path)
    assert left and not dst.exists()
    convert(src, dst, format="qcow2")
    assert _leftovers(tmp_path) == []
    qemu_img("compare", "-q", src, dst)


@pytest.mark.parametrize("fails", [1, 2])
def test_a_temporary_name_that_cannot_be_removed_after_the_link(src, tmp_path, monkeypatch,
                                                                fails):
    """The output is linked to its name, then its temporary name removed: an I/O error on
    that removal (a flaky NFS server) reported "cannot publish" for a complete, published
    output. It is tried once more; left, it is another name for the output, which the next
    conversion to that destination sweeps."""
    real_unlink, failed = os.unlink, []

    def unlink(path, *args, **kwargs):
        if os.fsdecode(path).endswith(".qcowfast-tmp") and len(failed) < fails:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        return real_unlink(path, *args, **kwargs)
    dst = tmp_path / "out.raw"
    monkeypatch.setattr(os, "unlink", unlink)
    result = convert(src, dst, overwrite=False)
    monkeypatch.undo()
    assert len(failed) == fails and isinstance(result, qcowfast.ConvertResult)
    assert_same_bytes(dst.read_bytes(), reference_raw(src), "published output")
    assert len(_leftovers(tmp_path)) == fails - 1
    convert(src, tmp_path / "other.raw")            # (another destination: not swept)
    assert len(_leftovers(tmp_path)) == fails - 1
    convert(src, dst, overwrite=True)
    assert _leftovers(tmp_path) == []
    assert_same_bytes(dst.read_bytes(), reference_raw(src), "converted again")


@pytest.mark.parametrize("name", ["n" * 229, "n" * 240, "n" * 255, "é" * 127, "x" + "é" * 127])
def test_names_up_to_name_max_convert(src, tmp_path, name):
    """Output names qemu-img takes (up to 255 bytes) convert, raw and qcow2: the temporary
    file beside them keeps within NAME_MAX (the name's start and a digest of it); a killed
    run's temporary file of such a name is found and removed by the next conversion."""
    from qcowfast.output import TMP_SUFFIX as suffix, temp_prefix
    dst = tmp_path / name
    want = subprocess.run(["qemu-img", "convert", "-O", "raw", src, tmp_path / "want.raw"],
                          capture_output=True)
    assert want.returncode == 0
    for fmt in ("raw", "qcow2"):
        proc = run_cli("convert", "-O", fmt, src, dst)
        assert proc.returncode == 0, proc.stderr
        same = subprocess.run(["qemu-img", "compare", "-F", "raw", dst, tmp_path / "want.raw"],
                              capture_output=True)
        assert same.returncode == 0, same
    prefix = temp_prefix(name)
    assert len(os.fsencode(prefix)) <= 255 - 26 and prefix != temp_prefix(name + "x")
    stale = tmp_path / f"{prefix}l{'0' * 12}{suffix}"              # a killed run's leftover
    stale.write_bytes(b"partial")
    assert run_cli("convert", "-O", "raw", src, dst).returncode == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, "want.raw"])
