"""Model FLOPs of encoder-decoder training, for MFU.

Matmul FLOPs only (2 per multiply-add), counted per real (non-padding) token; training is
3x the forward pass (backward costs twice the forward). With d = d_model, f = FFN width,
V = vocab size, L_e / L_d = encoder / decoder layers, S / T = source / target length of
one example:

    encoder, per source token and layer:  8d^2 (Q,K,V,O) + 4df (FFN) + 4Sd (scores, values)
    decoder, per target token and layer:  8d^2 + 4Td (self-attention)
                                          + 4d^2 + 4Sd (cross-attention Q,O; scores, values)
                                          + 4df (FFN)
    decoder cross-attention K,V, per source token and decoder layer: 4d^2
    LM head, per target token:            2dV

    forward(S, T) = S*L_e*(8d^2 + 4df + 4Sd) + T*L_d*(12d^2 + 4Td + 4Sd + 4df) + S*L_d*4d^2 + T*2dV
    training(S, T) = 3 * forward(S, T)

Attention over the causal decoder is counted in full (T, not T/2), as PaLM's MFU does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Dense (no sparsity) bf16/fp16 tensor-core peak TFLOP/s per device, from NVIDIA's data sheets,
# keyed by the exact name torch.cuda.get_device_name() reports. Matched exactly, not by
# substring: an H100 PCIe (756) or NVL (835) must not be rated as the SXM part (989).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # H200 SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA H800": 989.4,  # H800 SXM5
    "NVIDIA H800 PCIe": 756.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA A800 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.1,
}


def training_flops(config: Any, source_lengths: np.ndarray, target_lengths: np.ndarray) -> float:
    """FLOPs of one training step over examples with these source and target lengths."""
    d, f, vocab = config.d_model, config.encoder_ffn_dim, config.vocab_size
    f_dec = config.decoder_ffn_dim
    layers_e, layers_d = config.encoder_layers, config.decoder_layers
    s = np.asarray(source_lengths, dtype=np.float64)
    t = np.asarray(target_lengths, dtype=np.float64)
    forward = (
        s * layers_e * (8 * d * d + 4 * d * f + 4 * s * d)
        + t * layers_d * (12 * d * d + 4 * t * d + 4 * s * d + 4 * d * f_dec)
        + s * layers_d * 4 * d * d
        + t * 2 * d * vocab
    )
    return float(3 * forward.sum())


def peak_flops_per_device(requested_tflops: float, device_name: str | None) -> float | None:
    """The peak to divide by: the flag when given (> 0), else the listed figure of exactly this
    product, else None (no MFU; the trainer says to pass --peak_tflops)."""
    if requested_tflops > 0:
        return requested_tflops * 1e12
    tflops = PEAK_TFLOPS.get((device_name or "").strip())
    return None if tflops is None else tflops * 1e12
