"""The bbdecoder CLI: info, layers, report, and one clear line for every kind of bad input."""

import helpers
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from bbdecoder import analyzer
from helpers import record_tiny, run_cli

ROOT = helpers.ROOT


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "run")
    record_tiny(d, epochs=2, steps_per_epoch=4, weights_every=2, flush_steps=3)
    helpers.unflatten_snapshots(d)   # the edits below address per-tensor groups (hostile flat groups: test_snapshots)
    return d


def _tree(root):
    out = {}
    for dp, dns, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_info_text_and_json(good_run, capsys):
    code, out, err = run_cli(["info", good_run], capsys)
    assert code == 0 and "complete" in out and "steps     8" in out
    code, out, _ = run_cli(["info", good_run, "--json"], capsys)
    d = json.loads(out)
    run = analyzer.open(good_run)
    for k in ("status", "steps", "epochs", "layers", "ranks", "bytes"):
        assert k in d
    assert (d["status"], d["steps"], d["epochs"], d["layers"], d["ranks"]) == ("complete", 8, 2, 3, [0])
    assert d["bytes"] == sum(os.path.getsize(os.path.join(good_run, "rank-00000", f))
                             for f in os.listdir(os.path.join(good_run, "rank-00000")) if f.endswith(".h5"))
    assert d["recorded"]["grads"]["steps"] == 8 and d["recorded"]["weights"]["steps"] == 4
    assert d["bytes"] == run.nbytes


def test_layers(good_run, capsys):
    code, out, _ = run_cli(["layers", good_run], capsys)
    assert code == 0 and "body.1" in out and "Linear" in out
    code, out, _ = run_cli(["layers", good_run, "--json"], capsys)
    assert [r["name"] for r in json.loads(out)] == ["conv", "body.1", "head"]


def test_help_for_every_command(capsys):
    for cmd in ([], ["info"], ["layers"], ["report"], ["demo"]):
        code, out, _ = run_cli(cmd + ["--help"], capsys)
        assert code == 0 and "Usage" in out


# ------------------------------------------------------------------ bad input corpus

_copy, _shard, _manifest_edit = helpers.copy_run, helpers.shard_path, helpers.manifest_edit


def _shard_edit(fn):
    def make(good_run, tmp_path):
        d = _copy(good_run, tmp_path)
        with h5py.File(_shard(d), "r+") as f:
            fn(f)
        return d
    return make


def _missing(g, t):
    return t / "does-not-exist"


def _empty(g, t):
    (t / "empty").mkdir()
    return t / "empty"


def _not_a_run(g, t):
    (t / "notrun").mkdir()
    (t / "notrun" / "notes.txt").write_text("hello")
    return t / "notrun"


def _a_file(g, t):
    (t / "f.txt").write_text("x")
    return t / "f.txt"


def _malformed_manifest(g, t):
    d = _copy(g, t)
    (d / "manifest.json").write_text("{ this is not json")
    return d


def _manifest_is_list(g, t):
    d = _copy(g, t)
    (d / "manifest.json").write_text("[1, 2]")
    return d


def _binary_manifest(g, t):
    d = _copy(g, t)
    (d / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    return d


def _truncated(g, t):
    d = _copy(g, t)
    p = _shard(d)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return d


def _random_bytes(g, t):
    d = _copy(g, t)
    _shard(d, 1).write_bytes(np.random.default_rng(0).bytes(5000))
    return d


def _empty_shard(g, t):
    d = _copy(g, t)
    _shard(d, 1).write_bytes(b"")
    return d


def _bad_rank_json(g, t):
    d = _copy(g, t)
    (d / "rank-00000" / "rank.json").write_text("nope")
    return d


def _del(path):
    def f(h):
        del h[path]
    return f


def _reshape(h):
    del h["grads/head/weight/values"]
    h.create_dataset("grads/head/weight/values", data=np.zeros((3, 7, 7), np.float32))


def _shard_version(h):
    h.attrs["format_version"] = 42


def _rows_mismatch(h):
    v = h["grads/head/weight/values"][()]
    del h["grads/head/weight/values"]
    h.create_dataset("grads/head/weight/values", data=v[:1])


BAD = {
    "missing directory": (_missing, "no such run directory"),
    "empty directory": (_empty, "empty directory"),
    "directory that is not a run": (_not_a_run, "not a bbdecoder run"),
    "a file instead of a directory": (_a_file, "not a directory"),
    "malformed manifest": (_malformed_manifest, "malformed manifest"),
    "manifest not an object": (_manifest_is_list, "malformed manifest"),
    "binary manifest": (_binary_manifest, "manifest"),
    "unknown format version": (_manifest_edit(lambda m: m.update(format_version=99)), "version 99"),
    "version as string": (_manifest_edit(lambda m: m.update(format_version="1")), "format_version"),
    "foreign manifest": (_manifest_edit(lambda m: m.update(format="other")), "not a bbdecoder manifest"),
    "layers missing": (_manifest_edit(lambda m: m.pop("layers")), "'layers'"),
    "layer key with slash": (_manifest_edit(lambda m: m["layers"][0].update(key="../../etc")), "unsafe key"),
    "absurd declared size": (_manifest_edit(lambda m: m["layers"][0]["params"][0].update(shape=[2**30, 2**30])),
                             "absurd"),
    "negative shape": (_manifest_edit(lambda m: m["layers"][0]["params"][0].update(shape=[-1])), "malformed"),
    "duplicate layer ids": (_manifest_edit(lambda m: m["layers"][1].update(id=0)), "duplicate"),
    "truncated shard": (_truncated, "corrupt or truncated shard"),
    "random-byte shard": (_random_bytes, "corrupt or truncated shard"),
    "empty shard file": (_empty_shard, "corrupt or truncated shard"),
    "malformed rank.json": (_bad_rank_json, "malformed rank file"),
    "shard of unknown version": (_shard_edit(_shard_version), "version 42"),
    "shard without step table": (_shard_edit(_del("steps")), "steps"),
    "shard without a step column": (_shard_edit(_del("steps/loss")), "lacks 'loss'"),
    "shard with mismatched shape": (_shard_edit(_reshape), "manifest says"),
    "shard with rows != steps": (_shard_edit(_rows_mismatch), "rows"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("cmd", ["info", "report"])
def test_bad_run_gives_one_line_and_nonzero_exit(good_run, tmp_path, capsys, case, cmd):
    make, words = BAD[case]
    target = make(good_run, tmp_path)
    out_dir = tmp_path / "out"
    before = _tree(tmp_path)
    argv = [cmd, str(target)] + (["--out", str(out_dir)] if cmd == "report" else [])
    code, out, err = run_cli(argv, capsys)
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbdecoder: error:"), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing written anywhere, not even --out
    assert not out_dir.exists()


def test_unknown_layer_in_report(good_run, tmp_path, capsys):
    code, _, err = run_cli(["report", good_run, "--out", str(tmp_path / "o"), "--layers", "head,nope"], capsys)
    assert code == 2 and "unknown layer 'nope'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unwritable_out(good_run, tmp_path, capsys, kind):
    f = tmp_path / "afile"
    f.write_text("keep me")
    out = f if kind == "file" else f / "sub"
    code, _, err = run_cli(["report", good_run, "--out", str(out)], capsys)
    assert code == 2 and err.startswith("bbdecoder: error:") and len(err.strip().splitlines()) == 1
    assert f.read_text() == "keep me"


def test_console_script_shows_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "bbdecoder")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "bbdecoder.analyzer.cli"]
    r = subprocess.run(cmd + ["info", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith("bbdecoder: error: no such run directory")
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["info"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
