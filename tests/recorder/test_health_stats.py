"""The transformer health statistics (recorder.health) of the fused pass: attention entropy per head
and the largest logit of softmax sites, sum h^3 / h^4 and massive activations of other sites, from
the compiled pass, its eager body and the float64 reference, against numpy in float64 (float32 and
bfloat16 inputs, causal masks with zeros in p, NaN rows); windows of steps merged on the device equal
the per-step rows merged by the analyzer's rules; and traces without them still read."""

from __future__ import annotations

import helpers  # noqa: F401

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

from bbdecoder import analyzer  # noqa: E402
from bbdecoder.analyzer.activations import health as AH  # noqa: E402
from bbdecoder.analyzer.trace import format as fmt  # noqa: E402
from bbdecoder.recorder import Recorder  # noqa: E402
from bbdecoder.recorder import fused_stats as FS  # noqa: E402
from bbdecoder.recorder import health as H  # noqa: E402

import transformer_models as TM  # noqa: E402


def _health_part(acc, U, softmax):
    lay = FS.acc_layout(U, False, softmax, True)
    h = acc[lay["health"]:]
    return h.view(2, U).numpy() if softmax else h.numpy()


def _lower_median(a):
    """torch's median: the lower of the two middle values of the non-zero, non-NaN ones (NaN: none)."""
    a = np.sort(a[(a != 0) & ~np.isnan(a)])
    return a[(len(a) - 1) // 2] if len(a) else np.float32("nan")


def _numpy_massive(v, sample):
    """sum h^3, sum h^4 (float64), units whose max |h| > 100 x median |sample| (float32 compare), max |h| / median."""
    f32 = v.float().numpy()
    w = v.double().numpy()
    a = np.abs(sample.float().numpy())
    med = _lower_median(a)
    big = np.float32(med * np.float32(100.0)) if med > 0 else np.inf
    with np.errstate(invalid="ignore"):
        n = (np.abs(f32).max((0, 2)) > big).sum()
    ratio = np.abs(w).max() / float(med) if med > 0 else 0.0
    return (w ** 3).sum(), (w ** 4).sum(), n, ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kurtosis_sums_and_massive_counts(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, 10, generator=g, dtype=torch.float64)
    x[:, 2] += 40.0                        # unit 2: far from zero (the shift keeps sum h^3, h^4)
    x[5, 4, :3] = 2000.0                   # three massive values in unit 4
    v = x.to(dtype)
    sample = H.sample_of(v)
    assert 500 < sample.numel() <= H.SAMPLE_SIZE and sample.numel() < v.numel()
    fns = (FS.reference_update, FS.eager_update) + ((FS.fused_update,) if dtype == torch.float32 else ())
    got = []
    for fn in fns:
        acc = FS.new_acc(6, False, False, "cpu", health=True)
        fn(acc, v, fresh=True, sample=sample, health=True)
        fn(acc, v, fresh=False, sample=sample, health=True)     # a second call adds (ratio: max)
        got.append(_health_part(acc, 6, False))
    s3, s4, n, ratio = _numpy_massive(v, sample)
    ref = got[0]
    np.testing.assert_allclose(ref[:2], [2 * s3, 2 * s4], rtol=1e-12)
    assert ref[2] == n == 1 and ref[3] == pytest.approx(ratio, rel=1e-12) and ratio > 100   # unit 4
    for other in got[1:]:   # float32 row sums of the shifted values: float32 rounding of |h|^3, h^4
        np.testing.assert_allclose(other[:2], ref[:2], rtol=2e-6)
        np.testing.assert_array_equal(other[2:], ref[2:])
    # the analyzer's kurtosis from these sums equals numpy's over every value
    w = v.double().numpy()
    kurt = AH.excess_kurtosis(w.size, w.sum(), (w ** 2).sum(), ref[0] / 2, ref[1] / 2)
    m = w - w.mean()
    assert kurt == pytest.approx((m ** 4).mean() / (m ** 2).mean() ** 2 - 3, rel=1e-9)


def test_massive_median_of_nonzero_values():
    g = torch.Generator().manual_seed(0)
    v = torch.relu(torch.randn(40, 4, 8, generator=g) - 0.3)   # a ReLU site: over half its values 0
    v[3, 2, 1] = 400.0
    s = H.sample_of(v)
    a = s.abs().numpy()
    assert (a == 0).mean() > 0.5                             # the plain median would be 0: not judged
    for fn in (FS.reference_update, FS.eager_update):
        acc = FS.new_acc(4, False, False, "cpu", health=True)
        fn(acc, v, fresh=True, sample=s, health=True)
        h = _health_part(acc, 4, False)
        assert h[3] == 400.0 / float(_lower_median(a)) and h[2] == 1
    z = torch.zeros(40, 4, 8)                                  # nothing non-zero (and a NaN): not judged
    z[1, 1, 1] = float("nan")
    for fn in (FS.reference_update, FS.eager_update):
        acc = FS.new_acc(4, False, False, "cpu", health=True)
        fn(acc, z, fresh=True, sample=H.sample_of(z), health=True)
        h = _health_part(acc, 4, False)
        assert h[2] == 0 and h[3] == 0 and np.isnan(h[0]) and np.isnan(h[1])


def _causal_probs(B, Hh, T, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, Hh, T, T, generator=g)
    logits = logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return logits.to(dtype), F.softmax(logits.to(dtype), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_entropy_and_logit_max(dtype):
    B, Hh, T = 3, 4, 12
    logits, p = _causal_probs(B, Hh, T, dtype)
    p = p.clone()
    p[1, 2, 5] = float("nan")                 # a NaN row: head 2's entropy is NaN
    v = p.reshape(B, Hh, T * T)
    fns = (FS.reference_update, FS.eager_update) + ((FS.fused_update,) if dtype == torch.float32 else ())
    got = []
    for fn in fns:
        acc = FS.new_acc(Hh, False, True, "cpu", health=True)
        fn(acc, v, x=p, dim=3, fresh=True, logits=logits, health=True, axis=1)
        fn(acc, v, x=p, dim=3, fresh=False, logits=logits, health=True, axis=1)
        got.append(_health_part(acc, Hh, True))
    pn = p.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(pn > 0, pn * np.log(np.where(pn > 0, pn, 1.0)), np.where(np.isnan(pn), np.nan, 0.0))
    want = 2 * ent.sum(-1).sum((0, 2))
    lmax = logits.double().numpy().max((0, 2, 3))
    ref = got[0]
    # lse - sum p z from the logits equals -sum p log p up to the rounding of p (bf16: 2^-8 relative)
    np.testing.assert_allclose(ref[0], want, rtol=1e-5 if dtype == torch.float32 else 2e-2)
    assert np.isnan(ref[0, 2]) and np.isfinite(ref[0][[0, 1, 3]]).all()
    np.testing.assert_array_equal(ref[1], lmax)
    assert (pn == 0).sum() > 0               # the causal mask's zeros (logits -inf) count as 0 log 0 = 0
    for other in got[1:]:
        np.testing.assert_allclose(other[0], ref[0], rtol=1e-5)
        np.testing.assert_array_equal(other[1], ref[1])
    # without the logits (input not observable): -sum p log p itself, and logit_max stays -inf
    for fn in (FS.reference_update, FS.eager_update):
        acc = FS.new_acc(Hh, False, True, "cpu", health=True)
        fn(acc, v, x=p, dim=3, fresh=True, health=True)
        h = _health_part(acc, Hh, True)
        assert np.isneginf(h[1]).all()
        np.testing.assert_allclose(h[0], want / 2, rtol=1e-12 if fn is FS.reference_update else 1e-5)


def _record(path, window=1, health=True, steps=6):
    torch.manual_seed(0)
    model = TM.hf_gpt2("eager")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    ids, _ = TM.tokens(4)
    with Recorder(model, path, activations=["activations", "transformer.h.0"], activation_window=window,
                  grads_every=0, weights_every=0, activations_every=0) as rec:
        rec._tracker.health = health
        for _ in range(steps):
            out = model(ids, labels=ids)
            out.loss.backward()
            rec.step(loss=out.loss)
            opt.step()
            opt.zero_grad()
    return analyzer.open(path)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny tensors: intra-op threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


def test_windows_merge_like_steps_and_old_traces_read(tmp_path, one_thread):
    """Windows of 3 steps accumulated on the device equal the per-step rows merged by the rules
    (entropy, sum3, sum4 add; logit_max, n_massive, massive_ratio: max); the tables' means equal
    numpy's from the raw rows; a trace without the health statistics still reads, its tables empty."""
    one, three = _record(tmp_path / "one"), _record(tmp_path / "three", window=3)
    soft = [S for S in one.catalog.sites if S["kind"] == "softmax"]
    assert len(soft) == 2 and all(S["stats"]["entropy"] == [2] for S in soft)
    block = [S for S in one.catalog.sites if S["name"] == "transformer.h.0"]
    assert block and all(block[0]["stats"][k] == [] for k in fmt.SITE_HEALTH_SCALAR_STATS)
    rule = {k: np.maximum for k in H.MAX_STATS}
    for S in one.catalog.sites:
        W = next(s for s in three.catalog.sites if s["name"] == S["name"])
        names = [k for k in H.SOFTMAX_STATS + H.SCALAR_STATS if k in S["stats"]]
        (st1, d1), = analyzer.activations.iter_merged_site_stats(one, S, names)
        (st3, d3), = analyzer.activations.iter_merged_site_stats(three, W, names)
        assert list(st3) == [2, 5]
        for k in names:
            f = rule.get(k, np.add)
            merged = np.stack([f.reduce(d1[k][0:3]), f.reduce(d1[k][3:6])])
            np.testing.assert_allclose(d3[k], merged, rtol=1e-12, err_msg=f"{S['name']} {k}")
    e1, e3 = AH.attention_entropy(one), AH.attention_entropy(three)
    assert len(e1) == 6 * 2 * 2 and len(e3) == 2 * 2 * 2 and list(e3["first_step"].unique()) == [0, 3]
    assert (e1["keys"] == TM.CONTEXT).all() and (e1["rows"] == 4 * TM.CONTEXT).all()
    # near-uniform causal attention at init: mean row entropy log(T!) / T, normalised by log T
    want = sum(np.log(np.arange(1, TM.CONTEXT + 1))) / TM.CONTEXT
    np.testing.assert_allclose(e1["entropy"].iloc[0], want, rtol=2e-2)
    np.testing.assert_allclose(e1["norm_entropy"], e1["entropy"] / np.log(TM.CONTEXT), rtol=1e-12)
    h1 = AH.site_health(one, "transformer.h.0")
    (st, d), = analyzer.activations.iter_merged_site_stats(one, block[0], ["count", "sum", "sumsq", "sum3", "sum4"])
    n = d["count"] * block[0]["units"]
    np.testing.assert_allclose(h1["kurtosis"], AH.excess_kurtosis(n, d["sum"].sum(1), d["sumsq"].sum(1),
                                                                   d["sum3"], d["sum4"]), rtol=1e-12)
    assert (h1["kurtosis"].abs() < 5).all() and (h1["n_massive"] == 0).all()
    old = _record(tmp_path / "old", health=False, steps=2)
    assert not any("entropy" in S["stats"] or "sum3" in S["stats"] for S in old.catalog.sites)
    assert len(old.activation_stats()) > 0
    assert len(AH.attention_entropy(old)) == 0 and len(AH.site_health(old)) == 0
    assert list(AH.site_health(old).columns) == AH.SITE_HEALTH_COLUMNS


def test_format_checks_health_shapes():
    S = {"name": "s", "units": 3, "stats": {**{k: [3] for k in fmt.SITE_UNIT_STATS},
                                            **{k: [] for k in fmt.SITE_SCALAR_STATS}, "entropy": [2]}}
    with pytest.raises(fmt.TraceError, match="entropy"):
        fmt._check_site_stats(S, "m")
    S["stats"]["entropy"] = [3]
    S["stats"]["sum3"] = [3]
    with pytest.raises(fmt.TraceError, match="sum3"):
        fmt._check_site_stats(S, "m")
