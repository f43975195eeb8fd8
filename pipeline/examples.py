"""Training examples by index: stored (a mask stage output) or masked on the fly from a tokenized
corpus. Every kind has the :class:`Seq2SeqExamples` surface, which is all the sampler, the loader,
evaluation and the benchmarks use."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from data_tools.common import UserError
from data_tools.compiled import notice_if_pure_python
from data_tools.shards import checked_vocab_file, load_manifest, numpy_view, open_shard, shard_paths

if TYPE_CHECKING:
    from data_tools.mask import MaskConfig


class Seq2SeqExamples(Protocol):
    """What training reads: ``len(examples)`` examples, example ``i`` of an epoch as (source_ids,
    target_ids) without special padding, and the lengths the batch planner groups by."""

    def __len__(self) -> int: ...

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]: ...

    def lengths(self) -> np.ndarray:
        """(N, 2) int32 source and target lengths (bounds where the masks change with the epoch)."""
        ...

    def max_lengths(self) -> tuple[int, int]: ...


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
