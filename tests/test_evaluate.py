"""zh-evaluate: its figures against a hand computation on a tiny batch, independence from the
batch size, the vocab check, and a UER-py import evaluated like an export."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from data_tools.mask import MaskConfig, mask
from data_tools.clean import CleanConfig, clean
from data_tools.tokenize_shards import TokenizeConfig, tokenize
from pipeline.convert_to_hf import write_hf_directory
from pipeline.data import ExampleShards
from pipeline.evaluate import EvaluateConfig, evaluate, main, unigram_entropy
from pipeline.model import build_model, load_model_config
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory, tiny_vocab):
    root = tmp_path_factory.mktemp("evaluate")
    clean(CleanConfig(input_paths=[FIXTURES / "noisy_documents.txt"], output_dir=root / "clean", progress=False))
    tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=tiny_vocab, progress=False))
    mask(MaskConfig(input_dir=root / "tok", output_dir=root / "bart", target="bart", seq_length=32, progress=False))
    return root / "bart"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, examples_dir):
    manifest = json.loads((examples_dir / "manifest.json").read_text())
    torch.manual_seed(0)
    model = build_model(load_model_config("bart-tiny", manifest["vocab"]["size"], manifest["vocab"]["special_token_ids"]))
    output = tmp_path_factory.mktemp("evaluate-model") / "export"
    write_hf_directory(model, examples_dir / "vocab.txt", output, {"written_by": "zh-export", "run_dir": "test"})
    return output


def hand_computed(model_dir, examples):
    """Loss, accuracy and unigram entropy, one example at a time with no padding or collator."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    start = model.config.decoder_start_token_id
    total = correct = 0.0
    tokens = 0
    counts: Counter[int] = Counter()
    with torch.no_grad():
        for source, target in examples:
            target = [int(t) for t in target]
            logits = model(input_ids=torch.tensor([[int(s) for s in source]]),
                           decoder_input_ids=torch.tensor([[start, *target[:-1]]])).logits[0]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            total -= sum(float(log_probs[i, t]) for i, t in enumerate(target))
            correct += sum(int(logits[i].argmax()) == t for i, t in enumerate(target))
            tokens += len(target)
            counts.update(target)
    entropy = -sum(c / tokens * math.log(c / tokens) for c in counts.values())
    return total / tokens, correct / tokens, entropy, tokens


def test_figures_equal_a_hand_computation(examples_dir, model_dir, capsys):
    report = evaluate(EvaluateConfig(model_dir=model_dir, data_dir=examples_dir, limit=5, batch_size=2,
                                     generate_examples=3, progress=False))
    dataset = ExampleShards(examples_dir)
    loss, accuracy, entropy, tokens = hand_computed(model_dir, [dataset[i] for i in range(5)])
    assert report["examples"] == 5 and report["target_tokens"] == tokens
    assert report["loss"] == pytest.approx(loss, rel=1e-5)  # fp32 logits vs float64 by hand
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert report["token_accuracy"] == pytest.approx(accuracy)
    assert report["unigram_loss"] == pytest.approx(entropy, rel=1e-9)
    assert report["generated_examples"] == 3 and 0.0 <= report["exact_match"] <= 1.0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == report  # the JSON line comes last


def test_figures_do_not_depend_on_the_batch_size_and_held_out_takes_the_last(examples_dir, model_dir):
    def run(**flags):
        return evaluate(EvaluateConfig(model_dir=model_dir, data_dir=examples_dir, generate_examples=0,
                                       progress=False, **flags))

    one, seven = run(limit=9, batch_size=1), run(limit=9, batch_size=7)
    assert one["loss"] == pytest.approx(seven["loss"], rel=1e-5) and one["target_tokens"] == seven["target_tokens"]
    total = len(ExampleShards(examples_dir))
    last = run(held_out=3, batch_size=2)
    dataset = ExampleShards(examples_dir)
    loss, _, _, _ = hand_computed(model_dir, [dataset[i] for i in range(total - 3, total)])
    assert last["examples_from"] == "last 3" and last["loss"] == pytest.approx(loss, rel=1e-5)


def test_unigram_entropy_of_a_known_distribution():
    import numpy as np

    assert unigram_entropy(np.array([0, 5, 5, 0])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([7])) == 0.0


def test_a_model_of_another_vocab_is_refused_in_one_line(examples_dir, model_dir, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    with open(other / "vocab.txt", "a", encoding="utf-8") as handle:
        handle.write("extra\n")
    assert main(["--model_dir", str(other), "--data_dir", str(examples_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the vocab" in err[0]


def test_an_imported_uer_model_is_evaluated_like_an_export(examples_dir, tmp_path, tiny_vocab):
    from pipeline.uer_interop import ImportUerConfig, import_uer
    from tests.test_uer_interop import uer_state_dict

    vocab_size = len(tiny_vocab.read_text(encoding="utf-8").splitlines())
    torch.save(uer_state_dict("2021", "pegasus", vocab_size), tmp_path / "uer.bin")
    imported = import_uer(ImportUerConfig(checkpoint=tmp_path / "uer.bin", vocab_path=examples_dir / "vocab.txt",
                                          output_dir=tmp_path / "hf", heads_num=4))
    report = evaluate(EvaluateConfig(model_dir=imported, data_dir=examples_dir, limit=4, generate_examples=2,
                                     progress=False))
    assert math.isfinite(report["loss"]) and report["target_tokens"] > 0
