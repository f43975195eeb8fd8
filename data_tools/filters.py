"""Clean's filters: each a class whose ``name`` is the drop reason the manifest counts.

Two kinds, by where they run:

- :class:`DocumentFilter`: judges each document alone, in the worker processes, a chunk at a time
  (vectorized over the chunk where it can be: a filter costs no Python call per document).
  :func:`drop_reasons` applies them in order; a document's reason is the first filter that rejects it.
- :class:`OrderedFilter`: judges a document against the documents kept before it (duplicates), in
  the main process, in corpus order.

A new filter is one class, added to the list the clean stage builds from its config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from data_tools.common import UserError
from data_tools.normalize import chunk_measures, repeated_char_ratio, repeated_line_ratio


@dataclass(frozen=True)
class NormalizedChunk:
    """A chunk of normalized documents and the measures the filters share, computed once per chunk."""

    texts: list[str]
    lengths: np.ndarray  # characters, int64
    cjk_ratios: np.ndarray  # float64, exactly normalize.cjk_ratio of each text
    may_repeat_chars: np.ndarray  # bool: False where repeated_char_ratio is certainly 0

    @classmethod
    def measure(cls, texts: list[str]) -> NormalizedChunk:
        cjk_ratios, may_repeat_chars = chunk_measures(texts)
        return cls(texts, np.fromiter(map(len, texts), np.int64, len(texts)), cjk_ratios, may_repeat_chars)

    def __len__(self) -> int:
        return len(self.texts)


class DocumentFilter(ABC):
    """Rejects documents on their own content."""

    name: ClassVar[str]  # the drop reason

    @abstractmethod
    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        """For each index in ``candidates`` (the documents no earlier filter rejected), whether to drop it."""


def drop_reasons(chunk: NormalizedChunk, filters: list[DocumentFilter]) -> list[str | None]:
    """Each document's drop reason (the first filter that rejects it), None for the documents kept."""
    reasons: list[str | None] = [None] * len(chunk)
    candidates = np.arange(len(chunk))
    for document_filter in filters:
        if not len(candidates):
            break
        rejected = document_filter.rejects(chunk, candidates)
        for index in candidates[rejected].tolist():
            reasons[index] = document_filter.name
        candidates = candidates[~rejected]
    return reasons


class EmptyAfterNormalization(DocumentFilter):
    name = "empty_after_normalization"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        return chunk.lengths[candidates] == 0


@dataclass(frozen=True)
class TooShort(DocumentFilter):
    min_chars: int
    name = "too_short"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        return chunk.lengths[candidates] < self.min_chars


@dataclass(frozen=True)
class TooLong(DocumentFilter):
    max_chars: int
    name = "too_long"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        return chunk.lengths[candidates] > self.max_chars


@dataclass(frozen=True)
class LowCjkRatio(DocumentFilter):
    """Too few CJK ideographs among the visible characters (English, code, tables of numbers)."""

    min_cjk_ratio: float
    name = "low_cjk_ratio"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        return chunk.cjk_ratios[candidates] < self.min_cjk_ratio


@dataclass(frozen=True)
class RepeatedLines(DocumentFilter):
    """Too many lines repeating an earlier line of the document (Gopher's duplicate-line fraction)."""

    max_ratio: float
    name = "repeated_lines"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        texts = chunk.texts  # one line documents (most) repeat none: only the others are measured
        return np.fromiter((("\n" in texts[index] and repeated_line_ratio(texts[index]) > self.max_ratio)
                            for index in candidates.tolist()), bool, len(candidates))


@dataclass(frozen=True)
class RepeatedChars(DocumentFilter):
    """Too many characters in runs of 4+ identical word characters (哈哈哈哈)."""

    max_ratio: float
    name = "repeated_chars"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        rejected = np.zeros(len(candidates), dtype=bool)
        suspects = np.flatnonzero(chunk.may_repeat_chars[candidates])  # the rest certainly measure 0
        for position in suspects.tolist():
            rejected[position] = repeated_char_ratio(chunk.texts[candidates[position]]) > self.max_ratio
        return rejected


class OrderedFilter(ABC):
    """Rejects a document that repeats one kept before it; sees the documents in corpus order."""

    name: ClassVar[str]  # the drop reason

    @abstractmethod
    def rejects(self, digest: bytes | None, signature: Any) -> bool:
        """Whether to drop the document with this exact-dedup ``digest`` and MinHash ``signature``
        (each None when not computed); a document not dropped counts as kept from then on."""


class ExactDuplicates(OrderedFilter):
    """A normalized document equal to an earlier one: an in-memory set of their digests (~100 bytes per
    unique document; ``--dedup_partitions`` does the same with flat memory, after the pass)."""

    name = "duplicate"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def rejects(self, digest: bytes | None, signature: Any) -> bool:
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


class NearDuplicates(OrderedFilter):
    """MinHash LSH (datasketch) over the documents kept so far."""

    name = "near_duplicate"

    def __init__(self, threshold: float, num_perm: int) -> None:
        try:
            from datasketch import MinHashLSH  # deferred: an optional dependency, and a slow import
        except ImportError as error:
            raise UserError("--near_dedup_threshold needs datasketch: pip install datasketch") from error
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._count = 0

    def rejects(self, digest: bytes | None, signature: Any) -> bool:
        if self._lsh.query(signature):
            return True
        self._lsh.insert(str(self._count), signature)
        self._count += 1
        return False


def minhash_signature(text: str, num_perm: int, ngram: int = 5) -> Any:
    """MinHash of the document's character n-grams (5 by default: the unit that suits unsegmented Chinese)."""
    from datasketch import MinHash  # deferred: only --near_dedup_threshold needs it

    minhash = MinHash(num_perm=num_perm, seed=1)
    shingles = {text[i : i + ngram] for i in range(max(1, len(text) - ngram + 1))}
    minhash.update_batch([shingle.encode("utf-8") for shingle in shingles])
    return minhash
