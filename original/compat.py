"""Make Lasagne 0.1 (2015) run on Theano-PyMC 1.1.2 under Python 3.11 / numpy 1.23 (pinned)
and Python 3.12 / numpy 2 (``current``, JAX mode only): :data:`IMPORT_BRIDGES` (applied by
``import original``) let them import; :func:`graph_settings` gives Theano's running code
what it needs while a graph is built, compiled or first run, and puts it all back after.
"""
from __future__ import annotations

import configparser
import contextlib
import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import types
import warnings
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

import numpy

from crmn import runlog
from crmn.errors import ConfigError

DEBIAN_OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so"
#: the first numpy release whose C API Theano-PyMC 1.1.2's C code does not build against
NUMPY_C_LIMIT = (1, 24)
#: Python's recursion limit inside :func:`graph_settings` (Theano recurses over graphs)
RECURSION_LIMIT = 20000
#: a compile-lock wait longer than this (s) is reported, then every LOCK_REPORT_EVERY s
LOCK_QUIET_WAIT = 3.0
LOCK_REPORT_EVERY = 15.0

_probed = False  # check_compiled_backend's probe passed in this process


def _parse_flags(text: str) -> Dict[str, str]:
    """``"a=1,b.c=2"`` -> ``{"a": "1", "b__c": "2"}`` (Theano accepts both spellings)."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {key.strip().replace(".", "__"): value.strip() for key, value in pairs}


def _theanorc_keys() -> set:
    """Option names (``section__key``) that the user's ``.theanorc`` files set."""
    paths = os.environ.get("THEANORC", "~/.theanorc:~/.theanorc.txt").split(os.pathsep)
    parser = configparser.ConfigParser()
    parser.read([os.path.expanduser(p) for p in paths])
    return {key if section == "global" else f"{section}__{key}"
            for section in parser.sections() for key in parser[section]}


def find_openblas() -> Optional[str]:
    """``"-lopenblas"`` when a system OpenBLAS can be linked, else None."""
    if os.path.exists(DEBIAN_OPENBLAS):
        return "-lopenblas"
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "-lopenblas" if "libopenblas.so " in cache else None


def theano_flag_defaults(environ=None) -> Dict[str, str]:
    """Add defaults to ``THEANO_FLAGS`` in ``environ`` (Theano-PyMC's BLAS detection crashes
    on numpy 1.23), never over the user's flags or ``.theanorc``; returns those added."""
    environ = os.environ if environ is None else environ
    user = set(_parse_flags(environ.get("THEANO_FLAGS", ""))) | _theanorc_keys()
    wanted = {"floatX": "float32"}
    if numpy_too_new_for_c():
        wanted["cxx"] = ""
    blas = find_openblas()
    if blas is not None:
        wanted["blas__ldflags"] = blas
    shared = shared_compiledir(environ)
    if shared is not None and not user & {"base_compiledir", "compiledir", "compiledir_format"}:
        wanted["base_compiledir"] = shared
    added = {k: v for k, v in wanted.items() if k not in user}
    if added:
        flags = [environ.get("THEANO_FLAGS", "")] + [f"{k}={v}" for k, v in added.items()]
        environ["THEANO_FLAGS"] = ",".join(flag for flag in flags if flag)
    return added


def shared_compiledir(environ=None) -> Optional[str]:
    """``$CRMN_CACHE/theano`` where it passes compile_cache's ownership rule, else None."""
    from crmn import compile_cache
    environ = os.environ if environ is None else environ
    chosen = environ.get(compile_cache.CACHE_ENV)
    if not chosen:
        return None
    root = Path(chosen).expanduser()
    if compile_cache.folder_problem(root, chosen=True) is not None:
        return None  # a JAX-mode run says why, once
    return str(root / "theano")


def _numpy_version() -> tuple:
    return tuple(int(part) for part in numpy.__version__.split(".")[:2])


def numpy_too_new_for_c() -> bool:
    return _numpy_version() >= NUMPY_C_LIMIT


def c_mode_available() -> tuple:
    """(True, "") where Theano's C mode can work here, else (False, why); compiles nothing."""
    if numpy_too_new_for_c():
        return False, (f"Theano-PyMC 1.1.2's C mode needs numpy < "
                       f"{'.'.join(map(str, NUMPY_C_LIMIT))} and this Python has numpy "
                       f"{numpy.__version__}: use --theano-mode jax, or the pinned "
                       f"environment (requirements.txt) for the C mode")
    import theano
    if not theano.config.cxx:
        return False, ("Theano found no C++ compiler (its cxx flag is empty): install g++ "
                       "(or set cxx=... in THEANO_FLAGS), or use --theano-mode jax")
    return True, ""


def _stand_in(name: str, doc: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in (original.compat): {doc}")
    vars(module).update(attrs)
    sys.modules[name] = module
    return module


def bridge_pkg_resources() -> None:
    """Lasagne reads its version through ``pkg_resources``: import it quietly, or stand in
    with importlib.metadata where setuptools has none."""
    with warnings.catch_warnings(), contextlib.suppress(ImportError):
        warnings.simplefilter("ignore")
        import pkg_resources  # noqa: F401  (cached in sys.modules for Lasagne)
        return
    _stand_in("pkg_resources", "get_distribution(name).version and the error it raises.",
              get_distribution=lambda name: types.SimpleNamespace(
                  project_name=name, version=metadata.version(name)),
              DistributionNotFound=metadata.PackageNotFoundError)  # theano.gpuarray catches it


def _python_inc(plat_specific=False, prefix=None):
    return sysconfig.get_paths()["platinclude" if plat_specific else "include"]


def _python_lib(plat_specific=False, standard_lib=False, prefix=None):
    key = {(False, False): "purelib", (True, False): "platlib",
           (False, True): "stdlib", (True, True): "platstdlib"}
    return sysconfig.get_paths()[key[bool(plat_specific), bool(standard_lib)]]


def bridge_stdlib_distutils() -> None:
    """Python 3.12 has no ``distutils``, which Theano imports: stand-ins over shutil, sysconfig."""
    if "distutils" in sys.modules or importlib.util.find_spec("distutils") is not None:
        return
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


def bridge_numpy_distutils() -> None:
    """numpy 2 has no ``numpy.distutils`` (Theano imports it): finds no BLAS, gives headers."""
    if "numpy.distutils" in sys.modules or importlib.util.find_spec("numpy.distutils") is not None:
        return
    misc = _stand_in("numpy.distutils.misc_util", "get_numpy_include_dirs only.",
                     get_numpy_include_dirs=lambda: [numpy.get_include()])
    info = _stand_in("numpy.distutils.system_info", "finds nothing.",
                     system_info=type("system_info", (), {"verbosity": 0}),
                     get_info=lambda name, notfound_action=0: {})
    numpy.distutils = _stand_in("numpy.distutils", "what Theano imports.",
                                misc_util=misc, system_info=info, __path__=[])


def import_theano() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import theano  # noqa: F401


def bridge_mrg_random_streams() -> None:
    import theano.sandbox.rng_mrg as rng_mrg
    if not hasattr(rng_mrg, "MRG_RandomStreams"):
        rng_mrg.MRG_RandomStreams = rng_mrg.MRG_RandomStream


def _max_pool_2d(input, ds, ignore_border=None, st=None, padding=(0, 0), mode="max"):
    """Theano 0.7's ``downsample.max_pool_2d`` over Theano-PyMC's ``pool_2d``."""
    from theano.tensor.signal.pool import pool_2d
    # None: Theano 0.7's default False, given explicitly to silence a warning
    return pool_2d(input, ws=ds, ignore_border=bool(ignore_border), stride=st, pad=padding,
                   mode=mode)


def bridge_downsample() -> None:
    import theano.tensor.signal as signal
    if "theano.tensor.signal.downsample" not in sys.modules:
        signal.downsample = _stand_in("theano.tensor.signal.downsample",
                                      "Theano 0.7's max_pool_2d.", max_pool_2d=_max_pool_2d)


def bridge_gof() -> None:
    """``theano.gof`` (now ``theano.graph``), with ``graph.is_same_graph`` for Lasagne's tests."""
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


def bridge_conv2d_image_shape() -> None:
    """``conv2d(..., image_shape=)``, now ``input_shape=``, as Lasagne's ``Conv2DLayer`` passes."""
    import theano.tensor.nnet as nnet
    if getattr(nnet.conv2d, "_crmn_bridge", False):
        return
    stock = nnet.conv2d

    def conv2d(input, filters, input_shape=None, *args, image_shape=None, **kwargs):
        return stock(input, filters, image_shape if input_shape is None else input_shape,
                     *args, **kwargs)

    conv2d.__doc__ = stock.__doc__
    conv2d._crmn_bridge = True
    nnet.conv2d = conv2d


def _flag_defaults_before_theano() -> None:
    if "theano" not in sys.modules:
        theano_flag_defaults()


#: What ``import original`` applies, in order, each needed for Theano or Lasagne to import.
IMPORT_BRIDGES = (
    _flag_defaults_before_theano,  # BLAS, cxx, compiledir, floatX: read once, at import
    bridge_pkg_resources,          # Lasagne's __init__ reads its version through it
    bridge_stdlib_distutils,       # Theano's import uses distutils (gone in Python 3.12)
    bridge_numpy_distutils,        # Theano's import uses numpy.distutils (gone in numpy 2)
    import_theano,                 # the bridges below patch Theano itself
    bridge_mrg_random_streams,     # lasagne.layers.noise imports the old name
    bridge_downsample,             # lasagne.layers.pool imports the old module
    bridge_gof,                    # lasagne.utils uses theano.gof
    bridge_conv2d_image_shape,     # lasagne.layers.conv captures conv2d at its import
)


@functools.cache  # once per process; a bridge that raised is tried again
def install() -> None:
    for bridge in IMPORT_BRIDGES:
        bridge()


def bridge_lasagne_tests() -> None:
    """Theano 0.7 names only Lasagne's own test suite uses (scripts/lasagne_tests.sh)."""
    import theano
    import theano.graph.basic
    if not hasattr(theano, "Variable"):
        theano.Variable = theano.graph.basic.Variable
    if "theano.scan_module" in sys.modules:
        return
    utils = importlib.import_module("theano.scan.utils")
    names = {k: v for k, v in vars(utils).items() if not k.startswith("__")}
    names.setdefault("equal_computations", theano.graph.basic.equal_computations)
    scan_utils = _stand_in("theano.scan_module.scan_utils",
                           "Theano 0.7's scan utilities, renamed theano.scan.utils.", **names)
    theano.scan_module = _stand_in("theano.scan_module", "Theano 0.7's scan package.",
                                   scan_utils=scan_utils, __path__=[])


class _Cast(dict):
    """numpy 1.x's ``np.cast``: ``np.cast[dtype](x)`` is ``np.asarray(x).astype(dtype)``."""
    def __missing__(self, key):
        dtype = numpy.dtype(key)
        return lambda x: numpy.asarray(x).astype(dtype)


def missing_numpy_names() -> Dict[str, object]:
    """numpy 1.x names that numpy 2 removed and Theano's running code uses, as numpy 1.23
    gave them; only those this numpy lacks."""
    wanted = {"product": numpy.prod, "cast": _Cast(), "complex": complex, "int": int,
              "sctype2char": lambda sctype: numpy.dtype(sctype).char}
    if hasattr(numpy, "exceptions"):  # numpy 1.25 moved them there
        wanted.update(AxisError=numpy.exceptions.AxisError,
                      ComplexWarning=numpy.exceptions.ComplexWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on some removed names
        return {name: value for name, value in wanted.items() if not hasattr(numpy, name)}


def _exact_autocast(stock):
    """``NumpyAutocaster.__call__`` choosing, as numpy 1.x did, the first dtype that holds a
    Python number exactly (under NEP 50 the stock one typed 0.9 as float32 in float64)."""
    def __call__(self, x):
        from theano.configdefaults import config
        if config.cast_policy != "custom" or not isinstance(x, (int, float)) or \
                isinstance(x, bool):
            return stock(self, x)
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
    return __call__


_held_locks = threading.local()  # the compile-lock folders this thread holds through ours


@contextlib.contextmanager
def _announced_lock(stock, lock_dir=None, *, timeout=-1):
    """Theano's compile lock (``stock``, its ``lock_ctx``), saying on stderr who holds it
    while it waits (Theano waits in silence, for minutes when another process compiles)."""
    import filelock
    from theano.configdefaults import config
    lock_dir = lock_dir or config.compiledir
    path = os.path.join(lock_dir, ".lock")
    start, wait = time.perf_counter(), LOCK_QUIET_WAIT  # free soon: nothing to say
    held = _held_locks.__dict__.setdefault("dirs", set())
    outer = lock_dir not in held  # a re-entry: this thread holds it already, no wait
    while outer:
        try:
            with filelock.FileLock(path).acquire(timeout=wait):
                break
        except filelock.Timeout:
            holder = runlog.flock_holder(path) or -1
            print(f"theano: waiting for the compile lock {path}, held by process "
                  f"{holder if holder > 0 else '?'} ({time.perf_counter() - start:.0f} s so far)",
                  file=sys.stderr, flush=True)
            wait = LOCK_REPORT_EVERY
    held.add(lock_dir)
    try:
        with stock(lock_dir, timeout=timeout):
            yield
    finally:
        if outer:
            held.discard(lock_dir)


_depth = 0
_depth_lock = threading.RLock()
_undo = contextlib.ExitStack()  # what the outermost graph_settings puts back


def _apply_graph_settings() -> None:
    import theano.compile.compilelock as compilelock
    from theano.scalar.basic import NumpyAutocaster
    limit = sys.getrecursionlimit()
    if limit < RECURSION_LIMIT:
        # the gradient of a deep CRMN is walked recursively (RecursionError at 1000)
        sys.setrecursionlimit(RECURSION_LIMIT)
        _undo.callback(sys.setrecursionlimit, limit)
    if "theano.scan.scan_perform_ext" not in sys.modules:
        # Theano-PyMC's Cython scan fails to build on Python 3.11 after a full g++ run;
        # a None entry fails the import at once and scan takes its Python loop
        sys.modules["theano.scan.scan_perform_ext"] = None
        _undo.callback(sys.modules.pop, "theano.scan.scan_perform_ext", None)
    if importlib.util.find_spec("numpy.linalg.linalg") is None:
        # numpy 2.5 removed the module; theano.gpuarray, which theano.scan imports, reads
        # LinAlgError from it
        sys.modules["numpy.linalg.linalg"] = numpy.linalg
        _undo.callback(sys.modules.pop, "numpy.linalg.linalg", None)
    for name, value in missing_numpy_names().items():
        setattr(numpy, name, value)
        _undo.callback(delattr, numpy, name)
    stock_call = NumpyAutocaster.__call__
    if _numpy_version() >= (2, 0) and not getattr(stock_call, "exact", False):
        NumpyAutocaster.__call__ = _exact_autocast(stock_call)
        _undo.callback(setattr, NumpyAutocaster, "__call__", stock_call)
    stock_lock = compilelock.lock_ctx
    if not getattr(stock_lock, "announces", False):
        announcing = functools.partial(_announced_lock, stock_lock)
        announcing.announces = True
        patched = [m for n, m in list(sys.modules.items())
                   if n.startswith("theano") and getattr(m, "lock_ctx", None) is stock_lock]
        for module in patched:  # the modules that imported lock_ctx by name
            module.lock_ctx = announcing
            _undo.callback(setattr, module, "lock_ctx", stock_lock)


@contextlib.contextmanager
def graph_settings():
    """Recursion limit, numpy 1.x's names and ``numpy.linalg.linalg``, exact autocasting, an
    announced compile lock, ``scan``'s Python loop; re-entrant: the outermost exit undoes all."""
    global _depth
    with _depth_lock:
        if _depth == 0:
            install()
            try:
                _apply_graph_settings()
            except BaseException:
                _undo.close()
                raise
        _depth += 1
    try:
        yield
    finally:
        with _depth_lock:
            _depth -= 1
            if _depth == 0:
                _undo.close()


def check_compiled_backend(probe: bool = True) -> None:
    """ConfigError where Theano would run the network's ops in Python, not compiled C;
    ``probe`` also compiles a convolution and requires ``CorrMM`` (once per process)."""
    import theano
    works, why = c_mode_available()
    if not works:
        raise ConfigError(why)
    cfg = theano.config
    rc = "THEANO_FLAGS"
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
    import theano.tensor as T
    from theano.tensor.nnet import conv2d
    with graph_settings():
        x = T.tensor4("x", dtype="float32")
        w = theano.shared(numpy.ones((2, 2, 3, 3), dtype="float32"))
        f = theano.function([x], conv2d(x, w, border_mode="half"))
    ops = {type(node.op).__name__ for node in f.maker.fgraph.toposort()}
    if not any(name.startswith(("CorrMM", "GpuCorrMM", "GpuDnnConv")) for name in ops):
        raise ConfigError(
            f"Theano compiled a convolution without a BLAS-backed op (got {sorted(ops)}); "
            f"check blas__ldflags={cfg.blas__ldflags!r} in {rc}")
    _probed = True
