"""pytest plugin for Lasagne 0.1's own test suite (scripts/lasagne_tests.sh, ``-p``).

Applies the archive's bridges (``import original``) before any test module imports Lasagne
or Theano, and gives the suite the ``mock`` package it imports: in Python 3 it is the
standard library's ``unittest.mock`` (the separate ``mock`` distribution is its backport).
"""
import sys
import unittest.mock

import original  # noqa: F401  (original.compat.install(): every bridge)

sys.modules.setdefault("mock", unittest.mock)
