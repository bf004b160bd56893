"""The Theano training graph compiled through JAX (``--theano-mode jax``): one jitted
function per graph.

Theano-PyMC 1.1.2 ships a JAX linker (``theano.link.jax``, mode ``"JAX"``) whose dispatch,
``jax_funcify``, turns each Theano ``Op`` into a JAX function. On our graphs it falls short:

* nine ops of the CRMN training graph have no conversion -- the JAX mode's optimiser still
  lowers ``conv2d`` to ``CorrMM`` and its two gradients, and Lasagne's tap pooling, the
  softmax cross-entropy, ``argmax`` and the LSTM gates' ``Split`` have none either;
* two conversions call functions that JAX has since removed: variadic ``Mul`` (``jnp.product``)
  and ``IncSubtensor`` (``jax.ops.index_update`` / ``index_add``);
* shape arithmetic (``Shape_i`` -> ``MakeVector`` -> ``Reshape``) becomes traced values, so
  reshapes and convolution gradients meet non-static shapes;
* the stock linker jits every output separately and re-traces shared subgraphs per consumer.

This package follows Theano-PyMC's own layout (``theano/link/jax/``), dispatch apart from
linker:

* :mod:`original.jax_mode.dispatch` -- the conversions, one ``@jax_funcify.register(Op)``
  per op, on a dispatcher of our own that falls back to Theano's stock one (Theano's
  registry is not changed);
* :mod:`original.jax_mode.linker` -- the graph walker and :class:`FusedJAXLinker`, which
  traces the whole optimised graph (outputs and shared-variable updates) into ONE
  ``jax.jit`` with static shapes and donated update buffers;
* this module -- the public API: :func:`configure`, :func:`jax_device`, :func:`jax_mode`,
  :func:`function` (the drop-in for ``theano.function``), :func:`get_value` /
  :func:`set_value`, :func:`describe`, :func:`linker_call`.

Process-wide settings
---------------------
Importing this package changes nothing outside it: not ``XLA_FLAGS``, not
``jax_enable_x64``, not Theano's stock conversions. What the mode needs from the process is
applied by :func:`configure`, which :class:`original.backend.TheanoBackend` calls when it
builds a JAX-mode stack, and which every function here that starts JAX (:func:`jax_device`,
:func:`jax_mode`, :func:`function`, :func:`set_value` with a device, :func:`describe`) calls
first. It sets:

* ``jax_enable_x64 = True`` -- Theano's labels, shape values and float64 graphs are 64-bit;
  without it JAX silently narrows them to 32 bits (a float64 CRMN step drifted by 4.6e-7
  from the C backend that way, instead of 4e-16). Every value is still cast to the dtype
  its Theano variable declares, so float32 graphs stay float32.
* ``--xla_cpu_use_mkl_dnn=false`` appended to ``XLA_FLAGS`` (:data:`XLA_CPU_FLAG`; the
  option is ``xla_cpu_use_onednn`` in jaxlib 0.11, see :func:`xla_cpu_option`) --
  XLA:CPU rewrites float32 matrix products to oneDNN calls by default; on the CRMN step
  (n=1, k=1, batch 100, 2-core CPU) that made the step 0.59 s instead of 0.39 s with XLA's
  own kernels. GPUs do not read it. XLA reads its flags once, when JAX starts its first
  backend: :func:`configure` adds the flag only while no backend has started (later it
  would have no effect) and only if ``XLA_FLAGS`` does not set the option already (the
  user's setting wins).
* ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (:data:`XLA_CLIENT_ENV`) -- on a GPU, JAX's client
  takes 75 % of the device's memory when its backend starts, which would leave the torch
  stack in the same process (``verify``, ``gpucheck``: torch and Theano-JAX one after the
  other on one GPU) a quarter of it; without preallocation JAX grows its pool as its
  buffers need (torch hands its cached blocks back between ``gpucheck``'s checks). Read
  once, when the backend starts: set only while no backend has started, and not at all
  where you set any ``XLA_PYTHON_CLIENT_*`` memory option yourself (``..._PREALLOCATE``,
  ``..._MEM_FRACTION``, ``..._ALLOCATOR``, or ``XLA_CLIENT_MEM_FRACTION``: yours win). CPUs
  do not read it.

:func:`configure` is idempotent: a second call changes nothing.

Shared variables (parameters, velocities, BN statistics, the learning rate) live in their
Theano containers as JAX device arrays between calls. Read and write them with
:func:`get_value` / :func:`set_value`, which use that same container, so the Theano shared
variable and the device copy are one storage cell and cannot disagree. (A C-mode function
cannot read a device array: to hand a variable back to one, ``set_value(v, get_value(v))``.)

Precision: float32 matrix products and convolutions run at full float32 precision
(``jax.default_matmul_precision("float32")`` -> XLA ``HIGHEST``) unless ``allow_tf32=True``
(``"tensorfloat32"`` -> ``HIGH``).
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

import jax

import theano
from theano.compile.mode import Mode, get_mode

from crmn.errors import ConfigError
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
#: (jaxlib reads them when the GPU backend starts; 0.11 also spells the fraction
#: XLA_CLIENT_MEM_FRACTION)
XLA_CLIENT_OPTIONS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                      "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def _backends_started() -> bool:
    """Whether JAX has started a backend (after which XLA_FLAGS is no longer read)."""
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(xla_bridge._backends)


def configure() -> Dict[str, str]:
    """Apply the process-wide settings the JAX mode needs (see the module docstring).

    Returns
    -------
    dict
        What this call changed, ``{setting: new value}``; empty when everything was in
        place already (a second call), so calling it again is harmless.
    """
    changed = {}
    flags = os.environ.get("XLA_FLAGS", "")
    started = _backends_started()
    if XLA_CPU_FLAG and not any(name in flags for name in _XLA_CPU_SPELLINGS) \
            and not started:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
        changed["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if not started and not any(name in os.environ for name in XLA_CLIENT_OPTIONS):
        os.environ.update(XLA_CLIENT_ENV)
        changed.update(XLA_CLIENT_ENV)
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
        changed["jax_enable_x64"] = "True"
    return changed


def jax_device(device: str):
    """The JAX device for ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (applies :func:`configure`
    first: asking JAX for its devices starts its backends).

    Raises
    ------
    ConfigError
        One line where jax has no CUDA backend (a CPU-only jaxlib or no NVIDIA GPU), or the
        device is not one of the above.
    """
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
    """``theano.function`` compiled into one jitted JAX function (same call semantics:
    numpy in, numpy out, shared variables updated after each call).

    Shared variables stay device arrays in their containers between calls; the buffers of
    updated ones are donated to the call. ``kwargs`` go to ``theano.function``.
    """
    return theano.function(inputs, outputs, updates=updates, name=name,
                           mode=jax_mode(device, allow_tf32), **kwargs)


def linker_call(fn) -> _Call:
    """The call object behind a function made by :func:`function`: its compile seconds,
    precision, device, ``host_outputs`` switch and ``lower()``.

    Raises
    ------
    TypeError
        ``fn`` was not compiled by :func:`function` (a programming error).
    """
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
