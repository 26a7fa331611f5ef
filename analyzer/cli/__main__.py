"""``python -m bbdecoder.analyzer.cli``: the same as the ``bbdecoder`` console script."""

from bbdecoder.analyzer.cli import main   # the package's names, so the exception classes match

main()
