"""The whole data path, raw text to masked examples, per core: zh-clean, zh-tokenize, then zh-mask
for BART and for PEGASUS's gap sentences, run as the commands a user runs (one process each,
start-up included), timed end to end, in MB of raw text per second, on the CLUECorpusSmall
samples from ../shared/data (3.9 MB, 3 copies, 1 with ``--quick``, each marked so dedup keeps
it), Google's Chinese vocab, seq_length 512: BART's default recipe, and the ``uer_gsg`` preset
(random gap sentences, the seed PEGASUS model's recipe) with tgt_seq_length 128. Both paths share
the clean and tokenize runs.

Peer: UER-py (preprocess + its train-time BART noising), which cannot be installed here; its
figure is issue #13's for this machine class, printed as a reference, not measured.

    python -m bench.data_path [--quick]

Prints a table, then one JSON object per figure: data_path_raw_mb_per_s_per_core,
data_path_mask_share (BART), data_path_gsg_raw_mb_per_s_per_core, data_path_gsg_mask_share
(uer_gsg), uer_data_path_raw_mb_per_s_per_core_reference, data_path_speedup_vs_uer_reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared" / "data"
UER_REFERENCE_MB_PER_S = 0.45  # preprocess + train-time BART noising, one core (issue #13), not measured here
VENV_BIN = Path(sys.executable).parent


def build_corpus(directory: Path, copies: int) -> int:
    """The raw corpus file; returns its size in bytes."""
    sources = [SHARED / "CLUECorpusSmall_sampled.txt", SHARED / "CLUECorpusSmall_bert_sampled.txt"]
    missing = [str(p) for p in [*sources, SHARED / "google_zh_vocab.txt"] if not p.is_file()]
    if missing:
        raise SystemExit(f"bench/data_path.py needs {', '.join(missing)} (../shared/data beside the project)")
    lines = [line for source in sources for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    raw = directory / "raw.txt"
    with open(raw, "w", encoding="utf-8") as handle:
        for copy in range(copies):
            for line in lines:
                handle.write(f"{line}（第{copy}份）\n" if copy else f"{line}\n")
    return raw.stat().st_size


def run_stage(name: str, args: list[str]) -> float:
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([str(VENV_BIN / name), *args, "--no-progress"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one copy of the corpus (3.9 MB) instead of three")
    parser.add_argument("--copies", type=int, default=0, help="copies of the 3.9 MB corpus (default 3, 1 with --quick)")
    args = parser.parse_args()
    copies = args.copies or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        raw_bytes = build_corpus(root, copies)
        vocab = SHARED / "google_zh_vocab.txt"
        tokenized, common = str(root / "tok"), ["--seq_length", "512"]
        seconds = {
            "clean": run_stage("zh-clean", ["--input_paths", str(root / "raw.txt"), "--output_dir", str(root / "clean"),
                                            "--input_format", "line"]),
            "tokenize": run_stage("zh-tokenize", ["--input_dir", str(root / "clean"), "--output_dir", tokenized,
                                                  "--vocab_path", str(vocab)]),
            "mask bart": run_stage("zh-mask", ["--input_dir", tokenized, "--output_dir", str(root / "bart"),
                                               "--target", "bart", *common]),
            "mask gsg": run_stage("zh-mask", ["--input_dir", tokenized, "--output_dir", str(root / "gsg"),
                                              "--preset", "uer_gsg", "--tgt_seq_length", "128", *common]),
        }
        examples = {target: json.loads((root / target / "manifest.json").read_text())["counts"]["examples"]
                    for target in ("bart", "gsg")}
    report(raw_bytes / 1e6, seconds, examples)


def report(megabytes: float, seconds: dict[str, float], examples: dict[str, int]) -> None:
    """The table, each path (clean + tokenize + its mask run) totalled, then the JSON figures."""
    totals = {target: seconds["clean"] + seconds["tokenize"] + seconds[f"mask {target}"] for target in ("bart", "gsg")}
    print(f"raw text {megabytes:.1f} MB -> BART and gsg (uer_gsg) examples, one process per stage, start-up included")
    print(f"{'stage':<10} {'seconds':>8} {'MB/s of raw text':>17} {'share of its path':>18}")
    for stage, value in seconds.items():
        path = totals["gsg"] if stage == "mask gsg" else totals["bart"]
        print(f"{stage:<10} {value:>8.2f} {megabytes / value:>17.2f} {value / path:>18.0%}")
    for target, total in totals.items():
        print(f"{'total ' + target:<10} {total:>8.2f} {megabytes / total:>17.2f}   {examples[target]} examples")
    print(f"UER-py reference (issue #13, not measured here): {UER_REFERENCE_MB_PER_S} MB/s per core (BART)")
    figures = [
        {"metric": "data_path_raw_mb_per_s_per_core", "value": round(megabytes / totals["bart"], 3), "unit": "MB/s"},
        {"metric": "data_path_mask_share", "value": round(seconds["mask bart"] / totals["bart"], 3),
         "unit": "fraction of the time"},
        {"metric": "data_path_gsg_raw_mb_per_s_per_core", "value": round(megabytes / totals["gsg"], 3), "unit": "MB/s"},
        {"metric": "data_path_gsg_mask_share", "value": round(seconds["mask gsg"] / totals["gsg"], 3),
         "unit": "fraction of the time"},
        {"metric": "uer_data_path_raw_mb_per_s_per_core_reference", "value": UER_REFERENCE_MB_PER_S,
         "unit": "MB/s (issue #13's figure, not measured in this run)"},
        {"metric": "data_path_speedup_vs_uer_reference",
         "value": round(megabytes / totals["bart"] / UER_REFERENCE_MB_PER_S, 2), "unit": "x"},
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
