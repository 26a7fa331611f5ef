"""Pruning plans from a recorded run (torch-free).

A *plan* is a versioned JSON document that says which weights of a model to mask: per layer the
output units to remove (in the original index space) together with the matching input units of the
layer that consumes them, or (unstructured) a magnitude threshold. It is computed at analysis time
from the trace, at any threshold, and applied to a torch model with :func:`recorder.prune.apply_plan`.

Criteria:
    dead        units of activation sites that are strictly dead (never above ``threshold``, or active at
                most ``max_active_fraction`` of the time at threshold 0): see :func:`analyzer.activations.dead_units`.
    dormant     tau-dormant units (E|h_i| / mean_k E|h_k| <= threshold, Sokar et al. 2023).
    magnitude   unstructured: every weight with |w| <= threshold in the last recorded weight snapshot.
    l1-channel  output channels (axis 0 of the weight) whose L1 norm in the last snapshot is <= threshold.

From activation sites to layers (dead, dormant), using the execution order of the first training
forward that the recorder stores in the manifest (``forward_order``):
    * an activation site (ReLU, sigmoid, ... module or functional call) belongs to the nearest layer
      event before it whose output has as many units as the site (conv-style outputs: ``out_shape[0]``;
      linear-style: ``out_shape[-1]``). When that layer is a per-channel normalisation (BatchNorm,
      InstanceNorm) preceded by a layer with the same units, the earlier layer is the producer and the
      normalisation a dependent (its weight and bias rows are masked too): masking conv rows alone
      would leave the normalisation's bias flowing on.
    * a plain output site (kind "output") of a parameterized module belongs to that module; it judges the
      layer only when no activation site belongs to it.
    * the consumer ("next") is the nearest later layer event whose input carries those units on its unit
      axis: a conv/linear whose weight has them on axis 1 (``group`` 1), or a Linear after a flatten of a
      conv-style output with ``in_features == units * k`` (each unit is ``k`` consecutive input features:
      ``group`` k). Per-channel normalisations on the way are dependents; anything else means no consumer.
    * when several sites belong to one layer a unit is removed only if every site finds it dead.
    * a layer that runs several times per forward is pruned only if every call's output reaches a
      recorded activation, and is never a consumer (its other calls take other inputs).
    * the model's final layer (the last layer event: its outputs are the model's outputs) is not a
      producer unless ``layers`` selects it.
Plan entries: ``next`` lists the dependents of the removed units: ``axis`` 1 entries are consumers
(weight columns; ``group`` k), ``axis`` 0 entries are per-channel normalisations (weight and bias rows).
The mapping reads a chain; models with branches (residual additions, concatenations) can defeat it,
which is why a plan is a reviewable file and apply_plan checks the model's fingerprint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np
import pandas as pd

from .trace import files
from .trace import format as fmt
from .trace.format import TraceError

PLAN_FORMAT = "bbdecoder-pruning-plan"
PLAN_VERSION = 1
SUPPORTED_PLAN_VERSIONS = (1,)
CRITERIA = ("dead", "dormant", "magnitude", "l1-channel")
STRUCTURED = ("dead", "dormant", "l1-channel")

#: layer types whose unit axis is the last one (mirrors recorder.activations.LINEAR_STYLE)
LINEAR_STYLE = ("Linear", "LazyLinear", "Bilinear", "LayerNorm", "Embedding", "MultiheadAttention",
                "NonDynamicallyQuantizableLinear", "RMSNorm")
#: layer types whose weight axis 0 is not the output units (or whose units are not channels)
NOT_ROW_LAYERS = ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LazyConvTranspose1d",
                  "LazyConvTranspose2d", "LazyConvTranspose3d", "Embedding", "EmbeddingBag",
                  "MultiheadAttention")
#: normalisations with per-channel statistics: masking a channel's weight and bias zeroes its output
PER_CHANNEL_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                     "LazyBatchNorm2d", "LazyBatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                     "InstanceNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d")
OVERALL = "(overall)"
SWEEP_COLUMNS = ["criterion", "threshold", "layer_id", "layer", "units_removed", "units", "masked",
                 "weights", "sparsity"]


class PlanError(ValueError):
    """A pruning plan is malformed, of an unsupported version, or does not fit its model."""


# =============================================================================== fingerprint

def param_list(run) -> list[list]:
    """``[[full parameter name, shape], ...]`` of a recorded model, in the recorder's layer order."""
    out = []
    for L in run.catalog.layers:
        for q in L["params"]:
            out.append([f"{L['name']}.{q['name']}" if L["name"] else q["name"], [int(s) for s in q["shape"]]])
    return out


def fingerprint(params: list) -> dict:
    """A model fingerprint: the parameter list and the sha256 of its canonical JSON."""
    params = [[str(n), [int(s) for s in shp]] for n, shp in params]
    return {"params": params, "sha256": _sha(params)}


def _sha(params: list) -> str:
    text = json.dumps(params, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def fingerprint_difference(want: list, have: list) -> str | None:
    """A one-line description of the first difference between two parameter lists (None if they hold
    the same names with the same shapes; the order does not matter: pruning re-registers parameters)."""
    want = [[str(n), [int(s) for s in shp]] for n, shp in want]
    have = [[str(n), [int(s) for s in shp]] for n, shp in have]
    wd, hd = dict((n, s) for n, s in want), dict((n, s) for n, s in have)
    if wd == hd and len(wd) == len(want) and len(hd) == len(have):
        return None
    for n, s in want:
        if n not in hd:
            return f"parameter {n!r} {s} of the plan's model is missing from this model"
        if hd[n] != s:
            return f"parameter {n!r} has shape {s} in the plan's model but {hd[n]} in this model"
    for n, s in have:
        if n not in wd:
            return f"this model has a parameter {n!r} {s} that the plan's model lacks"
    return "a parameter name appears twice"


# =============================================================================== topology

def _shape(L: dict, pname: str):
    for q in L["params"]:
        if q["name"] == pname:
            return tuple(int(s) for s in q["shape"])
    return None


class _Topology:
    """Layers, their weight shapes and the forward order of one run."""

    def __init__(self, run):
        self.run = run
        self.table = {L["id"]: L for L in run.catalog.layers}
        self.weight = {i: _shape(L, "weight") for i, L in self.table.items()}
        self.bias = {i: _shape(L, "bias") for i, L in self.table.items()}
        ev = run.manifest.get("forward_order")
        self.events = [e for e in ev if isinstance(e, dict)] if isinstance(ev, list) else []
        self.layer_pos: dict[int, list[int]] = {}
        self.site_pos: dict[str, list[int]] = {}
        for j, e in enumerate(self.events):
            if e.get("event") == "layer" and e.get("id") in self.table:
                self.layer_pos.setdefault(e["id"], []).append(j)
            elif e.get("event") == "site":
                self.site_pos.setdefault(e.get("key"), []).append(j)
        lays = [e["id"] for e in self.events if e.get("event") == "layer" and e.get("id") in self.table]
        self.final_layer = lays[-1] if lays else None

    def name(self, lid: int) -> str:
        return self.table[lid]["name"]

    def type(self, lid: int) -> str:
        return self.table[lid]["type"]

    def linear_style(self, lid: int) -> bool:
        return self.type(lid) in LINEAR_STYLE

    def out_units(self, j: int) -> int | None:
        e = self.events[j]
        shp = e.get("out_shape")
        if not isinstance(shp, list) or not shp:
            return None
        return int(shp[-1]) if self.linear_style(e["id"]) else int(shp[0])

    def conv_style_out(self, j: int) -> bool:
        shp = self.events[j].get("out_shape")
        return isinstance(shp, list) and len(shp) >= 2 and not self.linear_style(self.events[j]["id"])

    def in_group(self, j: int, U: int, flat_ok: bool) -> int | None:
        """If layer event j takes the U units on its unit axis, the group size k (1, or k > 1 for a
        Linear after a flatten); else None."""
        e = self.events[j]
        shp = e.get("in_shape")
        if not isinstance(shp, list) or not shp or U <= 0:
            return None
        if self.linear_style(e["id"]):
            if int(shp[-1]) == U:
                return 1
            if flat_ok and len(shp) == 1 and int(shp[0]) % U == 0:
                return int(shp[0]) // U
            return None
        return 1 if int(shp[0]) == U else None

    def row_ok(self, lid: int, U: int) -> bool:
        w = self.weight.get(lid)
        return w is not None and len(w) >= 1 and w[0] == U and self.type(lid) not in NOT_ROW_LAYERS

    def is_norm(self, lid: int, U: int) -> bool:
        return self.type(lid) in PER_CHANNEL_NORMS and self.weight.get(lid) == (U,)

    def col_ok(self, lid: int, U: int, k: int) -> bool:
        w = self.weight.get(lid)
        return (w is not None and len(w) >= 2 and w[1] == U * k and self.type(lid) not in NOT_ROW_LAYERS
                and self.type(lid) != "Bilinear")

    def nearest_before(self, j: int, U: int) -> int | None:
        for i in range(j - 1, -1, -1):
            e = self.events[i]
            if e.get("event") == "layer" and e.get("id") in self.table and self.out_units(i) == U:
                return i
        return None

    def chain(self, j: int, U: int) -> tuple[list[tuple[int, int, int]], str | None]:
        """Dependents of the U output units of the layer event at j: [(layer id, axis, group)] and a
        note when the consumer is unclear."""
        deps: list[tuple[int, int, int]] = []
        flat_ok = self.conv_style_out(j)
        for i in range(j + 1, len(self.events)):
            e = self.events[i]
            if e.get("event") != "layer" or e.get("id") not in self.table:
                continue
            k = self.in_group(i, U, flat_ok)
            if k is None:
                continue
            lid = e["id"]
            calls = len(self.layer_pos.get(lid, []))
            if calls > 1:
                return deps, (f"{self.name(lid)!r}, which takes the {U} units of {self.name(self.events[j]['id'])!r}, "
                              f"runs {calls} times per forward; its inputs are not masked")
            if k == 1 and self.is_norm(lid, U) and self.out_units(i) == U:
                deps.append((lid, 0, 1))
                continue
            if self.col_ok(lid, U, k):
                deps.append((lid, 1, k))
                return deps, None
            return deps, (f"the layer after {self.name(self.events[j]['id'])!r} that takes its {U} units "
                          f"({self.name(lid)!r}, {self.type(lid)}) cannot have input units removed")
        return deps, None

    def producer(self, S: dict, j: int | None) -> tuple[int | None, int | None, str | None]:
        """(producer layer id, its event position, note) for one occurrence of site S at position j."""
        U = int(S["units"])
        if S.get("kind") == "output" and S.get("source", "module") == "module":
            lid = next((i for i, L in self.table.items() if L["name"] == S.get("module", S["name"])), None)
            if lid is None:
                return None, None, None  # output of a module without parameters: nothing to prune
            pos = None
            if j is not None:
                before = [p for p in self.layer_pos.get(lid, []) if p < j]
                pos = before[-1] if before else None
            if not self.row_ok(lid, U):
                return None, None, (f"site {S['name']!r}: layer {self.name(lid)!r} ({self.type(lid)}) has no "
                                    f"weight rows for its {U} units")
            return lid, pos, None
        if j is None:
            return None, None, f"site {S['name']!r} is not in the forward order"
        p = self.nearest_before(j, U)
        if p is None:
            return None, None, f"site {S['name']!r}: no earlier layer produces {U} units"
        lid = self.events[p]["id"]
        if self.is_norm(lid, U):
            q = self.nearest_before(p, U)
            if q is not None and self.row_ok(self.events[q]["id"], U):
                return self.events[q]["id"], q, None
        if not self.row_ok(lid, U):
            return None, None, (f"site {S['name']!r}: its producer {self.name(lid)!r} ({self.type(lid)}) "
                                f"has no weight rows for its {U} units")
        return lid, p, None


# =============================================================================== unit decisions

class _Structured:
    """Per producer layer: the sites that judge it and its dependents; decides units at a threshold."""

    def __init__(self, run, criterion: str, layers: Any, steps, max_active_fraction: float):
        self.run, self.criterion, self.steps, self.maf = run, criterion, steps, float(max_active_fraction)
        self.topo = _Topology(run)
        self.notes: list[str] = []
        self.selected = set(run.select(layers))
        self.named_final = layers is not None
        # producer -> {"act": [site names], "out": [site names], "deps": {(lid, axis, k)}}
        self.groups: dict[int, dict] = {}
        self.source_steps = (None, None, 0)
        if criterion == "l1-channel":
            self._l1_groups()
        else:
            self._site_groups()
        self._drop_unselected()

    # -------------------------------------------------------------- grouping
    def _group(self, lid: int) -> dict:
        return self.groups.setdefault(lid, {"act": [], "out": [], "deps": set(), "act_pos": set()})

    def _site_groups(self) -> None:
        run, topo = self.run, self.topo
        if not run.catalog.sites:
            raise TraceError("the run has no activation statistics; record with Recorder(..., activations=\"all\") "
                             "or use --criterion magnitude|l1-channel")
        if not topo.events:
            self.notes.append("the manifest has no forward_order: only plain module outputs map to layers, "
                              "and no consumers are known")
        for S in run.catalog.sites:
            U = int(S["units"])
            positions = topo.site_pos.get(S["key"]) or [None]
            found: set[int] = set()
            deps: set = set()
            pos: set = set()
            for j in positions:
                lid, p, note = topo.producer(S, j)
                if note:
                    self.notes.append(note)
                if lid is None:
                    found = set()
                    break
                found.add(lid)
                if p is not None:
                    pos.add(p)
                    d, dnote = topo.chain(p, U)
                    deps.update(d)
                    if dnote:
                        self.notes.append(dnote)
            if len(found) > 1:
                self.notes.append(f"site {S['name']!r} is produced by different layers on different calls "
                                  f"({', '.join(repr(topo.name(i)) for i in sorted(found))}); not used")
                continue
            if not found:
                continue
            g = self._group(found.pop())
            g["out" if S.get("kind") == "output" else "act"].append(S["name"])
            g["deps"].update(deps)
            if S.get("kind") != "output":
                g["act_pos"].update(pos)
        for lid, g in list(self.groups.items()):
            calls = set(topo.layer_pos.get(lid, []))
            if g["act"] and len(calls) > 1 and not calls <= g["act_pos"]:
                self.notes.append(f"layer {topo.name(lid)!r} runs {len(calls)} times per forward but only "
                                  f"{len(calls & g['act_pos'])} of its outputs reach a recorded activation; not pruned")
                del self.groups[lid]

    def _l1_groups(self) -> None:
        topo = self.topo
        if not topo.events:
            self.notes.append("the manifest has no forward_order (record with activations=... to find the "
                              "layers that consume pruned channels): no next layers")
        for lid, w in topo.weight.items():
            if w is None or len(w) < 2 or topo.type(lid) in NOT_ROW_LAYERS:
                continue
            g = self._group(lid)
            for p in topo.layer_pos.get(lid, []):
                d, note = topo.chain(p, w[0])
                g["deps"].update(d)
                if note:
                    self.notes.append(note)

    def _drop_unselected(self) -> None:
        topo = self.topo
        # a per-channel normalisation that another group masks along with its producer is no group of
        # its own unless an activation site judges it directly
        norm_deps = {d for g in self.groups.values() for d, axis, _ in g["deps"] if axis == 0}
        for lid in norm_deps:
            if lid in self.groups and not self.groups[lid]["act"]:
                del self.groups[lid]
        for lid in list(self.groups):
            g = self.groups[lid]
            members = {lid} | {d for d, axis, _ in g["deps"] if axis == 0}
            if not members & self.selected:
                del self.groups[lid]
            elif lid == topo.final_layer and not (self.named_final and lid in self.selected):
                self.notes.append(f"final layer {topo.name(lid)!r} (the model's outputs) not pruned; select it "
                                  "with layers to include it")
                del self.groups[lid]

    # -------------------------------------------------------------- scores
    def prepare(self, thresholds: list[float]) -> None:
        """Read what deciding at these thresholds needs (once)."""
        run = self.run
        if self.criterion == "l1-channel":
            ids = sorted(self.groups)
            self.l1 = {}
            snaps = _last_snapshots(run, ids, self.steps)
            for lid in ids:
                if lid not in snaps:
                    self.notes.append(f"layer {self.topo.name(lid)!r} has no weight snapshot; not pruned")
                    continue
                step, w = snaps[lid]
                self.l1[lid] = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).sum(1)
            steps = sorted({s for s, _ in snaps.values()})
            self.source_steps = (steps[0], steps[-1], len(steps)) if steps else (None, None, 0)
            if not steps:
                raise TraceError("the run has no weight snapshots of the chosen layers; record with "
                                 "Recorder(..., weights_every=N)")
            return
        from .activations import iter_site_stats, select_sites
        names = sorted({s for g in self.groups.values() for s in self._judges(g)})
        self.scores: dict[tuple, pd.DataFrame] = {}
        crit = "strict" if self.criterion == "dead" else "dormant"
        if names:
            if crit == "strict" and self.maf > 0:
                for t in thresholds:
                    self.scores[("t", float(t))] = run.dead_units(crit, float(t), self.maf, steps=self.steps,
                                                                  sites=names)
            else:
                ref = float(thresholds[0]) if thresholds else 0.0
                self.scores["score"] = run.dead_units(crit, ref, self.maf, steps=self.steps, sites=names)
        # per (score table, site): the unit-ordered score (or dead flags for a fixed threshold)
        self._by_site: dict = {}
        for key, du in self.scores.items():
            c = "score" if key == "score" else "dead"
            for site, g in du.groupby("site", sort=False):
                g = g.sort_values("unit")
                self._by_site[(key, site)] = g[c].to_numpy(np.float64 if c == "score" else bool)
        st: set = set()
        for S in (select_sites(run, names) if names else []):
            for s, _, _ in iter_site_stats(run, S, stats=("count",), steps=self.steps):
                st.update(int(x) for x in s)
        st = sorted(st)
        self.source_steps = (st[0], st[-1], len(st)) if st else (None, None, 0)

    @staticmethod
    def _judges(g: dict) -> list[str]:
        return g["act"] or g["out"]

    def units(self, lid: int, t: float) -> np.ndarray:
        """Sorted unit indices of producer ``lid`` removed at threshold t."""
        g = self.groups[lid]
        if self.criterion == "l1-channel":
            v = self.l1.get(lid)
            return np.zeros(0, np.int64) if v is None else np.flatnonzero(~(v > t))
        dead = None
        for s in self._judges(g):
            key = ("t", float(t)) if ("t", float(t)) in self.scores else "score"
            col = self._by_site.get((key, s))
            if col is None or not len(col):
                return np.zeros(0, np.int64)  # no statistics in the chosen steps
            if key == "score":
                with np.errstate(invalid="ignore"):
                    d = ~(col > t)
            else:
                d = col
            dead = d if dead is None else (dead & d)
        return np.zeros(0, np.int64) if dead is None else np.flatnonzero(dead)


# =============================================================================== weights

def _last_snapshots(run, ids, steps) -> dict[int, tuple[int, np.ndarray]]:
    """For each layer id, (step, weight array) of its last recorded "weight" snapshot within ``steps``."""
    from .activations import _steps_filter
    keep = _steps_filter(steps)
    rank = None
    ranks = sorted({s.rank for s in run.catalog.shards if any(k[0] == fmt.KIND_WEIGHTS for k in s.payloads)})
    if ranks:
        rank = ranks[0]
    out = {}
    for lid in ids:
        L = next(L for L in run.catalog.layers if L["id"] == lid)
        pk = next((q["key"] for q in L["params"] if q["name"] == "weight"), None)
        if pk is None:
            continue
        key = (fmt.KIND_WEIGHTS, L["key"], pk)
        best = None
        for sh in run.catalog.shards:
            if sh.rank != rank or key not in sh.payloads or not sh.payloads[key][0]:
                continue
            with run.catalog.open_shard(sh) as r:
                st = r.read_payload_steps(*key)
            ok = np.flatnonzero(keep(st))
            if len(ok):
                i = int(ok[np.argmax(st[ok])])
                if best is None or st[i] > best[0]:
                    best = (int(st[i]), sh, i)
        if best is None:
            continue
        step, sh, i = best
        with run.catalog.open_shard(sh) as r:
            w = np.asarray(r.read_payload(*key, i, i + 1))[0]
        out[lid] = (step, w)
    return out


def _weight_layers(run) -> dict[int, tuple]:
    return {L["id"]: _shape(L, "weight") for L in run.catalog.layers if _shape(L, "weight") is not None}


def _masked_count(shape: tuple, rows: int, cols: int) -> int:
    if len(shape) == 1:
        return int(rows)
    O, I = shape[0], shape[1]
    K = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return int(rows * I * K + cols * O * K - rows * cols * K)


def _check_threshold(criterion: str, threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, not {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"threshold must be a finite number, not {threshold!r}")
    if criterion in ("magnitude", "l1-channel", "dormant") and t < 0:
        raise ValueError(f"a {criterion} threshold is >= 0, not {t!r}")
    return t


def _check_criterion(criterion: Any, max_active_fraction: Any) -> float:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    try:
        maf = float(max_active_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"max_active_fraction must be a number, not {max_active_fraction!r}") from None
    if not 0.0 <= maf <= 1.0:
        raise ValueError(f"max_active_fraction must be in [0, 1], not {max_active_fraction!r}")
    if maf > 0 and criterion != "dead":
        raise ValueError(f"max_active_fraction applies to the dead criterion only, not {criterion!r}")
    return maf


# =============================================================================== evaluation

class _Evaluator:
    """Everything a plan or a sweep needs, read once; evaluates any threshold."""

    def __init__(self, run, criterion: str, layers: Any, steps, max_active_fraction: float,
                 thresholds: list[float]):
        self.run, self.criterion = run, criterion
        self.wshape = _weight_layers(run)
        self.names = {L["id"]: L["name"] for L in run.catalog.layers}
        if criterion == "magnitude":
            self.notes: list[str] = []
            ids = [i for i in run.select(layers) if self.wshape.get(i) is not None and len(self.wshape[i]) >= 2]
            if not ids:
                raise TraceError("no selected layer has a weight matrix or kernel to prune")
            snaps = _last_snapshots(run, ids, steps)
            for i in ids:
                if i not in snaps:
                    self.notes.append(f"layer {self.names[i]!r} has no weight snapshot; not pruned")
            if not snaps:
                raise TraceError("the run has no weight snapshots of the chosen layers; record with "
                                 "Recorder(..., weights_every=N)")
            self.sorted_abs = {i: np.sort(np.abs(w.astype(np.float64)).reshape(-1)) for i, (_, w) in snaps.items()}
            st = sorted({s for s, _ in snaps.values()})
            self.source_steps = (st[0], st[-1], len(st))
        else:
            self.struct = _Structured(run, criterion, layers, steps, max_active_fraction)
            if not self.struct.groups:
                notes = list(dict.fromkeys(self.struct.notes))
                what = ("no activation site maps to a prunable layer" if criterion != "l1-channel"
                        else "no selected layer has output channels to prune")
                raise TraceError(what + (f" ({notes[-1]})" if notes else ""))
            self.struct.prepare(thresholds)
            self.notes = list(dict.fromkeys(self.struct.notes))
            self.source_steps = self.struct.source_steps
            if not self.source_steps[2]:
                raise TraceError("no recorded activation statistics in the chosen steps for the layers to prune")

    def evaluate(self, t: float) -> dict:
        """{"entries": [...], "per_layer": {lid: (masked, numel)}} at threshold t."""
        per: dict[int, int] = {}
        entries = []
        if self.criterion == "magnitude":
            for lid, a in self.sorted_abs.items():
                m = int(np.searchsorted(a, t, side="right"))
                per[lid] = m
                if m:
                    entries.append({"layer": self.names[lid], "layer_id": int(lid), "param": "weight",
                                    "axis": None, "next": [], "magnitude_threshold": float(t),
                                    "masked": m})
        else:
            rows: dict[int, set] = {}
            cols: dict[int, set] = {}
            units_of = {}
            S = self.struct
            for lid in sorted(S.groups):
                u = S.units(lid, t)
                units_of[lid] = u
                if not len(u):
                    continue
                rows.setdefault(lid, set()).update(int(x) for x in u)
                for d, axis, k in sorted(S.groups[lid]["deps"]):
                    if axis == 0:
                        rows.setdefault(d, set()).update(int(x) for x in u)
                    else:
                        cols.setdefault(d, set()).update(int(x) * k + j for x in u for j in range(k))
            for lid in set(rows) | set(cols):
                shp = self.wshape.get(lid)
                if shp is not None:
                    per[lid] = _masked_count(shp, len(rows.get(lid, ())), len(cols.get(lid, ())))
            for lid in sorted(S.groups):
                u = units_of[lid]
                if not len(u):
                    continue
                g = S.groups[lid]
                e = {"layer": self.names[lid], "layer_id": int(lid), "param": "weight",
                     "units": [int(x) for x in u], "axis": 0,
                     "next": [{"layer": self.names[d], "layer_id": int(d), "param": "weight", "axis": int(axis),
                               "units": [int(x) for x in u], "group": int(k)}
                              for d, axis, k in sorted(g["deps"])],
                     "units_total": int(self.wshape[lid][0])}
                if self.criterion != "l1-channel":
                    e["sites"] = list(S._judges(g))
                    e["judged_by"] = "activation" if g["act"] else "output"
                entries.append(e)
        numel = {lid: int(np.prod(s, dtype=np.int64)) for lid, s in self.wshape.items()}
        for e in entries:
            e["sparsity"] = per.get(e["layer_id"], 0) / numel[e["layer_id"]] if numel[e["layer_id"]] else 0.0
            e.pop("masked", None)
        return {"entries": entries, "masked": per, "numel": numel}


# =============================================================================== public API

def pruning_plan(run, criterion: str, threshold: float, layers: Any = None, steps=None,
                 max_active_fraction: float = 0.0) -> dict:
    """A pruning plan for ``run`` (see the module docstring for the criteria and the mapping).

    Args:
        run: an :class:`analyzer.Run`.
        criterion: "dead", "dormant", "magnitude" or "l1-channel".
        threshold: the criterion's threshold (value units for dead; dormant score; |w| for magnitude;
            L1 norm of a weight row for l1-channel).
        layers: layers that may be pruned (ids, names, globs, type names); None = every layer but the
            model's final one (structured criteria). Consumers of pruned units are masked whatever this says.
        steps: None (all), a (start, stop) half-open range or an iterable of steps: the activation
            statistics used (dead, dormant) or where the last weight snapshot is taken.
        max_active_fraction: dead criterion: a unit is dead if active (> 0) at most this often
            (threshold 0 only).

    Returns:
        The plan as a dict (write it with :func:`write_plan`). ``expected_sparsity``: per layer with a
        ``weight`` parameter, the fraction of its weight elements the plan masks (rows of removed units,
        columns of consumed ones, or |w| <= threshold); ``overall`` pools every such layer's weights.

    Raises:
        ValueError: a bad criterion or threshold. TraceError: the run lacks what the criterion needs, or
        ``layers`` names an unknown layer.
    """
    maf = _check_criterion(criterion, max_active_fraction)
    t = _check_threshold(criterion, threshold)
    ev = _Evaluator(run, criterion, layers, steps, maf, [t])
    r = ev.evaluate(t)
    masked = sum(r["masked"].values())
    total = sum(r["numel"].values())
    per_layer = {ev.names[lid]: (r["masked"].get(lid, 0) / n if n else 0.0) for lid, n in sorted(r["numel"].items())}
    first, last, count = ev.source_steps
    plan = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": run.path,
        "model_fingerprint": fingerprint(param_list(run)),
        "criterion": {"name": criterion, "threshold": t, "max_active_fraction": maf},
        "source_steps": [int(first), int(last), int(count)],
        "layers": r["entries"],
        "expected_sparsity": {"overall": masked / total if total else 0.0, "per_layer": per_layer,
                              "masked_weights": int(masked), "weights": int(total)},
        "notes": ev.notes,
    }
    return validate_plan(plan, "pruning plan")


def default_thresholds(run, criterion: str, layers: Any = None, steps=None, max_active_fraction: float = 0.0,
                       n: int = 11) -> list[float]:
    """Thresholds for a sweep: 0 and quantiles of the criterion's scores (dormant: 0 ... 1)."""
    maf = _check_criterion(criterion, max_active_fraction)
    if criterion == "dormant":
        return list(DORMANT_GRID)
    if criterion == "dead" and maf > 0:
        return [0.0]
    return _defaults_from(_Evaluator(run, criterion, layers, steps, maf, [0.0]), criterion, n)


DORMANT_GRID = (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def _defaults_from(ev: "_Evaluator", criterion: str, n: int = 11) -> list[float]:
    if criterion == "magnitude":
        vals = np.concatenate([a for a in ev.sorted_abs.values()]) if ev.sorted_abs else np.zeros(0)
    elif criterion == "l1-channel":
        vals = np.concatenate(list(ev.struct.l1.values())) if ev.struct.l1 else np.zeros(0)
    else:
        du = ev.struct.scores.get("score")
        vals = du["score"].to_numpy(np.float64) if du is not None else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    out = {0.0}
    if len(vals):
        out.update(float(f"{q:.4g}") for q in np.quantile(vals, np.linspace(0.0, 0.9, n - 1)))
    if criterion != "dead":
        out = {v for v in out if v >= 0}
    return sorted(out)


def sweep(run, criterion: str, thresholds: Any = None, layers: Any = None, steps=None,
          max_active_fraction: float = 0.0) -> pd.DataFrame:
    """Sparsity versus threshold, per layer and overall.

    Returns one row per (threshold, layer with a weight) and one per threshold with layer
    "(overall)" (layer_id -1): criterion, threshold, layer_id, layer, units_removed and units
    (structured criteria; NaN for magnitude), masked (weight elements masked), weights (elements),
    sparsity = masked / weights. Sparsity never decreases as the threshold grows.
    """
    maf = _check_criterion(criterion, max_active_fraction)
    ev = None
    if thresholds is None:
        if criterion == "dormant":
            thresholds = list(DORMANT_GRID)
        elif criterion == "dead" and maf > 0:
            thresholds = [0.0]
        else:
            ev = _Evaluator(run, criterion, layers, steps, maf, [0.0])
            thresholds = _defaults_from(ev, criterion)
    if not isinstance(thresholds, (list, tuple, set, np.ndarray)):
        thresholds = [thresholds]
    ts = sorted({_check_threshold(criterion, t) for t in thresholds})
    if not ts:
        raise ValueError("no thresholds to sweep")
    if ev is None:
        ev = _Evaluator(run, criterion, layers, steps, maf, ts)
    rows = []
    for t in ts:
        r = ev.evaluate(t)
        removed = {e["layer_id"]: len(e["units"]) for e in r["entries"] if "units" in e}
        struct = criterion != "magnitude"
        for lid, n in sorted(r["numel"].items()):
            m = r["masked"].get(lid, 0)
            rows.append({"criterion": criterion, "threshold": t, "layer_id": int(lid), "layer": ev.names[lid],
                         "units_removed": removed.get(lid, 0) if struct else np.nan,
                         "units": (ev.wshape[lid][0] if struct else np.nan),
                         "masked": int(m), "weights": int(n), "sparsity": m / n if n else 0.0})
        tot = sum(r["numel"].values())
        m = sum(r["masked"].values())
        rows.append({"criterion": criterion, "threshold": t, "layer_id": -1, "layer": OVERALL,
                     "units_removed": sum(removed.values()) if struct else np.nan, "units": np.nan,
                     "masked": int(m), "weights": int(tot), "sparsity": m / tot if tot else 0.0})
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    df.attrs["notes"] = ev.notes
    return df


# =============================================================================== files

def write_plan(plan: dict, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Validate ``plan`` and write it as JSON to ``path`` atomically; returns the absolute path.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False. PlanError: an invalid plan.
    """
    validate_plan(plan, "pruning plan")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory, not a plan file")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_plan(path: str | os.PathLike) -> dict:
    """Read and validate a plan file.

    Raises:
        TraceError: the file is missing, unreadable or not JSON. PlanError (a ValueError): not a
        pruning plan, an unsupported version, or a missing or malformed field.
    """
    where = f"pruning plan {os.fspath(path)}"
    return validate_plan(files.read_json(path, "pruning plan"), where)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_plan(p: Any, where: str = "pruning plan") -> dict:
    """Check a plan's format, version, fields and types, and that its indices fit its fingerprint;
    returns ``p``. Raises :class:`PlanError` with a one-line reason."""
    def bad(msg):
        raise PlanError(f"{where}: {msg}")

    if not isinstance(p, dict):
        bad("not a JSON object")
    if p.get("format") != PLAN_FORMAT:
        bad(f"not a bbdecoder pruning plan (format={p.get('format')!r})")
    v = p.get("version")
    if not _int(v):
        bad(f"missing or invalid version {v!r}")
    if v not in SUPPORTED_PLAN_VERSIONS:
        bad(f"plan version {v} is not supported by this bbdecoder (reads "
            f"{', '.join(map(str, SUPPORTED_PLAN_VERSIONS))}); upgrade bbdecoder")
    for k, t in (("created", str), ("run", str), ("model_fingerprint", dict), ("criterion", dict),
                 ("source_steps", list), ("layers", list), ("expected_sparsity", dict)):
        if k not in p:
            bad(f"missing field {k!r}")
        if not isinstance(p[k], t):
            bad(f"field {k!r} must be a {'JSON object' if t is dict else 'list' if t is list else 'string'}")
    fp = p["model_fingerprint"]
    params = fp.get("params")
    if not isinstance(params, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
            and all(_int(s) and s >= 0 for s in e[1]) for e in params):
        bad("model_fingerprint.params must be a list of [parameter name, shape]")
    if not isinstance(fp.get("sha256"), str):
        bad("model_fingerprint.sha256 is missing")
    if fp["sha256"] != _sha(params):
        bad("model_fingerprint.sha256 does not match its parameter list (edited or corrupt file)")
    shapes = {n: tuple(s) for n, s in params}
    c = p["criterion"]
    if c.get("name") not in CRITERIA:
        bad(f"criterion.name must be one of {', '.join(CRITERIA)}, not {c.get('name')!r}")
    if not _num(c.get("threshold")):
        bad("criterion.threshold must be a finite number")
    maf = c.get("max_active_fraction", 0.0)
    if not _num(maf) or not 0 <= maf <= 1:
        bad("criterion.max_active_fraction must be a number in [0, 1]")
    ss = p["source_steps"]
    if len(ss) != 3 or not all(_int(s) for s in ss) or ss[2] < 1 or ss[0] > ss[1] or ss[0] < 0:
        bad("source_steps must be [first step, last step, count] with first <= last and count >= 1")
    name = c["name"]
    seen = set()
    for i, e in enumerate(p["layers"]):
        w = f"layers[{i}]"
        if not isinstance(e, dict):
            bad(f"{w} is not an object")
        if not isinstance(e.get("layer"), str) or not _int(e.get("layer_id")):
            bad(f"{w} needs a string 'layer' and an integer 'layer_id'")
        if e.get("param") != "weight":
            bad(f"{w}.param must be 'weight'")
        full = f"{e['layer']}.weight" if e["layer"] else "weight"
        if full not in shapes:
            bad(f"{w}: the fingerprint has no parameter {full!r}")
        if (e["layer"], name == "magnitude") in seen:
            bad(f"{w}: layer {e['layer']!r} appears twice")
        seen.add((e["layer"], name == "magnitude"))
        shp = shapes[full]
        if not _num(e.get("sparsity")) or not 0 <= e["sparsity"] <= 1:
            bad(f"{w}.sparsity must be a number in [0, 1]")
        if not isinstance(e.get("next", []), list):
            bad(f"{w}.next must be a list")
        if name == "magnitude":
            if not _num(e.get("magnitude_threshold")) or e["magnitude_threshold"] < 0:
                bad(f"{w}.magnitude_threshold must be a finite number >= 0")
            if e.get("next"):
                bad(f"{w}: a magnitude entry has no next layers")
            continue
        if e.get("axis") != 0:
            bad(f"{w}.axis must be 0 (output units)")
        _check_units(e.get("units"), shp[0] if shp else 0, f"{w}.units", bad)
        for j, nx in enumerate(e.get("next", [])):
            wn = f"{w}.next[{j}]"
            if not isinstance(nx, dict) or not isinstance(nx.get("layer"), str) or not _int(nx.get("layer_id")):
                bad(f"{wn} needs a string 'layer' and an integer 'layer_id'")
            if nx.get("param") != "weight":
                bad(f"{wn}.param must be 'weight'")
            nfull = f"{nx['layer']}.weight" if nx["layer"] else "weight"
            if nfull not in shapes:
                bad(f"{wn}: the fingerprint has no parameter {nfull!r}")
            nshp = shapes[nfull]
            k = nx.get("group", 1)
            if not _int(k) or k < 1:
                bad(f"{wn}.group must be an integer >= 1")
            if nx.get("axis") == 0:
                if k != 1:
                    bad(f"{wn}: group must be 1 on axis 0")
                _check_units(nx.get("units"), nshp[0] if nshp else 0, f"{wn}.units", bad)
            elif nx.get("axis") == 1:
                if len(nshp) < 2:
                    bad(f"{wn}: axis 1 of a {len(nshp)}-d weight")
                if nshp[1] % k:
                    bad(f"{wn}: group {k} does not divide the {nshp[1]} input features")
                _check_units(nx.get("units"), nshp[1] // k, f"{wn}.units", bad)
            else:
                bad(f"{wn}.axis must be 0 or 1")
    es = p["expected_sparsity"]
    if not _num(es.get("overall")) or not 0 <= es["overall"] <= 1:
        bad("expected_sparsity.overall must be a number in [0, 1]")
    pl = es.get("per_layer")
    if not isinstance(pl, dict) or not all(isinstance(k, str) and _num(x) and 0 <= x <= 1 for k, x in pl.items()):
        bad("expected_sparsity.per_layer must map layer names to numbers in [0, 1]")
    if "notes" in p and not (isinstance(p["notes"], list) and all(isinstance(s, str) for s in p["notes"])):
        bad("notes must be a list of strings")
    return p


def _check_units(u, n: int, w: str, bad) -> None:
    if not isinstance(u, list) or not all(_int(x) for x in u):
        bad(f"{w} must be a list of integers")
    if not u:
        bad(f"{w} is empty")
    if len(set(u)) != len(u):
        bad(f"{w} has duplicate indices")
    if min(u) < 0 or max(u) >= n:
        bad(f"{w}: index out of range [0, {n})")
