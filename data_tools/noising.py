"""Pure noising functions for BART (text infilling) and PEGASUS (gap sentences).

Every function takes its randomness as an explicit ``numpy.random.Generator`` and
returns new lists: nothing here does I/O or touches global state, so each piece can be
checked on a 20-token example.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data_tools.compiled import COMPILED, kernel

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


def sample_span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> list[int]:
    """Poisson span lengths whose sum is exactly ``num_to_mask`` (the last one is trimmed).

    Zero-length spans are kept: BART inserts a [MASK] there that covers no token.
    """
    lengths: list[int] = []
    total = 0
    while total < num_to_mask:
        batch = rng.poisson(poisson_lambda, size=max(4, int((num_to_mask - total) / max(poisson_lambda, 1.0)) + 2))
        for length in batch.tolist():
            if total + length > num_to_mask:
                length = num_to_mask - total
            lengths.append(length)
            total += length
            if total >= num_to_mask:
                break
    return lengths


def sample_geometric_span_lengths(
    num_to_mask: int, p: float, max_length: int, rng: np.random.Generator
) -> list[int]:
    """Geometric(p) span lengths capped at ``max_length`` (UER-py's span masking), summing to ``num_to_mask``."""
    lengths: list[int] = []
    total = 0
    while total < num_to_mask:
        for length in np.minimum(rng.geometric(p, size=16), max_length).tolist():
            length = min(length, num_to_mask - total)
            lengths.append(length)
            total += length
            if total >= num_to_mask:
                break
    return lengths


def place_spans(length: int, span_lengths: list[int], rng: np.random.Generator) -> list[Span]:
    """Non-adjacent spans of the given lengths at uniformly random places, sorted by start.

    At least one unmasked unit separates consecutive spans, so each span stays its own
    [MASK]; if the sequence is too short for that, the spans drawn last are dropped.
    """
    span_lengths = list(span_lengths)
    while span_lengths and sum(span_lengths) + len(span_lengths) - 1 > length:
        span_lengths.pop()
    if not span_lengths:
        return []
    num_spans = len(span_lengths)
    free = length - sum(span_lengths) - (num_spans - 1)  # unmasked units beyond the mandatory gaps
    # Stars and bars: split `free` units into num_spans + 1 gaps uniformly.
    cuts = np.sort(rng.choice(free + num_spans, size=num_spans, replace=False)) - np.arange(num_spans)
    spans: list[Span] = []
    position = 0
    previous_cut = 0
    for index, (cut, span_length) in enumerate(zip(cuts.tolist(), span_lengths)):
        position += (cut - previous_cut) + (1 if index > 0 else 0)
        spans.append((position, span_length))
        position += span_length
        previous_cut = cut
    return spans


def sample_spans(length: int, rng: np.random.Generator, mask_ratio: float, poisson_lambda: float) -> list[Span]:
    """Non-adjacent spans with Poisson lengths covering ``round(length * mask_ratio)`` units."""
    num_to_mask = int(round(length * mask_ratio))
    if length == 0 or num_to_mask == 0:
        return []
    return place_spans(length, sample_span_lengths(num_to_mask, poisson_lambda, rng), rng)


def word_starts(ids: list[int], is_continuation: np.ndarray) -> list[int]:
    """Token positions where a word begins: every token but WordPiece's ``##`` continuations."""
    flags = is_continuation[np.asarray(ids, dtype=np.int64)]
    starts = np.flatnonzero(~flags)
    if len(ids) and (len(starts) == 0 or starts[0] != 0):
        starts = np.concatenate(([0], starts))
    return starts.tolist()


def permute_sentence_order(num_sentences: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """fairseq's sentence permutation: ``ceil(n * ratio)`` sentences change places among themselves."""
    order = np.arange(num_sentences)
    count = int(math.ceil(num_sentences * ratio))
    if count > 1:
        chosen = rng.permutation(num_sentences)[:count]
        order[chosen] = chosen[rng.permutation(count)]
    return order.tolist()


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


def noise_spans(
    ids: list[int], rng: np.random.Generator, noise: BartNoiseConfig, vocab: VocabInfo
) -> list[int]:
    """Span corruption of one token sequence: spans in words (or tokens), each replaced
    by [MASK] (per ``replace_length``), random tokens, or left unchanged. Spans touching a
    special token are left alone, so special tokens are never masked."""
    if not ids:
        return []
    starts = word_starts(ids, vocab.is_continuation) if noise.whole_word_mask else list(range(len(ids)))
    bounds = starts + [len(ids)]
    num_to_mask = int(round(len(starts) * noise.mask_ratio))
    if num_to_mask == 0:
        return list(ids)
    if noise.span_distribution == "poisson":
        spans = sample_spans(len(starts), rng, noise.mask_ratio, noise.poisson_lambda)
    else:
        lengths = sample_geometric_span_lengths(num_to_mask, noise.geometric_p, noise.max_span_length, rng)
        spans = place_spans(len(starts), lengths, rng)
    special = vocab.is_special[np.asarray(ids, dtype=np.int64)].tolist()
    actions = rng.random(len(spans)).tolist()
    mask_id = vocab.special.mask
    output: list[int] = []
    position = 0
    # A plain loop: with ~50 spans per 512 tokens it beats a dozen numpy calls per sequence.
    for (unit_start, unit_length), action in zip(spans, actions):
        start, end = bounds[unit_start], bounds[unit_start + unit_length]
        if any(special[start:end]):
            continue
        output.extend(ids[position:start])
        position = end
        if action < noise.random_ratio:
            count = 1 if noise.replace_length == 1 or start == end else (end - start if noise.replace_length else 0)
            output.extend(rng.integers(vocab.first_regular_id, vocab.size, size=count).tolist())
        elif action < noise.random_ratio + noise.keep_ratio:
            output.extend(ids[start:end])
        elif noise.replace_length == 1 or start == end:
            output.append(mask_id)
        elif noise.replace_length == -1:
            output.extend([mask_id] * (end - start))
    output.extend(ids[position:])
    if noise.collapse_masks:
        output = [t for i, t in enumerate(output) if not (t == mask_id and i and output[i - 1] == mask_id)]
    return output


def insert_random_tokens(ids: list[int], ratio: float, rng: np.random.Generator, noise: BartNoiseConfig,
                         vocab: VocabInfo) -> list[int]:
    """fairseq's insertion noise: ``ceil(len * ratio)`` new tokens, [MASK] or (``random_ratio``) random."""
    count = int(math.ceil(len(ids) * ratio))
    if count == 0:
        return ids
    total = len(ids) + count
    positions = set(rng.choice(total, size=count, replace=False).tolist())
    randoms = int(math.ceil(count * noise.random_ratio))
    fillers = [vocab.special.mask] * (count - randoms) + rng.integers(
        vocab.first_regular_id, vocab.size, size=randoms).tolist()
    fillers = [fillers[i] for i in rng.permutation(count)]
    source = iter(ids)
    filler = iter(fillers)
    return [next(filler) if i in positions else next(source) for i in range(total)]


def build_bart_example(
    sentences: list[list[int]], rng: np.random.Generator, noise: BartNoiseConfig, vocab: VocabInfo, seq_length: int
) -> tuple[list[int], list[int]]:
    """(source_ids, target_ids) for one packed chunk: permute sentences, corrupt spans,
    insert, rotate; the target is the original chunk."""
    original = [token for sentence in sentences for token in sentence]
    if noise.permute_sentence_ratio > 0 and len(sentences) > 1:
        order = permute_sentence_order(len(sentences), noise.permute_sentence_ratio, rng)
        sentences = [sentences[i] for i in order]
    tokens = [token for sentence in sentences for token in sentence]
    noised = noise_spans(tokens, rng, noise, vocab)
    if noise.insert_ratio > 0:
        noised = insert_random_tokens(noised, noise.insert_ratio, rng, noise, vocab)
    if noise.rotate_ratio > 0 and len(noised) > 1 and rng.random() < noise.rotate_ratio:
        offset = int(rng.integers(1, len(noised)))
        noised = noised[offset:] + noised[:offset]
    special = vocab.special
    return [special.cls, *noised[: seq_length - 2], special.sep], [*original[: seq_length - 1], special.sep]


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
