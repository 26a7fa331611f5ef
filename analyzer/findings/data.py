"""The statistics tables the health rules read, each computed once and kept (out of core: one streaming
pass over the statistics payloads per table; never a raw gradient or activation sample).

| table | from | columns |
| --- | --- | --- |
| ``grads`` | ``grad_stats`` payloads only (the recorder's per-step sums; in a report, the report's own frame: :func:`grads_from_frame`) | step, layer_id, layer, param, numel, count, nonfinite, abs_mean, max_abs, l2, l1 (at least; any row order) |
| ``grad_layers`` | ``grads``, parameters of a layer pooled (in a report, its own: :func:`grad_layers_from_frame`) | step, layer_id, layer, nonfinite, abs_mean, max_abs, l2 |
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

from .. import heap
from ..activations import iter_merged_site_stats
from ..engine import grad_stat_columns, part_frame, recorded_part, shard_context
from ..gradients import sorted_runs
from ..narrow_grads import narrow_grad_tables
from ..slices import merge_grad_sums
from ..stats import stats_from_sums
from ..trace import format as fmt

GRAD_COLUMNS = ["step", "layer_id", "layer", "param", "numel", "count", "nonfinite", "abs_mean", "max_abs", "l2"]
#: the columns :func:`grad_stat_table` gives: l1 = sum |g| as well (what the layers' pooled abs_mean is from)
GRAD_TABLE_COLUMNS = GRAD_COLUMNS + ["l1"]
#: the columns of ``grads`` the rules read (the others are for :func:`grad_layer_table`, not needed where
#: ``grad_layers`` is adopted as well): a report of many layers hands over only these (issue 16)
GRAD_RULE_COLUMNS = ["step", "layer_id", "layer", "param", "count", "nonfinite", "max_abs"]
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
            for (k, lk, pk), (rows, _, _) in sh.payloads.items():   # stored (column) order: block reads
                if k != kind or not rows or (lk, pk) not in ctx.meta:
                    continue
                steps = np.asarray(r.read_payload_steps(k, lk, pk), np.int64)
                vec = np.asarray(r.read_payload(k, lk, pk, 0, rows), np.float64).reshape(rows, -1)
                if (lk, pk) in ctx.sharded:
                    sliced.setdefault((lk, pk), []).append((steps, vec))
                elif sh.rank == rank:   # batched: one part per 8192 parameters, not one each (H3)
                    batch.append((lk, pk, steps, vec))
                    if len(batch) >= 8192:
                        parts.append(_batch_part(batch, ctx))
                        batch = []
    if batch:
        parts.append(_batch_part(batch, ctx))
    for (lk, pk), items in sliced.items():
        meta = ctx.meta[(lk, pk)]
        steps, vec = merge_grad_sums(items, meta[3])
        parts.append(_grad_part(meta, steps, vec))
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=object if c in ("layer", "param") else "float64")
                             for c in GRAD_TABLE_COLUMNS})
    # sorted by (step, layer_id, param) as the report's frame is, one column at a time, each column's
    # pieces freed before the next (100,000 layers: 4 million rows, one copy of them at once; issue 16)
    return part_frame(parts, GRAD_TABLE_COLUMNS, False)


def grads_from_frame(catalog, gs: pd.DataFrame, ids) -> pd.DataFrame | None:
    """The ``grads`` table taken from a per-step :meth:`Run.grad_stats` frame ``gs`` of the layers ``ids``
    (the report's, read once), or None where that frame may hold other rows than
    :func:`grad_stat_table`: the trace has raw gradients (steps without ``grad_stats`` come from them), several
    ranks record gradient statistics, a parameter is sharded (FSDP2), or ``ids`` is not every layer. The same
    rows and values as :func:`grad_stat_table` (both from :func:`analyzer.engine.recorded_part`), in the same
    order (:func:`analyzer.engine.part_frame`'s) and with more columns: ``gs`` itself, not a copy (100,000
    layers: 4 million rows). The rules depend on neither order. ``gs`` may hold only the columns the rules read
    (:data:`GRAD_RULE_COLUMNS`: a report's slimmed frame) when ``grad_layers`` is adopted beside it."""
    kind = fmt.KIND_GRAD_STATS
    if (not catalog.shards_with(kind) or catalog.shards_with(fmt.KIND_GRADS) or len(catalog.ranks_with(kind)) > 1
            or catalog.sharded
            or "rank" in gs.columns or set(int(i) for i in ids) != {int(L["id"]) for L in catalog.layers}
            or not all(c in gs.columns for c in GRAD_RULE_COLUMNS)):
        return None
    return gs


def grad_layers_from_frame(catalog, gs: pd.DataFrame, gl: pd.DataFrame, ids) -> pd.DataFrame | None:
    """The ``grad_layers`` table taken from the report's per-(step, layer) frame ``gl`` (:meth:`Run.grad_stats`
    by="layer" of the layers ``ids``; ``gs`` its per-parameter frame), or None where ``gs`` could not stand
    for ``grads`` (:func:`grads_from_frame`). Both pool the same rows in the same order (``gs`` sorted by
    (step, layer_id, param)) with the same sums (count, nonfinite, numel, l1 = sum |g| add, max_abs is the
    maximum, l2 = sqrt(sum l2^2), abs_mean = l1 / count): the same numbers as :func:`grad_layer_table`, bit
    for bit, without a second 2-million-row table at 100,000 layers (issue 16)."""
    if grads_from_frame(catalog, gs, ids) is None or "rank" in gl.columns \
            or not all(c in gl.columns for c in GRAD_LAYER_COLUMNS):
        return None
    return gl


def _batch_part(batch: list, ctx) -> dict:
    d = recorded_part(batch, ctx, 0)
    return {c: d[c] for c in GRAD_TABLE_COLUMNS}


def _grad_part(meta, steps, vec) -> dict:
    lid, lname, pname, numel = meta
    st = grad_stat_columns(vec, numel)
    return {"step": steps, "layer_id": lid, "layer": lname, "param": pname, "numel": numel,
            **{c: st[c] for c in ("count", "nonfinite", "abs_mean", "max_abs", "l2", "l1")}}


GRAD_LAYER_COLUMNS = ["step", "layer_id", "layer", "numel", "count", "nonfinite", "abs_mean", "max_abs", "l2"]


def grad_layer_table(grads: pd.DataFrame) -> pd.DataFrame:
    """``grads`` with the parameters of each layer pooled, as :func:`analyzer.gradients.pool_params` pools
    them (numel, count, nonfinite and l1 (its column, else abs_mean x count) add, max_abs is the maximum,
    l2 = sqrt(sum l2^2),
    abs_mean = sum l1 / sum count), from only the columns the rules need (no copy of the whole table).
    Columns: :data:`GRAD_LAYER_COLUMNS`, sorted by (step, layer_id)."""
    if not len(grads):
        return grads[GRAD_LAYER_COLUMNS].copy()
    count = grads["count"].to_numpy()
    d = pd.DataFrame({"step": grads["step"].to_numpy(), "layer_id": grads["layer_id"].to_numpy(),
                      "numel": grads["numel"].to_numpy(), "count": count,
                      "nonfinite": grads["nonfinite"].to_numpy(), "max_abs": grads["max_abs"].to_numpy(),
                      "l1": grads["l1"].to_numpy() if "l1" in grads.columns else grads["abs_mean"].to_numpy() * count,
                      "_l2sq": grads["l2"].fillna(0).to_numpy() ** 2},
                     copy=False)   # views of grads' columns: a dict is copied by default
    # grouped by the integer keys only (a layer's name follows its id): the names are looked up per layer
    # afterwards, not carried through the groupby per row (100,000 layers: 4 million rows; issue 16); a
    # table sorted by (step, layer_id) (the report's, grad_stat_table's) by its runs of rows: one integer
    # per row instead of two keys grouped, the same groups in the same order, hence the same sums
    runs = sorted_runs(grads, ["step", "layer_id"])
    aggs = dict(numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"),
                max_abs=("max_abs", "max"), l1=("l1", "sum"), _l2sq=("_l2sq", "sum"))
    if runs is None:
        out = d.groupby(["step", "layer_id"], sort=True).agg(**aggs).reset_index()
    else:
        starts, lens = runs
        out = d.drop(columns=["step", "layer_id"]).groupby(np.repeat(np.arange(len(starts)), lens),
                                                           sort=False).agg(**aggs).reset_index(drop=True)
        out.insert(0, "layer_id", d["layer_id"].to_numpy()[starts])
        out.insert(0, "step", d["step"].to_numpy()[starts])
    del d
    ids, first = np.unique(grads["layer_id"].to_numpy(), return_index=True)
    names = grads["layer"].to_numpy()[first]
    out["layer"] = pd.array(names[np.searchsorted(ids, out["layer_id"].to_numpy())], dtype=grads["layer"].dtype)
    out["abs_mean"] = stats_from_sums(out["count"].to_numpy(), sum_abs=out["l1"].to_numpy())["abs_mean"]
    out["l2"] = np.sqrt(out["_l2sq"])
    return out[GRAD_LAYER_COLUMNS]


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
    d = d.sort_values(["step", "layer_id"], kind="stable")      # a layer's rows at a snapshot: contiguous
    st, lid = d["step"].to_numpy(), d["layer_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (st[1:] != st[:-1]) | (lid[1:] != lid[:-1])])
    out = d.iloc[starts][["step", "layer_id", "layer"]].reset_index(drop=True)
    for c in ("_dw2", "_p2"):      # NaN where any parameter's is
        out[c] = strict_row_sums(d[c].to_numpy(np.float64), starts)
    out["gap"] = np.fmax.reduceat(d["gap"].to_numpy(np.float64), starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
        out["step_ratio"] = out["update_ratio"] / out["gap"]
    return out[cols]


def strict_row_sums(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of the runs ``x[starts[k]:starts[k + 1]]`` (the last to the end), NaN where a run holds a NaN;
    each run summed as a row of a (runs, length) array, bit for bit ``pd.Series(run).sum(min_count=len(run))``."""
    n = np.diff(np.r_[starts, len(x)])
    out = np.empty(len(starts))
    for k in np.unique(n).tolist():
        sel = n == k
        out[sel] = x[starts[sel, None] + np.arange(k)].sum(axis=1)
    return out


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

    @property
    def computed(self) -> set:
        """Names of the tables computed (or adopted) so far."""
        return {k for k in self._t if isinstance(k, str)}

    def adopt(self, name: str, table: pd.DataFrame) -> None:
        """Keep ``table`` as the table ``name`` (e.g. ``grads`` from :func:`grads_from_frame`: the report's
        frames reused instead of a second pass over the shards). Only before the table was first used."""
        if name in self._t:
            raise ValueError(f"table {name!r} is already computed")
        self._t[name] = table

    def forget(self, *names: str) -> None:
        """Let go of the tables ``names`` (computed or adopted; absent ones are ignored): computed again on
        next use. A report of many layers hands its frames back this way once its findings are written."""
        if "grad_layers" in names and "l2" not in getattr(self._t.get("grads"), "columns", ("l2",)):
            names += ("grads",)   # a narrow grads table (only the rules' columns) cannot give grad_layers again
        for n in names:
            self._t.pop(n, None)
        if "grad_layers" in names:   # what the rules derived from it (the per-layer outliers: 100,000 layers, ~80 MB)
            for k in [k for k in self._t if isinstance(k, tuple) and k[:1] == ("grad_outliers",)]:
                del self._t[k]

    def forget_derived(self) -> None:
        """Let go of the derived tables kept by :meth:`memo` (computed again on next use)."""
        for k in [k for k in self._t if not isinstance(k, str)]:
            del self._t[k]

    def _get(self, name: str, make) -> pd.DataFrame:
        if name not in self._t:
            self._t[name] = make()
        return self._t[name]

    @property
    def grads(self) -> pd.DataFrame:
        self._narrow_grads()
        return self._get("grads", lambda: grad_stat_table(self.run.catalog))

    @property
    def grad_layers(self) -> pd.DataFrame:
        self._narrow_grads()
        return self._get("grad_layers", lambda: grad_layer_table(self.grads))

    def _narrow_grads(self) -> None:
        """From :data:`analyzer.heap.MANY_LAYERS` layers, ``grads`` and ``grad_layers`` read together and narrow
        (:func:`analyzer.narrow_grads.narrow_grad_tables`: the same rows and values; ``grads`` with only the
        columns the rules read), unless either is already there (issue 16: 100,000 layers)."""
        if "grads" in self._t or "grad_layers" in self._t or len(self.run.catalog.layers) < heap.MANY_LAYERS:
            return
        got = narrow_grad_tables(self.run.catalog)
        if got is not None:
            self._t["grads"], self._t["grad_layers"] = got

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
