"""The seed recipes (bin/recipes/uer-pegasus-base.sh, uer-bart-medium.sh) and their GPU-hour estimate.

The estimate's figures are checked against a count by hand of pipeline/flops.py's formula; the
recipes' refusals run in a second; the two dry runs (3 steps of the real architectures on 2 CPU
ranks, then the exports and the card's snippet) take 3-6 minutes each on 2 cores and are slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from pipeline import recipe_estimate
from pipeline.recipe_estimate import ASSUMED_DEVICE, EstimateConfig, estimate, main
from tests.conftest import PROJECT_ROOT, deepspeed_env, run_command, shared_file

RECIPES = PROJECT_ROOT / "bin" / "recipes"

# pegasus-base, d 768, FFN 3072, V 21128, 12+12 layers, S 512, T 128 (flops.py's formula):
#   encoder  512 * 12 * (8d^2 4,718,592 + 4df 9,437,184 + 4Sd 1,572,864)              = 96,636,764,160
#   decoder  128 * 12 * (12d^2 7,077,888 + 4Td 393,216 + 4Sd 1,572,864 + 4df 9,437,184) = 28,387,049,472
#   cross K,V  512 * 12 * 4d^2 2,359,296                                               = 14,495,514,624
#   LM head  128 * 2 * 768 * 21128                                                      =  4,153,933,824
#   forward 143,673,262,080; training x3
PEGASUS_BASE_FLOPS = 431_019_786_240
# bart-medium, 4+4 layers, S = T = 512:
#   encoder  512 * 4 * (4,718,592 + 9,437,184 + 1,572,864)                             = 32,212,254,720
#   decoder  512 * 4 * (7,077,888 + 4Td 1,572,864 + 4Sd 1,572,864 + 9,437,184)         = 40,265,318,400
#   cross K,V  512 * 4 * 2,359,296                                                     =  4,831,838,208
#   LM head  512 * 2 * 768 * 21128                                                      = 16,615,735,296
#   forward 93,925,146,624; training x3
BART_MEDIUM_FLOPS = 281_775_439_872
H100_SXM_PEAK = 989.4e12


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(recipe_estimate, "detected_gpu", lambda: None)


def test_pegasus_base_schedule_equals_the_hand_count(no_gpu):
    result = estimate(EstimateConfig(model_config="pegasus-base", source_length=512, target_length=128,
                                     total_steps=1_000_000, global_batch_size=64, gpus=8, export_step=250_000))
    assert result.flops_per_example == PEGASUS_BASE_FLOPS
    total = PEGASUS_BASE_FLOPS * 64 * 1_000_000  # 2.7585e19
    assert result.total_flops == total
    # 2.7585e19 / (0.35 x 989.4e12 FLOP/s) = 79,659.4 s = 22.13 GPU-hours, 2.77 h on 8 GPUs
    assert result.gpu_hours == pytest.approx(total / (0.35 * H100_SXM_PEAK) / 3600)
    assert result.gpu_hours == pytest.approx(22.1276, abs=1e-3)
    assert result.wall_clock_hours == pytest.approx(22.1276 / 8, abs=1e-3)
    assert result.export_gpu_hours == pytest.approx(22.1276 / 4, abs=1e-3)  # step 250,000 of 1,000,000
    assert (result.device, result.peak_tflops, result.mfu) == (ASSUMED_DEVICE, 989.4, 0.35)
    assert result.device_note.startswith("assumed") and result.mfu_note.startswith("assumed")


def test_bart_medium_schedule_equals_the_hand_count(no_gpu):
    result = estimate(EstimateConfig(model_config="bart-medium", source_length=512, target_length=512))
    assert result.flops_per_example == BART_MEDIUM_FLOPS
    # 1.8034e19 / 3.4629e14 FLOP/s = 52,076.7 s = 14.47 GPU-hours
    assert result.gpu_hours == pytest.approx(14.4657, abs=1e-3)


def test_the_gpu_is_detected_given_or_assumed(monkeypatch):
    monkeypatch.setattr(recipe_estimate, "detected_gpu", lambda: "NVIDIA H100 PCIe")
    detected = estimate(EstimateConfig())
    assert (detected.device, detected.device_note, detected.peak_tflops) == ("NVIDIA H100 PCIe", "detected", 756.5)
    assert detected.gpu_hours == pytest.approx(PEGASUS_BASE_FLOPS * 64e6 / (0.35 * 756.5e12) / 3600)
    given = estimate(EstimateConfig(device_name="NVIDIA H200"))
    assert (given.device, given.device_note, given.peak_tflops) == ("NVIDIA H200", "given", 989.4)
    # A GPU the table does not rate: the H100 SXM's peak, said so; --peak_tflops rates it.
    monkeypatch.setattr(recipe_estimate, "detected_gpu", lambda: "Tesla V100-SXM2-32GB")
    unknown = estimate(EstimateConfig())
    assert unknown.peak_tflops == 989.4 and "no peak known for 'Tesla V100-SXM2-32GB'" in unknown.device_note
    rated = estimate(EstimateConfig(peak_tflops=125.0))
    assert (rated.device, rated.peak_tflops) == ("Tesla V100-SXM2-32GB", 125.0)
    assert rated.gpu_hours == pytest.approx(unknown.gpu_hours * 989.4 / 125.0)


def test_the_mfu_is_given_measured_or_assumed(no_gpu, monkeypatch):
    assumed = estimate(EstimateConfig())
    given = estimate(EstimateConfig(mfu=0.5))
    assert (given.mfu, given.mfu_note) == (0.5, "given")
    assert given.gpu_hours == pytest.approx(assumed.gpu_hours * 0.35 / 0.5)
    monkeypatch.setattr(recipe_estimate, "MEASURED_MFU", {("pegasus-base", ASSUMED_DEVICE): 0.42})
    measured = estimate(EstimateConfig())
    assert measured.mfu == 0.42 and measured.mfu_note.startswith("measured")


def test_lengths_from_a_mask_output_average_the_real_examples(no_gpu, bart_examples_dir):
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.flops import training_flops
    from pipeline.recipe_estimate import architecture

    result = estimate(EstimateConfig(model_config="bart-medium", examples_dir=bart_examples_dir, sample_examples=50))
    shard = sorted(bart_examples_dir.glob("examples-*.arrow"))[0]
    table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all().slice(0, 50)
    sources = pc.list_value_length(table.column("source_ids")).to_numpy()
    targets = pc.list_value_length(table.column("target_ids")).to_numpy()
    assert result.flops_per_example == pytest.approx(training_flops(architecture("bart-medium"), sources, targets) / 50)
    assert result.mean_source_length == pytest.approx(sources.mean()) and "mean of 50 examples" in result.lengths_from


def test_cli_prints_the_estimate_and_refuses_bad_flags_in_one_line(no_gpu, capsys):
    assert main(["--label", "uer-pegasus-base", "--export_step", "250000"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(line.startswith("estimate uer-pegasus-base: ") for line in out)
    assert "0.431 TFLOP per example" in out[0] and "(full-length)" in out[0]
    assert "NVIDIA H100 80GB HBM3 (assumed, H100 SXM: no GPU detected" in out[1]
    assert "MFU 35% (assumed" in out[1] and "22.1 GPU-hours, 2.8 h wall-clock on 8 GPUs" in out[1]
    assert "step 250,000: 5.5 GPU-hours" in out[2]
    assert main(["--mfu", "1.5"]) == 2
    assert main(["--export_step", "2000000"]) == 2
    assert main(["--model_config", "no-such-config"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all("error:" in line for line in errors)


def test_the_seed_configs_are_the_seeds_architectures():
    configs = {name: json.loads((PROJECT_ROOT / "pipeline" / "model_configs" / f"{name}.json").read_text())
               for name in ("pegasus-base", "bart-medium")}
    shared = dict(d_model=768, encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                  decoder_ffn_dim=3072, vocab_size=21128, max_position_embeddings=512)
    assert {k: configs["bart-medium"][k] for k in shared} == shared
    assert {k: configs["pegasus-base"][k] for k in shared} == shared
    bart, pegasus = configs["bart-medium"], configs["pegasus-base"]
    assert (bart["encoder_layers"], bart["decoder_layers"], bart["activation_function"]) == (4, 4, "gelu")
    assert bart["normalize_before"] is False  # post-LN, learned positions
    assert (pegasus["encoder_layers"], pegasus["decoder_layers"], pegasus["activation_function"]) == (12, 12, "relu")
    assert pegasus["normalize_before"] is True and pegasus["scale_embedding"] is True


def recipe(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    full_env = deepspeed_env()
    full_env.pop("DS_ACCELERATOR")  # as a user's shell: bin/env.sh decides
    full_env.update(env or {})
    return subprocess.run(["bash", str(RECIPES / f"{name}.sh"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.mark.parametrize("name", ["uer-pegasus-base", "uer-bart-medium"])
def test_a_real_run_without_its_inputs_or_with_a_bad_batch_writes_nothing(tmp_path, name):
    work = tmp_path / "work"
    missing = recipe(name, env={"WORK": str(work)})
    assert missing.returncode != 0 and "set CORPUS" in missing.stderr
    no_vocab = recipe(name, str(tmp_path / "corpus.txt"), env={"WORK": str(work)})
    assert no_vocab.returncode != 0 and "set VOCAB" in no_vocab.stderr and "VOCAB=build" in no_vocab.stderr
    # 64 examples per step cannot be split into 8 per GPU on 3 GPUs
    odd = recipe(name, str(tmp_path / "corpus.txt"), "vocab.txt", env={"WORK": str(work), "NUM_RANKS": "3"})
    assert odd.returncode == 2 and "not a multiple of 8 per GPU x 3 GPUs" in odd.stderr
    assert not work.exists()


def dry_run_inputs() -> None:
    for name in ("CLUECorpusSmall_bert_sampled.txt", "CLUECorpusSmall_sampled.txt", "google_zh_vocab.txt"):
        shared_file(name)  # skips with the reason when ../shared/data is absent


DRY_RUNS = {
    "uer-pegasus-base": ("PegasusForConditionalGeneration", 12, 29870),
    "uer-bart-medium": ("BartForConditionalGeneration", 4, 29871),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DRY_RUNS)
def test_dry_run_trains_the_real_architecture_exports_and_generates(tmp_path, name):
    import torch
    import transformers

    dry_run_inputs()
    architecture, layers, port = DRY_RUNS[name]
    work = tmp_path / "work"
    try:
        result = run_command(["env", f"WORK={work}", f"MASTER_PORT={port}", "bash", str(RECIPES / f"{name}.sh"),
                              "--dry_run", "--no-progress"], timeout=1500)
        out = result.stdout
        device = "detected" if torch.cuda.is_available() else "assumed, H100 SXM: no GPU detected"
        assert f"estimate {name}: 1,000,000 steps x 64 examples" in out
        assert f"({device}; peak" in out and "GPU-hours" in out and "wall-clock on 8 GPUs" in out
        assert "to the export at step 250,000" in out
        log = result.stderr
        assert "ZeRO stage 2 fp32 on 2 x cpu" in log and "global batch 4" in log
        run = work / "run"
        assert json.loads((run / "train_config.json").read_text())["deepspeed_config"].endswith("cpu_zero2.json")
        assert (run / "checkpoints" / "latest").read_text() == "step00000003"
        for export, step in ((work / "export-step00000002", 2), (work / "export", 3)):
            config = json.loads((export / "config.json").read_text())
            assert config["architectures"] == [architecture]
            assert (config["d_model"], config["encoder_layers"], config["decoder_layers"]) == (768, layers, layers)
            assert json.loads((export / "export_info.json").read_text())["step"] == step
            model = getattr(transformers, architecture).from_pretrained(str(export))
            assert model.config.d_model == 768 and len(model.get_encoder().layers) == layers
            assert f"{export}: 内容丰富" in out  # the card's snippet ran on it
        examples = json.loads((work / "examples" / "manifest.json").read_text())
        assert examples["preset"] == ("uer_gsg" if "pegasus" in name else "uer_bart")
        assert examples["config"]["seq_length"] == 512
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~3 GB (BART) / ~8 GB (PEGASUS) of checkpoints and exports
