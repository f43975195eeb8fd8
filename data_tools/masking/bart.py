"""BART's noising of one chunk (fairseq ``DenoisingDataset`` semantics, and UER-py's variant).

Each rule is one kernel over numpy arrays, run compiled or as the same Python
(data_tools.compiled); :func:`noise_chunk` strings them together for a chunk and is what the mask
stage's block kernel (data_tools.masking.blocks) and online masking (:func:`bart_example`) call.
All randomness comes from the chunk's SplitMix64 stream (data_tools.masking.streams), in a fixed
order: sentence permutation, span lengths, span placement, then per span its action and
replacement tokens, insertion, rotation. Spans are drawn in words when ``whole_word_mask`` (a
Latin word split into ``##`` pieces is masked whole; a Chinese character is its own word).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from data_tools.compiled import COMPILED, kernel, run_kernel
from data_tools.masking.chunking import round_half_even
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import below, choose_sorted, uniform
from data_tools.masking.vocab import VocabInfo


@kernel
def draw_span_lengths(state: np.ndarray, num_to_mask: int, cdf: np.ndarray) -> np.ndarray:
    """Span lengths drawn by inversion from ``cdf`` (cdf[k] = P(length <= k), last entry 1.0) until
    they cover ``num_to_mask`` units; the last is trimmed so the sum is exact. Zero-length spans
    are kept: BART inserts a [MASK] there that covers no token."""
    lengths = np.empty(num_to_mask + 8, np.int64)
    count = total = 0
    while total < num_to_mask:
        u = uniform(state)
        length = 0
        while u >= cdf[length]:
            length += 1
        length = min(length, num_to_mask - total)
        if count == len(lengths):
            grown = np.empty(2 * count, np.int64)
            grown[:count] = lengths
            lengths = grown
        lengths[count] = length
        count += 1
        total += length
    return lengths[:count]


@kernel
def place_spans(state: np.ndarray, length: int, span_lengths: np.ndarray) -> np.ndarray:
    """Starts of non-adjacent spans of the given lengths at uniformly random places, in order.

    At least one unmasked unit separates consecutive spans, so each span stays its own [MASK];
    if the sequence is too short for that, the spans drawn last are dropped (fewer starts
    than lengths come back).
    """
    num_spans = len(span_lengths)
    covered = 0
    for index in range(num_spans):
        covered += span_lengths[index]
    while num_spans > 0 and covered + num_spans - 1 > length:
        num_spans -= 1
        covered -= span_lengths[num_spans]
    if num_spans == 0:
        return np.empty(0, np.int64)
    free = length - covered - (num_spans - 1)  # unmasked units beyond the mandatory gaps
    # Stars and bars: num_spans sorted distinct cuts among free + num_spans places split `free`
    # units into num_spans + 1 gaps uniformly.
    cuts = choose_sorted(state, free + num_spans, num_spans)
    starts = np.empty(num_spans, np.int64)
    position = previous_cut = 0
    for index in range(num_spans):
        cut = cuts[index] - index
        position += cut - previous_cut + (1 if index > 0 else 0)
        starts[index] = position
        position += span_lengths[index]
        previous_cut = cut
    return starts


@kernel
def permute_sentences(state: np.ndarray, num_sentences: int, ratio: float) -> np.ndarray:
    """fairseq's sentence permutation: ``ceil(n * ratio)`` sentences, chosen uniformly, change
    places among themselves (uniformly); the others stay."""
    order = np.arange(num_sentences)
    count = int(math.ceil(num_sentences * ratio))
    if count < 2:
        return order
    pool = np.arange(num_sentences)
    for i in range(count):  # partial Fisher-Yates: pool[:count] is a uniform random subset
        j = i + below(state, num_sentences - i)
        pool[i], pool[j] = pool[j], pool[i]
    shuffled = pool[:count].copy()
    for i in range(count - 1, 0, -1):
        j = below(state, i + 1)
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    for i in range(count):
        order[pool[i]] = shuffled[i]
    return order


@kernel
def noise_spans(tokens: np.ndarray, state: np.ndarray, cdf: np.ndarray, mask_ratio: float, whole_word: bool,
                replace_length: int, random_ratio: float, keep_ratio: float, collapse: bool,
                is_continuation: np.ndarray, is_special: np.ndarray, mask_id: int, first_regular: int,
                vocab_size: int) -> np.ndarray:
    """Span corruption of one token sequence: ``round(units * mask_ratio)`` units (words, or tokens) in
    spans, each replaced by [MASK] (per ``replace_length``), random tokens (``random_ratio``), or left
    unchanged (``keep_ratio``). Spans touching a special token are left alone, so special tokens are
    never masked; ``collapse`` merges consecutive [MASK]s."""
    n = len(tokens)
    # unit u covers tokens[bounds[u]:bounds[u + 1]]: a word (its ## pieces with it) or a token
    bounds = np.empty(n + 1, np.int64)
    units = 0
    for position in range(n):
        if position == 0 or not whole_word or not is_continuation[tokens[position]]:
            bounds[units] = position
            units += 1
    bounds[units] = n
    num_to_mask = round_half_even(units * mask_ratio)
    if num_to_mask == 0:
        return tokens.copy()
    lengths = draw_span_lengths(state, num_to_mask, cdf)
    starts = place_spans(state, units, lengths)
    output = np.empty(n + len(starts), np.int64)  # a span adds at most one token: an inserted [MASK]
    written = position = 0
    for index in range(len(starts)):
        action = uniform(state)
        start, end = bounds[starts[index]], bounds[starts[index] + lengths[index]]
        touches_special = False
        for k in range(start, end):
            touches_special = touches_special or is_special[tokens[k]]
        if touches_special:
            continue  # special tokens are never masked
        output[written:written + start - position] = tokens[position:start]
        written += start - position
        position = end
        if action < random_ratio:
            count = 1 if replace_length == 1 or start == end else (end - start if replace_length != 0 else 0)
            for _ in range(count):
                output[written] = first_regular + below(state, vocab_size - first_regular)
                written += 1
        elif action < random_ratio + keep_ratio:
            output[written:written + end - start] = tokens[start:end]
            written += end - start
        elif replace_length == 1 or start == end:
            output[written] = mask_id
            written += 1
        elif replace_length == -1:
            output[written:written + end - start] = mask_id
            written += end - start
    output[written:written + n - position] = tokens[position:]
    written += n - position
    if collapse:
        kept = 0
        for k in range(written):
            if not (output[k] == mask_id and kept > 0 and output[kept - 1] == mask_id):
                output[kept] = output[k]
                kept += 1
        written = kept
    return output[:written]


@kernel
def insert_random_tokens(tokens: np.ndarray, state: np.ndarray, ratio: float, random_ratio: float,
                         mask_id: int, first_regular: int, vocab_size: int) -> np.ndarray:
    """fairseq's insertion noise: ``ceil(len * ratio)`` new tokens at random places, [MASK] or (a
    ``random_ratio`` share of them) random tokens."""
    count = int(math.ceil(len(tokens) * ratio))
    if count == 0:
        return tokens.copy()
    total = len(tokens) + count
    positions = choose_sorted(state, total, count)
    randoms = int(math.ceil(count * random_ratio))
    fillers = np.full(count, mask_id, np.int64)
    for k in range(count - randoms, count):
        fillers[k] = first_regular + below(state, vocab_size - first_regular)
    for i in range(count - 1, 0, -1):  # Fisher-Yates: random tokens at random insertion points
        j = below(state, i + 1)
        fillers[i], fillers[j] = fillers[j], fillers[i]
    output = np.empty(total, np.int64)
    taken = inserted = 0
    for k in range(total):
        if inserted < count and positions[inserted] == k:
            output[k] = fillers[inserted]
            inserted += 1
        else:
            output[k] = tokens[taken]
            taken += 1
    return output


@kernel
def noise_chunk(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, cdf: np.ndarray, mask_ratio: float,
                whole_word: bool, replace_length: int, random_ratio: float, keep_ratio: float, collapse: bool,
                permute_ratio: float, insert_ratio: float, rotate_ratio: float, is_continuation: np.ndarray,
                is_special: np.ndarray, mask_id: int, cls_id: int, sep_id: int, first_regular: int,
                vocab_size: int, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of one chunk (see :func:`bart_example`): [CLS] noised chunk [SEP], cut to
    ``seq_length``, and the original chunk + [SEP]."""
    num_sentences = len(offsets) - 1
    tokens = flat
    if permute_ratio > 0 and num_sentences > 1:
        order = permute_sentences(state, num_sentences, permute_ratio)
        tokens = np.empty_like(flat)
        written = 0
        for sentence in order:
            length = offsets[sentence + 1] - offsets[sentence]
            tokens[written:written + length] = flat[offsets[sentence]:offsets[sentence + 1]]
            written += length
    noised = noise_spans(tokens, state, cdf, mask_ratio, whole_word, replace_length, random_ratio, keep_ratio,
                          collapse, is_continuation, is_special, mask_id, first_regular, vocab_size)
    if insert_ratio > 0:
        noised = insert_random_tokens(noised, state, insert_ratio, random_ratio, mask_id, first_regular,
                                       vocab_size)
    if rotate_ratio > 0 and len(noised) > 1 and uniform(state) < rotate_ratio:
        offset = 1 + below(state, len(noised) - 1)
        noised = np.concatenate((noised[offset:], noised[:offset]))
    body = min(len(noised), seq_length - 2)
    source = np.empty(body + 2, np.int64)
    source[0] = cls_id
    source[1:body + 1] = noised[:body]
    source[body + 1] = sep_id
    kept = min(len(flat), seq_length - 1)
    target = np.empty(kept + 1, np.int64)
    target[:kept] = flat[:kept]
    target[kept] = sep_id
    return source, target



@functools.lru_cache(maxsize=64)
def _span_length_cdf(distribution: str, poisson_lambda: float, geometric_p: float, max_length: int) -> np.ndarray:
    """cdf[k] = P(span length <= k) for the kernels' inversion sampling; the last entry is 1.0.

    Poisson(lambda) up to where the tail is below 1e-18 (its mass goes to the last entry);
    geometric(p) on 1, 2, ... capped at ``max_length`` (UER-py's span masking).
    """
    if distribution == "poisson":
        pmf, k = [], 0
        while True:
            pmf.append(math.exp(k * math.log(poisson_lambda) - poisson_lambda - math.lgamma(k + 1)))
            if k > poisson_lambda and (1.0 - math.fsum(pmf) < 1e-18 or pmf[-1] == 0.0):
                break
            k += 1
    elif distribution == "geometric":
        pmf = [0.0] + [(1 - geometric_p) ** (k - 1) * geometric_p for k in range(1, max_length + 1)]
    else:
        raise ValueError(f"unknown span distribution {distribution!r}")
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0  # the last length takes the tail: the cap, or Poisson's last 1e-18
    return cdf


def span_length_cdf(recipe: MaskRecipe) -> np.ndarray:
    """The recipe's span length distribution as the kernels sample it (cached: it is built once per recipe)."""
    return _span_length_cdf(recipe.span_distribution, recipe.poisson_lambda, recipe.geometric_p,
                            recipe.max_span_length)


def noise_arguments(recipe: MaskRecipe, vocab: VocabInfo) -> tuple:
    """The arguments of :func:`noise_chunk` after its chunk and state: the recipe and vocab as the kernels take them."""
    special = vocab.special
    return (span_length_cdf(recipe), recipe.mask_ratio, recipe.whole_word_mask, recipe.replace_length,
            recipe.random_ratio, recipe.keep_ratio, recipe.collapse_masks, recipe.permute_sentence_ratio,
            recipe.insert_ratio, recipe.rotate_ratio, vocab.is_continuation, vocab.is_special, special.mask,
            special.cls, special.sep, vocab.first_regular_id, vocab.size, recipe.seq_length)


def bart_example(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, recipe: MaskRecipe, vocab: VocabInfo,
                 compiled: bool = COMPILED) -> tuple[np.ndarray, np.ndarray]:
    """(source_ids, target_ids) int64 arrays of one chunk (int64 ids ``flat``, sentence i at
    ``flat[offsets[i]:offsets[i + 1]]``): permute sentences, corrupt spans, insert, rotate; the
    target is the original chunk. Draws from the kernel stream ``state`` (advanced in place)."""
    return run_kernel(noise_chunk, compiled, flat, offsets, state, *noise_arguments(recipe, vocab))
