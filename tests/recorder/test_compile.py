"""torch.compile: a compiled model is recorded like the eager one, or activations are declined once.

Three ways of compiling (``torch.compile(model)``, ``model.compile()`` before and after the Recorder
is created), each with activations on, against an eager reference run on the same data: the layer
and site names (no ``_orig_mod.`` prefix), the gradient and weight statistics and the activation
statistics (module outputs and functional call sites, through the activation wrapper) agree within
1e-5 relative; no exception and no warning reach the training loop. ``fullgraph=True`` forbids the
graph breaks the hooks need: exactly one RecorderWarning, no activation site, gradients still equal.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.recorder import Recorder, RecorderWarning

RTOL = 1e-5
STEPS = 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.gelu(self.fc(x)) + torch.sigmoid(x)     # two functional sites inside a module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU())   # a module site
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(self.seq(x))))   # a functional site at the root


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 4, generator=g) for _ in range(STEPS)]


def _run(path, how, **compile_kw):
    """Train Net for STEPS steps under ``how`` ("eager", "wrap", "before", "after"); returns
    (Run, RecorderWarnings caught)."""
    torch.manual_seed(0)
    model = Net()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if how == "wrap":
        model = torch.compile(model, **compile_kw)
    elif how == "before":
        model.compile(**compile_kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(model, path, activations=True, grads_every=0, weights_every=1, activations_every=0,
                      activation_samples=0, flush_steps=2) as rec:
            if how == "after":
                model.compile(**compile_kw)
            graphs = []
            for x in _batches():
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                rec.step()
                opt.step()
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    if how != "eager":   # compiled graphs ran, compiled once: no recompilation at every step (new hooks'
        assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs   # state would hit the limit)
    run = analyzer.open(path)
    assert run.status == "complete"
    return run, [w for w in caught if issubclass(w.category, RecorderWarning)]


def _frame(df, keys):
    return df.sort_values(keys).reset_index(drop=True)


def _assert_close(got, want, keys, cols):
    got, want = _frame(got, keys), _frame(want, keys)
    assert got[keys].equals(want[keys])
    for c in cols:
        g, w = got[c].to_numpy(np.float64), want[c].to_numpy(np.float64)
        scale = np.nanmax(np.abs(w)) if np.isfinite(w).any() else 1.0
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * scale * 1e-2, equal_nan=True, err_msg=c)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    run, warned = _run(tmp_path_factory.mktemp("eager") / "run", "eager")
    assert warned == []
    return run


GRAD_COLS = ["mean", "abs_mean", "max_abs", "var", "l1", "l2", "count", "nonfinite"]
ACT_COLS = ["count", "mean", "abs_mean", "std", "min", "max", "frac_active", "nonfinite"]


def _same_grads_and_weights(run, eager):
    assert run.layers["name"].tolist() == eager.layers["name"].tolist() == ["seq.0", "block.fc", "head"]
    _assert_close(run.grad_stats(), eager.grad_stats(), ["step", "layer", "param"], GRAD_COLS)
    _assert_close(run.weight_stats(), eager.weight_stats(), ["step", "layer", "param"],
                  ["mean", "std", "abs_mean", "max_abs", "l2"])


@pytest.mark.parametrize("how", ["wrap", "before", "after"])
def test_compiled_model_records_what_the_eager_model_records(tmp_path, eager, how):
    run, warned = _run(tmp_path / "run", how)
    assert warned == []
    _same_grads_and_weights(run, eager)
    sites = ["seq.1", "block/gelu#0", "block/sigmoid#0", "/tanh#0"]
    assert sorted(run.sites["name"]) == sorted(eager.sites["name"]) == sorted(sites)
    got, want = run.activation_stats(), eager.activation_stats()
    assert len(want) == STEPS * (8 * 4)   # every site, every step, 8 units
    _assert_close(got, want, ["step", "site", "unit"], ACT_COLS)


@pytest.mark.parametrize("how", ["wrap", "before", "after"])
def test_fullgraph_declines_activations_with_one_warning(tmp_path, eager, how):
    run, warned = _run(tmp_path / "run", how, fullgraph=True)
    assert len(warned) == 1 and "fullgraph=True" in str(warned[0].message), [str(w.message) for w in warned]
    assert len(run.sites) == 0 and len(run.activation_stats()) == 0
    _same_grads_and_weights(run, eager)
