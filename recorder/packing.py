"""Handing a step's tensors to the background writer without synchronising the device.

The training thread (:meth:`recorder.recorder.Recorder.step`) gathers a step's tensors into a
:class:`Pending`: per device and storage dtype one ``torch.cat`` and, on CUDA, one ``non_blocking``
copy into pinned memory plus an event (:func:`pack`, :func:`to_host`); the gradient statistics are
reduced on the device first (:func:`pack_grad_stats`). No ``.item()``, no ``.cpu()``, no loop over
elements. The writer thread turns a Pending into a :class:`~analyzer.trace.series.StepRecord`
(:func:`resolve`): it waits on the events and views the host buffers as numpy arrays (a group of raw
gradients or weights stays one flat row with its :class:`~analyzer.trace.packed.FlatLayout`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.packed import FlatLayout
from bbdecoder.analyzer.trace.series import StepRecord
from .distributed import local
from .errors import RecorderWarning
from .gradstats import GradStatsPlan, chunk_for, group_items

__all__ = ["Pending", "CastWatch", "AsyncScalar", "to_host", "loss_handoff", "pack", "pack_group", "pack_grad_stats", "GradPlans",
           "pack_activations", "ActRows", "resolve", "drop_payload"]


class Pending:
    """One step on its way to the writer: host tensors (maybe still being copied) and an event."""

    __slots__ = ("step", "epoch", "time", "loss", "groups", "stats", "events", "nbytes", "dropped", "casts",
                 "watch", "acts")

    def __init__(self, step, epoch, t, loss):
        self.step, self.epoch, self.time, self.loss = step, epoch, t, loss
        self.dropped = 0
        self.groups: list = []    # (host flat tensor, layout [(kind, lk, pk, off, n, shape, attrs)])
        self.stats: list = []     # (host partials (rows, 5), GradStatsPlan): gradient statistics
        self.events: list = []
        self.nbytes = 0
        self.casts: list = []     # (kind, host int64 (2,)): values of that kind cast to 0 / to inf
        self.watch = None         # the CastWatch told about them (writer thread)
        self.acts: list = []      # (host accumulators of a device's sites, ActRows, first_step): activation statistics


class CastWatch:
    """Values that a float16 storage dtype turns into 0 (non-zero in training: underflow) or into inf
    (finite in training: overflow). The counts are taken on the device beside the cast, travel to the
    host with the payload and are read on the writer thread (:func:`resolve`), which notes the first
    step that had any; the training thread warns once at its next call (:meth:`warn_once`), so that
    nothing ever synchronises the device: the warning may come a step (or a few) late."""

    def __init__(self):
        self.first: tuple | None = None   # (step, kind, underflow, overflow) of the first step with any
        self.warned = False

    def note(self, step: int, counts: dict) -> None:
        """Writer thread: ``counts`` {kind: int64 (2,)} of one step."""
        if self.first is None:
            for kind, c in counts.items():
                if c[0] or c[1]:
                    self.first = (step, kind, int(c[0]), int(c[1]))
                    break

    def warn_once(self, stacklevel: int = 3) -> None:
        """Training thread: one RecorderWarning once the writer has seen a value lost in the cast."""
        if self.first is None or self.warned:
            return
        self.warned = True
        step, kind, under, over = self.first
        warnings.warn(f"bbdecoder: float16 storage of {kind} lost values at step {step}: {under} non-zero "
                      f"value(s) stored as 0 (underflow, |x| below about 3e-8) and {over} finite value(s) stored as "
                      f"inf (overflow, |x| from 65520); every shard counts them (attributes f16_underflow_{kind}, "
                      f"f16_overflow_{kind}); store {kind} as float32 to keep them", RecorderWarning,
                      stacklevel=stacklevel)


def resolve(p: Pending) -> StepRecord:
    """Writer thread: wait for the device copies, turn host tensors into numpy views."""
    for ev in p.events:
        ev.synchronize()
    loss = p.loss
    if isinstance(loss, torch.Tensor):
        loss = float(loss.reshape(-1)[0]) if loss.numel() else float("nan")
    payloads = []
    casts: dict = {}
    for kind, host in p.casts:
        casts[kind] = casts.get(kind, 0) + host.numpy().astype(np.int64)
    if casts and p.watch is not None:
        p.watch.note(p.step, casts)
    for flat, layout in p.groups:
        arr = flat.numpy()
        kind = layout[0][0]
        if kind in fmt.FLAT_KINDS and all(e[0] == kind for e in layout):   # raw snapshots: one flat row
            payloads.append((kind, None, FlatLayout([e[1:] for e in layout]), arr, None))
            continue
        for kind, lk, pk, off, n, shape, attrs in layout:
            payloads.append((kind, lk, pk, arr[off:off + n].reshape(shape), attrs))
    for host, rows, first in p.acts:   # activation statistics: the stored rows gathered from the accumulators
        payloads += rows.payloads(host.numpy(), first)
    for host, plan in p.stats:   # one packed payload: the writer's cost does not grow with the parameters
        payloads.append((fmt.KIND_GRAD_STATS, None, plan.keys, plan.finish(host.numpy()), plan.attrs))
    return StepRecord(step=p.step, epoch=p.epoch, loss=loss, time=p.time, dropped=p.dropped,
                      payloads=payloads, casts=casts)


def drop_payload(p: Pending) -> Pending:
    """The step without its tensors (queue full, ``on_full="drop"``): the gradient statistics, a few
    bytes per parameter, are kept, so that the per-step series has no holes."""
    q = Pending(p.step, p.epoch, p.time, p.loss)
    q.events = p.events
    q.stats = p.stats
    q.dropped = 1
    return q


def pack_activations(p: Pending, tracker, raw_schedule, s: int, with_stats: bool = True,
                     first_step: int | None = None) -> None:
    """The activation statistics and raw samples accumulated by ``tracker`` (an
    :class:`recorder.activations.ActivationTracker`) since the last step, into ``p``; then tells the
    tracker whether step ``s + 1`` keeps raw samples (``raw_schedule(s + 1)``). ``with_stats=False``: the
    raw samples only (a window of steps goes on); ``first_step``: the window's first step, stored
    with each site's statistics as the float64 scalar :data:`analyzer.trace.format.SITE_WINDOW_STAT`.

    Per device one ``torch.cat`` of the sites' accumulators (one copy to the host on CUDA), whatever
    the number of sites and statistics; the writer thread gathers the stored rows (:class:`ActRows`).

    Raises:
        RuntimeError: the tracker failed during a forward pass (its error is chained).
    """
    tr = tracker
    if tr.error is not None:
        err, tr.error = tr.error, None
        raise RuntimeError(f"activation capture failed: {type(err).__name__}: {err}") from err
    per_dev: dict = {}
    raw = []
    for key, got, samples in tr.take(with_stats):
        if got is not None:
            per_dev.setdefault(got[0].device, []).append((key, got[0], got[1]))
        for t in samples[:1]:
            raw.append((fmt.KIND_ACTIVATIONS, key, "samples", t, None))
    tr.want_raw(raw_schedule(s + 1))
    for dev, sites in per_dev.items():   # one copy of every site's accumulator, split on the writer thread
        flat = torch.cat([acc for _, acc, _ in sites]) if len(sites) > 1 else sites[0][1].clone()
        p.acts.append((to_host(p, dev, flat), ActRows.of(sites, first_step is not None), first_step))
    if raw:
        pack(p, raw, torch.float32)


class ActRows:
    """Where the stored activation statistics of a list of sites are in their accumulators laid end to
    end (:meth:`recorder.activation_stats.Site.places`): one float64 row (per site: its sums, extrema
    and scalars, then ``first_step`` for a window) and one int32 row (near-bound counts), as flat
    payloads (:data:`analyzer.trace.format.FLAT_KINDS`). Built once per list of sites and window
    state (:meth:`of`); :meth:`payloads` gathers on the writer thread (numpy)."""

    _cache: dict = {}

    def __init__(self, sites: list, first_step: bool):
        idx = {False: [], True: []}       # count? -> [accumulator indices]
        entries = {False: [], True: []}   # count? -> [(kind, key, name, off, n, shape, None)]
        size = {False: 0, True: 0}        # count? -> length of that row so far
        self.fill: list[int] = []         # positions of first_step in the float64 row
        base = 0
        for key, acc, places in sites:
            for name, start, shape, transposed, count in places:
                at = np.arange(base + start, base + start + int(np.prod(shape, dtype=np.int64))).reshape(shape)
                at = at.T if transposed else at
                idx[count].append(at.reshape(-1))
                entries[count].append((fmt.KIND_ACT_STATS, key, name, size[count], at.size, at.shape, None))
                size[count] += at.size
            if first_step:
                self.fill.append(size[False])
                idx[False].append(np.zeros(1, np.int64))
                entries[False].append((fmt.KIND_ACT_STATS, key, fmt.SITE_WINDOW_STAT, size[False], 1, (), None))
                size[False] += 1
            base += acc.numel()
        self.rows = []   # (indices, dtype, FlatLayout)
        for count, dtype in ((False, np.float64), (True, np.int32)):
            if entries[count]:
                self.rows.append((np.concatenate(idx[count]), dtype, FlatLayout([e[1:] for e in entries[count]])))

    @classmethod
    def of(cls, sites: list, first_step: bool) -> "ActRows":
        """The gather plan of ``sites`` [(key, accumulator, places)], with a ``first_step`` slot per site
        or not, cached by the sites' keys, sizes and places (by identity: each site keeps its places,
        and the cache keeps them alive, so an id is never another's)."""
        key = (tuple((k, acc.numel(), id(pl)) for k, acc, pl in sites), bool(first_step))
        hit = cls._cache.get(key)
        if hit is None:
            if len(cls._cache) >= 64:
                cls._cache.clear()
            hit = cls._cache[key] = (cls(sites, bool(first_step)), [pl for *_, pl in sites])
        return hit[0]

    def payloads(self, arr: np.ndarray, first_step: int | None = None) -> list:
        """The flat payloads of one step from its host accumulators ``arr`` (float64) and its window's
        ``first_step`` (where the plan has its slots)."""
        out = []
        for idx, dtype, layout in self.rows:
            row = arr[idx]
            if dtype == np.float64 and self.fill:
                row[self.fill] = float(first_step)
            out.append((fmt.KIND_ACT_STATS, None, layout, row if dtype == np.float64 else row.astype(dtype), None))
        return out


class GradPlans(dict):
    """The gradient-statistics plans of a recorder, ``{(device, indices of the parameters with a
    gradient): [(plan, group)]}``, and what is static between steps: the recorded parameters, whether
    any is sharded (a DTensor), and the plans of the usual step (every gradient present, one device)."""

    def __init__(self):
        super().__init__()
        self.targets = None
        self.params: list = []
        self.sharded = False
        self.usual = None   # (device, [(plan, group)], one group covering every parameter)


def pack_grad_stats(p: Pending, targets: list, plans_cache: dict, scratch) -> None:
    """Gradient statistics on the device: per device a fixed handful of whole-buffer operations
    (:class:`recorder.gradstats.GradStatsPlan`); the small result goes to the host like a payload.

    The usual step (every recorded parameter has a dense gradient on one device) costs one read of
    ``.grad`` per parameter in Python and nothing else per parameter; other steps (missing
    gradients, several devices, sparse gradients) go through a per-parameter loop.

    Args:
        p: the step being packed.
        targets: the recorded parameters ``[(layer_key, param_key, parameter, attrs)]``.
        plans_cache: a :class:`GradPlans` (or a plain dict: then nothing but the plans is cached),
            kept by the caller across steps (filled here).
        scratch: the :class:`recorder.gradstats.Scratch` work buffers shared by the plans.
    """
    c = plans_cache if isinstance(plans_cache, GradPlans) else None
    if c is not None and c.targets is not targets:
        c.targets, c.params = targets, [q for _, _, q, _ in targets]
        c.sharded = any(local(q) is not q for q in c.params)
        c.usual = None
    if c is not None and c.usual is not None and not c.sharded:
        dev, plans, whole = c.usual
        grads = [q.grad for q in c.params]
        if not any(g is None for g in grads) and grads[0].device == dev and grads[-1].device == dev:
            n0, e0, nb0 = len(p.stats), len(p.events), p.nbytes
            try:
                _stats_to_host(p, dev, plans, grads, whole, scratch)
                return
            except RuntimeError:   # e.g. a sparse gradient: the general path from now on
                del p.stats[n0:], p.events[e0:]
                p.nbytes, c.usual = nb0, None
    present: dict[Any, list] = {}
    dense = True
    for i, (lk, pk, q, a) in enumerate(targets):
        g = local(q.grad)   # a sharded parameter (FSDP2): this rank's slice, no communication
        if g is None:
            continue
        if g.is_sparse:
            g, dense = g.to_dense(), False
        present.setdefault(g.device, []).append((i, g))
    tg = targets
    for dev, all_items in present.items():
        key = (dev, tuple(i for i, _ in all_items))
        plans = plans_cache.get(key)
        if plans is None:   # groups of bounded size, one after the other through one scratch
            plans = []
            for grp in group_items([g.numel() for _, g in all_items]):
                items = [(tg[i][0], tg[i][1], g.numel(), tg[i][3]) for i, g in (all_items[j] for j in grp)]
                plans.append((GradStatsPlan(items, chunk_for(sum(n for _, _, n, _ in items))), grp))
            plans_cache[key] = plans
        whole = len(plans) == 1
        _stats_to_host(p, dev, plans, [g for _, g in all_items], whole, scratch)
        if c is not None and dense and len(present) == 1 and len(all_items) == len(tg):
            c.usual = (dev, plans, whole)


def _stats_to_host(p: Pending, dev, plans: list, grads: list, whole: bool, scratch) -> None:
    for plan, grp in plans:
        part = plan.partials(grads if whole else [grads[j] for j in grp], scratch)
        p.stats.append((to_host(p, dev, part), plan))


def pack(p: Pending, items, dtype, watch: CastWatch | None = None) -> None:
    """Copy tensors ``items`` [(kind, layer_key, param_key, tensor, attrs)] into flat host
    buffers per device (one cat and one async copy per group of at most
    :data:`recorder.gradstats.GROUP_ELEMS` elements, so that a large model's snapshot never
    needs a device temporary of the model's size), recorded in ``p``. Into float16, the values
    lost in the cast are counted on the device (see :class:`CastWatch`, told about them)."""
    if watch is not None:
        p.watch = watch
    per_dev: dict[Any, list] = {}
    for kind, lk, pk, t, attrs in items:
        if t is None or (attrs is not None and "offset" in attrs and t.numel() == 0):
            continue   # (an empty slice of a sharded parameter: nothing to store)
        if t.is_sparse:
            t = t.to_dense()
        per_dev.setdefault(t.device, []).append((kind, lk, pk, t, attrs))
    for dev, dev_items in per_dev.items():
        for grp in group_items([t.numel() for *_, t, _ in dev_items], chunk=1):
            pack_group(p, dev, [dev_items[j] for j in grp], dtype)


def pack_group(p: Pending, dev: torch.device, items: list, dtype) -> None:
    """One group of tensors on ``dev``: one cat, one copy to the host, its layout, into ``p``."""
    flat = torch.cat([t.reshape(-1) for *_, t, _ in items]) if len(items) > 1 \
        else items[0][3].reshape(-1).clone()
    if flat.dtype != dtype:
        wide = flat
        flat = flat.to(dtype)
        if dtype == torch.float16 and wide.is_floating_point():
            p.casts.append((items[0][0], to_host(p, dev, cast_losses(wide, flat))))
    layout, off = [], 0
    for kind, lk, pk, t, attrs in items:
        n = t.numel()
        layout.append((kind, lk, pk, off, n, tuple(t.shape), attrs))
        off += n
    p.groups.append((to_host(p, dev, flat), layout))


def cast_losses(wide: torch.Tensor, narrow: torch.Tensor) -> torch.Tensor:
    """int64 (2,) on their device: elements non-zero in ``wide`` and 0 in ``narrow`` (underflow),
    finite in ``wide`` and infinite in ``narrow`` (overflow). No synchronisation."""
    under = torch.logical_and(narrow == 0, wide != 0).sum()
    over = torch.logical_and(torch.isinf(narrow), torch.isfinite(wide)).sum()
    return torch.stack([under, over])


def to_host(p: Pending, dev: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a tensor of ours, on ``dev``) on the host: itself on the CPU; on CUDA a non_blocking
    copy into pinned memory with an event in ``p`` for the writer to wait on (no synchronisation);
    elsewhere a plain copy (which may synchronise on that backend). Counts its bytes in ``p``."""
    if dev.type == "cpu":
        host = t
    elif dev.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        p.events.append(ev)
    else:
        host = t.to("cpu")
    p.nbytes += host.numel() * host.element_size()
    return host


class AsyncScalar:
    """A loss on its way to the host: the pinned host tensor and the events to wait on."""

    __slots__ = ("host", "events")

    def __init__(self, host, events):
        self.host, self.events = host, events


def loss_handoff(loss: Any) -> Any:
    """A float, or a host tensor being filled asynchronously from the device."""
    if loss is None:
        return float("nan")
    if isinstance(loss, torch.Tensor):
        if loss.device.type == "cpu" and loss.numel() == 1:   # no device to wait on: one call, not five
            return float(loss.item())
        t = loss.detach().reshape(-1)[:1]
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(t.to(torch.float64), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            return AsyncScalar(host, [ev])
        if t.device.type == "cpu":
            return t.to(torch.float64).clone()
        return t.to("cpu", torch.float64)
    try:
        return float(loss)
    except (TypeError, ValueError):
        return float("nan")
