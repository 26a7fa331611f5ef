"""`bbdecoder check` (a CI gate over the health rules) and `bbdecoder compare` (issue 18 items 1, 4)."""

import json
import os

import pytest

import bbdecoder
from bbdecoder.analyzer import findings as F
from helpers import record_tiny, run_cli

NAN_AT = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("check")
    out = {}
    for name, kw in (("ok", {}), ("ok_again", {}), ("nan", {"nan_at": NAN_AT})):
        out[name] = str(base / name)
        record_tiny(out[name], epochs=2, steps_per_epoch=6, grads_every=0, weights_every=1, activations=True,
                    activations_every=0, **kw)
    return out


def test_check_exit_codes_follow_fail_on(runs, capsys):
    df = bbdecoder.open(runs["ok"]).findings()
    worst = set(df["severity"]) - {F.SKIPPED}
    assert "error" not in worst and "warning" in worst     # Tiny's default init: warnings, no error
    code, out, err = run_cli(["check", runs["ok"]], capsys)   # --fail-on error by default
    assert code == 0 and err == "" and out.strip().endswith("--fail-on error: pass")
    groups = F.group(df)   # grouped by default: one line per rule and message shape, its worst place first
    assert sum(line.startswith("WARNING ") for line in out.splitlines()) == (groups["severity"] == "warning").sum()
    for g in groups.itertuples(index=False):
        assert f"{g.severity.upper():8s}{g.rule} {g.worst_where}" in out
        assert g.n == 1 or f"{g.worst_where} and {g.n - 1} more" in out
    code, out, _ = run_cli(["check", runs["ok"], "--each"], capsys)   # one line per finding
    assert code == 0 and sum(line.startswith("WARNING ") for line in out.splitlines()) == (df["severity"] == "warning").sum()
    assert sum(line.startswith("SKIPPED ") for line in out.splitlines()) == (df["severity"] == "skipped").sum()
    code, out, _ = run_cli(["check", runs["ok"], "--fail-on", "warning"], capsys)
    assert code == 1 and out.strip().endswith("FAIL")
    code, out, _ = run_cli(["check", runs["nan"]], capsys)
    assert code == 1
    assert f"ERROR   nonfinite head.weight steps {NAN_AT}-{NAN_AT}: gradient NaN/Inf" in out


def test_check_json_and_settings(runs, capsys, tmp_path):
    code, out, _ = run_cli(["check", runs["nan"], "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["failed"] and doc["fail_on"] == "error"
    nf = [f for f in doc["findings"] if f["rule"] == "nonfinite"]
    assert nf == [{"rule": "nonfinite", "severity": "error", "layer": "head", "param": "weight",
                   "first_step": NAN_AT, "last_step": NAN_AT, "n_steps": 1, "value": 3.0, "threshold": 0.0,
                   "message": f"gradient NaN/Inf in head.weight from step {NAN_AT} (3 values in 1 steps)"}]
    assert doc["counts"]["error"] == 1
    # the nonfinite rule lowered to info by a rules file, then raised again by --set
    rules = tmp_path / "rules.toml"
    rules.write_text('[nonfinite]\nseverity = "info"\n')
    code, out, _ = run_cli(["check", runs["nan"], "--rules", str(rules), "--json"], capsys)
    assert code == 0 and json.loads(out)["counts"]["error"] == 0
    code, _, _ = run_cli(["check", runs["nan"], "--rules", str(rules), "--set", "nonfinite.severity=error"], capsys)
    assert code == 1
    code, out, _ = run_cli(["check", runs["nan"], "--set", "nonfinite.enabled=false", "--json"], capsys)
    assert code == 0 and not any(f["rule"] == "nonfinite" for f in json.loads(out)["findings"])


@pytest.mark.parametrize("argv, words", [
    (["--set", "nope.x=1"], "unknown rule 'nope' (known: nonfinite, vanishing_gradient"),
    (["--set", "gradient_spike.zz=1"], "unknown setting gradient_spike.zz (known: window, z, min_factor"),
    (["--set", "gradient_spike"], "a setting is RULE.KEY=VALUE"),
    (["--set", "gradient_spike.z=abc"], "gradient_spike.z must be a number"),
    (["--rules", "MISSING"], "No such file"),
    (["--fail-on", "info"], "Invalid value for '--fail-on'"),
])
def test_check_usage_errors_exit_2_with_one_line(runs, capsys, argv, words):
    code, out, err = run_cli(["check", runs["ok"], *argv], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and words in err, err


def test_check_bad_run_and_bad_toml(tmp_path, capsys):
    code, _, err = run_cli(["check", str(tmp_path / "absent")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n")
    code, _, err = run_cli(["check", str(tmp_path), "--rules", str(bad)], capsys)
    assert code == 2 and "is not valid TOML" in err and len(err.strip().splitlines()) == 1


def test_compare_cli(runs, capsys, tmp_path):
    out = tmp_path / "cmp"
    code, text, err = run_cli(["compare", runs["ok"], runs["ok_again"], "--out", str(out)], capsys)
    assert code == 0, err
    assert "similar_across_runs: yes (12 aligned steps" in text
    files = sorted(os.listdir(out))
    assert files == sorted(["divergence.csv", "series.csv", "summary.json", "compare_act_rms.png",
                            "compare_act_std.png", "compare_grad_norm.png", "compare_loss.png",
                            "compare_update_ratio.png"])
    s = json.loads((out / "summary.json").read_text())
    assert s["similar_across_runs"] is True and s["diverged"] == [] and s["steps"] == 12
    # a non-empty --out is refused without --force, and nothing in it changes
    before = {f: os.path.getmtime(out / f) for f in files}
    code, _, err = run_cli(["compare", runs["ok"], runs["nan"], "--out", str(out)], capsys)
    assert code == 2 and "--out" in err and "--force" in err
    assert {f: os.path.getmtime(out / f) for f in files} == before
    # the JSON verdict is the library's
    code, text, _ = run_cli(["compare", runs["ok"], runs["nan"], "--json", "--tolerance", "0.01", "--window", "1"],
                            capsys)
    from bbdecoder.analyzer.compare import compare
    lib = compare(bbdecoder.open(runs["ok"]), bbdecoder.open(runs["nan"]), tolerance=0.01, window=1).summary()
    got = json.loads(text)
    assert code == 0 and got["similar_across_runs"] == lib["similar_across_runs"]
    assert got["diverged"] == json.loads(json.dumps(lib["diverged"]))
