"""`misalign --version`, and `misalign <command> --help` for every command: a description, a
help text for every argument, and an example."""

from __future__ import annotations

import argparse
import tomllib

import pytest

import pipeline
from pipeline.cli import build_parser, main
from tests.helpers import ROOT


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pipeline.__version__ == version
    assert _help(["--version"], capsys).strip() == f"misalign {version}"


def test_the_commands_are_all_checked():
    assert {"predict", "report", "info", "weights", "protocol"} <= set(_commands())


@pytest.mark.parametrize("command", [None, *sorted(_commands())])
def test_help_has_a_description_argument_help_and_an_example(command, capsys):
    parser = build_parser() if command is None else _commands()[command]
    text = _help([command, "--help"] if command else ["--help"], capsys)
    assert parser.description and len(parser.description.split()) >= 8
    assert " ".join(parser.description.split()) in " ".join(text.split())
    undocumented = [
        a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        and not (a.help or "").strip()
    ]
    assert undocumented == [], f"arguments without help: {undocumented}"
    examples = text[text.index("\nexamples:\n") :].splitlines()[2:]
    runnable = [line.strip() for line in examples if line.startswith("  ")]
    assert runnable and all(line.startswith(("misalign", "eval ", "dvc ")) for line in runnable), (
        runnable
    )
    if command:
        assert any(f"misalign {command}" in line for line in runnable), runnable
    assert max(map(len, text.splitlines())) <= 100, "help lines fit a terminal"
