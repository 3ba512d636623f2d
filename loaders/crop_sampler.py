"""The one crop sampler of every backend: RandomResizedCrop boxes and horizontal flips, one draw per
(seed, epoch, sample index).

A counter-based generator: `sample_key(seed, epoch, index, stream)` mixes its inputs with splitmix64's
finaliser, `uniform(key, n)` is the n-th draw of that key in [0, 1). Nothing is stateful, so a sample's
box and flip depend on (seed, epoch, index) and its image size only: not on the backend, threads,
workers, batch, order or the point an epoch was resumed from (a loader can skip the samples an epoch
already consumed and draw the rest as before).

The box follows torchvision's `RandomResizedCrop.get_params`: ten tries of (area in `scale` x the
image's area, log-uniform aspect in `ratio`), the first that fits is placed uniformly; else the whole
image cut to the ratio range, centred. Try t reads draws 4t .. 4t + 3 (area, aspect, top, left).

Two forms of the same arithmetic:
* numpy, vectorised over a batch (`draw_boxes`, `draw_flips`, `train_crops`): the torch and DALI
  backends, and `fastrefine inspect`. Needs only numpy.
* numba, per sample (`jitted()`: `random_box`, `flip_draw`, ...): FFCV's compiled decoder and
  NormalizeCast call them inside their kernels. Built from the very same `mix` / `sample_key` /
  `uniform` source; tests/test_loaders.py checks that both forms give bit-equal boxes and flips.
"""

from __future__ import annotations

import functools
import types

import numpy as np

STREAM_CROP, STREAM_FLIP = 1, 2  # the independent draws of one sample: its crop box, its flip
TRIES = 10                       # RandomResizedCrop's tries before the centred fallback

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0


def _generator(jit):
    """mix / sample_key / uniform / random_box / flip_draw, each wrapped by `jit` (identity: numpy
    arrays or scalars; numba.njit: FFCV's kernels). uint64 arithmetic wraps, as splitmix64 wants."""

    @jit
    def mix(z):
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)

    @jit
    def sample_key(seed, epoch, index, stream):
        k = mix(np.uint64(seed) ^ _GOLDEN)
        k = mix(k ^ np.uint64(epoch))
        k = mix(k ^ np.uint64(index))
        return mix(k ^ np.uint64(stream))

    @jit
    def uniform(key, n):
        return np.float64(mix(key + np.uint64(n) * _GOLDEN) >> _S11) * _INV53

    @jit
    def flip_draw(seed, epoch, index, prob):
        return uniform(sample_key(seed, epoch, index, STREAM_FLIP), 0) < prob

    @jit
    def random_box(key, height, width, scale_lo, scale_hi, logr_lo, logr_hi):
        """(top, left, h, w) of one sample (scalars)."""
        area = np.float64(height * width)
        for t in range(TRIES):
            target = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * t))
            aspect = np.exp(logr_lo + (logr_hi - logr_lo) * uniform(key, 4 * t + 1))
            w = np.int64(np.rint(np.sqrt(target * aspect)))  # rint: half to even, as Python's round
            h = np.int64(np.rint(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = np.int64(uniform(key, 4 * t + 2) * (height - h + 1))
                left = np.int64(uniform(key, 4 * t + 3) * (width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        lo, hi = np.exp(logr_lo), np.exp(logr_hi)
        if in_ratio < lo:
            w, h = np.int64(width), np.int64(np.rint(width / lo))
        elif in_ratio > hi:
            h, w = np.int64(height), np.int64(np.rint(height * hi))
        else:
            w, h = np.int64(width), np.int64(height)
        return (height - h) // 2, (width - w) // 2, h, w

    return types.SimpleNamespace(mix=mix, sample_key=sample_key, uniform=uniform, flip_draw=flip_draw,
                                 random_box=random_box)


_np = _generator(lambda f: f)


@functools.lru_cache(maxsize=None)
def jitted():
    """The numba forms (compiled on first call; numba comes with the ffcv extra), plus `boxes` and
    `flips`, their batch loops, for tests and benches."""
    import numba

    k = _generator(numba.njit(nogil=True))
    random_box, sample_key, flip_draw = k.random_box, k.sample_key, k.flip_draw

    @numba.njit(nogil=True)
    def boxes(seed, epoch, indices, heights, widths, scale_lo, scale_hi, logr_lo, logr_hi):
        out = np.empty((len(indices), 4), np.int64)
        for i in range(len(indices)):
            key = sample_key(seed, epoch, indices[i], STREAM_CROP)
            out[i, 0], out[i, 1], out[i, 2], out[i, 3] = random_box(
                key, np.int64(heights[i]), np.int64(widths[i]), scale_lo, scale_hi, logr_lo, logr_hi)
        return out

    @numba.njit(nogil=True)
    def flips(seed, epoch, indices, prob):
        out = np.zeros(len(indices), np.bool_)
        for i in range(len(indices)):
            out[i] = flip_draw(seed, epoch, indices[i], prob)
        return out

    k.boxes, k.flips = boxes, flips
    return k


def _u64(values) -> np.ndarray:
    """Seeds, epochs and indices as uint64 arrays (negative values wrap, as numba's casts do)."""
    return np.asarray(values, dtype=np.int64).astype(np.uint64)


def _sizes(values, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(values, dtype=np.int64), (n,))


def draw_boxes(*, seed: int, epoch: int, indices, heights, widths, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """(n, 4) int64 boxes (top, left, h, w): the train crop of each sample in this epoch, for images of
    these heights and widths (arrays, or one size for all)."""
    idx = _u64(indices).reshape(-1)
    n = len(idx)
    height, width = _sizes(heights, n)[:, None], _sizes(widths, n)[:, None]
    s_lo, s_hi = float(scale[0]), float(scale[1])
    r_lo, r_hi = float(np.log(ratio[0])), float(np.log(ratio[1]))
    with np.errstate(over="ignore"):
        key = _np.sample_key(_u64(seed), _u64(epoch), idx, _u64(STREAM_CROP))[:, None, None]
        u = _np.uniform(key, np.arange(4 * TRIES, dtype=np.uint64).reshape(1, TRIES, 4))  # (n, tries, 4)
    area = (height * width).astype(np.float64)
    target = area * (s_lo + (s_hi - s_lo) * u[..., 0])
    aspect = np.exp(r_lo + (r_hi - r_lo) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    t = fits.argmax(axis=1)                 # the first try that fits (0 when none does)
    rows = np.arange(n)
    h, w = h[rows, t], w[rows, t]
    height, width = height[:, 0], width[:, 0]
    top = (u[rows, t, 2] * (height - h + 1)).astype(np.int64)
    left = (u[rows, t, 3] * (width - w + 1)).astype(np.int64)
    out = np.stack([top, left, h, w], axis=1)
    none = ~fits.any(axis=1)
    if none.any():                          # the centred fallback, as random_box's
        hh, ww = height[none], width[none]
        lo, hi = np.exp(r_lo), np.exp(r_hi)
        in_ratio = ww / hh
        fw = np.where(in_ratio < lo, ww, np.where(in_ratio > hi, np.rint(hh * hi).astype(np.int64), ww))
        fh = np.where(in_ratio < lo, np.rint(ww / lo).astype(np.int64), hh)
        out[none] = np.stack([(hh - fh) // 2, (ww - fw) // 2, fh, fw], axis=1)
    return out


def draw_flips(*, seed: int, epoch: int, indices, prob: float = 0.5) -> np.ndarray:
    """(n,) bool: which samples are mirrored left-right in this epoch."""
    idx = _u64(indices).reshape(-1)
    with np.errstate(over="ignore"):
        return _np.flip_draw(_u64(seed), _u64(epoch), idx, float(prob))


def train_crops(opts, *, epoch: int, indices, heights, widths) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (n, 4: top, left, h, w) and flips (n,) a loader with LoaderOptions `opts` uses for
    these samples in this epoch."""
    boxes = draw_boxes(seed=opts.seed, epoch=epoch, indices=indices, heights=heights, widths=widths,
                       scale=opts.scale, ratio=opts.ratio)
    return boxes, draw_flips(seed=opts.seed, epoch=epoch, indices=indices, prob=opts.flip_prob)
