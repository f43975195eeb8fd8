"""The data stages' outputs, pinned: clean, tokenize and mask (stored and online) on the CLUE sample and
the noisy fixture give the same bytes and counts as when the digests were taken.

Refactoring a stage must not change what it writes. A deliberate change of output regenerates the
pinned file (``ZH_UPDATE_STAGE_DIGESTS=1``) in its own commit, whose message says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURES

PINNED = FIXTURES / "stage_digests.json"
UPDATE = os.environ.get("ZH_UPDATE_STAGE_DIGESTS") == "1"

# Every masking path: BART, principal, lead and random gaps, every gap action, each preset, several passes
# and worker processes.
MASK_RECIPES = {
    "bart": {"target": "bart", "seq_length": 64},
    "bart_geometric_insert_rotate": {"target": "bart", "seq_length": 96, "span_distribution": "geometric",
                                     "insert_ratio": 0.1, "rotate_ratio": 0.5, "replace_length": -1,
                                     "random_ratio": 0.2, "keep_ratio": 0.1, "dup_factor": 2},
    "uer_bart": {"preset": "uer_bart", "seq_length": 128},
    "bart_paper": {"preset": "bart_paper", "seq_length": 128},
    "gsg_principal": {"target": "gsg", "seq_length": 128, "tgt_seq_length": 48,
                      "sentence_selection_strategy": "principal"},
    "gsg_principal_sequential_unique": {"target": "gsg", "seq_length": 128, "tgt_seq_length": 48,
                                        "sentence_selection_strategy": "principal", "rouge_mode": "sequential",
                                        "rouge_unique": True, "gap_action": "remove"},
    "gsg_lead_keep": {"target": "gsg", "seq_length": 96, "tgt_seq_length": 32,
                      "sentence_selection_strategy": "lead", "gap_action": "keep"},
    "uer_gsg": {"preset": "uer_gsg", "seq_length": 128, "tgt_seq_length": 48, "dup_factor": 2,
                "processes_num": 2, "chunk_documents": 300},
    "pegasus_paper_mixed": {"preset": "pegasus_paper", "seq_length": 128, "tgt_seq_length": 48,
                            "gap_action": "mixed"},
}
ONLINE_RECIPES = ("bart", "uer_bart", "uer_gsg", "pegasus_paper_mixed")
ONLINE_EXAMPLES = 400


def stage_digest(directory: Path) -> dict:
    """sha256 of every file but the manifest (shards, vocab) and the manifest's counts."""
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(directory.iterdir()) if path.is_file() and path.name != "manifest.json"}
    counts = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))["counts"]
    return {"files": files, "counts": counts}


def online_digest(examples) -> str:
    digest = hashlib.sha256()
    for epoch in (0, 1):
        for index in range(min(ONLINE_EXAMPLES, len(examples))):
            for part in examples.example(index, epoch):
                digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    digest.update(np.ascontiguousarray(examples.lengths(), dtype=np.int64).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, clue_lines_file, clue_uer_file, google_vocab) -> dict:
    from data_tools.clean import CleanConfig, clean
    from data_tools.mask import MaskConfig, mask
    from data_tools.tokenize_shards import TokenizeConfig, tokenize
    from pipeline.examples import OnlineMaskedExamples

    root = tmp_path_factory.mktemp("digests")
    digests: dict = {}
    clean(CleanConfig(input_paths=[clue_lines_file], output_dir=root / "clean", progress=False))
    digests["clean/clue"] = stage_digest(root / "clean")
    clean(CleanConfig(input_paths=[clue_uer_file], input_format="uer", output_dir=root / "clean-uer",
                      processes_num=2, chunk_documents=200, progress=False))
    digests["clean/clue_uer_format_2_processes"] = stage_digest(root / "clean-uer")
    noisy = FIXTURES / "noisy_documents.txt"
    clean(CleanConfig(input_paths=[noisy], output_dir=root / "clean-noisy", progress=False))
    digests["clean/noisy"] = stage_digest(root / "clean-noisy")
    clean(CleanConfig(input_paths=[noisy, clue_lines_file], output_dir=root / "clean-near", near_dedup_threshold=0.7,
                      dedup_partitions=3, progress=False))
    digests["clean/near_dedup_partitioned"] = stage_digest(root / "clean-near")
    clean(CleanConfig(input_paths=[noisy, clue_lines_file], output_dir=root / "clean-lsh", near_dedup_threshold=0.7,
                      near_dedup_partitions=4, processes_num=2, progress=False))
    digests["clean/near_dedup_lsh_partitions"] = stage_digest(root / "clean-lsh")  # with its MinHash signatures

    tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=google_vocab,
                            progress=False))
    digests["tokenize/clue"] = stage_digest(root / "tok")
    for name, flags in MASK_RECIPES.items():
        mask(MaskConfig(input_dir=root / "tok", output_dir=root / f"mask-{name}", progress=False, **flags))
        digests[f"mask/{name}"] = stage_digest(root / f"mask-{name}")
    for name in ONLINE_RECIPES:
        flags = {k: v for k, v in MASK_RECIPES[name].items() if k not in ("dup_factor", "processes_num",
                                                                          "chunk_documents")}
        config = MaskConfig(input_dir=root / "tok", output_dir=root / "unused", **flags)
        digests[f"online/{name}"] = online_digest(OnlineMaskedExamples(root / "tok", config))
    if UPDATE:
        PINNED.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return digests


def pinned() -> dict:
    if not PINNED.is_file():
        pytest.fail(f"{PINNED} is missing: run with ZH_UPDATE_STAGE_DIGESTS=1 to take the digests")
    return json.loads(PINNED.read_text(encoding="utf-8"))


@pytest.mark.parametrize("stage", ["clean/clue", "clean/clue_uer_format_2_processes", "clean/noisy",
                                   "clean/near_dedup_partitioned", "clean/near_dedup_lsh_partitions", "tokenize/clue"])
def test_clean_and_tokenize_write_the_pinned_output(outputs, stage):
    assert outputs[stage] == pinned()[stage]


@pytest.mark.parametrize("recipe", MASK_RECIPES)
def test_mask_writes_the_pinned_examples(outputs, recipe):
    assert outputs[f"mask/{recipe}"] == pinned()[f"mask/{recipe}"]


@pytest.mark.parametrize("recipe", ONLINE_RECIPES)
def test_online_masking_gives_the_pinned_examples(outputs, recipe):
    assert outputs[f"online/{recipe}"] == pinned()[f"online/{recipe}"]
