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

from .trace import files
from .trace import format as fmt
from .trace.format import TraceError
from .trace.hdf5 import HDF5Backend
from .trace.shards import ReaderPool, ShardReader

#: shard readers a catalogue keeps open between analyses inside :meth:`Catalog.keep_open`
READERS_KEPT = 8
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
        self.layers: list[dict] = [dict(L) for L in self.manifest["layers"]]
        self._by_key = {L["key"]: L for L in self.layers}
        self._by_id = {L["id"]: L for L in self.layers}
        self._param_shape = {(L["key"], q["key"]): tuple(q["shape"]) for L in self.layers for q in L["params"]}
        self._param_name = {(L["key"], q["key"]): q["name"] for L in self.layers for q in L["params"]}
        #: parameters that are another layer's parameter (tied weights): (layer_key, param_key) -> the
        #: owner's dotted name; recorded once, under the owner, and counted once
        self.tied = {(L["key"], q["key"]): q["tied_to"] for L in self.layers for q in L["params"] if "tied_to" in q}
        full = {full_name(L, q): (L["key"], q["key"]) for L in self.layers for q in L["params"] if "tied_to" not in q}
        #: (layer_key, param_key) of a tied entry -> its owner's (where its payloads are)
        self.owner_key = {k: full[n] for k, n in self.tied.items() if n in full}
        #: parameters sharded along dim 0 (FSDP2): every rank records its own slice
        self.sharded = {(L["key"], q["key"]) for L in self.layers for q in L["params"] if "shard_dim" in q}
        self.sites: list[dict] = [dict(S) for S in self.manifest.get("sites", [])]
        self._site_by_key = {S["key"]: S for S in self.sites}
        self._expected: dict[tuple, tuple] = {}
        for (lk, pk), shp in self._param_shape.items():
            self._expected[(fmt.KIND_GRADS, lk, pk)] = shp
            self._expected[(fmt.KIND_GRAD_STATS, lk, pk)] = (len(fmt.GRAD_STAT_FIELDS),)
            self._expected[(fmt.KIND_WEIGHTS, lk, pk)] = shp
        for S in self.sites:
            self._expect_site(S)
        self.problems: list[str] = []
        self.rank_states: dict[int, dict] = {}
        self._site_conflicts: set[tuple[int, str]] = set()   # (rank, site key) named differently there
        self.shards: list[Shard] = []
        self.live: list[str] = []
        self._captures: list | None = None
        self._scan()

    # ------------------------------------------------------------------ indexing
    def _expect_site(self, S: dict) -> None:
        for stat, shp in S["stats"].items():
            self._expected[(fmt.KIND_ACT_STATS, S["key"], stat)] = tuple(shp)
        self._expected[(fmt.KIND_ACTIVATIONS, S["key"], "samples")] = tuple(S["sample_shape"])

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
            rules = shard_index.IndexRules(self.path, self._expected, self._site_conflicts, self.sharded,
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
                self._expect_site(S)
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
        """(steps int64 (S,), epochs int64 (S,)): the sorted, distinct steps of the step table and
        their epochs (first row of a repeated step wins)."""
        c = self.step_columns()
        s = np.asarray(c["step"]).astype(np.int64)
        e = np.asarray(c["epoch"]).astype(np.int64)
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        first = np.ones(len(s), bool)
        first[1:] = s[1:] != s[:-1]
        return s[first], e[first]

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
        return self._param_shape[(layer_key, param_key)]

    def param_name(self, layer_key: str, param_key: str) -> str:
        return self._param_name[(layer_key, param_key)]

    def param_meta(self, layer_key: str, param_key: str) -> tuple[int, str, str, int]:
        """(layer id, layer name, parameter name, numel) of one parameter."""
        L = self._by_key[layer_key]
        shape = self._param_shape[(layer_key, param_key)]
        return L["id"], L["name"], self._param_name[(layer_key, param_key)], math.prod(shape)

    def all_param_keys(self) -> list[tuple[str, str]]:
        """Every (layer_key, param_key) of the manifest, in manifest order (tied ones included)."""
        return list(self._param_shape)

    def site(self, key: str) -> dict:
        return self._site_by_key[key]

    # ------------------------------------------------------------------ captures
    def captures(self) -> list:
        """Attention captures of the run (``captures/``), opened once and kept."""
        if self._captures is None:
            from .trace.captures import open_captures
            self._captures = open_captures(self.path)
        return self._captures


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
