"""docs/layout.md stays the code's map: every module listed, no module that does not exist, and each
"asked by" entry of the owners table really imports the owner."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "docs" / "layout.md"


def _section(title: str) -> str:
    text = LAYOUT.read_text()
    start = text.index(title)
    nxt = text.find("\n## ", start + len(title))
    return text[start: nxt if nxt >= 0 else len(text)]


def _modules_on_disk() -> set[str]:
    out = set()
    for top in ("fastrefine", "loaders"):
        for p in (ROOT / top).rglob("*.py"):
            out.add(str(p.relative_to(ROOT)))
    return out


def _listed_modules() -> set[str]:
    text = _section("## Every module")
    out, top = set(), None
    for line in text.splitlines():
        m = re.fullmatch(r"`(fastrefine|loaders)/`.*", line.strip())
        if m:
            top = m.group(1)
            continue
        m = re.match(r"\| `([\w/]+\.py)` \|", line)
        if m and top:
            out.add(f"{top}/{m.group(1)}")
    return out


def test_every_module_is_on_the_map_and_every_module_on_it_exists():
    disk, listed = _modules_on_disk(), _listed_modules()
    assert not disk - listed, f"modules missing from docs/layout.md: {sorted(disk - listed)}"
    assert not listed - disk, f"docs/layout.md names modules that do not exist: {sorted(listed - disk)}"


def _imports(path: Path, owner: Path) -> bool:
    """Whether the file at `path` imports the module `owner` (absolute or relative import)."""
    name = owner.stem if owner.name != "__init__.py" else owner.parent.name
    pkg = owner.parent.name
    text = path.read_text()
    dotted = re.escape(name)
    patterns = [rf"from\s+[\w.]*\.{dotted}\s+import", rf"import\s+[\w.]*\.{dotted}\b",
                rf"from\s+\.+\s+import\s+[^\n]*\b{dotted}\b", rf"from\s+[\w.]*{re.escape(pkg)}\s+import\s+[^\n]*\b{dotted}\b"]
    if owner.name == "__init__.py":
        patterns.append(rf"from\s+[\w.]*\.?{dotted}\s+import")
    return any(re.search(p, text) for p in patterns)


def test_each_owner_is_imported_by_the_modules_said_to_ask_it():
    rows = [line for line in _section("## One owner per fact").splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 15
    wrong = []
    for row in rows:
        _, _fact, owner_cell, asked_cell, _ = row.split("|")
        owner = ROOT / re.search(r"`([\w/]+\.py)`", owner_cell).group(1)
        assert owner.is_file(), f"owner {owner} does not exist"
        for asked in re.findall(r"`([\w/]+(?:\.py|/))`", asked_cell):
            where = asked if asked.startswith(("fastrefine/", "loaders/", "tools/")) else (
                f"loaders/{asked[len('loaders/'):]}" if asked.startswith("loaders/") else f"fastrefine/{asked}")
            target = ROOT / where
            files = sorted(target.rglob("*.py")) if asked.endswith("/") else [target]
            assert files and all(f.is_file() for f in files), f"{where} (asked by, for {owner.name}) does not exist"
            if not any(_imports(f, owner) for f in files if f != owner):
                wrong.append(f"{where} does not import {owner.relative_to(ROOT)}")
    assert not wrong, "docs/layout.md's owners table is not what the code does:\n" + "\n".join(wrong)


def test_the_walk_of_one_batch_is_traced_from_the_loop_to_last_pt(capsys):
    """tools/walk.py traces a real refined round and sees the batch reach last.pt through the saver."""
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import walk
    import fastrefine.chain as chain
    import os
    before = chain.run_round, os.replace
    assert walk.main(["--edges"]) == 0
    assert (chain.run_round, os.replace) == before      # what the trace wrapped is put back
    out = capsys.readouterr().out
    counts = re.search(r"edges (\d+), module hops (\d+), modules (\d+), into round.py (\d+)", out)
    assert counts and 0 < int(counts.group(2)) < int(counts.group(1))
    for hop in ("fastrefine/engine.py:train_epoch -> fastrefine/engine.py:train_step",
                "fastrefine/engine.py:forward_backward -> fastrefine/refinery.py:Refinery.forward",
                "fastrefine/checkpoint.py:write -> fastrefine/atomic.py:atomic_write"):
        assert hop in out, hop
