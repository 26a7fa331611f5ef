"""Findings settings (issue 18 items 1, 6): validation, TOML and RULE.KEY=VALUE, and re-evaluation
at new thresholds reading only statistics (a reader spy)."""

import pytest

import bbdecoder
from bbdecoder.analyzer import findings as F
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5ShardReader
from helpers import record_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("settings") / "run")
    # raw gradients, weight snapshots and raw activation samples every step, beside the statistics
    record_tiny(d, epochs=2, steps_per_epoch=6, grads_every=1, weights_every=1, activations=True,
                activations_every=1, flush_steps=4)
    return d


def spy(monkeypatch):
    seen = []
    for name in ("read_payload", "read_payload_steps"):
        orig = getattr(HDF5ShardReader, name)

        def wrapped(self, kind, lk, pk, *a, _orig=orig):
            seen.append(kind)
            return _orig(self, kind, lk, pk, *a)
        monkeypatch.setattr(HDF5ShardReader, name, wrapped)
    return seen


def test_findings_read_statistics_only_and_re_evaluate_from_memory(tiny, monkeypatch):
    seen = spy(monkeypatch)
    run = bbdecoder.open(tiny)
    a = run.findings()
    assert fmt.KIND_GRADS not in seen and fmt.KIND_ACTIVATIONS not in seen     # no raw gradient, no sample
    assert {fmt.KIND_GRAD_STATS, fmt.KIND_ACT_STATS} <= set(seen)
    # the weight norms and update ratios come from the snapshots once; new thresholds read nothing
    seen.clear()
    b = run.findings(vanishing_gradient={"relative": 0.99, "fraction": 0.0}, gradient_spike={"z": 0.1},
                     unchanged_weights={"tol": 10.0}, weight_update_ratio={"low": 0.0, "high": 1e-9})
    assert seen == []
    assert len(b) > len(a)          # the looser thresholds fire where the defaults did not
    g = run.grad_stats(by="layer")
    below_top = g["abs_mean"] < 0.99 * g.groupby("step")["abs_mean"].transform("max")
    assert set(b[b["rule"] == "vanishing_gradient"]["layer"]) == set(g.loc[below_top, "layer"])
    # the gradient table is the recorded statistics: the same numbers as the Run API's
    t = F.Tables(run)
    g = run.grad_stats()
    merged = t.grads.merge(g, on=["step", "layer", "param"], suffixes=("", "_api"))
    assert len(merged) == len(g)
    for c in ("l2", "abs_mean", "max_abs"):
        assert (merged[c] - merged[c + "_api"]).abs().max() <= 1e-6 * merged[c + "_api"].abs().max()


def test_unknown_rules_and_keys_name_the_known_ones(tiny):
    run = bbdecoder.open(tiny)
    with pytest.raises(ValueError, match="unknown rule 'nope' .known: nonfinite, vanishing_gradient"):
        run.findings(nope={"x": 1})
    with pytest.raises(ValueError, match=r"unknown setting gradient_spike.zz \(known: window, z, min_factor"):
        run.findings(gradient_spike={"zz": 1})
    with pytest.raises(ValueError, match=r"gradient_spike.window must be an integer"):
        run.findings(gradient_spike={"window": 2.5})
    with pytest.raises(ValueError, match=r"vanishing_gradient.fraction must be in \[0, 1\]"):
        run.findings(vanishing_gradient={"fraction": 2})
    with pytest.raises(ValueError, match="severity must be one of error, warning, info"):
        run.findings(nonfinite={"severity": "fatal"})
    with pytest.raises(ValueError, match="unknown rule 'x'"):
        run.findings(rules=["x"])


def test_severity_enabled_and_rule_selection(tiny):
    run = bbdecoder.open(tiny)
    df = run.findings(vanishing_gradient={"relative": 0.9, "fraction": 0.0, "severity": "error"})
    v = df[df["rule"] == "vanishing_gradient"]
    assert len(v) and (v["severity"] == "error").all()
    assert df["severity"].iloc[0] == "error"                         # severity first
    off = run.findings(vanishing_gradient={"relative": 0.9, "fraction": 0.0, "enabled": False})
    assert not (off["rule"] == "vanishing_gradient").any()
    only = run.findings(rules="vanishing_gradient", vanishing_gradient={"relative": 0.9, "fraction": 0.0})
    assert set(only["rule"]) == {"vanishing_gradient"}
    assert F.fails(df, "error") and F.fails(df, "warning")
    assert not F.fails(df.iloc[:0], "warning")


def test_toml_and_assignments(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text('[gradient_spike]\nz = 5.0\nseverity = "error"\n[loss_spike]\nenabled = false\n')
    s = F.load_settings(str(p))
    assert s == {"gradient_spike": {"z": 5.0, "severity": "error"}, "loss_spike": {"enabled": False}}
    s2 = F.parse_assignments(["gradient_spike.window=30", "nonfinite.severity=info", "loss_spike.enabled=true"], s)
    assert s2["gradient_spike"] == {"z": 5.0, "severity": "error", "window": 30}
    assert s2["nonfinite"] == {"severity": "info"} and s2["loss_spike"] == {"enabled": True}
    p.write_text("[gradient_spike\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        F.load_settings(str(p))
    with pytest.raises(ValueError, match="RULE.KEY=VALUE"):
        F.parse_assignments(["gradient_spike=3"])


def test_rule_without_data_is_listed_as_skipped(tmp_path):
    d = str(tmp_path / "noact")
    record_tiny(d, epochs=1, steps_per_epoch=4, grads_every=0, weights_every=0)
    df = bbdecoder.open(d).findings()
    sk = df[df["severity"] == F.SKIPPED].set_index("rule")["message"]
    assert set(sk.index) >= {"dead_units", "saturated_activations", "poor_initialization", "tensor_variance",
                             "weight_update_ratio", "unchanged_weights", "loss_not_decreasing"}
    assert "no activation statistics" in sk["dead_units"] and "no weight snapshots" in sk["unchanged_weights"]
    assert "fewer than 2 x window = 20 finite losses (4)" == sk["loss_not_decreasing"]
    assert (df["severity"].iloc[-len(sk):] == F.SKIPPED).all()       # skipped rows last
    assert not F.fails(df, "warning")


def test_every_rule_documents_its_defaults():
    import os
    from helpers import ROOT
    doc = open(os.path.join(ROOT, "docs", "findings.md"), encoding="utf-8").read().replace("\\|", "|")
    for name, R in F.RULES.items():
        assert f"`{name}`" in doc
        for k, t in R.thresholds.items():
            assert f"`{k}`" in doc and t.source.split(" (")[0] in doc, (name, k)


def test_report_opens_with_the_findings_and_summary_carries_them(tiny, tmp_path):
    import json
    import re

    import pandas as pd

    from bbdecoder.analyzer.report import build_report
    run = bbdecoder.open(tiny)
    out = tmp_path / "rep"
    out.mkdir()
    build_report(run, str(out), jobs=1)
    want = bbdecoder.open(tiny).findings()
    s = json.loads((out / "summary.json").read_text())
    got = pd.DataFrame(s["findings"]["findings"])
    assert list(got["rule"]) == list(want["rule"]) and list(got["severity"]) == list(want["severity"])
    assert list(got["first_step"].astype("Int64")) == list(want["first_step"])
    assert s["findings"]["counts"]["warning"] == int((want["severity"] == "warning").sum())
    assert "tables/findings.csv" in s["tables"]
    page = (out / "index.html").read_text()
    box = page.index('id="findings"')
    assert box < page.index("<h2>Summary</h2>") and box < page.index("<figure")
    fired = want[want["severity"] != F.SKIPPED]
    groups = F.group(want)
    # one entry per (rule, severity, message shape); summary.json keeps the groups beside every row
    assert page.count('<li class="warning">') == int((groups["severity"] == "warning").sum())
    assert groups["n"].sum() == len(fired)                      # every fired row in one group
    assert [(g["rule"], g["n"], g["worst_where"]) for g in s["findings"]["groups"]] == \
        list(zip(groups["rule"], groups["n"], groups["worst_where"]))
    body = page[box:page.index("</div>", box)]
    for g in groups[groups["n"] > 1].itertuples():
        assert f"<strong>{g.n} layers</strong>" in body and f"worst {g.worst_value:.3g} at <code>{g.worst_where}</code>" \
            in body
    # every link of the box points at an element that exists (index.html or the detail page)
    assert re.findall(r'<a href="([^"]+)">figure</a>', body)
    links = re.findall(r'<a href="([^"]+)">', body)
    for href in links:
        file, _, anchor = href.rpartition("#")
        target = (out / file).read_text() if file else page
        assert f'id="{anchor}"' in target, href


def test_vectorised_outliers_equal_the_one_by_one_definition():
    import numpy as np

    from bbdecoder.analyzer.findings import robust as R
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, w = int(rng.integers(1, 80)), int(rng.integers(5, 25))
        log = bool(trial % 2)
        x = np.exp(rng.normal(size=n)) if log else rng.normal(size=n) + 3
        if n > 30 and trial % 3 == 0:
            x[n // 2] *= 1e4                                             # an outlier: the exact path
        got = R.trailing_outliers(x, w, 3.5, 2.0 if log else 0.2, log=log)
        want = R._one_by_one(np.log10(x) if log else x, w, 3.5, 2.0 if log else 0.2, 5, log, 0.01)
        assert np.array_equal(got[0], want[0]), trial
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12)


def test_too_short_for_a_window_is_skipped_with_the_counts(tiny):
    df = bbdecoder.open(tiny).findings()
    sk = df[df["severity"] == F.SKIPPED].set_index("rule")["message"]
    assert sk["tensor_variance"] == "fewer than 2 x window = 20 recorded steps of any site (12)"
    assert sk["loss_not_decreasing"] == "fewer than 2 x window = 20 finite losses (12)"
    df = bbdecoder.open(tiny).findings(tensor_variance={"window": 6}, loss_not_decreasing={"window": 6})
    assert not df["rule"].isin(["tensor_variance", "loss_not_decreasing"])[df["severity"] == F.SKIPPED].any()
