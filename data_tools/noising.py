"""Pure noising functions for BART (text infilling) and PEGASUS (gap sentences).

Every function takes its randomness as an explicit ``numpy.random.Generator`` (BART's
compiled kernels draw from a SplitMix64 stream keyed by it, see data_tools.random_streams) and
returns new lists: nothing here does I/O or touches global state, so each piece can be
checked on a 20-token example. The hot loops are kernels (data_tools.compiled): compiled with
numba, or run as the same Python code without it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data_tools.compiled import COMPILED, kernel
from data_tools.random_streams import below, kernel_state, stream_key_kernel as _stream_key, uniform, wrapping_arithmetic

Span = tuple[int, int]  # (start, length); length 0 is an insertion point


@dataclass(frozen=True, slots=True)
class SpecialIds:
    pad: int = 0
    unk: int = 100
    cls: int = 101
    sep: int = 102
    mask: int = 103

    @classmethod
    def from_manifest(cls, special_token_ids: dict[str, int]) -> "SpecialIds":
        return cls(
            pad=special_token_ids["[PAD]"],
            unk=special_token_ids["[UNK]"],
            cls=special_token_ids["[CLS]"],
            sep=special_token_ids["[SEP]"],
            mask=special_token_ids["[MASK]"],
        )


def plan_chunks(sentence_lengths: list[int], max_tokens: int) -> list[list[tuple[int, int, int]]]:
    """The packing of :func:`pack_sentences` from lengths alone: each chunk is a list of
    (sentence index, start, end) pieces. Lets a trainer index chunks without reading tokens."""
    chunks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    current_length = 0
    for index, length in enumerate(sentence_lengths):
        for start in range(0, length, max_tokens):
            end = min(start + max_tokens, length)
            if current and current_length + end - start > max_tokens:
                chunks.append(current)
                current, current_length = [], 0
            current.append((index, start, end))
            current_length += end - start
    if current:
        chunks.append(current)
    return chunks


def pack_sentences(sentences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Group consecutive sentences into chunks of at most ``max_tokens`` tokens.

    A sentence longer than ``max_tokens`` is cut into pieces that each fill a chunk.
    Chunks never cross documents: callers pack one document at a time.
    """
    plan = plan_chunks([len(sentence) for sentence in sentences], max_tokens)
    return [[sentences[index][start:end] for index, start, end in chunk] for chunk in plan]


@dataclass(frozen=True, slots=True)
class BartNoiseConfig:
    """BART's noising (fairseq ``DenoisingDataset`` semantics) and UER-py's variant.

    Spans are drawn in words when ``whole_word_mask`` (a Latin word split into ``##``
    pieces is masked whole; a Chinese character is its own word).
    """

    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    span_distribution: Literal["poisson", "geometric"] = "poisson"
    geometric_p: float = 0.2
    max_span_length: int = 10
    replace_length: Literal[-1, 0, 1] = 1
    random_ratio: float = 0.1
    keep_ratio: float = 0.0
    collapse_masks: bool = False
    permute_sentence_ratio: float = 1.0
    rotate_ratio: float = 0.0
    insert_ratio: float = 0.0
    whole_word_mask: bool = True


@dataclass(frozen=True)
class VocabInfo:
    """What noising needs to know of the vocab: its size, specials and ``##`` pieces."""

    size: int
    special: SpecialIds
    is_continuation: np.ndarray  # bool per id
    is_special: np.ndarray  # bool per id: [PAD] [UNK] [CLS] [SEP] [MASK] and [unused*]
    first_regular_id: int  # random replacement tokens are drawn from ids >= this

    @classmethod
    def from_tokens(cls, tokens: list[str], special: SpecialIds) -> "VocabInfo":
        is_special = np.array([t.startswith("[") and t.endswith("]") and len(t) > 2 for t in tokens], dtype=bool)
        regular = np.flatnonzero(~is_special)
        return cls(
            size=len(tokens),
            special=special,
            is_continuation=np.array([t.startswith("##") for t in tokens], dtype=bool),
            is_special=is_special,
            first_regular_id=int(regular[0]) if len(regular) else 0,
        )


# -- BART -------------------------------------------------------------------------------------------
# One compiled kernel per chunk (``_bart_example``) built from the small kernels below, which the
# Python wrappers further down (sample_span_lengths, place_spans, noise_spans, ...) expose one by
# one for tests; each wrapper runs the compiled kernel or, with ``compiled=False``, its Python twin. All
# randomness comes from the chunk's SplitMix64 stream (data_tools.random_streams), in a fixed order:
# sentence permutation, span lengths, span placement, then per span its action and replacement
# tokens, insertion, rotation.


@kernel
def _round_half_even(x: float) -> int:
    """Python's ``round(x)`` for a float: halves go to the even neighbour."""
    floor = math.floor(x)
    rest = x - floor
    if rest > 0.5 or (rest == 0.5 and floor % 2 == 1):
        floor += 1
    return int(floor)


@kernel
def _span_lengths(state: np.ndarray, num_to_mask: int, cdf: np.ndarray) -> np.ndarray:
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
def _choose_sorted(state: np.ndarray, population: int, count: int) -> np.ndarray:
    """``count`` distinct values of range(population), uniformly, in increasing order (Floyd's
    algorithm: ``count`` draws, then one pass over a bitmap instead of a sort)."""
    chosen = np.zeros(population, np.bool_)
    for j in range(population - count, population):
        t = below(state, j + 1)
        chosen[j if chosen[t] else t] = True
    values = np.empty(count, np.int64)
    filled = 0
    for value in range(population):
        if chosen[value]:
            values[filled] = value
            filled += 1
    return values


@kernel
def _place_spans(state: np.ndarray, length: int, span_lengths: np.ndarray) -> np.ndarray:
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
    cuts = _choose_sorted(state, free + num_spans, num_spans)
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
def _permute_sentences(state: np.ndarray, num_sentences: int, ratio: float) -> np.ndarray:
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
def _noise_spans(tokens: np.ndarray, state: np.ndarray, cdf: np.ndarray, mask_ratio: float, whole_word: bool,
                 replace_length: int, random_ratio: float, keep_ratio: float, collapse: bool,
                 is_continuation: np.ndarray, is_special: np.ndarray, mask_id: int, first_regular: int,
                 vocab_size: int) -> np.ndarray:
    """Span corruption of one token sequence (see :func:`noise_spans`)."""
    n = len(tokens)
    # unit u covers tokens[bounds[u]:bounds[u + 1]]: a word (its ## pieces with it) or a token
    bounds = np.empty(n + 1, np.int64)
    units = 0
    for position in range(n):
        if position == 0 or not whole_word or not is_continuation[tokens[position]]:
            bounds[units] = position
            units += 1
    bounds[units] = n
    num_to_mask = _round_half_even(units * mask_ratio)
    if num_to_mask == 0:
        return tokens.copy()
    lengths = _span_lengths(state, num_to_mask, cdf)
    starts = _place_spans(state, units, lengths)
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
def _insert_random_tokens(tokens: np.ndarray, state: np.ndarray, ratio: float, random_ratio: float,
                          mask_id: int, first_regular: int, vocab_size: int) -> np.ndarray:
    """fairseq's insertion noise (see :func:`insert_random_tokens`)."""
    count = int(math.ceil(len(tokens) * ratio))
    if count == 0:
        return tokens.copy()
    total = len(tokens) + count
    positions = _choose_sorted(state, total, count)
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
def _bart_example(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, cdf: np.ndarray, mask_ratio: float,
                  whole_word: bool, replace_length: int, random_ratio: float, keep_ratio: float, collapse: bool,
                  permute_ratio: float, insert_ratio: float, rotate_ratio: float, is_continuation: np.ndarray,
                  is_special: np.ndarray, mask_id: int, cls_id: int, sep_id: int, first_regular: int,
                  vocab_size: int, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of one chunk (see :func:`build_bart_example`)."""
    num_sentences = len(offsets) - 1
    tokens = flat
    if permute_ratio > 0 and num_sentences > 1:
        order = _permute_sentences(state, num_sentences, permute_ratio)
        tokens = np.empty_like(flat)
        written = 0
        for sentence in order:
            length = offsets[sentence + 1] - offsets[sentence]
            tokens[written:written + length] = flat[offsets[sentence]:offsets[sentence + 1]]
            written += length
    noised = _noise_spans(tokens, state, cdf, mask_ratio, whole_word, replace_length, random_ratio, keep_ratio,
                          collapse, is_continuation, is_special, mask_id, first_regular, vocab_size)
    if insert_ratio > 0:
        noised = _insert_random_tokens(noised, state, insert_ratio, random_ratio, mask_id, first_regular,
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


@kernel
def _plan_block_chunks(document_offsets: np.ndarray, sentence_offsets: np.ndarray, max_tokens: int) -> tuple:
    """:func:`plan_chunks` of every document of a block at once: (piece ends as token positions,
    each chunk's first piece (one entry more), each chunk's first token, each chunk's document)."""
    pieces_bound = 0
    for sentence in range(document_offsets[0], document_offsets[len(document_offsets) - 1]):
        length = sentence_offsets[sentence + 1] - sentence_offsets[sentence]
        pieces_bound += (length + max_tokens - 1) // max_tokens
    piece_ends = np.empty(pieces_bound, np.int64)
    chunk_first_piece = np.empty(pieces_bound + 1, np.int64)
    chunk_start = np.empty(pieces_bound, np.int64)
    chunk_document = np.empty(pieces_bound, np.int64)
    pieces = chunks = 0
    for document in range(len(document_offsets) - 1):
        current = 0
        for sentence in range(document_offsets[document], document_offsets[document + 1]):
            begin, end = sentence_offsets[sentence], sentence_offsets[sentence + 1]
            for start in range(begin, end, max_tokens):
                stop = min(start + max_tokens, end)
                if current > 0 and current + stop - start > max_tokens:
                    current = 0
                if current == 0:
                    chunk_first_piece[chunks] = pieces
                    chunk_start[chunks] = start
                    chunk_document[chunks] = document
                    chunks += 1
                piece_ends[pieces] = stop
                pieces += 1
                current += stop - start
    chunk_first_piece[chunks] = pieces
    return piece_ends, chunk_first_piece[:chunks + 1], chunk_start[:chunks], chunk_document[:chunks]


@kernel
def _chunk_arrays(ids: np.ndarray, piece_ends: np.ndarray, chunk_first_piece: np.ndarray, chunk_start: np.ndarray,
                  chunk: int) -> tuple:
    """(int64 ids, piece offsets) of one planned chunk."""
    first, last = chunk_first_piece[chunk], chunk_first_piece[chunk + 1]
    start = chunk_start[chunk]
    flat = ids[start:piece_ends[last - 1]].astype(np.int64)
    offsets = np.empty(last - first + 1, np.int64)
    offsets[0] = 0
    for piece in range(first, last):
        offsets[piece - first + 1] = piece_ends[piece] - start
    return flat, offsets


@kernel
def _bart_documents(document_offsets: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray,
                    first_document: int, stream_seed: np.ndarray, max_tokens: int, cdf: np.ndarray, mask_ratio: float,
                    whole_word: bool, replace_length: int, random_ratio: float, keep_ratio: float, collapse: bool,
                    permute_ratio: float, insert_ratio: float, rotate_ratio: float, is_continuation: np.ndarray,
                    is_special: np.ndarray, mask_id: int, cls_id: int, sep_id: int, first_regular: int,
                    vocab_size: int, seq_length: int) -> tuple:
    """Every BART example of a block of documents straight from Arrow's buffers (document k of the
    block is sentences ``document_offsets[k]:document_offsets[k + 1]``, sentence s is
    ``ids[sentence_offsets[s]:sentence_offsets[s + 1]]``): each document packed as
    :func:`plan_chunks` packs it, each chunk noised by :func:`_bart_example` from the stream keyed by
    (``stream_seed``..., document index, chunk number), as the per-document path draws them.

    Returns (source values, source offsets, target values, target offsets), int64.
    """
    piece_ends, chunk_first_piece, chunk_start, chunk_document = _plan_block_chunks(
        document_offsets, sentence_offsets, max_tokens)
    chunks = len(chunk_start)
    source_values = np.empty(chunks * seq_length, np.int64)
    target_values = np.empty(chunks * seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    state = np.empty(1, np.uint64)
    chunk_of_document = 0
    for chunk in range(chunks):
        if chunk == 0 or chunk_document[chunk] != chunk_document[chunk - 1]:
            chunk_of_document = 0
        chunk_of_document += 1  # LazyGenerator.kernel_stream counts streams from 1
        state[0] = _stream_key(stream_seed, first_document + chunk_document[chunk], chunk_of_document)
        flat, offsets = _chunk_arrays(ids, piece_ends, chunk_first_piece, chunk_start, chunk)
        source, target = _bart_example(flat, offsets, state, cdf, mask_ratio, whole_word, replace_length,
                                       random_ratio, keep_ratio, collapse, permute_ratio, insert_ratio, rotate_ratio,
                                       is_continuation, is_special, mask_id, cls_id, sep_id, first_regular, vocab_size,
                                       seq_length)
        source_values[source_offsets[chunk]:source_offsets[chunk] + len(source)] = source
        source_offsets[chunk + 1] = source_offsets[chunk] + len(source)
        target_values[target_offsets[chunk]:target_offsets[chunk] + len(target)] = target
        target_offsets[chunk + 1] = target_offsets[chunk] + len(target)
    return (source_values[:source_offsets[chunks]], source_offsets, target_values[:target_offsets[chunks]],
            target_offsets)


def bart_examples_of_documents(document_offsets: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray,
                               first_document: int, stream_seed: list[int], noise: BartNoiseConfig, vocab: VocabInfo,
                               seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BART examples of consecutive documents given as Arrow's flat buffers (a ``list<list<id>>``
    column's two offset arrays and its values), identical to :func:`build_bart_example` on each chunk of
    :func:`pack_sentences` with the generator ``LazyGenerator([*stream_seed, document index])``.

    Returns (source values, source offsets, target values, target offsets), int64: no Python object
    per token or per example. Needs the compiled kernels (the per-document path is the fallback).
    """
    special = vocab.special
    return _bart_documents(
        np.asarray(document_offsets, np.int64), np.asarray(sentence_offsets, np.int64), ids, first_document,
        np.asarray(stream_seed, np.uint64), seq_length - 2, span_length_cdf(noise), noise.mask_ratio,
        noise.whole_word_mask, noise.replace_length, noise.random_ratio, noise.keep_ratio, noise.collapse_masks,
        noise.permute_sentence_ratio, noise.insert_ratio, noise.rotate_ratio, vocab.is_continuation, vocab.is_special,
        special.mask, special.cls, special.sep, vocab.first_regular_id, vocab.size, seq_length)


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


def span_length_cdf(noise: BartNoiseConfig) -> np.ndarray:
    return _span_length_cdf(noise.span_distribution, noise.poisson_lambda, noise.geometric_p, noise.max_span_length)


def _run(function, compiled: bool, *args):
    """A kernel, or (``compiled=False``) its Python twin, whose SplitMix64 arithmetic wraps on purpose."""
    with wrapping_arithmetic(compiled):
        return (function if compiled else function.py_func)(*args)


def sample_span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator,
                        compiled: bool = COMPILED) -> list[int]:
    """Poisson span lengths whose sum is exactly ``num_to_mask`` (the last one is trimmed)."""
    cdf = _span_length_cdf("poisson", poisson_lambda, 0.0, 0)
    return _run(_span_lengths, compiled, kernel_state(rng), num_to_mask, cdf).tolist()


def sample_geometric_span_lengths(num_to_mask: int, p: float, max_length: int, rng: np.random.Generator,
                                  compiled: bool = COMPILED) -> list[int]:
    """Geometric(p) span lengths capped at ``max_length`` (UER-py's span masking), summing to ``num_to_mask``."""
    cdf = _span_length_cdf("geometric", 0.0, p, max_length)
    return _run(_span_lengths, compiled, kernel_state(rng), num_to_mask, cdf).tolist()


def place_spans(length: int, span_lengths: list[int], rng: np.random.Generator,
                compiled: bool = COMPILED) -> list[Span]:
    """Non-adjacent spans of the given lengths at uniformly random places, sorted by start;
    the spans drawn last are dropped when the sequence is too short for all of them."""
    starts = _run(_place_spans, compiled, kernel_state(rng), length, np.asarray(span_lengths, np.int64))
    return list(zip(starts.tolist(), span_lengths))


def sample_spans(length: int, rng: np.random.Generator, mask_ratio: float, poisson_lambda: float,
                 compiled: bool = COMPILED) -> list[Span]:
    """Non-adjacent spans with Poisson lengths covering ``round(length * mask_ratio)`` units, drawn
    from one stream in the order :func:`noise_spans` draws them."""
    num_to_mask = round(length * mask_ratio)
    if length == 0 or num_to_mask == 0:
        return []
    cdf = _span_length_cdf("poisson", poisson_lambda, 0.0, 0)
    state = kernel_state(rng)
    lengths = _run(_span_lengths, compiled, state, num_to_mask, cdf)
    starts = _run(_place_spans, compiled, state, length, lengths)
    return list(zip(starts.tolist(), lengths.tolist()))


def permute_sentence_order(num_sentences: int, ratio: float, rng: np.random.Generator,
                           compiled: bool = COMPILED) -> list[int]:
    """fairseq's sentence permutation: ``ceil(n * ratio)`` sentences change places among themselves."""
    return _run(_permute_sentences, compiled, kernel_state(rng), num_sentences, ratio).tolist()


def noise_spans(ids: list[int], rng: np.random.Generator, noise: BartNoiseConfig, vocab: VocabInfo,
                compiled: bool = COMPILED) -> list[int]:
    """Span corruption of one token sequence: spans in words (or tokens), each replaced
    by [MASK] (per ``replace_length``), random tokens, or left unchanged. Spans touching a
    special token are left alone, so special tokens are never masked."""
    return _run(_noise_spans, compiled, np.asarray(ids, dtype=np.int64), kernel_state(rng), span_length_cdf(noise),
                noise.mask_ratio, noise.whole_word_mask, noise.replace_length, noise.random_ratio, noise.keep_ratio,
                noise.collapse_masks, vocab.is_continuation, vocab.is_special, vocab.special.mask,
                vocab.first_regular_id, vocab.size).tolist()


def insert_random_tokens(ids: list[int], ratio: float, rng: np.random.Generator, noise: BartNoiseConfig,
                         vocab: VocabInfo, compiled: bool = COMPILED) -> list[int]:
    """fairseq's insertion noise: ``ceil(len * ratio)`` new tokens, [MASK] or (``random_ratio``) random."""
    return _run(_insert_random_tokens, compiled, np.asarray(ids, dtype=np.int64), kernel_state(rng), ratio,
                noise.random_ratio, vocab.special.mask, vocab.first_regular_id, vocab.size).tolist()


def build_bart_example(
    sentences: list[list[int]], rng: np.random.Generator, noise: BartNoiseConfig, vocab: VocabInfo, seq_length: int,
    compiled: bool = COMPILED,
) -> tuple[np.ndarray, np.ndarray]:
    """(source_ids, target_ids) int64 arrays for one packed chunk: permute sentences, corrupt
    spans, insert, rotate; the target is the original chunk. One kernel call, drawing from one
    new stream of ``rng`` (see :func:`data_tools.random_streams.kernel_state`). Arrays, not
    lists: they go to Arrow and across processes without a per-token Python object."""
    flat, offsets = flatten_sentences(sentences)
    special = vocab.special
    return _run(_bart_example, compiled, flat, offsets, kernel_state(rng), span_length_cdf(noise), noise.mask_ratio,
                noise.whole_word_mask, noise.replace_length, noise.random_ratio, noise.keep_ratio, noise.collapse_masks,
                noise.permute_sentence_ratio, noise.insert_ratio, noise.rotate_ratio, vocab.is_continuation,
                vocab.is_special, special.mask, special.cls, special.sep, vocab.first_regular_id, vocab.size, seq_length)


@kernel
def _rouge1_f1_from_counts(overlap: int, candidate_total: int, reference_total: int) -> float:
    """ROUGE-1 F1 = 2PR / (P + R) = 2 overlap / (|candidate| + |reference|), one rounding:
    equal scores are equal floats however they were reached, and ties go to the earlier sentence."""
    if overlap == 0 or candidate_total + reference_total == 0:
        return 0.0
    return (2.0 * overlap) / (candidate_total + reference_total)


@kernel
def _principal_sentences(flat: np.ndarray, offsets: np.ndarray, count: int, sequential: bool, unique: bool,
                         total: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Indices (unsorted) of PEGASUS's principal sentences of one chunk, from its token ids
    ``flat`` with sentence i at ``flat[offsets[i]:offsets[i + 1]]``.

    ``total`` and ``candidate`` are zeroed scratch counts of vocab size, left zeroed. The
    candidate set is the sentences selected so far plus sentence i (just sentence i when
    independent); its reference is the rest of the chunk. With ``unique`` both are sets.
    """
    num_sentences = len(offsets) - 1
    distinct_in_chunk = 0
    for k in range(len(flat)):
        if total[flat[k]] == 0:
            distinct_in_chunk += 1
        total[flat[k]] += 1
    chosen = np.zeros(num_sentences, dtype=np.bool_)
    selected = np.empty(count, dtype=np.int64)
    scores = np.zeros(num_sentences, dtype=np.float64)
    selected_tokens = 0
    for step in range(count):
        if step == 0 or sequential:
            for i in range(num_sentences):
                if chosen[i]:
                    continue
                for k in range(offsets[i], offsets[i + 1]):
                    candidate[flat[k]] += 1
                overlap = candidate_total = only_in_candidate = 0
                # the candidate's sentences: i (member -1), then, when sequential, those selected so far
                members = step if sequential else 0
                for member in range(-1, members):
                    j = i if member < 0 else selected[member]
                    for k in range(offsets[j], offsets[j + 1]):
                        token = flat[k]
                        in_candidate = candidate[token]
                        if in_candidate <= 0:
                            continue  # counted already (marked negative below)
                        in_reference = total[token] - in_candidate
                        if unique:
                            candidate_total += 1
                            overlap += 1 if in_reference > 0 else 0
                        else:
                            candidate_total += in_candidate
                            overlap += min(in_candidate, in_reference)
                        only_in_candidate += 1 if in_reference == 0 else 0
                        candidate[token] = -in_candidate
                length = offsets[i + 1] - offsets[i]
                if unique:
                    reference_total = distinct_in_chunk - only_in_candidate
                else:
                    reference_total = len(flat) - selected_tokens - length
                scores[i] = _rouge1_f1_from_counts(overlap, candidate_total, reference_total)
                # restore: the selected sentences' counts stay, sentence i's are removed
                for member in range(-1, members):
                    j = i if member < 0 else selected[member]
                    for k in range(offsets[j], offsets[j + 1]):
                        if candidate[flat[k]] < 0:
                            candidate[flat[k]] = -candidate[flat[k]]
                for k in range(offsets[i], offsets[i + 1]):
                    candidate[flat[k]] -= 1
        best = -1
        for i in range(num_sentences):
            if not chosen[i] and (best < 0 or scores[i] > scores[best]):
                best = i  # strict: the earliest of equal scores
        chosen[best] = True
        selected[step] = best
        if sequential:
            for k in range(offsets[best], offsets[best + 1]):
                candidate[flat[k]] += 1
            selected_tokens += offsets[best + 1] - offsets[best]
    for k in range(len(flat)):
        total[flat[k]] = 0
        candidate[flat[k]] = 0
    return selected


@kernel
def _gsg_documents(document_offsets: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray, max_tokens: int,
                   ratio: float, principal: bool, keep_last: bool, sequential: bool, unique: bool, gap_action: int,
                   mask_id: int, cls_id: int, sep_id: int, tgt_seq_length: int, vocab_size: int) -> tuple:
    """PEGASUS examples of a block of documents (layout as :func:`_bart_documents`) for the recipes that
    draw nothing: principal (or lead) gap sentences, each masked (0), removed (1) or kept (2).

    Returns (source values, source offsets, target values, target offsets, examples per document).
    """
    piece_ends, chunk_first_piece, chunk_start, chunk_document = _plan_block_chunks(
        document_offsets, sentence_offsets, max_tokens)
    chunks = len(chunk_start)
    source_values = np.empty(chunks * (max_tokens + 2), np.int64)
    target_values = np.empty(chunks * tgt_seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    per_document = np.zeros(len(document_offsets) - 1, np.int64)
    total = np.zeros(vocab_size, np.int64)
    candidate = np.zeros(vocab_size, np.int64)
    examples = 0
    for chunk in range(chunks):
        flat, offsets = _chunk_arrays(ids, piece_ends, chunk_first_piece, chunk_start, chunk)
        num_sentences = len(offsets) - 1
        if num_sentences < 2:
            continue  # a single sentence leaves nothing to condition on
        candidates = num_sentences - 1 if keep_last else num_sentences
        count = min(candidates, max(1, _round_half_even(num_sentences * ratio)))
        chosen = np.zeros(num_sentences, np.bool_)
        if count > 0:
            if principal:
                selected = _principal_sentences(flat[:offsets[candidates]], offsets[:candidates + 1],
                                                min(count, candidates), sequential, unique, total, candidate)
                for index in selected:
                    chosen[index] = True
            else:
                chosen[:count] = True
        written = source_offsets[examples]
        source_values[written] = cls_id
        written += 1
        target_written = target_offsets[examples]
        target_end = target_written + tgt_seq_length - 1
        for sentence in range(num_sentences):
            begin, end = offsets[sentence], offsets[sentence + 1]
            if chosen[sentence]:
                for k in range(begin, end):
                    if target_written < target_end:
                        target_values[target_written] = flat[k]
                        target_written += 1
                if gap_action == 0:
                    source_values[written] = mask_id
                    written += 1
                elif gap_action == 2:
                    source_values[written:written + end - begin] = flat[begin:end]
                    written += end - begin
            else:
                source_values[written:written + end - begin] = flat[begin:end]
                written += end - begin
        source_values[written] = sep_id
        source_offsets[examples + 1] = written + 1
        target_values[target_written] = sep_id
        target_offsets[examples + 1] = target_written + 1
        per_document[chunk_document[chunk]] += 1
        examples += 1
    return (source_values[:source_offsets[examples]], source_offsets[:examples + 1],
            target_values[:target_offsets[examples]], target_offsets[:examples + 1], per_document)


GAP_ACTION_CODES = {"mask": 0, "remove": 1, "keep": 2}  # what _gsg_documents does with a gap sentence


def gsg_examples_of_documents(document_offsets: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray,
                              strategy: Literal["lead", "principal"], ratio: float, keep_last: bool,
                              rouge_mode: Literal["independent", "sequential"], rouge_unique: bool,
                              gap_action: Literal["mask", "remove", "keep"], special: SpecialIds, vocab_size: int,
                              seq_length: int, tgt_seq_length: int) -> tuple[np.ndarray, ...]:
    """PEGASUS examples of consecutive documents in Arrow's flat layout, identical to
    :func:`select_gap_sentences` + :func:`build_gsg_example` on each chunk of :func:`pack_sentences`,
    for the recipes that draw no random number (principal or lead selection; mask, remove or keep).

    Returns (source values, source offsets, target values, target offsets, examples per document), int64.
    """
    return _gsg_documents(
        np.asarray(document_offsets, np.int64), np.asarray(sentence_offsets, np.int64), ids, seq_length - 2,
        ratio, strategy == "principal", keep_last, rouge_mode == "sequential", rouge_unique,
        GAP_ACTION_CODES[gap_action], special.mask, special.cls, special.sep, tgt_seq_length,
        max(vocab_size, int(ids.max()) + 1 if len(ids) else 1))


# Zeroed count arrays of vocab size, reused: the kernel leaves them zeroed.
_scratch: dict[bool, tuple] = {}


def select_principal_sentences(
    sentences: list[list[int]], count: int, mode: Literal["independent", "sequential"], unique: bool
) -> list[int]:
    """PEGASUS's principal sentences: the ``count`` sentences with the highest ROUGE-1 F1
    against the rest of the document.

    ``independent`` scores each sentence alone and takes the top ``count`` (ties: earlier
    sentence first); ``sequential`` adds, one at a time, the sentence that maximizes the
    ROUGE-1 F1 of everything selected so far against the rest. Computed on token ids.
    """
    if mode not in ("independent", "sequential"):
        raise ValueError(f"unknown ROUGE mode {mode!r}")
    flat, offsets = flatten_sentences(sentences)
    return principal_sentences(flat, offsets, min(count, len(sentences)), mode == "sequential", unique)


def flatten_sentences(sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids of all sentences in order, offsets: sentence i is ``flat[offsets[i]:offsets[i + 1]]``)."""
    offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def principal_sentences(flat: np.ndarray, offsets: np.ndarray, count: int, sequential: bool, unique: bool,
                        compiled: bool = COMPILED) -> list[int]:
    """:func:`select_principal_sentences` on a flat int64 id array and sentence offsets, by the
    compiled kernel or (``compiled=False``) the same code run as Python on lists."""
    size = max(int(flat.max()) + 1 if len(flat) else 1, 1 << 15)
    scratch = _scratch.get(compiled)
    if scratch is None or len(scratch[0]) < size:
        scratch = _scratch[compiled] = ((np.zeros(size, np.int64), np.zeros(size, np.int64)) if compiled
                                        else ([0] * size, [0] * size))
    if compiled:
        chosen = _principal_sentences(flat, offsets, count, sequential, unique, *scratch)
    else:
        chosen = _principal_sentences.py_func(flat.tolist(), offsets.tolist(), count, sequential, unique, *scratch)
    return sorted(chosen.tolist())


def select_gap_sentences(
    sentences: list[list[int]],
    ratio: float,
    strategy: Literal["random", "lead", "principal"],
    rng: np.random.Generator,
    rouge_mode: Literal["independent", "sequential"] = "independent",
    rouge_unique: bool = False,
    keep_last: bool = False,
) -> list[int]:
    """Indices (sorted) of the sentences to turn into gaps: ``round(n * ratio)``, at least one.

    ``keep_last`` never selects the last sentence (UER-py's random selection).
    """
    num_sentences = len(sentences)
    candidates = num_sentences - 1 if keep_last else num_sentences
    count = min(candidates, max(1, int(round(num_sentences * ratio))))
    if count <= 0:
        return []
    if strategy == "lead":
        return list(range(count))
    if strategy == "random":
        return sorted(rng.choice(candidates, size=count, replace=False).tolist())
    if strategy == "principal":
        chosen = select_principal_sentences(sentences[:candidates], count, rouge_mode, rouge_unique)
        return chosen
    raise ValueError(f"unknown sentence selection strategy {strategy!r}")


def build_gsg_example(
    sentences: list[list[int]],
    selected: list[int],
    special: SpecialIds,
    tgt_seq_length: int,
    rng: np.random.Generator | None = None,
    gap_action: Literal["mask", "remove", "keep", "mixed"] = "mask",
) -> tuple[list[int], list[int]]:
    """(source_ids, target_ids): each selected sentence becomes one [MASK] in the source
    (or is removed, or kept; ``mixed`` = 80% mask / 10% remove / 10% keep per sentence), and
    the target is the selected sentences in document order, then [SEP]."""
    chosen = set(selected)
    source = [special.cls]
    target: list[int] = []
    for index, sentence in enumerate(sentences):
        if index not in chosen:
            source.extend(sentence)
            continue
        target.extend(sentence)
        action = gap_action
        if gap_action == "mixed":
            draw = rng.random()
            action = "mask" if draw < 0.8 else "remove" if draw < 0.9 else "keep"
        if action == "mask":
            source.append(special.mask)
        elif action == "keep":
            source.extend(sentence)
    source.append(special.sep)
    return source, [*target[: tgt_seq_length - 1], special.sep]
