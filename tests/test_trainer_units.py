"""The trainer's pure pieces: schedule, batch-size resolution, shipped DeepSpeed configs,
the resumable sampler, the collator and the packaged model configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.common import UserError
from pipeline.collate import DecoderInputDropout, Seq2SeqCollator
from pipeline.sampler import ResumableDistributedSampler, padded_batch_cost, plan_micro_batches
from pipeline.ds_config import lr_multiplier, resolve_batch_sizes
from pipeline.model import build_model, load_model_config, packaged_model_configs, weight_decay_groups
from pipeline.train_config import TrainConfig
from tests.conftest import PROJECT_ROOT

DS_CONFIGS = sorted((PROJECT_ROOT / "ds_configs").glob("*.json"))
SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def make_config(**overrides) -> TrainConfig:
    return TrainConfig(data_dir=Path("d"), output_dir=Path("o"), **overrides)


def test_warmup_then_linear_and_cosine_decay():
    assert lr_multiplier(0, 100, 10, "linear", 0.0) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear", 0.0) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "linear", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(50, 100, 10, "constant", 0.0) == 1.0


def test_batch_sizes_are_derived_once_and_contradictions_name_the_field():
    config = make_config(micro_batch_size=4, gradient_accumulation_steps=2)
    resolved = resolve_batch_sizes(config, {"train_batch_size": "auto", "optimizer": {"params": {"lr": "auto"}}},
                                   world_size=2, source="x.json")
    assert resolved["train_batch_size"] == 16 and resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["optimizer"]["params"]["lr"] == config.learning_rate
    with pytest.raises(UserError, match="x.json: train_batch_size is 32"):
        resolve_batch_sizes(config, {"train_batch_size": 32}, world_size=2, source="x.json")
    with pytest.raises(UserError, match="--global_batch_size 10"):
        resolve_batch_sizes(make_config(global_batch_size=10), {}, world_size=1, source="x.json")


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_configs_resolve_and_keep_the_required_settings(path):
    raw = json.loads(path.read_text())
    resolved = resolve_batch_sizes(make_config(micro_batch_size=8, gradient_accumulation_steps=4), raw, 8, str(path))
    assert resolved["train_batch_size"] == 8 * 4 * 8
    zero = resolved["zero_optimization"]
    assert zero["stage"] == 2 and zero["round_robin_gradients"] is False and zero["contiguous_gradients"] is True
    assert resolved["optimizer"]["type"] == "AdamW"
    if "offload_optimizer" not in zero:
        assert resolved["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's FusedAdam
    if path.name != "cpu_zero2.json":
        assert zero["overlap_comm"] is True
        # Gradients summed over ranks in fp32, not bf16/fp16 (README: "ZeRO-2 settings").
        assert resolved["communication_data_type"] == "fp32"
        # Buckets well below the smaller seed model (BART 4+4, ~83M parameters), so reduction starts
        # during backward and overlap_comm has something to overlap.
        assert zero["reduce_bucket_size"] <= 83e6 / 3 and zero["allgather_bucket_size"] <= 83e6 / 3
    if resolved.get("bf16", {}).get("enabled"):
        assert resolved["data_types"]["grad_accum_dtype"] == "fp32"


def test_shipped_configs_include_bf16_fp16_offload_and_cpu():
    names = {p.name for p in DS_CONFIGS}
    assert {"zero2_bf16.json", "zero2_fp16.json", "zero2_bf16_offload.json", "cpu_zero2.json"} <= names


def test_sampler_covers_each_epoch_once_across_ranks_and_resumes_exactly():
    def take(rank, state, steps):
        sampler = ResumableDistributedSampler(103, 4, rank, 2, seed=5)
        sampler.load_state_dict(state)
        batches = iter(sampler)
        return [next(batches) for _ in range(steps)]

    fresh = {"epoch": 0, "micro_batches": 0, "consumed_samples": 0}
    epoch_steps = 103 // 8
    seen = [i for step in range(epoch_steps) for rank in (0, 1) for i in take(rank, fresh, epoch_steps)[step]]
    assert len(seen) == len(set(seen)) == epoch_steps * 8
    # Resuming from the state saved after 5 steps continues exactly where the uninterrupted run is.
    sampler = ResumableDistributedSampler(103, 4, 0, 2, seed=5)
    batches = iter(sampler)
    for _ in range(5):
        next(batches)
    assert sampler.state_dict() == {"epoch": 0, "micro_batches": 10, "consumed_samples": 40}
    assert take(0, sampler.state_dict(), 10) == take(0, fresh, 15)[5:]
    # The next epoch is a different permutation.
    assert take(0, fresh, epoch_steps + 1)[-1] != take(0, fresh, 1)[0]


def _lengths(count: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    source = rng.integers(5, 300, count)
    return np.stack([source, rng.integers(2, 1 + source)], axis=1).astype(np.int32)


def test_token_budget_batches_hold_every_example_once_within_budget_and_pad_less():
    lengths = _lengths(2000)
    order = np.random.default_rng(0).permutation(2000)
    grouped, bounds = plan_micro_batches(order, lengths, micro_batch_size=64, max_tokens=4096, window=400)
    assert sorted(grouped.tolist()) == list(range(2000))  # a budget places every example, once
    batches = [grouped[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    costs = [padded_batch_cost(lengths[b, 0], lengths[b, 1]) for b in batches]
    assert max(costs) <= 4096 and max(len(b) for b in batches) <= 64
    # Greedy: a batch could not have taken the next example of its window.
    window_of = np.empty(2000, dtype=np.int64)
    window_of[order] = np.arange(2000) // 400
    for batch, following in zip(batches, batches[1:]):
        if window_of[batch[0]] == window_of[following[0]]:
            extended = np.append(batch, following[0])
            assert len(extended) > 64 or padded_batch_cost(lengths[extended, 0], lengths[extended, 1]) > 4096
    fixed = [order[i : i + 16] for i in range(0, 2000, 16)]
    fixed_padded = sum(padded_batch_cost(lengths[b, 0], lengths[b, 1]) for b in fixed)
    assert sum(costs) < 0.8 * fixed_padded  # grouping by length cuts the padded tokens


def test_group_by_length_keeps_fixed_size_batches_and_leaves_only_ragged_tails_out():
    lengths = _lengths(1000)
    order = np.random.default_rng(1).permutation(1000)
    grouped, bounds = plan_micro_batches(order, lengths, micro_batch_size=16, max_tokens=0, window=96)
    assert set(np.diff(bounds)) == {16}
    assert len(set(grouped.tolist())) == len(grouped) == (1000 // 96) * 96 + (1000 % 96) // 16 * 16
    first = grouped[:16]  # the longest of the first window, together
    assert lengths[first].sum(axis=1).min() >= np.sort(lengths[order[:96]].sum(axis=1))[-16]


@pytest.mark.parametrize("max_tokens", [0, 3000])
def test_length_grouped_sampler_covers_each_epoch_once_across_ranks_and_resumes_exactly(max_tokens):
    lengths = _lengths(500)

    def sampler(rank, state=None):
        made = ResumableDistributedSampler(500, 8, rank, 2, seed=5, lengths=lengths, max_tokens=max_tokens,
                                           group_window=8)
        if state is not None:
            made.load_state_dict(state)
        return made

    first = sampler(0)
    groups = first.groups_in_epoch(0)
    runs = [iter(sampler(0)), iter(sampler(1))]
    seen = [i for _ in range(groups) for run in runs for i in next(run)]
    assert len(seen) == len(set(seen)) == 500 - first.dropped_in_epoch(0)
    if max_tokens:
        assert first.dropped_in_epoch(0) < 8 * 2 * 6  # only batches that cannot fill a last group
    # Resume from the saved position: the continuation equals the uninterrupted run, into the next epoch.
    uninterrupted = iter(sampler(1))
    reference = [next(uninterrupted) for _ in range(groups + 5)]
    partial = sampler(1)
    run = iter(partial)
    for _ in range(7):
        next(run)
    resumed = iter(sampler(1, state=partial.state_dict()))
    assert [next(resumed) for _ in range(groups + 5 - 7)] == reference[7:]
    # The batches are shuffled after grouping: lengths do not trend through the epoch.
    batch_lengths = [lengths[b].sum(axis=1).mean() for b in reference[:groups]]
    assert np.corrcoef(np.arange(len(batch_lengths)), batch_lengths)[0, 1] ** 2 < 0.5


def test_a_position_saved_by_two_ranks_continues_the_same_batch_sequence_on_one():
    lengths = _lengths(400)
    two_ranks = [ResumableDistributedSampler(400, 8, rank, 2, seed=2, lengths=lengths, max_tokens=2500)
                 for rank in (0, 1)]
    runs = [iter(sampler) for sampler in two_ranks]
    for _ in range(5):
        for run in runs:
            next(run)
    saved = two_ranks[0].state_dict()
    assert saved["epoch"] == 0 and saved["micro_batches"] == 10
    after_five = [[next(run) for run in runs] for _ in range(3)]
    one_rank = ResumableDistributedSampler(400, 8, 0, 1, seed=2, lengths=lengths, max_tokens=2500)
    one_rank.load_state_dict(saved)
    resumed = iter(one_rank)
    assert [next(resumed) for _ in range(6)] == [batch for group in after_five for batch in group]


def test_token_budget_below_the_longest_example_is_a_user_error():
    with pytest.raises(UserError, match="max_tokens_per_batch 100 is smaller than the longest example"):
        ResumableDistributedSampler(500, 8, 0, 1, seed=0, lengths=_lengths(500), max_tokens=100)


def test_sampler_refuses_too_little_data():
    with pytest.raises(UserError, match="cannot fill one step"):
        ResumableDistributedSampler(3, 4, 0, 1, seed=0)


def test_collator_pads_to_multiple_of_8_and_shifts_decoder_inputs():
    batch = Seq2SeqCollator(pad_id=0, decoder_start_id=101)([
        (np.array([101, 5, 6, 102], np.uint16), np.array([7, 8, 102], np.uint16)),
        (np.array([101, 9, 102], np.uint16), np.array([10, 102], np.uint16)),
    ])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    assert batch["decoder_input_ids"][0, :3].tolist() == [101, 7, 8]
    assert batch["labels"][0, :4].tolist() == [7, 8, 102, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_decoder_input_dropout_masks_only_fed_back_tokens_and_is_replayable():
    examples = [(np.arange(110, 110 + n, dtype=np.uint16), np.arange(200, 200 + n, dtype=np.uint16))
                for n in (300, 120, 7)]
    batch = Seq2SeqCollator(pad_id=0, decoder_start_id=101)(examples)
    dropout = DecoderInputDropout(probability=0.6, until_step=100, mask_id=103, seed=7)
    dropped = dropout(batch, step=0, rank=1, micro_batch=0)
    changed = dropped["decoder_input_ids"] != batch["decoder_input_ids"]
    assert (dropped["decoder_input_ids"][changed] == 103).all()
    assert not changed[:, 0].any(), "the decoder start token is never dropped"
    assert not changed[batch["labels"] == -100].any(), "padding stays padding"
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(dropped[key], batch[key])
    fed_back = (batch["labels"] != -100).sum().item() - len(examples)
    assert abs(changed.sum().item() / fed_back - 0.6) < 0.08
    # a function of (seed, step, rank, micro batch): replayed exactly, different elsewhere
    assert torch.equal(dropout(batch, 0, 1, 0)["decoder_input_ids"], dropped["decoder_input_ids"])
    assert not torch.equal(dropout(batch, 0, 0, 0)["decoder_input_ids"], dropped["decoder_input_ids"])
    assert not torch.equal(dropout(batch, 0, 1, 1)["decoder_input_ids"], dropped["decoder_input_ids"])
    # linear decay to 0 at until_step, then off; constant without until_step
    assert dropout.probability_at(50) == pytest.approx(0.3) and dropout.probability_at(100) == 0
    assert dropout(batch, 100, 1, 0) is batch and dropout(batch, 250, 1, 0) is batch
    assert DecoderInputDropout(0.6, 0, 103, 7).probability_at(10_000) == 0.6


def test_decoder_input_dropout_flags_are_checked():
    with pytest.raises(UserError, match="--decoder_input_dropout"):
        make_config(decoder_input_dropout=1.5)
    with pytest.raises(UserError, match="--decoder_input_dropout"):
        make_config(decoder_input_dropout_steps=-1)


@pytest.mark.parametrize("name", packaged_model_configs())
def test_packaged_model_configs_take_vocab_and_special_ids_from_the_data(name):
    config = load_model_config(name, vocab_size=21128, special_token_ids=SPECIAL)
    assert config.model_type in ("bart", "pegasus")
    assert (config.pad_token_id, config.decoder_start_token_id, config.eos_token_id) == (0, 101, 102)
    if config.model_type == "pegasus":
        assert config.scale_embedding and config.activation_function == "relu"
    else:  # BART does not scale its embeddings; bart-mini does, to learn within the quickstart's minutes
        assert config.scale_embedding == (name == "bart-mini") and config.activation_function == "gelu"


def test_seed_architectures_match_the_published_models():
    bart = load_model_config("bart-medium", 21128, SPECIAL)
    assert (bart.encoder_layers, bart.decoder_layers, bart.d_model, bart.encoder_attention_heads,
            bart.encoder_ffn_dim) == (4, 4, 768, 12, 3072)
    pegasus = load_model_config("pegasus-base", 21128, SPECIAL)
    assert (pegasus.encoder_layers, pegasus.decoder_layers, pegasus.d_model) == (12, 12, 768)


def test_no_weight_decay_on_biases_and_norms():
    model = build_model(load_model_config("bart-tiny", 500, SPECIAL))
    decay, no_decay = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or names[id(p)].endswith("bias") or "embed_positions" in names[id(p)]
               for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert isinstance(decay["params"][0], torch.nn.Parameter)


def test_unknown_model_config_is_a_user_error():
    with pytest.raises(UserError, match="packaged configs"):
        load_model_config("gpt-huge", 100, SPECIAL)


def test_skip_streak_counts_consecutive_skipped_steps():
    from pipeline.trainer import skip_streak

    streak, total = 0, 0
    history = []
    for skipped_now in (0, 1, 2, 3, 3, 4, 5):
        streak, total = skip_streak(total, skipped_now, streak), skipped_now
        history.append(streak)
    assert history == [0, 1, 2, 3, 0, 1, 2]


def test_cpu_ranks_share_the_cores_unless_omp_num_threads_is_set():
    from pipeline.distributed import cpu_threads_per_rank, local_rank_count

    assert local_rank_count({"LOCAL_SIZE": "2"}) == 2  # the deepspeed launcher
    assert local_rank_count({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert local_rank_count({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert local_rank_count({}) == 1
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2"}, cores=2) == 1
    assert cpu_threads_per_rank({"LOCAL_SIZE": "4"}, cores=16) == 4
    assert cpu_threads_per_rank({"LOCAL_SIZE": "8"}, cores=2) == 1  # never zero
    assert cpu_threads_per_rank({}, cores=16) == 16
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, cores=2) is None  # the user's choice


def test_train_config_sections_keep_flat_flags_and_a_flat_train_config_json():
    import dataclasses

    from data_tools.cli import build_parser, config_to_dict, section_titles
    from pipeline.train_config import CheckpointOptions, DataOptions, LoggingOptions, OptimizationOptions

    config = make_config(micro_batch_size=4, learning_rate=3e-4, keep_last_checkpoints=2, log_every_steps=5)
    assert isinstance(config, (DataOptions, OptimizationOptions, CheckpointOptions, LoggingOptions))
    parser = build_parser(TrainConfig)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{field.name}" for field in dataclasses.fields(TrainConfig)} <= flags
    headings = [group.title for group in parser._action_groups if group._group_actions][1:]
    assert [heading.split(":")[0] for heading in headings] == ["Run", "Data", "Optimization", "Checkpointing",
                                                               "Logging"]
    assert section_titles(TrainConfig)["learning_rate"].startswith("Optimization")
    saved = config_to_dict(config)  # train_config.json: one flat object, as before the sections
    assert saved["micro_batch_size"] == 4 and saved["keep_last_checkpoints"] == 2 and "optimization" not in saved
    assert TrainConfig(**{**saved, "data_dir": Path(saved["data_dir"])}) == config
