"""The README's command list and recipe table, and the docs' option lists, kept in step with the code:
a command, an option or a recipe key without its line fails here. The CLI is read from the typer app,
the recipe keys from recipe.py's dataclasses."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest
import typer.main

from fastrefine.cli import app
from fastrefine.recipe import RecipeSpec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# where each command group's options are documented (the README's Commands block for the rest)
OPTION_DOCS = {"convert": "docs/convert.md", "bench": "docs/benchmarks.md"}


def readme_section(title: str) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


COMMANDS_BLOCK = readme_section("Commands")


def cli_commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, click command) of every command of the typer app, sub-commands of groups included."""
    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + (name,))
            else:
                yield prefix + (name,), cmd
    return list(walk(typer.main.get_command(app), ()))


def documented_commands() -> set[str]:
    """Every `fastrefine A B|C ...` of the Commands block as the paths it names: "A", "A B", "A C"."""
    paths = set()
    for line in COMMANDS_BLOCK.splitlines():
        words = line.split("#")[0].split()
        if "fastrefine" not in words:
            continue
        rest = words[words.index("fastrefine") + 1:]
        if rest and re.fullmatch(r"[a-z][a-z|-]*", rest[0]):
            paths.add(rest[0])
            if len(rest) > 1 and re.fullmatch(r"[a-z][a-z|-]*", rest[1]):
                paths.update(f"{rest[0]} {alt}" for alt in rest[1].split("|"))
    return paths


def long_options(cmd) -> list[str]:
    return [o for p in cmd.params if type(p).__name__ == "TyperOption" for o in p.opts if o.startswith("--")]


def test_every_command_has_a_line_in_the_readme():
    documented = documented_commands()
    missing = [" ".join(path) for path, _ in cli_commands() if " ".join(path) not in documented]
    assert not missing, f"README.md, ## Commands: no `fastrefine ...` line for {missing}"


def test_the_readme_names_no_command_that_does_not_exist():
    known = {" ".join(path[:k]) for path, _ in cli_commands() for k in (1, 2) if len(path) >= k}
    unknown = sorted(documented_commands() - known)
    assert not unknown, f"README.md, ## Commands names commands the CLI does not have: {unknown}"


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in cli_commands()])
def test_every_option_is_documented(path):
    cmd = dict((" ".join(p), c) for p, c in cli_commands())[path]
    group = path.split()[0]
    where = OPTION_DOCS.get(group, "README.md")
    text = (ROOT / where).read_text(encoding="utf-8") if group in OPTION_DOCS else COMMANDS_BLOCK
    missing = [o for o in long_options(cmd) if not re.search(re.escape(o) + r"(?![\w-])", text)]
    assert not missing, f"{where}: `fastrefine {path}` options not mentioned: {missing}"


def test_global_options_are_in_the_readme():
    top = typer.main.get_command(app)
    missing = [o for p in top.params for o in p.opts if o.startswith("--") and o not in COMMANDS_BLOCK]
    assert not missing, f"README.md, ## Commands: global options not mentioned: {missing}"


# ------------------------------------------------------------------------------------- recipe table

def recipe_rows() -> dict[str, str]:
    """{"run": row text, "loader.ffcv": ..., "rounds": ...} from the README's recipe table."""
    rows = {}
    for line in readme_section("Recipes").splitlines():
        m = re.match(r"\| `\[{1,2}([a-z_.]+)\]{1,2}` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def _dataclass_of(hint) -> type | None:
    """The dataclass a field holds (unwrapping Optional and list), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list):
        found = [_dataclass_of(a) for a in typing.get_args(hint)]
        return next((f for f in found if f is not None), None)
    return None


def recipe_keys() -> list[tuple[str, str, bool]]:
    """(row, key, nested): every recipe key with the table row it belongs to; nested keys (the fields of a
    sub-table written inline, like `progressive = {start, end}`) need only appear as words in the row."""
    out = []

    def add(row: str, cls: type, *, nested: bool, rows: dict) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            inner = _dataclass_of(hints[f.name])
            if inner is None:
                out.append((row, f.name, nested))
            elif f"{row}.{f.name}" in rows:
                add(f"{row}.{f.name}", inner, nested=False, rows=rows)
            else:
                out.append((row, f.name, nested))
                add(row, inner, nested=True, rows=rows)

    rows = recipe_rows()
    hints = typing.get_type_hints(RecipeSpec)  # the keys a recipe file may hold
    for f in dataclasses.fields(RecipeSpec):
        if not f.metadata.get("internal"):
            add(f.name, _dataclass_of(hints[f.name]), nested=False, rows=rows)
    return out


def test_every_recipe_key_is_in_the_readme_table():
    rows = recipe_rows()
    missing = []
    for row, key, nested in recipe_keys():
        text = rows.get(row, "")
        found = (re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", text) if nested
                 else re.search(rf"`{re.escape(key)}[` =]", text))
        if not found:
            missing.append(f"[{row}] {key}")
    assert not missing, f"README.md, ## Recipes table: keys without a mention: {missing}"


def test_the_recipe_table_has_no_row_for_a_section_that_does_not_exist():
    sections = {row for row, _, _ in recipe_keys()}
    assert set(recipe_rows()) <= sections, sorted(set(recipe_rows()) - sections)


def test_the_checks_themselves_catch_a_missing_line(monkeypatch):
    """The parsers find what they look for: without the `run` line the command check fails, and a key
    taken out of its row is reported."""
    global COMMANDS_BLOCK
    monkeypatch.setattr(__import__(__name__), "COMMANDS_BLOCK",
                        "\n".join(line for line in COMMANDS_BLOCK.splitlines() if "fastrefine run " not in line))
    assert "run" not in documented_commands()
    rows = recipe_rows()
    assert "`batch_size`" in rows["loader"] and "progressive" in rows["loader"]
    assert ("loader", "batch_size", False) in recipe_keys() and ("loader", "start", True) in recipe_keys()
    assert ("loader.ffcv", "decoder", False) in recipe_keys() and ("refinery", "epsilon", True) in recipe_keys()


def test_the_recipe_table_names_every_model():
    from fastrefine.models import list_models
    row = recipe_rows()["model"]
    missing = [m for m in list_models() if not re.search(rf"(?<![\w]){re.escape(m)}(?![\w])", row)]
    assert not missing, f"README.md, the [model] row of the recipe table does not name {missing}"
