"""--help of every command: every option and argument described, placeholders in one style, nothing cut
off at 80 columns."""

import re

import pytest
import typer
from typer.testing import CliRunner

from fastrefine.cli import app

runner = CliRunner()
# a value's placeholder: upper-case words (N, PX, KEY=VALUE, IMG_PER_S, NAME|FILE) or the choices (val|train)
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*(=[A-Z]+)?(\|[A-Z][A-Z0-9_]*)*|[a-z0-9_]+(\|[a-z0-9_]+)+)$")


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer vendors click: no click import)
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


COMMANDS = sorted(_commands(typer.main.get_command(app)), key=lambda c: c[0])


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_parameter_is_described_with_a_placeholder_in_one_style(path, cmd):
    for param in cmd.params:
        where = f"fastrefine {' '.join(path)} {param.opts[0] if param.opts else param.name}"
        if param.param_type_name == "argument":
            assert param.metavar and PLACEHOLDER.match(param.metavar), f"{where}: metavar {param.metavar!r}"
            assert getattr(param, "help", None), f"{where}: no help"
            continue
        assert param.help and param.help.strip(), f"{where}: no help"
        if not param.is_flag:
            assert param.metavar and PLACEHOLDER.match(param.metavar), f"{where}: metavar {param.metavar!r}"


@pytest.mark.parametrize("path", [()] + sorted({p[:i] for p, _ in COMMANDS for i in range(1, len(p) + 1)}),
                         ids=lambda p: " ".join(p) or "fastrefine")
def test_help_fits_80_columns_without_cutting(path):
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
