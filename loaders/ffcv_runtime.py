"""FFCV as fastrefine runs it: imported without touching torch's threads, an epoch thread that knows
(seed, epoch) and reports its death, the (seed, epoch) buffer the epoch-seeded operations read, and the
rank-strided traversal order. See fastrefine.loaders.ffcv for why each exists.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import time
from typing import Sequence

import numpy as np
import torch


@contextlib.contextmanager
def keep_torch_threads():
    """Restore this thread's torch thread count after FFCV code that sets it (FFCV's
    `Compiler.set_num_threads` calls `torch.set_num_threads`)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def import_ffcv() -> None:
    """Import FFCV without letting its import-time `Compiler.set_num_threads(1)` change torch's threads.
    Every FFCV import of fastrefine goes through here first (later imports are no-ops)."""
    with keep_torch_threads():
        import ffcv.fields.rgb_image  # noqa: F401
        import ffcv.libffcv  # noqa: F401
        import ffcv.loader  # noqa: F401


def params_query():
    """The (seed, epoch) pair an epoch-seeded operation reads, one per sample slot (filled per epoch)."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    return AllocationQuery((2,), np.dtype("<i8"))


@functools.lru_cache(maxsize=None)
def epoch_class():
    import_ffcv()
    from ffcv.loader.epoch_iterator import EpochIterator

    class Epoch(EpochIterator):
        """FFCV's EpochIterator with three changes: its thread starts only once the (seed, epoch)
        buffers of the epoch-seeded operations are filled; an exception in the thread is kept in
        `error` (the consumer polls `is_alive`); `stop()` ends the thread even when nobody reads on."""

        def __init__(self, loader, order, *, seed: int, epoch: int):
            self.error: BaseException | None = None
            self._hold = True
            super().__init__(loader, order)  # ends with self.start(): held until the buffers are filled
            for node_id, node in loader.graph.id_to_node.items():
                op = getattr(node, "operation", None) or getattr(node, "decoder", None)
                if getattr(op, "epoch_seeded", False):
                    self.memory_allocations["operation"][node_id][-1][...] = (seed, epoch)
            self._hold = False
            self.start()

        def start(self):
            if not self._hold:
                super().start()

        def run(self):
            try:
                super().run()  # its Compiler.set_num_threads changes this thread's torch threads only
            except BaseException as e:  # noqa: BLE001  reported to the consumer by the loader
                self.error = e

        def stop(self, *, timeout: float = 120.0) -> bool:
            """End the thread (it finishes the batch in hand) and release the epoch's memory context."""
            self.terminate_event.set()
            self.iter_ixes = iter(())  # no further batch: the thread's next() ends the epoch
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    while True:  # room for the thread's last put (the end-of-epoch marker)
                        self.output_queue.get_nowait()
                self.join(0.05)
            if self.is_alive():
                return False
            self.close()
            return True

        def close(self):
            self.terminate_event.set()
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)

    return Epoch


class RankStrideOrder:
    """An FFCV traversal order (FFCV calls `order(loader)` on the instance it is handed): one global
    permutation per epoch from (seed, epoch), rank r keeps positions r, r+W, ... cut to N // W."""

    def __init__(self, *, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, loader):
        from ffcv.traversal_order.base import TraversalOrder
        outer = self

        class _Bound(TraversalOrder):
            def sample_order(self, epoch: int) -> Sequence[int]:
                return outer.sample_order(self.indices, epoch)

        return _Bound(loader)

    def sample_order(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(self.seed + epoch).permutation(indices)
        per_rank = len(indices) // self.world_size
        return perm[self.rank::self.world_size][:per_rank]


def as_ffcv_order(order):
    """Register RankStrideOrder as a virtual TraversalOrder so FFCV's isinstance check accepts it."""
    from ffcv.traversal_order.base import TraversalOrder
    TraversalOrder.register(RankStrideOrder)
    return order
