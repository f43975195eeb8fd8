"""Checkpoint writes that go wrong and checkpoint files that change afterwards (issue #24, second round).

Saving: every file's sha256 is recorded when the checkpoint is marked complete; a rank that cannot write (a full
disk) stops the run with one line, the partial checkpoint removed and ``latest`` left on the previous one; only
the trainer's own tags are pruned. Reading: a file whose content changed (a flipped bit keeps its size) makes a
resume fall back to the previous complete checkpoint and the export name the file; checkpoints written before
digests were recorded still resume. ``save_checkpoint`` runs in-process on a 1-rank gloo group with a stand-in
engine that writes through a checkpoint engine as DeepSpeed's does; the full disk is also a real 2-rank run on a
small tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pipeline.checkpointing as checkpointing
from data_tools.common import UserError
from pipeline.checkpointing import (
    TrainerState,
    checkpoint_problem,
    digests_recorded,
    find_resume_tag,
    read_latest_tag,
    read_trainer_state,
    save_checkpoint,
)
from pipeline.sampler import SamplerState
from tests.conftest import DEEPSPEED, PROJECT_ROOT, deepspeed_env


class CheckpointEngine:
    """DeepSpeed's checkpoint engine as the trainer sees it: ``save(state_dict, path)``; the ``fail_at``-th save
    writes part of its file and fails as a full disk does."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.saves, self.fail_at = 0, fail_at
        self.error = error or OSError(errno.ENOSPC, "No space left on device")

    def save(self, state_dict: dict, path: str) -> None:
        self.saves += 1
        if self.saves == self.fail_at:
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise self.error
        torch.save(state_dict, path)


class Engine:
    """What save_checkpoint calls: DeepSpeed's ZeRO-2 files of one rank, written through the checkpoint engine."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.checkpoint_engine = CheckpointEngine(fail_at, error)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": torch.randn(256)}}, str(directory / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer_state_dict": {"m": torch.randn(1024)}},
                                    str(directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        dist.barrier()  # DeepSpeed's save ends in one


class CpuAccelerator:
    def device_name(self) -> str:
        return "cpu"


@pytest.fixture
def group():
    """A 1-rank gloo process group (the collectives of save_checkpoint run for real)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def save(root: Path, step: int, engine: Engine | None = None, keep_last: int = 5) -> str:
    state = TrainerState(step=step, data=SamplerState(0, step, 8 * step))
    return save_checkpoint(engine or Engine(), root, state, 0, 1, keep_last, CpuAccelerator())


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_file_s_size_and_sha256_are_recorded_when_the_checkpoint_is_complete(group, tmp_path):
    assert save(tmp_path, 2) == "step00000002"
    tag_dir = tmp_path / "step00000002"
    state = read_trainer_state(tag_dir)
    digests = json.loads((tag_dir / "sha256.json").read_text())
    assert set(digests) == {"mp_rank_00_model_states.pt", "rng_state_rank0.pt",
                            "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert set(state["files"]) == {*digests, "sha256.json"}  # trainer_state.json keeps its form, plus one file
    for name, digest in digests.items():
        assert hashlib.sha256((tag_dir / name).read_bytes()).hexdigest() == digest
    assert digests_recorded(state) and checkpoint_problem(tag_dir) is None
    assert (tmp_path / "latest").read_text() == "step00000002"


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                                  "rng_state_rank0.pt"])
def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_and_export_names_the_file(group, tmp_path, capsys, name):
    save(tmp_path, 2)
    save(tmp_path, 4)
    changed = tmp_path / "step00000004" / name
    size = changed.stat().st_size
    flip_a_byte(changed)
    assert changed.stat().st_size == size  # what the size check cannot see
    assert find_resume_tag(tmp_path) == "step00000002"
    assert f"step00000004 has {name} whose sha256 differs" in capsys.readouterr().err
    with pytest.raises(UserError, match=f"has {name} whose sha256 differs.*pass an earlier --tag"):
        read_latest_tag(tmp_path)  # what zh-export and zh-to-universal read


def test_a_checkpoint_written_before_digests_were_recorded_still_resumes(group, tmp_path):
    save(tmp_path, 2)
    (tmp_path / "step00000002" / "sha256.json").unlink()
    state_file = tmp_path / "step00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]["sha256.json"]
    state_file.write_text(json.dumps(state))
    assert find_resume_tag(tmp_path) == "step00000002" and not digests_recorded(read_trainer_state(state_file.parent))


def test_an_unreadable_digest_record_is_an_incomplete_checkpoint(group, tmp_path):
    save(tmp_path, 2)
    digests = tmp_path / "step00000002" / "sha256.json"
    digests.write_text(json.dumps({"mp_rank_00_model_states.pt": 7}).ljust(digests.stat().st_size))  # same size
    assert checkpoint_problem(tmp_path / "step00000002") == "has an unreadable sha256.json"


def test_a_full_disk_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(group, tmp_path):
    save(tmp_path, 2)
    before = tree(tmp_path / "step00000002")
    with pytest.raises(UserError) as error:
        save(tmp_path, 4, Engine(fail_at=2))  # the optimizer partition
    message = str(error.value)
    assert "\n" not in message
    for fragment in (f"checkpoint {tmp_path / 'step00000004'} was not saved",
                     f"could not write {tmp_path / 'step00000004' / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}",
                     "the disk is full", "a checkpoint of this run takes about", "MB free now",
                     "partial files were removed", "still points to the previous complete checkpoint step00000002",
                     "relaunch the same command"):
        assert fragment in message, message
    assert not (tmp_path / "step00000004").exists()
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert tree(tmp_path / "step00000002") == before and checkpoint_problem(tmp_path / "step00000002") is None


def test_torch_s_zip_writer_failing_on_a_full_disk_is_named_as_a_full_disk(group, tmp_path, monkeypatch):
    """torch.save's zip writer reports ENOSPC as "unexpected pos": the free space tells."""
    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=4096))
    with pytest.raises(UserError, match=r"could not write .*mp_rank_00_model_states.pt: the disk is full \(0.0 MB"):
        save(tmp_path, 2, Engine(fail_at=1, error=RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                 "unexpected pos 576 vs 534")))
    assert not (tmp_path / "step00000002").exists() and not (tmp_path / "latest").exists()


def test_another_write_failure_names_the_system_s_reason(group, tmp_path):
    save(tmp_path, 2)
    with pytest.raises(UserError, match="could not write .*: Permission denied; .*still points to .*step00000002"):
        save(tmp_path, 4, Engine(fail_at=1, error=PermissionError(errno.EACCES, "Permission denied")))


def test_pruning_and_fallback_touch_only_the_trainer_s_own_tags(group, tmp_path, capsys):
    """A copy the user keeps beside the checkpoints is never pruned, never resumed from, never changed."""
    save(tmp_path, 2)
    shutil.copytree(tmp_path / "step00000002", tmp_path / "step00000002.bak")
    shutil.copytree(tmp_path / "step00000002", tmp_path / "step00000006.bak")  # newer by name than any tag
    (tmp_path / "notes.txt").write_text("the run with lr 3e-4\n")
    (tmp_path / "step_old").mkdir()
    mine = {name: tree(tmp_path / name) for name in ("step00000002.bak", "step00000006.bak", "step_old")}
    for step in (4, 6):
        save(tmp_path, step, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000002.bak", "step00000006",
                                                                         "step00000006.bak", "step_old"]
    flip_a_byte(tmp_path / "step00000006" / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="no earlier complete checkpoint"):  # not the user's complete-looking copies
        find_resume_tag(tmp_path)
    assert {name: tree(tmp_path / name) for name in mine} == mine
    assert (tmp_path / "notes.txt").read_text() == "the run with lr 3e-4\n"


def test_latest_must_name_a_tag_of_the_trainer(group, tmp_path):
    save(tmp_path, 2)
    shutil.copytree(tmp_path / "step00000002", tmp_path.parent / "elsewhere")
    (tmp_path / "latest").write_text("../elsewhere")
    with pytest.raises(UserError, match=r"points to .*elsewhere, which is not a checkpoint tag of this trainer"):
        read_latest_tag(tmp_path)
    assert find_resume_tag(tmp_path) == "step00000002"


# -- a real full disk: a 2-rank run whose run directory is a small tmpfs -----------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: one checkpoint of the 2-rank bart-tiny run (25 MB) fits, the second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_real_two_rank_save(bart_examples_dir, small_disk):
    run_dir = small_disk / "run"
    command = [*DEEPSPEED, "--num_gpus", "2", "--master_port", "29790", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
               "--data_dir", str(bart_examples_dir), "--output_dir", str(run_dir), "--model_config", "bart-tiny",
               "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"), "--total_steps", "8",
               "--micro_batch_size", "4", "--save_checkpoint_steps", "2", "--keep_last_checkpoints", "5",
               "--log_every_steps", "1", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=deepspeed_env())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if "was not saved" in line]
    assert errors and all(line == errors[0] for line in errors), output[-4000:]  # the same line on every rank
    assert "the disk is full" in errors[0] and "still points to the previous complete checkpoint step00000002" \
        in errors[0] and "Traceback" not in output
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000002"
    assert not (checkpoints / "step00000004").exists()
    assert checkpoint_problem(checkpoints / "step00000002") is None
