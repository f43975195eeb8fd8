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
from pathlib import Path

import numpy as np

from data_tools.common import SPECIAL_TOKENS, UserError
from data_tools.sentences import split_sentences

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
        self._char_ids = self._build_fast_char_table()
        fast_chars = "".join(re.escape(c) for c in self._char_ids if not is_cjk_codepoint(ord(c)))
        # Runs of characters that need the full procedure; everything between them is
        # looked up one character at a time.
        self._slow_run_re = re.compile(f"([^{_UNIFIED_CJK_CLASS}{fast_chars}]+)")
        self._word_cache: dict[str, list[int]] = {}
        self._run_cache: dict[str, list[int]] = {}
        self._separated_char_ids = {**self._char_ids, _SENTENCE_SEPARATOR: -1}
        self._separated_run_re = re.compile(f"([^{_UNIFIED_CJK_CLASS}{fast_chars}{_SENTENCE_SEPARATOR}]+)")


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

    # -- internals ------------------------------------------------------------------------

    def _build_fast_char_table(self) -> dict[str, int]:
        """Characters that always form one token on their own, whatever surrounds them."""
        vocab, unk_id = self.vocab, self.unk_id
        table = {chr(cp): vocab.get(chr(cp), unk_id) for lo, hi in _UNIFIED_CJK_RANGES for cp in range(lo, hi + 1)}
        for char in (chr(cp) for lo, hi in _FAST_CANDIDATE_RANGES for cp in range(lo, hi + 1)):
            if not is_bert_punctuation(char):
                continue
            if is_bert_control(char) or is_bert_whitespace(char) or unicodedata.combining(char):
                continue
            if unicodedata.decomposition(char) or char in _composition_starters():
                continue  # NFC could change it or merge it with what follows: slow path
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
