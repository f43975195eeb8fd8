"""Runs DESIGN.md's user snippet on exported model directories, exactly as a user would.

``python -m pipeline.hf_snippet EXPORT_DIR [EXPORT_DIR ...]`` loads each directory with
``BertTokenizer`` and the model class named in its config, and prints one greedy
generation through ``Text2TextGenerationPipeline``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "内容丰富、版式设计考究、图片华丽、印制精美。[MASK]纸箱内还放了充气袋用于保护。"


def run_snippet(export_dir: Path, prompt: str = PROMPT) -> str:
    import transformers
    from transformers import BertTokenizer, Text2TextGenerationPipeline

    model_class_name = json.loads((Path(export_dir) / "config.json").read_text())["architectures"][0]
    model_class = getattr(transformers, model_class_name)  # Bart/PegasusForConditionalGeneration
    tokenizer = BertTokenizer.from_pretrained(str(export_dir))
    model = model_class.from_pretrained(str(export_dir))
    result = Text2TextGenerationPipeline(model, tokenizer)(prompt, max_length=50, do_sample=False)
    return result[0]["generated_text"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.generate import remove_cjk_spaces

    directories = argv if argv is not None else sys.argv[1:]
    if not directories:
        print("usage: python -m pipeline.hf_snippet EXPORT_DIR [EXPORT_DIR ...]", file=sys.stderr)
        return 2
    for directory in directories:
        text = run_snippet(Path(directory))
        print(f"{directory}: {PROMPT} -> {remove_cjk_spaces(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
