"""Examples to padded tensors: the collator, and word dropout on the decoder's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.loss import IGNORE_INDEX
from pipeline.sampler import PAD_MULTIPLE, pad_to_multiple


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
        source_length = pad_to_multiple(max(len(s) for s, _ in examples), self.pad_multiple)
        target_length = pad_to_multiple(max(len(t) for _, t in examples), self.pad_multiple)
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
