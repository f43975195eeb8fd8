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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.cli import UserError, config_to_dict, option, required, run_stage, write_json_atomic
from data_tools.sentences import split_sentences
from data_tools.shards import RollingShardWriter, id_type_for_vocab, list_array, load_manifest, shard_paths
from data_tools.wordpiece import BertWordPieceEncoder, file_sha256

STAGE = "tokenize"
VOCAB_FILE = "vocab.txt"


@dataclass(kw_only=True)
class TokenizeConfig:
    """Split documents into sentences and turn them into BERT WordPiece ids."""

    input_dir: Path = required("Output directory of the clean stage (documents-*.jsonl + manifest.json).")
    output_dir: Path = required("Directory for tokenized-NNNNN.arrow shards and manifest.json.")
    vocab_path: Path = required("BERT vocab.txt (e.g. Google's Chinese vocab, or one built by build-vocab).")
    do_lower_case: bool = option(True, "Lower-case and strip accents, as BertTokenizer(do_lower_case=True).")
    documents_per_shard: int = option(50_000, "Documents (rows) per output shard.")
    batch_rows: int = option(2_000, "Rows per Arrow record batch.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self.input_dir, self.output_dir, self.vocab_path = map(Path, (self.input_dir, self.output_dir, self.vocab_path))
        if not self.vocab_path.is_file():
            raise UserError(f"vocab {self.vocab_path} not found; pass --vocab_path or build one with build-vocab")
        if self.documents_per_shard <= 0 or self.batch_rows <= 0:
            raise UserError("--documents_per_shard and --batch_rows must be positive")


def sentences_array(documents: list[list[list[int]]], id_type: pa.DataType) -> pa.ListArray:
    """``list<list<id>>`` from documents given as lists of sentences of ids."""
    flat_sentences = [sentence for document in documents for sentence in document]
    inner = list_array(flat_sentences, id_type)
    outer_offsets = np.zeros(len(documents) + 1, dtype=np.int32)
    np.cumsum([len(d) for d in documents], out=outer_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(outer_offsets, pa.int32()), inner)


def tokenize_document(text: str, encoder: BertWordPieceEncoder) -> list[list[int]]:
    """Sentences of one document as ids; sentences with no tokens are left out."""
    sentences = (encoder.encode(sentence) for sentence in split_sentences(text))
    return [ids for ids in sentences if ids]


def tokenize(config: TokenizeConfig) -> dict:
    clean_manifest = load_manifest(config.input_dir, "clean")
    inputs = shard_paths(config.input_dir, clean_manifest)
    try:
        encoder = BertWordPieceEncoder(config.vocab_path, do_lower_case=config.do_lower_case)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config.vocab_path}: {error}") from error
    id_type = id_type_for_vocab(encoder.vocab_size)
    schema = pa.schema([pa.field("sentences", pa.list_(pa.list_(id_type)))])
    config.output_dir.mkdir(parents=True, exist_ok=True)
    writer = RollingShardWriter(
        config.output_dir, "tokenized", schema, config.documents_per_shard, config.batch_rows,
        to_columns=lambda documents: {"sentences": sentences_array(documents, id_type)},
        row_stats=lambda document: {"sentences": len(document), "tokens": sum(map(len, document))},
    )
    dropped: Counter[str] = Counter()
    read = 0
    bar = tqdm(desc="tokenize", unit=" docs", disable=not config.progress, file=sys.stderr, mininterval=1.0)
    for input_path in inputs:
        with open(input_path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                read += 1
                bar.update(1)
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as error:
                    raise UserError(
                        f"{input_path}:{line_number}: not a {{'text': ...}} line ({error}); re-run clean"
                    ) from error
                document = tokenize_document(text, encoder)
                if document:
                    writer.add(document)
                else:
                    dropped["no_tokens"] += 1
    shards = writer.close()
    bar.close()

    kept = sum(shard["rows"] for shard in shards)
    if kept + sum(dropped.values()) != read:
        raise AssertionError("tokenize lost documents without counting them")
    if kept == 0:
        raise UserError(f"no document of {config.input_dir} produced any token; check the vocab and the input")
    shutil.copyfile(config.vocab_path, config.output_dir / VOCAB_FILE)
    manifest = {
        "stage": STAGE,
        "config": config_to_dict(config),
        "input_manifest_sha256": file_sha256(config.input_dir / "manifest.json"),
        "vocab": {
            "file": VOCAB_FILE,
            "source": str(config.vocab_path),
            "sha256": file_sha256(config.vocab_path),
            "size": encoder.vocab_size,
            "special_token_ids": encoder.special_ids,
        },
        "tokenizer": {"class": "BertTokenizer", "do_lower_case": config.do_lower_case, "add_special_tokens": False},
        "id_type": str(id_type),
        "counts": {
            "documents_read": read,
            "documents_kept": kept,
            "documents_dropped": dict(dropped),
            "sentences": sum(s["sentences"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        },
        "shards": shards,
    }
    write_json_atomic(config.output_dir / "manifest.json", manifest)
    counts = manifest["counts"]
    print(
        f"tokenize: {kept} documents, {counts['sentences']} sentences, {counts['tokens']} tokens "
        f"in {len(shards)} shards -> {config.output_dir}",
        file=sys.stderr,
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(tokenize, TokenizeConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
