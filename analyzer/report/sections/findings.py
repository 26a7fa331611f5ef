"""The findings of the health rules (:mod:`analyzer.findings`, default thresholds): summary.json's
"findings" (every row, and the rows grouped), the table findings.csv (every row), and the box that
opens the page: one entry per (rule, severity, message shape) (:func:`analyzer.findings.group`),
severity first, with how many layers, the worst value and its layer, the steps, and the layers listed
(folded past :data:`SHOWN`), each linked to the figure that shows it where the report has one."""

from __future__ import annotations

import html
import os

from ..page import DETAIL_PAGE

#: rule -> figure names (report/figures/<name>.png) that show it, best first; layer rules link first to
#: the layer's own figures (the per-layer heading "layer-<id>")
FIGURES = {
    "vanishing_gradient": ("grad_flow", "grad_heatmap"), "exploding_gradient": ("grad_heatmap", "grad_flow"),
    "gradient_spike": ("grad_heatmap", "grad_flow"), "all_zero": ("grad_flow", "dead_fraction_heatmap"),
    "weight_update_ratio": ("update_ratio", "update_ratio_heatmap"),
    "unchanged_weights": ("update_ratio", "weight_magnitude"),
    "dead_units": ("dead_fraction_heatmap", "act_dead_raster"), "saturated_activations": ("act_saturation",),
    "poor_initialization": ("act_distributions",), "tensor_variance": ("act_distributions",),
    "loss_not_decreasing": ("loss",), "loss_spike": ("loss",),
    "attention_entropy_collapse": ("attention_entropy",), "massive_activations": ("act_distributions",),
    "activation_kurtosis": ("act_distributions",),
}
#: rules that link to the per-layer figures of their layer
LAYER_RULES = ("vanishing_gradient", "exploding_gradient", "gradient_spike", "all_zero", "weight_update_ratio",
               "unchanged_weights")


def add(rep) -> None:
    """Evaluate every rule at its defaults; summary.json's "findings" and tables/findings.csv."""
    try:
        df = rep.run.findings()
    except Exception as e:  # noqa: BLE001 - a rule that cannot run must not cost the report
        rep.skip("findings", f"the health rules could not be evaluated ({type(e).__name__}: {e})")
        rep.extra["findings"] = None
        return
    rep.table("findings", df, "health rules at their default thresholds (docs/findings.md): rule, severity, "
              "layer or site, param, first_step, last_step, n_steps, value, threshold, message")
    from ...findings import group
    counts = {s: int((df["severity"] == s).sum()) for s in ("error", "warning", "info", "skipped")}
    rep.extra["findings"] = {"counts": counts, "findings": df.to_dict(orient="records"),
                             "groups": group(df).to_dict(orient="records")}
    rep.extra["finding_layers"] = finding_layers(rep.run, df)


#: most layers that get per-layer figures because a finding points at them (the most severe first)
MAX_FINDING_LAYERS = 12


def finding_layers(run, df) -> list[int]:
    """Ids of the layers the findings point at (a layer by name, or the module of an activation site),
    in the findings' order (most severe first), at most :data:`MAX_FINDING_LAYERS` of them."""
    ids = {L["name"]: int(L["id"]) for L in run.catalog.layers}
    module = {S["name"]: S.get("module") for S in run.catalog.sites}
    hit = df[df["severity"] != "skipped"]["layer"].dropna()
    out = list(dict.fromkeys(ids[n] for x in hit for n in (x, module.get(x)) if n in ids))
    return out[:MAX_FINDING_LAYERS]


def _target(f: dict, figures: list[dict]) -> str | None:
    """The link target of the figure that shows finding ``f``: an anchor of index.html, or a layer's
    heading on the detail page (None: the report has no such figure)."""
    if f["rule"] == "nonfinite":
        return "nonfinite"
    if f["rule"] in LAYER_RULES and f.get("layer") is not None:
        for g in figures:
            L = g.get("layer")
            if L is not None and str(L.name) == f["layer"]:
                return f"{DETAIL_PAGE}#layer-{int(L.id)}"
    names = {os.path.splitext(os.path.basename(g["file"]))[0] for g in figures}
    return next((f"fig-{n}" for n in FIGURES.get(f["rule"], ()) if n in names), None)


#: places of a group listed before the rest are folded into a <details>
SHOWN = 4
#: rules whose findings name activation sites (the box counts "sites", not "layers")
SITE_RULES = ("dead_units", "saturated_activations", "poor_initialization", "tensor_variance",
              "attention_entropy_collapse", "massive_activations", "activation_kurtosis")


def _href(t: str | None) -> str | None:
    return None if t is None else (t if DETAIL_PAGE in t else "#" + t)


def _place_html(rule: str, where: str, layer, figures: list[dict]) -> str:
    """One place of a group, linked to the figure that shows it (the layer's own, else the topic's)."""
    e = html.escape
    h = _href(_target({"rule": rule, "layer": layer}, figures))
    return f'<a href="{e(h)}"><code>{e(where)}</code></a>' if h else f"<code>{e(where)}</code>"


def _group_html(g: dict, figures: list[dict]) -> str:
    """One entry of the box: a group of findings of one rule, severity and message shape."""
    e = html.escape
    sev, rule, n = g["severity"], g["rule"], int(g["n"])
    h = _href(_target({"rule": rule, "layer": g["layers"][0] if g["layers"] else None}, figures))
    link = f' (<a href="{e(h)}">figure</a>)' if h else ""
    head = f'<li class="{e(sev)}"><strong>{e(sev)}</strong> <code>{e(rule)}</code> '
    if n == 1:
        return head + f'<code>{e(g["worst_where"])}</code>: {e(str(g["message"]))}{link}</li>'
    steps = "" if g["first_step"] is None else (
        f', steps {int(g["first_step"])}–{int(g["last_step"])}' if g["last_step"] != g["first_step"]
        else f', step {int(g["first_step"])}')
    what = "sites" if rule in SITE_RULES else "layers"
    places = [_place_html(rule, w, L, figures) for w, L in zip(g["where"], g["layers"])]
    listed = ", ".join(places[:SHOWN])
    if len(places) > SHOWN:
        listed += (f' <details><summary>and {len(places) - SHOWN} more</summary>'
                   f'{", ".join(places[SHOWN:])}</details>')
    worst = "–" if g["worst_value"] is None else f"{float(g['worst_value']):.3g}"
    return (head + f'<strong>{n} {what}</strong>{steps}; worst {e(worst)} at '
            f'<code>{e(g["worst_where"])}</code>: {e(str(g["message"]))}{link}<br>'
            f'{what.capitalize()}, worst first: {listed}</li>')


def findings_html(fd: dict | None, figures: list[dict]) -> str:
    """The page's findings box: one entry per group of findings (rule, severity, message shape), errors,
    warnings and info in that order (skipped rules in one line), each linked to its figure's anchor.
    Empty string when the findings were not evaluated."""
    if not fd:
        return ""
    e = html.escape
    groups = fd.get("groups")
    if groups is None:        # a summary written before the groups: group its rows here
        import pandas as pd

        from ...findings import FINDING_COLUMNS, group
        groups = group(pd.DataFrame(fd["findings"], columns=FINDING_COLUMNS)).to_dict(orient="records")
    skipped = [f for f in fd["findings"] if f["severity"] == "skipped"]
    items = [_group_html(g, figures) for g in groups]
    c = fd["counts"]
    head = (f"<strong>Findings</strong> — {c['error']} error(s), {c['warning']} warning(s), {c['info']} info "
            f"in {len(groups)} group(s) (health rules at their default thresholds; one entry per rule and "
            "kind of message, every row in tables/findings.csv; <code>bbdecoder check</code> re-evaluates them "
            "at others)")
    skip = ("<p class=\"note\">Not evaluated: " + "; ".join(f"<code>{e(f['rule'])}</code> ({e(str(f['message']))})"
                                                         for f in skipped) + "</p>") if skipped else ""
    cls = "bad" if c["error"] or c["warning"] else "ok"
    body = f"<ul>\n{chr(10).join(items)}\n</ul>" if items else "<p>No rule fired.</p>"
    return f'<div class="{cls}" id="findings"><p>{head}</p>\n{body}\n{skip}</div>'
