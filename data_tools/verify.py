"""verify: check a stage's shards against its manifest.

The directory's vocab.txt matches the manifest's sha256. For every shard: it exists, its
size and sha256 match, it opens, and its row, sentence and token counts match; for Arrow
stages every id is below the vocab size. The first bad
shard is named with what is wrong, and the exit status is non-zero.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_tools.cli import required, run_stage
from data_tools.common import UserError
from data_tools.shards import ROW_FIELD, checked_vocab_file, load_manifest, shard_problem

ARROW_STAGES = {"tokenize": ("sentences",), "mask": ("source_ids", "target_ids")}


@dataclass(kw_only=True)
class VerifyConfig:
    """Check every shard of a clean, tokenize or mask output directory against its manifest."""

    directory: Path = required("Output directory of the clean, tokenize or mask stage.")

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)


def _flat_ids(chunk: pa.Array) -> np.ndarray:
    while pa.types.is_list(chunk.type):
        chunk = chunk.flatten()
    return chunk.to_numpy(zero_copy_only=False)


def _column_facts(column: pa.ChunkedArray) -> tuple[int, int, int]:
    """(ids, inner lists, largest id) of a column, one record batch at a time."""
    ids = lists = 0
    largest = -1
    for chunk in column.chunks:
        flat = _flat_ids(chunk)
        ids += len(flat)
        lists += len(chunk.flatten()) if pa.types.is_list(chunk.type.value_type) else 0
        largest = max(largest, int(flat.max()) if len(flat) else -1)
    return ids, lists, largest


def verify_shard(path: Path, shard: dict, stage: str, vocab_size: int | None) -> str | None:
    """What is wrong with one shard, or None: the checks every stage makes on its input
    (existence, size, sha256, rows), then each count of the manifest and every id's range."""
    problem = shard_problem(path, shard, stage, checksum=True)
    if problem or stage == "clean":
        return problem
    table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    facts = {name: _column_facts(table.column(name)) for name in ARROW_STAGES[stage]}
    if stage == "tokenize":
        tokens, sentences, _ = facts["sentences"]
        counts = {"sentences": sentences, "tokens": tokens}
    else:
        counts = {f"{name.split('_')[0]}_tokens": facts[name][0] for name in ARROW_STAGES[stage]}
    for key, value in counts.items():
        if key in shard and shard[key] != value:
            return f"has {value} {key}, the manifest says {shard[key]}"
    for name, (_, _, largest) in facts.items():
        if vocab_size is not None and largest >= vocab_size:
            return f"column {name} holds id {largest}, not below the vocab size {vocab_size}"
    return None


def verify(config: VerifyConfig) -> dict:
    manifest = load_manifest(config.directory, ("clean", "tokenize", "mask"))
    stage = manifest["stage"]
    vocab = manifest.get("vocab")
    if vocab is not None:  # the ids mean nothing without the exact vocab they were made with
        checked_vocab_file(config.directory, manifest)
    for shard in manifest["shards"]:
        path = config.directory / shard["file"]
        problem = verify_shard(path, shard, stage, None if vocab is None else vocab["size"])
        if problem:
            raise UserError(f"{path} {problem}; re-run the {stage} stage")
    rows = sum(shard[ROW_FIELD[stage]] for shard in manifest["shards"])
    print(f"verify: {config.directory}: {len(manifest['shards'])} {stage} shards, {rows} rows"
          + (", vocab.txt" if vocab is not None else "") + ", all match the manifest", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(verify, VerifyConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
