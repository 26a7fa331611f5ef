"""Figures of a recorded run, Cockpit style: small pure plotting functions over tidy DataFrames, by topic.

- :mod:`.common`: the registry (:data:`PLOTS`, :func:`plot`, :func:`check`), figures in the report's
  style, saving (atomic), labels and axis helpers;
- :mod:`.loss`, :mod:`.gradients`, :mod:`.weights`, :mod:`.activations`, :mod:`.attention`,
  :mod:`.pruning`: the plots of each topic;
- :mod:`.overview`: every layer at once, layer x step heatmaps grouped by block (and activation site x
  step: dead fraction, saturation), laid out so that the page can put a tooltip over every row;
- :mod:`.graphview`: the report's module graph (repeated blocks collapsed) and module cost bars;
- :mod:`.graph` (function graph drawings) and :mod:`.features` (feature evolution grid and GIF).

The names of the first two groups are re-exported here (``plots.grad_flow``, ``plots.new_figure``).
matplotlib and seaborn are imported on the first plot; nothing here imports torch.
"""

from __future__ import annotations

from .activations import (MAX_RASTER_ROWS, activation_distributions, dead_heatmap, dead_raster, saturation_lines,
                          site_lines, site_order, site_palette, variance_similarity)
from .attention import attention_average_maps, attention_over_time, attention_overlays, attention_scores
from .common import (MAX_HEATMAP_COLUMNS, MAX_LEGEND, PLOTS, bin_columns, cell_image, check, close, epoch_spans, figure,
                     fixed_margins, inside_legend, integer_x, layer_label, layer_order, legend_outside, line_legend,
                     mpl, new_figure, no_minor_log_ticks, overlay_epoch_means, palette, plot, positive, save, series_lines,
                     text, theme, value_ticks, warm_up, with_labels)
from .gradients import (grad_flow, grad_norm_series, grad_norms, grad_variance_epoch,
                        grad_variance_step, gradient_flow_table)
from .loss import loss_curve
from .overview import (block_of, common_prefix, dead_fraction_heatmap, grad_heatmap, heatmap_areas, heatmap_figure,
                       heatmap_height, saturation_heatmap, short_names, site_rows, update_ratio_heatmap,
                       weight_l2_heatmap)
from .pruning import pruning_sweep, sweep_figure
from .weights import update_ratio, weight_distribution, weight_magnitude

__all__ = [
    "MAX_RASTER_ROWS", "activation_distributions", "dead_heatmap", "dead_raster", "saturation_lines", "site_lines",
    "site_order", "site_palette", "variance_similarity", "attention_average_maps", "attention_over_time",
    "attention_overlays", "attention_scores", "MAX_HEATMAP_COLUMNS", "MAX_LEGEND", "PLOTS", "bin_columns", "check",
    "close", "epoch_spans", "figure", "fixed_margins", "integer_x", "layer_label", "layer_order", "legend_outside",
    "mpl", "new_figure", "overlay_epoch_means", "plot", "positive", "save", "text", "value_ticks", "with_labels",
    "inside_legend", "line_legend", "no_minor_log_ticks", "series_lines", "theme", "warm_up", "palette", "cell_image",
    "grad_flow", "grad_heatmap", "grad_norm_series", "grad_norms", "grad_variance_epoch", "grad_variance_step",
    "gradient_flow_table", "loss_curve", "block_of", "common_prefix", "heatmap_figure", "heatmap_height",
    "dead_fraction_heatmap", "heatmap_areas", "saturation_heatmap", "site_rows", "short_names", "update_ratio_heatmap", "weight_l2_heatmap", "pruning_sweep", "sweep_figure", "update_ratio", "weight_distribution",
    "weight_magnitude",
]
