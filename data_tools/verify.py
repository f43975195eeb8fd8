"""verify: check a stage's shards against its manifest.

The manifest lists at least one shard, and the directory's vocab.txt matches the manifest's sha256,
vocab size, special token ids and id type (every reader of a manifest checks as much). For every
shard: it exists, its size and sha256 match, it opens, and its row, sentence and token counts match;
for Arrow stages every id is below the vocab size. Then the manifest's totals must be the sums over
its shards. The first problem is named with what is wrong, and the exit status is non-zero.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_tools.cli import required, run_stage
from data_tools.common import UserError
from data_tools.manifests import (
    MANIFEST,
    DocumentShard,
    ExampleShard,
    ShardEntry,
    StageManifest,
    TokenizedShard,
    read_manifest_json,
)
from data_tools.near_dedup import checked_signature_file
from data_tools.shards import shard_problem

# The id columns of each kind of Arrow shard.
ARROW_COLUMNS: dict[type[ShardEntry], tuple[str, ...]] = {TokenizedShard: ("sentences",),
                                                         ExampleShard: ("source_ids", "target_ids")}
# Each stage's totals (counts.<key>) that are sums of a field of its shard entries.
TOTALS: dict[str, tuple[tuple[str, str], ...]] = {
    "clean": (("documents_kept", "documents"), ("characters_kept", "characters")),
    "tokenize": (("documents_kept", "rows"), ("sentences", "sentences"), ("tokens", "tokens")),
    "mask": (("examples", "rows"), ("source_tokens", "source_tokens"), ("target_tokens", "target_tokens")),
}


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


def verify_shard(path: Path, shard: ShardEntry, vocab_size: int | None) -> str | None:
    """What is wrong with one shard, or None: the checks every stage makes on its input
    (existence, size, sha256, rows), then each count of the manifest and every id's range."""
    problem = shard_problem(path, shard, checksum=True)
    if problem or isinstance(shard, DocumentShard):
        return problem
    table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    columns = ARROW_COLUMNS[type(shard)]
    facts = {name: _column_facts(table.column(name)) for name in columns}
    if "sentences" in facts:
        tokens, sentences, _ = facts["sentences"]
        counts = {"sentences": sentences, "tokens": tokens}
    else:
        counts = {f"{name.split('_')[0]}_tokens": facts[name][0] for name in columns}
    for key, value in counts.items():
        recorded = getattr(shard, key)
        if recorded is not None and recorded != value:  # None: not recorded by the manifest
            return f"has {value} {key}, the manifest says {recorded}"
    for name, (_, _, largest) in facts.items():
        if vocab_size is not None and largest >= vocab_size:
            return f"column {name} holds id {largest}, not below the vocab size {vocab_size}"
    return None


def totals_problem(manifest: StageManifest) -> str | None:
    """Which of the manifest's totals is not the sum over its shard entries (None: all are, or not recorded)."""
    for key, field in TOTALS[manifest.STAGE]:
        total = getattr(manifest.counts, key)
        values = [getattr(shard, field) for shard in manifest.shards]
        if total is not None and None not in values and total != sum(values):
            return f"counts.{key} is {total} but its shards hold {sum(values)}"
    return None


def verify(config: VerifyConfig) -> dict:
    # read_manifest_json refuses a manifest listing no shard and checks vocab.txt against it
    as_read, manifest = read_manifest_json(config.directory, ("clean", "tokenize", "mask"))
    vocab = getattr(manifest, "vocab", None)
    for shard in manifest.shards:
        path = config.directory / shard.file
        problem = verify_shard(path, shard, None if vocab is None else vocab.size)
        if problem:
            raise UserError(f"{path} {problem}; re-run the {manifest.STAGE} stage")
    minhash = getattr(manifest, "minhash", None)
    if minhash is not None:  # clean's MinHash signatures: size, sha256 and shape against the manifest
        checked_signature_file(config.directory, minhash)
    problem = totals_problem(manifest)
    if problem:
        raise UserError(f"{config.directory / MANIFEST}: {problem}; re-run the {manifest.STAGE} stage")
    print(f"verify: {config.directory}: {len(manifest.shards)} {manifest.STAGE} shards, {manifest.row_count} rows"
          + (", vocab.txt" if vocab is not None else "") + (", MinHash signatures" if minhash is not None else "")
          + ", all match the manifest", file=sys.stderr)
    return as_read


def main(argv: list[str] | None = None) -> int:
    return run_stage(verify, VerifyConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
