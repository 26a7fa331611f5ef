"""Pruning plan files: the versioned JSON format, its validation and the model fingerprint.

A plan says which weights of a model to mask (see :mod:`analyzer.pruning`, which computes plans
from a run, and :func:`recorder.prune.apply_plan`, which applies them to a torch model). This module
is the contract both sides share: stdlib only (no numpy, pandas or torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from . import files

PLAN_FORMAT = "bbdecoder-pruning-plan"
#: the newest plan format version this module writes. Version 2 adds weights stored (in, out) (HF
#: ``Conv1D``): an entry's ``axis`` 1 (the producer's units are columns) and ``next`` entries on axis 0
#: with ``role`` "consumer" (input units are rows). A version-1 reader (bbdecoder before it) would mask
#: the wrong weights of such a plan (rows as a normalisation's, bias entries included), so a plan that
#: uses them says 2 (:func:`plan_version`); every other plan stays 1, readable by older releases.
PLAN_VERSION = 2
SUPPORTED_PLAN_VERSIONS = (1, 2)
#: the criteria a plan may name
CRITERIA = ("dead", "dormant", "magnitude", "l1-channel")


class PlanError(ValueError):
    """A pruning plan is malformed, of an unsupported version, or does not fit its model."""


def plan_version(entries: list) -> int:
    """The lowest format version that reads plan ``entries`` right: 2 when one uses the (in, out) axes
    (an entry's ``axis`` 1, or a ``next`` entry with a ``role``), else 1."""
    for e in entries:
        if isinstance(e, dict) and (e.get("axis") == 1 or any(
                isinstance(nx, dict) and "role" in nx for nx in e.get("next") or ())):
            return 2
    return 1


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
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=1, allow_nan=False)
            f.write("\n")

    files.atomic_write(path, write)
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
    try:   # an int beyond a float's range (10**400) is not a number a plan holds
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:
        return False


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
    reads = ", ".join(map(str, SUPPORTED_PLAN_VERSIONS))
    if v > max(SUPPORTED_PLAN_VERSIONS):
        bad(f"plan version {v} is newer than this bbdecoder reads ({reads}); upgrade bbdecoder to apply it")
    if v not in SUPPORTED_PLAN_VERSIONS:
        bad(f"unknown plan version {v} (this bbdecoder reads {reads})")
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
        if e.get("axis") not in (0, 1) or (e["axis"] == 1 and len(shp) != 2):
            bad(f"{w}.axis must be 0 (output units), or 1 for a 2-d weight stored (in, out)")
        _check_units(e.get("units"), shp[e["axis"]] if shp else 0, f"{w}.units", bad)
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
            if nx.get("role", "consumer") != "consumer":
                bad(f"{wn}.role must be 'consumer' when given")
            if nx.get("axis") == 0 and "role" in nx:   # the input units of a weight stored (in, out)
                if len(nshp) != 2 or nshp[0] % k:
                    bad(f"{wn}: group {k} does not divide the {nshp[0] if nshp else 0} input features")
                _check_units(nx.get("units"), nshp[0] // k, f"{wn}.units", bad)
            elif nx.get("axis") == 0:
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
