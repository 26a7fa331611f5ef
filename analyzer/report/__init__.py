"""The HTML report of a run: figures, CSV tables and summary.json, laid out from the Run API.

    from bbdecoder.analyzer.report import build_report
    summary = build_report(analyzer.open("runs/exp1"), "report/")

Whatever the trace does not hold (no gradients, no weight snapshots, no loss) is skipped with a
reason, listed in the report and in summary.json ("skipped"). The activation sections (dead units,
saturation, distributions, variance/similarity, pruning sweep) appear when the trace has activation
sites; a trace recorded without them lists those sections under "not_recorded". Their thresholds
are keyword arguments of :func:`build_report` (CLI options of ``bbdecoder report``), all written to
summary.json's "parameters". Files are written under ``out_dir`` only, each to a temporary name and
then renamed over any earlier version; nothing is ever deleted. Nothing here imports torch;
matplotlib and seaborn are imported on the first figure.

The package:

- :mod:`.build`: the pipeline (:class:`Report`, :func:`build_report`);
- :mod:`.sections`: one module per section (data -> tables and figure specs), registered in
  :data:`analyzer.report.sections.SECTIONS`;
- :mod:`.figures`: drawing the queued figures in forked processes;
- :mod:`.plots`: the plotting functions by topic; :mod:`.page` and ``template.html``: index.html;
- :mod:`.data` and :mod:`.options`: the report's own tables and option checks;
- :mod:`.graph_files`: the files of ``bbdecoder graph``.
"""

from __future__ import annotations

from .build import FIG_DIR, TAB_DIR, Report, build_report
from .data import (DEAD_LAYER_COLUMNS, SWEEP_COLUMNS, dead_layer_table, dead_sweep, first_rank,
                   grad_variance_epoch_table, layer_summary, layer_update_ratio, layer_weight_l2, sweep_grid)
from .figures import DPI, FigureSpec, default_jobs, fork_is_safe
from .options import ACTIVATION_DEFAULTS, check_activation_options
from .sections.nonfinite import nonfinite_findings, nonfinite_html

__all__ = ["build_report", "layer_summary", "layer_update_ratio", "layer_weight_l2",
           "grad_variance_epoch_table", "first_rank", "check_activation_options", "dead_layer_table",
           "dead_sweep", "sweep_grid", "ACTIVATION_DEFAULTS", "nonfinite_findings", "nonfinite_html",
           "default_jobs", "fork_is_safe", "Report", "FigureSpec", "FIG_DIR", "TAB_DIR", "DPI",
           "DEAD_LAYER_COLUMNS", "SWEEP_COLUMNS"]
