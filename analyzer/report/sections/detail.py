"""The detail section: per-layer figures (the "layers" group, on the detail page) for the detail layers
(:meth:`Report.detail_ids <analyzer.report.build.Report.detail_ids>`): the gradient norms and the weight
distribution of each. It runs after the findings section, since by default the detail layers are the
ones a finding points at."""

from __future__ import annotations

import html

from .. import plots
from .common import file_key

NO_GRADS = "no gradients in the trace (grad_stats_every=0 and grads_every=0, or no recorded layer has a gradient)"
NO_WEIGHTS = "no weight snapshots in the trace (weights_every=0)"


def add(rep) -> None:
    """Queue the per-layer figures of the detail layers; skipped, with the reason, without the data."""
    detail = rep.detail_ids()
    rows = [r for r in rep.data.lt.itertuples(index=False) if int(r.id) in detail]
    if len(rep.data.gl):
        _grad_norms(rep, rows)
    else:
        rep.skip("figure per-layer gradient norms", NO_GRADS)
    if len(rep.data.ws1):
        _weight_distributions(rep, rows)
    else:
        rep.skip("figure per-layer weight distributions", NO_WEIGHTS)


def _grad_norms(rep, rows) -> None:
    gl = rep.data.gl
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


def _weight_distributions(rep, rows) -> None:
    ws = rep.data.ws1
    with rep.progress("report: weight distributions per layer", len(rows)) as bar:
        for L in rows:
            name = f"weight_dist_{file_key(L)}"
            if not L.selected:
                rep.skip(f"figure {name}", "layer not recorded")
            elif not (ws["layer_id"] == L.id).any():
                rep.skip(f"figure {name}", "no weight snapshots for this layer")
            else:
                h = rep.run.weight_histograms(int(L.id), bins=rep.bins)
                df = h.to_frame()
                why = plots.check(df, plots.weight_distribution)
                if why:
                    rep.skip(f"figure {name}", why)
                else:
                    def draw(df=df, L=L, h=h):
                        fig, ax = plots.new_figure(9, 4.8, layout=None)   # one of many alike
                        plots.weight_distribution(df, ax[0, 0], title=(
                            f"Distribution of {plots.text(h.param)} — layer "
                            f"{plots.layer_label(L.id, L.name)} ({plots.text(L.type)})"))
                        return plots.fixed_margins(fig, right=0.1)
                    rep.figure(name, f"Weight distribution: {L.id} {L.name}",
                               f"Histogram of <code>{html.escape(L.name)}.{html.escape(h.param)}</code> "
                               f"({html.escape(L.type)}) at every weight snapshot (x: snapshot step; y: "
                               f"weight value, {rep.bins} bins on edges shared by all snapshots, largest "
                               "at the top; colour: log(1 + number of elements), dashed white line at 0). "
                               "Widening means growing weights, a band that splits means clustering, mass "
                               "piling up at the edges means saturation or divergence.", draw, "layers",
                               layer=L)
            bar.update(1)
