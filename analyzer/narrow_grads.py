"""The health rules' gradient tables of a run of many layers, read narrow (issue 16: the memory of
reading 100,000 layers).

:func:`analyzer.findings.data.grad_stat_table` gathers the recorded gradient statistics of every
(step, parameter) in a table of eleven 8-byte columns (100,000 layers: 4 million rows, 352 MB) and
:func:`~analyzer.findings.data.grad_layer_table` pools it per (step, layer). Here the same rows are
read with one 4-byte parameter index per row in place of the layer id, names and element count
(looked up per parameter), integers narrowed to int32 where they fit, and only the statistics the two
tables need (count, nonfinite, max_abs, l1, l2^2); the per-layer table is pooled from them a column at
a time, and the per-parameter table keeps only :data:`analyzer.findings.data.GRAD_RULE_COLUMNS`
(what the rules read), its names as categoricals. The same rows, order and values as the two functions,
bit for bit (the same pandas sums over the same groups); only the dtypes and the columns kept differ.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from . import heap
from .engine import grad_stat_columns, shard_context
from .progress import null_progress
from .stats import stats_from_sums
from .trace import format as fmt

#: parameters per batch of rows turned into columns at once (as :func:`analyzer.findings.data.grad_stat_table`)
BATCH = 8192
_I32 = np.iinfo(np.int32)


def narrow(a: np.ndarray) -> np.ndarray:
    """``a`` (integers) as int32 when every value fits, else as it is."""
    if a.dtype.kind in "iu" and a.dtype.itemsize > 4 and (not len(a) or (_I32.min <= a.min() and a.max() <= _I32.max)):
        return a.astype(np.int32)
    return a


class ParamTable:
    """Per parameter of a run (the order of ``catalog.all_param_keys()``): layer id (int64), layer name,
    parameter name (object arrays), element count (int64), and ``rank``: the position of (layer id,
    parameter name) in sorted order (names as ``pandas.factorize(sort=True)`` orders them, missing last),
    so that sorting rows by (step, rank) sorts them by (step, layer_id, param) as
    :func:`analyzer.engine.part_frame` does."""

    def __init__(self, ctx):
        self.keys = list(ctx.meta)
        self.index = {k: i for i, k in enumerate(self.keys)}
        meta = [ctx.meta[k] for k in self.keys]
        self.lid = np.fromiter((m[0] for m in meta), np.int64, len(meta))
        self.layer = np.array([m[1] for m in meta] + [None], object)[:-1]   # never a 2-d array of characters
        self.param = np.array([m[2] for m in meta] + [None], object)[:-1]
        self.numel = np.fromiter((m[3] for m in meta), np.int64, len(meta))
        codes = pd.factorize(self.param, sort=True)[0] if len(meta) else np.zeros(0, np.int64)
        codes = np.where(codes < 0, codes.max(initial=-1) + 1, codes)
        order = np.lexsort([codes, self.lid])
        key = np.stack([self.lid[order], codes[order]]) if len(order) else np.zeros((2, 0), np.int64)
        new = np.r_[True, (key[:, 1:] != key[:, :-1]).any(axis=0)] if len(order) else np.zeros(0, bool)
        self.rank = np.empty(len(meta), np.int64)
        self.rank[order] = np.cumsum(new) - 1


#: the statistics :func:`read_rows` keeps per row: those of the rules' tables (``l2sq``: l2^2, 0 where l2 is
#: NaN, as ``fillna(0) ** 2``), or every statistic of :func:`analyzer.engine.grad_stat_columns` (the report's)
RULE_STATS = ("count", "nonfinite", "max_abs", "l1", "l2sq")
ALL_STATS = ("count", "nonfinite", "mean", "abs_mean", "max_abs", "var", "l1", "l2")


def read_rows(catalog, keys: set | None = None, stats: tuple = RULE_STATS, progress: Callable = null_progress
              ) -> tuple[ParamTable, dict[str, np.ndarray]] | None:
    """The recorded gradient statistics rows of :func:`analyzer.findings.data.grad_stat_table` (the lowest
    rank that holds them; ``keys``: only these (layer_key, param_key)), sorted as it sorts them (step,
    layer_id, param; stable), as narrow columns: p (parameter index into the :class:`ParamTable`), step,
    then ``stats`` (:data:`RULE_STATS` or :data:`ALL_STATS`; count and nonfinite int32 where they fit).
    The catalogue's open shard files are closed once read; ``progress``: a progress factory
    (:mod:`analyzer.progress`), one step per shard. None where a parameter is sharded (FSDP2: its
    slices are merged across ranks by the wide path)."""
    if catalog.sharded:
        return None
    kind = fmt.KIND_GRAD_STATS
    ctx = shard_context(catalog)
    pt = ParamTable(ctx)
    rank = catalog.lowest_rank(kind, None if keys is None else set(keys))
    cols = ("p", "step") + tuple(stats)
    pieces: dict[str, list] = {c: [] for c in cols}
    batch: list = []
    want = ctx.meta if keys is None else {k for k in keys if k in ctx.meta}

    def flush():
        lens = np.fromiter((len(b[1]) for b in batch), np.int64, len(batch))
        p = np.repeat(np.fromiter((b[0] for b in batch), np.int32, len(batch)), lens)
        steps = np.concatenate([b[1] for b in batch])
        st = grad_stat_columns(np.concatenate([b[2] for b in batch]), pt.numel[p])
        batch.clear()
        if "l2sq" in stats:
            l2 = st.pop("l2")
            l2[np.isnan(l2)] = 0.0   # as fillna(0)
            st["l2sq"] = l2 ** 2
        st.update(p=p, step=narrow(steps), count=narrow(st["count"]), nonfinite=narrow(st["nonfinite"]))
        for c in cols:
            pieces[c].append(st[c])

    shards = [sh for sh in catalog.shards_with(kind) if sh.rank == rank]
    with progress(f"reading {kind}", len(shards)) as bar:
        for sh in shards:
            with catalog.open_shard(sh) as r:
                for (k, lk, pk), (rows, _, _) in sh.payloads.items():   # stored (column) order: block reads
                    if k != kind or not rows or (lk, pk) not in want:
                        continue
                    steps = np.asarray(r.read_payload_steps(k, lk, pk), np.int64)
                    vec = np.asarray(r.read_payload(k, lk, pk, 0, rows), np.float64).reshape(rows, -1)
                    batch.append((pt.index[(lk, pk)], steps, vec))
                    if len(batch) >= BATCH:
                        flush()
            bar.update(1)
    if batch:
        flush()
    catalog.close()   # the shard views and their caches go before the rows are sorted and pooled
    heap.trim()
    if not pieces["p"]:
        return pt, {}

    def column(c):   # one column's pieces joined and freed at a time
        v = pieces.pop(c)
        out = np.concatenate(v)
        v.clear()
        return out

    p, step = column("p"), column("step")
    order = np.lexsort([pt.rank[p], step])     # stable, as part_frame's lexsort of (step, layer_id, param)
    out = {"p": p[order], "step": step[order]}
    del p, step
    for c in cols[2:]:
        out[c] = column(c)[order]
    del order
    heap.trim()
    return pt, out


def layer_runs(pt: ParamTable, rows: dict) -> tuple[np.ndarray, np.ndarray]:
    """(first row, group number per row) of the runs of equal (step, layer_id) of sorted ``rows``."""
    lid = pt.lid[rows["p"]]
    step = rows["step"]
    new = np.ones(len(lid), bool)
    new[1:] = (lid[1:] != lid[:-1]) | (step[1:] != step[:-1])
    del lid
    starts = np.flatnonzero(new)
    gid = np.cumsum(new, dtype=np.int64 if len(starts) >= 1 << 31 else np.int32)
    gid -= 1
    return starts, gid


def _reduceat_like_pandas() -> bool:
    """Whether pandas reduces runs of sorted group numbers without NaN with ``ufunc.reduceat`` (pandas >= 3.1),
    told on a probe whose sum that way (left to right: 0.0) differs from a compensated sum (2.0)."""
    if "reduceat" not in _PROBE:
        v = np.array([1e16, 1.0, 1.0, -1e16, 5.0])
        got = pd.Series(v).groupby(np.array([0, 0, 0, 0, 1]), sort=False).sum().to_numpy()
        _PROBE["reduceat"] = bool(np.array_equal(got, np.add.reduceat(v, np.array([0, 4]))))
    return _PROBE["reduceat"]


_PROBE: dict = {}


def run_reduce(values: np.ndarray, starts: np.ndarray, gid: np.ndarray, how: str = "sum") -> np.ndarray:
    """``pd.Series(values).groupby(gid, sort=False).<how>()`` (how: "sum" or "max") of rows sorted by their group
    (``gid``: 0, 0, 1, ...; ``starts``: each group's first row), bit for bit: where pandas would reduce them
    with ``ufunc.reduceat`` itself (float64 without NaN, :func:`_reduceat_like_pandas`), numpy's, without the
    pandas grouper's temporaries (100,000 layers: about 120 MB per column); else pandas'."""
    if values.dtype == np.float64 and _reduceat_like_pandas() and not np.isnan(values).any():
        return (np.add if how == "sum" else np.maximum).reduceat(values, starts)
    return getattr(pd.Series(values, copy=False).groupby(gid, sort=False), how)().to_numpy()


def narrow_grad_tables(catalog) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(``grads``, ``grad_layers``) of :class:`analyzer.findings.data.Tables`: the rows and values of
    :func:`~analyzer.findings.data.grad_stat_table` (only the columns
    :data:`~analyzer.findings.data.GRAD_RULE_COLUMNS`; step, layer_id, count and nonfinite int32 where every
    value fits, layer and param categoricals) and of :func:`~analyzer.findings.data.grad_layer_table` of it
    (the same columns and dtypes),
    read narrow (see the module docstring). None where :func:`read_rows` is."""
    from .findings.data import GRAD_LAYER_COLUMNS, GRAD_RULE_COLUMNS
    got = read_rows(catalog)
    if got is None:
        return None
    pt, rows = got
    if not rows:
        return None
    starts, gid = layer_runs(pt, rows)

    def pooled(values: np.ndarray, how: str = "sum") -> np.ndarray:   # the sums of grad_layer_table's groupby
        return run_reduce(values, starts, gid, how)

    p = rows["p"]
    gl = {"step": rows["step"][starts].astype(np.int64), "layer_id": pt.lid[p[starts]]}
    names = pt.layer[p[starts]]
    # integer sums are exact in any order: numpy's, without a pandas grouper per column
    gl["numel"] = np.add.reduceat(pt.numel[p], starts, dtype=np.int64)
    gl["count"] = np.add.reduceat(rows["count"], starts, dtype=np.int64)
    gl["nonfinite"] = np.add.reduceat(rows["nonfinite"], starts, dtype=np.int64)
    gl["max_abs"] = pooled(rows["max_abs"], "max")
    l1 = pooled(rows.pop("l1"))
    l2 = np.sqrt(pooled(rows.pop("l2sq")))
    del gid
    gl["abs_mean"] = stats_from_sums(gl["count"], sum_abs=l1)["abs_mean"]
    gl["l2"] = l2
    del l1, l2
    gl["layer"] = pd.array(names, dtype=pd.Series(names[:1]).dtype)   # as pandas reads an array of names
    del names
    grads = pd.DataFrame({"step": rows.pop("step"), "layer_id": narrow(pt.lid[p]), "layer": categorical(pt.layer, p),
                          "param": categorical(pt.param, p), "count": rows.pop("count"),
                          "nonfinite": rows.pop("nonfinite"), "max_abs": rows.pop("max_abs")}, copy=False)
    del p, rows
    return grads[GRAD_RULE_COLUMNS], pd.DataFrame({c: gl[c] for c in GRAD_LAYER_COLUMNS}, copy=False)


def categorical(names: np.ndarray, p: np.ndarray) -> pd.Categorical:
    """``names[p]`` (per-parameter names, one row per entry of ``p``) as a categorical of the sorted distinct
    names: 4 bytes or less per row instead of a pointer to a string (100,000 layers: 4 million rows)."""
    codes, cats = pd.factorize(names, sort=True)
    codes = codes.astype(np.int32 if len(cats) >= 1 << 15 else np.int16)
    return pd.Categorical.from_codes(codes[p], categories=cats)
