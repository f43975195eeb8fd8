"""Partitioned exact dedup (--dedup_partitions): the same output and counts as the in-memory set,
for zh-clean and zh-clean-combine, for any number of partitions and partition processes, with
kept + dropped = read across slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.clean import CleanConfig, clean
from data_tools.combine_slices import CombineConfig, combine
from data_tools.dedup import RECORD, DuplicateBitmap, PartitionedDigests, document_digest, later_copies


def corpus_with_copies(tmp_path: Path, clue_lines_file: Path) -> list[Path]:
    """Four files of real text where documents recur within a file and across files."""
    lines = [line for line in clue_lines_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    parts = [lines[:900] + lines[100:300], lines[800:1500], lines[1400:2000] + lines[:50], lines[2000:] + lines[5:9]]
    paths = []
    for index, part in enumerate(parts):
        path = tmp_path / "raw" / f"part-{index}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(part) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def texts_of(output: Path) -> list[str]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [json.loads(line)["text"] for shard in manifest["shards"]
            for line in (output / shard["file"]).read_text(encoding="utf-8").splitlines()]


def without_config(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key not in ("config", "shards")}


@pytest.mark.parametrize("partitions, processes", [(1, 1), (7, 1), (64, 2)])
def test_clean_gives_the_set_s_output_and_counts(tmp_path, clue_lines_file, partitions, processes):
    paths = corpus_with_copies(tmp_path, clue_lines_file)
    in_memory = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "set", progress=False,
                                  documents_per_shard=500))
    partitioned = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "parts", progress=False,
                                    documents_per_shard=500, dedup_partitions=partitions, processes_num=processes))
    assert in_memory["counts"]["documents_dropped"]["duplicate"] > 300  # the corpus does repeat itself
    assert without_config(partitioned) == without_config(in_memory)  # counts, per-file counts
    assert partitioned["shards"] == in_memory["shards"]  # byte-identical shards (sizes and sha256)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(p.name for p in (tmp_path / "set").iterdir())


def test_combine_across_slices_gives_the_set_s_output_and_keeps_the_invariant(tmp_path, clue_lines_file):
    paths = corpus_with_copies(tmp_path, clue_lines_file)
    slices = []
    for index in range(3):
        slices.append(tmp_path / f"slice-{index}")
        clean(CleanConfig(input_paths=paths, output_dir=slices[-1], num_slices=3, slice_index=index, progress=False,
                          dedup_partitions=5))
    in_memory = combine(CombineConfig(input_dirs=slices, output_dir=tmp_path / "set"))
    partitioned = combine(CombineConfig(input_dirs=slices, output_dir=tmp_path / "parts", dedup_partitions=16,
                                        processes_num=2))
    assert texts_of(tmp_path / "parts") == texts_of(tmp_path / "set")
    assert without_config(partitioned) == without_config(in_memory)
    counts = partitioned["counts"]
    assert counts["documents_kept"] + sum(counts["documents_dropped"].values()) == counts["documents_read"]
    whole = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "whole", progress=False))
    assert sorted(texts_of(tmp_path / "parts")) == sorted(texts_of(tmp_path / "whole"))  # slicing loses nothing
    assert partitioned["counts"]["documents_dropped"] == whole["counts"]["documents_dropped"]


def test_a_partition_job_marks_every_later_copy_and_keeps_the_first(tmp_path):
    texts = ["甲", "乙", "甲", "丙", "乙", "甲", "丁"]
    digests = PartitionedDigests(tmp_path / "d", partitions=3)
    for ordinal, text in enumerate(texts):
        digests.add(document_digest(text), ordinal, file_index=ordinal % 2)
    paths = digests.close()
    assert sum(len(np.fromfile(p, dtype=RECORD)) for p in paths) == len(texts)
    copies = np.sort(np.concatenate([later_copies(p)[0] for p in paths]))
    assert copies.tolist() == [2, 4, 5]
    per_file: dict[int, int] = {}
    for path in paths:
        for file_index, count in later_copies(path)[1].items():
            per_file[file_index] = per_file.get(file_index, 0) + count
    assert per_file == {0: 2, 1: 1}  # ordinals 2 and 4 are in file 0, ordinal 5 in file 1
    bitmap = DuplicateBitmap(len(texts))
    bitmap.mark(copies)
    assert [i for i in range(len(texts)) if i in bitmap] == [2, 4, 5] and bitmap.count == 3


def test_a_corpus_without_copies_gets_the_set_s_manifest(tmp_path, clue_lines_file):
    lines = [line for line in clue_lines_file.read_text(encoding="utf-8").splitlines() if line.strip()][:300]
    (tmp_path / "raw.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    in_memory = clean(CleanConfig(input_paths=[tmp_path / "raw.txt"], output_dir=tmp_path / "set", progress=False))
    partitioned = clean(CleanConfig(input_paths=[tmp_path / "raw.txt"], output_dir=tmp_path / "parts", progress=False,
                                    dedup_partitions=4))
    assert "duplicate" not in in_memory["counts"]["documents_dropped"]
    assert without_config(partitioned) == without_config(in_memory)


def test_spill_files_are_removed_with_the_staging_directory(tmp_path, clue_lines_file):
    paths = corpus_with_copies(tmp_path, clue_lines_file)
    clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "out", progress=False, dedup_partitions=4))
    assert not [p for p in tmp_path.rglob("*") if ".dedup-" in str(p) or ".partial" in p.name]
