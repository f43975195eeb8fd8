"""Which examples each rank trains on, micro batch by micro batch.

Order is a pure function of (seed, epoch, position in the epoch): resuming only needs the sampler's
``state_dict()`` a checkpoint saved, and every rank computes the same global permutation and takes
its own slice, so no example is read twice or skipped within an epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from data_tools.common import UserError

# The collator pads lengths to a multiple of 8 (tensor cores); batch plans count the same padding.
PAD_MULTIPLE = 8


def pad_to_multiple(length: "int | np.ndarray", multiple: int) -> "int | np.ndarray":
    return (length + multiple - 1) // multiple * multiple


def padded_batch_cost(source_lengths: np.ndarray, target_lengths: np.ndarray, pad_multiple: int = PAD_MULTIPLE) -> int:
    """Tokens a micro batch occupies once the collator pads it: rows x (padded source + target)."""
    return len(source_lengths) * int(pad_to_multiple(int(source_lengths.max()), pad_multiple)
                                     + pad_to_multiple(int(target_lengths.max()), pad_multiple))


def plan_micro_batches(order: np.ndarray, lengths: np.ndarray | None, micro_batch_size: int, max_tokens: int,
                       window: int, pad_multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Split an epoch's example order into micro batches: ``(order, bounds)``, batch j being
    ``order[bounds[j]:bounds[j+1]]``.

    Without ``lengths``, consecutive blocks of ``micro_batch_size``. With them (an (N, 2)
    array of source and target lengths), each window of ``window`` examples is sorted by
    length, longest first, so a batch holds examples of similar length and pads little; a
    batch takes at most ``micro_batch_size`` examples and, when ``max_tokens`` > 0, at most
    ``max_tokens`` padded tokens (see :func:`padded_batch_cost`). A tail shorter than a full
    fixed-size batch is left out; under a token budget every example is placed.
    """
    if lengths is None:
        usable = len(order) // micro_batch_size * micro_batch_size
        return order[:usable], np.arange(0, usable + 1, micro_batch_size, dtype=np.int64)
    grouped, bounds = [], [0]
    for start in range(0, len(order), window):
        members = order[start : start + window]
        key = lengths[members].sum(axis=1)
        members = members[np.argsort(-key, kind="stable")]
        grouped.append(members)
        offset = bounds[-1]
        if max_tokens <= 0:
            cuts = list(range(micro_batch_size, len(members) + 1, micro_batch_size))
            if cuts and cuts[-1] != len(members):
                members = members[: cuts[-1]]  # the window's ragged tail does not make a batch
                grouped[-1] = members
            bounds.extend(offset + cut for cut in cuts)
            continue
        source = pad_to_multiple(lengths[members, 0], pad_multiple)
        target = pad_to_multiple(lengths[members, 1], pad_multiple)
        position = 0
        while position < len(members):
            stop = min(len(members), position + micro_batch_size)
            rows = np.arange(1, stop - position + 1)
            cost = rows * (np.maximum.accumulate(source[position:stop]) + np.maximum.accumulate(target[position:stop]))
            take = max(1, int(np.searchsorted(cost, max_tokens, side="right")))
            position += take
            bounds.append(offset + position)
    if not grouped:
        return order[:0], np.zeros(1, dtype=np.int64)
    return np.concatenate(grouped), np.asarray(bounds, dtype=np.int64)


@dataclass(frozen=True)
class SamplerState:
    """Where a sampler stands: ``micro_batches`` of ``epoch``'s plan trained (all ranks together) and the
    examples all ranks consumed since the run began. A checkpoint saves it (``trainer_state.json``:
    ``data_position`` and ``consumed_samples``)."""

    epoch: int = 0
    micro_batches: int = 0
    consumed_samples: int = 0


class ResumableDistributedSampler:
    """Yields this rank's example indices, micro batch by micro batch, forever (epoch after epoch).

    Each epoch is planned from (seed, epoch) alone: a global permutation, split into micro
    batches (:func:`plan_micro_batches`: fixed size, or grouped by length under a token
    budget) whose order is shuffled again when grouped; consecutive runs of ``world_size``
    micro batches form one *group*, and rank r takes the r-th batch of each group. Its state
    (:class:`SamplerState`: epoch, micro batches consumed in it) is saved with ``state_dict()`` and
    restored with ``load_state_dict()``, so a resumed run continues exactly; batches that cannot
    fill a last group are left out of that epoch (``dropped_in_epoch``).

    The micro batch sequence does not depend on the number of ranks (windows are counted in
    micro batches), so a state saved by 2 ranks means the same data for 1 rank; resuming
    on another rank count rounds it up to whole groups.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int, *,
                 lengths: np.ndarray | None = None, max_tokens: int = 0, group_window: int = 100) -> None:
        self.block = micro_batch_size * world_size
        if num_examples < self.block and lengths is None:
            raise UserError(
                f"{num_examples} training examples cannot fill one step of micro_batch_size {micro_batch_size} "
                f"x {world_size} ranks; lower --micro_batch_size or mask more data"
            )
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"lengths has {len(lengths)} rows for {num_examples} examples")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.window = group_window * micro_batch_size
        if lengths is not None and max_tokens > 0:
            longest = int(pad_to_multiple(lengths, PAD_MULTIPLE).sum(axis=1).max())
            if longest > max_tokens:
                raise UserError(f"--max_tokens_per_batch {max_tokens} is smaller than the longest example "
                                f"({longest} padded source + target tokens); raise it to at least {longest}")
        self.epoch, self.groups, self.consumed_samples = 0, 0, 0
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    def state(self) -> SamplerState:
        return SamplerState(self.epoch, self.groups * self.world_size, self.consumed_samples)

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state())

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; one saved by a different number of ranks is rounded up to whole
        groups (skipping fewer than ``world_size`` micro batches)."""
        self.epoch = int(state["epoch"])
        self.groups = -(-int(state["micro_batches"]) // self.world_size)
        self.consumed_samples = int(state["consumed_samples"])

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) of the epoch's micro batches, in the order they are trained."""
        if self._plan is None or self._plan[0] != epoch:
            order, bounds = plan_micro_batches(self.epoch_permutation(epoch), self.lengths, self.micro_batch_size,
                                               self.max_tokens, self.window)
            if self.lengths is not None:  # sorted windows: shuffle the batches so lengths do not trend
                shuffled = np.random.default_rng([self.seed, epoch, 1]).permutation(len(bounds) - 1)
                sizes = np.diff(bounds)[shuffled]
                new_bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
                gather = (np.arange(new_bounds[-1]) - np.repeat(new_bounds[:-1], sizes)
                          + np.repeat(bounds[:-1][shuffled], sizes))
                order, bounds = order[gather], new_bounds
            self._plan = (epoch, order, bounds)
        return self._plan[1], self._plan[2]

    def groups_in_epoch(self, epoch: int) -> int:
        _, bounds = self.epoch_plan(epoch)
        return (len(bounds) - 1) // self.world_size

    def dropped_in_epoch(self, epoch: int) -> int:
        """Examples of the epoch no rank trains on (a ragged tail)."""
        _, bounds = self.epoch_plan(epoch)
        return self.num_examples - int(bounds[self.groups_in_epoch(epoch) * self.world_size])

    def __iter__(self) -> Iterator[list[int]]:
        for planned in self.planned():
            yield planned.indices

    def planned(self) -> Iterator["PlannedBatch"]:
        """This rank's micro batches, each with the state the sampler reaches after it.

        A loader that prepares batches ahead advances the sampler past the batch being
        trained; the state a checkpoint records must travel with the batch instead.
        """
        while True:
            groups = self.groups_in_epoch(self.epoch)
            if groups == 0:
                raise UserError(f"{self.num_examples} training examples cannot fill one step of "
                                f"{self.world_size} micro batches; lower --micro_batch_size or mask more data")
            if self.groups >= groups:
                self.epoch, self.groups = self.epoch + 1, 0
                continue
            order, bounds = self.epoch_plan(self.epoch)
            first = self.groups * self.world_size
            self.groups += 1
            self.consumed_samples += int(bounds[first + self.world_size] - bounds[first])
            mine = first + self.rank
            yield PlannedBatch(order[bounds[mine] : bounds[mine + 1]].tolist(), self.epoch, self.state())


@dataclass(frozen=True)
class PlannedBatch:
    """One micro batch of one rank: example indices, the epoch (online masks depend on it), and the
    sampler's state once its group is trained (what a checkpoint taken after it must record)."""

    indices: list[int]
    epoch: int
    state_after: SamplerState
