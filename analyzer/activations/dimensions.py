"""Analyses of the raw activation samples: variance across a dimension and similarity between
slices (torch-free)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from .sites import empty_table, samples, select_site


# --------------------------------------------------------------------------- raw-sample analyses

def _feature_axis(S: dict, dim) -> int:
    """``dim`` of a site's output (the batch axis is 0) as a non-negative axis of the sample array."""
    nd = 1 + len(S["sample_shape"])
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not -nd <= dim < nd:
        raise ValueError(f"dim must be an int in [{-nd}, {nd}) for site {S['name']!r} "
                         f"(outputs of shape (N, {', '.join(map(str, S['sample_shape']))})), not {dim!r}")
    d = int(dim) % nd
    if d == 0:
        raise ValueError("dim 0 is the sample (batch) axis; choose a feature dimension (>= 1)")
    return d


def dimension_variance(run, site: Any, dim: int = 1, steps=None) -> pd.DataFrame:
    """Variance across dimension ``dim`` of the site's output (dim counts the batch axis as 0), per
    recorded step, from the raw samples (the first K samples of the batch at the steps where the
    raw schedule fired): for every position of the other axes (samples included), the population
    variance of the values along ``dim``, averaged over positions (``variance``); and the population
    variance across ``dim`` of each slice's mean (``slice_mean_variance``). NaN values are ignored.
    """
    S = select_site(run, site)
    d = _feature_axis(S, dim)
    st, x = samples(run, S, steps=steps)
    out = []
    for s in np.unique(st):
        v = x[st == s].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            var = float(np.nanmean(np.nanvar(v, axis=d)))
            smv = float(np.nanvar(np.nanmean(np.moveaxis(v, d, 0).reshape(v.shape[d], -1), axis=1)))
        out.append({"step": int(s), "variance": var, "slice_mean_variance": smv,
                    "slices": int(v.shape[d]), "samples": int(v.shape[0])})
    cols = ["step", "variance", "slice_mean_variance", "slices", "samples"]
    if not out:
        return empty_table(cols, {"step": "int64", "slices": "int64", "samples": "int64"})
    return pd.DataFrame(out, columns=cols)


def similarity(run, site: Any, dim: int = 1, method: str = "cosine", steps=None) -> pd.DataFrame:
    """Mean pairwise similarity between distinct slices along ``dim`` (e.g. channels), per recorded
    step, from the raw samples. Slice i is every value with index i along ``dim`` (all samples),
    flattened.

    method "cosine": mean over ordered pairs i != j of cos(s_i, s_j); a pair with an all-zero slice
    counts as 0 (torch's ``cosine_similarity`` convention), as does a pair with a NaN.
    method "kl": slices become distributions p_i = softmax(s_i); mean over ordered pairs i != j of
    KL(p_i || p_j) (nats).
    """
    if method not in ("cosine", "kl"):
        raise ValueError(f"method must be 'cosine' or 'kl', not {method!r}")
    S = select_site(run, site)
    d = _feature_axis(S, dim)
    st, x = samples(run, S, steps=steps)
    out = []
    for s in np.unique(st):
        v = x[st == s].astype(np.float64)
        m = np.moveaxis(v, d, 0).reshape(v.shape[d], -1)
        n = m.shape[0]
        if n < 2:
            out.append({"step": int(s), "similarity": np.nan, "slices": n})
            continue
        if method == "cosine":
            norm = np.linalg.norm(m, axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                u = m / norm
            c = u @ u.T
            val = (np.nansum(c) - np.nansum(np.diag(c))) / (n * (n - 1))
        else:
            z = m - m.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            p = np.exp(logp)
            # KL(p_i || p_j) = sum p_i log p_i - sum p_i log p_j
            self_term = (p * logp).sum(1)
            cross = p @ logp.T
            kl = self_term[:, None] - cross
            val = (kl.sum() - np.trace(kl)) / (n * (n - 1))
        out.append({"step": int(s), "similarity": float(val), "slices": n})
    cols = ["step", "similarity", "slices"]
    if not out:
        return empty_table(cols, {"step": "int64", "slices": "int64"})
    return pd.DataFrame(out, columns=cols)
