"""Activation capture: module-output hooks and an activation wrapper for functional activations.

Every step, per unit and on the device, sufficient statistics are accumulated for each selected
*site* (a module's output, or one functional activation call site such as ``features.3/relu#0``):
count, sum, sum |h|, sum h^2, min, max, count(h > 0), non-finite count, and for bounded activations
(sigmoid, tanh, hardtanh, relu6, softmax) a fixed-edge histogram. With these the analyzer answers
dead units (strict / APoZ / tau-dormant) and saturation at any threshold. Raw activations of the
first K samples are copied when the raw schedule fires.

Hot path: only torch operations on the device (no ``.item()``, ``.cpu()`` or Python loops over
elements; the only Python loop walks large CPU tensors in cache-sized slabs). A first stage
reduces in the tensor's own dtype into small partials (per contiguous row), a second combines them
in float64; the sum of squares is accumulated around each partial's mean, so that the variance
keeps float32 precision when the mean dwarfs the spread (see ``ActivationTracker._stats``). Kinds
whose outputs are never negative skip the |h| pass (sum |h| is sum h). The statistics' own torch
calls bypass the activation wrapper.

Naming: a functional call site is ``<enclosing module path>/<op>#<i>``, ``i`` counting the calls of
that op within one invocation of the enclosing module (so a module called twice per forward feeds
the same sites twice, like its module-output site); the root module's path is empty (``/relu#0``).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bbdecoder.analyzer.trace import format as fmt

F = nn.functional

#: kind -> (lower bound, upper bound) for bounded activations (hardtanh bounds come from the call)
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softmax": (0.0, 1.0), "hardtanh": (-1.0, 1.0),
          "relu6": (0.0, 6.0)}
HIST_BINS = 200
RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "silu", "softplus")
#: kinds whose outputs are never negative (then sum |h| = sum h, computed once)
NONNEG_KINDS = ("relu", "relu6", "sigmoid", "softmax", "softplus")
#: float counts (0/1 indicators summed in float32) are exact up to this many terms
_EXACT_F32 = 1 << 24


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
    add("hardtanh", F.hardtanh, getattr(F, "hardtanh_", None))
    add("relu6", F.relu6)
    add("softmax", F.softmax, torch.softmax, T.softmax, getattr(torch.special, "softmax", None))
    return t


FUNCS = _func_table()
MODULE_KINDS = [(nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.GELU, "gelu"),
                (nn.SiLU, "silu"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.Softplus, "softplus"),
                (nn.ReLU6, "relu6"), (nn.Hardtanh, "hardtanh"), (nn.Softmax, "softmax")]
#: exact module types whose output is never negative (a subclass may override forward)
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Softplus)
LINEAR_STYLE = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
#: modules whose (N, C, ...) outputs have their units (channels) on axis 1, also for 3-D outputs
CONV_STYLE = tuple(c for c in (
    getattr(nn.modules.conv, "_ConvNd", None), getattr(nn.modules.batchnorm, "_BatchNorm", None),
    getattr(nn.modules.instancenorm, "_InstanceNorm", None), nn.GroupNorm,
    getattr(nn.modules.pooling, "_MaxPoolNd", None), getattr(nn.modules.pooling, "_AvgPoolNd", None),
    getattr(nn.modules.pooling, "_AdaptiveAvgPoolNd", None), getattr(nn.modules.pooling, "_AdaptiveMaxPoolNd", None),
    getattr(nn.modules.pooling, "_LPPoolNd", None), nn.Dropout1d, nn.Dropout2d, nn.Dropout3d) if c is not None)


def module_kind(m: nn.Module) -> str | None:
    for cls, kind in MODULE_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def _call_bounds(func, kind, args, kwargs) -> tuple[float, float] | None:
    if kind != "hardtanh":
        return BOUNDS.get(kind)
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return _valid_bounds(lo, hi)


def _valid_bounds(lo, hi) -> tuple[float, float] | None:
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None


def _softmax_dim(dim, ndim: int) -> int:
    """The axis a softmax normalises over (``dim=None``: torch's legacy rule)."""
    if dim is None:
        return 0 if ndim in (0, 1, 3) else 1
    return int(dim) % max(ndim, 1)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputing a forward)."""
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f is not None and f() != -1


def _bin_counts(idx: torch.Tensor, n: int, bincount: bool | None = None) -> torch.Tensor:
    """float64 counts of the values ``0 <= idx < n`` (1-D int64). ``torch.bincount`` on the CPU;
    elsewhere an ``index_add_`` (CUDA's bincount reads the largest index back to the host: a
    synchronisation)."""
    if bincount if bincount is not None else idx.device.type == "cpu":
        return torch.bincount(idx, minlength=n).double()
    ones = torch.ones((), dtype=torch.float64, device=idx.device).expand(idx.numel())
    return torch.zeros(n, dtype=torch.float64, device=idx.device).index_add_(0, idx, ones)


class _Site:
    """Per-step accumulators of one site, kept on the device (the count is a host int: it follows
    from the shapes alone)."""

    __slots__ = ("meta", "acc", "samples", "count", "nonneg", "plan")

    def __init__(self, meta: dict, nonneg: bool = False):
        self.meta = meta
        self.acc: dict[str, torch.Tensor] | None = None
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.nonneg = nonneg
        #: CPU: the partials' buffers and their per-slab views for the last (shape, dtype) seen
        #: (reused by the next call of that shape; the returned statistics never alias them)
        self.plan: tuple | None = None


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
        spec: True or ``"activations"`` (every module of an activation kind -- nn.ReLU, nn.Sigmoid,
            nn.Tanh, nn.GELU, ... -- and every functional activation call site: what dead-unit and
            saturation analysis need), ``"all"`` (every leaf module's output and every functional
            call site), or items (ids/dotted names/globs/type names of modules, module classes or
            modules, functional call-site patterns like ``"features.*/relu#*"``, op kinds
            ``"fn:relu"`` (``"fn:*"`` or ``"fn"``: every functional call site), "activations" and "all").
        samples: raw samples (first K of the batch) per site when the raw schedule fires.
        unit_axis: overrides ``{site name or glob: axis}``; default 1 for (N, C, ...) outputs of
            4-D/5-D tensors and of conv-style modules (convolutions, norms, pooling), the last axis
            otherwise (linear-style outputs (N, ..., D), and 3-D outputs of other sites).
        on_new_site: callback(meta) when a site is seen the first time.

    Only training-mode forwards are recorded (``model.training``), and not forwards recomputed
    inside a backward pass (activation checkpointing).
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
        #: (module, {kind: calls so far in this invocation}) for every module whose forward is running
        self._stack: list[tuple[nn.Module, dict]] = []
        self._want_raw = False
        self._handles: list = []
        self._scratch: dict = {}
        #: CPU: bytes of one slab of rows walked by the statistics (about the L2 cache)
        self.chunk_bytes = 2 << 20
        self.floor0_kinds = ("relu", "relu6")
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
        self._scratch.clear()
        if self._mode is not None:
            try:
                self._mode.__exit__(None, None, None)
            except Exception:
                pass
            self._mode = None

    def _active(self) -> bool:
        return self.model.training and not _in_backward()

    def _root_pre(self, module, args):
        self._stack = [(module, {})]
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
        self._stack.append((module, {}))

    def _pop(self, module, args, out):
        if self._stack and self._stack[-1][0] is module:
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
            if kind == "hardtanh" or kind == "relu6":
                bounds = _valid_bounds(module.min_val, module.max_val)
            elif kind in BOUNDS:
                bounds = BOUNDS[kind]
            dim = getattr(module, "dim", None) if kind == "softmax" else None
            nonneg = ((type(module) in _NONNEG_MODULES and (kind != "softplus" or module.beta > 0))
                      or (kind == "hardtanh" and bounds is not None and bounds[0] >= 0))
            self._observe(name, t, kind, "module", name, bounds, dim, nonneg=nonneg,
                          style="linear" if isinstance(module, LINEAR_STYLE) else
                          "conv" if isinstance(module, CONV_STYLE) else None)
        except Exception as e:
            self.error = self.error or e

    def _functional(self, func, kind, out, args, kwargs):
        if not self._active():
            return
        inner, calls = self._stack[-1] if self._stack else (self.model, {})
        if inner is not self.model and module_kind(inner) is not None:
            return  # nn.ReLU & co.: the module's own site covers it
        path = self._names.get(inner, "")
        idx = calls.get(kind, 0)
        calls[kind] = idx + 1
        name = f"{path}/{kind}#{idx}"
        if not self._fn_selected(name, kind):
            return
        dim = None
        if kind == "softmax":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        bounds = _call_bounds(func, kind, args, kwargs)
        nonneg = kind in NONNEG_KINDS or (kind == "hardtanh" and bounds is not None and bounds[0] >= 0)
        if kind == "softplus":   # 1/beta * log(1 + exp(beta * x)) is negative for beta < 0
            beta = kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
            nonneg = isinstance(beta, (int, float)) and beta > 0
        self._observe(name, out, kind, "function", path, bounds, dim, nonneg=nonneg)

    # ------------------------------------------------------------------ statistics
    def _axis(self, name: str, t: torch.Tensor, style: str | None) -> int:
        for pat, ax in self.unit_axis.items():
            if pat == name or fnmatch.fnmatchcase(name, pat):
                return ax % t.dim()
        if style == "conv" and t.dim() >= 3:
            return 1
        if t.dim() <= 2 or style == "linear":
            return t.dim() - 1
        return 1 if t.dim() >= 4 else t.dim() - 1

    def _observe(self, name, t, kind, source, module, bounds, dim, nonneg=False, style=None):
        if not t.is_floating_point() or t.dim() == 0:
            return
        # the statistics' own torch calls must not pass through the activation wrapper (or any
        # other torch-function mode or subclass): that would cost a Python call per operation
        with torch._C.DisableTorchFunction():
            self._observe_now(name, t, kind, source, module, bounds, dim, nonneg, style)

    def _observe_now(self, name, t, kind, source, module, bounds, dim, nonneg, style):
        x = t.detach()
        axis = self._axis(name, x, style)
        U = x.shape[axis]
        site = self.sites.get(name)
        if site is None:
            if kind == "softmax":
                dim = _softmax_dim(dim, x.dim())
            site = self._new_site(name, x, kind, source, module, bounds, axis, dim, nonneg)
        meta = site.meta
        if not self._order_done:
            self.forward_order.append({"event": "site", "key": meta["key"]})
        if meta["units"] != U or meta["unit_axis"] != axis:
            meta["mismatched_calls"] = meta.get("mismatched_calls", 0) + 1
            return
        if x.numel() == 0:
            return
        st = self._stats(x, axis, U, site)
        site.count += x.numel() // U
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
            if list(x.shape[1:]) == meta["sample_shape"]:
                site.samples.append(x[: self.samples].clone())
            else:  # the stored rows have one shape per site
                meta["samples_skipped"] = meta.get("samples_skipped", 0) + 1

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor shaped like ``like`` (contiguous). On the CPU one buffer per dtype is kept
        and reused (fresh large allocations cost page faults); elsewhere the allocator caches."""
        if like.device.type != "cpu":
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        key = like.dtype
        n = like.numel()
        b = self._scratch.get(key)
        if b is None or b.numel() < n:
            b = self._scratch[key] = torch.empty(n, dtype=like.dtype)
        return b[:n].view(like.shape)

    def _stats(self, x: torch.Tensor, axis: int, U: int, site: _Site) -> dict[str, torch.Tensor]:
        """Per-unit sums of one call: float64 tensors (U,) (nonfinite: a scalar, hist: see _hist).

        The tensor is seen as (A, U, Q) (units in the middle). A first stage reduces, in the
        tensor's own dtype, along Q (long contiguous rows) or along A (short rows: vectorised
        across U*Q) into small partials, and a second stage combines the partials in float64.
        Each partial g keeps a shift m_g, the sum e_g of (value - m_g) and the square sum q_g of
        (value - m_g); Chan et al.'s rule combines them, so sum and sum of squares are exact up
        to float32 rounding of each partial.

        Two paths per slab of rows:

        * exact (always off the CPU, where nothing may be read back to the host): m_g is the
          partial's own mean, so the variance derived later (sumsq / n - mean**2, in float64)
          keeps float32 precision even where the mean is far larger than the spread (a
          saturated tanh unit), and the finite values are counted. Four plain reductions and
          four (three for kinds that are never negative) elementwise passes.
        * fast (CPU): m_g = 0 and no count of finite values: sum, min, max, 2-norms of short
          pieces, count(h > 0) and, unless the kind is never negative, sum |h| -- six or eight
          passes instead of eleven or thirteen. Afterwards two checks on the small partials
          (a host read, free on the CPU) send a slab back through the exact path when one of
          its partials holds a non-finite value (then the exact count is needed) or has a
          spread (standard deviation) below 10% of its root mean square (below that, rounding
          of the uncentred square sum would cost more than about five float32 roundings of the
          spread).

        Sums of 0/1 indicators are exact (float64 partials from 2**24 terms on). On the CPU a
        large tensor is walked in slabs of rows so that the slab and the scratch stay in the cache.
        """
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half / bfloat16: reduce in float32 (squares overflow float16)
        shape = x.shape
        A, Q = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        if Q == 1 or x.is_contiguous():
            v = x.reshape(A, U, Q)
        else:
            xm = x.movedim(axis, -1)
            if xm.is_contiguous():   # channels_last: units innermost
                v = xm.reshape(-1, U, 1)
            else:
                v = x.reshape(A, U, Q)   # a copy
        A, Q = v.shape[0], v.shape[2]
        inner = Q >= 32                          # first stage along Q, else along A
        d = 2 if inner else 0
        cpu = v.device.type == "cpu"
        rows = A if not cpu else max(1, min(A, self.chunk_bytes // max(1, U * Q * v.element_size())))
        nch = -(-A // rows)
        pshape = (A, U) if inner else (nch, U, Q)
        exact = (Q if inner else rows) < _EXACT_F32   # sums of 0/1 terms stay exact in float32
        nonneg = site.nonneg
        k = 0   # square sums: 2-norms of contiguous pieces of k <= 256 values (fast)
        if inner and cpu:
            k = Q if Q <= 256 else next((c for c in (256, 192, 160, 128, 112, 100, 96, 64, 49, 32) if Q % c == 0), 0)
        names = ["sum", "csum", "shift", "n_pos", "fin"] + ([] if nonneg else ["sum_abs"]) + ([] if k else ["csq"])
        key = (v.shape, v.dtype, rows, k, nonneg)
        plan = site.plan if cpu and site.plan is not None and site.plan[0] == key else None
        if plan is None:
            part = torch.empty((len(names),) + pshape, dtype=v.dtype, device=v.device)
            cnt = None if exact else torch.empty((2,) + pshape, dtype=torch.float64, device=v.device)
            ext = torch.empty((2,) + pshape, dtype=v.dtype, device=v.device)
            nrm = torch.empty((A, U, Q // k), dtype=v.dtype, device=v.device) if k else None
            views = [None] * nch
            if cpu:   # kept for the next call of this shape (one forward after another)
                site.plan = (key, part, cnt, ext, nrm, views)
        else:
            _, part, cnt, ext, nrm, views = plan
        scratch = self._buffer(v[:rows])
        fmax = torch.finfo(v.dtype).max
        # ReLU / ReLU6: values >= 0, so a unit's minimum is 0 unless every one of its values is
        # positive: the fast path skips the min pass and computes it afterwards for those units only
        floor0 = cpu and site.meta.get("kind") in self.floor0_kinds

        def slab_views(c):
            """The outputs of slab ``c``: (row range, {partial name: view}, min view, max view)."""
            i, j = c * rows, min(A, (c + 1) * rows)
            sel = (slice(None), slice(i, j)) if inner else (slice(None), c)
            o = dict(zip(names, part[sel].unbind(0)))
            if cnt is not None:
                o["n_pos"], o["fin"] = cnt[sel].unbind(0)
            lo, hi = ext[sel].unbind(0)
            o["nrm"] = nrm[i:j] if k else None
            return i, j, o, lo, hi

        def slab(c, fast):
            sv = views[c]
            if sv is None:
                sv = views[c] = slab_views(c)
            i, j, o, lo, hi = sv
            w, b = v[i:j], scratch[: j - i]
            torch.sum(w, d, out=o["sum"])
            if not (fast and floor0):   # fast ReLU: minima 0 (set below), checked afterwards
                torch.amin(w, d, out=lo)
            torch.amax(w, d, out=hi)
            if fast:   # shift 0, shifted sum = sum and every value finite: set for all slabs below
                c_in = w
            else:
                # centred: each value minus the mean of its partial (as rounded in the tensor's dtype)
                torch.div(o["sum"], Q if inner else j - i, out=o["shift"])
                c_in = torch.sub(w, o["shift"].unsqueeze(d), out=b)
                torch.sum(c_in, d, out=o["csum"])
            if k:
                torch.linalg.vector_norm(c_in.view(j - i, U, -1, k), 2, dim=-1, out=o["nrm"])
            elif fast:
                torch.sum(torch.mul(w, w, out=b), d, out=o["csq"])
            else:
                torch.sum(c_in.mul_(c_in), d, out=o["csq"])
            # count(h > 0): for kinds that are never negative sign(h) is that indicator (0 for +-0,
            # 1 above) in half the time of a comparison; a NaN sends the slab through the exact path
            self._count(torch.sign(w, out=b) if fast and nonneg else torch.gt(w, 0, out=b), d, o["n_pos"])
            if not nonneg:
                torch.sum(torch.abs(w, out=b), d, out=o["sum_abs"])
            if fast:
                return
            if nonneg:   # values >= 0, +inf or NaN: finite <=> h <= max
                torch.le(w, fmax, out=b)
            else:        # |h| <= max is false exactly for NaN and +-inf
                b.le_(fmax)
            self._count(b, d, o["fin"])

        if floor0:
            ext[0].zero_()
        for c in range(nch):
            slab(c, cpu)
        f64 = torch.float64
        axes = (0,) if inner else (0, 2)
        n = float(A * Q)
        if inner:
            ng = float(Q)
        else:
            ng = torch.full((nch, 1, 1), float(rows), dtype=f64, device=v.device)
            ng[-1] = float(A - (nch - 1) * rows)
        redo = []
        if cpu:
            # slabs whose partials hold a non-finite value or a spread small against their size
            # go through the exact path (host reads of small tensors: free on the CPU). NaN
            # compares False, so a NaN partial fails the first test and an infinite one the second.
            S = part[0].double()
            q = nrm.double().square_().sum(2) if k else part[names.index("csq")].double()
            bad = ~(((q - S * S / ng) >= 0.01 * q) & (q < math.inf))
            if bool(bad.any()):
                hit = bad.flatten(1).any(1).nonzero().flatten().tolist()
                redo = sorted({a // rows for a in hit}) if inner else hit
        if cpu and not redo:
            # every slab took the fast path: shifts 0, every value finite, so the Chan combination
            # below reduces to plain float64 sums of the partials (sum of squares = sum of q_g)
            total = S.sum(axes)
            st = {"sum": total, "sumsq": q.sum(axes)}
            st["n_pos"] = (cnt[0] if cnt is not None else part[names.index("n_pos")]).sum(axes, dtype=f64)
            st["sum_abs"] = total if nonneg else part[names.index("sum_abs")].sum(axes, dtype=f64)
            st["nonfinite"] = torch.zeros((), dtype=f64)
        else:
            if cpu:   # the fast slabs' partials in the exact path's terms, then redo the bad slabs
                part[names.index("shift")].zero_()
                part[names.index("csum")].copy_(part[0])
                fin_p = cnt[1] if cnt is not None else part[names.index("fin")]
                if inner:
                    fin_p.fill_(Q)
                else:
                    fin_p.fill_(rows)
                    fin_p[-1].fill_(A - (nch - 1) * rows)
                for c in redo:
                    slab(c, False)
            P = {nm: part[i].double() for i, nm in enumerate(names)}
            # per partial g: shift m_g (its rounded mean, or 0), shifted sum e_g and square sum q_g
            m_g = P["shift"]
            e_g = P["csum"]
            q_g = nrm.double().square_().sum(2) if k else P["csq"]
            mean_g = m_g + e_g / ng
            M2_g = q_g - e_g * e_g / ng
            total = (mean_g * ng).sum(axes)
            mean = total / n
            M2 = M2_g.sum(axes) + (ng * (mean_g - mean.view((1, U) if inner else (1, U, 1))).square()).sum(axes)
            st = {"sum": total, "sumsq": M2 + total * mean}
            if cnt is not None:
                st["n_pos"], fin = cnt.sum(tuple(a + 1 for a in axes)).unbind(0)
            else:
                st["n_pos"], fin = P["n_pos"].sum(axes), P["fin"].sum(axes)
            st["sum_abs"] = total if nonneg else P["sum_abs"].sum(axes)
            st["nonfinite"] = n * U - fin.sum()
        st["min"] = ext[0].amin(axes).double()
        st["max"] = ext[1].amax(axes).double()
        if floor0:   # the units whose every value is positive: their true minimum (one pass over them)
            allpos = st["n_pos"] >= n
            if bool(allpos.any()):
                idx = allpos.nonzero().flatten()
                st["min"][idx] = torch.amin(v.index_select(1, idx), (0, 2)).double()
        meta = site.meta
        if meta.get("hist_edges") is not None:
            st["hist"] = self._hist(x, v, U, meta, self._buffer(v))
        return st

    @staticmethod
    def _count(b, d, out):
        """Sum of a 0/1 indicator along ``d`` into ``out`` (float64 when 2**24 terms or more: exact)."""
        if out.dtype == b.dtype:
            torch.sum(b, d, out=out)
        else:
            out.copy_(b.sum(d, dtype=out.dtype))

    def _hist(self, x, v, U, meta, b):
        """Fixed-edge histogram over the kind's range: per unit (U, B), or for softmax of each row's
        largest probability (B,). ``v``: the (A, U, Q) view of ``x``, ``b`` a scratch buffer like it.
        NaN values are counted in no bin."""
        lo, hi = meta["bounds"]
        B = HIST_BINS
        if meta["kind"] == "softmax":
            v = x.amax(meta["softmax_dim"] % x.dim()).reshape(-1)
            b = torch.empty_like(v)
        torch.sub(v, lo, out=b).mul_(B / (hi - lo)).floor_().clamp_(0, B - 1).nan_to_num_(nan=float(B))
        if meta["kind"] == "softmax":
            return _bin_counts(b.to(torch.int64), B + 1)[:B]
        if U * (B + 1) < _EXACT_F32:
            off = torch.arange(U, device=b.device, dtype=b.dtype).mul_(B + 1)
            idx = b.add_(off.view(1, U, 1)).to(torch.int64)
        else:
            off = torch.arange(U, device=b.device, dtype=torch.int64).mul_(B + 1)
            idx = b.to(torch.int64).add_(off.view(1, U, 1))
        return _bin_counts(idx.reshape(-1), U * (B + 1)).view(U, B + 1)[:, :B]

    def _new_site(self, name, x, kind, source, module, bounds, axis, dim, nonneg=False):
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
        site = _Site(meta, nonneg)
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
                acc = s.acc
                acc["count"] = torch.full((), float(s.count), dtype=torch.float64, device=acc["sum"].device)
                out.append((s.meta["key"], acc, s.samples))
            s.acc, s.samples, s.count = None, [], 0
        return out
