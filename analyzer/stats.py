"""Mergeable statistics (torchmetrics style): declare state with a merge rule, update, merge, compute.

Every accumulator here is vectorised over a leading "rows" axis: ``update(block)`` with a block
(k, n) updates k independent accumulators with n new elements each (one row per recorded step),
and the same object accepts the elements of one row in several column pieces. State is sums,
counts, extrema and Chan-merged second moments, never means of means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RowMoments:
    """Per-row moments over the finite elements, with non-finite elements counted apart.

    State (each an array of shape (k,)) and merge rule:
        n (sum), mean / m2 (Chan), sum_abs (sum), sumsq (sum), max_abs (max), min (min), max (max),
        nonfinite (sum).
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    sum_abs: np.ndarray
    sumsq: np.ndarray
    max_abs: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray

    @classmethod
    def empty(cls, k: int) -> "RowMoments":
        z = np.zeros(k)
        return cls(n=np.zeros(k, np.int64), mean=z.copy(), m2=z.copy(), sum_abs=z.copy(),
                   sumsq=z.copy(), max_abs=np.full(k, -np.inf), min=np.full(k, np.inf),
                   max=np.full(k, -np.inf), nonfinite=np.zeros(k, np.int64))

    @classmethod
    def of(cls, block: np.ndarray) -> "RowMoments":
        """Moments of each row of ``block`` (k, n), computed in float64 (two-pass variance)."""
        x = np.asarray(block)
        k = x.shape[0]
        x = x.reshape(k, -1)
        if x.shape[1] and x.dtype.kind == "f":
            # extrema in the stored dtype (exact); NaN and +-inf reach them, so they also tell
            # whether every value is finite (the common case: no isfinite pass)
            mn, mx = x.min(1), x.max(1)
            if np.isfinite(mn).all() and np.isfinite(mx).all():
                return cls._of_finite(x, mn.astype(np.float64), mx.astype(np.float64))
        x = x.astype(np.float64, copy=False)
        fin = np.isfinite(x)
        allfin = bool(fin.all())
        if allfin:
            n = np.full(k, x.shape[1], np.int64)
            xs = x
        else:
            n = fin.sum(1).astype(np.int64)
            xs = np.where(fin, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = xs.sum(1)
            mean = np.where(n > 0, s / np.maximum(n, 1), 0.0)
            d = xs - mean[:, None]
            if not allfin:
                d = np.where(fin, d, 0.0)
            m2 = np.einsum("ij,ij->i", d, d)
            ax = np.abs(xs)
            sum_abs = ax.sum(1)
            sumsq = np.einsum("ij,ij->i", xs, xs)
            if x.shape[1] == 0:
                mx_abs = np.full(k, -np.inf); mn = np.full(k, np.inf); mx = np.full(k, -np.inf)
            elif allfin:
                mx_abs = ax.max(1); mn = x.min(1); mx = x.max(1)
            else:
                mx_abs = np.where(fin, ax, -np.inf).max(1)
                mn = np.where(fin, x, np.inf).min(1)
                mx = np.where(fin, x, -np.inf).max(1)
        return cls(n=n, mean=mean, m2=m2, sum_abs=sum_abs, sumsq=sumsq, max_abs=mx_abs, min=mn, max=mx,
                   nonfinite=(~fin).sum(1).astype(np.int64))

    @classmethod
    def _of_finite(cls, x: np.ndarray, mn: np.ndarray, mx: np.ndarray) -> "RowMoments":
        """:meth:`of` for rows (k, n > 0) of finite values with known extrema: one float64 copy,
        centred in place; the square sum follows as m2 + sum * mean (no second square pass)."""
        k, n = x.shape
        x = x.astype(np.float64)                 # a copy (centred in place below)
        s = x.sum(1)
        mean = s / n
        sum_abs = np.abs(x).sum(1)
        x -= mean[:, None]
        m2 = np.einsum("ij,ij->i", x, x)
        return cls(n=np.full(k, n, np.int64), mean=mean, m2=m2, sum_abs=sum_abs, sumsq=m2 + s * mean,
                   max_abs=np.maximum(-mn, mx), min=mn, max=mx, nonfinite=np.zeros(k, np.int64))

    def merge(self, o: "RowMoments") -> "RowMoments":
        """Combine with the moments of other elements of the same rows (Chan et al. for m2)."""
        n = self.n + o.n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = o.mean - self.mean
            nn = np.maximum(n, 1)
            mean = np.where(n > 0, self.mean + delta * (o.n / nn), 0.0)
            m2 = self.m2 + o.m2 + delta * delta * (self.n * o.n / nn)
        return RowMoments(n=n, mean=mean, m2=m2, sum_abs=self.sum_abs + o.sum_abs, sumsq=self.sumsq + o.sumsq,
                          max_abs=np.maximum(self.max_abs, o.max_abs), min=np.minimum(self.min, o.min),
                          max=np.maximum(self.max, o.max), nonfinite=self.nonfinite + o.nonfinite)

    def compute(self) -> dict[str, np.ndarray]:
        """Statistics per row; NaN where a row has no finite element.

        Returns:
            dict of (k,) arrays: count, nonfinite, mean, abs_mean, max_abs, min, max, var (population,
            ddof 0), std, l1 (sum |x|), l2 (sqrt of sum x^2).
        """
        n = self.n
        ok = n > 0
        nn = np.maximum(n, 1)
        nan = np.nan

        def f(v):
            return np.where(ok, v, nan)

        var = f(np.maximum(self.m2, 0.0) / nn)
        return {"count": n.copy(), "nonfinite": self.nonfinite.copy(), "mean": f(self.mean),
                "abs_mean": f(self.sum_abs / nn), "max_abs": f(self.max_abs), "min": f(self.min),
                "max": f(self.max), "var": var, "std": np.sqrt(var), "l1": f(self.sum_abs),
                "l2": f(np.sqrt(self.sumsq))}


#: Elements per column piece of the streaming statistics: float64 temporaries of 2 MB stay in cache
#: and are recycled by the allocator (large fresh temporaries cost a page fault per 4 KiB).
PIECE_ELEMS = 1 << 18


def row_moments(block: np.ndarray, max_elems: int = PIECE_ELEMS) -> RowMoments:
    """:meth:`RowMoments.of` with bounded temporaries: wide rows are processed in column pieces
    and merged, so memory stays O(max_elems) float64 whatever the tensor size."""
    k = block.shape[0]
    flat = block.reshape(k, -1)
    n = flat.shape[1]
    step = max(1, max_elems // max(1, k))
    if n <= step:
        return RowMoments.of(flat)
    acc = None
    for j in range(0, n, step):
        part = RowMoments.of(flat[:, j:j + step])
        acc = part if acc is None else acc.merge(part)
    return acc


class ElementwiseMoments:
    """Element-wise mean and variance across rows (steps), for one tensor shape.

    State: n (per element, sum), mean / m2 (per element, Chan). Non-finite values are skipped
    element by element. Memory: three arrays of the tensor's size, independent of the number of rows.
    """

    def __init__(self, size: int):
        self.n = np.zeros(size, np.int64)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def update(self, block: np.ndarray, max_elems: int = PIECE_ELEMS) -> "ElementwiseMoments":
        """Add rows ``block`` (k, size), in column pieces of about ``max_elems`` elements (bounded
        float64 temporaries; elements are independent, so the pieces give the same numbers)."""
        x = np.asarray(block)
        x = x.reshape(x.shape[0], -1)
        k = x.shape[0]
        if not k:
            return self
        step = max(1, max_elems // k)
        for j in range(0, x.shape[1], step):
            self._update_piece(x[:, j:j + step], slice(j, j + step))
        return self

    def _update_piece(self, xb: np.ndarray, sl: slice) -> None:
        x = xb.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):   # inf - inf: NaN, handled below
            mb = x.mean(0)
        # a NaN or +-inf makes its column's mean non-finite (finite float64 sums of stored values
        # do not overflow), so the mean tells whether the slow path is needed
        if np.isfinite(mb).all():
            nb = np.full(x.shape[1], x.shape[0], np.int64)
            x -= mb
            m2b = np.einsum("ij,ij->j", x, x)
        else:
            fin = np.isfinite(x)
            nb = fin.sum(0)
            xs = np.where(fin, x, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mb = np.where(nb > 0, xs.sum(0) / np.maximum(nb, 1), 0.0)
            m2b = (np.where(fin, x - mb, 0.0) ** 2).sum(0)
        n0, mean0 = self.n[sl], self.mean[sl]
        n = n0 + nb
        nn = np.maximum(n, 1)
        delta = mb - mean0
        self.mean[sl] = np.where(n > 0, mean0 + delta * (nb / nn), 0.0)
        self.m2[sl] += m2b + delta * delta * (n0 * nb / nn)
        self.n[sl] = n

    def merge(self, o: "ElementwiseMoments") -> "ElementwiseMoments":
        n = self.n + o.n
        nn = np.maximum(n, 1)
        delta = o.mean - self.mean
        self.mean = np.where(n > 0, self.mean + delta * (o.n / nn), 0.0)
        self.m2 = self.m2 + o.m2 + delta * delta * (self.n * o.n / nn)
        self.n = n
        return self

    def compute_mean_variance(self) -> float:
        """Population variance across rows, averaged over elements that have at least one value."""
        ok = self.n > 0
        if not ok.any():
            return float("nan")
        return float(np.mean(self.m2[ok] / self.n[ok]))
