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
    t = type(x)        # the common exact types first (a summary of 100,000 layers holds millions of values)
    if t is str or t is int or t is bool or x is None:
        return x
    if t is float:
        return x if math.isfinite(x) else None
    if t is dict:
        return {str(k): json_safe(v) for k, v in x.items()}
    if t is list:
        return [json_safe(v) for v in x]
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


#: characters a terminal acts on rather than shows: C0 controls but tab and newline, DEL, C1
#: controls, and the Unicode bidirectional overrides and isolates ("Trojan source")
_CONTROL = {c for c in range(0x20) if c not in (0x09, 0x0A)} | {0x7F} | set(range(0x80, 0xA0)) \
    | set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROL}


def terminal_safe(text: Any) -> str:
    """``str(text)`` with every character a terminal would act on written as an escape (``\\x1b``,
    ``\\u202e``): names from a trace cannot move the cursor, retitle or clear the screen. Tabs and
    newlines are kept."""
    return str(text).translate(_ESCAPES)


#: first characters that make a spreadsheet read a cell as a formula (OWASP CSV injection)
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(v: Any) -> Any:
    """A string cell that a spreadsheet would run as a formula gets a leading ``'`` (OWASP's rule);
    anything else is returned as it is."""
    if isinstance(v, str) and v.startswith(CSV_FORMULA_START):
        return "'" + v
    return v


def csv_safe(df):
    """A copy of the data frame ``df`` whose text cells cannot run as spreadsheet formulas
    (:func:`csv_safe_cell` on every cell of the text and object columns; numbers untouched)."""
    from pandas.api.types import is_object_dtype, is_string_dtype
    cols = [c for c in df.columns if is_object_dtype(df[c]) or is_string_dtype(df[c])]
    if not cols:
        return df
    out = df.copy()
    for c in cols:
        out[c] = out[c].map(csv_safe_cell)
    return out
