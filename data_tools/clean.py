"""Stage 1, clean: raw text in, normalized and filtered document shards out.

Output: ``documents-NNNNN.jsonl`` shards, one ``{"text": ...}`` per line, and a
``manifest.json`` whose counts account for every input document:
``kept + sum(dropped.values()) == read``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from data_tools.cli import UserError, config_to_dict, option, required, run_stage, write_json_atomic
from data_tools.normalize import cjk_ratio, normalize_text
from data_tools.raw_input import expand_input_paths, iter_documents

STAGE = "clean"


@dataclass(kw_only=True)
class CleanConfig:
    """Normalize and filter raw Chinese text into JSONL document shards."""

    input_paths: list[Path] = required("Raw corpus files or directories (plain, .gz or .zst).")
    output_dir: Path = required("Directory for documents-NNNNN.jsonl shards and manifest.json.")
    input_format: Literal["auto", "line", "uer", "jsonl"] = option(
        "auto",
        "line: one document per line; uer: one sentence per line, blank line between documents "
        "(UER-py's format); jsonl: one JSON object per line; auto: detect per file.",
    )
    text_field: str = option("text", "Field holding the text in JSONL input.")
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
    deduplicate: bool = option(True, "Drop exact duplicates of an earlier normalized document (duplicate).")
    max_line_bytes: int = option(
        16 << 20, "Lines longer than this many bytes are skipped without being loaded (line_too_long)."
    )
    documents_per_shard: int = option(100_000, "Documents per output shard.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self.input_paths = [Path(p) for p in self.input_paths]
        self.output_dir = Path(self.output_dir)
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise UserError(f"--min_chars {self.min_chars} / --max_chars {self.max_chars}: need 0 <= min <= max")
        if not 0.0 <= self.min_cjk_ratio <= 1.0:
            raise UserError(f"--min_cjk_ratio {self.min_cjk_ratio} must lie in [0, 1]")
        if self.documents_per_shard <= 0 or self.max_line_bytes <= 0:
            raise UserError("--documents_per_shard and --max_line_bytes must be positive")


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

    def write(self, text: str) -> None:
        if self._handle is None or self._count >= self.documents_per_shard:
            self._close_shard()
            name = f"documents-{len(self.shards):05d}.jsonl"
            self._handle = open(self.output_dir / name, "wb")  # noqa: SIM115
            self._hash = hashlib.sha256()
            self.shards.append({"file": name})
        line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        self._handle.write(line)
        self._hash.update(line)
        self._count += 1
        self._chars += len(text)

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self.shards[-1].update(documents=self._count, characters=self._chars, sha256=self._hash.hexdigest())
        self._handle, self._count, self._chars = None, 0, 0

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def clean(config: CleanConfig) -> dict:
    """Run the clean stage; returns the manifest it wrote."""
    files = expand_input_paths(config.input_paths)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    for stale in config.output_dir.glob("documents-*.jsonl"):
        stale.unlink()

    dropped: Counter[str] = Counter()
    read = kept = chars_read = chars_kept = invalid_utf8 = 0
    seen_hashes: set[bytes] = set()
    writer = ShardedJsonlWriter(config.output_dir, config.documents_per_shard)
    per_file: list[dict] = []
    bar = tqdm(desc="clean", unit=" docs", disable=not config.progress, file=sys.stderr, mininterval=1.0)
    for path in files:
        file_read = file_kept = 0
        for document in iter_documents(path, config.input_format, config.max_line_bytes, config.text_field):
            read += 1
            file_read += 1
            bar.update(1)
            chars_read += len(document.text)
            invalid_utf8 += document.invalid_utf8
            if document.drop_reason is not None:
                dropped[document.drop_reason] += 1
                continue
            text = normalize_text(
                document.text,
                unicode_form=config.unicode_normalization,
                fullwidth_to_halfwidth=config.fullwidth_to_halfwidth,
                strip_html=config.strip_html,
                remove_urls=config.remove_urls,
                remove_emails=config.remove_emails,
            )
            reason = _filter_reason(text, config)
            if reason is None and config.deduplicate:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
                if digest in seen_hashes:
                    reason = "duplicate"
                else:
                    seen_hashes.add(digest)
            if reason is not None:
                dropped[reason] += 1
                continue
            writer.write(text)
            kept += 1
            file_kept += 1
            chars_kept += len(text)
        per_file.append({"path": str(path), "documents_read": file_read, "documents_kept": file_kept})
    bar.close()
    shards = writer.close()

    if read == 0:
        raise UserError(
            f"no documents read from {', '.join(map(str, files))}: the input is empty; check --input_paths"
        )
    assert kept + sum(dropped.values()) == read, "clean lost documents without counting them"
    manifest = {
        "stage": STAGE,
        "config": config_to_dict(config),
        "counts": {
            "documents_read": read,
            "documents_kept": kept,
            "documents_dropped": dict(sorted(dropped.items())),
            "characters_read": chars_read,
            "characters_kept": chars_kept,
            "documents_with_invalid_utf8_replaced": invalid_utf8,
        },
        "inputs": per_file,
        "shards": shards,
    }
    write_json_atomic(config.output_dir / "manifest.json", manifest)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
    print(f"clean: read {read} documents, kept {kept}, dropped: {summary} -> {config.output_dir}", file=sys.stderr)
    if kept == 0:
        raise UserError(
            f"every document was dropped ({summary}); loosen --min_chars/--min_cjk_ratio or check --input_format"
        )
    return manifest


def _filter_reason(text: str, config: CleanConfig) -> str | None:
    if not text:
        return "empty_after_normalization"
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if config.min_cjk_ratio > 0 and cjk_ratio(text) < config.min_cjk_ratio:
        return "low_cjk_ratio"
    return None


def main(argv: list[str] | None = None) -> int:
    return run_stage(clean, CleanConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
