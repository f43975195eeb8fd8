"""Shard I/O: the files that are the contract between stages, and their checks against the manifest.

Clean writes JSONL document shards. Tokenize and mask write Arrow IPC *stream* files, the format
HuggingFace ``datasets`` writes, so ``datasets.Dataset.from_file(shard)`` opens them. They are read
through a memory map: opening a shard costs nothing and rows are paged in on demand. The manifests
themselves are typed in :mod:`data_tools.manifests`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from data_tools.common import VOCAB_FILE, UserError, file_sha256
from data_tools.manifests import (
    MANIFEST,
    DocumentShard,
    ShardEntry,
    StageManifest,
    check_vocab_beside,
    parse_manifest,
    read_manifest_json,
)
from data_tools.outputs import check_apart, check_replaceable_dir

# A manifest as load_manifest returns it (the JSON object, for the trainer and online masking) or typed.
AnyManifest = dict | StageManifest


def id_type_for_vocab(vocab_size: int) -> pa.DataType:
    """uint16 while every id fits, uint32 beyond 65,535 ids."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def numpy_dtype(id_type: pa.DataType) -> np.dtype:
    """The numpy dtype of an Arrow integer type (``to_pandas_dtype`` would import pandas: 0.5 s a stage)."""
    return np.dtype(str(id_type))


def arrow_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A primitive Arrow array over a numpy array's buffer (converted to ``arrow_type``'s dtype first if need
    be). ``pa.array`` would import pandas on its first call, to look for pandas objects: ~0.3 s a stage."""
    values = np.ascontiguousarray(values, dtype=numpy_dtype(arrow_type))
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def numpy_view(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls (ids, offsets); ``to_numpy``
    would import pandas on its first call (~0.3 s a stage)."""
    if array.null_count:
        raise ValueError(f"numpy_view: {array.null_count} nulls in a {array.type} array")
    dtype = numpy_dtype(array.type)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def list_array(sequences: list[list[int]] | list[np.ndarray], id_type: pa.DataType) -> pa.ListArray:
    """A ``list<id_type>`` array built from one flat buffer and offsets (no per-row objects)."""
    return list_column(*columns_from_sequences(sequences, id_type), id_type)


class ArrowShardWriter:
    """Writes record batches to one IPC stream file, then reports its checksum."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def write(self, columns: dict[str, pa.Array]) -> None:
        self.write_batch(pa.record_batch([columns[name] for name in self.schema.names], schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> dict:
        self._writer.close()
        self._sink.close()
        return {"file": self.path.name, "rows": self.rows, "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path)}


def open_shard(path: Path) -> pa.Table:
    """Memory-map one shard; the table's buffers point into the mapped file."""
    try:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise UserError(f"cannot read Arrow shard {path}: {error}; re-run the stage that wrote it") from error


def load_manifest(directory: Path, expected_stage: str | Iterable[str]) -> dict:
    """A stage's manifest as a JSON object, checked as :func:`data_tools.manifests.read_manifest` checks it
    (for the code that reads manifests as dicts; the stages use the typed one)."""
    return read_manifest_json(directory, expected_stage)[0]


def typed_manifest(manifest: AnyManifest) -> StageManifest:
    """The typed form of a manifest handed over as :func:`load_manifest`'s JSON object (already checked)."""
    return manifest if isinstance(manifest, StageManifest) else parse_manifest(manifest, MANIFEST)


def checked_vocab_file(directory: Path, manifest: AnyManifest) -> Path:
    """The vocab.txt beside a tokenize or mask output, which must be the file its ids were made with (the
    manifest's vocab.sha256, size, special token ids and id type; :func:`data_tools.manifests.check_vocab_beside`)."""
    return check_vocab_beside(directory, typed_manifest(manifest))


def check_stage_output(output_dir: Path, stage: str, shard_prefix: str, overwrite: bool,
                       inputs: dict[str, Path | Iterable[Path] | None]) -> None:
    """Before a stage starts: its output is apart from its inputs, and an existing output
    directory is an earlier output of the same stage holding only what the stage writes."""
    check_apart(output_dir, "--output_dir", inputs)

    def owns(manifest: dict, name: str) -> bool:
        listed = {shard.get("file") for shard in manifest.get("shards") or [] if isinstance(shard, dict)}
        if isinstance(manifest.get("minhash"), dict):  # clean's MinHash signatures
            listed.add(manifest["minhash"].get("file"))
        return name in listed or name in (MANIFEST, VOCAB_FILE) or name.startswith(f"{shard_prefix}-")

    check_replaceable_dir(output_dir, "--output_dir", f"the {stage} stage", MANIFEST,
                          lambda manifest: manifest.get("stage") == stage, owns, overwrite)


# -- JSONL document shards (clean's output) --------------------------------------------------------------


class ShardedJsonlWriter:
    """Writes ``{"text": ...}`` lines into numbered ``documents-NNNNN.jsonl`` shards and records each
    shard's counts."""

    def __init__(self, output_dir: Path, documents_per_shard: int) -> None:
        self.output_dir = Path(output_dir)
        self.documents_per_shard = documents_per_shard
        self.shards: list[DocumentShard] = []
        self.documents = 0  # written so far, over all shards
        self._handle = None
        self._hash = None
        self._count = 0
        self._chars = 0
        self._bytes = 0

    def write(self, text: str) -> None:
        self.write_many([text])

    def write_many(self, texts: list[str]) -> None:
        """The documents in order, encoded, written and hashed a shard's share at a time (one call per
        document costs ~3x more on a chunk of short documents)."""
        written = 0
        while written < len(texts):
            if self._handle is None or self._count >= self.documents_per_shard:
                self._close_shard()
                self._handle = open(self.output_dir / self._name(len(self.shards)), "wb")  # noqa: SIM115
                self._hash = hashlib.sha256()
            batch = texts[written : written + self.documents_per_shard - self._count]
            # what json.dumps({"text": text}, ensure_ascii=False) writes, without its ~4 µs of set-up per call
            data = "".join(['{"text": ' + encode_basestring(text) + "}\n" for text in batch]).encode("utf-8")
            self._handle.write(data)
            self._hash.update(data)
            self._bytes += len(data)
            self._count += len(batch)
            self._chars += sum(map(len, batch))
            self.documents += len(batch)
            written += len(batch)

    @staticmethod
    def _name(index: int) -> str:
        return f"documents-{index:05d}.jsonl"

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self.shards.append(DocumentShard(file=self._name(len(self.shards)), documents=self._count,
                                         characters=self._chars, bytes=self._bytes, sha256=self._hash.hexdigest()))
        self._handle, self._count, self._chars, self._bytes = None, 0, 0, 0

    def close(self) -> list[DocumentShard]:
        self._close_shard()
        return self.shards


def iter_document_texts(paths: Iterable[Path]) -> Iterator[str]:
    """The texts of documents-NNNNN.jsonl shards (checked by the caller), in order."""
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


def scan_jsonl(path: Path) -> tuple[str, int]:
    """sha256 and line count of a file, in one pass."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            lines += block.count(b"\n")
    return digest.hexdigest(), lines


# -- checking shards against their manifest entries ------------------------------------------------------


def arrow_rows(path: Path) -> int:
    """Rows of an Arrow stream shard, from its record batch headers (memory-mapped, cheap)."""
    return open_shard(path).num_rows


def shard_problem(path: Path, shard: ShardEntry, checksum: bool = True) -> str | None:
    """What makes one shard disagree with its manifest entry (missing, size, sha256, rows), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if shard.bytes is not None and size != shard.bytes:
        return f"has {size} bytes, the manifest says {shard.bytes} (truncated or modified)"
    if isinstance(shard, DocumentShard):  # counting lines reads the file anyway, so hash it too
        digest, rows = scan_jsonl(path)
    else:
        digest, rows = file_sha256(path) if checksum else None, None
    if digest is not None and digest != shard.sha256:
        return (f"sha256 {digest[:16]}… differs from the manifest's {shard.sha256[:16]}… "
                f"({size} bytes: truncated or modified)")
    if rows is None:
        try:
            rows = arrow_rows(path)
        except UserError:
            return "cannot be read as an Arrow stream (truncated or not a shard)"
    if rows != shard.row_count:
        return f"has {rows} {shard.ROW_FIELD}, the manifest says {shard.row_count}"
    return None


def shard_paths(directory: Path, manifest: AnyManifest, checksum: bool = True) -> list[Path]:
    """The shards of a stage's output, each checked against its manifest entry before anyone
    reads it (existence, size, row count, and sha256 unless ``checksum`` is False)."""
    directory, manifest = Path(directory), typed_manifest(manifest)
    paths = []
    for shard in manifest.shards:
        path = directory / shard.file
        problem = shard_problem(path, shard, checksum)
        if problem:
            raise UserError(f"shard {path} {problem}; re-run the {manifest.STAGE} stage that wrote {directory} "
                            f"(zh-verify {directory} checks every shard)")
        paths.append(path)
    return paths


def iter_rows(directory: Path, manifest: AnyManifest, column: str, checksum: bool = True) -> Iterator[list]:
    """Every row of ``column`` across a stage's shards, in order, one Python list per row."""
    for path in shard_paths(directory, manifest, checksum):
        table = open_shard(path)
        for batch in table.column(column).chunks:
            yield from batch.to_pylist()


@dataclass(frozen=True)
class DocumentBlock:
    """Consecutive documents of a tokenized corpus as Arrow's flat buffers, rebased to start at 0:
    document k is sentences ``document_offsets[k]:document_offsets[k + 1]``, sentence s is
    ``ids[sentence_offsets[s]:sentence_offsets[s + 1]]``. Cheap to send to a worker (three arrays)."""

    first_document: int  # corpus-wide index of the block's first document
    document_offsets: np.ndarray  # int64
    sentence_offsets: np.ndarray  # int64
    ids: np.ndarray  # uint16 / uint32, a view of the mapped shard until pickled

    def __len__(self) -> int:
        return len(self.document_offsets) - 1

    @classmethod
    def cut(cls, first_document: int, document_offsets: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray,
            start: int, size: int) -> "DocumentBlock":
        """Documents ``start:start + size`` of a ``list<list<id>>`` layout (its two int64 offset arrays and its
        values), rebased; ``first_document`` is the corpus-wide index of document 0 of that layout."""
        documents = document_offsets[start:start + size + 1]
        sentences = sentence_offsets[documents[0]:documents[-1] + 1]
        return cls(first_document + start, documents - documents[0], sentences - sentences[0],
                   ids[sentences[0]:sentences[-1]])

    def document_lists(self) -> Iterator[list[list[int]]]:
        """Each document's sentences as lists of ints, in order (for the code that works on lists)."""
        ids, bounds = self.ids.tolist(), self.sentence_offsets.tolist()  # one conversion for the block
        documents = self.document_offsets.tolist()
        for first, last in zip(documents, documents[1:]):
            yield [ids[bounds[s]:bounds[s + 1]] for s in range(first, last)]


def iter_document_blocks(directory: Path, manifest: AnyManifest, column: str, size: int,
                         checksum: bool = True) -> Iterator[DocumentBlock]:
    """Every row of a ``list<list<id>>`` column across a stage's shards, in blocks of at most ``size``
    documents (never across a record batch), with no Python object per row or token."""
    first = 0
    for path in shard_paths(directory, manifest, checksum):
        for batch in open_shard(path).column(column).chunks:
            document_offsets = numpy_view(batch.offsets).astype(np.int64)
            sentence_offsets = numpy_view(batch.values.offsets).astype(np.int64)
            ids = numpy_view(batch.values.values)
            for start in range(0, len(batch), size):
                yield DocumentBlock.cut(first, document_offsets, sentence_offsets, ids, start, size)
            first += len(batch)


def columns_from_sequences(sequences: list, id_type: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list of id sequences, for :meth:`RollingShardWriter.add_columns`."""
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)), out=offsets[1:])
    dtype = numpy_dtype(id_type)
    if sequences and isinstance(sequences[0], np.ndarray):
        values = np.concatenate(sequences).astype(dtype, copy=False) if offsets[-1] else np.zeros(0, dtype)
    else:
        values = np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=int(offsets[-1]))
    return values, offsets


def list_column(values: np.ndarray, offsets: np.ndarray, id_type: pa.DataType) -> pa.ListArray:
    """A ``list<id_type>`` array from flat values and int64 offsets."""
    return pa.ListArray.from_arrays(arrow_array(offsets, pa.int32()), arrow_array(values, id_type))


class RollingShardWriter:
    """Buffers rows, writes them as record batches of ``batch_rows`` rows, and starts a new numbered
    shard every ``rows_per_shard`` rows. Each finished shard is described by its file, row count,
    sha256 and the totals of ``row_stats`` over its rows (e.g. token counts).

    Rows come one at a time (:meth:`add`, turned into columns by ``to_columns``) or many at once as
    columns (:meth:`add_columns`); either way the batches, and so the file's bytes, depend only on
    the rows, not on how they were handed over."""

    def __init__(
        self,
        output_dir: Path,
        prefix: str,
        schema: pa.Schema,
        rows_per_shard: int,
        batch_rows: int,
        to_columns: Callable[[list], dict[str, pa.Array]] = lambda rows: {},
        row_stats: Callable[[Any], dict[str, int]] = lambda row: {},
    ) -> None:
        self.output_dir, self.prefix, self.schema = Path(output_dir), prefix, schema
        self.rows_per_shard, self.batch_rows = rows_per_shard, batch_rows
        self.to_columns, self.row_stats = to_columns, row_stats
        self.shards: list[dict] = []
        self._writer: ArrowShardWriter | None = None
        self._pending: list = []  # rows from add()
        self._queued: list[pa.RecordBatch] = []  # columns from add_columns(), not yet written
        self._queued_rows = 0
        self._stats: Counter[str] = Counter()

    def add(self, row: Any) -> None:
        if self._writer is None:
            self._open_shard()
        self._pending.append(row)
        self._stats.update(self.row_stats(row))
        if len(self._pending) >= self.batch_rows:
            self._flush()
        if self._writer.rows + len(self._pending) >= self.rows_per_shard:
            self._close_shard()

    def add_columns(self, columns: dict[str, pa.Array], row_stats: dict[str, np.ndarray]) -> None:
        """Many rows at once, already as arrays (``row_stats``: one value per row for each statistic),
        with no Python object per row."""
        if self._pending:
            raise AssertionError("RollingShardWriter: add() and add_columns() rows cannot be mixed")
        batch = pa.record_batch([columns[name] for name in self.schema.names], schema=self.schema)
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                self._open_shard()
            take = min(self.rows_per_shard - self._writer.rows - self._queued_rows, batch.num_rows - start)
            self._queued.append(batch.slice(start, take))
            self._queued_rows += take
            for name, values in row_stats.items():
                self._stats[name] += int(values[start:start + take].sum())
            start += take
            self._write_queued(whole_batches_only=True)
            if self._writer.rows + self._queued_rows >= self.rows_per_shard:
                self._close_shard()

    def _open_shard(self) -> None:
        path = self.output_dir / f"{self.prefix}-{len(self.shards):05d}.arrow"
        self._writer = ArrowShardWriter(path, self.schema)

    def _write_queued(self, whole_batches_only: bool) -> None:
        if self._queued_rows < (self.batch_rows if whole_batches_only else 1):
            return
        queued = pa.Table.from_batches(self._queued, schema=self.schema)
        written = 0
        while queued.num_rows - written >= (self.batch_rows if whole_batches_only else 1):
            take = min(self.batch_rows, queued.num_rows - written)
            # fresh arrays, not slices: the IPC writer pads a sliced buffer differently, and the
            # file's bytes must not depend on where the blocks handed over began
            part = queued.slice(written, take)
            self._writer.write_batch(pa.record_batch([pa.concat_arrays(column.chunks) for column in part.columns],
                                                     schema=self.schema))
            written += take
        self._queued = queued.slice(written).to_batches() if written < queued.num_rows else []
        self._queued_rows = queued.num_rows - written

    def _flush(self) -> None:
        if self._pending:
            self._writer.write(self.to_columns(self._pending))
            self._pending = []
        self._write_queued(whole_batches_only=False)

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

    def __init__(self, directory: Path, checksum: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, "tokenize")
        self._shards = []
        rows = []
        for path in shard_paths(self.directory, self.manifest, checksum):
            # One entry per record batch: combine_chunks() would copy the shard into memory.
            for column in open_shard(path).column("sentences").chunks:
                sentences = column.values
                self._shards.append((
                    numpy_view(column.offsets),
                    numpy_view(sentences.offsets),
                    numpy_view(sentences.values),
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
