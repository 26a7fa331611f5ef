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
"""

from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np
import pandas as pd

from . import format as fmt
from .format import TraceError

PER_UNIT = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")
CRITERIA = ("strict", "apoz", "dormant")


# --------------------------------------------------------------------------- selection and reading

def site_table(run) -> pd.DataFrame:
    """One row per activation site: name, key, kind, family, source, module, units, unit_axis."""
    cols = ["name", "key", "kind", "family", "source", "module", "units", "unit_axis"]
    return pd.DataFrame([{c: S.get(c) for c in cols} for S in run._sites], columns=cols)


def select_sites(run, spec: Any = None) -> list[dict]:
    """Sites for a specification: None (all), exact names, globs over names, kinds ("relu",
    "sigmoid", ...), families ("relu", "bounded"), or a comma-separated string of those."""
    sites = run._sites
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


def iter_site_stats(run, site: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None):
    """Yield ``(steps (k,), {stat: array (k, ...)})`` shard by shard, in step order, for one site."""
    keep = _steps_filter(steps)
    want = [s for s in stats if s in site["stats"]]
    shards = [sh for sh in run._shards if (fmt.KIND_ACT_STATS, site["key"], want[0]) in sh.payloads]
    shards.sort(key=lambda sh: (sh.rank, sh.index))
    ranks = sorted({sh.rank for sh in shards})
    for sh in shards:
        if len(ranks) > 1 and sh.rank != ranks[0] and not getattr(run, "_merge_ranks", False):
            pass
        with run._open_shard(sh.path, sh.name) as r:
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


def samples(run, site: Any, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw activation samples of one site: ``(steps (n,), values (n, *sample_shape))``, one row per
    sample (several rows per recorded step). Loads the selected steps into memory."""
    S = select_site(run, site)
    keep = _steps_filter(steps)
    st_all, vals = [], []
    for sh in sorted(run._shards, key=lambda sh: (sh.rank, sh.index)):
        key = (fmt.KIND_ACTIVATIONS, S["key"], "samples")
        if key not in sh.payloads:
            continue
        with run._open_shard(sh.path, sh.name) as r:
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

def _unit_frame(site, steps, epochs, cols: dict) -> pd.DataFrame:
    k, U = len(steps), site["units"]
    d = {"step": np.repeat(steps, U), "epoch": np.repeat(epochs, U), "site": site["name"],
         "kind": site["kind"], "unit": np.tile(np.arange(U), k)}
    for c, v in cols.items():
        d[c] = np.asarray(v).reshape(-1) if np.ndim(v) == 2 else np.repeat(v, U)
    return pd.DataFrame(d)


def activation_stats(run, per: str = "step", sites: Any = None, steps=None) -> pd.DataFrame:
    """Per-unit activation statistics.

    Returns one row per (step, site, unit) (``per="step"``) or per (epoch, site, unit) (``per="epoch"``,
    pooled over the epoch's steps) with: count, mean, abs_mean (E|h|), std (population), min, max,
    frac_active (fraction of values > 0), apoz (= 1 - frac_active), nonfinite (per site and step).
    """
    if per not in ("step", "epoch"):
        raise ValueError(f"per must be 'step' or 'epoch', not {per!r}")
    frames = []
    for S in select_sites(run, sites):
        for st, d, _ in iter_site_stats(run, S, steps=steps):
            ep = run._epoch_of(st)
            if per == "epoch":
                for e in np.unique(ep):
                    m = ep == e
                    agg = {"count": d["count"][m].sum(keepdims=True), "nonfinite": d["nonfinite"][m].sum(keepdims=True)}
                    for s in ("sum", "sum_abs", "sumsq", "n_pos"):
                        agg[s] = d[s][m].sum(0, keepdims=True)
                    agg["min"] = d["min"][m].min(0, keepdims=True)
                    agg["max"] = d["max"][m].max(0, keepdims=True)
                    frames.append((S, np.array([-1]), np.array([e]), agg))
            else:
                frames.append((S, st, ep, d))
    rows = []
    for S, st, ep, d in frames:
        n = d["count"][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = d["sum"] / n
            var = np.maximum(d["sumsq"] / n - mean ** 2, 0.0)
            fa = d["n_pos"] / n
        f = _unit_frame(S, st, ep, {"count": d["count"], "mean": mean, "abs_mean": d["sum_abs"] / n,
                                     "std": np.sqrt(var), "min": d["min"], "max": d["max"],
                                     "frac_active": fa, "apoz": 1.0 - fa, "nonfinite": d["nonfinite"]})
        rows.append(f)
    cols = ["step", "epoch", "site", "kind", "unit", "count", "mean", "abs_mean", "std", "min", "max",
            "frac_active", "apoz", "nonfinite"]
    if not rows:
        return pd.DataFrame({c: [] for c in cols})
    df = pd.concat(rows, ignore_index=True)
    if per == "epoch":
        df = (df.groupby(["epoch", "site", "unit"], sort=False, as_index=False).first()
              if df.duplicated(["epoch", "site", "unit"]).any() else df)
        df = df.drop(columns=["step"])
        return df.sort_values(["epoch", "site", "unit"], kind="stable").reset_index(drop=True)
    df["count"] = df["count"].astype(np.int64)
    df["nonfinite"] = df["nonfinite"].astype(np.int64)
    return df[cols].reset_index(drop=True)


# --------------------------------------------------------------------------- dead units

def _check_criterion(criterion, threshold, max_active_fraction):
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
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


def _dead_now(criterion, threshold, maf, d):
    """Per-row (step) dead mask (k, U) from one block of statistics."""
    n = d["count"][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        if criterion == "strict":
            if maf == 0:
                return ~(d["max"] > threshold)
            return ~(d["n_pos"] / n > maf)
        if criterion == "apoz":
            return ~(1.0 - d["n_pos"] / n < threshold)
        e = d["sum_abs"] / n
        s = e / e.mean(1, keepdims=True)
        return ~(s > threshold)


def dead_units(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
               steps=None, sites: Any = None, layer_share: float = 0.5) -> pd.DataFrame:
    """Dead (or dormant) units per site, at an analysis-time threshold.

    Args:
        criterion: "strict" (active = value > threshold; dead if never active, or if
            active_fraction <= max_active_fraction at threshold 0), "apoz" (dead if the fraction of
            values <= 0 is >= threshold), "dormant" (dead if E|h_i| / mean_k E|h_k| <= threshold).
        threshold, max_active_fraction: see criterion.
        steps: None (all), a (start, stop) half-open range, or an iterable of steps.
        sites: site specification (see :func:`select_sites`).
        layer_share: a site is flagged when more than this share of its units are dead.

    Returns:
        One row per (site, unit): site, kind, unit, active_fraction (values > 0, over the steps),
        max (largest value seen), score (the criterion's: max, APoZ or dormant score), dead (bool),
        died_at (first recorded step after which the unit was dead at every step to the end; NaN if
        it was alive at the last step), dead_fraction and flagged (per site, repeated).
    """
    threshold, max_active_fraction = float(threshold), float(max_active_fraction)
    _check_criterion(criterion, threshold, max_active_fraction)
    if not 0.0 <= layer_share <= 1.0:
        raise ValueError(f"layer_share must be in [0, 1], not {layer_share!r}")
    out = []
    for S in select_sites(run, sites):
        U = S["units"]
        n = 0.0
        npos = np.zeros(U)
        sabs = np.zeros(U)
        mx = np.full(U, -np.inf)
        last_alive = np.full(U, -1, np.int64)   # index into the list of recorded steps
        all_steps = []
        for st, d, _ in iter_site_stats(run, S, steps=steps):
            dead_now = _dead_now(criterion, threshold, max_active_fraction, d)
            base = len(all_steps)
            all_steps.extend(st.tolist())
            alive_rows = np.where(~dead_now)
            if len(alive_rows[0]):
                np.maximum.at(last_alive, alive_rows[1], base + alive_rows[0])
            n += d["count"].sum()
            npos += d["n_pos"].sum(0)
            sabs += d["sum_abs"].sum(0)
            mx = np.fmax(mx, d["max"].max(0))
        if not all_steps:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            af = npos / n
            if criterion == "strict":
                score = mx
                dead = ~(mx > threshold) if max_active_fraction == 0 else ~(af > max_active_fraction)
            elif criterion == "apoz":
                score = 1.0 - af
                dead = ~(score < threshold)
            else:
                e = sabs / n
                score = e / e.mean()
                dead = ~(score > threshold)
        died = np.full(U, np.nan)
        idx = last_alive + 1
        ok = idx < len(all_steps)
        died[ok] = np.asarray(all_steps)[idx[ok]]
        frac = float(dead.mean()) if U else 0.0
        out.append(pd.DataFrame({"site": S["name"], "kind": S["kind"], "unit": np.arange(U),
                                 "active_fraction": af, "max": mx, "score": score, "dead": dead,
                                 "died_at": died, "dead_fraction": frac, "flagged": frac > layer_share}))
    cols = ["site", "kind", "unit", "active_fraction", "max", "score", "dead", "died_at", "dead_fraction",
            "flagged"]
    if not out:
        return pd.DataFrame({c: [] for c in cols})
    df = pd.concat(out, ignore_index=True)[cols]
    df.attrs.update(criterion=criterion, threshold=threshold, max_active_fraction=max_active_fraction,
                    layer_share=layer_share)
    return df


def dead_per_step(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
                  steps=None, sites: Any = None) -> pd.DataFrame:
    """Fraction of each site's units dead *at each step* (the per-step criterion): step, site, dead_fraction.
    Also per unit with :func:`dead_mask`."""
    threshold, max_active_fraction = float(threshold), float(max_active_fraction)
    _check_criterion(criterion, threshold, max_active_fraction)
    rows = []
    for S in select_sites(run, sites):
        for st, d, _ in iter_site_stats(run, S, steps=steps):
            dn = _dead_now(criterion, threshold, max_active_fraction, d)
            rows.append(pd.DataFrame({"step": st, "site": S["name"], "dead_fraction": dn.mean(1)}))
    if not rows:
        return pd.DataFrame({"step": [], "site": [], "dead_fraction": []})
    return pd.concat(rows, ignore_index=True)


def dead_mask(run, site: Any, criterion: str = "strict", threshold: float = 0.0,
              max_active_fraction: float = 0.0, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Unit x step raster of one site: ``(steps (k,), dead (k, U) bool)`` under the per-step criterion."""
    _check_criterion(criterion, float(threshold), float(max_active_fraction))
    S = select_site(run, site)
    st_all, masks = [], []
    for st, d, _ in iter_site_stats(run, S, steps=steps):
        st_all.append(st)
        masks.append(_dead_now(criterion, float(threshold), float(max_active_fraction), d))
    if not st_all:
        return np.zeros(0, np.int64), np.zeros((0, S["units"]), bool)
    return np.concatenate(st_all), np.concatenate(masks)


# --------------------------------------------------------------------------- saturation

def _hist_bins_for_delta(S, delta):
    lo, hi = S["bounds"]
    edges = np.asarray(S["hist_edges"], np.float64)
    B = len(edges) - 1
    width = (hi - lo) / B
    nb = int(np.floor(delta / width + 1e-9))
    return nb, nb * width, B


def saturation(run, delta: float = 0.03, steps=None, sites: Any = None, per_unit: bool = False) -> pd.DataFrame:
    """Fraction of saturated values per (step, site[, unit]).

    By kind: sigmoid: a < lo + delta or a > hi - delta (value units; hardtanh likewise with its own
    bounds); tanh: |a| > 1 - delta; softmax: the row's max probability > 1 - delta; ReLU family
    (relu, leaky_relu, elu, gelu, silu, softplus): the fraction at or below zero. Bounded kinds are
    read from fixed-edge histograms; ``delta`` is rounded down to a bin edge (``delta_used``).
    Sites of other kinds (plain module outputs) are not included.
    """
    delta = float(delta)
    if not 0.0 <= delta < 0.5:
        raise ValueError(f"delta must be in [0, 0.5), not {delta!r}")
    rows = []
    for S in select_sites(run, sites):
        fam = S.get("family")
        if fam not in ("relu", "bounded"):
            continue
        for st, d, _ in iter_site_stats(run, S, stats=PER_UNIT + ("count", "nonfinite", "hist"), steps=steps):
            ep = run._epoch_of(st)
            with np.errstate(invalid="ignore", divide="ignore"):
                if fam == "relu":
                    frac = 1.0 - d["n_pos"] / d["count"][:, None]
                    used = 0.0
                elif S["kind"] == "softmax":
                    nb, used, B = _hist_bins_for_delta(S, delta)
                    h = d["hist"]
                    frac = h[:, B - nb:].sum(1) / h.sum(1) if nb else np.zeros(len(st))
                else:
                    nb, used, B = _hist_bins_for_delta(S, delta)
                    h = d["hist"]
                    tot = h.sum(2)
                    frac = (h[:, :, :nb].sum(2) + h[:, :, B - nb:].sum(2)) / tot if nb else np.zeros(tot.shape)
            if frac.ndim == 1 or not per_unit:
                val = frac if frac.ndim == 1 else _pool_units(frac, d, S)
                rows.append(pd.DataFrame({"step": st, "epoch": ep, "site": S["name"], "kind": S["kind"],
                                          "saturated": val, "delta_used": used}))
            else:
                k, U = frac.shape
                rows.append(pd.DataFrame({"step": np.repeat(st, U), "epoch": np.repeat(ep, U),
                                          "site": S["name"], "kind": S["kind"], "unit": np.tile(np.arange(U), k),
                                          "saturated": frac.reshape(-1), "delta_used": used}))
    cols = ["step", "epoch", "site", "kind"] + (["unit"] if per_unit else []) + ["saturated", "delta_used"]
    if not rows:
        return pd.DataFrame({c: [] for c in cols})
    return pd.concat(rows, ignore_index=True).reindex(columns=cols)


def _pool_units(frac, d, S):
    # every unit has the same count per step, so the site's fraction is the mean over units
    return np.nanmean(frac, axis=1) if frac.shape[1] else np.full(frac.shape[0], np.nan)


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
    return pd.DataFrame(out, columns=["site", "kind", "saturated", "saturated_units", "flagged"])


# --------------------------------------------------------------------------- raw-sample analyses

def dimension_variance(run, site: Any, dim: int = 1, steps=None) -> pd.DataFrame:
    """Variance across dimension ``dim`` of the site's output (dim counts the batch axis as 0), per
    recorded step: for every position of the other axes, the population variance of the values
    along ``dim``, averaged over positions (``variance``); and the variance across ``dim`` of each
    slice's mean (``slice_mean_variance``)."""
    st, x = samples(run, site, steps=steps)
    if dim == 0:
        raise ValueError("dim 0 is the sample axis; choose a feature dimension (>= 1)")
    out = []
    for s in np.unique(st):
        v = x[st == s].astype(np.float64)
        d = dim % v.ndim
        if d == 0:
            raise ValueError(f"dim {dim} is the sample axis")
        out.append({"step": int(s), "variance": float(np.nanmean(np.nanvar(v, axis=d))),
                    "slice_mean_variance": float(np.nanvar(np.nanmean(np.moveaxis(v, d, 0).reshape(v.shape[d], -1),
                                                                      axis=1))),
                    "slices": int(v.shape[d]), "samples": int(v.shape[0])})
    return pd.DataFrame(out, columns=["step", "variance", "slice_mean_variance", "slices", "samples"])


def similarity(run, site: Any, dim: int = 1, method: str = "cosine", steps=None) -> pd.DataFrame:
    """Mean pairwise similarity between distinct slices along ``dim`` (e.g. channels), per recorded
    step. Slice i is every value with index i along ``dim`` (all samples), flattened.

    method "cosine": mean over pairs i != j of cos(s_i, s_j). method "kl": slices become
    distributions p_i = softmax(s_i); mean over ordered pairs i != j of KL(p_i || p_j) (nats).
    """
    if method not in ("cosine", "kl"):
        raise ValueError(f"method must be 'cosine' or 'kl', not {method!r}")
    st, x = samples(run, site, steps=steps)
    out = []
    for s in np.unique(st):
        v = x[st == s].astype(np.float64)
        d = dim % v.ndim
        if d == 0:
            raise ValueError(f"dim {dim} is the sample axis")
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
    return pd.DataFrame(out, columns=["step", "similarity", "slices"])
