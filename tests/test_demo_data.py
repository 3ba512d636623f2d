import numpy as np
from PIL import Image

from fastrefine.fashion_mnist import CLASS_NAMES, WNIDS, export_fashion_mnist, load_fashion_mnist, select


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
