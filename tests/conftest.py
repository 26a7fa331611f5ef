"""Shared test setup: the tests folder on sys.path so every test, in any subfolder, imports the
shared helpers as ``import helpers`` (tests/helpers.py)."""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for p in (TESTS, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)
