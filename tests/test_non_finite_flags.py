"""NaN and infinity for every float flag of every command: refused in one line naming the flag.

Range checks alone let NaN through (every comparison with NaN is False), and a NaN span length or
ratio can make a sampling loop spin forever; so the shared command-line parser refuses non-finite
values before any stage sees them. The flags are found from each command's own parser, so a float
flag added later is covered without editing this file.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib
import io

import pytest

from data_tools import cli
from data_tools.common import UserError
from tests.conftest import PROJECT_ROOT


def console_scripts() -> dict[str, str]:
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    entries = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in entry.split("=")) for entry in entries)


def command_parser(target: str, monkeypatch) -> argparse.ArgumentParser | None:
    """The parser a console script's main builds (None for a command with no config dataclass)."""
    module_name, function = target.split(":")
    seen = []

    def probe(config_cls, argv=None):
        seen.append(config_cls)
        raise UserError("probe")

    with monkeypatch.context() as patch, contextlib.redirect_stderr(io.StringIO()):  # the probe's own error line
        patch.setattr(cli, "parse_config", probe)
        getattr(importlib.import_module(module_name), function)([])
    return cli.build_parser(seen[0]) if seen else None


def float_flags() -> list[tuple[str, str]]:
    monkeypatch = pytest.MonkeyPatch()
    found = []
    for command, target in sorted(console_scripts().items()):
        parser = command_parser(target, monkeypatch)
        if parser is None:
            continue
        found += [(command, action.option_strings[0]) for action in parser._actions if action.type is float]
    return found


FLOAT_FLAGS = float_flags()


def required_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholders for the required flags: the finiteness check comes before any path is opened."""
    argv = []
    for action in parser._actions:
        if action.required:
            value = action.choices[0] if action.choices else "1" if action.type in (int, float) else "/nonexistent/x"
            argv += [action.option_strings[0], str(value)]
    return argv


def test_every_command_with_a_float_flag_is_covered():
    commands = {command for command, _ in FLOAT_FLAGS}
    assert {"zh-clean", "zh-mask", "zh-train", "zh-generate"} <= commands


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command, flag", FLOAT_FLAGS)
def test_non_finite_float_flags_are_refused_in_one_line(command, flag, value, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written; if it were, it would land here
    target = console_scripts()[command]
    parser = command_parser(target, monkeypatch)
    module_name, function = target.split(":")
    capsys.readouterr()
    argv = [*required_arguments(parser), f"{flag}={value}"]  # "=": argparse takes "-inf" alone for a flag
    status = getattr(importlib.import_module(module_name), function)(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert f"{flag} {value}" in lines[0] and "finite" in lines[0] and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def recipe_float_fields() -> list[str]:
    import dataclasses
    import typing

    from data_tools.masking.recipe import MaskRecipe

    hints = typing.get_type_hints(MaskRecipe)
    return [field.name for field in dataclasses.fields(MaskRecipe) if hints[field.name] is float]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", recipe_float_fields())
def test_non_finite_numbers_in_an_online_mask_config_are_refused(field, literal, clue_tokenized_dir, tmp_path):
    """Python's json reads NaN and Infinity literals: the trainer's and zh-evaluate's mask JSON refuses them."""
    from pipeline.examples import load_training_data

    config = tmp_path / "mask.json"
    config.write_text(f'{{"target": "bart", "{field}": {literal}}}', encoding="utf-8")
    with pytest.raises(UserError, match=rf"--online_mask_config {config}: {field} must be a finite number"):
        load_training_data(clue_tokenized_dir, config)
