"""Gradient statistics computed on the device every step (recording tier 1), against numpy on the
raw gradients captured in the training loop."""

import numpy as np
import pytest
import torch
from torch import nn

from helpers import split_payloads

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.engine import grad_stat_columns
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.gradstats import CHUNK, GradStatsPlan
from bbdecoder.recorder.packing import Pending, pack

from helpers import Tiny, stats64


def _ref(g):
    """count, nonfinite, sum, sumsq, sum_abs, max_abs of a tensor, in float64 numpy."""
    x = g.detach().double().numpy().ravel()
    f = x[np.isfinite(x)]
    return np.array([f.size, x.size - f.size, f.sum(), (f * f).sum(), np.abs(f).sum(),
                     np.abs(f).max() if f.size else np.nan])


#: float32 partial sums over 4,096 values: relative error about 1e-7 of sum |g| (documented bound 1e-6)
TOL = 1e-6


def _check(vec, ref):
    scale = max(ref[4], 1e-30)    # the signed sum is compared relative to sum |g| (it may cancel)
    assert vec[0] == ref[0] and vec[1] == ref[1]
    np.testing.assert_allclose(vec[2], ref[2], rtol=0, atol=TOL * scale)
    np.testing.assert_allclose(vec[3:5], ref[3:5], rtol=TOL)
    np.testing.assert_allclose(vec[5], ref[5], rtol=0, equal_nan=True)   # max |g| is exact


@pytest.mark.parametrize("chunk", [CHUNK, 256, 7])
def test_plan_matches_numpy_on_awkward_sizes_and_non_finite_values(chunk):
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 20000]
    grads = [torch.randn(n, generator=g) * (i + 1) + 0.5 * i for i, n in enumerate(sizes)]
    grads[3][[0, 17, 100]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    grads[2][:] = float("nan")                       # no finite element at all
    grads[6][-1] = float("inf")                      # in the last, padded chunk
    grads[7] = grads[7].reshape(100, 200)            # any shape: the plan flattens
    plan = GradStatsPlan([(f"l{i}", "p", t.numel(), {}) for i, t in enumerate(grads)], chunk=chunk)
    out = plan.finish(plan.partials(grads).numpy())
    assert plan.keys == tuple((f"l{i}", "p") for i in range(len(grads)))
    assert out.shape == (len(grads), len(fmt.GRAD_STAT_FIELDS))
    for vec, t in zip(out, grads):
        _check(vec, _ref(t))
    again = plan.finish(plan.partials(grads).numpy())   # buffers are reused: same answer
    np.testing.assert_array_equal(out, again)


def test_merging_chunks_equals_the_whole():
    """The per-chunk partial statistics merged on the host (any chunk size) equal one pass over
    the whole tensor (a random split of the elements into rows)."""
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g) for n in (1000, 37, 5000)]
    whole = GradStatsPlan([("a", "p", t.numel(), {}) for t in grads], chunk=1 << 16)
    parts = GradStatsPlan([("a", "p", t.numel(), {}) for t in grads], chunk=13)
    assert whole.rows == 3 and parts.rows == sum(-(-t.numel() // 13) for t in grads)
    a = whole.finish(whole.partials(grads).numpy())
    b = parts.finish(parts.partials(grads).numpy())
    np.testing.assert_allclose(a[:, [0, 1, 5]], b[:, [0, 1, 5]], rtol=0)          # counts and max: exact
    for j in (2, 3, 4):
        np.testing.assert_allclose(a[:, j], b[:, j], rtol=TOL, atol=TOL * a[:, 4].max())


def test_row_length_follows_the_model_size():
    """Small models get short rows in one region (fewer operations, less padding); from about a
    million elements the rows are CHUNK long (partials stay about 5 KB per million parameters)."""
    from bbdecoder.recorder.gradstats import MIN_CHUNK, ROWS_TARGET, chunk_for
    assert chunk_for(0) == chunk_for(141_378) == MIN_CHUNK == 256
    assert chunk_for(651_274) == 1024 and chunk_for(ROWS_TARGET * 1024) == 1024
    assert chunk_for(ROWS_TARGET * 1024 + 1) == CHUNK == chunk_for(7 * 10 ** 9)
    # a tiny-BERT-like list of tensors: one region of 256-element rows, less padding than 4096-rows
    sizes = [512 * 64, 64 * 64] + [64 * 64, 64, 64 * 256, 256, 256 * 64, 64, 64, 64] * 2 + [64 * 2, 2]
    items = [(f"l{i}", "p", n, {}) for i, n in enumerate(sizes)]
    small, big = GradStatsPlan(items, chunk_for(sum(sizes))), GradStatsPlan(items)
    assert len(small.regions) == 1 and small.regions[0][2] == 256 and small.size < big.size
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=g) for n in sizes]
    for vec, t in zip(small.finish(small.partials(grads).numpy()), grads):
        _check(vec, _ref(t))


def test_half_precision_gradients():
    grads = [torch.randn(300).half(), torch.randn(50).bfloat16()]
    plan = GradStatsPlan([(f"l{i}", "p", t.numel(), {}) for i, t in enumerate(grads)])
    for vec, t in zip(plan.finish(plan.partials(grads).numpy()), grads):
        _check(vec, _ref(t))


def test_columns_from_recorded_statistics():
    x = np.random.default_rng(0).standard_normal((3, 50))
    x[1, :4] = np.nan
    vec = np.stack([_ref(torch.from_numpy(r)) for r in x])
    vec = np.vstack([vec, [np.nan, 0, 0, 0, 0, 0], [10, 45, 0, 0, 0, 0]])   # damaged rows: unknown counts
    c = grad_stat_columns(vec, 50)
    for i in range(3):
        want = stats64(x[i])
        for k in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            np.testing.assert_allclose(c[k][i], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
        assert c["nonfinite"][i] == want["nonfinite"] and c["count"][i] == 50 - want["nonfinite"]
    for i in (3, 4):   # read as 50 non-finite elements
        assert c["count"][i] == 0 and c["nonfinite"][i] == 50 and np.isnan(c["mean"][i]) and np.isnan(c["l2"][i])


class WithUnused(nn.Module):
    """Tiny plus a layer used only on even steps (its gradient is None on odd steps)."""

    def __init__(self):
        super().__init__()
        self.tiny = Tiny()
        self.extra = nn.Linear(5, 5)

    def forward(self, x, use_extra):
        y = self.tiny(x)
        return self.extra(y) if use_extra else y


def test_default_recorder_statistics_every_step_raw_on_schedule(tmp_path):
    """Default Recorder: gradient statistics every step, raw gradients every 50 steps. Here raw
    every 10: per-step statistics for every step equal numpy on the captured gradients (including
    a NaN/Inf step and a layer without gradient on odd steps); the steps with both give one row;
    the epoch's element-wise noise comes from the raw steps."""
    torch.manual_seed(0)
    model = WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    names = {p: (mn, pn) for mn, m in model.named_modules() for pn, p in m.named_parameters(recurse=False)}
    cap, epochs, nan_step = {}, 2, 13
    with Recorder(model, tmp_path / "r", grads_every=10) as rec:
        assert rec.config["grad_stats_every"] == "every(1)" and rec.config["weights_every"] == "every(50)"
        step = 0
        for ep in range(epochs):
            for _ in range(15):
                x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
                loss = nn.functional.cross_entropy(model(x, step % 2 == 0), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if step == nan_step:
                    model.tiny.head.weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                for p, key in names.items():
                    if p.grad is not None:
                        cap.setdefault(key, {})[step] = p.grad.detach().clone()
                rec.step(loss=loss)
                if step == nan_step:
                    model.tiny.head.weight.grad.nan_to_num_(0.0, 0.0, 0.0)
                opt.step()
                step += 1
            rec.epoch_end()
    run = analyzer.open(tmp_path / "r")
    got = run.recorded()
    assert got["grad_stats"]["steps"] == 30 and got["grads"]["steps"] == 3
    df = run.grad_stats()
    assert len(df) == sum(len(v) for v in cap.values())      # one row per (step, parameter) with a gradient
    assert not df.duplicated(["step", "layer", "param"]).any()
    for (mn, pn), per_step in cap.items():
        sub = df[(df["layer"] == mn) & (df["param"] == pn)].set_index("step")
        assert sorted(sub.index) == sorted(per_step)
        for s, g in per_step.items():
            want = stats64(g.numpy())
            row = sub.loc[s]
            assert row["nonfinite"] == want["nonfinite"] and row["count"] == g.numel() - want["nonfinite"]
            for k in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
                assert row[k] == pytest.approx(want[k], rel=TOL, abs=TOL * want["abs_mean"]), (mn, pn, s, k)
    assert df[df["nonfinite"] > 0]["step"].unique().tolist() == [nan_step]
    ep = run.grad_stats(per="epoch")
    w = cap[("tiny.head", "weight")]
    for e in range(epochs):
        row = ep[(ep["epoch"] == e) & (ep["layer"] == "tiny.head") & (ep["param"] == "weight")].iloc[0]
        steps = range(15 * e, 15 * e + 15)
        assert row["n_steps"] == 15
        assert row["l2"] == pytest.approx(np.mean([stats64(w[s].numpy())["l2"] for s in steps]), rel=TOL)
        raw = np.stack([w[s].double().numpy().ravel() for s in steps if s % 10 == 0])
        assert row["grad_noise"] == pytest.approx(raw.var(0).mean(), rel=1e-9)


def test_statistics_off_and_raw_only_still_give_per_step_statistics(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    grads = {}
    with Recorder(m, tmp_path / "r", grads_every=2, grad_stats_every=0) as rec:
        for s in range(5):
            loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 8, 8)), torch.randint(0, 5, (4,)))
            opt.zero_grad()
            loss.backward()
            grads[s] = m.head.weight.grad.clone()
            rec.step(loss=loss)
            opt.step()
    run = analyzer.open(tmp_path / "r")
    assert run.recorded()["grad_stats"]["steps"] == 0
    df = run.grad_stats()
    sub = df[(df["layer"] == "head") & (df["param"] == "weight")].set_index("step")
    assert sorted(sub.index) == [0, 2, 4]
    for s in (0, 2, 4):
        assert sub.loc[s, "l2"] == pytest.approx(stats64(grads[s].numpy())["l2"], rel=1e-9)


def test_group_items():
    from bbdecoder.recorder.gradstats import group_items
    assert group_items([1, 1, 1], limit=2 * CHUNK) == [[0, 1], [2]]
    assert group_items([5 * CHUNK, 1, CHUNK + 1, 1], limit=3 * CHUNK) == [[0], [1, 2], [3]]
    assert group_items([]) == []


def test_parameters_in_groups_through_one_bounded_scratch(tmp_path, monkeypatch):
    """With groups of at most 3 chunks, a model's gradient statistics are computed group by group
    through one pair of scratch buffers of 3 chunks (the memory bound), with the same numbers."""
    import bbdecoder.recorder.gradstats as gst
    monkeypatch.setattr(gst, "GROUP_ELEMS", 3 * CHUNK)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 200), nn.ReLU(), nn.Linear(200, 30))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    grads = {}
    with Recorder(m, tmp_path / "r", grads_every=0, weights_every=0) as rec:
        for s in range(3):
            loss = m(torch.randn(16, 100)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grads[s] = {n: p.grad.clone() for n, p in m.named_parameters()}
            rec.step(loss=loss)
            opt.step()
        plans = next(iter(rec._gstat_plans.values()))
        assert len(plans) > 1 and all(pl.size <= 3 * CHUNK for pl, _ in plans)
        assert max(b[1].numel() for b in rec._gstat_scratch._bufs.values()) <= 3 * CHUNK
    df = analyzer.open(tmp_path / "r").grad_stats()
    assert len(df) == 3 * len(grads[0])
    for row in df.itertuples():
        want = stats64(grads[row.step][f"{row.layer}.{row.param}"].numpy())
        for k in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            assert getattr(row, k) == pytest.approx(want[k], rel=TOL, abs=TOL * want["abs_mean"]), k


def test_raw_snapshots_in_groups_round_trip(tmp_path, monkeypatch):
    """Raw gradients and weights are copied in groups of at most GROUP_ELEMS elements (one device
    temporary per group, not one of the model's size); what is stored is exactly the tensors."""
    import bbdecoder.recorder.gradstats as gst
    monkeypatch.setattr(gst, "GROUP_ELEMS", 6000)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 200), nn.ReLU(), nn.Linear(200, 30))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    grads, weights = {}, {}
    with Recorder(m, tmp_path / "r", grads_every=1, weights_every=1, grad_stats_every=0) as rec:
        for s in range(2):
            loss = m(torch.randn(16, 100)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grads[s] = {n: p.grad.clone() for n, p in m.named_parameters()}
            weights[s] = {n: p.detach().clone() for n, p in m.named_parameters()}
            probe = Pending(s, 0, 0.0, 0.0)
            pack(probe, [("grads", lk, pk, q.grad, a) for lk, pk, q, a in rec._grad_targets], torch.float32)
            assert len(probe.groups) > 1 and all(h.numel() <= 6000 or len(lay) == 1 for h, lay in probe.groups)
            rec.step(loss=loss)
            opt.step()
    import h5py
    shard = tmp_path / "r" / fmt.rank_dirname(0) / fmt.shard_filename(0)
    with h5py.File(shard, "r") as f:
        data = {}
        f.visititems(lambda k, o: data.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
    payloads = split_payloads(data)   # the flat snapshot groups split per tensor by their index
    for s in range(2):
        for name, g in grads[s].items():
            lk, pk = name.rsplit(".", 1)
            np.testing.assert_array_equal(payloads[f"grads/{lk}/{pk}"][0][s], g.numpy())
            np.testing.assert_array_equal(payloads[f"weights/{lk}/{pk}"][0][s], weights[s][name].numpy())


def _f16_losses(x):
    """(underflow, overflow) of numpy's own float16 cast of ``x``: non-zero -> 0, finite -> inf."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return int(((x != 0) & (h == 0)).sum()), int((np.isfinite(x) & np.isinf(h)).sum())


def test_float16_storage_counts_underflow_and_overflow_and_warns_once(tmp_path):
    """Raw gradients and weights stored as float16: the values the cast turns into 0 or inf are counted
    (per shard, root attributes) exactly as numpy's float16 cast counts them, and one RecorderWarning
    names the first step that lost any; float32 storage adds neither."""
    import glob
    import warnings
    import h5py
    from bbdecoder.recorder import RecorderWarning
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 3))
    rng = np.random.default_rng(0)

    def values(shape, s):   # steps 0, 1 exactly representable; later |x| from 1e-12 to 1e7, zeros, NaN, inf
        if s < 2:
            return np.full(shape, 0.5, np.float32)
        x = (rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-12, 7, size=shape)).astype(np.float32)
        x.reshape(-1)[:3] = [0.0, np.inf, np.nan]
        return x

    want: dict = {}   # (kind, step) -> (underflow, overflow)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = Recorder(model, str(tmp_path / "run"), grads_every=1, weights_every=1, grad_dtype="float16",
                       weight_dtype="float16", flush_steps=3)
        for s in range(7):
            wg = {"grads": [], "weights": []}
            for p in model.parameters():
                g, w = values(p.shape, s), values(p.shape, s)
                p.grad = torch.from_numpy(g)
                with torch.no_grad():
                    p.copy_(torch.from_numpy(w))
                wg["grads"].append(g)
                wg["weights"].append(w)
            for kind, xs in wg.items():
                want[(kind, s)] = tuple(map(sum, zip(*(_f16_losses(x) for x in xs))))
            rec.step()
        rec.close()
    ours = [w for w in caught if issubclass(w.category, RecorderWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    u, o = want[("grads", 2)]
    assert u > 0 and o > 0
    assert f"float16 storage of grads lost values at step 2: {u} non-zero value(s) stored as 0" in str(ours[0].message)
    assert f"and {o} finite value(s) stored as inf" in str(ours[0].message)
    shards = sorted(glob.glob(str(tmp_path / "run" / "rank-00000" / "shard-*.h5")))
    assert len(shards) == 3
    for path in shards:
        with h5py.File(path, "r") as f:
            steps = range(int(f.attrs["step_start"]), int(f.attrs["step_stop"]))
            for kind, (ua, oa) in fmt.CAST_COUNT_ATTRS.items():
                assert (int(f.attrs[ua]), int(f.attrs[oa])) == \
                    tuple(sum(want[(kind, s)][i] for s in steps) for i in (0, 1)), (path, kind)
    assert analyzer.open(tmp_path / "run").float16_losses() == {
        kind: {"underflow": sum(want[(kind, s)][0] for s in range(7)),
               "overflow": sum(want[(kind, s)][1] for s in range(7)), "shards": 3} for kind in ("grads", "weights")}
    rec = Recorder(model, str(tmp_path / "f32"), grads_every=1)
    rec.step()
    rec.close()
    assert analyzer.open(tmp_path / "f32").float16_losses() == {}
    with h5py.File(glob.glob(str(tmp_path / "f32" / "rank-00000" / "shard-*.h5"))[0], "r") as f:
        assert not any(a in f.attrs for names in fmt.CAST_COUNT_ATTRS.values() for a in names)
