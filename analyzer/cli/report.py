"""`bbdecoder report`: the HTML report of a run (figures, tables, summary.json) into --out."""

from __future__ import annotations

import os

import click

from .main import echo, open_run, out_dir


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Directory for the report.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (files of the same names are replaced).")
@click.option("--detail", "detail", default=None,
              help="Layers that get per-layer figures on layers.html: ids, names, globs or types, 'all' or 'none' "
                   "(default: the --layers selection when given, else the layers a finding points at).")
@click.option("--layers", "layer_spec", default=None,
              help="Layers: ids, dotted names, globs or type names, comma-separated (default: all).")
@click.option("--bins", default=64, show_default=True, type=click.IntRange(1, 10000),
              help="Bins of the weight histograms.")
@click.option("--dead-criterion", default="strict", show_default=True,
              type=click.Choice(["strict", "apoz", "dormant"]),
              help="Dead units: strict (never above --dead-threshold), apoz (fraction of values <= 0 at least "
                   "--dead-threshold) or dormant (E|h| / layer mean <= --dead-threshold).")
@click.option("--dead-threshold", default=0.0, show_default=True, type=float,
              help="Threshold of the dead criterion (strict: value units; apoz: a fraction; dormant: >= 0).")
@click.option("--max-active-fraction", default=0.0, show_default=True, type=float,
              help="strict only (at threshold 0): dead when active (> 0) in at most this fraction of values.")
@click.option("--layer-share", default=0.5, show_default=True, type=float,
              help="Flag a site when more than this share of its units are dead (or saturated).")
@click.option("--delta", default=0.03, show_default=True, type=float,
              help="Saturation margin: bounded activations within delta of a bound are saturated.")
@click.option("--unit-fraction", default=0.5, show_default=True, type=float,
              help="A unit is saturated when more than this fraction of its values are.")
@click.option("--sim-dim", default=1, show_default=True, type=int,
              help="Dimension (sample axis = 0) of the variance and similarity figure.")
@click.option("--sim-method", default="cosine", show_default=True, type=click.Choice(["cosine", "kl"]),
              help="Similarity between slices: cosine, or KL divergence of their softmaxes.")
@click.option("--raster-site", default=None,
              help="Activation site of the unit x step raster (default: the site with the most dead units).")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "dask"]),
              help="How gradient and weight passes map over the shards: in this process, or with dask (extra "
                   "'dask'; a local cluster, or the scheduler at $BBDECODER_DASK_SCHEDULER). Same numbers.")
@click.option("--jobs", default=None, type=click.IntRange(1, 256),
              help="Processes drawing the figures (default: the CPUs available, at most 4; each adds some memory "
                   "of its own, about 20 MB in the out-of-core benchmark; 1: no extra process).")
@click.option("--depth", default=None, type=click.IntRange(0, 1000),
              help="Module depth of the FLOPs and time table and of the module graph (runs with a function graph; "
                   "default: the shallowest depth whose repeated blocks hold most of the FLOPs).")
def report(run_dir: str, out: str, layer_spec: str | None, bins: int, dead_criterion: str, dead_threshold: float,
           max_active_fraction: float, layer_share: float, delta: float, unit_fraction: float, sim_dim: int,
           sim_method: str, raster_site: str | None, engine: str = "local", jobs: int | None = None,
           force: bool = False, detail: str | None = None, depth: int | None = None) -> None:
    """Write an HTML report with figures, tables and summary.json for RUN_DIR into --out.

    Every threshold is an analysis-time option, written to summary.json: a rerun with other thresholds
    into another --out needs no retraining."""
    from ..report import build_report, check_activation_options
    act = check_activation_options(dead_criterion, dead_threshold, max_active_fraction, layer_share, delta,
                                   unit_fraction, sim_dim, sim_method, raster_site)
    run = open_run(run_dir, engine)
    run.select(layer_spec)  # unknown layers fail before anything is written
    if detail is not None and detail.strip() not in ("all", "none"):
        run.select(detail)
    if raster_site is not None:
        from ..activations import select_site
        select_site(run, raster_site)  # likewise an unknown or ambiguous site
    from ..report.build import FIG_DIR, TAB_DIR
    out = out_dir(out, force=force, subdirs=(FIG_DIR, TAB_DIR))
    try:
        summary = build_report(run, out, layers=layer_spec, bins=bins, jobs=jobs, detail=detail, depth=depth, **act)
    finally:
        if engine == "dask":
            from ..engine import close_owned_client
            close_owned_client()
    echo(f"report: {os.path.join(out, 'index.html')}")
    for w in summary.get("skipped", []) + summary.get("not_recorded", []):
        echo(f"note: {w}", err=True)
