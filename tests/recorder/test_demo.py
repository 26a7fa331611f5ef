"""`bbdecoder demo` end to end: trains for real (loss falls), records, analyzes, reports."""

import json
import os

import numpy as np

from bbdecoder import analyzer
from helpers import run_cli


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", str(out)], capsys)
    assert code == 0, err
    index = out / "report" / "index.html"
    assert f"report: {index}" in stdout
    run = analyzer.open(out / "run")
    assert run.status == "complete"
    st = run.steps
    per_epoch = st.groupby("epoch")["loss"].mean().to_numpy()
    assert len(per_epoch) == 3 and per_epoch[-1] < 0.6 * per_epoch[0]  # it really learns
    assert np.all(np.isfinite(st["loss"]))
    g = run.grad_stats()
    assert set(g["step"]) == set(st["step"]) and g["layer"].nunique() == 6
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary and index.is_file()
    figs = os.listdir(out / "report" / "figures")
    assert "grad_flow.png" in figs and "grad_heatmap.png" in figs
    # a second demo into the same place is refused without --force, and the first is kept
    mtime = os.path.getmtime(out / "run" / "manifest.json")
    code, _, err = run_cli(["demo", "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert os.path.getmtime(out / "run" / "manifest.json") == mtime
