"""One config dataclass per stage, and the command line generated from it.

Every stage declares a ``@dataclass`` whose fields carry their help text in
``metadata["help"]``. :func:`parse_config` turns it into an ``argparse`` parser, so
``--help`` documents every flag and the flags can never drift from the config. A config made of
sections (dataclass bases, as ``TrainConfig``'s data, optimization, checkpointing and logging) keeps
flat flags named after the fields, listed under one heading per section.
:func:`run_stage` is the shared ``main``: it turns :class:`UserError` into a one-line
message and exit status 2, so bad input never shows a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar, get_args, get_origin

from data_tools.common import UserError

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def required(help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field that must be given on the command line."""
    return dataclasses.field(metadata={"help": help, "required": True, **kwargs})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``config_cls``."""
    parser = argparse.ArgumentParser(
        description=description or (config_cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    sections = section_titles(config_cls)
    groups: dict[str, Any] = {}  # section title -> its argument group
    for field in dataclasses.fields(config_cls):
        if field.metadata.get("cli") is False:
            continue
        title = sections.get(field.name)
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        tp, _ = _unwrap_optional(hints[field.name])
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "dest": field.name}
        if field.metadata.get("required"):
            kwargs["required"] = True
        elif field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        else:
            kwargs["default"] = field.default_factory()  # type: ignore[misc]
        origin = get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple, Sequence):
            (item_type,) = get_args(tp)[:1]
            kwargs["nargs"] = "+"
            kwargs["type"] = item_type
        else:
            kwargs["type"] = tp
        target.add_argument(f"--{field.name}", **kwargs)
    return parser


def section_titles(config_cls: type) -> dict[str, str]:
    """Field name -> title of the section (a dataclass base of ``config_cls``) that declares it: the first
    line of the section's docstring. Fields of ``config_cls`` itself are in none."""
    titles = {}
    for base in reversed(config_cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            title = (base.__doc__ or base.__name__).strip().splitlines()[0].rstrip(".")
            titles.update(dict.fromkeys(base.__dict__.get("__annotations__", {}), title))
    return titles


def check_field_types(config: Any) -> None:
    """Every field of a config dataclass holds a value of its annotated type (a Literal one of its
    choices), so a config built from JSON or the Python API fails in one line like the CLI does.
    ``int`` fields refuse bools; ``float`` fields take ints; ``Path`` fields take strings."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        tp, optional = _unwrap_optional(hints[field.name])
        if value is None:
            if optional:
                continue
            raise UserError(f"{field.name} must be given (got null)")
        if not _matches(value, tp):
            expected = (f"one of {list(get_args(tp))}" if get_origin(tp) is Literal
                        else "a finite number" if tp is float else getattr(tp, "__name__", str(tp)))
            raise UserError(f"{field.name} must be {expected}, got {value!r}")


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp) and type(value) is type(get_args(tp)[0])
    if origin in (list, tuple, Sequence):
        (item_type,) = get_args(tp)[:1]
        return isinstance(value, (list, tuple)) and all(_matches(item, item_type) for item in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # NaN passes every range check (each comparison is False) and infinity most
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is Path:
        return isinstance(value, (str, Path))
    if tp is str:
        return isinstance(value, str)
    return True


def parse_config(config_cls: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    """Parse ``argv`` into ``config_cls``; unknown flags are an error."""
    parser = build_parser(config_cls)
    namespace = parser.parse_args(argv)
    refuse_non_finite(parser, namespace)
    return config_cls(**vars(namespace))


def refuse_non_finite(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """NaN and infinity in a float flag, refused before the config (and any range check, which NaN
    would pass) sees them: a NaN ratio or span length can make a sampling loop spin forever."""
    for action in parser._actions:
        if action.type is not float:
            continue
        values = getattr(namespace, action.dest)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{action.option_strings[0]} {value} must be a finite number")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {f.name: convert(getattr(config, f.name)) for f in dataclasses.fields(config)}


def run_stage(main: Callable[[ConfigT], Any], config_cls: type[ConfigT], argv: Sequence[str] | None = None) -> int:
    """Shared entry point: parse flags, run, report user errors in one line."""
    try:
        config = parse_config(config_cls, argv)
        main(config)
    except UserError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused (permissions, full disk, a path that is a directory)
        where = f"{error.filename}: " if error.filename else ""
        print(f"{Path(sys.argv[0]).name}: error: {where}{error.strerror or error}; the previous complete "
              "output is untouched", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # Ctrl-C; SIGTERM arrives as data_tools.outputs.Interrupted
        print(f"{Path(sys.argv[0]).name}: {str(error) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(error, "signal_number", signal.SIGINT)
    return 0
