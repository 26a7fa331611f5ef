"""The gradients section: gradient flow, the variance panel and, for the detail layers
(:meth:`Report.detail_ids <analyzer.report.build.Report.detail_ids>`), one figure of gradient norms per
layer (the "layers" group). The layer x step heatmap is in the overview."""

from __future__ import annotations

import html

from .. import plots
from ..data import grad_variance_epoch_table
from .common import file_key


def add(rep) -> None:
    """Queue the gradient figures; every one is skipped, with the reason, without gradients."""
    lt, gs, ge, gl = rep.data.lt, rep.data.gs, rep.data.ge, rep.data.gl
    fgs, fge, fgl, note = rep.data.fig_gs, rep.data.fig_ge, rep.data.fig_gl, rep.data.rows_note   # grouped rows
    no = ("no gradients in the trace (grad_stats_every=0 and grads_every=0, or no recorded layer has a "
          "gradient)")
    names = ["gradient flow", "gradient variance", "per-layer gradient norms"]
    if not len(gl):
        for n in names:
            rep.skip(f"figure {n}", no)
        return
    why = plots.check(fgl, plots.grad_flow)
    if why:
        rep.skip("figure gradient flow", why)
    else:
        def draw():
            n = fgl["layer_id"].nunique()
            fig, ax = plots.new_figure(max(7.0, min(18.0, 3 + 0.45 * n)), 4.8)
            plots.grad_flow(fgl, ax[0, 0])
            return fig
        rep.figure("grad_flow", "Gradient flow",
                   "Per layer (x, in id order), mean |g| (orange) and max |g| (blue) of the gradient over "
                   "every recorded step, on a log scale (gradient units). mean |g| = Σ L1 / Σ elements "
                   "over all steps, max |g| = largest element ever seen. Bars falling by orders of "
                   "magnitude towards the input layers suggest vanishing gradients; a very large max "
                   "next to a small mean points to rare exploding elements." + note, draw, "gradients")
    gv = grad_variance_epoch_table(fgl, fge, fgs[["layer_id", "param", "numel"]].drop_duplicates())
    why_s = plots.check(fgl, plots.grad_variance_step)
    why_e = plots.check(gv, plots.grad_variance_epoch)
    if why_s and why_e:
        rep.skip("figure gradient variance", why_s)
    else:
        def draw():
            fig, ax = plots.new_figure(13, 4.5, 1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
            if why_s:
                ax[0, 0].set_axis_off()
            else:
                plots.grad_variance_step(fgl, ax[0, 0], legend=bool(why_e))
            if why_e:
                ax[0, 1].set_axis_off()
            else:
                plots.grad_variance_epoch(gv, ax[0, 1])
            return fig
        rep.figure("grad_variance", "Gradient variance",
                   "Left: variance of a layer's gradient elements at each iteration (all parameters of the "
                   "layer pooled; squared gradient units, log scale), one line per layer (colours as on "
                   "the right). Right, per epoch "
                   "and layer: solid = the epoch mean of that per-iteration variance; dashed = gradient "
                   "noise, each element's variance across the epoch's iterations averaged over the layer's "
                   "elements (the grad_noise of its parameters weighted by their element counts; 0 and "
                   "hence not drawn for an epoch with one recorded step). Noise large next to the "
                   "per-iteration spread means the mini-batch gradient direction is unstable." + note,
                   draw, "gradients")
    detail = rep.detail_ids()
    rows = [r for r in lt.itertuples(index=False) if int(r.id) in detail]
    with rep.progress("report: gradient norms per layer", len(rows)) as bar:
        for L in rows:
            d = gl[gl["layer_id"] == L.id]
            why = plots.check(d, plots.grad_norms)
            if why:
                rep.skip(f"figure grad_norms_{file_key(L)}",
                         "layer not recorded" if not L.selected else
                         ("no gradients for this layer" if not len(d) else why))
            else:
                def draw(d=d, L=L):
                    fig = plots.figure(9, 5.5, layout=None)      # one of many alike: fixed margins
                    plots.grad_norms(d, fig, title=f"Gradient norms — layer {plots.layer_label(L.id, L.name)} "
                                                   f"({plots.text(L.type)})")
                    return plots.fixed_margins(fig, top=0.75)
                rep.figure(f"grad_norms_{file_key(L)}", f"Gradient norms: {L.id} {L.name}",
                           f"Layer {L.id} <code>{html.escape(L.name)}</code> ({html.escape(L.type)}), all "
                           "parameters together. Top: L1 norm Σ|g|; bottom: L2 norm √Σg² of the gradient at "
                           "every recorded iteration (thin blue), with each epoch's mean as a thick red "
                           "segment across the epoch's steps. The y axis turns logarithmic when the values "
                           "span more than a factor of 100.", draw, "layers", layer=L)
            bar.update(1)
