"""GPU-hours of a training schedule: its model FLOPs (``pipeline/flops.py``) at an MFU.

``python -m pipeline.recipe_estimate --model_config pegasus-base --source_length 512
--target_length 128 --total_steps 1000000 --global_batch_size 64 --gpus 8`` prints what the
schedule costs on the GPU this machine has (``torch.cuda.get_device_name()``, rated by
``PEAK_TFLOPS``), or on an H100 SXM when it has none (said so). The recipes in
``bin/recipes/`` print it before training.

    GPU-seconds = total_steps x global batch x training FLOPs per example / (MFU x peak FLOP/s)

FLOPs per example are those of full-length examples (an upper bound), or, given the mask
stage's ``--examples_dir``, the mean over its first examples' real lengths: the trainer's MFU
counts real (non-padding) tokens too, so the two agree. The MFU is the one measured for this
model on this GPU (``MEASURED_MFU``, filled from BENCHMARKS.md) when there is one, else
``--mfu``, else an assumed 0.35, and the line says which.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from data_tools.cli import option, run_stage
from data_tools.common import UserError
from pipeline.flops import PEAK_TFLOPS, training_flops

# The device the estimate is for when this machine has no GPU (the dry run on CPU ranks).
ASSUMED_DEVICE = "NVIDIA H100 80GB HBM3"  # H100 SXM5
ASSUMED_MFU = 0.35
# MFU the trainer logged on a GPU, per (packaged model config, torch.cuda.get_device_name()), as
# recorded in BENCHMARKS.md. Empty: no run on a GPU has been measured yet.
MEASURED_MFU: dict[tuple[str, str], float] = {}


@dataclass(kw_only=True)
class EstimateConfig:
    """Print the GPU-hours and wall-clock a training schedule needs at an MFU, from its model FLOPs."""

    model_config: str = option("pegasus-base", "Packaged config name (pegasus-base, bart-medium, ...) or a path to "
                               "an HF config.json: layers, d_model, FFN width and vocab size.")
    source_length: int = option(512, "Source tokens per example (the mask stage's --seq_length).")
    target_length: int = option(128, "Target tokens per example (gsg: --tgt_seq_length; bart: --seq_length).")
    examples_dir: Path | None = option(None, "The mask stage's output: FLOPs per example from the real lengths of "
                                       "its first --sample_examples examples instead of full-length ones.")
    sample_examples: int = option(10_000, "Examples of --examples_dir whose lengths are averaged.")
    total_steps: int = option(1_000_000, "Optimizer steps of the schedule.")
    global_batch_size: int = option(64, "Examples per optimizer step over all GPUs (the seeds: 8 per GPU on 8 GPUs).")
    gpus: int = option(8, "GPUs the schedule runs on: the wall-clock is given for them (GPU-hours do not depend "
                       "on it at a given MFU).")
    export_step: int = option(0, "Also give the cost up to this step (an export before the end, e.g. 250000); "
                              "0 = none.")
    mfu: float = option(0.0, f"Model FLOPs utilization to assume, in (0, 1]; 0 = the one measured for this model "
                        f"and GPU (MEASURED_MFU), else {ASSUMED_MFU} (assumed).")
    device_name: str = option("", "GPU to estimate for, as torch.cuda.get_device_name() names it (e.g. 'NVIDIA "
                              f"H200'); empty = this machine's GPU, or {ASSUMED_DEVICE} (H100 SXM) without one.")
    peak_tflops: float = option(0.0, "Peak dense bf16 TFLOP/s of one GPU; 0 = the data-sheet figure of the device "
                                "(pipeline/flops.py PEAK_TFLOPS).")
    label: str = option("", "Name of the recipe, printed at the start of each line.")

    def __post_init__(self) -> None:
        positive = ("source_length", "target_length", "sample_examples", "total_steps", "global_batch_size", "gpus")
        problems = [f"--{name} must be positive" for name in positive if getattr(self, name) <= 0]
        if not 0 <= self.mfu <= 1:
            problems.append(f"--mfu {self.mfu} must lie in (0, 1] (0 = measured or assumed)")
        if self.peak_tflops < 0 or not 0 <= self.export_step <= self.total_steps:
            problems.append("--peak_tflops must be >= 0 and --export_step in [0, --total_steps]")
        if problems:
            raise UserError("; ".join(problems))
        if self.examples_dir is not None:
            self.examples_dir = Path(self.examples_dir)


@dataclass(frozen=True)
class Estimate:
    """What :func:`estimate` found; the hours assume the MFU holds at any GPU count."""

    flops_per_example: float
    mean_source_length: float
    mean_target_length: float
    lengths_from: str  # "full-length" or where the lengths were measured
    total_flops: float
    device: str
    device_note: str  # why this device (detected, given, assumed)
    peak_tflops: float
    mfu: float
    mfu_note: str  # measured, given or assumed
    gpu_hours: float
    wall_clock_hours: float  # on config.gpus GPUs
    export_gpu_hours: float | None
    export_wall_clock_hours: float | None


def detected_gpu() -> str | None:
    """This machine's first GPU as torch names it, None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def architecture(name_or_path: str) -> SimpleNamespace:
    """The fields training_flops reads, from a packaged config name or an HF config.json."""
    from pipeline.model import resolve_model_config_path

    path = resolve_model_config_path(name_or_path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"model config {path} is not valid JSON: {error}") from error
    fields = ("d_model", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "encoder_layers", "decoder_layers")
    missing = [name for name in fields if not isinstance(values.get(name), int)]
    if missing:
        raise UserError(f"model config {path} lacks integer {', '.join(missing)}")
    return SimpleNamespace(**{name: values[name] for name in fields})


def example_lengths(examples_dir: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target lengths of the first ``limit`` examples of a mask stage output."""
    import pyarrow.compute as pc

    from data_tools.shards import load_manifest, open_shard, shard_paths

    manifest = load_manifest(examples_dir, "mask")
    sources: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    taken = 0
    for path in shard_paths(examples_dir, manifest, checksum=False):  # sizes and rows checked; no hashing
        table = open_shard(path).slice(0, limit - taken)
        sources.append(pc.list_value_length(table.column("source_ids")).to_numpy())
        targets.append(pc.list_value_length(table.column("target_ids")).to_numpy())
        taken += table.num_rows
        if taken >= limit:
            break
    if taken == 0:
        raise UserError(f"{examples_dir} holds no examples")
    return np.concatenate(sources), np.concatenate(targets)


def resolve_device(config: EstimateConfig) -> tuple[str, str, float]:
    """(device name, why this one, peak TFLOP/s)."""
    if config.device_name:
        device, note = config.device_name, "given"
    else:
        gpu = detected_gpu()
        device, note = (gpu, "detected") if gpu else (ASSUMED_DEVICE, "assumed, H100 SXM: no GPU detected")
    if config.peak_tflops > 0:
        return device, note, config.peak_tflops
    if device in PEAK_TFLOPS:
        return device, note, PEAK_TFLOPS[device]
    return (ASSUMED_DEVICE, f"assumed, H100 SXM: no peak known for {device!r} (pipeline/flops.py PEAK_TFLOPS; pass "
            "--peak_tflops)", PEAK_TFLOPS[ASSUMED_DEVICE])


def resolve_mfu(config: EstimateConfig, device: str) -> tuple[float, str]:
    """(MFU, where it comes from)."""
    if config.mfu > 0:
        return config.mfu, "given"
    measured = MEASURED_MFU.get((Path(config.model_config).stem, device))
    if measured is not None:
        return measured, "measured, BENCHMARKS.md"
    return ASSUMED_MFU, "assumed: no GPU figure measured yet in BENCHMARKS.md; set --mfu, or RECIPE_MFU for bin/recipes"


def estimate(config: EstimateConfig) -> Estimate:
    """The schedule's FLOPs and what they cost on the device at the MFU."""
    model = architecture(config.model_config)
    if config.examples_dir is not None:
        sources, targets = example_lengths(config.examples_dir, config.sample_examples)
        lengths_from = f"mean of {len(sources):,} examples of {config.examples_dir}"
    else:
        sources, targets = np.array([config.source_length]), np.array([config.target_length])
        lengths_from = "full-length"
    flops_per_example = training_flops(model, sources, targets) / len(sources)
    total_flops = flops_per_example * config.global_batch_size * config.total_steps
    device, device_note, peak = resolve_device(config)
    mfu, mfu_note = resolve_mfu(config, device)
    gpu_hours = total_flops / (mfu * peak * 1e12) / 3600
    export_hours = gpu_hours * config.export_step / config.total_steps if config.export_step else None
    return Estimate(
        flops_per_example=flops_per_example, mean_source_length=float(np.mean(sources)),
        mean_target_length=float(np.mean(targets)), lengths_from=lengths_from, total_flops=total_flops,
        device=device, device_note=device_note, peak_tflops=peak, mfu=mfu, mfu_note=mfu_note, gpu_hours=gpu_hours,
        wall_clock_hours=gpu_hours / config.gpus, export_gpu_hours=export_hours,
        export_wall_clock_hours=None if export_hours is None else export_hours / config.gpus,
    )


def format_hours(hours: float) -> str:
    return f"{hours:,.1f} h" if hours < 48 else f"{hours:,.0f} h ({hours / 24:,.1f} days)"


def report(config: EstimateConfig, result: Estimate) -> list[str]:
    """The lines printed: what is counted, then the cost (the line with GPU-hours)."""
    prefix = f"estimate {config.label}:" if config.label else "estimate:"
    lines = [
        f"{prefix} {config.total_steps:,} steps x {config.global_batch_size} examples of {config.model_config}, "
        f"source {result.mean_source_length:.0f} / target {result.mean_target_length:.0f} "
        f"tokens ({result.lengths_from}): {result.flops_per_example / 1e12:.3f} TFLOP per example, "
        f"{result.total_flops:.3e} FLOPs in all",
        f"{prefix} on {result.device} ({result.device_note}; peak {result.peak_tflops:.1f} TFLOP/s) at MFU "
        f"{result.mfu:.0%} ({result.mfu_note}): {result.gpu_hours:,.1f} GPU-hours, "
        f"{format_hours(result.wall_clock_hours)} wall-clock on {config.gpus} GPUs",
    ]
    if result.export_gpu_hours is not None:
        lines.append(f"{prefix} to the export at step {config.export_step:,}: {result.export_gpu_hours:,.1f} "
                     f"GPU-hours, {format_hours(result.export_wall_clock_hours)} wall-clock on {config.gpus} GPUs")
    return lines


def run(config: EstimateConfig) -> Estimate:
    result = estimate(config)
    print("\n".join(report(config, result)), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, EstimateConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
