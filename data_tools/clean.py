"""Stage 1, clean: raw text in, normalized and filtered document shards out.

Output: ``documents-NNNNN.jsonl`` shards, one ``{"text": ...}`` per line, and a
``manifest.json`` whose counts account for every input document:
``kept + sum(dropped.values()) == read``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError, write_json_atomic
from data_tools.dedup import (
    PartitionedDigests,
    document_digest,
    find_later_copies,
    iter_unmarked,
    spill_directory,
)
from data_tools.normalize import (
    TraditionalToSimplified,
    chunk_measures,
    normalize_texts,
    repeated_char_ratio,
    repeated_line_ratio,
)
from data_tools.outputs import overwrite_option, staged_dir
from data_tools.parallel import chunked, ordered_map
from data_tools.raw_input import RawDocument, expand_input_paths, iter_documents
from data_tools.shards import check_stage_output

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
        0.0, "Drop near-duplicates: MinHash LSH (datasketch) on character 5-grams with this Jaccard threshold, "
        "e.g. 0.8 (near_duplicate); 0 turns it off.")
    minhash_num_perm: int = option(128, "MinHash permutations for --near_dedup_threshold.")
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
        if self.minhash_num_perm <= 0 or self.num_slices <= 0:
            raise UserError(f"--minhash_num_perm {self.minhash_num_perm} and --num_slices {self.num_slices} must be "
                            "positive")
        if min(self.documents_per_shard, self.max_line_bytes, self.processes_num, self.chunk_documents) <= 0:
            raise UserError("--documents_per_shard, --max_line_bytes, --processes_num, --chunk_documents must be positive")
        if not 0 <= self.near_dedup_threshold < 1:
            raise UserError(f"--near_dedup_threshold {self.near_dedup_threshold} must lie in [0, 1)")
        if not 0 <= self.slice_index < self.num_slices:
            raise UserError(f"--slice_index {self.slice_index} must lie in [0, --num_slices {self.num_slices})")


class ShardedJsonlWriter:
    """Writes ``{"text": ...}`` lines into numbered shards and records each shard's counts."""

    def __init__(self, output_dir: Path, documents_per_shard: int) -> None:
        self.output_dir = output_dir
        self.documents_per_shard = documents_per_shard
        self.shards: list[dict] = []
        self._handle = None
        self._hash = None
        self._count = 0
        self._chars = 0
        self._bytes = 0

    def write(self, text: str) -> None:
        if self._handle is None or self._count >= self.documents_per_shard:
            self._close_shard()
            name = f"documents-{len(self.shards):05d}.jsonl"
            self._handle = open(self.output_dir / name, "wb")  # noqa: SIM115
            self._hash = hashlib.sha256()
            self.shards.append({"file": name})
        # what json.dumps({"text": text}, ensure_ascii=False) writes, without its ~4 µs of set-up per call
        line = ('{"text": ' + encode_basestring(text) + "}\n").encode("utf-8")
        self._handle.write(line)
        self._hash.update(line)
        self._bytes += len(line)
        self._count += 1
        self._chars += len(text)

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self.shards[-1].update(documents=self._count, characters=self._chars, bytes=self._bytes,
                               sha256=self._hash.hexdigest())
        self._handle, self._count, self._chars, self._bytes = None, 0, 0, 0

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def iter_document_texts(paths: list[Path]) -> Iterator[str]:
    """The texts of documents-NNNNN.jsonl shards (checked by the caller), in order."""
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


# -- per-document work (runs in the worker processes) ------------------------------------------

_worker: dict = {}


def _init_worker(config: CleanConfig) -> None:
    _worker["config"] = config
    _worker["t2s"] = TraditionalToSimplified() if config.traditional_to_simplified else None


def clean_documents(texts: list[str], config: CleanConfig,
                    t2s: TraditionalToSimplified | None = None) -> list[tuple[str, str | None]]:
    """Each text normalized, and the reason to drop it (None to keep); normalized and measured a chunk at a time."""
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
    cjk_ratios, may_repeat_chars = chunk_measures(texts)
    return [(text, _drop_reason(text, config, cjk, may_repeat))
            for text, cjk, may_repeat in zip(texts, cjk_ratios.tolist(), may_repeat_chars.tolist())]


def _drop_reason(text: str, config: CleanConfig, cjk_ratio: float, may_repeat_chars: bool) -> str | None:
    if not text:
        return "empty_after_normalization"
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if config.min_cjk_ratio > 0 and cjk_ratio < config.min_cjk_ratio:
        return "low_cjk_ratio"
    if "\n" in text and repeated_line_ratio(text) > config.max_repeated_line_ratio:
        return "repeated_lines"
    if may_repeat_chars and repeated_char_ratio(text) > config.max_repeated_char_ratio:
        return "repeated_chars"
    return None


def minhash_signature(text: str, num_perm: int) -> Any:
    """MinHash of the document's character 5-grams (the unit that suits unsegmented Chinese)."""
    from datasketch import MinHash

    minhash = MinHash(num_perm=num_perm, seed=1)
    shingles = {text[i : i + 5] for i in range(max(1, len(text) - 4))}
    minhash.update_batch([shingle.encode("utf-8") for shingle in shingles])
    return minhash


def _clean_texts(texts: list[str]) -> list[tuple]:
    """(text, drop_reason, exact-dedup digest, MinHash or None) per readable document, in order."""
    config, t2s = _worker["config"], _worker["t2s"]
    results = []
    for text, reason in clean_documents(texts, config, t2s):
        digest = signature = None
        if reason is None:
            if config.deduplicate:
                digest = document_digest(text)
            if config.near_dedup_threshold > 0:
                signature = minhash_signature(text, config.minhash_num_perm)
        results.append((text, reason, digest, signature))
    return results


# -- the stage (reading, ordering, dedup and writing stay in the main process) --------------------


def _drop_later_copies(spill: Path, digests: PartitionedDigests, spilled_shards: list[dict], staging: Path,
                       config: CleanConfig, files: list[Path], dropped: Counter[str],
                       kept_per_file: Counter[str]) -> tuple[int, int, list[dict]]:
    """Partitioned exact dedup's last passes: find the later copies partition by partition, then
    copy the spilled documents into ``staging`` without them. Returns (kept, characters kept,
    shards) and updates the drop and per-file counts."""
    bitmap, copies_per_file = find_later_copies(digests, config.processes_num)
    if bitmap.count:  # as with the set: no "duplicate" entry when there was none
        dropped["duplicate"] += bitmap.count
    for index, count in copies_per_file.items():
        kept_per_file[str(files[index])] -= count
    writer = ShardedJsonlWriter(staging, config.documents_per_shard)
    spilled = [spill / "documents" / shard["file"] for shard in spilled_shards]
    for text in iter_unmarked(iter_document_texts(spilled), bitmap):
        writer.write(text)
    shards = writer.close()
    return sum(s["documents"] for s in shards), sum(s["characters"] for s in shards), shards


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


class NearDuplicateIndex:
    """MinHash LSH over the documents kept so far (datasketch)."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        try:
            from datasketch import MinHashLSH
        except ImportError as error:
            raise UserError("--near_dedup_threshold needs datasketch: pip install datasketch") from error
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._count = 0

    def seen_before(self, minhash: Any) -> bool:
        if self._lsh.query(minhash):
            return True
        self._lsh.insert(str(self._count), minhash)
        self._count += 1
        return False


def clean(config: CleanConfig) -> dict:
    """Run the clean stage; returns the manifest it wrote."""
    skipped: list[Path] = []
    files = expand_input_paths(config.input_paths, skipped)[config.slice_index :: config.num_slices]
    if not files:
        raise UserError(f"slice {config.slice_index} of {config.num_slices} has no input files; use fewer slices")
    if skipped:
        print(f"clean: {len(skipped)} file(s) beside .parquet files not read ({', '.join(map(str, skipped[:3]))}"
              f"{', ...' if len(skipped) > 3 else ''}); listed in the manifest's skipped_inputs", file=sys.stderr)
    check_stage_output(config.output_dir, STAGE, "documents", config.overwrite, {"--input_paths": config.input_paths})
    with staged_dir(config.output_dir) as staging:
        if config.deduplicate and config.dedup_partitions:
            with spill_directory(staging) as spill:
                manifest = _clean_into(staging, files, config, skipped, Path(spill))
        else:
            manifest = _clean_into(staging, files, config, skipped)
    return manifest


def _clean_into(staging: Path, files: list[Path], config: CleanConfig, skipped: list[Path],
                spill: Path | None = None) -> dict:
    """Clean ``files`` into ``staging``. With ``spill`` (partitioned exact dedup) the documents
    are first written there with their digests spilled, then copied without the later copies."""
    dropped: Counter[str] = Counter()
    kept = chars_kept = 0
    kept_per_file: Counter[str] = Counter()
    seen_hashes: set[bytes] = set()
    near_duplicates = (
        NearDuplicateIndex(config.near_dedup_threshold, config.minhash_num_perm) if config.near_dedup_threshold else None
    )
    file_index = {str(path): index for index, path in enumerate(files)}
    if spill is not None:
        digests = PartitionedDigests(spill / "digests", config.dedup_partitions)
        (spill / "documents").mkdir()
        writer = ShardedJsonlWriter(spill / "documents", config.documents_per_shard)
    else:
        writer = ShardedJsonlWriter(staging, config.documents_per_shard)
    progress = _ReadProgress(config.progress)
    raw_documents = progress.track(
        document
        for path in files
        for document in iter_documents(path, config.input_format, config.max_line_bytes, config.text_field)
    )
    chunks = chunked(raw_documents, config.chunk_documents)
    in_flight: deque[list[RawDocument]] = deque()

    def readable_texts(chunk_iter: Iterator[list[RawDocument]]) -> Iterator[list[str]]:
        """What the workers get: the texts only (a list of str pickles and unpickles ~8x faster than the
        RawDocuments)."""
        for chunk in chunk_iter:
            in_flight.append(chunk)
            yield [document.text for document in chunk if document.drop_reason is None]

    results = ordered_map(_clean_texts, readable_texts(chunks), config.processes_num,
                          initializer=_init_worker, initargs=(config,))
    for chunk_results in results:
        cleaned = iter(chunk_results)
        for document in in_flight.popleft():
            if document.drop_reason is not None:
                dropped[document.drop_reason] += 1
                continue
            text, reason, digest, signature = next(cleaned)
            if reason is None and digest is not None and spill is None:
                if digest in seen_hashes:
                    reason = "duplicate"
                else:
                    seen_hashes.add(digest)
            if reason is None and near_duplicates is not None and near_duplicates.seen_before(signature):
                reason = "near_duplicate"
            if reason is not None:
                dropped[reason] += 1
                continue
            source = document.source
            if spill is not None and digest is not None:
                digests.add(digest, kept, file_index[source])  # its ordinal among the documents written
            writer.write(text)
            kept += 1
            kept_per_file[source] += 1
            chars_kept += len(text)
    progress.close()
    shards = writer.close()
    if spill is not None:
        kept, chars_kept, shards = _drop_later_copies(spill, digests, shards, staging, config, files, dropped,
                                                      kept_per_file)

    read = progress.documents
    if read == 0:
        raise UserError(
            f"no documents read from {', '.join(map(str, files))}: the input is empty; check --input_paths"
        )
    assert kept + sum(dropped.values()) == read, "clean lost documents without counting them"
    summary = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
    if kept == 0:
        raise UserError(
            f"every document was dropped ({summary}); nothing was written: loosen --min_chars/--min_cjk_ratio or "
            "check --input_format"
        )
    manifest = {
        "stage": STAGE,
        "config": config_to_dict(config),
        "counts": {
            "documents_read": read,
            "documents_kept": kept,
            "documents_dropped": dict(sorted(dropped.items())),
            "characters_read": progress.characters,
            "characters_kept": chars_kept,
            "bytes_read": progress.bytes,
            "documents_with_invalid_utf8_replaced": progress.invalid_utf8,
        },
        "inputs": [
            {"path": str(path), "documents_read": progress.per_file[str(path)],
             "documents_kept": kept_per_file[str(path)]}
            for path in files
        ],
        "skipped_inputs": [str(path) for path in skipped],
        "shards": shards,
    }
    write_json_atomic(staging / "manifest.json", manifest)
    seconds = time.perf_counter() - progress.started
    print(f"clean: read {read} documents ({progress.bytes / 1e6:.1f} MB, {progress.bytes / 1e6 / seconds:.1f} MB/s), "
          f"kept {kept}, dropped: {summary} -> {config.output_dir}", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(clean, CleanConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
