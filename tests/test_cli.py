"""The command line as a whole: every command's help explains every option and shows its default,
user errors exit with status 2 and one line, ``python -m qrs`` is the same program."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from qrs.cli import _expand_multi_value_options, app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)
LEAVES = sorted([name] if sub is None else [name, sub]
                for name, command in typer.main.get_command(app).commands.items()
                for sub in (getattr(command, "commands", None) or [None]))
"""Every command to run, as its words: ``score``, ``reviews export``..."""


def _option_blocks(output: str) -> dict[str, str]:
    """Help text per option name, joined across wrapped lines of the rich help panel."""
    blocks: dict[str, str] = {}
    names: list[str] = []
    for line in output.splitlines():
        match = re.match(r"[│|]\s+(?:\*\s+)?(--[\w-]+(?:,--[\w-]+)*)", line)
        if match:
            names = match.group(1).split(",")
        for name in names:
            blocks[name] = blocks.get(name, "") + " " + " ".join(line.strip("│| ").split())
    return blocks


def test_the_expected_commands_exist() -> None:
    assert COMMANDS == sorted(["synth", "prepare", "train", "evaluate", "calibrate", "extract", "analyze", "demo",
                               "score", "serve", "export", "repeat", "history", "reviews"])
    assert ["reviews", "export"] in LEAVES


@pytest.mark.parametrize("words", LEAVES, ids=" ".join)
def test_every_option_has_help_and_shows_its_default(words: list[str]) -> None:
    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    blocks = _option_blocks(result.output)
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    name = " ".join(words)
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.help, f"{name} {param.name} has no help"
            continue
        option = next(o for o in param.opts if o.startswith("--"))
        assert param.help, f"{name} {option} has no help"
        if not param.required and param.name != "help":
            assert re.search(r"[Dd]efault: ", blocks[option]), f"{name} {option}: {blocks[option]}"


def test_paper_style_multi_value_modes_are_expanded() -> None:
    assert _expand_multi_value_options(["extract", "--modes", "train", "test", "--batch_size", "8"]) == [
        "extract", "--modes", "train", "--modes", "test", "--batch_size", "8"]
    assert _expand_multi_value_options(["--modes", '["train",', '"test"]']) == [
        "--modes", '["train",', "--modes", '"test"]']


def test_python_dash_m_and_user_errors_exit_2(tmp_path) -> None:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-m", "qrs", "prepare", "--src", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: source directory {tmp_path / 'none'} does not exist"


@pytest.mark.parametrize("command", ["train", "calibrate", "extract"])
def test_option_defaults_are_the_librarys(command: str) -> None:
    """The CLI spells its defaults out (its --help must not import torch); they must be the Python API's."""
    import dataclasses

    from qrs.extract import ScoreOptions
    from qrs.train import TrainConfig

    config = TrainConfig if command == "train" else ScoreOptions
    library = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    shared = {p.name: p.default for p in typer.main.get_command(app).commands[command].params if p.name in library}
    assert len(shared) >= (20 if config is TrainConfig else 3)
    assert {k: library[k] for k in shared} == shared
