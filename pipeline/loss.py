"""The training loss, computed here rather than by the HF model.

HF's BART/Pegasus compute cross entropy on the logits in the model's dtype: under bf16 the
logged loss, the eval loss and the non-finite-loss guard would see values rounded to ~0.016
near 3. The logits are upcast to fp32 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Label value of padding: the collator writes it, the loss skips it.
IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """fp32 cross entropy over the target tokens (labels == IGNORE_INDEX skipped); "mean" per
    token, or "sum" for token-weighted averages across batches."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Forward the model (a DeepSpeed engine or an HF module) without labels and score its logits in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    return token_cross_entropy(logits, batch["labels"], reduction)
