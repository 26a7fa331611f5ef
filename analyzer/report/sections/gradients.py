"""The gradients section: gradient flow and the variance panel. The layer x step heatmap is in the
overview, the per-layer gradient norms in the detail section (:mod:`.detail`)."""

from __future__ import annotations

from .. import plots
from ..data import grad_variance_epoch_table


def add(rep) -> None:
    """Queue the gradient figures; every one is skipped, with the reason, without gradients."""
    gl = rep.data.gl
    fgs, fge, fgl, note = rep.data.fig_gs, rep.data.fig_ge, rep.data.fig_gl, rep.data.rows_note   # grouped rows
    no = ("no gradients in the trace (grad_stats_every=0 and grads_every=0, or no recorded layer has a "
          "gradient)")
    names = ["gradient flow", "gradient variance"]
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
