#!/usr/bin/env python
"""Refinery overhead, part by part, with the refinery's BatchNorm folded and not, in one process.

    .venv/bin/python tools/refinery_overhead.py [--pairs small_resnet:small_resnet,small_resnet:resnet50]

For each student:refinery pair (bf16 autocast on the CPU, channels-last, 64 px, batch 32, 10
classes, synthetic tensors): the student's train step alone, the step with the refinery (BN folded,
the default, and BN kept), the refinery's forward alone (both ways) and the student's own no-grad
forward, each the median of `--repeats` blocks of `--iters` calls after warm-up; then the measured
ratio step+refinery / step next to the FLOPs bound 1 + F_r / (3 F_s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastrefine.bench.step import flops_bound
from fastrefine.engine import build_step, make_optimizer, resolve_precision
from fastrefine.models import create_model
from fastrefine.refinery import NoRefinery, Refinery, make_loss, no_jitter


def timeit(fn, *, iters: int, repeats: int) -> float:
    """Median milliseconds per call over `repeats` blocks of `iters` calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    blocks = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        blocks.append((time.perf_counter() - t) / iters)
    return statistics.median(blocks) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="small_resnet:small_resnet,small_resnet:resnet18,small_resnet:resnet50,"
                                       "resnet18:resnet18,resnet18:resnet50")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    prec = resolve_precision("bf16", torch.device("cpu"))
    cl = torch.channels_last
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (args.batch_size,))
    timing = dict(iters=args.iters, repeats=args.repeats)
    rows = []
    for pair in args.pairs.split(","):
        s_name, r_name = pair.split(":")
        torch.manual_seed(0)
        student = create_model(s_name, num_classes=10).to(memory_format=cl)
        opt = make_optimizer(student, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5,
                             decay_norm_and_bias=False)
        common = dict(student=student, jitter=no_jitter, optimizer=opt, scaler=prec.scaler(),
                      autocast=prec.autocast, clip=lambda m: None)
        plain_step = build_step(refinery=NoRefinery(), loss_fn=make_loss(refined=False), **common)
        refineries = {fold: Refinery(create_model(r_name, num_classes=10).to(memory_format=cl), fold_bn=fold)
                      for fold in (True, False)}
        steps = {fold: build_step(refinery=ref, loss_fn=make_loss(refined=True), **common)
                 for fold, ref in refineries.items()}

        def forward(model, grad_off=torch.inference_mode):
            def call():
                with grad_off(), prec.autocast():
                    model(x)
            return call

        row = {"student": s_name, "refinery": r_name,
               "step_ms": timeit(lambda: plain_step(x, y), **timing),
               "step_with_refinery_ms": timeit(lambda: steps[True](x, y), **timing),
               "step_with_refinery_bn_kept_ms": timeit(lambda: steps[False](x, y), **timing),
               "refinery_forward_ms": timeit(forward(refineries[True].model), **timing),
               "refinery_forward_bn_kept_ms": timeit(forward(refineries[False].model), **timing),
               "student_forward_ms": timeit(forward(student, torch.no_grad), **timing),
               "bound": flops_bound(student=s_name, refinery=r_name, num_classes=10,
                                    resolution=args.resolution)["bound"]}
        row["ratio"] = row["step_with_refinery_ms"] / row["step_ms"]
        row["ratio_bn_kept"] = row["step_with_refinery_bn_kept_ms"] / row["step_ms"]
        row["ratio_over_bound"] = row["ratio"] / row["bound"]
        rows.append(row)
        print(f"{s_name} + {r_name}: step {row['step_ms']:.1f} ms, with refinery {row['step_with_refinery_ms']:.1f} "
              f"(BN kept {row['step_with_refinery_bn_kept_ms']:.1f}); ratio {row['ratio']:.2f} "
              f"(BN kept {row['ratio_bn_kept']:.2f}), bound {row['bound']:.2f}, ratio/bound "
              f"{row['ratio_over_bound']:.2f}; refinery forward {row['refinery_forward_ms']:.1f} ms "
              f"(BN kept {row['refinery_forward_bn_kept_ms']:.1f}), student forward {row['student_forward_ms']:.1f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
