import numpy as np
from PIL import Image

from fastrefine.fashion_mnist import (CLASS_NAMES, WNIDS, export_fashion_mnist, export_imagenet_like,
                                      load_fashion_mnist, select)


def test_export_matches_source(tmp_path):
    out = tmp_path / "fm"
    counts = export_fashion_mnist(out, size=40, limit_per_class=5, workers=1, progress=False)
    assert counts == {"train": 50, "val": 50}
    images, labels = load_fashion_mnist("train")
    idx = select(labels, 5)
    for i in idx[:12]:
        path = out / "train" / WNIDS[labels[i]] / f"{i:05d}.JPEG"
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (40, 40) and im.format == "JPEG"
            small = np.asarray(im.convert("L").resize((28, 28), Image.BICUBIC), dtype=np.float32)
        # the JPEG is the source photo, upscaled: it matches its own source far better than another one
        own = np.abs(small - images[i]).mean()
        other = np.abs(small - images[(i + 1) % len(images)]).mean()
        assert own < 20 and own < other
    per_class = {w: len(list((out / "train" / w).glob("*.JPEG"))) for w in WNIDS}
    assert set(per_class.values()) == {5}
    mapping = (out / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == f"{WNIDS[0]} {CLASS_NAMES[0]}" and len(mapping) == 10


def test_export_is_idempotent(tmp_path):
    out = tmp_path / "fm"
    export_fashion_mnist(out, size=32, limit_per_class=2, workers=1, progress=False)
    f = next((out / "train" / WNIDS[3]).glob("*.JPEG"))
    before = f.stat().st_mtime_ns
    export_fashion_mnist(out, size=32, limit_per_class=2, workers=1, progress=False)
    assert f.stat().st_mtime_ns == before


def test_imagenet_like_tree_has_imagenet_sized_detailed_photos(tmp_path):
    out = tmp_path / "il"
    assert export_imagenet_like(out, images=20, classes=2) == {"train": 20, "val": 2}
    files = sorted((out / "train" / "class1").glob("*.jpg"))
    assert len(files) == 10 and len(list((out / "val").rglob("*.jpg"))) == 2
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.mode == "RGB"
    # a mosaic of 30 photos has the detail of a photograph: far more bytes than one upscaled photo
    flat = export_imagenet_like(tmp_path / "up", images=20, classes=2, content="upscaled")
    assert flat == {"train": 20, "val": 2}
    mosaic_bytes = sum(f.stat().st_size for f in files)
    upscaled_bytes = sum(f.stat().st_size for f in (tmp_path / "up" / "train" / "class1").glob("*.jpg"))
    assert mosaic_bytes > 2 * upscaled_bytes
    before = files[0].stat().st_mtime_ns
    export_imagenet_like(out, images=20, classes=2)  # the same settings again: nothing rewritten
    assert files[0].stat().st_mtime_ns == before
