"""Checking values given by a user and making values safe for JSON. Torch-free, no pandas import
at module level (pandas' missing values are recognised only when pandas is already loaded)."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np


def fraction(name: str, v: Any) -> float:
    """``v`` as a float in [0, 1]; ValueError naming ``name`` otherwise (NaN included)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], not {v!r}") from None
    if not 0.0 <= f <= 1.0:       # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], not {v!r}")
    return f


def json_safe(x: Any) -> Any:
    """JSON-safe copy: NaN/Inf -> None, numpy scalars and arrays -> Python, unknown objects -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return [json_safe(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    if x is None or isinstance(x, (int, str)):
        return x
    pd = sys.modules.get("pandas")
    if pd is not None and (x is pd.NA or x is pd.NaT):
        return None
    return str(x)
