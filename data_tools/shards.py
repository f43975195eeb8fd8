"""Arrow shard I/O and stage manifests: the files that are the contract between stages.

Shards are Arrow IPC *stream* files, the format HuggingFace ``datasets`` writes, so
``datasets.Dataset.from_file(shard)`` opens them. They are read through a memory map:
opening a shard costs nothing and rows are paged in on demand.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from data_tools.common import UserError, file_sha256

MANIFEST = "manifest.json"


def id_type_for_vocab(vocab_size: int) -> pa.DataType:
    """uint16 while every id fits, uint32 beyond 65,535 ids."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def list_array(sequences: list[list[int]] | list[np.ndarray], id_type: pa.DataType) -> pa.ListArray:
    """A ``list<id_type>`` array built from one flat buffer and offsets (no per-row objects)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if len(sequences) and offsets[-1]:
        flat = np.concatenate([np.asarray(s, dtype=id_type.to_pandas_dtype()) for s in sequences if len(s)])
    else:
        flat = np.zeros(0, dtype=id_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, id_type))


class ArrowShardWriter:
    """Writes record batches to one IPC stream file, then reports its checksum."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def write(self, columns: dict[str, pa.Array]) -> None:
        batch = pa.record_batch([columns[name] for name in self.schema.names], schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> dict:
        self._writer.close()
        self._sink.close()
        return {"file": self.path.name, "rows": self.rows, "sha256": file_sha256(self.path)}


def open_shard(path: Path) -> pa.Table:
    """Memory-map one shard; the table's buffers point into the mapped file."""
    try:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise UserError(f"cannot read Arrow shard {path}: {error}; re-run the stage that wrote it") from error


def load_manifest(directory: Path, expected_stage: str | Iterable[str]) -> dict:
    """Read a stage's manifest, checking it comes from the stage we expect."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: {directory} is not the output of a finished stage; run that stage first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); re-run the stage that wrote it") from error
    stages = {expected_stage} if isinstance(expected_stage, str) else set(expected_stage)
    if manifest.get("stage") not in stages:
        raise UserError(
            f"{path} was written by stage {manifest.get('stage')!r}, expected {' or '.join(sorted(stages))}; "
            "check the directory you passed"
        )
    return manifest


def shard_paths(directory: Path, manifest: dict) -> list[Path]:
    paths = [Path(directory) / shard["file"] for shard in manifest["shards"]]
    for path in paths:
        if not path.is_file():
            raise UserError(f"shard {path} listed in {Path(directory) / MANIFEST} is missing; re-run that stage")
    return paths


def iter_rows(directory: Path, manifest: dict, column: str) -> Iterator[list]:
    """Every row of ``column`` across a stage's shards, in order, one Python list per row."""
    for path in shard_paths(directory, manifest):
        table = open_shard(path)
        for batch in table.column(column).chunks:
            yield from batch.to_pylist()


class RollingShardWriter:
    """Buffers rows, writes them as record batches, and starts a new numbered shard every
    ``rows_per_shard`` rows. Each finished shard is described by its file, row count,
    sha256 and the totals of ``row_stats`` over its rows (e.g. token counts)."""

    def __init__(
        self,
        output_dir: Path,
        prefix: str,
        schema: pa.Schema,
        rows_per_shard: int,
        batch_rows: int,
        to_columns: Callable[[list], dict[str, pa.Array]],
        row_stats: Callable[[Any], dict[str, int]] = lambda row: {},
    ) -> None:
        self.output_dir, self.prefix, self.schema = Path(output_dir), prefix, schema
        self.rows_per_shard, self.batch_rows = rows_per_shard, batch_rows
        self.to_columns, self.row_stats = to_columns, row_stats
        self.shards: list[dict] = []
        self._writer: ArrowShardWriter | None = None
        self._pending: list = []
        self._stats: Counter[str] = Counter()
        for stale in self.output_dir.glob(f"{prefix}-*.arrow"):
            stale.unlink()

    def add(self, row: Any) -> None:
        if self._writer is None:
            path = self.output_dir / f"{self.prefix}-{len(self.shards):05d}.arrow"
            self._writer = ArrowShardWriter(path, self.schema)
        self._pending.append(row)
        self._stats.update(self.row_stats(row))
        if len(self._pending) >= self.batch_rows:
            self._flush()
        if self._writer.rows + len(self._pending) >= self.rows_per_shard:
            self._close_shard()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write(self.to_columns(self._pending))
            self._pending = []

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self.shards.append({**self._writer.close(), **self._stats})
        self._writer, self._stats = None, Counter()

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


class TokenizedCorpus:
    """Zero-copy random access to a tokenized corpus by document index.

    Every shard is memory-mapped; ``corpus[i]`` returns the document's sentences as numpy
    views into the mapped files, so opening a corpus of any size costs almost nothing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, "tokenize")
        self._shards = []
        rows = []
        for path in shard_paths(self.directory, self.manifest):
            # One entry per record batch: combine_chunks() would copy the shard into memory.
            for column in open_shard(path).column("sentences").chunks:
                sentences = column.values
                self._shards.append((
                    column.offsets.to_numpy(),
                    sentences.offsets.to_numpy(),
                    sentences.values.to_numpy(zero_copy_only=True),
                ))
                rows.append(len(column))
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> list[np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} is out of range for {len(self)} documents")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[shard])
        document_offsets, sentence_offsets, ids = self._shards[shard]
        first, last = document_offsets[row], document_offsets[row + 1]
        return [ids[sentence_offsets[i] : sentence_offsets[i + 1]] for i in range(first, last)]
