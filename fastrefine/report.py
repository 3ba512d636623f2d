"""What a run shows a person: the per-round curves (curves.png) and the summary table (summary.md and
the terminal). Reads metrics.jsonl and done.json; writes nothing else."""

from __future__ import annotations

from pathlib import Path

from .runlog import read_metrics


def plot_curves(metrics_path: Path, png: Path, *, title: str) -> Path | None:
    """Train/val loss and top-1 per epoch, from metrics.jsonl, as a PNG."""
    epochs = [m for m in read_metrics(metrics_path) if m.get("kind") == "epoch"]
    if not epochs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["epoch"] + 1 for m in epochs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(x, [m["train_loss"] for m in epochs], "o-", label="train (its own loss)")
    vx = [m["epoch"] + 1 for m in epochs if "val_loss" in m]
    a.plot(vx, [m["val_loss"] for m in epochs if "val_loss" in m], "s-", label="val (cross-entropy)")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(x, [100 * m["train_top1"] for m in epochs], "o-", label="train top-1 vs labels")
    b.plot(vx, [100 * m["val_top1"] for m in epochs if "val_top1" in m], "s-", label="val top-1")
    b.set_xlabel("epoch"), b.set_ylabel("%"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


SUMMARY_COLUMNS = [("round", "round"), ("model", "model"), ("refinery", "refinery"), ("epochs", "ep"),
                   ("refinery_val_top1", "ref val"), ("train_top1", "train"),
                   ("val_top1", "val"), ("val_top5", "val top-5"), ("best_val_top1", "best val"),
                   ("ema_val_top1", "EMA val"),
                   ("gap", "gap"), ("minutes", "min")]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
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
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


# the screen table leaves out what fits only in summary.md (top-5, best) so that it reads in 80 columns
SCREEN_COLUMNS = ("round", "model", "refinery", "epochs", "refinery_val_top1", "train_top1", "val_top1",
                  "ema_val_top1", "gap", "minutes")


def summary_table(rows: list[dict], *, title: str):
    from rich import box
    from rich.table import Table
    t = Table(title=title, caption="accuracies in %; train: on augmented crops vs the labels",
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    columns = [(k, h) for k, h in _columns(rows) if k in SCREEN_COLUMNS]
    # the refinery's architecture is in summary.md; on screen its round or checkpoint is enough
    cells = [[_cell(k, r.get(k)) if k != "refinery" else str(r.get(k, "-")).split(" (")[0]
              for k, _ in columns] for r in rows]
    for i, (key, h) in enumerate(columns):
        widest = max([len(h)] + [len(c[i]) for c in cells])
        text = key in ("round", "model", "refinery")
        t.add_column(h, justify="left" if text else "right", overflow="fold",
                     min_width=min(widest, 24) if text else len(h))
    for row in cells:
        t.add_row(*row)
    return t
