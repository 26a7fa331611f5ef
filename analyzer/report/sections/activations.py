"""The activations section: dead units (the unit raster; the per site and step heatmap is the overview's
``dead_fraction_heatmap``, drawn once and linked from this group's intro), saturation,
distributions, variance and similarity across a dimension, and the pruning sweep, at the report's
thresholds; their tables; summary.json's "activations" headline; the section's per-site HTML table."""

from __future__ import annotations

import html
from typing import Callable

import numpy as np
import pandas as pd

from ... import activations as A
from ...activations.sites import RELU_KINDS, attention_note
from .. import plots
from ..data import dead_layer_table, dead_sweep
from ..figures import FIG_DIR
from ..page import cell_html
from .overview import activation_frames

#: the activation figures (listed under not_recorded for a trace without activation sites)
ACT_FIGURES = ("dead unit raster", "saturation", "activation distributions",
               "dimension variance and similarity", "pruning sweep")


def add(rep) -> None:
    """Dead units, saturation, distributions, variance/similarity and the pruning sweep of the
    activation sites, at the report's thresholds (``rep.act``); their tables and summary.json's
    "activations" headline."""
    run, a = rep.run, rep.act
    crit, thr, maf, share = a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"], a["layer_share"]
    sites = run.sites
    order = list(sites["name"])
    du = A.dead_units(run, crit, thr, maf, layer_share=share)
    dl = dead_layer_table(du)
    dps, sat = activation_frames(rep)   # A.dead_per_step and A.saturation, shared with the overview
    satl = A.saturation_layers(run, a["delta"], unit_fraction=a["unit_fraction"], layer_share=share)
    ast = A.activation_stats(run, per="epoch")
    crit_text = criterion_text(a)
    rep.table("activation_stats_epoch", ast, "per-unit activation statistics per (epoch, site, unit): count, "
              "mean, abs_mean, std, min, max, frac_active (> 0), apoz")
    rep.table("dead_units", du, f"per (site, unit): active_fraction, max, score, dead, died_at under {crit_text}")
    rep.table("dead_layers", dl, f"per site: units, dead, dead_fraction, flagged (dead_fraction > "
              f"{share:g}) under {crit_text}")
    rep.table("dead_per_step", dps, f"per (step, site): fraction of units dead at that step ({crit_text})")
    rep.table("saturation", sat, f"per (step, site): saturated fraction at delta {a['delta']:g} "
              "(ReLU family: fraction <= 0; GELU/SiLU and other smooth kinds not judged)")
    rep.table("saturation_layers", satl, f"per site: saturated fraction, share of saturated units (> "
              f"{a['unit_fraction']:g} of their values), flagged (share > {share:g})")
    rep.extra["activations"] = _headline(a, sites, dl, satl)
    note = attention_note(run)
    rep.extra["activations"]["attention_note"] = note
    if note:
        rep.not_recorded.append(note[0].upper() + note[1:])
    if not len(sites):
        why = ("the trace has no activation sites (record with Recorder(..., activations='all') or a "
               "selection of modules and functional activations)")
        for n in ACT_FIGURES:
            rep.not_recorded.append(f"figure {n}: {why}")
        return
    with rep.progress("report: activation figures", len(ACT_FIGURES)) as bar:
        _dead_raster(rep, du, dps, order, crit_text)
        bar.update(1)
        _saturation(rep, sat, order)
        bar.update(1)
        _distributions(rep, ast, order)
        bar.update(1)
        _variance_similarity(rep, sites, order)
        bar.update(1)
        _sweep(rep, du, order)
        bar.update(1)


def criterion_text(a: dict) -> str:
    """The dead criterion of the report options ``a`` in words (captions, table descriptions)."""
    c, t, m = a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"]
    if c == "strict":
        return (f"strict (never above {t:g})" if m == 0 else
                f"strict (values > 0 in at most {m:g} of the cases)")
    if c == "apoz":
        return f"APoZ >= {t:g} (fraction of values <= 0)"
    return f"dormant (E|h| / layer mean E|h| <= {t:g})"


def _headline(a: dict, sites: pd.DataFrame, dl: pd.DataFrame, satl: pd.DataFrame) -> dict:
    """summary.json's "activations": per site the dead and saturation headline numbers, flags, definitions."""
    d = dl.set_index("site") if len(dl) else None
    sl = satl.set_index("site") if len(satl) else None
    rows = []
    for S in sites.itertuples(index=False):
        r = {"site": S.name, "kind": S.kind, "source": S.source, "units": S.units,
             "dead": None, "dead_fraction": None, "dead_flagged": None,
             "saturated": None, "saturated_units": None, "saturation_flagged": None}
        if d is not None and S.name in d.index:
            x = d.loc[S.name]
            r.update(dead=int(x["dead"]), dead_fraction=float(x["dead_fraction"]), dead_flagged=bool(x["flagged"]))
        if sl is not None and S.name in sl.index:
            x = sl.loc[S.name]
            r.update(saturated=float(x["saturated"]), saturated_units=float(x["saturated_units"]),
                     saturation_flagged=bool(x["flagged"]))
        rows.append(r)
    return {
        "sites": rows,
        "dead_flagged": [r["site"] for r in rows if r["dead_flagged"]],
        "saturation_flagged": [r["site"] for r in rows if r["saturation_flagged"]],
        "criterion": criterion_text(a),
        "raster_site": None,
        "definitions": {
            "dead_fraction": "share of the site's units dead over the whole run under the criterion",
            "dead_flagged": "dead_fraction > layer_share",
            "saturated": "mean over steps (and units) of the fraction of saturated values: bounded kinds "
                         "within delta of a bound (softmax: row max > 1 - delta), ReLU family <= 0; "
                         "smooth kinds (GELU, SiLU) not judged (null)",
            "saturated_units": "share of units saturated in more than unit_fraction of their values",
            "saturation_flagged": "saturated_units > layer_share",
        },
    }


def _act_figure(rep, key: str, name: str, title: str, caption: str, draw: Callable, why: str | None) -> None:
    if why:
        rep.skip(f"figure {key}", why)
    else:
        rep.figure(name, title, caption, draw, "activations")


def _dead_raster(rep, du, dps, order, crit_text) -> None:
    a, run = rep.act, rep.run
    if a["raster_site"] is not None:
        site = A.select_site(run, a["raster_site"])["name"]
        how = "chosen with --raster-site"
    else:
        site, how = None, "the site with the most dead units"
        if len(du):
            cnt = du.groupby("site", sort=False)["dead"].sum()
            per = dps.groupby("site", sort=False)["dead_fraction"].mean() if len(dps) else pd.Series(dtype=float)
            key = [(int(cnt.get(s, 0)), float(per.get(s, 0.0)), -i) for i, s in enumerate(order)]
            site = order[max(range(len(order)), key=lambda i: key[i])]
    rep.extra["activations"]["raster_site"] = site
    if site is None:
        rep.skip("figure dead unit raster", "no activation statistics recorded")
        return
    st, mask = A.dead_mask(run, site, a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"])
    k, U = mask.shape
    if a["raster_site"] is None and not mask.any():   # an all-white picture says less than this line
        rep.skip("figure dead unit raster", f"no unit of any site is dead at any step under {crit_text}")
        return
    df = pd.DataFrame({"step": np.repeat(st, U), "unit": np.tile(np.arange(U), k), "dead": mask.reshape(-1)})
    ndead = int(du.loc[du["site"] == site, "dead"].sum()) if len(du) else 0

    def draw():
        fig, ax = plots.new_figure(11, max(3.0, min(9.0, 1.5 + 0.12 * min(U, plots.MAX_RASTER_ROWS))))
        plots.dead_raster(df, ax[0, 0], title=f"Dead units of {plots.text(site)} at each step")
        return fig
    _act_figure(rep, "dead unit raster", "act_dead_raster", f"Dead-unit raster: {site}",
                    f"Site <code>{html.escape(site)}</code> ({how}; {ndead} of {U} units dead over the "
                    f"run): one row per unit, one column per step, black where the unit is dead at that "
                    f"step under {html.escape(crit_text)}. A row black to the right edge is a unit that "
                    "died and never recovered (its died_at in dead_units.csv is where the black run "
                    "starts); speckle is a unit that is silent on some batches only.",
                    draw, plots.check(df, plots.dead_raster))


def _saturation(rep, sat, order) -> None:
    a = rep.act
    used = sorted({float(x) for x in sat["delta_used"].dropna()}) if len(sat) else []
    note = (f" delta is rounded down to the stored histogram's bin edges: used {', '.join(f'{u:g}' for u in used)}."
            if any(abs(u - a["delta"]) > 1e-12 for u in used if u) else "")
    kinds = set(sat["kind"]) if len(sat) else set()
    panels = 1 + (len(kinds & set(RELU_KINDS)) > 0 and len(kinds - set(RELU_KINDS)) > 0)

    def draw():
        fig = plots.figure(7.5 * panels, 4.5)
        plots.saturation_lines(sat, fig, order=order)
        return fig
    why = plots.check(sat, plots.saturation_lines)
    if why == "no data":
        why = ("no activation site of a saturating kind (ReLU family, sigmoid, tanh, hardtanh, softmax; "
               "GELU and SiLU are not judged)")
    _act_figure(rep, "saturation", "act_saturation", "Saturation per site",
                    f"Fraction of saturated values at every recorded step, one line per site. Bounded "
                    f"activations: sigmoid/hardtanh values within delta = {a['delta']:g} of a bound, tanh "
                    f"|a| > 1 − delta, softmax rows whose largest probability exceeds 1 − delta. ReLU "
                    "family: the fraction of values at or below zero (no gradient flows there). "
                    "GELU, SiLU and the other smooth kinds are not judged here (unbounded above; a unit "
                    "stuck in their flat negative tail counts as dead under strict). "
                    "Saturation near 1 means a layer has stopped passing gradient." + note,
                    draw, why)


def _distributions(rep, ast, order) -> None:
    last = ast[ast["epoch"] == ast["epoch"].max()] if len(ast) else ast
    n = last["site"].nunique() if len(last) else 0
    ep = int(last["epoch"].iloc[0]) if len(last) else None

    def draw():
        fig = plots.figure(12, max(3.2, min(16.0, 1.4 + 0.42 * n)))
        plots.activation_distributions(last, fig, order=order,
                                       title=f"Per-unit activation statistics, epoch {ep}")
        return fig
    _act_figure(rep, "activation distributions", "act_distributions", "Activation distributions",
                    f"Per site (rows, forward order), the distribution over its units of statistics pooled "
                    f"over the last epoch ({ep}): left, the fraction of each unit's values that are > 0 "
                    "(0 = a unit that never fires); right, each unit's mean activation, with the grey bar "
                    "spanning the smallest and largest value any unit of the site produced. Boxes are the "
                    "quartiles over units; dots are single units.", draw,
                    plots.check(last, plots.activation_distributions))


def _variance_similarity(rep, sites, order) -> None:
    a, run = rep.act, rep.run
    dim, method = a["sim_dim"], a["sim_method"]
    parts, too_few = [], []
    for S in run.catalog.sites:
        nd = len(S.get("sample_shape") or ()) + 1
        if dim >= nd:
            too_few.append(S["name"])
            continue
        dv = A.dimension_variance(run, S["name"], dim=dim)
        if not len(dv):
            continue
        sm = A.similarity(run, S["name"], dim=dim, method=method)
        m = dv.merge(sm[["step", "similarity"]], on="step", how="left")
        m.insert(1, "site", S["name"])
        m.insert(2, "kind", S["kind"])
        m["dim"], m["method"] = dim, method
        parts.append(m)
    cols = ["step", "site", "kind", "variance", "slice_mean_variance", "similarity", "slices", "samples",
            "dim", "method"]
    df = pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame({c: [] for c in cols})
    rep.table("activation_dims", df, f"per (step, site) with raw samples: variance across dim {dim}, "
              f"variance of the slice means, mean pairwise {method} similarity of the slices")
    n = df["site"].nunique() if len(df) else 0
    if not len(df):
        why = ("no raw activation samples in the trace (activation_samples=0, or the activations_every "
               "schedule never fired)")
        if too_few and len(too_few) == len(run.catalog.sites):
            why = f"--sim-dim {dim} is beyond the dimensions of every site's samples"
        rep.skip("figure dimension variance and similarity", why)
        return
    if too_few:
        rep.skip(f"dimension variance and similarity of {len(too_few)} site(s)",
                 f"their samples have no dimension {dim} ({', '.join(too_few[:5])}"
                 f"{', …' if len(too_few) > 5 else ''})")

    def draw():
        fig = plots.figure(13 if n <= plots.MAX_LEGEND else 12, 4.6)
        plots.variance_similarity(df, fig, order=order, method=method, dim=dim)
        return fig
    sim = ("mean cosine similarity over pairs of distinct slices (1 = all slices point the same way: "
           "redundant units)" if method == "cosine" else
           "mean KL divergence KL(p_i ‖ p_j) over ordered pairs of distinct slices, each slice turned into "
           "a distribution by a softmax (0 = identical slices: redundant units)")
    _act_figure(rep, "dimension variance and similarity", "act_variance_similarity",
                    "Variance and similarity across a dimension",
                    f"For every site with raw samples, at every step where samples were recorded (dimension "
                    f"{dim}, counting the sample axis as 0; for conv outputs dimension 1 is the channel). "
                    "Left: the variance of the values along that dimension, averaged over the other "
                    f"positions. Right: the {sim}. Collapsing variance or similarity rising towards 1 "
                    "means the units of a layer become interchangeable.", draw,
                    plots.check(df, plots.variance_similarity))


def _sweep(rep, du, order) -> None:
    a = rep.act
    sw = dead_sweep(rep.run, a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"], du=du)
    rep.table("pruning_sweep", sw, "sparsity versus threshold per site under the dead criterion "
              "(site '(all sites)' pools every unit)")
    param = sw["parameter"].iloc[0] if len(sw) else "threshold"
    chosen = a["max_active_fraction"] if param == "max_active_fraction" else a["dead_threshold"]
    xlabel = {("strict", "threshold"): "threshold (value units): dead if never above",
              ("strict", "max_active_fraction"): "max_active_fraction: dead if active (> 0) at most this often",
              ("apoz", "threshold"): "APoZ threshold: dead if this fraction of values is <= 0",
              ("dormant", "threshold"): "dormant threshold τ: dead if E|h| / layer mean <= τ"}.get(
                  (a["dead_criterion"], param), param)

    def draw():
        fig, ax = plots.new_figure(10, 4.8)
        plots.pruning_sweep(sw, ax[0, 0], order=order, chosen=chosen, xlabel=xlabel,
                            title=f"Pruning sweep ({a['dead_criterion']})")
        return fig
    _act_figure(rep, "pruning sweep", "act_pruning_sweep", "Pruning sweep",
                    f"Sparsity a dead-unit pruning would reach (fraction of each site's units dead over the "
                    f"whole run, criterion {html.escape(a['dead_criterion'])}) at each value of the "
                    f"{html.escape(param)} (x), one line per site; thick black: all sites' units together; "
                    "dashed: this report's value. The same numbers are in pruning_sweep.csv; rerun the "
                    "report with another --dead-threshold for the per-unit lists at that value.",
                    draw, plots.check(sw, plots.pruning_sweep))


def intro_html(s: dict) -> str:
    """HTML (from escaped parts) opening the activations group of the page: the parameters and the
    per-site headline table, from the summary ``s``."""
    e = html.escape
    a, p = s["activations"], s["parameters"]
    dead_link = (" The fraction of each site's units dead at each step is drawn once, in the overview: <a "
                 "href='#fig-dead_fraction_heatmap'>dead units per activation site and step</a>."
                 if f"{FIG_DIR}/dead_fraction_heatmap.png" in s.get("figures", ()) else "")
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            f"<code>{e(r['site'])}</code>", e(str(r["kind"])), cell_html(r["units"]), cell_html(r["dead"]),
            cell_html(r["dead_fraction"]), "<strong>yes</strong>" if r["dead_flagged"] else
            ("no" if r["dead_flagged"] is not None else "–"), cell_html(r["saturated"]), cell_html(r["saturated_units"]),
            "<strong>yes</strong>" if r["saturation_flagged"] else
            ("no" if r["saturation_flagged"] is not None else "–"))) + "</tr>"
        for r in a.get("sites", []))
    return (f"<p class='note'>Dead criterion: {e(a.get('criterion') or '')}; a site is flagged when more than "
            f"{p['layer_share']:g} of its units are dead (or saturated). Saturation: delta {p['delta']:g}, a unit "
            f"is saturated when more than {p['unit_fraction']:g} of its values are. Similarity: dimension "
            f"{p['sim_dim']}, {e(p['sim_method'])}. Rerun <code>bbdecoder report</code> with other "
            "<code>--dead-criterion/--dead-threshold/--delta/...</code> into another <code>--out</code> for "
            "other thresholds." + dead_link + "</p>\n"
            "<table class='num'><tr><th>site</th><th>kind</th><th>units</th><th>dead</th><th>dead fraction</th>"
            "<th>dead flagged</th><th>saturated</th><th>saturated units</th><th>saturation flagged</th></tr>\n"
            f"{rows}\n</table>")
