"""Weight statistics of a run: per-snapshot moments and update ratios, and histograms on common
edges. Torch-free; reads the run only through its :class:`~analyzer.catalog.Catalog`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from .catalog import Catalog
from .engine import iter_blocks, map_shards, part_frame, previous_rows, shard_context, split_pass, weight_shard
from .progress import null_progress
from .slices import merge_row_moments
from .trace import format as fmt
from .trace.format import TraceError

WEIGHT_COLUMNS = ["step", "epoch", "layer_id", "layer", "param", "numel", "mean", "std", "abs_mean",
                  "max_abs", "min", "max", "l2", "update_ratio", "nonfinite"]


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


def weight_stats(catalog: Catalog, keys: set, engine: str, progress: Callable, client=None) -> pd.DataFrame:
    """One pass over the weight snapshots of ``keys`` ((layer_key, param_key) pairs): the table of
    ``Run.weight_stats`` (see there for the columns).

    Args:
        catalog: the run's catalogue. engine: "local" or "dask" (see :mod:`analyzer.engine`).
        progress: progress factory (see :mod:`analyzer.progress`). client: dask client or None.
    """
    multi_rank = len(catalog.ranks_with(fmt.KIND_WEIGHTS, set(keys) - catalog.sharded)) > 1
    ctx = shard_context(catalog)

    def part(group, first):   # groups of parameters on the CPUs available; the first shows progress
        return _weight_parts(catalog, group, ctx, engine, progress if first else null_progress, client)

    parts = [p for g in split_pass(catalog, (fmt.KIND_WEIGHTS,), set(keys), part, engine) for p in g]
    return part_frame(parts, WEIGHT_COLUMNS, multi_rank)


def _weight_parts(catalog: Catalog, keys: set, ctx, engine: str, progress: Callable, client=None) -> list[dict]:
    """The per-snapshot parts of the weight pass over ``keys`` (see :func:`weight_stats`)."""
    parts = []
    sums: dict[tuple, list] = {}
    # sharded parameters (FSDP2): the ranks' slices merged into one row per snapshot
    shards = catalog.shards_with(fmt.KIND_WEIGHTS, keys)
    args = [(sh, keys, ctx, pv) for sh, pv in zip(shards, previous_rows(shards, fmt.KIND_WEIGHTS, keys))]
    for sparts, ssums in map_shards(engine, weight_shard, args, progress, f"reading {fmt.KIND_WEIGHTS}", client):
        parts += sparts
        for lk, pk, *rest in ssums:
            sums.setdefault((lk, pk), []).append(rest)
    for (lk, pk), items in sums.items():
        lid, lname, pname, numel = ctx.meta[(lk, pk)]
        steps, rm, num, den = merge_row_moments(items, numel)
        st = rm.compute()
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(den > 0, np.sqrt(num) / np.sqrt(den), np.nan)
        parts.append({"step": steps, "epoch": ctx.epoch_of(steps), "layer_id": lid, "layer": lname, "param": pname,
                      "numel": numel, **{c: st[c] for c in ("mean", "std", "abs_mean", "max_abs", "min", "max",
                                                             "l2", "nonfinite")},
                      "update_ratio": ratio, "rank": catalog.lowest_rank(fmt.KIND_WEIGHTS)})
    return parts


def weight_histograms(catalog: Catalog, layer: Any, bins: int, param: str | None,
                      stats_of: Callable[[int], pd.DataFrame], progress: Callable) -> WeightHistograms:
    """The histograms of ``Run.weight_histograms`` (see there).

    Args:
        stats_of: layer id -> a weight statistics table that holds that layer's rows (the edges span
            its min and max columns).
        progress: progress factory for the read of the snapshots.
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 100_000:
        raise ValueError(f"bins must be an int in [1, 100000], not {bins!r}")
    L = catalog.layer(layer)
    names = [q["name"] for q in L["params"]]
    if param is None:
        param = "weight" if "weight" in names else names[0]
    if param not in names:
        raise TraceError(f"layer {L['name']!r} has no parameter {param!r} (has {', '.join(names)})")
    pk = next(q["key"] for q in L["params"] if q["name"] == param)
    ws = stats_of(L["id"])
    ws = ws[ws["layer_id"] == L["id"]]
    ws = ws[ws["param"] == param]
    rank = catalog.lowest_rank()
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
    sharded = (L["key"], pk) in catalog.sharded    # the ranks' slices: their counts add per step
    per_step: dict[int, list] = {}                 # sharded: step -> [counts, elements seen]
    for shard, lk, pk2, steps, block in iter_blocks(catalog, fmt.KIND_WEIGHTS, {(L["key"], pk)}, progress):
        if shard.rank != rank and not sharded:
            continue
        flat = block.reshape(len(steps), -1)
        for i in range(len(steps)):
            # uniform bins: numpy's linear path, which corrects each index against np.linspace edges
            # (the same edges): the counts of bins=edges, without sorting the values; NaN and +-inf
            # fall outside the (finite) range and are not counted, as before without a copy of the finite
            c = np.histogram(flat[i], bins=bins, range=(edges[0], edges[-1]))[0].astype(np.int64)
            if sharded:
                acc = per_step.setdefault(int(steps[i]), [0, 0])
                acc[0] = acc[0] + c
                acc[1] += flat.shape[1]
            else:
                counts.append(c)
                steps_out.append(int(steps[i]))
    numel = int(np.prod(catalog.param_shape(L["key"], pk), dtype=np.int64))
    for s, (c, seen) in per_step.items():
        if seen == numel:    # every slice of that snapshot was read
            counts.append(c)
            steps_out.append(s)
    order = np.argsort(steps_out, kind="stable")
    return WeightHistograms(L["name"], param, np.asarray(steps_out, np.int64)[order], edges,
                            np.asarray(counts, np.int64).reshape(-1, bins)[order])
