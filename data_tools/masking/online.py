"""Masking one chunk at a time, straight from a tokenized corpus: what the trainer's online masking uses.

:class:`CorpusChunks` plans every document's chunks once (the packing depends only on sentence
lengths) and keeps, per chunk, its document, its number in the document and its token range in
the memory-mapped shard: chunk i is then read back by slicing, without touching the rest of its
document. :func:`mask_chunk` turns a chunk into an example with the mask stage's kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.compiled import COMPILED, run_kernel
from data_tools.masking.bart import bart_example
from data_tools.masking.chunking import ChunkPlan, chunk_arrays, plan_chunks
from data_tools.masking.pegasus import gsg_example
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import Randomness
from data_tools.masking.vocab import VocabInfo
from data_tools.shards import numpy_view, open_shard, shard_paths


def mask_chunk(flat: np.ndarray, offsets: np.ndarray, randomness: Randomness, recipe: MaskRecipe, vocab: VocabInfo,
               compiled: bool = COMPILED) -> tuple[np.ndarray, np.ndarray]:
    """(source_ids, target_ids) int64 arrays of one chunk (int64 ids ``flat``, sentence i at
    ``flat[offsets[i]:offsets[i + 1]]``) under the recipe, drawing from ``randomness``."""
    if recipe.target == "bart":
        return bart_example(flat, offsets, randomness.next_kernel_state(), recipe, vocab, compiled)
    return gsg_example(flat, offsets, randomness.next_kernel_state(), recipe, vocab, compiled)


class CorpusChunks:
    """The chunks of a tokenized corpus that give examples under a recipe, by index, in corpus order.

    The index holds a chunk's document, its number in the document, its first sentence, token start
    and token count; the ids and sentence offsets stay in the memory-mapped shards, one entry per
    Arrow record batch (combining a shard's batches would copy it into memory).
    """

    def __init__(self, directory: Path, manifest: dict, recipe: MaskRecipe, checksum: bool = True) -> None:
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []  # (sentence offsets, ids) of each record batch
        tables, first_document = [], 0
        for path in shard_paths(Path(directory), manifest, checksum):  # size, rows (and sha256) checked
            for column in open_shard(path).column("sentences").chunks:
                document_offsets, sentences = numpy_view(column.offsets), column.values
                sentence_offsets, ids = numpy_view(sentences.offsets), numpy_view(sentences.values)
                plan = ChunkPlan(*run_kernel(plan_chunks, COMPILED, document_offsets.astype(np.int64),
                                             sentence_offsets.astype(np.int64), recipe.max_chunk_tokens,
                                             recipe.min_chunk_sentences))
                tables.append(np.stack([plan.document + first_document, plan.number, plan.first_sentence,
                                        plan.start, plan.end - plan.start]))
                self.batches.append((sentence_offsets, ids))
                first_document += len(column)
        table = np.concatenate(tables, axis=1) if tables else np.zeros((5, 0), np.int64)
        self.document = table[0].copy()
        # Positions inside a record batch fit int32 (Arrow's list offsets are int32): 24 bytes a chunk in all.
        self.number, self.first_sentence, self.start, self.tokens = (row.astype(np.int32) for row in table[1:])
        self.batch_starts = np.cumsum([0] + [part.shape[1] for part in tables]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.start)

    def chunk(self, index: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(document, its chunk number, int64 ids, piece offsets) of chunk ``index``."""
        index = range(len(self))[index]  # IndexError out of range; negative indices count from the end
        batch = int(np.searchsorted(self.batch_starts, index, side="right") - 1)
        sentence_offsets, ids = self.batches[batch]
        start = int(self.start[index])
        flat, offsets = run_kernel(chunk_arrays, COMPILED, ids, sentence_offsets, int(self.first_sentence[index]),
                                   start, start + int(self.tokens[index]))
        return int(self.document[index]), int(self.number[index]), flat, offsets
