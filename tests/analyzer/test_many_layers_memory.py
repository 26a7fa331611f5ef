"""Issue 16, memory of reading a trace of many layers: the compact catalogue (layer records shared with
the manifest, row shapes looked up on demand, packed payload places kept as integers, payload attributes
decoded when asked for) indexes the same payloads as a straightforward reading of the files with h5py
and json; the per-layer pooling and the per-epoch table group without copying the 4-million-row frame
and give the same numbers, bit for bit, as a plain pandas groupby; freed large blocks go back to the OS."""

import json
import os
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from bbdecoder.analyzer import heap
from bbdecoder.analyzer.catalog import Catalog
from bbdecoder.analyzer.gradients import epoch_table, group_code, pool_params
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.packed import FlatLayout
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
from helpers import linear_manifest, pool_by_groupby

N_LAYERS, STEPS = 150, 8
SHAPES = (("weight", (3, 2)), ("bias", (3,)))


def _write_run(d):
    """A run of N_LAYERS Linear-like layers: packed gradient statistics every step (steps 2 and 5 lack
    one parameter: a second packed group), flat weight snapshots every other step, and per-payload
    attributes; written with the recorder's storage classes (numpy only)."""
    rng = np.random.default_rng(3)
    names = [f"blocks.{i // 10}.mlp.{i % 10}" for i in range(N_LAYERS)]
    manifest = linear_manifest(names, SHAPES, STEPS, 2)
    layers = manifest["layers"]
    os.makedirs(d)
    files.write_json_atomic(os.path.join(d, fmt.MANIFEST), manifest)
    keys = tuple((L["key"], q["key"]) for L in layers for q in L["params"])
    shapes = [s for _ in layers for _, s in SHAPES]
    sw = ShardSeriesWriter(os.path.join(d, fmt.rank_dirname(0)), 0, flush_steps=1000, backend=HDF5Backend())
    for step in range(STEPS):
        ks = keys if step not in (2, 5) else keys[:7] + keys[8:]
        attrs = [{"layer_id": int(j // 2), "param": k[1], "tag": f"s{j}"} for j, k in enumerate(ks)]
        pl = [(fmt.KIND_GRAD_STATS, None, ks, rng.standard_normal((len(ks), 6)), attrs)]
        if step % 2 == 0:
            starts = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
            layout = FlatLayout([(lk, pk, int(starts[j]), int(np.prod(s)), tuple(s), {"layer_id": j // 2})
                                 for j, ((lk, pk), s) in enumerate(zip(keys, shapes))])
            pl.append((fmt.KIND_WEIGHTS, None, layout,
                       rng.standard_normal(sum(int(np.prod(s)) for s in shapes)).astype(np.float32), None))
        sw.write([StepRecord(step, step // 4, 1.0, float(step), 0, pl)])
    sw.close()
    return manifest


def _h5_index(path):
    """{(kind, layer_key, param_key): (steps, values (k, ...), attrs, row shape)} read straight from the
    shard with h5py and json: every group's column (packed) or place (flat), rows merged in step order."""
    got: dict = {}
    with h5py.File(path, "r") as f:
        for root in (fmt.PACKED_GROUP, fmt.FLAT_GROUP):
            if root not in f:
                continue
            for kind in f[root]:
                for n in sorted(f[root][kind], key=lambda n: (len(n), n)):
                    g = f[root][kind][n]
                    vals, steps = g["values"][()], g["steps"][()]
                    for j, e in enumerate(json.loads(bytes(g["index"][()]).decode())):
                        if root == fmt.PACKED_GROUP:
                            v, shape = vals[:, j], tuple(vals.shape[2:])
                        else:
                            start, numel, shape = e[3], e[4], tuple(e[5])
                            v = vals[:, start:start + numel].reshape((len(steps), *shape))
                        old = got.get((kind, e[0], e[1]))
                        if old is None:
                            got[(kind, e[0], e[1])] = (steps, v, e[2], shape)
                        else:
                            s = np.concatenate([old[0], steps])
                            o = np.argsort(s, kind="stable")
                            got[(kind, e[0], e[1])] = (s[o], np.concatenate([old[1], v])[o], old[2], shape)
    return got


def test_catalog_index_equals_a_plain_reading(tmp_path):
    run = str(tmp_path / "run")
    manifest = _write_run(run)
    cat = Catalog(run)
    (shard,) = cat.shards
    want = _h5_index(shard.path)
    assert set(shard.payloads) == set(want)
    assert len(want) == 2 * 2 * N_LAYERS
    with cat.open_shard(shard) as r:
        for key, (steps, vals, attrs, shape) in want.items():
            rows, rshape, _ = shard.payloads[key]
            assert (rows, tuple(rshape)) == (len(steps), shape)
            np.testing.assert_array_equal(r.read_payload_steps(*key), steps)
            np.testing.assert_array_equal(r.read_payload(*key, 0, rows), vals)
            assert r.payload_attrs(*key) == attrs   # decoded on demand, the first group's
    # the manifest's layer records, their parameters' shapes, names and metadata, as plain dicts give them
    plain = {(L["key"], q["key"]): (L, q) for L in manifest["layers"] for q in L["params"]}
    assert cat.all_param_keys() == list(plain)
    assert [L["name"] for L in cat.layers] == [L["name"] for L in manifest["layers"]]
    for (lk, pk), (L, q) in plain.items():
        assert cat.param_shape(lk, pk) == tuple(q["shape"])
        assert cat.param_meta(lk, pk) == (L["id"], L["name"], q["name"], int(np.prod(q["shape"])))
        assert cat.expected((fmt.KIND_GRADS, lk, pk)) == tuple(q["shape"])
        assert cat.expected((fmt.KIND_GRAD_STATS, lk, pk)) == (len(fmt.GRAD_STAT_FIELDS),)
    assert cat.expected((fmt.KIND_GRADS, "nope", "w")) is None
    with pytest.raises(KeyError):
        cat.param_shape(manifest["layers"][0]["key"], "nope")
    # the payload keys are the manifest's own strings (no string of the shard's index is kept)
    for kind, lk, pk in shard.payloads:
        L = cat.layer_by_key(lk)
        assert lk is L["key"] and any(pk is q["key"] for q in L["params"])
    # one string object per repeated value, equal values kept
    assert len({id(q["name"]) for L in cat.layers for q in L["params"]}) == len(SHAPES)
    assert len({id(L["type"]) for L in cat.layers}) == 1


def _frame(seed, multi_rank):
    """A per-step gradient frame: 1 to 6 parameters per layer, NaNs, values over 16 decades."""
    rng = np.random.default_rng(seed)
    rows = []
    for rank in (0, 1) if multi_rank else (0,):
        for step in range(6):
            for lid in range(30):
                for p in range(1 + lid % 6):
                    rows.append((rank, step, step // 3, lid, f"layer{lid}", f"p{p}"))
    df = pd.DataFrame(rows, columns=["rank", "step", "epoch", "layer_id", "layer", "param"])
    n = len(df)
    df["numel"] = rng.integers(1, 100, n)
    df["count"] = df["numel"] - rng.integers(0, 2, n)
    df["nonfinite"] = df["numel"] - df["count"]
    for c in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
        df[c] = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)
        df.loc[rng.random(n) < 0.1, c] = np.nan
    return df if multi_rank else df.drop(columns=["rank"])


@pytest.mark.parametrize("multi_rank", [False, True])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_pooling_and_epoch_table_equal_a_plain_groupby(multi_rank, order):
    df = _frame(7, multi_rank)
    if order == "shuffled":   # not sorted by its keys: the groupby path
        df = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    got = pool_params(df)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), pool_by_groupby(df), check_exact=True)
    keys = (["rank"] if multi_rank else []) + ["epoch", "layer_id", "layer", "param"]
    g = df.groupby(keys, sort=True)
    want = g.agg(n_steps=("step", "size"), mean=("mean", "mean"), abs_mean=("abs_mean", "mean"),
                 max_abs=("max_abs", "max"), var=("var", "mean"), l1=("l1", "mean"), l2=("l2", "mean"),
                 nonfinite=("nonfinite", "sum")).reset_index()
    want["l2_var"] = g["l2"].var(ddof=0).to_numpy()
    cat = type("Cat", (), {"layers": [], "lowest_rank": lambda self, *a: 0})()
    ep = epoch_table(cat, df, {}, multi_rank)
    for c in want.columns:
        np.testing.assert_array_equal(ep[c].to_numpy(), want[c].to_numpy(), err_msg=c)
    assert ep["grad_noise"].isna().all()


def test_group_code_orders_like_the_keys():
    df = _frame(2, True)
    code = group_code(df, ["rank", "epoch", "layer_id", "param"])
    key = list(zip(df["rank"], df["epoch"], df["layer_id"], df["param"]))
    rank = {k: i for i, k in enumerate(sorted(set(key)))}
    ranks = np.array([rank[k] for k in key])
    # the same partition, in the same order
    assert np.array_equal(np.unique(code, return_inverse=True)[1], ranks)
    assert group_code(df.assign(param=df["param"].where(df.index != 3)), ["param"]) is None   # a missing key


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._libc() is None, reason="glibc only")
def test_freed_large_blocks_go_back_to_the_os():
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024

    assert heap.return_large_blocks()
    x = np.ones(1 << 20)   # an 8 MB block freed: glibc's own threshold would grow to 8 MB (then this fails)
    del x
    small, blocks = [], []
    for i in range(96):   # 2 MB blocks between small live malloc'd objects: a heap cannot shrink under them
        blocks.append(np.ones(1 << 18))
        small.append(bytearray(1024))
    high = rss_mb()
    del blocks
    low = rss_mb()
    assert high - low > 150, (high, low)   # 192 MB were freed, unmapped at once


@pytest.mark.parametrize("with_l1", [True, False])
@pytest.mark.parametrize("order", ["sorted", "by parameter"])
def test_rules_layer_table_equals_a_plain_groupby(order, with_l1):
    from bbdecoder.analyzer.findings.data import grad_layer_table
    df = _frame(5, False).assign(abs_mean=lambda d: d["abs_mean"].abs())
    if not with_l1:   # a table without sum |g|: from abs_mean x count
        df = df.drop(columns=["l1"])
    if order != "sorted":   # (layer_id, param, step): not sorted by (step, layer_id), the groupby path
        df = df.sort_values(["layer_id", "param", "step"], kind="stable").reset_index(drop=True)
    d = df.assign(l1=df["l1"] if with_l1 else df["abs_mean"] * df["count"], _l2sq=df["l2"].fillna(0) ** 2)
    want = d.groupby(["step", "layer_id"], sort=True).agg(
        numel=("numel", "sum"), count=("count", "sum"), nonfinite=("nonfinite", "sum"), max_abs=("max_abs", "max"),
        l1=("l1", "sum"), _l2sq=("_l2sq", "sum"), layer=("layer", "first")).reset_index()
    got = grad_layer_table(df)
    for c in ("step", "layer_id", "layer", "numel", "count", "nonfinite", "max_abs"):
        np.testing.assert_array_equal(got[c].to_numpy(), want[c].to_numpy(), err_msg=c)
    np.testing.assert_array_equal(got["l2"].to_numpy(), np.sqrt(want["_l2sq"].to_numpy()))
    n = want["count"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(got["abs_mean"].to_numpy(), want["l1"].to_numpy() / np.where(n > 0, n, np.nan))
