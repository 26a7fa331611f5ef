"""Windows of activation statistics (``Recorder(activation_window=N)``): one row per window of N steps,
checked against the same run recorded every step (same seed, same data), and the "auto" budget."""

import math
import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.analyzer.activations import dead_mask, iter_merged_site_stats, samples, saturation_layers
from bbdecoder.recorder import Recorder, RecorderWarning
from bbdecoder.recorder.demo import make_reference_cnn

STEPS, EPOCH_END_AFTER, FLUSH_AFTER = 11, 5, 7
#: with N = 4: [0, 3], then the epoch ends after 5, flush() after 7, close() after 10
WINDOWS = [(0, 3), (4, 5), (6, 7), (8, 10)]


class Net(nn.Module):
    """ReLU units that are dead (0, 1) or die at step 5 (2), a sigmoid (near-bound counts) and a softmax."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)
        self.sig = nn.Sigmoid()
        with torch.no_grad():
            self.fc1.bias.copy_(torch.tensor([-1e3, -1e3, 0.5, 0.5, 0.0, 0.2]))

    def forward(self, x):
        h = self.sig(3 * self.fc2(self.act(self.fc1(x))))
        return F.softmax(h * 4, dim=-1)


def record(path, window, budget=1 << 20):
    torch.manual_seed(3)
    model = Net()
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)
        with Recorder(model, path, grads_every=0, weights_every=0, activations=True, activations_every=3,
                      activation_samples=2, flush_steps=3, activation_window=window,
                      activation_budget=budget) as rec:
            for s in range(STEPS):
                if s == 5:
                    with torch.no_grad():
                        model.fc1.bias[2] = -1e3
                opt.zero_grad()
                loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
                loss.backward()
                rec.step(loss)
                opt.step()
                if s == EPOCH_END_AFTER:
                    rec.epoch_end()
                if s == FLUSH_AFTER:
                    rec.flush()
    run = analyzer.open(path)
    assert run.status == "complete"
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("win")
    return record(d / "one", 1), record(d / "four", 4)


def _rows(run, S):
    st, d = zip(*iter_merged_site_stats(run, S, stats=tuple(S["stats"])))
    return np.concatenate(st), {k: np.concatenate([x[k] for x in d]) for k in d[0]}


def test_window_rows_pool_the_per_step_rows(runs):
    one, four = runs
    assert four.catalog.manifest["activation_window"] == 4 and "activation_window" not in one.catalog.manifest
    assert [S["name"] for S in one.catalog.sites] == [S["name"] for S in four.catalog.sites]
    kinds = set()
    for S1, S4 in zip(one.catalog.sites, four.catalog.sites):
        assert "first_step" not in S1["stats"] and S4["stats"]["first_step"] == []
        kinds.add(S4["kind"])
        st1, d1 = _rows(one, S1)
        st4, d4 = _rows(four, S4)
        assert st1.tolist() == list(range(STEPS))
        assert st4.tolist() == [b for _, b in WINDOWS]
        assert d4["first_step"].tolist() == [a for a, _ in WINDOWS]
        for i, (a, b) in enumerate(WINDOWS):
            sel = (st1 >= a) & (st1 <= b)
            for k in ("count", "n_pos", "nonfinite") + tuple(k for k in ("near", "rows") if k in S1["stats"]):
                np.testing.assert_array_equal(d4[k][i], d1[k][sel].sum(0), err_msg=f"{S1['name']} {k} {a}-{b}")
            for k in ("sum", "sum_abs", "sumsq"):
                np.testing.assert_allclose(d4[k][i], d1[k][sel].sum(0), rtol=1e-6, atol=1e-12,
                                           err_msg=f"{S1['name']} {k} {a}-{b}")
            np.testing.assert_array_equal(d4["min"][i], d1["min"][sel].min(0))
            np.testing.assert_array_equal(d4["max"][i], d1["max"][sel].max(0))
    assert kinds == {"relu", "sigmoid", "softmax"}
    assert {S["kind"] for S in one.catalog.sites if "near" in S["stats"]} == {"sigmoid", "softmax"}


def test_steps_samples_and_epochs_are_those_of_the_per_step_run(runs):
    one, four = runs
    c1, c4 = one.catalog.step_columns(), four.catalog.step_columns()
    for k in ("step", "epoch", "loss", "dropped"):
        np.testing.assert_array_equal(np.sort(c1[k]), np.sort(c4[k]), err_msg=k)
    for S in one.catalog.sites:
        st1, v1 = samples(one, S)
        st4, v4 = samples(four, S)
        assert st1.tolist() == st4.tolist() == [0, 0, 3, 3, 6, 6, 9, 9]
        np.testing.assert_array_equal(v1, v4)
    e1, e4 = one.activation_stats(per="epoch"), four.activation_stats(per="epoch")
    assert e1.columns.tolist() == e4.columns.tolist() and len(e1) == len(e4) > 0
    for c in e1.columns:
        if e1[c].dtype.kind == "f":
            np.testing.assert_allclose(e4[c], e1[c], rtol=1e-9, atol=1e-12, err_msg=c)
        else:
            assert e1[c].tolist() == e4[c].tolist(), c
    per_win = four.activation_stats()
    assert sorted(per_win["step"].unique()) == [b for _, b in WINDOWS]
    assert sorted(per_win["first_step"].unique()) == [a for a, _ in WINDOWS]
    assert "first_step" not in one.activation_stats().columns


@pytest.mark.parametrize("criterion,threshold", [("strict", 0.0), ("apoz", 0.9), ("dormant", 0.1)])
def test_dead_units_identical_and_died_at_at_window_starts(runs, criterion, threshold):
    one, four = runs
    du1 = one.dead_units(criterion=criterion, threshold=threshold)
    du4 = four.dead_units(criterion=criterion, threshold=threshold)
    cols = ["site", "unit", "dead", "dead_fraction", "flagged"]
    assert du1[cols].equals(du4[cols])
    for c in ("active_fraction", "max", "score"):
        np.testing.assert_allclose(du4[c], du1[c], rtol=1e-9, err_msg=c)
    if criterion == "strict":
        assert du1["dead"].sum() >= 2   # units 0 and 1 of the ReLU
        starts = np.array([a for a, _ in WINDOWS])
        for d1, d4 in zip(du1["died_at"], du4["died_at"]):
            later = starts[starts >= d1] if not np.isnan(d1) else []
            assert (np.isnan(d4) and len(later) == 0) or d4 == later[0], (d1, d4)
        relu = [S for S in one.catalog.sites if S["kind"] == "relu"][0]["name"]
        assert du1[du1.site == relu]["died_at"].iloc[2] == 5
        assert du4[du4.site == relu]["died_at"].iloc[2] == 6
        # the per-window raster is the per-step criterion on the pooled window
        st, m = dead_mask(four, relu)
        st1, m1 = dead_mask(one, relu)
        assert st.tolist() == [b for _, b in WINDOWS]
        want = np.array([m1[(st1 >= a) & (st1 <= b)].all(0) for a, b in WINDOWS])
        np.testing.assert_array_equal(m, want)


def test_saturation_pools_the_window(runs):
    one, four = runs
    s1, s4 = one.saturation(delta=0.05), four.saturation(delta=0.05)
    assert s4["step"].tolist() == [b for _, b in WINDOWS] * (len(s4) // len(WINDOWS))
    for site, g4 in s4.groupby("site"):
        g1 = s1[s1.site == site]
        # the same number of values every step (batch 16): the window's fraction is the mean of its steps'
        want = [g1[(g1.step >= a) & (g1.step <= b)]["saturated"].mean() for a, b in WINDOWS]
        np.testing.assert_allclose(g4["saturated"], want, rtol=1e-12)
        assert g4["steps"].tolist() == [b - a + 1 for a, b in WINDOWS]
    l1, l4 = saturation_layers(one, delta=0.05), saturation_layers(four, delta=0.05)
    assert l1[["site", "flagged"]].equals(l4[["site", "flagged"]])
    np.testing.assert_allclose(l4["saturated"], l1["saturated"], rtol=1e-12)
    np.testing.assert_allclose(l4["saturated_units"], l1["saturated_units"], rtol=1e-12)


def _row_bytes(sites, window):
    """Independent of the recorder: 8 bytes per float64 value (4 per int32 near-bound count); the
    statistics of a row are stored flat, one row per dtype, each with one int64 step."""
    total, near = 0, False
    for S in sites:
        U = S["units"]
        per_unit = 6 * U * 8
        scalars = (2 + window) * 8
        hist = U * 3 * 4 if S["kind"] in ("sigmoid", "tanh") else 3 * 4 + 8 if S["kind"] == "softmax" else 0
        near = near or S["kind"] in ("sigmoid", "tanh", "softmax")
        health = 2 * U * 8 if S["kind"] == "softmax" else 4 * 8   # recorder.health statistics
        total += per_unit + scalars + hist + health
    return total + 8 * (1 + near)


def _stored_act_bytes(run):
    """Bytes of every activation-statistics dataset (values and steps; the index, its JSON, not) of
    the run's shards."""
    sizes = []
    for sh in run.catalog.shards:
        with h5py.File(sh.path, "r") as f:
            if "flat/act_stats" in f:
                f["flat/act_stats"].visititems(lambda name, o: sizes.append(o.nbytes) if isinstance(o, h5py.Dataset)
                                               and not name.endswith("index") else None)
    return sum(sizes)


def test_auto_keeps_every_step_under_the_budget_and_windows_above(tmp_path):
    # a model under the budget (1 MiB): every step
    under = record(tmp_path / "under", "auto")
    assert "activation_window" not in under.catalog.manifest
    assert all("first_step" not in S["stats"] for S in under.catalog.sites)
    # the same model with a budget of 400 bytes: N = ceil(row bytes / budget)
    over = record(tmp_path / "over", "auto", budget=400)
    want_n = math.ceil(_row_bytes(over.catalog.sites, 1) / 400)
    assert want_n > 1 and over.catalog.manifest["activation_window"] == want_n
    S = over.catalog.sites[0]
    st, d = _rows(over, S)
    windows = [(0, min(want_n - 1, EPOCH_END_AFTER))]   # the epoch ends first or the window fills
    assert d["first_step"][0] == 0 and st[0] == windows[0][1]
    # what the format stores per row is what the budget was computed from
    rows = len(st)
    assert _stored_act_bytes(over) == rows * _row_bytes(over.catalog.sites, 1)
    assert _stored_act_bytes(under) == STEPS * _row_bytes(under.catalog.sites, 0)
    assert _row_bytes(under.catalog.sites, 0) <= 1 << 20


def test_auto_keeps_every_step_for_the_reference_cnn(tmp_path):
    torch.manual_seed(0)
    model = make_reference_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Recorder(model, tmp_path / "cnn", activations=True, grads_every=0, weights_every=0,
                  activations_every=0) as rec:
        for s in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
            rec.step()
            opt.step()
    run = analyzer.open(tmp_path / "cnn")
    assert "activation_window" not in run.catalog.manifest
    assert [S["units"] for S in run.catalog.sites] == [32, 64, 128, 256, 64]
    assert _row_bytes(run.catalog.sites, 0) < 1 << 20
    assert sorted(run.activation_stats()["step"].unique()) == [0, 1, 2]


@pytest.mark.parametrize("kw", [dict(activation_window=0), dict(activation_window="every"),
                                dict(activation_window=True), dict(activation_budget=0)])
def test_bad_window_settings_are_refused(tmp_path, kw):
    with pytest.raises(ValueError, match="activation_(window|budget)"):
        Recorder(nn.Linear(2, 2), tmp_path / "bad", activations=True, **kw)


def test_two_ranks_merge_windows_by_their_rules(runs, tmp_path):
    """A second rank that saw the same values: window rows merge by step, first_step stays the window's."""
    import json
    import shutil
    four = runs[1]
    d = tmp_path / "two"
    shutil.copytree(four.path, d)
    shutil.copytree(d / "rank-00000", d / "rank-00001")
    m = json.loads((d / "manifest.json").read_text())
    m["world_size"] = 2
    (d / "manifest.json").write_text(json.dumps(m))
    two = analyzer.open(d)
    a1, a2 = four.activation_stats(), two.activation_stats()
    assert a2["step"].tolist() == a1["step"].tolist() and a2["first_step"].tolist() == a1["first_step"].tolist()
    assert (a2["count"] == 2 * a1["count"]).all()
    for c in ("mean", "std", "min", "max", "frac_active"):
        np.testing.assert_allclose(a2[c], a1[c], rtol=1e-9, atol=1e-12, err_msg=c)
    for kw in (dict(), dict(criterion="apoz", threshold=0.9), dict(criterion="dormant", threshold=0.1)):
        du1, du2 = four.dead_units(**kw), two.dead_units(**kw)
        assert du1[["site", "unit", "dead", "died_at"]].equals(du2[["site", "unit", "dead", "died_at"]])
