"""The converter's settings: one frozen dataclass, checked once, passed through unchanged.

`convert_dataset(src=..., out=..., layout=..., options=ConvertOptions(...))`, or the same fields as
keywords (`convert_dataset(..., formats=("dali",), workers=2)`), which build a `ConvertOptions`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..errors import UsageError

FORMATS = ("ffcv", "dali")
# How a `.beton` stores each image (FFCV's RGBImageField write modes, same meanings):
#   jpg         the cleaned JPEG bytes as they are (the DALI shards hold the same bytes)
#   raw         the cleaned JPEG decoded once by FFCV's own TurboJPEG call: uint8 HxWx3
#   proportion  jpg or raw per image, half each, chosen by a seeded draw (same file on every run)
#   smart       as FFCV with no threshold: raw for every image
FFCV_MODES = ("jpg", "proportion", "smart", "raw")


@dataclass(frozen=True)
class ConvertOptions:
    formats: tuple[str, ...] = FORMATS          # a subset of FORMATS; stored in FORMATS order
    max_side: int = 256                         # longer side of the cleaned images (never enlarged)
    quality: int = 90                           # JPEG quality of the cleaned images
    workers: int | None = None                  # decode processes; None: all cores
    splits: tuple[str, ...] = ("train", "val")
    limit_per_class: int | None = None          # at most K images per class (quick subsets)
    force: bool = False                         # redo every file, even those a rerun would keep
    ffcv_mode: str = "proportion"               # see FFCV_MODES
    shard_size: int = 1000                      # candidate files per webdataset shard
    progress: bool = True                       # rich progress bars and the summary table
    strict: bool = False                        # skip JPEGs on which libjpeg warns (else kept and listed)

    def __post_init__(self) -> None:
        formats = tuple(self.formats)
        bad = [f for f in formats if f not in FORMATS]
        if not formats or bad or len(set(formats)) != len(formats):
            raise UsageError(f"formats {formats!r}: expected one or both of {', '.join(FORMATS)}")
        object.__setattr__(self, "formats", tuple(f for f in FORMATS if f in formats))
        object.__setattr__(self, "splits", tuple(self.splits))
        if self.ffcv_mode not in FFCV_MODES:
            raise UsageError(f"ffcv_mode {self.ffcv_mode!r}: expected one of {', '.join(FFCV_MODES)}")
        if not 1 <= self.max_side <= 65535:
            raise UsageError(f"max_side={self.max_side}: expected 1..65535")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"quality={self.quality}: expected 1..100")
        if self.shard_size < 1:
            raise UsageError(f"shard_size={self.shard_size}: expected a positive number")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"workers={self.workers}: expected a positive number")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise UsageError(f"limit_per_class={self.limit_per_class}: expected a positive number")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise UsageError(f"splits {self.splits!r}: expected distinct split names such as train, val")

    @property
    def processes(self) -> int:
        """The number of decode processes this run uses."""
        return self.workers or os.cpu_count() or 1

    @classmethod
    def from_keywords(cls, base: "ConvertOptions | None" = None, **settings) -> "ConvertOptions":
        """`base` (or the defaults) with `settings` replaced; an unknown name is a TypeError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"convert_dataset: unknown setting(s) {', '.join(unknown)}; "
                            f"expected some of {', '.join(sorted(known))}")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
        values.update(settings)
        return cls(**values)
