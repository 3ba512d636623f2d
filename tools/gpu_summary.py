#!/usr/bin/env python
"""The one-screen summary of a `tools/gpu_check.sh` run, from the files its parts left in OUT.

    python tools/gpu_summary.py OUT        (prints the summary; gpu_check.sh also writes OUT/summary.txt)

Per part NAME, OUT holds NAME.status.json (rc and seconds, or why it was skipped), NAME.peak.json
(torch.cuda.max_memory_allocated of its processes, tools/cuda_peak.py) and its result NAME.json or
NAME.xml (pytest's JUnit XML). Each file is read by its exact name, so a status file is never taken
for a result. A missing or unreadable file prints as such; the summary itself never fails.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

STEP_TARGET = 5000          # img/s, ResNet-50 student + ResNet-50 refinery at 160 px on one H100/H200
DALI_RATIO_TARGET = 0.9     # the torch backend's nvJPEG decode against DALI's GPU decode


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest(out: Path, name: str) -> str:
    try:
        suite = ET.parse(out / f"{name}.xml").getroot()
    except (OSError, ET.ParseError):
        return "no JUnit XML"
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    line = f"{n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped"
    reasons: dict[str, int] = {}
    for s in suite.iter("skipped"):
        why = s.get("message", "")
        if why == "collection skipped" and s.text:    # a module skipped whole: its reason is in the text
            why = s.text.split("Skipped: ", 1)[-1].rstrip("')\"")
        why = why.split("Skipped: ", 1)[-1][:80]
        reasons[why] = reasons.get(why, 0) + 1
    return line + "".join(f"\n      {n} skipped: {why}" for why, n in sorted(reasons.items())[:6])


def _step(rec: dict) -> list[str]:
    lines = []
    for r in rec.get("results", []):
        rate = r["images_per_s"]["median"]
        mark = ""
        if r.get("refinery") and rec.get("settings", {}).get("resolution") == 160 and r.get("student") == "resnet50":
            mark = f"  target >= {STEP_TARGET:,}: {'met' if rate >= STEP_TARGET else 'MISSED'}"
        first = f", first call {r['first_call_s']:.1f} s" if r.get("first_call_s") is not None else ""
        c = r.get("compiles") or {}
        comp = f", {c['frames']} compiles" if c else ""
        lines.append(f"{r['case']}: {rate:,.0f} img/s, peak {r.get('peak_memory_mib', 0):,.0f} MiB{first}{comp}{mark}")
    return lines


def _loader(rec: dict) -> list[str]:
    lines, rates = [], {}
    for r in rec.get("results", []):
        if r.get("ok"):
            rates[r["backend"]] = rate = r["images_per_s"]["median"]
            lines.append(f"{r['backend']}: {rate:,.0f} img/s ({r['batch_shape'][0]}/batch, "
                         f"start-up {r['startup_s']:.1f} s)")
        else:
            lines.append(f"{r['backend']}: failed: {str(r.get('error', '?'))[:70]}")
    dev, dali = rates.get("torch[device]"), rates.get("dali")
    if dev and dali:
        ratio = dev / dali
        lines.append(f"torch nvJPEG / DALI = {ratio:.2f} (target >= {DALI_RATIO_TARGET}: "
                     f"{'met' if ratio >= DALI_RATIO_TARGET else 'MISSED'})")
    if dev and rates.get("torch[host]"):
        lines.append(f"device decode / host decode = {dev / rates['torch[host]']:.2f}")
    return lines


def _chain(rec: dict) -> list[str]:
    rounds = rec.get("rounds", [])
    return [", ".join(f"{r.get('round')}: val top-1 {r.get('val_top1', float('nan')):.3f}" for r in rounds)
            or "no round finished"] + [f"compiles: {c}" for c in rec.get("compiles", []) if c]


def _resume(rec: dict) -> list[str]:
    def start(v):
        e = v.get("resumed_after_epoch")
        return "started fresh" if e == 0 else f"resumed after epoch {e}"
    return [", ".join(f"{k}: {'done' if v.get('done') else 'not done'}, {start(v)}" for k, v in rec.items())
            or "no round"]


def summarize(out: Path) -> str:
    out = Path(out)
    env = _json(out / "environment.json") or {}
    lines = [f"fastrefine device check: {out}"]
    gpus = env.get("gpus") or []
    lines.append(f"GPU: {', '.join(gpus) if gpus else 'none (no CUDA)'}")
    if env.get("nvidia_smi"):
        lines.append(f"nvidia-smi: {env['nvidia_smi']}")
    lines.append(f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
                 f"torchvision {env.get('torchvision')}, Python {env.get('python')}, "
                 f"setuptools {env.get('setuptools')}; install: {env.get('install', '?')}")
    lines.append(f"DALI: {env.get('dali')}; FFCV: {env.get('ffcv')}")
    total = 0
    for st in sorted(out.glob("*.status.json")):
        s = _json(st)
        if not s:
            lines.append(f"{st.name}: unreadable")
            continue
        name = s["part"]
        if "skipped" in s:
            lines.append(f"{name:22s} {s['skipped']}")
            continue
        total += s.get("seconds", 0)
        peak = _json(out / f"{name}.peak.json") or {}
        mib = peak.get("max_memory_allocated_mib")
        mem = f"peak {mib:,.0f} MiB" if mib is not None else f"peak: {peak.get('why', 'not recorded')}"
        head = f"{name:22s} rc {s['rc']} in {s['seconds']} s, {mem}"
        if s.get("note"):
            head += f"; {s['note']}"
        lines.append(head)
        if name.startswith("a-"):
            body = [_pytest(out, name)]
        else:
            rec = _json(out / f"{name}.json")
            if rec is None:
                body = [f"no {name}.json"]
            elif name.startswith("b-"):
                body = _chain(rec)
            elif name.startswith("c-"):
                body = _resume(rec)
            elif name.startswith("d-"):
                body = _step(rec)
            elif name.startswith("e-"):
                body = _loader(rec)
            else:
                body = []
        lines += [f"    {b}" for b in body]
    lines.append(f"parts took {total} s")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: gpu_summary.py OUT", file=sys.stderr)
        return 2
    print(summarize(Path(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
