"""Attention-IoU figures: pure functions over tidy DataFrames or arrays.

- :func:`attention_scores` (df, ax): mean score per split with bootstrap error bars, one hue per reference.
- :func:`attention_average_maps` (maps, fig): the average attention map of each split.
- :func:`attention_overlays` (maps, masks, fig): a few images' maps with their mask's outline.
- :func:`attention_over_time` (df, ax): the score of split "all" per capture step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import legend_outside, mpl, plot, text


@plot(["split", "boot_mean", "boot_std", "reference"])
def attention_scores(df: pd.DataFrame, ax, **opts):
    """Bars: bootstrap mean score per split (x) and reference (hue), error bars = bootstrap std."""
    _, sns = mpl()
    d = df.copy()
    d["reference"] = [text(r) for r in d["reference"]]
    order = list(dict.fromkeys(d["split"]))
    hues = list(dict.fromkeys(d["reference"]))
    sns.barplot(data=d, x="split", y="boot_mean", hue="reference", order=order, hue_order=hues, ax=ax,
                errorbar=None)
    width = 0.8 / max(len(hues), 1)
    for j, h in enumerate(hues):
        s = d[d["reference"] == h].set_index("split")
        xs = [i - 0.4 + width * (j + 0.5) for i, sp in enumerate(order) if sp in s.index]
        ys = [s.loc[sp, "boot_mean"] for sp in order if sp in s.index]
        es = [s.loc[sp, "boot_std"] for sp in order if sp in s.index]
        ax.errorbar(xs, ys, yerr=es, fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("split (images)")
    ax.set_ylabel("Attention-IoU (bootstrap mean ± std)")
    ax.tick_params(axis="x", rotation=30)
    legend_outside(ax, "reference")
    return ax


def attention_average_maps(maps: dict, fig, **opts):
    """One panel per split: the mean over its images of the [0, 1] attention maps (dict split -> (H, W))."""
    names = list(maps)
    n = len(names)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            im = ax.imshow(maps[names[i]], cmap="jet", vmin=0, vmax=1)
            ax.set_title(text(names[i]), fontsize="small")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="mean attention")
    return fig


def attention_overlays(maps: np.ndarray, masks: np.ndarray | None, fig, titles=None, **opts):
    """A few maps (k, H, W) with the outline (level 0.5) of each image's mask (k, H, W) in white."""
    k = len(maps)
    axes = fig.subplots(1, max(k, 1), squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= k:
            continue
        ax.imshow(maps[i], cmap="jet", vmin=0, vmax=1)
        if masks is not None and np.ptp(masks[i]) > 0:
            ax.contour(masks[i], levels=[0.5], colors="white", linewidths=1.2)
        if titles is not None:
            ax.set_title(text(titles[i]), fontsize="small")
    return fig


@plot(["step", "boot_mean", "boot_std", "reference"])
def attention_over_time(df: pd.DataFrame, ax, **opts):
    """Score of split "all" per capture step (x), one line per reference, bootstrap std as a band."""
    for ref, d in df.groupby("reference", sort=False):
        d = d.sort_values("step")
        ax.plot(d["step"], d["boot_mean"], marker="o", label=text(ref))
        ax.fill_between(d["step"], d["boot_mean"] - d["boot_std"], d["boot_mean"] + d["boot_std"], alpha=0.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step of the capture")
    ax.set_ylabel("Attention-IoU (all images)")
    legend_outside(ax, "reference")
    return ax
