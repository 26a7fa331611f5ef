"""torch.distributed awareness: this process's rank, the ranks that record, and DDP wrappers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["dist_info", "check_ranks", "barrier", "unwrap_model"]


def dist_info() -> tuple[int, int]:
    """(rank, world size) from the initialised process group; (0, 1) without one."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def barrier(world_size: int) -> None:
    """Wait for every rank (a no-op for one process or without an initialised process group)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_ranks(ranks: Any, world_size: int) -> list[int] | None:
    """``activation_ranks`` as a sorted list of ranks (None: every rank). ValueError if malformed."""
    if ranks is None:
        return None
    try:
        items = [ranks] if isinstance(ranks, int) and not isinstance(ranks, bool) else list(ranks)
        out = sorted({int(r) for r in items if isinstance(r, int) and not isinstance(r, bool)})
        ok = len(out) == len(set(items)) and all(0 <= r < world_size for r in out)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"activation_ranks must be None, a rank or a list of ranks in [0, {world_size}), "
                         f"not {ranks!r}")
    return out


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (else ``model``), so
    that layer names are the same with and without DDP (no ``module.`` prefix). Hooks on the inner
    module fire when the wrapper runs it.

    Returns:
        The innermost wrapped ``torch.nn.Module``.
    """
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
