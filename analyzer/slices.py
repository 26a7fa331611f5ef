"""Sharded parameters (FSDP2): every rank records its own slice (rows ``[offset, offset + rows)`` of
dim 0) of the parameter and of its gradient; here the slices become the whole parameter again.

Statistics merge, they are never recomputed from a gathered tensor: per step the ranks' sufficient
statistics add (counts, sums, sums of squares, sum |x|; max of maxima, min of minima; the variance by
Chan's rule), and so do the sums of squared weight updates and the per-element gradient noise. Raw
tensors are reassembled by offset (:func:`raw_tensor`). A step some slice of which is missing (a
rank's shard lost) is left out rather than shown as the statistics of part of the tensor.
Torch-free; reads the run only through its :class:`~analyzer.catalog.Catalog`.
"""

from __future__ import annotations

import numpy as np

from .stats import ElementwiseMoments, RowMoments, reduce_groups
from .trace import format as fmt
from .trace.format import TraceError

__all__ = ["grad_sums", "merge_grad_sums", "merge_row_moments", "noise_sums", "raw_tensor"]


def _groups(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, distinct sorted steps, start of each step's run in ``steps[order]``)."""
    order = np.argsort(steps, kind="stable")
    s = steps[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    return order, s[starts], starts


def grad_sums(rm: RowMoments) -> np.ndarray:
    """The gradient statistics vector (``GRAD_STAT_FIELDS``: count, nonfinite, sum, sumsq, sum_abs,
    max_abs; (k, 6) float64) of rows of raw gradient values summarised as ``rm``."""
    n = rm.n.astype(np.float64)
    return np.stack([n, rm.nonfinite.astype(np.float64), n * rm.mean, rm.sumsq, rm.sum_abs,
                     np.where(n > 0, rm.max_abs, np.nan)], 1)


def merge_grad_sums(items: list[tuple[np.ndarray, np.ndarray]], numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient statistics vectors of the slices of one parameter, merged per step.

    Args:
        items: [(steps (k,), vectors (k, 6))] from every rank and shard.
        numel: elements of the whole parameter; steps whose slices do not add up to it are left out.

    Returns:
        (steps (S,) sorted, vectors (S, 6)): counts and sums add, max_abs is the max of the finite maxima.
    """
    if not items:
        return np.zeros(0, np.int64), np.zeros((0, len(fmt.GRAD_STAT_FIELDS)))
    steps = np.concatenate([np.asarray(s, np.int64) for s, _ in items])
    vec = np.concatenate([np.asarray(v, np.float64).reshape(-1, len(fmt.GRAD_STAT_FIELDS)) for _, v in items])
    order, ust, starts = _groups(steps)
    v = vec[order]
    out = np.add.reduceat(v, starts, axis=0) if len(starts) else v[:0]
    if len(starts):
        out[:, 5] = np.fmax.reduceat(v[:, 5], starts)   # an empty slice's max is NaN: ignored
    keep = out[:, 0] + out[:, 1] == numel
    return ust[keep], out[keep]


def merge_row_moments(items: list[tuple[np.ndarray, RowMoments, np.ndarray, np.ndarray]], numel: int
                      ) -> tuple[np.ndarray, RowMoments, np.ndarray, np.ndarray]:
    """Per-row moments of the slices of one parameter (weights), merged per step.

    Args:
        items: [(steps (k,), moments of k rows, num (k,), den (k,))]: num and den are the sums of
            squared update and of squared previous weights of the slice (NaN without a previous snapshot).
        numel: elements of the whole parameter; steps whose slices do not add up to it are left out.

    Returns:
        (steps (S,), merged RowMoments, num (S,), den (S,)): num and den add (NaN if a slice lacks them).
    """
    steps = np.concatenate([np.asarray(s, np.int64) for s, *_ in items])
    order, ust, starts = _groups(steps)
    acc = RowMoments(len(steps), **{name: np.concatenate([getattr(m, name) for _, m, _, _ in items])
                                    for name, _, _ in RowMoments.STATE})
    merged = reduce_groups(acc, order, starts)
    num, den = (np.add.reduceat(np.concatenate([x[i] for x in items])[order], starts) if len(starts)
                else np.zeros(0) for i in (2, 3))
    keep = merged.n + merged.nonfinite == numel
    sub = RowMoments(int(keep.sum()), **{name: v[keep] for name, v in merged.state().items()})
    return ust[keep], sub, num[keep], den[keep]


def noise_sums(acc: ElementwiseMoments) -> tuple[float, int]:
    """(sum over elements of the element-wise variance, elements with a value) of one slice: the
    gradient noise of the whole parameter is the ratio of these sums over its slices."""
    ok = acc.n > 0
    return float(np.sum(acc.m2[ok] / acc.n[ok])), int(ok.sum())


def raw_tensor(catalog, kind: str, layer_key: str, param_key: str, step: int, rank: int | None = None
               ) -> np.ndarray:
    """One recorded raw tensor of a parameter (``kind`` "grads" or "weights") at ``step``, of the
    parameter's full shape, in the stored dtype. A sharded parameter is put together from every
    rank's slice by its offset; an unsharded one is read from ``rank`` (default the lowest rank
    that recorded it at that step).

    Raises:
        TraceError: no such row, or a sharded step some slice of which is missing.
    """
    if kind not in fmt.RAW_PARAM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(fmt.RAW_PARAM_KINDS)}, not {kind!r}")
    key = (kind, layer_key, param_key)
    shape = catalog.param_shape(layer_key, param_key)
    sharded = (layer_key, param_key) in catalog.sharded
    what = f"{kind} of {catalog.layer_by_key(layer_key)['name']}.{catalog.param_name(layer_key, param_key)}"
    out, rows_seen, filled = None, set(), 0
    for sh in catalog.shards_with(kind, {(layer_key, param_key)}, rank=rank):
        if sh.rank in rows_seen or not sh.payloads[key][0]:
            continue
        with catalog.open_shard(sh) as r:
            i = np.flatnonzero(np.asarray(r.read_payload_steps(*key)) == step)
            if not len(i):
                continue
            row = np.asarray(r.read_payload(*key, int(i[0]), int(i[0]) + 1))[0]
        if not sharded:
            return row
        rows_seen.add(sh.rank)
        if out is None:
            out = np.zeros(shape, row.dtype)
        off = sh.offsets[key]
        out[off:off + row.shape[0]] = row
        filled += row.shape[0]
    if out is None:
        raise TraceError(f"no {what} at step {step}")
    if filled != shape[0]:
        raise TraceError(f"{what} at step {step} is incomplete: the ranks' slices hold {filled} of "
                         f"{shape[0]} rows")
    return out
