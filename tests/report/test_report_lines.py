"""The report's line and bar figures drawn with plain matplotlib (issue 17, item 3: seaborn's lineplot
and barplot were a third of the figure time): every line holds exactly its group's finite points in x
order, bars equal the gradient flow table, minor log ticks go only where matplotlib would not label
them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bbdecoder.analyzer.report import plots


def _lines(ax):
    return [(np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()]


def test_series_lines_one_line_per_group_in_x_order_without_nonfinite_points():
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"step": np.tile([3, 1, 2, 0], 4), "g": np.repeat(["a", "a", "b", "b"], 4),
                      "p": np.repeat(["w", "bias", "w", "bias"], 4), "y": rng.normal(size=16)})
    d.loc[5, "y"] = np.nan
    d.loc[9, "y"] = np.inf
    fig, ax = plots.new_figure(4, 3)
    ax = ax[0, 0]
    colors = {"a": (1.0, 0.0, 0.0), "b": (0.0, 0.0, 1.0)}
    plots.series_lines(ax, d, "step", "y", "g", colors.__getitem__, style="p", styles=["w", "bias"])
    got = ax.get_lines()
    assert len(got) == 4
    for ln, ((g, p), want) in zip(got, d.groupby(["g", "p"], sort=False)):
        want = want[np.isfinite(want["y"])].sort_values("step")     # independent: pandas filter + sort
        assert np.array_equal(ln.get_xdata(), want["step"].to_numpy(float))
        assert np.array_equal(ln.get_ydata(), want["y"].to_numpy(float))
        assert ln.get_color() == colors[g]
        assert (ln.get_linestyle() == "-") == (p == "w")              # first style solid, the next dashed
    plots.close(fig)


@pytest.mark.parametrize("layers", [3, 20])       # a legend; a colour bar past MAX_LEGEND
def test_weight_lines_draw_every_parameter_of_every_layer(layers):
    steps = [0, 10, 20]
    rows = [(s, i, f"l{i}", p, float(1 + i + 0.1 * s + (p == "bias")))
            for i in range(layers) for p in ("weight", "bias") for s in steps]
    d = pd.DataFrame(rows, columns=["step", "layer_id", "layer", "param", "l2"])
    fig, ax = plots.new_figure(6, 4)
    plots.weight_magnitude(d, ax[0, 0])
    got = sorted((tuple(x), tuple(y)) for x, y in _lines(ax[0, 0]))
    want = sorted((tuple(float(s) for s in steps), tuple(g.sort_values("step")["l2"]))
                  for _, g in d.groupby(["layer_id", "param"]))
    assert got == want
    assert ax[0, 0].get_yscale() == "log"
    plots.close(fig)


def test_grad_flow_bars_equal_the_flow_table():
    d = pd.DataFrame({"step": [0, 1, 0, 1, 0, 1], "layer_id": [2, 2, 0, 0, 1, 1], "layer": list("ccaabb"),
                      "l1": [1.0, 3.0, 0.5, 0.5, 8.0, 2.0], "count": [4, 4, 2, 2, 10, 10],
                      "max_abs": [0.9, 2.0, 0.3, 0.4, 1.5, 0.7]})
    fig, ax = plots.new_figure(6, 4)
    plots.grad_flow(d, ax[0, 0])
    bars = ax[0, 0].patches
    assert len(bars) == 6
    # layer 0, 1, 2 in id order: max |g| = largest element, mean |g| = sum L1 / sum count
    want_max, want_mean = [0.4, 1.5, 2.0], [1.0 / 4, 10.0 / 20, 4.0 / 8]
    assert np.allclose([b.get_height() for b in bars[:3]], want_max)
    assert np.allclose([b.get_height() for b in bars[3:]], want_mean)
    assert [t.get_text() for t in ax[0, 0].get_xticklabels()] == ["0: a", "1: b", "2: c"]
    plots.close(fig)


@pytest.mark.parametrize("lo, hi, minor", [(1.0, 1e4, False), (1.0, 5.0, True), (0.15, 6.0, True), (0.15, 60.0, False)])
def test_minor_log_ticks_only_where_matplotlib_labels_them(lo, hi, minor):
    """Minor ticks go where two powers of ten are in view and labelled; 0.15 to 6 (1.6 decades, only 10^0 in
    view) keeps them, labelled."""
    from matplotlib.ticker import NullLocator
    fig, ax = plots.new_figure(4, 3)
    ax = ax[0, 0]
    ax.plot([0, 1], [lo, hi])
    ax.set_yscale("log")
    plots.no_minor_log_ticks(ax)
    assert isinstance(ax.yaxis.get_minor_locator(), NullLocator) != minor
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert len(labels) >= 2              # a span with fewer than two powers of ten keeps labelled minor ticks
    plots.close(fig)


def test_pruning_sweep_legend_names_every_site():
    d = pd.DataFrame({"threshold": [0.0, 0.5, 1.0] * 3, "sparsity": [0.0, 0.2, 0.5, 0.0, 0.1, 0.3, 0.0, 0.15, 0.4],
                      "site": ["s0"] * 3 + ["s1"] * 3 + ["(all sites)"] * 3})
    fig, ax = plots.new_figure(6, 4)
    plots.pruning_sweep(d, ax[0, 0], order=["s0", "s1"])
    assert [t.get_text() for t in ax[0, 0].get_legend().get_texts()] == ["s0", "s1", "all sites"]
    s0 = ax[0, 0].get_lines()[0]
    assert np.allclose(s0.get_ydata(), [0.0, 0.2, 0.5])
    plots.close(fig)


@pytest.mark.parametrize("steps, ticks", [([7], ["7"]), ([0, 1, 2, 3], ["0", "1", "2", "3"])])
def test_step_axis_has_integer_ticks_even_for_one_step(steps, ticks):
    """One weight snapshot or one sampled step: the x axis shows that step (not -0.045 ... 0.045)."""
    fig, ax = plots.new_figure(4, 3)
    ax = ax[0, 0]
    ax.plot(steps, np.ones(len(steps)), "o")
    plots.integer_x(ax)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    shown = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert shown == ticks
    plots.close(fig)
