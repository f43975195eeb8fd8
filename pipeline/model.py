"""Model building: HF configs shipped in the package, special ids from the data, fused norms.

The architecture lives in a HuggingFace ``config.json`` (``pipeline/model_configs``);
the vocab size and special token ids come from the vocab the data was tokenized with,
so a config never disagrees with the corpus it is trained on.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from data_tools.common import VOCAB_FILE, UserError, file_sha256
from pipeline.ds_config import non_finite_field

# transformers is imported inside the functions that use it, on purpose: its import takes ~2 s (measured on
# the 2-core VM, on top of torch's), which --help and the one-line errors of every command importing this
# module would otherwise pay.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def packaged_model_configs() -> list[str]:
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def resolve_model_config_path(name_or_path: str | Path) -> Path:
    """A packaged config name (``bart-tiny``) or a path to an HF config.json."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate / "config.json"
    packaged = MODEL_CONFIG_DIR / f"{name_or_path}.json"
    if packaged.is_file():
        return packaged
    raise UserError(
        f"model config {name_or_path!r} is neither a file nor one of the packaged configs "
        f"({', '.join(packaged_model_configs())})"
    )


def load_model_config(name_or_path: str | Path, vocab_size: int, special_token_ids: dict[str, int]) -> Any:
    """The HF config with vocab size and special ids taken from the training data's vocab."""
    from transformers import AutoConfig

    path = resolve_model_config_path(name_or_path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"model config {path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise UserError(f"model config {path} holds a JSON {type(values).__name__}, not an object")
    if values.get("model_type") not in ("bart", "pegasus"):
        raise UserError(f"{path}: model_type must be 'bart' or 'pegasus', got {values.get('model_type')!r}")
    check_model_values(values, f"model config {path}")
    values.update(
        vocab_size=vocab_size,
        pad_token_id=special_token_ids["[PAD]"],
        bos_token_id=special_token_ids["[CLS]"],
        decoder_start_token_id=special_token_ids["[CLS]"],
        eos_token_id=special_token_ids["[SEP]"],
        forced_eos_token_id=special_token_ids["[SEP]"],
    )
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    check_model_values(config.to_dict(), f"model config {path}")  # with HF's defaults for the fields not given
    return config


# Architecture fields (HF's names), whole numbers >= 1: a list or a string there, or 0, ends in a traceback
# when the model is built, and a negative layer count builds a model without those layers.
MODEL_COUNT_FIELDS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                      "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")
MODEL_RATE_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")


def model_values_problem(values: dict) -> str | None:
    """What in an HF BART/PEGASUS config's values would crash model building or training (or silently build
    another model), or None: non-finite numbers, counts that are not whole numbers >= 1, rates outside
    [0, 1], a head count that does not divide d_model, an unknown activation. Only the fields present are checked."""
    from transformers.activations import ACT2FN

    non_finite = non_finite_field(values)
    if non_finite is not None:
        return f"{non_finite[0]} is {json.dumps(non_finite[1])}: every number must be finite"
    for name in MODEL_COUNT_FIELDS:
        if name in values and not (type(values[name]) is int and values[name] >= 1):
            return f"{name} must be a whole number >= 1, got {json.dumps(values[name])}"
    for name in MODEL_RATE_FIELDS:
        if name in values and not (_is_number(values[name]) and 0 <= values[name] <= 1):
            return f"{name} must be a number in [0, 1], got {json.dumps(values[name])}"
    if "init_std" in values and not (_is_number(values["init_std"]) and values["init_std"] > 0):
        return f"init_std must be a positive number, got {json.dumps(values['init_std'])}"
    d_model = values.get("d_model")
    for side in ("encoder", "decoder"):
        heads = values.get(f"{side}_attention_heads")
        if isinstance(d_model, int) and isinstance(heads, int) and d_model % heads:
            return (f"{side}_attention_heads {heads} does not divide d_model {d_model} (each head gets d_model / "
                    "heads dimensions)")
    activation = values.get("activation_function")
    if activation is not None and (not isinstance(activation, str) or activation not in ACT2FN):
        return f"activation_function {json.dumps(activation)} is not one of transformers' ({', '.join(sorted(ACT2FN))})"
    return None


def check_model_values(values: dict, where: str) -> None:
    problem = model_values_problem(values)
    if problem:
        raise UserError(f"{where}: {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_model(config: Any) -> nn.Module:
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_config(config)


def apex_fused_layer_norm() -> tuple[type | None, str]:
    """apex's FusedLayerNorm class if it can run here, else (None, why not).

    ``apex.normalization`` imports without its CUDA extension (a Python-only apex build, or one
    built for another torch): FusedLayerNorm then fails in ``__init__``, when it imports
    ``fused_layer_norm_cuda``. Importing the extension here turns that crash of every GPU run
    into the native kernel and a reason in the start-up line.
    """
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None, "apex not installed"
    try:
        import fused_layer_norm_cuda  # noqa: F401  (apex's compiled kernels)
    except ImportError as error:
        return None, f"apex is installed without its CUDA extension fused_layer_norm_cuda ({error})"
    return FusedLayerNorm, ""


def use_fused_layer_norm(model: nn.Module, device_type: str) -> str:
    """Swap ``nn.LayerNorm`` for apex's ``FusedLayerNorm`` when apex is installed and the run's
    accelerator (DeepSpeed's, not merely a visible GPU) is CUDA.

    FusedLayerNorm has the same parameters and state_dict keys, so checkpoints and the
    export do not depend on which kernel trained them. Returns the kernel's name.
    """
    fused_layer_norm, reason = apex_fused_layer_norm()
    if fused_layer_norm is None:
        return f"torch.nn.LayerNorm (native kernel; {reason})"
    if device_type != "cuda":
        return f"torch.nn.LayerNorm (native kernel; apex's FusedLayerNorm needs CUDA, the accelerator is {device_type})"
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = fused_layer_norm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused.to(child.weight.device, child.weight.dtype))
                replaced += 1
    return f"apex.normalization.FusedLayerNorm ({replaced} layers)"


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no decay on biases, norms and embeddings of positions (BART's learned
    ones; PEGASUS's sinusoidal table is not trained). Token embeddings and the weight matrices decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if (parameter.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
                or "embed_positions" in name):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def read_hf_config(model_dir: Path, flag: str) -> dict:
    """The values of an HF model directory's config.json, which must be a BART or PEGASUS config."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{flag} {model_dir} has no config.json; pass an exported or published HF model directory")
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON ({error}); re-export the model") from error
    if not isinstance(values, dict) or values.get("model_type") not in ("bart", "pegasus"):
        found = values.get("model_type") if isinstance(values, dict) else type(values).__name__
        raise UserError(f"{config_file}: model_type {found!r} is not bart or pegasus")
    check_model_values(values, str(config_file))
    return values


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars from transformers inside the block: 5.x draws a "Loading weights" bar on stderr
    in every ``from_pretrained``, which would break the commands' one-line errors and clutter logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_hf_model(model_dir: Path, flag: str) -> nn.Module:
    """An HF BART/PEGASUS model in fp32; a broken config or truncated weights give one line."""
    from transformers import AutoModelForSeq2SeqLM

    read_hf_config(model_dir, flag)
    try:
        # fp32 whatever the saved dtype (.float(): the dtype keyword changed name across transformers versions)
        with quiet_loading():
            return AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).float()
    except Exception as error:  # transformers and safetensors raise many types here; all mean a broken directory
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{flag} {model_dir}: the model cannot be loaded ({type(error).__name__}: {first_line}); "
                        "re-export it or check its files") from error


def positions_problem(max_lengths: tuple[int, int], model_config: Any, data_label: str | Path) -> str | None:
    """Why examples this long do not fit the model's position table, or None (they would crash at the first
    batch that holds one, possibly hours into a run)."""
    limit = model_config.max_position_embeddings
    source, target = max_lengths
    if max(source, target) <= limit:
        return None
    return (f"{data_label} holds examples of up to {source} source / {target} target tokens but the model's "
            f"max_position_embeddings is {limit}; re-run the mask stage with --seq_length/--tgt_seq_length "
            f"<= {limit}, or use a model config with a longer position table")


def check_positions(max_lengths: tuple[int, int], model_config: Any, data_label: str | Path) -> None:
    """Refuse examples longer than the model's position table before any of them is scored."""
    problem = positions_problem(max_lengths, model_config, data_label)
    if problem:
        raise UserError(problem)


def init_from_problem(model_dir: Path, model_values: dict, model_vocab_sha256: str | None, vocab: dict,
                      data_label: str | Path) -> str | None:
    """Why the model to continue from (its config.json values, the sha256 of its vocab.txt or None without
    one) does not use the vocab the training data was tokenized with, or None."""
    if model_values.get("vocab_size") != vocab["size"]:
        return (f"{model_dir / 'config.json'} has vocab_size {model_values.get('vocab_size')} but {data_label} was "
                f"tokenized with {vocab['size']} tokens ({vocab['source']}); tokenize with the model's vocab.txt")
    return model_vocab_problem(model_dir, model_vocab_sha256, vocab, data_label, "--init_from", required=False)


def model_vocab_problem(model_dir: Path, model_vocab_sha256: str | None, vocab: dict, data_label: str | Path,
                        flag: str, required: bool) -> str | None:
    """Why a model directory's vocab.txt (its sha256, None when it has none) is not the one the data was
    tokenized with, or None; without one, ``required`` says whether that is a problem (published models whose
    vocab_size matched may lack the file)."""
    if model_vocab_sha256 is None:
        if not required:
            return None
        return (f"{flag} {model_dir} has no {VOCAB_FILE}: cannot confirm it uses the vocab of {data_label}; copy the "
                "model's BERT vocab.txt into it")
    if model_vocab_sha256 != vocab["sha256"]:
        return (f"{model_dir / VOCAB_FILE} differs from the vocab {data_label} was tokenized with ({vocab['source']}); "
                "tokenize with the model's vocab.txt")
    return None


def model_vocab_sha256(model_dir: Path) -> str | None:
    """The sha256 of a model directory's vocab.txt, None when it has none."""
    vocab_file = Path(model_dir) / VOCAB_FILE
    return file_sha256(vocab_file) if vocab_file.is_file() else None


def check_model_vocab(model_dir: Path, vocab: dict, data_dir: Path, flag: str, required: bool) -> None:
    """A model directory's vocab.txt must be the one the data was tokenized with (see :func:`model_vocab_problem`)."""
    problem = model_vocab_problem(model_dir, model_vocab_sha256(model_dir), vocab, data_dir, flag, required)
    if problem:
        raise UserError(problem)


def build_training_model(init_from: Path | None, model_config: Any, device_type: str, gradient_checkpointing: bool,
                         compiled: bool) -> tuple[nn.Module, str]:
    """The model to train (random init, or ``init_from``'s weights) and the name of its layer-norm kernel."""
    model = build_model(model_config) if init_from is None else load_hf_model(init_from, "--init_from")
    norm_kernel = use_fused_layer_norm(model, device_type)
    if gradient_checkpointing:
        # Non-reentrant on every transformers version (4.x and 5.x default to different modes): it is
        # the mode torch recommends, and it works with inputs that need no grad and with ZeRO's hooks.
        non_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        model.config.use_cache = False
    if compiled:
        compile_layers(model)
    return model, norm_kernel


def compile_layers(model: nn.Module) -> int:
    """torch.compile every encoder and decoder layer in place (``nn.Module.compile``: parameter names, and
    so checkpoints and exports, stay as they are). Per layer rather than the whole model: the loss hooks
    the LM head for each batch (pipeline/loss.py), which would make a whole-model graph recompile, and
    identical layers share one compiled graph. Returns the number of layers compiled."""
    inner = model.get_encoder(), model.get_decoder()
    layers = [layer for stack in inner for layer in stack.layers]
    for layer in layers:
        layer.compile()
    return len(layers)
