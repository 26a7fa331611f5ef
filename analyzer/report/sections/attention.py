"""The attention section: Attention-IoU scores per split, average maps, overlays and the score over
training, from the run's attention captures (recorder.capture_attention); and the attention entropy
per head over steps of every eager softmax site (:func:`analyzer.activations.health.attention_entropy`)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ...activations.health import attention_entropy
from ...attention_iou import attention_iou, capture_maps, splits
from ...cam import resize_bilinear
from ...trace import format as fmt
from ...trace.captures import open_captures
from .. import plots

#: Images drawn in the overlay figure.
N_OVERLAYS = 6
#: Bootstrap resamples used by the report (the CLI defaults to 10,000).
REPORT_BOOTSTRAP = 1000


def section_data(run, n_boot: int = REPORT_BOOTSTRAP, seed: int = 0, caps: list | None = None) -> dict:
    """Everything the report's attention section draws, from the latest capture (and every capture for
    the time series). Returns {} when the run has no capture.

    Returns:
        dict: capture (the Capture), target, scores (DataFrame of mask scores, or heatmap scores between
        the first two targets when no masks were captured), time (DataFrame over captures or None),
        avg_maps {split: (H, W) float32}, overlays (k, H, W) float32, overlay_masks (k, H, W) or None.
    """
    caps = run.catalog.captures() if caps is None else caps
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
            mm = resize_bilinear(mm, ov.shape[-2:])
        ov_masks = mm
    return {"capture": cap, "target": target, "scores": scores,
            "time": pd.concat(time_parts, ignore_index=True) if time_parts else None,
            "avg_maps": avg, "overlays": ov, "overlay_masks": ov_masks,
            "overlay_mask_name": cap.mask_names[cap.mask_keys[0]] if cap.mask_keys else None}


#: softmax sites drawn in the entropy figure (the first ones of the forward)
MAX_ENTROPY_SITES = 12


def add_entropy(rep) -> None:
    """Attention entropy per head over steps, one panel per softmax site (the table ``attention_entropy``);
    nothing for a run without eager softmax sites."""
    try:
        df = attention_entropy(rep.run)
    except fmt.TraceError as e:
        rep.skip("figure attention_entropy", str(e))
        return
    if not len(df):
        return
    rep.table("attention_entropy", df, "per (step, site, head): mean row entropy of the attention probabilities "
              "(nats), normalized by log Tk, and the largest attention logit (docs/findings.md)")
    sites = list(dict.fromkeys(df["site"]))[:MAX_ENTROPY_SITES]

    def draw():
        ncols = min(3, len(sites))
        nrows = -(-len(sites) // ncols)
        fig, axes = plots.new_figure(4.2 * ncols, 2.8 * nrows, nrows, ncols, sharex=True)
        for ax, site in zip(axes.flat, sites):
            d = df[df["site"] == site]
            for head, g in d.groupby("head"):
                ax.plot(g["step"], g["norm_entropy"], lw=1.2, label="site" if head < 0 else f"head {head}")
            ax.set_title(site, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("step")
            ax.set_ylabel("entropy / log Tk")
        for ax in list(axes.flat)[len(sites):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7, ncol=2)
        return fig
    more = f" (the first {MAX_ENTROPY_SITES} of {df['site'].nunique()} sites)" if df["site"].nunique() > len(sites) \
        else ""
    rep.figure("attention_entropy", "Attention entropy per head", "Mean entropy of each head's attention rows "
               "divided by log Tk (1: uniform over every key; a causal mask keeps a uniform head near 0.69 at "
               f"16 tokens), per recorded step{more}. A head whose curve drops towards 0 attends to one key: "
               "entropy collapse (rule <code>attention_entropy_collapse</code>).", draw, "activations")


def add(rep) -> None:
    """Attention-IoU section: scores per split, average maps, overlays, score over capture steps, from
    the latest attention capture; summary.json's "attention". Also the attention entropy figure."""
    add_entropy(rep)
    bad: list[str] = []
    try:
        caps = open_captures(rep.run.path, bad)     # a malformed capture is skipped with a note
        data = section_data(rep.run, caps=caps)
    except fmt.TraceError as e:
        rep.skip("attention section", str(e))
        return
    finally:
        for why in bad:
            rep.skip("attention capture", why)
    if not data:   # noted in summary.json only: a run without captures is the normal case
        rep.extra["attention"] = {"captures": 0, "note": "no attention captures (recorder.capture_attention)"}
        return
    cap, target = data["capture"], data["target"]
    rep.extra["attention"] = {"captures": len(caps), "capture": cap.index, "step": cap.step,
                      "target": target, "method": "gradcam", "bootstrap": REPORT_BOOTSTRAP,
                      "scores": [] if data["scores"] is None else data["scores"][
                          ["reference", "split", "n", "mean", "boot_mean", "boot_std"]].to_dict(orient="records")}
    where = f"capture {cap.index} (step {cap.step}), target <code>{html.escape(target)}</code>, Grad-CAM"
    sc = data["scores"]
    if sc is not None and len(sc):
        rep.table("attention_iou", sc, f"Attention-IoU of {target!r} per split and reference "
                  f"(capture {cap.index}, Grad-CAM, {REPORT_BOOTSTRAP} bootstrap resamples)")

        def draw_scores():
            fig, ax = plots.new_figure(9, 4.2)
            plots.attention_scores(sc, ax[0, 0])
            return fig
        rep.figure("attention_scores", "Attention-IoU per split", f"{where}: mean Attention-IoU S of the "
                   "maps against each mask group (or the second target's maps), per split: all images, correct "
                   "and incorrect predictions, and each joint value of the captured group labels. Bars: "
                   f"bootstrap mean ({REPORT_BOOTSTRAP} resamples); whiskers: bootstrap std. Rescore with "
                   "<code>bbdecoder attention-iou</code> (other method, resolution, mask group, 10,000 "
                   "resamples).", draw_scores, "attention")
    else:
        rep.skip("figure attention_scores", "the capture has no masks and a single target")
    if data["avg_maps"]:
        def draw_avg():
            n = len(data["avg_maps"])
            fig = plots.figure(min(4, n) * 2.6 + 1, int(np.ceil(n / 4)) * 2.6)
            return plots.attention_average_maps(data["avg_maps"], fig)
        rep.figure("attention_average_maps", "Average attention maps", f"{where}: the mean of the "
                   "per-image [0, 1] maps (at the image size) over each split's images.", draw_avg, "attention")

    def draw_ov():
        fig = plots.figure(2.3 * max(len(data["overlays"]), 1), 2.6)
        return plots.attention_overlays(data["overlays"], data["overlay_masks"], fig,
                                     titles=[f"image {i}" for i in range(len(data["overlays"]))])
    mname = data["overlay_mask_name"]
    rep.figure("attention_overlays", "Attention overlays", f"{where}: the first images' maps" +
               (f", with the outline of mask group <code>{html.escape(mname)}</code> in white." if mname else
                 " (no masks were captured)."), draw_ov, "attention")
    tm = data["time"]
    if tm is not None and tm["step"].nunique() > 1:
        rep.table("attention_iou_time", tm, f"Attention-IoU of {target!r} (all images) per capture")

        def draw_time():
            fig, ax = plots.new_figure(9, 4)
            plots.attention_over_time(tm, ax[0, 0])
            return fig
        rep.figure("attention_over_time", "Attention-IoU over training", f"Target <code>"
                   f"{html.escape(target)}</code>, Grad-CAM: the score over all images of each capture, by the "
                   "training step at which it was taken; band: bootstrap std.", draw_time, "attention")
    else:
        rep.skip("figure attention_over_time", "fewer than two captures at different steps")
