"""The trainer's parts on their own: rank mapping, the accelerator guard, RNG files that load
with weights_only=True, the fp32 loss, batches that carry their own resume position, and
collectives whose tensors live on the engine's device."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_tools.common import UserError
from pipeline.checkpointing import TrainerState, load_rng_file, rng_state, set_rng_state
from pipeline.distributed import accelerator_problem, slurm_rank_env
from pipeline.loss import IGNORE_INDEX, token_cross_entropy

CPU = SimpleNamespace(device_name=lambda *_: "cpu")


def test_slurm_variables_become_ranks_only_without_a_launcher():
    slurm = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert slurm_rank_env(slurm, visible_devices=8) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}
    assert slurm_rank_env({**slurm, "RANK": "0"}, 8) == {}  # torchrun/deepspeed already set them
    assert slurm_rank_env({}, 8) == {}


def test_slurm_local_rank_is_a_valid_device_ordinal_when_each_task_sees_one_gpu():
    # srun --gpus-per-task=1: task 5 of a node sees its GPU as device 0, not device 5.
    slurm = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16"}
    assert slurm_rank_env(slurm, visible_devices=1)["LOCAL_RANK"] == "0"
    assert slurm_rank_env(slurm, visible_devices=4)["LOCAL_RANK"] == "1"  # two tasks per visible set of 4
    assert slurm_rank_env(slurm, visible_devices=0)["LOCAL_RANK"] == "5"  # CPU ranks: no device ordinal


def test_accelerator_guard_refuses_a_silent_cpu_fallback_and_cpu_mixed_precision():
    # A GPU the driver shows but torch cannot use: DeepSpeed fell back to the CPU without a word.
    problem = accelerator_problem("cpu", gpus_visible=8, requested=None, precision="bf16",
                                  allow_cpu_mixed_precision=False)
    assert "nvidia-smi lists 8 GPU(s)" in problem and "DS_ACCELERATOR=cpu" in problem
    # Asked for explicitly: training on the CPU is allowed, in fp32.
    assert accelerator_problem("cpu", 8, "cpu", "fp32", False) is None
    assert accelerator_problem("cpu", 0, None, "fp32", False) is None
    assert "bf16" in accelerator_problem("cpu", 0, "cpu", "bf16", False, "x.json")
    assert accelerator_problem("cpu", 0, "cpu", "bf16", True) is None  # the opt-in
    assert "fp16 needs a GPU" in accelerator_problem("cpu", 0, None, "fp16", True)
    assert accelerator_problem("cuda", 8, None, "bf16", False) is None


def test_rng_state_is_plain_tensors_that_load_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)  # mid-stream, with a cached gaussian
    path = tmp_path / "rng_state_rank0.pt"
    torch.save(rng_state(CPU), path)
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True), CPU)
    restored = (random.random(), np.random.normal(), torch.rand(3))
    assert restored[:2] == expected[:2] and torch.equal(restored[2], expected[2])


def test_a_pickled_rng_file_is_refused_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "executed",))

    path = tmp_path / "rng_state_rank0.pt"
    torch.save({"torch": Payload()}, path)
    with pytest.raises(UserError, match="not a readable RNG state"):
        load_rng_file(path)
    assert not (tmp_path / "executed").exists()


def test_loss_is_computed_in_fp32_from_low_precision_logits():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 50) * 3).bfloat16()
    labels = torch.randint(0, 50, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    ours = token_cross_entropy(logits, labels)
    reference = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), labels.flatten(),
                                                  ignore_index=IGNORE_INDEX)
    bf16_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) < 1e-5
    assert bf16_loss.dtype == torch.bfloat16  # what HF's loss would have given: rounded to bf16
    summed = token_cross_entropy(logits, labels, reduction="sum")
    assert summed.item() == pytest.approx(ours.item() * 8, rel=1e-6)  # 8 target tokens


@pytest.mark.parametrize("name", ["bart-tiny", "pegasus-tiny"])
def test_loss_projects_only_labelled_positions_and_equals_the_full_projection(name):
    """seq2seq_loss gives the LM head the labelled decoder positions alone: the same loss and gradients as
    scoring HF's full logits with ignore_index, and the head is left as it was."""
    from pipeline.loss import seq2seq_loss
    from pipeline.model import build_model, load_model_config

    torch.manual_seed(0)
    specials = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    model = build_model(load_model_config(name, 500, specials)).eval()  # no dropout: both passes see one function
    inputs = torch.randint(104, 500, (4, 12))
    decoder_inputs = torch.randint(104, 500, (4, 9))
    labels = torch.randint(104, 500, (4, 9))
    for row, length in enumerate((9, 5, 1, 7)):
        labels[row, length:] = IGNORE_INDEX  # padding of varied lengths
    batch = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "decoder_input_ids": decoder_inputs,
             "labels": labels}

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = loss_and_grads(lambda: token_cross_entropy(model(
        input_ids=inputs, attention_mask=batch["attention_mask"], decoder_input_ids=decoder_inputs).logits, labels))
    ours, our_grads = loss_and_grads(lambda: seq2seq_loss(model, batch))
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=0)
    assert len(our_grads) == len(full_grads)
    for got, expected in zip(our_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    summed = seq2seq_loss(model, batch, reduction="sum")
    assert summed.item() == pytest.approx(full.item() * 22, rel=1e-5)  # 22 labelled positions
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook went with the block
    assert model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits.shape == (4, 9, 500)


def test_each_planned_batch_carries_the_state_reached_after_it():
    from pipeline.sampler import ResumableDistributedSampler, SamplerState

    sampler = ResumableDistributedSampler(100, 4, 1, 2, seed=3)
    planned = sampler.planned()
    first, second = next(planned), next(planned)
    assert first.state_after == SamplerState(epoch=0, micro_batches=2, consumed_samples=8)
    assert second.state_after == SamplerState(epoch=0, micro_batches=4, consumed_samples=16)
    # Resuming from the first batch's state yields the second batch next, whatever was prefetched.
    resumed = ResumableDistributedSampler(100, 4, 1, 2, seed=3)
    resumed.load_state_dict(dataclasses.asdict(first.state_after))
    assert next(resumed.planned()) == second


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_s_state_is_that_of_the_last_batch_handed_out_not_of_those_prepared(workers):
    """torchtitan's Stateful data loader: what a checkpoint saves between steps, with workers ahead."""
    from pipeline.batch_loader import MicroBatchLoader
    from pipeline.collate import Seq2SeqCollator
    from pipeline.sampler import ResumableDistributedSampler

    def loader(state=None):
        made = MicroBatchLoader(_Examples(), ResumableDistributedSampler(64, 4, 0, 2, seed=1),
                                Seq2SeqCollator(pad_id=0, decoder_start_id=101), lambda s, t: 0.0, workers=workers,
                                pin_memory=False, seed=7)
        if state is not None:
            made.load_state_dict(state)
        return made

    uninterrupted = [batch.plan.indices for _, batch in zip(range(12), loader())]
    first = loader()
    for _ in range(5):
        next(first)
    saved = first.state_dict()
    assert saved == {"epoch": 0, "micro_batches": 10, "consumed_samples": 40}  # 5 of rank 0's, 5 of rank 1's
    assert first.sampler.state_dict() != saved or workers == 0  # the workers ran ahead of the loop
    resumed = loader(saved)
    assert [next(resumed).plan.indices for _ in range(7)] == uninterrupted[5:]
    with pytest.raises(RuntimeError, match="before its first batch"):
        resumed.load_state_dict(saved)


class _Examples:
    """Variable-length examples, without a manifest (the loader does not need one)."""

    def __len__(self):
        return 64

    def example(self, index, epoch):
        return np.arange(1, 3 + index % 5, dtype=np.int64), np.arange(1, 2 + index % 3, dtype=np.int64)


# A checkpoint's trainer_state.json as zh-train wrote it before the sampler became Stateful (the form is unchanged).
TRAINER_STATE_BEFORE = ('{"step": 6, "consumed_samples": 48, "data_position": {"epoch": 0, "micro_batches": 12}, '
                        '"world_size": 2, "files": {"mp_rank_00_model_states.pt": 1234}}')


def test_a_trainer_state_json_written_before_the_change_resumes_the_same_batches():
    from pipeline.sampler import ResumableDistributedSampler, SamplerState

    saved = json.loads(TRAINER_STATE_BEFORE)
    state = TrainerState.from_json(saved)
    assert state.step == 6 and state.data == SamplerState(epoch=0, micro_batches=12, consumed_samples=48)
    assert state.to_json() == {key: saved[key] for key in ("step", "consumed_samples", "data_position")}
    uninterrupted = iter(ResumableDistributedSampler(100, 4, 1, 2, seed=3))
    expected = [next(uninterrupted) for _ in range(9)][6:]
    resumed = ResumableDistributedSampler(100, 4, 1, 2, seed=3)
    resumed.load_state_dict(dataclasses.asdict(state.data))
    batches = iter(resumed)
    assert [next(batches) for _ in range(3)] == expected


def test_a_trainer_state_from_before_length_grouping_is_refused_in_one_line():
    with pytest.raises(UserError, match="has no data_position .*--init_from"):
        TrainerState.from_json({"step": 4, "consumed_samples": 32, "world_size": 2})


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetching_loader_keeps_order_and_positions(workers):
    from pipeline.batch_loader import micro_batches
    from pipeline.collate import Seq2SeqCollator
    from pipeline.sampler import ResumableDistributedSampler

    plans = ResumableDistributedSampler(64, 4, 0, 1, seed=1).planned()
    expected = [next(plans) for _ in range(20)]
    loaded = micro_batches(_Examples(), ResumableDistributedSampler(64, 4, 0, 1, seed=1).planned(),
                           Seq2SeqCollator(pad_id=0, decoder_start_id=101), lambda s, t: float(s.sum() + t.sum()),
                           workers=workers, pin_memory=False, seed=7)
    batches = [next(loaded) for _ in range(20)]
    assert [b.plan for b in batches] == expected  # across an epoch boundary (16 batches per epoch)
    first = batches[0]
    real = sum(3 + i % 5 - 1 + 2 + i % 3 - 1 for i in first.plan.indices)
    assert first.real_tokens == real and first.flops == real
    assert first.padded_tokens == first.tensors["input_ids"].numel() + first.tensors["labels"].numel()


def test_a_prefetching_loader_leaves_the_global_torch_rng_alone():
    """The dropout stream must not depend on when the loader was started (exact resume)."""
    from pipeline.batch_loader import micro_batches
    from pipeline.collate import Seq2SeqCollator
    from pipeline.sampler import ResumableDistributedSampler

    class Examples:
        def example(self, index, epoch):
            return np.array([1, 2], dtype=np.int64), np.array([3], dtype=np.int64)

        def __len__(self):
            return 8

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    loaded = micro_batches(Examples(), ResumableDistributedSampler(8, 2, 0, 1, seed=1).planned(),
                           Seq2SeqCollator(pad_id=0, decoder_start_id=101), lambda s, t: 0.0, workers=0,
                           pin_memory=False, seed=1)
    next(loaded)
    assert torch.equal(torch.rand(2), expected)


class _CollectiveSeen(Exception):
    pass


@pytest.fixture
def record_collectives(monkeypatch):
    """torch.distributed collectives replaced by a recorder that stops at the first call."""
    import torch.distributed as dist

    seen: list[torch.device] = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _CollectiveSeen

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, record)
    return seen


def test_the_metrics_window_reduces_on_the_engine_device_not_the_cpu(record_collectives):
    """NCCL refuses CPU tensors: the window's one all-reduce must use the engine's device.
    The meta device stands in for a GPU here (a CPU tensor would be caught the same way)."""
    from pipeline.metrics import MetricsWindow

    window = MetricsWindow(torch.device("meta"))
    window.add_micro_batch(torch.ones((), device="meta"), SimpleNamespace(real_tokens=5, padded_tokens=8, flops=1.0,
                                                                     corpus_counts=()))
    with pytest.raises(_CollectiveSeen):
        window.reduce()
    assert [device.type for device in record_collectives] == ["meta"]


def test_evaluation_reduces_on_the_engine_device(record_collectives, monkeypatch):
    import pipeline.trainer
    from pipeline.trainer import evaluation_loss

    # the loss of a meta-device batch (selecting its labelled positions needs real values)
    monkeypatch.setattr(pipeline.trainer, "seq2seq_loss", lambda engine, batch, reduction: torch.zeros((), device="meta"))

    class Engine:
        device = torch.device("meta")

        def eval(self):
            pass

        train = eval

    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long, device="meta"),
             "attention_mask": torch.ones(2, 4, dtype=torch.long, device="meta"),
             "decoder_input_ids": torch.zeros(2, 4, dtype=torch.long, device="meta"),
             "labels": torch.zeros(2, 4, dtype=torch.long, device="meta")}
    with pytest.raises(_CollectiveSeen):
        evaluation_loss(Engine(), iter([batch]))
    assert [device.type for device in record_collectives] == ["meta"]


def test_the_shared_run_dir_check_uses_the_engine_device(record_collectives, tmp_path):
    from pipeline.distributed import Ranks, check_shared_run_dir

    with pytest.raises(_CollectiveSeen):
        check_shared_run_dir(tmp_path, Ranks(0, 2, 0, torch.device("meta")))
    assert [device.type for device in record_collectives] == ["meta"]
