"""The run's own tables: layers, steps, gradient and weight statistics, and the per-layer headline
numbers (as in summary.json)."""

from __future__ import annotations


def add(rep) -> None:
    """Write the report's base tables (tables/*.csv)."""
    d = rep.data
    rep.table("layers", d.layers.assign(in_report=d.layers["id"].isin(d.ids)),
              "layer table: id, dotted name, type, parameter count, key, recorded, in this report")
    rep.table("steps", d.steps, "one row per recorded step: step, epoch, loss, time (s), wall, dropped")
    rep.step_table("grad_stats_step", d.gs_all, "gradient statistics per (step, layer, parameter)")
    rep.table("grad_stats_epoch", d.ge_all, "gradient statistics per (epoch, layer, parameter), "
              "incl. l2_var and grad_noise")
    rep.step_table("grad_stats_layer", d.gl_all, "gradient statistics per (step, layer), parameters pooled")
    rep.step_table("weight_stats", d.ws, "weight statistics per (snapshot, layer, parameter), incl. update_ratio")
    rep.table("layer_summary", d.summary, "headline numbers per layer (as in summary.json)")
