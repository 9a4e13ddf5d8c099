"""torchrun / accelerate multi-process helpers: rank, world size, and agreeing on values.

Every helper is a no-op in a single process, so the training code reads the same either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from accelerate import PartialState


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun / accelerate environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def init(device: str) -> None:
    """Start the process group early (gloo on CPU), so ranks can agree on names and paths."""
    if world()[2] > 1 and not dist.is_initialized():
        PartialState(cpu=device == "cpu", backend="gloo" if device == "cpu" else None)


def shared(value: Any) -> Any:
    """Rank 0's `value` on every rank (identity when not distributed)."""
    if world()[2] <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[2] > 1:
        dist.barrier()
