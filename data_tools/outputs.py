"""Where commands write: never over the user's files or their own inputs, and never half.

Every output (a stage's directory, an exported model, a vocab file, a generation file) is
built in a temporary sibling, ``.<name>.partial-<random>``, and renamed into place only when
it is complete. A failed or killed run therefore leaves the previous complete output
untouched and nothing that looks complete (a leftover partial sibling is hidden, named as
such, and reported by the next run).

An existing output is replaced only when it is recognisably an earlier output of the same
command (its manifest says so and it holds nothing else), or when the user passes
``--overwrite``; an output may never be, contain or lie inside one of the command's inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from data_tools.cli import option
from data_tools.common import UserError

PARTIAL_MARK = ".partial-"


def overwrite_option() -> Any:
    """The ``--overwrite`` flag every command with an output has."""
    return option(False, "Replace an existing output even when it is not recognisably an earlier output of this "
                  "command (its contents are deleted once the new output is complete). Never needed to re-run a "
                  "command into its own earlier output.")


def check_apart(output: Path, output_flag: str, inputs: dict[str, Path | Iterable[Path] | None]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one."""
    resolved_output = Path(output).resolve()
    for flag, paths in inputs.items():
        if paths is None:
            continue
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            resolved = Path(path).resolve()
            if resolved == resolved_output:
                relation = "is"
            elif resolved in resolved_output.parents:
                relation = "lies inside"
            elif resolved_output in resolved.parents:
                relation = "contains"
            else:
                continue
            raise UserError(f"{output_flag} {output} {relation} the input {flag} {path}: a command never writes over "
                            f"or into its own input; choose an output path outside it (nothing was changed)")


def read_json_object(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is absent, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_replaceable_dir(output_dir: Path, output_flag: str, writer: str, marker_file: str,
                          is_own: Callable[[dict], bool], owns: Callable[[dict, str], bool],
                          overwrite: bool) -> None:
    """An existing non-empty ``output_dir`` may be replaced only when ``marker_file`` in it says
    ``writer`` wrote it and it holds nothing but what ``writer`` writes, or with ``--overwrite``."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"{output_flag} {output_dir} is a file, not a directory; give a directory path")
    entries = sorted(entry.name for entry in output_dir.iterdir())
    if not entries or overwrite:
        return
    marker = read_json_object(output_dir / marker_file)
    if marker is None or not is_own(marker):
        raise UserError(f"{output_flag} {output_dir} is not empty and is not an earlier output of {writer} (no "
                        f"{marker_file} written by it); nothing was changed: choose a new directory, or pass "
                        "--overwrite to replace it")
    foreign = [name for name in entries if not owns(marker, name)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{output_flag} {output_dir} holds {foreign[0]}{more}, which {writer} did not write; nothing "
                        "was changed: move it away, or pass --overwrite to replace the whole directory")


def check_replaceable_file(path: Path, output_flag: str, writer: str, is_own: bool, overwrite: bool) -> None:
    """An existing file is replaced only when ``writer`` wrote it (``is_own``) or with ``--overwrite``."""
    if path.is_dir():
        raise UserError(f"{output_flag} {path} is a directory; give the path of a file to write")
    if path.exists() and not is_own and not overwrite:
        raise UserError(f"{output_flag} {path} exists and was not written by {writer}; nothing was changed: choose "
                        "another path, or pass --overwrite to replace it")


def warn_leftover_partials(output: Path) -> None:
    """Name partial outputs an interrupted run left beside ``output`` (they can be large)."""
    parent = output.parent
    if not parent.is_dir():
        return
    leftovers = sorted(parent.glob(f".{output.name}{PARTIAL_MARK}*"))
    if leftovers:
        print(f"note: {len(leftovers)} partial output(s) of an interrupted run lie beside {output} "
              f"({leftovers[0]}{', ...' if len(leftovers) > 1 else ''}); delete them to free the space",
              file=sys.stderr)


@contextmanager
def staged_dir(output_dir: Path) -> Iterator[Path]:
    """A fresh temporary sibling to build ``output_dir`` in; renamed into place when the block
    finishes, removed when it raises (the previous ``output_dir`` is then untouched)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    warn_leftover_partials(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{PARTIAL_MARK}", dir=output_dir.parent))
    try:
        yield staging
        publish_dir(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_dir(staging: Path, output_dir: Path) -> None:
    """Move a finished ``staging`` directory to ``output_dir``, replacing what is there.

    Two renames (the old output aside, the new one in), then the old one is deleted: a crash
    between them leaves the previous output whole under ``.<name>.replaced-<pid>``."""
    if output_dir.exists():
        aside = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        output_dir.rename(aside)
        try:
            staging.rename(output_dir)
        except OSError:
            aside.rename(output_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(output_dir)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` through; renamed over ``path`` when the block
    finishes, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_umask())  # mkstemp makes it private; the output gets the usual mode
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)
