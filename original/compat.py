"""Make PyPI's Lasagne 0.1 (2015) run on Theano-PyMC 1.1.2, Python 3.11 and numpy 1.23.5.

Import this module before ``theano`` and ``lasagne`` (``original/__init__.py`` does). Each
bridge below is one small, named function, applied once by :func:`install` and tested in
``tests/test_original_compat.py``:

1. :func:`theano_flag_defaults` -- *before* Theano is imported, add defaults to
   ``THEANO_FLAGS`` without overriding anything the user set there or in ``.theanorc``:

   * ``blas__ldflags=-lopenblas`` when Debian's OpenBLAS is installed. Theano-PyMC's own
     detection reads ``numpy.distutils.__config__.blas_opt_info``, which numpy 1.23's
     config no longer has, and crashes the import;
   * ``floatX=float32``: the paper trained in single precision on a GPU. The backend can
     still build float64 graphs per instance (see ``original.backend``).

   The compile directory stays Theano's default (``~/.theano/compiledir_*``), which caches
   the compiled C modules between runs.
2. :func:`bridge_mrg_random_streams` -- ``theano.sandbox.rng_mrg.MRG_RandomStreams`` was
   renamed ``MRG_RandomStream``; Lasagne's ``layers/noise.py`` imports the old name.
3. :func:`bridge_downsample` -- ``theano.tensor.signal.downsample.max_pool_2d(input, ds, st,
   ignore_border, padding, mode)`` became ``theano.tensor.signal.pool.pool_2d(input, ws,
   ignore_border, stride, pad, mode)``; Lasagne's ``layers/pool.py`` imports the old module.
4. :func:`bridge_gof` -- the graph package ``theano.gof`` became ``theano.graph``;
   ``lasagne.utils.as_theano_expression`` tests ``isinstance(x, theano.gof.Variable)``.
5. :func:`bridge_pkg_resources` -- Lasagne's ``__init__`` reads its version through
   ``pkg_resources``: setuptools 80.9 still ships it but warns on import; we import it
   quietly first, and should a later setuptools drop it, install a two-function stand-in
   backed by ``importlib.metadata``.
6. :func:`bridge_conv2d_image_shape` -- ``conv2d``'s keyword ``image_shape`` became
   ``input_shape``; Lasagne's ``Conv2DLayer`` passes the old one (a warning per layer).
7. :func:`bridge_scan_cython` -- Theano-PyMC ships a Cython-generated ``scan_perform.c``
   written for older Pythons; on 3.11 its compilation fails -- after a full g++ run, in every
   process that uses ``scan`` -- before ``scan`` falls back to its Python inner loop (it
   catches ``ImportError``). We make ``theano.scan.scan_perform_ext`` fail to import at once.
   The CRMN LSTM does not use ``scan`` by default: the sequence has a fixed length of 3n
   taps, so ``original.model`` builds the LSTM with ``unroll_scan=True``. Measured on a
   shared 2-core CPU (CRMN-32x1, float32, batch 100, training step): unrolled 98 s to
   compile and 3.4 s per step; ``theano.scan`` with the Python loop 80-204 s and 3.8-5.3 s
   (two runs).
8. :func:`bridge_recursion_limit` -- Theano recurses over graphs; the deep CRMN graphs
   need more than Python's default 1000 frames.
9. :func:`bridge_compile_lock` -- Theano compiles under one lock per compile directory
   (``~/.theano/compiledir_*/.lock``) and waits for it in silence, for many minutes when
   another process compiles; we say who holds it (from ``/proc/locks``) and for how long we
   have waited.

:func:`check_compiled_backend` then fails loudly (:class:`crmn.errors.ConfigError`) when
Theano would run the network's ops through its Python fallbacks: no C++ compiler, empty
BLAS flags, or a mode that does not compile C code.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from typing import Dict, Optional

from crmn.errors import ConfigError

#: Where Debian/Ubuntu's ``libopenblas-dev`` / ``libopenblas0`` put the shared library.
DEBIAN_OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so"

_installed = False
_probed = False  # check_compiled_backend's probe passed in this process
#: a wait for the compile lock longer than this is reported (shorter ones are the normal
#: turn-taking of two compiling processes), then again every LOCK_REPORT_EVERY seconds
LOCK_QUIET_WAIT = 3.0
LOCK_REPORT_EVERY = 15.0


# --- 1. THEANO_FLAGS defaults --------------------------------------------------------------

def _parse_flags(text: str) -> Dict[str, str]:
    """``"a=1,b.c=2"`` -> ``{"a": "1", "b__c": "2"}`` (Theano accepts both spellings)."""
    out = {}
    for item in text.split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.strip().replace(".", "__")] = value.strip()
    return out


def _theanorc_keys() -> set:
    """Option names (``section__key``) that the user's ``.theanorc`` files set."""
    import configparser

    keys = set()
    paths = os.environ.get("THEANORC", "~/.theanorc:~/.theanorc.txt").split(os.pathsep)
    parser = configparser.ConfigParser()
    parser.read([os.path.expanduser(p) for p in paths])
    for section in parser.sections():
        for key in parser[section]:
            keys.add(key if section == "global" else f"{section}__{key}")
    return keys


def find_openblas() -> Optional[str]:
    """``"-lopenblas"`` when a system OpenBLAS can be linked, else None.

    Looks in the dynamic linker's cache (``ldconfig -p``) and at Debian's fixed path.
    """
    if os.path.exists(DEBIAN_OPENBLAS):
        return "-lopenblas"
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "-lopenblas" if "libopenblas.so " in cache else None


def theano_flag_defaults(environ=None) -> Dict[str, str]:
    """Add our defaults to ``THEANO_FLAGS`` in ``environ``; returns the defaults added.

    Must run before ``import theano``: Theano reads its flags once, at import.
    """
    environ = os.environ if environ is None else environ
    user = set(_parse_flags(environ.get("THEANO_FLAGS", ""))) | _theanorc_keys()
    wanted = {"floatX": "float32"}
    blas = find_openblas()
    if blas is not None:
        wanted["blas__ldflags"] = blas
    added = {k: v for k, v in wanted.items() if k not in user}
    if added:
        extra = ",".join(f"{k}={v}" for k, v in added.items())
        current = environ.get("THEANO_FLAGS", "")
        environ["THEANO_FLAGS"] = f"{current},{extra}" if current else extra
    return added


# --- 2-6. import-time bridges --------------------------------------------------------------

def bridge_scan_cython() -> None:
    """Make ``from theano.scan import scan_perform_ext`` raise ImportError immediately.

    A ``None`` entry in ``sys.modules`` is Python's documented way to make an import fail;
    ``theano.scan.op`` catches the ImportError and uses its pure-Python loop.
    """
    sys.modules.setdefault("theano.scan.scan_perform_ext", None)


def bridge_mrg_random_streams() -> None:
    """``theano.sandbox.rng_mrg.MRG_RandomStreams`` -> ``MRG_RandomStream``."""
    import theano.sandbox.rng_mrg as rng_mrg

    if not hasattr(rng_mrg, "MRG_RandomStreams"):
        rng_mrg.MRG_RandomStreams = rng_mrg.MRG_RandomStream


def _max_pool_2d(input, ds, ignore_border=None, st=None, padding=(0, 0), mode="max"):
    """Theano 0.7's ``downsample.max_pool_2d`` signature over Theano-PyMC's ``pool_2d``."""
    from theano.tensor.signal.pool import pool_2d

    if ignore_border is None:  # Theano 0.7's default, kept explicit to silence a warning
        ignore_border = False
    return pool_2d(input, ws=ds, ignore_border=ignore_border, stride=st, pad=padding,
                   mode=mode)


def bridge_downsample() -> None:
    """Provide the module ``theano.tensor.signal.downsample`` with ``max_pool_2d``."""
    import theano.tensor.signal as signal

    if "theano.tensor.signal.downsample" in sys.modules:
        return
    module = types.ModuleType("theano.tensor.signal.downsample",
                              "Compatibility stand-in (original.compat) for Theano 0.7's "
                              "downsample module.")
    module.max_pool_2d = _max_pool_2d
    sys.modules[module.__name__] = module
    signal.downsample = module


def bridge_gof() -> None:
    """``theano.gof.Variable`` (and the rest of ``theano.gof``) -> ``theano.graph.basic``."""
    import theano
    import theano.graph.basic

    if not hasattr(theano, "gof"):
        theano.gof = theano.graph.basic
        sys.modules.setdefault("theano.gof", theano.graph.basic)


def bridge_conv2d_image_shape() -> None:
    """``theano.tensor.nnet.conv2d(..., image_shape=...)`` -> ``input_shape=...``.

    Lasagne 0.1's ``Conv2DLayer`` passes the old keyword, which Theano-PyMC still accepts
    but warns about at every layer. The wrapper renames it; it must be installed before
    ``lasagne.layers.conv`` is imported, whose ``convolution=`` default captures the function.
    """
    import theano.tensor.nnet as nnet

    if getattr(nnet.conv2d, "_crmn_bridge", False):
        return
    original_conv2d = nnet.conv2d

    def conv2d(input, filters, input_shape=None, filter_shape=None, border_mode="valid",
               subsample=(1, 1), filter_flip=True, image_shape=None, **kwargs):
        if input_shape is None:
            input_shape = image_shape
        return original_conv2d(input, filters, input_shape=input_shape,
                               filter_shape=filter_shape, border_mode=border_mode,
                               subsample=subsample, filter_flip=filter_flip, **kwargs)

    conv2d.__doc__ = original_conv2d.__doc__
    conv2d._crmn_bridge = True
    nnet.conv2d = conv2d


def bridge_pkg_resources() -> None:
    """Import ``pkg_resources`` without its deprecation warning, or stand in for it."""
    if "pkg_resources" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pkg_resources  # noqa: F401  (cached in sys.modules for Lasagne)
            return
        except ImportError:
            pass
    from importlib import metadata

    module = types.ModuleType("pkg_resources", "Stand-in (original.compat): "
                                               "get_distribution(name).version only.")
    module.get_distribution = lambda name: types.SimpleNamespace(
        project_name=name, version=metadata.version(name))
    sys.modules["pkg_resources"] = module


#: Python recursion limit while Theano optimises and compiles (see bridge_recursion_limit)
RECURSION_LIMIT = 20000


def bridge_recursion_limit() -> None:
    """Raise Python's recursion limit (1000 by default) to :data:`RECURSION_LIMIT`.

    Theano walks and copies graphs recursively while it optimises and compiles them; the
    gradient of a 32-layer CRMN with its 15 LSTM steps unrolled exceeds 1000 frames
    (``RecursionError`` in ``theano.function``). Theano's own documentation recommends
    raising the limit for deep graphs; on CPython 3.11 Python-to-Python calls do not grow
    the C stack, so a higher limit is safe.
    """
    if sys.getrecursionlimit() < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)


def install() -> None:
    """Apply every bridge once; safe to call again. Imports Theano (not Lasagne)."""
    global _installed
    if _installed:
        return
    if "theano" not in sys.modules:
        theano_flag_defaults()
    bridge_scan_cython()
    bridge_recursion_limit()
    bridge_pkg_resources()
    with warnings.catch_warnings():
        # Theano-PyMC warns about its own deprecated aliases at import; not our concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import theano  # noqa: F401
    bridge_mrg_random_streams()
    bridge_downsample()
    bridge_gof()
    bridge_conv2d_image_shape()
    bridge_compile_lock()
    _installed = True


def lock_holder(path: str) -> Optional[int]:
    """PID of the process holding a ``flock`` on ``path``, from Linux's ``/proc/locks``
    (None where it cannot be told)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and \
                        parts[5].rsplit(":", 1)[-1] == str(inode):
                    return int(parts[4])
    except (OSError, ValueError):
        return None
    return None


def _wait_announced(lock_dir: str) -> None:
    """Wait, saying so, until Theano's compile lock in ``lock_dir`` is free."""
    import time

    import filelock

    path = os.path.join(lock_dir, ".lock")
    start = time.perf_counter()
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=LOCK_QUIET_WAIT)  # free soon: nothing to say
    except filelock.Timeout:
        while True:
            print(f"theano: waiting for the compile lock {path}, held by process "
                  f"{lock_holder(path) or '?'} ({time.perf_counter() - start:.0f} s so far)",
                  file=sys.stderr, flush=True)
            try:
                lock.acquire(timeout=LOCK_REPORT_EVERY)
                break
            except filelock.Timeout:
                continue
    lock.release()


def bridge_compile_lock() -> None:
    """Theano's ``lock_ctx``, announcing a wait for the lock (see item 9 above).

    The modules that imported ``lock_ctx`` by name get the announcing one."""
    import contextlib

    import theano.compile.compilelock as compilelock
    from theano.configdefaults import config

    original = compilelock.lock_ctx
    if getattr(original, "announces", False):
        return

    @contextlib.contextmanager
    def lock_ctx(lock_dir=None, *, timeout=-1):
        lock_dir = lock_dir or config.compiledir
        if f"{lock_dir}-{os.getpid()}" not in compilelock.local_mem._locks:
            _wait_announced(lock_dir)  # held already by this thread: re-entry, no wait
        with original(lock_dir, timeout=timeout):
            yield

    lock_ctx.announces = True
    for name, module in list(sys.modules.items()):
        if name.startswith("theano") and getattr(module, "lock_ctx", None) is original:
            module.lock_ctx = lock_ctx


# --- the check ------------------------------------------------------------------------------

def check_compiled_backend(probe: bool = True) -> None:
    """Raise ConfigError if Theano would run the network's ops in Python, not compiled C.

    Parameters
    ----------
    probe : bool
        Also compile a 3x3 convolution and require that the optimiser picked the BLAS-backed
        ``CorrMM`` op (cached in Theano's compile directory after the first call).

    Notes
    -----
    ``scan``'s pure-Python inner loop is allowed (see :func:`bridge_scan_cython`); the
    CRMN LSTM is unrolled and does not use it.
    """
    import theano

    cfg = theano.config
    rc = "THEANO_FLAGS"
    if not cfg.cxx:
        raise ConfigError(
            f"Theano found no C++ compiler (config.cxx is empty): install g++ or set "
            f"cxx=... in {rc}; the Python fallbacks are far too slow for training")
    if not cfg.blas__ldflags.strip():
        raise ConfigError(
            f"Theano has no BLAS (blas__ldflags is empty): install libopenblas-dev or set "
            f"blas__ldflags=... in {rc}; convolutions would fall back to slow code")
    mode = str(cfg.mode)
    if mode in ("FAST_COMPILE", "DebugMode", "DEBUG_MODE") or cfg.linker in ("py", "vm"):
        raise ConfigError(
            f"Theano mode={mode} linker={cfg.linker} runs ops in Python: use the default "
            f"mode (FAST_RUN) and linker (cvm) in {rc}")
    global _probed
    if not probe or _probed:
        return
    import numpy as np
    import theano.tensor as T
    from theano.tensor.nnet import conv2d

    x = T.tensor4("x", dtype="float32")
    w = theano.shared(np.ones((2, 2, 3, 3), dtype="float32"))
    f = theano.function([x], conv2d(x, w, border_mode="half"))
    ops = {type(node.op).__name__ for node in f.maker.fgraph.toposort()}
    if not any(name.startswith(("CorrMM", "GpuCorrMM", "GpuDnnConv")) for name in ops):
        raise ConfigError(
            f"Theano compiled a convolution without a BLAS-backed op (got {sorted(ops)}); "
            f"check blas__ldflags={cfg.blas__ldflags!r} in {rc}")
    _probed = True

