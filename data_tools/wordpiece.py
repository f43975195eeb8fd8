"""BERT WordPiece tokenization with ids identical to ``transformers.BertTokenizer``.

The oracle is transformers' slow Python ``BertTokenizer`` (4.x): lower-case each
character, clean the text, put spaces around CJK ideographs, NFC, split on
whitespace, strip accents per word, split on punctuation, then greedy
longest-match WordPiece. Special tokens written in the
text (``[MASK]``) are kept whole, as the oracle does.

Why not just call it: in Chinese text almost every token is one ideograph or one
punctuation mark, whose id does not depend on its neighbours. Those characters are
looked up in one dict; only the runs between them (Latin words, digits, emoji, ...)
go through the full BERT procedure, cached per whitespace-separated word.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools import tokenize_kernel
from data_tools.common import SPECIAL_TOKENS, UserError
from data_tools.compiled import COMPILED
from data_tools.sentences import CLOSING_MARKS, SENTENCE_ENDERS, split_sentences

MAX_INPUT_CHARS_PER_WORD = 100
# A private-use character (BERT deletes it as a control character, so no real token
# comes from it) that marks sentence boundaries inside encode_document.
_SENTENCE_SEPARATOR = "\ue000"
_WORD_CACHE_LIMIT = 1 << 20

# BERT's definition of a "Chinese character" (BasicTokenizer._is_chinese_char).
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
# Unified ideographs are context-free tokens; the compatibility blocks (F900-FAFF,
# 2F800-2FA1F) are not, since NFC maps them to other characters.
_UNIFIED_CJK_RANGES = tuple(r for r in CJK_RANGES if r[0] not in (0xF900, 0x2F800))
_UNIFIED_CJK_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _UNIFIED_CJK_RANGES)
# Candidates for the context-free fast path besides ideographs: ASCII, general and CJK
# punctuation, full-width forms.
_FAST_CANDIDATE_RANGES = ((0x21, 0x7E), (0x2010, 0x205E), (0x3000, 0x303F), (0xFE30, 0xFE4F), (0xFF01, 0xFF65))


@functools.cache
def _composition_starters() -> frozenset[str]:
    """Characters that begin a canonical composition (``=`` + U+0338 -> ``≠``)."""
    starters = set()
    for cp in range(0x30000):
        decomposition = unicodedata.decomposition(chr(cp))
        if decomposition and not decomposition.startswith("<") and " " in decomposition:
            starters.add(chr(int(decomposition.split()[0], 16)))
    return frozenset(starters)


def is_cjk_codepoint(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def is_bert_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_bert_control(char: str) -> bool:
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def is_bert_punctuation(char: str) -> bool:
    cp = ord(char)
    # BERT treats every non-alphanumeric ASCII character as punctuation ($, ^, `...).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


@dataclass(frozen=True)
class EncodedDocuments:
    """Many documents' sentences as ids: flat, then split by lengths (document d has
    ``sentences_per_document[d]`` sentences, 0 when it produced no token)."""

    ids: np.ndarray  # int32, every kept sentence's ids in order
    sentence_lengths: np.ndarray  # int32, one per kept sentence (all > 0)
    sentences_per_document: np.ndarray  # int64, one per document

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids, sentence lengths) of one document, as :meth:`BertWordPieceEncoder.encode_document` gives them."""
        first_sentence, first_token = self._starts
        a, b = first_sentence[index], first_sentence[index + 1]
        return self.ids[first_token[a]:first_token[b]], self.sentence_lengths[a:b]

    @functools.cached_property
    def _starts(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each document's sentences and each sentence's ids begin (computed once, not per document)."""
        return (np.concatenate(([0], np.cumsum(self.sentences_per_document))),
                np.concatenate(([0], np.cumsum(self.sentence_lengths, dtype=np.int64))))

    @classmethod
    def concatenate(cls, parts: list["EncodedDocuments"]) -> "EncodedDocuments":
        return cls(*(np.concatenate([getattr(part, name) for part in parts]).astype(dtype, copy=False)
                     for name, dtype in (("ids", np.int32), ("sentence_lengths", np.int32),
                                         ("sentences_per_document", np.int64))))


def load_vocab(vocab_path: Path) -> dict[str, int]:
    """token -> id, one token per line, as BERT reads it (a later duplicate wins)."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.rstrip("\n")] = index
    return vocab


def load_encoder(vocab_path: Path, do_lower_case: bool = True, flag: str = "--vocab_path") -> "BertWordPieceEncoder":
    """The encoder of a vocab file, every problem with the file reported in one line."""
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise UserError(f"{flag} {vocab_path} is not a file; pass a BERT vocab.txt (one token per line)")
    try:
        return BertWordPieceEncoder(vocab_path, do_lower_case=do_lower_case)
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {vocab_path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "pass a BERT vocab.txt") from error
    except ValueError as error:
        raise UserError(f"{flag} {error}") from error


class BertWordPieceEncoder:
    """Text -> token ids, exactly as BertTokenizer(vocab, do_lower_case) without special tokens added."""

    def __init__(self, vocab_path: Path, do_lower_case: bool = True) -> None:
        self.vocab_path = Path(vocab_path)
        self.vocab = load_vocab(self.vocab_path)
        self.vocab_size = max(self.vocab.values()) + 1 if self.vocab else 0
        self.do_lower_case = do_lower_case
        missing = [token for token in SPECIAL_TOKENS if token not in self.vocab]
        if missing:
            # Without them every example would start, end and mask with [UNK] (or fail outright).
            raise ValueError(f"{vocab_path} lacks the special token(s) {', '.join(missing)} that every BERT vocab has; "
                             "use Google's Chinese vocab or one built by zh-build-vocab")
        self.unk_id = self.vocab["[UNK]"]
        self.special_ids = {token: self.vocab[token] for token in SPECIAL_TOKENS}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))
        fast_punctuation = self._fast_punctuation_ids()
        self._char_ids = {**self._ideograph_ids(), **fast_punctuation}
        fast_chars = "".join(map(re.escape, fast_punctuation))
        # Runs of characters that need the full procedure; everything between them is
        # looked up one character at a time.
        self._slow_run_re = re.compile(f"([^{_UNIFIED_CJK_CLASS}{fast_chars}]+)")
        self._word_cache: dict[str, list[int]] = {}
        self._run_cache: dict[str, list[int]] = {}
        self._separated_char_ids = {**self._char_ids, _SENTENCE_SEPARATOR: -1}
        self._separated_run_re = re.compile(f"([^{_UNIFIED_CJK_CLASS}{fast_chars}{_SENTENCE_SEPARATOR}]+)")
        self._kernel_tables: tokenize_kernel.KernelTables | None = None

    # -- public -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no [CLS]/[SEP] added)."""
        ids: list[int] = []
        position = 0
        for match in self._special_re.finditer(text):
            if match.start() > position:
                self._encode_chunk(text[position : match.start()], ids)
            ids.append(self.special_ids[match.group()])
            position = match.end()
        if position < len(text):
            self._encode_chunk(text[position:] if position else text, ids)
        return ids

    def encode_document(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every sentence of ``text`` concatenated, each sentence's length).

        Sentences are those of ``split_sentences``; sentences without tokens are left out.
        """
        if _SENTENCE_SEPARATOR in text or self._special_re.search(text):
            encoded = [ids for ids in map(self.encode, split_sentences(text)) if ids]
            lengths = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
            return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32), lengths
        # One pass over the whole document, sentences joined by a separator: a context-free
        # character that maps to -1, so each sentence is tokenized exactly as if it were
        # encoded alone. Sentences left without tokens are dropped below.
        ids: list[int] = []
        joined = _SENTENCE_SEPARATOR.join(split_sentences(text))
        self._encode_chunk(joined, ids, self._separated_char_ids, self._separated_run_re)
        flat = np.array(ids, dtype=np.int32)
        is_token = flat >= 0
        bounds = np.concatenate(([-1], np.flatnonzero(~is_token), [len(flat)]))
        lengths = (bounds[1:] - bounds[:-1] - 1).astype(np.int32)
        return flat[is_token], lengths[lengths > 0]

    def encode_documents(self, texts: list[str], compiled: bool = COMPILED) -> EncodedDocuments:
        """:meth:`encode_document` of every text, as one :class:`EncodedDocuments`.

        Compiled, one kernel pass over the batch's code points does the sentence splitting and the
        ids of all but the rare runs that need Unicode normalization, which this encoder's cached
        Python procedure fills in (data_tools.tokenize_kernel). Without numba (or ``compiled=False``)
        each document goes through :meth:`encode_document`: the same ids.
        """
        if not compiled:
            return self._encode_documents_one_by_one(texts)
        joined = "".join(texts)
        special = self._special_re.search(joined)
        if special is not None or _SENTENCE_SEPARATOR in joined:
            # [MASK] and friends stay whole: those documents (rare) take the per-sentence path
            return self._encode_documents_mixed(texts)
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)), out=offsets[1:])
        code_points = np.minimum(np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32),
                                 tokenize_kernel.TABLE_SIZE)
        tables = self.kernel_tables()
        ids, sentence_ends, per_document, run_starts, run_ends = tokenize_kernel.scan_documents(
            code_points, offsets, tables.kind, tables.char_id, tables.sentence_mark, tables.is_py_space, tables.slots,
            tables.entry_bytes, tables.entry_offsets, tables.entry_ids, tables.longest_entry, tables.unk_id,
            tables.do_lower_case)
        if len(run_starts) == 0:
            lengths = np.diff(sentence_ends, prepend=0).astype(np.int32)
            return EncodedDocuments(ids, lengths, per_document)
        run_cache, encode_new = self._run_cache, self._encode_new_run
        run_ids = []
        for start, end in zip(run_starts.tolist(), run_ends.tolist()):
            run = joined[start:end]
            cached = run_cache.get(run)
            run_ids.append(cached if cached is not None else encode_new(run))
        run_offsets = np.zeros(len(run_ids) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, run_ids), np.int64, count=len(run_ids)), out=run_offsets[1:])
        flat_run_ids = np.fromiter(itertools.chain.from_iterable(run_ids), np.int32, count=int(run_offsets[-1]))
        return EncodedDocuments(*tokenize_kernel.splice_runs(ids, sentence_ends, per_document, flat_run_ids,
                                                             run_offsets))

    def kernel_tables(self) -> tokenize_kernel.KernelTables:
        """The compiled tokenizer's tables for this vocab (built on first use)."""
        if self._kernel_tables is None:
            self._kernel_tables = tokenize_kernel.build_tables(
                self.vocab, self._char_ids, self.unk_id, self.do_lower_case, SENTENCE_ENDERS, CLOSING_MARKS,
                is_bert_punctuation)
        return self._kernel_tables

    def _encode_documents_one_by_one(self, texts: list[str]) -> EncodedDocuments:
        encoded = [self.encode_document(text) for text in texts]
        return EncodedDocuments(
            np.concatenate([ids for ids, _ in encoded] or [np.zeros(0, np.int32)]).astype(np.int32, copy=False),
            np.concatenate([lengths for _, lengths in encoded] or [np.zeros(0, np.int32)]).astype(np.int32, copy=False),
            np.fromiter((len(lengths) for _, lengths in encoded), np.int64, count=len(encoded)))

    def _encode_documents_mixed(self, texts: list[str]) -> EncodedDocuments:
        """Documents with special tokens one by one, runs of the others through the kernel."""
        parts, plain = [], []
        for text in texts:
            if self._special_re.search(text) or _SENTENCE_SEPARATOR in text:
                if plain:
                    parts.append(self.encode_documents(plain))
                    plain = []
                parts.append(self._encode_documents_one_by_one([text]))
            else:
                plain.append(text)
        if plain:
            parts.append(self.encode_documents(plain))
        return EncodedDocuments.concatenate(parts)

    # -- internals ------------------------------------------------------------------------

    def _ideograph_ids(self) -> dict[str, int]:
        """Unified ideographs: each is a token of its own, whatever surrounds it."""
        vocab, unk_id = self.vocab, self.unk_id
        return {char: vocab.get(char, unk_id) for lo, hi in _UNIFIED_CJK_RANGES for char in map(chr, range(lo, hi + 1))}

    def _fast_punctuation_ids(self) -> dict[str, int]:
        """Punctuation that always forms one token on its own, whatever surrounds it."""
        vocab, unk_id = self.vocab, self.unk_id
        table = {}
        for char in (chr(cp) for lo, hi in _FAST_CANDIDATE_RANGES for cp in range(lo, hi + 1)):
            if not is_bert_punctuation(char):
                continue
            if is_bert_control(char) or is_bert_whitespace(char) or unicodedata.combining(char):
                continue
            decomposition = unicodedata.decomposition(char)
            if (decomposition and not decomposition.startswith("<")) or char in _composition_starters():
                continue  # NFC could change it or merge it with what follows: slow path (a compatibility
                # decomposition such as full-width "，" -> "," is NFKC's business, not NFC's)
            token = self._normalize_word(char)
            if token != char:
                continue
            table[char] = vocab.get(char, unk_id)
        return table

    def _encode_chunk(self, text: str, ids: list[int], char_ids: dict[str, int] | None = None,
                      slow_run_re: re.Pattern | None = None) -> None:
        # split() with a capturing group alternates [fast, slow, fast, ..., fast]; the ids are
        # then assembled by C-level iterators (map/zip/chain), with Python code only for runs
        # not seen before. Chinese text is mostly fast characters and a few cached runs.
        parts = (slow_run_re or self._slow_run_re).split(text)
        fast_parts, slow_parts = parts[0::2], parts[1::2]
        run_ids = list(map(self._run_cache.get, slow_parts))
        if None in run_ids:
            run_ids = [cached if cached is not None else self._encode_new_run(run)
                       for cached, run in zip(run_ids, slow_parts)]
        fast_ids = map(map, itertools.repeat((char_ids or self._char_ids).__getitem__), fast_parts)
        ids.extend(itertools.chain.from_iterable(itertools.chain.from_iterable(zip(fast_ids, run_ids))))
        ids.extend(map((char_ids or self._char_ids).__getitem__, fast_parts[-1]))

    def _encode_new_run(self, run: str) -> list[int]:
        """The full BasicTokenizer + WordPiece procedure for a run between fast characters."""
        run_ids: list[int] = []
        self._encode_run_uncached(run, run_ids)
        if len(run) <= 32 and len(self._run_cache) < _WORD_CACHE_LIMIT:
            self._run_cache[run] = run_ids
        return run_ids

    def _encode_run_uncached(self, run: str, ids: list[int]) -> None:
        cleaned = []
        for char in run:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or is_bert_control(char):
                continue
            if is_bert_whitespace(char):
                cleaned.append(" ")
            elif is_cjk_codepoint(cp):
                cleaned.append(f" {char} ")
            else:
                cleaned.append(char)
        text = unicodedata.normalize("NFC", "".join(cleaned))
        cache = self._word_cache
        for word in text.split():
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(cache) < _WORD_CACHE_LIMIT:
                    cache[word] = word_ids
            ids.extend(word_ids)

    def _normalize_word(self, word: str) -> str:
        if not self.do_lower_case:
            return word
        # transformers lower-cases the text one character at a time before tokenizing
        # (PreTrainedTokenizer.tokenize), so str.lower()'s context rule (final sigma) never applies.
        word = unicodedata.normalize("NFD", "".join(char.lower() for char in word))
        return "".join(c for c in word if unicodedata.category(c) != "Mn")

    def _encode_word(self, word: str) -> list[int]:
        ids: list[int] = []
        for token in _split_on_punctuation(self._normalize_word(word)).split():
            ids.extend(self._wordpiece(token))
        return ids

    def _wordpiece(self, token: str) -> list[int]:
        if len(token) > MAX_INPUT_CHARS_PER_WORD:
            return [self.unk_id]
        vocab = self.vocab
        pieces: list[int] = []
        start = 0
        while start < len(token):
            end = len(token)
            found = None
            while start < end:
                piece = token[start:end] if start == 0 else "##" + token[start:end]
                found = vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            pieces.append(found)
            start = end
        return pieces


def _split_on_punctuation(text: str) -> str:
    return "".join(f" {c} " if is_bert_punctuation(c) else c for c in text)
