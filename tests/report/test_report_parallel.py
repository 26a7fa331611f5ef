"""The report's figures drawn by forked processes (``jobs``) against drawing them in one process.

The report runs in a child process here: pytest's own process may hold other threads (writers of
earlier tests), and then the report rightly refuses to fork and draws in-process.
"""

import helpers
import json
import os
import subprocess
import sys

import pytest

from bbdecoder.analyzer.report import build_report, default_jobs, fork_is_safe
from tests.helpers import record_tiny

ROOT = helpers.ROOT

CHILD = r"""
import json, sys, warnings
from bbdecoder import analyzer
from bbdecoder.analyzer.report import plots
from bbdecoder.analyzer.report import build_report
run_dir, out, jobs, broken = sys.argv[1], sys.argv[2], int(sys.argv[3]), {"0": False, "1": True}.get(sys.argv[4], sys.argv[4])
BESIDE = []
if broken in ("beside", "beside-dies"):   # the activation sections beside the data passes (on any CPU count)
    import os
    from bbdecoder.analyzer.report import beside
    beside.MIN_CPUS = 1
    _start = beside.start
    beside.start = lambda rep: BESIDE.append(_start(rep)) or BESIDE[-1]
    if broken == "beside-dies":   # ... in a process that dies
        beside._child = lambda rep, conn: os._exit(3)
elif broken == "crash":   # a drawing process dies: the report still finishes, without a hang
    import os
    def weight_magnitude(*a, **k):
        os._exit(3)
    weight_magnitude.requires = plots.weight_magnitude.requires
    plots.weight_magnitude = weight_magnitude
elif broken:   # one figure fails to draw: it must be listed as skipped, the rest drawn
    def weight_magnitude(*a, **k):
        raise RuntimeError("broken on purpose")
    weight_magnitude.requires = plots.weight_magnitude.requires
    plots.weight_magnitude = weight_magnitude
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    s = build_report(analyzer.open(run_dir), out, jobs=jobs)
print(json.dumps({"summary": s, "warnings": [str(x.message) for x in w if "could not be drawn" in str(x.message)],
                  "beside": [b is not None for b in BESIDE]}))
"""


def _report(run_dir, out, jobs, broken=False):
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    arg = broken if isinstance(broken, str) else ("1" if broken else "0")
    p = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(out), str(jobs), arg],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("par") / "run"
    record_tiny(str(d), epochs=2, steps_per_epoch=6, weights_every=2, activations=True, activations_every=3)
    return d


@pytest.mark.parametrize("broken", [False, True])
def test_forked_figures_equal_in_process_figures(run_dir, tmp_path, broken):
    one = _report(run_dir, tmp_path / "one", 1, broken)
    two = _report(run_dir, tmp_path / "two", 3, broken)
    s1, s2 = one["summary"], two["summary"]
    # one process draws while the sections compute, up to jobs at the end (this one included; one
    # forked earlier may still finish its last figure)
    assert s1["figure_processes"] == 1 and 2 <= s2["figure_processes"] <= 4
    assert s1["figures"] == s2["figures"] and len(s1["figures"]) >= 12     # same figures, same order
    for f in s1["figures"]:                                                 # byte for byte
        a = (tmp_path / "one" / f).read_bytes()
        assert a == (tmp_path / "two" / f).read_bytes(), f
        assert a[:8] == b"\x89PNG\r\n\x1a\n"
    assert s1["skipped"] == s2["skipped"]
    assert sorted(os.listdir(tmp_path / "two" / "figures")) == sorted(os.path.basename(f) for f in s2["figures"])
    if broken:
        msg = "figure weight_magnitude: could not be drawn (RuntimeError: broken on purpose)"
        assert msg in s1["skipped"] and msg in s2["skipped"]
        assert "figures/weight_magnitude.png" not in s2["figures"]
        assert one["warnings"] == two["warnings"] and len(two["warnings"]) == 1
        assert "broken on purpose" in two["warnings"][0]
    else:
        assert not any("could not be drawn" in x for x in s2["skipped"])
    html1 = (tmp_path / "one" / "index.html").read_text()
    html2 = (tmp_path / "two" / "index.html").read_text()
    strip = lambda h: [ln for ln in h.splitlines() if "written 20" not in ln and "seconds" not in ln]  # noqa: E731
    assert strip(html1) == strip(html2)


def test_jobs_argument_and_fork_guard(run_dir, tmp_path):
    import threading
    with pytest.raises(ValueError, match="jobs"):
        build_report(__import__("analyzer").open(str(run_dir)), str(tmp_path), jobs=0)
    assert 1 <= default_jobs() <= 4
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not fork_is_safe()            # another thread alive: no fork
        s = build_report(__import__("analyzer").open(str(run_dir)), str(tmp_path), jobs=4)
        assert s["figure_processes"] == 1 and len(s["figures"]) >= 12
    finally:
        stop.set()
        t.join()


def test_a_dying_drawing_process_does_not_hang_the_report(run_dir, tmp_path):
    """A drawing process that dies (here: os._exit in one figure) loses that figure only: the report
    still finishes, the other processes draw the rest, and the lost figure is listed as skipped, with
    the reason."""
    res = _report(run_dir, tmp_path / "crash", 2, "crash")
    s = res["summary"]
    assert 2 <= s["figure_processes"] <= 3
    failed = [x for x in s["skipped"] if "could not be drawn" in x]
    assert failed == ["figure weight_magnitude: could not be drawn (its drawing process ended without drawing it)"]
    assert len(s["figures"]) >= 12 and "figures/weight_magnitude.png" not in s["figures"]
    for f in s["figures"]:
        assert (tmp_path / "crash" / f).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "crash" / "index.html").is_file()


def test_activation_sections_beside_the_data_passes_read_as_in_line(run_dir, tmp_path):
    """The activation, attention and module sections run in a process forked before the gradient pass
    (jobs > 1): their tables, figures and summary parts land where they land in one process; when that
    process dies, they run in line and the report is the same."""
    one = _report(run_dir, tmp_path / "one", 1)["summary"]
    for mode in ("beside", "beside-dies"):
        res = _report(run_dir, tmp_path / mode, 3, mode)
        assert res["beside"] == [True]           # it did run beside (and, the second time, died)
        s = res["summary"]
        assert s["figures"] == one["figures"] and s["tables"] == one["tables"]
        assert s["skipped"] == one["skipped"] and s["not_recorded"] == one["not_recorded"]
        assert s["activations"] == one["activations"] and len(s["activations"]) > 0
        assert any(f.startswith("figures/act_") for f in s["figures"])
        for f in s["figures"]:
            assert (tmp_path / mode / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
