"""Pretrained refineries: a torchvision classifier with its weights, ready to refine a round.

    model, note = load_torchvision_refinery("resnet50", weights="IMAGENET1K_V2", class_map=None,
                                            class_names=wnids, num_classes=1000)
    model, note = adapt_normalization(model, refinery=torchvision_normalization("resnet50", weights="IMAGENET1K_V2"),
                                      loader=(loader.normalization.mean, loader.normalization.std))
    refinery = Refinery(model, resolution=224, ...)

Weights come from a local `.pth` state dict or from a torchvision weights name ("IMAGENET1K_V2",
"DEFAULT", ...) that must already be in the torch hub cache (`torch.hub.get_dir()/checkpoints/`):
nothing is ever downloaded. A missing file is a UsageError that names the path and how to put it there.

Class order. `fastrefine convert imagenet` sorts the wnids, which is torchvision's ImageNet-1k order,
so a converted ImageNet needs no mapping. fastrefine ships no list of ImageNet-1k's synsets, so what
it checks is the shape of that order: 1,000 distinct wnids (`n` + 8 digits), sorted, and a refinery
with 1,000 outputs. Any other dataset needs `refinery.class_map`, a JSON object mapping each dataset
class name to one refinery class index or a list of them, e.g. {"n02084071": [151, 152, ...]}.
The refinery's output is then reduced to the dataset's classes: each dataset class gets the
log-sum-exp of its mapped logits, so the softmax over the reduced logits is the refinery's
probability summed over each class's mapped outputs and renormalised over the mapped outputs
(outputs no class maps to are dropped; an output mapped to two classes is refused).
A state dict whose classifier has exactly the dataset's number of outputs (a torchvision model
trained on this dataset) is taken in the dataset's class order, as a fastrefine checkpoint is.

Normalisation. torchvision's ImageNet weights expect mean (0.485, 0.456, 0.406), std (0.229, 0.224,
0.225): the loaders' own defaults (`loaders.base.IMAGENET_MEAN/STD`, the one copy of these values), so
`adapt_normalization` returns the model unchanged for them; it is there for weights trained with
other values and for a loader that normalises otherwise (the round passes its loader's
`normalization`), and checks instead of assuming.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import UsageError
from .loaders.base import IMAGENET_MEAN, IMAGENET_STD  # torchvision's ImageNet weights' values too

IMAGENET_NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")
_STATE_DICT_SUFFIXES = (".pth", ".pt")


def _tv():
    import torchvision.models as tvm
    return tvm


def torchvision_classifiers() -> list[str]:
    """Names torchvision.models.get_model builds as ImageNet-style classifiers."""
    tvm = _tv()
    return sorted(tvm.list_models(module=tvm))


def _check_name(name: str) -> None:
    names = torchvision_classifiers()
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names, n=1)
        raise UsageError(f'refinery "torchvision:{name}": torchvision has no classifier {name!r}'
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + "; see torchvision.models.list_models()")


def _is_file_spec(weights: str) -> bool:
    return weights.endswith(_STATE_DICT_SUFFIXES) or os.sep in weights or Path(weights).is_file()


def _weights_enum(name: str, weights: str):
    tvm = _tv()
    enum = tvm.get_model_weights(name)
    try:
        return enum[weights]
    except KeyError:
        raise UsageError(f"refinery.weights = {weights!r}: torchvision:{name} has weights "
                         f"{', '.join(enum.__members__)}, or give a .pth state dict file") from None


def hub_cache_path(name: str, weights: str) -> Path:
    """Where torch.hub keeps the file of torchvision weights `weights` of model `name`."""
    w = _weights_enum(name, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def refinery_weights_file(name: str, weights: str) -> Path:
    """The file torchvision:`name`'s refinery.weights will be read from: a state dict file, or the weights
    in the torch hub cache. UsageError naming refinery.weights when it is not there (checked at start)."""
    if not weights:
        raise UsageError('refinery.weights: empty; expected a torchvision weights name such as "DEFAULT" '
                         'or a .pth state dict file')
    if _is_file_spec(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UsageError(f"refinery.weights = {weights!r}: file not found")
        return path
    path = hub_cache_path(name, weights)
    if not path.is_file():
        w = _weights_enum(name, weights)
        raise UsageError(f"refinery.weights = {weights!r}: torchvision:{name} weights {w.name} are not in the torch "
                         f"hub cache ({path}); fastrefine never downloads: copy {w.url} to that path (or set "
                         f"TORCH_HOME), or set refinery.weights to a local .pth state dict")
    return path


def _load_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  a corrupt or foreign file: one line naming it
        raise UsageError(f"refinery.weights = {str(path)!r}: cannot read it as a state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a fastrefine or trainer checkpoint
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"refinery.weights = {str(path)!r}: expected a state dict (parameter name -> tensor)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def _classifier_key(model: nn.Module) -> str:
    """The state-dict key of the last Linear (or 1x1 conv head) weight: the classifier."""
    key = None
    for mod_name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            key = f"{mod_name}.weight"
    if key is None:
        raise UsageError("torchvision refinery: no Linear or Conv2d layer found to read the class count from")
    return key


def _build_from_file(name: str, path: Path) -> tuple[nn.Module, int]:
    tvm = _tv()
    if not path.is_file():
        raise UsageError(f"refinery.weights = {str(path)!r}: file not found")
    state = _load_state_dict(path)
    key = _classifier_key(tvm.get_model(name, weights=None))
    if key not in state:
        raise UsageError(f"refinery.weights = {str(path)!r}: not a torchvision {name} state dict (no {key!r})")
    n_out = int(state[key].shape[0])
    model = tvm.get_model(name, weights=None, num_classes=n_out)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"refinery.weights = {str(path)!r}: does not fit torchvision {name}: "
                         f"{' '.join(line.strip() for line in first[:2])}") from None
    return model, n_out


def _build_from_cache(name: str, weights: str) -> tuple[nn.Module, int]:
    tvm = _tv()
    w = _weights_enum(name, weights)
    path = hub_cache_path(name, weights)
    if not path.is_file():
        raise UsageError(f"refinery.weights = {weights!r}: torchvision:{name} weights {w.name} are not in the torch hub "
                         f"cache ({path}); fastrefine never downloads: copy {w.url} to that path (or set TORCH_HOME), "
                         f"or set refinery.weights to a local .pth state dict")
    # The file is in the cache, so torchvision's loader reads it and downloads nothing. Building with the
    # weights enum (not weights=None + load_state_dict) keeps what torchvision sets for pretrained
    # weights, such as GoogLeNet's and Inception's transform_input.
    model = tvm.get_model(name, weights=w, progress=False)
    return model, len(w.meta["categories"])


def imagenet_order_problem(class_names: list[str]) -> str | None:
    """Why `class_names` is not ImageNet-1k's order as torchvision has it (sorted wnids), or None."""
    if len(class_names) != IMAGENET_NUM_CLASSES:
        return f"the dataset has {len(class_names)} classes, not ImageNet's {IMAGENET_NUM_CLASSES}"
    bad = next((c for c in class_names if not _WNID.fullmatch(c)), None)
    if bad is not None:
        return f"class {bad!r} is not an ImageNet wnid (n + 8 digits)"
    if len(set(class_names)) != len(class_names):
        return "the dataset's class names repeat"
    if list(class_names) != sorted(class_names):
        i = next(i for i, (a, b) in enumerate(zip(class_names, sorted(class_names))) if a != b)
        return f"the classes are not in sorted wnid order (class {i} is {class_names[i]!r})"
    return None


class ClassMapHead(nn.Module):
    """A refinery reduced to the dataset's classes: logit_c = logsumexp of the mapped logits of class c.

    softmax over these logits = the refinery's probability of each class's outputs, summed and
    renormalised over all mapped outputs. A class mapped to one output keeps that output's logit.
    """

    def __init__(self, model: nn.Module, groups: list[list[int]]):
        super().__init__()
        self.model = model
        width = max(len(g) for g in groups)
        index = torch.zeros(len(groups), width, dtype=torch.long)
        pad = torch.zeros(len(groups), width, dtype=torch.bool)
        for c, g in enumerate(groups):
            index[c, :len(g)] = torch.tensor(g)
            index[c, len(g):] = g[0]
            pad[c, len(g):] = True
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("pad", pad, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        grouped = logits[:, self.index].masked_fill(self.pad, -math.inf)  # (B, classes, width)
        return torch.logsumexp(grouped, dim=2)


def read_class_map(path: str | Path, *, class_names: list[str], refinery_outputs: int) -> list[list[int]]:
    """The refinery output indices of each dataset class, in the dataset's class order."""
    path = Path(path)
    where = f"refinery.class_map = {str(path)!r}"
    if not path.is_file():
        raise UsageError(f"{where}: file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object mapping class names to refinery class indices")
    unknown = sorted(set(raw) - set(class_names))
    if unknown:
        raise UsageError(f"{where}: {len(unknown)} names are not classes of the dataset, e.g. {unknown[0]!r}")
    missing = [c for c in class_names if c not in raw]
    if missing:
        raise UsageError(f"{where}: {len(missing)} of the dataset's classes are not mapped, e.g. {missing[0]!r}")
    groups, owner = [], {}
    for c in class_names:
        v = raw[c]
        idx = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if (not isinstance(idx, list) or not idx
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)):
            raise UsageError(f"{where}: class {c!r}: expected an index or a non-empty list of indices, got {v!r}")
        for i in idx:
            if not 0 <= i < refinery_outputs:
                raise UsageError(f"{where}: class {c!r}: index {i} is outside the refinery's "
                                 f"{refinery_outputs} outputs")
            if i in owner and owner[i] != c:
                raise UsageError(f"{where}: refinery output {i} is mapped to both {owner[i]!r} and {c!r}")
            owner[i] = c
        groups.append(sorted(set(idx)))
    return groups


def load_torchvision_refinery(name: str, *, weights: str, class_map: str | Path | None, class_names: list[str],
                              num_classes: int) -> tuple[nn.Module, str]:
    """A torchvision classifier with its weights, on the CPU in eval mode, whose outputs are the
    dataset's `num_classes` classes in the dataset's order; and a one-line description.

    weights: a torchvision weights name ("IMAGENET1K_V2", "DEFAULT", ...) read from the torch hub
    cache only, or a .pth state dict file. class_map: None or a JSON file (see the module docstring).
    class_names: the dataset's class names in label order (the manifest's wnids).
    """
    _check_name(name)
    if len(class_names) != num_classes:
        raise UsageError(f"data.num_classes = {num_classes} but the dataset names {len(class_names)} classes")
    if not weights:
        raise UsageError('refinery.weights: empty; expected a torchvision weights name such as "DEFAULT" '
                         "or a .pth state dict file")
    if _is_file_spec(weights):
        model, n_out = _build_from_file(name, Path(weights).expanduser())
        source = f"state dict {weights}"
    else:
        model, n_out = _build_from_cache(name, weights)
        source = f"{_weights_enum(name, weights)} from {hub_cache_path(name, weights)}"
    if class_map is not None:
        groups = read_class_map(class_map, class_names=class_names, refinery_outputs=n_out)
        if groups != [[i] for i in range(n_out)]:
            model = ClassMapHead(model, groups)
        mapped = sum(len(g) for g in groups)
        order = f"class map {class_map}: {mapped} of {n_out} outputs -> {num_classes} classes (log-sum-exp)"
    elif n_out == num_classes and n_out != IMAGENET_NUM_CLASSES:
        order = f"{n_out} outputs taken in the dataset's class order"
    else:
        problem = imagenet_order_problem(class_names)
        if problem is not None:
            raise UsageError(f'refinery "torchvision:{name}" has {n_out} outputs in ImageNet-1k order but {problem}; '
                             f"set refinery.class_map to a JSON file mapping each class name to refinery class indices")
        if n_out != IMAGENET_NUM_CLASSES:
            raise UsageError(f'refinery "torchvision:{name}" ({source}) has {n_out} outputs, the dataset '
                             f"{num_classes} classes; set refinery.class_map")
        order = "ImageNet-1k order (1,000 sorted wnids)"
    model = model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, f"torchvision {name}, {source}, {order}"


def torchvision_normalization(name: str, *, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in 0..1 pixel units that the refinery's weights expect. A weights name: what its
    torchvision transforms say. A state dict file: torchvision's ImageNet values (the convention for
    torchvision models; fastrefine's loaders use the same)."""
    if not weights or _is_file_spec(weights):
        return IMAGENET_MEAN, IMAGENET_STD
    t = _weights_enum(name, weights).transforms()
    mean, std = getattr(t, "mean", None), getattr(t, "std", None)
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class Renormalize(nn.Module):
    """x normalised with the loader's (mean, std) -> x normalised with the model's, then the model:
    x' = (x * std_l + mean_l - mean_m) / std_m, per channel."""

    def __init__(self, model: nn.Module, *, loader: tuple, refinery: tuple):
        super().__init__()
        (ml, sl), (mm, sm) = loader, refinery
        ml, sl, mm, sm = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (ml, sl, mm, sm))
        self.register_buffer("scale", sl / sm, persistent=False)
        self.register_buffer("shift", (ml - mm) / sm, persistent=False)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() * self.scale + self.shift).to(x.dtype))


def adapt_normalization(model: nn.Module, *, refinery: tuple, loader: tuple) -> tuple[nn.Module, str]:
    """The model unchanged when the loader already normalises as the refinery expects (torchvision's
    ImageNet weights and fastrefine's loaders both use ImageNet's mean/std), else wrapped so that it
    sees its own normalisation. `refinery` and `loader` are (mean, std) pairs. Returns (model, note)."""
    same = all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6)
               for pair_r, pair_l in zip(refinery, loader) for a, b in zip(pair_r, pair_l))
    if same:
        return model, f"input normalisation: the loader's (mean {tuple(loader[0])}, std {tuple(loader[1])})"
    return (Renormalize(model, loader=loader, refinery=refinery),
            f"input renormalised from the loader's mean {tuple(loader[0])} std {tuple(loader[1])} "
            f"to the refinery's mean {tuple(refinery[0])} std {tuple(refinery[1])}")
