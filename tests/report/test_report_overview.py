"""The report's overview (issue 17, item 1): every layer at once in layer x step heatmaps grouped by
block, every row labelled with its name less the common prefix; per-layer figures only for the detail
layers, on layers.html."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import helpers
from bbdecoder import analyzer
from bbdecoder.analyzer.report import build_report, plots

GPT2 = ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.1.ln_1",
        "transformer.h.1.mlp.c_fc", "transformer.ln_f", "lm_head"]


def test_names_shortened_by_their_common_prefix_and_grouped_by_block():
    assert plots.common_prefix(GPT2) == ""                       # lm_head shares nothing
    inner = GPT2[:-1]
    assert plots.common_prefix(inner) == "transformer."
    assert plots.short_names(inner)[:4] == ["wte", "wpe", "h.0.ln_1", "h.0.attn.c_attn"]
    assert [plots.block_of(n) for n in plots.short_names(inner)] == ["", "", "h.0", "h.0", "h.0", "h.0", "h.1",
                                                                     "h.1", ""]
    assert plots.block_of("bert.encoder.layer.11.attention.self.query") == "bert.encoder.layer.11"
    assert plots.common_prefix(["a.b", "a.b.c"]) == "a."             # each name keeps a component
    assert plots.short_names(["", "fc"]) == ["(model)", "fc"]
    assert plots.heatmap_height(150) >= 150 * plots.overview.ROW_INCHES


def test_layer_matrix_equals_a_numpy_pivot_with_binned_columns():
    rng = np.random.default_rng(0)
    steps, layers = np.arange(0, 1000, 2), [3, 1, 2]
    df = pd.DataFrame([(s, i, f"L{i}", float(rng.uniform(0.1, 10))) for s in steps for i in layers],
                      columns=["step", "layer_id", "layer", "l2"])
    df.loc[5, "l2"] = 0.0                                           # non-positive: blank in log10
    m, lay, first, n = plots.overview.layer_matrix(df, "l2", log=True, max_columns=100)
    assert list(lay["layer_id"]) == [1, 2, 3] and n == len(steps) and m.shape == (3, 100)
    col = (np.arange(len(steps)) * 100) // len(steps)
    for r, i in enumerate([1, 2, 3]):
        d = df[df["layer_id"] == i].sort_values("step")
        v = np.log10(np.where(d["l2"] > 0, d["l2"], np.nan))
        want = pd.Series(v).groupby(col).mean().to_numpy()
        np.testing.assert_allclose(m[r], want, rtol=1e-12)
    assert list(first[:3]) == [0, 10, 20]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    import torch
    from transformer_models import hf_gpt2, tokens
    from bbdecoder import Recorder
    d = tmp_path_factory.mktemp("ov")
    m = hf_gpt2()
    ids, _ = tokens(24)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with Recorder(m, str(d / "run"), weights_every=2) as rec:
        for i in range(0, 24, 4):
            loss = m(input_ids=ids[i:i + 4], labels=ids[i:i + 4]).loss
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return str(d / "run")


def test_default_report_has_the_overview_and_no_per_layer_figure(gpt2_run, tmp_path):
    run = analyzer.open(gpt2_run)
    s = build_report(run, str(tmp_path))
    figs = set(os.listdir(tmp_path / "figures"))
    assert {"grad_heatmap.png", "update_ratio_heatmap.png", "weight_l2_heatmap.png"} <= figs
    # per-layer figures by default only for the layers a finding points at
    found = (s["findings"] or {}).get("findings", [])
    flagged = {f["layer"] for f in found if f["severity"] != "skipped" and f["layer"]}
    keys = dict(zip(run.layers["name"], run.layers["key"]))
    per_layer = {f for f in figs if f.startswith(("grad_norms_", "weight_dist_"))}
    assert {f.split("_", 2)[2][:-4] for f in per_layer} <= {keys[n] for n in flagged if n in keys}
    assert s["parameters"]["detail"] is None
    # a run without activation statistics or a function graph: those figures skipped, each with a note
    notes = s["skipped"] + s["not_recorded"]
    for what in ("figure dead fraction heatmap: the trace has no activation statistics",
                 "figure saturation heatmap: the trace has no activation statistics",
                 "figure module graph: no function graph", "figure module FLOPs and time: no function graph"):
        assert any(n.startswith(what) for n in notes), what
    assert s["modules"] is None and "depth" in s["parameters"]
    (tmp_path / "none").mkdir()
    s0 = build_report(analyzer.open(gpt2_run), str(tmp_path / "none"), detail="none")
    assert not [f for f in s0["figures"] if "grad_norms_" in f or "weight_dist_" in f]
    assert not (tmp_path / "none" / "layers.html").exists()
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert index.index("Overview: every layer") < index.index("<h2>Loss</h2>")
    # every recorded layer has its own labelled row, in id order, named without the common prefix
    gl = run.grad_stats(by="layer")
    fig, ax = plots.new_figure(12, plots.heatmap_height(gl["layer_id"].nunique()))
    plots.grad_heatmap(gl, ax[0, 0])
    labels = [t.get_text() for t in ax[0, 0].get_yticklabels()]
    lay = gl.drop_duplicates("layer_id").sort_values("layer_id")
    shorts = plots.short_names(list(lay["layer"]))
    assert labels == [f"{i}: {n}" for i, n in zip(lay["layer_id"], shorts)]
    assert any(lab.endswith(": wte") for lab in labels) and not any("transformer." in lab for lab in labels)
    right = ax[0, 0].child_axes
    assert [t.get_text() for t in right[0].get_yticklabels()] == ["h.0", "h.1"]
    plots.close(fig)


def test_detail_layers_get_their_figures_on_layers_html(gpt2_run, tmp_path):
    run = analyzer.open(gpt2_run)
    s = build_report(run, str(tmp_path), detail="*.mlp.c_fc")
    want = run.layers[run.layers["name"].str.endswith(".mlp.c_fc")]
    figs = sorted(f for f in os.listdir(tmp_path / "figures") if f.startswith(("grad_norms_", "weight_dist_")))
    assert figs == sorted([f"grad_norms_{k}.png" for k in want["key"]] + [f"weight_dist_{k}.png" for k in want["key"]])
    detail = (tmp_path / "layers.html").read_text(encoding="utf-8")
    assert detail.count("<figure>") == 2 * len(want) == 4
    assert 'href="layers.html"' in (tmp_path / "index.html").read_text(encoding="utf-8")
    assert s["parameters"]["detail"] == "*.mlp.c_fc"
    # a second report without detail leaves layers.html as a stale file, listed
    s2 = build_report(analyzer.open(gpt2_run), str(tmp_path), detail="none")
    assert "layers.html" in s2["stale_files"]
