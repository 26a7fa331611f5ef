"""Gradient rules: vanishing_gradient, exploding_gradient, gradient_spike, nonfinite, all_zero. They read
the per-step gradient statistics table (``grad_stats`` payloads), never a raw gradient."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..trace import format as fmt
from .base import NEED_CHECKS, Rule, Threshold, finding
from .robust import episodes, trailing_outliers_rows

_PROJECT = "this project's choice"
_IH = "Iglewicz & Hoaglin (1993): modified z-score outliers above 3.5"


class VanishingGradient(Rule):
    name = "vanishing_gradient"
    needs = ("grads",)
    what = ("a layer whose mean |g| is below an absolute floor, or far below the layer with the largest "
            "mean |g| at the same step, on most steps")
    thresholds = {
        "absolute": Threshold(1e-7, "SageMaker Debugger VanishingGradient threshold (mean |g| < 1e-7)",
                              "mean |g| below this is vanishing (gradient units)", low=0.0),
        "relative": Threshold(1e-4, _PROJECT + " (four decades below the largest layer; a chain of k sigmoids "
                              "scales the gradient by at most 0.25^k)",
                              "mean |g| / largest layer's mean |g| at that step below this is vanishing", 0.0, 1.0),
        "fraction": Threshold(0.5, _PROJECT, "share of a layer's recorded steps that must be vanishing", 0.0, 1.0),
    }

    def check(self, t, p):
        g = t.grad_layers[["step", "layer_id", "layer", "abs_mean"]]   # only these (issue 16: 2M rows)
        ok = np.isfinite(g["abs_mean"].to_numpy(np.float64))
        if not ok.all():      # a copy only where rows go
            g = g[ok]
        top = g.groupby("step")["abs_mean"].transform("max")
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(top > 0, g["abs_mean"] / top, np.nan)
        g = g.assign(rel=rel, low=(g["abs_mean"] < p["absolute"]) | (rel < p["relative"]))
        # the share of low steps per layer at once; only the layers that fire are looked at one by one
        order, starts, ends = layer_runs(g)
        low = g["low"].to_numpy(bool)[order]
        nlow = np.add.reduceat(low.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        share = nlow / (ends - starts)
        out = []
        for k in np.flatnonzero((share >= p["fraction"]) & (nlow > 0)).tolist():
            d = g.iloc[np.sort(order[starts[k]:ends[k]])]
            layer = d["layer"].iloc[0]
            med = float(np.nanmedian(d["rel"])) if d["rel"].notna().any() else 0.0
            out.append(finding(layer, None, d.loc[d["low"], "step"], med, p["relative"],
                               f"layer {layer!r}: mean |g| is {med:.2g} x the largest layer's (median over "
                               f"steps; median mean |g| {float(d['abs_mean'].median()):.2g}) on "
                               f"{int(d['low'].sum())} of {len(d)} steps"))
        return out


class _GradOutliers(Rule):
    """Shared settings and detector of exploding_gradient and gradient_spike (per layer, on the
    gradient L2 norm of the layer's parameters together)."""

    needs = ("grads",)
    thresholds = {
        "window": Threshold(20, _PROJECT, "trailing steps in the reference (median, MAD)", 5, 100000),
        "z": Threshold(3.5, _IH, "modified z-score of log10 ||g|| above which a step is an outlier", 0.0),
        "min_factor": Threshold(10.0, "Megatron-LM's spiky-loss check at 10x", "and ||g|| at least this many "
                                "times the trailing median", 1.0),
        "min_steps": Threshold(3, _PROJECT, "consecutive outlier steps that make an explosion (fewer: a spike)",
                               1, 100000),
    }

    def episodes_by_layer(self, t, p) -> list[tuple[str, pd.DataFrame, list, np.ndarray, np.ndarray]]:
        key = ("grad_outliers", p["window"], p["z"], p["min_factor"])
        return t.memo(key, lambda: layer_outliers(t.grad_layers, "l2", p["window"], p["z"], p["min_factor"]))


def layer_outliers(df: pd.DataFrame, col: str, window: int, z: float, min_factor: float) -> "LayerOutliers | list":
    """Per layer of ``df`` (step, layer_id, layer, ``col``), in layer id order: ``(layer, steps (n,),
    episodes, score, rise)`` of :func:`trailing_outliers` on ``col`` in step order. Layers with the same
    number of steps are judged together (:func:`trailing_outliers_rows`: one array operation for all).
    A sequence (:class:`LayerOutliers`) whose tuples are made when read: kept by the rules' tables, it holds
    the arrays only (100,000 layers: not 100,000 tuples and 300,000 array views, ~45 MB)."""
    order, starts, ends = layer_runs(df)
    if not len(order):
        return []
    steps = df["step"].to_numpy(np.int64)[order]
    vals = df[col].to_numpy(np.float64)[order]
    names = df["layer"].to_numpy(object)[order[starts]]
    del order
    lens = ends - starts
    at = np.empty((len(starts), 2), np.int64)     # (block, row of the block) of each layer
    blocks = []
    ns = np.unique(lens)
    for n in ns:
        rows = np.flatnonzero(lens == n)
        idx = starts[rows, None] + np.arange(n)[None, :]
        x = vals[idx]
        del idx
        if len(ns) == 1:
            del vals   # one length: every value is in x (100,000 layers: 16 MB fewer while they are judged)
        flag, score, rise = trailing_outliers_rows(x, window, z, min_factor, take=True)
        del x
        at[rows, 0], at[rows, 1] = len(blocks), np.arange(len(rows))
        blocks.append((flag, flag.any(axis=1), score, rise))
    return LayerOutliers(names, steps, starts, ends, at, blocks)


class LayerOutliers(Sequence):
    """The result of :func:`layer_outliers`: item ``r`` is the ``r``-th layer's ``(layer, steps, episodes,
    score, rise)`` (steps, score and rise views of the arrays kept; episodes of the flags)."""

    def __init__(self, names, steps, starts, ends, at, blocks):
        self._names, self._steps, self._starts, self._ends = names, steps, starts, ends
        self._at, self._blocks = at, blocks

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        r = range(len(self))[r]   # IndexError past the end; negative indices from the end
        b, j = self._at[r]
        flag, fired, score, rise = self._blocks[b]
        return (self._names[r], self._steps[self._starts[r]:self._ends[r]], episodes(flag[j]) if fired[j] else [],
                score[j], rise[j])

    def __iter__(self):
        for r in range(len(self)):
            yield self[r]

    def with_episodes(self) -> list[tuple]:
        """The items of the layers with at least one episode, in layer order."""
        b, j = self._at[:, 0], self._at[:, 1]
        fired = np.zeros(len(self), bool)
        for k, blk in enumerate(self._blocks):
            m = b == k
            fired[m] = blk[1][j[m]]
        return [self[r] for r in np.flatnonzero(fired).tolist()]


def with_episodes(per_layer) -> list[tuple]:
    """The items of :func:`layer_outliers` (a :class:`LayerOutliers` or a list) whose layer has an episode."""
    if isinstance(per_layer, LayerOutliers):
        return per_layer.with_episodes()
    return [x for x in per_layer if x[2]]


def layer_runs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, ends): ``order`` sorts the rows of ``df`` by (layer_id, step); the rows of the
    k-th layer (in id order) are ``order[starts[k]:ends[k]]``."""
    lid = df["layer_id"].to_numpy(np.int64)
    order = np.lexsort((df["step"].to_numpy(np.int64), lid))
    s = lid[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    return order, starts, np.r_[starts[1:], len(s)].astype(np.int64)


class ExplodingGradient(_GradOutliers):
    name = "exploding_gradient"
    severity = "error"
    what = "a layer's gradient norm jumps far above its trailing median and stays there"

    def check(self, t, p):
        out = []
        for layer, steps, eps, score, rise in with_episodes(self.episodes_by_layer(t, p)):
            long = [(a, b) for a, b in eps if b - a >= p["min_steps"]]
            if long:
                idx = np.concatenate([np.arange(a, b) for a, b in long])
                out.append(finding(layer, None, steps[idx], float(np.nanmax(rise[idx])), p["min_factor"],
                                   f"layer {layer!r}: gradient norm up to {np.nanmax(rise[idx]):.3g}x its trailing "
                                   f"median from step {steps[long[0][0]]} for {len(idx)} steps"))
        return out


class GradientSpike(_GradOutliers):
    name = "gradient_spike"
    what = "a layer's gradient norm far above its trailing median for fewer than min_steps steps"

    def check(self, t, p):
        out = []
        for layer, steps, eps, score, rise in with_episodes(self.episodes_by_layer(t, p)):
            short = [(a, b) for a, b in eps if b - a < p["min_steps"]]
            if short:
                idx = np.concatenate([np.arange(a, b) for a, b in short])
                i = idx[int(np.nanargmax(rise[idx]))]
                out.append(finding(layer, None, steps[idx], float(rise[i]), p["min_factor"],
                                   f"layer {layer!r}: gradient norm {rise[i]:.3g}x its trailing median at step "
                                   f"{steps[i]} (modified z {score[i]:.3g}); {len(short)} spike(s), first at step "
                                   f"{steps[short[0][0]]}"))
        return out


class Nonfinite(Rule):
    name = "nonfinite"
    severity = "error"
    what = "NaN or Inf in gradients, weights, activations or the loss: first step and where"
    thresholds = {}

    def missing(self, t):
        have = [k for k in ("grads", "weights", "acts", "loss") if NEED_CHECKS[k](t) is None]
        return None if have else "the trace has no gradient, weight, activation or loss statistics"

    def check(self, t, p):
        out = []
        for what, df, keys in (("gradient", t.grads if not NEED_CHECKS["grads"](t) else None, ["layer", "param"]),
                               ("weight", t.weights if t.has(fmt.KIND_WEIGHTS) else None, ["layer", "param"]),
                               ("activation", t.acts if not NEED_CHECKS["acts"](t) else None, ["site"])):
            if df is None or not len(df):
                continue
            bad = df[df["nonfinite"] > 0]
            for k, d in bad.groupby(keys, sort=True, observed=True):   # names may be categoricals
                k = k if isinstance(k, tuple) else (k,)
                n = float(d["nonfinite"].sum())
                out.append(finding(k[0], k[1] if len(k) > 1 else None, d["step"], n, 0.0,
                                   f"{what} NaN/Inf in {'.'.join(str(x) for x in k)} from step "
                                   f"{int(d['step'].min())} ({n:.0f} values in {d['step'].nunique()} steps)"))
        lo = t.loss
        v = lo["loss"].to_numpy(np.float64)
        # NaN also stands for "no loss passed": a NaN loss counts once the run has a finite one
        bad = lo[np.isinf(v) | (np.isnan(v) & np.isfinite(v).any())]
        if len(bad):
            out.append(finding(None, "loss", bad["step"], float(len(bad)), 0.0,
                               f"the loss is NaN/Inf from step {int(bad['step'].min())} ({len(bad)} steps)"))
        return out


class AllZero(Rule):
    name = "all_zero"
    what = "a parameter's gradient, or an activation site, that is exactly zero everywhere at some steps"
    worse = "higher"          # value: the share of steps all zero (the threshold counts steps)
    thresholds = {"min_steps": Threshold(1, "SageMaker Debugger AllZero (fires at any step a tensor is all zero)",
                                         "steps that must be all zero", 1, 10 ** 9)}

    def missing(self, t):
        if NEED_CHECKS["grads"](t) and NEED_CHECKS["acts"](t):
            return "the trace has neither gradient nor activation statistics"
        return None

    def check(self, t, p):
        out = []
        if not NEED_CHECKS["grads"](t):
            g = t.grads
            z = g[(g["count"] > 0) & (g["max_abs"] == 0)]
            nu = (g[g["layer"].isin(z["layer"].unique())].groupby(["layer", "param"], observed=True)["step"]
                  .nunique() if len(z) else None)      # steps per (layer, param), of the ones with zeros only
            for (layer, param), d in z.groupby(["layer", "param"], sort=True, observed=True):
                n = int(nu.loc[(layer, param)])
                if len(d) >= p["min_steps"]:
                    out.append(finding(layer, param, d["step"], len(d) / max(n, 1), p["min_steps"],
                                       f"gradient of {layer}.{param} is all zero on {len(d)} of {n} steps"))
        if not NEED_CHECKS["acts"](t):
            a = t.acts
            z = a[a["zero"].astype(bool)]
            for site, d in z.groupby("site", sort=True):
                n = int((a["site"] == site).sum())
                if len(d) >= p["min_steps"]:
                    out.append(finding(site, None, d["step"], len(d) / max(n, 1), p["min_steps"],
                                       f"activation site {site!r} is all zero on {len(d)} of {n} recorded steps"))
        return out
