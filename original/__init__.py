"""The faithful stack: Theano + Lasagne 0.1, as the paper ran it (SPEC §3).

Importing this package installs the compatibility bridges of :mod:`original.compat`
before anything imports Lasagne, so ``import original.model`` (or ``original.layers``) is
all a caller needs. The modules:

* :mod:`original.compat` -- Theano flags and the bridges that let Lasagne 0.1 import;
* :mod:`original.layers` -- batch norm, option-A shortcut and the CRMN tap, Lasagne style;
* :mod:`original.model` -- ``build_resnet`` / ``build_crmn`` (SPEC §4);
* :mod:`original.backend` -- :class:`TheanoBackend`, the :class:`crmn.stack.Stack`;
* :mod:`original.jax_mode` -- the same graphs compiled through JAX (``--theano-mode jax``).

What ``import original`` changes for the whole process
------------------------------------------------------
Each item is one function of :mod:`original.compat`, applied once by ``compat.install()``.

* ``THEANO_FLAGS`` (the environment variable, so child processes inherit it), only when
  Theano is not imported yet and only for options the user set neither there nor in
  ``.theanorc``:

  - ``floatX=float32`` -- Theano's default is float64; the paper trained in single
    precision on a GPU. A symbolic variable created without a dtype (``T.matrix()``) is
    then float32 in the whole process. ``TheanoBackend`` still builds float64 graphs per
    instance (``dtype="float64"``) under ``theano.config.change_flags``.
  - ``blas__ldflags=-lopenblas`` where a system OpenBLAS is found -- Theano-PyMC's own
    BLAS detection crashes on numpy 1.23, and without a BLAS convolutions fall back to
    slow code.
* Python's recursion limit raised to ``compat.RECURSION_LIMIT`` (20000) if lower -- Theano
  optimises and compiles graphs recursively, and the gradient of a 32-layer CRMN needs
  more than the default 1000 frames.
* ``theano.scan`` uses its pure-Python inner loop (``theano.scan.scan_perform_ext`` is made
  unimportable) -- the Cython module Theano-PyMC ships fails to compile on Python 3.11,
  after a full g++ run in every process that uses ``scan``. The CRMN LSTM is unrolled and
  does not use ``scan``; other ``scan`` graphs of the process run slower.
* ``pkg_resources`` imported with its deprecation warning silenced (or, where setuptools no
  longer has it, a two-function stand-in in ``sys.modules``) -- Lasagne reads its version
  through it.
* ``theano`` imported (its own deprecation warnings silenced during that import only), then
  Theano 0.7 names Lasagne 0.1 still uses: ``theano.sandbox.rng_mrg.MRG_RandomStreams``,
  the module ``theano.tensor.signal.downsample`` (``max_pool_2d``), ``theano.gof`` (as
  ``theano.graph.basic``); and ``theano.tensor.nnet.conv2d`` wrapped to accept the old
  keyword ``image_shape``.
* Theano's compile lock (``lock_ctx``) wrapped to say on stderr who holds it and for how
  long this process has waited (a silent wait can last minutes).

Nothing else: JAX is not imported. The JAX mode's own process-wide settings
(``jax_enable_x64`` on; ``--xla_cpu_use_mkl_dnn=false`` added to ``XLA_FLAGS`` while no JAX
backend has started) are applied by :func:`original.jax_mode.configure`, which a JAX-mode
``TheanoBackend`` calls when it is built -- not by importing anything. Building a network
(:func:`original.model.build`) seeds Lasagne's global RNG (``lasagne.random.set_rng``).
"""
from original import compat

compat.install()
