"""The weights section: weight magnitude and update ratio (the per-layer weight distributions are in
the detail section, :mod:`.detail`)."""

from __future__ import annotations

from .. import plots


def add(rep) -> None:
    """Queue the weight figures; every one is skipped, with the reason, without weight snapshots."""
    ws = rep.data.ws1
    fws, note = rep.data.fig_ws, rep.data.rows_note   # grouped past MAX_LAYER_ROWS layers
    no = "no weight snapshots in the trace (weights_every=0)"
    if not len(ws):
        for n in ("weight magnitude", "weight update ratio"):
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
