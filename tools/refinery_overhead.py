#!/usr/bin/env python
"""Per-part breakdown of the refinery overhead on the CPU: student step, step with refinery, refinery
forward with fp32 or bf16 weights, student forward (small_resnet pair, 64 px, batch 32, bf16)."""
import time

import torch

from fastrefine.models import create_model
from fastrefine.engine import resolve_precision, make_optimizer, build_step
from fastrefine.refinery import make_loss, NoRefinery, Refinery, no_jitter
torch.set_num_threads(2)
p = resolve_precision("bf16", torch.device("cpu"))
def mk(name): return create_model(name, num_classes=10).to(memory_format=torch.channels_last)
x = torch.randn(32,3,64,64).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(32,))
def timeit(fn, n=8, reps=5):
    for _ in range(2): fn()
    ts=[]
    for _ in range(reps):
        t=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t)/n)
    return sorted(ts)[len(ts)//2]*1000
s = mk("small_resnet"); opt = make_optimizer(s, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5, decay_norm_and_bias=False)
step0 = build_step(student=s, refinery=NoRefinery(), loss_fn=make_loss(refined=False), jitter=no_jitter, optimizer=opt, scaler=p.scaler(), autocast=p.autocast, clip=lambda m: None)
ref = Refinery(mk("small_resnet"))
step1 = build_step(student=s, refinery=ref, loss_fn=make_loss(refined=True), jitter=no_jitter, optimizer=opt, scaler=p.scaler(), autocast=p.autocast, clip=lambda m: None)
def fwd_ref():
    with p.autocast(): ref(x)
refb = Refinery(mk("small_resnet").to(torch.bfloat16))
def fwd_refb():
    with p.autocast(): refb(x)
def fwd_stu():
    with torch.no_grad(), p.autocast(): s(x)
sa, sr = timeit(lambda: step0(x,y)), timeit(lambda: step1(x,y))
print(f"student step {sa:.1f} ms; with refinery {sr:.1f} ms; ratio {sr/sa:.2f}")
print(f"refinery fwd fp32-weights {timeit(fwd_ref):.1f} ms; bf16-weights {timeit(fwd_refb):.1f} ms; student fwd no-grad {timeit(fwd_stu):.1f} ms")
