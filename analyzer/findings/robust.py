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
        x = np.log10(np.where(v > 0, v, np.nan)) if log else v
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


def _one_by_one(x, window, z, min_rise, min_ref, log, mad_floor):
    n = len(x)
    flag = np.zeros(n, bool)
    score = np.full(n, np.nan)
    rise = np.full(n, np.nan)
    ref: deque = deque(maxlen=window)
    for i in range(n):
        xi = x[i]
        if not np.isfinite(xi):
            continue
        if len(ref) >= min_ref:
            a = np.fromiter(ref, np.float64, len(ref))
            med = float(np.median(a))
            mad = float(np.median(np.abs(a - med)))
            sc, ri, fl = _judge(xi, med, mad, z, min_rise, log, mad_floor)
            score[i], rise[i], flag[i] = float(sc), float(ri), bool(fl)
        if not flag[i]:
            ref.append(xi)
    return flag, score, rise


def _vectorised(x, window, z, min_rise, min_ref, log, mad_floor):
    """The result of :func:`_one_by_one` for finite ``x`` up to its first flagged value."""
    n = len(x)
    med = np.full(n, np.nan)
    mad = np.full(n, np.nan)
    for i in range(min(max(min_ref, 1), n), min(window, n)):     # the first windows grow
        a = x[:i]
        med[i] = np.median(a)
        mad[i] = np.median(np.abs(a - med[i]))
    if n > window >= min_ref:
        W = np.lib.stride_tricks.sliding_window_view(x[:-1], window)   # row j: the reference of value j + window
        m = np.median(W, axis=1)
        med[window:] = m
        mad[window:] = np.median(np.abs(W - m[:, None]), axis=1)
    ok = ~np.isnan(med)
    score = np.full(n, np.nan)
    rise = np.full(n, np.nan)
    flag = np.zeros(n, bool)
    sc, ri, fl = _judge(x[ok], med[ok], mad[ok], z, min_rise, log, mad_floor)
    score[ok], rise[ok], flag[ok] = sc, ri, fl
    return flag, score, rise


def episodes(flag: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True values: [(start index, stop index exclusive)]."""
    f = np.concatenate([[False], np.asarray(flag, bool), [False]])
    d = np.diff(f.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
