"""Activation rules: dead_units and saturated_activations (the analyzer's activation analyses with
their thresholds), poor_initialization and tensor_variance (from the per-site statistics table)."""

from __future__ import annotations

import warnings

import numpy as np

from ..activations import dead_units, saturation, saturation_layers
from ..activations.deadunits import DEAD_FLOOR
from ..activations.sites import site_family
from .base import Rule, Threshold, finding

_PROJECT = "this project's choice"
#: families the dead-unit rule judges (sites.site_family): ReLU kinds, and smooth kinds by the flat-tail rule
DEAD_FAMILIES = ("relu", "smooth")
_REPORT = "the report's default (bbdecoder report --delta/--unit-fraction)"


def _sites(t, *families: str) -> list[str]:
    return [S["name"] for S in t.run.catalog.sites if site_family(S) in families]   # by kind, as the analyses judge


def _site_steps(t, site: str, start=None):
    a = t.acts
    s = a.loc[a["site"] == site, "step"]
    return s if start is None else s[s >= start]


class DeadUnits(Rule):
    name = "dead_units"
    needs = ("acts",)
    what = ("a ReLU-family or smooth (GELU, SiLU, ...) site where more than layer_share of the units are (almost) "
            "never active; a smooth kind's unit is dead only when also every value lies in the flat tail "
            "(analyzer.activations.dead_units)")
    thresholds = {
        "max_active_fraction": Threshold(0.01, "SageMaker Debugger DeadRelu threshold_inactivity = 1%",
                                         "a unit active (> 0) in at most this fraction of its values is dead",
                                         0.0, 1.0),
        "layer_share": Threshold(0.5, "SageMaker Debugger DeadRelu threshold_layer = 50%",
                                 "a site is flagged when more than this share of its units are dead", 0.0, 1.0),
    }

    def unusable(self, t, p):
        return None if _sites(t, *DEAD_FAMILIES) else "the trace has no ReLU-family or smooth (GELU, SiLU, ...) " \
            "activation sites"

    def check(self, t, p):
        # strict at threshold 0: active = value > 0; smooth kinds also need min >= -floor (the flat tail)
        df = t.memo(("dead", p["max_active_fraction"], p["layer_share"]), lambda: dead_units(
            t.run, "strict", 0.0, p["max_active_fraction"], sites=_sites(t, *DEAD_FAMILIES),
            layer_share=p["layer_share"]))
        out = []
        for site, d in df[df["flagged"]].groupby("site", sort=False):
            died = d.loc[d["dead"], "died_at"]
            first = float(died.min()) if died.notna().any() else None
            steps = _site_steps(t, site, first)
            frac = float(d["dead_fraction"].iloc[0])
            kind = str(d["kind"].iloc[0])
            tail = (f" and every value in the flat tail, >= -{DEAD_FLOOR[kind]:.3g}" if kind in DEAD_FLOOR else "")
            out.append(finding(site, None, steps, frac, p["layer_share"],
                               f"site {site!r} ({kind}): {int(d['dead'].sum())} of {len(d)} units dead (active in "
                               f"at most {p['max_active_fraction']:g} of their values{tail})"
                               + (f", dead from step {int(first)}" if first is not None else "")))
        return out


class SaturatedActivations(Rule):
    name = "saturated_activations"
    needs = ("acts",)
    what = "a bounded site (sigmoid, tanh, ...) where more than layer_share of the units are saturated"
    thresholds = {
        "delta": Threshold(0.03, _REPORT, "values within delta of a bound are saturated (value units)", 0.0, 0.49),
        "unit_fraction": Threshold(0.5, _REPORT, "a unit is saturated when more than this fraction of its values "
                                   "are", 0.0, 1.0),
        "layer_share": Threshold(0.5, "SageMaker Debugger SaturatedActivation threshold_layer = 50%",
                                 "a site is flagged when more than this share of its units are saturated", 0.0, 1.0),
    }

    def unusable(self, t, p):
        return None if _sites(t, "bounded") else "the trace has no bounded activation sites (sigmoid, tanh, ...)"

    def check(self, t, p):
        sites = _sites(t, "bounded")
        lay = saturation_layers(t.run, p["delta"], p["unit_fraction"], p["layer_share"], sites=sites)
        out = []
        for r in lay[lay["flagged"]].itertuples(index=False):
            per = saturation(t.run, p["delta"], sites=[r.site])
            steps = per.loc[per["saturated"] > p["unit_fraction"], "step"]
            out.append(finding(r.site, None, steps if len(steps) else per["step"], r.saturated_units,
                               p["layer_share"], f"site {r.site!r} ({r.kind}): {r.saturated_units:.0%} of units "
                               f"saturated, {r.saturated:.0%} of values within {p['delta']:g} of a bound"))
        return out


class PoorInitialization(Rule):
    name = "poor_initialization"
    needs = ("acts",)
    what = ("activation variance collapsing or exploding through depth in the first steps: the largest over "
            "the smallest variance of the sites of one kind")
    thresholds = {
        "steps": Threshold(10, "SageMaker Debugger PoorWeightInitialization steps = 10",
                           "first recorded steps looked at", 1, 10 ** 9),
        "threshold": Threshold(10.0, "SageMaker Debugger PoorWeightInitialization threshold = 10",
                               "largest / smallest median variance across the sites of one kind", 1.0),
    }

    def check(self, t, p):
        a = t.acts
        a = a[a["kind"] != "softmax"]
        first = np.sort(a["step"].unique())[:p["steps"]]
        a = a[a["step"].isin(first)].assign(var=np.maximum(a["rms"] ** 2 - a["mean"] ** 2, 0.0))
        out = []
        for kind, d in a.groupby("kind", sort=True):
            v = d.groupby(["order", "site"], sort=True)["var"].median().reset_index()
            v = v[np.isfinite(v["var"])]
            if len(v) < 2:
                continue
            lo, hi = float(v["var"].min()), float(v["var"].max())
            ratio = hi / lo if lo > 0 else np.inf
            if ratio > p["threshold"]:
                grows = v["var"].iloc[-1] > v["var"].iloc[0]
                site = v.loc[v["var"].idxmax() if grows else v["var"].idxmin(), "site"]
                out.append(finding(site, None, first, ratio, p["threshold"],
                                   f"{kind} sites: activation variance {'grows' if grows else 'shrinks'} "
                                   f"{ratio:.3g}x through depth ({v['site'].iloc[0]!r} {v['var'].iloc[0]:.3g} to "
                                   f"{v['site'].iloc[-1]!r} {v['var'].iloc[-1]:.3g}) in the first {len(first)} steps"))
        return out


class TensorVariance(Rule):
    name = "tensor_variance"
    needs = ("acts",)
    what = ("a site whose spread (mean over units of each unit's standard deviation) collapses: the median "
            "over the last window steps below min_ratio times the median over the first window steps")
    thresholds = {
        "window": Threshold(10, _PROJECT, "recorded steps at each end", 1, 10 ** 6),
        "min_ratio": Threshold(0.01, _PROJECT + " (SageMaker TensorVariance has no default bounds)",
                               "last / first median spread below this is a collapse", 0.0, 1.0),
    }

    def unusable(self, t, p):
        n = int(t.acts.groupby("site")["step"].size().max())
        return None if n >= 2 * p["window"] else f"fewer than 2 x window = {2 * p['window']} recorded steps of any site ({n})"

    def check(self, t, p):
        out = []
        w = p["window"]
        for site, d in t.acts.sort_values("step").groupby("site", sort=True):
            s = d["std"].to_numpy(np.float64)
            if len(s) < 2 * w:
                continue
            with warnings.catch_warnings():          # an all-NaN end (NaN activations) is no collapse
                warnings.simplefilter("ignore", RuntimeWarning)
                ref, last = float(np.nanmedian(s[:w])), float(np.nanmedian(s[-w:]))
            if ref > 0 and last < p["min_ratio"] * ref:
                low = s < p["min_ratio"] * ref
                steps = d["step"].to_numpy()[np.argmax(low):][low[np.argmax(low):]]
                out.append(finding(site, None, steps, last / ref, p["min_ratio"],
                                   f"site {site!r}: spread fell to {last / ref:.3g}x its first-steps value "
                                   f"({ref:.3g} to {last:.3g}) from step {int(steps[0])}"))
        return out
