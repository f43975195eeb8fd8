"""Exact-dedup memory and time at 1x, 10x and 100x documents (50k base, 20k with ``--quick``):
the partitioned spill (``zh-clean --dedup_partitions``) against the in-memory digest set
(zh-clean's default), on the same synthetic documents, 10% of them copies, one core each.

    python -m bench.dedup_memory [--quick]

Prints a table, then one JSON object per figure: dedup_set_bytes_per_document_100x,
dedup_partitioned_bytes_per_document_100x, dedup_partitioned_memory_ratio_vs_set_100x,
dedup_partitioned_speed_ratio_vs_set_100x.
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


def measure(way: str, documents: int) -> dict:
    output = subprocess.run([sys.executable, "-m", "bench.dedup_memory", "--case", way, str(documents)],
                            capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k base documents instead of 50k (under a minute)")
    parser.add_argument("--case", nargs=2, metavar=("WAY", "DOCUMENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
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
