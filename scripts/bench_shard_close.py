#!/usr/bin/env python
"""Writer-thread time of a shard close against the number of parameter tensors: gradient statistics
stored packed (``/packed/grad_stats``, the default) or one dataset per parameter (older traces); with
``--raw``, raw snapshots stored flat (``/flat/<kind>``, the default) or one group per tensor.

What the writer thread does with the default settings: 100 steps (``flush_steps``), each one packed
gradient-statistics payload of P parameters ((P, 6) float64, as :func:`recorder.packing.resolve`
hands it over), written into a live shard, then the shard closed and published (``rotate``: the
datasets created and written, the step table, the rename, ``rank.json``; the background fsync is not
timed). Settings run interleaved, in an order rotated each round: ``per-param`` (the old layout),
``packed-A`` and ``packed-B`` (identical: the A/A control). Figures: medians over rounds of the close
alone and of the 100 writes plus the close, in ms; and the HDF5 objects a shard holds.

With ``--raw``, the first step of the shard also carries a raw gradient and weight snapshot of every
tensor (64 float32 values each), as the default ``grads_every=50, weights_every=50`` puts in every
shard of 100 steps, and the settings are ``per-tensor`` (the snapshots handed over one payload per
tensor and stored one group per tensor, as up to 2.0.0.dev's flat snapshots: ``/grads/<layer>/<param>``)
against ``flat-A`` and ``flat-B`` (one flat row per kind, as :func:`recorder.packing.resolve` hands
them over now: ``/flat/<kind>/0``); the gradient statistics are packed in all three.

With ``--act``, every step also carries the per-unit activation statistics of ``--sites`` sites of 64
units each (``sum``, ``sum_abs``, ``sumsq``, ``min``, ``max``, ``n_pos`` per unit, ``count`` and
``nonfinite``; float64, as ``recorder.packing`` hands them over), and the settings are ``per-stat``
(handed over one payload per statistic and stored two datasets per site and statistic, the layout up
to 2026-12-07) against ``flat-A`` and ``flat-B`` (one flat float64 row per step: ``/flat/act_stats/0``);
the first column is then the number of sites (10 parameter tensors throughout).

Usage::

    .venv/bin/python scripts/bench_shard_close.py [--tensors 10 150 1000] [--rounds 7] [--steps 100] [--raw]
    .venv/bin/python scripts/bench_shard_close.py --act [--sites 5 21 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import h5py
import numpy as np

from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.packed import FlatLayout
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord


def _records(P: int, steps: int, raw: bool = False) -> list[StepRecord]:
    keys = tuple((f"blocks.{i // 2}", "weight" if i % 2 == 0 else "bias") for i in range(P))
    attrs = [{"layer_id": i // 2, "layer": f"blocks.{i // 2}", "param": k[1]} for i, k in enumerate(keys)]
    rng = np.random.default_rng(0)
    recs = [StepRecord(s, 0, 1.0, 1e9 + s, 0, [("grad_stats", None, keys, rng.random((P, 6)), attrs)])
            for s in range(steps)]
    if raw == "per-tensor":
        recs[0].payloads += [(kind, lk, pk, rng.random(64).astype(np.float32), a)
                             for kind in ("grads", "weights") for (lk, pk), a in zip(keys, attrs)]
    elif raw:
        layout = FlatLayout([(lk, pk, 64 * i, 64, (64,), a) for i, ((lk, pk), a) in enumerate(zip(keys, attrs))])
        recs[0].payloads += [(kind, None, layout, rng.random(64 * P).astype(np.float32), None)
                             for kind in ("grads", "weights")]
    return recs


ACT_STATS = (("sum", (64,)), ("sum_abs", (64,)), ("sumsq", (64,)), ("min", (64,)), ("max", (64,)),
             ("n_pos", (64,)), ("count", ()), ("nonfinite", ()))


def _act_records(sites: int, steps: int, how: str) -> list[StepRecord]:
    """10 tensors' gradient statistics and ``sites`` sites' activation statistics every step, handed
    over one payload per statistic (``how="per-stat"``) or as one flat row (``"flat"``)."""
    recs = _records(10, steps)
    entries, start = [], 0
    for j in range(sites):
        for k, shape in ACT_STATS:
            n = int(np.prod(shape, dtype=np.int64))
            entries.append((f"site{j}", k, start, n, shape, None))
            start += n
    layout = FlatLayout(entries)
    rng = np.random.default_rng(1)
    for r in recs:
        row = rng.random(start)
        if how == "flat":
            r.payloads.append(("act_stats", None, layout, row, None))
        else:
            r.payloads += [("act_stats", lk, pk, row[s:s + n].reshape(shape), None)
                           for lk, pk, s, n, shape, _ in entries]
    return recs


def _one(tmp: str, packed: bool, recs: list, n: int) -> tuple[float, float, int]:
    d = os.path.join(tmp, f"rank-{n:05d}")
    sw = ShardSeriesWriter(d, 0, flush_steps=len(recs) + 1, backend=HDF5Backend(packed=packed))
    t0 = time.perf_counter()
    sw.write(recs)
    t1 = time.perf_counter()
    sw.rotate()
    t2 = time.perf_counter()
    sw.close()
    path = os.path.join(d, "shard-000000.h5")
    objs = []
    with h5py.File(path, "r") as f:
        f.visit(objs.append)
    return (t2 - t1) * 1e3, (t2 - t0) * 1e3, len(objs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, nargs="+", default=[10, 150, 1000])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--raw", action="store_true", help="one raw gradient and weight row per tensor in the shard")
    ap.add_argument("--act", action="store_true", help="activation statistics of --sites sites every step")
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 21, 50])
    args = ap.parse_args(argv)
    names = {"per-param": (False, False), "packed-A": (True, False), "packed-B": (True, False)}
    if args.raw:   # (packed, how the snapshots are handed over)
        names = {"per-tensor": (True, "per-tensor"), "flat-A": (True, "flat"), "flat-B": (True, "flat")}
    if args.act:
        names = {"per-stat": (True, "per-stat"), "flat-A": (True, "flat"), "flat-B": (True, "flat")}
    what = " + one raw grads/weights row per tensor" if args.raw else \
        " + activation statistics of 64-unit sites every step" if args.act else ""
    print(f"{args.steps} steps per shard{what}, {args.rounds} rounds, settings interleaved (rotated order); ms")
    print(f"{'sites' if args.act else 'tensors':>7} {'setting':>10} {'close':>9} {'write+close':>12} {'objects':>8}")
    with tempfile.TemporaryDirectory(prefix="bbd-close-") as tmp:
        n = 0
        for P in (args.sites if args.act else args.tensors):
            recs = {k: _act_records(P, args.steps, raw) if args.act else _records(P, args.steps, raw)
                    for k, (_, raw) in names.items()}
            res = {k: [] for k in names}
            for r in range(args.rounds + 1):
                order = list(names)[r % 3:] + list(names)[:r % 3]
                for k in order:
                    out = _one(tmp, names[k][0], recs[k], n)
                    n += 1
                    if r:   # round 0 warms up
                        res[k].append(out)
            for k, v in res.items():
                print(f"{P:>7} {k:>10} {statistics.median(x[0] for x in v):9.2f} "
                      f"{statistics.median(x[1] for x in v):12.2f} {v[0][2]:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
