"""Gradient statistics of a run: the per-step pass over the shards, the per-epoch table, and
per-layer pooling. Torch-free; reads the run only through its :class:`~analyzer.catalog.Catalog`.

The formulas of the statistics from sufficient statistics are :func:`analyzer.stats.stats_from_sums`
(re-exported here): per step, count, sum, sum of squares, sum |g| and max |g| add (or take the max)
across pieces, parameters and ranks; means and variances follow from them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from .catalog import GRAD_KINDS, Catalog
from .engine import grad_shard, grad_stat_columns, map_shards, part_frame, shard_context, split_pass, typed
from .progress import null_progress
from .slices import merge_grad_sums, noise_sums
from .stats import ElementwiseMoments, stats_from_sums
from .trace import format as fmt

__all__ = ["GRAD_STEP_COLUMNS", "GRAD_EPOCH_COLUMNS", "grad_pass", "epoch_table", "pool_params",
           "stats_from_sums", "float16_losses"]

GRAD_STEP_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "numel", "count", "nonfinite",
                     "mean", "abs_mean", "max_abs", "var", "l1", "l2"]
GRAD_EPOCH_COLUMNS = ["epoch", "layer_id", "layer", "param", "n_steps", "mean", "abs_mean", "max_abs",
                      "var", "l1", "l2", "l2_var", "grad_noise", "nonfinite"]


def grad_pass(catalog: Catalog, keys: set, engine: str, progress: Callable, client=None
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One pass over the gradient payloads of ``keys`` ((layer_key, param_key) pairs).

    Args:
        catalog: the run's catalogue. engine: "local" or "dask" (see :mod:`analyzer.engine`).
        progress: progress factory (see :mod:`analyzer.progress`). client: dask client or None.

    Returns:
        (per-step table, per-epoch table): the frames of ``Run.grad_stats(per="step")`` and
        ``Run.grad_stats(per="epoch")``.
    """
    multi_rank = len(catalog.ranks_with(GRAD_KINDS, set(keys) - catalog.sharded)) > 1
    ctx = shard_context(catalog)

    def part(group, first):   # the first group (this process) shows the progress
        return _grad_parts(catalog, group, ctx, engine, progress if first else null_progress, client)

    # groups of parameters on the CPUs available (each parameter's rows and noise in one group)
    parts: list[dict] = []
    noise_out: dict[tuple, Any] = {}
    for gparts, gnoise in split_pass(catalog, GRAD_KINDS, set(keys), part, engine):
        parts += gparts
        noise_out.update(gnoise)
    df = part_frame(parts, GRAD_STEP_COLUMNS, multi_rank)
    return df, epoch_table(catalog, df, noise_out, multi_rank)


def _grad_parts(catalog: Catalog, keys: set, ctx, engine: str, progress: Callable, client=None
                ) -> tuple[list[dict], dict]:
    """The per-step parts and the element-wise noise ((rank, layer_key, param_key, epoch) -> value)
    of the gradient pass over ``keys`` (see :func:`grad_pass`)."""
    parts: list[dict] = []
    noise: dict[tuple, ElementwiseMoments] = {}
    noise_out: dict[tuple, Any] = {}
    sums: dict[tuple, list] = {}
    # sharded parameters (FSDP2): one merged row per step, whichever ranks recorded the slices
    merged_rank = catalog.lowest_rank(GRAD_KINDS)
    shards = catalog.shards_with(GRAD_KINDS, keys)

    def finish(k):   # a slice's noise stays a pair of sums until the slices are merged
        acc = noise.pop(k)
        noise_out[k] = noise_sums(acc) if k[1:3] in ctx.sharded else acc.compute()

    for shard, (sparts, snoise, ssums) in zip(shards, map_shards(
            engine, grad_shard, [(sh, keys, ctx) for sh in shards], progress, f"reading {fmt.KIND_GRADS}",
            client)):
        parts += sparts
        for lk, pk, steps, vec in ssums:
            sums.setdefault((lk, pk), []).append((steps, vec))
        for (lk, pk, e), acc in sorted(snoise.items(), key=lambda kv: kv[0][2]):
            key = (shard.rank, lk, pk, e)
            old = noise.get(key)
            if old is None:
                # epochs arrive in order per (rank, param): finish older accumulators now
                for k in [k for k in noise if k[:3] == key[:3]]:
                    finish(k)
                noise[key] = acc
            else:
                old.merge(acc)
    for k in list(noise):
        finish(k)
    for (lk, pk), items in sums.items():
        lid, lname, pname, numel = ctx.meta[(lk, pk)]
        steps, vec = merge_grad_sums(items, numel)
        d = {"step": steps, "epoch": ctx.epoch_of(steps), "layer_id": np.full(len(steps), lid), "layer": lname,
             "param": pname, "numel": numel, "rank": merged_rank}
        parts.append(dict(d, **grad_stat_columns(vec, numel)))
    merged: dict[tuple, list] = {}
    for k in [k for k in noise_out if k[1:3] in ctx.sharded]:
        merged.setdefault((merged_rank, *k[1:]), []).append(noise_out.pop(k))
    for k, pairs in merged.items():
        n = sum(c for _, c in pairs)
        noise_out[k] = sum(x for x, _ in pairs) / n if n else np.nan
    return parts, noise_out


def epoch_table(catalog: Catalog, df: pd.DataFrame, noise: dict, multi_rank: bool) -> pd.DataFrame:
    """Per (epoch, layer, param) rows from the per-step table ``df`` and the element-wise noise
    (``noise``: (rank, layer_key, param_key, epoch) -> mean element variance across the epoch's steps)."""
    keys = (["rank"] if multi_rank else []) + ["epoch", "layer_id", "layer", "param"]
    if not len(df):
        return pd.DataFrame({c: [] for c in keys + GRAD_EPOCH_COLUMNS[4:]})
    code = group_code(df, keys[:-2] + ["param"])   # a layer's name follows its id: not a key
    g = df.groupby(code if code is not None else keys, sort=True)
    firsts = {c: (c, "first") for c in keys} if code is not None else {}
    out = g.agg(**firsts, n_steps=("step", "size"), mean=("mean", "mean"), abs_mean=("abs_mean", "mean"),
                max_abs=("max_abs", "max"), var=("var", "mean"), l1=("l1", "mean"), l2=("l2", "mean"),
                nonfinite=("nonfinite", "sum"))
    out = out.reset_index(drop=code is not None)
    out["l2_var"] = g["l2"].var(ddof=0).to_numpy()   # = np.nanvar per group, NaN when all NaN (vectorised: H3)
    del g, code
    lk_of = {L["id"]: L["key"] for L in catalog.layers}
    pk_of = {(L["id"], catalog.param_name(L["key"], q["key"])): q["key"] for L in catalog.layers
             for q in L["params"]}
    gn = []
    low = catalog.lowest_rank(GRAD_KINDS) if noise else 0
    for row in (out.itertuples(index=False) if noise else ()):   # no raw gradients: no noise (H3)
        rank = row.rank if multi_rank else low
        gn.append(noise.get((rank, lk_of[row.layer_id], pk_of[(row.layer_id, row.param)], int(row.epoch)),
                            np.nan))
    out["grad_noise"] = gn if noise else np.nan
    cols = (["rank"] if multi_rank else []) + GRAD_EPOCH_COLUMNS
    return typed(out[cols], {"epoch": "int64", "layer_id": "int64", "n_steps": "int64", "nonfinite": "int64"})


def group_code(df: pd.DataFrame, keys: list[str]) -> np.ndarray | None:
    """One int64 per row of ``df`` that numbers its groups of ``keys`` in their sorted order (each
    key's sorted distinct values, combined): grouping by it gives the groups, their order and their
    sums of grouping by the keys, without hashing string keys per (row, key). None when a key is
    missing somewhere (a groupby drops those rows) or the combination would not fit in int64."""
    code = np.zeros(len(df), np.int64)
    span = 1
    for c in keys:
        v = df[c].to_numpy()
        if v.dtype.kind in "iu":
            lo, hi = (int(v.min()), int(v.max())) if len(v) else (0, 0)
            k, n = v.astype(np.int64) - lo, hi - lo + 1
        else:
            k, uniq = pd.factorize(v, sort=True)
            n = len(uniq)
            if (k < 0).any():
                return None
        span *= max(1, n)
        if span >= 1 << 62:
            return None
        code *= max(1, n)
        code += k
        del k
    return code


def pool_params(df: pd.DataFrame, drop: tuple = ()) -> pd.DataFrame:
    """Pool per-parameter gradient rows into per-layer rows (same step): counts and sums add,
    l2 = sqrt(sum l2^2), max_abs = max, mean and var pooled exactly from the parts' moments
    (sums recovered from each part's count, mean and var; then :func:`stats_from_sums`).

    A table sorted by its keys (as :meth:`Run.grad_stats` gives it) is grouped by its runs of rows
    (:func:`sorted_runs`: one integer per row, no copy of the table's columns; 100,000 layers:
    4 million rows), any other order by its keys; the same pandas sums either way.

    ``drop``: columns among :data:`DROPPABLE` deleted from ``df`` itself (in place) as soon as their sums
    are taken: a caller's own frame that it keeps without them (the report of 100,000 layers: 160 MB
    fewer at once); the result is the same."""
    if drop and not set(drop) <= set(DROPPABLE):
        raise ValueError(f"pool_params drops only {DROPPABLE}, not {drop!r}")
    if not len(df):
        return df.iloc[:0].drop(columns=["param"]).copy()
    keys = [c for c in ("rank", "step", "epoch", "layer_id", "layer") if c in df.columns]
    # the groups are those of the integer keys (a layer's name follows its id), the name taken
    # from the group's first row
    ints = [c for c in keys if c != "layer"]
    runs = sorted_runs(df, ints) if "layer_id" in ints and (
        "layer" not in keys or not df["layer"].isna().any()) else None
    if runs is not None:
        out = {c: pd.array(df[c].to_numpy()[runs[0]], dtype=df[c].dtype) for c in keys}
        sums = _pool_runs(df, *runs, drop=tuple(drop))
    else:
        g = _pool_groupby(df, keys, ints)
        sums = {c: g[c].to_numpy() for c in _POOLED}
        out = {c: g[c] for c in keys}
        del g
        for c in drop:
            del df[c]
    st = stats_from_sums(sums["count"], sums["_s"], sums["_q"], sums["l1"], sums["max_abs"])
    out.update(numel=sums["numel"], count=sums["count"], nonfinite=sums["nonfinite"], mean=st["mean"],
               abs_mean=st["abs_mean"], max_abs=sums["max_abs"], var=st["var"], l1=sums["l1"],
               l2=np.sqrt(sums["_l2sq"]))
    return pd.DataFrame(out, copy=False)   # the columns as computed, not copied into blocks


#: the sums of :func:`pool_params` (per group)
_POOLED = ("numel", "count", "nonfinite", "_s", "_q", "max_abs", "l1", "_l2sq")
#: the columns :func:`pool_params` may delete from its input as it goes (``drop``)
DROPPABLE = ("abs_mean", "l1", "mean", "var", "l2")


def _moments(df: pd.DataFrame, only: str | None = None) -> dict[str, np.ndarray] | np.ndarray:
    """Per row: _s = sum x, _q = sum x^2 (from count, mean, var), _l2sq = l2^2; NaN read as 0 (as
    ``fillna(0)``); temporaries bounded to a few columns (100,000 layers: 32 MB each). ``only``: that
    one of the three (the same values), alone."""
    cnt = df["count"].to_numpy()

    def zeroed(c):
        return np.nan_to_num(df[c].to_numpy(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)

    out = {}
    if only in (None, "_s"):
        out["_s"] = zeroed("mean") * cnt
    if only in (None, "_q"):
        m = zeroed("mean")
        np.square(m, out=m)
        m += zeroed("var")    # var + mean^2 (addition is commutative, bit for bit)
        m *= cnt
        out["_q"] = m
    if only in (None, "_l2sq"):
        q = zeroed("l2")
        np.square(q, out=q)
        out["_l2sq"] = q
    return out if only is None else out[only]


def _pool_groupby(df: pd.DataFrame, keys: list[str], ints: list[str]) -> pd.DataFrame:
    d = df[ints + ["numel", "count", "nonfinite", "max_abs", "l1"]].assign(**_moments(df))
    aggs = dict(numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"),
                _s=("_s", "sum"), _q=("_q", "sum"), max_abs=("max_abs", "max"), l1=("l1", "sum"),
                _l2sq=("_l2sq", "sum"))
    if "layer" in keys and "layer_id" in keys:
        d = d.assign(layer=df["layer"])
        return d.groupby(ints, sort=True).agg(layer=("layer", "first"), **aggs).reset_index()
    return d.groupby(keys, sort=True).agg(**aggs).reset_index()


def sorted_runs(df: pd.DataFrame, ints: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(first row, rows) of each run of equal ``ints`` when ``df`` is sorted by them (ascending,
    lexicographic; every run then a whole group); None otherwise."""
    n = len(df)
    same = np.ones(n - 1, bool)
    for c in ints:
        v = df[c].to_numpy()
        if v.dtype.kind not in "iub":
            return None
        a, b = v[1:], v[:-1]
        if (same & (a < b)).any():
            return None
        same &= a == b
    starts = np.flatnonzero(np.r_[True, ~same])
    return starts, np.diff(np.r_[starts, n])


def _pool_runs(df: pd.DataFrame, starts: np.ndarray, lens: np.ndarray, drop: tuple = ()) -> dict[str, np.ndarray]:
    """The sums :data:`_POOLED` of :func:`_pool_groupby` over the runs of rows of a sorted table: the
    same pandas sums (bit for bit) grouped by one integer run number, a column at a time, without a copy
    of the table; ``drop``: see :func:`pool_params` (the columns it may drop are pooled first). (Not in
    pieces of rows: pandas' sums of a piece's groups may differ from the whole table's in the last bit.)"""
    gid = np.repeat(np.arange(len(starts), dtype=np.int32 if len(starts) < 1 << 31 else np.int64), lens)

    def pooled(values: np.ndarray, how: str) -> np.ndarray:
        return getattr(pd.Series(values, copy=False).groupby(gid, sort=False), how)().to_numpy()

    if "abs_mean" in drop:
        del df["abs_mean"]
    res: dict[str, np.ndarray] = {}
    # pandas sums each column alone either way: the same sums; the columns ``drop`` lets go of first, each
    # deleted once pooled (100,000 layers: the table shrinks while the sums grow; one temporary at a time)
    for c, used in (("l1", ("l1",)), ("_l2sq", ("l2",)), ("_s", ()), ("_q", ("mean", "var")),
                    ("numel", ()), ("count", ()), ("nonfinite", ()), ("max_abs", ())):
        res[c] = pooled(_moments(df, c) if c.startswith("_") else df[c].to_numpy(), "max" if c == "max_abs" else "sum")
        for u in used:
            if u in drop:
                del df[u]
    return res


def float16_losses(catalog: Catalog) -> dict:
    """Raw values lost to float16 storage (``grad_dtype`` / ``weight_dtype`` ``"float16"``), summed over
    the closed shards of every rank from their optional root attributes (``format.CAST_COUNT_ATTRS``).

    Returns:
        {kind ("grads" / "weights"): {"underflow": non-zero values stored as 0, "overflow": finite
        values stored as inf, "shards": shards that counted}}, only the kinds some shard counted:
        {} for float32 storage or a trace written before the counts existed.

    Raises:
        TraceError: a count attribute that is not a non-negative integer.
    """
    out: dict = {}
    for shard in catalog.shards:
        with catalog.open_shard(shard) as r:
            attrs = dict(r.attrs)
        for kind, names in fmt.CAST_COUNT_ATTRS.items():
            if not any(a in attrs for a in names):
                continue
            e = out.setdefault(kind, {"underflow": 0, "overflow": 0, "shards": 0})
            for field, a in zip(("underflow", "overflow"), names):
                v = attrs.get(a, 0)
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
                    raise fmt.TraceError(f"corrupt shard {shard.name}: attribute {a} is not a count ({str(v)[:40]})")
                e[field] += int(v)
            e["shards"] += 1
    return out
