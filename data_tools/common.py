"""Helpers every stage shares: the user-error type, atomic writes, checksums and the name of
the vocab file that travels with each stage's output.

Kept apart from ``cli.py`` (argument parsing) and the tokenizer so that any stage, the
trainer and the export can import them without pulling in either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Every stage output and run directory carries the vocab its ids refer to, under this name.
VOCAB_FILE = "vocab.txt"
# The tokens every stage relies on: padding, unknown, the decoder start / source start, end, mask.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class UserError(Exception):
    """A problem with the user's input or flags: reported in one line, no traceback."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temp file and a rename, so readers (and a crash) never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:  # a full disk or an interrupt leaves no half-written temp file beside ``path``
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
