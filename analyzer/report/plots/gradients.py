"""Gradient figures: gradient flow, per-layer norms, variance and the layer x step heatmap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ...stats import stats_from_sums
from .common import (MAX_LEGEND, inside_legend, integer_x, layer_order, line_legend, mpl, no_minor_log_ticks, palette,
                     overlay_epoch_means, plot, positive, series_lines, with_labels)


def _layer_hue(ax, d: pd.DataFrame, x: str, y: str, legend: bool = True, **line_kw):
    """Lines coloured by layer (:func:`series_lines`): a legend for a few layers (unless ``legend`` is
    False), a colour bar (by id) for many."""
    plt, _ = mpl()
    order = layer_order(d)
    if len(order) <= MAX_LEGEND:
        colors = dict(zip(order, palette("tab10" if len(order) <= 10 else "tab20", len(order))))
        series_lines(ax, d, x, y, "layer_label", colors.__getitem__, **line_kw)
        if legend:
            line_legend(ax, list(colors.items()), "layer")
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        cmap = plt.get_cmap("viridis")
        series_lines(ax, d, x, y, "layer_id", lambda i: cmap(norm(float(i))), **line_kw)
        if legend:
            sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
            ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    return ax


def _auto_log(ax, values, axis: str = "y", ratio: float = 100.0) -> None:
    """Log scale when the positive values span more than ``ratio``."""
    v = positive(values)
    v = v[np.isfinite(v)]
    if len(v) and v.max() / v.min() > ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def gradient_flow_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer over all steps (rows = per-step, per-layer gradient statistics):
    mean |g| = sum(l1) / sum(count), max |g| = max(max_abs), steps = rows."""
    g = df.groupby(["layer_id", "layer"], sort=True)
    out = g.agg(l1=("l1", "sum"), count=("count", "sum"), max_abs=("max_abs", "max"),
                steps=("l1", "size")).reset_index()
    out["abs_mean"] = stats_from_sums(count=out["count"].to_numpy(), sum_abs=out["l1"].to_numpy())["abs_mean"]
    return out[["layer_id", "layer", "steps", "count", "l1", "abs_mean", "max_abs"]]


@plot(requires=("layer_id", "layer", "l1", "count", "max_abs"))
def grad_flow(df: pd.DataFrame, ax, **opts):
    """Gradient flow (BBDecoder 1.x): per layer, mean |g| and max |g| over the steps in ``df`` as
    side-by-side bars on a log axis, layers in id order. ``df``: per-step, per-layer rows."""
    t = with_labels(gradient_flow_table(df))
    order = layer_order(t)
    t = t.set_index("layer_label").reindex(order)
    x = np.arange(len(order))
    # two bars per layer, as seaborn's barplot with hue draws them (at a fraction of its cost)
    ax.bar(x - 0.2, positive(t["max_abs"]), 0.4, color="#4c72b0", label="max |g|")
    ax.bar(x + 0.2, positive(t["abs_mean"]), 0.4, color="#dd8452", label="mean |g|")
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.xaxis.grid(False)
    ax.set_yscale("log")
    no_minor_log_ticks(ax)
    ax.set_xlabel("layer (id: name)")
    ax.set_ylabel("|gradient| (gradient units)")
    ax.set_title(opts.get("title", "Gradient flow: mean |g| and max |g| per layer"))
    n = len(order)
    step = max(1, math.ceil(n / 60))
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels(order[::step], rotation=90 if n > 4 else 0, fontsize="small" if n > 20 else None)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return ax


@plot(requires=("step", "epoch", "l1", "l2"))
def grad_norm_series(df: pd.DataFrame, ax, stat: str = "l2", **opts):
    """One norm of one layer's gradient per iteration (thin line) with each epoch's mean overlaid
    (thick segment across the epoch's steps, dot at its centre)."""
    d = df.sort_values("step")
    # one line, no aggregation: matplotlib directly (a seaborn lineplot costs ~30 ms more per panel)
    ax.plot(d["step"].to_numpy(), d[stat].to_numpy(np.float64), lw=0.8, alpha=0.8, color="#4c72b0",
            label="per iteration")
    overlay_epoch_means(ax, d, stat, color="#c44e52")
    _auto_log(ax, d[stat])
    no_minor_log_ticks(ax)
    if ax.get_yscale() == "linear":
        from matplotlib.ticker import FormatStrFormatter
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    name = {"l1": "L1 norm  sum |g|", "l2": "L2 norm  sqrt(sum g²)"}.get(stat, stat)
    ax.set_ylabel(name)
    integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_title(opts.get("title", name))
    inside_legend(ax.legend(loc="best", fontsize="small", frameon=True))
    return ax


@plot(requires=("step", "epoch", "l1", "l2"), kind="fig")
def grad_norms(df: pd.DataFrame, fig, **opts):
    """Two panels, L1 and L2 norm of one layer's gradient per iteration, epoch means overlaid."""
    axes = fig.subplots(2, 1, sharex=True)
    grad_norm_series(df, axes[0], stat="l1", title="L1 norm of the gradient")
    grad_norm_series(df, axes[1], stat="l2", title="L2 norm of the gradient")
    axes[0].set_xlabel("")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("step", "layer_id", "layer", "var"))
def grad_variance_step(df: pd.DataFrame, ax, **opts):
    """Variance of each layer's gradient elements at every iteration (one line per layer, log y).
    ``legend=False`` leaves out the layer legend (when a neighbouring panel shows it)."""
    d = with_labels(df.sort_values(["layer_id", "step"]))
    d["var"] = positive(d["var"])
    _layer_hue(ax, d, "step", "var", legend=opts.get("legend", True), lw=0.8)
    ax.set_yscale("log")
    no_minor_log_ticks(ax)
    integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel("Var(g) over the layer's elements (g²)")
    ax.set_title(opts.get("title", "Gradient variance per iteration"))
    return ax


@plot(requires=("epoch", "layer_id", "layer", "statistic", "value"))
def grad_variance_epoch(df: pd.DataFrame, ax, **opts):
    """Per epoch and layer, several variance statistics (column ``statistic``), log y: lines by layer,
    dash style by statistic."""
    plt, _ = mpl()
    d = with_labels(df.sort_values(["layer_id", "epoch"]))
    d["value"] = positive(d["value"])
    stats = list(dict.fromkeys(d["statistic"]))
    order = layer_order(d)
    kw = dict(style="statistic", styles=stats, markers=True)
    if len(order) <= MAX_LEGEND:
        colors = dict(zip(order, palette("tab10" if len(order) <= 10 else "tab20", len(order))))
        series_lines(ax, d, "epoch", "value", "layer_label", colors.__getitem__, **kw)
        line_legend(ax, list(colors.items()), "layer", stats, "statistic", markers=True)
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        cmap = plt.get_cmap("viridis")
        series_lines(ax, d, "epoch", "value", "layer_id", lambda i: cmap(norm(float(i))), **kw)
        line_legend(ax, [], None, stats, None, markers=True, loc="best", bbox_to_anchor=None)   # styles only
        sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    ax.set_yscale("log")
    no_minor_log_ticks(ax)
    epochs = sorted(d["epoch"].unique())
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("variance (g²)")
    ax.set_title(opts.get("title", "Gradient variance per epoch"))
    return ax
