"""The parts the data stages share: typed manifests, clean's named filters, and the stage skeleton."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from data_tools.clean import CleanConfig, ordered_filters, quality_filters
from data_tools.common import UserError
from data_tools.filters import (
    DocumentFilter,
    EmptyAfterNormalization,
    NormalizedChunk,
    TooShort,
    drop_reasons,
)
from data_tools.manifests import MANIFEST, CleanCounts, CleanManifest, read_manifest
from data_tools.shards import ShardedJsonlWriter, load_manifest, shard_paths
from data_tools.stage import DataStage, Worker, run_data_stage

# -- typed manifests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_dirs(clue_tokenized_dir, bart_examples_dir) -> dict[str, Path]:
    return {"clean": clue_tokenized_dir.parent / "clean", "tokenize": clue_tokenized_dir, "mask": bart_examples_dir}


@pytest.mark.parametrize("stage", ["clean", "tokenize", "mask"])
def test_a_typed_manifest_writes_back_the_bytes_the_stage_wrote(stage_dirs, stage):
    text = (stage_dirs[stage] / MANIFEST).read_text(encoding="utf-8")
    manifest = read_manifest(stage_dirs[stage], stage)
    assert type(manifest).STAGE == stage
    assert json.dumps(manifest.to_json(), ensure_ascii=False, indent=2) + "\n" == text
    assert manifest.row_count == sum(shard.row_count for shard in manifest.shards) > 0


def copy_manifest(source: Path, target: Path, change) -> Path:
    target.mkdir()
    value = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    change(value)
    (target / MANIFEST).write_text(json.dumps(value), encoding="utf-8")
    return target


@pytest.mark.parametrize(("stage", "change", "says"), [
    ("clean", lambda m: m["shards"][0].update(documents=True), "shards[0].documents is missing or not a count"),
    ("clean", lambda m: m["shards"][0].update(bytes=-1), "shards[0].bytes is missing or not a count"),
    ("clean", lambda m: m["counts"].update(documents_dropped=[]),
     "counts.documents_dropped is missing or not an object"),
    ("clean", lambda m: m["counts"].pop("documents_read"), "counts.documents_read is missing or not a count"),
    ("tokenize", lambda m: m["vocab"].update(size=0), "vocab.size or vocab.sha256 is missing"),
    ("tokenize", lambda m: m["counts"].pop("documents_kept"), "counts.documents_kept is missing or not a count"),
    ("mask", lambda m: m.pop("vocab"), "field 'vocab' is missing or not an object"),
    ("mask", lambda m: m["shards"].append("x"), "shards[1] is not an object"),
])
def test_a_wrong_field_is_refused_in_one_line_naming_file_and_field(stage_dirs, tmp_path, stage, change, says):
    directory = copy_manifest(stage_dirs[stage], tmp_path / "copy", change)
    for read in (read_manifest, load_manifest):
        with pytest.raises(UserError) as raised:
            read(directory, stage)
        assert str(raised.value) == f"{directory / MANIFEST}: {says}; re-run the {stage} stage that wrote it"


def test_manifests_of_earlier_versions_stay_readable(stage_dirs, tmp_path):
    """Fields added over time (shard sizes, skipped inputs, characters) may be absent: read as None."""
    def strip(manifest: dict) -> None:
        manifest.pop("skipped_inputs")
        manifest["counts"].pop("characters_kept")
        for shard in manifest["shards"]:
            shard.pop("bytes")
            shard.pop("characters")

    directory = copy_manifest(stage_dirs["clean"], tmp_path / "old", strip)
    for shard in json.loads((directory / MANIFEST).read_text())["shards"]:
        shutil.copyfile(stage_dirs["clean"] / shard["file"], directory / shard["file"])
    manifest = read_manifest(directory, "clean")
    assert manifest.skipped_inputs is None and manifest.counts.characters_kept is None
    assert all(shard.bytes is None for shard in manifest.shards)
    assert shard_paths(directory, manifest) == shard_paths(directory, load_manifest(directory, "clean"))


# -- clean's filters -----------------------------------------------------------------------------------


def test_the_filters_are_named_by_the_drop_reasons_the_manifest_counts(tmp_path):
    config = CleanConfig(input_paths=[tmp_path], output_dir=tmp_path / "out", near_dedup_threshold=0.8)
    assert [f.name for f in quality_filters(config)] == ["empty_after_normalization", "too_short", "too_long",
                                                          "low_cjk_ratio", "repeated_lines", "repeated_chars"]
    assert [f.name for f in ordered_filters(config)] == ["duplicate", "near_duplicate"]
    partitioned = CleanConfig(input_paths=[tmp_path], output_dir=tmp_path / "out", dedup_partitions=4)
    assert ordered_filters(partitioned) == []  # exact copies are then found after the pass


class HasDigit(DocumentFilter):
    """A filter written for the test: one class, its name the reason."""

    name = "has_digit"

    def rejects(self, chunk: NormalizedChunk, candidates: np.ndarray) -> np.ndarray:
        return np.array([any(c.isdigit() for c in chunk.texts[i]) for i in candidates.tolist()], dtype=bool)


def test_a_new_filter_is_one_class_and_the_first_filter_that_rejects_names_the_reason():
    chunk = NormalizedChunk.measure(["", "今天是1号", "今天天气很好", "1"])
    assert drop_reasons(chunk, [EmptyAfterNormalization(), HasDigit()]) == [
        "empty_after_normalization", "has_digit", None, "has_digit"]
    assert drop_reasons(chunk, [EmptyAfterNormalization(), TooShort(2), HasDigit()]) == [
        "empty_after_normalization", "has_digit", None, "too_short"]


# -- the stage skeleton -----------------------------------------------------------------------------------


def _shout(texts: list[str]) -> list[str]:
    return [text.upper() for text in texts]


class ShoutStage(DataStage[list[str], list[str]]):
    """A toy stage: upper-cases texts into document shards, two texts per work item."""

    name, shard_prefix = "clean", "documents"

    def __init__(self, texts: list[str], output_dir: Path, processes: int, fail: bool = False) -> None:
        self.texts, self.fail = texts, fail
        self.output_dir, self.overwrite, self.processes, self.inputs = output_dir, False, processes, {}

    def start(self, staging: Path, resources: ExitStack) -> None:
        self.writer = ShardedJsonlWriter(staging, documents_per_shard=3)
        scratch = staging / ".scratch"
        scratch.mkdir()
        resources.callback(shutil.rmtree, scratch)  # gone before the output is published

    def work_items(self):
        return (self.texts[i:i + 2] for i in range(0, len(self.texts), 2))

    def worker(self) -> Worker[list[str], list[str]]:
        return Worker(_shout)

    def consume(self, result: list[str]) -> None:
        for text in result:
            self.writer.write(text)

    def finish(self, staging: Path) -> CleanManifest:
        shards = self.writer.close()
        if self.fail:
            raise UserError("refused")
        kept = sum(shard.documents for shard in shards)
        counts = CleanCounts(documents_read=len(self.texts), documents_kept=kept, documents_dropped={},
                             characters_read=None, characters_kept=None, bytes_read=None,
                             documents_with_invalid_utf8_replaced=None)
        return CleanManifest(config={}, counts=counts, inputs=[], skipped_inputs=[], shards=shards)

    def summary(self, manifest: CleanManifest) -> str:
        return f"shout: {manifest.row_count} documents"


def test_the_skeleton_publishes_in_input_order_whatever_the_processes(tmp_path, capsys):
    texts = [f"text {i}" for i in range(7)]
    one = run_data_stage(ShoutStage(texts, tmp_path / "one", processes=1))
    two = run_data_stage(ShoutStage(texts, tmp_path / "two", processes=2))
    assert one == two and [shard["documents"] for shard in one["shards"]] == [3, 3, 1]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "documents-00000.jsonl", "documents-00001.jsonl", "documents-00002.jsonl", MANIFEST]
    shards = shard_paths(tmp_path / "one", read_manifest(tmp_path / "one", "clean"))
    lines = [json.loads(line)["text"] for path in shards for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [text.upper() for text in texts]
    assert "shout: 7 documents" in capsys.readouterr().err


def test_the_skeleton_leaves_the_previous_output_when_a_stage_refuses(tmp_path):
    run_data_stage(ShoutStage(["a", "b"], tmp_path / "out", processes=1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(UserError, match="refused"):
        run_data_stage(ShoutStage(["c"], tmp_path / "out", processes=1, fail=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial sibling left
