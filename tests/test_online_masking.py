"""Online masking: the trainer masks a tokenized corpus on the fly with the mask stage's kernels."""

import json

import numpy as np
import pytest

from data_tools.common import UserError
from data_tools.compiled import COMPILED
from data_tools.mask import MaskConfig
from data_tools.masking.online import CorpusChunks, mask_chunk
from data_tools.masking.recipe import MaskRecipe
from data_tools.masking.streams import masking_randomness
from data_tools.shards import TokenizedCorpus, load_manifest
from pipeline.examples import OnlineMaskedExamples, load_training_data
from tests.conftest import DEEPSPEED, PROJECT_ROOT, run_command
from tests.masking_reference import (
    ReferenceStream,
    reference_gsg_example,
    reference_pack_sentences,
    reference_stream_key,
)


@pytest.fixture(scope="module")
def tokenized_dir(clue_tokenized_dir):
    return clue_tokenized_dir


@pytest.mark.parametrize("recipe", [MaskRecipe(target="bart", seq_length=24), MaskRecipe(target="gsg", seq_length=48)],
                         ids=["bart", "gsg"])
def test_the_chunk_index_finds_each_chunk_of_the_packing(tokenized_dir, recipe):
    """Every chunk, read back from the index by slicing the mapped shard, is the chunk the plain packing
    makes of its document; gsg leaves out single-sentence chunks but keeps the numbering."""
    chunks = CorpusChunks(tokenized_dir, load_manifest(tokenized_dir, "tokenize"), recipe)
    corpus = TokenizedCorpus(tokenized_dir)
    expected = [(document, number, chunk) for document in range(len(corpus))
                for number, chunk in enumerate(reference_pack_sentences([s.tolist() for s in corpus[document]],
                                                                        recipe.max_chunk_tokens))
                if len(chunk) >= recipe.min_chunk_sentences]
    assert len(chunks) == len(expected) > 1000
    for index in [*range(0, len(chunks), 7), len(chunks) - 1]:
        document, number, flat, offsets = chunks.chunk(index)
        assert (document, number, [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])]) == expected[index]
        assert chunks.tokens[index] == len(flat)


@pytest.mark.parametrize("preset", ["bart_paper", "pegasus_paper", "uer_gsg"])
def test_examples_are_fresh_each_epoch_and_reproducible(tmp_path, tokenized_dir, preset):
    data = OnlineMaskedExamples(tokenized_dir, MaskRecipe(preset=preset, seq_length=128, tgt_seq_length=48))
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


@pytest.mark.parametrize("flags", [dict(preset="uer_gsg"), dict(preset="pegasus_paper", gap_action="mixed"),
                                   dict(target="gsg", gap_action="mixed", keep_last_sentence=True, tgt_seq_length=8)],
                         ids=["uer_gsg", "principal-mixed", "random-mixed-keep-last"])
def test_online_gsg_examples_are_the_reference_drawn_from_each_chunks_stream(tokenized_dir, flags):
    """Example i of epoch e draws from the first stream of (seed, e, document, chunk number): the plain
    reference from that stream, and the kernel compiled or run as Python, give the same example."""
    recipe = MaskRecipe(seq_length=96, **{"tgt_seq_length": 32, **flags})
    data = OnlineMaskedExamples(tokenized_dir, recipe)
    for index in range(0, len(data), len(data) // 40):
        for epoch in (0, 3):
            document, number, flat, offsets = data.chunks.chunk(index)
            pieces = [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])]
            stream = ReferenceStream(reference_stream_key(recipe.seed, epoch, document, number, 1))
            expected = reference_gsg_example(pieces, stream, recipe, data.vocab.special)
            assert [part.tolist() for part in data.example(index, epoch)] == list(expected)
            for compiled in (True, False) if COMPILED else (False,):
                randomness = masking_randomness(recipe.seed, epoch, document, number)
                example = mask_chunk(flat, offsets, randomness, recipe, data.vocab, compiled)
                assert [part.tolist() for part in example] == list(expected)


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
    data = OnlineMaskedExamples(tokenized_dir, MaskRecipe(preset="pegasus_paper", seq_length=64, tgt_seq_length=32))
    trained = [i for rank in (0, 1) for line in (run / f"example_ids_rank{rank}.jsonl").open()
               for i in json.loads(line)["example_ids"]]
    assert max(trained) < len(data) - 64  # held-out examples are never trained on


def test_a_tokenized_corpus_without_mask_flags_is_a_user_error(tmp_path, tokenized_dir):
    with pytest.raises(UserError, match="pass --online_mask_config"):
        load_training_data(tokenized_dir, None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "bart_paper", "output_dir": "x", "nonsense": 1}))
    with pytest.raises(UserError, match=r"unknown or not allowed mask flags \['nonsense', 'output_dir'\]"):
        load_training_data(tokenized_dir, bad)
    bad.write_text(json.dumps({"preset": "uer_gsg", "target": "bart"}))
    with pytest.raises(UserError, match="bad.json: --preset uer_gsg is for --target gsg, not bart"):
        load_training_data(tokenized_dir, bad)


def test_mask_flags_give_the_recipe_and_the_stage_config_gives_the_same(tmp_path, tokenized_dir):
    """A JSON of zh-mask flags may carry the stage's run flags (accepted, unused); a MaskConfig masks online
    as its recipe does."""
    flags = tmp_path / "mask.json"
    flags.write_text(json.dumps({"preset": "uer_bart", "seq_length": 96, "seed": 3, "dup_factor": 2,
                                 "processes_num": 4}))
    data = load_training_data(tokenized_dir, flags)
    assert data.recipe == MaskRecipe(preset="uer_bart", seq_length=96, seed=3)
    config = MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / "unused", preset="uer_bart", seq_length=96,
                        seed=3)
    again = OnlineMaskedExamples(tokenized_dir, config)
    for index in (0, len(data) // 2, len(data) - 1):
        assert all(np.array_equal(a, b) for a, b in zip(data.example(index, 2), again.example(index, 2)))
    assert np.array_equal(data.lengths(), again.lengths()) and data.max_lengths() == (96, 96)
