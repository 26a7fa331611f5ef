"""The loss figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import integer_x, mpl, overlay_epoch_means, plot


@plot(requires=("step", "epoch", "loss"))
def loss_curve(df: pd.DataFrame, ax, **opts):
    """Training loss per step (thin line) with each epoch's mean overlaid."""
    _, sns = mpl()
    d = df[["step", "epoch", "loss"]].sort_values("step")
    fin = d[np.isfinite(d["loss"].to_numpy(np.float64))]
    sns.lineplot(data=fin, x="step", y="loss", ax=ax, lw=0.8, alpha=0.8, color="#4c72b0",
                 label="per step", estimator=None, errorbar=None)
    overlay_epoch_means(ax, fin, "loss", color="#c44e52")
    integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel("loss (as passed to rec.step)")
    ax.set_title(opts.get("title", "Training loss"))
    ax.legend(loc="best", fontsize="small")
    return ax
