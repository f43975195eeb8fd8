"""Chunk packing: consecutive sentences of a document grouped into chunks of at most ``max_tokens``.

One kernel plans the chunks of any number of documents from Arrow's flat layout (document k is
sentences ``document_offsets[k]:document_offsets[k + 1]``, sentence s is
``ids[sentence_offsets[s]:sentence_offsets[s + 1]]``): the mask stage plans a block of documents
at a time, online masking plans a whole record batch once to index it. A chunk is then a token
range of ``ids`` and the sentence its first piece belongs to, so :func:`chunk_arrays` reads it
back without touching the rest of the document.

A sentence longer than ``max_tokens`` is cut into pieces of ``max_tokens`` that each fill a
chunk alone; its last piece opens a new chunk. So inside a chunk every piece boundary is a
sentence boundary, which is what lets :func:`chunk_arrays` find the pieces from the sentence
offsets. Chunks never cross documents; empty sentences have no piece.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from data_tools.compiled import kernel


class ChunkPlan(NamedTuple):
    """The chunks :func:`plan_chunks` keeps, one entry each, in document order (int64 arrays)."""

    document: np.ndarray  # the chunk's document, counted from the first one planned
    number: np.ndarray  # its place among all chunks of its document (kept or not), from 0
    first_sentence: np.ndarray  # the sentence of its first piece
    start: np.ndarray  # its token range in ids: start:end
    end: np.ndarray


@kernel
def round_half_even(x: float) -> int:
    """Python's ``round(x)`` for a float (halves go to the even neighbour): how many units a share
    of a chunk is (BART's masked words, PEGASUS's gap sentences)."""
    floor = math.floor(x)
    rest = x - floor
    if rest > 0.5 or (rest == 0.5 and floor % 2 == 1):
        floor += 1
    return int(floor)


@kernel
def _keep_chunk(plan: np.ndarray, kept: int, document: int, number: int, first_sentence: int, start: int, end: int,
                pieces: int, min_pieces: int) -> int:
    """Record a closed chunk in row ``kept`` of ``plan`` if it has ``min_pieces`` pieces; the new row count."""
    if pieces < min_pieces:
        return kept
    plan[0, kept] = document
    plan[1, kept] = number
    plan[2, kept] = first_sentence
    plan[3, kept] = start
    plan[4, kept] = end
    return kept + 1


@kernel
def plan_chunks(document_offsets: np.ndarray, sentence_offsets: np.ndarray, max_tokens: int,
                min_pieces: int) -> tuple:
    """The chunks of every document given, as the five arrays of :class:`ChunkPlan`, keeping those of
    at least ``min_pieces`` pieces (a chunk left out still counts in its document's numbering)."""
    bound = 0  # each piece opens at most one chunk
    for sentence in range(document_offsets[0], document_offsets[len(document_offsets) - 1]):
        bound += (sentence_offsets[sentence + 1] - sentence_offsets[sentence] + max_tokens - 1) // max_tokens
    plan = np.empty((5, bound), np.int64)
    kept = 0
    for document in range(len(document_offsets) - 1):
        number = filled = pieces = start = end = first_sentence = 0
        for sentence in range(document_offsets[document], document_offsets[document + 1]):
            for piece_start in range(sentence_offsets[sentence], sentence_offsets[sentence + 1], max_tokens):
                piece_end = min(piece_start + max_tokens, sentence_offsets[sentence + 1])
                if filled > 0 and filled + piece_end - piece_start > max_tokens:
                    kept = _keep_chunk(plan, kept, document, number, first_sentence, start, end, pieces, min_pieces)
                    number += 1
                    filled = pieces = 0
                if filled == 0:
                    start, first_sentence = piece_start, sentence
                filled += piece_end - piece_start
                pieces += 1
                end = piece_end
        if filled > 0:
            kept = _keep_chunk(plan, kept, document, number, first_sentence, start, end, pieces, min_pieces)
    return plan[0, :kept], plan[1, :kept], plan[2, :kept], plan[3, :kept], plan[4, :kept]


@kernel
def chunk_arrays(ids: np.ndarray, sentence_offsets: np.ndarray, first_sentence: int, start: int,
                 end: int) -> tuple:
    """(int64 ids, piece offsets) of the chunk ``ids[start:end]`` whose first piece is in sentence
    ``first_sentence``: piece i is ``flat[offsets[i]:offsets[i + 1]]``."""
    pieces = 1
    sentence = first_sentence
    while sentence_offsets[sentence + 1] < end:  # the sentence ends inside the chunk: a piece boundary
        if sentence_offsets[sentence + 1] > max(start, sentence_offsets[sentence]):
            pieces += 1
        sentence += 1
    offsets = np.empty(pieces + 1, np.int64)
    offsets[0] = 0
    written = 1
    sentence = first_sentence
    while sentence_offsets[sentence + 1] < end:
        if sentence_offsets[sentence + 1] > max(start, sentence_offsets[sentence]):
            offsets[written] = sentence_offsets[sentence + 1] - start
            written += 1
        sentence += 1
    offsets[pieces] = end - start
    return ids[start:end].astype(np.int64), offsets
