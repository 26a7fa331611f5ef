"""The transformer health rules on planted faults (issue 18 item 6): a tiny GPT-2 (eager attention)
whose layer-1 head-1 query weights are scaled up at a known step (its attention collapses onto one key)
and whose layer-1 MLP output bias puts one residual channel at about 1000x the median magnitude from
another known step. attention_entropy_collapse fires at that head and step only, massive_activations
and activation_kurtosis at that site and step; the healthy run of the same model (same seed, same
batches) stays quiet."""

from __future__ import annotations

import helpers  # noqa: F401

import pytest

torch = pytest.importorskip("torch")

from bbdecoder import analyzer  # noqa: E402
from bbdecoder.analyzer.activations import health as AH  # noqa: E402
from bbdecoder.recorder import Recorder  # noqa: E402

import transformer_models as TM  # noqa: E402

STEPS, COLLAPSE_AT, MASSIVE_AT = 14, 7, 10
LAYER, HEAD = 1, 1
SITE = f"transformer.h.{LAYER}.attn/softmax#0"
BLOCK = f"transformer.h.{LAYER}"


def _train(path, planted: bool):
    model = TM.hf_gpt2("eager", seed=0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    hd = TM.D // TM.HEADS
    with Recorder(model, path, activations=["activations", BLOCK], grads_every=0, weights_every=0,
                  activations_every=0) as rec:
        for i in range(STEPS):
            if planted and i == COLLAPSE_AT:   # Conv1D weight (d, 3d): columns [h*hd, (h+1)*hd) are head h's query
                with torch.no_grad():
                    model.transformer.h[LAYER].attn.c_attn.weight[:, HEAD * hd:(HEAD + 1) * hd] *= 3000.0
            if planted and i == MASSIVE_AT:    # one residual channel of the block's output far above the rest
                with torch.no_grad():
                    model.transformer.h[LAYER].mlp.c_proj.bias[5] = 50.0
            ids, _ = TM.tokens(4, seed=i)
            out = model(ids, labels=ids)
            out.loss.backward()
            rec.step(loss=out.loss)
            opt.step()
            opt.zero_grad()
    return analyzer.open(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("transformer_health")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny tensors: intra-op threads only contend on a shared machine
    try:
        return _train(d / "healthy", False), _train(d / "planted", True)
    finally:
        torch.set_num_threads(threads)


RULES = ["attention_entropy_collapse", "massive_activations", "activation_kurtosis"]


def test_planted_collapse_fires_at_the_head_and_step(runs):
    healthy, planted = runs
    f = planted.findings(rules="attention_entropy_collapse")
    assert len(f) == 1, f.to_string()
    r = f.iloc[0]
    assert (r["layer"], r["param"], r["first_step"], r["last_step"]) == (SITE, f"head {HEAD}", COLLAPSE_AT, STEPS - 1)
    # the value is the head's entropy at that step, independently from the table's raw sums
    e = AH.attention_entropy(planted, SITE)
    row = e[(e["head"] == HEAD) & (e["step"] == COLLAPSE_AT)].iloc[0]
    assert r["value"] == pytest.approx(row["entropy"]) and row["entropy"] < 0.3 * e["entropy"].iloc[0]
    assert row["logit_max"] > 10 * e[(e["head"] == HEAD) & (e["step"] == 0)]["logit_max"].iloc[0]
    assert len(healthy.findings(rules="attention_entropy_collapse")) == 0
    # thresholds re-applied offline: a fraction of 0.01 no longer flags it; a floor of 0.8 of log Tk
    # (a uniform causal head has about 0.69) flags every head from the first step
    assert len(planted.findings(rules="attention_entropy_collapse",
                                attention_entropy_collapse={"fraction": 0.0})) == 0
    low = healthy.findings(rules="attention_entropy_collapse", attention_entropy_collapse={"floor": 0.8})
    assert len(low) == TM.LAYERS * TM.HEADS and set(low["first_step"]) == {0}


def test_planted_massive_activation_and_kurtosis_fire_at_the_site_and_step(runs):
    healthy, planted = runs
    f = planted.findings(rules="massive_activations")
    assert list(f["layer"]) == [BLOCK] and f["first_step"].iloc[0] == MASSIVE_AT, f.to_string()
    h = AH.site_health(planted, BLOCK)
    at = h[h["step"] == MASSIVE_AT].iloc[0]
    assert at["massive_ratio"] > 500 and at["n_massive"] == 1   # channel 5
    assert f["value"].iloc[0] == pytest.approx(h["massive_ratio"].max())
    assert len(healthy.findings(rules="massive_activations")) == 0
    assert (AH.site_health(healthy)["massive_ratio"] < 30).all()
    # kurtosis: one channel of 32 at ~50 is a two-point mixture (1/p - 6 = 26 for p = 1/32)
    assert at["kurtosis"] == pytest.approx(26, rel=0.15)
    k = planted.findings(rules="activation_kurtosis", activation_kurtosis={"kurtosis": 10.0})
    assert list(k["layer"]) == [BLOCK] and k["first_step"].iloc[0] == MASSIVE_AT, k.to_string()
    assert len(healthy.findings(rules="activation_kurtosis", activation_kurtosis={"kurtosis": 10.0})) == 0


def test_rules_skip_traces_without_the_statistics(tmp_path):
    helpers.record_tiny(tmp_path / "cnn", epochs=1, steps_per_epoch=2, activations=True)
    run = analyzer.open(tmp_path / "cnn")
    f = run.findings(rules=RULES)
    by = dict(zip(f["rule"], f["severity"]))
    assert by["attention_entropy_collapse"] == "skipped"      # a CNN: no softmax site
    assert "eager" in f.loc[f["rule"] == "attention_entropy_collapse", "message"].iloc[0]
    assert by.get("massive_activations") != "skipped" and by.get("activation_kurtosis") != "skipped"
    assert len(AH.site_health(run)) == 2 * len(run.catalog.sites)
    # kurtosis judges no ReLU-family site (sparse by construction): at threshold 0 exactly the other
    # sites whose excess kurtosis (recomputed here from the per-step table) is ever above 0 fire
    h = AH.site_health(run)
    assert (h.loc[h["family"] == "relu", "kurtosis"] > 0).any()         # the exclusion is exercised
    want = set(h.loc[(h["family"] != "relu") & (h["kurtosis"] > 0), "site"])
    k = run.findings(rules="activation_kurtosis", activation_kurtosis={"kurtosis": 0.0})
    assert set(k.loc[k["severity"] == "info", "layer"]) == want


class _Rep:
    """What a report section sees of the report: its run, tables, figures and skips."""

    def __init__(self, run):
        self.run, self.tables, self.figures, self.skipped = run, {}, {}, []

    def table(self, name, df, description):
        self.tables[name] = df

    def figure(self, name, title, caption, draw, section, layer=None, areas=()):
        self.figures[name] = (draw, section)

    def skip(self, item, why):
        self.skipped.append(item)


def test_report_draws_entropy_per_head(runs):
    from bbdecoder.analyzer.report.sections import attention
    _, planted = runs
    rep = _Rep(planted)
    attention.add_entropy(rep)
    t = rep.tables["attention_entropy"]
    assert len(t) == STEPS * TM.LAYERS * TM.HEADS and set(t["site"]) == {f"transformer.h.{i}.attn/softmax#0"
                                                                          for i in range(TM.LAYERS)}
    draw, section = rep.figures["attention_entropy"]
    fig = draw()
    lines = [ax.get_lines() for ax in fig.axes if ax.get_visible()]
    assert len(lines) == TM.LAYERS and all(len(ln) == TM.HEADS for ln in lines)
    y = lines[LAYER][HEAD].get_ydata()   # the collapsed head's curve: its normalized entropy per step
    assert y[COLLAPSE_AT] < 0.05 < 0.6 < y[0]
    empty = _Rep(helpers_run_without_softmax(planted))
    attention.add_entropy(empty)
    assert not empty.tables and not empty.figures


def helpers_run_without_softmax(run):
    """The run with its softmax sites hidden (what a run without eager attention shows the section)."""
    class Cat:
        def __getattr__(self, k):
            return getattr(run.catalog, k)
        sites = [S for S in run.catalog.sites if S["kind"] != "softmax"]

    class R:
        catalog = Cat()
    return R()
