"""Stage 3, mask: tokenized documents in, (source_ids, target_ids) example shards out.

``--target bart``: consecutive sentences of a document are packed up to
``--seq_length``; each chunk gets sentence permutation and text infilling (Poisson
span lengths, one [MASK] per span); the target is the original chunk.
``--target gsg``: PEGASUS gap-sentence generation; the selected sentences become one
[MASK] each and form the target.

The masking itself is data_tools.masking's (which the trainer's online masking shares); this module
is the stage around it: flags, reading blocks of documents, worker processes, writing shards.
Randomness is seeded per (seed, pass, document), so the output does not depend on how
the work is split, and ``--dup_factor N`` writes N passes with different masks.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.cli import check_field_types, config_to_dict, option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError, file_sha256
from data_tools.compiled import COMPILED, notice_if_pure_python
from data_tools.masking.blocks import Columns, examples_of_block
from data_tools.masking.recipe import RECIPE_FLAGS, MaskRecipe, recipe_flag
from data_tools.masking.vocab import VocabInfo, load_vocab_info
from data_tools.manifests import MANIFEST, ExampleShard, MaskCounts, MaskManifest, read_manifest
from data_tools.outputs import overwrite_option
from data_tools.shards import (
    DocumentBlock,
    RollingShardWriter,
    id_type_for_vocab,
    iter_document_blocks,
    list_column,
    shard_paths,
)
from data_tools.stage import DataStage, Worker, run_data_stage

STAGE = "mask"


@dataclass(kw_only=True)
class MaskConfig:
    """Build BART (text infilling) or PEGASUS (gap sentence) training examples."""

    input_dir: Path = required("Output directory of the tokenize stage.")
    output_dir: Path = required("Directory for examples-NNNNN.arrow shards and manifest.json.")
    # The recipe's flags (data_tools.masking.recipe.MaskRecipe holds their defaults and help).
    target: Literal["", "bart", "gsg"] = recipe_flag("target")
    preset: Literal["", "uer_bart", "uer_gsg", "bart_paper", "pegasus_paper"] = recipe_flag("preset")
    seq_length: int = recipe_flag("seq_length")
    tgt_seq_length: int = recipe_flag("tgt_seq_length")
    mask_ratio: float = recipe_flag("mask_ratio")
    span_distribution: Literal["poisson", "geometric"] = recipe_flag("span_distribution")
    poisson_lambda: float = recipe_flag("poisson_lambda")
    geometric_p: float = recipe_flag("geometric_p")
    max_span_length: int = recipe_flag("max_span_length")
    replace_length: int = recipe_flag("replace_length")
    random_ratio: float = recipe_flag("random_ratio")
    keep_ratio: float = recipe_flag("keep_ratio")
    collapse_masks: bool = recipe_flag("collapse_masks")
    permute_sentence_ratio: float = recipe_flag("permute_sentence_ratio")
    rotate_ratio: float = recipe_flag("rotate_ratio")
    insert_ratio: float = recipe_flag("insert_ratio")
    whole_word_mask: bool = recipe_flag("whole_word_mask")
    gap_sentence_ratio: float = recipe_flag("gap_sentence_ratio")
    sentence_selection_strategy: Literal["random", "lead", "principal"] = recipe_flag("sentence_selection_strategy")
    rouge_mode: Literal["independent", "sequential"] = recipe_flag("rouge_mode")
    rouge_unique: bool = recipe_flag("rouge_unique")
    keep_last_sentence: bool = recipe_flag("keep_last_sentence")
    gap_action: Literal["mask", "remove", "keep", "mixed"] = recipe_flag("gap_action")
    # How the stage runs and writes (MASK_STAGE_RUN_FLAGS); the seed is the recipe's, left in its place in --help.
    dup_factor: int = option(1, "Passes over the corpus, each with different masks (UER-py: --dup_factor).")
    processes_num: int = option(1, "Worker processes; the output is the same for any number (UER-py: --processes_num).")
    chunk_documents: int = option(1_000, "Documents per chunk handed to a worker.")
    seed: int = recipe_flag("seed")
    examples_per_shard: int = option(200_000, "Examples (rows) per output shard.")
    batch_rows: int = option(5_000, "Rows per Arrow record batch.")
    progress: bool = option(True, "Show a progress bar.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        check_field_types(self)  # the same one-line errors from the CLI, the Python API and online-mask JSON
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        # checks the recipe's flags and applies the preset
        self._recipe = MaskRecipe(**{name: getattr(self, name) for name in RECIPE_FLAGS})
        for name in RECIPE_FLAGS:
            setattr(self, name, getattr(self._recipe, name))  # the manifest records the values used
        for name in ("dup_factor", "examples_per_shard", "processes_num", "chunk_documents", "batch_rows"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name)} must be positive")

    def recipe(self) -> MaskRecipe:
        """What these flags do to a chunk, built with the config: building one checks every flag (~1 ms,
        which per block would cost as much as masking a block of lead gap sentences)."""
        return self._recipe


def mask_block(block: DocumentBlock, pass_index: int, config: MaskConfig, vocab: VocabInfo,
               compiled: bool = COMPILED) -> tuple[Columns, Counter]:
    """The examples of one block of documents in one pass as flat int64 columns, and the documents
    that gave none, by reason: what a worker does with each block (data_tools.masking.blocks)."""
    return examples_of_block(block, pass_index, config.recipe(), vocab, compiled)


_worker: dict = {}


def _init_worker(recipe: MaskRecipe, vocab: VocabInfo) -> None:
    _worker.update(recipe=recipe, vocab=vocab)


def _mask_block(work: tuple[int, DocumentBlock]) -> tuple[Columns, Counter, int]:
    pass_index, block = work
    columns, skipped = examples_of_block(block, pass_index, _worker["recipe"], _worker["vocab"])
    return columns, skipped, len(block)


class MaskStage(DataStage[tuple[int, DocumentBlock], tuple[Columns, Counter, int]]):
    """The mask stage on the shared skeleton (data_tools.stage): blocks of tokenized documents, pass
    after pass, through the masking kernels in worker processes; examples written in input order."""

    name, shard_prefix = STAGE, "examples"

    def __init__(self, config: MaskConfig) -> None:
        self.config = config
        self.tokenized = read_manifest(config.input_dir, "tokenize")
        self.vocab = load_vocab_info(config.input_dir, self.tokenized.to_json())
        self.output_dir, self.overwrite, self.processes = config.output_dir, config.overwrite, config.processes_num
        self.inputs = {"--input_dir": config.input_dir}
        self.id_type = id_type_for_vocab(self.tokenized.vocab.size)

    def check_inputs(self) -> None:
        shard_paths(self.config.input_dir, self.tokenized)  # every shard checked before masking starts
        notice_if_pure_python(STAGE)

    def start(self, staging: Path, resources: ExitStack) -> None:
        config = self.config
        schema = pa.schema([pa.field("source_ids", pa.list_(self.id_type)),
                            pa.field("target_ids", pa.list_(self.id_type))])
        self.writer = RollingShardWriter(staging, self.shard_prefix, schema, config.examples_per_shard,
                                         config.batch_rows)
        self.documents = self.tokenized.counts.documents_kept
        self.skipped: Counter[str] = Counter()
        self.read = 0
        self.bar = resources.enter_context(closing(tqdm(
            total=self.documents * config.dup_factor, desc=f"mask {config.target}", unit=" docs",
            disable=not config.progress, file=sys.stderr, mininterval=1.0)))

    def work_items(self) -> Iterator[tuple[int, DocumentBlock]]:
        config = self.config
        for pass_index in range(config.dup_factor):
            for block in iter_document_blocks(config.input_dir, self.tokenized, "sentences", config.chunk_documents,
                                              checksum=False):  # checked whole in check_inputs
                yield pass_index, block

    def worker(self) -> Worker:
        return Worker(_mask_block, _init_worker, (self.config.recipe(), self.vocab))

    def consume(self, result: tuple[Columns, Counter, int]) -> None:
        (source_values, source_offsets, target_values, target_offsets), block_skipped, block_documents = result
        self.bar.update(block_documents)
        self.read += block_documents
        self.skipped.update(block_skipped)
        if len(source_offsets) > 1:
            self.writer.add_columns({"source_ids": list_column(source_values, source_offsets, self.id_type),
                                     "target_ids": list_column(target_values, target_offsets, self.id_type)},
                                    {"source_tokens": np.diff(source_offsets), "target_tokens": np.diff(target_offsets)})

    def finish(self, staging: Path) -> MaskManifest:
        config = self.config
        shards = [ExampleShard(**shard) for shard in self.writer.close()]
        if self.read != self.documents * config.dup_factor:
            raise UserError(f"{config.input_dir} holds {self.read // config.dup_factor} documents but its manifest "
                            f"counts {self.documents}; re-run the tokenize stage")
        total = sum(shard.rows for shard in shards)
        if total == 0:
            raise UserError(f"no examples built from {config.input_dir} (skipped: {dict(self.skipped)}); "
                            "gsg needs documents of at least two sentences")
        shutil.copyfile(config.input_dir / VOCAB_FILE, staging / VOCAB_FILE)
        counts = MaskCounts(
            documents_per_pass=self.documents, document_passes=self.documents * config.dup_factor,
            document_passes_skipped=dict(self.skipped), examples=total,
            source_tokens=sum(shard.source_tokens for shard in shards),
            target_tokens=sum(shard.target_tokens for shard in shards))
        return MaskManifest(target=config.target, preset=config.preset or None, config=config_to_dict(config),
                            input_manifest_sha256=file_sha256(config.input_dir / MANIFEST),
                            vocab=self.tokenized.vocab, id_type=str(self.id_type), counts=counts, shards=shards)

    def summary(self, manifest: MaskManifest) -> str:
        return (f"mask: {manifest.counts.examples} {self.config.target} examples in {len(manifest.shards)} shards "
                f"-> {self.config.output_dir}")


def mask(config: MaskConfig) -> dict:
    """Run the mask stage; returns the manifest it wrote."""
    return run_data_stage(MaskStage(config))


def main(argv: list[str] | None = None) -> int:
    return run_stage(mask, MaskConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
