"""Opening a run directory and computing statistics from it, out of core, without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from . import format as fmt
from .engine import ShardContext, check_engine, grad_shard, map_shards, previous_rows, shard_blocks, weight_shard
from .format import TraceError
from .stats import ElementwiseMoments
from .storage import HDF5Backend, ReaderPool, ShardReader

#: Bytes of stored data read per block (rows are chunk-aligned); bounds the memory of every pass.
BLOCK_BYTES = 32 << 20
#: shard readers a Run keeps open between analyses (each holds one open file and its metadata)
READERS_KEPT = 8
#: Payload kinds the gradient statistics are read from: per-step statistics, or raw tensors.
_GRAD_KINDS = (fmt.KIND_GRAD_STATS, fmt.KIND_GRADS)

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
class _Shard:
    rank: int
    index: int
    path: str
    name: str                      # relative, for messages
    steps: dict                    # step table columns
    payloads: dict                 # (kind, lk, pk) -> (rows, shape, chunk_rows)
    nbytes: int


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
        self.path = os.path.abspath(os.fspath(path))
        self.progress = progress or null_progress
        self._backend = backend or HDF5Backend()
        #: shard readers, kept open between analyses only inside :meth:`keep_open` (closed shards
        #: never change); outside it every analysis closes the files it opened before it returns
        self._readers = ReaderPool(self._backend.open, keep=0)
        self._keep_depth = 0
        p = self.path
        if not os.path.exists(p):
            raise TraceError(f"no such run directory: {p}")
        if not os.path.isdir(p):
            raise TraceError(f"not a directory: {p}")
        try:
            entries = os.listdir(p)
        except OSError as e:
            raise TraceError(f"cannot list {p}: {e.strerror}") from None
        if not entries:
            raise TraceError(f"empty directory, not a bbdecoder run: {p}")
        if fmt.MANIFEST not in entries:
            raise TraceError(f"not a bbdecoder run (no {fmt.MANIFEST}): {p}")
        self.manifest = fmt.validate_manifest(fmt.read_json(os.path.join(p, fmt.MANIFEST), "manifest"),
                                              fmt.MANIFEST)
        self._table = [dict(L) for L in self.manifest["layers"]]
        self._by_key = {L["key"]: L for L in self._table}
        self._param_shape = {(L["key"], q["key"]): tuple(q["shape"]) for L in self._table for q in L["params"]}
        self._param_name = {(L["key"], q["key"]): q["name"] for L in self._table for q in L["params"]}
        self._sites = [dict(S) for S in self.manifest.get("sites", [])]
        self._site_by_key = {S["key"]: S for S in self._sites}
        self._expected: dict[tuple, tuple] = {}
        for (lk, pk), shp in self._param_shape.items():
            self._expected[(fmt.KIND_GRADS, lk, pk)] = shp
            self._expected[(fmt.KIND_GRAD_STATS, lk, pk)] = (len(fmt.GRAD_STAT_FIELDS),)
            self._expected[(fmt.KIND_WEIGHTS, lk, pk)] = shp
        for S in self._sites:
            for stat, shp in S["stats"].items():
                self._expected[(fmt.KIND_ACT_STATS, S["key"], stat)] = tuple(shp)
            self._expected[(fmt.KIND_ACTIVATIONS, S["key"], "samples")] = tuple(S["sample_shape"])
        self.problems: list[str] = []
        self.rank_states: dict[int, dict] = {}
        self._site_conflicts: set[tuple[int, str]] = set()   # (rank, site key) named differently there
        self._shards: list[_Shard] = []
        self._live: list[str] = []
        self._scan()
        self._cache: dict = {}

    # ------------------------------------------------------------------ index
    def _scan(self) -> None:
        ranks = list(fmt.iter_rank_dirs(self.path))
        for rank, rdir in ranks:
            rfile = os.path.join(rdir, fmt.RANK_FILE)
            if os.path.exists(rfile):
                st = fmt.read_json(rfile, f"rank file {fmt.rank_dirname(rank)}/{fmt.RANK_FILE}")
                fmt.validate_rank_state(st, f"{fmt.rank_dirname(rank)}/{fmt.RANK_FILE}")
                self.rank_states[rank] = st
                self._add_rank_sites(rank, st)
            else:
                self.rank_states[rank] = {"status": fmt.STATUS_RECORDING}
                self.problems.append(f"{fmt.rank_dirname(rank)} has no {fmt.RANK_FILE}")
            closed, live = fmt.list_shards(rdir)
            self._live += [f"{fmt.rank_dirname(rank)}/{n}" for n in live]
            for idx, spath in closed:
                name = f"{fmt.rank_dirname(rank)}/{os.path.basename(spath)}"
                with self._open_shard(spath, name) as r:
                    steps = r.steps()
                    payloads = {}
                    for kind in fmt.PAYLOAD_KINDS:
                        for lk, pk in r.payloads(kind):
                            rows, shape, chunk = r.payload_info(kind, lk, pk)
                            want = self._expected.get((kind, lk, pk))
                            if (rank, lk) in self._site_conflicts and kind in (fmt.KIND_ACT_STATS,
                                                                               fmt.KIND_ACTIVATIONS):
                                continue
                            if want is None:
                                self.problems.append(f"{name}: {kind} for unknown parameter {lk}/{pk} ignored")
                                continue
                            if tuple(shape) != want:
                                raise TraceError(f"corrupt shard {name}: {kind}/{lk}/{pk} has shape "
                                                 f"{tuple(shape)} but the manifest says {want}")
                            payloads[(kind, lk, pk)] = (rows, shape, chunk)
                try:
                    nbytes = os.path.getsize(spath)
                except OSError:
                    nbytes = 0
                self._shards.append(_Shard(rank, idx, spath, name, steps, payloads, nbytes))
        if not ranks:
            self.problems.append("no rank directory: nothing was recorded")

    def _add_rank_sites(self, rank: int, st: dict) -> None:
        """Activation sites that a rank other than 0 found and rank 0 did not (rank.json "sites";
        torch.distributed with activation_ranks without 0, or data-dependent control flow)."""
        sites = st.get("sites") if isinstance(st, dict) else None
        if not sites:
            return
        where = f"{fmt.rank_dirname(rank)}/{fmt.RANK_FILE}"
        fmt.validate_manifest({"format": fmt.FORMAT_NAME, "format_version": st.get("format_version"),
                               "layers": [], "sites": sites}, where)   # the manifest's checks of sites
        for S in sites:
            old = self._site_by_key.get(S["key"])
            if old is None:
                S = dict(S)
                self._sites.append(S)
                self._site_by_key[S["key"]] = S
                for stat, shp in S["stats"].items():
                    self._expected[(fmt.KIND_ACT_STATS, S["key"], stat)] = tuple(shp)
                self._expected[(fmt.KIND_ACTIVATIONS, S["key"], "samples")] = tuple(S["sample_shape"])
            elif old["name"] != S["name"]:
                self._site_conflicts.add((rank, S["key"]))
                self.problems.append(f"{where}: site key {S['key']!r} is {S['name']!r} there but "
                                     f"{old['name']!r} in the manifest; that rank's values of it are ignored")

    def _open_shard(self, path: str, name: str) -> ShardReader:
        """A reader of one closed shard, from the pool of open readers (use it in a ``with`` block)."""
        return self._readers.borrow(path, name)

    def close(self) -> None:
        """Close the shard files this run keeps open (idempotent; the run can still be used: files
        are reopened on demand)."""
        self._readers.close()

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
        self._keep_depth += 1
        self._readers.keep = READERS_KEPT
        return self

    def __exit__(self, *exc) -> None:
        self._keep_depth -= 1
        if self._keep_depth <= 0:
            self._keep_depth = 0
            self._readers.keep = 0
            self._readers.close()

    # ------------------------------------------------------------------ descriptive properties
    @property
    def status(self) -> str:
        """"complete" if the recorder closed cleanly on every rank, else "incomplete"."""
        ok = (self.manifest.get("status") == fmt.STATUS_COMPLETE and self.rank_states
              and all(s.get("status") == fmt.STATUS_COMPLETE for s in self.rank_states.values())
              and not self._live and not self._missing_ranks())
        return "complete" if ok else "incomplete"

    @property
    def status_reason(self) -> str:
        """Why a run is incomplete (empty for a complete run)."""
        if self.status == "complete":
            return ""
        why = []
        m = self.manifest.get("status")
        if m == fmt.STATUS_RECORDING:
            why.append("the recorder did not close (still recording, or the process was killed)")
        elif m == fmt.STATUS_ABORTED:
            why.append("the training code raised an exception inside the recorder")
        elif m == fmt.STATUS_FAILED:
            why.append(f"the recorder failed: {self.manifest.get('error', 'see errors')}")
        for r, s in sorted(self.rank_states.items()):
            if s.get("status") == fmt.STATUS_FAILED:
                errs = s.get("errors") or ["unknown error"]
                why.append(f"rank {r} failed: {errs[-1]}")
        missing = self._missing_ranks()
        if missing:
            why.append(f"rank(s) {', '.join(map(str, missing[:8]))} of {self.manifest.get('world_size', 1)} "
                       "wrote nothing")
        if self._live:
            why.append(f"{len(self._live)} unfinished shard(s) ignored ({', '.join(self._live[:3])})")
        return "; ".join(dict.fromkeys(why)) or "incomplete"

    def _missing_ranks(self) -> list[int]:
        ws = int(self.manifest.get("world_size", 1))
        return [r for r in range(ws) if r not in self.rank_states]

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_states)

    def rank_table(self) -> pd.DataFrame:
        """One row per rank directory: rank, status (from its rank.json), shards (closed), live
        (unfinished shards), steps (rows of its step tables), first_step, last_step (NaN if none),
        bytes (closed shards, bytes), grads, weights, activations (whether its shards hold any)."""
        rows = []
        for r in self.ranks:
            sh = [s for s in self._shards if s.rank == r]
            st = np.concatenate([np.asarray(s.steps["step"], np.int64) for s in sh]) if sh else np.zeros(0, np.int64)
            kinds = {k[0] for s in sh for k, v in s.payloads.items() if v[0]}
            rows.append({"rank": r, "status": str(self.rank_states[r].get("status", "unknown")), "shards": len(sh),
                         "live": sum(n.startswith(fmt.rank_dirname(r) + "/") for n in self._live),
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
        return int(sum(s.nbytes for s in self._shards))

    @property
    def layers(self) -> pd.DataFrame:
        """Layer table: id, name, type, n_params (plus key and whether it was selected for recording)."""
        return pd.DataFrame({
            "id": [L["id"] for L in self._table], "name": [L["name"] for L in self._table],
            "type": [L["type"] for L in self._table],
            "n_params": [int(L.get("n_params", sum(int(np.prod(q["shape"])) for q in L["params"])))
                         for L in self._table],
            "key": [L["key"] for L in self._table],
            "selected": [bool(L.get("selected", True)) for L in self._table],
        })

    @property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step: step, epoch, loss, time (s since the first step), wall (unix s),
        dropped (payloads dropped at that step because the writer queue was full)."""
        if "steps" not in self._cache:
            rank = self._step_rank()
            cols = {c: [] for c in fmt.STEP_COLUMNS}
            for s in self._shards:
                if s.rank == rank:
                    for c in fmt.STEP_COLUMNS:
                        cols[c].append(s.steps[c])
            data = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in cols.items()}
            df = pd.DataFrame({"step": data["step"].astype(np.int64), "epoch": data["epoch"].astype(np.int64),
                               "loss": data["loss"].astype(np.float64), "wall": data["time"].astype(np.float64),
                               "dropped": data["dropped"].astype(np.int64)})
            df = df.sort_values("step", kind="stable").drop_duplicates("step").reset_index(drop=True)
            t0 = df["wall"].iloc[0] if len(df) else 0.0
            df.insert(3, "time", df["wall"] - t0)
            self._cache["steps"] = df
        return self._cache["steps"].copy()

    def _step_rank(self) -> int:
        rs = sorted({s.rank for s in self._shards})
        return rs[0] if rs else 0

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
            for s in self._shards:
                for (k, lk, pk), (n, _, _) in s.payloads.items():
                    if k == kind and n:
                        rows += n
                        layers.add(lk)
            # distinct steps: the union of the step indices of every payload (a parameter without a
            # gradient at some steps has fewer); the indices are small, the values are not read
            for s in self._shards:
                keys = [key for key in s.payloads if key[0] == kind]
                if keys:
                    with self._open_shard(s.path, s.name) as r:
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
            "layers": len(self._table), "ranks": self.ranks, "world_size": m.get("world_size", 1),
            "shards": len(self._shards), "bytes": self.nbytes, "recorded": self.recorded(),
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
    def _captures(self) -> list:
        from .captures import open_captures
        if "captures" not in self._cache:
            self._cache["captures"] = open_captures(self.path)
        return self._cache["captures"]

    @property
    def captures(self) -> pd.DataFrame:
        """Attention captures: position, index, step, epoch, n_images, target_layer, targets, masks, groups."""
        caps = self._captures()
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
        return attention_maps(pick(self._captures(), capture, self.path), target, method, size)

    def attention_iou(self, target: str, mask_group: str | None = None, protected: str | None = None,
                      method: str = "gradcam", bootstrap: int = 10000, seed: int = 0, resolution: str = "image",
                      capture: Any = -1, scores=("iou",), by: Any = "all") -> pd.DataFrame:
        """Attention-IoU mask score (``mask_group``) or heatmap score (``protected``) with bootstrap, per
        split (all / correct / incorrect / group labels); ``capture="all"`` scores every capture (over time).
        See :func:`analyzer.attention_iou.attention_iou` for the columns."""
        from .attention_iou import attention_iou
        from .captures import pick
        caps = self._captures() if capture == "all" else [pick(self._captures(), capture, self.path)]
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
        return fmt.select_layers(layers, self._table)

    def layer(self, spec: Any) -> dict:
        """The layer record for one id or name."""
        ids = self.select(spec)
        if len(ids) != 1:
            raise TraceError(f"{spec!r} selects {len(ids)} layers; name exactly one")
        return next(L for L in self._table if L["id"] == ids[0])

    # ------------------------------------------------------------------ streaming core
    def _epoch_of(self, steps: np.ndarray) -> np.ndarray:
        st = self.steps
        s, e = st["step"].to_numpy(), st["epoch"].to_numpy()
        if not len(s):
            return np.full(len(steps), -1, np.int64)
        i = np.clip(np.searchsorted(s, steps), 0, len(s) - 1)
        return np.where(s[i] == steps, e[i], -1)

    def _iter_blocks(self, kind: str, keys: set) -> Iterator[tuple[_Shard, str, str, np.ndarray, np.ndarray]]:
        """Yield (shard, layer_key, param_key, steps (k,), values (k, *shape)) for every payload of
        ``kind`` whose (layer_key, param_key) is in ``keys``, shard by shard in step order, in
        chunk-aligned blocks of at most about BLOCK_BYTES."""
        shards = [s for s in self._shards if any(k[0] == kind and (k[1], k[2]) in keys for k in s.payloads)]
        shards.sort(key=lambda s: (s.rank, s.index))
        with self.progress(f"reading {kind}", len(shards)) as bar:
            for s in shards:
                with self._open_shard(s.path, s.name) as r:
                    for lk, pk, steps, block in shard_blocks(r, s, kind, keys, BLOCK_BYTES):
                        yield s, lk, pk, steps, block
                bar.update(1)

    def _shards_with(self, kind: str | tuple, keys: set) -> list[_Shard]:
        """Shards holding a payload of ``kind`` (or of one of a tuple of kinds) for one of ``keys``,
        by (rank, index)."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        shards = [s for s in self._shards if any(k[0] in kinds and (k[1], k[2]) in keys for k in s.payloads)]
        return sorted(shards, key=lambda s: (s.rank, s.index))

    def _shard_ctx(self) -> ShardContext:
        """What a per-shard task needs (see analyzer.engine): parameter metadata and the step table."""
        st = self.steps
        meta = {(lk, pk): self._meta(lk, pk) for (lk, pk) in self._param_shape}
        backend = None if isinstance(self._backend, HDF5Backend) else self._backend
        return ShardContext(meta, st["step"].to_numpy(), st["epoch"].to_numpy(), BLOCK_BYTES, backend)

    def _keys_for(self, layers: Any) -> tuple[list[int], set]:
        ids = self.select(layers)
        idset = set(ids)
        keys = {(L["key"], q["key"]) for L in self._table if L["id"] in idset for q in L["params"]}
        return ids, keys

    def _meta(self, lk: str, pk: str) -> tuple[int, str, str, int]:
        L = self._by_key[lk]
        shape = self._param_shape[(lk, pk)]
        return L["id"], L["name"], self._param_name[(lk, pk)], int(np.prod(shape, dtype=np.int64))

    def _grad_pass(self, layers: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        ids, keys = self._keys_for(layers)
        ck = ("grads", tuple(ids))
        if ck in self._cache:
            return self._cache[ck]
        parts: list[dict] = []
        noise: dict[tuple, ElementwiseMoments] = {}
        noise_out: dict[tuple, float] = {}
        multi_rank = len({s.rank for s in self._shards if any(k[0] in _GRAD_KINDS for k in s.payloads)}) > 1
        shards = self._shards_with(_GRAD_KINDS, keys)
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
        lk_of = {L["id"]: L["key"] for L in self._table}
        pk_of = {(L["id"], self._param_name[(L["key"], q["key"])]): q["key"] for L in self._table
                 for q in L["params"]}
        gn = []
        for row in out.itertuples(index=False):
            rank = row.rank if multi_rank else self._grad_rank()
            gn.append(noise.get((rank, lk_of[row.layer_id], pk_of[(row.layer_id, row.param)], int(row.epoch)),
                                np.nan))
        out["grad_noise"] = gn
        cols = (["rank"] if multi_rank else []) + GRAD_EPOCH_COLUMNS
        return _typed(out[cols], {"epoch": "int64", "layer_id": "int64", "n_steps": "int64", "nonfinite": "int64"})

    def _grad_rank(self) -> int:
        rs = sorted({s.rank for s in self._shards if any(k[0] in _GRAD_KINDS for k in s.payloads)})
        return rs[0] if rs else 0

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
        ids, keys = self._keys_for(layers)
        ck = ("weights", tuple(ids))
        if ck in self._cache:
            return self._cache[ck].copy()
        parts = []
        multi_rank = len({s.rank for s in self._shards if any(k[0] == fmt.KIND_WEIGHTS for k in s.payloads)}) > 1
        shards = self._shards_with(fmt.KIND_WEIGHTS, keys)
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
        rank = self._step_rank()
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
