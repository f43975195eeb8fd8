"""Stage 5, export: a ZeRO-2 checkpoint in, a HuggingFace model directory out.

The weights are the fp32 master weights consolidated from every rank's optimizer
partition (not the bf16 working copy). The directory loads with ``BertTokenizer`` and
``BartForConditionalGeneration`` / ``PegasusForConditionalGeneration`` (or the Auto
classes). It is written to a temp folder and renamed, so it is never half-built.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from data_tools.cli import option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError, write_json_atomic
from pipeline.checkpointing import (
    CHECKPOINTS,
    LATEST,
    MODEL_CONFIG_FILE,
    checkpoint_problem,
    read_latest_tag,
    read_trainer_state,
)


@dataclass(kw_only=True)
class ExportConfig:
    """Consolidate a DeepSpeed ZeRO-2 checkpoint into a HuggingFace model directory."""

    run_dir: Path = required("The training run's --output_dir (holds model_config.json, vocab.txt, checkpoints/).")
    output_dir: Path = required("HF model directory to write (replaced if it exists).")
    tag: str = option("", "Checkpoint tag to export (e.g. step00001000); empty = the one 'latest' points to.")
    dtype: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Weights to write: the fp32 master weights, or those weights cast to bf16/fp16 (half the size); "
        "recorded as the dtype in config.json.")

    def __post_init__(self) -> None:
        self.run_dir, self.output_dir = Path(self.run_dir), Path(self.output_dir)


def universal_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights of a universal checkpoint (``zh-to-universal``): one
    ``zero/<param>/fp32.pt`` per parameter, already whole; buffers from the model states."""
    zero = tag_dir / "zero"
    state_dict = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        fp32 = param_dir / "fp32.pt"
        if not fp32.is_file():
            raise UserError(f"universal checkpoint {tag_dir}: {fp32} is missing; re-run zh-to-universal")
        state_dict[param_dir.name] = torch.load(fp32, map_location="cpu", weights_only=False)["param"]
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        module = torch.load(model_states, map_location="cpu", weights_only=False).get("module") or {}
        for name, tensor in module.items():  # buffers (final_logits_bias) have no optimizer state
            state_dict.setdefault(name, tensor.float())
    return state_dict


def consolidated_state_dict(checkpoint_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 master weights merged from every rank's ZeRO-2 partition (or a universal checkpoint)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = checkpoint_root / tag
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint {tag_dir} does not exist; list {checkpoint_root} for the saved tags")
    if (tag_dir / "zero").is_dir():
        return universal_state_dict(tag_dir)
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag)
    except (FileNotFoundError, ValueError, AssertionError, RuntimeError) as error:
        raise UserError(f"cannot consolidate {tag_dir}: {error}; is a rank's shard missing?") from error


def load_weights_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight; only keys the model ties to another may be absent."""
    result = model.load_state_dict(state_dict, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    tied |= set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise UserError(f"{source}: missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")


def write_tokenizer_files(vocab_path: Path, output_dir: Path, model_max_length: int) -> None:
    """vocab.txt, tokenizer_config.json and special_tokens_map.json, as BertTokenizer reads them.

    Written by hand rather than by ``save_pretrained`` so the files are the same under
    transformers 4 (slow BertTokenizer, needs vocab.txt) and 5 (tokenizers backend).
    """
    shutil.copyfile(vocab_path, output_dir / VOCAB_FILE)
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    write_json_atomic(output_dir / "special_tokens_map.json", special)
    write_json_atomic(output_dir / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": model_max_length,
        **special,
    })


def write_hf_directory(model: torch.nn.Module, vocab_path: Path, output_dir: Path, info: dict) -> None:
    """The HF directory of DESIGN.md, built in a temp folder beside ``output_dir`` and renamed
    into place, so a crash never leaves a half-built model where a user expects one."""
    from transformers import GenerationConfig

    model_config = model.config
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        GenerationConfig(
            decoder_start_token_id=model_config.decoder_start_token_id,
            bos_token_id=model_config.bos_token_id,
            eos_token_id=model_config.eos_token_id,
            pad_token_id=model_config.pad_token_id,
            forced_eos_token_id=model_config.eos_token_id,
            max_length=128,
        ).save_pretrained(str(staging))
        write_tokenizer_files(vocab_path, staging, model_config.max_position_embeddings)
        write_json_atomic(staging / "export_info.json", info)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.replace(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(config: ExportConfig) -> Path:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    run_dir = config.run_dir
    for needed in (MODEL_CONFIG_FILE, VOCAB_FILE):
        if not (run_dir / needed).is_file():
            raise UserError(f"{run_dir / needed} not found: {run_dir} is not a training run directory")
    checkpoint_root = run_dir / CHECKPOINTS
    tag = config.tag or read_latest_tag(checkpoint_root)
    if tag is None:
        raise UserError(f"{checkpoint_root / LATEST} not found: the run has no complete checkpoint yet")
    problem = checkpoint_problem(checkpoint_root / tag)
    if problem:
        raise UserError(f"checkpoint {checkpoint_root / tag} {problem}; export another --tag")

    model_config = AutoConfig.from_pretrained(str(run_dir / MODEL_CONFIG_FILE))
    model = AutoModelForSeq2SeqLM.from_config(model_config)
    state_dict = consolidated_state_dict(checkpoint_root, tag)
    load_weights_strict(model, state_dict, str(checkpoint_root / tag))
    model.tie_weights()
    if config.dtype != "fp32":
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[config.dtype])

    trainer_state = read_trainer_state(checkpoint_root / tag)
    write_hf_directory(model, run_dir / VOCAB_FILE, config.output_dir, {
        "run_dir": str(run_dir), "tag": tag, "step": trainer_state["step"],
        "weights": "fp32 master weights" + ("" if config.dtype == "fp32" else f", cast to {config.dtype}"),
    })
    print(f"export: {tag} of {run_dir} -> {config.output_dir}", file=sys.stderr)
    return config.output_dir


def main(argv: list[str] | None = None) -> int:
    return run_stage(export, ExportConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
