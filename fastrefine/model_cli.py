"""The `eval` and `export` commands (registered from cli.py; kept here so that cli.py stays small)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, *, handle_errors, console) -> None:

    @app.command("eval")
    @handle_errors
    def eval_cmd(model: str = typer.Argument(..., metavar="CHECKPOINT",
                                            help="A checkpoint fastrefine wrote (best.pt / last.pt), or torchvision:NAME."),
                 data: Path = typer.Argument(..., metavar="DATA", help="A converted dataset folder or an ImageFolder root."),
                 split: str = typer.Option("val", "--split", metavar="val|train", help="The split to evaluate (train is read without augmentation)."),
                 resolution: Optional[int] = typer.Option(None, "--resolution", min=8, metavar="PX", help="Centre crop size (default: the run's val resolution, else 224)."),
                 crop_ratio: Optional[float] = typer.Option(None, "--crop-ratio", min=0.01, max=1.0, metavar="R", help="Crop / resized shorter side (default: the run's, else 0.875)."),
                 batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="N", help="Images per batch (default: the run's val batch, else 256)."),
                 backend: Optional[str] = typer.Option(None, "--backend", metavar="auto|torch|dali|ffcv", help="Loader (default: the run's on the run's data, else auto; torch for an ImageFolder)."),
                 precision: Optional[str] = typer.Option(None, "--precision", metavar="auto|bf16|fp16|fp32", help="Autocast (default: the run's, else auto)."),
                 device: str = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where the model runs."),
                 weights: str = typer.Option("DEFAULT", "--weights", metavar="NAME|FILE", help="torchvision:NAME only: weights name in the torch hub cache, or a .pth (never downloaded)."),
                 class_map: Optional[str] = typer.Option(None, "--class-map", metavar="FILE", help="torchvision:NAME only: JSON mapping the data's classes to the model's outputs."),
                 max_batches: Optional[int] = typer.Option(None, "--max-batches", min=1, metavar="N", help="Only the first N batches (as a run's max_val_batches); default: the whole split."),
                 json_out: Optional[Path] = typer.Option(None, "--json", metavar="PATH", help="Also write the report as JSON.")):
        """Top-1, top-5, loss and per-class top-1 of a checkpoint or a torchvision model on a dataset split."""
        from .evaluation import evaluate_model, render
        report = evaluate_model(model, data, split=split, resolution=resolution, crop_ratio=crop_ratio,
                                batch_size=batch_size, backend=backend, precision=precision, device=device,
                                weights=weights, class_map=class_map, max_batches=max_batches)
        render(report, console)
        if json_out is not None:
            from .output import write_json_report
            write_json_report(json_out, report)
            console.print(f"wrote {json_out}", highlight=False, markup=False, soft_wrap=True)

    @app.command("export")
    @handle_errors
    def export_cmd(checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint fastrefine wrote (best.pt / last.pt)."),
                   out: Path = typer.Argument(..., metavar="OUT", help="The artifact to write (OUT.json is written beside it)."),
                   fmt: str = typer.Option("pt2", "--format", metavar="pt2|state_dict|onnx",
                                           help="pt2: a torch.export program (torch alone loads it); state_dict: weights + JSON; onnx: needs the onnx package."),
                   resolution: Optional[int] = typer.Option(None, "--resolution", min=8, metavar="PX", help="Input size (default: the run's val resolution, else 224)."),
                   data: Optional[Path] = typer.Option(None, "--data", metavar="DATA", help="Dataset whose class names go into the JSON (default: the run's).")):
        """The model of a checkpoint as a file that loads and runs without fastrefine."""
        from .export import export_checkpoint, sidecar
        info = export_checkpoint(checkpoint, out, fmt=fmt, resolution=resolution, data=data)
        console.print(f"wrote {out} ({info['format']}, {info['model_name']}, {info['num_classes']} classes, "
                      f"{info['input']['resolution']} px) and {sidecar(out)}", highlight=False, markup=False, soft_wrap=True)
        if "check" in info:
            console.print(f"checked: reloaded, its logits differ from the checkpoint model's by at most "
                          f"{info['check']['max_abs_logit_difference']:.2e}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"load: {info['load']}", highlight=False, markup=False, soft_wrap=True)
        if "rebuild" in info:
            console.print(f"rebuild: {json.dumps(info['rebuild'])}", highlight=False, markup=False, soft_wrap=True)
