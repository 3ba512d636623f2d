"""`fastrefine convert`: an ImageNet-style folder -> FFCV `.beton` files and DALI webdataset shards.

See docs/convert.md. The CLI calls `convert_dataset`; everything else here is an implementation detail.
Heavy modules (rich, ffcv) are imported inside the call so that the decode workers, which import this
package, start quickly.
"""

from __future__ import annotations

from pathlib import Path


def convert_dataset(*, src: Path, out: Path, layout: str,
                    formats: tuple[str, ...] = ("ffcv", "dali"), max_side: int = 256, quality: int = 90,
                    workers: int | None = None, splits: tuple[str, ...] = ("train", "val"),
                    limit_per_class: int | None = None, force: bool = False,
                    ffcv_mode: str = "proportion", shard_size: int = 1000, progress: bool = True) -> dict:
    """Convert SRC (layout "imagenet" or "folder") into OUT and return the manifest dict written there.

    Unreadable images are skipped and listed in the manifest's `skipped`; a missing or empty source,
    a val class absent from train, or an OUT that holds another dataset raise UsageError before
    anything is written. A rerun redoes only what is missing; `force=True` redoes everything.
    """
    from .core import convert

    return convert(src=Path(src), out=Path(out), layout=layout, formats=tuple(formats), max_side=max_side,
                   quality=quality, workers=workers, splits=tuple(splits), limit_per_class=limit_per_class,
                   force=force, ffcv_mode=ffcv_mode, shard_size=shard_size, progress=progress)


__all__ = ["convert_dataset"]
