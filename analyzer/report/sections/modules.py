"""The modules section (runs with a function graph, ``graph.json``): FLOPs and forward time of the
modules that split the model at a depth (``depth`` option; default :func:`analyzer.graph.default_depth`,
the repeated blocks), as a table (tables/modules_at_depth.csv and on the page) and a bar figure; the
module graph at that depth with repeated blocks collapsed (``h.0-11 x12``), sized for a screen; the
full op graph as graph.dot (tables/graph.dot) and every module in tables/modules.csv."""

from __future__ import annotations

import html
import os

from ...graph import (MOST_FLOPS, OTHER_OPS, default_depth, fmt_flops, module_frame, module_graph, module_table,
                      read_graph, repeated_groups, to_dot)
from ...trace import format as fmt
from ...trace.files import write_text_atomic
from ...trace.format import TraceError
from ..page import cell_html
from ..plots.graphview import draw_module_graph, module_bars, node_areas

#: the figures of this section (listed under not_recorded for a run without a function graph)
MODULE_FIGURES = ("module FLOPs and time", "module graph")
#: most bars (modules at the depth) and most modules of the split that the figures draw
MAX_BARS, MAX_GRAPH_MODULES = 150, 1000
#: most boxes of the module graph picture (after collapsing repeated blocks), rows of the page's table
MAX_BOXES, MAX_ROWS = 120, 300


def add(rep) -> None:
    """Tables, figures and summary.json's "modules" of the run's function graph at the report's depth."""
    if not os.path.lexists(os.path.join(rep.run.path, fmt.GRAPH_FILE)):
        for n in MODULE_FIGURES:
            rep.not_recorded.append(f"figure {n}: no function graph in the trace (record one with "
                                    "Recorder(..., graph=True) or rec.record_graph(example_input))")
        return
    try:
        g = read_graph(rep.run.path)
    except TraceError as e:
        rep.skip("modules section", str(e))
        return
    chosen = getattr(rep, "module_depth", None)
    depth = default_depth(g) if chosen is None else int(chosen)
    t = module_table(g, depth)
    groups = repeated_groups(t)
    rep.table("modules", module_frame(g), "every module that ran (function graph): name, type, depth, calls, own "
              "n_params, inclusive flops (a multiply-add counts 2), median inclusive forward time_s, kind")
    rep.table("modules_at_depth", t, f"the modules that split the model at depth {depth}: inclusive n_params, "
              "flops, share of the model's flops, median forward time_s, repeated group")
    rel = "tables/graph.dot"
    write_text_atomic(os.path.join(rep.out, rel), to_dot(g))
    rep.tables.append({"file": rel, "rows": len(g["nodes"]), "description": "the full function graph, one box "
                       "per op (Graphviz DOT: dot -Tsvg graph.dot -o graph.svg)"})
    rep.extra["modules"] = {
        "depth": depth, "chosen": "option" if chosen is not None else "default",
        "rule": f"the shallowest depth whose split holds a repeated group (>= 2 modules of one type named alike "
                f"but for a number) with more than {MOST_FLOPS:g} of the FLOPs, raised to the deepest depth with "
                "the same split; else the shallowest depth splitting the model into >= 2 modules",
        "total_flops": int(g.get("total_flops", 0) or 0),
        "groups": [{"group": r.group, "modules": int(r.modules), "flops": int(r.flops),
                    "flops_share": float(r.flops_share)} for r in groups.itertuples(index=False)],
        "rows": [{"name": r.name, "type": r.type, "calls": int(r.calls), "n_params": int(r.n_params),
                  "flops": int(r.flops), "flops_share": float(r.flops_share), "time_s": float(r.time_s),
                  "group": r.group} for r in t.head(MAX_GRAPH_MODULES).itertuples(index=False)],
        "rows_total": int(len(t)),
    }
    bars = t[t["name"] != OTHER_OPS] if (t["name"] == OTHER_OPS).any() and len(t) > 1 else t
    if not len(bars):
        for n in MODULE_FIGURES:
            rep.skip(f"figure {n}", "the function graph lists no module")
        return
    if len(bars) > MAX_GRAPH_MODULES:
        for n in MODULE_FIGURES:
            rep.skip(f"figure {n}", f"{len(bars)} modules at depth {depth} are too many to draw (at most "
                     f"{MAX_GRAPH_MODULES}); the numbers are in tables/modules_at_depth.csv; choose a smaller depth")
        return
    if len(bars) > MAX_BARS:
        rep.skip("figure module FLOPs and time", f"{len(bars)} modules at depth {depth} are too many bars (at most "
                 f"{MAX_BARS}); the numbers are in tables/modules_at_depth.csv; choose a smaller depth")
    else:
        _bars(rep, bars, depth)
    _graph(rep, g, depth)


def _bars(rep, bars, depth: int) -> None:
    def draw_bars():
        return module_bars(bars, f"FLOPs and forward time per module at depth {depth}")
    rep.figure("module_costs", f"Module FLOPs and time at depth {depth}",
               f"FLOPs per forward pass (left; a multiply-add counts 2) and median forward time per call "
               f"(right, inclusive of everything inside the module) of the {len(bars)} modules that split the model "
               f"at depth {depth}, in call order; modules of one repeated group share a colour. The numbers are "
               "in the table above and tables/modules_at_depth.csv; another depth: <code>bbdecoder report "
               "--depth N</code>.", draw_bars, "modules")


def _graph(rep, g: dict, depth: int) -> None:
    mg = module_graph(g, depth)
    if len(mg["nodes"]) - 1 > MAX_BOXES:
        rep.skip("figure module graph", f"{len(mg['nodes']) - 1} boxes at depth {depth} after collapsing repeated "
                 f"blocks are too many for one picture (at most {MAX_BOXES}); choose a smaller depth")
        return

    def draw_graph():
        return draw_module_graph(mg, f"Modules at depth {depth}: data flow")
    n_coll = sum(len(nd["members"]) > 1 for nd in mg["nodes"])
    rep.figure("module_graph", f"Module graph at depth {depth}",
               f"Data flow between the modules of depth {depth} ({len(mg['nodes']) - 1} boxes"
               + (f"; {n_coll} run{'s' if n_coll != 1 else ''} of repeated blocks collapsed into one orange box "
                  "each, e.g. <code>h.0-11 x12</code>" if n_coll else "")
               + "). An arrow means an output of one module reaches the other, directly or through the model's "
               "own code between modules; arrows implied by a longer path are left out. Hover a box for the full "
               "names of its modules. The full op graph: tables/graph.dot.", draw_graph, "modules",
               areas=node_areas(mg))


def intro_html(s: dict) -> str:
    """HTML (from escaped parts) opening the modules group: the depth, how it was chosen, the table."""
    m = s.get("modules")
    if not m:
        return ""
    e = html.escape
    why = ("chosen with <code>--depth</code>" if m["chosen"] == "option" else
           f"the default: {e(m['rule'])}")
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            f"<code>{e(r['name'])}</code>", e(r["type"]), cell_html(r["calls"]), cell_html(r["n_params"]),
            e(fmt_flops(r["flops"])), f"{100 * r['flops_share']:.1f}%" if r["flops_share"] == r["flops_share"] else "–",
            cell_html(r["time_s"] * 1e3), e(r["group"]))) + "</tr>"
        for r in m["rows"][:MAX_ROWS])
    more = m["rows_total"] - min(len(m["rows"]), MAX_ROWS)
    return (f"<p class='note'>Depth {m['depth']} ({why}).</p>\n"
            f"<details><summary>Modules at this depth ({m['rows_total']} rows"
            + (f"; the first {MAX_ROWS} here, all in tables/modules_at_depth.csv" if more > 0 else "")
            + ")</summary>\n"
            "<table class='num mods'><tr><th>module</th><th>type</th><th>calls</th><th>parameters</th><th>FLOPs</th>"
            "<th>share of FLOPs</th><th>median time (ms)</th><th>repeated group</th></tr>\n"
            f"{rows}\n</table></details>")


__all__ = ["add", "intro_html", "MODULE_FIGURES"]
