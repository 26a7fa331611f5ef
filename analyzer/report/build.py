"""The report pipeline: read the shared tables, run the sections (:data:`sections.SECTIONS`), draw the
queued figures (:mod:`.figures`), write summary.json and index.html (:mod:`.page`). Files are
written under the output directory only, each through :func:`analyzer.trace.files.atomic_write`;
nothing is ever deleted."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd

from .. import heap
from ..activations import select_site
from ..outdir import out_lock, prepare_out_dir
from ..progress import silenced
from ..trace.files import atomic_write, write_text_atomic
from ..trace import workers
from ..trace.format import TraceError
from ..values import csv_safe, json_safe
from . import beside
from . import figures as F
from . import plots
from . import data as report_data
from .data import STEP_TABLES, load_frames, step_table_policy
from .options import check_activation_options
from .page import DETAIL_PAGE, render_detail_page, render_page
from .sections import GROUPS, SECTIONS
from .sections.findings import findings_html
from .sections.nonfinite import nonfinite_html

FIG_DIR = F.FIG_DIR
TAB_DIR = "tables"
#: summary.json is written on one line (no indentation) past this many layers
COMPACT_JSON_LAYERS = 2000

#: the definitions of the per-layer headline numbers (summary.json)
DEFINITIONS = {
    "mean_abs_grad": "sum over steps of sum|g| / sum over steps of finite element count",
    "max_abs_grad": "max |g| over all recorded steps",
    "last_epoch_mean_l2": "mean over the last epoch's recorded steps of the layer's gradient L2 norm",
    "weight_l2_final": "sqrt(sum over the layer's parameters of ||w||^2) at the last snapshot",
    "update_ratio_median": "median over snapshots of the layer's ||w_t - w_prev|| / ||w_prev||",
    "layers_pool": "statistics of a layer pool all its parameters (weight, bias, ...)",
}


class Report:
    """One report being built: what the sections write into (tables, queued figures, skipped items,
    summary parts) and the pipeline that runs them.

    Attributes:
        run: the :class:`analyzer.run.Run`. out: the output directory (absolute). act: the checked
        activation options. bins: weight histogram bins. progress: the progress factory of the
        report's own bars. data: the shared :class:`analyzer.report.data.Frames` (set by
        :meth:`build`). extra: summary parts from sections ("activations", "attention", "nonfinite").
    """

    def __init__(self, run, out_dir: str, layers: Any, bins: int, progress: Callable | None,
                 act: dict | None = None, jobs: int | None = None, detail: Any = None):
        self.run = run
        self.detail_spec = detail
        self.module_depth = None   # depth of the module table and graph (None: analyzer.graph.default_depth)
        self.jobs = F.default_jobs() if jobs is None else max(1, int(jobs))
        self.figure_processes = 1
        self.act = dict(act or check_activation_options())
        self.out = os.path.abspath(os.fspath(out_dir))
        self.drawing = F.Drawing(self.out, self.jobs)   # the queued figures and their drawing processes
        self.layers_spec = layers
        self.bins = bins
        self.progress = progress or run.progress
        self.data = None
        self.extra: dict[str, Any] = {}
        self.figures: list[dict] = []
        self.tables: list[dict] = []
        self.skipped: list[str] = []
        self.missing: list[str] = []
        self.not_recorded: list[str] = []

    # ------------------------------------------------------------------ what sections call
    def skip(self, item: str, reason: str) -> None:
        """List ``item`` as skipped, with the reason (summary.json and the page)."""
        self.skipped.append(f"{item}: {reason}")

    def figure(self, name: str, title: str, caption_html: str, draw: Callable[[], Any], section: str,
               layer: Any = None, areas: Any = ()) -> None:
        """Queue figures/<name>.png, drawn by ``draw()`` (returns the figure) once every section ran.
        ``caption_html``: HTML built from escaped parts. ``layer``: the layer record (row of the layer
        table) of a per-layer figure. ``areas``: tooltips over the picture (:mod:`.tooltips`)."""
        self.drawing.add(F.FigureSpec(name, title, caption_html, draw, section, layer, tuple(areas)))

    def table(self, name: str, df: pd.DataFrame, description: str) -> None:
        """Write tables/<name>.csv (atomically) and list it."""
        rel = f"{TAB_DIR}/{name}.csv"
        atomic_write(os.path.join(self.out, TAB_DIR, f"{name}.csv"), lambda p: csv_safe(df).to_csv(p, index=False))
        self.tables.append({"file": rel, "rows": int(len(df)), "description": description})

    def step_table(self, name: str, df: pd.DataFrame, description: str) -> None:
        """Write the per-step table ``name`` (a key of :data:`analyzer.report.data.STEP_TABLES`) whole when it
        fits :data:`~analyzer.report.data.ROW_BUDGET` rows, else the per-epoch (and per-group) tables that
        stand for it (:func:`~analyzer.report.data.step_table_policy`), and list it under skipped with the
        reason and how to read every row."""
        alt = step_table_policy(name, df, self.data)
        if alt is None:
            self.table(name, df, description)
            return
        instead = ", ".join(f"{TAB_DIR}/{n}.csv" for n, _, _ in alt) or (
            f"{TAB_DIR}/grad_stats_epoch.csv (per epoch)" if name == "grad_stats_step" else "")
        self.skip(f"table {TAB_DIR}/{name}.csv", f"{len(df):,} rows ({description}) are more than the report's "
                  f"{report_data.ROW_BUDGET:,}; written instead: {instead}; every row: bbdecoder.open(RUN)."
                  f"{STEP_TABLES[name].removeprefix('run.')} in Python, or a report of fewer layers (layers=...)")
        for n, t, desc in alt:
            self.table(n, t, f"{desc} (instead of {name}.csv: {len(df):,} rows)")

    def detail_ids(self) -> set:
        """Ids of the layers that get per-layer figures (the detail page): the ``detail`` option's
        layers ("all": every layer of the report); by default the layers a user selected with
        ``layers``, else those a finding points at (``extra["finding_layers"]``, set by the findings
        section), else none."""
        ids = {int(i) for i in self.data.ids}
        if self.detail_spec is None:
            if self.layers_spec is not None:
                return ids
            return ids & {int(i) for i in self.extra.get("finding_layers", ())}
        if isinstance(self.detail_spec, str) and self.detail_spec.strip() in ("all", "none"):
            return ids if self.detail_spec.strip() == "all" else set()
        return ids & {int(i) for i in self.run.select(self.detail_spec)}

    def detail_reason(self) -> str:
        """Plain text: which layers have per-layer figures, and why (the detail page's note)."""
        if self.detail_spec is not None:
            return f"Layers chosen with detail={self.detail_spec!r}."
        if self.layers_spec is not None:
            return f"The layers selected for this report ({self.layers_spec!r})."
        return "The layers that a finding points at (the most severe first, at most 12)."

    # ------------------------------------------------------------------ pipeline
    def build(self) -> dict:
        """Write the report; returns the summary (as in summary.json)."""
        prepare_out_dir(self.out, None, (FIG_DIR, TAB_DIR))   # no links where outputs go
        with out_lock(self.out), self.run.keep_open():   # one writer; shard files stay open across passes
            return self._build()

    def _build(self) -> dict:
        t0 = time.perf_counter()
        before = self._existing()
        side = beside.start(self)   # the sections that need no gradients, beside the data passes
        with workers.meanwhile(plots.warm_up):   # matplotlib loaded while the pass's workers read
            self.data = d = load_frames(self.run, self.layers_spec)
        heap.trim()   # the passes' freed temporaries go back to the OS before the sections and the forks
        if len(d.ids) >= heap.MANY_LAYERS:   # figures drawn once the frames are freed, not beside the sections
            self.drawing.hold()
        self._share_with_findings(d)
        if not len(d.gl):
            self.missing.append("no gradients")
        if not len(d.ws1):
            self.missing.append("no weight snapshots")
        with silenced(self.run):    # the run's own bars would nest inside the report's
            for section in SECTIONS:
                if section not in beside.SECTIONS or side is None:
                    self.add_section(section)
                elif section is beside.SECTIONS[0] and not side.join(self):   # it failed: here after all
                    side = None
                    self.add_section(section)
        self._counts = self._step_counts(d)
        if d.own_pass:   # the frames of the report's own pass: free before the figures are drawn (issue 16)
            self.data = d = report_data.released(d)
            self.run.findings_tables().forget("grads", "grad_layers")
            gc.collect()
            heap.trim()
        self._render()
        gc.unfreeze()   # frozen before forking the processes beside (all of them have ended)
        if self.missing:
            warnings.warn(f"bbdecoder report: the trace has {' and '.join(self.missing)}; the figures that "
                          "need them are skipped (see the report's skipped list)", stacklevel=3)
        summary = self._summary()
        summary["findings"] = self.extra.get("findings")
        summary["nonfinite"] = self.extra.get("nonfinite")
        summary["attention"] = self.extra.get("attention", {})
        summary["modules"] = self.extra.get("modules")
        written = {f["file"] for f in self.figures} | {t["file"] for t in self.tables}
        if any(f["section"] == "layers" for f in self.figures):
            written.add(DETAIL_PAGE)
        summary["stale_files"] = sorted(p for p in before if p not in written)
        summary["figure_processes"] = self.figure_processes
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        layers, summary["layers"] = summary["layers"], []   # JSON-safe already: not copied (100,000 layers)
        safe = json_safe(summary)
        safe["layers"] = summary["layers"] = layers
        # indented for a person up to a few thousand layers; past that one line (the C encoder: 100,000 layers
        # take 0.5 s instead of 9 s indented)
        indent = 1 if len(safe["layers"]) <= COMPACT_JSON_LAYERS else None
        write_text_atomic(os.path.join(self.out, "summary.json"),
                          json.dumps(safe, indent=indent, allow_nan=False) + "\n")
        write_text_atomic(os.path.join(self.out, "index.html"),
                          render_page(summary, self.figures, self.tables, GROUPS, lambda nf: findings_html(
                              summary["findings"], self.figures) + nonfinite_html(nf)))
        if any(f["section"] == "layers" for f in self.figures):
            write_text_atomic(os.path.join(self.out, DETAIL_PAGE),
                              render_detail_page(summary, self.figures, GROUPS, self.detail_reason()))
        return safe

    def _share_with_findings(self, d) -> None:
        """Hand the per-step gradient frame to the health rules' tables (:func:`analyzer.findings.data.
        grads_from_frame`) so that the findings section does not read the gradient statistics again."""
        from ..findings.data import grad_layers_from_frame, grads_from_frame
        tables = self.run.findings_tables()
        if "grads" in tables.computed:
            return
        g = grads_from_frame(self.run.catalog, d.gs_all, d.ids)
        gl = grad_layers_from_frame(self.run.catalog, d.gs_all, d.gl_all, d.ids)   # H1, issue 16: no second copy
        if g is not None and (gl is not None or "l2" in g.columns):   # a slimmed frame: only beside gl
            tables.adopt("grads", g)
        if gl is not None and "grad_layers" not in tables.computed:
            tables.adopt("grad_layers", gl)

    def add_section(self, section, draw_meanwhile: bool = True) -> None:
        """Run one section; one that fails on this trace (a hostile or damaged file the readers let
        through) is listed as skipped with its error, and the rest of the report is written. Then,
        unless ``draw_meanwhile`` is False, the figures queued so far start being drawn
        (:meth:`analyzer.report.figures.Drawing.meanwhile`)."""
        try:
            section.add(self)
        except Exception as e:   # noqa: BLE001 - a trace is data: one bad part never sinks the report
            name = section.__name__.rsplit(".", 1)[-1]
            why = " ".join(str(e).split())[:300] or type(e).__name__
            self.skip(f"{name} section", why if isinstance(e, TraceError) else f"{type(e).__name__}: {why}")
            warnings.warn(f"bbdecoder report: the {name} section was skipped: {why}", stacklevel=4)
        if draw_meanwhile:
            self.drawing.meanwhile()   # the figures queued so far are drawn while the next sections compute

    def _render(self) -> None:
        """Draw the queued figures (see :class:`analyzer.report.figures.Drawing`). A figure that cannot
        be drawn is listed as skipped with its error (one warning each); the others are listed in
        queue order."""
        errors = self.drawing.finish(before_fork=self.run.close)
        self.figure_processes = self.drawing.processes
        for spec, err in zip(self.drawing.specs, errors):
            if err is None:
                self.figures.append({"file": f"{FIG_DIR}/{spec.name}.png", "title": spec.title,
                                     "caption_html": spec.caption_html, "section": spec.section,
                                     "layer": spec.layer, "areas": spec.areas})
            else:
                self.skip(f"figure {spec.name}", f"could not be drawn ({err})")
                warnings.warn(f"bbdecoder report: figure {spec.name} could not be drawn: {err}", stacklevel=4)

    def _existing(self) -> set:
        out = {DETAIL_PAGE} if os.path.isfile(os.path.join(self.out, DETAIL_PAGE)) else set()
        for sub in (FIG_DIR, TAB_DIR):
            try:
                names = os.listdir(os.path.join(self.out, sub))
            except OSError:
                continue
            out |= {f"{sub}/{n}" for n in names if not n.startswith(".tmp-")}
        return out

    @staticmethod
    def _step_counts(d) -> tuple[int, int]:
        """(steps with gradients, weight snapshots) of the report's layers, for summary.json."""
        return (int(d.gl["step"].nunique()) if len(d.gl) else 0, int(d.ws1["step"].nunique()) if len(d.ws1) else 0)

    def _summary(self) -> dict:
        run, d = self.run, self.data
        from .. import __version__
        steps = d.steps
        loss = steps[np.isfinite(steps["loss"].to_numpy(np.float64))] if len(steps) else steps
        first = loss.iloc[0] if len(loss) else None
        last = loss.iloc[-1] if len(loss) else None
        grad_steps, weight_snapshots = getattr(self, "_counts", None) or self._step_counts(d)
        return {
            "bbdecoder_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parameters": {"run": run.path, "out_dir": self.out,
                           "layers": self.layers_spec if self.layers_spec is None
                           or isinstance(self.layers_spec, (str, int)) else repr(self.layers_spec),
                           "detail": self.detail_spec if self.detail_spec is None
                           or isinstance(self.detail_spec, (str, int)) else repr(self.detail_spec),
                           "bins": self.bins, "depth": self.module_depth, **self.act},
            "run": {"path": run.path, "status": run.status, "status_reason": run.status_reason,
                    "format_version": run.manifest.get("format_version"), "ranks": run.ranks,
                    "ranks_used": "lowest rank only" if d.multi_rank else None,
                    "problems": list(run.problems)},
            "steps": int(len(steps)), "epochs": int(run.epochs),
            "first_step": int(steps["step"].iloc[0]) if len(steps) else None,
            "last_step": int(steps["step"].iloc[-1]) if len(steps) else None,
            "grad_steps": grad_steps, "weight_snapshots": weight_snapshots,
            "loss": {"first": float(first["loss"]) if first is not None else None,
                     "first_step": int(first["step"]) if first is not None else None,
                     "last": float(last["loss"]) if last is not None else None,
                     "last_step": int(last["step"]) if last is not None else None},
            "definitions": dict(DEFINITIONS),
            "layers": layer_records(d.summary),
            "shared": shared_names(d.lt),
            "activations": self.extra.get("activations", {}),
            "figures": [f["file"] for f in self.figures],
            "tables": [t["file"] for t in self.tables],
            "skipped": list(self.skipped),
            "not_recorded": list(self.not_recorded),
        }


#: summary.json's per-layer record: (key, column of :func:`analyzer.report.data.layer_summary`, kind)
LAYER_RECORD = (("id", "layer_id", int), ("name", "name", str), ("type", "type", str), ("n_params", "n_params", int),
                ("recorded", "selected", bool), ("grad_steps", "grad_steps", int),
                ("mean_abs_grad", "mean_abs_grad", float), ("max_abs_grad", "max_abs_grad", float),
                ("last_epoch", "last_epoch", "epoch"), ("last_epoch_mean_l2", "last_epoch_mean_l2", float),
                ("weight_snapshots", "weight_snapshots", int), ("weight_l2_final", "weight_l2_final", float),
                ("update_ratio_median", "update_ratio_median", float))


def shared_names(layers: pd.DataFrame) -> dict:
    """summary.json's "shared": the other names of the layers that have any (a shared module, tied
    parameters such as GPT-2's ``lm_head.weight = transformer.wte.weight``: the layer table's ``aliases``),
    ``{layer id as a string: text}``; only those layers, so 100,000 layers without any add nothing."""
    if "aliases" not in layers.columns:
        return {}
    has = layers[layers["aliases"].astype(str) != ""]
    return {str(int(i)): str(a) for i, a in zip(has["id"].to_numpy(), has["aliases"].to_numpy())}


def layer_records(summary: pd.DataFrame) -> list[dict]:
    """summary.json's "layers": one dict per row of the layer summary, already JSON-safe (what
    :func:`analyzer.values.json_safe` would make of it: Python values, None for a non-finite float, last_epoch
    an int or None), so that the summary is not copied whole (100,000 layers: 100,000 dicts)."""
    cols = []
    for _, c, kind in LAYER_RECORD:
        v = summary[c].to_numpy()
        if kind is float or kind == "epoch":
            x = v.astype(np.float64)
            vals = np.where(np.isfinite(x), x, np.nan).tolist()
            vals = [None if f != f else (int(f) if kind == "epoch" else f) for f in vals]
        else:
            vals = [json_safe(x) for x in v.tolist()]
        cols.append(vals)
    keys = [k for k, _, _ in LAYER_RECORD]
    return [dict(zip(keys, row)) for row in zip(*cols)]


def build_report(run, out_dir: str | os.PathLike, layers: Any = None, bins: int = 64,
                 progress: Callable | None = None, *, dead_criterion: str = "strict", dead_threshold: float = 0.0,
                 max_active_fraction: float = 0.0, layer_share: float = 0.5, delta: float = 0.03,
                 unit_fraction: float = 0.5, sim_dim: int = 1, sim_method: str = "cosine",
                 raster_site: Any = None, jobs: int | None = None, detail: Any = None,
                 depth: int | None = None) -> dict:
    """Write the report of ``run`` into ``out_dir``: ``index.html``, ``summary.json``,
    ``figures/*.png``, ``tables/*.csv`` and, when some layers get per-layer figures, ``layers.html``.

    index.html shows every layer at once (overview heatmaps, layer x step, grouped by block); the
    per-layer figures are drawn only for the ``detail`` layers, on layers.html.

    Args:
        run: an :class:`analyzer.run.Run`.
        out_dir: an existing, writable directory. Earlier report files in it are replaced; nothing
            is deleted and nothing is written outside it.
        layers: layer specification (see :meth:`Run.select`); None = every layer.
        bins: bins of the weight histograms.
        progress: ``progress(label, total)`` -> context manager with ``update(n)``
            (click.progressbar-compatible); default ``run.progress``.
        dead_criterion, dead_threshold, max_active_fraction: the dead-unit criterion of the activation
            sections ("strict", "apoz" or "dormant"; see :func:`analyzer.activations.dead_units`).
        layer_share: a site is flagged when more than this share of its units are dead (or saturated).
        delta, unit_fraction: saturation margin and the share of a unit's values that makes it saturated
            (see :func:`analyzer.activations.saturation_layers`).
        sim_dim, sim_method: dimension (sample axis = 0) and method ("cosine" or "kl") of the variance
            and similarity figure (sites with raw samples).
        raster_site: the site of the unit x step raster; None = the site with the most dead units.
        detail: layers that get per-layer figures (same specification as ``layers``, "all" or "none"); None =
            the layers selected with ``layers`` when given, else the layers a finding points at.
        jobs: processes drawing the figures (forked after the statistics are computed; 1 = in this
            process); None = the CPUs available, at most 4 (see :func:`default_jobs`).
        depth: module depth of the FLOPs and time table and of the module graph (runs with a function
            graph); None = :func:`analyzer.graph.default_depth` (the repeated blocks).

    The activation sections appear only when the trace has activation sites; otherwise they are
    listed under ``not_recorded``. Every option is written to summary.json's ``parameters``.

    Returns:
        The summary (as written to summary.json; NaN as None).
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 100_000:
        raise ValueError(f"bins must be an int in [1, 100000], not {bins!r}")
    act = check_activation_options(dead_criterion, dead_threshold, max_active_fraction, layer_share, delta,
                                   unit_fraction, sim_dim, sim_method, raster_site)
    if raster_site is not None:
        act["raster_site"] = select_site(run, raster_site)["name"]   # TraceError before anything is written
    out = os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(out):
        raise FileNotFoundError(f"report directory {out} does not exist")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 256):
        raise ValueError(f"jobs must be an int in [1, 256], not {jobs!r}")
    if detail is not None and not (isinstance(detail, str) and detail.strip() in ("all", "none")):
        run.select(detail)   # an unknown layer: TraceError before anything is written
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 1000):
        raise ValueError(f"depth must be an int in [0, 1000], not {depth!r}")
    rep = Report(run, out, layers, bins, progress, act, jobs, detail)
    rep.module_depth = depth
    return rep.build()
