"""A read-only consistency check of a QCOW2 image, counting what `qemu-img check` counts.

Every reference the image makes (header, active and snapshot L1/L2 tables, data and compressed
clusters, refcount table and blocks, snapshot table, bitmap directory, tables and data) is
counted into computed refcounts; then the stored refcounts are compared with them block by
block. The rules, messages and counters
follow QEMU 7.2 block/qcow2-refcount.c (qcow2_check_refcounts(), calculate_refcounts(),
check_refcounts_l1/l2(), check_refblocks(), compare_refcounts(), check_oflag_copied()) so that
the JSON report equals `qemu-img check --output=json`.

Work is per table, never per cluster in Python: each L2 table is one read and a few vector
operations. An L2 table referenced from several L1 entries (snapshots share them with the
active state) is read and classified once and counted with its multiplicity.
Computed refcounts take 3 bytes per host cluster of the file (`_DenseComputed`: a count and
the kind of its first referrer) up to DENSE_MAX_BYTES; a larger file (a huge sparse one) keeps
them only for the clusters that are referenced (sorted arrays, ~9 bytes per referenced
cluster, `_Computed`), so that memory follows the metadata, not the file size. Stored refcount
blocks are compared one at a time. An allocation failure is reported as a QcowError.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field, replace

import numpy as np

from . import _tables
from .bitmaps import (
    BME_TABLE_ENTRY_OFFSET_MASK, bad_table_entries, check_bitmaps_at_open,
    read_bitmap_directory,
)
from .constants import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_SNAPSHOTS, QCOW_MAGIC,
    QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, RAW_FORMATS, REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
)
from .errors import (AllocationFailed, CorruptImage, FormatError, QcowError, TruncatedImage,
                     UnsafePathError)
from .header import Header, _no_data_file, parse_header, read_header, warn_stale_bitmaps
from .locks import check_not_locked
from .paths import directories, open_file
from .refcounts import MAX_OFFSET, StoredRefcounts, pread_padded
from .snapshots import BDRV_MAX_LENGTH, read_snapshot_table

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
QCOW_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
MAX_MESSAGES = 200          # per kind of message; the counters stay exact
L2_BATCH_ENTRIES = 65536   # L2 entries of small tables checked in one batch (l2_batch)
_U64 = np.uint64

# Owners of host clusters, for the metadata overlap report.
HEADER, L1_TABLE, L2_TABLE, REFCOUNT_TABLE, REFCOUNT_BLOCK, SNAPSHOT_TABLE, BITMAP_DIRECTORY, \
    BITMAP_TABLE, BITMAP_DATA, DATA, COMPRESSED = range(1, 12)
OWNER_NAMES = {HEADER: "the header", L1_TABLE: "an L1 table", L2_TABLE: "an L2 table",
               REFCOUNT_TABLE: "the refcount table", REFCOUNT_BLOCK: "a refcount block",
               SNAPSHOT_TABLE: "the snapshot table", BITMAP_DIRECTORY: "the bitmap directory",
               BITMAP_TABLE: "a bitmap table", BITMAP_DATA: "bitmap data",
               DATA: "a data cluster", COMPRESSED: "a compressed cluster"}


class NotChecked(QcowError):
    """The file is not in a format that can be checked (qemu-img: exit code 63)."""


class CheckFailed(CorruptImage):
    """The check stopped before its end, as qemu-img's does (exit code 1, no report).

    For the command line, qemu-img's words: the lines it printed until then (`messages`), its
    error line (`qemu_error`, "ERROR ...", printed with the program's prefix; None when it
    prints none) and the hint after it (`qemu_hint`), and the error number of its last line
    "Check failed: STRERROR" (`qemu_errno`).
    """

    def __init__(self, message: str, *, error: str | None = None, hint: str | None = None,
                 code: int = errno.EIO, messages=()):
        super().__init__(message)
        self.qemu_error, self.qemu_hint, self.qemu_errno = error, hint, code
        self.messages = list(messages)


@dataclass(frozen=True)
class Overlap:
    """A host cluster used by two different kinds of structure (e.g. an L2 table and data)."""
    cluster: int
    first: str
    second: str


@dataclass
class CheckResult:
    """What `check` found; the counters are those of `qemu-img check`."""
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: One line per problem, as qemu-img prints them on stderr (capped per kind).
    messages: list = field(default_factory=list)
    #: Host clusters claimed by two kinds of structure (capped); `overlap_count` is exact.
    overlaps: list = field(default_factory=list)
    overlap_count: int = 0

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 1 check errors, 2 corruptions, 3 leaks, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def to_json(self) -> dict:
        """The object `qemu-img check --output=json` prints (zero counters left out, as in
        QEMU)."""
        out: dict = {}
        if self.image_end_offset:
            out["image-end-offset"] = self.image_end_offset
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        if self.total_clusters:
            out["total-clusters"] = self.total_clusters
        if self.corruptions:
            out["corruptions"] = self.corruptions
        out["check-errors"] = self.check_errors
        if self.leaks:
            out["leaks"] = self.leaks
        if self.allocated_clusters:
            out["allocated-clusters"] = self.allocated_clusters
        out["filename"] = self.filename
        out["format"] = self.format
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        return out

    def format_human(self) -> str:
        """The summary `qemu-img check` prints on stdout."""
        lines = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += ["", f"{self.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if self.check_errors:
            lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            lines.append(f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:0.2f}% "
                         f"allocated, {self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                         f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


class _Checker:
    """One run of the check over an open image: computed counts, then the comparison."""

    def __init__(self, fd: int, header: Header, file_size: int, result: CheckResult, progress):
        self.fd = fd
        self.h = header
        self.file_size = file_size
        self.res = result
        self.progress = progress
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        #: Clusters compared (QEMU's nb_clusters: the file's, grown by references that end
        #: less than one cluster past the end of the file).
        self.nb = -(-file_size // self.cs)
        if self.nb > 0x7FFFFFFF:
            raise QcowError(f"image file too large to check ({self.nb} clusters)")
        self.refs = _computed_for(self.nb + 1)      # (+1: nb may grow by one, see inc)
        self.refmax = (1 << header.refcount_bits) - 1
        self._said: dict = {}
        self.steps_done = self.steps_total = 0
        #: L2 table offset -> its data entries whose COPIED flag disagrees with the refcount
        #: (tables an active L1 entry names), reported by oflag_copied()
        self.copied_bad: dict = {}
        #: `check -r all` would have repaired an L2 entry during the walk (l2_table())
        self.fixed_in_walk = False

    # -- reporting -----------------------------------------------------------------------------
    def say(self, kind: str, text: str, times: int = 1) -> None:
        n = self._said.get(kind, 0)
        self._said[kind] = n + 1
        if n < MAX_MESSAGES:
            self.res.messages.append(text if times == 1 else f"{text} (x{times})")
        elif n == MAX_MESSAGES:
            self.res.messages.append(f"... further messages of this kind ({kind}) omitted")

    def corrupt(self, n: int, kind: str, text: str) -> None:
        if n:
            self.res.corruptions += n
            self.say(kind, text, n)

    def tick(self) -> None:
        """One more L2 table or refcount block checked (progress in bytes of metadata)."""
        self.steps_done += 1
        if self.progress is not None:
            total = max(self.steps_total, self.steps_done)
            self.progress(self.steps_done * self.cs, total * self.cs)

    # -- counting references -------------------------------------------------------------------
    def inc(self, offsets, sizes, owner: int, weights=1) -> None:
        """Count references to the host ranges [offsets, +sizes) (qcow2_inc_refcounts_imrt).

        A range ending one cluster or more past the end of the file is a corruption and is not
        counted (QEMU: "counting reference for region exceeding the end of the file").
        """
        offsets = np.atleast_1d(np.asarray(offsets, np.uint64))
        sizes = np.broadcast_to(np.asarray(sizes, np.uint64), offsets.shape)
        if (offsets > _U64(MAX_OFFSET) - sizes).any():
            # QEMU fails the whole check on such a range: qcow2_inc_refcounts_imrt() cannot
            # size its refcount array (ENOMEM).
            bad = int(offsets[offsets > _U64(MAX_OFFSET) - sizes][0])
            raise CheckFailed(f"{OWNER_NAMES[owner]} at {bad:#x} lies beyond any possible "
                              "file offset", code=errno.ENOMEM, messages=self.res.messages)
        offsets, sizes = offsets.astype(np.int64), sizes.astype(np.int64)
        weights = np.broadcast_to(np.asarray(weights, np.int64), offsets.shape)
        keep = sizes > 0
        # (QEMU's file length is bdrv_getlength(): whole 512-byte sectors, rounded up.)
        past = keep & (offsets + sizes - -(-self.file_size // 512) * 512 >= self.cs)
        if past.any():
            for o, s in zip(offsets[past][:MAX_MESSAGES + 1].tolist(),
                            sizes[past][:MAX_MESSAGES + 1].tolist()):
                self.say("past-eof", f"ERROR: counting reference for region exceeding the end "
                         f"of the file by one cluster or more: offset {o:#x} size {s:#x} "
                         f"({OWNER_NAMES[owner]})")
            self.res.corruptions += int(weights[past].sum())
        keep &= ~past
        if not keep.any():
            return
        o, s, w = offsets[keep], sizes[keep], weights[keep]
        first = o >> self.cb
        last = (o + s - 1) >> self.cb
        span = last - first
        self.nb = max(self.nb, int(last.max()) + 1)
        # Single-cluster and two-cluster ranges (tables, data, compressed streams) in one go;
        # longer ones (L1, refcount and snapshot tables) are few: one slice each.
        short = span <= 1
        two = short & (span == 1)
        self._add(np.concatenate((first[short], last[two])),
                  np.concatenate((w[short], w[two])), owner)
        for a, b, ww in zip(first[~short].tolist(), last[~short].tolist(), w[~short].tolist()):
            self._add(np.arange(a, b + 1), np.full(b + 1 - a, ww), owner)

    def _add(self, clusters: np.ndarray, weights: np.ndarray, owner: int) -> None:
        if len(clusters):
            self.refs.add(clusters, weights, owner)

    def report_overlaps(self) -> None:
        """Metadata overlaps, in the order the references were counted."""
        self.res.overlap_count = self.refs.clash_count
        for c, first, second in self.refs.clashes:
            self.res.overlaps.append(Overlap(c, OWNER_NAMES[first], OWNER_NAMES[second]))
            self.say("overlap", f"ERROR cluster {c} is used by both {OWNER_NAMES[first]} "
                     f"and {OWNER_NAMES[second]} (metadata overlap)")

    # -- the walk ------------------------------------------------------------------------------
    def run(self, stored: StoredRefcounts, fix: bool = False) -> None:
        """The check's walk; `fix`: as `check -r all` walks (see check_snapshot_table)."""
        h = self.h
        snapshots, snapshots_size = check_snapshot_table(self.fd, h, fix, self.res.messages)
        if h.version >= 3:
            # Version 3 entries carry at least the 64-bit VM state size and the disk size.
            word = "Repairing" if fix else "ERROR"
            for i, sn in enumerate(snapshots):
                if sn.extra_data_size < 16:
                    self.corrupt(1, "snapshot-incomplete",
                                 f"{word} snapshot table entry {i} is incomplete")

        self.inc(0, self.cs, HEADER)
        l2_refs = _L2Refs()
        active_l1 = self.l1_table(h.l1_table_offset, h.l1_size, l2_refs, active=True)
        if h.has_data_file and snapshots:
            self.corrupt(1, "snapshots-data-file",
                         f"ERROR {len(snapshots)} snapshots in image with data file")
        tables: dict = {}           # (offset, entries) -> snapshots sharing that L1 table
        for sn in snapshots:
            # calculate_refcounts()'s words
            if sn.l1_table_offset % self.cs:
                self.corrupt(1, "snapshot-l1", f"ERROR snapshot {sn.id} ({sn.name}) "
                             f"l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster "
                             "aligned; snapshot table entry corrupted")
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self.corrupt(1, "snapshot-l1", f"ERROR snapshot {sn.id} ({sn.name}) "
                             f"l1_size={sn.l1_size:#x}: L1 table is too large; snapshot table "
                             "entry corrupted")
                continue
            if sn.l1_size and sn.l1_table_offset + sn.l1_size * 8 > BDRV_MAX_LENGTH:
                self.unreadable_l1(sn, tables, l2_refs, stored)
            if sn.l1_size:
                key = (sn.l1_table_offset, sn.l1_size)
                tables[key] = tables.get(key, 0) + 1
        self.snapshot_l1_tables(tables, l2_refs)
        self.l2_tables(l2_refs, stored)

        self.inc(h.snapshots_offset if snapshots else 0, snapshots_size, SNAPSHOT_TABLE)
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs, REFCOUNT_TABLE)
        self.bitmaps()
        self.refcount_blocks(stored)
        self.compare(stored)
        self.oflag_copied(active_l1, stored)        # (after the comparison, as in QEMU)
        self.report_overlaps()

    def snapshot_l1_tables(self, tables: dict, l2_refs: "_L2Refs") -> None:
        """Count the snapshots' L1 tables ((offset, entries) -> how many snapshots share it) in
        one pass, and collect their L2 tables; each distinct table is read once."""
        if tables:
            keys = np.array(list(tables), np.uint64).reshape(-1, 2)
            self.inc(keys[:, 0], keys[:, 1] * _U64(8), L1_TABLE, list(tables.values()))
            for (offset, entries), times in tables.items():
                self.l1_table(offset, entries, l2_refs, active=False, times=times, counted=True)

    def unreadable_l1(self, sn, tables: dict, l2_refs: "_L2Refs", stored) -> None:
        """Fail the check on a snapshot L1 table past QEMU's largest offset, as QEMU's
        check_refcounts_l1() does when it reads it (EIO), after checking what it checked before
        (the active L1 table, the snapshots before this one, their L2 tables) and counting
        this table (a range past the end of the file; ENOMEM past 2^63)."""
        self.snapshot_l1_tables(tables, l2_refs)
        self.l2_tables(l2_refs, stored)
        self.inc(sn.l1_table_offset, sn.l1_size * 8, L1_TABLE)
        self.res.messages.append("ERROR: I/O error in check_refcounts_l1")
        raise CheckFailed(f"the L1 table of snapshot {sn.id} ({sn.name}) at "
                          f"{sn.l1_table_offset:#x} lies past the largest offset QEMU reads "
                          f"({BDRV_MAX_LENGTH:#x})", code=errno.EIO, messages=self.res.messages)

    def l1_table(self, offset: int, entries: int, l2_refs: "_L2Refs", active: bool,
                 times: int = 1, counted: bool = False):
        """Count an L1 table and collect the L2 tables it names (check_refcounts_l1); return
        the table (its part inside the file).

        `times`: how many L1 tables (snapshots) share this one; `counted`: the table's own
        clusters were already counted.
        """
        if not entries:
            return np.zeros(0, _U64)
        if not counted:
            self.inc(offset, entries * 8, L1_TABLE, times)
        table = self.read_table(offset, entries)
        l1 = table[table != 0]
        reserved = int(np.count_nonzero(l1 & _U64(L1E_RESERVED_MASK)))
        self.corrupt(reserved * times, "l1-reserved",
                     "ERROR found L1 entry with reserved bits set")
        l2_offsets = (l1 & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        unaligned = int(np.count_nonzero(l2_offsets & (self.cs - 1)))
        self.corrupt(unaligned * times, "l2-unaligned",
                     "ERROR L2 table offset is not cluster aligned; L1 entry corrupted")
        self.inc(l2_offsets, self.cs, L2_TABLE, times)
        l2_refs.add(l2_offsets, active, times)
        return table

    def read_table(self, offset: int, entries: int) -> np.ndarray:
        """A table of 64-bit entries (native uint64); only its part inside the file is read.

        What lies past the end of the file reads as zeros (as in QEMU), and zero entries
        reference nothing: they are left out, so a huge table past the end costs nothing.
        """
        inside = min(entries, max(0, -(-(self.file_size - offset) // 8)))
        return np.frombuffer(pread_padded(self.fd, inside * 8, offset), ">u8").astype(_U64)

    def l2_tables(self, l2_refs: "_L2Refs", stored: StoredRefcounts) -> None:
        """Check every distinct L2 table once, counted as often as L1 entries name it."""
        offsets, n_active, n_snap = l2_refs.distinct()
        # A table starting past the end of the file reads as zeros: nothing to count.
        inside = offsets < self.file_size
        offsets, n_active, n_snap = offsets[inside], n_active[inside], n_snap[inside]
        per_block = 1 << stored.block_bits
        self.steps_total = len(offsets) + int(np.count_nonzero(
            stored.table[:-(-self.nb // per_block)] & _U64(REFT_OFFSET_MASK)))
        offsets, n_active = offsets.tolist(), n_active.tolist()
        weights = [a + s for a, s in zip(n_active, n_snap.tolist())]
        per_batch = max(1, L2_BATCH_ENTRIES // (cs_entries := self.cs // 8))
        i = 0
        while i < len(offsets):
            j = min(i + per_batch, len(offsets))
            if cs_entries >= L2_BATCH_ENTRIES or not self.l2_batch(
                    offsets[i:j], n_active[i:j], weights[i:j], stored):
                for k in range(i, j):
                    self.l2_table(offsets[k], n_active[k], weights[k], stored)
                    self.tick()
                i = j
                continue
            for _ in range(i, j):
                self.tick()
            i = j

    def streams(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(host offsets, lengths) of compressed entries' streams: qcow2_parse_compressed_l2_
        entry(), x = 62 - (cluster_bits - 8) offset bits, then the number of additional
        512-byte sectors; a stream ends with its last sector."""
        shift = 62 - (self.cb - 8)
        coffset = (entries & _U64((1 << shift) - 1)).astype(np.int64)
        sectors = ((entries >> _U64(shift)) & _U64((1 << (self.cb - 8)) - 1)).astype(np.int64)
        return coffset, (sectors + 1) * 512 - (coffset & 511)

    def l2_batch(self, offsets: list, active: list, weights: list,
                 stored: StoredRefcounts) -> bool:
        """l2_table() for a run of small L2 tables at once (tiny clusters make them many:
        Python's cost per table dominates), when checking them one by one would report
        nothing and count references of one kind: the counts, references and their order
        are then the same. Returns False, having done nothing, otherwise."""
        h, cs = self.h, self.cs
        if h.extended_l2 or h.has_data_file:
            return False
        entry = np.frombuffer(b"".join(pread_padded(self.fd, cs, o) for o in offsets),
                              ">u8").astype(_U64).reshape(len(offsets), -1)
        comp = (entry & _U64(QCOW_OFLAG_COMPRESSED)) != 0
        offset = (entry & _U64(L2E_OFFSET_MASK)).astype(np.int64)
        allocated = ~comp & (offset != 0)
        if comp.any() and allocated.any():
            return False                # l2_table() counts each table's streams first
        copied = (entry & _U64(QCOW_OFLAG_COPIED)) != 0
        if (~comp & ((entry & _U64(L2E_STD_RESERVED_MASK)) != 0)).any() or \
                (comp & copied).any() or (allocated & ((offset & (cs - 1)) != 0)).any():
            return False
        act = np.asarray(active, np.int64)
        wgt = np.asarray(weights, np.int64)
        rows = np.broadcast_to(np.arange(len(offsets))[:, None], entry.shape)
        res = self.res
        if comp.any():
            t = rows[comp]
            n = int(act[t].sum())
            self.inc(*self.streams(entry[comp]), COMPRESSED, wgt[t])
            res.allocated_clusters += n
            res.compressed_clusters += n
            res.fragmented_clusters += n
            return True
        off, t = offset[allocated], rows[allocated]
        if not len(off):
            return True
        checked = act[t] > 0            # check_oflag_copied(): tables an active L1 names
        values, ok = stored.lookup(off[checked] >> self.cb)
        if (ok & ((values == 1) != copied[allocated][checked])).any():
            return False
        res.allocated_clusters += int(act[t].sum())
        jump = (t[1:] == t[:-1]) & (off[1:] != off[:-1] + cs)   # within one table only
        res.fragmented_clusters += int(act[t[1:]][jump].sum())
        self.inc(off, cs, DATA, wgt[t])
        return True

    def l2_table(self, l2_offset: int, active: int, weight: int, stored: StoredRefcounts):
        """check_refcounts_l2() for one table, weighted; its data entries' COPIED flags for
        check_oflag_copied() (`copied_bad`, reported by oflag_copied()).

        `active` counts the active L1 entries naming the table, `weight` all L1 entries.
        """
        h, res, cs = self.h, self.res, self.cs
        # check_oflag_copied() skips L1 entries whose masked offset is 0; the count does not.
        oflag = active and l2_offset
        raw = np.frombuffer(pread_padded(self.fd, cs, l2_offset), ">u8").astype(_U64)
        if h.extended_l2:
            entry, bitmap = raw[0::2], raw[1::2]
        else:
            entry, bitmap = raw, np.zeros(len(raw), _U64)
        # qcow2_get_cluster_type(): with subclusters the zero flag is not a cluster type.
        comp = (entry & _U64(QCOW_OFLAG_COMPRESSED)) != 0
        copied = (entry & _U64(QCOW_OFLAG_COPIED)) != 0
        offset = (entry & _U64(L2E_OFFSET_MASK)).astype(np.int64)
        zero = ~comp & ((entry & _U64(QCOW_OFLAG_ZERO)) != 0) if not h.extended_l2 else \
            np.zeros(len(entry), bool)
        allocated = ~comp & ((offset != 0) | (~zero & copied & h.has_data_file))
        unallocated = ~comp & ~zero & ~allocated
        where = f"L2 table at {l2_offset:#x}"

        reserved = ~comp & ((entry & _U64(L2E_STD_RESERVED_MASK)) != 0)
        self.corrupt(int(reserved.sum()) * weight, "l2-reserved",
                     f"ERROR found l2 entry with reserved bits set ({where})")
        self.corrupt(int((comp & copied).sum()) * weight, "compressed-copied",
                     f"ERROR: copied flag must never be set for compressed clusters ({where})")
        if h.has_data_file:
            self.corrupt(int(comp.sum()) * weight, "compressed-data-file",
                         f"ERROR compressed cluster with data file ({where})")
            comp_ok = np.zeros(len(entry), bool)
        else:
            bad_bitmap = comp & (bitmap != 0)
            self.corrupt(int(bad_bitmap.sum()) * weight, "compressed-bitmap",
                         f"ERROR compressed cluster with non-zero subcluster allocation bitmap "
                         f"({where})")
            comp_ok = comp & ~bad_bitmap
        n_comp = int(comp_ok.sum())
        if n_comp:
            self.inc(*self.streams(entry[comp_ok]), COMPRESSED, weight)
            res.allocated_clusters += n_comp * active
            res.compressed_clusters += n_comp * active
            res.fragmented_clusters += n_comp * active      # compressed: fragmented by nature

        alloc_off = offset[allocated]
        if h.extended_l2:
            bm = bitmap[allocated]
            self.corrupt(int(np.count_nonzero((bm >> _U64(32)) & bm)) * weight, "l2-bitmap",
                         f"ERROR allocated cluster has corrupted subcluster allocation bitmap "
                         f"({where})")
            self.corrupt(int(np.count_nonzero(bitmap[unallocated]
                                              & _U64(QCOW_L2_BITMAP_ALL_ALLOC))) * weight,
                         "l2-bitmap", f"ERROR: unallocated cluster has non-zero subcluster "
                         f"allocation map ({where})")
        unaligned = alloc_off & (cs - 1)
        # check_refcounts_l2(): an unaligned entry without data (preallocated zeros) is the
        # one `check -r all` repairs as it walks, a write before any failure of the walk.
        has_data = (bitmap[allocated] & _U64(QCOW_L2_BITMAP_ALL_ALLOC)) != 0 \
            if h.extended_l2 else ~zero[allocated]
        self.fixed_in_walk |= bool(np.count_nonzero((unaligned != 0) & ~has_data))
        self.corrupt(int(np.count_nonzero(unaligned)) * weight, "data-unaligned",
                     f"ERROR: data cluster is not properly aligned; L2 entry corrupted ({where})")
        if len(alloc_off):
            res.allocated_clusters += len(alloc_off) * active
            res.fragmented_clusters += int(np.count_nonzero(
                alloc_off[1:] != alloc_off[:-1] + cs)) * active
            if not h.has_data_file:
                self.inc(alloc_off, cs, DATA, weight)
            if oflag:
                # check_oflag_copied(): COPIED must be set exactly when the refcount is 1.
                if h.has_data_file:
                    one, ok = np.ones(len(alloc_off), bool), np.ones(len(alloc_off), bool)
                else:
                    values, ok = stored.lookup(alloc_off >> self.cb)
                    one = values == 1
                bad = int(np.count_nonzero(ok & (one != copied[allocated])))
                if bad:
                    self.copied_bad[l2_offset] = bad

    def oflag_copied(self, table: np.ndarray, stored: StoredRefcounts) -> None:
        """check_oflag_copied() over the active L1 table, entry by entry: COPIED set exactly
        when the L2 table's refcount is 1, then the table's data entries (found by l2_table()).
        A table whose own refcount cannot be read is skipped whole, without a message."""
        l2_offsets = (table & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        index = np.flatnonzero(l2_offsets)
        l1, l2_offsets = table[index], l2_offsets[index]
        values, ok = stored.lookup(l2_offsets >> self.cb)
        bad_l1 = ok & ((values == 1) != ((l1 & _U64(QCOW_OFLAG_COPIED)) != 0))
        bad_data = np.zeros(len(l2_offsets), np.int64)
        if self.copied_bad:
            keys, counts = (np.array(v, np.int64) for v in zip(*sorted(self.copied_bad.items())))
            pos = np.minimum(np.searchsorted(keys, l2_offsets), len(keys) - 1)
            hit = ok & (keys[pos] == l2_offsets)
            bad_data[hit] = counts[pos[hit]]
        self.res.corruptions += int(bad_l1.sum()) + int(bad_data.sum())
        # One line per entry, as QEMU's, up to each kind's cap (say()).
        rows = np.union1d(np.flatnonzero(bad_l1)[:MAX_MESSAGES + 1],
                          np.flatnonzero(bad_data)[:MAX_MESSAGES + 1])
        for r in rows.tolist():
            if bad_l1[r]:
                self.say("oflag-copied-l1", f"ERROR OFLAG_COPIED L2 cluster: "
                         f"l1_index={int(index[r])} l1_entry={int(l1[r]):x} "
                         f"refcount={int(values[r])}")
            if bad_data[r]:
                self.say("oflag-copied", f"ERROR OFLAG_COPIED data cluster: refcount and "
                         f"COPIED flag disagree (L2 table at {int(l2_offsets[r]):#x})",
                         int(bad_data[r]))

    def bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts(): the directory, each bitmap table and its clusters."""
        h = self.h
        if h.bitmaps is None:
            return
        self.inc(h.bitmaps.directory_offset, h.bitmaps.directory_size, BITMAP_DIRECTORY)
        try:
            directory = read_bitmap_directory(self.fd, h, self.file_size)
        except QcowError as exc:
            self.res.corruptions += 1
            raise CorruptImage(f"cannot check bitmaps: {exc}") from None
        if not directory:
            return
        # All bitmap tables counted in one pass (those past the end of the file reported
        # there), a table shared by several bitmaps once with their number as weight; each
        # distinct table is then read once, only its part inside the file.
        tables: dict = {}
        for i, bm in enumerate(directory):
            tables.setdefault((bm.table_offset, bm.table_size), []).append(i)
        keys = np.array(list(tables), np.uint64).reshape(-1, 2)
        self.inc(keys[:, 0], keys[:, 1] * _U64(8), BITMAP_TABLE,
                 [len(users) for users in tables.values()])
        data_parts, weights = [], []
        first_bad = None
        for (offset, entries), users in tables.items():
            table = self.read_table(offset, entries)
            bad = np.flatnonzero(bad_table_entries(table, self.cs))
            if len(bad):
                first = users[0]
                if first_bad is None or first < first_bad[0]:
                    first_bad = (first, int(bad[0]))
                continue
            data = (table & _U64(BME_TABLE_ENTRY_OFFSET_MASK)).astype(np.int64)
            data_parts.append(data[data != 0])
            weights.append(np.full(len(data_parts[-1]), len(users), np.int64))
        if first_bad is not None:
            # qcow2_check_bitmaps_refcounts() stops at the first bitmap whose table is invalid.
            self.res.corruptions += 1
            raise CorruptImage(f"cannot check bitmaps: bitmap {directory[first_bad[0]].name!r} "
                               f"has an invalid bitmap table entry {first_bad[1]}")
        if data_parts:
            self.inc(np.concatenate(data_parts), self.cs, BITMAP_DATA, np.concatenate(weights))

    def refcount_blocks(self, stored: StoredRefcounts) -> None:
        """check_refblocks(): count each refcount block; each must be referenced exactly once."""
        table = stored.table
        nz = np.flatnonzero(table)
        ent = table[nz]
        reserved = (ent & _U64(REFT_RESERVED_MASK)) != 0
        for i in nz[reserved][:3].tolist():
            self.say("reftable", f"ERROR refcount table entry {i} has reserved bits set")
        self.res.corruptions += int(reserved.sum())
        off = ent & _U64(REFT_OFFSET_MASK)
        unaligned = ~reserved & ((off & _U64(self.cs - 1)) != 0)
        for i in nz[unaligned][:3].tolist():
            self.say("reftable", f"ERROR refcount block {i} is not cluster aligned; refcount "
                     "table entry corrupted")
        self.res.corruptions += int(unaligned.sum())
        cluster = off >> _U64(self.cb)
        outside = ~reserved & ~unaligned & (cluster >= _U64(self.nb))
        for i in nz[outside][:3].tolist():
            self.say("reftable", f"ERROR refcount block {i} is outside image")
        self.res.corruptions += int(outside.sum())
        cand = ~reserved & ~unaligned & ~outside & (off != 0)
        idx, cl, off = nz[cand], cluster[cand].astype(np.int64), off[cand].astype(np.int64)
        counted = off < self.file_size        # the rest ends a cluster or more past the end
        base = self.refs.lookup(cl).astype(np.int64)
        # Blocks are counted in table order; each is checked right after it is counted, so it
        # sees the blocks before it that share its cluster.
        before = np.zeros(len(cl), np.int64)
        if len(cl):
            order = np.lexsort((np.arange(len(cl)), cl))
            c_sorted = cl[order]
            cum = np.cumsum(counted[order].astype(np.int64))
            group_start = np.flatnonzero(np.r_[True, c_sorted[1:] != c_sorted[:-1]])
            start_cum = np.repeat(cum[group_start] - counted[order][group_start],
                                  np.diff(np.r_[group_start, len(cl)]))
            before[order] = cum - start_cum        # counted blocks up to and including this
        seen = np.minimum((base + before).astype(_U64), _U64(self.refmax))
        wrong = seen != 1
        for i, v in zip(idx[wrong][:3].tolist(), seen[wrong][:3].tolist()):
            self.say("refblock", f"ERROR refcount block {i} refcount={v}")
        self.res.corruptions += int(wrong.sum())
        self.inc(off[counted], self.cs, REFCOUNT_BLOCK)
        self.inc(off[~counted], self.cs, REFCOUNT_BLOCK)       # reported past the end

    def compare(self, stored: StoredRefcounts) -> None:
        """compare_refcounts(): stored against computed refcounts, one refcount block at a time.

        Clusters in no stored refcount block (a zero or missing table entry) have stored
        refcount 0: those with references are compared in one pass, the rest need no work.
        """
        if isinstance(self.refs, _DenseComputed):
            return self._compare_dense(stored)
        res, nb, refmax = self.res, self.nb, self.refmax
        # The computed arrays themselves (int32 clusters, uint32 counts): nothing here makes a
        # whole-length copy of a wider type (that took 64 bytes per referenced cluster).
        clusters, counts = self.refs.arrays()
        # Increments past the refcount maximum are refused one by one, each a corruption.
        capped = refmax < np.iinfo(counts.dtype).max      # (refmax may not fit the dtype)
        limit = counts.dtype.type(refmax) if capped else None
        over = np.flatnonzero(counts > limit) if capped else np.zeros(0, np.intp)
        for c in clusters[over][:3].tolist():
            self.say("overflow", f"ERROR: overflow cluster offset={c * self.cs:#x}")
        res.corruptions += sum(counts[over].tolist()) - refmax * len(over)
        bits = stored.block_bits
        per_block = 1 << bits
        table = stored.table[:-(-nb // per_block)] & _U64(REFT_OFFSET_MASK)
        present = np.flatnonzero(table)
        # The slice of `clusters` each present refcount block covers (bounds as int32 like
        # `clusters`: a mixed-type search would copy it to int64).
        bounds = np.minimum(np.concatenate((present, present + 1)) << bits, 2**31 - 1)
        at = np.searchsorted(clusters, bounds.astype(np.int32))
        starts, ends = at[:len(present)], at[len(present):]
        covered = np.zeros(len(clusters), bool)
        for a, b in zip(starts.tolist(), ends.tolist()):
            covered[a:b] = True
        uncovered = np.flatnonzero(~covered & (counts > 0))
        del covered
        problems = [(c, 0, min(r, refmax))
                    for c, r in zip(clusters[uncovered[:MAX_MESSAGES + 1]].tolist(),
                                    counts[uncovered[:MAX_MESSAGES + 1]].tolist())]
        res.corruptions += len(uncovered)
        highest = int(clusters[uncovered[-1]]) if len(uncovered) else 0
        def computed(i: int, lo: int, hi: int):
            a, b = starts[i], ends[i]
            mine = np.zeros(hi - lo, _U64)
            mine[clusters[a:b] - lo] = np.minimum(counts[a:b], limit) if capped else \
                counts[a:b]
            return mine
        self._compare_blocks(stored, present, per_block, computed, problems, highest)

    def _compare_dense(self, stored: StoredRefcounts) -> None:
        """compare() over per-cluster counts (_DenseComputed): each stored refcount block is
        compared with the slice of counts it covers; counts in no block are found per block."""
        res, nb, refmax = self.res, self.nb, self.refmax
        counts = self.refs.counts[:nb]
        capped = refmax < np.iinfo(counts.dtype).max
        limit = counts.dtype.type(refmax) if capped else None
        over = np.flatnonzero(counts > limit) if capped else np.zeros(0, np.intp)
        for c in over[:3].tolist():
            self.say("overflow", f"ERROR: overflow cluster offset={c * self.cs:#x}")
        res.corruptions += sum(counts[over].tolist()) - refmax * len(over)
        bits = stored.block_bits
        per_block = 1 << bits
        blocks = -(-nb // per_block)
        table = stored.table[:blocks] & _U64(REFT_OFFSET_MASK)
        present = np.flatnonzero(table)
        absent = np.ones(blocks, bool)
        absent[present] = False
        # Counts in blocks the table does not hold: stored refcount 0 (a few blocks at most
        # in a sane image; found per block, then listed cluster by cluster).
        used = np.zeros(blocks, bool)
        whole = nb // per_block
        used[:whole] = counts[:whole * per_block].reshape(whole, per_block).any(axis=1)
        if whole < blocks:
            used[whole] = counts[whole * per_block:].any()
        problems, uncovered, highest = [], 0, 0
        for t in np.flatnonzero(absent & used).tolist():
            lo = t * per_block
            nz = np.flatnonzero(counts[lo:lo + per_block]) + lo
            uncovered += len(nz)
            highest = int(nz[-1])
            room = MAX_MESSAGES + 1 - len(problems)
            problems += [(c, 0, min(r, refmax)) for c, r in
                         zip(nz[:room].tolist(), counts[nz[:room]].tolist())]
        res.corruptions += uncovered
        def computed(i: int, lo: int, hi: int):
            return np.minimum(counts[lo:hi], limit) if capped else counts[lo:hi]
        self._compare_blocks(stored, present, per_block, computed, problems, highest)

    def _compare_blocks(self, stored: StoredRefcounts, present, per_block: int, computed,
                        problems: list, highest: int) -> None:
        """compare()'s pass over the present refcount blocks, for either store: block `t`
        (the i-th present) against computed(i, lo, hi), its clusters' counts capped at the
        refcount maximum; then the messages, in cluster order, and the image's end."""
        res, nb = self.res, self.nb
        self.steps_total = self.steps_done + len(present)
        unreadable = []
        for i, t in enumerate(present.tolist()):
            lo, hi = t * per_block, min((t + 1) * per_block, nb)
            blk = stored.block(t)
            if blk is None:
                res.check_errors += hi - lo
                unreadable.append((lo, "refblock-read", f"Can't get refcount for clusters "
                                   f"{lo}..{hi - 1}: refcount block {t} has an unaligned or "
                                   "impossible offset", hi - lo))
                self.tick()
                continue
            values = blk[:hi - lo]
            mine = computed(i, lo, hi)
            used = np.flatnonzero((values > 0) | (mine > 0))
            if len(used):
                highest = max(highest, lo + int(used[-1]))
            diff = np.flatnonzero(values != mine)
            for j in diff[:MAX_MESSAGES + 1].tolist():
                problems.append((lo + j, int(values[j]), int(mine[j])))
            low = int(np.count_nonzero(values[diff] < mine[diff]))
            res.corruptions += low
            res.leaks += len(diff) - low
            self.tick()
        problems.sort()
        lines = [(c, "refcount", f"{'ERROR' if v < r else 'Leaked'} cluster {c} refcount={v} "
                  f"reference={r}", 1) for c, v, r in problems[:MAX_MESSAGES + 1]]
        # compare_refcounts() goes cluster by cluster: unreadable blocks among the others.
        for _, kind, text, times in sorted(lines + unreadable, key=lambda line: line[0]):
            self.say(kind, text, times)
        res.image_end_offset = (highest + 1) * self.cs


#: Computed refcounts are kept per cluster of the file (3 bytes each: qemu-img keeps 2) when
#: that takes at most this much; otherwise only for the referenced clusters (about 9 bytes
#: each), so that a huge sparse file costs what its references cost.
DENSE_MAX_BYTES = 128 << 20


def _computed_for(clusters: int) -> "_DenseComputed | _Computed":
    """The computed-refcount store for a file of `clusters` clusters."""
    if clusters * _DenseComputed.BYTES_PER_CLUSTER <= DENSE_MAX_BYTES:
        try:
            return _DenseComputed(clusters)
        except MemoryError:
            pass                  # a tight limit: the sparse store may still fit
    return _Computed()


class _DenseComputed:
    """Computed refcounts as one count (uint16, widened to uint32 and uint64 when a count
    would pass that: 65,536 snapshots sharing a cluster, or a hostile image) and one
    first-owner byte per host cluster of the file, counted in order by a kernel: a later
    reference by another kind of structure than the first is a metadata overlap (`clashes`,
    in counting order, capped; `clash_count` exact)."""
    BYTES_PER_CLUSTER = 3

    def __init__(self, clusters: int):
        self.counts = np.zeros(clusters, np.uint16)
        self.owner = np.zeros(clusters, np.uint8)
        self.clash_count = 0
        self.clashes: list = []

    def add(self, clusters: np.ndarray, weights: np.ndarray, owner: int) -> None:
        clusters = np.ascontiguousarray(clusters, np.int64)
        weights = np.broadcast_to(np.asarray(weights, np.int64), clusters.shape)
        room = np.zeros(2 * max(MAX_MESSAGES - len(self.clashes), 0), np.int64)
        while True:
            found, stop = _tables.dense_add(self.counts, self.owner, clusters, weights, owner,
                                            room)
            self._note_clashes(found, room, owner)
            if stop < 0:
                return
            # A count would pass the type's maximum: widen it and go on from that reference.
            wider = np.uint32 if self.counts.dtype == np.uint16 else np.uint64
            if self.counts.dtype == np.uint64:
                raise CorruptImage("a host cluster is referenced 2**64 times or more")
            self.counts = self.counts.astype(wider)
            clusters, weights = clusters[stop:], weights[stop:]
            room = np.zeros(2 * max(MAX_MESSAGES - len(self.clashes), 0), np.int64)

    def _note_clashes(self, found: int, room: np.ndarray, owner: int) -> None:
        self.clash_count += found
        kept = min(found, len(room) // 2)
        pairs = room[:2 * kept].reshape(kept, 2).tolist()
        self.clashes += [(c, first, owner) for c, first in pairs]

    def lookup(self, clusters: np.ndarray) -> np.ndarray:
        """Computed refcounts (uint64) of the given cluster indices."""
        clusters = np.asarray(clusters, np.int64)
        inside = (clusters >= 0) & (clusters < len(self.counts))
        out = np.zeros(len(clusters), _U64)
        out[inside] = self.counts[clusters[inside]]
        return out


class _Computed:
    """Computed refcounts of the referenced host clusters only, as sorted arrays.

    Memory follows the references, not the file size: per distinct referenced cluster its
    index (int32: a check never counts past 2**31 clusters), its count (uint32, uint64 once
    a hostile image could overflow it) and the kind of structure that referenced it first.
    References wait in a list and are merged half a million at a time (a merge's temporaries
    take about 90 bytes per reference). The arrays keep an eighth more room and grow in place
    (realloc), and a merge moves, in place, only the entries after its first new cluster:
    clusters referenced in increasing order (the usual image) are appended, not copied. A
    later reference by another kind of structure than the first is a metadata overlap
    (`clashes`, in counting order, capped; `clash_count` exact).
    """
    MERGE_AT = 1 << 19

    def __init__(self):
        self._cl = np.zeros(0, np.int32)        # storage; the first _n entries are used
        self._ct = np.zeros(0, np.uint32)
        self._ow = np.zeros(0, np.uint8)
        self._n = 0
        self.clash_count = 0
        self.clashes: list = []
        self._pending: list = []
        self._waiting = 0
        self._added = 0

    def add(self, clusters: np.ndarray, weights: np.ndarray, owner: int) -> None:
        if len(clusters) > self.MERGE_AT:
            # In pieces: a merge's temporaries (about 90 bytes per reference) stay bounded by
            # MERGE_AT, not by the image (all the data clusters of a large image come at once).
            weights = np.broadcast_to(weights, clusters.shape)
            for i in range(0, len(clusters), self.MERGE_AT):
                self.add(clusters[i:i + self.MERGE_AT], weights[i:i + self.MERGE_AT], owner)
            return
        self._pending.append((clusters.astype(np.int32), weights, owner))
        self._added += int(weights.sum())
        self._waiting += len(clusters)
        if self._waiting >= self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        pend, self._pending, self._waiting = self._pending, [], 0
        cl = np.concatenate([p[0] for p in pend])
        w = np.concatenate([np.broadcast_to(p[1], p[0].shape) for p in pend]).astype(np.int64)
        own = np.concatenate([np.full(len(p[0]), p[2], np.uint8) for p in pend])
        del pend
        order = np.argsort(cl, kind="stable")        # stable: counting order per cluster
        cl, own = cl[order], own[order]
        starts = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1]])
        uniq = cl[starts]
        sums = np.add.reduceat(w[order], starts)
        first = own[starts]
        pos = np.searchsorted(self.clusters, uniq)
        known = pos < len(self.clusters)
        known[known] = self.clusters[pos[known]] == uniq[known]
        first[known] = self.owner[pos[known]]
        first_each = np.repeat(first, np.diff(np.r_[starts, len(cl)]))
        clash = np.flatnonzero(own != first_each)
        if len(clash):
            self.clash_count += len(clash)
            room = MAX_MESSAGES - len(self.clashes)
            if room > 0:
                pick = clash[np.argsort(order[clash], kind="stable")[:room]]
                self.clashes += zip(cl[pick].tolist(), first_each[pick].tolist(),
                                    own[pick].tolist())
        if self._added > 0xFFFFFFFF and self._ct.dtype != np.uint64:
            self._ct = self._ct.astype(np.uint64)      # only a hostile image gets here
        self.counts[pos[known]] += sums[known].astype(self._ct.dtype)
        new = ~known
        at, add = pos[new], len(pos) - int(np.count_nonzero(known))
        if not add:
            return
        n = self._n
        if n + add > len(self._cl):
            room = max(n + add, n + n // 8)
            for buf in (self._cl, self._ct, self._ow):
                # realloc(): a large block grows by mremap, never held twice as a copy into a
                # new array is. No view of these arrays is alive here (the properties' views
                # are temporaries).
                buf.resize(room, refcheck=False)
        # Only what lies past the first new cluster moves (little or nothing in an ordinary
        # image: its data clusters come in increasing host order), in place.
        _tables.merge_insert(self._cl, self._ct, self._ow, n, at.astype(np.int64),
                             uniq[new].astype(np.int32), sums[new].astype(self._ct.dtype),
                             first[new].astype(np.uint8))
        self._n = n + add

    @property
    def clusters(self) -> np.ndarray:
        return self._cl[:self._n]

    @property
    def counts(self) -> np.ndarray:
        return self._ct[:self._n]

    @property
    def owner(self) -> np.ndarray:
        return self._ow[:self._n]

    def lookup(self, clusters: np.ndarray) -> np.ndarray:
        """Computed refcounts (uint64) of the given cluster indices."""
        self._merge()
        clusters = np.asarray(clusters, np.int64)
        out = np.zeros(len(clusters), _U64)
        if len(self.clusters) and len(clusters):
            # Keys of the arrays' type: searching int32 with int64 keys copies the whole
            # array to int64 first (128 MB for 16M clusters). No cluster past 2**31 is held.
            fits = (clusters >= 0) & (clusters <= 0x7FFFFFFF)
            keys = clusters[fits].astype(np.int32)
            pos = np.minimum(np.searchsorted(self.clusters, keys), len(self.clusters) - 1)
            hit = self.clusters[pos] == keys
            found = np.zeros(len(keys), _U64)
            found[hit] = self.counts[pos[hit]]
            out[fits] = found
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(cluster indices int32, counts uint32 or uint64), sorted by cluster: the arrays
        themselves, not copies."""
        self._merge()
        return self.clusters, self.counts


class _L2Refs:
    """The distinct L2 table offsets named by L1 entries, with how often (active, snapshots).

    Each L1 table's offsets are reduced to (distinct offsets, counts) at once; the merge into
    one sorted set is deferred until a few million offsets wait, so thousands of snapshot L1
    tables sharing the same L2 tables cost one merge, not one each.
    """
    MERGE_AT = 1 << 22

    def __init__(self):
        self.offsets = np.zeros(0, np.int64)
        self.active = np.zeros(0, np.int64)
        self.snap = np.zeros(0, np.int64)
        self._pending: list = []
        self._waiting = 0

    def add(self, offsets: np.ndarray, active: bool, times: int = 1) -> None:
        new, counts = np.unique(offsets, return_counts=True)
        self._pending.append((new, counts * times, active))
        self._waiting += len(new)
        if self._waiting >= self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = [(self.offsets, self.active, self.snap)]
        for new, counts, active in self._pending:
            zero = np.zeros(len(new), np.int64)
            parts.append((new, counts, zero) if active else (new, zero, counts))
        offsets = np.concatenate([p[0] for p in parts])
        merged, inv = np.unique(offsets, return_inverse=True)
        self.active = np.bincount(inv, np.concatenate([p[1] for p in parts]),
                                  len(merged)).astype(np.int64)
        self.snap = np.bincount(inv, np.concatenate([p[2] for p in parts]),
                                len(merged)).astype(np.int64)
        self.offsets = merged
        self._pending, self._waiting = [], 0

    def distinct(self):
        """(offsets, active counts, snapshot counts), sorted by offset."""
        self._merge()
        return self.offsets, self.active, self.snap


_SNAPSHOT_ENTRY = 40                # sizeof(QCowSnapshotHeader)
_INT64_MAX = (1 << 63) - 1
# qcow2_do_open()'s words for the snapshot table pointer, which it leaves to the check.
_SNAPSHOT_POINTER = ("Snapshot table too large", "Snapshot table offset invalid")


def check_snapshot_table(fd: int, h: Header, fix: bool = False,
                         notes: list | None = None) -> tuple[list, int]:
    """The snapshot table as the check reads it (qcow2_check_read_snapshot_table()): returns
    (snapshots, table size in bytes); raises CheckFailed in QEMU's words.

    Its pointer in the header is checked as qcow2_validate_table() checks it, then the table is
    read as at open. `fix` (check -r all): QEMU first drops the snapshots past its limit, then
    reads the table in repair mode (qcow2_do_read_snapshots(repair=true)): extra data over
    its limit and entries past 64 MiB are dropped, a failed read still fails the check. Its
    "Discarding ..." lines are appended to `notes`.
    """
    count, offset = h.nb_snapshots, h.snapshots_offset
    notes = [] if notes is None else notes
    if count > MAX_SNAPSHOTS and fix:
        notes.append(f"Discarding {count - MAX_SNAPSHOTS} overhanging snapshots")
        count = MAX_SNAPSHOTS
    if count > MAX_SNAPSHOTS:
        raise CheckFailed(f"snapshot table too large ({count} snapshots, limit "
                          f"{MAX_SNAPSHOTS})", error="ERROR snapshot table too large",
                          hint=f"You can force-remove all {count - MAX_SNAPSHOTS} overhanging "
                          "snapshots with qemu-img check -r all", code=errno.EFBIG)
    if offset % h.cluster_size or offset + _SNAPSHOT_ENTRY * count > _INT64_MAX:
        raise CheckFailed(f"snapshot table offset {offset:#x} invalid (not aligned to the "
                          f"cluster size {h.cluster_size}, or the table ends past 2^63)",
                          error="ERROR snapshot table offset invalid", code=errno.EINVAL,
                          messages=notes)
    if not count:
        return [], 0
    try:
        return read_snapshot_table(fd, replace(h, nb_snapshots=count), notes if fix else None)
    except CorruptImage as exc:
        raise CheckFailed(f"failed to read the snapshot table: {exc}",
                          error="ERROR failed to read the snapshot table: "
                          f"{exc.qemu_chain or exc}", hint=exc.qemu_hint,
                          code=getattr(exc, "qemu_errno", errno.EIO), messages=notes) from None


def _header_area(fd: int, file_size: int) -> bytearray:
    """The first cluster of the image, zeros past the end of the file: qcow2_do_open() reads
    the header, its extensions and the backing file name so (bdrv_pread() of a file cut short),
    and the check reports what lies past the end, as qemu-img check does."""
    data = bytearray(os.pread(fd, min(file_size, 1 << MAX_CLUSTER_BITS), 0))
    bits = int.from_bytes(data[20:24], "big") if len(data) >= 24 else 0
    if len(data) < 1 << min(max(bits, 12), MAX_CLUSTER_BITS):
        data += bytes((1 << min(max(bits, 12), MAX_CLUSTER_BITS)) - len(data))
    return data


def _check_mode_header(fd: int, file_size: int) -> Header:
    """The header as qcow2_do_open() reads it for a check (BDRV_O_CHECK): it ignores the
    snapshot table pointer, which the check validates (check_snapshot_table), so a fault
    there does not fail the open, and a header fault after it is the one reported."""
    try:
        return read_header(fd, file_size, tables_in_file=False, data_file_name=True)
    except TruncatedImage as exc:
        try:
            return parse_header(_header_area(fd, file_size), 1 << 63, refcount_table=False)
        except QcowError:
            raise exc from None
    except QcowError as exc:
        if exc.qemu_chain not in _SNAPSHOT_POINTER:
            raise
    data = _header_area(fd, file_size)
    count, offset = struct.unpack_from(">IQ", data, 60)
    data[60:72] = bytes(12)
    header = parse_header(bytes(data), 1 << 63, refcount_table=False, data_file_name=True)
    return replace(header, nb_snapshots=count, snapshots_offset=offset)


def _open_chain(opened, ident: tuple, header: Header, backing_dirs, force_share) -> None:
    """Open (then close) the external data file and the backing chain the image names.

    qemu-img check opens the whole chain before it checks, and fails (exit code 1) when a
    backing or data file is missing, the chain loops, the backing format is unknown, or the
    image needs a data file and names none. Files are found under qcowfast's path policy.
    """
    from .errors import BackingChainError, ImageOpenError, UnsupportedFeature, in_chain
    from .image import Image, RawImage, check_qcow2_backing, unsupported_backing_format
    from .paths import resolve_reference
    from .probe import detect_format, driver_refusal
    name = opened.path
    if header.has_data_file:
        if not header.data_file:            # (a header cut short: read as zeros)
            raise _no_data_file(header.data_file)
        try:
            resolve_reference(opened, header.data_file, "external data file",
                              backing_dirs).close()
        except QcowError as exc:
            in_chain(exc, name, backing=False)
            raise
    if not header.backing_file:
        return
    if header.backing_format is not None and driver_refusal(header.backing_format) is not None:
        raise unsupported_backing_format(header.backing_format, name)   # (before the file)
    try:
        backing = resolve_reference(opened, header.backing_file, "backing file", backing_dirs)
    except QcowError as exc:
        in_chain(exc, name, backing=True)
        raise
    try:
        if backing.ident == ident:
            raise BackingChainError(f"backing chain loops: {name} -> {backing.path}")
        fmt = header.backing_format or detect_format(backing.fd, backing.path)
        if fmt in RAW_FORMATS:
            layer = RawImage(backing, 1, force_share=force_share)
        elif fmt == "qcow2":
            check_qcow2_backing(backing, name)
            try:
                layer = Image(backing, backing_dirs=backing_dirs, force_share=force_share,
                              _depth=1, _seen=(ident,), _top=name)
            except QcowError as exc:
                if exc.qemu_chain is not None:      # a file below the backing file
                    in_chain(exc, name, backing=True)
                raise
        else:
            raise unsupported_backing_format(fmt, name, backing.fd)
        layer.close()
    finally:
        backing.close()


def check(path, *, progress=None, backing_dirs=(), force_share=False,
          probe: bool = True) -> CheckResult:
    """Check a QCOW2 image's metadata read-only, as `qemu-img check` does (without repairs).

    Parameters
    ----------
    path : str or os.PathLike
        The image. Its backing chain and external data file are opened first (as qemu-img
        check does) but not checked.
    progress : callable(done, total), optional
        Called as L2 tables and refcount blocks are checked (in bytes of metadata).
    backing_dirs : iterable of paths
        Extra directories trusted to hold backing and data files the image names.
    force_share : bool
        Check the image (and open its backing chain) even when a running QEMU holds it open
        for writing (-U); otherwise that raises ImageLocked, as qemu-img refuses.
    probe : bool
        Decide the format as qemu-img's probe does (True, as without -f): a file with the
        QCOW2 magic but version 0 or 1 is not QCOW2 (NotChecked). False (-f qcow2): it is a
        broken QCOW2 image (QcowError).

    Returns
    -------
    CheckResult
        Counters equal to `qemu-img check --output=json`'s (see `CheckResult.to_json`), the
        problems found (`messages`) and metadata overlaps. `exit_code` is qemu-img's.

    Raises
    ------
    NotChecked
        The file is not a QCOW2 image (qemu-img: "This image format does not support checks").
    ImageNotFound
        The image does not exist (a QcowError and a FileNotFoundError); ImageOpenError when it
        cannot be opened for another reason. Both start "Could not open 'PATH': ".
    UnsafePathError
        The name holds a NUL byte (the message shows it escaped, as every entry point does).
    QcowError
        The image cannot be checked at all (qemu-img exits 1): its header is invalid or its
        chain cannot be opened (the message starts with "Could not open 'PATH': "), its
        bitmaps cannot be read, or memory ran out.
    CheckFailed
        The check stopped where qemu-img's stops (exit 1, no report): the snapshot table or
        its pointer is invalid, a snapshot L1 table lies past what QEMU can read; qemu-img's
        words in its attributes.
    """
    from .arguments import boolean, callback
    progress = callback(progress, "progress")
    force_share, probe = boolean(force_share, "force_share"), boolean(probe, "probe")
    name = os.fsdecode(os.fspath(path))
    opened, fd, header = _open_for_check(name, backing_dirs, force_share, probe)
    try:
        result = CheckResult(filename=name)
        result.total_clusters = -(-(header.size // 512 * 512) // header.cluster_size)
        try:
            # The file's size as the check starts (qemu: bdrv_getlength in
            # qcow2_check_refcounts), not as it was opened: under -U a writer may have grown it.
            checker = _Checker(fd, header, os.fstat(fd).st_size, result, progress)
            checker.run(StoredRefcounts(fd, header))
        except MemoryError:
            raise AllocationFailed(f"{name}: not enough memory to check the image") from None
        return result
    finally:
        os.close(fd)
        opened.close_dir()


def _open_for_check(name: str, backing_dirs, force_share: bool, probe: bool):
    """Open the image `name` as qemu-img check opens it, with its chain (see check()); returns
    (opened file, its descriptor, header): the caller closes both."""
    try:
        # Opened as info and compare open their images (paths.open_file): a missing file is
        # ImageNotFound, any other failure to open ImageOpenError (both QcowErrors and
        # OSErrors); directories, FIFOs, sockets and devices are refused before any read.
        opened = open_file(name, "image", block_devices=False, keep_dir=True)
    except UnsafePathError:
        raise                   # a NUL byte, never shown raw: paths words it with the name repr'd
    except QcowError as exc:
        raise _reworded(exc, f"Could not open '{name}': {exc}") from exc
    fd = opened.detach()
    try:
        st = os.fstat(fd)
        head = os.pread(fd, 8, 0)
        if head[:4] != QCOW_MAGIC:
            raise NotChecked(f"{name} is not a QCOW2 image; only QCOW2 images can be checked")
        # The probe reads 2 KiB, zeros past the end of the file: a 4-byte file is version 0.
        version = int.from_bytes(head[4:8].ljust(4, b"\0"), "big")
        if probe and version == 1:
            _qcow_v1_open(fd, name)
        if probe and version < 2:
            # qcow2_probe() wants version >= 2: qemu-img takes such a file as raw (or as QCOW
            # version 1), formats it cannot check either.
            raise NotChecked(f"{name} is not a QCOW2 image (QCOW2 magic, but version "
                             f"{version}); only QCOW2 images can be checked")
        try:
            if not force_share:             # qemu-img check takes QEMU's locks as info does
                check_not_locked(fd, name)
            header = _check_mode_header(fd, st.st_size)
            warn_stale_bitmaps(header, name)
            if header.bitmaps is not None:      # loaded at open, as qemu-img check opens
                check_bitmaps_at_open(fd, header, st.st_size)
            _open_chain(opened, (st.st_dev, st.st_ino), header, directories(backing_dirs),
                        force_share)
        except QcowError as exc:
            raise _reworded(exc, f"Could not open '{name}': {exc}") from exc
    except BaseException:
        os.close(fd)
        opened.close_dir()
        raise
    return opened, fd, header


def check_open(path, *, repair: str = "leaks", backing_dirs=(), force_share=False,
               probe: bool = True) -> None:
    """Raise what `qemu-img check -r REPAIR` fails with before it writes anything (for the
    command line, which then refuses to repair): the open of the image and its chain, the
    snapshot table (check_snapshot_table; `repair="all"` reads it in QEMU's repair mode) and
    the walk over the tables (a snapshot L1 table QEMU cannot read or count), unless `-r all`
    would already have rewritten an L2 entry in that walk. Raises as check() does."""
    name = os.fsdecode(os.fspath(path))
    opened, fd, header = _open_for_check(name, backing_dirs, force_share, probe)
    try:
        # qcow2_check_refcounts() repairs only once calculate_refcounts() has walked every
        # table: a walk that fails (EIO, ENOMEM) fails the check before any write, in the
        # same lines as without -r, as long as it met nothing -r all fixes during the walk.
        checker = _Checker(fd, header, os.fstat(fd).st_size, CheckResult(filename=name), None)
        try:
            checker.run(StoredRefcounts(fd, header), fix=repair == "all")
        except CheckFailed as exc:
            if not (repair == "all" and checker.fixed_in_walk):
                raise
        except MemoryError:
            raise AllocationFailed(f"{name}: not enough memory to check the image") from None
    finally:
        os.close(fd)
        opened.close_dir()


def _reworded(exc: QcowError, message: str) -> QcowError:
    """The same kind of exception with another message (and the errno of an OSError)."""
    try:
        new = type(exc)(message)
    except TypeError:
        return QcowError(message)
    if isinstance(exc, OSError):
        new.errno, new.strerror, new.filename = exc.errno, exc.strerror, exc.filename
    new.qemu_chain, new.qemu_top, new.qemu_hint = exc.qemu_chain, exc.qemu_top, exc.qemu_hint
    return new


def _qcow_v1_open(fd: int, name: str) -> None:
    """qemu-img probes QCOW version 1 (block/qcow.c): qcow_open()'s header checks fail as
    "Could not open" (exit 1) before the check is found missing (63)."""
    head = os.pread(fd, 48, 0).ljust(48, b"\0")
    size, cluster_bits, l2_bits = int.from_bytes(head[24:32], "big"), head[32], head[33]
    why = ("Image size is too small (must be at least 2 bytes)" if size <= 1 else
           "Cluster size must be between 512 and 64k" if not 9 <= cluster_bits <= 16 else
           "L2 table size must be between 512 and 64k" if not 6 <= l2_bits <= 13 else None)
    if why:
        raise QcowError(f"Could not open '{name}': {why}")


__all__ = ["check", "check_open", "CheckResult", "CheckFailed", "Overlap", "NotChecked"]
