"""Findings: health rules evaluated offline from a trace's statistics, at thresholds chosen afterwards.

Each rule is a small subclass of :class:`.base.Rule` registered in :data:`RULES`; it reads only the
statistics tables of :class:`.data.Tables` (gradient statistics per step, weight norms and update
ratios, per-unit activation statistics, the loss), never raw gradients or activation samples, so
re-evaluating at other thresholds reads nothing again. See docs/findings.md for every rule, its
defaults and their sources.

Rules whose data the trace lacks are listed as rows with severity "skipped" and the reason in
``message``. Rows are sorted by severity (error, warning, info, skipped), then rule, first step, layer.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pandas as pd

from .. import heap
from .activations import DeadUnits, PoorInitialization, SaturatedActivations, TensorVariance
from .base import FINDING_COLUMNS, SEVERITIES, SKIPPED, Rule, Threshold
from .data import Tables
from .gradients import AllZero, ExplodingGradient, GradientSpike, Nonfinite, VanishingGradient
from .groups import GROUP_COLUMNS, group_findings
from .loss import ATTRIBUTION_COLUMNS, LossNotDecreasing, LossSpike, attribute
from .transformer import ActivationKurtosis, AttentionEntropyCollapse, MassiveActivations
from .weights import UnchangedWeights, WeightUpdateRatio

__all__ = ["RULES", "FINDING_COLUMNS", "SEVERITIES", "SKIPPED", "ATTRIBUTION_COLUMNS", "Rule", "Threshold",
           "Tables", "evaluate", "check_settings", "load_settings", "parse_assignments", "attribute",
           "fails", "rule_table", "group", "GROUP_COLUMNS"]

#: every rule, by name, in evaluation order
RULES: dict[str, type[Rule]] = {r.name: r for r in (
    Nonfinite, VanishingGradient, ExplodingGradient, GradientSpike, AllZero, WeightUpdateRatio, UnchangedWeights,
    DeadUnits, SaturatedActivations, PoorInitialization, TensorVariance, LossNotDecreasing, LossSpike,
    AttentionEntropyCollapse, MassiveActivations, ActivationKurtosis)}

_ORDER = {s: i for i, s in enumerate(SEVERITIES + (SKIPPED,))}


def check_settings(settings: dict | None) -> dict[str, dict]:
    """Every rule's full settings: defaults updated with ``settings`` ({rule: {key: value}}).

    Raises:
        ValueError: an unknown rule (the known ones named), an unknown key or an unusable value.
    """
    settings = settings or {}
    if not isinstance(settings, dict):
        raise ValueError(f"rule settings must be a mapping of rule name to settings, not {type(settings).__name__}")
    for name, given in settings.items():
        if name not in RULES:
            raise ValueError(f"unknown rule {name!r} (known: {', '.join(RULES)})")
        if not isinstance(given, dict):
            raise ValueError(f"settings of rule {name!r} must be a table of key = value, not {given!r}")
    return {name: R.settings(settings.get(name)) for name, R in RULES.items()}


def evaluate(tables: Tables, rules: Any = None, settings: dict | None = None) -> pd.DataFrame:
    """Evaluate rules on a run's statistics tables.

    Args:
        tables: the run's :class:`Tables` (kept between calls: the statistics are read once).
        rules: None (every enabled rule), a rule name or a list of names.
        settings: {rule: {key: value}} overriding the defaults (thresholds, "severity", "enabled").

    Returns:
        DataFrame with :data:`FINDING_COLUMNS`, sorted by severity (error, warning, info, skipped).
    """
    full = check_settings(settings)
    names = list(RULES) if rules is None else ([rules] if isinstance(rules, str) else list(rules))
    for n in names:
        if n not in RULES:
            raise ValueError(f"unknown rule {n!r} (known: {', '.join(RULES)})")
    rows = []
    for n in names:
        if rules is None and not full[n]["enabled"]:
            continue
        rows += RULES[n]().evaluate(tables, full[n])
    if isinstance(tables, Tables) and len(tables.run.catalog.layers) >= heap.MANY_LAYERS:
        tables.forget_derived()   # 100,000 layers: the per-layer outliers (~50 MB) are not kept for a re-evaluation
    df = pd.DataFrame(rows, columns=FINDING_COLUMNS)
    for c in ("first_step", "last_step", "n_steps"):
        df[c] = df[c].astype("Int64")
    for c in ("layer", "param"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df["value"] = df["value"].astype("float64")
    df["threshold"] = df["threshold"].astype("float64")
    key = df["severity"].map(_ORDER)
    return df.assign(_k=key).sort_values(["_k", "rule", "first_step", "layer"], kind="stable",
                                         na_position="last").drop(columns="_k").reset_index(drop=True)


def fails(df: pd.DataFrame, fail_on: str) -> bool:
    """Whether ``df`` holds a finding at or above ``fail_on`` ("warning" or "error"; skipped rows never fail)."""
    if fail_on not in ("warning", "error", "info"):
        raise ValueError(f"fail_on must be 'info', 'warning' or 'error', not {fail_on!r}")
    limit = _ORDER[fail_on]
    return bool((df["severity"].map(_ORDER) <= limit).any())


def load_settings(path: str) -> dict:
    """Rule settings from a TOML file: one table per rule, e.g. ``[vanishing_gradient]`` with
    ``relative = 1e-5``, ``severity = "error"`` or ``enabled = false``. Validated (ValueError)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"rules file {path} is not valid TOML: {e}") from None
    check_settings(data)
    return data


def parse_assignments(items, base: dict | None = None) -> dict:
    """``RULE.KEY=VALUE`` strings merged over ``base``; VALUE is read as TOML (numbers, true/false,
    "strings"; a bare word is a string). Validated (ValueError)."""
    out = {k: dict(v) for k, v in (base or {}).items()}
    for it in items or ():
        name, eq, value = str(it).partition("=")
        rule, dot, key = name.strip().partition(".")
        if not eq or not dot or not rule or not key:
            raise ValueError(f"a setting is RULE.KEY=VALUE, not {it!r}")
        try:
            v = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            v = value.strip()
        out.setdefault(rule, {})[key] = v
    check_settings(out)
    return out


def rule_table() -> pd.DataFrame:
    """Every rule's settings with defaults and sources: rule, severity, key, default, source, help."""
    rows = []
    for name, R in RULES.items():
        for k, t in R.thresholds.items():
            rows.append({"rule": name, "severity": R.severity, "key": k, "default": t.default,
                         "source": t.source, "help": t.help})
    return pd.DataFrame(rows, columns=["rule", "severity", "key", "default", "source", "help"])


def group(df: pd.DataFrame) -> pd.DataFrame:
    """The fired findings of ``df`` grouped per (rule, severity, message shape), worst first within each
    group (:func:`.groups.group_findings`, each rule's :attr:`Rule.worse`); ``df`` keeps every row."""
    return group_findings(df, {n: R.worse for n, R in RULES.items() if R.worse})
