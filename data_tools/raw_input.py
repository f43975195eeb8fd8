"""Reading raw corpora: the three input formats of DESIGN.md, plain or compressed.

Files are read as bytes with a bounded ``readline`` so that one enormous line can
never be loaded whole: it is skipped and reported as ``line_too_long``.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

from data_tools.common import UserError

InputFormat = Literal["auto", "line", "uer", "jsonl"]
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
_SNIFF_LINES = 200


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One document as read, or the reason it could not be read (``drop_reason``)."""

    text: str
    source: str
    line_number: int
    drop_reason: str | None = None
    invalid_utf8: bool = False
    num_bytes: int = 0


def expand_input_paths(paths: list[Path]) -> list[Path]:
    """Files named directly, plus every file under named directories, in sorted order."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"input directory {path} contains no files; point --input_paths at your corpus")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; check --input_paths")
    return files


def open_binary(path: Path) -> BinaryIO:
    """Open a plain, gzip or zstd file for reading bytes."""
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        if path.suffix in (".zst", ".zstd"):
            try:
                import zstandard
            except ImportError as error:
                raise UserError(f"{path} is zstd-compressed: pip install zstandard (the 'data' extra)") from error
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # noqa: SIM115
        return open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from error


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or mislabelled plain/gzip/zstd file raises while it is read."""
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_number, bytes)``; ``bytes`` is None for a line longer than the limit.

    An over-long line is skipped in bounded chunks, never held in memory whole.
    """
    with open_binary(path) as handle:
        line_number = 0
        while True:
            try:
                chunk = handle.readline(max_line_bytes + 1)
            except _read_errors() as error:
                raise UserError(f"{path}: cannot be read after line {line_number} ({type(error).__name__}: {error}); "
                                "is it really a file of its suffix's format (plain text, .gz, .zst)?") from error
            if not chunk:
                return
            line_number += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line
                    chunk = handle.readline(1 << 20)
                yield line_number, None
                continue
            yield line_number, chunk.rstrip(b"\r\n")


def detect_format(path: Path, max_line_bytes: int) -> Literal["line", "uer", "jsonl"]:
    """Guess the format from the file name and its first lines."""
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    saw_blank = False
    first_nonblank: bytes | None = None
    for count, (_, line) in enumerate(read_lines(path, max_line_bytes)):
        if count >= _SNIFF_LINES:
            break
        if line is None:
            continue
        if not line.strip():
            saw_blank = first_nonblank is not None or saw_blank
            continue
        if first_nonblank is None:
            first_nonblank = line
    if first_nonblank is not None and first_nonblank.lstrip().startswith(b"{"):
        try:
            json.loads(first_nonblank)
            return "jsonl"
        except ValueError:
            pass
    return "uer" if saw_blank else "line"


def iter_documents(
    path: Path, input_format: InputFormat, max_line_bytes: int, text_field: str = "text"
) -> Iterator[RawDocument]:
    """Every document of one file, including those that cannot be read (with a reason)."""
    fmt = detect_format(path, max_line_bytes) if input_format == "auto" else input_format
    source = str(path)
    if fmt == "uer":
        yield from _iter_uer_documents(path, max_line_bytes)
        return
    for line_number, raw in read_lines(path, max_line_bytes):
        if raw is None:
            yield RawDocument("", source, line_number, drop_reason="line_too_long", num_bytes=max_line_bytes)
            continue
        text, invalid = _decode(raw)
        size = len(raw) + 1
        if fmt == "line":
            if text.strip():
                yield RawDocument(text, source, line_number, invalid_utf8=invalid, num_bytes=size)
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError:
            yield RawDocument("", source, line_number, "invalid_json", invalid, size)
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            yield RawDocument("", source, line_number, "missing_text_field", invalid, size)
            continue
        yield RawDocument(value, source, line_number, invalid_utf8=invalid, num_bytes=size)


def _iter_uer_documents(path: Path, max_line_bytes: int) -> Iterator[RawDocument]:
    """UER-py's format: one sentence per line, a blank line between documents."""
    sentences: list[str] = []
    start_line = 0
    invalid = False
    too_long = False
    size = 0
    source = str(path)

    def flush() -> RawDocument:
        if too_long:
            return RawDocument("", source, start_line, drop_reason="line_too_long", num_bytes=size)
        return RawDocument("\n".join(sentences), source, start_line, invalid_utf8=invalid, num_bytes=size)

    for line_number, raw in read_lines(path, max_line_bytes):
        if raw is not None and not raw.strip():
            if sentences or too_long:
                yield flush()
            sentences, invalid, too_long, size = [], False, False, 0
            continue
        if not sentences and not too_long:
            start_line = line_number
        if raw is None:
            too_long = True
            size += max_line_bytes
            continue
        text, bad = _decode(raw)
        invalid |= bad
        size += len(raw) + 1
        sentences.append(text)
    if sentences or too_long:
        yield flush()
