"""Recorder contract: layer table, selection, schedules, accumulation, overwrite, errors, close."""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import format as fmt
from helpers import Tiny, record_tiny
from bbdecoder.recorder import Recorder, RecorderClosedError, RecorderError, RecorderWarning, at, every, log_spaced


def _train(rec, model, steps, opt=None, accumulate=1, epoch_every=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    for s in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
            loss.backward()
        rec.step(loss=loss)
        opt.step()
        if epoch_every and (s + 1) % epoch_every == 0:
            rec.epoch_end()


def test_layer_table_ids_names_types_and_repr(tmp_path):
    m = Tiny()
    with Recorder(m, tmp_path / "r") as rec:
        L = rec.layers
        assert [(x.id, x.name, x.type) for x in L] == [(0, "conv", "Conv2d"), (1, "body.1", "Conv2d"),
                                                       (2, "head", "Linear")]
        assert [x.n_params for x in L] == [4 * 3 * 9 + 4, 6 * 4 * 9, 96 * 5 + 5]
        text = str(rec)
        for name in ("conv", "body.1", "head", "Conv2d", "Linear"):
            assert name in text
    run = analyzer.open(tmp_path / "r")
    assert run.layers[["id", "name", "type", "n_params"]].values.tolist() == \
        [[x.id, x.name, x.type, x.n_params] for x in L]


@pytest.mark.parametrize("spec,want", [
    (None, [0, 1, 2]), ([0, 2], [0, 2]), ("head", [2]), ("body.*", [1]), ("Conv2d", [0, 1]),
    (nn.Linear, [2]), ("conv,head", [0, 2]),
])
def test_layer_selection(tmp_path, spec, want):
    m = Tiny()
    with Recorder(m, tmp_path / "r", layers=spec, weights_every=1) as rec:
        assert [x.id for x in rec.layers if x.selected] == want
        _train(rec, m, 2)
    g = analyzer.open(tmp_path / "r").grad_stats()
    assert sorted(set(g["layer_id"])) == want


def test_selection_by_module_object_and_unknown(tmp_path):
    m = Tiny()
    with Recorder(m, tmp_path / "a", layers=m.head) as rec:
        assert [x.id for x in rec.layers if x.selected] == [2]
    with pytest.raises(ValueError, match="unknown layer"):
        Recorder(m, tmp_path / "b", layers="nope")
    assert not (tmp_path / "b").exists()


def test_schedules_int_zero_callable(tmp_path):
    m = Tiny()
    with Recorder(m, tmp_path / "r", grads_every=3, weights_every=at([1, 4]), grad_stats_every=at([1])) as rec:
        _train(rec, m, 8)
    run = analyzer.open(tmp_path / "r")
    assert sorted(set(run.grad_stats()["step"])) == [0, 1, 3, 6]    # statistics at 1, raw tensors at 0, 3, 6
    rec_ = run.recorded()
    assert rec_["grads"]["steps"] == 3 and rec_["grad_stats"]["steps"] == 1
    assert sorted(set(run.weight_stats()["step"])) == [1, 4]
    assert len(run.steps) == 8
    with Recorder(m, tmp_path / "z", grads_every=0, grad_stats_every=0, weights_every=lambda s: s == 2) as rec:
        _train(rec, m, 4)
    run = analyzer.open(tmp_path / "z")
    assert len(run.grad_stats()) == 0 and sorted(set(run.weight_stats()["step"])) == [2]
    assert [s for s in range(12) if every(4, start=1)(s)] == [1, 5, 9]
    # about per_decade firings per decade: s + 1 crosses 10 ** (j / per_decade)
    assert [s for s in range(30) if log_spaced(2)(s)] == [0, 1, 3, 9]
    assert [s for s in range(1000) if log_spaced(3)(s)] == [0, 1, 2, 4, 9, 21, 46, 99, 215, 464, 999]
    with pytest.raises(ValueError):
        Recorder(m, tmp_path / "bad", grads_every=-1)


def test_gradient_accumulation_records_the_accumulated_gradient(tmp_path):
    torch.manual_seed(1)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    want = []
    with Recorder(m, tmp_path / "r", layers="head") as rec:
        for s in range(3):
            opt.zero_grad()
            for _ in range(4):  # 4 micro-batches per optimizer step
                m(torch.randn(2, 3, 8, 8)).sum().backward()
            want.append(m.head.weight.grad.clone())
            rec.step()
            opt.step()
    run = analyzer.open(tmp_path / "r")
    g = run.grad_stats()
    g = g[g["param"] == "weight"]
    np.testing.assert_allclose(g["l2"], [float(w.double().norm()) for w in want], rtol=1e-6)
    assert len(run.steps) == 3 and run.steps["loss"].isna().all()


def test_weights_are_those_used_in_the_steps_forward(tmp_path):
    torch.manual_seed(2)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    used = []
    with Recorder(m, tmp_path / "r", layers="head", weights_every=1) as rec:
        for s in range(3):
            used.append(m.head.bias.detach().clone())
            loss = m(torch.randn(4, 3, 8, 8)).pow(2).mean()
            opt.zero_grad(); loss.backward(); rec.step(loss=loss); opt.step()
    run = analyzer.open(tmp_path / "r")
    h = run.weight_stats()
    h = h[h["param"] == "bias"]
    np.testing.assert_allclose(h["mean"], [float(u.double().mean()) for u in used], rtol=1e-6)


def test_existing_run_is_never_silently_overwritten(tmp_path):
    d = tmp_path / "r"
    record_tiny(str(d), epochs=1, steps_per_epoch=2)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(d) for p in fs}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Recorder(Tiny(), d)
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(d) for p in fs}
    assert before == after
    record_tiny(str(d), epochs=1, steps_per_epoch=3, overwrite=True)
    assert len(analyzer.open(d).steps) == 3
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a bbdecoder run"):
        Recorder(Tiny(), other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_loss_forms(tmp_path):
    m = Tiny()
    with Recorder(m, tmp_path / "r", grads_every=0, weights_every=0) as rec:
        rec.step(loss=torch.tensor(1.5))
        rec.step(loss=2.5)
        rec.step(loss=None)
        rec.step(loss=torch.tensor([3.5]))
    assert analyzer.open(tmp_path / "r").steps["loss"].tolist()[:2] == [1.5, 2.5]
    assert np.isnan(analyzer.open(tmp_path / "r").steps["loss"].iloc[2])


def test_close_twice_and_step_after_close(tmp_path):
    m = Tiny()
    rec = Recorder(m, tmp_path / "r")
    _train(rec, m, 2)
    rec.close()
    rec.close()
    with pytest.raises(RecorderClosedError):
        rec.step()
    with pytest.raises(RecorderClosedError):
        rec.epoch_end()
    run = analyzer.open(tmp_path / "r")
    assert run.status == "complete" and len(run.steps) == 2


def test_flush_makes_steps_visible_while_recording(tmp_path):
    m = Tiny()
    with Recorder(m, tmp_path / "r", flush_steps=1000, flush_secs=1000) as rec:
        _train(rec, m, 5)
        rec.flush()
        run = analyzer.open(tmp_path / "r")
        assert run.status == "incomplete" and len(run.steps) == 5
        assert "did not close" in run.status_reason
        _train(rec, m, 2)
    assert analyzer.open(tmp_path / "r").status == "complete"


class _Boom(Exception):
    pass


def _break_writes(rec, after):
    real = rec._series.write
    calls = [0]

    def write(records):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(28, "No space left on device")
        return real(records)
    rec._series.write = write


def test_on_error_raise_surfaces_writer_error_on_next_step(tmp_path):
    m = Tiny()
    rec = Recorder(m, tmp_path / "r", on_error="raise", flush_steps=2)
    _train(rec, m, 4)
    rec.flush()
    _break_writes(rec, after=0)
    _train(rec, m, 1)
    with pytest.raises(RecorderError, match="No space left"):
        for _ in range(50):  # the error is raised by the next call after the writer failed
            _train(rec, m, 1)
            time.sleep(0.01)
    rec.close()
    run = analyzer.open(tmp_path / "r")
    assert run.status == "incomplete" and "No space left" in run.status_reason
    assert len(run.steps) == 4  # what was written stays readable
    assert json.loads((tmp_path / "r" / fmt.MANIFEST).read_text())["status"] == fmt.STATUS_FAILED


def test_on_error_warn_stands_aside_and_training_goes_on(tmp_path):
    m = Tiny()
    rec = Recorder(m, tmp_path / "r", flush_steps=2)
    _train(rec, m, 2)
    rec.flush()
    _break_writes(rec, after=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _train(rec, m, 1)
        rec.flush()
        _train(rec, m, 20)
        rec.close()
    rw = [x for x in w if issubclass(x.category, RecorderWarning)]
    assert len(rw) == 1 and "No space left" in str(rw[0].message)
    run = analyzer.open(tmp_path / "r")
    assert run.status == "incomplete" and len(run.steps) == 2
    assert any("No space left" in e for e in run.info()["errors"])


def test_exception_in_training_marks_run_aborted(tmp_path):
    m = Tiny()
    with pytest.raises(_Boom):
        with Recorder(m, tmp_path / "r") as rec:
            _train(rec, m, 3)
            raise _Boom()
    run = analyzer.open(tmp_path / "r")
    assert run.status == "incomplete" and "raised an exception" in run.status_reason
    assert len(run.steps) == 3


def test_drop_policy_counts_drops_in_the_trace(tmp_path):
    import threading
    m = Tiny()
    rec = Recorder(m, tmp_path / "r", on_full="drop", queue_items=2, grads_every=1)
    gate = threading.Event()
    real = rec._series.write
    rec._series.write = lambda recs: (gate.wait(10), real(recs))
    _train(rec, m, 10)
    gate.set()
    rec.close()
    run = analyzer.open(tmp_path / "r")
    st = run.steps
    assert len(st) == 10 and st["dropped"].sum() >= 5
    assert run.info()["dropped"] == st["dropped"].sum()
    # the raw gradients of dropped steps are gone; their gradient statistics (tiny) are kept
    assert run.recorded()["grads"]["steps"] == int((st["dropped"] == 0).sum())
    assert set(run.grad_stats()["step"]) == set(st["step"])


def test_unsafe_module_names_are_sanitised(tmp_path):
    m = nn.Sequential()
    m.add_module("a/b", nn.Linear(2, 2))
    m.add_module("c\\d", nn.Linear(2, 2))
    with Recorder(m, tmp_path / "r", weights_every=1) as rec:
        m(torch.randn(1, 2)).sum().backward()
        rec.step()
    for dp, dns, fs in os.walk(tmp_path):
        for n in dns + fs:
            assert n not in ("..", "a") and "/" not in n and "\\" not in n
    run = analyzer.open(tmp_path / "r")
    assert sorted(run.grad_stats()["layer"].unique()) == ["a/b", "c\\d"]
    assert run.layers["key"].tolist() == ["a_b", "c_d"]


def test_idle_recorder_publishes_steps_within_flush_secs(tmp_path):
    m = Tiny()
    rec = Recorder(m, tmp_path / "r", flush_steps=1000, flush_secs=0.3)
    _train(rec, m, 3)
    deadline = time.time() + 5
    n = 0
    while time.time() < deadline and n < 3:  # flush_secs + the writer's batch wait, at most
        time.sleep(0.2)
        try:
            n = len(analyzer.open(tmp_path / "r").steps)
        except analyzer.TraceError:
            n = 0
    assert n == 3
    rec.close()


def test_failed_constructor_leaves_no_hooks_on_the_model(tmp_path):
    m = Tiny()
    record_tiny(str(tmp_path / "r"), epochs=1, steps_per_epoch=1)
    hooks = lambda: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    before = hooks()
    with pytest.raises(FileExistsError):
        Recorder(m, tmp_path / "r", activations="all")
    assert hooks() == before == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _Lit(nn.Module):
    """A LightningModule's shape: training_step calls self.model(...) (and self.head(...)), never self(...)."""

    def __init__(self, head=False):
        super().__init__()
        self.model = _Net()
        self.head = nn.Sequential(nn.Linear(2, 3), nn.Tanh()) if head else None

    def forward(self, x):
        return self.model(x)

    def training_step(self, x):
        y = self.model(x)
        return (self.head(y) if self.head is not None else y).pow(2).mean()


def test_forward_entering_below_the_model_warns_once_and_records_from_there(tmp_path):
    torch.manual_seed(0)
    lit = _Lit()
    xs = [torch.randn(5, 4) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(lit, tmp_path / "r", activations=True, graph=True) as rec:
            for x in xs:
                lit.training_step(x).backward()
                rec.step()
                lit.zero_grad()
    with torch.no_grad():   # the site's values at the last step, by hand
        want = torch.relu(x @ lit.model.fc1.weight.T + lit.model.fc1.bias)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
    assert len(msgs) == 1 and "'model'" in msgs[0] and "Recorder(model.model" in msgs[0] and "_Lit" in msgs[0]
    run = analyzer.open(tmp_path / "r")
    assert run.sites["name"].tolist() == ["model/relu#0"]          # the model's names
    last = run.activation_stats().query("step == 2").sort_values("unit")
    np.testing.assert_allclose(last["mean"], want.mean(0).numpy(), rtol=1e-6)
    assert (last["count"] == 5).all()
    graph = json.loads((tmp_path / "r" / "graph.json").read_text())
    lin = [n for n in graph["nodes"] if n["op"] == "linear"]
    assert [n["module"] for n in lin] == ["model.fc1", "model.fc2"]
    assert lin[0]["params"] == ["model.fc1.weight", "model.fc1.bias"]
    assert {m["name"]: m["depth"] for m in graph["modules"]} == {"model": 1, "model.fc1": 2, "model.fc2": 2}


def test_several_entries_are_named_and_a_root_forward_does_not_warn(tmp_path):
    lit = _Lit(head=True)
    with pytest.warns(RecorderWarning, match=r"'model', 'head'") as caught:
        with Recorder(lit, tmp_path / "a", activations=True) as rec:
            for _ in range(2):
                lit.training_step(torch.randn(3, 4)).backward()
                rec.step()
    assert len([w for w in caught if issubclass(w.category, RecorderWarning)]) == 1
    assert set(analyzer.open(tmp_path / "a").sites["name"]) == {"model/relu#0", "head.1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)
        with Recorder(lit, tmp_path / "b", activations=True, graph=True, overwrite=True) as rec:
            lit(torch.randn(3, 4)).sum().backward()    # the root's own forward
            rec.step()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lit.modules())
    assert hooks == 0 and "compile" not in vars(lit)
