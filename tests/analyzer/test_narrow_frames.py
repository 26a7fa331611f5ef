"""Issue 16, the report's memory at 100,000 layers: the report's gradient frames from narrow rows
(analyzer.narrow_frames) and the grouped per-(step, group of layers) statistics taken as runs of rows instead
of a merge and a groupby: each equal, bit for bit, to the plain pandas computation it replaces (a merge and one
groupby of the keys), and to numpy sums of the rows."""

import numpy as np
import pandas as pd
import pytest

from bbdecoder.analyzer import narrow_frames as NF
from bbdecoder.analyzer.gradients import pool_params
from bbdecoder.analyzer.report import data as RD
from helpers import random_grad_stats


def gl_frame(seed, n_layers=240, steps=5):
    """A per-(step, layer) gradient table as pool_params gives it (sorted by step, layer_id): rows without a
    count, NaN statistics, layers of several blocks."""
    rng = np.random.default_rng(seed)
    rows = [(st, st // 2, lid, f"blocks.{lid // 16}.mlp.{lid % 16}", p) for st in range(steps)
            for lid in range(n_layers) for p in ("bias", "weight")]
    df = pd.DataFrame(rows, columns=["step", "epoch", "layer_id", "layer", "param"])
    return pool_params(random_grad_stats(df, rng))


def plain_grouped(gl, rows):
    """The grouped statistics as a merge with the rows and one pandas groupby of the keys."""
    m = gl.merge(rows[["layer_id", "row_id", "row"]], on="layer_id", how="inner")
    d = m.drop(columns=["layer_id", "layer"]).rename(columns={"row_id": "layer_id", "row": "layer"})
    cnt = d["count"].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        d["_s"] = np.where(cnt > 0, d["mean"].to_numpy(np.float64) * cnt, 0.0)
        d["_sq"] = np.where(cnt > 0, d["l2"].to_numpy(np.float64) ** 2, 0.0)
        d["_l1"] = np.where(cnt > 0, d["l1"].to_numpy(np.float64), 0.0)
    return d.groupby(["step", "epoch", "layer_id", "layer"], sort=True).agg(
        numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"), _s=("_s", "sum"),
        _sq=("_sq", "sum"), _l1=("_l1", "sum"), max_abs=("max_abs", "max")).reset_index()


#: pandas 3 sums groups as numpy does (bit for bit); pandas 2's groupby sums are compensated (Kahan), so there
#: the narrow path's numpy sums may differ from them in the last digit
EXACT = int(pd.__version__.split(".")[0]) >= 3


@pytest.mark.parametrize("seed,nan", [(0, False), (1, True)])
def test_grouped_sums_are_the_merge_and_groupby(seed, nan):
    gl = gl_frame(seed).copy()
    if nan:
        gl.loc[gl.index[::53], ["mean", "l2", "max_abs"]] = np.nan
    lt = pd.DataFrame({"id": np.arange(240), "name": [f"blocks.{i // 16}.mlp.{i % 16}" for i in range(240)]})
    rows = RD.layer_rows(lt, max_rows=6)
    got = NF.grouped_sums(gl, rows)
    want = plain_grouped(gl, rows)
    pd.testing.assert_frame_equal(got, want, check_exact=EXACT, rtol=1e-12)
    # numpy: every group's sums over its layers' rows
    r = rows.set_index("layer_id")["row_id"]
    for (st, first), d in gl.assign(_r=r.reindex(gl["layer_id"]).to_numpy()).groupby(["step", "_r"]):
        g = got[(got["step"] == st) & (got["layer_id"] == first)].iloc[0]
        ok = d["count"].to_numpy() > 0
        assert g["count"] == d["count"].sum() and g["numel"] == d["numel"].sum()
        np.testing.assert_allclose(g["_l1"], np.nansum(d["l1"].to_numpy()[ok]), rtol=1e-12)
        assert g["max_abs"] == np.nanmax(d["max_abs"].to_numpy()) or np.isnan(d["max_abs"]).all()
    # the whole function: the same frame either way
    full = RD.grouped_grad_stats(gl, rows)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NF, "grouped_sums", lambda *a: None)              # the merge and the groupby
        pd.testing.assert_frame_equal(RD.grouped_grad_stats(gl, rows), full, check_exact=EXACT, rtol=1e-12)
    shuffled = gl.sample(frac=1.0, random_state=seed)                 # not sorted: the merge
    assert NF.grouped_sums(shuffled, rows) is None
    pd.testing.assert_frame_equal(RD.grouped_grad_stats(shuffled, rows), full, rtol=1e-12)
    assert len(full) == 5 * rows["row_id"].nunique()


def test_grouped_sums_refuse_layers_outside_the_rows():
    gl = gl_frame(2)
    lt = pd.DataFrame({"id": np.arange(200), "name": [f"blocks.{i // 16}.mlp.{i % 16}" for i in range(200)]})
    rows = RD.layer_rows(lt, max_rows=4)
    assert NF.grouped_sums(gl, rows) is None                          # layers 200-239 have no row: the merge drops them
    got = RD.grouped_grad_stats(gl, rows)
    assert set(got["layer_id"]) == set(rows["row_id"])


def test_layer_outliers_sequence_reads_as_the_list():
    """layer_outliers keeps arrays and makes each layer's tuple when read: the items of one trailing_outliers per
    layer (numpy arrays compared bit for bit), layers of two lengths, with_episodes the fired ones in order."""
    from bbdecoder.analyzer.findings.gradients import LayerOutliers, layer_outliers, with_episodes
    from bbdecoder.analyzer.findings.robust import episodes, trailing_outliers
    rng = np.random.default_rng(11)
    rows = [(st, lid, f"L{lid}", float(np.exp(rng.standard_normal())) * (1e4 if (lid, st) in ((3, 20), (9, 25)) else 1))
            for lid in range(40) for st in range(30 if lid % 3 else 26)]
    df = pd.DataFrame(rows, columns=["step", "layer_id", "layer", "l2"]).sample(frac=1.0, random_state=0)
    res = layer_outliers(df, "l2", 20, 3.5, 10.0)
    assert isinstance(res, LayerOutliers) and len(res) == 40
    for lid, item in enumerate(res):
        d = df[df["layer_id"] == lid].sort_values("step")
        flag, score, rise = trailing_outliers(d["l2"].to_numpy(), 20, 3.5, 10.0)
        assert item[0] == f"L{lid}" and np.array_equal(item[1], d["step"].to_numpy())
        assert item[2] == (episodes(flag) if flag.any() else [])
        assert np.array_equal(item[3], score, equal_nan=True) and np.array_equal(item[4], rise, equal_nan=True)
    fired = with_episodes(res)
    assert [f[0] for f in fired] == [x[0] for x in list(res) if x[2]] and {"L3", "L9"} <= {f[0] for f in fired}
    assert res[-1][0] == "L39" and [x[0] for x in res[1:3]] == ["L1", "L2"]
    with pytest.raises(IndexError):
        res[40]
