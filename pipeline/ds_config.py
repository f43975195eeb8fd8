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
# DeepSpeed 0.19's own optimizers (deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS, matched case-insensitively);
# any other name must be a torch.optim class, as DeepSpeed then looks it up there.
DEEPSPEED_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any, least: int = 1) -> bool:  # DeepSpeed takes 5e8 for 500000000
    return _number(value) and float(value).is_integer() and value >= least


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _auto_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value == "auto" or check(value)


# (field, check, what it must be): values DeepSpeed either fails on with a traceback after the run directory
# was written, or takes silently (ZeRO stage 0, 1 or 3 trains, then zh-export cannot read the checkpoints).
DS_FIELD_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("zero_optimization.stage", lambda v: type(v) is int and v == 2,
     "must be 2 (a number): the trainer, zh-export and zh-to-universal read ZeRO stage 2 checkpoints only"),
    ("zero_optimization.reduce_bucket_size", _whole, "must be a positive whole number of elements"),
    ("zero_optimization.allgather_bucket_size", _whole, "must be a positive whole number of elements"),
    *((f"zero_optimization.{name}", _flag, "must be true or false")
      for name in ("overlap_comm", "contiguous_gradients", "round_robin_gradients", "reduce_scatter")),
    ("optimizer.type", lambda v: isinstance(v, str) and optimizer_known(v),
     f"must be one of DeepSpeed's optimizers ({', '.join(DEEPSPEED_OPTIMIZERS)}) or a torch.optim class"),
    ("optimizer.params.lr", _auto_or(lambda v: _number(v) and v > 0), "must be a positive number or \"auto\""),
    ("optimizer.params.weight_decay", _auto_or(lambda v: _number(v) and v >= 0), "must be a number >= 0 or \"auto\""),
    ("optimizer.params.eps", lambda v: _number(v) and v > 0, "must be a positive number"),
    ("optimizer.params.betas", lambda v: isinstance(v, list) and len(v) == 2
     and all(_number(beta) and 0 <= beta < 1 for beta in v), "must be two numbers in [0, 1)"),
    ("optimizer.params.torch_adam", _flag, "must be true or false"),
    ("optimizer.params.adam_w_mode", _flag, "must be true or false"),
    ("optimizer.params.max_grad_norm", lambda v: False, "is not an optimizer parameter: use \"gradient_clipping\""),
    ("gradient_clipping", lambda v: _number(v) and v >= 0, "must be a number >= 0"),
    ("fp16.enabled", _auto_or(_flag), "must be true, false or \"auto\""),
    ("bf16.enabled", _auto_or(_flag), "must be true, false or \"auto\""),
    ("fp16.loss_scale", lambda v: _number(v) and v >= 0, "must be a number >= 0 (0: dynamic loss scaling)"),
    ("fp16.initial_scale_power", lambda v: _whole(v, 0) and v <= 64, "must be a whole number in [0, 64]"),
    ("fp16.loss_scale_window", _whole, "must be a positive whole number"),
    ("fp16.hysteresis", _whole, "must be a positive whole number"),
    ("fp16.min_loss_scale", lambda v: _number(v) and v > 0, "must be a positive number"),
)
# Fields DeepSpeed has a default for that this trainer cannot run with.
DS_REQUIRED_FIELDS = {
    "zero_optimization.stage": "is missing: DeepSpeed would train without ZeRO (stage 0), checkpoints zh-export "
                               "cannot read; set it to 2",
    "optimizer.type": "is missing: give the optimizer, e.g. {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\"}}",
}
_MISSING = object()


def optimizer_known(name: str) -> bool:
    """Whether DeepSpeed can build optimizer ``name``: one of its own, or a torch.optim class."""
    found = getattr(torch.optim, name, None)
    return name.lower() in DEEPSPEED_OPTIMIZERS or (isinstance(found, type)
                                                    and issubclass(found, torch.optim.Optimizer))


def non_finite_field(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """(path, value) of the first number that is NaN or infinite (``optimizer.params.betas[1]``), or None.
    Python's json reads ``NaN`` and ``Infinity``, and NaN passes every range check (each comparison is False)."""
    if isinstance(node, float) and not math.isfinite(node):
        return prefix, node
    if isinstance(node, dict):
        children = [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in node.items()]
    elif isinstance(node, list):
        children = [(f"{prefix}[{index}]", value) for index, value in enumerate(node)]
    else:
        return None
    for path, value in children:
        found = non_finite_field(value, path)
        if found is not None:
            return found
    return None


def _field(values: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(values, dict) or key not in values:
            return _MISSING
        values = values[key]
    return values


def ds_config_problem(values: Any) -> str | None:
    """What makes valid JSON an unusable DeepSpeed config for this trainer, or None."""
    if not isinstance(values, dict):
        return f"holds a JSON {type(values).__name__}, not an object"
    for section in DS_CONFIG_SECTIONS[:-1]:
        if section in values and not isinstance(values[section], dict):
            return f"\"{section}\" must be an object, got {json.dumps(values[section])}"
    if "params" in values.get("optimizer", {}) and not isinstance(values["optimizer"]["params"], dict):
        return "\"optimizer.params\" must be an object"
    non_finite = non_finite_field(values)
    if non_finite is not None:
        return f"\"{non_finite[0]}\" is {json.dumps(non_finite[1])}: every number must be finite"
    if "scheduler" in values:  # DeepSpeed would build it in place of the trainer's, ignoring the schedule flags
        return ("has a \"scheduler\" section, which DeepSpeed would use in place of the trainer's schedule "
                "(--warmup_steps, --lr_decay, --min_lr_ratio, --total_steps); remove it and set those flags")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = values.get(key, "auto")
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            return f"\"{key}\" must be a positive integer or \"auto\", got {json.dumps(value)}"
    for dotted, why in DS_REQUIRED_FIELDS.items():
        if _field(values, dotted) is _MISSING:
            return f"\"{dotted}\" {why}"
    for dotted, check, must in DS_FIELD_RULES:
        value = _field(values, dotted)
        if value is not _MISSING and not check(value):
            return f"\"{dotted}\" {must}, got {json.dumps(value)}"
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
