"""build-vocab: a BERT-format WordPiece vocab for corpora that come without one.

Special tokens sit at the ids of Google's Chinese vocab ([PAD] 0, [unused1-99] 1-99,
[UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), so model configs, masking and the
exported tokenizer treat a built vocab and Google's the same way.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError, write_json_atomic, write_text_atomic
from data_tools.shards import load_manifest, shard_paths

GOOGLE_LAYOUT_HEAD = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(kw_only=True)
class BuildVocabConfig:
    """Train a WordPiece vocab (BERT vocab.txt format) on the clean stage's documents."""

    input_dir: Path = required("Output directory of the clean stage.")
    output_path: Path = required("Where to write vocab.txt (a build-vocab.json report is written beside it).")
    vocab_size: int = option(21_128, "Vocab size, special and [unused] tokens included (Google's Chinese vocab: 21128).")
    min_frequency: int = option(2, "Minimum count of a word piece to enter the vocab.")
    limit_alphabet: int = option(8_000, "Most distinct single characters kept (Chinese needs thousands).")
    do_lower_case: bool = option(True, "Lower-case and strip accents before counting, as BertTokenizer does.")

    def __post_init__(self) -> None:
        self.input_dir, self.output_path = Path(self.input_dir), Path(self.output_path)
        if self.vocab_size <= len(GOOGLE_LAYOUT_HEAD):
            raise UserError(f"--vocab_size {self.vocab_size} must exceed the {len(GOOGLE_LAYOUT_HEAD)} reserved tokens")


def google_layout(learned_tokens: list[str], vocab_size: int) -> list[str]:
    """Reserved tokens at Google's ids, then learned tokens in the trainer's order, truncated."""
    reserved = set(GOOGLE_LAYOUT_HEAD)
    tokens = GOOGLE_LAYOUT_HEAD + [t for t in learned_tokens if t not in reserved and t.strip() == t and t]
    return tokens[:vocab_size]


def _iter_texts(input_dir: Path) -> Iterator[str]:
    manifest = load_manifest(input_dir, "clean")
    for path in shard_paths(input_dir, manifest):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


def build_vocab(config: BuildVocabConfig) -> list[str]:
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=config.do_lower_case
    )
    tokenizer.train_from_iterator(
        _iter_texts(config.input_dir),
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        limit_alphabet=config.limit_alphabet,
        special_tokens=GOOGLE_LAYOUT_HEAD,
        show_progress=False,
    )
    learned = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    tokens = google_layout(learned, config.vocab_size)
    config.output_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.output_path, "".join(f"{token}\n" for token in tokens))
    write_json_atomic(
        config.output_path.with_name("build-vocab.json"),
        {"stage": "build-vocab", "config": config_to_dict(config), "size": len(tokens)},
    )
    print(f"build-vocab: {len(tokens)} tokens -> {config.output_path}", file=sys.stderr)
    return tokens


def main(argv: list[str] | None = None) -> int:
    return run_stage(build_vocab, BuildVocabConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
