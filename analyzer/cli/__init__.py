"""`bbdecoder` command line: a thin click group over the analyzer's Python API.

:mod:`.main` holds the group, the error handling of :func:`main` (the console entry point
``bbdecoder.analyzer.cli:main``), opening a run and the helpers the commands share; each command
(or small family) is one module beside it, registered on the group here, in one place.
Nothing outside this package imports it.
"""

from __future__ import annotations

from . import activations, attention, check, compare, demo, graph, info, prune, report
from .main import cli, main

#: every command of the group, in the order of today's registration (``bbdecoder --help`` sorts them)
COMMANDS = (info.info, info.layers, report.report, activations.dead, activations.saturation, demo.demo,
            prune.prune, attention.attention_iou_cmd, graph.graph_cmd, graph.features_cmd,
            check.check, compare.compare_cmd)
for _command in COMMANDS:
    cli.add_command(_command)

__all__ = ["cli", "main", "COMMANDS"]
