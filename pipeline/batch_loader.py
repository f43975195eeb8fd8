"""Micro batches prepared ahead of the step, so the accelerator does not wait for the host.

Reading examples from the memory-mapped shards, online masking (~200 µs per BART example)
and collation run in ``--data_workers`` background processes (a ``DataLoader`` over the
sampler's planned batches), into pinned memory, copied to the device without blocking. The
host-side counts the metrics need (real and padded tokens, model FLOPs) are computed there
too, from the lengths, so the loop never reads a tensor back from the device for them.

Exact resume is kept: each batch carries the sampler position reached after it
(:class:`~pipeline.sampler.PlannedBatch`), so the position a checkpoint records is that of the
last batch trained, however many batches the workers have prepared beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.collate import Seq2SeqCollator
from pipeline.sampler import PlannedBatch
from pipeline.loss import IGNORE_INDEX, with_label_positions


@dataclass
class LoadedBatch:
    """A collated micro batch with its plan and the host-side counts of its tokens."""

    plan: PlannedBatch
    tensors: dict[str, torch.Tensor]
    real_tokens: int  # source + target tokens that are not padding
    padded_tokens: int  # what the accelerator computes on: rows x (padded source + padded target)
    flops: float  # model FLOPs of training on it (pipeline/flops.py)
    corpus_counts: tuple[int, ...] = ()  # examples per corpus of a --data_dirs mixture

    def pin_memory(self) -> "LoadedBatch":
        """Called by the DataLoader's pinning thread: page-locked memory makes the copy asynchronous."""
        return LoadedBatch(self.plan, {k: v.pin_memory() for k, v in self.tensors.items()}, self.real_tokens,
                           self.padded_tokens, self.flops, self.corpus_counts)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        non_blocking = device.type != "cpu"
        return {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}


class PlannedBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose fetch receives a whole :class:`PlannedBatch` (``__getitems__``):
    reads (and, online, masks) its examples for the batch's epoch and collates them."""

    def __init__(self, examples: Any, collate: Seq2SeqCollator, flops: Callable[[np.ndarray, np.ndarray], float]):
        self.examples, self.collate, self.flops = examples, collate, flops

    def __getitems__(self, plan: PlannedBatch) -> LoadedBatch:
        tensors = with_label_positions(self.collate([self.examples.example(index, plan.epoch)
                                                     for index in plan.indices]))
        source_lengths = tensors["attention_mask"].sum(dim=1).numpy()
        target_lengths = (tensors["labels"] != IGNORE_INDEX).sum(dim=1).numpy()
        corpus_counts = self.examples.corpus_counts(plan.indices) if hasattr(self.examples, "corpus_counts") else ()
        return LoadedBatch(plan, tensors, int(source_lengths.sum() + target_lengths.sum()),
                           tensors["input_ids"].numel() + tensors["labels"].numel(),
                           self.flops(source_lengths, target_lengths), corpus_counts)

    def __getitem__(self, index: int) -> Any:
        raise TypeError("PlannedBatchDataset is fetched a micro batch at a time (__getitems__)")

    def __len__(self) -> int:
        return len(self.examples)


def _as_is(batch: LoadedBatch) -> LoadedBatch:  # a module-level function: workers may need to pickle it
    return batch


def _one_thread_per_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers collate small tensors; the cores belong to the training process


def micro_batches(examples: Any, plans: Iterator[PlannedBatch], collate: Seq2SeqCollator,
                  flops: Callable[[np.ndarray, np.ndarray], float], workers: int, pin_memory: bool,
                  seed: int) -> Iterator[LoadedBatch]:
    """Loaded micro batches in the order of ``plans``, prepared ``workers`` processes ahead (0 = in this process)."""
    loader = torch.utils.data.DataLoader(
        PlannedBatchDataset(examples, collate, flops),
        batch_sampler=plans,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        worker_init_fn=_one_thread_per_worker if workers else None,
        # Its own generator: drawing the workers' base seed from the global torch RNG would
        # shift the dropout stream, and a resumed run would no longer replay it exactly.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
