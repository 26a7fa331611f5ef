"""The statistics tables the health rules read, each computed once and kept (out of core: one streaming
pass over the statistics payloads per table; never a raw gradient or activation sample).

| table | from | columns |
| --- | --- | --- |
| ``grads`` | ``grad_stats`` payloads only (the recorder's per-step sums) | step, layer_id, layer, param, numel, count, nonfinite, abs_mean, max_abs, l2 |
| ``grad_layers`` | ``grads``, parameters of a layer pooled | step, layer_id, layer, nonfinite, abs_mean, max_abs, l2 |
| ``weights`` | :meth:`Run.weight_stats` (weight snapshots, read once per run) | step, layer_id, layer, param, l2, update_ratio, gap, step_ratio, nonfinite |
| ``weight_layers`` | ``weights``, parameters of a layer pooled | step, layer_id, layer, update_ratio, gap, step_ratio |
| ``acts`` | per-unit activation statistics (``act_stats``), units pooled | step, site, kind, family, order, count, mean, rms, std, abs_mean, max_abs, zero, nonfinite |
| ``loss`` | the step table | step, loss |

``step_ratio`` = update_ratio / gap: the update ratio per optimizer step between snapshots ``gap``
steps apart (exact when each step moves the weights by the same amount in the same direction).
Site ``std`` is the mean over units of each unit's standard deviation (so a constant per-unit offset
is no spread); ``rms`` = sqrt(E h^2) over every value of the site; ``zero``: every value was 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..activations import iter_merged_site_stats
from ..engine import grad_stat_columns, recorded_part, shard_context
from ..gradients import pool_params
from ..slices import merge_grad_sums
from ..trace import format as fmt

GRAD_COLUMNS = ["step", "layer_id", "layer", "param", "numel", "count", "nonfinite", "abs_mean", "max_abs", "l2"]
ACT_COLUMNS = ["step", "site", "kind", "family", "order", "count", "mean", "rms", "std", "abs_mean", "max_abs",
               "zero", "nonfinite"]
WEIGHT_COLUMNS = ["step", "layer_id", "layer", "param", "l2", "update_ratio", "gap", "step_ratio", "nonfinite"]


def grad_stat_table(catalog) -> pd.DataFrame:
    """Per (step, layer, param) gradient statistics from the recorded ``grad_stats`` payloads only (the
    lowest rank that holds them; FSDP2 slices merged per step). Raw gradients are never read."""
    kind = fmt.KIND_GRAD_STATS
    ctx = shard_context(catalog)
    rank = catalog.lowest_rank(kind)
    parts, sliced, batch = [], {}, []
    for sh in catalog.shards_with(kind):
        if sh.rank != rank and not any(k[0] == kind and (k[1], k[2]) in ctx.sharded for k in sh.payloads):
            continue
        with catalog.open_shard(sh) as r:
            for (k, lk, pk), (rows, _, _) in sorted(sh.payloads.items()):
                if k != kind or not rows or (lk, pk) not in ctx.meta:
                    continue
                steps = np.asarray(r.read_payload_steps(k, lk, pk), np.int64)
                vec = np.asarray(r.read_payload(k, lk, pk, 0, rows), np.float64).reshape(rows, -1)
                if (lk, pk) in ctx.sharded:
                    sliced.setdefault((lk, pk), []).append((steps, vec))
                elif sh.rank == rank:   # batched: one frame per 8192 parameters, not one each (H3)
                    batch.append((lk, pk, steps, vec))
                    if len(batch) >= 8192:
                        parts.append(_batch_frame(batch, ctx))
                        batch = []
    if batch:
        parts.append(_batch_frame(batch, ctx))
    for (lk, pk), items in sliced.items():
        meta = ctx.meta[(lk, pk)]
        steps, vec = merge_grad_sums(items, meta[3])
        parts.append(_grad_part(meta, steps, vec))
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=object if c in ("layer", "param") else "float64")
                             for c in GRAD_COLUMNS})
    df = pd.concat(parts, ignore_index=True)[GRAD_COLUMNS]
    return df.sort_values(["layer_id", "param", "step"], kind="stable").reset_index(drop=True)


def _batch_frame(batch: list, ctx) -> pd.DataFrame:
    d = recorded_part(batch, ctx, 0)
    return pd.DataFrame({c: d[c] for c in GRAD_COLUMNS})


def _grad_part(meta, steps, vec) -> pd.DataFrame:
    lid, lname, pname, numel = meta
    st = grad_stat_columns(vec, numel)
    return pd.DataFrame({"step": steps, "layer_id": lid, "layer": lname, "param": pname, "numel": numel,
                         **{c: st[c] for c in ("count", "nonfinite", "abs_mean", "max_abs", "l2")}})


def grad_layer_table(grads: pd.DataFrame) -> pd.DataFrame:
    """``grads`` with the parameters of each layer pooled (see :func:`analyzer.gradients.pool_params`)."""
    if not len(grads):
        return grads.drop(columns=["param"])
    # the rules need no signed mean or variance: zeros keep pool_params' l1, l2, max_abs and counts exact
    out = pool_params(grads.assign(epoch=0, mean=0.0, var=0.0, l1=grads["abs_mean"] * grads["count"]))
    return out[["step", "layer_id", "layer", "numel", "count", "nonfinite", "abs_mean", "max_abs", "l2"]]


def weight_table(ws: pd.DataFrame) -> pd.DataFrame:
    """The ``weights`` table from :meth:`Run.weight_stats` rows (lowest rank where several recorded)."""
    if "rank" in ws.columns and len(ws):
        ws = ws[ws["rank"] == ws["rank"].min()]
    d = ws.sort_values(["layer_id", "param", "step"], kind="stable").copy()
    d["gap"] = d.groupby(["layer_id", "param"], sort=False)["step"].diff()
    with np.errstate(invalid="ignore", divide="ignore"):
        d["step_ratio"] = d["update_ratio"] / d["gap"]
    return d.reindex(columns=WEIGHT_COLUMNS).reset_index(drop=True)


def weight_layer_table(w: pd.DataFrame) -> pd.DataFrame:
    """Update ratios of whole layers from the ``weights`` table: sqrt(sum_p ||dw_p||^2) / sqrt(sum_p
    ||w_prev,p||^2) over the layer's parameters (``||dw_p|| = update_ratio_p * ||w_prev,p||``), with
    gap and step_ratio as there. Columns: step, layer_id, layer, update_ratio, gap, step_ratio."""
    cols = ["step", "layer_id", "layer", "update_ratio", "gap", "step_ratio"]
    if not len(w):
        return pd.DataFrame({c: [] for c in cols})
    d = w.copy()
    prev = d.groupby(["layer_id", "param"], sort=False)["l2"].shift(1)
    d["_dw2"] = (d["update_ratio"] * prev) ** 2
    d["_p2"] = prev ** 2
    g = d.groupby(["step", "layer_id", "layer"], sort=True)
    out = g.agg(_dw2=("_dw2", lambda v: v.sum(min_count=len(v))), _p2=("_p2", lambda v: v.sum(min_count=len(v))),
                gap=("gap", "max")).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
        out["step_ratio"] = out["update_ratio"] / out["gap"]
    return out[cols]


def act_table(run) -> pd.DataFrame:
    """Per (step, site) activation statistics with the units pooled (see the module docstring).
    ``order``: the site's position in the run's site table (the order of the forward)."""
    frames = []
    for order, S in enumerate(run.catalog.sites):
        need = ("count", "nonfinite", "sum", "sum_abs", "sumsq", "min", "max")
        if any(s not in S["stats"] for s in need):
            continue
        for st, d in iter_merged_site_stats(run, S, stats=need):
            n = d["count"].astype(np.float64)                            # values per unit, (k,)
            U = d["sum"].shape[1] if d["sum"].ndim == 2 else 1
            s, sa, sq = (d[x].reshape(len(st), -1) for x in ("sum", "sum_abs", "sumsq"))
            with np.errstate(invalid="ignore", divide="ignore"):
                mu = s / n[:, None]
                unit_std = np.sqrt(np.maximum(sq / n[:, None] - mu ** 2, 0.0))
                tot = n * U
                mn, mx = d["min"].reshape(len(st), -1), d["max"].reshape(len(st), -1)
                frames.append(pd.DataFrame({
                    "step": st.astype(np.int64), "site": S["name"], "kind": S["kind"], "family": S.get("family"),
                    "order": order, "count": tot, "mean": s.sum(1) / tot, "rms": np.sqrt(sq.sum(1) / tot),
                    "std": unit_std.mean(1), "abs_mean": sa.sum(1) / tot,
                    "max_abs": np.maximum(np.abs(mn).max(1), np.abs(mx).max(1)),
                    "zero": (mn.min(1) == 0) & (mx.max(1) == 0),
                    "nonfinite": np.asarray(d["nonfinite"], np.float64).reshape(len(st), -1).sum(1)}))
    if not frames:
        return pd.DataFrame({c: [] for c in ACT_COLUMNS})
    return pd.concat(frames, ignore_index=True)[ACT_COLUMNS]


class Tables:
    """The tables of one run, computed on first use and kept: re-evaluating the rules at other
    thresholds reads nothing again. ``run``: an :class:`analyzer.run.Run`."""

    def __init__(self, run: Any):
        self.run = run
        self._t: dict[str, pd.DataFrame] = {}

    def has(self, kind: str) -> bool:
        """Whether the trace holds payloads of ``kind`` (a ``trace.format.KIND_*``)."""
        return bool(self.run.catalog.shards_with(kind))

    def _get(self, name: str, make) -> pd.DataFrame:
        if name not in self._t:
            self._t[name] = make()
        return self._t[name]

    @property
    def grads(self) -> pd.DataFrame:
        return self._get("grads", lambda: grad_stat_table(self.run.catalog))

    @property
    def grad_layers(self) -> pd.DataFrame:
        return self._get("grad_layers", lambda: grad_layer_table(self.grads))

    @property
    def weights(self) -> pd.DataFrame:
        return self._get("weights", lambda: weight_table(self.run.weight_stats()))

    @property
    def weight_layers(self) -> pd.DataFrame:
        return self._get("weight_layers", lambda: weight_layer_table(self.weights))

    @property
    def acts(self) -> pd.DataFrame:
        return self._get("acts", lambda: act_table(self.run))

    @property
    def loss(self) -> pd.DataFrame:
        return self._get("loss", lambda: self.run.steps[["step", "loss"]])

    def memo(self, key: tuple, make) -> Any:
        """A derived table (e.g. dead units at given thresholds) kept under ``key``."""
        return self._get(key, make)
