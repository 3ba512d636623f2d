"""`fastrefine inspect`: what a refinery says about random crops of one image (the paper's Figure 1).

A trained checkpoint (any round's best.pt/last.pt) is loaded as it would be as a refinery (eval mode).
N RandomResizedCrop boxes are drawn from the image with the training loaders' own sampler, each crop
is resized to the model's resolution and normalised like every loader does, and the model's softmax
gives a top-5 per crop. The PNG shows the image with the numbered boxes and, beside each crop, its
top-5 next to the ground-truth label (the image's parent folder, when it names a known class).

    inspect_image(checkpoint=Path("runs/quickstart/labels/best.pt"), image=Path("x.JPEG"), crops=4,
                  out=Path("x.png"), class_names=None, seed=0, resolution=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UsageError

from .loaders.base import DEFAULT_RATIO, DEFAULT_SCALE  # the training loaders' crop ranges


@dataclass(frozen=True)
class ClassList:
    """Class index -> (folder id, readable name); the folder ids are what ImageFolder trees are named by."""
    wnids: list[str]
    names: list[str]

    def index_of(self, folder: str) -> int | None:
        if folder in self.wnids:
            return self.wnids.index(folder)
        if folder in self.names:
            return self.names.index(folder)
        return None


# ------------------------------------------------------------------------------------- class names

def load_class_list(data: Path) -> ClassList:
    """The class order a run on `data` used, with readable names where the dataset has them.

    A converted dataset: its manifest. An ImageFolder root: the sorted train/ class folders (the
    loaders' order), named by LOC_synset_mapping.txt when present.
    """
    data = Path(data)
    if (data / "manifest.json").is_file():
        from .manifest import read_manifest
        classes = sorted(read_manifest(data).classes, key=lambda c: c.index)
        return ClassList([c.wnid for c in classes], [c.name for c in classes])
    train = data / "train"
    folders = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    from .convert.scan import read_synset_names
    names = read_synset_names(data)
    if not folders and names:
        folders = list(names)
    if not folders:
        raise UsageError(f"--data {data}: no manifest.json, no train/<class>/ folders and no "
                         f"LOC_synset_mapping.txt to take class names from")
    return ClassList(folders, [names.get(f, f) for f in folders])


def _run_recipe_of(checkpoint: Path):
    """The resolved recipe a round wrote beside its checkpoints, loaded as strictly as any recipe (None
    when there is none or it no longer loads)."""
    from .recipe import load_recipe
    path = Path(checkpoint).parent / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return load_recipe(path, recorded=True)
    except UsageError:
        return None


def default_resolution(checkpoint: Path, fallback: int = 224) -> int:
    """The resolution the checkpoint's round evaluated at, from its run folder; else `fallback`."""
    recipe = _run_recipe_of(checkpoint)
    return recipe.loader.val_resolution if recipe is not None else fallback


def default_data(checkpoint: Path) -> Path | None:
    """The dataset the checkpoint's run trained on (for its class names), if it is still there."""
    recipe = _run_recipe_of(checkpoint)
    path = recipe.data.path if recipe is not None else None
    return Path(path) if path and Path(path).exists() else None


def output_path(out: Path | None, image: Path) -> Path:
    """Where the PNG goes: `out` itself when it names a .png file in an existing folder, or
    IMAGE-inspect.png inside `out` when it is an existing folder; anything else is refused."""
    name = f"{image.stem}-inspect.png"
    if out is None:
        return Path(name)
    out = Path(out)
    if out.is_dir():
        return out / name
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: not an existing folder, nor a .png file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: its folder {out.parent} does not exist")
    return out


# ------------------------------------------------------------------------------------------- crops

def sample_boxes(*, width: int, height: int, crops: int, seed: int, scale=DEFAULT_SCALE,
                 ratio=DEFAULT_RATIO) -> list[tuple[int, int, int, int]]:
    """`crops` RandomResizedCrop boxes (left, top, width, height), drawn by the training loaders' sampler
    (samples 0 .. crops - 1 of epoch 0 under `seed`)."""
    from fastrefine.loaders.crop_sampler import draw_boxes
    boxes = draw_boxes(seed=seed, epoch=0, indices=range(crops), heights=height, widths=width, scale=scale, ratio=ratio)
    return [(int(left), int(top), int(w), int(h)) for top, left, h, w in boxes]


def crop_tensor(img, box: tuple[int, int, int, int], *, resolution: int) -> torch.Tensor:
    """One crop as the model sees it: resized to resolution x resolution, normalised, batch of 1."""
    import torchvision.transforms.functional as TF

    from fastrefine.loaders import IMAGENET_MEAN, IMAGENET_STD, Normalization
    left, top, w, h = box
    crop = TF.resized_crop(img, top, left, h, w, [resolution, resolution], antialias=True)
    scale, shift = Normalization(IMAGENET_MEAN, IMAGENET_STD).scale_shift_tensors()
    x = torch.addcmul(shift, TF.pil_to_tensor(crop).float().unsqueeze(0), scale)
    return x.contiguous(memory_format=torch.channels_last)


def shown_side(resolution: int) -> int:
    """The longest side `inspect` decodes an image to: enough for the figure, and for the smallest crop
    (8% of the area at a 4:3 ratio, about a quarter of the shorter side) to keep at least `resolution` px."""
    return max(1024, 5 * resolution)


def open_shown(path: Path, *, resolution: int):
    """The image as RGB with its longer side at most shown_side(resolution): a JPEG decodes straight to a
    smaller DCT scale (PIL's draft mode), so a 48 MP photo never exists at full size in memory. A source
    of more pixels than the converter takes (convert.imaging.MAX_PIXELS) is refused from its header."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .convert.imaging import check_pixels
    if not Path(path).is_file():
        raise UsageError(f"{path}: image not found")
    side = shown_side(resolution)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the limit is checked below
            with Image.open(path) as im:
                too_large = check_pixels(*im.size)
                if too_large:
                    raise UsageError(f"{path}: {too_large}")
                scale = min(1.0, side / max(im.size))
                im.draft("RGB", (max(1, round(im.width * scale)), max(1, round(im.height * scale))))
                rgb = im.convert("RGB")
        if max(rgb.size) > side:
            rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
        return rgb
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: not an image PIL can read ({e})") from None


@torch.no_grad()
def refinery_top5(model: torch.nn.Module, x: torch.Tensor, k: int = 5) -> tuple[list[int], list[float], torch.Tensor]:
    probs = F.softmax(model(x).float(), dim=1)[0]
    top = probs.topk(min(k, probs.numel()))
    return top.indices.tolist(), top.values.tolist(), probs


# ------------------------------------------------------------------------------------------ figure

def _label(index: int, names: list[str] | None) -> str:
    return names[index] if names and index < len(names) else f"class {index}"


def _draw(*, img, boxes, crops_out: list[dict], crop_images: list, gt: str | None, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(boxes)
    fig = plt.figure(figsize=(11, max(4.0, 1.7 * n)))
    grid = fig.add_gridspec(n, 3, width_ratios=[2.2, 1, 2.4], wspace=0.35, hspace=0.45)
    colors = plt.get_cmap("tab10").colors
    ax_img = fig.add_subplot(grid[:, 0])
    ax_img.imshow(img)
    ax_img.set_title(f"{title}\nground truth: {gt or 'unknown'}", fontsize=9)
    ax_img.axis("off")
    for i, ((left, top, w, h), rec) in enumerate(zip(boxes, crops_out)):
        c = colors[i % len(colors)]
        ax_img.add_patch(Rectangle((left, top), w, h, fill=False, edgecolor=c, linewidth=2))
        ax_img.text(left + 2, top + 2, str(i + 1), color="white", fontsize=9, va="top",
                    bbox=dict(facecolor=c, edgecolor="none", pad=1))
        ax_crop = fig.add_subplot(grid[i, 1])
        ax_crop.imshow(crop_images[i])
        ax_crop.set_xticks([])
        ax_crop.set_yticks([])
        for side in ax_crop.spines.values():
            side.set_edgecolor(c)
            side.set_linewidth(3)
        ax_crop.set_title(f"crop {i + 1}", fontsize=8)
        ax_bar = fig.add_subplot(grid[i, 2])
        names = [name for name, _ in rec["top5"]][::-1]
        probs = [p for _, p in rec["top5"]][::-1]
        bar_colors = ["tab:green" if gt is not None and name == gt else "tab:gray" for name in names]
        ax_bar.barh(range(len(names)), probs, color=bar_colors)
        ax_bar.set_yticks(range(len(names)), names, fontsize=7)
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=7)
        note = f"p(gt) = {rec['gt_prob']:.2f}" if rec.get("gt_prob") is not None else "top-5"
        ax_bar.set_title(note, fontsize=8)
    from .report import save_figure
    save_figure(fig, out, bbox_inches="tight")


# -------------------------------------------------------------------------------------------- main

def inspect_image(*, checkpoint: Path, image: Path, crops: int = 4, out: Path | None = None,
                  class_names: list[str] | ClassList | None = None, seed: int = 0,
                  resolution: int | None = None, scale: tuple[float, float] = DEFAULT_SCALE) -> dict:
    """Draw `crops` random resized crops of `image` and the checkpoint's top-5 for each; save a PNG.

    class_names: a ClassList (folder ids + names), a plain list of names in class-index order, or None
    (names from the checkpoint's run folder's dataset when it is still there, else "class k").
    resolution: None takes the round's evaluation resolution from its run folder, else 224.
    The image is decoded with its longer side at most shown_side(resolution) (open_shown); the boxes are
    in the pixels of that image ("shown_size"), the crops the model sees are the same.
    Returns {"image", "checkpoint", "out", "resolution", "shown_size", "ground_truth", "ground_truth_index",
             "crops": [{"box": (left, top, width, height), "top5": [(class, prob), ...],
                        "top5_index": [...], "gt_prob": p or None}, ...]}.
    """
    from .checkpoint import load_model

    if crops < 1:
        raise UsageError(f"--crops: expected at least 1, got {crops}")
    checkpoint, image = Path(checkpoint), Path(image)
    output_path(out, image)  # a bad --out is refused before any work
    model, meta = load_model(checkpoint, device=torch.device("cpu"))
    model.eval()
    if isinstance(class_names, list):
        class_names = ClassList(list(class_names), list(class_names))
    if class_names is None and default_data(checkpoint) is not None:
        class_names = load_class_list(default_data(checkpoint))
    if class_names is not None and len(class_names.names) != meta.num_classes:
        raise UsageError(f"{checkpoint}: the model has {meta.num_classes} classes but "
                         f"{len(class_names.names)} class names were given")
    names = class_names.names if class_names else None
    resolution = resolution or default_resolution(checkpoint)
    img = open_shown(image, resolution=resolution)
    gt_index = class_names.index_of(image.parent.name) if class_names else None
    gt = names[gt_index] if gt_index is not None else None

    boxes = sample_boxes(width=img.width, height=img.height, crops=crops, seed=seed, scale=scale)
    records, crop_images = [], []
    for box in boxes:
        idx, probs, full = refinery_top5(model, crop_tensor(img, box, resolution=resolution))
        left, top, w, h = box
        crop_images.append(img.crop((left, top, left + w, top + h)))
        records.append({"box": box, "top5": [(_label(i, names), p) for i, p in zip(idx, probs)],
                        "top5_index": idx, "gt_prob": float(full[gt_index]) if gt_index is not None else None})
    out = output_path(out, image)
    title = f"{meta.model_name} ({checkpoint.parent.name}/{checkpoint.name}) at {resolution}px"
    _draw(img=img, boxes=boxes, crops_out=records, crop_images=crop_images, gt=gt, title=title, out=out)
    return {"image": str(image), "checkpoint": str(checkpoint), "out": str(out), "resolution": resolution,
            "shown_size": img.size, "ground_truth": gt, "ground_truth_index": gt_index, "crops": records}
