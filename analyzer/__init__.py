"""BBDecoder analyzer: read a recorded run out of core and explain it. Never imports torch.

    from bbdecoder import analyzer
    run = analyzer.open("runs/exp1")
    run.grad_stats(per="epoch")

Names are resolved lazily: ``import bbdecoder.analyzer.trace`` (what the recorder uses) loads
neither pandas nor the analyses.
"""

from __future__ import annotations

import importlib

from ._compat import tolerate_blocked_torch

tolerate_blocked_torch()

__version__ = "2.0.0.dev0"

_LAZY = {
    "open": ("run", "open"),
    "Run": ("run", "Run"),
    "WeightHistograms": ("weights", "WeightHistograms"),
    "TraceError": ("trace.format", "TraceError"),
    "FORMAT_VERSION": ("trace.format", "FORMAT_VERSION"),
    "compare": ("compare", "compare"),
}
__all__ = ["open", "Run", "WeightHistograms", "TraceError", "FORMAT_VERSION", "compare"]


def __getattr__(name: str):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
