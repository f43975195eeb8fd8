"""Chinese sentence splitting (pure).

A sentence ends at 。！？!?；; or an ellipsis (…… / …), together with any run of
enders (？！) and any closing quotes or brackets that follow (”’」』）》)"').
Newlines also end sentences. The Latin full stop is *not* an ender, so decimals
(3.14) and abbreviations (U.S.) never split a sentence.
"""

from __future__ import annotations

import re

SENTENCE_ENDERS = "。！？!?；;…"
CLOSING_MARKS = "”’」』）》)\"'"
_SENTENCE_RE = re.compile(
    f"[^{SENTENCE_ENDERS}\n]+(?:[{SENTENCE_ENDERS}]+[{CLOSING_MARKS}]*)?"
    f"|[{SENTENCE_ENDERS}]+[{CLOSING_MARKS}]*"
)


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences; whitespace-only pieces are dropped."""
    sentences = []
    for match in _SENTENCE_RE.finditer(text):
        sentence = match.group().strip()
        if sentence:
            sentences.append(sentence)
    return sentences

