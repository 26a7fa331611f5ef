"""Pruning figures: sparsity versus threshold, per activation site (report) and per layer (``bbdecoder prune --sweep``)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from ...pruning import OVERALL
from .activations import site_lines, site_order
from .common import MAX_LEGEND, layer_label, mpl, new_figure, plot, save


@plot(requires=("threshold", "site", "sparsity"))
def pruning_sweep(df: pd.DataFrame, ax, order: Iterable[str] | None = None, chosen: float | None = None,
                  xlabel: str = "threshold", **opts):
    """Sparsity (fraction of a site's units that the dead criterion removes) versus the threshold,
    one line per site; the thick black line is all sites' units together, the dashed vertical line
    the threshold of this report."""
    plt, sns = mpl()
    d = df.copy()
    d["site"] = d["site"].astype(str)
    overall = d[d["site"] == "(all sites)"]
    per = d[d["site"] != "(all sites)"]
    rows = site_order(per, order)
    if len(per):
        site_lines(ax, per, "sparsity", rows, x="threshold", alpha=0.85)
    if len(overall):
        o = overall.sort_values("threshold")
        ax.plot(o["threshold"], o["sparsity"], color="black", lw=2.5, marker="o", ms=4, label="all sites",
                zorder=5)
        h, lab = ax.get_legend_handles_labels()
        if len(rows) <= MAX_LEGEND:
            ax.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    if chosen is not None and np.isfinite(chosen):
        ax.axvline(chosen, color="0.3", ls="--", lw=1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sparsity (fraction of units dead)")
    ax.set_title(opts.get("title", "Pruning sweep: sparsity versus threshold"))
    return ax


def sweep_figure(df, path: str, criterion: str) -> str:
    """Seaborn line plot of sparsity versus threshold (an :func:`analyzer.pruning.sweep` table), one line
    per layer that prunes anything, the overall sparsity thick; saved as PNG at ``path`` (returned)."""
    _, sns = mpl()
    fig, ax = new_figure(9, 4.6)
    ax = ax[0, 0]
    d = df.copy()
    moving = [n for n, g in d[d["layer"] != OVERALL].groupby("layer", sort=False) if g["sparsity"].max() > 0]
    per = d[d["layer"].isin(moving)].copy()
    per["layer"] = [layer_label(i, n) for i, n in zip(per["layer_id"], per["layer"])]
    if len(per):
        sns.lineplot(data=per, x="threshold", y="sparsity", hue="layer", marker="o", ax=ax,
                     legend=len(moving) <= MAX_LEGEND)
    o = d[d["layer"] == OVERALL].sort_values("threshold")
    ax.plot(o["threshold"], o["sparsity"], color="black", lw=2.5, marker="o", ms=4, label="overall", zorder=5)
    h, lab = ax.get_legend_handles_labels()
    if h:
        ax.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"threshold ({criterion})")
    ax.set_ylabel("sparsity (fraction of weights masked)")
    ax.set_title(f"Pruning sweep: {criterion}")
    return save(fig, path)
