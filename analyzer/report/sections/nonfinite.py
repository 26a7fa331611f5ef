"""Non-finite values (NaN or Inf) in the trace: where they are (summary.json's "nonfinite", also used
by ``bbdecoder info``) and the page's warning box."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ...activations import iter_site_stats


def add(rep) -> None:
    """summary.json's "nonfinite": the findings over the report's gradient and weight statistics (every
    rank) and the activation sites."""
    rep.extra["nonfinite"] = nonfinite_findings(rep.run, rep.data.gs_all, rep.data.ws)


def nonfinite_findings(run, gs: pd.DataFrame, ws: pd.DataFrame) -> dict:
    """Where the trace holds NaN or Inf values: gradients and weight snapshots (from the streaming
    statistics' ``nonfinite`` column) and activation sites (their recorded non-finite counts).

    Args:
        run: the :class:`analyzer.run.Run`.
        gs: :meth:`Run.grad_stats` per step (any ranks). ws: :meth:`Run.weight_stats`.

    Returns:
        dict with ``found`` (bool), ``first_step`` (int or None), ``layers`` (sorted names of layers and
        sites with non-finite values) and ``entries``: one dict per (kind, layer or site, param) with
        kind ("gradients", "weights" or "activations"), layer, layer_id (None for a site), param (None
        for a site), first_step, steps (number of steps with a non-finite value) and count (number of
        non-finite values over all steps, summed over ranks when several recorded; tensor elements, or
        activation values for a site).
    """
    entries = []
    for kind, df in (("gradients", gs), ("weights", ws)):
        if not len(df) or "nonfinite" not in df.columns:
            continue
        bad = df[df["nonfinite"] > 0]
        for (lid, layer, param), g in bad.groupby(["layer_id", "layer", "param"], sort=True, observed=True):
            entries.append({"kind": kind, "layer": layer, "layer_id": int(lid), "param": param,
                            "first_step": int(g["step"].min()), "steps": int(g["step"].nunique()),
                            "count": int(g["nonfinite"].sum())})
    for S in run.catalog.sites:
        if "nonfinite" not in S["stats"]:
            continue
        first, steps, count = None, set(), 0
        for st, d, _rank in iter_site_stats(run, S, stats=("nonfinite",)):
            nf = np.asarray(d["nonfinite"]).reshape(len(st), -1).sum(1)
            hit = nf > 0
            if hit.any():
                s0 = int(st[hit].min())
                first = s0 if first is None else min(first, s0)
                steps.update(int(x) for x in st[hit])
                count += int(nf[hit].sum())
        if first is not None:
            entries.append({"kind": "activations", "layer": S["name"], "layer_id": None, "param": None,
                            "first_step": first, "steps": len(steps), "count": count})
    return {"found": bool(entries), "first_step": min((e["first_step"] for e in entries), default=None),
            "layers": sorted({e["layer"] for e in entries}), "entries": entries}


def nonfinite_html(nf: dict | None) -> str:
    """The report's warning box listing the non-finite findings (empty string when there are none)."""
    if not nf or not nf.get("found"):
        return ""
    e = html.escape
    items = "\n".join(
        f"<li>{e(x['kind'])} of <code>{e(x['layer'] or '(model)')}</code>"
        + (f" (<code>{e(x['param'])}</code>)" if x["param"] else "")
        + f": first at step {x['first_step']}, {x['count']:,} value(s) in {x['steps']} step(s)</li>"
        for x in nf["entries"])
    return ("<div class=\"bad\" id=\"nonfinite\"><p><strong>Non-finite values (NaN or Inf) in the trace</strong>"
            f" — first at step {nf['first_step']}. They were recorded as they were; the statistics and figures "
            "use the finite values only (see the <code>nonfinite</code> columns of the tables).</p>\n"
            f"<ul>\n{items}\n</ul></div>")
