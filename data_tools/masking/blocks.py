"""The mask stage's unit of work: every example of a block of documents, from Arrow's flat buffers.

A block is planned into chunks in one kernel call (data_tools.masking.chunking), then masked:
BART in one kernel call for the whole block; PEGASUS's recipes that draw nothing (lead or
principal gaps, one gap action) likewise; random gaps and mixed actions chunk by chunk with
numpy's generator, through the same kernels. Without numba (``compiled=False``) BART runs its
block kernel's own Python code, and PEGASUS goes chunk by chunk. Either way the output is the same,
and it depends only on (seed, pass, document, chunk): never on how documents are split into
blocks or across workers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from data_tools.compiled import COMPILED, kernel, run_kernel
from data_tools.masking.bart import noise_arguments, noise_chunk
from data_tools.masking.chunking import ChunkPlan, chunk_arrays, plan_chunks
from data_tools.masking.pegasus import (
    GAP_ACTION_CODES,
    NOT_A_GAP,
    gap_count,
    gsg_example,
    rank_principal,
    write_gsg_example,
)
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import absorb_key, masking_randomness
from data_tools.masking.vocab import VocabInfo
from data_tools.shards import DocumentBlock, columns_from_sequences

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # source values, offsets; target values, offsets
# Why a document gives no gsg example: every chunk of it is a single sentence (see MaskRecipe.min_chunk_sentences).
SKIPPED_SINGLE_SENTENCE_CHUNKS = "fewer_than_two_sentences"


@kernel
def _bart_documents(document: np.ndarray, number: np.ndarray, first_sentence: np.ndarray, start: np.ndarray,
                    end: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray, first_document: int,
                    seed: np.uint64, pass_index: np.uint64, seq_length: int, noise: tuple) -> tuple:
    """BART examples of the planned chunks (:class:`ChunkPlan`'s arrays) of a block whose first document is
    ``first_document`` in the corpus; ``noise`` is :func:`noise_arguments`. Chunk c of document d draws
    from the (c + 1)-th kernel stream of ``masking_randomness(seed, pass, d)``: its key
    ``stream_key(seed, pass, d, c + 1)`` is built here, part by part."""
    # np.uint64 around each key: run as Python beside compiled kernels, a key comes back as a Python int
    pass_key = absorb_key(np.uint64(absorb_key(np.uint64(0), seed)), pass_index)
    chunks = len(start)
    source_values = np.empty(chunks * seq_length, np.int64)
    target_values = np.empty(chunks * seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    state = np.empty(1, np.uint64)
    for chunk in range(chunks):
        document_key = absorb_key(np.uint64(pass_key), np.uint64(first_document + document[chunk]))
        state[0] = absorb_key(np.uint64(document_key), np.uint64(number[chunk] + 1))
        flat, offsets = chunk_arrays(ids, sentence_offsets, first_sentence[chunk], start[chunk], end[chunk])
        source, target = noise_chunk(flat, offsets, state, *noise)
        source_values[source_offsets[chunk]:source_offsets[chunk] + len(source)] = source
        source_offsets[chunk + 1] = source_offsets[chunk] + len(source)
        target_values[target_offsets[chunk]:target_offsets[chunk] + len(target)] = target
        target_offsets[chunk + 1] = target_offsets[chunk] + len(target)
    return (source_values[:source_offsets[chunks]], source_offsets, target_values[:target_offsets[chunks]],
            target_offsets)


@kernel
def _gsg_documents(first_sentence: np.ndarray, start: np.ndarray, end: np.ndarray, sentence_offsets: np.ndarray,
                   ids: np.ndarray, max_tokens: int, ratio: float, keep_last: bool, principal: bool, sequential: bool,
                   unique: bool, action: int, mask_id: int, cls_id: int, sep_id: int, tgt_seq_length: int,
                   vocab_size: int) -> tuple:
    """PEGASUS examples of the planned chunks of a block for the recipes that draw nothing: the lead
    or principal gap sentences, each given ``action``. What :func:`gsg_example` builds chunk by chunk."""
    chunks = len(start)
    source_values = np.empty(chunks * (max_tokens + 2), np.int64)
    target_values = np.empty(chunks * tgt_seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    total = np.zeros(vocab_size, np.int64)  # rank_principal's scratch counts, left zeroed after each call
    candidate = np.zeros(vocab_size, np.int64)
    gaps_buffer = np.empty(max_tokens, np.int64)  # a piece has a token at least: one allocation, not one a chunk
    for chunk in range(chunks):
        flat, offsets = chunk_arrays(ids, sentence_offsets, first_sentence[chunk], start[chunk], end[chunk])
        num_sentences = len(offsets) - 1
        candidates, count = gap_count(num_sentences, ratio, keep_last)
        gaps = gaps_buffer[:num_sentences]
        gaps[:] = NOT_A_GAP
        if count > 0:
            if principal:
                for index in rank_principal(flat[:offsets[candidates]], offsets[:candidates + 1], count, sequential,
                                            unique, total, candidate):
                    gaps[index] = action
            else:
                gaps[:count] = action
        source_offsets[chunk + 1], target_offsets[chunk + 1] = write_gsg_example(
            flat, offsets, gaps, mask_id, cls_id, sep_id, tgt_seq_length, source_values, source_offsets[chunk],
            target_values, target_offsets[chunk])
    return (source_values[:source_offsets[chunks]], source_offsets, target_values[:target_offsets[chunks]],
            target_offsets)


def _gsg_chunk_by_chunk(block: DocumentBlock, sentence_offsets: np.ndarray, plan: ChunkPlan, pass_index: int,
                        recipe: MaskRecipe, vocab: VocabInfo, compiled: bool) -> Columns:
    """PEGASUS examples of the planned chunks one at a time, each document's chunks drawing in turn
    from its ``masking_randomness``."""
    sources, targets = [], []
    randomness, current = None, -1
    for chunk in range(len(plan.start)):
        document = block.first_document + int(plan.document[chunk])
        if document != current:
            randomness, current = masking_randomness(recipe.seed, pass_index, document), document
        flat, offsets = run_kernel(chunk_arrays, compiled, block.ids, sentence_offsets, plan.first_sentence[chunk],
                                   plan.start[chunk], plan.end[chunk])
        source, target = gsg_example(flat, offsets, recipe, vocab.special, randomness, compiled)
        sources.append(source)
        targets.append(target)
    return (*columns_from_sequences(sources, pa.int64()), *columns_from_sequences(targets, pa.int64()))


def examples_of_block(block: DocumentBlock, pass_index: int, recipe: MaskRecipe, vocab: VocabInfo,
                      compiled: bool = COMPILED) -> tuple[Columns, Counter]:
    """Every example of a block of documents in one pass as flat int64 columns (source values, offsets,
    target values, offsets), and how many documents gave none, by reason."""
    sentence_offsets = np.asarray(block.sentence_offsets, np.int64)
    plan = ChunkPlan(*run_kernel(plan_chunks, compiled, np.asarray(block.document_offsets, np.int64), sentence_offsets,
                                 recipe.max_chunk_tokens, recipe.min_chunk_sentences))
    if recipe.target == "bart":
        columns = run_kernel(_bart_documents, compiled, *plan, sentence_offsets, block.ids, block.first_document,
                             np.uint64(recipe.seed), np.uint64(pass_index), recipe.seq_length,
                             noise_arguments(recipe, vocab))
    elif compiled and not recipe.draws_numpy_numbers:
        special = vocab.special
        columns = _gsg_documents(
            plan.first_sentence, plan.start, plan.end, sentence_offsets, block.ids, recipe.max_chunk_tokens,
            recipe.gap_sentence_ratio, recipe.keep_last_sentence, recipe.sentence_selection_strategy == "principal",
            recipe.rouge_mode == "sequential", recipe.rouge_unique, GAP_ACTION_CODES[recipe.gap_action], special.mask,
            special.cls, special.sep, recipe.tgt_seq_length,
            max(vocab.size, int(block.ids.max()) + 1 if len(block.ids) else 1))
    else:
        columns = _gsg_chunk_by_chunk(block, sentence_offsets, plan, pass_index, recipe, vocab, compiled)
    skipped = Counter()
    if recipe.min_chunk_sentences > 1:  # documents none of whose chunks has enough sentences
        with_examples = int(np.count_nonzero(np.diff(plan.document))) + 1 if len(plan.document) else 0  # sorted
        if with_examples < len(block):
            skipped[SKIPPED_SINGLE_SENTENCE_CHUNKS] = len(block) - with_examples
    return columns, skipped
