"""Pruning plans: dead units made on purpose are exactly what the strict plan removes, applying the plan
keeps the outputs on the recorded inputs, magnitude and l1-channel plans against numpy, sweeps, plan
validation, and `bbdecoder prune`."""

import helpers
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bbdecoder import analyzer
from helpers import run_cli
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.pruning import pruning_plan, sweep
from bbdecoder.analyzer.trace.plans import PlanError, load_plan, write_plan
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.prune import apply_plan, model_params, model_sparsity

ROOT = helpers.ROOT
DEAD = [2, 5, 11]          # fc1 units made dead with a large negative bias
DEAD_CH = [1]              # conv channels made dead through the BatchNorm bias
STEPS = 6
LAST_SNAPSHOT = 4          # weights_every=2 over steps 0..5


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.conv(x)))
        return self.head(x.flatten(1))


def _record(model, run_dir, make_x, **kw):
    """Train a few steps with the recorder; return the inputs and the weights at the last snapshot."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs, snap = [], {}
    with Recorder(model, run_dir, activations="all", activations_every=1, weights_every=2, **kw) as rec:
        for s in range(STEPS):
            x = make_x()
            xs.append(x)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if s == LAST_SNAPSHOT:
                snap = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
            rec.step(loss)
            opt.step()
    return xs, snap


@pytest.fixture(scope="module")
def lin(tmp_path_factory):
    torch.manual_seed(0)
    model = Lin()
    with torch.no_grad():
        model.fc1.bias[DEAD] = -100.0
    d = str(tmp_path_factory.mktemp("prune") / "lin")
    xs, snap = _record(model, d, lambda: torch.randn(16, 8))
    return {"run": d, "model": model, "xs": xs, "snap": snap}


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    torch.manual_seed(1)
    model = ConvNet()
    with torch.no_grad():
        model.bn.bias[DEAD_CH] = -100.0
    d = str(tmp_path_factory.mktemp("prune") / "conv")
    xs, snap = _record(model, d, lambda: torch.randn(8, 2, 4, 4))
    return {"run": d, "model": model, "xs": xs, "snap": snap}


def _outputs(model, xs):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x in xs])


# ------------------------------------------------------------------ the proof

def test_strict_plan_lists_exactly_the_dead_units(lin):
    run = analyzer.open(lin["run"])
    plan = pruning_plan(run, "dead", 0.0)
    assert plan["format"] == "bbdecoder-pruning-plan" and plan["version"] == 1
    assert plan["criterion"] == {"name": "dead", "threshold": 0.0, "max_active_fraction": 0.0}
    assert plan["source_steps"] == [0, STEPS - 1, STEPS]
    assert plan["model_fingerprint"]["params"] == [["fc1.weight", [16, 8]], ["fc1.bias", [16]],
                                                   ["fc2.weight", [4, 16]], ["fc2.bias", [4]]]
    assert [e["layer"] for e in plan["layers"]] == ["fc1"]          # fc2 is the model's output
    e = plan["layers"][0]
    assert e["units"] == DEAD and e["axis"] == 0 and e["param"] == "weight" and e["sites"] == ["act"]
    assert e["next"] == [{"layer": "fc2", "layer_id": 1, "param": "weight", "axis": 1, "units": DEAD, "group": 1}]
    es = plan["expected_sparsity"]
    assert es["per_layer"] == pytest.approx({"fc1": 3 / 16, "fc2": 3 / 16})
    assert es["overall"] == pytest.approx((3 * 8 + 4 * 3) / (16 * 8 + 4 * 16))
    assert e["sparsity"] == pytest.approx(3 / 16)
    # the dormant criterion at tau = 0 finds the same units (E|h| = 0)
    assert pruning_plan(run, "dormant", 0.0)["layers"][0]["units"] == DEAD
    # naming the final layer makes it a producer too (judged by its own output site)
    assert {x["layer"] for x in pruning_plan(run, "dead", 1e9, layers="fc1,fc2")["layers"]} == {"fc1", "fc2"}


@pytest.mark.parametrize("which", ["lin", "conv"])
def test_applying_the_plan_keeps_outputs_and_raises_sparsity(which, lin, conv, tmp_path):
    d = {"lin": lin, "conv": conv}[which]
    run = analyzer.open(d["run"])
    plan = pruning_plan(run, "dead", 0.0)
    model = copy.deepcopy(d["model"])
    before = _outputs(model, d["xs"])
    assert model_sparsity(model)["overall"] == 0.0
    path = write_plan(plan, tmp_path / "plan.json")
    summary = apply_plan(model, path)
    after = _outputs(model, d["xs"])
    assert float((before - after).abs().max()) <= 1e-6
    sp = model_sparsity(model)
    es = plan["expected_sparsity"]
    assert sp["overall"] == pytest.approx(es["overall"]) and es["overall"] > 0
    assert summary["overall"] == pytest.approx(es["overall"])
    for name, frac in es["per_layer"].items():
        m = dict(model.named_modules())[name]
        assert sp["layers"][name] == pytest.approx(frac)
        if frac:
            assert float((m.weight_mask == 0).double().mean()) == pytest.approx(frac)
            assert summary["layers"][name]["masked_fraction"] == pytest.approx(frac)
    if which == "conv":
        e, = plan["layers"]
        assert (e["layer"], e["units"]) == ("conv", DEAD_CH)
        assert [(n["layer"], n["axis"], n["group"]) for n in e["next"]] == [("bn", 0, 1), ("head", 1, 16)]
        assert torch.all(model.conv.bias[DEAD_CH] == 0) and torch.all(model.bn.weight[DEAD_CH] == 0)
        assert torch.all(model.head.weight[:, 16:32] == 0) and torch.all(model.head.weight[:, :16] != 0)
    # the pruned model keeps its fingerprint: the same plan applies again
    apply_plan(model, plan)
    assert model_sparsity(model)["overall"] == pytest.approx(es["overall"])


def test_apply_refuses_a_plan_for_another_model(lin):
    plan = pruning_plan(analyzer.open(lin["run"]), "dead", 0.0)
    assert model_params(lin["model"]) == plan["model_fingerprint"]["params"]
    other = nn.Sequential()
    other.add_module("fc1", nn.Linear(8, 32))
    other.add_module("act", nn.ReLU())
    other.add_module("fc2", nn.Linear(32, 4))
    with pytest.raises(ValueError, match=r"does not fit this model: parameter 'fc1.weight' has shape \[16, 8\] "
                                         r"in the plan's model but \[32, 8\]"):
        apply_plan(other, plan)
    renamed = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="'fc1.weight'.*missing from this model"):
        apply_plan(renamed, plan)
    assert not any(n.endswith("_orig") for n, _ in other.named_parameters())  # nothing applied


# ------------------------------------------------------------------ magnitude and l1-channel vs numpy

def test_magnitude_plan_against_numpy(lin):
    run = analyzer.open(lin["run"])
    w1, w2 = lin["snap"]["fc1.weight"], lin["snap"]["fc2.weight"]
    t = float(np.median(np.abs(w1)))
    plan = pruning_plan(run, "magnitude", t)
    assert plan["source_steps"] == [LAST_SNAPSHOT, LAST_SNAPSHOT, 1]
    want = {"fc1": float(np.mean(np.abs(w1) <= t)), "fc2": float(np.mean(np.abs(w2) <= t))}
    assert plan["expected_sparsity"]["per_layer"] == pytest.approx(want, abs=0)
    assert plan["expected_sparsity"]["overall"] == pytest.approx(
        (np.sum(np.abs(w1) <= t) + np.sum(np.abs(w2) <= t)) / (w1.size + w2.size))
    assert all("units" not in e and e["magnitude_threshold"] == t for e in plan["layers"])
    # applied to the snapshot's weights, the masks are exactly |w| <= t
    model = Lin()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(lin["snap"][n]))
    apply_plan(model, plan)
    assert np.array_equal(model.fc1.weight_mask.numpy() == 0, np.abs(w1) <= t)
    assert model_sparsity(model)["layers"] == pytest.approx(want)
    assert pruning_plan(run, "magnitude", t, layers="fc2")["expected_sparsity"]["per_layer"]["fc1"] == 0


def test_l1_channel_plan_against_numpy(lin):
    run = analyzer.open(lin["run"])
    w1 = lin["snap"]["fc1.weight"].astype(np.float64)
    l1 = np.abs(w1).sum(1)
    t = float(np.sort(l1)[5])
    plan = pruning_plan(run, "l1-channel", t)
    e, = plan["layers"]
    assert e["layer"] == "fc1" and e["units"] == np.flatnonzero(l1 <= t).tolist() and len(e["units"]) == 6
    assert e["next"][0]["layer"] == "fc2" and e["next"][0]["units"] == e["units"]
    assert plan["expected_sparsity"]["per_layer"] == pytest.approx({"fc1": 6 / 16, "fc2": 6 / 16})
    w2 = lin["snap"]["fc2.weight"].astype(np.float64)
    t2 = float(np.abs(w2).sum(1).max())
    p2 = pruning_plan(run, "l1-channel", t2, layers="fc2")  # the final layer when named
    assert p2["layers"][0]["units"] == [0, 1, 2, 3] and p2["layers"][0]["next"] == []


# ------------------------------------------------------------------ sweeps

@pytest.mark.parametrize("criterion", ["dead", "dormant", "magnitude", "l1-channel"])
def test_sweep_is_monotonic_and_matches_plans(criterion, conv):
    run = analyzer.open(conv["run"])
    df = sweep(run, criterion)
    assert list(df.columns)[:4] == ["criterion", "threshold", "layer_id", "layer"]
    ts = sorted(df["threshold"].unique())
    assert len(ts) >= 3
    for _, g in df.groupby("layer"):
        s = g.sort_values("threshold")["sparsity"].to_numpy()
        assert np.all(np.diff(s) >= -1e-12), criterion
    ov = df[df["layer"] == "(overall)"].set_index("threshold")["sparsity"]
    assert ov.iloc[-1] > 0
    t = ts[len(ts) // 2]
    assert pruning_plan(run, criterion, t)["expected_sparsity"]["overall"] == pytest.approx(ov[t])


# ------------------------------------------------------------------ plan files

def test_plan_file_round_trip_and_validation(lin, tmp_path):
    plan = pruning_plan(analyzer.open(lin["run"]), "dead", 0.0)
    p = write_plan(plan, tmp_path / "plan.json")
    assert load_plan(p) == json.loads(json.dumps(plan))
    with pytest.raises(FileExistsError):
        write_plan(plan, p, overwrite=False)

    def broken(mutate, match):
        bad = json.loads(json.dumps(plan))
        mutate(bad)
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(bad))
        with pytest.raises(PlanError, match=match):
            load_plan(f)

    broken(lambda b: b.update(format="something"), "not a bbdecoder pruning plan")
    broken(lambda b: b.update(version=3), r"plan version 3 is newer than this bbdecoder reads \(1, 2\); upgrade "
           r"bbdecoder to apply it$")
    broken(lambda b: b.update(version=0), r"unknown plan version 0 \(this bbdecoder reads 1, 2\)$")
    broken(lambda b: b.update(version="1"), "invalid version")
    broken(lambda b: b.pop("criterion"), "missing field 'criterion'")
    broken(lambda b: b.update(layers={}), "field 'layers' must be a list")
    broken(lambda b: b["layers"][0].update(units=[2, "5"]), r"layers\[0\].units must be a list of integers")
    broken(lambda b: b["layers"][0].update(units=[2, 16]), r"index out of range \[0, 16\)")
    broken(lambda b: b["layers"][0]["next"][0].update(axis=3), r"next\[0\].axis must be 0 or 1")
    broken(lambda b: b["model_fingerprint"]["params"][0][1].__setitem__(0, 32), "sha256 does not match")
    broken(lambda b: b["criterion"].update(threshold=None), "criterion.threshold must be a finite number")
    broken(lambda b: b.update(source_steps=[3, 1, 2]), "source_steps")
    broken(lambda b: b["expected_sparsity"].update(overall=1.5), "expected_sparsity.overall")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(TraceError, match="malformed pruning plan"):
        load_plan(tmp_path / "garbage.json")
    with pytest.raises(TraceError, match="pruning plan not found"):
        load_plan(tmp_path / "missing.json")


def test_plan_needs_what_the_criterion_reads(tmp_path, lin):
    torch.manual_seed(0)
    model = Lin()
    d = str(tmp_path / "noact")
    with Recorder(model, d, weights_every=0) as rec:
        model(torch.randn(4, 8)).sum().backward()
        rec.step()
    run = analyzer.open(d)
    with pytest.raises(TraceError, match="no activation statistics"):
        pruning_plan(run, "dead", 0.0)
    with pytest.raises(TraceError, match="no weight snapshots"):
        pruning_plan(run, "magnitude", 0.1)
    good = analyzer.open(lin["run"])
    with pytest.raises(ValueError, match="criterion must be one of"):
        pruning_plan(good, "apoz", 0.5)
    with pytest.raises(ValueError, match="finite"):
        pruning_plan(good, "dead", float("nan"))
    with pytest.raises(TraceError, match="unknown layer 'nope'"):
        pruning_plan(good, "dead", 0.0, layers="nope")


# ------------------------------------------------------------------ CLI

def test_cli_prune_plan_and_sweep(lin, tmp_path, capsys):
    out = str(tmp_path / "plans" / "plan.json")
    code, o, e = run_cli(["prune", lin["run"], "--criterion", "dead", "--threshold", "0", "--out", out], capsys)
    assert code == 0, e
    assert load_plan(out)["layers"][0]["units"] == DEAD
    assert "fc1" in o and "3/16 units" in o and "(overall)" in o and "18.75%" in o
    code, o, e = run_cli(["prune", lin["run"], "--criterion", "dead", "--threshold", "0", "--out", out], capsys)
    assert code == 2 and "exists; pass --force" in e and len(e.strip().splitlines()) == 1
    code, o, e = run_cli(["prune", lin["run"], "--criterion", "magnitude", "--threshold", "0.1", "--out", out,
                       "--force", "--json"], capsys)
    assert code == 0 and load_plan(out)["criterion"]["name"] == "magnitude"
    assert json.loads(o)["expected_sparsity"]["overall"] > 0
    sw = tmp_path / "sweep"
    code, o, e = run_cli(["prune", lin["run"], "--criterion", "dead", "--sweep", "--thresholds", "0,0.5,1",
                       "--out", str(sw)], capsys)
    assert code == 0, e
    df = pd.read_csv(sw / "sweep.csv")
    assert sorted(df["threshold"].unique()) == [0.0, 0.5, 1.0] and "(overall)" in set(df["layer"])
    assert (sw / "sweep.png").stat().st_size > 1000
    assert "threshold" in o and "sweep.csv" in o


@pytest.mark.parametrize("argv, msg", [
    (["--criterion", "magnitude", "--threshold", "abc"], "is not a valid float"),
    (["--criterion", "magnitude", "--threshold", "-1"], "threshold is >= 0"),
    (["--criterion", "dead", "--threshold", "nan"], "finite number"),
    (["--criterion", "dead"], "--threshold is required"),
    (["--criterion", "bogus", "--threshold", "0"], "Invalid value for '--criterion'"),
    (["--criterion", "dead", "--threshold", "0", "--layers", "nope"], "unknown layer 'nope'"),
    (["--criterion", "dead", "--sweep", "--thresholds", "0,x"], "--thresholds: 'x' is not a number"),
    (["--criterion", "dormant", "--threshold", "0", "--max-active-fraction", "0.2"], "dead criterion only"),
])
def test_cli_prune_bad_input_is_one_line(lin, tmp_path, capsys, argv, msg):
    out = str(tmp_path / "p.json")
    code, o, e = run_cli(["prune", lin["run"], *argv, "--out", out], capsys)
    assert code != 0 and msg in e
    assert len(e.strip().splitlines()) == 1 and "Traceback" not in e
    assert not os.path.exists(out)


def test_plans_and_sweeps_without_torch(lin, tmp_path):
    code = f"""
import sys, json
sys.modules["torch"] = None
sys.path.insert(0, {ROOT!r})
from bbdecoder import analyzer
from bbdecoder.analyzer.pruning import pruning_plan, sweep
from bbdecoder.analyzer.cli import main
run = analyzer.open({lin['run']!r})
p = pruning_plan(run, "dead", 0.0)
n = len(sweep(run, "magnitude", [0.0, 0.1]))
try:
    main(["prune", {lin['run']!r}, "--criterion", "l1-channel", "--sweep", "--out", {str(tmp_path / 'sw')!r}])
except SystemExit as e:
    assert not e.code, e.code
leaked = [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
print("RESULT", json.dumps({{"units": p["layers"][0]["units"], "rows": n, "leaked": leaked}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert res == {"units": DEAD, "rows": 2 * 3, "leaked": []}
    assert (tmp_path / "sw" / "sweep.png").is_file()


def test_a_module_called_twice_is_no_consumer(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))

    torch.manual_seed(2)
    model = Twice()
    with torch.no_grad():
        model.fc.bias[3] = -100.0
    d = str(tmp_path / "twice")
    xs, _ = _record(model, d, lambda: torch.randn(8, 8))
    run = analyzer.open(d)
    plan = pruning_plan(run, "dead", 0.0)
    e, = plan["layers"]
    assert e["units"] == [3] and [n["layer"] for n in e["next"]] == ["out"]   # not fc's own columns
    assert any("runs 2 times" in n for n in plan["notes"])
    assert pruning_plan(run, "dead", 0.0, steps=(0, 3))["source_steps"] == [0, 2, 3]
    before = _outputs(model, xs)
    apply_plan(model, plan)
    assert float((before - _outputs(model, xs)).abs().max()) <= 1e-6
