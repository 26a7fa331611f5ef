"""The tidy tables of a report that are not a single analysis of the run: per-layer update ratios and
weight norms, the per-epoch gradient variance panel, the per-layer headline numbers, the per-site
dead-unit table and the pruning sweep. Pure functions over the Run API's DataFrames; no torch."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .. import heap, narrow_frames
from ..activations import dead_counts
from ..findings.data import GRAD_RULE_COLUMNS
from ..gradients import DROPPABLE, grad_pass, group_code, pool_params
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


def update_squares(ws: pd.DataFrame) -> pd.DataFrame:
    """``ws`` (per-parameter weight stats) sorted by (layer_id, param, step) with two more columns:
    ``_dw2`` = ||w_t - w_prev||^2 (from ``update_ratio_p * ||w_prev,p||``; ``= ||w_p||^2`` where the
    previous snapshot was all zeros; NaN at a parameter's first snapshot) and ``_p2`` = ||w_prev||^2.
    Both add across parameters (and layers)."""
    d = ws.sort_values(["layer_id", "param", "step"]).copy()
    prev = d.groupby(["layer_id", "param"], sort=False)["l2"].shift(1)
    dw = d["update_ratio"] * prev
    dw = dw.where(~(prev == 0), d["l2"])             # previous snapshot all zeros: ||dw|| = ||w||
    d["_dw2"] = dw ** 2
    d["_p2"] = prev ** 2
    return d


def layer_update_ratio(ws: pd.DataFrame) -> pd.DataFrame:
    """Update ratio of whole layers between consecutive snapshots, from per-parameter weight stats:
    ``sqrt(sum_p ||dw_p||^2) / sqrt(sum_p ||w_prev,p||^2)`` (see :func:`update_squares`). Columns: step,
    layer_id, layer, update_ratio (NaN at a layer's first snapshot)."""
    if not len(ws):
        return pd.DataFrame({"step": [], "layer_id": [], "layer": [], "update_ratio": []})
    out = strict_sums(update_squares(ws), ["step", "layer_id", "layer"], ["_dw2", "_p2"])
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
    return out[["step", "layer_id", "layer", "update_ratio"]]


def strict_sums(d: pd.DataFrame, by: list[str], cols: list[str]) -> pd.DataFrame:
    """Sums of ``cols`` per group of ``by`` (sorted), NaN where any summand is NaN (vectorised: no
    Python call per group)."""
    g = d.groupby(by, sort=True)
    out = g[cols].sum()
    bad = d[cols].isna().groupby([d[b] for b in by], sort=True).any()
    return out.mask(bad.to_numpy()).reset_index()


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
        flow = _flow(gl)
        out.loc[flow.index, "grad_steps"] = flow["steps"].to_numpy()
        out.loc[flow.index, "mean_abs_grad"] = flow["abs_mean"].to_numpy()
        out.loc[flow.index, "max_abs_grad"] = flow["max_abs"].to_numpy()
        last = int(gl["epoch"].max())
        le = gl.loc[gl["epoch"] == last, ["layer_id", "l2"]].groupby("layer_id")["l2"].mean()   # two columns copied
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


def _flow(gl: pd.DataFrame) -> pd.DataFrame:
    """:func:`gradient_flow_table` of ``gl`` indexed by layer_id; grouped by the layer id alone where every
    row has a name (a layer's name follows its id: the same groups and sums without hashing 2 million names)."""
    if gl["layer"].isna().any():
        return gradient_flow_table(gl).set_index("layer_id")
    g = gl[["layer_id", "l1", "count", "max_abs"]].groupby("layer_id", sort=True)
    out = g.agg(l1=("l1", "sum"), count=("count", "sum"), max_abs=("max_abs", "max"), steps=("l1", "size"))
    out["abs_mean"] = stats_from_sums(count=out["count"].to_numpy(), sum_abs=out["l1"].to_numpy())["abs_mean"]
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
    """Sparsity versus threshold per site under the dead criterion: the dead units of
    :meth:`Run.dead_units` at each value of the swept parameter (see :func:`sweep_grid`; ``values``
    overrides the grid), counted from one pass over the statistics (:func:`analyzer.activations.dead_counts`).
    ``du``: the dead_units table at the chosen threshold (the strict grid's source).
    Columns: criterion, parameter, threshold (the swept value), site, kind, units, dead, sparsity;
    rows with site "(all sites)" pool every unit."""
    threshold, max_active_fraction = float(threshold), float(max_active_fraction)
    param, grid = sweep_grid(criterion, threshold, max_active_fraction, du)
    if values is not None:
        grid = sorted({float(v) for v in values})
    counts = dead_counts(run, criterion, grid, param, threshold, max_active_fraction, sites=sites)
    rows = []
    for v, t in counts.groupby("value", sort=True):
        for r in t.itertuples(index=False):
            rows.append((criterion, param, v, r.site, r.kind, int(r.units), int(r.dead),
                         r.dead / r.units if r.units else np.nan))
        u, n = int(t["units"].sum()), int(t["dead"].sum())
        rows.append((criterion, param, v, "(all sites)", "", u, n, n / u if u else np.nan))
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


#: The overview heatmaps and the across-layer figures (gradient flow, variance, weight magnitude and
#: update ratio) show one row, bar or line per layer up to this many layers; past it, one per group of
#: layers taken together (:func:`layer_rows`): a heatmap row per layer of 100,000 layers would be 15,000
#: inches tall, and 100,000 lines are unreadable.
MAX_LAYER_ROWS = 300


def layer_rows(lt: pd.DataFrame, max_rows: int = MAX_LAYER_ROWS) -> pd.DataFrame | None:
    """The rows of the across-layer figures when the report has more than ``max_rows`` layers.

    Layers are first taken by repeated block (consecutive layers whose names, without the prefix all
    share, have the same first numbered part: ``blocks.7.mlp.3`` is in ``blocks.7``; a layer outside
    a numbered block is a unit of its own); when there are more than ``max_rows`` such units,
    ``ceil(units / max_rows)`` consecutive units make one row. Rows follow layer id order.

    Args:
        lt: the report's layer table (columns id, name), any order.

    Returns:
        None when ``len(lt) <= max_rows`` (one row per layer); else one row per layer: layer_id,
        row_id (the smallest layer id of its row: the row's id), row (its name: the block, or
        ``first–last`` of its blocks, then ``[n layers]``), n_layers (layers in the row).
    """
    if len(lt) <= max_rows:
        return None
    from .plots.overview import block_of, name_prefix
    t = lt.sort_values("id")
    ids = t["id"].to_numpy(np.int64)
    names = [str(n) for n in t["name"]]
    pre = name_prefix(names)
    blocks = [block_of(n[len(pre):]) if pre and n.startswith(pre) else block_of(n) for n in names]
    new_unit = np.ones(len(ids), bool)
    new_unit[1:] = [(b == "" or b != a) for a, b in zip(blocks[:-1], blocks[1:])]
    unit = np.cumsum(new_unit) - 1
    per = -(-int(unit[-1] + 1) // max_rows)
    row = unit // per
    unit_name = [(pre + blocks[i] if blocks[i] and pre and names[i].startswith(pre) else blocks[i]) or names[i]
                 or "(model)" for i in range(len(ids))]
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    row_name, row_id, n_layers = np.empty(len(ids), object), np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
    for a, b in zip(starts, ends):
        first, last = unit_name[a], unit_name[b - 1]
        if first == last:
            nm = first
        else:
            fp, lp = first.rsplit(".", 1), last.rsplit(".", 1)
            nm = (f"{fp[0]}.{fp[1]}–{lp[1]}" if len(fp) == len(lp) == 2 and fp[0] == lp[0]
                  else f"{first} – {last}")
        row_name[a:b] = f"{nm} [{b - a} layer{'s' if b - a != 1 else ''}]"
        row_id[a:b] = ids[a]
        n_layers[a:b] = b - a
    return pd.DataFrame({"layer_id": ids, "row_id": row_id, "row": row_name, "n_layers": n_layers})


def _rows_of(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``df`` with layer_id and layer replaced by the row's id and name (rows not in ``rows`` dropped)."""
    m = df.merge(rows[["layer_id", "row_id", "row"]], on="layer_id", how="inner")
    return m.drop(columns=[c for c in ("layer_id", "layer") if c in m.columns]).rename(
        columns={"row_id": "layer_id", "row": "layer"})


def grouped_grad_stats(gl: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Per-(step, layer) gradient statistics (:meth:`Run.grad_stats` by="layer") of the groups of
    ``rows`` (:func:`layer_rows`), every parameter of a group taken together, from the sums: count,
    nonfinite, numel and l1 add, sum x = mean * count and sum x^2 = l2^2 add, max_abs is the maximum;
    then mean, var, abs_mean, l2 by :func:`analyzer.stats.stats_from_sums`. Same columns as ``gl``."""
    if not len(gl):
        return gl
    out = narrow_frames.grouped_sums(gl, rows)   # a sorted gl (the report's): its runs of rows, no merge
    if out is None:
        d = _rows_of(gl, rows)
        cnt = d["count"].to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            d["_s"] = np.where(cnt > 0, d["mean"].to_numpy(np.float64) * cnt, 0.0)
            d["_sq"] = np.where(cnt > 0, d["l2"].to_numpy(np.float64) ** 2, 0.0)
            d["_l1"] = np.where(cnt > 0, d["l1"].to_numpy(np.float64), 0.0)
        g = d.groupby(["step", "epoch", "layer_id", "layer"], sort=True)
        out = g.agg(numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"), _s=("_s", "sum"),
                    _sq=("_sq", "sum"), _l1=("_l1", "sum"), max_abs=("max_abs", "max")).reset_index()
    n = out["count"].to_numpy(np.float64)
    st = stats_from_sums(n, out.pop("_s").to_numpy(), out.pop("_sq").to_numpy(), out.pop("_l1").to_numpy())
    empty = n <= 0
    out["mean"], out["abs_mean"], out["var"] = st["mean"], st["abs_mean"], st["var"]
    out["l1"], out["l2"] = np.where(empty, np.nan, st["l1"]), np.where(empty, np.nan, st["l2"])
    return out[[c for c in gl.columns if c in out.columns]]


def grouped_weight_stats(ws: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Per-snapshot weight statistics of the groups of ``rows``, every parameter of a group taken
    together as one parameter "(all)": l2 = sqrt(sum l2^2), update_ratio = sqrt(sum ||dw||^2) /
    sqrt(sum ||w_prev||^2) (:func:`update_squares`; NaN at a first snapshot), numel adds.
    Columns: step, epoch, layer_id, layer, param, numel, l2, update_ratio."""
    cols = ["step", "epoch", "layer_id", "layer", "param", "numel", "l2", "update_ratio"]
    if not len(ws):
        return pd.DataFrame({c: [] for c in cols})
    d = update_squares(ws)
    d["_w2"] = d["l2"] ** 2
    d = _rows_of(d, rows)
    by = ["step", "epoch", "layer_id", "layer"]
    out = strict_sums(d, by, ["_dw2", "_p2"])
    rest = d.groupby(by, sort=True).agg(numel=("numel", "sum"), _w2=("_w2", "sum")).reset_index()
    out["numel"], out["l2"] = rest["numel"].to_numpy(), np.sqrt(rest["_w2"].to_numpy(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
    out["param"] = "(all)"
    return out[cols]


def grouped_epoch_stats(ge: pd.DataFrame, gs: pd.DataFrame, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-epoch gradient noise, element counts) of the groups of ``rows`` as one parameter "(all)"
    each, for :func:`grad_variance_epoch_table`: grad_noise = the groups' parameters' grad_noise
    weighted by their element counts (finite ones only); numel = their element counts added. ``gs``: a frame
    with columns layer_id, param, numel (the per-step gradient frame, or its element counts only)."""
    numel = gs[["layer_id", "param", "numel"]].drop_duplicates(["layer_id", "param"])
    gn = _rows_of(numel, rows).groupby(["layer_id"], sort=True)["numel"].sum().reset_index().assign(param="(all)")
    if not len(ge):
        return ge, gn[["layer_id", "param", "numel"]]
    e = ge.merge(numel, on=["layer_id", "param"], how="left")
    v = e["grad_noise"].to_numpy(np.float64)
    ok = np.isfinite(v) & (e["numel"].to_numpy(np.float64) > 0)
    e = _rows_of(e[ok].assign(_w=v[ok] * e["numel"].to_numpy(np.float64)[ok]), rows)
    out = e.groupby(["epoch", "layer_id", "layer"], sort=True).agg(_w=("_w", "sum"), _n=("numel", "sum")).reset_index()
    out["grad_noise"] = out.pop("_w") / out.pop("_n")
    return out.assign(param="(all)"), gn[["layer_id", "param", "numel"]]


def rows_note(rows: pd.DataFrame | None) -> str:
    """The sentence the captions of the across-layer figures get when layers are grouped (plain text)."""
    if rows is None:
        return ""
    n, r = len(rows), rows["row_id"].nunique()
    return (f" Here the {n:,} layers are shown as {r:,} rows of whole blocks or runs of consecutive blocks "
            f"(more than {MAX_LAYER_ROWS} layers; each named by its block(s) and its number of layers, labelled by "
            "its first layer's id), every layer of a row taken together: norms are √Σ of the layers' squared "
            "norms, sums and counts add, update ratios are √Σ‖Δw‖² / √Σ‖w‖². A single layer that stands out "
            "inside a row is named by the findings above; every layer's numbers are in tables/layer_summary.csv.")


#: A per-step table of the report (:data:`STEP_TABLES`) with more rows than this (about 85 MB of CSV) is
#: written per epoch instead (:func:`step_table_policy`); the tables per layer keep every layer.
ROW_BUDGET = 500_000

#: the per-step tables under :data:`ROW_BUDGET`, and how each is read whole through the Python API
STEP_TABLES = {"grad_stats_step": "run.grad_stats()", "grad_stats_layer": 'run.grad_stats(by="layer")',
               "weight_stats": "run.weight_stats()"}


def epoch_means(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per (``keys``, epoch) of a per-step gradient table (columns step, epoch, ``keys``, numel, count,
    nonfinite, mean, abs_mean, max_abs, var, l1, l2), with the definitions of ``Run.grad_stats(per="epoch")``:
    n_steps, the mean over the epoch's steps of mean, abs_mean, var, l1, l2, max of max_abs, l2_var =
    variance across the steps of l2 (ddof 0), nonfinite and count summed, numel as recorded (the last)."""
    by = [c for c in ("rank",) if c in df.columns] + ["epoch"] + keys
    # grouped by one integer per row (a layer's name follows its id: not a key; issue 16: 2 million rows, no
    # hashing of names), the keys taken from each group's first row: the same groups in the same order
    code = group_code(df, [c for c in by if c != "layer" or "layer_id" not in by]) if len(df) else None
    g = df.groupby(code if code is not None else by, sort=True)
    firsts = {c: (c, "first") for c in by} if code is not None else {}
    out = g.agg(**firsts, numel=("numel", "last"), n_steps=("step", "size"), count=("count", "sum"),
                nonfinite=("nonfinite", "sum"), mean=("mean", "mean"), abs_mean=("abs_mean", "mean"),
                max_abs=("max_abs", "max"), var=("var", "mean"), l1=("l1", "mean"), l2=("l2", "mean"))
    out = out.reset_index(drop=code is not None)
    out["l2_var"] = g["l2"].var(ddof=0).to_numpy()
    return out


def last_snapshots(ws: pd.DataFrame) -> pd.DataFrame:
    """Per (epoch, layer, parameter) of a weight statistics table: the epoch's last snapshot (its row as
    is: l2, update_ratio since the snapshot before, ...) and n_snapshots, the epoch's snapshots."""
    by = [c for c in ("rank",) if c in ws.columns] + ["epoch", "layer_id", "param"]
    d = ws.sort_values(by + ["step"], kind="stable")
    n = d.groupby(by, sort=False)["step"].transform("size")
    last = ~d.duplicated(by, keep="last")
    return d[last].assign(n_snapshots=n[last].to_numpy(np.int64)).reset_index(drop=True)


def step_table_policy(name: str, df: pd.DataFrame, d: "Frames") -> list[tuple[str, pd.DataFrame, str]] | None:
    """What the report writes for the per-step table ``name`` (a key of :data:`STEP_TABLES`): None when it
    has at most :data:`ROW_BUDGET` rows (written whole); else the tables that stand for it: grad_stats_step
    -> none (grad_stats_epoch holds every (epoch, layer, parameter)); grad_stats_layer -> grad_stats_layer_epoch
    (:func:`epoch_means`) and, where the across-layer figures group layers (``d.rows``), grad_stats_groups_step
    (every step of the figures' groups of layers, :func:`grouped_grad_stats`) when it fits the budget;
    weight_stats -> weight_stats_epoch (:func:`last_snapshots`). Returns [(name, table, description)]."""
    if len(df) <= ROW_BUDGET:
        return None
    if name == "grad_stats_step":
        return []
    if name == "grad_stats_layer":
        out = [("grad_stats_layer_epoch", epoch_means(df, ["layer_id", "layer"]),
                "gradient statistics per (epoch, layer), parameters pooled: means over the epoch's steps "
                "(as grad_stats_epoch), max of max_abs, l2_var")]
        if d.rows is not None and len(d.fig_gl) <= ROW_BUDGET:
            out.append(("grad_stats_groups_step", d.fig_gl, "gradient statistics per (step, group of layers) "
                        "of the across-layer figures: layer_id = the group's first layer, layer = its name"))
        return out
    if name == "weight_stats":
        return [("weight_stats_epoch", last_snapshots(df), "weight statistics per (epoch, layer, parameter) "
                 "at the epoch's last snapshot, with n_snapshots")]
    raise ValueError(f"{name!r} is not a per-step table of the report ({', '.join(STEP_TABLES)})")


class Frames(NamedTuple):
    """The run's tables that the sections share, read once per report.

    Attributes:
        ids: ids of the layers in the report. layers: the whole layer table. lt: the report's layers
        (sorted by id). steps: one row per recorded step. gs_all, ge_all, gl_all: gradient
        statistics per step, per epoch and per (step, layer), every rank. ws: weight statistics,
        every rank. gs, ge, gl: the same, lowest rank only (no "rank" column). ws1: one row per
        (step, layer, parameter). multi_rank: several ranks recorded. summary: :func:`layer_summary`.
        rows: :func:`layer_rows` (None: one row per layer). fig_gs, fig_ge, fig_gl, fig_ws: the frames of
        the across-layer figures (overview heatmaps, gradient flow and variance, weight magnitude and
        update ratio): gs, ge, gl, ws1 themselves up to :data:`MAX_LAYER_ROWS` layers, else those of the
        groups of ``rows`` (:func:`grouped_grad_stats`, :func:`grouped_epoch_stats`,
        :func:`grouped_weight_stats`; fig_gs holds the groups' element counts only). rows_note: the
        captions' sentence saying so (plain text; "" per layer). own_pass: the gradient frames come from
        the report's own pass (:data:`OWN_PASS_LAYERS` layers or more), not the run's cache; gs_all and gs
        then hold only :data:`SLIM_GS_COLUMNS` when they have more than :data:`ROW_BUDGET` rows (read as narrow
        rows where :func:`analyzer.narrow_frames.applies`: layer and param then categoricals).
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
    rows: Any = None
    fig_gs: Any = None
    fig_ge: Any = None
    fig_gl: Any = None
    fig_ws: Any = None
    rows_note: str = ""
    own_pass: bool = False


#: From this many layers the report reads the gradient statistics with a pass of its own, not through the
#: run's cache (:meth:`Run.grad_stats`), so that it can let go of them once no later section needs them
#: (:func:`slim_grad_frame`, :func:`released`); 100,000 layers: 4 million rows per (step, parameter), 448 MB.
OWN_PASS_LAYERS = heap.MANY_LAYERS

#: the columns of the per-(step, parameter) frame the report reads once :func:`load_frames` has derived the
#: other frames from it, when the frame is not written whole (more than :data:`ROW_BUDGET` rows): the health
#: rules' ``grads`` table (:data:`analyzer.findings.data.GRAD_RULE_COLUMNS`) and the non-finite section
#: (step, layer_id, layer, param, nonfinite); the table section reads only its length
SLIM_GS_COLUMNS = ["rank"] + GRAD_RULE_COLUMNS


def slim_grad_frame(gs: pd.DataFrame) -> pd.DataFrame:
    """``gs`` (:meth:`Run.grad_stats` rows) with only the columns of :data:`SLIM_GS_COLUMNS` it has, the other
    columns' arrays let go: the same rows and values; step, layer_id, count and nonfinite as int32 where every
    value fits (what reads them takes ``int()`` of a value or sums them, which numpy does in int64; 100,000
    layers: 160 of 448 MB kept)."""
    out = {}
    for c in SLIM_GS_COLUMNS:
        if c not in gs.columns:
            continue
        v = gs[c]
        if c in ("step", "layer_id", "count", "nonfinite") and v.dtype == np.int64 and len(v):
            a = v.to_numpy()
            if np.iinfo(np.int32).min <= a.min() and a.max() <= np.iinfo(np.int32).max:
                v = a.astype(np.int32)
        out[c] = v
    return pd.DataFrame(out, copy=False)


def released(d: Frames) -> Frames:
    """``d`` without its per-step and per-epoch tables (each emptied, columns kept): for the end of a report
    whose frames came from its own pass (``d.own_pass``), once every section ran, so that their memory is
    free before the figures are drawn and summary.json is written (100,000 layers: about 0.5 GB)."""
    def empty(df):
        return df.iloc[:0].copy() if isinstance(df, pd.DataFrame) else df
    big = ("gs_all", "ge_all", "gl_all", "ws", "gs", "ge", "gl", "ws1")
    return d._replace(**{k: empty(getattr(d, k)) for k in big})


def load_frames(run, layers: Any = None) -> Frames:
    """Read the tables of :class:`Frames` for the layers ``layers`` (see :meth:`Run.select`)."""
    ids = run.select(layers)
    all_layers = run.layers
    lt = all_layers[all_layers["id"].isin(ids)].sort_values("id").reset_index(drop=True)
    steps = run.steps
    own = len(ids) >= OWN_PASS_LAYERS
    rows = layer_rows(lt, MAX_LAYER_ROWS)
    numel = None
    keys = run.catalog.param_keys(ids)[1] if own else None
    narrow = own and rows is not None and narrow_frames.applies(run.catalog, keys) \
        and narrow_frames.recorded_rows(run.catalog, keys) > ROW_BUDGET
    got = narrow_frames.report_frames(run.catalog, keys, run.progress) if narrow else None
    if got is not None:   # the same frames from narrow rows, never the whole per-step frame (issue 16)
        gs_all, ge_all, gl_all, numel = got
        del got
        heap.trim()
    elif own:   # the report's own pass (not kept by the run): its frames go when the report lets go of them
        gs_all, ge_all = grad_pass(run.catalog, keys, run.engine, run.progress, run.dask_client)
        slim = rows is not None and len(gs_all) > ROW_BUDGET   # not written whole: only what later sections
        if slim:                                               # read is kept (SLIM_GS_COLUMNS)
            numel = first_rank(gs_all[[c for c in ("rank", "layer_id", "param", "numel") if c in gs_all.columns]])
            numel = numel.drop_duplicates(["layer_id", "param"])
        gl_all = pool_params(gs_all, drop=DROPPABLE if slim else ())   # their statistics freed as pooled
        if slim:
            gs_all = slim_grad_frame(gs_all)
            heap.trim()
    else:
        gs_all = run.grad_stats(layers=ids)
        ge_all = run.grad_stats(per="epoch", layers=ids)
        gl_all = run.grad_stats(by="layer", layers=ids)
    gs, ge, gl = first_rank(gs_all), first_rank(ge_all), first_rank(gl_all)
    numel = gs if numel is None else numel
    ws = run.weight_stats(layers=ids)
    ws1 = ws.drop_duplicates(["step", "layer_id", "param"], keep="first")
    if rows is None:
        fig = (gs, ge, gl, ws1)
    else:
        fge, fgs = grouped_epoch_stats(ge, numel, rows)
        fig = (fgs, fge, grouped_grad_stats(gl, rows), grouped_weight_stats(ws1, rows))
    return Frames(ids, all_layers, lt, steps, gs_all, ge_all, gl_all, ws, gs, ge, gl, ws1,
                  "rank" in gs_all.columns, layer_summary(lt, gl, ws1), rows, *fig, rows_note(rows), own)
