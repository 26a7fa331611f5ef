"""scripts/gpu_check.py, the script a session lent a GPU runs once (its device time is short): its
``--cpu-smoke`` mode runs parts 1-3 on the CPU with a small GPT-2-style decoder, so that a broken
script is found here and not on the GPU. The gradient statistics it checks are compared with float64
torch on the same gradients (by the script); here the JSON it writes is checked."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import helpers

SCRIPT = f"{helpers.ROOT}/scripts/gpu_check.py"


def test_gpu_check_runs_on_the_cpu_and_checks_the_statistics(tmp_path):
    out = tmp_path / "gc.json"
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--models", "gpt2", "--batch", "2", "--rounds", "2",
                        "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=helpers.ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    (model, r), = res["models"].items()
    assert model == "gpt2-2x64"
    recorded = ["default", "grad_stats_only", "raw_grads_every_step", "activations"]
    assert sorted(r["ms_per_step"]) == sorted(recorded + ["baseline", "baseline_2"])
    assert r["status"] == {k: "complete" for k in recorded}
    assert r["sync_debug_error_mode_ok"]
    assert r["grad_stats_vs_torch_max_rel_diff"] < 1e-5       # per-parameter L2, max |g|, mean vs float64
    for k in recorded:
        med, lo, hi = r["ratio_vs_both_baselines_paired"][k]
        assert lo <= med <= hi and r["ms_per_step"][k] > 0
    assert "| gpt2-2x64 | default |" in p.stdout                  # the markdown table for the README
