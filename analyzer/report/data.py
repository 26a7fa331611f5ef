"""The tidy tables of a report that are not a single analysis of the run: per-layer update ratios and
weight norms, the per-epoch gradient variance panel, the per-layer headline numbers, the per-site
dead-unit table and the pruning sweep. Pure functions over the Run API's DataFrames; no torch."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ..activations import dead_units
from ..stats import stats_from_sums
from .plots.gradients import gradient_flow_table

#: columns of :func:`dead_layer_table` and of :func:`dead_sweep`
DEAD_LAYER_COLUMNS = ["site", "kind", "units", "dead", "dead_fraction", "flagged"]
SWEEP_COLUMNS = ["criterion", "parameter", "threshold", "site", "kind", "units", "dead", "sparsity"]


def first_rank(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the lowest rank when a table has a "rank" column (several ranks recorded); else df."""
    if "rank" in df.columns and len(df):
        return df[df["rank"] == df["rank"].min()].drop(columns=["rank"])
    return df.drop(columns=["rank"]) if "rank" in df.columns else df


def layer_update_ratio(ws: pd.DataFrame) -> pd.DataFrame:
    """Update ratio of whole layers between consecutive snapshots, from per-parameter weight stats:
    ``sqrt(sum_p ||dw_p||^2) / sqrt(sum_p ||w_prev,p||^2)`` with ``||dw_p|| = update_ratio_p *
    ||w_prev,p||`` (``= ||w_p||`` where the previous snapshot was all zeros). Columns: step, layer_id,
    layer, update_ratio (NaN at a layer's first snapshot)."""
    if not len(ws):
        return pd.DataFrame({"step": [], "layer_id": [], "layer": [], "update_ratio": []})
    d = ws.sort_values(["layer_id", "param", "step"]).copy()
    prev = d.groupby(["layer_id", "param"], sort=False)["l2"].shift(1)
    dw = d["update_ratio"] * prev
    dw = dw.where(~(prev == 0), d["l2"])             # previous snapshot all zeros: ||dw|| = ||w||
    d["_dw2"] = dw ** 2
    d["_p2"] = prev ** 2
    g = d.groupby(["step", "layer_id", "layer"], sort=True)
    out = g.agg(_dw2=("_dw2", lambda v: v.sum(min_count=len(v))),
                _p2=("_p2", lambda v: v.sum(min_count=len(v)))).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
    return out[["step", "layer_id", "layer", "update_ratio"]]


def layer_weight_l2(ws: pd.DataFrame) -> pd.DataFrame:
    """L2 norm of each layer's parameters taken together, per snapshot: sqrt(sum_p l2_p^2)."""
    if not len(ws):
        return pd.DataFrame({"step": [], "layer_id": [], "layer": [], "l2": []})
    d = ws.assign(_sq=ws["l2"] ** 2)
    out = d.groupby(["step", "layer_id", "layer"], sort=True)["_sq"].sum(min_count=1).reset_index()
    out["l2"] = stats_from_sums(sumsq=out.pop("_sq").to_numpy())["l2"]
    return out


def grad_variance_epoch_table(gl: pd.DataFrame, ge: pd.DataFrame, numel: pd.DataFrame) -> pd.DataFrame:
    """Tidy per (epoch, layer) variance statistics for the per-epoch variance panel:
    "mean of per-iteration Var(g)": the epoch mean of the per-iteration variance of the layer's
    gradient elements; "gradient noise": each element's variance across the epoch's iterations,
    averaged over the layer's elements (grad_noise of its parameters weighted by numel)."""
    parts = []
    if len(gl):
        v = gl.groupby(["epoch", "layer_id", "layer"], sort=True)["var"].mean().reset_index()
        parts.append(v.rename(columns={"var": "value"}).assign(statistic="mean of per-iteration Var(g)"))
    if len(ge):
        e = ge.merge(numel, on=["layer_id", "param"], how="left")
        e = e[np.isfinite(e["grad_noise"].to_numpy(np.float64)) & (e["numel"] > 0)]
        if len(e):
            e = e.assign(_w=e["grad_noise"] * e["numel"])
            n = e.groupby(["epoch", "layer_id", "layer"], sort=True).agg(_w=("_w", "sum"), numel=("numel", "sum"))
            n = n.reset_index()
            n["value"] = n["_w"] / n["numel"]
            parts.append(n[["epoch", "layer_id", "layer", "value"]].assign(
                statistic="gradient noise (Var over iterations)"))
    if not parts:
        return pd.DataFrame({"epoch": [], "layer_id": [], "layer": [], "statistic": [], "value": []})
    return pd.concat(parts, ignore_index=True)[["epoch", "layer_id", "layer", "statistic", "value"]]


def layer_summary(layers: pd.DataFrame, gl: pd.DataFrame, ws: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers per layer: mean |g| over the run (sum l1 / sum count), max |g|, the mean
    gradient L2 norm over the last epoch with gradients, the layer's weight L2 norm at the last
    snapshot and the median layer update ratio over the snapshots."""
    out = layers[["id", "name", "type", "n_params", "selected"]].rename(columns={"id": "layer_id"}).copy()
    out = out.sort_values("layer_id").reset_index(drop=True)
    cols = {"grad_steps": 0, "mean_abs_grad": np.nan, "max_abs_grad": np.nan, "last_epoch": np.nan,
            "last_epoch_mean_l2": np.nan, "weight_snapshots": 0, "weight_l2_final": np.nan,
            "update_ratio_median": np.nan}
    for c, v in cols.items():
        out[c] = v
    out = out.set_index("layer_id")
    if len(gl):
        flow = gradient_flow_table(gl).set_index("layer_id")
        out.loc[flow.index, "grad_steps"] = flow["steps"].to_numpy()
        out.loc[flow.index, "mean_abs_grad"] = flow["abs_mean"].to_numpy()
        out.loc[flow.index, "max_abs_grad"] = flow["max_abs"].to_numpy()
        last = int(gl["epoch"].max())
        le = gl[gl["epoch"] == last].groupby("layer_id")["l2"].mean()
        out.loc[le.index, "last_epoch_mean_l2"] = le.to_numpy()
        out.loc[flow.index, "last_epoch"] = last
    if len(ws):
        wl = layer_weight_l2(ws)
        fin = wl.sort_values("step").groupby("layer_id").last()
        out.loc[fin.index, "weight_l2_final"] = fin["l2"].to_numpy()
        out.loc[fin.index, "weight_snapshots"] = wl.groupby("layer_id").size().reindex(fin.index).to_numpy()
        ur = layer_update_ratio(ws)
        med = ur.dropna(subset=["update_ratio"]).groupby("layer_id")["update_ratio"].median()
        out.loc[med.index, "update_ratio_median"] = med.to_numpy()
    out = out.reset_index()
    out["grad_steps"] = out["grad_steps"].astype(np.int64)
    out["weight_snapshots"] = out["weight_snapshots"].astype(np.int64)
    return out


def dead_layer_table(du: pd.DataFrame) -> pd.DataFrame:
    """Per site, from a :meth:`Run.dead_units` table: site, kind, units, dead (count), dead_fraction,
    flagged (more than layer_share of the units dead), in the table's (forward) site order."""
    if not len(du):
        return pd.DataFrame({c: [] for c in DEAD_LAYER_COLUMNS})
    g = du.groupby("site", sort=False)
    out = g.agg(kind=("kind", "first"), units=("unit", "size"), dead=("dead", "sum"),
                dead_fraction=("dead_fraction", "first"), flagged=("flagged", "first")).reset_index()
    out["units"] = out["units"].astype(np.int64)
    out["dead"] = out["dead"].astype(np.int64)
    out["flagged"] = out["flagged"].astype(bool)
    return out[DEAD_LAYER_COLUMNS]


def sweep_grid(criterion: str, threshold: float, max_active_fraction: float, du: pd.DataFrame | None = None
               ) -> tuple[str, list[float]]:
    """The swept parameter ("threshold" or "max_active_fraction") and its values for a pruning sweep
    under ``criterion``; always includes the chosen value. strict (max_active_fraction 0): 0 and
    quantiles of the units' largest values (``du``'s score); strict with max_active_fraction > 0:
    active fractions; apoz: APoZ levels; dormant: score levels (Sokar et al. use 0 ... 0.1)."""
    if criterion == "strict" and max_active_fraction > 0:
        return "max_active_fraction", sorted({0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5,
                                              float(max_active_fraction)})
    if criterion == "apoz":
        vals = {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0}
    elif criterion == "dormant":
        vals = {0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0}
    else:
        vals = {0.0}
        if du is not None and len(du):
            sc = du["score"].to_numpy(np.float64)
            sc = sc[np.isfinite(sc) & (sc > 0)]
            if len(sc):
                for q in np.quantile(sc, [0.05, 0.1, 0.25, 0.5, 0.75, 0.9]):
                    vals.add(float(f"{q:.3g}"))
    vals.add(float(threshold))
    return "threshold", sorted(vals)


def dead_sweep(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
               values: Any = None, du: pd.DataFrame | None = None, sites: Any = None) -> pd.DataFrame:
    """Sparsity versus threshold per site under the dead criterion, from :meth:`Run.dead_units` at
    each value of the swept parameter (see :func:`sweep_grid`; ``values`` overrides the grid).
    ``du``: the dead_units table at the chosen threshold (reused, and the strict grid's source).
    Columns: criterion, parameter, threshold (the swept value), site, kind, units, dead, sparsity;
    rows with site "(all sites)" pool every unit."""
    threshold, max_active_fraction = float(threshold), float(max_active_fraction)
    param, grid = sweep_grid(criterion, threshold, max_active_fraction, du)
    if values is not None:
        grid = sorted({float(v) for v in values})
    rows = []
    for v in grid:
        thr, maf = (threshold, v) if param == "max_active_fraction" else (v, max_active_fraction)
        if du is not None and thr == threshold and maf == max_active_fraction:
            d = du
        else:
            d = dead_units(run, criterion, thr, maf, sites=sites)
        t = dead_layer_table(d)
        for r in t.itertuples(index=False):
            rows.append((criterion, param, v, r.site, r.kind, int(r.units), int(r.dead),
                         r.dead / r.units if r.units else np.nan))
        if len(t):
            u, n = int(t["units"].sum()), int(t["dead"].sum())
            rows.append((criterion, param, v, "(all sites)", "", u, n, n / u if u else np.nan))
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


class Frames(NamedTuple):
    """The run's tables that the sections share, read once per report.

    Attributes:
        ids: ids of the layers in the report. layers: the whole layer table. lt: the report's layers
        (sorted by id). steps: one row per recorded step. gs_all, ge_all, gl_all: gradient
        statistics per step, per epoch and per (step, layer), every rank. ws: weight statistics,
        every rank. gs, ge, gl: the same, lowest rank only (no "rank" column). ws1: one row per
        (step, layer, parameter). multi_rank: several ranks recorded. summary: :func:`layer_summary`.
    """

    ids: Any
    layers: pd.DataFrame
    lt: pd.DataFrame
    steps: pd.DataFrame
    gs_all: pd.DataFrame
    ge_all: pd.DataFrame
    gl_all: pd.DataFrame
    ws: pd.DataFrame
    gs: pd.DataFrame
    ge: pd.DataFrame
    gl: pd.DataFrame
    ws1: pd.DataFrame
    multi_rank: bool
    summary: pd.DataFrame


def load_frames(run, layers: Any = None) -> Frames:
    """Read the tables of :class:`Frames` for the layers ``layers`` (see :meth:`Run.select`)."""
    ids = run.select(layers)
    all_layers = run.layers
    lt = all_layers[all_layers["id"].isin(ids)].sort_values("id").reset_index(drop=True)
    steps = run.steps
    gs_all = run.grad_stats(layers=ids)
    ge_all = run.grad_stats(per="epoch", layers=ids)
    gl_all = run.grad_stats(by="layer", layers=ids)
    ws = run.weight_stats(layers=ids)
    gs, ge, gl = first_rank(gs_all), first_rank(ge_all), first_rank(gl_all)
    ws1 = ws.drop_duplicates(["step", "layer_id", "param"], keep="first")
    return Frames(ids, all_layers, lt, steps, gs_all, ge_all, gl_all, ws, gs, ge, gl, ws1,
                  "rank" in gs_all.columns, layer_summary(lt, gl, ws1))
