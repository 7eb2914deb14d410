"""What `qemu-img info` says about an image, read from the image file alone.

`info()` returns the dictionary `qemu-img info --output=json` prints (QEMU 7.2 block/qapi.c
bdrv_query_image_info() and block/qcow2.c qcow2_get_specific_info()). It reads only the header
cluster, the snapshot table and the bitmap directory: backing and external data files are named,
never opened, because an untrusted image may name any host file. With `backing_chain=True` the
chain is followed under the same path policy as `qcowfast.open` (qcowfast/paths.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time

from .bitmaps import check_bitmaps_at_open, read_bitmap_directory
from .constants import (
    MAX_CHAIN_DEPTH, RAW_FORMATS, Compatible, CompressionType, CryptMethod,
)
from .errors import (BackingChainError, FormatError, ImageOpenError, UnsafePathError,
                     UnsupportedFeature, in_chain)
from .header import Header, read_header, require_refcount_table, warn_stale_bitmaps
from .locks import check_not_locked
from .paths import (
    OpenedFile, directories, full_backing_filename, open_file, resolve_reference,
)
from .probe import detect_format, driver_refusal
from .preads import pread_padded
from .snapshots import Snapshot, read_snapshot_table

SECTOR = 512


# LUKS v1 header (QEMU crypto/block-luks.c QCryptoBlockLUKSHeader): magic, version, cipher
# name, cipher mode, hash spec, payload offset (sectors), master key length, digest, salt,
# iterations, uuid; then 8 key slots of active, iterations, salt, key offset (sectors), stripes.
_LUKS = struct.Struct(">6sH32s32s32sII20s32sI40s")
_LUKS_SLOT = struct.Struct(">II32sII")
_LUKS_MAGIC = b"LUKS\xba\xbe"
_LUKS_SLOT_ENABLED = 0x00AC71F3
_LUKS_SECTOR = 512
_LUKS_STRIPES = 4000
_LUKS_CIPHERS = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32),
                 "twofish": (16, 24, 32), "sm4": (16,)}
_LUKS_MODES = ("ecb", "cbc", "xts", "ctr")
_LUKS_IVGENS = ("plain", "plain64", "essiv")
_LUKS_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


def _encrypt_info(fd: int, h: Header, file_size: int) -> dict:
    """The "encrypt" data of `qemu-img info` (QEMU qcow2_get_specific_info()).

    Legacy AES has no header of its own. LUKS: the header is read from the full disk encryption
    header extension and checked like qcrypto_block_luks_open() does without a key
    (QCRYPTO_BLOCK_OPEN_NO_IO); nothing is decrypted.
    """
    if h.crypt_method == CryptMethod.AES:
        return {"format": "aes"}
    if h.crypto_header is None:
        raise FormatError("LUKS-encrypted image without the full disk encryption header "
                          "extension (crypt_method 2)")
    offset, length = h.crypto_header
    if offset % h.cluster_size:
        raise FormatError(f"full disk encryption header offset {offset:#x} is not a multiple of "
                          f"the cluster size {h.cluster_size}")
    need = _LUKS.size + 8 * _LUKS_SLOT.size
    if length < need:
        raise FormatError(f"full disk encryption header extension: {length} bytes hold no LUKS "
                          f"header ({need} bytes)")
    raw = pread_padded(fd, need, offset)
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_sector, key_bytes, _digest,
     _salt, mk_iters, uuid) = _LUKS.unpack_from(raw)
    if magic != _LUKS_MAGIC:
        raise FormatError("LUKS header: bad magic (volume is not in LUKS format)")
    if version != 1:
        raise UnsupportedFeature(f"LUKS header: version {version} is not supported")
    names = []
    for what, field in (("cipher name", cipher_name), ("cipher mode", cipher_mode),
                        ("hash spec", hash_spec), ("uuid", uuid)):
        if b"\0" not in field:
            raise FormatError(f"LUKS header: {what} is not NUL terminated")
        names.append(field.split(b"\0", 1)[0].decode("ascii", "replace"))
    cipher, mode_spec, hash_alg, uuid_text = names
    mode, _, ivgen = mode_spec.partition("-")
    ivgen, _, ivhash = ivgen.partition(":")
    bits = key_bytes // 2 if mode == "xts" else key_bytes
    if bits not in _LUKS_CIPHERS.get(cipher, ()):
        raise UnsupportedFeature(f"LUKS header: cipher {cipher!r} with a {key_bytes}-byte key")
    if mode not in _LUKS_MODES or ivgen not in _LUKS_IVGENS or hash_alg not in _LUKS_HASHES \
            or (ivhash and ivhash not in _LUKS_HASHES):
        raise UnsupportedFeature(f"LUKS header: cipher mode {mode_spec!r} or hash {hash_alg!r}")
    header_sectors = -(-need // 4096) * 4096 // _LUKS_SECTOR
    split_sectors = -(-key_bytes * _LUKS_STRIPES // 4096) * 4096 // _LUKS_SECTOR
    slots, spans = [], []
    for i in range(8):
        active, iters, _s, key_sector, stripes = _LUKS_SLOT.unpack_from(
            raw, _LUKS.size + i * _LUKS_SLOT.size)
        # qcrypto_block_luks_check_header(): every slot, active or not.
        if stripes != _LUKS_STRIPES:
            raise FormatError(f"LUKS key slot {i} is corrupted (stripes {stripes})")
        if key_sector < header_sectors:
            raise FormatError(f"LUKS key slot {i} overlaps the LUKS header")
        if key_sector + split_sectors > payload_sector:
            raise FormatError(f"LUKS key slot {i} overlaps the encrypted payload")
        for j, (a, b) in enumerate(spans):
            if key_sector < b and a < key_sector + split_sectors:
                raise FormatError(f"LUKS key slots {j} and {i} overlap")
        spans.append((key_sector, key_sector + split_sectors))
        slot = {"active": active == _LUKS_SLOT_ENABLED}
        if slot["active"]:
            slot["iters"] = iters
        slot["key-offset"] = key_sector * _LUKS_SECTOR
        if slot["active"]:
            slot["stripes"] = stripes
        slots.append(slot)
    # Keys in the order QEMU's QDict prints them (hash buckets), as qemu-img does.
    out = {"ivgen-alg": ivgen, "hash-alg": hash_alg, "cipher-alg": f"{cipher}-{bits * 8}",
           "uuid": uuid_text}
    if ivgen == "essiv":
        out["ivgen-hash-alg"] = ivhash
    out.update({"format": "luks", "cipher-mode": mode, "slots": slots,
                "payload-offset": payload_sector * _LUKS_SECTOR, "master-key-iters": mk_iters})
    return out


def _pstrcpy(text: str, size: int) -> str:
    """`text` as QEMU's pstrcpy() into a char[size] leaves it: at most size - 1 bytes (a
    character cut in two stays cut: JSON then shows U+FFFD, as QEMU's)."""
    raw = text.encode("utf-8", "surrogateescape")
    return raw[:size - 1].decode("utf-8", "surrogateescape") if len(raw) >= size else text


def snapshot_json(s: Snapshot) -> dict:
    """One snapshot as `qemu-img info --output=json` lists it (QAPI SnapshotInfo)."""
    out = {}
    if s.icount != -1:
        out["icount"] = s.icount
    vm_state = s.vm_state_size - (1 << 64) if s.vm_state_size >= 1 << 63 else s.vm_state_size
    # QEMUSnapshotInfo's id_str[128] and name[256] (qcow2_snapshot_list()); QAPI's
    # vm-state-size is an int64.
    out.update({"vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                "name": _pstrcpy(s.name, 256), "date-sec": s.date_sec,
                "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                "id": _pstrcpy(s.id, 128), "vm-state-size": vm_state})
    return out


def _qcow2_info(fd: int, name: str, st: os.stat_result) -> dict:
    # Like qemu-img, describe images whose tables run past the end of the file (truncated
    # copies): info reads none of those tables.
    h = read_header(fd, st.st_size, tables_in_file=False, name=name, allow_encrypted=True)
    warn_stale_bitmaps(h, name)
    require_refcount_table(h)      # qemu-img info opens without BDRV_O_CHECK
    encrypt = _encrypt_info(fd, h, st.st_size) if h.crypt_method else None
    snapshots = read_snapshot_table(fd, h)[0] if h.nb_snapshots else []
    if h.has_data_file:
        snapshots = []      # qcow2_snapshot_list(): none with an external data file (ENOTSUP)
    out: dict = {}
    if h.backing_file and h.backing_format:
        out["backing-filename-format"] = h.backing_format
    if snapshots:
        out["snapshots"] = [snapshot_json(s) for s in snapshots]
    out.update({"virtual-size": h.size // SECTOR * SECTOR, "filename": name,
                "cluster-size": h.cluster_size, "format": "qcow2",
                "actual-size": st.st_blocks * 512})
    specific: dict = {"compat": "0.10" if h.version == 2 else "1.1",
                      "compression-type": CompressionType(h.compression_type).name.lower()}
    if h.version >= 3:
        specific["lazy-refcounts"] = bool(h.compatible_features & Compatible.LAZY_REFCOUNTS)
        check_bitmaps_at_open(fd, h, st.st_size)
        bitmaps = read_bitmap_directory(fd, h, st.st_size)
        if bitmaps:
            specific["bitmaps"] = [{"flags": b.flag_names(), "name": b.name,
                                    "granularity": b.granularity} for b in bitmaps]
    specific["refcount-bits"] = h.refcount_bits
    if h.version >= 3 and h.data_file is not None:     # (an empty name too, as QEMU)
        specific["data-file"] = h.data_file
    if encrypt is not None:
        specific["encrypt"] = encrypt
    if h.version >= 3:
        if h.has_data_file:
            specific["data-file-raw"] = h.data_file_raw
        specific["corrupt"] = h.corrupt
        specific["extended-l2"] = h.extended_l2
    out["format-specific"] = {"type": "qcow2", "data": specific}
    if h.backing_file:
        out["full-backing-filename"] = full_backing_filename(name, h.backing_file)
    if encrypt is not None:
        out["encrypted"] = True
    if h.backing_file:
        out["backing-filename"] = h.backing_file
    out["dirty-flag"] = h.dirty
    return out


def _unsupported_format(path: str, fmt: str, fd: int | None) -> UnsupportedFeature:
    """The refusal of file `path` in format `fmt` (a backing file's, named in its image),
    which qcowfast does not read; where QEMU fails too (probe.driver_refusal), in its words:
    img_info's loop opens each layer on its own ("Could not open 'PATH': ...")."""
    exc = UnsupportedFeature(f"{path}: format {fmt!r} is not supported (qcowfast reads qcow2 "
                             "and raw)")
    refused = driver_refusal(fmt, fd)
    if refused is not None:
        (exc.qemu_chain, exc.qemu_hint), exc.qemu_top = refused, path
    return exc


def _layer_info(opened: OpenedFile, fmt: str | None, force_share: bool = False
                ) -> tuple[dict, tuple[int, int]]:
    """Info of one file (qcow2 or raw, probed when `fmt` is None) and its (st_dev, st_ino).

    `opened` is from paths.open_file (O_NONBLOCK: a FIFO cannot hang it; FIFOs, sockets and
    directories refused) or resolve_reference: its checked descriptor is the one read, then
    closed (its dir_fd stays: the next layer's name resolves from it). Foreign formats are
    refused by name (probe.detect_format).
    """
    path, fd, st = opened.path, opened.fd, opened.st
    try:
        if fmt is None:
            fmt = detect_format(fd, path)
        if fmt == "qcow2":
            # qemu-img info checks QEMU's write lock on qcow2 files only: it reads no data,
            # so a raw file's lock is not tested (QEMU block/raw-format.c passes perms through).
            if not force_share:
                check_not_locked(fd, path)
            out = _qcow2_info(fd, path, st)
        elif fmt in RAW_FORMATS:
            out = {"virtual-size": -(-opened.size // SECTOR) * SECTOR, "filename": path,
                   "format": fmt, "actual-size": st.st_blocks * 512, "dirty-flag": False}
        else:
            raise _unsupported_format(path, fmt, fd)
        return out, (st.st_dev, st.st_ino)
    finally:
        os.close(opened.detach())


def info(path, *, backing_chain: bool = False, backing_dirs=(), fmt: str | None = None,
         max_depth: int = MAX_CHAIN_DEPTH, force_share: bool = False):
    """Describe an image as `qemu-img info --output=json` does.

    Parameters
    ----------
    path : str or os.PathLike
        The image; reported under this name (`filename`), as qemu-img does.
    backing_chain : bool
        Describe the whole backing chain: return a list, top image first. Backing files are
        followed only under the path policy of `qcowfast.open` (see `backing_dirs`).
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing files named in images.
    fmt : "qcow2", "raw" or None
        Format of `path`; None probes it (QCOW2 magic, else raw), as qemu-img does.
    max_depth : int
        Longest backing chain followed.
    force_share : bool
        Describe images a running QEMU holds open for writing (qemu-img -U).

    Returns
    -------
    dict, or list of dict with `backing_chain`
        The keys and values of `qemu-img info --output=json`.

    Raises
    ------
    QcowError
        The image (or, with `backing_chain`, a file of its chain) cannot be described; OSError
        when a file cannot be opened at all.
    """
    from .arguments import boolean, format_name, integer
    backing_chain = boolean(backing_chain, "backing_chain")
    force_share = boolean(force_share, "force_share")
    max_depth = integer(max_depth, "max_depth", 0, what="an integer of at least 0")
    fmt = format_name(fmt, "fmt")
    name = os.fsdecode(os.fspath(path))
    allowed = directories(backing_dirs)
    # Each layer keeps the directory it was reached in (dir_fd) until the next is found.
    opened = open_file(name, "image", keep_dir=backing_chain)
    try:
        top, ident = _layer_info(opened, fmt, force_share)
        if not backing_chain:
            return top
        chain, seen = [top], {ident}
        current = top
        while "backing-filename" in current:
            if len(chain) > max_depth:
                raise BackingChainError(f"backing chain of {name} is deeper than {max_depth}")
            fmt = current.get("backing-filename-format")
            if fmt is not None and driver_refusal(fmt) is not None:
                # (QEMU finds the driver before it opens the file: bdrv_fill_options())
                raise _unsupported_format(current["full-backing-filename"], fmt, None)
            try:
                found = resolve_reference(opened, current["backing-filename"], "backing file",
                                          allowed)
            except ImageOpenError as exc:
                # img_info's loop opens each layer on its own: its error is bdrv_open()'s,
                # "Could not open 'NAME': ...", under "Could not open 'NAME': " again.
                if exc.strerror and exc.filename is not None:
                    in_chain(exc, exc.filename, backing=False)
                raise
            except UnsafePathError as exc:
                if exc.qemu_chain is not None and exc.qemu_top is None:
                    exc.qemu_top = current["backing-filename"]     # (Unknown protocol 'X')
                raise
            opened.close()
            opened = found
            current, ident = _layer_info(opened, fmt, force_share)
            if ident in seen:
                # (qemu-img tells a loop by the name repeated, qcowfast by the file)
                raise BackingChainError(f"Backing file '{opened.path}' creates an infinite "
                                        "loop.")
            seen.add(ident)
            chain.append(current)
        return chain
    finally:
        opened.close()


# -- rendering ---------------------------------------------------------------------------------
def format_json(result) -> str:
    """Render `info()`'s result as qemu-img does (indented JSON, one trailing newline)."""
    return qemu_json(result) + "\n"


# QEMU's qobject_to_json_pretty(): \u escapes in upper case, and an empty list or dict opens
# and closes on lines of their own. (A string value always ends in a quote, so neither
# pattern can match inside one.)
_LOWER_ESCAPE = re.compile(r'(?<!\\)((?:\\\\)*)\\u([0-9a-f]{4})')
_EMPTY = re.compile(r'^( *)("(?:[^"\\]|\\.)*": )?(\[\]|\{\})(,?)$', re.M)


def qemu_json(value) -> str:
    """`value` as QEMU prints JSON (qobject_to_json_pretty, 4-space indents)."""
    text = json.dumps(_qemu_strings(value), indent=4)
    text = _LOWER_ESCAPE.sub(lambda m: m.group(1) + "\\u" + m.group(2).upper(), text)
    return _EMPTY.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{m.group(3)[0]}\n"
                                f"{m.group(1)}{m.group(3)[1]}{m.group(4)}", text)


def _qemu_strings(value):
    """`value` with every string read as QEMU's JSON writer reads bytes (to_json with
    mod_utf8_codepoint): an invalid or overlong sequence, a surrogate or a noncharacter becomes
    one U+FFFD. Undecodable bytes of names arrive here as surrogate escapes."""
    if isinstance(value, dict):
        return {k: _qemu_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_qemu_strings(v) for v in value]
    if not isinstance(value, str) or value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:                  # a surrogate no decoder made: QEMU's bytes too
        raw = value.encode("utf-8", "surrogatepass")
    out, i, n = [], 0, len(raw)
    while i < n:
        byte = raw[i]
        i += 1
        if byte < 0x80:
            out.append(chr(byte))
            continue
        if byte >= 0xFE or not byte & 0x40:     # impossible byte, stray continuation byte
            out.append("\ufffd")
            continue
        length, mask = 0, 0x80
        while byte & mask:
            length, mask = length + 1, mask >> 1
        cp, good = byte & (mask - 1), True
        for _ in range(1, length):
            nxt = raw[i] if i < n else 0
            if nxt & 0xC0 != 0x80:
                good = False                    # missing continuation byte: not consumed
                break
            i += 1
            cp = cp << 6 | nxt & 0x3F
        if good and (cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF
                     or cp & 0xFFFE == 0xFFFE
                     or (cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2))):
            good = False
        out.append(chr(cp) if good else "\ufffd")
    return "".join(out)


_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)   # shortest form per length


def size_to_str(value: int) -> str:
    """A size the way qemu-img prints one: three significant digits and a binary unit."""
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    unit = min(int((exponent - 1) / 10), 6)          # C division: truncates toward zero
    return f"{value / (1 << (unit * 10)):0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[unit]}B"


def _clock(nsec: int) -> str:
    secs = nsec // 1_000_000_000
    return (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{nsec // 1_000_000 % 1000:03d}")


def _dump_value(lines: list, value, indent: int) -> None:
    pad = " " * indent
    items = value.items() if isinstance(value, dict) else (
        (f"[{i}]", v) for i, v in enumerate(value))
    for key, item in items:
        label = key.replace("-", " ")
        if isinstance(item, (dict, list)):
            lines.append(f"{pad}{label}:")
            _dump_value(lines, item, indent + 4)
        else:
            text = str(item).lower() if isinstance(item, bool) else str(item)
            lines.append(f"{pad}{label}: {text}")


def snapshot_table(snapshots: list) -> list[str]:
    """The lines of qemu-img's snapshot table ("Snapshot list:", the heading, a row per
    snapshot: bdrv_snapshot_dump()), as `info` and `snapshot -l` print it, for snapshots as
    `snapshot_json` gives them."""
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}"
                               f"{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        clock = _clock(s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"])
        icount = str(s["icount"]) if "icount" in s else ""
        # printf's %-9s and %-16s pad bytes, not characters; the size is unsigned there
        ident, name = (t + " " * (width - len(t.encode("utf-8", "surrogateescape")))
                       for t, width in ((s["id"], 9), (s["name"], 16)))
        size = size_to_str(s["vm-state-size"] % (1 << 64))
        lines.append(f"{ident} {name} {size:>8}{date:>20}{clock:>13}{icount:>11}")
    return lines


def _human_one(d: dict) -> list[str]:
    lines = [f"image: {d['filename']}", f"file format: {d['format']}",
             f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)",
             f"disk size: {size_to_str(d['actual-size'])}"]
    if d.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in d:
        text = f"backing file: {d['backing-filename']}"
        if d["full-backing-filename"] != d["backing-filename"]:
            text += f" (actual path: {d['full-backing-filename']})"
        lines.append(text)
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        lines += snapshot_table(d["snapshots"])
    if "format-specific" in d:
        lines.append("Format specific information:")
        _dump_value(lines, d["format-specific"]["data"], 4)
    return lines


def format_human(result) -> str:
    """Render `info()`'s result as the human summary of `qemu-img info`."""
    layers = result if isinstance(result, list) else [result]
    return "\n".join("\n".join(_human_one(d)) + "\n" for d in layers)


__all__ = ["info", "format_json", "format_human", "read_snapshot_table",
           "full_backing_filename", "size_to_str", "snapshot_json", "snapshot_table"]
