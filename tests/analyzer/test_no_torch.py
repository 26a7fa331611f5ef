"""The analyzer and `bbdecoder report` work with torch blocked (sys.modules['torch'] = None)."""

import helpers
import ast
import json
import os
import subprocess
import sys

import pytest

from helpers import record_tiny

ROOT = helpers.ROOT

CHILD = r"""
import sys, json
sys.modules["torch"] = None          # any 'import torch' now raises ImportError
sys.path.insert(0, ROOT)
from bbdecoder import analyzer
from bbdecoder.analyzer.cli import main
run = analyzer.open(RUN)
out = {
    "status": run.status,
    "steps": len(run.steps),
    "grad_rows": len(run.grad_stats()),
    "epoch_rows": len(run.grad_stats(per="epoch")),
    "weight_rows": len(run.weight_stats()),
    "hist": run.weight_histograms("head", bins=8).counts.sum().item(),
    "l2_sum": float(run.grad_stats()["l2"].sum()),
}
try:
    main(["report", RUN, "--out", OUT])
except SystemExit as e:
    out["report_exit"] = e.code
leaked = sorted(m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None)
out["leaked"] = leaked
print("RESULT", json.dumps(out))
"""


def test_analyzer_and_report_without_torch(tmp_path):
    run = str(tmp_path / "run")
    record_tiny(run, epochs=2, steps_per_epoch=3, weights_every=2)
    from bbdecoder import analyzer
    want = analyzer.open(run)
    code = CHILD.replace("ROOT", repr(ROOT)).replace("RUN", repr(run)).replace("OUT", repr(str(tmp_path / "rep")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert res.get("report_exit", 0) in (0, None), r.stderr[-2000:]
    assert res["leaked"] == []
    assert res["status"] == "complete" and res["steps"] == 6
    assert res["grad_rows"] == len(want.grad_stats()) == 6 * 5
    assert res["weight_rows"] == 3 * 5
    assert res["l2_sum"] == pytest.approx(float(want.grad_stats()["l2"].sum()), rel=1e-12)
    assert os.path.isfile(tmp_path / "rep" / "index.html")
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())


def test_no_module_under_analyzer_imports_torch():
    bad = []
    for dp, _, fs in os.walk(os.path.join(ROOT, "analyzer")):
        for f in fs:
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(dp, f), encoding="utf-8").read())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "torch" or n.startswith("torch.") for n in names):
                    bad.append(f"{f}:{node.lineno}")
    assert bad == []
