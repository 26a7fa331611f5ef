"""The loss figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import inside_legend, integer_x, overlay_epoch_means, plot


@plot(requires=("step", "epoch", "loss"))
def loss_curve(df: pd.DataFrame, ax, **opts):
    """Training loss per step (thin line) with each epoch's mean overlaid."""
    d = df[["step", "epoch", "loss"]].sort_values("step")
    fin = d[np.isfinite(d["loss"].to_numpy(np.float64))]
    ax.plot(fin["step"].to_numpy(np.float64), fin["loss"].to_numpy(np.float64), lw=0.8, alpha=0.8, color="#4c72b0",
            label="per step")
    overlay_epoch_means(ax, fin, "loss", color="#c44e52")
    integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel("loss (as passed to rec.step)")
    ax.set_title(opts.get("title", "Training loss"))
    inside_legend(ax.legend(loc="best", fontsize="small"))
    return ax
