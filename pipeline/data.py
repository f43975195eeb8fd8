"""The training data path: memory-mapped example shards, a resumable sampler, a collator.

Order is a pure function of (seed, epoch, consumed samples): resuming only needs the
number of samples consumed, and every rank computes the same global permutation and
takes its own slice, so no example is read twice or skipped within an epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from data_tools.common import UserError
from data_tools.compiled import notice_if_pure_python
from data_tools.shards import checked_vocab_file, load_manifest, numpy_view, open_shard, shard_paths
from pipeline.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from data_tools.mask import MaskConfig


class ExampleShards:
    """Random access to (source_ids, target_ids) by global example index, zero-copy."""

    def __init__(self, directory: Path, checksum: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, "mask")
        checked_vocab_file(self.directory, self.manifest)  # the run directory copies it
        # One entry per Arrow record batch: combine_chunks() would copy whole shards into memory.
        self.columns: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        row_counts = []
        for path in shard_paths(self.directory, self.manifest, checksum):  # size, rows (and sha256) checked
            table = open_shard(path)
            for source, target in zip(table.column("source_ids").chunks, table.column("target_ids").chunks):
                self.columns.append((
                    numpy_view(source.offsets), numpy_view(source.values),
                    numpy_view(target.offsets), numpy_view(target.values),
                ))
                row_counts.append(len(source))
        self.shard_starts = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def lengths(self) -> np.ndarray:
        """(N, 2) int32 source and target lengths, from the Arrow offsets alone."""
        return np.concatenate([
            np.stack([np.diff(source_offsets), np.diff(target_offsets)], axis=1)
            for source_offsets, _, target_offsets, _ in self.columns
        ]).astype(np.int32) if self.columns else np.zeros((0, 2), np.int32)

    def max_lengths(self) -> tuple[int, int]:
        """The longest source and target stored."""
        lengths = self.lengths()
        return (int(lengths[:, 0].max()), int(lengths[:, 1].max())) if len(lengths) else (0, 0)

    def example(self, index: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The stored example; stored masks do not change with the epoch."""
        return self[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        row = index - int(self.shard_starts[shard])
        source_offsets, source_values, target_offsets, target_values = self.columns[shard]
        return (
            source_values[source_offsets[row] : source_offsets[row + 1]],
            target_values[target_offsets[row] : target_offsets[row + 1]],
        )


# The collator pads lengths to a multiple of 8 (tensor cores); batch plans count the same padding.
PAD_MULTIPLE = 8


def _pad_to_multiple(length: "int | np.ndarray", multiple: int) -> "int | np.ndarray":
    return (length + multiple - 1) // multiple * multiple


def padded_batch_cost(source_lengths: np.ndarray, target_lengths: np.ndarray, pad_multiple: int = PAD_MULTIPLE) -> int:
    """Tokens a micro batch occupies once the collator pads it: rows x (padded source + target)."""
    return len(source_lengths) * int(_pad_to_multiple(int(source_lengths.max()), pad_multiple)
                                     + _pad_to_multiple(int(target_lengths.max()), pad_multiple))


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
        source = _pad_to_multiple(lengths[members, 0], pad_multiple)
        target = _pad_to_multiple(lengths[members, 1], pad_multiple)
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


class ResumableDistributedSampler:
    """Yields this rank's example indices, micro batch by micro batch, forever (epoch after epoch).

    Each epoch is planned from (seed, epoch) alone: a global permutation, split into micro
    batches (:func:`plan_micro_batches`: fixed size, or grouped by length under a token
    budget) whose order is shuffled again when grouped; consecutive runs of ``world_size``
    micro batches form one *group*, and rank r takes the r-th batch of each group. The
    position is (epoch, micro batches consumed in it), so a resumed run continues exactly;
    batches that cannot fill a last group are left out of that epoch (``dropped_in_epoch``).

    The micro batch sequence does not depend on the number of ranks (windows are counted in
    micro batches), so a position saved by 2 ranks means the same data for 1 rank; resuming
    on another rank count rounds it up to whole groups.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 consumed_samples: int = 0, *, lengths: np.ndarray | None = None, max_tokens: int = 0,
                 group_window: int = 100, position: dict | None = None) -> None:
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
            longest = int(_pad_to_multiple(lengths, PAD_MULTIPLE).sum(axis=1).max())
            if longest > max_tokens:
                raise UserError(f"--max_tokens_per_batch {max_tokens} is smaller than the longest example "
                                f"({longest} padded source + target tokens); raise it to at least {longest}")
        self.consumed_samples = consumed_samples
        if position is None:  # fixed-size batches: the position follows from the samples consumed
            per_epoch = num_examples // self.block * self.block
            epoch, offset = divmod(consumed_samples, per_epoch)
            position = {"epoch": epoch, "micro_batches": offset // micro_batch_size}
        self.epoch = int(position["epoch"])
        # Saved by a different number of ranks: round up, skipping < world_size micro batches.
        self.groups = -(-int(position["micro_batches"]) // world_size)
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

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

    def state(self) -> dict:
        return {"epoch": self.epoch, "micro_batches": self.groups * self.world_size}

    def __iter__(self) -> Iterator[list[int]]:
        for planned in self.planned():
            yield planned.indices

    def planned(self) -> Iterator["PlannedBatch"]:
        """This rank's micro batches, each with the position the sampler reaches after it.

        A loader that prepares batches ahead advances the sampler past the batch being
        trained; the position a checkpoint records must travel with the batch instead.
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
            yield PlannedBatch(order[bounds[mine] : bounds[mine + 1]].tolist(), self.epoch, self.state(),
                               self.consumed_samples)


@dataclass(frozen=True)
class PlannedBatch:
    """One micro batch of one rank: example indices, the epoch (online masks depend on it), and
    the sampler's position and consumed samples (all ranks) once its group is trained."""

    indices: list[int]
    epoch: int
    position: dict
    consumed_samples: int


@dataclass(frozen=True)
class Seq2SeqCollator:
    """Pads a batch (to a multiple of 8, for tensor cores) and builds the decoder inputs.

    ``decoder_input_ids = [CLS] + target_ids[:-1]`` and ``labels = target_ids``, with
    padding in labels set to ``IGNORE_INDEX`` (-100) so the loss skips it.
    """

    pad_id: int
    decoder_start_id: int
    pad_multiple: int = PAD_MULTIPLE

    def __call__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        source_length = _pad_to_multiple(max(len(s) for s, _ in examples), self.pad_multiple)
        target_length = _pad_to_multiple(max(len(t) for _, t in examples), self.pad_multiple)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, source_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, source_length), dtype=torch.long)
        decoder_input_ids = torch.full((batch_size, target_length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, target_length), IGNORE_INDEX, dtype=torch.long)
        for row, (source, target) in enumerate(examples):
            source_t = torch.from_numpy(source.astype(np.int64))
            target_t = torch.from_numpy(target.astype(np.int64))
            input_ids[row, : len(source)] = source_t
            attention_mask[row, : len(source)] = 1
            labels[row, : len(target)] = target_t
            decoder_input_ids[row, 0] = self.decoder_start_id
            decoder_input_ids[row, 1 : len(target)] = target_t[:-1]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        }


@dataclass(frozen=True)
class DecoderInputDropout:
    """Word dropout on the decoder's teacher-forced inputs: each target token fed back to the
    decoder (never the start token) becomes [MASK] with a probability that falls linearly from
    ``probability`` at step 0 to 0 at ``until_step`` (constant when ``until_step`` is 0). The
    labels are untouched. The draw is a function of (seed, step, rank, micro batch), so a resumed
    run replays it exactly whatever the number of data workers."""

    probability: float
    until_step: int
    mask_id: int
    seed: int

    def probability_at(self, step: int) -> float:
        if self.until_step == 0:
            return self.probability
        return self.probability * max(0.0, 1.0 - step / self.until_step)

    def __call__(self, batch: dict[str, torch.Tensor], step: int, rank: int, micro_batch: int) -> dict[str, torch.Tensor]:
        probability = self.probability_at(step)
        if probability <= 0:
            return batch
        entropy = np.random.SeedSequence([self.seed, step, rank, micro_batch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(entropy) >> 1)
        inputs = batch["decoder_input_ids"]
        # A decoder input is a real token where its label is (inputs are the labels shifted right).
        eligible = batch["labels"] != IGNORE_INDEX
        eligible[:, 0] = False
        dropped = eligible & (torch.rand(inputs.shape, generator=generator) < probability).to(inputs.device)
        return {**batch, "decoder_input_ids": inputs.masked_fill(dropped, self.mask_id)}


class OnlineMaskedExamples:
    """Examples masked on the fly from a tokenized corpus, with the mask stage's functions.

    Long runs see fresh masks every epoch without storing them. Example ``i`` is one packed
    chunk of one document (the packing depends only on sentence lengths, so the index is
    built once from the memory-mapped offsets); its noise comes from a generator seeded by
    (seed, epoch, document, chunk), so any rank, worker or resumed run rebuilds it exactly.
    """

    def __init__(self, tokenized_dir: Path, mask_config: "MaskConfig", checksum: bool = True) -> None:
        from data_tools.mask import load_vocab_info
        from data_tools.shards import TokenizedCorpus

        self.corpus = TokenizedCorpus(tokenized_dir, checksum)
        self.manifest = self.corpus.manifest
        self.config = mask_config
        self.vocab = load_vocab_info(tokenized_dir, self.manifest)
        self.index = self._build_index()
        if len(self.index) == 0:
            raise UserError(f"{tokenized_dir} yields no {mask_config.target} examples with these mask settings")
        if os.environ.get("RANK", "0") == "0":
            notice_if_pure_python("train (online masking)")

    def _build_index(self) -> np.ndarray:
        from data_tools.noising import plan_chunks

        entries = []
        max_tokens = self.config.seq_length - 2
        for document in range(len(self.corpus)):
            lengths = [len(sentence) for sentence in self.corpus[document]]
            for chunk_index, chunk in enumerate(plan_chunks(lengths, max_tokens)):
                if self.config.target == "gsg" and len(chunk) < 2:
                    continue  # the mask stage skips these too
                entries.append((document, chunk_index, sum(end - start for _, start, end in chunk)))
        return np.asarray(entries, dtype=np.int64).reshape(-1, 3)

    def lengths(self) -> np.ndarray:
        """(N, 2) estimated source and target lengths: the chunk's tokens + [CLS]/[SEP] for both.

        Exact lengths depend on the epoch's noise; this bound is what length grouping and
        the token budget plan with (BART's insertion noise can add a few source tokens).
        """
        estimate = (self.index[:, 2] + 2).astype(np.int32)
        return np.stack([estimate, estimate], axis=1)

    def max_lengths(self) -> tuple[int, int]:
        """Bounds on the source and target lengths masking can produce with these settings."""
        target = self.config.tgt_seq_length if self.config.target == "gsg" else self.config.seq_length
        return self.config.seq_length, target

    def __len__(self) -> int:
        return len(self.index)

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        from data_tools.mask import mask_chunk
        from data_tools.noising import pack_sentences
        from data_tools.random_streams import LazyGenerator

        document, chunk_index = int(self.index[index, 0]), int(self.index[index, 1])
        sentences = [sentence.tolist() for sentence in self.corpus[document]]
        chunk = pack_sentences(sentences, self.config.seq_length - 2)[chunk_index]
        rng = LazyGenerator([self.config.seed, epoch, document, chunk_index])
        source, target = mask_chunk(chunk, rng, self.config, self.vocab)
        return np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64)


def load_training_data(data_dir: Path, online_mask_config: Path | None, output_dir: Path, checksum: bool = True) -> Any:
    """Stored examples (a mask stage output) or online masking (a tokenize stage output), every shard
    checked against its manifest (sha256 too unless ``checksum`` is False)."""
    from data_tools.mask import MaskConfig

    stage = load_manifest(data_dir, ("mask", "tokenize"))["stage"]
    if stage == "mask":
        if online_mask_config:
            raise UserError(f"{data_dir} holds masked examples; --online_mask_config needs a tokenize output")
        return ExampleShards(data_dir, checksum)
    if not online_mask_config:
        raise UserError(f"{data_dir} is a tokenized corpus: pass --online_mask_config to mask it on the fly, "
                        "or run the mask stage first")
    try:
        flags = json.loads(Path(online_mask_config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--online_mask_config {online_mask_config}: {error}") from error
    if not isinstance(flags, dict):
        raise UserError(f"--online_mask_config {online_mask_config} holds a JSON {type(flags).__name__}; it must be an "
                        "object of mask flags, e.g. {\"preset\": \"bart_paper\", \"seq_length\": 512}")
    unknown = set(flags) - {f.name for f in dataclasses.fields(MaskConfig)} | ({"input_dir", "output_dir"} & set(flags))
    if unknown:
        raise UserError(f"{online_mask_config}: unknown or not allowed mask flags {sorted(unknown)}")
    try:
        mask_config = MaskConfig(input_dir=data_dir, output_dir=output_dir, **flags)
    except UserError as error:
        raise UserError(f"--online_mask_config {online_mask_config}: {error}") from error
    return OnlineMaskedExamples(data_dir, mask_config, checksum)  # its vocab is checked by load_vocab_info
