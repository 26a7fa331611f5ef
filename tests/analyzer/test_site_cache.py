"""The per-unit activation statistics kept between reads (analyzer.activations.sites): a report reads
every site several times (findings, the dead-unit sweep, saturation, the overview), each an HDF5
read per shard and statistic otherwise. Checked against a direct h5py reading of the shards, with the
cache at its default budget and at a budget too small to hold anything."""

from __future__ import annotations

import glob
import os

import h5py
import numpy as np
import pytest

from bbdecoder import analyzer
from bbdecoder.analyzer.activations import sites as S
from bbdecoder.analyzer.trace import format as fmt
from tests.helpers import h5_payload, record_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache") / "run"
    record_tiny(str(d), epochs=2, steps_per_epoch=5, weights_every=0, activations=True, activations_every=1,
                max_shard_bytes=20_000)     # several shards
    return str(d)


def _direct(run_dir, key, stat):
    """(steps, values) of one site statistic over rank 0's shards, read with h5py alone, step order."""
    steps, vals = [], []
    for p in sorted(glob.glob(os.path.join(run_dir, "rank-00000", "shard-*.h5"))):
        with h5py.File(p, "r") as f:
            got = h5_payload(f, fmt.KIND_ACT_STATS, key, stat)
            if got is not None:
                steps.append(got[0])
                vals.append(np.asarray(got[1], np.float64))
    return np.concatenate(steps), np.concatenate(vals)


@pytest.mark.parametrize("budget", [S.CACHE_BYTES, 1])
def test_site_statistics_read_twice_equal_h5py(run_dir, monkeypatch, budget):
    monkeypatch.setattr(S, "CACHE_BYTES", budget)
    run = analyzer.open(run_dir)
    sites = S.select_sites(run, None)
    assert sites
    for _ in range(2):               # the second read comes from the cache (or, at 1 byte, from the file)
        for site in sites:
            got = list(S.iter_site_stats(run, site, stats=("sum", "max", "count")))
            assert len(got) >= 2     # several shards
            steps = np.concatenate([g[0] for g in got])
            for stat in ("sum", "max", "count"):
                ref_steps, ref = _direct(run_dir, site["key"], stat)
                np.testing.assert_array_equal(steps, ref_steps)
                np.testing.assert_array_equal(np.concatenate([g[1][stat] for g in got]), ref)
    cache = S._CACHES[run.catalog]
    assert cache.nbytes <= budget and cache.nbytes == sum(v.nbytes for v in cache.items.values())
    assert (len(cache.items) > 0) == (budget > 1)
    # a step selection reads the same cached arrays and returns fresh copies
    site = sites[0]
    part = list(S.iter_site_stats(run, site, stats=("sum",), steps=(2, 5)))
    st = np.concatenate([g[0] for g in part])
    assert st.min() >= 2 and st.max() < 5
    part[0][1]["sum"][...] = -1.0    # writing into a result never reaches the cache
    again = np.concatenate([g[1]["sum"] for g in S.iter_site_stats(run, site, stats=("sum",), steps=(2, 5))])
    assert (again != -1.0).all()


def test_repeated_scans_larger_than_the_budget_still_hit_the_first_arrays(run_dir, monkeypatch):
    """A report scans every site several times in the same order. With the budget below one scan's
    bytes, the arrays read first stay and come from memory on every later scan (LRU would keep
    nothing useful: each array evicted just before it is needed again); the values stay equal to h5py."""
    run = analyzer.open(run_dir)
    sites = S.select_sites(run, None)

    def scan():
        return [(st.copy(), d["sum"].copy()) for site in sites for st, d, _ in S.iter_site_stats(run, site, ("sum",))]
    monkeypatch.setattr(S, "CACHE_BYTES", 1 << 40)
    whole = S._Cache(1 << 40)
    monkeypatch.setitem(S._CACHES, run.catalog, whole)
    first = scan()
    total = whole.nbytes
    half = S._Cache(total // 2)
    monkeypatch.setitem(S._CACHES, run.catalog, half)
    loads = []
    real_get = S._Cache.get
    monkeypatch.setattr(S._Cache, "get", lambda self, key, load: real_get(self, key, lambda: loads.append(key) or load()))
    scan()
    n_first = len(loads)
    assert 0 < half.nbytes <= total // 2
    again = scan()
    kept = set(half.items)
    assert len(loads) - n_first == n_first - len(kept)     # the second scan reads from file only what is not kept
    assert len(kept) >= n_first // 3
    for (a, x), (b, y) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(x, y)
    for site in sites:                                        # and equal to h5py
        ref_steps, ref = _direct(run_dir, site["key"], "sum")
        got = list(S.iter_site_stats(run, site, ("sum",)))
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), ref_steps)
        np.testing.assert_array_equal(np.concatenate([g[1]["sum"] for g in got]), ref)


@pytest.mark.parametrize("whole", [True, False])
def test_each_shard_opened_once_per_site_or_once_in_all_and_never_again(run_dir, monkeypatch, whole):
    """Outside ``keep_open`` every borrowed reader is a file open. When the run's statistics all fit
    the cache (the default here) the first scan opens each shard once in all, every site read at
    once; otherwise (``whole`` forced off) once per site. A second scan, served by the cache, opens
    none; the values equal h5py's either way."""
    run = analyzer.open(run_dir)
    sites = S.select_sites(run, None)
    assert len(sites) >= 2
    cache = S._cache(run.catalog)
    if not whole:
        cache.whole = False
    opened = []
    real = run.catalog.open_shard
    monkeypatch.setattr(run.catalog, "open_shard", lambda sh: opened.append(sh.name) or real(sh))
    n_shards = len(glob.glob(os.path.join(run_dir, "rank-00000", "shard-*.h5")))
    for scan in range(2):
        for site in sites:
            for _ in S.iter_site_stats(run, site, ("sum",)):
                pass
        if scan == 0:
            first = len(opened)
    assert cache.whole is whole
    assert first == (n_shards if whole else n_shards * len(sites))
    assert len(opened) == first                                   # the second scan: no open at all
    if whole:
        assert len(set(opened)) == len(opened)                    # each shard once
    assert run.catalog.open_count == 0
    for site in sites:
        ref_steps, ref = _direct(run_dir, site["key"], "sum")
        got = list(S.iter_site_stats(run, site, ("sum",)))
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), ref_steps)
        np.testing.assert_array_equal(np.concatenate([g[1]["sum"] for g in got]), ref)
    for site in sites:   # every other statistic was cached by the same opens (whole) and equals h5py
        for stat in ("max", "count"):
            ref_steps, ref = _direct(run_dir, site["key"], stat)
            got = list(S.iter_site_stats(run, site, (stat,)))
            np.testing.assert_array_equal(np.concatenate([g[1][stat] for g in got]), ref)
    assert len(opened) == first if whole else len(opened) > first


def test_step_epochs_equal_the_shards_step_tables_and_are_computed_once(run_dir):
    """Analyses ask the step table's epochs once per shard and site: the catalogue keeps the answer
    (read-only), equal to the sorted distinct steps of rank 0's step tables read with h5py."""
    run = analyzer.open(run_dir)
    steps, epochs = [], []
    for p in sorted(glob.glob(os.path.join(run_dir, "rank-00000", "shard-*.h5"))):
        with h5py.File(p, "r") as f:
            steps.append(f["steps/step"][()])
            epochs.append(f["steps/epoch"][()])
    s, e = np.concatenate(steps).astype(np.int64), np.concatenate(epochs).astype(np.int64)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    keep = np.r_[True, s[1:] != s[:-1]]
    got = run.catalog.step_epochs()
    np.testing.assert_array_equal(got[0], s[keep])
    np.testing.assert_array_equal(got[1], e[keep])
    again = run.catalog.step_epochs()
    assert again[0] is got[0] and again[1] is got[1]
    assert not got[0].flags.writeable and not got[1].flags.writeable
    np.testing.assert_array_equal(run.catalog.epoch_of(np.array([s[0], s[-1], s[-1] + 1000])),
                                  [e[0], e[keep][-1], -1])
