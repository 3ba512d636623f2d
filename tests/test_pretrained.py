"""Pretrained torchvision refineries (CPU): weights from a file or the torch hub cache, never a download;
class order checked or mapped; input normalisation checked. Models are randomly initialised and tiny."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image

from fastrefine.errors import UsageError
from fastrefine.loaders import IMAGENET_MEAN, IMAGENET_STD
from fastrefine.pretrained import (ClassMapHead, adapt_normalization, hub_cache_path, imagenet_order_problem,
                                   load_torchvision_refinery, torchvision_normalization)
from fastrefine.refinery import Refinery

FM_CLASSES = [f"n9000000{i}" for i in range(10)]  # the demo export's class folder names
IMAGENET_LIKE = [f"n{i:08d}" for i in range(1000)]  # 1,000 sorted wnids


@pytest.fixture(scope="module")
def images(demo_tree) -> torch.Tensor:
    """8 real Fashion-MNIST photos (32 px), normalised as the loaders do, channels-last."""
    files = sorted((demo_tree / "val").glob("*/*"))[::25][:8]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files]).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _saved(tmp_path: Path, *, name: str = "mobilenet_v3_small", num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = tvm.get_model(name, weights=None, num_classes=num_classes).eval()
    path = tmp_path / f"{name}-{num_classes}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_state_dict_with_the_datasets_class_count_loads_frozen_in_eval(tmp_path, images):
    ref, path = _saved(tmp_path, num_classes=10)
    model, note = load_torchvision_refinery("mobilenet_v3_small", weights=str(path), class_map=None,
                                            class_names=FM_CLASSES, num_classes=10)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert "dataset's class order" in note and str(path) in note
    with torch.no_grad():
        assert torch.equal(model(images), ref(images))


def test_imagenet_head_on_other_classes_is_refused_without_a_class_map(tmp_path):
    _, path = _saved(tmp_path, num_classes=1000)
    with pytest.raises(UsageError, match=r"class_map") as e:
        load_torchvision_refinery("mobilenet_v3_small", weights=str(path), class_map=None,
                                  class_names=FM_CLASSES, num_classes=10)
    assert "10 classes, not ImageNet's 1000" in str(e.value) and "\n" not in str(e.value)


def test_imagenet_order_is_sorted_distinct_wnids():
    assert imagenet_order_problem(IMAGENET_LIKE) is None
    swapped = IMAGENET_LIKE[:]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    assert "not in sorted wnid order (class 3" in imagenet_order_problem(swapped)
    assert "not an ImageNet wnid" in imagenet_order_problem(IMAGENET_LIKE[:-1] + ["cat"])
    assert "999 classes" in imagenet_order_problem(IMAGENET_LIKE[:-1])


def test_class_map_reduces_logits_by_log_sum_exp(tmp_path, images):
    ref, path = _saved(tmp_path, num_classes=1000)
    groups = {c: ([100 + 10 * i, 101 + 10 * i, 500 + i] if i % 2 else 3 * i + 2) for i, c in enumerate(FM_CLASSES)}
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps(groups))
    model, note = load_torchvision_refinery("mobilenet_v3_small", weights=str(path), class_map=cmap,
                                            class_names=FM_CLASSES, num_classes=10)
    assert isinstance(model, ClassMapHead) and "20 of 1000 outputs -> 10 classes" in note
    with torch.no_grad():
        full = ref(images)
        out = model(images)
    assert out.shape == (8, 10)
    for i, c in enumerate(FM_CLASSES):
        idx = groups[c] if isinstance(groups[c], list) else [groups[c]]
        assert torch.allclose(out[:, i], torch.logsumexp(full[:, idx], dim=1), atol=1e-5)
    # its softmax is the refinery's probability of each class's outputs, renormalised over the mapped ones
    p = F.softmax(full, 1)
    mass = torch.stack([p[:, g if isinstance(g, list) else [g]].sum(1) for g in groups.values()], 1)
    assert torch.allclose(F.softmax(out, 1), mass / mass.sum(1, keepdim=True), atol=1e-5)
    # the Refinery wrapper folds its BatchNorms through the head and gives the same probabilities
    refinery = Refinery(model, fold_bn=True)
    assert refinery.note.startswith("folded") and " 0 of" not in refinery.note
    assert torch.allclose(refinery(images), F.softmax(out, 1), atol=1e-4)


@pytest.mark.parametrize("mapping, message", [
    ({c: 1 for c in FM_CLASSES[:9]}, r"1 of the dataset's classes are not mapped, e.g. 'n90000009'"),
    ({**{c: i for i, c in enumerate(FM_CLASSES)}, "cat": 3}, r"names are not classes of the dataset, e.g. 'cat'"),
    ({c: (1000 if i == 0 else i) for i, c in enumerate(FM_CLASSES)}, r"index 1000 is outside the refinery's 1000"),
    ({c: [i, 0] for i, c in enumerate(FM_CLASSES)}, r"output 0 is mapped to both 'n90000000' and 'n90000001'"),
    ({c: [] for c in FM_CLASSES}, r"expected an index or a non-empty list"),
    ([1, 2], r"expected a JSON object"),
])
def test_bad_class_maps_are_one_line_errors_naming_the_key(tmp_path, mapping, message):
    _, path = _saved(tmp_path, num_classes=1000)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps(mapping))
    with pytest.raises(UsageError, match=message) as e:
        load_torchvision_refinery("mobilenet_v3_small", weights=str(path), class_map=cmap,
                                  class_names=FM_CLASSES, num_classes=10)
    assert str(e.value).startswith("refinery.class_map = ") and "\n" not in str(e.value)


def test_missing_files_and_unknown_models_are_usage_errors(tmp_path):
    kw = dict(class_map=None, class_names=FM_CLASSES, num_classes=10)
    with pytest.raises(UsageError, match=r"refinery.weights = .*nope.pth.*: file not found"):
        load_torchvision_refinery("resnet18", weights=str(tmp_path / "nope.pth"), **kw)
    with pytest.raises(UsageError, match=r"no classifier 'resnet5'.*did you mean"):
        load_torchvision_refinery("resnet5", weights="DEFAULT", **kw)
    with pytest.raises(UsageError, match=r"refinery.weights = 'IMAGENET9K': torchvision:resnet18 has weights IMAGENET1K_V1"):
        load_torchvision_refinery("resnet18", weights="IMAGENET9K", **kw)
    _, other = _saved(tmp_path, name="resnet18", num_classes=10)
    with pytest.raises(UsageError, match=r"not a torchvision mobilenet_v3_small state dict"):
        load_torchvision_refinery("mobilenet_v3_small", weights=str(other), **kw)
    cmap_missing = dict(kw, class_map=tmp_path / "absent.json")
    _, imagenet = _saved(tmp_path, num_classes=1000)
    with pytest.raises(UsageError, match=r"refinery.class_map = .*absent.json.*: file not found"):
        load_torchvision_refinery("mobilenet_v3_small", weights=str(imagenet), **cmap_missing)


def test_weights_names_come_from_the_hub_cache_only(tmp_path, monkeypatch, images):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    kw = dict(class_map=None, class_names=IMAGENET_LIKE, num_classes=1000)
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert hub_cache_path("mobilenet_v3_small", "DEFAULT") == expected
    with pytest.raises(UsageError, match=r"not in the torch hub cache") as e:
        load_torchvision_refinery("mobilenet_v3_small", weights="IMAGENET1K_V1", **kw)
    assert str(expected) in str(e.value) and "never downloads" in str(e.value) and "\n" not in str(e.value)
    # the same file, put where the message says: loaded from there, in ImageNet order
    ref, path = _saved(tmp_path, num_classes=1000, seed=3)
    expected.parent.mkdir(parents=True)
    path.rename(expected)
    model, note = load_torchvision_refinery("mobilenet_v3_small", weights="DEFAULT", **kw)
    assert "IMAGENET1K_V1" in note and "ImageNet-1k order" in note and str(expected) in note
    with torch.no_grad():
        assert torch.equal(model(images), ref(images))


def test_torchvision_imagenet_weights_use_the_loaders_normalisation(images):
    for name, weights in [("resnet50", "IMAGENET1K_V2"), ("mobilenet_v3_small", "DEFAULT"), ("vgg19", "DEFAULT")]:
        mean, std = torchvision_normalization(name, weights=weights)
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD))
    model = torch.nn.Conv2d(3, 2, 1)
    same, note = adapt_normalization(model, refinery=(IMAGENET_MEAN, IMAGENET_STD), loader=(IMAGENET_MEAN, IMAGENET_STD))
    assert same is model and "the loader's" in note


def test_other_normalisation_is_converted_before_the_model(images):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    wrapped, note = adapt_normalization(model, refinery=half, loader=(IMAGENET_MEAN, IMAGENET_STD))
    assert wrapped is not model and "renormalised" in note
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = images * std + mean                       # back to 0..1
    with torch.no_grad():
        assert torch.allclose(wrapped(images), model((pixels - 0.5) / 0.5), atol=1e-5)
