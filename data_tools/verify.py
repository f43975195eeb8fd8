"""verify: check a stage's shards against its manifest.

For every shard: it exists, its sha256 matches, it opens, and its row, sentence and
token counts match; for Arrow stages every id is below the vocab size. The first bad
shard is named with what is wrong, and the exit status is non-zero.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_tools.cli import required, run_stage
from data_tools.common import UserError, file_sha256
from data_tools.shards import load_manifest

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
    """What is wrong with one shard, or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    digest = file_sha256(path)
    if digest != shard["sha256"]:
        return (f"sha256 {digest[:16]}… differs from the manifest's {shard['sha256'][:16]}… "
                f"({size} bytes: truncated or modified)")
    if stage == "clean":
        with open(path, encoding="utf-8") as handle:
            rows = sum(1 for _ in handle)
        return None if rows == shard["documents"] else f"has {rows} documents, the manifest says {shard['documents']}"
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        return f"cannot be read as an Arrow stream ({error})"
    if table.num_rows != shard["rows"]:
        return f"has {table.num_rows} rows, the manifest says {shard['rows']}"
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
    vocab_size = manifest.get("vocab", {}).get("size")
    for shard in manifest["shards"]:
        path = config.directory / shard["file"]
        problem = verify_shard(path, shard, stage, vocab_size)
        if problem:
            raise UserError(f"{path} {problem}; re-run the {stage} stage")
    rows = sum(shard.get("rows", shard.get("documents", 0)) for shard in manifest["shards"])
    print(f"verify: {config.directory}: {len(manifest['shards'])} {stage} shards, {rows} rows, all match the manifest",
          file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(verify, VerifyConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
