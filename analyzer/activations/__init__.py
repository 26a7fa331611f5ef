"""Activation analyses from recorded per-unit statistics and raw samples (torch-free).

Every threshold is an analysis-time parameter: the trace holds, per step and unit, count, sum,
sum |h|, sum h^2, min, max, count(h > 0) and (bounded activations) a fixed-edge histogram, so a new
threshold is a new call, not a new training run. With ``Recorder(activation_window=N)`` a row holds
those sums over a window of steps (its ``first_step`` to its step): every pooled result is the same.

Definitions (per unit i of a site, over the selected steps):
    active_fraction = sum count(h > 0) / sum count         (at threshold 0; exact)
    strict dead     = max h <= threshold                     (max_active_fraction = 0; exact at any threshold)
                      or active_fraction <= max_active_fraction (threshold 0 only)
    APoZ            = 1 - active_fraction (fraction of values <= 0); dead if APoZ >= threshold
    dormant score   = s_i = E|h_i| / mean_k E|h_k|  (Sokar et al. 2023); dead if s_i <= threshold
A NaN statistic (NaN activations) never makes a unit dead; NaN values count as not active (not > 0).
Smooth kinds (GELU erf/tanh, QuickGELU, SiLU, Mish): strict also needs min h >= -floor (their flat
negative tail), APoZ and saturation are not judged (see :mod:`.deadunits` and :func:`.saturation.saturation`).

Modules: :mod:`.sites` (selecting sites, reading and merging their statistics over ranks, raw
samples, :func:`activation_stats`), :mod:`.health` (attention entropy per head, kurtosis and massive
activations: :func:`attention_entropy`, :func:`site_health`), :mod:`.deadunits` (criteria, :func:`dead_units`,
:func:`dead_counts`, :func:`dead_per_step`, :func:`dead_mask`), :mod:`.saturation`, :mod:`.dimensions`
(:func:`dimension_variance`, :func:`similarity`). Their public names are importable from here.

Tables keep their dtypes when empty (step, epoch, unit, count, nonfinite: int64), so that a site
without recorded steps, or a step range that holds none, gives an empty table of the usual shape.
"""

from .deadunits import (CRITERIA, DEAD_COLUMNS, as_number, check_criterion, dead_counts, dead_mask, dead_per_step,
                        dead_units)
from .dimensions import dimension_variance, similarity
from .health import attention_entropy, excess_kurtosis, site_health
from .saturation import saturation, saturation_layers
from .sites import (PER_UNIT, STAT_COLUMNS, activation_stats, empty_table, iter_merged_site_stats, iter_site_stats,
                    samples, select_site, select_sites, site_blocks, site_table, steps_filter)

__all__ = ["CRITERIA", "DEAD_COLUMNS", "PER_UNIT", "STAT_COLUMNS", "activation_stats", "as_number", "check_criterion",
           "attention_entropy", "excess_kurtosis", "site_health",
           "dead_counts", "dead_mask", "dead_per_step", "dead_units", "dimension_variance", "empty_table",
           "iter_merged_site_stats",
           "iter_site_stats", "samples", "saturation", "saturation_layers", "select_site", "select_sites",
           "similarity", "site_blocks", "site_table", "steps_filter"]
