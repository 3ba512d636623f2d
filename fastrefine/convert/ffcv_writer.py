"""Write one split's `.beton` with FFCV's own DatasetWriter, fed from the already-clean shards.

FFCV never sees a source file: its workers index `CleanSamples`, which reads the JPEG bytes that the
convert pool already produced (by byte offset inside the shard tars, so nothing is decoded twice from
the source) and hands FFCV a uint8 HxWx3 RGB array and an int label. FFCV then stores each image raw
or as JPEG according to `write_mode`.
"""

from __future__ import annotations

import _thread
import io
import multiprocessing
import os
import threading
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..errors import RunError
from .shards import PARTIAL

WRITE_MODES = ("jpg", "proportion", "smart", "raw")
_MIN_PAGE = 1 << 23       # FFCV's default page size (8 MiB)


class CleanSamples:
    """A torch-style indexed dataset over JPEG bytes inside shard tars: `ds[i] -> (HxWx3 uint8, label)`."""

    def __init__(self, *, tar_paths: list[Path], records: list[dict[str, Any]]):
        self.tar_paths = [str(p) for p in tar_paths]
        shard, offset, size, label = [], [], [], []
        for number, record in enumerate(records):
            for m in record["members"]:
                shard.append(number)
                offset.append(m["offset"])
                size.append(m["bytes"])
                label.append(m["label"])
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self.label = np.asarray(label, dtype=np.int64)
        self._fds: dict[tuple[int, int], int] = {}
        self.failed = multiprocessing.get_context("fork").Event()   # shared with FFCV's forked workers     # (pid, shard) -> fd; pread keeps forked copies apart

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        shard = int(self.shard[i])
        data = os.pread(self._fd(shard), int(self.size[i]), int(self.offset[i]))
        try:
            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img.convert("RGB"))
        except Exception as e:
            self.failed.set()
            raise RunError(f"{self.tar_paths[shard]}: sample {i} at byte {int(self.offset[i])} "
                           f"is not the JPEG the shard record promised ({e})") from None
        return np.ascontiguousarray(arr), int(self.label[i])

    def _fd(self, shard: int) -> int:
        key = (os.getpid(), shard)
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self.tar_paths[shard], os.O_RDONLY)
            self._fds[key] = fd
        return fd


def page_size_for(max_side: int) -> int:
    """A power-of-two page that holds at least two raw images of `max_side` squared."""
    need = 2 * max_side * max_side * 3
    page = _MIN_PAGE
    while page < need:
        page <<= 1
    return page


@contextmanager
def _tqdm_silenced(silence: bool) -> Iterator[None]:
    """FFCV draws its own tqdm bar on stderr; send it to /dev/null while FFCV writes, if asked."""
    if not silence:
        yield
        return
    with open(os.devnull, "w") as null, redirect_stderr(null):
        yield


@contextmanager
def _fail_if_a_worker_dies(*, path: Path, failed: Any) -> Iterator[None]:
    """FFCV's DatasetWriter waits forever when one of its worker processes dies; turn that into RunError.

    A watcher thread looks at `failed` (an Event the dataset sets before it raises) and at the child
    processes it has seen; when one fails, it interrupts the waiting main thread, and the interrupt is
    reported as a RunError naming the file.
    """
    known = {p.pid for p in multiprocessing.active_children()}
    stop, died, seen = threading.Event(), [], {}

    def watch() -> None:
        while not stop.wait(0.1):
            seen.update((c.pid, c) for c in multiprocessing.active_children() if c.pid not in known)
            codes = [c.exitcode for c in seen.values() if c.exitcode not in (None, 0)]
            if failed.is_set() or codes:
                died.append(codes[0] if codes else "unknown")
                _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="ffcv-writer-watch", daemon=True)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:
        if died:
            raise RunError(f"{path}: an FFCV DatasetWriter worker failed (exit code {died[0]}, its error is "
                           f"printed above unless progress is off); nothing was kept, rerun to retry") from None
        raise
    finally:
        stop.set()
        watcher.join()


def write_beton(*, path: Path, samples: CleanSamples, write_mode: str, max_side: int, quality: int,
                workers: int, progress: bool) -> None:
    """Write `path` via `path.partial` and rename it into place only when FFCV has finished."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = path.with_name(path.name + PARTIAL)
    tmp.unlink(missing_ok=True)
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=quality),
              "label": IntField()}
    writer = DatasetWriter(str(tmp), fields, page_size=page_size_for(max_side), num_workers=workers)
    try:
        with _tqdm_silenced(not progress), _fail_if_a_worker_dies(path=path, failed=samples.failed):
            writer.from_indexed_dataset(samples, chunksize=max(1, min(100, len(samples) // max(1, workers))))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
