#!/usr/bin/env python
"""Refinery overhead with the refinery's BatchNorm folded and kept, in one process.

    .venv/bin/python tools/refinery_overhead.py [--pairs small_resnet:small_resnet,small_resnet:resnet50]

For each student:refinery pair (bf16 autocast on the CPU, channels-last, synthetic tensors): the
student's train step alone, the step with the refinery (BN folded, the default, and kept), and the
refinery's forward alone (both ways). Every step is assembled by `round.build_round` (through
`fastrefine.bench.step`), exactly as `fastrefine run` assembles it, and timed with the benchmark
protocol of `fastrefine.bench` (warm-up, then the median of `--repeats` blocks of `--iters` calls).
"""
from __future__ import annotations

import argparse

import torch

from fastrefine.bench import measure, make_record, spread, write_json
from fastrefine.bench.step import bench_recipe, flops_bound, make_bench_step, synthetic_batch


def ms(fn, *, iters: int, repeats: int) -> dict:
    seconds = measure(fn, warmup=2, iters=iters, repeats=repeats, sync=lambda: None)
    return spread([1000 * s / iters for s in seconds])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="small_resnet:small_resnet,small_resnet:resnet18,small_resnet:resnet50,"
                                       "resnet18:resnet18,resnet18:resnet50")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    common = dict(resolution=args.resolution, batch_size=args.batch_size, precision="bf16", device="cpu",
                  channels_last=True, compile=False)
    x, y = synthetic_batch(batch_size=args.batch_size, resolution=args.resolution, num_classes=args.classes,
                           device=cpu, dtype=torch.float32, channels_last=True)
    timing = dict(iters=args.iters, repeats=args.repeats)
    rows = []
    for pair in args.pairs.split(","):
        s_name, r_name = pair.split(":")
        plain, _ = make_bench_step(bench_recipe(student=s_name, refinery=None, **common), num_classes=args.classes,
                                   device=cpu)
        row = {"student": s_name, "refinery": r_name, "step_ms": ms(lambda: plain.step(x, y), **timing)}
        for fold in (True, False):
            parts, env = make_bench_step(bench_recipe(student=s_name, refinery=r_name, refinery_options={"fold_bn": fold},
                                                      **common), num_classes=args.classes, device=cpu)
            key = "" if fold else "_bn_kept"
            row[f"step_with_refinery{key}_ms"] = ms(lambda: parts.step(x, y), **timing)

            def forward(model=parts.refinery.model, ac=env.precision.autocast):
                with torch.inference_mode(), ac():
                    model(x)
            row[f"refinery_forward{key}_ms"] = ms(forward, **timing)
        row["bound"] = flops_bound(student=s_name, refinery=r_name, num_classes=args.classes,
                                   resolution=args.resolution)["bound"]
        med = {k: v["median"] for k, v in row.items() if isinstance(v, dict)}
        row["ratio"] = med["step_with_refinery_ms"] / med["step_ms"]
        row["ratio_bn_kept"] = med["step_with_refinery_bn_kept_ms"] / med["step_ms"]
        row["ratio_over_bound"] = row["ratio"] / row["bound"]
        rows.append(row)
        print(f"{s_name} + {r_name}: step {med['step_ms']:.1f} ms, with refinery {med['step_with_refinery_ms']:.1f} "
              f"(BN kept {med['step_with_refinery_bn_kept_ms']:.1f}); ratio {row['ratio']:.2f} "
              f"(BN kept {row['ratio_bn_kept']:.2f}), bound {row['bound']:.2f}; refinery forward "
              f"{med['refinery_forward_ms']:.1f} ms (BN kept {med['refinery_forward_bn_kept_ms']:.1f})", flush=True)
    if args.json:
        write_json(args.json, make_record(command="tools/refinery_overhead.py", settings=vars(args), results=rows))


if __name__ == "__main__":
    main()
