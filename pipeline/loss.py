"""The training loss, computed here rather than by the HF model.

HF's BART/Pegasus compute cross entropy on the logits in the model's dtype: under bf16 the
logged loss, the eval loss and the non-finite-loss guard would see values rounded to ~0.016
near 3. The logits are upcast to fp32 first.

They also project every decoder position onto the vocab, padding included. The LM head is the
largest matrix product of a small model (d x vocab per position) and a third or more of a
random batch's target positions are padding, so the loss projects only the positions that
have a label: a forward pre-hook on the output embedding hands it those rows alone. The loss
and its gradients are those of the full projection (padding has no label, so it never
contributed); only the wasted work is gone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

# Label value of padding: the collator writes it, the loss skips it.
IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """fp32 cross entropy over the target tokens (labels == IGNORE_INDEX skipped): logits of shape
    (..., vocab) against labels of shape (...); "mean" per token, or "sum" for token-weighted averages
    across batches. The one loss of training, evaluation and zh-evaluate."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices of the labelled target positions: computed on the host with the batch,
    so that selecting them on the device needs no device-to-host sync (a boolean mask does: its
    result's size is data-dependent, so indexing with one waits for the device, twice a micro batch)."""
    return torch.nonzero(labels.flatten() != IGNORE_INDEX).squeeze(1)


def with_label_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its ``label_positions``, for batches still on the host."""
    return {**batch, "label_positions": label_positions(batch["labels"])}


@contextlib.contextmanager
def projected_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's LM head sees only the decoder states at ``positions`` (flat indices
    into batch x target length, on the model's device): its logits come back as (positions, vocab)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    head = module.get_output_embeddings()
    handle = head.register_forward_pre_hook(
        lambda _head, args: (args[0].flatten(0, 1).index_select(0, positions), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the model (a DeepSpeed engine or an HF module) without labels: the logits of the labelled
    positions, (positions, vocab) in the model's dtype, and their labels. The batch's ``label_positions``
    (``with_label_positions``) are used when present; without them they are found on the device, which costs
    a sync."""
    labels = batch["labels"]
    positions = batch.get("label_positions")
    if positions is None:
        positions = label_positions(labels)
    with projected_positions(model, positions):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    return logits, labels.flatten().index_select(0, positions)


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """The fp32 loss of a batch, scored on the labelled positions only (:func:`labelled_logits`)."""
    return token_cross_entropy(*labelled_logits(model, batch), reduction=reduction)
