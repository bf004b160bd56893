"""The faithful backend: Theano + Lasagne 0.1, as the paper ran it (docs/spec.md §3);
importing it applies only :data:`original.compat.IMPORT_BRIDGES` (REPRODUCING.md §4)."""
from original import compat

compat.install()
