"""The trainer's start-up checks as one pure function: ``plan_run`` against hand-made inputs, without
DeepSpeed or a process group. Every problem is reported at once, checks whose input could not be read
are skipped, and a checkpoint's trainer_state.json of the form written before the trainer became an
object resumes where it left off."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_tools.cli import config_to_dict
from data_tools.common import UserError
from pipeline.checkpointing import TrainerState
from pipeline.run_plan import RunDirState, StartupInputs, plan_run, read_run_dir, read_startup
from pipeline.sampler import SamplerState
from pipeline.train_config import TrainConfig
from tests.conftest import PROJECT_ROOT
from tests.test_trainer_parts import TRAINER_STATE_BEFORE

CPU_DS_CONFIG = json.loads((PROJECT_ROOT / "ds_configs" / "cpu_zero2.json").read_text())
BF16_DS_CONFIG = json.loads((PROJECT_ROOT / "ds_configs" / "zero2_bf16.json").read_text())
VOCAB = {"size": 500, "sha256": "v1", "source": "vocab.txt",
         "special_token_ids": {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}}


class Examples:
    """Stored examples as the plan sees them: a length, the longest example and a manifest."""

    def __init__(self, count: int = 100, longest: int = 64) -> None:
        self.count, self.longest = count, longest
        self.manifest = {"stage": "mask", "vocab": VOCAB, "shards": [{"sha256": "s1"}]}

    def __len__(self) -> int:
        return self.count

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(3), np.arange(2)

    def lengths(self) -> np.ndarray:
        return np.full((self.count, 2), self.longest, dtype=np.int32)

    def max_lengths(self) -> tuple[int, int]:
        return self.longest, self.longest


def config(tmp_path: Path, **flags) -> TrainConfig:
    return TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / "run", micro_batch_size=4, **flags)


def found(**changes) -> StartupInputs:
    """What start-up would read for a fresh 2-rank CPU run on good data."""
    defaults = StartupInputs(world_size=2, accelerator="cpu", examples=Examples(),
                             model_config=SimpleNamespace(max_position_embeddings=256),
                             raw_ds_config=CPU_DS_CONFIG, ds_config_path=Path("cpu_zero2.json"))
    return replace(defaults, **changes)


def test_a_good_start_gives_the_plan(tmp_path):
    plan = plan_run(config(tmp_path, eval_examples=10, gradient_accumulation_steps=2), found())
    assert plan.train_examples == 90 and plan.precision == "fp32" and plan.world_size == 2
    assert plan.ds_config["train_batch_size"] == 4 * 2 * 2 and plan.resume_tag is None
    assert plan.start == TrainerState() and plan.vocab is VOCAB
    assert plan.engine_config() is plan.ds_config  # not a universal checkpoint


def test_every_problem_is_reported_at_once_in_one_line(tmp_path):
    with pytest.raises(UserError) as error:
        plan_run(config(tmp_path, eval_examples=100, global_batch_size=12),
                 found(examples=Examples(longest=300), raw_ds_config=BF16_DS_CONFIG))
    message = str(error.value)
    assert "\n" not in message and message.startswith("4 problems: (1) --eval_examples 100 leaves nothing to train on")
    for fragment in ("(2) --global_batch_size 12 != --micro_batch_size 4", "(3) ", "holds examples of up to 300",
                     "max_position_embeddings is 256", "(4) cpu_zero2.json: bf16 on DeepSpeed's CPU accelerator"):
        assert fragment in message


def test_what_could_not_be_read_is_reported_and_the_checks_needing_it_are_skipped(tmp_path):
    unreadable = {"data": "data/examples-00000.arrow has 10 bytes; re-run the mask stage"}
    with pytest.raises(UserError) as error:
        plan_run(config(tmp_path, eval_examples=10_000), found(examples=None, model_config=None, unreadable=unreadable))
    assert str(error.value) == unreadable["data"]  # one problem: no eval-size, position or data checks without data
    with pytest.raises(UserError, match=r"^DeepSpeed config x.json not found$"):
        plan_run(config(tmp_path), found(raw_ds_config=None, unreadable={"ds_config": "DeepSpeed config x.json not found"}))


def test_the_run_directory_must_be_new_a_run_or_free_of_the_trainer_s_files(tmp_path):
    assert "is a file" in problems(tmp_path, run_dir=RunDirState(exists=True))
    clash = problems(tmp_path, run_dir=RunDirState(True, True, False, ("metrics.jsonl", "vocab.txt")))
    assert "not a zh-train run directory but holds metrics.jsonl, vocab.txt" in clash
    plan_run(config(tmp_path), found(run_dir=RunDirState(True, True, True, ("ds_config.json", "model_config.json"))))
    # An output inside its input is that one problem, not also a folder of someone else's files.
    inside = TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / "data" / "run", micro_batch_size=4)
    with pytest.raises(UserError) as error:
        plan_run(inside, found(run_dir=RunDirState(True, True, False, ("vocab.txt",))))
    assert "lies inside the input --data_dir" in str(error.value) and "problems" not in str(error.value)


def problems(tmp_path: Path, **changes) -> str:
    with pytest.raises(UserError) as error:
        plan_run(config(tmp_path), found(**changes))
    return str(error.value)


def test_a_checkpoint_of_the_state_format_written_before_resumes_where_it_left_off(tmp_path):
    saved = json.loads(TRAINER_STATE_BEFORE)
    resume = dict(resume_tag="step00000006", saved_state=saved, recorded_manifest=Examples().manifest)
    plan = plan_run(config(tmp_path), found(**resume))
    assert plan.resume_tag == "step00000006"
    assert plan.start == TrainerState(step=6, data=SamplerState(epoch=0, micro_batches=12, consumed_samples=48))
    # Other data, other ranks, flags that define the run: each refused; written before length grouping: too.
    other_data = {**Examples().manifest, "shards": [{"sha256": "s2"}]}
    assert "examples (shard checksums) differ" in problems(tmp_path, **{**resume, "recorded_manifest": other_data})
    assert "written by 2 ranks and this run has 1" in problems(tmp_path, **resume, world_size=1)
    assert problems(tmp_path, **resume, previous_config={"micro_batch_size": 8}).endswith(
        "holds a run with different data_dir, micro_batch_size; use a new --output_dir or the original flags to resume")
    plan_run(config(tmp_path), found(**resume, previous_config=config_to_dict(config(tmp_path))))
    old = {"step": 4, "consumed_samples": 32, "world_size": 2}
    assert "has no data_position" in problems(tmp_path, **{**resume, "saved_state": old})


def test_a_universal_checkpoint_loads_on_any_rank_count_without_changing_the_run_s_ds_config(tmp_path):
    saved = {**json.loads(TRAINER_STATE_BEFORE), "universal": True}
    plan = plan_run(config(tmp_path), found(resume_tag="step00000006_universal", saved_state=saved, world_size=1))
    assert plan.engine_config()["checkpoint"]["load_universal"] is True
    assert "load_universal" not in plan.ds_config.get("checkpoint", {})  # ds_config.json stays the user's


def test_reading_records_problems_instead_of_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "ds.json").write_text("[1]")
    run = config(tmp_path, deepspeed_config=tmp_path / "ds.json")
    inputs = read_startup(run, "cpu")
    assert set(inputs.unreadable) == {"data", "ds_config"} and inputs.examples is None
    assert "holds a JSON list" in inputs.unreadable["ds_config"] and inputs.world_size == 2
    assert read_run_dir(tmp_path / "run") == RunDirState()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step\n")
    assert read_run_dir(tmp_path / "run") == RunDirState(True, True, False, ("metrics.csv",))
