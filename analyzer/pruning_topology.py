"""From activation sites to prunable layers: the forward-order topology of a run and the per-layer
unit decisions of the structured criteria (see :mod:`analyzer.pruning` for the rules). Torch-free."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .activations import dead_units, iter_site_stats, select_sites, steps_filter
from .slices import raw_tensor
from .trace import format as fmt
from .trace.format import TraceError

#: layer types whose unit axis is the last one (mirrors recorder.activations.LINEAR_STYLE)
LINEAR_STYLE = ("Linear", "LazyLinear", "Bilinear", "LayerNorm", "Embedding", "MultiheadAttention",
                "NonDynamicallyQuantizableLinear", "RMSNorm")
#: layer types whose weight axis 0 is not the output units (or whose units are not channels)
NOT_ROW_LAYERS = ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LazyConvTranspose1d",
                  "LazyConvTranspose2d", "LazyConvTranspose3d", "Embedding", "EmbeddingBag",
                  "MultiheadAttention")
#: normalisations over the unit axis (mean and variance across all units): no input unit can be removed
ACROSS_UNIT_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "LlamaRMSNorm", "T5LayerNorm")
#: normalisations with per-channel statistics: masking a channel's weight and bias zeroes its output
PER_CHANNEL_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                     "LazyBatchNorm2d", "LazyBatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                     "InstanceNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d")


def param_shape(L: dict, pname: str) -> tuple | None:
    """The shape of a layer record's parameter ``pname`` (None if it has none)."""
    for q in L["params"]:
        if q["name"] == pname:
            return tuple(int(s) for s in q["shape"])
    return None


def out_axis(L: dict) -> int:
    """The weight axis of a layer record's output units: 1 for weights stored (in, out) (manifest
    ``weight_layout`` "in_out", HF ``Conv1D``; in a trace recorded before that field, a
    ``transformers...Conv1D`` with a 2-d weight), else 0 (torch's (out, in, ...))."""
    if "weight_layout" in L:
        return 1 if L["weight_layout"] == fmt.WEIGHT_IN_OUT else 0
    w = param_shape(L, "weight")
    old_hf = (L.get("type") == "Conv1D" and str(L.get("class", "")).startswith("transformers.")
              and w is not None and len(w) == 2)
    return 1 if old_hf else 0


def tied_layers(catalog) -> dict[int, str]:
    """Layer id -> why, for layers whose ``weight`` is one parameter with another layer's (tied weights,
    e.g. GPT-2's ``lm_head`` and ``transformer.wte``): masking it would change both, so no plan masks it."""
    owners = set(catalog.tied.values())
    out = {}
    for L in catalog.layers:
        q = next((q for q in L["params"] if q["name"] == "weight"), None)
        if q is None:
            continue
        full = f"{L['name']}.weight" if L["name"] else "weight"
        if "tied_to" in q:
            out[L["id"]] = f"its weight is tied to {q['tied_to']!r}"
        elif full in owners:
            others = [a for (lk, pk), o in catalog.tied.items() if o == full
                      for a in [f"{catalog.layer_by_key(lk)['name']}.{catalog.param_name(lk, pk)}"]]
            out[L["id"]] = f"its weight is tied to {', '.join(map(repr, others))}"
    return out


class Topology:
    """Layers, their weight shapes and the forward order of one run."""

    def __init__(self, run):
        self.run = run
        self.table = {L["id"]: L for L in run.catalog.layers}
        self.weight = {i: param_shape(L, "weight") for i, L in self.table.items()}
        #: the weight axis of each layer's output units (0, or 1 for (in, out) weights); inputs: the other
        self.oax = {i: out_axis(L) for i, L in self.table.items()}
        self.tied = tied_layers(run.catalog)
        self.bias = {i: param_shape(L, "bias") for i, L in self.table.items()}
        ev = run.catalog.manifest.get("forward_order")
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
        #: producer id -> why masking its units alone changes what follows (set by :meth:`chain`)
        self.blocked: dict[int, str] = {}

    def name(self, lid: int) -> str:
        return self.table[lid]["name"]

    def type(self, lid: int) -> str:
        return self.table[lid]["type"]

    def linear_style(self, lid: int) -> bool:
        return self.type(lid) in LINEAR_STYLE or self.oax[lid] == 1

    def units(self, lid: int) -> int | None:
        """The number of output units of a layer's weight (None without a 2-D or larger weight)."""
        w = self.weight.get(lid)
        return w[self.oax[lid]] if w is not None and len(w) >= 2 else None

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
        """Whether the layer's weight holds its U output units on one axis (rows, or columns of an
        (in, out) weight)."""
        w = self.weight.get(lid)
        return (w is not None and len(w) > self.oax[lid] and w[self.oax[lid]] == U
                and self.type(lid) not in NOT_ROW_LAYERS)

    def is_norm(self, lid: int, U: int) -> bool:
        return self.type(lid) in PER_CHANNEL_NORMS and self.weight.get(lid) == (U,)

    def col_ok(self, lid: int, U: int, k: int) -> bool:
        """Whether the layer's weight takes U * k input features on its input axis (columns, or rows of
        an (in, out) weight)."""
        w = self.weight.get(lid)
        return (w is not None and len(w) >= 2 and w[1 - self.oax[lid]] == U * k
                and self.type(lid) not in NOT_ROW_LAYERS and self.type(lid) != "Bilinear")

    def nearest_before(self, j: int, U: int) -> int | None:
        for i in range(j - 1, -1, -1):
            e = self.events[i]
            if e.get("event") == "layer" and e.get("id") in self.table and self.out_units(i) == U:
                return i
        return None

    def chain(self, j: int, U: int) -> tuple[list[tuple[int, int, int]], str | None]:
        """Dependents of the U output units of the layer event at j: [(layer id, role, group)] (role 0:
        a per-channel normalisation, rows; 1: the consumer, input units) and a note when the consumer
        is unclear. Sets :attr:`blocked` (producer id -> reason) when masking the units alone would
        change what follows: no later layer takes them, or a normalisation across units does."""
        deps: list[tuple[int, int, int]] = []
        flat_ok = self.conv_style_out(j)
        me = self.events[j]["id"]
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
            if lid in self.tied:
                self.blocked.setdefault(me, f"its {U} units reach {self.name(lid)!r}, whose weight cannot be "
                                            f"masked ({self.tied[lid]})")
                return deps, None
            if self.col_ok(lid, U, k):
                deps.append((lid, 1, k))
                return deps, None
            if k == 1 and self.type(lid) in ACROSS_UNIT_NORMS:
                self.blocked.setdefault(me, f"its {U} units reach {self.name(lid)!r} ({self.type(lid)}), which "
                                            f"normalises across all {U} units (a residual stream, when the "
                                            "model adds them to its input): removing some changes every unit")
                return deps, None
            return deps, (f"the layer after {self.name(self.events[j]['id'])!r} that takes its {U} units "
                          f"({self.name(lid)!r}, {self.type(lid)}) cannot have input units removed")
        if me != self.final_layer:
            self.blocked.setdefault(me, f"no later layer takes its {U} units (they go on through operations "
                                        "that are not layers, e.g. attention heads)")
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
        if p is None and S.get("kind") == "softmax":
            return None, None, (f"site {S['name']!r} is a softmax whose {U} units no layer produces (attention "
                                "probabilities: their unit axis is the heads): not used")
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


class Structured:
    """Per producer layer: the sites that judge it and its dependents; decides units at a threshold."""

    def __init__(self, run, criterion: str, layers: Any, steps, max_active_fraction: float):
        self.run, self.criterion, self.steps, self.maf = run, criterion, steps, float(max_active_fraction)
        self.topo = Topology(run)
        self.notes: list[str] = []
        self.selected = set(run.catalog.select(layers))
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
                             "or use the criterion magnitude or l1-channel")
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
                d, note = topo.chain(p, topo.units(lid))
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
            elif lid in topo.tied:
                self.notes.append(f"layer {topo.name(lid)!r} not pruned: {topo.tied[lid]} (one parameter; "
                                  "masking it changes both)")
                del self.groups[lid]
            elif lid in topo.blocked:
                if self.criterion == "dead" and g["act"]:   # inactive after their activation: masking keeps them so
                    self.notes.append(f"layer {topo.name(lid)!r}: {topo.blocked[lid]}; only its own weights are masked")
                else:
                    self.notes.append(f"layer {topo.name(lid)!r} not pruned: {topo.blocked[lid]}")
                    del self.groups[lid]

    # -------------------------------------------------------------- scores
    def prepare(self, thresholds: list[float]) -> None:
        """Read what deciding at these thresholds needs (once)."""
        run = self.run
        if self.criterion == "l1-channel":
            ids = sorted(self.groups)
            self.l1 = {}
            snaps = last_snapshots(run, ids, self.steps)
            for lid in ids:
                if lid not in snaps:
                    self.notes.append(f"layer {self.topo.name(lid)!r} has no weight snapshot; not pruned")
                    continue
                step, w = snaps[lid]
                w = np.moveaxis(np.abs(w.astype(np.float64)), self.topo.oax[lid], 0)   # output units first
                self.l1[lid] = w.reshape(w.shape[0], -1).sum(1)
            steps = sorted({s for s, _ in snaps.values()})
            self.source_steps = (steps[0], steps[-1], len(steps)) if steps else (None, None, 0)
            if not steps:
                raise TraceError("the run has no weight snapshots of the chosen layers; record with "
                                 "Recorder(..., weights_every=N)")
            return
        names = sorted({s for g in self.groups.values() for s in self.judges(g)})
        self.scores: dict[tuple, pd.DataFrame] = {}
        crit = "strict" if self.criterion == "dead" else "dormant"
        if names:
            if crit == "strict" and self.maf > 0:
                for t in thresholds:
                    self.scores[("t", float(t))] = dead_units(run, crit, float(t), self.maf, steps=self.steps,
                                                              sites=names)
            else:
                ref = float(thresholds[0]) if thresholds else 0.0
                self.scores["score"] = dead_units(run, crit, ref, self.maf, steps=self.steps, sites=names)
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
    def judges(g: dict) -> list[str]:
        return g["act"] or g["out"]

    def units(self, lid: int, t: float) -> np.ndarray:
        """Sorted unit indices of producer ``lid`` removed at threshold t."""
        g = self.groups[lid]
        if self.criterion == "l1-channel":
            v = self.l1.get(lid)
            return np.zeros(0, np.int64) if v is None else np.flatnonzero(~(v > t))
        dead = None
        for s in self.judges(g):
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


def last_snapshots(run, ids, steps) -> dict[int, tuple[int, np.ndarray]]:
    """For each layer id, (step, weight array) of its last recorded "weight" snapshot within ``steps``."""
    keep = steps_filter(steps)
    ranks = run.catalog.ranks_with(fmt.KIND_WEIGHTS)
    rank = ranks[0] if ranks else None
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
        if key[1:] in run.catalog.sharded:   # FSDP2: the whole tensor from every rank's slice
            try:
                w = raw_tensor(run.catalog, *key, step)
            except TraceError:   # a slice of that snapshot is missing
                continue
        else:
            with run.catalog.open_shard(sh) as r:
                w = np.asarray(r.read_payload(*key, i, i + 1))[0]
        out[lid] = (step, w)
    return out


def weight_layers(run) -> dict[int, tuple]:
    """Layer id -> weight shape, for every layer with a ``weight`` parameter of its own (a weight tied
    to another layer's counts there only)."""
    return {L["id"]: param_shape(L, "weight") for L in run.catalog.layers if param_shape(L, "weight") is not None
            and not any(q["name"] == "weight" and "tied_to" in q for q in L["params"])}


def masked_count(shape: tuple, rows: int, cols: int) -> int:
    """Weight elements masked by removing ``rows`` rows (axis 0) and ``cols`` columns (axis 1)."""
    if len(shape) == 1:
        return int(rows)
    O, I = shape[0], shape[1]
    K = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return int(rows * I * K + cols * O * K - rows * cols * K)
