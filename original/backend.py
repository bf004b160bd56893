"""The Theano + Lasagne backend behind :class:`crmn.backend.Backend` (docs/spec.md §5-6):
section 4's SGD, (weight_decay / 2) · Σ w² over the arrays :mod:`crmn.naming` decays (Lasagne's
tags would decay the peepholes too); C mode (``_CMode``) or JAX mode (``_JaxMode``)."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import lasagne
import numpy as np
import theano
import theano.tensor as T

from crmn.compile_cache import HIT, MISS, OFF, open_cache
from crmn.config import ModelConfig, TrainConfig
from crmn.convert import canonical_to_lasagne, lasagne_to_canonical
from crmn.errors import CheckpointError, ConfigError
from crmn.naming import param_specs, velocity_name
from crmn.registry import BACKEND_DTYPES, THEANO_MODES, check_device, no_gpu
from original import compat
from original.model import build, native_params

DTYPES = BACKEND_DTYPES["theano"]


def native_names(cfg: ModelConfig) -> Dict[str, str]:
    """``{canonical name: Lasagne name}`` of ``cfg``, as :mod:`crmn.convert` names them."""
    specs = param_specs(cfg)
    zeros = {s.name: np.zeros(s.shape, dtype=np.float32) for s in specs}
    native = canonical_to_lasagne(cfg, zeros, with_velocity=False)
    return dict(zip((s.name for s in specs), native))


def _check_device(device: str) -> str:
    """The device Theano's flags chose, described; ConfigError where it is not ``device``."""
    actual = str(theano.config.device)
    wants_gpu = check_device(device).startswith("cuda")
    if wants_gpu and not actual.startswith(("cuda", "gpu")):
        raise ConfigError(
            f"--device {device} asked for a GPU, but Theano runs on {actual}: set "
            f"THEANO_FLAGS=device=cuda (with a GPU-enabled Theano and libgpuarray) before "
            f"starting, or run the same graph on the GPU with --theano-mode jax")
    return f"{actual} (Theano-PyMC {theano.__version__}, blas {theano.config.blas__ldflags})"


class _CMode:
    """C mode: ``theano.function`` (``_compile`` holds the graph settings), host variables."""

    def __init__(self, device: str, dtype: str, cache=None, context=None):
        compat.check_compiled_backend(probe=False)  # the compile probe waits for one
        self.device = _check_device(device)

    def function(self, inputs, outputs, updates, name: str, device_outputs: bool = False):
        compat.check_compiled_backend()  # once per process: a convolution is CorrMM
        return theano.function(inputs, outputs, updates=updates, name=name)

    def compile_seconds(self, fns) -> float:
        return 0.0  # all of it inside theano.function, which the backend times

    def cache_state(self, fns) -> None:
        return None  # Theano's own module cache says nothing per function

    def get_value(self, shared) -> np.ndarray:
        return shared.get_value()

    def set_value(self, shared, value) -> None:
        shared.set_value(value)


class _JaxMode:
    """One jitted function per graph (:mod:`original.jax_mode`), shared variables resident
    on the device; with a compile cache, each a ``CachedFunction``."""

    def __init__(self, device: str, dtype: str, cache=None, context=None):
        from original import jax_mode
        jax_mode.configure()
        self._jax_mode = jax_mode
        self._device = jax_mode.jax_device(device)
        self.device = (f"{device} (Theano-PyMC {theano.__version__} via "
                       f"{jax_mode.describe(self._device, dtype)})")
        self.cache, self._context = cache, dict(context or {})
        if cache is not None:
            from original.jax_mode import cache as jax_cache
            jax_cache.use_xla_cache(cache.root)

    def function(self, inputs, outputs, updates, name: str, device_outputs: bool = False):
        def build():
            fn = self._jax_mode.function(inputs, outputs, updates=updates, name=name,
                                         device=self._device)
            self._jax_mode.linker_call(fn).host_outputs = not device_outputs
            return fn

        if self.cache is None:
            return build()
        from original.jax_mode.cache import CachedFunction
        fn = CachedFunction(inputs, outputs, updates, name, self.cache, build, self._device,
                            self._jax_mode.PRECISIONS[False][0], self._context)
        fn.host_outputs = not device_outputs
        return fn

    def compile_seconds(self, fns) -> float:
        """XLA's compilation at first calls (with the cache, also lookups and exports)."""
        return sum(self._jax_mode.compile_seconds(fn) for fn in fns)

    def cache_state(self, fns) -> str:
        if self.cache is None:
            return OFF
        states = [s for fn in fns for s in fn.states]
        if not states:
            return None
        return HIT if all(s == HIT for s in states) else MISS

    def get_value(self, shared) -> np.ndarray:
        return self._jax_mode.get_value(shared)

    def set_value(self, shared, value) -> None:
        self._jax_mode.set_value(shared, value, device=self._device)


class TheanoBackend:
    """A CRMN or ResNet in Theano + Lasagne, driven through :class:`crmn.backend.Backend`;
    ``compile_cache``: the JAX mode keeps compiled steps in :mod:`crmn.compile_cache`."""
    name = "theano"

    @staticmethod
    def problem(options) -> Optional[str]:
        """Why this backend cannot run ``options`` here (one line), or None."""
        if options.theano_mode == "c":
            works, why = compat.c_mode_available()
            if not works:
                return f"--theano-mode c: {why}"
        if options.device == "cpu":
            return None
        try:
            if options.theano_mode == "jax":
                from original import jax_mode
                jax_mode.jax_device(options.device)
            else:
                _check_device(options.device)
        except ConfigError as exc:
            missing = no_gpu(options.device)  # then the ways exc offers need one too
            return (f"{missing}: run on this CPU with --device cpu, or with --device auto (a "
                    "GPU where there is one)") if missing else str(exc)
        return None

    @staticmethod
    def preferred_mode() -> str:
        """C (the reference) where it works, else JAX (numpy 2, no C++ compiler)."""
        return "c" if compat.c_mode_available()[0] else "jax"

    def __init__(self, model: ModelConfig, train: TrainConfig, device: str = "cpu",
                 dtype: str = "float32", theano_mode: str = "c", compile_cache: bool = True):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} for the theano backend: choose "
                              f"{' or '.join(DTYPES)}")
        if theano_mode not in THEANO_MODES:
            raise ConfigError(f"unknown --theano-mode {theano_mode!r}: choose "
                              f"{' or '.join(THEANO_MODES)}")
        cache = open_cache(compile_cache) if theano_mode == "jax" else None
        context = {"model": model.to_dict(), "dtype": dtype, "mode": theano_mode,
                   "momentum": train.momentum, "nesterov": train.nesterov,
                   "weight_decay": train.weight_decay}
        self._mode = (_JaxMode if theano_mode == "jax" else _CMode)(device, dtype, cache,
                                                                     context)
        self.device = self._mode.device
        self.model, self.train, self.dtype = model, train, dtype
        self._x = T.tensor4("x", dtype=dtype)  # (B, 3, 32, 32)
        self._y = T.lvector("y")  # (B,) int64 class indices
        with theano.config.change_flags(floatX=dtype):
            self._out = build(model, seed=train.seed, input_var=self._x)
        self._logits_layer = self._out.input_layer  # DenseLayer "fc", (B, classes)
        self._params = native_params(self._out)  # Lasagne name -> shared variable
        self._trainable = lasagne.layers.get_all_params(self._out, trainable=True)
        self._lr = theano.shared(np.asarray(train.lr_stages[0], dtype=dtype), name="lr")
        self._lr_now = float(train.lr_stages[0])
        self._velocity: Dict[str, "theano.compile.SharedVariable"] = {}
        self._train_graph = None  # ([loss, accuracy], updates), built once
        self._fns: Dict[str, Callable] = {}
        self._function_seconds = 0.0  # wall-clock seconds spent in theano.function so far

    def _build_updates(self):
        """([loss, accuracy], momentum updates), built once with the velocities."""
        if self._train_graph is not None:
            return self._train_graph
        with theano.config.change_flags(floatX=self.dtype), compat.graph_settings():
            logits, probs = lasagne.layers.get_output(
                [self._logits_layer, self._out], deterministic=False,
                batch_norm_update_averages=True)
            ce = lasagne.objectives.categorical_crossentropy(probs, self._y).mean()
            acc = T.mean(T.eq(T.argmax(logits, axis=1), self._y))
            names = native_names(self.model)
            decayed = [self._params[names[s.name]] for s in param_specs(self.model) if s.decayed]
            penalty = lasagne.regularization.apply_penalty(decayed, lasagne.regularization.l2)
            loss = ce + (self.train.weight_decay / 2.0) * penalty
            rule = (lasagne.updates.nesterov_momentum if self.train.nesterov
                    else lasagne.updates.momentum)
            updates = rule(loss, self._trainable, self._lr, momentum=self.train.momentum)
        # Lasagne adds one velocity per parameter after the parameters' own updates, in
        # parameter order; give them the native names crmn.convert expects
        velocities = [v for v in updates if all(v is not p for p in self._trainable)]
        if len(velocities) != len(self._trainable):
            raise AssertionError("could not identify Lasagne's momentum velocities")
        for p, v in zip(self._trainable, velocities):
            assert v.get_value(borrow=True).shape == p.get_value(borrow=True).shape
            v.name = velocity_name(p.name)
            self._velocity[p.name] = v
        self._train_graph = [ce, acc], updates
        return self._train_graph

    def _compile(self, which: str) -> Callable:
        """Compile one of "train", "forward_train", "forward_eval" on first use."""
        if which in self._fns:
            return self._fns[which]
        with theano.config.change_flags(floatX=self.dtype), compat.graph_settings():
            if which == "train":
                inputs, (outputs, updates) = [self._x, self._y], self._build_updates()
            else:
                logits = lasagne.layers.get_output(
                    self._logits_layer, deterministic=(which == "forward_eval"))
                inputs, outputs, updates = [self._x], logits, None
            start = time.perf_counter()
            # the step's loss and accuracy may stay on the device (read once per epoch)
            fn = self._mode.function(inputs, outputs, updates, which,
                                      device_outputs=which == "train")
            self._function_seconds += time.perf_counter() - start
        self._fns[which] = fn
        return fn

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, compile-lock waits and XLA's first calls included."""
        return self._function_seconds + self._mode.compile_seconds(self._fns.values())

    @property
    def cache_outcome(self) -> Optional[str]:
        """``"hit"`` (every graph from the compile cache), ``"miss"``, ``"off"``; else None."""
        return self._mode.cache_state(self._fns.values())

    def _velocities(self):
        self._build_updates()  # the velocities are created with the update graph
        return self._velocity

    def param_count(self) -> int:
        return int(lasagne.layers.count_params(self._out, trainable=True))

    def _images(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ConfigError(f"images must be (B, 3, 32, 32), got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits (B, classes) of x (B, 3, 32, 32), batch statistics when ``training``."""
        fn = self._compile("forward_train" if training else "forward_eval")
        return fn(self._images(x))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> Tuple[float, float]:
        """One SGD step; (summed cross-entropy, correct images) before it (JAX: device scalars)."""
        fn = self._compile("train")
        if lr != self._lr_now:  # a shared scalar: a new stage needs no recompilation
            self._mode.set_value(self._lr, np.asarray(lr, dtype=self.dtype))
            self._lr_now = lr
        ce, acc = fn(self._images(x), np.asarray(y, dtype=np.int64))
        return ce * len(y), acc * len(y)

    def get_state(self) -> Dict[str, np.ndarray]:
        """Parameters, BN running statistics and velocities, canonical names and layouts."""
        shared = {**self._params, **{v.name: v for v in self._velocities().values()}}
        native = {name: self._mode.get_value(p) for name, p in shared.items()}
        return lasagne_to_canonical(self.model, native, with_velocity=True)

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Load canonical arrays, cast to this dtype (crmn.convert checks names and shapes)."""
        native = canonical_to_lasagne(self.model, state, with_velocity=True)
        targets = {**self._params, **{v.name: v for v in self._velocities().values()}}
        unknown = set(native) - set(targets)
        if unknown:  # pragma: no cover - crmn.convert and the builder share one naming
            raise CheckpointError(f"state has arrays this network lacks: {sorted(unknown)}")
        for name, value in native.items():
            self._mode.set_value(targets[name], np.asarray(value, dtype=self.dtype))

    def reset_velocity(self) -> None:
        for v in self._velocities().values():
            self._mode.set_value(v, np.zeros_like(self._mode.get_value(v)))

