"""The few DDP helpers both the data layer and the tasks need, written once.

They work without a process group too (one process): ``distributed()`` is then false, ``rank()`` 0 and
``gather_objects(x)`` is ``[x]``, so callers need no special case.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, one entry per rank in rank order; ``[obj]`` without DDP."""
    if not distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without DDP."""
    if not distributed():
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=src)
    return shared[0]
