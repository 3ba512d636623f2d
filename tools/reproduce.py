#!/usr/bin/env python
"""Small-scale reproduction of Label Refinery's three claims on Fashion-MNIST, through fastrefine's trainer.

    (a) self-refinement chain: a small net on labels (round 0), rounds 1..K each trained on the softmax
        of the previous round: val top-1 and train/val gap per round;
    (b) a stronger refinery: a bigger net on labels refines the small net, vs self-refinement (a, round 1);
    (c) adversarial jittering on vs off for one refined round (refinery: the chain's round 0).

Every comparison is paired: each refined round of (a), (b) and (c) has `seed_from = "labels"`, so it
starts from the same initial weights as the student's round on labels and draws the same crops (the
labels round of (b) and (c) is the chain's own, copied in); they differ only in what (a)/(b)/(c) change.
The refinery of (b) may train longer than the student (--big-epochs).

    .venv/bin/python tools/make_demo_data.py data/fm-2k --size 32 --limit-per-class 2000
    nice -n 5 .venv/bin/python tools/reproduce.py --data data/fm-2k --out runs/repro --seeds 0 1 2
    .venv/bin/python tools/reproduce.py --out runs/repro --report-only       # tables and plots again

Rerun with more --seeds / --epochs / --chain-rounds: finished rounds are skipped (fastrefine's resume).

--quickstart: the demo's protocol instead (recipes/quickstart.toml: a wider refinery, the student on
labels, the same student refined, paired by seed_from), one run per seed, plus a round "self" (the
student refined by its own labels round, also seed_from "labels"); prints the paired table.

    .venv/bin/python tools/reproduce.py --quickstart --seeds 0 1 2 --out runs/quickstart-seeds
Writes OUT/results.json and OUT/results.md (the tables), and with --docs DIR the plots DIR/results-*.png.

--scenes: the scene study instead (tools/scenes_study.py, its options follow): self-refinement chains,
crop vs whole-image refinery, jittering and the number of objects per scene, on tools/make_scenes.py data.

    .venv/bin/python tools/reproduce.py --scenes --objects 2 4 1 --seeds 0 1 2 --out runs/scenes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path

import torch

from fastrefine.recipe import recipe_from_dict
from fastrefine.chain import run_recipe


# --------------------------------------------------------------------------------------------- recipes

def base_recipe(a: argparse.Namespace, *, name: str, seed: int) -> dict:
    return {
        "run": {"name": name, "out": str(a.out), "seed": seed, "precision": "bf16", "log_every": 50,
                "eval_every": a.epochs,  # only the last epoch: saves a val pass an epoch
                "progress": False},
        "data": {"path": str(a.data)},
        "loader": {"backend": "torch", "batch_size": a.batch_size, "workers": a.workers,
                   "resolution": a.resolution, "val_crop_ratio": 1.0, "scale": list(a.scale), "flip": a.flip},
        "model": {"name": a.model, "options": {"width": a.width}},
        "optim": {"lr": a.lr, "lr_scaling": "none", "weight_decay": 5e-5, "nesterov": True},  # lr for this batch
        "schedule": {"kind": "triangular", "peak_epoch": max(1, a.epochs // 4)},
        "refinery": {"loss": "soft_ce", "bn": "eval", "use": "last",
                     "adversarial": {"fraction": 0.0, "epsilon": a.epsilon}},
        "rounds": [],
    }


def chain_recipe(a, seed: int) -> dict:
    r = base_recipe(a, name=f"chain-s{seed}", seed=seed)
    r["rounds"] = [{"name": "labels", "epochs": a.epochs, "refinery": "none"}]
    r["rounds"] += [{"name": f"refined-{k}", "epochs": a.epochs, "refinery": "previous", "seed_from": "labels"}
                    for k in range(1, a.chain_rounds + 1)]
    return r


def strong_recipe(a, seed: int) -> dict:
    r = base_recipe(a, name=f"strong-s{seed}", seed=seed)
    # round "labels" is the chain's own (copied in by share_round0, so it is skipped)
    r["rounds"] = [{"name": "labels", "epochs": a.epochs, "refinery": "none"},
                   {"name": "big-labels", "epochs": a.big_epochs or a.epochs, "refinery": "none",
                    "model": a.big_model, "model_options": {"width": a.big_width}},
                   {"name": "small-by-big", "epochs": a.epochs, "refinery": "big-labels", "seed_from": "labels"}]
    return r


def adv_recipe(a, seed: int) -> dict:
    r = base_recipe(a, name=f"adv-s{seed}", seed=seed)
    r["refinery"]["adversarial"]["fraction"] = a.adv_fraction
    # round 0 is the chain's own (copied in, so it is skipped); round 1 pairs with the chain's refined-1
    r["rounds"] = [{"name": "labels", "epochs": a.epochs, "refinery": "none"},
                   {"name": "refined-1-adv", "epochs": a.epochs, "refinery": "labels", "seed_from": "labels"}]
    return r


def run(raw: dict) -> list[dict]:
    return run_recipe(recipe_from_dict(raw, source=f"tools/reproduce.py:{raw['run']['name']}"))


def share_round0(a, seed: int, run_name: str) -> None:
    """Runs (b) and (c) reuse the chain's round 0 (done.json makes fastrefine skip it)."""
    src, dst = a.out / f"chain-s{seed}" / "labels", a.out / run_name / "labels"
    if not (dst / "done.json").is_file():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def quickstart_recipe(a, seed: int) -> dict:
    """recipes/quickstart.toml for one seed, with a self-refinement round added after it."""
    raw = tomllib.loads(Path(a.recipe).read_text())
    raw["run"].update(name=f"qs-s{seed}", out=str(a.out), seed=seed, progress=False)
    if a.data is not None:
        raw["data"]["path"] = str(a.data)
    labels = next(r for r in raw["rounds"] if r["name"] == "labels")
    raw["rounds"].append({"name": "self", "epochs": labels["epochs"], "refinery": "labels", "seed_from": "labels"})
    return raw


def quickstart_table(a, seeds: list[int]) -> str:
    rows = []
    for s in seeds:
        run_dir = a.out / f"qs-s{s}"
        names = ["refinery", "labels", "refined", "self"]
        if not all((run_dir / n / "done.json").is_file() for n in names):
            continue
        done = {n: json.loads((run_dir / n / "done.json").read_text()) for n in names}
        rows.append((s, {n: 100 * done[n]["val_top1"] for n in names}, {n: done[n]["minutes"] for n in names}))
    if not rows:
        return "no finished seeds\n"
    out = ["| seed | refinery | student on labels | student refined | paired gain | self-refined | self - labels | minutes (4 rounds) |",
           "|---|---|---|---|---|---|---|---|"]
    for s, v, m in rows:
        out.append(f"| {s} | {v['refinery']:.2f} | {v['labels']:.2f} | {v['refined']:.2f} | "
                   f"{v['refined'] - v['labels']:+.2f} | {v['self']:.2f} | {v['self'] - v['labels']:+.2f} | "
                   f"{sum(m.values()):.1f} |")
    col = lambda f: [f(v) for _, v, _ in rows]  # noqa: E731
    ms = lambda xs: "{:.2f} ± {:.2f}".format(*mean_sd(xs))  # noqa: E731
    out.append(f"| mean ± sd | {ms(col(lambda v: v['refinery']))} | {ms(col(lambda v: v['labels']))} | "
               f"{ms(col(lambda v: v['refined']))} | {ms(col(lambda v: v['refined'] - v['labels']))} | "
               f"{ms(col(lambda v: v['self']))} | {ms(col(lambda v: v['self'] - v['labels']))} | |")
    return "\n".join(out) + f"\n\nSeeds {[s for s, _, _ in rows]}; val top-1 in %; sd is the sample standard deviation.\n"


# -------------------------------------------------------------------------------------- measurement

def train_view(data: Path, out: Path) -> Path:
    """A folder whose val/ is the train split, so the val loader (centre crop, no flip) reads train images."""
    view = out / "_train-view"
    view.mkdir(parents=True, exist_ok=True)
    link = view / "val"
    if not link.exists():
        link.symlink_to(Path(data).resolve() / "train", target_is_directory=True)
    return view


def clean_top1(checkpoint: Path, data: Path, a) -> float:
    """top-1 of a checkpoint on `data`'s val/ folder with the val transform (whole image, no flip)."""
    from fastrefine.engine import evaluate
    from fastrefine.loaders import build
    from fastrefine.precision import resolve_precision
    from fastrefine.checkpoint import load_model
    model, _ = load_model(checkpoint, device=torch.device("cpu"))
    loader = build(data=data, backend="torch", split="val", batch_size=500, resolution=a.resolution,
                   device=torch.device("cpu"), workers=a.workers, val_crop_ratio=1.0)
    p = resolve_precision("bf16", torch.device("cpu"))
    return evaluate(model, loader, autocast=p.autocast)["top1"]


def round_record(a, run_name: str, round_name: str, view: Path) -> dict:
    rdir = a.out / run_name / round_name
    done = json.loads((rdir / "done.json").read_text())
    cache = rdir / "repro.json"
    if cache.is_file():
        extra = json.loads(cache.read_text())
    else:
        extra = {"train_clean_top1": clean_top1(rdir / "last.pt", view, a)}
        cache.write_text(json.dumps(extra))
    return {"val_top1": done["val_top1"], "train_aug_top1": done["train_top1"],
            "train_clean_top1": extra["train_clean_top1"], "minutes": done["minutes"],
            "refinery_val_top1": done.get("refinery_val_top1")}


# ------------------------------------------------------------------------------------------ report

def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], scale: float = 100) -> str:
    m, s = mean_sd([x * scale for x in xs])
    return f"{m:.2f} ± {s:.2f}"


def collect(a, seeds: list[int]) -> dict:
    """Finished rounds per seed; (b) and (c) keep only the seeds they ran for (and pair with those)."""
    view = train_view(a.data, a.out)
    chain_names = ["labels"] + [f"refined-{k}" for k in range(1, a.chain_rounds + 1)]
    done = lambda run_name, rnd: (a.out / run_name / rnd / "done.json").is_file()  # noqa: E731
    res = {"seeds": [s for s in seeds if all(done(f"chain-s{s}", n) for n in chain_names)],
           "chain": {n: [] for n in chain_names}, "b_seeds": [], "big": [], "small_by_big": [],
           "c_seeds": [], "adv": []}
    for s in res["seeds"]:
        for n in chain_names:
            res["chain"][n].append(round_record(a, f"chain-s{s}", n, view))
        if done(f"strong-s{s}", "small-by-big"):
            res["b_seeds"].append(s)
            res["big"].append(round_record(a, f"strong-s{s}", "big-labels", view))
            res["small_by_big"].append(round_record(a, f"strong-s{s}", "small-by-big", view))
        if done(f"adv-s{s}", "refined-1-adv"):
            res["c_seeds"].append(s)
            res["adv"].append(round_record(a, f"adv-s{s}", "refined-1-adv", view))
    return res


def _of(res: dict, rows: list[dict], seeds: list[int]) -> list[dict]:
    """The chain rows of `seeds` only (to pair with a part that ran for fewer seeds)."""
    return [r for s, r in zip(res["seeds"], rows) if s in seeds]


def tables(res: dict, a) -> str:
    col = lambda rows, key: [r[key] for r in rows]  # noqa: E731
    out = [f"Mean ± sample standard deviation over seeds; top-1 in %. Chain seeds: {res['seeds']}.", "",
           "**(a) Self-refinement chain** "
           f"({a.model} width {a.width}; round k+1 trained on round k's softmax of the same crop)", "",
           "| round | val top-1 | train top-1 (clean, vs labels) | gap train - val | train top-1 on crops | minutes |",
           "|---|---|---|---|---|---|"]
    for n, rows in res["chain"].items():
        gap = [t - v for t, v in zip(col(rows, "train_clean_top1"), col(rows, "val_top1"))]
        out.append(f"| {n} | {fmt(col(rows, 'val_top1'))} | {fmt(col(rows, 'train_clean_top1'))} | "
                   f"{fmt(gap)} | {fmt(col(rows, 'train_aug_top1'))} | {fmt(col(rows, 'minutes'), 1)} |")
    r0, r1 = res["chain"]["labels"], res["chain"]["refined-1"]
    diffs = lambda xs, ys: [x - y for x, y in zip(col(xs, "val_top1"), col(ys, "val_top1"))]  # noqa: E731
    per_seed = lambda d: ", ".join(f"{100 * x:+.2f}" for x in d)  # noqa: E731
    last = res["chain"][list(res["chain"])[-1]]
    out += ["", f"Paired gain refined-1 - labels: {fmt(diffs(r1, r0))} points (per seed: {per_seed(diffs(r1, r0))}); "
            f"last round - labels: {fmt(diffs(last, r0))} (per seed: {per_seed(diffs(last, r0))})."]
    if res["big"]:
        b0, b1 = _of(res, r0, res["b_seeds"]), _of(res, r1, res["b_seeds"])
        out += ["", f"**(b) Stronger refinery** ({a.big_model} width {a.big_width} on labels -> {a.model} width "
                f"{a.width}; refinery {a.big_epochs or a.epochs} epochs; seeds {res['b_seeds']})", "", "| model | val top-1 | gap train - val |", "|---|---|---|"]
        for label, rows in [(f"{a.big_model} w{a.big_width} on labels (the refinery)", res["big"]),
                            (f"{a.model} on labels", b0), (f"{a.model} refined by itself (a, refined-1)", b1),
                            (f"{a.model} refined by {a.big_model}", res["small_by_big"])]:
            gap = [t - v for t, v in zip(col(rows, "train_clean_top1"), col(rows, "val_top1"))]
            out.append(f"| {label} | {fmt(col(rows, 'val_top1'))} | {fmt(gap)} |")
        out += ["", f"Paired: by-big - by-itself {fmt(diffs(res['small_by_big'], b1))}; "
                f"by-big - labels {fmt(diffs(res['small_by_big'], b0))} points."]
    if res["adv"]:
        c1 = _of(res, r1, res["c_seeds"])
        out += ["", f"**(c) Adversarial jittering** (refined-1 of the chain; fraction {a.adv_fraction}, "
                f"epsilon {a.epsilon} pixel; seeds {res['c_seeds']})", "",
                "| refined-1 | val top-1 | gap train - val | minutes |", "|---|---|---|---|"]
        for label, rows in [("jittering off", c1), ("jittering on", res["adv"])]:
            gap = [t - v for t, v in zip(col(rows, "train_clean_top1"), col(rows, "val_top1"))]
            out.append(f"| {label} | {fmt(col(rows, 'val_top1'))} | {fmt(gap)} | {fmt(col(rows, 'minutes'), 1)} |")
        out += ["", f"Paired: on - off {fmt(diffs(res['adv'], c1))} points (per seed: {per_seed(diffs(res['adv'], c1))})."]
    return "\n".join(out) + "\n"


def plots(res: dict, a, docs: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    names = list(res["chain"])
    x = list(range(len(names)))
    val = [mean_sd([100 * r["val_top1"] for r in res["chain"][n]]) for n in names]
    gap = [mean_sd([100 * (r["train_clean_top1"] - r["val_top1"]) for r in res["chain"][n]]) for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for s_i, s in enumerate(res["seeds"]):
        ax1.plot(x, [100 * res["chain"][n][s_i]["val_top1"] for n in names], color="0.75", lw=1,
                 label="single seeds" if s_i == 0 else None)
    ax1.errorbar(x, [m for m, _ in val], yerr=[s for _, s in val], fmt="o-", capsize=4, label="mean ± sd")
    ax1.set_xticks(x, names), ax1.set_ylabel("val top-1 (%)"), ax1.grid(alpha=0.3), ax1.legend()
    ax1.set_title(f"(a) self-refinement: {a.model} w{a.width}")
    ax2.errorbar(x, [m for m, _ in gap], yerr=[s for _, s in gap], fmt="s-", color="tab:red", capsize=4)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(x, names), ax2.set_ylabel("train (clean) - val top-1 (points)"), ax2.grid(alpha=0.3)
    ax2.set_title("generalisation gap per round")
    fig.tight_layout()
    p1 = docs / "results-chain.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    out = [p1]
    if res["big"] or res["adv"]:
        bars = [("labels", res["chain"]["labels"]), ("by itself", res["chain"]["refined-1"])]  # all chain seeds
        if res["big"]:
            bars.append((f"by {a.big_model}", res["small_by_big"]))
        if res["adv"]:
            bars.append(("by itself\n+ adv. jitter", res["adv"]))
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        ms = [mean_sd([100 * r["val_top1"] for r in rows]) for _, rows in bars]
        ax.bar(range(len(bars)), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=5,
               color=["0.6", "tab:blue", "tab:green", "tab:orange"][:len(bars)])
        for i, (_, rows) in enumerate(bars):
            ax.plot([i] * len(rows), [100 * r["val_top1"] for r in rows], "k.", ms=5)
        lo = min(m - s for m, s in ms) - 1.5
        ax.set_ylim(lo, max(m + s for m, s in ms) + 1)
        ax.set_xticks(range(len(bars)), [f"{b}\n(n={len(rows)})" for b, rows in bars])
        ax.set_ylabel("val top-1 (%)"), ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"{a.model} w{a.width}: refined once, paired seeds")
        fig.tight_layout()
        p2 = docs / "results-refineries.png"
        fig.savefig(p2, dpi=100)
        plt.close(fig)
        out.append(p2)
    return out


# -------------------------------------------------------------------------------------------- main

def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None,
                    help="ImageFolder root (train/, val/); default data/fm-500, or the recipe's with --quickstart")
    ap.add_argument("--quickstart", action="store_true", help="run and report the demo's protocol per seed (see above)")
    ap.add_argument("--recipe", default="recipes/quickstart.toml", help="--quickstart: the recipe")
    ap.add_argument("--out", type=Path, default=Path("runs/repro"), help="run folders go here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", default="abc", help="which of a, b, c to run for these seeds (a always runs: b and c pair with it)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per round")
    ap.add_argument("--chain-rounds", type=int, default=3, help="refined rounds after round 0")
    ap.add_argument("--model", default="tiny_cnn")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--big-model", default="small_resnet")
    ap.add_argument("--big-width", type=int, default=32)
    ap.add_argument("--big-epochs", type=int, default=0, help="epochs of (b)'s refinery (0: --epochs)")
    ap.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip in training")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="RandomResizedCrop area range")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--adv-fraction", type=float, default=0.5)
    ap.add_argument("--epsilon", type=float, default=2.0, help="adversarial step in 0..255 pixel units")
    ap.add_argument("--docs", type=Path, default=None, help="write results-*.png and results-tables.md here")
    ap.add_argument("--report-only", action="store_true", help="only collect finished runs and report")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--scenes" in argv:  # the scene study: its own options (tools/scenes_study.py --help)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import scenes_study
        return scenes_study.main([x for x in argv if x != "--scenes"])
    a = parse(argv)
    a.out = a.out.resolve()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    if a.quickstart:
        if not a.report_only:
            for s in a.seeds:
                run(quickstart_recipe(a, s))
        text = quickstart_table(a, a.seeds)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "quickstart.md").write_text(text)
        print(text)
        print(f"wall clock of this call: {(time.perf_counter() - started) / 60:.2f} min")
        return 0
    a.data = a.data or Path("data/fm-500")
    if not a.report_only:
        for s in a.seeds:
            run(chain_recipe(a, s))
            if "b" in a.parts:
                share_round0(a, s, f"strong-s{s}")
                run(strong_recipe(a, s))
            if "c" in a.parts:
                share_round0(a, s, f"adv-s{s}")
                run(adv_recipe(a, s))
    train_minutes = (time.perf_counter() - started) / 60
    res = collect(a, a.seeds)
    res["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    res["wall_minutes_this_call"] = round((time.perf_counter() - started) / 60, 2)
    res["train_minutes_this_call"] = round(train_minutes, 2)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    text = tables(res, a)
    print(text)
    if a.docs:
        for p in plots(res, a, a.docs):
            print(f"wrote {p}")
    (a.out / "results.md").write_text(text)
    print(f"wall clock of this call: {res['wall_minutes_this_call']} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
