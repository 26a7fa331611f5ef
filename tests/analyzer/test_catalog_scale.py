"""Issue 16 at 100,000 layers, the reading side: a packed gradient-statistics group too large to keep
is read a block of consecutive columns at a time (bounded bytes per read, each block read once by a
caller that walks the payloads in the shard's order), and gives exactly what a read of one column at a
time gives; the index of a packed group is still checked entry by entry (hostile entries refused),
and a declared size far beyond what the file stores is still refused before any read."""

import json

import h5py
import numpy as np
import pytest

import bbdecoder.analyzer.trace.packed as pmod
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord

P, STEPS = 37, 9


def _random_shard(d, seed=0):
    """One shard of packed gradient statistics (random float64 values): the steps with one parameter
    missing start a second group. Returns (path, {key: (steps (k,), values (k, 6))}) computed here."""
    rng = np.random.default_rng(seed)
    full = tuple((f"blocks.{i // 4}.mlp.{i % 4}", "weight" if i % 2 else "bias") for i in range(P))
    part = full[:5] + full[6:]
    seq = [full if s % 3 else part for s in range(STEPS)]
    want: dict = {k: ([], []) for k in full}
    recs = []
    for s, ks in enumerate(seq):
        vals = rng.standard_normal((len(ks), 6))
        attrs = [{"layer_id": i, "shape": [i, 2]} for i in range(len(ks))]
        recs.append(StepRecord(s, 0, 0.0, 0.0, 0, [("grad_stats", None, ks, vals, attrs)]))
        for j, k in enumerate(ks):
            want[k][0].append(s)
            want[k][1].append(vals[j])
    sw = ShardSeriesWriter(str(d), 0, flush_steps=1000, backend=HDF5Backend())
    sw.write(recs)
    sw.close()
    return d / fmt.shard_filename(0), {k: (np.array(st), np.array(v)) for k, (st, v) in want.items()}


@pytest.fixture
def spy_reads(monkeypatch):
    """Bytes of every read of a packed ``values`` dataset (h5py Dataset.__getitem__)."""
    got = []
    orig = h5py.Dataset.__getitem__

    def spy(self, sel):
        out = orig(self, sel)
        if self.name.endswith("/values"):
            got.append(int(np.asarray(out).nbytes))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return got


@pytest.mark.parametrize("order", ["stored", "sorted", "random"])
def test_block_reads_equal_column_reads_and_stay_bounded(tmp_path, monkeypatch, spy_reads, order):
    path, want = _random_shard(tmp_path)
    monkeypatch.setattr(pmod, "CACHE_BYTES", 0)   # never keep a whole group
    width = 5
    monkeypatch.setattr(pmod, "BLOCK_BYTES", width * STEPS * 6 * 8)   # 5 columns of the larger group
    r = HDF5Backend().open(str(path))
    keys = r.payloads("grad_stats")
    assert keys[:P] == list(want) or sorted(keys) == sorted(want)
    walk = {"stored": keys, "sorted": sorted(keys),
            "random": [keys[i] for i in np.random.default_rng(1).permutation(len(keys))]}[order]
    for k in walk:
        steps, vals = want[k]
        np.testing.assert_array_equal(r.read_payload_steps("grad_stats", *k), steps)
        assert np.array_equal(r.read_payload("grad_stats", *k, 0, len(steps)), vals)      # bit-identical
        assert np.array_equal(r.read_payload("grad_stats", *k, 1, 4), vals[1:4])          # part of the rows
        assert r.payload_attrs("grad_stats", *k)["shape"].tolist() == [r.payload_attrs("grad_stats", *k)
                                                                        ["layer_id"], 2]
    r.close()
    budget = width * STEPS * 6 * 8
    assert spy_reads and max(spy_reads) <= budget   # no read larger than the block budget
    rows = {3: 15, 6: 7}   # the groups' rows -> columns in a block (budget // bytes of a column)
    blocks = [n for n in spy_reads if n > 6 * 6 * 8]   # larger than any one column's read
    # stored order: each block of each group read once, and once more the second group's first block
    # for the payload only it holds (listed last)
    if order == "stored":
        assert len(blocks) == -(-(P - 1) // rows[3]) + -(-P // rows[6]) + 1, blocks
    # any order: bytes read in blocks at most BLOCK_REREAD times the groups' bytes (+ one block each)
    assert sum(blocks) <= (pmod.BLOCK_REREAD + 1) * (STEPS * P * 6 * 8) + 2 * budget


def test_one_column_larger_than_the_budget_is_read_alone(tmp_path, monkeypatch, spy_reads):
    path, want = _random_shard(tmp_path, seed=3)
    monkeypatch.setattr(pmod, "CACHE_BYTES", 0)
    monkeypatch.setattr(pmod, "BLOCK_BYTES", STEPS * 6 * 8)   # one column: no block of two
    r = HDF5Backend().open(str(path))
    for k in r.payloads("grad_stats"):
        steps, vals = want[k]
        assert np.array_equal(r.read_payload("grad_stats", *k, 0, len(steps)), vals)
    r.close()
    assert max(spy_reads) <= STEPS * 6 * 8


@pytest.mark.parametrize("attrs, why", [({"a": None}, "attributes"), ({"a": {"b": 1}}, "attributes"),
                                        ({"a": [1.5]}, "attributes"), ({"a": [1, "x"]}, "attributes")])
def test_hostile_index_attributes_refused(tmp_path, attrs, why):
    path, _ = _random_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        g = f["packed/grad_stats/0"]
        ix = json.loads(g["index"][()].tobytes())
        ix[3][2] = attrs
        del g["index"]
        g["index"] = np.frombuffer(json.dumps(ix).encode(), np.uint8)
    r = HDF5Backend().open(str(path))
    with pytest.raises(fmt.TraceError, match=f"corrupt shard.*{why}"):
        r.payloads("grad_stats")
    r.close()


@pytest.mark.parametrize("key", ["L0\n", "../x", 7, "", "a" * 201])
def test_hostile_index_keys_refused(tmp_path, key):
    path, _ = _random_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        g = f["packed/grad_stats/0"]
        ix = json.loads(g["index"][()].tobytes())
        ix[-1][0] = key
        del g["index"]
        g["index"] = np.frombuffer(json.dumps(ix).encode(), np.uint8)
    r = HDF5Backend().open(str(path))
    with pytest.raises(fmt.TraceError, match="corrupt shard.*valid keys"):
        r.payloads("grad_stats")
    r.close()


def test_declared_columns_beyond_what_is_stored_refused_before_a_block_read(tmp_path, monkeypatch, spy_reads):
    """A values dataset declaring 10^8 columns (4.3 GB of rows) over a few stored bytes is refused
    when the group is opened: the block budget never meets a declared size that was not checked."""
    monkeypatch.setattr(pmod, "CACHE_BYTES", 0)
    path, _ = _random_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        g = f["packed/grad_stats/0"]
        k = g["values"].shape[0]
        del g["values"]
        g.create_dataset("values", shape=(k, 10 ** 8, 6), chunks=(1, 1000, 6), dtype="f8")
    r = HDF5Backend().open(str(path))
    with pytest.raises(fmt.TraceError, match="corrupt shard.*(absurd|declares|stores)"):
        r.payloads("grad_stats")
    r.close()
    assert not spy_reads   # nothing of it was read


@pytest.mark.parametrize("multi_rank", [False, True])
def test_part_frame_equals_a_stable_sort_of_the_concatenated_parts(multi_rank):
    """part_frame builds the frame a column at a time in (rank,) step, layer_id, param order; the
    reference is pandas' own stable sort of the plain concatenation (repeated keys keep part order)."""
    import pandas as pd
    from bbdecoder.analyzer.engine import part_frame
    rng = np.random.default_rng(5)
    cols = ["step", "epoch", "layer_id", "layer", "param", "numel", "mean"]
    parts, ref = [], []
    for i in range(40):
        n = int(rng.integers(1, 30))
        p = {"step": rng.integers(0, 6, n), "epoch": rng.integers(0, 2, n), "layer_id": rng.integers(0, 12, n),
             "layer": f"blocks.{i % 11}", "param": ["weight", "bias", "blocks.10.w", "blocks.2.w"][i % 4],
             "numel": int(rng.integers(1, 9)), "mean": rng.standard_normal(n), "rank": i % 3}
        parts.append(p)
        ref.append(pd.DataFrame({c: np.broadcast_to(np.asarray(p[c]), n) if np.ndim(p[c]) == 0 else p[c]
                                 for c in cols + (["rank"] if multi_rank else [])}))
    want = pd.concat(ref, ignore_index=True).astype({"step": "int64", "epoch": "int64", "layer_id": "int64",
                                                      "numel": "int64"})
    want = want.sort_values((["rank"] if multi_rank else []) + ["step", "layer_id", "param"], kind="stable",
                            ignore_index=True)
    got = part_frame(parts, cols, multi_rank)
    pd.testing.assert_frame_equal(got, want.astype({"rank": "int64"}) if multi_rank else want)
    assert not parts   # consumed
