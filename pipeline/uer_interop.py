"""UER-py interop: import a UER-py BART / PEGASUS state dict as a HuggingFace directory, and
export one of ours back to UER-py's naming for its fine-tuning scripts.

UER-py (and TencentPretrain) renamed its checkpoint keys twice; the names inside a
transformer layer never changed, the embeddings, decoder and output layer did:

- ``2021``: UER-py until Feb 2022, which trained the published
  ``uer/bart-*-cluecorpussmall`` and ``uer/pegasus-base-chinese-cluecorpussmall``:
  ``embedding.word_embedding``, ``embedding.position_embedding``, the sinusoidal buffer
  ``embedding.pe``, the decoder under ``target.decoder``, the head ``target.output_layer``.
- ``2022``: UER-py Feb 2022 - Jul 2023: ``tgt_embedding.*`` and ``decoder.*`` at the top.
- ``2024``: UER-py from Jul 2023 and TencentPretrain: ``embedding.word.embedding``,
  ``embedding.pos.embedding``, ``tgt_embedding.word.embedding``, ``target.lm.output_layer``;
  PEGASUS stores no position table (its code computes one).

What differs from HF's classes, and how this module handles it:

- BART's learned positions: UER looks up rows 0..S-1, HF rows 2..S+1 of a table two rows
  longer, so two zero rows go in front (and come off on export).
- PEGASUS's sinusoidal table: UER's is interleaved (sin in even columns, cos in odd), HF's
  has all sines first. The model was trained with UER's, so UER's table itself travels in
  ``embed_positions`` (HF keeps a loaded table); 2024 checkpoints have none and get the
  table UER-py 2024 computes (other frequencies, starting at row 2).
- UER's LayerNorm divides by the unbiased standard deviation plus eps (1e-6) where HF's
  divides by sqrt(biased variance + 1e-5): the import copies gamma and beta unchanged, as
  UER-py's own converters did for the published models, so the imported model matches
  UER's outputs closely but not exactly; ``--rescale_layer_norm`` folds sqrt((H-1)/H) into
  gamma, which removes most of the difference (docs/uer-interop.md gives the measured figures).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from data_tools.cli import option, required, run_stage
from data_tools.common import UserError
from data_tools.outputs import check_apart, check_replaceable_file, overwrite_option, staged_file

PACKAGED_TEMPLATE = {"bart": "bart-base", "pegasus": "pegasus-base"}
UER_DEFAULT_MAX_POSITIONS = 1024  # max_seq_length in every UER-py bart/pegasus config


@dataclass(frozen=True)
class UerNaming:
    """Where a UER-py naming scheme keeps the tensors that are not inside a layer."""

    word: str
    position: str
    embedding_norm: str
    target_word: str
    target_position: str
    target_embedding_norm: str
    sinusoidal_table: str
    target_sinusoidal_table: str
    decoder: str
    output_layer: str


NAMINGS = {
    "2021": UerNaming(
        word="embedding.word_embedding.weight", position="embedding.position_embedding.weight",
        embedding_norm="embedding.layer_norm", target_word="target.embedding.word_embedding.weight",
        target_position="target.embedding.position_embedding.weight",
        target_embedding_norm="target.embedding.layer_norm", sinusoidal_table="embedding.pe",
        target_sinusoidal_table="target.embedding.pe", decoder="target.decoder", output_layer="target.output_layer",
    ),
    "2022": UerNaming(
        word="embedding.word_embedding.weight", position="embedding.position_embedding.weight",
        embedding_norm="embedding.layer_norm", target_word="tgt_embedding.word_embedding.weight",
        target_position="tgt_embedding.position_embedding.weight", target_embedding_norm="tgt_embedding.layer_norm",
        sinusoidal_table="embedding.pe", target_sinusoidal_table="tgt_embedding.pe", decoder="decoder",
        output_layer="target.output_layer",
    ),
    "2024": UerNaming(
        word="embedding.word.embedding.weight", position="embedding.pos.embedding.weight",
        embedding_norm="embedding.layer_norm", target_word="tgt_embedding.word.embedding.weight",
        target_position="tgt_embedding.pos.embedding.weight", target_embedding_norm="tgt_embedding.layer_norm",
        # only TencentPretrain checkpoints of late 2022 hold these buffers
        sinusoidal_table="embedding.sinusoidalpos.pe", target_sinusoidal_table="tgt_embedding.sinusoidalpos.pe",
        decoder="decoder", output_layer="target.lm.output_layer",
    ),
}

# (UER, HF) module names inside a layer: linear layers carry weight + bias, norms gamma/beta -> weight/bias.
ATTENTION = [("linear_layers.0", "q_proj"), ("linear_layers.1", "k_proj"), ("linear_layers.2", "v_proj"),
             ("final_linear", "out_proj")]
FEED_FORWARD = [("feed_forward.linear_1", "fc1"), ("feed_forward.linear_2", "fc2")]
ENCODER_NORMS = [("layer_norm_1", "self_attn_layer_norm"), ("layer_norm_2", "final_layer_norm")]
DECODER_NORMS = [("layer_norm_1", "self_attn_layer_norm"), ("layer_norm_2", "encoder_attn_layer_norm"),
                 ("layer_norm_3", "final_layer_norm")]


# -- the mapping: pure functions over state dicts --------------------------------------------------


def detect_naming(keys: set[str], source: str) -> str:
    if "embedding.word.embedding.weight" in keys:
        return "2024"
    if "embedding.word_embedding.weight" in keys:
        return "2021" if any(k.startswith("target.decoder.") for k in keys) else "2022"
    raise UserError(f"{source}: no UER-py word embedding (embedding.word_embedding.weight or "
                    "embedding.word.embedding.weight); is this a UER-py BART/PEGASUS checkpoint?")


def detect_architecture(keys: set[str], naming: UerNaming, source: str) -> str:
    """BART is post-LN with an embedding layer norm; PEGASUS is pre-LN with final encoder/decoder norms."""
    if f"{naming.embedding_norm}.gamma" in keys:
        return "bart"
    if "encoder.layer_norm.gamma" in keys:
        return "pegasus"
    raise UserError(f"{source}: neither {naming.embedding_norm}.gamma (BART) nor encoder.layer_norm.gamma "
                    "(PEGASUS) is present; pass --architecture")


def count_layers(keys: set[str], prefix: str, source: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise UserError(f"{source}: layers under {prefix}N are {sorted(indices) or 'absent'}; expected 0..L-1")
    return max(indices) + 1


def layer_pairs(architecture: str, naming: UerNaming, encoder_layers: int, decoder_layers: int,
                ) -> list[tuple[str, str]]:
    """(UER key, HF key) of every tensor that is copied unchanged."""
    pairs = []

    def add(uer_module: str, hf_module: str, norm: bool = False) -> None:
        names = (("gamma", "weight"), ("beta", "bias")) if norm else (("weight", "weight"), ("bias", "bias"))
        pairs.extend((f"{uer_module}.{u}", f"{hf_module}.{h}") for u, h in names)

    for n in range(encoder_layers):
        uer, hf = f"encoder.transformer.{n}", f"model.encoder.layers.{n}"
        for u, h in ATTENTION:
            add(f"{uer}.self_attn.{u}", f"{hf}.self_attn.{h}")
        for u, h in FEED_FORWARD:
            add(f"{uer}.{u}", f"{hf}.{h}")
        for u, h in ENCODER_NORMS:
            add(f"{uer}.{u}", f"{hf}.{h}", norm=True)
    for n in range(decoder_layers):
        uer, hf = f"{naming.decoder}.transformer_decoder.{n}", f"model.decoder.layers.{n}"
        for u, h in ATTENTION:
            add(f"{uer}.self_attn.{u}", f"{hf}.self_attn.{h}")
            add(f"{uer}.context_attn.{u}", f"{hf}.encoder_attn.{h}")
        for u, h in FEED_FORWARD:
            add(f"{uer}.{u}", f"{hf}.{h}")
        for u, h in DECODER_NORMS:
            add(f"{uer}.{u}", f"{hf}.{h}", norm=True)
    if architecture == "bart":
        add(naming.embedding_norm, "model.encoder.layernorm_embedding", norm=True)
        add(naming.target_embedding_norm, "model.decoder.layernorm_embedding", norm=True)
    else:
        add("encoder.layer_norm", "model.encoder.layer_norm", norm=True)
        add(f"{naming.decoder}.layer_norm", "model.decoder.layer_norm", norm=True)
    return pairs


def uer_sinusoidal_table(rows: int, hidden: int, scheme: Literal["uer2021", "uer2024"]) -> torch.Tensor:
    """The PEGASUS position table UER-py adds for positions 0..rows-1, interleaved sin/cos.

    2021/2022 code: frequency 10000^(-2i/H) at row p. 2024 code: frequency
    exp(-i ln(10000) / (H/2 - 1)), and position p reads row p + 2.
    """
    half = torch.arange(hidden // 2, dtype=torch.float64)
    if scheme == "uer2021":
        frequencies, positions = torch.exp(-2 * half * math.log(10000.0) / hidden), torch.arange(rows)
    else:
        frequencies, positions = torch.exp(-half * math.log(10000.0) / (hidden // 2 - 1)), torch.arange(rows) + 2
    angles = positions.double()[:, None] * frequencies[None, :]
    table = torch.zeros(rows, hidden, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return table.float()


@dataclass
class ImportedWeights:
    state_dict: dict[str, torch.Tensor]
    architecture: str
    naming: str
    encoder_layers: int
    decoder_layers: int
    hidden: int
    ffn: int
    vocab_size: int
    max_positions: int
    tied_head: bool
    position_table: str


def uer_to_hf(uer: dict[str, torch.Tensor], source: str, naming_name: str = "auto", architecture: str = "auto",
              sinusoidal_table: str = "auto", max_positions: int = 0, rescale_layer_norm: bool = False,
              ) -> ImportedWeights:
    """HF BART/PEGASUS weights from a UER-py state dict; every UER key must be used."""
    keys = set(uer)
    naming_name = detect_naming(keys, source) if naming_name == "auto" else naming_name
    naming = NAMINGS[naming_name]
    architecture = detect_architecture(keys, naming, source) if architecture == "auto" else architecture
    encoder_layers = count_layers(keys, "encoder.transformer.", source)
    decoder_layers = count_layers(keys, f"{naming.decoder}.transformer_decoder.", source)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in uer:
            raise UserError(f"{source}: key {key} is missing (UER-py {naming_name} {architecture} naming, "
                            f"{encoder_layers}+{decoder_layers} layers)")
        used.add(key)
        return uer[key].float()

    word = take(naming.word)
    vocab_size, hidden = word.shape
    hf: dict[str, torch.Tensor] = {}
    for uer_key, hf_key in layer_pairs(architecture, naming, encoder_layers, decoder_layers):
        tensor = take(uer_key)
        if rescale_layer_norm and uer_key.endswith(".gamma"):
            tensor = tensor * math.sqrt((hidden - 1) / hidden)
        hf[hf_key] = tensor
    # One shared word embedding in HF: UER's decoder copy (when saved) must be the same tensor.
    if naming.target_word in uer and not torch.equal(take(naming.target_word), word):
        raise UserError(f"{source}: {naming.target_word} differs from {naming.word}; HF BART/PEGASUS share one "
                        "word embedding between encoder and decoder (UER-py: share_embedding)")
    hf["model.shared.weight"] = hf["model.encoder.embed_tokens.weight"] = word
    hf["model.decoder.embed_tokens.weight"] = word
    head = take(f"{naming.output_layer}.weight")
    tied_head = torch.equal(head, word)
    hf["lm_head.weight"] = head
    bias_key = f"{naming.output_layer}.bias"
    hf["final_logits_bias"] = take(bias_key)[None, :] if bias_key in uer else torch.zeros(1, vocab_size)

    if architecture == "bart":
        tables = {}
        for side, key in (("encoder", naming.position), ("decoder", naming.target_position)):
            table = take(key)
            tables[side] = table
            hf[f"model.{side}.embed_positions.weight"] = torch.cat([torch.zeros(2, hidden), table])
        max_positions, position_table = tables["encoder"].shape[0], "learned (2 zero rows prepended)"
    else:
        stored = [key for key in (naming.sinusoidal_table, naming.target_sinusoidal_table) if key in uer]
        if sinusoidal_table == "auto" and stored:
            for side, key in (("encoder", naming.sinusoidal_table), ("decoder", naming.target_sinusoidal_table)):
                hf[f"model.{side}.embed_positions.weight"] = take(key).reshape(-1, hidden)
            max_positions = hf["model.encoder.embed_positions.weight"].shape[0]
            position_table = f"from the checkpoint ({', '.join(stored)}, interleaved sin/cos)"
        else:
            scheme = sinusoidal_table if sinusoidal_table != "auto" else (
                "uer2024" if naming_name == "2024" else "uer2021")
            max_positions = max_positions or UER_DEFAULT_MAX_POSITIONS
            table = uer_sinusoidal_table(max_positions, hidden, scheme)
            hf["model.encoder.embed_positions.weight"] = hf["model.decoder.embed_positions.weight"] = table
            position_table = f"computed as UER-py {scheme[3:]} does (interleaved sin/cos)"
            used.update(stored)  # replaced on request
    unknown = sorted(keys - used)
    if unknown:
        raise UserError(f"{source}: {len(unknown)} keys are not part of a UER-py {naming_name} {architecture} with "
                        f"{encoder_layers}+{decoder_layers} layers: {', '.join(unknown[:8])}"
                        + (" ..." if len(unknown) > 8 else "") + "; pass --naming/--architecture if detection "
                        "guessed wrong")
    return ImportedWeights(
        state_dict=hf, architecture=architecture, naming=naming_name, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, hidden=hidden, ffn=hf["model.encoder.layers.0.fc1.weight"].shape[0],
        vocab_size=vocab_size, max_positions=max_positions, tied_head=tied_head, position_table=position_table,
    )


def hf_to_uer(hf: dict[str, torch.Tensor], architecture: str, encoder_layers: int, decoder_layers: int,
              naming_name: str = "2021") -> dict[str, torch.Tensor]:
    """A UER-py state dict (with the tied copies UER-py itself saves) from HF weights."""
    naming = NAMINGS[naming_name]
    uer = {uer_key: hf[hf_key].clone() for uer_key, hf_key in layer_pairs(architecture, naming, encoder_layers,
                                                                          decoder_layers)}
    word = hf["model.shared.weight"].clone()
    uer[naming.word] = uer[naming.target_word] = word
    head = hf.get("lm_head.weight", hf["model.shared.weight"])
    uer[f"{naming.output_layer}.weight"] = word if torch.equal(head, word) else head.clone()
    uer[f"{naming.output_layer}.bias"] = hf["final_logits_bias"].reshape(-1).clone()
    if architecture == "bart":
        uer[naming.position] = hf["model.encoder.embed_positions.weight"][2:].clone()
        uer[naming.target_position] = hf["model.decoder.embed_positions.weight"][2:].clone()
    elif naming_name != "2024":  # UER-py 2024 computes its table and saves none
        uer[naming.sinusoidal_table] = hf["model.encoder.embed_positions.weight"][:, None, :].clone()
        uer[naming.target_sinusoidal_table] = hf["model.decoder.embed_positions.weight"][:, None, :].clone()
    return uer


# -- the stages ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ImportUerConfig:
    """Turn a UER-py BART or PEGASUS checkpoint (a torch.save'd state dict) into an HF model directory."""

    checkpoint: Path = required("UER-py model file, e.g. cluecorpussmall_pegasus_base_seq512_model.bin-250000.")
    vocab_path: Path = required("The vocab the model was trained with (UER-py: --vocab_path; Google's Chinese "
                                "vocab for the published models).")
    output_dir: Path = required("HF model directory to write; an earlier import there is replaced once the new one is "
                                "complete, any other existing directory is refused (see --overwrite).")
    naming: Literal["auto", "2021", "2022", "2024"] = option(
        "auto", "UER-py key naming: 2021 (the published models), 2022, 2024 (UER-py since Jul 2023, "
        "TencentPretrain); auto detects it from the keys.")
    architecture: Literal["auto", "bart", "pegasus"] = option(
        "auto", "bart (post-LN, embedding layer norm) or pegasus (pre-LN); auto detects it from the keys.")
    heads_num: int = option(0, "Attention heads (not stored in a state dict); 0 = hidden size / 64, as in every "
                            "UER-py bart/pegasus config.")
    hidden_act: str = option("", "Activation; empty = UER-py's config for the architecture (bart gelu, pegasus relu).")
    sinusoidal_table: Literal["auto", "uer2021", "uer2024"] = option(
        "auto", "pegasus: the position table; auto = the checkpoint's own (embedding.pe) when it has one, else "
        "the one the naming's UER-py code computes.")
    max_position_embeddings: int = option(0, "pegasus without a stored table: rows of the computed table; "
                                          "0 = 1024 (UER-py's max_seq_length).")
    rescale_layer_norm: bool = option(False, "Multiply layer-norm gammas by sqrt((H-1)/H) so HF's biased-variance "
                                      "norm approximates UER's unbiased one more closely (off: copied unchanged, as "
                                      "UER-py's converters did for the published models).")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.checkpoint, self.vocab_path, self.output_dir = (Path(self.checkpoint), Path(self.vocab_path),
                                                             Path(self.output_dir))
        if self.heads_num < 0 or self.max_position_embeddings < 0:
            raise UserError(f"--heads_num {self.heads_num} and --max_position_embeddings "
                            f"{self.max_position_embeddings} must be >= 0")


def load_uer_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"UER-py checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors have many types; all mean the same to a user
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a torch.save'd state dict of tensors ({type(error).__name__}: {first_line})") \
            from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def import_uer(config: ImportUerConfig) -> Path:
    from transformers import AutoModelForSeq2SeqLM

    from data_tools.wordpiece import load_encoder
    from pipeline.convert_to_hf import check_hf_output, load_weights_strict, write_hf_directory
    from pipeline.model import load_model_config

    encoder = load_encoder(config.vocab_path)
    check_hf_output(config.output_dir, "zh-import-uer", config.overwrite,
                    {"--checkpoint": config.checkpoint, "--vocab_path": config.vocab_path})
    source = str(config.checkpoint)
    weights = uer_to_hf(load_uer_state_dict(config.checkpoint), source, config.naming, config.architecture,
                        config.sinusoidal_table, config.max_position_embeddings, config.rescale_layer_norm)
    if len(encoder.vocab) != weights.vocab_size:
        raise UserError(f"{config.vocab_path} has {len(encoder.vocab)} tokens but {source}'s word embedding has "
                        f"{weights.vocab_size} rows; pass the vocab the model was trained with")
    heads = config.heads_num or weights.hidden // 64
    if not config.heads_num and (heads == 0 or weights.hidden % heads):
        raise UserError(f"{source}: hidden size {weights.hidden} is not a multiple of 64, so the head count cannot be "
                        "inferred (a state dict does not store it); pass --heads_num from the model's UER-py config")
    if weights.hidden % heads:
        raise UserError(f"--heads_num {heads} does not divide the hidden size {weights.hidden}")
    model_config = load_model_config(PACKAGED_TEMPLATE[weights.architecture], weights.vocab_size, encoder.special_ids)
    model_config.update({
        "d_model": weights.hidden, "encoder_layers": weights.encoder_layers, "decoder_layers": weights.decoder_layers,
        "encoder_attention_heads": heads, "decoder_attention_heads": heads, "encoder_ffn_dim": weights.ffn,
        "decoder_ffn_dim": weights.ffn, "max_position_embeddings": weights.max_positions,
        "activation_function": config.hidden_act or ("gelu" if weights.architecture == "bart" else "relu"),
        "tie_word_embeddings": weights.tied_head, "num_hidden_layers": weights.encoder_layers,
    })
    model = AutoModelForSeq2SeqLM.from_config(model_config)
    load_weights_strict(model, weights.state_dict, source)
    if not weights.tied_head:
        # HF BART builds embed_tokens on the same Parameter as `shared`, so save_pretrained writes
        # one copy, and from_pretrained re-ties them only when tie_word_embeddings is true: an
        # untied model would reload with random embed_tokens. Separate copies are all saved.
        for stack in (model.model.encoder, model.model.decoder):
            stack.embed_tokens.weight = torch.nn.Parameter(model.model.shared.weight.detach().clone())
    write_hf_directory(model, config.vocab_path, config.output_dir, {
        "written_by": "zh-import-uer", "imported_from": source, "uer_naming": weights.naming, "architecture": weights.architecture,
        "position_table": weights.position_table, "layer_norm": "gamma rescaled by sqrt((H-1)/H)"
        if config.rescale_layer_norm else "gamma/beta copied unchanged (UER: unbiased std + 1e-6; HF: biased "
        "variance + 1e-5 under the root)", "tied_lm_head": weights.tied_head,
    })
    print(f"import-uer: {source} (UER-py {weights.naming} naming, {weights.architecture} "
          f"{weights.encoder_layers}+{weights.decoder_layers} layers, hidden {weights.hidden}, {heads} heads, "
          f"positions {weights.position_table}) -> {config.output_dir}", file=sys.stderr)
    return config.output_dir


@dataclass(kw_only=True)
class ExportUerConfig:
    """Write an HF BART/PEGASUS directory (ours or published) as a UER-py state dict."""

    model_dir: Path = required("HF model directory (a zh-export output or an imported/published model).")
    output_file: Path = required("UER-py model file to write (torch.save'd state dict); an existing file is refused "
                                 "unless --overwrite.")
    naming: Literal["2021", "2022", "2024"] = option(
        "2021", "UER-py key naming to write: 2021 matches the scripts the published models were fine-tuned with.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.model_dir, self.output_file = Path(self.model_dir), Path(self.output_file)


def export_uer(config: ExportUerConfig) -> Path:
    from pipeline.model import load_hf_model

    check_apart(config.output_file, "--output_file", {"--model_dir": config.model_dir})
    check_replaceable_file(config.output_file, "--output_file", "zh-export-uer", False, config.overwrite)
    model = load_hf_model(config.model_dir, "--model_dir")
    architecture = model.config.model_type
    state = {k: v.detach() for k, v in model.state_dict().items()}
    uer = hf_to_uer(state, architecture, model.config.encoder_layers, model.config.decoder_layers, config.naming)
    with staged_file(config.output_file) as staging:
        torch.save(uer, staging)
    note = ("; UER-py 2024 computes its own PEGASUS position table, which differs from this model's"
            if architecture == "pegasus" and config.naming == "2024" else "")
    print(f"export-uer: {config.model_dir} -> {config.output_file} ({len(uer)} tensors, UER-py {config.naming} "
          f"naming; UER-py config: {architecture} layers_num {model.config.encoder_layers}, hidden "
          f"{model.config.d_model}, heads {model.config.encoder_attention_heads}){note}", file=sys.stderr)
    return config.output_file


def import_main(argv: list[str] | None = None) -> int:
    return run_stage(import_uer, ImportUerConfig, argv)


def export_main(argv: list[str] | None = None) -> int:
    return run_stage(export_uer, ExportUerConfig, argv)


if __name__ == "__main__":
    sys.exit(import_main())
