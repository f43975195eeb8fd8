"""to-universal: turn a ZeRO-2 checkpoint into DeepSpeed's universal format, to resume on a
different number of ranks (say 2 -> 1 after losing a node).

Runs ``deepspeed.checkpoint.ds_to_universal --inject_missing_state`` on the tag, copies the
trainer's state beside it, writes ``<tag>_universal`` through a temp folder and points
``latest`` at it. The next ``zh-train`` with the same run directory, on any number of
ranks, loads it with ``load_universal`` and carries on from the same step and sample.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.cli import option, required, run_stage
from data_tools.common import UserError, write_json_atomic, write_text_atomic
from pipeline.checkpointing import (
    CHECKPOINTS,
    LATEST,
    TRAINER_STATE,
    checkpoint_files,
    checkpoint_problem,
    read_latest_tag,
    read_trainer_state,
    record_digests,
)


@dataclass(kw_only=True)
class UniversalConfig:
    """Convert a run's ZeRO-2 checkpoint to DeepSpeed's universal checkpoint format."""

    run_dir: Path = required("The training run's --output_dir.")
    tag: str = option("", "Checkpoint tag to convert; empty = the one 'latest' points to.")

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)


def to_universal(config: UniversalConfig) -> str:
    root = config.run_dir / CHECKPOINTS
    tag = config.tag or read_latest_tag(root)
    if tag is None:
        raise UserError(f"{root / LATEST} not found: the run has no complete checkpoint to convert")
    source = root / tag
    # also refuses files outside DeepSpeed's allow-list before they are unpickled; read_latest_tag checked latest
    problem = checkpoint_problem(source) if config.tag else None
    if problem:
        raise UserError(f"checkpoint {source} {problem}; convert another --tag")
    state = read_trainer_state(source)
    if state.get("universal"):
        raise UserError(f"{source} is already a universal checkpoint")
    target_tag = f"{tag}_universal"
    staging = root / f".{target_tag}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
         "--output_folder", str(staging), "--inject_missing_state"],
        capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"ds_to_universal failed on {source}: {result.stderr.strip().splitlines()[-1:]}")
    for rng_file in source.glob("rng_state_rank*.pt"):
        shutil.copyfile(rng_file, staging / rng_file.name)
    record_digests(staging)
    write_json_atomic(staging / TRAINER_STATE, {**state, "universal": True, "converted_from": tag,
                                                "files": checkpoint_files(staging)})
    shutil.rmtree(root / target_tag, ignore_errors=True)
    staging.replace(root / target_tag)
    write_text_atomic(root / LATEST, target_tag)
    print(f"to-universal: {source} -> {root / target_tag}; {root / LATEST} points to it", file=sys.stderr)
    return target_tag


def main(argv: list[str] | None = None) -> int:
    return run_stage(to_universal, UniversalConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
