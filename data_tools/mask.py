"""Stage 3, mask: tokenized documents in, (source_ids, target_ids) example shards out.

``--target bart``: consecutive sentences of a document are packed up to
``--seq_length``; each chunk gets sentence permutation and text infilling (Poisson
span lengths, one [MASK] per span); the target is the original chunk.
``--target gsg``: PEGASUS gap-sentence generation; the selected sentences become one
[MASK] each and form the target.

Randomness is seeded per (seed, pass, document), so the output does not depend on how
the work is split, and ``--dup_factor N`` writes N passes with different masks.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.cli import UserError, config_to_dict, option, required, run_stage, write_json_atomic
from data_tools.noising import (
    BartNoiseConfig,
    SpecialIds,
    build_bart_example,
    build_gsg_example,
    pack_sentences,
    select_gap_sentences,
)
from data_tools.shards import RollingShardWriter, id_type_for_vocab, iter_rows, list_array, load_manifest
from data_tools.tokenize_shards import VOCAB_FILE
from data_tools.wordpiece import file_sha256

STAGE = "mask"


@dataclass(kw_only=True)
class MaskConfig:
    """Build BART (text infilling) or PEGASUS (gap sentence) training examples."""

    input_dir: Path = required("Output directory of the tokenize stage.")
    output_dir: Path = required("Directory for examples-NNNNN.arrow shards and manifest.json.")
    target: Literal["bart", "gsg"] = required("bart: span infilling + sentence permutation; gsg: gap sentences.")
    seq_length: int = option(512, "Maximum source length in tokens, [CLS] and [SEP] included.")
    tgt_seq_length: int = option(128, "Maximum target length for gsg, [SEP] included (bart targets follow seq_length).")
    mask_ratio: float = option(0.3, "bart: share of tokens covered by masked spans.")
    poisson_lambda: float = option(3.0, "bart: mean span length (Poisson).")
    permute_sentences: bool = option(True, "bart: shuffle the sentences of each chunk before infilling.")
    gap_sentence_ratio: float = option(0.3, "gsg: share of sentences selected as gaps.")
    sentence_selection_strategy: Literal["random", "lead"] = option("random", "gsg: how gap sentences are chosen.")
    dup_factor: int = option(1, "Passes over the corpus, each with different masks.")
    seed: int = option(7, "Seed; each (pass, document) derives its own generator from it.")
    examples_per_shard: int = option(200_000, "Examples (rows) per output shard.")
    batch_rows: int = option(5_000, "Rows per Arrow record batch.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        if self.seq_length < 8 or self.tgt_seq_length < 2:
            raise UserError(f"--seq_length {self.seq_length} / --tgt_seq_length {self.tgt_seq_length} are too small")
        for name in ("mask_ratio", "gap_sentence_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserError(f"--{name} {getattr(self, name)} must lie strictly between 0 and 1")
        if self.poisson_lambda <= 0 or self.dup_factor < 1 or self.examples_per_shard < 1:
            raise UserError("--poisson_lambda, --dup_factor and --examples_per_shard must be positive")


def document_rng(seed: int, pass_index: int, document_index: int) -> np.random.Generator:
    """The generator for one document in one pass, independent of worker layout."""
    return np.random.default_rng([seed, pass_index, document_index])


def mask_document(
    sentences: list[list[int]], rng: np.random.Generator, config: MaskConfig, special: SpecialIds
) -> tuple[list[tuple[list[int], list[int]]], str | None]:
    """All examples of one document, or none and the reason it was skipped."""
    chunks = pack_sentences(sentences, config.seq_length - 2)
    examples = []
    if config.target == "bart":
        noise = BartNoiseConfig(config.mask_ratio, config.poisson_lambda, config.permute_sentences)
        examples = [build_bart_example(chunk, rng, noise, special, config.seq_length) for chunk in chunks]
        return examples, None
    for chunk in chunks:
        if len(chunk) < 2:
            continue  # one sentence leaves nothing to condition on
        selected = select_gap_sentences(len(chunk), config.gap_sentence_ratio, config.sentence_selection_strategy, rng)
        examples.append(build_gsg_example(chunk, selected, special, config.tgt_seq_length))
    return examples, (None if examples else "fewer_than_two_sentences")


def mask(config: MaskConfig) -> dict:
    tokenized = load_manifest(config.input_dir, "tokenize")
    special = SpecialIds.from_manifest(tokenized["vocab"]["special_token_ids"])
    id_type = id_type_for_vocab(tokenized["vocab"]["size"])
    schema = pa.schema([pa.field("source_ids", pa.list_(id_type)), pa.field("target_ids", pa.list_(id_type))])
    config.output_dir.mkdir(parents=True, exist_ok=True)
    writer = RollingShardWriter(
        config.output_dir, "examples", schema, config.examples_per_shard, config.batch_rows,
        to_columns=lambda examples: {"source_ids": list_array([s for s, _ in examples], id_type),
                                     "target_ids": list_array([t for _, t in examples], id_type)},
        row_stats=lambda example: {"source_tokens": len(example[0]), "target_tokens": len(example[1])},
    )
    skipped: Counter[str] = Counter()
    documents = tokenized["counts"]["documents_kept"]
    bar = tqdm(
        total=documents * config.dup_factor, desc=f"mask {config.target}", unit=" docs",
        disable=not config.progress, file=sys.stderr, mininterval=1.0,
    )
    for pass_index in range(config.dup_factor):
        for document_index, sentences in enumerate(iter_rows(config.input_dir, tokenized, "sentences")):
            bar.update(1)
            rng = document_rng(config.seed, pass_index, document_index)
            examples, reason = mask_document(sentences, rng, config, special)
            if reason:
                skipped[reason] += 1
            for example in examples:
                writer.add(example)
    shards = writer.close()
    bar.close()

    total = sum(shard["rows"] for shard in shards)
    if total == 0:
        raise UserError(
            f"no examples built from {config.input_dir} (skipped: {dict(skipped)}); "
            "gsg needs documents of at least two sentences"
        )
    shutil.copyfile(config.input_dir / VOCAB_FILE, config.output_dir / VOCAB_FILE)
    manifest = {
        "stage": STAGE,
        "target": config.target,
        "config": config_to_dict(config),
        "input_manifest_sha256": file_sha256(config.input_dir / "manifest.json"),
        "vocab": tokenized["vocab"],
        "id_type": str(id_type),
        "counts": {
            "documents_per_pass": documents,
            "document_passes": documents * config.dup_factor,
            "document_passes_skipped": dict(skipped),
            "examples": total,
            "source_tokens": sum(s["source_tokens"] for s in shards),
            "target_tokens": sum(s["target_tokens"] for s in shards),
        },
        "shards": shards,
    }
    write_json_atomic(config.output_dir / "manifest.json", manifest)
    print(f"mask: {total} {config.target} examples in {len(shards)} shards -> {config.output_dir}", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(mask, MaskConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
