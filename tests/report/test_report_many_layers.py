"""The report past MAX_LAYER_ROWS layers: the across-layer figures show groups of layers (whole blocks or
runs of consecutive blocks), each group's statistics those of all its parameters taken together,
checked against numpy on the raw tensors; index.html's layer table is cut with a pointer to the CSV."""

import numpy as np
import pandas as pd
import pytest

from bbdecoder.analyzer.gradients import pool_params
from bbdecoder.analyzer.report import data as D
from bbdecoder.analyzer.report.page import layer_rows_html


def _lt(names):
    return pd.DataFrame({"id": np.arange(len(names)), "name": names})


def test_rows_by_block_then_runs_of_blocks():
    names = ["model.embed"] + [f"model.blocks.{b}.mlp.{j}" for b in range(10) for j in range(3)] + ["model.head"]
    assert D.layer_rows(_lt(names), max_rows=len(names)) is None           # few layers: one row each
    r = D.layer_rows(_lt(names), max_rows=12)                                # 12 units: embed, 10 blocks, head
    assert r["row_id"].nunique() == 12
    assert list(r["row"].iloc[[0, 1, 4, 31]]) == ["model.embed [1 layer]", "model.blocks.0 [3 layers]",
                                                 "model.blocks.1 [3 layers]", "model.head [1 layer]"]
    assert list(r["row_id"].iloc[[1, 2, 3, 4]]) == [1, 1, 1, 4]             # the row's first layer id
    r = D.layer_rows(_lt(names), max_rows=5)                                 # ceil(12 / 5) = 3 units a row
    assert r["row_id"].nunique() == 4 and r["n_layers"].sum() == sum(r.groupby("row_id").size() ** 2)
    assert r["row"].iloc[0] == "model.embed – model.blocks.1 [7 layers]"
    assert r["row"].iloc[7] == "model.blocks.2–4 [9 layers]"
    flat = [f"l{i}" for i in range(1000)]                                    # no blocks: runs of layers
    r = D.layer_rows(_lt(flat), max_rows=300)
    assert r["row_id"].nunique() == 250 and set(r.groupby("row_id").size()) == {4}


@pytest.fixture(scope="module")
def raw():
    """Raw gradients and weight snapshots of 12 layers (2 parameters each) at 4 steps, in 3 blocks."""
    rng = np.random.default_rng(0)
    names = [f"b.{i // 4}.l{i % 4}" for i in range(12)]
    shapes = {"weight": (3, 5), "bias": (3,)}
    g = {(s, i, p): rng.standard_normal(shapes[p]) * 10.0 ** (-i / 4) for s in range(4) for i in range(12)
         for p in shapes}
    g[(2, 5, "bias")][1] = np.nan                                            # a non-finite element
    w = {(s, i, p): rng.standard_normal(shapes[p]) * (1 + 0.1 * s * i) for s in (0, 2, 3) for i in range(12)
         for p in shapes}
    return names, shapes, g, w


def _gs(names, shapes, g):
    rows = []
    for (s, i, p), x in g.items():
        f = x[np.isfinite(x)].ravel()
        rows.append({"step": s, "epoch": s // 2, "layer_id": i, "layer": names[i], "param": p, "numel": x.size,
                     "count": f.size, "nonfinite": x.size - f.size, "mean": f.mean(), "abs_mean": np.abs(f).mean(),
                     "max_abs": np.abs(f).max(), "var": f.var(), "l1": np.abs(f).sum(), "l2": np.sqrt((f ** 2).sum())})
    return pd.DataFrame(rows)


def test_grouped_gradient_statistics_match_numpy(raw):
    names, shapes, g, _ = raw
    gl = pool_params(_gs(names, shapes, g))
    rows = D.layer_rows(_lt(names), max_rows=2)          # 3 blocks > 2 rows: blocks 0-1 and block 2
    out = D.grouped_grad_stats(gl, rows)
    assert sorted(out["layer_id"].unique()) == [0, 8] and len(out) == 8
    for (s, first), members in [((s, 0), range(8)) for s in range(4)] + [((s, 8), range(8, 12)) for s in range(4)]:
        x = np.concatenate([g[(s, i, p)].ravel() for i in members for p in shapes])
        f = x[np.isfinite(x)]
        r = out[(out["step"] == s) & (out["layer_id"] == first)].iloc[0]
        assert r["count"] == f.size and r["nonfinite"] == x.size - f.size and r["numel"] == x.size
        np.testing.assert_allclose([r["mean"], r["var"], r["abs_mean"], r["l1"], r["l2"], r["max_abs"]],
                                   [f.mean(), f.var(), np.abs(f).mean(), np.abs(f).sum(),
                                    np.sqrt((f ** 2).sum()), np.abs(f).max()], rtol=1e-10)
    assert out["layer"].iloc[0] == "b.0–1 [8 layers]"


def test_grouped_weight_statistics_match_numpy(raw):
    names, shapes, _, w = raw
    rows_ws = []
    for (s, i, p), x in w.items():
        prev = {0: None, 2: 0, 3: 2}[s]
        ur = np.nan if prev is None else np.linalg.norm(x - w[(prev, i, p)]) / np.linalg.norm(w[(prev, i, p)])
        rows_ws.append({"step": s, "epoch": s // 2, "layer_id": i, "layer": names[i], "param": p, "numel": x.size,
                        "l2": np.linalg.norm(x), "update_ratio": ur})
    ws = pd.DataFrame(rows_ws)
    rows = D.layer_rows(_lt(names), max_rows=2)
    out = D.grouped_weight_stats(ws, rows)
    for s, prev in ((0, None), (2, 0), (3, 2)):
        for first, members in ((0, range(8)), (8, range(8, 12))):
            cur = np.concatenate([w[(s, i, p)].ravel() for i in members for p in shapes])
            r = out[(out["step"] == s) & (out["layer_id"] == first)].iloc[0]
            assert r["param"] == "(all)" and r["numel"] == cur.size
            np.testing.assert_allclose(r["l2"], np.linalg.norm(cur), rtol=1e-12)
            if prev is None:
                assert np.isnan(r["update_ratio"])
            else:
                old = np.concatenate([w[(prev, i, p)].ravel() for i in members for p in shapes])
                np.testing.assert_allclose(r["update_ratio"], np.linalg.norm(cur - old) / np.linalg.norm(old),
                                           rtol=1e-10)
    # the overview's per-"layer" update ratio of a grouped frame is the group's own (one pseudo-parameter)
    lur = D.layer_update_ratio(out).dropna()
    np.testing.assert_allclose(lur.sort_values(["step", "layer_id"])["update_ratio"].to_numpy(),
                               out.dropna().sort_values(["step", "layer_id"])["update_ratio"].to_numpy(), rtol=1e-12)


def test_grouped_epoch_noise_weighted_by_elements(raw):
    names, shapes, g, _ = raw
    gs = _gs(names, shapes, g)
    ge = gs.groupby(["epoch", "layer_id", "layer", "param"], as_index=False).agg(grad_noise=("var", "mean"))
    rows = D.layer_rows(_lt(names), max_rows=2)
    out, numel = D.grouped_epoch_stats(ge, gs, rows)
    assert dict(zip(numel["layer_id"], numel["numel"])) == {0: 8 * 18, 8: 4 * 18}
    e = ge.merge(gs[["layer_id", "param", "numel"]].drop_duplicates(), on=["layer_id", "param"])
    sel = e[(e["epoch"] == 1) & (e["layer_id"] >= 8)]
    want = (sel["grad_noise"] * sel["numel"]).sum() / sel["numel"].sum()
    got = out[(out["epoch"] == 1) & (out["layer_id"] == 8)]["grad_noise"].iloc[0]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_layer_table_cut_on_the_page():
    layers = [{"id": i, "name": f"l{i}", "type": "Linear", "n_params": 20, "recorded": True, "mean_abs_grad": 1.0,
               "max_abs_grad": 2.0, "last_epoch_mean_l2": 3.0, "weight_l2_final": None,
               "update_ratio_median": float("nan")} for i in range(1000)]
    html = layer_rows_html(layers, limit=300)
    assert html.count("<tr>") == 301 and "… and 700 more layers" in html and "tables/layer_summary.csv" in html
    assert layer_rows_html(layers[:5], limit=300).count("<tr>") == 5


def test_report_groups_layers_past_the_limit(tmp_path, monkeypatch):
    """End to end on a recorded run with the limit lowered to 2 layers: the overview and the across-layer
    figures are drawn from the groups and say so; the tables keep every layer."""
    from bbdecoder import analyzer
    from bbdecoder.analyzer.report import build_report
    from tests.helpers import record_tiny
    run = tmp_path / "run"
    record_tiny(str(run), epochs=1, steps_per_epoch=4, weights_every=2)
    monkeypatch.setattr(D, "MAX_LAYER_ROWS", 2)
    r = analyzer.open(str(run))
    frames = D.load_frames(r)
    assert frames.rows is not None and frames.fig_gl["layer_id"].nunique() == 2        # conv+body.1, head
    assert frames.gl["layer_id"].nunique() == 3                                        # per layer kept
    want = np.sqrt((frames.gl[frames.gl["layer_id"] < 2].groupby("step")["l2"].apply(lambda v: (v ** 2).sum())))
    got = frames.fig_gl[frames.fig_gl["layer_id"] == 0].set_index("step")["l2"]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12)
    out = tmp_path / "out"
    out.mkdir()
    s = build_report(r, out, jobs=1)
    assert "figures/grad_heatmap.png" in s["figures"] and "figures/grad_flow.png" in s["figures"]
    page = (out / "index.html").read_text()
    assert page.count("Here the 3 layers are shown as 2 rows") >= 4
    assert len(pd.read_csv(out / "tables" / "layer_summary.csv")) == 3


def test_summary_says_how_many_ranks_recorded():
    """The summary's ranks row gives a count, then the ids (escaped): "0" alone read like a count."""
    from bbdecoder.analyzer.report.page import head_rows_html
    s = {"run": {"path": "r", "ranks": [0, 1], "ranks_used": "lowest rank only"}, "steps": 0, "epochs": 0,
         "grad_steps": 0, "weight_snapshots": 0, "loss": {"first": None, "last": None}, "layers": [],
         "parameters": {"layers": None}}
    rows = head_rows_html(s)
    assert "<th>ranks recorded</th><td>2 (ranks 0, 1) (figures use the lowest rank)</td>" in rows
    s["run"].update(ranks=[0], ranks_used=None)
    assert "<th>ranks recorded</th><td>1 (rank 0)</td>" in head_rows_html(s)
    s["run"]["ranks"] = []
    assert "<th>ranks recorded</th><td>–</td>" in head_rows_html(s)
