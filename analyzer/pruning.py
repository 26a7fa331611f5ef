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
    * weights stored (in, out) (manifest ``weight_layout`` "in_out": Hugging Face ``Conv1D``, y = x @ W + b)
      hold a producer's units in columns (entry ``axis`` 1) and a consumer's inputs in rows.
    * a producer is refused, with the reason in ``notes``, when masking its units alone would change what
      follows: no later layer takes them (e.g. attention's q/k/v projection), or they reach a normalisation
      across units (LayerNorm, RMSNorm, GroupNorm: typically a residual stream), unless the dead criterion
      judges them after an activation (inactive units stay inactive); and a layer whose weight is tied to
      another's (GPT-2's ``lm_head`` and ``transformer.wte``) is never masked, as producer or consumer.
Plan entries: ``axis`` is the weight axis of the removed units (0, or 1 for an (in, out) weight); the bias
entries of the units are masked too. ``next`` lists the dependents of the removed units: ``axis`` 1
entries, and ``axis`` 0 entries with ``role`` "consumer" (an (in, out) weight), are consumers (input
units; ``group`` k), other ``axis`` 0 entries are per-channel normalisations (weight and bias rows).
A plan that uses the (in, out) axes is format version 2 (an older apply_plan, which reads only version 1,
refuses it instead of masking the wrong weights); every other plan is version 1
(:func:`analyzer.trace.plans.plan_version`).
The mapping reads a chain; models with branches (residual additions, concatenations) can defeat it,
which is why a plan is a reviewable file and apply_plan checks the model's fingerprint.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np
import pandas as pd

from .pruning_topology import (LINEAR_STYLE, NOT_ROW_LAYERS, PER_CHANNEL_NORMS, Structured, last_snapshots,
                               masked_count, out_axis, tied_layers, weight_layers)
from .trace.format import TraceError
from .trace.plans import (CRITERIA, PLAN_FORMAT, PLAN_VERSION, SUPPORTED_PLAN_VERSIONS, PlanError, fingerprint,
                          fingerprint_difference, load_plan, plan_version, validate_plan, write_plan)

#: names of the plan format (:mod:`analyzer.trace.plans`) and the topology, importable from here too
__all__ = ["CRITERIA", "STRUCTURED", "OVERALL", "SWEEP_COLUMNS", "DORMANT_GRID", "PLAN_FORMAT", "PLAN_VERSION",
           "SUPPORTED_PLAN_VERSIONS", "LINEAR_STYLE", "NOT_ROW_LAYERS", "PER_CHANNEL_NORMS", "PlanError",
           "fingerprint", "fingerprint_difference", "load_plan", "plan_version", "validate_plan", "write_plan",
           "param_list", "pruning_plan", "default_thresholds", "sweep"]

STRUCTURED = ("dead", "dormant", "l1-channel")

OVERALL = "(overall)"
SWEEP_COLUMNS = ["criterion", "threshold", "layer_id", "layer", "units_removed", "units", "masked",
                 "weights", "sparsity"]


def param_list(run) -> list[list]:
    """``[[full parameter name, shape], ...]`` of a recorded model, in the recorder's layer order."""
    out = []
    for L in run.catalog.layers:
        for q in L["params"]:
            out.append([f"{L['name']}.{q['name']}" if L["name"] else q["name"], [int(s) for s in q["shape"]]])
    return out


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
        self.wshape = weight_layers(run)
        self.names = {L["id"]: L["name"] for L in run.catalog.layers}
        self.oax = {L["id"]: out_axis(L) for L in run.catalog.layers}
        if criterion == "magnitude":
            self.notes: list[str] = []
            tied = tied_layers(run.catalog)
            ids = [i for i in run.catalog.select(layers) if self.wshape.get(i) is not None and len(self.wshape[i]) >= 2]
            for i in [i for i in ids if i in tied]:
                self.notes.append(f"layer {self.names[i]!r} not pruned: {tied[i]} (one parameter; masking it "
                                  "changes both)")
            ids = [i for i in ids if i not in tied]
            if not ids:
                raise TraceError("no selected layer has a weight matrix or kernel to prune")
            snaps = last_snapshots(run, ids, steps)
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
            self.struct = Structured(run, criterion, layers, steps, max_active_fraction)
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

    def _next_entry(self, d: int, role: int, k: int, u) -> dict:
        """A plan's ``next`` entry: a normalisation's rows (axis 0), or a consumer's input units: columns
        (axis 1), or the rows of an (in, out) weight (axis 0 with role "consumer")."""
        axis = 0 if role == 0 else 1 - self.oax[d]
        e = {"layer": self.names[d], "layer_id": int(d), "param": "weight", "axis": axis,
             "units": [int(x) for x in u], "group": int(k)}
        if role == 1 and axis == 0:
            e["role"] = "consumer"
        return e

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
            # masked indices per (layer, weight axis): a producer's units on its output axis (rows, or
            # columns of an (in, out) weight), a normalisation's rows, a consumer's inputs (the other axis)
            masked: dict[tuple[int, int], set] = {}
            units_of = {}
            S = self.struct
            for lid in sorted(S.groups):
                u = S.units(lid, t)
                units_of[lid] = u
                if not len(u):
                    continue
                masked.setdefault((lid, self.oax[lid]), set()).update(int(x) for x in u)
                for d, role, k in sorted(S.groups[lid]["deps"]):
                    if role == 0:
                        masked.setdefault((d, 0), set()).update(int(x) for x in u)
                    else:
                        masked.setdefault((d, 1 - self.oax[d]), set()).update(
                            int(x) * k + j for x in u for j in range(k))
            for lid in {lid for lid, _ in masked}:
                shp = self.wshape.get(lid)
                if shp is not None:
                    per[lid] = masked_count(shp, len(masked.get((lid, 0), ())), len(masked.get((lid, 1), ())))
            for lid in sorted(S.groups):
                u = units_of[lid]
                if not len(u):
                    continue
                g = S.groups[lid]
                e = {"layer": self.names[lid], "layer_id": int(lid), "param": "weight",
                     "units": [int(x) for x in u], "axis": self.oax[lid],
                     "next": [self._next_entry(d, role, k, u) for d, role, k in sorted(g["deps"])],
                     "units_total": int(self.wshape[lid][self.oax[lid]])}
                if self.criterion != "l1-channel":
                    e["sites"] = list(S.judges(g))
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
        "format": PLAN_FORMAT, "version": plan_version(r["entries"]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": run.catalog.path,
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
                         "units": (ev.wshape[lid][ev.oax[lid]] if struct else np.nan),
                         "masked": int(m), "weights": int(n), "sparsity": m / n if n else 0.0})
        tot = sum(r["numel"].values())
        m = sum(r["masked"].values())
        rows.append({"criterion": criterion, "threshold": t, "layer_id": -1, "layer": OVERALL,
                     "units_removed": sum(removed.values()) if struct else np.nan, "units": np.nan,
                     "masked": int(m), "weights": int(tot), "sparsity": m / tot if tot else 0.0})
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    df.attrs["notes"] = ev.notes
    return df
