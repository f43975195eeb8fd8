"""datatrove's MinHash deduplication against zh-clean's --near_dedup_partitions, on the planted corpus.

The corpus is bench.dedup_memory's: random Chinese documents, 35% of them edited copies of an earlier
one. datatrove (the library FineWeb was deduplicated with) runs its four stages (signatures, LSH
buckets, clusters, filter) with its LocalPipelineExecutor, one task each, every stage in a fresh
process: time and peak RSS above the process's start (after its imports) per stage. The project's
way runs as bench.dedup_memory measures it (one process, documents generated on the fly, which
datatrove is spared: it reads a JSONL file written beforehand). Both at 1x and 10x of 2,000
documents (add 100x with --with_100x: datatrove's Chinese word tokenizer makes that ~15 minutes on
one core), and their precision and recall against exact character 5-gram Jaccard on 4,000 documents.

Settings: threshold 0.8 for ours with 128 permutations; datatrove with the bands and rows LSH
picks for that threshold (9 buckets x 13 hashes), word 5-grams from its Chinese word tokenizer
(language "cmn": spaCy with jieba), 64-bit hashes, union-find clusters, one kept per cluster.

datatrove and its Chinese tokenizer are not dependencies of this project. Install them into a
separate environment and pass its interpreter:

    python -m venv /tmp/dtv && /tmp/dtv/bin/pip install datatrove spacy jieba regex "xxhash<3.6" tokenizers orjson
    python -m bench.datatrove_minhash [--quick] [--with_100x] --python /tmp/dtv/bin/python

Prints a table and the quality of both, then one JSON object per figure, at the largest scale S:
datatrove_bytes_per_doc_Sx, datatrove_docs_per_s_Sx, datatrove_precision, datatrove_recall,
near_dedup_speed_ratio_vs_datatrove_Sx (ours/theirs, documents/s) and
near_dedup_memory_ratio_vs_datatrove_Sx (their peak bytes per document / ours: higher is better).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKETS, HASHES_PER_BUCKET, NGRAMS = 9, 13, 5  # data_tools.near_dedup.lsh_bands(0.8, 128)
# Mandarin Chinese: spaCy with jieba. datatrove 0.10's "zh" gives spaCy's multi-language tokenizer, which
# keeps a clause of unsegmented Chinese as one word: no document has 5 words, and nothing is found.
LANGUAGE = "cmn"
STAGES = ("signatures", "buckets", "clusters", "filter")


def run_stage(stage: str, work: Path) -> dict:
    """In the child (datatrove's interpreter): one stage over ``work``; its seconds and peak RSS growth."""
    import resource
    import time

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=NGRAMS, num_buckets=BUCKETS, hashes_per_bucket=HASHES_PER_BUCKET,
                           hash_config=HashConfig(precision=64))
    reader = JsonlReader(str(work / "corpus"))
    steps = {
        "signatures": [reader, MinhashDedupSignature(str(work / "signatures"), config=config,
                                                             language=LANGUAGE)],
        "buckets": [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
        "clusters": [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
        "filter": [reader, MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "kept"))],
    }[stage]
    import jieba
    import spacy  # noqa: F401 - imported, with jieba's dictionary, before the baseline (the stage's tokenizer
    # itself is built inside the executor, which deep-copies the pipeline: a built one cannot be copied)

    jieba.initialize()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    tasks = BUCKETS if stage == "buckets" else 1  # datatrove's buckets stage runs one task per bucket
    LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=1, logging_dir=str(work / "logs" / stage),
                          skip_completed=False).run()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline)
            * 1024}


def removed_ordinals(work: Path) -> set[int]:
    """The documents datatrove's clusters stage removes (``000000.remove``: uint32 ids of task 0's documents)."""
    import numpy as np

    path = work / "remove" / "000000.remove"
    return set(np.fromfile(path, dtype="<u4").tolist()) if path.is_file() else set()


def write_corpus(work: Path, documents: int) -> None:
    from bench.dedup_memory import planted_text

    (work / "corpus").mkdir(parents=True)
    with open(work / "corpus" / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for ordinal in range(documents):
            handle.write(json.dumps({"text": planted_text(ordinal), "id": str(ordinal)}, ensure_ascii=False) + "\n")


def datatrove_case(python: str, documents: int) -> dict:
    """datatrove's four stages over ``documents`` planted documents, each stage in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="datatrove-") as tmp:
        work = Path(tmp)
        write_corpus(work, documents)
        stages = {}
        for stage in STAGES:
            result = subprocess.run([python, "-m", "bench.datatrove_minhash", "--stage", stage, str(work)],
                                    capture_output=True, text=True, cwd=PROJECT_ROOT)
            if result.returncode:
                raise SystemExit(f"datatrove's {stage} stage failed:\n{result.stderr[-3000:]}")
            stages[stage] = json.loads(result.stdout.strip().splitlines()[-1])
        marked = removed_ordinals(work)
    seconds = sum(stage["seconds"] for stage in stages.values())
    peak = max(stage["peak_growth_bytes"] for stage in stages.values())
    return {"documents": documents, "dropped": len(marked), "marked": marked, "seconds": seconds,
            "bytes_per_document": peak / documents, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.datatrove_minhash", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k documents at 1x only, quality on 2k (under a minute)")
    parser.add_argument("--with_100x", action="store_true", help="also 100x (200k documents)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that has datatrove, spaCy and jieba (default: this one)")
    parser.add_argument("--stage", nargs=2, metavar=("STAGE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage[0], Path(args.stage[1]))))
        return
    probe = subprocess.run([args.python, "-c", "import datatrove, spacy, jieba"], capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"{args.python} lacks datatrove, spacy or jieba (not dependencies of this project): see "
                         "python -m bench.datatrove_minhash --help for how to install them apart and pass --python")
    from bench.dedup_memory import measure, planted_text, planted_truth, quality_of

    base = 1_000 if args.quick else 2_000
    rows = []
    scales = (1,) if args.quick else (1, 10, 100) if args.with_100x else (1, 10)
    for scale in scales:
        ours = measure("near_partitioned", base * scale)
        theirs = datatrove_case(args.python, base * scale)
        rows.append((scale, ours, theirs))
    print("near dedup, threshold 0.8: ours (--near_dedup_partitions 64, 128 permutations, character 5-grams) "
          f"and datatrove ({BUCKETS}x{HASHES_PER_BUCKET} LSH, word {NGRAMS}-grams, language {LANGUAGE}); one core each")
    print(f"{'scale':>5}  {'documents':>10}  {'way':<10}  {'dropped':>8}  {'bytes/doc':>9}  {'peak MB':>8}  "
          f"{'docs/s':>8}  stages (s)")
    for scale, ours, theirs in rows:
        for way, row in (("ours", ours), ("datatrove", theirs)):
            stages = " ".join(f"{name} {stage['seconds']:.1f}" for name, stage in row.get("stages", {}).items())
            print(f"{scale:>4}x  {row['documents']:>10,}  {way:<10}  {row.get('dropped', row.get('duplicates')):>8,}  "
                  f"{row['bytes_per_document']:>9.1f}  {row['bytes_per_document'] * row['documents'] / 1e6:>8.1f}  "
                  f"{row['documents'] / row['seconds']:>8,.0f}  {stages}")
    documents = base * 2
    best = planted_truth([planted_text(i) for i in range(documents)])
    theirs_quality = quality_of(datatrove_case(args.python, documents)["marked"], best)
    ours_marked: set[int] = set()
    from bench.dedup_memory import near_marks

    near_marks("near_partitioned", [planted_text(i) for i in range(documents)], ours_marked.add)
    ours_quality = quality_of(ours_marked, best)
    print(f"quality on {documents} documents against exact character 5-gram Jaccard >= 0.8:")
    print(f"  ours:      {json.dumps(ours_quality)}")
    print(f"  datatrove: {json.dumps(theirs_quality)}")
    scale, ours, theirs = rows[-1]
    figures = [
        (f"datatrove_bytes_per_doc_{scale}x", theirs["bytes_per_document"], "bytes/document"),
        (f"datatrove_docs_per_s_{scale}x", theirs["documents"] / theirs["seconds"], "documents/s"),
        ("datatrove_precision", theirs_quality["precision"], "share"),
        ("datatrove_recall", theirs_quality["recall"], "share"),
        (f"near_dedup_speed_ratio_vs_datatrove_{scale}x",
         (ours["documents"] / ours["seconds"]) / (theirs["documents"] / theirs["seconds"]), "x (ours/datatrove)"),
        (f"near_dedup_memory_ratio_vs_datatrove_{scale}x",
         theirs["bytes_per_document"] / max(ours["bytes_per_document"], 1e-3), "x (datatrove bytes / ours)"),
    ]
    for metric, value, unit in figures:
        print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit}))


if __name__ == "__main__":
    main()
