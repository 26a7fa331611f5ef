"""The overview section: every layer at once, one layer x step heatmap per quantity (gradient L2 norm,
weight update ratio, weight L2 norm) and one activation site x step heatmap of the dead fraction and
of saturation; rows grouped by block, every row labelled, its full name in a tooltip."""

from __future__ import annotations

import html

import pandas as pd

from ... import activations as A
from ...activations.sites import site_family
from .. import plots
from ..data import layer_update_ratio, layer_weight_l2

#: the end of every overview caption
CAPTION_TAIL = (" Rows are layers in id order, labelled by name without the prefix all names share; white lines "
                "separate repeated blocks, named on the right. Hover a row for its full name (also in the layer "
                "table and tables/layers.csv). Blank cells were not recorded (or were zero).")


def intro_html(s: dict) -> str:
    """The overview's intro: how many layers the heatmaps show."""
    n = len(s["layers"])
    return (f"<p class='note'>All {n} layer{'s' if n != 1 else ''} at once. Per-layer figures are on the "
            "detail page for the layers you ask for (<code>detail</code>) or that a finding points at.</p>")


#: most rows that get a tooltip each (more would make the page heavy: 100,000 layers, 100,000 elements)
MAX_TOOLTIP_ROWS = 2000

#: the end of the activation heatmaps' captions
SITE_CAPTION_TAIL = (" Rows are activation sites in forward order, labelled by name without the prefix all names "
                     "share; white lines separate repeated blocks, named on the right; hover a row for its full "
                     "name. Blank cells were not recorded at that step.")


def _heatmap(rep, name: str, what: str, df, plotfn, caption: str, tail: str = CAPTION_TAIL,
             log: bool = True) -> None:
    why = plots.check(df, plotfn)
    if why:
        rep.skip(f"figure {what}", why)
        return

    def draw(df=df):
        return plots.heatmap_figure(plotfn, df)
    nsteps = df["step"].nunique()
    binned = (f" The {nsteps} steps are averaged{' (in log10)' if log else ''} into {plots.MAX_HEATMAP_COLUMNS} "
              "columns of consecutive steps." if nsteps > plots.MAX_HEATMAP_COLUMNS else "")
    rows = df["layer_id"].nunique()
    rep.figure(name, what[0].upper() + what[1:], caption + tail + binned, draw, "overview",
               areas=plots.heatmap_areas(plotfn, df) if rows <= MAX_TOOLTIP_ROWS else ())


def activation_frames(rep) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(dead fraction per (step, site), saturation per (step, site)) at the report's thresholds, from
    :func:`analyzer.activations.dead_per_step` and :func:`analyzer.activations.saturation`; computed
    once per report (kept in ``rep.extra``) for the overview and the activations section."""
    key = "_activation_frames"
    if key not in rep.extra:
        a, run = rep.act, rep.run
        rep.extra[key] = (A.dead_per_step(run, a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"]),
                          A.saturation(run, a["delta"]))
    return rep.extra[key]


def add(rep) -> None:
    """Queue the overview heatmaps; each is skipped, with the reason, when the trace lacks its data."""
    _layer_heatmaps(rep)
    rep.drawing.meanwhile()   # drawn while the activation statistics below are read
    _site_heatmaps(rep)


def _layer_heatmaps(rep) -> None:
    gl, ws, note = rep.data.fig_gl, rep.data.fig_ws, rep.data.rows_note   # grouped past MAX_LAYER_ROWS (H3)
    if not len(gl):
        rep.skip("figure gradient heatmap", "no gradients in the trace (grad_stats_every=0 and grads_every=0, "
                                            "or no recorded layer has a gradient)")
    else:
        _heatmap(rep, "grad_heatmap", "gradient heatmap", gl, plots.grad_heatmap,
                 "log10 of each layer's gradient L2 norm (all parameters of the layer together) at every "
                 "recorded step, brighter = larger. A dark row is a layer whose gradient is orders of magnitude "
                 "smaller than the others' (vanishing); a vertical bright stripe is a step with a gradient "
                 "spike across layers." + note)
    if not len(ws):
        for what in ("update ratio heatmap", "weight norm heatmap"):
            rep.skip(f"figure {what}", "no weight snapshots in the trace (weights_every=0)")
        return
    ur = layer_update_ratio(ws)
    _heatmap(rep, "update_ratio_heatmap", "update ratio heatmap", ur, plots.update_ratio_heatmap,
             "log10 of each layer's update ratio ‖w<sub>t</sub> − w<sub>prev</sub>‖ / ‖w<sub>prev</sub>‖ "
             "between consecutive weight snapshots (all the layer's parameters together; it accumulates every "
             "optimizer step between two snapshots). About −3 per step is the usual heuristic; a row far below "
             "barely learns, far above is unstable." + note)
    _heatmap(rep, "weight_l2_heatmap", "weight norm heatmap", layer_weight_l2(ws), plots.weight_l2_heatmap,
             "log10 of each layer's weight L2 norm √Σ‖w<sub>p</sub>‖² at every snapshot. A row that keeps "
             "growing can mean missing weight decay or divergence; a row fading, dying weights." + note)


def _first_rank(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["rank"] == df["rank"].min()].drop(columns="rank") if "rank" in df.columns and len(df) else df


def _site_heatmaps(rep) -> None:
    """The dead fraction and saturation heatmaps (activation site x step)."""
    sites = rep.run.sites
    if not len(sites):
        for what in ("dead fraction heatmap", "saturation heatmap"):
            rep.not_recorded.append(f"figure {what}: the trace has no activation statistics (record with "
                                    "Recorder(..., activations='all') or a selection of modules and functional "
                                    "activations)")
        return
    order = [str(x) for x in sites["name"]]
    dps, sat = (_first_rank(x) for x in activation_frames(rep))
    crit = _criterion(rep.act)
    if not len(dps):
        rep.not_recorded.append("figure dead fraction heatmap: no activation statistics recorded (the "
                                "activations_every schedule never fired)")
        return
    _heatmap(rep, "dead_fraction_heatmap", "dead fraction heatmap",
             plots.site_rows(dps, order), plots.dead_fraction_heatmap,
             f"Fraction of each activation site's units dead <em>at that step</em> under {html.escape(crit)} "
             "(white 0, dark red 1). A row that darkens over time is a layer dying during training; a dark row "
             "from the start is dead from initialisation. Smooth kinds (GELU, SiLU) are judged with their flat "
             "negative tail as the dead band. The run-level counts are in tables/dead_layers.csv.",
             SITE_CAPTION_TAIL, log=False)
    judged = set(sat["site"].astype(str)) if len(sat) else set()
    left = [S for S in rep.run.catalog.sites if S["name"] not in judged]
    smooth = sorted({str(S["kind"]) for S in left if site_family(S) == "smooth"})
    note = (f" Not shown: {len(left)} of {len(order)} sites, whose kind has no saturation rule"
            + (f" (smooth kinds {', '.join(smooth)}: unbounded above, their flat negative tail is judged as dead "
               "units instead; plain module outputs: no bound)" if smooth else " (plain module outputs: no bound)")
            + "." if left else "")
    if not len(sat):
        rep.skip("figure saturation heatmap", "no activation site of a kind with a saturation rule (ReLU family, "
                 "sigmoid, tanh, hardtanh, relu6, softmax; GELU, SiLU and plain module outputs are not judged)")
        return
    _heatmap(rep, "saturation_heatmap", "saturation heatmap", plots.site_rows(sat, order), plots.saturation_heatmap,
             "Fraction of each site's values saturated at that step, by the rule of its kind: sigmoid, hardtanh, "
             f"relu6 within delta = {rep.act['delta']:g} of a bound, tanh |a| > 1 − delta, softmax rows whose "
             "largest probability exceeds 1 − delta; ReLU family: the fraction at or below zero (no gradient "
             "there)." + html.escape(note), SITE_CAPTION_TAIL, log=False)


def _criterion(a: dict) -> str:
    from .activations import criterion_text
    return criterion_text(a)


__all__ = ["add", "intro_html", "activation_frames"]
