"""Dead-unit and saturation rules per activation kind (issue 15, item 3): GELU/SiLU are judged by their
own dead band, never by the ReLU rule, on planted units against a numpy computation; a fresh BERT is
not flagged; `bbdecoder info`, `saturation` and the report say when attention was not observable."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder import analyzer
from bbdecoder.analyzer.activations import (dead_counts, dead_mask, dead_per_step, dead_units, saturation,
                                            saturation_layers)
from bbdecoder.analyzer.report.data import dead_sweep
from bbdecoder.analyzer.activations.deadunits import DEAD_FLOOR
from bbdecoder.analyzer.activations.sites import RELU_KINDS, SMOOTH_KINDS, attention_note
from bbdecoder.recorder import Recorder
from bbdecoder.recorder import activation_kinds as K
from helpers import manifest_edit, run_cli

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import transformer_models as tm  # noqa: E402

# ----------------------------------------------------------------------------- the smooth kinds, by hand

SIG = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
PHI = np.vectorize(lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))))
FUN = {"gelu": lambda x: x * PHI(x),
       "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
       "quick_gelu": lambda x: x * SIG(1.702 * x), "silu": lambda x: x * SIG(x),
       "mish": lambda x: x * np.tanh(np.log1p(np.exp(x)))}


def tail_floor(f):
    """|f(x_t)|, x_t the leftmost x with f'(x) = -0.01 (central differences, bisection on [-30, argmin f'])."""
    d = lambda x: (f(np.array([x + 1e-6])) - f(np.array([x - 1e-6])))[0] / 2e-6  # noqa: E731
    xs = np.linspace(-30, 0, 30001)
    lo, hi = -30.0, float(xs[np.argmin([d(x) for x in xs[::10]]) * 10])
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > -0.01 else (lo, mid)
    return abs(f(np.array([lo]))[0])


def test_dead_floor_is_the_output_where_the_flat_tail_starts():
    assert set(DEAD_FLOOR) == set(SMOOTH_KINDS) == set(K.SMOOTH_KINDS)
    assert set(RELU_KINDS) == set(K.RELU_FAMILY)
    for kind, f in FUN.items():
        assert DEAD_FLOOR[kind] == pytest.approx(tail_floor(f), rel=1e-3), kind


# ----------------------------------------------------------------------------- planted units

class Planted(nn.Module):
    """fc (4 -> 4) then an activation: unit 0 inputs all about -8 (the flat tail), unit 1 inputs in
    [-0.65, -0.35] (never positive, not in the tail), unit 2 inputs x[:, 2] (healthy), unit 3 always 0."""

    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = act
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([-8.0, -0.5, 0.0, 0.0]))
            self.fc.weight[0, 0], self.fc.weight[1, 1], self.fc.weight[2, 2] = 0.1, 0.05, 1.0

    def forward(self, x):
        h = self.fc(x)
        return self.act(h) + self.relu(h)


def record_planted(tmp_path, act, steps=3):
    model = Planted(act)
    outs = {"act": [], "relu": []}
    for n in outs:
        getattr(model, n).register_forward_hook(lambda m, a, o, n=n: outs[n].append(o.detach().double().numpy()))
    g = torch.Generator().manual_seed(0)
    with Recorder(model, tmp_path / "run", grads_every=None, weights_every=None, activations=True,
                  activations_every=None) as rec:
        for _ in range(steps):
            model(torch.randn(64, 4, generator=g).clamp(-3, 3)).sum().backward()
            rec.step()
    return analyzer.open(tmp_path / "run"), outs


@pytest.mark.parametrize("act,kind", [(nn.GELU(), "gelu"), (nn.SiLU(), "silu")])
def test_planted_smooth_units_dead_band_apoz_dormant_against_numpy(tmp_path, act, kind):
    run, outs = record_planted(tmp_path, act)
    h = np.concatenate(outs["act"])
    floor = tail_floor(FUN[kind])
    want = (h.max(0) <= 0) & (h.min(0) >= -floor)
    np.testing.assert_array_equal(want, [True, False, False, True])     # by hand: tail and constant units
    du = dead_units(run, "strict", sites="act").sort_values("unit")
    assert (du["kind"] == kind).all()
    np.testing.assert_array_equal(du["dead"], want)
    np.testing.assert_allclose(du["max"], h.max(0), rtol=1e-6)
    # the ReLU rule ("never above 0") alone would call unit 1 dead: its outputs reach the GELU/SiLU minimum
    assert h[:, 1].max() <= 0 and h[:, 1].min() < -0.1
    # per step, and with max_active_fraction: the same band
    per = [(x.max(0) <= 0) & (x.min(0) >= -floor) for x in outs["act"]]
    np.testing.assert_array_equal(dead_mask(run, "act")[1], np.array(per))
    np.testing.assert_allclose(dead_per_step(run, sites="act")["dead_fraction"], np.mean(per, 1))
    du = dead_units(run, "strict", max_active_fraction=0.2, sites="act").sort_values("unit")
    np.testing.assert_array_equal(du["dead"], ((h > 0).mean(0) <= 0.2) & (h.min(0) >= -floor))
    # APoZ: not judged for smooth kinds; the ReLU control keeps its rule
    du = dead_units(run, "apoz", 0.9).set_index(["site", "unit"]).sort_index()
    assert du.loc["act", "score"].isna().all() and not du.loc["act", "dead"].any()
    r = np.concatenate(outs["relu"])
    np.testing.assert_allclose(du.loc["relu", "score"], (r <= 0).mean(0), atol=1e-12)
    # dormant: E|h_i| / mean_k E|h_k|, as for any kind
    du = dead_units(run, "dormant", 0.1, sites="act").sort_values("unit")
    e = np.abs(h).mean(0)
    np.testing.assert_allclose(du["score"], e / e.mean(), rtol=1e-9)
    # saturation: not judged (no rows); the ReLU control: the share <= 0
    sat = saturation(run, per_unit=True)
    assert set(sat["site"]) == {"relu"}
    np.testing.assert_allclose(sat.sort_values(["step", "unit"])["saturated"],
                               np.concatenate([(x <= 0).mean(0) for x in outs["relu"]]), atol=1e-12)
    assert list(saturation_layers(run)["site"]) == ["relu"]
    assert dict(zip(run.sites["name"], run.sites["family"])) == {"act": "smooth", "relu": "relu"}


def test_old_trace_calling_gelu_family_relu_is_judged_by_kind(tmp_path):
    run, outs = record_planted(tmp_path, nn.GELU(), steps=2)

    def old(m):
        for S in m["sites"]:
            S["family"] = "relu"     # what traces written before the smooth family say
    old_run = analyzer.open(manifest_edit(old)(tmp_path / "run", tmp_path))
    assert list(saturation_layers(old_run)["site"]) == ["relu"]
    assert old_run.sites.set_index("name").loc["act", "family"] == "smooth"
    np.testing.assert_array_equal(dead_units(old_run, sites="act")["dead"], dead_units(run, sites="act")["dead"])
    assert len(analyzer.activations.select_sites(old_run, "smooth")) == 1


# ----------------------------------------------------------------------------- a fresh BERT

def test_fresh_bert_gelu_is_neither_saturated_nor_dead(tmp_path):
    model = tm.hf_bert("eager")
    L = "bert.encoder.layer.{}.intermediate.intermediate_act_fn"
    outs = {L.format(i): [] for i in range(2)}
    for n in outs:
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs[n].append(o.detach().double()))
    ids, y = tm.tokens(8)
    with Recorder(model, tmp_path / "run", grads_every=None, weights_every=None, activations=True,
                  activations_every=None) as rec:
        for _ in range(2):
            model(input_ids=ids, labels=y).loss.backward()
            rec.step()
    run = analyzer.open(tmp_path / "run")
    sl = saturation_layers(run)
    assert not sl["flagged"].any() and not any(s in outs for s in sl["site"])
    h0 = torch.cat(outs[L.format(0)]).reshape(-1, 64).numpy()
    assert 0.4 < (h0 <= 0).mean() < 0.7     # what the ReLU rule called "saturated" (0.547 in the issue)
    du = dead_units(run, sites="gelu")
    for n, o in outs.items():
        h = torch.cat(o).reshape(-1, 64).numpy()
        want = (h.max(0) <= 0) & (h.min(0) >= -DEAD_FLOOR["gelu"])
        np.testing.assert_array_equal(du[du["site"] == n].sort_values("unit")["dead"], want)
        assert not want.any()


# ----------------------------------------------------------------------------- the sdpa note in the CLI and report

@pytest.fixture(scope="module")
def sdpa_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdpa") / "run"
    model = tm.tiny_gpt2()
    ids, _ = tm.tokens(2)
    with Recorder(model, d, grads_every=None, weights_every=None, grad_stats_every=None, activations=True,
                  activations_every=None) as rec:
        model(ids).float().pow(2).mean().backward()
        rec.step()
    return d


def test_cli_info_and_saturation_say_attention_was_not_observable(sdpa_run, tmp_path, capsys):
    code, out, err = run_cli(["info", str(sdpa_run)], capsys)
    assert code == 0, err
    note = [ln for ln in out.splitlines() if ln.startswith("note")]
    assert len(note) == 1 and "attention probabilities were not observable" in note[0]
    assert "blocks.0.attn, blocks.1.attn" in note[0] and 'attn_implementation="eager"' in note[0]
    code, out, _ = run_cli(["info", str(sdpa_run), "--json"], capsys)
    assert json.loads(out)["attention_note"] == attention_note(analyzer.open(sdpa_run))
    code, out, _ = run_cli(["saturation", str(sdpa_run)], capsys)
    assert code == 0 and "not judged: 2 site(s) of kind gelu" in out and "not observable" in out
    code, out, _ = run_cli(["dead", str(sdpa_run), "--criterion", "apoz", "--threshold", "0.5"], capsys)
    assert code == 0 and "not judged: APoZ counts zeros, which gelu never output" in out
    run, _ = record_planted(tmp_path, nn.GELU(), steps=1)        # no attention at all: no note
    code, out, _ = run_cli(["info", str(tmp_path / "run"), "--json"], capsys)
    assert json.loads(out)["attention_note"] is None and attention_note(run) is None


def test_report_says_attention_was_not_observable(sdpa_run, tmp_path):
    from bbdecoder.analyzer.report import build_report
    s = build_report(analyzer.open(sdpa_run), tmp_path)
    note = attention_note(analyzer.open(sdpa_run))
    assert s["activations"]["attention_note"] == note
    assert sum("ttention probabilities were not observable" in x for x in s["not_recorded"]) == 1
    assert "not observable" in (tmp_path / "index.html").read_text()
    assert {r["site"]: r["saturated"] for r in s["activations"]["sites"]} == {"blocks.0.mlp.1": None,
                                                                            "blocks.1.mlp.1": None}


def test_attention_unobserved_from_a_hostile_manifest(sdpa_run, tmp_path, capsys):
    from bbdecoder.analyzer.trace.format import TraceError
    bad = manifest_edit(lambda m: m.update(attention_unobserved=[1]))(sdpa_run, tmp_path / "a")
    with pytest.raises(TraceError, match="attention_unobserved"):
        analyzer.open(bad).catalog.manifest
    esc = manifest_edit(lambda m: m.update(attention_unobserved=["a\x1b[31mred"] * 6))(sdpa_run, tmp_path / "b")
    code, out, _ = run_cli(["info", str(esc)], capsys)
    assert code == 0 and "\x1b" not in out and "and 2 more" in out


def test_dead_counts_at_many_values_against_numpy_and_dead_units(tmp_path):
    """dead_counts (the report's pruning sweep: each site's statistics pooled once, judged at every
    value) counts the units that numpy finds dead on the recorded outputs, and that dead_units finds at
    each value on its own, for every criterion, a smooth kind and a ReLU."""
    run, outs = record_planted(tmp_path, nn.GELU())
    h, r = np.concatenate(outs["act"]), np.concatenate(outs["relu"])
    floor = tail_floor(FUN["gelu"])
    ts = [0.0, 0.01, 0.5, 1.0, 2.5]
    cases = {
        ("strict", "threshold"): (ts, lambda x, t, smooth: rule_strict(x, t, floor, smooth)),
        ("strict", "max_active_fraction"): ([0.0, 0.2, 0.6, 1.0], lambda x, f, smooth: ((x > 0).mean(0) <= f) & (
            (x.min(0) >= -floor) | (not smooth))),
        ("apoz", "threshold"): ([0.0, 0.5, 0.9, 1.0], lambda x, t, smooth: np.zeros(4, bool) if smooth else (
            (x <= 0).mean(0) >= t)),
        ("dormant", "threshold"): ([0.0, 0.1, 0.5, 1.0], lambda x, t, smooth: (
            np.abs(x).mean(0) / np.abs(x).mean(0).mean() <= t)),
    }
    for (crit, param), (vals, rule) in cases.items():
        got = dead_counts(run, crit, vals, param)
        assert list(got.columns) == ["value", "site", "kind", "units", "dead"]
        assert list(got["value"]) == [v for v in vals for _ in range(2)]          # values in order, sites in order
        assert list(got["site"]) == ["act", "relu"] * len(vals) and (got["units"] == 4).all()
        for v in vals:
            row = got[got["value"] == v].set_index("site")["dead"]
            assert row["act"] == int(rule(h, v, True).sum()) and row["relu"] == int(rule(r, v, False).sum()), (crit, v)
            kw = {"max_active_fraction": v} if param == "max_active_fraction" else {"threshold": v}
            du = dead_units(run, crit, **kw)
            assert row.to_dict() == du.groupby("site")["dead"].sum().to_dict()
    # the report's sweep table: the same counts, with the pooled row
    sw = dead_sweep(run, "strict", 0.0, values=ts)
    for v in ts:
        part = sw[sw["threshold"] == v].set_index("site")
        want_act, want_relu = int(rule_strict(h, v, floor, True).sum()), int(rule_strict(r, v, floor, False).sum())
        assert (part.loc["act", "dead"], part.loc["relu", "dead"]) == (want_act, want_relu)
        assert part.loc["(all sites)", "dead"] == want_act + want_relu
        assert part.loc["(all sites)", "sparsity"] == pytest.approx((want_act + want_relu) / 8)
    with pytest.raises(ValueError, match="param"):
        dead_counts(run, "strict", [0.0], "layer_share")
    with pytest.raises(ValueError, match="APoZ threshold"):
        dead_counts(run, "apoz", [0.5, 2.0])


def rule_strict(x, t, floor, smooth):
    """Dead under strict at threshold t on raw outputs x (n, U): never above t (smooth kinds: and never below -floor)."""
    return (x.max(0) <= t) & ((x.min(0) >= -floor) | (not smooth))
