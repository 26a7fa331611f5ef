"""Compatibility shims (torch-free)."""

from __future__ import annotations

import sys


def tolerate_blocked_torch() -> None:
    """Let scipy (used by seaborn) run where torch is blocked with ``sys.modules['torch'] = None``.

    That is how the analyzer's no-torch guarantee is enforced (see DESIGN.md). scipy's array-API
    helper looks torch up in ``sys.modules`` and, finding None instead of a module or nothing,
    raises AttributeError. Where torch is simply not installed nothing needs doing, and nothing is
    done unless torch is blocked this way. The shim never imports torch and never unblocks it.
    """
    if "torch" not in sys.modules or sys.modules["torch"] is not None:
        return
    try:
        from scipy._lib.array_api_compat.common import _helpers as h
    except Exception:  # a scipy without that module: nothing to mend
        return
    orig = getattr(h, "_issubclass_fast", None)
    if orig is None or getattr(orig, "_bbdecoder_shim", False):
        return

    def _issubclass_fast(cls, modname, clsname):
        if sys.modules.get(modname, False) is None:  # blocked module: not an instance of it
            return False
        return orig(cls, modname, clsname)

    _issubclass_fast._bbdecoder_shim = True  # type: ignore[attr-defined]
    h._issubclass_fast = _issubclass_fast
