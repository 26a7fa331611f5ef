"""The byte budget of raw activation samples (``Recorder(activation_sample_bytes=...)``, issue 14 item 6).

A model over the budget stores at most the budget per capture step (bytes read back from the shard,
against the arithmetic of the stored shapes), keeps the positions derived by hand from the rule in
recorder/sample_budget.py (and records them in the manifest), and the stored values equal torch's own
selection of the full outputs; small models store exactly the samples of the unbudgeted path.
"""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import transformer_models as tm
from helpers import shard_path
from bbdecoder.analyzer import Run
from bbdecoder.analyzer.activations import samples
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.demo import make_reference_cnn
from bbdecoder.recorder.sample_budget import DEFAULT_SAMPLE_BYTES, SampleBudget, allocate, site_plan

H, T, D, HID = 2, 16, 8, 32


class Attn(nn.Module):
    """Eager attention probabilities (B, H, T, T) (functional softmax site, unit axis 1) and a ReLU MLP
    (module site ``act``, (B, T, HID), unit axis last); from step ``late`` on a tanh site appears."""

    def __init__(self, late=None):
        super().__init__()
        self.qk, self.fc, self.act, self.out = nn.Linear(D, 2 * D), nn.Linear(D, HID), nn.ReLU(), nn.Linear(HID, 3)
        self.late, self.calls, self.seen = late, 0, {}

    def forward(self, x):
        b = x.shape[0]
        q, k = (z.view(b, T, H, D // H).transpose(1, 2) for z in self.qk(x).split(D, -1))
        att = F.softmax(q @ k.transpose(-1, -2), dim=-1)
        h = self.act(self.fc(x))
        self.seen = {"/softmax#0": att.detach().clone(), "act": h.detach().clone()}
        y = self.out(h).mean(1) + att.mean((1, 2, 3))[:, None]
        if self.late is not None and self.calls >= self.late:
            t = torch.tanh(h[:, :, :4])                 # (B, T, 4): 64 values per input
            self.seen["/tanh#0"] = t.detach().clone()
            y = y + t.mean((1, 2))[:, None]
        self.calls += 1
        return y


def run_attn(path, budget, steps=3, late=None, batch=6, samples=4):
    torch.manual_seed(0)
    model = Attn(late)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with Recorder(model, path, activations=True, activations_every=1, activation_samples=samples,
                  activation_sample_bytes=budget, grads_every=0, weights_every=0) as rec:
        for _ in range(steps):
            loss = model(torch.randn(batch, T, D)).pow(2).mean()
            seen.append(model.seen)
            opt.zero_grad()
            loss.backward()
            rec.step(loss)
            opt.step()
    return json.loads((path / "manifest.json").read_text()), seen


def stored(path):
    """{site key: (steps, values)} read straight from the shard with h5py."""
    out = {}
    with h5py.File(shard_path(path), "r") as f:
        for key, g in f.get("activations", {}).items():
            out[key] = (g["samples/steps"][()], g["samples/values"][()])
    return out


def step_bytes(data, s):
    """Bytes stored at step ``s``: float32 values plus the int64 step of every row."""
    total = 0
    for st, v in data.values():
        assert v.dtype == np.float32 and st.dtype == np.int64
        m = st == s
        total += v[m].nbytes + st[m].nbytes
    return total


# hand-derived from the rule (row bytes = 4 * values + 8; shares in the order of full cost, ties: first seen):
# 1600 B: softmax share 800 -> query axis 16 -> 8 (1032 B) -> 4 (520 B); act share 1080 -> T 16 -> 8 (1032 B)
# 200 B: softmax share 100 -> queries down to 1 (136 B) -> keys 16 -> 8 (72 B); act share 128 < 136: nothing
CASES = {
    1600: {"/softmax#0": (1, [1, 4, 1], [range(2), range(3, 16, 4), range(16)]),
           "act": (1, [2, 1], [range(1, 16, 2), range(32)])},
    200: {"/softmax#0": (1, [1, 16, 2], [range(2), [15], range(1, 16, 2)]), "act": (0, None, None)},
}


@pytest.mark.parametrize("budget", sorted(CASES))
def test_over_budget_stores_at_most_the_budget_and_the_recorded_positions(tmp_path, budget):
    man, seen = run_attn(tmp_path / "r", budget)
    sites = {S["name"]: S for S in man["sites"]}
    data = stored(tmp_path / "r")
    assert man["config"]["activation_sample_bytes"] == budget
    expect_bytes = 0
    for name, (rows, stride, pos) in CASES[budget].items():
        S = sites[name]
        assert S["sample_rows"] == rows
        if rows == 0:
            assert S["key"] not in data and "sample_stride" not in S
            continue
        assert S["sample_stride"] == stride and S["output_shape"] == list(seen[0][name].shape[1:])
        assert [list(r) for r in fmt.sample_positions(S)] == [list(p) for p in pos]
        assert S["sample_shape"] == [len(p) for p in pos]
        expect_bytes += rows * (4 * int(np.prod(S["sample_shape"])) + 8)
        st, v = data[S["key"]]
        for s in range(3):   # step 0 (cut from the provisional plan) and later steps alike
            ref = seen[s][name][:rows]
            for ax, p in enumerate(pos):   # torch's own selection of the full output
                ref = torch.index_select(ref, ax + 1, torch.tensor(list(p)))
            np.testing.assert_array_equal(v[st == s], ref.numpy())
    for s in range(3):
        assert step_bytes(data, s) == expect_bytes <= budget
    run = Run(tmp_path / "r")   # the analyzer reads the reduced rows as the samples they are
    assert run.catalog.problems == []
    for name, (rows, stride, pos) in CASES[budget].items():
        if rows:
            st, v = samples(run, name)
            np.testing.assert_array_equal(v, data[sites[name]["key"]][1])
            dv = run.dimension_variance(name, dim=1)
            ref = [np.nanmean(np.nanvar(v[st == s].astype(np.float64), axis=1)) for s in range(3)]
            np.testing.assert_allclose(dv["variance"], ref, rtol=1e-12)
            assert list(dv["slices"]) == [len(pos[0])] * 3
    fmt.validate_manifest(man, "m")   # the new fields are checked: inconsistent ones are refused
    S = sites["/softmax#0"]
    for bad in ({"sample_stride": [1, 3, 2]}, {"sample_shape": [2, 1, 9]}, {"sample_rows": -1}, {"output_shape": 7}):
        S_bad = {**S, **bad}
        with pytest.raises(TraceError, match="sample"):
            fmt.validate_manifest({**man, "sites": [S_bad]}, "m")


def test_fewer_rows_first_and_a_late_site_gets_what_is_left(tmp_path):
    # full: 4 rows x 2056 B per site; 5000 B -> softmax share 2500 -> 1 row (2056); act share 2944 -> 1 row;
    # the tanh site first seen at step 1 (16 x 4 values, 264 B per row) gets the 888 B left: 3 rows
    man, seen = run_attn(tmp_path / "r", 5000, late=1)
    sites = {S["name"]: S for S in man["sites"]}
    data = stored(tmp_path / "r")
    assert [sites[n].get("sample_rows") for n in ("/softmax#0", "act", "/tanh#0")] == [1, 1, 3]
    assert not any("sample_stride" in S for S in man["sites"])
    for name in ("/softmax#0", "act", "/tanh#0"):
        st, v = data[sites[name]["key"]]
        for s in range(3):
            if name in seen[s]:
                np.testing.assert_array_equal(v[st == s], seen[s][name][:sites[name]["sample_rows"]].numpy())
    assert [step_bytes(data, s) for s in range(3)] == [2 * 2056, 2 * 2056 + 3 * 264, 2 * 2056 + 3 * 264]


def train(model, path, data, steps, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, path, activations=True, activations_every=1, grads_every=0, weights_every=0, **kw) as rec:
        for i in range(steps):
            x, y = data(i)
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(out.flatten(0, -2), y.flatten())
            opt.zero_grad()
            loss.backward()
            rec.step(loss)
            opt.step()
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("which", ["cnn", "gpt2"])
def test_small_models_store_the_unbudgeted_samples_byte_for_byte(tmp_path, which):
    if which == "cnn":
        make = make_reference_cnn
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    else:
        make = lambda: tm.hf_gpt2("eager")   # noqa: E731 (softmax sites (B, heads, T, T))
        ids, _ = tm.tokens(8)
        batches = [(ids, ids.roll(-1, 1))] * 2
    out = {}
    for b in (None, DEFAULT_SAMPLE_BYTES):
        torch.manual_seed(0)
        man = train(make(), tmp_path / str(b), lambda i: batches[i], 2, activation_sample_bytes=b)
        out[b] = (man["sites"], stored(tmp_path / str(b)))
    (sites0, data0), (sites1, data1) = out[None], out[DEFAULT_SAMPLE_BYTES]
    assert sites0 == sites1 and not any(k in S for S in sites1 for k in fmt.SITE_SAMPLE_FIELDS)
    assert data0.keys() == data1.keys() and len(data0) == len(sites0) >= 4
    for k in data0:
        assert data0[k][0].tobytes() == data1[k][0].tobytes() and data0[k][1].tobytes() == data1[k][1].tobytes()
        assert len(data1[k][0]) == 2 * 8   # 8 samples (activation_samples) at each of the 2 steps


def rows_that_fit(shape, unit, k, allowance):
    """The rows site_plan must keep: the most whole inputs that fit (at most k); else 1 when one input
    cut to one position on every axis but the unit axis fits; else 0."""
    row = lambda cnt: 4 * int(np.prod(cnt)) + 8   # noqa: E731
    if row(shape) <= allowance:
        return min(k, allowance // row(shape))
    return 1 if row([n if a == unit else 1 for a, n in enumerate(shape)]) <= allowance else 0


@pytest.mark.parametrize("shape,unit,soft", [((4, 64, 64), 0, 2), ((128, 96), 1, None), ((3, 40, 17, 9), 0, None)])
def test_site_plan_fits_nests_and_keeps_what_fits(shape, unit, soft):
    prev = None
    for allowance in sorted({7, 60, 300, 1000, 4096, 10**4, 5 * 10**4, 10**5, 10**6, 10**7}, reverse=True):
        rows, strides = site_plan(shape, unit, soft, 8, allowance)
        kept = [-(-n // s) for n, s in zip(shape, strides)]
        assert rows == rows_that_fit(shape, unit, 8, allowance)
        if rows:
            assert rows * (4 * int(np.prod(kept)) + 8) <= allowance and strides[unit] == 1
            assert all(s & (s - 1) == 0 for s in strides)
            if soft is not None and strides[soft] > 1:   # the softmax axis is cut only after the others
                assert all(c == 1 for a, c in enumerate(kept) if a not in (unit, soft))
        if prev is not None and rows:   # a smaller allowance keeps a subset (the step-0 cut relies on it)
            assert rows <= prev[0] and all(s % p == 0 for s, p in zip(strides, prev[1]))
        prev = (rows, strides) if rows else prev


def test_allocate_shares_by_max_min_fairness():
    metas = [{"key": k, "sample_shape": [n], "unit_axis": 1} for k, n in (("a", 10), ("b", 1000), ("c", 100))]
    # full costs 8 x (4n + 8): a 384, c 3264, b 32064 (that order); 6000 B: a's share 2000 keeps all 8 rows,
    # c's share (6000 - 384) / 2 = 2808 keeps 2808 // 408 = 6 rows, b gets 3168 < one 1000-unit row: nothing
    plans = allocate(metas, 8, 6000)
    assert plans["a"] == (8, (1,)) and plans["c"] == (6, (1,)) and plans["b"] == (0, (1,))
    plans = allocate(metas, 8, 40000)
    assert plans == {"a": (8, (1,)), "c": (8, (1,)), "b": (8, (1,))}


def test_bad_arguments_and_manifest_fields():
    with pytest.raises(ValueError, match="activation_sample_bytes"):
        Recorder(nn.Linear(2, 2), "/nonexistent/never", activation_sample_bytes=0)
    with pytest.raises(ValueError, match="activation_samples"):
        SampleBudget(-1, 10)
    S = {"name": "s", "sample_shape": [2, 4], "output_shape": [2, 16], "sample_stride": [1, 4]}
    assert [list(r) for r in fmt.sample_positions(S)] == [[0, 1], [3, 7, 11, 15]]
    assert [list(r) for r in fmt.sample_positions({"sample_shape": [3]})] == [[0, 1, 2]]   # older traces


def test_capture_and_cut_read_no_tensor_data():
    """Every decision comes from shapes (host ints): on the ``meta`` device, where any read of a tensor's
    values (``.item()``, ``.tolist()``, ``bool()``: a device synchronisation on CUDA) raises, the capture
    of the first step (provisional plan), its cut at ``resolve`` and a later capture all run."""
    from types import SimpleNamespace
    from bbdecoder.recorder.activation_stats import Site
    metas = [{"key": "att", "sample_shape": [H, T, T], "unit_axis": 1, "softmax_dim": 3},
             {"key": "mlp", "sample_shape": [T, HID], "unit_axis": 2}]
    sites = {m["key"]: Site(m) for m in metas}
    budget = SampleBudget(4, 1600)
    for s in sites.values():
        budget.capture(s, torch.empty(6, *s.meta["sample_shape"], device="meta"))
    # provisional: at most the whole 1600 B per site: 1 input, every 2nd query (att) / token (mlp)
    assert [list(s.samples[0].shape) for s in sites.values()] == [[1, H, 8, T], [1, 8, HID]]
    assert budget.resolve(SimpleNamespace(sites=sites))
    assert [list(s.samples[0].shape) for s in sites.values()] == [[1, H, 4, T], [1, 8, HID]]   # the CASES plan
    for s in sites.values():
        s.samples = []
        budget.capture(s, torch.empty(6, *s.meta.get("output_shape", s.meta["sample_shape"]), device="meta"))
    assert [list(s.samples[0].shape) for s in sites.values()] == [[1, H, 4, T], [1, 8, HID]]
