"""Mergeable statistics (torchmetrics style): state declared once with its merge rule, then
``update(chunk)``, ``merge(other)`` (in place, returns self) and ``compute()``.

Every accumulator here is vectorised over a leading "rows" axis: ``update(block)`` with a block
(k, n) updates k independent accumulators with n new elements each (one row per recorded step),
and the same object accepts the elements of one row in several column pieces. State is sums,
counts, extrema and Chan-merged second moments, never means of means.

Merge rules (:data:`RULES`): "sum" (counts, sums, histograms add), "min", "max" (extrema), and
"chan" (the pair ``mean``, ``m2`` weighted by the count ``n``: Chan et al.'s parallel variance).
The formula of each statistic from sufficient statistics lives in :func:`stats_from_sums`.
"""

from __future__ import annotations

import numpy as np

#: merge rule -> the identity element a fresh state starts from
RULES = {"sum": 0, "min": np.inf, "max": -np.inf, "chan": 0.0}
#: element-wise merge rule -> its numpy ufunc (NaN propagates through min and max, as on the device)
UFUNCS = {"sum": np.add, "min": np.minimum, "max": np.maximum}


def combine(rule: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two partial states of one statistic combined by its merge rule ("sum", "min" or "max")."""
    return UFUNCS[rule](a, b)


def reduce(rule: str, a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Partial states stacked along ``axis`` combined into one by their merge rule."""
    return UFUNCS[rule].reduce(a, axis=axis)


def chan_merge(n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray,
               m2_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, m2) of the union of two sets from their counts, means and sums of squared deviations
    (Chan, Golub & LeVeque); the mean is 0 where both counts are 0."""
    n = n_a + n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mean_b - mean_a
        nn = np.maximum(n, 1)
        mean = np.where(n > 0, mean_a + delta * (n_b / nn), 0.0)
        m2 = m2_a + m2_b + delta * delta * (n_a * n_b / nn)
    return mean, m2


def stats_from_sums(count=None, total=None, sumsq=None, sum_abs=None, max_abs=None) -> dict[str, np.ndarray]:
    """THE formulas of the moment statistics from sufficient statistics (sums add across pieces,
    steps, parameters, shards and ranks; means and variances do not). Each statistic is returned
    when what it needs is given.

    Args:
        count: (k,) number of (finite) elements. total: (k,) sum x. sumsq: (k,) sum x^2.
        sum_abs: (k,) sum |x|. max_abs: (k,) max |x| (passed through).

    Returns:
        dict of (k,) float64 arrays: mean = sum / n (count, total), var = sum x^2 / n - mean^2
        (count, total, sumsq; population, ddof 0, clipped at 0), abs_mean = sum |x| / n (count,
        sum_abs; these three NaN where n is 0), l1 = sum |x| (sum_abs), l2 = sqrt(sum x^2) (sumsq),
        max_abs (max_abs). l1 and l2 are the sums as given (0 for an empty set).
    """
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if count is not None:
            n = np.asarray(count)
            nn = np.where(n > 0, n, np.nan)
            if total is not None:
                mean = total / nn
                out["mean"] = mean
                if sumsq is not None:
                    out["var"] = np.maximum(sumsq / nn - mean * mean, 0.0)
            if sum_abs is not None:
                out["abs_mean"] = sum_abs / nn
        if max_abs is not None:
            out["max_abs"] = max_abs
        if sum_abs is not None:
            out["l1"] = sum_abs
        if sumsq is not None:
            out["l2"] = np.sqrt(sumsq)
    return out


class Accumulator:
    """Base of the mergeable accumulators.

    A subclass declares its state once, in ``STATE``: ``(name, merge rule, dtype)`` per array. A
    fresh accumulator of shape ``shape`` holds each rule's identity (0, +inf, -inf); :meth:`merge`
    combines two states by the declared rules, in place, and returns self.
    """

    STATE: tuple[tuple[str, str, type], ...] = ()

    def __init__(self, shape=(), **state):
        for name, rule, dtype in self.STATE:
            v = state.pop(name, None)
            setattr(self, name, np.full(shape, RULES[rule], dtype) if v is None else v)
        if state:
            raise TypeError(f"{type(self).__name__} has no state {', '.join(state)}")

    def state(self) -> dict[str, np.ndarray]:
        """The declared state arrays by name."""
        return {name: getattr(self, name) for name, _, _ in self.STATE}

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Combine with the state of other elements of the same rows (in place); returns self."""
        chan = any(rule == "chan" for _, rule, _ in self.STATE)
        if chan:   # weighted by the counts before they add
            mean, m2 = chan_merge(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        for name, rule, _ in self.STATE:
            if rule != "chan":
                setattr(self, name, combine(rule, getattr(self, name), getattr(other, name)))
        if chan:
            self.mean, self.m2 = mean, m2
        return self


class RowMoments(Accumulator):
    """Per-row moments over the finite elements, with non-finite elements counted apart.

    State (each an array of shape (k,)) with its merge rule in ``STATE``; ``RowMoments(k)`` is the
    empty state of k rows.
    """

    STATE = (("n", "sum", np.int64), ("mean", "chan", np.float64), ("m2", "chan", np.float64),
             ("sum_abs", "sum", np.float64), ("sumsq", "sum", np.float64), ("max_abs", "max", np.float64),
             ("min", "min", np.float64), ("max", "max", np.float64), ("nonfinite", "sum", np.int64))

    @classmethod
    def empty(cls, k: int) -> "RowMoments":
        """The state of k rows without elements."""
        return cls(k)

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

    def update(self, block: np.ndarray) -> "RowMoments":
        """Add more elements of the same rows: ``block`` (k, m); returns self."""
        return self.merge(RowMoments.of(block))

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

        var = f(np.maximum(self.m2, 0.0) / nn)     # from the Chan state (two-pass), not from sumsq
        s = stats_from_sums(n, sumsq=self.sumsq, sum_abs=self.sum_abs, max_abs=self.max_abs)
        return {"count": n.copy(), "nonfinite": self.nonfinite.copy(), "mean": f(self.mean),
                "abs_mean": s["abs_mean"], "max_abs": f(s["max_abs"]), "min": f(self.min),
                "max": f(self.max), "var": var, "std": np.sqrt(var), "l1": f(s["l1"]),
                "l2": f(s["l2"])}


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
        piece = flat[:, j:j + step]
        acc = RowMoments.of(piece) if acc is None else acc.update(piece)
    return acc


class ElementwiseMoments(Accumulator):
    """Element-wise mean and variance across rows (steps), for one tensor shape.

    State (per element, shape (size,)) with its merge rule in ``STATE``. Non-finite values are
    skipped element by element. Memory: three arrays of the tensor's size, independent of the
    number of rows.
    """

    STATE = (("n", "sum", np.int64), ("mean", "chan", np.float64), ("m2", "chan", np.float64))

    def __init__(self, size: int):
        super().__init__(size)

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
        # Chan's update in place on the slice (m2 += m2b + ...: the association of the numbers)
        n0, mean0 = self.n[sl], self.mean[sl]
        n = n0 + nb
        nn = np.maximum(n, 1)
        delta = mb - mean0
        self.mean[sl] = np.where(n > 0, mean0 + delta * (nb / nn), 0.0)
        self.m2[sl] += m2b + delta * delta * (n0 * nb / nn)
        self.n[sl] = n

    def compute(self) -> float:
        """Population variance across rows, averaged over elements that have at least one value."""
        ok = self.n > 0
        if not ok.any():
            return float("nan")
        return float(np.mean(self.m2[ok] / self.n[ok]))


class UnitSums(Accumulator):
    """Per-unit activation statistics pooled over rows (steps, ranks): the sufficient statistics the
    recorder stores per step and unit. State (``STATE``): count (values per unit), nonfinite, sum,
    sum_abs, sumsq, n_pos (values > 0) add; min and max are extrema (NaN propagates). Histograms
    (``hist``) add too: see :meth:`rule`.
    """

    STATE = (("count", "sum", np.float64), ("nonfinite", "sum", np.float64), ("sum", "sum", np.float64),
             ("sum_abs", "sum", np.float64), ("sumsq", "sum", np.float64), ("n_pos", "sum", np.float64),
             ("min", "min", np.float64), ("max", "max", np.float64))

    @classmethod
    def rule(cls, stat: str) -> str:
        """The merge rule of a recorded per-unit statistic (anything not declared, e.g. a histogram, adds)."""
        return next((r for name, r, _ in cls.STATE if name == stat), "sum")

    @classmethod
    def of(cls, rows: dict, mask: np.ndarray | None = None) -> "UnitSums":
        """The statistics of rows (``stat -> (k, ...)`` arrays; only ``mask``'s rows if given) pooled
        into one."""
        return cls(**{name: reduce(rule, rows[name] if mask is None else rows[name][mask])
                      for name, rule, _ in cls.STATE})

    def update(self, rows: dict, mask: np.ndarray | None = None) -> "UnitSums":
        """Pool more rows in; returns self."""
        return self.merge(UnitSums.of(rows, mask))

    def compute(self) -> dict[str, np.ndarray]:
        """The pooled state by statistic name (the tables' formulas are the activation module's)."""
        return self.state()


def reduce_groups(acc: Accumulator, order: np.ndarray, starts: np.ndarray) -> Accumulator:
    """Rows of a row-vectorised accumulator (state arrays of shape (k,)) combined in groups by their
    declared merge rules: after sorting the rows by ``order``, rows ``starts[i]`` up to ``starts[i + 1]``
    become row ``i`` of the result (e.g. the slices of one parameter that several ranks recorded at
    one step). The "chan" pair merges exactly: mean = sum(n mean) / sum(n), m2 = sum(m2 + n (mean_j - mean)^2).

    Returns:
        A new accumulator of the same class with ``len(starts)`` rows.
    """
    state = {name: np.asarray(getattr(acc, name))[order] for name, _, _ in acc.STATE}
    if not len(starts):
        return type(acc)(0)
    out = {name: UFUNCS[rule].reduceat(state[name], starts).astype(dtype, copy=False)
           for name, rule, dtype in acc.STATE if rule != "chan"}
    if any(rule == "chan" for _, rule, _ in acc.STATE):
        n = state["n"].astype(np.float64)
        tot = np.add.reduceat(n, starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(tot > 0, np.add.reduceat(n * state["mean"], starts) / np.maximum(tot, 1), 0.0)
        d = state["mean"] - np.repeat(mean, np.diff(np.append(starts, len(n))))
        out["mean"], out["m2"] = mean, np.add.reduceat(state["m2"] + n * d * d, starts)
    return type(acc)(len(starts), **out)
