"""`fastrefine bench`: throughput on this node, measured one way (DESIGN.md convention 8).

    fastrefine bench decode DATA             JPEG decode only: the ceiling a loader can reach
    fastrefine bench loader DATA             each loader backend alone, beside a torchvision baseline
    fastrefine bench step --model M          the training step alone on synthetic device tensors
    fastrefine bench train RECIPE            the trainer's own epoch loop end to end, and loader and step alone

protocol.py holds the one timing protocol; the tools import it from here.
"""

from .protocol import (MIN_REPEATS, PeakMemory, clock_name, cycle, first_call, make_record, make_sync, measure,
                       pick_device, rates, spread, time_batches, write_json)

__all__ = ["MIN_REPEATS", "PeakMemory", "clock_name", "cycle", "first_call", "make_record", "make_sync", "measure",
           "pick_device", "rates", "spread", "time_batches", "write_json"]
