"""Writing one rank's series of shards: rotation, publishing, background fsync, rank.json."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import files
from . import format as fmt
from .hdf5 import STACK_MAX_BYTES, HDF5Backend
from .packed import FlatLayout
from .shards import ShardWriter

# --------------------------------------------------------------------------- series writer

@dataclass
class StepRecord:
    """One optimizer step as the writer receives it (numpy only, no torch)."""

    step: int
    epoch: int
    loss: float
    time: float
    dropped: int = 0
    #: (kind, layer_key, param_key, array (*shape), attrs); or, for several payloads of one kind
    #: that arrive together, (kind, None, ((layer_key, param_key), ...), array (P, *shape), [attrs]);
    #: or, for tensors of several shapes concatenated (raw snapshots), (kind, None, layout, array (N,),
    #: None) with a :class:`~.packed.FlatLayout` saying where each tensor is
    payloads: list = field(default_factory=list)
    #: {payload kind: int64 (2,)}: values of the step's payloads of that kind that their float16 storage
    #: turned into 0 (non-zero before: underflow) and into inf (finite before: overflow); only the kinds
    #: stored as float16 (their shards get the attributes ``format.CAST_COUNT_ATTRS``)
    casts: dict = field(default_factory=dict)


class ShardSeriesWriter:
    """Writes one rank's series of shards and keeps ``rank.json`` current.

    A shard is closed (and becomes visible to readers) after ``flush_steps`` steps, after
    ``flush_secs`` seconds, or after ``max_shard_bytes`` bytes, whichever comes first. A crash loses
    at most the live shard, i.e. at most that window.
    """

    def __init__(self, rank_dir: str, rank: int, flush_steps: int = 100, flush_secs: float = 10.0,
                 max_shard_bytes: int = 1 << 30, backend=None, clock: Callable[[], float] = time.monotonic):
        self.rank_dir, self.rank = rank_dir, rank
        self.flush_steps, self.flush_secs, self.max_shard_bytes = flush_steps, flush_secs, max_shard_bytes
        self.backend = backend or HDF5Backend()
        self.clock = clock
        self._w: ShardWriter | None = None
        self._live = self._final = None
        self._live_ok = True        # False while a write into the live shard is under way (or failed)
        self._opened_at = 0.0
        self._n_in_shard = 0
        self._last_step: int | None = None
        self.shard_index = 0
        self.state = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "rank": rank,
                      "status": fmt.STATUS_RECORDING, "shards": 0, "steps_flushed": 0,
                      "last_step": None, "dropped": 0, "bytes": 0, "errors": [], "warnings": []}
        self._lock = threading.RLock()
        # published shards waiting for fsync, synced by a background thread (at most 2 pending)
        self._sync_cv = threading.Condition()
        self._sync_q: list[str] = []
        self._sync_busy = False
        self._sync_error: BaseException | None = None
        self._sync_thread: threading.Thread | None = None
        os.makedirs(rank_dir, exist_ok=True)
        self.write_state()

    # -- state file
    def write_state(self):
        with self._lock:
            st = dict(self.state, updated=time.time())
            files.write_json_atomic(os.path.join(self.rank_dir, fmt.RANK_FILE), st)

    def update_state(self, **fields) -> None:
        """Set fields of this rank's state (e.g. ``sites``) and write ``rank.json``."""
        with self._lock:
            self.state.update(fields)
        self.write_state()

    def _open(self):
        self._live = os.path.join(self.rank_dir, fmt.shard_filename(self.shard_index, live=True))
        self._final = os.path.join(self.rank_dir, fmt.shard_filename(self.shard_index))
        self._w = self.backend.create(self._live, {"rank": self.rank, "shard_index": self.shard_index,
                                                   "created": time.time()},
                                      max_rows=self.flush_steps)
        self._opened_at = self.clock()
        self._n_in_shard = 0
        self._casts: dict = {}   # kind -> [underflow, overflow] in the live shard
        self._live_ok = True

    def write(self, records: list[StepRecord]) -> None:
        """Write records (in step order). Payloads of equal shape are batched into one append."""
        i = 0
        while i < len(records):
            if self._w is None:
                self._open()
            room = self.flush_steps - self._n_in_shard
            budget = self.max_shard_bytes - self._w.nbytes
            j, used = i, 0
            while j < len(records) and j - i < room:
                nb = sum(p[3].nbytes for p in records[j].payloads)
                if j > i and used + nb > budget:
                    break
                used += nb
                j += 1
            self._write_part(records[i:j])
            i = j
            if self._due():
                self.rotate()

    def _write_part(self, recs: list[StepRecord]):
        w = self._w
        self._live_ok = False   # until every payload of recs is in: a failure leaves the shard inconsistent
        w.append_steps({
            "step": np.array([r.step for r in recs], np.int64),
            "epoch": np.array([r.epoch for r in recs], np.int64),
            "loss": np.array([r.loss for r in recs], np.float64),
            "time": np.array([r.time for r in recs], np.float64),
            "dropped": np.array([r.dropped for r in recs], np.int32),
        })
        groups: dict[tuple, list] = {}
        runs, last = [], {}   # flat rows (a step's tensors in one row (N,)): runs of one layout, in step order
        # (the tensors of two dtypes are never the same payloads: their runs may interleave)
        for r in recs:
            for kind, lk, pk, arr, attrs in r.payloads:
                if isinstance(pk, FlatLayout):   # a run per kind and dtype (activation statistics: float64, int32)
                    run = last.get((kind, arr.dtype))
                    if run is None or (run[0] is not pk and run[0].sig != pk.sig):
                        run = last[(kind, arr.dtype)] = [pk, kind, [], []]
                        runs.append(run)
                    run[2].append(r.step)
                    run[3].append(arr)
                else:
                    groups.setdefault((kind, lk, pk), []).append((r.step, arr, attrs))
        for layout, kind, steps, rows in runs:
            if len(rows) == 1:
                vals = rows[0][None]
            elif rows[0].nbytes * len(rows) <= STACK_MAX_BYTES:
                vals = np.stack(rows)
            else:
                vals = rows   # large rows: one by one, no extra copy
            w.append_flat(kind, layout, np.array(steps, np.int64), vals)
        for (kind, lk, pk), rows in groups.items():
            if lk is None:   # packed: pk = ((layer_key, param_key), ...), rows (P, *shape), attrs a list
                steps = np.array([s for s, _, _ in rows], np.int64)
                vals = rows[0][1][None] if len(rows) == 1 else np.stack([a for _, a, _ in rows])
                w.append_packed(kind, pk, steps, vals, rows[0][2])
                continue
            if kind in fmt.MULTIROW_KINDS:   # each record brings (k, *shape): k rows of one step
                steps = np.concatenate([np.full(len(a), s, np.int64) for s, a, _ in rows])
                vals = rows[0][1] if len(rows) == 1 else np.concatenate([a for _, a, _ in rows])
                w.append(kind, lk, pk, steps, vals, rows[0][2])
                continue
            steps = np.array([s for s, _, _ in rows], np.int64)
            if len(rows) == 1:
                vals = rows[0][1][None]          # a view: no copy
            elif rows[0][1].nbytes * len(rows) <= STACK_MAX_BYTES:
                vals = np.stack([a for _, a, _ in rows])   # small tensors: one write
            else:
                vals = [a for _, a, _ in rows]   # large tensors: row by row, no extra copy
            w.append(kind, lk, pk, steps, vals, rows[0][2])
        for r in recs:
            for kind, c in r.casts.items():
                acc = self._casts.setdefault(kind, [0, 0])
                acc[0] += int(c[0])
                acc[1] += int(c[1])
        self._n_in_shard += len(recs)
        self._last_step = recs[-1].step
        self._live_ok = True
        with self._lock:
            self.state["dropped"] += int(sum(r.dropped for r in recs))

    def _due(self) -> bool:
        if self._w is None:
            return False
        return (self._n_in_shard >= self.flush_steps or self._w.nbytes >= self.max_shard_bytes
                or (self._n_in_shard and self.clock() - self._opened_at >= self.flush_secs))

    def tick(self) -> None:
        """Close the live shard if its time is up (called by the writer when idle)."""
        if self._due():
            self.rotate()

    def time_to_deadline(self) -> float | None:
        if self._w is None or not self._n_in_shard:
            return None
        return max(0.0, self.flush_secs - (self.clock() - self._opened_at))

    def room(self) -> tuple[int, int] | None:
        """(steps, payload bytes) the live shard still takes before it is closed, or None when no live
        shard holds a step (the next write opens one)."""
        if self._w is None or not self._n_in_shard:
            return None
        return self.flush_steps - self._n_in_shard, self.max_shard_bytes - self._w.nbytes

    def rotate(self) -> None:
        """Close the live shard (if it holds anything), publish it and update rank.json."""
        if self._w is None:
            return
        w, self._w = self._w, None
        names = {kind: fmt.CAST_COUNT_ATTRS[kind] for kind in self._casts if kind in fmt.CAST_COUNT_ATTRS}
        if names:
            w.set_attrs({a: n for kind, (u, o) in names.items() for a, n in zip((u, o), self._casts[kind])})
        w.close()
        if self._n_in_shard == 0:
            try:
                os.unlink(self._live)
            except OSError:
                pass
            return
        self.backend.commit(self._live, self._final)
        self.shard_index += 1
        with self._lock:
            self.state["shards"] = self.shard_index
            self.state["steps_flushed"] += self._n_in_shard
            self.state["last_step"] = self._last_step
            self.state["bytes"] += int(getattr(w, "nbytes", 0))
        self.write_state()
        self._queue_sync(self._final)

    # -- background fsync of published shards
    def _queue_sync(self, path: str) -> None:
        with self._sync_cv:
            self._raise_sync_error()
            while len(self._sync_q) + self._sync_busy >= 2:   # bounded: at most 2 shards unsynced
                self._sync_cv.wait()
                self._raise_sync_error()
            self._sync_q.append(path)
            if self._sync_thread is None:
                self._sync_thread = threading.Thread(target=self._sync_loop, name="bbdecoder-sync", daemon=True)
                self._sync_thread.start()
            self._sync_cv.notify_all()

    def _sync_loop(self) -> None:
        while True:
            with self._sync_cv:
                while not self._sync_q:
                    self._sync_cv.wait()
                path = self._sync_q.pop(0)
                if path is None:
                    return
                self._sync_busy = True
            try:
                self.backend.sync(path)
            except BaseException as e:  # noqa: BLE001 - re-raised on the writer thread
                self._sync_error = self._sync_error or e
            finally:
                with self._sync_cv:
                    self._sync_busy = False
                    self._sync_cv.notify_all()

    def _raise_sync_error(self) -> None:
        if self._sync_error is not None:
            e, self._sync_error = self._sync_error, None
            raise e

    def wait_synced(self) -> None:
        """Wait until every published shard is fsynced; raises a sync error if one happened."""
        with self._sync_cv:
            while self._sync_q or self._sync_busy:
                self._sync_cv.wait()
            self._raise_sync_error()

    def close(self, status: str = fmt.STATUS_COMPLETE) -> None:
        self.rotate()
        try:
            self.wait_synced()
        finally:
            if self._sync_thread is not None:
                with self._sync_cv:
                    self._sync_q.append(None)
                    self._sync_cv.notify_all()
                self._sync_thread.join()
                self._sync_thread = None
        with self._lock:
            if self.state["status"] != fmt.STATUS_FAILED:
                self.state["status"] = status
        self.write_state()

    def record_error(self, message: str) -> None:
        """Note a recorder failure in rank.json (status "failed")."""
        with self._lock:
            self.state["errors"].append(message[:2000])
            self.state["status"] = fmt.STATUS_FAILED
        try:
            self.write_state()
        except Exception:
            pass

    def abandon_live(self) -> None:
        """After an error: publish the live shard if it is consistent (the error came from outside a
        write, e.g. converting a tensor), so that what it holds is kept. A live shard that a write
        failed in the middle of (e.g. ``ENOSPC``: its step table would list steps whose tensors are
        partly missing), or that cannot be closed and published, is deleted instead, as a crash
        would lose it; deleting it also gives the space back on a full disk."""
        if self._w is not None and self._live_ok:
            try:
                self.rotate()
                return
            except Exception:
                pass
        w, self._w = self._w, None
        if w is not None:
            w.abort()
        if self._live is not None:   # (a shard renamed before the failure is no longer there)
            try:
                self.backend.discard(self._live)
            except Exception:
                pass
