"""UER-py interop: import both architectures in each of UER-py's namings, export back, bad input.

The UER-py state dicts are built here from the published layer layout (UER-py's model
code at each naming era: which modules exist, their names and shapes), written out
independently of the mapping in pipeline/uer_interop.py, so every key must be accounted for.
"""

from __future__ import annotations

import math

import pytest
import torch

from data_tools.common import UserError
from pipeline.uer_interop import ExportUerConfig, ImportUerConfig, export_uer, import_uer, uer_sinusoidal_table

HIDDEN, FFN, POSITIONS, ENCODER_LAYERS, DECODER_LAYERS = 32, 48, 40, 2, 3


def layer_keys(prefix: str, decoder: bool) -> dict[str, tuple[int, ...]]:
    shapes = {}
    attention = ["self_attn", "context_attn"] if decoder else ["self_attn"]
    for block in attention:
        for linear in ("linear_layers.0", "linear_layers.1", "linear_layers.2", "final_linear"):
            shapes[f"{prefix}.{block}.{linear}.weight"] = (HIDDEN, HIDDEN)
            shapes[f"{prefix}.{block}.{linear}.bias"] = (HIDDEN,)
    shapes.update({f"{prefix}.feed_forward.linear_1.weight": (FFN, HIDDEN), f"{prefix}.feed_forward.linear_1.bias": (FFN,),
                   f"{prefix}.feed_forward.linear_2.weight": (HIDDEN, FFN),
                   f"{prefix}.feed_forward.linear_2.bias": (HIDDEN,)})
    for norm in ("layer_norm_1", "layer_norm_2", "layer_norm_3") if decoder else ("layer_norm_1", "layer_norm_2"):
        shapes[f"{prefix}.{norm}.gamma"] = shapes[f"{prefix}.{norm}.beta"] = (HIDDEN,)
    return shapes


def uer_state_dict(naming: str, architecture: str, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What UER-py's model.state_dict() holds for a BART / PEGASUS in the given naming."""
    word, position, target_word, target_position, embedding_norm, target_norm, pe, target_pe, decoder, head = {
        "2021": ("embedding.word_embedding.weight", "embedding.position_embedding.weight",
                 "target.embedding.word_embedding.weight", "target.embedding.position_embedding.weight",
                 "embedding.layer_norm", "target.embedding.layer_norm", "embedding.pe", "target.embedding.pe",
                 "target.decoder", "target.output_layer"),
        "2022": ("embedding.word_embedding.weight", "embedding.position_embedding.weight",
                 "tgt_embedding.word_embedding.weight", "tgt_embedding.position_embedding.weight",
                 "embedding.layer_norm", "tgt_embedding.layer_norm", "embedding.pe", "tgt_embedding.pe",
                 "decoder", "target.output_layer"),
        "2024": ("embedding.word.embedding.weight", "embedding.pos.embedding.weight",
                 "tgt_embedding.word.embedding.weight", "tgt_embedding.pos.embedding.weight",
                 "embedding.layer_norm", "tgt_embedding.layer_norm", None, None, "decoder", "target.lm.output_layer"),
    }[naming]
    shapes: dict[str, tuple[int, ...]] = {}
    for n in range(ENCODER_LAYERS):
        shapes.update(layer_keys(f"encoder.transformer.{n}", decoder=False))
    for n in range(DECODER_LAYERS):
        shapes.update(layer_keys(f"{decoder}.transformer_decoder.{n}", decoder=True))
    shapes[f"{head}.bias"] = (vocab_size,)
    if architecture == "bart":  # post-LN, learned positions, embedding layer norms
        shapes.update({position: (POSITIONS, HIDDEN), target_position: (POSITIONS, HIDDEN)})
        for norm in (embedding_norm, target_norm):
            shapes[f"{norm}.gamma"] = shapes[f"{norm}.beta"] = (HIDDEN,)
    else:  # pre-LN: final encoder and decoder norms; sinusoidal positions
        for norm in ("encoder.layer_norm", f"{decoder}.layer_norm"):
            shapes[f"{norm}.gamma"] = shapes[f"{norm}.beta"] = (HIDDEN,)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in shapes.items()}
    for key in state:
        if key.endswith(".gamma"):
            state[key] = state[key] + 1.0
    embedding = torch.randn(vocab_size, HIDDEN, generator=generator) * 0.1
    state[word] = state[target_word] = state[f"{head}.weight"] = embedding  # tied, saved three times
    if architecture == "pegasus" and pe is not None:  # a persistent buffer [P, 1, H], interleaved sin/cos
        table = uer_sinusoidal_table(POSITIONS, HIDDEN, "uer2021")[:, None, :]
        state[pe], state[target_pe] = table, table.clone()
    return state


@pytest.fixture()
def vocab_size(tiny_vocab) -> int:
    return len(tiny_vocab.read_text(encoding="utf-8").splitlines())


def imported(tmp_path, tiny_vocab, state, **flags):
    checkpoint = tmp_path / "uer_model.bin"
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoint)
    return import_uer(ImportUerConfig(checkpoint=checkpoint, vocab_path=tiny_vocab, output_dir=tmp_path / "hf",
                                      heads_num=4, **flags))


@pytest.mark.parametrize("naming", ["2021", "2022", "2024"])
@pytest.mark.parametrize("architecture", ["bart", "pegasus"])
def test_import_places_every_uer_tensor_where_hf_reads_it(tmp_path, tiny_vocab, vocab_size, naming, architecture):
    from transformers import AutoModelForSeq2SeqLM, BertTokenizer

    state = uer_state_dict(naming, architecture, vocab_size)
    out = imported(tmp_path, tiny_vocab, state)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    BertTokenizer.from_pretrained(str(out))  # the directory loads as DESIGN.md's snippet does
    assert model.config.model_type == architecture
    assert (model.config.encoder_layers, model.config.decoder_layers) == (ENCODER_LAYERS, DECODER_LAYERS)
    hf = model.state_dict()
    decoder = "target.decoder" if naming == "2021" else "decoder"
    head = "target.lm.output_layer" if naming == "2024" else "target.output_layer"
    expected = {
        "model.encoder.layers.1.self_attn.q_proj.weight": state["encoder.transformer.1.self_attn.linear_layers.0.weight"],
        "model.encoder.layers.0.self_attn.v_proj.bias": state["encoder.transformer.0.self_attn.linear_layers.2.bias"],
        "model.encoder.layers.1.fc2.weight": state["encoder.transformer.1.feed_forward.linear_2.weight"],
        "model.encoder.layers.0.final_layer_norm.weight": state["encoder.transformer.0.layer_norm_2.gamma"],
        "model.decoder.layers.2.encoder_attn.k_proj.weight":
            state[f"{decoder}.transformer_decoder.2.context_attn.linear_layers.1.weight"],
        "model.decoder.layers.1.encoder_attn_layer_norm.bias": state[f"{decoder}.transformer_decoder.1.layer_norm_2.beta"],
        "model.decoder.layers.0.final_layer_norm.weight": state[f"{decoder}.transformer_decoder.0.layer_norm_3.gamma"],
        "model.decoder.layers.2.self_attn.out_proj.weight":
            state[f"{decoder}.transformer_decoder.2.self_attn.final_linear.weight"],
        "lm_head.weight": state[f"{head}.weight"],
        "final_logits_bias": state[f"{head}.bias"][None, :],
    }
    if architecture == "bart":
        embedding_norm = "target.embedding.layer_norm" if naming == "2021" else "tgt_embedding.layer_norm"
        position = "embedding.pos.embedding.weight" if naming == "2024" else "embedding.position_embedding.weight"
        expected["model.decoder.layernorm_embedding.weight"] = state[f"{embedding_norm}.gamma"]
        # HF reads position p at row p + 2: two zero rows go in front
        expected["model.encoder.embed_positions.weight"] = torch.cat([torch.zeros(2, HIDDEN), state[position]])
    else:
        expected["model.decoder.layer_norm.weight"] = state[f"{decoder}.layer_norm.gamma"]
        assert model.config.scale_embedding and model.config.normalize_before
        if naming == "2024":  # no stored table: UER-py 2024's own, frequencies 10000^(-i/(H/2-1)), from row 2
            frequency = math.exp(-1 * math.log(10000) / (HIDDEN // 2 - 1))
            table = hf["model.encoder.embed_positions.weight"]
            assert table[0, 2].item() == pytest.approx(math.sin(2 * frequency), abs=1e-6)
            assert table[5, 3].item() == pytest.approx(math.cos(7 * frequency), abs=1e-6)
            assert model.config.max_position_embeddings == 1024
        else:  # the trained-with interleaved table travels as it is
            expected["model.encoder.embed_positions.weight"] = state["embedding.pe"][:, 0, :]
            expected["model.decoder.embed_positions.weight"] = state["embedding.pe"][:, 0, :]
    for key, tensor in expected.items():
        assert torch.equal(hf[key], tensor), key
    assert torch.equal(hf["model.shared.weight"], state[f"{head}.weight"])


@pytest.mark.parametrize("architecture", ["bart", "pegasus"])
def test_export_to_uer_2021_and_back_is_exact(tmp_path, tiny_vocab, vocab_size, architecture):
    """An HF model of ours -> UER-py 2021 file -> imported again: same weights, same logits."""
    from transformers import AutoModelForSeq2SeqLM

    from data_tools.wordpiece import BertWordPieceEncoder
    from pipeline.convert_to_hf import write_hf_directory
    from pipeline.model import build_model, load_model_config

    config = load_model_config(f"{architecture}-tiny", vocab_size, BertWordPieceEncoder(tiny_vocab).special_ids)
    torch.manual_seed(0)
    original = build_model(config).eval()
    with torch.no_grad():  # non-trivial norms and bias, so a wrong mapping cannot hide
        for name, parameter in original.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        original.final_logits_bias.add_(torch.randn_like(original.final_logits_bias))
    write_hf_directory(original, tiny_vocab, tmp_path / "ours", {})
    export_uer(ExportUerConfig(model_dir=tmp_path / "ours", output_file=tmp_path / "uer" / "model.bin"))
    uer = torch.load(tmp_path / "uer" / "model.bin", weights_only=True)
    assert "target.decoder.transformer_decoder.0.context_attn.linear_layers.0.weight" in uer
    assert uer["embedding.word_embedding.weight"].shape == (vocab_size, config.d_model)
    back = import_uer(ImportUerConfig(checkpoint=tmp_path / "uer" / "model.bin", vocab_path=tiny_vocab,
                                      output_dir=tmp_path / "back", heads_num=config.encoder_attention_heads,
                                      hidden_act=config.activation_function))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(back)).eval()
    theirs = reloaded.state_dict()
    for key, tensor in original.state_dict().items():
        if architecture == "bart" and "embed_positions" in key:
            # HF never reads rows 0-1 (positions start at 2), and UER-py has no place for them
            assert torch.equal(theirs[key][2:], tensor[2:]) and not theirs[key][:2].any(), key
            continue
        assert torch.equal(theirs[key], tensor), key
    ids = torch.tensor([[101, 5, 6, 7, 102, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "decoder_input_ids": ids[:, :4]}
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, reloaded(**batch).logits)


def test_unknown_and_missing_keys_are_named_with_the_file(tmp_path, tiny_vocab, vocab_size):
    state = uer_state_dict("2021", "bart", vocab_size)
    state["target.decoder.transformer_decoder.0.extra_gate.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match=r"uer_model.bin: 1 keys are not part of a UER-py 2021 bart.*extra_gate"):
        imported(tmp_path, tiny_vocab, state)
    state = uer_state_dict("2021", "bart", vocab_size)
    del state["target.decoder.transformer_decoder.1.context_attn.final_linear.bias"]
    with pytest.raises(UserError, match=r"uer_model.bin: key target.decoder.transformer_decoder.1.context_attn"
                                        r".final_linear.bias is missing"):
        imported(tmp_path, tiny_vocab, state)
    assert not (tmp_path / "hf").exists()  # nothing half-built


def test_vocab_size_mismatch_and_untied_decoder_embedding_are_clear_errors(tmp_path, tiny_vocab, vocab_size):
    with pytest.raises(UserError, match=rf"tiny_vocab.txt has {vocab_size} tokens but .*word embedding has "
                                        rf"{vocab_size + 3} rows"):
        imported(tmp_path, tiny_vocab, uer_state_dict("2024", "pegasus", vocab_size + 3))
    state = uer_state_dict("2022", "bart", vocab_size)
    state["tgt_embedding.word_embedding.weight"] = state["tgt_embedding.word_embedding.weight"] + 1
    with pytest.raises(UserError, match="tgt_embedding.word_embedding.weight differs from"):
        imported(tmp_path, tiny_vocab, state)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.bin is not a torch.save'd state dict"):
        import_uer(ImportUerConfig(checkpoint=tmp_path / "junk.bin", vocab_path=tiny_vocab, output_dir=tmp_path / "x"))


@pytest.mark.parametrize("architecture", ["bart", "pegasus"])
def test_an_untied_uer_head_stays_untied_and_the_embeddings_survive_a_reload(tmp_path, tiny_vocab, vocab_size,
                                                                           architecture):
    """UER-py since Aug 2023 saves a head that differs from the word embedding."""
    from transformers import AutoModelForSeq2SeqLM

    state = uer_state_dict("2024", architecture, vocab_size)
    state["target.lm.output_layer.weight"] = state["target.lm.output_layer.weight"] * 2
    model = AutoModelForSeq2SeqLM.from_pretrained(str(imported(tmp_path, tiny_vocab, state))).eval()
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, state["target.lm.output_layer.weight"])
    word = state["embedding.word.embedding.weight"]
    for embedding in (model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        assert torch.equal(embedding.weight, word)  # not re-initialized on reload


class UerLayerNorm(torch.nn.Module):
    """UER-py's layer norm: gamma * (x - mean) / (unbiased std + 1e-6) + beta (the reference)."""

    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        return self.weight * (x - mean) / (x.std(-1, keepdim=True) + 1e-6) + self.bias


def with_uer_layer_norms(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(module, child_name, UerLayerNorm(child))
    return model


@pytest.mark.parametrize("architecture", ["bart", "pegasus"])
def test_layer_norm_difference_from_uer_is_small_and_rescaling_shrinks_it(tmp_path, tiny_vocab, vocab_size,
                                                                          architecture):
    """The imported model vs the same weights under UER's layer norm formula: close, not equal."""
    from transformers import AutoModelForSeq2SeqLM

    state = uer_state_dict("2021", architecture, vocab_size, seed=1)
    plain = AutoModelForSeq2SeqLM.from_pretrained(str(imported(tmp_path / "plain", tiny_vocab, state))).eval()
    rescaled = AutoModelForSeq2SeqLM.from_pretrained(
        str(imported(tmp_path / "rescaled", tiny_vocab, state, rescale_layer_norm=True))).eval()
    reference = with_uer_layer_norms(
        AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "plain" / "hf"))).eval()
    ids = torch.randint(106, vocab_size, (4, 24), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "decoder_input_ids": ids[:, :12]}
    with torch.no_grad():
        uer_logits = reference(**batch).logits
        plain_error = (plain(**batch).logits - uer_logits).abs().max().item()
        rescaled_error = (rescaled(**batch).logits - uer_logits).abs().max().item()
    scale = uer_logits.abs().max().item()
    print(f"{architecture}: max |logit - UER layer norm logit| {plain_error:.2e} copied, {rescaled_error:.2e} "
          f"rescaled (max |logit| {scale:.2f})")
    assert 0 < plain_error < 0.05 * scale
    assert rescaled_error < plain_error
