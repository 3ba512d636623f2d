"""The `fastrefine bench` commands: decode, loader, step, train."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..errors import UsageError
from .decode import run_decode
from .loader import run_loader
from .protocol import MIN_REPEATS, write_json
from .step import run_step
from .train import run_train


def _fmt_rate(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"


def _table(title: str, columns: list[str], rows: list[list[str]]):
    from rich.table import Table
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def _csv(text: str, *, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"{what}: expected a comma list, got {text!r}")
    return items

def _show_decode(console, rec: dict) -> None:
    s = rec["settings"]
    rows = [[r["mode"], str(r["images"]), _fmt_rate(r["images_per_s"])] for r in rec["results"]]
    console.print(_table(f"JPEG decode ceiling: {s['decoder_detail']}; {s['source']}",
                         ["mode", "images", "images/s median (min-max)"], rows))
    if s.get("bits_per_pixel"):
        console.print(f"JPEGs: {s['mean_jpeg_bytes'] / 1000:.1f} kB, {s['bits_per_pixel']:.2f} bits per pixel on average",
                      highlight=False, markup=False)
    failed = rec["results"][0].get("undecodable", 0)
    if failed:
        console.print(f"{failed} image(s) could not be decoded by {s['decoder']} and were left out of the timing",
                      highlight=False, markup=False)


def _show_loader(console, rec: dict) -> None:
    from rich.markup import escape  # "ffcv[stock]" is a case name, not rich markup
    rows = []
    for r in rec["results"]:
        if not r.get("ok"):
            rows.append([escape(r["backend"]), "failed (below)", "-", "-", "-", "-", "-"])
            continue
        over = f"{r['over_ceiling']:.2f}" if "over_ceiling" in r else "-"
        rows.append([escape(r["backend"]), r.get("decoder") or "-", _fmt_rate(r["images_per_s"]), over, r["dtype"],
                     r["normalize_on"], f"{r['startup_s']:.1f}"])
    s = rec["settings"]
    console.print(_table(f"Loaders alone: {s['resolution']} px, batch {s['batch_size']}, {s['batches']} batches x "
                         f"{s['repeats']} repeats x {s.get('rounds', 1)} rounds, {s['device']}",
                         ["backend", "decoder", "images/s median (min-max)", "/ ceiling", "dtype", "normalise on",
                          "start-up s"], rows))
    sm = rec["summary"]
    for name, why in sm.get("failed", {}).items():
        console.print(f"{name} failed: {why}", highlight=False, markup=False)
    if sm.get("decode_resize_images_per_s"):
        console.print(f"decode + crop + resize alone (numba threads, no loader): "
                      f"{sm['decode_resize_images_per_s']:,.0f} images/s", highlight=False)
    for key in ("best_over_decode_resize", "decode_resize_over_ceiling"):
        if key in sm:
            console.print(f"{key.replace('_', ' ')}: {sm[key]:.2f}", highlight=False)
    if sm.get("decode_ceiling_images_per_s"):
        console.print(f"decode ceiling ({sm.get('decode_ceiling_decoder', 'cv2')}, full decode, all cores): "
                      f"{sm['decode_ceiling_images_per_s']:,.0f} images/s",
                      highlight=False)
    for key in ("best_over_baseline", "best_over_ceiling"):
        if key in sm:
            console.print(f"{key.replace('_', ' ')} ({sm['best_backend']}): {sm[key]:.2f}", highlight=False)
    if "ffcv_fast_over_stock" in sm:
        console.print(f"ffcv fast decoder / stock decoder: {sm['ffcv_fast_over_stock']:.2f}", highlight=False)
    console.print(f"load average at the end: {', '.join(f'{x:.2f}' for x in rec.get('load_average', []))}",
                  highlight=False)


def _show_step(console, rec: dict) -> None:
    rows = []
    for r in rec["results"]:
        ratio = f"{r['measured_ratio']:.2f}" if "measured_ratio" in r else "-"
        bound = f"{r['bound']:.2f}" if "bound" in r else "-"
        rows.append([r["case"], _fmt_rate(r["images_per_s"]), f"{1000 * r['step_s']['median']:.1f}",
                     ratio, bound, f"{r['peak_memory_mib']:.0f}", f"{r['first_call_s']:.2f}"])
    s = rec["settings"]
    console.print(_table(f"Train step alone (synthetic tensors): {s['resolution']} px, batch {s['batch_size']}, "
                         f"{s['precision']}, {s['device']}{', compiled' if s['compile'] else ''}",
                         ["case", "images/s median (min-max)", "step ms", "measured ratio", "FLOPs bound",
                          "peak MiB", "first call s"], rows))
    console.print(f"peak memory: {s['memory']}", highlight=False)


def _show_train(console, rec: dict) -> None:
    rows = [[r["case"], _fmt_rate(r["images_per_s"])] for r in rec["results"]]
    s, sm = rec["settings"], rec["summary"]
    console.print(_table(f"End to end: {s['model']} + refinery {s['refinery']}, {s['backend']} loader, "
                         f"{s['resolution']} px, batch {s['batch_size']}, {s['device']}",
                         ["case", "images/s median (min-max)"], rows))
    line = (f"end to end / step alone = {sm['end_to_end_over_step_alone']:.2f}; / min(alone) = "
            f"{sm['end_to_end_over_min_alone']:.2f}; threads in the epoch: torch {s['torch_threads_in_epoch']}, "
            f"loader workers {s['loader_workers']}")
    if "over_baseline_fp32" in sm:
        line += f"; vs torchvision fp32: {sm['over_baseline_fp32']:.2f}x"
    if "over_baseline_modern" in sm:
        line += f"; vs torchvision {sm['modern_baseline']}: {sm['over_baseline_modern']:.2f}x"
    if "over_baseline_bf16" in sm:
        line += f"; vs torchvision channels_last + bf16: {sm['over_baseline_bf16']:.2f}x"
    console.print(line, highlight=False, markup=False)


def register(app, *, handle_errors, console) -> None:
    """Add `decode`, `loader`, `step` and `train` to the `fastrefine bench` typer app."""
    for add in (_add_decode, _add_loader, _add_step, _add_train):
        add(app, handle_errors=handle_errors, console=console)


def _json_opt():
    import typer
    return typer.Option(None, "--json", metavar="PATH", help="Also write everything (settings, every repeat) as JSON here.")


def _repeats_opt():
    import typer
    return typer.Option(3, "--repeats", min=MIN_REPEATS, metavar="N", help="Timed repeats (median and spread).")


def _add_decode(app, *, handle_errors, console) -> None:
    import typer

    @app.command("decode")
    @handle_errors
    def decode(data: Path = typer.Argument(..., metavar="DATA", help="A converted folder (manifest.json) or an ImageFolder tree."),
               split: str = typer.Option("train", "--split", metavar="train|val", help="The split whose JPEGs are read."),
               images: int = typer.Option(2000, "--images", min=1, metavar="N", help="JPEGs to read into memory and decode."),
               source: str = typer.Option("auto", "--source", metavar="auto|dali|ffcv|folder", help="auto, dali (shard JPEGs), ffcv (.beton) or folder."),
               decoder: str = typer.Option("cv2", "--decoder", metavar="cv2|pil|turbo", help="cv2 (OpenCV's libjpeg-turbo), pil (the torch loader's) or turbo (FFCV's own TurboJPEG call, fast DCT; the loader bench's ceiling)."),
               workers: Optional[int] = typer.Option(None, "--workers", metavar="N", help="Pool size (default: all cores; at most 4 per core)."),
               warmup: int = typer.Option(1, "--warmup", min=0, metavar="N", help="Untimed passes before the repeats."),
               repeats: int = _repeats_opt(),
               json_out: Optional[Path] = _json_opt()):
        """JPEG decode alone (no augmentation), one process and all cores: the loaders' ceiling."""
        rec = run_decode(data=data, split=split, images=images, source=source, decoder=decoder, workers=workers,
                         warmup=warmup, repeats=repeats)
        _show_decode(console, rec)
        write_json(json_out, rec)


def _add_loader(app, *, handle_errors, console) -> None:
    import typer

    @app.command("loader")
    @handle_errors
    def loader(data: Path = typer.Argument(..., metavar="DATA", help="A converted folder (manifest.json) or an ImageFolder tree."),
               backend: str = typer.Option("dali,ffcv,torch", "--backend", metavar="LIST", help="Comma list of backends: dali, ffcv, torch."),
               split: str = typer.Option("train", "--split", metavar="train|val", help="The split to load (train: with random crops and flips)."),
               resolution: int = typer.Option(224, "--resolution", metavar="PX", help="Output side in px (8 to 4096)."),
               batch_size: int = typer.Option(256, "--batch-size", min=1, metavar="N", help="Images per batch."),
               batches: int = typer.Option(20, "--batches", min=1, metavar="N", help="Batches per timed repeat."),
               warmup: int = typer.Option(5, "--warmup", min=0, metavar="N", help="Untimed batches after the first."),
               repeats: int = _repeats_opt(),
               workers: Optional[int] = typer.Option(None, "--workers", metavar="N", help="Loader workers (default: all cores; at most 4 per core)."),
               device: str = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where batches are delivered."),
               baseline_folder: Optional[Path] = typer.Option(None, "--baseline-folder", metavar="PATH", help="Original JPEG ImageFolder for the torchvision baseline (default: the split's source folder)."),
               baseline_workers: int = typer.Option(2, "--baseline-workers", min=0, metavar="N", help="DataLoader worker processes of the torchvision baseline."),
               ceiling: bool = typer.Option(True, "--ceiling/--no-ceiling", help="Also measure the decode ceiling."),
               ceiling_images: int = typer.Option(1000, "--ceiling-images", min=1, metavar="N", help="JPEGs read for the ceiling and --decode-resize."),
               decode_resize: bool = typer.Option(False, "--decode-resize", help="Also time full decode + random crop + resize to --resolution in numba threads, nothing else (needs FFCV): the least a loader that decodes whole images must do."),
               ffcv_decoders: str = typer.Option("fast", "--ffcv-decoders", metavar="LIST", help="Comma list of FFCV decoders to time side by side on the same .beton: fast (fastrefine's), stock (FFCV's)."),
               rounds: int = typer.Option(1, "--rounds", min=1, metavar="N", help="Time the cases in turn this many times (A B A B ...); figures over all rounds."),
               baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also time the torchvision ImageFolder baseline."),
               torch_decodes: str = typer.Option("auto", "--torch-decodes", metavar="LIST", help="Comma list of torch-backend decode modes to time side by side: auto, host (PIL in workers), device (batched decode_jpeg; nvJPEG on CUDA)."),
               json_out: Optional[Path] = _json_opt()):
        """Each loader backend alone beside the torchvision ImageFolder baseline; failures say why (exit 1 when every case failed)."""
        rec = run_loader(data=data, backends=_csv(backend, what="--backend"), split=split, resolution=resolution,
                         batch_size=batch_size, batches=batches, warmup=warmup, repeats=repeats, workers=workers,
                         device=device, baseline_folder=baseline_folder, baseline_workers=baseline_workers,
                         ceiling=ceiling, ceiling_images=ceiling_images, decode_resize=decode_resize,
                         ffcv_decoders=_csv(ffcv_decoders, what="--ffcv-decoders"), rounds=rounds,
                         baseline=baseline, torch_decodes=_csv(torch_decodes, what="--torch-decodes"))
        _show_loader(console, rec)
        write_json(json_out, rec)
        if not any(r.get("ok") for r in rec["results"]):
            from ..errors import RunError
            raise RunError("bench loader: every case failed (reasons above)")


def _add_step(app, *, handle_errors, console) -> None:
    import typer

    @app.command("step")
    @handle_errors
    def step(model: str = typer.Option("resnet18", "--model", metavar="NAME", help="The student (a model of the registry)."),
             refinery: str = typer.Option("same", "--refinery", metavar="LIST", help="Comma list: a model name, same, none."),
             resolution: int = typer.Option(224, "--resolution", min=1, metavar="PX", help="Input side in px (8 to 4096; one fp32 batch at most 8 GiB)."),
             batch_size: int = typer.Option(64, "--batch-size", min=1, metavar="N", help="Images per step."),
             num_classes: int = typer.Option(1000, "--classes", min=1, metavar="N", help="Classes of student and refinery."),
             precision: str = typer.Option("auto", "--precision", metavar="NAME", help="Autocast: auto, bf16, fp16 (CUDA) or fp32."),
             device: str = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where the step runs."),
             channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="Memory format of inputs and models."),
             compile: bool = typer.Option(False, "--compile", help="torch.compile student and refinery (first call timed apart)."),
             warmup: int = typer.Option(2, "--warmup", min=0, metavar="N", help="Untimed steps before the repeats."),
             iters: int = typer.Option(5, "--iters", min=1, metavar="N", help="Steps per timed repeat."),
             repeats: int = _repeats_opt(), json_out: Optional[Path] = _json_opt()):
        """The train step alone on synthetic device tensors: student alone vs student + refinery."""
        if precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UsageError(f"--precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
        rec = run_step(model=model, refineries=_csv(refinery, what="--refinery"), num_classes=num_classes,
                       resolution=resolution, batch_size=batch_size, precision=precision, device=device,
                       channels_last=channels_last, compile=compile, warmup=warmup, iters=iters, repeats=repeats)
        _show_step(console, rec)
        write_json(json_out, rec)


def _add_train(app, *, handle_errors, console) -> None:
    import typer

    @app.command("train")
    @handle_errors
    def train(recipe: Path = typer.Argument(..., metavar="RECIPE", help="A recipe TOML."),
              overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key, as in run."),
              round_name: Optional[str] = typer.Option(None, "--round", metavar="NAME", help="Which round (default: the last)."),
              steps: int = typer.Option(20, "--steps", min=1, metavar="N", help="Steps per timed repeat."),
              warmup: int = typer.Option(3, "--warmup", min=0, metavar="N", help="Untimed steps before the repeats."),
              repeats: int = _repeats_opt(),
              baseline: bool = typer.Option(False, "--baseline", help="Also time the plain torchvision loop (fp32, and channels_last + the precision fastrefine picks here: bf16 where the hardware has it) on the same images and model pair, alternating."),
              baseline_bf16: bool = typer.Option(False, "--baseline-bf16", help="With --baseline, also time channels_last + bf16 where fastrefine picks another precision (a CPU without native bf16: slow, emulated)."),
              baseline_folder: Optional[Path] = typer.Option(None, "--baseline-folder", metavar="PATH", help="ImageFolder for the baseline (default: the dataset's source train folder)."),
              json_out: Optional[Path] = _json_opt()):
        """The trainer's own epoch loop end to end from a recipe, and loader and step alone."""
        rec = run_train(recipe_path=recipe, overrides=overrides, round_name=round_name, steps=steps,
                        warmup=warmup, repeats=repeats, baseline=baseline, baseline_folder=baseline_folder,
                        baseline_bf16=baseline_bf16)
        _show_train(console, rec)
        write_json(json_out, rec)
