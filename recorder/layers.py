"""The layer table of a model: every module that owns parameters directly, and what a Recorder copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bbdecoder.analyzer.trace import format as fmt
from .distributed import UNSUPPORTED, original_type, shard_slice

__all__ = ["LayerInfo", "layer_table", "weight_layout", "select", "param_targets", "table_lines"]


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table: a module that owns parameters directly."""

    id: int
    name: str
    type: str
    n_params: int
    selected: bool


def _clean(name: str) -> str:
    """A dotted name without FSDP1's ``_fsdp_wrapped_module`` components (the bare model's name)."""
    return ".".join(c for c in name.split(".") if c != "_fsdp_wrapped_module")


def weight_layout(m: torch.nn.Module) -> str | None:
    """``"in_out"`` for a module whose 2-D ``weight`` is stored (in features, out features) and applied
    as ``y = x @ W + b``: Hugging Face's ``Conv1D`` (GPT-2, GPT, ...; weight ``(nx, nf)``), recognised by
    its class name and ``nx``/``nf`` attributes, never by importing transformers. None otherwise
    (the torch convention, output units on axis 0)."""
    w = getattr(m, "weight", None)
    if (type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))):
        return fmt.WEIGHT_IN_OUT
    return None


def layer_table(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[dict]]:
    """The modules owning parameters directly, ids in ``named_modules`` order, and their table rows
    (the manifest's ``layers``: id, name, type, class, params [{name, key, shape, dtype, numel,
    requires_grad, and ``shard_dim`` 0 for a parameter sharded along dim 0 (FSDP2)}], n_params, key).
    Names and types are those of the bare model: FSDP1's ``_fsdp_wrapped_module`` components are
    dropped and FSDP2's ``FSDP<Name>`` classes are recorded as ``<Name>``; shapes are full shapes.

    Shared parameters (tied weights such as GPT-2's ``transformer.wte.weight`` / ``lm_head.weight``, or
    one module at two places) are recorded once: the first row that holds a parameter owns it and
    lists its other names in ``aliases``; a later row's entry says ``tied_to`` (the owner's dotted name),
    is never recorded and does not count in that row's ``n_params`` (so the ``n_params`` add up to the
    model's unique parameters). A module reachable under several names lists the others in the row's
    ``aliases``. A weight stored (in, out) (see :func:`weight_layout`) sets ``weight_layout``.

    Returns:
        (modules, table): ``modules[i]`` is the module of ``table[i]`` (id ``i``).
    """
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(_clean(n))
    module_names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(m), []).append(_clean(n))
    owner: dict[int, str] = {}
    modules: list[torch.nn.Module] = []
    table = []
    for name, m in model.named_modules():
        ps = list(m.named_parameters(recurse=False))
        if not ps:
            continue
        pkeys = fmt.assign_keys([n for n, _ in ps])
        t = original_type(m)
        name = _clean(name)
        params = []
        own = 0
        for (n, p), k in zip(ps, pkeys):
            full = f"{name}.{n}" if name else n
            q = {"name": n, "key": k, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                 "numel": p.numel(), "requires_grad": bool(p.requires_grad)}
            if isinstance(shard_slice(p), dict):
                q["shard_dim"] = 0
            if id(p) in owner:
                q["tied_to"] = owner[id(p)]
            else:
                owner[id(p)] = full
                own += p.numel()
                others = [a for a in dict.fromkeys(names_of.get(id(p), [])) if a != full]
                if others:
                    q["aliases"] = others
            params.append(q)
        row = {"id": len(table), "name": name, "type": t.__name__, "class": f"{t.__module__}.{t.__qualname__}",
               "params": params, "n_params": int(own)}
        also = [a for a in dict.fromkeys(module_names.get(id(m), [])) if a != name]
        if also:
            row["aliases"] = also
        if weight_layout(m):
            row["weight_layout"] = weight_layout(m)
        table.append(row)
        modules.append(m)
    for L, key in zip(table, fmt.assign_keys([L["name"] for L in table])):
        L["key"] = key
    return modules, table


def select(layers: Any, table: list[dict], modules: list[torch.nn.Module]) -> list[int]:
    """Resolve the Recorder's ``layers`` option (see :func:`analyzer.trace.format.select_layers`;
    module classes and modules are matched here) and mark each row's ``selected``.

    Returns:
        Sorted ids of the selected layers.

    Raises:
        ValueError: an item selects nothing.
    """
    def type_match(item, rec):
        m = modules[rec["id"]]
        if isinstance(item, type):
            return isinstance(m, item)
        if isinstance(item, torch.nn.Module):
            return item is m
        return False

    try:
        selected = fmt.select_layers(layers, table, type_match)
    except fmt.TraceError as e:
        raise ValueError(str(e)) from None
    sel = set(selected)
    for L in table:
        L["selected"] = L["id"] in sel
    return selected


def param_targets(table: list[dict], modules: list[torch.nn.Module], replicated: bool = True
                  ) -> tuple[list, list, list]:
    """What ``step()`` copies of the selected layers: ``(grad_targets, weight_targets, refused)``;
    the targets are lists of ``(layer_key, param_key, parameter, attrs)``, gradients only of
    parameters that require them.

    Args:
        replicated: whether this rank records the parameters every rank holds whole (``record_rank``).
            A parameter sharded along dim 0 (FSDP2) is recorded on every rank, each its own slice:
            its attrs carry ``offset`` (first row) and ``global_shape``. A tied parameter is a target
            once, under the row that owns it, when any row holding it is selected.

    Returns:
        ``refused``: dotted names of DTensor parameters of another layout (not recorded).
    """
    grad_targets, weight_targets, refused = [], [], []
    # a tied parameter is recorded once, under its owner's row, if any row holding it is selected
    wanted = {q["tied_to"] for L in table if L["selected"] for q in L["params"] if "tied_to" in q}
    for L in table:
        m = modules[L["id"]]
        for pinfo, (pname, p) in zip(L["params"], m.named_parameters(recurse=False)):
            full = f"{L['name']}.{pname}" if L["name"] else pname
            if "tied_to" in pinfo or not (L["selected"] or full in wanted):
                continue
            sl = shard_slice(p)
            if sl == UNSUPPORTED:
                refused.append(f"{L['name']}.{pname}" if L["name"] else pname)
                continue
            if sl is None and not replicated:
                continue
            attrs = {"layer_id": L["id"], "layer": L["name"], "param": pname}
            if sl is not None:
                attrs.update(offset=sl["offset"], global_shape=sl["global_shape"])
            weight_targets.append((L["key"], pinfo["key"], p, attrs))
            if p.requires_grad:
                grad_targets.append((L["key"], pinfo["key"], p, attrs))
    return grad_targets, weight_targets, refused


def table_lines(table: list[dict]) -> list[str]:
    """The layer table as aligned text lines (id, name, type, parameter count, ``*`` if recorded); a
    tied parameter is named after its layer (``lm_head (weight = transformer.wte.weight)``)."""
    def name(L):
        tied = [f"{q['name']} = {q['tied_to']}" for q in L["params"] if "tied_to" in q]
        return (L["name"] or "(root)") + (f" ({'; '.join(tied)})" if tied else "")

    rows = [("id", "name", "type", "params", "rec")]
    rows += [(str(L["id"]), name(L), L["type"], f"{L['n_params']:,}", "*" if L["selected"] else "")
             for L in table]
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join([r[0].rjust(w[0]), r[1].ljust(w[1]), r[2].ljust(w[2]),
                              r[3].rjust(w[3]), r[4]]).rstrip() for r in rows]
