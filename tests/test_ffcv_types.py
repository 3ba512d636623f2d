"""FFCV 1.0.2's memory managers made numba's shared (interned) array types read-only in place; the
dispatchers holding those types as keys then printed `Exception ignored ... KeyError` between rounds.
loaders/ffcv_runtime.py builds read-only copies instead."""

import subprocess
import sys

import pytest

from helpers import convert_in_child, write_recipe


def test_ffcv_state_types_leave_numbas_shared_types_alone():
    import numba as nb

    from fastrefine.loaders.ffcv_runtime import import_ffcv
    import_ffcv()
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager
    shared = [nb.uint8[::1], nb.uint8[:, ::1], nb.uint64[::1], nb.uint32[::1]]
    before = [(t.mutable, hash(t)) for t in shared]
    os_state = OSCacheManager.state_type.fget(None)
    process_state = ProcessCacheManager.state_type.fget(None)
    assert [(t.mutable, hash(t)) for t in shared] == before
    assert all(t.mutable for t in shared)
    assert not os_state.types[0].mutable and not any(t.mutable for t in process_state.types)


@pytest.mark.slow
def test_no_numba_keyerror_between_ffcv_rounds(tmp_path, demo_tree):
    data = tmp_path / "fast"
    convert_in_child(demo_tree, data, formats=("ffcv",), max_side=32, workers=1, progress=False)
    rounds = '[[rounds]]\nname = "r0"\nepochs = 1\n[[rounds]]\nname = "r1"\nepochs = 1\n'
    p = write_recipe(tmp_path, data, name="ffcv", run={"max_steps_per_epoch": 3, "max_val_batches": 2},
                     rounds=rounds)
    p.write_text(p.read_text().replace('backend = "torch"', 'backend = "ffcv"'))
    res = subprocess.run([sys.executable, "-m", "fastrefine", "run", str(p)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs/ffcv/r1/done.json").is_file()
    assert "Exception ignored" not in res.stderr and "KeyError" not in res.stderr, res.stderr[-3000:]
