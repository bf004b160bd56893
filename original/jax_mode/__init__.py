"""The Theano training graph compiled through JAX (``--theano-mode jax``): one jitted
function per graph.

Theano-PyMC 1.1.2's own JAX linker falls short on these graphs: nine ops of the CRMN step
have no conversion (``CorrMM`` and its gradients, pooling, softmax cross-entropy,
``argmax``, ``Split``), two conversions call functions JAX removed, shape arithmetic
becomes traced values, and every output is jitted separately. Laid out as Theano-PyMC's
``theano/link/jax/``: :mod:`~original.jax_mode.dispatch` (the conversions, on a dispatcher
of our own over Theano's), :mod:`~original.jax_mode.linker` (:class:`FusedJAXLinker`: the
whole optimised graph, updates included, in ONE ``jax.jit`` with static shapes and donated
buffers), and this module's public API.

Importing changes nothing in the process. :func:`configure`, called before JAX starts by
every function here that starts it, sets (never over the user's own settings):

* ``jax_enable_x64`` -- Theano's labels, shapes and float64 graphs are 64-bit; every value
  is still cast to its Theano dtype, so float32 graphs stay float32;
* :data:`XLA_CPU_FLAG` in ``XLA_FLAGS`` -- XLA:CPU's oneDNN rewrite of float32 products is
  slower here than XLA's own kernels (the option's name depends on the jaxlib release;
  XLA reads it once, when its first backend starts);
* :data:`XLA_CLIENT_ENV` -- no preallocation of 75 % of a GPU that torch shares in the same
  process (``verify``, ``gpucheck``).

Shared variables live in their Theano containers as JAX device arrays between calls; read
and write them with :func:`get_value` / :func:`set_value`. float32 products run at full
precision (XLA ``HIGHEST``) unless ``allow_tf32=True``.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

import jax

import theano
from theano.compile.mode import Mode, get_mode

from crmn.errors import ConfigError
from original import compat
# conversion modules: importing one registers its conversions on dispatch.jax_funcify
from original.jax_mode import conv, dispatch  # noqa: F401
from original.jax_mode.graph import convert_graph, evaluate
from original.jax_mode.linker import PRECISIONS, FusedJAXLinker, _Call

#: what to install where ``device="cuda"`` finds no CUDA jaxlib (requirements-gpu.txt)
GPU_INSTALL = "pip install -r requirements-gpu.txt"

#: XLA's name of the oneDNN option by jaxlib release, as measured: an unknown name in
#: ``XLA_FLAGS`` aborts the process, so releases not listed get no flag (XLA's default)
XLA_CPU_OPTIONS = {(0, 4): "xla_cpu_use_mkl_dnn", (0, 11): "xla_cpu_use_onednn"}
#: every spelling of the option, to see whether the user's XLA_FLAGS sets it
_XLA_CPU_SPELLINGS = ("xla_cpu_use_mkl_dnn", "xla_cpu_use_onednn")


def xla_cpu_option(jaxlib_version: str = None):
    """The name of XLA's oneDNN option in ``jaxlib_version`` (the installed jaxlib by
    default), or None where it is not known for that release."""
    if jaxlib_version is None:
        from importlib import metadata

        jaxlib_version = metadata.version("jaxlib")
    release = tuple(int(part) for part in jaxlib_version.split(".")[:2])
    return XLA_CPU_OPTIONS.get(release)


#: the XLA:CPU option :func:`configure` turns off here, and its setting (None: not known)
XLA_CPU_OPTION = xla_cpu_option()
XLA_CPU_FLAG = f"--{XLA_CPU_OPTION}=false" if XLA_CPU_OPTION else None


#: the JAX client's memory settings :func:`configure` applies (on a GPU: no preallocation)
XLA_CLIENT_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
#: the user's own memory options of JAX's client: any of them set leaves all to the user
XLA_CLIENT_OPTIONS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                      "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def configure() -> Dict[str, str]:
    """Apply the process-wide settings the JAX mode needs (see the module docstring);
    returns what this call changed, ``{setting: new value}`` (empty on a second call)."""
    changed = {}
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_CPU_FLAG and not any(name in flags for name in _XLA_CPU_SPELLINGS):
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
        changed["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if not any(name in os.environ for name in XLA_CLIENT_OPTIONS):
        os.environ.update(XLA_CLIENT_ENV)
        changed.update(XLA_CLIENT_ENV)
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
        changed["jax_enable_x64"] = "True"
    return changed


def jax_device(device: str):
    """The JAX device for ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (applies :func:`configure`
    first: asking JAX for devices starts its backends); one-line ConfigError where jax has
    no CUDA backend or the device is unknown."""
    configure()
    if device == "cpu":
        return jax.devices("cpu")[0]
    if device.startswith(("cuda", "gpu")):
        kind, _, number = device.partition(":")
        if kind not in ("cuda", "gpu") or not (number.isdigit() or not number):
            raise ConfigError(f"unknown device {device!r}: choose cpu, cuda or cuda:N")
        index = int(number or 0)
        try:
            gpus = jax.devices("cuda")
        except RuntimeError:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise ConfigError(
                f"--device {device} with --theano-mode jax needs a CUDA build of jaxlib "
                f"{jax.__version__} and an NVIDIA GPU, but jax finds only: {found}; install "
                f"it with `{GPU_INSTALL}`") from None
        if index >= len(gpus):
            raise ConfigError(f"--device {device}: jax sees {len(gpus)} CUDA device(s)")
        return gpus[index]
    raise ConfigError(f"unknown device {device!r}: choose cpu or cuda")


def jax_mode(device="cpu", allow_tf32: bool = False) -> Mode:
    """Theano's "JAX" optimiser query without in-place rewrites (JAX arrays are immutable),
    linked by :class:`FusedJAXLinker` on ``device`` ("cpu", "cuda" or a jax.Device).
    Applies :func:`configure` first."""
    configure()
    if isinstance(device, str):
        device = jax_device(device)
    query = get_mode("JAX").excluding("inplace", *conv.EXCLUDED_REWRITES).provided_optimizer
    return Mode(FusedJAXLinker(device, allow_tf32), query)


def function(inputs, outputs=None, updates=None, name=None, device="cpu",
             allow_tf32: bool = False, **kwargs):
    """``theano.function`` compiled into one jitted JAX function (numpy in, numpy out,
    shared variables updated after each call, kept on the device, their buffers donated)."""
    with compat.graph_settings():
        return theano.function(inputs, outputs, updates=updates, name=name,
                               mode=jax_mode(device, allow_tf32), **kwargs)


def linker_call(fn) -> _Call:
    """The call object behind a function made by :func:`function` (compile seconds,
    precision, ``host_outputs``, ``lower()``); TypeError for any other function."""
    from original.jax_mode.cache import CachedFunction

    if isinstance(fn, CachedFunction):  # the Theano function of its miss path
        fn = fn.theano_function()
    call = getattr(fn.maker.linker, "call", None)
    if not isinstance(call, _Call):
        raise TypeError(f"{fn} was not compiled by original.jax_mode.function")
    return call


def compile_seconds(fn) -> float:
    """Seconds ``fn`` (made by :func:`function`, or a compile cache's
    :class:`~original.jax_mode.cache.CachedFunction`) spent compiling at its calls."""
    from original.jax_mode.cache import CachedFunction

    if isinstance(fn, CachedFunction):
        return fn.compile_seconds
    return linker_call(fn).compile_seconds


def get_value(shared) -> np.ndarray:
    """A host copy (numpy) of ``shared``'s current value, wherever it lives."""
    return np.array(shared.container.storage[0])


def set_value(shared, value, device=None) -> None:
    """Set ``shared`` through Theano's own checks (dtype, ndim), then place it on ``device``
    (a device string or jax.Device) in the same storage cell; None leaves it on the host
    until the next call moves it."""
    shared.set_value(value)
    if device is not None:
        if isinstance(device, str):
            device = jax_device(device)
        cell = shared.container.storage
        cell[0] = jax.device_put(cell[0], device)


def describe(device, dtype: str, allow_tf32: bool = False) -> str:
    """``"JAX 0.4.30 cpu, float32 HIGHEST"``: the version, backend and precision in use."""
    if isinstance(device, str):
        device = jax_device(device)
    precision = PRECISIONS[allow_tf32][1] if dtype == "float32" else dtype
    label = f"{dtype} {precision}" if dtype == "float32" else dtype
    return f"JAX {jax.__version__} {device.platform}, {label}"


__all__ = ["configure", "function", "jax_mode", "FusedJAXLinker", "convert_graph",
           "evaluate", "jax_device", "get_value", "set_value", "describe", "linker_call",
           "compile_seconds",
           "PRECISIONS", "GPU_INSTALL", "XLA_CPU_FLAG", "XLA_CLIENT_ENV", "xla_cpu_option"]
