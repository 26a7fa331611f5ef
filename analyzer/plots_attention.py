"""Attention-IoU figures and the data behind the report's attention section (no torch).

Plots are pure functions over tidy DataFrames or arrays, as in :mod:`analyzer.plots`:

- :func:`attention_scores` (df, ax): mean score per split with bootstrap error bars, one hue per reference.
- :func:`attention_average_maps` (maps, fig): the average attention map of each split.
- :func:`attention_overlays` (maps, masks, fig): a few images' maps with their mask's outline.
- :func:`attention_over_time` (df, ax): the score of split "all" per capture step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import plots

#: Images drawn in the overlay figure.
N_OVERLAYS = 6
#: Bootstrap resamples used by the report (the CLI defaults to 10,000).
REPORT_BOOTSTRAP = 1000


@plots.plot(["split", "boot_mean", "boot_std", "reference"])
def attention_scores(df: pd.DataFrame, ax, **opts):
    """Bars: bootstrap mean score per split (x) and reference (hue), error bars = bootstrap std."""
    _, sns = plots._mpl()
    d = df.copy()
    d["reference"] = [plots.text(r) for r in d["reference"]]
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
    plots._legend_outside(ax, "reference")
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
            ax.set_title(plots.text(names[i]), fontsize="small")
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
            ax.set_title(plots.text(titles[i]), fontsize="small")
    return fig


@plots.plot(["step", "boot_mean", "boot_std", "reference"])
def attention_over_time(df: pd.DataFrame, ax, **opts):
    """Score of split "all" per capture step (x), one line per reference, bootstrap std as a band."""
    for ref, d in df.groupby("reference", sort=False):
        d = d.sort_values("step")
        ax.plot(d["step"], d["boot_mean"], marker="o", label=plots.text(ref))
        ax.fill_between(d["step"], d["boot_mean"] - d["boot_std"], d["boot_mean"] + d["boot_std"], alpha=0.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step of the capture")
    ax.set_ylabel("Attention-IoU (all images)")
    plots._legend_outside(ax, "reference")
    return ax


def section_data(run, n_boot: int = REPORT_BOOTSTRAP, seed: int = 0) -> dict:
    """Everything the report's attention section draws, from the latest capture (and every capture for
    the time series). Returns {} when the run has no capture.

    Returns:
        dict: capture (the Capture), target, scores (DataFrame of mask scores, or heatmap scores between
        the first two targets when no masks were captured), time (DataFrame over captures or None),
        avg_maps {split: (H, W) float32}, overlays (k, H, W) float32, overlay_masks (k, H, W) or None.
    """
    from .attention_iou import attention_iou, capture_maps, splits
    caps = run.catalog.captures()
    if not caps:
        return {}
    cap = caps[-1]
    target = cap.targets[0]["name"]
    refs = [("mask", g) for g in cap.mask_names.values()]
    if not refs and len(cap.targets) > 1:
        refs = [("heatmap", cap.targets[1]["name"])]
    parts, time_parts = [], []
    for kind, ref in refs:
        kw = {"mask_group": ref} if kind == "mask" else {"protected": ref}
        parts.append(attention_iou(cap, target, method="gradcam", n_boot=n_boot, seed=seed, **kw))
        if len(caps) > 1:
            for c in caps:
                if c.target(target) and (kind != "mask" or ref in c.mask_names.values()):
                    d = attention_iou(c, target, method="gradcam", n_boot=n_boot, seed=seed, by=None, **kw)
                    time_parts.append(d[d["split"] == "all"])
    scores = pd.concat(parts, ignore_index=True) if parts else None
    sp = splits(cap, target)
    sums = {name: None for name, _ in sp}
    first_maps = []
    for s, m in capture_maps(cap, target, "gradcam", "image"):
        for name, sel in sp:
            part = m[sel[s:s + len(m)]].sum(0)
            sums[name] = part if sums[name] is None else sums[name] + part
        if sum(len(x) for x in first_maps) < N_OVERLAYS:
            first_maps.append(m[:N_OVERLAYS])
    avg = {f"{name} (n={int(sel.sum())})": (sums[name] / sel.sum()).astype(np.float32)
           for name, sel in sp if sel.sum() > 0}
    ov = np.concatenate(first_maps)[:N_OVERLAYS]
    ov_masks = None
    if cap.mask_keys:
        mk = cap.mask_keys[0]
        mm = cap.read([f"masks/{mk}"], 0, N_OVERLAYS)[f"masks/{mk}"].astype(np.float32)
        if mm.shape[-2:] != ov.shape[-2:]:
            from .cam import resize_bilinear
            mm = resize_bilinear(mm, ov.shape[-2:])
        ov_masks = mm
    return {"capture": cap, "target": target, "scores": scores,
            "time": pd.concat(time_parts, ignore_index=True) if time_parts else None,
            "avg_maps": avg, "overlays": ov, "overlay_masks": ov_masks,
            "overlay_mask_name": cap.mask_names[cap.mask_keys[0]] if cap.mask_keys else None}
