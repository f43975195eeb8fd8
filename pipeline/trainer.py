"""Stage 4, train: DeepSpeed ZeRO-2 pretraining of BART / PEGASUS on the mask stage's examples.

Run it under any launcher (``deepspeed``, ``torchrun``, ``srun``) or as a single process. The
output directory holds everything the export needs: the resolved configs, the vocab,
and ``checkpoints/<tag>`` with ``checkpoints/latest`` replaced atomically only after
every rank has finished writing. Relaunching the same command resumes from ``latest``.

This module wires the parts together and reads top to bottom: :func:`train` sets up (data,
DeepSpeed config, process group, model, engine, resume), :func:`fit` is the loop, and the
``maybe_*`` helpers log, evaluate and save on their schedules. The parts: ``train_config``
(flags), ``ds_config`` (DeepSpeed config, batch sizes, schedule), ``distributed`` (process
group, Slurm, seeding, hardware and storage checks), ``checkpointing`` (layout, resume, RNG),
``batch_loader`` (batches prepared ahead), ``metrics`` (typed window, log files), ``loss``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data_tools.cli import config_to_dict, run_stage
from data_tools.common import VOCAB_FILE, UserError, write_json_atomic
from data_tools.outputs import check_apart
from pipeline.batch_loader import LoadedBatch, micro_batches
from pipeline.checkpointing import (
    CHECKPOINTS,
    MODEL_CONFIG_FILE,
    TrainerState,
    find_resume_tag,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from pipeline.collate import DecoderInputDropout
from pipeline.distributed import (
    Ranks,
    check_accelerator,
    check_shared_run_dir,
    init_distributed,
    launcher_world_size,
    seed_everything,
    use_deterministic_kernels,
    warn_stale_extension_locks,
)
from pipeline.ds_config import load_ds_config, lr_schedule, mixed_precision, resolve_batch_sizes
from pipeline.flops import peak_flops_per_device, training_flops
from pipeline.loss import IGNORE_INDEX, seq2seq_loss, with_label_positions
from pipeline.metrics import MetricsLog, MetricsWindow, truncate_records
from pipeline.plot import PLOT_FILE, plot_run
from pipeline.train_config import TRAIN_CONFIG_FILE, TrainConfig, check_resumable, data_label, data_paths

DS_CONFIG_FILE = "ds_config.json"
DATA_MANIFEST_FILE = "data_manifest.json"
# Every file the trainer writes at the top of a run directory.
RUN_FILES = (TRAIN_CONFIG_FILE, DS_CONFIG_FILE, MODEL_CONFIG_FILE, VOCAB_FILE, DATA_MANIFEST_FILE,
             "metrics.jsonl", "metrics.csv", "tensorboard", PLOT_FILE, CHECKPOINTS)

# -- set-up --------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainerState:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pipeline.collate import Seq2SeqCollator
    from pipeline.sampler import ResumableDistributedSampler
    from pipeline.model import check_init_from, check_positions, weight_decay_groups

    # Everything that can be checked before a process group exists is, so bad input fails fast on every rank
    # and a failed start leaves the run directory as it was.
    check_run_dir(config)
    dataset = load_run_data(config)
    vocab = dataset.manifest["vocab"]
    if config.eval_examples >= len(dataset):
        raise UserError(f"--eval_examples {config.eval_examples} leaves nothing to train on ({len(dataset)} examples)")
    raw_ds_config, ds_config_path = load_ds_config(config.deepspeed_config)
    check_resumable(config)
    world_size = launcher_world_size()
    ds_config = resolve_batch_sizes(config, raw_ds_config, world_size, str(ds_config_path))
    if config.init_from is not None:
        check_init_from(config.init_from, vocab, data_label(config))
    model_config = run_model_config(config, vocab)
    check_positions(dataset.max_lengths(), model_config, data_label(config))
    checkpoint_root = config.output_dir / CHECKPOINTS
    tag = find_resume_tag(checkpoint_root)
    saved = {} if tag is None else read_trainer_state(checkpoint_root / tag)
    if tag is not None:
        check_same_data(config, dataset.manifest)
    check_resume_world_size(saved, world_size, checkpoint_root / tag if tag else None, config)
    accelerator = get_accelerator()
    check_accelerator(accelerator, mixed_precision(ds_config), config.allow_cpu_mixed_precision, ds_config_path)
    warn_stale_extension_locks()
    if config.deterministic:
        use_deterministic_kernels()
    seed_everything(config.seed)
    model, norm_kernel = build_training_model(config, model_config, accelerator.device_name())

    ranks = init_distributed(accelerator)
    if ranks.is_main:
        prepare_run_dir(config, dataset.manifest, model_config, ds_config, resuming=tag is not None)
    dist.barrier()
    check_shared_run_dir(config.output_dir, ranks)

    if saved.get("universal"):
        # written by zh-to-universal: loadable on any number of ranks
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=weight_decay_groups(model, config.weight_decay),
        lr_scheduler=lr_schedule(config), config=ds_config)
    state = TrainerState() if tag is None else load_checkpoint(engine, checkpoint_root, tag, saved, ranks.rank,
                                                               accelerator)
    if ranks.is_main:
        # only now: a start that failed earlier must not make the corrected retry look like a resume
        write_json_atomic(config.output_dir / TRAIN_CONFIG_FILE, config_to_dict(config))
        precision = mixed_precision(ds_config)
        cpu_threads = f" ({torch.get_num_threads()} threads each)" if ranks.device.type == "cpu" else ""
        print(f"train: {type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
              f"ZeRO stage {engine.zero_optimization_stage()} {precision} on {ranks.world_size} x "
              f"{accelerator.device_name()}{cpu_threads} | optimizer {type(getattr(optimizer, 'optimizer', optimizer)).__name__} | "
              f"layer norm {norm_kernel} | global batch {ds_config['train_batch_size']} | data workers "
              f"{config.data_workers} | " + (f"resuming from {tag} (step {state.step})" if tag else "fresh start"),
              file=sys.stderr)

    train_examples = len(dataset) - config.eval_examples
    if ranks.is_main and config.data_dirs:
        print("train: mixture of " + ", ".join(
            f"{name} (weight {spec.weight:g}: {block} of every {dataset.epoch_examples} examples, {size} to train on)"
            for name, spec, block, size in zip(config_corpus_names(config), dataset.specs, dataset.block_sizes,
                                               dataset.train_sizes)), file=sys.stderr)
    grouped = config.group_by_length or config.max_tokens_per_batch > 0
    sampler = ResumableDistributedSampler(
        train_examples, config.micro_batch_size, ranks.rank, ranks.world_size, config.seed, state.consumed_samples,
        lengths=dataset.lengths()[:train_examples] if grouped else None, max_tokens=config.max_tokens_per_batch,
        group_window=config.length_group_window, position=state.data_position,
    )
    state.data_position = sampler.state()
    if ranks.is_main:
        per_rank = sampler.groups_in_epoch(sampler.epoch)
        print(f"train: {train_examples} training examples; this epoch: {per_rank} micro batches per rank "
              f"(~{per_rank // config.gradient_accumulation_steps} optimizer steps), "
              f"{sampler.dropped_in_epoch(sampler.epoch)} examples of its ragged tail left out"
              + (f"; {config.eval_examples} held out for eval" if config.eval_examples else ""), file=sys.stderr)
    collate = Seq2SeqCollator(pad_id=model_config.pad_token_id, decoder_start_id=model_config.decoder_start_token_id)

    def eval_batches() -> Iterator[dict]:
        """This rank's share of the held-out examples (epoch-0 masks), in micro batches."""
        held_out = list(range(train_examples + ranks.rank, len(dataset), ranks.world_size))
        for start in range(0, len(held_out), config.micro_batch_size):
            examples = [dataset.example(i, 0) for i in held_out[start : start + config.micro_batch_size]]
            yield {k: v.to(engine.device) for k, v in with_label_positions(collate(examples)).items()}

    batches = micro_batches(dataset, sampler.planned(), collate,
                            lambda source, target: training_flops(model_config, source, target),
                            config.data_workers, pin_memory=ranks.device.type == "cuda", seed=config.seed)
    # Steps after the checkpoint we resumed from are trained again: drop their old records.
    truncate_records(config.output_dir / f"example_ids_rank{ranks.rank}.jsonl", state.step, config.record_example_ids)
    metrics = MetricsLog(config.output_dir, enabled=ranks.is_main)
    metrics.truncate(state.step)
    peak = peak_flops_per_device(config.peak_tflops, device_name(accelerator))
    if ranks.is_main and peak is None and accelerator.device_name() != "cpu":
        print(f"train: no peak FLOP/s known for {device_name(accelerator)!r}: pass --peak_tflops for MFU",
              file=sys.stderr)
    decoder_dropout = DecoderInputDropout(config.decoder_input_dropout, config.decoder_input_dropout_steps,
                                          vocab["special_token_ids"]["[MASK]"], config.seed)
    fit(engine, scheduler, batches, config, state, ranks, metrics, eval_batches if config.eval_examples else None, peak,
        decoder_dropout if config.decoder_input_dropout > 0 else None)
    if ranks.is_main:
        write_loss_plot(config)
    return state


def load_run_data(config: TrainConfig) -> Any:
    """The training data: one corpus, or the weighted mixture of --data_dirs (vocabs checked equal)."""
    from pipeline.examples import load_training_data
    from pipeline.mixture import MixtureExamples, parse_mixture

    if config.data_dir is not None:
        return load_training_data(config.data_dir, config.online_mask_config, config.output_dir,
                                  config.verify_data_sha256)
    specs = parse_mixture(config.data_dirs)
    datasets = [load_training_data(spec.path, config.online_mask_config, config.output_dir, config.verify_data_sha256)
                for spec in specs]
    return MixtureExamples(datasets, specs, config.seed, config.eval_examples)


def write_loss_plot(config: TrainConfig) -> None:
    """loss.png in the run directory, or one line saying why not (the run itself succeeded)."""
    try:
        plot_run(config.output_dir, config.output_dir / PLOT_FILE)
    except UserError as error:
        print(f"train: {PLOT_FILE} not written: {error}", file=sys.stderr)


def run_model_config(config: TrainConfig, vocab: dict) -> Any:
    """The HF config: the --init_from model's, or a packaged/path config with the data's vocab and special ids."""
    from transformers import AutoConfig

    from pipeline.model import load_model_config

    if config.init_from is not None:
        return AutoConfig.from_pretrained(str(config.init_from))
    return load_model_config(config.model_config, vocab["size"], vocab["special_token_ids"])


def build_training_model(config: TrainConfig, model_config: Any, device_type: str) -> tuple[torch.nn.Module, str]:
    """The model to train (random init or --init_from weights) and the name of its layer-norm kernel."""
    from pipeline.model import build_model, load_hf_model, use_fused_layer_norm

    if config.init_from is not None:
        model = load_hf_model(config.init_from, "--init_from")
    else:
        model = build_model(model_config)
    norm_kernel = use_fused_layer_norm(model, device_type)
    if config.gradient_checkpointing:
        # Non-reentrant on every transformers version (4.x and 5.x default to different modes): it is
        # the mode torch recommends, and it works with inputs that need no grad and with ZeRO's hooks.
        non_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        model.config.use_cache = False
    if config.compile:
        compile_layers(model)
    return model, norm_kernel


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every encoder and decoder layer in place (``nn.Module.compile``: parameter names, and
    so checkpoints and exports, stay as they are). Per layer rather than the whole model: the loss hooks
    the LM head for each batch (pipeline/loss.py), which would make a whole-model graph recompile, and
    identical layers share one compiled graph. Returns the number of layers compiled."""
    inner = model.get_encoder(), model.get_decoder()
    layers = [layer for stack in inner for layer in stack.layers]
    for layer in layers:
        layer.compile()
    return len(layers)


def check_run_dir(config: TrainConfig) -> None:
    """The run directory is apart from the inputs, and either new, a run directory, or a folder holding none
    of the files the trainer writes (say, the launcher's log): the trainer never overwrites a file it did not write."""
    inputs = {f"--data_dirs {path}" if config.data_dirs else "--data_dir": path for path in data_paths(config)}
    check_apart(config.output_dir, "--output_dir", {**inputs, "--init_from": config.init_from,
                                                    "--online_mask_config": config.online_mask_config})
    directory = config.output_dir
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UserError(f"--output_dir {directory} is a file; give a directory for the run")
    if (directory / MODEL_CONFIG_FILE).is_file() and (directory / DS_CONFIG_FILE).is_file():
        return  # written by an earlier start of this trainer
    clashing = sorted(name for name in RUN_FILES if (directory / name).exists())
    if clashing:
        raise UserError(f"--output_dir {directory} is not a zh-train run directory but holds {', '.join(clashing)}, "
                        "which the trainer would overwrite; nothing was changed: choose a new --output_dir")


def check_resume_world_size(saved: dict, world_size: int, tag_dir: Path | None, config: TrainConfig) -> None:
    """A ZeRO-2 checkpoint holds one optimizer partition per rank: it loads only on as many ranks, unless
    zh-to-universal converted it."""
    written_by = saved.get("world_size")
    if tag_dir is None or saved.get("universal") or not written_by or written_by == world_size:
        return
    raise UserError(f"{tag_dir} was written by {written_by} ranks and this run has {world_size}: ZeRO-2 optimizer "
                    f"partitions load only on as many ranks; convert it once with `zh-to-universal --run_dir "
                    f"{config.output_dir}`, then relaunch on any number of ranks")


def check_same_data(config: TrainConfig, manifest: dict) -> None:
    """A run resumes only on the data it was trained on: same vocab, same shards (a regenerated corpus
    with another vocab would not even load; one with other examples would not resume exactly)."""
    recorded = config.output_dir / DATA_MANIFEST_FILE
    if not recorded.is_file():
        return
    try:
        before = json.loads(recorded.read_text(encoding="utf-8"))
        same_vocab = before["vocab"]["sha256"] == manifest["vocab"]["sha256"]
        same_shards = [s["sha256"] for s in before["shards"]] == [s["sha256"] for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{recorded} is not the data manifest zh-train wrote ({error!r}); restore it, or use a new "
                        "--output_dir") from error
    if not same_vocab or not same_shards:
        what = "vocab" if not same_vocab else "examples (shard checksums)"
        raise UserError(f"{data_label(config)} is not the data {config.output_dir} was trained on: its {what} differ "
                        f"from {recorded}; resume with the original data, or start a new --output_dir (--init_from "
                        "an export of this run to continue from its weights)")


def prepare_run_dir(config: TrainConfig, data_manifest: dict, model_config: Any, ds_config: dict,
                    resuming: bool) -> None:
    """Rank 0 writes what the export and a resume need (train_config.json only once the start succeeded).
    A resumed run keeps the model config, vocab and data manifest its checkpoints were trained with."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.output_dir / DS_CONFIG_FILE, ds_config)
    if resuming and all((config.output_dir / name).is_file() for name in (MODEL_CONFIG_FILE, VOCAB_FILE)):
        return
    model_config.to_json_file(config.output_dir / MODEL_CONFIG_FILE)
    shutil.copyfile(data_paths(config)[0] / VOCAB_FILE, config.output_dir / VOCAB_FILE)  # a mixture has one vocab
    write_json_atomic(config.output_dir / DATA_MANIFEST_FILE, data_manifest)


def device_name(accelerator: Any) -> str | None:
    """The accelerator's product name (for the peak FLOP/s), None on the CPU accelerator."""
    return None if accelerator.device_name() == "cpu" else torch.cuda.get_device_name()


# -- the loop --------------------------------------------------------------------------------------


def fit(engine: Any, scheduler: Any, batches: Iterator[LoadedBatch], config: TrainConfig, state: TrainerState,
        ranks: Ranks, metrics: MetricsLog, eval_batches: Callable[[], Iterator[dict]] | None,
        peak_flops: float | None, decoder_dropout: DecoderInputDropout | None = None) -> None:
    """The loop: forward, backward, step; logging, evaluation and checkpoints on their schedules."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=state.step, desc="train", unit=" steps", file=sys.stderr,
               disable=not ranks.is_main or not config.progress, mininterval=1.0)
    window = MetricsWindow(engine.device)
    skipped_before, streak = engine.skipped_steps, 0
    engine.train()
    while state.step < config.total_steps:
        step_example_ids = []
        for micro_batch in range(config.gradient_accumulation_steps):
            batch = window.next_batch(batches)
            inputs = batch.to(engine.device)
            if decoder_dropout is not None:
                inputs = decoder_dropout(inputs, state.step, ranks.rank, micro_batch)
            loss = seq2seq_loss(engine, inputs)
            engine.backward(loss)
            engine.step()
            window.add_micro_batch(loss, batch)
            step_example_ids.extend(batch.plan.indices)
        # The position of the last batch trained, not of the batches the loader prepared beyond it.
        window.samples += batch.plan.consumed_samples - state.consumed_samples
        window.steps += 1
        state.step += 1
        state.consumed_samples, state.data_position = batch.plan.consumed_samples, batch.plan.position
        if config.record_example_ids:
            with open(config.output_dir / f"example_ids_rank{ranks.rank}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.step, "example_ids": step_example_ids}) + "\n")
        bar.update(1)
        streak, skipped_before = skip_streak(skipped_before, engine.skipped_steps, streak), engine.skipped_steps
        if streak > config.max_skipped_steps:
            raise UserError(
                f"{streak} optimizer steps in a row were skipped for fp16 overflow (step {state.step}); stopping "
                f"with the last good checkpoint in {config.output_dir / CHECKPOINTS} intact; lower --learning_rate "
                "or use ds_configs/zero2_bf16.json")
        if maybe_log(engine, scheduler, config, state, window, ranks, bar, metrics, peak_flops):
            window = MetricsWindow(engine.device)
        with window.paused():  # the next log's tokens/s and MFU are of training steps only
            if eval_batches is not None:
                maybe_evaluate(engine, eval_batches, config, state, ranks, metrics)
            if is_due(state.step, config.save_checkpoint_steps, config.total_steps):
                save_checkpoint(engine, config.output_dir / CHECKPOINTS, state, ranks.rank, ranks.world_size,
                                config.keep_last_checkpoints, get_accelerator())
    bar.close()
    dist.barrier()


def skip_streak(skipped_before: int, skipped_now: int, streak: int) -> int:
    """Consecutive optimizer steps skipped (fp16 overflow): grows while DeepSpeed's counter
    grows, back to 0 after a step that was applied."""
    return streak + 1 if skipped_now > skipped_before else 0


def is_due(step: int, every: int, total_steps: int) -> bool:
    return step % every == 0 or step == total_steps


def maybe_log(engine: Any, scheduler: Any, config: TrainConfig, state: TrainerState, window: MetricsWindow,
              ranks: Ranks, bar: Any, metrics: MetricsLog, peak_flops: float | None) -> bool:
    """Reduce the window over ranks and write a record; True when it did (the window starts over)."""
    if not is_due(state.step, config.log_every_steps, config.total_steps):
        return False
    totals = window.reduce()
    if not math.isfinite(totals["loss"]):
        raise UserError(f"loss is {totals['loss']} at step {state.step}; stopping before it reaches a checkpoint "
                        f"(the last good one stays in {config.output_dir / CHECKPOINTS}); lower --learning_rate")
    elapsed = totals["elapsed"]
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": state.step,
        "loss": totals["loss"],  # full precision: resume tests compare it bitwise
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": round(totals["real_tokens"] / elapsed, 1),
        "samples_per_s": round(window.samples / elapsed, 2),
        "consumed_samples": state.consumed_samples,
        "model_tflops_per_s": round(totals["flops"] / elapsed / 1e12, 4),
        "pad_fraction": round(1.0 - totals["real_tokens"] / max(1.0, totals["padded_tokens"]), 4),
        "data_wait_fraction": round(totals["data_wait_fraction"], 4),  # this rank's
    }
    if totals["corpus_examples"]:  # a mixture: what each corpus actually supplied in this window
        names = config_corpus_names(config)
        drawn = sum(totals["corpus_examples"])
        record["corpus_examples"] = dict(zip(names, totals["corpus_examples"]))
        record["corpus_share"] = {name: round(count / drawn, 4) for name, count in zip(names, totals["corpus_examples"])}
    if engine.device.type == "cuda":
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(engine.device) / 1e9, 3)
    if engine.fp16_enabled():  # dynamic loss scaling: a falling scale and skipped steps mean overflow
        record["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", float("nan")))
        record["skipped_steps"] = int(engine.skipped_steps)
    if peak_flops:
        record["mfu"] = round(totals["flops"] / elapsed / (ranks.world_size * peak_flops), 4)
    metrics.append(record)
    if ranks.is_main:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if not config.progress:
            mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
            print(f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3e} grad norm "
                  f"{record['grad_norm']} {record['tokens_per_s']:.0f} tokens/s {record['model_tflops_per_s']} model "
                  f"TFLOP/s{mfu} data wait {record['data_wait_fraction']:.1%}", file=sys.stderr)
    return True


def config_corpus_names(config: TrainConfig) -> list[str]:
    """Names of a mixture's corpora in the metrics: their directory names (made unique by position)."""
    names = [path.name for path in data_paths(config)]
    return names if len(set(names)) == len(names) else [f"{k}:{name}" for k, name in enumerate(names)]


def maybe_evaluate(engine: Any, eval_batches: Callable[[], Iterator[dict]], config: TrainConfig,
                   state: TrainerState, ranks: Ranks, metrics: MetricsLog) -> None:
    """Token-weighted fp32 loss over the held-out examples of every rank, logged as eval_loss."""
    import torch.distributed as dist

    if not is_due(state.step, config.eval_every_steps, config.total_steps):
        return
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, target tokens
    engine.eval()
    with torch.no_grad():
        for batch in eval_batches():
            totals[0] += seq2seq_loss(engine, batch, reduction="sum").double()
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    engine.train()
    dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    metrics.append({"step": state.step, "eval_loss": loss_sum / tokens, "eval_tokens": int(tokens)})
    if ranks.is_main:
        print(f"step {state.step}: eval loss {loss_sum / tokens:.4f} over {int(tokens)} target tokens",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_stage(train, TrainConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
