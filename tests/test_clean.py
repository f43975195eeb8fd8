import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.clean import CleanConfig, clean
from data_tools.common import UserError
from tests.conftest import FIXTURES


def read_documents(directory: Path) -> list[str]:
    return [json.loads(line)["text"] for shard in sorted(directory.glob("documents-*.jsonl")) for line in shard.open()]


def run_clean(tmp_path: Path, *inputs: Path, **overrides) -> dict:
    config = CleanConfig(input_paths=list(inputs), output_dir=tmp_path / "clean", progress=False, **overrides)
    return clean(config)


def test_every_document_is_kept_or_counted_with_its_reason(tmp_path):
    manifest = run_clean(tmp_path, FIXTURES / "noisy_documents.txt")
    counts = manifest["counts"]
    assert counts["documents_read"] == 10
    assert counts["documents_kept"] + sum(counts["documents_dropped"].values()) == counts["documents_read"]
    assert counts["documents_dropped"] == {"duplicate": 1, "too_short": 1, "low_cjk_ratio": 1}
    documents = read_documents(tmp_path / "clean")
    assert len(documents) == counts["documents_kept"] == 7
    # Tags become spaces, entities are decoded (&nbsp; is a space, then collapsed).
    assert "这本书的内容丰富， 印刷精美&装订结实。 推荐大家购买。" in documents
    assert "详情请访问 了解更多信息，或者发邮件到 咨询。" in documents
    assert not any("https://" in doc or "@example.com" in doc or "\u200b" in doc for doc in documents)
    assert "全角字符ABC123应该被转换成半角，标点，。！？保持不变。" in documents
    assert "多余的 空格 应该被压缩成一个。" in documents


def test_manifest_records_config_and_shard_checksums(tmp_path):
    manifest = run_clean(tmp_path, FIXTURES / "noisy_documents.txt", documents_per_shard=3)
    assert manifest["stage"] == "clean"
    assert manifest["config"]["min_chars"] == 5
    assert [s["documents"] for s in manifest["shards"]] == [3, 3, 1]
    on_disk = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert on_disk == manifest


def test_uer_format_groups_sentences_into_documents(tmp_path):
    manifest = run_clean(tmp_path, FIXTURES / "uer_format.txt")
    assert manifest["counts"]["documents_read"] == 3
    assert read_documents(tmp_path / "clean")[0] == "第一篇文章的第一句。\n第一篇文章的第二句！"


def test_jsonl_counts_bad_lines_instead_of_losing_them(tmp_path):
    manifest = run_clean(tmp_path, FIXTURES / "documents.jsonl")
    counts = manifest["counts"]
    assert counts["documents_read"] == 5
    assert counts["documents_dropped"] == {"invalid_json": 1, "missing_text_field": 1}
    assert read_documents(tmp_path / "clean")[0] == "第一条JSON记录，内容是中文。"


def test_gzip_input_and_directories_are_read(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with gzip.open(raw / "part.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("压缩文件里的第一篇文档。\n压缩文件里的第二篇文档。\n")
    (raw / "plain.txt").write_text("普通文件里的一篇文档。\n", encoding="utf-8")
    manifest = run_clean(tmp_path, raw)
    assert manifest["counts"]["documents_kept"] == 3


def test_a_line_longer_than_the_limit_is_skipped_and_counted(tmp_path):
    raw = tmp_path / "long.txt"
    raw.write_text("正常的第一篇文档。\n" + "长" * 5000 + "\n正常的第三篇文档。\n", encoding="utf-8")
    manifest = run_clean(tmp_path, raw, max_line_bytes=1000)
    assert manifest["counts"]["documents_dropped"] == {"line_too_long": 1}
    assert read_documents(tmp_path / "clean") == ["正常的第一篇文档。", "正常的第三篇文档。"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    raw = tmp_path / "bad.txt"
    raw.write_bytes("前半句".encode() + b"\xff\xfe" + "后半句也是中文。\n".encode())
    manifest = run_clean(tmp_path, raw)
    assert manifest["counts"]["documents_with_invalid_utf8_replaced"] == 1
    assert manifest["counts"]["documents_kept"] == 1


def test_missing_and_empty_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_clean(tmp_path, tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        run_clean(tmp_path, empty)


def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.clean", "--input_paths", str(tmp_path / "missing.txt"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing.txt does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def shard_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("documents-*.jsonl"))]


def test_output_is_identical_for_any_number_of_processes(tmp_path, clue_uer_file, clue_lines_file):
    one = clean(CleanConfig(input_paths=[clue_uer_file, clue_lines_file], output_dir=tmp_path / "one",
                            progress=False, chunk_documents=300))
    two = clean(CleanConfig(input_paths=[clue_uer_file, clue_lines_file], output_dir=tmp_path / "two",
                            progress=False, chunk_documents=300, processes_num=2))
    assert one["counts"] == two["counts"] and one["shards"] == two["shards"]
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one["counts"]["documents_read"] == 2500 + 2500 and one["counts"]["bytes_read"] > 3_800_000


def test_repetition_filters(tmp_path):
    raw = tmp_path / "raw.jsonl"
    documents = [
        "正常的文档有好几行。\n第二行内容不同。\n第三行也不同。",
        "重复的行\n重复的行\n重复的行\n唯一的一行",
        "哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈真好笑",
    ]
    raw.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    manifest = run_clean(tmp_path, raw)
    assert manifest["counts"]["documents_dropped"] == {"repeated_lines": 1, "repeated_chars": 1}


def test_traditional_to_simplified(tmp_path):
    pytest.importorskip("opencc", reason="OpenCC is not installed")
    raw = tmp_path / "t.txt"
    raw.write_text("這是繁體中文的漢字，體育與乾燥。\n", encoding="utf-8")
    run_clean(tmp_path, raw, traditional_to_simplified=True)
    assert read_documents(tmp_path / "clean") == ["这是繁体中文的汉字，体育与干燥。"]


def test_near_duplicates_are_dropped_with_minhash(tmp_path):
    pytest.importorskip("datasketch", reason="datasketch is not installed")
    base = "近似重复的文档只改了一个字，其余的内容完全一样，用来检验局部敏感哈希能否发现它们。" * 3
    raw = tmp_path / "near.txt"
    raw.write_text(base + "\n" + base.replace("检验", "检查", 1) + "\n完全不同的另一篇文档，讲的是天气和公园。\n",
                   encoding="utf-8")
    manifest = run_clean(tmp_path, raw, near_dedup_threshold=0.8)
    assert manifest["counts"]["documents_dropped"] == {"near_duplicate": 1}
    assert manifest["counts"]["documents_kept"] == 2


def test_slices_split_by_file_and_combine_with_cross_slice_dedup(tmp_path):
    from data_tools.combine_slices import CombineConfig, combine

    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(3):
        (raw / f"part{index}.txt").write_text(f"第{index}个文件独有的文档内容。\n所有文件都有的同一篇文档。\n", encoding="utf-8")
    slice_dirs = []
    for index in range(2):
        out = tmp_path / f"slice-{index}"
        clean(CleanConfig(input_paths=[raw], output_dir=out, num_slices=2, slice_index=index, progress=False))
        slice_dirs.append(out)
    assert [len(json.loads((d / "manifest.json").read_text())["inputs"]) for d in slice_dirs] == [2, 1]
    manifest = combine(CombineConfig(input_dirs=slice_dirs[::-1], output_dir=tmp_path / "combined"))
    counts = manifest["counts"]
    assert counts["documents_read"] == 6
    assert counts["documents_kept"] == 4 and counts["documents_dropped"] == {"duplicate": 2}
    assert read_documents(tmp_path / "combined")[0] == "第0个文件独有的文档内容。"


def _lines_one_readline_each(path, max_line_bytes):
    """The plain reading that read_lines' block reader must agree with: readline(limit + 1) per line."""
    with open(path, "rb") as handle:
        number = 0
        while chunk := handle.readline(max_line_bytes + 1):
            number += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):
                    chunk = handle.readline(7)
                yield number, None
            else:
                yield number, chunk.rstrip(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"\n", b"\r", b"a", "中".encode(), b"\r\n"]), max_size=60).map(b"".join),
       st.integers(1, 9), st.integers(1, 6))
def test_block_reading_gives_the_lines_readline_gives(tmp_path_factory, content, max_line_bytes, block_bytes):
    from unittest import mock

    from data_tools import raw_input

    path = tmp_path_factory.mktemp("lines") / "raw.txt"
    path.write_bytes(content)
    with mock.patch.object(raw_input, "READ_BLOCK_BYTES", block_bytes):
        assert list(raw_input.read_lines(path, max_line_bytes)) == list(_lines_one_readline_each(path, max_line_bytes))
