"""What the trainer reports: a typed window of step statistics (kept on the device, reduced
over ranks once per log step) and the log files that hold the records.

Loss sums stay on the engine's device and the token and FLOP counts come from the host
(computed with the batch, in the loader), so a training step makes no device-to-host copy
for the metrics; the one synchronization is the all-reduce at each log step.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data_tools.common import write_text_atomic
from pipeline.batch_loader import LoadedBatch


@dataclass
class MetricsWindow:
    """Statistics of the optimizer steps since the last log step, on this rank."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)  # sum of micro-batch losses, on the device
    micro_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    flops: float = 0.0
    samples: int = 0  # examples consumed by all ranks
    steps: int = 0
    data_wait_s: float = 0.0  # time the loop spent waiting for its next batch
    start: float = field(default_factory=time.perf_counter)
    paused_s: float = 0.0  # evaluation and checkpoint saves inside the window: not training time
    corpus_examples: list[int] = field(default_factory=list)  # per corpus of a mixture, this rank

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def next_batch(self, batches: Iterator[LoadedBatch]) -> LoadedBatch:
        """The next micro batch; the time spent waiting for it counts as data wait."""
        waited = time.perf_counter()
        batch = next(batches)
        self.data_wait_s += time.perf_counter() - waited
        return batch

    def add_micro_batch(self, loss: torch.Tensor, batch: LoadedBatch) -> None:
        self.loss_sum += loss.detach().double()  # stays on the device: no synchronization here
        self.micro_batches += 1
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.flops += batch.flops
        if batch.corpus_counts:
            if not self.corpus_examples:
                self.corpus_examples = [0] * len(batch.corpus_counts)
            self.corpus_examples = [a + b for a, b in zip(self.corpus_examples, batch.corpus_counts)]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside the block (an evaluation, a checkpoint save) does not count as the window's:
        tokens/s and MFU measure training steps only, whether or not a log step came just before."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began

    def reduce(self) -> dict[str, float]:
        """Sums over every rank (one all-reduce on the device, one copy back to the host)."""
        host = torch.tensor([self.micro_batches, self.real_tokens, self.flops, self.padded_tokens,
                             *self.corpus_examples], dtype=torch.float64)
        totals = torch.cat([self.loss_sum.reshape(1), host.to(self.device)])
        dist.all_reduce(totals)
        loss_sum, micro_batches, real_tokens, flops, padded_tokens, *corpus_examples = totals.tolist()
        elapsed = time.perf_counter() - self.start - self.paused_s
        return {"loss": loss_sum / max(1.0, micro_batches), "real_tokens": real_tokens, "flops": flops,
                "padded_tokens": padded_tokens, "elapsed": elapsed,
                "data_wait_fraction": self.data_wait_s / elapsed if elapsed > 0 else 0.0,
                "corpus_examples": [int(c) for c in corpus_examples]}


def step_record(step: int, totals: dict, samples: int, consumed_samples: int, lr: float, grad_norm: float | None,
                corpus_names: list[str], engine_figures: dict, peak_flops: float | None) -> dict:
    """A log step's record from a window's totals (:meth:`MetricsWindow.reduce`): loss, throughput, padding,
    what each corpus of a mixture supplied, the engine's own figures, and MFU against ``peak_flops`` (of all
    ranks together, None when unknown)."""
    elapsed = totals["elapsed"]
    record = {
        "step": step,
        "loss": totals["loss"],  # full precision: resume tests compare it bitwise
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": round(totals["real_tokens"] / elapsed, 1),
        "samples_per_s": round(samples / elapsed, 2),
        "consumed_samples": consumed_samples,
        "model_tflops_per_s": round(totals["flops"] / elapsed / 1e12, 4),
        "pad_fraction": round(1.0 - totals["real_tokens"] / max(1.0, totals["padded_tokens"]), 4),
        "data_wait_fraction": round(totals["data_wait_fraction"], 4),  # this rank's
    }
    if totals["corpus_examples"]:  # a mixture: what each corpus actually supplied in this window
        drawn = sum(totals["corpus_examples"])
        record["corpus_examples"] = dict(zip(corpus_names, totals["corpus_examples"]))
        record["corpus_share"] = {name: round(count / drawn, 4)
                                  for name, count in zip(corpus_names, totals["corpus_examples"])}
    record.update(engine_figures)
    if peak_flops:
        record["mfu"] = round(totals["flops"] / elapsed / peak_flops, 4)
    return record


def log_line(record: dict) -> str:
    """A log step's line on stderr when there is no progress bar (bench/train_throughput.py times these)."""
    mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
    return (f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3e} grad norm {record['grad_norm']} "
            f"{record['tokens_per_s']:.0f} tokens/s {record['model_tflops_per_s']} model TFLOP/s{mfu} data wait "
            f"{record['data_wait_fraction']:.1%}")


def truncate_records(path: Path, last_step: int, enabled: bool) -> None:
    """Keep the JSONL records of steps up to ``last_step`` (atomically)."""
    if not enabled or not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


class MetricsLog:
    """Rank 0's metric records: ``metrics.jsonl`` (every field, full precision), ``metrics.csv``
    (fixed columns, for spreadsheets and pandas) and TensorBoard scalars when installed.

    DeepSpeed's own monitor writes no loss series, so the trainer keeps its own.
    """

    CSV_COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s",
                   "samples_per_s", "consumed_samples", "model_tflops_per_s", "mfu", "pad_fraction",
                   "data_wait_fraction", "peak_memory_gb", "eval_tokens")

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.jsonl, self.csv = output_dir / "metrics.jsonl", output_dir / "metrics.csv"
        self.enabled = enabled
        self.tensorboard: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # optional: needs the tensorboard package
                )

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


def engine_figures(engine: Any) -> dict:
    """What the engine itself reports at a log step: peak memory on a GPU, the loss scale under fp16."""
    figures = {}
    if engine.device.type == "cuda":
        figures["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(engine.device) / 1e9, 3)
    if engine.fp16_enabled():  # dynamic loss scaling: a falling scale and skipped steps mean overflow
        figures["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", float("nan")))
        figures["skipped_steps"] = int(engine.skipped_steps)
    return figures
