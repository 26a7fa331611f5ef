"""`bbdecoder graph` and `bbdecoder features`: the function graph and the feature evolution of a run.
Never imports torch."""

from __future__ import annotations

import math
import os
import shutil

import click

from .main import UsageProblem, echo, open_run, out_dir, out_errors


@click.command("graph")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Directory for the graph files.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (files of the same names are replaced).")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "dot", "matplotlib"]),
              help="Picture: Graphviz dot (auto: when on PATH) or a matplotlib drawing.")
def graph_cmd(run_dir: str, out: str, force: bool, engine: str) -> None:
    """Function graph of RUN_DIR into --out: graph.dot, graph.png, ops.csv, edges.csv, modules.csv,
    module_flops.png and module_time.png."""
    from ..graph import fmt_flops, read_graph
    from ..report.graph_files import render
    run = open_run(run_dir)  # a missing or malformed run fails here, before anything is written
    if engine == "dot" and shutil.which("dot") is None:
        raise UsageProblem("Graphviz 'dot' is not on PATH (use --engine matplotlib)")
    read_graph(run.path)     # so does a missing or malformed graph
    out = out_dir(out, force=force)
    try:
        with out_errors(out):
            files = render(run.path, out, force=True, engine=engine)
    except FileNotFoundError:
        if engine == "dot" and shutil.which("dot") is None:   # render's Graphviz check, worded for the option
            raise UsageProblem("Graphviz 'dot' is not on PATH (use --engine matplotlib)") from None
        raise
    g = run.graph_modules()
    root = g[g["depth"] == 0]
    total = int(root["flops"].iloc[0]) if len(root) else int(g["flops"].sum())
    echo(f"graph: {files['picture']} ({files['engine']}), {total:,} FLOPs ({fmt_flops(total)}) per forward")
    for k in ("dot", "ops", "edges", "modules", "flops", "time_s"):
        if k in files:
            echo(f"  {os.path.basename(files[k])}")


@click.command("features")
@click.argument("run_dir", type=click.Path())
@click.option("--layer", required=True, help="Dotted name of the captured layer.")
@click.option("--channels", default=None, help="Channels, e.g. 0,1,2 or 0:8 (default: the first 8).")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(0), help="Which probe input.")
@click.option("--fps", default=2.0, show_default=True, type=click.FloatRange(min=0.01, max=100),
              help="Frames per second of the GIF.")
@click.option("--out", "out", required=True, type=click.Path(), help="Directory for the PNG grid and the GIF.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (files of the same names are replaced).")
def features_cmd(run_dir: str, layer: str, channels: str | None, sample: int, fps: float, out: str,
                 force: bool) -> None:
    """Feature evolution of --layer in RUN_DIR: a grid PNG (captures x channels) and an animated GIF."""
    from ..features import parse_channels
    from ..report.plots.features import render_gif, render_grid
    from ..trace.format import sanitize
    if not math.isfinite(fps):   # click's range lets NaN through
        raise UsageProblem(f"--fps must be a number in [0.01, 100], not {fps}")
    run = open_run(run_dir)
    maps, steps = run.feature_maps(layer, sample=sample)
    ch = parse_channels(channels, maps.shape[1])
    out = out_dir(out, force=force)
    stem = f"features-{sanitize(layer)}"
    grid = render_grid(maps, steps, ch, os.path.join(out, stem + ".png"), layer=layer)
    gif = render_gif(maps, steps, ch, os.path.join(out, stem + ".gif"), fps=fps, layer=layer)
    echo(f"features: {len(steps)} captures of {layer} (steps {', '.join(map(str, steps[:10]))}"
               f"{', ...' if len(steps) > 10 else ''}), channels {','.join(map(str, ch))}")
    echo(f"  {grid}\n  {gif}")
