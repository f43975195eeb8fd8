"""Near-deduplication whose memory does not grow with the corpus: MinHash LSH partitioned on disk.

datasketch's in-memory LSH index (``--near_dedup_threshold`` alone) costs ~2.3 KB per kept
document in one process. Here (``--near_dedup_partitions P``) each document's MinHash signature
(character n-grams, a fixed numpy hash family, so every process and every run computes the same
one) is appended to a signature file, and its LSH band keys are spilled as 16-byte
``(key, ordinal)`` records into one of ``P`` partition files chosen by the key: two documents that
share a band share its key, so every candidate pair meets in one partition. Each partition is then
read alone (``processes`` at a time), sorted by (key, ordinal), and a document is marked when a
document earlier in corpus order shares one of its band keys and, with ``verify`` (the default),
its estimated Jaccard (the share of equal signature rows) reaches the threshold. The marks go into
a bitmap of one bit per document; a last pass skips them, so the first document of each group is
kept.

The rule is "drop a document near an *earlier* document", not datasketch's "near an earlier *kept*
document" (which needs the documents in order, one at a time) nor union-find's "all but the first
of each connected cluster" (which drops B in A~C, B~C even though B is near nothing earlier, and
needs a word per document). It differs from datasketch only on chains (A~B, B~C, A not ~ C: C is
dropped here, kept by datasketch); bench/dedup_memory.py measures the effect.

Memory: the write buffers, one partition's records at a time (16 bytes x bands per document / P)
and the bitmap (1 bit per document). Disk: 4 bytes x permutations + 16 bytes x bands per document.

The signatures of the documents kept are written beside the output (``minhash_signatures.npy``, in
the manifest's ``minhash``): the clean jobs of a Slurm array compute their slices' signatures, and
zh-clean-combine reads them instead of computing the whole corpus's again in one job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from data_tools.common import UserError, file_sha256
from data_tools.dedup import DuplicateBitmap
from data_tools.manifests import MinhashRecord
from data_tools.parallel import ordered_map

NGRAM = 5  # character 5-grams by default (--minhash_ngram), as the datasketch path (filters.minhash_signature)
MAX_NGRAM = 64
MAX_PARTITIONS = 1 << 16
MAX_NUM_PERM = 1024
BAND_RECORD = np.dtype([("key", "<u8"), ("ordinal", "<u8")])
SIGNATURE_HEADER_BYTES = 128  # a fixed .npy header, rewritten with the final shape on close
SPILL_BUFFER_DOCUMENTS = 1024  # bounds the fixed memory: ~1 MB of signatures and keys in flight


def check_ngram(ngram: int) -> None:
    if not 1 <= ngram <= MAX_NGRAM:
        raise UserError(f"--minhash_ngram {ngram} must lie in [1, {MAX_NGRAM}] (characters per shingle)")


def check_near_dedup_options(threshold: float, num_perm: int, partitions: int) -> None:
    """One-line UserErrors for values out of range."""
    if not 0 < threshold < 1:
        raise UserError(f"--near_dedup_threshold {threshold} must lie in (0, 1) with --near_dedup_partitions")
    if not 2 <= num_perm <= MAX_NUM_PERM:
        raise UserError(f"--minhash_num_perm {num_perm} must lie in [2, {MAX_NUM_PERM}]")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise UserError(f"--near_dedup_partitions {partitions} must lie in [1, {MAX_PARTITIONS}]")


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads a polynomial hash over all 64 bits (uint64 wraps by design)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


class MinHasher:
    """MinHash signatures (uint32 x ``num_perm``) of a text's distinct character n-grams: each n-gram
    hashed to 64 bits, then permuted by multiply-add-shift with fixed seeded constants."""

    def __init__(self, num_perm: int, ngram: int = NGRAM, seed: int = 1) -> None:
        check_ngram(ngram)
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, 1 << 63, num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The distinct n-gram hashes (a text shorter than n is one shingle, as in the datasketch path)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        count = max(1, len(codes) - self.ngram + 1)
        hashes = np.zeros(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(min(self.ngram, len(codes))):
                hashes = hashes * np.uint64(1_000_003) + codes[k : k + count]
        return np.unique(_mix(hashes))

    def signature(self, text: str) -> np.ndarray:
        shingles = self.shingles(text)
        minimum = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), 512):  # bounds the (shingles x perms) block to 0.5 MB
                block = shingles[start : start + 512, None] * self.a[None, :] + self.b[None, :]
                np.minimum(minimum, (block >> np.uint64(32)).min(axis=0), out=minimum)
        return minimum.astype(np.uint32)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimizing false positives + false negatives with equal weights, as datasketch
    chooses them (its integrals, here by the trapezoid rule)."""
    best, best_error = (1, 1), float("inf")
    below, above = np.linspace(0.0, threshold, 513), np.linspace(threshold, 1.0, 513)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_negative = np.trapezoid((1 - above**rows) ** bands, above)
            error = 0.5 * false_positive + 0.5 * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64 keys: equal exactly when the band's rows are equal (but for 2^-64)."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = np.broadcast_to(np.arange(bands, dtype=np.uint64), banded.shape[:2]).copy()
    with np.errstate(over="ignore"):
        for row in range(rows):
            keys = _mix(keys * np.uint64(0x100000001B3) + banded[:, :, row])
    return keys


def write_signature_header(handle: BinaryIO, documents: int, num_perm: int) -> None:
    """A .npy v1.0 header padded to SIGNATURE_HEADER_BYTES, so np.load reads the file as it is."""
    text = repr({"descr": "<u4", "fortran_order": False, "shape": (documents, num_perm)})
    text = text.ljust(SIGNATURE_HEADER_BYTES - 10 - 1) + "\n"
    handle.seek(0)
    handle.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1"))


def read_signature_rows(path: Path, documents: int, num_perm: int, ordinals: np.ndarray) -> np.ndarray:
    """The signatures of ``ordinals`` (sorted, unique), read row by row: a memmap would count every
    page touched in the process's memory. A missing or truncated file (a killed stage) is an error."""
    expected = SIGNATURE_HEADER_BYTES + documents * num_perm * 4
    size = path.stat().st_size if path.is_file() else "missing"
    if size != expected:
        raise UserError(f"signature file {path}: {size} bytes, expected {expected} "
                        "(a killed near-dedup stage?); rerun the stage")
    row_bytes = num_perm * 4
    rows = np.empty((len(ordinals), num_perm), dtype="<u4")
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        shape = np.lib.format.read_array_header_1_0(handle)[0]
        if shape != (documents, num_perm):
            raise UserError(f"signature file {path}: shape {shape}, expected {(documents, num_perm)}")
        for index, ordinal in enumerate(ordinals.tolist()):
            rows[index] = np.frombuffer(os.pread(handle.fileno(), row_bytes, SIGNATURE_HEADER_BYTES + ordinal * row_bytes),
                                        dtype="<u4")
    return rows


class NearDedupSpill:
    """Signatures and band records of documents added in corpus order (ordinal 0, 1, ...)."""

    def __init__(self, directory: Path, threshold: float, num_perm: int, partitions: int, verify: bool = True) -> None:
        check_near_dedup_options(threshold, num_perm, partitions)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threshold, self.num_perm, self.partitions, self.verify = threshold, num_perm, partitions, verify
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.signature_path = self.directory / "signatures.npy"
        self._signatures = open(self.signature_path, "wb")  # noqa: SIM115
        self._signatures.write(b"\0" * SIGNATURE_HEADER_BYTES)
        self.paths = [self.directory / f"bands-{k:05d}.bin" for k in range(partitions)]
        self._handles = [open(path, "wb") for path in self.paths]  # noqa: SIM115
        self.records = np.zeros(partitions, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self.documents = self._flushed = 0

    def add(self, signature: np.ndarray) -> None:
        self._pending.append(signature)
        self.documents += 1
        if len(self._pending) >= SPILL_BUFFER_DOCUMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        signatures = np.stack(self._pending).astype("<u4")
        self._pending.clear()
        self._signatures.write(signatures.tobytes())
        keys = band_keys(signatures, self.bands, self.rows)
        records = np.empty(keys.size, dtype=BAND_RECORD)
        records["key"] = keys.ravel()
        records["ordinal"] = np.repeat(np.arange(self._flushed, self._flushed + len(signatures), dtype=np.uint64),
                                       self.bands)
        self._flushed += len(signatures)
        partition = (records["key"] % np.uint64(self.partitions)).astype(np.int64)
        order = np.argsort(partition, kind="stable")
        bounds = np.searchsorted(partition[order], np.arange(self.partitions + 1))
        for k in np.flatnonzero(np.diff(bounds)).tolist():
            self._handles[k].write(records[order[bounds[k] : bounds[k + 1]]].tobytes())
            self.records[k] += bounds[k + 1] - bounds[k]

    def close(self) -> list[tuple]:
        """The partition jobs (picklable, for :func:`near_copies`)."""
        self._flush()
        write_signature_header(self._signatures, self.documents, self.num_perm)
        self._signatures.close()
        for handle in self._handles:
            handle.close()
        return [(path, int(count), self.signature_path, self.documents, self.num_perm, self.threshold, self.verify)
                for path, count in zip(self.paths, self.records)]


def read_band_records(path: Path, expected: int) -> np.ndarray:
    """One partition's records; a missing or truncated file is an error, never 'no duplicates'."""
    size = path.stat().st_size if path.is_file() else None
    if size != expected * BAND_RECORD.itemsize:
        raise UserError(f"band partition file {path}: {'missing' if size is None else f'{size} bytes'}, expected "
                        f"{expected * BAND_RECORD.itemsize} (a killed near-dedup stage?); rerun the stage")
    return np.fromfile(path, dtype=BAND_RECORD)


def near_copies(job: tuple) -> np.ndarray:
    """One partition job: the ordinals (unique, sorted) of documents sharing a band key with an earlier
    document whose estimated Jaccard with them reaches the threshold (any earlier one without verify)."""
    path, expected, signature_path, documents, num_perm, threshold, verify = job
    records = read_band_records(path, expected)
    if len(records) < 2:
        return np.zeros(0, dtype=np.uint64)
    records = records[np.lexsort((records["ordinal"], records["key"]))]
    keys, ordinals = records["key"], records["ordinal"]
    later = np.zeros(len(records), dtype=bool)
    later[1:] = keys[1:] == keys[:-1]
    later[1:] &= ordinals[1:] != ordinals[:-1]  # a document's own two bands with one key (2^-64)
    if not verify:
        return np.unique(ordinals[later])
    starts = np.flatnonzero(~later)
    group_of = np.searchsorted(starts, np.arange(len(records)), side="right") - 1
    in_pairs = later.copy()
    in_pairs[starts[group_of[later]]] = True  # the first of each group with a later member
    needed = np.unique(ordinals[in_pairs])
    rows = read_signature_rows(signature_path, documents, num_perm, needed)
    row_of = np.searchsorted(needed, ordinals)  # each record's row in ``rows``
    candidates = np.flatnonzero(later)
    first = starts[group_of[candidates]]
    near = (rows[row_of[first]] == rows[row_of[candidates]]).mean(axis=1) >= threshold
    marked = [ordinals[candidates[near]]]
    for position, start in zip(candidates[~near].tolist(), first[~near].tolist()):
        earlier = row_of[start + 1 : position]  # the group's first was compared already
        if len(earlier) and ((rows[earlier] == rows[row_of[position]]).mean(axis=1) >= threshold).any():
            marked.append(ordinals[position : position + 1])
    return np.unique(np.concatenate(marked))


def find_near_copies(spill: NearDedupSpill, processes: int = 1) -> DuplicateBitmap:
    """Run the partition jobs and merge their marks into one bitmap; ``count`` is the number of
    distinct documents marked (a document can be marked in several partitions, by several bands)."""
    bitmap = DuplicateBitmap(spill.documents)
    for ordinals in ordered_map(near_copies, spill.close(), processes):
        bitmap.mark(ordinals)
    bitmap.count = int(np.bitwise_count(bitmap.bits).sum())
    return bitmap


# -- the signatures of an output's documents ----------------------------------------------------------

SIGNATURES_FILE = "minhash_signatures.npy"
COPY_BLOCK_ROWS = 8192  # 4 MB of signatures at 128 permutations


def write_kept_signatures(spill: NearDedupSpill, dropped: Callable[[int, int], np.ndarray], destination: Path,
                          ngram: int) -> MinhashRecord:
    """The spilled signatures (after :func:`find_near_copies` closed the spill) of the documents not
    ``dropped(start, stop)`` (booleans per ordinal), in order, into the .npy ``destination``, a block at a time."""
    rows = 0
    with open(spill.signature_path, "rb") as source, open(destination, "wb") as out:
        out.write(b"\0" * SIGNATURE_HEADER_BYTES)
        for start in range(0, spill.documents, COPY_BLOCK_ROWS):
            stop = min(start + COPY_BLOCK_ROWS, spill.documents)
            source.seek(SIGNATURE_HEADER_BYTES + start * spill.num_perm * 4)
            block = np.fromfile(source, dtype="<u4", count=(stop - start) * spill.num_perm)
            kept = block.reshape(stop - start, spill.num_perm)[~dropped(start, stop)]
            out.write(kept.tobytes())
            rows += len(kept)
        write_signature_header(out, rows, spill.num_perm)
    return MinhashRecord(file=destination.name, rows=rows, num_perm=spill.num_perm, ngram=ngram,
                         bytes=destination.stat().st_size, sha256=file_sha256(destination))


def read_kept_signatures(directory: Path, record: MinhashRecord) -> Iterator[np.ndarray]:
    """The signatures an output recorded, a row at a time in document order, after checking the file against the
    manifest (:func:`checked_signature_file`)."""
    path = checked_signature_file(directory, record)
    with open(path, "rb") as handle:
        handle.seek(SIGNATURE_HEADER_BYTES)
        for start in range(0, record.rows, COPY_BLOCK_ROWS):
            count = min(COPY_BLOCK_ROWS, record.rows - start)
            yield from np.fromfile(handle, dtype="<u4", count=count * record.num_perm).reshape(count, record.num_perm)


def checked_signature_file(directory: Path, record: MinhashRecord) -> Path:
    """The signature file an output's manifest records, checked against it (size, sha256, .npy shape): a
    damaged or foreign file is named, never read as signatures."""
    path = Path(directory) / record.file
    size = path.stat().st_size if path.is_file() else None
    expected = SIGNATURE_HEADER_BYTES + record.rows * record.num_perm * 4
    if size != record.bytes or size != expected or file_sha256(path) != record.sha256:
        raise UserError(f"{path}: {'missing' if size is None else f'{size} bytes'} or its sha256 differs from the "
                        f"manifest's minhash record ({record.bytes} bytes expected); re-run the clean job of {directory}")
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        shape = np.lib.format.read_array_header_1_0(handle)[0]
        if shape != (record.rows, record.num_perm):
            raise UserError(f"{path}: shape {shape}, expected {(record.rows, record.num_perm)}; re-run the clean job "
                            f"of {directory}")
    return path
