"""pytest plugin for Lasagne 0.1's own test suite (scripts/lasagne_tests.sh, ``-p``).

Applies the archive's bridges before any test module imports Lasagne or Theano: those of
the import (``import original``), the Theano 0.7 names only Lasagne's tests use, and the
graph settings (``original.compat.graph_settings``) for the whole session, since the tests
build and compile graphs directly. Gives the suite the ``mock`` package it imports: in
Python 3 the standard library's ``unittest.mock`` (the ``mock`` distribution backports it).
"""
import sys
import unittest.mock

from original import compat

compat.bridge_lasagne_tests()
_SESSION = compat.graph_settings()
sys.modules.setdefault("mock", unittest.mock)


def pytest_configure(config):
    _SESSION.__enter__()


def pytest_unconfigure(config):
    _SESSION.__exit__(None, None, None)
