import json

import pyarrow as pa
import pytest

from data_tools.clean import CleanConfig, clean
from data_tools.cli import UserError
from data_tools.sentences import split_sentences
from data_tools.shards import open_shard
from data_tools.tokenize_shards import TokenizeConfig, tokenize
from data_tools.wordpiece import BertWordPieceEncoder, file_sha256
from tests.conftest import FIXTURES


@pytest.fixture()
def clean_dir(tmp_path):
    clean(CleanConfig(input_paths=[FIXTURES / "noisy_documents.txt", FIXTURES / "uer_format.txt"],
                      output_dir=tmp_path / "clean", progress=False))
    return tmp_path / "clean"


def test_rows_are_documents_of_sentences_of_bert_ids(tmp_path, clean_dir, tiny_vocab):
    manifest = tokenize(TokenizeConfig(input_dir=clean_dir, output_dir=tmp_path / "tok", vocab_path=tiny_vocab,
                                       progress=False, documents_per_shard=4))
    encoder = BertWordPieceEncoder(tiny_vocab)
    texts = [json.loads(line)["text"] for line in (clean_dir / "documents-00000.jsonl").open()]
    rows = [row for shard in manifest["shards"] for row in
            open_shard(tmp_path / "tok" / shard["file"]).column("sentences").to_pylist()]
    assert rows == [[encoder.encode(s) for s in split_sentences(t)] for t in texts]
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["counts"]["tokens"] == sum(len(s) for row in rows for s in row)


def test_arrow_schema_manifest_and_datasets_compatibility(tmp_path, clean_dir, tiny_vocab):
    datasets = pytest.importorskip("datasets")
    manifest = tokenize(TokenizeConfig(input_dir=clean_dir, output_dir=tmp_path / "tok", vocab_path=tiny_vocab,
                                       progress=False))
    shard = tmp_path / "tok" / manifest["shards"][0]["file"]
    assert open_shard(shard).schema.field("sentences").type == pa.list_(pa.list_(pa.uint16()))
    assert manifest["vocab"]["sha256"] == file_sha256(tiny_vocab)
    assert manifest["vocab"]["size"] == len(tiny_vocab.read_text().splitlines())
    assert manifest["vocab"]["special_token_ids"] == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102,
                                                       "[MASK]": 103}
    assert manifest["shards"][0]["sha256"] == file_sha256(shard)
    assert (tmp_path / "tok" / "vocab.txt").read_bytes() == tiny_vocab.read_bytes()
    dataset = datasets.Dataset.from_file(str(shard))
    assert len(dataset) == manifest["shards"][0]["rows"]
    assert dataset[0]["sentences"] == open_shard(shard).column("sentences")[0].as_py()


def test_missing_vocab_and_wrong_input_dir_are_user_errors(tmp_path, clean_dir, tiny_vocab):
    with pytest.raises(UserError, match="vocab .* not found"):
        TokenizeConfig(input_dir=clean_dir, output_dir=tmp_path / "tok", vocab_path=tmp_path / "none.txt")
    with pytest.raises(UserError, match="manifest.json not found"):
        tokenize(TokenizeConfig(input_dir=tmp_path, output_dir=tmp_path / "tok", vocab_path=tiny_vocab))
