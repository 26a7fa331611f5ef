"""torch.distributed awareness: this process's rank, the ranks that record, DDP and FSDP wrappers, and
the slices of sharded parameters (FSDP2 / DTensor)."""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["dist_info", "check_ranks", "barrier", "unwrap_model", "original_type", "uses_fsdp1", "local",
           "shard_slice", "UNSUPPORTED"]


def _loaded(module: str, name: str) -> Any:
    """``module.name`` if ``module`` is already imported, else None. A model that holds DTensors or
    FSDP modules has imported their modules; looking them up instead of importing them keeps
    ``import bbdecoder.recorder`` and a Recorder on an ordinary model from loading
    torch.distributed.tensor (about 0.7 s)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


#: :func:`shard_slice` of a DTensor whose layout the recorder cannot place (not one Shard(0) on a 1-D mesh)
UNSUPPORTED = "unsupported"


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
    that layer names are the same with and without DDP (no ``module.`` prefix), and inside
    ``torch.compile``'s ``OptimizedModule`` (no ``_orig_mod.`` prefix; hooks on the inner module run
    inside the compiled region). Hooks on the inner module fire when the wrapper runs it.

    Returns:
        The innermost wrapped ``torch.nn.Module``.
    """
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel) + _fsdp1_classes()
    compiled = _compiled_class()   # torch.compile's OptimizedModule: the model is its ``_orig_mod``
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def _compiled_class() -> type | None:
    """``torch.compile``'s module wrapper class (None while Dynamo is not loaded: then no model is one)."""
    mod = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(mod, "OptimizedModule", None)


def _fsdp1_classes() -> tuple:
    cls = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    return (cls,) if cls is not None else ()


def uses_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` is or contains a ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    cls = _fsdp1_classes()
    return bool(cls) and any(isinstance(m, cls) for m in model.modules())


def original_type(m: torch.nn.Module) -> type:
    """The class of ``m`` as the user wrote it: ``fully_shard`` (FSDP2) turns a ``Linear`` into an
    ``FSDPLinear`` subclass; this is ``Linear`` again (else ``type(m)``)."""
    t = type(m)
    FSDPModule = _loaded("torch.distributed.fsdp", "FSDPModule")
    if FSDPModule is not None and issubclass(t, FSDPModule):
        return next((c for c in t.__mro__ if not issubclass(c, FSDPModule)), t)
    return t


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``t``: the local slice of a DTensor (no communication), else ``t``."""
    DTensor = _loaded("torch.distributed.tensor", "DTensor")
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def shard_slice(p: torch.Tensor) -> dict | str | None:
    """Where this rank's slice of a sharded parameter lies in the full tensor.

    Returns:
        None for an ordinary tensor; for a DTensor sharded along dim 0 on a 1-D mesh (FSDP2's
        layout) ``{"offset": first row, "rows": rows held here, "global_shape": [full shape]}``
        (rows follow ``torch.chunk``: ceil(n / mesh size) per rank, the last ones shorter or empty);
        :data:`UNSUPPORTED` for any other layout (replicated, 2-D meshes, other dims).
    """
    DTensor = _loaded("torch.distributed.tensor", "DTensor")
    Shard = _loaded("torch.distributed.tensor", "Shard")
    if DTensor is None or not isinstance(p, DTensor):
        return None
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) \
            or placements[0].dim != 0 or p.ndim == 0:
        return UNSUPPORTED
    coord = mesh.get_coordinate()
    if coord is None:   # this rank is not in the parameter's mesh
        return UNSUPPORTED
    n, world = int(p.shape[0]), int(mesh.size())
    per = -(-n // world)
    offset = min(int(coord[0]) * per, n)
    rows = int(p.to_local().shape[0])
    if rows != max(0, min(per, n - offset)):
        return UNSUPPORTED
    return {"offset": offset, "rows": rows, "global_shape": [int(d) for d in p.shape]}
