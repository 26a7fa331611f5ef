"""BBDecoder analyzer: read a recorded run out of core and explain it. Never imports torch.

    import analyzer
    run = analyzer.open("runs/exp1")
    run.grad_stats(per="epoch")
"""

from .format import FORMAT_VERSION, TraceError  # noqa: F401
from .run import Run, WeightHistograms, open  # noqa: F401,A004

__version__ = "2.0.0.dev0"
__all__ = ["open", "Run", "WeightHistograms", "TraceError", "FORMAT_VERSION"]
