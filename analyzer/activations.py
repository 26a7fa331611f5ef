"""Activation analyses from recorded per-unit statistics and raw samples (torch-free).

Every threshold is an analysis-time parameter: the trace holds, per step and unit, count, sum,
sum |h|, sum h^2, min, max, count(h > 0) and (bounded activations) a fixed-edge histogram, so a new
threshold is a new call, not a new training run.

Definitions (per unit i of a site, over the selected steps):
    active_fraction = sum count(h > 0) / sum count         (at threshold 0; exact)
    strict dead     = max h <= threshold                     (max_active_fraction = 0; exact at any threshold)
                      or active_fraction <= max_active_fraction (threshold 0 only)
    APoZ            = 1 - active_fraction (fraction of values <= 0); dead if APoZ >= threshold
    dormant score   = s_i = E|h_i| / mean_k E|h_k|  (Sokar et al. 2023); dead if s_i <= threshold
A NaN statistic (NaN activations) never makes a unit dead; NaN values count as not active (not > 0).

Tables keep their dtypes when empty (step, epoch, unit, count, nonfinite: int64), so that a site
without recorded steps, or a step range that holds none, gives an empty table of the usual shape.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import numpy as np
import pandas as pd

from .trace import format as fmt
from .trace.format import TraceError

PER_UNIT = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")
CRITERIA = ("strict", "apoz", "dormant")


# --------------------------------------------------------------------------- selection and reading

def site_table(run) -> pd.DataFrame:
    """One row per activation site: name, key, kind, family, source, module, units, unit_axis."""
    cols = ["name", "key", "kind", "family", "source", "module", "units", "unit_axis"]
    return pd.DataFrame([{c: S.get(c) for c in cols} for S in run.catalog.sites], columns=cols)


def select_sites(run, spec: Any = None) -> list[dict]:
    """Sites for a specification: None (all), exact names, globs over names, kinds ("relu",
    "sigmoid", ...), families ("relu", "bounded"), or a comma-separated string of those."""
    sites = run.catalog.sites
    if spec is None:
        return list(sites)
    items = []
    for it in (spec if isinstance(spec, (list, tuple)) else [spec]):
        items.extend(s.strip() for s in str(it).split(",") if s.strip())
    out, seen = [], set()
    for it in items:
        hit = [S for S in sites if S["name"] == it] or \
              ([S for S in sites if fnmatch.fnmatchcase(S["name"], it)] if any(c in it for c in "*?[") else []) or \
              [S for S in sites if S["kind"] == it or S.get("family") == it or S.get("module") == it]
        if not hit:
            known = ", ".join(repr(S["name"]) for S in sites[:6]) or "none recorded"
            raise TraceError(f"unknown activation site {it!r} (known: {known})")
        for S in hit:
            if S["key"] not in seen:
                seen.add(S["key"])
                out.append(S)
    return out


def select_site(run, spec: Any) -> dict:
    s = select_sites(run, spec)
    if len(s) != 1:
        raise TraceError(f"{spec!r} selects {len(s)} activation sites; name exactly one")
    return s[0]


def _steps_filter(steps_arg):
    if steps_arg is None:
        return lambda s: np.ones(len(s), bool)
    if isinstance(steps_arg, tuple) and len(steps_arg) == 2:
        a, b = steps_arg
        return lambda s: (s >= (a if a is not None else -np.inf)) & (s < (b if b is not None else np.inf))
    want = np.asarray(sorted(int(x) for x in steps_arg), np.int64)
    return lambda s: np.isin(s, want)


def iter_site_stats(run, site: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None, rank=None):
    """Yield ``(steps (k,), {stat: array (k, ...)}, rank)`` shard by shard for one site: every shard of
    the lowest rank in step order, then those of the next rank (each rank records its own
    activations under torch.distributed). ``rank``: only that rank's shards. Per-rank rows: use
    :func:`iter_merged_site_stats` for statistics summed over ranks."""
    keep = _steps_filter(steps)
    want = [s for s in stats if s in site["stats"]]
    shards = [sh for sh in run.catalog.shards if (fmt.KIND_ACT_STATS, site["key"], want[0]) in sh.payloads
              and (rank is None or sh.rank == rank)]
    shards.sort(key=lambda sh: (sh.rank, sh.index))
    for sh in shards:
        with run.catalog.open_shard(sh) as r:
            st = r.read_payload_steps(fmt.KIND_ACT_STATS, site["key"], want[0])
            m = keep(st)
            if not m.any():
                continue
            out = {}
            for s in want:
                if (fmt.KIND_ACT_STATS, site["key"], s) not in sh.payloads:
                    raise TraceError(f"corrupt shard {sh.name}: site {site['name']} lacks {s!r}")
                rows = sh.payloads[(fmt.KIND_ACT_STATS, site["key"], s)][0]
                if rows != len(st):
                    raise TraceError(f"corrupt shard {sh.name}: site {site['name']} {s!r} has {rows} rows, "
                                     f"expected {len(st)}")
                out[s] = np.asarray(r.read_payload(fmt.KIND_ACT_STATS, site["key"], s, 0, rows), np.float64)[m]
            yield st[m], out, sh.rank


def _site_ranks(run, site: dict, stat: str) -> list[int]:
    return sorted({sh.rank for sh in run.catalog.shards if (fmt.KIND_ACT_STATS, site["key"], stat) in sh.payloads})


def _combine(out: dict, idx: np.ndarray, d: dict) -> None:
    """Add one rank's rows ``d`` (unique steps) into the merged rows ``out[idx]``: minima of ``min``,
    maxima of ``max``, sums of everything else (counts, sums, n_pos, histograms)."""
    for s, v in d.items():
        if s == "min":
            out[s][idx] = np.minimum(out[s][idx], v)   # NaN propagates, as on the device
        elif s == "max":
            out[s][idx] = np.maximum(out[s][idx], v)
        else:
            out[s][idx] += v


def iter_merged_site_stats(run, site: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None):
    """Yield ``(steps (k,), {stat: array (k, ...)})`` for one site in increasing step order, each step's
    statistics merged over every rank that recorded it (torch.distributed: each rank records its own
    samples): counts, sums, sums of squares, n_pos and histograms add, min of the minima, max of the
    maxima. Streams: holds at most about one shard's rows per rank."""
    want = [s for s in stats if s in site["stats"]]
    ranks = _site_ranks(run, site, want[0]) if want else []
    if len(ranks) <= 1:
        for st, d, _ in iter_site_stats(run, site, stats, steps):
            yield st, d
        return
    gens = {r: iter_site_stats(run, site, stats, steps, rank=r) for r in ranks}
    buf: dict[int, list] = {r: [] for r in ranks}    # per rank: [(steps, d)] not yet merged
    while gens or any(buf.values()):
        for r in list(gens):                        # every open rank holds at least one block
            if not buf[r]:
                nxt = next(gens[r], None)
                if nxt is None:
                    del gens[r]
                else:
                    buf[r].append(nxt[:2])
        if not any(buf.values()):
            break
        # steps up to the smallest "last buffered step" of the open ranks are complete on every rank
        upto = min((buf[r][-1][0][-1] for r in gens if buf[r]), default=np.iinfo(np.int64).max)
        parts = []
        for r in ranks:
            keep_r = []
            for st, d in buf[r]:
                m = st <= upto
                if m.all():
                    parts.append((st, d))
                elif m.any():
                    parts.append((st[m], {s: v[m] for s, v in d.items()}))
                    keep_r.append((st[~m], {s: v[~m] for s, v in d.items()}))
                else:
                    keep_r.append((st, d))
            buf[r] = keep_r
        if not parts:
            continue
        allst = np.unique(np.concatenate([st for st, _ in parts]))
        out = {}
        for s, v in parts[0][1].items():
            init = np.inf if s == "min" else (-np.inf if s == "max" else 0.0)
            out[s] = np.full((len(allst),) + v.shape[1:], init, np.float64)
        for st, d in parts:
            _combine(out, np.searchsorted(allst, st), d)
        yield allst, out


def samples(run, site: Any, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw activation samples of one site: ``(steps (n,), values (n, *sample_shape))``, one row per
    sample (several rows per recorded step). Loads the selected steps into memory. ``site``: a
    specification or a site record (a dict of ``run.catalog.sites``)."""
    S = site if isinstance(site, dict) and "key" in site else select_site(run, site)
    keep = _steps_filter(steps)
    st_all, vals = [], []
    for sh in sorted(run.catalog.shards, key=lambda sh: (sh.rank, sh.index)):
        key = (fmt.KIND_ACTIVATIONS, S["key"], "samples")
        if key not in sh.payloads:
            continue
        with run.catalog.open_shard(sh) as r:
            st = r.read_payload_steps(*key)
            m = keep(st)
            if m.any():
                v = r.read_payload(*key, 0, len(st))
                st_all.append(st[m])
                vals.append(np.asarray(v)[m])
    if not st_all:
        return np.zeros(0, np.int64), np.zeros((0, *S["sample_shape"]), np.float32)
    return np.concatenate(st_all), np.concatenate(vals)


# --------------------------------------------------------------------------- statistics tables

STAT_COLUMNS = ["count", "mean", "abs_mean", "std", "min", "max", "frac_active", "apoz", "nonfinite"]
_INT_COLUMNS = {"step": "int64", "epoch": "int64", "unit": "int64", "count": "int64", "nonfinite": "int64"}


def _empty(cols, types: dict) -> pd.DataFrame:
    """An empty table with the columns' proper dtypes (int columns stay int, bools stay bool)."""
    return pd.DataFrame({c: pd.Series([], dtype=types.get(c, "float64" if c not in ("site", "kind") else object))
                         for c in cols})


def _unit_frame(site, steps, epochs, cols: dict) -> pd.DataFrame:
    k, U = len(epochs), site["units"]
    d = {}
    if steps is not None:
        d["step"] = np.repeat(np.asarray(steps, np.int64), U)
    d.update({"epoch": np.repeat(np.asarray(epochs, np.int64), U), "site": site["name"], "kind": site["kind"],
              "unit": np.tile(np.arange(U, dtype=np.int64), k)})
    for c, v in cols.items():
        d[c] = np.asarray(v).reshape(-1) if np.ndim(v) == 2 else np.repeat(v, U)
    return pd.DataFrame(d)


def _stats_frame(S, steps, epochs, d) -> pd.DataFrame:
    n = d["count"][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = d["sum"] / n
        var = np.maximum(d["sumsq"] / n - mean ** 2, 0.0)
        fa = d["n_pos"] / n
        abs_mean = d["sum_abs"] / n
    return _unit_frame(S, steps, epochs, {"count": d["count"].astype(np.int64), "mean": mean,
                                          "abs_mean": abs_mean, "std": np.sqrt(var), "min": d["min"],
                                          "max": d["max"], "frac_active": fa, "apoz": 1.0 - fa,
                                          "nonfinite": d["nonfinite"].astype(np.int64)})


def _pool(d: dict, m=None) -> dict:
    """The statistics of the rows ``m`` of one block pooled into one row (sums add; min, max)."""
    g = (lambda a: a) if m is None else (lambda a: a[m])
    out = {s: g(d[s]).sum(0) for s in ("count", "nonfinite", "sum", "sum_abs", "sumsq", "n_pos")}
    out["min"] = g(d["min"]).min(0)   # NaN propagates, as on the device
    out["max"] = g(d["max"]).max(0)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = {s: a[s] + b[s] for s in ("count", "nonfinite", "sum", "sum_abs", "sumsq", "n_pos")}
    out["min"] = np.minimum(a["min"], b["min"])
    out["max"] = np.maximum(a["max"], b["max"])
    return out


def _site_blocks(run, S: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None, by_rank: bool = False):
    """``(steps, {stat: rows}, rank)`` blocks of one site: merged over ranks (rank None) unless ``by_rank``."""
    if by_rank:
        yield from iter_site_stats(run, S, stats, steps)
    else:
        for st, d in iter_merged_site_stats(run, S, stats, steps):
            yield st, d, None


def activation_stats(run, per: str = "step", sites: Any = None, steps=None, by_rank: bool = False) -> pd.DataFrame:
    """Per-unit activation statistics.

    Returns one row per (step, site, unit) (``per="step"``) or per (epoch, site, unit) (``per="epoch"``,
    pooled over every recorded step of the epoch, however the steps are split into shards) with:
    count (values per unit), mean, abs_mean (E|h|), std (population), min, max, frac_active
    (fraction of values > 0), apoz (= 1 - frac_active: the fraction at or below 0; NaN values count
    here too), nonfinite (NaN/Inf values of the whole site at that step or epoch, repeated per
    unit). NaN and Inf values enter the sums as they are (a NaN makes that unit's mean, min, ... NaN).

    Several ranks (torch.distributed, each rank records its own samples): each step's row pools
    every rank's values (counts and sums add, min of minima, max of maxima), unless ``by_rank``
    (``per="step"`` only): then one row per (rank, step, site, unit) with a leading ``rank`` column.
    """
    if per not in ("step", "epoch"):
        raise ValueError(f"per must be 'step' or 'epoch', not {per!r}")
    frames = []
    ranks: set = set()
    for S in select_sites(run, sites):
        pooled: dict = {}
        for st, d, rank in _site_blocks(run, S, steps=steps, by_rank=by_rank and per == "step"):
            ranks.add(rank)
            ep = run.catalog.epoch_of(st)
            if per == "step":
                f = _stats_frame(S, st, ep, d)
                f["rank"] = rank
                frames.append(f)
                continue
            for e in np.unique(ep):   # an epoch pools every rank's values
                part = _pool(d, ep == e)
                pooled[int(e)] = part if int(e) not in pooled else _merge(pooled[int(e)], part)
        for e in sorted(pooled):
            frames.append(_stats_frame(S, None, np.array([e]), {k: np.asarray(v)[None] for k, v in pooled[e].items()}))
    multi = per == "step" and len(ranks) > 1
    cols = (["rank"] if multi else []) + (["step"] if per == "step" else []) + ["epoch", "site", "kind", "unit"] \
        + STAT_COLUMNS
    if not frames:
        return _empty(cols, _INT_COLUMNS)
    df = pd.concat(frames, ignore_index=True)[cols]
    if per == "epoch":
        df = df.sort_values(["epoch"], kind="stable").reset_index(drop=True)
    return df


# --------------------------------------------------------------------------- dead units

def _number(name, v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {v!r}") from None


def _check_criterion(criterion, threshold, max_active_fraction):
    """Validated ``(threshold, max_active_fraction)`` as floats; ValueError for anything unusable."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    threshold = _number("threshold", threshold)
    max_active_fraction = _number("max_active_fraction", max_active_fraction)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, not {threshold!r}")
    if not 0.0 <= max_active_fraction <= 1.0:
        raise ValueError(f"max_active_fraction must be in [0, 1], not {max_active_fraction!r}")
    if criterion == "apoz" and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"an APoZ threshold is a fraction in [0, 1], not {threshold!r}")
    if criterion == "dormant" and threshold < 0:
        raise ValueError(f"a dormant threshold is >= 0, not {threshold!r}")
    if criterion == "strict" and max_active_fraction > 0 and threshold != 0:
        raise ValueError("strict with max_active_fraction > 0 is exact only at threshold 0 (the trace "
                         "counts values > 0); use max_active_fraction=0 (never above threshold, exact "
                         "at any threshold) or threshold=0")
    return threshold, max_active_fraction


def _judge(criterion, threshold, maf, n, npos, sabs, mx):
    """``(active_fraction, score, dead)`` from pooled statistics: arrays (..., U); ``n`` broadcasts.

    A NaN statistic (a NaN was seen) never makes a unit dead: there is no evidence that it is.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        af = npos / n
        if criterion == "strict":
            score = mx
            dead = (mx <= threshold) if maf == 0 else (af <= maf)
        elif criterion == "apoz":
            score = 1.0 - af
            dead = score >= threshold
        else:  # Sokar et al.: s_i = E|h_i| / mean_k E|h_k|
            e = np.broadcast_to(sabs / n, np.shape(sabs))
            ok = ~np.isnan(e)
            k = ok.sum(-1, keepdims=True)
            layer = np.where(k > 0, np.where(ok, e, 0.0).sum(-1, keepdims=True) / np.maximum(k, 1), np.nan)
            # a layer whose every unit is exactly zero: every unit is dormant (score 0)
            score = np.where(layer == 0, np.where(e == 0, 0.0, np.nan), e / layer)
            dead = score <= threshold
    return af, score, np.asarray(dead, bool)


def _dead_now(criterion, threshold, maf, d):
    """Per-row (step) dead mask (k, U) from one block of statistics."""
    return _judge(criterion, threshold, maf, d["count"][:, None], d["n_pos"], d["sum_abs"], d["max"])[2]


DEAD_COLUMNS = ["site", "kind", "unit", "active_fraction", "max", "score", "dead", "died_at", "dead_fraction",
                "flagged"]


def dead_units(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
               steps=None, sites: Any = None, layer_share: float = 0.5) -> pd.DataFrame:
    """Dead (or dormant) units per site, at an analysis-time threshold.

    Args:
        criterion: "strict" (active = value > threshold; dead if never active over the steps, i.e.
            max <= threshold; or, with max_active_fraction > 0 at threshold 0, dead if
            active_fraction <= max_active_fraction), "apoz" (dead if the fraction of values <= 0 is
            >= threshold), "dormant" (Sokar et al. 2023: dead if s_i = E|h_i| / mean_k E|h_k| <= threshold,
            E over every value of the steps, the mean over the site's units).
        threshold, max_active_fraction: see criterion (ValueError if out of range).
        steps: None (all), a (start, stop) half-open range, or an iterable of steps.
        sites: site specification (see :func:`select_sites`).
        layer_share: a site is flagged when more than this share of its units are dead.

    Returns:
        One row per (site, unit): site, kind, unit, active_fraction (values > 0, over the steps),
        max (largest value seen), score (the criterion's: max, APoZ or dormant score), dead (bool),
        died_at (first recorded step from which the unit was dead, under the same criterion applied
        to each step alone, at every recorded step to the end of ``steps``; NaN if it was alive at the
        last one), dead_fraction and flagged (per site, repeated). ``dead`` judges the whole range:
        a unit that died half-way has a died_at but is dead only over ``steps=(died_at, None)``.
        Statistics that are NaN (NaN activations) never make a unit dead. Sites without recorded
        steps in ``steps`` have no rows. With several ranks every judgement (per step and pooled)
        uses the statistics of every rank's values at that step (see :func:`iter_merged_site_stats`).
    """
    threshold, max_active_fraction = _check_criterion(criterion, threshold, max_active_fraction)
    layer_share = _number("layer_share", layer_share)
    if not 0.0 <= layer_share <= 1.0:
        raise ValueError(f"layer_share must be in [0, 1], not {layer_share!r}")
    out = []
    for S in select_sites(run, sites):
        U = S["units"]
        n = 0.0
        npos = np.zeros(U)
        sabs = np.zeros(U)
        mx = np.full(U, -np.inf)
        last_alive = np.full(U, np.iinfo(np.int64).min)   # last step at which the unit was alive
        all_steps: set = set()
        for st, d in iter_merged_site_stats(run, S, steps=steps):
            dead_now = _dead_now(criterion, threshold, max_active_fraction, d)
            all_steps.update(st.tolist())
            alive = np.where(~dead_now, st[:, None], np.iinfo(np.int64).min)
            if len(st):
                last_alive = np.maximum(last_alive, alive.max(0))
            n += d["count"].sum()
            npos += d["n_pos"].sum(0)
            sabs += d["sum_abs"].sum(0)
            mx = np.maximum(mx, d["max"].max(0))   # NaN propagates: see _judge
        if not all_steps:
            continue
        af, score, dead = _judge(criterion, threshold, max_active_fraction, n, npos, sabs, mx)
        recorded = np.asarray(sorted(all_steps), np.int64)
        idx = np.searchsorted(recorded, last_alive, side="right")   # first recorded step after it
        died = np.full(U, np.nan)
        ok = idx < len(recorded)
        died[ok] = recorded[idx[ok]].astype(np.float64)
        frac = float(dead.mean()) if U else 0.0
        out.append(pd.DataFrame({"site": S["name"], "kind": S["kind"], "unit": np.arange(U, dtype=np.int64),
                                 "active_fraction": af, "max": mx, "score": score, "dead": dead,
                                 "died_at": died, "dead_fraction": frac, "flagged": frac > layer_share}))
    if not out:
        df = _empty(DEAD_COLUMNS, {"unit": "int64", "dead": "bool", "flagged": "bool"})
    else:
        df = pd.concat(out, ignore_index=True)[DEAD_COLUMNS]
    df.attrs.update(criterion=criterion, threshold=threshold, max_active_fraction=max_active_fraction,
                    layer_share=layer_share)
    return df


def dead_per_step(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
                  steps=None, sites: Any = None, by_rank: bool = False) -> pd.DataFrame:
    """Fraction of each site's units dead *at each step* (the per-step criterion): step, site, dead_fraction.
    Also per unit with :func:`dead_mask`. Several ranks: judged on every rank's values at that step,
    unless ``by_rank`` (then per rank, with a leading ``rank`` column)."""
    threshold, max_active_fraction = _check_criterion(criterion, threshold, max_active_fraction)
    rows = []
    ranks: set = set()
    for S in select_sites(run, sites):
        for st, d, rank in _site_blocks(run, S, steps=steps, by_rank=by_rank):
            ranks.add(rank)
            dn = _dead_now(criterion, threshold, max_active_fraction, d)
            rows.append(pd.DataFrame({"rank": rank, "step": st.astype(np.int64), "site": S["name"],
                                      "dead_fraction": dn.mean(1)}))
    cols = (["rank"] if len(ranks) > 1 else []) + ["step", "site", "dead_fraction"]
    if not rows:
        return _empty(cols, {"step": "int64"})
    return pd.concat(rows, ignore_index=True)[cols]


def dead_mask(run, site: Any, criterion: str = "strict", threshold: float = 0.0,
              max_active_fraction: float = 0.0, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Unit x step raster of one site: ``(steps (k,), dead (k, U) bool)`` under the per-step criterion
    (several ranks: on every rank's values at that step)."""
    threshold, max_active_fraction = _check_criterion(criterion, threshold, max_active_fraction)
    S = select_site(run, site)
    st_all, masks = [], []
    for st, d in iter_merged_site_stats(run, S, steps=steps):
        st_all.append(st)
        masks.append(_dead_now(criterion, threshold, max_active_fraction, d))
    if not st_all:
        return np.zeros(0, np.int64), np.zeros((0, S["units"]), bool)
    return np.concatenate(st_all), np.concatenate(masks)


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


def saturation(run, delta: float = 0.03, steps=None, sites: Any = None, per_unit: bool = False,
               by_rank: bool = False) -> pd.DataFrame:
    """Fraction of saturated values per (step, site[, unit]).

    By kind: sigmoid, hardtanh, relu6: a < lo + delta or a > hi - delta, with the kind's bounds
    [lo, hi] (sigmoid [0, 1]; hardtanh its min_val/max_val; relu6 [0, 6]); ``delta`` is in value
    units; tanh: |a| > 1 - delta; softmax: the row's largest probability > 1 - delta (one value per
    row, so softmax rows have no unit even with ``per_unit``: <NA>); ReLU family (relu, leaky_relu,
    elu, gelu, silu, softplus): the fraction at or below zero (``delta`` does not apply:
    ``delta_used`` is NaN). Bounded kinds are read from the fixed-edge histograms recorded every
    step: ``delta`` is rounded down to a bin edge (``delta_used``; the default 200 bins give steps of
    0.005 for sigmoid, 0.01 for tanh, 0.03 for relu6); NaN values count in no bin.
    Sites of other kinds (plain module outputs) are not included. The site's fraction pools its
    units (saturated values / values). Several ranks: over every rank's values at that step, unless
    ``by_rank`` (then per rank, with a leading ``rank`` column).
    """
    delta = _number("delta", delta)
    if not 0.0 <= delta < 0.5:
        raise ValueError(f"delta must be in [0, 0.5), not {delta!r}")
    rows = []
    ranks: set = set()
    for S in select_sites(run, sites):
        fam = S.get("family")
        if fam == "bounded" and (S.get("hist_edges") is None or "hist" not in S["stats"]):
            continue
        if fam not in ("relu", "bounded"):
            continue
        need = ("count", "n_pos") if fam == "relu" else ("count", "hist")
        for st, d, rank in _site_blocks(run, S, stats=need, steps=steps, by_rank=by_rank):
            ranks.add(rank)
            ep = run.catalog.epoch_of(st)
            if fam == "relu":
                tot = np.broadcast_to(d["count"][:, None], d["n_pos"].shape)
                sat = tot - d["n_pos"]
                used = np.nan
            else:
                nb, used, B = _hist_bins_for_delta(S, delta)
                h = d["hist"]
                tot = h.sum(-1)
                sat = (h[..., :nb].sum(-1) if S["kind"] != "softmax" else 0.0) + h[..., B - nb:].sum(-1) \
                    if nb else np.zeros(tot.shape)
            with np.errstate(invalid="ignore", divide="ignore"):
                site_frac = sat.sum(1) / tot.sum(1) if sat.ndim == 2 else sat / tot
                unit_frac = sat / tot if sat.ndim == 2 else None
            base = {"rank": rank, "step": st.astype(np.int64), "epoch": ep.astype(np.int64), "site": S["name"],
                    "kind": S["kind"]}
            if not per_unit or unit_frac is None:
                f = pd.DataFrame(dict(base, saturated=site_frac, delta_used=used))
                if per_unit:
                    f["unit"] = pd.array([pd.NA] * len(f), dtype="Int64")
                rows.append(f)
            else:
                k, U = unit_frac.shape
                rows.append(pd.DataFrame({"rank": rank, "step": np.repeat(base["step"], U),
                                          "epoch": np.repeat(base["epoch"], U),
                                          "site": S["name"], "kind": S["kind"],
                                          "unit": np.tile(np.arange(U, dtype=np.int64), k),
                                          "saturated": unit_frac.reshape(-1), "delta_used": used}))
    cols = (["rank"] if len(ranks) > 1 else []) + ["step", "epoch", "site", "kind"] + (["unit"] if per_unit else []) \
        + ["saturated", "delta_used"]
    if not rows:
        return _empty(cols, {"step": "int64", "epoch": "int64", "unit": "int64"})
    df = pd.concat(rows, ignore_index=True).reindex(columns=cols)
    if per_unit and df["unit"].dtype != np.int64:
        df["unit"] = df["unit"].astype("Int64")   # softmax rows (no unit) beside unit rows
    return df


def saturation_layers(run, delta: float = 0.03, unit_fraction: float = 0.5, layer_share: float = 0.5,
                      steps=None, sites: Any = None) -> pd.DataFrame:
    """Per site: saturated fraction over the steps, share of saturated units (a unit is saturated
    when more than ``unit_fraction`` of its values are), and ``flagged`` when that share exceeds
    ``layer_share``."""
    df = saturation(run, delta, steps=steps, sites=sites, per_unit=True)
    out = []
    for site, g in df.groupby("site", sort=False):
        if "unit" in g and g["unit"].notna().any():
            per_unit = g.groupby("unit")["saturated"].mean()
            share = float((per_unit > unit_fraction).mean())
        else:
            share = float((g["saturated"] > unit_fraction).mean())
        out.append({"site": site, "kind": g["kind"].iloc[0], "saturated": float(g["saturated"].mean()),
                    "saturated_units": share, "flagged": share > layer_share})
    cols = ["site", "kind", "saturated", "saturated_units", "flagged"]
    return pd.DataFrame(out, columns=cols) if out else _empty(cols, {"flagged": "bool"})


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
        return _empty(cols, {"step": "int64", "slices": "int64", "samples": "int64"})
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
        return _empty(cols, {"step": "int64", "slices": "int64"})
    return pd.DataFrame(out, columns=cols)
