"""`bbdecoder compare`: two runs aligned by step; the first divergence per layer and statistic, a
similar_across_runs verdict, and with --out the tables, summary.json and overlay figures."""

from __future__ import annotations

import json
import os

import click

from ..values import json_safe
from .main import echo, open_run, out_dir

#: statistic -> y label of its overlay figure
LABELS = {"grad_norm": "gradient L2 norm", "update_ratio": "update ratio per step", "act_rms": "activation RMS",
          "act_std": "activation spread (mean unit std)", "loss": "loss"}


@click.command("compare")
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--out", "out", default=None, type=click.Path(),
              help="Directory for divergence.csv, series.csv, summary.json and the overlay figures.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
@click.option("--tolerance", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Relative difference beyond which a statistic diverges (0.5: one run 1.5x the other).")
@click.option("--window", default=5, show_default=True, type=click.IntRange(1, 100000),
              help="Trailing median of this many steps applied to each series before comparing.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def compare_cmd(run_a: str, run_b: str, out: str | None, force: bool, tolerance: float, window: int,
                as_json: bool) -> None:
    """Compare RUN_A and RUN_B step by step: per layer, the first step where the gradient norm, update ratio
    or activation statistics diverge, and whether the runs are similar across runs."""
    from ..compare import compare
    a, b = open_run(run_a), open_run(run_b)
    if out is not None:
        out = out_dir(out, force=force or False)      # a non-empty --out is refused before any work
    comp = compare(a, b, tolerance=tolerance, window=window)
    summary = dict(comp.summary(), run_a=a.path, run_b=b.path)
    if out is not None:
        summary["figures"] = write_outputs(comp, out)
    if as_json:
        echo(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    else:
        for d in summary["diverged"]:
            echo(f"diverged: {d['statistic']} of {d['layer']} from step {d['first_step']} (A {d['a']:.4g}, "
                 f"B {d['b']:.4g})")
        echo(f"similar_across_runs: {'yes' if comp.similar else 'no'} ({comp.steps} aligned steps, "
             f"{summary['series']} series, tolerance {tolerance:g})")
        if out is not None:
            echo(f"compare: {out}")


def write_outputs(comp, out: str) -> list[str]:
    """Tables, summary.json and one overlay figure per statistic into ``out``; returns the figure files."""
    from ..report.plots import compare as P
    from ..report.plots.common import new_figure, save
    from ..trace.files import atomic_write, write_text_atomic
    from ..values import csv_safe
    for name, df in (("divergence", comp.divergence), ("series", comp.series)):
        atomic_write(os.path.join(out, f"{name}.csv"), lambda p, df=df: csv_safe(df).to_csv(p, index=False))
    figs = []
    first = comp.divergence.set_index(["statistic", "layer"])["first_step"]
    for stat, d in comp.series.groupby("statistic", sort=True):
        d = d.assign(first_step=[first.get((stat, x)) for x in d["layer"]])
        fig, axes = new_figure(9.0, 4.5)
        P.run_overlay(d, axes[0, 0], ylabel=LABELS.get(stat, stat), title=f"{LABELS.get(stat, stat)}: "
                      "run A (solid), run B (dashed), first divergence (dot)")
        save(fig, os.path.join(out, f"compare_{stat}.png"))
        figs.append(f"compare_{stat}.png")
    write_text_atomic(os.path.join(out, "summary.json"),
                      json.dumps(json_safe(dict(comp.summary(), figures=figs)), indent=1, allow_nan=False) + "\n")
    return figs
