from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.common import UserError
from data_tools.compiled import COMPILED
from data_tools.mask import MaskConfig, mask
from data_tools.shards import open_shard
from tests.test_noising import VOCAB


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
}
_DOCUMENTS = st.lists(st.lists(st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=40),
                               min_size=1, max_size=8), min_size=1, max_size=6)


@pytest.mark.skipif(not COMPILED, reason="numba is not installed: the per-document path is the only one")
@pytest.mark.parametrize("recipe", BLOCK_RECIPES, ids=list(BLOCK_RECIPES))
@settings(max_examples=40, deadline=None)
@given(documents=_DOCUMENTS, first=st.integers(min_value=0, max_value=10**9), pass_index=st.integers(0, 3),
       seq_length=st.sampled_from([8, 16, 64]))
def test_a_block_kernel_writes_what_the_per_document_path_writes(recipe, documents, first, pass_index, seq_length):
    """Ids 0-999 of a Google-shaped vocab: specials, [unused], characters and ## pieces; sentences longer
    than a chunk are cut; the kernel and mask_document see the same (seed, pass, document) streams."""
    import numpy as np

    from data_tools.mask import mask_block
    from data_tools.shards import DocumentBlock

    config = MaskConfig(input_dir=Path("in"), output_dir=Path("out"), seq_length=seq_length, seed=5,
                        **BLOCK_RECIPES[recipe])
    lengths = [len(sentence) for document in documents for sentence in document]
    block = DocumentBlock(first, np.cumsum([0] + [len(d) for d in documents]), np.cumsum([0] + lengths),
                          np.array([t for d in documents for s in d for t in s], dtype=np.uint16))
    (kernel_columns, kernel_skipped), (python_columns, python_skipped) = (
        mask_block(block, pass_index, config, VOCAB, compiled=compiled) for compiled in (True, False))
    for got, expected in zip(kernel_columns, python_columns):
        assert got.tolist() == expected.tolist()
    assert kernel_skipped == python_skipped
