"""The HTML report: files, headline numbers checked against the Run API and the raw weights, skipping,
re-running into the same directory, escaping, and running without torch."""

from __future__ import annotations

import helpers

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bbdecoder import analyzer  # noqa: E402
from bbdecoder.analyzer.report import plots  # noqa: E402
from bbdecoder.analyzer.report import build_report  # noqa: E402
from bbdecoder.recorder import Recorder  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
EPOCHS, STEPS, WEVERY = 2, 8, 4
ROOT = helpers.ROOT


def _model(odd_name: bool = False) -> nn.Module:
    torch.manual_seed(0)
    last = "<b>&head" if odd_name else "head"
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3)), ("act", nn.ReLU()), ("flat", nn.Flatten()),
        ("fc", nn.Linear(4 * 6 * 6, 8)), ("act2", nn.Tanh()), (last, nn.Linear(8, 3)),
    ]))


def _train(run_dir, grads_every=1, with_loss=True, odd_name=False):
    """Train 2 epochs x 8 steps while recording; returns (losses, snapshots) where snapshots maps a
    snapshot step to {layer name: [parameter arrays]} as used in that step's forward."""
    model = _model(odd_name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(EPOCHS * STEPS * 4, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (len(x),), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, snaps = [], {}
    with Recorder(model, run_dir, grads_every=grads_every, grad_stats_every=grads_every,
                  weights_every=WEVERY, flush_steps=5) as rec:
        step = 0
        for _ in range(EPOCHS):
            for i in range(STEPS):
                xb, yb = x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]
                if step % WEVERY == 0:
                    snaps[step] = {name: [p.detach().double().numpy().copy()
                                          for p in m.parameters(recurse=False)]
                                   for name, m in model.named_modules() if list(m.parameters(recurse=False))}
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                rec.step(loss=loss) if with_loss else rec.step()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
            rec.epoch_end()
    return losses, snaps


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    losses, snaps = _train(str(d / "run"))
    return str(d / "run"), losses, snaps


@pytest.fixture(scope="module")
def report(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run = analyzer.open(recorded[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a complete trace: no warning
        summary = build_report(run, str(out), detail="all")
    return run, str(out), summary


def _load_json(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    with open(path) as f:
        return json.load(f, parse_constant=bad)


def test_files_figures_and_links(report):
    run, out, summary = report
    html_text = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    detail_text = open(os.path.join(out, "layers.html"), encoding="utf-8").read()
    pngs = sorted(os.listdir(os.path.join(out, "figures")))
    per_layer = [n for n in pngs if n.startswith(("grad_norms_", "weight_dist_"))]
    csvs = sorted(os.listdir(os.path.join(out, "tables")))
    assert pngs and all(n.endswith(".png") for n in pngs)
    for n in pngs:   # per-layer figures on the detail page only, the others on index.html only
        assert (f'src="figures/{n}"' in detail_text) == (n in per_layer) != (f'src="figures/{n}"' in html_text), n
        with open(os.path.join(out, "figures", n), "rb") as f:
            assert f.read(8) == PNG, n
    for n in csvs:
        assert f'href="tables/{n}"' in html_text, n
    assert 'href="summary.json"' in html_text
    for t in ("layers", "steps", "grad_stats_step", "grad_stats_epoch", "grad_stats_layer", "weight_stats"):
        assert f"{t}.csv" in csvs
    assert "grad_flow.png" in pngs and "grad_heatmap.png" in pngs
    keys = list(run.layers["key"])
    for k in keys:
        assert f"grad_norms_{k}.png" in pngs and f"weight_dist_{k}.png" in pngs
    for n in ("loss.png", "grad_variance.png", "weight_magnitude.png", "update_ratio.png"):
        assert n in pngs
    assert html_text.count("<figure>") == len(pngs) - len(per_layer) == html_text.count("<figcaption>")
    assert detail_text.count("<figure>") == len(per_layer) == 2 * len(keys)
    assert 'href="layers.html"' in html_text and 'href="index.html"' in detail_text
    for n in ("update_ratio_heatmap.png", "weight_l2_heatmap.png"):
        assert n in pngs
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html_text), "no external URLs"
    assert "<script" not in html_text.lower()
    s = _load_json(os.path.join(out, "summary.json"))
    assert sorted(s["figures"]) == sorted(f"figures/{n}" for n in pngs)
    assert sorted(s["tables"]) == sorted(f"tables/{n}" for n in csvs)
    assert s["skipped"] == [] and s["stale_files"] == []
    assert s == json.loads(json.dumps(summary))   # the return value is what was written
    assert s["parameters"]["bins"] == 64 and s["parameters"]["run"] == run.path
    assert s["parameters"]["detail"] == "all"
    assert s["parameters"]["layers"] is None and s["bbdecoder_version"] == analyzer.__version__
    assert s["run"]["status"] == "complete" and "Status: complete" in html_text
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_headline_numbers_match_run_api_tables_and_raw_weights(report, recorded):
    run, out, _ = report
    _, losses, snaps = recorded
    s = _load_json(os.path.join(out, "summary.json"))
    assert s["steps"] == EPOCHS * STEPS and s["epochs"] == EPOCHS
    assert s["grad_steps"] == EPOCHS * STEPS and s["weight_snapshots"] == EPOCHS * STEPS // WEVERY
    assert s["loss"]["first"] == pytest.approx(losses[0], rel=1e-6)
    assert s["loss"]["last"] == pytest.approx(losses[-1], rel=1e-6)
    steps_csv = pd.read_csv(os.path.join(out, "tables", "steps.csv"))
    assert s["loss"]["first"] == pytest.approx(steps_csv["loss"].iloc[0], rel=1e-12)

    gl = run.grad_stats(by="layer")
    gstep = pd.read_csv(os.path.join(out, "tables", "grad_stats_step.csv"))
    glay = pd.read_csv(os.path.join(out, "tables", "grad_stats_layer.csv"))
    wst = pd.read_csv(os.path.join(out, "tables", "weight_stats.csv"))
    by_name = {L["name"]: L for L in s["layers"]}
    assert sorted(by_name) == sorted(run.layers["name"])
    last_epoch = EPOCHS - 1
    names = {name: i for i, name in enumerate(snaps[0])}
    snap_steps = sorted(snaps)
    for L in s["layers"]:
        lid = L["id"]
        # from the Run API: pooled over steps
        d = gl[gl["layer_id"] == lid]
        assert L["mean_abs_grad"] == pytest.approx(d["l1"].sum() / d["count"].sum(), rel=1e-12)
        assert L["max_abs_grad"] == pytest.approx(d["max_abs"].max(), rel=1e-12)
        # from the CSVs with numpy: per-parameter rows summed over parameters and steps
        p = gstep[gstep["layer_id"] == lid]
        assert L["mean_abs_grad"] == pytest.approx(np.sum(p["l1"]) / np.sum(p["count"]), rel=1e-9)
        assert L["max_abs_grad"] == pytest.approx(np.max(p["max_abs"]), rel=1e-9)
        q = glay[(glay["layer_id"] == lid) & (glay["epoch"] == last_epoch)]
        assert len(q) == STEPS and L["last_epoch"] == last_epoch
        assert L["last_epoch_mean_l2"] == pytest.approx(np.mean(q["l2"]), rel=1e-9)
        # pooled L2 of a step from its parameters' L2
        l2_pooled = p.groupby("step")["l2"].apply(lambda v: np.sqrt(np.sum(v ** 2)))
        assert np.allclose(l2_pooled.to_numpy(), glay[glay["layer_id"] == lid].sort_values("step")["l2"], rtol=1e-9)
        # weights: from the CSV and independently from the weights captured during training
        w = wst[(wst["layer_id"] == lid) & (wst["step"] == wst["step"].max())]
        assert L["weight_l2_final"] == pytest.approx(np.sqrt(np.sum(w["l2"] ** 2)), rel=1e-9)
        raw = [np.concatenate([a.ravel() for a in snaps[st][L["name"]]]) for st in snap_steps]
        assert names[L["name"]] == lid
        assert L["weight_l2_final"] == pytest.approx(np.linalg.norm(raw[-1]), rel=1e-5)
        ratios = [np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in zip(raw, raw[1:])]
        assert L["update_ratio_median"] == pytest.approx(np.median(ratios), rel=1e-4)
        assert L["weight_snapshots"] == len(snap_steps) and L["grad_steps"] == EPOCHS * STEPS
    # layer_summary.csv holds the same numbers
    ls = pd.read_csv(os.path.join(out, "tables", "layer_summary.csv"))
    for L in s["layers"]:
        row = ls[ls["layer_id"] == L["id"]].iloc[0]
        assert row["mean_abs_grad"] == pytest.approx(L["mean_abs_grad"], rel=1e-12)
        assert row["update_ratio_median"] == pytest.approx(L["update_ratio_median"], rel=1e-12)


def test_no_gradients_no_loss_and_odd_names(tmp_path):
    run_dir = str(tmp_path / "run")
    _train(run_dir, grads_every=0, with_loss=False, odd_name=True)
    run = analyzer.open(run_dir)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.warns(UserWarning, match="no gradients") as rec:
        s = build_report(run, str(out), detail="all")
    assert len([w for w in rec if "bbdecoder report" in str(w.message)]) == 1
    skipped = "\n".join(s["skipped"])
    for item in ("gradient flow", "gradient heatmap", "gradient variance", "per-layer gradient norms", "loss"):
        assert f"figure {item}" in skipped, item
    figs = os.listdir(out / "figures")
    assert "grad_flow.png" not in figs and "loss.png" not in figs
    assert "weight_magnitude.png" in figs and "update_ratio.png" in figs
    assert any(n.startswith("weight_dist_") for n in figs)
    html_text = (out / "index.html").read_text(encoding="utf-8")
    assert "<h2>Skipped</h2>" in html_text and "gradient flow" in html_text
    assert "<b>&head" not in html_text and "&lt;b&gt;&amp;head" in html_text
    detail_text = (out / "layers.html").read_text(encoding="utf-8")
    assert "<b>&head" not in detail_text and "&lt;b&gt;&amp;head" in detail_text
    summ = _load_json(out / "summary.json")
    L = next(L for L in summ["layers"] if L["name"] == "<b>&head")
    assert L["mean_abs_grad"] is None and L["grad_steps"] == 0 and L["weight_l2_final"] > 0
    assert summ["loss"]["first"] is None
    # the tables are there, with headers, even when empty
    g = pd.read_csv(out / "tables" / "grad_stats_step.csv")
    assert len(g) == 0 and "l1" in g.columns


def test_twice_into_same_dir_keeps_other_files(recorded, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    (out / "figures").mkdir()
    (out / "figures" / "old.png").write_bytes(PNG + b"old")
    run = analyzer.open(recorded[0])
    s1 = build_report(run, str(out), layers="fc", bins=16)
    files1 = sorted(os.listdir(out / "figures")) + sorted(os.listdir(out / "tables"))
    s2 = build_report(analyzer.open(recorded[0]), str(out), layers="fc", bins=16)
    files2 = sorted(os.listdir(out / "figures")) + sorted(os.listdir(out / "tables"))
    assert files1 == files2 and s1["figures"] == s2["figures"]
    assert (out / "keep.txt").read_text() == "mine\n"
    assert (out / "figures" / "old.png").read_bytes() == PNG + b"old"
    assert s2["stale_files"] == ["figures/old.png"] and "figures/old.png" in (out / "index.html").read_text()
    assert sorted(os.listdir(out)) == ["figures", "index.html", "keep.txt", "layers.html", "summary.json", "tables"]


def test_layer_selection_and_progress(recorded, tmp_path):
    calls = []

    class Bar:
        def __init__(self, label, total):
            self.label, self.total, self.n = label, total, 0
            calls.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n):
            self.n += n

    run = analyzer.open(recorded[0])
    s = build_report(run, str(tmp_path), layers="Linear", bins=8, progress=Bar)
    assert [L["type"] for L in s["layers"]] == ["Linear", "Linear"]
    assert s["parameters"]["layers"] == "Linear" and s["parameters"]["bins"] == 8
    figs = os.listdir(tmp_path / "figures")
    assert "grad_norms_conv.png" not in figs and "grad_norms_fc.png" in figs
    assert calls and all(b.n == b.total == 2 for b in calls)


def test_incomplete_run_says_so(recorded, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(recorded[0], run_dir)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["status"] = "recording"
    (run_dir / "manifest.json").write_text(json.dumps(m))
    run = analyzer.open(str(run_dir))
    assert run.status == "incomplete"
    out = tmp_path / "out"
    out.mkdir()
    s = build_report(run, str(out), layers=[0])
    html_text = (out / "index.html").read_text(encoding="utf-8")
    assert "INCOMPLETE" in html_text and "did not close" in html_text
    assert s["run"]["status"] == "incomplete" and "did not close" in s["run"]["status_reason"]


def test_report_without_torch(recorded, tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from bbdecoder import analyzer\n"
            "from bbdecoder.analyzer.report import build_report\n"
            f"s = build_report(analyzer.open({recorded[0]!r}), {str(tmp_path)!r}, layers=[1], bins=4)\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print(len(s['figures']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 8


def test_check_reasons():
    df = pd.DataFrame({"step": [0, 1], "epoch": [0, 0], "loss": [np.nan, np.nan]})
    assert plots.check(df, plots.loss_curve) == "no finite values of loss"
    assert plots.check(df.iloc[:0], plots.loss_curve) == "no data"
    assert plots.check(None, ["a"]) == "no data"
    assert "missing column" in plots.check(df, plots.grad_flow)
    assert plots.check(df.assign(loss=[1.0, np.nan]), plots.loss_curve) is None
    assert set(plots.PLOTS) >= {"grad_flow", "grad_norms", "grad_heatmap", "grad_variance_step",
                                "grad_variance_epoch", "weight_distribution", "weight_magnitude",
                                "update_ratio", "loss_curve"}
    for fn in plots.PLOTS.values():
        assert fn.requires and fn.kind in ("ax", "fig")


def test_heatmap_bins_columns():
    cols = plots.bin_columns(np.arange(1000), 400)
    assert cols.max() == 399 and np.all(np.diff(cols) >= 0) and np.bincount(cols).min() >= 2
    assert np.array_equal(plots.bin_columns(np.arange(5), 400), np.arange(5))


def test_weight_distribution_image_is_the_histogram_highest_bin_on_top():
    """The drawn image holds log(1 + count) per (bin, snapshot), the highest bin in the top row, and
    the y ticks sit where their weight values fall on the bin edges."""
    rng = np.random.default_rng(3)
    edges = np.linspace(-0.5, 0.5, 9)
    steps = [0, 10, 20]
    counts = rng.integers(0, 50, (len(steps), 8))
    df = pd.DataFrame([{"step": s, "bin_left": edges[b], "bin_right": edges[b + 1], "count": int(counts[i, b])}
                       for i, s in enumerate(steps) for b in range(8)])
    fig, ax = plots.new_figure(6, 4)
    plots.weight_distribution(df, ax[0, 0])
    img = ax[0, 0].get_images()[0]
    want = np.log1p(counts.T[::-1].astype(np.float64))       # rows: bins from the highest down
    assert np.allclose(np.asarray(img.get_array()), want)
    assert tuple(img.get_extent()) == (0, 3, 8, 0)             # row 0 drawn at y = 0, the top
    for t, lab in zip(ax[0, 0].get_yticks(), ax[0, 0].get_yticklabels()):
        v = float(lab.get_text().replace("−", "-"))
        assert np.isclose(t, (0.5 - v) / 1.0 * 8)              # y = (hi - value) / (hi - lo) * bins
    plots.close(fig)


def test_grad_norm_series_draws_the_values_in_step_order():
    d = pd.DataFrame({"step": [4, 0, 2, 6], "epoch": [1, 0, 0, 1], "l1": [4.0, 1.0, 3.0, 2.0],
                      "l2": [0.4, 0.1, 0.3, 0.2]})
    fig, ax = plots.new_figure(6, 4)
    plots.grad_norm_series(d, ax[0, 0], stat="l2")
    line = ax[0, 0].get_lines()[0]
    assert line.get_label() == "per iteration"
    assert np.array_equal(line.get_xdata(), [0, 2, 4, 6]) and np.allclose(line.get_ydata(), [0.1, 0.3, 0.4, 0.2])
    seg = ax[0, 0].get_lines()[1]                              # epoch means: 0.2 over epoch 0, 0.3 over 1
    assert np.allclose(seg.get_ydata(), [0.2, 0.2, 0.3, 0.3])
    plots.close(fig)


@pytest.mark.parametrize("case", ["large linear", "log span", "tiny linear", "negative weights"])
def test_fixed_margins_keep_every_label_inside_the_figure(case):
    """The per-layer figures are laid out with margins estimated from their tick strings (no layout
    engine): after a real draw, tick labels, axis labels and titles lie inside the figure, and the
    y label does not run into the tick labels."""
    rng = np.random.default_rng(1)
    n = 120
    if case == "negative weights":
        edges = np.linspace(-1.234e-5, 3.1e-5, 33)
        df = pd.DataFrame([{"step": s, "bin_left": edges[b], "bin_right": edges[b + 1], "count": int(c)}
                           for s in range(0, 60, 10)
                           for b, c in enumerate(np.histogram(rng.normal(0, 1e-5, 300), bins=edges)[0])])
        fig, ax = plots.new_figure(9, 4.8, layout=None)
        plots.weight_distribution(df, ax[0, 0], title="Distribution of weight — layer 3: a.b.c (Conv2d)")
        plots.fixed_margins(fig, right=0.1)
    else:
        vals = {"large linear": 123456.0 + rng.random(n) * 5000, "log span": np.exp(rng.normal(size=n) * 4) * 1e-5,
                "tiny linear": -1.2e-5 + rng.random(n) * 3e-6}[case]
        d = pd.DataFrame({"step": np.arange(n), "epoch": np.arange(n) // 40, "l1": np.abs(vals) * 3, "l2": np.abs(vals)})
        fig = plots.figure(9, 5.5, layout=None)
        plots.grad_norms(d, fig, title="Gradient norms — layer 12: layer3.0.downsample.0 (Conv2d)")
        plots.fixed_margins(fig, top=0.75)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    def drawn(axis):      # the tick labels drawn: those of ticks inside the view interval
        lo, hi = sorted(axis.get_view_interval())
        eps = 1e-9 * (hi - lo)
        return [t.label1 for t in axis.get_major_ticks() if lo - eps <= t.get_loc() <= hi + eps
                and t.label1.get_visible() and t.label1.get_text()]
    for a in fig.axes:
        for t in drawn(a.yaxis) + drawn(a.xaxis) + [a.yaxis.label, a.xaxis.label, a.title]:
            if t.get_visible() and t.get_text():
                b = t.get_window_extent(r)
                assert b.x0 >= 0 and b.x1 <= W and b.y0 >= 0 and b.y1 <= H, (case, t.get_text(), b)
        ticks = [t.get_window_extent(r) for t in drawn(a.yaxis)]
        if a.yaxis.label.get_text() and ticks:
            assert a.yaxis.label.get_window_extent(r).x1 <= min(b.x0 for b in ticks) + 1, case
    plots.close(fig)
