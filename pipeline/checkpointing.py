"""Checkpoints: their layout, what makes one complete, which one to resume from, and saving
and loading them with the trainer's own state (step, data position, every rank's RNG).

The export and ``zh-to-universal`` import this module, never the trainer. Layout of a run
directory's ``checkpoints/``::

    <tag>/                      DeepSpeed's files (model states, one optimizer partition per rank)
    <tag>/rng_state_rank<R>.pt  rank R's RNG streams, plain tensors (loads with weights_only=True)
    <tag>/sha256.json           the sha256 of every other file (but trainer_state.json), written by rank 0
                                once every rank finished
    <tag>/trainer_state.json    written last: marks the tag complete and records every file's size
    latest                      the newest complete tag, replaced atomically

Tags are ``step<8 digits>`` (and ``zh-to-universal``'s ``<tag>_universal``): only directories so named
are ever resumed from or pruned, so a copy of yours beside them (``step00000002.bak``) is never touched.

Loading never unpickles arbitrary objects: the trainer's own files load with
``weights_only=True``, and DeepSpeed's files (which DeepSpeed itself loads with
``weights_only=False``) are first opened with ``weights_only=True`` and an allow-list of the
few DeepSpeed types they hold (:data:`DEEPSPEED_CHECKPOINT_TYPES`), so a crafted file is refused
before DeepSpeed, the export or ``zh-to-universal`` reads it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from data_tools.common import UserError, file_sha256, write_json_atomic, write_text_atomic
from pipeline.sampler import SamplerState

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# Beside trainer_state.json rather than in it: that file's form is what the export, zh-to-universal and older
# checkpoints share. Listed in its "files" like any file of the checkpoint.
DIGESTS_FILE = "sha256.json"
MODEL_CONFIG_FILE = "model_config.json"
# Setting it to 1 skips the allow-list check of DeepSpeed's files (for checkpoints of a DeepSpeed
# version that stores a type the list lacks, from a source you trust).
TRUST_ENV = "ZH_TRUST_CHECKPOINTS"
# The directory names the trainer (step<N>) and zh-to-universal (<tag>_universal) write under checkpoints/.
TAG_PATTERN = re.compile(r"step\d{8}(_universal)?")
# A write that failed without an errno while less than this was free was a full disk (torch's zip writer
# reports ENOSPC as a RuntimeError, "unexpected pos").
DISK_FULL_BYTES = 64 << 20


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


def checkpoint_tags(checkpoint_root: Path) -> list[str]:
    """The checkpoint directories under ``checkpoint_root``, oldest first: only the names the trainer and
    zh-to-universal write (anything else there is the user's)."""
    return sorted(path.name for path in checkpoint_root.iterdir() if path.is_dir() and TAG_PATTERN.fullmatch(path.name))


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
    return digest_problem(tag_dir)


def digest_problem(tag_dir: Path) -> str | None:
    """Which file's content differs from the sha256 recorded when the checkpoint was marked complete (a flipped
    bit keeps the size), or None. Checkpoints written before digests were recorded have none: not checked. Runs
    after the allow-list check, so a crafted file is refused as such rather than skipped as corrupt."""
    if not (tag_dir / DIGESTS_FILE).is_file():
        return None
    try:
        digests = json.loads((tag_dir / DIGESTS_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        digests = None
    if not isinstance(digests, dict) or not all(isinstance(value, str) for value in digests.values()):
        return f"has an unreadable {DIGESTS_FILE}"
    for name, digest in sorted(digests.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"is missing {name}"
        if file_sha256(path) != digest:
            return f"has {name} whose sha256 differs from the one recorded when it was saved (a flipped bit or an edit)"
    return None


def digests_recorded(saved_state: dict) -> bool:
    """Whether a checkpoint (its trainer_state.json) has its files' sha256 recorded (those written before not)."""
    return DIGESTS_FILE in (saved_state.get("files") or {})


def checkpoint_files(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint (relative path -> bytes), recorded when it is marked complete."""
    return {str(path.relative_to(tag_dir)): path.stat().st_size for path in sorted(tag_dir.rglob("*"))
            if path.is_file() and path.name != TRAINER_STATE}


def record_digests(tag_dir: Path, known: dict[str, str] | None = None) -> None:
    """Write sha256.json: the sha256 of every file of a checkpoint (relative path -> hex digest), before it is
    marked complete. ``known`` digests (hashed by the ranks that wrote the files) are not computed again."""
    known = known or {}
    digests = {name: known.get(name) or file_sha256(tag_dir / name) for name in checkpoint_files(tag_dir)
               if name != DIGESTS_FILE}
    write_json_atomic(tag_dir / DIGESTS_FILE, {**digests, **known})  # known: a listing may lag another node's writes


def read_trainer_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / TRAINER_STATE).read_text(encoding="utf-8"))


def read_latest_tag(checkpoint_root: Path) -> str | None:
    """The tag ``latest`` points to if it is complete; None for a run without checkpoints."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    problem = tag_problem(checkpoint_root, tag)
    if problem:
        raise UserError(f"{latest} points to {checkpoint_root / tag}, which {problem}; pass an earlier --tag")
    return tag


def tag_problem(checkpoint_root: Path, tag: str) -> str | None:
    """:func:`checkpoint_problem` of the tag ``latest`` names, which must be a name the trainer writes."""
    if not TAG_PATTERN.fullmatch(tag):
        return "is not a checkpoint tag of this trainer (step<8 digits>)"
    return checkpoint_problem(checkpoint_root / tag)


def find_resume_tag(checkpoint_root: Path) -> str | None:
    """The checkpoint to resume from: ``latest``, or when it fails validation, the newest
    complete earlier one (said on stderr). None for a fresh run."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    problem = tag_problem(checkpoint_root, tag)
    if problem is None:
        return tag
    for candidate in reversed(checkpoint_tags(checkpoint_root)):
        if candidate != tag and checkpoint_problem(checkpoint_root / candidate) is None:
            print(f"train: {checkpoint_root / tag} {problem}; resuming from the previous complete checkpoint "
                  f"{candidate}", file=sys.stderr)
            return candidate
    raise UserError(f"{latest} points to {checkpoint_root / tag}, which {problem}, and no earlier complete "
                    f"checkpoint is in {checkpoint_root}; delete {latest} to start over")


# -- save and load -----------------------------------------------------------------------------------


def save_checkpoint(engine: Any, checkpoint_root: Path, state: TrainerState, rank: int, world_size: int,
                    keep_last: int, accelerator: Any) -> str:
    """Write the checkpoint under its tag on every rank; then rank 0 marks it complete (the size and sha256 of
    every file, each rank hashing the files it wrote) and moves ``latest`` to it. Older tags beyond ``keep_last``
    are deleted only after that. A rank that cannot write (a full disk) stops every rank with one line: the
    partial tag is removed and ``latest`` stays on the previous checkpoint."""
    tag = tag_for_step(state.step)
    saved = {**state.to_json(), "world_size": world_size}
    failure, written = write_rank_files(engine, checkpoint_root, tag, saved, rank, accelerator)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (failure, written))
    outcome: list[str | None] = [None]
    if rank == 0:
        failures = [failed for failed, _ in gathered if failed]
        records = {name: record for _, files in gathered for name, record in files.items()}
        outcome[0] = failures[0] if failures else mark_complete(checkpoint_root, tag, saved, records, keep_last)
        if outcome[0]:
            outcome[0] = abandon_checkpoint(checkpoint_root, tag, outcome[0])
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise UserError(outcome[0])
    return tag


def write_rank_files(engine: Any, checkpoint_root: Path, tag: str, saved: dict, rank: int,
                     accelerator: Any) -> tuple[str | None, dict[str, list]]:
    """This rank's part of the checkpoint (DeepSpeed's files, then its RNG streams) and [size, sha256] of each
    file it wrote, hashed while it is in the page cache; or why it could not write, and nothing."""
    written: list[Path] = []
    try:
        with recording_saves(engine, written):
            try:
                engine.save_checkpoint(str(checkpoint_root), tag=tag, client_state={"trainer_state": saved},
                                       save_latest=False)
            except (OSError, RuntimeError):
                dist.barrier()  # DeepSpeed's save ends in a barrier, where the ranks that could write now wait
                raise
        written.append(checkpoint_root / tag / rng_file_name(rank))
        torch.save(rng_state(accelerator), written[-1])
        return None, {str(path.relative_to(checkpoint_root / tag)): [path.stat().st_size, file_sha256(path)]
                      for path in written if path.is_relative_to(checkpoint_root / tag)}
    except (OSError, RuntimeError) as error:  # RuntimeError: how torch's zip writer reports a failed write
        path = Path(getattr(error, "filename", None) or (written[-1] if written else checkpoint_root / tag))
        return write_failure(error, path, rank), {}


@contextlib.contextmanager
def recording_saves(engine: Any, written: list[Path]) -> Iterator[None]:
    """Append to ``written`` each file DeepSpeed saves through its checkpoint engine while the block runs, so each
    rank hashes the files it wrote, in parallel with the others. An engine without one records nothing (rank 0
    then hashes every file)."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        yield
        return
    original = checkpoint_engine.save

    def save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        written.append(Path(path))
        return original(state_dict, path, *args, **kwargs)

    checkpoint_engine.save = save
    try:
        yield
    finally:
        del checkpoint_engine.save  # DeepSpeed's own method again


def write_failure(error: BaseException, path: Path, rank: int) -> str:
    """Why ``path`` could not be written, in words: a full disk (with the space left) or the system's reason."""
    existing = next(folder for folder in [path, *path.parents] if folder.exists())
    free = shutil.disk_usage(existing).free
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free < DISK_FULL_BYTES):
        return f"rank {rank} could not write {path}: the disk is full ({free / 1e6:.1f} MB free)"
    reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"rank {rank} could not write {path}: {reason[:200]}"


def mark_complete(checkpoint_root: Path, tag: str, saved: dict, records: dict[str, list], keep_last: int) -> str | None:
    """Rank 0: record every file's sha256 (sha256.json) and size (the tag's trainer_state.json, which marks it
    complete), point ``latest`` at it and prune older tags; None, or why a write failed. Files no rank reported
    (an engine that hides its writes) are hashed here."""
    tag_dir = checkpoint_root / tag
    try:
        record_digests(tag_dir, {name: digest for name, (_, digest) in records.items()})
        sizes = {**checkpoint_files(tag_dir), **{name: size for name, (size, _) in records.items()}}
        write_json_atomic(tag_dir / TRAINER_STATE, {**saved, "files": dict(sorted(sizes.items()))})
        write_text_atomic(checkpoint_root / LATEST, tag)
    except OSError as error:
        return write_failure(error, Path(error.filename or tag_dir / TRAINER_STATE), 0)
    for old in checkpoint_tags(checkpoint_root)[:-keep_last]:  # tags only: the user's files there are left alone
        shutil.rmtree(checkpoint_root / old, ignore_errors=True)
    return None


def abandon_checkpoint(checkpoint_root: Path, tag: str, problem: str) -> str:
    """Rank 0, after a rank could not write ``tag``: remove its partial files; the one line to stop with."""
    tag_dir = checkpoint_root / tag
    written = sum(size for size in checkpoint_files(tag_dir).values()) if tag_dir.is_dir() else 0
    shutil.rmtree(tag_dir, ignore_errors=True)
    latest_file = checkpoint_root / LATEST
    latest = latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else None
    previous = sum(checkpoint_files(checkpoint_root / latest).values()) if latest and latest != tag and (
        checkpoint_root / latest).is_dir() else 0
    needed = (f"a checkpoint of this run takes about {previous / 1e6:.1f} MB" if previous else
              f"a checkpoint of this run takes more than the {written / 1e6:.1f} MB written before it failed")
    kept = ("no checkpoint of this run exists yet" if latest is None else
            f"{latest_file} still points to the previous complete checkpoint {latest}" if latest != tag else
            f"{latest_file} named {tag}, which was being rewritten: the next run falls back to the newest complete "
            "checkpoint before it")
    free = shutil.disk_usage(checkpoint_root).free
    return (f"checkpoint {tag_dir} was not saved: {problem}; {needed} ({free / 1e6:.1f} MB free now). Its partial "
            f"files were removed and {kept}: free space (or fix the cause), then relaunch the same command to resume")


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
