"""The GPU tier: what only a CUDA device can show. Skipped, with the reason, where CUDA is absent.

Run it on a GPU machine with ``bash bin/test.sh -m gpu`` (README: "GPU test tier"). Each run
uses one GPU (``deepspeed --num_gpus 1``) and the tiny models, so the tier takes a few minutes:
bf16 ZeRO-2 with DeepSpeed's CUDA FusedAdam under the collective guard; fp16 with dynamic
loss scaling and the skipped-step stop; apex's FusedLayerNorm against ``nn.LayerNorm``; kill -9
and resume with dropout on, losses bitwise equal; export parity from a GPU-trained checkpoint;
and the throughput benchmark's GPU path for a few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DEEPSPEED, PROJECT_ROOT, gpu_env, run_command

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

STEPS = 8


def ds_config(tmp_path: Path, name: str, **changes) -> Path:
    """A shipped GPU config with some values changed, written beside the test's files."""
    config = json.loads((PROJECT_ROOT / "ds_configs" / name).read_text())
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{Path(name).stem}-test.json"
    path.write_text(json.dumps(config))
    return path


def train_command(script: Path, data_dir: Path, run_dir: Path, config: Path, port: int, *extra: str) -> list[str]:
    return [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(port), str(script), "--data_dir", str(data_dir),
            "--output_dir", str(run_dir), "--model_config", "bart-tiny", "--deepspeed_config", str(config),
            "--total_steps", str(STEPS), "--micro_batch_size", "8", "--save_checkpoint_steps", "4",
            "--log_every_steps", "1", "--learning_rate", "1e-3", "--warmup_steps", "2", "--no-progress", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_bf16_zero2_with_cuda_fused_adam_and_every_collective_on_the_gpu(bart_examples_dir, tmp_path):
    """The first GPU run of a user: bf16, ZeRO-2, FusedAdam's CUDA op, NCCL; the collective guard fails
    the run if any collective gets a CPU tensor (NCCL's own error would be the user's first log step)."""
    run_dir = tmp_path / "run"
    result = run_command(train_command(PROJECT_ROOT / "tests" / "collective_guard.py", bart_examples_dir, run_dir,
                                       PROJECT_ROOT / "ds_configs" / "zero2_bf16.json", 29760,
                                       "--eval_examples", "32", "--eval_every_steps", "4"), env=gpu_env())
    assert "bf16 on 1 x cuda" in result.stderr and "optimizer FusedAdam" in result.stderr
    assert "collective guard rank 0:" in result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == STEPS and all(r["peak_memory_gb"] > 0 for r in trained)
    assert trained[-1]["loss"] < trained[0]["loss"]
    assert len([r for r in records if "eval_loss" in r]) == 2
    # the fp32 loss is not rounded to bf16's ~3 significant digits
    assert any(abs(r["loss"] - float(torch.tensor(r["loss"]).bfloat16())) > 0 for r in trained)


def test_fp16_dynamic_loss_scaling_and_the_skipped_step_stop(bart_examples_dir, tmp_path):
    run_dir = tmp_path / "fp16"
    run_command(train_command(PROJECT_ROOT / "pipeline" / "trainer.py", bart_examples_dir, run_dir,
                              PROJECT_ROOT / "ds_configs" / "zero2_fp16.json", 29761), env=gpu_env())
    trained = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all("loss_scale" in r and "skipped_steps" in r for r in trained)
    assert trained[-1]["loss_scale"] <= 2**16  # the scale adapts (initial 2^16 overflows at first and halves)
    # A scale that starts at 2^40 overflows step after step: the run stops with one line, exit 2.
    overflowing = ds_config(tmp_path, "zero2_fp16.json",
                            fp16={"initial_scale_power": 40, "hysteresis": 1, "min_loss_scale": 1})
    command = train_command(PROJECT_ROOT / "pipeline" / "trainer.py", bart_examples_dir, tmp_path / "overflow",
                            overflowing, 29762, "--max_skipped_steps", "3")
    result = subprocess.run(command, capture_output=True, text=True, env=gpu_env(), timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "steps in a row were skipped for fp16 overflow" in result.stderr


def test_apex_fused_layer_norm_equals_torch_layer_norm_and_keeps_the_state_dict():
    pytest.importorskip("apex.normalization", reason="apex is not installed (the Docker image builds it)")
    from pipeline.model import build_model, load_model_config, use_fused_layer_norm

    special = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    torch.manual_seed(0)
    reference = build_model(load_model_config("bart-tiny", 500, special)).cuda().bfloat16().eval()
    fused = build_model(load_model_config("bart-tiny", 500, special))
    fused.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    kernel = use_fused_layer_norm(fused, "cuda")
    fused = fused.cuda().bfloat16().eval()
    assert kernel.startswith("apex.normalization.FusedLayerNorm")
    assert reference.state_dict().keys() == fused.state_dict().keys()  # the export does not see the kernel
    inputs = torch.randint(104, 500, (4, 32), device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=inputs, decoder_input_ids=inputs).logits.float()
        actual = fused(input_ids=inputs, decoder_input_ids=inputs).logits.float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)  # bf16: ~3 significant digits


def test_kill_9_then_resume_on_gpu_replays_dropout_bitwise(bart_examples_dir, tmp_path):
    """Dropout on (bart-tiny: 0.1) draws from the CUDA generator: without its state in the checkpoint,
    the resumed steps would differ. Deterministic kernels so two runs can be compared bit for bit."""
    from tests.test_resume import kill_after_step

    config = PROJECT_ROOT / "ds_configs" / "zero2_bf16.json"
    script = PROJECT_ROOT / "pipeline" / "trainer.py"
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_command(train_command(script, bart_examples_dir, reference, config, 29763, "--deterministic"), env=gpu_env())
    kill_after_step(train_command(script, bart_examples_dir, crashed, config, 29764, "--deterministic"), crashed, 6,
                    env=gpu_env())
    assert (crashed / "checkpoints" / "latest").read_text() == "step00000004"
    rng = torch.load(crashed / "checkpoints" / "step00000004" / "rng_state_rank0.pt", weights_only=True)
    assert "accelerator" in rng  # the CUDA generator's state travels with the checkpoint
    result = run_command(train_command(script, bart_examples_dir, crashed, config, 29765, "--deterministic"),
                         env=gpu_env())
    assert "resuming from step00000004 (step 4)" in result.stderr
    assert losses(crashed) == losses(reference)


def test_export_of_a_gpu_trained_checkpoint_equals_its_fp32_master_weights(bart_examples_dir, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import BartForConditionalGeneration

    from pipeline.convert_to_hf import ExportConfig, export

    run_dir = tmp_path / "run"
    run_command(train_command(PROJECT_ROOT / "pipeline" / "trainer.py", bart_examples_dir, run_dir,
                              PROJECT_ROOT / "ds_configs" / "zero2_bf16.json", 29766), env=gpu_env())
    master = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step00000008")
    exported = BartForConditionalGeneration.from_pretrained(str(export(ExportConfig(
        run_dir=run_dir, output_dir=tmp_path / "hf"))))
    weights = exported.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in master.items())
    inputs = torch.randint(104, 1000, (2, 16))
    exported.eval()
    rebuilt = BartForConditionalGeneration(exported.config).eval()
    rebuilt.load_state_dict(master, strict=False)
    rebuilt.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=inputs, decoder_input_ids=inputs).logits,
                                   rebuilt(input_ids=inputs, decoder_input_ids=inputs).logits, rtol=0, atol=1e-5)


def test_throughput_benchmark_gpu_path_runs(tmp_path):
    """``python -m bench.train_throughput``'s GPU part for a few steps: its figures come out as JSON lines."""
    # PEGASUS base only: both cases take 5-8 minutes, more than a lent GPU window's command (bin/gpu_check.sh
    # runs each case as a step of its own).
    result = run_command([sys.executable, "-m", "bench.train_throughput", "--quick", "--gpu_quick", "--cases",
                          "pegasus-base"], env=gpu_env(), timeout=1200, cwd=PROJECT_ROOT)
    figures = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    names = {figure["metric"] for figure in figures}
    assert "pegasus-base_speedup_vs_hf_trainer" in names and "pegasus-base_mfu" in names
    assert all(figure["value"] is not None for figure in figures if figure["metric"].endswith("tokens_per_s"))
