"""Stage manifests as types: one dataclass per stage's ``manifest.json`` and per shard entry.

Each class is read (``from_json``, which validates) and written (``to_json``, the exact keys
and order the stages have always written) in one place. A field a manifest lacks or holds with
the wrong type is refused in one line naming the file and the field. Fields that manifests of
earlier versions may lack (``bytes``, ``skipped_inputs``, ``unk_ratio``, ...) and that no stage
relies on are read as ``None``: those outputs stay readable. A manifest read from disk is never
written back, so ``to_json`` only ever sees complete ones.

``load_manifest`` (in :mod:`data_tools.shards`) still hands the checked JSON object to the code
that reads manifests as dicts (the trainer, the online masking).

Every reader of a tokenize or mask manifest (the next stage, ``zh-verify``, the trainer) gets it checked
against the ``vocab.txt`` beside it: sha256, size, the special tokens' ids and the id type, so an
edited manifest cannot make masking or the model use ids the vocab does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, TypeVar

from data_tools.common import SPECIAL_TOKENS, VOCAB_FILE, UserError, file_sha256, write_json_atomic

MANIFEST = "manifest.json"

Entry = TypeVar("Entry", bound="ShardEntry")
Counts = TypeVar("Counts", bound="StageCounts")


class ManifestProblem(ValueError):
    """A field of a manifest that is missing or holds the wrong type; the message names the field."""


def is_count(value: Any) -> bool:
    """A non-negative int (JSON ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_fields(record: Any) -> dict[str, Any]:
    """The record's fields in declaration order, which each class declares in its JSON order."""
    return {field.name: getattr(record, field.name) for field in fields(record)}


def _read_fields(cls: type, value: dict) -> dict[str, Any]:
    """The values of ``cls``'s fields in a JSON object, ``None`` for those it lacks."""
    return {field.name: value.get(field.name) for field in fields(cls)}


# -- shard entries ----------------------------------------------------------------------------------


class ShardEntry:
    """One shard as its stage's manifest lists it: the file's name, sha256, size and row count."""

    ROW_FIELD: ClassVar[str]  # the JSON key of the shard's row count
    file: str
    sha256: str
    bytes: int | None  # None: a manifest written before sizes were recorded

    @property
    def row_count(self) -> int:
        return getattr(self, self.ROW_FIELD)

    @classmethod
    def from_json(cls: type[Entry], value: Any, where: str) -> Entry:
        if not isinstance(value, dict):
            raise ManifestProblem(f"{where} is not an object")
        name = value.get("file")
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise ManifestProblem(f"{where}.file {name!r} is not a file name inside the directory")
        if not isinstance(value.get("sha256"), str):
            raise ManifestProblem(f"{where}.sha256 is missing")
        for field in (cls.ROW_FIELD, *(["bytes"] if "bytes" in value else [])):
            if not is_count(value.get(field)):
                raise ManifestProblem(f"{where}.{field} is missing or not a count")
        return cls(**_read_fields(cls, value))

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(kw_only=True)
class DocumentShard(ShardEntry):
    """A ``documents-NNNNN.jsonl`` shard of the clean stage."""

    ROW_FIELD: ClassVar[str] = "documents"
    file: str
    documents: int
    characters: int | None
    bytes: int | None
    sha256: str


@dataclass(kw_only=True)
class ArrowShard(ShardEntry):
    """A shard of Arrow record batches; the subclasses add the per-shard totals their stage records."""

    ROW_FIELD: ClassVar[str] = "rows"
    file: str
    rows: int
    bytes: int | None
    sha256: str


@dataclass(kw_only=True)
class TokenizedShard(ArrowShard):
    """A ``tokenized-NNNNN.arrow`` shard: one row per document, its sentences and tokens counted."""

    sentences: int | None
    tokens: int | None


@dataclass(kw_only=True)
class ExampleShard(ArrowShard):
    """An ``examples-NNNNN.arrow`` shard of the mask stage: one row per example."""

    source_tokens: int | None
    target_tokens: int | None


# -- parts of the manifests ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class MinhashRecord:
    """The MinHash signatures of a clean output's documents (``--near_dedup_partitions``): a .npy of uint32
    [rows, num_perm], row i the signature of the i-th document over the shards, of character ``ngram``-grams.
    zh-clean-combine reads them instead of computing them again."""

    file: str
    rows: int
    num_perm: int
    ngram: int
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, value: Any) -> MinhashRecord:
        if not isinstance(value, dict):
            raise ManifestProblem("field 'minhash' is not an object")
        name = value.get("file")
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise ManifestProblem(f"minhash.file {name!r} is not a file name inside the directory")
        for field in ("rows", "num_perm", "ngram", "bytes"):
            if not is_count(value.get(field)):
                raise ManifestProblem(f"minhash.{field} is missing or not a count")
        if not isinstance(value.get("sha256"), str):
            raise ManifestProblem("minhash.sha256 is missing")
        return cls(**_read_fields(cls, value))

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(kw_only=True)
class VocabRecord:
    """The vocab the ids refer to, copied beside the shards as ``file``."""

    file: str | None
    source: str | None  # the --vocab_path it was copied from
    sha256: str
    size: int
    special_token_ids: dict[str, int]

    @classmethod
    def from_json(cls, value: Any) -> VocabRecord:
        if not isinstance(value, dict):
            raise ManifestProblem("field 'vocab' is missing or not an object")
        if not isinstance(value.get("size"), int) or value["size"] <= 0 or not isinstance(value.get("sha256"), str):
            raise ManifestProblem("vocab.size or vocab.sha256 is missing")
        special = value.get("special_token_ids")
        if not isinstance(special, dict) or any(not isinstance(special.get(t), int) for t in SPECIAL_TOKENS):
            raise ManifestProblem(f"vocab.special_token_ids must give the id of each of {', '.join(SPECIAL_TOKENS)}")
        return cls(**_read_fields(cls, value))

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


class StageCounts:
    """A manifest's ``counts``; ``REQUIRED`` are the counts the next stages rely on."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls: type[Counts], value: dict) -> Counts:
        for field in cls.REQUIRED:
            if not is_count(value.get(field)):
                raise ManifestProblem(f"counts.{field} is missing or not a count")
        return cls(**_read_fields(cls, value))


@dataclass(kw_only=True)
class CleanCounts(StageCounts):
    """Documents and characters in, kept, and dropped by each reason: kept + dropped == read."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("documents_read", "documents_kept")
    documents_read: int
    documents_kept: int
    documents_dropped: dict[str, int]
    characters_read: int | None
    characters_kept: int | None
    bytes_read: int | None
    documents_with_invalid_utf8_replaced: int | None

    @classmethod
    def from_json(cls, value: dict) -> CleanCounts:
        counts = super().from_json(value)
        if not isinstance(counts.documents_dropped, dict):
            raise ManifestProblem("counts.documents_dropped is missing or not an object")
        return counts


@dataclass(kw_only=True)
class TokenizeCounts(StageCounts):
    REQUIRED: ClassVar[tuple[str, ...]] = ("documents_kept",)
    documents_read: int | None
    documents_kept: int
    documents_dropped: dict[str, int] | None
    sentences: int | None
    tokens: int | None
    unk_tokens: int | None
    unk_ratio: float | None


@dataclass(kw_only=True)
class MaskCounts(StageCounts):
    documents_per_pass: int | None
    document_passes: int | None
    document_passes_skipped: dict[str, int] | None
    examples: int | None
    source_tokens: int | None
    target_tokens: int | None


# -- the stage manifests -------------------------------------------------------------------------------


class StageManifest:
    """What every stage's manifest holds: the stage's name, its resolved config, counts and shards."""

    STAGE: ClassVar[str]
    SHARD: ClassVar[type[ShardEntry]]
    COUNTS: ClassVar[type[StageCounts]]
    config: dict[str, Any]
    counts: Any
    shards: list

    @classmethod
    def from_json(cls, value: dict) -> StageManifest:
        """The manifest of a JSON object; ``ManifestProblem`` names the first field that is wrong."""
        if not isinstance(value.get("counts"), dict):
            raise ManifestProblem("field 'counts' is missing or not an object")
        if not isinstance(value.get("config"), dict):
            raise ManifestProblem("field 'config' is missing or not an object")
        if not isinstance(value.get("shards"), list):
            raise ManifestProblem("field 'shards' is missing or not a list")
        if not value["shards"]:  # every stage refuses to write an empty output: this one was edited or forged
            raise ManifestProblem("field 'shards' lists no shard (a stage never writes an empty output)")
        shards = [cls.SHARD.from_json(shard, f"shards[{index}]") for index, shard in enumerate(value["shards"])]
        parsed = {**_read_fields(cls, value), "shards": shards}
        if "vocab" in parsed:  # tokenize and mask outputs: checked before the counts
            parsed["vocab"] = VocabRecord.from_json(value.get("vocab"))
        parsed["counts"] = cls.COUNTS.from_json(value["counts"])
        return cls(**parsed)

    def to_json(self) -> dict[str, Any]:
        """The JSON object the stage writes: ``stage`` first, then the fields in declaration order."""
        values = _json_fields(self)
        values["counts"] = _json_fields(self.counts)
        values["shards"] = [shard.to_json() for shard in self.shards]
        if "vocab" in values:
            values["vocab"] = self.vocab.to_json()  # type: ignore[attr-defined]
        return {"stage": self.STAGE, **values}

    def write(self, directory: Path) -> None:
        """Write ``manifest.json`` into ``directory`` (through a temp file and a rename)."""
        write_json_atomic(Path(directory) / MANIFEST, self.to_json())

    @property
    def row_count(self) -> int:
        """Rows (documents or examples) over all shards."""
        return sum(shard.row_count for shard in self.shards)


@dataclass(kw_only=True)
class CleanManifest(StageManifest):
    STAGE: ClassVar[str] = "clean"
    SHARD: ClassVar[type[ShardEntry]] = DocumentShard
    COUNTS: ClassVar[type[StageCounts]] = CleanCounts
    config: dict[str, Any]
    counts: CleanCounts
    inputs: list[dict[str, Any]] | None  # {"path", "documents_read", "documents_kept"} per input file
    skipped_inputs: list[str] | None  # files beside .parquet files that were not read
    shards: list[DocumentShard]
    minhash: MinhashRecord | None = None  # written only with --near_dedup_partitions (the key is left out otherwise)

    @classmethod
    def from_json(cls, value: dict) -> CleanManifest:
        manifest = super().from_json(value)
        if manifest.minhash is not None:
            manifest.minhash = MinhashRecord.from_json(manifest.minhash)
            if manifest.minhash.rows != manifest.counts.documents_kept:
                raise ManifestProblem(f"minhash.rows is {manifest.minhash.rows} but counts.documents_kept is "
                                      f"{manifest.counts.documents_kept}")
        return manifest  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        values = super().to_json()
        if self.minhash is None:
            del values["minhash"]
        else:
            values["minhash"] = self.minhash.to_json()
        return values


@dataclass(kw_only=True)
class TokenizeManifest(StageManifest):
    STAGE: ClassVar[str] = "tokenize"
    SHARD: ClassVar[type[ShardEntry]] = TokenizedShard
    COUNTS: ClassVar[type[StageCounts]] = TokenizeCounts
    config: dict[str, Any]
    input_manifest_sha256: str | None  # of the clean manifest the documents were checked against
    vocab: VocabRecord
    tokenizer: dict[str, Any] | None  # {"class": "BertTokenizer", "do_lower_case", "add_special_tokens"}
    id_type: str | None  # "uint16" or "uint32"
    counts: TokenizeCounts
    shards: list[TokenizedShard]


@dataclass(kw_only=True)
class MaskManifest(StageManifest):
    STAGE: ClassVar[str] = "mask"
    SHARD: ClassVar[type[ShardEntry]] = ExampleShard
    COUNTS: ClassVar[type[StageCounts]] = MaskCounts
    target: str | None  # "bart" or "gsg"
    preset: str | None
    config: dict[str, Any]
    input_manifest_sha256: str | None  # of the tokenize manifest
    vocab: VocabRecord
    id_type: str | None
    counts: MaskCounts
    shards: list[ExampleShard]


MANIFEST_TYPES: dict[str, type[StageManifest]] = {
    manifest.STAGE: manifest for manifest in (CleanManifest, TokenizeManifest, MaskManifest)
}


def parse_manifest(value: dict, path: Path | str) -> StageManifest:
    """The typed manifest of a JSON object whose ``stage`` is known; a wrong field is refused in one
    line naming ``path`` and the field."""
    try:
        return MANIFEST_TYPES[value["stage"]].from_json(value)
    except ManifestProblem as problem:
        raise UserError(f"{path}: {problem}; re-run the {value['stage']} stage that wrote it") from None


def read_manifest_json(directory: Path, expected_stage: str | Iterable[str]) -> tuple[dict, StageManifest]:
    """A stage's manifest as read (the JSON object) and typed, checked to come from the stage we
    expect and to have the fields the next stages read (a hand-edited or foreign one is refused)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: {directory} is not the output of a finished stage; run that stage first")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); re-run the stage that wrote it") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; re-run the stage that wrote it")
    stages = {expected_stage} if isinstance(expected_stage, str) else set(expected_stage)
    if value.get("stage") not in stages:
        raise UserError(
            f"{path} was written by stage {value.get('stage')!r}, expected {' or '.join(sorted(stages))}; "
            "check the directory you passed"
        )
    manifest = parse_manifest(value, path)
    if isinstance(getattr(manifest, "vocab", None), VocabRecord):
        check_vocab_beside(directory, manifest)
    return value, manifest


def read_manifest(directory: Path, expected_stage: str | Iterable[str]) -> StageManifest:
    """The typed manifest of a stage's output directory (see :func:`read_manifest_json`)."""
    return read_manifest_json(directory, expected_stage)[1]


def _vocab_facts(path: Path) -> tuple[int, dict[str, int]]:
    """(size, id of each special token) of a vocab file as the tokenizer reads it: one token a line, the id
    its line's index, a later duplicate winning."""
    size, special = 0, {}
    with open(path, encoding="utf-8") as handle:
        for size, line in enumerate(handle, start=1):
            token = line.rstrip("\n")
            if token in SPECIAL_TOKENS:
                special[token] = size - 1
    return size, special


def check_vocab_beside(directory: Path, manifest: StageManifest) -> Path:
    """The vocab.txt beside a tokenize or mask output, which must be the file its ids were made with: the
    manifest's vocab.sha256, and then its vocab.size, special_token_ids and id_type must be that file's."""
    record: VocabRecord = manifest.vocab  # type: ignore[attr-defined]
    path, where = Path(directory) / VOCAB_FILE, Path(directory) / MANIFEST
    if not path.is_file() or file_sha256(path) != record.sha256:
        raise UserError(f"{path} is missing or differs from the vocab the manifest records (sha256 "
                        f"{record.sha256[:16]}…); re-run the {manifest.STAGE} stage")
    size, special = _vocab_facts(path)
    rerun = f"re-run the {manifest.STAGE} stage that wrote it"
    if record.size != size:
        raise UserError(f"{where}: vocab.size is {record.size} but {path} has {size} tokens; {rerun}")
    for token in SPECIAL_TOKENS:
        if record.special_token_ids[token] != special.get(token):
            raise UserError(f"{where}: vocab.special_token_ids gives {token} id {record.special_token_ids[token]} "
                            f"but {path} has it at id {special.get(token)}; {rerun}")
    id_type = getattr(manifest, "id_type", None)
    if id_type is not None and id_type != ("uint16" if size <= 1 << 16 else "uint32"):
        raise UserError(f"{where}: id_type {id_type!r} does not fit a vocab of {size} tokens; {rerun}")
    return path
