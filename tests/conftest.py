"""Shared test helpers: seeded randomness, BN statistics that make equality checks meaningful, work done once
per session however many pytest-xdist workers ask for it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from torch import nn

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
# One thread per pytest-xdist worker (``make test`` runs one worker per core: two processes of two threads
# each would only fight for the cores); two without xdist.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """The real-SLURM tests first: their jobs train in SLURM's processes while the pytest worker that holds
    them mostly waits, so under ``make test-long``'s two workers (``--dist loadfile``, which hands out modules
    in this order) the other worker's training runs beside them instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _environment():
    """Each test sees the environment the session started with: an in-process fit leaves Lightning's variables
    (``PL_GLOBAL_SEED``, ``LOCAL_RANK``, ...) behind, and a later test's subprocess would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]):
    """``build(folder)`` run once for the whole session, its (JSON) result shared by every worker.

    Under pytest-xdist each worker is its own process with its own session fixtures: the first worker to ask
    builds into a folder beside all workers' temporary folders, under a file lock, and records the result;
    the others wait on the lock and read it. (xdist's ``loadgroup`` would pin the users to one worker, but
    its groups have no effect under pytest 9.2, which derives node ids anew.)"""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    folder = base / f"once-{name}"
    with FileLock(str(base / f"once-{name}.lock")):
        done = folder / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        folder.mkdir(exist_ok=True)
        result = build(folder)
        done.write_text(json.dumps(result))
        return result


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (freshly built ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model
