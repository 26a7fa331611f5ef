"""The dask engine (issue 5, section 4): the same per-shard accumulators mapped over the shards on a
local dask cluster give the local engine's numbers, which match numpy on the recorded tensors."""

import helpers
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from helpers import record_tiny, run_cli, stats64

import distributed  # the 'dask' extra, part of the dev extra

from bbdecoder import analyzer

ROOT = helpers.ROOT


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """3 epochs x 4 steps, a shard every 3 steps (epochs and weight snapshots span shard borders)."""
    d = tmp_path_factory.mktemp("dask")
    run = str(d / "run")
    cap = record_tiny(run, epochs=3, steps_per_epoch=4, weights_every=2, flush_steps=3, seed=3)
    return run, cap


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c
    # distributed leaves its offload thread running for the life of the process; the analyzer then
    # (rightly) runs its passes in one process, since fork() beside a live thread is not safe. Stop
    # it so that later tests (tests/analyzer/test_engine_parallel.py) see a process without threads.
    from distributed import utils as dask_utils
    dask_utils._offload_executor.shutdown(wait=True)


def _dask_run(path, client):
    r = analyzer.open(path, engine="dask")
    r.dask_client = client
    return r


def test_dask_equals_local_and_numpy(multi, client):
    path, cap = multi
    local, dk = analyzer.open(path), _dask_run(path, client)
    assert len(local.catalog.shards) >= 4     # several shards, several tasks
    g, gd = local.grad_stats(), dk.grad_stats()
    pd.testing.assert_frame_equal(g, gd, rtol=1e-12)
    e, ed = local.grad_stats(per="epoch"), dk.grad_stats(per="epoch")
    pd.testing.assert_frame_equal(e, ed, rtol=1e-12)
    w, wd = local.weight_stats(), dk.weight_stats()
    pd.testing.assert_frame_equal(w, wd, rtol=1e-12)
    pd.testing.assert_frame_equal(local.grad_stats(by="layer"), dk.grad_stats(by="layer"), rtol=1e-12)

    # against numpy on the tensors captured in the training loop
    assert len(gd) == sum(len(v) for v in cap["grads"].values())
    for row in gd.itertuples(index=False):
        want = stats64(cap["grads"][(row.layer, row.param)][row.step])
        for c in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
            # from the gradient statistics computed on the device (float32 partial sums)
            np.testing.assert_allclose(getattr(row, c), want[c], rtol=1e-6, atol=1e-6 * want["abs_mean"], err_msg=c)
    for row in ed.itertuples(index=False):
        steps = [s for s, ep in cap["epochs"].items() if ep == row.epoch]
        x = np.stack([cap["grads"][(row.layer, row.param)][s].astype(np.float64).ravel() for s in steps])
        np.testing.assert_allclose(row.grad_noise, x.var(0).mean(), rtol=1e-9)
        l2 = np.sqrt((x ** 2).sum(1))
        np.testing.assert_allclose(row.l2_var, l2.var(), rtol=1e-5, atol=1e-6 * l2.mean() ** 2)
        assert row.n_steps == len(steps)
    for (layer, param), snaps in cap["weights"].items():
        got = wd[(wd["layer"] == layer) & (wd["param"] == param)].sort_values("step")
        steps = sorted(snaps)
        assert got["step"].tolist() == steps
        ratios = [np.nan] + [np.linalg.norm(snaps[b].astype(np.float64) - snaps[a].astype(np.float64))
                             / np.linalg.norm(snaps[a].astype(np.float64)) for a, b in zip(steps, steps[1:])]
        np.testing.assert_allclose(got["update_ratio"].to_numpy(), ratios, rtol=1e-9)
        np.testing.assert_allclose(got["std"].to_numpy(), [stats64(snaps[s])["std"] for s in steps], rtol=1e-9)


def test_cli_report_engine_dask(multi, client, tmp_path, capsys):
    path, _ = multi
    out = tmp_path / "rep"
    code, stdout, err = run_cli(["report", path, "--out", str(out), "--engine", "dask"], capsys)
    assert code == 0, err
    local = analyzer.open(path)
    for t, want in (("grad_stats_step", local.grad_stats()), ("grad_stats_epoch", local.grad_stats(per="epoch")),
                    ("weight_stats", local.weight_stats())):
        got = pd.read_csv(out / "tables" / f"{t}.csv")
        pd.testing.assert_frame_equal(got, want, rtol=1e-12, check_dtype=False)


def test_engine_option_bad_value(multi, tmp_path, capsys):
    code, _, err = run_cli(["report", multi[0], "--out", str(tmp_path / "o"), "--engine", "spark"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="engine must be one of"):
        analyzer.open(multi[0], engine="spark")


NO_DASK = r"""
import sys
sys.modules["dask"] = None
sys.modules["distributed"] = None
sys.path.insert(0, ROOT)
from bbdecoder.analyzer.cli import main
main(["report", RUN, "--out", OUT, "--engine", "dask"])
"""

IMPORTS = r"""
import sys
sys.path.insert(0, ROOT)
import bbdecoder.analyzer.cli, bbdecoder.analyzer.report, bbdecoder.analyzer.engine
from bbdecoder import analyzer
run = analyzer.open(RUN)
run.grad_stats(); run.weight_stats()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed")))
"""


def test_without_dask_one_line_error(multi, tmp_path):
    out = tmp_path / "never"
    code = NO_DASK.replace("ROOT", repr(ROOT)).replace("RUN", repr(multi[0])).replace("OUT", repr(str(out)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "dask" in lines[0] and "pip install" in lines[0], r.stderr
    assert not out.exists()      # nothing written


def test_dask_imported_lazily(multi):
    code = IMPORTS.replace("ROOT", repr(ROOT)).replace("RUN", repr(multi[0]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
