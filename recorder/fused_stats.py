"""One fused pass per activation site: the per-unit statistics of one call as a single compiled
reduction that also adds them to the site's accumulator, and the plain-torch reference it must equal.

The accumulator of a site is one flat float64 tensor (:func:`acc_layout`)::

    [ROWS x U per-unit rows | near-bound rows (K x U) | nonfinite | count | softmax near (K), rows]

``ROWS``: sum, sum |h|, sum h^2, min, max, count(h > 0) and the per-unit non-finite count (summed
into the site's ``nonfinite`` scalar by the same kernel). Bounded kinds (sigmoid, tanh, hardtanh,
relu6) add per unit, for each delta of :data:`NEAR_DELTAS`, the count of values within delta of a
bound (``h < lo + delta`` or ``h > hi - delta``); softmax adds, per site, the count of rows whose
largest probability exceeds ``1 - delta`` and the number of rows. Counts saturate at ``2**31 - 1`` (their int32 storage).
With the health statistics (:mod:`recorder.health`, ``health=True``) the accumulator ends with
softmax sites' per-unit ``entropy`` and ``logit_max`` rows (2 x U), or other sites' scalars ``sum3``,
``sum4``, ``n_massive`` and ``massive_ratio``.

:func:`fused_update` (``torch.compile``, dynamic shapes: inductor's C++ kernel on the CPU, one thread
by default (:func:`cpu_threads`), Triton on CUDA) reads the (A, U, Q) view of the activation in one
loop: the per-unit sums are accumulated in float32 along each row of Q contiguous values (counts in
float32 too: exact for rows of at most 2**24 values, int32 beyond; about 5x faster than int32 counts
for short rows), then in float64 across the rows, around a shift K: each row's first value, 0 where not
finite (per unit where Q == 1). ``h - K`` is exact where the values are close to each other, so a mean
far larger than the spread keeps the variance; the shifted sums are combined in float64
(``sum = S + nK``, ``sumsq = Q + 2KS + nK^2`` per row, then summed). A per-row shift (rather than one
per unit) lets the compiler make every statistic one loop over the data (two otherwise). Half-precision inputs are
read as float32, float64 inputs stay float64. :func:`eager_update` runs the same body without compiling
(the fallback, and the path for small CPU tensors); :func:`reference_update` is the plain-torch oracle:
the same statistics from a float64 copy (shifted per unit, in float64), simple and slow. None reads
anything back to the host.
"""

from __future__ import annotations

import os
import types

import torch

__all__ = ["ROWS", "NEAR_DELTAS", "COUNT_MAX", "MASSIVE_FACTOR", "acc_layout", "new_acc", "thresholds", "reference_update",
           "eager_update", "fused_update", "compiled", "cpu_threads", "CPU_THREADS"]

#: per-unit rows of the accumulator, in order
ROWS = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos", "nonfinite")
#: distances from a bound (value units) at which bounded kinds count their values (saturation)
NEAR_DELTAS = (0.01, 0.03, 0.1)
#: near-bound counts saturate here (stored as int32)
COUNT_MAX = float(2 ** 31 - 1)
_MIN, _MAX = ROWS.index("min"), ROWS.index("max")
#: massive activations: |h| above this many times the sampled median |h| (:mod:`recorder.health`)
MASSIVE_FACTOR = 100.0
#: health statistics: per-unit rows of softmax sites, scalars of other sites (:mod:`recorder.health`)
_H_ROWS, _H_SCAL = 2, 4


def acc_layout(U: int, near: bool, softmax: bool, health: bool = False) -> dict:
    """Offsets of one site's accumulator: ``{"rows": R, "nonfinite": i, "count": j, "soft": k,
    "health": h, "size": n}`` (R per-unit rows of U values, then the scalars and, for softmax, its K
    near counts and rows; from ``h`` the health statistics: softmax 2 x U rows, else 4 scalars)."""
    K = len(NEAR_DELTAS)
    R = len(ROWS) + (K if near else 0)
    h = R * U + 2 + (K + 1 if softmax else 0)
    return {"rows": R, "nonfinite": R * U, "count": R * U + 1, "soft": R * U + 2, "health": h,
            "size": h + ((_H_ROWS * U if softmax else _H_SCAL) if health else 0)}


def new_acc(U: int, near: bool, softmax: bool, device, health: bool = False) -> torch.Tensor:
    """A fresh accumulator: zeros, minima +inf, maxima -inf (``logit_max`` too)."""
    lay = acc_layout(U, near, softmax, health)
    acc = torch.zeros(lay["size"], dtype=torch.float64, device=device)
    rows = acc[:lay["rows"] * U].view(lay["rows"], U)
    rows[_MIN].fill_(float("inf"))
    rows[_MAX].fill_(float("-inf"))
    if health and softmax:
        acc[lay["health"] + U:].fill_(float("-inf"))
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


def _combine(acc, fresh, U: int, R: int, rows: list, nonfin, count, soft, hl=None):
    """The new accumulator from one call's statistics. ``fresh`` (a bool, or a 0-d bool tensor so that
    one compiled graph serves both): the old values are ignored. ``hl``: the health statistics
    (softmax: ``(2, U)`` entropy sums and logit maxima; else ``(4,)`` sum3, sum4, n_massive, ratio)."""
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
        soft = _pick(fresh, soft, soft + acc[R * U + 2:R * U + 2 + soft.numel()])
        parts.append(torch.cat([torch.clamp(soft[:-1], max=COUNT_MAX), soft[-1:]]))
    if hl is not None:   # sums add (entropy; sum3, sum4), maxima (logit_max; n_massive, massive_ratio)
        old_h = acc[acc.numel() - hl.numel():].view(hl.shape)
        k = 1 if hl.dim() == 2 else 2
        c = torch.cat([old_h[:k] + hl[:k], torch.maximum(old_h[k:], hl[k:])])
        parts.append(_pick(fresh, hl, c).reshape(-1))
    acc.copy_(torch.cat(parts))


def _pick(fresh, a, b):
    if isinstance(fresh, bool):
        return a if fresh else b
    return torch.where(fresh, a, b)


def _shift(w):
    """Per-unit shift: the first value of each unit of (A, U, Q) ``w`` (0 where not finite)."""
    k0 = w[0, :, 0]
    return torch.where(torch.isfinite(k0), k0, torch.zeros_like(k0))


def _row_shift(w):
    """Per-row shift of (A, U, Q) ``w``: each row's first value, (A, U) (0 where not finite)."""
    k0 = w[:, :, 0]
    return torch.where(torch.isfinite(k0), k0, torch.zeros_like(k0))


def _sumsq(s_d, q_d, K, n):
    """sum h^2 from the shifted sums: q + K (2 s + n K) (q itself where it is not finite)."""
    return torch.where(torch.isfinite(q_d), q_d + K * (2.0 * s_d + n * K), q_d)


def _others(t, axis: int) -> list:
    return [i for i in range(t.dim()) if i != axis]


def _softmax_health(p, z, dim: int, axis: int):
    """Per unit (axis ``axis``): the sum of the row entropies of softmax rows ``p`` (along ``dim``) and
    the largest logit ``z`` (``p = softmax(z)``, same shape and dtype). The entropy of a row is
    ``-sum p log p = lse - sum p z`` with ``lse = max z - log max p`` (exact for a softmax): one log
    per row, not per value; masked keys (p = 0, z = -inf) add 0; a NaN row gives NaN."""
    lse = z.amax(dim, keepdim=True) - torch.log(p.amax(dim, keepdim=True))
    e = torch.where(p == 0, torch.zeros_like(p), p * (lse - z))
    return e.sum(_others(e, axis)), z.amax(_others(z, axis))


def _median_nonzero(sample):
    """The median |h| of the sample's non-zero values (NaN when none: not judged). Zeros are left out so
    that a ReLU site, often more than half 0, is scaled by its active values."""
    a = sample.abs()
    return torch.where(a == 0, torch.full_like(a, float("nan")), a).nanmedian()


def _massive_ref(v, w, sample):
    """Reference: (4,) float64 sum h^3, sum h^4, the number of units whose max |h| exceeds 100 x the
    sample's median non-zero |h| (compared in float32 for float32 and half inputs, as the fused pass
    does), max |h| / median."""
    f = w if v.dtype == torch.float64 else v.float()
    med = _median_nonzero(sample.to(f.dtype))
    big = torch.where(med > 0, med * MASSIVE_FACTOR, torch.full_like(med, float("inf")))
    um = f.abs().amax((0, 2))
    m = um.amax().double()
    ratio = torch.where(med > 0, m / med.double(), torch.zeros_like(m))
    return torch.stack([(w ** 3).sum(), (w ** 4).sum(), (um > big).sum().double(), ratio])


def reference_update(acc, v, thr=None, x=None, dim=None, fresh=False, logits=None, sample=None,
                     health=False, axis=1) -> None:
    """Plain torch, float64: add the statistics of ``v`` (A, U, Q) to ``acc`` in place.

    Args:
        acc: the site's accumulator (:func:`new_acc`).
        v: the activation seen as (A, U, Q), units in the middle.
        thr: (2, K) float32 thresholds (:func:`thresholds`) of a bounded kind other than softmax.
        x, dim: softmax only: the activation and the axis it normalises over (row maxima counted).
        fresh: replace the accumulated values instead of adding to them.
        logits: softmax with ``health``: its input (the logits), of ``x``'s shape; the entropy is
            then taken as ``lse - sum p z`` per row (one log per row), else as ``-sum p log p``
            (``logit_max`` stays -inf).
        axis: softmax with ``logits``: the unit axis of ``x``.
        sample: other sites with ``health``: a few of ``v``'s values (:func:`recorder.health.sample_of`).
        health: add the health statistics (:mod:`recorder.health`; ``acc`` laid out for them).
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
    hl = None
    if health and x is not None and logits is not None:
        hl = torch.stack(_softmax_health(x.double(), logits.double(), dim, axis))
    elif health and x is not None:
        hl = torch.stack([-torch.special.xlogy(w, w).sum((0, 2)), torch.full_like(w[0, :, 0], float("-inf"))])
    elif health:
        hl = _massive_ref(v, w, sample)
    nonfin = rows[len(ROWS) - 1].sum()
    count = torch.full((), float(A * Q), dtype=torch.float64, device=v.device)
    _combine(acc, fresh, U, R, rows, nonfin, count, soft, hl)


def _rsum(t, Q, dtype=None):
    """Sum over the rows of Q values (Q == 1: the values themselves, no reduction)."""
    if Q == 1:
        return t[:, :, 0] if dtype is None else t[:, :, 0].to(dtype)
    return t.sum(2, dtype=dtype)


def _count_dtype(Q):
    """The dtype of one row's counts: float32 (exact: a row of at most 2**24 values; about 5x faster
    than int32 in inductor's C++ kernels when rows are short) or int32 for longer rows."""
    return torch.float32 if Q <= _F32_COUNT_MAX else torch.int32


#: the longest row whose counts float32 holds exactly (every partial sum an integer <= 2**24)
_F32_COUNT_MAX = 1 << 24


def _rext(t, Q, top: bool):
    """Maximum (``top``) or minimum over the rows of Q values (Q == 1: the values)."""
    if Q == 1:
        return t[:, :, 0]
    return t.amax(2) if top else t.amin(2)


def _fused_body(acc, v, thr, x, dim: int, fresh, logits=None, sample=None, health: bool = False,
                axis: int = 1) -> None:
    """The body compiled by :func:`fused_update` (same arguments as :func:`reference_update`; ``dim``
    -1 when not softmax; ``fresh`` a bool or a 0-d bool tensor)."""
    A, U, Q = v.shape
    w = v if v.dtype == torch.float64 else v.float()
    # the shift: per unit where Q == 1, else per row (each row's first value: then every statistic
    # of stage 1 indexes the rows alike, and the compiler makes them one loop over the data)
    k0 = _shift(w) if Q == 1 else _row_shift(w)
    d = w - (k0[None, :, None] if Q == 1 else k0[:, :, None])
    # stage 1, one pass over the data: every statistic of each row of Q contiguous values (sums in
    # float32, counts in float32 (exact; int32 for rows over 2**24 values)); stage 2: across the A
    # rows in float64 (float64 inputs: float64)
    d2 = d * d
    ct = _count_dtype(Q)
    part = [_rsum(d, Q), _rsum(d2, Q), _rsum(w.abs(), Q), _rext(w, Q, False), _rext(w, Q, True),
            _rsum(w > 0, Q, ct), _rsum(~torch.isfinite(w), Q, ct)]
    if thr is not None:
        f = v.float()
        for j in range(len(NEAR_DELTAS)):
            part.append(_rsum((f < thr[0, j]) | (f > thr[1, j]), Q, ct))
    hpart = []
    if health and x is not None and logits is None:   # softmax without its logits: -sum p log p
        hpart = [_rsum(-torch.special.xlogy(w, w), Q)]
    elif health and x is None:                   # other sites: 3rd and 4th powers (shifted), massive values
        med = _median_nonzero(sample.to(w.dtype))
        big = torch.where(med > 0, med * MASSIVE_FACTOR, torch.full_like(med, float("inf")))
        hpart = [_rsum(d2 * d, Q), _rsum(d2 * d2, Q)]
    n = A * Q
    K = k0.double()
    if Q == 1:   # per unit: the sums over the A rows, then the shift
        s_d, q_d = part[0].double().sum(0), part[1].double().sum(0)
        rows = [s_d + n * K, part[2].double().sum(0), _sumsq(s_d, q_d, K, n)]
    else:        # per row: the shift taken back in float64, then the sums over the A rows
        s_d, q_d = part[0].double(), part[1].double()
        rows = [(s_d + Q * K).sum(0), part[2].double().sum(0), _sumsq(s_d, q_d, K, Q).sum(0)]
    rows += [part[3].amin(0).double(), part[4].amax(0).double()]
    rows += [p.double().sum(0) for p in part[5:]]
    hl = None   # Q == 1: the health sums stay in float32 across the rows (diagnostics, half the cost)
    if health and x is not None and logits is not None:   # softmax: entropy from the logits, largest logit
        f64 = x.dtype == torch.float64
        hl = torch.stack([t.double() for t in _softmax_health(x if f64 else x.float(),
                                                              logits.double() if f64 else logits.float(), dim, axis)])
    elif health and x is not None:
        hl = torch.stack([hpart[0].sum(0).double(), torch.full_like(rows[0], float("-inf"))])
    elif health:
        s3, s4 = (h.double() if Q > 1 else h.sum(0).double() for h in hpart)
        hl = _moments(s_d, q_d, s3, s4, K, n if Q == 1 else Q)
        um = torch.maximum(rows[4], -rows[3])   # per unit max |h| (a count over the values would need a
        m = um.amax()                           # second pass: the threshold depends on this call's median)
        hl = torch.stack([hl[0], hl[1], (um > big.double()).sum().double(),
                          torch.where(med > 0, m / med.double(), torch.zeros_like(m))])
    soft = None
    if x is not None:
        m = x.float().amax(dim)
        soft = torch.stack([(m > (1.0 - dl)).sum().double() for dl in NEAR_DELTAS]
                           + [torch.full((), m.numel(), dtype=torch.float64, device=m.device)])
    R = len(ROWS) + (len(NEAR_DELTAS) if thr is not None else 0)
    nonfin = rows[len(ROWS) - 1].sum()
    count = torch.full((), n, dtype=torch.float64, device=v.device)
    _combine(acc, fresh, U, R, rows, nonfin, count, soft, hl)


def _moments(s1, s2, s3, s4, K, n):
    """(sum h^3, sum h^4) of the site, float64, from the sums of the shifted ``d = h - K`` over groups of
    ``n`` values (``s1 .. s4``: sums of d .. d^4 per unit (U,) or per row (A, U), ``K`` alike): binomial
    expansion around 0, summed over the groups."""
    K2 = K * K
    h3 = s3 + 3.0 * K * s2 + 3.0 * K2 * s1 + n * K2 * K
    h4 = s4 + 4.0 * K * s3 + 6.0 * K2 * s2 + 4.0 * K2 * K * s1 + n * K2 * K2
    if h3.dim() == 2:   # per row: over the rows first, like the other statistics (no extra parallel region)
        h3, h4 = h3.sum(0), h4.sum(0)
    return torch.stack([h3.sum(), h4.sum()])


def eager_update(acc, v, thr=None, x=None, dim=None, fresh=False, logits=None, sample=None,
                 health=False, axis=1) -> None:
    """:func:`fused_update`'s body run eagerly (plain torch: about 35 operations, float32 passes;
    a handful more with ``health``)."""
    _fused_body(acc, v, thr, x, -1 if dim is None else int(dim), bool(fresh), logits, sample, bool(health),
                int(axis))


_COMPILED: dict = {}

#: threads of the compiled pass on the CPU (inductor's ``cpp.threads``), unless the environment
#: variable ``BBDECODER_STATS_THREADS`` says otherwise (0: torch's intra-op thread count)
CPU_THREADS = 1


def cpu_threads() -> int:
    """Threads of the compiled CPU pass: :data:`CPU_THREADS` or ``BBDECODER_STATS_THREADS`` (0 or
    less: ``torch.get_num_threads()``).

    One by default: the pass reads each value once and does little arithmetic on it, so a second
    thread bought no time on the 2-core reference machine (best case 6.96 ms per CNN forward at one
    thread, 7.03 ms at two) while it took twice the CPU time and, with inductor's ~25 OpenMP barriers
    per call, stalled whenever another thread (the writer, another process) held a core (median
    34 ms against 18 ms on a loaded machine). On one thread the pass never waits for another one."""
    env = os.environ.get("BBDECODER_STATS_THREADS", "").strip()
    try:
        n = int(env) if env else CPU_THREADS
    except ValueError:
        n = CPU_THREADS
    return n if n >= 1 else max(1, torch.get_num_threads())


def compiled(key) -> object:
    """The compiled body for one class of calls (``key``: dtype, device type and kind class; on the
    CPU also the thread count of :func:`cpu_threads`), each with its own code object so that each
    has its own Dynamo cache (a few graphs each: Q == 1 or not)."""
    fn = _COMPILED.get(key)
    if fn is None:
        tag = "_".join(str(k).replace("torch.", "") for k in key)
        body = types.FunctionType(_fused_body.__code__.replace(co_name=f"_fused_{tag}"), _fused_body.__globals__,
                                  f"_fused_{tag}", _fused_body.__defaults__, _fused_body.__closure__)
        opts = {"cpp.threads": key[-1]} if key[1] == "cpu" else None
        fn = _COMPILED[key] = torch.compile(body, dynamic=True, fullgraph=True, options=opts)
    return fn


_FLAGS: dict = {}


def fused_update(acc, v, thr=None, x=None, dim=None, fresh=False, logits=None, sample=None,
                 health=False, axis=1) -> None:
    """:func:`reference_update` in one compiled pass (may raise on the first call of a new shape class
    when the compiler is unavailable: the caller falls back to the reference)."""
    key = (v.dtype, v.device.type, thr is not None, x is not None, logits is not None, bool(health))
    if v.device.type == "cpu":
        key += (cpu_threads(),)
    flag = _FLAGS.get((v.device, bool(fresh)))   # a device tensor: one graph for both cases
    if flag is None:
        flag = _FLAGS[(v.device, bool(fresh))] = torch.full((), bool(fresh), dtype=torch.bool, device=v.device)
    compiled(key)(acc, v, thr, x, -1 if dim is None else int(dim), flag, logits, sample, bool(health), int(axis))
