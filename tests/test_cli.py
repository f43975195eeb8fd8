"""Every stage's command line: generated from its config, every flag explained, user
errors reported in one line with a non-zero exit and no traceback."""

import dataclasses
import json
import subprocess
import sys

import pytest

from data_tools.clean import CleanConfig
from data_tools.cli import build_parser
from data_tools.combine_slices import CombineConfig
from data_tools.mask import MaskConfig
from data_tools.tokenize_shards import TokenizeConfig
from data_tools.verify import VerifyConfig
from data_tools.vocab import BuildVocabConfig
from pipeline.convert_to_hf import ExportConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.generate import GenerateConfig
from pipeline.plot import PlotConfig
from pipeline.to_universal import UniversalConfig
from pipeline.train_config import TrainConfig
from pipeline.uer_interop import ExportUerConfig, ImportUerConfig
from tests.conftest import FIXTURES, PROJECT_ROOT, VENV_BIN, deepspeed_env

CONFIGS = [CleanConfig, CombineConfig, BuildVocabConfig, TokenizeConfig, VerifyConfig, MaskConfig, TrainConfig,
           ExportConfig, GenerateConfig, UniversalConfig, ImportUerConfig, ExportUerConfig, EvaluateConfig, PlotConfig]
ENTRY_POINTS = ["zh-clean", "zh-clean-combine", "zh-build-vocab", "zh-tokenize", "zh-verify", "zh-mask", "zh-train",
                "zh-export", "zh-generate", "zh-to-universal", "zh-import-uer", "zh-export-uer", "zh-evaluate", "zh-plot"]


@pytest.mark.parametrize("config_cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_a_flag_with_help(config_cls):
    parser = build_parser(config_cls)
    actions = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(config_cls):
        assert field.name in actions, field.name
        assert len(actions[field.name].help) > 10, f"--{field.name} has no real help text"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_console_scripts_print_help(entry_point):
    result = subprocess.run([str(VENV_BIN / entry_point), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--help" in result.stdout


def run_cli(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=deepspeed_env(), **kwargs)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0]


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory, tiny_vocab):
    root = tmp_path_factory.mktemp("cli")
    for args in (
        ["-m", "data_tools.clean", "--input_paths", str(FIXTURES / "noisy_documents.txt"), "--output_dir",
         str(root / "clean"), "--no-progress"],
        ["-m", "data_tools.tokenize_shards", "--input_dir", str(root / "clean"), "--output_dir", str(root / "tok"),
         "--vocab_path", str(tiny_vocab), "--no-progress"],
        ["-m", "data_tools.mask", "--input_dir", str(root / "tok"), "--output_dir", str(root / "bart"),
         "--target", "bart", "--seq_length", "32", "--no-progress"],
    ):
        assert run_cli([sys.executable, *args]).returncode == 0
    return root / "bart"


def test_contradicting_ds_config_batch_size_is_named(tmp_path, masked_dir):
    bad = tmp_path / "ds.json"
    ds = json.loads((PROJECT_ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    bad.write_text(json.dumps({**ds, "train_batch_size": 64}))
    result = run_cli([sys.executable, "-m", "pipeline.trainer", "--data_dir", str(masked_dir), "--output_dir",
                      str(tmp_path / "run"), "--deepspeed_config", str(bad), "--micro_batch_size", "2"])
    assert_one_line_error(result, str(bad), "train_batch_size is 64", "flags give 2")


def test_vocab_that_does_not_match_the_examples_is_refused(tmp_path, masked_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(masked_dir, data)
    (data / "vocab.txt").write_text((data / "vocab.txt").read_text() + "extra\n")
    result = run_cli([sys.executable, "-m", "pipeline.trainer", "--data_dir", str(data), "--output_dir",
                      str(tmp_path / "run")])
    assert_one_line_error(result, "vocab.txt", "is missing or differs from the vocab the manifest records")


def test_missing_stage_output_and_unreadable_shard(tmp_path, masked_dir):
    result = run_cli([sys.executable, "-m", "data_tools.mask", "--input_dir", str(tmp_path), "--output_dir",
                      str(tmp_path / "o"), "--target", "gsg"])
    assert_one_line_error(result, "manifest.json not found", "run that stage first")
    import shutil

    data = tmp_path / "broken"
    shutil.copytree(masked_dir, data)
    (data / "examples-00000.arrow").write_bytes(b"not arrow")
    result = run_cli([sys.executable, "-m", "pipeline.trainer", "--data_dir", str(data), "--output_dir",
                      str(tmp_path / "run")])
    assert_one_line_error(result, "examples-00000.arrow", "re-run")


def test_export_of_a_run_without_checkpoints_is_refused(tmp_path):
    result = run_cli([sys.executable, "-m", "pipeline.convert_to_hf", "--run_dir", str(tmp_path), "--output_dir",
                      str(tmp_path / "hf")])
    assert_one_line_error(result, "model_config.json not found", "not a training run directory")
