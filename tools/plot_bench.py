#!/usr/bin/env python
"""Plots from `fastrefine bench ... --json` files.

    tools/plot_bench.py loaders LOADER.json [...] --out docs/bench_loaders.png
    tools/plot_bench.py refinery STEP.json [...] --out docs/bench_refinery.png

loaders: images/s per backend (median, min-max bars), the torchvision baseline and the decode ceiling.
refinery: step time with a refinery / without (median, min-max) against F_refinery / F_student, with
the FLOPs bound 1 + F_r / (3 F_s) drawn as a line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(rec: dict) -> str:
    s = rec["settings"]
    return f"{Path(s['data']).name}, {s['resolution']} px, batch {s['batch_size']}"


def plot_loaders(paths: list[Path], out: Path) -> None:
    recs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(recs), figsize=(5.5 * len(recs), 3.8), squeeze=False)
    for ax, rec in zip(axes[0], recs):
        ok = [r for r in rec["results"] if r.get("ok")]
        names = [r["backend"].replace("torchvision-baseline", "torchvision\nbaseline") for r in ok]
        med = [r["images_per_s"]["median"] for r in ok]
        err = [[m - r["images_per_s"]["min"] for m, r in zip(med, ok)],
               [r["images_per_s"]["max"] - m for m, r in zip(med, ok)]]
        colors = ["tab:gray" if r["backend"] == "torchvision-baseline" else "tab:blue" for r in ok]
        ax.bar(names, med, yerr=err, capsize=4, color=colors)
        ceiling = rec["summary"].get("decode_ceiling_images_per_s")
        if ceiling:
            ax.axhline(ceiling, color="tab:red", ls="--", label=f"decode ceiling {ceiling:,.0f}/s")
            ax.legend(loc="upper right", fontsize=8)
        failed = rec["summary"].get("failed", {})
        if failed:
            ax.set_xlabel("failed: " + ", ".join(failed), fontsize=8)
        ax.set_ylabel("images/s (median, min-max of 3+)")
        ax.set_title(_label(rec), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"loaders alone, {recs[0]['settings']['device']}, {recs[0]['hardware']['cpus']} CPUs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_refinery(paths: list[Path], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xmax = 0.0
    for p in paths:
        rec = json.loads(p.read_text())
        s = rec["settings"]
        pts = [r for r in rec["results"] if "bound" in r]
        xs = [r["refinery_flops"] / r["student_flops"] for r in pts]
        base = rec["results"][0]["step_s"]["median"]
        ys = [r["measured_ratio"] for r in pts]
        lo = [y - r["step_s"]["min"] / base for y, r in zip(ys, pts)]
        hi = [r["step_s"]["max"] / base - y for y, r in zip(ys, pts)]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3,
                           label=f"{s['model']} @ {s['resolution']} px, batch {s['batch_size']}")
        for x, y, r in zip(xs, ys, pts):
            ax.annotate(r["refinery"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=line[0].get_color())
        xmax = max([xmax, *xs])
    grid = [i * xmax * 1.1 / 50 for i in range(51)]
    ax.plot(grid, [1 + g / 3 for g in grid], "k--", label="FLOPs bound 1 + F_r / (3 F_s)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("F_refinery / F_student (forward FLOPs)")
    ax.set_ylabel("step time with refinery / without")
    ax.set_title("refinery overhead in the train step (synthetic tensors)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["loaders", "refinery"])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    (plot_loaders if a.kind == "loaders" else plot_refinery)(a.json, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
