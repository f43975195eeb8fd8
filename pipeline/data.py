"""The training data path: memory-mapped example shards, a resumable sampler, a collator.

Order is a pure function of (seed, epoch, consumed samples): resuming only needs the
number of samples consumed, and every rank computes the same global permutation and
takes its own slice, so no example is read twice or skipped within an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from data_tools.cli import UserError
from data_tools.shards import load_manifest, open_shard, shard_paths

if TYPE_CHECKING:
    from data_tools.mask import MaskConfig


class ExampleShards:
    """Random access to (source_ids, target_ids) by global example index, zero-copy."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, "mask")
        # One entry per Arrow record batch: combine_chunks() would copy whole shards into memory.
        self.columns: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        row_counts = []
        for path, shard in zip(shard_paths(self.directory, self.manifest), self.manifest["shards"]):
            table = open_shard(path)
            if table.num_rows != shard["rows"]:
                raise UserError(f"{path} has {table.num_rows} rows, its manifest says {shard['rows']}; re-run mask")
            for source, target in zip(table.column("source_ids").chunks, table.column("target_ids").chunks):
                self.columns.append((
                    source.offsets.to_numpy(), source.values.to_numpy(zero_copy_only=True),
                    target.offsets.to_numpy(), target.values.to_numpy(zero_copy_only=True),
                ))
                row_counts.append(len(source))
        self.shard_starts = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

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


@dataclass(frozen=True)
class SamplerState:
    consumed_samples: int = 0


class ResumableDistributedSampler:
    """Yields this rank's example indices, micro batch by micro batch, forever (epoch after epoch).

    Each global step of ``micro_batch_size * world_size`` samples takes the next block of
    the epoch's permutation; rank r gets rows [r*micro, (r+1)*micro) of the block. The
    tail of an epoch that cannot fill a whole block is left out of that epoch (and
    reported by :meth:`samples_dropped_per_epoch`).
    """

    def __init__(self, num_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 consumed_samples: int = 0) -> None:
        self.block = micro_batch_size * world_size
        if num_examples < self.block:
            raise UserError(
                f"{num_examples} training examples cannot fill one step of micro_batch_size {micro_batch_size} "
                f"x {world_size} ranks; lower --micro_batch_size or mask more data"
            )
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.samples_per_epoch = (num_examples // self.block) * self.block
        self.epoch = consumed_samples // self.samples_per_epoch  # of the indices yielded last

    def samples_dropped_per_epoch(self) -> int:
        return self.num_examples - self.samples_per_epoch

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
            self.epoch = epoch
            permutation = self.epoch_permutation(epoch)
            for start in range(offset, self.samples_per_epoch, self.block):
                first = start + self.rank * self.micro_batch_size
                self.consumed_samples = start + self.block + epoch * self.samples_per_epoch
                yield permutation[first : first + self.micro_batch_size].tolist()


def _pad_to_multiple(length: int, multiple: int) -> int:
    return (length + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Seq2SeqCollator:
    """Pads a batch (to a multiple of 8, for tensor cores) and builds the decoder inputs.

    ``decoder_input_ids = [CLS] + target_ids[:-1]`` and ``labels = target_ids``, with
    padding in labels set to -100 so the loss ignores it.
    """

    pad_id: int
    decoder_start_id: int
    pad_multiple: int = 8

    def __call__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        source_length = _pad_to_multiple(max(len(s) for s, _ in examples), self.pad_multiple)
        target_length = _pad_to_multiple(max(len(t) for _, t in examples), self.pad_multiple)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, source_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, source_length), dtype=torch.long)
        decoder_input_ids = torch.full((batch_size, target_length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, target_length), -100, dtype=torch.long)
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


class OnlineMaskedExamples:
    """Examples masked on the fly from a tokenized corpus, with the mask stage's functions.

    Long runs see fresh masks every epoch without storing them. Example ``i`` is one packed
    chunk of one document (the packing depends only on sentence lengths, so the index is
    built once from the memory-mapped offsets); its noise comes from a generator seeded by
    (seed, epoch, document, chunk), so any rank, worker or resumed run rebuilds it exactly.
    """

    def __init__(self, tokenized_dir: Path, mask_config: "MaskConfig") -> None:
        from data_tools.mask import load_vocab_info
        from data_tools.shards import TokenizedCorpus

        self.corpus = TokenizedCorpus(tokenized_dir)
        self.manifest = self.corpus.manifest
        self.config = mask_config
        self.vocab = load_vocab_info(tokenized_dir, self.manifest)
        self.index = self._build_index()
        if len(self.index) == 0:
            raise UserError(f"{tokenized_dir} yields no {mask_config.target} examples with these mask settings")

    def _build_index(self) -> np.ndarray:
        from data_tools.noising import plan_chunks

        entries = []
        max_tokens = self.config.seq_length - 2
        for document in range(len(self.corpus)):
            lengths = [len(sentence) for sentence in self.corpus[document]]
            for chunk_index, chunk in enumerate(plan_chunks(lengths, max_tokens)):
                if self.config.target == "gsg" and len(chunk) < 2:
                    continue  # the mask stage skips these too
                entries.append((document, chunk_index))
        return np.asarray(entries, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.index)

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        from data_tools.mask import mask_chunk
        from data_tools.noising import pack_sentences

        document, chunk_index = (int(v) for v in self.index[index])
        sentences = [sentence.tolist() for sentence in self.corpus[document]]
        chunk = pack_sentences(sentences, self.config.seq_length - 2)[chunk_index]
        rng = np.random.default_rng([self.config.seed, epoch, document, chunk_index])
        source, target = mask_chunk(chunk, rng, self.config, self.vocab)
        return np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64)
