"""The benchmark scripts' pure helpers (no timing asserts: the benchmarks measure, tests check arithmetic),
and that each runs as ``python -m bench.NAME`` from the project root."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

BENCHES = sorted(path.stem for path in (PROJECT_ROOT / "bench").glob("*.py") if path.stem != "__init__")


@pytest.fixture(scope="module")
def throughput():
    from bench import train_throughput

    return train_throughput


def test_the_benches_are_there_and_none_is_named_like_a_stdlib_module():
    expected = {"checkpoint_digest", "clean_tokenize", "data_path", "dedup_memory", "kernel_mechanisms", "mask",
                "train_throughput"}
    assert expected <= set(BENCHES)
    # bench/tokenize.py used to shadow the stdlib `tokenize` (which linecache, inspect and torch import)
    # whenever bench/ was the script's folder; with no such name, no bench needs to edit sys.path.
    assert not set(BENCHES) & set(sys.stdlib_module_names)
    for name in BENCHES:
        assert "sys.path" not in (PROJECT_ROOT / "bench" / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", BENCHES)
def test_each_bench_runs_as_a_module_from_the_project_root(name):
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and f"python -m bench.{name}" in result.stdout


@pytest.mark.parametrize("cwd", ["", "bench"])
def test_the_stdlib_tokenize_is_not_shadowed(cwd):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    code = "import tokenize, bench.clean_tokenize; print(tokenize.__file__)"
    shown = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT / cwd, env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert shown.endswith("tokenize.py") and not shown.startswith(str(PROJECT_ROOT))


def record(step, consumed, samples_per_s, tokens_per_s, **extra):
    return {"step": step, "loss": 1.0, "consumed_samples": consumed, "samples_per_s": samples_per_s,
            "tokens_per_s": tokens_per_s, "model_tflops_per_s": 0.5, "pad_fraction": 0.5, **extra}


def test_window_totals_sum_the_windows_after_the_first(throughput):
    records = [
        record(10, 80, 1.0, 999.0, data_wait_fraction=0.9),  # start-up window: left out
        record(20, 160, 8.0, 100.0, data_wait_fraction=0.1),  # 80 samples in 10 s
        {"step": 20, "eval_loss": 2.0, "eval_tokens": 5},  # eval records are not windows
        record(30, 240, 4.0, 400.0, data_wait_fraction=0.4, peak_memory_gb=3.0),  # 80 samples in 20 s
    ]
    totals = throughput.window_totals(records, after_step=10)
    assert totals["steps"] == 20 and totals["seconds"] == pytest.approx(30)
    assert totals["samples_per_s"] == pytest.approx(160 / 30)
    assert totals["tokens_per_s"] == pytest.approx((100 * 10 + 400 * 20) / 30)
    assert totals["flops_per_s"] == pytest.approx(0.5e12)
    assert totals["seconds_per_step"] == pytest.approx(1.5)
    assert totals["pad_fraction"] == pytest.approx(0.5)
    assert totals["data_wait_fraction"] == pytest.approx((0.1 * 10 + 0.4 * 20) / 30)
    assert totals["peak_memory_gb"] == 3.0


def test_window_totals_without_data_wait_or_timed_windows(throughput):
    totals = throughput.window_totals([record(2, 16, 8.0, 10.0), record(4, 32, 8.0, 10.0)], after_step=2)
    assert totals["data_wait_fraction"] is None and math.isnan(totals["peak_memory_gb"])
    with pytest.raises(ValueError):
        throughput.window_totals([record(2, 16, 8.0, 10.0)], after_step=2)


def test_batch_totals_and_helpers(throughput):
    batches = [{"indices": [1, 2], "tokens": 30, "padded": 40, "flops": 6.0},
               {"indices": [3, 4], "tokens": 10, "padded": 40, "flops": 2.0}]
    totals = throughput.batch_totals(batches, seconds=2.0)
    assert totals == {"steps": 2, "samples_per_s": 2.0, "tokens_per_s": 20.0, "flops_per_s": 4.0,
                      "seconds_per_step": 1.0, "pad_fraction": 0.5}
    assert throughput.micro_batch_candidates(64) == [64, 32, 16, 8, 4, 2, 1]
    assert throughput.number(float("nan"), 2) is None and throughput.number(1.234, 2) == 1.23
    assert throughput.ratio(3.0, 2.0) == 1.5 and throughput.ratio(1.0, 0.0) is None


def test_fixed_batches_are_the_trainers_and_run_into_the_next_epoch(throughput):
    from pipeline.sampler import ResumableDistributedSampler

    batches = throughput.fixed_batches(20, 8, 5, seed=7)  # 2 full batches per epoch
    sampler = iter(ResumableDistributedSampler(20, 8, rank=0, world_size=1, seed=7))
    assert batches == [next(sampler) for _ in range(5)]
    assert all(len(batch) == 8 for batch in batches)
    assert len(set(batches[0] + batches[1])) == 16 and batches[:2] != batches[2:4]


def test_step_lines_are_the_trainers(throughput):
    assert throughput.STEP_LINE.match("step 30: loss 9.9419 lr 0.000e+00 grad norm 0.3 654 tokens/s").group(1) == "30"
    assert not throughput.STEP_LINE.match("step 20: eval loss 9.9 over 100 target tokens")


def test_the_data_path_report_totals_each_path_from_the_shared_stages(capsys):
    from bench.data_path import report

    report(8.0, {"clean": 1.0, "tokenize": 2.0, "mask bart": 1.0, "mask gsg": 5.0}, {"bart": 10, "gsg": 4})
    lines = capsys.readouterr().out.splitlines()
    figures = {figure["metric"]: figure["value"] for figure in map(json.loads, (line for line in lines
                                                                                 if line.startswith("{")))}
    assert figures["data_path_raw_mb_per_s_per_core"] == 2.0 and figures["data_path_mask_share"] == 0.25
    assert figures["data_path_gsg_raw_mb_per_s_per_core"] == 1.0 and figures["data_path_gsg_mask_share"] == 0.625
    assert figures["data_path_speedup_vs_uer_reference"] == round(2.0 / figures[
        "uer_data_path_raw_mb_per_s_per_core_reference"], 2)
    assert any(line.startswith("total gsg") and "4 examples" in line for line in lines)
