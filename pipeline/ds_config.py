"""DeepSpeed configuration: reading the JSON, filling its batch sizes and optimizer values from
the trainer's flags (one source of truth, contradictions are errors), and the learning-rate
schedule handed to DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data_tools.common import UserError
from pipeline.train_config import OptimizationOptions

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): warmup, then decay."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def lr_schedule(config: OptimizationOptions) -> Callable[[Any], Any]:
    """The scheduler factory DeepSpeed calls with its optimizer (saved in and restored from checkpoints)."""

    def schedule(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, config.total_steps, config.warmup_steps, config.lr_decay, config.min_lr_ratio))

    return schedule


def mixed_precision(ds_config: dict) -> str:
    """The precision a DeepSpeed config trains in: "bf16", "fp16" or "fp32"."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return name
    return "fp32"


def resolve_batch_sizes(config: OptimizationOptions, ds_config: dict, world_size: int, source: str) -> dict:
    """Fill DeepSpeed's batch fields from the trainer's flags; a contradiction is an error.

    micro_batch_size x gradient_accumulation_steps x world_size must equal the global batch.
    """
    derived = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    if config.global_batch_size and config.global_batch_size != derived:
        raise UserError(
            f"--global_batch_size {config.global_batch_size} != --micro_batch_size {config.micro_batch_size} x "
            f"--gradient_accumulation_steps {config.gradient_accumulation_steps} x {world_size} ranks = {derived}; "
            "fix one of them or pass --global_batch_size 0"
        )
    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": derived,
    }
    resolved = dict(ds_config)
    for key, value in wanted.items():
        current = resolved.get(key, "auto")
        if current != "auto" and current != value:
            raise UserError(
                f"{source}: {key} is {current} but the trainer's flags give {value} "
                f"(micro {config.micro_batch_size} x accumulation {config.gradient_accumulation_steps} x "
                f"{world_size} ranks); set it to \"auto\" or make the flags agree"
            )
        resolved[key] = value
    optimizer = resolved.get("optimizer")
    if optimizer:
        params = dict(optimizer.get("params", {}))
        for key, value in (("lr", config.learning_rate), ("weight_decay", config.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
        resolved["optimizer"] = {**optimizer, "params": params}
    leftover = [key for key, value in _walk(resolved) if value == "auto"]
    if leftover:
        raise UserError(f"{source}: the trainer cannot fill \"auto\" for {', '.join(leftover)}; give a value")
    return resolved


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


# Sections the trainer reads: each must be a JSON object when present.
DS_CONFIG_SECTIONS = ("bf16", "fp16", "zero_optimization", "optimizer", "scheduler", "checkpoint", "gradient_clipping")


def ds_config_problem(values: Any) -> str | None:
    """What makes valid JSON an unusable DeepSpeed config for this trainer, or None."""
    if not isinstance(values, dict):
        return f"holds a JSON {type(values).__name__}, not an object"
    for section in DS_CONFIG_SECTIONS[:-1]:
        if section in values and not isinstance(values[section], dict):
            return f"\"{section}\" must be an object, got {json.dumps(values[section])}"
    if "params" in values.get("optimizer", {}) and not isinstance(values["optimizer"]["params"], dict):
        return "\"optimizer.params\" must be an object"
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = values.get(key, "auto")
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            return f"\"{key}\" must be a positive integer or \"auto\", got {json.dumps(value)}"
    clipping = values.get("gradient_clipping", 0)
    if not isinstance(clipping, (int, float)) or isinstance(clipping, bool) or clipping < 0:
        return f"\"gradient_clipping\" must be a number >= 0, got {json.dumps(clipping)}"
    return None


def load_ds_config(path: Path) -> tuple[dict, Path]:
    """Read a DeepSpeed config given relative to the working directory or the project."""
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.is_file():
            try:
                values = json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise UserError(f"DeepSpeed config {candidate} is not valid JSON: {error}") from error
            problem = ds_config_problem(values)
            if problem:
                raise UserError(f"DeepSpeed config {candidate}: {problem}; see ds_configs/ for working ones")
            return values, candidate
    raise UserError(f"DeepSpeed config {path} not found; pass --deepspeed_config (see ds_configs/)")
