"""Opening a run directory and computing statistics from it, out of core, without torch."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import activations, pruning, slices
from .catalog import RANK_COLUMNS, Catalog, rank_rows, recorded_summary, shared_names, unique_params
from .engine import check_engine
from .gradients import float16_losses, grad_pass, pool_params
from .progress import null_progress
from .trace.format import TraceError
from .weights import WeightHistograms, weight_histograms, weight_stats

#: pandas >= 3 copies on write: a shallow copy of a cached table is then as safe as a deep one (a caller's
#: edit copies first), without a second copy of, e.g., 4 million gradient rows at 100,000 layers (issue 16)
_DEEP_COPY = int(pd.__version__.split(".")[0]) < 3

__all__ = ["open", "Run", "WeightHistograms"]


def open(path: str | os.PathLike, progress: Callable | None = None, engine: str = "local") -> "Run":  # noqa: A001
    """Open a run directory written by the recorder (possibly still being written).

    ``engine``: "local" (default) or "dask" (gradient and weight passes mapped over the shards with
    dask; see :mod:`analyzer.engine`).

    Raises:
        TraceError: the directory is missing, empty, not a run, or holds a malformed manifest,
            an unsupported format version or an unreadable shard.
    """
    return Run(path, progress=progress, engine=engine)


class Run:
    """A recorded run. Opening reads the manifest and every closed shard's index (small);
    statistics stream over the shards block by block."""

    def __init__(self, path: str | os.PathLike, progress: Callable | None = None, backend=None,
                 engine: str = "local"):
        #: "local" or "dask": how the gradient and weight passes map over the shards (same numbers).
        self.engine = check_engine(engine)
        #: dask client for engine="dask" (None: the default client or a new local cluster).
        self.dask_client = None
        #: the run's public index (ranks, shards, steps, layers, sites, captures); see analyzer.catalog
        self.catalog = Catalog(path, backend=backend)
        self.path = self.catalog.path
        self.manifest = self.catalog.manifest
        self.problems = self.catalog.problems
        self.rank_states = self.catalog.rank_states
        self.progress = progress or null_progress
        self._cache: dict = {}

    def close(self) -> None:
        """Close the shard files this run keeps open (idempotent; the run can still be used: files
        are reopened on demand)."""
        self.catalog.close()

    def keep_open(self) -> "Run":
        """Keep up to ``READERS_KEPT`` shard files open between analyses until the ``with`` block
        ends (then they are closed). For many calls in a row that visit every shard once per layer
        or site (``weight_histograms`` of each layer, the report); nested blocks are allowed.

        Example::

            with run.keep_open():
                hists = [run.weight_histograms(i) for i in run.layers["id"]]
        """
        return self

    def __enter__(self) -> "Run":
        self.catalog.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.catalog.__exit__(*exc)

    # ------------------------------------------------------------------ descriptive properties
    @property
    def status(self) -> str:
        """"complete" if the recorder closed cleanly on every rank, else "incomplete"."""
        return self.catalog.status

    @property
    def status_reason(self) -> str:
        """Why a run is incomplete (empty for a complete run)."""
        return self.catalog.status_reason

    @property
    def ranks(self) -> list[int]:
        """Ranks that have a rank directory, sorted."""
        return self.catalog.ranks

    def rank_table(self) -> pd.DataFrame:
        """One row per rank directory: rank, status (from its rank.json), shards (closed), live
        (unfinished shards), steps (rows of its step tables), first_step, last_step (NaN if none),
        bytes (closed shards, bytes), grads, weights, activations (whether its shards hold any)."""
        return pd.DataFrame(rank_rows(self.catalog), columns=RANK_COLUMNS)

    @property
    def nbytes(self) -> int:
        """Bytes of closed shards on disk."""
        return self.catalog.nbytes

    @property
    def layers(self) -> pd.DataFrame:
        """Layer table: id, name, type, n_params (tied ones counted once), key, selected, aliases (or "")."""
        return layer_table(self.catalog)

    @property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step: step, epoch, loss, time (s since the first step), wall (unix s),
        dropped (payloads dropped at that step because the writer queue was full)."""
        if "steps" not in self._cache:
            self._cache["steps"] = step_table(self.catalog)
        return self._cache["steps"].copy()

    @property
    def epochs(self) -> int:
        st = self.steps
        return int(st["epoch"].nunique()) if len(st) else 0

    def recorded(self) -> dict:
        """What the trace holds: per payload kind, the steps recorded and the layers covered."""
        return recorded_summary(self.catalog)

    def float16_losses(self) -> dict:
        """Raw values lost to float16 storage, per kind: {"grads": {"underflow", "overflow", "shards"}, ...}
        (see :func:`analyzer.gradients.float16_losses`); {} when nothing was stored as float16."""
        return float16_losses(self.catalog)

    def info(self) -> dict:
        """Summary for `bbdecoder info`: status, steps, epochs, layers, ranks, bytes and more."""
        return run_info(self)

    # ------------------------------------------------------------------ activations (see analyzer.activations)
    @property
    def sites(self) -> pd.DataFrame:
        """Activation sites: name, key, kind, family, source, module, units, unit_axis."""
        return activations.site_table(self)

    def activation_stats(self, per: str = "step", sites: Any = None, steps=None, by_rank: bool = False) -> pd.DataFrame:
        """Per-unit activation statistics per step or epoch, pooled over ranks unless ``by_rank``
        (see :func:`analyzer.activations.activation_stats`)."""
        return activations.activation_stats(self, per=per, sites=sites, steps=steps, by_rank=by_rank)

    def dead_units(self, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
                   steps=None, sites: Any = None, layer_share: float = 0.5) -> pd.DataFrame:
        """Dead units per (site, unit) at any threshold (see :func:`analyzer.activations.dead_units`)."""
        return activations.dead_units(self, criterion, threshold, max_active_fraction, steps, sites, layer_share)

    def saturation(self, delta: float = 0.03, steps=None, sites: Any = None, per_unit: bool = False,
                   by_rank: bool = False) -> pd.DataFrame:
        """Saturated fraction per (step, site[, unit]), pooled over ranks unless ``by_rank``
        (see :func:`analyzer.activations.saturation`)."""
        return activations.saturation(self, delta, steps=steps, sites=sites, per_unit=per_unit, by_rank=by_rank)

    def dimension_variance(self, layer: Any, dim: int = 1, steps=None) -> pd.DataFrame:
        """Variance across ``dim`` of a site's raw samples, per recorded step."""
        return activations.dimension_variance(self, layer, dim=dim, steps=steps)

    def similarity(self, layer: Any, dim: int = 1, method: str = "cosine", steps=None) -> pd.DataFrame:
        """Mean pairwise similarity between slices along ``dim``, per recorded step."""
        return activations.similarity(self, layer, dim=dim, method=method, steps=steps)

    def pruning_plan(self, criterion: str, threshold: float, layers: Any = None, steps=None,
                     max_active_fraction: float = 0.0) -> dict:
        """A versioned pruning plan (see :func:`analyzer.pruning.pruning_plan`)."""
        return pruning.pruning_plan(self, criterion, threshold, layers=layers, steps=steps,
                                    max_active_fraction=max_active_fraction)

    def pruning_sweep(self, criterion: str, thresholds=None, layers: Any = None, steps=None,
                      max_active_fraction: float = 0.0) -> pd.DataFrame:
        """Sparsity versus threshold per layer and overall (see :func:`analyzer.pruning.sweep`)."""
        return pruning.sweep(self, criterion, thresholds, layers=layers, steps=steps,
                             max_active_fraction=max_active_fraction)

    # ------------------------------------------------------------------ attention captures (see analyzer.attention_iou)
    @property
    def captures(self) -> pd.DataFrame:
        """Attention captures: position, index, step, epoch, n_images, target_layer, targets, masks, groups."""
        from .attention_iou import capture_table
        return capture_table(self.catalog.captures())

    def attention_maps(self, target: str, method: str = "gradcam", size: Any = None, capture: int = -1) -> np.ndarray:
        """Attention maps of ``target`` from a capture, computed offline (no model, no torch).

        Args:
            target: a captured target name. method: gradcam, gradcam++, xgradcam, hirescam, layercam,
                elementwise, eigencam or eigengradcam.
            size: None (the target layer's h x w), "image" (the input size) or (H, W).
            capture: position in :attr:`captures` (-1: the latest).

        Returns:
            (N, H, W) float32 in [0, 1], images in capture order.
        """
        from .attention_iou import attention_maps
        from .trace.captures import pick
        return attention_maps(pick(self.catalog.captures(), capture, self.path), target, method, size)

    def attention_iou(self, target: str, mask_group: str | None = None, protected: str | None = None,
                      method: str = "gradcam", bootstrap: int = 10000, seed: int = 0, resolution: str = "image",
                      capture: Any = -1, scores=("iou",), by: Any = "all") -> pd.DataFrame:
        """Attention-IoU mask score (``mask_group``) or heatmap score (``protected``) with bootstrap, per
        split (all / correct / incorrect / group labels); ``capture="all"`` scores every capture (over time).
        See :func:`analyzer.attention_iou.attention_iou` for the columns and ``attrs["notes"]`` (why
        images went unscored; also issued as AttentionWarning)."""
        from .attention_iou import attention_iou_captures, chosen_captures
        return attention_iou_captures(chosen_captures(self.catalog.captures(), capture, self.path), target,
                                      mask_group, protected, method, resolution, scores, bootstrap, seed, by)

    # ------------------------------------------------------------------ function graph and feature evolution
    def graph(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The recorded function graph (``graph.json``): (nodes, edges) DataFrames.

        nodes: one row per op that ran, in call order (id, op, func, module, module_type, activation
        kind, input/output shapes and dtypes, params, flops); edges: src, dst, arg, shape, src_op, dst_op.
        See :mod:`analyzer.graph`. Raises TraceError when no graph was recorded.
        """
        from .graph import edge_frame, node_frame, read_graph
        g = read_graph(self.path)
        return node_frame(g), edge_frame(g)

    def graph_modules(self) -> pd.DataFrame:
        """Per-module cost of the recorded forward: name, type, depth, calls, n_params, flops
        (inclusive, per forward), time_s (median inclusive forward time, seconds), kind."""
        from .graph import module_frame, read_graph
        return module_frame(read_graph(self.path))

    @property
    def feature_captures(self) -> pd.DataFrame:
        """Feature captures (``RUN/features/``): index, path, layer, step, epoch, shape."""
        from .features import feature_captures
        return feature_captures(self.path)

    def feature_maps(self, layer: str, sample: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One layer's output for probe input ``sample`` at every capture.

        Returns:
            (maps float32 (T, C, H, W), steps int64 (T,)); see :func:`analyzer.features.feature_maps`.
        """
        from .features import feature_maps
        maps, steps, _ = feature_maps(self.path, layer, sample)
        return maps, steps

    # ------------------------------------------------------------------ health rules (see analyzer.findings)
    def findings(self, rules: Any = None, **thresholds: dict) -> pd.DataFrame:
        """Health rules on the run's statistics (docs/findings.md: rules, defaults, sources).

        ``rules``: None (every enabled rule), a name or a list of names; ``thresholds``: per rule a dict
        over its defaults, e.g. ``vanishing_gradient={"relative": 1e-5}, gradient_spike={"severity": "error"}``.
        Returns a DataFrame of rule, severity (error, warning, info; "skipped" rows say why in
        ``message``), layer (or site), param, first_step, last_step, n_steps, value, threshold, message.
        Statistics are read once per run: a call at other thresholds reads nothing again."""
        from .findings import evaluate
        with self:      # shard readers kept open: the activation passes visit every shard more than once
            return evaluate(self.findings_tables(), rules, thresholds)

    def findings_tables(self):
        """The statistics tables of the rules and of ``analyzer.compare`` (:class:`analyzer.findings.Tables`), kept."""
        from .findings import Tables
        if "findings" not in self._cache:
            self._cache["findings"] = Tables(self)
        return self._cache["findings"]

    # ------------------------------------------------------------------ selection
    def select(self, layers: Any = None) -> list[int]:
        """Layer ids for a specification (ids, names, globs, type names; see format.select_layers)."""
        return self.catalog.select(layers)

    def layer(self, spec: Any) -> dict:
        """The layer record for one id or name."""
        return self.catalog.layer(spec)

    # ------------------------------------------------------------------ cached passes
    def _grad_tables(self, layers: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        ids, keys = self.catalog.param_keys(layers)
        ck = ("grads", tuple(ids))
        if ck not in self._cache:
            self._cache[ck] = grad_pass(self.catalog, keys, self.engine, self.progress, self.dask_client)
        return self._cache[ck]

    def _weights_of(self, layer_id: int) -> pd.DataFrame:
        """The cached table of every layer if there is one, else that layer's (cached) table."""
        cached = self._cache.get(("weights", tuple(self.select(None))))
        return cached if cached is not None else self.weight_stats(layer_id)

    # ------------------------------------------------------------------ public statistics
    def grad_stats(self, per: str = "step", layers: Any = None, by: str = "param") -> pd.DataFrame:
        """Gradient statistics. Per-step rows come from the statistics the recorder computed on the
        device (``grad_stats_every``) where a step has them, else from that step's raw gradients.

        Args:
            per: "step": one row per (step, layer, param) with mean (signed), abs_mean = mean|g|,
                max_abs = max|g|, var (population, ddof 0), l1 = sum|g|, l2 = sqrt(sum g^2),
                count (finite elements) and nonfinite (NaN/Inf count; the other statistics are over
                the finite elements). "epoch": one row per (epoch, layer, param): the mean over the
                epoch's recorded iterations of mean, abs_mean, var, l1, l2; max of max_abs; l2_var =
                variance across iterations of l2 (ddof 0); grad_noise = element-wise variance of the
                gradient across the epoch's iterations with raw gradients (ddof 0), averaged over
                elements; n_steps.
            layers: layer specification (None = every layer).
            by: "param" (default) or "layer" (parameters of a layer pooled; per="step" only).

        Returns:
            DataFrame in gradient units (l2_var, var and grad_noise in squared units).
        """
        if per not in ("step", "epoch"):
            raise ValueError(f"per must be 'step' or 'epoch', not {per!r}")
        df, ep = self._grad_tables(layers)
        if by == "layer":
            if per != "step":
                raise ValueError("by='layer' is available with per='step'")
            return pool_params(df)
        if by != "param":
            raise ValueError(f"by must be 'param' or 'layer', not {by!r}")
        return (df if per == "step" else ep).copy(deep=_DEEP_COPY)

    def weight_stats(self, layers: Any = None) -> pd.DataFrame:
        """Weight statistics per snapshot: one row per (snapshot step, layer, param) with mean, std
        (population), abs_mean, max_abs, min, max, l2 and update_ratio = ||w_t - w_prev|| / ||w_prev||
        between consecutive snapshots (NaN for the first). Weight units; update_ratio unitless."""
        ids, keys = self.catalog.param_keys(layers)
        ck = ("weights", tuple(ids))
        if ck not in self._cache:
            self._cache[ck] = weight_stats(self.catalog, keys, self.engine, self.progress, self.dask_client)
        return self._cache[ck].copy(deep=_DEEP_COPY)

    def weight_histograms(self, layer: Any, bins: int = 64, param: str | None = None) -> WeightHistograms:
        """Histogram of one parameter's weights at every snapshot, on edges common to all snapshots
        (linear from the smallest to the largest finite weight ever recorded).

        Args:
            layer: id or dotted name of one layer.
            bins: number of bins (>= 1).
            param: parameter name; default "weight" if the layer has one, else its first parameter.
        """
        return weight_histograms(self.catalog, layer, bins, param, self._weights_of, self.progress)

    def raw_tensor(self, kind: str, layer: Any, param: str, step: int, rank: int | None = None) -> np.ndarray:
        """One recorded raw gradient (``kind="grads"``) or weight snapshot (``"weights"``) at ``step``,
        as a numpy array of the parameter's full shape in the stored dtype. A parameter sharded by
        FSDP2 is put together from every rank's slice; an unsharded one comes from ``rank`` (default:
        the lowest rank that recorded that step).

        Raises:
            TraceError: unknown parameter, no such row, or a sharded step with a missing slice.
        """
        L = self.catalog.layer(layer)
        pk = next((q["key"] for q in L["params"] if q["name"] == param), None)
        if pk is None:
            raise TraceError(f"layer {L['name']!r} has no parameter {param!r}")
        lk, pk = self.catalog.owner_key.get((L["key"], pk), (L["key"], pk))   # a tied one: its owner's
        return slices.raw_tensor(self.catalog, kind, lk, pk, int(step), rank)


def layer_table(catalog: Catalog) -> pd.DataFrame:
    """The table of :attr:`Run.layers` (see there)."""
    return pd.DataFrame({
        "id": [L["id"] for L in catalog.layers], "name": [L["name"] for L in catalog.layers],
        "type": [L["type"] for L in catalog.layers],
        "n_params": [int(L.get("n_params", sum(int(np.prod(q["shape"])) for q in L["params"])))
                     for L in catalog.layers],
        "key": [L["key"] for L in catalog.layers],
        "selected": [bool(L.get("selected", True)) for L in catalog.layers],
        "aliases": [layer_aliases(L) for L in catalog.layers],
    })


def layer_aliases(L: dict) -> str:
    """A layer's other names, for the layer table: ``"= other.path"`` for a shared module, and per tied
    parameter ``"weight = owner.weight"`` or ``"weight also other.weight"``; "" when none."""
    out = [f"= {a}" for a in L.get("aliases", [])]
    for q in L["params"]:
        if "tied_to" in q:
            out.append(f"{q['name']} = {q['tied_to']}")
        elif q.get("aliases"):
            out.append(f"{q['name']} also {', '.join(q['aliases'])}")
    return "; ".join(out)


def step_table(catalog: Catalog) -> pd.DataFrame:
    """The table of :attr:`Run.steps` (see there), from the lowest rank's step tables."""
    data = catalog.step_columns()
    df = pd.DataFrame({"step": data["step"].astype(np.int64), "epoch": data["epoch"].astype(np.int64),
                       "loss": data["loss"].astype(np.float64), "wall": data["time"].astype(np.float64),
                       "dropped": data["dropped"].astype(np.int64)})
    df = df.sort_values("step", kind="stable").drop_duplicates("step").reset_index(drop=True)
    t0 = df["wall"].iloc[0] if len(df) else 0.0
    df.insert(3, "time", df["wall"] - t0)
    return df


def run_info(run: Run) -> dict:
    """The dict of :meth:`Run.info` (see there)."""
    st = run.steps
    m = run.manifest
    return {
        "path": run.path, "status": run.status, "status_reason": run.status_reason,
        "format_version": m["format_version"], "steps": int(len(st)), "epochs": run.epochs,
        "first_step": int(st["step"].iloc[0]) if len(st) else None,
        "last_step": int(st["step"].iloc[-1]) if len(st) else None,
        "layers": len(run.catalog.layers), "params": unique_params(run.catalog), "shared": shared_names(run.catalog),
        "ranks": run.ranks, "world_size": m.get("world_size", 1),
        "shards": len(run.catalog.shards), "bytes": run.nbytes, "recorded": run.recorded(),
        "dropped": int(st["dropped"].sum()) if len(st) else 0,
        "errors": [e for s in run.rank_states.values() for e in s.get("errors", [])],
        "rank_table": [{k: (None if isinstance(v, float) and np.isnan(v) else
                            int(v) if isinstance(v, (float, np.integer)) else v) for k, v in row.items()}
                       for row in run.rank_table().to_dict("records")],
        "problems": list(run.problems), "model": m.get("model", {}), "config": m.get("config", {}),
        "created": m.get("created"), "ended": m.get("ended"),
    }
