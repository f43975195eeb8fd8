"""The masking kernels in the shapes the tests state properties in, and plain references to check them by.

The library (data_tools.masking) works on flat int64 arrays and keyed random streams. The tests
speak of lists of sentences and explicit numpy generators: the wrappers here translate (a kernel
stream starts from 64 bits drawn from the generator). ``reference_*`` functions are rules written
plainly, independently of the kernels: what the kernels must agree with. PEGASUS's whole example
has one (SplitMix64 in Python integers, exact ROUGE-1 with fractions); BART's is its per-chunk
kernel fed the stream the stage keys, so the block kernel's packing, keying and layout are checked.
"""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np

from data_tools.compiled import COMPILED, run_kernel
from data_tools.masking import bart, pegasus
from data_tools.masking.blocks import SKIPPED_SINGLE_SENTENCE_CHUNKS
from data_tools.masking.chunking import chunk_arrays, plan_chunks
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.vocab import SpecialIds, VocabInfo
from data_tools.shards import DocumentBlock

Span = tuple[int, int]  # (start, length); length 0 is an insertion point

SPECIAL = SpecialIds()
# A vocab shaped like Google's: specials and [unused] below 104, then characters, then ## pieces.
TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
          *(f"c{i}" for i in range(104, 900)), *(f"##p{i}" for i in range(900, 1000))]
VOCAB = VocabInfo.from_tokens(TOKENS, SPECIAL)


def kernel_state(rng: np.random.Generator) -> np.ndarray:
    """A kernel stream's one-element state, starting from 64 bits drawn from an explicit generator."""
    return np.array([rng.integers(0, 1 << 64, dtype=np.uint64)], dtype=np.uint64)


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
    """The gap sentences the kernel chooses, drawing from a stream seeded by ``rng``."""
    flat, offsets = flatten_sentences(sentences)
    gaps = np.empty(len(sentences), np.int64)
    run_kernel(pegasus.choose_gaps, COMPILED, flat, offsets, kernel_state(rng), gaps, ratio, keep_last,
               pegasus.SELECTION_CODES[strategy], rouge_mode == "sequential", rouge_unique, pegasus.GAP_MASK,
               *pegasus.principal_scratch(VOCAB.size))
    return np.flatnonzero(gaps != pegasus.NOT_A_GAP).tolist()


def build_gsg_example(sentences: list[list[int]], selected: list[int], special: SpecialIds, tgt_seq_length: int,
                      gap_action: str = "mask") -> tuple[list[int], list[int]]:
    """The example the kernel writes for given gap sentences, each given ``gap_action`` (not mixed)."""
    flat, offsets = flatten_sentences(sentences)
    gaps = np.full(len(sentences), pegasus.NOT_A_GAP, np.int64)
    gaps[selected] = pegasus.GAP_ACTION_CODES[gap_action]
    source = np.empty(len(flat) + len(sentences) + 2, np.int64)
    target = np.empty(tgt_seq_length, np.int64)
    source_end, target_end = run_kernel(pegasus.write_gsg_example, COMPILED, flat, offsets, gaps, special.mask,
                                        special.cls, special.sep, tgt_seq_length, source, 0, target, 0)
    return source[:source_end].tolist(), target[:target_end].tolist()


def gsg_chunk_example(sentences: list[list[int]], recipe: MaskRecipe, rng: np.random.Generator,
                      compiled: bool = COMPILED) -> tuple[list[int], list[int]]:
    """One chunk's example under a gsg recipe, drawing from a stream seeded by ``rng``."""
    source, target = pegasus.gsg_example(*flatten_sentences(sentences), kernel_state(rng), recipe, VOCAB, compiled)
    return source.tolist(), target.tolist()


class ReferenceStream:
    """SplitMix64 (Vigna's splitmix64.c) in Python integers, and the draws the kernels make from it."""

    def __init__(self, state: int) -> None:
        self.state = state

    def next_u64(self) -> int:
        self.state = (self.state + _GOLDEN) & _MASK64
        return _finalize(self.state)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) / (1 << 53)

    def below(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def choose_sorted(self, population: int, count: int) -> list[int]:
        """Floyd's sample of ``count`` of range(population), sorted."""
        chosen: set[int] = set()
        for j in range(population - count, population):
            t = self.below(j + 1)
            chosen.add(j if t in chosen else t)
        return sorted(chosen)


def reference_rouge1_f1(candidate: list[int], reference: list[int], unique: bool) -> Fraction:
    """Exact (rational) ROUGE-1 F1: equal scores tie exactly, and ties go to the earlier sentence."""
    c, r = (Counter(set(candidate)), Counter(set(reference))) if unique else (Counter(candidate), Counter(reference))
    overlap = sum((c & r).values())
    if not overlap:
        return Fraction(0)
    precision, recall = Fraction(overlap, sum(c.values())), Fraction(overlap, sum(r.values()))
    return 2 * precision * recall / (precision + recall)


def reference_principal(sentences: list[list[int]], count: int, mode: str, unique: bool) -> list[int]:
    """PEGASUS's principal sentences by brute force: each sentence (with those selected so far when
    sequential) scored against all the others."""
    def rest(indices):
        return [t for i, s in enumerate(sentences) if i not in indices for t in s]

    if mode == "independent":
        scores = [reference_rouge1_f1(s, rest({i}), unique) for i, s in enumerate(sentences)]
        return sorted(sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:count])
    selected: list[int] = []
    for _ in range(count):
        best, best_score = None, -1.0
        for i in range(len(sentences)):
            if i in selected:
                continue
            chosen = set(selected) | {i}
            candidate = [t for j in sorted(chosen) for t in sentences[j]]
            score = reference_rouge1_f1(candidate, rest(chosen), unique)
            if score > best_score:
                best, best_score = i, score
        selected.append(best)
    return sorted(selected)


def reference_gsg_example(chunk: list[list[int]], stream: ReferenceStream, recipe: MaskRecipe,
                          special: SpecialIds) -> tuple[list[int], list[int]]:
    """PEGASUS's example of one chunk (its pieces), plainly: ``round(n * ratio)`` gaps, at least one,
    among all pieces or all but the last; chosen at random (Floyd's sample from ``stream``), as the
    lead or as the principal ones; then, for ``mixed``, one draw per gap in order (below 0.8 mask,
    below 0.9 remove, else keep). Source [CLS] ... [SEP]; target the gaps, cut, then [SEP]."""
    candidates = len(chunk) - 1 if recipe.keep_last_sentence else len(chunk)
    count = min(candidates, max(1, round(len(chunk) * recipe.gap_sentence_ratio)))
    if recipe.sentence_selection_strategy == "random":
        gaps = stream.choose_sorted(candidates, count)
    elif recipe.sentence_selection_strategy == "lead":
        gaps = list(range(count))
    else:
        gaps = reference_principal(chunk[:candidates], count, recipe.rouge_mode, recipe.rouge_unique)
    actions = {index: recipe.gap_action for index in gaps}
    if recipe.gap_action == "mixed":
        for index in gaps:
            draw = stream.uniform()
            actions[index] = "mask" if draw < 0.8 else "remove" if draw < 0.9 else "keep"
    source, target = [special.cls], []
    for index, sentence in enumerate(chunk):
        action = actions.get(index, "keep")  # a sentence that is no gap stays, as a kept gap does
        target += sentence if index in actions else []
        source += [special.mask] if action == "mask" else [] if action == "remove" else sentence
    return source + [special.sep], target[:recipe.tgt_seq_length - 1] + [special.sep]


# -- a block, document by document --------------------------------------------------------------------


def document_block(documents: list[list[list[int]]], first_document: int) -> DocumentBlock:
    """Consecutive documents (lists of sentences) as the stage hands a worker a block."""
    lengths = [len(sentence) for document in documents for sentence in document]
    return DocumentBlock(first_document, np.cumsum([0] + [len(d) for d in documents]), np.cumsum([0] + lengths),
                         np.array([t for d in documents for s in d for t in s], dtype=np.uint16))


def reference_examples_of_documents(documents: list[list[list[int]]], first_document: int, pass_index: int,
                                    recipe: MaskRecipe, vocab: VocabInfo) -> tuple[list, list, Counter]:
    """The mask stage's examples of consecutive documents, document by document: the plain packing,
    then chunk number c of document d from the stream ``stream_key(seed, pass, d, c + 1)`` (chunks
    left out counted). (sources, targets, documents skipped by reason)."""
    sources, targets, skipped = [], [], Counter()
    for document, sentences in enumerate(documents, start=first_document):
        chunks = [(number, chunk) for number, chunk in
                  enumerate(reference_pack_sentences(sentences, recipe.max_chunk_tokens))
                  if len(chunk) >= recipe.min_chunk_sentences]
        for number, chunk in chunks:
            key = reference_stream_key(recipe.seed, pass_index, document, number + 1)
            if recipe.target == "bart":
                state = np.array([key], dtype=np.uint64)
                source, target = (part.tolist() for part in bart.bart_example(*flatten_sentences(chunk), state,
                                                                               recipe, vocab))
            else:
                source, target = reference_gsg_example(chunk, ReferenceStream(key), recipe, vocab.special)
            sources.append(source)
            targets.append(target)
        if not chunks and recipe.target == "gsg":
            skipped[SKIPPED_SINGLE_SENTENCE_CHUNKS] += 1
    return sources, targets, skipped


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _finalize(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def reference_stream_key(*parts: int) -> int:
    """SplitMix64's finalizer folded over the parts, in Python integers."""
    key = 0
    for part in parts:
        key = _finalize(((key ^ part) + _GOLDEN) & _MASK64)
    return key
