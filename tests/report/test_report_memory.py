"""Issue 16, the report's memory at 100,000 layers: a report whose gradient frames come from its own pass
(narrow per-parameter frame, columns let go of while pooling, frames emptied before the figures are drawn,
summary.json's per-layer records built JSON-safe) writes the same summary.json and the same tables as the
report through the run's cached frames. The thresholds are lowered so that a tiny recorded run takes that path."""

import json
import os

from helpers import record_tiny

import bbdecoder
from bbdecoder.analyzer.report import build_report
from bbdecoder.analyzer.report import data as RD


def _report(run_dir, out, own, monkeypatch):
    monkeypatch.setattr(RD, "MAX_LAYER_ROWS", 2)          # 3 layers: grouped rows, as past 300 layers
    monkeypatch.setattr(RD, "ROW_BUDGET", 5)              # per-step tables not written whole
    monkeypatch.setattr(RD, "OWN_PASS_LAYERS", 1 if own else 10 ** 9)
    seen = []
    real = RD.load_frames
    monkeypatch.setattr("bbdecoder.analyzer.report.build.load_frames", lambda *a: seen.append(real(*a)) or seen[-1])
    os.makedirs(out)
    s = build_report(bbdecoder.open(run_dir), out, jobs=1)
    assert seen[0].own_pass is own
    return s


def test_own_pass_report_equals_the_cached_one(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    record_tiny(run, epochs=2, steps_per_epoch=5, weights_every=2)
    a = _report(run, str(tmp_path / "a"), False, monkeypatch)
    b = _report(run, str(tmp_path / "b"), True, monkeypatch)
    ja, jb = (json.load(open(tmp_path / d / "summary.json")) for d in ("a", "b"))
    for j in (ja, jb, a, b):
        for k in ("created", "seconds"):
            j.pop(k)
        j["parameters"].pop("out_dir")
    assert ja == jb and a == b and a == ja and len(ja["layers"]) == 3
    assert any("grad_stats_step.csv" in s for s in ja["skipped"])       # the narrow frame's path was taken
    for t in ja["tables"]:
        assert (tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes(), t
    assert ja["figures"] == jb["figures"] and len(ja["figures"]) >= 5
