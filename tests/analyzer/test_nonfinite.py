"""NaN and Inf (issue 5, "Faults"): recorded as they are, counted per step and layer, flagged in the
report (summary.json and a warning box in index.html) and by `bbdecoder info --nonfinite`.

The run: a small MLP; at step NAN_STEP one input element is +Inf, which makes activations and every
gradient of that step non-finite (the optimizer step is skipped there, so weights stay finite); at
the last step one weight element is set to NaN after backward, so only that weight snapshot has it.
Expected counts come from np.isnan / np.isinf on the tensors captured directly with hooks.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder import analyzer
from helpers import run_cli
from bbdecoder.recorder import Recorder

NAN_STEP = 3
STEPS = 7
LAST = STEPS - 1


def _count(a):
    a = np.asarray(a, np.float64)
    return int(np.isnan(a).sum() + np.isinf(a).sum())


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("nonfinite") / "run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cap = {"grads": {}, "weights": {}, "acts": {}}
    for name, m in model.named_children():   # every module output is an activation site (activations="all")
        m.register_forward_hook(lambda m, i, o, name=name: cap["acts"].__setitem__(
            (name, cap["step"]), o.detach().clone().numpy()))
    with Recorder(model, d, grads_every=1, weights_every=1, activations="all", activations_every=1,
                  flush_steps=3) as rec:
        for step in range(STEPS):
            cap["step"] = step
            x = torch.randn(5, 6)
            if step == NAN_STEP:
                x[2, 4] = float("inf")
            loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1]))
            opt.zero_grad()
            loss.backward()
            if step == LAST:
                with torch.no_grad():
                    model[2].weight[1, 2] = float("nan")
            for name, p in model.named_parameters():
                cap["grads"][(name, step)] = p.grad.detach().clone().numpy()
                cap["weights"][(name, step)] = p.detach().clone().numpy()
            rec.step(loss=loss)
            if step != NAN_STEP:
                opt.step()
    return d, cap


def _split(name):
    layer, param = name.rsplit(".", 1)
    return layer, param


def test_counts_equal_numpy_on_the_raw_tensors(nan_run):
    d, cap = nan_run
    run = analyzer.open(d)
    gs = run.grad_stats()
    ws = run.weight_stats()
    assert len(gs) == len(ws) == STEPS * 4
    for df, raw in ((gs, cap["grads"]), (ws, cap["weights"])):
        for r in df.itertuples():
            want = raw[(f"{r.layer}.{r.param}", r.step)]
            assert r.nonfinite == _count(want), (r.layer, r.param, r.step)
            assert r.numel == want.size
    # the input Inf reaches every gradient at NAN_STEP and no other; only the last snapshot of
    # 2.weight holds the NaN weight
    g_bad = gs[gs["nonfinite"] > 0]
    assert set(g_bad["step"]) == {NAN_STEP} and len(g_bad) == 4
    w_bad = ws[ws["nonfinite"] > 0]
    assert list(zip(w_bad["step"], w_bad["layer"], w_bad["param"], w_bad["nonfinite"])) == [(LAST, "2", "weight", 1)]
    # the epoch table sums the counts
    ge = run.grad_stats(per="epoch")
    for r in ge.itertuples():
        assert r.nonfinite == sum(_count(cap["grads"][(f"{r.layer}.{r.param}", s)]) for s in range(STEPS))
    # activation statistics: the site's non-finite count per step equals the hooked output's
    assert list(run.sites["name"]) == ["0", "1", "2"]
    for site in ("0", "1", "2"):
        act = run.activation_stats(per="step", sites=site)
        per_step = act.groupby("step")["nonfinite"].first()
        assert dict(per_step) == {s: _count(cap["acts"][(site, s)]) for s in range(STEPS)}, site
        assert per_step[NAN_STEP] > 0 and per_step.drop(NAN_STEP).eq(0).all()
    # the statistics of the other steps are untouched (finite), those of NAN_STEP use the finite values
    r = gs[(gs["step"] == NAN_STEP) & (gs["layer"] == "0") & (gs["param"] == "weight")].iloc[0]
    g = cap["grads"][("0.weight", NAN_STEP)].astype(np.float64)
    f = g[np.isfinite(g)]
    assert r["count"] == f.size and (f.size == 0 or r["l1"] == pytest.approx(np.abs(f).sum(), rel=1e-6))


def test_report_flags_exactly_those_layers_and_the_first_step(nan_run, tmp_path, capsys):
    d, cap = nan_run
    out = tmp_path / "rep"
    code, _, err = run_cli(["report", d, "--out", str(out)], capsys)
    assert code == 0, err
    nf = json.loads((out / "summary.json").read_text())["nonfinite"]
    assert nf["found"] and nf["first_step"] == NAN_STEP
    got = {(e["kind"], e["layer"], e["param"]): (e["first_step"], e["steps"], e["count"]) for e in nf["entries"]}
    want = {}
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        layer, param = _split(name)
        want[("gradients", layer, param)] = (NAN_STEP, 1, _count(cap["grads"][(name, NAN_STEP)]))
    want[("weights", "2", "weight")] = (LAST, 1, 1)
    for site in ("0", "1", "2"):
        want[("activations", site, None)] = (NAN_STEP, 1, _count(cap["acts"][(site, NAN_STEP)]))
    assert got == want
    assert nf["layers"] == ["0", "1", "2"]
    html = (out / "index.html").read_text()
    assert 'id="nonfinite"' in html and "Non-finite values (NaN or Inf)" in html
    assert f"first at step {NAN_STEP}" in html and f"first at step {LAST}" in html


def test_a_finite_run_has_no_finding(tmp_path):
    from bbdecoder.analyzer.report import nonfinite_findings, nonfinite_html
    from helpers import record_tiny
    d = str(tmp_path / "run")
    record_tiny(d, epochs=1, steps_per_epoch=3, weights_every=1)
    run = analyzer.open(d)
    nf = nonfinite_findings(run, run.grad_stats(), run.weight_stats())
    assert nf == {"found": False, "first_step": None, "layers": [], "entries": []}
    assert nonfinite_html(nf) == ""


def test_info_mentions_them(nan_run, capsys):
    d, cap = nan_run
    code, out, err = run_cli(["info", d, "--nonfinite"], capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("nonfinite")]
    assert len(lines) == 9 and f"first at step {NAN_STEP}" in lines[0]
    code, out, err = run_cli(["info", d, "--json", "--nonfinite"], capsys)
    d_ = json.loads(out)
    assert d_["nonfinite"]["first_step"] == NAN_STEP and len(d_["nonfinite"]["entries"]) == 8
    code, out, _ = run_cli(["info", d], capsys)        # without the scan: nothing read, nothing said
    assert code == 0 and not any(ln.startswith("nonfinite") for ln in out.splitlines())
