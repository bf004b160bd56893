"""The registry of backends (``--backend NAME`` to an implementation) and the checked backend
options. A backend is imported only when one is built or probed, so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from typing import Dict, Optional, Tuple

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from crmn.schema import option
from crmn.backend import Backend

REGISTRY = {"theano": "original.backend:TheanoBackend", "torch": "modern.backend:TorchBackend"}
BACKENDS = tuple(REGISTRY)
DEFAULT_BACKEND = "theano"  # the archive's reference backend
THEANO_MODES = ("c", "jax")  # Theano's C mode (the reference) or Theano-PyMC's JAX linker
DEFAULT_THEANO_MODE = "c"
#: ``--dtype`` choices of each backend; bfloat16 (autocast, float32 weights) is torch only
BACKEND_DTYPES: Dict[str, Tuple[str, ...]] = {"theano": ("float32", "float64"),
                                            "torch": ("float32", "float64", "bfloat16")}
DTYPES = ("float32", "float64", "bfloat16")
DEFAULT_DTYPE = "float32"
DEVICE_HELP = "cpu, cuda or cuda:N"
AUTO = "auto"  # --device auto: cuda where the backend can use a GPU here, else cpu


def check_device(name: str) -> str:
    """``name`` if it is ``cpu``, ``cuda`` or ``cuda:N`` (whether it is there: :func:`probe`)."""
    if not isinstance(name, str) or not re.fullmatch(r"(cpu|cuda)(:\d+)?", name):
        raise ConfigError(f"unknown device {name!r}: choose {DEVICE_HELP}")
    return name


def device_option(text: str) -> str:
    """argparse type of ``--device``: a device string or ``auto``."""
    try:
        return text if text == AUTO else check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _torch_gpu() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.cuda.is_available():
        return True, f"torch sees {torch.cuda.get_device_name(0)}"
    return False, "torch sees no CUDA GPU"


def _jax_gpu() -> Tuple[bool, str]:
    try:
        import jax
    except ImportError:
        return False, "jax is not installed"
    try:
        kind = jax.devices("gpu")[0].device_kind
    except (RuntimeError, IndexError):
        return False, f"jax {jax.__version__} has no GPU platform"
    return True, f"jax sees {kind}; the Theano graph runs through JAX"


def no_gpu(device: str) -> Optional[str]:
    """The line saying that ``device`` names a GPU neither torch nor jax sees here, else None."""
    if not device.startswith("cuda"):
        return None
    seen = []
    for probe_gpu in (_torch_gpu, _jax_gpu):  # jax only where torch sees none: it takes memory
        gpu, why = probe_gpu()
        if gpu:
            return None
        seen.append(why)
    return f"--device {device}, but there is no GPU here ({'; '.join(seen)})"


def auto_device(backend: str, theano_mode: Optional[str] = None) -> Tuple[str, Optional[str], str]:
    """What ``--device auto`` means here: ``(device, theano_mode, why)``; theano uses a GPU
    through a jax with a GPU platform (the JAX mode) unless ``--theano-mode c`` was asked."""
    if backend == "torch":
        gpu, why = _torch_gpu()
        return ("cuda" if gpu else "cpu"), None, why
    if theano_mode == "c":
        return "cpu", None, "--theano-mode c runs on the CPU"
    gpu, why = _jax_gpu()
    return ("cuda", "jax", why) if gpu else ("cpu", theano_mode, why)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Which backend, where, in which precision: checked when made; ``--resume`` may change it."""
    backend: str = option(DEFAULT_BACKEND, flag="--backend", choices=BACKENDS, group="backend",
                          resume=True, help="backend that builds the network")
    device: str = option("cpu", flag="--device", type=device_option, metavar="DEV",
                         group="backend", resume=True,
                         help=f"{DEVICE_HELP}, or auto: cuda where the backend can use a GPU "
                         "here, else cpu")
    dtype: str = option(DEFAULT_DTYPE, flag="--dtype", choices=DTYPES, group="backend",
                        resume=True, help="floating-point type of the network; bfloat16 "
                        "(autocast, float32 weights, channels-last) is torch only")
    compile: bool = option(False, flag="--compile", kind="true", group="backend", resume=True,
                           help="torch only: torch.compile behind the captured CUDA graph")
    theano_mode: str = option(
        DEFAULT_THEANO_MODE, flag="--theano-mode", choices=THEANO_MODES, group="backend",
        resume=True, default_help=f"{DEFAULT_THEANO_MODE} where Theano's C mode works, "
        "else jax; jax with --device auto on a GPU", help="theano only: compile the graph "
        "with Theano's C mode (the reference) or through JAX, which also runs it on a "
        "current GPU with --device cuda")
    compile_cache: bool = option(
        True, flag="--no-compile-cache", kind="false", group="backend", resume=True,
        default_help="~/.cache/crmn; see REPRODUCING.md", help="theano only: compile every "
        "graph afresh instead of reusing the steps an earlier run stored in $CRMN_CACHE")

    def __post_init__(self):
        if self.backend not in REGISTRY:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of "
                              f"{', '.join(BACKENDS)}")
        check_device(self.device)
        if self.dtype not in BACKEND_DTYPES[self.backend]:
            raise ConfigError(f"--dtype {self.dtype} is not a dtype of the {self.backend} "
                              f"backend; choose one of {', '.join(BACKEND_DTYPES[self.backend])}")
        if self.theano_mode not in THEANO_MODES:
            raise ConfigError(f"unknown --theano-mode {self.theano_mode!r}; choose one of "
                              f"{', '.join(THEANO_MODES)}")
        if self.theano_mode != DEFAULT_THEANO_MODE and self.backend != "theano":
            raise ConfigError("--theano-mode is an option of the theano backend")
        if self.compile and self.backend != "torch":
            raise ConfigError("--compile is an option of the torch backend; the theano "
                              "backend always compiles its graphs")
        if not self.compile_cache and self.backend != "theano":
            raise ConfigError("--no-compile-cache is an option of the theano backend (the "
                              "torch backend keeps no compile cache)")

    def describe(self) -> str:
        """The options in words, e.g. ``theano-jax, cpu, float32``."""
        return (f"{label(self)}, {self.device}, {self.dtype}{' + compile' if self.compile else ''}"
                f"{'' if self.compile_cache else ', no compile cache'}")


def label(options: BackendOptions) -> str:
    """The one name of a backend configuration in tables and files: ``theano-c``, ``torch``..."""
    return f"theano-{options.theano_mode}" if options.backend == "theano" else options.backend


def backend_class(backend: str):
    module, cls = REGISTRY[backend].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"the {backend} backend needs the Python package {exc.name!r}, "
                          f"which this environment lacks (pip install {exc.name}; see "
                          f"REPRODUCING.md §4)") from None


def probe(options: BackendOptions) -> None:
    """:class:`ConfigError` unless the backend's framework can run ``options`` here."""
    problem = backend_class(options.backend).problem(options)
    if problem:
        raise ConfigError(problem)


def default_theano_mode(backend: str) -> str:
    """``--theano-mode`` when none is given: C where Theano's C mode works, else JAX."""
    return backend_class("theano").preferred_mode() if backend == "theano" else DEFAULT_THEANO_MODE


def build(options: BackendOptions, model: ModelConfig, train: TrainConfig, **expert) -> Backend:
    """The network of ``model`` in ``options``' backend; ``expert``: settings never recorded."""
    extra = {"theano": {"theano_mode": options.theano_mode, "compile_cache": options.compile_cache},
             "torch": {"compile": options.compile}}.get(options.backend, {})
    return backend_class(options.backend)(model, train, device=options.device,
                                        dtype=options.dtype, **extra, **expert)
