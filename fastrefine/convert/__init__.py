"""`fastrefine convert`: an ImageNet-style folder -> FFCV `.beton` files and DALI webdataset shards.

See docs/convert.md. The CLI calls `convert_dataset`; everything else here is an implementation detail.
Heavy modules (rich, ffcv) are imported inside the call so that the decode workers, which import this
package, start quickly.
"""

from __future__ import annotations

from pathlib import Path

from .options import FFCV_MODES, FORMATS, ConvertOptions


def convert_dataset(*, src: Path, out: Path, layout: str, options: ConvertOptions | None = None,
                    **settings) -> dict:
    """Convert SRC (layout "imagenet" or "folder") into OUT and return the manifest dict written there.

    Settings come as `options` (a ConvertOptions), as keywords named like its fields
    (`formats=("dali",), workers=2, ...`), or both (the keywords replace those of `options`).

    Unreadable images are skipped and listed in the manifest's `skipped`; a missing or empty source,
    an empty class folder, a val class absent from train, an OUT inside SRC, an OUT that holds another
    dataset or an OUT another convert is writing raise UsageError before anything is written. A rerun
    redoes only what is missing; `force=True` redoes everything.
    """
    from .core import convert

    opts = ConvertOptions.from_keywords(options, **settings)
    return convert(src=Path(src), out=Path(out), layout=layout, options=opts)


__all__ = ["convert_dataset", "ConvertOptions", "FORMATS", "FFCV_MODES"]
