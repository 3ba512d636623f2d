#!/usr/bin/env python
"""Compare finished rounds across run folders: one table, and optionally one plot of val top-1 per epoch.

    python tools/compare_runs.py runs/quickstart runs/other [--plot compare.png]
"""

import argparse
import sys
from pathlib import Path

from rich.console import Console

from fastrefine.report import summary_markdown, summary_table
from fastrefine.atomic import read_json_marker
from fastrefine.runlog import read_metrics


def rounds_of(run_dir: Path) -> list[tuple[str, dict, Path]]:
    """(label, done.json summary, metrics path) for each finished round, in recipe order when known."""
    out = []
    for done in sorted(run_dir.glob("*/done.json"), key=lambda p: p.stat().st_mtime):
        row = read_json_marker(done)
        if row is None:
            continue
        out.append((f"{run_dir.name}/{row['round']}", row, done.parent / "metrics.jsonl"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (runs/NAME)")
    ap.add_argument("--plot", type=Path, help="write val top-1 per epoch of every round to this PNG")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table instead of a rich one")
    a = ap.parse_args()
    found = []
    for r in a.runs:
        if not r.is_dir():
            print(f"error: {r}: not a folder", file=sys.stderr)
            return 2
        found += rounds_of(r)
    if not found:
        print("error: no finished rounds (done.json) under " + ", ".join(map(str, a.runs)), file=sys.stderr)
        return 2
    rows = [{**row, "round": label} for label, row, _ in found]
    if a.markdown:
        print(summary_markdown(rows, title="comparison"))
    else:
        Console().print(summary_table(rows, title="comparison"))
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, _, metrics in found:
            ep = [m for m in read_metrics(metrics) if m.get("kind") == "epoch" and "val_top1" in m]
            ax.plot([m["epoch"] + 1 for m in ep], [100 * m["val_top1"] for m in ep], "o-", label=label)
        ax.set_xlabel("epoch"), ax.set_ylabel("val top-1 (%)"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
