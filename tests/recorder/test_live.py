"""Reading a run while it is being written: `bbdecoder info` and `bbdecoder report` on a live run.

A child process trains with a Recorder (shards of 5 steps, no time-based flush) and takes commands
on stdin. While it trains freely, info and report must succeed and show a step count between the
closed steps counted just before and just after the call. While it is paused with a live shard
holding unflushed steps, they must show exactly the steps of the closed shards (read with h5py
directly), say the run is incomplete, and ignore the live ``.part`` shard. After the child closes
the recorder, the same run reads as complete with every step.
"""

import helpers
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import format as fmt
from helpers import run_cli

ROOT = helpers.ROOT
FLUSH_STEPS, WEIGHTS_EVERY = 5, 3

CHILD = f"""
import sys, threading, time, torch
torch.set_num_threads(1)
sys.path[:0] = [{ROOT!r}, {helpers.TESTS!r}]
from helpers import Tiny
from bbdecoder.recorder import Recorder
cmds, cv = [], threading.Condition()

def reader():
    for line in sys.stdin:
        with cv:
            cmds.append(line.split())
            cv.notify_all()
threading.Thread(target=reader, daemon=True).start()
torch.manual_seed(0)
m = Tiny()
opt = torch.optim.SGD(m.parameters(), lr=0.01)
rec = Recorder(m, sys.argv[1], weights_every={WEIGHTS_EVERY}, flush_steps={FLUSH_STEPS}, flush_secs=1000)
s = 0
while True:
    loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
    opt.zero_grad(); loss.backward(); rec.step(loss=loss); opt.step()
    s += 1
    if s == 1:
        print("ready", flush=True)
    time.sleep(0.03)                 # ~30 steps/s: the run grows while it is read, but not too fast
    with cv:
        cmd = cmds[0] if cmds else None
    if cmd is None:
        continue
    if cmd[0] == "pause" and s % {FLUSH_STEPS} == int(cmd[1]):   # pause with that many steps in the live shard
        with cv:
            cmds.pop(0)
        print("paused", s, flush=True)
        with cv:
            cv.wait_for(lambda: cmds)
            cmds.pop(0)                                         # "go"
    elif cmd[0] == "stop":
        rec.close()
        print("closed", s, flush=True)
        break
"""


def _closed(rank_dir):
    """Steps and losses of the closed shards, read with h5py directly (in shard order)."""
    steps, loss = [np.zeros(0, np.int64)], [np.zeros(0)]
    for name in sorted(os.listdir(rank_dir)):
        if fmt.parse_shard_filename(name) is not None:
            with h5py.File(os.path.join(rank_dir, name), "r") as f:
                steps.append(f["steps/step"][()])
                loss.append(f["steps/loss"][()])
    return np.concatenate(steps), np.concatenate(loss)


def _wait(pred, what, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_info_and_report_on_a_run_being_written(tmp_path, capsys):
    d = str(tmp_path / "run")
    rank_dir = os.path.join(d, fmt.rank_dirname(0))
    p = subprocess.Popen([sys.executable, "-c", CHILD, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def send(line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return p.stdout.readline().split()

    try:
        assert p.stdout.readline().strip() == "ready"
        _wait(lambda: len(_closed(rank_dir)[0]) >= 3 * FLUSH_STEPS, "three closed shards")

        # 1. training goes on during the calls: between what was closed before and after
        before = len(_closed(rank_dir)[0])
        code, out, err = run_cli(["info", d, "--json"], capsys)
        after = len(_closed(rank_dir)[0])
        assert code == 0, err
        info = json.loads(out)
        assert info["status"] == "incomplete" and "did not close" in info["status_reason"]
        assert before <= info["steps"] <= after and info["steps"] % FLUSH_STEPS == 0
        assert (info["first_step"], info["last_step"]) == (0, info["steps"] - 1)
        before = len(_closed(rank_dir)[0])
        code, out, err = run_cli(["report", d, "--out", str(tmp_path / "rep-live"), "--layers", "head"], capsys)
        after = len(_closed(rank_dir)[0])
        assert code == 0, err
        s = json.load(open(tmp_path / "rep-live" / "summary.json"))
        assert s["run"]["status"] == "incomplete" and before <= s["steps"] <= after
        assert s["grad_steps"] == s["steps"] and (s["first_step"], s["last_step"]) == (0, s["steps"] - 1)

        # 2. paused with 3 steps in the live shard: exactly the closed shards, live shard ignored
        reply = send("pause 3")
        assert reply[0] == "paused"
        done = int(reply[1])
        k = done - 3
        _wait(lambda: json.load(open(os.path.join(rank_dir, fmt.RANK_FILE)))["steps_flushed"] == k,
              "the writer to drain")
        # the writer thread opens the next shard when it takes that shard's first step, which may
        # come after the previous shard's close was noted in rank.json
        live_name = fmt.shard_filename(k // FLUSH_STEPS, live=True)
        _wait(lambda: os.path.exists(os.path.join(rank_dir, live_name)), "the live shard")
        steps, loss = _closed(rank_dir)
        assert steps.tolist() == list(range(k))
        live = [n for n in os.listdir(rank_dir) if n.endswith(fmt.LIVE_SUFFIX)]
        assert live == [live_name]

        code, out, err = run_cli(["info", d], capsys)
        assert code == 0, err
        assert "status    incomplete" in out and "unfinished shard" in out
        assert f"steps     {k} (0..{k - 1})" in out and f"in {k // FLUSH_STEPS} shard(s)" in out
        assert f"grads     {k} step(s)" in out
        assert f"weights   {len(range(0, k, WEIGHTS_EVERY))} snapshot(s)" in out
        out_dir = tmp_path / "rep-paused"
        code, out, err = run_cli(["report", d, "--out", str(out_dir)], capsys)
        assert code == 0, err
        s = json.load(open(out_dir / "summary.json"))
        assert s["run"]["status"] == "incomplete" and "unfinished shard" in s["run"]["status_reason"]
        assert (s["steps"], s["grad_steps"], s["weight_snapshots"]) == (k, k, len(range(0, k, WEIGHTS_EVERY)))
        tab = pd.read_csv(out_dir / "tables" / "steps.csv")
        assert tab["step"].tolist() == list(range(k))
        np.testing.assert_allclose(tab["loss"].to_numpy(), loss, rtol=1e-12)
        assert s["loss"]["last"] == pytest.approx(loss[-1], rel=1e-12)
        assert (out_dir / "index.html").stat().st_size > 0

        # 3. let training finish: the same run is now complete with every step
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(0.2)
        reply = send("stop")
        assert reply[0] == "closed"
        total = int(reply[1])
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert total > done
    run = analyzer.open(d)
    assert run.status == "complete" and run.steps["step"].tolist() == list(range(total))
    steps, loss = _closed(rank_dir)
    np.testing.assert_array_equal(run.steps["loss"].to_numpy(), loss)
    code, out, err = run_cli(["info", d], capsys)
    assert code == 0 and "status    complete" in out and f"steps     {total} (0..{total - 1})" in out
