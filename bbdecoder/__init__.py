"""BBDecoder: record what happens inside a PyTorch network during training; explain it offline.

The one top-level import name of the package. Two subpackages live under it:

- :mod:`bbdecoder.recorder` (needs torch) attaches to a model and writes a trace;
- :mod:`bbdecoder.analyzer` (never imports torch) reads a trace and explains it.

The common names are resolved lazily, so ``import bbdecoder`` loads neither torch nor pandas::

    from bbdecoder import Recorder          # bbdecoder.recorder.Recorder
    run = bbdecoder.open("runs/exp1")       # bbdecoder.analyzer.open
    from bbdecoder import Master_analyzer   # the 1.x API (bbdecoder.recorder.compat)
"""

from __future__ import annotations

import importlib
import os

__version__ = "2.0.0.dev0"

# In a source checkout the two subpackages sit beside this folder (the repository's top level);
# an installed package has them inside it (setuptools' package-dir mapping), and then this adds nothing.
_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "recorder")) and all(
        os.path.isfile(os.path.join(_root, d, "__init__.py")) for d in ("recorder", "analyzer")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

_LAZY = {
    "Recorder": ("bbdecoder.recorder", "Recorder"),
    "RecorderError": ("bbdecoder.recorder", "RecorderError"),
    "RecorderWarning": ("bbdecoder.recorder", "RecorderWarning"),
    "Master_analyzer": ("bbdecoder.recorder.compat", "Master_analyzer"),
    "open": ("bbdecoder.analyzer", "open"),
    "Run": ("bbdecoder.analyzer", "Run"),
    "TraceError": ("bbdecoder.analyzer.trace.format", "TraceError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'bbdecoder' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
