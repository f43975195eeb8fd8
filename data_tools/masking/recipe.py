"""What masking does to a chunk: the target, every masking parameter and the seed, as one frozen value.

The mask stage's ``MaskConfig`` (data_tools.mask) adds paths and how the stage runs and builds its
recipe with ``config.recipe()``; online masking builds one from a JSON object of the same flags.
Both go through :class:`MaskRecipe`, so the presets resolve, and bad flags fail, in one place with
the same one-line messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from data_tools.cli import check_field_types, option
from data_tools.common import UserError

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

# zh-mask's flags that steer how the stage runs and writes (passes, workers, shards, progress), not what a
# chunk becomes. A JSON of mask flags for online masking may hold them (one written for zh-mask, or for a run
# started before online masking had its own recipe): they are accepted there and unused.
MASK_STAGE_RUN_FLAGS = frozenset({"dup_factor", "processes_num", "chunk_documents", "examples_per_shard",
                                  "batch_rows", "progress", "overwrite"})


@dataclass(frozen=True, kw_only=True)
class MaskRecipe:
    """How to turn a packed chunk into a (source_ids, target_ids) example: BART (text infilling) or
    PEGASUS (gap sentences). Built with a preset, the preset sets every field left at its default."""

    target: Literal["", "bart", "gsg"] = option(
        "", "bart: span infilling + sentence permutation; gsg: gap sentences (set by --preset when given).")
    # Which preset set the recipe: a record, not a difference (the same values compare equal without it).
    preset: Literal["", "uer_bart", "uer_gsg", "bart_paper", "pegasus_paper"] = dataclasses.field(
        default="", compare=False,
        metadata={"help": "A published recipe; it sets every flag below that is left at its default (see README)."})
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
    seed: int = option(7, "Seed; each (pass, document) derives its own generator from it.")

    def __post_init__(self) -> None:
        check_field_types(self)  # the same one-line errors from the CLI, the Python API and online-mask JSON
        if self.preset:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                if name == "target" and self.target and self.target != value:
                    raise UserError(f"--preset {self.preset} is for --target {value}, not {self.target}")
                if getattr(self, name) == defaults[name]:
                    object.__setattr__(self, name, value)  # frozen once built; the preset fills it in here
        if not self.target:
            raise UserError("give --target bart|gsg or a --preset")
        self._check_ranges()

    def _check_ranges(self) -> None:
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
        for name in ("poisson_lambda", "max_span_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name)} must be positive")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} must be >= 0")

    @property
    def max_chunk_tokens(self) -> int:
        """Tokens of a chunk: the source length less [CLS] and [SEP]."""
        return self.seq_length - 2

    @property
    def min_chunk_sentences(self) -> int:
        """Sentences (pieces) a chunk needs to give an example: gsg needs two, one gap and one to
        condition on, so a single-sentence chunk gives none; bart takes any chunk."""
        return 2 if self.target == "gsg" else 1


RECIPE_FLAGS = tuple(field.name for field in dataclasses.fields(MaskRecipe))


def recipe_flag(name: str) -> Any:
    """A config field for the recipe flag ``name``, with the recipe's default and help text, so a stage
    config that exposes the recipe as flags (``MaskConfig``) declares neither twice."""
    field = MaskRecipe.__dataclass_fields__[name]
    return option(field.default, field.metadata["help"])
