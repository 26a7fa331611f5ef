"""Activation capture: module-output hooks and an activation wrapper for functional activations.

Every step, per unit and on the device, sufficient statistics are accumulated for each selected
*site* (a module's output, or one functional activation call site such as ``features.3/relu#0``):
count, sum, sum |h|, sum h^2, min, max, count(h > 0), non-finite count, and for bounded activations
(sigmoid, tanh, hardtanh, relu6, softmax) near-bound counts at fixed deltas (0.01, 0.03, 0.1), and the
transformer health statistics (:mod:`recorder.health`: attention entropy per head and the largest logit
of softmax sites, whose input is handed to the pass; sum h^3, h^4 and massive activations elsewhere).
With these the analyzer answers
dead units (strict / APoZ / tau-dormant) and saturation at any threshold. Raw activations of the
first K samples are copied when the raw schedule fires.

Hot path: only torch operations on the device (no ``.item()``, ``.cpu()`` or Python loops over
elements): one fused pass per call of a site where it pays (a ``torch.compile``'d reduction that also
adds into the site's accumulator), the plain-torch reference elsewhere (see
:mod:`recorder.activation_stats` and :mod:`recorder.fused_stats`). The statistics' own torch calls
bypass the activation wrapper. The kinds are in :mod:`recorder.activation_kinds`.

Naming: a functional call site is ``<enclosing module path>/<op>#<i>``, ``i`` counting the calls of
that op within one invocation of the enclosing module (so a module called twice per forward feeds
the same sites twice, like its module-output site); the root module's path is empty (``/relu#0``).
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bbdecoder.analyzer.trace import format as fmt
from .activation_kinds import (ATTENTION, BOUNDS, CONV_STYLE, LINEAR_STYLE, NONNEG_KINDS, NONNEG_MODULES,
                               WATCHED, call_bounds, call_kind, fused_attention_config, module_kind, select_sites,
                               site_family, softmax_dim, valid_bounds)
from .activation_stats import Site, SiteStats
from .errors import RecorderWarning
from .health import logits_of, site_stats
from .modules import redirected
from .sample_budget import SampleBudget

def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputing a forward)."""
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f is not None and f() != -1



def _eager(fn: Callable) -> Callable:
    """``fn`` run outside any torch.compile graph (a graph break where Dynamo meets it; about 0.5 us
    per eager call)."""
    return torch.compiler.disable(fn, recursive=True)


def compile_refusal(model: nn.Module) -> str | None:
    """Why the activation hooks cannot observe ``model`` under ``torch.compile`` (None: they can).

    The hooks run outside the compiled graph: Dynamo breaks the graph around each of them. A model
    compiled with ``fullgraph=True`` (``torch.compile(model, fullgraph=True)`` or
    ``module.compile(fullgraph=True)`` on the model or one of its modules, before the Recorder is
    created) forbids graph breaks, so the hooks would raise in the forward pass.
    """
    seen = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        ctxs = [getattr(m, "dynamo_ctx", None)]
        f = getattr(m, "_compiled_call_impl", None)
        ctxs += [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if _has_contents(c)]
        if any(getattr(c, "fullgraph", None) is True for c in ctxs):
            name = type(m).__name__
            return (f"the model ({name}) is compiled with torch.compile(fullgraph=True), which forbids the "
                    "graph breaks that activation recording needs")
        stack.extend(m.children())
    return None


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:   # an empty cell
        return False
    return True


class _Wrapper(TorchFunctionMode):
    """The activation wrapper: sees functional activations while the model's forward runs."""

    def __init__(self, tracker: "ActivationTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = WATCHED.get(func)
        # fused attention is noted in the first training forward only (with forward_order): a flag after
        if kind is not None and isinstance(out, torch.Tensor) and not (kind is ATTENTION
                                                                       and self.tracker.order_done):
            try:
                self.tracker._fn_hook(func, kind, out, args, kwargs)
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
        #: the raw samples' plans (no byte budget unless the recorder sets one: :mod:`recorder.sample_budget`)
        self.budget = SampleBudget(self.samples)
        self.unit_axis = dict(unit_axis or {})
        self.on_new_site = on_new_site
        self.error: BaseException | None = None
        self.sites: dict[str, Site] = {}
        self._keys: set[str] = set()
        self._names = {m: n for n, m in model.named_modules()}
        #: (module, {kind: calls so far in this invocation}) for every module whose forward is running
        self._stack: list[tuple[nn.Module, dict]] = []
        self._want_raw = False
        self._handles: list = []
        #: the statistics kernels (fused or plain torch)
        self.kernel = SiteStats()
        self._stats = self.kernel.update   # an instance attribute: a benchmark may wrap it
        #: execution order of the first training forward: ("layer", layer id, in, out) and ("site", key)
        self.forward_order: list = []
        #: True once the first training forward has been seen (forward_order complete)
        self.order_done = False
        self._layer_of = {m: i for i, m in (layer_ids or {}).items()}
        self._mode: _Wrapper | None = None
        self._skipped_root = False   # the root's call runs another method (modules.redirected): not a forward
        self.module_sites, self.fn_all, self.fn_patterns = select_sites(model, spec, layer_ids or {})
        self.attention_unobserved: list[str] = fused_attention_config(model)   # + paths calling sdpa
        self._fn_hook = _eager(self._functional)
        #: steps per row of statistics (set by the recorder; > 1: new sites declare ``first_step``)
        self.window = 1
        #: new sites also record the transformer health statistics (:mod:`recorder.health`)
        self.health = True
        #: training-mode forwards seen so far (tells whether a forward ran since the last step)
        self.forwards = 0
        self.install()

    # ------------------------------------------------------------------ selection
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
    def install(self) -> None:
        """Install the hooks on the model (the constructor does; again after :meth:`remove`)."""
        root = self.model
        need_fn = self.fn_all or bool(self.fn_patterns)
        # torch.compile: every hook runs outside the compiled graph (Dynamo breaks the graph around
        # it), so the statistics are computed eagerly on the real tensors, as without compile
        out = _eager
        self._handles.append(root.register_forward_pre_hook(out(self._root_pre)))
        self._handles.append(root.register_forward_hook(out(self._root_post), always_call=True))
        for m in self._layer_of:
            self._handles.append(m.register_forward_hook(out(self._layer_done)))
        for name, m in root.named_modules():
            if need_fn and m is not root:
                self._handles.append(m.register_forward_pre_hook(out(self._push)))
                self._handles.append(m.register_forward_hook(out(self._pop), always_call=True))
            if m in self.module_sites:
                self._handles.append(m.register_forward_hook(out(self._module_out)))
        self._need_fn = need_fn
        # ``model.compile(fullgraph=True)`` after this: the hooks would raise in the forward pass
        plain = root.compile

        def compile(*args, **kwargs):
            if kwargs.get("fullgraph") and self._handles:
                self.remove()
                warnings.warn("bbdecoder: activations are no longer recorded: model.compile(fullgraph=True) "
                              "forbids the graph breaks that activation recording needs", RecorderWarning,
                              stacklevel=2)
            return plain(*args, **kwargs)

        root.__dict__["compile"] = compile

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.__dict__.pop("compile", None)
        if self._mode is not None:
            try:
                self._mode.__exit__(None, None, None)
            except Exception:
                pass
            self._mode = None

    def _active(self) -> bool:
        return self.model.training and not _in_backward()

    def _root_pre(self, module, args, entry=False):
        if module is not self.model and not entry:   # a copy of the model (copy.deepcopy carries the hooks along)
            return
        if not entry and redirected(module):   # Lightning's DDP runs training_step through the root's call
            self._skipped_root = True
            return
        self._stack = [(module, {})]
        if self._need_fn and self._active() and self._mode is None:
            self._mode = _Wrapper(self)
            self._mode.__enter__()

    def _root_post(self, module, args, out, entry=False):
        if module is not self.model and not entry:
            return
        if not entry and self._skipped_root:
            self._skipped_root = False
            return
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._stack = []
        if self._active():
            self.forwards += 1
            if self.forward_order:
                self.order_done = True

    def _layer_done(self, module, args, out):
        if self.order_done or not self._active() or module not in self._layer_of:
            return
        t_in = args[0] if args and isinstance(args[0], torch.Tensor) else None
        t_out = out if isinstance(out, torch.Tensor) else None
        self.forward_order.append({"event": "layer", "id": self._layer_of[module],
                                   "in_shape": list(t_in.shape[1:]) if t_in is not None else None,
                                   "out_shape": list(t_out.shape[1:]) if t_out is not None else None})

    def _push(self, module, args):
        if not self._stack and module in self._names:   # a forward that enters below the root (the root's
            self._root_pre(module, args, entry=True)     # own never runs: training_step calls self.model(...))
        self._stack.append((module, {}))

    def _pop(self, module, args, out):
        if self._stack and self._stack[-1][0] is module:
            self._stack.pop()
            if len(self._stack) == 1 and self._stack[0][0] is module:   # that entry's forward ends
                self._root_post(module, args, out, entry=True)

    def _module_out(self, module, args, out):
        if not self._active() or module not in self._names:
            return
        t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
        if not isinstance(t, torch.Tensor):
            return
        try:
            name = self._names.get(module, "")
            kind = module_kind(module) or "output"
            bounds = None
            if kind == "hardtanh" or kind == "relu6":
                bounds = valid_bounds(module.min_val, module.max_val)
            elif kind in BOUNDS:
                bounds = BOUNDS[kind]
            dim = getattr(module, "dim", None) if kind == "softmax" else None
            nonneg = ((type(module) in NONNEG_MODULES and (kind != "softplus" or module.beta > 0))
                      or (kind == "hardtanh" and bounds is not None and bounds[0] >= 0))
            self._observe(name, t, kind, "module", name, bounds, dim, nonneg=nonneg,
                          style="linear" if isinstance(module, LINEAR_STYLE) else
                          "conv" if isinstance(module, CONV_STYLE) else None,
                          logits=logits_of(args, t) if kind == "softmax" else None)
        except Exception as e:
            self.error = self.error or e

    def _functional(self, func, kind, out, args, kwargs):
        if not self._active():
            return
        inner, calls = self._stack[-1] if self._stack else (self.model, {})
        if inner is not self.model and module_kind(inner) is not None:
            return  # nn.ReLU, transformers' NewGELUActivation & co.: the module's own site covers it
        path = self._names.get(inner, "")
        if kind == ATTENTION:   # fused attention: its probabilities are not observable (noted once)
            return None if path in self.attention_unobserved else self.attention_unobserved.append(path)
        kind = call_kind(kind, args, kwargs)
        idx = calls.get(kind, 0)
        calls[kind] = idx + 1
        name = f"{path}/{kind}#{idx}"
        if not self._fn_selected(name, kind):
            return
        dim = None
        if kind == "softmax":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        bounds = call_bounds(func, kind, args, kwargs)
        nonneg = kind in NONNEG_KINDS or (kind == "hardtanh" and bounds is not None and bounds[0] >= 0)
        if kind == "softplus":   # 1/beta * log(1 + exp(beta * x)) is negative for beta < 0
            beta = kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
            nonneg = isinstance(beta, (int, float)) and beta > 0
        self._observe(name, out, kind, "function", path, bounds, dim, nonneg=nonneg,
                      logits=logits_of(args, out) if kind == "softmax" else None)

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

    def _observe(self, name, t, kind, source, module, bounds, dim, nonneg=False, style=None, logits=None):
        if not t.is_floating_point() or t.dim() == 0:
            return
        # the statistics' own torch calls must not pass through the activation wrapper (or any
        # other torch-function mode or subclass): that would cost a Python call per operation
        with torch._C.DisableTorchFunction():
            if torch.is_autocast_enabled(t.device.type):   # statistics in float32/64, never autocast's dtype
                with torch.autocast(t.device.type, enabled=False):
                    self._observe_now(name, t, kind, source, module, bounds, dim, nonneg, style, logits)
            else:
                self._observe_now(name, t, kind, source, module, bounds, dim, nonneg, style, logits)

    def _observe_now(self, name, t, kind, source, module, bounds, dim, nonneg, style, logits=None):
        x = t.detach()
        axis = self._axis(name, x, style)
        U = x.shape[axis]
        site = self.sites.get(name)
        if site is None:
            if kind == "softmax":
                dim = softmax_dim(dim, x.dim())
            site = self._new_site(name, x, kind, source, module, bounds, axis, dim, nonneg)
        meta = site.meta
        if not self.order_done:
            self.forward_order.append({"event": "site", "key": meta["key"]})
        if meta["units"] != U or meta["unit_axis"] != axis:
            meta["mismatched_calls"] = meta.get("mismatched_calls", 0) + 1
            return
        if x.numel() == 0:
            return
        if logits is None:
            self._stats(site, x, axis, U)
        else:
            self._stats(site, x, axis, U, logits)
        if self._want_raw and self.samples > 0 and not site.samples:
            self.budget.capture(site, x)   # the first K inputs, under the byte budget (recorder.sample_budget)


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
                "hist_edges": None, "family": site_family(kind, bounds)}
        site_stats(meta, kind, int(U), bounds, self.window, self.health)
        site = Site(meta, nonneg)
        self.sites[name] = site
        if self.on_new_site is not None:
            self.on_new_site(meta)
        return site

    # ------------------------------------------------------------------ step boundary
    def want_raw(self, flag: bool) -> None:
        """Whether the forward passes until the next ``take()`` keep raw samples."""
        self._want_raw = bool(flag)

    def take(self, stats: bool = True) -> list[tuple[str, tuple | None, list[torch.Tensor]]]:
        """The accumulated statistics and samples of every site since the last call; resets them.

        Args:
            stats: False: only the raw samples; the statistics keep accumulating (a window of
                several steps, :class:`recorder.act_window.ActivationWindow`).

        Returns:
            ``[(site key, (accumulator, places) or None, samples)]`` (see
            :meth:`recorder.activation_stats.Site.take_acc`: the accumulator must be copied before
            the next forward pass adds to it).
        """
        out = []
        for s in self.sites.values():
            acc = s.take_acc() if stats else None
            if acc is not None or s.samples:
                out.append((s.meta["key"], acc, s.samples))
            s.samples = []
        return out
