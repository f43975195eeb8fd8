"""zh-clean on Parquet: a dataset hub's layout (several files of several row groups under
data/, beside a README), the text from --text_field read one record batch at a time, every row
kept or counted, and one-line errors for a missing column or a file that is not Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.clean import CleanConfig, clean, main
from data_tools.raw_input import _iter_parquet_documents


def real_documents(clue_lines_file: Path, count: int) -> list[str]:
    lines = [line for line in clue_lines_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) >= count
    return lines[:count]


def write_hub_layout(root: Path, texts: list, files: int = 3, row_group_size: int = 97, **columns) -> Path:
    """``root/data/train-0000K-of-0000N.parquet`` (several row groups each) and a README.md."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# 一个数据集的说明\n", encoding="utf-8")
    per_file = -(-len(texts) // files)
    for k in range(files):
        part = slice(k * per_file, (k + 1) * per_file)
        table = pa.table({"id": list(range(len(texts)))[part], "content": texts[part],
                          **{name: values[part] for name, values in columns.items()}})
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=row_group_size)
    assert pq.ParquetFile(root / "data" / f"train-00000-of-{files:05d}.parquet").num_row_groups > 1
    return root


def shard_texts(output: Path) -> list[str]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [json.loads(line)["text"] for shard in manifest["shards"]
            for line in (output / shard["file"]).read_text(encoding="utf-8").splitlines()]


def test_parquet_gives_the_same_documents_as_the_same_text_in_jsonl(tmp_path, clue_lines_file):
    texts = real_documents(clue_lines_file, 600)
    hub = write_hub_layout(tmp_path / "hub", texts)
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")

    from_parquet = clean(CleanConfig(input_paths=[hub], output_dir=tmp_path / "p", text_field="content",
                                     progress=False))
    from_jsonl = clean(CleanConfig(input_paths=[jsonl], output_dir=tmp_path / "j", text_field="content",
                                   progress=False))
    assert shard_texts(tmp_path / "p") == shard_texts(tmp_path / "j")
    assert from_parquet["counts"]["documents_read"] == len(texts)
    assert from_parquet["counts"]["documents_dropped"] == from_jsonl["counts"]["documents_dropped"]
    assert [entry["path"] for entry in from_parquet["inputs"]] == sorted(str(p) for p in (hub / "data").iterdir())
    assert from_parquet["skipped_inputs"] == [str(hub / "README.md")]  # never read as text
    assert from_parquet["counts"]["bytes_read"] == sum(len(t.encode()) for t in texts)


def test_every_row_is_kept_or_counted_nulls_and_empty_strings_included(tmp_path, clue_lines_file):
    texts: list = real_documents(clue_lines_file, 300)
    texts[5] = None
    texts[150] = None
    texts[151] = ""
    texts[299] = "   "
    hub = write_hub_layout(tmp_path / "hub", texts)
    manifest = clean(CleanConfig(input_paths=[hub / "data"], output_dir=tmp_path / "out", text_field="content",
                                 progress=False))
    counts = manifest["counts"]
    assert counts["documents_read"] == 300
    assert counts["documents_dropped"]["null_text"] == 2 and counts["documents_dropped"]["empty_text"] == 2
    assert counts["documents_kept"] + sum(counts["documents_dropped"].values()) == 300
    assert manifest["skipped_inputs"] == []


def test_a_column_that_is_not_text_drops_its_rows_with_a_reason(tmp_path, clue_lines_file):
    texts = real_documents(clue_lines_file, 50)
    hub = write_hub_layout(tmp_path / "hub", texts, files=1, row_group_size=20)
    rows = list(_iter_parquet_documents(hub / "data" / "train-00000-of-00001.parquet", "id", 1 << 20, batch_rows=7))
    assert [row.line_number for row in rows] == list(range(1, 51))
    assert {row.drop_reason for row in rows} == {"non_string_text"}
    assert main(["--input_paths", str(hub), "--output_dir", str(tmp_path / "out"), "--text_field", "id",
                 "--no-progress"]) == 2  # every document dropped: one line, nothing written
    assert not (tmp_path / "out").exists()


def test_rows_are_read_in_bounded_batches_in_file_order(tmp_path, clue_lines_file):
    texts = real_documents(clue_lines_file, 250)
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=64)
    rows = list(_iter_parquet_documents(path, "text", 1 << 20, batch_rows=10))
    assert [row.text for row in rows] == texts and rows[-1].line_number == 250
    long_limit = max(len(t.encode()) for t in texts) - 1  # the longest row is over the limit
    too_long = [row for row in _iter_parquet_documents(path, "text", long_limit) if row.drop_reason]
    assert too_long and {row.drop_reason for row in too_long} == {"line_too_long"}


def test_dictionary_encoded_text_is_read_as_text(tmp_path, clue_lines_file):
    texts = real_documents(clue_lines_file, 40)
    path = tmp_path / "categorical.parquet"
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), path)
    assert [row.text for row in _iter_parquet_documents(path, "text", 1 << 20)] == texts


@pytest.mark.parametrize("problem, fragments", [
    ("missing_column", ["no column 'text'", "content", "--text_field"]),
    ("not_parquet", ["cannot be read as Parquet", "bad.parquet"]),
    ("truncated", ["bad.parquet", "Parquet"]),
])
def test_bad_parquet_input_gets_one_line(tmp_path, clue_lines_file, capsys, problem, fragments):
    texts = real_documents(clue_lines_file, 100)
    path = tmp_path / "in" / "bad.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"content": texts}), path, row_group_size=30)
    if problem == "not_parquet":
        path.write_text("这不是 parquet 文件\n", encoding="utf-8")
    elif problem == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    assert main(["--input_paths", str(path.parent), "--output_dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], err
    assert not (tmp_path / "out").exists()
