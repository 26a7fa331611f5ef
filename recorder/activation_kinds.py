"""Activation kinds: which torch functions and modules are activations, their bounds and sign, and
which modules and call sites an ``activations`` option selects.

The tables the activation capture (:mod:`recorder.activations`) and the function graph
(:mod:`recorder.graph`) classify calls and modules with.

Kinds: ``relu``, ``leaky_relu``, ``elu``, ``softplus`` (the ReLU family: the analyzer reads values at
or below 0 as zero-gradient); ``gelu`` (erf form, ``x * Phi(x)``), ``gelu_tanh`` (the tanh
approximation: GPT-2's ``gelu_new``, ``gelu_pytorch_tanh``, ``gelu_fast``), ``quick_gelu``
(``x * sigmoid(1.702 x)``), ``silu`` (Swish-1; the gate of a SwiGLU MLP) and ``mish`` (the smooth
family: sign-preserving, unbounded above, a flat negative tail); ``sigmoid``, ``tanh``, ``hardtanh``,
``relu6``, ``softmax`` (bounded). Hugging Face ``transformers`` activation modules
(``GELUActivation``, ``NewGELUActivation``, ``GELUTanh``/``PytorchGELUTanh``, ``FastGELUActivation``,
``QuickGELUActivation``, ``SiLUActivation``, ...) are recognised by class name and module (the
recorder never imports transformers): one site per module, and the torch calls inside it (GPT-2's
``gelu_new`` is written with ``torch.tanh``) are not sites of their own.

Fused attention (:data:`ATTENTION`): ``F.scaled_dot_product_attention`` computes the attention
probabilities inside one kernel, so no softmax site can observe them; the activation wrapper notes
the module that called it (once per module, see :func:`fused_attention_config`).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

__all__ = ["FUNCS", "WATCHED", "ATTENTION", "MODULE_KINDS", "HF_MODULE_KINDS", "BOUNDS", "HIST_BINS", "RELU_FAMILY",
           "SMOOTH_KINDS", "NONNEG_KINDS", "NONNEG_MODULES", "LINEAR_STYLE", "CONV_STYLE", "module_kind", "call_kind",
           "site_family", "fused_attention_config", "call_bounds", "valid_bounds", "softmax_dim", "select_sites"]

F = nn.functional

#: kind -> (lower bound, upper bound) for bounded activations (hardtanh bounds come from the call)
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softmax": (0.0, 1.0), "hardtanh": (-1.0, 1.0),
          "relu6": (0.0, 6.0)}
HIST_BINS = 200
#: kinds whose values at or below 0 have a zero (or constant, small) gradient: family "relu"
RELU_FAMILY = ("relu", "leaky_relu", "elu", "softplus")
#: smooth sign-preserving kinds, unbounded above with a flat negative tail: family "smooth"
SMOOTH_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "mish")
#: kinds whose outputs are never negative (then sum |h| = sum h, computed once)
NONNEG_KINDS = ("relu", "relu6", "sigmoid", "softmax", "softplus")
#: pseudo-kind of fused attention calls in :data:`WATCHED` (not a site: see the module docstring)
ATTENTION = "fused_attention"


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
    add("mish", getattr(F, "mish", None))
    add("leaky_relu", F.leaky_relu, getattr(F, "leaky_relu_", None))
    add("elu", F.elu, getattr(F, "elu_", None))
    add("softplus", F.softplus)
    add("hardtanh", F.hardtanh, getattr(F, "hardtanh_", None))
    add("relu6", F.relu6)
    add("softmax", F.softmax, torch.softmax, T.softmax, getattr(torch.special, "softmax", None))
    return t


FUNCS = _func_table()
MODULE_KINDS = [(nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.GELU, "gelu"),
                (nn.SiLU, "silu"), (nn.Mish, "mish"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"),
                (nn.Softplus, "softplus"), (nn.ReLU6, "relu6"), (nn.Hardtanh, "hardtanh"), (nn.Softmax, "softmax")]
#: Hugging Face ``transformers.activations`` classes by name (matched only on classes defined in a
#: ``transformers`` module; see ``ACT2CLS`` there): ``gelu`` -> GELUActivation, ``gelu_new`` ->
#: NewGELUActivation, ``gelu_pytorch_tanh`` -> GELUTanh (alias PytorchGELUTanh), ``gelu_fast``,
#: ``gelu_accurate``, ``quick_gelu``, ``silu``, ``mish``, ``gelu_10`` (ClippedGELUActivation: GELU
#: clipped to [-10, 10]).
HF_MODULE_KINDS = {"GELUActivation": "gelu", "ClippedGELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
                   "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
                   "AccurateGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu",
                   "SiLUActivation": "silu", "MishActivation": "mish"}
#: the functions the activation wrapper looks at: :data:`FUNCS` and fused attention (:data:`ATTENTION`)
WATCHED = dict(FUNCS)
WATCHED[F.scaled_dot_product_attention] = ATTENTION
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


_TYPE_KINDS: dict = {}   # type -> kind or None (module_kind runs per functional call: cached per class)


def _type_kind(cls: type) -> str | None:
    try:
        return _TYPE_KINDS[cls]
    except KeyError:
        pass
    kind = next((k for c, k in MODULE_KINDS if issubclass(cls, c)), None)
    if kind is None and str(getattr(cls, "__module__", "")).split(".")[0] == "transformers":
        kind = HF_MODULE_KINDS.get(cls.__name__)
    _TYPE_KINDS[cls] = kind
    return kind


def module_kind(m: nn.Module) -> str | None:
    """The activation kind of a module ("relu", "gelu_tanh", ...; see :data:`MODULE_KINDS` and
    :data:`HF_MODULE_KINDS`), or None. ``nn.GELU(approximate="tanh")`` is ``gelu_tanh``."""
    kind = _type_kind(type(m))
    if kind == "gelu" and getattr(m, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return kind


def call_kind(kind: str, args, kwargs) -> str:
    """The kind of one functional call: ``F.gelu(x, approximate="tanh")`` is ``gelu_tanh``."""
    if kind == "gelu" and kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh":
        return "gelu_tanh"
    return kind


def site_family(kind: str, bounds) -> str:
    """A site's family: "relu" (:data:`RELU_FAMILY`), "smooth" (:data:`SMOOTH_KINDS`), "bounded" (known
    bounds) or "other" (plain module outputs and the rest)."""
    return ("relu" if kind in RELU_FAMILY else "smooth" if kind in SMOOTH_KINDS else
            "bounded" if bounds else "other")


def fused_attention_config(model: nn.Module) -> list[str]:
    """``["attn_implementation=<name>"]`` when a Hugging Face model's config names an attention kernel
    that computes the probabilities where no activation wrapper can see them (``"flash_attention_2"``,
    ``"flex_attention"``, ...); ``[]`` for ``"eager"``, ``"sdpa"`` (seen as calls of
    ``F.scaled_dot_product_attention`` instead) or a model without such a config. Read once, at set-up:
    the start of the tracker's ``attention_unobserved`` list (manifest ``attention_unobserved``)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return [f"attn_implementation={impl}"] if isinstance(impl, str) and impl not in ("eager", "sdpa") else []


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
