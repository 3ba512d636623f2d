#!/usr/bin/env python
"""The scene study: self-refinement where random crops miss the labelled object (docs/results.md).

Per regime K (objects per scene; data made by tools/make_scenes.py into DATA-ROOT/scenes-k{K}) and
per seed, recipes/scenes.toml is run with its rounds cut to --epochs:
    chain   labels -> refined (by labels) -> refined-2 (by refined), all from the same initial weights
            and on the same crops (seed_from = "labels");                       run scenes-k{K}-s{seed}
    image   refined-image: refined by the same labels round, refinery.view = "image" (the refinery sees
            the whole scene, the student its crop); the labels round is copied in.  run ...-image
    jitter  refined-adv: refined by labels with adversarial jittering on.       run ...-adv
--parts picks them per K: "main" K (the first of --objects) gets --main-parts, the others --other-parts.
Finished rounds are skipped, so a rerun with more seeds or parts only trains what is new.

Crop measurements (per K, `--measure`): over the training crops of epoch 0 at the recipe's scale (the
loader's own sampler), the share holding less than half of the labelled object's box, the share whose
label names the object covering most of the crop, and how often the labels round's (the refinery's)
top-1 on the crop names that object.

    .venv/bin/python tools/make_demo_data.py data/fm28 --size 28 --limit-per-class 1000
    for K in 1 2 4; do .venv/bin/python tools/make_scenes.py data/fm28 data/scenes-k$K --objects $K; done
    nice -n 10 .venv/bin/python tools/reproduce.py --scenes --objects 2 4 1 --seeds 0 1 2 --out runs/scenes
    .venv/bin/python tools/reproduce.py --scenes --objects 2 4 1 --seeds 0 1 2 --out runs/scenes --report-only --docs docs
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

from fastrefine.chain import run_recipe
from fastrefine.recipe import recipe_from_dict


DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_EPOCHS = 8


def _num(x: float) -> str:
    return f"{x:g}"


def tag(a, scale: tuple[float, float] | None = None) -> str:
    """What a run's name says of its regime beyond K and seed: empty for the recipe's own settings, so the
    main study's names stay `scenes-k{K}-s{seed}`; e.g. `-e24-w32-sc0.25-1` otherwise."""
    scale = tuple(scale or a.scale)
    out = ""
    if a.epochs != DEFAULT_EPOCHS:
        out += f"-e{a.epochs}"
    if a.width is not None:
        out += f"-w{a.width}"
    if scale != DEFAULT_SCALE:
        out += f"-sc{_num(scale[0])}-{_num(scale[1])}"
    return out


def run_name(a, k: int, seed: int, suffix: str = "", scale: tuple[float, float] | None = None) -> str:
    return f"scenes-k{k}{tag(a, scale)}-s{seed}{suffix}"


def recipe(a, *, k: int, seed: int, suffix: str = "", scale: tuple[float, float] | None = None) -> dict:
    raw = tomllib.loads(Path(a.recipe).read_text())
    raw["run"].update(name=run_name(a, k, seed, suffix, scale), out=str(a.out), seed=seed, progress=False,
                      eval_every=a.epochs)
    raw["data"]["path"] = str(a.data_root / f"scenes-k{k}{a.data_suffix}")
    raw["loader"]["scale"] = list(scale or a.scale)
    if a.width is not None:
        raw["model"]["options"] = {**raw["model"].get("options", {}), "width": a.width}
    for r in raw["rounds"]:
        r["epochs"] = a.epochs
    return raw


def run(raw: dict) -> None:
    run_recipe(recipe_from_dict(raw, source=f"tools/scenes_study.py:{raw['run']['name']}"))


def share_labels(a, k: int, seed: int, suffix: str) -> None:
    src = a.out / run_name(a, k, seed) / "labels"
    dst = a.out / run_name(a, k, seed, suffix) / "labels"
    if not (dst / "done.json").is_file():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def train_one(a, k: int, seed: int, parts: str) -> None:
    chain = recipe(a, k=k, seed=seed)
    if "2" not in parts:                     # no second refinement: labels and refined only
        chain["rounds"] = chain["rounds"][:2]
    if not a.skip_chain:
        run(chain)
    labels = chain["rounds"][0]
    if "i" in parts:
        raw = recipe(a, k=k, seed=seed, suffix="-image")
        raw["refinery"]["view"] = "image"
        raw["rounds"] = [labels, {"name": "refined-image", "epochs": a.epochs, "refinery": "labels",
                                  "seed_from": "labels"}]
        share_labels(a, k, seed, "-image")
        run(raw)
    if "j" in parts:
        raw = recipe(a, k=k, seed=seed, suffix="-adv")
        raw["refinery"]["adversarial"] = {"fraction": a.adv_fraction, "epsilon": a.epsilon}
        raw["rounds"] = [labels, {"name": "refined-adv", "epochs": a.epochs, "refinery": "labels",
                                  "seed_from": "labels"}]
        share_labels(a, k, seed, "-adv")
        run(raw)


def train_scales(a, k: int, seed: int) -> None:
    """The crop-scale regime: labels and refined at each of --extra-scales (the main K only)."""
    for sc in a.extra_scales:
        raw = recipe(a, k=k, seed=seed, scale=sc)
        raw["rounds"] = raw["rounds"][:2]
        run(raw)


# ------------------------------------------------------------------------------ crop measurements

def _intersection(box, crop) -> float:
    x0, y0, x1, y1 = box
    top, left, h, w = crop
    iw = min(x1, left + w) - max(x0, left)
    ih = min(y1, top + h) - max(y0, top)
    return max(iw, 0) * max(ih, 0)


def measure_crops(a, k: int, seed: int = 0, limit: int = 2000, scale: tuple[float, float] | None = None) -> dict:
    """Epoch-0 training crops of the first `limit` scenes (the torch loader's sampler and resize, seed of
    round "labels" of run scenes-k{k}-s{seed}): label-crop mismatch, and the labels round's top-1 on them."""
    from fastrefine.loaders import build
    from fastrefine.loaders.crop_sampler import train_crops
    from fastrefine.loaders.torch import _Samples
    from fastrefine.recipe import round_seed
    from fastrefine.checkpoint import load_model

    data = a.data_root / f"scenes-k{k}{a.data_suffix}"
    manifest = json.loads((data / "scenes.json").read_text())
    by_file = {r["file"]: r for r in manifest["splits"]["train"]}
    rec = recipe_from_dict(recipe(a, k=k, seed=seed))
    ld = build(data=data, backend="torch", split="train", batch_size=1, resolution=rec.loader.resolution,
               device=torch.device("cpu"), workers=0, seed=round_seed(rec, 0), scale=scale or rec.loader.scale,
               ratio=rec.loader.ratio, flip=rec.loader.flip)
    ckpt = a.out / run_name(a, k, seed) / "labels" / "last.pt"
    model = load_model(ckpt, device=torch.device("cpu"))[0].eval() if ckpt.is_file() else None
    ds = _Samples(ld.table, ld.opts, decode_here=True)
    ds.set_epoch(0, ld.opts.resolution)
    half = label_names_dominant = ref_names_dominant = ref_names_label = empty = 0
    n = min(limit, len(ld.table))
    batch, dominant, labels = [], [], []
    size = manifest["size"]
    for i in range(n):
        rel = str(Path(ld.table.files[i]).relative_to(data.resolve() if Path(ld.table.files[i]).is_absolute() else data))
        scene = by_file[rel]
        crop = tuple(int(v) for v in train_crops(ld.opts, epoch=0, indices=[i], heights=size, widths=size)[0][0])
        objs = scene["objects"]
        labelled = next(o for o in objs if o["class"] == scene["label"])
        area = (labelled["box"][2] - labelled["box"][0]) * (labelled["box"][3] - labelled["box"][1])
        half += _intersection(labelled["box"], crop) < 0.5 * area
        cover = [_intersection(o["box"], crop) for o in objs]
        if max(cover) == 0:
            empty += 1
            dom = -1
        else:
            dom = objs[max(range(len(objs)), key=lambda j: cover[j])]["class"]
        label_names_dominant += dom == scene["label"]
        if model is not None:
            x, _ = ds[i]
            batch.append(x)
            dominant.append(dom)
            labels.append(scene["label"])
    out = {"k": k, "crops": n, "scale": list(ld.opts.scale), "below_half_of_labelled": half / n,
           "no_object": empty / n, "label_is_dominant": label_names_dominant / n}
    if model is not None:
        x = torch.stack(batch).float()
        norm = ld.normalization
        mean = torch.tensor(norm.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(norm.std).view(1, 3, 1, 1) * 255
        with torch.inference_mode():
            top1 = torch.cat([model((xb - mean) / std).argmax(1) for xb in x.split(250)]).tolist()
        has = [j for j, d in enumerate(dominant) if d >= 0]
        out["refinery_names_dominant"] = sum(top1[j] == dominant[j] for j in has) / max(1, len(has))
        out["refinery_names_label"] = sum(t == y for t, y in zip(top1, labels)) / n
        mism = [j for j in has if dominant[j] != labels[j]]
        out["refinery_names_dominant_where_label_is_not"] = (sum(top1[j] == dominant[j] for j in mism)
                                                              / max(1, len(mism)))
        out["mismatched_crops"] = len(mism)
    ld.close()
    return out


# ------------------------------------------------------------------------------------------ report

def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ms(xs, scale=100.0) -> str:
    if not xs:
        return "-"
    m, s = mean_sd([scale * x for x in xs])
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f} (1 seed)"


def done(a, run_name: str, rnd: str) -> dict | None:
    p = a.out / run_name / rnd / "done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def collect(a) -> dict:
    res = {}
    for k in a.objects:
        rows = {}
        for s in a.seeds:
            base = run_name(a, k, s)
            got = {"labels": done(a, base, "labels"), "refined": done(a, base, "refined"),
                   "refined-2": done(a, base, "refined-2"), "refined-image": done(a, base + "-image", "refined-image"),
                   "refined-adv": done(a, base + "-adv", "refined-adv")}
            rows[s] = {n: d for n, d in got.items() if d is not None}
        res[k] = rows
    return res


def collect_scales(a) -> dict:
    """{scale: {seed: {"labels": done, "refined": done}}} for the main K, the main scale first."""
    k = a.objects[0]
    out = {}
    for sc in [tuple(a.scale)] + list(a.extra_scales):
        out[sc] = {}
        for s in a.seeds:
            got = {n: done(a, run_name(a, k, s, scale=sc), n) for n in ("labels", "refined")}
            out[sc][s] = {n: d for n, d in got.items() if d is not None}
    return out


def scale_table(a, by_scale: dict, measures: dict) -> list[str]:
    k = a.objects[0]
    rows = []
    for sc, per_seed in by_scale.items():
        seeds = [s for s in a.seeds if {"labels", "refined"} <= set(per_seed[s])]
        if not seeds:
            continue
        lab = [per_seed[s]["labels"]["val_top1"] for s in seeds]
        ref = [per_seed[s]["refined"]["val_top1"] for s in seeds]
        g = [y - x for x, y in zip(lab, ref)]
        m = measures.get(f"{k} {list(sc)}", {})
        below = f"{100 * m['below_half_of_labelled']:.1f}" if "below_half_of_labelled" in m else "-"
        rows.append(f"| [{_num(sc[0])}, {_num(sc[1])}] | {below} | {len(seeds)} | {ms(lab)} | {ms(ref)} | {ms(g)} | "
                    f"{', '.join(f'{100 * x:+.2f}' for x in g)} |")
    if len(rows) < 2:
        return []
    return [f"**Crop scale** (K = {k}; labels and refined trained at each RandomResizedCrop area range, paired; "
            "val top-1, %)", "",
            "| scale | crops < half of the labelled object | seeds | labels | refined | paired gain | per seed |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def budget_table(a, budgets: list[tuple[int, int | None]]) -> list[str]:
    """The training-budget regime (main K): per (epochs, width), labels vs refined (and refined-2), paired."""
    k, rows = a.objects[0], []
    for epochs, width in budgets:
        b = argparse.Namespace(**{**vars(a), "epochs": epochs, "width": width})
        per = {s: {n: done(b, run_name(b, k, s), n) for n in ("labels", "refined", "refined-2")} for s in a.seeds}
        seeds = [s for s in a.seeds if per[s]["labels"] and per[s]["refined"]]
        if not seeds:
            continue
        lab = [per[s]["labels"]["val_top1"] for s in seeds]
        g = [per[s]["refined"]["val_top1"] - per[s]["labels"]["val_top1"] for s in seeds]
        gap = [per[s]["labels"]["train_top1"] - per[s]["labels"]["val_top1"] for s in seeds]
        s2 = [s for s in seeds if per[s]["refined-2"]]
        g2 = [per[s]["refined-2"]["val_top1"] - per[s]["labels"]["val_top1"] for s in s2]
        minutes = statistics.mean(per[s]["labels"]["minutes"] for s in seeds)
        shown = width if width is not None else f"{recipe(b, k=k, seed=seeds[0])['model']['options'].get('width', '-')} (recipe)"
        rows.append(f"| {epochs} | {shown} | {len(seeds)} | {ms(lab)} | "
                    f"{ms(gap)} | {ms(g)} | {', '.join(f'{100 * x:+.2f}' for x in g)} | "
                    f"{ms(g2) if g2 else '-'} | {minutes:.1f} |")
    if not rows:
        return []
    return [f"**Training budget** (K = {k}; {a.data_root / f'scenes-k{k}{a.data_suffix}'}; top-1 on its val split, %; "
            "paired gains)", "",
            "| epochs | width | seeds | labels | labels: train - val | refined - labels | per seed | "
            "refined-2 - labels | minutes a labels round (wall clock, under load) |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def tables(a, res: dict, measures: dict) -> str:
    out = []
    for k in a.objects:
        rows = res[k]
        seeds = [s for s in a.seeds if "labels" in rows[s] and "refined" in rows[s]]
        if not seeds:
            continue
        out += [f"**K = {k}** (seeds {seeds}; val top-1 and train top-1 on the crops, %; mean ± sd)", "",
                "| round | val top-1 | train top-1 (crops) | train - val | paired gain vs labels (val) | per seed |",
                "|---|---|---|---|---|---|"]
        for n in ("labels", "refined", "refined-2", "refined-image", "refined-adv"):
            ss = [s for s in seeds if n in rows[s]]
            if not ss:
                continue
            v = [rows[s][n]["val_top1"] for s in ss]
            t = [rows[s][n]["train_top1"] for s in ss]
            g = [rows[s][n]["val_top1"] - rows[s]["labels"]["val_top1"] for s in ss]
            per = ", ".join(f"{100 * x:+.2f}" for x in g) if n != "labels" else "-"
            out.append(f"| {n} (n={len(ss)}) | {ms(v)} | {ms(t)} | {ms([x - y for x, y in zip(t, v)])} | "
                       f"{ms(g) if n != 'labels' else '-'} | {per} |")
        both = [s for s in seeds if "refined-image" in rows[s]]
        if both:
            d = [rows[s]["refined"]["val_top1"] - rows[s]["refined-image"]["val_top1"] for s in both]
            out += ["", f"Crop view minus image view (paired, seeds {both}): {ms(d)} points "
                    f"(per seed {', '.join(f'{100 * x:+.2f}' for x in d)})."]
        adv = [s for s in seeds if "refined-adv" in rows[s]]
        if adv:
            d = [rows[s]["refined-adv"]["val_top1"] - rows[s]["refined"]["val_top1"] for s in adv]
            out += ["", f"Jittering on minus off (paired, seeds {adv}): {ms(d)} points "
                    f"(per seed {', '.join(f'{100 * x:+.2f}' for x in d)})."]
        out.append("")
    out += scale_table(a, collect_scales(a), measures)
    out += budget_table(a, a.budgets)
    if measures:
        out += ["**Crops** (epoch-0 training crops of 2,000 scenes at the recipe's scale; refinery: the labels "
                "round of seed 0)", "",
                "| K | scale | crops < half of the labelled object | crops with no object | label names the "
                "object covering most of the crop | refinery's top-1 names it | ... where the label does not | "
                "refinery's top-1 = label |", "|---|---|---|---|---|---|---|---|"]
        for m in measures.values():
            k = m["k"]
            p = lambda key: f"{100 * m[key]:.1f}" if key in m else "-"  # noqa: E731
            if not m.get("mismatched_crops"):    # K = 1: a crop's object is always the labelled one
                m = {key: v for key, v in m.items() if key != "refinery_names_dominant_where_label_is_not"}
            out.append(f"| {k} | {m['scale']} | {p('below_half_of_labelled')} | {p('no_object')} | "
                       f"{p('label_is_dominant')} | {p('refinery_names_dominant')} | "
                       f"{p('refinery_names_dominant_where_label_is_not')} | {p('refinery_names_label')} |")
    return "\n".join(out) + "\n"


def plot(a, res: dict, png: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["labels", "refined", "refined-2", "refined-image", "refined-adv"]
    ks = [k for k in a.objects if any("refined" in res[k][s] for s in a.seeds)]
    if not ks:
        return None
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        rows = res[k]
        shown = [n for n in names if any(n in rows[s] for s in a.seeds)]
        for j, n in enumerate(shown):
            ss = [s for s in a.seeds if n in rows[s]]
            v = [100 * rows[s][n]["val_top1"] for s in ss]
            t = [100 * rows[s][n]["train_top1"] for s in ss]
            m, sd = mean_sd(v)
            ax.bar(j - 0.2, m, 0.4, yerr=sd, capsize=3, color="tab:blue", label="val top-1" if j == 0 else None)
            tm, tsd = mean_sd(t)
            ax.bar(j + 0.2, tm, 0.4, yerr=tsd, capsize=3, color="tab:orange", alpha=0.8,
                   label="train top-1 (crops)" if j == 0 else None)
            ax.plot([j - 0.2] * len(v), v, "k.", ms=4)
        ax.set_xticks(range(len(shown)), [n.replace("refined-", "refined-\n") for n in shown], fontsize=8)
        lo = min(100 * rows[s][n]["train_top1"] for s in a.seeds for n in shown if n in rows[s])
        ax.set_ylim(max(0, lo - 8), None)
        ax.set_title(f"K = {k} objects per scene (n = {len([s for s in a.seeds if 'labels' in rows[s]])} seeds)",
                     fontsize=9)
        ax.set_ylabel("top-1 (%)"), ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Scenes: self-refinement, paired rounds (same start, same crops); mean ± sd, dots = seeds",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# -------------------------------------------------------------------------------------------- main

def _scale_arg(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, e.g. 0.25,1") from None
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < LO <= HI <= 1")
    return lo, hi


def _budget_arg(text: str) -> tuple[int, int | None]:
    try:
        epochs, _, width = text.partition(":")
        return int(epochs), (int(width) if width else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected EPOCHS or EPOCHS:WIDTH, e.g. 24:32") from None


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/scenes.toml")
    ap.add_argument("--data-root", type=Path, default=Path("data"), help="holds scenes-k{K} (tools/make_scenes.py)")
    ap.add_argument("--data-suffix", default="", help="e.g. -hold: data/scenes-k{K}-hold (held-out protocol runs)")
    ap.add_argument("--out", type=Path, default=Path("runs/scenes"))
    ap.add_argument("--objects", type=int, nargs="+", default=[2, 4, 1], help="regimes K; the first is the main one")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8, help="epochs of every round")
    ap.add_argument("--scale", type=float, nargs=2, default=DEFAULT_SCALE, help="RandomResizedCrop area range")
    ap.add_argument("--extra-scales", nargs="*", default=[], metavar="LO,HI", type=_scale_arg,
                    help="the crop-scale regime: also train labels and refined at these area ranges (main K only)")
    ap.add_argument("--width", type=int, default=None, help="tiny_cnn width (not set: the recipe's)")
    ap.add_argument("--budgets", nargs="*", default=[], metavar="EPOCHS:WIDTH", type=_budget_arg,
                    help="report: also a table of the training-budget regime over these runs (WIDTH may be "
                         "left out for the recipe's), e.g. 8 24 24:32 48:32")
    ap.add_argument("--main-parts", default="2i", help="main K: 2 = refined-2, i = image view, j = jitter")
    ap.add_argument("--other-parts", default="", help="other K: the same letters (labels and refined always run)")
    ap.add_argument("--adv-fraction", type=float, default=0.5)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--measure", action="store_true", help="also measure the crops (needs the labels rounds)")
    ap.add_argument("--measure-scales", nargs="*", default=[], metavar="LO,HI", type=_scale_arg,
                    help="with --measure: also measure the crops at these area ranges (e.g. 0.08,0.25 0.25,1)")
    ap.add_argument("--skip-chain", action="store_true",
                    help="run only the image/jitter parts (their labels round must be finished)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--docs", type=Path, default=None, help="write results-scenes.png here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    a.out = a.out.resolve()
    started = time.perf_counter()
    if not a.report_only:
        for k in a.objects:
            for s in a.seeds:
                train_one(a, k, s, a.main_parts if k == a.objects[0] else a.other_parts)
                if k == a.objects[0]:
                    train_scales(a, k, s)
    measures = {}
    stored = a.out / "crops.json"            # the last measurement, kept apart (measuring takes minutes)
    if not a.measure and stored.is_file():
        measures = json.loads(stored.read_text())
    if a.measure:
        for k in a.objects:
            for sc in [None] + list(a.measure_scales):
                m = measure_crops(a, k, scale=sc)
                measures[f"{k} {m['scale']}"] = m
        a.out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(measures, indent=1))
    res = collect(a)
    text = tables(a, res, measures)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scenes.md").write_text(text)
    (a.out / "scenes.json").write_text(json.dumps({"runs": {str(k): v for k, v in res.items()},
                                                  "crops": measures, "settings": {k: str(v) for k, v in vars(a).items()}},
                                                 indent=1))
    print(text)
    if a.docs:
        print("wrote", plot(a, res, a.docs / "results-scenes.png"))
    print(f"wall clock of this call: {(time.perf_counter() - started) / 60:.2f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
