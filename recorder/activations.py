"""Activation capture: module-output hooks and an activation wrapper for functional activations.

Every step, per unit and on the device, sufficient statistics are accumulated for each selected
*site* (a module's output, or one functional activation call site such as ``features.3/relu#0``):
count, sum, sum |h|, sum h^2, min, max, count(h > 0), non-finite count, and for bounded activations
(sigmoid, tanh, hardtanh, softmax) a fixed-edge histogram. With these the analyzer answers dead
units (strict / APoZ / tau-dormant) and saturation at any threshold. Raw activations of the first
K samples are copied when the raw schedule fires.

Hot path: only torch reductions on the device (no ``.item()``, no Python loops over elements).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import analyzer.format as fmt

F = nn.functional

#: kind -> (lower bound, upper bound) for bounded activations (hardtanh bounds come from the call)
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softmax": (0.0, 1.0), "hardtanh": (-1.0, 1.0)}
HIST_BINS = 200
RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "silu", "softplus")


def _func_table() -> dict:
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
    add("hardtanh", F.hardtanh, getattr(F, "hardtanh_", None), F.relu6)
    add("softmax", F.softmax, torch.softmax, T.softmax)
    return t


FUNCS = _func_table()
MODULE_KINDS = [(nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.GELU, "gelu"),
                (nn.SiLU, "silu"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.Softplus, "softplus"),
                (nn.Hardtanh, "hardtanh"), (nn.Softmax, "softmax")]
LINEAR_STYLE = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)


def module_kind(m: nn.Module) -> str | None:
    for cls, kind in MODULE_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def _call_bounds(func, kind, args, kwargs) -> tuple[float, float] | None:
    if kind != "hardtanh":
        return BOUNDS.get(kind)
    if func is F.relu6:
        return (0.0, 6.0)
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return (float(lo), float(hi))


class _Site:
    """Per-step accumulators of one site, kept on the device."""

    __slots__ = ("meta", "acc", "samples")

    def __init__(self, meta: dict):
        self.meta = meta
        self.acc: dict[str, torch.Tensor] | None = None
        self.samples: list[torch.Tensor] = []


class _Wrapper(TorchFunctionMode):
    """The activation wrapper: sees functional activations while the model's forward runs."""

    def __init__(self, tracker: "ActivationTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = FUNCS.get(func)
        if kind is not None and isinstance(out, torch.Tensor):
            try:
                self.tracker._functional(func, kind, out, args, kwargs)
            except Exception as e:  # never break the forward pass
                self.tracker.error = self.tracker.error or e
        return out


class ActivationTracker:
    """Installs the hooks and the wrapper on ``model`` and accumulates per-site statistics.

    Args:
        model: the root module.
        spec: "all", or items (ids/dotted names/globs/type names of modules, module classes, or
            functional call-site patterns like ``"features.*/relu#*"`` or op kinds ``"fn:relu"``).
        samples: raw samples (first K of the batch) per site when the raw schedule fires.
        unit_axis: overrides ``{site name or glob: axis}``; default 1 for (N, C, ...) outputs of
            4-D/5-D tensors and conv-style modules, the last axis otherwise.
        on_new_site: callback(meta) when a site is seen the first time.
    """

    def __init__(self, model: nn.Module, spec: Any, samples: int = 0, unit_axis: dict | None = None,
                 on_new_site: Callable[[dict], None] | None = None, layer_ids: dict | None = None):
        self.model = model
        self.samples = int(samples)
        self.unit_axis = dict(unit_axis or {})
        self.on_new_site = on_new_site
        self.error: BaseException | None = None
        self.sites: dict[str, _Site] = {}
        self._keys: set[str] = set()
        self._names = {m: n for n, m in model.named_modules()}
        self._stack: list[nn.Module] = []
        self._counters: dict[tuple, int] = {}
        self._want_raw = False
        self._handles: list = []
        #: execution order of the first training forward: ("layer", layer id, in, out) and ("site", key)
        self.forward_order: list = []
        self._order_done = False
        self._layer_of = {m: i for i, m in (layer_ids or {}).items()}
        self._mode: _Wrapper | None = None
        self.module_sites, self.fn_all, self.fn_patterns = self._parse(spec, layer_ids or {})
        self._install()

    # ------------------------------------------------------------------ selection
    def _parse(self, spec, layer_ids):
        mods: set[nn.Module] = set()
        fn_all, fn_patterns = False, []
        named = dict(self.model.named_modules())
        leaves = [m for n, m in named.items() if not list(m.children())]
        if spec == "all":
            return set(leaves), True, []
        items = spec if isinstance(spec, (list, tuple, set)) else [spec]
        flat = []
        for it in items:
            flat.extend(s.strip() for s in it.split(",") if s.strip()) if isinstance(it, str) else flat.append(it)
        for it in flat:
            hit = False
            if isinstance(it, str) and (it.startswith("fn:") or "/" in it):
                fn_patterns.append(it)
                hit = True
            elif isinstance(it, str) and it in ("functional", "fn"):
                fn_all = hit = True
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

    def _fn_selected(self, name: str, kind: str) -> bool:
        if self.fn_all:
            return True
        for p in self.fn_patterns:
            if p.startswith("fn:"):
                if p[3:] in (kind, "*"):
                    return True
            elif fnmatch.fnmatchcase(name, p):
                return True
        return False

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        root = self.model
        need_fn = self.fn_all or bool(self.fn_patterns)
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for m in self._layer_of:
            self._handles.append(m.register_forward_hook(self._layer_done))
        for name, m in root.named_modules():
            if need_fn and m is not root:
                self._handles.append(m.register_forward_pre_hook(self._push))
                self._handles.append(m.register_forward_hook(self._pop, always_call=True))
            if m in self.module_sites:
                self._handles.append(m.register_forward_hook(self._module_out))
        self._need_fn = need_fn

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode is not None:
            try:
                self._mode.__exit__(None, None, None)
            except Exception:
                pass
            self._mode = None

    def _active(self) -> bool:
        return self.model.training

    def _root_pre(self, module, args):
        self._counters.clear()
        self._stack = [module]
        if self._need_fn and self._active() and self._mode is None:
            self._mode = _Wrapper(self)
            self._mode.__enter__()

    def _root_post(self, module, args, out):
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._stack = []
        if self._active() and self.forward_order:
            self._order_done = True

    def _layer_done(self, module, args, out):
        if self._order_done or not self._active():
            return
        t_in = args[0] if args and isinstance(args[0], torch.Tensor) else None
        t_out = out if isinstance(out, torch.Tensor) else None
        self.forward_order.append({"event": "layer", "id": self._layer_of[module],
                                   "in_shape": list(t_in.shape[1:]) if t_in is not None else None,
                                   "out_shape": list(t_out.shape[1:]) if t_out is not None else None})

    def _push(self, module, args):
        self._stack.append(module)

    def _pop(self, module, args, out):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _module_out(self, module, args, out):
        if not self._active():
            return
        t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
        if not isinstance(t, torch.Tensor):
            return
        try:
            name = self._names.get(module, "")
            kind = module_kind(module) or "output"
            bounds = None
            if kind == "hardtanh":
                bounds = (float(module.min_val), float(module.max_val))
            elif kind in BOUNDS:
                bounds = BOUNDS[kind]
            dim = getattr(module, "dim", None) if kind == "softmax" else None
            self._observe(name, t, kind, "module", name, bounds, dim,
                          linear=isinstance(module, LINEAR_STYLE))
        except Exception as e:
            self.error = self.error or e

    def _functional(self, func, kind, out, args, kwargs):
        if not self._active():
            return
        inner = self._stack[-1] if self._stack else self.model
        if module_kind(inner) is not None and inner is not self.model:
            return  # nn.ReLU & co.: the module's own site covers it
        path = self._names.get(inner, "")
        idx = self._counters.get((path, kind), 0)
        self._counters[(path, kind)] = idx + 1
        name = f"{path}/{kind}#{idx}"
        if not self._fn_selected(name, kind):
            return
        dim = None
        if kind == "softmax":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        self._observe(name, out, kind, "function", path, _call_bounds(func, kind, args, kwargs), dim)

    # ------------------------------------------------------------------ statistics
    def _axis(self, name: str, t: torch.Tensor, linear: bool) -> int:
        for pat, ax in self.unit_axis.items():
            if pat == name or fnmatch.fnmatchcase(name, pat):
                return ax % t.dim()
        if t.dim() <= 2 or linear:
            return t.dim() - 1
        return 1 if t.dim() >= 4 else t.dim() - 1

    def _observe(self, name, t, kind, source, module, bounds, dim, linear=False):
        if not t.is_floating_point() or t.dim() == 0:
            return
        x = t.detach()
        axis = self._axis(name, x, linear)
        U = x.shape[axis]
        site = self.sites.get(name)
        if site is None:
            site = self._new_site(name, x, kind, source, module, bounds, axis, dim)
        meta = site.meta
        if not self._order_done:
            self.forward_order.append({"event": "site", "key": meta["key"]})
        if meta["units"] != U or meta["unit_axis"] != axis:
            meta["mismatched_calls"] = meta.get("mismatched_calls", 0) + 1
            return
        dims = tuple(d for d in range(x.dim()) if d != axis)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        st = {
            "count": torch.full((), xf.numel() // max(U, 1), dtype=torch.float64, device=x.device),
            "sum": xf.sum(dims, dtype=torch.float64),
            "sum_abs": torch.linalg.vector_norm(xf, 1, dim=dims, dtype=torch.float64),
            "sumsq": torch.linalg.vector_norm(xf, 2, dim=dims, dtype=torch.float64).square(),
            "min": xf.amin(dims).double(),
            "max": xf.amax(dims).double(),
            "n_pos": torch.count_nonzero(xf > 0, dims).double(),
            "nonfinite": (~torch.isfinite(xf)).sum().double(),
        }
        if meta.get("hist_edges") is not None:
            st["hist"] = self._hist(xf, axis, U, meta)
        acc = site.acc
        if acc is None:
            site.acc = st
        else:
            for k, v in st.items():
                if k == "min":
                    acc[k] = torch.minimum(acc[k], v)
                elif k == "max":
                    acc[k] = torch.maximum(acc[k], v)
                else:
                    acc[k] = acc[k] + v
        if self._want_raw and self.samples > 0 and not site.samples:
            site.samples.append(x[: self.samples].detach().clone())

    def _hist(self, xf, axis, U, meta):
        lo, hi = meta["bounds"]
        B = HIST_BINS
        if meta["kind"] == "softmax":
            d = meta.get("softmax_dim")
            d = xf.dim() - 1 if d is None else d % xf.dim()
            v = xf.amax(d).reshape(-1)   # max probability per row
            idx = ((v - lo) * (B / (hi - lo))).floor().clamp_(0, B - 1).long()
            return torch.bincount(idx, minlength=B).double()
        xt = xf.movedim(axis, 0).reshape(U, -1)
        idx = ((xt - lo) * (B / (hi - lo))).floor().clamp_(0, B - 1).long()
        idx += torch.arange(U, device=xf.device).unsqueeze(1) * B
        return torch.bincount(idx.reshape(-1), minlength=U * B).reshape(U, B).double()

    def _new_site(self, name, x, kind, source, module, bounds, axis, dim):
        key = fmt.sanitize(name.replace("/", "__").replace("#", "-"))
        base, n = key, 1
        while key in self._keys:
            key = f"{base}~{n}"
            n += 1
        self._keys.add(key)
        U = x.shape[axis]
        meta = {"name": name, "key": key, "kind": kind, "source": source, "module": module,
                "unit_axis": axis, "units": int(U), "sample_shape": list(x.shape[1:]),
                "bounds": list(bounds) if bounds else None, "softmax_dim": dim,
                "hist_edges": None, "family": ("relu" if kind in RELU_FAMILY else
                                               "bounded" if bounds else "other")}
        stats = {k: [U] for k in ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")}
        stats.update(count=[], nonfinite=[])
        if bounds is not None:
            lo, hi = bounds
            meta["hist_edges"] = [lo + (hi - lo) * i / HIST_BINS for i in range(HIST_BINS + 1)]
            stats["hist"] = [HIST_BINS] if kind == "softmax" else [U, HIST_BINS]
        meta["stats"] = stats
        site = _Site(meta)
        self.sites[name] = site
        if self.on_new_site is not None:
            self.on_new_site(meta)
        return site

    # ------------------------------------------------------------------ step boundary
    def want_raw(self, flag: bool) -> None:
        """Whether the forward passes until the next ``take()`` keep raw samples."""
        self._want_raw = bool(flag)

    def take(self) -> list[tuple[str, dict[str, torch.Tensor], list[torch.Tensor]]]:
        """The accumulated statistics and samples of every site since the last call; resets them."""
        out = []
        for s in self.sites.values():
            if s.acc is not None:
                out.append((s.meta["key"], s.acc, s.samples))
            s.acc, s.samples = None, []
        return out
