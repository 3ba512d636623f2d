"""The `fastrefine` command line (typer).

Exit codes: 0 ok; 2 bad usage or a bad recipe; 1 a failure at run time. Errors print one line;
`fastrefine --debug ...` prints the traceback too.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import FastRefineError, UsageError

app = typer.Typer(
    name="fastrefine",
    help="Label Refinery at fast-ImageNet speed: convert datasets, run refinement chains, benchmark.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
convert_app = typer.Typer(help="Convert an image dataset into FFCV .beton files and DALI webdataset shards.",
                          no_args_is_help=True)
bench_app = typer.Typer(help="Throughput on this node: decode ceiling, loaders, train step, end to end.",
                        no_args_is_help=True)
app.add_typer(convert_app, name="convert")
app.add_typer(bench_app, name="bench")

err = Console(stderr=True)
out = Console()


def _debug(ctx: typer.Context | None) -> bool:
    while ctx is not None:
        if ctx.obj and "debug" in ctx.obj:
            return bool(ctx.obj["debug"])
        ctx = ctx.parent
    return False


def handle_errors(fn):
    """Turn FastRefineError (and anything else) into one line on stderr and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click_ctx()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except FastRefineError as e:
            if _debug(ctx):
                err.print_exception()
            print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except Exception as e:  # a run-time failure we did not foresee: still one line, exit 1
            if _debug(ctx):
                err.print_exception()
            print_error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def print_error(message: str) -> None:
    """One line on stderr, as plain text: never rich markup (a DALI message's `[/...]` source location,
    a path like `dir[bold]x` or `got [1.0, 0.5]` print as they are), never terminal colour codes."""
    import re
    import sys
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", worker_error(message)).replace("\r", " ").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    one = lines[0] if lines else "(no message)"
    if len(lines) > 1:
        one += " | " + " | ".join(lines[1:4]) + (" ..." if len(lines) > 4 else "")
    sys.stderr.write(f"error: {one}\n")
    sys.stderr.flush()


def worker_error(message: str) -> str:
    """A DataLoader worker's error as its own message: torch re-raises it in the main process as
    "Caught E in DataLoader worker process N.\nOriginal Traceback ...\nmodule.E: the message", whose first
    lines say nothing of the file; the original message comes first, then where it was caught."""
    import re
    m = re.match(r"Caught (\w+) (in DataLoader worker process \d+)\.\s*\nOriginal Traceback", message)
    if not m:
        return message
    lines = message.rstrip().splitlines()
    for i in range(len(lines) - 1, 0, -1):  # the traceback's last "Type: message" line (may span lines)
        head = re.match(rf"^(?:[\w.]+\.)?{m.group(1)}: ?(.*)$", lines[i])
        if head:
            original = " ".join([head.group(1)] + [ln.strip() for ln in lines[i + 1:]]).strip()
            return f"{original or m.group(1)} ({m.group(2)})"
    return message


def click_ctx():
    try:  # typer < 0.20 depends on click; newer typer vendors it
        from click import get_current_context
    except ImportError:
        from typer._click.globals import get_current_context
    return get_current_context(silent=True)


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Print full tracebacks on errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors in the log.")):
    ctx.obj = {"debug": debug}
    if err.is_terminal:
        from rich.logging import RichHandler
        handler, fmt = RichHandler(console=err, show_path=False, markup=False), "%(message)s"
    else:  # a log file or a pipe: one plain line per message, not wrapped at 80 columns
        handler, fmt = logging.StreamHandler(), "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=fmt, handlers=[handler], force=True)


# ------------------------------------------------------------------------------------------ convert

def _convert(layout: str, src: Path, dst: Path, fmt: str, max_side: int, quality: int, workers: Optional[int],
             splits: str, limit_per_class: Optional[int], force: bool, ffcv_mode: str, shard_size: int,
             progress: bool, strict: bool = False) -> None:
    from .convert import convert_dataset
    formats = ("ffcv", "dali") if fmt == "both" else (fmt,)
    if fmt not in ("ffcv", "dali", "both"):
        raise UsageError(f"--format: expected ffcv, dali or both, got {fmt!r}")
    split_list = tuple(s.strip() for s in splits.split(",") if s.strip())
    bad = [s for s in split_list if s not in ("train", "val")]
    if bad or not split_list:
        raise UsageError(f"--splits: expected a comma list of train,val, got {splits!r}")
    convert_dataset(src=src, out=dst, layout=layout, formats=formats, max_side=max_side, quality=quality,
                    workers=workers, splits=split_list, limit_per_class=limit_per_class, force=force,
                    ffcv_mode=ffcv_mode, shard_size=shard_size, progress=progress, strict=strict)


_FMT = typer.Option("both", "--format", metavar="ffcv|dali|both", help="ffcv, dali or both.")
_MAXSIDE = typer.Option(256, "--max-side", min=16, metavar="PX", help="Longer side of the re-encoded JPEGs (never upscaled).")
_QUALITY = typer.Option(90, "--quality", min=1, max=100, metavar="Q", help="JPEG quality of the re-encoded images.")
_WORKERS = typer.Option(None, "--workers", min=1, metavar="N", help="Processes (default: all cores).")
_SPLITS = typer.Option("train,val", "--splits", metavar="LIST", help="Which splits to convert: train, val or both (a comma list).")
_LIMIT = typer.Option(None, "--limit-per-class", min=1, metavar="K", help="At most K images per class (quick subsets).")
_FORCE = typer.Option(False, "--force", help="Redo everything, overwriting OUT.")
_MODE = typer.Option("proportion", "--ffcv-mode", metavar="MODE", help="FFCV RGBImageField write_mode: jpg, proportion, smart or raw.")
_SHARD = typer.Option(1000, "--shard-size", min=1, metavar="N", help="Images per DALI webdataset shard.")
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Progress bars.")
_STRICT = typer.Option(False, "--strict", help="Skip JPEGs on which libjpeg warns (corrupt data it steps over); without it they are kept and listed in the manifest with the warning.")


@convert_app.command("imagenet")
@handle_errors
def convert_imagenet(src: Path = typer.Argument(..., metavar="SRC", help="ImageNet root: train/<wnid>/*.JPEG and val/ (class folders, or flat with LOC_val_solution.csv)."),
                     out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder (manifest.json, .beton files, dali/ shards)."),
                     fmt: str = _FMT, max_side: int = _MAXSIDE, quality: int = _QUALITY,
                     workers: Optional[int] = _WORKERS, splits: str = _SPLITS,
                     limit_per_class: Optional[int] = _LIMIT, force: bool = _FORCE, ffcv_mode: str = _MODE,
                     shard_size: int = _SHARD, progress: bool = _PROGRESS, strict: bool = _STRICT):
    """Convert an ImageNet folder (class folders or the Kaggle layout); bad files are skipped and listed."""
    _convert("imagenet", src, out_dir, fmt, max_side, quality, workers, splits, limit_per_class, force,
             ffcv_mode, shard_size, progress, strict)


@convert_app.command("folder")
@handle_errors
def convert_folder(src: Path = typer.Argument(..., metavar="SRC", help="ImageFolder root with train/<class>/ and val/<class>/."),
                   out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder."),
                   fmt: str = _FMT, max_side: int = _MAXSIDE, quality: int = _QUALITY,
                   workers: Optional[int] = _WORKERS, splits: str = _SPLITS,
                   limit_per_class: Optional[int] = _LIMIT, force: bool = _FORCE, ffcv_mode: str = _MODE,
                   shard_size: int = _SHARD, progress: bool = _PROGRESS, strict: bool = _STRICT):
    """Convert any ImageFolder-style dataset (class subfolders under train/ and val/)."""
    _convert("folder", src, out_dir, fmt, max_side, quality, workers, splits, limit_per_class, force,
             ffcv_mode, shard_size, progress, strict)


# ---------------------------------------------------------------------------------------------- run

@app.command("run")
@handle_errors
def run(recipe: Path = typer.Argument(..., metavar="RECIPE", help="A recipe TOML file (see recipes/)."),
        overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                            help="Override a recipe key, e.g. --set optim.lr=0.4 --set rounds[1].epochs=3."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the plan, then exit."),
        restart: bool = typer.Option(False, "--restart", help="Ignore checkpoints in the run folder and start over."),
        only: Optional[str] = typer.Option(None, "--round", metavar="NAME", help="Run only this round (its refinery must exist)."),
        accept_changes: bool = typer.Option(False, "--accept-changes",
                                            help="Resume a round whose recipe changed (the changes and the epoch "
                                                 "they apply from are recorded in run.json)."),
        estimate: bool = typer.Option(False, "--estimate", help="Time a few real steps of every round here and print the chain's time; train nothing, write nothing."),
        throughput: Optional[float] = typer.Option(None, "--throughput", metavar="IMG_PER_S", help="With --estimate: project from this global train images/s instead of timing."),
        processes: Optional[int] = typer.Option(None, "--processes", min=1, metavar="N", help="With --estimate: processes to assume (default: WORLD_SIZE, else 1)."),
        ):
    """Run a recipe's chain of rounds: train, refine, evaluate; resumes automatically after a stop."""
    import os

    from .chain import _selected, check_plan, describe_plan, run_dir_of, run_recipe
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if estimate or throughput is not None or processes is not None:
        if not estimate:
            raise UsageError("--throughput and --processes go with --estimate")
        from .estimate import estimate_recipe, render
        for line in render(estimate_recipe(r, only=only, throughput=throughput, processes=processes)):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    if dry_run:
        from .recipe import recipe_to_dict, to_toml
        check_plan(r, selected=_selected(r, only), run_dir=run_dir_of(r))
        if not restart:
            from .chain import check_resume_changes
            check_resume_changes(r, selected=_selected(r, only), run_dir=run_dir_of(r), accept=accept_changes)
        out.print(f"# resolved recipe ({recipe})", highlight=False, markup=False)
        out.print(to_toml(recipe_to_dict(r)), highlight=False, markup=False)
        out.print(describe_plan(r, restart=restart, only=only, world_size=int(os.environ.get("WORLD_SIZE", "1"))),
                  highlight=False, markup=False)
        return
    from .interrupt import Position, report
    position = Position()
    try:
        run_recipe(r, restart=restart, only=only, console=out, position=position, accept_changes=accept_changes)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, exit 130 (SIGTERM: preempt.py, exit 143)
        raise typer.Exit(report(position, e)) from None


# ---------------------------------------------------------------------------------------------- doctor

@app.command("doctor")
@handle_errors
def doctor(json_out: Optional[Path] = typer.Option(None, "--json", metavar="PATH", help="Also write the report as JSON.")):
    """Versions, GPUs, CPUs, and which loader backends work here (and why one does not)."""
    from .doctor import collect, render
    report = collect()
    render(report, out)
    if json_out:
        from .output import write_json_report
        write_json_report(json_out, report)


# ---------------------------------------------------------------------------------------------- bench
# Commands are registered by fastrefine.bench.cli (kept there so this module stays small).

def _register_bench() -> None:
    from .bench.cli import register
    register(bench_app, handle_errors=handle_errors, console=out)


_register_bench()


# --------------------------------------------------------------------------------------------- inspect

@app.command("inspect")
@handle_errors
def inspect_cmd(checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A round's checkpoint (best.pt / last.pt)."),
                image: Path = typer.Argument(..., metavar="IMAGE", help="An image; its parent folder names the ground truth when it is a class folder."),
                crops: int = typer.Option(4, "--crops", min=1, max=16, metavar="N", help="Random resized crops to draw."),
                out_png: Optional[Path] = typer.Option(None, "--out", metavar="PATH", help="PNG to write (default: IMAGE-inspect.png here)."),
                data: Optional[Path] = typer.Option(None, "--data", metavar="DATA", help="Dataset folder for class names (default: the run's)."),
                seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the crop boxes."),
                resolution: Optional[int] = typer.Option(None, "--resolution", min=8, metavar="PX", help="Crop size fed to the model (default: the run's)."),
                scale_lo: float = typer.Option(0.08, "--min-scale", min=0.01, max=1.0, metavar="F", help="Smallest crop area, as a fraction of the image.")):
    """The refinery's top-5 on random crops of one image, beside the ground truth (the paper's Figure 1)."""
    from .inspect_crops import inspect_image, load_class_list
    names = load_class_list(data) if data else None
    res = inspect_image(checkpoint=checkpoint, image=image, crops=crops, out=out_png, class_names=names, seed=seed,
                        resolution=resolution, scale=(scale_lo, 1.0))
    out.print(f"ground truth: {res['ground_truth'] or 'unknown'} ({res['resolution']}px crops)", highlight=False,
              markup=False)
    for i, c in enumerate(res["crops"], 1):
        top = ", ".join(f"{name} {p:.2f}" for name, p in c["top5"])
        out.print(f"  crop {i} {c['box']}: {top}", highlight=False, markup=False)
    out.print(f"wrote {res['out']}", highlight=False, markup=False)


# ------------------------------------------------------------------------------------- eval, export
# Registered by fastrefine.model_cli (kept there so this module stays small).

def _register_model_commands() -> None:
    from .model_cli import register
    register(app, handle_errors=handle_errors, console=out)


_register_model_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
