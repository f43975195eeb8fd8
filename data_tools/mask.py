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

import dataclasses
import functools
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.cli import check_field_types, config_to_dict, option, required, run_stage
from data_tools.compiled import COMPILED, notice_if_pure_python
from data_tools.common import VOCAB_FILE, UserError, file_sha256, write_json_atomic
from data_tools.noising import (
    BartNoiseConfig,
    SpecialIds,
    VocabInfo,
    bart_examples_of_documents,
    build_bart_example,
    build_gsg_example,
    gsg_examples_of_documents,
    pack_sentences,
    select_gap_sentences,
)
from data_tools.outputs import overwrite_option, staged_dir
from data_tools.parallel import ordered_map
from data_tools.random_streams import LazyGenerator
from data_tools.shards import (
    DocumentBlock,
    RollingShardWriter,
    check_stage_output,
    checked_vocab_file,
    columns_from_sequences,
    id_type_for_vocab,
    iter_document_blocks,
    list_column,
    load_manifest,
    shard_paths,
)

STAGE = "mask"
# Longer than any position table of a BART/PEGASUS config; guards against a mistyped length.
MAX_SEQ_LENGTH = 1 << 16


# Recipes that reproduce published models, applied to every flag left at its default.
PRESETS: dict[str, dict] = {
    # UER-py's BART recipe for uer/bart-chinese-4-768-cluecorpussmall (--span_masking
    # --span_max_length 3): ~15% of tokens in spans of geometric length (p 0.2) capped at 3,
    # each span 80% [MASK] / 10% random / 10% unchanged, consecutive [MASK]s collapsed,
    # sentences shuffled within each packed chunk.
    "uer_bart": dict(target="bart", mask_ratio=0.15, span_distribution="geometric", geometric_p=0.2,
                     max_span_length=3, replace_length=-1, random_ratio=0.1, keep_ratio=0.1, collapse_masks=True,
                     permute_sentence_ratio=1.0, whole_word_mask=False),
    # UER-py's gap-sentence generation for uer/pegasus-base-chinese-cluecorpussmall: 30% of
    # sentences at random, never the last, each replaced by one [MASK].
    "uer_gsg": dict(target="gsg", gap_sentence_ratio=0.3, sentence_selection_strategy="random",
                    keep_last_sentence=True, gap_action="mask"),
    # BART paper (Lewis et al. 2020, §2.2 and §5): text infilling, 30% of tokens, Poisson(3)
    # spans, one [MASK] per span, all sentences permuted; 10% of spans random tokens as in
    # fairseq's published pretraining arguments (mask_random 0.1).
    "bart_paper": dict(target="bart", mask_ratio=0.3, span_distribution="poisson", poisson_lambda=3.0,
                       replace_length=1, random_ratio=0.1, keep_ratio=0.0, collapse_masks=False,
                       permute_sentence_ratio=1.0, whole_word_mask=True),
    # PEGASUS paper (Zhang et al. 2020, §3.1, §6.1): 30% gap sentences chosen as principal
    # sentences, scored independently, ROUGE-1 F1 with n-grams counted with repetition.
    "pegasus_paper": dict(target="gsg", gap_sentence_ratio=0.3, sentence_selection_strategy="principal",
                          rouge_mode="independent", rouge_unique=False, gap_action="mask"),
}


@dataclass(kw_only=True)
class MaskConfig:
    """Build BART (text infilling) or PEGASUS (gap sentence) training examples."""

    input_dir: Path = required("Output directory of the tokenize stage.")
    output_dir: Path = required("Directory for examples-NNNNN.arrow shards and manifest.json.")
    target: Literal["", "bart", "gsg"] = option(
        "", "bart: span infilling + sentence permutation; gsg: gap sentences (set by --preset when given).")
    preset: Literal["", "uer_bart", "uer_gsg", "bart_paper", "pegasus_paper"] = option(
        "", "A published recipe; it sets every flag below that is left at its default (see README).")
    seq_length: int = option(512, "Maximum source length in tokens, [CLS] and [SEP] included.")
    tgt_seq_length: int = option(128, "Maximum target length for gsg, [SEP] included (bart targets follow seq_length).")
    mask_ratio: float = option(0.3, "bart: share of words (or tokens) covered by corrupted spans.")
    span_distribution: Literal["poisson", "geometric"] = option("poisson", "bart: span length distribution.")
    poisson_lambda: float = option(3.0, "bart: mean span length for poisson spans.")
    geometric_p: float = option(0.2, "bart: p of geometric spans (UER-py's span masking).")
    max_span_length: int = option(10, "bart: cap on geometric span lengths (UER-py: --span_max_length).")
    replace_length: int = option(1, "bart: 1 = one [MASK] per span, 0 = delete the span, -1 = a [MASK] per token.")
    random_ratio: float = option(0.1, "bart: share of spans replaced by random tokens instead of [MASK].")
    keep_ratio: float = option(0.0, "bart: share of spans left unchanged.")
    collapse_masks: bool = option(False, "bart: merge consecutive [MASK]s into one (UER-py).")
    permute_sentence_ratio: float = option(1.0, "bart: share of a chunk's sentences that are permuted.")
    rotate_ratio: float = option(0.0, "bart: probability of rotating the source to start at a random token.")
    insert_ratio: float = option(0.0, "bart: random tokens inserted, as a share of the source length.")
    whole_word_mask: bool = option(True, "bart: spans cover whole words (a Latin word's ## pieces together).")
    gap_sentence_ratio: float = option(0.3, "gsg: share of sentences selected as gaps.")
    sentence_selection_strategy: Literal["random", "lead", "principal"] = option(
        "random", "gsg: how gap sentences are chosen; principal = top ROUGE-1 F1 against the rest (PEGASUS).")
    rouge_mode: Literal["independent", "sequential"] = option(
        "independent", "gsg principal: score sentences independently, or add them one at a time.")
    rouge_unique: bool = option(False, "gsg principal: count n-grams as sets (Uniq) instead of with repetition.")
    keep_last_sentence: bool = option(False, "gsg: never select a chunk's last sentence (UER-py).")
    gap_action: Literal["mask", "remove", "keep", "mixed"] = option(
        "mask", "gsg: a gap sentence becomes one [MASK], is removed, kept, or mixed (80/10/10).")
    dup_factor: int = option(1, "Passes over the corpus, each with different masks (UER-py: --dup_factor).")
    processes_num: int = option(1, "Worker processes; the output is the same for any number (UER-py: --processes_num).")
    chunk_documents: int = option(1_000, "Documents per chunk handed to a worker.")
    seed: int = option(7, "Seed; each (pass, document) derives its own generator from it.")
    examples_per_shard: int = option(200_000, "Examples (rows) per output shard.")
    batch_rows: int = option(5_000, "Rows per Arrow record batch.")
    progress: bool = option(True, "Show a progress bar.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        check_field_types(self)  # the same one-line errors from the CLI, the Python API and online-mask JSON
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        if self.preset:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                if name == "target" and self.target and self.target != value:
                    raise UserError(f"--preset {self.preset} is for --target {value}, not {self.target}")
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        if not self.target:
            raise UserError("give --target bart|gsg or a --preset")
        if not 8 <= self.seq_length <= MAX_SEQ_LENGTH or not 2 <= self.tgt_seq_length <= MAX_SEQ_LENGTH:
            raise UserError(f"--seq_length {self.seq_length} must lie in [8, {MAX_SEQ_LENGTH}] and --tgt_seq_length "
                            f"{self.tgt_seq_length} in [2, {MAX_SEQ_LENGTH}]")
        for name in ("mask_ratio", "gap_sentence_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserError(f"--{name} {getattr(self, name)} must lie strictly between 0 and 1")
        for name in ("random_ratio", "keep_ratio", "permute_sentence_ratio", "rotate_ratio", "insert_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name} {getattr(self, name)} must lie in [0, 1]")
        if self.random_ratio + self.keep_ratio > 1:
            raise UserError(f"--random_ratio {self.random_ratio} + --keep_ratio {self.keep_ratio} must be at most 1")
        if not 0.0 < self.geometric_p <= 1.0:
            raise UserError(f"--geometric_p {self.geometric_p} must lie in (0, 1]")
        if self.replace_length not in (-1, 0, 1):
            raise UserError(f"--replace_length {self.replace_length} must be -1, 0 or 1")
        positive = ("poisson_lambda", "dup_factor", "max_span_length", "examples_per_shard", "processes_num",
                    "chunk_documents", "batch_rows")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name)} must be positive")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} must be >= 0")

    @functools.cached_property
    def bart_noise(self) -> BartNoiseConfig:
        """The noising flags as one frozen config, built once (per chunk it cost as much as the kernel)."""
        return BartNoiseConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BartNoiseConfig)})


# (source_ids, target_ids): int64 arrays from BART's kernel, lists from PEGASUS's functions
Example = tuple[np.ndarray | list[int], np.ndarray | list[int]]


def document_rng(seed: int, pass_index: int, document_index: int) -> np.random.Generator:
    """The generator for one document in one pass, independent of worker layout."""
    return LazyGenerator([seed, pass_index, document_index])  # type: ignore[return-value]


def mask_chunk(
    chunk: list[list[int]], rng: np.random.Generator, config: MaskConfig, vocab: VocabInfo
) -> Example | None:
    """One (source_ids, target_ids) example from one packed chunk; None for a gsg chunk
    of a single sentence, which leaves nothing to condition on."""
    if config.target == "bart":
        return build_bart_example(chunk, rng, config.bart_noise, vocab, config.seq_length)
    if len(chunk) < 2:
        return None
    selected = select_gap_sentences(
        chunk, config.gap_sentence_ratio, config.sentence_selection_strategy, rng,
        rouge_mode=config.rouge_mode, rouge_unique=config.rouge_unique, keep_last=config.keep_last_sentence,
    )
    return build_gsg_example(chunk, selected, vocab.special, config.tgt_seq_length, rng, config.gap_action)


def mask_document(
    sentences: list[list[int]], rng: np.random.Generator, config: MaskConfig, vocab: VocabInfo
) -> tuple[list[Example], str | None]:
    """All examples of one document, or none and the reason it was skipped."""
    built = (mask_chunk(chunk, rng, config, vocab) for chunk in pack_sentences(sentences, config.seq_length - 2))
    examples = [example for example in built if example is not None]
    return examples, (None if examples or config.target == "bart" else "fewer_than_two_sentences")


def load_vocab_info(tokenized_dir: Path, manifest: dict) -> VocabInfo:
    """The vocab facts noising needs, from the vocab.txt the tokenize stage copied (checked against its sha256)."""
    vocab_path = checked_vocab_file(tokenized_dir, manifest)
    special = SpecialIds.from_manifest(manifest["vocab"]["special_token_ids"])
    tokens = vocab_path.read_text(encoding="utf-8").split("\n")[: manifest["vocab"]["size"]]
    return VocabInfo.from_tokens(tokens, special)


_worker: dict = {}


def _init_worker(config: MaskConfig, vocab: VocabInfo) -> None:
    _worker.update(config=config, vocab=vocab)


Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # source values, offsets; target values, offsets


def mask_block(block: DocumentBlock, pass_index: int, config: MaskConfig, vocab: VocabInfo,
               compiled: bool = COMPILED) -> tuple[Columns, Counter]:
    """The examples of a block of documents as flat columns, and the documents skipped by reason.

    Each document's randomness depends only on (seed, pass, document index), so blocks and worker
    count never change the output. Compiled, BART and the PEGASUS recipes that draw nothing
    (principal or lead gaps, masked, removed or kept) take the whole block in one kernel call from
    Arrow's buffers; the others (random gaps, mixed actions) and every recipe without numba go
    document by document through :func:`mask_document`: the same examples.
    """
    if config.target == "bart" and compiled:
        return bart_examples_of_documents(block.document_offsets, block.sentence_offsets, block.ids,
                                          block.first_document, [config.seed, pass_index], config.bart_noise, vocab,
                                          config.seq_length), Counter()
    if (config.target == "gsg" and compiled and config.sentence_selection_strategy in ("lead", "principal")
            and config.gap_action != "mixed"):  # recipes that draw nothing
        *columns, per_document = gsg_examples_of_documents(
            block.document_offsets, block.sentence_offsets, block.ids, config.sentence_selection_strategy,
            config.gap_sentence_ratio, config.keep_last_sentence, config.rouge_mode, config.rouge_unique,
            config.gap_action, vocab.special, vocab.size, config.seq_length, config.tgt_seq_length)
        without = int(np.count_nonzero(per_document == 0))
        return tuple(columns), Counter({"fewer_than_two_sentences": without} if without else {})
    examples, skipped = [], Counter()
    for document_index, sentences in enumerate(block.document_lists(), start=block.first_document):
        built, reason = mask_document(sentences, document_rng(config.seed, pass_index, document_index), config, vocab)
        examples.extend(built)
        if reason:
            skipped[reason] += 1
    source = columns_from_sequences([s for s, _ in examples], pa.int64())
    target = columns_from_sequences([t for _, t in examples], pa.int64())
    return (*source, *target), skipped


def _mask_block(work: tuple[int, DocumentBlock]) -> tuple[Columns, Counter, int]:
    pass_index, block = work
    columns, skipped = mask_block(block, pass_index, _worker["config"], _worker["vocab"])
    return columns, skipped, len(block)


def mask(config: MaskConfig) -> dict:
    tokenized = load_manifest(config.input_dir, "tokenize")
    vocab = load_vocab_info(config.input_dir, tokenized)
    check_stage_output(config.output_dir, STAGE, "examples", config.overwrite, {"--input_dir": config.input_dir})
    shard_paths(config.input_dir, tokenized)  # every shard checked against the manifest before masking starts
    notice_if_pure_python(STAGE)
    with staged_dir(config.output_dir) as staging:
        manifest = _mask_into(staging, tokenized, vocab, config)
    return manifest


def _mask_into(staging: Path, tokenized: dict, vocab: VocabInfo, config: MaskConfig) -> dict:
    id_type = id_type_for_vocab(tokenized["vocab"]["size"])
    schema = pa.schema([pa.field("source_ids", pa.list_(id_type)), pa.field("target_ids", pa.list_(id_type))])
    writer = RollingShardWriter(staging, "examples", schema, config.examples_per_shard, config.batch_rows)
    skipped: Counter[str] = Counter()
    documents = tokenized["counts"]["documents_kept"]
    bar = tqdm(
        total=documents * config.dup_factor, desc=f"mask {config.target}", unit=" docs",
        disable=not config.progress, file=sys.stderr, mininterval=1.0,
    )
    work = ((pass_index, block) for pass_index in range(config.dup_factor)
            for block in iter_document_blocks(config.input_dir, tokenized, "sentences", config.chunk_documents,
                                              checksum=False))
    read = longest_source = longest_target = 0
    for (source_values, source_offsets, target_values, target_offsets), block_skipped, block_documents in ordered_map(
        _mask_block, work, config.processes_num, initializer=_init_worker, initargs=(config, vocab)
    ):
        bar.update(block_documents)
        read += block_documents
        skipped.update(block_skipped)
        if len(source_offsets) > 1:
            source_lengths, target_lengths = np.diff(source_offsets), np.diff(target_offsets)
            writer.add_columns({"source_ids": list_column(source_values, source_offsets, id_type),
                                "target_ids": list_column(target_values, target_offsets, id_type)},
                               {"source_tokens": source_lengths, "target_tokens": target_lengths})
            longest_source = max(longest_source, int(source_lengths.max()))
            longest_target = max(longest_target, int(target_lengths.max()))
    shards = writer.close()
    bar.close()

    if read != documents * config.dup_factor:
        raise UserError(f"{config.input_dir} holds {read // config.dup_factor} documents but its manifest counts "
                        f"{documents}; re-run the tokenize stage")
    total = sum(shard["rows"] for shard in shards)
    if total == 0:
        raise UserError(
            f"no examples built from {config.input_dir} (skipped: {dict(skipped)}); "
            "gsg needs documents of at least two sentences"
        )
    shutil.copyfile(config.input_dir / VOCAB_FILE, staging / VOCAB_FILE)
    manifest = {
        "stage": STAGE,
        "target": config.target,
        "preset": config.preset or None,
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
            "max_source_length": longest_source,  # the trainer checks them against the model's positions
            "max_target_length": longest_target,
        },
        "shards": shards,
    }
    write_json_atomic(staging / "manifest.json", manifest)
    print(f"mask: {total} {config.target} examples in {len(shards)} shards -> {config.output_dir}", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(mask, MaskConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
