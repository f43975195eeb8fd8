"""Stage 1, clean: raw text in, normalized and filtered document shards out.

Output: ``documents-NNNNN.jsonl`` shards, one ``{"text": ...}`` per line, and a
``manifest.json`` whose counts account for every input document:
``kept + sum(dropped.values()) == read``. The filters, each named by the drop reason it
counts, are in :mod:`data_tools.filters`; the run is :mod:`data_tools.stage`'s.
"""

from __future__ import annotations

import sys
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError
from data_tools.dedup import (
    PartitionedDigests,
    document_digest,
    find_later_copies,
    spill_directory,
)
from data_tools.filters import (
    DocumentFilter,
    EmptyAfterNormalization,
    ExactDuplicates,
    LowCjkRatio,
    NearDuplicates,
    NormalizedChunk,
    OrderedFilter,
    RepeatedChars,
    RepeatedLines,
    TooLong,
    TooShort,
    drop_reasons,
    minhash_signature,
)
from data_tools.manifests import CleanCounts, CleanManifest, DocumentShard, MinhashRecord
from data_tools.near_dedup import (
    NGRAM,
    SIGNATURES_FILE,
    MinHasher,
    NearDedupSpill,
    check_near_dedup_options,
    check_ngram,
    find_near_copies,
    write_kept_signatures,
)
from data_tools.normalize import TraditionalToSimplified, normalize_texts
from data_tools.outputs import overwrite_option
from data_tools.parallel import chunked
from data_tools.raw_input import RawDocument, expand_input_paths, iter_documents
from data_tools.shards import ShardedJsonlWriter, iter_document_texts
from data_tools.stage import DataStage, Worker, check_accounted, run_data_stage

STAGE = "clean"


@dataclass(kw_only=True)
class CleanConfig:
    """Normalize and filter raw Chinese text into JSONL document shards."""

    input_paths: list[Path] = required("Raw corpus files or directories (plain, .gz or .zst text; .parquet). In a "
                                       "directory holding .parquet files only those are read (a dataset hub's "
                                       "layout: its README and scripts are listed as skipped).")
    output_dir: Path = required("Directory for documents-NNNNN.jsonl shards and manifest.json.")
    input_format: Literal["auto", "line", "uer", "jsonl", "parquet"] = option(
        "auto",
        "line: one document per line; uer: one sentence per line, blank line between documents "
        "(UER-py's format); jsonl: one JSON object per line; parquet: one document per row; auto: detect per "
        "file (.parquet, .jsonl/.json, else from the first lines).",
    )
    text_field: str = option("text", "Field (JSONL) or column (Parquet) holding the text; a null or non-string value "
                             "is dropped and counted (null_text, non_string_text, missing_text_field).")
    unicode_normalization: Literal["NFC", "NFKC", "none"] = option(
        "NFC", "Unicode normalization form. NFKC also folds full-width punctuation (，→,)."
    )
    fullwidth_to_halfwidth: bool = option(True, "Fold full-width letters, digits and the ideographic space to ASCII.")
    strip_html: bool = option(True, "Remove HTML tags and decode HTML entities.")
    remove_urls: bool = option(True, "Remove URLs.")
    remove_emails: bool = option(True, "Remove e-mail addresses.")
    min_chars: int = option(5, "Drop documents shorter than this after normalization (too_short).")
    max_chars: int = option(200_000, "Drop documents longer than this after normalization (too_long).")
    min_cjk_ratio: float = option(0.3, "Drop documents whose share of CJK characters is below this (low_cjk_ratio).")
    traditional_to_simplified: bool = option(False, "Convert Traditional to Simplified Chinese with OpenCC (t2s).")
    max_repeated_line_ratio: float = option(
        0.3, "Drop documents whose share of lines repeating an earlier line exceeds this (repeated_lines).")
    max_repeated_char_ratio: float = option(
        0.2, "Drop documents whose share of characters in runs of 4+ identical word characters (哈哈哈哈) exceeds this "
        "(repeated_chars).")
    deduplicate: bool = option(True, "Drop exact duplicates of an earlier normalized document (duplicate).")
    dedup_partitions: int = option(
        0, "0: exact dedup with an in-memory set (~100 bytes per unique document). N > 0: spill 24-byte digest records "
        "into N partition files, dedup each alone (--processes_num at a time) and keep a 1-bit-per-document bitmap: "
        "memory stays flat as the corpus grows, at the cost of writing the kept documents twice. Same output (with "
        "--near_dedup_threshold an exact copy is then counted as near_duplicate).")
    near_dedup_threshold: float = option(
        0.0, "Drop near-duplicates: MinHash LSH (datasketch) on character n-grams (--minhash_ngram) with this "
        "Jaccard threshold, e.g. 0.8 (near_duplicate); 0 turns it off.")
    minhash_num_perm: int = option(128, "MinHash permutations for --near_dedup_threshold.")
    minhash_ngram: int = option(NGRAM, "Characters per shingle the MinHash signatures are taken over, in [1, 64] "
                                "(5 suits unsegmented Chinese).")
    near_dedup_partitions: int = option(
        0, "0: near-dedup with datasketch's in-memory LSH index (~2.3 KB per kept document). N > 0: MinHash (numpy, "
        "character n-grams) with signatures and LSH band keys spilled into N partition files, each deduplicated alone "
        "(--processes_num at a time), and a 1-bit-per-document bitmap: memory stays flat. Drops a document near an "
        "earlier one (docs/data-stages.md: how that differs from datasketch).")
    near_dedup_verify: bool = option(
        True, "With --near_dedup_partitions: drop an LSH candidate only when its estimated Jaccard (share of equal "
        "MinHash rows) with the earlier document reaches --near_dedup_threshold.")
    processes_num: int = option(1, "Worker processes for normalization and filtering; the output is the same "
                                "for any number (UER-py: --processes_num).")
    chunk_documents: int = option(2_000, "Documents per chunk handed to a worker.")
    num_slices: int = option(1, "Split the input files into this many slices, for independent jobs "
                             "(e.g. a Slurm array); combine them with zh-clean-combine.")
    slice_index: int = option(0, "Which slice (0-based) this job cleans.")
    max_line_bytes: int = option(
        16 << 20, "Lines longer than this many bytes are skipped without being loaded (line_too_long)."
    )
    documents_per_shard: int = option(100_000, "Documents per output shard.")
    progress: bool = option(True, "Show a progress bar.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.input_paths = [Path(p) for p in self.input_paths]
        self.output_dir = Path(self.output_dir)
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise UserError(f"--min_chars {self.min_chars} / --max_chars {self.max_chars}: need 0 <= min <= max")
        for name in ("min_cjk_ratio", "max_repeated_line_ratio", "max_repeated_char_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name} {getattr(self, name)} must lie in [0, 1]")
        if self.dedup_partitions < 0:
            raise UserError(f"--dedup_partitions {self.dedup_partitions} must be >= 0")
        if self.near_dedup_partitions:
            check_near_dedup_options(self.near_dedup_threshold, self.minhash_num_perm, self.near_dedup_partitions)
        check_ngram(self.minhash_ngram)
        if self.minhash_num_perm <= 0 or self.num_slices <= 0:
            raise UserError(f"--minhash_num_perm {self.minhash_num_perm} and --num_slices {self.num_slices} must be "
                            "positive")
        if min(self.documents_per_shard, self.max_line_bytes, self.processes_num, self.chunk_documents) <= 0:
            raise UserError("--documents_per_shard, --max_line_bytes, --processes_num, --chunk_documents must be positive")
        if not 0 <= self.near_dedup_threshold < 1:
            raise UserError(f"--near_dedup_threshold {self.near_dedup_threshold} must lie in [0, 1)")
        if not 0 <= self.slice_index < self.num_slices:
            raise UserError(f"--slice_index {self.slice_index} must lie in [0, --num_slices {self.num_slices})")


def quality_filters(config: CleanConfig) -> list[DocumentFilter]:
    """The filters every document meets after normalization, in the order they are asked (the first
    that rejects a document names its drop reason)."""
    return [EmptyAfterNormalization(), TooShort(config.min_chars), TooLong(config.max_chars),
            LowCjkRatio(config.min_cjk_ratio), RepeatedLines(config.max_repeated_line_ratio),
            RepeatedChars(config.max_repeated_char_ratio)]


def ordered_filters(config: CleanConfig) -> list[OrderedFilter]:
    """The filters that compare a document with those kept before it, in the main process. With
    ``--dedup_partitions`` exact duplicates are found after the pass instead (:class:`SpilledDocuments`)."""
    filters: list[OrderedFilter] = []
    if config.deduplicate and not config.dedup_partitions:
        filters.append(ExactDuplicates())
    if config.near_dedup_threshold and not config.near_dedup_partitions:
        filters.append(NearDuplicates(config.near_dedup_threshold, config.minhash_num_perm))
    return filters


# -- per-document work (runs in the worker processes) ------------------------------------------

# A chunk's readable texts go to a worker and come back as (text, drop reason, exact-dedup digest, MinHash)
CleanResult = list[tuple[str, str | None, bytes | None, Any]]

_worker: dict = {}


def _init_worker(config: CleanConfig) -> None:
    _worker["config"] = config
    _worker["t2s"] = TraditionalToSimplified() if config.traditional_to_simplified else None
    _worker["filters"] = quality_filters(config)
    _worker["minhash"] = (MinHasher(config.minhash_num_perm, config.minhash_ngram) if config.near_dedup_partitions
                          else None)


def clean_documents(texts: list[str], config: CleanConfig, t2s: TraditionalToSimplified | None = None,
                    filters: list[DocumentFilter] | None = None) -> list[tuple[str, str | None]]:
    """Each text normalized, and the reason to drop it (None to keep); normalized and measured a chunk at a
    time. ``filters``: the config's :func:`quality_filters` unless given."""
    texts = normalize_texts(
        texts,
        unicode_form=config.unicode_normalization,
        fullwidth_to_halfwidth=config.fullwidth_to_halfwidth,
        strip_html=config.strip_html,
        remove_urls=config.remove_urls,
        remove_emails=config.remove_emails,
    )
    if t2s is not None:
        texts = [t2s(text) for text in texts]
    reasons = drop_reasons(NormalizedChunk.measure(texts), quality_filters(config) if filters is None else filters)
    return list(zip(texts, reasons))


def _clean_texts(texts: list[str]) -> CleanResult:
    """(text, drop_reason, exact-dedup digest, MinHash or None) per readable document, in order."""
    config = _worker["config"]
    results = []
    for text, reason in clean_documents(texts, config, _worker["t2s"], _worker["filters"]):
        digest = signature = None
        if reason is None:
            if config.deduplicate:
                digest = document_digest(text)
            if _worker["minhash"] is not None:
                signature = _worker["minhash"].signature(text)
            elif config.near_dedup_threshold > 0:
                signature = minhash_signature(text, config.minhash_num_perm, config.minhash_ngram)
        results.append((text, reason, digest, signature))
    return results


# -- the stage (reading, ordering, dedup and writing stay in the main process) --------------------


class SpilledDocuments:
    """Partitioned dedup (``--dedup_partitions`` for exact copies, ``--near_dedup_partitions`` for
    near-duplicates): the kept documents are first written under ``spill`` with their digests and
    MinHash signatures spilled to partition files, then copied into the output without the marked
    documents once every partition job has run."""

    def __init__(self, spill: Path, config: CleanConfig) -> None:
        self.config = config
        exact = config.deduplicate and config.dedup_partitions
        self.digests = PartitionedDigests(spill / "digests", config.dedup_partitions) if exact else None
        self.near = None
        if config.near_dedup_threshold and config.near_dedup_partitions:
            self.near = NearDedupSpill(spill / "near", config.near_dedup_threshold, config.minhash_num_perm,
                                       config.near_dedup_partitions, config.near_dedup_verify)
        (spill / "documents").mkdir()
        self.writer = ShardedJsonlWriter(spill / "documents", config.documents_per_shard)
        self.sources: list[tuple[int, str]] = []  # (first ordinal, file): the files' documents are contiguous

    def add(self, text: str, digest: bytes | None, signature: Any, source: str, file_index: int) -> None:
        ordinal = self.writer.documents
        if not self.sources or self.sources[-1][1] != source:
            self.sources.append((ordinal, source))
        if self.digests is not None and digest is not None:
            self.digests.add(digest, ordinal, file_index)
        if self.near is not None:
            self.near.add(signature)
        self.writer.write(text)

    def copy_without_marked(self, staging: Path, dropped: Counter[str],
                            kept_per_file: Counter[str]) -> tuple[list[DocumentShard], MinhashRecord | None]:
        """The output shards, and with near-dedup the kept documents' signatures; updates the drop and per-file
        counts (an exact copy counts as duplicate, whether or not near-dedup marked it too)."""
        spilled = [self.writer.output_dir / shard.file for shard in self.writer.close()]
        processes = self.config.processes_num
        exact = find_later_copies(self.digests, processes)[0] if self.digests is not None else None
        near = find_near_copies(self.near, processes) if self.near is not None else None
        firsts = [first for first, _ in self.sources]
        writer = ShardedJsonlWriter(staging, self.config.documents_per_shard)
        for ordinal, text in enumerate(iter_document_texts(spilled)):
            reason = (ExactDuplicates.name if exact is not None and ordinal in exact
                      else NearDuplicates.name if near is not None and ordinal in near else None)
            if reason is None:
                writer.write(text)
                continue
            dropped[reason] += 1  # as with the in-memory filters: no entry for a reason never met
            kept_per_file[self.sources[bisect_right(firsts, ordinal) - 1][1]] -= 1
        if near is None:
            return writer.close(), None

        def dropped_between(start: int, stop: int) -> np.ndarray:
            marked = near.flags(start, stop)
            return marked if exact is None else marked | exact.flags(start, stop)

        signatures = write_kept_signatures(self.near, dropped_between, staging / SIGNATURES_FILE,
                                           self.config.minhash_ngram)
        return writer.close(), signatures


class _ReadProgress:
    """Counts what was read, per file, and shows documents/s and MB/s."""

    def __init__(self, enabled: bool) -> None:
        self.documents = self.characters = self.invalid_utf8 = self.bytes = 0
        self.per_file: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.bar = tqdm(desc="clean", unit=" docs", disable=not enabled, file=sys.stderr, mininterval=1.0)

    def track(self, documents: Iterator[RawDocument]) -> Iterator[RawDocument]:
        for document in documents:
            self.documents += 1
            self.characters += len(document.text)
            self.invalid_utf8 += document.invalid_utf8
            self.bytes += document.num_bytes
            self.per_file[document.source] += 1
            if self.documents % 1000 == 0:
                self.bar.update(1000)
                elapsed = max(time.perf_counter() - self.started, 1e-9)
                self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
            yield document

    def close(self) -> None:
        self.bar.update(self.documents % 1000)
        self.bar.close()


class CleanStage(DataStage[list[str], CleanResult]):
    """The clean stage's parts for :func:`run_data_stage`."""

    name, shard_prefix = STAGE, "documents"

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.skipped: list[Path] = []
        self.files = expand_input_paths(config.input_paths, self.skipped)[config.slice_index :: config.num_slices]
        if not self.files:
            raise UserError(f"slice {config.slice_index} of {config.num_slices} has no input files; use fewer slices")
        if self.skipped:
            print(f"clean: {len(self.skipped)} file(s) beside .parquet files not read "
                  f"({', '.join(map(str, self.skipped[:3]))}{', ...' if len(self.skipped) > 3 else ''}); listed in "
                  "the manifest's skipped_inputs", file=sys.stderr)
        self.output_dir, self.overwrite, self.processes = config.output_dir, config.overwrite, config.processes_num
        self.inputs = {"--input_paths": config.input_paths}
        self.file_index = {str(path): index for index, path in enumerate(self.files)}

    def start(self, staging: Path, resources: ExitStack) -> None:
        config = self.config
        self.dropped: Counter[str] = Counter()
        self.kept_per_file: Counter[str] = Counter()
        self.ordered_filters = ordered_filters(config)
        self.spilled = None
        if (config.deduplicate and config.dedup_partitions) or (config.near_dedup_threshold and
                                                                config.near_dedup_partitions):
            # the spill goes before the output is published
            self.spilled = SpilledDocuments(Path(resources.enter_context(spill_directory(staging))), config)
        self.writer = self.spilled.writer if self.spilled else ShardedJsonlWriter(staging, config.documents_per_shard)
        self.progress = _ReadProgress(config.progress)
        self.in_flight: deque[list[RawDocument]] = deque()

    def work_items(self) -> Iterator[list[str]]:
        """The readable texts of each chunk (a list of str pickles and unpickles ~8x faster than the
        RawDocuments, which wait here for their results)."""
        config = self.config
        documents = self.progress.track(
            document
            for path in self.files
            for document in iter_documents(path, config.input_format, config.max_line_bytes, config.text_field)
        )
        for chunk in chunked(documents, config.chunk_documents):
            self.in_flight.append(chunk)
            yield [document.text for document in chunk if document.drop_reason is None]

    def worker(self) -> Worker[list[str], CleanResult]:
        return Worker(_clean_texts, _init_worker, (self.config,))

    def consume(self, result: CleanResult) -> None:
        dropped, kept_per_file, writer, spilled = self.dropped, self.kept_per_file, self.writer, self.spilled
        cleaned = iter(result)
        kept: list[str] = []
        for document in self.in_flight.popleft():
            if document.drop_reason is not None:
                dropped[document.drop_reason] += 1
                continue
            text, reason, digest, signature = next(cleaned)
            if reason is None:
                for ordered_filter in self.ordered_filters:
                    if ordered_filter.rejects(digest, signature):
                        reason = ordered_filter.name
                        break
            if reason is not None:
                dropped[reason] += 1
                continue
            if spilled is not None:  # its ordinal among the documents written
                spilled.add(text, digest, signature, document.source, self.file_index[document.source])
            else:
                kept.append(text)
            kept_per_file[document.source] += 1
        writer.write_many(kept)

    def finish(self, staging: Path) -> CleanManifest:
        self.progress.close()
        signatures = None
        if self.spilled is not None:
            shards, signatures = self.spilled.copy_without_marked(staging, self.dropped, self.kept_per_file)
        else:
            shards = self.writer.close()
        read, kept, dropped = self.progress.documents, sum(shard.documents for shard in shards), self.dropped
        if read == 0:
            raise UserError(
                f"no documents read from {', '.join(map(str, self.files))}: the input is empty; check --input_paths"
            )
        check_accounted(STAGE, read, kept, dropped)
        if kept == 0:
            raise UserError(
                f"every document was dropped ({_dropped_summary(dropped)}); nothing was written: loosen "
                "--min_chars/--min_cjk_ratio or check --input_format"
            )
        counts = CleanCounts(
            documents_read=read, documents_kept=kept, documents_dropped=dict(sorted(dropped.items())),
            characters_read=self.progress.characters, characters_kept=sum(shard.characters for shard in shards),
            bytes_read=self.progress.bytes, documents_with_invalid_utf8_replaced=self.progress.invalid_utf8,
        )
        inputs = [{"path": str(path), "documents_read": self.progress.per_file[str(path)],
                   "documents_kept": self.kept_per_file[str(path)]} for path in self.files]
        return CleanManifest(config=config_to_dict(self.config), counts=counts, inputs=inputs,
                             skipped_inputs=[str(path) for path in self.skipped], shards=shards, minhash=signatures)

    def summary(self, manifest: CleanManifest) -> str:
        seconds = time.perf_counter() - self.progress.started
        megabytes = self.progress.bytes / 1e6
        return (f"clean: read {manifest.counts.documents_read} documents ({megabytes:.1f} MB, "
                f"{megabytes / seconds:.1f} MB/s), kept {manifest.counts.documents_kept}, dropped: "
                f"{_dropped_summary(manifest.counts.documents_dropped)} -> {self.config.output_dir}")


def _dropped_summary(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"


def clean(config: CleanConfig) -> dict:
    """Run the clean stage; returns the manifest it wrote."""
    return run_data_stage(CleanStage(config))


def main(argv: list[str] | None = None) -> int:
    return run_stage(clean, CleanConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
