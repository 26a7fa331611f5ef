"""The weights section: weight magnitude, update ratio and, for the detail layers, one weight
distribution per layer (the "layers" group)."""

from __future__ import annotations

import html

from .. import plots
from .common import file_key


def add(rep) -> None:
    """Queue the weight figures; every one is skipped, with the reason, without weight snapshots."""
    lt, ws = rep.data.lt, rep.data.ws1
    fws, note = rep.data.fig_ws, rep.data.rows_note   # grouped past MAX_LAYER_ROWS layers
    no = "no weight snapshots in the trace (weights_every=0)"
    if not len(ws):
        for n in ("weight magnitude", "weight update ratio", "per-layer weight distributions"):
            rep.skip(f"figure {n}", no)
        return
    why = plots.check(fws, plots.weight_magnitude)
    if why:
        rep.skip("figure weight magnitude", why)
    else:
        def draw():
            fig, ax = plots.new_figure(10, 4.8)
            plots.weight_magnitude(fws, ax[0, 0])
            return fig
        rep.figure("weight_magnitude", "Weight magnitude",
                   "L2 norm ‖w‖₂ of every parameter (colour: layer, line style: parameter, e.g. weight or "
                   "bias) at every weight snapshot, log scale. Steady growth can mean missing weight "
                   "decay or divergence; a collapsing norm, dying weights." + note, draw, "weights")
    why = plots.check(fws, plots.update_ratio)
    if why:
        rep.skip("figure weight update ratio",
                 "needs at least two weight snapshots" if "update_ratio" in why else why)
    else:
        def draw():
            fig, ax = plots.new_figure(10, 4.8)
            plots.update_ratio(fws, ax[0, 0])
            return fig
        rep.figure("update_ratio", "Weight update ratio",
                   "‖w_t − w_prev‖₂ / ‖w_prev‖₂ between consecutive weight snapshots for every parameter "
                   "(log scale; the first snapshot has no predecessor and is not drawn). Note that it "
                   "accumulates all optimizer steps between two snapshots. Ratios around 1e-3 per step "
                   "are typical; far below means the parameter barely learns, far above means it is "
                   "unstable (SageMaker's rule flags > 10 or < 1e-8)." + note, draw, "weights")
    detail = rep.detail_ids()
    rows = [r for r in lt.itertuples(index=False) if int(r.id) in detail]
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
