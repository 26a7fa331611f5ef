"""The activation statistics of a step leave the training thread as one copy of every site's
accumulator; the writer thread gathers the stored rows (:class:`recorder.packing.ActRows`). Checked
here against numpy on the inputs and against the declared statistics: every name and shape of the
trace, the near-bound counts transposed to (U, K) int32, ``first_step`` for windows."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bbdecoder.analyzer.trace import format as fmt  # noqa: E402
from bbdecoder.recorder import activation_stats as AS  # noqa: E402
from bbdecoder.recorder import fused_stats as FS  # noqa: E402
from bbdecoder.recorder import health as H  # noqa: E402
from bbdecoder.recorder.packing import ActRows, Pending, pack_activations, resolve  # noqa: E402


def _site(key, kind, U, bounds, window):
    meta = {"key": key, "kind": kind, "units": U}
    if bounds is not None:
        meta["bounds"] = list(bounds)
    H.site_stats(meta, kind, U, bounds, window)
    return AS.Site(meta)


class _Tracker:
    """The part of :class:`recorder.activations.ActivationTracker` that packing uses."""

    error = None

    def __init__(self, sites):
        self.sites = {s.meta["key"]: s for s in sites}

    def take(self, stats=True):
        return [(k, s.take_acc() if stats else None, []) for k, s in self.sites.items()]

    def want_raw(self, flag):
        pass


@pytest.mark.parametrize("window", [1, 3])
def test_stored_rows_equal_numpy_and_the_declaration(window):
    g = torch.Generator().manual_seed(0)
    tanh = _site("t", "tanh", 5, (-1.0, 1.0), window)
    relu = _site("r", "relu", 4, None, window)
    soft = _site("s", "softmax", 6, (0.0, 1.0), window)
    soft.meta["softmax_dim"] = 1
    kern = AS.SiteStats(fused="reference")
    xt = torch.tanh(3 * torch.randn(32, 5, generator=g))
    xr = torch.relu(torch.randn(8, 4, 3, generator=g))
    logits = torch.randn(7, 6, generator=g)
    xs = torch.softmax(logits, 1)
    kern.update(tanh, xt, 1, 5)
    kern.update(relu, xr, 1, 4)
    kern.update(soft, xs, 1, 6, logits=logits)
    p = Pending(11, 0, 0.0, 1.0)
    pack_activations(p, _Tracker([tanh, relu, soft]), lambda s: False, 11,
                     first_step=9 if window > 1 else None)
    assert len(p.acts) == 1 and not p.groups        # one copy of the accumulators, no per-statistic tensors
    rec = resolve(p)
    got = {}
    for kind, _, layout, row, _ in rec.payloads:
        assert kind == fmt.KIND_ACT_STATS
        for lk, pk, start, n, shape, _ in layout.entries:
            got[(lk, pk)] = row[start:start + n].reshape(shape)
    for s in (tanh, relu, soft):   # every declared statistic, with its declared shape, nothing else
        k = s.meta["key"]
        assert {pk for lk, pk in got if lk == k} == set(s.meta["stats"])
        for name, shape in s.meta["stats"].items():
            assert got[(k, name)].shape == tuple(shape), (k, name)
    a = xt.double().numpy()
    np.testing.assert_allclose(got[("t", "sum")], a.sum(0), rtol=1e-12)
    np.testing.assert_allclose(got[("t", "sumsq")], (a * a).sum(0), rtol=1e-12)
    assert got[("t", "near")].dtype == np.int32
    f = xt.numpy()
    for j, d in enumerate(FS.NEAR_DELTAS):
        np.testing.assert_array_equal(got[("t", "near")][:, j], ((f < -1 + d) | (f > 1 - d)).sum(0))
    r = xr.double().numpy()
    np.testing.assert_array_equal(got[("r", "n_pos")], (r > 0).sum((0, 2)))
    np.testing.assert_allclose(got[("r", "max")], r.max((0, 2)))
    assert got[("r", "count")] == 24 and got[("r", "nonfinite")] == 0
    np.testing.assert_allclose(got[("r", "sum3")], (r ** 3).sum(), rtol=1e-12)
    m = xs.numpy().max(1)
    np.testing.assert_array_equal(got[("s", "near")], [(m > 1 - d).sum() for d in FS.NEAR_DELTAS])
    assert got[("s", "rows")] == 7
    np.testing.assert_allclose(got[("s", "logit_max")], logits.double().numpy().max(0), rtol=1e-12)
    if window > 1:
        assert all(got[(k, fmt.SITE_WINDOW_STAT)] == 9 for k in "trs")
    # the accumulators were reset: the next step starts fresh, and a site without calls sends nothing
    assert all(s.take_acc() is None for s in (tanh, relu, soft))
    q = Pending(12, 0, 0.0, 1.0)
    pack_activations(q, _Tracker([tanh, relu, soft]), lambda s: False, 12)
    assert not q.acts


def test_a_plan_is_built_once_per_list_of_sites():
    s1, s2 = _site("a", "relu", 3, None, 1), _site("b", "gelu", 2, None, 1)
    kern = AS.SiteStats(fused="reference")
    plans = []
    for _ in range(2):
        kern.update(s1, torch.ones(2, 3), 1, 3)
        kern.update(s2, torch.ones(2, 2), 1, 2)
        sites = [(k, *s.take_acc()) for k, s in (("a", s1), ("b", s2))]
        plans.append(ActRows.of(sites, False))
    assert plans[0] is plans[1]
