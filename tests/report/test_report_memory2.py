"""Issue 16, the report's memory at 100,000 layers: the per-epoch table of the per-(step, layer) statistics
(report.data.epoch_means) grouped by one integer per row instead of hashing layer names: the same frame, bit for
bit, as the plain pandas groupby of (epoch, layer_id, layer) it replaces."""

import numpy as np
import pandas as pd
import pytest

from bbdecoder.analyzer.report import data as RD


def plain_epoch_means(df, keys):
    by = [c for c in ("rank",) if c in df.columns] + ["epoch"] + keys
    g = df.groupby(by, sort=True)
    out = g.agg(numel=("numel", "last"), n_steps=("step", "size"), count=("count", "sum"),
                nonfinite=("nonfinite", "sum"), mean=("mean", "mean"), abs_mean=("abs_mean", "mean"),
                max_abs=("max_abs", "max"), var=("var", "mean"), l1=("l1", "mean"), l2=("l2", "mean")).reset_index()
    out["l2_var"] = g["l2"].var(ddof=0).to_numpy()
    return out


@pytest.mark.parametrize("ranks", [False, True])
def test_epoch_means_equal_the_plain_groupby(ranks):
    rng = np.random.default_rng(5 + ranks)
    rows = [(r, st, st // 4, lid, f"b.{lid // 7}.{lid}") for r in ((0, 1) if ranks else (0,)) for st in range(12)
            for lid in range(90) if (st + lid) % 9]
    df = pd.DataFrame(rows, columns=["rank", "step", "epoch", "layer_id", "layer"])
    if not ranks:
        df = df.drop(columns="rank")
    n = len(df)
    df["numel"], df["count"], df["nonfinite"] = 20, rng.integers(0, 21, n), rng.integers(0, 3, n)
    for c in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
        df[c] = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)
        df.loc[rng.random(n) < 0.07, c] = np.nan
    got = RD.epoch_means(df, ["layer_id", "layer"])
    pd.testing.assert_frame_equal(got, plain_epoch_means(df, ["layer_id", "layer"]), check_exact=True)
    assert len(got) == (2 if ranks else 1) * 3 * 90
    # numpy: one group's numbers
    d = df[(df["epoch"] == 1) & (df["layer_id"] == 11)]
    if ranks:
        d = d[d["rank"] == 0]
    r = got[(got["epoch"] == 1) & (got["layer_id"] == 11)].iloc[0]
    assert r["n_steps"] == len(d) and r["count"] == d["count"].sum() and r["layer"] == "b.1.11"
    np.testing.assert_allclose(r["l1"], np.nanmean(d["l1"]), rtol=1e-12)
    np.testing.assert_allclose(r["l2_var"], np.nanvar(d["l2"]), rtol=1e-9)
    assert RD.epoch_means(df.iloc[:0], ["layer_id", "layer"]).empty


def test_layer_flow_is_the_gradient_flow_table():
    """layer_summary's per-layer numbers grouped by the layer id alone: plots.gradients.gradient_flow_table's."""
    from bbdecoder.analyzer.report.plots.gradients import gradient_flow_table
    rng = np.random.default_rng(9)
    n = 5000
    gl = pd.DataFrame({"step": np.repeat(np.arange(50), 100), "layer_id": np.tile(rng.permutation(100), 50)})
    gl["layer"] = [f"b.{i}" for i in gl["layer_id"]]
    gl["count"] = rng.integers(0, 40, n)
    gl["l1"] = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)
    gl["max_abs"] = np.abs(rng.standard_normal(n))
    gl.loc[rng.random(n) < 0.05, ["l1", "max_abs"]] = np.nan
    want = gradient_flow_table(gl).set_index("layer_id")
    got = RD._flow(gl)
    for c in ("steps", "count", "l1", "abs_mean", "max_abs"):
        np.testing.assert_array_equal(got[c].to_numpy(), want[c].to_numpy(), err_msg=c)
    assert list(got.index) == list(range(100))
    np.testing.assert_allclose(got.loc[7, "l1"], np.nansum(gl.loc[gl["layer_id"] == 7, "l1"]), rtol=1e-12)
