"""Every statistic against a direct float64 numpy computation on the same tensors."""

import numpy as np
import pandas as pd
import pytest

from bbdecoder import analyzer
import bbdecoder.analyzer.engine as aengine
from bbdecoder.analyzer.catalog import READERS_KEPT
from helpers import record_tiny, stats64

RTOL = 1e-6


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("num") / "run"
    cap = record_tiny(str(d), epochs=3, steps_per_epoch=6, weights_every=2, flush_steps=5, nan_at=7)
    return str(d), cap


def test_steps_table(recorded):
    d, cap = recorded
    st = analyzer.open(d).steps
    assert list(st["step"]) == sorted(cap["losses"])
    np.testing.assert_allclose(st["loss"], [cap["losses"][s] for s in st["step"]], rtol=1e-12)
    assert list(st["epoch"]) == [cap["epochs"][s] for s in st["step"]]
    assert (np.diff(st["time"]) >= 0).all() and st["time"].iloc[0] == 0


def test_grad_stats_per_step(recorded):
    d, cap = recorded
    df = analyzer.open(d).grad_stats()
    assert len(df) == sum(len(v) for v in cap["grads"].values())
    for row in df.itertuples():
        want = stats64(cap["grads"][(row.layer, row.param)][row.step])
        for k in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            # gradient statistics from the device: float32 partial sums, so the signed mean is
            # compared relative to the magnitude (it may cancel to ~0)
            assert getattr(row, k) == pytest.approx(want[k], rel=RTOL, abs=RTOL * want["abs_mean"]), \
                (row.layer, row.step, k)
        assert row.nonfinite == want["nonfinite"]
    bad = df[df["nonfinite"] > 0]
    assert list(zip(bad["step"], bad["layer"], bad["param"])) == [(7, "head", "weight")]
    assert bad["nonfinite"].iloc[0] == 3


def test_grad_stats_per_epoch(recorded):
    d, cap = recorded
    ep = analyzer.open(d).grad_stats(per="epoch")
    for row in ep.itertuples():
        steps = sorted(s for s in cap["grads"][(row.layer, row.param)] if cap["epochs"][s] == row.epoch)
        per = [stats64(cap["grads"][(row.layer, row.param)][s]) for s in steps]
        assert row.n_steps == len(steps)
        for k in ("mean", "abs_mean", "var", "l1", "l2"):
            assert getattr(row, k) == pytest.approx(np.mean([p[k] for p in per]), rel=RTOL,
                                                    abs=RTOL * np.mean([p["abs_mean"] for p in per])), k
        assert row.max_abs == pytest.approx(max(p["max_abs"] for p in per), rel=RTOL)
        assert row.l2_var == pytest.approx(np.var([p["l2"] for p in per]), rel=1e-5)
        stack = np.stack([cap["grads"][(row.layer, row.param)][s] for s in steps]).astype(np.float64)
        stack = stack.reshape(len(steps), -1)
        stack[~np.isfinite(stack)] = np.nan
        assert row.grad_noise == pytest.approx(np.mean(np.nanvar(stack, axis=0)), rel=1e-5)
        assert row.nonfinite == sum(p["nonfinite"] for p in per)


def test_grad_stats_pooled_per_layer(recorded):
    d, cap = recorded
    df = analyzer.open(d).grad_stats(by="layer")
    for row in df.itertuples():
        parts = [cap["grads"][(row.layer, p)][row.step] for (L, p) in cap["grads"] if L == row.layer]
        want = stats64(np.concatenate([a.ravel() for a in parts]))
        for k in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            assert getattr(row, k) == pytest.approx(want[k], rel=1e-6, abs=1e-6 * want["abs_mean"]), k


def test_weight_stats_and_update_ratio(recorded):
    d, cap = recorded
    ws = analyzer.open(d).weight_stats()
    assert len(ws) == sum(len(v) for v in cap["weights"].values())
    for row in ws.itertuples():
        snaps = cap["weights"][(row.layer, row.param)]
        want = stats64(snaps[row.step])
        for k in ("mean", "std", "abs_mean", "max_abs", "min", "max", "l2"):
            assert getattr(row, k) == pytest.approx(want[k], rel=RTOL, abs=1e-12), k
        earlier = [s for s in snaps if s < row.step]
        if earlier:
            prev = snaps[max(earlier)].astype(np.float64)
            ratio = np.linalg.norm(snaps[row.step].astype(np.float64) - prev) / np.linalg.norm(prev)
            assert row.update_ratio == pytest.approx(ratio, rel=1e-6)
        else:
            assert np.isnan(row.update_ratio)


def test_weight_histograms_on_common_edges(recorded):
    d, cap = recorded
    h = analyzer.open(d).weight_histograms("head", bins=16)
    snaps = cap["weights"][("head", "weight")]
    allv = np.concatenate([v.ravel() for v in snaps.values()]).astype(np.float64)
    edges = np.linspace(allv.min(), allv.max(), 17)
    np.testing.assert_allclose(h.edges, edges, rtol=1e-12)
    assert list(h.steps) == sorted(snaps)
    for i, s in enumerate(h.steps):
        np.testing.assert_array_equal(h.counts[i], np.histogram(snaps[s].astype(np.float64), bins=edges)[0])
    assert h.counts.sum(1).tolist() == [snaps[s].size] * len(snaps)
    tidy = h.to_frame()
    assert len(tidy) == 16 * len(snaps) and tidy["count"].sum() == h.counts.sum()
    hb = analyzer.open(d).weight_histograms(0, bins=4, param="bias")
    assert hb.param == "bias" and hb.counts.shape == (len(cap["weights"][("conv", "bias")]), 4)


def test_shard_files_are_open_only_inside_keep_open(recorded):
    """Outside ``keep_open`` an analysis closes every shard it opened (the files can then be opened
    with other HDF5 flags in this process); inside, readers are reused and the numbers are the same."""
    import h5py
    d, _ = recorded
    run = analyzer.open(d)
    want = run.weight_histograms("head", bins=8).counts
    assert run.catalog.open_count == 0
    opens = []
    real = run.catalog._readers._opener
    run.catalog._readers._opener = lambda p, n: (opens.append(p), real(p, n))[1]
    with run.keep_open():
        a = run.weight_histograms("head", bins=8).counts
        n_first = len(opens)
        b = run.weight_histograms("head", bins=8).counts
        assert len(opens) == n_first > 0                  # the second pass reopened nothing
        assert 0 < run.catalog.open_count <= READERS_KEPT
        with run:                                         # nested: still kept after the inner block
            pass
        assert run.catalog.open_count > 0
    assert run.catalog.open_count == 0
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, want)
    for p in set(opens):                                  # default locking flags: nothing holds them
        with h5py.File(p, "r") as f:
            assert "steps" in f


def test_streaming_in_tiny_blocks_gives_identical_numbers(recorded, monkeypatch):
    d, _ = recorded
    big = analyzer.open(d)
    a, ea, w = big.grad_stats(), big.grad_stats(per="epoch"), big.weight_stats()
    monkeypatch.setattr(aengine, "BLOCK_BYTES", 64)  # one row per read
    small = analyzer.open(d)
    pd.testing.assert_frame_equal(a, small.grad_stats(), rtol=1e-12)
    pd.testing.assert_frame_equal(ea, small.grad_stats(per="epoch"), rtol=1e-9)
    pd.testing.assert_frame_equal(w, small.weight_stats(), rtol=1e-12)


def test_layer_selection_in_analyzer(recorded):
    d, _ = recorded
    run = analyzer.open(d)
    assert run.select(None) == [0, 1, 2]
    assert run.select("body.*") == [1]
    assert run.select("Conv2d") == [0, 1]
    assert run.select([2, "conv"]) == [0, 2]
    assert set(run.grad_stats(layers="head")["layer"]) == {"head"}
    with pytest.raises(analyzer.TraceError, match="unknown layer"):
        run.select("nope")


def test_noise_beside_the_moments_leaves_no_thread_and_reraises():
    """The gradient pass computes the element-wise noise in a helper thread beside the per-step
    moments: the helper's error reaches the caller, and no thread outlives the pass."""
    import threading
    from bbdecoder.analyzer.engine import _Beside
    before = threading.active_count()
    with _Beside() as b:
        done = b.run(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            done()
        out = []
        b.run(out.append, 5)()
        assert out == [5]
    assert threading.active_count() == before


def test_grad_pass_threads_end_with_the_pass(recorded):
    import threading
    d, _ = recorded
    before = threading.active_count()
    analyzer.open(d).grad_stats(per="epoch")
    assert threading.active_count() == before


def test_packed_and_per_parameter_layouts_give_identical_tables(recorded, tmp_path):
    """The gradient statistics stored packed (``/packed/grad_stats``, the default) and the same shards
    rewritten into the per-parameter layout of older traces (helpers.unpack_grad_stats, h5py only):
    every table that reads them is identical (report frames, per step / epoch / layer, what is recorded,
    non-finite findings)."""
    import h5py
    from helpers import copy_run, unpack_grad_stats
    from bbdecoder.analyzer.report.data import load_frames
    from bbdecoder.analyzer.report.sections.nonfinite import nonfinite_findings
    d, _ = recorded
    old = copy_run(d, tmp_path)
    shards = sorted(old.glob("rank-00000/shard-*.h5"))
    assert unpack_grad_stats(old) == len(shards) >= 3       # one packed group per shard, all rewritten
    with h5py.File(shards[0], "r") as f:
        assert "packed" not in f and sum(len(g) for g in f["grad_stats"].values()) == 5
    a, b = analyzer.open(d), analyzer.open(old)
    assert a.problems == b.problems == []
    fa, fb = load_frames(a), load_frames(b)
    for name in fa._fields:
        x, y = getattr(fa, name), getattr(fb, name)
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, rtol=1e-12, obj=name)
        else:
            assert x == y if not isinstance(x, np.ndarray) else np.array_equal(x, y)
    assert len(fa.gs_all) == 5 * 18 and fa.gs_all["nonfinite"].sum() == 3
    assert a.recorded() == b.recorded()
    assert nonfinite_findings(a, fa.gs_all, fa.ws) == nonfinite_findings(b, fb.gs_all, fb.ws)
