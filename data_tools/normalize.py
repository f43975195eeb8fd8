"""Pure text normalization and quality measures used by ``clean``.

Chinese punctuation is full-width by convention (，。！？) and Google's Chinese vocab
keeps it apart from ASCII punctuation, so only full-width letters and digits are
folded to ASCII; NFKC (which would also fold ， to ,) is an opt-in.
"""

from __future__ import annotations

import html
import inspect
import re
import unicodedata

import numpy as np

# Full-width ASCII letters and digits -> half-width; the ideographic space -> space.
_FULLWIDTH_ALNUM = {cp: cp - 0xFEE0 for cp in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))}
_FULLWIDTH_ALNUM[0x3000] = 0x20
# str.translate looks every character up in the table (~50 µs for a news article); most documents
# have none of these characters, so only the runs of them that a character-class search finds are.
_FULLWIDTH_ALNUM_RUN_RE = re.compile("[" + "".join(map(chr, _FULLWIDTH_ALNUM)) + "]+")
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Control characters (Cc) other than newline and tab, and zero-width characters.
_INVISIBLE_RE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_ZERO_WIDTH}]")
_HTML_TAG_RE = re.compile(r"<\s*/?\s*[A-Za-z][^<>]{0,500}>")
_HTML_ENTITY_RE = re.compile(r"&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,10});")
# URL characters are ASCII only, so a URL glued to Chinese text stops where the text starts.
_URL_RE = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_HORIZONTAL_SPACE_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
_CJK_RUN_RE = re.compile("[" + "".join(f"{chr(low)}-{chr(high)}" for low, high in _CJK_RANGES) + "]+")


def normalize_text(
    text: str,
    *,
    unicode_form: str = "NFC",
    fullwidth_to_halfwidth: bool = True,
    strip_html: bool = True,
    remove_urls: bool = True,
    remove_emails: bool = True,
) -> str:
    """Normalize one document; newlines (sentence boundaries) survive, blank lines do not."""
    options = dict(unicode_form=unicode_form, fullwidth_to_halfwidth=fullwidth_to_halfwidth, strip_html=strip_html,
                   remove_urls=remove_urls, remove_emails=remove_emails)
    return _assemble_lines(_character_passes(text, _HTML_TAG_RE, **options))


# A chunk of documents is normalized as one string, the documents joined by a line holding only
# U+FFFF: ~5x less Python per document than one call each. U+FFFF is a noncharacter that
# html.unescape never produces; NFC neither changes it nor lets it combine with a neighbour, and
# newlines do not either; the patterns cannot match it or span a newline, except the tag pattern,
# which gets its own copy that stops at it; and str.strip keeps it. So each pass gives the joined
# string what it gives each document, and a chunk in which a document carries U+FFFF goes one by one.
_DOCUMENT_MARK = "\uffff"
_DOCUMENT_JOIN = f"\n{_DOCUMENT_MARK}\n"
_HTML_TAG_BEFORE_MARK_RE = re.compile(r"<\s*/?\s*[A-Za-z][^<>\uffff]{0,500}>")


def normalize_texts(texts: list[str], **options) -> list[str]:
    """``[normalize_text(text, **options) for text in texts]``, computed on the chunk at once."""
    options = {**_NORMALIZE_DEFAULTS, **options}  # normalize_text's own defaults
    joined = _DOCUMENT_JOIN.join(texts)
    if len(texts) < 2 or joined.count(_DOCUMENT_MARK) != len(texts) - 1:
        return [normalize_text(text, **options) for text in texts]
    pieces = _assemble_lines(_character_passes(joined, _HTML_TAG_BEFORE_MARK_RE, **options)).split(_DOCUMENT_MARK)
    # Each piece is "\n" + document + "\n" (the first and last lack one side); a normalized document
    # neither begins nor ends with a newline, and an empty one leaves "\n" or "".
    return [piece.strip("\n") for piece in pieces]


_NORMALIZE_DEFAULTS = {name: parameter.default
                       for name, parameter in inspect.signature(normalize_text).parameters.items()
                       if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def _character_passes(text: str, html_tag_re: re.Pattern, *, unicode_form: str, fullwidth_to_halfwidth: bool,
                      strip_html: bool, remove_urls: bool, remove_emails: bool) -> str:
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    if fullwidth_to_halfwidth:
        text = _sub_in_lines(_FULLWIDTH_ALNUM_RUN_RE, _fold_fullwidth, text, _next_fullwidth)
    if strip_html:
        text = html_tag_re.sub(" ", text)
        if "&" in text:
            text = _HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
    if remove_urls:
        text = _URL_RE.sub(" ", text)
    if remove_emails:
        text = _sub_in_lines(_EMAIL_RE, " ", text, _next_at_sign)
    text = _INVISIBLE_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _sub_in_lines(_HORIZONTAL_SPACE_RE, " ", text, _NextSpaceToFold())


# Three passes change few lines of a chunk but cost a regex scan of every character (~5 ms per 2,000
# documents each, ~1/3 of clean's work): the fold of full-width characters, the e-mail pattern and the
# whitespace runs. None of their matches can span a newline, so each runs only on the lines holding
# something it could change, found by a search that scans fast (str.find, a single character class).
def _sub_in_lines(pattern: re.Pattern, replacement, text: str, next_trigger) -> str:
    """``pattern.sub(replacement, text)`` for a pattern whose matches never span a newline and change only
    lines where ``next_trigger(text, position)`` (the index of the next such place, or -1) finds one."""
    found = next_trigger(text, 0)
    if found < 0:
        return text
    pieces, done = [], 0
    while found >= 0:
        line_start = text.rfind("\n", 0, found) + 1
        line_end = text.find("\n", found)
        if line_end < 0:
            line_end = len(text)
        pieces.append(text[done:line_start])
        pieces.append(pattern.sub(replacement, text[line_start:line_end]))
        done = line_end
        found = next_trigger(text, line_end)
    pieces.append(text[done:])
    return "".join(pieces)


_FULLWIDTH_ALNUM_RE = re.compile("[" + "".join(map(chr, _FULLWIDTH_ALNUM)) + "]")
# What a whitespace run is replaced by is a single space: only a run holding another whitespace
# character, or two spaces, changes.
_OTHER_HORIZONTAL_SPACE_RE = re.compile(r"[\t\u00a0\u2000-\u200a\u202f\u205f]")


def _next_fullwidth(text: str, position: int) -> int:
    found = _FULLWIDTH_ALNUM_RE.search(text, position)
    return found.start() if found else -1


def _next_at_sign(text: str, position: int) -> int:  # every e-mail address holds one
    return text.find("@", position)


class _NextSpaceToFold:
    """The next two spaces or other whitespace character at or after a position, in one text (one instance per
    text): the next of the latter is kept between calls, so a text with many double spaces and none of the
    others is not scanned to its end at every call."""

    def __init__(self) -> None:
        self.other: int | None = None  # where the next other whitespace character is (-1: none); None: not searched

    def __call__(self, text: str, position: int) -> int:
        if self.other is None or 0 <= self.other < position:
            found = _OTHER_HORIZONTAL_SPACE_RE.search(text, position)
            self.other = found.start() if found else -1
        double = text.find("  ", position, self.other if self.other >= 0 else len(text))
        return double if double >= 0 else self.other


def _fold_fullwidth(match: re.Match) -> str:
    return match.group().translate(_FULLWIDTH_ALNUM)


def _assemble_lines(text: str) -> str:
    """Lines stripped, blank ones dropped."""
    return "\n".join(filter(None, map(str.strip, text.split("\n"))))


def cjk_ratio(text: str) -> float:
    """Share of non-space characters that are CJK ideographs."""
    visible = len(text) - text.count(" ") - text.count("\n")
    if visible <= 0:
        return 0.0
    # runs of ideographs joined, not a list of every ideograph: 5x faster on Chinese text
    return len("".join(_CJK_RUN_RE.findall(text))) / visible


def chunk_measures(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per document, from one UTF-32 array of the chunk: ``cjk_ratio`` (the same floats), and whether
    it may have four equal characters in a row, without which ``repeated_char_ratio`` is 0 (a run
    across two documents is a false alarm, which the exact measure then clears)."""
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    codes = np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts = np.cumsum(lengths + 1) - lengths - 1
    ends = starts + lengths

    def count_per_document(flags: np.ndarray) -> np.ndarray:
        running = np.concatenate(([0], np.cumsum(flags, dtype=np.int64)))
        return running[ends] - running[starts]

    ideographs = count_per_document(_is_cjk(codes))
    visible = lengths - count_per_document(codes == 0x20) - count_per_document(codes == 0x0A)
    # int64 / int64 in float64 rounds exactly as Python's int / int does (both below 2**53)
    ratios = np.where(visible > 0, ideographs / np.maximum(visible, 1), 0.0)
    same = codes[1:] == codes[:-1]
    run_starts = np.flatnonzero(same[:-2] & same[1:-1] & same[2:])
    may_repeat = np.zeros(len(texts), dtype=bool)
    may_repeat[np.searchsorted(starts, run_starts, side="right") - 1] = True
    return ratios, may_repeat


def _is_cjk(codes: np.ndarray) -> np.ndarray:
    """The code points ``_CJK_RUN_RE`` matches."""
    flags = np.zeros(len(codes), dtype=bool)
    for low, high in _CJK_RANGES:
        flags |= (codes >= low) & (codes <= high)
    return flags


# Word characters only: separator lines ("------------") are layout, not repeated content.
_REPEATED_CHAR_RUN_RE = re.compile(r"(\w)\1{3,}")


def repeated_line_ratio(text: str) -> float:
    """Share of lines that repeat an earlier line of the same document (Gopher's duplicate-line fraction)."""
    lines = text.split("\n")
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def repeated_char_ratio(text: str) -> float:
    """Share of characters inside runs of 4 or more identical word characters (哈哈哈哈, aaaa, 0000)."""
    if len(text) < 4:
        return 0.0
    # The back-referencing regex costs ~25 µs on a news article; four equal characters in a row, which
    # it needs, are rare, and numpy finds whether there are any in a few µs.
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    same = codes[1:] == codes[:-1]
    if not (same[:-2] & same[1:-1] & same[2:]).any():
        return 0.0
    return sum(len(match.group()) for match in _REPEATED_CHAR_RUN_RE.finditer(text)) / len(text)


class TraditionalToSimplified:
    """OpenCC's t2s conversion (the ``opencc`` package, in the 'data' extra), built once per process."""

    def __init__(self) -> None:
        try:
            import opencc
        except ImportError as error:
            from data_tools.common import UserError

            raise UserError("--traditional_to_simplified needs OpenCC: pip install opencc") from error
        self._converter = opencc.OpenCC("t2s")

    def __call__(self, text: str) -> str:
        return self._converter.convert(text)
