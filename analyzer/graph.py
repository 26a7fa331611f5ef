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


# ---------------------------------------------------------------------------------- modules at a depth
#: columns of :func:`module_table`
TABLE_COLUMNS = ["name", "type", "depth", "calls", "n_params", "flops", "flops_share", "time_s", "group"]
#: the row of :func:`module_table` for the ops that run in an expanded module but in none of its children
OTHER_OPS = "(ops outside these modules)"
#: a repeated group must hold more than this share of the model's FLOPs to pick the default depth
MOST_FLOPS = 0.5


def _parents(names: list[str]) -> dict[str, str | None]:
    """Each module's nearest recorded ancestor (its name with components taken off the end until one
    that ran; "" = the model when it ran), or None for a top-level module."""
    known = set(names)
    out: dict[str, str | None] = {}
    for n in names:
        if n == "":
            out[n] = None
            continue
        parts = n.split(".")
        up = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in known), None)
        out[n] = up if up is not None else ("" if "" in known else None)
    return out


def module_cut(mods: pd.DataFrame, depth: int) -> list[str]:
    """The modules that split the model at ``depth``, in first-call order: starting from the model, a
    module shallower than ``depth`` that has recorded children is replaced by its children (the
    nearest modules inside it that ran, which may be deeper: a ``ModuleList`` never runs itself).
    Every op inside the model is then in exactly one of them, or in an expanded module's own code."""
    names = [str(n) for n in mods["name"]]
    dep = dict(zip(names, (int(d) for d in mods["depth"])))
    parent = _parents(names)
    kids: dict[str | None, list[str]] = {}
    for n in names:
        kids.setdefault(parent[n], []).append(n)
    out, todo = [], list(kids.get(None, []))
    while todo:
        m = todo.pop()
        if dep[m] < depth and kids.get(m):
            todo.extend(kids[m])
        else:
            out.append(m)
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


def group_pattern(name: str) -> str:
    """A module name with its last all-digit component replaced by "#" (``h.3`` -> ``h.#``): the
    modules of one repeated group share it; a name without a number is its own pattern."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i] + ["#"] + parts[i + 1:])
    return name


def module_table(g: dict, depth: int) -> pd.DataFrame:
    """FLOPs and time of the modules that split the model at ``depth`` (:func:`module_cut`).

    Columns (:data:`TABLE_COLUMNS`): name, type, depth, calls, n_params (the module's and everything
    inside it), flops (int, inclusive, a multiply-add counts 2), flops_share (of the model's), time_s
    (median inclusive forward time per call, s; NaN if not timed), group (:func:`group_pattern` + "/"
    + type when at least two rows share it, else ""). A last row :data:`OTHER_OPS` holds the FLOPs of
    ops in expanded modules' own code when there are any, so that the FLOPs sum to the model's.
    """
    mods = module_frame(g)
    cut = module_cut(mods, depth)
    names = [str(n) for n in mods["name"]]
    parent = _parents(names)
    own = dict(zip(names, mods["n_params"].astype(np.int64)))
    inc = dict(own)
    for n in sorted(names, key=lambda x: -len(x.split("."))):   # children before parents
        p = parent[n]
        while p is not None:
            inc[p] += own[n]
            p = parent[p]
    roots = [n for n in names if parent[n] is None]
    total = int(mods.loc[mods["name"].isin(roots), "flops"].sum())
    t = mods.set_index("name").loc[cut].reset_index()
    t["n_params"] = [int(inc[n]) for n in cut]
    key = [f"{group_pattern(n)}/{tp}" for n, tp in zip(t["name"], t["type"])]
    counts = pd.Series(key).value_counts()
    t["group"] = [k if "#" in k and counts[k] >= 2 else "" for k in key]
    rest = total - int(t["flops"].sum())
    if rest:
        t = pd.concat([t, pd.DataFrame([{"name": OTHER_OPS, "type": "", "depth": -1, "calls": 0, "n_params": 0,
                                         "flops": rest, "time_s": np.nan, "group": ""}])], ignore_index=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t["flops_share"] = t["flops"] / total if total else np.nan
    return t[TABLE_COLUMNS].astype({"flops": "int64", "n_params": "int64", "depth": "int64", "calls": "int64"})


def repeated_groups(table: pd.DataFrame) -> pd.DataFrame:
    """The repeated groups of a :func:`module_table`: group, modules (count), flops (sum), flops_share,
    largest share first."""
    t = table[table["group"] != ""]
    out = t.groupby("group", sort=False).agg(modules=("name", "size"), flops=("flops", "sum"),
                                             flops_share=("flops_share", "sum")).reset_index()
    return out.sort_values("flops_share", ascending=False, kind="stable").reset_index(drop=True)


def default_depth(g: dict) -> int:
    """The depth with the most informative split, by this rule: the shallowest depth whose split
    (:func:`module_cut`) holds a repeated group (at least two modules of one type whose names differ
    only in a number, ``h.0`` ... ``h.11``) with more than :data:`MOST_FLOPS` of the model's FLOPs;
    else the shallowest depth that splits the model into at least two modules; else 0. Raised to
    the deepest depth that gives the same split (the blocks' own depth, not their container's).
    """
    mods = module_frame(g)
    if not len(mods):
        return 0
    deepest = int(mods["depth"].max())
    found = None
    for d in range(1, deepest + 1):
        t = module_table(g, d)
        r = repeated_groups(t)
        if len(r) and float(r["flops_share"].iloc[0]) > MOST_FLOPS:
            found = d
            break
    if found is None:
        found = next((d for d in range(1, deepest + 1) if len(module_cut(mods, d)) >= 2), 0)
    cut = module_cut(mods, found)
    while found < deepest and module_cut(mods, found + 1) == cut:
        found += 1
    return found


def _structure(name: str, names: list[str], types: dict) -> tuple:
    """What is inside a module: (relative name, type) of every recorded module below it."""
    pre = name + "."
    return tuple((n[len(pre):], types[n]) for n in names if n.startswith(pre))


def module_graph(g: dict, depth: int) -> dict:
    """The data-flow graph between the modules that split the model at ``depth``, with every run of
    consecutive repeated blocks (same :func:`group_pattern`, type and inner structure) collapsed
    into one node.

    Ops are mapped to the module of the split they run in; an op in no module of the split (the
    model's own code between its blocks) is contracted away, its inputs joined to its consumers;
    the graph's inputs are one node "input".

    Returns:
        {"nodes": [{"id", "name" (first member, or "input"), "label" (``h.0-11 x12`` for a
        collapsed run: the members' numbers and count), "type", "members" (full names), "flops",
        "time_s" (sum over members; NaN when not timed)}], "edges": [(src id, dst id)], "depth"}.
    """
    mods = module_frame(g)
    table = module_table(g, depth)
    table = table[table["name"] != OTHER_OPS]
    names = [str(n) for n in mods["name"]]
    types = dict(zip(names, mods["type"].astype(str)))
    runs: list[list[int]] = []
    for i, r in enumerate(table.itertuples(index=False)):
        key = (group_pattern(r.name), r.type, _structure(r.name, names, types))
        if runs and "#" in key[0] and runs[-1][0] == key:
            runs[-1][1].append(i)
        else:
            runs.append([key, [i]])
    nodes = [{"id": 0, "name": "input", "label": "input", "type": "", "members": [], "flops": 0, "time_s": np.nan}]
    node_of: dict[str, int] = {}
    rows = table.reset_index(drop=True)
    for key, idx in runs:
        sub = rows.iloc[idx]
        members = [str(n) for n in sub["name"]]
        label = members[0]
        if len(members) > 1:
            nums = [m.split(".")[key[0].split(".").index("#")] for m in members]
            label = key[0].replace("#", f"{nums[0]}-{nums[-1]}") + f" x{len(members)}"
        t = sub["time_s"].to_numpy(np.float64)
        nid = len(nodes)
        nodes.append({"id": nid, "name": members[0], "label": label, "type": key[1], "members": members,
                      "flops": int(sub["flops"].sum()), "time_s": float(t.sum()) if np.isfinite(t).all() else np.nan})
        for m in members:
            node_of[m] = nid
    cut = set(node_of)

    def owner(mod: str) -> int | None:
        parts = mod.split(".") if mod else []
        for k in range(len(parts), 0, -1):
            n = ".".join(parts[:k])
            if n in cut:
                return node_of[n]
        return None
    lab = [0 if n["op"] == "input" else owner(n["module"]) for n in g["nodes"]]
    preds: dict[int, list[int]] = {}
    for e in g["edges"]:
        preds.setdefault(e["dst"], []).append(e["src"])
    reach: list[frozenset] = [frozenset()] * len(g["nodes"])   # module nodes whose output reaches each op
    edges: set = set()
    for i in range(len(g["nodes"])):    # ids are a topological order
        came = frozenset().union(*(reach[s] for s in preds.get(i, ())))
        if lab[i] is None:
            reach[i] = came
        else:
            edges.update((s, lab[i]) for s in came if s != lab[i])
            reach[i] = frozenset((lab[i],))
    return {"nodes": nodes, "edges": transitive_reduction(len(nodes), sorted(edges)), "depth": int(depth)}


def transitive_reduction(n: int, edges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The edges of the DAG on nodes 0..n-1 that no longer path implies (a residual stream that feeds
    every later block keeps only its edge to the next one); a cycle (never in a recorded graph):
    the edges unchanged."""
    succ: dict[int, set] = {}
    indeg = [0] * n
    for a, b in edges:
        if b not in succ.setdefault(a, set()):
            succ[a].add(b)
            indeg[b] += 1
    order, ready = [], [i for i in range(n) if indeg[i] == 0]
    while ready:
        u = ready.pop()
        order.append(u)
        for v in succ.get(u, ()):
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    if len(order) < n:
        return list(edges)
    below = [0] * n          # bit v set: v is reachable from the node
    for u in reversed(order):
        for v in succ.get(u, ()):
            below[u] |= (1 << v) | below[v]
    return sorted((u, v) for u in succ for v in succ[u]
                  if not any(w != v and below[w] >> v & 1 for w in succ[u]))
