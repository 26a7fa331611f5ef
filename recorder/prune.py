"""Applying a pruning plan (see :mod:`analyzer.pruning`) to a torch model with torch.nn.utils.prune masks.

    from bbdecoder.recorder.prune import apply_plan
    summary = apply_plan(model, "plan.json")     # or the plan dict from run.pruning_plan(...)

Structured entries mask the producer's weight rows (and bias entries) of the removed units (columns
for a weight stored (in, out), entry axis 1: HF ``Conv1D``), the rows of per-channel normalisations that
depend on them (axis 0), and the consumer's input units: weight columns (axis 1), or rows of an (in, out)
weight (axis 0, role "consumer"); with group k each unit is k consecutive input features. Magnitude
entries mask every weight with |w| <= the plan's threshold in the model's current weights. Masks only
zero weights (no speed-up); ``permanent=True`` folds them into the weights (torch.nn.utils.prune.remove).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as _prune

from bbdecoder.analyzer.trace.plans import fingerprint_difference, load_plan, validate_plan

__all__ = ["apply_plan", "model_params", "model_sparsity"]


def model_params(model: nn.Module) -> list[list]:
    """``[[full parameter name, shape], ...]`` in the recorder's order (modules in named_modules order,
    each module's own parameters). A parameter already pruned (``weight_orig`` with a ``weight_mask``)
    counts under its original name, so plans can be applied one after another. A DDP/DataParallel
    wrapper is looked through (names without ``module.``, as the recorder writes them)."""
    from .distributed import unwrap_model
    model = unwrap_model(model)
    out = []
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if pname.endswith("_orig") and hasattr(m, pname[:-5] + "_mask"):
                pname = pname[:-5]
            out.append([f"{mname}.{pname}" if mname else pname, [int(s) for s in p.shape]])
    return out


def _weight(m: nn.Module, name: str) -> torch.Tensor:
    """The effective (masked) value of a parameter."""
    return getattr(m, name)


def _own_weights(model: nn.Module):
    """``(name, module, effective weight)`` of every module with a ``weight`` parameter (or a pruned
    ``weight_orig``), each parameter object once: a weight tied to an earlier module's (GPT-2's
    ``lm_head`` and ``transformer.wte``) is counted there only."""
    seen = set()
    for mname, m in model.named_modules():
        p = m._parameters.get("weight_orig", m._parameters.get("weight"))
        w = getattr(m, "weight", None)
        if p is None or not isinstance(w, torch.Tensor) or id(p) in seen:
            continue
        seen.add(id(p))
        yield mname, m, w


def model_sparsity(model: nn.Module) -> dict:
    """Fraction of zero weights per module with a ``weight`` (effective values, masks applied) and over
    all of them: ``{"layers": {name: fraction}, "overall": fraction, "zeros": int, "weights": int}``
    (a tied weight once, under the first module that holds it)."""
    layers, zeros, total = {}, 0, 0
    with torch.no_grad():
        for mname, m, w in _own_weights(model):
            z = int((w == 0).sum())
            layers[mname] = z / w.numel() if w.numel() else 0.0
            zeros += z
            total += w.numel()
    return {"layers": layers, "overall": zeros / total if total else 0.0, "zeros": zeros, "weights": total}


def apply_plan(model: nn.Module, plan: Any, permanent: bool = False) -> dict:
    """Apply a pruning plan to ``model`` with torch.nn.utils.prune masks.

    Args:
        model: the model the plan was computed for (same parameter names and shapes).
        plan: the plan's JSON file path, or the plan dict.
        permanent: fold the masks into the weights (prune.remove): the zeros stay, the masks go.

    Returns:
        ``{"layers": {name: {"masked": zeros in the weight mask, "weights": elements,
        "masked_fraction": ...}}, "overall": masked fraction over every module's weight,
        "expected": the plan's expected_sparsity}`` (fractions of the masks now on the model).

    Raises:
        ValueError: the plan is malformed, of a format version this bbdecoder does not read (a newer
            one: upgrade; it reads 1 and 2, see :data:`analyzer.trace.plans.SUPPORTED_PLAN_VERSIONS`), or
            its model fingerprint (parameter names and shapes) does not match ``model``. TraceError: the
            file cannot be read.
    """
    from .distributed import unwrap_model
    model = unwrap_model(model)   # plans name layers as the recorder does: without DDP's "module."
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    elif isinstance(plan, dict):
        validate_plan(plan, "pruning plan")
    else:
        raise TypeError("plan must be a path to a plan file or a plan dict")
    diff = fingerprint_difference(plan["model_fingerprint"]["params"], model_params(model))
    if diff is not None:
        raise ValueError(f"the pruning plan does not fit this model: {diff} (the plan was made for the model "
                         f"recorded in {plan.get('run')!r})")
    modules = dict(model.named_modules())
    masks: dict[tuple[str, str], torch.Tensor] = {}

    def mask_of(mname: str, pname: str) -> torch.Tensor | None:
        m = modules[mname]
        p = getattr(m, pname, None)
        if not isinstance(p, torch.Tensor):
            return None
        key = (mname, pname)
        if key not in masks:
            masks[key] = torch.ones(p.shape, dtype=p.dtype, device=p.device)
        return masks[key]

    def rows(mname: str, units: list[int], axis: int = 0) -> None:
        """Mask the units on weight ``axis`` (rows, or columns of an (in, out) weight) and their biases."""
        w = mask_of(mname, "weight")
        idx = torch.as_tensor(units, dtype=torch.long, device=w.device)
        w.index_fill_(axis, idx, 0)
        b = getattr(modules[mname], "bias", None)
        if isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == w.shape[axis]:
            mask_of(mname, "bias").index_fill_(0, idx, 0)

    with torch.no_grad():
        for e in plan["layers"]:
            mname = e["layer"]
            if plan["criterion"]["name"] == "magnitude":
                w = _weight(modules[mname], "weight")
                mask_of(mname, "weight").mul_((w.abs() > float(e["magnitude_threshold"])).to(w.dtype))
                continue
            rows(mname, e["units"], int(e.get("axis", 0)))
            for nx in e.get("next", []):
                if nx["axis"] == 0 and "role" not in nx:   # a per-channel normalisation
                    rows(nx["layer"], nx["units"])
                else:   # a consumer: its input units (columns, or rows of an (in, out) weight); no bias
                    k = int(nx.get("group", 1))
                    w = mask_of(nx["layer"], "weight")
                    cols = [u * k + j for u in nx["units"] for j in range(k)]
                    w.index_fill_(int(nx["axis"]), torch.as_tensor(cols, dtype=torch.long, device=w.device), 0)
        for (mname, pname), mk in masks.items():
            _prune.custom_from_mask(modules[mname], pname, mask=mk)
            if permanent:
                _prune.remove(modules[mname], pname)

    touched = sorted({mname for mname, pname in masks if pname == "weight"})
    layers = {}
    masked_all, total_all = 0, 0
    with torch.no_grad():
        for mname, m, w in _own_weights(model):
            mk = getattr(m, "weight_mask", None)
            z = int((mk == 0).sum()) if isinstance(mk, torch.Tensor) else (int((w == 0).sum()) if permanent
                                                                           and mname in touched else 0)
            masked_all += z
            total_all += w.numel()
            if mname in touched:
                layers[mname] = {"masked": z, "weights": int(w.numel()),
                                 "masked_fraction": z / w.numel() if w.numel() else 0.0}
    return {"layers": layers, "overall": masked_all / total_all if total_all else 0.0,
            "expected": plan.get("expected_sparsity")}
