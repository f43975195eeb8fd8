"""Pure text normalization and quality measures used by ``clean``.

Chinese punctuation is full-width by convention (，。！？) and Google's Chinese vocab
keeps it apart from ASCII punctuation, so only full-width letters and digits are
folded to ASCII; NFKC (which would also fold ， to ,) is an opt-in.
"""

from __future__ import annotations

import html
import re
import unicodedata

import numpy as np

# Full-width ASCII letters and digits -> half-width; the ideographic space -> space.
_FULLWIDTH_ALNUM = {cp: cp - 0xFEE0 for cp in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))}
_FULLWIDTH_ALNUM[0x3000] = 0x20
# str.translate looks every character up in the table (~50 µs for a news article); most documents
# have none of these characters, and a character-class search tells that in a few µs.
_FULLWIDTH_ALNUM_RE = re.compile("[" + "".join(map(chr, _FULLWIDTH_ALNUM)) + "]")
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Control characters (Cc) other than newline and tab, and zero-width characters.
_INVISIBLE_RE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_ZERO_WIDTH}]")
_HTML_TAG_RE = re.compile(r"<\s*/?\s*[A-Za-z][^<>]{0,500}>")
_HTML_ENTITY_RE = re.compile(r"&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,10});")
# URL characters are ASCII only, so a URL glued to Chinese text stops where the text starts.
_URL_RE = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_HORIZONTAL_SPACE_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")
_CJK_RUN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]+")


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
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    if fullwidth_to_halfwidth and _FULLWIDTH_ALNUM_RE.search(text):
        text = text.translate(_FULLWIDTH_ALNUM)
    if strip_html:
        text = _HTML_TAG_RE.sub(" ", text)
        if "&" in text:
            text = _HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
    if remove_urls:
        text = _URL_RE.sub(" ", text)
    if remove_emails and "@" in text:
        text = _EMAIL_RE.sub(" ", text)
    text = _INVISIBLE_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (line.strip() for line in _HORIZONTAL_SPACE_RE.sub(" ", text).split("\n"))
    return "\n".join(line for line in lines if line)


def cjk_ratio(text: str) -> float:
    """Share of non-space characters that are CJK ideographs."""
    visible = len(text) - text.count(" ") - text.count("\n")
    if visible <= 0:
        return 0.0
    # runs of ideographs joined, not a list of every ideograph: 5x faster on Chinese text
    return len("".join(_CJK_RUN_RE.findall(text))) / visible


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
