"""Shared fixtures: real Fashion-MNIST images exported as a small ImageNet-style JPEG tree (CPU tests), and a
generated tree (`synthetic_tree`) for the gpu-marked tests, which run on a bare GPU host without the data set."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from fastrefine.fashion_mnist import FASHION_MNIST_DIR, export_fashion_mnist

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs in tools/gpu_check.sh")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold the names of parent folders
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _suite_tmpdir(tmp_path_factory):
    """The suite's temporary directory, for this process and every subprocess it starts (TMPDIR):
    torchrun's torchelastic_*, multiprocessing's pymp-*, torch.compile's cache and whatever a killed
    run leaves all land under pytest's base temp, which pytest deletes after a passing run, instead of
    piling up in /tmp from one run of the suite to the next. torch.compile's cache is named on its own:
    importing torch.utils.flop_counter (fastrefine.models does) already fixed TORCHINDUCTOR_CACHE_DIR
    from the temp dir of collection time."""
    path = tmp_path_factory.mktemp("tmp")
    before_module = tempfile.tempdir
    settings = {"TMPDIR": str(path), "TORCHINDUCTOR_CACHE_DIR": str(path / "torchinductor")}
    before_env = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    tempfile.tempdir = str(path)
    yield path
    tempfile.tempdir = before_module
    for key, value in before_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """A real-image ImageFolder tree: 10 classes x 40 train / 20 val Fashion-MNIST photos at 32 px."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Debian's dataset-fashion-mnist is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("demo") / "fashion-mnist"
    export_fashion_mnist(root, size=32, limit_per_class=40, workers=1, progress=False)
    # val keeps only 20 per class to stay fast
    for cls in (root / "val").iterdir():
        if cls.is_dir():
            for f in sorted(cls.iterdir())[20:]:
                f.unlink()
    return root


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    """A generated ImageFolder tree a small net learns (fastrefine/synthetic.py): 10 classes x 40 train /
    10 val JPEGs of mixed sizes (48x40, 40x48, 32x32). Needs no data set: the gpu-marked tests use it."""
    from fastrefine.synthetic import write_synthetic_tree
    root = tmp_path_factory.mktemp("synthetic") / "tree"
    write_synthetic_tree(root, classes=10, train_per_class=40, val_per_class=10)
    return root


def pytest_terminal_summary(terminalreporter):
    """The CUDA peak of the session, where it used CUDA (tools/gpu_check.sh reads it per part)."""
    if HAS_CUDA and torch.cuda.is_initialized():
        mib = torch.cuda.max_memory_allocated() / 2**20
        terminalreporter.write_line(f"CUDA max_memory_allocated in this session: {mib:,.0f} MiB")


@pytest.fixture(autouse=True)
def _few_threads():
    """The CI machine has 2 cores; keep torch from oversubscribing them across DataLoader workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
