"""One round-trip suite that every storage implementation inherits (xarray-backends style)."""

import json
import os

import numpy as np
import pytest

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.shards import MemoryBackend, ReaderPool
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
def _steps(a, b, epoch=0):
    n = b - a
    return {"step": np.arange(a, b), "epoch": np.full(n, epoch), "loss": np.linspace(1, 0, n),
            "time": 1e9 + np.arange(n) * 0.5, "dropped": np.zeros(n, np.int32)}


class RoundTrip:
    """Subclasses provide ``backend()``."""

    def backend(self):
        raise NotImplementedError

    def test_step_table_round_trip(self, tmp_path):
        be = self.backend()
        p = str(tmp_path / "s.h5")
        w = be.create(p, {"rank": 0})
        w.append_steps(_steps(0, 3))
        w.append_steps(_steps(3, 5, epoch=1))
        w.close()
        r = be.open(p)
        st = r.steps()
        np.testing.assert_array_equal(st["step"], np.arange(5))
        np.testing.assert_array_equal(st["epoch"], [0, 0, 0, 1, 1])
        np.testing.assert_allclose(st["loss"], np.r_[np.linspace(1, 0, 3), np.linspace(1, 0, 2)])
        assert st["step"].dtype == np.int64 and st["loss"].dtype == np.float64
        assert r.attrs["format_version"] == fmt.FORMAT_VERSION
        r.close()

    def test_payload_round_trip_dtypes_and_slices(self, tmp_path):
        be = self.backend()
        p = str(tmp_path / "s.h5")
        rng = np.random.default_rng(0)
        a = rng.standard_normal((4, 3, 5)).astype(np.float32)
        b = rng.standard_normal((2, 3, 5)).astype(np.float32)
        h = rng.standard_normal((3, 7)).astype(np.float16)
        w = be.create(p, {})
        w.append("grads", "L0", "weight", np.array([0, 1, 2, 3]), a, {"layer_id": 0})
        w.append("grads", "L0", "weight", np.array([5, 6]), b)
        w.append("weights", "L1", "bias", np.array([0, 4, 8]), h)
        with pytest.raises(ValueError):
            w.append("grads", "L0", "weight", np.array([9]), np.zeros((1, 3, 4), np.float32))
        extra = [np.full((3, 5), 7.0, np.float32), np.full((3, 5), 8.0, np.float32)]
        w.append("grads", "L0", "weight", np.array([10, 11]), extra)   # row-by-row form
        w.append_steps(_steps(0, 9))
        w.close()
        r = be.open(p)
        assert sorted(r.payloads("grads")) == [("L0", "weight")]
        assert sorted(r.payloads("weights")) == [("L1", "bias")]
        rows, shape, chunk = r.payload_info("grads", "L0", "weight")
        assert rows == 8 and shape == (3, 5) and chunk >= 1
        np.testing.assert_array_equal(r.read_payload_steps("grads", "L0", "weight"), [0, 1, 2, 3, 5, 6, 10, 11])
        np.testing.assert_array_equal(r.read_payload("grads", "L0", "weight", 0, 8),
                                      np.concatenate([a, b, np.stack(extra)]))
        np.testing.assert_array_equal(r.read_payload("grads", "L0", "weight", 3, 5), np.concatenate([a, b])[3:5])
        got = r.read_payload("weights", "L1", "bias", 0, 3)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, h)
        r.close()

    def test_series_rotates_by_steps_and_time_and_publishes(self, tmp_path):
        be = self.backend()
        now = [0.0]
        sw = ShardSeriesWriter(str(tmp_path / "rank-00000"), 0, flush_steps=4, flush_secs=10.0,
                               backend=be, clock=lambda: now[0])
        g = np.ones((2, 2), np.float32)
        recs = [StepRecord(i, 0, float(i), 0.0, 0, [("grads", "L", "w", g * i, {})]) for i in range(10)]
        sw.write(recs[:9])   # 4 + 4 closed, 1 live
        assert sw.shard_index == 2
        st = json.loads((tmp_path / "rank-00000" / fmt.RANK_FILE).read_text())
        assert st["steps_flushed"] == 8 and st["last_step"] == 7 and st["status"] == fmt.STATUS_RECORDING
        assert sw.time_to_deadline() == pytest.approx(10.0)
        now[0] = 10.5
        sw.tick()            # time is up: the live shard with one step is published
        assert sw.shard_index == 3
        sw.write(recs[9:])
        sw.close()
        st = json.loads((tmp_path / "rank-00000" / fmt.RANK_FILE).read_text())
        assert st["status"] == fmt.STATUS_COMPLETE and st["steps_flushed"] == 10 and st["shards"] == 4
        seen = []
        for i in range(4):
            r = be.open(str(tmp_path / "rank-00000" / fmt.shard_filename(i)))
            s = r.read_payload_steps("grads", "L", "w")
            v = r.read_payload("grads", "L", "w", 0, len(s))
            np.testing.assert_array_equal(v, np.stack([g * k for k in s]))
            seen += list(r.steps()["step"])
        assert seen == list(range(10))

    def test_packed_payloads_read_back_as_separate_payloads(self, tmp_path):
        """Packed records (several payloads of one kind per step, as the recorder hands over its
        gradient statistics) read back exactly as if each payload had been appended on its own,
        beside an ordinary payload, across two shards."""
        be = self.backend()
        d = tmp_path / "rank-00000"
        sw = ShardSeriesWriter(str(d), 0, flush_steps=4, backend=be)
        keys = (("L0", "weight"), ("L0", "bias"), ("L1", "weight"))
        attrs = [{"layer_id": 0, "param": "weight"}, {"layer_id": 0, "param": "bias"}, {"layer_id": 1}]
        rng = np.random.default_rng(1)
        vals = {s: rng.standard_normal((3, 6)) for s in range(6)}
        recs = [StepRecord(s, 0, 0.0, 0.0, 0, [("grad_stats", None, keys, vals[s], attrs),
                                               ("grads", "L1", "weight", np.full(2, s, np.float32), {})])
                for s in range(6)]
        sw.write(recs[:3])
        sw.write(recs[3:])
        sw.close()
        got = {k: ([], []) for k in keys}
        for i in range(2):
            r = be.open(str(d / fmt.shard_filename(i)))
            assert sorted(r.payloads("grad_stats")) == sorted(keys)
            for k in keys:
                st = r.read_payload_steps("grad_stats", *k)
                got[k][0].extend(st.tolist())
                got[k][1].append(r.read_payload("grad_stats", *k, 0, len(st)))
            np.testing.assert_array_equal(r.read_payload("grads", "L1", "weight", 0, 4 - 2 * i)[:, 0],
                                          r.read_payload_steps("grads", "L1", "weight"))
            r.close()
        for i, k in enumerate(keys):
            assert got[k][0] == list(range(6))
            np.testing.assert_array_equal(np.concatenate(got[k][1]), np.stack([vals[s][i] for s in range(6)]))

    def test_series_rotates_by_bytes(self, tmp_path):
        be = self.backend()
        sw = ShardSeriesWriter(str(tmp_path / "r"), 0, flush_steps=100, max_shard_bytes=1000, backend=be)
        big = np.zeros(200, np.float32)  # 800 bytes
        sw.write([StepRecord(i, 0, 0.0, 0.0, 0, [("grads", "L", "w", big, {})]) for i in range(5)])
        sw.close()
        assert sw.shard_index >= 2


    def test_reader_pool_keeps_idle_readers_and_never_closes_a_borrowed_one(self, tmp_path):
        be = self.backend()
        paths = []
        for i in range(4):
            p = str(tmp_path / f"s{i}.h5")
            w = be.create(p, {})
            w.append("grads", "L", "w", np.array([i]), np.full((1, 3), float(i), np.float32))
            w.append_steps(_steps(i, i + 1))
            w.close()
            paths.append(p)
        opened, closed = [], []

        def opener(path, name):
            r = be.open(path, name)
            opened.append(path)
            c = r.close
            r.close = lambda: (closed.append(path), c())
            return r

        pool = ReaderPool(opener, keep=2)
        held = pool.borrow(paths[0], "s0")            # borrowed across everything below
        for rep in range(3):
            for i, p in enumerate(paths):
                with pool.borrow(p, f"s{i}") as r:
                    np.testing.assert_array_equal(r.read_payload("grads", "L", "w", 0, 1), [[i, i, i]])
        # s0 stayed borrowed (one open for all its uses); of the other three, the first two given back
        # fill the 2 idle slots and stay for every later scan, the third is opened and closed each time
        assert opened.count(paths[0]) == 1 and paths[0] not in closed
        assert np.array_equal(held.read_payload_steps("grads", "L", "w"), [0])
        assert pool.open_count == 3                   # s0 borrowed + 2 idle
        assert opened.count(paths[1]) == opened.count(paths[2]) == 1 and paths[1] not in closed
        assert opened.count(paths[3]) == closed.count(paths[3]) == 3
        held.close()
        held.close()                                  # giving back twice is harmless
        # the idle slots are full: s0, given back, is closed; the readers kept stay
        assert pool.open_count == 2 and closed[-1] == paths[0] and closed.count(paths[0]) == 1
        with pool.borrow(paths[2], "s2"):             # an idle reader is reused, not reopened
            pass
        n = len(opened)
        with pool.borrow(paths[2], "s2"):
            pass
        assert len(opened) == n
        pool.close()
        pool.close()
        assert pool.open_count == 0 and len(closed) == len(opened)   # every opened reader closed once
        with pool.borrow(paths[1], "s1") as r:        # usable after close: reopens
            assert r.steps()["step"].tolist() == [1]


class TestHDF5(RoundTrip):
    def backend(self):
        return HDF5Backend()

    def test_live_shard_has_part_suffix_until_closed(self, tmp_path):
        d = tmp_path / "rank-00000"
        sw = ShardSeriesWriter(str(d), 0, flush_steps=3)
        sw.write([StepRecord(0, 0, 0.0, 0.0)])
        assert sorted(os.listdir(d)) == ["rank.json", "shard-000000.h5.part"]
        closed, live = fmt.list_shards(d)
        assert closed == [] and live == ["shard-000000.h5.part"]
        sw.close()
        assert sorted(os.listdir(d)) == ["rank.json", "shard-000000.h5"]


def _packed_shard(d, keysets, backend=None, steps_of=None):
    """One shard of gradient statistics written as the recorder hands them over: step s carries the
    packed payload of ``keysets[s]`` with values (P, 6) = 1000 s + 10 (column) + [0..5]."""
    sw = ShardSeriesWriter(str(d), 0, flush_steps=1000, backend=backend or HDF5Backend())
    attrs = {ks: [{"layer_id": 7, "param": pk} for _, pk in ks] for ks in set(keysets)}
    recs = [StepRecord(s, 0, 0.0, 0.0, 0, [("grad_stats", None, ks, _vals(s, len(ks)), attrs[ks])])
            for s, ks in enumerate(keysets)]
    sw.write(recs)
    sw.close()
    return d / fmt.shard_filename(0)


def _vals(s, P):
    return 1000.0 * s + 10.0 * np.arange(P)[:, None] + np.arange(6)[None, :]


def _objects(path):
    import h5py
    out = []
    with h5py.File(path, "r") as f:
        f.visit(out.append)
    return out


class TestPackedGradStats:
    """The gradient statistics of every parameter of a shard in a fixed number of datasets."""

    def test_fixed_number_of_datasets_and_the_per_parameter_option(self, tmp_path):
        keys = {P: tuple((f"L{i}", "weight") for i in range(P)) for P in (3, 60)}
        objs, olds = {}, {}
        for P, ks in keys.items():
            p = _packed_shard(tmp_path / f"p{P}", [ks] * 5)
            q = _packed_shard(tmp_path / f"o{P}", [ks] * 5, HDF5Backend(packed=False))
            objs[P], olds[P] = _objects(p), _objects(q)
            assert "packed/grad_stats/0/values" in objs[P] and "grad_stats" not in objs[P]
            assert "packed" not in olds[P] and f"grad_stats/L{P - 1}/weight/values" in olds[P]
            for path in (p, q):
                r = HDF5Backend().open(str(path))
                assert sorted(r.payloads("grad_stats")) == sorted(ks)
                for j, k in enumerate(ks):
                    assert r.payload_info("grad_stats", *k)[:2] == (5, (6,))
                    np.testing.assert_array_equal(r.read_payload_steps("grad_stats", *k), np.arange(5))
                    np.testing.assert_array_equal(r.read_payload("grad_stats", *k, 1, 4),
                                                  np.stack([_vals(s, P)[j] for s in (1, 2, 3)]))
                    assert r.payload_attrs("grad_stats", *k) == {"layer_id": 7, "param": "weight"}
                r.close()
        assert len(objs[3]) == len(objs[60]) == 12         # /steps + 5 columns; packed, grad_stats, 0 + 3
        assert len(olds[60]) - len(olds[3]) == 57 * 4       # a group + values + steps (+ layer) per tensor

    def test_groups_of_parameters_merge_in_step_order(self, tmp_path, monkeypatch):
        """Steps with another list of parameters (a missing gradient) start another group; a payload's
        rows come back in step order from all of them, also when the writer wrote part of them before
        the close (its memory bound reached), and when the reader reads a column at a time (a values
        dataset too large to keep)."""
        import bbdecoder.analyzer.trace.hdf5 as h5mod
        import bbdecoder.analyzer.trace.packed as pmod
        a, b, c = ("L0", "weight"), ("L0", "bias"), ("L1", "weight")
        full, part = (a, b, c), (a, c)
        seq = [full, part, full, full, part, part, full]
        for bound, cache in ((h5mod.SMALL_BUFFER_BYTES, pmod.CACHE_BYTES), (200, 0)):
            monkeypatch.setattr(h5mod, "SMALL_BUFFER_BYTES", bound)
            monkeypatch.setattr(pmod, "CACHE_BYTES", cache)
            path = _packed_shard(tmp_path / f"b{bound}", seq)
            assert sum(o.endswith("/index") for o in _objects(path)) == 2
            r = HDF5Backend().open(str(path))
            assert sorted(r.payloads("grad_stats")) == sorted(full)
            for k in full:
                want = [s for s, ks in enumerate(seq) if k in ks]
                got = r.read_payload_steps("grad_stats", *k)
                np.testing.assert_array_equal(got, want)
                rows = np.stack([_vals(s, len(seq[s]))[seq[s].index(k)] for s in want])
                np.testing.assert_array_equal(r.read_payload("grad_stats", *k, 0, len(want)), rows)
                np.testing.assert_array_equal(r.read_payload("grad_stats", *k, 1, 3), rows[1:3])
            r.close()

    @pytest.mark.parametrize("case, why", [("count", "1 parameters for 2 columns"), ("key", "valid keys"),
                                           ("twice", "twice"), ("dtype", "uint8"), ("json", "not UTF-8 JSON"),
                                           ("rows", "do not fit"), ("both", "both packed and on its own"),
                                           ("absurd", "absurd size"), ("link", "SoftLink")])
    def test_hostile_packed_groups_are_refused(self, tmp_path, case, why):
        import h5py
        ks = (("L0", "weight"), ("L1", "bias"))
        path = _packed_shard(tmp_path, [ks] * 3)
        idx = lambda e: np.frombuffer(json.dumps(e).encode(), np.uint8)   # noqa: E731
        with h5py.File(path, "r+") as f:
            g = f["packed/grad_stats/0"]
            if case in ("count", "key", "twice", "dtype", "json"):
                del g["index"]
                g["index"] = {"count": idx([["L0", "weight", {}]]), "key": idx([["L0", "weight"], ["../x", "b"]]),
                              "twice": idx([["L0", "weight"], ["L0", "weight"]]),
                              "dtype": idx([["L0", "weight"], ["L1", "bias"]]).astype(np.float32),
                              "json": np.frombuffer(b"[[\"L0\", ", np.uint8)}[case]
            elif case == "rows":
                del g["steps"]
                g["steps"] = np.arange(2)
            elif case == "both":
                f.create_group("grad_stats/L1/bias")
                f["grad_stats/L1/bias/values"] = np.zeros((1, 6))
                f["grad_stats/L1/bias/steps"] = np.zeros(1, np.int64)
            elif case == "absurd":   # declares 1.2 GB, stores nothing: never read
                del g["values"]
                g.create_dataset("values", shape=(10 ** 7, 2, 6), chunks=(1000, 2, 6), dtype="f8")
                del g["steps"]
                g.create_dataset("steps", shape=(10 ** 7,), chunks=(1000,), dtype="i8")
            elif case == "link":
                f["packed/grad_stats/1"] = h5py.SoftLink("/packed/grad_stats/0")
        r = HDF5Backend().open(str(path))
        with pytest.raises(fmt.TraceError, match=f"corrupt shard.*{why}"):
            r.payloads("grad_stats")
        r.close()


class TestMemory(RoundTrip):
    def backend(self):
        return MemoryBackend()
