"""Exact resume: kill -9 a 2-rank ZeRO-2 run after a checkpoint, relaunch the same command,
and the losses and the examples consumed equal those of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEEPSPEED, PROJECT_ROOT, TORCHRUN, deepspeed_env, run_command

# Multi-process DeepSpeed runs: deselect with -m "not slow" for a fast inner loop (CI runs them).
pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory, bart_examples_dir) -> Path:
    """The shared BART examples as root/"bart", beside a DeepSpeed config with torch's Adam."""
    root = tmp_path_factory.mktemp("resume")
    (root / "bart").symlink_to(bart_examples_dir)
    ds_config = json.loads((PROJECT_ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    ds_config["optimizer"]["params"]["torch_adam"] = True  # bitwise-reproducible optimizer on CPU
    (root / "ds_torch_adam.json").write_text(json.dumps(ds_config))
    return root


def train_command(root: Path, run_dir: Path, port: int, *extra: str) -> list[str]:
    return [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(PROJECT_ROOT / "pipeline" / "trainer.py"),
            "--data_dir", str(root / "bart"), "--output_dir", str(run_dir), "--model_config", "bart-tiny",
            "--deepspeed_config", str(root / "ds_torch_adam.json"), "--total_steps", str(STEPS),
            "--micro_batch_size", "4", "--save_checkpoint_steps", "4", "--log_every_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "2", "--record_example_ids", "--no-progress", *extra]


def records(path: Path, key: str) -> dict[int, object]:
    return {r["step"]: r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r}


def assert_same_run(run_dir: Path, reference_dir: Path, keys: tuple[str, ...] = ("loss",)) -> None:
    """The run logged the reference run's values for ``keys`` at every step, and each rank trained the same
    examples at every step."""
    for key in keys:
        assert records(run_dir / "metrics.jsonl", key) == records(reference_dir / "metrics.jsonl", key)
    for rank in (0, 1):
        name = f"example_ids_rank{rank}.jsonl"
        assert records(run_dir / name, "example_ids") == records(reference_dir / name, "example_ids")


@pytest.fixture(scope="module")
def reference(examples_dir, tmp_path_factory) -> Path:
    """An uninterrupted run: deepspeed launcher, one node, 2 ranks."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_command(train_command(examples_dir, run_dir, 29650))
    return run_dir


def kill_after_step(command: list[str], run_dir: Path, step: int, env: dict[str, str] | None = None) -> None:
    """Run ``command`` (a launcher running pipeline/trainer.py) through tests/crash_after_step.py, which
    SIGKILLs every rank, worker and the launcher right after ``step`` is logged: the same point on any device."""
    trainer = str(PROJECT_ROOT / "pipeline" / "trainer.py")
    assert trainer in command, f"kill_after_step runs {trainer}; got {command}"
    crashing = [str(PROJECT_ROOT / "tests" / "crash_after_step.py") if part == trainer else part for part in command]
    process = subprocess.Popen(crashing, env={**(env or deepspeed_env()), "ZH_CRASH_AFTER_STEP": str(step)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        process.wait(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left if the run never reached the step
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended with {process.returncode} before step {step}"


def test_kill_9_then_relaunch_gives_the_uninterrupted_losses_and_examples(examples_dir, reference, tmp_path):
    crashed = tmp_path / "crashed"
    kill_after_step(train_command(examples_dir, crashed, 29651), crashed, 6)  # mid-run, after checkpoint 4
    metrics = crashed / "metrics.jsonl"
    assert (crashed / "checkpoints" / "latest").read_text() == "step00000004"
    assert max(records(metrics, "loss")) >= 6  # steps 5-6 ran and are lost with the crash

    result = run_command(train_command(examples_dir, crashed, 29652))
    assert "resuming from step00000004 (step 4)" in result.stderr
    assert_same_run(crashed, reference)
    consumed = [i for rank in (0, 1) for ids in records(reference / f"example_ids_rank{rank}.jsonl",
                                                        "example_ids").values() for i in ids]
    assert len(consumed) == len(set(consumed)) == STEPS * 4 * 2  # no example twice within the epoch


def test_token_budget_batches_resume_exactly_after_kill_9(examples_dir, tmp_path):
    """Length-grouped micro batches under a token budget: variable batch sizes, same guarantees."""
    budget = ("--max_tokens_per_batch", "640", "--micro_batch_size", "16", "--length_group_window", "4")
    reference_dir, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_command(train_command(examples_dir, reference_dir, 29653, *budget))
    kill_after_step(train_command(examples_dir, crashed, 29654, *budget), crashed, 6)
    assert (crashed / "checkpoints" / "latest").read_text() == "step00000004"
    result = run_command(train_command(examples_dir, crashed, 29655, *budget))
    assert "resuming from step00000004 (step 4)" in result.stderr
    assert records(crashed / "metrics.jsonl", "loss") == records(reference_dir / "metrics.jsonl", "loss")
    ids = {rank: records(reference_dir / f"example_ids_rank{rank}.jsonl", "example_ids") for rank in (0, 1)}
    for rank in (0, 1):
        assert records(crashed / f"example_ids_rank{rank}.jsonl", "example_ids") == ids[rank]
    consumed = [i for rank in (0, 1) for step_ids in ids[rank].values() for i in step_ids]
    assert len(consumed) == len(set(consumed))
    assert len({len(step_ids) for step_ids in ids[0].values()}) > 1  # batch sizes follow the lengths
    state = json.loads((crashed / "checkpoints" / "step00000008" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == len(consumed)
    assert state["data_position"] == {"epoch": 0, "micro_batches": STEPS * 2}
    csv_steps = [line.split(",")[0] for line in (crashed / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(step) for step in range(1, STEPS + 1)]  # the lost steps' rows were dropped
    pad = [r["pad_fraction"] for r in map(json.loads, (crashed / "metrics.jsonl").read_text().splitlines())]
    assert max(pad) < 0.5


def test_two_nodes_on_loopback_match_one_node_with_two_ranks(examples_dir, reference, tmp_path):
    """torchrun --nnodes 2, one rank per node, rendezvous on 127.0.0.1: the same run as the reference."""
    run_dir = tmp_path / "two-nodes"
    trainer_args = train_command(examples_dir, run_dir, 0)[len(DEEPSPEED) + 4:]  # drop the launcher and its flags
    nodes = [
        subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                          "--master_addr", "127.0.0.1", "--master_port", "29670", *trainer_args],
                         env=deepspeed_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 x cpu" in outputs[0]
    for rank in (0, 1):
        name = f"example_ids_rank{rank}.jsonl"
        assert records(run_dir / name, "example_ids") == records(reference / name, "example_ids")
    ours, theirs = records(run_dir / "metrics.jsonl", "loss"), records(reference / "metrics.jsonl", "loss")
    assert ours.keys() == theirs.keys()
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step


def test_resume_on_fewer_ranks_through_a_universal_checkpoint(examples_dir, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "universal"
    shutil.copytree(reference, run_dir)
    run_command([str(Path(sys.executable).parent / "zh-to-universal"), "--run_dir", str(run_dir)])
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000008_universal"
    command = train_command(examples_dir, run_dir, 29680)
    command[command.index("--num_gpus") + 1] = "1"
    command[command.index("--total_steps") + 1] = "10"
    result = run_command(command)
    assert "on 1 x cpu" in result.stderr and "resuming from step00000008_universal (step 8)" in result.stderr
    losses = records(run_dir / "metrics.jsonl", "loss")
    assert sorted(losses) == list(range(1, 11))
    # the model and optimizer came back: training continues where it was, not from scratch
    assert abs(losses[9] - losses[8]) < 0.5 * abs(losses[1] - losses[8])
    ids = records(run_dir / "example_ids_rank0.jsonl", "example_ids")
    assert len(ids[9]) == 4
    # Two Adam steps (lr <= 1e-3) move no weight by more than a few 1e-3 from the 2-rank step-8 weights.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    before = get_fp32_state_dict_from_zero_checkpoint(str(reference / "checkpoints"), tag="step00000008")
    after = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step00000010")
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 5e-3
    # export reads the universal checkpoint too: the same fp32 master weights as the ZeRO-2 original
    import torch
    from transformers import BartForConditionalGeneration

    from pipeline.convert_to_hf import ExportConfig, export

    exported = export(ExportConfig(run_dir=run_dir, output_dir=tmp_path / "hf-universal", tag="step00000008_universal"))
    weights = BartForConditionalGeneration.from_pretrained(str(exported)).state_dict()
    assert set(before) <= set(weights)
    assert all(torch.equal(weights[name], tensor) for name, tensor in before.items())


@pytest.fixture(scope="module")
def second_corpus(examples_dir, clue_tokenized_dir) -> Path:
    """Other BART examples of the same vocab (48-token chunks of the same text): a second corpus."""
    from data_tools.mask import MaskConfig, mask

    output = examples_dir / "bart48"
    mask(MaskConfig(input_dir=clue_tokenized_dir, output_dir=output, target="bart", seq_length=48, progress=False))
    return output


def mixture_command(root: Path, second: Path, run_dir: Path, port: int) -> list[str]:
    command = train_command(root, run_dir, port, "--eval_examples", "20", "--eval_every_steps", "4")
    at = command.index("--data_dir")
    return command[:at] + ["--data_dirs", f"{root / 'bart'}:0.7", f"{second}:0.3"] + command[at + 2 :]


def test_a_mixture_resumes_exactly_after_kill_9_and_logs_each_corpus_s_share(examples_dir, second_corpus, tmp_path):
    reference_dir, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_command(mixture_command(examples_dir, second_corpus, reference_dir, 29656))
    kill_after_step(mixture_command(examples_dir, second_corpus, crashed, 29657), crashed, 6)
    assert (crashed / "checkpoints" / "latest").read_text() == "step00000004"
    result = run_command(mixture_command(examples_dir, second_corpus, crashed, 29658))
    assert "resuming from step00000004 (step 4)" in result.stderr
    assert_same_run(crashed, reference_dir, keys=("loss", "eval_loss"))
    shares = [r["corpus_examples"] for r in map(json.loads, (crashed / "metrics.jsonl").read_text().splitlines())
              if "corpus_examples" in r]
    assert len(shares) == STEPS and all(sum(s.values()) == 8 for s in shares)  # 2 ranks x 4 per step
    drawn = {name: sum(s[name] for s in shares) for name in shares[0]}
    assert set(drawn) == {"bart", "bart48"} and drawn["bart"] > drawn["bart48"] > 0
    manifest = json.loads((crashed / "data_manifest.json").read_text())
    assert [c["weight"] for c in manifest["corpora"]] == [0.7, 0.3]
