"""The faithful stack: Theano + Lasagne 0.1, as the paper ran it (SPEC §3).

Importing this package installs the compatibility bridges of :mod:`original.compat`
before anything imports Lasagne, so ``import original.model`` (or ``original.layers``) is
all a caller needs. The modules:

* :mod:`original.compat` -- Theano flags and the bridges that let Lasagne 0.1 import;
* :mod:`original.layers` -- batch norm, option-A shortcut and the CRMN tap, Lasagne style;
* :mod:`original.model` -- ``build_resnet`` / ``build_crmn`` (SPEC §4);
* :mod:`original.backend` -- :class:`TheanoBackend`, the :class:`crmn.stack.Stack`.
"""
from original import compat

compat.install()
