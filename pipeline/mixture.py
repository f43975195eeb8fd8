"""Weighted mixtures of corpora: ``zh-train --data_dirs news:0.6 web:0.3 reviews:0.1``.

Each corpus is a mask stage output (or a tokenized corpus masked online with the run's
``--online_mask_config``); all must share one vocab. The mixture is itself a dataset that the
trainer's sampler draws from like any other, so exact resume, rank splitting and length grouping
need nothing new:

- One *mixture epoch* has ``L`` indices (by default the corpora's training examples together).
  Corpus ``k`` owns a contiguous block of ``c_k`` of them, ``c_k`` its weight's share of ``L``
  rounded by largest remainder (so the blocks add up to ``L`` exactly); the sampler's per-epoch
  permutation interleaves the blocks. Every mixture epoch therefore gives each corpus exactly its
  share, and any stretch of training gives it its share up to sampling noise (``share`` in the
  metrics shows what it got).
- Corpus ``k`` keeps its own order and epochs: its ``g``-th draw over the whole run
  (``g = mixture_epoch * c_k + position in its block``) is example ``permutation_k(g // n_k)
  [g % n_k]`` of its ``n_k`` training examples, the permutation seeded by (seed, k, its epoch).
  A small corpus weighted up is repeated epoch after epoch, each pass in a new order (and, online,
  with fresh masks: its epoch is the masking epoch); a large one weighted down is not exhausted
  before its examples have all been seen once.
- Held-out examples (``--eval_examples N``) are the last examples of each corpus, ``N`` split by
  weight, after the ``L`` training indices.

Like Megatron-LM's blended datasets, the mapping is a pure function of (weights, sizes, seed,
index), computed per example, with no index files and no state beyond the sampler's position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from data_tools.common import UserError

if TYPE_CHECKING:  # only for annotations: TrainConfig parses --data_dirs with this module, and --help stays light
    from pipeline.examples import Seq2SeqExamples


@dataclass(frozen=True)
class MixtureSpec:
    """One ``PATH:WEIGHT`` entry of ``--data_dirs``."""

    path: Path
    weight: float


def parse_mixture(entries: list[str]) -> list[MixtureSpec]:
    """``["work/news:0.6", "work/web:0.4"]`` -> specs; weights need not add up to 1 (they are
    normalized) but must be positive and finite, and each corpus may appear once."""
    specs = []
    for entry in entries:
        path, separator, weight_text = str(entry).rpartition(":")
        if not separator or not path:
            raise UserError(f"--data_dirs {entry!r}: expected PATH:WEIGHT, e.g. work/examples-news:0.6")
        try:
            weight = float(weight_text)
        except ValueError:
            raise UserError(f"--data_dirs {entry!r}: the weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UserError(f"--data_dirs {entry!r}: the weight must be a positive number, got {weight_text}")
        specs.append(MixtureSpec(Path(path), weight))
    if len(specs) < 2:
        raise UserError("--data_dirs needs at least two PATH:WEIGHT entries; for one corpus use --data_dir")
    seen = [spec.path.resolve() for spec in specs]
    if len(set(seen)) != len(seen):
        raise UserError(f"--data_dirs names a corpus twice ({', '.join(map(str, (s.path for s in specs)))})")
    return specs


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights``, adding up to ``total`` exactly."""
    weights_array = np.asarray(weights, dtype=np.float64)
    exact = weights_array / weights_array.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


class MixtureExamples:
    """Several corpora behind one index space: a :class:`~pipeline.examples.CorpusMixture`."""

    def __init__(self, datasets: list[Seq2SeqExamples], specs: list[MixtureSpec], seed: int, eval_examples: int = 0,
                 epoch_examples: int = 0) -> None:
        self.datasets, self.specs, self.seed = datasets, specs, seed
        weights = [spec.weight for spec in specs]
        self.weights = np.asarray(weights) / sum(weights)
        self.held_out = largest_remainder(weights, eval_examples)
        self.train_sizes = [len(dataset) - held for dataset, held in zip(datasets, self.held_out)]
        for spec, size, held in zip(specs, self.train_sizes, self.held_out):
            if size <= 0:
                raise UserError(f"{spec.path}: its share of --eval_examples ({held}) leaves no training examples")
        self.epoch_examples = epoch_examples or sum(self.train_sizes)
        self.block_sizes = largest_remainder(weights, self.epoch_examples)
        if min(self.block_sizes) == 0:
            raise UserError(f"--data_dirs: a weight this small gets no example in a mixture epoch of "
                            f"{self.epoch_examples}; raise it")
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)
        self.eval_starts = np.concatenate([[0], np.cumsum(self.held_out)]).astype(np.int64) + self.epoch_examples
        self.manifest = mixture_manifest(datasets, specs)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.epoch_examples + sum(self.held_out)

    def corpus_of(self, index: int) -> int:
        """Which corpus a mixture index draws from."""
        starts = self.block_starts if index < self.epoch_examples else self.eval_starts
        return int(np.searchsorted(starts, index, side="right") - 1)

    def locate(self, index: int, epoch: int) -> tuple[int, int, int]:
        """(corpus, its example index, its epoch) of mixture ``index`` in mixture ``epoch``."""
        corpus = self.corpus_of(index)
        if index >= self.epoch_examples:  # held out: the corpus's last examples, masks of epoch 0
            return corpus, self.train_sizes[corpus] + index - int(self.eval_starts[corpus]), 0
        draw = epoch * self.block_sizes[corpus] + index - int(self.block_starts[corpus])
        corpus_epoch, position = divmod(draw, self.train_sizes[corpus])
        return corpus, int(self.permutation(corpus, corpus_epoch)[position]), corpus_epoch

    def permutation(self, corpus: int, corpus_epoch: int) -> np.ndarray:
        key = (corpus, corpus_epoch)
        if key not in self._permutations:
            if len(self._permutations) > 2 * len(self.datasets):
                self._permutations.clear()  # a corpus moves through its epochs in order: keep the recent ones
            rng = np.random.default_rng([self.seed, corpus, corpus_epoch])
            self._permutations[key] = rng.permutation(self.train_sizes[corpus])
        return self._permutations[key]

    def corpus_names(self) -> list[str]:
        """The corpora's names in the metrics: their directory names (made unique by position)."""
        names = [spec.path.name for spec in self.specs]
        return names if len(set(names)) == len(names) else [f"{k}:{name}" for k, name in enumerate(names)]

    def corpus_counts(self, indices: Sequence[int]) -> tuple[int, ...]:
        """How many of ``indices`` each corpus supplies (the metrics' corpus shares)."""
        counts = np.bincount([self.corpus_of(i) for i in indices], minlength=len(self.datasets))
        return tuple(int(c) for c in counts)

    def describe(self) -> str:
        """Each corpus's weight, its block of every mixture epoch and its training examples, for the start-up log."""
        return "mixture of " + ", ".join(
            f"{name} (weight {spec.weight:g}: {block} of every {self.epoch_examples} examples, {size} to train on)"
            for name, spec, block, size in zip(self.corpus_names(), self.specs, self.block_sizes, self.train_sizes))

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        corpus, local, corpus_epoch = self.locate(index, epoch)
        return self.datasets[corpus].example(local, corpus_epoch)

    def max_lengths(self) -> tuple[int, int]:
        bounds = [dataset.max_lengths() for dataset in self.datasets]
        return max(b[0] for b in bounds), max(b[1] for b in bounds)

    def lengths(self) -> np.ndarray:
        """(N, 2) bounds: an index draws another example of its corpus each epoch, so each gets its corpus's
        longest (length grouping cannot use a mixture; the bounds keep the protocol's meaning)."""
        corpus = np.repeat(np.arange(len(self.datasets)), self.block_sizes)
        corpus = np.concatenate([corpus, np.repeat(np.arange(len(self.datasets)), self.held_out)])
        return np.asarray([dataset.max_lengths() for dataset in self.datasets], dtype=np.int32)[corpus]


def mixture_manifest(datasets: list[Seq2SeqExamples], specs: list[MixtureSpec]) -> dict:
    """The run's data manifest: the shared vocab, every corpus's shards (in order) and the weights.
    Corpora tokenized with different vocabs are refused in one line."""
    first = datasets[0].manifest["vocab"]
    for spec, dataset in zip(specs[1:], datasets[1:]):
        if dataset.manifest["vocab"]["sha256"] != first["sha256"]:
            raise UserError(f"--data_dirs: {spec.path} was tokenized with another vocab than {specs[0].path} "
                            "(vocab sha256 differ); a mixture needs one vocab: re-tokenize it with the same "
                            "--vocab_path")
    return {
        "stage": "mixture",
        "vocab": first,
        "corpora": [{"path": str(spec.path), "weight": spec.weight, "examples": len(dataset),
                     "stage": dataset.manifest.get("stage")} for spec, dataset in zip(specs, datasets)],
        "shards": [shard for dataset in datasets for shard in dataset.manifest["shards"]],
    }
