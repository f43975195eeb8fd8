from types import SimpleNamespace

import pytest

from pipeline.flops import peak_flops_per_device, training_flops


def test_training_flops_equal_a_hand_count():
    config = SimpleNamespace(d_model=4, encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=10, encoder_layers=1,
                             decoder_layers=2)
    # one example, S = 3 source tokens, T = 2 target tokens
    encoder = 3 * 1 * (8 * 16 + 4 * 4 * 8 + 4 * 3 * 4)  # 3 * (128 + 128 + 48) = 912
    decoder = 2 * 2 * (12 * 16 + 4 * 2 * 4 + 4 * 3 * 4 + 4 * 4 * 8)  # 4 * (192 + 32 + 48 + 128) = 1600
    cross_kv = 3 * 2 * 4 * 16  # 384
    head = 2 * 2 * 4 * 10  # 160
    assert encoder + decoder + cross_kv + head == 3056
    assert training_flops(config, [3], [2]) == 3 * 3056
    # examples add up
    assert training_flops(config, [3, 3], [2, 2]) == 2 * 3 * 3056


def test_peak_flops():
    assert peak_flops_per_device(100.0, "anything") == pytest.approx(1e14)
    assert peak_flops_per_device(0, "NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops_per_device(0, "cpu") is None


def test_peak_flops_match_the_exact_product_not_a_substring():
    # An H100 PCIe or NVL is slower than the SXM part: rating it as SXM would understate MFU by a quarter.
    assert peak_flops_per_device(0, "NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert peak_flops_per_device(0, "NVIDIA H100 NVL") == pytest.approx(835.5e12)
    assert peak_flops_per_device(0, "NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops_per_device(0, "NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops_per_device(0, "NVIDIA H100 Something New") is None  # unknown: no guess, --peak_tflops
