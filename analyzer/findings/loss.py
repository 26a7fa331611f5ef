"""Loss rules: loss_not_decreasing, and loss_spike with attribution: the layers whose gradient norm
or update ratio spiked at or before the loss spike, ranked by lead (earliest first) and size."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import NEED_CHECKS, Rule, Threshold, finding
from .gradients import layer_outliers, with_episodes
from .robust import episodes, trailing_outliers

_PROJECT = "this project's choice"
ATTRIBUTION_COLUMNS = ["layer", "statistic", "step", "lead", "factor"]


class LossNotDecreasing(Rule):
    name = "loss_not_decreasing"
    needs = ("loss",)
    what = "the mean loss of the last window steps is not at least min_decrease below that of the first window"
    thresholds = {
        "window": Threshold(10, "SageMaker Debugger LossNotDecreasing num_steps = 10", "steps per window", 1, 10 ** 9),
        "min_decrease": Threshold(0.001, "SageMaker Debugger LossNotDecreasing diff_percent = 0.1 (%)",
                                  "relative decrease (first - last) / |first| required", -1.0, 1.0),
    }

    def unusable(self, t, p):
        n = int(np.isfinite(t.loss["loss"].to_numpy(np.float64)).sum())
        return None if n >= 2 * p["window"] else f"fewer than 2 x window = {2 * p['window']} finite losses ({n})"

    def check(self, t, p):
        lo = t.loss[np.isfinite(t.loss["loss"].to_numpy(np.float64))].sort_values("step")
        w = p["window"]
        first, last = float(lo["loss"].iloc[:w].mean()), float(lo["loss"].iloc[-w:].mean())
        dec = (first - last) / abs(first) if first != 0 else (0.0 if last == first else np.sign(first - last))
        if dec >= p["min_decrease"]:
            return []
        return [finding(None, "loss", lo["step"].iloc[-w:], dec, p["min_decrease"],
                        f"mean loss {first:.4g} over steps {int(lo['step'].iloc[0])}-{int(lo['step'].iloc[w - 1])} "
                        f"and {last:.4g} over the last {w} steps: a relative decrease of {dec:.3g}")]


class LossSpike(Rule):
    name = "loss_spike"
    needs = ("loss",)
    what = ("the loss far above its trailing median; attributed to the layers whose gradient norm or update "
            "ratio spiked in the lead_window steps up to it")
    thresholds = {
        "window": Threshold(20, _PROJECT, "trailing steps in the reference (median, MAD)", 5, 10 ** 6),
        "z": Threshold(3.5, "Iglewicz & Hoaglin (1993): modified z-score outliers above 3.5",
                       "modified z-score of the loss above which a step is a spike", 0.0),
        "min_rise": Threshold(0.5, _PROJECT + " (Megatron-LM's check is the permissive 10x the largest loss)",
                              "and (loss - median) / |median| at least this", 0.0),
        "lead_window": Threshold(10, _PROJECT + " (update-norm spikes lead loss spikes by a few steps, marin #1368)",
                                 "steps before the spike searched for layer spikes", 0, 10 ** 6),
        "layer_factor": Threshold(10.0, "Megatron-LM's spiky-loss check at 10x",
                                  "a layer spikes when its statistic is this many times its trailing median", 1.0),
    }

    def check(self, t, p):
        lo = t.loss[np.isfinite(t.loss["loss"].to_numpy(np.float64))].sort_values("step")
        flag, score, rise = trailing_outliers(lo["loss"].to_numpy(), p["window"], p["z"], p["min_rise"], log=False)
        steps = lo["step"].to_numpy(np.int64)
        out = []
        for a, b in episodes(flag):
            s = int(steps[a])
            att = attribute(t, s, p["lead_window"], p["window"], p["z"], p["layer_factor"])
            top = att.iloc[0] if len(att) else None
            who = "; ".join(f"{r.layer} ({r.statistic} {r.factor:.3g}x at step {r.step}, lead {r.lead})"
                            for r in att.head(5).itertuples(index=False)) or "no layer spiked before it"
            peak = a + int(np.nanargmax(rise[a:b]))
            out.append(finding(None if top is None else top["layer"], None if top is None else top["statistic"],
                               steps[a:b], float(rise[peak]), p["min_rise"],
                               f"loss {float(lo['loss'].iloc[peak]):.4g} at step {int(steps[peak])}, "
                               f"{rise[peak]:.3g} above its trailing median (relative); moved first: {who}"))
        return out


def attribute(t, step: int, lead_window: int, window: int, z: float, factor: float) -> pd.DataFrame:
    """The layers whose gradient norm (``grad_norm``) or per-step update ratio (``update_ratio``) was an
    outlier (:func:`analyzer.findings.robust.trailing_outliers`) at a step in [step - lead_window, step].

    Returns:
        DataFrame with :data:`ATTRIBUTION_COLUMNS` (lead = step - spike step, factor = the statistic
        over its trailing median), one row per (layer, statistic) at its first outlier step in the range,
        sorted by lead (largest first), then factor (largest first).
    """
    rows = []
    sources = []
    if NEED_CHECKS["grads"](t) is None:
        sources.append(("grad_norm", t.memo(("grad_outliers", window, z, factor), lambda: layer_outliers(
            t.grad_layers, "l2", window, z, factor))))
    if NEED_CHECKS["weights"](t) is None:
        lay = t.weight_layers[np.isfinite(t.weight_layers["step_ratio"])]
        sources.append(("update_ratio", t.memo(("update_outliers", window, z, factor), lambda: layer_outliers(
            lay, "step_ratio", window, z, factor))))
    for stat, per_layer in sources:
        for layer, steps, eps, _score, rise in with_episodes(per_layer):
            for a, b in eps:
                idx = [i for i in range(a, b) if step - lead_window <= steps[i] <= step]
                if idx:
                    i = idx[0]
                    rows.append({"layer": layer, "statistic": stat, "step": int(steps[i]),
                                 "lead": int(step - steps[i]), "factor": float(rise[i])})
                    break
    df = pd.DataFrame(rows, columns=ATTRIBUTION_COLUMNS)
    return df.sort_values(["lead", "factor"], ascending=[False, False], kind="stable").reset_index(drop=True)
