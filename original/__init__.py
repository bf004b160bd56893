"""The faithful backend: Theano + Lasagne 0.1, as the paper ran it (docs/spec.md §3).

Importing the package applies :data:`original.compat.IMPORT_BRIDGES` (what Theano and
Lasagne need to import on today's Python and numpy), so ``import original.model`` is all a
caller needs. Everything else is applied by :func:`original.compat.graph_settings` only
while a graph is built, compiled or first run. See REPRODUCING.md §4.
"""
from original import compat

compat.install()
