"""Stage 4, train: DeepSpeed ZeRO-2 pretraining of BART / PEGASUS on the mask stage's examples.

Run it under any launcher (``deepspeed``, ``torchrun``, ``srun``) or as a single process. The
output directory holds everything the export needs: the resolved configs, the vocab,
and ``checkpoints/<tag>`` with ``checkpoints/latest`` replaced atomically only after
every rank has finished writing. Relaunching the same command resumes from ``latest``.

This module wires the parts together and reads top to bottom: :func:`train` decides whether the
run may start (``run_plan``: every check at once, before anything is written), :meth:`Trainer.start`
sets up (model, process group, engine, resume, data, logs), :meth:`Trainer.fit` is the loop, and
the ``maybe_*`` methods log, evaluate, save and stop (on SIGTERM or Ctrl-C) on their schedules. The parts:
``train_config`` (flags), ``run_plan`` (start-up checks, run directory and its lock), ``ds_config`` (DeepSpeed
config, batch sizes, schedule), ``distributed`` (process group, Slurm, seeding, hardware and storage checks),
``checkpointing`` (layout, digests, resume, RNG), ``signals`` (stopping on a signal), ``batch_loader`` (batches
prepared ahead), ``metrics`` (typed window, log files), ``loss``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_tools.cli import config_to_dict, run_stage
from data_tools.common import UserError, write_json_atomic
from pipeline.batch_loader import MicroBatchLoader, evaluation_batches
from pipeline.checkpointing import CHECKPOINTS, TrainerState, load_checkpoint, save_checkpoint, tag_for_step
from pipeline.collate import DecoderInputDropout, Seq2SeqCollator
from pipeline.distributed import (
    Ranks,
    check_shared_run_dir,
    device_product_name,
    init_distributed,
    launcher_rank,
    refuse_on_every_rank,
    seed_everything,
    use_deterministic_kernels,
    warn_stale_extension_locks,
)
from pipeline.ds_config import lr_schedule
from pipeline.examples import CorpusMixture
from pipeline.flops import peak_flops_per_device, training_flops
from pipeline.loss import IGNORE_INDEX, seq2seq_loss
from pipeline.metrics import MetricsLog, MetricsWindow, engine_figures, log_line, step_record, truncate_records
from pipeline.model import build_training_model, weight_decay_groups
from pipeline.plot import PLOT_FILE, plot_run
from pipeline.run_plan import RunPlan, plan_locked_run, prepare_run_dir, run_dir_lock
from pipeline.sampler import ResumableDistributedSampler
from pipeline.signals import (StopAgreement, StopSignals, TrainingStopped, signal_name, stop_signals,
                              stop_signals_blocked)
from pipeline.train_config import TRAIN_CONFIG_FILE, TrainConfig


def train(config: TrainConfig) -> TrainerState:
    """The whole run: decide, set up, train; the loss plot at the end."""
    # deepspeed is imported here, on purpose: its import costs ~0.8 s over torch's (measured on the 2-core
    # VM), which `zh-train --help` and a mistyped flag should not pay.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    is_main = launcher_rank() == 0
    with run_dir_lock(config.output_dir, is_main) as locked_by, stop_signals(is_main) as signals:
        plan = plan_locked_run(config, accelerator.device_name(), locked_by)
        trainer = Trainer.start(config, plan, accelerator, locked_by)
        signals.defer()
        trainer.fit(signals)
        if trainer.ranks.is_main:
            write_loss_plot(config)
    return trainer.state


class Trainer:
    """One run's engine, loop state, data loader and metrics; :meth:`fit` is the loop."""

    # -- set-up ----------------------------------------------------------------------------------

    def __init__(self, config: TrainConfig, plan: RunPlan, engine: Any, scheduler: Any, ranks: Ranks,
                 accelerator: Any) -> None:
        self.config, self.plan, self.engine, self.scheduler = config, plan, engine, scheduler
        self.ranks, self.accelerator = ranks, accelerator
        self.state = replace(plan.start)
        self.collate = Seq2SeqCollator(pad_id=plan.model_config.pad_token_id,
                                       decoder_start_id=plan.model_config.decoder_start_token_id)
        self.loader = self.open_loader()
        self.state.data = self.loader.state  # resumed on another rank count: rounded up to whole groups
        # This rank's share of the held-out examples.
        self.held_out = list(range(plan.train_examples + ranks.rank, len(plan.examples), ranks.world_size))
        examples = plan.examples
        self.corpus_names = examples.corpus_names() if isinstance(examples, CorpusMixture) else []
        self.peak_flops = peak_flops_per_device(config.peak_tflops, device_product_name(accelerator))
        dropout = DecoderInputDropout(config.decoder_input_dropout, config.decoder_input_dropout_steps,
                                      plan.vocab["special_token_ids"]["[MASK]"], config.seed)
        self.decoder_dropout = dropout if config.decoder_input_dropout > 0 else None
        # Steps after the checkpoint we resumed from are trained again: drop their old records.
        truncate_records(self.example_ids_file(), self.state.step, config.record_example_ids)
        self.metrics = MetricsLog(config.output_dir, enabled=ranks.is_main)
        self.metrics.truncate(self.state.step)
        self.window = MetricsWindow(engine.device)  # started again when the loop starts
        self.skipped_before, self.skipped_streak = engine.skipped_steps, 0
        self.saved_step = self.state.step if plan.resume_tag else None  # of the last complete checkpoint
        self.stop_agreement = StopAgreement(engine.device)

    @classmethod
    def start(cls, config: TrainConfig, plan: RunPlan, accelerator: Any, locked_by: str | None = None) -> "Trainer":
        """Seed and build the model, start the process group and the engine, resume, open data and logs.
        ``locked_by``: rank 0 found the run directory locked by another run (every rank then stops)."""
        import deepspeed  # deferred with get_accelerator (see train)

        warn_stale_extension_locks()
        if config.deterministic:
            use_deterministic_kernels()
        seed_everything(config.seed)  # right before the model's initial weights are drawn
        model, norm_kernel = build_training_model(config.init_from, plan.model_config, accelerator.device_name(),
                                                  config.gradient_checkpointing, config.compile)
        ranks = init_distributed(accelerator)
        refuse_on_every_rank(locked_by, ranks)
        if ranks.is_main:
            prepare_run_dir(config, plan)
        dist.barrier()
        check_shared_run_dir(config.output_dir, ranks)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=weight_decay_groups(model, config.weight_decay),
            lr_scheduler=lr_schedule(config), config=plan.engine_config())
        if plan.resume_tag is not None:
            load_checkpoint(engine, config.output_dir / CHECKPOINTS, plan.resume_tag, ranks.rank, accelerator)
        if ranks.is_main:
            # only now: a start that failed earlier must not make the corrected retry look like a resume
            write_json_atomic(config.output_dir / TRAIN_CONFIG_FILE, config_to_dict(config))
            cpu_threads = f" ({torch.get_num_threads()} threads each)" if ranks.device.type == "cpu" else ""
            print(f"train: {type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
                  f"ZeRO stage {engine.zero_optimization_stage()} {plan.precision} on {ranks.world_size} x "
                  f"{accelerator.device_name()}{cpu_threads} | optimizer "
                  f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__} | layer norm {norm_kernel} | global "
                  f"batch {plan.ds_config['train_batch_size']} | data workers {config.data_workers} | "
                  + (f"resuming from {plan.resume_tag} (step {plan.start.step})" if plan.resume_tag else "fresh start")
                  + ("" if plan.resume_digests else " (written before checkpoints recorded their files' sha256: sizes "
                     "and file types checked, contents not)"), file=sys.stderr)
        trainer = cls(config, plan, engine, scheduler, ranks, accelerator)
        if ranks.is_main:
            trainer.report_data()
        with stop_signals_blocked():  # in the data workers, which inherit it (pipeline/signals.py)
            trainer.loader.start()  # the workers prepare the first batches while the rest of the set-up runs
        return trainer

    def open_loader(self) -> MicroBatchLoader:
        """This rank's micro batches from the plan's data, continuing from the state the run resumes."""
        config, plan = self.config, self.plan
        grouped = config.group_by_length or config.max_tokens_per_batch > 0
        sampler = ResumableDistributedSampler(
            plan.train_examples, config.micro_batch_size, self.ranks.rank, self.ranks.world_size, config.seed,
            lengths=plan.examples.lengths()[: plan.train_examples] if grouped else None,
            max_tokens=config.max_tokens_per_batch, group_window=config.length_group_window)
        loader = MicroBatchLoader(plan.examples, sampler, self.collate,
                                  lambda source, target: training_flops(plan.model_config, source, target),
                                  config.data_workers, pin_memory=self.ranks.device.type == "cuda", seed=config.seed)
        loader.load_state_dict(asdict(self.state.data))
        return loader

    def report_data(self) -> None:
        """Rank 0's start-up lines about the data: the mixture, the epoch's batches, MFU's peak."""
        config, sampler = self.config, self.loader.sampler
        if isinstance(self.plan.examples, CorpusMixture):
            print(f"train: {self.plan.examples.describe()}", file=sys.stderr)
        per_rank = sampler.groups_in_epoch(sampler.epoch)
        print(f"train: {self.plan.train_examples} training examples; this epoch: {per_rank} micro batches per rank "
              f"(~{per_rank // config.gradient_accumulation_steps} optimizer steps), "
              f"{sampler.dropped_in_epoch(sampler.epoch)} examples of its ragged tail left out"
              + (f"; {config.eval_examples} held out for eval" if config.eval_examples else ""), file=sys.stderr)
        if self.peak_flops is None and self.accelerator.device_name() != "cpu":
            print(f"train: no peak FLOP/s known for {device_product_name(self.accelerator)!r}: pass --peak_tflops "
                  "for MFU", file=sys.stderr)

    def example_ids_file(self) -> Path:
        return self.config.output_dir / f"example_ids_rank{self.ranks.rank}.jsonl"

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, signals: StopSignals) -> None:
        """Forward, backward, step; logging, evaluation and checkpoints on their schedules; a stop on a signal."""
        config = self.config
        bar = tqdm(total=config.total_steps, initial=self.state.step, desc="train", unit=" steps", file=sys.stderr,
                   disable=not self.ranks.is_main or not config.progress, mininterval=1.0)
        self.window = MetricsWindow(self.engine.device)
        self.engine.train()
        with contextlib.closing(bar):
            while self.state.step < config.total_steps:
                self.train_step()
                bar.update(1)
                self.check_skipped_steps()
                self.maybe_log(bar)
                with self.window.paused():  # the next log's tokens/s and MFU are of training steps only
                    self.maybe_evaluate()
                    self.maybe_save()
                    self.maybe_stop(signals.received)
        dist.barrier()

    def train_step(self) -> None:
        """One optimizer step: --gradient_accumulation_steps micro batches forward and backward."""
        example_ids = []
        for micro_batch in range(self.config.gradient_accumulation_steps):
            batch = self.window.next_batch(self.loader)
            inputs = batch.to(self.engine.device)
            if self.decoder_dropout is not None:
                inputs = self.decoder_dropout(inputs, self.state.step, self.ranks.rank, micro_batch)
            loss = seq2seq_loss(self.engine, inputs)
            self.engine.backward(loss)
            self.engine.step()
            self.window.add_micro_batch(loss, batch)
            example_ids.extend(batch.plan.indices)
        # The loader's state is that of the last batch trained, not of the batches prepared beyond it.
        self.window.samples += self.loader.state.consumed_samples - self.state.data.consumed_samples
        self.window.steps += 1
        self.state.step += 1
        self.state.data = self.loader.state
        if self.config.record_example_ids:
            with open(self.example_ids_file(), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.step, "example_ids": example_ids}) + "\n")

    def check_skipped_steps(self) -> None:
        """Stop when fp16 overflow skipped more than --max_skipped_steps optimizer steps in a row."""
        skipped_now = self.engine.skipped_steps
        self.skipped_streak = skip_streak(self.skipped_before, skipped_now, self.skipped_streak)
        self.skipped_before = skipped_now
        if self.skipped_streak > self.config.max_skipped_steps:
            raise UserError(
                f"{self.skipped_streak} optimizer steps in a row were skipped for fp16 overflow (step "
                f"{self.state.step}); stopping with the last good checkpoint in {self.config.output_dir / CHECKPOINTS} "
                "intact; lower --learning_rate or use ds_configs/zero2_bf16.json")

    def maybe_log(self, bar: Any) -> None:
        """At log steps: reduce the window over ranks, write a record, start a new window."""
        config, engine = self.config, self.engine
        if not is_due(self.state.step, config.log_every_steps, config.total_steps):
            return
        totals = self.window.reduce()
        if not math.isfinite(totals["loss"]):
            raise UserError(f"loss is {totals['loss']} at step {self.state.step}; stopping before it reaches a "
                            f"checkpoint (the last good one stays in {config.output_dir / CHECKPOINTS}); lower "
                            "--learning_rate")
        grad_norm = engine.get_global_grad_norm()
        record = step_record(self.state.step, totals, self.window.samples, self.state.data.consumed_samples,
                             self.scheduler.get_last_lr()[0], None if grad_norm is None else float(grad_norm),
                             self.corpus_names, engine_figures(engine),
                             self.peak_flops and self.ranks.world_size * self.peak_flops)
        self.metrics.append(record)
        if self.ranks.is_main:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if not config.progress:
                print(log_line(record), file=sys.stderr)
        self.window = MetricsWindow(engine.device)

    def maybe_evaluate(self) -> None:
        """At eval steps (with --eval_examples): the token-weighted eval loss over every rank's held-out share."""
        config = self.config
        if not config.eval_examples or not is_due(self.state.step, config.eval_every_steps, config.total_steps):
            return
        batches = (tensors for _, tensors in evaluation_batches(self.plan.examples, self.held_out,
                                                                config.micro_batch_size, self.collate))
        loss_sum, tokens = evaluation_loss(self.engine, batches)
        self.metrics.append({"step": self.state.step, "eval_loss": loss_sum / tokens, "eval_tokens": tokens})
        if self.ranks.is_main:
            print(f"step {self.state.step}: eval loss {loss_sum / tokens:.4f} over {tokens} target tokens",
                  file=sys.stderr)

    def maybe_save(self, now: bool = False) -> None:
        """At checkpoint steps (or ``now``): every rank's shard, then ``latest`` (pipeline/checkpointing.py)."""
        config = self.config
        if now or is_due(self.state.step, config.save_checkpoint_steps, config.total_steps):
            save_checkpoint(self.engine, config.output_dir / CHECKPOINTS, self.state, self.ranks.rank,
                            self.ranks.world_size, config.keep_last_checkpoints, self.accelerator)
            self.saved_step = self.state.step

    def maybe_stop(self, received: int) -> None:
        """At every step boundary: when a rank noted a signal (agreed by all one step later), save a checkpoint
        unless this step has one, and stop with the line that says what was kept (pipeline/signals.py)."""
        agreed = self.stop_agreement.exchange(received)
        if not agreed or self.state.step >= self.config.total_steps:  # the last step: the run is complete anyway
            return
        if self.saved_step != self.state.step:
            self.maybe_save(now=True)
        latest = self.config.output_dir / CHECKPOINTS / tag_for_step(self.state.step)
        raise TrainingStopped(f"stopped by {signal_name(agreed)} after step {self.state.step}: checkpoint {latest} is "
                              "complete and checkpoints/latest points to it; relaunch the same command to resume "
                              "from it" if self.ranks.is_main else "", agreed)


def evaluation_loss(engine: Any, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed fp32 loss, target tokens) of this rank's batches, summed over every rank on the engine's device."""
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, target tokens
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            totals[0] += seq2seq_loss(engine, batch, reduction="sum").double()
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    engine.train()
    dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return loss_sum, int(tokens)


def skip_streak(skipped_before: int, skipped_now: int, streak: int) -> int:
    """Consecutive optimizer steps skipped (fp16 overflow): grows while DeepSpeed's counter
    grows, back to 0 after a step that was applied."""
    return streak + 1 if skipped_now > skipped_before else 0


def is_due(step: int, every: int, total_steps: int) -> bool:
    return step % every == 0 or step == total_steps


def write_loss_plot(config: TrainConfig) -> None:
    """loss.png in the run directory, or one line saying why not (the run itself succeeded)."""
    try:
        plot_run(config.output_dir, config.output_dir / PLOT_FILE)
    except UserError as error:
        print(f"train: {PLOT_FILE} not written: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_stage(train, TrainConfig, argv)
    except TrainingStopped as stopped:  # not an error: exit 128 + the signal, as a process the signal ended
        if str(stopped):
            print(f"{Path(sys.argv[0]).name}: {stopped}", file=sys.stderr)
        return 128 + stopped.signal_number


if __name__ == "__main__":
    sys.exit(main())
