"""Passes split across forked worker processes (issue 17 item 3): the gradient and weight passes
split by parameter, and the catalogue's scan split by shard, give exactly the tables of the same
passes done in one process, which match numpy on the tensors captured in the training loop."""

import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from helpers import record_tiny, shard_path, stats64, unflatten_snapshots

from bbdecoder import analyzer
from bbdecoder.analyzer import engine, shard_index
from bbdecoder.analyzer.trace import h5read, workers
from bbdecoder.analyzer.trace.format import TraceError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 epochs x 4 steps, a shard every 3 steps; gradient statistics every 2nd step (the other
    steps' rows come from the raw tensors), weights every step; flat and per-tensor layouts."""
    d = tmp_path_factory.mktemp("parallel")
    flat = str(d / "flat")
    cap = record_tiny(flat, epochs=3, steps_per_epoch=4, weights_every=1, flush_steps=3, seed=5,
                      grad_stats_every=2)
    per = str(d / "per_tensor")
    shutil.copytree(flat, per)
    assert unflatten_snapshots(per) > 0
    return {"flat": flat, "per_tensor": per}, cap


@pytest.fixture
def spy(monkeypatch):
    """Force splitting (2 CPUs, no size threshold) and record the parts of every split job."""
    seen = []
    real = workers.run_split

    def run_split(fn, parts, before_fork=None):
        seen.append(len(parts))
        return real(fn, parts, before_fork)
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    monkeypatch.setattr(workers, "run_split", run_split)
    monkeypatch.setattr(engine, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(shard_index, "SCAN_SPLIT_BYTES", 0)
    return seen


def _fork_possible():
    """These tests exercise the forked path: a thread left running by an earlier test would make it
    fall back to one process, and the test must say so rather than skip (Linux CI forks). tqdm's monitor
    thread, which torch.compile's progress bars start in an earlier test (the recorder's fused activation
    statistics) and leave running while a bar is alive, is stopped first."""
    import sys
    import threading
    tq = sys.modules.get("tqdm")
    monitor = getattr(getattr(tq, "tqdm", None), "monitor", None)
    if monitor is not None:
        monitor.exit()   # sets its exit event and joins it; a later bar starts a new one
    assert workers.fork_is_safe(), [t.name for t in threading.enumerate()]


def _tables(path):
    r = analyzer.open(path)
    return r, [r.grad_stats(), r.grad_stats(per="epoch"), r.weight_stats(), r.grad_stats(by="layer")]


@pytest.mark.parametrize("layout", ["flat", "per_tensor"])
def test_split_passes_equal_the_serial_pass_and_numpy(runs, spy, monkeypatch, layout):
    paths, cap = runs
    _fork_possible()
    par_run, par = _tables(paths[layout])
    assert spy and all(n == 2 for n in spy), spy          # the scan and each pass ran in 2 parts
    assert len(par_run.catalog.shards) >= 4
    monkeypatch.setattr(workers, "available_cpus", lambda: 1)
    spy.clear()
    _, ser = _tables(paths[layout])
    assert all(n == 1 for n in spy)
    for a, b in zip(par, ser):
        pd.testing.assert_frame_equal(a, b, check_exact=True)   # the same numbers, bit for bit
    g, _, w, _ = par
    # against numpy on the captured tensors: every (step, parameter) once, the statistics of the tensor
    assert len(g) == sum(len(v) for v in cap["grads"].values())
    for row in g.itertuples(index=False):
        want = stats64(cap["grads"][(row.layer, row.param)][row.step])
        for c in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            # steps with device statistics: float32 partial sums; the others from the raw tensor
            np.testing.assert_allclose(getattr(row, c), want[c], rtol=1e-6, atol=1e-6 * want["abs_mean"], err_msg=c)
    for row in par[1].itertuples(index=False):     # the element-wise noise, merged across shards
        steps = [s for s, ep in cap["epochs"].items() if ep == row.epoch]
        x = np.stack([cap["grads"][(row.layer, row.param)][s].astype(np.float64).ravel() for s in steps])
        np.testing.assert_allclose(row.grad_noise, x.var(0).mean(), rtol=1e-9)
    assert len(w) == sum(len(v) for v in cap["weights"].values())
    for row in w.itertuples(index=False):
        want = stats64(cap["weights"][(row.layer, row.param)][row.step])
        for c in ("mean", "std", "max_abs", "min", "max", "l2"):
            np.testing.assert_allclose(getattr(row, c), want[c], rtol=1e-9, atol=1e-12, err_msg=c)
    for (layer, param), snaps in cap["weights"].items():   # update ratios across shard borders
        got = w[(w["layer"] == layer) & (w["param"] == param)].sort_values("step")
        steps = sorted(snaps)
        ratios = [np.nan] + [np.linalg.norm(snaps[b].astype(np.float64) - snaps[a].astype(np.float64))
                             / np.linalg.norm(snaps[a].astype(np.float64)) for a, b in zip(steps, steps[1:])]
        np.testing.assert_allclose(got["update_ratio"].to_numpy(), ratios, rtol=1e-9)


def test_split_keys_balances_bytes_and_keeps_each_key_whole(runs, monkeypatch):
    paths, _ = runs
    monkeypatch.setattr(engine, "SPLIT_MIN_BYTES", 0)
    cat = analyzer.open(paths["per_tensor"]).catalog
    keys = cat.param_keys(None)[1]
    shards = cat.shards_with(("grads",), keys)
    groups = engine.split_keys(shards, ("grads",), keys, 2)
    assert len(groups) == 2 and set().union(*groups) == keys and not groups[0] & groups[1]
    size = {k: sum(s.payloads[("grads", *k)][0] * int(np.prod(s.payloads[("grads", *k)][1]))
                   for s in shards if ("grads", *k) in s.payloads) for k in keys}
    loads = sorted(sum(size[k] for k in g) for g in groups)
    # greedy largest-first: the heavier group exceeds the lighter by at most the largest key
    assert loads[1] - loads[0] <= max(size.values())
    monkeypatch.setattr(engine, "SPLIT_MIN_BYTES", 1 << 40)     # small passes are not split
    assert engine.split_keys(shards, ("grads",), keys, 2) == [keys]


def test_split_scan_equals_the_serial_scan_and_fails_the_same_way(runs, spy, monkeypatch, tmp_path):
    paths, _ = runs
    _fork_possible()
    par = analyzer.open(paths["per_tensor"]).catalog
    assert spy and spy[0] == 2
    monkeypatch.setattr(workers, "available_cpus", lambda: 1)
    ser = analyzer.open(paths["per_tensor"]).catalog
    assert [s.name for s in par.shards] == [s.name for s in ser.shards]
    for a, b in zip(par.shards, ser.shards):
        assert a.payloads == b.payloads and a.nbytes == b.nbytes and a.offsets == b.offsets
        assert all(np.array_equal(a.steps[c], b.steps[c]) for c in a.steps)
    assert par.problems == ser.problems
    # a damaged shard in the workers' half: the same one-line error as the serial scan
    bad = tmp_path / "bad"
    shutil.copytree(paths["per_tensor"], bad)
    n = len(ser.shards)
    with open(shard_path(bad, n - 1), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(TraceError) as serial_err:
        analyzer.open(bad)
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    h5read.forget_verdicts()
    spy.clear()
    with pytest.raises(TraceError) as split_err:
        analyzer.open(bad)
    assert spy == [2] and str(split_err.value) == str(serial_err.value)


def test_run_split_returns_in_order_and_raises_the_first_error():
    _fork_possible()
    assert workers.run_split(lambda x: (x, np.arange(x).sum()), [3, 5, 7]) == [(3, 3), (5, 10), (7, 21)]

    def fail(x):
        if x:
            raise TraceError(f"part {x}")
        return x
    with pytest.raises(TraceError, match="part 1"):
        workers.run_split(fail, [0, 1, 2])


def test_meanwhile_work_runs_once_here_while_the_workers_run():
    """workers.meanwhile(work): the first run_split of the block that forks calls work() in this process
    once its workers are started (they finish their part meanwhile), before its own part; a split that
    runs in one process, a second split and a split after the block do not call it; an error of the
    work does not fail the split."""
    _fork_possible()
    calls = []

    def work():
        calls.append((os.getpid(), time.perf_counter()))

    def part(x):
        time.sleep(0.3 if x else 0.0)
        return os.getpid(), time.perf_counter()
    with workers.meanwhile(work):
        assert workers.run_split(part, [0]) and calls == []        # one part: nothing forked, not called
        (p0, t0), (p1, _) = workers.run_split(part, [0, 1])
        assert calls and calls[0][0] == os.getpid() == p0 != p1 and calls[0][1] <= t0
        workers.run_split(part, [0, 1])
    workers.run_split(part, [0, 1])
    assert len(calls) == 1

    def broken():
        raise ImportError("no plotting library")
    with workers.meanwhile(broken):   # an error of the work done ahead is not the job's
        assert [p for p, _ in workers.run_split(part, [0, 1])][0] == os.getpid()
