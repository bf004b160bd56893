"""The registry of stacks: the one place that maps ``--backend NAME`` to an implementation.

It sits above both stacks (they import :mod:`crmn.stack`, never this module) and imports a
stack only when one is built, so choosing a name costs nothing and ``--help`` stays fast.
The command line, :mod:`crmn.verify` and :mod:`crmn.bench` build every network through
:func:`build`.
"""
from __future__ import annotations

import importlib

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from crmn.stack import Stack, check_device

#: name -> "module:class" of each stack
REGISTRY = {"theano": "original.backend:TheanoBackend", "torch": "modern.backend:TorchBackend"}
BACKENDS = tuple(REGISTRY)
#: the archive's reference stack, the default of every command
DEFAULT_BACKEND = "theano"
#: ``--theano-mode``: Theano's C backend (the reference) or Theano-PyMC's JAX linker
THEANO_MODES = ("c", "jax")
DEFAULT_THEANO_MODE = "c"
#: ``--dtype`` choices (bfloat16: torch only) and the default of every command
DTYPES = ("float32", "float64", "bfloat16")
DEFAULT_DTYPE = "float32"


def build(name: str, model: ModelConfig, train: TrainConfig, *, device: str = "cpu",
          dtype: str = DEFAULT_DTYPE, compile: bool = False,
          theano_mode: str = DEFAULT_THEANO_MODE) -> Stack:
    """The network of ``model`` in stack ``name``, initialised from ``train.seed``.

    ``compile`` (torch only) puts ``torch.compile`` behind the captured CUDA graph; the
    Theano stack always compiles its graphs, through its C backend or, with
    ``theano_mode="jax"``, through JAX (which is what runs it on a current GPU).

    Raises
    ------
    ConfigError
        An unknown stack, device or dtype, or an option the stack does not have.
    """
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    check_device(device)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    options = {"device": device, "dtype": dtype}
    if theano_mode not in THEANO_MODES:
        raise ConfigError(f"unknown --theano-mode {theano_mode!r}; choose one of "
                          f"{', '.join(THEANO_MODES)}")
    if theano_mode != DEFAULT_THEANO_MODE:
        if name != "theano":
            raise ConfigError("--theano-mode is an option of the theano backend")
        options["mode"] = theano_mode
    if compile:
        if name != "torch":
            raise ConfigError("--compile is an option of the torch backend; the theano "
                              "backend always compiles its graphs")
        options["compile"] = True
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, train, **options)
