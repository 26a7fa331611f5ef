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
    if not os.path.lexists(path):   # anything else there (a FIFO, a link) is refused by read_json
        raise TraceError(f"{os.fspath(run_dir)} has no function graph ({fmt.GRAPH_FILE}); record one with "
                         "Recorder(..., graph=True) or rec.record_graph(example_input)")
    raw = files.read_json(path, "function graph", root=run_dir)
    try:
        g = fmt.validate_graph(raw, path)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:   # a field of the wrong JSON type
        raise TraceError(f"{path}: malformed function graph ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    _check_fields(g, path)
    return g


_INT64_MAX = (1 << 63) - 1


def _count(v) -> bool:
    """A JSON integer that fits int64 and is >= 0 (true is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _INT64_MAX


def _texts(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _dims(v) -> bool:
    return isinstance(v, list) and all(_count(x) for x in v)


def _node_problem(n: dict) -> str | None:
    if not all(isinstance(n[k], list) and all(_dims(s) for s in n[k]) for k in ("inputs", "outputs")):
        return "inputs or outputs that are not lists of shapes"
    if not _count(n["flops"]):
        return "flops that are not an int64 count"
    if any(k in n and not isinstance(n[k], str) for k in ("func", "module_type")) \
            or (n.get("kind") is not None and not isinstance(n["kind"], str)):
        return "a func, module_type or kind that is not a string"
    if any(k in n and not _texts(n[k]) for k in ("input_dtypes", "output_dtypes")):
        return "dtypes that are not a list of strings"
    return None


def _module_problem(m: dict) -> str | None:
    if not isinstance(m["type"], str) or (m.get("kind") is not None and not isinstance(m["kind"], str)):
        return "a type or kind that is not a string"
    if not all(_count(m[k]) for k in ("depth", "calls", "flops")) or ("n_params" in m and not _count(m["n_params"])):
        return "depth, calls, flops or n_params that are not int64 counts"
    t = m.get("time_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1e300):
        return "a time_s that is not a finite number of seconds"
    return None


def _check_fields(g: dict, where: str) -> None:
    """What :func:`analyzer.trace.format.validate_graph` leaves to the readers, checked before any
    table is built: every field the tables, the DOT text and the drawings use has its JSON type,
    counts fit int64 (a stranger's graph.json is data, not a way to an internal error).

    Raises:
        TraceError: the first problem, in one line.
    """
    for i, n in enumerate(g["nodes"]):
        why = _node_problem(n)
        if why:
            raise TraceError(f"{where}: node {i} has {why}")
    for e in g["edges"]:
        if ("arg" in e and not _count(e["arg"])) or ("shape" in e and not _dims(e["shape"])):
            raise TraceError(f"{where}: edge {e['src']} -> {e['dst']} has a malformed arg or shape")
    for m in g["modules"]:
        why = _module_problem(m)
        if why:
            raise TraceError(f"{where}: module {m['name']!r:.80} has {why}")
    t = g.get("total_flops", 0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1e300:
        raise TraceError(f"{where}: total_flops is not a number")


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
