"""What masking needs to know of the vocab: its size, the special ids and which ids are ``##`` pieces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.shards import checked_vocab_file


@dataclass(frozen=True, slots=True)
class SpecialIds:
    pad: int = 0
    unk: int = 100
    cls: int = 101
    sep: int = 102
    mask: int = 103

    @classmethod
    def from_manifest(cls, special_token_ids: dict[str, int]) -> "SpecialIds":
        return cls(
            pad=special_token_ids["[PAD]"],
            unk=special_token_ids["[UNK]"],
            cls=special_token_ids["[CLS]"],
            sep=special_token_ids["[SEP]"],
            mask=special_token_ids["[MASK]"],
        )


@dataclass(frozen=True)
class VocabInfo:
    """The vocab as noising sees it: its size, specials and ``##`` pieces."""

    size: int
    special: SpecialIds
    is_continuation: np.ndarray  # bool per id
    is_special: np.ndarray  # bool per id: [PAD] [UNK] [CLS] [SEP] [MASK] and [unused*]
    first_regular_id: int  # random replacement tokens are drawn from ids >= this

    @classmethod
    def from_tokens(cls, tokens: list[str], special: SpecialIds) -> "VocabInfo":
        is_special = np.array([t.startswith("[") and t.endswith("]") and len(t) > 2 for t in tokens], dtype=bool)
        regular = np.flatnonzero(~is_special)
        return cls(
            size=len(tokens),
            special=special,
            is_continuation=np.array([t.startswith("##") for t in tokens], dtype=bool),
            is_special=is_special,
            first_regular_id=int(regular[0]) if len(regular) else 0,
        )


def load_vocab_info(tokenized_dir: Path, manifest: dict) -> VocabInfo:
    """The vocab facts noising needs, from the vocab.txt the tokenize stage copied (checked against its sha256)."""
    vocab_path = checked_vocab_file(tokenized_dir, manifest)
    special = SpecialIds.from_manifest(manifest["vocab"]["special_token_ids"])
    tokens = vocab_path.read_text(encoding="utf-8").split("\n")[: manifest["vocab"]["size"]]
    return VocabInfo.from_tokens(tokens, special)
