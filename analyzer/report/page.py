"""The report's index.html: :file:`template.html` (``string.Template``) filled from the summary, the
figures and the tables. Every value put into the page is escaped with :func:`html.escape`, except
the HTML that a function named ``*_html`` built from escaped parts (figure captions are such HTML,
built by their sections)."""

from __future__ import annotations

import html
import math
import os
import string
from functools import lru_cache
from typing import Any, Callable, Iterable

import numpy as np

from .tooltips import areas_html

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "template.html")
DETAIL_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detail.html")
STYLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.css")
#: the per-layer detail page, beside index.html
DETAIL_PAGE = "layers.html"
#: the layer table of index.html starts folded past this many layers
OPEN_LAYER_TABLE = 30


@lru_cache(maxsize=2)
def template(path: str = TEMPLATE) -> string.Template:
    """A page template (read once), with the pages' shared style sheet (report.css) put in its
    ``<style>`` element."""
    with open(path, encoding="utf-8") as f, open(STYLE, encoding="utf-8") as g:
        return string.Template(string.Template(f.read()).safe_substitute(style_css=g.read()))


def cell_html(v: Any) -> str:
    """A table cell's text: "–" for None and non-finite floats, floats to 3 significant digits,
    anything else escaped."""
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(float(v)) else f"{float(v):.3g}"
    return html.escape(str(v))


def status_html(run: dict) -> str:
    """The complete/INCOMPLETE box of the run (``summary["run"]``)."""
    if run["status"] == "complete":
        return '<p class="ok">Status: complete</p>'
    return (f'<p class="bad"><strong>Status: INCOMPLETE</strong> — {html.escape(run["status_reason"] or "incomplete")}.'
            " The figures and numbers cover only what was written before that.</p>")


def head_rows_html(s: dict) -> str:
    """The rows of the summary's headline table."""
    e = html.escape
    run, loss = s["run"], s["loss"]
    head = [
        ("run", f"<code>{e(run['path'])}</code>"),
        ("steps", f"{s['steps']}" + (f" ({s['first_step']} … {s['last_step']})" if s["steps"] else "")),
        ("epochs", str(s["epochs"])),
        ("steps with gradients", str(s["grad_steps"])),
        ("weight snapshots", str(s["weight_snapshots"])),
        ("first loss", f"{cell_html(loss['first'])}" + (f" (step {loss['first_step']})" if loss["first"] is not None
                                                        else "")),
        ("last loss", f"{cell_html(loss['last'])}" + (f" (step {loss['last_step']})" if loss["last"] is not None
                                                      else "")),
        ("layers in report", f"{len(s['layers'])}" + (f" (selection <code>{e(str(s['parameters']['layers']))}"
                                                      "</code>)" if s["parameters"]["layers"] is not None else "")),
        ("ranks recorded", _ranks_cell(run["ranks"]) + (" (figures use the lowest rank)" if run["ranks_used"] else "")),
    ]
    return "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in head)


def _ranks_cell(ranks: list) -> str:
    """``"2 (ranks 0, 1)"``: how many ranks wrote the trace, then their ids (escaped)."""
    if not ranks:
        return "–"
    ids = html.escape(", ".join(map(str, ranks)))
    return f"{len(ranks)} ({'rank' if len(ranks) == 1 else 'ranks'} {ids})"


#: index.html's layer table lists at most this many layers (the first, in id order); all of them are in
#: tables/layer_summary.csv and summary.json (100,000 rows made a 28 MB page)
MAX_LAYER_TABLE_ROWS = 300


def layer_rows_html(layers: list[dict], limit: int = MAX_LAYER_TABLE_ROWS, shared: dict | None = None) -> str:
    """The rows of the per-layer table (summary.json's "layers"), at most ``limit`` of them, then one
    row saying how many more there are and where they are. ``shared``: summary.json's "shared" (a
    layer's other names, shown under its name: a layer whose parameters are all tied to another's has
    0 parameters of its own)."""
    e = html.escape
    shared = shared or {}

    def name(L: dict) -> str:
        also = shared.get(str(L["id"]))
        return f"<code>{e(L['name'] or '(model)')}</code>" + (f'<br><span class="note">{e(also)}</span>' if also else "")

    more = (f'\n<tr><td colspan="10">… and {len(layers) - limit:,} more layers: every layer is in '
            '<a href="tables/layer_summary.csv">tables/layer_summary.csv</a> and summary.json.</td></tr>'
            if len(layers) > limit else "")
    layers = layers[:limit]
    return "\n".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            cell_html(L["id"]), name(L), e(L["type"]), cell_html(L["n_params"]),
            "yes" if L["recorded"] else "no", cell_html(L["mean_abs_grad"]), cell_html(L["max_abs_grad"]),
            cell_html(L["last_epoch_mean_l2"]), cell_html(L["weight_l2_final"]),
            cell_html(L["update_ratio_median"]))) + "</tr>"
        for L in layers) + more


def figures_html(s: dict, figures: list[dict], groups: Iterable[tuple[str, str, Callable | None]],
                 detail: bool = False) -> str:
    """The figure groups of a page, in ``groups`` order: a heading, the group's intro (its
    ``intro_html(summary)``), then its figures; the "layers" group (only on the detail page,
    ``detail=True``) sorted by layer id, with a heading per layer."""
    e = html.escape
    figs = []
    for key, title, intro_html in groups:
        if key == "layers" and not detail:
            continue
        fs = [f for f in figures if f["section"] == key]
        if not fs:
            continue
        figs.append(f"<h2>{e(title)}</h2>")
        if intro_html is not None:
            figs.append(intro_html(s))
        if key == "layers":      # grouped by layer, in id order
            fs = sorted(fs, key=lambda f: f["layer"].id)
        last = None
        for f in fs:
            L = f["layer"]
            if L is not None and L.id != last:
                last = L.id
                figs.append(f'<h3 id="layer-{int(L.id)}">Layer {int(L.id)}: <code>{e(L.name or "(model)")}</code> '
                            f"({e(L.type)})</h3>")
            stem = os.path.splitext(os.path.basename(f["file"]))[0]
            img = f'<img id="fig-{e(stem)}" src="{e(f["file"])}" alt="{e(f["title"])}" loading="lazy">'
            figs.append(f'<figure>{areas_html(img, f.get("areas") or ())}'
                        f'<figcaption><strong>{e(f["title"])}.</strong> {f["caption_html"]}</figcaption></figure>')
    return "\n".join(figs)


def tables_html(tables: list[dict]) -> str:
    """The list items linking the tables."""
    e = html.escape
    return "\n".join(f'<li><a href="{e(t["file"])}">{e(t["file"])}</a> — {e(t["description"])} '
                     f'({t["rows"]} rows)</li>' for t in tables)


def skipped_html(s: dict) -> str:
    """The list items of what was skipped or not recorded ("nothing" when empty)."""
    if not (s["skipped"] or s["not_recorded"]):
        return "<li>nothing</li>"
    return "\n".join(f"<li>{html.escape(x)}</li>" for x in s["skipped"] + s["not_recorded"])


def stale_html(s: dict) -> str:
    """The note on files of an earlier report left in the directory (empty when none)."""
    if not s.get("stale_files"):
        return ""
    return ("<p class='note'>Also in this directory, from an earlier report and not part of this one: "
            + ", ".join(f"<code>{html.escape(p)}</code>" for p in s["stale_files"][:50])
            + (" …" if len(s["stale_files"]) > 50 else "") + "</p>")


def render_page(s: dict, figures: list[dict], tables: list[dict], groups: Iterable[tuple[str, str, Callable | None]],
                nonfinite_html: Callable[[Any], str]) -> str:
    """index.html of a report.

    Args:
        s: the summary (as written to summary.json, before NaN became None).
        figures: {file, title, caption_html, section, layer} per drawn figure, in queue order.
        tables: {file, rows, description} per table.
        groups: the figure groups (see :data:`analyzer.report.sections.GROUPS`).
        nonfinite_html: the function making the non-finite warning box from ``s["nonfinite"]``.

    Returns:
        The page's text.
    """
    e = html.escape
    run = s["run"]
    n_detail = len({int(f["layer"].id) for f in figures if f["section"] == "layers"})
    last_epoch = next((L["last_epoch"] for L in s["layers"] if L["last_epoch"] is not None), None)
    return template().substitute(
        title=e(os.path.basename(run["path"]) or run["path"]),
        version=e(s["bbdecoder_version"]), created=e(s["created"]), bins=e(str(s["parameters"]["bins"])),
        status_html=status_html(run), nonfinite_html=nonfinite_html(s.get("nonfinite")),
        head_rows_html=head_rows_html(s), layer_rows_html=layer_rows_html(s["layers"], shared=s.get("shared")),
        last_epoch_html=cell_html(last_epoch), figures_html=figures_html(s, figures, groups),
        n_layers=str(len(s["layers"])), layers_open=" open" if len(s["layers"]) <= OPEN_LAYER_TABLE else "",
        detail_link_html=(f'<p><a href="{DETAIL_PAGE}">Per-layer detail</a>: the figures of {n_detail} '
                          f'layer{"s" if n_detail != 1 else ""}.</p>' if n_detail else ""),
        tables_html=tables_html(tables), stale_html=stale_html(s), skipped_html=skipped_html(s))


def render_detail_page(s: dict, figures: list[dict], groups: Iterable[tuple[str, str, Callable | None]],
                       why: str) -> str:
    """layers.html of a report: the per-layer figures (the "layers" group), a heading per layer.

    Args:
        s: the summary. figures: as for :func:`render_page`. groups: the figure groups.
        why: plain text saying which layers have detail and why (escaped here).
    """
    e = html.escape
    run = s["run"]
    return template(DETAIL_TEMPLATE).substitute(
        title=e(os.path.basename(run["path"]) or run["path"]), run_path=e(run["path"]), why_html=e(why),
        figures_html=figures_html(s, [f for f in figures if f["section"] == "layers"],
                                  [g for g in groups if g[0] == "layers"], detail=True))
