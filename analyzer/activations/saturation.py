"""Saturation of bounded and ReLU-family activations from the recorded histograms and counts
(torch-free). Smooth kinds (GELU, SiLU, ...) are not judged: see :func:`saturation`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .deadunits import as_number
from .sites import FIRST, empty_table, is_windowed, select_sites, site_blocks, site_family


# --------------------------------------------------------------------------- saturation

def _hist_bins_for_delta(S, delta):
    """``(bins per bound, delta_used, B)``: delta rounded down to a whole number of histogram bins
    (at most half the range, so that the two bounds never share a bin)."""
    lo, hi = S["bounds"]
    edges = np.asarray(S["hist_edges"], np.float64)
    B = len(edges) - 1
    width = (hi - lo) / B
    nb = min(int(np.floor(delta / width + 1e-9)), B // 2)
    return nb, nb * width, B


def _has_bound_counts(S) -> bool:
    """A bounded site with near-bound counts (``near``) or, in traces before them, histograms."""
    return ("near" in S["stats"] and S.get("near_deltas") is not None) or \
        (S.get("hist_edges") is not None and "hist" in S["stats"])


def _bound_stats(S) -> tuple:
    if "near" in S["stats"]:
        return ("near", "rows") if S["kind"] == "softmax" else ("near",)
    return ("hist",)


def _bounded_counts(S, delta, d):
    """``(saturated, total, delta_used)`` of one block of a bounded site: from the near-bound counts,
    at the largest recorded delta not above ``delta`` (none: 0 saturated, ``delta_used`` 0), the
    total being the values per unit (softmax: the rows); from the 200-bin histograms of older
    traces, at ``delta`` rounded down to a bin edge (the total: the values in a bin)."""
    if "near" in d:
        deltas = np.asarray(S["near_deltas"], np.float64)
        j = int(np.searchsorted(deltas, delta + 1e-12, side="right")) - 1
        near = d["near"]
        tot = d["rows"] if S["kind"] == "softmax" else np.broadcast_to(d["count"][:, None], near.shape[:2])
        if j < 0:
            return np.zeros(tot.shape), tot, 0.0
        return near[..., j], tot, float(deltas[j])
    nb, used, B = _hist_bins_for_delta(S, delta)
    h = d["hist"]
    tot = h.sum(-1)
    sat = (h[..., :nb].sum(-1) if S["kind"] != "softmax" else 0.0) + h[..., B - nb:].sum(-1) \
        if nb else np.zeros(tot.shape)
    return sat, tot, used


def saturation(run, delta: float = 0.03, steps=None, sites: Any = None, per_unit: bool = False,
               by_rank: bool = False) -> pd.DataFrame:
    """Fraction of saturated values per (step, site[, unit]).

    By kind: sigmoid, hardtanh, relu6: a < lo + delta or a > hi - delta, with the kind's bounds
    [lo, hi] (sigmoid [0, 1]; hardtanh its min_val/max_val; relu6 [0, 6]); ``delta`` is in value
    units; tanh: |a| > 1 - delta; softmax: the row's largest probability > 1 - delta (one value per
    row, so softmax rows have no unit even with ``per_unit``: <NA>); ReLU family (relu, leaky_relu,
    elu, softplus): the fraction at or below zero (``delta`` does not apply: ``delta_used`` is NaN).
    Smooth kinds (GELU erf and tanh forms, QuickGELU, SiLU, Mish) are **not judged** (no rows; the
    kind decides, also for traces that called them family "relu"): they are unbounded above (linear
    for large inputs: Hendrycks & Gimpel 2016, Elfwing et al. 2018), so they have no upper saturation,
    and their only flat region, the negative tail, cannot be told from small negative inputs by the
    trace's output statistics (f is not monotonic below 0; no histogram is kept for them); a unit
    stuck in the tail is a dead unit (:func:`dead_units`, strict, with the kind's dead band). The
    ReLU rule would call about half the values of a healthy GELU layer saturated. (SageMaker
    Debugger's SaturatedActivation rule likewise judges tanh and sigmoid only.)
    Bounded kinds are read from the near-bound counts recorded every step at the deltas 0.01, 0.03
    and 0.1 (value units; ``near_deltas`` of the site): ``delta`` is rounded down to one of them
    (``delta_used``; below 0.01: 0, nothing saturated); NaN values are never saturated but count in
    the total. Traces written before (200-bin histograms): ``delta`` is
    rounded down to a bin edge (steps of 0.005 for sigmoid, 0.01 for tanh, 0.03 for relu6).
    Sites of other kinds (plain module outputs) are not included. The site's fraction pools its
    units (saturated values / values). Several ranks: over every rank's values at that step, unless
    ``by_rank`` (then per rank, with a leading ``rank`` column). Windows of several steps
    (``Recorder(activation_window=N)``): one row per window, at its last step, pooling the window's
    values, with a ``steps`` column (steps the window covers; present when a selected site is windowed).
    """
    delta = as_number("delta", delta)
    if not 0.0 <= delta < 0.5:
        raise ValueError(f"delta must be in [0, 0.5), not {delta!r}")
    rows = []
    ranks: set = set()
    chosen = select_sites(run, sites)
    windowed = any(is_windowed(S) for S in chosen)
    for S in chosen:
        fam = site_family(S)   # per kind: smooth kinds (GELU, SiLU, ...) are not judged
        if fam == "bounded" and not _has_bound_counts(S):
            continue
        if fam not in ("relu", "bounded"):
            continue
        need = ("count", "n_pos") if fam == "relu" else ("count",) + _bound_stats(S)
        for st, d, rank in site_blocks(run, S, stats=need, steps=steps, by_rank=by_rank):
            ranks.add(rank)
            ep = run.catalog.epoch_of(st)
            if fam == "relu":
                tot = np.broadcast_to(d["count"][:, None], d["n_pos"].shape)
                sat = tot - d["n_pos"]
                used = np.nan
            else:
                sat, tot, used = _bounded_counts(S, delta, d)
            with np.errstate(invalid="ignore", divide="ignore"):
                site_frac = sat.sum(1) / tot.sum(1) if sat.ndim == 2 else sat / tot
                unit_frac = sat / tot if sat.ndim == 2 else None
            base = {"rank": rank, "step": st.astype(np.int64), "epoch": ep.astype(np.int64), "site": S["name"],
                    "kind": S["kind"]}
            nst = st - np.asarray(d.get(FIRST, st), np.int64) + 1   # steps each row covers
            if not per_unit or unit_frac is None:
                f = pd.DataFrame(dict(base, saturated=site_frac, delta_used=used, steps=nst))
                if per_unit:
                    f["unit"] = pd.array([pd.NA] * len(f), dtype="Int64")
                rows.append(f)
            else:
                k, U = unit_frac.shape
                rows.append(pd.DataFrame({"rank": rank, "step": np.repeat(base["step"], U),
                                          "epoch": np.repeat(base["epoch"], U),
                                          "site": S["name"], "kind": S["kind"],
                                          "unit": np.tile(np.arange(U, dtype=np.int64), k),
                                          "saturated": unit_frac.reshape(-1), "delta_used": used,
                                          "steps": np.repeat(nst, U)}))
    cols = (["rank"] if len(ranks) > 1 else []) + ["step", "epoch", "site", "kind"] + (["unit"] if per_unit else []) \
        + ["saturated", "delta_used"] + (["steps"] if windowed else [])
    if not rows:
        return empty_table(cols, {"step": "int64", "epoch": "int64", "unit": "int64", "steps": "int64"})
    df = pd.concat(rows, ignore_index=True).reindex(columns=cols)
    if per_unit and df["unit"].dtype != np.int64:
        df["unit"] = df["unit"].astype("Int64")   # softmax rows (no unit) beside unit rows
    return df


def saturation_layers(run, delta: float = 0.03, unit_fraction: float = 0.5, layer_share: float = 0.5,
                      steps=None, sites: Any = None) -> pd.DataFrame:
    """Per site: saturated fraction over the steps, share of saturated units (a unit is saturated
    when more than ``unit_fraction`` of its values are), and ``flagged`` when that share exceeds
    ``layer_share``. Means over the steps: a window row weighs as many steps as it covers."""
    df = saturation(run, delta, steps=steps, sites=sites, per_unit=True)
    out = []
    for site, g in df.groupby("site", sort=False):
        if "steps" in g and (g["steps"] > 1).any():   # windows: means weighted by the steps covered
            n = g["steps"].where(g["saturated"].notna(), 0)
            g = g.assign(_w=g["saturated"].fillna(0.0) * n, _n=n, _hit=(g["saturated"] > unit_fraction) * g["steps"])
            if g["unit"].notna().any():
                by = g.groupby("unit")
                share = float(((by["_w"].sum() / by["_n"].sum()) > unit_fraction).mean())
            else:
                share = float(g["_hit"].sum() / g["steps"].sum())
            frac = float(g["_w"].sum() / g["_n"].sum())
        elif "unit" in g and g["unit"].notna().any():
            per_unit = g.groupby("unit")["saturated"].mean()
            share = float((per_unit > unit_fraction).mean())
            frac = float(g["saturated"].mean())
        else:
            share = float((g["saturated"] > unit_fraction).mean())
            frac = float(g["saturated"].mean())
        out.append({"site": site, "kind": g["kind"].iloc[0], "saturated": frac,
                    "saturated_units": share, "flagged": share > layer_share})
    cols = ["site", "kind", "saturated", "saturated_units", "flagged"]
    return pd.DataFrame(out, columns=cols) if out else empty_table(cols, {"flagged": "bool"})
