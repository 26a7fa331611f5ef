"""Transformer health statistics of the activation capture: what they are, how a site declares them,
and the small inputs the fused pass needs (the softmax's logits, a strided sample of the values).

Recorded every step for every site, in the same fused pass as the per-unit statistics
(:mod:`recorder.fused_stats`), never synchronising the device:

* softmax sites (eager attention: probabilities ``[B, H, Tq, Tk]``, units = heads on axis 1):
  ``entropy`` (U,): per unit the sum over its rows of the row entropy ``-sum_k p_k log p_k`` in nats
  (``0 log 0 = 0``; a NaN probability makes its unit's sum NaN), computed from the logits ``z`` as
  ``lse - sum_k p_k z_k`` with ``lse = max z - log max p`` (exact for ``p = softmax(z)``; one log per
  row instead of one per value: a third of the cost), or as ``-sum p log p`` where the logits were not
  observable; and ``logit_max`` (U,): the largest softmax input (logit) of the unit. Rows per unit: ``rows / U`` (``rows`` is the softmax sites'
  existing row count) where the softmax axis is not the unit axis.
* every other site: ``sum3`` and ``sum4``: sum h^3 and sum h^4 over every value of the site (float64,
  about 0; accumulated per unit around the unit's shift, see :mod:`recorder.fused_stats`), from which
  the analyzer takes the site's excess kurtosis; ``n_massive``: the number of units (channels) whose
  max |h| exceeds ``MASSIVE_FACTOR x m`` (the largest such number over the calls; Sun et al. find
  massive activations in a few fixed feature dimensions, and counting values instead would need a
  second pass over the data, the threshold depending on the same call's median), where ``m`` is the
  median of the non-zero |h| of a strided sample of
  at most :data:`SAMPLE_SIZE` values of that call (an estimate of the site's median magnitude; zeros
  left out so that a ReLU site, often over half 0, is scaled by its active values; Sun et al. 2024 call
  such values massive activations); ``massive_ratio``: the largest ``max |h| / m`` of the calls (0
  where the sample has no non-zero finite value: such a call is not judged).

Merge rules (windows of steps on the device, ranks in the analyzer): ``entropy``, ``sum3``,
``sum4`` add; ``logit_max``, ``n_massive`` and ``massive_ratio`` take the maximum. No means are stored.
"""

from __future__ import annotations

import math

import torch

from bbdecoder.analyzer.trace import format as fmt
from .fused_stats import MASSIVE_FACTOR, NEAR_DELTAS

__all__ = ["SOFTMAX_STATS", "SCALAR_STATS", "MAX_STATS", "SAMPLE_SIZE", "MASSIVE_FACTOR", "declare", "logits_of",
           "sample_of", "site_stats"]

#: per-unit statistics of softmax sites, in accumulator order
SOFTMAX_STATS = ("entropy", "logit_max")
#: per-site scalars of every other site, in accumulator order
SCALAR_STATS = ("sum3", "sum4", "n_massive", "massive_ratio")
#: the statistics merged by their maximum (every other one adds)
MAX_STATS = ("logit_max", "n_massive", "massive_ratio")
#: values in the strided sample whose median |h| scales the massive-activation count
SAMPLE_SIZE = 1024


def declare(stats: dict, kind: str, U: int) -> None:
    """Add the health statistics' shapes to a site's ``stats`` declaration (``{name: shape}``)."""
    if kind == "softmax":
        stats.update({k: [U] for k in SOFTMAX_STATS})
    else:
        stats.update({k: [] for k in SCALAR_STATS})


def site_stats(meta: dict, kind: str, U: int, bounds, window: int, health: bool = True) -> dict:
    """A new site's statistics declaration (``{name: shape}``, set as ``meta["stats"]``; bounded kinds
    also get ``meta["near_deltas"]``): the per-unit sums and extrema, ``count`` and ``nonfinite``;
    ``first_step`` for windows of several steps; near-bound counts of bounded kinds (softmax: of its
    rows, and ``rows``); the health statistics (:func:`declare`) unless ``health`` is False."""
    stats = {k: [U] for k in ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")}
    stats.update(count=[], nonfinite=[])
    if window > 1:   # rows cover windows of steps: each row names its first step
        stats[fmt.SITE_WINDOW_STAT] = []
    if bounds is not None:   # near-bound counts at fixed deltas (int32): saturation at those deltas
        meta["near_deltas"] = list(NEAR_DELTAS)
        stats["near"] = [len(NEAR_DELTAS)] if kind == "softmax" else [U, len(NEAR_DELTAS)]
        if kind == "softmax":   # near counts rows (of the largest probability): their number
            stats["rows"] = []
    if health and (kind != "softmax" or bounds is not None):
        declare(stats, kind, U)
    meta["stats"] = stats
    return stats


def logits_of(args, out: torch.Tensor) -> torch.Tensor | None:
    """The softmax's input (its logits) from a call's positional ``args`` (a functional call or a
    module's forward), when it is a tensor of the output's shape; else None."""
    t = args[0] if args else None
    if isinstance(t, torch.Tensor) and t.shape == out.shape and t.is_floating_point():
        return t.detach()
    return None


_STEPS: dict = {}


def _stride(n: int, P: int, size: int) -> int:
    """A stride giving at most ``size`` of ``n`` values, coprime with the period ``P = U x Q`` of the
    units (a stride sharing a factor with it would skip units: a multiple of it samples one unit)."""
    key = (n, P, size)
    s = _STEPS.get(key)
    if s is None:
        s = max(1, -(-n // size))
        while P > 1 and math.gcd(s, P) != 1:
            s += 1
        if len(_STEPS) > 4096:
            _STEPS.clear()
        s = _STEPS[key] = s
    return s


def sample_of(v: torch.Tensor, size: int = SAMPLE_SIZE) -> torch.Tensor:
    """At most ``size`` values of ``v`` (A, U, Q) taken at a fixed stride over its flattened values (a
    view where ``v`` is contiguous; no device synchronisation)."""
    flat = v.reshape(-1)
    n = flat.numel()
    A, U, Q = v.shape
    return flat[::_stride(n, U * Q, size)][:size]
