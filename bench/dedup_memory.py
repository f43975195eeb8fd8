"""Dedup memory and time at 1x, 10x and 100x documents, one core each, in a fresh process per case.

Exact (50k base, 20k with ``--quick``): the partitioned spill (``zh-clean --dedup_partitions``)
against the in-memory digest set (zh-clean's default), synthetic documents, 10% of them copies.
Near (2k base, 1k with ``--quick``): the partitioned MinHash LSH
(``--near_dedup_partitions``) against datasketch's in-memory index, on random Chinese documents a
third of them edited copies, and the precision and recall of both against exact 5-gram Jaccard.

    python -m bench.dedup_memory [--quick] [--only exact|near]

Prints tables, then one JSON object per figure: dedup_set_bytes_per_document_100x,
dedup_partitioned_bytes_per_document_100x, dedup_partitioned_memory_ratio_vs_set_100x,
dedup_partitioned_speed_ratio_vs_set_100x, near_dedup_bytes_per_doc_100x,
near_dedup_datasketch_bytes_per_doc_100x, near_dedup_docs_per_s_100x, near_dedup_precision,
near_dedup_recall, near_dedup_datasketch_precision, near_dedup_datasketch_recall.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 64
COPY_EVERY = 10  # every 10th document repeats an earlier one


def synthetic_texts(documents: int):
    for i in range(documents):
        source = i // 2 if i % COPY_EVERY == 0 and i else i
        yield f"第{source}号文档：今天天气很好，我们一起去公园散步，看见了许多花。"


def run_case(way: str, documents: int) -> dict:
    """Runs in the child process: dedup ``documents`` synthetic texts one way, report figures.

    A fresh process per case, so its peak RSS above what it held before the documents arrived is
    the dedup's own memory. The texts are generated on the fly and never held (only their digests
    matter). Timed: digesting, the dedup decision and, for the partitioned way, the spill, the
    partition jobs (in this process, so both ways use one core) and the bitmap; not the second
    pass over the documents that both ways' writers share.
    """
    import resource
    import tempfile
    import time

    from data_tools.dedup import PartitionedDigests, document_digest, find_later_copies

    def peak_kib() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if way.startswith("near_"):
        return near_case(way, documents)
    baseline = peak_kib()
    start = time.perf_counter()
    if way == "set":
        seen: set[bytes] = set()
        duplicates = 0
        for text in synthetic_texts(documents):
            digest = document_digest(text)
            if digest in seen:
                duplicates += 1
            else:
                seen.add(digest)
    else:
        with tempfile.TemporaryDirectory() as spill:
            digests = PartitionedDigests(Path(spill), PARTITIONS)
            for ordinal, text in enumerate(synthetic_texts(documents)):
                digests.add(document_digest(text), ordinal, 0)
            bitmap, _ = find_later_copies(digests, processes=1)
            duplicates = bitmap.count
    seconds = time.perf_counter() - start
    return {"way": way, "documents": documents, "duplicates": duplicates, "seconds": seconds,
            "bytes_per_document": max(0, peak_kib() - baseline) * 1024 / documents}


# -- near-dedup --------------------------------------------------------------------------------

NEAR_PARTITIONS, NEAR_THRESHOLD, NEAR_PERM = 64, 0.8, 128
ALPHABET_SIZE = 3000  # CJK ideographs from U+4E00: two random documents share no 5-gram


def planted_text(index: int) -> str:
    """Document ``index`` of the planted corpus, regenerated from its seed (the texts are never held):
    random, or (35%) an earlier document with 0.2-6% of its characters replaced, Jaccard of 5-grams
    from ~0.98 down to ~0.5, or a copy of such a copy."""
    import numpy as np

    rng = np.random.default_rng(index)
    if index and rng.random() < 0.35:
        chars = list(planted_text(int(rng.integers(index))))
        for position in rng.choice(len(chars), int(len(chars) * rng.uniform(0.002, 0.06)), replace=False):
            chars[position] = chr(0x4E00 + int(rng.integers(ALPHABET_SIZE)))
        return "".join(chars)
    return "".join(chr(0x4E00 + int(c)) for c in rng.integers(ALPHABET_SIZE, size=int(rng.integers(60, 300))))


def near_marks(way: str, texts, on_mark=None) -> int:
    """Near-dedup ``texts`` one way; the number of documents dropped (``on_mark(ordinal)`` for each)."""
    import tempfile

    from data_tools.filters import NearDuplicates, minhash_signature
    from data_tools.near_dedup import MinHasher, NearDedupSpill, find_near_copies

    if way == "near_datasketch":
        index, dropped = NearDuplicates(NEAR_THRESHOLD, NEAR_PERM), 0
        for ordinal, text in enumerate(texts):
            if index.rejects(None, minhash_signature(text, NEAR_PERM)):
                dropped += 1
                if on_mark:
                    on_mark(ordinal)
        return dropped
    hasher = MinHasher(NEAR_PERM)
    with tempfile.TemporaryDirectory() as spill_dir:
        spill = NearDedupSpill(Path(spill_dir), NEAR_THRESHOLD, NEAR_PERM, NEAR_PARTITIONS)
        for text in texts:
            spill.add(hasher.signature(text))
        bitmap = find_near_copies(spill, processes=1)
    if on_mark:
        for ordinal in range(spill.documents):
            if ordinal in bitmap:
                on_mark(ordinal)
    return bitmap.count


def near_case(way: str, documents: int) -> dict:
    """Runs in the child process: peak RSS above the start, and time, of near-dedup over ``documents``
    planted documents (generated on the fly: signatures, index or spill, partition jobs, bitmap)."""
    import resource
    import time


    planted_text(0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    dropped = near_marks(way, (planted_text(i) for i in range(documents)))
    seconds = time.perf_counter() - start
    return {"way": way, "documents": documents, "duplicates": dropped, "seconds": seconds,
            "bytes_per_document": max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024 / documents}


def planted_truth(texts: list[str]) -> list[float]:
    """Each document's highest exact 5-gram Jaccard with an earlier document (compared within its planted
    family: unrelated random documents share no 5-gram)."""
    from collections import defaultdict

    documents = len(texts)
    grams = [{text[i : i + 5] for i in range(max(1, len(text) - 4))} for text in texts]
    best = [0.0] * documents  # the highest Jaccard with an earlier document
    by_gram = defaultdict(set)
    for ordinal, shingles in enumerate(grams):
        related = set().union(*(by_gram[g] for g in list(shingles)[:1000]))
        best[ordinal] = max((len(shingles & grams[o]) / len(shingles | grams[o]) for o in related), default=0.0)
        for gram in shingles:
            by_gram[gram].add(ordinal)
    return best


def quality_of(marked: set[int], best: list[float]) -> dict:
    """Precision and recall of the ``marked`` documents against the truth (an earlier document at Jaccard >= the
    threshold), and the share dropped per Jaccard bin."""
    truth = {o for o, jaccard in enumerate(best) if jaccard >= NEAR_THRESHOLD}
    bins = {f"{low:.2f}-{high:.2f}": [o for o, jaccard in enumerate(best) if low <= jaccard < high]
            for low, high in ((0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01))}
    return {"precision": len(marked & truth) / max(1, len(marked)), "recall": len(marked & truth) / len(truth),
            "dropped": len(marked), "true": len(truth),
            "dropped_share_by_jaccard": {k: round(sum(o in marked for o in v) / max(1, len(v)), 3)
                                         for k, v in bins.items()}}


def near_quality(documents: int) -> dict[str, dict]:
    """Precision and recall of both ways against exact 5-gram Jaccard (:func:`planted_truth`): a document is a
    true near-duplicate when an earlier document's Jaccard with it reaches the threshold. Recall also per
    Jaccard bin."""
    texts = [planted_text(i) for i in range(documents)]
    best = planted_truth(texts)
    results = {}
    for way in ("near_datasketch", "near_partitioned"):
        marked: set[int] = set()
        near_marks(way, texts, marked.add)
        results[way] = quality_of(marked, best)
    return results


def near_main(quick: bool, measure) -> None:
    base = 1_000 if quick else 2_000
    rows = []
    for scale in (1, 10, 100):
        for way in ("near_datasketch", "near_partitioned"):
            rows.append({**measure(way, base * scale), "scale": scale})
    print(f"near dedup, threshold {NEAR_THRESHOLD}, {NEAR_PERM} permutations, {NEAR_PARTITIONS} partitions, one core")
    print(f"{'scale':>5}  {'documents':>10}  {'way':<17}  {'dropped':>8}  {'bytes/doc':>9}  {'peak MB':>8}  {'docs/s':>8}")
    for row in rows:
        print(f"{row['scale']:>4}x  {row['documents']:>10,}  {row['way']:<17}  {row['duplicates']:>8,}  "
              f"{row['bytes_per_document']:>9.1f}  {row['bytes_per_document'] * row['documents'] / 1e6:>8.1f}  "
              f"{row['documents'] / row['seconds']:>8,.0f}")
    quality = near_quality(base * 2)
    for way, figures in quality.items():
        print(f"{way}: {json.dumps(figures)}")
    largest = {row["way"]: row for row in rows if row["scale"] == 100}
    figures = [("near_dedup_bytes_per_doc_100x", largest["near_partitioned"]["bytes_per_document"], "bytes/document"),
               ("near_dedup_datasketch_bytes_per_doc_100x", largest["near_datasketch"]["bytes_per_document"],
                "bytes/document"),
               ("near_dedup_docs_per_s_100x", largest["near_partitioned"]["documents"]
                / largest["near_partitioned"]["seconds"], "documents/s"),
               ("near_dedup_precision", quality["near_partitioned"]["precision"], "share"),
               ("near_dedup_recall", quality["near_partitioned"]["recall"], "share"),
               ("near_dedup_datasketch_precision", quality["near_datasketch"]["precision"], "share"),
               ("near_dedup_datasketch_recall", quality["near_datasketch"]["recall"], "share")]
    for metric, value, unit in figures:
        print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit}))


def measure(way: str, documents: int) -> dict:
    output = subprocess.run([sys.executable, "-m", "bench.dedup_memory", "--case", way, str(documents)],
                            capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k base documents instead of 50k (under a minute)")
    parser.add_argument("--only", choices=("exact", "near"), help="run one of the two benches")
    parser.add_argument("--case", nargs=2, metavar=("WAY", "DOCUMENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return
    if args.only != "exact":
        near_main(args.quick, measure)
    if args.only == "near":
        return
    base = 20_000 if args.quick else 50_000
    rows = []
    for scale in (1, 10, 100):
        for way in ("set", "partitioned"):
            row = measure(way, base * scale)
            row["scale"] = scale
            rows.append(row)
            assert row["duplicates"] == rows[-2 if way == "partitioned" else -1]["duplicates"]
    print(f"exact dedup, {PARTITIONS} partitions, one core; memory = peak RSS above the process's start")
    print(f"{'scale':>5}  {'documents':>10}  {'way':<12}  {'bytes/doc':>9}  {'peak MB':>8}  {'docs/s':>10}")
    for row in rows:
        peak = row["bytes_per_document"] * row["documents"] / 1e6
        print(f"{row['scale']:>4}x  {row['documents']:>10,}  {row['way']:<12}  {row['bytes_per_document']:>9.1f}  "
              f"{peak:>8.1f}  {row['documents'] / row['seconds']:>10,.0f}")
    largest = {row["way"]: row for row in rows if row["scale"] == 100}
    figures = [
        {"metric": "dedup_set_bytes_per_document_100x", "value": round(largest["set"]["bytes_per_document"], 1),
         "unit": "bytes/document"},
        {"metric": "dedup_partitioned_bytes_per_document_100x",
         "value": round(largest["partitioned"]["bytes_per_document"], 1), "unit": "bytes/document"},
        {"metric": "dedup_partitioned_memory_ratio_vs_set_100x",
         "value": round(largest["set"]["bytes_per_document"] / max(largest["partitioned"]["bytes_per_document"], 1e-3), 1),
         "unit": "x (set memory / partitioned memory, higher is better)"},
        {"metric": "dedup_partitioned_speed_ratio_vs_set_100x",
         "value": round(largest["set"]["seconds"] / largest["partitioned"]["seconds"], 2),
         "unit": "x (set time / partitioned time, higher is better)"},
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
