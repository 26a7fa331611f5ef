"""The base class of the health rules (pytorch-grad-cam style: the base owns the pipeline, each rule
is a tiny subclass) and the finding rows they produce.

A rule declares the statistics tables it reads (``needs``, see :mod:`.data`), its thresholds with
their defaults and the source of each default (``thresholds``), and its severity; the base validates
user settings, skips the rule with a reason when the trace lacks its data, and turns what the
rule's :meth:`Rule.check` returns into rows of :data:`FINDING_COLUMNS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..trace import format as fmt

#: the columns of a findings table, in order
FINDING_COLUMNS = ["rule", "severity", "layer", "param", "first_step", "last_step", "n_steps", "value",
                   "threshold", "message"]
#: severities, most severe first; "skipped" rows say why a rule could not be evaluated
SEVERITIES = ("error", "warning", "info")
SKIPPED = "skipped"
#: settings every rule has besides its thresholds
COMMON_KEYS = ("severity", "enabled")


@dataclass(frozen=True)
class Threshold:
    """One setting of a rule.

    Attributes:
        default: the default value (float, int or str).
        source: where the default comes from (a published system, paper or this project's choice).
        help: what it means, with units.
        low, high: the accepted closed range for numbers (None: unbounded); ``choices`` for strings.
    """

    default: Any
    source: str
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def check(self, rule: str, key: str, value: Any) -> Any:
        """``value`` converted to the default's type; ValueError naming ``rule.key`` when unusable."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{rule}.{key} must be one of {', '.join(map(str, self.choices))}, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{rule}.{key} must be a number, not {value!r}")
        if isinstance(self.default, int) and not isinstance(self.default, bool):
            if float(value) != int(value):
                raise ValueError(f"{rule}.{key} must be an integer, not {value!r}")
            value = int(value)
        else:
            value = float(value)
        if math.isnan(value) or (self.low is not None and value < self.low) or \
                (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{rule}.{key} must be in [{lo}, {hi}], not {value!r}")
        return value


class Rule:
    """A health rule. Subclasses set the class attributes and implement :meth:`check`.

    Attributes:
        name: the rule's name (settings tables, ``--set name.key=value``).
        severity: default severity of its findings ("error", "warning" or "info").
        needs: the tables of :class:`analyzer.findings.data.Tables` it reads: "grads", "weights",
            "acts", "loss".
        thresholds: key -> :class:`Threshold`.
        what: one line on what the rule detects.
        worse: "higher" or "lower": which way a finding's ``value`` is worse (None: away from its
            threshold), to pick the worst of a group (:mod:`.groups`).
    """

    name: ClassVar[str] = ""
    severity: ClassVar[str] = "warning"
    needs: ClassVar[tuple[str, ...]] = ()
    thresholds: ClassVar[dict[str, Threshold]] = {}
    what: ClassVar[str] = ""
    worse: ClassVar[str | None] = None

    # ------------------------------------------------------------------ settings
    @classmethod
    def keys(cls) -> list[str]:
        """Every setting the rule accepts."""
        return list(cls.thresholds) + list(COMMON_KEYS)

    @classmethod
    def settings(cls, given: dict | None = None) -> dict:
        """The defaults updated with ``given`` (validated); ValueError names unknown keys and the known."""
        p = {k: t.default for k, t in cls.thresholds.items()}
        p["severity"], p["enabled"] = cls.severity, True
        for k, v in (given or {}).items():
            if k not in p:
                raise ValueError(f"unknown setting {cls.name}.{k} (known: {', '.join(cls.keys())})")
            if k == "severity":
                p[k] = Threshold(cls.severity, "", "", choices=SEVERITIES).check(cls.name, k, v)
            elif k == "enabled":
                if not isinstance(v, bool):
                    raise ValueError(f"{cls.name}.enabled must be true or false, not {v!r}")
                p[k] = v
            else:
                p[k] = cls.thresholds[k].check(cls.name, k, v)
        return p

    # ------------------------------------------------------------------ the pipeline
    def missing(self, tables) -> str | None:
        """Why the trace lacks what the rule needs (None: it has it)."""
        for need in self.needs:
            why = NEED_CHECKS[need](tables)
            if why:
                return why
        return None

    def evaluate(self, tables, p: dict) -> list[dict]:
        """Finding rows (dicts of :data:`FINDING_COLUMNS`), or one "skipped" row with the reason."""
        why = self.missing(tables)
        if why is None:
            why = self.unusable(tables, p)
        if why:
            return [{"rule": self.name, "severity": SKIPPED, "layer": None, "param": None, "first_step": None,
                     "last_step": None, "n_steps": 0, "value": math.nan, "threshold": math.nan, "message": why}]
        # a finding may carry its own severity (a band of a rule reported at another level)
        return [dict(f, rule=self.name, severity=f.get("severity") or p["severity"]) for f in self.check(tables, p)]

    def unusable(self, tables, p: dict) -> str | None:
        """A rule-specific reason to skip once the tables exist (e.g. too few steps); None: go on."""
        return None

    def check(self, tables, p: dict) -> list[dict]:
        """The rule itself: finding dicts made with :func:`finding`."""
        raise NotImplementedError


def finding(layer: Any, param: Any, steps, value: float, threshold: float, message: str) -> dict:
    """One finding: ``steps`` the steps at which it holds (first, last and count are taken from them)."""
    steps = sorted(int(s) for s in steps)
    return {"layer": None if layer is None else str(layer), "param": None if param is None else str(param),
            "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
            "n_steps": len(steps), "value": float(value), "threshold": float(threshold), "message": message}


def _no_grads(t) -> str | None:
    if not t.has(fmt.KIND_GRAD_STATS):
        return "the trace has no gradient statistics (Recorder(grad_stats_every=...) was off)"
    return None if len(t.grads) else "no gradient statistics rows in the trace"


def _no_weights(t) -> str | None:
    if not t.has(fmt.KIND_WEIGHTS):
        return "the trace has no weight snapshots (Recorder(weights_every=...) was off)"
    w = t.weights
    return None if len(w) and w["gap"].notna().any() else "fewer than two weight snapshots of any parameter"


def _no_acts(t) -> str | None:
    if not t.has(fmt.KIND_ACT_STATS):
        return "the trace has no activation statistics (Recorder(activations=...) was off)"
    return None if len(t.acts) else "no activation statistics rows in the trace"


def _no_loss(t) -> str | None:
    lo = t.loss
    return None if len(lo) and lo["loss"].notna().any() else "the trace has no loss (rec.step(loss=...))"


NEED_CHECKS = {"grads": _no_grads, "weights": _no_weights, "acts": _no_acts, "loss": _no_loss}
