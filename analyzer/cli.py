"""`bbdecoder` command line: a thin click group over the analyzer's Python API.

Bad input never shows a traceback: every error becomes one line on stderr and exit status 2
(1 for unexpected failures; set BBDECODER_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import json
import os
import sys

import click

from .trace.format import TraceError


class UsageProblem(Exception):
    """A problem with the user's input that is not a trace problem (e.g. an unwritable --out)."""


def _progress(label: str, total: int):
    return click.progressbar(length=max(total, 1), label=label, file=sys.stderr,
                             show_pos=True) if total > 1 and sys.stderr.isatty() else _Quiet()


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, n):
        pass


def _open(path: str, engine: str = "local"):
    from . import run as _run
    return _run.open(path, progress=_progress, engine=engine)


def check_out_dir(out: str) -> str:
    """Create ``out`` if needed and make sure it is a writable directory; returns its absolute path."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageProblem(f"--out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageProblem(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageProblem(f"--out {out} is not writable")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bbdecoder", prog_name="bbdecoder")
def cli() -> None:
    """BBDecoder: record what happens inside a PyTorch network during training, explain it offline."""


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--nonfinite", "scan_nonfinite", is_flag=True,
              help="Also list where NaN/Inf values are (reads every recorded gradient and weight).")
def info(run_dir: str, as_json: bool, scan_nonfinite: bool = False) -> None:
    """Status, steps, epochs, layers, ranks, bytes and what was recorded in RUN_DIR."""
    run = _open(run_dir)
    d = run.info()
    if scan_nonfinite:
        from .report import nonfinite_findings
        d["nonfinite"] = nonfinite_findings(run, run.grad_stats(), run.weight_stats())
    if as_json:
        click.echo(json.dumps(d, indent=1, sort_keys=True, default=str))
        return
    rec = d["recorded"]
    lines = [
        f"run       {d['path']}",
        f"status    {d['status']}" + (f" ({d['status_reason']})" if d["status_reason"] else ""),
        f"steps     {d['steps']}" + (f" ({d['first_step']}..{d['last_step']})" if d["steps"] else ""),
        f"epochs    {d['epochs']}",
        f"layers    {d['layers']}",
        f"ranks     {', '.join(map(str, d['ranks'])) or '-'} (world size {d['world_size']})",
        f"bytes     {d['bytes']:,} in {d['shards']} shard(s)",
        f"grads     {rec['grad_stats']['steps']} step(s) of statistics, {rec['grads']['steps']} of raw tensors, "
        f"{max(rec['grad_stats']['layers'], rec['grads']['layers'])} layer(s)",
        f"weights   {rec['weights']['steps']} snapshot(s), {rec['weights']['layers']} layer(s)",
        f"dropped   {d['dropped']}",
    ]
    lines[6:6] = _rank_lines(d)   # under the "ranks" line
    for e in d["errors"]:
        lines.append(f"error     {e}")
    for p in d["problems"]:
        lines.append(f"problem   {p}")
    lines += _nonfinite_lines(d.get("nonfinite"))
    click.echo("\n".join(lines))


def _rank_lines(d: dict) -> list[str]:
    """`info` under torch.distributed: one line per rank (status, shards, steps, what it recorded)."""
    rt = d.get("rank_table") or []
    if len(rt) <= 1 and d.get("world_size", 1) <= 1:
        return []
    out = []
    for r in rt:
        what = [k for k in ("grads", "weights", "activations") if r[k]]
        span = f" ({r['first_step']}..{r['last_step']})" if r["steps"] else ""
        out.append(f"  rank {r['rank']:<3} {r['status']}, {r['shards']} shard(s)"
                   + (f" + {r['live']} unfinished" if r["live"] else "")
                   + f", {r['steps']} step(s){span}, {r['bytes']:,} bytes, records {', '.join(what) or 'steps only'}")
    return out


def _nonfinite_lines(nf: dict | None) -> list[str]:
    """`info --nonfinite`: a headline, then one line per (kind, layer or site, param) with NaN/Inf."""
    if nf is None:
        return []
    if not nf["found"]:
        return ["nonfinite none (gradients, weights and activation statistics scanned)"]
    out = [f"nonfinite NaN/Inf first at step {nf['first_step']} in {len(nf['layers'])} layer(s) or site(s)"]
    for e in nf["entries"]:
        what = f"{e['layer'] or '(model)'}" + (f" ({e['param']})" if e["param"] else "")
        out.append(f"nonfinite   {e['kind']} of {what}: first at step {e['first_step']}, {e['count']:,} "
                   f"value(s) in {e['steps']} step(s)")
    return out


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def layers(run_dir: str, as_json: bool) -> None:
    """The layer table of RUN_DIR: id, name, type, parameter count."""
    run = _open(run_dir)
    df = run.layers[["id", "name", "type", "n_params", "selected"]]
    if as_json:
        click.echo(df.to_json(orient="records"))
    else:
        click.echo(df.to_string(index=False))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Directory for the report.")
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
def report(run_dir: str, out: str, layer_spec: str | None, bins: int, dead_criterion: str, dead_threshold: float,
           max_active_fraction: float, layer_share: float, delta: float, unit_fraction: float, sim_dim: int,
           sim_method: str, raster_site: str | None, engine: str = "local", jobs: int | None = None) -> None:
    """Write an HTML report with figures, tables and summary.json for RUN_DIR into --out.

    Every threshold is an analysis-time option, written to summary.json: a rerun with other thresholds
    into another --out needs no retraining."""
    from .report import build_report, check_activation_options
    act = check_activation_options(dead_criterion, dead_threshold, max_active_fraction, layer_share, delta,
                                   unit_fraction, sim_dim, sim_method, raster_site)
    run = _open(run_dir, engine)
    run.select(layer_spec)  # unknown layers fail before anything is written
    if raster_site is not None:
        from .activations import select_site
        select_site(run, raster_site)  # likewise an unknown or ambiguous site
    out = check_out_dir(out)
    try:
        summary = build_report(run, out, layers=layer_spec, bins=bins, jobs=jobs, **act)
    finally:
        if engine == "dask":
            from .engine import close_owned_client
            close_owned_client()
    click.echo(f"report: {os.path.join(out, 'index.html')}")
    for w in summary.get("skipped", []) + summary.get("not_recorded", []):
        click.echo(f"note: {w}", err=True)


def _records_json(df) -> str:
    from .report import _clean
    return json.dumps(_clean(df.to_dict(orient="records")), indent=1, allow_nan=False)


def _no_sites(run) -> None:
    if not run.catalog.sites:
        raise TraceError(f"no activation sites in {run.path} (record with Recorder(..., activations=True) "
                         "or a selection of modules and functional activations)")


@cli.command()
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
    from .report import dead_layer_table
    run = _open(run_dir)
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
        click.echo(_records_json(df))
    elif not len(df):
        click.echo("no dead units" if per_unit and len(du) else "no activation statistics recorded")
    else:
        click.echo(df.to_string(index=False, na_rep="-"))


@cli.command()
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
    from .activations import saturation_layers
    from .report import _fraction
    unit_fraction = _fraction("--unit-fraction", unit_fraction)
    layer_share = _fraction("--layer-share", layer_share)
    run = _open(run_dir)
    df = saturation_layers(run, delta, unit_fraction=unit_fraction, layer_share=layer_share, sites=site_spec)
    _no_sites(run)
    if as_json:
        click.echo(_records_json(df))
    elif not len(df):
        click.echo("no activation site of a saturating kind (ReLU family, sigmoid, tanh, hardtanh, softmax) "
                   "selected")
    else:
        click.echo(df.to_string(index=False, na_rep="-"))


@cli.command()
@click.option("--out", "out", default="bbdecoder-demo", show_default=True, type=click.Path(),
              help="Directory for the demo's run and report.")
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--samples", default=2048, show_default=True, type=click.IntRange(64, 1_000_000))
def demo(out: str, force: bool, epochs: int, samples: int) -> None:
    """Train a small CNN on a synthetic image task while recording, then write a report."""
    try:
        from bbdecoder.recorder import demo as _demo
    except ImportError as e:
        raise UsageProblem(f"the demo needs torch (pip install 'bbdecoder[torch]'): {e}") from None
    out = check_out_dir(out)
    res = _demo.run_demo(out, force=force, epochs=epochs, samples=samples, log=lambda m: click.echo(m))
    click.echo(f"report: {res['report']}")


from .cli_prune import prune as _prune_cmd; cli.add_command(_prune_cmd)  # noqa: E402,E702
from .cli_attention import attention_iou_cmd as _aiou_cmd; cli.add_command(_aiou_cmd)  # noqa: E402,E702
from .cli_graph import graph_cmd as _graph_cmd, features_cmd as _feat_cmd  # noqa: E402
cli.add_command(_graph_cmd)
cli.add_command(_feat_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the click group, turning errors into one line on stderr."""
    debug = bool(os.environ.get("BBDECODER_DEBUG"))
    try:
        cli.main(args=argv, prog_name="bbdecoder", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bbdecoder: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().splitlines()[0] if e.format_message() else type(e).__name__
        click.echo(f"bbdecoder: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except (TraceError, UsageProblem, FileExistsError, ValueError) as e:
        if debug:
            raise
        click.echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:
        if debug:
            raise
        click.echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - never a traceback for the user
        if debug:
            raise
        click.echo(f"bbdecoder: internal error: {type(e).__name__}: {_one_line(e)} "
                   "(set BBDECODER_DEBUG=1 for details)", err=True)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:500] if s else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    from bbdecoder.analyzer.cli import main as _main  # the package's module, so exception classes match
    _main()
