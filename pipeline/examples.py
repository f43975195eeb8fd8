"""Training examples by index: stored (a mask stage output) or masked on the fly from a tokenized
corpus. Every kind has the :class:`Seq2SeqExamples` surface, which is all the sampler, the loader,
evaluation and the benchmarks use."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from data_tools.common import UserError
from data_tools.compiled import notice_if_pure_python
from data_tools.masking.online import CorpusChunks, mask_chunk
from data_tools.masking.recipe import MASK_STAGE_RUN_FLAGS, RECIPE_FLAGS, MaskRecipe
from data_tools.masking.streams import masking_randomness
from data_tools.masking.vocab import load_vocab_info
from data_tools.shards import checked_vocab_file, load_manifest, numpy_view, open_shard, shard_paths

if TYPE_CHECKING:
    from data_tools.mask import MaskConfig


class Seq2SeqExamples(Protocol):
    """What training and evaluation read, whatever the kind (stored, masked online, a mixture):
    ``len(examples)`` examples; example ``i`` of an epoch as (source_ids, target_ids), unpadded;
    the lengths the batch planner groups by; and the data's ``manifest``, whose ``"vocab"`` record
    (size, sha256, special token ids) the model config, the vocab checks and a resume rely on."""

    manifest: dict

    def __len__(self) -> int: ...

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]: ...

    def lengths(self) -> np.ndarray:
        """(N, 2) int32 source and target lengths (bounds where the masks change with the epoch)."""
        ...

    def max_lengths(self) -> tuple[int, int]: ...


@runtime_checkable
class CorpusMixture(Seq2SeqExamples, Protocol):
    """Examples drawn from several corpora (``--data_dirs``): the optional part of the surface, with
    which the metrics log what each corpus supplied. A single corpus has none of it."""

    def corpus_names(self) -> list[str]: ...

    def corpus_counts(self, indices: Sequence[int]) -> tuple[int, ...]: ...

    def describe(self) -> str:
        """One line for the start-up log: each corpus's weight and share."""
        ...


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
    """Examples masked on the fly from a tokenized corpus, with the mask stage's kernels (data_tools.masking).

    Long runs see fresh masks every epoch without storing them. Example ``i`` is one packed chunk of one
    document, found by an offset index built once from the memory-mapped offsets (the packing depends
    only on sentence lengths) and read back by slicing the mapped shard; its noise comes from
    ``masking_randomness(seed, epoch, document, chunk)``, so any rank, worker or resumed run rebuilds it
    exactly.
    """

    def __init__(self, tokenized_dir: Path, recipe: "MaskRecipe | MaskConfig", checksum: bool = True) -> None:
        if not isinstance(recipe, MaskRecipe):
            recipe = recipe.recipe()  # zh-mask's MaskConfig: the recipe its flags describe
        self.recipe = recipe
        self.manifest = load_manifest(tokenized_dir, "tokenize")
        self.chunks = CorpusChunks(tokenized_dir, self.manifest, recipe, checksum)
        self.vocab = load_vocab_info(tokenized_dir, self.manifest)
        if len(self.chunks) == 0:
            raise UserError(f"{tokenized_dir} yields no {recipe.target} examples with these mask settings")
        if os.environ.get("RANK", "0") == "0":
            notice_if_pure_python("train (online masking)")

    def lengths(self) -> np.ndarray:
        """(N, 2) estimated source and target lengths: the chunk's tokens + [CLS]/[SEP] for both.

        Exact lengths depend on the epoch's noise; this bound is what length grouping and
        the token budget plan with (BART's insertion noise can add a few source tokens).
        """
        estimate = (self.chunks.tokens + 2).astype(np.int32)
        return np.stack([estimate, estimate], axis=1)

    def max_lengths(self) -> tuple[int, int]:
        """Bounds on the source and target lengths masking can produce with these settings."""
        target = self.recipe.tgt_seq_length if self.recipe.target == "gsg" else self.recipe.seq_length
        return self.recipe.seq_length, target

    def __len__(self) -> int:
        return len(self.chunks)

    def example(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        document, number, flat, offsets = self.chunks.chunk(index)
        randomness = masking_randomness(self.recipe.seed, epoch, document, number)
        return mask_chunk(flat, offsets, randomness, self.recipe, self.vocab)


def load_training_data(data_dir: Path, online_mask_config: Path | None, checksum: bool = True) -> Any:
    """Stored examples (a mask stage output) or online masking (a tokenize stage output), every shard
    checked against its manifest (sha256 too unless ``checksum`` is False)."""
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
    unknown = set(flags) - set(RECIPE_FLAGS) - MASK_STAGE_RUN_FLAGS  # zh-mask's run flags are accepted, unused
    if unknown:
        raise UserError(f"{online_mask_config}: unknown or not allowed mask flags {sorted(unknown)}")
    try:
        recipe = MaskRecipe(**{name: value for name, value in flags.items() if name in RECIPE_FLAGS})
    except UserError as error:
        raise UserError(f"--online_mask_config {online_mask_config}: {error}") from error
    return OnlineMaskedExamples(data_dir, recipe, checksum)  # its vocab is checked by load_vocab_info
