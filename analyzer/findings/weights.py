"""Weight rules: weight_update_ratio (too small or too large) and unchanged_weights. They read the
weight statistics table (norms and update ratios between snapshots)."""

from __future__ import annotations

import numpy as np

from .base import Rule, Threshold, finding

_KARPATHY = "Karpathy, CS231n notes: ||lr * update|| / ||w|| should be about 1e-3 per step"
_ADAM = ("Kingma & Ba 2015 (Adam), section 2.1: each weight moves by about lr per step, so under Adam the ratio "
         "is about lr / rms(w) (0.15 at lr 3e-3 on weights of rms 0.02) and cannot tell a healthy from a huge "
         "learning rate; the trace does not record the optimizer")


class WeightUpdateRatio(Rule):
    name = "weight_update_ratio"
    needs = ("weights",)
    what = ("a layer whose median update ratio per step, ||w_t - w_prev|| / ||w_prev|| / (steps between the "
            "snapshots), its parameters together, is outside [low, high] (above high: high_severity, above "
            "extreme: the rule's severity); layers that never change are left to unchanged_weights")
    thresholds = {
        "low": Threshold(1e-4, _KARPATHY + "; one decade below (SageMaker's WeightUpdateRatio uses 1e-8)",
                         "median update ratio per step below this is too small", 0.0),
        "high": Threshold(1e-2, _KARPATHY + "; one decade above (SageMaker's WeightUpdateRatio uses 10)",
                          "median update ratio per step above this is large (severity high_severity)", 0.0),
        "high_severity": Threshold("info", _ADAM, "severity of a median ratio in (high, extreme]: info by default, "
                                   "as Adam-family optimizers sit there at usual learning rates; \"warning\" for "
                                   "SGD", choices=("error", "warning", "info")),
        "extreme": Threshold(1.0, "this project's choice: an update as large as the weights at every step "
                             "replaces them, under any optimizer (Adam reaches it only at lr >= rms(w))",
                             "median update ratio per step above this is too large (the rule's severity)", 0.0),
    }

    def check(self, t, p):
        w = t.weight_layers
        w = w[np.isfinite(w["step_ratio"])]
        # every layer's median at once; only the layers outside the band are looked at one by one
        w = w.sort_values("layer_id", kind="stable")
        lid = w["layer_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, lid[1:] != lid[:-1]]) if len(lid) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(lid)].astype(np.int64)
        g = w.groupby("layer_id", sort=True)["step_ratio"]
        med_all = g.median().to_numpy(np.float64)
        pos = (w["step_ratio"] > 0).groupby(w["layer_id"], sort=True).any().to_numpy(bool)
        out = []
        for k in np.flatnonzero(pos & ((med_all < p["low"]) | (med_all > p["high"]))).tolist():
            d = w.iloc[starts[k]:ends[k]]
            r, layer, med = d["step_ratio"], d["layer"].iloc[0], float(med_all[k])
            if med < p["low"]:
                side, thr, sev = "small", p["low"], None
            elif med > max(p["extreme"], p["high"]):
                side, thr, sev = "large", max(p["extreme"], p["high"]), None
            elif med > p["high"]:
                side, thr, sev = "large", p["high"], p["high_severity"]
            else:
                continue
            steps = d.loc[(r < thr) if side == "small" else (r > thr), "step"]
            f = finding(layer, None, steps, med, thr,
                        f"layer {layer!r}: median update ratio per step {med:.2g} is "
                        + (f"above the band [{p['low']:g}, {p['high']:g}] ({len(d)} snapshot pairs; usual under "
                           "Adam, where it is about lr / rms(w); too large under SGD)" if sev else
                           f"too {side} (band [{p['low']:g}, {p['high']:g}]"
                           + (f", extreme {thr:g}" if side == "large" else "") + f", {len(d)} snapshot pairs)"))
            if sev:
                f["severity"] = sev
            out.append(f)
        return out


class UnchangedWeights(Rule):
    name = "unchanged_weights"
    needs = ("weights",)
    what = "a parameter whose weights never change between snapshots (frozen, learning rate 0, no gradient)"
    thresholds = {
        "tol": Threshold(1e-8, "SageMaker Debugger UnchangedTensor (np.allclose atol 1e-8)",
                         "update ratio ||w_t - w_prev|| / ||w_prev|| at or below this is no change", 0.0),
        "min_snapshots": Threshold(3, "SageMaker Debugger UnchangedTensor (num_steps 3)",
                                   "snapshots needed to call a parameter unchanged", 2, 10 ** 9),
    }

    def check(self, t, p):
        w = t.weights.sort_values(["layer", "param", "step"], kind="stable")
        # per (layer, param), every snapshot pair at once: a parameter's rows after its first must all be
        # finite and at most tol (||w_prev|| = 0: unchanged when ||w_t|| is 0 as well)
        key = w.groupby(["layer", "param"], sort=False).ngroup().to_numpy()
        first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
        r = w["update_ratio"].to_numpy(np.float64)
        r = np.where(np.isnan(r) & ~first & (w["l2"].to_numpy(np.float64) == 0), 0.0, r)
        bad = ~first & ~(np.isfinite(r) & (r <= p["tol"]))
        starts = np.flatnonzero(first)
        n = np.diff(np.r_[starts, len(key)])
        nbad = np.add.reduceat(bad.astype(np.int64), starts) if len(starts) else n
        out = []
        for k in np.flatnonzero((n >= max(2, p["min_snapshots"])) & (nbad == 0)).tolist():
            d = w.iloc[starts[k]:starts[k] + n[k]]
            layer, param, pairs = d["layer"].iloc[0], d["param"].iloc[0], r[starts[k] + 1:starts[k] + n[k]]
            out.append(finding(layer, param, d["step"], float(pairs.max()), p["tol"],
                               f"{layer}.{param} did not change over {len(d)} snapshots (steps "
                               f"{int(d['step'].min())} to {int(d['step'].max())})"))
        return out
