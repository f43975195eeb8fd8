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
from pipeline.examples import ExampleShards
from pipeline.evaluate import EvaluateConfig, context_positions, evaluate, main, unigram_entropy
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
    total = correct = context_correct = 0.0
    tokens = context_tokens = 0
    counts: Counter[int] = Counter()
    with torch.no_grad():
        for source, target in examples:
            target = [int(t) for t in target]
            logits = model(input_ids=torch.tensor([[int(s) for s in source]]),
                           decoder_input_ids=torch.tensor([[start, *target[:-1]]])).logits[0]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            total -= sum(float(log_probs[i, t]) for i, t in enumerate(target))
            right = [int(logits[i].argmax()) == t for i, t in enumerate(target)]
            shown = context_positions(source, target)
            correct += sum(right)
            context_correct += sum(r for r, s in zip(right, shown) if s)
            context_tokens += int(shown.sum())
            tokens += len(target)
            counts.update(target)
    entropy = -sum(c / tokens * math.log(c / tokens) for c in counts.values())
    return {"most_frequent_share": max(counts.values()) / tokens, "loss": total / tokens, "accuracy": correct / tokens, "entropy": entropy, "tokens": tokens,
            "context_tokens": context_tokens, "context_accuracy": context_correct / context_tokens,
            "infill_accuracy": (correct - context_correct) / (tokens - context_tokens)}


def test_figures_equal_a_hand_computation(examples_dir, model_dir, capsys):
    report = evaluate(EvaluateConfig(model_dir=model_dir, data_dir=examples_dir, limit=5, batch_size=2,
                                     generate_examples=3, progress=False))
    dataset = ExampleShards(examples_dir)
    hand = hand_computed(model_dir, [dataset[i] for i in range(5)])
    assert report["examples"] == 5 and report["target_tokens"] == hand["tokens"]
    assert report["loss"] == pytest.approx(hand["loss"], rel=1e-5)  # fp32 logits vs float64 by hand
    assert report["perplexity"] == pytest.approx(math.exp(hand["loss"]), rel=1e-4)
    assert report["token_accuracy"] == pytest.approx(hand["accuracy"])
    assert 0 < report["context_tokens"] == hand["context_tokens"] < hand["tokens"]  # BART: most, not all, shown
    assert report["context_token_accuracy"] == pytest.approx(hand["context_accuracy"])
    assert report["infill_token_accuracy"] == pytest.approx(hand["infill_accuracy"])
    assert report["unigram_loss"] == pytest.approx(hand["entropy"], rel=1e-9)
    assert report["unigram_token_accuracy"] == pytest.approx(hand["most_frequent_share"])
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
    hand = hand_computed(model_dir, [dataset[i] for i in range(total - 3, total)])
    assert last["examples_from"] == "last 3" and last["loss"] == pytest.approx(hand["loss"], rel=1e-5)


def test_context_positions_are_the_target_runs_the_source_still_shows():
    import numpy as np

    mask, cls, sep = 4, 1, 2
    target = np.array([cls, 10, 11, 12, 13, 14, 15, 16, 17, sep])
    source = np.array([cls, 10, 11, 12, mask, 16, 17, sep])  # 13..15 masked as one span
    assert context_positions(source, target).tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    # A random replacement splits a run; a run of two shared tokens is too short to count.
    source = np.array([cls, 10, 99, 12, 13, 14, mask, sep])
    assert context_positions(source, target).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert not context_positions(np.array([cls, 20, sep]), np.array([20, 21])).any()


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


def test_zh_evaluate_scores_the_trainer_s_eval_batches_with_the_trainer_s_loss(examples_dir, model_dir):
    """The same batches (pipeline.batch_loader.evaluation_batches) and the same loss (pipeline.loss.seq2seq_loss)
    as the trainer's eval loss over held-out examples, so the two figures agree for the same weights."""
    from pipeline.batch_loader import evaluation_batches
    from pipeline.collate import Seq2SeqCollator
    from pipeline.loss import seq2seq_loss
    from pipeline.model import load_hf_model

    report = evaluate(EvaluateConfig(model_dir=model_dir, data_dir=examples_dir, held_out=6, batch_size=4,
                                     generate_examples=0, progress=False))
    model = load_hf_model(model_dir, "--model_dir").eval()
    dataset = ExampleShards(examples_dir)
    collate = Seq2SeqCollator(pad_id=model.config.pad_token_id, decoder_start_id=model.config.decoder_start_token_id)
    with torch.no_grad():
        trainer_sum = sum(float(seq2seq_loss(model, batch, reduction="sum")) for _, batch in evaluation_batches(
            dataset, range(len(dataset) - 6, len(dataset)), 4, collate))
    assert report["loss"] * report["target_tokens"] == pytest.approx(trainer_sum, rel=1e-9)
