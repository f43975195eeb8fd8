"""End to end through the bin/ chain on real text, with real DeepSpeed ZeRO-2 on 2 CPU ranks.

bin/run_pipeline.sh runs clean -> tokenize -> mask -> train -> export -> generate on
CLUECorpusSmall_sampled.txt with Google's Chinese vocab, once for BART and once for
PEGASUS. The exports are then checked the way users load them, and against the
trainer's own fp32 master weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import DEEPSPEED, PROJECT_ROOT, run_command

# Multi-process DeepSpeed runs: deselect with -m "not slow" for a fast inner loop (CI runs them).
pytestmark = pytest.mark.slow

STEPS = 6
TARGETS = {"bart": "BartForConditionalGeneration", "gsg": "PegasusForConditionalGeneration"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, clue_lines_file, google_vocab) -> dict[str, Path]:
    """Runs the whole chain for both targets; returns each target's work directory."""
    works = {}
    for index, target in enumerate(TARGETS):
        work = tmp_path_factory.mktemp(f"chain-{target}")
        env_args = [f"RAW={clue_lines_file}", f"VOCAB={google_vocab}", f"TARGET={target}", f"WORK={work}",
                    "SEQ_LENGTH=64", "TGT_SEQ_LENGTH=32", "NUM_RANKS=2", f"MASTER_PORT={29630 + index}"]
        result = run_command(["env", *env_args, "bash", str(PROJECT_ROOT / "bin" / "run_pipeline.sh"),
                              "--total_steps", str(STEPS), "--save_checkpoint_steps", "2",
                              "--keep_last_checkpoints", "2", "--micro_batch_size", "4", "--log_every_steps", "2",
                              "--no-progress"], timeout=1200)
        (work / "chain.log").write_text(result.stdout + result.stderr)
        works[target] = work
    return works


@pytest.mark.parametrize("target", TARGETS)
def test_chain_writes_every_stage_and_generates(chain, target):
    work = chain[target]
    for stage in ("clean", "tokenized", f"examples-{target}"):
        assert json.loads((work / stage / "manifest.json").read_text())["stage"] in ("clean", "tokenize", "mask")
    log = (work / "chain.log").read_text()
    assert "ZeRO stage 2" in log and "on 2 x cpu" in log and "optimizer FusedAdam" in log
    export = work / f"export-{target}"
    for name in ("config.json", "model.safetensors", "generation_config.json", "vocab.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (export / name).is_file(), name
    assert json.loads((export / "config.json").read_text())["architectures"] == [TARGETS[target]]


@pytest.mark.parametrize("target", TARGETS)
def test_checkpoints_are_complete_kept_and_pointed_to(chain, target):
    root = chain[target] / f"run-{target}" / "checkpoints"
    tags = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tags == ["step00000004", "step00000006"]  # keep_last_checkpoints 2
    assert (root / "latest").read_text() == "step00000006"
    final = root / "step00000006"
    state = json.loads((final / "trainer_state.json").read_text())
    files = state.pop("files")  # every file's size, checked before a resume or an export reads it
    assert files == {str(p.relative_to(final)): p.stat().st_size for p in final.rglob("*")
                     if p.is_file() and p.name != "trainer_state.json"}
    assert state == {"step": STEPS, "consumed_samples": STEPS * 4 * 2, "world_size": 2,
                     "data_position": {"epoch": 0, "micro_batches": STEPS * 2}}
    assert {p.name for p in final.glob("rng_state_rank*.pt")} == {"rng_state_rank0.pt", "rng_state_rank1.pt"}
    assert len(list(final.glob("*optim_states.pt"))) == 2  # one ZeRO-2 partition per rank
    metrics = [json.loads(line) for line in (chain[target] / f"run-{target}" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


@pytest.mark.parametrize("target", TARGETS)
def test_export_equals_the_consolidated_fp32_master_weights(chain, target):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    run = chain[target] / f"run-{target}"
    master = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step00000006")
    exported = AutoModelForSeq2SeqLM.from_pretrained(str(chain[target] / f"export-{target}")).eval()
    exported_state = exported.state_dict()
    for name, tensor in master.items():
        assert exported_state[name].dtype == torch.float32
        assert torch.equal(exported_state[name], tensor), name

    # The trainer's model class, built from the run's config and given the master weights,
    # computes the same logits as the exported directory loaded fresh.
    reference = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(str(run / "model_config.json")))
    reference.load_state_dict(master, strict=False)
    reference.tie_weights()
    reference.eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(104, 21128, (2, 16), generator=generator),
              "decoder_input_ids": torch.randint(104, 21128, (2, 8), generator=generator)}
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_users_load_the_export_with_bert_tokenizer_and_auto_classes(chain, target):
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertTokenizer

    from pipeline.hf_snippet import PROMPT, run_snippet

    export = chain[target] / f"export-{target}"
    tokenizer = BertTokenizer.from_pretrained(str(export))
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 103
    assert tokenizer(PROMPT)["input_ids"][0] == 101
    model = getattr(transformers, TARGETS[target]).from_pretrained(str(export))
    assert model.config.decoder_start_token_id == 101
    assert AutoTokenizer.from_pretrained(str(export)).convert_tokens_to_ids("[SEP]") == 102
    assert type(AutoModelForSeq2SeqLM.from_pretrained(str(export))).__name__ == TARGETS[target]
    assert isinstance(run_snippet(export), str)


def test_relaunching_the_same_command_resumes_from_latest(chain, tmp_path):
    import shutil

    run = tmp_path / "run-bart"
    shutil.copytree(chain["bart"] / "run-bart", run)
    result = run_command([
        *DEEPSPEED, "--num_gpus", "2", "--master_port", "29640", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
        "--data_dir", str(chain["bart"] / "examples-bart"), "--output_dir", str(run),
        "--model_config", "bart-tiny", "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"),
        "--total_steps", "8", "--save_checkpoint_steps", "2", "--keep_last_checkpoints", "2",
        "--micro_batch_size", "4", "--log_every_steps", "2", "--no-progress",
    ])
    assert "resuming from step00000006 (step 6)" in result.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step00000008"
    state = json.loads((run / "checkpoints" / "step00000008" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == 8 * 4 * 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [2, 4, 6, 8]


def test_half_precision_export_is_the_master_weights_cast(chain, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSeq2SeqLM

    run = chain["gsg"] / "run-gsg"
    out = tmp_path / "bf16"
    run_command(["zh-export", "--run_dir", str(run), "--output_dir", str(out), "--dtype", "bf16"])
    written = json.loads((out / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"  # transformers 4.56 renamed the key
    assert (out / "model.safetensors").stat().st_size < 0.6 * (chain["gsg"] / "export-gsg" / "model.safetensors").stat().st_size
    master = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step00000006")
    exported = AutoModelForSeq2SeqLM.from_pretrained(str(out), torch_dtype=torch.bfloat16).state_dict()
    for name, tensor in master.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


@pytest.mark.parametrize("source", ["export", "uer-import"])
def test_init_from_an_export_or_a_uer_import_starts_from_its_weights(chain, tmp_path, google_vocab, source):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSeq2SeqLM

    export = chain["bart"] / "export-bart"
    if source == "uer-import":  # our export -> a UER-py 2021 file -> imported back, with the console scripts
        run_command(["zh-export-uer", "--model_dir", str(export), "--output_file", str(tmp_path / "uer.bin")])
        run_command(["zh-import-uer", "--checkpoint", str(tmp_path / "uer.bin"), "--vocab_path", str(google_vocab),
                     "--output_dir", str(tmp_path / "imported"), "--heads_num", "4"])
        export = tmp_path / "imported"
    run = tmp_path / "continued"
    result = run_command([
        *DEEPSPEED, "--num_gpus", "2", "--master_port", "29645" if source == "export" else "29646", str(PROJECT_ROOT / "pipeline" / "trainer.py"),
        "--data_dir", str(chain["bart"] / "examples-bart"), "--output_dir", str(run), "--init_from", str(export),
        "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"), "--total_steps", "1",
        "--learning_rate", "1e-12", "--micro_batch_size", "4", "--no-progress",
    ])
    assert "fresh start" in result.stderr
    start = AutoModelForSeq2SeqLM.from_pretrained(str(export)).state_dict()
    after = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step00000001")
    assert max((after[k] - start[k]).abs().max().item() for k in after) < 1e-6


def test_init_from_a_model_with_another_vocab_is_refused(chain, tmp_path):
    import shutil
    import subprocess
    import sys

    model = tmp_path / "other-vocab"
    shutil.copytree(chain["bart"] / "export-bart", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 8000}))
    result = subprocess.run([sys.executable, "-m", "pipeline.trainer", "--data_dir", str(chain["bart"] / "examples-bart"),
                             "--output_dir", str(tmp_path / "run"), "--init_from", str(model)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has vocab_size 8000 but" in result.stderr and "tokenize with the model's vocab.txt" in result.stderr
