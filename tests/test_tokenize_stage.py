import json

import pyarrow as pa
import pytest

from data_tools.clean import CleanConfig, clean
from data_tools.common import UserError, file_sha256
from data_tools.sentences import split_sentences
from data_tools.shards import open_shard
from data_tools.tokenize_shards import TokenizeConfig, tokenize
from data_tools.wordpiece import BertWordPieceEncoder
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
    with pytest.raises(UserError, match="--vocab_path .*none.txt is not a file"):
        tokenize(TokenizeConfig(input_dir=clean_dir, output_dir=tmp_path / "tok", vocab_path=tmp_path / "none.txt"))
    with pytest.raises(UserError, match="manifest.json not found"):
        tokenize(TokenizeConfig(input_dir=tmp_path, output_dir=tmp_path / "tok", vocab_path=tiny_vocab))


def test_output_is_identical_for_any_number_of_processes(tmp_path, clue_uer_file, google_vocab):
    clean(CleanConfig(input_paths=[clue_uer_file], output_dir=tmp_path / "clean", progress=False))
    manifests = [
        tokenize(TokenizeConfig(input_dir=tmp_path / "clean", output_dir=tmp_path / f"tok{n}", vocab_path=google_vocab,
                                progress=False, processes_num=n, chunk_documents=300, documents_per_shard=1000))
        for n in (1, 2)
    ]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    kept = manifests[0]["counts"]["documents_kept"]
    assert kept > 2000 and [s["rows"] for s in manifests[0]["shards"]] == [1000, 1000, kept - 2000]
    # and the rows are the oracle's ids, sentence by sentence
    encoder = BertWordPieceEncoder(google_vocab)
    texts = [json.loads(line)["text"] for line in (tmp_path / "clean" / "documents-00000.jsonl").open()][:200]
    rows = open_shard(tmp_path / "tok2" / "tokenized-00000.arrow").column("sentences").to_pylist()[:200]
    assert rows == [[ids for ids in (encoder.encode(s) for s in split_sentences(t)) if ids] for t in texts]


def test_a_bad_line_names_its_file_and_line(tmp_path, clean_dir, tiny_vocab):
    shard = clean_dir / "documents-00000.jsonl"
    lines = shard.read_text(encoding="utf-8").splitlines()
    lines[2] = "{broken"
    shard.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = TokenizeConfig(input_dir=clean_dir, output_dir=tmp_path / "tok", vocab_path=tiny_vocab, progress=False,
                            processes_num=2, chunk_documents=2)
    with pytest.raises(UserError, match=r"documents-00000.jsonl has \d+ bytes, the manifest says \d+"):
        tokenize(config)  # the edit is caught before any line is read
    manifest_path = clean_dir / "manifest.json"  # a manifest that agrees with the edited shard: the line is named
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["shards"][0].update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(UserError, match="documents-00000.jsonl:3: not a"):
        tokenize(config)
    assert not (tmp_path / "tok").exists()
