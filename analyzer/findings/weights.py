"""Weight rules: weight_update_ratio (too small or too large) and unchanged_weights. They read the
weight statistics table (norms and update ratios between snapshots)."""

from __future__ import annotations

import numpy as np

from .base import Rule, Threshold, finding

_KARPATHY = "Karpathy, CS231n notes: ||lr * update|| / ||w|| should be about 1e-3 per step"


class WeightUpdateRatio(Rule):
    name = "weight_update_ratio"
    needs = ("weights",)
    what = ("a layer whose median update ratio per step, ||w_t - w_prev|| / ||w_prev|| / (steps between the "
            "snapshots), its parameters together, is outside [low, high]; layers that never change are left to "
            "unchanged_weights")
    thresholds = {
        "low": Threshold(1e-4, _KARPATHY + "; one decade below (SageMaker's WeightUpdateRatio uses 1e-8)",
                         "median update ratio per step below this is too small", 0.0),
        "high": Threshold(1e-2, _KARPATHY + "; one decade above (SageMaker's WeightUpdateRatio uses 10)",
                          "median update ratio per step above this is too large", 0.0),
    }

    def check(self, t, p):
        w = t.weight_layers
        w = w[np.isfinite(w["step_ratio"])]
        out = []
        for (_, layer), d in w.groupby(["layer_id", "layer"], sort=True):
            r = d["step_ratio"]
            if not (r > 0).any():
                continue
            med = float(r.median())
            for side, bad, thr in (("small", med < p["low"], p["low"]), ("large", med > p["high"], p["high"])):
                if bad:
                    steps = d.loc[(r < thr) if side == "small" else (r > thr), "step"]
                    out.append(finding(layer, None, steps, med, thr,
                                       f"layer {layer!r}: median update ratio per step {med:.2g} is too {side} "
                                       f"(band [{p['low']:g}, {p['high']:g}], {len(d)} snapshot pairs)"))
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
        w = t.weights
        out = []
        for (layer, param), d in w.groupby(["layer", "param"], sort=True):
            r = d["update_ratio"].to_numpy(np.float64)
            # ||w_prev|| = 0: unchanged when ||w_t|| is 0 as well
            l2 = d["l2"].to_numpy(np.float64)
            r = np.where(np.isnan(r) & (np.arange(len(r)) > 0) & (l2 == 0), 0.0, r)
            pairs = r[1:]
            if len(d) >= p["min_snapshots"] and len(pairs) and np.all(np.isfinite(pairs)) and \
                    np.all(pairs <= p["tol"]):
                out.append(finding(layer, param, d["step"], float(pairs.max()), p["tol"],
                                   f"{layer}.{param} did not change over {len(d)} snapshots (steps "
                                   f"{int(d['step'].min())} to {int(d['step'].max())})"))
        return out
