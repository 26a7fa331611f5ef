"""BBDecoder analyzer: read a recorded run out of core and explain it. Never imports torch.

    import analyzer
    run = analyzer.open("runs/exp1")
    run.grad_stats(per="epoch")
"""

from ._compat import tolerate_blocked_torch

tolerate_blocked_torch()

from .format import FORMAT_VERSION, TraceError  # noqa: E402,F401
from .run import Run, WeightHistograms, open  # noqa: E402,F401,A004

__version__ = "2.0.0.dev0"
__all__ = ["open", "Run", "WeightHistograms", "TraceError", "FORMAT_VERSION"]
