"""The per-site statistics of the activation capture: per unit, on the device, one pass per call.

One call of :meth:`SiteStats.update` adds the statistics of one activation tensor to its site's
accumulator (count, sum, sum |h|, sum h^2, min, max, count(h > 0), non-finite count and, for bounded
kinds, near-bound counts at the deltas of :data:`recorder.fused_stats.NEAR_DELTAS`): one compiled
pass (:func:`recorder.fused_stats.fused_update`) where it pays, else the same body run eagerly
(:func:`recorder.fused_stats.eager_update`), which is also the fallback when the compiler is
unavailable or fails (one :class:`RecorderWarning`, never an exception into the training loop).
:func:`recorder.fused_stats.reference_update` (float64, plain torch) is the oracle they are tested
against (``SiteStats(fused="reference")`` records with it).
:class:`recorder.activations.ActivationTracker` takes the accumulated statistics at each step.
Hot path: only torch operations on the device (no ``.item()``, ``.cpu()`` or Python loops over
elements).

Budget (default settings): per unit and step 6 float64 statistics (48 bytes) plus, for bounded
kinds, 3 int32 near-bound counts (12 bytes), plus the health statistics (:mod:`recorder.health`:
softmax sites 2 float64 per unit, other sites 4 float64 scalars), so at most 64 bytes per unit and
step with the per-site scalars for sites of usual widths (``scripts/trace_size.py`` computes it from
the format).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import health as H
from .errors import RecorderWarning
from .fused_stats import (NEAR_DELTAS, ROWS, acc_layout, eager_update, fused_update, new_acc, reference_update,
                          thresholds)

__all__ = ["Site", "SiteStats", "units_view", "NEAR_DELTAS"]


def units_view(x: torch.Tensor, axis: int, U: int) -> torch.Tensor:
    """``x`` seen as (A, U, Q), units in the middle: a view where the layout allows (contiguous, or
    units innermost as in channels_last: (A', U, 1)), else a copy."""
    shape = x.shape
    A, Q = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    if Q == 1 or x.is_contiguous():
        return x.reshape(A, U, Q)
    xm = x.movedim(axis, -1)
    if xm.is_contiguous():   # channels_last: units innermost
        return xm.reshape(-1, U, 1)
    return x.reshape(A, U, Q)   # a copy


class Site:
    """The accumulator of one site, kept on the device (:mod:`recorder.fused_stats` layout).

    Attributes:
        meta: the site's manifest entry.
        acc: flat float64 accumulator (None before the first call).
        fresh: the next call replaces the accumulated values (set by :meth:`take`).
        samples: raw samples of the current step.
    """

    __slots__ = ("meta", "acc", "samples", "nonneg", "thr", "fresh", "has", "health", "_places")

    def __init__(self, meta: dict, nonneg: bool = False):
        self.meta = meta
        #: the health statistics (:mod:`recorder.health`) are declared: the accumulator holds them
        self.health = any(k in meta.get("stats", {}) for k in H.SOFTMAX_STATS + H.SCALAR_STATS)
        self.acc: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.nonneg = nonneg
        self.thr: torch.Tensor | None = None
        self.fresh = True
        self.has = False
        self._places = None

    @property
    def softmax(self) -> bool:
        return self.meta.get("kind") == "softmax" and self.meta.get("near_deltas") is not None

    @property
    def near(self) -> bool:
        """Per-unit near-bound counts (bounded kinds other than softmax)."""
        return self.meta.get("near_deltas") is not None and self.meta.get("kind") != "softmax"

    def places(self) -> tuple[tuple[str, int, tuple, bool, bool], ...]:
        """Where each statistic of :meth:`take` lives in the accumulator, in the order of the trace:
        ``[(name, start, shape, transposed, count)]``: the statistic is ``acc[start:start + numel]``
        viewed as ``shape`` (float64), then transposed (the near-bound counts of bounded kinds,
        ``(K, U)`` in the accumulator, ``(U, K)`` in the trace) and, for a count, stored as int32.
        Static for a site (cached once its width is known)."""
        U = int(self.meta["units"])
        cached = self._places
        if cached is not None and cached[0] == U:
            return cached[1]
        lay = acc_layout(U, self.near, self.softmax, self.health)
        out = [(k, i * U, (U,), False, False) for i, k in enumerate(ROWS[:-1])]
        out += [("count", lay["count"], (), False, False), ("nonfinite", lay["nonfinite"], (), False, False)]
        if self.near:
            out.append(("near", len(ROWS) * U, (len(NEAR_DELTAS), U), True, True))
        elif self.softmax:
            out.append(("near", lay["soft"], (len(NEAR_DELTAS),), False, True))
            out.append(("rows", lay["health"] - 1, (), False, False))
        if self.health:
            h = lay["health"]
            if self.softmax:
                out += [(k, h + j * U, (U,), False, False) for j, k in enumerate(H.SOFTMAX_STATS)]
            else:
                out += [(k, h + j, (), False, False) for j, k in enumerate(H.SCALAR_STATS)]
        self._places = (U, tuple(out))
        return self._places[1]

    def take_acc(self) -> tuple[torch.Tensor, tuple] | None:
        """The accumulator (the device tensor itself: copy it before the next call adds to it) and its
        :meth:`places`; None when nothing was accumulated since the last take. Resets the site."""
        if not self.has:
            return None
        self.fresh, self.has = True, False
        return self.acc, self.places()

    def take(self) -> dict[str, torch.Tensor] | None:
        """The statistics accumulated since the last take (None: no call since), named as in the
        trace: float64 ``(U,)`` per-unit sums and extrema, float64 scalars ``count`` and ``nonfinite``,
        int32 ``near`` ``(U, K)`` (softmax: ``(K,)`` of rows, and their number ``rows``), and the health
        statistics (:mod:`recorder.health`) where declared. The float64 tensors are views of the
        accumulator: valid until the next call adds to it."""
        got = self.take_acc()
        if got is None:
            return None
        acc, places = got
        st = {}
        for name, start, shape, transposed, count in places:
            t = acc[start:start + math.prod(shape)].view(shape)
            t = t.t() if transposed else t
            st[name] = t.to(torch.int32) if count else t
        return st


class SiteStats:
    """The statistics kernels of one tracker's sites.

    Args:
        fused: True: always the compiled pass; False: always the eager (uncompiled) body;
            "reference": the float64 oracle (slow; tests); None
            (default, or the environment variable ``BBDECODER_FUSED_STATS=0/1``): the compiled pass
            off the CPU, and on the CPU for tensors of at least ``fused_min`` elements (smaller ones
            cost less than a compiled call's dispatch, and never pay the compile warm-up).
        fused_min: see ``fused``.

    Attributes:
        failed: the exception that turned the compiled pass off (None while it works).
    """

    def __init__(self, fused: bool | None = None, fused_min: int = 1 << 16):
        env = os.environ.get("BBDECODER_FUSED_STATS")
        if fused is None and env in ("0", "1"):
            fused = env == "1"
        self.fused = fused
        self.fused_min = fused_min
        self.failed: BaseException | None = None

    def use_fused(self, v: torch.Tensor) -> bool:
        if self.failed is not None or self.fused is False or self.fused == "reference":
            return False
        return self.fused is True or v.device.type != "cpu" or v.numel() >= self.fused_min

    def update(self, site: Site, x: torch.Tensor, axis: int, U: int, logits: torch.Tensor | None = None) -> None:
        """Add the statistics of ``x`` (units on ``axis``, ``U`` of them) to ``site``'s accumulator.
        ``logits``: a softmax site's input, of ``x``'s shape (its largest value per unit is recorded)."""
        v = units_view(x, axis, U)
        meta = site.meta
        if site.acc is None or site.acc.device != v.device:
            site.acc = new_acc(U, site.near, site.softmax, v.device, site.health)
            site.fresh = True
            if meta.get("near_deltas") is not None and site.near:
                site.thr = thresholds(meta["bounds"], v.device)
        soft, lv, sample = site.softmax, None, None
        if site.health and soft and logits is not None and logits.shape == x.shape:
            lv = logits
        elif site.health and not soft:
            sample = H.sample_of(v)
        args = (site.acc, v, site.thr if site.near else None, x if soft else None,
                meta.get("softmax_dim") if soft else None, site.fresh, lv, sample, site.health, axis)
        done = False
        if self.use_fused(v):
            try:
                fused_update(*args)
                done = True
            except Exception as e:   # no compiler, an unsupported case: the reference from now on
                self.failed = e
                warnings.warn(f"bbdecoder: the compiled activation statistics are unavailable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); using the same statistics "
                              "uncompiled (same values, more operations per site)", RecorderWarning, stacklevel=2)
        if not done:
            (reference_update if self.fused == "reference" else eager_update)(*args)
        site.fresh, site.has = False, True

    def stats(self, x: torch.Tensor, axis: int, U: int, site: Site) -> dict[str, torch.Tensor]:
        """The statistics of one call on a site of its own (:meth:`update` then :meth:`Site.take`)."""
        site.meta.setdefault("units", U)
        self.update(site, x, axis, U)
        return site.take()
