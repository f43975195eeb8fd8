"""Batches: how training, evaluation and the benchmarks turn examples into model inputs, and the
training loader that prepares micro batches ahead of the step.

:func:`collate_examples` is the one way a batch is made (read the examples of an epoch, pad them,
find the labelled positions the loss projects); :func:`evaluation_batches` walks a fixed list of
examples with it (the trainer's eval loss and ``zh-evaluate``).

For training, reading examples from the memory-mapped shards, online masking (~200 µs per BART
example) and collation run in ``--data_workers`` background processes (a ``DataLoader`` over the
sampler's planned batches), into pinned memory, copied to the device without blocking. The
host-side counts the metrics need (real and padded tokens, model FLOPs) are computed there too,
from the lengths, so the loop never reads a tensor back from the device for them.

Exact resume is kept: each batch carries the sampler state reached after it
(:class:`~pipeline.sampler.PlannedBatch`), and :class:`MicroBatchLoader`'s ``state_dict()`` is that
of the last batch handed to the loop, however many batches the workers have prepared beyond it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.collate import Seq2SeqCollator
from pipeline.examples import CorpusMixture, Seq2SeqExamples
from pipeline.loss import IGNORE_INDEX, with_label_positions
from pipeline.sampler import PlannedBatch, ResumableDistributedSampler

Example = tuple[np.ndarray, np.ndarray]  # (source_ids, target_ids), unpadded


def collate_examples(examples: Seq2SeqExamples, indices: Sequence[int], epoch: int,
                     collate: Seq2SeqCollator) -> tuple[list[Example], dict[str, torch.Tensor]]:
    """Examples ``indices`` with the masks of ``epoch`` (online masks change with it) and their padded tensors,
    with the labelled positions the loss projects (computed here, on the host, to spare the device a sync)."""
    chosen = [examples.example(index, epoch) for index in indices]
    return chosen, with_label_positions(collate(chosen))


def evaluation_batches(examples: Seq2SeqExamples, indices: Sequence[int], batch_size: int,
                       collate: Seq2SeqCollator) -> Iterator[tuple[list[Example], dict[str, torch.Tensor]]]:
    """``indices`` in consecutive batches of at most ``batch_size``, with epoch 0's masks (a held-out example
    keeps the same masks all run long): the batches of the trainer's eval loss and of zh-evaluate."""
    for start in range(0, len(indices), batch_size):
        yield collate_examples(examples, indices[start : start + batch_size], 0, collate)


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

    def __init__(self, examples: Seq2SeqExamples, collate: Seq2SeqCollator,
                 flops: Callable[[np.ndarray, np.ndarray], float]):
        self.examples, self.collate, self.flops = examples, collate, flops
        self.mixture = examples if isinstance(examples, CorpusMixture) else None

    def __getitems__(self, plan: PlannedBatch) -> LoadedBatch:
        _, tensors = collate_examples(self.examples, plan.indices, plan.epoch, self.collate)
        source_lengths = tensors["attention_mask"].sum(dim=1).numpy()
        target_lengths = (tensors["labels"] != IGNORE_INDEX).sum(dim=1).numpy()
        corpus_counts = self.mixture.corpus_counts(plan.indices) if self.mixture is not None else ()
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


def micro_batches(examples: Seq2SeqExamples, plans: Iterator[PlannedBatch], collate: Seq2SeqCollator,
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


class MicroBatchLoader:
    """This rank's training micro batches, forever, prepared ahead by :func:`micro_batches`. A ``Stateful``
    in torch's sense: ``state_dict()`` is the sampler's state after the last batch handed out (not after
    those prepared beyond it), and ``load_state_dict()`` before the first batch continues from a saved one."""

    def __init__(self, examples: Seq2SeqExamples, sampler: ResumableDistributedSampler, collate: Seq2SeqCollator,
                 flops: Callable[[np.ndarray, np.ndarray], float], workers: int, pin_memory: bool, seed: int) -> None:
        self.examples, self.sampler, self.collate, self.flops = examples, sampler, collate, flops
        self.workers, self.pin_memory, self.seed = workers, pin_memory, seed
        self.state = sampler.state()  # after the last batch handed out
        self._batches: Iterator[LoadedBatch] | None = None

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._batches is not None:
            raise RuntimeError("a loader's state is loaded before its first batch (its workers are ahead)")
        self.sampler.load_state_dict(state)
        self.state = self.sampler.state()

    def start(self) -> None:
        """Start preparing batches (the workers, from the state loaded by then); the first batch does it too."""
        if self._batches is None:
            self._batches = micro_batches(self.examples, self.sampler.planned(), self.collate, self.flops,
                                          self.workers, self.pin_memory, self.seed)

    def __iter__(self) -> "MicroBatchLoader":
        return self

    def __next__(self) -> LoadedBatch:
        self.start()
        batch = next(self._batches)
        self.state = batch.plan.state_after
        return batch

