"""The compiled kernels and their pure-Python fallback give the same output.

Function-level equality (kernel against the same code run as Python, and both against a
brute-force reference or BertTokenizer) is in test_noising.py and test_wordpiece.py; here the
whole mask and tokenize stages run once with the kernels compiled and once with
``ZH_COMPILED_KERNELS=0``, on real text, and must write the same shards, the fallback saying so
in one line.
"""

import json
import os
import sys

import pytest

from data_tools.compiled import COMPILED, DISABLE_VARIABLE
from tests.conftest import PROJECT_ROOT, run_command


def run_stage(module: str, input_dir, output_dir, compiled: bool, *flags: str):
    env = {**os.environ, DISABLE_VARIABLE: "1" if compiled else "0"}
    return run_command([sys.executable, "-m", module, "--input_dir", str(input_dir), "--output_dir", str(output_dir),
                        "--no-progress", *flags], env=env, cwd=PROJECT_ROOT)


def assert_same_shards_and_one_notice(tmp_path, compiled, python):
    shards = [json.loads((tmp_path / name / "manifest.json").read_text())["shards"] for name in ("compiled", "python")]
    assert shards[0] == shards[1] and shards[0], "the same shards, byte for byte (sha256 in the manifests)"
    notices = [line for line in python.stderr.splitlines() if "compiled kernels off" in line]
    assert len(notices) == 1 and f"{DISABLE_VARIABLE}=0" in notices[0] and "same output" in notices[0]
    assert "compiled kernels off" not in compiled.stderr


@pytest.mark.skipif(not COMPILED, reason="numba is not installed: only the Python path exists here")
@pytest.mark.parametrize("flags", [
    ("--preset", "pegasus_paper", "--seq_length", "256"),
    ("--preset", "pegasus_paper", "--seq_length", "256", "--rouge_mode", "sequential", "--rouge_unique"),
    ("--preset", "bart_paper", "--seq_length", "256", "--insert_ratio", "0.05", "--rotate_ratio", "0.5"),
    ("--preset", "uer_bart", "--seq_length", "128"),
    ("--preset", "uer_gsg", "--seq_length", "128", "--tgt_seq_length", "48", "--dup_factor", "2"),
    ("--preset", "pegasus_paper", "--seq_length", "128", "--gap_action", "mixed", "--gap_sentence_ratio", "0.45",
     "--keep_last_sentence"),
], ids=["independent", "sequential-unique", "bart-paper", "uer-bart", "uer-gsg", "principal-mixed-keep-last"])
def test_mask_stage_writes_the_same_examples_with_and_without_compiled_kernels(tmp_path, clue_tokenized_dir, flags):
    compiled = run_stage("data_tools.mask", clue_tokenized_dir, tmp_path / "compiled", True, *flags)
    python = run_stage("data_tools.mask", clue_tokenized_dir, tmp_path / "python", False, *flags)
    assert_same_shards_and_one_notice(tmp_path, compiled, python)


@pytest.mark.skipif(not COMPILED, reason="numba is not installed: only the Python path exists here")
def test_tokenize_stage_writes_the_same_ids_with_and_without_compiled_kernels(tmp_path, clue_tokenized_dir,
                                                                               google_vocab):
    clue_clean_dir = clue_tokenized_dir.parent / "clean"
    flags = ("--vocab_path", str(google_vocab), "--chunk_documents", "700", "--processes_num", "2")
    compiled = run_stage("data_tools.tokenize_shards", clue_clean_dir, tmp_path / "compiled", True, *flags)
    python = run_stage("data_tools.tokenize_shards", clue_clean_dir, tmp_path / "python", False, *flags)
    assert_same_shards_and_one_notice(tmp_path, compiled, python)
