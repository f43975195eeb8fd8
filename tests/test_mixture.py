"""Weighted mixtures (--data_dirs): the blend's arithmetic, each corpus's own order and epochs,
fairness to the weights over a run through the trainer's sampler, and one-line errors for bad
specs and mismatched vocabs. The kill -9 resume of a mixture is in tests/test_resume.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools.common import UserError
from pipeline.sampler import ResumableDistributedSampler
from pipeline.mixture import MixtureExamples, MixtureSpec, largest_remainder, parse_mixture


class FakeCorpus:
    """``example(i, epoch)`` returns (corpus id, i, epoch) so the tests see where a draw came from."""

    def __init__(self, corpus: int, size: int, vocab_sha: str = "v") -> None:
        self.corpus, self.size = corpus, size
        self.manifest = {"vocab": {"sha256": vocab_sha}, "shards": [{"sha256": f"{corpus}"}], "stage": "mask"}

    def __len__(self) -> int:
        return self.size

    def example(self, index: int, epoch: int) -> tuple:
        assert 0 <= index < self.size
        return self.corpus, index, epoch

    def max_lengths(self) -> tuple[int, int]:
        return 64, 64


def mixture(sizes: list[int], weights: list[float], eval_examples: int = 0, seed: int = 3) -> MixtureExamples:
    specs = [MixtureSpec(Path(f"corpus{k}"), w) for k, w in enumerate(weights)]
    return MixtureExamples([FakeCorpus(k, n) for k, n in enumerate(sizes)], specs, seed, eval_examples)


def test_largest_remainder_adds_up_exactly():
    assert largest_remainder([0.6, 0.3, 0.1], 10) == [6, 3, 1]
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    assert sum(largest_remainder([0.123, 0.456, 0.421], 9_999)) == 9_999


def test_every_mixture_epoch_gives_each_corpus_exactly_its_share():
    mix = mixture([5_000, 300, 2_000], [0.6, 0.3, 0.1])
    assert len(mix) == 7_300 and mix.block_sizes == [4_380, 2_190, 730]
    for epoch in (0, 1, 5):
        drawn = Counter(mix.example(i, epoch)[0] for i in range(len(mix)))
        assert [drawn[k] for k in range(3)] == mix.block_sizes


def test_each_corpus_keeps_its_own_order_and_epochs():
    mix = mixture([5_000, 300, 2_000], [0.6, 0.3, 0.1])
    draws: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    for epoch in range(3):
        for i in range(len(mix)):
            corpus, local, corpus_epoch = mix.example(i, epoch)
            draws[corpus].append((corpus_epoch, local))
    # The small corpus, weighted up (2,190 draws per mixture epoch from 300 examples), is repeated in whole
    # epochs of its own: every one of its epochs holds each example exactly once.
    by_epoch: dict[int, list[int]] = {}
    for corpus_epoch, local in draws[1]:
        by_epoch.setdefault(corpus_epoch, []).append(local)
    complete = [sorted(v) for e, v in by_epoch.items() if e < max(by_epoch)]
    assert len(complete) >= 20 and all(v == list(range(300)) for v in complete)
    # The large corpus, weighted down, goes through its examples without repeating any: 3 x 4,380 < 2 x 5,000.
    first_pass = [local for corpus_epoch, local in draws[0] if corpus_epoch == 0]
    assert len(first_pass) == 5_000 == len(set(first_pass))
    # Different corpus epochs come in different orders.
    assert mix.permutation(1, 0).tolist() != mix.permutation(1, 1).tolist()


def test_the_blend_is_a_function_of_seed_and_index_only():
    a, b = mixture([500, 700], [0.5, 0.5], seed=9), mixture([500, 700], [0.5, 0.5], seed=9)
    indices = np.random.default_rng(0).integers(0, len(a), 300)
    assert [a.example(int(i), 4) for i in indices] == [b.example(int(i), 4) for i in reversed(indices)][::-1]
    other = mixture([500, 700], [0.5, 0.5], seed=10)
    assert [a.example(i, 0) for i in range(100)] != [other.example(i, 0) for i in range(100)]


def test_held_out_examples_are_each_corpus_s_last_split_by_weight():
    mix = mixture([400, 1_000], [0.25, 0.75], eval_examples=40)
    assert mix.held_out == [10, 30] and mix.train_sizes == [390, 970] and len(mix) == 1_360 + 40
    held = [mix.example(i, 7) for i in range(1_360, 1_400)]
    assert held == [(0, i, 0) for i in range(390, 400)] + [(1, i, 0) for i in range(970, 1_000)]
    trained = {mix.example(i, e)[:2] for e in range(3) for i in range(1_360)}
    assert not trained & {h[:2] for h in held}  # never trained on


def test_the_trainer_s_sampler_gives_each_corpus_its_weight_over_a_run():
    """Fairness: 300 steps of 2 ranks x 16 examples through ResumableDistributedSampler (the trainer's),
    shares within 1.5 points of the weights (measured: largest gap 0.45 points)."""
    weights = [0.6, 0.3, 0.1]
    mix = mixture([20_000, 3_000, 9_000], weights)
    counts: Counter[int] = Counter()
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(len(mix), 16, rank, 2, seed=5)
        for _, indices in zip(range(300), sampler):
            counts.update(mix.corpus_of(i) for i in indices)
    total = sum(counts.values())
    assert total == 300 * 2 * 16
    shares = [counts[k] / total for k in range(3)]
    assert max(abs(s - w) for s, w in zip(shares, weights)) < 0.015, shares


@pytest.mark.parametrize("entries, fragment", [
    (["work/a"], "expected PATH:WEIGHT"),
    (["work/a:x", "work/b:1"], "is not a number"),
    (["work/a:0", "work/b:1"], "must be a positive number"),
    (["work/a:-1", "work/b:1"], "must be a positive number"),
    (["work/a:nan", "work/b:1"], "must be a positive number"),
    (["work/a:1"], "at least two"),
    (["work/a:1", "work/./a:2"], "names a corpus twice"),
])
def test_bad_mixture_specs_are_one_line_errors(entries, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_mixture(entries)


def test_weights_are_normalized_and_paths_may_hold_colons():
    specs = parse_mixture(["/data/c:1/news:3", "web:1"])
    assert specs[0] == MixtureSpec(Path("/data/c:1/news"), 3.0)
    mix = MixtureExamples([FakeCorpus(0, 100), FakeCorpus(1, 100)], specs, 0)
    assert mix.weights.tolist() == [0.75, 0.25]


def test_corpora_of_different_vocabs_are_refused():
    specs = [MixtureSpec(Path("news"), 1.0), MixtureSpec(Path("web"), 1.0)]
    with pytest.raises(UserError, match="web was tokenized with another vocab than news"):
        MixtureExamples([FakeCorpus(0, 10, "v1"), FakeCorpus(1, 10, "v2")], specs, 0)


def test_the_cli_refuses_data_dir_with_data_dirs_and_length_grouping(tmp_path):
    from pipeline.train_config import TrainConfig

    with pytest.raises(UserError, match="not both"):
        TrainConfig(data_dir=tmp_path, data_dirs=["a:1", "b:1"], output_dir=tmp_path / "run")
    with pytest.raises(UserError, match="--data_dir DIR or as --data_dirs"):
        TrainConfig(output_dir=tmp_path / "run")
    with pytest.raises(UserError, match="not supported with --data_dirs"):
        TrainConfig(data_dirs=["a:1", "b:1"], output_dir=tmp_path / "run", group_by_length=True)
    with pytest.raises(UserError, match="must be a positive number"):
        TrainConfig(data_dirs=["a:0", "b:1"], output_dir=tmp_path / "run")


def test_a_mixture_is_the_only_kind_with_the_per_corpus_surface():
    from pipeline.examples import CorpusMixture

    mix = mixture([300, 100], [0.75, 0.25], eval_examples=8)
    assert isinstance(mix, CorpusMixture) and not isinstance(FakeCorpus(0, 10), CorpusMixture)
    assert mix.corpus_names() == ["corpus0", "corpus1"]
    assert mix.corpus_counts([0, 1, 299, 300, 391, 392, 399]) == (3, 4)  # held out from 392: 6 of corpus0, 2
    assert mix.describe() == ("mixture of corpus0 (weight 0.75: 294 of every 392 examples, 294 to train on), "
                              "corpus1 (weight 0.25: 98 of every 392 examples, 98 to train on)")
    # Lengths are bounds: each index draws another example of its corpus every epoch.
    assert mix.lengths().shape == (len(mix), 2) and (mix.lengths() == 64).all()
    same_names = MixtureExamples([FakeCorpus(0, 10), FakeCorpus(1, 10)],
                                 [MixtureSpec(Path("a/news"), 1.0), MixtureSpec(Path("b/news"), 1.0)], 0)
    assert same_names.corpus_names() == ["0:news", "1:news"]
