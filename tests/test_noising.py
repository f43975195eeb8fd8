"""Properties of the masking kernels (data_tools.masking), checked with explicit generators and hypothesis."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.compiled import COMPILED, run_kernel
from data_tools.masking.blocks import examples_of_block
from data_tools.masking.pegasus import principal_sentences
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import Randomness, masking_randomness, next_u64, stream_key, uniform
from tests.masking_reference import (
    SPECIAL,
    VOCAB,
    ReferenceStream,
    bart_recipe,
    build_bart_example,
    build_gsg_example,
    document_block,
    flatten_sentences,
    gsg_chunk_example,
    kernel_state,
    noise_spans,
    pack_sentences,
    permute_sentence_order,
    place_spans,
    reference_examples_of_documents,
    reference_gsg_example,
    reference_pack_sentences,
    reference_principal,
    reference_stream_key,
    sample_geometric_span_lengths,
    sample_span_lengths,
    sample_spans,
    select_gap_sentences,
    select_principal_sentences,
)

CONTENT_IDS = st.integers(min_value=104, max_value=999)
SENTENCES = st.lists(st.lists(CONTENT_IDS, min_size=1, max_size=30), min_size=1, max_size=12)
EXACT = bart_recipe(random_ratio=0.0, keep_ratio=0.0, permute_sentence_ratio=0.0, whole_word_mask=False,
                    seq_length=1024)


def can_fill_masks(source: list[int], target: list[int], mask_id: int) -> bool:
    """Whether replacing each [MASK] of ``source`` by some run of tokens gives ``target``."""
    segments, current = [], []
    for token in source:
        if token == mask_id:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    if len(segments) == 1:
        return segments[0] == target
    if target[: len(segments[0])] != segments[0]:
        return False
    position = len(segments[0])
    for segment in segments[1:-1]:  # greedy leftmost match is exact for ordered segments
        for start in range(position, len(target) - len(segment) + 1):
            if target[start : start + len(segment)] == segment:
                position = start + len(segment)
                break
        else:
            return False
    last = segments[-1]
    return len(target) - len(last) >= position and target[len(target) - len(last) :] == last


def test_pack_sentences_keeps_order_and_limit_and_splits_long_sentences():
    sentences = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    chunks = pack_sentences(sentences, max_tokens=5)
    assert chunks == [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9, 10]], [[11, 12], [13]]]
    assert pack_sentences([], 5) == []


@settings(deadline=None)
@given(st.lists(st.lists(CONTENT_IDS, max_size=25), max_size=12), st.integers(1, 12))
def test_the_packing_kernel_follows_the_plain_rule(sentences, max_tokens):
    """Empty sentences included: they have no piece, and a piece boundary is never a chunk of its own."""
    assert pack_sentences(sentences, max_tokens) == reference_pack_sentences(sentences, max_tokens)


@settings(deadline=None)  # the first example loads the compiled kernels
@given(st.integers(1, 400), st.integers(0, 2**32 - 1), st.floats(0.05, 0.6))
def test_spans_cover_exactly_the_ratio_without_touching(length, seed, ratio):
    rng = np.random.default_rng(seed)
    spans = sample_spans(length, rng, mask_ratio=ratio, poisson_lambda=3.0)
    covered = sum(n for _, n in spans)
    assert covered <= round(length * ratio)
    if round(length * ratio) * 2 <= length:  # room for every span and its gap
        assert covered == round(length * ratio)
    for (start, n), (next_start, _) in zip(spans, spans[1:]):
        assert start + n < next_start
    assert all(0 <= s and s + n <= length for s, n in spans)


def test_span_lengths_follow_poisson_by_chi_square():
    lambda_ = 3.0
    lengths = np.array(sample_span_lengths(300_000, lambda_, np.random.default_rng(0))[:-1])  # last one is trimmed
    assert len(lengths) > 95_000
    observed = np.bincount(np.minimum(lengths, 9), minlength=10)
    pmf = np.array([np.exp(-lambda_) * lambda_**k / np.prod(np.arange(1, k + 1)) for k in range(9)])
    expected = len(lengths) * np.append(pmf, 1 - pmf.sum())
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 27.88  # chi-square critical value, 9 degrees of freedom, p = 0.001
    assert observed[0] > 0  # zero-length spans (insertions) are kept


def test_geometric_span_lengths_follow_the_capped_distribution_by_chi_square():
    p, cap = 0.2, 10
    lengths = np.array(sample_geometric_span_lengths(200_000, p, cap, np.random.default_rng(0))[:-1])
    observed = np.bincount(lengths, minlength=cap + 1)[1:]
    pmf = np.array([(1 - p) ** (k - 1) * p for k in range(1, cap)] + [(1 - p) ** (cap - 1)])
    expected = len(lengths) * pmf
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 27.88  # 9 degrees of freedom, p = 0.001
    assert lengths.min() == 1 and lengths.max() == cap


def test_splitmix64_draws_the_published_reference_numbers():
    # Vigna's splitmix64.c seeded with 1234567: the compiled kernel and its Python twin both
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431]
    for compiled in (True, False):
        state = np.array([1234567], dtype=np.uint64)
        assert [int(run_kernel(next_u64, compiled, state)) for _ in expected] == expected


def test_kernel_streams_are_keyed_by_the_seed_and_their_order():
    first, again, other = Randomness((1, 0, 5)), Randomness((1, 0, 5)), Randomness((1, 0, 6))
    keys = [int(first.next_kernel_state()[0]) for _ in range(3)]
    assert keys == [int(again.next_kernel_state()[0]) for _ in range(3)] and len(set(keys)) == 3
    assert int(other.next_kernel_state()[0]) not in keys
    assert keys == [reference_stream_key(1, 0, 5, n) for n in (1, 2, 3)] == [stream_key(1, 0, 5, n) for n in (1, 2, 3)]
    # the stage keys a document, online masking a chunk of it: two different streams
    assert masking_randomness(1, 0, 5).key == (1, 0, 5) and masking_randomness(1, 0, 5, 0).key == (1, 0, 5, 0)
    assert stream_key(2**64 - 1, 2**63) == reference_stream_key(2**64 - 1, 2**63)
    state = kernel_state(np.random.default_rng(3))  # any numpy generator: 64 bits drawn from it
    assert state.dtype == np.uint64 and state.shape == (1,)
    assert kernel_state(np.random.default_rng(3))[0] == state[0]
    draws = np.array([uniform(state) for _ in range(20_000)])
    assert 0.0 <= draws.min() and draws.max() < 1.0 and abs(draws.mean() - 0.5) < 0.01


NOISE_SETTINGS = st.builds(
    bart_recipe,
    mask_ratio=st.floats(0.0, 0.6, exclude_min=True), poisson_lambda=st.floats(0.5, 6.0),
    span_distribution=st.sampled_from(["poisson", "geometric"]), geometric_p=st.floats(0.05, 1.0),
    max_span_length=st.integers(1, 12), replace_length=st.sampled_from([-1, 0, 1]),
    random_ratio=st.floats(0.0, 0.5), keep_ratio=st.floats(0.0, 0.5), collapse_masks=st.booleans(),
    permute_sentence_ratio=st.floats(0.0, 1.0), rotate_ratio=st.floats(0.0, 1.0), insert_ratio=st.floats(0.0, 0.3),
    whole_word_mask=st.booleans(),
)


@pytest.mark.skipif(not COMPILED, reason="numba is not installed: only the Python path exists here")
@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(CONTENT_IDS, st.sampled_from([100, 101, 102, 103])), min_size=1, max_size=40),
                min_size=1, max_size=10), NOISE_SETTINGS, st.integers(0, 2**32 - 1), st.integers(8, 200))
def test_bart_kernel_and_its_python_twin_build_the_same_example(sentences, noise, seed, seq_length):
    noise = dataclasses.replace(noise, seq_length=seq_length)
    compiled = build_bart_example(sentences, np.random.default_rng(seed), noise, VOCAB, compiled=True)
    python = build_bart_example(sentences, np.random.default_rng(seed), noise, VOCAB, compiled=False)
    source, target = (array.tolist() for array in compiled)
    assert [source, target] == [array.tolist() for array in python]
    assert source[0] == SPECIAL.cls and source[-1] == SPECIAL.sep and len(source) <= seq_length
    assert target == [t for s in sentences for t in s][: seq_length - 1] + [SPECIAL.sep]


def test_each_span_becomes_one_mask_and_empty_spans_insert_one():
    noise = bart_recipe(mask_ratio=0.3, random_ratio=0.0, whole_word_mask=False)
    ids = list(range(200, 300))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        spans = sample_spans(100, np.random.default_rng(seed), 0.3, 3.0)
        noised = noise_spans(ids, rng, noise, VOCAB)
        assert noised.count(SPECIAL.mask) == len(spans)
        assert len(noised) == 100 - 30 + len(spans)


@settings(max_examples=150, deadline=None)
@given(SENTENCES, st.integers(0, 2**32 - 1))
def test_bart_target_is_the_original_and_masks_fill_back_to_it(sentences, seed):
    source, target = (a.tolist() for a in build_bart_example(sentences, np.random.default_rng(seed), EXACT, VOCAB))
    original = [t for s in sentences for t in s]
    assert target == original + [SPECIAL.sep]
    assert source[0] == SPECIAL.cls and source[-1] == SPECIAL.sep
    assert can_fill_masks(source[1:-1], original, SPECIAL.mask)


@settings(max_examples=100, deadline=None)
@given(st.lists(CONTENT_IDS, min_size=20, max_size=300), st.integers(0, 2**32 - 1))
def test_masked_share_matches_the_ratio(ids, seed):
    # geometric spans have no zero-length insertions, so every [MASK] stands for one token
    noise = bart_recipe(mask_ratio=0.3, replace_length=-1, random_ratio=0.0, whole_word_mask=False,
                        span_distribution="geometric", max_span_length=10)
    noised = noise_spans(ids, np.random.default_rng(seed), noise, VOCAB)
    assert len(noised) == len(ids)
    masked = sum(t == SPECIAL.mask for t in noised)
    assert masked == round(0.3 * len(ids)) or round(0.3 * len(ids)) * 2 > len(ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(CONTENT_IDS, st.sampled_from([100, 101, 102, 103, 1])), min_size=1, max_size=200),
       st.integers(0, 2**32 - 1))
def test_special_tokens_are_never_masked_or_replaced(ids, seed):
    noise = bart_recipe(mask_ratio=0.5, random_ratio=0.3, keep_ratio=0.1, replace_length=1)
    noised = noise_spans(ids, np.random.default_rng(seed), noise, VOCAB)
    specials = [t for t in ids if VOCAB.is_special[t] and t != SPECIAL.mask]
    assert [t for t in noised if VOCAB.is_special[t] and t != SPECIAL.mask] == specials
    assert noised.count(SPECIAL.mask) >= ids.count(SPECIAL.mask)


def test_whole_word_masking_never_splits_a_word():
    # words: [c104 ##p900 ##p901] [c105] [c106 ##p902] ...
    ids = []
    for word in range(60):
        ids += [104 + word] + [900 + (word + k) % 100 for k in range(word % 3)]
    noise = bart_recipe(mask_ratio=0.4, replace_length=-1, random_ratio=0.0, span_distribution="geometric")
    for seed in range(50):
        noised = noise_spans(ids, np.random.default_rng(seed), noise, VOCAB)
        assert len(noised) == len(ids)
        for position, (before, after) in enumerate(zip(ids, noised)):
            if VOCAB.is_continuation[before]:  # a ## piece shares its word's fate
                assert (after == SPECIAL.mask) == (noised[position - 1] == SPECIAL.mask)


def test_random_and_kept_spans_and_collapsing():
    ids = list(range(200, 400))
    # geometric spans: no zero-length span, whose insertion would add a token whatever replace_length says
    random_only = bart_recipe(mask_ratio=0.3, random_ratio=1.0, replace_length=-1, whole_word_mask=False,
                              span_distribution="geometric")
    noised = noise_spans(ids, np.random.default_rng(1), random_only, VOCAB)
    assert SPECIAL.mask not in noised and len(noised) == len(ids) and noised != ids
    assert all(VOCAB.first_regular_id <= t < VOCAB.size for t in noised)
    keep_only = bart_recipe(mask_ratio=0.3, random_ratio=0.0, keep_ratio=1.0, whole_word_mask=False)
    assert noise_spans(ids, np.random.default_rng(1), keep_only, VOCAB) == ids
    collapsed = bart_recipe(mask_ratio=0.3, random_ratio=0.0, replace_length=-1, collapse_masks=True,
                            whole_word_mask=False)
    noised = noise_spans(ids, np.random.default_rng(1), collapsed, VOCAB)
    assert all(not (a == b == SPECIAL.mask) for a, b in zip(noised, noised[1:]))
    deleted = bart_recipe(mask_ratio=0.3, random_ratio=0.0, replace_length=0, whole_word_mask=False,
                          span_distribution="geometric")
    noised = noise_spans(ids, np.random.default_rng(1), deleted, VOCAB)
    assert SPECIAL.mask not in noised and len(noised) == len(ids) - 60


def test_insertion_and_rotation_keep_every_original_token():
    sentences = [list(range(200 + 10 * i, 208 + 10 * i)) for i in range(5)]
    noise = bart_recipe(mask_ratio=0.01, insert_ratio=0.2, rotate_ratio=1.0, permute_sentence_ratio=0.0,
                        random_ratio=0.0, whole_word_mask=False, seq_length=256)
    source, target = (a.tolist() for a in build_bart_example(sentences, np.random.default_rng(5), noise, VOCAB))
    body = source[1:-1]
    assert len(body) == 40 + 8  # ceil(40 * 0.2) insertions, no span at 1%
    assert sorted(t for t in body if t != SPECIAL.mask) == sorted(target[:-1])


def test_sentence_permutation_ratio():
    rng = np.random.default_rng(0)
    assert permute_sentence_order(10, 0.0, rng) == list(range(10))
    order = permute_sentence_order(10, 1.0, rng)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    partial = permute_sentence_order(10, 0.3, rng)
    assert sum(i != j for i, j in enumerate(partial)) <= 3


def test_bart_example_is_deterministic_for_a_seed():
    sentences = [list(range(200 + 10 * i, 208 + 10 * i)) for i in range(6)]
    first = build_bart_example(sentences, np.random.default_rng(9), bart_recipe(seq_length=128), VOCAB)
    second = build_bart_example(sentences, np.random.default_rng(9), bart_recipe(seq_length=128), VOCAB)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_place_spans_drops_what_does_not_fit():
    spans = place_spans(5, [3, 3], np.random.default_rng(0))  # 3 + gap + 3 > 5: the second is dropped
    assert len(spans) == 1 and spans[0][1] == 3 and spans[0][0] + 3 <= 5


# -- PEGASUS --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(104, 130), min_size=1, max_size=12), min_size=2, max_size=9),
       st.sampled_from(["independent", "sequential"]), st.booleans(), st.integers(1, 4))
def test_principal_selection_equals_brute_force(sentences, mode, unique, count):
    count = min(count, len(sentences))
    expected = reference_principal(sentences, count, mode, unique)
    assert select_principal_sentences(sentences, count, mode, unique) == expected
    flat, offsets = flatten_sentences(sentences)
    for compiled in (True, False) if COMPILED else (False,):  # the kernel and the same code as Python
        assert principal_sentences(flat, offsets, count, mode == "sequential", unique, compiled) == expected


def test_gap_sentence_selection():
    rng = np.random.default_rng(1)
    sentences = [[200 + i] for i in range(10)]
    assert select_gap_sentences(sentences, 0.3, "lead", rng) == [0, 1, 2]
    chosen = select_gap_sentences(sentences, 0.3, "random", rng)
    assert len(chosen) == 3 and chosen == sorted(set(chosen))
    for seed in range(30):
        assert 1 not in select_gap_sentences([[1], [2]], 0.3, "random", np.random.default_rng(seed), keep_last=True)
        assert 9 not in select_gap_sentences(sentences, 0.5, "random", np.random.default_rng(seed), keep_last=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(CONTENT_IDS, min_size=1, max_size=20), min_size=2, max_size=12), st.integers(0, 2**32 - 1),
       st.sampled_from(["random", "lead", "principal"]))
def test_gsg_masks_fill_back_to_the_document(sentences, seed, strategy):
    rng = np.random.default_rng(seed)
    selected = select_gap_sentences(sentences, 0.3, strategy, rng)
    source, target = build_gsg_example(sentences, selected, SPECIAL, tgt_seq_length=10_000)
    assert source.count(SPECIAL.mask) == len(selected)
    assert target == [t for i in selected for t in sentences[i]] + [SPECIAL.sep]
    rebuilt, pieces = [], iter(sentences[i] for i in selected)
    for token in source[1:-1]:
        rebuilt.extend(next(pieces) if token == SPECIAL.mask else [token])
    assert rebuilt == [t for s in sentences for t in s]


def test_gsg_example_actions_and_truncation():
    sentences = [[1, 2], [3, 4, 5], [6], [7, 8]]
    source, target = build_gsg_example(sentences, [1, 3], SPECIAL, tgt_seq_length=10)
    assert source == [SPECIAL.cls, 1, 2, SPECIAL.mask, 6, SPECIAL.mask, SPECIAL.sep]
    assert target == [3, 4, 5, 7, 8, SPECIAL.sep]
    assert build_gsg_example(sentences, [1, 3], SPECIAL, 3)[1] == [3, 4, SPECIAL.sep]
    assert build_gsg_example(sentences, [1], SPECIAL, 10, gap_action="remove")[0] == [SPECIAL.cls, 1, 2, 6, 7, 8,
                                                                                       SPECIAL.sep]
    assert build_gsg_example(sentences, [1], SPECIAL, 10, gap_action="keep")[0] == [SPECIAL.cls, *range(1, 9),
                                                                                     SPECIAL.sep]
    mixed = MaskRecipe(target="gsg", sentence_selection_strategy="lead", gap_sentence_ratio=0.1, gap_action="mixed",
                       tgt_seq_length=10)  # one gap: the first sentence
    actions = Counter()
    for seed in range(2000):
        source, target = gsg_chunk_example(sentences, mixed, np.random.default_rng(seed))
        assert target == [1, 2, SPECIAL.sep]
        actions["mask" if SPECIAL.mask in source else "keep" if 1 in source else "remove"] += 1
    assert 0.75 < actions["mask"] / 2000 < 0.85 and 0.07 < actions["keep"] / 2000 < 0.13


def test_random_gaps_are_uniform_among_the_candidates():
    """Ten sentences, the last kept (UER-py): three gaps among nine candidates, each about a third of the time."""
    sentences = [[200 + i] for i in range(10)]
    counts = Counter(index for seed in range(3000)
                     for index in select_gap_sentences(sentences, 0.3, "random", np.random.default_rng(seed),
                                                       keep_last=True))
    assert set(counts) == set(range(9))
    expected = 3000 * 3 / 9
    chi_square = sum((counts[i] - expected) ** 2 / expected for i in range(9))
    assert chi_square < 26.12  # 8 degrees of freedom, p = 0.001


@pytest.mark.parametrize("unique", [False, True])
def test_principal_picks_the_sentence_that_summarizes_the_document(unique):
    sentences = [[200, 201, 202, 203], [300, 301], [200, 201, 202, 204], [200, 202, 203, 205], [400]]
    assert select_principal_sentences(sentences, 1, "independent", unique) in ([0], [2], [3])
    assert 4 not in select_principal_sentences(sentences, 3, "independent", unique)


GSG_RECIPES = st.builds(
    MaskRecipe, target=st.just("gsg"), sentence_selection_strategy=st.sampled_from(["random", "lead", "principal"]),
    gap_action=st.sampled_from(["mask", "remove", "keep", "mixed"]), gap_sentence_ratio=st.floats(0.05, 0.95),
    keep_last_sentence=st.booleans(), rouge_mode=st.sampled_from(["independent", "sequential"]),
    rouge_unique=st.booleans(), seq_length=st.sampled_from([8, 16, 64]), tgt_seq_length=st.integers(2, 40),
    seed=st.integers(0, 2**32 - 1),
)
# Few distinct ids, so that principal selection has overlaps to score; empty sentences have no piece.
GSG_DOCUMENTS = st.lists(st.lists(st.lists(st.integers(104, 140), max_size=30), min_size=1, max_size=8),
                         min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(GSG_DOCUMENTS, GSG_RECIPES, st.integers(0, 10**9), st.integers(0, 3))
def test_the_gsg_block_kernel_its_python_twin_and_the_reference_agree(documents, recipe, first, pass_index):
    """Random and lead gaps, principal ones (both ROUGE modes, sets or counts), every action with mixed among
    them, gap ratios, the last sentence kept or not, targets cut short: the block kernel compiled, the same
    code run as Python, and the plain per-document reference write the same examples."""
    sources, targets, skipped = reference_examples_of_documents(documents, first, pass_index, recipe, VOCAB)
    for compiled in (True, False) if COMPILED else (False,):
        (source_values, source_offsets, target_values, target_offsets), block_skipped = examples_of_block(
            document_block(documents, first), pass_index, recipe, VOCAB, compiled)
        assert [source_values[a:b].tolist() for a, b in zip(source_offsets, source_offsets[1:])] == sources
        assert [target_values[a:b].tolist() for a, b in zip(target_offsets, target_offsets[1:])] == targets
        assert block_skipped == skipped
    for source, target in zip(sources, targets):
        assert source[0] == SPECIAL.cls and source[-1] == SPECIAL.sep and target[-1] == SPECIAL.sep
        assert len(source) <= recipe.seq_length and len(target) <= recipe.tgt_seq_length


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(104, 140), min_size=1, max_size=20), min_size=2, max_size=10), GSG_RECIPES,
       st.integers(0, 2**32 - 1))
def test_a_gsg_chunk_online_is_the_reference_example_of_its_stream(sentences, recipe, seed):
    """Online masking's per-chunk path: the kernel compiled and as Python draw what the reference draws."""
    recipe = dataclasses.replace(recipe, tgt_seq_length=max(recipe.tgt_seq_length, 2))
    state = int(kernel_state(np.random.default_rng(seed))[0])
    expected = reference_gsg_example(sentences, ReferenceStream(state), recipe, SPECIAL)
    for compiled in (True, False) if COMPILED else (False,):
        assert gsg_chunk_example(sentences, recipe, np.random.default_rng(seed), compiled) == expected
