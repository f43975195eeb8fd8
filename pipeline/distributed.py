"""Process-group start, rank mapping under Slurm, seeding, and the checks that a run really
uses the hardware and storage it was meant to: an accelerator that matches the GPUs on the
machine, and one run directory that every rank sees.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from data_tools.common import UserError

# deepspeed is imported where a process group starts, on purpose: its import costs ~0.8 s over torch's
# (measured on the 2-core VM), which the launcher helpers and the tests importing this module do not need.


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job, and the device its tensors live on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nobody listens on now, for a 1-process group or a launcher of our own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` launcher as this interpreter's module: it works where the console script is
    not beside ``sys.executable`` (deepspeed installed with ``pip --target``, a venv not on PATH)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def launched_env(environ: Mapping[str, str], project_root: Path) -> dict[str, str]:
    """``environ`` with the project on PYTHONPATH, so that ranks started by a launcher import it from a
    checkout that is not pip-installed (DeepSpeed adds the working directory only on its multi-node
    path, and the script's own folder is ``pipeline/``, not the project root)."""
    env = dict(environ)
    paths = [str(project_root), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def slurm_rank_env(environ: Mapping[str, str], visible_devices: int) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE from Slurm's variables when no launcher set them.

    DeepSpeed 0.19 does not read SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. Under ``srun``
    with one task per GPU the global rank and world size are SLURM_PROCID and SLURM_NTASKS.
    The local rank is the device ordinal this task must use: SLURM_LOCALID when the task sees
    every GPU of its node, but with ``--gpus-per-task=1`` / ``--gpu-bind`` each task sees only
    its own GPU as device 0, so the ordinal is SLURM_LOCALID modulo the visible device count.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    local_id = int(environ.get("SLURM_LOCALID", "0"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": str(local_id % visible_devices if visible_devices > 0 else local_id),
        "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
    }


def visible_device_count(accelerator: Any) -> int:
    """Devices this process may use: CUDA_VISIBLE_DEVICES when set (no driver call), else the accelerator's count."""
    if accelerator.device_name() == "cpu":
        return 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([device for device in listed.split(",") if device.strip()])
    return accelerator.device_count()


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (deepspeed/torchrun: RANK; Slurm: SLURM_PROCID), before
    the process group exists."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def launcher_world_size() -> int:
    """Number of ranks the launcher started (deepspeed/torchrun: WORLD_SIZE; Slurm: SLURM_NTASKS)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def init_distributed(accelerator: Any) -> Ranks:
    """Start the process group under deepspeed/torchrun/Slurm, or a 1-process group; bind this rank's device."""
    import deepspeed

    os.environ.update(slurm_rank_env(os.environ, visible_device_count(accelerator)))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)  # before the process group, so NCCL binds the right device
    if accelerator.device_name() == "cpu":
        skip_shared_memory_inference_op()
    deepspeed.init_distributed(dist_init_required=True)
    if accelerator.device_name() == "cpu":
        threads = cpu_threads_per_rank(os.environ, usable_cores())
        if threads is not None:
            torch.set_num_threads(threads)
    device = torch.device("cpu") if accelerator.device_name() == "cpu" else torch.device(
        accelerator.device_name(local_rank))
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


# DeepSpeed's name of its CPU shared-memory all-reduce op (ShareMemCommBuilder.NAME).
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shared_memory_inference_op() -> None:
    """Keep DeepSpeed's comm layer from JIT-building its shared-memory all-reduce on CPU ranks.

    DeepSpeed 0.19's TorchBackend builds and loads that op whenever its CPU accelerator starts a
    process group, but only ``inference_all_reduce`` calls it; training's collectives (the ZeRO-2
    reduce-scatter and all-gather) go through torch.distributed (gloo). Its first build cost 37 s
    of a 2-core machine, on the critical path of every fresh CPU run. DeepSpeed decides from its
    per-process table of compatible ops, which it keeps as one dict precisely so edits persist;
    marking the op incompatible there makes ``build_shm_op`` return None. A DeepSpeed without
    that table is left alone (it then just builds the op).
    """
    import deepspeed.ops

    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    if isinstance(compatible, dict):
        compatible[SHM_COMM_OP] = False


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_rank_count(environ: Mapping[str, str]) -> int:
    """Ranks on this node: the deepspeed launcher's LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node."""
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(name, "").split("(")[0]  # Slurm may write "2(x3)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_threads_per_rank(environ: Mapping[str, str], cores: int) -> int | None:
    """Intra-op threads for one CPU rank, or None to leave torch's choice (OMP_NUM_THREADS was set).

    torch starts one thread per core in every process, so N CPU ranks on a node run N x cores
    threads on its cores; OpenMP threads that wait for each other at every matrix product then
    lose their time slices (measured on 2 cores and 2 ranks: steps 20% slower than with one
    thread each). Each rank gets its share of the cores instead, as the deepspeed launcher's
    --bind_cores_to_rank does, without needing numactl.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // local_rank_count(environ))


def use_deterministic_kernels() -> None:
    """Kernels without atomics-order nondeterminism (embedding backward, some cuBLAS paths), so two
    runs on a GPU give bitwise-equal losses. Called before CUDA or cuBLAS is first used."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


# -- hardware and storage checks -----------------------------------------------------------------


def nvidia_gpus_visible() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 when it is absent or fails): what the machine has, whatever torch thinks."""
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def accelerator_problem(accelerator: str, gpus_visible: int, requested: str | None, precision: str,
                        allow_cpu_mixed_precision: bool, ds_config_name: str = "the DeepSpeed config") -> str | None:
    """Why this run must not start on this accelerator, or None.

    DeepSpeed picks its CPU accelerator without a word when torch cannot use the GPU (for
    instance a driver older than the CUDA of the torch wheel): the run would then train on
    the CPU, for days, at a fraction of the speed. Training on the CPU is allowed only when
    asked for (``DS_ACCELERATOR=cpu``), and mixed precision on the CPU only with its flag.
    """
    if accelerator != "cpu":
        return None
    if gpus_visible and requested != "cpu":
        return (f"nvidia-smi lists {gpus_visible} GPU(s) but DeepSpeed selected its CPU accelerator, so torch "
                f"{torch.__version__} cannot use them (torch.cuda.is_available() is False: most often a driver "
                f"older than this torch's CUDA {torch.version.cuda or '(CPU-only build)'}, or a CPU-only torch); "
                "update the NVIDIA driver or install a torch build for your CUDA, or set DS_ACCELERATOR=cpu "
                "to train on the CPU deliberately")
    if precision == "fp16":
        return f"{ds_config_name}: fp16 needs a GPU; use ds_configs/cpu_zero2.json on a CPU machine"
    if precision == "bf16" and not allow_cpu_mixed_precision:
        return (f"{ds_config_name}: bf16 on DeepSpeed's CPU accelerator is emulated and slow; use "
                "ds_configs/cpu_zero2.json on a CPU machine, or pass --allow_cpu_mixed_precision to run it anyway")
    return None


def device_product_name(accelerator: Any) -> str | None:
    """The accelerator's product name (for the peak FLOP/s), None on the CPU accelerator."""
    return None if accelerator.device_name() == "cpu" else torch.cuda.get_device_name()


def warn_stale_extension_locks(max_age_s: float = 900.0) -> None:
    """A JIT build of a DeepSpeed op killed midway leaves a ``lock`` file, and every later rank
    waits on it forever without a word: name such locks up front."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root or not Path(root).is_dir():
        return
    now = time.time()
    # TORCH_EXTENSIONS_DIR/<op>/lock; torch's own default adds a level (py311_cpu/<op>/lock)
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        if now - lock.stat().st_mtime > max_age_s:
            print(f"train: {lock} is {int((now - lock.stat().st_mtime) / 60)} minutes old: a killed JIT build left "
                  "it and ranks building that op will wait on it forever; delete it if no build is running",
                  file=sys.stderr)


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank (one collective, on the engine's device)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_shared_run_dir(output_dir: Path, ranks: Ranks) -> None:
    """Every rank must see the files rank 0 writes in the run directory.

    Checkpoints are written by all ranks into one directory and resumed from ``latest``; on
    node-local storage each node would keep its own partial checkpoints and, after a crash,
    resume from different steps. Rank 0 writes a random token, every rank reads it back.
    """
    probe = output_dir / ".shared_run_dir_check"
    value = secrets.randbits(62) if ranks.is_main else 0
    if ranks.is_main:
        probe.write_text(str(value), encoding="utf-8")
    token = torch.tensor([value], dtype=torch.int64, device=ranks.device)
    dist.broadcast(token, src=0)
    expected = int(token.item())
    try:
        seen = int(probe.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seen = None
    shared = all_ranks_ok(seen == expected, ranks.device)
    dist.barrier()
    if ranks.is_main:
        probe.unlink(missing_ok=True)
    if not shared:
        where = "" if seen == expected else f" (rank {ranks.rank} on {socket.gethostname()} cannot see it)"
        raise UserError(f"{output_dir} is not one directory shared by every rank{where}: rank 0's files are "
                        "invisible to some ranks, so checkpoints would be split across nodes; put --output_dir on "
                        "storage every node mounts at the same path")


def refuse_on_every_rank(problem: str | None, ranks: Ranks) -> None:
    """Raise rank 0's ``problem`` (say, the run directory is locked by another run) on every rank, so that all
    of them exit with it instead of the others waiting for rank 0 in the next collective."""
    shared = [problem if ranks.is_main else None]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise UserError(shared[0])
