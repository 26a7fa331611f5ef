"""Bad input through every reading command (issue 5, "Bad input"): one clear line on stderr, a
non-zero exit, no traceback, nothing written outside --out (the tmp tree is compared before and
after). Builds on tests/test_cli.py's table of 24 broken runs (re-run here for the commands that
table does not cover: layers, dead, saturation, prune) and adds cases of its own.

NaN/Inf-filled tensors and layer names containing '/' or '..' are not errors: the run is analysed,
the non-finite values are counted and flagged, and names never become paths.
"""

import helpers
import json
import os

import h5py
import numpy as np
import pytest

from bbdecoder.analyzer import pruning
from bbdecoder.analyzer.trace.format import TraceError
from helpers import record_tiny, run_cli, tree_snapshot
from test_cli import BAD as CLI_BAD

COMMANDS = ("info", "layers", "report", "dead", "saturation", "prune")


@pytest.fixture(scope="module")
def act_run(tmp_path_factory):
    """A small run with gradients, weight snapshots and activation statistics (every reader has data)."""
    d = str(tmp_path_factory.mktemp("bad") / "run")
    record_tiny(d, epochs=2, steps_per_epoch=3, weights_every=2, flush_steps=3, activations="all",
                activations_every=1)
    helpers.unflatten_snapshots(d)   # the edits below address per-tensor groups (hostile flat groups: test_snapshots)
    return d


def argv_for(cmd, run, out):
    """The command line of ``cmd`` on ``run`` with every output under ``out``."""
    return {
        "info": ["info", run],
        "layers": ["layers", run],
        "report": ["report", run, "--out", out],
        "dead": ["dead", run],
        "saturation": ["saturation", run],
        "prune": ["prune", run, "--criterion", "magnitude", "--threshold", "0.01", "--out",
                  os.path.join(out, "plan.json")],
    }[cmd]


def assert_one_line_error(code, out, err, words):
    assert code != 0, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbdecoder: error:"), err
    assert "Traceback" not in err
    assert words in lines[0], lines[0]


def check_refused(tmp_path, capsys, cmd, target, words):
    out_dir = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    code, out, err = run_cli(argv_for(cmd, str(target), str(out_dir)), capsys)
    assert_one_line_error(code, out, err, words)
    assert tree_snapshot(tmp_path) == before      # nothing written anywhere, not even --out
    assert not out_dir.exists()


# ------------------------------------------------------------------ case builders

_copy, _shard, manifest = helpers.copy_run, helpers.shard_path, helpers.manifest_edit


def rank_json(fn):
    def make(run, t):
        d = _copy(run, t)
        p = d / "rank-00000" / "rank.json"
        obj = json.loads(p.read_text())
        obj = fn(obj)
        p.write_text(json.dumps(obj))
        return d
    return make


def shard(fn, i=0):
    def make(run, t):
        d = _copy(run, t)
        with h5py.File(_shard(d, i), "r+") as f:
            fn(f)
        return d
    return make


def raw(fn):
    def make(run, t):
        d = _copy(run, t)
        fn(d)
        return d
    return make


def _set(path, **kw):
    def f(obj):
        node = obj
        for k in path:
            node = node[k]
        node.update(kw)
    return f


def _first_param(h):
    lk = sorted(h["grads"].keys())[0]
    pk = sorted(h["grads"][lk].keys())[0]
    return f"grads/{lk}/{pk}"


def _param_shape_absurd(m):
    # a 10**12-element parameter (below the 2**40 cap of validate_manifest) ...
    m["layers"][0]["params"][0]["shape"] = [10 ** 6, 10 ** 6]


def _absurd_payload(h):
    # ... and matching sparse datasets: HDF5 stores nothing, reading them would take terabytes
    for kind in ("grads", "weights"):
        if f"{kind}/conv/weight" in h:
            g = h[f"{kind}/conv/weight"]
            n = g["values"].shape[0]
            del g["values"]
            g.create_dataset("values", shape=(n, 10 ** 6, 10 ** 6), dtype="f4", chunks=(1, 1000, 1000))


def _huge_step_table(h):
    del h["steps/step"]
    h["steps"].create_dataset("step", shape=(10 ** 12,), dtype="i8", chunks=(1 << 16,))
    h.attrs["n_steps"] = 10 ** 12


def _huge_payload_rows(h):
    p = _first_param(h)
    shp = h[p + "/values"].shape[1:]
    del h[p + "/values"], h[p + "/steps"]
    h.create_dataset(p + "/values", shape=(10 ** 10, *shp), dtype="f4", chunks=(1024, *shp))
    h.create_dataset(p + "/steps", shape=(10 ** 10,), dtype="i8", chunks=(1 << 16,))


def _string_values(h):
    p = _first_param(h)
    n, *shp = h[p + "/values"].shape
    del h[p + "/values"]
    h.create_dataset(p + "/values", data=np.full((n, *shp), b"x", dtype="S1"))


def _complex_values(h):
    p = _first_param(h)
    v = h[p + "/values"][()]
    del h[p + "/values"]
    h.create_dataset(p + "/values", data=v.astype(np.complex64))


def _string_step_column(h):
    n = h["steps/step"].shape[0]
    del h["steps/step"]
    h["steps"].create_dataset("step", data=np.array([b"s"] * n))


def _two_d_step_column(h):
    v = h["steps/loss"][()]
    del h["steps/loss"]
    h["steps"].create_dataset("loss", data=np.stack([v, v], 1))


def _short_step_column(h):
    v = h["steps/epoch"][()]
    del h["steps/epoch"]
    h["steps"].create_dataset("epoch", data=v[:-1])


def _payload_is_dataset(h):
    del h["grads/head"]
    h["grads"].create_dataset("head", data=np.zeros(3))


def _act_stat_shape(h):
    site = sorted(h["act_stats"].keys())[0]
    p = f"act_stats/{site}/sum"
    n = h[p + "/values"].shape[0]
    del h[p + "/values"]
    h.create_dataset(p + "/values", data=np.zeros((n, 999)))


def _truncate_tail(d):
    p = _shard(d)
    data = p.read_bytes()
    p.write_bytes(data[:-64])


def _zero_superblock(d):
    p = _shard(d)
    data = bytearray(p.read_bytes())
    data[:64] = bytes(64)
    p.write_bytes(bytes(data))


def _shard_is_dir(d):
    p = _shard(d, 1)
    p.unlink()
    p.mkdir()


def _dangling_shard_link(d):
    p = _shard(d, 1)
    p.unlink()
    os.symlink(str(d / "nowhere.h5"), p)


def _manifest_is_dir(d):
    (d / "manifest.json").unlink()
    (d / "manifest.json").mkdir()


def _empty_manifest(d):
    (d / "manifest.json").write_bytes(b"")


def _manifest_nan_literal(d):
    (d / "manifest.json").write_text('{"format": NaN}')


def _absurd(run, t):
    d = _copy(run, t)
    m = json.loads((d / "manifest.json").read_text())
    _param_shape_absurd(m)
    (d / "manifest.json").write_text(json.dumps(m))
    for p in sorted((d / "rank-00000").glob("shard-*.h5")):     # a consistent trace of absurd size
        with h5py.File(p, "r+") as f:
            _absurd_payload(f)
    return d


#: name -> (builder(run, tmp) -> run dir, words expected in the error line, commands)
CASES = {
    # manifest
    "empty manifest file": (raw(_empty_manifest), "malformed manifest", COMMANDS),
    "manifest is a directory": (raw(_manifest_is_dir), "is not a regular file", COMMANDS),
    "manifest with a NaN format": (raw(_manifest_nan_literal), "non-finite number NaN (not JSON)", ("info", "report")),
    "manifest without format_version": (manifest(lambda m: m.pop("format_version")), "format_version", COMMANDS),
    "manifest version true": (manifest(lambda m: m.update(format_version=True)), "format_version", ("info",)),
    "manifest version 0": (manifest(lambda m: m.update(format_version=0)), "version 0 is not supported",
                           ("info", "report")),
    "layers is an object": (manifest(lambda m: m.update(layers={"a": 1})), "'layers' must be a list", COMMANDS),
    "layer is a string": (manifest(lambda m: m["layers"].__setitem__(0, "conv")), "is not an object", ("info",)),
    "layer without name": (manifest(lambda m: m["layers"][0].pop("name")), "lacks a valid 'name'", COMMANDS),
    "layer id a string": (manifest(_set(["layers", 0], id="0")), "lacks a valid 'id'", ("info", "layers")),
    "params an object": (manifest(_set(["layers", 0], params={})), "lacks a valid 'params'", ("layers",)),
    "param shape a string": (manifest(_set(["layers", 0, "params", 0], shape="3x3")), "malformed parameter",
                             ("info", "prune")),
    "param shape of floats": (manifest(_set(["layers", 0, "params", 0], shape=[4.0, 3.0])), "malformed parameter",
                              ("report",)),
    "param key with '..'": (manifest(_set(["layers", 0, "params", 0], key="..")), "unsafe", COMMANDS),
    "param key with '/'": (manifest(_set(["layers", 0, "params", 0], key="w/../../x")), "unsafe", ("report",)),
    "layer key with '/'": (manifest(_set(["layers", 1], key="body/1")), "unsafe key", ("report", "layers")),
    "layer key '..'": (manifest(_set(["layers", 1], key="..")), "unsafe key", ("report", "prune")),
    "sites an object": (manifest(lambda m: m.update(sites={})), "'sites' must be a list", ("dead", "saturation")),
    "site key with '/'": (manifest(_set(["sites", 0], key="../../x")), "activation site #0 is malformed",
                          ("dead", "report")),
    "site with 10**12 units": (manifest(_set(["sites", 0], units=10 ** 12)), "activation site #0 is malformed",
                               ("dead", "saturation")),
    "site stat of negative shape": (manifest(lambda m: m["sites"][0]["stats"].update(sum=[-4])),
                                    "malformed shape", ("saturation",)),
    "site without a statistic": (manifest(lambda m: m["sites"][0]["stats"].pop("count")), "lacks the statistics count",
                                 ("dead", "saturation", "report")),
    "site statistic for other units": (manifest(lambda m: m["sites"][0]["stats"].update(min=[999])),
                                       "declares min of shape [999]", ("dead", "prune")),
    "layer n_params a string": (manifest(_set(["layers", 0], n_params="x")), "invalid 'n_params'",
                                ("layers", "info")),
    "layer id 2**70": (manifest(_set(["layers", 1], id=2 ** 70)), "invalid id", ("layers", "report")),
    "world_size 10**9": (manifest(lambda m: m.update(world_size=10 ** 9)), "invalid world_size", COMMANDS),
    "world_size 0": (manifest(lambda m: m.update(world_size=0)), "invalid world_size", ("info",)),
    "parameter of 10**12 elements": (_absurd, "absurd", COMMANDS),
    # rank.json
    "rank.json of unknown version": (rank_json(lambda o: dict(o, format_version=7)), "version 7", COMMANDS),
    "rank.json without version": (rank_json(lambda o: {k: v for k, v in o.items() if k != "format_version"}),
                                  "format_version", ("info", "report")),
    "rank.json errors not a list": (rank_json(lambda o: dict(o, errors=None)), "'errors' must be a list",
                                    ("info", "report")),
    "rank.json status a number": (rank_json(lambda o: dict(o, status=3)), "'status' must be a string", ("info",)),
    "rank.json negative dropped": (rank_json(lambda o: dict(o, dropped=-5)), "'dropped' must be an int",
                                   ("info", "layers")),
    "rank.json is a list": (rank_json(lambda o: [o]), "malformed rank file", ("info", "dead")),
    # shards: structure
    "shard version as a string": (shard(lambda h: h.attrs.__setitem__("format_version", "1")), "format_version",
                                  ("info", "report")),
    "shard without format attribute": (shard(lambda h: h.attrs.__delitem__("format")), "is not a bbdecoder shard",
                                       COMMANDS),
    "payload without values": (shard(lambda h: h.__delitem__("grads/head/weight/values")), "lacks values or steps",
                               COMMANDS),
    "payload without steps": (shard(lambda h: h.__delitem__("grads/head/bias/steps")), "lacks values or steps",
                              ("info", "report")),
    "payload layer is a dataset": (shard(_payload_is_dataset), "corrupt shard", ("info", "report", "prune")),
    "activation statistic of the wrong shape": (shard(_act_stat_shape), "manifest says", ("dead", "report")),
    "step column of strings": (shard(_string_step_column), "step table", ("info", "report")),
    "step column 2-D": (shard(_two_d_step_column), "step table", ("info",)),
    "step columns of different lengths": (shard(_short_step_column), "step table", ("info", "dead")),
    "values of strings": (shard(_string_values), "not numeric", COMMANDS),
    "complex values": (shard(_complex_values), "not numeric", ("report", "prune")),
    "step table of 10**12 rows": (shard(_huge_step_table), "absurd", COMMANDS),
    "payload of 10**10 rows": (shard(_huge_payload_rows), "absurd", ("info", "report", "prune")),
    # shards: bytes
    "shard truncated by 64 bytes": (raw(_truncate_tail), "shard", COMMANDS),
    "shard with a zeroed superblock": (raw(_zero_superblock), "corrupt or truncated shard", ("info", "report")),
    "shard is a directory": (raw(_shard_is_dir), "is not a regular file", ("info", "layers")),
    "dangling shard symlink": (raw(_dangling_shard_link), "is a symbolic link (refused in a trace)", ("info", "saturation")),
}


PAIRS = sorted((name, cmd) for name, (_, _, cmds) in CASES.items() for cmd in cmds)


def test_at_least_30_distinct_cases():
    assert len(CASES) + len(CLI_BAD) + len(OPTION_CASES) >= 60 and len(CASES) >= 30


@pytest.mark.parametrize("case, cmd", PAIRS, ids=[f"{c}-{n}" for n, c in PAIRS])
def test_broken_run_is_refused(act_run, tmp_path, capsys, case, cmd):
    make, words, _ = CASES[case]
    check_refused(tmp_path, capsys, cmd, make(act_run, tmp_path), words)


@pytest.mark.parametrize("case", sorted(CLI_BAD))
@pytest.mark.parametrize("cmd", ["layers", "dead", "saturation", "prune"])
def test_cli_table_for_the_other_commands(act_run, tmp_path, capsys, case, cmd):
    """tests/test_cli.py's broken runs, through the commands that file does not run them with."""
    make, words = CLI_BAD[case]
    check_refused(tmp_path, capsys, cmd, make(act_run, tmp_path), words)


# ------------------------------------------------------------------ options out of range, --out

#: (argv after the run directory, words). Every one is refused before anything is read or written.
OPTION_CASES = {
    "report negative delta": (["report", "{run}", "--out", "{out}", "--delta", "-0.1"], "delta must be in"),
    "report delta NaN": (["report", "{run}", "--out", "{out}", "--delta", "nan"], "delta must be in"),
    "report layer share > 1": (["report", "{run}", "--out", "{out}", "--layer-share", "1.5"], "layer_share"),
    "report unit fraction NaN": (["report", "{run}", "--out", "{out}", "--unit-fraction", "nan"], "unit_fraction"),
    "report apoz threshold > 1": (["report", "{run}", "--out", "{out}", "--dead-criterion", "apoz",
                                   "--dead-threshold", "1.5"], "fraction in [0, 1]"),
    "report dead threshold NaN": (["report", "{run}", "--out", "{out}", "--dead-threshold", "nan"], "finite"),
    "report max active fraction -1": (["report", "{run}", "--out", "{out}", "--max-active-fraction", "-1"],
                                      "max_active_fraction"),
    "report bins 0": (["report", "{run}", "--out", "{out}", "--bins", "0"], "--bins"),
    "report sim dim 0": (["report", "{run}", "--out", "{out}", "--sim-dim", "0"], "sim_dim"),
    "dead apoz threshold 2": (["dead", "{run}", "--criterion", "apoz", "--threshold", "2"], "fraction in [0, 1]"),
    "dead dormant negative": (["dead", "{run}", "--criterion", "dormant", "--threshold", "-0.5"], ">= 0"),
    "dead threshold inf": (["dead", "{run}", "--threshold", "inf"], "finite"),
    "dead layer share negative": (["dead", "{run}", "--layer-share", "-0.1"], "layer_share"),
    "saturation negative delta": (["saturation", "{run}", "--delta", "-1"], "delta"),
    "saturation delta NaN": (["saturation", "{run}", "--delta", "nan"], "delta"),
    "saturation unit fraction 2": (["saturation", "{run}", "--unit-fraction", "2"], "--unit-fraction"),
    "prune max active fraction 1.5": (["prune", "{run}", "--criterion", "dead", "--threshold", "0",
                                       "--max-active-fraction", "1.5", "--out", "{out}/p.json"],
                                      "max_active_fraction"),
    "prune thresholds with inf": (["prune", "{run}", "--criterion", "magnitude", "--sweep", "--thresholds",
                                   "0,inf", "--out", "{out}"], "not a finite number"),
    "prune magnitude NaN": (["prune", "{run}", "--criterion", "magnitude", "--threshold", "nan", "--out",
                             "{out}/p.json"], "finite"),
    "report unknown raster site": (["report", "{run}", "--out", "{out}", "--raster-site", "../../etc"],
                                   "site"),
    "dead unknown site glob": (["dead", "{run}", "--sites", "nope*"], "nope"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_out_of_range(act_run, tmp_path, capsys, case):
    args, words = OPTION_CASES[case]
    out_dir = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    run_before = tree_snapshot(act_run)
    code, out, err = run_cli([a.format(run=act_run, out=out_dir) for a in args], capsys)
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbdecoder: error:") and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert tree_snapshot(tmp_path) == before and tree_snapshot(act_run) == run_before
    assert not out_dir.exists()


OUT_CASES = {
    "report --out is a file": (["report", "{run}", "--out", "{file}"], "exists and is not a directory"),
    "report --out under a file": (["report", "{run}", "--out", "{file}/sub"], "cannot create --out"),
    "report --out in /proc": (["report", "{run}", "--out", "/proc/bbdecoder-test-out"], "--out"),
    "prune plan onto an existing file": (["prune", "{run}", "--criterion", "magnitude", "--threshold", "0.01",
                                          "--out", "{file}"], "pass --force"),
    "prune plan under a file": (["prune", "{run}", "--criterion", "magnitude", "--threshold", "0.01",
                                 "--out", "{file}/p.json"], "--out"),
    "prune sweep --out is a file": (["prune", "{run}", "--criterion", "magnitude", "--sweep", "--out", "{file}"],
                                    "exists and is not a directory"),
    "prune plan --out is /dev/null": (["prune", "{run}", "--criterion", "magnitude", "--threshold", "0.01",
                                       "--out", "/dev/null"], "pass --force"),
}


@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_unwritable_or_occupied_out(act_run, tmp_path, capsys, case):
    args, words = OUT_CASES[case]
    f = tmp_path / "afile"
    f.write_text("keep me")
    before = tree_snapshot(tmp_path)
    code, out, err = run_cli([a.format(run=act_run, file=f) for a in args], capsys)
    assert_one_line_error(code, out, err, words)
    assert f.read_text() == "keep me" and tree_snapshot(tmp_path) == before
    assert not os.path.exists("/proc/bbdecoder-test-out")


# ------------------------------------------------------------------ plans

def test_plan_with_a_mismatched_fingerprint_is_refused(act_run, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    code, _, err = run_cli(["prune", act_run, "--criterion", "magnitude", "--threshold", "0.01",
                            "--out", str(plan_path)], capsys)
    assert code == 0, err
    good = json.loads(plan_path.read_text())
    assert pruning.load_plan(plan_path)["model_fingerprint"] == good["model_fingerprint"]
    # a parameter of another shape: the sha256 no longer matches the parameter list
    bad = json.loads(plan_path.read_text())
    bad["model_fingerprint"]["params"][0][1] = [999, 1]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as e:
        pruning.load_plan(tampered)
    assert "does not match its parameter list" in str(e.value) and "\n" not in str(e.value)
    # a consistent fingerprint of another model (sha recomputed): the plan's layers no longer fit it
    other = json.loads(plan_path.read_text())
    params = [[n, s] for n, s in other["model_fingerprint"]["params"] if not n.startswith("head.")]
    other["model_fingerprint"] = pruning.fingerprint(params)
    p2 = tmp_path / "other.json"
    p2.write_text(json.dumps(other))
    with pytest.raises((ValueError, TraceError)) as e:
        pruning.load_plan(p2)
    assert "fingerprint has no parameter" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ not errors: names are never paths

NAMES = ["../../escape", "a/b/../../../c", "/abs/path"]


def test_layer_names_with_slashes_are_not_paths(act_run, tmp_path, capsys):
    d = _copy(act_run, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    for L, name in zip(m["layers"], NAMES):
        L["name"] = name
    m["sites"][0]["name"] = ".."
    (d / "manifest.json").write_text(json.dumps(m))
    out_dir = tmp_path / "nest" / "out"
    before = tree_snapshot(tmp_path)
    code, out, err = run_cli(["report", str(d), "--out", str(out_dir)], capsys)
    assert code == 0, err
    after = tree_snapshot(tmp_path)
    new = {p for p in after if p not in before or after[p] != before[p]}
    assert new and all(p == "nest" or p.startswith(os.path.join("nest", "out")) for p in new), new
    assert not os.path.exists("/abs") and not (tmp_path.parent / "escape").exists()
    s = json.loads((out_dir / "summary.json").read_text())
    assert [L["name"] for L in s["layers"]] == NAMES
    code, out, err = run_cli(["layers", str(d), "--json"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == NAMES
    code, out, err = run_cli(["dead", str(d), "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["site"] == ".."


# ------------------------------------------------------------------ a real process: real stderr, real exit status

def test_real_process_one_line_and_exit_2(act_run, tmp_path):
    """Three cases through the console entry point in a child process (no pytest capture involved)."""
    import subprocess
    import sys
    root = helpers.ROOT
    cases = [(CASES["parameter of 10**12 elements"][0], ["report"], "absurd"),
             (CASES["values of strings"][0], ["info"], "not numeric"),
             (CASES["rank.json of unknown version"][0], ["dead"], "version 7")]
    for i, (make, cmd, words) in enumerate(cases):
        t = tmp_path / f"c{i}"
        t.mkdir()
        target = make(act_run, t)
        out_dir = t / "out"
        before = tree_snapshot(t)
        argv = cmd + [str(target)] + (["--out", str(out_dir)] if cmd == ["report"] else [])
        r = subprocess.run([sys.executable, "-m", "bbdecoder.analyzer.cli", *argv], capture_output=True, text=True,
                           cwd=root, timeout=120)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bbdecoder: error:") and words in lines[0], r.stderr
        assert tree_snapshot(t) == before and not out_dir.exists()


# ------------------------------------------------------------------ not errors: NaN/Inf-filled tensors

def test_nan_and_inf_filled_tensors_are_analysed_and_flagged(act_run, tmp_path, capsys):
    """Every gradient row of head.weight (and its gradient statistics) and every weight snapshot of
    conv.bias in the first shard replaced by NaN/+Inf/-Inf: every command succeeds; the counts and `info --nonfinite` say so (the
    report's flags on a NaN run: tests/test_nonfinite.py)."""
    d = _copy(act_run, tmp_path)
    fills = {"grads/head/weight": (np.nan, np.inf, -np.inf), "weights/conv/bias": (np.nan, np.inf, -np.inf)}
    want = {}
    with h5py.File(_shard(d), "r+") as f:
        for path, vals in fills.items():
            v = f[path + "/values"]
            data = np.empty(v.shape, v.dtype)
            for i in range(len(data)):
                data[i] = vals[i % 3]
            v[...] = data
            want[path] = (int(f[path + "/steps"][0]), int(np.isnan(data).sum() + np.isinf(data).sum()),
                          len(data))
        # the gradient statistics recorded beside the raw rows: NaN-filled too (every element unknown)
        helpers.fill_grad_stats(f, "head", "weight", np.nan)
    out_dir = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    for cmd in COMMANDS:
        if cmd != "report":
            code, out, err = run_cli(argv_for(cmd, str(d), str(out_dir)), capsys)
            assert code == 0 and "error" not in err and "Traceback" not in err, (cmd, err)
    after = tree_snapshot(tmp_path)
    assert all(p == "out" or p.startswith("out" + os.sep) for p in after if after.get(p) != before.get(p))
    code, out, err = run_cli(["info", str(d), "--json", "--nonfinite"], capsys)
    assert code == 0, err
    nf = json.loads(out)["nonfinite"]
    got = {f"{'grads' if e['kind'] == 'gradients' else 'weights'}/{e['layer']}/{e['param']}":
           (e["first_step"], e["count"], e["steps"]) for e in nf["entries"] if e["kind"] != "activations"}
    assert got == want
    from bbdecoder import analyzer
    run = analyzer.open(d)
    gs = run.grad_stats()
    bad = gs[(gs["layer"] == "head") & (gs["param"] == "weight")].set_index("step")
    numel = 5 * 96
    rows = want["grads/head/weight"][2]
    steps = sorted(bad.index)[:rows]
    assert (bad.loc[steps, "nonfinite"] == numel).all() and (bad.loc[steps, "count"] == 0).all()
    assert bad.loc[steps, "l2"].isna().all()                     # no finite element: no statistic
    assert (bad.drop(steps)["nonfinite"] == 0).all() and bad.drop(steps)["l2"].notna().all()
