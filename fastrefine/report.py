"""What a run shows a person: the per-round curves (curves.png) and the summary table (summary.md and
the terminal). Reads metrics.jsonl and done.json; writes nothing else."""

from __future__ import annotations

from pathlib import Path

from .runlog import read_metrics


def _step_positions(records: list[dict]) -> tuple[list[float], list[float]]:
    """(x in epochs, loss) of the step records: step i of epoch e at e + (i + 1) / steps of that epoch (the
    epoch records give each epoch's steps as the difference of their running step counts)."""
    epochs = {m["epoch"]: m for m in records if m.get("kind") == "epoch"}
    ends = sorted((e, m.get("step")) for e, m in epochs.items())
    per_epoch, prev = {}, 0
    for e, step in ends:
        if step is not None:
            per_epoch[e], prev = max(1, step - prev), step
    xs, ys = [], []
    for m in records:
        if m.get("kind") == "step" and "loss" in m and m.get("epoch") in per_epoch:
            xs.append(m["epoch"] + (m["step"] + 1) / per_epoch[m["epoch"]])
            ys.append(m["loss"])
    return xs, ys


def save_figure(fig, png: Path, **savefig) -> None:
    """A matplotlib figure as a PNG, written atomically (a reader never sees half a figure), then closed."""
    import matplotlib.pyplot as plt

    from .atomic import atomic_write
    try:
        atomic_write(Path(png), lambda fh: fig.savefig(fh, format="png", dpi=100, **savefig))
    finally:
        plt.close(fig)


def plot_curves(metrics_path: Path, png: Path, *, title: str) -> Path | None:
    """Train/val loss and top-1 per epoch, from metrics.jsonl, as a PNG: the step-level training loss
    behind the per-epoch means, epochs on integer ticks, the refinery's val top-1 as a line when the
    round had one."""
    records = read_metrics(metrics_path)
    epochs = [m for m in records if m.get("kind") == "epoch"]
    if not epochs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [m["epoch"] + 1 for m in epochs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    sx, sy = _step_positions(records)
    if sx:
        a.plot(sx, sy, "-", color="0.7", lw=0.8, label="train, every log_every steps")
    a.plot(x, [m["train_loss"] for m in epochs], "o-", label="train, epoch mean (its own loss)")
    vx = [m["epoch"] + 1 for m in epochs if "val_loss" in m]
    a.plot(vx, [m["val_loss"] for m in epochs if "val_loss" in m], "s-", label="val (cross-entropy)")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(fontsize=8), a.grid(alpha=0.3)
    b.plot(x, [100 * m["train_top1"] for m in epochs], "o-", label="train top-1 vs labels (crops)")
    b.plot(vx, [100 * m["val_top1"] for m in epochs if "val_top1" in m], "s-", label="val top-1")
    ref = [m for m in records if m.get("kind") == "refinery" and "val_top1" in m]
    if ref:
        b.axhline(100 * ref[-1]["val_top1"], color="tab:green", ls="--", lw=1, label="its refinery's val top-1")
    b.set_xlabel("epoch"), b.set_ylabel("%"), b.legend(fontsize=8), b.grid(alpha=0.3)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png)
    return png


def chain_rows(recipe, run_dir: Path) -> list[dict]:
    """One row per finished round in the order the chain figure shows them: recipe order, except that a
    round with `seed_from` joins the group of the round it is paired with (paired rounds side by side).
    Each row: the round's done.json plus `pair` (the group's first round) and `refinery_round`."""
    from .atomic import read_json_marker
    names = [r.name for r in recipe.rounds]
    group = {}
    for rd in recipe.rounds:
        group[rd.name] = group.get(rd.seed_from, rd.seed_from) if rd.seed_from else rd.name
    order = sorted(range(len(names)), key=lambda i: (names.index(group[names[i]]), i))
    rows = []
    for i in order:
        done = read_json_marker(run_dir / names[i] / "done.json")
        if done is None:
            continue
        ref = recipe.rounds[i].refinery
        rows.append({**done, "pair": group[names[i]], "refinery_round": ref if ref in names else None,
                     "refinery_spec": ref})
    return rows


def chain_markdown(rows: list[dict], *, title: str) -> str:
    lines = [f"# {title}: the chain", "",
             "Rounds in order; rounds that share initial weights and crops (`seed_from`) side by side. "
             "Top-1 in %: val on the val split, train on the augmented training crops against the labels; "
             "the refinery's val top-1 beside the round it refines. 'vs pair': val minus the val of the "
             "round this one is paired with (same start, same crops).", "",
             "| round | refinery | refinery val | val | train | train - val | paired with | vs pair |",
             "|---|---|---|---|---|---|---|---|"]
    by_name = {r["round"]: r for r in rows}
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in rows:
        partner = by_name.get(r["pair"]) if r["pair"] != r["round"] else None
        diff = f"{100 * (r['val_top1'] - partner['val_top1']):+.2f}" if partner else "-"
        gap = r["train_top1"] - r["val_top1"] if r.get("train_top1") is not None else None
        lines.append(f"| {r['round']} | {r['refinery_spec']} | {pct(r.get('refinery_val_top1'))} | "
                     f"{pct(r['val_top1'])} | {pct(r.get('train_top1'))} | {pct(gap)} | "
                     f"{r['pair'] if partner else '-'} | {diff} |")
    return "\n".join(lines) + "\n"


def plot_chain(rows: list[dict], png: Path, *, title: str) -> Path | None:
    """The chain as one picture: per round, its val and train top-1 with its refinery's val top-1 beside
    them; paired rounds (one `seed_from` group) on a shared band; an arrow from each refinery round to the
    round it refines, so the label progression reads left to right."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 * n + 1.5) + 2.2, 3.8))
    w = 0.26
    pos = {r["round"]: i for i, r in enumerate(rows)}
    vals = [100 * r["val_top1"] for r in rows]
    trains = [100 * r["train_top1"] if r.get("train_top1") is not None else float("nan") for r in rows]
    refs = [100 * r["refinery_val_top1"] if r.get("refinery_val_top1") is not None else float("nan") for r in rows]
    ax.bar([i - w for i in range(n)], refs, w, color="tab:green", alpha=0.55, label="its refinery's val top-1")
    ax.bar(range(n), vals, w, color="tab:blue", label="val top-1")
    ax.bar([i + w for i in range(n)], trains, w, color="tab:orange", alpha=0.8, label="train top-1 (crops, labels)")
    for i, v in enumerate(vals):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    # bands: consecutive rounds of one pairing group
    start = 0
    for i in range(1, n + 1):
        if i == n or rows[i]["pair"] != rows[start]["pair"]:
            if i - start > 1:
                ax.axvspan(start - 0.45, i - 1 + 0.45, color="0.92", zorder=0)
                ax.text((start + i - 1) / 2, 1, f"paired: same start and crops as {rows[start]['pair']}",
                        ha="center", va="bottom", fontsize=7, color="0.35", zorder=3,
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
            start = i
    top = max(v for v in vals + trains + refs if v == v)
    for r in rows:
        src = r.get("refinery_round")
        if src in pos and pos[src] != pos[r["round"]]:
            ax.annotate("", xy=(pos[r["round"]] - w, top + 4), xytext=(pos[src], top + 4),
                        arrowprops=dict(arrowstyle="->", color="tab:green", lw=1,
                                        connectionstyle="arc3,rad=-0.25"))
    ax.set_xticks(range(n), [f"{r['round']}\n({'labels' if r['refinery_spec'] == 'none' else 'by ' + r['refinery_spec']})"
                             for r in rows], fontsize=8)
    ax.set_ylim(0, min(100, top + 12) if top < 95 else 105)
    ax.set_ylabel("top-1 (%)"), ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title + ": arrows run from each refinery to the round it labels", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)
    return png


def write_chain(recipe, run_dir: Path) -> list[Path]:
    """runs/NAME/chain.md and chain.png from the finished rounds (atomic writes)."""
    from .atomic import write_text
    rows = chain_rows(recipe, run_dir)
    if not rows:
        return []
    title = recipe.run.name
    write_text(run_dir / "chain.md", chain_markdown(rows, title=title))
    out = [run_dir / "chain.md"]
    tmp = run_dir / ".chain.tmp.png"
    if plot_chain(rows, tmp, title=title):
        tmp.replace(run_dir / "chain.png")
        out.append(run_dir / "chain.png")
    return out


SUMMARY_COLUMNS = [("round", "round"), ("model", "model"), ("refinery", "refinery"), ("epochs", "ep"),
                   ("refinery_val_top1", "ref val"), ("train_top1", "train"),
                   ("val_top1", "val"), ("val_top5", "val top-5"), ("best_val_top1", "best val"),
                   ("ema_val_top1", "EMA val"),
                   ("gap", "gap"), ("minutes", "min")]


def _cell(key: str, value, row: dict | None = None) -> str:
    if value is None:
        return "-"
    if key == "val_top1" and row and row.get("val_batches"):  # run.max_val_batches cut the val pass
        return f"{100 * value:.2f}*"
    if key in ("refinery_val_top1", "train_top1", "val_top1", "val_top5", "best_val_top1", "ema_val_top1", "gap"):
        return f"{100 * value:.2f}"
    if key == "minutes":
        return f"{value:.1f}"
    return str(value)


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """SUMMARY_COLUMNS, less the EMA's when no round kept one (run.ema off)."""
    has_ema = any(r.get("ema_val_top1") is not None for r in rows)
    return [(k, h) for k, h in SUMMARY_COLUMNS if k != "ema_val_top1" or has_ema]


def summary_markdown(rows: list[dict], *, title: str) -> str:
    columns = _columns(rows)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "---|" * len(columns)
    lines = [f"# {title}", "", "Accuracies in %: the refinery's, and the student's train (on the augmented "
             "training crops, against the dataset's labels: the paper's train/test gap) and val top-1/top-5.",
             "", head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, r.get(k), r) for k, _ in columns) + " |")
    cut = cut_note(rows)
    return "\n".join(lines + ([""] + [cut] if cut else [])) + "\n"


def cut_note(rows: list[dict]) -> str:
    """The footnote of val figures marked *: e.g. "* val 64/80: ..." (empty when no val pass was cut)."""
    cut = [f"{r['round']} val {r['val_batches']}" for r in rows if r.get("val_batches")]
    if not cut:
        return ""
    return ("* " + ", ".join(cut) + " batches: run.max_val_batches cut the val pass, so these val figures cover "
            "part of the val split only")


# the screen table leaves out what fits only in summary.md (top-5, best) so that it reads in 80 columns
SCREEN_COLUMNS = ("round", "model", "refinery", "epochs", "refinery_val_top1", "train_top1", "val_top1",
                  "ema_val_top1", "gap", "minutes")


def summary_table(rows: list[dict], *, title: str):
    from rich import box
    from rich.table import Table
    from rich.text import Text
    caption = "accuracies in %; train: on augmented crops vs the labels"
    if cut_note(rows):
        caption += "\n" + cut_note(rows)
    # the title, caption and cells hold run and round names: Text, never parsed as markup (`exp[/]b`, `exp[v2]`)
    t = Table(title=Text(title, style="table.title"), caption=Text(caption, style="table.caption"),
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    columns = [(k, h) for k, h in _columns(rows) if k in SCREEN_COLUMNS]
    # the refinery's architecture is in summary.md; on screen its round or checkpoint is enough
    cells = [[_cell(k, r.get(k), r) if k != "refinery" else str(r.get(k, "-")).split(" (")[0]
              for k, _ in columns] for r in rows]
    for i, (key, h) in enumerate(columns):
        widest = max([len(h)] + [len(c[i]) for c in cells])
        text = key in ("round", "model", "refinery")
        t.add_column(h, justify="left" if text else "right", overflow="fold",
                     min_width=min(widest, 24) if text else widest)
    for row in cells:
        t.add_row(*(Text(c) for c in row))
    return t
