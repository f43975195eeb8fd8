"""PEGASUS's gap sentence generation on one chunk: choose the gap sentences, then write the example.

A chunk of n sentences (pieces, see data_tools.masking.chunking) gets ``round(n * ratio)`` gaps, at
least one (:func:`gap_count`), chosen at random, as the lead sentences, or as the principal ones
(top ROUGE-1 F1 against the rest, :func:`rank_principal`). Each gap becomes one [MASK] in the
source, is removed, or kept (``mixed``: 80/10/10 per gap); the target is the gaps in document
order, then [SEP] (:func:`write_gsg_example`). :func:`gsg_chunk` does all of it for one chunk,
drawing from the chunk's SplitMix64 stream (data_tools.masking.streams) in a fixed order: the random
gap sentences, then one number per mixed gap in document order. The mask stage calls it from its
block kernel (data_tools.masking.blocks), online masking through :func:`gsg_example`.
"""

from __future__ import annotations

import numpy as np

from data_tools.compiled import COMPILED, kernel, run_kernel
from data_tools.masking.chunking import round_half_even
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import choose_sorted, uniform
from data_tools.masking.vocab import VocabInfo

# What write_gsg_example does with each sentence (ints: the kernels read them as constants). A
# mixed gap is resolved into one of the other three by choose_gaps before the example is written.
NOT_A_GAP, GAP_MASK, GAP_REMOVE, GAP_KEEP, GAP_MIXED = -1, 0, 1, 2, 3
GAP_ACTION_CODES = {"mask": GAP_MASK, "remove": GAP_REMOVE, "keep": GAP_KEEP, "mixed": GAP_MIXED}
SELECT_RANDOM, SELECT_LEAD, SELECT_PRINCIPAL = 0, 1, 2
SELECTION_CODES = {"random": SELECT_RANDOM, "lead": SELECT_LEAD, "principal": SELECT_PRINCIPAL}
# The mixed action, 80/10/10: a gap whose uniform draw is below the first bound is masked, below the
# second removed, else kept.
MIXED_MASK_BELOW, MIXED_REMOVE_BELOW = 0.8, 0.9


@kernel
def gap_count(num_sentences: int, ratio: float, keep_last: bool) -> tuple:
    """(candidates, count): the sentences that may become gaps (all but the last when ``keep_last``,
    UER-py's rule) and how many do: ``round(n * ratio)``, at least one, at most every candidate."""
    candidates = num_sentences - 1 if keep_last else num_sentences
    return candidates, min(candidates, max(1, round_half_even(num_sentences * ratio)))


@kernel
def rouge1_f1_from_counts(overlap: int, candidate_total: int, reference_total: int) -> float:
    """ROUGE-1 F1 = 2PR / (P + R) = 2 overlap / (|candidate| + |reference|), one rounding:
    equal scores are equal floats however they were reached, and ties go to the earlier sentence."""
    if overlap == 0 or candidate_total + reference_total == 0:
        return 0.0
    return (2.0 * overlap) / (candidate_total + reference_total)


@kernel
def rank_principal(flat: np.ndarray, offsets: np.ndarray, count: int, sequential: bool, unique: bool,
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
                scores[i] = rouge1_f1_from_counts(overlap, candidate_total, reference_total)
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


def principal_sentences(flat: np.ndarray, offsets: np.ndarray, count: int, sequential: bool, unique: bool,
                        compiled: bool = COMPILED) -> list[int]:
    """Indices (sorted) of the ``count`` principal sentences of a flat int64 id array and its sentence
    offsets, by the compiled kernel or (``compiled=False``) the same code run as Python on lists (a
    Python loop over lists runs about three times as fast as one over numpy scalars).

    ``independent`` (not ``sequential``) scores each sentence alone and takes the top ``count`` (ties:
    earlier sentence first); ``sequential`` adds, one at a time, the sentence that maximizes the
    ROUGE-1 F1 of everything selected so far against the rest.
    """
    size = max(int(flat.max()) + 1 if len(flat) else 1, 1 << 15)
    scratch = _scratch.get(compiled)
    if scratch is None or len(scratch[0]) < size:
        scratch = _scratch[compiled] = ((np.zeros(size, np.int64), np.zeros(size, np.int64)) if compiled
                                        else ([0] * size, [0] * size))
    if compiled:
        chosen = rank_principal(flat, offsets, count, sequential, unique, *scratch)
    else:
        chosen = rank_principal.py_func(flat.tolist(), offsets.tolist(), count, sequential, unique, *scratch)
    return sorted(chosen.tolist())


@kernel
def choose_gaps(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, gaps: np.ndarray, ratio: float,
                keep_last: bool, selection: int, sequential: bool, unique: bool, action: int, total: np.ndarray,
                candidate: np.ndarray) -> None:
    """Fill ``gaps`` (one entry a sentence) with each sentence's action code for :func:`write_gsg_example`,
    or NOT_A_GAP. ``selection`` is a SELECTION_CODES value, ``action`` a GAP_ACTION_CODES one;
    ``total`` and ``candidate`` are :func:`rank_principal`'s scratch. Random gaps are
    :func:`choose_sorted`'s draw among the candidates; then each mixed gap, in document order,
    draws one number."""
    num_sentences = len(offsets) - 1
    gaps[:] = NOT_A_GAP
    candidates, count = gap_count(num_sentences, ratio, keep_last)
    if count <= 0:
        return
    if selection == SELECT_RANDOM:
        chosen = choose_sorted(state, candidates, count)
    elif selection == SELECT_PRINCIPAL:
        chosen = rank_principal(flat[:offsets[candidates]], offsets[:candidates + 1], count, sequential, unique,
                                total, candidate)
    else:
        chosen = np.arange(count)
    for index in chosen:
        gaps[index] = action
    if action == GAP_MIXED:
        for sentence in range(num_sentences):
            if gaps[sentence] == GAP_MIXED:
                draw = uniform(state)
                if draw < MIXED_MASK_BELOW:
                    gaps[sentence] = GAP_MASK
                elif draw < MIXED_REMOVE_BELOW:
                    gaps[sentence] = GAP_REMOVE
                else:
                    gaps[sentence] = GAP_KEEP


@kernel
def write_gsg_example(flat: np.ndarray, offsets: np.ndarray, gaps: np.ndarray, mask_id: int, cls_id: int, sep_id: int,
                      tgt_seq_length: int, source: np.ndarray, source_at: int, target: np.ndarray,
                      target_at: int) -> tuple:
    """Write one chunk's example into ``source`` from ``source_at`` and ``target`` from ``target_at``;
    returns where each ends. ``gaps[i]`` is sentence i's action code, or NOT_A_GAP.

    Source: [CLS], the sentences, each gap a [MASK] (0), removed (1) or kept (2), [SEP]. Target: the
    gap sentences in order, cut to ``tgt_seq_length - 1`` tokens, then [SEP].
    """
    written = source_at
    source[written] = cls_id
    written += 1
    target_written = target_at
    target_end = target_at + tgt_seq_length - 1
    for sentence in range(len(offsets) - 1):
        begin, end = offsets[sentence], offsets[sentence + 1]
        if gaps[sentence] != NOT_A_GAP:
            for k in range(begin, end):
                if target_written < target_end:
                    target[target_written] = flat[k]
                    target_written += 1
            if gaps[sentence] == GAP_MASK:
                source[written] = mask_id
                written += 1
            elif gaps[sentence] == GAP_KEEP:
                source[written:written + end - begin] = flat[begin:end]
                written += end - begin
        else:
            source[written:written + end - begin] = flat[begin:end]
            written += end - begin
    source[written] = sep_id
    target[target_written] = sep_id
    return written + 1, target_written + 1


@kernel
def gsg_chunk(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, gaps: np.ndarray, total: np.ndarray,
              candidate: np.ndarray, source: np.ndarray, source_at: int, target: np.ndarray, target_at: int,
              ratio: float, keep_last: bool, selection: int, sequential: bool, unique: bool, action: int,
              mask_id: int, cls_id: int, sep_id: int, tgt_seq_length: int) -> tuple:
    """One chunk's example written into ``source`` and ``target`` from ``source_at`` and ``target_at``
    (:func:`choose_gaps`, then :func:`write_gsg_example`); returns where each ends. ``gaps`` is
    scratch of at least a sentence each; the arguments after ``target_at`` are :func:`gsg_arguments`."""
    sentence_gaps = gaps[:len(offsets) - 1]
    choose_gaps(flat, offsets, state, sentence_gaps, ratio, keep_last, selection, sequential, unique, action, total,
                candidate)
    return write_gsg_example(flat, offsets, sentence_gaps, mask_id, cls_id, sep_id, tgt_seq_length, source, source_at,
                             target, target_at)


def gsg_arguments(recipe: MaskRecipe, vocab: VocabInfo) -> tuple:
    """The arguments of :func:`gsg_chunk` after ``target_at``: the recipe and vocab as the kernels take them."""
    special = vocab.special
    return (recipe.gap_sentence_ratio, recipe.keep_last_sentence, SELECTION_CODES[recipe.sentence_selection_strategy],
            recipe.rouge_mode == "sequential", recipe.rouge_unique, GAP_ACTION_CODES[recipe.gap_action], special.mask,
            special.cls, special.sep, recipe.tgt_seq_length)


def principal_scratch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed count arrays for :func:`rank_principal`, one entry per id (``vocab_size`` above the
    largest id); they come back zeroed, so one pair serves every chunk of a call."""
    return np.zeros(vocab_size, np.int64), np.zeros(vocab_size, np.int64)


# Online masking's scratch, reused from chunk to chunk (allocating it costs more than a chunk's example).
_online_scratch: list[tuple[np.ndarray, np.ndarray]] = []


def gsg_example(flat: np.ndarray, offsets: np.ndarray, state: np.ndarray, recipe: MaskRecipe, vocab: VocabInfo,
                compiled: bool = COMPILED) -> tuple[np.ndarray, np.ndarray]:
    """(source_ids, target_ids) int64 arrays of one chunk (int64 ids ``flat``, sentence i at
    ``flat[offsets[i]:offsets[i + 1]]``), drawing from the kernel stream ``state`` (advanced in place)."""
    size = max(vocab.size, int(flat.max()) + 1 if len(flat) else 1)
    if not _online_scratch or len(_online_scratch[0][0]) < size:
        _online_scratch[:] = [principal_scratch(size)]
    gaps = np.empty(len(offsets) - 1, np.int64)
    source = np.empty(len(flat) + len(gaps) + 2, np.int64)  # a [MASK] per gap at most adds one token each
    target = np.empty(recipe.tgt_seq_length, np.int64)
    source_end, target_end = run_kernel(gsg_chunk, compiled, flat, offsets, state, gaps, *_online_scratch[0], source, 0,
                                        target, 0, *gsg_arguments(recipe, vocab))
    return source[:source_end], target[:target_end]
