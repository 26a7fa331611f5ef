"""Per-shard passes over gradients and weights, mapped over the shards locally or with dask.

Every pass is a pure function of one shard (opened by path inside the call) that returns partial
results: per-step rows (complete: a step lives in one shard of a rank) and mergeable accumulators
(:class:`analyzer.stats.ElementwiseMoments` per (parameter, epoch), merged across shards with their
declared merge rule). The ``local`` engine calls them one shard after the other in this process,
for groups of parameters split across the CPUs available (:func:`split_pass`: the other groups in
forked workers; a parameter's rows all in one group, so the numbers are those of one process);
the ``dask`` engine (optional extra: ``pip install bbdecoder[dask]``) submits them to a dask
cluster, at most a few shards ahead, and consumes the results in the same order, so both engines
merge the same partial results in the same order and give the same numbers.

dask is imported only when the dask engine is used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from .trace import format as fmt
from .trace.format import TraceError
from .trace import workers
from .trace.hdf5 import HDF5Backend
from .slices import grad_sums
from .stats import PIECE_ELEMS, ElementwiseMoments, row_moments, stats_from_sums

ENGINES = ("local", "dask")

#: Bytes of stored data read per block (rows are chunk-aligned); bounds the memory of every pass.
BLOCK_BYTES = 32 << 20

#: Passes over less than this many stored bytes are not split across processes (:func:`split_keys`).
SPLIT_MIN_BYTES = 64 << 20

#: Environment variable: address of a running dask scheduler for ``engine="dask"`` (else a local cluster).
SCHEDULER_ENV = "BBDECODER_DASK_SCHEDULER"


def check_engine(engine: str) -> str:
    """Validate an engine name; for "dask", also that dask.distributed can be imported.

    Raises:
        ValueError: unknown engine, or dask missing (one line naming the extra to install).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "dask":
        try:
            import dask  # noqa: F401
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError("the dask engine needs dask.distributed: pip install 'bbdecoder[dask]' "
                             "(or: pip install 'dask[distributed]')") from None
    return engine


@dataclass
class ShardContext:
    """What a shard task needs besides the shard: small and picklable.

    Attributes:
        meta: (layer_key, param_key) -> (layer id, layer name, param name, numel).
        step: (S,) int64 recorded steps of the step table (sorted); epoch: (S,) their epochs.
        block_bytes: bytes of stored data per read.
        sharded: (layer_key, param_key) of the sharded parameters (each rank holds a slice).
    """

    meta: dict
    step: np.ndarray
    epoch: np.ndarray
    block_bytes: int
    backend: Any = None
    extra: dict = field(default_factory=dict)
    sharded: frozenset = frozenset()

    def epoch_of(self, steps: np.ndarray) -> np.ndarray:
        """Epoch of each step (-1 for a step not in the step table)."""
        return epoch_lookup(self.step, self.epoch, steps)


def shard_context(catalog) -> ShardContext:
    """What a per-shard task of ``catalog``'s run needs: parameter metadata, the step table (its
    sorted distinct steps and their epochs) and :data:`BLOCK_BYTES`."""
    step, epoch = catalog.step_epochs()
    meta = {(lk, pk): catalog.param_meta(lk, pk) for (lk, pk) in catalog.all_param_keys()}
    backend = None if isinstance(catalog.backend, HDF5Backend) else catalog.backend
    return ShardContext(meta, step, epoch, BLOCK_BYTES, backend, sharded=frozenset(catalog.sharded))


def epoch_lookup(step: np.ndarray, epoch: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Epochs (int64, like ``steps``) of ``steps`` in a sorted step table; -1 where absent."""
    if not len(step):
        return np.full(len(steps), -1, np.int64)
    i = np.clip(np.searchsorted(step, steps), 0, len(step) - 1)
    return np.where(step[i] == steps, epoch[i], -1)


def shard_blocks(reader, shard, kind: str, keys: set, block_bytes: int
                 ) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Yield (layer_key, param_key, steps (k,), values (k, *shape)) for the payloads of ``kind`` in
    ``keys`` of one open shard, in key order, in chunk-aligned blocks of at most about ``block_bytes``."""
    for (k, lk, pk), (rows, shape, chunk) in sorted(shard.payloads.items()):
        if k != kind or (lk, pk) not in keys or not rows:
            continue
        steps = reader.read_payload_steps(kind, lk, pk)
        row_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * 4)
        per = max(1, block_bytes // row_bytes)
        if per >= chunk:
            per -= per % chunk  # whole chunks per read
        for a in range(0, rows, per):
            b = min(rows, a + per)
            yield lk, pk, steps[a:b], reader.read_payload(kind, lk, pk, a, b)


def iter_blocks(catalog, kind: str, keys: set, progress) -> Iterator[tuple[Any, str, str, np.ndarray, np.ndarray]]:
    """Yield (shard, layer_key, param_key, steps (k,), values (k, *shape)) for every payload of
    ``kind`` whose (layer_key, param_key) is in ``keys``, shard by shard in step order, in
    chunk-aligned blocks of at most about :data:`BLOCK_BYTES` (readers from ``catalog``'s pool)."""
    shards = catalog.shards_with(kind, keys)
    with progress(f"reading {kind}", len(shards)) as bar:
        for s in shards:
            with catalog.open_shard(s) as r:
                for lk, pk, steps, block in shard_blocks(r, s, kind, keys, BLOCK_BYTES):
                    yield s, lk, pk, steps, block
            bar.update(1)


_FRAME_TYPES = {"step": "int64", "epoch": "int64", "layer_id": "int64", "numel": "int64", "count": "int64",
                "nonfinite": "int64", "rank": "int64"}


def part_frame(parts: list[dict], columns: list[str], multi_rank: bool) -> pd.DataFrame:
    """One DataFrame from per-block column dicts of a pass (scalars broadcast), typed and sorted by
    (rank,) step, layer_id, param (stable). ``parts`` is consumed: each column is taken out of the
    parts, put in sorted order and its pieces freed before the next (100,000 layers: 4 million rows
    of 14 columns; one column's pieces at a time beside the frame, not three copies of it)."""
    cols = columns + (["rank"] if multi_rank else [])
    if not parts:
        df = typed(pd.DataFrame({c: [] for c in cols}), _FRAME_TYPES)
        return df.sort_values((["rank"] if multi_rank else []) + ["step", "layer_id", "param"], kind="stable")\
            .reset_index(drop=True)
    lens = np.fromiter((len(p["step"]) for p in parts), np.int64, len(parts))

    def column(c):
        vals = [p.pop(c) for p in parts]
        if not any(isinstance(v, np.ndarray) and v.ndim for v in vals):   # a scalar per part: repeated
            out = np.repeat(np.asarray(vals, dtype=object if isinstance(vals[0], str) else None), lens)
        else:
            out = np.concatenate([np.broadcast_to(np.asarray(v), n) for v, n in zip(vals, lens)])
        t = _FRAME_TYPES.get(c)
        return out.astype(t) if t is not None and out.dtype != t else out

    keys = {c: column(c) for c in (["rank"] if multi_rank else []) + ["step", "layer_id", "param"]}
    # np.lexsort is stable; parameter names by their sorted codes (the order sort_values gives strings)
    codes = pd.factorize(keys["param"], sort=True)[0]
    codes = np.where(codes < 0, codes.max() + 1, codes)   # missing names last, as sort_values puts them
    order = np.lexsort([codes, keys["layer_id"], keys["step"]]
                       + ([keys["rank"]] if multi_rank else []))
    data = {}
    for c in cols:
        v = keys.pop(c) if c in keys else column(c)
        data[c] = v[order]
        del v
    parts.clear()
    return pd.DataFrame(data, copy=False)


def typed(df: pd.DataFrame, types: dict) -> pd.DataFrame:
    """``df`` with the listed columns (those present) cast to their dtypes, in place; returns it."""
    for c, t in types.items():
        if c in df.columns and df[c].dtype != t:
            df[c] = df[c].astype(t)
    return df


def _open(ctx: ShardContext, path: str, name: str):
    if ctx.backend is not None:
        return ctx.backend.open(path, name)
    return HDF5Backend().open(path, name)


GRAD_STATS = ["count", "nonfinite", "mean", "abs_mean", "max_abs", "var", "l1", "l2"]


def grad_stat_columns(vec: np.ndarray, numel: int) -> dict[str, np.ndarray]:
    """The statistics of :data:`GRAD_STATS` from recorded gradient sufficient statistics.

    Args:
        vec: (k, len(GRAD_STAT_FIELDS)) float64 rows: count, nonfinite, sum, sumsq, sum_abs, max_abs.
        numel: elements of the parameter (or (k,): of each row's parameter). A row whose counts are
            not finite, negative or do not add up to ``numel`` (a damaged trace) is read as numel
            non-finite elements.

    Returns:
        dict of (k,) arrays; NaN where a row has no finite element. The formulas are
        :func:`analyzer.stats.stats_from_sums` (var = sumsq / n - mean^2, population, clipped at 0).
    """
    v = np.asarray(vec, np.float64).reshape(-1, len(fmt.GRAD_STAT_FIELDS))
    n, nonfin, s, sq, sa, mx = (v[:, i] for i in range(v.shape[1]))
    numel = np.asarray(numel, np.float64)       # a scalar, or (k,): one per row
    with np.errstate(invalid="ignore"):
        valid = (n >= 0) & (nonfin >= 0) & (n + nonfin == numel)
    n = np.where(valid, n, 0.0)
    nonfin = np.where(valid, nonfin, numel)
    ok = n > 0
    st = stats_from_sums(n, s, sq, sa, mx)

    def f(x):
        return np.where(ok, x, np.nan)

    return {"count": n.astype(np.int64), "nonfinite": nonfin.astype(np.int64), "mean": st["mean"],
            "abs_mean": st["abs_mean"], "max_abs": f(st["max_abs"]), "var": st["var"], "l1": f(st["l1"]),
            "l2": f(st["l2"])}


def grad_shard(shard, keys: set, ctx: ShardContext) -> tuple[list[dict], dict, list]:
    """Gradient pass over one shard.

    Per-step rows come from the recorded gradient statistics (``grad_stats``) where a step has them,
    else from the raw gradient tensors of that step; the element-wise noise comes from the raw
    tensors (the steps where they were recorded).

    Returns:
        (parts, noise, sums): parts = per-block column dicts (step, epoch, layer_id, layer, param, numel,
        rank and the per-step statistics of :data:`GRAD_STATS`); noise = {(layer_key, param_key,
        epoch): ElementwiseMoments} of the gradient elements across that shard's raw steps of the epoch;
        sums = [(layer_key, param_key, steps, (k, 6) GRAD_STAT_FIELDS)] of the sharded parameters'
        slices (in place of their parts: the caller merges the ranks, :mod:`analyzer.slices`).
    """
    parts: list[dict] = []
    noise: dict[tuple, ElementwiseMoments] = {}
    sums: list[tuple] = []

    def add(lk, pk, steps, st):
        lid, lname, pname, numel = ctx.meta[(lk, pk)]
        d = {"step": steps, "epoch": ctx.epoch_of(steps), "layer_id": lid, "layer": lname,
             "param": pname, "numel": numel, "rank": shard.rank}
        for c in GRAD_STATS:
            d[c] = st[c]
        parts.append(d)

    def update_noise(lk, pk, epochs, flat):
        for e in np.unique(epochs):
            acc = noise.get((lk, pk, int(e)))
            if acc is None:
                acc = noise[(lk, pk, int(e))] = ElementwiseMoments(flat.shape[1])
            idx = np.flatnonzero(epochs == e)
            # steps ascend, so an epoch's rows are usually one range: a view, not a copy of the block
            acc.update(flat[idx[0]:idx[-1] + 1] if idx[-1] - idx[0] + 1 == len(idx) else flat[idx])

    # the steps of each parameter's recorded statistics, only where raw gradients may repeat them
    raw = any(k[0] == fmt.KIND_GRADS and (k[1], k[2]) in keys for k in shard.payloads)
    with _open(ctx, shard.path, shard.name) as r, _Beside() as beside:
        covered: dict[tuple, np.ndarray] = {}
        recorded = []   # (layer_key, param_key, steps, (k, 6) statistics): turned into rows all at once
        # in the shard's own order (packed: column order, read a block of columns at a time); the
        # rows are sorted by part_frame, whatever order they come in
        for (k, lk, pk), (rows, _, _) in shard.payloads.items():
            if k != fmt.KIND_GRAD_STATS or (lk, pk) not in keys or not rows:
                continue
            steps = np.asarray(r.read_payload_steps(k, lk, pk), np.int64)
            vec = np.asarray(r.read_payload(k, lk, pk, 0, rows), np.float64).reshape(len(steps), -1)
            if (lk, pk) in ctx.sharded:
                sums.append((lk, pk, steps, vec))
            else:
                recorded.append((lk, pk, steps, vec))
                if len(recorded) >= 8192:   # bounded temporaries
                    parts.append(recorded_part(recorded, ctx, shard.rank))
                    recorded = []
            if raw:
                covered[(lk, pk)] = steps
        if recorded:   # one part for every parameter: no Python work per row (100,000 layers: 200,000 parameters)
            parts.append(recorded_part(recorded, ctx, shard.rank))
        for lk, pk, steps, block in shard_blocks(r, shard, fmt.KIND_GRADS, keys, ctx.block_bytes):
            epochs = ctx.epoch_of(steps)
            have = covered.get((lk, pk))
            new = np.ones(len(steps), bool) if have is None else ~np.isin(steps, have)
            # the element-wise noise of this block beside its per-step moments (both read the block
            # only; numpy releases the GIL in their loops): about 1.5x on two cores
            done = beside.run(update_noise, lk, pk, epochs, block.reshape(len(steps), -1))
            if new.any():
                rm = row_moments(block if new.all() else block[new])
                if (lk, pk) in ctx.sharded:
                    sums.append((lk, pk, steps[new], grad_sums(rm)))
                else:
                    add(lk, pk, steps[new], rm.compute())
            done()
    return parts, noise, sums


def recorded_part(recorded: list, ctx: ShardContext, rank: int) -> dict:
    """One part (see :func:`grad_shard`) from the recorded gradient statistics of many parameters:
    ``recorded`` = [(layer_key, param_key, steps (k,), (k, 6) GRAD_STAT_FIELDS)]."""
    lens = np.fromiter((len(x[2]) for x in recorded), np.int64, len(recorded))
    meta = [ctx.meta[(lk, pk)] for lk, pk, _, _ in recorded]
    steps = np.concatenate([x[2] for x in recorded])
    numel = np.repeat(np.fromiter((m[3] for m in meta), np.int64, len(meta)), lens)
    d = {"step": steps, "epoch": ctx.epoch_of(steps),
         "layer_id": np.repeat(np.fromiter((m[0] for m in meta), np.int64, len(meta)), lens),
         "layer": np.repeat(np.array([m[1] for m in meta], object), lens),
         "param": np.repeat(np.array([m[2] for m in meta], object), lens), "numel": numel, "rank": rank}
    d.update(grad_stat_columns(np.concatenate([x[3] for x in recorded]), numel))
    return d


def split_keys(shards: list, kinds: tuple, keys: set, parts: int) -> list[set]:
    """``keys`` ((layer_key, param_key) pairs) in at most ``parts`` groups of about equal stored
    bytes (payloads of ``kinds`` in ``shards``), largest first into the lightest group; one group
    when the tensor payloads hold less than :data:`SPLIT_MIN_BYTES` or ``parts`` is 1 (recorded gradient
    statistics do not count: a worker would save little work on them and send back as many rows as it read,
    pickled; 100,000 layers: a 22 s pass at 1.3 GB instead of 13 s at 0.9 GB in one process). Every group is
    non-empty; a key's payloads all fall in one group, so a pass over a group computes exactly
    what the whole pass computes for those keys."""
    size: dict = dict.fromkeys(keys, 0)
    raw = 0   # elements of tensors (not of recorded statistics): the work a worker saves
    for s in shards:
        for (k, lk, pk), (rows, shape, _) in s.payloads.items():
            if k in kinds and (lk, pk) in size:
                n = int(rows) * math.prod(int(d) for d in shape)
                size[(lk, pk)] += n
                raw += n if k != fmt.KIND_GRAD_STATS else 0
    if parts <= 1 or 4 * raw < SPLIT_MIN_BYTES or len(size) < 2:
        return [set(keys)]
    groups: list[set] = [set() for _ in range(parts)]
    load = [0] * parts
    for key, n in sorted(size.items(), key=lambda kv: (-kv[1], kv[0])):
        i = load.index(min(load))
        groups[i].add(key)
        load[i] += n
    return [g for g in groups if g]


def split_pass(catalog, kinds: tuple, keys: set, fn: Callable[[set, bool], Any], engine: str = "local") -> list:
    """``fn(group, first)`` for groups of ``keys`` (:func:`split_keys`) on the CPUs available: the
    first group (``first`` True: it may show progress) in this process, the others in forked
    workers (:func:`analyzer.trace.workers.run_split`; the catalogue's idle readers are closed
    first); one group where forking is not safe and with the dask engine (whose tasks are already
    spread). Results in group order."""
    parts = workers.parts_wanted() if engine == "local" else 1
    groups = split_keys(catalog.shards_with(kinds, keys), kinds, set(keys), parts)
    return workers.run_split(lambda ig: fn(ig[1], ig[0] == 0), list(enumerate(groups)), before_fork=catalog.close)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform tells)."""
    return workers.available_cpus()


class _Beside:
    """Runs one call at a time in a helper thread beside the caller's work (in the caller itself
    where only one CPU is available). ``run(f, *a)`` starts ``f(*a)`` and returns ``done()``, which
    waits for it and re-raises its error. The thread ends when the ``with`` block ends, so no thread
    outlives a pass (the report forks its figure workers afterwards)."""

    def __enter__(self) -> "_Beside":
        self._ex = None
        if available_cpus() > 1:
            from concurrent.futures import ThreadPoolExecutor
            self._ex = ThreadPoolExecutor(1, thread_name_prefix="bbdecoder-pass")
        return self

    def run(self, f: Callable, *args) -> Callable[[], None]:
        if self._ex is None:
            f(*args)
            return lambda: None
        fut = self._ex.submit(f, *args)
        return fut.result

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)


def weight_shard(shard, keys: set, ctx: ShardContext, prev: dict) -> tuple[list[dict], list]:
    """Weight pass over one shard: per-snapshot statistics and update ratios.

    Args:
        prev: (layer_key, param_key) -> (path, name, row) of the snapshot before this shard's first
            one (same rank), read here to give the first snapshot its update ratio.

    Returns:
        (parts, sums): parts = per-block column dicts: step, epoch, layer_id, layer, param, numel, mean,
        std, abs_mean, max_abs, min, max, l2, update_ratio (||w_t - w_prev|| / ||w_prev||, NaN without
        a previous snapshot), nonfinite, rank; sums = [(layer_key, param_key, steps, RowMoments, num,
        den)] of the sharded parameters' slices (num, den: ||w_t - w_prev||^2 and ||w_prev||^2 of the
        slice), in place of their parts: the caller merges the ranks (:mod:`analyzer.slices`).
    """
    last: dict[tuple, np.ndarray] = {}     # the previous snapshot, as stored (float32)
    by_path: dict[tuple, list] = {}
    for key, (path, name, row) in prev.items():
        if key in keys:
            by_path.setdefault((path, name), []).append((key, row))
    for (path, name), items in by_path.items():
        with _open(ctx, path, name) as r:
            for key, row in items:
                last[key] = np.asarray(r.read_payload(fmt.KIND_WEIGHTS, key[0], key[1], row, row + 1)).reshape(-1)
    parts, sums = [], []
    with _open(ctx, shard.path, shard.name) as r:
        for lk, pk, steps, block in shard_blocks(r, shard, fmt.KIND_WEIGHTS, keys, ctx.block_bytes):
            lid, lname, pname, numel = ctx.meta[(lk, pk)]
            rm = row_moments(block)
            flat = block.reshape(len(steps), -1)
            ud = np.full((2, len(steps)), np.nan)     # ||w_t - w_prev||^2, ||w_prev||^2
            key = (lk, pk)
            p = last.get(key)
            for i in range(len(steps)):
                if p is not None:
                    ud[:, i] = update_sums(flat[i], p)
                p = flat[i]
            last[key] = flat[-1].copy()      # not a view: the block is not kept alive
            if key in ctx.sharded:
                sums.append((lk, pk, steps, rm, ud[0], ud[1]))
                continue
            st = rm.compute()
            with np.errstate(invalid="ignore", divide="ignore"):   # non-finite weights: NaN, flagged elsewhere
                ratios = np.where(ud[1] > 0, np.sqrt(ud[0]) / np.sqrt(ud[1]), np.nan)
            parts.append({"step": steps, "epoch": ctx.epoch_of(steps), "layer_id": lid, "layer": lname,
                          "param": pname, "numel": numel, "mean": st["mean"], "std": st["std"],
                          "abs_mean": st["abs_mean"], "max_abs": st["max_abs"], "min": st["min"],
                          "max": st["max"], "l2": st["l2"], "update_ratio": ratios,
                          "nonfinite": st["nonfinite"], "rank": shard.rank})
    return parts, sums


def update_ratio(cur: np.ndarray, prev: np.ndarray, piece: int = PIECE_ELEMS) -> float:
    """||cur - prev||_2 / ||prev||_2 of two flat arrays, in float64 over bounded pieces (NaN when
    ||prev|| is 0 or NaN)."""
    num, den = update_sums(cur, prev, piece)
    with np.errstate(invalid="ignore", divide="ignore"):   # non-finite weights: NaN, flagged elsewhere
        return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else float("nan")


def update_sums(cur: np.ndarray, prev: np.ndarray, piece: int = PIECE_ELEMS) -> tuple[float, float]:
    """(||cur - prev||^2, ||prev||^2) of two flat arrays, in float64 over bounded pieces: they add
    across the slices of a sharded parameter."""
    num = den = 0.0
    for j in range(0, len(cur), piece):
        p = prev[j:j + piece].astype(np.float64)
        d = cur[j:j + piece].astype(np.float64)
        d -= p
        num += float(np.einsum("i,i->", d, d))   # not BLAS: its threads spin on a busy machine
        den += float(np.einsum("i,i->", p, p))
    return num, den


def previous_rows(shards: list, kind: str, keys: set) -> list[dict]:
    """For each shard (sorted by rank, index): key -> (path, name, row) of that key's last row in an
    earlier shard of the same rank."""
    out, seen = [], {}
    for s in shards:
        out.append({k[1:]: v for k, v in seen.items() if k[0] == s.rank})
        for (k, lk, pk), (rows, _, _) in s.payloads.items():
            if k == kind and (lk, pk) in keys and rows:
                seen[(s.rank, lk, pk)] = (s.path, s.name, rows - 1)
    return out


# ---------------------------------------------------------------------------------------- mapping
def map_shards(engine: str, fn: Callable, args: list[tuple], progress, label: str, client: Any = None
               ) -> Iterator[Any]:
    """``fn(*a)`` for every ``a`` in ``args``, results yielded in order.

    local: one after the other in this process. dask: submitted to ``client`` (or the default
    client, or one connected to $BBDECODER_DASK_SCHEDULER, or a new local cluster), at most
    workers + 1 in flight so that memory stays bounded on both sides.
    """
    with progress(label, len(args)) as bar:
        if engine == "local" or not args:
            for a in args:
                yield fn(*a)
                bar.update(1)
            return
        client = client or dask_client()
        window = max(1, len(client.scheduler_info().get("workers", {}))) + 1   # bounded partial results
        futures = []
        i = 0
        try:
            while i < len(args) or futures:
                while i < len(args) and len(futures) < window:
                    futures.append(client.submit(fn, *args[i], pure=False))
                    i += 1
                f = futures.pop(0)
                res = f.result()
                f.release()
                yield res
                bar.update(1)
        finally:
            for f in futures:
                f.cancel()


_OWNED: dict = {}


def dask_client():
    """The dask client to use: the current default client, else one connected to
    $BBDECODER_DASK_SCHEDULER, else a new in-process local cluster (one worker per core, one thread
    each), kept for the life of the process (see :func:`close_owned_client`)."""
    import distributed
    try:
        return distributed.default_client()
    except ValueError:
        pass
    if "client" in _OWNED:
        return _OWNED["client"]
    addr = os.environ.get(SCHEDULER_ENV)
    try:
        if addr:
            client = distributed.Client(addr, set_as_default=False)
        else:
            cluster = distributed.LocalCluster(n_workers=max(1, min(os.cpu_count() or 1, 8)),
                                               threads_per_worker=1, processes=False,
                                               dashboard_address=None)
            client = distributed.Client(cluster, set_as_default=False)
            _OWNED["cluster"] = cluster
    except OSError as e:
        raise TraceError(f"cannot start or reach the dask cluster{' at ' + addr if addr else ''}: {e}") from None
    _OWNED["client"] = client
    return client


def close_owned_client() -> None:
    """Close the client and local cluster that :func:`dask_client` created (if any)."""
    c = _OWNED.pop("client", None)
    cl = _OWNED.pop("cluster", None)
    if c is not None:
        c.close()
    if cl is not None:
        cl.close()
