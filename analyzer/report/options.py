"""The options of a report's activation sections: their defaults and the check of a user's values."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..activations import check_criterion
from ..values import fraction

#: Report options for the activation sections and their defaults (all written to summary.json).
ACTIVATION_DEFAULTS = {"dead_criterion": "strict", "dead_threshold": 0.0, "max_active_fraction": 0.0,
                       "layer_share": 0.5, "delta": 0.03, "unit_fraction": 0.5, "sim_dim": 1,
                       "sim_method": "cosine", "raster_site": None}


def check_activation_options(dead_criterion: str = "strict", dead_threshold: float = 0.0,
                             max_active_fraction: float = 0.0, layer_share: float = 0.5, delta: float = 0.03,
                             unit_fraction: float = 0.5, sim_dim: int = 1, sim_method: str = "cosine",
                             raster_site: Any = None) -> dict:
    """The activation options of a report, checked and normalised (floats, ints); raises ValueError
    with one clear line for a bad one. ``raster_site`` is checked against a run by the report."""
    try:
        thr, maf = float(dead_threshold), float(max_active_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"dead threshold and max_active_fraction must be numbers, not {dead_threshold!r}, "
                         f"{max_active_fraction!r}") from None
    check_criterion(dead_criterion, thr, maf)
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in [0, 0.5), not {delta!r}") from None
    if not 0.0 <= d < 0.5:
        raise ValueError(f"delta must be in [0, 0.5), not {delta!r}")
    if isinstance(sim_dim, bool) or not isinstance(sim_dim, (int, np.integer)) or sim_dim < 1:
        raise ValueError(f"sim_dim must be an int >= 1 (0 is the sample axis), not {sim_dim!r}")
    if sim_method not in ("cosine", "kl"):
        raise ValueError(f"sim_method must be 'cosine' or 'kl', not {sim_method!r}")
    return {"dead_criterion": dead_criterion, "dead_threshold": thr, "max_active_fraction": maf,
            "layer_share": fraction("layer_share", layer_share), "delta": d,
            "unit_fraction": fraction("unit_fraction", unit_fraction), "sim_dim": int(sim_dim),
            "sim_method": sim_method, "raster_site": None if raster_site is None else str(raster_site)}
