"""What a reader keeps between opens of the same unchanged shard (analyses reopen every shard once
per layer or activation site when a run has more shards than the readers kept open): the decoded
index of a packed or flat group (by its bytes) and the shard's root attributes (by the file's
identity). Checked against the values written and against h5py edits of the files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace import packed as P
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.packed import FlatLayout
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord

SITES = [("s0", "sum", (4,)), ("s0", "count", ()), ("s1", "sum", (3,)), ("s1", "count", ())]
ATTRS = {"layer_id": 2, "param": "weight", "offset": 3, "global_shape": np.array([5, 5], np.int64)}


def _write(d, steps: int, flush_steps: int) -> None:
    """Activation statistics (flat, as the recorder hands them over) and one raw gradient with
    FSDP2 placement attributes every step; step s's values are 100 s + the column index."""
    ent, off = [], 0
    for lk, pk, shape in SITES:
        n = int(np.prod(shape, dtype=np.int64))
        ent.append((lk, pk, off, n, shape, None))
        off += n
    act = FlatLayout(ent)
    grads = FlatLayout([("L2", "weight", 0, 10, (2, 5), ATTRS)])
    sw = ShardSeriesWriter(str(d), 0, flush_steps=flush_steps, backend=HDF5Backend())
    sw.write([StepRecord(s, 0, 0.0, 0.0, 0, [
        (fmt.KIND_ACT_STATS, None, act, 100.0 * s + np.arange(off, dtype=np.float64), None),
        (fmt.KIND_GRADS, None, grads, (100.0 * s + np.arange(10)).astype(np.float32), None)])
        for s in range(steps)])
    sw.close()


def test_the_same_index_is_decoded_once_whichever_shard_or_reader_holds_it(tmp_path, monkeypatch):
    _write(tmp_path, steps=12, flush_steps=1)    # 12 shards, each with the same two indexes
    calls = []
    real = P._decode
    monkeypatch.setattr(P, "_decode", lambda b, *a: calls.append(len(b)) or real(b, *a))
    monkeypatch.setattr(P, "_decoded", type(P._decoded)())
    monkeypatch.setattr(P, "_decoded_bytes", [0])
    be = HDF5Backend()
    for _ in range(3):                            # every shard opened three times
        for s in range(12):
            with be.open(str(tmp_path / fmt.shard_filename(s))) as r:
                for lk, pk, shape in SITES:
                    got = r.read_payload(fmt.KIND_ACT_STATS, lk, pk, 0, 1)
                    start = sum(int(np.prod(x[2], dtype=np.int64)) for x in SITES[:SITES.index((lk, pk, shape))])
                    want = 100.0 * s + np.arange(start, start + int(np.prod(shape, dtype=np.int64)))
                    np.testing.assert_array_equal(got, want.reshape((1, *shape)))
                a = r.payload_attrs(fmt.KIND_GRADS, "L2", "weight")
                assert a["offset"] == 3 and a["global_shape"].tolist() == [5, 5]
                a["offset"] = -1                  # a caller's dict is its own copy ...
                with pytest.raises(ValueError):
                    a["global_shape"][0] = 9      # ... and the shared arrays are read-only
    assert len(calls) == 2                        # one decode per distinct index (act_stats, grads)


def test_a_bad_index_is_refused_at_every_open(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_decoded", type(P._decoded)())
    monkeypatch.setattr(P, "_decoded_bytes", [0])
    _write(tmp_path, steps=2, flush_steps=1)
    bad = np.frombuffer(json.dumps([["s0", "sum", {}, 0, 4, [4]], ["s0", "sum", {}, 4, 1, []]]).encode(), np.uint8)
    for s in range(2):
        with h5py.File(tmp_path / fmt.shard_filename(s), "r+") as f:
            del f["flat/act_stats/0/index"]
            f["flat/act_stats/0/index"] = bad
    be = HDF5Backend()
    for _ in range(2):
        for s in range(2):
            with be.open(str(tmp_path / fmt.shard_filename(s))) as r, pytest.raises(TraceError, match="twice"):
                r.read_payload(fmt.KIND_ACT_STATS, "s0", "sum", 0, 1)


def test_root_attributes_are_read_again_when_the_file_changes(tmp_path):
    _write(tmp_path, steps=1, flush_steps=1)
    path = str(tmp_path / fmt.shard_filename(0))
    be = HDF5Backend()
    with be.open(path) as r:
        assert r.attrs["format"] == fmt.FORMAT_NAME
    with be.open(path) as r:                      # the same file: the attributes remembered
        assert r.attrs["format"] == fmt.FORMAT_NAME
        r.attrs["format"] = "changed by a caller"
    with be.open(path) as r:                      # a caller's change never reaches the next reader
        assert r.attrs["format"] == fmt.FORMAT_NAME
    with h5py.File(path, "r+") as f:              # a changed file is another file: read again
        f.attrs["format"] = "not ours"
        f.attrs["padding"] = np.zeros(4096)      # (and its size changes)
    with pytest.raises(TraceError, match="not a bbdecoder shard"):
        be.open(path)
