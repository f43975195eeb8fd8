"""Runs DESIGN.md's user snippet on exported model directories, exactly as a user would.

``python -m pipeline.hf_snippet EXPORT_DIR [EXPORT_DIR ...]`` loads each directory with
``BertTokenizer`` and the model class named in its config, and prints one greedy
generation through ``Text2TextGenerationPipeline``; for a BART model also how much of the
prompt's context it gave back (difflib's character similarity to the prompt without [MASK]).
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

PROMPT = "内容丰富、版式设计考究、图片华丽、印制精美。[MASK]纸箱内还放了充气袋用于保护。"


def run_snippet(export_dir: Path, prompt: str = PROMPT) -> str:
    import transformers
    from transformers import BertTokenizer, Text2TextGenerationPipeline

    model_class = getattr(transformers, architecture(export_dir))  # Bart/PegasusForConditionalGeneration
    tokenizer = BertTokenizer.from_pretrained(str(export_dir))
    model = model_class.from_pretrained(str(export_dir))
    result = Text2TextGenerationPipeline(model, tokenizer)(prompt, max_length=50, do_sample=False)
    return result[0]["generated_text"]


def architecture(export_dir: Path) -> str:
    """The model class an export's config.json names."""
    return json.loads((Path(export_dir) / "config.json").read_text())["architectures"][0]


def context_similarity(generated: str, prompt: str = PROMPT) -> float:
    """Character similarity (difflib ratio, 0-1) of a generation to the prompt with its [MASK] removed."""
    return difflib.SequenceMatcher(None, generated, prompt.replace("[MASK]", "")).ratio()


def main(argv: list[str] | None = None) -> int:
    from pipeline.generate import remove_cjk_spaces

    directories = argv if argv is not None else sys.argv[1:]
    if not directories:
        print("usage: python -m pipeline.hf_snippet EXPORT_DIR [EXPORT_DIR ...]", file=sys.stderr)
        return 2
    for directory in directories:
        text = remove_cjk_spaces(run_snippet(Path(directory)))
        copied = (f"  (context given back: similarity {context_similarity(text):.2f})"
                  if architecture(Path(directory)).startswith("Bart") else "")
        print(f"{directory}: {PROMPT} -> {text}{copied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
