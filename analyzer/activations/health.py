"""Transformer health tables from the recorded health statistics (torch-free, out of core: one site's
rows at a time, merged over ranks by their merge rules).

The recorder (``bbdecoder.recorder.health``; docs/trace-format.md) stores per step, for softmax sites,
per unit (head) the sum of the row entropies ``entropy`` and the largest logit ``logit_max``, and for
every other site ``sum3``, ``sum4``, ``n_massive`` and ``massive_ratio``. From these:

    rows per head      = rows / U              (the softmax axis is not the unit axis; else one site row)
    keys per row (Tk)  = count x U / rows      (the mean row length when calls differ in length)
    mean entropy       = entropy / rows per head   (nats; per site: sum over heads / rows)
    normalized entropy = mean entropy / log Tk (1: uniform over every key; a causal mask gives its
                         early rows fewer keys, so a uniform causal head has less than 1:
                         about log(T!) / (T log T), 0.69 for T = 16)
    excess kurtosis    = m4 / m2^2 - 3 over every value of the site, with the central moments m2, m4
                         expanded from the raw sums (sum, sumsq, sum3, sum4) in float64. Caveat: the
                         expansion loses about 16 - 4 log10(|mean| / std) digits, so kurtosis is
                         unreliable where the site's mean exceeds about 1e3 times its spread; float32
                         inputs with |h| above about 1e9 overflow sum4 (inf) on the device.
    massive_ratio      = max |h| / median |h| (the median estimated from a strided sample of at most
                         1024 values per call; the largest ratio over the row's calls); n_massive: the units
                         (channels) whose max |h| exceeds 100 x that median (the most of any call;
                         Sun et al. 2024).

Tables keep their dtypes when empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..trace import format as fmt
from .sites import FIRST, empty_table, iter_merged_site_stats, select_sites

__all__ = ["ENTROPY_COLUMNS", "SITE_HEALTH_COLUMNS", "entropy_sites", "health_sites", "attention_entropy",
           "site_health", "excess_kurtosis"]

ENTROPY_COLUMNS = ["step", "first_step", "site", "head", "rows", "keys", "entropy", "norm_entropy", "logit_max"]
SITE_HEALTH_COLUMNS = ["step", "first_step", "site", "kind", "family", "count", "mean", "std", "kurtosis", "max_abs",
                       "n_massive", "massive_ratio"]
_TYPES = {"step": "int64", "first_step": "int64", "head": "int64", "count": "int64", "family": object}


def entropy_sites(run, sites: Any = None) -> list[dict]:
    """The selected sites that recorded attention entropy (softmax sites of newer traces)."""
    return [S for S in select_sites(run, sites) if all(k in S["stats"] for k in ("entropy", "rows", "count"))]


def health_sites(run, sites: Any = None) -> list[dict]:
    """The selected sites that recorded kurtosis and massive-activation statistics."""
    return [S for S in select_sites(run, sites) if all(k in S["stats"] for k in fmt.SITE_HEALTH_SCALAR_STATS)]


def _first(st, d) -> np.ndarray:
    return np.asarray(d[FIRST], np.int64) if FIRST in d else np.asarray(st, np.int64)


def attention_entropy(run, sites: Any = None, steps=None) -> pd.DataFrame:
    """Attention entropy per head and step (or window of steps) of every softmax site.

    Returns:
        One row per (step, site, head): step (a window's last step), first_step, site, head (the
        unit index; -1 for a site whose softmax axis is its unit axis: one row for the site), rows
        (softmax rows of the head), keys (Tk: values per row), entropy (mean row entropy, nats),
        norm_entropy (entropy / log keys; NaN for a single key), logit_max (largest logit; NaN where
        not observable).
    """
    frames = []
    for S in entropy_sites(run, sites):
        U = int(S["units"])
        per_site = S.get("softmax_dim") is not None and S.get("softmax_dim") == S.get("unit_axis")
        want = ("entropy", "logit_max", "rows", "count")
        for st, d in iter_merged_site_stats(run, S, want, steps):
            k = len(st)
            ent = np.asarray(d["entropy"], np.float64).reshape(k, U)
            rows = np.asarray(d["rows"], np.float64).reshape(k)
            lm = np.asarray(d["logit_max"], np.float64).reshape(k, U) if "logit_max" in d \
                else np.full((k, U), np.nan)
            lm = np.where(np.isneginf(lm), np.nan, lm)
            with np.errstate(invalid="ignore", divide="ignore"):
                keys = np.asarray(d["count"], np.float64).reshape(k) * U / rows
                if per_site:
                    ent, lm, heads, r = ent.sum(1, keepdims=True), lm.max(1, keepdims=True), [-1], rows
                else:
                    heads, r = range(U), rows / U
                H = ent.shape[1]
                mean = ent / r[:, None]
                norm = mean / np.where(keys > 1, np.log(keys), np.nan)[:, None]
            frames.append(pd.DataFrame({
                "step": np.repeat(np.asarray(st, np.int64), H), "first_step": np.repeat(_first(st, d), H),
                "site": S["name"], "head": np.tile(np.asarray(list(heads), np.int64), k),
                "rows": np.repeat(r, H), "keys": np.repeat(keys, H), "entropy": mean.reshape(-1),
                "norm_entropy": norm.reshape(-1), "logit_max": lm.reshape(-1)}))
    if not frames:
        return empty_table(ENTROPY_COLUMNS, _TYPES)
    return pd.concat(frames, ignore_index=True)[ENTROPY_COLUMNS]


def excess_kurtosis(n, s1, s2, s3, s4) -> np.ndarray:
    """Excess kurtosis m4 / m2^2 - 3 from the count ``n`` and the raw sums of h .. h^4 (arrays, float64;
    NaN where the spread is 0 or a sum is not finite)."""
    n, s1, s2, s3, s4 = (np.asarray(a, np.float64) for a in (n, s1, s2, s3, s4))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mu = s1 / n
        m2 = s2 / n - mu * mu
        m4 = s4 / n - 4.0 * mu * s3 / n + 6.0 * mu * mu * s2 / n - 3.0 * mu ** 4
        return np.where(m2 > 0, np.maximum(m4, 0.0) / (m2 * m2) - 3.0, np.nan)


def site_health(run, sites: Any = None, steps=None) -> pd.DataFrame:
    """Kurtosis and massive activations per site and step (or window of steps).

    Returns:
        One row per (step, site): step, first_step, site, kind, family, count (values of the site),
        mean, std (over every value of the site), kurtosis (excess; see the module docstring for its
        numeric caveat), max_abs, n_massive (units whose max |h| exceeds 100 x the sampled median |h|),
        massive_ratio (max |h| / sampled median |h|, the largest over the row's calls; 0: not judged).
    """
    frames = []
    want = ("count", "sum", "sumsq", "min", "max") + fmt.SITE_HEALTH_SCALAR_STATS
    for S in health_sites(run, sites):
        U = int(S["units"])
        for st, d in iter_merged_site_stats(run, S, want, steps):
            k = len(st)
            n = np.asarray(d["count"], np.float64).reshape(k) * U
            s1 = np.asarray(d["sum"], np.float64).reshape(k, -1).sum(1)
            s2 = np.asarray(d["sumsq"], np.float64).reshape(k, -1).sum(1)
            mn = np.asarray(d["min"], np.float64).reshape(k, -1)
            mx = np.asarray(d["max"], np.float64).reshape(k, -1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s1 / n
                std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
            frames.append(pd.DataFrame({
                "step": np.asarray(st, np.int64), "first_step": _first(st, d), "site": S["name"],
                "kind": S["kind"], "family": S.get("family"), "count": n.astype(np.int64), "mean": mean,
                "std": std, "kurtosis": excess_kurtosis(n, s1, s2, d["sum3"], d["sum4"]),
                "max_abs": np.maximum(np.abs(mn).max(1), np.abs(mx).max(1)),
                "n_massive": np.asarray(d["n_massive"], np.float64).reshape(k),
                "massive_ratio": np.asarray(d["massive_ratio"], np.float64).reshape(k)}))
    if not frames:
        return empty_table(SITE_HEALTH_COLUMNS, _TYPES)
    return pd.concat(frames, ignore_index=True)[SITE_HEALTH_COLUMNS]

