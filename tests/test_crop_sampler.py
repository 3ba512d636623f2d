"""The one crop sampler (loaders/crop_sampler.py), the one normalisation (loaders/base.Normalization) and
the checks LoaderOptions makes for every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastrefine.errors import UsageError
from fastrefine.loaders.base import IMAGENET_MEAN, IMAGENET_STD, LoaderOptions, Normalization
from fastrefine.loaders.crop_sampler import draw_boxes, draw_flips, train_crops

CPU = torch.device("cpu")


def _sizes(n: int, seed: int = 0):
    """Image sizes from 1 px to 2,000 px a side, thin strips included (they take the centred fallback)."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 2000, n), rng.integers(1, 2000, n)
    h[: n // 50], w[n // 50: n // 25] = 1, 1
    return h, w


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3 / 4, 4 / 3)),
                                          ((0.25, 1.0), (1.0, 1.0))])
def test_numpy_and_numba_forms_draw_bit_equal_boxes_and_flips(scale, ratio):
    """The vectorised numpy form (torch, DALI) and the numba form (FFCV's kernels) on 50,000 samples of
    random sizes: the same boxes and flips, to the pixel."""
    pytest.importorskip("numba", reason="numba comes with the ffcv extra")
    from fastrefine.loaders.crop_sampler import jitted
    n = 50_000
    h, w = _sizes(n)
    idx = np.random.default_rng(1).permutation(3 * n)[:n]
    a = draw_boxes(seed=7, epoch=3, indices=idx, heights=h, widths=w, scale=scale, ratio=ratio)
    b = jitted().boxes(np.int64(7), np.int64(3), idx.astype(np.uint64), h, w, scale[0], scale[1],
                       float(np.log(ratio[0])), float(np.log(ratio[1])))
    assert np.array_equal(a, b)
    assert np.array_equal(draw_flips(seed=7, epoch=3, indices=idx), jitted().flips(np.int64(7), np.int64(3),
                                                                                   idx.astype(np.uint64), 0.5))
    # one sample at a time (numba's scalar random_box, as FFCV's decoder calls it) gives the same box
    k = jitted()
    for i in range(0, n, 5_000):
        key = k.sample_key(np.int64(7), np.int64(3), np.uint64(idx[i]), np.uint64(1))
        got = k.random_box(np.uint64(key), np.int64(h[i]), np.int64(w[i]), scale[0], scale[1], float(np.log(ratio[0])),
                           float(np.log(ratio[1])))
        assert tuple(int(v) for v in got) == tuple(a[i])


def test_boxes_fit_the_image_and_depend_on_seed_epoch_index_and_size_only():
    h, w = _sizes(5_000, seed=2)
    idx = np.arange(5_000)
    b = draw_boxes(seed=1, epoch=0, indices=idx, heights=h, widths=w)
    top, left, bh, bw = b.T
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # a batch is the same whatever else is drawn with it, in whatever order
    perm = np.random.default_rng(0).permutation(5_000)[:300]
    assert np.array_equal(b[perm], draw_boxes(seed=1, epoch=0, indices=idx[perm], heights=h[perm], widths=w[perm]))
    big = np.minimum(h, w) >= 50        # a 1 px strip has one box whatever the draw
    for other in (dict(seed=1, epoch=1), dict(seed=2, epoch=0)):
        assert (b != draw_boxes(**other, indices=idx, heights=h, widths=w))[big].any(axis=1).mean() > 0.9
    flips = draw_flips(seed=1, epoch=0, indices=np.arange(20_000))
    assert 0.48 < flips.mean() < 0.52
    assert not draw_flips(seed=1, epoch=0, indices=idx, prob=0.0).any()
    assert draw_flips(seed=1, epoch=0, indices=idx, prob=1.0).all()


def test_train_crops_reads_seed_scale_ratio_and_flip_from_the_options():
    opts = LoaderOptions(split="train", batch_size=4, resolution=32, device=CPU, seed=9, scale=(0.5, 1.0),
                         ratio=(1.0, 1.0))
    boxes, flips = train_crops(opts, epoch=2, indices=[3, 4, 5], heights=[100, 80, 60], widths=[100, 90, 70])
    assert np.array_equal(boxes, draw_boxes(seed=9, epoch=2, indices=[3, 4, 5], heights=[100, 80, 60],
                                            widths=[100, 90, 70], scale=(0.5, 1.0), ratio=(1.0, 1.0)))
    assert (boxes[:, 2] == boxes[:, 3]).all()          # ratio 1: square boxes
    assert np.array_equal(flips, draw_flips(seed=9, epoch=2, indices=[3, 4, 5]))
    no_flip = LoaderOptions(split="train", batch_size=4, resolution=32, device=CPU, seed=9, flip=False)
    assert not train_crops(no_flip, epoch=2, indices=range(100), heights=50, widths=50)[1].any()


def test_normalization_scale_shift_is_the_float64_formula_rounded_once():
    norm = Normalization(IMAGENET_MEAN, IMAGENET_STD, torch.bfloat16)
    scale, shift = norm.scale_shift()
    assert scale.dtype == shift.dtype == np.float32 and scale.shape == (3,)
    px = np.arange(256, dtype=np.float64)[:, None]
    exact = (px / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.abs(px * scale + shift - exact).max() < 2e-6
    mean, std = norm.pixel_mean_std()
    assert np.allclose(mean, np.array(IMAGENET_MEAN) * 255) and np.allclose(std, np.array(IMAGENET_STD) * 255)
    ts, tsh = norm.scale_shift_tensors(CPU)
    assert ts.shape == (1, 3, 1, 1) and ts.dtype == torch.float32 and torch.equal(ts.view(3), torch.from_numpy(scale))
    opts = LoaderOptions(split="val", batch_size=1, resolution=8, device=CPU, dtype=torch.float16)
    assert opts.normalization == Normalization(IMAGENET_MEAN, IMAGENET_STD, torch.float16)


@pytest.mark.parametrize("bad, word", [(dict(rank=2, world_size=2), "rank 2 is outside world_size 2"),
                                       (dict(rank=-1), "rank -1"), (dict(resolution=0), "resolution"),
                                       (dict(batch_size=0), "batch_size"), (dict(split="test"), "split"),
                                       (dict(scale=(0.5, 0.1)), "scale"), (dict(ratio=(0.0, 1.0)), "ratio"),
                                       (dict(std=(0.2, 0.0, 0.2)), "std"), (dict(val_crop_ratio=1.5), "val_crop_ratio")])
def test_loader_options_are_checked_once_for_every_backend(bad, word):
    kw = dict(split="train", batch_size=4, resolution=32, device=CPU)
    with pytest.raises(UsageError, match=word):
        LoaderOptions(**{**kw, **bad})
    opts = LoaderOptions(**kw)
    assert opts.with_resolution(48).resolution == 48
    with pytest.raises(UsageError, match="resolution must be positive"):
        opts.with_resolution(0)
