"""Counting the device operations the activation statistics add per site and step (a diagnostic for
``scripts/gpu_check.py`` and ``scripts/bench_overhead.py``; not used while recording).

:func:`site_ops` records a few training steps with ``activations=True`` and profiles one of them
(``torch.profiler``): the work done inside the statistics calls of the sites (:meth:`SiteStats.update
<recorder.activation_stats.SiteStats.update>`) and inside the step's hand-over of the accumulated
statistics (:meth:`ActivationTracker.take <recorder.activations.ActivationTracker.take>`) is counted.
On CUDA an operation is a kernel launch or an asynchronous copy/memset issued by the runtime; on
the CPU it is an aten operator called directly by the recorder (views and allocations excluded) or
one kernel of a compiled region (inductor's C++ kernels, counted with its kernel profiling on).
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch

__all__ = ["site_ops", "NO_WORK"]

#: aten operators that launch no kernel (views, metadata, allocations)
NO_WORK = frozenset({
    "aten::view", "aten::select", "aten::slice", "aten::t", "aten::transpose", "aten::reshape", "aten::as_strided",
    "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::empty", "aten::empty_strided", "aten::alias",
    "aten::detach", "aten::lift_fresh", "aten::_reshape_alias", "aten::permute", "aten::movedim", "aten::unbind",
    "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::empty_like", "aten::flatten",
    "aten::contiguous", "aten::split", "aten::chunk", "aten::narrow", "aten::_unsafe_view", "aten::set_"})
_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaMemcpyAsync",
           "cudaMemsetAsync", "cudaGraphLaunch")
_LABELS = ("bbd::site_update", "bbd::site_take")


def _label_of(e) -> str | None:
    p = e.cpu_parent
    while p is not None:
        if p.name in _LABELS:
            return p.name
        p = p.cpu_parent
    return None


def _is_work(e, cuda: bool) -> bool:
    name = e.name
    if cuda:
        return name in _LAUNCH
    if "cpp_fused" in name or name.startswith("graph_") and "kernel" in name:
        return True
    if not name.startswith("aten::") or name in NO_WORK:
        return False
    p = e.cpu_parent
    while p is not None and p.name not in _LABELS:
        if p.name.startswith("aten::") or "Compiled" in p.name or "cpp_fused" in p.name:
            return False   # called by another operator or inside a compiled region: counted there
        p = p.cpu_parent
    return True


def site_ops(model: torch.nn.Module, batch: Callable[[int], Any], loss_fn: Callable[[Any, int], torch.Tensor],
             warmup: int = 3, fused: Any = None, **rec_kwargs) -> dict:
    """Operations per site and step that the activation statistics add to one training step.

    Args:
        model: the model (trained in place for ``warmup + 1`` steps, SGD lr 0).
        batch: ``batch(i)`` -> the model's input of step i (on the model's device).
        loss_fn: ``loss_fn(output, i)`` -> scalar loss.
        warmup: steps before the profiled one (compiles the fused statistics).
        fused: the statistics path (:class:`recorder.activation_stats.SiteStats`; None: its default).
        rec_kwargs: more Recorder options (``activations`` defaults to True).

    Returns:
        ``{"sites", "calls", "update_ops", "take_ops", "per_site_step", "per_call", "unit", "path"}``:
        site and call counts of the profiled step, operations inside the statistics calls and inside
        the hand-over, operations per site and step ((update + take) / sites), the unit ("kernel
        launches" on CUDA, "CPU ops" on the CPU) and the path ("fused", "eager" (the same body
        uncompiled: the fallback), "reference" (the float64 oracle) or "auto": fused for tensors of
        ``fused_min`` elements or more on the CPU, always on CUDA).
    """
    from torch.profiler import ProfilerActivity, profile, record_function
    from .recorder import Recorder
    try:   # inductor's C++ kernels appear in the CPU profile only with kernel profiling on
        import torch._inductor.config as icfg
        icfg.cpp.enable_kernel_profile = True
    except Exception:
        pass
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    opts = dict(activations=True, grads_every=0, weights_every=0, activations_every=0)
    opts.update(rec_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = [0]
    with tempfile.TemporaryDirectory() as tmp, Recorder(model, tmp, **opts) as rec:
        tr = rec._tracker
        tr.kernel.fused = fused
        inner, take = tr._stats, tr.take

        def upd(*a, **k):
            calls[0] += 1
            with record_function(_LABELS[0]):
                return inner(*a, **k)

        def tk(*a, **k):
            with record_function(_LABELS[1]):
                return take(*a, **k)
        tr._stats, tr.take = upd, tk

        def one(i):
            out = model(batch(i))
            loss = loss_fn(out, i)
            loss.backward()
            rec.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for i in range(warmup):
            one(i)
        if cuda:
            torch.cuda.synchronize(dev)
        calls[0] = 0
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            one(warmup)
            if cuda:
                torch.cuda.synchronize(dev)
        sites = len(tr.sites)
        path = ("eager" if tr.kernel.failed is not None or fused is False else "reference" if fused == "reference"
                else "fused" if fused or cuda else "auto")
    counts = {lab: 0 for lab in _LABELS}
    for e in prof.events():
        lab = _label_of(e)
        if lab is not None and _is_work(e, cuda):
            counts[lab] += 1
    n = max(sites, 1)
    return {"sites": sites, "calls": calls[0], "update_ops": counts[_LABELS[0]], "take_ops": counts[_LABELS[1]],
            "per_site_step": (counts[_LABELS[0]] + counts[_LABELS[1]]) / n,
            "per_call": counts[_LABELS[0]] / max(calls[0], 1), "unit": "kernel launches" if cuda else "CPU ops",
            "path": path}

