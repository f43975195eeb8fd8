"""Every console command against bad input and faults (issue: nothing lost, nothing
half-written, nothing executed).

Each case runs a command's ``main`` in-process and asserts: exit status 2, exactly one line on
stderr naming the file or flag and what to do, no traceback, no partial output beside the
output path, and every watched path (the previous complete output, the user's files, the
inputs) byte-identical afterwards. The cases that need real multi-process DeepSpeed runs (a
rank killed during a checkpoint write, a truncated optimizer partition) run the trainer
under the ``deepspeed`` launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from data_tools import clean as clean_stage
from data_tools import combine_slices, mask, tokenize_shards, verify, vocab
from data_tools.clean import CleanConfig
from data_tools.mask import MaskConfig
from data_tools.tokenize_shards import TokenizeConfig
from pipeline import convert_to_hf, generate, to_universal, trainer, uer_interop
from tests.conftest import DEEPSPEED, PROJECT_ROOT, deepspeed_env, run_command

# -- what every case must show -----------------------------------------------------------------------


def snapshot(path: Path) -> object:
    """Content of a file or of every file under a directory (hidden ones included), by sha256."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@dataclass
class Case:
    """A command, its flags, what its one error line must say, and the paths it must leave as they were."""

    main: Callable[[list[str]], int]
    argv: list
    says: tuple[str, ...]
    unchanged: list[Path] = field(default_factory=list)
    not_created: list[Path] = field(default_factory=list)


def assert_refused(case: Case, capsys) -> str:
    before = {path: snapshot(path) for path in case.unchanged}
    capsys.readouterr()
    status = case.main([str(arg) for arg in case.argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, f"exit {status}, stderr:\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for fragment in case.says:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    for path in case.unchanged:
        assert snapshot(path) == before[path], f"{path} changed"
    for path in case.not_created:
        assert not path.exists(), f"{path} was created"
    for path in [*case.unchanged, *case.not_created]:
        leftovers = [p.name for p in path.parent.glob(f".{path.name}.*")]
        assert not leftovers, f"partial output left beside {path}: {leftovers}"
    return lines[0]


# -- inputs: one real chain, copied by each case that damages it ------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory, clue_lines_file, google_vocab) -> Path:
    """raw/ (300 CLUE lines), clean/, tok/ (Google's vocab), mask/ (BART, seq 64). Cases copy, never modify."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "raw").mkdir()
    lines = clue_lines_file.read_text(encoding="utf-8").splitlines()[:300]
    (root / "raw" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert clean_stage.main(["--input_paths", str(root / "raw"), "--output_dir", str(root / "clean"),
                             "--no-progress", "--documents_per_shard", "150"]) == 0
    assert tokenize_shards.main(["--input_dir", str(root / "clean"), "--output_dir", str(root / "tok"),
                                 "--vocab_path", str(google_vocab), "--no-progress"]) == 0
    assert mask.main(["--input_dir", str(root / "tok"), "--output_dir", str(root / "mask"), "--target", "bart",
                      "--seq_length", "64", "--no-progress"]) == 0
    return root


@pytest.fixture()
def work(chain, tmp_path) -> Callable[[str], Path]:
    """A private copy of one of the chain's directories."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        if not target.exists():
            shutil.copytree(chain / name, target)
        return target

    return copy


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value), encoding="utf-8")


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, which no command may touch."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (path / "data.bin").write_bytes(os.urandom(64))
    return path


def bad_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


# -- the cases: data stages ------------------------------------------------------------------------

CASES: dict[str, Callable[[Path, Callable[[str], Path], Path], Case]] = {}


def case(function: Callable) -> Callable:
    CASES[function.__name__] = function
    return function


def clean_case(argv: list, *says: str, **paths) -> Case:
    return Case(clean_stage.main, [*argv, "--no-progress"], says, **paths)


@case
def clean_missing_input(chain, work, tmp):
    return clean_case(["--input_paths", tmp / "nope.txt", "--output_dir", tmp / "out"], "nope.txt", "does not exist",
                      not_created=[tmp / "out"])


@case
def clean_zst_that_is_not_zstd(chain, work, tmp):
    (tmp / "corpus.zst").write_text("plain text, not zstd\n", encoding="utf-8")
    return clean_case(["--input_paths", tmp / "corpus.zst", "--output_dir", tmp / "out"], "corpus.zst",
                      "cannot be read", not_created=[tmp / "out"])


@case
def clean_gz_that_is_not_gzip(chain, work, tmp):
    (tmp / "corpus.gz").write_bytes(b"\x1f\x8bnot really gzip")
    return clean_case(["--input_paths", tmp / "corpus.gz", "--output_dir", tmp / "out"], "corpus.gz",
                      "cannot be read", not_created=[tmp / "out"])


@case
def clean_into_its_own_input(chain, work, tmp):
    documents = work("clean")
    return clean_case(["--input_paths", documents, "--output_dir", documents], "is the input --input_paths",
                      unchanged=[documents])


@case
def clean_output_inside_input(chain, work, tmp):
    raw = work("raw")
    return clean_case(["--input_paths", raw, "--output_dir", raw / "clean"], "lies inside the input",
                      unchanged=[raw])


@case
def clean_output_containing_input(chain, work, tmp):
    raw = work("raw")
    return clean_case(["--input_paths", raw / "corpus.txt", "--output_dir", raw], "contains the input",
                      unchanged=[raw])


@case
def clean_over_a_folder_of_user_files(chain, work, tmp):
    folder = user_folder(tmp / "mine")
    return clean_case(["--input_paths", work("raw"), "--output_dir", folder], "not an earlier output of the clean stage",
                      "--overwrite", unchanged=[folder])


@case
def clean_over_its_output_holding_a_user_file(chain, work, tmp):
    documents = work("clean")
    (documents / "notes.txt").write_text("mine\n", encoding="utf-8")
    return clean_case(["--input_paths", work("raw"), "--output_dir", documents], "holds notes.txt",
                      unchanged=[documents])


@case
def clean_output_is_a_file(chain, work, tmp):
    (tmp / "out").write_text("x", encoding="utf-8")
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out"], "is a file",
                      unchanged=[tmp / "out"])


@case
def clean_negative_min_chars(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--min_chars", "-1"],
                      "--min_chars", not_created=[tmp / "out"])


@case
def clean_cjk_ratio_above_one(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--min_cjk_ratio", "2"],
                      "--min_cjk_ratio 2.0 must lie in [0, 1]", not_created=[tmp / "out"])


@case
def clean_slice_out_of_range(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--num_slices", "2",
                       "--slice_index", "3"], "--slice_index 3", not_created=[tmp / "out"])


@case
def clean_near_dedup_threshold_above_one(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--near_dedup_threshold", "1.5"],
                      "--near_dedup_threshold", not_created=[tmp / "out"])


@case
def clean_near_dedup_partitions_out_of_range(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--near_dedup_threshold", "0.8",
                       "--near_dedup_partitions", "100000"], "--near_dedup_partitions 100000 must lie in [1, 65536]",
                      not_created=[tmp / "out"])


@case
def clean_near_dedup_partitions_without_threshold(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--near_dedup_partitions", "4"],
                      "--near_dedup_threshold 0.0 must lie in (0, 1)", not_created=[tmp / "out"])


@case
def clean_near_dedup_one_permutation(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--near_dedup_threshold", "0.8",
                       "--near_dedup_partitions", "4", "--minhash_num_perm", "1"], "--minhash_num_perm 1 must lie in",
                      not_created=[tmp / "out"])


@case
def clean_near_dedup_ngram_out_of_range(chain, work, tmp):
    return clean_case(["--input_paths", work("raw"), "--output_dir", tmp / "out", "--near_dedup_threshold", "0.8",
                       "--near_dedup_partitions", "4", "--minhash_ngram", "0"], "--minhash_ngram 0 must lie in [1, 64]",
                      not_created=[tmp / "out"])


@case
def combine_near_dedup_ngram_out_of_range(chain, work, tmp):
    return Case(combine_slices.main, ["--input_dirs", work("clean"), "--output_dir", tmp / "out",
                                      "--near_dedup_threshold", "0.8", "--near_dedup_partitions", "8",
                                      "--minhash_ngram", "100"], ("--minhash_ngram 100 must lie in [1, 64]",),
                not_created=[tmp / "out"])


@case
def combine_near_dedup_threshold_of_one(chain, work, tmp):
    return Case(combine_slices.main, ["--input_dirs", work("clean"), "--output_dir", tmp / "out",
                                      "--near_dedup_threshold", "1", "--near_dedup_partitions", "8"],
                ("--near_dedup_threshold 1.0 must lie in (0, 1)",), not_created=[tmp / "out"])


@case
def clean_rerun_dropping_everything_keeps_the_previous_output(chain, work, tmp):
    documents = work("clean")
    return clean_case(["--input_paths", work("raw"), "--output_dir", documents, "--min_chars", "100000",
                       "--max_chars", "100000"], "every document was dropped", "nothing was written",
                      unchanged=[documents])


@case
def clean_rerun_on_empty_input_keeps_the_previous_output(chain, work, tmp):
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    documents = work("clean")
    return clean_case(["--input_paths", tmp / "empty.txt", "--output_dir", documents], "the input is empty",
                      unchanged=[documents])


@case
def combine_into_one_of_its_slices(chain, work, tmp):
    documents = work("clean")
    return Case(combine_slices.main, ["--input_dirs", documents, "--output_dir", documents],
                ("is the input --input_dirs",), unchanged=[documents])


@case
def combine_a_slice_with_a_manifest_missing_counts(chain, work, tmp):
    documents = work("clean")
    edit_json(documents / "manifest.json", lambda m: m.pop("counts"))
    return Case(combine_slices.main, ["--input_dirs", documents, "--output_dir", tmp / "out"],
                ("manifest.json", "'counts'", "re-run the clean stage"), not_created=[tmp / "out"])


@case
def combine_a_slice_with_a_truncated_shard(chain, work, tmp):
    documents = work("clean")
    shard = documents / "documents-00001.jsonl"
    shard.write_bytes(shard.read_bytes()[:100])
    return Case(combine_slices.main, ["--input_dirs", documents, "--output_dir", tmp / "out"],
                ("documents-00001.jsonl has 100 bytes", "re-run the clean stage"), not_created=[tmp / "out"])


@case
def combine_shard_count_above_zero(chain, work, tmp):
    return Case(combine_slices.main, ["--input_dirs", work("clean"), "--output_dir", tmp / "out",
                                      "--documents_per_shard", "0"], ("--documents_per_shard 0",),
                not_created=[tmp / "out"])


@case
def build_vocab_output_is_a_directory(chain, work, tmp):
    folder = user_folder(tmp / "vocabs")
    return Case(vocab.main, ["--input_dir", work("clean"), "--output_path", folder], ("is a directory",),
                unchanged=[folder])


@case
def build_vocab_over_a_user_vocab(chain, work, tmp):
    mine = bad_vocab(tmp / "vocab.txt", ["[PAD]", "[UNK]", "mine"])
    return Case(vocab.main, ["--input_dir", work("clean"), "--output_path", mine],
                ("was not written by zh-build-vocab", "--overwrite"), unchanged=[mine])


@case
def build_vocab_inside_its_input(chain, work, tmp):
    documents = work("clean")
    return Case(vocab.main, ["--input_dir", documents, "--output_path", documents / "vocab.txt"],
                ("lies inside the input --input_dir",), unchanged=[documents])


@case
def build_vocab_smaller_than_the_reserved_tokens(chain, work, tmp):
    return Case(vocab.main, ["--input_dir", work("clean"), "--output_path", tmp / "v.txt", "--vocab_size", "10"],
                ("--vocab_size 10",), not_created=[tmp / "v.txt"])


@case
def build_vocab_from_a_tokenize_output(chain, work, tmp):
    return Case(vocab.main, ["--input_dir", work("tok"), "--output_path", tmp / "v.txt"],
                ("written by stage 'tokenize', expected clean",), not_created=[tmp / "v.txt"])


def tokenize_case(argv: list, *says: str, **paths) -> Case:
    return Case(tokenize_shards.main, [*argv, "--no-progress"], says, **paths)


@case
def tokenize_vocab_without_mask_token(chain, work, tmp):
    vocab_file = bad_vocab(tmp / "vocab.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "的", "是"])
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tmp / "out", "--vocab_path", vocab_file],
                         "lacks the special token(s) [MASK]", not_created=[tmp / "out"])


@case
def tokenize_vocab_is_a_directory(chain, work, tmp):
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tmp / "out", "--vocab_path", tmp],
                         "is not a file", not_created=[tmp / "out"])


@case
def tokenize_vocab_not_utf8(chain, work, tmp):
    (tmp / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\n\xff\xfe\n")
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tmp / "out", "--vocab_path",
                                tmp / "vocab.txt"], "is not UTF-8", not_created=[tmp / "out"])


@case
def tokenize_vocab_that_does_not_cover_the_corpus_keeps_the_previous_output(chain, work, tmp):
    vocab_file = bad_vocab(tmp / "vocab.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "的", "是"])
    tokenized = work("tok")
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tokenized, "--vocab_path", vocab_file,
                                "--overwrite"], "are [UNK]", "--max_unk_ratio", unchanged=[tokenized])


@case
def tokenize_shard_cut_at_a_line_boundary(chain, work, tmp):
    documents = work("clean")
    shard = documents / "documents-00000.jsonl"
    lines = shard.read_text(encoding="utf-8").splitlines(keepends=True)
    shard.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "documents-00000.jsonl has", "bytes, the manifest says",
                         not_created=[tmp / "out"])


@case
def tokenize_manifest_with_edited_counts(chain, work, tmp):
    documents = work("clean")
    edit_json(documents / "manifest.json", lambda m: m["shards"][0].update(documents=7))
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "documents-00000.jsonl has 150 documents, the manifest "
                         "says 7", not_created=[tmp / "out"])


@case
def tokenize_manifest_with_edited_total(chain, work, tmp):
    documents = work("clean")
    edit_json(documents / "manifest.json", lambda m: m["counts"].update(documents_kept=5))
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "its manifest counts 5 kept", not_created=[tmp / "out"])


@case
def tokenize_manifest_that_is_a_list(chain, work, tmp):
    documents = work("clean")
    (documents / "manifest.json").write_text("[1, 2]", encoding="utf-8")
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "holds a JSON list", not_created=[tmp / "out"])


@case
def tokenize_manifest_without_shards(chain, work, tmp):
    documents = work("clean")
    edit_json(documents / "manifest.json", lambda m: m.pop("shards"))
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "field 'shards' is missing", not_created=[tmp / "out"])


@case
def tokenize_manifest_naming_a_file_outside(chain, work, tmp):
    documents = work("clean")
    edit_json(documents / "manifest.json", lambda m: m["shards"][0].update(file="../../etc/passwd"))
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "is not a file name inside the directory",
                         not_created=[tmp / "out"])


@case
def tokenize_manifest_not_json(chain, work, tmp):
    documents = work("clean")
    (documents / "manifest.json").write_text("{not json", encoding="utf-8")
    return tokenize_case(["--input_dir", documents, "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt"], "is not valid JSON", not_created=[tmp / "out"])


@case
def tokenize_into_its_input(chain, work, tmp):
    documents = work("clean")
    return tokenize_case(["--input_dir", documents, "--output_dir", documents, "--vocab_path",
                                chain / "tok" / "vocab.txt"], "is the input --input_dir", unchanged=[documents])


@case
def tokenize_output_holding_the_vocab(chain, work, tmp):
    tokenized = work("tok")
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tokenized, "--vocab_path",
                                tokenized / "vocab.txt"], "contains the input --vocab_path", unchanged=[tokenized])


@case
def tokenize_unk_ratio_out_of_range(chain, work, tmp):
    return tokenize_case(["--input_dir", work("clean"), "--output_dir", tmp / "out", "--vocab_path",
                                chain / "tok" / "vocab.txt", "--max_unk_ratio", "2"], "--max_unk_ratio 2.0",
                         not_created=[tmp / "out"])


def mask_case(work, tmp, *flags: str, says: tuple[str, ...], output: Path | None = None, input_dir: Path | None = None,
              unchanged: list[Path] | None = None) -> Case:
    output = output or tmp / "out"
    argv = ["--input_dir", input_dir or work("tok"), "--output_dir", output, "--target", "bart", "--no-progress", *flags]
    return Case(mask.main, argv, says, unchanged=unchanged or [], not_created=[] if unchanged else [output])


@case
def mask_permute_ratio_five(chain, work, tmp):
    return mask_case(work, tmp, "--permute_sentence_ratio", "5", says=("--permute_sentence_ratio 5.0 must lie in [0, 1]",))


@case
def mask_geometric_p_zero(chain, work, tmp):
    return mask_case(work, tmp, "--geometric_p", "0", says=("--geometric_p 0.0 must lie in (0, 1]",))


@case
def mask_ratio_zero(chain, work, tmp):
    return mask_case(work, tmp, "--mask_ratio", "0", says=("--mask_ratio 0.0 must lie strictly between 0 and 1",))


@case
def mask_negative_random_ratio(chain, work, tmp):
    return mask_case(work, tmp, "--random_ratio", "-0.1", says=("--random_ratio -0.1 must lie in [0, 1]",))


@case
def mask_absurd_seq_length(chain, work, tmp):
    return mask_case(work, tmp, "--seq_length", "10000000", says=("--seq_length 10000000 must lie in [8, 65536]",))


@case
def mask_negative_seed(chain, work, tmp):
    return mask_case(work, tmp, "--seed", "-1", says=("--seed -1 must be >= 0",))


@case
def mask_replace_length_two(chain, work, tmp):
    return mask_case(work, tmp, "--replace_length", "2", says=("--replace_length 2 must be -1, 0 or 1",))


@case
def mask_with_a_modified_vocab(chain, work, tmp):
    tokenized = work("tok")
    with open(tokenized / "vocab.txt", "a", encoding="utf-8") as handle:
        handle.write("extra\n")
    return mask_case(work, tmp, input_dir=tokenized, says=("vocab.txt is missing or differs from the vocab",))


@case
def mask_with_a_flipped_byte_in_a_shard(chain, work, tmp):
    tokenized = work("tok")
    shard = tokenized / "tokenized-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return mask_case(work, tmp, input_dir=tokenized, says=("tokenized-00000.arrow sha256", "re-run the tokenize stage"))


@case
def mask_manifest_without_mask_id(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"]["special_token_ids"].pop("[MASK]"))
    return mask_case(work, tmp, input_dir=tokenized, says=("vocab.special_token_ids must give the id",))


@case
def mask_over_a_folder_of_user_files(chain, work, tmp):
    folder = user_folder(tmp / "mine")
    return mask_case(work, tmp, output=folder, unchanged=[folder], says=("not an earlier output of the mask stage",))


@case
def mask_over_a_tokenize_output(chain, work, tmp):
    tokenized = work("tok")
    other = tmp / "tok-copy"
    shutil.copytree(tokenized, other)
    return mask_case(work, tmp, output=other, unchanged=[other], says=("not an earlier output of the mask stage",))


@case
def verify_a_modified_vocab(chain, work, tmp):
    tokenized = work("tok")
    (tokenized / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    return Case(verify.main, ["--directory", tokenized], ("vocab.txt is missing or differs from the vocab the manifest records",))


@case
def verify_a_directory_without_manifest(chain, work, tmp):
    return Case(verify.main, ["--directory", user_folder(tmp / "mine")], ("manifest.json not found",))


# -- damaged inputs read as good, empty and edited manifests (#24, second round) ------------------------


def compressed_copy(chain, name: str, frames: int = 1) -> bytes:
    """The chain's raw corpus compressed as ``name`` (.gz or .zst, ``frames`` zstd frames), bytes returned."""
    import gzip

    import zstandard

    data = (chain / "raw" / "corpus.txt").read_bytes()
    if name.endswith(".gz"):
        return gzip.compress(data)
    cut = len(data) // frames
    return b"".join(zstandard.ZstdCompressor().compress(data[k * cut:(k + 1) * cut if k + 1 < frames else None])
                    for k in range(frames))


@case
def clean_truncated_zst(chain, work, tmp):
    compressed = compressed_copy(chain, "corpus.txt.zst")
    (tmp / "corpus.txt.zst").write_bytes(compressed[: len(compressed) * 2 // 3])
    return clean_case(["--input_paths", tmp / "corpus.txt.zst", "--output_dir", tmp / "out"], "corpus.txt.zst",
                      "ends inside its compressed data", "truncated", not_created=[tmp / "out"])


@case
def clean_zst_cut_in_its_second_frame(chain, work, tmp):
    compressed = compressed_copy(chain, "corpus.txt.zst", frames=2)
    (tmp / "corpus.txt.zst").write_bytes(compressed[:-50])
    documents = work("clean")
    return clean_case(["--input_paths", tmp / "corpus.txt.zst", "--output_dir", documents], "corpus.txt.zst",
                      "truncated", unchanged=[documents])


@case
def clean_truncated_gz(chain, work, tmp):
    compressed = compressed_copy(chain, "corpus.txt.gz")
    (tmp / "corpus.txt.gz").write_bytes(compressed[: len(compressed) // 2])
    return clean_case(["--input_paths", tmp / "corpus.txt.gz", "--output_dir", tmp / "out"], "corpus.txt.gz",
                      "truncated", not_created=[tmp / "out"])


def parquet_copy(chain, tmp: Path, **write_options) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (chain / "raw" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    path = tmp / "corpus.parquet"
    pq.write_table(pa.table({"text": lines}), path, compression="none", **write_options)
    return path


@case
def clean_parquet_with_a_flipped_byte_in_a_checksummed_page(chain, work, tmp):
    import pyarrow as pa

    if int(pa.__version__.split(".")[0]) < 15:
        pytest.skip("pyarrow writes and checks Parquet page CRCs from version 15 on")
    path = parquet_copy(chain, tmp, write_page_checksum=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the pages: the footer and schema are at the end
    path.write_bytes(bytes(data))
    return clean_case(["--input_paths", path, "--output_dir", tmp / "out"], "corpus.parquet", "CRC",
                      not_created=[tmp / "out"])


@case
def clean_parquet_without_crcs_whose_page_is_not_utf8(chain, work, tmp):
    path = parquet_copy(chain, tmp, use_dictionary=False)
    line = (chain / "raw" / "corpus.txt").read_text(encoding="utf-8").splitlines()[5].encode("utf-8")
    data = bytearray(path.read_bytes())
    start = data.index(line)  # in the data page (page statistics hold only the smallest and largest line)
    continuation = next(k for k, byte in enumerate(line) if 0x80 <= byte < 0xC0)
    data[start + continuation] ^= 0x80  # a continuation byte turned ASCII: no longer UTF-8
    path.write_bytes(bytes(data))
    return clean_case(["--input_paths", path, "--output_dir", tmp / "out"], "corpus.parquet", "Invalid UTF8",
                      "damaged", not_created=[tmp / "out"])


@case
def clean_truncated_parquet(chain, work, tmp):
    path = parquet_copy(chain, tmp)
    path.write_bytes(path.read_bytes()[:-300])
    return clean_case(["--input_paths", path, "--output_dir", tmp / "out"], "corpus.parquet",
                      "cannot be read as Parquet", not_created=[tmp / "out"])


def without_shards(directory: Path) -> Path:
    edit_json(directory / "manifest.json", lambda m: m.update(shards=[]))
    return directory


@case
def verify_a_manifest_listing_no_shards(chain, work, tmp):
    return Case(verify.main, ["--directory", without_shards(work("clean"))],
                ("manifest.json", "'shards' lists no shard", "re-run the clean stage"))


@case
def tokenize_a_clean_output_listing_no_shards(chain, work, tmp):
    return tokenize_case(["--input_dir", without_shards(work("clean")), "--output_dir", tmp / "out", "--vocab_path",
                          chain / "tok" / "vocab.txt"], "'shards' lists no shard", not_created=[tmp / "out"])


@case
def mask_a_tokenize_output_listing_no_shards(chain, work, tmp):
    return mask_case(work, tmp, input_dir=without_shards(work("tok")), says=("'shards' lists no shard",
                                                                             "re-run the tokenize stage"))


@case
def combine_a_slice_listing_no_shards(chain, work, tmp):
    return Case(combine_slices.main, ["--input_dirs", without_shards(work("clean")), "--output_dir", tmp / "out"],
                ("'shards' lists no shard",), not_created=[tmp / "out"])


@case
def build_vocab_from_a_clean_output_listing_no_shards(chain, work, tmp):
    return Case(vocab.main, ["--input_dir", without_shards(work("clean")), "--output_path", tmp / "v.txt"],
                ("'shards' lists no shard",), not_created=[tmp / "v.txt"])


@case
def mask_with_an_edited_vocab_size(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"].update(size=m["vocab"]["size"] + 1000))
    return mask_case(work, tmp, input_dir=tokenized, says=("vocab.size is 22128", "has 21128 tokens",
                                                           "re-run the tokenize stage"))


@case
def mask_with_an_edited_vocab_sha256(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"].update(sha256="0" * 64))
    return mask_case(work, tmp, input_dir=tokenized, says=("vocab.txt is missing or differs from the vocab",))


@case
def mask_with_an_edited_special_token_id(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"]["special_token_ids"].update({"[MASK]": 5}))
    return mask_case(work, tmp, input_dir=tokenized, says=("special_token_ids gives [MASK] id 5", "at id 103"))


@case
def mask_with_an_edited_id_type(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m.update(id_type="uint32"))
    return mask_case(work, tmp, input_dir=tokenized, says=("id_type 'uint32' does not fit a vocab of 21128",))


@case
def verify_a_tokenize_output_with_an_edited_vocab_size(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"].update(size=30000))
    return Case(verify.main, ["--directory", tokenized], ("vocab.size is 30000", "has 21128 tokens"))


@case
def verify_a_mask_output_with_an_edited_vocab_size(chain, work, tmp):
    examples = work("mask")
    edit_json(examples / "manifest.json", lambda m: m["vocab"].update(size=100))
    return Case(verify.main, ["--directory", examples], ("vocab.size is 100", "re-run the mask stage"))


@case
def verify_examples_whose_total_disagrees_with_the_shards(chain, work, tmp):
    examples = work("mask")
    edit_json(examples / "manifest.json", lambda m: m["counts"].update(examples=m["counts"]["examples"] + 1))
    return Case(verify.main, ["--directory", examples], ("counts.examples is", "but its shards hold"))


def run_online_config(tmp: Path, payload: str) -> Path:
    path = tmp / "online.json"
    path.write_text(payload, encoding="utf-8")
    return path


def train_case(work, tmp, *flags, says: tuple[str, ...], data: Path | None = None, output: Path | None = None,
               unchanged: list[Path] | None = None) -> Case:
    output = output or tmp / "run"
    argv = ["--data_dir", data or work("mask"), "--output_dir", output, "--deepspeed_config",
            PROJECT_ROOT / "ds_configs" / "cpu_zero2.json", "--model_config", "bart-tiny", "--no-progress", *flags]
    return Case(trainer.main, argv, says, unchanged=unchanged or [], not_created=[] if unchanged else [output])


@case
def train_online_mask_config_that_is_a_list(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config", run_online_config(tmp, "[1]"), data=work("tok"),
                      says=("holds a JSON list", "object of mask flags"))


@case
def train_online_mask_config_with_a_string_length(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config",
                      run_online_config(tmp, '{"target": "bart", "seq_length": "64"}'), data=work("tok"),
                      says=("online.json", "seq_length must be int, got '64'"))


@case
def train_online_mask_config_with_a_ratio_of_five(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config",
                      run_online_config(tmp, '{"target": "bart", "permute_sentence_ratio": 5}'), data=work("tok"),
                      says=("online.json", "--permute_sentence_ratio 5 must lie in [0, 1]"))


@case
def train_deepspeed_config_that_is_a_list(chain, work, tmp):
    (tmp / "ds.json").write_text("[]", encoding="utf-8")
    return train_case(work, tmp, "--deepspeed_config", tmp / "ds.json", says=("ds.json", "holds a JSON list"))


@case
def train_deepspeed_config_with_bf16_true(chain, work, tmp):
    (tmp / "ds.json").write_text('{"bf16": true}', encoding="utf-8")
    return train_case(work, tmp, "--deepspeed_config", tmp / "ds.json", says=('"bf16" must be an object',))


@case
def train_deepspeed_config_with_a_string_batch(chain, work, tmp):
    (tmp / "ds.json").write_text('{"train_batch_size": "32"}', encoding="utf-8")
    return train_case(work, tmp, "--deepspeed_config", tmp / "ds.json",
                      says=('"train_batch_size" must be a positive integer',))


@case
def train_init_from_a_broken_config(chain, work, tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{broken", encoding="utf-8")
    return train_case(work, tmp, "--init_from", tmp / "model", says=("config.json is not valid JSON",))


@case
def train_examples_longer_than_the_position_table(chain, work, tmp):
    values = json.loads((PROJECT_ROOT / "pipeline" / "model_configs" / "bart-tiny.json").read_text())
    values["max_position_embeddings"] = 32
    (tmp / "short.json").write_text(json.dumps(values), encoding="utf-8")
    return train_case(work, tmp, "--model_config", tmp / "short.json",
                      says=("max_position_embeddings is 32", "re-run the mask stage"))


@case
def train_into_its_data_dir(chain, work, tmp):
    examples = work("mask")
    return train_case(work, tmp, data=examples, output=examples, unchanged=[examples], says=("is the input --data_dir",))


@case
def train_into_a_folder_that_is_not_a_run(chain, work, tmp):
    folder = user_folder(tmp / "vocabs")
    shutil.copyfile(chain / "tok" / "vocab.txt", folder / "vocab.txt")
    return train_case(work, tmp, output=folder, unchanged=[folder], says=("not a zh-train run directory",
                                                                          "vocab.txt"))


@case
def train_on_a_truncated_shard(chain, work, tmp):
    examples = work("mask")
    shard = examples / "examples-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    return train_case(work, tmp, data=examples, says=("examples-00000.arrow has", "re-run the mask stage"))


@case
def train_eval_examples_negative(chain, work, tmp):
    return train_case(work, tmp, "--eval_examples", "-1", says=("--eval_examples",))


@case
def train_on_examples_with_an_edited_vocab_size(chain, work, tmp):
    examples = work("mask")
    edit_json(examples / "manifest.json", lambda m: m["vocab"].update(size=m["vocab"]["size"] - 1))
    return train_case(work, tmp, data=examples, says=("vocab.size is 21127", "re-run the mask stage"))


@case
def train_online_on_a_tokenized_corpus_with_an_edited_vocab_size(chain, work, tmp):
    tokenized = work("tok")
    edit_json(tokenized / "manifest.json", lambda m: m["vocab"].update(size=m["vocab"]["size"] + 7))
    return train_case(work, tmp, "--online_mask_config", run_online_config(tmp, '{"target": "bart"}'), data=tokenized,
                      says=("vocab.size is 21135", "re-run the tokenize stage"))


# -- the trainer's DeepSpeed and model configs, non-finite numbers, a changed held-out split (#24, round 2) ---


def ds_config_case(work, tmp, change: Callable[[dict], object], *says: str) -> Case:
    """The CPU DeepSpeed config with ``change`` applied (NaN and Infinity written as Python's json writes them)."""
    values = json.loads((PROJECT_ROOT / "ds_configs" / "cpu_zero2.json").read_text(encoding="utf-8"))
    change(values)
    (tmp / "ds.json").write_text(json.dumps(values), encoding="utf-8")
    return train_case(work, tmp, "--deepspeed_config", tmp / "ds.json", says=("ds.json", *says))


@case
def train_deepspeed_config_with_a_string_stage(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["zero_optimization"].update(stage="2"),
                          '"zero_optimization.stage" must be 2', 'got "2"')


@case
def train_deepspeed_config_with_zero_stage_3(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["zero_optimization"].update(stage=3),
                          '"zero_optimization.stage" must be 2', "zh-export", "got 3")


@case
def train_deepspeed_config_with_zero_stage_1(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["zero_optimization"].update(stage=1), "got 1")


@case
def train_deepspeed_config_without_zero(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c.pop("zero_optimization"), '"zero_optimization.stage" is missing',
                          "stage 0")


@case
def train_deepspeed_config_with_an_unknown_optimizer(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["optimizer"].update(type="AdamQ"), '"optimizer.type"', '"AdamQ"')


@case
def train_deepspeed_config_with_a_string_learning_rate(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["optimizer"]["params"].update(lr="1e-4"),
                          '"optimizer.params.lr" must be a positive number or "auto"', 'got "1e-4"')


@case
def train_deepspeed_config_with_a_zero_reduce_bucket(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["zero_optimization"].update(reduce_bucket_size=0),
                          '"zero_optimization.reduce_bucket_size" must be a positive whole number')


@case
def train_deepspeed_config_with_a_nan_beta(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["optimizer"]["params"]["betas"].__setitem__(1, float("nan")),
                          '"optimizer.params.betas[1]" is NaN', "finite")


@case
def train_deepspeed_config_with_an_infinite_eps(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["optimizer"]["params"].update(eps=float("inf")),
                          '"optimizer.params.eps" is Infinity')


@case
def train_deepspeed_config_with_a_nan_weight_decay(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c["optimizer"]["params"].update(weight_decay=float("nan")),
                          '"optimizer.params.weight_decay" is NaN')


@case
def train_deepspeed_config_with_an_infinite_gradient_clipping(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c.update(gradient_clipping=float("inf")),
                          '"gradient_clipping" is Infinity')


@case
def train_deepspeed_config_with_a_nan_loss_scale(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c.update(fp16={"enabled": False, "initial_scale_power": float("nan")}),
                          '"fp16.initial_scale_power" is NaN')


@case
def train_deepspeed_config_with_its_own_scheduler(chain, work, tmp):
    return ds_config_case(work, tmp, lambda c: c.update(scheduler={"type": "WarmupLR", "params": {}}),
                          '"scheduler" section', "--warmup_steps")


def model_config_case(work, tmp, change: Callable[[dict], object], *says: str) -> Case:
    values = json.loads((PROJECT_ROOT / "pipeline" / "model_configs" / "bart-tiny.json").read_text(encoding="utf-8"))
    change(values)
    (tmp / "model.json").write_text(json.dumps(values), encoding="utf-8")
    return train_case(work, tmp, "--model_config", tmp / "model.json", says=("model.json", *says))


@case
def train_model_config_whose_heads_do_not_divide_d_model(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(encoder_attention_heads=3),
                             "encoder_attention_heads 3 does not divide d_model 64")


@case
def train_model_config_with_d_model_zero(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(d_model=0), "d_model must be a whole number >= 1, got 0")


@case
def train_model_config_with_a_list_for_a_number(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(encoder_ffn_dim=[128]), "encoder_ffn_dim", "got [128]")


@case
def train_model_config_with_a_negative_layer_count(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(decoder_layers=-2), "decoder_layers", "got -2")


@case
def train_model_config_with_a_nan_dropout(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(dropout=float("nan")), "dropout is NaN", "finite")


@case
def train_model_config_with_an_infinite_init_std(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(init_std=float("inf")), "init_std is Infinity")


@case
def train_model_config_with_an_unknown_activation(chain, work, tmp):
    return model_config_case(work, tmp, lambda c: c.update(activation_function="gelu2"), "activation_function",
                             '"gelu2"')


@case
def train_init_from_a_config_with_a_nan_dropout(chain, work, tmp):
    (tmp / "model").mkdir()
    values = json.loads((PROJECT_ROOT / "pipeline" / "model_configs" / "bart-tiny.json").read_text(encoding="utf-8"))
    (tmp / "model" / "config.json").write_text(json.dumps({**values, "attention_dropout": float("nan")}))
    return train_case(work, tmp, "--init_from", tmp / "model", says=("config.json", "attention_dropout is NaN"))


@case
def train_online_mask_config_with_a_nan_ratio(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config", run_online_config(tmp, '{"target": "bart", "mask_ratio": NaN}'),
                      data=work("tok"), says=("online.json", "mask_ratio must be a finite number"))


@case
def train_online_mask_config_with_an_infinite_lambda(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config",
                      run_online_config(tmp, '{"target": "bart", "poisson_lambda": Infinity}'), data=work("tok"),
                      says=("online.json", "poisson_lambda must be a finite number"))


@case
def train_online_gsg_mask_config_with_an_infinite_gap_ratio(chain, work, tmp):
    return train_case(work, tmp, "--online_mask_config",
                      run_online_config(tmp, '{"target": "gsg", "gap_sentence_ratio": -Infinity}'), data=work("tok"),
                      says=("online.json", "gap_sentence_ratio must be a finite number"))


def evaluate_case(work, tmp, payload: str, *says: str) -> Case:
    from pipeline import evaluate

    return Case(evaluate.main, ["--model_dir", tmp / "no-model-needed", "--data_dir", work("tok"), "--mask_config",
                                run_online_config(tmp, payload), "--no-progress"], ("--mask_config", "online.json",
                                                                                     *says))


@case
def evaluate_mask_config_with_a_nan_ratio(chain, work, tmp):
    return evaluate_case(work, tmp, '{"target": "bart", "random_ratio": NaN}', "random_ratio must be a finite number")


@case
def evaluate_mask_config_with_an_infinite_length(chain, work, tmp):
    return evaluate_case(work, tmp, '{"target": "bart", "geometric_p": Infinity, "span_distribution": "geometric"}',
                         "geometric_p must be a finite number")


# -- generate / export-uer / import-uer on a tiny model of the chain's vocab (no training needed) --------


@pytest.fixture(scope="module")
def tiny_export(chain, tmp_path_factory) -> Path:
    """An HF directory as zh-export writes it: bart-tiny, random weights, the chain's vocab."""
    from pipeline.convert_to_hf import write_hf_directory
    from pipeline.model import build_model, load_model_config

    manifest = json.loads((chain / "tok" / "manifest.json").read_text())
    model = build_model(load_model_config("bart-tiny", manifest["vocab"]["size"],
                                          manifest["vocab"]["special_token_ids"]))
    output = tmp_path_factory.mktemp("tiny-export") / "export"
    write_hf_directory(model, chain / "tok" / "vocab.txt", output, {"written_by": "zh-export", "run_dir": "none"})
    return output


MODEL_CASES: dict[str, Callable] = {}


def model_case(function: Callable) -> Callable:
    MODEL_CASES[function.__name__] = function
    return function


def copy_model(tiny_export: Path, tmp: Path) -> Path:
    target = tmp / "model"
    if not target.exists():
        shutil.copytree(tiny_export, target)
    return target


def generate_case(model: Path, *flags, says: tuple[str, ...], **paths) -> Case:
    return Case(generate.main, ["--model_dir", model, *flags], says, **paths)


@model_case
def generate_zero_beams(tiny_export, tmp):
    return generate_case(tiny_export, "--num_beams", "0", says=("--num_beams 0 must be positive",))


@model_case
def generate_top_p_zero(tiny_export, tmp):
    return generate_case(tiny_export, "--top_p", "0", says=("--top_p 0.0",))


@model_case
def generate_invalid_utf8_input(tiny_export, tmp):
    (tmp / "in.txt").write_bytes("第一行\n".encode() + b"\xff\xfe bad\n")
    return generate_case(tiny_export, "--input_file", tmp / "in.txt", "--output_file", tmp / "out.txt",
                         says=("in.txt:2: not UTF-8",), not_created=[tmp / "out.txt"])


@model_case
def generate_output_is_the_input(tiny_export, tmp):
    (tmp / "in.txt").write_text("内容丰富。\n", encoding="utf-8")
    return generate_case(tiny_export, "--input_file", tmp / "in.txt", "--output_file", tmp / "in.txt",
                         says=("is the input --input_file",), unchanged=[tmp / "in.txt"])


@model_case
def generate_over_an_existing_file(tiny_export, tmp):
    (tmp / "in.txt").write_text("内容丰富。\n", encoding="utf-8")
    (tmp / "out.txt").write_text("my earlier results\n", encoding="utf-8")
    return generate_case(tiny_export, "--input_file", tmp / "in.txt", "--output_file", tmp / "out.txt",
                         says=("exists and was not written by zh-generate", "--overwrite"),
                         unchanged=[tmp / "out.txt"])


@model_case
def generate_output_is_a_directory(tiny_export, tmp):
    folder = user_folder(tmp / "mine")
    return generate_case(tiny_export, "--output_file", folder, says=("is a directory",), unchanged=[folder])


@model_case
def generate_with_truncated_weights(tiny_export, tmp):
    model = copy_model(tiny_export, tmp)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return generate_case(model, says=("the model cannot be loaded",))


@model_case
def generate_without_a_vocab(tiny_export, tmp):
    model = copy_model(tiny_export, tmp)
    (model / "vocab.txt").unlink()
    return generate_case(model, says=("has no vocab.txt",))


@model_case
def export_uer_over_an_existing_file(tiny_export, tmp):
    (tmp / "model.bin").write_bytes(b"my file")
    return Case(uer_interop.export_main, ["--model_dir", tiny_export, "--output_file", tmp / "model.bin"],
                ("exists and was not written by zh-export-uer",), unchanged=[tmp / "model.bin"])


@model_case
def export_uer_output_is_a_directory(tiny_export, tmp):
    folder = user_folder(tmp / "mine")
    return Case(uer_interop.export_main, ["--model_dir", tiny_export, "--output_file", folder],
                ("is a directory",), unchanged=[folder])


@model_case
def export_uer_from_a_broken_config(tiny_export, tmp):
    model = copy_model(tiny_export, tmp)
    (model / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    return Case(uer_interop.export_main, ["--model_dir", model, "--output_file", tmp / "m.bin"],
                ("model_type 'gpt2' is not bart or pegasus",), not_created=[tmp / "m.bin"])


def uer_file(tiny_export: Path, tmp: Path, change: Callable[[dict], None] | None = None) -> Path:
    """The tiny model as a UER-py state dict (2021 naming), optionally damaged."""
    assert uer_interop.export_main(["--model_dir", str(tiny_export), "--output_file", str(tmp / "uer.bin")]) == 0
    if change is not None:
        state = torch.load(tmp / "uer.bin", weights_only=True)
        change(state)
        torch.save(state, tmp / "uer.bin")
    return tmp / "uer.bin"


@model_case
def import_uer_tensor_of_the_wrong_shape(tiny_export, tmp):
    def widen(state: dict) -> None:
        key = "encoder.transformer.0.feed_forward.linear_1.weight"
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])

    checkpoint = uer_file(tiny_export, tmp, widen)
    return Case(uer_interop.import_main, ["--checkpoint", checkpoint, "--vocab_path", tiny_export / "vocab.txt",
                                          "--output_dir", tmp / "out"], ("uer.bin", "weights do not fit the model"),
                not_created=[tmp / "out"])


@model_case
def import_uer_over_a_folder_of_user_files(tiny_export, tmp):
    folder = user_folder(tmp / "mine")
    return Case(uer_interop.import_main, ["--checkpoint", uer_file(tiny_export, tmp), "--vocab_path",
                                          tiny_export / "vocab.txt", "--output_dir", folder],
                ("not an earlier output of zh-import-uer",), unchanged=[folder])


@model_case
def import_uer_with_a_vocab_lacking_specials(tiny_export, tmp):
    vocab_file = bad_vocab(tmp / "v.txt", ["[PAD]", "[UNK]", "a"])
    return Case(uer_interop.import_main, ["--checkpoint", tmp / "nope.bin", "--vocab_path", vocab_file,
                                          "--output_dir", tmp / "out"], ("lacks the special token(s) [CLS]",),
                not_created=[tmp / "out"])


@model_case
def import_uer_file_that_is_not_torch(tiny_export, tmp):
    (tmp / "uer.bin").write_bytes(b"not a torch file")
    return Case(uer_interop.import_main, ["--checkpoint", tmp / "uer.bin", "--vocab_path", tiny_export / "vocab.txt",
                                          "--output_dir", tmp / "out"], ("is not a torch.save'd state dict",),
                not_created=[tmp / "out"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_stages_and_trainer_start_refuse_bad_input(name, chain, work, tmp_path, capsys):
    tmp = tmp_path / "case"
    tmp.mkdir()
    assert_refused(CASES[name](chain, work, tmp), capsys)


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_commands_refuse_bad_input(name, tiny_export, tmp_path, capsys):
    assert_refused(MODEL_CASES[name](tiny_export, tmp_path), capsys)


# -- re-running into one's own output is not refused, and replaces it whole ------------------------------


def test_rerunning_each_stage_into_its_own_output_replaces_it(chain, work, tmp_path, google_vocab):
    documents, tokenized = work("clean"), work("tok")
    (tmp_path / "clean" / "documents-00000.jsonl").write_text("stale\n", encoding="utf-8")  # replaced, not kept
    assert clean_stage.main(["--input_paths", str(work("raw")), "--output_dir", str(documents), "--no-progress",
                             "--documents_per_shard", "150"]) == 0
    shards = {name: digest for name, digest in snapshot(documents).items() if name != "manifest.json"}
    assert shards == {name: digest for name, digest in snapshot(chain / "clean").items() if name != "manifest.json"}
    assert tokenize_shards.main(["--input_dir", str(documents), "--output_dir", str(tokenized), "--vocab_path",
                                 str(google_vocab), "--no-progress"]) == 0
    assert mask.main(["--input_dir", str(tokenized), "--output_dir", str(work("mask")), "--target", "bart",
                      "--seq_length", "64", "--no-progress"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_generate_writes_into_a_missing_directory_and_overwrite_replaces(tiny_export, tmp_path):
    (tmp_path / "in.txt").write_text("内容丰富。\n", encoding="utf-8")
    output = tmp_path / "new" / "dir" / "out.txt"
    argv = ["--model_dir", str(tiny_export), "--input_file", str(tmp_path / "in.txt"), "--output_file", str(output),
            "--max_length", "8"]
    assert generate.main(argv) == 0
    assert len(output.read_text(encoding="utf-8").splitlines()) == 1
    output.write_text("older\n", encoding="utf-8")
    assert generate.main([*argv, "--overwrite"]) == 0
    assert output.read_text(encoding="utf-8") != "older\n"


def test_build_vocab_replaces_only_its_own_vocab(chain, work, tmp_path):
    argv = ["--input_dir", str(work("clean")), "--output_path", str(tmp_path / "v" / "vocab.txt"), "--vocab_size",
            "3000"]
    built = tmp_path / "v" / "vocab.txt"
    assert vocab.main(argv) == 0
    first = built.read_bytes()
    assert vocab.main(argv) == 0  # same input and flags: kept as it is (the trainer breaks ties differently)
    assert built.read_bytes() == first
    assert vocab.main([*argv[:-1], "2900"]) == 0  # other flags: its own earlier output is replaced
    assert len(built.read_text(encoding="utf-8").splitlines()) <= 2900
    built.write_text("[PAD]\n[UNK]\n", encoding="utf-8")  # edited by the user: refused
    assert vocab.main(argv) == 2


def test_a_config_built_in_python_gets_the_same_errors_as_the_cli(tmp_path):
    from data_tools.common import UserError

    with pytest.raises(UserError, match="--geometric_p 0 must lie in"):
        MaskConfig(input_dir=tmp_path, output_dir=tmp_path / "o", target="bart", geometric_p=0)
    with pytest.raises(UserError, match="seq_length must be int"):
        MaskConfig(input_dir=tmp_path, output_dir=tmp_path / "o", target="bart", seq_length=64.0)
    with pytest.raises(UserError, match="--max_unk_ratio"):
        TokenizeConfig(input_dir=tmp_path, output_dir=tmp_path / "o", vocab_path=tmp_path, max_unk_ratio=-1)
    with pytest.raises(UserError, match="--min_cjk_ratio"):
        CleanConfig(input_paths=[tmp_path], output_dir=tmp_path / "o", min_cjk_ratio=-0.5)


# -- checkpoints: real 2-rank DeepSpeed runs -----------------------------------------------------------


def train_command(examples: Path, run_dir: Path, port: int, steps: int, script: str = "pipeline/trainer.py"):
    return [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(PROJECT_ROOT / script),
            "--data_dir", str(examples), "--output_dir", str(run_dir), "--model_config", "bart-tiny",
            "--deepspeed_config", str(PROJECT_ROOT / "ds_configs" / "cpu_zero2.json"), "--total_steps", str(steps),
            "--micro_batch_size", "4", "--save_checkpoint_steps", "2", "--log_every_steps", "1",
            "--keep_last_checkpoints", "5", "--no-progress"]


@pytest.fixture(scope="module")
def faulted_run(chain, tmp_path_factory) -> Path:
    """A 2-rank run whose rank 1 was SIGKILLed while writing its second checkpoint (step 4), then
    relaunched with the same command to step 6."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("faulted") / "run"
    env = {**deepspeed_env(), "ZH_FAULT_KILL_AT_SAVE": "2"}
    killed = subprocess.run(train_command(chain / "mask", run_dir, 29811, 6, "tests/checkpoint_fault.py"),
                            capture_output=True, text=True, timeout=900, env=env)
    assert killed.returncode != 0 and "killed during checkpoint 2" in killed.stdout + killed.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000002"  # the half-written step 4 is not pointed to
    assert not (checkpoints / "step00000004" / "trainer_state.json").exists()
    resumed = run_command(train_command(chain / "mask", run_dir, 29812, 6))
    assert "resuming from step00000002 (step 2)" in resumed.stderr
    return run_dir


@pytest.mark.slow
def test_a_rank_killed_during_a_checkpoint_write_resumes_from_the_last_complete_one(faulted_run):
    checkpoints = faulted_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000006"
    steps = [json.loads(line)["step"] for line in (faulted_run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps after step 2 were trained again, their old records dropped
    from pipeline.checkpointing import checkpoint_problem

    assert checkpoint_problem(checkpoints / "step00000004") is None  # rewritten whole by the relaunch


@pytest.mark.slow
def test_a_truncated_optimizer_partition_falls_back_to_the_previous_checkpoint(chain, faulted_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    partition = run_dir / "checkpoints" / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[: partition.stat().st_size // 2])
    resumed = run_command(train_command(chain / "mask", run_dir, 29813, 8))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt of" in resumed.stderr
    assert "resuming from the previous complete checkpoint step00000004" in resumed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000008"


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_copy(faulted_run: Path, tmp: Path, file_name: str, record_size: bool) -> tuple[Path, Path]:
    """A copy of the run whose latest checkpoint file ``file_name`` runs code when unpickled; with
    ``record_size`` the trainer state is edited to match, as an attacker would."""
    run_dir = tmp / "run"
    shutil.copytree(faulted_run, run_dir)
    marker = tmp / "code-ran"
    tag_dir = run_dir / "checkpoints" / "step00000006"
    torch.save({"payload": _RunsCode(marker)}, tag_dir / file_name)
    if record_size:
        edit_json(tag_dir / "trainer_state.json",
                  lambda state: state["files"].update({file_name: (tag_dir / file_name).stat().st_size}))
    return run_dir, marker


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["rng_state_rank0.pt", "mp_rank_00_model_states.pt",
                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_crafted_checkpoint_file_is_never_unpickled(faulted_run, chain, tmp_path, capsys, file_name):
    run_dir, marker = crafted_copy(faulted_run, tmp_path, file_name, record_size=True)
    train = train_case(lambda name: chain / name, tmp_path, data=chain / "mask", output=run_dir, unchanged=[run_dir],
                       says=(file_name, "refusing to unpickle it", "ZH_TRUST_CHECKPOINTS"))
    train.argv += ["--total_steps", "8", "--micro_batch_size", "4", "--save_checkpoint_steps", "2"]
    for command in (train,
                    Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path / "export"],
                         (file_name, "refusing to unpickle it"), unchanged=[run_dir],
                         not_created=[tmp_path / "export"]),
                    Case(to_universal.main, ["--run_dir", run_dir], (file_name, "refusing to unpickle it"),
                         unchanged=[run_dir])):
        assert_refused(command, capsys)
        assert not marker.exists()


@pytest.mark.slow
def test_a_crafted_file_of_another_size_is_an_incomplete_checkpoint(faulted_run, tmp_path, capsys):
    run_dir, marker = crafted_copy(faulted_run, tmp_path, "mp_rank_00_model_states.pt", record_size=False)
    assert_refused(Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path / "export"],
                        ("mp_rank_00_model_states.pt of", "when it was saved"), unchanged=[run_dir],
                        not_created=[tmp_path / "export"]), capsys)
    assert not marker.exists()


@pytest.mark.slow
def test_export_never_replaces_the_run_or_a_user_folder(faulted_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    folder = user_folder(tmp_path / "mine")
    cases = [
        Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", run_dir], ("is the input --run_dir",),
             unchanged=[run_dir]),
        Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", folder], ("not an earlier output of zh-export",),
             unchanged=[run_dir, folder]),
        Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path], ("contains the input --run_dir",),
             unchanged=[run_dir]),
        Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path / "e", "--tag", "step00000099"],
             ("step00000099 does not exist",), not_created=[tmp_path / "e"]),
    ]
    for command in cases:
        assert_refused(command, capsys)
    (run_dir / "model_config.json").write_text("{broken", encoding="utf-8")
    assert_refused(Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path / "e"],
                        ("model_config.json is not a readable HF config",), not_created=[tmp_path / "e"]), capsys)


@pytest.mark.slow
def test_resuming_a_two_rank_checkpoint_on_one_rank_points_at_zh_to_universal(faulted_run, chain, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    train = train_case(lambda name: chain / name, tmp_path, data=chain / "mask", output=run_dir, unchanged=[run_dir],
                       says=("written by 2 ranks and this run has 1", "zh-to-universal --run_dir"))
    train.argv += ["--total_steps", "8", "--micro_batch_size", "4", "--save_checkpoint_steps", "2"]
    assert_refused(train, capsys)


@pytest.mark.slow
def test_a_run_directory_without_a_checkpoint_takes_new_flags(chain, tmp_path):
    """What a start that failed before its first checkpoint leaves (configs, no checkpoint) does not
    make the corrected retry look like a mismatched resume; train_config.json is written only once
    the start succeeded."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("model_config.json", "ds_config.json"):
        (run_dir / name).write_text("{}", encoding="utf-8")
    (run_dir / "train_config.json").write_text(json.dumps({"data_dir": "elsewhere", "micro_batch_size": 64}),
                                               encoding="utf-8")
    trainer_flags = train_command(chain / "mask", run_dir, 0, 2)[len(DEEPSPEED) + 5:]  # no launcher, no script
    command = ["python", str(PROJECT_ROOT / "pipeline" / "trainer.py"), *trainer_flags]
    retry = run_command(command)
    assert "fresh start" in retry.stderr
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["micro_batch_size"] == 4 and saved["data_dir"] == str(chain / "mask")


def test_init_from_truncated_weights_is_refused_before_training_starts(chain, tiny_export, tmp_path, capsys):
    model = copy_model(tiny_export, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    train = train_case(lambda name: chain / name, tmp_path, "--init_from", model, data=chain / "mask",
                       says=("--init_from", "the model cannot be loaded"))
    assert_refused(train, capsys)


@pytest.mark.slow
def test_resuming_on_other_data_is_refused_before_the_run_directory_changes(faulted_run, chain, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    remasked = tmp_path / "remasked"  # the same corpus masked again with another seed: other examples
    assert mask.main(["--input_dir", str(chain / "tok"), "--output_dir", str(remasked), "--target", "bart",
                      "--seq_length", "64", "--seed", "8", "--no-progress"]) == 0
    edit_json(run_dir / "train_config.json", lambda values: values.update(data_dir=str(remasked)))
    train = train_case(lambda name: chain / name, tmp_path, data=remasked, output=run_dir, unchanged=[run_dir],
                       says=("is not the data", "examples (shard checksums) differ"))
    train.argv += ["--total_steps", "8", "--micro_batch_size", "4", "--save_checkpoint_steps", "2"]
    assert_refused(train, capsys)


# -- generate, import-uer and plot: non-finite numbers, positions, malformed metrics ------------------


@model_case
def generate_temperature_nan_with_sampling(tiny_export, tmp):
    return generate_case(tiny_export, "--do_sample", "--temperature", "nan", says=("--temperature nan",))


@model_case
def generate_temperature_infinite(tiny_export, tmp):
    return generate_case(tiny_export, "--do_sample", "--temperature", "inf", says=("--temperature inf", "finite"))


@model_case
def generate_top_p_nan(tiny_export, tmp):
    return generate_case(tiny_export, "--do_sample", "--top_p", "nan", says=("--top_p nan",))


@model_case
def generate_max_length_above_the_positions(tiny_export, tmp):
    positions = json.loads((tiny_export / "config.json").read_text())["max_position_embeddings"]
    (tmp / "in.txt").write_text("内容丰富。\n", encoding="utf-8")
    return generate_case(tiny_export, "--input_file", tmp / "in.txt", "--output_file", tmp / "out.txt",
                         "--max_length", str(positions + 1), says=(f"--max_length {positions + 1}",
                                                                   f"{positions} positions"),
                         not_created=[tmp / "out.txt"])


@model_case
def import_uer_hidden_size_below_one_head(tiny_export, tmp):
    def narrow(state: dict) -> None:  # every tensor of width d_model cut to 32 columns/rows
        d_model = state["embedding.word.embedding.weight"].shape[1]
        for key, tensor in state.items():
            state[key] = tensor[tuple(slice(0, 32) if size == d_model else slice(None) for size in tensor.shape)]

    checkpoint = uer_file(tiny_export, tmp, narrow)
    return Case(uer_interop.import_main, ["--checkpoint", checkpoint, "--vocab_path", tiny_export / "vocab.txt",
                                          "--output_dir", tmp / "out"], ("hidden size 32", "--heads_num"),
                not_created=[tmp / "out"])


def plot_run_dir(tmp: Path, *lines: str | bytes) -> Path:
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    good = [json.dumps({"step": 1, "loss": 9.5, "tokens_per_s": 100.0})]
    (run / "metrics.jsonl").write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n"
                                                 for line in [*good, *lines]))
    return run


@model_case
def plot_over_its_own_metrics(tiny_export, tmp):
    from pipeline import plot

    run = plot_run_dir(tmp)
    return Case(plot.main, ["--run_dir", run, "--output", run / "metrics.jsonl", "--overwrite"],
                ("--output", "is the input RUN_DIR/metrics.jsonl"), unchanged=[run])


@pytest.mark.parametrize("line, says", [
    ('[1, 2]', "metrics.jsonl:2: not a metrics record"),
    ('{"loss": 9.1}', "metrics.jsonl:2: not a metrics record"),
    ('{"step": "3", "loss": 9.1}', "metrics.jsonl:2: not a metrics record"),
    ('{"step": 2.5, "loss": 9.1}', "metrics.jsonl:2: not a metrics record"),
    (b'{"step": 2, "loss": 9.1}\xff', "not UTF-8"),
])
def test_plot_refuses_malformed_metrics_with_the_line(tmp_path, capsys, line, says):
    pytest.importorskip("matplotlib", reason="zh-plot needs matplotlib (the plot extra)")
    from pipeline import plot

    run = plot_run_dir(tmp_path, line)
    assert_refused(Case(plot.main, ["--run_dir", run], (says,), unchanged=[run], not_created=[run / "loss.png"]), capsys)


def test_generate_cuts_inputs_longer_than_the_positions_with_one_line(tiny_export, tmp_path, capsys):
    positions = json.loads((tiny_export / "config.json").read_text())["max_position_embeddings"]
    (tmp_path / "in.txt").write_text("内容丰富" * positions + "\n", encoding="utf-8")
    assert generate.main(["--model_dir", str(tiny_export), "--input_file", str(tmp_path / "in.txt"), "--output_file",
                          str(tmp_path / "out.txt"), "--max_length", "8"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"inputs longer than the model's {positions} positions are cut") == 1
    assert "Traceback" not in err
    assert len((tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()) == 1


# -- the trainer's run directory: a changed held-out split, changed checkpoint files, a second run (#24, round 2) --


@pytest.mark.slow
@pytest.mark.parametrize("eval_examples", ["16", "0"])
def test_resuming_with_another_held_out_split_is_refused(faulted_run, chain, tmp_path, capsys, eval_examples):
    """faulted_run trained with --eval_examples 0; a run directory recording 16 must not resume with 0 either."""
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    if eval_examples == "0":
        edit_json(run_dir / "train_config.json", lambda values: values.update(eval_examples=16))
    train = train_case(lambda name: chain / name, tmp_path, "--eval_examples", eval_examples, data=chain / "mask",
                       output=run_dir, unchanged=[run_dir], says=("holds a run with different eval_examples",
                                                                  "original flags to resume"))
    train.argv += ["--total_steps", "8", "--micro_batch_size", "4", "--save_checkpoint_steps", "2"]
    assert_refused(train, capsys)


def flipped_copy(faulted_run: Path, tmp: Path, file_name: str) -> Path:
    """A copy of the run whose latest checkpoint file ``file_name`` has one byte changed, its size unchanged."""
    run_dir = tmp / "run"
    shutil.copytree(faulted_run, run_dir)
    path = run_dir / "checkpoints" / "step00000006" / file_name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_export_and_to_universal_name_a_checkpoint_file_with_a_flipped_byte(faulted_run, tmp_path, capsys, file_name):
    run_dir = flipped_copy(faulted_run, tmp_path, file_name)
    says = (f"step00000006, which has {file_name} whose sha256 differs", "pass an earlier --tag")
    assert_refused(Case(convert_to_hf.main, ["--run_dir", run_dir, "--output_dir", tmp_path / "export"], says,
                        unchanged=[run_dir], not_created=[tmp_path / "export"]), capsys)
    assert_refused(Case(to_universal.main, ["--run_dir", run_dir], says, unchanged=[run_dir]), capsys)


@pytest.mark.slow
def test_a_flipped_byte_in_an_optimizer_partition_falls_back_to_the_previous_checkpoint(chain, faulted_run, tmp_path):
    """Same size, other content: resumed from step 4, not from step 6, nor from the user's copy of step 6 beside
    it (a complete checkpoint by content, which the trainer never touches)."""
    run_dir = flipped_copy(faulted_run, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(faulted_run / "checkpoints" / "step00000006", checkpoints / "step00000006.bak")
    kept = snapshot(checkpoints / "step00000006.bak")
    command = train_command(chain / "mask", run_dir, 29814, 8)
    command[command.index("--keep_last_checkpoints") + 1] = "1"
    resumed = run_command(command)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt whose sha256 differs" in resumed.stderr
    assert "resuming from the previous complete checkpoint step00000004" in resumed.stderr
    assert (checkpoints / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000006.bak", "step00000008"]
    assert snapshot(checkpoints / "step00000006.bak") == kept


@pytest.mark.slow
def test_a_checkpoint_without_recorded_digests_resumes_and_says_so(chain, faulted_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(faulted_run, run_dir)
    (run_dir / "checkpoints" / "step00000006" / "sha256.json").unlink()  # as every checkpoint before it
    edit_json(run_dir / "checkpoints" / "step00000006" / "trainer_state.json",
              lambda state: state["files"].pop("sha256.json"))
    resumed = run_command(train_command(chain / "mask", run_dir, 29815, 8))
    assert ("resuming from step00000006 (step 6) (written before checkpoints recorded their files' sha256: sizes and "
            "file types checked, contents not)") in resumed.stderr
    assert (run_dir / "checkpoints" / "step00000008" / "sha256.json").is_file()


LOCK_HOLDER = """
import sys, time
from data_tools.outputs import output_lock
with output_lock(__import__("pathlib").Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_a_run_directory_in_use_is_refused_naming_the_holder(chain, tmp_path, capsys):
    """Another run holds the run directory's lock: refused before anything is read or written. Its lock file,
    left behind when that run is killed, does not block the next start (the kernel released the flock)."""
    import signal
    import socket
    import subprocess
    import sys

    from pipeline.run_plan import run_dir_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=deepspeed_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        train = train_case(lambda name: chain / name, tmp_path, data=chain / "mask", output=run_dir,
                           says=(f"{run_dir} is being written by another run", f"pid {holder.pid} on "
                                 f"{socket.gethostname()}", "nothing was changed"))
        train.not_created = []  # the holder's lock file lies beside it, as it should
        assert_refused(train, capsys)
        assert not run_dir.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".run.lock").exists()  # what the killed run left
    with run_dir_lock(run_dir, is_main=True) as locked_by:
        assert locked_by is None
