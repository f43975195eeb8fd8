"""Multi-process runs that check what GPUs and clusters need, on CPU ranks: every collective
the trainer makes takes a tensor on the engine's device, and a run directory that is not
shared between nodes stops the run before anything is trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEEPSPEED, PROJECT_ROOT, TORCHRUN, deepspeed_env, run_command

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
    result = run_command([*DEEPSPEED, "--num_gpus", "2", "--master_port", "29720",
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
            [*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", "29725", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
             *trainer_flags(bart_examples_dir, "run", "--total_steps", "2")],
            cwd=cwd, env=deepspeed_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    assert "is not one directory shared by every rank (rank 1" in outputs[1], outputs[1][-3000:]
    assert "Traceback" not in outputs[1].split("is not one directory shared")[0][-2000:]
    assert not (tmp_path / "node0" / "run" / "checkpoints").exists()  # nothing trained, nothing saved
    assert not (tmp_path / "node0" / "run" / ".shared_run_dir_check").exists()


# pdsh as a remote login gives it: each host's command runs in a fresh environment (env -i: no PATH
# beyond the system's, no TORCH_EXTENSIONS_DIR), with %n replaced by the host's position, all at once.
FAKE_PDSH = r'''#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
hosts = args[args.index("-w") + 1].split(",")
command = args[args.index("-w") + 2:]
with open(os.environ["FAKE_PDSH_LOG"], "a") as log:
    log.write(" ".join(command) + "\n")
login = {"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin"}
nodes = [subprocess.Popen(["bash", "-c", " ".join(command).replace("%n", str(n))], env=login)
         for n, _ in enumerate(hosts)]
sys.exit(max(node.wait() for node in nodes))
'''


def test_two_node_launch_over_pdsh_gives_every_rank_the_extensions_dir_and_the_venv(bart_examples_dir, tmp_path):
    """bin/train.sh with a --hostfile of two loopback 'nodes': the launcher's pdsh path, with a stand-in
    pdsh that starts each node's command in a login-like environment. Every rank must see the
    TORCH_EXTENSIONS_DIR and the venv's bin (ninja) of the launching shell, so nothing is built into
    ~/.cache/torch_extensions; a user's ./.deepspeed_env still reaches the ranks."""
    fake_bin, home, probe_dir = tmp_path / "bin", tmp_path / "home", tmp_path / "ranks"
    for folder in (fake_bin, home, probe_dir):
        folder.mkdir()
    (fake_bin / "pdsh").write_text(FAKE_PDSH)
    (fake_bin / "pdsh").chmod(0o755)
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    (tmp_path / ".deepspeed_env").write_text(f"RANK_ENV_DIR={probe_dir}\n")  # the user's own file
    env = deepspeed_env()
    env.update(HOME=str(home), PATH=f"{fake_bin}:{env['PATH']}", FAKE_PDSH_LOG=str(tmp_path / "pdsh.log"),
               NUM_RANKS="1", MASTER_PORT="29727", TRAIN_SCRIPT=str(PROJECT_ROOT / "tests" / "rank_env_probe.py"),
               DATA_DIR=str(bart_examples_dir), RUN_DIR=str(tmp_path / "run"),
               LAUNCHER_ARGS=f"--hostfile {tmp_path / 'hostfile'} --master_addr 127.0.0.1 --no_ssh_check")
    env.pop("PYTHONPATH", None)  # as a user's shell: bin/train.sh puts the checkout there itself
    result = subprocess.run(["bash", str(PROJECT_ROOT / "bin" / "train.sh"), "--total_steps", "2",
                             "--micro_batch_size", "4", "--log_every_steps", "1", "--no-progress"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "pdsh" in (tmp_path / "pdsh.log").read_text()  # the multi-node path really ran
    seen = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in seen:
        assert rank["TORCH_EXTENSIONS_DIR"] == env["TORCH_EXTENSIONS_DIR"], rank
        assert rank["ninja"] and Path(rank["ninja"]).parent == Path(sys.executable).parent, rank
        assert rank["DS_ACCELERATOR"] == "cpu"
    assert not (home / ".cache" / "torch_extensions").exists()
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
