"""Run-to-run comparison: two runs aligned by step; per layer (or activation site) and statistic, the
first step where they diverge beyond a tolerance; a similar_across_runs verdict. Reads the same
statistics tables as the health rules (:class:`analyzer.findings.Tables`), never a raw tensor.

Statistics compared (each a positive series per layer or site and step):
    grad_norm      the layer's gradient L2 norm (its parameters together), from the gradient statistics
    update_ratio   the layer's update ratio per step between weight snapshots
    act_rms        the site's root mean square activation sqrt(E h^2)
    act_std        the site's spread (mean over units of each unit's standard deviation)
    loss           the loss (layer "(model)")

Divergence: on the steps both runs recorded, each series is smoothed with a trailing median of
``window`` steps (minibatch noise is not divergence), then d = |log10(a) - log10(b)| (for the loss:
|a - b| / max(|a|, |b|)); the series diverges at the first step where d > log10(1 + tolerance)
(loss: d > tolerance). Two runs are similar across runs when they share at least one series and no
series diverges.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .findings import Tables
from .trace import format as fmt

SERIES_COLUMNS = ["step", "layer", "statistic", "a", "b"]
DIVERGENCE_COLUMNS = ["layer", "statistic", "first_step", "a", "b", "difference", "tolerance", "steps"]


@dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        series: tidy (step, layer, statistic, a, b): both runs' values on the steps both recorded.
        divergence: one row per (layer, statistic): first_step where they diverge (<NA>: never), the
            smoothed values a and b there, difference (log10 units; relative for the loss), tolerance,
            steps (aligned steps compared).
        similar: the similar_across_runs verdict: no series diverges (False when the runs share no series).
        steps: number of steps both runs recorded.
        tolerance, window: the settings used.
    """

    series: pd.DataFrame
    divergence: pd.DataFrame
    similar: bool
    steps: int
    tolerance: float
    window: int

    def summary(self) -> dict:
        """JSON-ready verdict: similar_across_runs, steps, tolerance, window and the diverging series."""
        d = self.divergence[self.divergence["first_step"].notna()].sort_values("first_step", kind="stable")
        return {"similar_across_runs": self.similar, "steps": self.steps, "tolerance": self.tolerance,
                "window": self.window, "series": int(len(self.divergence)),
                "diverged": [{"layer": r.layer, "statistic": r.statistic, "first_step": int(r.first_step),
                              "a": float(r.a), "b": float(r.b)} for r in d.itertuples(index=False)]}


def _series(t: Tables) -> pd.DataFrame:
    parts = []
    g = t.grad_layers if t.has(fmt.KIND_GRAD_STATS) else None
    if g is not None and len(g):
        parts.append(g[["step", "layer"]].assign(statistic="grad_norm", value=g["l2"]))
    if t.has(fmt.KIND_WEIGHTS):
        w = t.weight_layers
        if len(w):
            parts.append(w[["step", "layer"]].assign(statistic="update_ratio", value=w["step_ratio"]))
    if t.has(fmt.KIND_ACT_STATS) and len(t.acts):
        a = t.acts
        parts.append(a[["step"]].assign(layer=a["site"], statistic="act_rms", value=a["rms"]))
        parts.append(a[["step"]].assign(layer=a["site"], statistic="act_std", value=a["std"]))
    lo = t.loss
    if len(lo) and lo["loss"].notna().any():
        parts.append(lo[["step"]].assign(layer="(model)", statistic="loss", value=lo["loss"]))
    if not parts:
        return pd.DataFrame({c: [] for c in ("step", "layer", "statistic", "value")})
    return pd.concat(parts, ignore_index=True)


def compare(a, b, tolerance: float = 0.5, window: int = 5) -> Comparison:
    """Compare two runs (:class:`analyzer.run.Run`), aligned by step.

    Args:
        a, b: the runs (layers and sites matched by name).
        tolerance: relative difference beyond which a statistic diverges (0.5: one run 1.5x the other).
        window: trailing median of this many steps applied to each series before comparing (>= 1).

    Returns:
        :class:`Comparison`.
    """
    tolerance = float(tolerance)
    if not np.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive number, not {tolerance!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, not {window!r}")
    ta, tb = a.findings_tables(), b.findings_tables()
    s = _series(ta).merge(_series(tb), on=["step", "layer", "statistic"], suffixes=("_a", "_b"))
    s = s.rename(columns={"value_a": "a", "value_b": "b"}).sort_values(["statistic", "layer", "step"],
                                                                       kind="stable").reset_index(drop=True)
    rows = []
    log_tol = float(np.log10(1.0 + tolerance))
    for (stat, layer), d in s.groupby(["statistic", "layer"], sort=True):
        sa = d["a"].rolling(window, min_periods=1).median().to_numpy(np.float64)
        sb = d["b"].rolling(window, min_periods=1).median().to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if stat == "loss":
                diff = np.abs(sa - sb) / np.maximum(np.abs(sa), np.abs(sb))
                diff = np.where(sa == sb, 0.0, diff)
                over = diff > tolerance
            else:
                la, lb = np.log10(np.abs(sa)), np.log10(np.abs(sb))
                diff = np.where(sa == sb, 0.0, np.abs(la - lb))
                over = diff > log_tol
            # one run finite and the other not is a divergence; both non-finite is not compared
            over |= np.isfinite(sa) != np.isfinite(sb)
        i = int(np.argmax(over)) if over.any() else None
        steps = d["step"].to_numpy()
        rows.append({"layer": layer, "statistic": stat, "first_step": None if i is None else int(steps[i]),
                     "a": np.nan if i is None else sa[i], "b": np.nan if i is None else sb[i],
                     "difference": np.nan if i is None else float(diff[i]),
                     "tolerance": tolerance, "steps": len(d)})
    div = pd.DataFrame(rows, columns=DIVERGENCE_COLUMNS)
    div["first_step"] = div["first_step"].astype("Int64")
    n = int(len(set(ta.loss["step"]) & set(tb.loss["step"])))
    return Comparison(series=s[SERIES_COLUMNS], divergence=div, similar=bool(len(div)) and not div["first_step"].notna().any(),
                      steps=n, tolerance=tolerance, window=window)


class _CallableModule(types.ModuleType):
    """``bbdecoder.analyzer.compare(a, b)`` works whether the name resolves to this module (once
    imported, the package attribute is the module) or to :func:`compare`."""

    def __call__(self, a, b, tolerance: float = 0.5, window: int = 5) -> Comparison:
        return compare(a, b, tolerance, window)


sys.modules[__name__].__class__ = _CallableModule
