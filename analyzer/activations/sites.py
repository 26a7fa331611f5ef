"""Activation sites: selection, reading and merging the recorded per-unit statistics, raw samples,
and the per-unit statistics table (torch-free). See :mod:`analyzer.activations` for the definitions.

Tables keep their dtypes when empty (step, epoch, unit, count, nonfinite: int64), so that a site
without recorded steps, or a step range that holds none, gives an empty table of the usual shape.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..stats import RULES, UnitSums, combine
from ..trace import format as fmt
from ..trace.format import TraceError

PER_UNIT = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")
#: a row's first step (rows of windows of several steps); its merge over ranks: the minimum (equal)
FIRST = fmt.SITE_WINDOW_STAT


#: health statistics merged by their maximum (the others add): see docs/trace-format.md
MAX_STATS = ("logit_max", "n_massive", "massive_ratio")


#: Bytes of per-unit statistics kept per catalogue between reads (float64): a report reads every site
#: several times (the findings, the dead-unit sweep at several thresholds, saturation, the overview),
#: each an HDF5 read per shard and statistic otherwise.
CACHE_BYTES = 32 << 20


class _Cache:
    """Arrays read from a run's shards, by key, within a byte budget. Arrays are kept in the order they
    are first read until the budget is full; later ones are read each time and not kept. The reads
    repeat one scan over every site, so when the sites do not all fit the first ones still come from
    here on every scan (a least-recently-used cache would evict each array just before it is read
    again, and keep nothing useful). Shards are immutable once closed and a key holds the payload's
    row count, so a kept array never goes stale."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: dict = {}
        self.nbytes = 0
        self.offered: set = set()   # shards whose statistics were all offered at once (:func:`_prefetch`)
        self.whole: bool | None = None   # whether every shard's activation statistics fit the budget

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        v = self.items.get(key)
        if v is not None:
            return v
        v = load()
        self.put(key, v)
        return v

    def put(self, key: tuple, v: np.ndarray) -> None:
        """Keep ``v`` (read-only from now on) if it fits the budget left."""
        if key not in self.items and self.nbytes + v.nbytes <= self.budget:
            v.flags.writeable = False
            self.items[key] = v
            self.nbytes += v.nbytes


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # catalogue -> its _Cache


def _cache(catalog) -> _Cache:
    c = _CACHES.get(catalog)
    if c is None:
        c = _CACHES[catalog] = _Cache(CACHE_BYTES)
    return c


def _rule(stat: str) -> str:
    return "min" if stat == FIRST else "max" if stat in MAX_STATS else UnitSums.rule(stat)


#: smooth sign-preserving kinds (GELU erf and tanh forms, QuickGELU, SiLU/Swish, Mish): family
#: "smooth". Traces written before it called GELU and SiLU family "relu": :func:`site_family` corrects.
SMOOTH_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "mish")
#: kinds whose values at or below 0 are read as zero-gradient (saturation: the share <= 0)
RELU_KINDS = ("relu", "leaky_relu", "elu", "softplus")


def site_family(S: dict) -> str:
    """The family a site is judged by: "relu", "smooth" (:data:`SMOOTH_KINDS`, by kind whatever the
    trace says), "bounded" or "other"."""
    kind = S.get("kind")
    if kind in SMOOTH_KINDS:
        return "smooth"
    if kind in RELU_KINDS:
        return "relu"
    fam = S.get("family")
    return fam if fam in ("relu", "bounded") else "other"


def attention_note(run) -> str | None:
    """Why attention probabilities are missing from the trace, with how to get them; None when the
    recorder saw no fused attention (the manifest's optional ``attention_unobserved``: module paths
    that called ``F.scaled_dot_product_attention`` in the first training forward, or
    ``attn_implementation=<name>`` of a Hugging Face config naming a fused kernel)."""
    where = run.catalog.manifest.get("attention_unobserved")
    if not where:
        return None
    shown = ", ".join(w or "(model)" for w in where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
    return (f"attention probabilities were not observable: attention ran in a fused kernel "
            f"(scaled_dot_product_attention or flash) in {shown}, so there is no softmax site. To record them, "
            "use eager attention on a probe batch or a few steps: attn_implementation=\"eager\" in transformers "
            "(from_pretrained(...) or model.set_attn_implementation(\"eager\"))")


def is_windowed(site: dict) -> bool:
    """True when the site's rows cover windows of steps (``Recorder(activation_window=N)``, N > 1)."""
    return FIRST in site["stats"]


# --------------------------------------------------------------------------- selection and reading

def site_table(run) -> pd.DataFrame:
    """One row per activation site: name, key, kind, family (as judged: :func:`site_family`), source,
    module, units, unit_axis."""
    cols = ["name", "key", "kind", "family", "source", "module", "units", "unit_axis"]
    return pd.DataFrame([{c: S.get(c) for c in cols} | {"family": site_family(S)} for S in run.catalog.sites],
                        columns=cols)


def select_sites(run, spec: Any = None) -> list[dict]:
    """Sites for a specification: None (all), exact names, globs over names, kinds ("relu",
    "sigmoid", ...), families ("relu", "bounded"), or a comma-separated string of those."""
    sites = run.catalog.sites
    if spec is None:
        return list(sites)
    items = []
    for it in (spec if isinstance(spec, (list, tuple)) else [spec]):
        items.extend(s.strip() for s in str(it).split(",") if s.strip())
    out, seen = [], set()
    for it in items:
        hit = [S for S in sites if S["name"] == it] or \
              ([S for S in sites if fnmatch.fnmatchcase(S["name"], it)] if any(c in it for c in "*?[") else []) or \
              [S for S in sites if S["kind"] == it or site_family(S) == it or S.get("module") == it]
        if not hit:
            known = ", ".join(repr(S["name"]) for S in sites[:6]) or "none recorded"
            raise TraceError(f"unknown activation site {it!r} (known: {known})")
        for S in hit:
            if S["key"] not in seen:
                seen.add(S["key"])
                out.append(S)
    return out


def select_site(run, spec: Any) -> dict:
    s = select_sites(run, spec)
    if len(s) != 1:
        raise TraceError(f"{spec!r} selects {len(s)} activation sites; name exactly one")
    return s[0]


def steps_filter(steps_arg):
    """A step selection as a function of a steps array (k,) -> bool mask (k,).

    Args:
        steps_arg: None (every step), a half-open ``(start, stop)`` range (either end None: open),
            or an iterable of steps."""
    if steps_arg is None:
        return lambda s: np.ones(len(s), bool)
    if isinstance(steps_arg, tuple) and len(steps_arg) == 2:
        a, b = steps_arg
        return lambda s: (s >= (a if a is not None else -np.inf)) & (s < (b if b is not None else np.inf))
    want = np.asarray(sorted(int(x) for x in steps_arg), np.int64)
    return lambda s: np.isin(s, want)


def iter_site_stats(run, site: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None, rank=None):
    """Yield ``(steps (k,), {stat: array (k, ...)}, rank)`` shard by shard for one site: every shard of
    the lowest rank in step order, then those of the next rank (each rank records its own
    activations under torch.distributed). ``rank``: only that rank's shards. Per-rank rows: use
    :func:`iter_merged_site_stats` for statistics summed over ranks.

    A row's step is the last step it covers: a site recorded in windows of several steps
    (:func:`is_windowed`) has one row per window, and its rows also carry ``first_step`` (the window's
    first step; ``steps`` selects rows by their last step)."""
    keep = steps_filter(steps)
    want = [s for s in stats if s in site["stats"]]
    if want and is_windowed(site) and FIRST not in want:
        want.append(FIRST)
    shards = run.catalog.shards_with(fmt.KIND_ACT_STATS, {(site["key"], want[0])}, rank=rank)
    cache = _cache(run.catalog)
    K, key = fmt.KIND_ACT_STATS, site["key"]
    if cache.whole is None:   # all of them fit: each shard is read once, every site at once
        cache.whole = sum(_act_bytes(sh) for sh in run.catalog.shards) <= cache.budget
    for sh in shards:
        r = _LazyReader(run.catalog, sh)   # opened only for what the cache does not hold
        try:
            skey = (sh.path, K, key, "steps", sh.payloads[(K, key, want[0])][0])
            if cache.whole and sh.path not in cache.offered and (skey not in cache.items or any(
                    (sh.path, K, key, s, sh.payloads[(K, key, s)][0]) not in cache.items
                    for s in want if (K, key, s) in sh.payloads)):
                _prefetch(cache, sh, r)
            st = cache.get(skey, lambda: np.asarray(r.get().read_payload_steps(K, key, want[0])))
            m = keep(st)
            if not m.any():
                continue
            out = {}
            for s in want:
                if (K, key, s) not in sh.payloads:
                    raise TraceError(f"corrupt shard {sh.name}: site {site['name']} lacks {s!r}")
                rows = sh.payloads[(K, key, s)][0]
                if rows != len(st):
                    raise TraceError(f"corrupt shard {sh.name}: site {site['name']} {s!r} has {rows} rows, "
                                     f"expected {len(st)}")
                out[s] = cache.get((sh.path, K, key, s, rows), lambda s=s, rows=rows: np.asarray(
                    r.get().read_payload(K, key, s, 0, rows), np.float64))[m]
        finally:
            r.close()
        yield st[m], out, sh.rank


def _act_items(sh) -> list:
    """[(site key, statistic, rows, row shape)] of the activation statistics shard ``sh`` stores."""
    return [(k[1], k[2], int(v[0]), tuple(v[1])) for k, v in sh.payloads.items()
            if k[0] == fmt.KIND_ACT_STATS and v[0]]


def _act_bytes(sh, items: list | None = None) -> int:
    """Bytes the cache needs for every activation statistic of shard ``sh`` (float64, with steps);
    ``items``: its :func:`_act_items`, if already at hand."""
    items = _act_items(sh) if items is None else items
    return sum(rows * (math.prod(shape) + 1) * 8 for _, _, rows, shape in items)


def _prefetch(cache: _Cache, sh, r: "_LazyReader") -> None:
    """Offer every activation statistic of shard ``sh`` (all sites) to ``cache`` at once, when all of
    it fits the room left; once per shard. Used when the whole run's statistics fit the cache: a long
    run of a small model (hundreds of small shards) then opens each shard once, not once per site and
    scan (the reader holds a flat group's values whole, so the other sites cost no further read). A
    statistic that cannot be read is left out here (it is refused when its site is asked for)."""
    cache.offered.add(sh.path)
    K = fmt.KIND_ACT_STATS
    items = _act_items(sh)
    first = {}
    for lk, pk, rows, _ in items:
        first.setdefault(lk, (pk, rows))
    if not items or _act_bytes(sh, items) > cache.budget - cache.nbytes:
        return
    for lk, (pk, rows) in first.items():
        try:
            cache.put((sh.path, K, lk, "steps", rows), np.asarray(r.get().read_payload_steps(K, lk, pk)))
        except TraceError:
            continue
    for lk, pk, rows, _ in items:
        try:
            cache.put((sh.path, K, lk, pk, rows), np.asarray(r.get().read_payload(K, lk, pk, 0, rows), np.float64))
        except TraceError:
            continue


class _LazyReader:
    """A shard's reader, borrowed from the catalogue's pool at the first :meth:`get` (a scan whose
    arrays all come from the cache opens no file) and given back by :meth:`close`."""

    def __init__(self, catalog, shard):
        self._catalog, self._shard, self._r = catalog, shard, None

    def get(self):
        if self._r is None:
            self._r = self._catalog.open_shard(self._shard)
        return self._r

    def close(self) -> None:
        if self._r is not None:
            self._r, r = None, self._r
            r.close()


def _site_ranks(run, site: dict, stat: str) -> list[int]:
    return run.catalog.ranks_with(fmt.KIND_ACT_STATS, {(site["key"], stat)})


def _combine(out: dict, idx: np.ndarray, d: dict) -> None:
    """Add one rank's rows ``d`` (unique steps) into the merged rows ``out[idx]`` by each statistic's
    merge rule (:class:`analyzer.stats.UnitSums`): minima of ``min``, maxima of ``max``, sums of
    everything else (counts, sums, n_pos, histograms). NaN propagates, as on the device."""
    for s, v in d.items():
        out[s][idx] = combine(_rule(s), out[s][idx], v)


def iter_merged_site_stats(run, site: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None):
    """Yield ``(steps (k,), {stat: array (k, ...)})`` for one site in increasing step order, each step's
    statistics merged over every rank that recorded it (torch.distributed: each rank records its own
    samples): counts, sums, sums of squares, n_pos and histograms add, min of the minima, max of the
    maxima. Streams: holds at most about one shard's rows per rank."""
    want = [s for s in stats if s in site["stats"]]
    ranks = _site_ranks(run, site, want[0]) if want else []
    if len(ranks) <= 1:
        for st, d, _ in iter_site_stats(run, site, stats, steps):
            yield st, d
        return
    gens = {r: iter_site_stats(run, site, stats, steps, rank=r) for r in ranks}
    buf: dict[int, list] = {r: [] for r in ranks}    # per rank: [(steps, d)] not yet merged
    while gens or any(buf.values()):
        for r in list(gens):                        # every open rank holds at least one block
            if not buf[r]:
                nxt = next(gens[r], None)
                if nxt is None:
                    del gens[r]
                else:
                    buf[r].append(nxt[:2])
        if not any(buf.values()):
            break
        # steps up to the smallest "last buffered step" of the open ranks are complete on every rank
        upto = min((buf[r][-1][0][-1] for r in gens if buf[r]), default=np.iinfo(np.int64).max)
        parts = []
        for r in ranks:
            keep_r = []
            for st, d in buf[r]:
                m = st <= upto
                if m.all():
                    parts.append((st, d))
                elif m.any():
                    parts.append((st[m], {s: v[m] for s, v in d.items()}))
                    keep_r.append((st[~m], {s: v[~m] for s, v in d.items()}))
                else:
                    keep_r.append((st, d))
            buf[r] = keep_r
        if not parts:
            continue
        allst = np.unique(np.concatenate([st for st, _ in parts]))
        out = {}
        for s, v in parts[0][1].items():
            out[s] = np.full((len(allst),) + v.shape[1:], RULES[_rule(s)], np.float64)
        for st, d in parts:
            _combine(out, np.searchsorted(allst, st), d)
        yield allst, out


def samples(run, site: Any, steps=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw activation samples of one site: ``(steps (n,), values (n, *sample_shape))``, one row per
    sample (several rows per recorded step). Loads the selected steps into memory. ``site``: a
    specification or a site record (a dict of ``run.catalog.sites``). Under the recorder's byte budget
    (``activation_sample_bytes``) a site may hold fewer rows per step and, along the non-unit axes, a
    strided subset of the output's positions: ``sample_shape`` is the stored shape and
    :func:`analyzer.trace.format.sample_positions` gives the positions each axis holds."""
    S = site if isinstance(site, dict) and "key" in site else select_site(run, site)
    keep = steps_filter(steps)
    st_all, vals = [], []
    key = (fmt.KIND_ACTIVATIONS, S["key"], "samples")
    for sh in run.catalog.shards_with(fmt.KIND_ACTIVATIONS, {(S["key"], "samples")}):
        with run.catalog.open_shard(sh) as r:
            st = r.read_payload_steps(*key)
            m = keep(st)
            if m.any():
                v = r.read_payload(*key, 0, len(st))
                st_all.append(st[m])
                vals.append(np.asarray(v)[m])
    if not st_all:
        return np.zeros(0, np.int64), np.zeros((0, *S["sample_shape"]), np.float32)
    return np.concatenate(st_all), np.concatenate(vals)


# --------------------------------------------------------------------------- statistics tables

STAT_COLUMNS = ["count", "mean", "abs_mean", "std", "min", "max", "frac_active", "apoz", "nonfinite"]
_INT_COLUMNS = {"step": "int64", "first_step": "int64", "epoch": "int64", "unit": "int64", "count": "int64", "nonfinite": "int64"}


def empty_table(cols, types: dict) -> pd.DataFrame:
    """An empty table with the columns' proper dtypes (int columns stay int, bools stay bool)."""
    return pd.DataFrame({c: pd.Series([], dtype=types.get(c, "float64" if c not in ("site", "kind") else object))
                         for c in cols})


def _unit_frame(site, steps, epochs, cols: dict) -> pd.DataFrame:
    k, U = len(epochs), site["units"]
    d = {}
    if steps is not None:
        d["step"] = np.repeat(np.asarray(steps, np.int64), U)
        d[FIRST] = np.repeat(np.asarray(cols.pop(FIRST, steps), np.int64), U)
    d.update({"epoch": np.repeat(np.asarray(epochs, np.int64), U), "site": site["name"], "kind": site["kind"],
              "unit": np.tile(np.arange(U, dtype=np.int64), k)})
    for c, v in cols.items():
        d[c] = np.asarray(v).reshape(-1) if np.ndim(v) == 2 else np.repeat(v, U)
    return pd.DataFrame(d)


def _stats_frame(S, steps, epochs, d) -> pd.DataFrame:
    n = d["count"][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = d["sum"] / n
        var = np.maximum(d["sumsq"] / n - mean ** 2, 0.0)
        fa = d["n_pos"] / n
        abs_mean = d["sum_abs"] / n
    return _unit_frame(S, steps, epochs, {"count": d["count"].astype(np.int64), "mean": mean,
                                          "abs_mean": abs_mean, "std": np.sqrt(var), "min": d["min"],
                                          "max": d["max"], "frac_active": fa, "apoz": 1.0 - fa,
                                          "nonfinite": d["nonfinite"].astype(np.int64),
                                          **({FIRST: d[FIRST]} if FIRST in d else {})})


def site_blocks(run, S: dict, stats=PER_UNIT + ("count", "nonfinite"), steps=None, by_rank: bool = False):
    """``(steps, {stat: rows}, rank)`` blocks of one site: merged over ranks (rank None) unless ``by_rank``."""
    if by_rank:
        yield from iter_site_stats(run, S, stats, steps)
    else:
        for st, d in iter_merged_site_stats(run, S, stats, steps):
            yield st, d, None


def activation_stats(run, per: str = "step", sites: Any = None, steps=None, by_rank: bool = False) -> pd.DataFrame:
    """Per-unit activation statistics.

    Returns one row per (step, site, unit) (``per="step"``) or per (epoch, site, unit) (``per="epoch"``,
    pooled over every recorded step of the epoch, however the steps are split into shards) with:
    count (values per unit), mean, abs_mean (E|h|), std (population), min, max, frac_active
    (fraction of values > 0), apoz (= 1 - frac_active: the fraction at or below 0; NaN values count
    here too), nonfinite (NaN/Inf values of the whole site at that step or epoch, repeated per
    unit). NaN and Inf values enter the sums as they are (a NaN makes that unit's mean, min, ... NaN).

    Windows (``Recorder(activation_window=N)``, N > 1): ``per="step"`` gives one row per window (and
    unit), at the window's last step, with a ``first_step`` column (the window's first step; present
    when a selected site is windowed): its statistics pool every value of the window's steps. A window
    never spans two epochs, so ``per="epoch"`` pools exactly the epoch's values either way.

    Several ranks (torch.distributed, each rank records its own samples): each step's row pools
    every rank's values (counts and sums add, min of minima, max of maxima), unless ``by_rank``
    (``per="step"`` only): then one row per (rank, step, site, unit) with a leading ``rank`` column.
    """
    if per not in ("step", "epoch"):
        raise ValueError(f"per must be 'step' or 'epoch', not {per!r}")
    frames = []
    ranks: set = set()
    chosen = select_sites(run, sites)
    windowed = per == "step" and any(is_windowed(S) for S in chosen)
    for S in chosen:
        pooled: dict = {}
        for st, d, rank in site_blocks(run, S, steps=steps, by_rank=by_rank and per == "step"):
            ranks.add(rank)
            ep = run.catalog.epoch_of(st)
            if per == "step":
                f = _stats_frame(S, st, ep, d)
                f["rank"] = rank
                frames.append(f)
                continue
            for e in np.unique(ep):   # an epoch pools every rank's values
                if int(e) not in pooled:
                    pooled[int(e)] = UnitSums.of(d, ep == e)
                else:
                    pooled[int(e)].update(d, ep == e)
        for e in sorted(pooled):
            frames.append(_stats_frame(S, None, np.array([e]),
                                       {k: np.asarray(v)[None] for k, v in pooled[e].compute().items()}))
    multi = per == "step" and len(ranks) > 1
    cols = (["rank"] if multi else []) + (["step"] if per == "step" else []) + ([FIRST] if windowed else []) \
        + ["epoch", "site", "kind", "unit"] + STAT_COLUMNS
    if not frames:
        return empty_table(cols, _INT_COLUMNS)
    df = pd.concat(frames, ignore_index=True)[cols]
    if per == "epoch":
        df = df.sort_values(["epoch"], kind="stable").reset_index(drop=True)
    return df
