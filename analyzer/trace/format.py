"""The BBDecoder trace format: the one contract between recorder and analyzer.

Torch-free and numpy-free. The recorder imports these names; the analyzer reads with them.
See docs/trace-format.md for the prose description of the same layout.

Run directory::

    RUN/
      manifest.json                 static run description + overall status (atomic replace)
      rank-00000/
        rank.json                   this rank's status, counters, errors (atomic replace)
        shard-000000.h5             closed shard: immutable
        shard-000001.h5.part        live shard: ignored by readers, lost on a crash
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any, Iterable, Sequence

FORMAT_NAME = "bbdecoder-trace"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

MANIFEST = "manifest.json"
RANK_FILE = "rank.json"
SHARD_SUFFIX = ".h5"
LIVE_SUFFIX = ".part"

#: Payload kinds stored as raw tensors (one HDF5 group each, or flat: FLAT_KINDS).
KIND_GRADS = "grads"
KIND_WEIGHTS = "weights"
#: Per-step gradient sufficient statistics computed on the device: /grad_stats/<layer>/<param>/values,
#: one float64 vector of GRAD_STAT_FIELDS per step.
KIND_GRAD_STATS = "grad_stats"
GRAD_STAT_FIELDS = ("count", "nonfinite", "sum", "sumsq", "sum_abs", "max_abs")
#: Per-step, per-unit sufficient statistics of activation sites: /act_stats/<site key>/<stat>
KIND_ACT_STATS = "act_stats"
#: Raw activation samples: /activations/<site key>/values, several rows per step (one per sample)
KIND_ACTIVATIONS = "activations"  # /activations/<site key>/samples/{values,steps}
PAYLOAD_KINDS = (KIND_GRADS, KIND_GRAD_STATS, KIND_WEIGHTS, KIND_ACT_STATS, KIND_ACTIVATIONS)
#: Raw parameter tensors: of a sharded parameter (manifest ``shard_dim``) each rank stores its slice,
#: with payload attributes ``offset`` (first row along dim 0) and ``global_shape``.
RAW_PARAM_KINDS = (KIND_GRADS, KIND_WEIGHTS)
#: Kinds whose per-step payload holds several rows (the step index repeats).
MULTIROW_KINDS = (KIND_ACTIVATIONS,)
#: Kinds that may also be stored *packed* (optional, format version 1): every parameter of a shard in
#: one dataset per group of parameters, ``/packed/<kind>/<n>/{values (k, P, *shape), steps (k,),
#: index (uint8: UTF-8 JSON [[layer_key, param_key, attrs], ...], P entries)}``.
PACKED_GROUP = "packed"
PACKED_KINDS = (KIND_GRAD_STATS,)
#: Kinds that may also be stored *flat* (optional, format version 1; written by default since 2.0.0.dev):
#: the tensors of a step concatenated into one row, ``/flat/<kind>/<n>/{values (k, N), steps (k,),
#: index (uint8: UTF-8 JSON [[layer_key, param_key, attrs, start, numel, shape], ...])}``. The activation
#: statistics too (written flat since 2.0.0.dev of 2026-12-07; layer_key = site key, param_key = the
#: statistic): one float64 group (sums, minima, maxima, ...) and one int32 group (counts near a bound) per
#: list of sites, instead of two datasets per site and statistic.
FLAT_GROUP = "flat"
FLAT_KINDS = RAW_PARAM_KINDS + (KIND_ACT_STATS,)
#: Optional root attributes of a shard written with a float16 storage dtype: values of that kind stored
#: in the shard that were non-zero and became 0 (underflow) or finite and became inf (overflow) in float16.
CAST_COUNT_ATTRS = {KIND_GRADS: ("f16_underflow_grads", "f16_overflow_grads"),
                    KIND_WEIGHTS: ("f16_underflow_weights", "f16_overflow_weights")}

#: Optional manifest list (format version 1): where the first training forward computed attention in a
#: fused kernel (module paths that called F.scaled_dot_product_attention; "attn_implementation=<name>"
#: from a Hugging Face config): attention probabilities were not observable (no softmax site).
ATTENTION_UNOBSERVED = "attention_unobserved"
#: Columns of the per-shard step table (group ``/steps``).
STEP_COLUMNS = ("step", "epoch", "loss", "time", "dropped")

#: Status values written by the recorder. Only "complete" is complete.
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"       # the recorder hit an error and stood aside
STATUS_ABORTED = "aborted"     # the training code raised inside the recorder's context

_SHARD_RE = re.compile(r"^shard-(\d{6})\.h5\Z")
_RANK_RE = re.compile(r"^rank-(\d{5})\Z")
_SAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]")


class TraceError(Exception):
    """A trace is missing, malformed, of an unknown version, or inconsistent."""


def rank_dirname(rank: int) -> str:
    """Directory name of one rank's shard series, e.g. ``rank-00000``."""
    return f"rank-{int(rank):05d}"


def shard_filename(index: int, live: bool = False) -> str:
    """File name of shard ``index``; ``live`` adds the suffix of a shard still being written."""
    name = f"shard-{int(index):06d}{SHARD_SUFFIX}"
    return name + LIVE_SUFFIX if live else name


def parse_shard_filename(name: str) -> int | None:
    """Index of a closed shard file name, or None if ``name`` is not one."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def parse_rank_dirname(name: str) -> int | None:
    """Rank of a rank directory name, or None if ``name`` is not one."""
    m = _RANK_RE.match(name)
    return int(m.group(1)) if m else None


def sanitize(name: str) -> str:
    """Turn a model-provided name into a safe HDF5 path component and file name.

    Every character outside ``[A-Za-z0-9_.-]`` becomes ``_`` (so ``/`` and ``\\`` never survive),
    a leading ``.`` becomes ``_`` (so ``.`` and ``..`` cannot occur), and the empty name is ``_root``.
    The mapping is not injective; :func:`assign_keys` makes keys unique.
    """
    s = _SAFE_RE.sub("_", str(name))
    if not s:
        return "_root"
    if s.startswith("."):
        s = "_" + s[1:]
    return s[:200]


def assign_keys(names: Sequence[str]) -> list[str]:
    """Sanitized, unique keys for ``names`` (a ``~N`` suffix resolves collisions), in order."""
    keys: list[str] = []
    seen: set[str] = set()
    for name in names:
        base = sanitize(name)
        key, n = base, 1
        while key in seen:
            key = f"{base}~{n}"
            n += 1
        seen.add(key)
        keys.append(key)
    return keys


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}(~\d{1,9})?\Z")


def is_safe_key(key: object) -> bool:
    """True if ``key`` is something :func:`assign_keys` could have produced."""
    return isinstance(key, str) and bool(_KEY_RE.match(key))


def payload_path(kind: str, layer_key: str, param_key: str) -> str:
    """HDF5 group holding one parameter's raw tensors: datasets ``values`` and ``steps``."""
    return f"/{kind}/{layer_key}/{param_key}"


def packed_path(kind: str, index: int) -> str:
    """HDF5 group of packed group ``index`` of ``kind``: datasets ``values``, ``steps`` and ``index``."""
    return f"/{PACKED_GROUP}/{kind}/{int(index)}"


# --------------------------------------------------------------------------- layer selection

def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def select_layers(spec: Any, table: Sequence[dict], type_match=None) -> list[int]:
    """Resolve a layer specification against a layer table.

    Args:
        spec: None (every layer), or one item or a list of items, each an int id, a dotted name,
            a glob pattern over dotted names (``features.*``), a type name (``Conv2d``), a
            comma-separated string of those, or anything ``type_match`` understands (the recorder
            passes module classes).
        table: layer records with keys ``id``, ``name``, ``type``.
        type_match: optional ``(item, record) -> bool | None``; None means "not my kind of item".

    Returns:
        Sorted list of selected layer ids.

    Raises:
        TraceError: an item selects nothing (the message lists a few known names).
    """
    if spec is None:
        return [r["id"] for r in table]
    items: list[Any]
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (list, tuple, set)):
        items = []
        for it in spec:
            if isinstance(it, str):
                items.extend(s.strip() for s in it.split(",") if s.strip())
            else:
                items.append(it)
    else:
        items = [spec]
    chosen: set[int] = set()
    by_name = {r["name"]: r["id"] for r in table}
    ids = {r["id"] for r in table}
    for it in items:
        hit: list[int] = []
        if type_match is not None and not isinstance(it, (str, int)):
            hit = [r["id"] for r in table if type_match(it, r)]
        elif isinstance(it, bool):
            hit = []
        elif isinstance(it, int):
            hit = [it] if it in ids else []
        elif isinstance(it, str):
            if it in by_name:
                hit = [by_name[it]]
            elif _is_glob(it):
                hit = [r["id"] for r in table if fnmatch.fnmatchcase(r["name"], it)]
            elif it.isdigit() and int(it) in ids:
                hit = [int(it)]
            else:
                hit = [r["id"] for r in table if r["type"] == it]
        if not hit:
            known = ", ".join(repr(r["name"]) for r in table[:6])
            more = " ..." if len(table) > 6 else ""
            raise TraceError(f"unknown layer {it!r} (known layers: {known}{more})")
        chosen.update(hit)
    return sorted(chosen)


def check_version(version: Any, where: str) -> int:
    """Validate a format version found in ``where``; returns it as int."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise TraceError(f"{where}: missing or invalid format_version {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise TraceError(
            f"{where}: format version {version} is not supported by this bbdecoder "
            f"(reads {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade bbdecoder"
        )
    return version


#: a layer's optional ``weight_layout``: torch's (out, in, ...) (the default), or (in, out) (HF ``Conv1D``)
WEIGHT_OUT_IN, WEIGHT_IN_OUT = "out_in", "in_out"
WEIGHT_LAYOUTS = (WEIGHT_OUT_IN, WEIGHT_IN_OUT)


def _names_ok(v) -> bool:
    """A list of at most 1000 strings (the ``aliases`` of a layer or parameter)."""
    return isinstance(v, list) and len(v) <= 1000 and all(isinstance(a, str) for a in v)


def validate_manifest(m: dict, where: str) -> dict:
    """Check the fields the analyzer relies on; returns ``m``. Raises :class:`TraceError`."""
    if m.get("format") != FORMAT_NAME:
        raise TraceError(f"{where}: not a bbdecoder manifest (format={m.get('format')!r})")
    check_version(m.get("format_version"), where)
    layers = m.get("layers")
    if not isinstance(layers, list):
        raise TraceError(f"{where}: 'layers' must be a list")
    seen = set()
    for i, L in enumerate(layers):
        if not isinstance(L, dict):
            raise TraceError(f"{where}: layer #{i} is not an object")
        for k, t in (("id", int), ("name", str), ("type", str), ("key", str), ("params", list)):
            if not isinstance(L.get(k), t):
                raise TraceError(f"{where}: layer #{i} lacks a valid {k!r}")
        if not is_safe_key(L["key"]):
            raise TraceError(f"{where}: layer #{i} has an unsafe key {L['key']!r}")
        if isinstance(L["id"], bool) or not 0 <= L["id"] < 2**31:
            raise TraceError(f"{where}: layer #{i} has an invalid id {L['id']!r}")
        if L["id"] in seen:
            raise TraceError(f"{where}: duplicate layer id {L['id']}")
        if "n_params" in L and not (isinstance(L["n_params"], int) and not isinstance(L["n_params"], bool)
                                    and 0 <= L["n_params"] < 2**50):
            raise TraceError(f"{where}: layer #{i} has an invalid 'n_params' {L['n_params']!r}")
        seen.add(L["id"])
        if not _names_ok(L.get("aliases", [])) or L.get("weight_layout", WEIGHT_OUT_IN) not in WEIGHT_LAYOUTS:
            raise TraceError(f"{where}: layer #{i} has malformed aliases or an unknown weight_layout")
        for p in L["params"]:
            if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                    and isinstance(p.get("key"), str) and isinstance(p.get("shape"), list)
                    and all(isinstance(s, int) and 0 <= s < 2**40 for s in p["shape"])):
                raise TraceError(f"{where}: layer {L['name']!r} has a malformed parameter entry")
            if not is_safe_key(p["key"]):
                raise TraceError(f"{where}: parameter key {p['key']!r} is unsafe")
            if "shard_dim" in p and not (p["shard_dim"] == 0 and type(p["shard_dim"]) is int and p["shape"]):
                raise TraceError(f"{where}: parameter {L['name']}.{p['name']} declares an unsupported "
                                 f"shard_dim {p['shard_dim']!r:.40} (this bbdecoder reads 0)")
            if not (_names_ok(p.get("aliases", [])) and isinstance(p.get("tied_to", ""), str)):
                raise TraceError(f"{where}: parameter {L['name']}.{p['name']} has malformed aliases or tied_to")
            n = 1
            for s in p["shape"]:
                n *= s
            if n >= 2**40:
                raise TraceError(f"{where}: parameter {L['name']}.{p['name']} declares an absurd size")
    sites = m.get("sites", [])
    if not isinstance(sites, list):
        raise TraceError(f"{where}: 'sites' must be a list")
    skeys = set()
    for i, S in enumerate(sites):
        if not (isinstance(S, dict) and isinstance(S.get("name"), str) and is_safe_key(S.get("key"))
                and isinstance(S.get("kind"), str) and isinstance(S.get("units"), int)
                and 0 <= S["units"] < 2**31 and isinstance(S.get("stats"), dict)
                and isinstance(S.get("sample_shape"), list)):
            raise TraceError(f"{where}: activation site #{i} is malformed")
        for shp in list(S["stats"].values()) + [S["sample_shape"]]:
            if not (isinstance(shp, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in shp)):
                raise TraceError(f"{where}: activation site {S['name']!r} declares a malformed shape")
        if S["key"] in skeys:
            raise TraceError(f"{where}: duplicate activation site key {S['key']!r}")
        skeys.add(S["key"])
        _check_site_stats(S, where)
        _check_site_samples(S, where)
    au = m.get(ATTENTION_UNOBSERVED, [])
    if not (isinstance(au, list) and len(au) <= 100_000 and all(isinstance(x, str) for x in au)):
        raise TraceError(f"{where}: {ATTENTION_UNOBSERVED!r} must be a list of strings")
    ws = m.get("world_size", 1)
    if not isinstance(ws, int) or isinstance(ws, bool) or not 1 <= ws <= 99_999:
        raise TraceError(f"{where}: invalid world_size {ws!r}")
    return m


def validate_rank_state(st: dict, where: str) -> dict:
    """Check the fields of a ``rank.json`` the analyzer relies on; returns ``st``. Raises :class:`TraceError`."""
    check_version(st.get("format_version"), where)
    if "status" in st and not isinstance(st["status"], str):
        raise TraceError(f"{where}: 'status' must be a string, not {st['status']!r}")
    for k in ("errors", "warnings"):
        v = st.get(k, [])
        if not (isinstance(v, list) and all(isinstance(e, str) for e in v)):
            raise TraceError(f"{where}: {k!r} must be a list of strings")
    for k in ("shards", "steps_flushed", "dropped", "bytes"):
        v = st.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TraceError(f"{where}: {k!r} must be an int >= 0, not {v!r}")
    return st


#: Per-step statistics every activation site carries: per unit (shape [units]) and per site (shape []).
SITE_UNIT_STATS = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")
SITE_SCALAR_STATS = ("count", "nonfinite")
#: Optional per-row scalar of sites whose rows cover windows of several steps
#: (``Recorder(activation_window=N)``): the first step of the row's window (float64, an exact
#: integer); the row's own step is the window's last. Absent: every row covers its step alone.
SITE_WINDOW_STAT = "first_step"
#: Optional transformer-health statistics (absent in traces written before them; see
#: docs/trace-format.md): softmax sites' per-unit ``entropy`` (sum over the unit's rows of the row
#: entropy, nats) and ``logit_max`` (largest softmax input), shape [units]; every other site's
#: scalars ``sum3``, ``sum4`` (sum h^3, h^4), ``n_massive`` (units whose max |h| is above 100x the
#: sampled median |h|) and ``massive_ratio`` (max |h| / sampled median |h|), shape [].
SITE_HEALTH_UNIT_STATS = ("entropy", "logit_max")
SITE_HEALTH_SCALAR_STATS = ("sum3", "sum4", "n_massive", "massive_ratio")


def _check_site_stats(S: dict, where: str) -> None:
    """The statistics the analyzer reads from every site must be declared, with their shapes."""
    st = S["stats"]
    missing = [k for k in SITE_UNIT_STATS + SITE_SCALAR_STATS if k not in st]
    if missing:
        raise TraceError(f"{where}: activation site {S['name']!r} lacks the statistics {', '.join(missing)}")
    for k in SITE_UNIT_STATS:
        if st[k] != [S["units"]]:
            raise TraceError(f"{where}: activation site {S['name']!r} declares {k} of shape {st[k]} for "
                             f"{S['units']} units")
    for k in SITE_HEALTH_UNIT_STATS:
        if k in st and st[k] != [S["units"]]:
            raise TraceError(f"{where}: activation site {S['name']!r} declares {k} of shape {st[k]} for "
                             f"{S['units']} units")
    opt = (SITE_WINDOW_STAT,) + SITE_HEALTH_SCALAR_STATS
    for k in SITE_SCALAR_STATS + tuple(k for k in opt if k in st):
        if st[k] != []:
            raise TraceError(f"{where}: activation site {S['name']!r} declares {k} of shape {st[k]}, not []")


#: Optional site fields of raw samples reduced by the recorder's byte budget (format version 1; absent:
#: K whole inputs): ``sample_rows`` (the most stored inputs per capture step), ``output_shape`` (one
#: input's output shape) and ``sample_stride`` (per axis of it; ``sample_shape`` is then the stored shape).
SITE_SAMPLE_FIELDS = ("sample_rows", "output_shape", "sample_stride")


def _check_site_samples(S: dict, where: str) -> None:
    """The optional budget fields of a site (:data:`SITE_SAMPLE_FIELDS`) must be consistent."""
    rows = S.get("sample_rows", 0)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise TraceError(f"{where}: activation site {S['name']!r} declares a malformed sample_rows")
    if "output_shape" not in S and "sample_stride" not in S:
        return
    out, stride, kept = S.get("output_shape"), S.get("sample_stride"), S["sample_shape"]
    if not (isinstance(out, list) and isinstance(stride, list) and len(out) == len(stride) == len(kept)
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in out)
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 2**31 for d in stride)
            and all(k == -(-n // s) for n, s, k in zip(out, stride, kept))):
        raise TraceError(f"{where}: activation site {S['name']!r} declares inconsistent output_shape, "
                         "sample_stride and sample_shape")


def sample_positions(site: dict) -> list[range]:
    """Per axis of one stored sample row (the batch axis excluded), the positions of the site's output
    that it holds: ``range((n - 1) % s, n, s)`` for an output axis of ``n`` positions with stride ``s``
    (the last position always), ``range(n)`` where the recorder kept every position (``sample_stride``
    absent: traces without a byte budget, and sites within it)."""
    out = site.get("output_shape", site["sample_shape"])
    stride = site.get("sample_stride", [1] * len(out))
    return [range((n - 1) % s if n else 0, n, s) for n, s in zip(out, stride)]


def list_shards(rank_dir: str | os.PathLike) -> tuple[list[tuple[int, str]], list[str]]:
    """Closed shards of one rank in index order, and the names of live (unfinished) shards."""
    closed, live = [], []
    try:
        names = os.listdir(rank_dir)
    except OSError:
        return [], []
    for n in names:
        i = parse_shard_filename(n)
        if i is not None:
            closed.append((i, os.path.join(rank_dir, n)))
        elif n.startswith("shard-") and n.endswith(LIVE_SUFFIX):
            live.append(n)
    closed.sort()
    return closed, sorted(live)


def iter_rank_dirs(run_dir: str | os.PathLike) -> Iterable[tuple[int, str]]:
    """``(rank, path)`` for each rank directory of a run, in rank order."""
    out = []
    for n in os.listdir(run_dir):
        r = parse_rank_dirname(n)
        if r is not None and os.path.isdir(os.path.join(run_dir, n)):
            out.append((r, os.path.join(run_dir, n)))
    return sorted(out)


# Attention captures (RUN/captures/) and feature captures (RUN/features/): see analyzer/trace/captures.py.


# --------------------------------------------------------------------------- function graph
# RUN/graph.json (atomic replace): the operations one forward pass performed (recorder/graph.py).
# {format, format_version, kind="function-graph", model, device, training, total_flops, outputs: [node ids],
#  nodes: [{id, op, func, module, module_type, kind, inputs: [shape], input_dtypes, outputs: [shape],
#           output_dtypes, params: [dotted names], flops}],
#  edges: [{src, dst, arg, shape}], modules: [{name, type, calls, order, depth, kind, n_params, flops, time_s}]}
GRAPH_FILE = "graph.json"
GRAPH_KIND = "function-graph"
_NODE_KEYS = ("id", "op", "module", "inputs", "outputs", "params", "flops")
_MODULE_KEYS = ("name", "type", "calls", "depth", "flops")


def validate_graph(g: Any, where: str) -> dict:
    """Check a function graph (the content of ``graph.json``); returns it unchanged.

    Raises:
        TraceError: one line naming the first problem (wrong kind or version, a node without its
            fields, ids out of order, an edge naming a node that does not exist, negative FLOPs).
    """
    if not isinstance(g, dict) or g.get("format") != FORMAT_NAME or g.get("kind") != GRAPH_KIND:
        raise TraceError(f"{where} is not a bbdecoder function graph")
    check_version(g.get("format_version"), where)
    nodes, edges, mods = g.get("nodes"), g.get("edges"), g.get("modules")
    if not isinstance(nodes, list) or not isinstance(edges, list) or not isinstance(mods, list):
        raise TraceError(f"{where}: 'nodes', 'edges' and 'modules' must be lists")
    for i, n in enumerate(nodes):
        if not isinstance(n, dict) or any(k not in n for k in _NODE_KEYS):
            raise TraceError(f"{where}: node {i} lacks one of {', '.join(_NODE_KEYS)}")
        if n["id"] != i or not isinstance(n["op"], str) or not isinstance(n["module"], str):
            raise TraceError(f"{where}: node {i} has a wrong id, op or module")
        if not isinstance(n["flops"], int) or isinstance(n["flops"], bool) or n["flops"] < 0:
            raise TraceError(f"{where}: node {i} has invalid flops {n['flops']!r:.40}")
        for s in list(n["inputs"]) + list(n["outputs"]):
            if not isinstance(s, list) or not all(isinstance(x, int) and x >= 0 for x in s):
                raise TraceError(f"{where}: node {i} has a malformed shape {s!r:.60}")
        if not isinstance(n["params"], list) or not all(isinstance(p, str) for p in n["params"]):
            raise TraceError(f"{where}: node {i} has malformed params")
    for e in edges:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), int) for k in ("src", "dst")) \
                or not (0 <= e["src"] < e["dst"] < len(nodes)):
            raise TraceError(f"{where}: malformed edge {e!r:.80}")
    for m in mods:
        if not isinstance(m, dict) or any(k not in m for k in _MODULE_KEYS) or not isinstance(m["name"], str):
            raise TraceError(f"{where}: malformed module entry {m!r:.80}")
        t = m.get("time_s")
        if t is not None and not (isinstance(t, (int, float)) and t >= 0):
            raise TraceError(f"{where}: module {m['name']!r} has invalid time_s {t!r}")
    return g
