"""Mergeable statistics against numpy (torchmetrics-style: merging a random split == whole)."""

import numpy as np
import pytest

from bbdecoder.analyzer.stats import (RULES, Accumulator, ElementwiseMoments, RowMoments, UnitSums, row_moments,
                                      stats_from_sums)


def _numpy_rows(x):
    out = {k: [] for k in ("count", "nonfinite", "mean", "abs_mean", "max_abs", "min", "max", "var", "l1", "l2")}
    for r in x.astype(np.float64):
        f = r[np.isfinite(r)]
        out["count"].append(f.size)
        out["nonfinite"].append(r.size - f.size)
        if f.size:
            out["mean"].append(f.mean()); out["abs_mean"].append(np.abs(f).mean())
            out["max_abs"].append(np.abs(f).max()); out["min"].append(f.min()); out["max"].append(f.max())
            out["var"].append(f.var()); out["l1"].append(np.abs(f).sum()); out["l2"].append(np.sqrt((f ** 2).sum()))
        else:
            for k in ("mean", "abs_mean", "max_abs", "min", "max", "var", "l1", "l2"):
                out[k].append(np.nan)
    return {k: np.array(v) for k, v in out.items()}


def _check(got, want):
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=0, equal_nan=True, err_msg=k)


@pytest.mark.parametrize("seed", range(5))
def test_row_moments_match_numpy_with_nonfinite(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((7, 301)) * rng.uniform(1e-6, 1e3)).astype(np.float32) + rng.uniform(-5, 5)
    x[rng.random(x.shape) < 0.02] = np.nan
    x[rng.random(x.shape) < 0.01] = np.inf
    x[3] = np.nan  # a row with no finite element
    _check(RowMoments.of(x).compute(), _numpy_rows(x))


@pytest.mark.parametrize("seed", range(5))
def test_merge_of_random_column_split_equals_whole(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((4, 1000)) * 3 + 1e3  # large mean: tests the Chan merge's stability
    x[rng.random(x.shape) < 0.05] = -np.inf
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=rng.integers(1, 8), replace=False))
    parts = np.split(x, cuts, axis=1)
    acc = RowMoments.empty(4)
    for p in parts:
        acc = acc.merge(RowMoments.of(p))
    whole = RowMoments.of(x).compute()
    _check(acc.compute(), whole)
    _check(whole, _numpy_rows(x))


def test_row_moments_bounded_pieces_equal_one_pass():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 10_001)).astype(np.float32)
    _check(row_moments(x, max_elems=999).compute(), _numpy_rows(x))


def test_empty_accumulator_is_nan_not_zero():
    st = RowMoments.empty(2).compute()
    assert np.isnan(st["mean"]).all() and (st["count"] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_elementwise_moments_split_merge_and_numpy(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((23, 50)) * rng.uniform(0.1, 10, size=50) + 100.0
    x[rng.random(x.shape) < 0.03] = np.nan
    cuts = np.sort(rng.choice(np.arange(1, 23), size=3, replace=False))
    acc = ElementwiseMoments(50)
    for p in np.split(x, cuts, axis=0):
        acc.update(p)
    parts = [ElementwiseMoments(50).update(p) for p in np.split(x, cuts, axis=0)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    want = np.nanvar(x, axis=0)  # population variance across rows, per element
    np.testing.assert_allclose(acc.m2 / acc.n, want, rtol=1e-9)
    np.testing.assert_allclose(merged.m2 / merged.n, want, rtol=1e-9)
    assert acc.compute() == pytest.approx(float(np.mean(want)), rel=1e-12)


def test_elementwise_moments_column_pieces_equal_one_pass():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 1003)) * 2 + 50).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    whole = ElementwiseMoments(1003).update(x, max_elems=1 << 20)
    pieces = ElementwiseMoments(1003).update(x[:2], max_elems=17).update(x[2:], max_elems=40)
    np.testing.assert_allclose(pieces.m2 / pieces.n, np.nanvar(x.astype(np.float64), axis=0), rtol=1e-9)
    np.testing.assert_allclose(pieces.mean, whole.mean, rtol=1e-12)
    np.testing.assert_array_equal(pieces.n, whole.n)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_fast_path_equals_general_path_and_numpy(dtype):
    """Blocks of finite values skip the isfinite pass (extrema / column means tell): same numbers
    as the general path (forced by a non-finite row) and numpy, and the input is left as it was."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 2001)) * rng.uniform(1e-3, 10, size=(6, 1)) + 300.0).astype(dtype)
    x[2] = 0.0                                     # a constant row: variance exactly 0
    keep = x.copy()
    fast = RowMoments.of(x).compute()
    general = RowMoments.of(np.vstack([x, np.full((1, x.shape[1]), np.nan, dtype)])).compute()
    _check(fast, _numpy_rows(x))
    _check(fast, {k: v[:6] for k, v in general.items()})
    assert fast["var"][2] == 0.0 and (fast["nonfinite"] == 0).all()
    acc = ElementwiseMoments(x.shape[1]).update(x, max_elems=500)
    np.testing.assert_allclose(acc.m2 / acc.n, x.astype(np.float64).var(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(x, keep)


def test_elementwise_moments_opposite_infinities_in_one_column():
    """+inf and -inf in one column give a NaN column mean: the general path skips both."""
    x = np.array([[1.0, np.inf, 3.0], [2.0, -np.inf, 5.0], [4.0, 7.0, 6.0]])
    acc = ElementwiseMoments(3).update(x)
    np.testing.assert_array_equal(acc.n, [3, 1, 3])
    np.testing.assert_allclose(acc.m2 / acc.n, [np.var([1, 2, 4]), 0.0, np.var([3, 5, 6])], rtol=1e-12)


# ------------------------------------------------------------------ declared state, merge convention

@pytest.mark.parametrize("cls", [RowMoments, ElementwiseMoments, UnitSums])
def test_every_accumulator_declares_its_state_and_merge_rules_once(cls):
    assert issubclass(cls, Accumulator) and cls.STATE
    names = [n for n, _, _ in cls.STATE]
    assert len(names) == len(set(names))
    assert {r for _, r, _ in cls.STATE} <= set(RULES)
    if any(r == "chan" for _, r, _ in cls.STATE):   # Chan's merge weights mean and m2 by the count n
        assert {"n", "mean", "m2"} <= set(names)


def _split(rng, n, most=6):
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, most), replace=False))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("seed", range(4))
def test_row_moments_random_split_merged_in_place_equals_whole_and_numpy(seed):
    rng = np.random.default_rng(200 + seed)
    x = rng.standard_normal((5, 400)) * rng.uniform(0.1, 100) + rng.uniform(-1e3, 1e3)
    x[rng.random(x.shape) < 0.03] = np.nan
    x[rng.random(x.shape) < 0.01] = -np.inf
    x[1] = np.inf                                    # a row without a finite element
    acc = RowMoments.empty(5)
    for idx in _split(rng, x.shape[1]):
        part = RowMoments.of(x[:, idx])
        before = id(acc)
        assert acc.merge(part) is acc and id(acc) == before
    _check(acc.compute(), _numpy_rows(x))
    _check(acc.compute(), RowMoments.of(x).compute())
    upd = RowMoments.of(x[:, :7])
    assert upd.update(x[:, 7:]) is upd
    _check(upd.compute(), _numpy_rows(x))


@pytest.mark.parametrize("seed", range(4))
def test_elementwise_moments_random_split_merged_in_place_equals_whole_and_numpy(seed):
    rng = np.random.default_rng(300 + seed)
    x = rng.standard_normal((31, 40)) * rng.uniform(0.01, 10, size=40) - 500.0
    x[rng.random(x.shape) < 0.04] = np.nan
    x[:, 3] = np.nan                                 # an element never finite
    acc = ElementwiseMoments(40)
    for idx in _split(rng, x.shape[0]):
        part = ElementwiseMoments(40).update(x[idx])
        assert acc.merge(part) is acc
    whole = ElementwiseMoments(40).update(x)
    ok = acc.n > 0
    np.testing.assert_array_equal(acc.n, np.isfinite(x).sum(0))
    with np.errstate(invalid="ignore"):
        want = np.nanvar(np.where(np.isfinite(x), x, np.nan)[:, ok], axis=0)
    np.testing.assert_allclose(acc.m2[ok] / acc.n[ok], want, rtol=1e-9)
    np.testing.assert_allclose(acc.mean[ok], whole.mean[ok], rtol=1e-12)
    assert acc.compute() == pytest.approx(float(np.mean(want)), rel=1e-12)
    assert ElementwiseMoments(4).compute() != ElementwiseMoments(4).compute()   # NaN without values


def _unit_rows(rng, k, U):
    h = rng.standard_normal((k, 9, U))              # k steps, 9 values per unit
    h[rng.random(h.shape) < 0.02] = np.nan
    fin = np.isfinite(h)
    return h, {"count": np.full(k, 9.0 * U), "nonfinite": (~fin).sum((1, 2)).astype(np.float64),
               "sum": h.sum(1), "sum_abs": np.abs(h).sum(1), "sumsq": (h ** 2).sum(1),
               "n_pos": (h > 0).sum(1).astype(np.float64), "min": h.min(1), "max": h.max(1)}


@pytest.mark.parametrize("seed", range(4))
def test_unit_sums_random_split_merged_in_place_equals_whole_and_numpy(seed):
    rng = np.random.default_rng(400 + seed)
    h, rows = _unit_rows(rng, 12, 5)
    acc = None
    for idx in _split(rng, 12):
        part = UnitSums.of({k: v[idx] for k, v in rows.items()})
        acc = part if acc is None else acc.merge(part)
        assert acc.merge(UnitSums(5)) is acc         # the identity state changes nothing
    got = acc.compute()
    flat = h.reshape(-1, 5)
    want = {"count": 12 * 9 * 5, "nonfinite": int((~np.isfinite(h)).sum()), "sum": flat.sum(0),
            "sum_abs": np.abs(flat).sum(0), "sumsq": (flat ** 2).sum(0), "n_pos": (flat > 0).sum(0),
            "min": flat.min(0), "max": flat.max(0)}       # NaN propagates to sums and extrema
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-12, equal_nan=True, err_msg=k)
    mask = rng.random(12) < 0.5
    masked = UnitSums.of(rows, mask)
    np.testing.assert_allclose(masked.compute()["sum"], h[mask].reshape(-1, 5).sum(0), rtol=1e-12)
    assert UnitSums.rule("min") == "min" and UnitSums.rule("max") == "max" and UnitSums.rule("hist") == "sum"


def test_stats_from_sums_is_the_formula_and_nan_without_elements():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 50)) + 2.0
    n = np.array([50, 50, 0])
    s, q, a = x.sum(1), (x * x).sum(1), np.abs(x).sum(1)
    s[2] = q[2] = a[2] = 0.0
    st = stats_from_sums(n, s, q, a, np.abs(x).max(1))
    np.testing.assert_allclose(st["mean"][:2], x[:2].mean(1), rtol=1e-12)
    np.testing.assert_allclose(st["var"][:2], x[:2].var(1), rtol=1e-9)
    np.testing.assert_allclose(st["abs_mean"][:2], np.abs(x[:2]).mean(1), rtol=1e-12)
    np.testing.assert_allclose(st["l2"][:2], np.linalg.norm(x[:2], axis=1), rtol=1e-12)
    assert np.isnan(st["mean"][2]) and np.isnan(st["var"][2]) and np.isnan(st["abs_mean"][2])
    assert st["l1"][2] == 0.0 and st["l2"][2] == 0.0
    assert set(stats_from_sums(n, sumsq=q, sum_abs=a)) == {"abs_mean", "l1", "l2"}
    assert set(stats_from_sums(sumsq=q)) == {"l2"}


def test_reduce_groups_merges_slices_of_one_step_exactly():
    """Rows of RowMoments grouped by step (the slices of a sharded parameter that several ranks recorded)
    merge into the moments of the whole rows (numpy on the concatenation), empty slices included."""
    from bbdecoder.analyzer.stats import RowMoments, reduce_groups
    rng = np.random.default_rng(5)
    whole = rng.normal(2.0, 3.0, size=(4, 37))
    cuts = [0, 10, 10, 30, 37]                      # an empty slice among them
    steps, parts = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        steps.append(np.arange(4))
        parts.append(RowMoments.of(whole[:, a:b]))
    order = rng.permutation(16)                      # rows arrive in any order
    st = np.concatenate(steps)[order]
    acc = RowMoments(16, **{n: np.concatenate([getattr(p, n) for p in parts])[order] for n, _, _ in RowMoments.STATE})
    o = np.argsort(st, kind="stable")
    starts = np.flatnonzero(np.r_[True, st[o][1:] != st[o][:-1]])
    got = reduce_groups(acc, o, starts).compute()
    np.testing.assert_array_equal(got["count"], [37] * 4)
    np.testing.assert_allclose(got["mean"], whole.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got["var"], whole.var(1), rtol=1e-12)
    np.testing.assert_allclose(got["l2"], np.sqrt((whole ** 2).sum(1)), rtol=1e-12)
    np.testing.assert_array_equal(got["min"], whole.min(1))
    np.testing.assert_array_equal(got["max_abs"], np.abs(whole).max(1))
