"""Issue 16, the report's memory at 100,000 layers (second part): past OWN_PASS_LAYERS layers the report reads
the gradient statistics with a pass of its own, pools the layers while letting go of the statistics it no
longer needs, keeps a narrow per-(step, parameter) frame and empties its frames once the sections ran. Each
narrower structure is checked here against the plain computation on a generated trace of 3,000 layers: the
run's cached frames (Run.grad_stats), a plain pandas groupby, json_safe of the old per-row records, and the
findings of a fresh run that reads the gradient table itself."""

import os

import numpy as np
import pandas as pd
import pytest

import bbdecoder
from bbdecoder.analyzer import engine
from bbdecoder.analyzer import gradients as G
from bbdecoder.analyzer.catalog import GRAD_KINDS
from bbdecoder.analyzer.findings import data as FD
from bbdecoder.analyzer.report import build as B
from bbdecoder.analyzer.report import data as RD
from bbdecoder.analyzer.report.sections.nonfinite import nonfinite_findings
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
from helpers import pool_by_groupby, random_grad_stats, write_linear_run
from bbdecoder.analyzer.values import json_safe

N_LAYERS, PER_BLOCK, STEPS = 3000, 50, 6
SHAPES = (("weight", (4, 4)), ("bias", (4,)))


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """3,000 Linear layers in blocks of 50, packed gradient statistics every step (two epochs): a few
    parameters all zero at some steps (max |g| 0 with finite elements) and a few with non-finite elements."""
    d = str(tmp_path_factory.mktemp("many2") / "run")
    names = [f"blocks.{i // PER_BLOCK}.mlp.{i % PER_BLOCK}" for i in range(N_LAYERS)]
    manifest, keys, attrs, numel = write_linear_run(d, names, SHAPES, STEPS, 2)
    keys = tuple(keys)
    rng = np.random.default_rng(16)
    sw = ShardSeriesWriter(os.path.join(d, fmt.rank_dirname(0)), 0, flush_steps=1000, backend=HDF5Backend())
    for step in range(STEPS):
        g = 1e-2 * 10.0 ** rng.uniform(-6, 0, len(keys))
        s = np.empty((len(keys), 6))
        s[:, 0], s[:, 1] = numel, 0.0
        s[:, 2], s[:, 3], s[:, 4], s[:, 5] = g * 0.1 * numel, g * g * numel, g * 0.8 * numel, g * 3.0
        zero = rng.choice(len(keys), 5, replace=False)     # all-zero gradients
        s[zero, 2:] = 0.0
        bad = rng.choice(len(keys), 3, replace=False)      # non-finite elements
        s[bad, 1] = np.minimum(numel[bad], step + 1)
        s[bad, 0] = numel[bad] - s[bad, 1]
        sw.write([StepRecord(step, step // 3, 1.0 / (step + 1), float(step), 0,
                             [(fmt.KIND_GRAD_STATS, None, keys, s, attrs)])])
    sw.close()
    return d


def _frames(path, own, monkeypatch):
    monkeypatch.setattr(RD, "OWN_PASS_LAYERS", 1000 if own else 10 ** 9)
    monkeypatch.setattr(RD, "ROW_BUDGET", 10_000)           # 36,000 per-parameter rows: not written whole
    run = bbdecoder.open(path)
    return run, RD.load_frames(run)


def test_own_pass_frames_equal_the_runs_frames(trace, monkeypatch):
    plain_run, plain = _frames(trace, False, monkeypatch)
    run, own = _frames(trace, True, monkeypatch)
    assert own.own_pass and not plain.own_pass and own.rows is not None
    # the narrow per-(step, parameter) frame: the columns later sections read, the same values
    assert list(own.gs_all.columns) == FD.GRAD_RULE_COLUMNS and own.gs is own.gs_all
    assert {c: str(own.gs_all[c].dtype) for c in ("step", "layer_id", "count", "nonfinite")} == dict.fromkeys(
        ("step", "layer_id", "count", "nonfinite"), "int32")
    assert all(isinstance(own.gs_all[c].dtype, pd.CategoricalDtype) for c in ("layer", "param"))   # names as codes
    full = plain_run.grad_stats()
    pd.testing.assert_frame_equal(own.gs_all.astype({"layer": full["layer"].dtype, "param": full["param"].dtype}),
                                  full[FD.GRAD_RULE_COLUMNS], check_dtype=False, check_exact=True)
    assert len(own.gs_all) == N_LAYERS * len(SHAPES) * STEPS
    # every frame the sections draw or write: exactly those of the run's cached frames
    for name in ("ge_all", "gl_all", "ge", "gl", "summary", "fig_gs", "fig_ge", "fig_gl", "fig_ws", "lt"):
        pd.testing.assert_frame_equal(getattr(own, name), getattr(plain, name), check_exact=True, obj=name)
    pd.testing.assert_frame_equal(own.gl_all, G.pool_params(full), check_exact=True)
    assert own.rows_note == plain.rows_note
    # the non-finite section and the health rules on the narrow frame: what they give on the whole tables
    nf = nonfinite_findings(run, own.gs_all, own.ws)
    assert nf == nonfinite_findings(plain_run, full, plain.ws) and nf["found"]
    t = run.findings_tables()
    t.adopt("grads", FD.grads_from_frame(run.catalog, own.gs_all, own.ids))
    t.adopt("grad_layers", FD.grad_layers_from_frame(run.catalog, own.gs_all, own.gl_all, own.ids))
    fresh = bbdecoder.open(trace).findings()            # reads the gradient statistics table itself
    got = run.findings()
    pd.testing.assert_frame_equal(got, fresh, check_exact=True)
    assert {"all_zero", "nonfinite"} <= set(got.loc[got["severity"] != "skipped", "rule"])
    # once the sections ran: the frames emptied (columns kept), what summary.json needs kept
    rel = RD.released(own)
    assert all(len(getattr(rel, k)) == 0 and list(getattr(rel, k).columns) == list(getattr(own, k).columns)
               for k in ("gs_all", "ge_all", "gl_all", "gs", "ge", "gl", "ws", "ws1"))
    assert rel.summary is own.summary and rel.steps is own.steps
    t.forget("grads", "grad_layers", "absent")
    assert not {"grads", "grad_layers"} & t.computed


def test_statistics_only_pass_is_not_split(trace, monkeypatch):
    """Recorded statistics alone: one process (a worker would send back as many rows as it read)."""
    monkeypatch.setattr(engine, "SPLIT_MIN_BYTES", 1)
    cat = bbdecoder.open(trace).catalog
    keys = cat.param_keys(None)[1]
    assert engine.split_keys(cat.shards_with(GRAD_KINDS, keys), GRAD_KINDS, set(keys), 2) == [set(keys)]


def _frame(seed, n_layers=700):
    """A sorted per-step gradient frame: 1 to 5 parameters per layer, NaNs and rows without finite elements."""
    rng = np.random.default_rng(seed)
    rows = [(step, step // 2, lid, f"layer{lid}", f"p{p}") for step in range(4) for lid in range(n_layers)
            for p in range(1 + lid % 5)]
    df = pd.DataFrame(rows, columns=["step", "epoch", "layer_id", "layer", "param"])
    return random_grad_stats(df, rng, nan_fraction=0.1)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_pooling_column_by_column_dropping_columns_equals_a_plain_groupby(order):
    df = _frame(1 + (order == "sorted"))
    if order == "shuffled":
        df = df.sample(frac=1.0, random_state=2).reset_index(drop=True)
    want = pool_by_groupby(df)
    mine = df.copy()
    got = G.pool_params(mine, drop=G.DROPPABLE)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_exact=True)
    pd.testing.assert_frame_equal(G.pool_params(df).reset_index(drop=True), want, check_exact=True)
    assert list(mine.columns) == [c for c in df.columns if c not in G.DROPPABLE]   # dropped from the input only
    pd.testing.assert_frame_equal(mine, df[list(mine.columns)])
    with pytest.raises(ValueError):
        G.pool_params(df.copy(), drop=("count",))


def test_slim_frame_narrows_only_what_fits():
    df = _frame(5, 20)
    slim = RD.slim_grad_frame(df)
    assert list(slim.columns) == FD.GRAD_RULE_COLUMNS and slim["step"].dtype == np.int32
    pd.testing.assert_frame_equal(slim, df[FD.GRAD_RULE_COLUMNS], check_dtype=False, check_exact=True)
    big = df.assign(count=df["count"] + (1 << 40))
    assert RD.slim_grad_frame(big)["count"].dtype == np.int64        # past int32: kept as it was


def test_layer_records_are_the_json_safe_rows():
    """summary.json's "layers" built column-wise, JSON-safe at once: json_safe of the old per-row dicts."""
    rng = np.random.default_rng(0)
    n = 50
    s = pd.DataFrame({"layer_id": np.arange(n), "name": [f"l.{i}" for i in range(n)], "type": "Linear",
                      "n_params": rng.integers(0, 1 << 40, n), "selected": rng.random(n) < 0.8,
                      "grad_steps": rng.integers(0, 9, n).astype(np.int64)})
    for c in ("mean_abs_grad", "max_abs_grad", "last_epoch", "last_epoch_mean_l2", "weight_l2_final",
              "update_ratio_median"):
        v = rng.standard_normal(n) if c != "last_epoch" else rng.integers(0, 3, n).astype(np.float64)
        v[rng.random(n) < 0.3] = np.nan
        v[rng.random(n) < 0.05] = np.inf
        s[c] = v
    s["weight_snapshots"] = rng.integers(0, 5, n).astype(np.int64)
    old = [{"id": r.layer_id, "name": r.name, "type": r.type, "n_params": r.n_params, "recorded": r.selected,
            "grad_steps": r.grad_steps, "mean_abs_grad": r.mean_abs_grad, "max_abs_grad": r.max_abs_grad,
            "last_epoch": int(r.last_epoch) if np.isfinite(r.last_epoch) else None,
            "last_epoch_mean_l2": r.last_epoch_mean_l2, "weight_snapshots": r.weight_snapshots,
            "weight_l2_final": r.weight_l2_final, "update_ratio_median": r.update_ratio_median}
           for r in s.itertuples(index=False)]
    got = B.layer_records(s)
    assert got == json_safe(old) and json_safe(got) == got
    assert [list(d) for d in got] == [list(d) for d in old]                    # the same keys in the same order
    assert all(type(a) is type(b) for g, o in zip(got, json_safe(old)) for a, b in zip(g.values(), o.values()))
