"""Masking throughput per core for each target and preset, on real Chinese text.

Each configuration (BART, the UER presets, GSG random, mixed and principal) builds examples from the
CLUECorpusSmall sample in ../shared/data (tokenized once with Google's Chinese vocab) in one
process, as the mask stage's workers do (``mask_block`` on blocks of 1,000 documents), timed
alone. Peer: UER-py, which cannot be installed here; its figures are issue #4's for this machine
class (instance building plus tokenization, one core), printed as references, not measured.

    python -m bench.mask [--quick]

Prints a table, then one JSON object per figure: bart_examples_per_s_per_core,
uer_bart_preset_examples_per_s_per_core, uer_bart_examples_per_s_per_core, bart_speedup_vs_uer,
gsg_principal_docs_per_s_per_core, gsg_random_docs_per_s_per_core, uer_gsg_docs_per_s_per_core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared" / "data"
UER_REFERENCE = {"bart": 12_700.0, "gsg_random": 9_700.0}  # instances/s, one core, from issue #4


BLOCK_DOCUMENTS = 1_000  # the stage's default --chunk_documents


def load_documents(quick: bool):
    """The corpus as the mask stage's workers receive it: blocks of documents in Arrow's flat layout."""
    import numpy as np

    from data_tools.shards import DocumentBlock
    from data_tools.wordpiece import BertWordPieceEncoder

    vocab = SHARED / "google_zh_vocab.txt"
    corpus = SHARED / "CLUECorpusSmall_sampled.txt"
    if not (vocab.is_file() and corpus.is_file()):
        raise SystemExit(f"bench/mask.py needs {vocab} and {corpus} (../shared/data beside the project)")
    encoder = BertWordPieceEncoder(vocab)
    lines = corpus.read_text(encoding="utf-8").splitlines()[: 300 if quick else None]
    encoder.encode_documents(lines[:10])  # the compiled tokenizer loads outside the timing
    start = time.perf_counter()
    encoded = encoder.encode_documents(lines)
    tokenize_seconds = time.perf_counter() - start
    counts = encoded.sentences_per_document[encoded.sentences_per_document > 0]
    document_offsets = np.concatenate(([0], np.cumsum(counts)))
    sentence_offsets = np.concatenate(([0], np.cumsum(encoded.sentence_lengths, dtype=np.int64)))
    ids = encoded.ids.astype(np.uint16)
    blocks = [DocumentBlock.cut(0, document_offsets, sentence_offsets, ids, start, BLOCK_DOCUMENTS)
              for start in range(0, len(counts), BLOCK_DOCUMENTS)]
    return blocks, len(counts), vocab, tokenize_seconds


def time_config(blocks, config, vocab_info, repeats: int) -> tuple[float, int]:
    from data_tools.mask import mask_block

    best, examples = float("inf"), 0
    mask_block(blocks[0], 1, config, vocab_info)  # compiled kernels load (or compile) on first use
    for _ in range(repeats):
        start = time.perf_counter()
        examples = sum(len(mask_block(block, 0, config, vocab_info)[0][1]) - 1 for block in blocks)
        best = min(best, time.perf_counter() - start)
    return best, examples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 documents, one repeat")
    args = parser.parse_args()

    from data_tools.mask import MaskConfig
    from data_tools.masking.vocab import SpecialIds, VocabInfo

    blocks, documents, vocab_path, tokenize_seconds = load_documents(args.quick)
    vocab_info = VocabInfo.from_tokens(vocab_path.read_text(encoding="utf-8").split("\n")[:21128], SpecialIds())
    configs = {
        "bart (defaults: bart_paper-like)": dict(target="bart"),
        "uer_bart preset": dict(preset="uer_bart"),
        "gsg random": dict(target="gsg"),
        "uer_gsg preset": dict(preset="uer_gsg"),
        "gsg random, mixed actions": dict(target="gsg", gap_action="mixed"),
        "gsg principal (pegasus_paper)": dict(preset="pegasus_paper"),
        "gsg principal sequential uniq": dict(preset="pegasus_paper", rouge_mode="sequential", rouge_unique=True),
    }
    repeats = 1 if args.quick else 3
    results = {}
    print(f"{documents} CLUECorpusSmall documents, seq_length 512, one core, best of {repeats}")
    print(f"{'configuration':36s} {'examples':>9s} {'examples/s':>11s} {'docs/s':>9s}")
    for name, overrides in configs.items():
        config = MaskConfig(input_dir=Path("."), output_dir=Path("."), seq_length=512, tgt_seq_length=128, **overrides)
        seconds, examples = time_config(blocks, config, vocab_info, repeats)
        results[name] = (examples / seconds, documents / seconds)
        print(f"{name:36s} {examples:9d} {examples / seconds:11.0f} {documents / seconds:9.0f}")
    docs_per_s_tokenize = documents / tokenize_seconds
    print(f"{'(tokenizing the same documents)':36s} {'':9s} {'':11s} {docs_per_s_tokenize:9.0f}")
    print(f"UER-py reference (issue #4, not run here): BART {UER_REFERENCE['bart']:.0f} instances/s, "
          f"GSG random {UER_REFERENCE['gsg_random']:.0f} instances/s, tokenization included")

    bart = results["bart (defaults: bart_paper-like)"][0]
    figures = [
        {"metric": "bart_examples_per_s_per_core", "value": round(bart), "unit": "examples/s"},
        {"metric": "uer_bart_preset_examples_per_s_per_core", "value": round(results["uer_bart preset"][0]),
         "unit": "examples/s"},
        {"metric": "uer_bart_examples_per_s_per_core", "value": UER_REFERENCE["bart"],
         "unit": "examples/s (UER-py, reference from issue #4)"},
        {"metric": "bart_speedup_vs_uer", "value": round(bart / UER_REFERENCE["bart"], 2), "unit": "x"},
        {"metric": "gsg_principal_docs_per_s_per_core", "value": round(results["gsg principal (pegasus_paper)"][1]),
         "unit": "docs/s"},
        {"metric": "gsg_random_docs_per_s_per_core", "value": round(results["gsg random"][1]), "unit": "docs/s"},
        {"metric": "uer_gsg_docs_per_s_per_core", "value": UER_REFERENCE["gsg_random"],
         "unit": "docs/s (UER-py, reference from issue #4)"},
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
