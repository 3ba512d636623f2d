#!/usr/bin/env python
"""The walk of one batch, measured: which of fastrefine's functions a training batch passes through, from
the epoch loop taking it from the loader to `last.pt` on disk, traced rather than read.

It runs a two-round chain (labels -> refined) on a generated JPEG tree in a temporary folder on the CPU
(torch loader, workers 0, so every call stays in this process), 2 steps an epoch, and traces the
refined round (the refinery is on the path) with `sys.setprofile` in every thread: from the first call of
`engine.train_epoch` until `last.pt` has been renamed into place. The refined round has 2 epochs and
evaluates every 2nd, so its first epoch reaches `last.pt` without an evaluation (not the batch's path). It counts, over the distinct call edges between functions of `fastrefine/` and `loaders/`:

    edges           distinct caller -> callee pairs (a reader follows each once, and climbs back once)
    module hops     the edges whose callee lives in another module than its caller (another file to open)
    modules         the modules the walk touches
    into round.py   the distinct edges entering round.py from another module

    .venv/bin/python tools/walk.py            # prints the counts; --edges lists every edge
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path



def _ours(filename: str, roots: tuple[str, ...]) -> bool:
    return filename.startswith(roots)


def _name(frame, roots: tuple[str, ...]) -> tuple[str, str]:
    path = frame.f_code.co_filename
    for root in roots:
        if path.startswith(root):
            rel = os.path.relpath(path, os.path.dirname(root.rstrip("/")))
            break
    return rel, getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


class Tracer:
    """Counts call edges, in every thread, from the first call of `engine.train_epoch` until `last.pt` is in
    place. The traced round has 2 epochs and evaluates every 2, so its first epoch ends in `last.pt` with no
    evaluation on the way. Comprehension frames are not functions a reader jumps to, and are skipped."""

    INLINE = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots
        self.active = False
        self.done = False
        self.edges: dict[tuple, int] = {}

    def profile(self, frame, event, arg):
        if event != "call" or self.done:
            return
        code = frame.f_code
        if not _ours(code.co_filename, self.roots):
            return
        if not self.active:
            if code.co_name == "train_epoch" and code.co_filename.endswith("engine.py"):
                self.active = True
            else:
                return
        if code.co_name in self.INLINE:
            return
        caller = frame.f_back
        while caller is not None and (not _ours(caller.f_code.co_filename, self.roots)
                                      or caller.f_code.co_name in self.INLINE):
            caller = caller.f_back
        src = _name(caller, self.roots) if caller is not None else ("(thread)", threading.current_thread().name)
        dst = _name(frame, self.roots)
        if src != dst:
            self.edges[(src, dst)] = self.edges.get((src, dst), 0) + 1


def _recipe(data: Path, out: Path) -> str:
    return f"""
[run]
name = "walk"
out = "{out}"
device = "cpu"
precision = "fp32"
progress = false
eval_every = 2
max_steps_per_epoch = 2
max_val_batches = 1
[data]
path = "{data}"
[loader]
backend = "torch"
batch_size = 8
workers = 0
resolution = 32
[model]
name = "tiny_cnn"
options = {{width = 4}}
[[rounds]]
name = "labels"
epochs = 1
[[rounds]]
name = "refined"
epochs = 2
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", action="store_true", help="list every edge")
    ap.add_argument("--data", type=Path, default=None,
                    help="an ImageFolder root with train/ and val/ (not set: a generated tree in a temporary folder)")
    a = ap.parse_args(argv)
    import fastrefine
    from fastrefine import loaders
    from fastrefine.chain import run_recipe
    from fastrefine.recipe import load_recipe
    roots = tuple(sorted({str(Path(fastrefine.__file__).parent) + os.sep, str(Path(loaders.__file__).parent) + os.sep}))
    tmp = Path(tempfile.mkdtemp(prefix="fastrefine-walk-"))
    try:
        data = a.data.resolve() if a.data is not None else tmp / "data"
        if a.data is None:
            from fastrefine.synthetic import write_synthetic_tree
            write_synthetic_tree(data, classes=4, train_per_class=8, val_per_class=2)
        (tmp / "walk.toml").write_text(_recipe(data, tmp / "runs"))
        recipe = load_recipe(tmp / "walk.toml")
        tracer = Tracer(roots)
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if tracer.active and os.fspath(dst).endswith(os.sep + "refined" + os.sep + "last.pt"):
                tracer.done = True

        # the labels round untraced, then the refined round traced: chain.py calls run_round by the name
        # it imported, so that name is wrapped for the duration of the run
        import fastrefine.chain as chain_mod
        real_run_round = chain_mod.run_round
        tracing = [False]

        def run_round(env, index):
            tracing[0] = env.recipe.rounds[index].name == "refined"
            try:
                return real_run_round(env, index)
            finally:
                tracing[0] = False

        def gate(frame, event, arg):
            if tracing[0]:
                tracer.profile(frame, event, arg)

        os.replace, chain_mod.run_round = replace, run_round
        sys.setprofile(gate)
        threading.setprofile(gate)
        try:
            run_recipe(recipe)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            os.replace, chain_mod.run_round = real_replace, real_run_round
        if not tracer.done:
            print("the trace never saw refined/last.pt written", file=sys.stderr)
            return 1
        edges = tracer.edges
        hops = [(s, d) for s, d in edges if s[0] != d[0]]
        modules = sorted({m for s, d in edges for m in (s[0], d[0]) if m != "(thread)"})
        into_round = [(s, d) for s, d in hops if d[0].endswith("round.py")]
        print(f"edges {len(edges)}, module hops {len(hops)}, modules {len(modules)}, into round.py {len(into_round)}")
        print("modules:", ", ".join(modules))
        if a.edges:
            for (s, d), n in sorted(edges.items()):
                print(f"  {s[0]}:{s[1]} -> {d[0]}:{d[1]}  x{n}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
