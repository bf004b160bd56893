"""The Theano graph compiled through JAX (``--theano-mode jax``): the whole graph, updates
included, in one ``jax.jit`` (:mod:`~original.jax_mode.linker`), with conversions for the
ops Theano-PyMC's JAX linker lacks or breaks (:mod:`~original.jax_mode.dispatch`). Importing
changes nothing; :func:`configure` sets what JAX needs before it starts.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Dict

import numpy as np

import jax

import theano
from theano.compile.mode import Mode, get_mode

from crmn.errors import ConfigError
from original import compat
# conversion modules: importing one registers its conversions on dispatch.jax_funcify
from original.jax_mode import conv, dispatch, scan  # noqa: F401
from original.jax_mode.linker import PRECISIONS, FusedJAXLinker, _Call

GPU_INSTALL = "pip install -r requirements-gpu.txt"  # where "cuda" finds no CUDA jaxlib

#: XLA:CPU's oneDNN rewrite of float32 products is slower here than XLA's own kernels; its
#: option's name by jaxlib release (an unknown name in ``XLA_FLAGS`` aborts the process)
XLA_CPU_OPTIONS = {(0, 4): "xla_cpu_use_mkl_dnn", (0, 11): "xla_cpu_use_onednn"}


def xla_cpu_option(jaxlib_version: str = None):
    """XLA's oneDNN option in ``jaxlib_version`` (default installed), or None: unknown."""
    version = jaxlib_version or metadata.version("jaxlib")
    release = tuple(int(part) for part in version.split(".")[:2])
    return XLA_CPU_OPTIONS.get(release)


XLA_CPU_OPTION = xla_cpu_option()
XLA_CPU_FLAG = f"--{XLA_CPU_OPTION}=false" if XLA_CPU_OPTION else None
#: no preallocation of 75 % of a GPU that torch shares in the same process
XLA_CLIENT_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
#: the user's own memory options of JAX's client: any of them set leaves all to the user
XLA_CLIENT_OPTIONS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                      "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def configure() -> Dict[str, str]:
    """Set, never over the user's own settings, :data:`XLA_CPU_FLAG`, :data:`XLA_CLIENT_ENV`
    and ``jax_enable_x64`` (Theano's labels and shapes are 64-bit; values keep their Theano
    dtype); returns what this call changed."""
    changed = {}
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_CPU_FLAG and not any(name in flags for name in XLA_CPU_OPTIONS.values()):
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
        changed["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if not any(name in os.environ for name in XLA_CLIENT_OPTIONS):
        os.environ.update(XLA_CLIENT_ENV)
        changed.update(XLA_CLIENT_ENV)
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
        changed["jax_enable_x64"] = "True"
    return changed


def jax_device(device):
    """The JAX device for ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (after :func:`configure`:
    asking for devices starts JAX), a JAX device as it is; ConfigError where jax has none."""
    if not isinstance(device, str):
        return device
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
    linked by :class:`FusedJAXLinker` on ``device``."""
    configure()
    query = get_mode("JAX").excluding("inplace", *conv.EXCLUDED_REWRITES).provided_optimizer
    return Mode(FusedJAXLinker(jax_device(device), allow_tf32), query)


def function(inputs, outputs=None, updates=None, name=None, device="cpu",
             allow_tf32: bool = False, **kwargs):
    """``theano.function`` compiled into one jitted JAX function."""
    with compat.graph_settings():
        return theano.function(inputs, outputs, updates=updates, name=name,
                               mode=jax_mode(device, allow_tf32), **kwargs)


def linker_call(fn) -> _Call:
    """The :class:`_Call` behind a function made by :func:`function`."""
    from original.jax_mode.cache import CachedFunction
    if isinstance(fn, CachedFunction):  # the Theano function of its miss path
        fn = fn.theano_function()
    call = getattr(fn.maker.linker, "call", None)
    if not isinstance(call, _Call):
        raise TypeError(f"{fn} was not compiled by original.jax_mode.function")
    return call


def compile_seconds(fn) -> float:
    """Seconds ``fn`` (from :func:`function`, or a ``CachedFunction``) spent compiling."""
    from original.jax_mode.cache import CachedFunction
    return (fn if isinstance(fn, CachedFunction) else linker_call(fn)).compile_seconds


def get_value(shared) -> np.ndarray:
    return np.array(shared.container.storage[0])


def set_value(shared, value, device=None) -> None:
    """Set ``shared`` through Theano's checks, then put it on ``device`` (None: the next call)."""
    shared.set_value(value)
    if device is not None:
        cell = shared.container.storage
        cell[0] = jax.device_put(cell[0], jax_device(device))


def describe(device, dtype: str, allow_tf32: bool = False) -> str:
    """``"JAX 0.4.30 cpu, float32 HIGHEST"``: the version, backend and precision in use."""
    label = f"{dtype} {PRECISIONS[allow_tf32][1]}" if dtype == "float32" else dtype
    return f"JAX {jax.__version__} {jax_device(device).platform}, {label}"

