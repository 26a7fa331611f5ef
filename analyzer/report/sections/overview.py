"""The overview section: every layer at once, one layer x step heatmap per quantity (gradient L2 norm,
weight update ratio, weight L2 norm), rows grouped by block and every layer labelled."""

from __future__ import annotations

from .. import plots
from ..data import layer_update_ratio, layer_weight_l2

#: the end of every overview caption
CAPTION_TAIL = (" Rows are layers in id order, labelled by name without the prefix all names share; white lines "
                "separate repeated blocks, named on the right. Full names are in the layer table and "
                "tables/layers.csv. Blank cells were not recorded (or were zero).")


def intro_html(s: dict) -> str:
    """The overview's intro: how many layers the heatmaps show."""
    n = len(s["layers"])
    return (f"<p class='note'>All {n} layer{'s' if n != 1 else ''} at once. Per-layer figures are on the "
            "detail page for the layers you ask for (<code>detail</code>) or that a finding points at.</p>")


def _heatmap(rep, name: str, what: str, df, plotfn, caption: str) -> None:
    why = plots.check(df, plotfn)
    if why:
        rep.skip(f"figure {what}", why)
        return

    def draw(df=df):
        return plots.heatmap_figure(plotfn, df)
    nsteps = df["step"].nunique()
    binned = (f" The {nsteps} steps are averaged (in log10) into {plots.MAX_HEATMAP_COLUMNS} columns of "
              "consecutive steps." if nsteps > plots.MAX_HEATMAP_COLUMNS else "")
    rep.figure(name, what[0].upper() + what[1:], caption + CAPTION_TAIL + binned, draw, "overview")


def add(rep) -> None:
    """Queue the overview heatmaps; each is skipped, with the reason, when the trace lacks its data."""
    gl, ws = rep.data.gl, rep.data.ws1
    if not len(gl):
        rep.skip("figure gradient heatmap", "no gradients in the trace (grad_stats_every=0 and grads_every=0, "
                                            "or no recorded layer has a gradient)")
    else:
        _heatmap(rep, "grad_heatmap", "gradient heatmap", gl, plots.grad_heatmap,
                 "log10 of each layer's gradient L2 norm (all parameters of the layer together) at every "
                 "recorded step, brighter = larger. A dark row is a layer whose gradient is orders of magnitude "
                 "smaller than the others' (vanishing); a vertical bright stripe is a step with a gradient "
                 "spike across layers.")
    if not len(ws):
        for what in ("update ratio heatmap", "weight norm heatmap"):
            rep.skip(f"figure {what}", "no weight snapshots in the trace (weights_every=0)")
        return
    ur = layer_update_ratio(ws)
    _heatmap(rep, "update_ratio_heatmap", "update ratio heatmap", ur, plots.update_ratio_heatmap,
             "log10 of each layer's update ratio ‖w<sub>t</sub> − w<sub>prev</sub>‖ / ‖w<sub>prev</sub>‖ "
             "between consecutive weight snapshots (all the layer's parameters together; it accumulates every "
             "optimizer step between two snapshots). About −3 per step is the usual heuristic; a row far below "
             "barely learns, far above is unstable.")
    _heatmap(rep, "weight_l2_heatmap", "weight norm heatmap", layer_weight_l2(ws), plots.weight_l2_heatmap,
             "log10 of each layer's weight L2 norm √Σ‖w<sub>p</sub>‖² at every snapshot. A row that keeps "
             "growing can mean missing weight decay or divergence; a row fading, dying weights.")


__all__ = ["add", "intro_html"]
