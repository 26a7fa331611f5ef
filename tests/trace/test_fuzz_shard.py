"""Fuzzing the shard reader (issue 5, "Bad input"): byte-level mutations of a valid shard and random
HDF5 structures. HDF5ShardReader must read them consistently or raise TraceError, never another
exception and never hang (a per-example alarm and hypothesis' deadline bound every example)."""

import os
import shutil
import signal
import tempfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.trace.hdf5 import HDF5ShardReader, HDF5ShardWriter
SETTINGS = dict(deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALARM_S = 10


def _valid_shard(path):
    """A small shard as the recorder writes it: 5 steps, two gradient payloads, one weight payload
    and one multi-row activation payload. Returns what was written."""
    rng = np.random.default_rng(0)
    w = HDF5ShardWriter(path, {"rank": 0, "shard_index": 0}, max_rows=8)
    steps = np.arange(10, 15)
    w.append_steps({"step": steps, "epoch": steps // 3, "loss": rng.random(5), "time": 100.0 + steps,
                    "dropped": np.zeros(5, np.int32)})
    want = {("grads", "conv", "weight"): (steps, rng.standard_normal((5, 4, 3)).astype(np.float32)),
            ("grads", "conv", "bias"): (steps, rng.standard_normal((5, 4)).astype(np.float32)),
            ("weights", "conv", "weight"): (steps[::2], rng.standard_normal((3, 4, 3)).astype(np.float32)),
            ("activations", "relu", "samples"): (np.repeat(steps[:2], 3), rng.random((6, 4)).astype(np.float32))}
    for (kind, lk, pk), (s, v) in want.items():
        w.append(kind, lk, pk, s, v)
    w.close()
    return want


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("fuzz") / "shard-000000.h5")
    want = _valid_shard(p)
    with open(p, "rb") as f:
        return f.read(), want


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"reading took more than {ALARM_S} s")


def read_everything(path):
    """Everything a Run reads from a shard, with consistency checks on what comes back. Returns
    {(kind, lk, pk): (steps, values)} or raises TraceError (anything else is a reader bug)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    try:
        with HDF5ShardReader(path, "fuzzed") as r:
            cols = r.steps()
            assert set(cols) == set(fmt.STEP_COLUMNS)
            assert len({len(v) for v in cols.values()}) == 1
            assert all(v.ndim == 1 and v.dtype.kind in "biuf" for v in cols.values())
            got = {}
            for kind in fmt.PAYLOAD_KINDS:
                for lk, pk in r.payloads(kind):
                    rows, shape, chunk = r.payload_info(kind, lk, pk)
                    assert rows >= 0 and chunk >= 1
                    steps = r.read_payload_steps(kind, lk, pk)
                    vals = r.read_payload(kind, lk, pk, 0, rows)
                    assert steps.shape == (rows,) and vals.shape == (rows, *shape)
                    assert vals.dtype.kind in "biuf" and steps.dtype.kind in "biuf"
                    got[(kind, lk, pk)] = (steps, vals)
            return got
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _expect_reads_or_trace_error(path):
    try:
        got = read_everything(path)
        event("read")
        return got
    except TraceError as e:
        msg = str(e)
        event("TraceError: " + " ".join(msg.replace("fuzzed", "").split()[:3]))
        assert msg and "\n" not in msg and "fuzzed" in msg, msg
        return None


def test_unmutated_shard_reads_back_exactly(shard_bytes, tmp_path):
    data, want = shard_bytes
    p = tmp_path / "s.h5"
    p.write_bytes(data)
    got = read_everything(str(p))
    assert set(got) == set(want)
    for k, (s, v) in want.items():
        np.testing.assert_array_equal(got[k][0], s)
        np.testing.assert_array_equal(got[k][1], v)


mutations = st.fixed_dictionaries({
    "flips": st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    "cut": st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
    "extend": st.binary(max_size=256),
})


@settings(max_examples=200, **SETTINGS)
@given(m=mutations)
@example(m={"flips": [], "cut": 0.5, "extend": b""})
@example(m={"flips": [(0.0, 0)], "cut": None, "extend": b""})
@example(m={"flips": [], "cut": 0.999, "extend": b"\x00" * 100})
def test_byte_mutations(shard_bytes, m):
    data, want = shard_bytes
    b = bytearray(data)
    for pos, val in m["flips"]:
        b[int(pos * len(b))] = val
    if m["cut"] is not None:
        del b[int(m["cut"] * len(b)):]
    b += m["extend"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "shard-000000.h5")
        with open(p, "wb") as f:
            f.write(bytes(b))
        got = _expect_reads_or_trace_error(p)
    if got is not None and not m["flips"] and m["cut"] is None:
        # bytes appended after a valid file change nothing that is read
        for k, (s, v) in want.items():
            np.testing.assert_array_equal(got[k][1], v)


DTYPES = ["f4", "f8", "f2", "i8", "i4", "u1", "?", "S3", "c8", "str", "compound"]
names = st.sampled_from(["steps", "grads", "weights", "act_stats", "activations", "values", "x", "conv",
                         "weight", "../..", "a b"] + list(fmt.STEP_COLUMNS))
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def _dataset(g, name, dtype, shape):
    if dtype == "str":
        g.create_dataset(name, data=np.array(["ab"] * int(np.prod(shape)), dtype=h5py.string_dtype()).reshape(shape))
    elif dtype == "compound":
        g.create_dataset(name, shape=shape, dtype=np.dtype([("a", "f4"), ("b", "i2")]))
    else:
        g.create_dataset(name, data=np.ones(shape, dtype=dtype))


# a tree: each node is either a dataset (dtype, shape) or a group {name: node}
leaf = st.tuples(st.sampled_from(DTYPES), shapes)
tree = st.deferred(lambda: st.one_of(leaf, st.dictionaries(names, tree, max_size=3)))
attr_values = st.one_of(st.just(fmt.FORMAT_NAME), st.just(fmt.FORMAT_VERSION), st.integers(-2, 3),
                        st.text(max_size=5), st.floats(allow_nan=True), st.just(np.array([1, 1])))


def _mostly(value, others):
    """``value`` four times in five, else something from ``others`` (so that deeper paths are reached)."""
    return st.integers(0, 4).flatmap(lambda i: st.just(value) if i else others)


def _build(g, node):
    for name, child in node.items():
        if name in g:
            continue
        if isinstance(child, dict):
            _build(g.create_group(name), child)
        else:
            _dataset(g, name, *child)


def _steps_group(g, n, bad):
    for c in fmt.STEP_COLUMNS:
        if c == bad:
            continue
        g.create_dataset(c, data=np.arange(n, dtype="i8" if c != "loss" else "f8"))


@settings(max_examples=200, **SETTINGS)
@given(root=st.dictionaries(names, tree, max_size=5),
       fmt_attr=_mostly(fmt.FORMAT_NAME, attr_values),
       ver_attr=_mostly(fmt.FORMAT_VERSION, attr_values),
       steps_rows=st.one_of(st.none(), st.integers(0, 6), st.integers(0, 6)),
       drop_col=st.sampled_from((None,) + fmt.STEP_COLUMNS),
       payload=st.one_of(st.none(), st.tuples(st.sampled_from(fmt.PAYLOAD_KINDS), st.sampled_from(DTYPES),
                                              st.integers(0, 6), shapes, st.integers(0, 6))))
def test_random_structures(root, fmt_attr, ver_attr, steps_rows, drop_col, payload):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "shard-000000.h5")
        with h5py.File(p, "w") as f:
            f.attrs["format"] = fmt_attr
            f.attrs["format_version"] = ver_attr
            if steps_rows is not None:     # mostly-valid step table, so that deeper paths are reached
                _steps_group(f.create_group("steps"), steps_rows, drop_col)
            if payload is not None:        # a payload group with values and steps of chosen rows
                kind, dt, rows, shape, srows = payload
                g = f.require_group(kind).require_group("lay").create_group("p")
                _dataset(g, "values", dt, (rows, *shape))
                g.create_dataset("steps", data=np.arange(srows, dtype="i8"))
            _build(f, root)
        _expect_reads_or_trace_error(p)


# ------------------------------------------------------------------ the same through a whole Run

@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A recorded run (one shard: gradients, weights, activation statistics and samples)."""
    from helpers import record_tiny
    d = tmp_path_factory.mktemp("fuzzrun") / "run"
    record_tiny(str(d), epochs=1, steps_per_epoch=3, weights_every=1, flush_steps=10, activations="all",
                activations_every=1)
    shard = d / "rank-00000" / "shard-000000.h5"
    return d, shard.read_bytes()


def analyse_everything(path):
    """What `bbdecoder report` computes, minus the figures."""
    from bbdecoder import analyzer
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S * 3)
    try:
        run = analyzer.open(path)
        run.info()
        run.grad_stats()
        run.grad_stats(per="epoch")
        run.weight_stats()
        run.activation_stats(per="epoch")
        run.dead_units()
        run.saturation()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=30, **dict(SETTINGS, deadline=10000))
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_mutations_through_the_run(recorded_run, flips):
    src, data = recorded_run
    b = bytearray(data)
    for pos, val in flips:
        b[int(pos * len(b))] = val
    with tempfile.TemporaryDirectory() as d:
        run_dir = os.path.join(d, "run")
        shutil.copytree(src, run_dir)
        with open(os.path.join(run_dir, "rank-00000", "shard-000000.h5"), "wb") as f:
            f.write(bytes(b))
        try:
            analyse_everything(run_dir)
            event("analysed")
        except TraceError as e:
            assert str(e) and "\n" not in str(e)
            event("TraceError")


# ------------------------------------------------------------------ manifest.json and rank.json with random values in random places

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 70), st.floats(),
                                     st.text(max_size=6)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                                          max_size=3)),
                           max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path to a container, key) in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix, i
            yield from _paths(v, prefix + (i,))


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_manifest_and_rank_json_mutations_through_the_run(recorded_run, data):
    import json

    from bbdecoder import analyzer
    src, _ = recorded_run
    which = data.draw(st.sampled_from(["manifest.json", os.path.join("rank-00000", "rank.json")]))
    m = json.loads((src / which).read_text())
    paths = list(_paths(m))
    for _ in range(data.draw(st.integers(1, 3))):
        where, key = data.draw(st.sampled_from(paths))
        node = m
        try:
            for k in where:
                node = node[k]
            if data.draw(st.booleans()) and isinstance(node, dict):
                node.pop(key, None)
            else:
                node[key] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue    # an earlier mutation removed or replaced the path
    with tempfile.TemporaryDirectory() as d:
        run_dir = os.path.join(d, "run")
        shutil.copytree(src, run_dir)
        with open(os.path.join(run_dir, which), "w") as f:
            json.dump(m, f)
        try:
            run = analyzer.open(run_dir)
            run.info()
            run.layers
            run.grad_stats()
            run.weight_stats()
            run.sites
            run.activation_stats(per="epoch")
            run.dead_units()
            assert isinstance(run.status_reason, str)
            event("analysed")
        except TraceError as e:
            assert str(e) and "\n" not in str(e)
            event("TraceError")
