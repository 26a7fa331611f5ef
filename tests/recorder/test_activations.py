"""Activation capture and analyses, every number against a direct computation on the raw tensors.

The truth is captured in the test itself (forward hooks registered by the test, or values logged by
the test models' own forward), in float64 numpy, and compared with what the analyzer reads back from
the trace: per-step and per-epoch statistics per unit, the activation wrapper's call sites and their
names, gradient accumulation, dead units (strict / APoZ / dormant, died_at), saturation by kind at two
deltas, dimension variance and similarity of the raw samples, NaN/Inf, dtypes and empty cases, and the
analyzer with torch blocked.
"""

import helpers
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.recorder import Recorder, RecorderWarning

ROOT = helpers.ROOT
RTOL = 1e-6


# ============================================================================ helpers

class Log:
    """Per-step store of captured activations: name -> list of float64 arrays (one per call)."""

    def __init__(self):
        self.steps: dict[int, dict[str, list]] = {}
        self.cur: dict[str, list] = {}

    def __call__(self, name, t):
        self.cur.setdefault(name, []).append(t.detach().double().cpu().numpy().copy())

    def end_step(self, step):
        self.steps[step], self.cur = self.cur, {}

    def hook(self, module, name):
        return module.register_forward_hook(lambda m, a, o: self(name, o) if m.training else None)


def unit_rows(a, axis):
    """(values, U) rows of one array whose unit axis is ``axis``."""
    a = np.asarray(a, np.float64)
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def truth(arrays, axis):
    """Per-unit statistics of every value of ``arrays`` (float64, numpy)."""
    m = np.concatenate([unit_rows(a, axis) for a in arrays])
    with np.errstate(invalid="ignore"):
        return {"count": m.shape[0], "mean": m.mean(0), "abs_mean": np.abs(m).mean(0), "std": m.std(0),
                "min": m.min(0), "max": m.max(0), "frac_active": (m > 0).mean(0), "apoz": 1 - (m > 0).mean(0),
                "nonfinite": int((~np.isfinite(m)).sum()), "rms": np.sqrt((m ** 2).mean(0))}


def check_stats(got: pd.DataFrame, want: dict, what=""):
    """Compare one (site, step) block of activation_stats (sorted by unit) with truth()."""
    got = got.sort_values("unit")
    assert got["unit"].tolist() == list(range(len(want["mean"]))), what
    assert (got["count"] == want["count"]).all(), what
    assert (got["nonfinite"] == want["nonfinite"]).all(), what
    scale = want["rms"]  # "1e-6 relative" to the size of the unit's values (means near 0 stay exact)
    for c in ("mean", "abs_mean", "std", "min", "max"):
        g, w = got[c].to_numpy(np.float64), want[c]
        with np.errstate(invalid="ignore"):   # inf - inf; numpy 1 cannot mask an array atol in isclose
            ok = (g == w) | (np.abs(g - w) <= RTOL * np.nan_to_num(scale) + RTOL * np.abs(w)) | (np.isnan(g) & np.isnan(w))
        assert ok.all(), f"{what} {c}: {g[~ok]} != {w[~ok]}"
    for c in ("frac_active", "apoz"):
        np.testing.assert_allclose(got[c].to_numpy(np.float64), want[c], rtol=0, atol=1e-12, err_msg=f"{what} {c}")


def train(model, rec, steps, log=None, batch=(6, 3, 8, 8), accumulate=1, before=None, epoch_every=None,
          seed=0, lr=0.05, inputs=None):
    """Train with SGD; returns the list of input batches fed, per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    fed = []
    for s in range(steps):
        if before is not None:
            before(s)
        opt.zero_grad()
        xs = []
        for a in range(accumulate):
            shape = batch if not callable(batch) else batch(s, a)
            x = torch.randn(*shape, generator=g) if inputs is None else inputs(s, a)
            xs.append(x)
            out = model(x)
            loss = out.float().pow(2).mean()
            loss.backward()
        fed.append(xs)
        rec.step(loss=loss)
        if log is not None:
            log.end_step(s)
        if lr:
            opt.step()
        if epoch_every and (s + 1) % epoch_every == 0:
            rec.epoch_end()
    return fed


def record(tmp_path, model, activations, steps, name="run", log=None, hooks=(), rec_kw=None, setup=None, **kw):
    """Record ``steps`` training steps of ``model``; ``hooks``: module names whose outputs ``log`` captures;
    ``setup(rec)`` runs before training."""
    handles = [log.hook(dict(model.named_modules())[h], h) for h in hooks] if log is not None else []
    opts = dict(grads_every=0, weights_every=0, activations=activations, activations_every=0,
                activation_samples=0, flush_steps=2)
    opts.update(rec_kw or {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)   # the recorder must not stand aside
        with Recorder(model, tmp_path / name, **opts) as rec:
            if setup is not None:
                setup(rec)
            fed = train(model, rec, steps, log=log, **kw)
    for h in handles:
        h.remove()
    run = analyzer.open(tmp_path / name)
    assert run.status == "complete"
    return run, fed


# ============================================================================ models

class ConvNet(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


class Inner(nn.Module):
    """Every functional activation form, logged by name (the name the wrapper must give)."""

    def __init__(self, log=None):
        super().__init__()
        self.log = log

    def forward(self, x):
        L = self.log if self.log is not None and self.training else (lambda n, t: None)
        outs = []

        def o(name, t):
            L("block.inner/" + name, t)
            outs.append(t)

        o("relu#0", F.relu(x))
        o("relu#1", torch.relu(x))
        o("relu#2", x.relu())
        y = x * 1.0
        y.relu_()                      # in place
        o("relu#3", y)
        o("sigmoid#0", torch.sigmoid(x * 3))
        o("tanh#0", torch.tanh(x * 2))
        o("gelu#0", F.gelu(x))
        o("silu#0", F.silu(x))
        o("leaky_relu#0", F.leaky_relu(x, 0.1))
        o("elu#0", F.elu(x))
        o("softplus#0", F.softplus(x))
        o("hardtanh#0", F.hardtanh(x * 2, -0.5, 2.0))
        o("relu6#0", F.relu6(x * 8))
        o("softmax#0", F.softmax(x * 3, dim=-1))
        return sum(outs) / len(outs)


class Block(nn.Module):
    def __init__(self, log=None):
        super().__init__()
        self.inner = Inner(log)
        self.act = nn.ReLU()
        self.log = log

    def forward(self, x):
        h = self.inner(x)
        h = self.inner(h * 4.0)        # the same module twice: its call sites see both calls
        t = torch.tanh(h)
        if self.log is not None and self.training:
            self.log("block/tanh#0", t)
        return self.act(h) + t


class Top(nn.Module):
    def __init__(self, log=None):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.block = Block(log)
        self.shared = nn.Linear(8, 8)
        self.log = log

    def forward(self, x):
        h = self.block(self.fc(x))
        h = self.shared(h)
        r = F.relu(h)
        if self.log is not None and self.training:
            self.log("/relu#0", r)
        h = self.shared(r)             # the same Linear twice per forward
        r = torch.relu(h)
        if self.log is not None and self.training:
            self.log("/relu#1", r)
        return r


INNER = ["relu#0", "relu#1", "relu#2", "relu#3", "sigmoid#0", "tanh#0", "gelu#0", "silu#0", "leaky_relu#0",
         "elu#0", "softplus#0", "hardtanh#0", "relu6#0", "softmax#0"]
FUNCTIONAL = ["block.inner/" + n for n in INNER] + ["block/tanh#0", "/relu#0", "/relu#1"]
LEAVES = ["fc", "block.inner", "block.act", "shared"]


# ============================================================================ 1. per-unit statistics

def test_conv_and_linear_stats_per_step_and_epoch(tmp_path):
    torch.manual_seed(0)
    log = Log()
    # flush_steps=2 with 3-step epochs: an epoch spans two shards, pooled all the same
    run, _ = record(tmp_path, ConvNet(), ["conv", "act", "fc"], 6, log=log, hooks=("conv", "act", "fc"),
                    epoch_every=3)
    S = run.sites.set_index("name")
    assert S.loc["conv", ["kind", "unit_axis", "units"]].tolist() == ["output", 1, 4]
    assert S.loc["act", ["kind", "family", "unit_axis", "units"]].tolist() == ["relu", "relu", 1, 4]
    assert S.loc["fc", ["kind", "unit_axis", "units"]].tolist() == ["output", 1, 5]
    df = run.activation_stats()
    assert df["unit"].dtype == np.int64 and df["count"].dtype == np.int64 and df["step"].dtype == np.int64
    assert df["nonfinite"].dtype == np.int64 and df["epoch"].dtype == np.int64
    assert sorted(set(df["step"])) == list(range(6))
    assert len(df) == 6 * (4 + 4 + 5)
    for s in range(6):
        for name in ("conv", "act", "fc"):
            g = df[(df["step"] == s) & (df["site"] == name)]
            assert (g["epoch"] == s // 3).all()
            check_stats(g, truth(log.steps[s][name], 1), f"step {s} {name}")
    ep = run.activation_stats(per="epoch")
    assert "step" not in ep.columns and ep["unit"].dtype == np.int64 and ep["count"].dtype == np.int64
    assert len(ep) == 2 * (4 + 4 + 5)
    for e in range(2):
        for name in ("conv", "act", "fc"):
            arrays = [a for s in range(3 * e, 3 * e + 3) for a in log.steps[s][name]]
            check_stats(ep[(ep["epoch"] == e) & (ep["site"] == name)], truth(arrays, 1), f"epoch {e} {name}")
    # a step range and a site selection
    part = run.activation_stats(sites="act", steps=(2, 4))
    assert sorted(set(part["step"])) == [2, 3] and set(part["site"]) == {"act"}


def test_gradient_accumulation_one_step_covers_every_forward(tmp_path):
    torch.manual_seed(1)
    log = Log()
    sizes = {0: 4, 1: 5, 2: 3}
    run, fed = record(tmp_path, ConvNet(), ["conv", "fc"], 3, log=log, hooks=("conv", "fc"), accumulate=3,
                      batch=lambda s, a: (sizes[a] + s, 3, 8, 8))
    df = run.activation_stats()
    assert len(run.steps) == 3
    for s in range(3):
        assert len(log.steps[s]["conv"]) == 3 and len(fed[s]) == 3
        for name in ("conv", "fc"):
            g = df[(df["step"] == s) & (df["site"] == name)]
            w = truth(log.steps[s][name], 1)
            assert w["count"] == sum(x.shape[0] for x in fed[s]) * (64 if name == "conv" else 1)
            check_stats(g, w, f"step {s} {name}")


def test_inplace_relu_does_not_corrupt_what_is_recorded(tmp_path):
    torch.manual_seed(2)
    model = ConvNet(inplace=True)
    twin = ConvNet(inplace=False)     # the same weights, not in place: the truth
    log = Log()
    hooks = [log.hook(twin.conv, "conv"), log.hook(twin.act, "act")]
    g = torch.Generator().manual_seed(5)
    batches = {}

    def inputs(s, a):
        x = torch.randn(6, 3, 8, 8, generator=g)
        twin.load_state_dict(model.state_dict())
        twin.train()
        with torch.no_grad():
            twin(x)
        batches[s] = x
        return x

    run, _ = record(tmp_path, model, ["conv", "act"], 4, inputs=inputs,
                    rec_kw=dict(activations_every=1, activation_samples=3))
    for h in hooks:
        h.remove()
    df = run.activation_stats()
    for s in range(4):
        for name in ("conv", "act"):
            check_stats(df[(df["step"] == s) & (df["site"] == name)], truth(_steps_of(log, s, name), 1),
                        f"step {s} {name}")
    # the conv output keeps its negative values in the trace (stats and raw samples)
    assert (df[df["site"] == "conv"]["min"] < 0).all()
    st, vals = analyzer.activations.samples(run, "conv")
    assert sorted(set(st.tolist())) == [0, 1, 2, 3]
    for s in range(4):
        np.testing.assert_array_equal(vals[st == s], _steps_of(log, s, "conv")[0][:3].astype(np.float32))
    st, vals = analyzer.activations.samples(run, "act")
    np.testing.assert_array_equal(vals[st == 2], _steps_of(log, 2, "act")[0][:3].astype(np.float32))


def _steps_of(log, s, name):
    """The twin's captures: the twin runs before the model, once per step (log.cur is never closed)."""
    return [log.cur[name][s]]


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)     # a non-contiguous output


class Layouts(nn.Module):
    """Outputs of every memory layout the statistics distinguish."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)        # (N, 5, 8, 8): long rows (64), norms of pieces
        self.c2big = nn.Conv2d(3, 2, 3, padding=2)     # (N, 2, 17, 17): rows of 289, no piece size
        self.cl = nn.Conv2d(3, 6, 1)                   # channels_last output
        self.c1 = nn.Conv1d(3, 4, 3)                   # (N, 4, 40): conv-style 3-D, units on axis 1
        self.pool = nn.AdaptiveAvgPool1d(5)            # (N, 4, 5): short rows, reduced across samples
        self.tr = Transpose()                          # (N, 5, 4) non-contiguous, units last
        self.lin = nn.Linear(4, 7)                     # (N, 5, 7): linear-style, units last
        self.bf = nn.Linear(4, 3).to(torch.bfloat16)    # bfloat16 output

    def forward(self, x):
        a = self.c2(x).mean() + self.c2big(F.pad(x, (3, 4, 3, 4))).mean()
        a = a + self.cl(x.contiguous(memory_format=torch.channels_last)).mean()
        h = self.tr(self.pool(self.c1(x.flatten(2)[:, :, :42])))
        h = self.lin(h)
        return a + h.mean() + self.bf(h[..., :4].to(torch.bfloat16)).float().mean()


def test_layouts_dtypes_and_axis_override(tmp_path):
    torch.manual_seed(11)
    log = Log()
    names = ["c2", "c2big", "cl", "c1", "pool", "tr", "lin", "bf"]
    run, _ = record(tmp_path, Layouts(), names, 3, log=log, hooks=names, batch=(7, 3, 8, 8),
                    rec_kw=dict(activation_unit_axis={"c1": 2}))
    S = run.sites.set_index("name")
    axes = {"c2": 1, "c2big": 1, "cl": 1, "c1": 2, "pool": 1, "tr": 2, "lin": 2, "bf": 2}
    assert {n: int(S.loc[n, "unit_axis"]) for n in names} == axes
    assert S.loc["c1", "units"] == 40 and S.loc["tr", "units"] == 4
    assert log.steps[0]["cl"][0].shape == (7, 6, 8, 8)
    df = run.activation_stats()
    for s in range(3):
        for n in names:
            check_stats(df[(df["step"] == s) & (df["site"] == n)], truth(log.steps[s][n], axes[n]), f"step {s} {n}")


class FarNet(nn.Module):
    """Outputs whose mean is ~1e4 times their spread: sumsq / n - mean**2 must not cancel the variance away."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            for m in (self.conv, self.fc):
                m.weight.mul_(1e-2)
                m.bias.fill_(300.0)

    def forward(self, x):
        return self.conv(x).mean() + self.fc(x.flatten(2).transpose(1, 2)).mean()


def test_std_of_values_far_from_zero(tmp_path):
    torch.manual_seed(12)
    log = Log()
    run, _ = record(tmp_path, FarNet(), ["conv", "fc"], 2, log=log, hooks=("conv", "fc"), batch=(5, 3, 16, 16),
                    lr=0.0)
    df = run.activation_stats()
    for s in range(2):
        for n, ax in (("conv", 1), ("fc", 2)):
            w = truth(log.steps[s][n], ax)
            assert (w["std"] < 1e-4 * np.abs(w["mean"])).all()
            g = df[(df["step"] == s) & (df["site"] == n)].sort_values("unit")
            np.testing.assert_allclose(g["std"].to_numpy(np.float64), w["std"], rtol=1e-6, err_msg=n)
            np.testing.assert_allclose(g["mean"].to_numpy(np.float64), w["mean"], rtol=1e-9, err_msg=n)


# ============================================================================ 2. the activation wrapper

def test_wrapper_names_kinds_and_stats_of_every_functional_form(tmp_path):
    torch.manual_seed(3)
    log = Log()
    run, _ = record(tmp_path, Top(log), "all", 3, log=log, hooks=("fc", "block.inner", "block.act", "shared"),
                    batch=(5, 6))
    S = run.sites.set_index("name")
    assert sorted(S.index) == sorted(LEAVES + FUNCTIONAL)   # "all": every leaf and every call site
    assert "block.act/relu#0" not in S.index                # F.relu inside nn.ReLU: not counted twice
    kinds = {n: n.split("/")[1].split("#")[0] for n in FUNCTIONAL}
    for n, k in kinds.items():
        assert S.loc[n, "kind"] == k and S.loc[n, "source"] == "function", n
        assert S.loc[n, "unit_axis"] == 1 and S.loc[n, "units"] == 8
    assert S.loc["block.inner/relu#0", "module"] == "block.inner" and S.loc["/relu#0", "module"] == ""
    assert S.loc["block.act", "kind"] == "relu" and S.loc["block.act", "source"] == "module"
    assert S.loc["fc", "kind"] == "output" and S.loc["block.inner", "kind"] == "output"
    bounds = {x["name"]: x["bounds"] for x in run.manifest["sites"]}
    assert bounds["block.inner/hardtanh#0"] == [-0.5, 2.0] and bounds["block.inner/relu6#0"] == [0.0, 6.0]
    assert bounds["block.inner/sigmoid#0"] == [0.0, 1.0] and bounds["block/tanh#0"] == [-1.0, 1.0]
    assert bounds["block.inner/relu#0"] is None
    df = run.activation_stats()
    for s in range(3):
        for name in FUNCTIONAL + LEAVES:
            calls = log.steps[s][name]
            # the inner module runs twice per forward, the shared Linear too: both calls count
            assert len(calls) == (2 if name.startswith("block.inner") or name == "shared" else 1), name
            check_stats(df[(df["step"] == s) & (df["site"] == name)], truth(calls, 1), f"step {s} {name}")
    # the functional forms' near-bound counts: saturation at their own bounds
    sat = run.saturation(0.1, per_unit=True)
    for name, (lo, hi) in {"block.inner/sigmoid#0": (0, 1), "block.inner/hardtanh#0": (-0.5, 2.0),
                           "block.inner/relu6#0": (0, 6), "block/tanh#0": (-1, 1)}.items():
        for s in range(3):
            a = np.concatenate(log.steps[s][name])
            g = sat[(sat["site"] == name) & (sat["step"] == s)].sort_values("unit")
            du = g["delta_used"].iloc[0]
            np.testing.assert_allclose(g["saturated"].to_numpy(np.float64), ((a < lo + du) | (a > hi - du)).mean(0),
                                       atol=1e-12, err_msg=name)
    for s in range(3):
        a = np.concatenate(log.steps[s]["block.inner/softmax#0"])
        g = sat[(sat["site"] == "block.inner/softmax#0") & (sat["step"] == s)]
        assert g["saturated"].item() == pytest.approx((a.max(1) > 0.9).mean(), abs=1e-12)


@pytest.mark.parametrize("spec,want", [
    (["fc", "shared"], {"fc", "shared"}),
    ("block.*", {"block.inner", "block.act"}),
    (nn.Linear, {"fc", "shared"}),
    ("ReLU", {"block.act"}),
    ([1], {"shared"}),                   # layer ids: modules owning parameters (fc 0, shared 1)
    ("fn:relu", {"block.inner/relu#0", "block.inner/relu#1", "block.inner/relu#2", "block.inner/relu#3",
                 "/relu#0", "/relu#1"}),
    ("block.inner/s*", {"block.inner/sigmoid#0", "block.inner/silu#0", "block.inner/softplus#0",
                        "block.inner/softmax#0"}),
    ("/relu#1, fc", {"/relu#1", "fc"}),
    ("fn", set(FUNCTIONAL)),
    (["all"], set(FUNCTIONAL + LEAVES)),
    (True, set(FUNCTIONAL) | {"block.act"}),          # activation modules and functional activations
    ("activations", set(FUNCTIONAL) | {"block.act"}),
    (["activations", "fc"], set(FUNCTIONAL) | {"block.act", "fc"}),
])
def test_selection(tmp_path, spec, want):
    torch.manual_seed(0)
    model = Top()
    with Recorder(model, tmp_path / "r", grads_every=0, weights_every=0, activations=spec) as rec:
        assert {L.name for L in rec.layers} == {"fc", "shared"} and [L.id for L in rec.layers] == [0, 1]
        train(model, rec, 1, batch=(3, 6))
    assert set(analyzer.open(tmp_path / "r").sites["name"]) == want


def test_selection_that_selects_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="selects nothing"):
        Recorder(Top(), tmp_path / "r", activations=["fc", "nope"])
    with pytest.raises(ValueError, match="selects nothing"):
        Recorder(Top(), tmp_path / "s", activations=[7])


def test_eval_forwards_are_not_recorded(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    log = Log()
    h = log.hook(model.conv, "conv")
    with Recorder(model, tmp_path / "r", grads_every=0, weights_every=0, activations="conv") as rec:
        train(model, rec, 1, log=log)
        model.eval()
        with torch.no_grad():
            model(torch.randn(9, 3, 8, 8))
        model.train()
        rec.step()
    h.remove()
    df = analyzer.open(tmp_path / "r").activation_stats()
    check_stats(df[df["step"] == 0], truth(log.steps[0]["conv"], 1))
    assert df[df["step"] == 1].empty   # the eval forward left nothing


# ============================================================================ 4. dead units

class DeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.bias.copy_(torch.tensor([-1e3, -1e3, 0.5, 0.5, 0.0, 0.2]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


DIES_AT = 3


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    torch.manual_seed(4)
    model = DeadNet()
    log = Log()

    def before(s):
        if s == DIES_AT:   # unit 2 dies at this step and stays dead (no gradient reaches its bias)
            with torch.no_grad():
                model.fc1.bias[2] = -1e3

    run, _ = record(tmp_path_factory.mktemp("dead"), model, ["act"], 7, log=log, hooks=("act",), before=before,
                    batch=(16, 4), lr=0.01)
    per_step = {s: unit_rows(np.concatenate(log.steps[s]["act"]), 1) for s in range(7)}
    return run, per_step


def _died_at(per_step, dead_fn):
    steps = sorted(per_step)
    dead = np.array([dead_fn(per_step[s]) for s in steps])   # (steps, U)
    out = np.full(dead.shape[1], np.nan)
    for u in range(dead.shape[1]):
        alive = np.flatnonzero(~dead[:, u])
        last = alive[-1] if len(alive) else -1
        if last + 1 < len(steps):
            out[u] = steps[last + 1]
    return out


def test_strict_dead_units_and_died_at(dead_run):
    run, per_step = dead_run
    allv = np.concatenate(list(per_step.values()))
    du = run.dead_units(criterion="strict", threshold=0.0)
    assert du["unit"].dtype == np.int64 and du["dead"].dtype == bool
    assert du["unit"].tolist() == list(range(6))
    assert du[du["dead"]]["unit"].tolist() == [0, 1]                       # exactly the units made dead
    np.testing.assert_allclose(du["max"], allv.max(0), rtol=1e-7)
    np.testing.assert_allclose(du["score"], allv.max(0), rtol=1e-7)
    np.testing.assert_allclose(du["active_fraction"], (allv > 0).mean(0), rtol=0, atol=1e-12)
    died = du["died_at"].to_numpy()
    assert died[0] == 0 and died[1] == 0 and died[2] == DIES_AT
    np.testing.assert_array_equal(died, _died_at(per_step, lambda m: m.max(0) <= 0))
    assert du["dead_fraction"].iloc[0] == pytest.approx(2 / 6) and not du["flagged"].any()
    # from the step it died, unit 2 is dead too
    late = run.dead_units(criterion="strict", threshold=0.0, steps=(DIES_AT, None))
    assert late[late["dead"]]["unit"].tolist() == [0, 1, 2]
    assert run.dead_units(layer_share=0.3)["flagged"].all()


def test_same_trace_other_thresholds(dead_run):
    run, per_step = dead_run
    allv = np.concatenate(list(per_step.values()))
    mx = allv.max(0)
    for t in (0.5, 1.0, -0.5):
        du = run.dead_units(criterion="strict", threshold=t)
        assert du["dead"].tolist() == (mx <= t).tolist(), t
        np.testing.assert_array_equal(du["died_at"].to_numpy(), _died_at(per_step, lambda m: m.max(0) <= t))
        assert du.attrs["threshold"] == t
    af = (allv > 0).mean(0)
    for maf in (0.2, 0.6, 1.0):
        du = run.dead_units(criterion="strict", threshold=0, max_active_fraction=maf)
        assert du["dead"].tolist() == (af <= maf).tolist(), maf
        np.testing.assert_array_equal(du["died_at"].to_numpy(),
                                      _died_at(per_step, lambda m: (m > 0).mean(0) <= maf))


def test_apoz_and_dormant_scores(dead_run):
    run, per_step = dead_run
    allv = np.concatenate(list(per_step.values()))
    apoz = (allv <= 0).mean(0)
    for t in (0.3, 0.9):
        du = run.dead_units(criterion="apoz", threshold=t)
        np.testing.assert_allclose(du["score"], apoz, rtol=0, atol=1e-12)
        assert du["dead"].tolist() == (apoz >= t).tolist()
    e = np.abs(allv).mean(0)
    score = e / e.mean()                    # Sokar et al.: s_i = E|h_i| / mean_k E|h_k|
    for t in (0.0, 0.1, 0.8):
        du = run.dead_units(criterion="dormant", threshold=t)
        np.testing.assert_allclose(du["score"], score, rtol=1e-6)
        assert du["dead"].tolist() == (score <= t).tolist()
        np.testing.assert_array_equal(
            du["died_at"].to_numpy(),
            _died_at(per_step, lambda m: np.abs(m).mean(0) / np.abs(m).mean(0).mean() <= t))
    # the per-step raster agrees with the per-step criterion
    steps, mask = analyzer.activations.dead_mask(run, "act", criterion="strict", threshold=0.0)
    assert steps.tolist() == list(range(7))
    np.testing.assert_array_equal(mask, np.array([per_step[s].max(0) <= 0 for s in range(7)]))


@pytest.mark.parametrize("kw", [
    dict(criterion="apoz", threshold=1.5), dict(criterion="apoz", threshold=-0.1),
    dict(criterion="dormant", threshold=-1), dict(criterion="strict", threshold=float("nan")),
    dict(criterion="strict", threshold=float("inf")), dict(criterion="strict", max_active_fraction=2.0),
    dict(criterion="strict", threshold=0.5, max_active_fraction=0.1), dict(criterion="nope"),
    dict(criterion="strict", threshold="abc"), dict(criterion="strict", threshold=None),
    dict(layer_share=1.5),
])
def test_bad_thresholds_raise(dead_run, kw):
    with pytest.raises(ValueError):
        dead_run[0].dead_units(**kw)


# ============================================================================ 5. saturation

class SatNet(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.sig = nn.Sigmoid()
        self.tanh = nn.Tanh()
        self.ht = nn.Hardtanh(-0.5, 2.0)
        self.r6 = nn.ReLU6()
        self.sm = nn.Softmax(dim=1)
        self.relu = nn.ReLU()
        self.log = log

    def forward(self, x):
        h = self.fc(x) * 4
        outs = [self.sig(h), self.tanh(h), self.ht(h), self.r6(h * 2), self.sm(h), self.relu(h), F.gelu(h)]
        if self.training:
            self.log("/gelu#0", outs[-1])
        return sum(outs)


SAT = {"sig": ("sigmoid", 0.0, 1.0), "tanh": ("tanh", -1.0, 1.0), "ht": ("hardtanh", -0.5, 2.0),
       "r6": ("relu6", 0.0, 6.0), "sm": ("softmax", 0.0, 1.0)}


def test_saturation_by_kind_at_two_deltas(tmp_path):
    torch.manual_seed(6)
    log = Log()
    run, _ = record(tmp_path, SatNet(log), ["sig", "tanh", "ht", "r6", "sm", "relu", "fn:gelu"], 3, log=log,
                    hooks=("sig", "tanh", "ht", "r6", "sm", "relu"), batch=(40, 5))
    # near-bound counts at the deltas 0.01, 0.03, 0.1 (value units): delta rounds down to one of them
    used_want = {0.03: dict.fromkeys(SAT, 0.03), 0.1: dict.fromkeys(SAT, 0.1), 0.05: dict.fromkeys(SAT, 0.03),
                 0.005: dict.fromkeys(SAT, 0.0)}
    for delta in (0.03, 0.1, 0.05, 0.005):
        site_df = run.saturation(delta)
        unit_df = run.saturation(delta, per_unit=True)
        assert site_df["step"].dtype == np.int64
        assert set(site_df["site"]) == {"sig", "tanh", "ht", "r6", "sm", "relu"}   # GELU: not judged
        for name, (kind, lo, hi) in SAT.items():
            g = site_df[site_df["site"] == name]
            assert (g["kind"] == kind).all()
            du = g["delta_used"].iloc[0]
            assert du == pytest.approx(used_want[delta][name], abs=1e-12)
            for s in range(3):
                a = np.concatenate(log.steps[s][name])
                if kind == "softmax":
                    sat = a.max(1) > 1 - du                       # one value per row
                    assert g[g["step"] == s]["saturated"].item() == pytest.approx(sat.mean(), abs=1e-12)
                    u = unit_df[(unit_df["site"] == name) & (unit_df["step"] == s)]
                    assert u["unit"].isna().all() and u["saturated"].item() == pytest.approx(sat.mean(), abs=1e-12)
                    continue
                sat = (a < lo + du) | (a > hi - du)              # tanh: |a| > 1 - delta
                assert g[g["step"] == s]["saturated"].item() == pytest.approx(sat.mean(), abs=1e-12)
                u = unit_df[(unit_df["site"] == name) & (unit_df["step"] == s)].sort_values("unit")
                np.testing.assert_allclose(u["saturated"].to_numpy(np.float64), sat.mean(0), rtol=0, atol=1e-12)
        for name in ("relu",):                                    # ReLU family: the fraction <= 0
            g = site_df[site_df["site"] == name]
            assert g["delta_used"].isna().all()
            for s in range(3):
                a = np.concatenate(log.steps[s][name])
                assert g[g["step"] == s]["saturated"].item() == pytest.approx((a <= 0).mean(), abs=1e-12)
                u = unit_df[(unit_df["site"] == name) & (unit_df["step"] == s)].sort_values("unit")
                np.testing.assert_allclose(u["saturated"].to_numpy(np.float64), (a <= 0).mean(0), atol=1e-12)
    assert unit_df["unit"].dtype == "Int64"   # softmax rows have no unit
    relu_only = run.saturation(0.05, per_unit=True, sites="relu")
    assert relu_only["unit"].dtype == np.int64
    # saturated fraction per layer and the share of saturated units
    L = analyzer.activations.saturation_layers(run, 0.1, unit_fraction=0.5).set_index("site")
    sig = np.concatenate([a for s in range(3) for a in log.steps[s]["sig"]])
    per_step_units = [((np.concatenate(log.steps[s]["sig"]) < 0.1) | (np.concatenate(log.steps[s]["sig"]) > 0.9)).mean(0)
                      for s in range(3)]
    share = (np.mean(per_step_units, 0) > 0.5).mean()
    assert L.loc["sig", "saturated_units"] == pytest.approx(share)
    assert sig.size and L.loc["sig", "kind"] == "sigmoid"
    with pytest.raises(ValueError):
        run.saturation(0.7)
    with pytest.raises(ValueError):
        run.saturation(-0.1)


# ============================================================================ 6. raw samples

def test_dimension_variance_and_similarity_on_raw_samples(tmp_path):
    torch.manual_seed(7)
    log = Log()
    K = 3
    run, _ = record(tmp_path, ConvNet(), ["conv", "fc"], 7, log=log, hooks=("conv", "fc"), batch=(5, 3, 8, 8),
                    rec_kw=dict(activations_every=3, activation_samples=K))
    st, vals = analyzer.activations.samples(run, "conv")
    assert sorted(set(st.tolist())) == [0, 3, 6] and vals.shape == (3 * K, 4, 8, 8) and vals.dtype == np.float32
    for s in (0, 3, 6):
        raw = log.steps[s]["conv"][0][:K]
        np.testing.assert_array_equal(vals[st == s], raw.astype(np.float32))
    for dim in (1, 2, -1):
        dv = run.dimension_variance("conv", dim=dim)
        assert dv["step"].tolist() == [0, 3, 6] and dv["step"].dtype == np.int64
        for s in (0, 3, 6):
            v = log.steps[s]["conv"][0][:K].astype(np.float32).astype(np.float64)
            d = dim % v.ndim
            row = dv[dv["step"] == s].iloc[0]
            assert row["variance"] == pytest.approx(np.var(v, axis=d).mean(), rel=1e-9)
            slice_means = np.moveaxis(v, d, 0).reshape(v.shape[d], -1).mean(1)
            assert row["slice_mean_variance"] == pytest.approx(np.var(slice_means), rel=1e-9, abs=1e-15)
            assert row["slices"] == v.shape[d] and row["samples"] == K
    for method in ("cosine", "kl"):
        sim = run.similarity("conv", dim=1, method=method)
        assert sim["step"].tolist() == [0, 3, 6]
        for s in (0, 3, 6):
            v = torch.tensor(log.steps[s]["conv"][0][:K].astype(np.float32), dtype=torch.float64)
            m = v.movedim(1, 0).reshape(4, -1)
            vals_ = []
            for i in range(4):
                for j in range(4):
                    if i != j:
                        if method == "cosine":
                            vals_.append(F.cosine_similarity(m[i], m[j], dim=0).item())
                        else:
                            vals_.append(F.kl_div(F.log_softmax(m[j], 0), F.log_softmax(m[i], 0),
                                                  reduction="sum", log_target=True).item())
            assert sim[sim["step"] == s]["similarity"].item() == pytest.approx(np.mean(vals_), rel=1e-9)
    # a linear site: dim 1 is its units
    sim = run.similarity("fc", dim=1)
    v = torch.tensor(log.steps[6]["fc"][0][:K].astype(np.float32), dtype=torch.float64).T
    c = F.cosine_similarity(v[:, None, :], v[None, :, :], dim=2)
    assert sim[sim["step"] == 6]["similarity"].item() == pytest.approx((c.sum() - c.diag().sum()).item() / 20, rel=1e-9)
    for bad in (0, 4, -5, 1.5):
        with pytest.raises(ValueError):
            run.dimension_variance("conv", dim=bad)
    with pytest.raises(ValueError):
        run.similarity("conv", method="euclid")


# ============================================================================ 7. NaN / Inf

class NanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.sig = nn.Sigmoid()

    def forward(self, x):
        h = self.conv(x)
        return self.act(h) + self.sig(h)


def test_nan_and_inf_are_recorded_and_counted(tmp_path):
    torch.manual_seed(8)
    log = Log()
    g = torch.Generator().manual_seed(3)

    def inputs(s, a):
        x = torch.randn(4, 3, 8, 8, generator=g)
        if s == 1:
            x[0, 0, 2, 2] = float("nan")
            x[1, 1, 0, 0] = float("inf")
            x[2, 2, 5, 5] = -float("inf")
        return x

    run, _ = record(tmp_path, NanNet(), ["conv", "act", "sig"], 3, log=log, hooks=("conv", "act", "sig"),
                    inputs=inputs, lr=0.0)   # no update: the NaN gradient must not spoil later steps
    df = run.activation_stats()
    for s in range(3):
        for name in ("conv", "act", "sig"):
            w = truth(log.steps[s][name], 1)
            check_stats(df[(df["step"] == s) & (df["site"] == name)], w, f"step {s} {name}")
            if s == 1:
                assert w["nonfinite"] > 0 and np.isnan(w["mean"]).any()
            else:
                assert w["nonfinite"] == 0
    # saturation of the sigmoid: a NaN value is never saturated (and counts among the values)
    sat = run.saturation(0.1, sites="sig")
    for s in range(3):
        a = np.concatenate(log.steps[s]["sig"])
        with np.errstate(invalid="ignore"):
            want = ((a < 0.1) | (a > 0.9)).mean()
        assert sat[sat["step"] == s]["saturated"].item() == pytest.approx(want, abs=1e-12)
    # NaN is no evidence of a dead unit
    du = run.dead_units(sites="act")
    allv = np.concatenate([unit_rows(np.concatenate(log.steps[s]["act"]), 1) for s in range(3)])
    has_nan = np.isnan(allv).any(0)
    assert len(du) == 4 and has_nan.any()
    assert np.isnan(du["max"].to_numpy()[has_nan]).all() and not du["dead"].to_numpy()[has_nan].any()


# ============================================================================ dtypes, empty cases, torch-free

def test_empty_cases_keep_columns_and_dtypes(tmp_path):
    torch.manual_seed(9)
    model = ConvNet()
    with Recorder(model, tmp_path / "r", grads_every=0, weights_every=0, activations=["conv", "act"],
                  activations_every=1, activation_samples=2) as rec:
        model(torch.randn(2, 3, 8, 8))      # a forward, but no step: sites without recorded steps
    run = analyzer.open(tmp_path / "r")
    assert set(run.sites["name"]) == {"conv", "act"}
    a = run.activation_stats()
    assert a.empty and a["unit"].dtype == np.int64 and a["count"].dtype == np.int64 and "mean" in a.columns
    assert run.activation_stats(per="epoch").empty
    d = run.dead_units()
    assert d.empty and d["unit"].dtype == np.int64 and d["dead"].dtype == bool and "died_at" in d.columns
    s = run.saturation(per_unit=True)
    assert s.empty and s["unit"].dtype == np.int64 and "delta_used" in s.columns
    v = run.dimension_variance("conv")
    assert v.empty and list(v.columns) == ["step", "variance", "slice_mean_variance", "slices", "samples"]
    assert run.similarity("conv").empty
    assert analyzer.activations.saturation_layers(run).empty
    steps, mask = analyzer.activations.dead_mask(run, "act")
    assert steps.shape == (0,) and mask.shape == (0, 4)
    # a step range that holds nothing
    run2, _ = record(tmp_path, ConvNet(), ["act"], 2, name="r2")
    assert run2.activation_stats(steps=(10, 20)).empty and run2.dead_units(steps=[99]).empty
    assert len(run2.dead_units()) == 4


CHILD = r"""
import sys, json
sys.modules["torch"] = None
sys.path.insert(0, ROOT)
from bbdecoder import analyzer
run = analyzer.open(RUN)
a = run.activation_stats()
e = run.activation_stats(per="epoch")
d = run.dead_units(criterion="dormant", threshold=0.1)
s = run.saturation(0.1, per_unit=True)
v = run.dimension_variance("conv", dim=1)
c = run.similarity("conv", dim=1, method="kl")
leaked = sorted(m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None)
print("RESULT", json.dumps({"a": float(a["std"].sum()), "e": float(e["mean"].sum()), "d": float(d["score"].sum()),
                            "s": float(s["saturated"].sum()), "v": float(v["variance"].sum()),
                            "c": float(c["similarity"].sum()), "leaked": leaked}))
"""


def test_analyzer_with_torch_blocked(tmp_path):
    torch.manual_seed(10)
    run, _ = record(tmp_path, ConvNet(), ["conv", "act", "fc"], 4, epoch_every=2,
                    rec_kw=dict(activations_every=2, activation_samples=2))
    code = CHILD.replace("ROOT", repr(ROOT)).replace("RUN", repr(str(tmp_path / "run")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert res.pop("leaked") == []
    want = {"a": run.activation_stats()["std"].sum(), "e": run.activation_stats(per="epoch")["mean"].sum(),
            "d": run.dead_units(criterion="dormant", threshold=0.1)["score"].sum(),
            "s": run.saturation(0.1, per_unit=True)["saturated"].sum(),
            "v": run.dimension_variance("conv", dim=1)["variance"].sum(),
            "c": run.similarity("conv", dim=1, method="kl")["similarity"].sum()}
    for k, w in want.items():
        assert res[k] == pytest.approx(float(w), rel=1e-12), k


def test_two_ranks(dead_run, tmp_path):
    """Each rank records its own activations: steps, epochs and dead units pool them (by_rank: per rank)."""
    import shutil
    one = dead_run[0]
    d = tmp_path / "two"
    shutil.copytree(one.path, d)
    shutil.copytree(d / "rank-00000", d / "rank-00001")   # a second rank that saw the same values
    m = json.loads((d / "manifest.json").read_text())
    m["world_size"] = 2
    (d / "manifest.json").write_text(json.dumps(m))
    two = analyzer.open(d)
    a1, a2 = one.activation_stats(), two.activation_stats(by_rank=True)
    assert list(a2.columns[:2]) == ["rank", "step"] and sorted(set(a2["rank"])) == [0, 1]
    pd.testing.assert_frame_equal(a2[a2["rank"] == 1].drop(columns="rank").reset_index(drop=True), a1)
    m2 = two.activation_stats()   # merged per step: twice the values, same moments
    assert "rank" not in m2.columns and len(m2) == len(a1) and (m2["count"] == 2 * a1["count"]).all()
    for c in ("mean", "std", "min", "max", "frac_active"):
        np.testing.assert_allclose(m2[c], a1[c], rtol=1e-9, atol=1e-12, err_msg=c)
    e1, e2 = one.activation_stats(per="epoch"), two.activation_stats(per="epoch")
    assert (e2["count"] == 2 * e1["count"]).all()
    np.testing.assert_allclose(e2["mean"], e1["mean"], rtol=1e-12)
    np.testing.assert_allclose(e2["std"], e1["std"], rtol=1e-9)
    for kw in (dict(), dict(threshold=0.5), dict(criterion="dormant", threshold=0.1)):
        pd.testing.assert_frame_equal(two.dead_units(**kw), one.dead_units(**kw))
    s2 = two.saturation(per_unit=True, by_rank=True)
    assert "rank" in s2.columns and len(s2) == 2 * len(one.saturation(per_unit=True))
    pd.testing.assert_frame_equal(two.saturation(per_unit=True), one.saturation(per_unit=True))
    assert "rank" in analyzer.activations.dead_per_step(two, by_rank=True).columns
    pd.testing.assert_frame_equal(analyzer.activations.dead_per_step(two), analyzer.activations.dead_per_step(one))


class Ckpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(lambda t: F.gelu(self.act(self.fc(t))), x, use_reentrant=False)


def test_forward_recomputed_by_checkpointing_is_not_counted_twice(tmp_path):
    torch.manual_seed(13)
    run, _ = record(tmp_path, Ckpt(), ["act", "fn:gelu"], 2, batch=(5, 6))
    df = run.activation_stats()
    assert set(df["site"]) == {"act", "/gelu#0"}
    assert (df["count"] == 5).all()          # one forward per step, not two
