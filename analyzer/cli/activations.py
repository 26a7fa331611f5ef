"""`bbdecoder dead` and `bbdecoder saturation`: dead and saturated units per activation site."""

from __future__ import annotations

import click

from ..trace.format import TraceError
from ..values import fraction
from .main import echo, open_run, records_json


def _no_sites(run) -> None:
    if not run.catalog.sites:
        raise TraceError(f"no activation sites in {run.path} (record with Recorder(..., activations=True) "
                         "or a selection of modules and functional activations)")


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--criterion", default="strict", show_default=True, type=click.Choice(["strict", "apoz", "dormant"]),
              help="strict: never above --threshold; apoz: fraction of values <= 0 at least --threshold; "
                   "dormant: E|h| / the site's mean E|h| at most --threshold.")
@click.option("--threshold", default=0.0, show_default=True, type=float, help="Threshold of the criterion.")
@click.option("--max-active-fraction", default=0.0, show_default=True, type=float,
              help="strict only (at threshold 0): dead when active (> 0) in at most this fraction of values.")
@click.option("--layer-share", default=0.5, show_default=True, type=float,
              help="Flag a site when more than this share of its units are dead.")
@click.option("--sites", "site_spec", default=None,
              help="Activation sites: names, globs, kinds or families, comma-separated (default: all).")
@click.option("--per-unit", is_flag=True, help="One row per unit (only the dead ones unless --all).")
@click.option("--all", "all_units", is_flag=True, help="With --per-unit: every unit, dead or not.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
def dead(run_dir: str, criterion: str, threshold: float, max_active_fraction: float, layer_share: float,
         site_spec: str | None, per_unit: bool, all_units: bool, as_json: bool) -> None:
    """Dead units per activation site of RUN_DIR at any threshold: site, kind, units, dead,
    dead_fraction, flagged (or per unit with --per-unit)."""
    from ..report import dead_layer_table
    run = open_run(run_dir)
    du = run.dead_units(criterion, threshold, max_active_fraction, sites=site_spec, layer_share=layer_share)
    _no_sites(run)
    if per_unit:
        df = du[["site", "kind", "unit", "active_fraction", "max", "score", "dead", "died_at"]]
        if not all_units:
            df = df[df["dead"]]
        df = df.reset_index(drop=True)
    else:
        df = dead_layer_table(du)
    if as_json:
        echo(records_json(df))
    elif not len(df):
        echo("no dead units" if per_unit and len(du) else "no activation statistics recorded")
    else:
        echo(df.to_string(index=False, na_rep="-"))
    if not as_json and criterion == "apoz":
        from ..activations.sites import SMOOTH_KINDS
        kinds = sorted({k for k in du["kind"] if k in SMOOTH_KINDS})
        if kinds:
            echo(f"not judged: APoZ counts zeros, which {', '.join(kinds)} never output (use strict or dormant)")


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--delta", default=0.03, show_default=True, type=float,
              help="Saturation margin: bounded activations within delta of a bound are saturated.")
@click.option("--unit-fraction", default=0.5, show_default=True, type=float,
              help="A unit is saturated when more than this fraction of its values are.")
@click.option("--layer-share", default=0.5, show_default=True, type=float,
              help="Flag a site when more than this share of its units are saturated.")
@click.option("--sites", "site_spec", default=None,
              help="Activation sites: names, globs, kinds or families, comma-separated (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
def saturation(run_dir: str, delta: float, unit_fraction: float, layer_share: float, site_spec: str | None,
               as_json: bool) -> None:
    """Saturation per activation site of RUN_DIR: site, kind, saturated (fraction of values),
    saturated_units (share of units saturated in more than --unit-fraction of their values), flagged."""
    from ..activations import saturation_layers
    unit_fraction = fraction("--unit-fraction", unit_fraction)
    layer_share = fraction("--layer-share", layer_share)
    run = open_run(run_dir)
    df = saturation_layers(run, delta, unit_fraction=unit_fraction, layer_share=layer_share, sites=site_spec)
    _no_sites(run)
    if as_json:
        echo(records_json(df))
        return
    if not len(df):
        echo("no activation site of a saturating kind (ReLU family, sigmoid, tanh, hardtanh, relu6, softmax) "
             "selected")
    else:
        echo(df.to_string(index=False, na_rep="-"))
    for line in _notes(run, site_spec):
        echo(line)


def _notes(run, site_spec) -> list[str]:
    """Lines under `saturation`: smooth sites not judged, and attention probabilities not observable."""
    from ..activations.sites import attention_note, select_sites, site_family
    smooth = [S for S in select_sites(run, site_spec) if site_family(S) == "smooth"]
    out = []
    if smooth:
        kinds = ", ".join(sorted({S["kind"] for S in smooth}))
        out.append(f"not judged: {len(smooth)} site(s) of kind {kinds} (unbounded above; the flat negative tail "
                   "is judged as dead units: bbdecoder dead, strict)")
    note = attention_note(run)
    if note:
        out.append("note: " + note)
    return out
