"""The recorded function graph (``RUN/graph.json``, written by recorder/graph.py): tables, DOT, drawings.

Never imports torch. The picture comes from Graphviz ``dot`` when it is on PATH, otherwise from a
matplotlib drawing of a layered layout computed here in numpy (layer = longest path from an input).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import numpy as np
import pandas as pd

from .trace import files
from .trace import format as fmt
from . import plots
from .trace.format import TraceError

NODE_COLUMNS = ["id", "op", "func", "module", "module_type", "kind", "inputs", "outputs", "input_dtypes",
                "output_dtypes", "params", "flops"]
EDGE_COLUMNS = ["src", "dst", "arg", "shape", "src_op", "dst_op"]
MODULE_COLUMNS = ["name", "type", "depth", "calls", "n_params", "flops", "time_s", "kind"]
#: colours of the drawing: activation nodes, parameterised ops, inputs, other ops
COLORS = {"activation": "#f4a261", "params": "#8ecae6", "input": "#b7e4c7", "op": "#e9ecef"}


def read_graph(run_dir: str | os.PathLike) -> dict:
    """The validated content of ``RUN/graph.json``.

    Raises:
        TraceError: no graph recorded (one line saying how to record one), or a malformed file.
    """
    path = os.path.join(os.fspath(run_dir), fmt.GRAPH_FILE)
    if not os.path.isfile(path):
        raise TraceError(f"{os.fspath(run_dir)} has no function graph ({fmt.GRAPH_FILE}); record one with "
                         "Recorder(..., graph=True) or rec.record_graph(example_input)")
    return fmt.validate_graph(files.read_json(path, "function graph"), path)


def _shape(s) -> str:
    return "(" + ", ".join(str(int(x)) for x in s) + ")"


def node_frame(g: dict) -> pd.DataFrame:
    """One row per recorded op in call order.

    Columns: id, op, func, module (dotted path of the enclosing module, "" = the model), module_type,
    kind (activation kind such as "relu", or None), inputs / outputs (shapes as "(N, C, H, W)" joined
    by "; "), input_dtypes / output_dtypes (joined by "; "), params (dotted names joined by ", "),
    flops (int, a multiply-add counts 2).
    """
    rows = [{"id": n["id"], "op": n["op"], "func": n.get("func", n["op"]), "module": n["module"],
             "module_type": n.get("module_type", ""), "kind": n.get("kind"),
             "inputs": "; ".join(_shape(s) for s in n["inputs"]), "outputs": "; ".join(_shape(s) for s in n["outputs"]),
             "input_dtypes": "; ".join(n.get("input_dtypes", [])), "output_dtypes": "; ".join(n.get("output_dtypes", [])),
             "params": ", ".join(n["params"]), "flops": int(n["flops"])} for n in g["nodes"]]
    df = pd.DataFrame(rows, columns=NODE_COLUMNS)
    return df.astype({"id": "int64", "flops": "int64"})


def edge_frame(g: dict) -> pd.DataFrame:
    """One row per data edge: src produced input number ``arg`` (of shape ``shape``) of dst."""
    ops = [n["op"] for n in g["nodes"]]
    rows = [{"src": e["src"], "dst": e["dst"], "arg": int(e.get("arg", 0)), "shape": _shape(e.get("shape", [])),
             "src_op": ops[e["src"]], "dst_op": ops[e["dst"]]} for e in g["edges"]]
    return pd.DataFrame(rows, columns=EDGE_COLUMNS).astype({"src": "int64", "dst": "int64", "arg": "int64"})


def module_frame(g: dict) -> pd.DataFrame:
    """Per module that ran, in first-call order: name, type, depth (0 = the model), calls, n_params (own),
    flops (of the ops inside it, inclusive; int), time_s (median inclusive forward time, seconds; NaN if
    not timed), kind (activation kind of the module, or None)."""
    rows = [{"name": m["name"], "type": m["type"], "depth": int(m["depth"]), "calls": int(m["calls"]),
             "n_params": int(m.get("n_params", 0)), "flops": int(m["flops"]),
             "time_s": np.nan if m.get("time_s") is None else float(m["time_s"]), "kind": m.get("kind")}
            for m in g["modules"]]
    return pd.DataFrame(rows, columns=MODULE_COLUMNS)


def _label(n: dict) -> str:
    op = n["op"] + (f" [{n['kind']}]" if n.get("kind") and n["kind"] != n["op"] else "")
    out = _shape(n["outputs"][0]) if n["outputs"] else ""
    return "\n".join(x for x in (op, n["module"], out) if x)


def _category(n: dict) -> str:
    if n["op"] == "input":
        return "input"
    if n.get("kind"):
        return "activation"
    return "params" if n["params"] else "op"


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: dict) -> str:
    """Graphviz DOT text of the graph: one box per op (op [activation kind], module, output shape),
    coloured by category (input, activation, op with parameters, other); edges labelled by shape."""
    lines = ["digraph bbdecoder {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];',
             "  edge [fontsize=8];"]
    for n in g["nodes"]:
        lines.append(f"  n{n['id']} [label={_dot_str(_label(n))}, fillcolor={_dot_str(COLORS[_category(n)])}];")
    for e in g["edges"]:
        lines.append(f"  n{e['src']} -> n{e['dst']} [label={_dot_str(_shape(e.get('shape', [])))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def layered_layout(g: dict) -> tuple[np.ndarray, np.ndarray]:
    """Positions for drawing: level = longest path from a source (node ids are a topological order,
    every edge goes from a lower to a higher id); within a level nodes are spread in id order.

    Returns:
        (x, y) float arrays of length n_nodes; y = -level, x centred on 0 with unit spacing.
    """
    n = len(g["nodes"])
    level = np.zeros(n, np.int64)
    src = np.array([e["src"] for e in g["edges"]], np.int64)
    dst = np.array([e["dst"] for e in g["edges"]], np.int64)
    order = np.argsort(dst, kind="stable")
    for s, d in zip(src[order], dst[order]):  # edges in increasing dst: sources final before use
        level[d] = max(level[d], level[s] + 1)
    x = np.zeros(n, np.float64)
    for lv in np.unique(level):
        idx = np.flatnonzero(level == lv)
        x[idx] = np.arange(len(idx)) - (len(idx) - 1) / 2.0
    return x, -level.astype(np.float64)


def draw(g: dict, path: str) -> str:
    """Draw the graph with matplotlib (layered layout) into the PNG ``path``; returns it."""
    plt, _ = plots._mpl()
    x, y = layered_layout(g)
    n = len(x)
    w = max(6.0, min(40.0, 2.2 * (np.ptp(x) + 1) if n else 6.0))
    h = max(4.0, min(80.0, 1.0 * (np.ptp(y) + 1) if n else 4.0))
    fig, ax = plt.subplots(figsize=(w, h), layout="constrained")
    for e in g["edges"]:
        ax.annotate("", xy=(x[e["dst"]], y[e["dst"]] + 0.18), xytext=(x[e["src"]], y[e["src"]] - 0.18),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 0.8})
    fs = 8 if n < 60 else 6
    for nd in g["nodes"]:
        i = nd["id"]
        ax.text(x[i], y[i], plots.text(_label(nd)), ha="center", va="center", fontsize=fs,
                bbox={"boxstyle": "round,pad=0.3", "fc": COLORS[_category(nd)], "ec": "#333333", "lw": 0.6})
    ax.set_xlim(x.min() - 1 if n else -1, x.max() + 1 if n else 1)
    ax.set_ylim(y.min() - 0.7 if n else -1, 0.7)
    ax.axis("off")
    ax.set_title(f"Function graph: {n} ops ({fmt_flops(g.get('total_flops', 0))} FLOPs)")
    return plots.save(fig, path)


def fmt_flops(v: float) -> str:
    """A FLOP count with an SI prefix, e.g. 1.2 G."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f}"


def cost_bars(mods: pd.DataFrame, col: str, path: str, max_depth: int | None = None) -> str | None:
    """Bar chart (seaborn) of ``col`` ("flops" or "time_s") per module at the smallest depth > 0 that
    splits the model (or ``max_depth``), in call order; None when there is nothing finite to draw."""
    d = mods[mods["depth"] > 0]
    if not len(d):
        d = mods
    depth = int(d["depth"].min()) if max_depth is None else int(max_depth)
    d = d[d["depth"] <= depth]
    vals = d[col].to_numpy(np.float64)
    if not len(d) or not np.isfinite(vals).any():
        return None
    _, sns = plots._mpl()
    fig, axes = plots.new_figure(width=max(6.0, 0.35 * len(d) + 3), height=4.5)
    ax = axes[0, 0]
    lab = [plots.text(f"{nm} ({tp})") for nm, tp in zip(d["name"], d["type"])]
    y = vals * (1e3 if col == "time_s" else 1.0)
    sns.barplot(x=lab, y=y, color="#4c72b0" if col == "flops" else "#55a868", errorbar=None, ax=ax)
    ax.set_xticks(range(len(lab)))
    ax.set_xticklabels(lab, rotation=90 if len(lab) > 4 else 0, fontsize="small")
    ax.set_xlabel("module (depth <= %d)" % depth)
    ax.set_ylabel("FLOPs per forward" if col == "flops" else "forward time (ms, median, inclusive)")
    ax.set_title("FLOPs per module" if col == "flops" else "Forward time per module")
    return plots.save(fig, path)


def check_out(out: str, force: bool) -> str:
    """Refuse a non-empty ``out`` unless ``force``; create it; returns its absolute path."""
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to write into it")
    from .cli import check_out_dir
    return check_out_dir(out)


def render(run_dir: str | os.PathLike, out: str, force: bool = False, engine: str = "auto") -> dict:
    """Write the graph outputs of a run into ``out``: graph.dot, graph.png (Graphviz ``dot`` when on PATH
    and ``engine`` is "auto" or "dot", else matplotlib), ops.csv, edges.csv, modules.csv,
    module_flops.png and module_time.png.

    Returns:
        {name: path} of the files written, plus "engine": "dot" or "matplotlib".
    """
    if engine not in ("auto", "dot", "matplotlib"):
        raise ValueError(f"engine must be auto, dot or matplotlib, not {engine!r}")
    g = read_graph(run_dir)
    dot_bin = shutil.which("dot")
    if engine == "dot" and dot_bin is None:
        raise FileNotFoundError("Graphviz 'dot' is not on PATH (use --engine matplotlib)")
    out = check_out(out, force)
    files: dict[str, Any] = {}
    p = os.path.join(out, "graph.dot")
    _write_text(p, to_dot(g))
    files["dot"] = p
    png = os.path.join(out, "graph.png")
    files["engine"] = "matplotlib"
    if dot_bin is not None and engine != "matplotlib":
        r = subprocess.run([dot_bin, "-Tpng", "-o", png, p], capture_output=True, timeout=300)
        if r.returncode == 0 and os.path.isfile(png):
            files["engine"] = "dot"
    if files["engine"] == "matplotlib":
        draw(g, png)
    files["picture"] = png
    for name, df in (("ops", node_frame(g)), ("edges", edge_frame(g)), ("modules", module_frame(g))):
        p = os.path.join(out, f"{name}.csv")
        df.to_csv(p, index=False)
        files[name] = p
    mods = module_frame(g)
    for col, name in (("flops", "module_flops.png"), ("time_s", "module_time.png")):
        r = cost_bars(mods, col, os.path.join(out, name))
        if r is not None:
            files[col] = r
    return files


def _write_text(path: str, s: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(s)
    os.replace(tmp, path)
