"""The fused activation statistics (one compiled pass per call) against the plain-torch reference
and numpy: random tensors of several shapes and dtypes (float32, bfloat16, float16, float64), NaN
and Inf, a mean far larger than the spread, bounded kinds' near-bound counts, accumulation over
calls; through a recorded run (eager and torch.compile'd model, autocast bf16); the fallback when
the compiler fails; and the byte budget of activation statistics read from a written trace."""

from __future__ import annotations

import helpers

import math
import warnings

import json

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bbdecoder import analyzer  # noqa: E402
from bbdecoder.recorder import Recorder, RecorderWarning  # noqa: E402
from bbdecoder.recorder import activation_stats as AS  # noqa: E402
from bbdecoder.recorder import fused_stats as FS  # noqa: E402

ROOT = helpers.ROOT
EPS32 = float(np.finfo(np.float32).eps)


def _run_both(v, bounds=None, x=None, dim=None, calls=1):
    """(fused, reference, eager) accumulators after ``calls`` calls on ``v`` (the first fresh)."""
    U = v.shape[1]
    near = bounds is not None and x is None
    thr = FS.thresholds(bounds, v.device) if near else None
    out = []
    for fn in (FS.fused_update, FS.reference_update, FS.eager_update):
        acc = FS.new_acc(U, near, x is not None, v.device)
        for i in range(calls):
            fn(acc, v, thr, x, dim, fresh=i == 0)
        out.append(acc)
    return out


def _check(fused, ref, v, near=False, soft=False, calls=1):
    """Fused equals the reference: counts, extrema and near counts exactly; sums within float32
    rounding of sum |h|; the variance (sumsq / n - mean^2) within float32 rounding of itself."""
    A, U, Q = v.shape
    lay = FS.acc_layout(U, near, soft)
    R = lay["rows"]
    f, r = fused[:R * U].view(R, U).numpy(), ref[:R * U].view(R, U).numpy()
    ix = {k: i for i, k in enumerate(FS.ROWS)}
    for k in ("min", "max", "n_pos", "nonfinite"):
        np.testing.assert_array_equal(f[ix[k]], r[ix[k]], err_msg=k)
    np.testing.assert_array_equal(f[len(FS.ROWS):], r[len(FS.ROWS):], err_msg="near")
    np.testing.assert_array_equal(fused[R * U:].numpy(), ref[R * U:].numpy(), err_msg="scalars")
    assert ref[lay["count"]].item() == calls * A * Q
    ok = np.isfinite(r[ix["sum"]]) & np.isfinite(r[ix["sumsq"]])
    for k in ("sum", "sumsq", "sum_abs"):   # non-finite units: the same inf / NaN
        np.testing.assert_array_equal(np.isnan(f[ix[k]]), np.isnan(r[ix[k]]), err_msg=k)
        np.testing.assert_array_equal(f[ix[k]][~np.isfinite(r[ix[k]])], r[ix[k]][~np.isfinite(r[ix[k]])])
    scale = r[ix["sum_abs"]][ok]
    n = calls * A * Q
    np.testing.assert_array_less(np.abs(f[ix["sum"]][ok] - r[ix["sum"]][ok]), 8 * EPS32 * scale + 1e-300)
    np.testing.assert_allclose(f[ix["sum_abs"]][ok], scale, rtol=8 * EPS32)
    var_f = f[ix["sumsq"]][ok] / n - (f[ix["sum"]][ok] / n) ** 2
    var_r = r[ix["sumsq"]][ok] / n - (r[ix["sum"]][ok] / n) ** 2
    ms = r[ix["sumsq"]][ok] / n
    np.testing.assert_array_less(np.abs(var_f - var_r), 8 * EPS32 * var_r + 1e-13 * ms + 1e-300)


def test_cpu_pass_threads_setting_gives_the_same_statistics(monkeypatch):
    """The CPU pass is compiled single-threaded by default (no OpenMP barrier to wait at while another
    thread holds a core); ``BBDECODER_STATS_THREADS=2`` compiles a 2-thread pass. Both equal the
    float64 reference (rows long enough for both threads to take a share: 64 x 8 rows of 1,000)."""
    assert FS.cpu_threads() == FS.CPU_THREADS == 1
    g = torch.Generator().manual_seed(7)
    v = torch.randn(64, 8, 1000, generator=g).relu_()
    v.view(-1)[17] = float("nan")
    for env in ("", "2"):
        monkeypatch.setenv("BBDECODER_STATS_THREADS", env)
        assert FS.cpu_threads() == (2 if env else 1)
        fused, ref, _ = _run_both(v, calls=2)
        _check(fused, ref, v, calls=2)
    monkeypatch.setenv("BBDECODER_STATS_THREADS", "0")
    assert FS.cpu_threads() == torch.get_num_threads()


CASES = [  # shape (A, U, Q), dtype, kind (the classes of compiled graphs the recorded runs below use too)
    ((8, 5, 63), torch.float32, None), ((3, 4, 1000), torch.float32, None), ((64, 7, 1), torch.float32, None),
    ((300, 4, 1), torch.float32, "tanh"), ((16, 6, 10), torch.bfloat16, None),
    ((40, 6, 1), torch.bfloat16, "tanh"), ((50, 5, 1), torch.float16, "sigmoid")]


@pytest.mark.parametrize("shape,dtype,kind", CASES)
def test_fused_equals_reference_and_numpy(shape, dtype, kind):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "tanh":
        x = (3 * x).tanh()                                # many values within 0.01..0.1 of the bounds
    elif kind == "sigmoid":
        x = (4 * x).sigmoid()
    else:
        x[:, 0] = 300.0 + 3e-3 * x[:, 0]                  # unit 0: mean 1e5 x its spread
    v = x.to(dtype)
    if kind is None and dtype != torch.float64:
        v.view(-1)[5] = float("nan")                       # unit 0: NaN
        v[1, 1, 0] = float("inf")                          # unit 1: +inf
        v[0, 2, 0] = -float("inf")                         # unit 2: -inf as its first value (the shift)
    bounds = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}.get(kind)
    fused, ref, eager = _run_both(v, bounds, calls=2)
    _check(fused, ref, v, near=bounds is not None, calls=2)
    _check(eager, ref, v, near=bounds is not None, calls=2)     # the fallback (same body, uncompiled)
    # the reference against numpy in float64 (two calls: every sum doubles)
    m = v.double().numpy().transpose(1, 0, 2).reshape(shape[1], -1)
    U = shape[1]
    R = FS.acc_layout(U, bounds is not None, False)["rows"]
    r = ref[:R * U].view(R, U).numpy()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(r[5], 2 * (m > 0).sum(1))
        np.testing.assert_array_equal(r[3], m.min(1))
        np.testing.assert_array_equal(r[4], m.max(1))
        np.testing.assert_array_equal(r[6], 2 * (~np.isfinite(m)).sum(1))
        ok = np.isfinite(m).all(1)
        np.testing.assert_allclose(r[0][ok], 2 * m[ok].sum(1), rtol=1e-12)
        var = r[2][ok] / (2 * m.shape[1]) - (r[0][ok] / (2 * m.shape[1])) ** 2
        np.testing.assert_allclose(var, m[ok].var(1), rtol=2e-6)   # also for the far-from-zero unit
    if bounds is not None:
        lo, hi = bounds
        f32 = v.float().numpy().transpose(1, 0, 2).reshape(U, -1)
        for j, d in enumerate(FS.NEAR_DELTAS):
            want = ((f32 < np.float32(lo + d)) | (f32 > np.float32(hi - d))).sum(1)
            np.testing.assert_array_equal(r[len(FS.ROWS) + j], 2 * want)
            assert want.sum() > 0


@pytest.mark.parametrize("count_max", [1 << 24, 8])
def test_row_counts_float32_and_int32_equal_numpy(monkeypatch, count_max):
    """A row's counts (n_pos, non-finite, near-bound) are summed in float32 for rows of at most 2**24
    values, in int32 beyond: both exact. ``count_max`` 8 sends rows of 40 values down the int32 path."""
    monkeypatch.setattr(FS, "_F32_COUNT_MAX", count_max)
    g = torch.Generator().manual_seed(7)
    v = (3 * torch.randn(30, 5, 40, generator=g)).tanh()
    v[v.abs() < 0.2] = 0.0                               # exact zeros: not counted as positive
    v[3, 1, 7], v[4, 2, 0], v[9, 2, 11] = float("nan"), float("inf"), -float("inf")
    thr = FS.thresholds((-1.0, 1.0), v.device)
    acc = FS.new_acc(5, True, False, v.device)
    for i in range(3):
        FS.eager_update(acc, v, thr, fresh=i == 0)
    r = acc[:FS.acc_layout(5, True, False)["rows"] * 5].view(-1, 5).numpy()
    m = v.numpy().transpose(1, 0, 2).reshape(5, -1)
    np.testing.assert_array_equal(r[FS.ROWS.index("n_pos")], 3 * (m > 0).sum(1))
    np.testing.assert_array_equal(r[FS.ROWS.index("nonfinite")], 3 * (~np.isfinite(m)).sum(1))
    with np.errstate(invalid="ignore"):
        for j, d in enumerate(FS.NEAR_DELTAS):
            want = ((m < np.float32(-1 + d)) | (m > np.float32(1 - d))).sum(1)
            assert want.sum() > 0
            np.testing.assert_array_equal(r[len(FS.ROWS) + j], 3 * want)


def test_softmax_row_counts_and_float32_exact_counts():
    g = torch.Generator().manual_seed(1)
    x = F.softmax(4 * torch.randn(50, 6, 7, generator=g), dim=1)    # (N, C, T), softmax over C
    v = x.reshape(50, 6, 7)
    fused, ref, eager = _run_both(v, (0.0, 1.0), x=x, dim=1)
    _check(fused, ref, v, soft=True)
    _check(eager, ref, v, soft=True)
    lay = FS.acc_layout(6, False, True)
    mx = x.amax(1).numpy()
    want = [(mx > np.float32(1 - d)).sum() for d in FS.NEAR_DELTAS] + [mx.size]
    np.testing.assert_array_equal(ref[lay["soft"]:].numpy(), want)
    assert 0 < want[0] < want[2] < mx.size


def test_site_take_layout_and_dtypes():
    site = AS.Site({"kind": "tanh", "units": 4, "bounds": [-1.0, 1.0], "near_deltas": list(FS.NEAR_DELTAS)})
    x = torch.linspace(-1, 1, 40).view(10, 4)
    st = AS.SiteStats(fused="reference").stats(x, 1, 4, site)
    assert st["near"].dtype == torch.int32 and st["near"].shape == (4, len(FS.NEAR_DELTAS))
    a = x.numpy()
    for j, d in enumerate(FS.NEAR_DELTAS):
        np.testing.assert_array_equal(st["near"][:, j].numpy(), ((a < -1 + d) | (a > 1 - d)).sum(0))
    assert st["count"].item() == 10 and st["nonfinite"].item() == 0
    np.testing.assert_allclose(st["sumsq"].numpy(), (a.astype(np.float64) ** 2).sum(0), rtol=1e-12)
    assert site.take() is None                         # nothing accumulated since


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc(h))
        return F.softmax(self.head(h), dim=1)


def _record(path, fused, compiled=False, autocast=False, steps=2):
    torch.manual_seed(0)
    net = Net()
    model = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)
        with Recorder(model, path, activations=True, grads_every=0, weights_every=0, activations_every=0) as rec:
            rec._tracker.kernel.fused = fused
            for i in range(steps):
                x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    y = model(x)
                loss = y.float()[:, 0].mean()
                loss.backward()
                rec.step(loss=loss)
                opt.step()
                opt.zero_grad()
            assert rec._tracker.kernel.failed is None
    return analyzer.open(path)


@pytest.mark.parametrize("mode", ["eager", "autocast", "compiled"])
def test_recorded_run_fused_equals_reference(tmp_path, mode):
    """The same training run recorded through the fused pass and through the reference: the
    analyzer's per-unit statistics agree within float32 rounding and the saturation figures exactly
    (the fused run inside a torch.compile'd model, or under autocast bf16)."""
    kw = dict(autocast=mode == "autocast")
    ref = _record(tmp_path / "ref", "reference", **kw)
    got = _record(tmp_path / "fused", True, compiled=mode == "compiled", **kw)
    a, b = ref.activation_stats(), got.activation_stats()
    assert len(a) == len(b) == 2 * (8 + 32 + 5) and set(a["site"]) == {"act", "/tanh#0", "/softmax#0"}
    for col in ("count", "frac_active", "nonfinite"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    # compiled model: its own forward rounds differently (about 1 ulp), not the statistics
    tol = 4e-6 if mode == "compiled" else 1e-6
    for col in ("mean", "abs_mean", "std", "min", "max"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=tol, atol=tol, err_msg=col)
    if mode != "compiled":
        for col in ("min", "max"):
            np.testing.assert_array_equal(b[col].to_numpy(), a[col].to_numpy(), err_msg=col)
        for d in (0.01, 0.03, 0.1):
            np.testing.assert_array_equal(got.saturation(d, per_unit=True)["saturated"].to_numpy(),
                                          ref.saturation(d, per_unit=True)["saturated"].to_numpy())


def test_compiler_failure_falls_back_with_one_warning(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(AS, "fused_update", broken)
    ref = _record(tmp_path / "ref", False)          # the eager body: what the fallback runs
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(net, tmp_path / "fb", activations=True, grads_every=0, weights_every=0,
                      activations_every=0) as rec:
            rec._tracker.kernel.fused = True
            for i in range(2):
                x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i))
                loss = net(x)[:, 0].mean()
                loss.backward()
                rec.step(loss=loss)
                opt.step()
                opt.zero_grad()
    mine = [w for w in caught if issubclass(w.category, RecorderWarning)]
    assert len(mine) == 1 and "no C++ compiler" in str(mine[0].message)
    got = analyzer.open(tmp_path / "fb")
    assert got.status == "complete"
    a, b = ref.activation_stats(), got.activation_stats()
    pd_equal = a.reset_index(drop=True).equals(b.reset_index(drop=True))
    assert pd_equal


class Budget(nn.Module):
    """Every kind of site at its usual width: ReLU (64), tanh (32), sigmoid (48), hardtanh (32), softmax."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(16, 64), nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.sigmoid(self.c(h))
        h = F.hardtanh(self.d(h))
        return F.softmax(self.head(h), dim=1)


def _act_stats_bytes(run_dir):
    """Bytes of every activation-statistics dataset (values and steps; not the index, its JSON) in the
    run's shards (``/flat/act_stats/<n>``)."""
    total = 0
    for shard in sorted(p for p in run_dir.rglob("*.h5")):
        with h5py.File(shard, "r") as f:
            if "flat/act_stats" not in f:
                continue

            def visit(name, obj):
                nonlocal total
                if isinstance(obj, h5py.Dataset) and not name.endswith("index"):
                    total += obj.size * obj.dtype.itemsize
            f["flat/act_stats"].visititems(visit)
    return total


def test_default_budget_of_64_bytes_per_unit_and_step(tmp_path):
    """Default settings: the activation statistics written (bytes of the /act_stats datasets, values
    and steps) divided by the units and steps stay at or under 64 bytes; the bounded kinds store
    int32 near-bound counts, not 200-bin float64 histograms (1,600 bytes per unit)."""
    torch.manual_seed(0)
    model = Budget()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    steps = 5
    with Recorder(model, tmp_path / "run", activations=True) as rec:
        for i in range(steps):
            loss = model(torch.randn(8, 16))[:, 0].mean()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
            opt.zero_grad()
    run = analyzer.open(tmp_path / "run")
    sites = run.manifest["sites"]
    units = sum(S["units"] for S in sites)
    assert units == 64 + 32 + 48 + 32 + 10
    assert {S["kind"] for S in sites if "near" in S["stats"]} == {"tanh", "sigmoid", "hardtanh", "softmax"}
    assert not any("hist" in S["stats"] for S in sites)
    nbytes = _act_stats_bytes(tmp_path / "run")
    per = nbytes / units / steps
    assert per <= 64, per
    # the same figure from the format (recorder.act_window.row_bytes)
    from bbdecoder.recorder.act_window import row_bytes
    assert nbytes == steps * row_bytes(sites)
    with h5py.File(next(p for p in (tmp_path / "run").rglob("*.h5")), "r") as f:
        key = next(S["key"] for S in sites if S["kind"] == "tanh")
        dtypes = {}
        for g in f["flat/act_stats"].values():   # each flat group's index: [[site, stat, attrs, start, n, shape]]
            for e in json.loads(g["index"][()].tobytes()):
                dtypes[(e[0], e[1])] = g["values"].dtype
        assert dtypes[(key, "near")] == np.int32 and dtypes[(key, "sum")] == np.float64


def test_old_histogram_sites_still_read():
    """A trace written with 200-bin histograms (format version 1 before the near-bound counts): the
    saturation reading rounds delta down to a bin edge, as before."""
    import importlib
    SAT = importlib.import_module("bbdecoder.analyzer.activations.saturation")
    B = 200
    S = {"kind": "tanh", "bounds": [-1.0, 1.0], "hist_edges": [-1 + 2 * i / B for i in range(B + 1)],
         "stats": {"hist": [3, B], "count": []}}
    h = np.zeros((2, 3, B))
    h[:, :, 0] = 1           # [-1, -0.99)
    h[:, :, 2] = 2           # [-0.98, -0.97)
    h[:, :, 100] = 7
    sat, tot, used = SAT._bounded_counts(S, 0.03, {"hist": h, "count": np.array([10.0, 10.0])})
    assert used == pytest.approx(0.03) and (sat == 3).all() and (tot == 10).all()
    S2 = {"kind": "tanh", "near_deltas": list(FS.NEAR_DELTAS), "stats": {"near": [3, 3], "count": []}}
    near = np.arange(18, dtype=np.int32).reshape(2, 3, 3)
    sat, tot, used = SAT._bounded_counts(S2, 0.05, {"near": near, "count": np.array([40.0, 50.0])})
    assert used == 0.03 and (sat == near[..., 1]).all() and (tot == [[40] * 3, [50] * 3]).all()
