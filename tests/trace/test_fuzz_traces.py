"""Fuzzing the readers of graph.json, attention captures, feature captures and pruning plans (issue 16,
item 6): a field of a valid file replaced by a random value (JSON values, attribute values, dataset
shapes and dtypes). Each reader reads the file consistently or raises its one-line error (TraceError,
PlanError), never another exception and never hangs (an alarm bounds every example). Few examples
each: the corpus of test_hostile_traces covers the known classes; this looks for the unknown."""

import json
import os
import signal
import tempfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbdecoder.analyzer.attention_iou import attention_iou
from bbdecoder.analyzer.graph import edge_frame, module_frame, node_frame, read_graph, to_dot
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.captures import Capture, read_feature_info, read_feature_sample
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.trace.plans import PlanError, fingerprint, validate_plan
from test_hostile_traces import graph_json, write_capture, write_features

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALARM_S = 10

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from([10 ** 400, -(10 ** 400), 1 << 63, 1e308]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"reading took more than {ALARM_S} s")


def bounded(fn, *args, ok=(TraceError,)):
    """``fn(*args)`` under an alarm; returns its result, or None when it raised one of ``ok`` with a
    one-line message (anything else fails the test)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    try:
        return fn(*args)
    except ok as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _set_path(obj, path, value):
    """Replace (value given) or delete (value is _DEL) the element at ``path`` (keys / indices)."""
    for k in path[:-1]:
        obj = obj[k]
    if value is _DEL:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DEL = object()


def _paths(obj, prefix=()):
    """Every (path) of a JSON document, depth first."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc, picks, values):
    paths = _paths(doc)
    for p, v in zip(picks, values):
        path = paths[int(p * len(paths))]
        try:
            _set_path(doc, path, v)
        except (KeyError, IndexError, TypeError):   # a parent replaced by an earlier mutation
            pass
    return doc


mutations = st.tuples(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3),
                      st.lists(json_values | st.just(_DEL), min_size=1, max_size=3))


def _read_graph_everything(run_dir):
    g = read_graph(run_dir)
    return node_frame(g), edge_frame(g), module_frame(g), to_dot(g)


@settings(max_examples=40, **SETTINGS)
@given(m=mutations)
def test_fuzzed_graph_json(m):
    doc = _mutate(graph_json(), *m)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, fmt.GRAPH_FILE), "w") as f:
            json.dump(doc, f)
        got = bounded(_read_graph_everything, d)
    if got is not None:
        nodes, edges, mods, dot = got
        assert len(nodes) == len(doc["nodes"]) and dot.count(" -> ") == len(edges)


# ------------------------------------------------------------------ captures and feature captures
attr_values = (st.integers(-(1 << 63), (1 << 63) - 1) | st.floats() | st.text(max_size=12)
               | st.sampled_from([np.inf, -1, 1 << 31, "[]", "[{}]", "{}", "[" * 5000 + "]" * 5000])
               | st.lists(st.integers(-5, 1 << 17), min_size=0, max_size=3).map(np.array))
CAPTURE_ATTRS = ["step", "epoch", "image_size", "n_images", "targets", "mask_names", "group_names", "format_version",
                 "kind", "target_layer"]
DATASETS = ["activations", "grads/bird", "logits", "labels", "index", "groups", "masks/object"]
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from(["f4", "f2", "i8", "u1", "?", "S3", "c8", "compound"])


def _dataset(f, name, shape, dtype):
    if name in f:
        del f[name]
    dt = np.dtype([("a", "f4"), ("b", "i4")]) if dtype == "compound" else np.dtype(dtype)
    f.create_dataset(name, data=np.zeros(shape, dt))


@settings(max_examples=30, **SETTINGS)
@given(attrs=st.dictionaries(st.sampled_from(CAPTURE_ATTRS), attr_values, max_size=2),
       ds=st.lists(st.tuples(st.sampled_from(DATASETS), shapes, dtypes), max_size=2))
def test_fuzzed_capture(attrs, ds):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "captures", "capture-000000.h5")
        write_capture(p)
        with h5py.File(p, "r+") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            for name, shape, dtype in ds:
                _dataset(f, name, shape, dtype)
        cap = bounded(Capture, p)
        if cap is not None:
            df = bounded(lambda: attention_iou(cap, "bird", mask_group="object", n_boot=5))
            if df is not None:
                assert set(df["split"]) >= {"all"} and (df["n"] <= cap.n).all()


FEATURE_ATTRS = ["step", "epoch", "layer", "format_version", "kind"]


@settings(max_examples=30, **SETTINGS)
@given(attrs=st.dictionaries(st.sampled_from(FEATURE_ATTRS), attr_values, max_size=2),
       ds=st.one_of(st.none(), st.tuples(shapes, dtypes)))
def test_fuzzed_feature_capture(attrs, ds):
    want = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "features-000000.h5")
        write_features(p, want)
        with h5py.File(p, "r+") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            if ds is not None:
                _dataset(f, "values", *ds)
        info = bounded(read_feature_info, p)
        if info is not None:
            row = bounded(read_feature_sample, p, 0)
            assert row is None or row.shape == info["shape"][1:]
            if ds is None and row is not None:
                np.testing.assert_array_equal(row, want[0])


# ------------------------------------------------------------------ pruning plans
def _valid_plan():
    params = [["conv.weight", [4, 3, 3, 3]], ["conv.bias", [4]], ["head.weight", [5, 96]]]
    return {"format": "bbdecoder-pruning-plan", "version": 1, "created": "2026-01-01T00:00:00+00:00",
            "run": "run", "model_fingerprint": fingerprint(params),
            "criterion": {"name": "dead", "threshold": 0.0, "max_active_fraction": 0.0},
            "source_steps": [0, 1, 2],
            "layers": [{"layer": "conv", "layer_id": 1, "param": "weight", "sparsity": 0.25, "axis": 0, "units": [1],
                        "next": [{"layer": "head", "layer_id": 3, "param": "weight", "axis": 1, "group": 24,
                                  "units": [1]}]}],
            "expected_sparsity": {"overall": 0.1, "per_layer": {"conv": 0.25, "head": 0.25}},
            "notes": []}


def test_the_plan_of_the_fuzzer_is_valid():
    assert validate_plan(_valid_plan())["layers"][0]["units"] == [1]


@settings(max_examples=40, **SETTINGS)
@given(m=mutations)
def test_fuzzed_plan(m):
    doc = _mutate(_valid_plan(), *m)
    bounded(validate_plan, doc, ok=(PlanError,))
