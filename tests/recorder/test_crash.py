"""SIGKILL a recording training process at random moments; the run must still open.

13 kills, each at a seeded random moment in a chosen phase: during the first shard, while a shard
is being closed, just after its rename (before rank.json is rewritten), during the background
fsync, while the writer queue is full (slow disk), at random times early/mid/late, and with a
time-based flush. One "zygote" process imports torch once and forks a fresh training child per
kill, so 13 kills take seconds rather than 13 torch imports. A child appends ``"step time"`` to a
progress file after each ``rec.step()`` returns and ``"@phase"`` markers from inside the writer, so
the test knows the last step the child had finished and that the kill hit the intended phase.

After each kill: the run opens, says incomplete, every closed shard reads fully (checked with
h5py directly), the steps are the prefix 0..n-1, and at most the documented window was lost
(docs/trace-format.md section 9: ``flush_steps`` steps in the live shard plus ``queue_items`` steps
in the writer queue; with a time-based flush, every step finished more than ``flush_secs`` plus the
writer's 0.5 s batch wait, plus 1 s of slack for a loaded machine, before the kill survived).
"""

import helpers
import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import format as fmt
from helpers import run_cli

ROOT = helpers.ROOT
FLUSH_STEPS, FLUSH_SECS, QUEUE_ITEMS, WEIGHTS_EVERY = 10, 0.3, 4, 3
BATCH_WAIT = 0.5        # BackgroundWriter's batch_wait (docs section 9: "after 0.5 s")
N_PARAMS = 5            # Tiny: conv.weight, conv.bias, body.1.weight, head.weight, head.bias

ZYGOTE = f"""
import json, os, sys, time
import torch, h5py
torch.set_num_threads(1)
sys.path[:0] = [{ROOT!r}, {helpers.TESTS!r}]
from helpers import Tiny
from bbdecoder.recorder import Recorder
from bbdecoder.analyzer.trace import hdf5, series

_m = Tiny()   # warm up in the zygote (the first optimizer step imports a lot), not in every child
_o = torch.optim.SGD(_m.parameters(), lr=0.01)
_m(torch.randn(8, 3, 8, 8)).pow(2).mean().backward()
_o.step()


def child(run_dir, progress, mode, arg, flush_steps, flush_secs, seed):
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    say = lambda s: os.write(fd, (s + "\\n").encode())   # a syscall per line: survives SIGKILL
    calls = [0]

    def nth():
        calls[0] += 1
        return calls[0] == arg

    if mode == "closing":      # stuck inside the close of the arg-th shard (no step table yet)
        real_close = hdf5.HDF5ShardWriter.close
        def close(self):
            if nth():
                say("@closing")
                time.sleep(30)
            return real_close(self)
        hdf5.HDF5ShardWriter.close = close
    elif mode == "rename":     # the arg-th shard renamed, rank.json not yet rewritten
        real_commit = hdf5.HDF5Backend.commit
        def commit(self, live, final):
            real_commit(self, live, final)
            if nth():
                say("@renamed")
                time.sleep(30)
        hdf5.HDF5Backend.commit = commit
    elif mode == "fsync":      # the background fsync of the arg-th published shard is under way
        real_sync = hdf5.HDF5Backend.sync
        def sync(self, path):
            if nth():
                say("@fsync")
                time.sleep(30)
            return real_sync(self, path)
        hdf5.HDF5Backend.sync = sync
    elif mode == "full":       # a slow disk: the writer falls behind and the queue fills up
        real_write = series.ShardSeriesWriter.write
        def write(self, records):
            time.sleep(0.05)
            return real_write(self, records)
        series.ShardSeriesWriter.write = write
    torch.manual_seed(seed)
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    rec = Recorder(m, run_dir, grads_every=1, weights_every={WEIGHTS_EVERY}, flush_steps=flush_steps,
                   flush_secs=flush_secs, queue_items={QUEUE_ITEMS})
    t_end = time.time() + 20
    s = 0
    full_said = False
    while time.time() < t_end:
        loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if mode == "full" and not full_said and rec._writer._items >= {QUEUE_ITEMS}:
            say("@full")       # this step() blocks until the slow writer makes room
            full_said = True
        rec.step(loss=loss)
        opt.step()
        say(f"{{s}} {{time.time():.6f}}")
        s += 1
        if s % 7 == 0:
            rec.epoch_end()


for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                child(**cmd["args"])
            except BaseException as e:
                os.write(2, f"child failed: {{type(e).__name__}}: {{e}}\\n".encode())
                code = 4
            os._exit(code)
        print(json.dumps({{"pid": pid}}), flush=True)
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        print(json.dumps({{"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}}), flush=True)
"""


@pytest.fixture(scope="module")
def zygote():
    p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def call(**cmd):
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)
    yield call
    p.stdin.close()
    p.kill()       # nothing to save; a clean exit of a process with torch loaded takes seconds
    p.wait()


def _progress(path):
    """(finished steps [(step, time)], markers) from a child's progress file."""
    steps, marks = [], []
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return steps, marks
    for line in lines[:-1]:          # the last piece is empty or a line cut by the kill
        if line.startswith("@"):
            marks.append(line)
        else:
            s, t = line.split()
            steps.append((int(s), float(t)))
    return steps, marks


def _wait_for(path, done, timeout=25.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        steps, marks = _progress(path)
        if done(steps, marks):
            return steps, marks
        time.sleep(0.003)
    raise AssertionError(f"child never reached the phase (progress {_progress(path)})")


# (mode, how the kill moment is drawn); 13 kills
CASES = [("early", 0), ("early", 1), ("closing", 0), ("closing", 1), ("rename", 0), ("rename", 1),
         ("fsync", 0), ("fsync", 1), ("full", 0), ("full", 1), ("mid", 0), ("late", 0), ("secs", 0)]


def _read_closed_shards(rank_dir):
    """Independent of the analyzer: open every closed shard with h5py and read every dataset fully.

    Returns:
        list of (shard index, step array (k,), {payload path: (values, steps)}) in index order.
    """
    out = []
    for name in sorted(os.listdir(rank_dir)):
        if not (name.startswith("shard-") and name.endswith(".h5")):
            continue
        with h5py.File(os.path.join(rank_dir, name), "r") as f:
            data = {}
            f.visititems(lambda k, o: data.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
            steps = data["steps/step"]
            assert f.attrs["n_steps"] == len(steps) > 0
            assert f.attrs["step_start"] == steps[0] and f.attrs["step_stop"] == steps[-1] + 1
            for c in fmt.STEP_COLUMNS:
                assert len(data[f"steps/{c}"]) == len(steps)
            payloads = helpers.split_payloads(data)   # packed gradient statistics split per parameter
            out.append((int(name[6:12]), steps, payloads))
    return out


@pytest.mark.parametrize("mode,variant", CASES)
def test_sigkill_at_a_random_moment(tmp_path, zygote, capsys, mode, variant):
    rnd = random.Random(f"{mode}-{variant}")
    d, prog = str(tmp_path / "run"), str(tmp_path / "progress")
    flush_steps, flush_secs = (1000, 0.25) if mode == "secs" else (FLUSH_STEPS, FLUSH_SECS)
    arg = {"closing": rnd.randint(1, 4), "rename": rnd.randint(1, 4), "fsync": rnd.randint(1, 3)}.get(mode, 0)
    pid = zygote(op="run", args=dict(run_dir=d, progress=prog, mode=mode, arg=arg, flush_steps=flush_steps,
                                     flush_secs=flush_secs, seed=variant))["pid"]
    try:
        if mode == "early":        # inside the first shard
            k = rnd.randint(0, FLUSH_STEPS - 2)
            _wait_for(prog, lambda st, mk: len(st) > k)
        elif mode in ("closing", "rename", "fsync", "full"):
            marker = {"closing": "@closing", "rename": "@renamed", "fsync": "@fsync", "full": "@full"}[mode]
            _wait_for(prog, lambda st, mk: marker in mk)
            time.sleep(rnd.uniform(0.0, 0.2))
        else:
            _wait_for(prog, lambda st, mk: len(st) > 0)
            time.sleep(rnd.uniform(*{"mid": (0.2, 0.6), "late": (0.8, 1.5), "secs": (1.0, 2.0)}[mode]))
        t_kill = time.time()
    finally:
        os.kill(pid, signal.SIGKILL)
    assert zygote(op="wait", pid=pid)["signal"] == signal.SIGKILL
    done, marks = _progress(prog)
    assert [s for s, _ in done] == list(range(len(done)))
    last = done[-1][0] if done else -1          # the last step whose rec.step() had returned

    # every closed shard reads fully, shard indices are consecutive, steps a gap-free prefix
    rank_dir = os.path.join(d, fmt.rank_dirname(0))
    shards = _read_closed_shards(rank_dir)
    assert [i for i, _, _ in shards] == list(range(len(shards)))
    all_steps = np.concatenate([s for _, s, _ in shards]) if shards else np.zeros(0, np.int64)
    n = len(all_steps)
    assert all_steps.tolist() == list(range(n))
    for _, steps, payloads in shards:
        # raw gradients and gradient statistics every step, weights every WEIGHTS_EVERY steps
        assert len(payloads) == 3 * N_PARAMS or (len(payloads) == 2 * N_PARAMS
                                                 and not (steps % WEIGHTS_EVERY == 0).any())
        for key, (vals, psteps) in payloads.items():
            want = steps if key.startswith(("grads/", "grad_stats/")) else steps[steps % WEIGHTS_EVERY == 0]
            assert psteps.tolist() == want.tolist() and len(vals) == len(want), key
            assert np.isfinite(vals).all()

    with capsys.disabled():        # shown with pytest -s
        print(f"{mode}-{variant}: killed after step {last}; {n} steps in {len(shards)} closed shard(s); "
              f"lost {last + 1 - n}")
    # at most the documented window lost
    assert n <= last + 2            # the step between rec.step() and the progress line may be written
    if mode == "secs":
        old = [s for s, t in done if t < t_kill - (flush_secs + BATCH_WAIT + 1.0)]
        assert not old or old[-1] < n, (old[-1], n)
    else:
        assert last + 1 - n <= FLUSH_STEPS + QUEUE_ITEMS, (n, last)
    if mode in ("closing", "rename", "fsync", "full"):
        assert marks == [{"closing": "@closing", "rename": "@renamed", "fsync": "@fsync", "full": "@full"}[mode]]

    # rank.json and the live shard as left by the kill
    rank = json.load(open(os.path.join(rank_dir, fmt.RANK_FILE)))
    assert rank["status"] == fmt.STATUS_RECORDING
    assert rank["shards"] <= len(shards) and rank["steps_flushed"] <= n
    live = sorted(x for x in os.listdir(rank_dir) if x.endswith(".part"))
    if mode == "closing":          # the shard being closed is the live one, and rank.json is current
        assert live == [fmt.shard_filename(arg - 1, live=True)] and len(shards) == arg - 1
        assert (rank["shards"], rank["steps_flushed"]) == (len(shards), n)
    if mode == "rename":           # renamed but rank.json not yet rewritten: one shard behind
        assert len(shards) == arg and not live
        assert (rank["shards"], rank["steps_flushed"]) == (arg - 1, n - len(shards[-1][1]))
    assert len(live) <= 1

    # the analyzer agrees with the files
    run = analyzer.open(d)
    assert run.status == "incomplete" and "did not close" in run.status_reason
    if live:
        assert "unfinished shard" in run.status_reason
    assert run.steps["step"].tolist() == list(range(n))
    info = run.info()
    assert info["status"] == "incomplete" and info["steps"] == n and info["shards"] == len(shards)
    if n:
        g = run.grad_stats()
        assert sorted(set(g["step"])) == list(range(n))
        sumsq = {}
        for _, steps, payloads in shards:
            for key, (vals, psteps) in payloads.items():
                if key.startswith("grads/"):
                    for s, v in zip(psteps, vals.astype(np.float64)):
                        sumsq[int(s)] = sumsq.get(int(s), 0.0) + float((v ** 2).sum())
        got = (g["l2"] ** 2).groupby(g["step"]).sum()
        np.testing.assert_allclose(got.loc[list(range(n))].to_numpy(), [sumsq[s] for s in range(n)], rtol=1e-5)
        assert len(run.weight_stats()) == N_PARAMS * len(range(0, n, WEIGHTS_EVERY))

    # and so does the CLI
    code, out, err = run_cli(["info", d], capsys)
    assert code == 0, err
    assert "status    incomplete" in out and f"steps     {n}" in out and f"in {len(shards)} shard(s)" in out
