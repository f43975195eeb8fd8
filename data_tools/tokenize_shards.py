"""Stage 2, tokenize: document shards in, Arrow shards of token ids per sentence out.

Each row is one document: ``sentences: list<list<uint16>>`` (uint32 for vocabs over
65,535 ids). Ids equal ``transformers.BertTokenizer`` with the same vocab and
``do_lower_case``. The vocab is copied beside the shards so later stages and the
export read the exact file the ids came from.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError, file_sha256
from data_tools.compiled import notice_if_pure_python
from data_tools.manifests import (
    MANIFEST,
    TokenizeCounts,
    TokenizedShard,
    TokenizeManifest,
    VocabRecord,
    read_manifest,
)
from data_tools.outputs import overwrite_option
from data_tools.shards import RollingShardWriter, arrow_array, id_type_for_vocab, shard_paths
from data_tools.stage import DataStage, Worker, check_accounted, run_data_stage
from data_tools.wordpiece import BertWordPieceEncoder, EncodedDocuments, load_encoder

STAGE = "tokenize"


@dataclass(kw_only=True)
class TokenizeConfig:
    """Split documents into sentences and turn them into BERT WordPiece ids."""

    input_dir: Path = required("Output directory of the clean stage (documents-*.jsonl + manifest.json).")
    output_dir: Path = required("Directory for tokenized-NNNNN.arrow shards and manifest.json.")
    vocab_path: Path = required("BERT vocab.txt (e.g. Google's Chinese vocab, or one built by build-vocab).")
    do_lower_case: bool = option(True, "Lower-case and strip accents, as BertTokenizer(do_lower_case=True).")
    processes_num: int = option(1, "Worker processes; the output is the same for any number (UER-py: --processes_num).")
    chunk_documents: int = option(2_000, "Documents per chunk handed to a worker.")
    documents_per_shard: int = option(50_000, "Documents (rows) per output shard.")
    batch_rows: int = option(2_000, "Rows per Arrow record batch.")
    max_unk_ratio: float = option(0.05, "Stop (writing nothing) when more than this share of all tokens is [UNK]: "
                                  "the vocab does not fit the corpus. The share is recorded in the manifest.")
    progress: bool = option(True, "Show a progress bar.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.input_dir, self.output_dir, self.vocab_path = map(Path, (self.input_dir, self.output_dir, self.vocab_path))
        if not 0.0 <= self.max_unk_ratio <= 1.0:
            raise UserError(f"--max_unk_ratio {self.max_unk_ratio} must lie in [0, 1]")
        if min(self.documents_per_shard, self.batch_rows, self.processes_num, self.chunk_documents) <= 0:
            raise UserError("--documents_per_shard, --batch_rows, --processes_num, --chunk_documents must be positive")


def sentences_array(encoded: EncodedDocuments, id_type: pa.DataType) -> pa.ListArray:
    """``list<list<id>>`` of the documents that have sentences, straight from the flat buffers."""
    inner_offsets = np.zeros(len(encoded.sentence_lengths) + 1, dtype=np.int32)
    np.cumsum(encoded.sentence_lengths, out=inner_offsets[1:])
    counts = encoded.sentences_per_document[encoded.sentences_per_document > 0]
    outer_offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=outer_offsets[1:])
    ids = arrow_array(encoded.ids, id_type)
    return pa.ListArray.from_arrays(arrow_array(outer_offsets, pa.int32()),
                                    pa.ListArray.from_arrays(arrow_array(inner_offsets, pa.int32()), ids))


# (shard, number of its first line, JSONL lines) in; (encoded documents, the lines' bytes, [UNK] count) out
Chunk = tuple[Path, int, list[bytes]]
ChunkResult = tuple[EncodedDocuments, int, int]

_worker: dict = {}


def _init_worker(encoder: BertWordPieceEncoder) -> None:
    # Forked workers inherit the parent's encoder, its kernel tables and the loaded kernel (none is
    # rebuilt per worker); under spawn the encoder arrives pickled.
    _worker["encoder"] = encoder


def _tokenize_chunk(chunk: Chunk) -> ChunkResult:
    """The documents of one chunk of JSONL lines, the chunk's size in bytes and its [UNK] count."""
    path, first_line, lines = chunk
    encoder = _worker["encoder"]
    try:  # the whole chunk as one JSON array: one parser call instead of one per line
        records = json.loads(b"[" + b",".join(lines) + b"]")
        if len(records) != len(lines):
            raise ValueError("a line held more than one value")
        texts = [record["text"] for record in records]
    except (ValueError, KeyError, TypeError):
        texts = [_document_text(path, line_number, line) for line_number, line in enumerate(lines, start=first_line)]
    encoded = encoder.encode_documents(texts)
    return encoded, sum(map(len, lines)), int(np.count_nonzero(encoded.ids == encoder.unk_id))


def _document_text(path: Path, line_number: int, line: bytes) -> str:
    try:
        return json.loads(line)["text"]
    except (ValueError, KeyError, TypeError) as error:  # the shard's sha256 matched: a foreign manifest
        raise UserError(f"{path}:{line_number}: not a {{'text': ...}} line ({error}); re-run clean") from error


def _read_chunks(paths: list[Path], chunk_documents: int) -> Iterator[Chunk]:
    for path in paths:
        with open(path, "rb") as handle:
            first_line = 1
            # islice collects the lines in C: a Python loop appending them cost ~1/4 of this process's time
            while lines := list(islice(handle, chunk_documents)):
                yield path, first_line, lines
                first_line += len(lines)


class TokenizeStage(DataStage[Chunk, ChunkResult]):
    """The tokenize stage's parts for :func:`run_data_stage`."""

    name, shard_prefix = STAGE, "tokenized"

    def __init__(self, config: TokenizeConfig) -> None:
        self.config = config
        self.clean_manifest = read_manifest(config.input_dir, "clean")
        self.encoder = load_encoder(config.vocab_path, config.do_lower_case)
        self.output_dir, self.overwrite, self.processes = config.output_dir, config.overwrite, config.processes_num
        self.inputs = {"--input_dir": config.input_dir, "--vocab_path": config.vocab_path}
        self.id_type = id_type_for_vocab(self.encoder.vocab_size)

    def check_inputs(self) -> None:
        self.input_paths = shard_paths(self.config.input_dir, self.clean_manifest)  # each checked against it
        notice_if_pure_python(STAGE)

    def start(self, staging: Path, resources: ExitStack) -> None:
        config = self.config
        schema = pa.schema([pa.field("sentences", pa.list_(pa.list_(self.id_type)))])
        self.writer = RollingShardWriter(staging, self.shard_prefix, schema, config.documents_per_shard,
                                         config.batch_rows)
        self.read = self.unknown = self.no_tokens = 0
        self.started = time.perf_counter()
        self.total_bytes = sum(path.stat().st_size for path in self.input_paths)
        self.bar = tqdm(total=self.total_bytes / 1e6, desc="tokenize", unit=" MB", disable=not config.progress,
                        file=sys.stderr, mininterval=1.0,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}, {rate_fmt}]")

    def work_items(self) -> Iterator[Chunk]:
        return _read_chunks(self.input_paths, self.config.chunk_documents)

    def worker(self) -> Worker[Chunk, ChunkResult]:
        self.encoder.encode_documents(["。"])  # tables and compiled kernel ready before the workers fork
        return Worker(_tokenize_chunk, _init_worker, (self.encoder,))

    def consume(self, result: ChunkResult) -> None:
        encoded, chunk_bytes, chunk_unknown = result
        self.unknown += chunk_unknown
        counts = encoded.sentences_per_document
        self.read += len(counts)
        kept_counts = counts[counts > 0]
        self.no_tokens += len(counts) - len(kept_counts)
        if len(kept_counts):
            document_ends = np.cumsum(kept_counts)  # in sentences
            sentence_ends = np.cumsum(encoded.sentence_lengths, dtype=np.int64)
            tokens = np.diff(sentence_ends[document_ends - 1], prepend=0)
            self.writer.add_columns({"sentences": sentences_array(encoded, self.id_type)},
                                    {"sentences": kept_counts, "tokens": tokens})
        self.bar.update(chunk_bytes / 1e6)

    def finish(self, staging: Path) -> TokenizeManifest:
        config = self.config
        dropped = {"no_tokens": self.no_tokens} if self.no_tokens else {}
        shards = [TokenizedShard(**shard) for shard in self.writer.close()]
        self.bar.close()
        kept = sum(shard.rows for shard in shards)
        check_accounted(STAGE, self.read, kept, dropped)
        if self.read != self.clean_manifest.counts.documents_kept:
            raise UserError(f"{config.input_dir} holds {self.read} documents but its manifest counts "
                            f"{self.clean_manifest.counts.documents_kept} kept; re-run the clean stage")
        if kept == 0:
            raise UserError(f"no document of {config.input_dir} produced any token; check the vocab and the input")
        tokens = sum(shard.tokens for shard in shards)
        self.unk_ratio = self.unknown / max(1, tokens)
        if self.unk_ratio > config.max_unk_ratio:
            raise UserError(f"{self.unk_ratio:.1%} of the tokens are [UNK] under {config.vocab_path} (limit "
                            f"--max_unk_ratio {config.max_unk_ratio}); nothing was written: use a vocab that covers "
                            "the corpus (zh-build-vocab builds one) or raise --max_unk_ratio")
        shutil.copyfile(config.vocab_path, staging / VOCAB_FILE)
        vocab = VocabRecord(file=VOCAB_FILE, source=str(config.vocab_path), sha256=file_sha256(staging / VOCAB_FILE),
                            size=self.encoder.vocab_size, special_token_ids=self.encoder.special_ids)
        counts = TokenizeCounts(documents_read=self.read, documents_kept=kept, documents_dropped=dropped,
                                sentences=sum(shard.sentences for shard in shards), tokens=tokens,
                                unk_tokens=self.unknown, unk_ratio=round(self.unk_ratio, 6))
        return TokenizeManifest(
            config=config_to_dict(config), input_manifest_sha256=file_sha256(config.input_dir / MANIFEST), vocab=vocab,
            tokenizer={"class": "BertTokenizer", "do_lower_case": config.do_lower_case, "add_special_tokens": False},
            id_type=str(self.id_type), counts=counts, shards=shards)

    def summary(self, manifest: TokenizeManifest) -> str:
        seconds = time.perf_counter() - self.started
        counts = manifest.counts
        return (f"tokenize: {counts.documents_kept} documents, {counts.sentences} sentences, {counts.tokens} tokens "
                f"({self.unk_ratio:.2%} [UNK]) in {len(manifest.shards)} shards "
                f"({self.total_bytes / 1e6 / seconds:.1f} MB/s) -> {self.config.output_dir}")


def tokenize(config: TokenizeConfig) -> dict:
    """Run the tokenize stage; returns the manifest it wrote."""
    return run_data_stage(TokenizeStage(config))


def main(argv: list[str] | None = None) -> int:
    return run_stage(tokenize, TokenizeConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
