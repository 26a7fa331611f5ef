"""Mixed precision: activation statistics of half tensors are computed in float32/float64, and the
gradients recorded under a GradScaler are the ones ``rec.step()`` sees (scaled before
``scaler.unscale_(opt)``, true ones after).

Activations: bfloat16 and float16 autocast forwards (CPU); the truth is the half tensors themselves,
captured by the test's own forward hooks and reduced in float64 numpy: counts exact, per-unit sums and
sums of squares within float32 rounding (a reduction in the half dtype would be off by ~1e-3).
Gradients: three runs on the same data (no scaler; scaler with ``rec.step()`` after ``unscale_``; before
it) compared through the analyzer's gradient statistics.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder import analyzer
from bbdecoder.recorder import Recorder, RecorderWarning

STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)
        self.seen = None   # the functional tanh's output, logged by the forward itself

    def forward(self, x):
        h = torch.tanh(self.fc2(self.act(self.fc1(x))))
        if self.seen is not None and self.training:
            self.seen.append(h.detach().clone())
        return self.fc3(h)


def _batches(n=STEPS, rows=96):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(rows, 12, generator=g) * 4 + 1 for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_stats_of_half_tensors_are_not_reduced_in_half(tmp_path, dtype):
    torch.manual_seed(0)
    model = Net()
    model.seen = []
    caught = {name: [] for name in ("fc1", "act", "fc2", "fc3")}
    for name in caught:
        getattr(model, name).register_forward_hook(lambda m, a, o, name=name: caught[name].append(o.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)
        with Recorder(model, tmp_path / "run", activations="all", grads_every=0, weights_every=0,
                      activations_every=0, activation_samples=0) as rec:
            for x in _batches():
                opt.zero_grad()
                with torch.autocast("cpu", dtype=dtype):
                    out = model(x)
                out.float().pow(2).mean().backward()
                rec.step()
                opt.step()
    caught["/tanh#0"] = model.seen
    assert all(t.dtype == dtype for ts in caught.values() for t in ts)   # the sites really saw half tensors
    run = analyzer.open(tmp_path / "run")
    got = run.activation_stats()
    assert sorted(got["site"].unique()) == sorted(caught)
    for name, ts in caught.items():
        assert len(ts) == STEPS
        for step, t in enumerate(ts):
            a = t.double().numpy()                        # the half values, exactly, in float64
            n, s, q = a.shape[0], a.sum(0), (a * a).sum(0)
            g = got[(got["site"] == name) & (got["step"] == step)].sort_values("unit")
            assert (g["count"].to_numpy() == n).all()
            mean = g["mean"].to_numpy(np.float64)
            sumsq = (g["std"].to_numpy(np.float64) ** 2 + mean ** 2) * n
            # float32 rounding of each partial: ~1e-7 relative to the size of the values summed
            scale = np.sqrt(q / n)
            np.testing.assert_allclose(mean * n, s, rtol=0, atol=1e-6 * n * scale.max(), err_msg=name)
            np.testing.assert_allclose(sumsq, q, rtol=2e-6, err_msg=name)
            np.testing.assert_array_equal(g["min"].to_numpy(np.float64), a.min(0))
            np.testing.assert_array_equal(g["max"].to_numpy(np.float64), a.max(0))


def _scaled_run(path, mode):
    """``mode``: "plain" (no scaler), "after" (rec.step() after scaler.unscale_), "before" (before it).
    Returns (Run, the loss scale)."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6)
    with Recorder(model, path, grads_every=0, weights_every=0) as rec:
        for x in _batches():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            if mode == "plain":
                loss.backward()
                rec.step()
                opt.step()
                continue
            scaler.scale(loss).backward()
            if mode == "after":
                scaler.unscale_(opt)
                rec.step()
            else:
                rec.step()
            scaler.step(opt)
            scaler.update()
    return analyzer.open(path), scaler.get_scale()


def test_grad_scaler_records_unscaled_grads_after_unscale_and_scaled_before(tmp_path):
    ref, _ = _scaled_run(tmp_path / "plain", "plain")
    after, S = _scaled_run(tmp_path / "after", "after")
    before, S2 = _scaled_run(tmp_path / "before", "before")
    assert S == S2 == 2.0 ** 12
    keys = ["step", "layer", "param"]
    r, a, b = (run.grad_stats().sort_values(keys).reset_index(drop=True) for run in (ref, after, before))
    assert len(r) == STEPS * 6 and r[keys].equals(a[keys]) and r[keys].equals(b[keys])
    # scaling by a power of two is exact: the unscaled gradients are the reference run's
    for c, power in (("mean", 1), ("abs_mean", 1), ("max_abs", 1), ("l1", 1), ("l2", 1), ("var", 2)):
        want = r[c].to_numpy(np.float64)
        np.testing.assert_allclose(a[c].to_numpy(np.float64), want, rtol=1e-6, err_msg=c)
        np.testing.assert_allclose(b[c].to_numpy(np.float64), want * S ** power, rtol=1e-6, err_msg=c)
    assert (a["count"] == r["count"]).all() and (b["count"] == r["count"]).all()
