"""Online masking: the trainer masks a tokenized corpus on the fly with the mask stage's functions."""

import json

import numpy as np
import pytest

from data_tools.mask import MaskConfig
from data_tools.noising import pack_sentences, plan_chunks
from pipeline.examples import OnlineMaskedExamples
from tests.conftest import DEEPSPEED, PROJECT_ROOT, run_command


@pytest.fixture(scope="module")
def tokenized_dir(clue_tokenized_dir):
    return clue_tokenized_dir


def test_plan_chunks_is_pack_sentences_from_lengths():
    sentences = [[1, 2, 3], [4, 5], list(range(6, 13)), [13]]
    plan = plan_chunks([len(s) for s in sentences], 5)
    assert [[sentences[i][a:b] for i, a, b in chunk] for chunk in plan] == pack_sentences(sentences, 5)


@pytest.mark.parametrize("preset", ["bart_paper", "pegasus_paper", "uer_gsg"])
def test_examples_are_fresh_each_epoch_and_reproducible(tmp_path, tokenized_dir, preset):
    config = MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, preset=preset, seq_length=128,
                        tgt_seq_length=48)
    data = OnlineMaskedExamples(tokenized_dir, config)
    assert len(data) > 1000
    changed = 0
    for index in range(0, len(data), len(data) // 50):
        source, target = data.example(index, epoch=0)
        assert source[0] == 101 and source[-1] == 102 and target[-1] == 102 and len(source) <= 128
        again, _ = data.example(index, epoch=0)
        assert np.array_equal(source, again)
        later, later_target = data.example(index, epoch=1)
        changed += not np.array_equal(source, later)
        if preset == "bart_paper":
            assert np.array_equal(target, later_target)  # same chunk, new noise
    if preset == "bart_paper":
        assert changed > 40
    elif preset == "uer_gsg":
        assert changed > 5  # random gaps; a 2-sentence chunk that keeps its last sentence has one choice
    else:
        assert changed == 0  # principal selection has no randomness: the same gaps every epoch


@pytest.mark.slow
def test_deepspeed_training_with_online_masking(tmp_path, tokenized_dir):
    mask_flags = tmp_path / "mask.json"
    mask_flags.write_text(json.dumps({"preset": "pegasus_paper", "seq_length": 64, "tgt_seq_length": 32}))
    run = tmp_path / "run"
    result = run_command([
        *DEEPSPEED, "--num_gpus", "2", "--master_port", "29690", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
        "--data_dir", str(tokenized_dir), "--online_mask_config", str(mask_flags), "--output_dir", str(run),
        "--model_config", "pegasus-tiny", "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"),
        "--total_steps", "4", "--micro_batch_size", "4", "--log_every_steps", "2", "--no-progress",
        "--eval_examples", "64", "--eval_every_steps", "2", "--record_example_ids",
    ])
    assert "ZeRO stage 2" in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval_loss"]) for r in evals)
    assert evals[0]["eval_tokens"] == evals[1]["eval_tokens"] > 0  # the same held-out examples each time
    data = OnlineMaskedExamples(tokenized_dir, MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path,
                                                          preset="pegasus_paper", seq_length=64, tgt_seq_length=32))
    trained = [i for rank in (0, 1) for line in (run / f"example_ids_rank{rank}.jsonl").open()
               for i in json.loads(line)["example_ids"]]
    assert max(trained) < len(data) - 64  # held-out examples are never trained on


def test_a_tokenized_corpus_without_mask_flags_is_a_user_error(tmp_path, tokenized_dir):
    from data_tools.common import UserError
    from pipeline.examples import load_training_data

    with pytest.raises(UserError, match="pass --online_mask_config"):
        load_training_data(tokenized_dir, None, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "bart_paper", "output_dir": "x", "nonsense": 1}))
    with pytest.raises(UserError, match="nonsense"):
        load_training_data(tokenized_dir, bad, tmp_path)
