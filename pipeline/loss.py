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
    """fp32 cross entropy over the target tokens (labels == IGNORE_INDEX skipped); "mean" per
    token, or "sum" for token-weighted averages across batches."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@contextlib.contextmanager
def projected_positions(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's LM head sees only the decoder states where ``keep`` (batch x
    target length, bool) is True: its logits come back as (kept positions, vocab), in row-major order."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    head = module.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _head, args: (args[0][keep], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Forward the model (a DeepSpeed engine or an HF module) without labels and score the logits of the
    labelled positions in fp32."""
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    with projected_positions(model, keep):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)
