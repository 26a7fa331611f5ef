"""A full disk while recording: an injected ENOSPC in the HDF5 shard writer and in the JSON writes.

No real small filesystem: mounting a tmpfs needs root, so the error is injected where the OS would
report it (the HDF5 dataset write, the JSON file's write or fsync), as ``OSError(errno.ENOSPC)``.
"""

import helpers
import errno
import json
import os
import time
import warnings

import h5py
import numpy as np
import pytest
import torch

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import captures as tc
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace import hdf5, series
from helpers import Tiny, run_cli
from bbdecoder.recorder import Recorder, RecorderError, RecorderWarning

ENOSPC_TEXT = os.strerror(errno.ENOSPC)          # "No space left on device"
ERROR_LINE = f"OSError: [Errno {errno.ENOSPC}] {ENOSPC_TEXT}"
N_PARAMS = 5


def _enospc():
    return OSError(errno.ENOSPC, ENOSPC_TEXT)


def _fail_at_step(monkeypatch, step):
    """Every tensor write of a step >= ``step`` into a shard raises ENOSPC (before writing; every
    payload reaches the file through ``_append_now``, buffered or not)."""
    real = hdf5.HDF5ShardWriter._append_now

    def _append_now(self, key, steps, values, attrs=None, chunk_rows=None):
        if int(np.max(steps)) >= step:
            raise _enospc()
        return real(self, key, steps, values, attrs, chunk_rows)
    monkeypatch.setattr(hdf5.HDF5ShardWriter, "_append_now", _append_now)


def _fail_after_bytes(monkeypatch, limit):
    """The disk holds ``limit`` bytes of tensor data; the write that goes past it raises ENOSPC."""
    real = hdf5.HDF5ShardWriter._write
    used = [0]

    def _write(self, vds, start, block):
        used[0] += np.asarray(block).nbytes
        if used[0] > limit:
            raise _enospc()
        return real(self, vds, start, block)
    monkeypatch.setattr(hdf5.HDF5ShardWriter, "_write", _write)


def _train_step(m, opt, rec):
    loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    rec.step(loss=loss)
    opt.step()
    return grads


def _closed_shards(rank_dir):
    """{shard name: (steps, {payload: (values, steps)})}, read with h5py; every dataset read fully."""
    out = {}
    for name in sorted(os.listdir(rank_dir)):
        if fmt.parse_shard_filename(name) is None:
            continue
        with h5py.File(os.path.join(rank_dir, name), "r") as f:
            data = {}
            f.visititems(lambda k, o: data.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
        out[name] = (data["steps/step"], helpers.split_payloads(data))   # packed groups split per parameter
    return out


def _check_readable(d, n, grads_every=50):
    """Closed shards hold exactly steps 0..n-1, each with all its gradient statistics (and raw
    gradients every ``grads_every`` steps); the analyzer agrees."""
    rank_dir = os.path.join(d, fmt.rank_dirname(0))
    shards = _closed_shards(rank_dir)
    steps = np.concatenate([s for s, _ in shards.values()]) if shards else np.zeros(0, np.int64)
    assert steps.tolist() == list(range(n))
    for s, payloads in shards.values():   # gradient statistics every step, raw gradients every 50 (defaults)
        stats = {k: v for k, v in payloads.items() if k.startswith("grad_stats/")}
        assert len(stats) == N_PARAMS and all(ps.tolist() == s.tolist() for _, ps in stats.values())
        raw = {k: v for k, v in payloads.items() if k.startswith("grads/")}
        want = s[s % grads_every == 0].tolist()
        assert len(raw) == (N_PARAMS if want else 0) and all(ps.tolist() == want for _, ps in raw.values())
    left = [x for x in os.listdir(rank_dir) + os.listdir(d) if x.endswith(fmt.LIVE_SUFFIX) or x.startswith(".tmp-")]
    assert left == []          # the live shard of the failed write was deleted; no temporary JSON
    return rank_dir


def _info(d, capsys):
    code, out, err = run_cli(["info", d], capsys)
    assert code == 0, err
    return out


def _check_failed_json(d, rank_dir, n, steps_called):
    rank = json.load(open(os.path.join(rank_dir, fmt.RANK_FILE)))
    assert rank["status"] == fmt.STATUS_FAILED and rank["errors"] == [ERROR_LINE]
    assert (rank["shards"], rank["steps_flushed"], rank["last_step"]) == (n // 5, n, n - 1 if n else None)
    man = json.load(open(os.path.join(d, fmt.MANIFEST)))
    assert man["status"] == fmt.STATUS_FAILED and man["error"] == ERROR_LINE and man["steps"] == steps_called


def test_full_disk_warn_training_goes_on_and_recording_stops(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "run")
    torch.manual_seed(0)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    _fail_at_step(monkeypatch, 12)          # in the third shard: steps 10 and 11 are in the live one
    captured = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = Recorder(m, d, flush_steps=5, flush_secs=1000)   # on_error="warn" is the default
        for s in range(30):
            captured[s] = _train_step(m, opt, rec)
            time.sleep(0.002)
        rec.close()
    assert len(captured) == 30                # training went on
    rw = [x for x in w if issubclass(x.category, RecorderWarning)]
    assert len(rw) == 1, [str(x.message) for x in rw]
    assert ENOSPC_TEXT in str(rw[0].message) and "recording stopped" in str(rw[0].message)

    rank_dir = _check_readable(d, 10)         # shards 0 and 1; the live shard (10, 11) is gone
    _check_failed_json(d, rank_dir, 10, 30)
    run = analyzer.open(d)
    assert run.status == "incomplete" and f"the recorder failed: {ERROR_LINE}" in run.status_reason
    g = run.grad_stats()
    names = [(mn, pn) for mn, mod in m.named_modules() for pn, _ in mod.named_parameters(recurse=False)]
    for s in range(10):                        # what was written is the gradients of those steps
        want = {f"{mn}.{pn}" if mn else pn: float(t.double().norm()) for (mn, pn), t in zip(names, captured[s])}
        got = g[g["step"] == s]
        got = {(f"{lay}.{par}" if lay else par): v for lay, par, v in zip(got["layer"], got["param"], got["l2"])}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)
    out = _info(d, capsys)
    assert "status    incomplete" in out and f"error     {ERROR_LINE}" in out and "steps     10 (0..9)" in out


def test_full_disk_raise_next_step_raises(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "run")
    torch.manual_seed(0)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    per_step = 4 * sum(p.numel() for p in m.parameters())        # float32 gradients of one step
    limit = 12 * per_step + per_step // 2                            # runs out in the middle of a step
    _fail_after_bytes(monkeypatch, limit)
    rec = Recorder(m, d, on_error="raise", flush_steps=5, flush_secs=1000, grads_every=1, weights_every=0)
    done, raised = 0, None
    for s in range(200):
        try:
            _train_step(m, opt, rec)
            done += 1
        except RecorderError as e:
            raised = e
            break
        time.sleep(0.005)
    assert raised is not None and ENOSPC_TEXT in str(raised)
    assert isinstance(raised.__cause__, OSError) and raised.__cause__.errno == errno.ENOSPC
    assert done >= 12
    _train_step(m, opt, rec)          # raised once; after that the recorder stands aside
    rec.close()
    rank_dir = _check_readable(d, 10, grads_every=1)  # steps 10..12 were in the live shard when the write failed
    _check_failed_json(d, rank_dir, 10, done + 1)
    out = _info(d, capsys)
    assert "status    incomplete" in out and ENOSPC_TEXT in out


@pytest.mark.parametrize("consistent", [True, False])
def test_live_shard_after_an_error(tmp_path, monkeypatch, consistent):
    """A live shard that a write failed in the middle of is deleted; one that is consistent (the
    error came from elsewhere) is published, so that what it holds is kept."""
    d = str(tmp_path / "rank-00000")
    sw = series.ShardSeriesWriter(d, 0, flush_steps=5)

    def rec(s):
        return series.StepRecord(step=s, epoch=0, loss=float(s), time=0.0, payloads=[
            ("grads", "l0", "p0", np.full(3, s, np.float32), None),
            ("grads", "l0", "p1", np.full(2, -s, np.float32), None)])
    sw.write([rec(0), rec(1), rec(2)])
    if not consistent:
        _fail_after_bytes(monkeypatch, 4 * 3 * 2)    # p0 of steps 3, 4 goes in, p1 does not
        with pytest.raises(OSError, match=ENOSPC_TEXT):
            sw.write([rec(3), rec(4)])
    sw.abandon_live()
    sw.record_error(ERROR_LINE)
    names = sorted(os.listdir(d))
    if consistent:
        assert names == ["rank.json", "shard-000000.h5"]
        shards = _closed_shards(d)
        s, payloads = shards["shard-000000.h5"]
        assert s.tolist() == [0, 1, 2]
        np.testing.assert_array_equal(payloads["grads/l0/p1"][0], -np.array([[0, 0], [1, 1], [2, 2]]))
    else:
        assert names == ["rank.json"]
    st = json.load(open(os.path.join(d, "rank.json")))
    assert st["status"] == "failed" and st["shards"] == int(consistent) and st["errors"] == [ERROR_LINE]


class _JsonOnAFullDisk:
    """Stands in for the json module inside analyzer.trace.files: dump writes half, then ENOSPC."""

    def __init__(self):
        self.armed = False

    def dump(self, obj, f, **kw):
        if not self.armed:
            return json.dump(obj, f, **kw)
        text = json.dumps(obj, **kw)
        f.write(text[:len(text) // 2])
        f.flush()
        raise _enospc()

    def __getattr__(self, name):
        return getattr(json, name)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_json_write_on_a_full_disk_keeps_the_previous_version(tmp_path, monkeypatch, where):
    path = tmp_path / "manifest.json"
    files.write_json_atomic(path, {"status": "recording", "n": 1})
    before = path.read_bytes()
    if where == "write":
        fake = _JsonOnAFullDisk()
        fake.armed = True
        monkeypatch.setattr(files, "json", fake)
    else:                                  # delayed allocation: the error shows at fsync
        def fsync(fd):
            raise _enospc()
        monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(OSError) as ei:
        files.write_json_atomic(path, {"status": "complete", "n": 2, "pad": "x" * 10000})
    assert ei.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and json.loads(before)["n"] == 1
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]      # the temporary file was removed


def test_full_disk_while_writing_rank_json(tmp_path, monkeypatch, capsys):
    """The disk fills up just as rank.json is rewritten after a shard's rename: rank.json keeps its
    previous version (no torn file, no temporary left), the published shard stays readable, one
    warning; once space is back, close() records the failure in both JSON files."""
    d = str(tmp_path / "run")
    fake = _JsonOnAFullDisk()
    monkeypatch.setattr(files, "json", fake)
    torch.manual_seed(0)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    rank_file = os.path.join(d, fmt.rank_dirname(0), fmt.RANK_FILE)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = Recorder(m, d, flush_steps=5, flush_secs=1000)
        for _ in range(10):
            _train_step(m, opt, rec)
        rec.flush()
        before = open(rank_file, "rb").read()
        fake.armed = True                      # the disk is full from now on
        for _ in range(5):
            _train_step(m, opt, rec)
        rec.flush()                            # closes shard 2: renamed, then rank.json fails
        for _ in range(5):
            _train_step(m, opt, rec)
        assert open(rank_file, "rb").read() == before
        assert json.loads(before)["shards"] == 2 and json.loads(before)["status"] == "recording"
        assert not [x for x in os.listdir(os.path.dirname(rank_file)) + os.listdir(d) if x.startswith(".tmp-")]
        fake.armed = False                     # space is back
        rec.close()
    rw = [x for x in w if issubclass(x.category, RecorderWarning)]
    assert len(rw) == 1 and ENOSPC_TEXT in str(rw[0].message)
    rank_dir = _check_readable(d, 15)
    _check_failed_json(d, rank_dir, 15, 20)
    out = _info(d, capsys)
    assert "status    incomplete" in out and "steps     15 (0..14)" in out and ENOSPC_TEXT in out


# a child process training Tiny with a file size limit (set by the rest of each script)
CHILD_START = f"""
import json, os, resource, signal, sys, warnings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
sys.path[:0] = [{helpers.ROOT!r},
                {helpers.TESTS!r}]
import torch
torch.set_num_threads(1)
from helpers import Tiny
from bbdecoder.recorder import Recorder, at
torch.manual_seed(0)
m = Tiny()
opt = torch.optim.SGD(m.parameters(), lr=0.01)
"""

FSIZE_CHILD = CHILD_START + f"""
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rec = Recorder(m, sys.argv[1], grads_every=1, flush_steps=100, flush_secs=1000, weights_every=at([50]))
    for s in range(120):
        loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); rec.step(loss=loss); opt.step()
        if s in (9, 19):
            rec.flush()
    rec.close()
print(json.dumps({{"trained": s + 1, "warnings": [str(x.message) for x in w]}}))
"""


def test_real_write_failure_file_size_limit(tmp_path, capsys):
    """A real failing write, not an injected one: RLIMIT_FSIZE (no root needed) makes the OS refuse
    to grow any file past 300 kB with EFBIG ("File too large"), which h5py reports buried in a
    multi-line RuntimeError. Shards 0 and 1 (10 steps each, closed by flush(): 59 kB) fit; shard 2
    (100 steps of raw gradients and the weight snapshot of step 50: 387 kB) grows past the limit. Same guarantees as for ENOSPC, the error on
    one line led by the OS error, and the process exits 0: closing an HDF5 file after a failed write
    used to leave a half-closed file that crashed the interpreter at exit (SIGSEGV)."""
    import subprocess
    import sys
    d = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-c", FSIZE_CHILD, d], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["trained"] == 120
    efbig = f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"
    assert len(res["warnings"]) == 1 and efbig in res["warnings"][0] and "\n" not in res["warnings"][0]
    rank_dir = _check_readable(d, 20, grads_every=1)
    rank = json.load(open(os.path.join(rank_dir, fmt.RANK_FILE)))
    assert rank["status"] == "failed" and (rank["shards"], rank["steps_flushed"]) == (2, 20)
    assert rank["errors"][0].startswith(f"RuntimeError: {efbig} (HDF5: ")
    man = json.load(open(os.path.join(d, fmt.MANIFEST)))
    assert man["status"] == "failed" and man["error"] == rank["errors"][0] and man["steps"] == 120
    out = _info(d, capsys)
    assert "status    incomplete" in out and "steps     20 (0..19)" in out and f"error     RuntimeError: {efbig}" in out


CAPTURE_CHILD = CHILD_START + """
from bbdecoder.recorder.attention import capture_attention
from bbdecoder.recorder.features import capture_features
d = sys.argv[1]
loader = [(torch.randn(64, 3, 32, 32), torch.randint(0, 5, (64,))) for _ in range(3)]
probe = torch.randn(64, 3, 32, 32)
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))
out = {"standalone": []}
for what, fn in (("features", lambda: capture_features(m, probe, "conv", os.path.join(d, "f"))),
                 ("attention", lambda: capture_attention(m, loader, os.path.join(d, "a"), "conv", {"c": 1}))):
    try:
        fn()
        out["standalone"].append(what + ": written")
    except OSError as e:
        out["standalone"].append(what + ": OSError " + str(e.errno))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rec = Recorder(m, os.path.join(d, "run"), flush_steps=100, flush_secs=1000)
    s = 0
    for s in range(30):
        loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); rec.step(loss=loss); opt.step()
        if s == 10:
            out["capture"] = rec.capture_attention(loader, "conv", {"c": 1})
        if s == 20:
            out["features"] = rec.capture_features(probe, "conv")
    rec.close()
out["trained"] = s + 1
out["warnings"] = [str(x.message) for x in w]
print(json.dumps(out))
"""


def test_captures_on_a_full_disk_do_not_kill_the_job(tmp_path):
    """A real failing write (RLIMIT_FSIZE, EFBIG) in an attention capture and a feature capture: the
    stand-alone functions raise OSError and leave no file behind; on a Recorder (on_error="warn")
    one RecorderWarning, None returned, recording stops, training goes on; and the process exits 0
    (an h5py file closed plainly after a failed write crashed the interpreter: exit 139, SIGSEGV)."""
    import subprocess
    import sys
    d = tmp_path / "x"
    d.mkdir()
    p = subprocess.run([sys.executable, "-c", CAPTURE_CHILD, str(d)], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["standalone"] == [f"features: OSError {errno.EFBIG}", f"attention: OSError {errno.EFBIG}"]
    assert res["capture"] is None and res["features"] is None and res["trained"] == 30
    assert len(res["warnings"]) == 1 and "recording stopped, training goes on" in res["warnings"][0]
    assert f"[Errno {errno.EFBIG}]" in res["warnings"][0] and "\n" not in res["warnings"][0]
    left = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(fmt.LIVE_SUFFIX)]
    assert left == []
    assert os.listdir(d / "a" / tc.CAPTURES_DIR) == [] and os.listdir(d / "f" / tc.FEATURES_DIR) == []
    rank = json.load(open(d / "run" / fmt.rank_dirname(0) / fmt.RANK_FILE))
    assert rank["status"] == "failed" and f"[Errno {errno.EFBIG}]" in rank["errors"][0]
