"""Batches made ahead on a background thread, on a CUDA stream of its own, handed to the training
stream safely (the torch backend's decode thread).

`prefetch(items, make, device=...)` iterates `items` (a DataLoader) and calls `make(item)` for each on
one background thread, at most `depth` finished batches ahead of the consumer. On CUDA that thread works
on its own stream:

* before each batch the decode stream waits for the work queued so far on the training stream (the
  stream that was current where the iteration started), so the decode never runs ahead of the memory
  that training hands back;
* after each batch the thread records an event; the consumer makes the training stream wait for that
  event (`wait_stream` at the batch's own point, not at whatever the thread queued after it) and calls
  `record_stream` on every tensor of the batch, so the caching allocator does not give the batch's
  memory back to the decode stream while training kernels may still read it.

On the CPU the same thread runs without streams (the tests run this path). An exception in the thread
is raised in the consumer; stopping early (break, close, an error in the loop) stops the thread and
joins it before the generator returns.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


def prefetch(items: Iterable, make: Callable, *, device: torch.device, depth: int = 2) -> Iterator:
    """Yield `make(item)` for each item of `items`, made on a background thread `depth` batches ahead."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    cuda = device.type == "cuda"
    consumer = torch.cuda.current_stream(device) if cuda else None
    stream = torch.cuda.Stream(device) if cuda else None
    source = iter(items)   # made here, on the consumer's thread (a DataLoader starts its workers here)
    done: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                done.put(obj, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            ctx = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
            with ctx, torch.no_grad():
                for item in source:
                    if stop.is_set():
                        return
                    if cuda:
                        stream.wait_stream(consumer)
                    batch = make(item)
                    event = stream.record_event() if cuda else None
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))

    thread = threading.Thread(target=work, name="fastrefine-decode", daemon=True)
    thread.start()
    try:
        while True:
            got = done.get()
            if got is _END:
                return
            if isinstance(got, _Failed):
                raise got.error
            batch, event = got
            if cuda:
                consumer.wait_event(event)
                for t in _tensors(batch):
                    if t.is_cuda:
                        t.record_stream(consumer)
            yield batch
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                done.get_nowait()
        thread.join()
