"""The masking kernels in the shapes the tests state properties in, and plain references to check them by.

The library (data_tools.masking) works on flat int64 arrays and keyed random streams. The tests
speak of lists of sentences and explicit numpy generators: the wrappers here translate (a kernel
stream starts from 64 bits drawn from the generator). ``reference_*`` functions are rules written
plainly, independently of the kernels: what the kernels must agree with.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from data_tools.compiled import COMPILED, run_kernel
from data_tools.masking import bart, pegasus
from data_tools.masking.blocks import SKIPPED_SINGLE_SENTENCE_CHUNKS
from data_tools.masking.chunking import chunk_arrays, plan_chunks
from data_tools.masking.online import mask_chunk
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import masking_randomness
from data_tools.masking.vocab import SpecialIds, VocabInfo

Span = tuple[int, int]  # (start, length); length 0 is an insertion point

SPECIAL = SpecialIds()
# A vocab shaped like Google's: specials and [unused] below 104, then characters, then ## pieces.
TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
          *(f"c{i}" for i in range(104, 900)), *(f"##p{i}" for i in range(900, 1000))]
VOCAB = VocabInfo.from_tokens(TOKENS, SPECIAL)


class GeneratorRandomness:
    """What the masking functions draw from (a :class:`~data_tools.masking.streams.Randomness`), fed by an
    explicit numpy generator: each kernel stream starts from 64 bits drawn from it."""

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def next_kernel_state(self) -> np.ndarray:
        return np.array([self.generator.integers(0, 1 << 64, dtype=np.uint64)], dtype=np.uint64)


def kernel_state(rng: np.random.Generator) -> np.ndarray:
    return GeneratorRandomness(rng).next_kernel_state()


def bart_recipe(**flags) -> MaskRecipe:
    return MaskRecipe(target="bart", **flags)


# -- chunks -----------------------------------------------------------------------------------------


def flatten_sentences(sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids of all sentences in order, offsets: sentence i is ``flat[offsets[i]:offsets[i + 1]]``)."""
    offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def chunks_of(sentences: list[list[int]], max_tokens: int, min_pieces: int = 1) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The library's chunks of one document: (chunk number, int64 ids, piece offsets) of each kept."""
    flat, offsets = flatten_sentences(sentences)
    _, number, first_sentence, start, end = run_kernel(plan_chunks, COMPILED, np.array([0, len(sentences)]), offsets,
                                                       max_tokens, min_pieces)
    return [(int(n), *run_kernel(chunk_arrays, COMPILED, flat, offsets, s, a, b))
            for n, s, a, b in zip(number, first_sentence, start, end)]


def pack_sentences(sentences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """The library's packing of one document, as lists of pieces."""
    return [[flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])] for _, flat, offsets in
            chunks_of(sentences, max_tokens)]


def reference_pack_sentences(sentences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive sentences up to ``max_tokens`` tokens a chunk; a longer sentence cut into pieces of
    ``max_tokens``; empty sentences dropped."""
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    for sentence in sentences:
        for start in range(0, len(sentence), max_tokens):
            piece = sentence[start:start + max_tokens]
            if current and sum(map(len, current)) + len(piece) > max_tokens:
                chunks.append(current)
                current = []
            current.append(piece)
    return chunks + [current] if current else chunks


# -- BART -------------------------------------------------------------------------------------------


def sample_span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator,
                        compiled: bool = COMPILED) -> list[int]:
    """Poisson span lengths whose sum is exactly ``num_to_mask`` (the last one is trimmed)."""
    cdf = bart.span_length_cdf(bart_recipe(poisson_lambda=poisson_lambda))
    return run_kernel(bart.draw_span_lengths, compiled, kernel_state(rng), num_to_mask, cdf).tolist()


def sample_geometric_span_lengths(num_to_mask: int, p: float, max_length: int, rng: np.random.Generator,
                                  compiled: bool = COMPILED) -> list[int]:
    cdf = bart.span_length_cdf(bart_recipe(span_distribution="geometric", geometric_p=p, max_span_length=max_length))
    return run_kernel(bart.draw_span_lengths, compiled, kernel_state(rng), num_to_mask, cdf).tolist()


def place_spans(length: int, span_lengths: list[int], rng: np.random.Generator, compiled: bool = COMPILED) -> list[Span]:
    starts = run_kernel(bart.place_spans, compiled, kernel_state(rng), length, np.asarray(span_lengths, np.int64))
    return list(zip(starts.tolist(), span_lengths))


def sample_spans(length: int, rng: np.random.Generator, mask_ratio: float, poisson_lambda: float,
                 compiled: bool = COMPILED) -> list[Span]:
    """Spans drawn from one stream in the order noise_spans draws them: lengths, then places."""
    num_to_mask = round(length * mask_ratio)
    if length == 0 or num_to_mask == 0:
        return []
    cdf = bart.span_length_cdf(bart_recipe(poisson_lambda=poisson_lambda))
    state = kernel_state(rng)
    lengths = run_kernel(bart.draw_span_lengths, compiled, state, num_to_mask, cdf)
    starts = run_kernel(bart.place_spans, compiled, state, length, lengths)
    return list(zip(starts.tolist(), lengths.tolist()))


def permute_sentence_order(num_sentences: int, ratio: float, rng: np.random.Generator,
                           compiled: bool = COMPILED) -> list[int]:
    return run_kernel(bart.permute_sentences, compiled, kernel_state(rng), num_sentences, ratio).tolist()


def noise_spans(ids: list[int], rng: np.random.Generator, recipe: MaskRecipe, vocab: VocabInfo,
                compiled: bool = COMPILED) -> list[int]:
    return run_kernel(bart.noise_spans, compiled, np.asarray(ids, dtype=np.int64), kernel_state(rng),
                      bart.span_length_cdf(recipe), recipe.mask_ratio, recipe.whole_word_mask, recipe.replace_length,
                      recipe.random_ratio, recipe.keep_ratio, recipe.collapse_masks, vocab.is_continuation,
                      vocab.is_special, vocab.special.mask, vocab.first_regular_id, vocab.size).tolist()


def build_bart_example(sentences: list[list[int]], rng: np.random.Generator, recipe: MaskRecipe, vocab: VocabInfo,
                       compiled: bool = COMPILED) -> tuple[np.ndarray, np.ndarray]:
    return bart.bart_example(*flatten_sentences(sentences), kernel_state(rng), recipe, vocab, compiled)


# -- PEGASUS ----------------------------------------------------------------------------------------


def select_principal_sentences(sentences: list[list[int]], count: int, mode: str, unique: bool) -> list[int]:
    return pegasus.principal_sentences(*flatten_sentences(sentences), min(count, len(sentences)),
                                       mode == "sequential", unique)


def select_gap_sentences(sentences: list[list[int]], ratio: float, strategy: str, rng: np.random.Generator,
                         rouge_mode: str = "independent", rouge_unique: bool = False,
                         keep_last: bool = False) -> list[int]:
    recipe = MaskRecipe(target="gsg", gap_sentence_ratio=ratio, sentence_selection_strategy=strategy,
                        rouge_mode=rouge_mode, rouge_unique=rouge_unique, keep_last_sentence=keep_last)
    return pegasus.select_gaps(*flatten_sentences(sentences), recipe, GeneratorRandomness(rng))


def build_gsg_example(sentences: list[list[int]], selected: list[int], special: SpecialIds, tgt_seq_length: int,
                      rng: np.random.Generator | None = None, gap_action: str = "mask") -> tuple[list[int], list[int]]:
    flat, offsets = flatten_sentences(sentences)
    gaps = pegasus.gap_actions(len(sentences), selected, gap_action, GeneratorRandomness(rng))
    source = np.empty(len(flat) + len(sentences) + 2, np.int64)
    target = np.empty(tgt_seq_length, np.int64)
    source_end, target_end = run_kernel(pegasus.write_gsg_example, COMPILED, flat, offsets, gaps, special.mask,
                                        special.cls, special.sep, tgt_seq_length, source, 0, target, 0)
    return source[:source_end].tolist(), target[:target_end].tolist()


# -- a block, document by document --------------------------------------------------------------------


def reference_examples_of_documents(documents: list[list[list[int]]], first_document: int, pass_index: int,
                                    recipe: MaskRecipe, vocab: VocabInfo) -> tuple[list, list, Counter]:
    """The mask stage's examples of consecutive documents, built the way its per-document path did:
    the plain packing, then each chunk through the per-chunk functions, document d's chunks drawing in
    turn from ``masking_randomness(seed, pass, d)``. (sources, targets, documents skipped by reason)."""
    sources, targets, skipped = [], [], Counter()
    for document, sentences in enumerate(documents, start=first_document):
        randomness = masking_randomness(recipe.seed, pass_index, document)
        chunks = [chunk for chunk in reference_pack_sentences(sentences, recipe.max_chunk_tokens)
                  if len(chunk) >= recipe.min_chunk_sentences]
        for chunk in chunks:
            source, target = mask_chunk(*flatten_sentences(chunk), randomness, recipe, vocab)
            sources.append(source.tolist())
            targets.append(target.tolist())
        if not chunks and recipe.target == "gsg":
            skipped[SKIPPED_SINGLE_SENTENCE_CHUNKS] += 1
    return sources, targets, skipped


def reference_stream_key(*parts: int) -> int:
    """SplitMix64's finalizer folded over the parts, in Python integers."""
    mask64 = (1 << 64) - 1
    key = 0
    for part in parts:
        z = ((key ^ part) + 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        key = z ^ (z >> 31)
    return key
