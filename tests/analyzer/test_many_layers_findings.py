"""Issue 16 (the analyzer at 100,000 layers): the health rules judge every layer at once (one array
operation over a layer x step table instead of one call per layer) and give exactly the findings of a
per-layer computation, written here independently (a deque of the trailing window and np.median, as
Iglewicz & Hoaglin's modified z-score is defined; pandas groupby one layer at a time)."""

from collections import deque

import numpy as np
import pandas as pd
import pytest

import bbdecoder
from bbdecoder.analyzer.findings import data as D
from bbdecoder.analyzer.findings import robust as R
from bbdecoder.analyzer.findings.base import finding
from bbdecoder.analyzer.findings.gradients import AllZero, ExplodingGradient, GradientSpike, VanishingGradient, \
    layer_outliers
from bbdecoder.analyzer.gradients import pool_params
from bbdecoder.analyzer.trace import format as fmt
from helpers import record_tiny


def ref_outliers(values, window, z, min_rise, min_ref=5, log=True, mad_floor=0.01):
    """The trailing-window detector, one value at a time (flagged values leave the window)."""
    v = np.asarray(values, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log10(np.where(v > 0, v, np.nan)) if log else v
    n = len(x)
    flag, score, rise = np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan)
    ref = deque(maxlen=window)
    for i in range(n):
        if not np.isfinite(x[i]):
            continue
        if len(ref) >= min_ref:
            a = np.array(ref)
            med = np.median(a)
            mad = np.median(np.abs(a - med))
            floor = mad_floor if log else mad_floor * abs(med) + 1e-12
            score[i] = 0.6745 * (x[i] - med) / max(mad, floor)
            with np.errstate(all="ignore"):
                rise[i] = 10.0 ** (x[i] - med) if log else (
                    (x[i] - med) / abs(med) if med != 0 else np.inf * np.sign(x[i] - med))
            flag[i] = score[i] > z and rise[i] >= min_rise
        if not flag[i]:
            ref.append(x[i])
    return flag, score, rise


def same(a, b):
    return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True)


def near(a, b):
    """Equal to a few ulp (NaN and inf where the other has them): the rise factor is 10 ** x, which numpy computes
    with SIMD kernels (AVX-512) for arrays and with libm for the scalars of :func:`ref_outliers`: the last bit may
    differ."""
    return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=4 * np.finfo(float).eps, atol=0,
                       equal_nan=True)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("n", [4, 9, 21, 47])
def test_rows_equal_one_series_at_a_time(n, log, monkeypatch):
    monkeypatch.setattr(R, "BLOCK_VALUES", 600)          # several blocks of rows
    rng = np.random.default_rng(n + 100 * log)
    X = np.exp(0.5 * rng.standard_normal((60, n)))
    X[3, n // 2] *= 1e4                                   # a spike
    X[4, n // 3:] *= 1e5                                  # an explosion that stays
    X[5, 1] = np.nan
    X[6, :] = 0.0
    X[7, ::3] = -1.0
    X[8, 2] = np.inf
    min_rise = 10.0 if log else 0.5
    flag, score, rise = R.trailing_outliers_rows(X, 20, 3.5, min_rise, log=log)
    fired = 0
    for i in range(len(X)):
        f, s, r = ref_outliers(X[i], 20, 3.5, min_rise, log=log)
        assert np.array_equal(f, flag[i]) and same(s, score[i]) and near(r, rise[i]), i
        fired += f.any()
    assert fired >= (2 if n > 9 else 0)


def grad_table(seed=0, layers=60, steps=30):
    """A random per-(step, layer, param) gradient statistics table (the ``grads`` table's columns) with
    planted faults: a vanishing stretch of layers, spikes, an explosion, NaNs, all-zero steps and layers
    with fewer recorded steps than the others."""
    rng = np.random.default_rng(seed)
    rows = []
    for lid in range(layers):
        keep = np.sort(rng.choice(steps, steps - 7, replace=False)) if lid % 11 == 5 else np.arange(steps)
        for param, numel in (("weight", 64), ("bias", 8)):
            scale = 10.0 ** (-2.0 * lid / layers) * (1e-7 if 20 <= lid < 26 else 1.0)
            am = scale * np.exp(0.3 * rng.standard_normal(len(keep)))
            if lid % 13 == 3:
                am[len(keep) // 2] *= 1e3
            if lid == 40:
                am[18:] *= 1e4
            mx = am * 3.0
            if lid % 17 == 2 and param == "bias":
                am[4:7], mx[4:7] = 0.0, 0.0
            l2 = am * np.sqrt(numel) * 1.1
            if lid == 33:
                l2[9] = np.nan
            for k, st in enumerate(keep):
                rows.append((int(st), lid, f"blocks.{lid // 10}.mlp.{lid % 10}", param, numel, numel, 0,
                             am[k], mx[k], l2[k]))
    df = pd.DataFrame(rows, columns=D.GRAD_COLUMNS)
    return df.sort_values(["layer_id", "param", "step"], kind="stable").reset_index(drop=True)


class FakeTables:
    """What the gradient rules read of :class:`analyzer.findings.data.Tables`."""

    def __init__(self, grads):
        self.grads = grads
        self.grad_layers = D.grad_layer_table(grads)
        self.acts = pd.DataFrame()

    def has(self, kind):
        return kind == fmt.KIND_GRAD_STATS

    def memo(self, key, make):
        return make()


def test_layer_table_pools_as_pool_params():
    g = grad_table(3)
    g.loc[g.index[::37], "l2"] = np.nan
    want = pool_params(g.assign(epoch=0, mean=0.0, var=0.0, l1=g["abs_mean"] * g["count"]))[D.GRAD_LAYER_COLUMNS]
    pd.testing.assert_frame_equal(D.grad_layer_table(g.sample(frac=1.0, random_state=1).sort_values(
        ["layer_id", "param", "step"])), want, check_exact=True)
    assert list(D.grad_layer_table(g.iloc[:0]).columns) == D.GRAD_LAYER_COLUMNS


def ref_layer_outliers(df, col, window, z, factor):
    out = []
    for (_, layer), d in df.sort_values("step").groupby(["layer_id", "layer"], sort=True):
        flag, score, rise = ref_outliers(d[col].to_numpy(), window, z, factor)
        f = np.concatenate([[False], flag, [False]]).astype(np.int8)
        eps = list(zip(np.flatnonzero(np.diff(f) == 1).tolist(), np.flatnonzero(np.diff(f) == -1).tolist()))
        out.append((layer, d["step"].to_numpy(np.int64), eps, score, rise))
    return out


def ref_vanishing(g, p):
    g = g[np.isfinite(g["abs_mean"])]
    top = g.groupby("step")["abs_mean"].transform("max")
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(top > 0, g["abs_mean"] / top, np.nan)
    g = g.assign(rel=rel, low=(g["abs_mean"] < p["absolute"]) | (rel < p["relative"]))
    out = []
    for (_, layer), d in g.groupby(["layer_id", "layer"], sort=True):
        if d["low"].mean() >= p["fraction"] and d["low"].any():
            med = float(np.nanmedian(d["rel"])) if d["rel"].notna().any() else 0.0
            out.append(finding(layer, None, d.loc[d["low"], "step"], med, p["relative"],
                               f"layer {layer!r}: mean |g| is {med:.2g} x the largest layer's (median over "
                               f"steps; median mean |g| {float(d['abs_mean'].median()):.2g}) on "
                               f"{int(d['low'].sum())} of {len(d)} steps"))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_rules_equal_a_per_layer_computation(seed):
    t = FakeTables(grad_table(seed))
    p = GradientSpike.settings()
    got = layer_outliers(t.grad_layers, "l2", p["window"], p["z"], p["min_factor"])
    want = ref_layer_outliers(t.grad_layers, "l2", p["window"], p["z"], p["min_factor"])
    assert [w[0] for w in got] == [w[0] for w in want]
    for a, b in zip(got, want):
        assert np.array_equal(a[1], b[1]) and a[2] == b[2] and same(a[3], b[3]) and near(a[4], b[4]), a[0]
    assert sum(bool(w[2]) for w in want) >= 3                       # spikes and the explosion are there
    spikes, explosions = GradientSpike().check(t, p), ExplodingGradient().check(t, ExplodingGradient.settings())
    assert {f["layer"] for f in explosions} >= {"blocks.4.mlp.0"} and len(spikes) >= 2
    for rel in (1e-4, 1e-2):
        pv = VanishingGradient.settings({"relative": rel})
        got_v, want_v = VanishingGradient().check(t, pv), ref_vanishing(t.grad_layers, pv)
        assert got_v == want_v and len(want_v) >= 6


def test_all_zero_counts_steps_per_parameter():
    t = FakeTables(grad_table(2))
    got = AllZero().check(t, AllZero.settings())
    g = t.grads
    want = []
    for (layer, param), d in g.groupby(["layer", "param"], sort=True):
        z = d[(d["count"] > 0) & (d["max_abs"] == 0)]
        if len(z):
            want.append(finding(layer, param, z["step"], len(z) / d["step"].nunique(), 1,
                                f"gradient of {layer}.{param} is all zero on {len(z)} of {d['step'].nunique()} steps"))
    assert got == want and len(want) == 4


def test_report_frames_stand_in_for_the_gradient_table(tmp_path):
    """The report hands its per-step gradient frame to the rules: the same table as a pass over the
    shards (every row and value), hence the same findings; not where the frame could differ."""
    d = str(tmp_path / "run")
    record_tiny(d, epochs=2, steps_per_epoch=6, grads_every=0, weights_every=3)
    a, b = bbdecoder.open(d), bbdecoder.open(d)
    ids = a.select(None)
    gs = a.grad_stats(layers=ids)
    adopted = D.grads_from_frame(a.catalog, gs, ids)
    assert adopted is gs                                             # the report's frame itself, no copy
    pd.testing.assert_frame_equal(adopted[D.GRAD_TABLE_COLUMNS].reset_index(drop=True), D.grad_stat_table(a.catalog),
                                  check_exact=True)   # the same rows in the same (step, layer_id, param) order
    gl = D.grad_layers_from_frame(a.catalog, gs, a.grad_stats(by="layer", layers=ids), ids)
    pd.testing.assert_frame_equal(gl[D.GRAD_LAYER_COLUMNS], D.grad_layer_table(D.grad_stat_table(a.catalog)),
                                  check_exact=True)   # the report's per-layer frame stands for grad_layers, bit for bit
    a.findings_tables().adopt("grads", adopted)
    rules = ["nonfinite", "vanishing_gradient", "exploding_gradient", "gradient_spike", "all_zero", "loss_spike"]
    pd.testing.assert_frame_equal(a.findings(rules), b.findings(rules))
    with pytest.raises(ValueError):
        a.findings_tables().adopt("grads", adopted)
    assert D.grads_from_frame(a.catalog, a.grad_stats(layers=ids[:2]), ids[:2]) is None   # not every layer
    raw = str(tmp_path / "raw")
    record_tiny(raw, epochs=1, steps_per_epoch=3, grads_every=2)    # raw gradients: other rows
    r = bbdecoder.open(raw)
    assert D.grads_from_frame(r.catalog, r.grad_stats(), r.select(None)) is None


def ref_weight_layer_table(w):
    d = w.copy()
    prev = d.groupby(["layer_id", "param"], sort=False)["l2"].shift(1)
    d["_dw2"] = (d["update_ratio"] * prev) ** 2
    d["_p2"] = prev ** 2
    out = d.groupby(["step", "layer_id", "layer"], sort=True).agg(
        _dw2=("_dw2", lambda v: v.sum(min_count=len(v))), _p2=("_p2", lambda v: v.sum(min_count=len(v))),
        gap=("gap", "max")).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["update_ratio"] = np.sqrt(out["_dw2"]) / np.sqrt(out["_p2"]).where(out["_p2"] > 0)
        out["step_ratio"] = out["update_ratio"] / out["gap"]
    return out[["step", "layer_id", "layer", "update_ratio", "gap", "step_ratio"]]


def ref_update_ratio(w, p):
    w = w[np.isfinite(w["step_ratio"])]
    out = []
    for (_, layer), d in w.groupby(["layer_id", "layer"], sort=True):
        r = d["step_ratio"]
        if not (r > 0).any():
            continue
        med = float(r.median())
        if med < p["low"]:
            side, thr, sev = "small", p["low"], None
        elif med > max(p["extreme"], p["high"]):
            side, thr, sev = "large", max(p["extreme"], p["high"]), None
        elif med > p["high"]:
            side, thr, sev = "large", p["high"], p["high_severity"]
        else:
            continue
        steps = d.loc[(r < thr) if side == "small" else (r > thr), "step"]
        out.append((layer, side, sev, med, thr, sorted(steps.tolist()), len(d)))
    return out


def ref_unchanged(w, p):
    out = []
    for (layer, param), d in w.groupby(["layer", "param"], sort=True):
        r = d["update_ratio"].to_numpy(np.float64)
        l2 = d["l2"].to_numpy(np.float64)
        r = np.where(np.isnan(r) & (np.arange(len(r)) > 0) & (l2 == 0), 0.0, r)
        pairs = r[1:]
        if len(d) >= p["min_snapshots"] and len(pairs) and np.all(np.isfinite(pairs)) and np.all(pairs <= p["tol"]):
            out.append(finding(layer, param, d["step"], float(pairs.max()), p["tol"],
                               f"{layer}.{param} did not change over {len(d)} snapshots (steps "
                               f"{int(d['step'].min())} to {int(d['step'].max())})"))
    return out


def test_weight_rules_equal_a_per_layer_computation():
    from bbdecoder.analyzer.findings.weights import UnchangedWeights, WeightUpdateRatio
    rng = np.random.default_rng(5)
    rows = []
    for lid in range(50):
        snaps = np.arange(0, 40, 4 if lid % 7 else 8)
        for param in ("weight", "bias", "scale")[: 1 + lid % 3]:
            level = 10.0 ** rng.uniform(-6, 0.5)
            l2 = np.full(len(snaps), 1.0 + lid)
            ur = level * np.exp(0.2 * rng.standard_normal(len(snaps)))
            ur[0] = np.nan
            if lid % 9 == 4:
                ur[1:] = 0.0 if param == "weight" else 1e-9       # unchanged parameters
            if lid % 11 == 6:
                l2[:], ur[1:] = 0.0, np.nan                       # all-zero weights: unchanged as well
            if lid % 13 == 8:
                ur[3] = np.nan
            for k, st in enumerate(snaps):
                rows.append({"step": int(st), "layer_id": lid, "layer": f"{'zyxwv'[lid % 5]}.{lid}", "param": param,
                             "l2": l2[k], "update_ratio": ur[k], "rank": 0})
    ws = pd.DataFrame(rows).sample(frac=1.0, random_state=2)
    weights = D.weight_table(ws)
    wl = D.weight_layer_table(weights)
    pd.testing.assert_frame_equal(wl, ref_weight_layer_table(weights), check_exact=True)
    pw = WeightUpdateRatio.settings()
    got = WeightUpdateRatio().check(type("T", (), {"weight_layers": wl})(), pw)
    want = ref_update_ratio(wl, pw)
    assert [(f["layer"], f["value"], f["threshold"], f["first_step"], f["last_step"], f["n_steps"], f.get("severity"))
            for f in got] == [(layer, med, thr, st[0] if st else None, st[-1] if st else None, len(st), sev)
                              for layer, side, sev, med, thr, st, n in want]
    assert len(want) >= 10 and any(w[1] == "small" for w in want) and any(w[1] == "large" for w in want)
    pu = UnchangedWeights.settings()
    got_u = UnchangedWeights().check(type("T", (), {"weights": weights})(), pu)
    want_u = ref_unchanged(weights, pu)
    assert got_u == want_u and len(want_u) >= 8
