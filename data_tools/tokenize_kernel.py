"""Compiled BERT tokenization of many documents at once: sentence splitting and ids in one pass.

The stage's ids must equal ``transformers.BertTokenizer``'s (data_tools.wordpiece explains the
procedure and holds the pure-Python encoder that is the reference). In Chinese text nearly
every token is one ideograph or punctuation mark whose id does not depend on its neighbours;
between them lie runs of other characters (digits, Latin words, spaces, emoji, ...). The
kernel below walks the code points of a whole batch of documents once and:

- splits each document into sentences exactly as :func:`data_tools.sentences.split_sentences`
  (enders, closing marks, newlines, then ``str.strip``);
- looks up context-free characters in a table;
- tokenizes runs made only of ASCII letters, digits and punctuation, whitespace and control
  characters itself (lower-casing, splitting on whitespace and punctuation, greedy WordPiece
  against a hash table of the vocab's ASCII entries): for such runs BERT's NFC and accent
  stripping change nothing;
- leaves every other run (accents, emoji, compatibility ideographs, ...) to the Python encoder,
  marking its place: :func:`splice_runs` puts the ids the encoder found there, per run, which
  the encoder caches.

Code points are classified by tables of ``TABLE_SIZE`` entries built from Python's own
``unicodedata`` (so both paths use one Unicode version); a code point beyond them is left to
the Python encoder too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

import numpy as np

from data_tools.compiled import kernel

# Every BERT "Chinese character" range and sentence mark lies below this. The kernel sees code
# points clamped to TABLE_SIZE, whose table entry is a COMPLEX character that marks nothing.
TABLE_SIZE = 0x30000

# Character kinds (the kernel's `kind` table).
COMPLEX = 0  # needs the full Python procedure, with the rest of its run
FAST = 1  # one token whatever surrounds it (id in `char_id`)
WORD = 2  # ASCII letter or digit: part of a word
PUNCTUATION = 3  # ASCII punctuation that is not context-free (< = > compose with U+0338): a token of its own
SPACE = 4  # BERT whitespace: ends a word
DROPPED = 5  # NUL, U+FFFD and control characters: BERT deletes them

# Sentence marks (the `sentence_mark` table): characters marked below ENDER continue a sentence.
CLOSING, ENDER, NEWLINE = 1, 2, 3

# Polynomial string hash for the vocab table: values stay below 2**31, so the products never
# overflow int64 in either path.
_HASH_MODULUS = (1 << 31) - 1
_HASH_BASE = 131


@dataclass(frozen=True)
class KernelTables:
    """What the kernel knows of a vocab and of Unicode."""

    kind: np.ndarray  # int8 per code point
    char_id: np.ndarray  # int32 per code point: the token of a FAST character, the token of a PUNCTUATION one
    sentence_mark: np.ndarray  # int8 per code point
    is_py_space: np.ndarray  # bool per code point: str.isspace(), what split_sentences strips
    slots: np.ndarray  # int32 open-addressing table: entry index or -1
    entry_bytes: np.ndarray  # uint8: the ASCII vocab entries, concatenated
    entry_offsets: np.ndarray  # int64: entry k is entry_bytes[entry_offsets[k]:entry_offsets[k + 1]]
    entry_ids: np.ndarray  # int32
    longest_entry: int
    unk_id: int
    do_lower_case: bool


def ascii_hash(codes: bytes) -> int:
    """The kernel's hash of an ASCII string (used to fill the table)."""
    value = 0
    for code in codes:
        value = (value * _HASH_BASE + code) % _HASH_MODULUS
    return value


def build_tables(vocab: dict[str, int], fast_char_ids: dict[str, int], unk_id: int, do_lower_case: bool,
                 sentence_enders: str, closing_marks: str, is_bert_punctuation: Callable[[str], bool]) -> KernelTables:
    """The kernel's tables for one vocab; ``fast_char_ids`` are the encoder's context-free characters."""
    kind = np.zeros(TABLE_SIZE + 1, np.int8)
    char_id = np.full(TABLE_SIZE + 1, unk_id, np.int32)
    fast = [(ord(char), token_id) for char, token_id in fast_char_ids.items() if ord(char) < TABLE_SIZE]
    fast_codes = np.array([code for code, _ in fast], dtype=np.int64)
    kind[fast_codes], char_id[fast_codes] = FAST, [token_id for _, token_id in fast]
    # Whitespace and control characters as data_tools.wordpiece's is_bert_whitespace / is_bert_control
    # define them (tests/test_wordpiece.py checks the table against them code point by code point),
    # computed with one category lookup per code point instead of a Python call each.
    every_char = "".join(map(chr, range(TABLE_SIZE)))
    categories = np.array(list(map(unicodedata.category, every_char)), dtype="U2")
    codes = np.arange(TABLE_SIZE)
    bert_whitespace = np.isin(codes, [9, 10, 13, 32]) | (categories == "Zs")
    dropped = (np.char.startswith(categories, "C") & ~np.isin(codes, [9, 10, 13])) | np.isin(codes, [0, 0xFFFD])
    unset = kind[:TABLE_SIZE] != FAST
    kind[:TABLE_SIZE][unset & dropped] = DROPPED
    kind[:TABLE_SIZE][unset & ~dropped & bert_whitespace] = SPACE
    for code in range(0x80):
        char = chr(code)
        if kind[code] != COMPLEX:
            continue
        if char.isalnum():
            kind[code] = WORD
        elif is_bert_punctuation(char):
            kind[code], char_id[code] = PUNCTUATION, vocab.get(char, unk_id)
    sentence_mark = np.zeros(TABLE_SIZE + 1, np.int8)
    for char in closing_marks:
        sentence_mark[ord(char)] = CLOSING
    for char in sentence_enders:
        sentence_mark[ord(char)] = ENDER
    sentence_mark[ord("\n")] = NEWLINE
    is_py_space = np.zeros(TABLE_SIZE + 1, np.bool_)
    is_py_space[[match.start() for match in re.finditer(r"\s", every_char)]] = True  # re's \s is str.isspace

    # The ASCII entries ("abc", "##abc"), the only ones an ASCII word can match.
    entries = [(token.encode("ascii"), token_id) for token, token_id in vocab.items() if token.isascii() and token]
    size = 1 << max(4, (2 * len(entries)).bit_length())
    slots = np.full(size, -1, np.int32)
    for index, (codes, _) in enumerate(entries):
        slot = ascii_hash(codes) & (size - 1)
        while slots[slot] >= 0:
            slot = (slot + 1) & (size - 1)
        slots[slot] = index
    lengths = np.array([len(codes) for codes, _ in entries], dtype=np.int64)
    entry_offsets = np.zeros(len(entries) + 1, np.int64)
    np.cumsum(lengths, out=entry_offsets[1:])
    entry_bytes = np.frombuffer(b"".join(codes for codes, _ in entries), dtype=np.uint8).copy()
    return KernelTables(kind, char_id, sentence_mark, is_py_space, slots, entry_bytes, entry_offsets,
                        np.array([token_id for _, token_id in entries], dtype=np.int32),
                        int(lengths.max()) if len(lengths) else 0, unk_id, do_lower_case)


@kernel
def _lookup(word: np.ndarray, start: int, end: int, continuation: bool, slots: np.ndarray, entry_bytes: np.ndarray,
            entry_offsets: np.ndarray, entry_ids: np.ndarray) -> int:
    """The id of ``word[start:end]`` (with a ``##`` prefix when ``continuation``), or -1."""
    value = 0
    if continuation:  # "##": the hash of the entry as the vocab spells it
        value = (value * _HASH_BASE + 35) % _HASH_MODULUS
        value = (value * _HASH_BASE + 35) % _HASH_MODULUS
    for k in range(start, end):
        value = (value * _HASH_BASE + word[k]) % _HASH_MODULUS
    mask = len(slots) - 1
    slot = value & mask
    length = end - start + (2 if continuation else 0)
    while slots[slot] >= 0:
        entry = slots[slot]
        first = entry_offsets[entry]
        if entry_offsets[entry + 1] - first == length:
            same = True
            offset = 0
            if continuation:
                same = entry_bytes[first] == 35 and entry_bytes[first + 1] == 35
                offset = 2
            k = 0
            while same and k < end - start:
                same = entry_bytes[first + offset + k] == word[start + k]
                k += 1
            if same:
                return entry_ids[entry]
        slot = (slot + 1) & mask
    return -1


@kernel
def _wordpiece(word: np.ndarray, length: int, out: np.ndarray, written: int, slots: np.ndarray,
               entry_bytes: np.ndarray, entry_offsets: np.ndarray, entry_ids: np.ndarray, longest: int,
               unk_id: int) -> int:
    """Greedy longest-match-first WordPiece of ``word[:length]`` into ``out[written:]``; the new ``written``.
    A word longer than 100 characters, or one with a piece the vocab lacks, is one [UNK]."""
    if length > 100:
        out[written] = unk_id
        return written + 1
    start = 0
    first_written = written
    while start < length:
        end = min(length, start + longest - (2 if start > 0 else 0))
        found = -1
        while start < end:
            found = _lookup(word, start, end, start > 0, slots, entry_bytes, entry_offsets, entry_ids)
            if found >= 0:
                break
            end -= 1
        if found < 0:
            out[first_written] = unk_id
            return first_written + 1
        out[written] = found
        written += 1
        start = end
    return written


@kernel
def _simple_run(cps: np.ndarray, start: int, end: int, out: np.ndarray, written: int, word: np.ndarray,
                kind: np.ndarray, char_id: np.ndarray, do_lower_case: bool, slots: np.ndarray,
                entry_bytes: np.ndarray, entry_offsets: np.ndarray, entry_ids: np.ndarray, longest: int,
                unk_id: int) -> int:
    """Ids of a run of WORD, PUNCTUATION, SPACE and DROPPED characters; the new ``written``."""
    length = 0
    for position in range(start, end + 1):
        character_kind = SPACE if position == end else kind[cps[position]]
        if character_kind == DROPPED:
            continue  # deleted before the text is split, so the word goes on across it
        if character_kind == WORD:
            code = cps[position]
            if do_lower_case and 65 <= code <= 90:
                code += 32
            word[length] = code
            length += 1
            continue
        if length > 0:
            written = _wordpiece(word, length, out, written, slots, entry_bytes, entry_offsets, entry_ids, longest,
                                 unk_id)
            length = 0
        if character_kind == PUNCTUATION:
            out[written] = char_id[cps[position]]
            written += 1
    return written


@kernel
def scan_documents(cps: np.ndarray, document_offsets: np.ndarray, kind: np.ndarray, char_id: np.ndarray,
                   sentence_mark: np.ndarray, is_py_space: np.ndarray, slots: np.ndarray, entry_bytes: np.ndarray,
                   entry_offsets: np.ndarray, entry_ids: np.ndarray, longest: int, unk_id: int,
                   do_lower_case: bool) -> tuple:
    """Sentences and ids of every document of ``cps`` (document d is ``cps[offsets[d]:offsets[d + 1]]``;
    code points clamped to TABLE_SIZE).

    Returns (ids, sentence_ends, sentences_per_document, run_starts, run_ends): ``ids`` holds -1 - k
    where the k-th complex run (``cps[run_starts[k]:run_ends[k]]``) belongs; sentence s ends before
    ``ids[sentence_ends[s]]``; a sentence that produced nothing is not listed.
    """
    n = len(cps)
    ids = np.empty(n, np.int32)
    sentence_ends = np.empty(n, np.int64)
    per_document = np.zeros(len(document_offsets) - 1, np.int64)
    # Upper bounds (a run or a token per character), never grown: rebinding an array inside the loop
    # made numba count references on every iteration (~50 ns a character). Untouched pages cost nothing.
    run_starts = np.empty(n, np.int64)
    run_ends = np.empty(n, np.int64)
    word = np.empty(n + 1, np.int64)
    written = sentences = runs = 0
    for document in range(len(document_offsets) - 1):
        position, document_end = document_offsets[document], document_offsets[document + 1]
        while position < document_end:
            if sentence_mark[cps[position]] == NEWLINE:
                position += 1
                continue
            # split_sentences' pattern: [^E\n]+(?:E+C*)? | E+C*  (E enders, C closing marks)
            start = position
            while position < document_end and sentence_mark[cps[position]] < ENDER:
                position += 1
            if position < document_end and sentence_mark[cps[position]] == ENDER:
                while position < document_end and sentence_mark[cps[position]] == ENDER:
                    position += 1
                while position < document_end and sentence_mark[cps[position]] == CLOSING:
                    position += 1
            end = position
            while start < end and is_py_space[cps[start]]:
                start += 1
            while end > start and is_py_space[cps[end - 1]]:
                end -= 1
            sentence_start = written
            i = start
            while i < end:
                code = cps[i]
                if kind[code] == FAST:
                    ids[written] = char_id[code]
                    written += 1
                    i += 1
                    continue
                j = i
                simple = True
                while j < end and kind[cps[j]] != FAST:
                    simple = simple and kind[cps[j]] != COMPLEX
                    j += 1
                if simple:
                    written = _simple_run(cps, i, j, ids, written, word, kind, char_id, do_lower_case, slots,
                                          entry_bytes, entry_offsets, entry_ids, longest, unk_id)
                else:
                    run_starts[runs], run_ends[runs] = i, j
                    ids[written] = -1 - runs
                    written += 1
                    runs += 1
                i = j
            if written > sentence_start:
                sentence_ends[sentences] = written
                sentences += 1
                per_document[document] += 1
    return ids[:written], sentence_ends[:sentences], per_document, run_starts[:runs], run_ends[:runs]


@kernel
def splice_runs(ids: np.ndarray, sentence_ends: np.ndarray, per_document: np.ndarray, run_ids: np.ndarray,
                run_offsets: np.ndarray) -> tuple:
    """Put each complex run's ids (run k: ``run_ids[run_offsets[k]:run_offsets[k + 1]]``) in its place;
    sentences left without a token are dropped. Returns (ids, sentence_lengths, sentences_per_document)."""
    out = np.empty(len(ids) + len(run_ids), np.int32)
    lengths = np.empty(len(sentence_ends), np.int32)
    counts = np.zeros(len(per_document), np.int64)
    written = kept = sentence = position = 0
    for document in range(len(per_document)):
        for _ in range(per_document[document]):
            start = written
            while position < sentence_ends[sentence]:
                value = ids[position]
                if value >= 0:
                    out[written] = value
                    written += 1
                else:
                    run = -1 - value
                    for k in range(run_offsets[run], run_offsets[run + 1]):
                        out[written] = run_ids[k]
                        written += 1
                position += 1
            if written > start:
                lengths[kept] = written - start
                kept += 1
                counts[document] += 1
            sentence += 1
    return out[:written], lengths[:kept], counts
