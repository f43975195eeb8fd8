"""Stage 4, train: DeepSpeed ZeRO-2 pretraining of BART / PEGASUS on the mask stage's examples.

Run it under any launcher (``deepspeed``, ``torchrun``) or as a single process. The
output directory holds everything the export needs: the resolved configs, the vocab,
and ``checkpoints/<tag>`` with ``checkpoints/latest`` replaced atomically only after
every rank has finished writing. Relaunching the same command resumes from ``latest``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError, file_sha256, write_json_atomic, write_text_atomic
from pipeline.flops import peak_flops_per_device, training_flops

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"


@dataclass(kw_only=True)
class TrainConfig:
    """Pretrain a BART or PEGASUS model with DeepSpeed ZeRO stage 2."""

    data_dir: Path = required("Output directory of the mask stage (examples-*.arrow), or of the tokenize stage "
                              "to mask online (with --online_mask_config).")
    online_mask_config: Path | None = option(None, "JSON of mask flags (e.g. {\"preset\": \"pegasus_paper\", "
                                             "\"seq_length\": 512}) to mask a tokenized corpus on the fly: "
                                             "fresh masks every epoch, nothing stored.")
    output_dir: Path = required("Run directory: configs, vocab, metrics.jsonl and checkpoints/.")
    model_config: str = option("bart-tiny", "Packaged config name (bart-tiny, bart-medium, bart-base, "
                               "pegasus-tiny, pegasus-base) or a path to an HF config.json.")
    deepspeed_config: Path = option(Path("ds_configs/zero2_bf16.json"),
                                    "DeepSpeed JSON config; 'auto' batch sizes and optimizer values are filled in.")
    micro_batch_size: int = option(8, "Examples per rank per forward pass (UER-py: --batch_size).")
    gradient_accumulation_steps: int = option(1, "Micro batches per optimizer step.")
    group_by_length: bool = option(False, "Put examples of similar length in the same micro batch (sorted within "
                                   "windows of --length_group_window micro batches' worth of examples, batches shuffled "
                                   "again) so less compute goes to padding.")
    max_tokens_per_batch: int = option(0, "Token budget: a micro batch holds at most this many padded source + "
                                       "target tokens (and at most --micro_batch_size examples); implies "
                                       "--group_by_length. Examples per step then vary; 0 = fixed-size batches.")
    length_group_window: int = option(100, "Window sorted by length for --group_by_length / --max_tokens_per_batch, "
                                      "in units of --micro_batch_size examples (independent of the rank count).")
    global_batch_size: int = option(0, "Examples per optimizer step over all ranks; 0 derives it as "
                                    "micro_batch_size x gradient_accumulation_steps x ranks (and checks it if set).")
    total_steps: int = option(1000, "Optimizer steps to train for (UER-py: --total_steps).")
    learning_rate: float = option(1e-4, "Peak learning rate.")
    warmup_steps: int = option(100, "Linear warmup steps from 0 to the peak learning rate.")
    lr_decay: Literal["linear", "cosine", "constant"] = option("linear", "Decay after warmup, to min_lr_ratio x peak.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak.")
    weight_decay: float = option(0.01, "Decoupled weight decay (not applied to biases and norms).")
    seed: int = option(7, "Seed for initialization, data order and dropout.")
    save_checkpoint_steps: int = option(500, "Save a checkpoint every N steps (and at the end).")
    keep_last_checkpoints: int = option(3, "Checkpoints kept; older ones are deleted after a new one is complete.")
    max_skipped_steps: int = option(100, "fp16: stop when this many optimizer steps in a row were skipped for "
                                    "overflow (the loss scale cannot recover); the last good checkpoint stays.")
    eval_examples: int = option(0, "Hold out the last N examples (never trained on) for an eval loss; 0 = no eval.")
    eval_every_steps: int = option(500, "Compute the eval loss every N steps (and at the end) when --eval_examples.")
    log_every_steps: int = option(10, "Log loss, learning rate, gradient norm and throughput every N steps.")
    init_from: Path | None = option(None, "HF model directory to start from instead of random weights (an export of "
                                    "this pipeline or a published model such as uer/pegasus-base-chinese-"
                                    "cluecorpussmall); its config.json replaces --model_config.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (HF gradient_checkpointing).")
    progress: bool = option(True, "Show a progress bar on rank 0.")
    peak_tflops: float = option(0.0, "Peak dense TFLOP/s of one device for MFU; 0 = known GPUs' figure "
                                "(H100 989, A100 312), no MFU on other devices.")
    record_example_ids: bool = option(False, "Write the example indices each rank trains on, per step, to "
                                      "example_ids_rank<R>.jsonl (to audit data order and resume).")
    local_rank: int = option(-1, "Set by the deepspeed launcher; leave it alone.")

    def __post_init__(self) -> None:
        self.data_dir, self.output_dir = Path(self.data_dir), Path(self.output_dir)
        self.deepspeed_config = Path(self.deepspeed_config)
        if self.online_mask_config is not None:
            self.online_mask_config = Path(self.online_mask_config)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        positive = ("micro_batch_size", "gradient_accumulation_steps", "total_steps", "save_checkpoint_steps",
                    "keep_last_checkpoints", "log_every_steps", "eval_every_steps", "length_group_window")
        problems = [f"--{name} must be positive" for name in positive if getattr(self, name) <= 0]
        if self.eval_examples < 0 or self.max_tokens_per_batch < 0:
            problems.append("--eval_examples and --max_tokens_per_batch must be >= 0")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append("--learning_rate must be positive, --warmup_steps >= 0, --min_lr_ratio in [0, 1]")
        if problems:
            raise UserError("; ".join(problems))


# -- pure pieces ------------------------------------------------------------------------------


def skip_streak(skipped_before: int, skipped_now: int, streak: int) -> int:
    """Consecutive optimizer steps skipped (fp16 overflow): grows while DeepSpeed's counter
    grows, back to 0 after a step that was applied."""
    return streak + 1 if skipped_now > skipped_before else 0


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


def resolve_batch_sizes(config: TrainConfig, ds_config: dict, world_size: int, source: str) -> dict:
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


def load_ds_config(path: Path) -> tuple[dict, Path]:
    """Read a DeepSpeed config given relative to the working directory or the project."""
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8")), candidate
            except ValueError as error:
                raise UserError(f"DeepSpeed config {candidate} is not valid JSON: {error}") from error
    raise UserError(f"DeepSpeed config {path} not found; pass --deepspeed_config (see ds_configs/)")


# -- distributed setup ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_rank_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE from Slurm's variables when no launcher set them.

    DeepSpeed 0.19 does not read SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; under ``srun``
    with one task per GPU these are exactly the global rank, local rank and world size.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
    }


def launcher_world_size() -> int:
    """Number of ranks the launcher started (deepspeed/torchrun: WORLD_SIZE; Slurm: SLURM_NTASKS)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under deepspeed/torchrun/Slurm, or a 1-process group."""
    import deepspeed

    os.environ.update(slurm_rank_env(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_init_required=True)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_problem(tag_dir: Path) -> str | None:
    """What makes a checkpoint directory unusable, or None when it is complete."""
    if not tag_dir.is_dir():
        return "does not exist"
    state_file = tag_dir / TRAINER_STATE
    if not state_file.is_file():
        return f"has no {TRAINER_STATE} (it was never completed)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except ValueError:
        return f"has an unreadable {TRAINER_STATE}"
    if state.get("universal"):
        return None if (tag_dir / "zero").is_dir() else "is a universal checkpoint without its zero/ folder"
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        return "is missing mp_rank_00_model_states.pt"
    partitions = len(list(tag_dir.glob("*optim_states.pt")))
    if state.get("world_size") and partitions != state["world_size"]:
        return f"has {partitions} optimizer partitions but was written by {state['world_size']} ranks"
    return None


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


def save_checkpoint(engine: Any, config: TrainConfig, trainer_state: dict, rank: int) -> str:
    """Write the checkpoint under its tag, wait for every rank, then move ``latest`` to it."""
    import torch.distributed as dist

    root = config.output_dir / CHECKPOINTS
    tag = f"step{trainer_state['step']:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": trainer_state}, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_state_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_json_atomic(root / tag / TRAINER_STATE, trainer_state)  # marks the tag complete
        write_text_atomic(root / LATEST, tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: -config.keep_last_checkpoints]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


# -- the run -------------------------------------------------------------------------------------


def check_resumable(config: TrainConfig) -> None:
    """A run directory can only be continued with the flags that define its data and model."""
    previous = config.output_dir / "train_config.json"
    if not previous.is_file():
        return
    old, resolved = json.loads(previous.read_text(encoding="utf-8")), config_to_dict(config)
    # Batching flags added later: a run directory written before them used their defaults.
    batching = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.name in ("group_by_length", "max_tokens_per_batch", "length_group_window")}
    changed = [k for k in ("data_dir", "model_config", "micro_batch_size", "seed", *batching)
               if old.get(k, batching.get(k)) != resolved[k]]
    if changed:
        raise UserError(
            f"{config.output_dir} holds a run with different {', '.join(changed)}; "
            "use a new --output_dir or the original flags to resume"
        )


def prepare_run_dir(config: TrainConfig, data_manifest: dict, model_config: Any, ds_config: dict) -> None:
    """Rank 0 writes what the export and a resume need."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.output_dir / "train_config.json", config_to_dict(config))
    write_json_atomic(config.output_dir / "ds_config.json", ds_config)
    model_config.to_json_file(config.output_dir / MODEL_CONFIG_FILE)
    shutil.copyfile(config.data_dir / VOCAB_FILE, config.output_dir / VOCAB_FILE)
    write_json_atomic(config.output_dir / "data_manifest.json", data_manifest)


def check_init_from(model_dir: Path, vocab: dict, data_dir: Path) -> None:
    """The model to continue from must use the vocab the training data was tokenized with."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"--init_from {model_dir} has no config.json; pass an exported or published HF model directory")
    model_values = json.loads(config_file.read_text(encoding="utf-8"))
    if model_values.get("model_type") not in ("bart", "pegasus"):
        raise UserError(f"{config_file}: model_type {model_values.get('model_type')!r} is not bart or pegasus")
    if model_values.get("vocab_size") != vocab["size"]:
        raise UserError(
            f"{config_file} has vocab_size {model_values.get('vocab_size')} but {data_dir} was tokenized with "
            f"{vocab['size']} tokens ({vocab['source']}); tokenize with the model's vocab.txt"
        )
    model_vocab = model_dir / VOCAB_FILE
    if model_vocab.is_file() and file_sha256(model_vocab) != vocab["sha256"]:
        raise UserError(f"{model_vocab} differs from the vocab {data_dir} was tokenized with ({vocab['source']}); "
                        "tokenize with the model's vocab.txt")


def load_training_data(config: TrainConfig) -> Any:
    """Stored examples (a mask stage output) or online masking (a tokenize stage output)."""
    from data_tools.mask import MaskConfig
    from data_tools.shards import load_manifest
    from pipeline.data import ExampleShards, OnlineMaskedExamples

    stage = load_manifest(config.data_dir, ("mask", "tokenize"))["stage"]
    if stage == "mask":
        if config.online_mask_config:
            raise UserError(f"{config.data_dir} holds masked examples; --online_mask_config needs a tokenize output")
        return ExampleShards(config.data_dir)
    if not config.online_mask_config:
        raise UserError(f"{config.data_dir} is a tokenized corpus: pass --online_mask_config to mask it on the fly, "
                        "or run the mask stage first")
    try:
        flags = json.loads(Path(config.online_mask_config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--online_mask_config {config.online_mask_config}: {error}") from error
    unknown = set(flags) - {f.name for f in dataclasses.fields(MaskConfig)} | ({"input_dir", "output_dir"} & set(flags))
    if unknown:
        raise UserError(f"{config.online_mask_config}: unknown or not allowed mask flags {sorted(unknown)}")
    mask_config = MaskConfig(input_dir=config.data_dir, output_dir=config.output_dir, **flags)
    return OnlineMaskedExamples(config.data_dir, mask_config)


def train(config: TrainConfig) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pipeline.data import ResumableDistributedSampler, Seq2SeqCollator
    from pipeline.model import build_model, load_model_config, use_fused_layer_norm, weight_decay_groups

    dataset = load_training_data(config)  # validates the data before any process group exists
    vocab = dataset.manifest["vocab"]
    vocab_path = config.data_dir / VOCAB_FILE
    if not vocab_path.is_file() or file_sha256(vocab_path) != vocab["sha256"]:
        raise UserError(f"{vocab_path} is missing or differs from the vocab the examples were tokenized with")
    raw_ds_config, ds_config_path = load_ds_config(config.deepspeed_config)
    check_resumable(config)
    # Checked before any process group exists, so a bad config fails fast on every rank.
    ds_config = resolve_batch_sizes(config, raw_ds_config, launcher_world_size(), str(ds_config_path))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and ds_config.get("fp16", {}).get("enabled"):
        raise UserError(f"{ds_config_path}: fp16 needs a GPU; use ds_configs/cpu_zero2.json on a CPU machine")

    if config.init_from is not None:
        check_init_from(config.init_from, vocab, config.data_dir)

    rank, world_size, _ = init_distributed()

    if config.init_from is not None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(str(config.init_from))
    else:
        model_config = load_model_config(config.model_config, vocab["size"], vocab["special_token_ids"])
    if rank == 0:
        prepare_run_dir(config, dataset.manifest, model_config, ds_config)
    dist.barrier()

    seed_everything(config.seed)
    if config.init_from is not None:
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(str(config.init_from), torch_dtype=torch.float32)
    else:
        model = build_model(model_config)
    norm_kernel = use_fused_layer_norm(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    def schedule(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, config.total_steps, config.warmup_steps, config.lr_decay, config.min_lr_ratio))

    checkpoint_root = config.output_dir / CHECKPOINTS
    tag = find_resume_tag(checkpoint_root)
    saved_state = {} if tag is None else json.loads(
        (checkpoint_root / tag / TRAINER_STATE).read_text(encoding="utf-8"))
    if saved_state.get("universal"):  # written by zh-to-universal: loadable on any number of ranks
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, config.weight_decay),
        lr_scheduler=schedule,
        config=ds_config,
    )
    state = {"step": 0, "consumed_samples": 0}
    if tag is not None:
        load_path, _ = engine.load_checkpoint(str(checkpoint_root), tag=tag)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load {checkpoint_root / tag}; point {checkpoint_root / LATEST} "
                            "at an earlier tag")
        state = {key: saved_state[key] for key in ("step", "consumed_samples")}
        if "data_position" in saved_state:
            state["data_position"] = saved_state["data_position"]
        rng_file = checkpoint_root / tag / f"rng_state_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
    if rank == 0:
        precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
        print(
            f"train: {type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
            f"ZeRO stage {engine.zero_optimization_stage()} {precision} on {world_size} x "
            f"{accelerator.device_name()} | optimizer {type(getattr(optimizer, 'optimizer', optimizer)).__name__} | "
            f"layer norm {norm_kernel} | global batch {ds_config['train_batch_size']} | "
            + (f"resuming from {tag} (step {state['step']})" if tag else "fresh start"),
            file=sys.stderr,
        )
    if config.eval_examples >= len(dataset):
        raise UserError(f"--eval_examples {config.eval_examples} leaves nothing to train on ({len(dataset)} examples)")
    train_examples = len(dataset) - config.eval_examples
    grouped = config.group_by_length or config.max_tokens_per_batch > 0
    sampler = ResumableDistributedSampler(
        train_examples, config.micro_batch_size, rank, world_size, config.seed, state["consumed_samples"],
        lengths=dataset.lengths()[:train_examples] if grouped else None, max_tokens=config.max_tokens_per_batch,
        group_window=config.length_group_window, position=state.get("data_position"),
    )
    state["data_position"] = sampler.state()
    if rank == 0:
        left_out = sampler.dropped_in_epoch(sampler.epoch)
        per_rank = sampler.groups_in_epoch(sampler.epoch)
        print(f"train: {train_examples} training examples; this epoch: {per_rank} micro batches per rank "
              f"(~{per_rank // config.gradient_accumulation_steps} optimizer steps), {left_out} examples of its "
              "ragged tail left out"
              + (f"; {config.eval_examples} held out for eval" if config.eval_examples else ""), file=sys.stderr)
    collate = Seq2SeqCollator(pad_id=model_config.pad_token_id, decoder_start_id=model_config.decoder_start_token_id)

    def eval_batches() -> Iterator[dict]:
        """This rank's share of the held-out examples (epoch-0 masks), in micro batches."""
        held_out = list(range(train_examples + rank, len(dataset), world_size))
        for start in range(0, len(held_out), config.micro_batch_size):
            indices = held_out[start : start + config.micro_batch_size]
            yield {k: v.to(engine.device) for k, v in collate([dataset.example(i, 0) for i in indices]).items()}

    batches = ((indices, {k: v.to(engine.device) for k, v in
                          collate([dataset.example(i, sampler.epoch) for i in indices]).items()})
               for indices in sampler)
    # Steps after the checkpoint we resumed from are trained again: drop their old records.
    truncate_records(config.output_dir / f"example_ids_rank{rank}.jsonl", state["step"], config.record_example_ids)
    metrics = MetricsLog(config.output_dir, enabled=rank == 0)
    metrics.truncate(state["step"])
    fit(engine, scheduler, batches, sampler, config, state, rank, world_size, metrics, eval_batches)
    return state


def truncate_records(path: Path, last_step: int, enabled: bool) -> None:
    """Keep the JSONL records of steps up to ``last_step`` (atomically)."""
    if not enabled or not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def fit(engine: Any, scheduler: Any, batches: Iterator[tuple[list[int], dict]], sampler: Any, config: TrainConfig,
        state: dict, rank: int, world_size: int, metrics: "MetricsLog", eval_batches: Any = None) -> None:
    """The loop: forward, backward, step; logging and checkpoints on their schedules."""
    import torch.distributed as dist
    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=state["step"], desc="train", unit=" steps", file=sys.stderr,
               disable=rank != 0 or not config.progress, mininterval=1.0)
    window = {"loss": 0.0, "tokens": 0, "padded": 0, "flops": 0.0, "start": time.perf_counter(), "steps": 0,
              "samples": 0}
    skipped = {"total": engine.skipped_steps, "streak": 0}
    model_config = engine.module.config
    engine.train()
    while state["step"] < config.total_steps:
        step_example_ids = []
        for _ in range(config.gradient_accumulation_steps):
            example_ids, batch = next(batches)
            step_example_ids.extend(example_ids)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.detach().float().item()  # device-to-host sync, once per micro batch
            source_lengths = batch["attention_mask"].sum(dim=1).cpu().numpy()
            target_lengths = (batch["labels"] != -100).sum(dim=1).cpu().numpy()
            window["tokens"] += int(source_lengths.sum() + target_lengths.sum())
            window["padded"] += batch["input_ids"].numel() + batch["labels"].numel()
            window["flops"] += training_flops(model_config, source_lengths, target_lengths)
        state["step"] += 1
        window["samples"] += sampler.consumed_samples - state["consumed_samples"]
        state["consumed_samples"], state["data_position"] = sampler.consumed_samples, sampler.state()
        window["steps"] += 1
        if config.record_example_ids:
            with open(config.output_dir / f"example_ids_rank{rank}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state["step"], "example_ids": step_example_ids}) + "\n")
        bar.update(1)
        skipped["streak"] = skip_streak(skipped["total"], engine.skipped_steps, skipped["streak"])
        skipped["total"] = engine.skipped_steps
        if skipped["streak"] > config.max_skipped_steps:
            raise UserError(
                f"{skipped['streak']} optimizer steps in a row were skipped for fp16 overflow (step {state['step']}); "
                f"stopping with the last good checkpoint in {config.output_dir / CHECKPOINTS} intact; "
                "lower --learning_rate or use ds_configs/zero2_bf16.json"
            )
        maybe_log(engine, scheduler, config, state, window, rank, world_size, bar, metrics)
        maybe_evaluate(engine, eval_batches, config, state, rank, metrics)
        if state["step"] % config.save_checkpoint_steps == 0 or state["step"] == config.total_steps:
            save_checkpoint(engine, config, {**state, "world_size": world_size}, rank)
    bar.close()
    dist.barrier()


def maybe_evaluate(engine: Any, eval_batches: Any, config: TrainConfig, state: dict, rank: int,
                   metrics: "MetricsLog") -> None:
    """Token-weighted loss over the held-out examples of every rank, logged as eval_loss."""
    import torch.distributed as dist

    if not config.eval_examples or (state["step"] % config.eval_every_steps and state["step"] != config.total_steps):
        return
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for batch in eval_batches():
            tokens = (batch["labels"] != -100).sum()
            totals += torch.stack([engine(**batch).loss.detach().double().cpu() * tokens.cpu(), tokens.double().cpu()])
    engine.train()
    dist.all_reduce(totals)
    eval_loss = (totals[0] / totals[1]).item()
    metrics.append({"step": state["step"], "eval_loss": eval_loss, "eval_tokens": int(totals[1].item())})
    if rank == 0:
        print(f"step {state['step']}: eval loss {eval_loss:.4f} over {int(totals[1].item())} target tokens",
              file=sys.stderr)


def maybe_log(engine: Any, scheduler: Any, config: TrainConfig, state: dict, window: dict, rank: int,
              world_size: int, bar: Any, metrics: "MetricsLog") -> None:
    import torch.distributed as dist

    if state["step"] % config.log_every_steps and state["step"] != config.total_steps:
        return
    totals = torch.tensor([window["loss"], float(window["tokens"]), window["flops"], float(window["padded"])],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    micro_batches = window["steps"] * config.gradient_accumulation_steps * world_size
    loss = totals[0].item() / max(1, micro_batches)
    if not math.isfinite(loss):
        raise UserError(
            f"loss is {loss} at step {state['step']}; stopping before it reaches a checkpoint "
            f"(the last good one stays in {config.output_dir / CHECKPOINTS}); lower --learning_rate"
        )
    elapsed = time.perf_counter() - window["start"]
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": state["step"],
        "loss": loss,  # full precision: resume tests compare it bitwise
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": round(totals[1].item() / elapsed, 1),
        "samples_per_s": round(window["samples"] / elapsed, 2),
        "consumed_samples": state["consumed_samples"],
        "model_tflops_per_s": round(totals[2].item() / elapsed / 1e12, 4),
        "pad_fraction": round(1.0 - totals[1].item() / max(1.0, totals[3].item()), 4),
    }
    if torch.cuda.is_available():
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    if engine.fp16_enabled():  # dynamic loss scaling: a falling scale and skipped steps mean overflow
        record["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", float("nan")))
        record["skipped_steps"] = int(engine.skipped_steps)
    peak = peak_flops_per_device(config.peak_tflops, device_name())
    if peak:
        record["mfu"] = round(totals[2].item() / elapsed / (world_size * peak), 4)
    metrics.append(record)
    if rank == 0:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        if not config.progress:
            mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
            print(f"step {record['step']}: loss {loss:.4f} lr {record['lr']:.3e} grad norm {record['grad_norm']} "
                  f"{record['tokens_per_s']:.0f} tokens/s {record['model_tflops_per_s']} model TFLOP/s{mfu}",
                  file=sys.stderr)
    window.update(loss=0.0, tokens=0, padded=0, flops=0.0, start=time.perf_counter(), steps=0, samples=0)


def device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


class MetricsLog:
    """Rank 0's metric records: ``metrics.jsonl`` (every field, full precision), ``metrics.csv``
    (fixed columns, for spreadsheets and pandas) and TensorBoard scalars when installed.

    DeepSpeed's own monitor writes no loss series, so the trainer keeps its own.
    """

    CSV_COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s",
                   "samples_per_s", "consumed_samples", "model_tflops_per_s", "mfu", "pad_fraction", "eval_tokens")

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.jsonl, self.csv = output_dir / "metrics.jsonl", output_dir / "metrics.csv"
        self.enabled = enabled
        self.tensorboard: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                pass

    def truncate(self, last_step: int) -> None:
        """Drop records of steps after ``last_step`` (a resumed run trains them again)."""
        truncate_records(self.jsonl, last_step, self.enabled)
        if self.enabled and self.csv.is_file():
            header, *rows = self.csv.read_text(encoding="utf-8").splitlines()
            kept = [row for row in rows if int(row.split(",", 1)[0]) <= last_step]
            write_text_atomic(self.csv, "".join(line + "\n" for line in [header, *kept]))

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        new_file = not self.csv.is_file()
        with open(self.csv, "a", encoding="utf-8") as handle:
            if new_file:
                handle.write(",".join(self.CSV_COLUMNS) + "\n")
            handle.write(",".join("" if record.get(c) is None else repr(record[c]) for c in self.CSV_COLUMNS) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
            self.tensorboard.flush()


def main(argv: list[str] | None = None) -> int:
    return run_stage(train, TrainConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
