"""A corpus of hostile traces (issue 16, items 2, 3, 5, 6, 8): small tampered copies of one recorded
run, each read by the CLI in a child process under a memory limit (RLIMIT_AS) and a timeout.

Every case asserts the clean outcome (the exit status, one line on stderr, no traceback), that the
values of a planted outside file (7777.0, "OUTSIDE-SECRET") never show in what a command prints or
writes, and that nothing outside --out was written (tests/helpers.tree_snapshot of the whole tmp).
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.captures import CAPTURE_KIND, FEATURE_KIND
from helpers import ROOT, record_tiny, tree_snapshot

#: the address-space limit of a child (the analyzer never imports torch: this is what it really needs)
MEMORY_LIMIT = 1536 << 20
#: seconds a child may take for all its commands
CHILD_TIMEOUT = 120
#: bytes a decompression bomb inflates to (HEAD read them whole: 400 MB made a 500 MB process)
BOMB = 64 << 20
#: the outside file's value and text: they must never appear in anything a command prints or writes
SECRET_VALUE, SECRET_TEXT = 7777.0, "OUTSIDE-SECRET"

DRIVER = r"""
import io, json, resource, signal, sys, contextlib, time
limit, per_cmd = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from bbdecoder.analyzer.cli import main
def hang(*a):
    raise TimeoutError("hang")
signal.signal(signal.SIGALRM, hang)
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    code, t0 = 0, time.perf_counter()
    signal.alarm(per_cmd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, err = -1, io.StringIO(err.getvalue() + f"ESCAPED {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "s": round(time.perf_counter() - t0, 2)})
sys.__stdout__.write(json.dumps(results))
"""


def run_limited(commands, per_cmd=40):
    """Run each ``bbdecoder`` argv of ``commands`` in one child under :data:`MEMORY_LIMIT` bytes of
    address space and ``per_cmd`` seconds each; returns [{argv, code, out, err}]."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("BBDECODER_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", DRIVER, str(MEMORY_LIMIT), str(per_cmd)],
                       input=json.dumps(commands), capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
    assert p.returncode == 0, f"the child died ({p.returncode}): {p.stderr[-3000:]}"
    return json.loads(p.stdout)


# ------------------------------------------------------------------ the base run and its outside file
def write_capture(path, n=4, K=3, h=4, w=4, H=8, W=8, **over):
    """A small attention capture as the recorder writes it (chunked rows, lzf masks), by hand."""
    r = np.random.default_rng(0)
    attrs = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": CAPTURE_KIND,
             "step": 3, "epoch": 0, "rank": 0, "target_layer": "conv", "image_size": np.array([H, W]),
             "n_images": n, "targets": json.dumps([{"name": "bird", "key": "bird", "kind": "class", "index": 1}]),
             "mask_names": json.dumps({"object": "object"}), "group_names": json.dumps(["y"])}
    attrs.update(over)
    M = np.zeros((n, H, W), np.uint8)
    M[:, 2:6, 2:6] = 1
    data = {"activations": np.maximum(r.normal(size=(n, K, h, w)), 0).astype(np.float32),
            "grads/bird": r.normal(size=(n, K, h, w)).astype(np.float32),
            "logits": r.normal(size=(n, 2)).astype(np.float32), "labels": np.arange(n) % 2,
            "index": np.arange(n), "groups": (np.arange(n) % 2)[:, None], "masks/object": M}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v, chunks=v.shape, **({"compression": "lzf"} if k.startswith("masks/") else {}))
        for k, v in attrs.items():
            f.attrs[k] = v


def write_features(path, values, **over):
    """A feature capture (values float32 (N, C, H, W)) by hand."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=np.asarray(values, np.float32))
        f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": FEATURE_KIND,
                        "layer": "conv", "step": 0, "epoch": 0, "rank": 0, **over})


def graph_json(n_nodes=3):
    """A small valid function graph (as recorder/graph.py writes it)."""
    nodes = [{"id": i, "op": "input" if i == 0 else "relu", "func": "f", "module": "body", "module_type": "ReLU",
              "kind": None if i == 0 else "relu", "inputs": [[2, 4]], "outputs": [[2, 4]], "input_dtypes": ["float32"],
              "output_dtypes": ["float32"], "params": [], "flops": 8 * i} for i in range(n_nodes)]
    edges = [{"src": i, "dst": i + 1, "arg": 0, "shape": [2, 4]} for i in range(n_nodes - 1)]
    mods = [{"name": "", "type": "Tiny", "depth": 0, "calls": 1, "n_params": 0, "flops": 8, "time_s": 0.001,
             "kind": None}, {"name": "body", "type": "ReLU", "depth": 1, "calls": 1, "n_params": 0, "flops": 8,
                             "time_s": None, "kind": "relu"}]
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": fmt.GRAPH_KIND,
            "nodes": nodes, "edges": edges, "modules": mods}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A recorded run (2 steps) with one attention capture, two feature captures and a graph."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    record_tiny(str(run), epochs=1, steps_per_epoch=2, grads_every=1, weights_every=1)
    write_capture(str(run / "captures" / "capture-000000.h5"))
    r = np.random.default_rng(1)
    for i in range(2):
        write_features(str(run / "features" / f"features-{i:06d}.h5"), r.random((2, 4, 8, 8)), step=i)
    files.write_json_atomic(run / fmt.GRAPH_FILE, graph_json())
    return run


@pytest.fixture
def world(base, tmp_path):
    """(copy of the run, out dir path, outside file): everything under tmp_path."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET_TEXT + "\n")
    with h5py.File(outside / "secret.h5", "w") as f:
        f["secret"] = np.full((4, 3, 4, 4), SECRET_VALUE, np.float32)
    return run, tmp_path / "out", outside


@functools.lru_cache(maxsize=None)
def _bomb_chunk(nbytes):
    """A deflate stream of ``nbytes`` zeros (about nbytes / 1000 bytes)."""
    import zlib
    c = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    return b"".join([c.compress(block) for _ in range(nbytes >> 20)] + [c.flush()])


# ------------------------------------------------------------------ the cases: (name, tamper(run, outside), argv)
def _cap(run):
    return run / "captures" / "capture-000000.h5"


def t_capture_2e31_images(run, outside):
    """2^31 images declared in unallocated chunks (a 68 KB file hung attention-iou)."""
    p = _cap(run)
    with h5py.File(p, "r+") as f:
        for k in ("activations", "grads/bird", "logits", "labels", "index", "groups", "masks/object"):
            d = f[k]
            shape, dt = d.shape, d.dtype
            del f[k]
            f.create_dataset(k, shape=(1 << 31, *shape[1:]), maxshape=(None, *shape[1:]),
                             chunks=(1, *shape[1:]), dtype=dt)
        f.attrs["n_images"] = 1 << 31


def t_capture_image_size(run, outside):
    """image_size 60000 x 60000: the maps upsampled to it took 4.3 GB from 85 KB."""
    with h5py.File(_cap(run), "r+") as f:
        f.attrs["image_size"] = np.array([60000, 60000])


def t_capture_mask_bomb(run, outside):
    """A mask whose one compressed chunk inflates to 400 MB."""
    with h5py.File(_cap(run), "r+") as f:
        shape = f["masks/object"].shape
        del f["masks/object"]
        d = f.create_dataset("masks/object", shape=shape, chunks=shape, dtype="u1", compression="gzip")
        d.id.write_direct_chunk((0, 0, 0), _bomb_chunk(BOMB), filter_mask=0)


def t_capture_mask_declared(run, outside):
    """A mask dataset declaring 4 x 4096 x 4096 bytes of fill values (the 'image' resolution upsamples
    the maps to it)."""
    with h5py.File(_cap(run), "r+") as f:
        del f["masks/object"]
        f.create_dataset("masks/object", shape=(4, 4096, 4096), chunks=(1, 512, 512), dtype="u1", compression="lzf")


def t_capture_step_inf(run, outside):
    with h5py.File(_cap(run), "r+") as f:
        f.attrs["step"] = np.inf


def t_capture_one_of_two_bad(run, outside):
    """Two captures, the first with step=inf: a report scores the second and notes the first."""
    shutil.copy(_cap(run), run / "captures" / "capture-000001.h5")
    t_capture_step_inf(run, outside)


def t_capture_compound(run, outside):
    with h5py.File(_cap(run), "r+") as f:
        del f["logits"]
        f["logits"] = np.zeros((4, 2), dtype=np.dtype([("a", "f4"), ("b", "i4")]))


def t_capture_outside_link(run, outside):
    """The capture itself a symbolic link to a file outside the run."""
    shutil.copy(_cap(run), outside / "cap.h5")
    with h5py.File(outside / "cap.h5", "r+") as f:
        f["activations"][...] = SECRET_VALUE
    os.unlink(_cap(run))
    os.symlink(outside / "cap.h5", _cap(run))


def t_capture_fifo(run, outside):
    os.unlink(_cap(run))
    os.mkfifo(_cap(run))


def _feat(run, i=0):
    return run / "features" / f"features-{i:06d}.h5"


def t_features_declared(run, outside):
    """32 KB of feature files declaring 1000 x 64 x 256 x 256 float32 each (8.5 GB read)."""
    for i in range(2):
        os.unlink(_feat(run, i))
        with h5py.File(_feat(run, i), "w") as f:
            f.create_dataset("values", shape=(1000, 64, 256, 256), chunks=(1, 1, 256, 256), dtype="f4")
            f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": 1, "kind": FEATURE_KIND, "layer": "conv",
                            "step": i, "epoch": 0, "rank": 0})


def t_features_bomb(run, outside):
    os.unlink(_feat(run, 0))
    with h5py.File(_feat(run, 0), "w") as f:
        d = f.create_dataset("values", shape=(2, 4, 8, 8), chunks=(2, 4, 8, 8), dtype="f4", compression="gzip")
        d.id.write_direct_chunk((0, 0, 0, 0), _bomb_chunk(BOMB), filter_mask=0)
        f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": 1, "kind": FEATURE_KIND, "layer": "conv",
                        "step": 0, "epoch": 0, "rank": 0})


def t_features_compound(run, outside):
    os.unlink(_feat(run, 0))
    with h5py.File(_feat(run, 0), "w") as f:
        f["values"] = np.zeros((2, 4, 8, 8), dtype=np.dtype([("a", "f4"), ("b", "i4")]))
        f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": 1, "kind": FEATURE_KIND, "layer": "conv",
                        "step": 0, "epoch": 0, "rank": 0})


def t_features_step_inf(run, outside):
    with h5py.File(_feat(run, 1), "r+") as f:
        f.attrs["step"] = np.inf


def t_features_external(run, outside):
    """values kept in a raw file outside the run (external storage)."""
    raw = outside / "secret.raw"
    raw.write_bytes(np.full((2, 4, 8, 8), SECRET_VALUE, np.float32).tobytes())
    os.unlink(_feat(run, 0))
    with h5py.File(_feat(run, 0), "w") as f:
        f.create_dataset("values", shape=(2, 4, 8, 8), dtype="f4", external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": 1, "kind": FEATURE_KIND, "layer": "conv",
                        "step": 0, "epoch": 0, "rank": 0})


def t_features_fifo(run, outside):
    os.unlink(_feat(run, 1))
    os.mkfifo(_feat(run, 1))


def t_features_escapes(run, outside):
    """A captured layer name that would clear the screen and retitle the terminal if printed raw."""
    for i in range(2):
        with h5py.File(_feat(run, i), "r+") as f:
            f.attrs["layer"] = "\x1b[2J\x1b]0;pwned\x07conv"


def t_shard_bomb(run, outside):
    """One huge compressed chunk in a 64-byte step-table column (info --nonfinite at 1.15 GB)."""
    p = run / "rank-00000" / "shard-000000.h5"
    with h5py.File(p, "r+") as f:
        g = f["steps"]
        old = g["loss"]
        n, dt = old.shape[0], old.dtype
        del g["loss"]
        d = g.create_dataset("loss", shape=(n,), maxshape=(None,), chunks=(max(n, 1),), dtype=dt, compression="gzip")
        d.id.write_direct_chunk((0,), _bomb_chunk(BOMB), filter_mask=0)


def t_graph_deep(run, outside):
    (run / fmt.GRAPH_FILE).write_text("[" * 100000 + "]" * 100000)


def t_graph_bad_fields(run, outside):
    g = graph_json()
    g["nodes"][1]["inputs"] = 5
    g["nodes"][2]["input_dtypes"] = [1, 2]
    g["modules"][0]["depth"] = "x"
    (run / fmt.GRAPH_FILE).write_text(json.dumps(g))


def t_graph_huge_int(run, outside):
    g = graph_json()
    g["nodes"][1]["flops"] = 10 ** 30
    (run / fmt.GRAPH_FILE).write_text(json.dumps(g))


def t_graph_fifo(run, outside):
    os.unlink(run / fmt.GRAPH_FILE)
    os.mkfifo(run / fmt.GRAPH_FILE)


def t_graph_link(run, outside):
    os.unlink(run / fmt.GRAPH_FILE)
    shutil.copy(outside / "secret.txt", outside / "g.json")
    os.symlink(outside / "g.json", run / fmt.GRAPH_FILE)


def t_none(run, outside):
    """The control: the untouched copy."""


def t_out_links(run, outside):
    """Planted links where outputs go: figures/ of a report, sweep.csv of a sweep, ops.csv of a graph."""
    for sub, name in (("report", "figures"), ("sweep", "sweep.csv"), ("graph", "ops.csv")):
        d = run.parent / f"out-links-{sub}"
        d.mkdir()
        os.symlink(outside / "secret.txt" if "." in name else outside, d / name)


def t_out_nonempty(run, outside):
    for sub in ("report", "sweep", "graph", "features"):
        d = run.parent / f"out-full-{sub}"
        d.mkdir()
        (d / "mine.txt").write_text("keep\n")


CAPTURE_CASES = [t_capture_2e31_images, t_capture_image_size, t_capture_mask_bomb, t_capture_mask_declared,
                 t_capture_step_inf, t_capture_compound, t_capture_outside_link, t_capture_fifo]
FEATURE_CASES = [t_features_declared, t_features_bomb, t_features_compound, t_features_step_inf, t_features_external,
                 t_features_fifo]
GRAPH_CASES = [t_graph_deep, t_graph_bad_fields, t_graph_huge_int, t_graph_link, t_graph_fifo]
IOU = ["attention-iou", "{run}", "--target", "bird", "--mask-group", "object", "--bootstrap", "10"]
FEATURES = ["features", "{run}", "--layer", "conv", "--out", "{out}"]
GRAPH = ["graph", "{run}", "--out", "{out}", "--engine", "matplotlib"]
REPORT = ["report", "{run}", "--out", "{out}", "--jobs", "1"]
SWEEP = ["prune", "{run}", "--criterion", "magnitude", "--sweep", "--thresholds", "0,0.1", "--out", "{out}"]
#: (case, command, expected exit status, words of the one stderr line (exit 2) or None)
PLAN = ([(c, IOU, 2, "capture") for c in CAPTURE_CASES]
        + [(t_capture_one_of_two_bad, REPORT, 0, None)]     # the bad capture skipped, the rest written
        + [(c, FEATURES, 2, "feature capture") for c in FEATURE_CASES]
        + [(c, GRAPH, 2, "graph") for c in GRAPH_CASES]
        + [(t_features_escapes, FEATURES, 2, "(captured: \\x1b[2J\\x1b]0;pwned\\x07conv)")]
        + [(t_shard_bomb, ["info", "{run}", "--nonfinite"], 2, "compressed chunk")]
        + [(t_none, IOU + ["--json"], 0, None), (t_none, FEATURES, 0, None), (t_none, GRAPH, 0, None)]
        + [(t_none, FEATURES + ["--channels", "0:1000000000"], 2, "out of range"),
           (t_none, FEATURES + ["--fps", "nan"], 2, "--fps"),
           (t_none, ["prune", "{run}", "--criterion", "magnitude", "--threshold", "0.1", "--steps",
                     "99999999999999999999", "--out", "{out}/plan.json"], 2, "--steps"),
           (t_none, ["graph", "{run}", "--out", "{out}", "--engine", "matplotlib"], 2, "being written by another")]
        + [(t_out_links, [*REPORT[:3], "{run}/../out-links-report", "--force", *REPORT[4:]], 2, "symbolic link"),
           (t_out_links, [*SWEEP[:-1], "{run}/../out-links-sweep", "--force"], 2, "symbolic link"),
           (t_out_links, [*GRAPH[:3], "{run}/../out-links-graph", "--force", *GRAPH[4:]], 2, "symbolic link")]
        + [(t_out_nonempty, [*cmd[:cmd.index("{out}")], f"{{run}}/../out-full-{sub}", *cmd[cmd.index("{out}") + 1:]],
            2, "not empty; pass --force") for sub, cmd in (("report", REPORT), ("sweep", SWEEP), ("graph", GRAPH),
                                                          ("features", FEATURES))])
LOCKED = "out-locked"


def _no_secret(res, out_dirs):
    for r in res:
        assert SECRET_TEXT not in r["out"] + r["err"] and "7777" not in r["out"], r
    for d in out_dirs:
        for dp, _, fs in os.walk(d):
            for n in fs:
                if not n.endswith((".csv", ".json", ".html", ".dot")):
                    continue
                b = open(os.path.join(dp, n), "rb").read()
                assert SECRET_TEXT.encode() not in b and b"7777" not in b, os.path.join(dp, n)


def _clean(r, code, words):
    """Exit ``code``; with 2, stderr is one 'bbdecoder: error:' line holding ``words``; no traceback."""
    assert r["code"] == code, r
    assert "Traceback" not in r["err"] and "ESCAPED" not in r["err"] and "internal error" not in r["err"], r
    if code == 2:
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bbdecoder: error: ") and words in lines[0], r


@pytest.fixture(scope="module")
def corpus(base, tmp_path_factory):
    """Every case of :data:`PLAN` built on its own copy of the run, every command run in ONE child
    under the memory limit (one interpreter start for the whole corpus), while this process holds
    the lock of out-locked/. Returns (tmp, [(case, argv, code, words, out, result)], changed paths)."""
    from bbdecoder.analyzer.outdir import out_lock
    tmp = tmp_path_factory.mktemp("corpus")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET_TEXT + "\n")
    built, rows = {}, []
    for k, (case, argv, code, words) in enumerate(PLAN):
        if case.__name__ not in built:
            run = built[case.__name__] = tmp / case.__name__
            shutil.copytree(base, run)
            case(run, outside)
        out = tmp / (LOCKED if "being written" in (words or "") else f"out-{k}")
        rows.append((case, [a.format(run=built[case.__name__], out=out) for a in argv], code, words, out))
    (tmp / LOCKED).mkdir()
    before = tree_snapshot(tmp)
    with out_lock(tmp / LOCKED):
        res = run_limited([r[1] for r in rows])
    after = tree_snapshot(tmp)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    return tmp, [(*row, r) for row, r in zip(rows, res)], changed


def test_every_hostile_case_ends_cleanly(corpus):
    """Each command on each hostile copy: the expected exit status and one clear stderr line."""
    _, rows, _ = corpus
    for case, argv, code, words, out, r in rows:
        _clean(r, code, words)
        assert "\x1b" not in r["out"] + r["err"] and "\x07" not in r["out"] + r["err"], r    # escaped


def test_nothing_outside_out_is_written_and_no_outside_value_shows(corpus):
    tmp, rows, changed = corpus
    outs = {os.path.relpath(row[4], tmp) for row in rows if row[2] == 0}
    outs.add(LOCKED)      # its lock file came and went with the parent's lock
    assert changed and all(p.split(os.sep)[0] in outs for p in changed), \
        sorted(p for p in changed if p.split(os.sep)[0] not in outs)
    assert (tmp / "outside" / "secret.txt").read_text() == SECRET_TEXT + "\n"
    for sub in ("report", "sweep", "graph", "features"):
        assert os.listdir(tmp / f"out-full-{sub}") == ["mine.txt"]
    _no_secret([row[5] for row in rows], [row[4] for row in rows])


def test_a_bad_capture_is_a_note_and_the_rest_of_the_report_is_written(corpus):
    _, rows, _ = corpus
    (out, r), = [(row[4], row[5]) for row in rows if row[1][0] == "report" and row[2] == 0]
    summary = json.loads((out / "summary.json").read_text())
    bad = "attention capture: captures/capture-000000.h5: attributes 'step' and 'epoch' must be integers"
    assert bad in summary["skipped"] and f"note: {bad}" in r["err"].splitlines()
    assert summary["attention"]["captures"] == 1 and summary["attention"]["capture"] == 1   # the good one
    for f in ("figures/loss.png", "figures/attention_scores.png"):
        assert f in summary["figures"] and (out / f).is_file()


def test_untampered_copy_reads_with_its_numbers(corpus, base):
    """The control: attention-iou scores the capture's splits (the counts add up), features writes
    its files, graph its 3 ops."""
    _, rows, _ = corpus
    (iou,), = [row[5:] for row in rows if row[0] is t_none and row[1][0] == "attention-iou"]
    got = {r["split"]: r["n"] for r in json.loads(iou["out"])}
    assert set(got) == {"all", "correct", "incorrect", "y=0", "y=1"}     # the group column y of the 4 images
    assert got["all"] == got["correct"] + got["incorrect"] == got["y=0"] + got["y=1"] >= 1
    (fout,), = [row[4:5] for row in rows if row[0] is t_none and row[1][0] == "features" and row[2] == 0]
    assert (fout / "features-conv.gif").is_file() and (fout / "features-conv.png").is_file()
    (gout,), = [row[4:5] for row in rows if row[0] is t_none and row[1][0] == "graph" and row[2] == 0]
    assert len((gout / "ops.csv").read_text().strip().splitlines()) == 1 + 3
    assert not (gout / ".bbdecoder.lock").exists()         # the lock file goes with the command
