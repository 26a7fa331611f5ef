"""Overlay figures of two runs (``bbdecoder compare``): one statistic per figure, run A solid and run B
dashed, one colour per layer or site, the first divergence step of each marked."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import MAX_LEGEND, integer_x, legend_outside, mpl, plot, text


@plot(requires=("step", "layer", "a", "b"))
def run_overlay(df: pd.DataFrame, ax, **opts):
    """Both runs' values of one statistic per step (``df``: step, layer, a, b; optional ``first_step``
    per layer: the divergence, a dot on run B's line). Log y for positive statistics."""
    _, sns = mpl()
    layers = list(dict.fromkeys(df["layer"]))[:MAX_LEGEND]
    colors = sns.color_palette("husl", max(len(layers), 1))
    for c, layer in zip(colors, layers):
        d = df[df["layer"] == layer].sort_values("step")
        ax.plot(d["step"], d["a"], color=c, lw=1.0, label=text(layer))
        ax.plot(d["step"], d["b"], color=c, lw=1.0, ls="--")
        if "first_step" in d and d["first_step"].notna().any():
            s = int(d["first_step"].dropna().iloc[0])
            hit = d[d["step"] == s]
            ax.plot(hit["step"], hit["b"], "o", color=c, ms=5)
    v = df[["a", "b"]].to_numpy(np.float64)
    if len(v) and np.nanmin(v) > 0:
        ax.set_yscale("log")
    integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel(text(opts.get("ylabel", "value")))
    ax.set_title(text(opts.get("title", "run A (solid) and run B (dashed)")))
    legend_outside(ax, "layer / site")
    return ax
