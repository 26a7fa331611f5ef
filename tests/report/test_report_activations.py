"""The activation sections of the report and the `dead` / `saturation` commands: figures and tables,
thresholds in summary.json, numbers equal to the Run API (and to the raw activations), a rerun with
another threshold, one clear line for bad thresholds, and a run without activations."""

from __future__ import annotations

import helpers

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bbdecoder import analyzer  # noqa: E402
from bbdecoder.analyzer import activations as A  # noqa: E402
from helpers import run_cli  # noqa: E402
from bbdecoder.analyzer.report import build_report, dead_layer_table  # noqa: E402
from bbdecoder.recorder import Recorder  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = helpers.ROOT
ACT_FIGURES = ["act_dead_raster", "act_saturation", "act_distributions",
               "act_variance_similarity", "act_pruning_sweep"]
ACT_TABLES = ["activation_stats_epoch", "dead_units", "dead_layers", "saturation", "saturation_layers"]
DEAD_FC = [0, 1, 2]          # fc units with a large negative bias: never above 0
EPOCHS, STEPS = 2, 6


class Net(nn.Module):
    """conv -> relu -> linear (three units dead on purpose) -> relu, a sigmoid gate driven into
    saturation, and a softmax head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.gate = nn.Linear(8, 6)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc.bias[DEAD_FC] = -100.0

    def forward(self, x):
        h = F.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
        g = torch.sigmoid(20.0 * self.gate(h))
        return F.softmax(self.head(h), dim=1), g


@pytest.fixture(scope="module")
def act_run(tmp_path_factory):
    """Record Net with every activation site; returns (run dir, raw per-unit max of fc's output over
    the whole run)."""
    d = str(tmp_path_factory.mktemp("act") / "run")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fc_max = torch.full((8,), -math.inf)

    def hook(m, i, out):
        fc_max.copy_(torch.maximum(fc_max, out.detach().amax(0)))
    model.fc.register_forward_hook(hook)
    g = torch.Generator().manual_seed(1)
    with Recorder(model, d, grads_every=0, weights_every=0, activations="all", activations_every=3,
                  activation_samples=4, flush_steps=4) as rec:
        for _ in range(EPOCHS):
            for _ in range(STEPS):
                x = torch.randn(8, 1, 8, 8, generator=g)
                y = torch.randint(0, 3, (8,), generator=g)
                p, gate = model(x)
                loss = F.nll_loss(torch.log(p + 1e-9), y) + 0.1 * gate.mean()
                opt.zero_grad()
                loss.backward()
                rec.step(loss=loss)
                opt.step()
            rec.epoch_end()
    return d, fc_max.double().numpy()


def _report(run_dir, out, **kw):
    os.makedirs(out, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no gradients, no weights in this trace: warned
        return build_report(analyzer.open(run_dir), out, **kw)


@pytest.fixture(scope="module")
def report1(act_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rep1"))
    return out, _report(act_run[0], out)


def _json(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    with open(path) as f:
        return json.load(f, parse_constant=bad)


def _csv(out, name):
    return pd.read_csv(os.path.join(out, "tables", f"{name}.csv"), keep_default_na=True)


def _same(a: pd.DataFrame, b: pd.DataFrame, cols):
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert len(a) == len(b)
    for c in cols:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind in "fi" or y.dtype.kind in "fi":
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-9, atol=0,
                                       err_msg=c)
        else:
            assert [str(v) for v in x] == [str(v) for v in y], c


# ------------------------------------------------------------------ report


def test_report_writes_activation_figures_tables_and_parameters(act_run, report1):
    out, s = report1
    figs = os.listdir(os.path.join(out, "figures"))
    html_text = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    for n in ACT_FIGURES:
        assert f"{n}.png" in figs, n
        assert f"figures/{n}.png" in s["figures"] and f'src="figures/{n}.png"' in html_text
        with open(os.path.join(out, "figures", f"{n}.png"), "rb") as f:
            assert f.read(8) == PNG
    for t in ACT_TABLES + ["dead_per_step", "pruning_sweep", "activation_dims"]:
        assert f"tables/{t}.csv" in s["tables"] and f'href="tables/{t}.csv"' in html_text, t
    assert "<h2>Activations</h2>" in html_text
    # the dead fraction per site and step is drawn once, in the overview, and linked from the activations
    assert "act_dead_heatmap.png" not in figs and "dead_fraction_heatmap.png" in figs
    assert "href='#fig-dead_fraction_heatmap'" in html_text.split("<h2>Activations</h2>")[1]
    assert 'id="fig-dead_fraction_heatmap"' in html_text
    assert not [x for x in s["skipped"] if "figure act" in x or "dead" in x or "saturation" in x]
    assert [x for x in s["not_recorded"] if "no function graph" not in x] == []   # graph=True not used
    p = _json(os.path.join(out, "summary.json"))["parameters"]
    assert {k: p[k] for k in ("dead_criterion", "dead_threshold", "max_active_fraction", "layer_share", "delta",
                              "unit_fraction", "sim_dim", "sim_method", "raster_site")} == {
        "dead_criterion": "strict", "dead_threshold": 0.0, "max_active_fraction": 0.0, "layer_share": 0.5,
        "delta": 0.03, "unit_fraction": 0.5, "sim_dim": 1, "sim_method": "cosine", "raster_site": None}


def test_dead_tables_equal_api_and_raw(act_run, report1):
    run_dir, fc_max = act_run
    out, s = report1
    run = analyzer.open(run_dir)
    du = run.dead_units("strict", 0.0, 0.0, layer_share=0.5)
    dl = _csv(out, "dead_layers")
    assert list(dl.columns) == ["site", "kind", "units", "dead", "dead_fraction", "flagged"]
    for site, g in du.groupby("site", sort=False):
        r = dl[dl["site"] == site].iloc[0]
        assert r["units"] == len(g) and r["dead"] == int(g["dead"].sum())
        assert r["dead_fraction"] == pytest.approx(g["dead"].mean(), rel=1e-12)
        assert bool(r["flagged"]) == (g["dead"].mean() > 0.5)
    assert sorted(dl["site"]) == sorted(du["site"].unique())
    # against the raw outputs of fc (and the relu after it): strict dead = max <= 0
    want = (fc_max <= 0.0)
    assert want[DEAD_FC].all()
    for site in ("fc", "/relu#1"):
        got = du[du["site"] == site].sort_values("unit")["dead"].to_numpy()
        assert np.array_equal(got, want), site
        assert dl[dl["site"] == site]["dead"].iloc[0] == want.sum()
    _same(_csv(out, "dead_units"), du, ["site", "unit", "active_fraction", "max", "score", "dead", "died_at"])
    # headline of summary.json: per site dead_fraction / flagged and saturation
    satl = A.saturation_layers(run, 0.03, unit_fraction=0.5, layer_share=0.5)
    _same(_csv(out, "saturation_layers"), satl, ["site", "kind", "saturated", "saturated_units", "flagged"])
    _same(_csv(out, "saturation"), run.saturation(0.03), ["step", "site", "saturated", "delta_used"])
    head = {r["site"]: r for r in s["activations"]["sites"]}
    assert sorted(head) == sorted(run.sites["name"])
    for r in dl.itertuples(index=False):
        h = head[r.site]
        assert (h["dead"], h["dead_flagged"]) == (r.dead, bool(r.flagged))
        assert h["dead_fraction"] == pytest.approx(r.dead_fraction, rel=1e-12)
    for r in satl.itertuples(index=False):
        h = head[r.site]
        assert h["saturated"] == pytest.approx(r.saturated, rel=1e-12) and h["saturation_flagged"] == r.flagged
    assert head["/sigmoid#0"]["saturated"] > 0.3 and head["conv"]["saturated"] is None
    share = satl.set_index("site").loc["/sigmoid#0", "saturated_units"]
    assert head["/sigmoid#0"]["saturation_flagged"] == (share > 0.5)
    # the raster shows the site with the most dead units
    assert s["activations"]["raster_site"] == dl.sort_values("dead", ascending=False, kind="stable")["site"].iloc[0]
    # per-epoch statistics and the sweep at the report's threshold
    ast = _csv(out, "activation_stats_epoch")
    _same(ast, run.activation_stats(per="epoch"), ["epoch", "site", "unit", "count", "mean", "max", "frac_active"])
    sw = _csv(out, "pruning_sweep")
    at0 = sw[(sw["threshold"] == 0.0) & (sw["site"] != "(all sites)")].set_index("site")
    assert (at0.loc[dl["site"], "dead"].to_numpy() == dl["dead"].to_numpy()).all()
    v = sorted(sw["threshold"].unique())[-1]
    other = dead_layer_table(run.dead_units("strict", v)).set_index("site")
    s_v = sw[(sw["threshold"] == v) & (sw["site"] != "(all sites)")].set_index("site")
    assert (s_v.loc[other.index, "dead"] == other["dead"]).all()
    assert np.all(np.diff(sw[sw["site"] == "(all sites)"].sort_values("threshold")["sparsity"]) >= 0)
    # dimension variance / similarity for the sites with samples, from the API
    dims = _csv(out, "activation_dims")
    conv = dims[dims["site"] == "conv"].reset_index(drop=True)
    _same(conv, run.dimension_variance("conv", dim=1), ["step", "variance", "slice_mean_variance"])
    _same(conv, run.similarity("conv", dim=1), ["step", "similarity"])


@pytest.mark.filterwarnings("ignore:bbdecoder report")
def test_rerun_with_other_threshold_via_cli(act_run, report1, tmp_path, capsys):
    run_dir, fc_max = act_run
    pos = np.sort(fc_max[fc_max > 0])
    thr = float(pos[len(pos) // 2])            # kills about half of the live fc units too
    out = tmp_path / "rep2"
    code, o, err = run_cli(["report", run_dir, "--out", str(out), "--dead-threshold", repr(thr), "--delta", "0.1",
                         "--sim-method", "kl", "--layer-share", "0.4", "--raster-site", "fc"], capsys)
    assert code == 0, err
    assert o.strip() == f"report: {out / 'index.html'}"
    s = _json(out / "summary.json")
    p = s["parameters"]
    assert (p["dead_threshold"], p["delta"], p["sim_method"], p["layer_share"], p["raster_site"]) == (
        thr, 0.1, "kl", 0.4, "fc")
    run = analyzer.open(run_dir)
    dl2 = _csv(str(out), "dead_layers").set_index("site")
    api = dead_layer_table(run.dead_units("strict", thr, layer_share=0.4)).set_index("site")
    assert (dl2["dead"] == api.loc[dl2.index, "dead"]).all() and (dl2["flagged"] == api.loc[dl2.index, "flagged"]).all()
    want = int((fc_max <= thr).sum())               # raw: never above thr
    assert dl2.loc["fc", "dead"] == want == dl2.loc["/relu#1", "dead"]
    dl1 = _csv(report1[0], "dead_layers").set_index("site")
    assert dl2.loc["fc", "dead"] > dl1.loc["fc", "dead"]
    _same(_csv(str(out), "saturation_layers"), A.saturation_layers(run, 0.1, layer_share=0.4),
          ["site", "saturated", "saturated_units", "flagged"])
    head = {r["site"]: r for r in s["activations"]["sites"]}
    assert head["fc"]["dead"] == want and head["fc"]["dead_flagged"] == (want / 8 > 0.4)
    assert s["activations"]["raster_site"] == "fc"
    dims = _csv(str(out), "activation_dims")
    assert set(dims["method"]) == {"kl"}
    _same(dims[dims["site"] == "conv"], run.similarity("conv", method="kl"), ["step", "similarity"])


# ------------------------------------------------------------------ CLI dead / saturation


def test_cli_dead_table_and_json_equal_api(act_run, capsys):
    run_dir, _ = act_run
    run = analyzer.open(run_dir)
    for argv, kw in ((["--criterion", "apoz", "--threshold", "0.9"], dict(criterion="apoz", threshold=0.9)),
                     (["--criterion", "dormant", "--threshold", "0.1", "--layer-share", "0.2"],
                      dict(criterion="dormant", threshold=0.1, layer_share=0.2)),
                     ([], {})):
        want = dead_layer_table(run.dead_units(**kw))
        code, out, err = run_cli(["dead", run_dir, "--json"] + argv, capsys)
        assert code == 0 and err == "", err
        got = pd.DataFrame(json.loads(out))
        assert list(got.columns) == ["site", "kind", "units", "dead", "dead_fraction", "flagged"]
        _same(got, want, list(got.columns))
        code, out, _ = run_cli(["dead", run_dir] + argv, capsys)
        lines = out.strip().splitlines()
        assert code == 0 and lines[0].split() == list(want.columns) and len(lines) == len(want) + 1
        for line, r in zip(lines[1:], want.itertuples(index=False)):
            f = line.split()
            assert f[0] == r.site and int(f[3]) == r.dead and float(f[4]) == pytest.approx(r.dead_fraction, abs=1e-6)
    # per unit: only dead ones, or --all; --sites
    du = run.dead_units(sites="fc")
    code, out, _ = run_cli(["dead", run_dir, "--per-unit", "--sites", "fc", "--json"], capsys)
    got = pd.DataFrame(json.loads(out))
    assert code == 0 and list(got["unit"]) == list(du.loc[du["dead"], "unit"]) and got["dead"].all()
    _same(got, du[du["dead"]], ["unit", "active_fraction", "max", "score", "died_at"])
    code, out, _ = run_cli(["dead", run_dir, "--per-unit", "--all", "--sites", "fc", "--json"], capsys)
    assert len(json.loads(out)) == 8
    code, out, _ = run_cli(["dead", run_dir, "--per-unit", "--sites", "fc"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 + int(du["dead"].sum())


def test_cli_saturation_equals_api(act_run, capsys):
    run_dir, _ = act_run
    run = analyzer.open(run_dir)
    want = A.saturation_layers(run, 0.05, unit_fraction=0.3, layer_share=0.6, sites="bounded")
    code, out, err = run_cli(["saturation", run_dir, "--delta", "0.05", "--unit-fraction", "0.3", "--layer-share",
                           "0.6", "--sites", "bounded", "--json"], capsys)
    assert code == 0 and err == ""
    got = pd.DataFrame(json.loads(out))
    assert list(got["site"]) == ["/sigmoid#0", "/softmax#0"]
    _same(got, want, ["site", "kind", "saturated", "saturated_units", "flagged"])
    want = A.saturation_layers(run)
    code, out, _ = run_cli(["saturation", run_dir], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split() == list(want.columns) and len(lines) == len(want) + 1
    for line, r in zip(lines[1:], want.itertuples(index=False)):
        f = line.split()
        assert f[0] == r.site and float(f[2]) == pytest.approx(r.saturated, abs=1e-6) and f[4] == str(r.flagged)


BAD = [
    (["dead", "--threshold", "nan"], "finite"),
    (["dead", "--criterion", "apoz", "--threshold", "2"], "APoZ"),
    (["dead", "--criterion", "dormant", "--threshold", "-1"], "dormant"),
    (["dead", "--max-active-fraction", "0.1", "--threshold", "0.5"], "max_active_fraction"),
    (["dead", "--layer-share", "1.5"], "layer_share"),
    (["dead", "--sites", "nope"], "unknown activation site"),
    (["saturation", "--delta", "0.7"], "delta"),
    (["saturation", "--delta", "nan"], "delta"),
    (["saturation", "--unit-fraction", "2"], "unit-fraction"),
    (["report", "--delta", "0.7"], "delta"),
    (["report", "--dead-threshold", "nan"], "finite"),
    (["report", "--dead-criterion", "apoz", "--dead-threshold", "2"], "APoZ"),
    (["report", "--sim-dim", "0"], "sim_dim"),
    (["report", "--raster-site", "relu"], "exactly one"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_thresholds_one_line(act_run, tmp_path, capsys, argv, words):
    out_dir = tmp_path / "out"
    cmd = [argv[0], act_run[0]] + argv[1:] + (["--out", str(out_dir)] if argv[0] == "report" else [])
    code, out, err = run_cli(cmd, capsys)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbdecoder: error:") and words in lines[0], err
    assert not out_dir.exists()


def test_cli_without_torch(act_run):
    run_dir = act_run[0]
    code = ("import sys, json; sys.modules['torch'] = None\n"
            "from bbdecoder.analyzer.cli import main\n"
            "for argv in (['dead', %r, '--json'], ['saturation', %r, '--json']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, e.code\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            % (run_dir, run_dir))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"site"') > 8


# ------------------------------------------------------------------ without activations


def test_run_without_activations(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with Recorder(model, run_dir, grads_every=1, weights_every=2) as rec:
        for _ in range(4):
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            rec.step(loss=loss)
        rec.epoch_end()
    out = tmp_path / "out"
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a complete trace without activations: no warning
        s = build_report(analyzer.open(run_dir), str(out), layers=[0])
    figs = os.listdir(out / "figures")
    assert "loss.png" in figs and not [n for n in figs if n.startswith("act_")]
    assert s["skipped"] == []
    nr = "\n".join(s["not_recorded"])
    for n in ("dead unit raster", "saturation", "activation distributions",
              "dimension variance and similarity", "pruning sweep"):
        assert f"figure {n}: the trace has no activation sites" in nr, n
    # the dead fraction heatmap is the overview's alone: listed once
    assert nr.count("figure dead fraction heatmap: the trace has no activation statistics") == 1
    html_text = (out / "index.html").read_text(encoding="utf-8")
    assert "<h2>Activations</h2>" not in html_text and "figure pruning sweep: the trace has no activation" in html_text
    assert s["activations"]["sites"] == [] and s["parameters"]["dead_criterion"] == "strict"
    dl = pd.read_csv(out / "tables" / "dead_layers.csv")
    assert len(dl) == 0 and list(dl.columns) == ["site", "kind", "units", "dead", "dead_fraction", "flagged"]
    for cmd in ("dead", "saturation"):
        code, o, err = run_cli([cmd, run_dir], capsys)
        assert code == 2 and o == "" and "no activation sites" in err and len(err.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore:bbdecoder report")
def test_dead_raster_skipped_when_no_unit_is_ever_dead_unless_asked_for(tmp_path):
    """A model whose units never die (GELU): an all-white raster would say less than the skipped line; a site
    asked for with raster_site is drawn all the same."""
    run_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    with Recorder(model, run_dir, grads_every=1, weights_every=2, activations=True) as rec:
        for _ in range(4):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            loss.backward()
            rec.step(loss=loss)
    run = analyzer.open(run_dir)
    assert int(A.dead_units(run, "strict", 0.0)["dead"].sum()) == 0
    st, mask = A.dead_mask(run, run.sites["name"].iloc[0], "strict", 0.0, 0.0)
    assert len(st) == 4 and not mask.any()
    for site, drawn in ((None, False), ("1", True)):
        out = tmp_path / f"out{site}"
        out.mkdir()
        s = build_report(analyzer.open(run_dir), str(out), raster_site=site, jobs=1)
        assert os.path.exists(out / "figures" / "act_dead_raster.png") == drawn
        why = "figure dead unit raster: no unit of any site is dead at any step under strict (never above 0)"
        assert (why in s["skipped"]) == (not drawn)
