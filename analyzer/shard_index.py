"""Indexing the closed shards of a run for its :class:`~analyzer.catalog.Catalog`: each shard's step
table and payload shapes, checked against the manifest, on the CPUs available for large runs."""

from __future__ import annotations

import os

import numpy as np

from dataclasses import dataclass
from typing import Any, Callable

from .catalog import Shard
from .trace import files, h5read, workers
from .trace import format as fmt
from .trace.format import TraceError
from .trace.shards import ShardReader

#: A rank's closed shards of at least this many bytes in all are indexed on the CPUs available.
SCAN_SPLIT_BYTES = 256 << 20


@dataclass
class IndexRules:
    """What indexing a shard checks it against, and where it says what it skipped.

    Attributes:
        root: the run directory (shards must lie inside). expected: ``expected.get((kind, key,
        key))`` -> the row shape from the manifest, None for a payload it does not name.
        conflicts: (rank, site key) whose values are ignored. sharded:
        (layer_key, param_key) of FSDP2 slices. borrow: ``borrow(path, name)`` -> a shard reader
        (a context manager). problems: the list that skipped things are appended to.
    """

    root: str
    expected: Any
    conflicts: set
    sharded: set
    borrow: Callable
    problems: list


def index_shard(cat: IndexRules, rank: int, idx: int, spath: str) -> Shard:
    """Index one closed shard (its step table and payload shapes, checked against the manifest);
    what is skipped is added to ``cat.problems``."""
    name = f"{fmt.rank_dirname(rank)}/{os.path.basename(spath)}"
    files.check_trace_file(spath, cat.root, "shard")
    with cat.borrow(spath, name) as r:
        steps = r.steps()
        payloads, offsets, same = {}, {}, {}
        for kind in fmt.PAYLOAD_KINDS:
            for lk, pk in r.payloads(kind):
                rows, shape, chunk = r.payload_info(kind, lk, pk)
                want = cat.expected.get((kind, lk, pk))
                if (rank, lk) in cat.conflicts and kind in (fmt.KIND_ACT_STATS, fmt.KIND_ACTIVATIONS):
                    continue
                if want is None:
                    cat.problems.append(f"{name}: {kind} for unknown parameter {lk}/{pk} ignored")
                    continue
                if kind in fmt.RAW_PARAM_KINDS and (lk, pk) in cat.sharded:
                    offsets[(kind, lk, pk)] = slice_offset(r, name, kind, lk, pk, tuple(shape), want)
                elif tuple(shape) != want:
                    raise TraceError(f"corrupt shard {name}: {kind}/{lk}/{pk} has shape "
                                     f"{tuple(shape)} but the manifest says {want}")
                # one (rows, shape, chunk) object per distinct value (100,000 layers: 200,000 equal tuples, 13 MB)
                payloads[cat.expected.same_key((kind, lk, pk))] = same.setdefault((rows, tuple(shape), chunk),
                                                                                   (rows, shape, chunk))
    try:
        nbytes = os.path.getsize(spath)
    except OSError:
        nbytes = 0
    return Shard(rank, idx, spath, name, steps, payloads, nbytes, offsets)


def index_shards(cat: IndexRules, rank: int, closed: list[tuple[int, str]],
                 before_fork: Callable[[], None] | None = None) -> list[Shard]:
    """:func:`index_shard` for each (index, path) of one rank's closed shards, in order; shards of
    more than :data:`SCAN_SPLIT_BYTES` in all are indexed in contiguous runs on the CPUs available
    (:func:`analyzer.trace.workers.run_split`: the same shards, problems and errors, in the same
    order, as one after the other; the workers' checks of each file are kept here)."""
    sizes = []
    for _, p in closed:
        try:
            sizes.append(os.path.getsize(p))
        except OSError:
            sizes.append(0)
    n = workers.parts_wanted(len(closed)) if sum(sizes) >= SCAN_SPLIT_BYTES else 1
    if n <= 1:
        return [index_shard(cat, rank, i, p) for i, p in closed]
    runs, cut, acc, total = [[]], 0, 0, sum(sizes)
    for item, size in zip(closed, sizes):   # contiguous runs of about equal bytes
        if acc >= total * (cut + 1) / n and len(runs) < n:
            runs.append([])
            cut += 1
        runs[-1].append(item)
        acc += size

    def run(items):
        before = len(cat.problems)
        shards = [index_shard(cat, rank, i, p) for i, p in items]
        return shards, cat.problems[before:], h5read.verdicts()

    out: list[Shard] = []
    for k, (shards, problems, verdicts) in enumerate(workers.run_split(run, runs, before_fork=before_fork)):
        out += shards
        if k:   # this process's own problems are in cat.problems already
            cat.problems += problems
            h5read.add_verdicts(verdicts)
    return out


def slice_offset(r: ShardReader, name: str, kind: str, lk: str, pk: str, shape: tuple, want: tuple) -> int:
    """The first row of a sharded parameter's slice: its ``offset`` attribute, checked against the
    manifest (``global_shape`` equal to the parameter's shape, the slice's rows inside it)."""
    a = r.payload_attrs(kind, lk, pk)
    off, gshape = a.get("offset"), a.get("global_shape")
    try:
        gshape = tuple(int(d) for d in np.asarray(gshape).reshape(-1)) if gshape is not None else None
        off = int(off) if off is not None and float(off) == int(off) else None
    except (TypeError, ValueError, OverflowError):
        off = gshape = None
    if off is None or gshape is None:
        raise TraceError(f"corrupt shard {name}: {kind}/{lk}/{pk} is a slice of a sharded parameter "
                         "but lacks a valid offset or global_shape")
    if gshape != want or len(shape) != len(want) or shape[1:] != want[1:] \
            or not 0 <= off <= off + shape[0] <= want[0]:
        raise TraceError(f"corrupt shard {name}: {kind}/{lk}/{pk} has shape {shape} at offset {off} "
                         f"(global shape {gshape}) but the manifest says {want}")
    return off
