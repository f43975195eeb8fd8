"""Multi-process runs that check what GPUs and clusters need, on CPU ranks: every collective
the trainer makes takes a tensor on the engine's device, and a run directory that is not
shared between nodes stops the run before anything is trained."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, deepspeed_env, run_command

pytestmark = pytest.mark.slow


def trainer_flags(data_dir: Path, output_dir: str | Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--model_config", "bart-tiny",
            "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"), "--micro_batch_size", "4",
            "--log_every_steps", "1", "--no-progress", *extra]


def test_every_collective_of_the_trainer_takes_a_tensor_on_the_engine_device(bart_examples_dir, tmp_path):
    """tests/collective_guard.py wraps torch.distributed's collectives and fails the run on a tensor
    off the accelerator's device. On CPU ranks this proves the wrapped run covers logging, eval,
    the shared-directory check and checkpoints; on a GPU (tests/test_gpu.py) the same run is the real check."""
    run_dir = tmp_path / "run"
    result = run_command(["deepspeed", "--num_gpus", "2", "--master_port", "29720",
                          str(PROJECT_ROOT / "tests" / "collective_guard.py"),
                          *trainer_flags(bart_examples_dir, run_dir, "--total_steps", "4", "--eval_examples", "16",
                                         "--eval_every_steps", "2", "--save_checkpoint_steps", "2")])
    for rank in (0, 1):
        line = next(line for line in result.stderr.splitlines() if f"collective guard rank {rank}:" in line)
        checked = eval(line.split(":", 1)[1].split("]", 1)[-1].strip())  # noqa: S307 - our own dict repr
        # 4 log windows + 2 evaluations, all-reduced in float64; the run-dir check's broadcast and MIN in int64
        assert checked.get("all_reduce:torch.float64", 0) >= 6, checked
        assert checked.get("broadcast:torch.int64", 0) >= 1 and checked.get("all_reduce:torch.int64", 0) >= 1
    # two CPU ranks share the cores (one thread each here, on 2 cores) and never build the inference-only shm op
    assert "on 2 x cpu (" in result.stderr and " threads each)" in result.stderr, result.stderr[-3000:]
    assert "shm_comm" not in result.stderr + result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in records if "loss" in r)
    assert len([r for r in records if "eval_loss" in r]) == 2


def test_a_run_directory_not_shared_between_nodes_stops_the_run(bart_examples_dir, tmp_path):
    """Two 'nodes' (torchrun --nnodes 2 on loopback) started in different working directories with a
    relative --output_dir: each sees its own directory, as nodes with local disks would."""
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        nodes.append(subprocess.Popen(
            ["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", "29725", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
             *trainer_flags(bart_examples_dir, "run", "--total_steps", "2")],
            cwd=cwd, env=deepspeed_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    assert "is not one directory shared by every rank (rank 1" in outputs[1], outputs[1][-3000:]
    assert "Traceback" not in outputs[1].split("is not one directory shared")[0][-2000:]
    assert not (tmp_path / "node0" / "run" / "checkpoints").exists()  # nothing trained, nothing saved
    assert not (tmp_path / "node0" / "run" / ".shared_run_dir_check").exists()
