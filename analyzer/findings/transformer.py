"""Transformer health rules: attention_entropy_collapse (per head of eager softmax sites),
massive_activations and activation_kurtosis (per site), from the recorded health statistics
(:mod:`analyzer.activations.health`; traces without them skip these rules with the reason)."""

from __future__ import annotations

import numpy as np

from ..activations.health import attention_entropy, site_health
from .base import Rule, Threshold, finding

_PROJECT = "this project's choice"
_ZHAI = "Zhai et al. 2023 (attention entropy collapse precedes training instability)"
_OLD = "bbdecoder records these statistics since the transformer-health release (older traces lack them)"


def _entropy(t):
    return t.memo(("attention_entropy",), lambda: attention_entropy(t.run))


def _health(t):
    return t.memo(("site_health",), lambda: site_health(t.run))


def _no_entropy(t):
    if not len(_entropy(t)):
        return ("the trace has no attention entropy statistics (eager softmax sites: attn_implementation="
                f"\"eager\"; {_OLD})")
    return None


class AttentionEntropyCollapse(Rule):
    name = "attention_entropy_collapse"
    needs = ("acts",)
    what = ("an attention head whose mean row entropy falls below a fraction of its early value "
            "(or below a floor relative to log Tk)")
    thresholds = {
        "fraction": Threshold(0.3, f"{_PROJECT}, after {_ZHAI}",
                              "a head collapses when its mean entropy falls below this fraction of its early value",
                              0.0, 1.0),
        "early_steps": Threshold(5, _PROJECT, "recorded rows (steps or windows) averaged for a head's early value",
                                 1, None),
        "floor": Threshold(0.0, f"{_PROJECT} (0: off; a trained head may attend to one key by design)",
                           "also flag a head whose normalized entropy (entropy / log Tk) falls below this", 0.0, 1.0),
    }

    def unusable(self, t, p):
        return _no_entropy(t)

    def check(self, t, p):
        df = _entropy(t)
        out = []
        for (site, head), d in df.groupby(["site", "head"], sort=False):
            d = d.sort_values("step")
            ent = d["entropy"].to_numpy()
            early = float(np.nanmean(ent[:p["early_steps"]])) if np.isfinite(ent[:p["early_steps"]]).any() \
                else np.nan
            rest = np.arange(len(d)) >= p["early_steps"]
            with np.errstate(invalid="ignore"):
                low = rest & (ent < p["fraction"] * early) if early > 0 else np.zeros(len(d), bool)
                low |= d["norm_entropy"].to_numpy() < p["floor"]
            if not low.any():
                continue
            hit = d[low]
            first = hit.iloc[0]
            lm = d["logit_max"].to_numpy()
            logit = (f"; its largest logit went from {lm[0]:.3g} to {first['logit_max']:.3g}"
                     if np.isfinite(lm[0]) and np.isfinite(first["logit_max"]) else "")
            where = f"site {site!r}" + (f" head {int(head)}" if head >= 0 else "")
            out.append(finding(site, None if head < 0 else f"head {int(head)}", hit["step"],
                               float(first["entropy"]), p["fraction"] * early if early > 0 else p["floor"],
                               f"{where}: mean attention entropy fell to {first['entropy']:.3g} nats "
                               f"({first['norm_entropy']:.2f} of log Tk) from {early:.3g} early, first at step "
                               f"{int(first['step'])}{logit}"))
        return out


class MassiveActivations(Rule):
    name = "massive_activations"
    severity = "info"
    needs = ("acts",)
    what = "a site with values above ratio x its median magnitude (massive activations)"
    thresholds = {
        "ratio": Threshold(100.0, "Sun et al. 2024 (massive activations: about 100x to 1000x the median magnitude)",
                           "flag a site when max |h| / median |h| reaches this (the recorded count is of channels "
                           "above 100x)", 1.0, None),
    }

    def unusable(self, t, p):
        if not len(_health(t)):
            return f"the trace has no massive-activation statistics ({_OLD})"
        return None

    def check(self, t, p):
        df = _health(t)
        df = df[df["family"] != "bounded"]   # |h| <= 1: a small median is no outlier
        out = []
        for site, d in df.groupby("site", sort=False):
            hit = d[d["massive_ratio"] >= p["ratio"]]
            if not len(hit):
                continue
            top = hit.loc[hit["massive_ratio"].idxmax()]
            out.append(finding(site, None, hit["step"], float(top["massive_ratio"]), p["ratio"],
                               f"site {site!r}: max |h| reached {top['massive_ratio']:.0f}x the median |h| "
                               f"(step {int(top['step'])}, {int(top['n_massive'])} channel(s) above 100x; "
                               f"max |h| {top['max_abs']:.3g}), first at step {int(hit['step'].iloc[0])}"))
        return out


class ActivationKurtosis(Rule):
    name = "activation_kurtosis"
    severity = "info"
    needs = ("acts",)
    what = ("a site whose values are heavy-tailed: excess kurtosis above a threshold (outlier features; "
            "ReLU-family outputs, sparse by construction, are not judged)")
    thresholds = {
        "kurtosis": Threshold(50.0, f"{_PROJECT}; kurtosis as the outlier measure: Bondarenko et al. 2023 "
                              "(Quantizable Transformers), He et al. 2024 (outlier features); a Gaussian has 0",
                              "flag a site whose excess kurtosis over all its values exceeds this", 0.0, None),
    }

    def unusable(self, t, p):
        if not len(_health(t)):
            return f"the trace has no kurtosis statistics ({_OLD})"
        return None

    def check(self, t, p):
        out = []
        df = _health(t)
        # ReLU-family outputs are not judged: a sparse ReLU output (mostly exact zeros, a few positive
        # values) is heavy-tailed by construction (the demo CNN's reach 142), with no outlier feature in it;
        # the sources measure kurtosis on hidden states and pre-activations
        df = df[df["family"] != "relu"]
        for site, d in df.groupby("site", sort=False):
            hit = d[d["kurtosis"] > p["kurtosis"]]
            if not len(hit):
                continue
            top = hit.loc[hit["kurtosis"].idxmax()]
            out.append(finding(site, None, hit["step"], float(top["kurtosis"]), p["kurtosis"],
                               f"site {site!r}: excess kurtosis {top['kurtosis']:.3g} at step {int(top['step'])} "
                               f"(first above {p['kurtosis']:g} at step {int(hit['step'].iloc[0])})"))
        return out
