"""One fused pass per activation site: the per-unit statistics of one call as a single compiled
reduction that also adds them to the site's accumulator, and the plain-torch reference it must equal.

The accumulator of a site is one flat float64 tensor (:func:`acc_layout`)::

    [ROWS x U per-unit rows | near-bound rows (K x U) | nonfinite | count | softmax near (K), rows]

``ROWS``: sum, sum |h|, sum h^2, min, max, count(h > 0) and the per-unit non-finite count (summed
into the site's ``nonfinite`` scalar by the same kernel). Bounded kinds (sigmoid, tanh, hardtanh,
relu6) add per unit, for each delta of :data:`NEAR_DELTAS`, the count of values within delta of a
bound (``h < lo + delta`` or ``h > hi - delta``); softmax adds, per site, the count of rows whose
largest probability exceeds ``1 - delta`` and the number of rows. Counts saturate at ``2**31 - 1`` (their int32 storage).

:func:`fused_update` (``torch.compile``, dynamic shapes: inductor's C++ kernel on the CPU, Triton on
CUDA) reads the (A, U, Q) view of the activation: the per-unit sums are accumulated in float32 along
each row of Q contiguous values, then in float64 across the rows, around a per-unit shift K (the unit's first finite value: ``h - K`` is exact where the values are
close to each other, so a mean far larger than the spread keeps the variance) and combined in
float64 (``sum = S + nK``, ``sumsq = Q + 2KS + nK^2``); half-precision inputs are read as float32,
float64 inputs stay float64. :func:`eager_update` runs the same body without compiling (the fallback,
and the path for small CPU tensors); :func:`reference_update` is the plain-torch oracle: the same
statistics from a float64 copy (shifted alike, in float64), simple and slow. None reads anything back to the host.
"""

from __future__ import annotations

import types

import torch

__all__ = ["ROWS", "NEAR_DELTAS", "COUNT_MAX", "acc_layout", "new_acc", "thresholds", "reference_update",
           "eager_update", "fused_update", "compiled"]

#: per-unit rows of the accumulator, in order
ROWS = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos", "nonfinite")
#: distances from a bound (value units) at which bounded kinds count their values (saturation)
NEAR_DELTAS = (0.01, 0.03, 0.1)
#: near-bound counts saturate here (stored as int32)
COUNT_MAX = float(2 ** 31 - 1)
_MIN, _MAX = ROWS.index("min"), ROWS.index("max")


def acc_layout(U: int, near: bool, softmax: bool) -> dict:
    """Offsets of one site's accumulator: ``{"rows": R, "nonfinite": i, "count": j, "soft": k, "size": n}``
    (R per-unit rows of U values, then the scalars and, for softmax, its K near counts and rows)."""
    K = len(NEAR_DELTAS)
    R = len(ROWS) + (K if near else 0)
    return {"rows": R, "nonfinite": R * U, "count": R * U + 1, "soft": R * U + 2,
            "size": R * U + 2 + (K + 1 if softmax else 0)}


def new_acc(U: int, near: bool, softmax: bool, device) -> torch.Tensor:
    """A fresh accumulator: zeros, minima +inf, maxima -inf."""
    lay = acc_layout(U, near, softmax)
    acc = torch.zeros(lay["size"], dtype=torch.float64, device=device)
    rows = acc[:lay["rows"] * U].view(lay["rows"], U)
    rows[_MIN].fill_(float("inf"))
    rows[_MAX].fill_(float("-inf"))
    return acc


def thresholds(bounds, device) -> torch.Tensor:
    """(2, K) float32: ``lo + delta`` and ``hi - delta`` for each delta of :data:`NEAR_DELTAS` (the
    comparisons of both implementations are made in float32 against these values)."""
    lo, hi = bounds
    t = torch.empty((2, len(NEAR_DELTAS)), dtype=torch.float32, device=device)
    for j, d in enumerate(NEAR_DELTAS):   # fills on the device (no copy from the host)
        t[0, j].fill_(lo + d)
        t[1, j].fill_(hi - d)
    return t


def _combine(acc, fresh, U: int, R: int, rows: list, nonfin, count, soft):
    """The new accumulator from one call's statistics. ``fresh`` (a bool, or a 0-d bool tensor so that
    one compiled graph serves both): the old values are ignored."""
    old = acc[:R * U].view(R, U)
    new = []
    for i, r in enumerate(rows):
        if i == _MIN:
            c = torch.minimum(old[i], r)
        elif i == _MAX:
            c = torch.maximum(old[i], r)
        elif i >= len(ROWS):   # near-bound counts: int32 storage
            c = torch.clamp(old[i] + r, max=COUNT_MAX)
        else:
            c = old[i] + r
        new.append(_pick(fresh, r, c))
    scal = torch.stack([nonfin, count])
    parts = [torch.stack(new).reshape(-1), _pick(fresh, scal, scal + acc[R * U:R * U + 2])]
    if soft is not None:   # softmax: K near counts (int32 storage) and the number of rows
        soft = _pick(fresh, soft, soft + acc[R * U + 2:])
        parts.append(torch.cat([torch.clamp(soft[:-1], max=COUNT_MAX), soft[-1:]]))
    acc.copy_(torch.cat(parts))


def _pick(fresh, a, b):
    if isinstance(fresh, bool):
        return a if fresh else b
    return torch.where(fresh, a, b)


def _shift(w):
    """Per-unit shift: the first value of each unit of (A, U, Q) ``w`` (0 where not finite)."""
    k0 = w[0, :, 0]
    return torch.where(torch.isfinite(k0), k0, torch.zeros_like(k0))


def _sumsq(s_d, q_d, K, n):
    """sum h^2 from the shifted sums: q + K (2 s + n K) (q itself where it is not finite)."""
    return torch.where(torch.isfinite(q_d), q_d + K * (2.0 * s_d + n * K), q_d)


def reference_update(acc, v, thr=None, x=None, dim=None, fresh=False) -> None:
    """Plain torch, float64: add the statistics of ``v`` (A, U, Q) to ``acc`` in place.

    Args:
        acc: the site's accumulator (:func:`new_acc`).
        v: the activation seen as (A, U, Q), units in the middle.
        thr: (2, K) float32 thresholds (:func:`thresholds`) of a bounded kind other than softmax.
        x, dim: softmax only: the activation and the axis it normalises over (row maxima counted).
        fresh: replace the accumulated values instead of adding to them.
    """
    A, U, Q = v.shape
    w = v.double()
    R = len(ROWS) + (thr.shape[1] if thr is not None else 0)
    K = _shift(w)
    d = w - K[None, :, None]   # exact for float32 and half inputs
    s_d, q_d = d.sum((0, 2)), (d * d).sum((0, 2))
    rows = [s_d + A * Q * K, w.abs().sum((0, 2)), _sumsq(s_d, q_d, K, A * Q), w.amin((0, 2)), w.amax((0, 2)),
            (w > 0).sum((0, 2)).double(), (~torch.isfinite(w)).sum((0, 2)).double()]
    if thr is not None:
        f = v.float()
        for j in range(thr.shape[1]):
            rows.append(((f < thr[0, j]) | (f > thr[1, j])).sum((0, 2)).double())
    soft = None
    if x is not None:
        m = x.float().amax(dim).reshape(-1)
        soft = torch.stack([(m > (1.0 - dl)).sum().double() for dl in NEAR_DELTAS]   # float32 compares
                           + [torch.full((), float(m.numel()), dtype=torch.float64, device=m.device)])
    nonfin = rows[len(ROWS) - 1].sum()
    count = torch.full((), float(A * Q), dtype=torch.float64, device=v.device)
    _combine(acc, fresh, U, R, rows, nonfin, count, soft)


def _rsum(t, Q, dtype=None):
    """Sum over the rows of Q values (Q == 1: the values themselves, no reduction)."""
    if Q == 1:
        return t[:, :, 0] if dtype is None else t[:, :, 0].to(dtype)
    return t.sum(2, dtype=dtype)


def _rext(t, Q, top: bool):
    """Maximum (``top``) or minimum over the rows of Q values (Q == 1: the values)."""
    if Q == 1:
        return t[:, :, 0]
    return t.amax(2) if top else t.amin(2)


def _fused_body(acc, v, thr, x, dim: int, fresh) -> None:
    """The body compiled by :func:`fused_update` (same arguments as :func:`reference_update`; ``dim``
    -1 when not softmax; ``fresh`` a bool or a 0-d bool tensor)."""
    A, U, Q = v.shape
    w = v if v.dtype == torch.float64 else v.float()
    k0 = _shift(w)
    d = w - k0[None, :, None]
    # stage 1, one pass over the data: every statistic of each row of Q contiguous values (sums in
    # float32, counts in int32); stage 2: across the A rows in float64 (float64 inputs: float64)
    part = [_rsum(d, Q), _rsum(d * d, Q), _rsum(w.abs(), Q), _rext(w, Q, False), _rext(w, Q, True),
            _rsum(w > 0, Q, torch.int32), _rsum(~torch.isfinite(w), Q, torch.int32)]
    if thr is not None:
        f = v.float()
        for j in range(len(NEAR_DELTAS)):
            part.append(_rsum((f < thr[0, j]) | (f > thr[1, j]), Q, torch.int32))
    s_d, q_d, sa = (p.double().sum(0) for p in part[:3])
    n = A * Q
    K = k0.double()
    rows = [s_d + n * K, sa, _sumsq(s_d, q_d, K, n), part[3].amin(0).double(), part[4].amax(0).double()]
    rows += [p.double().sum(0) for p in part[5:]]
    soft = None
    if x is not None:
        m = x.float().amax(dim)
        soft = torch.stack([(m > (1.0 - dl)).sum().double() for dl in NEAR_DELTAS]
                           + [torch.full((), m.numel(), dtype=torch.float64, device=m.device)])
    R = len(ROWS) + (len(NEAR_DELTAS) if thr is not None else 0)
    nonfin = rows[len(ROWS) - 1].sum()
    count = torch.full((), n, dtype=torch.float64, device=v.device)
    _combine(acc, fresh, U, R, rows, nonfin, count, soft)


def eager_update(acc, v, thr=None, x=None, dim=None, fresh=False) -> None:
    """:func:`fused_update`'s body run eagerly (plain torch: about 35 operations, float32 passes)."""
    _fused_body(acc, v, thr, x, -1 if dim is None else int(dim), bool(fresh))


_COMPILED: dict = {}


def compiled(key) -> object:
    """The compiled body for one class of calls (``key``: dtype and kind class), each with its own code
    object so that each has its own Dynamo cache (a few graphs each: Q == 1 or not)."""
    fn = _COMPILED.get(key)
    if fn is None:
        tag = "_".join(str(k).replace("torch.", "") for k in key)
        body = types.FunctionType(_fused_body.__code__.replace(co_name=f"_fused_{tag}"), _fused_body.__globals__,
                                  f"_fused_{tag}", _fused_body.__defaults__, _fused_body.__closure__)
        fn = _COMPILED[key] = torch.compile(body, dynamic=True, fullgraph=True)
    return fn


_FLAGS: dict = {}


def fused_update(acc, v, thr=None, x=None, dim=None, fresh=False) -> None:
    """:func:`reference_update` in one compiled pass (may raise on the first call of a new shape class
    when the compiler is unavailable: the caller falls back to the reference)."""
    key = (v.dtype, v.device.type, thr is not None, x is not None)
    flag = _FLAGS.get((v.device, bool(fresh)))   # a device tensor: one graph for both cases
    if flag is None:
        flag = _FLAGS[(v.device, bool(fresh))] = torch.full((), bool(fresh), dtype=torch.bool, device=v.device)
    compiled(key)(acc, v, thr, x, -1 if dim is None else int(dim), flag)
