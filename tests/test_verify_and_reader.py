"""verify catches damaged shards; the tokenized-corpus reader gives zero-copy random access."""

import shutil

import numpy as np
import pytest

from data_tools.clean import CleanConfig, clean
from data_tools.common import UserError
from data_tools.mask import MaskConfig, mask
from data_tools.shards import TokenizedCorpus, iter_rows, load_manifest
from data_tools.tokenize_shards import TokenizeConfig, tokenize
from data_tools.verify import VerifyConfig, verify


@pytest.fixture(scope="module")
def stages(tmp_path_factory, clue_lines_file, google_vocab):
    root = tmp_path_factory.mktemp("verify")
    clean(CleanConfig(input_paths=[clue_lines_file], output_dir=root / "clean", progress=False))
    tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=google_vocab,
                            progress=False, documents_per_shard=1000))
    mask(MaskConfig(input_dir=root / "tok", output_dir=root / "mask", target="gsg", seq_length=128, progress=False))
    return root


def damaged_copy(stages, tmp_path, stage):
    target = tmp_path / stage
    shutil.copytree(stages / stage, target)
    return target


@pytest.mark.parametrize("stage", ["clean", "tok", "mask"])
def test_intact_outputs_verify(stages, stage):
    assert verify(VerifyConfig(directory=stages / stage))["shards"]


@pytest.mark.parametrize("stage", ["tok", "mask"])
def test_a_truncated_shard_is_named(stages, tmp_path, stage):
    directory = damaged_copy(stages, tmp_path, stage)
    shard = sorted(directory.glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{shard.name} has \\d+ bytes, the manifest says \\d+ .truncated or modified"):
        verify(VerifyConfig(directory=directory))


def test_a_flipped_byte_is_named(stages, tmp_path):
    directory = damaged_copy(stages, tmp_path, "tok")
    shard = sorted(directory.glob("*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{shard.name} sha256"):
        verify(VerifyConfig(directory=directory))


def test_ids_beyond_the_vocab_are_named(stages, tmp_path):
    import hashlib
    import json

    directory = damaged_copy(stages, tmp_path, "tok")
    vocab = directory / "vocab.txt"  # a smaller vocab, and a manifest that agrees with it: the ids do not
    vocab.write_bytes(b"".join(line + b"\n" for line in vocab.read_bytes().split(b"\n")[:1000]))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["vocab"].update(size=1000, sha256=hashlib.sha256(vocab.read_bytes()).hexdigest())
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds id .* not below the vocab size 1000"):
        verify(VerifyConfig(directory=directory))


def test_an_edited_vocab_size_is_named(stages, tmp_path):
    import json

    directory = damaged_copy(stages, tmp_path, "tok")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["vocab"]["size"] = 1000
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="vocab.size is 1000 but .*vocab.txt has 21128 tokens"):
        verify(VerifyConfig(directory=directory))


def test_reader_gives_random_access_equal_to_a_scan(stages):
    corpus = TokenizedCorpus(stages / "tok")
    manifest = load_manifest(stages / "tok", "tokenize")
    scanned = list(iter_rows(stages / "tok", manifest, "sentences"))
    assert len(corpus) == len(scanned) == manifest["counts"]["documents_kept"]
    for index in (0, 1, 999, 1000, 1001, len(corpus) - 1, -1):
        assert [s.tolist() for s in corpus[index]] == scanned[index]
    document = corpus[1500]
    assert document[0].base is not None  # a view into the memory-mapped shard, not a copy
    assert document[0].dtype == np.uint16
    with pytest.raises(IndexError):
        corpus[len(corpus)]


def test_shard_bytes_do_not_depend_on_how_rows_were_handed_to_the_writer(tmp_path):
    """One row at a time, one block, or blocks of random sizes: the same batches, the same sha256."""
    import numpy as np
    import pyarrow as pa

    from data_tools.shards import RollingShardWriter, columns_from_sequences, list_array, list_column

    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 6000, rng.integers(1, 30)).astype(np.uint16) for _ in range(2_345)]
    schema = pa.schema([pa.field("ids", pa.list_(pa.uint16()))])

    def written(name, hand_over):
        directory = tmp_path / name
        directory.mkdir()
        writer = RollingShardWriter(directory, "x", schema, 1_000, 300,
                                    to_columns=lambda batch: {"ids": list_array(batch, pa.uint16())},
                                    row_stats=lambda row: {"tokens": len(row)})
        hand_over(writer)
        return writer.close()

    def in_blocks(sizes):
        def hand_over(writer):
            start = 0
            for size in sizes:
                block = rows[start:start + size]
                values, offsets = columns_from_sequences(block, pa.uint16())
                writer.add_columns({"ids": list_column(values, offsets, pa.uint16())}, {"tokens": np.diff(offsets)})
                start += size
        return hand_over

    one_by_one = written("rows", lambda writer: [writer.add(row) for row in rows])
    random_sizes = list(rng.integers(1, 100, 40))
    random_sizes.append(len(rows) - sum(random_sizes))
    assert sum(random_sizes) == len(rows) and random_sizes[-1] > 0
    for name, sizes in (("one", [len(rows)]), ("random", random_sizes), ("small", [7] * 335)):
        assert written(name, in_blocks(sizes)) == one_by_one, name
    assert [shard["rows"] for shard in one_by_one] == [1_000, 1_000, 345]
    assert sum(shard["tokens"] for shard in one_by_one) == sum(map(len, rows))


def test_numpy_views_and_arrow_arrays_round_trip_without_copies_or_pandas(stages):
    import subprocess
    import sys

    import pyarrow as pa

    from data_tools.shards import arrow_array, numpy_view

    values = np.arange(10, dtype=np.int64) * 3
    array = arrow_array(values, pa.uint16())
    assert array.type == pa.uint16() and array.to_pylist() == values.tolist()
    sliced = pa.array(values.tolist(), pa.int32()).slice(3, 4)  # a non-zero offset into the buffer
    assert numpy_view(sliced).tolist() == values[3:7].tolist()
    lists = pa.ListArray.from_arrays(arrow_array(np.array([0, 2, 5]), pa.int32()), array.slice(0, 5)).slice(1)
    assert numpy_view(lists.offsets).tolist() == [2, 5]
    with pytest.raises(ValueError, match="1 nulls"):
        numpy_view(pa.array([1, None], pa.int32()))
    # tokenize and mask never import pandas (pa.array / to_numpy would: ~0.3 s of each stage's start-up)
    script = (f"import sys; from pathlib import Path; from data_tools.mask import MaskConfig, mask; "
              f"from data_tools.shards import TokenizedCorpus; corpus = TokenizedCorpus(Path({str(stages / 'tok')!r})); "
              f"corpus[0]; mask(MaskConfig(input_dir=Path({str(stages / 'tok')!r}), output_dir=Path(sys.argv[1]), "
              f"target='bart', progress=False)); assert 'pandas' not in sys.modules, 'pandas imported'")
    out = stages.parent / "no-pandas-mask"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True)
