"""Exact deduplication whose memory does not grow with the corpus: digests partitioned on disk.

The in-memory way (a Python ``set`` of 12-byte digests) costs ~100 bytes per unique document:
10 GB at 100 M documents, in one process. Here the main pass spills one fixed-size record per
document, ``(digest, ordinal, file index)``, into one of ``P`` partition files chosen by the
digest; equal documents have equal digests, so every duplicate pair lies in one partition. Each
partition is then read alone (in ``P`` independent jobs, on as many processes as asked), sorted
by (digest, ordinal), and every record whose digest equals its predecessor's is a later copy:
its ordinal is set in a bitmap of one bit per document. A last pass streams the documents again
and skips the marked ordinals, so the first occurrence in corpus order is kept, exactly as the
in-memory set keeps it: the output is identical.

Memory: the write buffers (8 MB in all), the bitmap (1 bit per document) and one partition's
records at a time (24 bytes per document / P, a few times that while sorting): 100 M documents
with P = 256 need ~13 MB of bitmap and ~30 MB per partition job. Disk: 24 bytes per document, in the stage's staging
directory, deleted with it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from data_tools.parallel import ordered_map

DIGEST_BYTES = 12
# One spilled record: the digest split so numpy can sort on it, then where the document came from.
RECORD = np.dtype([("high", ">u8"), ("low", ">u4"), ("ordinal", "<u8"), ("file", "<u4")])
# Write buffers of all partitions together hold at most this much (each flushes at its share).
SPILL_BUFFER_BYTES = 8 << 20


def document_digest(text: str) -> bytes:
    """The exact-dedup key of a normalized document (the one clean and clean-combine use)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


class PartitionedDigests:
    """Spills ``(digest, ordinal, file)`` records into ``partitions`` files under ``directory``."""

    def __init__(self, directory: Path, partitions: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.partitions = partitions
        self.paths = [self.directory / f"digests-{k:05d}.bin" for k in range(partitions)]
        self._buffers = [bytearray() for _ in range(partitions)]
        self._handles = [open(path, "wb") for path in self.paths]  # noqa: SIM115
        self._flush_bytes = max(RECORD.itemsize * 64, SPILL_BUFFER_BYTES // partitions)
        self.records = 0

    def add(self, digest: bytes, ordinal: int, file_index: int) -> None:
        partition = int.from_bytes(digest[:4], "big") % self.partitions
        buffer = self._buffers[partition]
        buffer += digest
        buffer += ordinal.to_bytes(8, "little")
        buffer += file_index.to_bytes(4, "little")
        self.records += 1
        if len(buffer) >= self._flush_bytes:
            self._handles[partition].write(buffer)
            buffer.clear()

    def close(self) -> list[Path]:
        for handle, buffer in zip(self._handles, self._buffers):
            handle.write(buffer)
            buffer.clear()
            handle.close()
        return self.paths


def later_copies(path: Path) -> tuple[np.ndarray, dict[int, int]]:
    """One partition job: the ordinals of the documents whose digest an earlier document (lower
    ordinal) has, and how many of them each input file holds."""
    records = np.fromfile(path, dtype=RECORD)
    if len(records) < 2:
        return np.zeros(0, dtype=np.uint64), {}
    records = records[np.lexsort((records["ordinal"], records["low"], records["high"]))]
    repeat = np.zeros(len(records), dtype=bool)
    repeat[1:] = (records["high"][1:] == records["high"][:-1]) & (records["low"][1:] == records["low"][:-1])
    copies = records[repeat]
    per_file = Counter(copies["file"].tolist())
    return copies["ordinal"].astype(np.uint64), {int(k): v for k, v in per_file.items()}


class DuplicateBitmap:
    """One bit per document ordinal: set for a later copy."""

    def __init__(self, documents: int) -> None:
        self.bits = np.zeros((documents + 7) // 8, dtype=np.uint8)
        self.count = 0

    def mark(self, ordinals: np.ndarray) -> None:
        ordinals = ordinals.astype(np.int64)
        np.bitwise_or.at(self.bits, ordinals >> 3, (1 << (ordinals & 7)).astype(np.uint8))
        self.count += len(ordinals)

    def __contains__(self, ordinal: int) -> bool:
        return bool((self.bits[ordinal >> 3] >> (ordinal & 7)) & 1)

    def flags(self, start: int, stop: int) -> np.ndarray:
        """Whether each ordinal in [start, stop) is marked, as booleans."""
        bits = np.unpackbits(self.bits[start >> 3 : (stop + 7) >> 3], bitorder="little")
        return bits[start & 7 : (start & 7) + stop - start].astype(bool)


def find_later_copies(digests: PartitionedDigests, processes: int = 1) -> tuple[DuplicateBitmap, Counter[int]]:
    """Run the partition jobs (``processes`` at a time) and merge their answers into a bitmap (one
    bit per spilled record) and per-file counts of dropped copies."""
    bitmap = DuplicateBitmap(digests.records)
    per_file: Counter[int] = Counter()
    for ordinals, counts in ordered_map(later_copies, digests.close(), processes):
        bitmap.mark(ordinals)
        per_file.update(counts)
    return bitmap, per_file


def spill_directory(parent: Path) -> tempfile.TemporaryDirectory:
    """Where the partition files go: inside the stage's staging directory, so they share its disk
    and are removed with it whatever happens."""
    return tempfile.TemporaryDirectory(prefix=".dedup-", dir=parent)


def iter_unmarked(items: Iterator, bitmap: DuplicateBitmap) -> Iterator:
    """The items whose position in ``items`` is not marked."""
    for ordinal, item in enumerate(items):
        if ordinal not in bitmap:
            yield item
