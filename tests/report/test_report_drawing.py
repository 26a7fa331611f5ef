"""Drawing the report without seaborn, and the shared queue of drawing processes (issue 17, item 3).

seaborn (and scipy.stats, which it loads) cost about 1 s in every drawing process: the report's own
figures use matplotlib alone, styled with the rcParams that seaborn's theme sets (checked here against
seaborn itself), and its heatmap, box and strip plots are checked against numpy. The queue: every
figure is drawn exactly once, whichever process takes it, and errors come back in queue order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import helpers
from bbdecoder.analyzer.report import plots
from bbdecoder.analyzer.report.figures import Drawing, FigureSpec
from tests.helpers import record_tiny


def _same_rc(got: dict, ref: dict) -> None:
    from matplotlib.colors import to_rgb
    for k, v in ref.items():
        if k.startswith("backend") or k == "image.cmap":   # seaborn's map "rocket" needs seaborn (every figure names its map)
            continue
        if k == "axes.titley":
            assert got[k] == 1.0
        elif k == "axes.prop_cycle":   # hex codes here, floats there: the same colours to 1/255
            np.testing.assert_allclose([to_rgb(c) for c in got[k].by_key()["color"]],
                                       [to_rgb(c) for c in v.by_key()["color"]], atol=0.5 / 255)
        else:
            assert str(got[k]) == str(v), k


@pytest.mark.parametrize("style", ["whitegrid", "white", "ticks"])
def test_theme_equals_seaborns_theme(style):
    import matplotlib as mpl
    import seaborn as sns
    with mpl.rc_context():       # both from the same starting point
        sns.set_theme(style=style, context="notebook", font_scale=0.9)
        ref = dict(mpl.rcParams)
    with mpl.rc_context():
        plots.theme(style)
        got = dict(mpl.rcParams)
    _same_rc(got, ref)


@pytest.mark.parametrize("name,n", [("tab10", 3), ("tab10", 13), ("tab20", 17), ("viridis", 25)])
def test_palette_equals_seaborns(name, n):
    import seaborn as sns
    np.testing.assert_array_equal(np.asarray(plots.palette(name, n)), np.asarray(sns.color_palette(name, n)))


def test_cell_image_puts_row_zero_on_top_and_blanks_nonfinite():
    z = np.array([[0.0, 0.5, np.nan], [1.0, 0.25, 0.75]])
    fig, ax = plots.new_figure(4, 3)
    im = plots.cell_image(ax[0, 0], z, "Reds", 0.0, 1.0, "fraction")
    got = im.get_array()
    np.testing.assert_array_equal(got.mask, ~np.isfinite(z))
    np.testing.assert_array_equal(got.filled(-1), np.where(np.isfinite(z), z, -1))
    assert tuple(im.get_extent()) == (0, 3, 2, 0)          # cell (i, j) covers [j, j+1] x [i, i+1], row 0 on top
    assert im.norm.vmin == 0.0 and im.norm.vmax == 1.0
    plots.close(fig)


def test_box_strip_boxes_are_the_quartiles_and_every_value_is_a_dot():
    rng = np.random.default_rng(1)
    vals = {"a": rng.normal(size=40), "b": rng.uniform(size=7) + 3}
    v = pd.DataFrame({"site_label": np.repeat(list(vals), [len(x) for x in vals.values()]),
                      "x": np.concatenate(list(vals.values()))})
    fig, ax = plots.new_figure(4, 3)
    ax = ax[0, 0]
    from bbdecoder.analyzer.report.plots.activations import box_strip
    box_strip(ax, v, "x", ["b", "missing", "a"], many=False)
    # the medians, box edges (quartiles) and whisker ends against numpy, at rows 0 ("b") and 2 ("a")
    med = {round(float(np.mean(ln.get_ydata()))): ln.get_xdata()[0] for ln in ax.get_lines()
           if len(set(ln.get_xdata())) == 1 and abs(np.ptp(ln.get_ydata()) - 0.6) < 1e-9}
    assert med[0] == pytest.approx(np.median(vals["b"])) and med[2] == pytest.approx(np.median(vals["a"]))
    boxes = [p for p in ax.patches]
    for patch, key in zip(boxes, ("b", "a")):
        xs = patch.get_path().vertices[:, 0]
        assert xs.min() == pytest.approx(np.percentile(vals[key], 25))
        assert xs.max() == pytest.approx(np.percentile(vals[key], 75))
    pts = ax.collections[0].get_offsets()
    assert len(pts) == 47
    rows = np.rint(pts[:, 1]).astype(int)
    assert sorted(np.asarray(pts[rows == 2, 0])) == pytest.approx(sorted(vals["a"]))
    assert np.abs(pts[:, 1] - rows).max() <= 0.2
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "missing", "a"]
    assert ax.get_ylim() == (2.5, -0.5)
    plots.close(fig)


CHILD = r"""
import json, sys
from bbdecoder import analyzer
from bbdecoder.analyzer.report import build_report
build_report(analyzer.open(sys.argv[1]), sys.argv[2], jobs=int(sys.argv[3]))
print(json.dumps({m: m in sys.modules for m in ("seaborn", "scipy.stats", "matplotlib.pyplot")}))
"""


def test_a_report_loads_neither_seaborn_nor_scipy(tmp_path):
    run = tmp_path / "run"
    record_tiny(str(run), epochs=2, steps_per_epoch=4, weights_every=2, activations=True)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=helpers.ROOT, MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, "-c", CHILD, str(run), str(out), "1"], capture_output=True, text=True,
                       env=env, cwd=helpers.ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"seaborn": False, "scipy.stats": False,
                                                             "matplotlib.pyplot": True}
    assert len(json.loads((out / "summary.json").read_text())["figures"]) >= 8


#: the start of the scripts below (run in a fresh process, so that the drawing processes are forked from
#: it): spec(i) queues figure f<i>, which sleeps ``SLEEP`` seconds (slower than a fork: the forked processes
#: get figures to draw), raises for i == ``FAIL`` and logs "<i> <pid>" to out/log
SCRIPT_HEAD = r"""
import json, os, sys, time
from bbdecoder.analyzer.report.figures import Drawing, FigureSpec
from bbdecoder.analyzer.report import plots
out, SLEEP, FAIL = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
os.makedirs(os.path.join(out, "figures"))
def spec(i):
    def draw():
        if i == FAIL:
            raise ValueError("five")
        fig, ax = plots.new_figure(2, 1.5)
        ax[0, 0].plot([0, 1], [i, i + 1])
        time.sleep(SLEEP)
        with open(os.path.join(out, "log"), "a") as f:
            f.write(f"{i} {os.getpid()}\n")
        return fig
    return FigureSpec(f"f{i}", f"f{i}", "", draw, "x")
"""


def run_script(body: str, out, sleep: float = 0.0, fail: int = -1) -> dict:
    """Run SCRIPT_HEAD + ``body`` in a fresh process; its last line of output, as JSON."""
    env = dict(os.environ, PYTHONPATH=helpers.ROOT, MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, "-c", SCRIPT_HEAD + body, str(out), str(sleep), str(fail)],
                       capture_output=True, text=True, env=env, cwd=helpers.ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


QUEUE = r"""
d = Drawing(out, 2)
for i in range(9):           # three "sections" of three figures, a drawing process forked meanwhile
    d.add(spec(i))
    if i % 3 == 2:
        d.meanwhile()
errors = d.finish()
print(json.dumps({"errors": errors, "processes": d.processes, "pid": os.getpid()}))
"""


def test_every_queued_figure_is_drawn_exactly_once_whichever_process_takes_it(tmp_path):
    res = run_script(QUEUE, tmp_path / "o", sleep=0.2, fail=5)
    assert res["errors"] == [None] * 5 + ["ValueError: five"] + [None] * 3     # queue order
    log = [ln.split() for ln in (tmp_path / "o" / "log").read_text().splitlines()]
    assert sorted(int(i) for i, _ in log) == [0, 1, 2, 3, 4, 6, 7, 8]          # each drawn once
    pids = {int(pid) for _, pid in log}
    assert res["pid"] not in pids                # forked processes drew every figure
    assert sorted(os.listdir(tmp_path / "o" / "figures")) == sorted(f"f{i}.png" for i in range(9) if i != 5)
    assert 2 <= res["processes"] <= 3 and len(pids) <= 4


def test_one_process_draws_every_figure_in_order_here(tmp_path):
    (tmp_path / "figures").mkdir()
    order = []

    def spec(i):
        def draw():
            order.append(i)
            fig, ax = plots.new_figure(2, 1.5)
            return fig
        return FigureSpec(f"f{i}", "", "", draw, "x")
    d = Drawing(str(tmp_path), 1)
    for i in range(5):
        d.add(spec(i))
        d.meanwhile()
    assert d.finish() == [None] * 5 and order == list(range(5)) and d.processes == 1


HELD = r"""
d = Drawing(out, 2)
d.hold()
for i in range(8):
    d.add(spec(i))
    d.meanwhile()
before = d.processes
errors = d.finish()
print(json.dumps({"errors": errors, "before": before, "after": d.processes}))
"""


def test_a_held_drawing_forks_nothing_before_the_end(tmp_path):
    """hold() (a report of 100,000 layers): no drawing process beside the sections, every figure
    drawn by the processes forked at the end."""
    res = run_script(HELD, tmp_path / "o")
    assert res["before"] == 1 and res["after"] == 2 and res["errors"] == [None] * 8
    assert sorted(os.listdir(tmp_path / "o" / "figures")) == sorted(f"f{i}.png" for i in range(8))


BACK = r"""
d = Drawing(out, 2)
for i in range(4):
    d.add(spec(i))
d.meanwhile()                # one process that knows figures 0-3
for i in range(4, 8):
    d.add(spec(i))           # queued after it: only a process forked at the end knows them
errors = d.finish()
print(json.dumps({"errors": errors, "processes": d.processes}))
"""


def test_the_process_forked_at_the_end_takes_the_figures_only_it_knows_from_the_back(tmp_path):
    """A process forked by meanwhile() knows the figures queued before it; finish() forks one that
    knows them all and takes them from the end of the queue, so that the figures queued last are
    drawn beside the earlier process's, not after it ended."""
    res = run_script(BACK, tmp_path / "o", sleep=0.3)
    assert res["errors"] == [None] * 8 and res["processes"] == 2
    by_pid: dict[int, list[int]] = {}
    for ln in (tmp_path / "o" / "log").read_text().splitlines():
        i, pid = map(int, ln.split())
        by_pid.setdefault(pid, []).append(i)
    assert sorted(i for v in by_pid.values() for i in v) == list(range(8))   # each drawn once
    assert len(by_pid) == 2
    first, last = sorted(by_pid.values(), key=lambda v: v[0])
    assert first == sorted(first) and max(first) <= 3                      # from the front, what it knows
    assert last[0] == 7 and last == sorted(last, reverse=True)             # from the back
