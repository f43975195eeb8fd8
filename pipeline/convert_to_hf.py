"""Stage 5, export: a ZeRO-2 checkpoint in, a HuggingFace model directory out.

The weights are the fp32 master weights consolidated from every rank's optimizer
partition (not the bf16 working copy). The directory loads with ``BertTokenizer`` and
``BartForConditionalGeneration`` / ``PegasusForConditionalGeneration`` (or the Auto
classes). It is written to a temp folder and renamed, so it is never half-built.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from data_tools.cli import option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError, write_json_atomic
from data_tools.outputs import check_apart, check_replaceable_dir, overwrite_option, staged_dir
from pipeline.checkpointing import (
    CHECKPOINTS,
    LATEST,
    MODEL_CONFIG_FILE,
    checkpoint_problem,
    load_checkpoint_file,
    read_latest_tag,
    read_trainer_state,
)


@dataclass(kw_only=True)
class ExportConfig:
    """Consolidate a DeepSpeed ZeRO-2 checkpoint into a HuggingFace model directory."""

    run_dir: Path = required("The training run's --output_dir (holds model_config.json, vocab.txt, checkpoints/).")
    output_dir: Path = required("HF model directory to write; an earlier export there is replaced once the new one "
                                "is complete, any other existing directory is refused (see --overwrite).")
    tag: str = option("", "Checkpoint tag to export (e.g. step00001000); empty = the one 'latest' points to.")
    dtype: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Weights to write: the fp32 master weights, or those weights cast to bf16/fp16 (half the size); "
        "recorded as the dtype in config.json.")
    overwrite: bool = overwrite_option()

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
        state_dict[param_dir.name] = load_checkpoint_file(fp32)["param"]
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        module = load_checkpoint_file(model_states).get("module") or {}
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
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        details = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise UserError(f"{source}: weights do not fit the model ({details[:300]})") from error
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
        # transformers 4.x cleaned up spaces around punctuation in decode by default, 5.x does not
        # unless the config says so: stated here, an export decodes the same text on both.
        "clean_up_tokenization_spaces": True,
        **special,
    })


EXPORT_INFO = "export_info.json"
HF_FILES = {"config.json", "generation_config.json", VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json",
            EXPORT_INFO}


def check_hf_output(output_dir: Path, writer: str, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """``output_dir`` may replace only an earlier HF directory written by ``writer`` (its
    export_info.json says so) holding nothing but the files it writes."""
    check_apart(output_dir, "--output_dir", inputs)

    def is_own(info: dict) -> bool:  # exports of earlier versions carry no written_by, only their keys
        legacy = {"zh-export": "run_dir", "zh-import-uer": "imported_from"}[writer]
        return info.get("written_by", writer if legacy in info else None) == writer

    def owns(info: dict, name: str) -> bool:
        return name in HF_FILES or (name.startswith("model") and ".safetensors" in name)

    check_replaceable_dir(output_dir, "--output_dir", writer, EXPORT_INFO, is_own, owns, overwrite)


def write_hf_directory(model: torch.nn.Module, vocab_path: Path, output_dir: Path, info: dict) -> None:
    """The HF directory of DESIGN.md, built in a temp folder beside ``output_dir`` and renamed
    into place, so a crash never leaves a half-built model where a user expects one."""
    from transformers import GenerationConfig

    model_config = model.config
    with staged_dir(output_dir) as staging:
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
        write_json_atomic(staging / EXPORT_INFO, info)


def export(config: ExportConfig) -> Path:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    run_dir = config.run_dir
    for needed in (MODEL_CONFIG_FILE, VOCAB_FILE):
        if not (run_dir / needed).is_file():
            raise UserError(f"{run_dir / needed} not found: {run_dir} is not a training run directory")
    check_hf_output(config.output_dir, "zh-export", config.overwrite, {"--run_dir": run_dir})
    checkpoint_root = run_dir / CHECKPOINTS
    tag = config.tag or read_latest_tag(checkpoint_root)
    if tag is None:
        raise UserError(f"{checkpoint_root / LATEST} not found: the run has no complete checkpoint yet")
    problem = checkpoint_problem(checkpoint_root / tag) if config.tag else None  # read_latest_tag checked latest
    if problem:
        raise UserError(f"checkpoint {checkpoint_root / tag} {problem}; export another --tag")

    try:
        model_config = AutoConfig.from_pretrained(str(run_dir / MODEL_CONFIG_FILE))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{run_dir / MODEL_CONFIG_FILE} is not a readable HF config ({error}); it was written by "
                        "zh-train: restore it from the run") from error
    model = AutoModelForSeq2SeqLM.from_config(model_config)
    state_dict = consolidated_state_dict(checkpoint_root, tag)
    load_weights_strict(model, state_dict, str(checkpoint_root / tag))
    model.tie_weights()
    if config.dtype != "fp32":
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[config.dtype])

    trainer_state = read_trainer_state(checkpoint_root / tag)
    write_hf_directory(model, run_dir / VOCAB_FILE, config.output_dir, {
        "written_by": "zh-export", "run_dir": str(run_dir), "tag": tag, "step": trainer_state["step"],
        "weights": "fp32 master weights" + ("" if config.dtype == "fp32" else f", cast to {config.dtype}"),
    })
    print(f"export: {tag} of {run_dir} -> {config.output_dir}", file=sys.stderr)
    return config.output_dir


def main(argv: list[str] | None = None) -> int:
    return run_stage(export, ExportConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
