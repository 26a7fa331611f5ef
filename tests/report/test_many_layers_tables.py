"""Issue 16 (the analyzer at 100,000 layers): a report's per-step tables past the row budget are written
per epoch (and per group of layers) instead, each equal to a numpy aggregation of the per-step data;
the per-layer tables keep every layer, and the page and summary.json say what was left out and how to
read every row."""

import os

import numpy as np
import pandas as pd
import pytest

import bbdecoder
from bbdecoder.analyzer.report import data as RD
from bbdecoder.analyzer.report.build import Report
from bbdecoder.analyzer.report.sections import tables as table_section
from helpers import record_tiny


def step_table(seed=0, layers=7, steps=23, epochs=3, ranks=False):
    rng = np.random.default_rng(seed)
    rows = []
    for r in ((0, 1) if ranks else (0,)):
        for st in range(steps):
            for lid in range(layers):
                if (st + lid) % 5 == 4:
                    continue                                      # not every layer at every step
                x = rng.random(7)
                rows.append({"rank": r, "step": st, "epoch": min(epochs - 1, st * epochs // steps), "layer_id": lid,
                             "layer": f"b.{lid}", "numel": 10 + lid, "count": 10 + lid, "nonfinite": int(x[0] < 0.1),
                             "mean": x[1] - 0.5, "abs_mean": x[2], "max_abs": x[3] * 3, "var": x[4], "l1": x[5] * 9,
                             "l2": x[6] * 4})
    df = pd.DataFrame(rows)
    return df if ranks else df.drop(columns="rank")


@pytest.mark.parametrize("ranks", [False, True])
def test_epoch_means_equal_a_numpy_aggregation(ranks):
    df = step_table(ranks=ranks)
    out = RD.epoch_means(df, ["layer_id", "layer"])
    keys = (["rank"] if ranks else []) + ["epoch", "layer_id"]
    groups = sorted(set(map(tuple, df[keys].to_numpy().tolist())))
    assert len(out) == len(groups)
    for row, k in zip(out.itertuples(index=False), groups):
        m = np.all(df[keys].to_numpy() == np.array(k), axis=1)
        d = {c: df[c].to_numpy(np.float64)[m] for c in df.columns if c not in ("layer",)}
        assert tuple(getattr(row, c) for c in keys) == k and row.layer == f"b.{k[-1]}"
        assert row.n_steps == m.sum() and row.count == d["count"].sum() and row.nonfinite == d["nonfinite"].sum()
        for c in ("mean", "abs_mean", "var", "l1", "l2"):
            assert row._asdict()[c] == pytest.approx(np.mean(d[c]), rel=1e-12), c
        assert row.max_abs == d["max_abs"].max()
        assert row.l2_var == pytest.approx(np.var(d["l2"]), rel=1e-9, abs=1e-15)


def test_last_snapshots_are_the_epochs_last_rows():
    rng = np.random.default_rng(3)
    ws = pd.DataFrame([{"step": st, "epoch": st // 10, "layer_id": lid, "layer": f"b.{lid}", "param": p,
                        "l2": rng.random(), "update_ratio": rng.random()}
                       for st in range(0, 40, 3) for lid in range(4) for p in ("weight", "bias")])
    ws = ws.sample(frac=1.0, random_state=0)                       # any order in
    out = RD.last_snapshots(ws)
    assert len(out) == 4 * 4 * 2
    for r in out.itertuples(index=False):
        d = ws[(ws["epoch"] == r.epoch) & (ws["layer_id"] == r.layer_id) & (ws["param"] == r.param)]
        last = d.loc[d["step"].idxmax()]
        assert (r.step, r.l2, r.update_ratio, r.n_snapshots) == (last["step"], last["l2"], last["update_ratio"], len(d))


def test_a_report_past_the_budget_writes_per_epoch_tables(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    record_tiny(d, epochs=2, steps_per_epoch=5, grads_every=0, weights_every=2)
    run = bbdecoder.open(d)
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)

    def tables(budget):
        monkeypatch.setattr(RD, "ROW_BUDGET", budget)
        rep = Report(run, str(out), None, 16, None)
        rep.data = RD.load_frames(run)
        table_section.add(rep)
        return rep, {t["file"]: t for t in rep.tables}

    rep, written = tables(10 ** 9)                                  # small: every per-step table whole
    assert {"tables/grad_stats_step.csv", "tables/grad_stats_layer.csv", "tables/weight_stats.csv"} <= set(written)
    assert rep.skipped == [] and RD.step_table_policy("grad_stats_step", rep.data.gs_all, rep.data) is None
    for f in os.listdir(out / "tables"):
        os.remove(out / "tables" / f)
    n_layers = len(rep.data.lt)
    rep, written = tables(n_layers)                                 # each per-step table is longer than this
    files = set(written)
    assert not files & {"tables/grad_stats_step.csv", "tables/grad_stats_layer.csv", "tables/weight_stats.csv"}
    assert {"tables/grad_stats_epoch.csv", "tables/grad_stats_layer_epoch.csv", "tables/weight_stats_epoch.csv",
            "tables/layer_summary.csv"} <= files
    assert sorted(os.listdir(out / "tables")) == sorted(f.split("/")[1] for f in files)
    gl = run.grad_stats(by="layer")
    got = pd.read_csv(out / "tables" / "grad_stats_layer_epoch.csv")
    assert len(got) == gl.groupby(["epoch", "layer_id"]).ngroups
    for r in got.itertuples(index=False):
        m = (gl["epoch"] == r.epoch) & (gl["layer_id"] == r.layer_id)
        assert r.n_steps == m.sum() and r.l2 == pytest.approx(gl.loc[m, "l2"].mean(), rel=1e-12)
        assert r.max_abs == pytest.approx(gl.loc[m, "max_abs"].max(), rel=1e-15)
    ws = pd.read_csv(out / "tables" / "weight_stats_epoch.csv")
    assert (ws.groupby(["epoch", "layer_id", "param"]).size() == 1).all()
    assert ws["n_snapshots"].sum() == len(rep.data.ws)
    assert len(pd.read_csv(out / "tables" / "layer_summary.csv")) == n_layers       # every layer kept
    why = " ".join(rep.skipped)
    assert "tables/grad_stats_step.csv" in why and "grad_stats(by=\"layer\")" in why and "weight_stats()" in why
    assert f"more than the report's {n_layers:,}" in why
