"""The HTML report of a run: figures, CSV tables and summary.json, laid out from the Run API.

    from bbdecoder.analyzer.report import build_report
    summary = build_report(analyzer.open("runs/exp1"), "report/")

Whatever the trace does not hold (no gradients, no weight snapshots, no loss) is skipped with a
reason, listed in the report and in summary.json ("skipped"). The activation sections (dead units,
saturation, distributions, variance/similarity, pruning sweep) appear when the trace has activation
sites; a trace recorded without them lists those sections under "not_recorded". Their thresholds
are keyword arguments of :func:`build_report` (CLI options of ``bbdecoder report``), all written to
summary.json's "parameters". Files are written under ``out_dir`` only, each to
a temporary name and then renamed over any earlier version; nothing is ever deleted.
Nothing here imports torch; matplotlib and seaborn are imported (by :mod:`analyzer.plots`) on the
first figure.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd

from .trace import format as fmt
from . import plots
from .engine import available_cpus

FIG_DIR = "figures"
TAB_DIR = "tables"
DPI = 100


# ---------------------------------------------------------------------------------------- statistics
def first_rank(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the lowest rank when a table has a "rank" column (several ranks recorded); else df."""
    if "rank" in df.columns and len(df):
        return df[df["rank"] == df["rank"].min()].drop(columns=["rank"])
    return df.drop(columns=["rank"]) if "rank" in df.columns else df


def layer_update_ratio(ws: pd.DataFrame) -> pd.DataFrame:
    """Update ratio of whole layers between consecutive snapshots, from per-parameter weight stats:
    ``sqrt(sum_p ||dw_p||^2) / sqrt(sum_p ||w_prev,p||^2)`` with ``||dw_p|| = update_ratio_p *
    ||w_prev,p||`` (``= ||w_p||`` where the previous snapshot was all zeros). Columns: step, layer_id,
    layer, update_ratio (NaN at a layer's first snapshot)."""
    if not len(ws):
        return pd.DataFrame({"step": [], "layer_id": [], "layer": [], "update_ratio": []})
    d = ws.sort_values(["layer_id", "param", "step"]).copy()
    prev = d.groupby(["layer_id", "param"], sort=False)["l2"].shift(1)
    dw = d["update_ratio"] * prev
    dw = dw.where(~(prev == 0), d["l2"])             # previous snapshot all zeros: ||dw|| = ||w||
    d["_dw2"] = dw ** 2
    d["_p2"] = prev ** 2
    g = d.groupby(["step", "layer_id", "layer"], sort=True)
    out = g.agg(_dw2=("_dw2", lambda v: v.sum(min_count=len(v))),
                _p2=("_p2", lambda v: v.sum(min_count=len(v)))).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
    return out[["step", "layer_id", "layer", "update_ratio"]]


def layer_weight_l2(ws: pd.DataFrame) -> pd.DataFrame:
    """L2 norm of each layer's parameters taken together, per snapshot: sqrt(sum_p l2_p^2)."""
    if not len(ws):
        return pd.DataFrame({"step": [], "layer_id": [], "layer": [], "l2": []})
    d = ws.assign(_sq=ws["l2"] ** 2)
    out = d.groupby(["step", "layer_id", "layer"], sort=True)["_sq"].sum(min_count=1).reset_index()
    out["l2"] = np.sqrt(out.pop("_sq"))
    return out


def grad_variance_epoch_table(gl: pd.DataFrame, ge: pd.DataFrame, numel: pd.DataFrame) -> pd.DataFrame:
    """Tidy per (epoch, layer) variance statistics for the per-epoch variance panel:
    "mean of per-iteration Var(g)": the epoch mean of the per-iteration variance of the layer's
    gradient elements; "gradient noise": each element's variance across the epoch's iterations,
    averaged over the layer's elements (grad_noise of its parameters weighted by numel)."""
    parts = []
    if len(gl):
        v = gl.groupby(["epoch", "layer_id", "layer"], sort=True)["var"].mean().reset_index()
        parts.append(v.rename(columns={"var": "value"}).assign(statistic="mean of per-iteration Var(g)"))
    if len(ge):
        e = ge.merge(numel, on=["layer_id", "param"], how="left")
        e = e[np.isfinite(e["grad_noise"].to_numpy(np.float64)) & (e["numel"] > 0)]
        if len(e):
            e = e.assign(_w=e["grad_noise"] * e["numel"])
            n = e.groupby(["epoch", "layer_id", "layer"], sort=True).agg(_w=("_w", "sum"), numel=("numel", "sum"))
            n = n.reset_index()
            n["value"] = n["_w"] / n["numel"]
            parts.append(n[["epoch", "layer_id", "layer", "value"]].assign(
                statistic="gradient noise (Var over iterations)"))
    if not parts:
        return pd.DataFrame({"epoch": [], "layer_id": [], "layer": [], "statistic": [], "value": []})
    return pd.concat(parts, ignore_index=True)[["epoch", "layer_id", "layer", "statistic", "value"]]


def layer_summary(layers: pd.DataFrame, gl: pd.DataFrame, ws: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers per layer: mean |g| over the run (sum l1 / sum count), max |g|, the mean
    gradient L2 norm over the last epoch with gradients, the layer's weight L2 norm at the last
    snapshot and the median layer update ratio over the snapshots."""
    out = layers[["id", "name", "type", "n_params", "selected"]].rename(columns={"id": "layer_id"}).copy()
    out = out.sort_values("layer_id").reset_index(drop=True)
    cols = {"grad_steps": 0, "mean_abs_grad": np.nan, "max_abs_grad": np.nan, "last_epoch": np.nan,
            "last_epoch_mean_l2": np.nan, "weight_snapshots": 0, "weight_l2_final": np.nan,
            "update_ratio_median": np.nan}
    for c, v in cols.items():
        out[c] = v
    out = out.set_index("layer_id")
    if len(gl):
        flow = plots.gradient_flow_table(gl).set_index("layer_id")
        out.loc[flow.index, "grad_steps"] = flow["steps"].to_numpy()
        out.loc[flow.index, "mean_abs_grad"] = flow["abs_mean"].to_numpy()
        out.loc[flow.index, "max_abs_grad"] = flow["max_abs"].to_numpy()
        last = int(gl["epoch"].max())
        le = gl[gl["epoch"] == last].groupby("layer_id")["l2"].mean()
        out.loc[le.index, "last_epoch_mean_l2"] = le.to_numpy()
        out.loc[flow.index, "last_epoch"] = last
    if len(ws):
        wl = layer_weight_l2(ws)
        fin = wl.sort_values("step").groupby("layer_id").last()
        out.loc[fin.index, "weight_l2_final"] = fin["l2"].to_numpy()
        out.loc[fin.index, "weight_snapshots"] = wl.groupby("layer_id").size().reindex(fin.index).to_numpy()
        ur = layer_update_ratio(ws)
        med = ur.dropna(subset=["update_ratio"]).groupby("layer_id")["update_ratio"].median()
        out.loc[med.index, "update_ratio_median"] = med.to_numpy()
    out = out.reset_index()
    out["grad_steps"] = out["grad_steps"].astype(np.int64)
    out["weight_snapshots"] = out["weight_snapshots"].astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------- activations
#: Report options for the activation sections and their defaults (all written to summary.json).
ACTIVATION_DEFAULTS = {"dead_criterion": "strict", "dead_threshold": 0.0, "max_active_fraction": 0.0,
                       "layer_share": 0.5, "delta": 0.03, "unit_fraction": 0.5, "sim_dim": 1,
                       "sim_method": "cosine", "raster_site": None}
DEAD_LAYER_COLUMNS = ["site", "kind", "units", "dead", "dead_fraction", "flagged"]
SWEEP_COLUMNS = ["criterion", "parameter", "threshold", "site", "kind", "units", "dead", "sparsity"]


def _fraction(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], not {v!r}") from None
    if not 0.0 <= f <= 1.0:       # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], not {v!r}")
    return f


def check_activation_options(dead_criterion: str = "strict", dead_threshold: float = 0.0,
                             max_active_fraction: float = 0.0, layer_share: float = 0.5, delta: float = 0.03,
                             unit_fraction: float = 0.5, sim_dim: int = 1, sim_method: str = "cosine",
                             raster_site: Any = None) -> dict:
    """The activation options of a report, checked and normalised (floats, ints); raises ValueError
    with one clear line for a bad one. ``raster_site`` is checked against a run by the report."""
    from .activations import _check_criterion
    try:
        thr, maf = float(dead_threshold), float(max_active_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"dead threshold and max_active_fraction must be numbers, not {dead_threshold!r}, "
                         f"{max_active_fraction!r}") from None
    _check_criterion(dead_criterion, thr, maf)
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in [0, 0.5), not {delta!r}") from None
    if not 0.0 <= d < 0.5:
        raise ValueError(f"delta must be in [0, 0.5), not {delta!r}")
    if isinstance(sim_dim, bool) or not isinstance(sim_dim, (int, np.integer)) or sim_dim < 1:
        raise ValueError(f"sim_dim must be an int >= 1 (0 is the sample axis), not {sim_dim!r}")
    if sim_method not in ("cosine", "kl"):
        raise ValueError(f"sim_method must be 'cosine' or 'kl', not {sim_method!r}")
    return {"dead_criterion": dead_criterion, "dead_threshold": thr, "max_active_fraction": maf,
            "layer_share": _fraction("layer_share", layer_share), "delta": d,
            "unit_fraction": _fraction("unit_fraction", unit_fraction), "sim_dim": int(sim_dim),
            "sim_method": sim_method, "raster_site": None if raster_site is None else str(raster_site)}


def dead_layer_table(du: pd.DataFrame) -> pd.DataFrame:
    """Per site, from a :meth:`Run.dead_units` table: site, kind, units, dead (count), dead_fraction,
    flagged (more than layer_share of the units dead), in the table's (forward) site order."""
    if not len(du):
        return pd.DataFrame({c: [] for c in DEAD_LAYER_COLUMNS})
    g = du.groupby("site", sort=False)
    out = g.agg(kind=("kind", "first"), units=("unit", "size"), dead=("dead", "sum"),
                dead_fraction=("dead_fraction", "first"), flagged=("flagged", "first")).reset_index()
    out["units"] = out["units"].astype(np.int64)
    out["dead"] = out["dead"].astype(np.int64)
    out["flagged"] = out["flagged"].astype(bool)
    return out[DEAD_LAYER_COLUMNS]


def sweep_grid(criterion: str, threshold: float, max_active_fraction: float, du: pd.DataFrame | None = None
               ) -> tuple[str, list[float]]:
    """The swept parameter ("threshold" or "max_active_fraction") and its values for a pruning sweep
    under ``criterion``; always includes the chosen value. strict (max_active_fraction 0): 0 and
    quantiles of the units' largest values (``du``'s score); strict with max_active_fraction > 0:
    active fractions; apoz: APoZ levels; dormant: score levels (Sokar et al. use 0 ... 0.1)."""
    if criterion == "strict" and max_active_fraction > 0:
        return "max_active_fraction", sorted({0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5,
                                              float(max_active_fraction)})
    if criterion == "apoz":
        vals = {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0}
    elif criterion == "dormant":
        vals = {0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0}
    else:
        vals = {0.0}
        if du is not None and len(du):
            sc = du["score"].to_numpy(np.float64)
            sc = sc[np.isfinite(sc) & (sc > 0)]
            if len(sc):
                for q in np.quantile(sc, [0.05, 0.1, 0.25, 0.5, 0.75, 0.9]):
                    vals.add(float(f"{q:.3g}"))
    vals.add(float(threshold))
    return "threshold", sorted(vals)


def dead_sweep(run, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
               values: Any = None, du: pd.DataFrame | None = None, sites: Any = None) -> pd.DataFrame:
    """Sparsity versus threshold per site under the dead criterion, from :meth:`Run.dead_units` at
    each value of the swept parameter (see :func:`sweep_grid`; ``values`` overrides the grid).
    ``du``: the dead_units table at the chosen threshold (reused, and the strict grid's source).
    Columns: criterion, parameter, threshold (the swept value), site, kind, units, dead, sparsity;
    rows with site "(all sites)" pool every unit."""
    from .activations import dead_units
    threshold, max_active_fraction = float(threshold), float(max_active_fraction)
    param, grid = sweep_grid(criterion, threshold, max_active_fraction, du)
    if values is not None:
        grid = sorted({float(v) for v in values})
    rows = []
    for v in grid:
        thr, maf = (threshold, v) if param == "max_active_fraction" else (v, max_active_fraction)
        if du is not None and thr == threshold and maf == max_active_fraction:
            d = du
        else:
            d = dead_units(run, criterion, thr, maf, sites=sites)
        t = dead_layer_table(d)
        for r in t.itertuples(index=False):
            rows.append((criterion, param, v, r.site, r.kind, int(r.units), int(r.dead),
                         r.dead / r.units if r.units else np.nan))
        if len(t):
            u, n = int(t["units"].sum()), int(t["dead"].sum())
            rows.append((criterion, param, v, "(all sites)", "", u, n, n / u if u else np.nan))
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


# ---------------------------------------------------------------------------------------- output
def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/Inf -> None, numpy scalars and arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    if x is None or isinstance(x, (int, str)):
        return x
    if x is pd.NA or x is pd.NaT:
        return None
    return str(x)


def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")


def _write(path: str, writer: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename it into place."""
    tmp = _tmp(path)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: str, text: str) -> None:
    def w(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    _write(path, w)


def _file_key(L) -> str:
    """The layer's key for file names (already filesystem-safe; checked again, never trusted)."""
    k = getattr(L, "key", None)
    return k if fmt.is_safe_key(k) and k not in (".", "..") else f"layer-{int(L.id)}"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(float(v)) else f"{float(v):.3g}"
    return html.escape(str(v))


class _SilentProgress:
    """Context: the run's own progress bars off (they would nest inside the report's)."""

    def __init__(self, run):
        self.run = run

    def __enter__(self):
        self.saved = self.run.progress
        from .run import null_progress
        self.run.progress = null_progress
        return self

    def __exit__(self, *a):
        self.run.progress = self.saved
        return False


# ---------------------------------------------------------------------------------------- figures
_RENDER: tuple | None = None   # (pending figures, out dir) while a fork pool draws them


def default_jobs() -> int:
    """Processes that draw the report's figures: the CPUs this process may use, at most 4 (each
    drawing process adds memory of its own: about 20 MB in the out-of-core benchmark)."""
    return max(1, min(4, available_cpus()))


def _fork_is_safe() -> bool:
    """fork() copies only the calling thread: safe here only without other threads (a dask client's,
    a progress bar's) that might hold a lock the child needs, and only where fork exists."""
    import multiprocessing as mp
    import threading
    return "fork" in mp.get_all_start_methods() and threading.active_count() == 1


def _release_free_memory() -> None:
    """Hand the heap that the data passes freed back to the OS (glibc keeps it otherwise), before
    forking the figure workers; a no-op where glibc's malloc_trim is not available."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _draw_and_save(item: tuple, out: str) -> str | None:
    """Draw one queued figure and save it; None, or the error as one line."""
    name, draw = item[0], item[3]
    plt, _ = plots._mpl()
    before = set(plt.get_fignums())
    try:
        plots.save(draw(), os.path.join(out, FIG_DIR, f"{name}.png"), dpi=DPI)
        return None
    except Exception as e:  # noqa: BLE001 - one figure that cannot be drawn must not lose the report
        for n in set(plt.get_fignums()) - before:
            plt.close(n)
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _render_one(i: int) -> str | None:
    """In a forked worker: figure ``i`` of the inherited queue."""
    pending, out = _RENDER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _draw_and_save(pending[i], out)


# ---------------------------------------------------------------------------------------- report
class _Report:
    def __init__(self, run, out_dir: str, layers: Any, bins: int, progress: Callable | None,
                 act: dict | None = None, jobs: int | None = None):
        self.run = run
        self.jobs = default_jobs() if jobs is None else max(1, int(jobs))
        self._pending: list[tuple] = []   # figures to draw once every section has been computed
        self.figure_processes = 1
        self.act = dict(act or check_activation_options())
        self.act_summary: dict = {}
        self.out = os.path.abspath(os.fspath(out_dir))
        self.layers_spec = layers
        self.bins = bins
        self.progress = progress or run.progress
        self.figures: list[dict] = []
        self.tables: list[dict] = []
        self.skipped: list[str] = []
        self.missing: list[str] = []
        self.not_recorded: list[str] = []

    # ------------------------------------------------------------------ helpers
    def skip(self, item: str, reason: str) -> None:
        self.skipped.append(f"{item}: {reason}")

    def figure(self, name: str, title: str, caption: str, draw: Callable[[], Any], section: str,
               layer: Any = None) -> None:
        """Queue figures/<name>.png, drawn by ``draw()`` (returns the figure) in :meth:`_render`.
        ``layer``: the layer record (row of the layer table) of a per-layer figure."""
        self._pending.append((name, title, caption, draw, section, layer))

    def _render(self) -> None:
        """Draw and save the queued figures, in ``self.jobs`` forked processes where that is safe
        (a platform with fork, no other thread in this process: the drawing closures and their data
        are inherited, nothing is pickled but an index and an error line), else one after the other.
        A figure that cannot be drawn is listed as skipped with its error (one warning each); the
        others are listed in queue order whatever the order they finished in."""
        pending, self._pending = self._pending, []
        jobs = min(self.jobs, len(pending) // 4 or 1)
        if jobs > 1 and not _fork_is_safe():
            jobs = 1
        self.figure_processes = jobs
        if jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            global _RENDER
            _RENDER = (pending, self.out)
            self.run.close()         # no open HDF5 file is inherited by the forked workers
            _release_free_memory()   # the workers inherit this process's pages: fewer of them
            errors = []
            try:   # the workers are forked at the first submit, before the executor starts its threads
                with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
                    futures = [ex.submit(_render_one, i) for i in range(len(pending))]
                    for fut in futures:
                        try:
                            errors.append(fut.result())
                        except Exception as e:  # noqa: BLE001 - a drawing process died (killed, crashed)
                            errors.append(f"its drawing process failed: {type(e).__name__}")
            finally:
                _RENDER = None
        else:
            errors = [_draw_and_save(p, self.out) for p in pending]
        for (name, title, caption, _, section, layer), err in zip(pending, errors):
            if err is None:
                self.figures.append({"file": f"{FIG_DIR}/{name}.png", "title": title, "caption": caption,
                                     "section": section, "layer": layer})
            else:
                self.skip(f"figure {name}", f"could not be drawn ({err})")
                warnings.warn(f"bbdecoder report: figure {name} could not be drawn: {err}", stacklevel=4)

    def table(self, name: str, df: pd.DataFrame, description: str) -> None:
        rel = f"{TAB_DIR}/{name}.csv"
        _write(os.path.join(self.out, TAB_DIR, f"{name}.csv"), lambda p: df.to_csv(p, index=False))
        self.tables.append({"file": rel, "rows": int(len(df)), "description": description})

    # ------------------------------------------------------------------ build
    def build(self) -> dict:
        with self.run.keep_open():      # shard files stay open across the per-layer passes
            return self._build()

    def _build(self) -> dict:
        t0 = time.perf_counter()
        run = self.run
        os.makedirs(os.path.join(self.out, FIG_DIR), exist_ok=True)
        os.makedirs(os.path.join(self.out, TAB_DIR), exist_ok=True)
        before = self._existing()

        ids = run.select(self.layers_spec)
        all_layers = run.layers
        lt = all_layers[all_layers["id"].isin(ids)].sort_values("id").reset_index(drop=True)
        steps = run.steps
        gs_all = run.grad_stats(layers=ids)
        ge_all = run.grad_stats(per="epoch", layers=ids)
        gl_all = run.grad_stats(by="layer", layers=ids)
        ws = run.weight_stats(layers=ids)
        multi_rank = "rank" in gs_all.columns
        gs, ge, gl = first_rank(gs_all), first_rank(ge_all), first_rank(gl_all)
        ws1 = ws.drop_duplicates(["step", "layer_id", "param"], keep="first")
        has_grads = bool(len(gl))
        has_weights = bool(len(ws1))
        if not has_grads:
            self.missing.append("no gradients")
        if not has_weights:
            self.missing.append("no weight snapshots")

        # ---- tables
        self.table("layers", all_layers.assign(in_report=all_layers["id"].isin(ids)),
                   "layer table: id, dotted name, type, parameter count, key, recorded, in this report")
        self.table("steps", steps, "one row per recorded step: step, epoch, loss, time (s), wall, dropped")
        self.table("grad_stats_step", gs_all, "gradient statistics per (step, layer, parameter)")
        self.table("grad_stats_epoch", ge_all, "gradient statistics per (epoch, layer, parameter), "
                   "incl. l2_var and grad_noise")
        self.table("grad_stats_layer", gl_all, "gradient statistics per (step, layer), parameters pooled")
        self.table("weight_stats", ws, "weight statistics per (snapshot, layer, parameter), incl. update_ratio")
        summ = layer_summary(lt, gl, ws1)
        self.table("layer_summary", summ, "headline numbers per layer (as in summary.json)")

        with _SilentProgress(run):
            self._loss(steps)
            self._gradients(lt, gs, ge, gl)
            self._weights(lt, ws1)
            self._activations()
            self._attention()
        self._render()

        if self.missing:
            warnings.warn(f"bbdecoder report: the trace has {' and '.join(self.missing)}; the figures that "
                          "need them are skipped (see the report's skipped list)", stacklevel=3)

        summary = self._summary(steps, lt, summ, gl, ws1, multi_rank)
        summary["nonfinite"] = nonfinite_findings(run, gs_all, ws)
        summary["attention"] = getattr(self, "attention", {})
        written = {f["file"] for f in self.figures} | {t["file"] for t in self.tables}
        summary["stale_files"] = sorted(p for p in before if p not in written)
        summary["figure_processes"] = self.figure_processes
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        _write_text(os.path.join(self.out, "summary.json"),
                    json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
        _write_text(os.path.join(self.out, "index.html"), self._html(summary))
        return _clean(summary)

    def _existing(self) -> set:
        out = set()
        for sub in (FIG_DIR, TAB_DIR):
            try:
                names = os.listdir(os.path.join(self.out, sub))
            except OSError:
                continue
            out |= {f"{sub}/{n}" for n in names if not n.startswith(".tmp-")}
        return out

    # ------------------------------------------------------------------ sections
    def _loss(self, steps: pd.DataFrame) -> None:
        why = plots.check(steps, plots.loss_curve)
        if why:
            self.skip("figure loss", "no loss recorded (pass loss= to rec.step)" if len(steps) else "no steps recorded")
            return

        def draw():
            fig, ax = plots.new_figure(9, 4)
            plots.loss_curve(steps, ax[0, 0])
            return fig
        self.figure("loss", "Training loss",
                    "Loss passed to <code>rec.step(loss=...)</code> at every recorded step (thin blue line); "
                    "the thick red segments are each epoch's mean loss, drawn across the epoch's steps "
                    "(dotted vertical lines mark epoch boundaries). A falling red staircase means "
                    "training makes progress; a flat or rising one deserves a look.", draw, "loss")

    def _gradients(self, lt, gs, ge, gl) -> None:
        no = ("no gradients in the trace (grad_stats_every=0 and grads_every=0, or no recorded layer has a "
              "gradient)")
        names = ["gradient flow", "gradient heatmap", "gradient variance", "per-layer gradient norms"]
        if not len(gl):
            for n in names:
                self.skip(f"figure {n}", no)
            return
        why = plots.check(gl, plots.grad_flow)
        if why:
            self.skip("figure gradient flow", why)
        else:
            def draw():
                n = gl["layer_id"].nunique()
                fig, ax = plots.new_figure(max(7.0, min(18.0, 3 + 0.45 * n)), 4.8)
                plots.grad_flow(gl, ax[0, 0])
                return fig
            self.figure("grad_flow", "Gradient flow",
                        "Per layer (x, in id order), mean |g| (orange) and max |g| (blue) of the gradient over "
                        "every recorded step, on a log scale (gradient units). mean |g| = Σ L1 / Σ elements "
                        "over all steps, max |g| = largest element ever seen. Bars falling by orders of "
                        "magnitude towards the input layers suggest vanishing gradients; a very large max "
                        "next to a small mean points to rare exploding elements.", draw, "gradients")
        why = plots.check(gl, plots.grad_heatmap)
        if why:
            self.skip("figure gradient heatmap", why)
        else:
            def draw():
                n = gl["layer_id"].nunique()
                fig, ax = plots.new_figure(11, max(3.0, min(14.0, 1.2 + 0.3 * n)))
                plots.grad_heatmap(gl, ax[0, 0])
                return fig
            nsteps = gl["step"].nunique()
            binned = (f" The {nsteps} steps are averaged into {plots.MAX_HEATMAP_COLUMNS} columns of "
                      "consecutive steps." if nsteps > plots.MAX_HEATMAP_COLUMNS
                      else "")
            self.figure("grad_heatmap", "Gradient norm heatmap",
                        "log10 of each layer's gradient L2 norm (all parameters of the layer together) at "
                        "every recorded step: rows are layers in id order, columns are steps, brighter = "
                        "larger. Dark rows are layers whose gradient is orders of magnitude smaller than the "
                        "others; vertical bright stripes are steps with a gradient spike across layers; "
                        "blank cells were not recorded or were zero." + binned, draw, "gradients")
        gv = grad_variance_epoch_table(gl, ge, gs[["layer_id", "param", "numel"]].drop_duplicates())
        why_s = plots.check(gl, plots.grad_variance_step)
        why_e = plots.check(gv, plots.grad_variance_epoch)
        if why_s and why_e:
            self.skip("figure gradient variance", why_s)
        else:
            def draw():
                fig, ax = plots.new_figure(13, 4.5, 1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
                if why_s:
                    ax[0, 0].set_axis_off()
                else:
                    plots.grad_variance_step(gl, ax[0, 0], legend=bool(why_e))
                if why_e:
                    ax[0, 1].set_axis_off()
                else:
                    plots.grad_variance_epoch(gv, ax[0, 1])
                return fig
            self.figure("grad_variance", "Gradient variance",
                        "Left: variance of a layer's gradient elements at each iteration (all parameters of the "
                        "layer pooled; squared gradient units, log scale), one line per layer (colours as on "
                        "the right). Right, per epoch "
                        "and layer: solid = the epoch mean of that per-iteration variance; dashed = gradient "
                        "noise, each element's variance across the epoch's iterations averaged over the layer's "
                        "elements (the grad_noise of its parameters weighted by their element counts; 0 and "
                        "hence not drawn for an epoch with one recorded step). Noise large next to the "
                        "per-iteration spread means the mini-batch gradient direction is unstable.",
                        draw, "gradients")
        rows = [r for r in lt.itertuples(index=False)]
        with self.progress("report: gradient norms per layer", len(rows)) as bar:
            for L in rows:
                d = gl[gl["layer_id"] == L.id]
                why = plots.check(d, plots.grad_norms)
                if why:
                    self.skip(f"figure grad_norms_{_file_key(L)}",
                              "layer not recorded" if not L.selected else
                              ("no gradients for this layer" if not len(d) else why))
                else:
                    def draw(d=d, L=L):
                        fig = plots.figure(9, 5.5, layout=None)      # one of many alike: fixed margins
                        plots.grad_norms(d, fig, title=f"Gradient norms — layer {plots.layer_label(L.id, L.name)} "
                                                       f"({plots.text(L.type)})")
                        return plots.fixed_margins(fig, top=0.75)
                    self.figure(f"grad_norms_{_file_key(L)}", f"Gradient norms: {L.id} {L.name}",
                                f"Layer {L.id} <code>{html.escape(L.name)}</code> ({html.escape(L.type)}), all "
                                "parameters together. Top: L1 norm Σ|g|; bottom: L2 norm √Σg² of the gradient at "
                                "every recorded iteration (thin blue), with each epoch's mean as a thick red "
                                "segment across the epoch's steps. The y axis turns logarithmic when the values "
                                "span more than a factor of 100.", draw, "layers", layer=L)
                bar.update(1)

    def _weights(self, lt, ws) -> None:
        no = "no weight snapshots in the trace (weights_every=0)"
        if not len(ws):
            for n in ("weight magnitude", "weight update ratio", "per-layer weight distributions"):
                self.skip(f"figure {n}", no)
            return
        why = plots.check(ws, plots.weight_magnitude)
        if why:
            self.skip("figure weight magnitude", why)
        else:
            def draw():
                fig, ax = plots.new_figure(10, 4.8)
                plots.weight_magnitude(ws, ax[0, 0])
                return fig
            self.figure("weight_magnitude", "Weight magnitude",
                        "L2 norm ‖w‖₂ of every parameter (colour: layer, line style: parameter, e.g. weight or "
                        "bias) at every weight snapshot, log scale. Steady growth can mean missing weight "
                        "decay or divergence; a collapsing norm, dying weights.", draw, "weights")
        why = plots.check(ws, plots.update_ratio)
        if why:
            self.skip("figure weight update ratio",
                      "needs at least two weight snapshots" if "update_ratio" in why else why)
        else:
            def draw():
                fig, ax = plots.new_figure(10, 4.8)
                plots.update_ratio(ws, ax[0, 0])
                return fig
            self.figure("update_ratio", "Weight update ratio",
                        "‖w_t − w_prev‖₂ / ‖w_prev‖₂ between consecutive weight snapshots for every parameter "
                        "(log scale; the first snapshot has no predecessor and is not drawn). Note that it "
                        "accumulates all optimizer steps between two snapshots. Ratios around 1e-3 per step "
                        "are typical; far below means the parameter barely learns, far above means it is "
                        "unstable (SageMaker's rule flags > 10 or < 1e-8).", draw, "weights")
        rows = [r for r in lt.itertuples(index=False)]
        with self.progress("report: weight distributions per layer", len(rows)) as bar:
            for L in rows:
                name = f"weight_dist_{_file_key(L)}"
                if not L.selected:
                    self.skip(f"figure {name}", "layer not recorded")
                elif not (ws["layer_id"] == L.id).any():
                    self.skip(f"figure {name}", "no weight snapshots for this layer")
                else:
                    h = self.run.weight_histograms(int(L.id), bins=self.bins)
                    df = h.to_frame()
                    why = plots.check(df, plots.weight_distribution)
                    if why:
                        self.skip(f"figure {name}", why)
                    else:
                        def draw(df=df, L=L, h=h):
                            fig, ax = plots.new_figure(9, 4.8, layout=None)   # one of many alike
                            plots.weight_distribution(df, ax[0, 0], title=(
                                f"Distribution of {plots.text(h.param)} — layer "
                                f"{plots.layer_label(L.id, L.name)} ({plots.text(L.type)})"))
                            return plots.fixed_margins(fig, right=0.1)
                        self.figure(name, f"Weight distribution: {L.id} {L.name}",
                                    f"Histogram of <code>{html.escape(L.name)}.{html.escape(h.param)}</code> "
                                    f"({html.escape(L.type)}) at every weight snapshot (x: snapshot step; y: "
                                    f"weight value, {self.bins} bins on edges shared by all snapshots, largest "
                                    "at the top; colour: log(1 + number of elements), dashed white line at 0). "
                                    "Widening means growing weights, a band that splits means clustering, mass "
                                    "piling up at the edges means saturation or divergence.", draw, "layers",
                                    layer=L)
                bar.update(1)

    # ------------------------------------------------------------------ activations
    ACT_FIGURES = ("dead fraction heatmap", "dead unit raster", "saturation", "activation distributions",
                   "dimension variance and similarity", "pruning sweep")

    def _activations(self) -> None:
        """Dead units, saturation, distributions, variance/similarity and the pruning sweep of the
        activation sites, at the report's thresholds (self.act)."""
        from . import activations as A
        run, a = self.run, self.act
        crit, thr, maf, share = a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"], a["layer_share"]
        sites = run.sites
        order = list(sites["name"])
        du = A.dead_units(run, crit, thr, maf, layer_share=share)
        dl = dead_layer_table(du)
        dps = A.dead_per_step(run, crit, thr, maf)
        sat = A.saturation(run, a["delta"])
        satl = A.saturation_layers(run, a["delta"], unit_fraction=a["unit_fraction"], layer_share=share)
        ast = A.activation_stats(run, per="epoch")
        crit_text = self._criterion_text()
        self.table("activation_stats_epoch", ast, "per-unit activation statistics per (epoch, site, unit): count, "
                   "mean, abs_mean, std, min, max, frac_active (> 0), apoz")
        self.table("dead_units", du, f"per (site, unit): active_fraction, max, score, dead, died_at under {crit_text}")
        self.table("dead_layers", dl, f"per site: units, dead, dead_fraction, flagged (dead_fraction > "
                   f"{share:g}) under {crit_text}")
        self.table("dead_per_step", dps, f"per (step, site): fraction of units dead at that step ({crit_text})")
        self.table("saturation", sat, f"per (step, site): saturated fraction at delta {a['delta']:g} "
                   "(ReLU family: fraction <= 0)")
        self.table("saturation_layers", satl, f"per site: saturated fraction, share of saturated units (> "
                   f"{a['unit_fraction']:g} of their values), flagged (share > {share:g})")
        self.act_summary = self._act_headline(sites, dl, satl)
        if not len(sites):
            why = ("the trace has no activation sites (record with Recorder(..., activations='all') or a "
                   "selection of modules and functional activations)")
            for n in self.ACT_FIGURES:
                self.not_recorded.append(f"figure {n}: {why}")
            return
        with self.progress("report: activation figures", len(self.ACT_FIGURES)) as bar:
            self._dead_heatmap(dps, order, crit_text)
            bar.update(1)
            self._dead_raster(du, dps, order, crit_text)
            bar.update(1)
            self._saturation(sat, order)
            bar.update(1)
            self._distributions(ast, order)
            bar.update(1)
            self._variance_similarity(sites, order)
            bar.update(1)
            self._sweep(du, order)
            bar.update(1)

    def _criterion_text(self) -> str:
        a = self.act
        c, t, m = a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"]
        if c == "strict":
            return (f"strict (never above {t:g})" if m == 0 else
                    f"strict (values > 0 in at most {m:g} of the cases)")
        if c == "apoz":
            return f"APoZ >= {t:g} (fraction of values <= 0)"
        return f"dormant (E|h| / layer mean E|h| <= {t:g})"

    def _act_headline(self, sites: pd.DataFrame, dl: pd.DataFrame, satl: pd.DataFrame) -> dict:
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
            "criterion": self._criterion_text(),
            "raster_site": None,
            "definitions": {
                "dead_fraction": "share of the site's units dead over the whole run under the criterion",
                "dead_flagged": "dead_fraction > layer_share",
                "saturated": "mean over steps (and units) of the fraction of saturated values: bounded kinds "
                             "within delta of a bound (softmax: row max > 1 - delta), ReLU family <= 0",
                "saturated_units": "share of units saturated in more than unit_fraction of their values",
                "saturation_flagged": "saturated_units > layer_share",
            },
        }

    def _act_figure(self, key: str, name: str, title: str, caption: str, draw: Callable, why: str | None) -> None:
        if why:
            self.skip(f"figure {key}", why)
        else:
            self.figure(name, title, caption, draw, "activations")

    def _dead_heatmap(self, dps, order, crit_text) -> None:
        n = dps["site"].nunique() if len(dps) else 0

        def draw():
            fig, ax = plots.new_figure(11, max(3.0, min(14.0, 1.4 + 0.32 * n)))
            plots.dead_heatmap(dps, ax[0, 0], order=order)
            return fig
        nsteps = dps["step"].nunique() if len(dps) else 0
        binned = (f" The {nsteps} steps are averaged into {plots.MAX_HEATMAP_COLUMNS} columns of consecutive "
                  "steps." if nsteps > plots.MAX_HEATMAP_COLUMNS else "")
        self._act_figure("dead fraction heatmap", "act_dead_heatmap", "Dead units per site and step",
                         f"Fraction of each activation site's units that are dead <em>at that step</em> under "
                         f"{html.escape(crit_text)} (rows: sites in forward order; white 0, dark red 1). "
                         "A row that darkens over time is a layer dying during training; a dark row from "
                         "the start is dead from initialisation. Per-step: a unit can be dead at one step and "
                         "alive at the next; the run-level count is in dead_layers.csv." + binned,
                         draw, plots.check(dps, plots.dead_heatmap))

    def _dead_raster(self, du, dps, order, crit_text) -> None:
        from . import activations as A
        a, run = self.act, self.run
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
        self.act_summary["raster_site"] = site
        if site is None:
            self.skip("figure dead unit raster", "no activation statistics recorded")
            return
        st, mask = A.dead_mask(run, site, a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"])
        k, U = mask.shape
        df = pd.DataFrame({"step": np.repeat(st, U), "unit": np.tile(np.arange(U), k), "dead": mask.reshape(-1)})
        ndead = int(du.loc[du["site"] == site, "dead"].sum()) if len(du) else 0

        def draw():
            fig, ax = plots.new_figure(11, max(3.0, min(9.0, 1.5 + 0.12 * min(U, plots.MAX_RASTER_ROWS))))
            plots.dead_raster(df, ax[0, 0], title=f"Dead units of {plots.text(site)} at each step")
            return fig
        self._act_figure("dead unit raster", "act_dead_raster", f"Dead-unit raster: {site}",
                         f"Site <code>{html.escape(site)}</code> ({how}; {ndead} of {U} units dead over the "
                         f"run): one row per unit, one column per step, black where the unit is dead at that "
                         f"step under {html.escape(crit_text)}. A row black to the right edge is a unit that "
                         "died and never recovered (its died_at in dead_units.csv is where the black run "
                         "starts); speckle is a unit that is silent on some batches only.",
                         draw, plots.check(df, plots.dead_raster))

    def _saturation(self, sat, order) -> None:
        a = self.act
        used = sorted({float(x) for x in sat["delta_used"].dropna()}) if len(sat) else []
        note = (f" delta is rounded down to the stored histogram's bin edges: used {', '.join(f'{u:g}' for u in used)}."
                if any(abs(u - a["delta"]) > 1e-12 for u in used if u) else "")
        kinds = set(sat["kind"]) if len(sat) else set()
        panels = 1 + (len(kinds & {"relu", "leaky_relu", "elu", "gelu", "silu", "softplus"}) > 0
                      and len(kinds - {"relu", "leaky_relu", "elu", "gelu", "silu", "softplus"}) > 0)

        def draw():
            fig = plots.figure(7.5 * panels, 4.5)
            plots.saturation_lines(sat, fig, order=order)
            return fig
        why = plots.check(sat, plots.saturation_lines)
        if why == "no data":
            why = "no activation site of a saturating kind (ReLU family, sigmoid, tanh, hardtanh, softmax)"
        self._act_figure("saturation", "act_saturation", "Saturation per site",
                         f"Fraction of saturated values at every recorded step, one line per site. Bounded "
                         f"activations: sigmoid/hardtanh values within delta = {a['delta']:g} of a bound, tanh "
                         f"|a| > 1 − delta, softmax rows whose largest probability exceeds 1 − delta. ReLU "
                         "family: the fraction of values at or below zero (no gradient flows there). "
                         "Saturation near 1 means a layer has stopped passing gradient." + note,
                         draw, why)

    def _distributions(self, ast, order) -> None:
        last = ast[ast["epoch"] == ast["epoch"].max()] if len(ast) else ast
        n = last["site"].nunique() if len(last) else 0
        ep = int(last["epoch"].iloc[0]) if len(last) else None

        def draw():
            fig = plots.figure(12, max(3.2, min(16.0, 1.4 + 0.42 * n)))
            plots.activation_distributions(last, fig, order=order,
                                           title=f"Per-unit activation statistics, epoch {ep}")
            return fig
        self._act_figure("activation distributions", "act_distributions", "Activation distributions",
                         f"Per site (rows, forward order), the distribution over its units of statistics pooled "
                         f"over the last epoch ({ep}): left, the fraction of each unit's values that are > 0 "
                         "(0 = a unit that never fires); right, each unit's mean activation, with the grey bar "
                         "spanning the smallest and largest value any unit of the site produced. Boxes are the "
                         "quartiles over units; dots are single units.", draw,
                         plots.check(last, plots.activation_distributions))

    def _variance_similarity(self, sites, order) -> None:
        from . import activations as A
        a, run = self.act, self.run
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
        self.table("activation_dims", df, f"per (step, site) with raw samples: variance across dim {dim}, "
                   f"variance of the slice means, mean pairwise {method} similarity of the slices")
        n = df["site"].nunique() if len(df) else 0
        if not len(df):
            why = ("no raw activation samples in the trace (activation_samples=0, or the activations_every "
                   "schedule never fired)")
            if too_few and len(too_few) == len(run.catalog.sites):
                why = f"--sim-dim {dim} is beyond the dimensions of every site's samples"
            self.skip("figure dimension variance and similarity", why)
            return
        if too_few:
            self.skip(f"dimension variance and similarity of {len(too_few)} site(s)",
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
        self._act_figure("dimension variance and similarity", "act_variance_similarity",
                         "Variance and similarity across a dimension",
                         f"For every site with raw samples, at every step where samples were recorded (dimension "
                         f"{dim}, counting the sample axis as 0; for conv outputs dimension 1 is the channel). "
                         "Left: the variance of the values along that dimension, averaged over the other "
                         f"positions. Right: the {sim}. Collapsing variance or similarity rising towards 1 "
                         "means the units of a layer become interchangeable.", draw,
                         plots.check(df, plots.variance_similarity))

    def _sweep(self, du, order) -> None:
        a = self.act
        sw = dead_sweep(self.run, a["dead_criterion"], a["dead_threshold"], a["max_active_fraction"], du=du)
        self.table("pruning_sweep", sw, "sparsity versus threshold per site under the dead criterion "
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
        self._act_figure("pruning sweep", "act_pruning_sweep", "Pruning sweep",
                         f"Sparsity a dead-unit pruning would reach (fraction of each site's units dead over the "
                         f"whole run, criterion {html.escape(a['dead_criterion'])}) at each value of the "
                         f"{html.escape(param)} (x), one line per site; thick black: all sites' units together; "
                         "dashed: this report's value. The same numbers are in pruning_sweep.csv; rerun the "
                         "report with another --dead-threshold for the per-unit lists at that value.",
                         draw, plots.check(sw, plots.pruning_sweep))

    # ------------------------------------------------------------------ attention captures (issue 4)
    def _attention(self) -> None:
        """Attention-IoU section: scores per split, average maps, overlays, score over capture steps."""
        from . import plots_attention as pa
        try:
            data = pa.section_data(self.run)
        except fmt.TraceError as e:
            self.skip("attention section", str(e))
            return
        if not data:   # noted in summary.json only: a run without captures is the normal case
            self.attention = {"captures": 0, "note": "no attention captures (recorder.capture_attention)"}
            return
        cap, target = data["capture"], data["target"]
        self.attention = {"captures": len(self.run.catalog.captures()), "capture": cap.index, "step": cap.step,
                          "target": target, "method": "gradcam", "bootstrap": pa.REPORT_BOOTSTRAP,
                          "scores": [] if data["scores"] is None else data["scores"][
                              ["reference", "split", "n", "mean", "boot_mean", "boot_std"]].to_dict(orient="records")}
        where = f"capture {cap.index} (step {cap.step}), target <code>{html.escape(target)}</code>, Grad-CAM"
        sc = data["scores"]
        if sc is not None and len(sc):
            self.table("attention_iou", sc, f"Attention-IoU of {target!r} per split and reference "
                       f"(capture {cap.index}, Grad-CAM, {pa.REPORT_BOOTSTRAP} bootstrap resamples)")

            def draw_scores():
                fig, ax = plots.new_figure(9, 4.2)
                pa.attention_scores(sc, ax[0, 0])
                return fig
            self.figure("attention_scores", "Attention-IoU per split", f"{where}: mean Attention-IoU S of the "
                        "maps against each mask group (or the second target's maps), per split: all images, correct "
                        "and incorrect predictions, and each joint value of the captured group labels. Bars: "
                        f"bootstrap mean ({pa.REPORT_BOOTSTRAP} resamples); whiskers: bootstrap std. Rescore with "
                        "<code>bbdecoder attention-iou</code> (other method, resolution, mask group, 10,000 "
                        "resamples).", draw_scores, "attention")
        else:
            self.skip("figure attention_scores", "the capture has no masks and a single target")
        if data["avg_maps"]:
            def draw_avg():
                n = len(data["avg_maps"])
                fig = plots.figure(min(4, n) * 2.6 + 1, int(np.ceil(n / 4)) * 2.6)
                return pa.attention_average_maps(data["avg_maps"], fig)
            self.figure("attention_average_maps", "Average attention maps", f"{where}: the mean of the "
                        "per-image [0, 1] maps (at the image size) over each split's images.", draw_avg, "attention")

        def draw_ov():
            fig = plots.figure(2.3 * max(len(data["overlays"]), 1), 2.6)
            return pa.attention_overlays(data["overlays"], data["overlay_masks"], fig,
                                         titles=[f"image {i}" for i in range(len(data["overlays"]))])
        mname = data["overlay_mask_name"]
        self.figure("attention_overlays", "Attention overlays", f"{where}: the first images' maps" +
                    (f", with the outline of mask group <code>{html.escape(mname)}</code> in white." if mname else
                     " (no masks were captured)."), draw_ov, "attention")
        tm = data["time"]
        if tm is not None and tm["step"].nunique() > 1:
            self.table("attention_iou_time", tm, f"Attention-IoU of {target!r} (all images) per capture")

            def draw_time():
                fig, ax = plots.new_figure(9, 4)
                pa.attention_over_time(tm, ax[0, 0])
                return fig
            self.figure("attention_over_time", "Attention-IoU over training", f"Target <code>"
                        f"{html.escape(target)}</code>, Grad-CAM: the score over all images of each capture, by the "
                        "training step at which it was taken; band: bootstrap std.", draw_time, "attention")
        else:
            self.skip("figure attention_over_time", "fewer than two captures at different steps")

    # ------------------------------------------------------------------ summary and HTML
    def _summary(self, steps, lt, summ, gl, ws, multi_rank) -> dict:
        run = self.run
        from . import __version__
        loss = steps[np.isfinite(steps["loss"].to_numpy(np.float64))] if len(steps) else steps
        first = loss.iloc[0] if len(loss) else None
        last = loss.iloc[-1] if len(loss) else None
        layers = []
        for r in summ.itertuples(index=False):
            layers.append({
                "id": r.layer_id, "name": r.name, "type": r.type, "n_params": r.n_params,
                "recorded": r.selected, "grad_steps": r.grad_steps, "mean_abs_grad": r.mean_abs_grad,
                "max_abs_grad": r.max_abs_grad, "last_epoch": int(r.last_epoch) if np.isfinite(r.last_epoch) else None,
                "last_epoch_mean_l2": r.last_epoch_mean_l2, "weight_snapshots": r.weight_snapshots,
                "weight_l2_final": r.weight_l2_final, "update_ratio_median": r.update_ratio_median,
            })
        return {
            "bbdecoder_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parameters": {"run": run.path, "out_dir": self.out,
                           "layers": self.layers_spec if self.layers_spec is None
                           or isinstance(self.layers_spec, (str, int)) else repr(self.layers_spec),
                           "bins": self.bins, **self.act},
            "run": {"path": run.path, "status": run.status, "status_reason": run.status_reason,
                    "format_version": run.manifest.get("format_version"), "ranks": run.ranks,
                    "ranks_used": "lowest rank only" if multi_rank else None,
                    "problems": list(run.problems)},
            "steps": int(len(steps)), "epochs": int(run.epochs),
            "first_step": int(steps["step"].iloc[0]) if len(steps) else None,
            "last_step": int(steps["step"].iloc[-1]) if len(steps) else None,
            "grad_steps": int(gl["step"].nunique()) if len(gl) else 0,
            "weight_snapshots": int(ws["step"].nunique()) if len(ws) else 0,
            "loss": {"first": float(first["loss"]) if first is not None else None,
                     "first_step": int(first["step"]) if first is not None else None,
                     "last": float(last["loss"]) if last is not None else None,
                     "last_step": int(last["step"]) if last is not None else None},
            "definitions": {
                "mean_abs_grad": "sum over steps of sum|g| / sum over steps of finite element count",
                "max_abs_grad": "max |g| over all recorded steps",
                "last_epoch_mean_l2": "mean over the last epoch's recorded steps of the layer's gradient L2 norm",
                "weight_l2_final": "sqrt(sum over the layer's parameters of ||w||^2) at the last snapshot",
                "update_ratio_median": "median over snapshots of the layer's ||w_t - w_prev|| / ||w_prev||",
                "layers_pool": "statistics of a layer pool all its parameters (weight, bias, ...)",
            },
            "layers": layers,
            "activations": self.act_summary,
            "figures": [f["file"] for f in self.figures],
            "tables": [t["file"] for t in self.tables],
            "skipped": list(self.skipped),
            "not_recorded": list(self.not_recorded),
        }

    def _act_html(self, s: dict) -> str:
        """Parameters and the per-site headline table of the activation section."""
        e = html.escape
        a, p = s["activations"], s["parameters"]
        rows = "\n".join(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                f"<code>{e(r['site'])}</code>", e(str(r["kind"])), _fmt(r["units"]), _fmt(r["dead"]),
                _fmt(r["dead_fraction"]), "<strong>yes</strong>" if r["dead_flagged"] else
                ("no" if r["dead_flagged"] is not None else "–"), _fmt(r["saturated"]), _fmt(r["saturated_units"]),
                "<strong>yes</strong>" if r["saturation_flagged"] else
                ("no" if r["saturation_flagged"] is not None else "–"))) + "</tr>"
            for r in a.get("sites", []))
        return (f"<p class='note'>Dead criterion: {e(a.get('criterion') or '')}; a site is flagged when more than "
                f"{p['layer_share']:g} of its units are dead (or saturated). Saturation: delta {p['delta']:g}, a unit "
                f"is saturated when more than {p['unit_fraction']:g} of its values are. Similarity: dimension "
                f"{p['sim_dim']}, {e(p['sim_method'])}. Rerun <code>bbdecoder report</code> with other "
                "<code>--dead-criterion/--dead-threshold/--delta/...</code> into another <code>--out</code> for "
                "other thresholds.</p>\n"
                "<table class='num'><tr><th>site</th><th>kind</th><th>units</th><th>dead</th><th>dead fraction</th>"
                "<th>dead flagged</th><th>saturated</th><th>saturated units</th><th>saturation flagged</th></tr>\n"
                f"{rows}\n</table>")

    def _html(self, s: dict) -> str:
        e = html.escape
        run = s["run"]
        complete = run["status"] == "complete"
        status = ('<p class="ok">Status: complete</p>' if complete else
                  f'<p class="bad"><strong>Status: INCOMPLETE</strong> — {e(run["status_reason"] or "incomplete")}.'
                  " The figures and numbers cover only what was written before that.</p>")
        loss = s["loss"]
        head = [
            ("run", f"<code>{e(run['path'])}</code>"),
            ("steps", f"{s['steps']}" + (f" ({s['first_step']} … {s['last_step']})" if s["steps"] else "")),
            ("epochs", str(s["epochs"])),
            ("steps with gradients", str(s["grad_steps"])),
            ("weight snapshots", str(s["weight_snapshots"])),
            ("first loss", f"{_fmt(loss['first'])}" + (f" (step {loss['first_step']})" if loss["first"] is not None
                                                        else "")),
            ("last loss", f"{_fmt(loss['last'])}" + (f" (step {loss['last_step']})" if loss["last"] is not None
                                                      else "")),
            ("layers in report", f"{len(s['layers'])}" + (f" (selection <code>{e(str(s['parameters']['layers']))}"
                                                          "</code>)" if s["parameters"]["layers"] is not None else "")),
            ("ranks", e(", ".join(map(str, run["ranks"])) or "–") + (" (figures use the lowest rank)"
                                                                     if run["ranks_used"] else "")),
        ]
        rows_head = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in head)
        lay_rows = "\n".join(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                _fmt(L["id"]), f"<code>{e(L['name'] or '(model)')}</code>", e(L["type"]), _fmt(L["n_params"]),
                "yes" if L["recorded"] else "no", _fmt(L["mean_abs_grad"]), _fmt(L["max_abs_grad"]),
                _fmt(L["last_epoch_mean_l2"]), _fmt(L["weight_l2_final"]), _fmt(L["update_ratio_median"]))) + "</tr>"
            for L in s["layers"])
        sections = [("loss", "Loss"), ("gradients", "Gradients"), ("weights", "Weights"),
                    ("activations", "Activations"), ("attention", "Attention-IoU"), ("layers", "Per layer")]
        figs = []
        for key, title in sections:
            fs = [f for f in self.figures if f["section"] == key]
            if not fs:
                continue
            figs.append(f"<h2>{title}</h2>")
            if key == "activations":
                figs.append(self._act_html(s))
            if key == "layers":      # grouped by layer, in id order
                fs = sorted(fs, key=lambda f: f["layer"].id)
            last = None
            for f in fs:
                L = f["layer"]
                if L is not None and L.id != last:
                    last = L.id
                    figs.append(f'<h3 id="layer-{int(L.id)}">Layer {int(L.id)}: <code>{e(L.name or "(model)")}</code> '
                                f"({e(L.type)})</h3>")
                figs.append(f'<figure><img src="{e(f["file"])}" alt="{e(f["title"])}" loading="lazy">'
                            f'<figcaption><strong>{e(f["title"])}.</strong> {f["caption"]}</figcaption></figure>')
        tables = "\n".join(f'<li><a href="{e(t["file"])}">{e(t["file"])}</a> — {e(t["description"])} '
                           f'({t["rows"]} rows)</li>' for t in self.tables)
        skipped = ("\n".join(f"<li>{e(x)}</li>" for x in s["skipped"] + s["not_recorded"])
                   if s["skipped"] or s["not_recorded"] else "<li>nothing</li>")
        stale = ""
        if s.get("stale_files"):
            stale = ("<p class='note'>Also in this directory, from an earlier report and not part of this one: "
                     + ", ".join(f"<code>{e(p)}</code>" for p in s["stale_files"][:50])
                     + (" …" if len(s["stale_files"]) > 50 else "") + "</p>")
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>BBDecoder report — {e(os.path.basename(run['path']) or run['path'])}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.6em; margin-bottom: .2em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }}
th, td {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }}
table.num td {{ text-align: right; }} table.num td:nth-child(2), table.num td:nth-child(3) {{ text-align: left; }}
th {{ background: #f4f4f4; }}
.ok {{ background: #e8f5e9; border-left: 5px solid #2e7d32; padding: .5em 1em; }}
.bad {{ background: #fdecea; border-left: 5px solid #c62828; padding: .5em 1em; }}
.note {{ color: #555; font-size: .9em; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ font-size: .92em; color: #333; max-width: 60em; }}
code {{ font-size: .92em; background: #f6f6f6; padding: 0 .2em; }}
</style></head>
<body>
<h1>BBDecoder report</h1>
<p class="note">bbdecoder {e(s['bbdecoder_version'])}, written {e(s['created'])}; weight histograms with {s['parameters']['bins']} bins.</p>
{status}
{nonfinite_html(s.get("nonfinite"))}
<h2>Summary</h2>
<table>
{rows_head}
</table>
<table class="num">
<tr><th>id</th><th>layer</th><th>type</th><th>parameters</th><th>recorded</th><th>mean |g|</th><th>max |g|</th>
<th>last-epoch mean ‖g‖₂</th><th>final ‖w‖₂</th><th>median update ratio</th></tr>
{lay_rows}
</table>
<p class="note">mean |g| = Σ|g| / number of elements over every recorded step; max |g| over every step;
last-epoch mean ‖g‖₂ = mean over the steps of epoch {_fmt(next((L['last_epoch'] for L in s['layers'] if L['last_epoch'] is not None), None))} of the layer's gradient L2 norm;
final ‖w‖₂ at the last snapshot and the update ratio ‖w<sub>t</sub> − w<sub>prev</sub>‖ / ‖w<sub>prev</sub>‖ pool all the layer's parameters.</p>
{chr(10).join(figs)}
<h2>Tables and data</h2>
<ul>
{tables}
<li><a href="summary.json">summary.json</a> — every parameter and headline number of this report</li>
</ul>
{stale}
<h2>Skipped</h2>
<ul>
{skipped}
</ul>
</body></html>
"""


def build_report(run, out_dir: str | os.PathLike, layers: Any = None, bins: int = 64,
                 progress: Callable | None = None, *, dead_criterion: str = "strict", dead_threshold: float = 0.0,
                 max_active_fraction: float = 0.0, layer_share: float = 0.5, delta: float = 0.03,
                 unit_fraction: float = 0.5, sim_dim: int = 1, sim_method: str = "cosine",
                 raster_site: Any = None, jobs: int | None = None) -> dict:
    """Write the report of ``run`` into ``out_dir``: ``index.html``, ``summary.json``,
    ``figures/*.png`` and ``tables/*.csv``.

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
        jobs: processes drawing the figures (forked after the statistics are computed; 1 = in this
            process); None = the CPUs available, at most 4 (see :func:`default_jobs`).

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
        from .activations import select_site
        act["raster_site"] = select_site(run, raster_site)["name"]   # TraceError before anything is written
    out = os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(out):
        raise FileNotFoundError(f"report directory {out} does not exist")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 256):
        raise ValueError(f"jobs must be an int in [1, 256], not {jobs!r}")
    return _Report(run, out, layers, bins, progress, act, jobs).build()


# ---------------------------------------------------------------------------------------- non-finite values
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
        for (lid, layer, param), g in bad.groupby(["layer_id", "layer", "param"], sort=True):
            entries.append({"kind": kind, "layer": layer, "layer_id": int(lid), "param": param,
                            "first_step": int(g["step"].min()), "steps": int(g["step"].nunique()),
                            "count": int(g["nonfinite"].sum())})
    from .activations import iter_site_stats
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


__all__ = ["build_report", "layer_summary", "layer_update_ratio", "layer_weight_l2",
           "grad_variance_epoch_table", "first_rank", "check_activation_options", "dead_layer_table",
           "dead_sweep", "sweep_grid", "ACTIVATION_DEFAULTS", "nonfinite_findings", "nonfinite_html"]
