"""build-vocab: a BERT-format WordPiece vocab for corpora that come without one.

Special tokens sit at the ids of Google's Chinese vocab ([PAD] 0, [unused1-99] 1-99,
[UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), so model configs, masking and the
exported tokenizer treat a built vocab and Google's the same way.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.clean import iter_document_texts
from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError, file_sha256, write_json_atomic
from data_tools.outputs import (
    check_apart,
    check_replaceable_file,
    output_guard,
    overwrite_option,
    read_json_object,
    staged_file,
)
from data_tools.shards import load_manifest, shard_paths

REPORT_FILE = "build-vocab.json"
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
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.input_dir, self.output_path = Path(self.input_dir), Path(self.output_path)
        if self.vocab_size <= len(GOOGLE_LAYOUT_HEAD):
            raise UserError(f"--vocab_size {self.vocab_size} must exceed the {len(GOOGLE_LAYOUT_HEAD)} reserved tokens")
        if self.min_frequency < 1 or self.limit_alphabet < 1:
            raise UserError(f"--min_frequency {self.min_frequency} and --limit_alphabet {self.limit_alphabet} must be "
                            "at least 1")

    @property
    def report_path(self) -> Path:
        return self.output_path.with_name(REPORT_FILE)


def google_layout(learned_tokens: list[str], vocab_size: int) -> list[str]:
    """Reserved tokens at Google's ids, then learned tokens in the trainer's order, truncated."""
    reserved = set(GOOGLE_LAYOUT_HEAD)
    tokens = GOOGLE_LAYOUT_HEAD + [t for t in learned_tokens if t not in reserved and t.strip() == t and t]
    return tokens[:vocab_size]


def written_by_build_vocab(config: BuildVocabConfig) -> tuple[bool, bool]:
    """Whether the existing vocab file and report are this command's earlier output: the report
    beside the vocab records the vocab's sha256 (reports of older versions: its path)."""
    report = read_json_object(config.report_path)
    if report is None or report.get("stage") != "build-vocab":
        return False, False
    if not config.output_path.is_file():
        return False, True
    if "vocab_sha256" in report:
        return report["vocab_sha256"] == file_sha256(config.output_path), True
    return report.get("config", {}).get("output_path") == str(config.output_path), True


def build_vocab(config: BuildVocabConfig) -> list[str]:
    """Build the vocab (or keep an up-to-date one); locked, and SIGTERM unwinds, from the first look at the output."""
    with output_guard(config.output_path):
        return _build_vocab(config)


def _build_vocab(config: BuildVocabConfig) -> list[str]:
    from tokenizers import BertWordPieceTokenizer

    check_apart(config.output_path, "--output_path", {"--input_dir": config.input_dir})
    own_vocab, own_report = written_by_build_vocab(config)
    check_replaceable_file(config.output_path, "--output_path", "zh-build-vocab", own_vocab, config.overwrite)
    check_replaceable_file(config.report_path, "its report", "zh-build-vocab", own_report, config.overwrite)
    shards = shard_paths(config.input_dir, load_manifest(config.input_dir, "clean"))  # checked before reading
    input_manifest_sha256 = file_sha256(config.input_dir / "manifest.json")
    settings = {k: v for k, v in config_to_dict(config).items() if k != "overwrite"}
    report = read_json_object(config.report_path) or {}
    if own_vocab and not config.overwrite and report.get("input_manifest_sha256") == input_manifest_sha256 and \
            {k: v for k, v in report.get("config", {}).items() if k != "overwrite"} == settings:
        # The WordPiece trainer breaks ties between equally frequent pieces differently from run to run, so a
        # rebuilt vocab would differ and orphan every corpus tokenized with this one: keep it.
        print(f"build-vocab: {config.output_path} is up to date (built from the same clean output with the same "
              "flags); pass --overwrite to build it again", file=sys.stderr)
        return config.output_path.read_text(encoding="utf-8").splitlines()

    tokenizer = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=config.do_lower_case
    )
    tokenizer.train_from_iterator(
        iter_document_texts(shards),
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        limit_alphabet=config.limit_alphabet,
        special_tokens=GOOGLE_LAYOUT_HEAD,
        show_progress=False,
    )
    learned = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    tokens = google_layout(learned, config.vocab_size)
    text = "".join(f"{token}\n" for token in tokens)
    with staged_file(config.output_path) as staging:
        staging.write_text(text, encoding="utf-8")
    write_json_atomic(config.report_path, {
        "stage": "build-vocab", "config": config_to_dict(config), "size": len(tokens),
        "vocab_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "input_manifest_sha256": input_manifest_sha256,
    })
    print(f"build-vocab: {len(tokens)} tokens -> {config.output_path}", file=sys.stderr)
    return tokens


def main(argv: list[str] | None = None) -> int:
    return run_stage(build_vocab, BuildVocabConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
