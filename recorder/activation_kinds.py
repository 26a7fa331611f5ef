"""Activation kinds: which torch functions and modules are activations, their bounds and sign, and
which modules and call sites an ``activations`` option selects.

The tables the activation capture (:mod:`recorder.activations`) and the function graph
(:mod:`recorder.graph`) classify calls and modules with.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

__all__ = ["FUNCS", "MODULE_KINDS", "BOUNDS", "HIST_BINS", "RELU_FAMILY", "NONNEG_KINDS", "NONNEG_MODULES",
           "LINEAR_STYLE", "CONV_STYLE", "module_kind", "call_bounds", "valid_bounds", "softmax_dim", "select_sites"]

F = nn.functional

#: kind -> (lower bound, upper bound) for bounded activations (hardtanh bounds come from the call)
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softmax": (0.0, 1.0), "hardtanh": (-1.0, 1.0),
          "relu6": (0.0, 6.0)}
HIST_BINS = 200
RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "silu", "softplus")
#: kinds whose outputs are never negative (then sum |h| = sum h, computed once)
NONNEG_KINDS = ("relu", "relu6", "sigmoid", "softmax", "softplus")


def _func_table() -> dict:
    """{torch function or method: activation kind} of every functional activation form."""
    t: dict = {}

    def add(kind, *fs):
        for f in fs:
            if f is not None:
                t[f] = kind

    T = torch.Tensor
    add("relu", F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_)
    add("sigmoid", torch.sigmoid, torch.sigmoid_, T.sigmoid, T.sigmoid_, getattr(torch.special, "expit", None))
    add("tanh", torch.tanh, torch.tanh_, T.tanh, T.tanh_)
    add("gelu", F.gelu)
    add("silu", F.silu)
    add("leaky_relu", F.leaky_relu, getattr(F, "leaky_relu_", None))
    add("elu", F.elu, getattr(F, "elu_", None))
    add("softplus", F.softplus)
    add("hardtanh", F.hardtanh, getattr(F, "hardtanh_", None))
    add("relu6", F.relu6)
    add("softmax", F.softmax, torch.softmax, T.softmax, getattr(torch.special, "softmax", None))
    return t


FUNCS = _func_table()
MODULE_KINDS = [(nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.GELU, "gelu"),
                (nn.SiLU, "silu"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.Softplus, "softplus"),
                (nn.ReLU6, "relu6"), (nn.Hardtanh, "hardtanh"), (nn.Softmax, "softmax")]
#: exact module types whose output is never negative (a subclass may override forward)
NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Softplus)
LINEAR_STYLE = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
#: modules whose (N, C, ...) outputs have their units (channels) on axis 1, also for 3-D outputs
CONV_STYLE = tuple(c for c in (
    getattr(nn.modules.conv, "_ConvNd", None), getattr(nn.modules.batchnorm, "_BatchNorm", None),
    getattr(nn.modules.instancenorm, "_InstanceNorm", None), nn.GroupNorm,
    getattr(nn.modules.pooling, "_MaxPoolNd", None), getattr(nn.modules.pooling, "_AvgPoolNd", None),
    getattr(nn.modules.pooling, "_AdaptiveAvgPoolNd", None), getattr(nn.modules.pooling, "_AdaptiveMaxPoolNd", None),
    getattr(nn.modules.pooling, "_LPPoolNd", None), nn.Dropout1d, nn.Dropout2d, nn.Dropout3d) if c is not None)


def module_kind(m: nn.Module) -> str | None:
    """The activation kind of a module ("relu", "sigmoid", ...; see :data:`MODULE_KINDS`), or None."""
    for cls, kind in MODULE_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def call_bounds(func, kind, args, kwargs) -> tuple[float, float] | None:
    """(lower, upper) bound of a functional call's outputs: :data:`BOUNDS`, or for hardtanh its
    ``min_val`` / ``max_val`` arguments; None when unbounded or the bounds are not valid."""
    if kind != "hardtanh":
        return BOUNDS.get(kind)
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return valid_bounds(lo, hi)


def valid_bounds(lo, hi) -> tuple[float, float] | None:
    """``(lo, hi)`` as floats if both are finite and ``lo < hi``, else None."""
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None


def softmax_dim(dim, ndim: int) -> int:
    """The axis a softmax normalises over (``dim=None``: torch's legacy rule)."""
    if dim is None:
        return 0 if ndim in (0, 1, 3) else 1
    return int(dim) % max(ndim, 1)


def select_sites(model: nn.Module, spec: Any, layer_ids: dict) -> tuple[set, bool, list]:
    """Resolve the ``activations`` option of a Recorder (see
    :class:`recorder.activations.ActivationTracker`) against ``model``.

    Args:
        model: the root module.
        spec: True, "activations", "all", or items (ids, dotted names, globs, type names, module
            classes, modules, functional call-site patterns, ``fn:<kind>``), a list of them, or a
            comma-separated string.
        layer_ids: {layer id: module} of the layer table (for int items).

    Returns:
        (modules whose outputs are sites, every functional call site?, call-site patterns).

    Raises:
        ValueError: an item selects nothing.
    """
    mods: set[nn.Module] = set()
    fn_all, fn_patterns = False, []
    named = dict(model.named_modules())
    leaves = [m for n, m in named.items() if not list(m.children())]
    acts = [m for m in named.values() if module_kind(m) is not None]
    if isinstance(spec, str) and spec.strip() == "all":
        return set(leaves), True, []
    if spec is True or (isinstance(spec, str) and spec.strip() == "activations"):
        return set(acts), True, []
    items = spec if isinstance(spec, (list, tuple, set)) else [spec]
    flat = []
    for it in items:
        flat.extend(s.strip() for s in it.split(",") if s.strip()) if isinstance(it, str) else flat.append(it)
    for it in flat:
        hit = False
        if it == "all":
            mods.update(leaves)
            fn_all = hit = True
        elif it is True or it == "activations":
            mods.update(acts)
            fn_all = hit = True
        elif isinstance(it, str) and it in ("functional", "fn", "fn:*"):
            fn_all = hit = True
        elif isinstance(it, str) and (it.startswith("fn:") or "/" in it):
            fn_patterns.append(it)
            hit = True
        elif isinstance(it, type) and issubclass(it, nn.Module):
            sel = [m for m in named.values() if isinstance(m, it)]
            mods.update(sel)
            hit = bool(sel)
        elif isinstance(it, nn.Module):
            mods.add(it)
            hit = True
        elif isinstance(it, bool):
            pass
        elif isinstance(it, int):
            m = layer_ids.get(it)
            if m is not None:
                mods.add(m)
                hit = True
        elif isinstance(it, str):
            if it in named:
                mods.add(named[it])
                hit = True
            elif any(c in it for c in "*?["):
                sel = [m for n, m in named.items() if n and fnmatch.fnmatchcase(n, it)]
                mods.update(sel)
                hit = bool(sel)
            else:
                sel = [m for m in named.values() if type(m).__name__ == it]
                mods.update(sel)
                hit = bool(sel)
        if not hit:
            raise ValueError(f"activations: {it!r} selects nothing")
    return mods, fn_all, fn_patterns
