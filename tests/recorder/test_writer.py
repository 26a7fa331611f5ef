"""Background writer semantics, ported from TensorBoard's EventFileWriter tests."""

import threading
import time

import pytest

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.recorder.writer import BackgroundWriter, WriterClosedError, WriterError


class FakeSink:
    def __init__(self, fail_on=None, gate=None):
        self.records, self.rotations, self.ticks = [], 0, 0
        self.closed_with = None
        self.errors = []
        self.fail_on, self.gate = fail_on, gate
        self.deadline = None

    def write(self, recs):
        if self.gate is not None:
            self.gate.wait(10)
        for r in recs:
            if r == self.fail_on:
                raise OSError(28, "No space left on device")
            self.records.append(r)

    def tick(self):
        self.ticks += 1

    def time_to_deadline(self):
        return self.deadline

    def rotate(self):
        self.rotations += 1

    def close(self, status):
        self.closed_with = status

    def abandon_live(self):
        pass

    def record_error(self, msg):
        self.errors.append(msg)


def test_flush_waits_for_everything_queued():
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    w = BackgroundWriter(sink)
    for i in range(20):
        w.put(i, nbytes=1)
    threading.Timer(0.2, gate.set).start()
    assert w.flush(timeout=10)
    assert sink.records == list(range(20))
    assert sink.rotations == 1  # flush publishes the live shard
    w.close()


def test_drain_waits_for_everything_queued_without_publishing():
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    w = BackgroundWriter(sink, batch_items=1000, batch_wait=60)   # left alone it would wait a minute
    for i in range(5):
        w.put(i, nbytes=1)
    threading.Timer(0.2, gate.set).start()
    t = time.perf_counter()
    assert w.drain(timeout=10)
    assert time.perf_counter() - t < 5
    assert sink.records == list(range(5))
    assert sink.rotations == 0              # nothing published, unlike flush
    assert w.drain(timeout=1)               # nothing queued: returns at once
    w.close()
    assert w.drain() and sink.closed_with == fmt.STATUS_COMPLETE


def test_drain_reraises_a_writer_error():
    w = BackgroundWriter(FakeSink(fail_on=1))
    w.put(0, nbytes=1)
    w.put(1, nbytes=1)
    with pytest.raises(WriterError):
        w.drain(timeout=10)
    w.close(raise_error=False)


def test_close_is_idempotent_and_writes_the_rest():
    sink = FakeSink()
    w = BackgroundWriter(sink)
    for i in range(5):
        w.put(i, nbytes=8)
    w.close()
    w.close()
    assert sink.records == list(range(5)) and sink.closed_with == fmt.STATUS_COMPLETE


def test_put_after_close_raises():
    w = BackgroundWriter(FakeSink())
    w.close()
    with pytest.raises(WriterClosedError):
        w.put(1)


def test_error_in_writer_is_reraised_in_caller_once():
    sink = FakeSink(fail_on=3)
    w = BackgroundWriter(sink)
    for i in range(5):
        w.put(i, nbytes=1)
    with pytest.raises(WriterError) as ei:
        w.flush(timeout=10)
    assert isinstance(ei.value.__cause__, OSError)
    assert sink.records == [0, 1, 2]
    assert "No space left" in sink.errors[0]
    w.put(7, nbytes=1)        # surfaced once; later items are discarded, never block
    assert w.flush(timeout=10)
    w.close()
    assert sink.records == [0, 1, 2] and sink.closed_with == fmt.STATUS_FAILED


def test_error_surfaces_on_close_if_not_seen_before():
    sink = FakeSink(fail_on=0)
    w = BackgroundWriter(sink)
    w.put(0, nbytes=1)
    time.sleep(0.2)
    with pytest.raises(WriterError):
        w.close()


def test_full_queue_blocks_until_the_writer_catches_up():
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    w = BackgroundWriter(sink, max_items=3, on_full="block")
    w.put(0, nbytes=1)          # taken by the writer, which waits on the gate
    time.sleep(0.1)
    w.put(1, nbytes=1)
    w.put(2, nbytes=1)          # now full: 1 item being written + 2 queued
    done = threading.Event()
    threading.Thread(target=lambda: (w.put(3, nbytes=1), done.set()), daemon=True).start()
    assert not done.wait(0.3)   # blocked
    gate.set()
    assert done.wait(5)
    w.close()
    assert sink.records == [0, 1, 2, 3] and w.dropped == 0


def test_full_queue_drop_policy_counts_drops():
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    # the bound counts the items being written too: that is memory still held
    w = BackgroundWriter(sink, max_items=2, max_bytes=100, on_full="drop")
    kept = [w.put(("p", 0), nbytes=10, drop_payload=lambda it: ("dropped", it[1]))]
    time.sleep(0.1)
    for i in range(1, 5):
        kept.append(w.put(("p", i), nbytes=10, drop_payload=lambda it: ("dropped", it[1])))
    gate.set()
    w.close()
    assert kept == [True, True, False, False, False]
    assert w.dropped == 3
    assert sink.records == [("p", 0), ("p", 1), ("dropped", 2), ("dropped", 3), ("dropped", 4)]


def test_bytes_bound_counts_like_items():
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    w = BackgroundWriter(sink, max_items=100, max_bytes=25, on_full="drop")
    w.put("a", nbytes=10)
    time.sleep(0.1)
    assert w.put("b", nbytes=10, drop_payload=lambda x: x + "!")       # 20 bytes held
    assert not w.put("c", nbytes=10, drop_payload=lambda x: x + "!")   # 30 > 25
    assert w.put("d", nbytes=5, drop_payload=lambda x: x + "!")        # 25 fits
    gate.set()
    w.close()
    assert sink.records == ["a", "b", "c!", "d"]


def test_idle_writer_ticks_at_the_deadline():
    sink = FakeSink()
    sink.deadline = 0.05        # a live shard whose time runs out every 50 ms
    w = BackgroundWriter(sink)
    w.put("x", nbytes=1)
    assert w.flush(timeout=5)
    t0 = sink.ticks
    time.sleep(0.5)
    assert sink.ticks - t0 >= 3  # ticked while idle, without any put
    w.close()


def test_bad_arguments():
    with pytest.raises(ValueError):
        BackgroundWriter(FakeSink(), on_full="maybe")
    with pytest.raises(ValueError):
        BackgroundWriter(FakeSink(), max_items=0)


# ------------------------------------------------------------------ raw snapshots stored flat
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_snapshots_round_trip_exactly_in_their_storage_dtype(tmp_path, dtype):
    """Raw gradients and weights recorded by the Recorder (one flat group per kind and shard) read back
    bit-identical to the torch tensors of the training loop cast to the storage dtype."""
    import h5py
    import numpy as np
    from helpers import record_tiny
    from bbdecoder import analyzer
    d = tmp_path / "r"
    cap = record_tiny(str(d), epochs=1, steps_per_epoch=4, weights_every=2, flush_steps=3,
                      grad_dtype=dtype, weight_dtype=dtype)
    with h5py.File(d / fmt.rank_dirname(0) / fmt.shard_filename(0), "r") as f:
        assert "grads" not in f and "weights" not in f
        assert f["flat/grads/0/values"].shape == (3, sum(g[0].size for g in cap["grads"].values()))
        assert f["flat/grads/0/values"].dtype == np.dtype(dtype) and f["flat/weights/0/steps"][()].tolist() == [0, 2]
    run = analyzer.open(str(d))
    for kind in ("grads", "weights"):
        for (layer, param), per_step in cap[kind].items():
            assert sorted(per_step) == ([0, 1, 2, 3] if kind == "grads" else [0, 2])
            for s, want in per_step.items():
                got = run.raw_tensor(kind, layer, param, s)
                assert got.dtype == np.dtype(dtype) and np.array_equal(got, want.astype(dtype)), (kind, layer, s)


def test_old_per_tensor_snapshots_read_identically(tmp_path):
    """A recorded run and the same shards rewritten with h5py into the per-tensor layout of older
    traces (helpers.unflatten_snapshots): raw tensors, weight statistics and histograms, gradient
    statistics per step and epoch (the gradient noise comes from the raw rows), what is recorded,
    and every report table are identical."""
    import numpy as np
    import pandas as pd
    from helpers import copy_run, record_tiny, unflatten_snapshots
    from bbdecoder import analyzer
    from bbdecoder.analyzer.report.data import load_frames
    d = tmp_path / "r"
    cap = record_tiny(str(d), epochs=2, steps_per_epoch=4, grads_every=2, weights_every=3, flush_steps=3)
    old = copy_run(d, tmp_path)
    assert unflatten_snapshots(old) == 3 + 3        # grads in 3 shards, weights (steps 0, 3, 6) in 3
    a, b = analyzer.open(str(d)), analyzer.open(str(old))
    assert a.problems == b.problems == [] and a.recorded() == b.recorded()
    for kind in ("grads", "weights"):
        for (layer, param), per_step in cap[kind].items():
            for s, want in per_step.items():
                x, y = a.raw_tensor(kind, layer, param, s), b.raw_tensor(kind, layer, param, s)
                assert np.array_equal(x, want) and np.array_equal(y, want)
    pd.testing.assert_frame_equal(a.weight_stats(), b.weight_stats(), rtol=0, atol=0)
    for kw in ({}, {"per": "epoch"}, {"by": "layer"}):
        pd.testing.assert_frame_equal(a.grad_stats(**kw), b.grad_stats(**kw), rtol=0, atol=0)
    assert a.grad_stats(per="epoch")["grad_noise"].notna().all()
    ha, hb = a.weight_histograms(0, bins=8), b.weight_histograms(0, bins=8)
    assert np.array_equal(ha.counts, hb.counts) and np.array_equal(ha.edges, hb.edges)
    fa, fb = load_frames(a), load_frames(b)
    for name in fa._fields:
        x, y = getattr(fa, name), getattr(fb, name)
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, rtol=0, atol=0, obj=name)
        else:
            assert x == y if not isinstance(x, np.ndarray) else np.array_equal(x, y)
