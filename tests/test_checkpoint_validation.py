"""A checkpoint that fails validation is refused with a clear message; training falls back
to the newest complete one, export names what is wrong."""

import json

import pytest
import torch

from data_tools.common import UserError
from pipeline.checkpointing import checkpoint_problem, find_resume_tag, read_latest_tag


def make_checkpoint(root, tag, ranks=2, partitions=2, complete=True):
    directory = root / tag
    directory.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, directory / "mp_rank_00_model_states.pt")
    for rank in range(partitions):
        torch.save({"optimizer_state_dict": {}}, directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"torch": torch.get_rng_state()}, directory / f"rng_state_rank{rank}.pt")
    if complete:
        (directory / "trainer_state.json").write_text(json.dumps({"step": 1, "consumed_samples": 8,
                                                                  "world_size": ranks}))
    return directory


def test_complete_and_incomplete_checkpoints(tmp_path):
    assert checkpoint_problem(make_checkpoint(tmp_path, "step00000004")) is None
    assert "never completed" in checkpoint_problem(make_checkpoint(tmp_path, "step00000006", complete=False))
    assert "1 optimizer partitions but was written by 2 ranks" in checkpoint_problem(
        make_checkpoint(tmp_path, "step00000008", partitions=1))
    assert checkpoint_problem(tmp_path / "step00000010") == "does not exist"
    (make_checkpoint(tmp_path, "step00000012") / "rng_state_rank1.pt").unlink()
    assert checkpoint_problem(tmp_path / "step00000012") == "is missing rng_state_rank1.pt"  # no exact resume


def test_training_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path, "step00000002")
    make_checkpoint(tmp_path, "step00000004")
    make_checkpoint(tmp_path, "step00000006", partitions=1)  # a rank's shard is gone
    (tmp_path / "latest").write_text("step00000006")
    assert find_resume_tag(tmp_path) == "step00000004"
    assert "step00000006 has 1 optimizer partitions" in capsys.readouterr().err
    with pytest.raises(UserError, match="step00000006, which has 1 optimizer partitions.*pass an earlier --tag"):
        read_latest_tag(tmp_path)


def test_no_complete_checkpoint_at_all_is_a_user_error(tmp_path):
    make_checkpoint(tmp_path, "step00000002", complete=False)
    (tmp_path / "latest").write_text("step00000009")
    with pytest.raises(UserError, match="does not exist, and no earlier complete checkpoint"):
        find_resume_tag(tmp_path)
    (tmp_path / "fresh").mkdir()
    assert find_resume_tag(tmp_path / "fresh") is None  # no latest: a fresh run
