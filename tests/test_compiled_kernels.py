"""The compiled kernels and their pure-Python fallback give the same output.

Function-level equality (kernel against the same code run as Python, and both against a
brute-force reference) is in test_noising.py; here the whole mask stage runs once with the
kernels compiled and once with ``ZH_COMPILED_KERNELS=0``, on real text, and must write the same
examples, the fallback saying so in one line.
"""

import json
import os
import sys

import pytest

from data_tools.compiled import COMPILED, DISABLE_VARIABLE
from tests.conftest import PROJECT_ROOT, run_command


def mask_stage(tokenized_dir, output_dir, compiled: bool, *flags: str):
    env = {**os.environ, DISABLE_VARIABLE: "1" if compiled else "0"}
    return run_command([sys.executable, "-m", "data_tools.mask", "--input_dir", str(tokenized_dir),
                        "--output_dir", str(output_dir), "--no-progress", *flags], env=env, cwd=PROJECT_ROOT)


@pytest.mark.skipif(not COMPILED, reason="numba is not installed: only the Python path exists here")
@pytest.mark.parametrize("flags", [
    ("--preset", "pegasus_paper", "--seq_length", "256"),
    ("--preset", "pegasus_paper", "--seq_length", "256", "--rouge_mode", "sequential", "--rouge_unique"),
    ("--preset", "bart_paper", "--seq_length", "256", "--insert_ratio", "0.05", "--rotate_ratio", "0.5"),
    ("--preset", "uer_bart", "--seq_length", "128"),
], ids=["independent", "sequential-unique", "bart-paper", "uer-bart"])
def test_mask_stage_writes_the_same_examples_with_and_without_compiled_kernels(tmp_path, clue_tokenized_dir, flags):
    compiled = mask_stage(clue_tokenized_dir, tmp_path / "compiled", True, *flags)
    python = mask_stage(clue_tokenized_dir, tmp_path / "python", False, *flags)
    shards = [json.loads((tmp_path / name / "manifest.json").read_text())["shards"] for name in ("compiled", "python")]
    assert shards[0] == shards[1] and shards[0], "the same shards, byte for byte (sha256 in the manifests)"
    notices = [line for line in python.stderr.splitlines() if "compiled kernels off" in line]
    assert len(notices) == 1 and f"{DISABLE_VARIABLE}=0" in notices[0] and "same output" in notices[0]
    assert "compiled kernels off" not in compiled.stderr
