"""clean-combine: merge the outputs of independent clean jobs (``--num_slices``) into one.

Each slice deduplicates only within itself; the combine pass streams every slice's
documents in slice order, drops exact duplicates across slices (counted as
``duplicate``), writes fresh shards and a manifest whose counts are the slices' sums,
so ``kept + dropped == read`` still holds for the whole corpus. With ``--near_dedup_threshold`` and
``--near_dedup_partitions`` it also drops near-duplicates across slices (``near_duplicate``), with
MinHash LSH partitioned on disk (:mod:`data_tools.near_dedup`).
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError
from data_tools.dedup import (
    DuplicateBitmap,
    PartitionedDigests,
    document_digest,
    find_later_copies,
    iter_unmarked,
    spill_directory,
)
from data_tools.filters import ExactDuplicates, NearDuplicates
from data_tools.manifests import MANIFEST, CleanCounts, CleanManifest, MinhashRecord, read_manifest
from data_tools.near_dedup import (
    NGRAM,
    SIGNATURES_FILE,
    MinHasher,
    NearDedupSpill,
    check_near_dedup_options,
    check_ngram,
    find_near_copies,
    read_kept_signatures,
    write_kept_signatures,
)
from data_tools.outputs import output_guard, overwrite_option, staged_dir
from data_tools.parallel import chunked, ordered_map
from data_tools.shards import (
    ShardedJsonlWriter,
    check_stage_output,
    iter_document_texts,
    shard_paths,
)

STAGE = CleanManifest.STAGE  # its output is a clean output, which tokenize and further combines read


@dataclass(kw_only=True)
class CombineConfig:
    """Merge clean outputs of several slices into one clean output directory."""

    input_dirs: list[Path] = required("Output directories of the clean jobs, one per slice.")
    output_dir: Path = required("Directory for the combined documents-NNNNN.jsonl shards and manifest.json.")
    deduplicate: bool = option(True, "Drop exact duplicates across slices (duplicate).")
    dedup_partitions: int = option(
        0, "0: exact dedup with an in-memory set (~100 bytes per unique document). N > 0: spill digests into N "
        "partition files and dedup each alone, --processes_num at a time, with a 1-bit-per-document bitmap: memory "
        "stays flat as the corpus grows (the slices are read twice). Same output.")
    near_dedup_threshold: float = option(
        0.0, "With --near_dedup_partitions: drop documents near an earlier document across slices (MinHash LSH on "
        "character n-grams, estimated Jaccard >= this; near_duplicate); 0 turns it off.")
    near_dedup_partitions: int = option(0, "Partition files for the LSH band keys (see zh-clean's option).")
    minhash_num_perm: int = option(128, "MinHash permutations for --near_dedup_threshold.")
    minhash_ngram: int = option(NGRAM, "Characters per shingle for the MinHash signatures, in [1, 64] (zh-clean's "
                                "--minhash_ngram).")
    near_dedup_verify: bool = option(True, "Drop an LSH candidate only when its estimated Jaccard reaches the threshold.")
    processes_num: int = option(1, "Partition jobs (and MinHash workers) run at a time with --dedup_partitions or "
                                "--near_dedup_partitions.")
    documents_per_shard: int = option(100_000, "Documents per output shard.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.input_dirs = [Path(p) for p in self.input_dirs]
        self.output_dir = Path(self.output_dir)
        if self.documents_per_shard <= 0 or self.processes_num <= 0:
            raise UserError(f"--documents_per_shard {self.documents_per_shard} and --processes_num "
                            f"{self.processes_num} must be positive")
        if self.dedup_partitions < 0:
            raise UserError(f"--dedup_partitions {self.dedup_partitions} must be >= 0")
        check_ngram(self.minhash_ngram)
        if self.near_dedup_threshold or self.near_dedup_partitions:
            check_near_dedup_options(self.near_dedup_threshold, self.minhash_num_perm, self.near_dedup_partitions)


# (slice index, directory, its manifest), in slice order
Slice = tuple[int, Path, CleanManifest]


def combine(config: CombineConfig) -> dict:
    manifests = [read_manifest(directory, STAGE) for directory in config.input_dirs]
    slices = sorted(((m.config.get("slice_index", 0), d, m) for d, m in zip(config.input_dirs, manifests)),
                    key=lambda item: item[:2])
    indices = [index for index, _, _ in slices]
    if len(set(indices)) != len(indices):
        raise UserError(f"two inputs are the same slice ({indices}); pass each slice's directory once")
    with output_guard(config.output_dir):  # locked, and SIGTERM unwinds, from the first look at the output
        check_stage_output(config.output_dir, STAGE, "documents", config.overwrite, {"--input_dirs": config.input_dirs})
        with staged_dir(config.output_dir) as staging:
            manifest = _combine_into(staging, slices, config)
            manifest.write(staging)
    print(f"clean-combine: {len(slices)} slices, {manifest.counts.documents_read} read, "
          f"{manifest.counts.documents_kept} kept -> {config.output_dir}", file=sys.stderr)
    return manifest.to_json()


def _combine_into(staging: Path, slices: list[Slice], config: CombineConfig) -> CleanManifest:
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for _, _, manifest in slices:
        for key in ("documents_read", "characters_read", "bytes_read", "documents_with_invalid_utf8_replaced"):
            counts[key] += getattr(manifest.counts, key) or 0  # absent from manifests of earlier versions
        dropped.update(manifest.counts.documents_dropped)
    writer = ShardedJsonlWriter(staging, config.documents_per_shard)
    recorded: dict[str, MinhashRecord] = {}  # the kept documents' signatures, with --near_dedup_partitions
    if config.near_dedup_partitions:
        kept_by_slices = sum(manifest.counts.documents_kept for _, _, manifest in slices)
        texts = _unmarked_texts(staging, slices, config, kept_by_slices, dropped, recorded)
    elif config.deduplicate and config.dedup_partitions:
        with spill_directory(staging) as spill:
            digests = PartitionedDigests(Path(spill), config.dedup_partitions)
            for ordinal, (index, text) in enumerate(slice_texts(slices)):
                digests.add(document_digest(text), ordinal, index)
            bitmap, _ = find_later_copies(digests, config.processes_num)
        if bitmap.count:  # as with the set: no "duplicate" entry when there was none
            dropped[ExactDuplicates.name] += bitmap.count
        texts = iter_unmarked((text for _, text in slice_texts(slices)), bitmap)
    else:
        texts = unique_texts(slice_texts(slices), dropped) if config.deduplicate else (t for _, t in slice_texts(slices))
    for text in texts:
        writer.write(text)
    shards = writer.close()
    kept = sum(shard.documents for shard in shards)
    if kept + sum(dropped.values()) != counts["documents_read"]:
        raise UserError("the slices' manifests do not add up (kept + dropped != read); re-run the slices")
    return CleanManifest(
        config={**config_to_dict(config), "combined_slices": [str(d) for _, d, _ in slices]},
        counts=CleanCounts(
            documents_read=counts["documents_read"], documents_kept=kept,
            documents_dropped=dict(sorted(dropped.items())), characters_read=counts["characters_read"],
            characters_kept=sum(shard.characters for shard in shards), bytes_read=counts["bytes_read"],
            documents_with_invalid_utf8_replaced=counts["documents_with_invalid_utf8_replaced"],
        ),
        inputs=[entry for _, _, m in slices for entry in m.inputs or []],
        # Every slice lists the same skipped files (they are found before the files are sliced).
        skipped_inputs=sorted({path for _, _, m in slices for path in m.skipped_inputs or []}),
        shards=shards,
        minhash=recorded.get("minhash"),
    )


def slice_texts(slices: list[Slice]) -> Iterator[tuple[int, str]]:
    """(position of the slice, document text) of every slice's documents, in slice order."""
    for position, (_, directory, manifest) in enumerate(slices):
        # each shard's sha256 is checked against its manifest
        for text in iter_document_texts(shard_paths(directory, manifest)):
            yield position, text


def _unmarked_texts(staging: Path, slices: list[Slice], config: CombineConfig, documents: int,
                    dropped: Counter[str], recorded: dict[str, MinhashRecord]) -> Iterator[str]:
    """Near-dedup across slices (and exact dedup, by set or partitions): a first pass spills digests
    and MinHash signatures (the slices' own when every slice recorded them with these settings, else computed
    on ``--processes_num`` workers), the partition jobs mark the documents to drop, the kept documents'
    signatures are written beside the output (``recorded["minhash"]``), a second pass yields the documents.
    An exact copy counts as ``duplicate``."""
    exact = DuplicateBitmap(documents)
    with spill_directory(staging) as spill:
        digests = PartitionedDigests(Path(spill) / "digests", config.dedup_partitions) \
            if config.deduplicate and config.dedup_partitions else None
        seen: set[bytes] | None = set() if config.deduplicate and not config.dedup_partitions else None
        near = NearDedupSpill(Path(spill) / "near", config.near_dedup_threshold, config.minhash_num_perm,
                              config.near_dedup_partitions, config.near_dedup_verify)
        ordinal = 0
        for index, text, signature in texts_with_signatures(slices, config):
            near.add(signature)
            if digests is not None:
                digests.add(document_digest(text), ordinal, index)
            elif seen is not None:
                digest = document_digest(text)
                if digest in seen:
                    exact.mark(np.array([ordinal]))
                seen.add(digest)
            ordinal += 1
        if ordinal != documents:
            raise UserError(f"the slices hold {ordinal} documents, their manifests say {documents}; re-run the slices")
        seen = None  # the set is not needed during the second pass
        if digests is not None:
            exact = find_later_copies(digests, config.processes_num)[0]
        marked = find_near_copies(near, config.processes_num)
        recorded["minhash"] = write_kept_signatures(
            near, lambda start, stop: exact.flags(start, stop) | marked.flags(start, stop),
            staging / SIGNATURES_FILE, config.minhash_ngram)
    for ordinal, (_, text) in enumerate(slice_texts(slices)):
        if ordinal in exact:
            dropped[ExactDuplicates.name] += 1
        elif ordinal in marked:
            dropped[NearDuplicates.name] += 1
        else:
            yield text


def texts_with_signatures(slices: list[Slice], config: CombineConfig) -> Iterator[tuple[int, str, np.ndarray]]:
    """(position of the slice, text, MinHash signature) of every slice's documents, in slice order, the texts read
    once: the signatures are read from the slices when each recorded its documents' with --minhash_num_perm and
    --minhash_ngram as given (checked against its manifest), else computed on --processes_num workers."""
    records = [manifest.minhash for _, _, manifest in slices]
    if all(record is not None and (record.num_perm, record.ngram) == (config.minhash_num_perm, config.minhash_ngram)
           for record in records):
        for _, directory, manifest in slices:
            if manifest.minhash.rows != manifest.row_count:
                raise UserError(f"{directory / MANIFEST}: minhash.rows is {manifest.minhash.rows} but its shards hold "
                                f"{manifest.row_count} documents; re-run the clean job of {directory}")
        print(f"clean-combine: reading the {len(slices)} slices' MinHash signatures", file=sys.stderr)
        signatures = (row for (_, directory, _), record in zip(slices, records)
                      for row in read_kept_signatures(directory, record))
        for (index, text), signature in zip(slice_texts(slices), signatures, strict=True):
            yield index, text, signature
        return
    print("clean-combine: computing MinHash signatures (the slices recorded none with --minhash_num_perm "
          f"{config.minhash_num_perm} and --minhash_ngram {config.minhash_ngram}: run them with "
          "--near_dedup_partitions to have them recorded)", file=sys.stderr)
    in_flight: deque[list[tuple[int, str]]] = deque()  # the chunks whose signatures are being computed

    def chunk_texts() -> Iterator[list[str]]:
        for chunk in chunked(slice_texts(slices), 2_000):
            in_flight.append(chunk)
            yield [text for _, text in chunk]

    for signatures in ordered_map(_chunk_signatures, chunk_texts(), config.processes_num, _init_minhash,
                                  (config.minhash_num_perm, config.minhash_ngram)):
        for (index, text), signature in zip(in_flight.popleft(), signatures):
            yield index, text, signature


_minhash: dict = {}


def _init_minhash(num_perm: int, ngram: int) -> None:
    _minhash["hasher"] = MinHasher(num_perm, ngram)


def _chunk_signatures(texts: list[str]) -> list[np.ndarray]:
    return [_minhash["hasher"].signature(text) for text in texts]


def unique_texts(texts: Iterator[tuple[int, str]], dropped: Counter[str]) -> Iterator[str]:
    """The first copy of every text (an in-memory set of digests); later copies are counted."""
    seen: set[bytes] = set()
    for _, text in texts:
        digest = document_digest(text)
        if digest in seen:
            dropped[ExactDuplicates.name] += 1
            continue
        seen.add(digest)
        yield text


def main(argv: list[str] | None = None) -> int:
    return run_stage(combine, CombineConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
