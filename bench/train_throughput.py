"""Training data path throughput and memory (CPU part of issue #5's benchmark).

Measures the trainer's own data path — memory-mapped example shards, the resumable
distributed sampler and the collator, exactly as ``pipeline/trainer.py`` composes them —
on BART examples built from the CLUECorpusSmall sample (seq_length 512), at 1x and 10x
the data (``--dup_factor 10``): samples/s for one rank, and how much the process's
resident memory grows when the data is 10x larger (it should not: shards are mapped,
not loaded).

The GPU half of issue #5 (PEGASUS base / BART 4+4 tokens/s, MFU and peak memory against
transformers' Seq2SeqTrainer) is not in this script yet: no GPU was available to build
and check it. Run with ``.venv/bin/python bench/train_throughput.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the stdlib `tokenize` for every script in bench/.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SHARED = PROJECT_ROOT.parent / "shared" / "data"
MICRO_BATCH = 32


def measure(data_dir: str, batches: int) -> dict:
    """In this process: open the shards, then time ``batches`` micro batches of rank 0 of 8."""
    import psutil

    from pipeline.data import ExampleShards, ResumableDistributedSampler, Seq2SeqCollator

    process = psutil.Process()

    def private_mb() -> float:  # resident memory not backed by a file (mapped shard pages are)
        info = process.memory_info()
        return (info.rss - info.shared) / 1e6

    rss_before, private_before = process.memory_info().rss, private_mb()
    dataset = ExampleShards(Path(data_dir))
    sampler = iter(ResumableDistributedSampler(len(dataset), MICRO_BATCH, rank=0, world_size=8, seed=1))
    collate = Seq2SeqCollator(pad_id=0, decoder_start_id=101)
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
        batch = collate([dataset.example(i) for i in next(sampler)])
        samples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    return {"examples": len(dataset), "samples_per_s": samples / seconds,
            "rss_growth_mb": (process.memory_info().rss - rss_before) / 1e6,
            "private_growth_mb": private_mb() - private_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one measurement in a fresh process
    parser.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return

    from data_tools.clean import CleanConfig, clean
    from data_tools.mask import MaskConfig, mask
    from data_tools.tokenize_shards import TokenizeConfig, tokenize

    corpus, vocab = SHARED / "CLUECorpusSmall_bert_sampled.txt", SHARED / "google_zh_vocab.txt"
    if not (corpus.is_file() and vocab.is_file()):
        raise SystemExit(f"bench/train_throughput.py needs {corpus} and {vocab} (../shared/data)")
    batches = 100 if args.quick else 400
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean(CleanConfig(input_paths=[corpus], output_dir=root / "clean", progress=False))
        tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=vocab, progress=False))
        for scale in (1, 10):
            out = root / f"examples-{scale}x"
            mask(MaskConfig(input_dir=root / "tok", output_dir=out, target="bart", seq_length=512, dup_factor=scale,
                            processes_num=2, progress=False))
            # A fresh process per scale, so the memory figures do not mix.
            output = subprocess.run([sys.executable, __file__, "--measure", str(out), "--batches", str(batches)],
                                    capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout
            results[scale] = json.loads(output.strip().splitlines()[-1])

    print(f"trainer data path, rank 0 of 8, micro batch {MICRO_BATCH}, BART examples of up to 512 tokens, one core")
    print(f"{'data':8s} {'examples':>9s} {'samples/s':>10s} {'RSS growth MB':>14s} {'of it not file-backed':>22s}")
    for scale, result in results.items():
        print(f"{f'{scale}x':8s} {result['examples']:9d} {result['samples_per_s']:10.0f} "
              f"{result['rss_growth_mb']:14.1f} {result['private_growth_mb']:22.1f}")
    figures = [
        {"metric": "dataloader_samples_per_s", "value": round(results[10]["samples_per_s"]), "unit": "samples/s"},
        {"metric": "dataloader_rss_growth_mb",
         "value": round(results[10]["rss_growth_mb"] - results[1]["rss_growth_mb"], 1), "unit": "MB (10x vs 1x)"},
        {"metric": "dataloader_private_memory_growth_mb",
         "value": round(results[10]["private_growth_mb"] - results[1]["private_growth_mb"], 1),
         "unit": "MB (10x vs 1x, not file-backed)"},
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
