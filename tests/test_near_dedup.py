"""Partitioned near-dedup (--near_dedup_partitions): equal to a plain in-memory reference of the same
rule (LSH candidates of the same signatures, verified, "drop a document near an earlier one") for
1..64 partitions and any number of processes, in zh-clean and across slices in zh-clean-combine,
with kept + dropped = read; killed-stage files are named, never read as 'no duplicates'."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_tools.clean import CleanConfig, clean
from data_tools.combine_slices import CombineConfig, combine
from data_tools.common import UserError
from data_tools.verify import VerifyConfig, verify
from data_tools.near_dedup import (
    MinHasher,
    NearDedupSpill,
    find_near_copies,
    lsh_bands,
    near_copies,
)
from tests.test_partitioned_dedup import texts_of

THRESHOLD, NUM_PERM = 0.8, 128
ALPHABET = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def planted_texts(documents: int, seed: int = 0) -> list[str]:
    """Random Chinese documents, a third of them edited copies of an earlier one (0.2-6% of their
    characters replaced: 5-gram Jaccard from ~0.98 down to ~0.5) or copies of such a copy (chains)."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for index in range(documents):
        if index and rng.random() < 0.35:
            chars = list(texts[int(rng.integers(index))])
            for position in rng.choice(len(chars), int(len(chars) * rng.uniform(0.002, 0.06)), replace=False):
                chars[position] = ALPHABET[int(rng.integers(len(ALPHABET)))]
            texts.append("".join(chars))
        else:
            texts.append("".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=int(rng.integers(60, 300)))))
    return texts


def reference_marks(signatures: list[np.ndarray], threshold: float, verify: bool = True) -> set[int]:
    """The rule in memory, one document at a time: bands compared as tuples, no hashing of keys."""
    bands, rows = lsh_bands(threshold, len(signatures[0]))
    buckets: dict[tuple, list[int]] = defaultdict(list)
    marked = set()
    for ordinal, signature in enumerate(signatures):
        candidates = set()
        for band in range(bands):
            key = (band, tuple(signature[band * rows : (band + 1) * rows].tolist()))
            candidates.update(buckets[key])
            buckets[key].append(ordinal)
        if any(not verify or (signatures[c] == signature).mean() >= threshold for c in candidates):
            marked.add(ordinal)
    return marked


def partitioned_marks(tmp_path: Path, signatures, partitions: int, processes: int = 1, verify: bool = True) -> set:
    spill = NearDedupSpill(tmp_path / f"near-{partitions}-{processes}-{verify}", THRESHOLD, NUM_PERM, partitions,
                           verify)
    for signature in signatures:
        spill.add(signature)
    bitmap = find_near_copies(spill, processes)
    marked = {ordinal for ordinal in range(len(signatures)) if ordinal in bitmap}
    assert bitmap.count == len(marked)
    return marked


@pytest.fixture(scope="module")
def planted_signatures():
    hasher = MinHasher(NUM_PERM)
    return [hasher.signature(text) for text in planted_texts(600)]


@pytest.mark.parametrize("partitions, processes, verify",
                         [(1, 1, True), (2, 1, True), (7, 2, True), (64, 1, True), (5, 1, False)])
def test_partitioned_equals_the_in_memory_reference(tmp_path, planted_signatures, partitions, processes, verify):
    expected = reference_marks(planted_signatures, THRESHOLD, verify)
    assert 30 < len(expected) < 200  # the corpus does hold near-duplicates, and not only them
    assert partitioned_marks(tmp_path, planted_signatures, partitions, processes, verify) == expected


def test_bands_and_signatures_match_datasketch_s_choices():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.8, 0.9):
        assert lsh_bands(threshold, NUM_PERM) == _optimal_param(threshold, NUM_PERM, 0.5, 0.5)
    hasher, text = MinHasher(NUM_PERM), planted_texts(1)[0]
    edited = text[:100] + "改" + text[101:]
    grams = [{t[i : i + 5] for i in range(len(t) - 4)} for t in (text, edited)]
    exact = len(grams[0] & grams[1]) / len(grams[0] | grams[1])
    assert abs((hasher.signature(text) == hasher.signature(edited)).mean() - exact) < 0.1
    assert (MinHasher(NUM_PERM).signature(text) == hasher.signature(text)).all()  # a fixed hash family


def write_corpus(tmp_path: Path, texts: list[str], files: int = 4) -> list[Path]:
    paths = []
    for index in range(files):
        path = tmp_path / "raw" / f"part-{index}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(texts[index::files]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def reference_output(texts: list[str], ngram: int = 5) -> list[str]:
    hasher = MinHasher(NUM_PERM, ngram)
    marked = reference_marks([hasher.signature(text) for text in texts], THRESHOLD)
    return [text for ordinal, text in enumerate(texts) if ordinal not in marked]


def accounted(manifest: dict) -> bool:
    counts = manifest["counts"]
    return counts["documents_kept"] + sum(counts["documents_dropped"].values()) == counts["documents_read"]


@pytest.mark.parametrize("dedup_partitions", [0, 3])
def test_clean_drops_what_the_reference_drops(tmp_path, dedup_partitions):
    texts = planted_texts(400, seed=1)
    texts += texts[:30]  # exact copies: counted as duplicate, whichever exact dedup runs
    paths = write_corpus(tmp_path, texts)
    plain = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "plain", progress=False))
    near = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "near", progress=False, near_dedup_threshold=0.8,
                             near_dedup_partitions=16, dedup_partitions=dedup_partitions, processes_num=2,
                             documents_per_shard=100))
    assert texts_of(tmp_path / "near") == reference_output(texts_of(tmp_path / "plain"))
    dropped = near["counts"]["documents_dropped"]
    assert dropped["duplicate"] == plain["counts"]["documents_dropped"]["duplicate"] >= 30
    assert dropped["near_duplicate"] == plain["counts"]["documents_kept"] - near["counts"]["documents_kept"] > 20
    assert accounted(near)
    assert sum(entry["documents_kept"] for entry in near["inputs"]) == near["counts"]["documents_kept"]


def test_the_ngram_size_is_the_shingle_clean_uses(tmp_path):
    """--minhash_ngram 3: the signatures are of the text's distinct 3-grams, and clean drops what the reference
    with 3-gram signatures drops (more than with 5-grams: a replaced character breaks fewer shingles)."""
    text = planted_texts(1)[0][:80] * 2
    assert len(MinHasher(NUM_PERM, 3).shingles(text)) == len({text[i : i + 3] for i in range(len(text) - 2)})
    texts = planted_texts(300, seed=3)
    paths = write_corpus(tmp_path, texts)
    clean(CleanConfig(input_paths=paths, output_dir=tmp_path / "plain", progress=False))
    dropped = {}
    for ngram in (3, 5):
        near = clean(CleanConfig(input_paths=paths, output_dir=tmp_path / f"near{ngram}", progress=False,
                                 near_dedup_threshold=0.8, near_dedup_partitions=8, minhash_ngram=ngram))
        assert texts_of(tmp_path / f"near{ngram}") == reference_output(texts_of(tmp_path / "plain"), ngram)
        assert near["config"]["minhash_ngram"] == ngram and accounted(near)
        dropped[ngram] = near["counts"]["documents_dropped"]["near_duplicate"]
    assert dropped[3] > dropped[5] > 0


def test_combine_finds_near_duplicates_across_slices(tmp_path):
    paths = write_corpus(tmp_path, planted_texts(400, seed=2), files=6)
    slices = []
    for index in range(3):
        slices.append(tmp_path / f"slice-{index}")
        clean(CleanConfig(input_paths=paths, output_dir=slices[-1], num_slices=3, slice_index=index, progress=False))
    plain = combine(CombineConfig(input_dirs=slices, output_dir=tmp_path / "plain"))
    for partitions, processes in ((1, 1), (64, 2)):
        output = tmp_path / f"near-{partitions}"
        near = combine(CombineConfig(input_dirs=slices, output_dir=output, near_dedup_threshold=0.8,
                                     near_dedup_partitions=partitions, processes_num=processes))
        assert texts_of(output) == reference_output(texts_of(tmp_path / "plain"))
        assert near["counts"]["documents_dropped"]["near_duplicate"] > 20
        assert accounted(near) and accounted(plain)


def recorded_signatures(directory: Path) -> np.ndarray:
    return np.load(directory / "minhash_signatures.npy")


def test_clean_records_the_kept_documents_signatures_and_combine_reads_them(tmp_path, capsys):
    """Slices cleaned with --near_dedup_partitions record their kept documents' signatures; combine reads them
    (no second MinHash pass over the corpus) and keeps what it keeps when it computes them, and records its own."""
    paths = write_corpus(tmp_path, planted_texts(400, seed=4), files=6)
    recorded, bare = [], []
    for index in range(3):
        recorded.append(tmp_path / f"recorded-{index}")
        manifest = clean(CleanConfig(input_paths=paths, output_dir=recorded[-1], num_slices=3, slice_index=index,
                                     near_dedup_threshold=0.8, near_dedup_partitions=4, progress=False))
        signatures = recorded_signatures(recorded[-1])
        assert manifest["minhash"]["rows"] == manifest["counts"]["documents_kept"] == len(signatures)
        hasher = MinHasher(NUM_PERM)
        assert all((hasher.signature(text) == row).all() for text, row in zip(texts_of(recorded[-1]), signatures))
        bare.append(tmp_path / f"bare-{index}")  # the same slice as written before signatures were recorded
        shutil.copytree(recorded[-1], bare[-1])
        (bare[-1] / "minhash_signatures.npy").unlink()
        (bare[-1] / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "minhash"}))
    capsys.readouterr()
    options = dict(near_dedup_threshold=0.8, near_dedup_partitions=8, processes_num=2)
    read = combine(CombineConfig(input_dirs=recorded, output_dir=tmp_path / "read", **options))
    assert "reading the 3 slices' MinHash signatures" in capsys.readouterr().err
    computed = combine(CombineConfig(input_dirs=bare, output_dir=tmp_path / "computed", **options))
    assert "computing MinHash signatures" in capsys.readouterr().err
    assert texts_of(tmp_path / "read") == texts_of(tmp_path / "computed")
    assert read["counts"] == computed["counts"] and read["counts"]["documents_dropped"]["near_duplicate"] > 0
    assert (recorded_signatures(tmp_path / "read") == recorded_signatures(tmp_path / "computed")).all()
    assert read["minhash"]["rows"] == read["counts"]["documents_kept"]
    # signatures of another shingle size are not used
    combine(CombineConfig(input_dirs=recorded, output_dir=tmp_path / "ngram3", minhash_ngram=3, **options))
    assert "computing MinHash signatures" in capsys.readouterr().err


def test_a_damaged_signature_file_of_a_slice_is_named(tmp_path):
    paths = write_corpus(tmp_path, planted_texts(120, seed=5), files=2)
    slice_dir = tmp_path / "slice"
    clean(CleanConfig(input_paths=paths, output_dir=slice_dir, near_dedup_threshold=0.8, near_dedup_partitions=2,
                      progress=False))
    path = slice_dir / "minhash_signatures.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{path}.*sha256.*re-run the clean job") as error:
        combine(CombineConfig(input_dirs=[slice_dir], output_dir=tmp_path / "out", near_dedup_threshold=0.8,
                              near_dedup_partitions=2))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(UserError, match=f"{path}: .* bytes"):
        verify(VerifyConfig(directory=slice_dir))


def test_signatures_recorded_for_more_documents_than_the_shards_hold_are_refused(tmp_path):
    paths = write_corpus(tmp_path, planted_texts(120, seed=6), files=2)
    slice_dir = tmp_path / "slice"
    clean(CleanConfig(input_paths=paths, output_dir=slice_dir, near_dedup_threshold=0.8, near_dedup_partitions=2,
                      progress=False))
    manifest_path = slice_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["documents_kept"] += 1
    manifest["minhash"]["rows"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="minhash.rows is .* but its shards hold .* re-run the clean job") as error:
        combine(CombineConfig(input_dirs=[slice_dir], output_dir=tmp_path / "out", near_dedup_threshold=0.8,
                              near_dedup_partitions=2))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_a_truncated_or_missing_file_of_a_killed_stage_is_named(tmp_path, planted_signatures):
    spill = NearDedupSpill(tmp_path / "near", THRESHOLD, NUM_PERM, 4)
    for signature in planted_signatures[:200]:
        spill.add(signature)
    jobs = spill.close()
    truncated = jobs[1][0]
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(UserError, match=f"band partition file {truncated}.*expected"):
        near_copies(jobs[1])
    jobs[2][0].unlink()
    with pytest.raises(UserError, match="missing"):
        near_copies(jobs[2])
    signatures = jobs[0][2]
    signatures.write_bytes(signatures.read_bytes()[:-4])
    with pytest.raises(UserError, match=f"signature file {signatures}"):
        near_copies(jobs[3])


@pytest.mark.parametrize("options, message", [
    ({"near_dedup_partitions": 4}, "near_dedup_threshold 0.0 must lie in"),
    ({"near_dedup_partitions": -1, "near_dedup_threshold": 0.8}, "near_dedup_partitions -1 must lie in"),
    ({"near_dedup_partitions": 70_000, "near_dedup_threshold": 0.8}, "near_dedup_partitions 70000 must lie in"),
    ({"near_dedup_partitions": 4, "near_dedup_threshold": 0.8, "minhash_num_perm": 1}, "minhash_num_perm 1 must"),
    ({"near_dedup_partitions": 4, "near_dedup_threshold": 0.8, "minhash_ngram": 0}, "--minhash_ngram 0 must lie in"),
    ({"minhash_ngram": 65}, r"--minhash_ngram 65 must lie in \[1, 64\]"),
])
def test_out_of_range_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message) as error:
        CleanConfig(input_paths=[tmp_path], output_dir=tmp_path / "out", **options)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=message):
        CombineConfig(input_dirs=[tmp_path], output_dir=tmp_path / "out", **options)
    with pytest.raises(UserError, match="--minhash_ngram 0 must lie in"):
        MinHasher(NUM_PERM, ngram=0)
