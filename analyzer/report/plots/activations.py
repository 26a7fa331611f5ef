"""Activation figures: dead units (heatmap, raster), saturation, distributions, variance and similarity.
The site helpers (:func:`site_order`, :func:`site_lines`) serve the pruning sweep too."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from .common import (MAX_HEATMAP_COLUMNS, MAX_LEGEND, bin_columns, cell_image, integer_x, line_legend, mpl, no_minor_log_ticks, palette,
                     plot, positive, series_lines, text, value_ticks)

#: kinds whose saturation is the share at or below zero (as analyzer.activations.sites.RELU_KINDS)
RELU_KINDS = ("relu", "leaky_relu", "elu", "softplus")

#: Most rows (units) the unit x step raster draws; more units are grouped (fraction dead per group).
MAX_RASTER_ROWS = 256


def site_order(df: pd.DataFrame, order: Iterable[str] | None) -> list[str]:
    """Sites present in ``df``, in ``order`` (the trace's forward order) where given."""
    present = list(dict.fromkeys(df["site"].astype(str)))
    if order is None:
        return present
    order = [str(s) for s in order]
    return [s for s in order if s in set(present)] + [s for s in present if s not in set(order)]


def site_palette(n: int):
    """Colours of ``n`` sites: tab10, tab20, or viridis beyond 20."""
    return palette("tab10" if n <= 10 else "tab20" if n <= 20 else "viridis", n)


def site_lines(ax, d: pd.DataFrame, y: str, order: list[str], legend: bool = True, style: str | None = None,
               x: str = "step", **kw) -> None:
    """One line per site (colour by site in forward order); a legend for a few sites, a colour bar
    (forward position) for many. ``style``: a column picking each line's dash pattern."""
    plt, _ = mpl()
    d = d.copy()
    d["site"] = d["site"].astype(str)
    many = len(order) > MAX_LEGEND
    few_points = bool(d.groupby("site").size().max() <= 30) if len(d) else False
    if style is None and few_points:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 4)
        kw.setdefault("markeredgecolor", "white")
        kw.setdefault("markeredgewidth", 0.5)
    colors = dict(zip(order, site_palette(len(order))))
    series_lines(ax, d, x, y, "site", colors.__getitem__, style=style, markers=few_points and style is not None,
                 label_of=text, lw=1.2, **kw)
    if many and legend:
        sm = plt.cm.ScalarMappable(norm=plt.Normalize(0, len(order) - 1), cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"site, forward order ({len(order)} sites)", pad=0.02)
    elif legend and len(d):
        present = set(d["site"])
        line_legend(ax, [(text(s), c) for s, c in colors.items() if s in present], None,
                    list(dict.fromkeys(d[style])) if style else None, None, few_points)


@plot(requires=("step", "site", "dead_fraction"))
def dead_heatmap(df: pd.DataFrame, ax, order: Iterable[str] | None = None,
                 max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Site x step heatmap of the fraction of each site's units dead at that step (0 light, 1 dark
    red); rows in ``order`` (forward order), columns steps (averaged over bins of consecutive steps
    when there are more than ``max_columns``)."""
    d = df[["step", "site", "dead_fraction"]].copy()
    d["site"] = d["site"].astype(str)
    rows = site_order(d, order)
    steps = np.sort(d["step"].unique())
    col = bin_columns(steps, max_columns)
    d["col"] = col[np.searchsorted(steps, d["step"].to_numpy())]
    m = d.pivot_table(index="site", columns="col", values="dead_fraction", aggfunc="mean", dropna=False)
    m = m.reindex(index=rows, columns=np.arange(col[-1] + 1 if len(col) else 0))
    z = m.to_numpy(np.float64)
    cell_image(ax, z, "Reds", 0.0, 1.0, "fraction of units dead")
    value_ticks(ax, pd.Series(steps).groupby(col).min().to_numpy(), 10)
    n = len(rows)
    ys = max(1, math.ceil(n / 40))
    ax.set_yticks(np.arange(0, n, ys) + 0.5)
    ax.set_yticklabels([text(s) for s in rows[::ys]], rotation=0, fontsize="small" if n > 15 else None)
    binned = len(steps) > z.shape[1]
    ax.set_xlabel("step" + (f" ({len(steps)} steps averaged into {z.shape[1]} columns)" if binned else ""))
    ax.set_ylabel("activation site (forward order)")
    ax.set_title(opts.get("title", "Dead units per site and step"))
    return ax


@plot(requires=("step", "unit", "dead"))
def dead_raster(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, max_rows: int = MAX_RASTER_ROWS,
                **opts):
    """Unit x step raster of one site: dark where a unit is dead at a step. More than ``max_rows``
    units (or ``max_columns`` steps) are grouped; a cell then shows the fraction dead in its group."""
    steps = np.sort(df["step"].unique())
    units = np.sort(df["unit"].unique())
    col = bin_columns(steps, max_columns)
    row = bin_columns(units, max_rows)
    d = pd.DataFrame({"col": col[np.searchsorted(steps, df["step"].to_numpy())],
                      "row": row[np.searchsorted(units, df["unit"].to_numpy())],
                      "dead": df["dead"].to_numpy(np.float64)})
    m = d.pivot_table(index="row", columns="col", values="dead", aggfunc="mean", dropna=False)
    m = m.reindex(index=np.arange(row[-1] + 1 if len(row) else 0), columns=np.arange(col[-1] + 1 if len(col) else 0))
    z = m.to_numpy(np.float64)
    grouped = z.shape[0] < len(units) or z.shape[1] < len(steps)
    cell_image(ax, z, "Greys", 0.0, 1.0, "fraction dead in the cell", colorbar=grouped)
    value_ticks(ax, pd.Series(steps).groupby(col).min().to_numpy(), 10)
    from matplotlib.ticker import MaxNLocator
    first_unit = pd.Series(units).groupby(row).min().to_numpy()
    t = MaxNLocator(nbins=10, integer=True).tick_values(first_unit[0], first_unit[-1]) if len(units) else []
    t = [v for v in t if first_unit[0] <= v <= first_unit[-1]]
    ax.set_yticks(np.interp(t, first_unit, np.arange(len(first_unit))) + 0.5 if len(t) else [])
    ax.set_yticklabels([f"{int(v)}" for v in t], rotation=0)
    ax.set_xlabel("step" + (f" ({len(steps)} steps into {z.shape[1]} columns)" if z.shape[1] < len(steps) else ""))
    ax.set_ylabel("unit" + (f" ({len(units)} units into {z.shape[0]} rows)" if z.shape[0] < len(units) else ""))
    ax.set_title(opts.get("title", "Dead units over time (black = dead at that step)"))
    return ax


@plot(requires=("step", "site", "kind", "saturated"), kind="fig")
def saturation_lines(df: pd.DataFrame, fig, order: Iterable[str] | None = None, **opts):
    """Saturated fraction per site over the steps: one panel for bounded kinds (sigmoid, tanh,
    hardtanh, softmax: fraction within delta of a bound) and one for the ReLU family (fraction at or
    below zero), whichever are present; one line per site."""
    d = df[np.isfinite(df["saturated"].to_numpy(np.float64))].copy()
    d["site"] = d["site"].astype(str)
    relu = d["kind"].isin(RELU_KINDS)   # smooth kinds (GELU, SiLU) are not judged: no rows
    parts = [(p, t, y) for p, t, y in (
        (d[~relu], "Bounded activations: values within delta of a bound", "fraction saturated"),
        (d[relu], "ReLU family: values at or below zero", "fraction <= 0")) if len(p)]
    axes = fig.subplots(1, max(1, len(parts)), squeeze=False)[0]
    for ax, (p, title, ylabel) in zip(axes, parts):
        site_lines(ax, p, "saturated", site_order(p, order))
        ax.set_ylim(-0.02, 1.02)
        integer_x(ax)
        ax.set_xlabel("step (iteration)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


def box_strip(ax, v: pd.DataFrame, col: str, labels: list[str], many: bool) -> None:
    """Per label (row i of a categorical y axis, the first at the top): a box of ``v[col]`` over the
    rows of ``v`` with that "site_label" (quartiles, whiskers at 1.5 IQR, no fliers) and every value as
    a dot jittered by up to +-0.2 rows (a fixed generator: the figure is reproducible). The layout of
    seaborn's boxplot + stripplot, drawn with matplotlib alone."""
    groups = {k: g.to_numpy(np.float64) for k, g in v.groupby("site_label", sort=False)[col]}
    data = [groups.get(lab, np.empty(0)) for lab in labels]
    idx = [i for i, a in enumerate(data) if len(a)]
    if idx:
        line = dict(color="0.3", linewidth=0.8)
        ax.boxplot([data[i] for i in idx], positions=idx, orientation="horizontal", widths=0.6, showfliers=False,
                   patch_artist=True, manage_ticks=False, boxprops=dict(facecolor="#c6dbef", edgecolor="0.3",
                   linewidth=0.8), whiskerprops=line, capprops=line, medianprops=line)
        xs = np.concatenate([data[i] for i in idx])
        ys = np.repeat(np.asarray(idx, np.float64), [len(data[i]) for i in idx])
        ys += np.random.default_rng(0).uniform(-0.2, 0.2, len(ys))
        size = 2.0 if many else 3.0
        ax.scatter(xs, ys, s=size ** 2, color="#08519c", alpha=0.5 if many else 0.8, linewidths=0, zorder=3)
    ax.set_yticks(np.arange(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.yaxis.grid(False)


@plot(requires=("site", "unit", "mean", "min", "max", "frac_active"), kind="fig")
def activation_distributions(df: pd.DataFrame, fig, order: Iterable[str] | None = None, **opts):
    """Per site (rows, forward order), the distribution over its units of: the fraction of values
    > 0 (left) and the mean activation with the range of the per-unit min and max (right); a box
    per site with every unit as a dot."""
    d = df.copy()
    d["site"] = d["site"].astype(str)
    rows = site_order(d, order)
    d["site_label"] = d["site"].map(text)
    labels = [text(s) for s in rows]
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)[0]
    many = d.groupby("site").size().max() > 200
    for ax, col, xlabel, title in ((axes[0], "frac_active", "fraction of values > 0 (per unit)",
                                    "Active fraction per unit"),
                                   (axes[1], "mean", "mean activation (per unit); grey: min … max",
                                    "Mean, min and max per unit")):
        v = d[np.isfinite(d[col].to_numpy(np.float64))]
        if col == "mean":
            rng = d.groupby("site_label").agg(lo=("min", "min"), hi=("max", "max")).reindex(labels)
            for i, (lo, hi) in enumerate(zip(rng["lo"], rng["hi"])):
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.plot([lo, hi], [i, i], color="0.75", lw=6, solid_capstyle="butt", zorder=0)
        box_strip(ax, v, col, labels, many)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("activation site (forward order)" if col == "frac_active" else "")
        ax.set_title(title, fontsize="medium")
        if col == "frac_active":
            ax.set_xlim(-0.03, 1.03)
        else:
            lo = np.nanmin(d["min"].to_numpy(np.float64)) if len(d) else 0.0
            hi = np.nanmax(d["max"].to_numpy(np.float64)) if len(d) else 1.0
            if np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) > 100:
                ax.set_xscale("symlog", linthresh=1.0)
                if lo >= 0:   # nothing negative (ReLU family): no empty negative decades
                    ax.set_xlim(left=-0.05)
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("step", "site", "variance", "similarity"), kind="fig")
def variance_similarity(df: pd.DataFrame, fig, order: Iterable[str] | None = None, method: str = "cosine",
                        dim: int = 1, **opts):
    """Per site with raw samples, over the recorded steps: the variance across dimension ``dim``
    (left, log y when it spans > 100x) and the mean pairwise similarity of the slices along it
    (right; cosine in [-1, 1] or KL divergence in nats)."""
    d = df.copy()
    d["site"] = d["site"].astype(str)
    rows = site_order(d, order)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    v = d[np.isfinite(d["variance"].to_numpy(np.float64))].copy()
    pos = positive(v["variance"])
    pos = pos[np.isfinite(pos)]
    log = bool(len(pos) and pos.max() / pos.min() > 100.0)
    if log:                       # zero variance cannot be drawn on a log axis: a gap in the line
        v["variance"] = positive(v["variance"])
    site_lines(axes[0], v, "variance", rows, legend=False)
    if log:
        axes[0].set_yscale("log")
        no_minor_log_ticks(axes[0])
    axes[0].set_ylabel(f"variance across dim {dim} (mean over positions)")
    axes[0].set_title(f"Variance across dimension {dim}", fontsize="medium")
    s = d[np.isfinite(d["similarity"].to_numpy(np.float64))]
    site_lines(axes[1], s, "similarity", rows)
    if method == "cosine":
        axes[1].set_ylim(-1.05, 1.05)
        axes[1].set_ylabel("mean cosine similarity of distinct slices")
    else:
        axes[1].set_ylabel("mean KL(p_i || p_j) of slice softmaxes (nats)")
    axes[1].set_title(f"Similarity between slices along dimension {dim} ({method})", fontsize="medium")
    for ax in axes:
        integer_x(ax)
        ax.set_xlabel("step (samples recorded)")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig
