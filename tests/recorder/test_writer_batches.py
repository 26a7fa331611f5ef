"""The background writer holds queued steps for the live shard's deadline (a slow training loop writes
a batch of steps at a time, not each step alone), and nothing recorded is lost or reordered by it:
checked with a fake shard series (when and what is written, shard by shard) and with a recorded run
read back with h5py against per-step statistics computed here from the activations themselves."""

import threading
import time

import h5py
import numpy as np
import torch

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.writer import BackgroundWriter
from helpers import Tiny, h5_payload, shard_path


class ShardSink:
    """A shard series in memory: the live shard opens at its first write and is closed after
    ``steps`` steps (in ``write``) or ``secs`` seconds (``tick``), as ``ShardSeriesWriter`` does."""

    def __init__(self, steps=100, secs=10.0, with_room=True):
        self.steps, self.secs = steps, secs
        self.writes, self.shards = [], []   # [records] per write call; (opened, closed, [records]) per shard
        self.live, self.opened = None, None
        self.closed_with = None
        self.lock = threading.Lock()
        if not with_room:
            self.room = None

    def write(self, recs):
        with self.lock:
            self.writes.append(list(recs))
            for r in recs:
                if self.live is None:
                    self.live, self.opened = [], time.monotonic()
                self.live.append(r)
                if len(self.live) >= self.steps:
                    self.rotate()

    def time_to_deadline(self):
        if self.live is None:
            return None
        return max(0.0, self.secs - (time.monotonic() - self.opened))

    def room(self):   # (replaced by None for a sink without it)
        return None if self.live is None else (self.steps - len(self.live), 1 << 30)

    def tick(self):
        if self.live is not None and self.time_to_deadline() <= 0:
            self.rotate()

    def rotate(self):
        if self.live:
            self.shards.append((self.opened, time.monotonic(), self.live))
        self.live = None

    def close(self, status):
        self.rotate()
        self.closed_with = status

    def abandon_live(self):
        pass

    def record_error(self, msg):
        pass


def _wait_for(cond, timeout=10.0):
    t = time.monotonic() + timeout
    while not cond() and time.monotonic() < t:
        time.sleep(0.005)
    assert cond()


def _slow_puts(w, items, gap):
    for i in items:
        time.sleep(gap)
        w.put(i, nbytes=1)


def test_slow_steps_are_written_a_batch_at_a_time_and_all_in_order():
    """Steps queued slower than batch_wait: the first opens the shard alone, the next ones wait for a
    batch of batch_items (not one write per step as without a live shard); close() mid-batch writes
    the rest. Every step is written once, in order."""
    sink = ShardSink()
    w = BackgroundWriter(sink, batch_items=4, batch_wait=0.02)
    w.put(0, nbytes=1)
    _wait_for(lambda: sink.live is not None)      # step 0 opened the live shard after batch_wait
    _slow_puts(w, range(1, 11), 0.04)             # 10 steps, each slower than batch_wait
    w.close()                                     # 2 steps still held: written at close
    assert [r for rec in sink.writes for r in rec] == list(range(11))
    assert sink.writes[0] == [0]
    assert len(sink.writes) <= 5                  # 1 + ceil(10 / 4) at most (one write per step before)
    assert all(len(rec) >= 2 for rec in sink.writes[1:])   # held in batches
    assert sink.shards[-1][2] == list(range(11)) and sink.closed_with == fmt.STATUS_COMPLETE


def test_held_steps_fill_the_shard_exactly_and_never_spill_into_the_next():
    """A shard of 3 steps: held steps are written when they fill its room, so every shard holds
    exactly 3 consecutive steps (the last one the rest), none waits for a later shard."""
    sink = ShardSink(steps=3)
    w = BackgroundWriter(sink, batch_items=16, batch_wait=0.02)
    w.put(0, nbytes=1)
    _wait_for(lambda: sink.live is not None)
    _slow_puts(w, range(1, 10), 0.03)
    w.close()
    assert [s[2] for s in sink.shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert max(len(rec) for rec in sink.writes) <= 3


def test_held_steps_reach_a_closed_shard_by_its_deadline():
    """The crash guarantee in time: a step held for the live shard is written before that shard's
    deadline and the shard is closed at it (not later), so a step queued at t is in a closed shard
    by t + flush_secs, as without holding."""
    sink = ShardSink(secs=0.3)
    w = BackgroundWriter(sink, batch_items=16, batch_wait=0.02)
    w.put("a", nbytes=1)
    _wait_for(lambda: sink.live is not None)
    t_put = time.monotonic()
    w.put("b", nbytes=1)                          # held: fits, and a batch of 16 never comes
    _wait_for(lambda: sink.shards, timeout=5)
    opened, closed, recs = sink.shards[0]
    assert recs == ["a", "b"] and sink.writes == [["a"], ["b"]]
    assert closed - opened < 0.3 + 1.0            # closed at its deadline (+ slack for a loaded machine)
    assert closed - t_put < 0.3 + 1.0
    w.close()


def test_a_sink_without_room_keeps_the_batch_wait():
    """Without ``room()`` (another sink) nothing is held: each slow step is written after batch_wait."""
    sink = ShardSink(with_room=False)
    w = BackgroundWriter(sink, batch_items=4, batch_wait=0.02)
    w.put(0, nbytes=1)
    _wait_for(lambda: sink.live is not None)
    for i in range(1, 5):
        w.put(i, nbytes=1)
        _wait_for(lambda: sink.live is not None and len(sink.live) == i + 1)   # written on its own
    w.close()
    assert sink.writes == [[i] for i in range(5)]


def test_recorded_activation_statistics_with_held_batches_read_back_exactly(tmp_path):
    """A recorder whose steps are slower than its writer's batch wait, shards of 5 steps, 13 steps (the
    last shard ends mid-batch at close): far fewer writes than steps, and every shard read with h5py
    holds its steps once, in order, with the per-unit sums, maxima and positive counts of each ReLU
    computed here from the captured outputs in float64."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs = {}   # (site, step) -> float64 (N, C, H, W)
    step = [0]

    def keep(name):
        return lambda m, a, out: outs.__setitem__((name, step[0]), out.detach().double().numpy().copy())
    for name in ("body.0", "body.2"):
        model.get_submodule(name).register_forward_hook(keep(name))
    d = tmp_path / "r"
    writes = [0]
    with Recorder(model, str(d), activations=True, grads_every=0, weights_every=0, flush_steps=5) as rec:
        wr = rec._writer
        wr.batch_wait = 0.01
        inner = wr.sink.write

        def counted(records):
            writes[0] += 1
            return inner(records)
        wr.sink.write = counted
        for s in range(13):
            step[0] = s
            loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 5, (8,)))
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
            time.sleep(0.025)                     # slower than the batch wait
    assert writes[0] <= 8                         # 13 steps: 3 shards, each its first step + at most one batch
    got = {}
    for i in range(3):
        with h5py.File(shard_path(d, i), "r") as f:
            assert f["steps/step"][()].tolist() == list(range(5 * i, min(5 * i + 5, 13)))
            for site in ("body.0", "body.2"):
                for stat in ("sum", "max", "n_pos", "count"):
                    st, vals = h5_payload(f, fmt.KIND_ACT_STATS, site, stat)
                    assert st.tolist() == f["steps/step"][()].tolist()
                    got.setdefault((site, stat), []).append(vals)
    for site in ("body.0", "body.2"):
        want = {"sum": [], "max": [], "n_pos": [], "count": []}
        for s in range(13):
            a = outs[(site, s)]
            want["sum"].append(a.sum((0, 2, 3)))
            want["max"].append(a.max((0, 2, 3)))
            want["n_pos"].append((a > 0).sum((0, 2, 3)))
            want["count"].append(a.size / a.shape[1])
        for stat, rows in want.items():
            g = np.concatenate(got[(site, stat)])
            assert g.shape[0] == 13
            np.testing.assert_allclose(g.reshape(13, -1), np.asarray(rows, np.float64).reshape(13, -1),
                                       rtol=1e-6, atol=1e-6, err_msg=f"{site} {stat}")
