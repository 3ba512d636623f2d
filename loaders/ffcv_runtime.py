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
    _fix_state_types()


def _fix_state_types() -> None:
    """FFCV 1.0.2's memory managers build their state types as `t = nb.uint8[::1]; t.mutable = False`:
    `nb.uint8[::1]` is numba's one interned type of every writable C-contiguous uint8 vector, so each
    call made that shared type read-only in place and changed its hash under every dict that already
    held it as a key. The symptom: numba's finalizer of a dispatcher freed between rounds printed
    `Exception ignored ... KeyError: (Array(uint8, 1, 'C', True, aligned=True), ...)` (its `overloads`
    could no longer find its own keys). The same types, made as read-only copies instead; a no-op
    once applied or when FFCV no longer mutates them."""
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager
    if getattr(OSCacheManager, "_fastrefine_state_type", False):
        return

    def readonly(t):
        return t.copy(readonly=True)

    def os_cache_state_type(self):
        # FFCV's intent: the data read-only, the two index vectors as they are (its second
        # `t1.mutable = False` was meant for t2, which it never changed)
        return nb.types.Tuple([readonly(nb.uint8[::1]), nb.uint64[::1], nb.uint64[::1]])

    def process_cache_state_type(self):
        return nb.types.Tuple([readonly(nb.uint8[:, ::1]), readonly(nb.uint64[::1]), readonly(nb.uint64[::1]),
                               readonly(nb.uint32[::1])])

    def os_cache_compile_reader(self):
        # FFCV's reader (a sample's bytes: a slice of the read-only memory map), typed with the read-only
        # copy where FFCV named the type it had made read-only in place
        from ffcv.pipeline.compiler import Compiler

        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]
        return Compiler.compile(read, readonly(nb.uint8[::1])(nb.uint64, self.state_type))

    OSCacheManager.state_type = property(os_cache_state_type)
    OSCacheManager.compile_reader = os_cache_compile_reader
    ProcessCacheManager.state_type = property(process_cache_state_type)
    OSCacheManager._fastrefine_state_type = True


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
