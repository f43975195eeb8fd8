"""Checkpoints: their layout, what makes one complete, which one to resume from, and saving
and loading them with the trainer's own state (step, data position, every rank's RNG).

The export and ``zh-to-universal`` import this module, never the trainer. Layout of a run
directory's ``checkpoints/``::

    <tag>/                      DeepSpeed's files (model states, one optimizer partition per rank)
    <tag>/rng_state_rank<R>.pt  rank R's RNG streams, plain tensors (loads with weights_only=True)
    <tag>/trainer_state.json    written last, after every rank finished: marks the tag complete and
                                records every file's size
    latest                      the newest complete tag, replaced atomically

Loading never unpickles arbitrary objects: the trainer's own files load with
``weights_only=True``, and DeepSpeed's files (which DeepSpeed itself loads with
``weights_only=False``) are first opened with ``weights_only=True`` and an allow-list of the
few DeepSpeed types they hold (:data:`DEEPSPEED_CHECKPOINT_TYPES`), so a crafted file is refused
before DeepSpeed, the export or ``zh-to-universal`` reads it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_tools.common import UserError, write_json_atomic, write_text_atomic
from pipeline.sampler import SamplerState

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
# Setting it to 1 skips the allow-list check of DeepSpeed's files (for checkpoints of a DeepSpeed
# version that stores a type the list lacks, from a source you trust).
TRUST_ENV = "ZH_TRUST_CHECKPOINTS"


def deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor types DeepSpeed 0.19's ZeRO-2 checkpoints pickle, besides containers and numbers.
    Imported here, not at the top: deepspeed's import is slow (~0.8 s) and the export's --help does not need it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@dataclass
class TrainerState:
    """What the loop carries from step to step and a checkpoint restores: the optimizer steps taken and
    the sampler's state after the last micro batch trained (not the last one prefetched)."""

    step: int = 0
    data: SamplerState = field(default_factory=SamplerState)

    def to_json(self) -> dict:
        """``trainer_state.json``'s form, unchanged since length grouping came in: the export, zh-to-universal
        and older checkpoints all use it."""
        return {"step": self.step, "consumed_samples": self.data.consumed_samples,
                "data_position": {"epoch": self.data.epoch, "micro_batches": self.data.micro_batches}}

    @classmethod
    def from_json(cls, saved: dict) -> "TrainerState":
        position = saved.get("data_position")
        if not isinstance(position, dict):
            # Checkpoints from before length grouping recorded no position; nothing written since lacks it.
            raise UserError(f"{TRAINER_STATE} of step {saved.get('step')} has no data_position (written before "
                            "length grouping): continue from an export of it with --init_from and a new --output_dir")
        return cls(step=saved["step"], data=SamplerState(int(position["epoch"]), int(position["micro_batches"]),
                                                         saved["consumed_samples"]))


def rng_file_name(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


# -- RNG streams as plain tensors ------------------------------------------------------------------


def rng_state(accelerator: Any) -> dict:
    """Every random stream this rank draws from, as tensors and numbers (no pickled objects)."""
    python_version, python_keys, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python_version": python_version, "python_keys": torch.tensor(python_keys, dtype=torch.int64),
        "python_gauss": python_gauss,
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)), "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss), "numpy_gauss": float(numpy_gauss),
        "torch": torch.get_rng_state(),
    }
    if accelerator.device_name() != "cpu":  # dropout on a GPU draws from the device's generator
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict, accelerator: Any) -> None:
    random.setstate((state["python_version"], tuple(state["python_keys"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if accelerator.device_name() != "cpu":
        if "accelerator" not in state:
            print("train: this checkpoint holds no GPU RNG state (written on a CPU): dropout masks after the resume "
                  "differ from an uninterrupted run", file=sys.stderr)
        else:
            accelerator.set_rng_state(state["accelerator"])


def load_rng_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(f"{path} is not a readable RNG state of this trainer ({error.__class__.__name__}); "
                        "resume from another checkpoint (--tag / checkpoints/latest)") from error


# -- completeness and tag resolution ---------------------------------------------------------------


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds a pickled object outside the allow-list: never fall back silently."""


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded safely (truncated, not a torch file), or None. The file is opened
    with ``weights_only=True`` and the DeepSpeed allow-list, memory-mapped: only its pickle is read,
    so checking a multi-GB optimizer partition costs milliseconds. A pickled object outside the
    allow-list raises :class:`UnsafeCheckpointError`."""
    if os.environ.get(TRUST_ENV) == "1":
        return None
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{path} holds a pickled object this trainer does not load ({reason[:160]}): refusing to "
            f"unpickle it, since a crafted checkpoint can run code; load only checkpoints from a source you trust "
            f"(set {TRUST_ENV}=1 to skip this check for one you do)") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        return f"has a file that cannot be read: {path.name} ({str(error).splitlines()[0][:120]})"
    return None


def load_checkpoint_file(path: Path) -> Any:
    """A DeepSpeed or trainer file, unpickled with ``weights_only=True`` and the DeepSpeed allow-list."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_problem(tag_dir: Path) -> str | None:
    """What makes a checkpoint directory unusable, or None when it is complete. Checks the files,
    not only their presence: sizes against those recorded at save time, and every torch file opens."""
    if not tag_dir.is_dir():
        return "does not exist"
    state_file = tag_dir / TRAINER_STATE
    if not state_file.is_file():
        return f"has no {TRAINER_STATE} (it was never completed)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"has an unreadable {TRAINER_STATE}"
    if not isinstance(state, dict) or any(not isinstance(state.get(key), int) for key in ("step", "consumed_samples")):
        return f"has a {TRAINER_STATE} without integer step and consumed_samples"
    for name, size in (state.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"is missing {name}"
        if path.stat().st_size != size:
            return f"has {name} of {path.stat().st_size} bytes, {size} when it was saved (truncated or modified)"
    if state.get("universal"):
        if not (tag_dir / "zero").is_dir():
            return "is a universal checkpoint without its zero/ folder"
    else:
        if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
            return "is missing mp_rank_00_model_states.pt"
        partitions = len(list(tag_dir.glob("*optim_states.pt")))
        if state.get("world_size") and partitions != state["world_size"]:
            return f"has {partitions} optimizer partitions but was written by {state['world_size']} ranks"
        for rank in range(state.get("world_size") or 0):  # exact resume needs every rank's RNG
            if not (tag_dir / rng_file_name(rank)).is_file():
                return f"is missing {rng_file_name(rank)}"
    for path in sorted(tag_dir.rglob("*.pt")):
        problem = torch_file_problem(path)
        if problem:
            return problem
    return None


def checkpoint_files(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint (relative path -> bytes), recorded when it is marked complete."""
    return {str(path.relative_to(tag_dir)): path.stat().st_size for path in sorted(tag_dir.rglob("*"))
            if path.is_file() and path.name != TRAINER_STATE}


def read_trainer_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / TRAINER_STATE).read_text(encoding="utf-8"))


def read_latest_tag(checkpoint_root: Path) -> str | None:
    """The tag ``latest`` points to if it is complete; None for a run without checkpoints."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    problem = checkpoint_problem(checkpoint_root / tag)
    if problem:
        raise UserError(f"{latest} points to {checkpoint_root / tag}, which {problem}; pass an earlier --tag")
    return tag


def find_resume_tag(checkpoint_root: Path) -> str | None:
    """The checkpoint to resume from: ``latest``, or when it fails validation, the newest
    complete earlier one (said on stderr). None for a fresh run."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    problem = checkpoint_problem(checkpoint_root / tag)
    if problem is None:
        return tag
    earlier = sorted((p.name for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith("step")),
                     reverse=True)
    for candidate in earlier:
        if candidate != tag and checkpoint_problem(checkpoint_root / candidate) is None:
            print(f"train: {checkpoint_root / tag} {problem}; resuming from the previous complete checkpoint "
                  f"{candidate}", file=sys.stderr)
            return candidate
    raise UserError(f"{latest} points to {checkpoint_root / tag}, which {problem}, and no earlier complete "
                    f"checkpoint is in {checkpoint_root}; delete {latest} to start over")


# -- save and load -----------------------------------------------------------------------------------


def save_checkpoint(engine: Any, checkpoint_root: Path, state: TrainerState, rank: int, world_size: int,
                    keep_last: int, accelerator: Any) -> str:
    """Write the checkpoint under its tag, wait for every rank, then mark it complete and move
    ``latest`` to it; older tags beyond ``keep_last`` are deleted only after that."""
    tag = tag_for_step(state.step)
    saved = {**state.to_json(), "world_size": world_size}
    engine.save_checkpoint(str(checkpoint_root), tag=tag, client_state={"trainer_state": saved}, save_latest=False)
    torch.save(rng_state(accelerator), checkpoint_root / tag / rng_file_name(rank))
    dist.barrier()
    if rank == 0:  # marks the tag complete, with the size of every file every rank wrote
        write_json_atomic(checkpoint_root / tag / TRAINER_STATE, {**saved, "files": checkpoint_files(checkpoint_root / tag)})
        write_text_atomic(checkpoint_root / LATEST, tag)
        tags = sorted(p.name for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last]:
            shutil.rmtree(checkpoint_root / old, ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine: Any, checkpoint_root: Path, tag: str, rank: int, accelerator: Any) -> None:
    """Model, optimizer and scheduler through DeepSpeed, this rank's RNG from its file. The step and data
    position come from the tag's trainer_state.json (:meth:`TrainerState.from_json`), read at start-up."""
    load_path, _ = engine.load_checkpoint(str(checkpoint_root), tag=tag)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load {checkpoint_root / tag}; point {checkpoint_root / LATEST} "
                        "at an earlier tag")
    rng_file = checkpoint_root / tag / rng_file_name(rank)
    if rng_file.is_file():
        set_rng_state(load_rng_file(rng_file), accelerator)
    else:  # a universal checkpoint resumed on more ranks than wrote it
        print(f"train: {rng_file} does not exist (more ranks than wrote {tag}): rank {rank} starts fresh RNG streams",
              file=sys.stderr)
