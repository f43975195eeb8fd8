"""Properties of the pure noising functions, checked on small sequences with explicit generators."""

import numpy as np
import pytest

from data_tools.noising import (
    BartNoiseConfig,
    SpecialIds,
    apply_text_infilling,
    build_bart_example,
    build_gsg_example,
    pack_sentences,
    sample_span_lengths,
    sample_spans,
    select_gap_sentences,
)

SPECIAL = SpecialIds()


def test_pack_sentences_keeps_order_and_limit_and_splits_long_sentences():
    sentences = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    chunks = pack_sentences(sentences, max_tokens=5)
    assert chunks == [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9, 10]], [[11, 12], [13]]]
    assert [t for c in chunks for s in c for t in s] == list(range(1, 14))
    assert pack_sentences([], 5) == []


@pytest.mark.parametrize("seed", range(30))
def test_spans_cover_exactly_the_ratio_without_touching(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(10, 300))
    spans = sample_spans(length, rng, mask_ratio=0.3, poisson_lambda=3.0)
    assert sum(n for _, n in spans) == round(length * 0.3)
    for (start, n), (next_start, _) in zip(spans, spans[1:]):
        assert start + n < next_start  # at least one kept token between spans
    assert all(0 <= s and s + n <= length for s, n in spans)


def test_span_lengths_sum_exactly_and_follow_the_poisson_mean():
    rng = np.random.default_rng(0)
    lengths = sample_span_lengths(100_000, 3.0, rng)
    assert sum(lengths) == 100_000
    assert abs(np.mean(lengths[:-1]) - 3.0) < 0.05
    assert 0 in lengths  # zero-length spans (insertions) are kept


def test_text_infilling_replaces_each_span_with_one_mask_and_inserts_for_empty_spans():
    ids = list(range(1, 11))
    assert apply_text_infilling(ids, [(1, 3), (6, 0), (8, 2)], 103) == [1, 103, 5, 6, 103, 7, 8, 103]


def test_bart_example_target_is_the_original_and_source_keeps_unmasked_tokens():
    rng = np.random.default_rng(3)
    sentences = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]
    source, target = build_bart_example(sentences, rng, BartNoiseConfig(), SPECIAL, seq_length=64)
    assert target == [11, 12, 13, 14, 21, 22, 23, 31, 32, 33, 34, 35, SPECIAL.sep]
    assert source[0] == SPECIAL.cls and source[-1] == SPECIAL.sep
    kept = [t for t in source[1:-1] if t != SPECIAL.mask]
    assert len(kept) == 12 - round(12 * 0.3)
    assert set(kept) <= set(target)


def test_bart_example_is_deterministic_for_a_seed():
    sentences = [list(range(100 + 10 * i, 108 + 10 * i)) for i in range(6)]
    first = build_bart_example(sentences, np.random.default_rng(9), BartNoiseConfig(), SPECIAL, 128)
    second = build_bart_example(sentences, np.random.default_rng(9), BartNoiseConfig(), SPECIAL, 128)
    assert first == second


def test_gap_sentence_selection():
    rng = np.random.default_rng(1)
    assert select_gap_sentences(10, 0.3, "lead", rng) == [0, 1, 2]
    chosen = select_gap_sentences(10, 0.3, "random", rng)
    assert len(chosen) == 3 and chosen == sorted(set(chosen))
    assert select_gap_sentences(2, 0.3, "random", rng) in ([0], [1])


def test_gsg_example_masks_each_selected_sentence_once_and_targets_them_in_order():
    sentences = [[1, 2], [3, 4, 5], [6], [7, 8]]
    source, target = build_gsg_example(sentences, [1, 3], SPECIAL, tgt_seq_length=10)
    assert source == [SPECIAL.cls, 1, 2, SPECIAL.mask, 6, SPECIAL.mask, SPECIAL.sep]
    assert target == [3, 4, 5, 7, 8, SPECIAL.sep]
    _, short_target = build_gsg_example(sentences, [1, 3], SPECIAL, tgt_seq_length=3)
    assert short_target == [3, 4, SPECIAL.sep]
