"""Weight figures: magnitude and update ratio per parameter, the distribution of one parameter over time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import (MAX_LEGEND, integer_x, layer_order, line_legend, mpl, no_minor_log_ticks, palette, plot, positive,
                     series_lines, value_ticks, with_labels)


@plot(requires=("step", "bin_left", "bin_right", "count"))
def weight_distribution(df: pd.DataFrame, ax, **opts):
    """Distribution of one parameter's weights over time: snapshot step on x, weight value on y
    (largest at the top), colour = log(1 + count) of elements in each bin."""
    m = df.pivot_table(index="bin_left", columns="step", values="count", aggfunc="sum").sort_index(ascending=False)
    edges_left = m.index.to_numpy(np.float64)
    width = float(np.median(df["bin_right"] - df["bin_left"])) if len(df) else 0.0
    steps = m.columns.to_numpy()
    z = np.log1p(m.to_numpy(np.float64))
    nb, ns = z.shape
    # cell (i, j) covers [j, j+1] x [i, i+1] with row 0 at the top, as in a seaborn heatmap (whose
    # extra full draw of the figure cost a third of this figure's time)
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(0, ns, nb, 0))
    ax.figure.colorbar(im, ax=ax, label="log(1 + count)")
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    value_ticks(ax, steps, 10)
    # y: rows are bins, the top row the highest; ticks at round weight values
    if nb:
        from matplotlib.ticker import MaxNLocator
        lo, hi = float(edges_left.min()), float(edges_left.max() + width)
        t = MaxNLocator(nbins=8).tick_values(lo, hi)
        t = t[(t >= lo) & (t <= hi)]
        ax.set_yticks((hi - t) / (hi - lo) * nb)
        ax.set_yticklabels([f"{v:.3g}" if abs(v) > 1e-12 * max(abs(lo), abs(hi)) else "0" for v in t], rotation=0)
        if lo < 0 < hi:
            ax.axhline(hi / (hi - lo) * nb, color="white", lw=0.6, ls="--", alpha=0.7)
    ax.set_xlabel("snapshot step")
    ax.set_ylabel("weight value")
    ax.set_title(opts.get("title", "Weight distribution over time"))
    return ax


@plot(requires=("step", "layer_id", "layer", "param", "l2"))
def weight_magnitude(df: pd.DataFrame, ax, **opts):
    """L2 norm of every parameter at every snapshot: colour by layer, dash style by parameter, log y."""
    return _param_lines(df, ax, "l2", "‖w‖₂ (weight units)", opts.get("title", "Weight magnitude over time"))


@plot(requires=("step", "layer_id", "layer", "param", "update_ratio"))
def update_ratio(df: pd.DataFrame, ax, **opts):
    """‖w_t − w_prev‖ / ‖w_prev‖ between consecutive snapshots per parameter (log y); the first
    snapshot (no predecessor) is dropped."""
    d = df[np.isfinite(df["update_ratio"].to_numpy(np.float64))]
    return _param_lines(d, ax, "update_ratio", "‖Δw‖ / ‖w‖ (between snapshots)",
                        opts.get("title", "Weight update ratio over time"))


def _param_lines(df: pd.DataFrame, ax, col: str, ylabel: str, title: str):
    plt, _ = mpl()
    d = with_labels(df.sort_values(["layer_id", "param", "step"]))
    d[col] = positive(d[col])
    params = list(dict.fromkeys(d["param"]))
    order = layer_order(d)
    few_points = bool(d.groupby(["layer_id", "param"]).size().max() <= 20)
    styled = len(params) <= 6
    kw = dict(style="param" if styled else None, styles=params if styled else None, markers=few_points, lw=1.2,
              units="param")
    if len(order) <= MAX_LEGEND:
        colors = dict(zip(order, palette("tab10" if len(order) <= 10 else "tab20", len(order))))
        series_lines(ax, d, "step", col, "layer_label", colors.__getitem__, **kw)
        line_legend(ax, list(colors.items()), "layer", params if styled else None, "param", few_points)
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        cmap = plt.get_cmap("viridis")
        series_lines(ax, d, "step", col, "layer_id", lambda i: cmap(norm(float(i))), **kw)
        sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    ax.set_yscale("log")
    no_minor_log_ticks(ax)
    integer_x(ax)
    ax.set_xlabel("snapshot step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return ax
