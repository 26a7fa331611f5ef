"""Issue 17, items 1 and 2: module FLOPs and time at a depth (default: the repeated blocks), the module
graph with repeated blocks collapsed, tooltips with full names over the overview heatmaps and the graph
boxes, and the dead-fraction and saturation heatmaps, against hand sums of graph.json's module rows,
torch parameter counts, the drawn figures' own transforms and the Run API's activation tables."""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from bbdecoder import analyzer
from bbdecoder.analyzer import activations as A
from bbdecoder.analyzer.graph import (OTHER_OPS, default_depth, module_cut, module_frame, module_graph, module_table,
                                      read_graph, repeated_groups, to_dot)
from bbdecoder.analyzer.report import plots
from bbdecoder.analyzer.report.plots import graphview
from bbdecoder.analyzer.report.tooltips import areas_html
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.demo import make_reference_cnn
from bbdecoder.recorder.graph import record_graph
from helpers import run_cli


@pytest.fixture(scope="module")
def gpt2_12():
    from transformer_models import hf_gpt2, tokens
    m = hf_gpt2(layers=12)
    ids, _ = tokens(2)
    return m, record_graph(m, ids, time_repeats=1)


def test_gpt2_module_table_at_the_default_depth_is_the_blocks_and_sums_to_the_model(gpt2_12):
    m, g = gpt2_12
    rows = {r["name"]: r for r in g["modules"]}
    assert default_depth(g) == 3              # the blocks' own depth (h, a ModuleList, never runs)
    t = module_table(g, 3)
    blocks = [f"transformer.h.{i}" for i in range(12)]
    assert list(t["name"]) == ["transformer.wte", "transformer.wpe", "transformer.drop", *blocks, "transformer.ln_f",
                               "lm_head"]
    assert list(t["flops"]) == [rows[n]["flops"] for n in t["name"]]
    # FLOPs at the depth sum to their parents': the blocks and their siblings to transformer's, all to the model's
    inside = ["transformer.wte", "transformer.wpe", "transformer.drop", *blocks, "transformer.ln_f"]
    assert sum(rows[n]["flops"] for n in inside) == rows["transformer"]["flops"]
    assert int(t["flops"].sum()) == rows[""]["flops"] == g["total_flops"]
    assert t["flops_share"].sum() == pytest.approx(1.0)
    assert t.set_index("name").loc["transformer.h.0", "n_params"] == sum(p.numel() for p in m.transformer.h[0].parameters())
    r = repeated_groups(t)
    assert list(r["group"]) == ["transformer.h.#/GPT2Block"] and int(r["modules"].iloc[0]) == 12
    assert r["flops"].iloc[0] == sum(rows[b]["flops"] for b in blocks)
    mods = module_frame(g)
    assert module_cut(mods, 2) == module_cut(mods, 3)
    assert len(module_cut(mods, 4)) == 4 * 12 + 5     # ln_1, attn, ln_2, mlp per block


def test_gpt2_module_graph_collapses_the_12_blocks_into_one_box_that_fits_a_screen(gpt2_12):
    _, g = gpt2_12
    mg = module_graph(g, 3)
    labels = [n["label"] for n in mg["nodes"]]
    assert labels == ["input", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0-11 x12",
                      "transformer.ln_f", "lm_head"]
    h = mg["nodes"][4]
    assert h["members"] == [f"transformer.h.{i}" for i in range(12)]
    assert h["flops"] == sum(r["flops"] for r in g["modules"] if r["name"] in h["members"])
    e = set(mg["edges"])
    assert {(0, 1), (1, 3), (2, 3), (3, 4), (4, 5), (5, 6)} == e
    assert graphview.box_labels(mg)[4].split("\n")[0] == "h.0-11 x12"
    fig = graphview.draw_module_graph(mg, "t")
    w, hgt = fig.get_size_inches()
    assert w * 100 <= 1280
    # the tooltip areas are where the boxes are drawn, titled with the full names
    fig.canvas.draw()
    boxes = [p for p in fig.axes[0].patches]
    areas = graphview.node_areas(mg)
    assert len(areas) == len(boxes) == len(mg["nodes"])
    W, H = fig.canvas.get_width_height()
    for a, b in zip(areas, boxes):
        bb = b.get_window_extent()
        assert a["left"] == pytest.approx(100 * bb.x0 / W, abs=0.3)
        assert a["top"] == pytest.approx(100 * (H - bb.y1) / H, abs=0.3)
        assert a["width"] == pytest.approx(100 * bb.width / W, abs=0.3)
    assert all(f"transformer.h.{i}," in areas[4]["title"] or f"transformer.h.{i})" in areas[4]["title"]
               for i in range(12))
    plots.close(fig)


def test_cnn_default_depth_splits_into_its_layers_and_the_fallback_rule():
    torch.manual_seed(0)
    g = record_graph(make_reference_cnn(), torch.randn(2, 3, 32, 32), time_repeats=0)
    rows = {r["name"]: r for r in g["modules"]}
    assert default_depth(g) == 2           # features.# Conv2d: 4 modules, most of the FLOPs
    t = module_table(g, 2)
    assert list(t["name"]) == [f"features.{i}" for i in range(11)] + [f"classifier.{i}" for i in range(4)]
    assert int(t["flops"].sum()) == rows[""]["flops"]
    assert rows["features"]["flops"] == sum(rows[f"features.{i}"]["flops"] for i in range(11))
    convs = t[t["group"] == "features.#/Conv2d"]
    assert list(convs["name"]) == ["features.0", "features.2", "features.5", "features.8"]
    assert convs["flops"].sum() / rows[""]["flops"] > 0.5
    assert np.isnan(t["time_s"]).all()    # not timed: NaN, drawn as "not timed"
    mg = module_graph(g, 2)
    assert len(mg["nodes"]) == 1 + 15 and all(len(n["members"]) == 1 for n in mg["nodes"][1:])   # nothing repeats in a row
    assert sorted(mg["edges"]) == [(i, i + 1) for i in range(15)]
    # no repeated group: the shallowest depth that splits the model in two or more
    fake = {"modules": [{"name": "", "type": "M", "depth": 0, "calls": 1, "flops": 10},
                        {"name": "a", "type": "A", "depth": 1, "calls": 1, "flops": 6},
                        {"name": "a.x", "type": "X", "depth": 2, "calls": 1, "flops": 6},
                        {"name": "b", "type": "B", "depth": 1, "calls": 1, "flops": 3}], "nodes": [], "edges": []}
    assert default_depth(fake) == 1
    ft = module_table(fake, 1)
    assert list(ft["name"]) == ["a", "b", OTHER_OPS] and list(ft["flops"]) == [6, 3, 1]   # sums to the model's 10


def test_heatmap_tooltips_one_per_row_on_the_rows_with_full_names_escaped():
    names = ["enc.layer.0.q", "enc.layer.0.k", 'enc.layer.1.<b>"x"&y', "enc.layer.1.k", "head"]
    df = pd.DataFrame([(s, i, n, 1.0 + i + s) for s in range(3) for i, n in enumerate(names)],
                      columns=["step", "layer_id", "layer", "l2"])
    fig = plots.heatmap_figure(plots.grad_heatmap, df)
    areas = plots.heatmap_areas(plots.grad_heatmap, df)
    fig.canvas.draw()
    ax = fig.axes[0]
    W, H = fig.canvas.get_width_height()
    assert [a["title"] for a in areas] == names
    for i, a in enumerate(areas):
        (_, y_top), (x_right, y_bot) = ax.transData.transform([(0, i), (ax.get_xlim()[1], i + 1)])
        assert a["top"] == pytest.approx(100 * (H - y_top) / H, abs=0.05)
        assert a["height"] == pytest.approx(100 * (y_top - y_bot) / H, abs=0.05)
        assert a["left"] + a["width"] == pytest.approx(100 * x_right / W, abs=0.05)
    # every label drawn inside the picture
    for t in ax.get_yticklabels():
        assert t.get_window_extent().x0 >= 0
    plots.close(fig)
    out = areas_html('<img src="x.png">', areas)
    assert out.count('class="tip"') == len(names)
    assert re.findall(r'title="([^"]*)"', out) == [html.escape(n, quote=True) for n in names]
    assert "<b>" not in out and areas_html("<img>", []) == "<img>"


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn") / "run"
    torch.manual_seed(0)
    m = make_reference_cnn()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with Recorder(m, str(d), graph=True, activations=True, weights_every=1) as rec:
        for _ in range(2):
            x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return str(d)


def _figure_html(index: str, stem: str) -> str:
    return re.search(rf'<figure>(?:(?!</figure>).)*id="fig-{stem}"(?:(?!</figure>).)*</figure>', index, re.S).group(0)


def test_cnn_report_modules_section_tooltips_and_activation_heatmaps(cnn_run, tmp_path, capsys):
    code, _, err = run_cli(["report", cnn_run, "--out", str(tmp_path), "--depth", "1", "--detail", "none",
                            "--jobs", "1"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    run = analyzer.open(cnn_run)
    g = read_graph(cnn_run)
    assert s["parameters"]["depth"] == 1 and s["modules"]["depth"] == 1 and s["modules"]["chosen"] == "option"
    assert [r["name"] for r in s["modules"]["rows"]] == ["features", "classifier"]
    csv = pd.read_csv(tmp_path / "tables" / "modules_at_depth.csv")
    want = module_table(g, 1)
    assert list(csv["name"]) == list(want["name"]) and list(csv["flops"]) == list(want["flops"])
    assert int(csv["flops"].sum()) == g["total_flops"]
    assert (tmp_path / "tables" / "graph.dot").read_text() == to_dot(g)      # the full op graph
    assert {"module_costs.png", "module_graph.png", "dead_fraction_heatmap.png", "saturation_heatmap.png"} \
        <= set(os.listdir(tmp_path / "figures"))
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    gl = run.grad_stats(by="layer")
    fig = _figure_html(index, "grad_heatmap")
    names = list(gl.drop_duplicates("layer_id").sort_values("layer_id")["layer"])
    assert re.findall(r'class="tip"[^>]*title="([^"]*)"', fig) == [html.escape(n, quote=True) for n in names]
    order = list(run.sites["name"])
    assert re.findall(r'class="tip"[^>]*title="([^"]*)"', _figure_html(index, "dead_fraction_heatmap")) == order
    assert len(re.findall(r'class="tip"', _figure_html(index, "module_graph"))) == 1 + 2
    # the dead fraction heatmap's cells are dead_per_step's values, site by site in forward order
    dps = A.dead_per_step(run)
    f = plots.heatmap_figure(plots.dead_fraction_heatmap, plots.site_rows(dps, order))
    img = np.ma.filled(f.axes[0].images[0].get_array(), np.nan)
    steps = sorted(dps["step"].unique())
    want = np.array([[dps[(dps["site"] == st) & (dps["step"] == k)]["dead_fraction"].iloc[0] for k in steps]
                     for st in order])
    np.testing.assert_allclose(img, want)
    plots.close(f)
    # saturation of the ReLU sites: the share of values <= 0, from the per-unit statistics
    sat = A.saturation(run)
    st = A.activation_stats(run, per="step")
    relu = [n for n, k in zip(run.sites["name"], run.sites["kind"]) if k == "relu"]
    assert relu and sorted(set(sat["site"])) == sorted(relu)
    f = plots.heatmap_figure(plots.saturation_heatmap, plots.site_rows(sat, order))
    img = np.ma.filled(f.axes[0].images[0].get_array(), np.nan)
    for r, site in enumerate(relu):
        for c, k in enumerate(steps):
            u = st[(st["site"] == site) & (st["step"] == k)]
            assert img[r, c] == pytest.approx(1 - (u["frac_active"] * u["count"]).sum() / u["count"].sum(), abs=1e-9)
    plots.close(f)
