"""The HF side on both supported transformers versions (5.x: bin/test.sh; 4.57: .ci/run's compatibility
pass): the card's snippet, generation decoding and quiet loading give the same results on either."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from pipeline.convert_to_hf import write_hf_directory
from pipeline.model import build_model, load_model_config

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


@pytest.fixture(scope="module", params=["bart-tiny", "pegasus-tiny"])
def export(request, google_vocab, tmp_path_factory) -> Path:
    """A zh-export directory of a randomly initialised tiny model with Google's vocab."""
    torch.manual_seed(3)
    model = build_model(load_model_config(request.param, 21128, SPECIALS))
    output = tmp_path_factory.mktemp(request.param) / "export"
    write_hf_directory(model, google_vocab, output, {"written_by": "zh-export", "run_dir": "none"})
    return output


@pytest.mark.skipif(not TRANSFORMERS_4, reason="Text2TextGenerationPipeline, the card's call, exists on 4.x only")
def test_the_card_generation_equals_text2text_pipeline_on_4x(export):
    """generate_like_the_card is what the card's pipeline does on 4.x (where exports set no num_beams, so its
    default of 4 applies): same text for several prompts, which makes the 5.x snippet its equivalent."""
    from transformers import BertTokenizer, Text2TextGenerationPipeline

    from pipeline.hf_snippet import PROMPT, architecture, generate_like_the_card

    tokenizer = BertTokenizer.from_pretrained(str(export))
    model = getattr(transformers, architecture(export)).from_pretrained(str(export)).eval()
    pipeline = Text2TextGenerationPipeline(model, tokenizer)
    for prompt in (PROMPT, "今天天气很好，[MASK]去公园散步。", "这本书[MASK]值得一读。", "hello [MASK] world", "中文"):
        expected = pipeline(prompt, max_length=50, do_sample=False)[0]["generated_text"]
        assert generate_like_the_card(model, tokenizer, prompt) == expected


def test_the_snippet_runs_and_is_beam_search_of_four(export):
    from transformers import BertTokenizer

    from pipeline.hf_snippet import CARD_GENERATION, PROMPT, architecture, run_snippet

    assert CARD_GENERATION == {"max_length": 50, "do_sample": False, "num_beams": 4}
    tokenizer = BertTokenizer.from_pretrained(str(export))
    model = getattr(transformers, architecture(export)).from_pretrained(str(export)).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        ids = model.generate(**inputs, max_length=50, do_sample=False, num_beams=4)[0]
    assert run_snippet(export) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_loading_an_export_draws_no_progress_bar(export, capfd):
    """transformers 5 draws a "Loading weights" bar on stderr in from_pretrained: the commands' one-line
    errors and their logs must not carry it."""
    from pipeline.generate import load_model

    capfd.readouterr()
    load_model(export)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "it/s" not in captured.err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored for the user's own code after the load


def test_generation_decodes_english_with_cleaned_up_spaces_on_both_versions(export):
    """5.x's decode leaves "don ' t" unless asked; zh-generate asks, as 4.x's BertTokenizer did by default."""
    from pipeline.generate import GenerateConfig, generate_texts, load_model

    tokenizer, _ = load_model(export)
    target = tokenizer("i don't know, 今天很好。", return_token_type_ids=False, return_tensors="pt")["input_ids"]

    class Replays:  # a model whose generation is the target: this test is about decoding
        def generate(self, **_):
            return target

    config = GenerateConfig(model_dir=export)
    assert generate_texts(tokenizer, Replays(), ["unused"], config) == ["i don't know,今天很好。"]


# Compatibility ideographs (NFC/NFD maps U+F900 to U+8C48), accents, full-width forms, emoji, Latin words
# and the special tokens written inside text: where transformers 5's Rust BertTokenizer and 4.x's slow one
# could part ways from each other or from our tokenize stage.
PARITY_TEXTS = [
    "兼容汉字\uf900\uf901\ufa0e和扩展B区𠀀𠀁以及康熙部首⼀⼆",
    "café naïve ÉCOLE Ångström e\u0301 \u0301开头",
    "全角ＡＢＣ１２３，半角abc123，混合Ｍｉｘｅｄ",
    "😀😂emoji和한국어 and にほんご カタカナ",
    "supercalifragilisticexpialidocious Hello World! i don't know",
    "[MASK]在文本里[CLS]x[SEP]y 小写的[mask]",
    "ΑΣ.Β ΟΔΥΣΣΕΥΣ İstanbul ß ﬁ",
]


def test_the_cards_tokenizer_on_an_export_gives_the_tokenize_stages_ids(export, google_vocab):
    """BertTokenizer.from_pretrained(export), as the card loads it, against our encoder (the tokenize
    stage's), on this transformers version: 5.x's Rust tokenizer or 4.x's slow one."""
    from transformers import BertTokenizer

    from data_tools.wordpiece import BertWordPieceEncoder

    tokenizer = BertTokenizer.from_pretrained(str(export))
    ours = BertWordPieceEncoder(google_vocab)
    for text in PARITY_TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    ids = tokenizer("i don't know, ok.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "i don't know, ok."  # the export's clean_up_tokenization_spaces
