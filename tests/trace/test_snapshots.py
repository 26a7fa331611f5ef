"""Raw gradient and weight snapshots stored flat (``/flat/<kind>/<n>``: the tensors of a step in one
row, an index of their places): every reader call gives what the per-tensor layout of older traces
gives, values bit-identical to what was written; hostile indexes are refused before any read."""

import json

import h5py
import numpy as np
import pytest

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.packed import FLAT_CHUNK_COL_BYTES, FlatLayout, flat_chunks
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
from bbdecoder.analyzer.trace.shards import MemoryBackend

#: (layer key, param key, shape, attrs): an FSDP2 slice (offset, global_shape), a scalar, an empty-free mix
TENSORS = [("L0", "weight", (4, 3), {"layer_id": 0, "param": "weight"}),
           ("L0", "bias", (4,), {"layer_id": 0, "param": "bias"}),
           ("L1", "weight", (2, 5), {"layer_id": 1, "param": "weight", "offset": 3,
                                     "global_shape": np.array([5, 5], np.int64)}),
           ("L2", "scale", (), {"layer_id": 2, "param": "scale"})]


def _layout(tensors):
    entries, off = [], 0
    for lk, pk, shape, attrs in tensors:
        n = int(np.prod(shape, dtype=np.int64))
        entries.append((lk, pk, off, n, shape, attrs))
        off += n
    return FlatLayout(entries)


def _row(s, tensors, dtype):
    """The flat row of step ``s``: tensor t holds 1000 s + 100 t + 0.5 * arange (exact in float16)."""
    return np.concatenate([(1000.0 * s + 100.0 * t + 0.5 * np.arange(int(np.prod(sh, dtype=np.int64)))).ravel()
                           for t, (_, _, sh, _) in enumerate(tensors)]).astype(dtype)


def _want(s, tensors, key, dtype):
    t = [(lk, pk) for lk, pk, _, _ in tensors].index(key)
    return _row(s, tensors, dtype)[sum(int(np.prod(x[2], dtype=np.int64)) for x in tensors[:t]):][
        :int(np.prod(tensors[t][2], dtype=np.int64))].reshape(tensors[t][2])


def _write(d, backend, seq, dtype, flush_steps=1000):
    """Steps 0.. with raw grads of the tensors ``seq[s]`` (None: none at that step), flat as the
    recorder hands them over; weights at even steps."""
    sw = ShardSeriesWriter(str(d), 0, flush_steps=flush_steps, backend=backend)
    recs = []
    for s, ts in enumerate(seq):
        pay = []
        if ts is not None:
            pay.append(("grads", None, _layout(ts), _row(s, ts, dtype), None))
        if s % 2 == 0:
            pay.append(("weights", None, _layout(TENSORS), _row(s, TENSORS, dtype) + 7, None))
        recs.append(StepRecord(s, 0, 0.0, 0.0, 0, pay))
    sw.write(recs)
    sw.close()
    return sw


def _everything(backend, d):
    """Every reader call on every payload of every shard of rank dir ``d``."""
    out = {}
    for p in sorted(d.glob("shard-*.h5")) if isinstance(backend, HDF5Backend) else sorted(backend.shards):
        r = backend.open(str(p))
        for kind in ("grads", "weights"):
            for key in sorted(r.payloads(kind)):
                rows, shape, _ = r.payload_info(kind, *key)
                attrs = {a: (v.tolist() if isinstance(v, np.ndarray) else v)
                         for a, v in r.payload_attrs(kind, *key).items()}
                full = r.read_payload(kind, *key, 0, rows)
                out[(str(p)[-9:], kind, key)] = (rows, shape, r.read_payload_steps(kind, *key).tolist(), attrs,
                                                 full, r.read_payload(kind, *key, 1, rows), full.dtype)
        r.close()
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_flat_and_per_tensor_layouts_read_identically(tmp_path, monkeypatch, dtype):
    """Same reads from the flat layout (rows kept and written at the close; or, with a tiny memory
    bound, written as they come, large rows one by one; with no read cache) as from the per-tensor
    layout and the in-memory store; the values exact in the stored dtype, several groups (a step
    without one tensor's gradient) merged in step order, FSDP2 placement attributes kept."""
    import bbdecoder.analyzer.trace.hdf5 as h5mod
    import bbdecoder.analyzer.trace.packed as pmod
    part = [t for t in TENSORS if t[1] != "bias"]
    seq = [TENSORS, part, TENSORS, None, part, TENSORS, TENSORS]
    _write(tmp_path / "old", HDF5Backend(packed=False), seq, dtype)
    ref = _everything(HDF5Backend(packed=False), tmp_path / "old")
    mem = MemoryBackend()
    _write(tmp_path / "mem", mem, seq, dtype)
    runs = {"mem": _everything(mem, tmp_path / "mem")}
    for bound, cache in ((h5mod.SMALL_BUFFER_BYTES, pmod.CACHE_BYTES), (64, 0)):
        monkeypatch.setattr(h5mod, "SMALL_BUFFER_BYTES", bound)
        monkeypatch.setattr(pmod, "CACHE_BYTES", cache)
        monkeypatch.setattr(pmod, "FLAT_CHUNK_COL_BYTES", 16 if bound == 64 else FLAT_CHUNK_COL_BYTES)
        d = tmp_path / f"flat{bound}"
        _write(d, HDF5Backend(), seq, dtype, flush_steps=4)   # two shards
        with h5py.File(d / fmt.shard_filename(0), "r") as f:
            objs = []
            f.visit(objs.append)
            assert "grads" not in f and "weights" not in f
            assert sorted(o for o in objs if o.startswith("flat/grads/")) == \
                ["flat/grads/0", "flat/grads/0/index", "flat/grads/0/steps", "flat/grads/0/values",
                 "flat/grads/1", "flat/grads/1/index", "flat/grads/1/steps", "flat/grads/1/values"]
            assert f["flat/grads/0/values"].dtype == dtype and f["flat/grads/0/steps"][()].tolist() == [0, 2]
        runs[bound] = _everything(HDF5Backend(), d)
    old_by_step = {}
    for (_, kind, key), v in ref.items():   # one shard of 7 steps vs two of 4 + 3: compare per step
        old_by_step[(kind, key)] = v
    for name, got in runs.items():
        merged: dict = {}
        for (_, kind, key), (rows, shape, steps, attrs, full, _, dt) in sorted(got.items()):
            e = merged.setdefault((kind, key), [0, shape, [], attrs, [], dt])
            e[0] += rows
            e[2] += steps
            e[4].append(full)
        assert sorted(merged) == sorted(old_by_step), name
        for k, (rows, shape, steps, attrs, fulls, dt) in merged.items():
            o = old_by_step[k]
            assert (rows, shape, steps, attrs, dt) == (o[0], o[1], o[2], o[3], o[6]), (name, k)
            full = np.concatenate(fulls)
            assert full.dtype == dtype and np.array_equal(full, o[4]), (name, k)
            want = np.stack([_want(s, seq[s], k[1], dtype) if k[0] == "grads" else _want(s, TENSORS, k[1], dtype) + 7
                             for s in steps])
            assert np.array_equal(full, want.astype(dtype)), (name, k)
    # a slice [1, rows) of one shard: the rows asked for only
    for (shard, kind, key), v in runs[64].items():
        assert np.array_equal(v[5], v[4][1:])
    assert old_by_step[("weights", ("L1", "weight"))][3] == {"layer_id": 1, "param": "weight", "offset": 3,
                                                            "global_shape": [5, 5]}


def test_chunks_let_one_tensor_be_read_without_the_whole_row(tmp_path):
    """A row of 600,000 float32 values (2.4 MB) is chunked in column blocks of 256 KiB: one small
    tensor's rows across the steps touch one block, not the row."""
    big = [("L0", "weight", (600, 999), {}), ("L1", "bias", (600,), {})]
    layout = _layout(big)
    w = HDF5Backend().create(str(tmp_path / "s.h5"), {}, max_rows=10)
    rows = np.stack([_row(s, big, np.float32) for s in range(3)])
    w.append_flat("grads", layout, np.arange(3), rows)
    w.append_steps({"step": np.arange(3), "epoch": np.zeros(3), "loss": np.zeros(3), "time": np.zeros(3),
                    "dropped": np.zeros(3, np.int32)})
    w.close()
    cols = FLAT_CHUNK_COL_BYTES // 4
    assert flat_chunks(layout.size, 4, 3) == (3, cols)      # 256 KiB of a row, 1 MiB / 256 KiB = 4 rows at most
    assert flat_chunks(layout.size, 4, 1) == (1, cols) and flat_chunks(layout.size, 4, 9) == (4, cols)
    assert flat_chunks(100, 4, 3) == (3, 100) and flat_chunks(100, 4, 5000) == (2621, 100)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        v = f["flat/grads/0/values"]
        assert v.shape == (3, 600 * 999 + 600) and v.chunks == (3, cols)
        # the bias sits at columns [599400, 600000): chunk column blocks 9 and 10 of 10
        assert 599400 // cols == 9
    r = HDF5Backend().open(str(tmp_path / "s.h5"))
    np.testing.assert_array_equal(r.read_payload("grads", "L1", "bias", 0, 3),
                                  np.stack([_want(s, big, ("L1", "bias"), np.float32) for s in range(3)]))
    r.close()


def _idx(entries):
    return np.frombuffer(json.dumps(entries).encode(), np.uint8)


GOOD = [["L0", "weight", {}, 0, 12, [4, 3]], ["L0", "bias", {}, 12, 4, [4]]]


@pytest.mark.parametrize("case, why", [
    ("past_end", "outside rows of"), ("numel", "outside rows of"), ("negative", "non-negative integers"),
    ("bool", "non-negative integers"), ("shape", "non-negative integers"), ("dims", "non-negative integers"),
    ("short", "non-negative integers"), ("key", "valid keys"), ("twice", "twice"), ("attrs", "not scalars"),
    ("dtype", "uint8"), ("json", "not UTF-8 JSON"), ("ndim", "do not fit"), ("rows", "do not fit"),
    ("shapes", "in another group"), ("both", "both packed and on its own"), ("absurd", "absurd size"),
    ("link", "SoftLink")])
def test_hostile_flat_groups_are_refused(tmp_path, case, why):
    """A corrupt or hostile flat group is a one-line TraceError naming the shard, raised before any
    values are read (a place past the row's end, a numel that is not the shape's, huge declared sizes)."""
    tensors = [("L0", "weight", (4, 3), {}), ("L0", "bias", (4,), {})]
    _write(tmp_path, HDF5Backend(), [tensors] * 3, np.float32)
    path = tmp_path / fmt.shard_filename(0)
    bad = {"past_end": [GOOD[0], ["L0", "bias", {}, 13, 4, [4]]],
           "numel": [GOOD[0], ["L0", "bias", {}, 12, 10 ** 12, [4]]],
           "negative": [GOOD[0], ["L0", "bias", {}, -4, 4, [4]]],
           "bool": [GOOD[0], ["L0", "bias", {}, True, 4, [4]]],
           "shape": [GOOD[0], ["L0", "bias", {}, 12, 4, 4]],
           "dims": [GOOD[0], ["L0", "bias", {}, 12, 1, [1] * 40]],
           "short": [GOOD[0], ["L0", "bias", {}, 12]],
           "key": [GOOD[0], ["../x", "bias", {}, 12, 4, [4]]],
           "twice": [GOOD[0], GOOD[0]],
           "attrs": [GOOD[0], ["L0", "bias", {"a": {"b": 1}}, 12, 4, [4]]]}
    with h5py.File(path, "r+") as f:
        g = f["flat/grads/0"]
        if case in bad:
            del g["index"]
            g["index"] = _idx(bad[case])
        elif case in ("dtype", "json"):
            del g["index"]
            g["index"] = _idx(GOOD).astype(np.float32) if case == "dtype" else np.frombuffer(b"[[\"L0\", ", np.uint8)
        elif case == "ndim":
            v = g["values"][()]
            del g["values"]
            g["values"] = v.reshape(3, 4, 4)
        elif case == "rows":
            del g["steps"]
            g["steps"] = np.arange(2)
        elif case == "shapes":   # the same tensor with another shape in a second group
            f.copy(g, "flat/grads/1")
            del f["flat/grads/1/index"]
            f["flat/grads/1/index"] = _idx([["L0", "weight", {}, 0, 12, [3, 4]]])
        elif case == "both":
            f["grads/L0/bias/values"] = np.zeros((1, 4), np.float32)
            f["grads/L0/bias/steps"] = np.zeros(1, np.int64)
        elif case == "absurd":   # declares 40 GB, stores nothing: never read
            del g["values"]
            g.create_dataset("values", shape=(10 ** 4, 10 ** 6), chunks=(1, 10 ** 6), dtype="f4")
            del g["steps"]
            g["steps"] = np.arange(10 ** 4)
        elif case == "link":
            f["flat/grads/1"] = h5py.SoftLink("/flat/grads/0")
    r = HDF5Backend().open(str(path))
    with pytest.raises(fmt.TraceError, match=f"corrupt shard.*{why}"):
        r.payloads("grads")
        r.read_payload("grads", "L0", "bias", 0, 3)
    assert sorted(r.payloads("weights")) == [("L0", "bias"), ("L0", "weight"), ("L1", "weight"), ("L2", "scale")]
    r.close()


@pytest.mark.parametrize("cache", ["whole", "none"])
def test_a_read_is_the_callers_own_array(tmp_path, monkeypatch, cache):
    """A flat read is either a view of what the reader keeps (a group read whole, a block of columns)
    and then copied, or read from the file for that call and handed out as it is (no second copy of
    the raw tensors): either way writing into it never changes what a later read gives."""
    import bbdecoder.analyzer.trace.packed as pmod
    if cache == "none":
        monkeypatch.setattr(pmod, "CACHE_BYTES", 0)
    seq = [TENSORS] * 5
    _write(tmp_path, HDF5Backend(), seq, np.float32)
    r = HDF5Backend().open(str(tmp_path / fmt.shard_filename(0)))
    for kind in ("grads", "weights"):
        for key in sorted(r.payloads(kind)):
            rows = r.payload_info(kind, *key)[0]
            for a, b in ((0, rows), (1, rows)):
                got = r.read_payload(kind, *key, a, b)
                want = got.copy()
                got[...] = -1.0
                again = r.read_payload(kind, *key, a, b)
                assert np.array_equal(again, want) and not np.shares_memory(again, got), (kind, key, a)
    r.close()
