"""Runs DESIGN.md's user snippet on exported model directories, exactly as a user would.

``python -m pipeline.hf_snippet EXPORT_DIR [EXPORT_DIR ...]`` loads each directory with
``BertTokenizer`` and the model class named in its config, and prints one generation; for a
BART model also how much of the prompt's context it gave back (difflib's character similarity
to the prompt without [MASK]).

The seed models' cards use ``Text2TextGenerationPipeline(model, tokenizer)(text, max_length=50,
do_sample=False)``, which transformers 5 removed. On 4.x that pipeline is not greedy: exports set
no ``num_beams``, so its default of 4 applies. ``generate_like_the_card`` is what it did, written
with calls both versions have (the same token ids as 4.57's pipeline): no token_type_ids, which
BART's forward does not take; 4 beams; special tokens skipped and spaces left as they are.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

PROMPT = "内容丰富、版式设计考究、图片华丽、印制精美。[MASK]纸箱内还放了充气袋用于保护。"
# Text2TextGenerationPipeline's defaults on 4.x for the card's call.
CARD_GENERATION = {"max_length": 50, "do_sample": False, "num_beams": 4}


def generate_like_the_card(model: Any, tokenizer: Any, text: str) -> str:
    """The card's pipeline call on any transformers version (see the module docstring)."""
    import torch

    inputs = tokenizer(text, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        output = model.generate(**inputs, **CARD_GENERATION)
    return tokenizer.decode(output[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def run_snippet(export_dir: Path, prompt: str = PROMPT) -> str:
    import transformers
    from transformers import BertTokenizer

    from pipeline.model import quiet_loading

    model_class = getattr(transformers, architecture(export_dir))  # Bart/PegasusForConditionalGeneration
    with quiet_loading():
        tokenizer = BertTokenizer.from_pretrained(str(export_dir))
        model = model_class.from_pretrained(str(export_dir)).eval()
    return generate_like_the_card(model, tokenizer, prompt)


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
