"""Make PyPI's Lasagne 0.1 (2015) run on Theano-PyMC 1.1.2: Python 3.11 with numpy 1.23.5 (the
pinned environment), and Python 3.12 with numpy 2.x (the ``current`` one, JAX mode only).

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
   With it, for Lasagne's own tests (``scripts/lasagne_tests.sh``): ``theano.gof.graph``
   (:func:`bridge_gof`), ``theano.scan_module.scan_utils`` (:func:`bridge_scan_module`)
   and ``theano.Variable`` (:func:`bridge_theano_variable`), the same objects under their
   Theano 0.7 names.
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

10. :func:`bridge_stdlib_distutils` -- Python 3.12 has no ``distutils``; Theano's config
    and C module loader import ``distutils.spawn`` / ``distutils.sysconfig`` at import. Where
    no ``distutils`` can be imported (setuptools provides one when installed), a stand-in
    backed by ``shutil.which`` and ``sysconfig``.
11. :func:`bridge_numpy_distutils` -- numpy 2 has no ``numpy.distutils``; Theano imports
    it at import time (``tensor/blas.py``, ``link/c/cmodule.py``) to find the BLAS and
    numpy's headers. The stand-in finds no BLAS (the current environment has no C backend)
    and gives numpy's include directory.
12. :func:`bridge_numpy_aliases` -- names numpy 2 removed that Theano's Python code uses:
    ``np.product`` (reached while shapes are worked out), ``np.cast``, ``np.complex``,
    ``np.int``, ``np.sctype2char``, ``np.AxisError``, ``np.ComplexWarning``. Each is set
    only where numpy lacks it, to what numpy 1.23 gave.
13. :func:`bridge_autocast` -- numpy 2 compares a Python number with a numpy scalar in the
    scalar's dtype (NEP 50), which changes how Theano types Python numbers in graphs
    (``NumpyAutocaster``): ``0.9 == float32(0.9)`` became true, so every Python float
    became a float32 constant even in float64 graphs (0.9 -> 0.89999998, silently), and
    ``int8(200)`` became an OverflowError, so ints >= 128 became uint64 constants. The
    bridge makes the choice with exact comparisons, as numpy 1.x made it.

The C backend (:func:`c_backend_available`) needs numpy < 1.24 and a C++ compiler; where it
is missing, :func:`theano_flag_defaults` also sets ``cxx=`` (Theano then never compiles C
code) and the Theano stack runs in JAX mode (``original.jax_mode``).

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
from pathlib import Path
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
    if numpy_too_new_for_c():
        wanted["cxx"] = ""  # no C compilation at all: Theano's C code needs numpy < 1.24
    blas = find_openblas()
    if blas is not None:
        wanted["blas__ldflags"] = blas
    shared = shared_compiledir(environ)
    if shared is not None and not user & {"base_compiledir", "compiledir",
                                          "compiledir_format"}:
        wanted["base_compiledir"] = shared
    added = {k: v for k, v in wanted.items() if k not in user}
    if added:
        extra = ",".join(f"{k}={v}" for k, v in added.items())
        current = environ.get("THEANO_FLAGS", "")
        environ["THEANO_FLAGS"] = f"{current},{extra}" if current else extra
    return added


def shared_compiledir(environ=None) -> Optional[str]:
    """``$CRMN_CACHE/theano`` where the user chose a compile cache folder
    (:mod:`crmn.compile_cache`) that passes its ownership rule, else None: Theano's own
    compiled C modules then live beside the JAX mode's entries, so a cluster's shared
    folder shares them too. Without ``$CRMN_CACHE`` Theano keeps its default (``~/.theano``),
    which is already per user and persistent. Theano's module cache cannot be turned off:
    ``--no-compile-cache`` does not move it back; ``THEANO_FLAGS=base_compiledir=...``
    does."""
    from crmn import compile_cache

    environ = os.environ if environ is None else environ
    chosen = environ.get(compile_cache.CACHE_ENV)
    if not chosen:
        return None
    root = Path(chosen).expanduser()
    if compile_cache.folder_problem(root, chosen=True) is not None:
        return None  # a JAX-mode run says why, once; Theano keeps its own default
    return str(root / "theano")


#: the first numpy release whose C API Theano-PyMC 1.1.2's C code does not build against
NUMPY_C_LIMIT = (1, 24)


def _numpy_version() -> tuple:
    import numpy

    return tuple(int(part) for part in numpy.__version__.split(".")[:2])


def numpy_too_new_for_c() -> bool:
    """True where numpy is too new for Theano-PyMC 1.1.2's C code (numpy >= 1.24)."""
    return _numpy_version() >= NUMPY_C_LIMIT


def c_backend_available() -> tuple:
    """``(True, "")`` where Theano's C backend can work here, else ``(False, reason)``.

    ``reason`` is one line: numpy too new for Theano's C code, or no C++ compiler
    (Theano's ``cxx`` flag empty). Cheap: nothing is compiled (see
    :func:`check_compiled_backend` for the full check with a probe).
    """
    import numpy

    if numpy_too_new_for_c():
        return False, (f"Theano-PyMC 1.1.2's C backend needs numpy < "
                       f"{'.'.join(map(str, NUMPY_C_LIMIT))} and this Python has numpy "
                       f"{numpy.__version__}: use --theano-mode jax, or the pinned "
                       f"environment (requirements.txt) for the C backend")
    import theano

    if not theano.config.cxx:
        return False, ("Theano found no C++ compiler (its cxx flag is empty): install g++ "
                       "or use --theano-mode jax")
    return True, ""


# --- 2-6, 10-13. import-time bridges --------------------------------------------------------------

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
    """``theano.gof.Variable`` (and the rest of ``theano.gof``) -> ``theano.graph.basic``;
    ``theano.gof.graph`` (``is_same_graph`` and the graph functions) -> a module of
    ``theano.graph.basic``'s names plus ``theano.graph.toolbox.is_same_graph``."""
    import theano
    import theano.graph.basic
    import theano.graph.toolbox

    if hasattr(theano, "gof") or "theano.gof" in sys.modules:
        return
    names = {k: v for k, v in vars(theano.graph.basic).items() if not k.startswith("__")}
    graph = _stand_in("theano.gof.graph", "Theano 0.7's graph module (theano.graph.basic).",
                      is_same_graph=theano.graph.toolbox.is_same_graph, **names)
    theano.gof = _stand_in("theano.gof", "Theano 0.7's graph package (theano.graph.basic).",
                           graph=graph, __path__=[], **names)


def bridge_scan_module() -> None:
    """``theano.scan_module.scan_utils`` -> ``theano.scan.utils`` (with
    ``equal_computations``, now in ``theano.graph.basic``)."""
    import importlib

    import theano
    import theano.graph.basic

    if "theano.scan_module" in sys.modules:
        return
    utils = importlib.import_module("theano.scan.utils")
    names = {k: v for k, v in vars(utils).items() if not k.startswith("__")}
    names.setdefault("equal_computations", theano.graph.basic.equal_computations)
    scan_utils = _stand_in("theano.scan_module.scan_utils",
                           "Theano 0.7's scan utilities, renamed theano.scan.utils.", **names)
    module = _stand_in("theano.scan_module", "Theano 0.7's scan package, renamed theano.scan.",
                       scan_utils=scan_utils, __path__=[])
    theano.scan_module = module


def bridge_theano_variable() -> None:
    """``theano.Variable`` -> ``theano.graph.basic.Variable``."""
    import theano
    import theano.graph.basic

    if not hasattr(theano, "Variable"):
        theano.Variable = theano.graph.basic.Variable


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


def _stand_in(name: str, doc: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in (original.compat): {doc}")
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def _python_inc(plat_specific=False, prefix=None):
    import sysconfig

    return sysconfig.get_paths()["platinclude" if plat_specific else "include"]


def _python_lib(plat_specific=False, standard_lib=False, prefix=None):
    import sysconfig

    key = {(False, False): "purelib", (True, False): "platlib",
           (False, True): "stdlib", (True, True): "platstdlib"}
    return sysconfig.get_paths()[key[bool(plat_specific), bool(standard_lib)]]


def bridge_stdlib_distutils() -> None:
    """``distutils.spawn.find_executable`` and ``distutils.sysconfig`` where Python has no
    ``distutils`` (3.12 without setuptools). Must run before ``import theano``."""
    import importlib.util

    if "distutils" in sys.modules or importlib.util.find_spec("distutils") is not None:
        return
    import shutil
    import sysconfig

    spawn = _stand_in("distutils.spawn", "find_executable only.",
                      find_executable=lambda name, path=None: shutil.which(name, path=path))
    config = _stand_in("distutils.sysconfig", "the functions Theano calls, over sysconfig.",
                       get_config_var=sysconfig.get_config_var,
                       get_config_vars=sysconfig.get_config_vars,
                       get_python_inc=_python_inc, get_python_lib=_python_lib,
                       get_python_version=sysconfig.get_python_version,
                       get_config_h_filename=sysconfig.get_config_h_filename)
    _stand_in("distutils", "spawn and sysconfig only (Python 3.12 has no distutils).",
              spawn=spawn, sysconfig=config, __path__=[])


class _SystemInfo:
    verbosity = 0


def bridge_numpy_distutils() -> None:
    """``numpy.distutils`` where numpy has none (numpy 2): numpy's headers, and no BLAS
    found (Theano's C backend does not work with numpy 2 anyway)."""
    import importlib.util

    import numpy

    if "numpy.distutils" in sys.modules or \
            importlib.util.find_spec("numpy.distutils") is not None:
        return
    misc = _stand_in("numpy.distutils.misc_util", "get_numpy_include_dirs only.",
                     get_numpy_include_dirs=lambda: [numpy.get_include()])
    info = _stand_in("numpy.distutils.system_info", "finds nothing.",
                     system_info=_SystemInfo, get_info=lambda name, notfound_action=0: {})
    module = _stand_in("numpy.distutils", "what Theano imports; numpy 2 has no distutils.",
                       misc_util=misc, system_info=info, __path__=[])
    numpy.distutils = module


class _Cast(dict):
    """numpy 1.x's ``np.cast``: ``np.cast[dtype](x)`` is ``np.asarray(x).astype(dtype)``."""

    def __missing__(self, key):
        import numpy

        dtype = numpy.dtype(key)
        return lambda x: numpy.asarray(x).astype(dtype)


def bridge_numpy_aliases() -> Dict[str, object]:
    """Set numpy 1.x names that numpy 2 removed and Theano uses; returns those set."""
    import numpy

    def sctype2char(sctype):
        return numpy.dtype(sctype).char

    wanted = {"product": numpy.prod, "cast": _Cast(), "complex": complex, "int": int,
              "sctype2char": sctype2char}
    exceptions = getattr(numpy, "exceptions", None)
    if exceptions is not None:
        wanted["AxisError"] = exceptions.AxisError
        wanted["ComplexWarning"] = exceptions.ComplexWarning
    added = {}
    for name, value in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(numpy, name)
        except AttributeError:
            setattr(numpy, name, value)
            added[name] = value
    return added


def _exact_autocast(original_call):
    """``NumpyAutocaster.__call__`` choosing the first dtype that holds a Python number
    exactly, compared in Python's own arithmetic (numpy 1.x's outcome under numpy 2)."""
    import numpy

    def __call__(self, x):
        from theano.configdefaults import config

        if config.cast_policy != "custom" or not isinstance(x, (int, float)) or \
                isinstance(x, bool):
            return original_call(self, x)
        if isinstance(x, float) and config.floatX in self.dtypes and \
                config.floatX != "float64":
            return numpy.asarray(x, dtype=config.floatX)  # Theano's deliberate downcast
        dtypes = [d for d in self.dtypes if config.floatX == "float16" or d != "float16"]
        value = None
        for dtype in dtypes:
            try:
                value = numpy.asarray(x, dtype=dtype)
            except OverflowError:  # numpy 2 refuses a Python int out of the dtype's range
                continue
            if value.item() == x:  # Python int/float equality: exact
                return value
        if value is None:
            raise OverflowError(f"{x} does not fit any of {dtypes}")
        return value

    __call__.exact = True
    __call__.stock = original_call
    return __call__


def bridge_autocast() -> bool:
    """Install :func:`_exact_autocast` on Theano's ``NumpyAutocaster`` under numpy >= 2;
    returns whether it is installed."""
    if _numpy_version() < (2, 0):
        return False
    from theano.scalar.basic import NumpyAutocaster

    if not getattr(NumpyAutocaster.__call__, "exact", False):
        NumpyAutocaster.__call__ = _exact_autocast(NumpyAutocaster.__call__)
    return True


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
    bridge_stdlib_distutils()
    bridge_numpy_distutils()
    bridge_numpy_aliases()
    with warnings.catch_warnings():
        # Theano-PyMC warns about its own deprecated aliases at import; not our concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import theano  # noqa: F401
    bridge_autocast()
    bridge_mrg_random_streams()
    bridge_downsample()
    bridge_gof()
    bridge_scan_module()
    bridge_theano_variable()
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

    if numpy_too_new_for_c():
        raise ConfigError(c_backend_available()[1])
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

