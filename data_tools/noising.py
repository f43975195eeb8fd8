"""Pure noising functions for BART (text infilling) and PEGASUS (gap sentences).

Every function takes its randomness as an explicit ``numpy.random.Generator`` and
returns new lists: nothing here does I/O or touches global state, so each piece can be
checked on a 20-token example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

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


def pack_sentences(sentences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Group consecutive sentences into chunks of at most ``max_tokens`` tokens.

    A sentence longer than ``max_tokens`` is cut into pieces that each fill a chunk.
    Chunks never cross documents: callers pack one document at a time.
    """
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    current_length = 0
    for sentence in sentences:
        pieces = [sentence[i : i + max_tokens] for i in range(0, len(sentence), max_tokens)] or [[]]
        for piece in pieces:
            if not piece:
                continue
            if current and current_length + len(piece) > max_tokens:
                chunks.append(current)
                current, current_length = [], 0
            current.append(piece)
            current_length += len(piece)
    if current:
        chunks.append(current)
    return chunks


def permute_sentences(sentences: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """The sentences in a uniformly random order (BART's sentence permutation)."""
    order = rng.permutation(len(sentences))
    return [sentences[i] for i in order]


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


def sample_spans(length: int, rng: np.random.Generator, mask_ratio: float, poisson_lambda: float) -> list[Span]:
    """Non-adjacent spans covering ``round(length * mask_ratio)`` tokens, sorted by start.

    At least one unmasked token separates consecutive spans, so each span becomes its
    own [MASK]. If the sequence is too short for that, the spans drawn last are dropped.
    """
    num_to_mask = int(round(length * mask_ratio))
    if length == 0 or num_to_mask == 0:
        return []
    span_lengths = sample_span_lengths(num_to_mask, poisson_lambda, rng)
    # Keep as many spans as fit with a gap between each pair.
    while span_lengths and sum(span_lengths) + len(span_lengths) - 1 > length:
        span_lengths.pop()
    if not span_lengths:
        return []
    num_spans = len(span_lengths)
    free = length - sum(span_lengths) - (num_spans - 1)  # unmasked tokens beyond the mandatory gaps
    # Stars and bars: split `free` tokens into num_spans + 1 gaps uniformly.
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


def apply_text_infilling(ids: list[int], spans: list[Span], mask_id: int) -> list[int]:
    """Replace each span by a single ``mask_id`` (a zero-length span inserts one)."""
    output: list[int] = []
    position = 0
    for start, span_length in spans:
        output.extend(ids[position:start])
        output.append(mask_id)
        position = start + span_length
    output.extend(ids[position:])
    return output


@dataclass(frozen=True, slots=True)
class BartNoiseConfig:
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    permute_sentences: bool = True


def build_bart_example(
    sentences: list[list[int]], rng: np.random.Generator, noise: BartNoiseConfig, special: SpecialIds, seq_length: int
) -> tuple[list[int], list[int]]:
    """(source_ids, target_ids) for one packed chunk: permute, infill, reconstruct the original."""
    original = [token for sentence in sentences for token in sentence]
    ordered = permute_sentences(sentences, rng) if noise.permute_sentences and len(sentences) > 1 else sentences
    shuffled = [token for sentence in ordered for token in sentence]
    spans = sample_spans(len(shuffled), rng, noise.mask_ratio, noise.poisson_lambda)
    noised = apply_text_infilling(shuffled, spans, special.mask)[: seq_length - 2]
    return [special.cls, *noised, special.sep], [*original[: seq_length - 1], special.sep]


def select_gap_sentences(
    num_sentences: int, ratio: float, strategy: Literal["random", "lead"], rng: np.random.Generator
) -> list[int]:
    """Indices (sorted) of the sentences to remove: ``round(n * ratio)``, at least one."""
    count = min(num_sentences, max(1, int(round(num_sentences * ratio))))
    if strategy == "lead":
        return list(range(count))
    if strategy == "random":
        return sorted(rng.choice(num_sentences, size=count, replace=False).tolist())
    raise ValueError(f"unknown sentence selection strategy {strategy!r}")


def build_gsg_example(
    sentences: list[list[int]], selected: list[int], special: SpecialIds, tgt_seq_length: int
) -> tuple[list[int], list[int]]:
    """(source_ids, target_ids): each selected sentence becomes one [MASK] in the source,
    and the target is the selected sentences in document order, then [SEP]."""
    chosen = set(selected)
    source = [special.cls]
    target: list[int] = []
    for index, sentence in enumerate(sentences):
        if index in chosen:
            source.append(special.mask)
            target.extend(sentence)
        else:
            source.extend(sentence)
    source.append(special.sep)
    return source, [*target[: tgt_seq_length - 1], special.sep]
