"""The training run's configuration: one dataclass, the ``zh-train`` flags generated from it.

``TrainConfig`` is made of sections (data, optimization, checkpointing, logging), each a dataclass
of its own that the parts needing only it take as their type; the flags stay flat and keep their
names, and ``train_config.json`` stays one flat object. Kept in its own module so the trainer's
parts and the export can import it without importing the trainer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_tools.cli import config_to_dict, option, required
from data_tools.common import UserError
from pipeline.mixture import parse_mixture

TRAIN_CONFIG_FILE = "train_config.json"
# Flags that define a run's data, model and data order: a run directory can only be continued with the same values.
# eval_examples among them: it moves the line between training and held-out examples (held-out ones would be
# trained on, or trained ones scored as held out).
RUN_DEFINING_FLAGS = ("data_dir", "data_dirs", "model_config", "micro_batch_size", "seed", "group_by_length",
                      "max_tokens_per_batch", "length_group_window", "eval_examples")


@dataclass(kw_only=True)
class DataOptions:
    """Data: the examples, how they are batched and what is held out."""

    data_dir: Path | None = option(None, "Output directory of the mask stage (examples-*.arrow), or of the tokenize "
                                   "stage to mask online (with --online_mask_config). Or --data_dirs.")
    data_dirs: list[str] = option([], "A weighted mixture instead of --data_dir: PATH:WEIGHT entries, e.g. "
                                  "work/examples-news:0.6 work/examples-web:0.3 work/examples-reviews:0.1 (weights "
                                  "are normalized). Each corpus keeps its own order and epochs, each gets its share "
                                  "of every mixture epoch, all must share one vocab; the metrics log corpus_share.")
    online_mask_config: Path | None = option(None, "JSON of mask flags (e.g. {\"preset\": \"pegasus_paper\", "
                                             "\"seq_length\": 512}) to mask a tokenized corpus on the fly: "
                                             "fresh masks every epoch, nothing stored.")
    group_by_length: bool = option(False, "Put examples of similar length in the same micro batch (sorted within "
                                   "windows of --length_group_window micro batches' worth of examples, batches shuffled "
                                   "again) so less compute goes to padding.")
    max_tokens_per_batch: int = option(0, "Token budget: a micro batch holds at most this many padded source + "
                                       "target tokens (and at most --micro_batch_size examples); implies "
                                       "--group_by_length. Examples per step then vary; 0 = fixed-size batches.")
    length_group_window: int = option(100, "Window sorted by length for --group_by_length / --max_tokens_per_batch, "
                                      "in units of --micro_batch_size examples (independent of the rank count).")
    eval_examples: int = option(0, "Hold out the last N examples (never trained on) for an eval loss; 0 = no eval.")
    data_workers: int = option(2, "Background processes that read, mask and collate the next micro batches while the "
                               "accelerator computes (pinned memory, non-blocking copies); 0 = prepare each batch "
                               "in the training process, in the step's time.")
    verify_data_sha256: bool = option(True, "At start-up, check every data shard's sha256 against the manifest "
                                      "(sizes and row counts are always checked); about a minute per 100 GB.")


@dataclass(kw_only=True)
class OptimizationOptions:
    """Optimization: batch sizes, steps, learning-rate schedule, regularization."""

    micro_batch_size: int = option(8, "Examples per rank per forward pass (UER-py: --batch_size).")
    gradient_accumulation_steps: int = option(1, "Micro batches per optimizer step.")
    global_batch_size: int = option(0, "Examples per optimizer step over all ranks; 0 derives it as "
                                    "micro_batch_size x gradient_accumulation_steps x ranks (and checks it if set).")
    total_steps: int = option(1000, "Optimizer steps to train for (UER-py: --total_steps).")
    learning_rate: float = option(1e-4, "Peak learning rate.")
    warmup_steps: int = option(100, "Linear warmup steps from 0 to the peak learning rate.")
    lr_decay: Literal["linear", "cosine", "constant"] = option("linear", "Decay after warmup, to min_lr_ratio x peak.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak.")
    weight_decay: float = option(0.01, "Decoupled weight decay (not applied to biases and norms).")
    decoder_input_dropout: float = option(
        0.0, "Fraction of the decoder's teacher-forced input tokens replaced by [MASK] at step 0, falling linearly "
        "to 0 at --decoder_input_dropout_steps (word dropout, Bowman et al. 2016). The labels are unchanged: a "
        "decoder that cannot predict from its own prefix alone learns early to read the source through "
        "cross-attention, which small models on a short budget otherwise learn late. 0 = off (the papers' recipe).")
    decoder_input_dropout_steps: int = option(
        0, "Step at which --decoder_input_dropout reaches 0; 0 = keep it constant for the whole run.")
    max_skipped_steps: int = option(100, "fp16: stop when this many optimizer steps in a row were skipped for "
                                    "overflow (the loss scale cannot recover); the last good checkpoint stays.")


@dataclass(kw_only=True)
class CheckpointOptions:
    """Checkpointing: how often the run saves and how many checkpoints it keeps."""

    save_checkpoint_steps: int = option(500, "Save a checkpoint every N steps (and at the end).")
    keep_last_checkpoints: int = option(3, "Checkpoints kept; older ones are deleted after a new one is complete.")


@dataclass(kw_only=True)
class LoggingOptions:
    """Logging: metrics, evaluation and progress."""

    log_every_steps: int = option(10, "Log loss, learning rate, gradient norm and throughput every N steps.")
    eval_every_steps: int = option(500, "Compute the eval loss every N steps (and at the end) when --eval_examples.")
    progress: bool = option(True, "Show a progress bar on rank 0.")
    peak_tflops: float = option(0.0, "Peak dense bf16 TFLOP/s of one device for MFU; 0 = the data-sheet figure of "
                                "the exact product (pipeline/flops.py: H100 SXM 989, PCIe 756, NVL 835, A100 312, "
                                "...), no MFU on other devices.")
    record_example_ids: bool = option(False, "Write the example indices each rank trains on, per step, to "
                                      "example_ids_rank<R>.jsonl (to audit data order and resume).")


@dataclass(kw_only=True)
class RunOptions:
    """Run: the output directory, the model, the engine and reproducibility."""

    output_dir: Path = required("Run directory: configs, vocab, metrics.jsonl and checkpoints/.")
    model_config: str = option("bart-tiny", "Packaged config name (bart-tiny, bart-mini, bart-medium, bart-base, "
                               "pegasus-tiny, pegasus-mini, pegasus-base) or a path to an HF config.json.")
    deepspeed_config: Path = option(Path("ds_configs/zero2_bf16.json"),
                                    "DeepSpeed JSON config; 'auto' batch sizes and optimizer values are filled in.")
    seed: int = option(7, "Seed for initialization, data order and dropout.")
    init_from: Path | None = option(None, "HF model directory to start from instead of random weights (an export of "
                                    "this pipeline or a published model such as uer/pegasus-base-chinese-"
                                    "cluecorpussmall); its config.json replaces --model_config.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (HF gradient_checkpointing).")
    compile: bool = option(False, "torch.compile each encoder and decoder layer (in place: checkpoints and exports "
                                  "are unchanged). Off by default until measured on a GPU; the first steps compile.")
    deterministic: bool = option(False, "Deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS "
                                 "workspace config; slower): bitwise-reproducible GPU runs, e.g. to audit a resume.")
    allow_cpu_mixed_precision: bool = option(False, "Let a bf16/fp16 DeepSpeed config run on DeepSpeed's CPU "
                                             "accelerator (emulated, slow: for debugging only).")
    local_rank: int = option(-1, "Set by the deepspeed launcher; leave it alone.")


# The sections are bases listed last first: a dataclass takes its bases' fields from the last base on, so the
# fields (and --help's headings) come in the order run, data, optimization, checkpointing, logging.
@dataclass(kw_only=True)
class TrainConfig(LoggingOptions, CheckpointOptions, OptimizationOptions, DataOptions, RunOptions):
    """Pretrain a BART or PEGASUS model with DeepSpeed ZeRO stage 2."""

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (not self.data_dirs):
            raise UserError("give the training data as --data_dir DIR or as --data_dirs PATH:WEIGHT ..., not both")
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
        self.output_dir = Path(self.output_dir)
        if self.data_dirs:
            self.data_dirs = [str(entry) for entry in self.data_dirs]
            parse_mixture(self.data_dirs)  # bad entries fail here, before anything starts
            if self.group_by_length or self.max_tokens_per_batch:
                raise UserError("--group_by_length / --max_tokens_per_batch are not supported with --data_dirs yet "
                                "(a mixture index changes example from epoch to epoch); use fixed-size batches")
        self.deepspeed_config = Path(self.deepspeed_config)
        if self.online_mask_config is not None:
            self.online_mask_config = Path(self.online_mask_config)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        positive = ("micro_batch_size", "gradient_accumulation_steps", "total_steps", "save_checkpoint_steps",
                    "keep_last_checkpoints", "log_every_steps", "eval_every_steps", "length_group_window",
                    "max_skipped_steps")
        problems = [f"--{name} must be positive" for name in positive if getattr(self, name) <= 0]
        if self.eval_examples < 0 or self.max_tokens_per_batch < 0 or self.data_workers < 0:
            problems.append("--eval_examples, --max_tokens_per_batch and --data_workers must be >= 0")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append("--learning_rate must be positive, --warmup_steps >= 0, --min_lr_ratio in [0, 1]")
        if not 0 <= self.decoder_input_dropout <= 1 or self.decoder_input_dropout_steps < 0:
            problems.append("--decoder_input_dropout must be in [0, 1] and --decoder_input_dropout_steps >= 0")
        if self.weight_decay < 0 or self.peak_tflops < 0 or self.global_batch_size < 0 or self.seed < 0:
            problems.append("--weight_decay, --peak_tflops, --global_batch_size and --seed must be >= 0")
        if problems:
            raise UserError("; ".join(problems))


def data_paths(config: TrainConfig) -> list[Path]:
    """The corpus directories of the run: --data_dir, or every corpus of --data_dirs."""
    if config.data_dir is not None:
        return [config.data_dir]
    return [spec.path for spec in parse_mixture(config.data_dirs)]


def data_label(config: TrainConfig) -> str:
    """How messages name the training data."""
    return str(config.data_dir) if config.data_dir is not None else "--data_dirs " + " ".join(config.data_dirs)


def read_previous_config(config: TrainConfig) -> dict | None:
    """The ``train_config.json`` of the run directory when it holds a checkpoint to continue, else None
    (without one, nothing would be resumed and the flags may change)."""
    previous = config.output_dir / TRAIN_CONFIG_FILE
    if not previous.is_file() or not (config.output_dir / "checkpoints" / "latest").is_file():
        return None
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{previous} is not valid JSON ({error}); it was written by zh-train: restore it, or use a "
                        "new --output_dir") from error
    if not isinstance(old, dict):
        raise UserError(f"{previous} is not a JSON object; restore it, or use a new --output_dir")
    return old


def resumable_problem(config: TrainConfig, previous: dict | None) -> str | None:
    """Why a run directory whose checkpoint was trained with the flags ``previous`` cannot be continued with
    these (the flags that define its data, model and data order differ), or None."""
    if previous is None:
        return None
    resolved = config_to_dict(config)
    # A run directory written before a flag existed used that flag's default.
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainConfig) if not f.metadata.get("required")}
    changed = [key for key in RUN_DEFINING_FLAGS if previous.get(key, defaults[key]) != resolved[key]]
    if not changed:
        return None
    return (f"{config.output_dir} holds a run with different {', '.join(changed)}; use a new --output_dir or the "
            "original flags to resume")
