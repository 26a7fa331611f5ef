"""The public index of a run: ranks, shards, steps, layers, sites, captures, and which rank holds what.

Opening a :class:`Catalog` reads the manifest, every rank's ``rank.json`` and every closed shard's
index (step table and payload shapes; small). No payload value is read here. The analyses use this
interface, never each other's or the :class:`~analyzer.run.Run`'s internals; the catalogue itself
uses only :mod:`analyzer.trace`. numpy only (no pandas): the Run turns these records into tables.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import heap
from .trace import files
from .trace import format as fmt
from .trace.format import TraceError
from .trace.hdf5 import HDF5Backend
from .trace.shards import ReaderPool, ShardReader

#: shard readers a catalogue keeps open inside :meth:`Catalog.keep_open` (about 0.5 MB each)
READERS_KEPT = 32
#: Payload kinds the gradient statistics are read from: per-step statistics, or raw tensors.
GRAD_KINDS = (fmt.KIND_GRAD_STATS, fmt.KIND_GRADS)


@dataclass
class Shard:
    """One closed shard as the catalogue knows it (no values read).

    Attributes:
        rank, index: the rank directory and the shard's number in it.
        path: absolute path. name: ``rank-NNNNN/shard-NNNNNN.h5``, for messages.
        steps: the step table's columns (``STEP_COLUMNS`` -> 1-D arrays).
        payloads: (kind, layer_key, param_key) -> (rows, row shape, chunk rows), in the order the
            shard stores them (packed payloads: column order; a pass that walks them in this order
            reads a packed group a block of columns at a time).
        nbytes: size of the file in bytes.
        offsets: (kind, layer_key, param_key) -> first row (dim 0) in the full tensor, for the raw
            payloads of sharded parameters (FSDP2: this rank's slice; row shape (rows held, ...)).
    """

    rank: int
    index: int
    path: str
    name: str
    steps: dict
    payloads: dict
    nbytes: int
    offsets: dict = field(default_factory=dict)

    def holds(self, kinds: str | Iterable[str], keys: set | None = None) -> bool:
        """Whether this shard holds a payload of one of ``kinds`` (for one of ``keys``, if given:
        a set of (layer_key, param_key) or (site_key, stat))."""
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if keys is not None and len(keys) * len(kinds) < len(self.payloads):   # dict lookups, no scan
            return any((k, a, b) in self.payloads for k in kinds for a, b in keys)
        return any(k[0] in kinds and (keys is None or (k[1], k[2]) in keys) for k in self.payloads)


class Catalog:
    """The index of one run directory.

    Attributes:
        path: absolute path of the run. manifest: the validated manifest (dict).
        layers: layer records of the manifest (dicts: id, key, name, type, params, ...), in id order.
        sites: activation-site records (manifest, plus sites only some rank's ``rank.json`` names).
        shards: every closed shard, by (rank, index). live: unfinished shards (relative names), ignored.
        rank_states: rank -> its ``rank.json`` (or a stand-in when missing).
        problems: one line per thing that was skipped while indexing.
    """

    def __init__(self, path: str | os.PathLike, backend=None):
        self.path = os.path.abspath(os.fspath(path))
        self.backend = backend or HDF5Backend()
        #: readers kept open between analyses only inside :meth:`keep_open`
        self._readers = ReaderPool(self.backend.open, keep=0)
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
        self.manifest = fmt.validate_manifest(files.read_json(os.path.join(p, fmt.MANIFEST), "manifest", root=p),
                                              fmt.MANIFEST)
        #: the manifest's own layer records (not copies), their repeated strings and shapes shared
        #: (100,000 layers: about 60 MB less; see :func:`share_repeated`)
        self.layers: list[dict] = share_repeated(self.manifest["layers"])
        if len(self.layers) >= heap.MANY_LAYERS:   # a pass's large temporaries go back to the OS when freed
            heap.return_large_blocks()
        self._by_key = {L["key"]: L for L in self.layers}
        self._by_id = {L["id"]: L for L in self.layers}
        self._many_params: dict[str, dict] = {}   # layer key -> {param key: record}, layers of many params
        #: parameters that are another layer's parameter (tied weights): (layer_key, param_key) -> the
        #: owner's dotted name; recorded once, under the owner, and counted once
        self.tied = {(L["key"], q["key"]): q["tied_to"] for L in self.layers for q in L["params"] if "tied_to" in q}
        full = {full_name(L, q): (L["key"], q["key"]) for L in self.layers for q in L["params"]
                if "tied_to" not in q} if self.tied else {}
        #: (layer_key, param_key) of a tied entry -> its owner's (where its payloads are)
        self.owner_key = {k: full[n] for k, n in self.tied.items() if n in full}
        #: parameters sharded along dim 0 (FSDP2): every rank records its own slice
        self.sharded = {(L["key"], q["key"]) for L in self.layers for q in L["params"] if "shard_dim" in q}
        self.sites: list[dict] = [dict(S) for S in self.manifest.get("sites", [])]
        self._site_by_key = {S["key"]: S for S in self.sites}
        self.problems: list[str] = []
        self.rank_states: dict[int, dict] = {}
        self._site_conflicts: set[tuple[int, str]] = set()   # (rank, site key) named differently there
        self.shards: list[Shard] = []
        self.live: list[str] = []
        self._captures: list | None = None
        self._scan()
        heap.trim()   # the manifest's text and the shard indexes were read: their heap goes back

    # ------------------------------------------------------------------ indexing
    def expected(self, key: tuple, default=None) -> tuple | None:
        """The row shape the manifest gives a payload ``(kind, layer_key or site_key, param_key or
        stat)`` (``default`` for one it does not name): computed on demand, not kept per payload."""
        kind, a, b = key
        if kind in (fmt.KIND_GRADS, fmt.KIND_WEIGHTS, fmt.KIND_GRAD_STATS):
            q = self._param_record(a, b)
            if q is None:
                return default
            return (len(fmt.GRAD_STAT_FIELDS),) if kind == fmt.KIND_GRAD_STATS else tuple(q["shape"])
        S = self._site_by_key.get(a)
        if S is None:
            return default
        if kind == fmt.KIND_ACT_STATS:
            shp = S["stats"].get(b)
            return default if shp is None else tuple(shp)
        if kind == fmt.KIND_ACTIVATIONS and b == "samples":
            return tuple(S["sample_shape"])
        return default

    def _param_record(self, layer_key: str, param_key: str) -> dict | None:
        """The manifest's record of one parameter (None if it names none)."""
        return _find_param(self._by_key.get(layer_key), param_key, self._many_params)

    def _param(self, layer_key: str, param_key: str) -> dict:
        q = self._param_record(layer_key, param_key)
        if q is None:
            raise KeyError((layer_key, param_key))
        return q

    def _scan(self) -> None:
        from . import shard_index   # it imports this module
        ranks = list(fmt.iter_rank_dirs(self.path))
        for rank, rdir in ranks:
            rfile = os.path.join(rdir, fmt.RANK_FILE)
            if os.path.exists(rfile):
                st = files.read_json(rfile, f"rank file {fmt.rank_dirname(rank)}/{fmt.RANK_FILE}", root=self.path)
                fmt.validate_rank_state(st, f"{fmt.rank_dirname(rank)}/{fmt.RANK_FILE}")
                self.rank_states[rank] = st
                self._add_rank_sites(rank, st)
            else:
                self.rank_states[rank] = {"status": fmt.STATUS_RECORDING}
                self.problems.append(f"{fmt.rank_dirname(rank)} has no {fmt.RANK_FILE}")
            closed, live = fmt.list_shards(rdir)
            self.live += [f"{fmt.rank_dirname(rank)}/{n}" for n in live]
            rules = shard_index.IndexRules(self.path, _Expected(self), self._site_conflicts, self.sharded,
                                           self._readers.borrow, self.problems)
            self.shards += shard_index.index_shards(rules, rank, closed, before_fork=self.close)
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
                self.sites.append(S)
                self._site_by_key[S["key"]] = S
            elif old["name"] != S["name"]:
                self._site_conflicts.add((rank, S["key"]))
                self.problems.append(f"{where}: site key {S['key']!r} is {S['name']!r} there but "
                                     f"{old['name']!r} in the manifest; that rank's values of it are ignored")

    # ------------------------------------------------------------------ open files
    def open_shard(self, shard: Shard) -> ShardReader:
        """A reader of one closed shard, from the pool of open readers (use it in a ``with`` block)."""
        return self._readers.borrow(shard.path, shard.name)

    def close(self) -> None:
        """Close the shard files kept open (idempotent; files are reopened on demand)."""
        self._readers.close()

    def keep_open(self) -> "Catalog":
        """Keep up to ``READERS_KEPT`` shard files open between analyses until the ``with`` block
        ends (then they are closed); nested blocks are allowed."""
        return self

    def __enter__(self) -> "Catalog":
        self._keep_depth += 1
        self._readers.keep = READERS_KEPT
        return self

    def __exit__(self, *exc) -> None:
        self._keep_depth -= 1
        if self._keep_depth <= 0:
            self._keep_depth = 0
            self._readers.keep = 0
            self._readers.close()

    @property
    def open_count(self) -> int:
        """Shard files open right now (idle in the pool or borrowed)."""
        return self._readers.open_count

    # ------------------------------------------------------------------ status
    @property
    def status(self) -> str:
        """"complete" if the recorder closed cleanly on every rank, else "incomplete"."""
        ok = (self.manifest.get("status") == fmt.STATUS_COMPLETE and self.rank_states
              and all(s.get("status") == fmt.STATUS_COMPLETE for s in self.rank_states.values())
              and not self.live and not self.missing_ranks())
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
        missing = self.missing_ranks()
        if missing:
            why.append(f"rank(s) {', '.join(map(str, missing[:8]))} of {self.manifest.get('world_size', 1)} "
                       "wrote nothing")
        if self.live:
            why.append(f"{len(self.live)} unfinished shard(s) ignored ({', '.join(self.live[:3])})")
        return "; ".join(dict.fromkeys(why)) or "incomplete"

    def missing_ranks(self) -> list[int]:
        """Ranks below the manifest's world size that have no rank directory."""
        ws = int(self.manifest.get("world_size", 1))
        return [r for r in range(ws) if r not in self.rank_states]

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_states)

    @property
    def nbytes(self) -> int:
        """Bytes of closed shards on disk."""
        return int(sum(s.nbytes for s in self.shards))

    # ------------------------------------------------------------------ which shard and rank holds what
    def shards_with(self, kinds: str | Iterable[str], keys: set | None = None, rank: int | None = None
                    ) -> list[Shard]:
        """Shards holding a payload of one of ``kinds`` (for one of ``keys``, on ``rank``), by (rank, index)."""
        out = [s for s in self.shards if s.holds(kinds, keys) and (rank is None or s.rank == rank)]
        return sorted(out, key=lambda s: (s.rank, s.index))

    def ranks_with(self, kinds: str | Iterable[str] | None = None, keys: set | None = None) -> list[int]:
        """Ranks whose shards hold a payload of one of ``kinds`` (None: any shard at all), sorted."""
        if kinds is None:
            return sorted({s.rank for s in self.shards})
        return sorted({s.rank for s in self.shards if s.holds(kinds, keys)})

    def lowest_rank(self, kinds: str | Iterable[str] | None = None, keys: set | None = None) -> int:
        """The lowest rank that holds ``kinds`` (None: any shard); 0 when none does. The one rule
        for "which rank a single-rank view shows" (the step table, figures of multi-rank runs)."""
        rs = self.ranks_with(kinds, keys)
        return rs[0] if rs else 0

    # ------------------------------------------------------------------ steps
    def step_columns(self, rank: int | None = None) -> dict[str, np.ndarray]:
        """The step table of one rank (default: :meth:`lowest_rank`), concatenated over its shards in
        shard order: ``STEP_COLUMNS`` -> 1-D arrays (unsorted, possibly repeated steps)."""
        rank = self.lowest_rank() if rank is None else rank
        cols: dict[str, list] = {c: [] for c in fmt.STEP_COLUMNS}
        for s in self.shards:
            if s.rank == rank:
                for c in fmt.STEP_COLUMNS:
                    cols[c].append(s.steps[c])
        return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in cols.items()}

    def step_epochs(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps int64 (S,), epochs int64 (S,)): the sorted, distinct steps of the step table and their
        epochs (first row of a repeated step wins); read-only, kept while the shards stay the same."""
        memo = getattr(self, "_epochs_memo", None)   # asked once per shard and site: keep the answer
        if memo is None or memo[0] != len(self.shards):
            c = self.step_columns()
            s, e = np.asarray(c["step"]).astype(np.int64), np.asarray(c["epoch"]).astype(np.int64)
            order = np.argsort(s, kind="stable")
            s, e = s[order], e[order]
            first = np.diff(s, prepend=s[:1] - 1) != 0   # (empty: empty)
            s, e = s[first], e[first]
            s.flags.writeable = e.flags.writeable = False
            memo = self._epochs_memo = (len(self.shards), (s, e))
        return memo[1]

    def epoch_of(self, steps: np.ndarray) -> np.ndarray:
        """Epoch of each of ``steps`` from the step table; -1 where a step is not in it."""
        s, e = self.step_epochs()
        steps = np.asarray(steps)
        if not len(s):
            return np.full(len(steps), -1, np.int64)
        i = np.clip(np.searchsorted(s, steps), 0, len(s) - 1)
        return np.where(s[i] == steps, e[i], -1)

    # ------------------------------------------------------------------ layers, parameters, sites
    def select(self, layers: Any = None) -> list[int]:
        """Layer ids for a specification (ids, names, globs, type names; see format.select_layers)."""
        return fmt.select_layers(layers, self.layers)

    def layer(self, spec: Any) -> dict:
        """The layer record for one id or name (TraceError unless exactly one matches)."""
        ids = self.select(spec)
        if len(ids) != 1:
            raise TraceError(f"{spec!r} selects {len(ids)} layers; name exactly one")
        return self._by_id[ids[0]]

    def layer_by_id(self, lid: int) -> dict:
        return self._by_id[lid]

    def layer_by_key(self, key: str) -> dict:
        return self._by_key[key]

    def param_keys(self, layers: Any = None) -> tuple[list[int], set]:
        """(layer ids, {(layer_key, param_key)}) of a layer specification; a tied parameter is named
        by its owner's keys (selecting GPT-2's ``lm_head`` gives ``transformer.wte``'s weight)."""
        ids = self.select(layers)
        idset = set(ids)
        keys = {(L["key"], q["key"]) for L in self.layers if L["id"] in idset for q in L["params"]}
        return ids, {self.owner_key.get(k, k) for k in keys}

    def param_shape(self, layer_key: str, param_key: str) -> tuple:
        return tuple(self._param(layer_key, param_key)["shape"])

    def param_name(self, layer_key: str, param_key: str) -> str:
        return self._param(layer_key, param_key)["name"]

    def param_meta(self, layer_key: str, param_key: str) -> tuple[int, str, str, int]:
        """(layer id, layer name, parameter name, numel) of one parameter."""
        L = self._by_key[layer_key]
        q = self._param(layer_key, param_key)
        return L["id"], L["name"], q["name"], math.prod(q["shape"])

    def all_param_keys(self) -> list[tuple[str, str]]:
        """Every (layer_key, param_key) of the manifest, in manifest order (tied ones included)."""
        return list(dict.fromkeys((L["key"], q["key"]) for L in self.layers for q in L["params"]))

    def site(self, key: str) -> dict:
        return self._site_by_key[key]

    # ------------------------------------------------------------------ captures
    def captures(self) -> list:
        """Attention captures of the run (``captures/``), opened once and kept."""
        if self._captures is None:
            from .trace.captures import open_captures
            self._captures = open_captures(self.path)
        return self._captures


def _find_param(L: dict | None, param_key: str, many: dict) -> dict | None:
    """The record of parameter ``param_key`` of layer record ``L`` (None if none; the last of a repeated
    key, as a dict built from the records keeps); layers of many parameters get a dict in ``many``."""
    if L is None:
        return None
    params = L["params"]
    if len(params) <= 8:
        return next((q for q in reversed(params) if q["key"] == param_key), None)
    by = many.get(L["key"])
    if by is None:
        by = many[L["key"]] = {q["key"]: q for q in params}
    return by.get(param_key)


class _Expected:
    """``get((kind, key, key))`` -> the manifest's row shape of a payload (:meth:`Catalog.expected`),
    what :class:`analyzer.shard_index.IndexRules` checks shards against."""

    def __init__(self, catalog: Catalog):
        self.get = catalog.expected
        self._cat = catalog

    def same_key(self, key: tuple) -> tuple:
        """``key`` (kind, key, key) of a payload the manifest names, made of the manifest's own string
        objects: a catalogue keeps no string of a shard's index (their memory goes back; issue 16)."""
        kind, a, b = key
        L = self._cat.layer_by_key(a) if kind in (fmt.KIND_GRADS, fmt.KIND_WEIGHTS, fmt.KIND_GRAD_STATS) else None
        if L is not None:
            return kind, L["key"], self._cat._param(a, b)["key"]
        S = self._cat.site(a)
        return kind, S["key"], next((s for s in S["stats"] if s == b), b)


def share_repeated(layers: list) -> list:
    """``layers`` (the manifest's layer records, a new list of the same dicts), with the repeated
    string values of their fields (layer type and class; parameter name, key and dtype) one object
    per distinct value and equal parameter shapes one list: the values
    stay equal, only copies go (a record's own strings, e.g. its layer name, are kept). Records are
    read, never changed, by the analyzer."""
    strings: dict = {}
    shapes: dict = {}

    def one(d: dict, fields: tuple) -> None:
        for f in fields:
            v = d.get(f)
            if type(v) is str:
                d[f] = strings.setdefault(v, v)

    for L in layers:
        one(L, ("type", "class"))
        for q in L.get("params", ()):
            one(q, ("name", "key", "dtype"))
            shp = q.get("shape")
            if type(shp) is list and len(shp) <= 8 and all(type(x) is int for x in shp):
                q["shape"] = shapes.setdefault(tuple(shp), shp)
    return list(layers)


def full_name(L: dict, q: dict) -> str:
    """The dotted name of parameter entry ``q`` of layer record ``L`` (its own name for the root)."""
    return f"{L['name']}.{q['name']}" if L["name"] else q["name"]


def _tied_names(catalog: Catalog) -> dict[str, list[str]]:
    """Owner's dotted name -> the dotted names of the entries ``tied_to`` it, in manifest order."""
    out: dict[str, list[str]] = {}
    for L in catalog.layers:
        for q in L["params"]:
            if "tied_to" in q:
                out.setdefault(q["tied_to"], []).append(full_name(L, q))
    return out


def param_aliases(catalog: Catalog, layer_key: str, param_key: str) -> list[str]:
    """Every dotted name of one parameter object, its recorded (owner's) name first: one name unless
    the parameter is tied (``tied_to``/``aliases`` in the manifest) or its module is shared."""
    L = catalog.layer_by_key(layer_key)
    q = next(q for q in L["params"] if q["key"] == param_key)
    name = catalog.tied.get((layer_key, param_key), full_name(L, q))
    if "tied_to" in q:   # the owner's entry holds the aliases
        lk, pk = catalog.owner_key.get((layer_key, param_key), (layer_key, param_key))
        L = catalog.layer_by_key(lk)
        q = next(q for q in L["params"] if q["key"] == pk)
    out = [name] + [a for a in q.get("aliases", []) if isinstance(a, str)] + _tied_names(catalog).get(name, [])
    return list(dict.fromkeys(out))


def shared_names(catalog: Catalog) -> list[dict]:
    """Parameters and modules known under more than one name, from the manifest (none for a trace
    recorded before ``aliases`` existed): dicts {"kind": "param" or "module", "name": the recorded
    name, "aliases": [the other names], "numel": elements (0 for a module)}."""
    tied = _tied_names(catalog)
    out = []
    for L in catalog.layers:
        if L.get("aliases"):
            out.append({"kind": "module", "name": L["name"], "aliases": list(L["aliases"]), "numel": 0})
        for q in L["params"]:
            name = full_name(L, q)
            if "tied_to" in q or not (q.get("aliases") or name in tied):
                continue
            others = list(dict.fromkeys(a for a in q.get("aliases", []) + tied.get(name, []) if a != name))
            out.append({"kind": "param", "name": name, "aliases": others,
                        "numel": int(np.prod(q["shape"], dtype=np.int64))})
    return out


def unique_params(catalog: Catalog) -> int:
    """Parameter elements of the model, each parameter object counted once (a tied one under its
    owner only): ``sum(p.numel() for p in model.parameters())`` of the recorded model."""
    return int(sum(math.prod(q["shape"]) for L in catalog.layers for q in L["params"]
                   if "tied_to" not in q))


#: the columns of :func:`rank_rows`
RANK_COLUMNS = ["rank", "status", "shards", "live", "steps", "first_step", "last_step", "bytes", "grads",
                "weights", "activations"]


def rank_rows(catalog: Catalog) -> list[dict]:
    """One dict per rank directory of ``catalog`` (keys :data:`RANK_COLUMNS`): rank, status (from its rank.json),
    shards (closed), live (unfinished shards), steps (distinct steps of its step tables),
    first_step, last_step (float; NaN if none), bytes (closed shards), grads, weights,
    activations (whether its shards hold any)."""
    rows = []
    for r in catalog.ranks:
        sh = [s for s in catalog.shards if s.rank == r]
        st = np.concatenate([np.asarray(s.steps["step"], np.int64) for s in sh]) if sh else np.zeros(0, np.int64)
        kinds = {k[0] for s in sh for k, v in s.payloads.items() if v[0]}
        rows.append({"rank": r, "status": str(catalog.rank_states[r].get("status", "unknown")), "shards": len(sh),
                     "live": sum(n.startswith(fmt.rank_dirname(r) + "/") for n in catalog.live),
                     "steps": int(len(np.unique(st))),
                     "first_step": float(st.min()) if len(st) else np.nan,
                     "last_step": float(st.max()) if len(st) else np.nan,
                     "bytes": int(sum(s.nbytes for s in sh)), "grads": bool(kinds & set(GRAD_KINDS)),
                     "weights": fmt.KIND_WEIGHTS in kinds, "activations": fmt.KIND_ACT_STATS in kinds})
    return rows

def recorded_summary(catalog: Catalog) -> dict:
    """What ``catalog``'s trace holds: per payload kind, {"steps": distinct steps, "layers": layers (or
    sites) covered, "tensors": stored rows}. Reads the step indices of every payload, no values."""
    out = {}
    for kind in fmt.PAYLOAD_KINDS:
        steps: set = set()
        layers: set = set()
        rows = 0
        for s in catalog.shards:
            for (k, lk, pk), (n, _, _) in s.payloads.items():
                if k == kind and n:
                    rows += n
                    layers.add(lk)
        # distinct steps: the union of the step indices of every payload (a parameter without a
        # gradient at some steps has fewer); the indices are small, the values are not read. The
        # payloads of a packed group share one step index: each distinct index is added once.
        for s in catalog.shards:
            keys = [key for key in s.payloads if key[0] == kind]
            if keys:
                seen: set = set()
                with catalog.open_shard(s) as r:
                    for key in keys:
                        st = np.asarray(r.read_payload_steps(*key), np.int64)
                        sig = st.tobytes()
                        if sig not in seen:
                            seen.add(sig)
                            steps.update(st.tolist())
        out[kind] = {"steps": len(steps), "layers": len(layers), "tensors": rows}
    return out
