"""The gradient frames of a report of many layers, from narrow rows (issue 16: a report of 100,000 layers
within about 600 MB plus the data it must keep).

From :data:`analyzer.report.data.OWN_PASS_LAYERS` layers a report reads the gradient statistics with a pass
of its own and keeps, of the per-(step, parameter) frame, only the columns later sections read. Here that
pass reads the recorded statistics as narrow rows (:func:`analyzer.narrow_grads.read_rows`: a parameter
index per row instead of layer id, names and element count; integers int32 where they fit) and derives
from them, one statistic at a time, what :func:`analyzer.gradients.grad_pass`, :func:`~analyzer.gradients.
pool_params` and :func:`analyzer.report.data.slim_grad_frame` derive from the whole 14-column frame
(100,000 layers: 4 million rows, 448 MB): the per-epoch table, the per-(step, layer) table, the narrow
per-step frame (names as categoricals) and the element counts. The same rows, order and values, bit for
bit: the same pandas reductions over the same groups, integer sums exact in numpy.

Only for the traces where that pass reads nothing else (:func:`applies`): recorded gradient statistics of
one rank, no raw gradients, no parameter sharded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from .catalog import GRAD_KINDS
from .engine import epoch_lookup
from .gradients import GRAD_EPOCH_COLUMNS
from .narrow_grads import ALL_STATS, ParamTable, categorical, layer_runs, narrow, read_rows, run_reduce
from .progress import null_progress
from .stats import stats_from_sums
from .trace import format as fmt


def applies(catalog, keys: set) -> bool:
    """Whether the gradient pass over ``keys`` reads recorded statistics only, of one rank, none sharded."""
    return (not catalog.sharded and not catalog.shards_with(fmt.KIND_GRADS, keys)
            and len(catalog.ranks_with(GRAD_KINDS, keys)) <= 1)


def recorded_rows(catalog, keys: set) -> int:
    """Rows of recorded gradient statistics of ``keys`` in the catalogue's index (nothing is read)."""
    return sum(int(rows) for s in catalog.shards_with(fmt.KIND_GRAD_STATS, keys)
               for (k, lk, pk), (rows, _, _) in s.payloads.items() if k == fmt.KIND_GRAD_STATS and (lk, pk) in keys)


def report_frames(catalog, keys: set, progress: Callable = null_progress
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
    """(gs, ge, gl, numel) of a report's own gradient pass over ``keys``, where :func:`applies`:

    - gs: :func:`analyzer.report.data.slim_grad_frame` of ``grad_pass``'s per-step frame (the columns
      :data:`analyzer.report.data.SLIM_GS_COLUMNS`; layer and param categoricals of the sorted names);
    - ge: ``grad_pass``'s per-epoch table (:func:`analyzer.gradients.epoch_table`; no raw gradients: no noise);
    - gl: :func:`analyzer.gradients.pool_params` of the per-step frame;
    - numel: layer_id, param, numel of every parameter with rows (in order of first row).

    None where :func:`read_rows` gives nothing (no rows: the wide pass says what an empty run gives).
    ``progress``: a progress factory (:mod:`analyzer.progress`)."""
    got = read_rows(catalog, keys, ALL_STATS, progress)
    if got is None or not got[1]:
        return None
    pt, rows = got
    steps, epochs = catalog.step_epochs()
    ep = narrow(epoch_lookup(steps, epochs, rows["step"]))
    ge = _epoch_table(pt, rows, ep)
    del rows["abs_mean"]
    starts, gid = layer_runs(pt, rows)
    ep = ep[starts]            # the epochs of the per-(step, layer) rows only
    gl = _pooled(pt, rows, ep, starts, gid)
    del ep, starts, gid
    p = rows.pop("p")
    first = np.full(len(pt.lid), len(p), np.int64)
    np.minimum.at(first, p, np.arange(len(p)))   # each parameter's first row (no sort of the rows)
    q = np.flatnonzero(first < len(p))
    q = q[np.argsort(first[q], kind="stable")]
    del first
    numel = pd.DataFrame({"layer_id": pt.lid[q], "param": pt.param[q], "numel": pt.numel[q]})
    gs = pd.DataFrame({"step": rows.pop("step"), "layer_id": narrow(pt.lid[p]), "layer": categorical(pt.layer, p),
                       "param": categorical(pt.param, p), "count": rows.pop("count"),
                       "nonfinite": rows.pop("nonfinite"), "max_abs": rows.pop("max_abs")}, copy=False)
    return gs, ge, gl, numel


def _dense(code: np.ndarray) -> tuple[np.ndarray, int]:
    """(group number per row, groups) of non-negative int64 ``code``, numbered in sorted order of the codes."""
    span = int(code.max()) + 1
    if span <= 4 * len(code) + 1024:   # a table of the codes present: no sort of the rows
        seen = np.zeros(span, bool)
        seen[code] = True
        dense = np.cumsum(seen, dtype=np.int64) - 1
        return dense[code], int(dense[-1]) + 1
    uniq, ids = np.unique(code, return_inverse=True)
    return ids.astype(np.int64, copy=False), len(uniq)


def _epoch_table(pt: ParamTable, rows: dict, ep: np.ndarray) -> pd.DataFrame:
    """:func:`analyzer.gradients.epoch_table` of the rows (without noise): groups of (epoch, layer_id, param)
    in sorted order (the same group numbers as its :func:`~analyzer.gradients.group_code`, hence the same
    pandas means), n_steps, nonfinite summed, l2_var = the variance across the steps of l2 (ddof 0)."""
    p = rows["p"]
    e = ep.astype(np.int64)
    e -= e.min()
    e *= int(pt.rank.max()) + 1
    e += pt.rank[p]
    ids, n = _dense(e)
    del e
    out = {"epoch": np.empty(n, np.int64), "layer_id": None, "layer": None, "param": None}
    pg = np.empty(n, p.dtype)
    pg[ids] = p                     # one parameter per group
    out["epoch"][ids] = ep
    out["layer_id"], out["layer"], out["param"] = pt.lid[pg], pt.layer[pg], pt.param[pg]
    out["n_steps"] = np.bincount(ids, minlength=n).astype(np.int64)

    def red(values, how):
        return getattr(pd.Series(values, copy=False).groupby(ids, sort=True), how)().to_numpy()

    for c, how in (("mean", "mean"), ("abs_mean", "mean"), ("max_abs", "max"), ("var", "mean"), ("l1", "mean"),
                   ("l2", "mean")):
        out[c] = red(rows[c], how)
    out["l2_var"] = pd.Series(rows["l2"], copy=False).groupby(ids, sort=True).var(ddof=0).to_numpy()
    out["grad_noise"] = np.full(n, np.nan)
    nf = np.zeros(n, np.int64)
    np.add.at(nf, ids, rows["nonfinite"])   # integers: exact in any order
    out["nonfinite"] = nf
    return pd.DataFrame({c: out[c] for c in GRAD_EPOCH_COLUMNS})


def _zeroed(x: np.ndarray) -> np.ndarray:
    """A float64 copy of ``x`` with NaN read as 0 (``analyzer.gradients``' ``_moments``)."""
    return np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)


def _pooled(pt: ParamTable, rows: dict, ep: np.ndarray, starts: np.ndarray, gid: np.ndarray) -> pd.DataFrame:
    """:func:`analyzer.gradients.pool_params` of the rows (sorted by step, layer_id: its runs of rows ``starts``,
    ``gid`` of :func:`layer_runs`; ``ep``: the epoch of each run), the same sums of the same values (its
    ``_moments``), each row statistic freed once pooled."""

    def pooled(values: np.ndarray, how: str = "sum") -> np.ndarray:
        return run_reduce(values, starts, gid, how)

    p = rows["p"]
    names = pt.layer[p[starts]]
    out = {"step": rows["step"][starts].astype(np.int64), "epoch": ep.astype(np.int64),
           "layer_id": pt.lid[p[starts]], "layer": pd.array(names, dtype=pd.Series(names[:1]).dtype)}
    del names
    cnt = rows["count"]
    l1 = pooled(rows.pop("l1"))
    q = _zeroed(rows.pop("l2"))
    np.square(q, out=q)
    l2 = np.sqrt(pooled(q))
    del q                                      # each temporary let go of as soon as it is pooled
    s = _zeroed(rows["mean"])
    s *= cnt                                   # as zeroed(mean) * count, in place
    s = pooled(s)
    m = _zeroed(rows.pop("mean"))
    np.square(m, out=m)
    m += _zeroed(rows.pop("var"))
    m *= cnt
    sq = pooled(m)
    del m
    count = np.add.reduceat(cnt, starts, dtype=np.int64)   # integer sums: exact in any order
    st = stats_from_sums(count, s, sq, l1, None)
    del s, sq
    numel = pt.numel if not len(pt.numel) or pt.numel.max() > np.iinfo(np.int32).max else pt.numel.astype(np.int32)
    out.update(numel=np.add.reduceat(numel[p], starts, dtype=np.int64), count=count,
               nonfinite=np.add.reduceat(rows["nonfinite"], starts, dtype=np.int64), mean=st["mean"],
               abs_mean=st["abs_mean"], max_abs=pooled(rows["max_abs"], "max"), var=st["var"], l1=l1, l2=l2)
    return pd.DataFrame(out, copy=False)


def grouped_sums(gl: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame | None:
    """The sums of :func:`analyzer.report.data.grouped_grad_stats` (step, epoch, layer_id and layer of the group,
    numel, count, nonfinite, _s = sum mean * count, _sq = sum l2^2 and _l1 = sum l1 (rows with a count), max_abs),
    for a per-(step, layer) table ``gl`` sorted by (step, epoch, group): each row's group (the row of ``rows``
    of its layer) looked up, not merged in (a copy of gl: 100,000 layers, 208 MB), and the groups taken as
    runs of rows: the groups, their order and the pandas sums of a groupby of (step, epoch, layer_id, layer)
    after the merge, bit for bit (:func:`analyzer.narrow_grads.run_reduce`). None for any other ``gl`` (a layer
    outside ``rows``, rows not in that order, keys that are not integers)."""
    r = rows.drop_duplicates("layer_id").sort_values("layer_id")
    lids = r["layer_id"].to_numpy(np.int64)
    if not len(lids) or any(gl[c].dtype.kind not in "iu" for c in ("step", "epoch", "layer_id", "numel", "count",
                                                                    "nonfinite")):
        return None
    lid = gl["layer_id"].to_numpy(np.int64)
    pos = np.clip(np.searchsorted(lids, lid), 0, len(lids) - 1)
    if not (lids[pos] == lid).all():
        return None
    del lid
    step, epoch = gl["step"].to_numpy(), gl["epoch"].to_numpy()
    rid = r["row_id"].to_numpy(np.int64)[pos]
    new = np.r_[True, (step[1:] != step[:-1]) | (epoch[1:] != epoch[:-1]) | (rid[1:] != rid[:-1])]
    up = np.r_[True, (step[1:] > step[:-1]) | ((step[1:] == step[:-1]) & (
        (epoch[1:] > epoch[:-1]) | ((epoch[1:] == epoch[:-1]) & (rid[1:] > rid[:-1]))))]
    if not np.array_equal(up, new):   # a key that falls: not sorted
        return None
    del up
    starts = np.flatnonzero(new)
    gid = np.cumsum(new, dtype=np.int64) - 1
    del new
    out = pd.DataFrame({"step": step[starts], "epoch": epoch[starts], "layer_id": rid[starts],
                        "layer": pd.array(r["row"].to_numpy(object)[pos[starts]], dtype=rows["row"].dtype)})
    del pos, rid
    for c in ("numel", "count", "nonfinite"):   # integer sums: exact in any order
        out[c] = np.add.reduceat(gl[c].to_numpy(np.int64), starts)
    cnt = gl["count"].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        out["_s"] = run_reduce(np.where(cnt > 0, gl["mean"].to_numpy(np.float64) * cnt, 0.0), starts, gid)
        out["_sq"] = run_reduce(np.where(cnt > 0, gl["l2"].to_numpy(np.float64) ** 2, 0.0), starts, gid)
        out["_l1"] = run_reduce(np.where(cnt > 0, gl["l1"].to_numpy(np.float64), 0.0), starts, gid)
    out["max_abs"] = run_reduce(gl["max_abs"].to_numpy(np.float64), starts, gid, "max")
    return out
