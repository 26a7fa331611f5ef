"""Issue 16, `bbdecoder check` at 100,000 layers: from heap.MANY_LAYERS layers the rules' gradient tables are
read narrow (analyzer.narrow_grads: a parameter index per row, int32 where values fit, only the columns the
rules read). Checked on a generated trace of several shards against the wide path (grad_stat_table and
grad_layer_table: every row and value, bit for bit), against sums taken directly from the statistics written
(numpy, per (step, layer)), and through the findings of a fresh run read either way."""

import os

import numpy as np
import pandas as pd
import pytest

import bbdecoder
from bbdecoder.analyzer import heap
from bbdecoder.analyzer import narrow_grads as N
from bbdecoder.analyzer.findings import data as FD
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
from helpers import write_linear_run

N_LAYERS, PER_BLOCK, STEPS = 300, 20, 8
SHAPES = (("weight", (4, 4)), ("bias", (4,)))


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """300 Linear layers, packed gradient statistics every step in shards of 3 steps; planted: all-zero
    gradients, non-finite elements, a row whose counts do not add up (read as all non-finite), a parameter
    missing at some steps. Returns (run dir, {step: (keys, (P, 6) statistics written)}, manifest)."""
    d = str(tmp_path_factory.mktemp("narrow") / "run")
    names = [f"blocks.{i // PER_BLOCK}.mlp.{i % PER_BLOCK}" for i in range(N_LAYERS)]
    manifest, keys, attrs, numel = write_linear_run(d, names, SHAPES, STEPS, 2)
    rng = np.random.default_rng(4)
    written = {}
    sw = ShardSeriesWriter(os.path.join(d, fmt.rank_dirname(0)), 0, flush_steps=3, flush_secs=1e9,
                           backend=HDF5Backend())
    for step in range(STEPS):
        sel = np.arange(len(keys)) if step % 4 else np.flatnonzero(np.arange(len(keys)) != 7)
        g = 1e-2 * 10.0 ** rng.uniform(-6, 0, len(sel))
        n = numel[sel]
        s = np.empty((len(sel), 6))
        s[:, 0], s[:, 1] = n, 0.0
        s[:, 2], s[:, 3], s[:, 4], s[:, 5] = g * 0.1 * n, g * g * n, g * 0.8 * n, g * 3.0
        s[rng.choice(len(sel), 4, replace=False), 2:] = 0.0              # all zero
        bad = rng.choice(len(sel), 3, replace=False)                     # non-finite elements
        s[bad, 1] = np.minimum(n[bad], step + 1)
        s[bad, 0] = n[bad] - s[bad, 1]
        s[5, 0] = n[5] + 3                                               # counts that do not add up
        ks = tuple(keys[i] for i in sel)
        written[step] = (ks, s)
        sw.write([StepRecord(step, step // 4, 1.0 / (step + 1), float(step), 0,
                             [(fmt.KIND_GRAD_STATS, None, ks, s, [attrs[i] for i in sel])])])
    sw.close()
    manifest.update(status=fmt.STATUS_COMPLETE)
    files.write_json_atomic(os.path.join(d, fmt.MANIFEST), manifest)
    return d, written, manifest


def as_wide_dtypes(df, wide):
    """``df`` (a narrow grads table) with the dtypes of the wide table ``wide`` (int64, names as strings)."""
    return df.astype({c: wide[c].dtype for c in df.columns})


@pytest.mark.parametrize("batch", [N.BATCH, 97])
def test_the_same_tables_as_the_wide_path(trace, batch, monkeypatch):
    monkeypatch.setattr(N, "BATCH", batch)
    run = bbdecoder.open(trace[0])
    assert len(run.catalog.shards_with(fmt.KIND_GRAD_STATS)) == 3
    grads, gl = N.narrow_grad_tables(run.catalog)
    wide = FD.grad_stat_table(run.catalog)
    assert list(grads.columns) == FD.GRAD_RULE_COLUMNS and len(grads) == len(wide) == 8 * 600 - 2
    assert all(grads[c].dtype == np.int32 for c in ("step", "layer_id", "count", "nonfinite"))
    assert all(isinstance(grads[c].dtype, pd.CategoricalDtype) for c in ("layer", "param"))
    pd.testing.assert_frame_equal(as_wide_dtypes(grads, wide), wide[FD.GRAD_RULE_COLUMNS], check_exact=True)
    pd.testing.assert_frame_equal(gl, FD.grad_layer_table(wide), check_exact=True)


def test_layer_table_against_the_statistics_written(trace):
    """Per (step, layer) sums straight from the (P, 6) arrays written: count, nonfinite add, l1 = sum |g| adds,
    l2 = sqrt(sum ||g||^2), max_abs the maximum of the parameters with finite elements; a row whose counts do
    not add up counts as numel non-finite elements."""
    d, written, manifest = trace
    lid_of = {(L["key"], q["key"]): (L["id"], q["numel"]) for L in manifest["layers"] for q in L["params"]}
    rows = []
    for step, (ks, s) in written.items():
        for (lk, pk), v in zip(ks, s):
            lid, numel = lid_of[(lk, pk)]
            ok = v[0] >= 0 and v[1] >= 0 and v[0] + v[1] == numel
            n, nf = (v[0], v[1]) if ok else (0.0, float(numel))
            rows.append((step, lid, numel, n, nf, v[4] if n > 0 else 0.0, v[3] if n > 0 else 0.0,
                         v[5] if n > 0 else np.nan))
    ref = pd.DataFrame(rows, columns=["step", "layer_id", "numel", "count", "nonfinite", "l1", "sq", "max_abs"])
    ref = ref.groupby(["step", "layer_id"], sort=True).agg(
        numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"), l1=("l1", "sum"),
        sq=("sq", "sum"), max_abs=("max_abs", "max")).reset_index()
    _, gl = N.narrow_grad_tables(bbdecoder.open(d).catalog)
    assert len(gl) == len(ref) == 8 * N_LAYERS
    for c in ("step", "layer_id", "numel", "count", "nonfinite"):
        np.testing.assert_array_equal(gl[c].to_numpy(), ref[c].to_numpy(np.int64), err_msg=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(gl["abs_mean"], ref["l1"] / ref["count"].where(ref["count"] > 0), rtol=1e-12)
    np.testing.assert_allclose(gl["l2"], np.sqrt(ref["sq"]), rtol=1e-12)
    np.testing.assert_array_equal(gl["max_abs"].to_numpy(), ref["max_abs"].to_numpy())
    assert gl["layer"].tolist() == [f"blocks.{i // PER_BLOCK}.mlp.{i % PER_BLOCK}" for i in gl["layer_id"]]
    assert (gl["nonfinite"] > 0).sum() >= 3 * 8


def test_findings_the_same_read_narrow(trace, monkeypatch):
    wide = bbdecoder.open(trace[0]).findings()
    monkeypatch.setattr(heap, "MANY_LAYERS", N_LAYERS)
    run = bbdecoder.open(trace[0])
    got = run.findings()
    t = run.findings_tables()
    assert list(t.grads.columns) == FD.GRAD_RULE_COLUMNS              # the narrow tables were read
    pd.testing.assert_frame_equal(got, wide, check_exact=True)
    t.memo(("grad_outliers", 20, 3.5, 10.0), lambda: [])                # derived from grad_layers
    t.forget("grad_layers")                                           # the narrow grads go with it: read again
    assert not any(isinstance(k, tuple) and k[0] == "grad_outliers" for k in t._t)   # and what came from it
    assert not {"grads", "grad_layers"} & t.computed and len(t.grad_layers) == 8 * N_LAYERS
    assert {"nonfinite", "all_zero"} <= set(got.loc[got["severity"] != "skipped", "rule"])


def test_param_rank_sorts_as_names_do():
    """ParamTable.rank orders (layer id, parameter name) as sorting the strings does, equal pairs equal."""
    class Ctx:
        meta = {("a", "x"): (2, "l2", "weight", 4), ("a", "y"): (2, "l2", "bias", 4), ("b", "x"): (0, "l0", "z", 1),
                ("c", "x"): (0, "l0", "bias", 1), ("d", "x"): (1, "l1", "weight", 3),
                ("e", "x"): (1, "l1", "weight", 3)}
    pt = N.ParamTable(Ctx())
    want = pd.DataFrame({"lid": pt.lid, "param": pt.param}).apply(tuple, axis=1).rank(method="dense").astype(int) - 1
    np.testing.assert_array_equal(pt.rank, want.to_numpy())
    assert N.narrow(np.array([1, 2 ** 31], np.int64)).dtype == np.int64 and N.narrow(np.array([-5])).dtype == np.int32


@pytest.mark.parametrize("nan", [False, True])
def test_run_reduce_is_pandas_groupby_bit_for_bit(nan):
    """Sums and maxima of sorted runs of rows: pandas' own groupby results (the same bits under pandas 3; pandas 2's
    sums are compensated, equal to 1e-12), with or without NaN."""
    rng = np.random.default_rng(7 + nan)
    lens = rng.integers(1, 6, 3000)
    gid = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    v = rng.standard_normal(len(gid)) * 10.0 ** rng.uniform(-12, 12, len(gid))
    if nan:
        v[rng.random(len(v)) < 0.05] = np.nan
    for how in ("sum", "max"):
        want = getattr(pd.Series(v).groupby(gid, sort=False), how)().to_numpy()
        got = N.run_reduce(v, starts, gid, how)
        if how == "sum" and int(pd.__version__.split(".")[0]) < 3:   # pandas 2 compensates its sums (Kahan)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        else:
            assert np.array_equal(got, want, equal_nan=True), how
    ref = np.array([np.nansum(v[a:a + n]) for a, n in zip(starts, lens)])       # the same sums, any order
    np.testing.assert_allclose(N.run_reduce(v, starts, gid), ref, rtol=1e-9, atol=1e-300)


def test_evaluate_lets_go_of_derived_tables_from_many_layers(trace, monkeypatch):
    """From heap.MANY_LAYERS layers the rules' derived tables (per-layer outliers) are not kept after an
    evaluation; a second evaluation computes them again and gives the same findings."""
    run = bbdecoder.open(trace[0])
    first = run.findings()
    assert any(not isinstance(k, str) for k in run.findings_tables()._t)       # kept below the threshold
    monkeypatch.setattr(heap, "MANY_LAYERS", N_LAYERS)
    run = bbdecoder.open(trace[0])
    got = run.findings()
    assert all(isinstance(k, str) for k in run.findings_tables()._t)
    pd.testing.assert_frame_equal(got, first, check_exact=True)
    pd.testing.assert_frame_equal(run.findings(), first, check_exact=True)
