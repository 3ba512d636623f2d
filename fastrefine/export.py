"""`fastrefine export`: a checkpoint's model as an artifact that loads and runs without fastrefine.

Formats:
- "pt2" (default): a `torch.export` program. It holds the graph and the weights, so loading it needs
  torch alone, whatever the architecture (fastrefine's own darknet19, mobilenet_v1, tiny_cnn, ... too):
      program = torch.export.load("model.pt2"); logits = program.module()(images)
  The batch size is free; the spatial size is the exported resolution.
- "state_dict": the weights alone (`torch.load(..., weights_only=True)`), to load into the model
  built from code. For torchvision's architectures (alexnet, vgg16/19 = vgg16_bn/vgg19_bn,
  resnet18/34/50) torchvision builds it; fastrefine's own architectures are defined in
  fastrefine/models/<module>.py plus models/common.py, files that import only torch, which the
  JSON names: without fastrefine those two files are the code, or use the .pt2.
- "onnx": only when the `onnx` package is installed (torch's exporter needs it).

Beside the artifact, OUT.json says what the model is and what it expects: model name and options,
classes (names when the run's data can be read), input normalisation, resolution, layout, and how to
load it. The same JSON is stored inside the .pt2 as the extra file "fastrefine.json".
Inputs are float32 NCHW RGB images, pixel / 255 normalised with the JSON's mean and std (what
fastrefine's loaders hand the model); the outputs are logits.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import Path

import torch

from . import atomic
from .errors import UsageError

log = logging.getLogger("fastrefine")

FORMATS = ("pt2", "state_dict", "onnx")
EXTRA_FILE = "fastrefine.json"

# registry names built by torchvision: (torchvision builder, the options it takes as fastrefine passes them)
_TORCHVISION_BUILDERS = {"alexnet": "AlexNet", "vgg16": "vgg16_bn", "vgg19": "vgg19_bn", "resnet18": "resnet18",
                         "resnet34": "resnet34", "resnet50": "resnet50"}


def sidecar(out: Path) -> Path:
    """The JSON written beside an artifact: OUT + ".json" (model.pt2 -> model.pt2.json)."""
    return out.with_name(out.name + ".json")


def rebuild_recipe(name: str, options: dict, num_classes: int) -> dict:
    """How to build the architecture whose state_dict was exported, with or without fastrefine."""
    args = ", ".join([f"num_classes={num_classes}"] + [f"{k}={v!r}" for k, v in options.items()])
    if name in _TORCHVISION_BUILDERS:
        builder = _TORCHVISION_BUILDERS[name]
        call = (f"torchvision.models.{builder}({args})" if builder == "AlexNet"
                else f"torchvision.models.{builder}(weights=None, {args})")
        return {"needs": "torch and torchvision", "code": call + ".load_state_dict(state_dict)"}
    from .models import _entry
    builder = _entry(name).builder
    module = builder.__module__.rsplit(".", 1)[-1]
    return {"needs": f"torch and the architecture's code: fastrefine/models/{module}.py and fastrefine/models/common.py "
                     f"(they import only torch; {module}.py imports common.py relatively)",
            "code": f"from fastrefine.models.{module} import {builder.__name__}; "
                    f"{builder.__name__}({args}).load_state_dict(state_dict)",
            "without_fastrefine": f"copy fastrefine/models/{module}.py and common.py into a package of your own; "
                                  f"or export --format pt2, which needs torch alone"}


def export_checkpoint(checkpoint: Path, out: Path, *, fmt: str = "pt2", resolution: int | None = None,
                      data: Path | None = None) -> dict:
    """Write the artifact and its JSON; returns the JSON (with "check": the artifact's logits against the
    checkpoint model's on random inputs)."""
    from .evaluation import load_checkpoint_model
    from .loaders import IMAGENET_MEAN, IMAGENET_STD
    if fmt not in FORMATS:
        raise UsageError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    missing = [m for m in ("onnx", "onnxscript") if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:  # torch's ONNX exporter writes through onnxscript and onnx
        raise UsageError(f"--format onnx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''} "
                         f"(pip install onnx onnxscript); the default --format pt2 needs torch alone")
    out = Path(out)
    loaded = load_checkpoint_model(Path(checkpoint))
    model = loaded.model.float().eval()
    ctx = loaded.context
    if resolution is None:
        resolution = ctx.recipe.loader.val_resolution if ctx.recipe is not None else 224
    norm = ctx.info.get("normalization") or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    classes, readable = _class_names(data if data is not None else (Path(ctx.recipe.data.path) if ctx.recipe else None),
                                     loaded.num_classes)
    info = {"format": fmt, "model_name": loaded.name, "model_options": loaded.options,
            "num_classes": loaded.num_classes, "classes": classes, "class_names": readable,
            "input": {"shape": ["batch", 3, resolution, resolution], "dtype": "float32", "layout": "NCHW, RGB",
                      "normalization": {"mean": list(norm["mean"]), "std": list(norm["std"]),
                                        "formula": "(pixel / 255 - mean) / std"},
                      "resolution": resolution,
                      "resize": (f"shorter side to round({resolution} / crop_ratio), centre crop {resolution}, "
                                 f"crop_ratio {ctx.recipe.loader.val_crop_ratio:g} in the run"
                                 if ctx.recipe else "centre crop at the resolution")},
            "output": "logits (softmax them for probabilities)",
            "source": {"checkpoint": str(checkpoint), "round": loaded.meta.get("round"),
                       "epoch": loaded.meta.get("epoch"), "recorded_val_top1": loaded.meta.get("val_top1")}}
    example = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        reference = model(example)
    if fmt == "pt2":
        info["load"] = ("program = torch.export.load(PATH); logits = program.module()(images)  "
                        "# torch alone; batch size free, spatial size fixed")
        program = _export_program(model, example)
        blob = json.dumps(info, indent=2)
        atomic.atomic_write(out, lambda fh: torch.export.save(program, fh, extra_files={EXTRA_FILE: blob}))
        got = torch.export.load(out).module()(example)
    elif fmt == "state_dict":
        info["load"] = "state_dict = torch.load(PATH, weights_only=True); then see rebuild"
        info["rebuild"] = rebuild_recipe(loaded.name, loaded.options, loaded.num_classes)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        atomic.atomic_write(out, lambda fh: torch.save(state, fh))
        model.load_state_dict(torch.load(out, weights_only=True))
        got = model(example)
    else:
        info["load"] = "onnxruntime.InferenceSession(PATH).run(None, {'images': images})"
        _export_onnx(model, example, out)
        got = None
    if got is not None:
        with torch.no_grad():
            diff = float((got.detach() - reference).abs().max())
        info["check"] = {"max_abs_logit_difference": diff, "inputs": "2 random images"}
    atomic.write_json(sidecar(out), info)
    return info


def _export_program(model: torch.nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # noqa: BLE001  an architecture torch.export cannot capture: one line, exit 1
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"torch.export could not capture the model ({first[:200]}); "
                           f"--format state_dict still works") from None


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    buf = io.BytesIO()
    torch.onnx.export(model, (example,), buf, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    atomic.atomic_write(out, lambda fh: fh.write(buf.getvalue()))


def _class_names(data: Path | None, num_classes: int) -> tuple[list[str] | None, list[str] | None]:
    """(the data's classes in label order: wnids or folder names; their readable names from the
    manifest), when the data can be read and has as many classes as the model; else None."""
    if data is None:
        return None, None
    from .chain import data_classes
    from .evaluation import _class_labels
    try:
        n, names = data_classes(Path(data))
    except UsageError as e:
        log.warning("class names not recorded: %s", e)
        return None, None
    if len(names) != num_classes:
        log.warning("class names not recorded: %s has %d classes, the model %d", data, len(names), num_classes)
        return None, None
    return names, _class_labels(Path(data), names)
