"""Dead and dormant units from the recorded per-unit statistics, at analysis-time thresholds
(torch-free). See :mod:`analyzer.activations` for the definitions of the criteria.

Per kind (the statistics are count, sum, sum |h|, sum h^2, min, max and n_pos = count(h > 0) per unit):

* ReLU family, bounded kinds, plain outputs: the criteria as defined (strict: max <= threshold, the
  "never active" of dead ReLUs, Lu et al. 2019 "Dying ReLU and initialization", arXiv:1903.06733;
  APoZ: Hu et al. 2016 "Network Trimming", arXiv:1607.03250, the share of zeros, which a ReLU outputs
  for every input <= 0; dormant: Sokar et al. 2023 "The dormant neuron phenomenon in deep
  reinforcement learning", arXiv:2302.12902).
* Smooth kinds (:data:`.sites.SMOOTH_KINDS`: GELU erf/tanh, QuickGELU, SiLU/Swish, Mish; Hendrycks &
  Gimpel 2016 "Gaussian Error Linear Units", arXiv:1606.08415; Elfwing et al. 2018 "Sigmoid-weighted
  linear units", arXiv:1702.03118; Ramachandran et al. 2017 "Searching for activation functions",
  arXiv:1710.05941; Shazeer 2020 "GLU variants improve Transformer", arXiv:2002.05202 for SwiGLU;
  Misra 2019 "Mish", arXiv:1908.08681). They keep the sign of the input (f(x) > 0 iff x > 0, so
  n_pos counts the inputs > 0 exactly) but never output exactly zero: a negative input gives a
  negative output with a non-zero gradient until the flat tail. A unit is **dead** (strict) when
  every output lies in the dead band ``[-floor, threshold]``: never above ``threshold`` (as for ReLU)
  *and* ``min >= -floor``, where ``floor`` = |f(x_t)| (:data:`DEAD_FLOOR`) and x_t is where the flat
  tail begins: |f'(x)| <= 0.01 (1% of the slope of the positive side) for every x <= x_t (GELU:
  x_t = -3.07, floor 0.00331; SiLU x_t = -6.26, floor 0.0119). Such a unit's inputs were all in the
  tail (gradient <= 0.01) or within about 2 floor of 0 (a constant unit): either way it passes
  nothing on. A unit that is merely never positive (inputs in [-1, 0]: outputs down to -0.17, gradient
  up to 0.5) is not dead. With ``max_active_fraction`` > 0: active in at most that fraction *and*
  ``min >= -floor``. **APoZ is not judged** for smooth kinds (score NaN, never dead): they output no
  zeros, and the trace's n_pos tells only the sign of the input (about half the inputs of a healthy
  GELU layer are negative). **dormant** needs no change: E|h| / layer mean E|h| is defined for any
  activation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stats import UnitSums
from .sites import FIRST, empty_table, iter_merged_site_stats, select_site, select_sites, site_blocks, site_family

CRITERIA = ("strict", "apoz", "dormant")


# --------------------------------------------------------------------------- dead units

def as_number(name, v) -> float:
    """``v`` as a float; ValueError naming ``name`` when it is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {v!r}") from None


def check_criterion(criterion, threshold, max_active_fraction):
    """Validated ``(threshold, max_active_fraction)`` as floats; ValueError for anything unusable."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    threshold = as_number("threshold", threshold)
    max_active_fraction = as_number("max_active_fraction", max_active_fraction)
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


#: Smooth kinds: the dead band's floor |f(x_t)|, x_t the start of the flat tail (|f'| <= 0.01 for every
#: x <= x_t): GELU x_t = -3.067, GELU (tanh form) -3.053, QuickGELU -3.679, SiLU -6.261, Mish -6.264.
DEAD_FLOOR = {"gelu": 3.311e-3, "gelu_tanh": 3.068e-3, "quick_gelu": 7.008e-3, "silu": 1.193e-2, "mish": 1.191e-2}


def dead_floor(S: dict) -> float | None:
    """The dead band's floor of a site's kind (:data:`DEAD_FLOOR`); None for kinds without one."""
    return DEAD_FLOOR.get(S.get("kind")) if site_family(S) == "smooth" else None


def _judge(criterion, threshold, maf, n, npos, sabs, mx, mn=None, floor=None):
    """``(active_fraction, score, dead)`` from pooled statistics: arrays (..., U); ``n`` broadcasts.
    ``floor``: a smooth kind's dead-band floor (strict also needs ``mn >= -floor``; APoZ is not judged).

    A NaN statistic (a NaN was seen) never makes a unit dead: there is no evidence that it is.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        af = npos / n
        if criterion == "strict":
            score = mx
            dead = (mx <= threshold) if maf == 0 else (af <= maf)
            if floor is not None:
                dead = dead & (mn >= -floor)
        elif criterion == "apoz" and floor is not None:   # no zeros to count: not judged
            score = np.full(np.shape(npos), np.nan)
            dead = np.zeros(np.shape(npos), bool)
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


def _dead_now(criterion, threshold, maf, d, floor=None):
    """Per-row (step) dead mask (k, U) from one block of statistics."""
    return _judge(criterion, threshold, maf, d["count"][:, None], d["n_pos"], d["sum_abs"], d["max"],
                  d["min"], floor)[2]


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
            E over every value of the steps, the mean over the site's units). Smooth kinds (GELU,
            SiLU, ...): strict also needs every value >= -:data:`DEAD_FLOOR` (the flat tail), and
            APoZ is not judged (score NaN, never dead): see the module docstring.
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

        Windows (``Recorder(activation_window=N)``, N > 1): ``dead``, the scores and ``max`` pool the
        same values as with rows of single steps, so they are identical; "each step alone" becomes
        "each window alone", and died_at is the first step of the first window from which the unit
        was dead in every window (for ``strict``: the first window start at or after the per-step
        died_at). ``steps`` selects windows by their last step.
    """
    threshold, max_active_fraction = check_criterion(criterion, threshold, max_active_fraction)
    layer_share = as_number("layer_share", layer_share)
    if not 0.0 <= layer_share <= 1.0:
        raise ValueError(f"layer_share must be in [0, 1], not {layer_share!r}")
    out = []
    for S in select_sites(run, sites):
        U = S["units"]
        pooled = None                                      # the site's statistics over the steps
        last_alive = np.full(U, np.iinfo(np.int64).min)   # last step at which the unit was alive
        all_steps: dict = {}                               # a row's (last) step -> its first step
        for st, d in iter_merged_site_stats(run, S, steps=steps):
            dead_now = _dead_now(criterion, threshold, max_active_fraction, d, dead_floor(S))
            all_steps.update(zip(st.tolist(), np.asarray(d.get(FIRST, st), np.int64).tolist()))
            alive = np.where(~dead_now, st[:, None], np.iinfo(np.int64).min)
            if len(st):
                last_alive = np.maximum(last_alive, alive.max(0))
            pooled = UnitSums.of(d) if pooled is None else pooled.update(d)   # NaN propagates: see _judge
        if not all_steps:
            continue
        mx = pooled.max
        af, score, dead = _judge(criterion, threshold, max_active_fraction, pooled.count, pooled.n_pos,
                                 pooled.sum_abs, mx, pooled.min, dead_floor(S))
        recorded = np.asarray(sorted(all_steps), np.int64)
        first = np.asarray([all_steps[x] for x in recorded.tolist()], np.int64)
        idx = np.searchsorted(recorded, last_alive, side="right")   # first recorded row after it
        died = np.full(U, np.nan)
        ok = idx < len(recorded)
        died[ok] = first[idx[ok]].astype(np.float64)
        frac = float(dead.mean()) if U else 0.0
        out.append(pd.DataFrame({"site": S["name"], "kind": S["kind"], "unit": np.arange(U, dtype=np.int64),
                                 "active_fraction": af, "max": mx, "score": score, "dead": dead,
                                 "died_at": died, "dead_fraction": frac, "flagged": frac > layer_share}))
    if not out:
        df = empty_table(DEAD_COLUMNS, {"unit": "int64", "dead": "bool", "flagged": "bool"})
    else:
        df = pd.concat(out, ignore_index=True)[DEAD_COLUMNS]
    df.attrs.update(criterion=criterion, threshold=threshold, max_active_fraction=max_active_fraction,
                    layer_share=layer_share)
    return df


DEAD_COUNT_COLUMNS = ["value", "site", "kind", "units", "dead"]


def dead_counts(run, criterion: str, values, param: str = "threshold", threshold: float = 0.0,
                max_active_fraction: float = 0.0, sites: Any = None) -> pd.DataFrame:
    """Dead units per site at each of several values of one parameter of the criterion: the ``dead``
    column of :func:`dead_units` at each value, summed per site, from one pass over the statistics
    (each site's are pooled once and judged at every value).

    Args:
        criterion: as in :func:`dead_units`. values: the values of ``param``.
        param: "threshold" or "max_active_fraction": which parameter takes ``values``; the other is
            ``threshold`` or ``max_active_fraction``. sites: site specification (see :func:`select_sites`).

    Returns:
        One row per (value, site), values in the given order, sites in :func:`select_sites` order:
        value, site, kind, units, dead (count). Sites without recorded steps or without units have no
        rows (as in :func:`dead_units`).
    """
    if param not in ("threshold", "max_active_fraction"):
        raise ValueError(f"param must be 'threshold' or 'max_active_fraction', not {param!r}")
    values = [as_number(param, v) for v in values]
    judged = [check_criterion(criterion, *((threshold, v) if param == "max_active_fraction"
                                          else (v, max_active_fraction))) for v in values]
    pooled = []                                   # (site, its statistics over the steps)
    for S in select_sites(run, sites):
        p = None
        for _, d in iter_merged_site_stats(run, S):
            p = UnitSums.of(d) if p is None else p.update(d)
        if p is not None and S["units"]:
            pooled.append((S, p))
    rows = [(v, S["name"], S["kind"], int(S["units"]), int(_judge(
                criterion, thr, maf, p.count, p.n_pos, p.sum_abs, p.max, p.min, dead_floor(S))[2].sum()))
            for v, (thr, maf) in zip(values, judged) for S, p in pooled]
    df = pd.DataFrame(rows, columns=DEAD_COUNT_COLUMNS)
    return df.astype({"value": np.float64, "units": np.int64, "dead": np.int64})


def dead_per_step(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
                  steps=None, sites: Any = None, by_rank: bool = False) -> pd.DataFrame:
    """Fraction of each site's units dead *at each step* (the per-step criterion): step, site, dead_fraction.
    Windows of several steps (``Recorder(activation_window=N)``): one row per window, at its last step,
    judged on the window's pooled values.
    Also per unit with :func:`dead_mask`. Several ranks: judged on every rank's values at that step,
    unless ``by_rank`` (then per rank, with a leading ``rank`` column)."""
    threshold, max_active_fraction = check_criterion(criterion, threshold, max_active_fraction)
    rk, st_all, site, frac = [], [], [], []   # columns of every block, one frame at the end (not one per block)
    for S in select_sites(run, sites):
        for st, d, rank in site_blocks(run, S, steps=steps, by_rank=by_rank):
            dn = _dead_now(criterion, threshold, max_active_fraction, d, dead_floor(S))
            rk.append(np.full(len(st), -1 if rank is None else rank, np.int64))
            st_all.append(st.astype(np.int64))
            site.append(np.full(len(st), S["name"], object))
            frac.append(dn.mean(1))
    ranks = np.unique(np.concatenate(rk)) if rk else np.zeros(0, np.int64)
    cols = (["rank"] if len(ranks) > 1 else []) + ["step", "site", "dead_fraction"]
    if not st_all:
        return empty_table(cols, {"step": "int64"})
    df = pd.DataFrame({"rank": np.concatenate(rk), "step": np.concatenate(st_all), "site": np.concatenate(site),
                       "dead_fraction": np.concatenate(frac).astype(np.float64)})
    return df[cols]


def dead_mask(run, site: Any, criterion: str = "strict", threshold: float = 0.0,
              max_active_fraction: float = 0.0, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Unit x step raster of one site: ``(steps (k,), dead (k, U) bool)`` under the per-step criterion
    (several ranks: on every rank's values at that step; windows of several steps: one row per window,
    at its last step)."""
    threshold, max_active_fraction = check_criterion(criterion, threshold, max_active_fraction)
    S = select_site(run, site)
    st_all, masks = [], []
    for st, d in iter_merged_site_stats(run, S, steps=steps):
        st_all.append(st)
        masks.append(_dead_now(criterion, threshold, max_active_fraction, d, dead_floor(S)))
    if not st_all:
        return np.zeros(0, np.int64), np.zeros((0, S["units"]), bool)
    return np.concatenate(st_all), np.concatenate(masks)
