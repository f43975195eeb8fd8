import dataclasses
import typing

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.common import UserError
from data_tools.compiled import COMPILED
from data_tools.mask import MaskConfig, mask
from data_tools.masking.blocks import examples_of_block
from data_tools.masking.recipe import MASK_STAGE_RUN_FLAGS, RECIPE_FLAGS, MaskRecipe
from data_tools.shards import DocumentBlock, open_shard
from tests.masking_reference import VOCAB, reference_examples_of_documents


@pytest.fixture(scope="module")
def tokenized_dir(clue_tokenized_dir):
    return clue_tokenized_dir


def rows(directory, manifest):
    tables = [open_shard(directory / s["file"]) for s in manifest["shards"]]
    return [(s, t) for table in tables for s, t in zip(table.column("source_ids").to_pylist(),
                                                        table.column("target_ids").to_pylist())]


@pytest.mark.parametrize("target", ["bart", "gsg"])
def test_examples_follow_the_data_contract(tmp_path, tokenized_dir, target):
    out = tmp_path / target
    manifest = mask(MaskConfig(input_dir=tokenized_dir, output_dir=out, target=target, seq_length=128,
                               tgt_seq_length=48, progress=False))
    schema = open_shard(out / manifest["shards"][0]["file"]).schema
    assert schema.field("source_ids").type == pa.list_(pa.uint16())
    examples = rows(out, manifest)
    assert len(examples) == manifest["counts"]["examples"] > 1000
    for source, target_ids in examples:
        assert source[0] == 101 and source[-1] == 102 and 101 not in target_ids[:-1]
        assert target_ids[-1] == 102 and len(source) <= 128
    # 10% of bart spans become random tokens, so a short chunk can lack a [MASK]
    assert sum(103 in source for source, _ in examples) > 0.95 * len(examples)
    if target == "gsg":
        assert max(len(t) for _, t in examples) <= 48
    assert manifest["target"] == target and manifest["config"]["seed"] == 7
    assert (out / "vocab.txt").is_file()


def test_output_is_deterministic_and_dup_factor_gives_different_masks(tmp_path, tokenized_dir):
    one = mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / "a", target="bart", seq_length=128,
                          progress=False))
    again = mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / "b", target="bart", seq_length=128,
                            progress=False))
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in again["shards"]]
    two = mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / "c", target="bart", seq_length=128,
                          dup_factor=2, progress=False))
    examples = rows(tmp_path / "c", two)
    half = len(examples) // 2
    assert len(examples) == 2 * one["counts"]["examples"]
    assert [t for _, t in examples[:half]] == [t for _, t in examples[half:]]  # same targets
    assert [s for s, _ in examples[:half]] != [s for s, _ in examples[half:]]  # different masks


def test_bad_flags_are_user_errors(tmp_path, tokenized_dir):
    with pytest.raises(UserError, match="mask_ratio"):
        MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, target="bart", mask_ratio=1.5)
    with pytest.raises(UserError, match="--preset uer_gsg is for --target gsg"):
        MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, target="bart", preset="uer_gsg")
    with pytest.raises(UserError, match="give --target"):
        MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path)
    with pytest.raises(UserError, match="written by stage 'clean'"):
        mask(MaskConfig(input_dir=tokenized_dir.parent / "clean", output_dir=tmp_path / "x", target="bart"))


def test_presets_set_their_recipe_but_explicit_flags_win(tmp_path, tokenized_dir):
    config = MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, preset="uer_bart")
    assert (config.target, config.mask_ratio, config.span_distribution, config.max_span_length) == (
        "bart", 0.15, "geometric", 3)
    assert MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, preset="uer_bart", mask_ratio=0.2).mask_ratio == 0.2
    paper = MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path, preset="pegasus_paper")
    assert (paper.target, paper.sentence_selection_strategy, paper.rouge_mode, paper.rouge_unique) == (
        "gsg", "principal", "independent", False)
    # the recipe resolves the preset, in one place, whoever builds it
    assert config.recipe() == MaskRecipe(preset="uer_bart") == MaskRecipe(**{name: getattr(config, name)
                                                                             for name in RECIPE_FLAGS})
    assert paper.recipe() == MaskRecipe(preset="pegasus_paper", seq_length=512)


def test_the_stage_flags_are_the_recipe_and_how_the_stage_runs():
    """MaskConfig is paths + MaskRecipe's flags (same types, defaults and help) + the stage's run flags,
    which an online-mask JSON may also carry."""
    config_fields = {field.name: field for field in dataclasses.fields(MaskConfig)}
    assert set(config_fields) == {"input_dir", "output_dir"} | set(RECIPE_FLAGS) | MASK_STAGE_RUN_FLAGS
    config_hints, recipe_hints = typing.get_type_hints(MaskConfig), typing.get_type_hints(MaskRecipe)
    for field in dataclasses.fields(MaskRecipe):
        assert config_hints[field.name] == recipe_hints[field.name], field.name
        assert config_fields[field.name].default == field.default, field.name
        assert config_fields[field.name].metadata["help"] == field.metadata["help"], field.name


@pytest.mark.parametrize("flags, message", [
    (dict(target="bart", mask_ratio=1.5), "--mask_ratio 1.5 must lie strictly between 0 and 1"),
    (dict(preset="uer_gsg", target="bart"), "--preset uer_gsg is for --target gsg, not bart"),
    (dict(), "give --target bart|gsg or a --preset"),
    (dict(target="gsg", seq_length=64.0), "seq_length must be int, got 64.0"),
    (dict(preset="nonsense"), "preset must be one of"),
])
def test_the_recipe_and_the_stage_config_refuse_bad_flags_alike(tmp_path, flags, message):
    for build in (MaskRecipe, lambda **given: MaskConfig(input_dir=tmp_path, output_dir=tmp_path, **given)):
        with pytest.raises(UserError) as error:
            build(**flags)
        assert message in str(error.value)


def test_uer_bart_preset_corrupts_about_15_percent_with_single_masks(tmp_path, tokenized_dir):
    manifest = mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / "uer", preset="uer_bart",
                               seq_length=128, progress=False))
    examples = rows(tmp_path / "uer", manifest)
    assert manifest["preset"] == "uer_bart"
    assert all(not (a == b == 103) for source, _ in examples for a, b in zip(source, source[1:]))
    # 15% of tokens in spans of mean ~2.4 capped at 3, 80% of spans masked, each span one [MASK]
    assert 0.03 < sum(s.count(103) for s, _ in examples) / sum(len(t) for _, t in examples) < 0.08


@pytest.mark.parametrize("preset", ["uer_gsg", "pegasus_paper"])
def test_gsg_presets_build_gap_sentence_examples(tmp_path, tokenized_dir, preset):
    manifest = mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / preset, preset=preset,
                               seq_length=128, progress=False))
    examples = rows(tmp_path / preset, manifest)
    assert len(examples) > 1000 and all(s.count(103) >= 1 for s, _ in examples)
    if preset == "uer_gsg":
        # the last sentence is never a gap: every source ends with real tokens, not [MASK]
        assert all(s[-2] != 103 for s, _ in examples)


@pytest.mark.parametrize("preset", ["bart_paper", "pegasus_paper"])
def test_output_is_identical_for_any_number_of_processes(tmp_path, tokenized_dir, preset):
    manifests = [
        mask(MaskConfig(input_dir=tokenized_dir, output_dir=tmp_path / f"p{n}", preset=preset, seq_length=128,
                        dup_factor=2, processes_num=n, chunk_documents=n * 150, progress=False))
        for n in (1, 2)
    ]
    assert manifests[0]["shards"] == manifests[1]["shards"]


# -- the block kernels against the per-document path ---------------------------------------------

BLOCK_RECIPES = {
    "bart_paper": dict(preset="bart_paper"),
    "uer_bart": dict(preset="uer_bart"),
    "bart_insert_rotate": dict(target="bart", insert_ratio=0.1, rotate_ratio=0.5, replace_length=-1, keep_ratio=0.1),
    "bart_delete": dict(target="bart", replace_length=0, whole_word_mask=False, permute_sentence_ratio=0.5),
    "pegasus_paper": dict(preset="pegasus_paper"),
    "gsg_sequential_unique_keep_last": dict(preset="pegasus_paper", rouge_mode="sequential", rouge_unique=True,
                                            keep_last_sentence=True),
    "gsg_lead_remove": dict(target="gsg", sentence_selection_strategy="lead", gap_action="remove"),
    "gsg_principal_keep": dict(target="gsg", sentence_selection_strategy="principal", gap_action="keep",
                               gap_sentence_ratio=0.5, tgt_seq_length=8),
    "uer_gsg": dict(preset="uer_gsg"),
    "gsg_principal_mixed": dict(preset="pegasus_paper", gap_action="mixed"),
}
# Empty sentences too: they have no piece, as the tokenize stage's output never has them but a block may.
_DOCUMENTS = st.lists(st.lists(st.lists(st.integers(min_value=0, max_value=999), max_size=40),
                               min_size=1, max_size=8), min_size=1, max_size=6)


@pytest.mark.parametrize("recipe", BLOCK_RECIPES, ids=list(BLOCK_RECIPES))
@settings(max_examples=40, deadline=None)
@given(documents=_DOCUMENTS, first=st.integers(min_value=0, max_value=10**9), pass_index=st.integers(0, 3),
       seq_length=st.sampled_from([8, 16, 64]))
def test_a_block_writes_what_the_per_document_path_writes(recipe, documents, first, pass_index, seq_length):
    """Ids 0-999 of a Google-shaped vocab: specials, [unused], characters and ## pieces; sentences longer
    than a chunk are cut. The block (one kernel call) gives what the plain packing and
    the per-chunk functions give, document d's chunks drawing in turn from masking_randomness(seed, pass, d);
    with numba, so does the block path run as Python."""
    recipe = MaskRecipe(seq_length=seq_length, seed=5, **BLOCK_RECIPES[recipe])
    lengths = [len(sentence) for document in documents for sentence in document]
    block = DocumentBlock(first, np.cumsum([0] + [len(d) for d in documents]), np.cumsum([0] + lengths),
                          np.array([t for d in documents for s in d for t in s], dtype=np.uint16))
    sources, targets, skipped = reference_examples_of_documents(documents, first, pass_index, recipe, VOCAB)
    for compiled in (True, False) if COMPILED else (False,):
        (source_values, source_offsets, target_values, target_offsets), block_skipped = examples_of_block(
            block, pass_index, recipe, VOCAB, compiled)
        assert [source_values[a:b].tolist() for a, b in zip(source_offsets, source_offsets[1:])] == sources
        assert [target_values[a:b].tolist() for a, b in zip(target_offsets, target_offsets[1:])] == targets
        assert block_skipped == skipped and all(type(n) is int for n in block_skipped.values())  # JSON-ready
