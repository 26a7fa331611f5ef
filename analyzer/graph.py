"""The recorded function graph (``RUN/graph.json``, written by recorder/graph.py): tables and DOT text.

Never imports torch. The drawings are :mod:`analyzer.report.plots.graph`; the files of
``bbdecoder graph`` are written by :func:`analyzer.report.graph_files.render`.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .trace import files
from .trace import format as fmt
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
    return fmt.validate_graph(files.read_json(path, "function graph", root=run_dir), path)


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


def node_label(n: dict) -> str:
    """Text of a node's box: op [activation kind], module, output shape (one per line)."""
    op = n["op"] + (f" [{n['kind']}]" if n.get("kind") and n["kind"] != n["op"] else "")
    out = _shape(n["outputs"][0]) if n["outputs"] else ""
    return "\n".join(x for x in (op, n["module"], out) if x)


def node_category(n: dict) -> str:
    """The node's colour class (a key of :data:`COLORS`): input, activation, params or op."""
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
        lines.append(f"  n{n['id']} [label={_dot_str(node_label(n))}, fillcolor={_dot_str(COLORS[node_category(n)])}];")
    for e in g["edges"]:
        lines.append(f"  n{e['src']} -> n{e['dst']} [label={_dot_str(_shape(e.get('shape', [])))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def fmt_flops(v: float) -> str:
    """A FLOP count with an SI prefix, e.g. 1.2 G."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f}"
