"""Findings grouped for a person to read: one entry per (rule, severity, message shape) instead of one
line per layer (a 12-block GPT-2 under AdamW drew 28 update-ratio lines that differ only in the layer
name and the number). The findings table itself keeps every row; this is a view of it.

The *shape* of a message is the message with the finding's own layer (and ``layer.param``), any other
quoted name and every number replaced by placeholders, so "layer 'h.0.mlp.c_fc': median update ratio
per step 0.038 is ..." and "layer 'h.1.attn.c_attn': ... 0.054 is ..." share one shape, while a rule's
two sides ("too small", "too large") or two kinds of a rule ("gradient NaN/Inf ...", "activation
NaN/Inf ...") stay apart.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from .base import SEVERITIES

#: the columns of :func:`group_findings`, in order
GROUP_COLUMNS = ["rule", "severity", "shape", "n", "where", "layers", "values", "worst_value", "worst_where",
                 "threshold", "first_step", "last_step", "message"]

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?|\b(?:nan|inf|NaN|Inf)\b")


def where(layer, param) -> str:
    """The place a finding names: ``layer.param``, ``layer``, ``param`` (the loss) or "(model)"."""
    parts = [str(x) for x in (layer, param) if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return ".".join(parts) or "(model)"


def message_shape(message: str, layer=None, param=None) -> str:
    """``message`` with its finding's own place, quoted names and numbers replaced by "…" and "#"."""
    s = str(message)
    names = []
    if layer is not None:
        if param is not None:
            names.append(f"{layer}.{param}")
        names += [repr(str(layer)), str(layer)]
    for n in sorted(set(names), key=len, reverse=True):
        if n and not _NUMBER.fullmatch(n):       # a numeric name ("2") becomes "#" as any number
            s = re.sub(r"(?<![\w.])" + re.escape(n) + r"(?!\w|\.\w)", "…", s)
    s = _QUOTED.sub("'…'", s)
    return _NUMBER.sub("#", s)


def _none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA else x


def group_findings(df: pd.DataFrame, worse: dict | None = None) -> pd.DataFrame:
    """One row per (rule, severity, message shape) of the fired findings of ``df`` (skipped rows left out).

    Args:
        df: a findings table (:data:`analyzer.findings.FINDING_COLUMNS`), in its order (severity first).
        worse: rule -> "higher" or "lower": which way its ``value`` is worse; a rule not named is judged
            by its group: "lower" when the median value is below the threshold, else "higher".

    Returns:
        DataFrame with :data:`GROUP_COLUMNS`, in the order of each group's first row in ``df``: ``n`` rows;
        ``where`` their places (``layer.param``, ``layer`` or ``param``), ``layers`` their layer (or site)
        names and ``values`` their values, each list worst first; ``worst_value``, ``worst_where`` and the
        ``threshold`` and ``message`` of the worst row; ``first_step``/``last_step`` the smallest first and
        largest last step of the rows (None when none has steps).
    """
    worse = worse or {}
    fired = df[df["severity"].isin(SEVERITIES)]
    rows: dict[tuple, list] = {}
    for r in fired.itertuples(index=False):
        layer, param = _none(r.layer), _none(r.param)
        key = (r.rule, r.severity, message_shape(r.message, layer, param))
        rows.setdefault(key, []).append((layer, param, r))
    out = []
    for (rule, sev, shape), items in rows.items():
        vals = [float(r.value) for _, _, r in items]
        finite = [v for v in vals if math.isfinite(v)]
        thr = float(items[0][2].threshold)
        way = worse.get(rule) or ("lower" if finite and sorted(finite)[len(finite) // 2] < thr else "higher")
        sign = -1.0 if way == "higher" else 1.0

        def badness(i, _s=sign):   # worst first; NaN values last; ties keep the table's order
            v = vals[i]
            return (0 if math.isfinite(v) or math.isinf(v) else 1, _s * v if not math.isnan(v) else 0.0, i)
        order = sorted(range(len(items)), key=badness)
        w = items[order[0]][2]
        firsts = [int(r.first_step) for _, _, r in items if _none(r.first_step) is not None]
        lasts = [int(r.last_step) for _, _, r in items if _none(r.last_step) is not None]
        out.append({"rule": rule, "severity": sev, "shape": shape, "n": len(items),
                    "where": [where(items[i][0], items[i][1]) for i in order],
                    "layers": [None if items[i][0] is None else str(items[i][0]) for i in order],
                    "values": [vals[i] for i in order], "worst_value": vals[order[0]],
                    "worst_where": where(items[order[0]][0], items[order[0]][1]), "threshold": float(w.threshold),
                    "first_step": min(firsts) if firsts else None, "last_step": max(lasts) if lasts else None,
                    "message": str(w.message)})
    return pd.DataFrame(out, columns=GROUP_COLUMNS)
