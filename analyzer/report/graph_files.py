"""The files of ``bbdecoder graph``: the recorded function graph as DOT, a picture, CSV tables and bar
charts of the cost per module, written into one output directory. Never imports torch."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from ..graph import edge_frame, module_frame, node_frame, read_graph, to_dot
from ..outdir import out_lock, prepare_out_dir
from ..trace.files import atomic_write, write_text_atomic
from ..values import csv_safe
from .plots.graph import cost_bars, draw

ENGINES = ("auto", "dot", "matplotlib")


def render(run_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False, engine: str = "auto") -> dict:
    """Write the graph outputs of a run into ``out``: graph.dot, graph.png (Graphviz ``dot`` when on PATH
    and ``engine`` is "auto" or "dot", else matplotlib), ops.csv, edges.csv, modules.csv,
    module_flops.png and module_time.png.

    Args:
        run_dir: the run (its ``graph.json`` is read first: nothing is written for a run without one).
        out: the output directory (created if needed; see :func:`analyzer.outdir.prepare_out_dir`).
        force: write into a non-empty ``out`` (files of the same names are replaced).
        engine: "auto", "dot" or "matplotlib" (the picture).

    Returns:
        {name: path} of the files written, plus "engine": "dot" or "matplotlib".

    Raises:
        TraceError: no or a malformed graph. ValueError: a bad ``engine``. FileNotFoundError: engine
        "dot" without Graphviz. FileExistsError: a non-empty ``out`` without ``force``.
        OutputDirError: ``out`` unusable.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be auto, dot or matplotlib, not {engine!r}")
    g = read_graph(run_dir)
    dot_bin = shutil.which("dot")
    if engine == "dot" and dot_bin is None:
        raise FileNotFoundError("Graphviz 'dot' is not on PATH (use the matplotlib engine)")
    out = prepare_out_dir(out, force=bool(force))
    with out_lock(out):
        return _write(g, out, dot_bin, engine)


def _write(g: dict, out: str, dot_bin: str | None, engine: str) -> dict:
    """The files of :func:`render`, each written through atomic_write (never through a link)."""
    files: dict[str, Any] = {}
    p = os.path.join(out, "graph.dot")
    write_text_atomic(p, to_dot(g))
    files["dot"] = p
    png = os.path.join(out, "graph.png")
    files["engine"] = "matplotlib"
    if dot_bin is not None and engine != "matplotlib":
        def dot(tmp: str) -> None:
            r = subprocess.run([dot_bin, "-Tpng", "-o", tmp, p], capture_output=True, timeout=300)
            if r.returncode != 0 or not os.path.getsize(tmp):
                raise RuntimeError("dot failed")
        try:
            atomic_write(png, dot)
            files["engine"] = "dot"
        except (RuntimeError, OSError, subprocess.SubprocessError):
            pass
    if files["engine"] == "matplotlib":
        draw(g, png)
    files["picture"] = png
    for name, df in (("ops", node_frame(g)), ("edges", edge_frame(g)), ("modules", module_frame(g))):
        p = os.path.join(out, f"{name}.csv")
        atomic_write(p, lambda tmp, df=df: csv_safe(df).to_csv(tmp, index=False))
        files[name] = p
    mods = module_frame(g)
    for col, name in (("flops", "module_flops.png"), ("time_s", "module_time.png")):
        r = cost_bars(mods, col, os.path.join(out, name))
        if r is not None:
            files[col] = r
    return files
