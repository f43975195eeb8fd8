"""Reading raw corpora: the three text formats of DESIGN.md, plain or compressed, and Parquet.

Text files are read as bytes with a bounded ``readline`` so that one enormous line can
never be loaded whole: it is skipped and reported as ``line_too_long``. Parquet files (the
layout dataset hubs publish corpora in) are read one record batch of the text column at a
time, so memory is bounded by a row group, whatever the file's size.

A damaged file is refused, never read as good: a ``.gz`` or ``.zst`` file that ends inside its
compressed stream (a copy cut short) stops the stage in one line, and Parquet pages are checked
against their CRC where the file has them (see docs/guarantees.md for what a file without them gets).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from data_tools.common import UserError

InputFormat = Literal["auto", "line", "uer", "jsonl", "parquet"]
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
PARQUET_SUFFIX = ".parquet"
READ_BLOCK_BYTES = 1 << 20
ZSTD_INPUT_BYTES = 1 << 18  # compressed bytes decompressed at a time (a few MB of text out)
PARQUET_BATCH_ROWS = 1024  # rows of the text column decoded to Python strings at a time
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


def expand_input_paths(paths: list[Path], skipped: list[Path] | None = None) -> list[Path]:
    """Files named directly, plus every file under named directories, in sorted order.

    A directory holding ``.parquet`` files is a dataset hub's layout (``data/train-*.parquet``
    beside ``README.md``, licences, scripts): only its Parquet files are corpus; the others are
    appended to ``skipped`` for the caller to report, never read as text.
    """
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"input directory {path} contains no files; point --input_paths at your corpus")
            if any(p.suffix == PARQUET_SUFFIX for p in found):
                if skipped is not None:
                    skipped.extend(p for p in found if p.suffix != PARQUET_SUFFIX)
                found = [p for p in found if p.suffix == PARQUET_SUFFIX]
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; check --input_paths")
    return files


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame, raising ``EOFError`` where the file ends inside a
    frame. ``zstandard``'s stream reader takes such a cut for the end of the data, so a truncated file would be
    read to its cut as if it were whole."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._source = open(path, "rb")  # closed with this reader
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressor of the frame being read; None between frames
        self._out = b""  # decompressed bytes, read up to _position
        self._position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """The next decompressed bytes, at most ``size`` (as many as one input block gives, uncopied)."""
        while self._position >= len(self._out):
            compressed = self._source.read(ZSTD_INPUT_BYTES)
            if not compressed:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return b""
            self._out, self._position = self._decompress(compressed), 0
        start = self._position
        end = len(self._out) if size is None or size < 0 else min(len(self._out), start + size)
        self._position = end
        return self._out if (start, end) == (0, len(self._out)) else self._out[start:end]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            parts.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None  # the next frame starts in what is left
        return b"".join(parts)

    def close(self) -> None:
        self._source.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """Open a plain, gzip or zstd file for reading bytes."""
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        if path.suffix in (".zst", ".zstd"):
            try:
                import zstandard  # noqa: F401 - only to say what to install
            except ImportError as error:
                raise UserError(f"{path} is zstd-compressed: pip install zstandard (the 'data' extra)") from error
            return ZstdFrames(path)  # type: ignore[return-value]
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
    """Yield ``(line_number, bytes)`` without the line end; ``bytes`` is None for a line longer than the limit.

    The file is read in blocks of ``READ_BLOCK_BYTES`` (one ``readline`` call per line cost ~1 µs
    a line); an over-long line is skipped as its blocks pass, never held in memory whole.
    """
    with open_binary(path) as handle:
        line_number = 0
        head = b""  # the start of a line that the blocks so far did not end
        skipping = False  # the current line is over the limit: its bytes are dropped as they come
        while True:
            try:
                block = handle.read(READ_BLOCK_BYTES)
            except EOFError as error:  # gzip and zstd both: the compressed stream was cut short
                raise UserError(f"{path}: ends inside its compressed data after line {line_number} (truncated: "
                                f"{error}); nothing was written: copy or download the file again") from error
            except _read_errors() as error:
                raise UserError(f"{path}: cannot be read after line {line_number} ({type(error).__name__}: {error}); "
                                "is it really a file of its suffix's format (plain text, .gz, .zst)?") from error
            if not block:
                break
            lines = block.split(b"\n")
            rest = lines.pop()  # what follows the block's last newline
            if lines:
                lines[0] = head + lines[0]
                for index, line in enumerate(lines, start=line_number + 1):
                    if len(line) > max_line_bytes or (skipping and index == line_number + 1):
                        yield index, None
                    else:
                        yield index, line.rstrip(b"\r\n")
                line_number += len(lines)
                head, skipping = b"", False
            if not skipping:
                head += rest
                if len(head) > max_line_bytes:
                    head, skipping = b"", True
        if skipping or head:
            yield line_number + 1, None if skipping else head.rstrip(b"\r\n")


def detect_format(path: Path, max_line_bytes: int) -> Literal["line", "uer", "jsonl", "parquet"]:
    """Guess the format from the file name and its first lines."""
    if path.suffix == PARQUET_SUFFIX:
        return "parquet"
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
    if fmt == "parquet":
        yield from _iter_parquet_documents(path, text_field, max_line_bytes)
        return
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


def _iter_parquet_documents(path: Path, text_field: str, max_line_bytes: int,
                            batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[RawDocument]:
    """Every row of a Parquet file as a document from column ``text_field``, numbered from 1.

    A null is dropped as ``null_text``; a column that does not hold strings drops every row as
    ``non_string_text`` (the manifest counts them; a file where nothing is kept stops the stage
    with the count); a value over ``max_line_bytes`` as ``line_too_long``, like a text line.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = str(path)
    try:
        try:  # pages written with a CRC (write_page_checksum=True) are checked against it as they are read
            parquet = pq.ParquetFile(path, page_checksum_verification=True)
        except TypeError:  # pyarrow 14 checks no CRC (the keyword came with 15)
            parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: cannot be read as Parquet ({error}); is it a .parquet file?") from error
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "name the text column with --text_field")
    column_type = schema.field(text_field).type
    if pa.types.is_dictionary(column_type):  # pandas categoricals are stored dictionary-encoded
        column_type = column_type.value_type
    is_text = (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
               or getattr(pa.types, "is_string_view", lambda _: False)(column_type))
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
            column = batch.column(0)
            if not is_text:
                for _ in range(len(column)):
                    row += 1
                    yield RawDocument("", source, row, drop_reason="non_string_text")
                continue
            if column.type != pa.string():  # large, view or dictionary-encoded strings
                column = column.cast(pa.large_string())
            # Arrow does not check the text a page holds: bytes that are not UTF-8 (a damaged page without a CRC)
            # are refused here in one pass, instead of failing one value at a time in to_pylist
            column.validate(full=True)
            sizes = pc.binary_length(column).to_pylist()
            for value, size in zip(column.to_pylist(), sizes):
                row += 1
                if value is None:
                    yield RawDocument("", source, row, drop_reason="null_text")
                elif size > max_line_bytes:
                    yield RawDocument("", source, row, drop_reason="line_too_long", num_bytes=size)
                elif value.strip():
                    yield RawDocument(value, source, row, num_bytes=size)
                else:
                    yield RawDocument("", source, row, drop_reason="empty_text", num_bytes=size)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: cannot be read after row {row} ({type(error).__name__}: {error}); "
                        "the file is damaged or not Parquet") from error
