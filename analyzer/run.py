"""Opening a run directory and computing statistics from it, out of core, without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from .trace import format as fmt
from .catalog import GRAD_KINDS as _GRAD_KINDS
from .catalog import Catalog, Shard
from .engine import ShardContext, check_engine, grad_shard, map_shards, previous_rows, shard_blocks, weight_shard
from .trace.format import TraceError
from .stats import ElementwiseMoments
from .trace.hdf5 import HDF5Backend

#: Bytes of stored data read per block (rows are chunk-aligned); bounds the memory of every pass.
BLOCK_BYTES = 32 << 20

GRAD_STEP_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "numel", "count", "nonfinite",
                     "mean", "abs_mean", "max_abs", "var", "l1", "l2"]
GRAD_EPOCH_COLUMNS = ["epoch", "layer_id", "layer", "param", "n_steps", "mean", "abs_mean", "max_abs",
                      "var", "l1", "l2", "l2_var", "grad_noise", "nonfinite"]
WEIGHT_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "numel", "mean", "std", "abs_mean",
                  "max_abs", "min", "max", "l2", "update_ratio", "nonfinite"]


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, n: int) -> None:
        pass


def null_progress(label: str, total: int):
    """Progress factory that shows nothing (the CLI passes click.progressbar instead)."""
    return _NullProgress()


@dataclass
class WeightHistograms:
    """Histograms of one parameter's weights at every snapshot, on common edges.

    Attributes:
        layer: dotted layer name. param: parameter name.
        steps: (S,) int64 snapshot steps.
        edges: (bins + 1,) float64 bin edges shared by every snapshot (weight units).
        counts: (S, bins) int64 element counts per bin (non-finite values are not counted).
    """

    layer: str
    param: str
    steps: np.ndarray
    edges: np.ndarray
    counts: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """Tidy form: one row per (step, bin) with bin_left, bin_right, count."""
        S, B = self.counts.shape
        return pd.DataFrame({"step": np.repeat(self.steps, B), "bin_left": np.tile(self.edges[:-1], S),
                             "bin_right": np.tile(self.edges[1:], S), "count": self.counts.reshape(-1)})


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
        return sorted(self.rank_states)

    def rank_table(self) -> pd.DataFrame:
        """One row per rank directory: rank, status (from its rank.json), shards (closed), live
        (unfinished shards), steps (rows of its step tables), first_step, last_step (NaN if none),
        bytes (closed shards, bytes), grads, weights, activations (whether its shards hold any)."""
        rows = []
        for r in self.ranks:
            sh = [s for s in self.catalog.shards if s.rank == r]
            st = np.concatenate([np.asarray(s.steps["step"], np.int64) for s in sh]) if sh else np.zeros(0, np.int64)
            kinds = {k[0] for s in sh for k, v in s.payloads.items() if v[0]}
            rows.append({"rank": r, "status": str(self.rank_states[r].get("status", "unknown")), "shards": len(sh),
                         "live": sum(n.startswith(fmt.rank_dirname(r) + "/") for n in self.catalog.live),
                         "steps": int(len(np.unique(st))),
                         "first_step": float(st.min()) if len(st) else np.nan,
                         "last_step": float(st.max()) if len(st) else np.nan,
                         "bytes": int(sum(s.nbytes for s in sh)), "grads": bool(kinds & set(_GRAD_KINDS)),
                         "weights": fmt.KIND_WEIGHTS in kinds, "activations": fmt.KIND_ACT_STATS in kinds})
        cols = ["rank", "status", "shards", "live", "steps", "first_step", "last_step", "bytes", "grads", "weights",
                "activations"]
        return pd.DataFrame(rows, columns=cols)

    @property
    def nbytes(self) -> int:
        """Bytes of closed shards on disk."""
        return self.catalog.nbytes

    @property
    def layers(self) -> pd.DataFrame:
        """Layer table: id, name, type, n_params (plus key and whether it was selected for recording)."""
        return pd.DataFrame({
            "id": [L["id"] for L in self.catalog.layers], "name": [L["name"] for L in self.catalog.layers],
            "type": [L["type"] for L in self.catalog.layers],
            "n_params": [int(L.get("n_params", sum(int(np.prod(q["shape"])) for q in L["params"])))
                         for L in self.catalog.layers],
            "key": [L["key"] for L in self.catalog.layers],
            "selected": [bool(L.get("selected", True)) for L in self.catalog.layers],
        })

    @property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step: step, epoch, loss, time (s since the first step), wall (unix s),
        dropped (payloads dropped at that step because the writer queue was full)."""
        if "steps" not in self._cache:
            data = self.catalog.step_columns()
            df = pd.DataFrame({"step": data["step"].astype(np.int64), "epoch": data["epoch"].astype(np.int64),
                               "loss": data["loss"].astype(np.float64), "wall": data["time"].astype(np.float64),
                               "dropped": data["dropped"].astype(np.int64)})
            df = df.sort_values("step", kind="stable").drop_duplicates("step").reset_index(drop=True)
            t0 = df["wall"].iloc[0] if len(df) else 0.0
            df.insert(3, "time", df["wall"] - t0)
            self._cache["steps"] = df
        return self._cache["steps"].copy()

    @property
    def epochs(self) -> int:
        st = self.steps
        return int(st["epoch"].nunique()) if len(st) else 0

    def recorded(self) -> dict:
        """What the trace holds: per payload kind, the steps recorded and the layers covered."""
        out = {}
        for kind in fmt.PAYLOAD_KINDS:
            steps: set = set()
            layers: set = set()
            rows = 0
            for s in self.catalog.shards:
                for (k, lk, pk), (n, _, _) in s.payloads.items():
                    if k == kind and n:
                        rows += n
                        layers.add(lk)
            # distinct steps: the union of the step indices of every payload (a parameter without a
            # gradient at some steps has fewer); the indices are small, the values are not read
            for s in self.catalog.shards:
                keys = [key for key in s.payloads if key[0] == kind]
                if keys:
                    with self.catalog.open_shard(s) as r:
                        for key in keys:
                            steps.update(r.read_payload_steps(*key).tolist())
            out[kind] = {"steps": len(steps), "layers": len(layers), "tensors": rows}
        return out

    def info(self) -> dict:
        """Summary for `bbdecoder info`: status, steps, epochs, layers, ranks, bytes and more."""
        st = self.steps
        m = self.manifest
        return {
            "path": self.path, "status": self.status, "status_reason": self.status_reason,
            "format_version": m["format_version"], "steps": int(len(st)), "epochs": self.epochs,
            "first_step": int(st["step"].iloc[0]) if len(st) else None,
            "last_step": int(st["step"].iloc[-1]) if len(st) else None,
            "layers": len(self.catalog.layers), "ranks": self.ranks, "world_size": m.get("world_size", 1),
            "shards": len(self.catalog.shards), "bytes": self.nbytes, "recorded": self.recorded(),
            "dropped": int(st["dropped"].sum()) if len(st) else 0,
            "errors": [e for s in self.rank_states.values() for e in s.get("errors", [])],
            "rank_table": [{k: (None if isinstance(v, float) and np.isnan(v) else
                                int(v) if isinstance(v, (float, np.integer)) else v) for k, v in row.items()}
                           for row in self.rank_table().to_dict("records")],
            "problems": list(self.problems), "model": m.get("model", {}), "config": m.get("config", {}),
            "created": m.get("created"), "ended": m.get("ended"),
        }

    # ------------------------------------------------------------------ activations (see analyzer.activations)
    @property
    def sites(self) -> pd.DataFrame:
        """Activation sites: name, key, kind, family, source, module, units, unit_axis."""
        from .activations import site_table
        return site_table(self)

    def activation_stats(self, per: str = "step", sites: Any = None, steps=None, by_rank: bool = False) -> pd.DataFrame:
        """Per-unit activation statistics per step or epoch, pooled over ranks unless ``by_rank``
        (see :func:`analyzer.activations.activation_stats`)."""
        from .activations import activation_stats
        return activation_stats(self, per=per, sites=sites, steps=steps, by_rank=by_rank)

    def dead_units(self, criterion: str = "strict", threshold: float = 0.0, max_active_fraction: float = 0.0,
                   steps=None, sites: Any = None, layer_share: float = 0.5) -> pd.DataFrame:
        """Dead units per (site, unit) at any threshold (see :func:`analyzer.activations.dead_units`)."""
        from .activations import dead_units
        return dead_units(self, criterion, threshold, max_active_fraction, steps, sites, layer_share)

    def saturation(self, delta: float = 0.03, steps=None, sites: Any = None, per_unit: bool = False,
                   by_rank: bool = False) -> pd.DataFrame:
        """Saturated fraction per (step, site[, unit]), pooled over ranks unless ``by_rank``
        (see :func:`analyzer.activations.saturation`)."""
        from .activations import saturation
        return saturation(self, delta, steps=steps, sites=sites, per_unit=per_unit, by_rank=by_rank)

    def dimension_variance(self, layer: Any, dim: int = 1, steps=None) -> pd.DataFrame:
        """Variance across ``dim`` of a site's raw samples, per recorded step."""
        from .activations import dimension_variance
        return dimension_variance(self, layer, dim=dim, steps=steps)

    def similarity(self, layer: Any, dim: int = 1, method: str = "cosine", steps=None) -> pd.DataFrame:
        """Mean pairwise similarity between slices along ``dim``, per recorded step."""
        from .activations import similarity
        return similarity(self, layer, dim=dim, method=method, steps=steps)

    def pruning_plan(self, criterion: str, threshold: float, layers: Any = None, steps=None,
                     max_active_fraction: float = 0.0) -> dict:
        """A versioned pruning plan (see :func:`analyzer.pruning.pruning_plan`)."""
        from .pruning import pruning_plan
        return pruning_plan(self, criterion, threshold, layers=layers, steps=steps,
                            max_active_fraction=max_active_fraction)

    def pruning_sweep(self, criterion: str, thresholds=None, layers: Any = None, steps=None,
                      max_active_fraction: float = 0.0) -> pd.DataFrame:
        """Sparsity versus threshold per layer and overall (see :func:`analyzer.pruning.sweep`)."""
        from .pruning import sweep
        return sweep(self, criterion, thresholds, layers=layers, steps=steps,
                     max_active_fraction=max_active_fraction)

    # ------------------------------------------------------------------ attention captures (see analyzer.attention_iou)
    @property
    def captures(self) -> pd.DataFrame:
        """Attention captures: position, index, step, epoch, n_images, target_layer, targets, masks, groups."""
        caps = self.catalog.captures()
        return pd.DataFrame({"position": range(len(caps)), "index": [c.index for c in caps],
                             "step": [c.step for c in caps], "epoch": [c.epoch for c in caps],
                             "n_images": [c.n for c in caps], "target_layer": [c.target_layer for c in caps],
                             "targets": [",".join(t["name"] for t in c.targets) for c in caps],
                             "masks": [",".join(c.mask_names.values()) for c in caps],
                             "groups": [",".join(c.group_names) for c in caps]})

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
        from .captures import pick
        return attention_maps(pick(self.catalog.captures(), capture, self.path), target, method, size)

    def attention_iou(self, target: str, mask_group: str | None = None, protected: str | None = None,
                      method: str = "gradcam", bootstrap: int = 10000, seed: int = 0, resolution: str = "image",
                      capture: Any = -1, scores=("iou",), by: Any = "all") -> pd.DataFrame:
        """Attention-IoU mask score (``mask_group``) or heatmap score (``protected``) with bootstrap, per
        split (all / correct / incorrect / group labels); ``capture="all"`` scores every capture (over time).
        See :func:`analyzer.attention_iou.attention_iou` for the columns."""
        from .attention_iou import attention_iou
        from .captures import pick
        caps = self.catalog.captures() if capture == "all" else [pick(self.catalog.captures(), capture, self.path)]
        if not caps:
            pick(caps, -1, self.path)
        return pd.concat([attention_iou(c, target, mask_group, protected, method, resolution, scores, bootstrap,
                                        seed, by) for c in caps], ignore_index=True)

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

    # ------------------------------------------------------------------ selection
    def select(self, layers: Any = None) -> list[int]:
        """Layer ids for a specification (ids, names, globs, type names; see format.select_layers)."""
        return self.catalog.select(layers)

    def layer(self, spec: Any) -> dict:
        """The layer record for one id or name."""
        return self.catalog.layer(spec)

    # ------------------------------------------------------------------ streaming core
    def _iter_blocks(self, kind: str, keys: set) -> Iterator[tuple[Shard, str, str, np.ndarray, np.ndarray]]:
        """Yield (shard, layer_key, param_key, steps (k,), values (k, *shape)) for every payload of
        ``kind`` whose (layer_key, param_key) is in ``keys``, shard by shard in step order, in
        chunk-aligned blocks of at most about BLOCK_BYTES."""
        shards = self.catalog.shards_with(kind, keys)
        with self.progress(f"reading {kind}", len(shards)) as bar:
            for s in shards:
                with self.catalog.open_shard(s) as r:
                    for lk, pk, steps, block in shard_blocks(r, s, kind, keys, BLOCK_BYTES):
                        yield s, lk, pk, steps, block
                bar.update(1)

    def _shard_ctx(self) -> ShardContext:
        """What a per-shard task needs (see analyzer.engine): parameter metadata and the step table."""
        st = self.steps
        meta = {(lk, pk): self.catalog.param_meta(lk, pk) for (lk, pk) in self.catalog.all_param_keys()}
        backend = None if isinstance(self.catalog.backend, HDF5Backend) else self.catalog.backend
        return ShardContext(meta, st["step"].to_numpy(), st["epoch"].to_numpy(), BLOCK_BYTES, backend)

    def _grad_pass(self, layers: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        ids, keys = self.catalog.param_keys(layers)
        ck = ("grads", tuple(ids))
        if ck in self._cache:
            return self._cache[ck]
        parts: list[dict] = []
        noise: dict[tuple, ElementwiseMoments] = {}
        noise_out: dict[tuple, float] = {}
        multi_rank = len(self.catalog.ranks_with(_GRAD_KINDS)) > 1
        shards = self.catalog.shards_with(_GRAD_KINDS, keys)
        ctx = self._shard_ctx()
        for shard, (sparts, snoise) in zip(shards, map_shards(
                self.engine, grad_shard, [(sh, keys, ctx) for sh in shards], self.progress,
                f"reading {fmt.KIND_GRADS}", self.dask_client)):
            parts += sparts
            for (lk, pk, e), acc in sorted(snoise.items(), key=lambda kv: kv[0][2]):
                key = (shard.rank, lk, pk, e)
                old = noise.get(key)
                if old is None:
                    # epochs arrive in order per (rank, param): finish older accumulators now
                    for k in [k for k in noise if k[:3] == key[:3]]:
                        noise_out[k] = noise.pop(k).compute_mean_variance()
                    noise[key] = acc
                else:
                    old.merge(acc)
        for k in list(noise):
            noise_out[k] = noise.pop(k).compute_mean_variance()
        df = _frame(parts, GRAD_STEP_COLUMNS, multi_rank)
        ep = self._epoch_table(df, noise_out, multi_rank)
        self._cache[ck] = (df, ep)
        return df, ep

    def _epoch_table(self, df: pd.DataFrame, noise: dict, multi_rank: bool) -> pd.DataFrame:
        keys = (["rank"] if multi_rank else []) + ["epoch", "layer_id", "layer", "param"]
        if not len(df):
            return pd.DataFrame({c: [] for c in keys + GRAD_EPOCH_COLUMNS[4:]})
        g = df.groupby(keys, sort=True)
        out = g.agg(n_steps=("step", "size"), mean=("mean", "mean"), abs_mean=("abs_mean", "mean"),
                    max_abs=("max_abs", "max"), var=("var", "mean"), l1=("l1", "mean"), l2=("l2", "mean"),
                    nonfinite=("nonfinite", "sum")).reset_index()
        out["l2_var"] = g["l2"].agg(lambda v: float(np.nanvar(v.to_numpy())) if v.notna().any()
                                    else np.nan).to_numpy()
        lk_of = {L["id"]: L["key"] for L in self.catalog.layers}
        pk_of = {(L["id"], self.catalog.param_name(L["key"], q["key"])): q["key"] for L in self.catalog.layers
                 for q in L["params"]}
        gn = []
        for row in out.itertuples(index=False):
            rank = row.rank if multi_rank else self.catalog.lowest_rank(_GRAD_KINDS)
            gn.append(noise.get((rank, lk_of[row.layer_id], pk_of[(row.layer_id, row.param)], int(row.epoch)),
                                np.nan))
        out["grad_noise"] = gn
        cols = (["rank"] if multi_rank else []) + GRAD_EPOCH_COLUMNS
        return _typed(out[cols], {"epoch": "int64", "layer_id": "int64", "n_steps": "int64", "nonfinite": "int64"})

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
        df, ep = self._grad_pass(layers)
        if by == "layer":
            if per != "step":
                raise ValueError("by='layer' is available with per='step'")
            return pool_params(df)
        if by != "param":
            raise ValueError(f"by must be 'param' or 'layer', not {by!r}")
        return (df if per == "step" else ep).copy()

    def weight_stats(self, layers: Any = None) -> pd.DataFrame:
        """Weight statistics per snapshot: one row per (snapshot step, layer, param) with mean, std
        (population), abs_mean, max_abs, min, max, l2 and update_ratio = ||w_t - w_prev|| / ||w_prev||
        between consecutive snapshots (NaN for the first). Weight units; update_ratio unitless."""
        ids, keys = self.catalog.param_keys(layers)
        ck = ("weights", tuple(ids))
        if ck in self._cache:
            return self._cache[ck].copy()
        parts = []
        multi_rank = len(self.catalog.ranks_with(fmt.KIND_WEIGHTS)) > 1
        shards = self.catalog.shards_with(fmt.KIND_WEIGHTS, keys)
        ctx = self._shard_ctx()
        args = [(sh, keys, ctx, pv) for sh, pv in zip(shards, previous_rows(shards, fmt.KIND_WEIGHTS, keys))]
        for sparts in map_shards(self.engine, weight_shard, args, self.progress, f"reading {fmt.KIND_WEIGHTS}",
                                 self.dask_client):
            parts += sparts
        df = _frame(parts, WEIGHT_COLUMNS, multi_rank)
        self._cache[ck] = df
        return df.copy()

    def weight_histograms(self, layer: Any, bins: int = 64, param: str | None = None) -> WeightHistograms:
        """Histogram of one parameter's weights at every snapshot, on edges common to all snapshots
        (linear from the smallest to the largest finite weight ever recorded).

        Args:
            layer: id or dotted name of one layer.
            bins: number of bins (>= 1).
            param: parameter name; default "weight" if the layer has one, else its first parameter.
        """
        if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 100_000:
            raise ValueError(f"bins must be an int in [1, 100000], not {bins!r}")
        L = self.layer(layer)
        names = [q["name"] for q in L["params"]]
        if param is None:
            param = "weight" if "weight" in names else names[0]
        if param not in names:
            raise TraceError(f"layer {L['name']!r} has no parameter {param!r} (has {', '.join(names)})")
        pk = next(q["key"] for q in L["params"] if q["name"] == param)
        cached = self._cache.get(("weights", tuple(self.select(None))))
        ws = cached if cached is not None else self.weight_stats(L["id"])
        ws = ws[ws["layer_id"] == L["id"]]
        ws = ws[ws["param"] == param]
        rank = self.catalog.lowest_rank()
        if not len(ws):
            return WeightHistograms(L["name"], param, np.zeros(0, np.int64), np.linspace(0, 1, bins + 1),
                                    np.zeros((0, bins), np.int64))
        lo, hi = np.nanmin(ws["min"].to_numpy()), np.nanmax(ws["max"].to_numpy())
        if not np.isfinite(lo) or not np.isfinite(hi):
            lo, hi = 0.0, 1.0
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        steps_out, counts = [], []
        for shard, lk, pk2, steps, block in self._iter_blocks(fmt.KIND_WEIGHTS, {(L["key"], pk)}):
            if shard.rank != rank:
                continue
            flat = block.reshape(len(steps), -1).astype(np.float64)
            for i in range(len(steps)):
                x = flat[i][np.isfinite(flat[i])]
                counts.append(np.histogram(x, bins=edges)[0].astype(np.int64))
                steps_out.append(int(steps[i]))
        order = np.argsort(steps_out, kind="stable")
        return WeightHistograms(L["name"], param, np.asarray(steps_out, np.int64)[order], edges,
                                np.asarray(counts, np.int64).reshape(-1, bins)[order])


def pool_params(df: pd.DataFrame) -> pd.DataFrame:
    """Pool per-parameter gradient rows into per-layer rows (same step): counts and sums add,
    l2 = sqrt(sum l2^2), max_abs = max, mean and var pooled exactly from the parts' moments."""
    if not len(df):
        return df.iloc[:0].drop(columns=["param"]).copy()
    keys = [c for c in ("rank", "step", "epoch", "layer_id", "layer") if c in df.columns]
    d = df.copy()
    d["_s"] = d["mean"].fillna(0) * d["count"]
    d["_q"] = (d["var"].fillna(0) + d["mean"].fillna(0) ** 2) * d["count"]
    d["_l2sq"] = d["l2"].fillna(0) ** 2
    g = d.groupby(keys, sort=True)
    out = g.agg(numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"),
                _s=("_s", "sum"), _q=("_q", "sum"), max_abs=("max_abs", "max"), l1=("l1", "sum"),
                _l2sq=("_l2sq", "sum")).reset_index()
    n = out["count"].where(out["count"] > 0)
    out["mean"] = out["_s"] / n
    out["abs_mean"] = out["l1"] / n
    out["var"] = (out["_q"] / n - out["mean"] ** 2).clip(lower=0)
    out["l2"] = np.sqrt(out["_l2sq"])
    cols = keys + ["numel", "count", "nonfinite", "mean", "abs_mean", "max_abs", "var", "l1", "l2"]
    return out[cols]


def _frame(parts: list[dict], columns: list[str], multi_rank: bool) -> pd.DataFrame:
    """One DataFrame from per-block column dicts (scalars broadcast), typed and sorted by
    (rank,) step, layer_id, param."""
    cols = columns + (["rank"] if multi_rank else [])
    if parts:
        df = pd.DataFrame({c: np.concatenate([np.broadcast_to(np.asarray(p[c]), len(p["step"]))
                                              for p in parts]) for c in cols})
    else:
        df = pd.DataFrame({c: [] for c in cols})
    df = _typed(df, {"step": "int64", "epoch": "int64", "layer_id": "int64", "numel": "int64",
                     "count": "int64", "nonfinite": "int64", "rank": "int64"})
    order = (["rank"] if multi_rank else []) + ["step", "layer_id", "param"]
    return df.sort_values(order, kind="stable").reset_index(drop=True)


def _typed(df: pd.DataFrame, types: dict) -> pd.DataFrame:
    for c, t in types.items():
        if c in df.columns:
            df[c] = df[c].astype(t)
    return df
