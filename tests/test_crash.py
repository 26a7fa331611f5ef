"""SIGKILL a recording training process at random moments; the run must still open."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import analyzer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUSH_STEPS, QUEUE_ITEMS = 10, 4

CHILD = f"""
import sys, torch
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
from helpers import Tiny
from recorder import Recorder
torch.manual_seed(0)
m = Tiny()
opt = torch.optim.SGD(m.parameters(), lr=0.01)
rec = Recorder(m, sys.argv[1], weights_every=3, flush_steps={FLUSH_STEPS}, flush_secs=0.3,
               queue_items={QUEUE_ITEMS})
s = 0
while True:
    loss = m(torch.randn(8, 3, 8, 8)).pow(2).mean()
    opt.zero_grad(); loss.backward(); rec.step(loss=loss); opt.step()
    print(s, flush=True)
    s += 1
    if s % 7 == 0:
        rec.epoch_end()
"""


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment(tmp_path, seed):
    rnd = random.Random(seed)
    d = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", CHILD, d], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    first = p.stdout.readline()
    assert first.strip() == "0", first
    time.sleep(rnd.uniform(0.05, 1.5))
    os.kill(p.pid, signal.SIGKILL)
    last = int(first)
    for line in p.stdout:  # what the child printed before it died
        last = int(line)
    p.wait()
    run = analyzer.open(d)
    assert run.status == "incomplete"
    assert "did not close" in run.status_reason
    st = run.steps
    n = len(st)
    # every step up to the last flush, contiguous from 0; at most the documented window lost
    assert list(st["step"]) == list(range(n))
    assert n >= last + 1 - (FLUSH_STEPS + QUEUE_ITEMS + 1), (n, last)
    g = run.grad_stats()
    assert sorted(set(g["step"])) == list(range(n))
    assert len(run.weight_stats()) == 5 * len(range(0, n, 3))  # Tiny has 5 parameters
    info = run.info()
    assert info["status"] == "incomplete" and info["steps"] == n
