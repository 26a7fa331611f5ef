"""Robust outlier detection against a trailing window (median and MAD), the one detector of the
spike and explosion rules and of the loss-spike attribution.

The modified z-score of Iglewicz and Hoaglin (1993): M = 0.6745 (x - median) / MAD over the
reference window; values with M > 3.5 are outliers. A flagged value does not enter the reference
window, so a level that jumps and stays keeps being flagged (an explosion), while a single outlier
is one flagged step (a spike).
"""

from __future__ import annotations

from collections import deque

import numpy as np

#: 0.6745 = the 0.75 quantile of the standard normal: makes the MAD consistent with sigma
MAD_SCALE = 0.6745


def trailing_outliers(values, window: int, z: float, min_rise: float, min_ref: int = 5, log: bool = True,
                      mad_floor: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flag values far above their trailing reference window.

    Args:
        values: (n,) series in step order (NaN/Inf and, with ``log``, values <= 0 are never flagged
            and never enter the window).
        window: the most recent unflagged values the reference holds.
        z: modified z-score above which a value is an outlier.
        min_rise: the value must also exceed the reference median by this much: a factor (``log``:
            x / median >= min_rise) or a relative increase (not ``log``: (x - median) / |median| >= min_rise).
        min_ref: values the reference must hold before anything is flagged.
        log: compare log10 values (norms, ratios: scale-free).
        mad_floor: smallest MAD used (log10 units with ``log``, else relative to |median|): a flat
            reference does not make every wiggle an outlier.

    Returns:
        (flagged bool (n,), score float (n,) modified z (NaN where not evaluated), rise float (n,):
        the factor (``log``) or relative increase over the reference median).
    """
    v = np.asarray(values, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = _log10_positive(v) if log else v
    args = (int(window), float(z), float(min_rise), int(min_ref), bool(log), float(mad_floor))
    if np.isfinite(x).all():
        # while nothing is flagged the reference is simply the previous `window` values: vectorised;
        # a series with an outlier is done again one value at a time (flagged values leave the window)
        flag, score, rise = _vectorised(x, *args)
        if not flag.any():
            return flag, score, rise
    return _one_by_one(x, *args)


def _judge(xi, med, mad, z, min_rise, log, mad_floor):
    """(score, rise, flagged) of values ``xi`` against reference medians and MADs (arrays or floats)."""
    floor = mad_floor if log else mad_floor * np.abs(med) + 1e-12
    score = MAD_SCALE * (xi - med) / np.maximum(mad, floor)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if log:
            rise = 10.0 ** (xi - med)
        else:
            rise = np.where(med != 0, (xi - med) / np.abs(np.where(med != 0, med, 1.0)),
                            np.inf * np.sign(xi - med))
    return score, rise, (score > z) & (rise >= min_rise)


def _one_by_one(x, window, z, min_rise, min_ref, log, mad_floor, start: int = 0, done=None):
    """Value by value from ``start``; ``done``: (flag, score, rise) already right before ``start``
    (every value before it finite and unflagged: the reference is the last ``window`` of them)."""
    n = len(x)
    if done is None:
        flag, score, rise = np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan)
    else:
        flag, score, rise = (np.array(a, copy=True) for a in done)
    ref: deque = deque(x[max(0, start - window):start].tolist(), maxlen=window)
    for i in range(start, n):
        xi = x[i]
        if not np.isfinite(xi):
            continue
        if len(ref) >= min_ref:
            a = np.fromiter(ref, np.float64, len(ref))
            med = float(np.median(a))
            mad = float(np.median(np.abs(a - med)))
            # xi as an array: numpy's array loop, as on the vectorised path (where numpy uses SIMD kernels,
            # e.g. AVX-512, 10 ** x of an array and of a scalar can differ in the last bit)
            sc, ri, fl = _judge(np.array([xi]), med, mad, z, min_rise, log, mad_floor)
            score[i], rise[i], flag[i] = sc[0], ri[0], fl[0]
        if not flag[i]:
            ref.append(xi)
    return flag, score, rise


def _vectorised(x, window, z, min_rise, min_ref, log, mad_floor):
    """The result of :func:`_one_by_one` for finite ``x`` up to its first flagged value."""
    flag, score, rise = _vectorised_rows(x[None, :], window, z, min_rise, min_ref, log, mad_floor)
    return flag[0], score[0], rise[0]


def _vectorised_rows(X, window, z, min_rise, min_ref, log, mad_floor):
    """:func:`_vectorised` of each row of ``X`` (m, n) at once (medians along the last axis, by sorting)."""
    m, n = X.shape
    med = np.full((m, n), np.nan)
    mad = np.full((m, n), np.nan)
    for i in range(min(max(min_ref, 1), n), min(window, n)):     # the first windows grow
        a = X[:, :i]
        med[:, i] = _median(a)
        mad[:, i] = _median(np.abs(a - med[:, i, None]))
    if n > window >= min_ref:
        # W[r, j]: the reference window of value j + window of row r
        W = np.lib.stride_tricks.sliding_window_view(X[:, :-1], window, axis=1)
        mw = _median(W)
        med[:, window:] = mw
        mad[:, window:] = _median(np.abs(W - mw[..., None]))
    ok = ~np.isnan(med)
    score = np.full((m, n), np.nan)
    rise = np.full((m, n), np.nan)
    flag = np.zeros((m, n), bool)
    sc, ri, fl = _judge(X[ok], med[ok], mad[ok], z, min_rise, log, mad_floor)
    score[ok], rise[ok], flag[ok] = sc, ri, fl
    return flag, score, rise


def _median(a: np.ndarray) -> np.ndarray:
    """np.median of finite values along the last axis, bit for bit (the middle value, or the two middle
    values added and halved as np.mean does), by one sort (np.median's partition is slower on short rows)."""
    k = a.shape[-1]
    s = np.sort(a, axis=-1)
    if k % 2:
        return s[..., k // 2]
    return (s[..., k // 2 - 1] + s[..., k // 2]) / 2.0


#: float64 values one block of :func:`trailing_outliers_rows` holds per reference copy (~8 MB: a few such
#: copies at once; 100,000 layers judged in about 40 blocks)
BLOCK_VALUES = 1 << 20


def trailing_outliers_rows(values, window: int, z: float, min_rise: float, min_ref: int = 5, log: bool = True,
                           mad_floor: float = 0.01, take: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`trailing_outliers` of every row of ``values`` (m, n) at once: row i of each result equals
    ``trailing_outliers(values[i], ...)`` exactly. Rows are taken in blocks of at most
    :data:`BLOCK_VALUES` reference values (bounded memory); a row with a non-finite value or an outlier
    is done again alone (:func:`trailing_outliers`: flagged values leave the window).

    ``take``: the caller hands ``values`` over (a float64 array it no longer reads): it is let go of as soon as
    its logarithms are taken, or used in place of a copy.

    Returns:
        (flagged bool (m, n), score float (m, n), rise float (m, n)).
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (series x steps), not of shape {v.shape}")
    m, n = v.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        x = _log10_positive(v) if log else v
    if take:
        del values, v
    args = (int(window), float(z), float(min_rise), int(min_ref), bool(log), float(mad_floor))
    flag = np.zeros((m, n), bool)
    score = np.full((m, n), np.nan)
    rise = np.full((m, n), np.nan)
    finite = np.isfinite(x).all(axis=1)
    rows = np.flatnonzero(finite)
    per = max(1, BLOCK_VALUES // max(1, n * max(1, min(int(window), n))))
    for a in range(0, len(rows), per):
        r = rows[a:a + per]
        flag[r], score[r], rise[r] = _vectorised_rows(x[r], *args)
    for i in np.flatnonzero(~finite):
        flag[i], score[i], rise[i] = _one_by_one(x[i], *args)
    for i in np.flatnonzero(finite & flag.any(axis=1)):
        # right up to the first outlier; from there value by value (an outlier stays out of the window)
        first = int(np.argmax(flag[i]))
        keep = np.arange(n) < first
        done = (flag[i] & keep, np.where(keep, score[i], np.nan), np.where(keep, rise[i], np.nan))
        flag[i], score[i], rise[i] = _one_by_one(x[i], *args, start=first, done=done)
    return flag, score, rise


def _log10_positive(v: np.ndarray) -> np.ndarray:
    """log10 of ``v`` where positive, NaN elsewhere (one array: 100,000 layers x 20 steps, 16 MB)."""
    x = np.where(v > 0, v, np.nan)
    np.log10(x, out=x)
    return x


def episodes(flag: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True values: [(start index, stop index exclusive)]."""
    f = np.concatenate([[False], np.asarray(flag, bool), [False]])
    d = np.diff(f.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
