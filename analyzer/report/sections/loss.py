"""The loss section: the training loss per step with each epoch's mean."""

from __future__ import annotations

from .. import plots


def add(rep) -> None:
    """Queue the loss figure (skipped without a recorded loss)."""
    steps = rep.data.steps
    why = plots.check(steps, plots.loss_curve)
    if why:
        rep.skip("figure loss", "no loss recorded (pass loss= to rec.step)" if len(steps) else "no steps recorded")
        return

    def draw():
        fig, ax = plots.new_figure(9, 4)
        plots.loss_curve(steps, ax[0, 0])
        return fig
    rep.figure("loss", "Training loss",
               "Loss passed to <code>rec.step(loss=...)</code> at every recorded step (thin blue line); "
               "the thick red segments are each epoch's mean loss, drawn across the epoch's steps "
               "(dotted vertical lines mark epoch boundaries). A falling red staircase means "
               "training makes progress; a flat or rising one deserves a look.", draw, "loss")
