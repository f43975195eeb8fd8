"""The mask stage's unit of work: every example of a block of documents, from Arrow's flat buffers.

A block is planned into chunks in one kernel call (data_tools.masking.chunking), then masked in one
more: BART's or PEGASUS's block kernel, every recipe alike (random gaps and mixed actions included),
with no Python object per token or example. Without numba (``compiled=False``) the interpreter runs
that very kernel's code. Either way the output is the same, and it depends only on (seed, pass,
document, chunk): never on how documents are split into blocks or across workers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from data_tools.compiled import COMPILED, kernel, run_kernel
from data_tools.masking.bart import noise_arguments, noise_chunk
from data_tools.masking.chunking import ChunkPlan, chunk_arrays, plan_chunks
from data_tools.masking.pegasus import gsg_arguments, gsg_chunk, principal_scratch
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import absorb_key
from data_tools.masking.vocab import VocabInfo
from data_tools.shards import DocumentBlock

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # source values, offsets; target values, offsets
# Why a document gives no gsg example: every chunk of it is a single sentence (see MaskRecipe.min_chunk_sentences).
SKIPPED_SINGLE_SENTENCE_CHUNKS = "fewer_than_two_sentences"


# np.uint64 around each key: run as Python beside compiled kernels, a key comes back as a Python int, which
# numba would refuse (or take for an int64) when it is handed on to the next compiled call.
@kernel
def _pass_key(seed: np.uint64, pass_index: np.uint64) -> np.uint64:
    """``stream_key(seed, pass)``, which every chunk's key of the block extends."""
    return absorb_key(np.uint64(absorb_key(np.uint64(0), seed)), pass_index)


@kernel
def _chunk_stream(pass_key: np.uint64, document: int, number: int) -> np.uint64:
    """The starting state of chunk ``number`` of ``document`` (corpus-wide): the (number + 1)-th kernel
    stream of ``masking_randomness(seed, pass, document)``, ``stream_key(seed, pass, document, number + 1)``."""
    return absorb_key(np.uint64(absorb_key(np.uint64(pass_key), np.uint64(document))), np.uint64(number + 1))


@kernel
def _bart_documents(document: np.ndarray, number: np.ndarray, first_sentence: np.ndarray, start: np.ndarray,
                    end: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray, first_document: int,
                    seed: np.uint64, pass_index: np.uint64, seq_length: int, noise: tuple) -> tuple:
    """BART examples of the planned chunks (:class:`ChunkPlan`'s arrays) of a block whose first document is
    ``first_document`` in the corpus; ``noise`` is :func:`noise_arguments`. Chunk c of document d draws
    from :func:`_chunk_stream`."""
    pass_key = np.uint64(_pass_key(seed, pass_index))
    chunks = len(start)
    source_values = np.empty(chunks * seq_length, np.int64)
    target_values = np.empty(chunks * seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    state = np.empty(1, np.uint64)
    for chunk in range(chunks):
        state[0] = _chunk_stream(pass_key, first_document + document[chunk], number[chunk])
        flat, offsets = chunk_arrays(ids, sentence_offsets, first_sentence[chunk], start[chunk], end[chunk])
        source, target = noise_chunk(flat, offsets, state, *noise)
        source_values[source_offsets[chunk]:source_offsets[chunk] + len(source)] = source
        source_offsets[chunk + 1] = source_offsets[chunk] + len(source)
        target_values[target_offsets[chunk]:target_offsets[chunk] + len(target)] = target
        target_offsets[chunk + 1] = target_offsets[chunk] + len(target)
    return (source_values[:source_offsets[chunks]], source_offsets, target_values[:target_offsets[chunks]],
            target_offsets)


@kernel
def _gsg_documents(document: np.ndarray, number: np.ndarray, first_sentence: np.ndarray, start: np.ndarray,
                   end: np.ndarray, sentence_offsets: np.ndarray, ids: np.ndarray, first_document: int,
                   seed: np.uint64, pass_index: np.uint64, max_tokens: int, tgt_seq_length: int, total: np.ndarray,
                   candidate: np.ndarray, gsg: tuple) -> tuple:
    """PEGASUS examples of the planned chunks of a block, as :func:`_bart_documents` (the same streams);
    ``gsg`` is :func:`gsg_arguments`, ``total`` and ``candidate`` :func:`principal_scratch`."""
    pass_key = np.uint64(_pass_key(seed, pass_index))
    chunks = len(start)
    source_values = np.empty(chunks * (max_tokens + 2), np.int64)
    target_values = np.empty(chunks * tgt_seq_length, np.int64)
    source_offsets = np.zeros(chunks + 1, np.int64)
    target_offsets = np.zeros(chunks + 1, np.int64)
    gaps = np.empty(max_tokens, np.int64)  # a piece has a token at least: one allocation, not one a chunk
    state = np.empty(1, np.uint64)
    for chunk in range(chunks):
        state[0] = _chunk_stream(pass_key, first_document + document[chunk], number[chunk])
        flat, offsets = chunk_arrays(ids, sentence_offsets, first_sentence[chunk], start[chunk], end[chunk])
        source_offsets[chunk + 1], target_offsets[chunk + 1] = gsg_chunk(
            flat, offsets, state, gaps, total, candidate, source_values, source_offsets[chunk], target_values,
            target_offsets[chunk], *gsg)
    return (source_values[:source_offsets[chunks]], source_offsets, target_values[:target_offsets[chunks]],
            target_offsets)


def examples_of_block(block: DocumentBlock, pass_index: int, recipe: MaskRecipe, vocab: VocabInfo,
                      compiled: bool = COMPILED) -> tuple[Columns, Counter]:
    """Every example of a block of documents in one pass as flat int64 columns (source values, offsets,
    target values, offsets), and how many documents gave none, by reason."""
    sentence_offsets = np.asarray(block.sentence_offsets, np.int64)
    plan = ChunkPlan(*run_kernel(plan_chunks, compiled, np.asarray(block.document_offsets, np.int64), sentence_offsets,
                                 recipe.max_chunk_tokens, recipe.min_chunk_sentences))
    where = (*plan, sentence_offsets, block.ids, block.first_document, np.uint64(recipe.seed), np.uint64(pass_index))
    if recipe.target == "bart":
        columns = run_kernel(_bart_documents, compiled, *where, recipe.seq_length, noise_arguments(recipe, vocab))
    else:
        scratch = principal_scratch(max(vocab.size, int(block.ids.max()) + 1 if len(block.ids) else 1))
        columns = run_kernel(_gsg_documents, compiled, *where, recipe.max_chunk_tokens, recipe.tgt_seq_length,
                             *scratch, gsg_arguments(recipe, vocab))
    skipped = Counter()
    if recipe.min_chunk_sentences > 1:  # documents none of whose chunks has enough sentences
        with_examples = int(np.count_nonzero(np.diff(plan.document))) + 1 if len(plan.document) else 0  # sorted
        if with_examples < len(block):
            skipped[SKIPPED_SINGLE_SENTENCE_CHUNKS] = len(block) - with_examples
    return columns, skipped
